#!/usr/bin/env bash
# Verify and unpack speed, side by side in one run (issue 5), on a store holding the same
# ~200 MB multi-layer image twice (gzip and zstd layers):
#   store verify          vs two `openssl dgst -sha256` processes over the same blob bytes
#   store verify --fast   vs store verify
#   store verify --deep   vs two `gzip -d` / `zstd -d` processes over the same layers
#   store unpack          vs umoci unpack --rootless of the same image
# Rounds interleave; medians and ratios are printed.
# Usage: bench/scripts/compare-verify-unpack.sh [ROUNDS]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
cargo build --release --quiet -p layerstore --bin store
store=$PWD/target/release/store
work=$(mktemp -d -p "$PWD/target")
trap 'rm -rf "$work"' EXIT
bench/scripts/make-import-sample.sh "$work/sample.tar"
skopeo copy --insecure-policy -q "oci-archive:$work/sample.tar:img" "oci:$work/layout:img"
skopeo copy --insecure-policy -q --dest-compress-format zstd "oci:$work/layout:img" "oci:$work/zlayout:img"
"$store" --root "$work/store" import "$work/layout" --base-name bench/gz >/dev/null
"$store" --root "$work/store" import "$work/zlayout" --base-name bench/zst >/dev/null
"$store" --root "$work/store" export bench/gz:img bench/zst:img --format oci-dir -o "$work/blobs"
mapfile -t all < <(find "$work/blobs/blobs" -type f | sort)
half=$(( ${#all[@]} / 2 ))
gz=(); zs=()
for f in "${all[@]}"; do
  case $(head -c 4 "$f" | od -An -tx1 | tr -d ' ') in
    1f8b*) gz+=("$f") ;;
    28b52ffd) zs+=("$f") ;;
  esac
done
cat "${all[@]}" > /dev/null
bytes=$(cat "${all[@]}" | wc -c)
now() { date +%s.%N; }
declare -a tv tf td to tz tg tu tm
for r in $(seq "$rounds"); do
  a=$(now); "$store" --root "$work/store" verify -q >/dev/null; b=$(now); tv+=("$(echo "$b - $a" | bc -l)")
  a=$(now); "$store" --root "$work/store" verify -q --fast >/dev/null; b=$(now); tf+=("$(echo "$b - $a" | bc -l)")
  a=$(now); "$store" --root "$work/store" verify -q --deep >/dev/null; b=$(now); td+=("$(echo "$b - $a" | bc -l)")
  a=$(now)
  openssl dgst -sha256 "${all[@]:0:$half}" >/dev/null & openssl dgst -sha256 "${all[@]:$half}" >/dev/null & wait
  b=$(now); to+=("$(echo "$b - $a" | bc -l)")
  a=$(now)
  for f in "${gz[@]}"; do gzip -dc "$f" >/dev/null; done & for f in "${zs[@]}"; do zstd -dcq "$f" >/dev/null; done & wait
  b=$(now); tz+=("$(echo "$b - $a" | bc -l)")
  rm -rf "$work/u1" "$work/u2"
  a=$(now); "$store" --root "$work/store" unpack bench/gz:img "$work/u1" >/dev/null; b=$(now); tu+=("$(echo "$b - $a" | bc -l)")
  a=$(now); umoci unpack --rootless --image "$work/layout:img" "$work/u2" >/dev/null 2>&1; b=$(now); tm+=("$(echo "$b - $a" | bc -l)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
v=$(median "${tv[@]}"); f=$(median "${tf[@]}"); d=$(median "${td[@]}"); o=$(median "${to[@]}")
z=$(median "${tz[@]}"); u=$(median "${tu[@]}"); m=$(median "${tm[@]}")
printf 'blob bytes: %d (%d blobs; %d gzip, %d zstd layers), %d rounds, median seconds\n' "$bytes" "${#all[@]}" "${#gz[@]}" "${#zs[@]}" "$rounds"
printf '  store verify                 %.3f\n' "$v"
printf '  store verify --fast          %.3f\n' "$f"
printf '  store verify --deep          %.3f\n' "$d"
printf '  2x openssl dgst -sha256      %.3f\n' "$o"
printf '  2 procs gzip -d / zstd -d    %.3f\n' "$z"
printf '  store unpack (gzip image)    %.3f\n' "$u"
printf '  umoci unpack --rootless      %.3f\n' "$m"
printf 'verify vs 2-core sha256 limit = %.2fx of its speed (goal >= 0.8)\n' "$(echo "$o / $v" | bc -l)"
printf 'fast vs default               = %.2fx faster (goal >= 3)\n' "$(echo "$v / $f" | bc -l)"
printf 'deep decompression vs tools   = %.2fx of their speed (goal >= 0.8; deep also hashes)\n' "$(echo "$z / $d" | bc -l)"
printf 'unpack vs umoci               = %.2fx faster (goal >= 2)\n' "$(echo "$m / $u" | bc -l)"
