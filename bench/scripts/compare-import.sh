#!/usr/bin/env bash
# Import speed, side by side in one run (issue 3): `store import` of a ~200 MB multi-layer
# gzip OCI archive against `skopeo copy oci-archive:FILE oci:DIR:tag` of the same file and
# `openssl dgst -sha256` over the same bytes (one core). Rounds interleave the three so that
# machine noise hits all alike; medians and ratios are printed.
# Usage: bench/scripts/compare-import.sh [ROUNDS]   (default 7)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-7}
cargo build --release --quiet -p layerstore --bin store
store=$PWD/target/release/store
work=$(mktemp -d -p "$PWD/target")
trap 'rm -rf "$work"' EXIT
sample=$work/sample.tar
bench/scripts/make-import-sample.sh "$sample"
cat "$sample" > /dev/null # warm the page cache: every tool reads it from memory
bytes=$(stat -c %s "$sample")
now() { date +%s.%N; }
declare -a t_store t_skopeo t_openssl
for r in $(seq "$rounds"); do
  rm -rf "$work/store" "$work/oci"
  a=$(now); "$store" --root "$work/store" import "$sample" --base-name bench/sample >/dev/null; b=$(now)
  t_store+=("$(echo "$b - $a" | bc -l)")
  a=$(now); skopeo copy --insecure-policy -q "oci-archive:$sample:img" "oci:$work/oci:img"; b=$(now)
  t_skopeo+=("$(echo "$b - $a" | bc -l)")
  a=$(now); openssl dgst -sha256 "$sample" >/dev/null; b=$(now)
  t_openssl+=("$(echo "$b - $a" | bc -l)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ms=$(median "${t_store[@]}"); mk=$(median "${t_skopeo[@]}"); mo=$(median "${t_openssl[@]}")
printf 'archive: %d bytes, %d rounds, median seconds\n' "$bytes" "$rounds"
printf '  store import          %.3f  (%.2f GB/s)\n' "$ms" "$(echo "$bytes / $ms / 1000000000" | bc -l)"
printf '  skopeo copy           %.3f\n' "$mk"
printf '  openssl dgst -sha256  %.3f\n' "$mo"
printf 'skopeo / store  = %.2fx  (goal >= 3)\n' "$(echo "$mk / $ms" | bc -l)"
printf 'store / openssl = %.2fx  (goal <= 2)\n' "$(echo "$ms / $mo" | bc -l)"
