//! Verification and repair (DESIGN.md "Verification"): `Store::verify` at its three depths
//! and `store verify`, against damage made on purpose in the files of a closed store
//! (flipped payload and header bytes in sealed and active segments and in large files,
//! truncated and deleted files, reference counts and holds rewritten in `meta.redb`, layers
//! that do not match their config's `diff_ids`); `--repair` quarantining what is corrupt
//! and a re-import restoring it; and `repair --rebuild-index` recovering a store whose
//! index was deleted.
//!
//! Every test that expects a problem names the exact blob and kind, and every test that
//! damages something also checks that what was not damaged is not reported, so neither a
//! verifier that reports nothing nor one that reports everything passes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use layerstore::image::media;
use layerstore::repair::{RebuildReport, rebuild_index};
use layerstore::{
    Depth, Digest, Error, GcOptions, ImportOptions, Kind, Location, Options, Problem, PutOptions,
    Store, VerifyOptions, VerifyReport,
};
use serde_json::{Value, json};

use crate::common::fixtures;
use crate::common::{self, KIB};

/// Segments seal at 64 KiB and blobs from 64 KiB get a file of their own, so small test
/// data has sealed (mapped) segments, an active segment and large files.
const SMALL: u64 = 64 * 1024;
/// Size of a record header (`layerstore::format::RECORD_HEADER_LEN`).
const RECORD_HEADER: u64 = layerstore::format::RECORD_HEADER_LEN;

/// Small segments and large files, one shard (so which segment a put lands in is known).
fn one_shard() -> Options {
    Options::default()
        .segment_size(SMALL)
        .large_threshold(SMALL)
        .shards(1)
}

/// Small segments and large files over several shards.
fn small_opts() -> Options {
    Options::default()
        .segment_size(SMALL)
        .large_threshold(SMALL)
}

// ---------------------------------------------------------------------------------------
// Running verify.

fn verify(store: &Store, depth: Depth) -> VerifyReport {
    store
        .verify(
            &VerifyOptions::depth(depth),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap_or_else(|e| panic!("verify {depth:?}: {e:?}"))
}

fn verify_repair(store: &Store, depth: Depth) -> VerifyReport {
    let r = store
        .verify(
            &VerifyOptions::depth(depth).repair(true),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap_or_else(|e| panic!("verify --repair {depth:?}: {e:?}"));
    assert!(r.repaired.is_some(), "a repair run reports what it did");
    r
}

const DEPTHS: [Depth; 3] = [Depth::Fast, Depth::Digest, Depth::Deep];

/// `(digest, kind)` of every problem.
fn found(r: &VerifyReport) -> BTreeSet<(Option<Digest>, String)> {
    r.problems
        .iter()
        .map(|p| (p.digest, p.kind.name().to_owned()))
        .collect()
}

/// `(digest, kind)` of the problems that name a blob.
fn found_blobs(r: &VerifyReport) -> BTreeSet<(Digest, String)> {
    r.problems
        .iter()
        .filter_map(|p| p.digest.map(|d| (d, p.kind.name().to_owned())))
        .collect()
}

/// Digests named by any problem.
fn named(r: &VerifyReport) -> BTreeSet<Digest> {
    r.problems.iter().filter_map(|p| p.digest).collect()
}

fn expect(pairs: &[(Digest, &str)]) -> BTreeSet<(Digest, String)> {
    pairs.iter().map(|(d, k)| (*d, (*k).to_owned())).collect()
}

/// The one problem of `kind` about `d`.
fn problem<'r>(r: &'r VerifyReport, d: &Digest, kind: &str) -> &'r Problem {
    let hits: Vec<&Problem> = r
        .problems
        .iter()
        .filter(|p| p.digest == Some(*d) && p.kind == kind)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "exactly one {kind} problem about {d} expected; report: {:#?}",
        r.problems
    );
    hits[0]
}

fn images_of(p: &Problem) -> BTreeSet<String> {
    p.images.iter().cloned().collect()
}

fn names(ns: &[&str]) -> BTreeSet<String> {
    ns.iter().map(|s| (*s).to_owned()).collect()
}

/// No problem at any depth, every blob counted and every byte read.
fn assert_clean(store: &Store, ctx: &str) {
    let listing = listing(store);
    let bytes: u64 = listing.values().map(|(size, _)| size).sum();
    for depth in DEPTHS {
        let seen = AtomicU64::new(0);
        let r = store
            .verify(
                &VerifyOptions::depth(depth),
                &AtomicBool::new(false),
                &|n| {
                    seen.fetch_max(n, Ordering::Relaxed);
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: verify {depth:?}: {e:?}"));
        assert!(
            r.problems.is_empty(),
            "{ctx}: a clean store has no problems at {depth:?}: {:#?}",
            r.problems
        );
        assert_eq!(r.depth, depth, "{ctx}: the report names its depth");
        assert_eq!(
            r.blobs,
            listing.len() as u64,
            "{ctx}: every blob is checked at {depth:?}"
        );
        assert_eq!(r.bytes, bytes, "{ctx}: every byte is read at {depth:?}");
        assert_eq!(
            seen.into_inner(),
            bytes,
            "{ctx}: progress reaches the total"
        );
        assert!(r.repaired.is_none(), "{ctx}: no repair was asked for");
    }
}

// ---------------------------------------------------------------------------------------
// Looking at a store.

/// Every blob with its size and kind.
fn listing(store: &Store) -> BTreeMap<Digest, (u64, Kind)> {
    store
        .iter()
        .map(|r| {
            let i = r.expect("iterate blobs");
            (i.digest, (i.size, i.kind))
        })
        .collect()
}

/// Every blob with its bytes.
fn contents(store: &Store) -> BTreeMap<Digest, Vec<u8>> {
    listing(store)
        .into_keys()
        .map(|d| {
            let b = store.get(&d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
            (d, b.to_vec())
        })
        .collect()
}

fn children(store: &Store, d: &Digest) -> BTreeSet<Digest> {
    store
        .children(d)
        .unwrap_or_else(|e| panic!("children of {d}: {e:?}"))
        .into_iter()
        .collect()
}

/// Every blob `root` reaches through edges and referrers (itself included): what a
/// collection keeps for a name on `root`.
fn reach(store: &Store, root: &Digest) -> BTreeSet<Digest> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![*root];
    while let Some(d) = stack.pop() {
        if seen.insert(d) {
            stack.extend(store.children(&d).expect("children"));
            stack.extend(store.referrers(&d).expect("referrers"));
        }
    }
    seen
}

fn is_sealed_or_large(store: &Store, d: &Digest) -> bool {
    store
        .get(d)
        .unwrap_or_else(|e| panic!("get {d}: {e:?}"))
        .is_mapped()
}

fn quarantine_files(root: &Path) -> BTreeMap<PathBuf, u64> {
    common::files_under(&root.join("quarantine"))
}

// ---------------------------------------------------------------------------------------
// Where the bytes are, and damaging them.

/// The pack file of segment `id`.
fn segment_file(root: &Path, id: u64) -> PathBuf {
    let hits: Vec<PathBuf> = common::pack_files(root)
        .into_keys()
        .filter(|p| common::segment_id(p) == id)
        .collect();
    assert_eq!(hits.len(), 1, "one file for segment {id}: {hits:?}");
    hits.into_iter().next().expect("one file")
}

/// `ROOT/large/<xx>/<alg>-<hex>.<generation>`.
fn large_file(root: &Path, d: &Digest, generation: u64) -> PathBuf {
    root.join("large")
        .join(format!("{:02x}", d.hash()[0]))
        .join(format!("{}-{}.{generation}", d.algorithm(), d.hex()))
}

/// The file holding a blob's record and the offset of its payload in it (its header is
/// the 128 bytes before).
fn payload_at(store: &Store, d: &Digest) -> (PathBuf, u64) {
    let info = store
        .stat(d)
        .expect("stat")
        .unwrap_or_else(|| panic!("{d} is not stored"));
    let at = match info.location {
        Location::Packed { segment, offset } => (segment_file(store.root(), segment), offset),
        Location::Large { generation } => (large_file(store.root(), d, generation), RECORD_HEADER),
    };
    assert!(at.0.is_file(), "{} exists", at.0.display());
    at
}

fn segment_of(store: &Store, d: &Digest) -> u64 {
    match store.stat(d).expect("stat").expect("stored").location {
        Location::Packed { segment, .. } => segment,
        Location::Large { .. } => panic!("{d} is not packed"),
    }
}

fn is_large(store: &Store, d: &Digest) -> bool {
    matches!(
        store.stat(d).expect("stat").expect("stored").location,
        Location::Large { .. }
    )
}

/// Inverts one byte of a file.
fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0xff;
    f.write_all_at(&b, at).expect("write byte");
    f.sync_all().expect("fsync");
}

fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    assert!(
        f.metadata().expect("metadata").len() > len,
        "{} is longer than {len}",
        path.display()
    );
    f.set_len(len).expect("truncate");
    f.sync_all().expect("fsync");
}

