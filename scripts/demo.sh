#!/usr/bin/env bash
# The main job on a generated sample: build `store`, put a mix of generated files (tiny,
# 4 KiB, just under and over the 4 MiB large-blob threshold, 32 MiB) into a fresh store,
# read every one back and compare, then show what the store holds.
# Usage: scripts/demo.sh [STORE_ROOT]   (default: a temporary directory, removed after)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p layerstore --bin store
store=target/release/store
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=${1:-$work/store}

echo "== generating sample files in $work/in"
mkdir -p "$work/in" "$work/out"
: > "$work/in/empty"
echo "hello, layerstore" > "$work/in/hello.txt"
for i in $(seq 1 200); do head -c 4096 /dev/urandom > "$work/in/small-$i"; done
head -c $((4 * 1024 * 1024 - 1)) /dev/urandom > "$work/in/under-threshold"
head -c $((4 * 1024 * 1024)) /dev/urandom > "$work/in/at-threshold"
head -c $((32 * 1024 * 1024)) /dev/urandom > "$work/in/large"
cp "$work/in/small-1" "$work/in/duplicate-of-small-1"

echo "== store --root $root blob put (204 files)"
files=("$work"/in/*)
"$store" --root "$root" blob put "${files[@]}" > "$work/digests"

echo "== reading every blob back and comparing"
i=0
while read -r digest; do
  f=${files[$i]}
  "$store" --root "$root" blob get "$digest" -o "$work/out/blob"
  cmp -s "$f" "$work/out/blob" || { echo "MISMATCH for $f ($digest)"; exit 1; }
  want="sha256:$(sha256sum "$f" | cut -c1-64)"
  [ "$want" = "$digest" ] || { echo "WRONG DIGEST for $f: $digest, sha256sum says $want"; exit 1; }
  i=$((i + 1))
done < "$work/digests"
echo "all $i blobs read back byte-exact; digests agree with sha256sum"

echo "== store blob stat $(head -1 "$work/digests")"
"$store" --root "$root" blob stat "$(head -1 "$work/digests")"
echo "== store info"
"$store" --root "$root" info
