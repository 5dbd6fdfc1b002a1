#!/usr/bin/env bash
# Writes small valid (and a few deliberately hostile) seed inputs for every fuzz target
# into fuzz/seeds/TARGET/. Deterministic: the same tools give the same bytes. Needs GNU
# tar, gzip, zstd, sha256sum, printf. The fuzzers' grown corpora go to fuzz/corpus/
# (ignored by git); only these seeds are committed.
set -euo pipefail
cd "$(dirname "$0")"
out=seeds
rm -rf "$out"
mkdir -p "$out"/{digest,reference,image_json,record,import,unpack}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# tar with no padding beyond the two end blocks, fixed owners, times and order.
TAR=(tar --format=gnu -b1 --owner=0 --group=0 --numeric-owner --mtime=@1700000000 --sort=name)
sha() { sha256sum "$1" | cut -d' ' -f1; }
# seed TARGET LABEL < bytes: named LABEL-<sha prefix>, so that piped calls never clash.
seed() {
    cat > "$work/seed"
    mv "$work/seed" "$out/$1/$2-$(sha "$work/seed" | cut -c1-8)"
}

H=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
H512=$(printf '' | sha512sum | cut -d' ' -f1)

# --- digest
printf 'sha256:%s' "$H" | seed digest sha256
printf 'sha512:%s' "$H512" | seed digest sha512
printf 'blake3:%s' "$H" | seed digest blake3
printf 'sha256:%s' "${H^^}" | seed digest upper
printf 'md5:d41d8cd98f00b204e9800998ecf8427e' | seed digest md5
printf 'sha256:' | seed digest empty

# --- reference
for r in nginx user/app:1.0 localhost:5000/a/b:1 "quay.io/x/y@sha256:$H" \
    "[::1]:5000/a/b:tag@sha256:$H" docker.io/library/busybox index.docker.io/a/b:c \
    "a.b/c__d/e--f.g_h:T_a.g-1" "$H" Nginx; do
    printf '%s' "$r" | seed reference ref
done

# --- image_json
M=application/vnd.oci.image.manifest.v1+json
cat <<J | seed image_json manifest
{"schemaVersion":2,"mediaType":"$M","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$H","size":0},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$H","size":0}],"subject":{"mediaType":"$M","digest":"sha256:$H","size":1},"annotations":{"a":"b"}}
J
cat <<J | seed image_json index
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"$M","digest":"sha256:$H","size":7,"platform":{"os":"linux","architecture":"arm64","variant":"v8"},"annotations":{"org.opencontainers.image.ref.name":"latest","io.containerd.image.name":"docker.io/library/x:1"}}]}
J
cat <<J | seed image_json docker-list
{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha512:$H512","size":7,"platform":{"os":"linux","architecture":"amd64"}}]}
J
cat <<J | seed image_json config
{"created":"2024-01-01T00:00:00Z","architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:$H"]}}
J
printf '{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}' | seed image_json schema1

# --- record: the mode byte 1 has the target fix up versions and checksums.
{
    printf '\x03LSTPACK\x00\x01\x00\x00\x00\x01\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00'
    printf '\x00%.0s' {1..8}
    # A sha256 layer record of 5 bytes ("hello"), blake3 of the payload.
    printf 'LSR\x01\x01\x01\x04\x00'
    printf '%s' "$(printf hello | sha256sum | cut -d' ' -f1)" | xxd -r -p
    printf '\x00%.0s' {1..32}
    printf '\x05\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00'
    # (b3sum where installed; a wrong blake3 only fails the target's blake3 mode.)
    { printf hello | b3sum --no-names 2>/dev/null || printf '%064d' 0; } | xxd -r -p
    printf '\x00%.0s' {1..8}
    printf hello
    printf 'junkLSR'
} | seed record segment