/// Rewrites the digest field of the record header at `at` (to the hash of `other`) with a
/// valid checksum: the header decodes, but names another blob.
fn forge_header_digest(path: &Path, at: u64, other: &Digest) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut h = [0u8; RECORD_HEADER as usize];
    f.read_exact_at(&mut h, at).expect("read header");
    assert_eq!(&h[0..4], b"LSR\x01", "a record header at {at}");
    h[8..8 + other.hash().len()].copy_from_slice(other.hash());
    let check = blake3::hash(&h[..120]);
    h[120..128].copy_from_slice(&check.as_bytes()[..8]);
    f.write_all_at(&h, at).expect("write header");
    f.sync_all().expect("fsync");
}

// ---------------------------------------------------------------------------------------
// Building images by hand (layers compressed with the real `gzip` and `zstd` commands).

/// Runs `cmd args` with `input` on stdin and returns its stdout.
fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}` ({e}); the verify tests need it"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    feeder.join().expect("feeder");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let z = pipe("gzip", &["-n", "-c"], data);
    assert_eq!(&z[..2], &[0x1f, 0x8b], "gzip magic");
    z
}

fn zstd(data: &[u8]) -> Vec<u8> {
    let z = pipe("zstd", &["-q", "-c", "--check"], data);
    assert_eq!(&z[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    z
}

/// A layer blob, its media type and the `diff_id` its config should list.
#[derive(Clone)]
struct Layer {
    bytes: Vec<u8>,
    media_type: &'static str,
    diff_id: Digest,
}

fn gz_layer(raw: &[u8]) -> Layer {
    Layer {
        bytes: gzip(raw),
        media_type: media::OCI_LAYER_GZIP,
        diff_id: common::sha256(raw),
    }
}

fn zstd_layer(raw: &[u8]) -> Layer {
    Layer {
        bytes: zstd(raw),
        media_type: media::OCI_LAYER_ZSTD,
        diff_id: common::sha256(raw),
    }
}

fn plain_layer(raw: &[u8]) -> Layer {
    Layer {
        bytes: raw.to_vec(),
        media_type: media::OCI_LAYER,
        diff_id: common::sha256(raw),
    }
}

fn config_json(diff_ids: &[Digest], label: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"test": label}},
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
    }))
    .expect("config json")
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": common::sha256(bytes).to_string(),
        "size": bytes.len(),
    })
}

fn manifest_json(config: &[u8], layers: &[Layer], note: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": desc(media::OCI_CONFIG, config),
        "layers": layers.iter().map(|l| desc(l.media_type, &l.bytes)).collect::<Vec<_>>(),
        "annotations": {"test.note": note},
    }))
    .expect("manifest json")
}

fn put_manifest(store: &Store, json: &[u8]) -> Digest {
    let p = store
        .put_manifest(json, PutOptions::default())
        .unwrap_or_else(|e| panic!("put manifest: {e:?}"));
    assert_eq!(p.descriptor.digest, common::sha256(json));
    p.descriptor.digest
}

/// Tags `d` and returns the canonical name.
fn tag(store: &Store, name: &str, d: &Digest) -> String {
    store
        .tag(name, d)
        .unwrap_or_else(|e| panic!("tag {name}: {e:?}"))
        .canonical()
}

/// An image put by hand.
#[derive(Clone, Debug)]
struct Img {
    /// Canonical name (empty when untagged).
    name: String,
    manifest: Digest,
    config: Digest,
    layers: Vec<Digest>,
}

impl Img {
    fn all(&self) -> BTreeSet<Digest> {
        let mut s: BTreeSet<Digest> = self.layers.iter().copied().collect();
        s.insert(self.config);
        s.insert(self.manifest);
        s
    }
}

/// Puts the layers, a config listing `diff_ids`, and the manifest; tags it `name` if given.
fn put_image(
    store: &Store,
    name: Option<&str>,
    layers: &[Layer],
    diff_ids: &[Digest],
    note: &str,
) -> Img {
    let layer_digests: Vec<Digest> = layers
        .iter()
        .map(|l| common::put_kind(store, &l.bytes, Kind::Layer))
        .collect();
    let config = config_json(diff_ids, note);
    let config_digest = common::put_kind(store, &config, Kind::Config);
    let manifest = put_manifest(store, &manifest_json(&config, layers, note));
    Img {
        name: name.map(|n| tag(store, n, &manifest)).unwrap_or_default(),
        manifest,
        config: config_digest,
        layers: layer_digests,
    }
}

/// [`put_image`] with the `diff_ids` the layers really have.
fn put_good_image(store: &Store, name: Option<&str>, layers: &[Layer], note: &str) -> Img {
    let ids: Vec<Digest> = layers.iter().map(|l| l.diff_id).collect();
    put_image(store, name, layers, &ids, note)
}

// ---------------------------------------------------------------------------------------
// The command line.

fn exit_code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `store verify ARGS` and checks the exit status (0 clean, 3 problems).
fn cli_verify(root: &Path, args: &[&str], want: i32) -> Output {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = common::cli(root, &all);
    assert_eq!(
        exit_code(&out),
        Some(want),
        "store {all:?}: exit status {want} expected; stdout: {} stderr: {}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn parse_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            stdout(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `(digest, kind)` of the problems in a JSON report.
fn json_found(v: &Value) -> BTreeSet<(Option<Digest>, String)> {
    v["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("`problems` is an array: {v}"))
        .iter()
        .map(|p| {
            let d = p
                .get("digest")
                .map(|d| Digest::parse(d.as_str().expect("digest string")).expect("digest"));
            let k = p["kind"].as_str().expect("kind string").to_owned();
            (d, k)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Real images (tests/fixtures/make-images.sh), shared with `interop` by cache key.

fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

fn import(store: &Store, path: &Path, base_name: &str) -> layerstore::ImportOutcome {
    let mut o = ImportOptions::default();
    o.base_name = Some(base_name.to_owned());
    store
        .import_path(path, &o)
        .unwrap_or_else(|e| panic!("import {}: {e:?}", path.display()))
}

/// The manifest an OCI layout's `index.json` names `ref_name`, parsed.
fn layout_manifest(layout: &Path, ref_name: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index json");
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == ref_name)
        .unwrap_or_else(|| panic!("{ref_name} in {}", layout.display()));
    let d = Digest::parse(entry["digest"].as_str().expect("digest")).expect("digest");
    serde_json::from_slice(&std::fs::read(layout_blob(layout, &d)).expect("manifest"))
        .expect("manifest json")
}

fn layout_blob(layout: &Path, d: &Digest) -> PathBuf {
    layout
        .join("blobs")
        .join(d.algorithm().to_string())
        .join(d.hex())
}

fn layer_digests(manifest: &Value) -> Vec<Digest> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| Digest::parse(l["digest"].as_str().expect("digest")).expect("digest"))
        .collect()
}

// =======================================================================================
// 1. Flipped bytes.

/// A clean store, small and large blobs, sealed and active segments, hand-made images:
/// nothing at any depth, through the library and the command line.
#[test]
fn a_clean_store_is_clean_at_every_depth_and_exits_zero() {
    let dir = common::tempdir();
    let root = dir.path();
    {
        let store = common::open_with(root, small_opts());
        let layers = [
            gz_layer(&common::blob(1, 3 * KIB)),
            gz_layer(&common::blob(2, 100 * KIB)),
            zstd_layer(&common::blob(3, 5 * KIB)),
            plain_layer(&common::blob(4, 700)),
        ];
        put_good_image(&store, Some("example.com/clean/a:1"), &layers, "a");
        store
            .put_many((0..40).map(|i| common::blob(100 + i, 4 * KIB)))
            .expect("put filler");
        let info = store.info().expect("info");
        assert!(info.sealed_segments > 0, "some segment is sealed: {info:?}");
        assert!(info.large_blobs > 0, "some blob is large: {info:?}");
        assert_clean(&store, "clean store");
    }
    for args in [&["--fast"][..], &[], &["--deep"]] {
        let out = cli_verify(root, args, 0);
        assert!(
            stdout(&out).contains("0 problem(s)"),
            "store verify {args:?} says so: {}",
            stdout(&out)
        );
    }
    let v = parse_json(&cli_verify(root, &["--deep", "--json"], 0));
    assert_eq!(v["problems"], json!([]), "no problems in JSON: {v}");
    assert_eq!(v["depth"], "deep");
}

/// One byte flipped in a payload in a sealed segment, in the active segment and in a large
/// file, and in record headers: `--fast` finds the payloads by blake3, the default depth by
/// digest and the headers as `header`, each naming its blob and the images that reach it.
#[test]
fn flipped_bytes_are_found_at_each_depth_and_name_their_images() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, one_shard());

    // Image A: a small layer and the config first (they end up in a sealed segment) ...
    let a_small = gz_layer(&common::blob(10, 3 * KIB));
    let a_big = gz_layer(&common::blob(11, 100 * KIB));
    let a_layers = [a_small.clone(), a_big.clone()];
    let a_small_d = common::put_kind(&store, &a_small.bytes, Kind::Layer);
    let a_config = config_json(&[a_small.diff_id, a_big.diff_id], "a");
    let a_config_d = common::put_kind(&store, &a_config, Kind::Config);
    // ... then filler that seals that segment ...
    let filler: Vec<Digest> = store
        .put_many((0..40).map(|i| common::blob(1000 + i, 4 * KIB)))
        .expect("put filler")
        .into_iter()
        .map(|d| d.digest)
        .collect();
    // ... then the large layer and the manifest.
    let a_big_d = common::put_kind(&store, &a_big.bytes, Kind::Layer);
    let a_manifest = put_manifest(&store, &manifest_json(&a_config, &a_layers, "a"));
    let a_name = tag(&store, "example.com/verify/a:1", &a_manifest);
    // Image B lands in the active segment, with a large layer.
    let b_small = gz_layer(&common::blob(20, 2 * KIB));
    let b_big = gz_layer(&common::blob(21, 80 * KIB));
    let b = put_good_image(
        &store,
        Some("example.com/verify/b:1"),
        &[b_small, b_big],
        "b",
    );
    let (b_small_d, b_big_d) = (b.layers[0], b.layers[1]);
    let f = filler[0];

    assert!(
        is_sealed_or_large(&store, &a_small_d),
        "A's small layer is sealed"
    );
    assert!(
        is_sealed_or_large(&store, &a_config_d),
        "A's config is sealed"
    );
    assert!(
        is_sealed_or_large(&store, &f),
        "the first filler blob is sealed"
    );
    assert!(
        !is_sealed_or_large(&store, &b_small_d),
        "B's small layer is active"
    );
    assert!(is_large(&store, &a_big_d) && is_large(&store, &b_big_d));
    assert_eq!(
        segment_of(&store, &a_small_d),
        segment_of(&store, &a_config_d)
    );
    assert_clean(&store, "before damage");

    let places: BTreeMap<Digest, (PathBuf, u64)> =
        [a_small_d, a_config_d, f, b_small_d, a_big_d, b_big_d]
            .into_iter()
            .map(|d| (d, payload_at(&store, &d)))
            .collect();
    let sizes = listing(&store);
    let blob_count = sizes.len() as u64;
    drop(store);

    // Payload flips in the middle of each payload.
    for d in [a_small_d, f, b_small_d, a_big_d] {
        let (path, at) = &places[&d];
        flip(path, at + sizes[&d].0 / 2);
    }
    // A header byte (inside its blake3 field): the header no longer decodes.
    let (seg_a, cfg_at) = &places[&a_config_d];
    flip(seg_a, cfg_at - RECORD_HEADER + 100);
    // A header that decodes but names another blob.
    let (b_big_path, _) = &places[&b_big_d];
    forge_header_digest(b_big_path, 0, &common::sha256(b"some other blob"));

    let store = common::open_with(root, one_shard());
    let fast = verify(&store, Depth::Fast);
    assert_eq!(
        found_blobs(&fast),
        expect(&[
            (a_small_d, "blake3"),
            (f, "blake3"),
            (b_small_d, "blake3"),
            (a_big_d, "blake3"),
        ]),
        "--fast: every payload flip by blake3, nothing else: {:#?}",
        fast.problems
    );
    assert_eq!(fast.problems.len(), 4, "{:#?}", fast.problems);
    assert_eq!(fast.blobs, blob_count);

    let default = verify(&store, Depth::Digest);
    let want_default = expect(&[
        (a_small_d, "digest"),
        (f, "digest"),
        (b_small_d, "digest"),
        (a_big_d, "digest"),
        (a_config_d, "header"),
        (b_big_d, "header"),
    ]);
    assert_eq!(
        found_blobs(&default),
        want_default,
        "default: payload flips by digest, header damage as header: {:#?}",
        default.problems
    );
    assert_eq!(default.problems.len(), 6, "{:#?}", default.problems);

    // Names: the images that reach each blob (filler reaches none).
    for r in [&fast, &default] {
        for p in &r.problems {
            let d = p.digest.expect("blob problem");
            let want = if [a_small_d, a_big_d, a_config_d].contains(&d) {
                names(&[&a_name])
            } else if [b_small_d, b_big_d].contains(&d) {
                names(&[&b.name])
            } else {
                BTreeSet::new()
            };
            assert_eq!(images_of(p), want, "images of {d} ({})", p.kind);
        }
    }

    let deep = verify(&store, Depth::Deep);
    assert_eq!(
        found_blobs(&deep),
        want_default,
        "--deep: the same blob problems: {:#?}",
        deep.problems
    );
    let segs: Vec<&Problem> = deep
        .problems
        .iter()
        .filter(|p| p.digest.is_none())
        .collect();
    assert_eq!(
        segs.len(),
        1,
        "--deep: one segment problem: {:#?}",
        deep.problems
    );
    assert_eq!(segs[0].kind, "segment");
    assert_eq!(segs[0].path.as_deref(), Some(seg_a.as_path()));

    // Verify without --repair changes nothing.
    for d in places.keys() {
        assert!(store.contains(d).expect("contains"), "{d} still indexed");
    }
    assert!(quarantine_files(root).is_empty(), "nothing quarantined");
    drop(store);
    let out = cli_verify(root, &["--fast"], 3);
    assert!(stdout(&out).contains(&a_small_d.to_string()));
    let out = cli_verify(root, &[], 3);
    assert!(stdout(&out).contains(&a_config_d.to_string()));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("6 problem(s) found"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// =======================================================================================
// 2. Truncated and missing files.

struct Damaged {
    /// Blobs whose bytes are (partly) gone.
    lost: BTreeSet<Digest>,
    /// Blobs in the truncated segment entirely before the cut.
    before_cut: BTreeSet<Digest>,
    /// The truncated segment file.
    segment: PathBuf,
    /// Every blob.
    all: BTreeSet<Digest>,
    image: String,
}

/// A store with a truncated large file, a deleted large file and a sealed segment cut in
/// the middle of a record.
fn truncated_store(root: &Path) -> Damaged {
    let store = common::open_with(root, one_shard());
    let s1 = gz_layer(&common::blob(30, 3 * KIB));
    let s2 = gz_layer(&common::blob(31, 3 * KIB));
    let s1_d = common::put_kind(&store, &s1.bytes, Kind::Layer);
    let s2_d = common::put_kind(&store, &s2.bytes, Kind::Layer);
    store
        .put_many((0..40).map(|i| common::blob(3000 + i, 4 * KIB)))
        .expect("put filler");
    let big1 = gz_layer(&common::blob(32, 90 * KIB));
    let big2 = gz_layer(&common::blob(33, 70 * KIB));
    let img = put_good_image(
        &store,
        Some("example.com/verify/cut:1"),
        &[s1, s2, big1, big2],
        "cut",
    );
    let (big1_d, big2_d) = (img.layers[2], img.layers[3]);
    assert!(
        is_sealed_or_large(&store, &s2_d),
        "the cut segment is sealed"
    );
    assert!(is_large(&store, &big1_d) && is_large(&store, &big2_d));
    assert_clean(&store, "before damage");

    let seg = segment_of(&store, &s2_d);
    let (seg_path, s2_at) = payload_at(&store, &s2_d);
    let cut = s2_at + 10;
    let all = listing(&store);
    let mut lost = BTreeSet::from([big1_d, big2_d]);
    let mut before_cut = BTreeSet::new();
    for (d, (size, _)) in &all {
        if let Location::Packed { segment, offset } =
            store.stat(d).expect("stat").expect("stored").location
            && segment == seg
        {
            if offset + size > cut {
                lost.insert(*d);
            } else {
                before_cut.insert(*d);
            }
        }
    }
    assert!(before_cut.contains(&s1_d) && lost.contains(&s2_d));
    assert!(lost.len() > 3, "the cut loses several records: {lost:?}");
    let (big1_path, _) = payload_at(&store, &big1_d);
    let (big2_path, _) = payload_at(&store, &big2_d);
    drop(store);

    truncate(&big1_path, RECORD_HEADER + 1000);
    std::fs::remove_file(&big2_path).expect("delete large file");
    truncate(&seg_path, cut);
    Damaged {
        lost,
        before_cut,
        segment: seg_path,
        all: all.into_keys().collect(),
        image: img.name,
    }
}

/// Truncated and deleted files are reported as `unreadable` (or `size`) for every blob
/// whose bytes are gone, at every depth, without a panic, and nothing else is reported.
#[test]
fn truncated_and_missing_files_are_unreadable_not_a_panic() {
    let dir = common::tempdir();
    let root = dir.path();
    let dmg = truncated_store(root);
    let store = common::open_with(root, one_shard());
    for depth in DEPTHS {
        let r = verify(&store, depth);
        for d in &dmg.lost {
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.digest == Some(*d) && ["missing", "size"].contains(&p.kind.name())),
                "{depth:?}: {d} is reported unreadable: {:#?}",
                r.problems
            );
        }
        // Unreadable blobs may also have an unreadable header; nothing else.
        for p in &r.problems {
            if let Some(d) = p.digest {
                assert!(
                    dmg.lost.contains(&d) || dmg.before_cut.contains(&d),
                    "{depth:?}: {d} was not damaged but is reported: {p:#?}"
                );
                assert!(
                    ["missing", "size", "header"].contains(&p.kind.name()),
                    "{depth:?}: unexpected kind for {d}: {p:#?}"
                );
            }
        }
        let layer_problem = r
            .problems
            .iter()
            .find(|p| p.digest.is_some_and(|d| dmg.lost.contains(&d)) && !p.images.is_empty())
            .expect("a lost layer of the image names it");
        assert_eq!(images_of(layer_problem), names(&[&dmg.image]));
        if depth == Depth::Deep {
            assert!(
                r.problems.iter().any(
                    |p| p.kind == "segment" && p.path.as_deref() == Some(dmg.segment.as_path())
                ),
                "--deep names the truncated segment: {:#?}",
                r.problems
            );
        }
    }
    // The store still works for what is intact.
    let intact: Vec<&Digest> = dmg
        .all
        .iter()
        .filter(|d| !dmg.lost.contains(d) && !dmg.before_cut.contains(d))
        .collect();
    assert!(!intact.is_empty());
    for d in intact {
        assert_eq!(common::sha256(&store.get(d).expect("get intact")), *d);
    }
    drop(store);
    for args in [&["--fast"][..], &[], &["--deep"]] {
        let out = cli_verify(root, args, 3);
        for d in &dmg.lost {
            assert!(
                stdout(&out).contains(&d.to_string()),
                "store verify {args:?} names {d}: {}",
                stdout(&out)
            );
        }
    }
}

/// A sealed segment cut in the middle of a record has lost that record and the ones after
/// it; the records before the cut are intact and must not be reported, and `--repair` must
/// not drop them from the index (they are readable: nothing would even be quarantined).
#[test]
fn a_truncated_segment_reports_only_the_records_it_lost() {
    let dir = common::tempdir();
    let root = dir.path();
    let dmg = truncated_store(root);
    assert!(!dmg.before_cut.is_empty());
    let store = common::open_with(root, one_shard());
    let mut wrong = Vec::new();
    for depth in DEPTHS {
        let r = verify(&store, depth);
        let wrongly: BTreeSet<Digest> = named(&r).intersection(&dmg.before_cut).copied().collect();
        if !wrongly.is_empty() {
            let how: BTreeSet<(&str, String)> = r
                .problems
                .iter()
                .filter(|p| p.digest.is_some_and(|d| wrongly.contains(&d)))
                .map(|p| (p.kind.name(), p.detail.clone()))
                .collect();
            wrong.push(format!(
                "{depth:?}: {} of {} intact record(s) before the cut reported as {how:?}",
                wrongly.len(),
                dmg.before_cut.len()
            ));
        }
    }
    let rep = verify_repair(&store, Depth::Digest)
        .repaired
        .expect("repaired");
    for d in &dmg.lost {
        assert!(rep.quarantined.contains(d), "lost {d} is quarantined");
    }
    let dropped: Vec<&Digest> = dmg
        .before_cut
        .iter()
        .filter(|d| !store.contains(d).expect("contains"))
        .collect();
    if !dropped.is_empty() {
        wrong.push(format!(
            "--repair removed {} intact blob(s) from the index ({dropped:?}); quarantine/ holds \
             {} file(s) for {} quarantined blob(s)",
            dropped.len(),
            quarantine_files(root).len(),
            rep.quarantined.len()
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// =======================================================================================
// 3. Reference counts and holds.

/// Sets (`Some`) or removes (`None`) rows of the `refcount` and `holds` tables of
/// `meta.redb` (docs/FORMAT.md §6.4, §6.5), with redb directly while the store is closed.
fn edit_counts(root: &Path, refcount: &[(Digest, Option<u64>)], holds: &[(Digest, Option<u64>)]) {
    const REFCOUNT: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("refcount");
    const HOLDS: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("holds");
    let db = redb::Database::open(root.join("meta.redb")).expect("open meta.redb");
    let txn = db.begin_write().expect("write transaction");
    for (def, rows) in [(REFCOUNT, refcount), (HOLDS, holds)] {
        let mut t = txn.open_table(def).expect("open table");
        for (d, v) in rows {
            match v {
                Some(n) => {
                    t.insert(&*d.key(), *n).expect("insert");
                }
                None => {
                    assert!(
                        t.remove(&*d.key()).expect("remove").is_some(),
                        "{d} had a row"
                    );
                }
            }
        }
    }
    txn.commit().expect("commit");
}

/// Counts made wrong on purpose in `meta.redb`: the default depth does not look at them,
/// `--deep` reports each one (`refcount`, `holds`), `--repair` rewrites exactly those, and
/// the store is clean afterwards, also after a reopen and through the command line.
#[test]
fn wrong_refcounts_and_holds_are_found_deep_and_repaired() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let shared = gz_layer(&common::blob(40, 2 * KIB));
    let own = gz_layer(&common::blob(41, 2 * KIB));
    let a = put_good_image(
        &store,
        Some("example.com/counts/a:1"),
        &[shared.clone(), own],
        "a",
    );
    let b = put_good_image(&store, Some("example.com/counts/b:1"), &[shared], "b");
    let (l_shared, l_own) = (a.layers[0], a.layers[1]);
    assert_eq!(b.layers[0], l_shared);
    let truth: BTreeMap<Digest, (u64, u64)> = a
        .all()
        .union(&b.all())
        .map(|d| (*d, store.counts(d).expect("counts")))
        .collect();
    assert_eq!(truth[&l_shared], (2, 0));
    assert_eq!(truth[&a.manifest], (0, 1));
    assert_clean(&store, "before");
    drop(store);

    edit_counts(
        root,
        &[(l_shared, Some(7)), (a.config, None)],
        &[(a.manifest, Some(3)), (l_own, Some(1))],
    );

    let store = common::open_with(root, small_opts());
    assert_eq!(
        store.counts(&l_shared).expect("counts"),
        (7, 0),
        "the edit landed"
    );
    for depth in [Depth::Fast, Depth::Digest] {
        let r = verify(&store, depth);
        assert!(
            r.problems.is_empty(),
            "{depth:?} does not check counts: {:#?}",
            r.problems
        );
    }
    let deep = verify(&store, Depth::Deep);
    assert_eq!(
        found(&deep),
        [
            (Some(l_shared), "refcount"),
            (Some(a.config), "refcount"),
            (Some(a.manifest), "holds"),
            (Some(l_own), "holds"),
        ]
        .into_iter()
        .map(|(d, k)| (d, k.to_owned()))
        .collect::<BTreeSet<_>>(),
        "--deep: each wrong count: {:#?}",
        deep.problems
    );
    assert_eq!(
        images_of(problem(&deep, &l_shared, "refcount")),
        names(&[&a.name, &b.name])
    );
    assert_eq!(
        images_of(problem(&deep, &a.manifest, "holds")),
        names(&[&a.name])
    );
    assert_eq!(
        store.counts(&l_shared).expect("counts"),
        (7, 0),
        "verify without --repair changes nothing"
    );

    let fixed = verify_repair(&store, Depth::Deep);
    let rep = fixed.repaired.expect("repaired");
    assert_eq!(rep.refcounts_fixed, 2, "{rep:?}");
    assert_eq!(rep.holds_fixed, 2, "{rep:?}");
    assert!(
        rep.quarantined.is_empty(),
        "counts are not corruption: {rep:?}"
    );
    assert!(rep.images_lacking.is_empty(), "{rep:?}");
    for (d, want) in &truth {
        assert_eq!(store.counts(d).expect("counts"), *want, "counts of {d}");
    }
    assert_clean(&store, "after --repair");
    drop(store);
    let store = common::open_with(root, small_opts());
    assert_clean(&store, "after --repair and a reopen");
    drop(store);

    // Through the command line.
    edit_counts(root, &[(l_own, Some(0))], &[]);
    let out = cli_verify(root, &["--deep", "--repair", "--json"], 3);
    let v = parse_json(&out);
    assert_eq!(
        json_found(&v),
        BTreeSet::from([(Some(l_own), "refcount".to_owned())]),
        "{v}"
    );
    assert_eq!(v["repaired"]["refcounts_fixed"], 1, "{v}");
    assert_eq!(v["repaired"]["holds_fixed"], 0, "{v}");
    cli_verify(root, &["--deep"], 0);
}

/// An index row deleted from `meta.redb` behind the store's back: the manifest's edge now
/// names a blob that is not stored (`missing-child`, naming the image) and its large file
/// is named by nothing (`orphan-file`, with its path); `--repair` says what the image lacks.
#[test]
fn a_lost_index_row_is_a_missing_child_and_an_orphan_file() {
    const BLOBS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blobs");
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let img = put_good_image(
        &store,
        Some("example.com/orphan/a:1"),
        &[
            gz_layer(&common::blob(50, KIB)),
            gz_layer(&common::blob(51, 90 * KIB)),
        ],
        "orphan",
    );
    let big = img.layers[1];
    assert!(is_large(&store, &big));
    let (big_path, _) = payload_at(&store, &big);
    assert_clean(&store, "before");
    drop(store);
    {
        let db = redb::Database::open(root.join("meta.redb")).expect("open meta.redb");
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(BLOBS).expect("blobs");
            assert!(t.remove(&*big.key()).expect("remove").is_some());
        }
        txn.commit().expect("commit");
    }
    let store = common::open_with(root, small_opts());
    for depth in [Depth::Fast, Depth::Digest] {
        assert!(verify(&store, depth).problems.is_empty(), "{depth:?}");
    }
    let deep = verify(&store, Depth::Deep);
    assert_eq!(
        found(&deep),
        BTreeSet::from([
            (Some(big), "missing-child".to_owned()),
            (Some(big), "orphan-file".to_owned()),
        ]),
        "{:#?}",
        deep.problems
    );
    assert_eq!(
        images_of(problem(&deep, &big, "missing-child")),
        names(&[&img.name])
    );
    assert_eq!(
        problem(&deep, &big, "orphan-file").path.as_deref(),
        Some(big_path.as_path())
    );
    let rep = verify_repair(&store, Depth::Deep)
        .repaired
        .expect("repaired");
    assert!(rep.quarantined.is_empty(), "{rep:?}");
    assert_eq!(
        rep.images_lacking,
        BTreeMap::from([(img.name.clone(), vec![big])]),
        "{rep:?}"
    );
    assert!(big_path.is_file(), "verify does not delete orphan files");
}

// =======================================================================================
// 4. Layers against diff_ids.

/// Hand-made images with gzip, zstd and plain layers (compressed by the real tools): the
/// correct one reports nothing; a wrong `diff_id` is `diff-id`, a gzip or zstd stream that
/// does not decompress is `decompress`, each naming its image; the default depth reports
/// none of this (the blobs themselves are intact).
#[test]
fn deep_checks_layers_against_diff_ids() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let good = put_good_image(
        &store,
        Some("example.com/diff/good:1"),
        &[
            gz_layer(&common::blob(60, 3 * KIB)),
            gz_layer(&common::blob(61, 100 * KIB)),
            zstd_layer(&common::blob(62, 4 * KIB)),
            plain_layer(&common::blob(63, 1500)),
        ],
        "good",
    );
    assert!(is_large(&store, &good.layers[1]), "a large gzip layer too");
    assert_clean(&store, "correct image");

    // Wrong diff_id for a gzip layer and for a zstd layer (after a correct one).
    let ok = gz_layer(&common::blob(64, KIB));
    let wrong_gz = gz_layer(&common::blob(65, 2 * KIB));
    let wrong_zst = zstd_layer(&common::blob(66, 2 * KIB));
    let wrong = put_image(
        &store,
        Some("example.com/diff/wrong:1"),
        &[ok.clone(), wrong_gz.clone(), wrong_zst.clone()],
        &[
            ok.diff_id,
            common::sha256(b"not the content"),
            wrong_gz.diff_id,
        ],
        "wrong",
    );
    // gzip magic, but the CRC in the trailer is wrong.
    let mut bad_crc = gz_layer(&common::blob(67, 2 * KIB));
    let n = bad_crc.bytes.len();
    bad_crc.bytes[n - 6] ^= 0xff;
    let crc = put_good_image(&store, Some("example.com/diff/crc:1"), &[bad_crc], "crc");
    // gzip magic and header, then garbage instead of a deflate stream.
    let mut garbage = gzip(&common::blob(68, KIB))[..10].to_vec();
    garbage.extend_from_slice(&[0xff; 64]);
    let garbage_layer = Layer {
        bytes: garbage,
        media_type: media::OCI_LAYER_GZIP,
        diff_id: common::sha256(b"whatever"),
    };
    let garb = put_good_image(
        &store,
        Some("example.com/diff/garbage:1"),
        &[garbage_layer],
        "garbage",
    );
    // zstd with a damaged checksum.
    let mut bad_zst = zstd_layer(&common::blob(69, 2 * KIB));
    let n = bad_zst.bytes.len();
    bad_zst.bytes[n - 1] ^= 0xff;
    let zst = put_good_image(&store, Some("example.com/diff/zstd:1"), &[bad_zst], "zstd");
    // Not gzip at all, under a gzip media type, and not what the config lists.
    let mislabelled = Layer {
        bytes: common::blob(70, 2 * KIB),
        media_type: media::OCI_LAYER_GZIP,
        diff_id: common::sha256(b"not this either"),
    };
    let mis = put_good_image(
        &store,
        Some("example.com/diff/mislabelled:1"),
        &[mislabelled],
        "mislabelled",
    );

    for depth in [Depth::Fast, Depth::Digest] {
        let r = verify(&store, depth);
        assert!(
            r.problems.is_empty(),
            "{depth:?}: intact blobs: {:#?}",
            r.problems
        );
    }
    let deep = verify(&store, Depth::Deep);
    let by_digest: BTreeMap<Digest, &Problem> = deep
        .problems
        .iter()
        .map(|p| (p.digest.expect("blob problem"), p))
        .collect();
    assert_eq!(
        by_digest.len(),
        deep.problems.len(),
        "one problem per blob: {:#?}",
        deep.problems
    );
    let want = [
        (wrong.layers[1], "diff-id", &wrong.name),
        (wrong.layers[2], "diff-id", &wrong.name),
        (crc.layers[0], "decompress", &crc.name),
        (garb.layers[0], "decompress", &garb.name),
        (zst.layers[0], "decompress", &zst.name),
    ];
    for (d, kind, name) in want {
        let p = problem(&deep, &d, kind);
        assert_eq!(images_of(p), names(&[name]), "{kind} of {d}");
    }
    // Bytes that are not gzip under a gzip media type cannot decompress as gzip; whether
    // the store calls that `decompress` or (reading them as plain) `diff-id`, it must say.
    let p = by_digest
        .get(&mis.layers[0])
        .unwrap_or_else(|| panic!("mislabelled layer reported: {:#?}", deep.problems));
    assert!(["decompress", "diff-id"].contains(&p.kind.name()), "{p:#?}");
    assert_eq!(images_of(p), names(&[&mis.name]));
    assert_eq!(
        deep.problems.len(),
        want.len() + 1,
        "nothing about the correct layers: {:#?}",
        deep.problems
    );
    for d in good.all().iter().chain(&[wrong.layers[0], wrong.config]) {
        assert!(!by_digest.contains_key(d), "{d} is fine");
    }
}

/// A manifest whose digest sorts after `other` (varying an annotation).
fn manifest_sorting(config: &[u8], layers: &[Layer], after: &Digest, want_after: bool) -> Vec<u8> {
    (0..1000)
        .map(|i| manifest_json(config, layers, &format!("order-{i}")))
        .find(|m| (common::sha256(m) > *after) == want_after)
        .expect("some annotation sorts either way")
}

/// Two images share a layer; one config lists its `diff_id` correctly and the other wrongly.
/// `--deep` must report the wrong one whichever of the two manifests the store reads
/// last (a layer's expected `diff_id` must not be taken from only one of its configs).
#[test]
fn deep_finds_a_wrong_diff_id_on_a_layer_another_image_lists_correctly() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let mut expected = Vec::new();
    for (i, good_after_bad) in [(0u64, true), (1, false)] {
        let layer = gz_layer(&common::blob(80 + i, 2 * KIB));
        let bad = put_image(
            &store,
            Some(&format!("example.com/shared/bad{i}:1")),
            std::slice::from_ref(&layer),
            &[common::sha256(b"wrong diff id")],
            &format!("bad{i}"),
        );
        let config = config_json(&[layer.diff_id], &format!("good{i}"));
        common::put_kind(&store, &config, Kind::Config);
        let m = manifest_sorting(
            &config,
            std::slice::from_ref(&layer),
            &bad.manifest,
            good_after_bad,
        );
        let good = put_manifest(&store, &m);
        let good_name = tag(&store, &format!("example.com/shared/good{i}:1"), &good);
        assert_eq!(good > bad.manifest, good_after_bad);
        expected.push((bad.layers[0], bad.name, good_name));
    }
    let deep = verify(&store, Depth::Deep);
    for (layer, bad_name, good_name) in &expected {
        let hits: Vec<&Problem> = deep
            .problems
            .iter()
            .filter(|p| p.digest == Some(*layer))
            .collect();
        assert!(
            hits.iter().any(|p| p.kind == "diff-id"),
            "the layer {layer} shared by {good_name} (correct) and {bad_name} (wrong diff_id) \
             is reported as diff-id; report: {:#?}",
            deep.problems
        );
        for p in hits {
            assert!(p.images.contains(bad_name), "{p:#?} names {bad_name}");
        }
    }
}

/// A config that lists fewer `diff_ids` than the manifest has layers cannot vouch for the
/// last layer: `--deep` must not pass it silently.
#[test]
fn deep_reports_a_layer_its_config_lists_no_diff_id_for() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let l1 = gz_layer(&common::blob(90, KIB));
    let l2 = gz_layer(&common::blob(91, KIB));
    let img = put_image(
        &store,
        Some("example.com/short/a:1"),
        &[l1.clone(), l2],
        &[l1.diff_id],
        "short",
    );
    let deep = verify(&store, Depth::Deep);
    assert!(
        deep.problems.iter().any(|p| {
            (p.digest == Some(img.layers[1]) || p.digest == Some(img.config))
                && p.images.contains(&img.name)
        }),
        "a layer without a diff_id in its config ({}) is reported; report: {:#?}",
        img.layers[1],
        deep.problems
    );
}

/// Real images made by umoci and skopeo (gzip, zstd, plain, plain mislabelled as gzip,
/// Docker schema2, a docker archive) verify clean at every depth.
#[test]
fn real_images_verify_clean_at_every_depth() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    for (rel, base) in [
        ("oci-layout", "test/layout"),
        ("oci-zstd", "test/zstd"),
        ("oci-uncompressed", "test/uncompressed"),
        ("oci-mislabeled-gzip", "test/mislabeled"),
        ("docker-v2s2-oci", "test/v2s2"),
        ("docker-archive.tar", "test/docker"),
    ] {
        let out = import(&store, &fixture(rel), base);
        assert!(!out.images.is_empty(), "{rel} has images");
    }
    assert!(store.info().expect("info").large_blobs > 0);
    assert_clean(&store, "real images");
}

// =======================================================================================
// 5. --repair, then a re-import.

/// A real image with one packed and one large layer corrupted: `--repair` quarantines both
/// (their bytes go to `quarantine/`, their index entries go) and says which images lack
/// them; the default depth is then clean; a re-import of the same layout restores them
/// byte for byte and a deep verify is clean again.
#[test]
fn repair_quarantines_and_a_reimport_restores() {
    let dir = common::tempdir();
    let root = dir.path();
    let layout = fixture("oci-layout");
    let app = layout_manifest(&layout, "app");
    let app_layers = layer_digests(&app);
    let base_layers = layer_digests(&layout_manifest(&layout, "base"));
    let store = common::open_with(root, small_opts());
    let out = import(&store, &layout, "test/repair");
    let mut image_names: BTreeMap<String, Digest> = BTreeMap::new();
    for i in &out.images {
        for n in &i.names {
            image_names.insert(n.clone(), i.digest);
        }
    }
    assert_eq!(
        image_names.len(),
        4,
        "base, app, latest, whiteout: {image_names:?}"
    );
    assert_clean(&store, "imported");

    // App's own layers: L3 (20 MiB, a large file) and L4 (packed).
    let own: Vec<Digest> = app_layers
        .iter()
        .filter(|d| !base_layers.contains(d))
        .copied()
        .collect();
    assert_eq!(own.len(), 2, "app has two layers of its own");
    let large: Digest = *own
        .iter()
        .find(|d| is_large(&store, d))
        .expect("a large one");
    let packed: Digest = *own
        .iter()
        .find(|d| !is_large(&store, d))
        .expect("a packed one");
    let (large_path, large_at) = payload_at(&store, &large);
    let (packed_path, packed_at) = payload_at(&store, &packed);
    let before = listing(&store);
    let app_names: BTreeSet<String> = image_names
        .iter()
        .filter(|(_, d)| store.children(d).expect("children").contains(&large))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(app_names.len(), 2, "app and latest: {app_names:?}");
    drop(store);

    flip(&large_path, large_at + 12345);
    flip(&packed_path, packed_at + 77);

    let store = common::open_with(root, small_opts());
    let r = verify_repair(&store, Depth::Digest);
    assert_eq!(
        found_blobs(&r),
        expect(&[(large, "digest"), (packed, "digest")]),
        "{:#?}",
        r.problems
    );
    for d in [large, packed] {
        assert_eq!(images_of(problem(&r, &d, "digest")), app_names);
    }
    let rep = r.repaired.expect("repaired");
    let mut want_q = vec![large, packed];
    want_q.sort();
    assert_eq!(rep.quarantined, want_q);
    assert_eq!(
        rep.refcounts_fixed, 0,
        "quarantine keeps counts right: {rep:?}"
    );
    assert_eq!(rep.holds_fixed, 0, "{rep:?}");
    let lacking: BTreeMap<String, Vec<Digest>> = app_names
        .iter()
        .map(|n| (n.clone(), want_q.clone()))
        .collect();
    assert_eq!(
        rep.images_lacking, lacking,
        "only app and latest lack blobs"
    );

    // The bytes went to quarantine/, the entries out of the index.
    assert!(!store.contains(&large).expect("contains"));
    assert!(!store.contains(&packed).expect("contains"));
    assert!(!large_path.exists(), "the large file moved to quarantine/");
    let q = quarantine_files(root);
    assert_eq!(q.len(), 2, "two files in quarantine/: {q:?}");
    for (d, size) in [(large, before[&large].0), (packed, before[&packed].0)] {
        let prefix = format!("{}-{}.", d.algorithm(), d.hex());
        let (path, _) = q
            .iter()
            .find(|(p, _)| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .unwrap_or_else(|| panic!("{d} in quarantine/: {q:?}"));
        let bytes = std::fs::read(path).expect("read quarantined");
        let payload = if d == large {
            bytes[RECORD_HEADER as usize..].to_vec()
        } else {
            bytes
        };
        assert_eq!(
            payload.len() as u64,
            size,
            "the quarantined copy of {d} is whole"
        );
        assert_ne!(common::sha256(&payload), d, "and it is the corrupt copy");
        let original = std::fs::read(layout_blob(&layout, &d)).expect("fixture blob");
        let diff: usize = payload
            .iter()
            .zip(&original)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 1,
            "it differs from the fixture by the one flipped byte"
        );
    }
    // The rest is untouched and the default depth is clean.
    for d in before.keys().filter(|d| **d != large && **d != packed) {
        assert!(store.contains(d).expect("contains"), "{d} kept");
    }
    let after = verify(&store, Depth::Digest);
    assert!(after.problems.is_empty(), "{:#?}", after.problems);
    assert_eq!(after.blobs, before.len() as u64 - 2);
    // The manifest still names them: deep says so, and only that.
    let deep = verify(&store, Depth::Deep);
    assert_eq!(
        found_blobs(&deep),
        expect(&[(large, "missing-child"), (packed, "missing-child")]),
        "{:#?}",
        deep.problems
    );

    // A re-import brings them back.
    import(&store, &layout, "test/repair");
    for d in [large, packed] {
        let got = store.get(&d).expect("restored");
        let original = std::fs::read(layout_blob(&layout, &d)).expect("fixture blob");
        assert!(*got == original[..], "{d} restored byte for byte");
    }
    assert_eq!(
        listing(&store),
        before,
        "the same blobs as before the damage"
    );
    assert_clean(&store, "after re-import");
    drop(store);
    let store = common::open_with(root, small_opts());
    assert_clean(&store, "after re-import and a reopen");
}

// =======================================================================================
// 6. repair --rebuild-index.

/// A store with several images (packed and large blobs, sealed segments, several shards),
/// an index over two of them, a referrer, and unnamed blobs.
struct Populated {
    a: Img,
    b: Img,
    c: Img,
    index: Digest,
    referrer: Img,
    unnamed: BTreeSet<Digest>,
}

fn populate(store: &Store) -> Populated {
    let shared = gz_layer(&common::blob(200, 5 * KIB));
    let a = put_good_image(
        store,
        Some("example.com/rebuild/a:1"),
        &[shared.clone(), gz_layer(&common::blob(201, 120 * KIB))],
        "a",
    );
    let b = put_good_image(
        store,
        Some("example.com/rebuild/b:1"),
        &[
            shared,
            zstd_layer(&common::blob(202, 6 * KIB)),
            plain_layer(&common::blob(203, 70 * KIB)),
        ],
        "b",
    );
    let unnamed: BTreeSet<Digest> = store
        .put_many((0..60).map(|i| common::blob(2000 + i, 3 * KIB)))
        .expect("put filler")
        .into_iter()
        .map(|d| d.digest)
        .collect();
    let c = put_good_image(
        store,
        Some("example.com/rebuild/c:1"),
        &[gz_layer(&common::blob(204, 2 * KIB))],
        "c",
    );
    let mb = store.get(&b.manifest).expect("manifest b").to_vec();
    let mc = store.get(&c.manifest).expect("manifest c").to_vec();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [desc(media::OCI_MANIFEST, &mb), desc(media::OCI_MANIFEST, &mc)],
    }))
    .expect("index json");
    let index = put_manifest(store, &index);
    tag(store, "example.com/rebuild/index:1", &index);
    // A signature-like referrer of A.
    let ma = store.get(&a.manifest).expect("manifest a").to_vec();
    let payload = common::blob(205, 300);
    let sig_config = b"{}".to_vec();
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": desc("application/vnd.oci.empty.v1+json", &sig_config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &payload)],
        "subject": desc(media::OCI_MANIFEST, &ma),
    }))
    .expect("sig json");
    let payload_d = common::put_kind(store, &payload, Kind::Layer);
    let sig_config_d = common::put_kind(store, &sig_config, Kind::Config);
    let sig_d = put_manifest(store, &sig);
    assert_eq!(
        store.referrers(&a.manifest).expect("referrers"),
        vec![sig_d]
    );
    let info = store.info().expect("info");
    assert!(info.sealed_segments >= 2, "sealed segments: {info:?}");
    assert!(info.large_blobs >= 2, "large blobs: {info:?}");
    Populated {
        a,
        b,
        c,
        index,
        referrer: Img {
            name: String::new(),
            manifest: sig_d,
            config: sig_config_d,
            layers: vec![payload_d],
        },
        unnamed,
    }
}

/// What the graph looks like: children and referrers of every blob, and refcounts.
fn graph(store: &Store) -> BTreeMap<Digest, (BTreeSet<Digest>, BTreeSet<Digest>, u64)> {
    listing(store)
        .into_keys()
        .map(|d| {
            let refs: BTreeSet<Digest> = store
                .referrers(&d)
                .expect("referrers")
                .into_iter()
                .collect();
            (
                d,
                (
                    children(store, &d),
                    refs,
                    store.counts(&d).expect("counts").0,
                ),
            )
        })
        .collect()
}

fn check_rebuild_report(
    r: &RebuildReport,
    root_files: (usize, usize),
    blobs: usize,
    manifests: u64,
    edges: u64,
) {
    assert_eq!(r.blobs, blobs as u64, "{r:?}");
    assert_eq!(r.manifests, manifests, "{r:?}");
    assert_eq!(r.edges, edges, "{r:?}");
    assert_eq!(r.segments, root_files.0 as u64, "every segment read: {r:?}");
    assert_eq!(
        r.large_files, root_files.1 as u64,
        "every large file read: {r:?}"
    );
    assert!(r.skipped.is_empty(), "nothing skipped: {r:?}");
}

/// `meta.redb` deleted: `rebuild_index` recovers every blob with its exact bytes and kind,
/// the edges and referrers of every manifest and index, and the reference counts; holds
/// every blob under the `recovered` lease, which stops the collector until it is removed;
/// once an image is named again and the lease removed, a collection removes exactly what
/// that name does not reach; and the store verifies clean throughout.
#[test]
fn rebuild_index_recovers_everything_under_the_recovered_lease() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts().shards(3));
    let p = populate(&store);
    let before = contents(&store);
    let kinds = listing(&store);
    let shape = graph(&store);
    let manifests = kinds
        .values()
        .filter(|(_, k)| matches!(k, Kind::Manifest | Kind::Index))
        .count() as u64;
    assert_eq!(
        manifests, 5,
        "a, b, c, the index and the referrer: {kinds:?}"
    );
    let edges: u64 = shape.values().map(|(c, _, _)| c.len() as u64).sum();
    assert_clean(&store, "before");
    drop(store);
    let files = (
        common::pack_files(root).len(),
        common::large_files(root).len(),
    );

    std::fs::remove_file(root.join("meta.redb")).expect("delete meta.redb");
    let report = rebuild_index(root).unwrap_or_else(|e| panic!("rebuild: {e:?}"));
    check_rebuild_report(&report, files, before.len(), manifests, edges);
    assert!(report.old_index.is_none(), "there was no old index");

    let store = common::open_with(root, small_opts());
    assert_eq!(contents(&store), before, "every blob back, byte for byte");
    assert_eq!(listing(&store), kinds, "with its size and kind");
    assert_eq!(graph(&store), shape, "edges, referrers and refcounts back");
    assert!(
        store.names().expect("names").is_empty(),
        "names cannot be recovered"
    );
    let leases = store.leases().expect("leases");
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].record.id, "recovered");
    assert_eq!(leases[0].record.expires_ms, None, "it never expires");
    let held: BTreeSet<Digest> = leases[0].resources.iter().copied().collect();
    assert_eq!(
        held,
        before.keys().copied().collect(),
        "it holds every blob"
    );
    for d in before.keys() {
        assert_eq!(store.counts(d).expect("counts").1, 1, "one hold on {d}");
    }
    assert_clean(&store, "rebuilt");

    // The collector refuses while the lease exists, and removes nothing.
    let zero = GcOptions::default().grace(Duration::ZERO);
    match store.gc(&zero, &AtomicBool::new(false)) {
        Err(Error::Invalid(m)) => assert!(m.contains("recovered"), "{m}"),
        other => panic!("gc must refuse while `recovered` exists: {other:?}"),
    }
    assert_eq!(listing(&store).len(), before.len());

    // Name A again, release the lease: exactly what A does not reach goes.
    tag(&store, "example.com/rebuild/a:1", &p.a.manifest);
    store.lease_remove("recovered").expect("remove lease");
    std::thread::sleep(Duration::from_millis(5));
    let keep = reach(&store, &p.a.manifest);
    let mut want_keep = p.a.all();
    want_keep.extend(p.referrer.all());
    assert_eq!(keep, want_keep, "A and its referrer");
    let gone: BTreeSet<Digest> = before
        .keys()
        .filter(|d| !keep.contains(d))
        .copied()
        .collect();
    for d in p.b.all().iter().chain(&p.c.all()).chain(&p.unnamed) {
        if !p.a.layers.contains(d) {
            assert!(gone.contains(d), "{d} is not reached from A");
        }
    }
    assert!(gone.contains(&p.index));
    let r = store
        .gc(&zero, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("gc: {e:?}"));
    assert_eq!(r.removed_blobs, gone.len() as u64, "{r:?}");
    assert_eq!(
        listing(&store).into_keys().collect::<BTreeSet<_>>(),
        keep,
        "gc removes exactly the unnamed rest"
    );
    for d in &keep {
        assert_eq!(store.get(d).expect("kept").to_vec(), before[d]);
    }
    assert_clean(&store, "after gc");

    // New puts work (recovered segments take no appends: new ones start).
    let fresh = store.put(&common::blob(999, 5 * KIB)).expect("put").digest;
    drop(store);
    let store = common::open_with(root, small_opts());
    assert_eq!(common::sha256(&store.get(&fresh).expect("fresh")), fresh);
    assert!(store.contains(&p.a.manifest).expect("contains"));
}

/// `store repair --rebuild-index` on a store whose index is there but damaged (here:
/// replaced by an empty file): the old one is moved aside, everything is recovered, the
/// JSON report says what, and `store gc` refuses until `store lease rm recovered`.
#[test]
fn cli_rebuild_index_moves_the_old_index_aside() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let p = populate(&store);
    let before = contents(&store);
    let shape = graph(&store);
    drop(store);
    let files = (
        common::pack_files(root).len(),
        common::large_files(root).len(),
    );

    std::fs::write(root.join("meta.redb"), b"").expect("damage meta.redb");
    let out = common::cli(root, &["repair", "--rebuild-index", "--json"]);
    let v: Value = serde_json::from_str(&common::ok_stdout(&out)).expect("json");
    assert_eq!(v["blobs"], before.len(), "{v}");
    assert_eq!(v["manifests"], 5, "{v}");
    assert_eq!(v["segments"], files.0, "{v}");
    assert_eq!(v["large_files"], files.1, "{v}");
    assert_eq!(v["skipped"], json!([]), "{v}");
    let old = PathBuf::from(v["old_index"].as_str().expect("old_index"));
    assert_eq!(old.parent(), Some(root));
    assert!(
        old.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("meta.redb.damaged-")),
        "{old:?}"
    );
    assert_eq!(std::fs::read(&old).expect("old index kept"), b"");

    cli_verify(root, &["--deep"], 0);
    let gc = common::cli(root, &["gc", "--grace", "0s"]);
    let err = common::failed_stderr(&gc);
    assert!(err.contains("recovered"), "{err}");

    let store = common::open_with(root, small_opts());
    assert_eq!(contents(&store), before);
    assert_eq!(graph(&store), shape);
    assert!(store.contains(&p.index).expect("contains"));
    drop(store);

    let out = common::cli(root, &["lease", "rm", "recovered"]);
    common::ok_stdout(&out);
    common::ok_stdout(&common::cli(root, &["gc", "--grace", "0s"]));
    let store = common::open_with(root, small_opts());
    assert_eq!(
        store.info().expect("info").blobs,
        0,
        "nothing was named: all collected"
    );
}

// =======================================================================================
// 7. The command line's JSON and exit codes.

/// `store verify --json` on a corrupted store: parses, has `problems` with `digest` and
/// `kind` for each damaged blob, exit status 3 at every depth; `--repair --json` adds
/// `repaired`; a missing store is an operational error (exit status 1).
#[test]
fn cli_verify_json_and_exit_codes() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, one_shard());
    let img = put_good_image(
        &store,
        Some("example.com/json/a:1"),
        &[
            gz_layer(&common::blob(300, 2 * KIB)),
            gz_layer(&common::blob(301, 90 * KIB)),
        ],
        "json",
    );
    let (small, big) = (img.layers[0], img.layers[1]);
    let small_at = payload_at(&store, &small);
    let big_at = payload_at(&store, &big);
    drop(store);
    cli_verify(root, &["--json"], 0);
    flip(&small_at.0, small_at.1 + 3);
    flip(&big_at.0, big_at.1 + 50_000);

    for (args, kind, depth) in [
        (&["--fast", "--json"][..], "blake3", "fast"),
        (&["--json"], "digest", "digest"),
        (&["--deep", "--json"], "digest", "deep"),
    ] {
        let out = cli_verify(root, args, 3);
        let v = parse_json(&out);
        assert_eq!(v["depth"], depth, "{v}");
        assert_eq!(v["blobs"], 4, "{v}");
        assert_eq!(
            json_found(&v),
            BTreeSet::from([(Some(small), kind.to_owned()), (Some(big), kind.to_owned())]),
            "store verify {args:?}: {v}"
        );
        for p in v["problems"].as_array().expect("problems") {
            assert_eq!(p["images"], json!([img.name]), "{p}");
            assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{p}");
        }
        assert!(v.get("repaired").is_none(), "{v}");
    }

    let v = parse_json(&cli_verify(root, &["--repair", "--json"], 3));
    let mut q = vec![small.to_string(), big.to_string()];
    q.sort();
    assert_eq!(v["repaired"]["quarantined"], json!(q), "{v}");
    assert_eq!(v["repaired"]["images_lacking"][&img.name], json!(q), "{v}");
    let v = parse_json(&cli_verify(root, &["--json"], 0));
    assert_eq!(v["problems"], json!([]), "{v}");
    assert_eq!(v["blobs"], 2, "{v}");

    // Not a store: an operational error, not "problems found".
    let missing = root.join("no-such-store");
    let out = common::cli(&missing, &["verify"]);
    common::failed_stderr(&out);
    let out = common::cli(&missing, &["verify", "--deep", "--json"]);
    common::failed_stderr(&out);
}
