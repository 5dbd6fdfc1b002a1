#!/usr/bin/env bash
# Builds a ~200 MB multi-layer gzip OCI archive with umoci + skopeo (random, hence
# incompressible, file content in 6 layers of ~32 MiB plus a small one).
# Usage: make-import-sample.sh OUT.tar
set -euo pipefail
out=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
umoci init --layout layout >/dev/null
umoci new --image layout:img >/dev/null
for i in 1 2 3 4 5 6; do
  umoci unpack --rootless --image layout:img bundle >/dev/null
  mkdir -p "bundle/rootfs/data$i"
  head -c $((32 * 1024 * 1024)) /dev/urandom > "bundle/rootfs/data$i/blob.bin"
  echo "layer $i" > "bundle/rootfs/data$i/README"
  umoci repack --image layout:img bundle >/dev/null
  rm -rf bundle
done
umoci config --image layout:img --config.label org.example=bench >/dev/null
rm -f "$out"
skopeo copy --insecure-policy -q oci:layout:img "oci-archive:$out:img"