# --- unpack: layer tars.
mk_layer() { # name, then commands run in a fresh directory
    local name=$1; shift
    local d=$work/l-$name
    rm -rf "$d"; mkdir -p "$d"
    (cd "$d" && eval "$@")
    (cd "$d" && "${TAR[@]}" -cf - --transform 's,^\./,,' .)
}
mk_layer basic 'mkdir -p etc/sub bin; echo hi > etc/hosts; chmod 600 etc/hosts; ln -s hosts etc/link; ln etc/hosts bin/hard; mkfifo bin/fifo' | seed unpack basic
mk_layer wh 'mkdir -p a/b; touch a/.wh.gone a/b/.wh..wh..opq; echo x > a/b/kept' | seed unpack whiteouts
# Hostile: symlinks out of the root (relative, and absolute at the target'"'"'s canary), then
# entries through them.
mk_layer evil 'ln -s ../.. up; ln -s /dev/shm/layerstore-fuzz-canary abs; mkdir -p d; ln -s ../../.. d/deep' > "$work/evil.tar"
{
    head -c -1024 "$work/evil.tar"
    mkdir -p "$work/through/up" "$work/through/abs" "$work/through/d/deep"
    echo pwned > "$work/through/up/escaped"
    echo pwned > "$work/through/abs/escaped"
    echo pwned > "$work/through/d/deep/escaped"
    (cd "$work/through" && "${TAR[@]}" -cf - up/escaped abs/escaped d/deep/escaped)
} | seed unpack escape
mk_layer basic 'echo hi > f' | gzip -9n | seed unpack gzip
mk_layer basic 'echo hi > f' | zstd -q -19 -c | seed unpack zstd
"${TAR[@]}" -cf - -P --transform 's,.*,../outside,' "$work/evil.tar" | seed unpack dotdot

# --- import: an OCI archive and a legacy docker archive of a two-layer image.
lay=$work/layout
mkdir -p "$lay/blobs/sha256"
l1=$work/l1.tar; l2=$work/l2.tar.gz
mk_layer basic 'echo one > a' > "$l1"
mk_layer basic 'echo two > b; ln -s a c' | gzip -9n > "$l2"
d1=$(sha "$l1"); d2=$(sha "$l2"); id2=$(gzip -dc "$l2" | sha256sum | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' "$d1" "$id2" > "$work/config"
dc=$(sha "$work/config")
printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
    "$M" "$dc" "$(stat -c%s "$work/config")" "$d1" "$(stat -c%s "$l1")" "$d2" "$(stat -c%s "$l2")" > "$work/manifest"
dm=$(sha "$work/manifest")
cp "$l1" "$lay/blobs/sha256/$d1"; cp "$l2" "$lay/blobs/sha256/$d2"
cp "$work/config" "$lay/blobs/sha256/$dc"; cp "$work/manifest" "$lay/blobs/sha256/$dm"
printf '{"imageLayoutVersion":"1.0.0"}' > "$lay/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"%s","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"example.com/app:1"}}]}' \
    "$M" "$dm" "$(stat -c%s "$work/manifest")" > "$lay/index.json"
(cd "$lay" && "${TAR[@]}" -cf - oci-layout blobs index.json) | seed import oci-archive
# Docker 25+: the OCI layout plus manifest.json.
printf '[{"Config":"blobs/sha256/%s","RepoTags":["app:2"],"Layers":["blobs/sha256/%s","blobs/sha256/%s"]}]' "$dc" "$d1" "$d2" > "$lay/manifest.json"
(cd "$lay" && "${TAR[@]}" -cf - oci-layout blobs index.json manifest.json) | seed import docker25
# Legacy docker save: <id>/layer.tar, a symlinked duplicate layer, <config>.json.
leg=$work/legacy
mkdir -p "$leg/aaa" "$leg/bbb"
cp "$l1" "$leg/aaa/layer.tar"; ln -s ../aaa/layer.tar "$leg/bbb/layer.tar"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' "$d1" "$d1" > "$leg/cfg.json"
printf '[{"Config":"cfg.json","RepoTags":["legacy:1"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]' > "$leg/manifest.json"
(cd "$leg" && "${TAR[@]}" -cf - aaa bbb cfg.json manifest.json) | seed import legacy

du -sb "$out"/* | sort -k2
echo "total: $(du -sb "$out" | cut -f1) bytes in $(find "$out" -type f | wc -l) files"
