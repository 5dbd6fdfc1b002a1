#!/usr/bin/env bash
# The main job on a generated sample: build `store`, put a mix of generated files (tiny,
# 4 KiB, just under and over the 4 MiB large-blob threshold, 32 MiB) into a fresh store,
# read every one back and compare; then build a small two-layer OCI image layout with
# plain tar/gzip/sha256sum, import it, inspect, unpack, export, verify it deeply, remove
# its name and collect it.
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

echo
echo "== building a two-layer OCI image layout with tar, gzip and sha256sum"
img=$work/image
mkdir -p "$img/blobs/sha256" "$work/rootfs1/etc" "$work/rootfs2/app"
echo "demo" > "$work/rootfs1/etc/hostname"
head -c 100000 /dev/urandom > "$work/rootfs2/app/data.bin"
ln -s ../etc/hostname "$work/rootfs2/app/hostname"
sha() { sha256sum "$1" | cut -c1-64; }
layer() { # dir -> prints "diffid digest size"
  tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$1" -cf "$work/l.tar" .
  local diff; diff=$(sha "$work/l.tar")
  gzip -n -c "$work/l.tar" > "$work/l.tgz"
  local d; d=$(sha "$work/l.tgz")
  cp "$work/l.tgz" "$img/blobs/sha256/$d"
  echo "$diff $d $(stat -c %s "$work/l.tgz")"
}
read -r diff1 l1 s1 < <(layer "$work/rootfs1")
read -r diff2 l2 s2 < <(layer "$work/rootfs2")
printf '{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z","rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]},"config":{}}' "$diff1" "$diff2" > "$work/config.json"
cfg=$(sha "$work/config.json"); cp "$work/config.json" "$img/blobs/sha256/$cfg"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
  "$cfg" "$(stat -c %s "$work/config.json")" "$l1" "$s1" "$l2" "$s2" > "$work/manifest.json"
man=$(sha "$work/manifest.json"); cp "$work/manifest.json" "$img/blobs/sha256/$man"
printf '{"imageLayoutVersion":"1.0.0"}' > "$img/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"example.com/demo/app:1.0"}}]}' \
  "$man" "$(stat -c %s "$work/manifest.json")" > "$img/index.json"

echo "== store import $img"
"$store" --root "$root" import "$img"
echo "== store images"
"$store" --root "$root" images
echo "== store inspect example.com/demo/app:1.0"
"$store" --root "$root" inspect example.com/demo/app:1.0
echo "== store unpack example.com/demo/app:1.0 $work/unpacked"
"$store" --root "$root" unpack example.com/demo/app:1.0 "$work/unpacked"
cmp "$work/unpacked/app/data.bin" "$work/rootfs2/app/data.bin"
[ "$(readlink "$work/unpacked/app/hostname")" = "../etc/hostname" ]
echo "unpacked tree matches the layers"
echo "== store export example.com/demo/app:1.0 -o $work/app.tar, then import it into a fresh store"
"$store" --root "$root" export example.com/demo/app:1.0 -o "$work/app.tar"
"$store" --root "$work/store2" import "$work/app.tar" >/dev/null
"$store" --root "$work/store2" export example.com/demo/app:1.0 -o "$work/app2.tar"
cmp "$work/app.tar" "$work/app2.tar" && echo "export -> import -> export is byte-identical"
echo "== store verify --deep"
"$store" --root "$root" verify --deep
echo "== store rmi example.com/demo/app:1.0; store gc --grace 0s"
echo "   (the plain blobs put above have no name, container or lease either: they go too)"
"$store" --root "$root" rmi example.com/demo/app:1.0
sleep 0.01
"$store" --root "$root" gc --grace 0s
"$store" --root "$root" info
