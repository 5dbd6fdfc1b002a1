//! Garbage collection (DESIGN.md "Garbage collection"): what a collection removes and what
//! it keeps (shared layers, containers, leases and their expiry, the grace period, indexes,
//! referrers), the re-check that keeps what a writer made live between the mark and the
//! sweep, dry runs that predict the real run exactly, segment compaction under live
//! readers, orphan files, SIGKILL during `store gc`, a property test against a model of
//! the roots, and the command line.
//!
//! Every test that expects something to be kept also has something that must go, so a
//! collector that does nothing fails it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use layerstore::gc::KindStats;
use layerstore::image::media;
use layerstore::{
    BlobInfo, Digest, Error, GcOptions, GcReport, Kind, Location, Options, PutOptions, Store,
};
use proptest::prelude::*;
use rand::Rng;
use serde_json::{Value, json};

use crate::common::{self, KIB};

/// Segments seal at 64 KiB and blobs from 64 KiB get a file of their own, so small test
/// data exercises sealed (mapped) segments, compaction and large-file unlinks.
const SMALL: u64 = 64 * 1024;
/// Size of a segment file's header (`layerstore::format::SEGMENT_HEADER_LEN`).
const SEGMENT_HEADER: u64 = layerstore::format::SEGMENT_HEADER_LEN;
/// Size of a record header (`layerstore::format::RECORD_HEADER_LEN`).
const RECORD_HEADER: u64 = layerstore::format::RECORD_HEADER_LEN;

const SIG_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// The grace period of the young-parent test: long enough for a debug build to put a
/// manifest and collect within it.
const YOUNG_GRACE: Duration = Duration::from_secs(1);

fn small_opts() -> Options {
    Options::default()
        .segment_size(SMALL)
        .large_threshold(SMALL)
}

/// A collection with no grace period.
fn zero() -> GcOptions {
    GcOptions::default().grace(Duration::ZERO)
}

/// `touched` has millisecond resolution and a zero grace period keeps what was touched in
/// the collection's own millisecond: let the clock move on before collecting.
fn settle() {
    std::thread::sleep(Duration::from_millis(5));
}

fn run_gc(store: &Store, opts: &GcOptions) -> GcReport {
    store
        .gc(opts, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("gc: {e:?}"))
}

/// Collects with no grace period, after letting the clock move on.
fn gc0(store: &Store) -> GcReport {
    settle();
    run_gc(store, &zero())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Building images by hand.

/// A manifest as put, and every blob it consists of.
#[derive(Clone, Debug)]
struct Image {
    manifest: Digest,
    /// The manifest's own bytes.
    json: Vec<u8>,
    /// Manifest, config and layers, with their bytes.
    blobs: BTreeMap<Digest, Vec<u8>>,
}

impl Image {
    fn digests(&self) -> BTreeSet<Digest> {
        self.blobs.keys().copied().collect()
    }
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": common::sha256(bytes).to_string(),
        "size": bytes.len(),
    })
}

fn config_json(seed: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Labels": {"seed": seed.to_string()}},
    }))
    .expect("config json")
}

fn manifest_json(
    config_type: &str,
    config: &[u8],
    layers: &[&[u8]],
    subject: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": desc(config_type, config),
        "layers": layers.iter().map(|l| desc(media::OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
    });
    if let Some(s) = subject {
        m["artifactType"] = json!(SIG_TYPE);
        m["subject"] = desc(media::OCI_MANIFEST, s);
    }
    serde_json::to_vec(&m).expect("manifest json")
}

fn index_json(manifests: &[(&[u8], &str)]) -> Vec<u8> {
    let ms: Vec<Value> = manifests
        .iter()
        .map(|(m, arch)| {
            let mut d = desc(media::OCI_MANIFEST, m);
            d["platform"] = json!({"os": "linux", "architecture": arch});
            d
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": ms,
    }))
    .expect("index json")
}

fn put_manifest(store: &Store, json: &[u8], opts: PutOptions) -> Digest {
    let p = store
        .put_manifest(json, opts)
        .unwrap_or_else(|e| panic!("put manifest: {e:?}"));
    assert_eq!(p.descriptor.digest, common::sha256(json));
    assert!(
        p.absent_children.is_empty(),
        "children are stored first: {:?}",
        p.absent_children
    );
    p.descriptor.digest
}

/// Stores the layers and the config (with their kinds), then the manifest (with `opts`).
fn put_parts(
    store: &Store,
    config_type: &str,
    config: &[u8],
    layers: &[&[u8]],
    subject: Option<&[u8]>,
    opts: PutOptions,
) -> Image {
    let mut blobs = BTreeMap::new();
    for l in layers {
        blobs.insert(common::put_kind(store, l, Kind::Layer), l.to_vec());
    }
    blobs.insert(
        common::put_kind(store, config, Kind::Config),
        config.to_vec(),
    );
    let json = manifest_json(config_type, config, layers, subject);
    let manifest = put_manifest(store, &json, opts);
    blobs.insert(manifest, json.clone());
    Image {
        manifest,
        json,
        blobs,
    }
}

/// An image over layers that are already stored: puts only the config and the manifest.
fn image_over(store: &Store, seed: u64, layers: &[Vec<u8>]) -> Image {
    let config = config_json(seed);
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    let mut blobs: BTreeMap<Digest, Vec<u8>> = layers
        .iter()
        .map(|l| (common::sha256(l), l.clone()))
        .collect();
    blobs.insert(
        common::put_kind(store, &config, Kind::Config),
        config.clone(),
    );
    let json = manifest_json(media::OCI_CONFIG, &config, &refs, None);
    let manifest = put_manifest(store, &json, PutOptions::default());
    blobs.insert(manifest, json.clone());
    Image {
        manifest,
        json,
        blobs,
    }
}

/// An image with a config seeded by `seed`: the `shared` layers first, then layers of its
/// own of the given sizes.
fn put_image_with(
    store: &Store,
    seed: u64,
    shared: &[Vec<u8>],
    sizes: &[usize],
    opts: PutOptions,
) -> Image {
    let own: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| common::blob(seed * 1_000 + i as u64, n))
        .collect();
    let layers: Vec<&[u8]> = shared.iter().chain(&own).map(Vec::as_slice).collect();
    put_parts(
        store,
        media::OCI_CONFIG,
        &config_json(seed),
        &layers,
        None,
        opts,
    )
}

fn put_image(store: &Store, seed: u64, shared: &[Vec<u8>], sizes: &[usize]) -> Image {
    put_image_with(store, seed, shared, sizes, PutOptions::default())
}

/// A signature-like referrer of `subject`: the empty config `{}` and one payload layer.
fn put_referrer(store: &Store, subject: &Image, seed: u64) -> Image {
    let payload = common::blob(seed, 300);
    put_parts(
        store,
        EMPTY_TYPE,
        b"{}",
        &[&payload],
        Some(&subject.json),
        PutOptions::default(),
    )
}

// ---------------------------------------------------------------------------------------
// Looking at a store.

fn listing(store: &Store) -> BTreeMap<Digest, BlobInfo> {
    store
        .iter()
        .map(|r| {
            let i = r.expect("iterate blobs");
            (i.digest, i)
        })
        .collect()
}

fn stored(store: &Store) -> BTreeSet<Digest> {
    listing(store).into_keys().collect()
}

/// Every blob `root` reaches through edges (itself included).
fn reach(store: &Store, root: &Digest) -> BTreeSet<Digest> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![*root];
    while let Some(d) = stack.pop() {
        if seen.insert(d) {
            stack.extend(store.children(&d).expect("children"));
        }
    }
    seen
}

/// The blob is stored and its bytes hash to its digest.
fn assert_intact(store: &Store, d: &Digest, ctx: &str) {
    let b = store
        .get(d)
        .unwrap_or_else(|e| panic!("{ctx}: {d} unreadable: {e:?}"));
    assert_eq!(common::sha256(&b), *d, "{ctx}: bytes of {d} hash wrong");
}

/// Every blob of the image is stored with its exact bytes, and its edges reach exactly them.
fn assert_complete(store: &Store, img: &Image) {
    for (d, bytes) in &img.blobs {
        let got = store
            .get(d)
            .unwrap_or_else(|e| panic!("blob {d} of image {} lost: {e:?}", img.manifest));
        assert!(*got == **bytes, "bytes of {d} differ");
    }
    assert_eq!(
        reach(store, &img.manifest),
        img.digests(),
        "edges of {}",
        img.manifest
    );
}

fn assert_gone(store: &Store, ds: &BTreeSet<Digest>) {
    for d in ds {
        assert!(!store.contains(d).expect("contains"), "{d} still stored");
        assert!(
            matches!(store.get(d), Err(Error::NotFound(x)) if x == *d),
            "get {d} after its removal must be NotFound"
        );
    }
}

/// Every listed blob hashes to its digest, and the O(1) counters agree with the listing.
fn assert_consistent(store: &Store) {
    let (mut n, mut bytes, mut large, mut large_bytes) = (0u64, 0u64, 0u64, 0u64);
    for item in store.iter() {
        let i = item.expect("iterate");
        let b = store
            .get(&i.digest)
            .unwrap_or_else(|e| panic!("listed blob {} unreadable: {e:?}", i.digest));
        assert_eq!(b.len() as u64, i.size, "size of {}", i.digest);
        assert_eq!(common::sha256(&b), i.digest, "listed blob with wrong bytes");
        n += 1;
        bytes += i.size;
        if matches!(i.location, Location::Large { .. }) {
            large += 1;
            large_bytes += i.size;
        }
    }
    let info = store.info().expect("info");
    assert_eq!(
        (info.blobs, info.bytes, info.large_blobs, info.large_bytes),
        (n, bytes, large, large_bytes),
        "info() counters (blobs, bytes, large_blobs, large_bytes) vs iter()"
    );
}

/// What a report's `removed_by_kind` must say for removing `ds` (listed in `info`).
fn by_kind(
    info: &BTreeMap<Digest, BlobInfo>,
    ds: &BTreeSet<Digest>,
) -> BTreeMap<String, KindStats> {
    let mut out: BTreeMap<String, KindStats> = BTreeMap::new();
    for d in ds {
        let i = &info[d];
        let k = out.entry(i.kind.name().to_owned()).or_default();
        k.blobs += 1;
        k.bytes += i.size;
    }
    out
}

fn bytes_of(info: &BTreeMap<Digest, BlobInfo>, ds: &BTreeSet<Digest>) -> u64 {
    ds.iter().map(|d| info[d].size).sum()
}

/// Files under `large/` holding any generation of `d`.
fn large_files_of(root: &Path, d: &Digest) -> Vec<PathBuf> {
    let prefix = format!("{}-{}.", d.algorithm(), d.hex());
    common::large_files(root)
        .into_keys()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

fn set_mtime(path: &Path, t: SystemTime) {
    let f = std::fs::File::open(path).expect("open for set_modified");
    f.set_modified(t).expect("set mtime");
}

// ---------------------------------------------------------------------------------------
// 1. Shared layers.

#[test]
fn untagged_image_goes_and_shared_base_layers_stay() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    // One shared layer in a segment, one in a large file.
    let base = vec![common::blob(1, 3 * KIB), common::blob(2, 100 * KIB)];
    let a = put_image(&store, 10, &base, &[2 * KIB, 80 * KIB]);
    let b = put_image(&store, 20, &base, &[5 * KIB, 90 * KIB, 700]);
    store.tag("example.com/a:1", &a.manifest).expect("tag a");
    store.tag("example.com/b:1", &b.manifest).expect("tag b");
    let shared: BTreeSet<Digest> = base.iter().map(|l| common::sha256(l)).collect();
    for s in &shared {
        assert_eq!(store.counts(s).expect("counts"), (2, 0), "two parents");
    }
    let b_only: BTreeSet<Digest> = b.digests().difference(&a.digests()).copied().collect();
    assert_eq!(b_only.len(), 5, "manifest, config and three layers");
    let b_big = common::sha256(&common::blob(20 * 1_000 + 1, 90 * KIB));
    assert!(b_only.contains(&b_big));
    let b_big_files = large_files_of(root, &b_big);
    assert_eq!(b_big_files.len(), 1, "one large file for the 90 KiB layer");
    let a_big = common::sha256(&common::blob(10 * 1_000 + 1, 80 * KIB));

    // While both are named nothing goes.
    let before = listing(&store);
    let r = gc0(&store);
    assert_eq!((r.removed_blobs, r.removed_bytes), (0, 0));
    assert_eq!(
        listing(&store),
        before,
        "a collection with nothing to do changes nothing"
    );

    let untagged = store
        .remove_image("example.com/b:1", false)
        .expect("untag b");
    assert_eq!(
        untagged,
        vec![("example.com/b:1".to_owned(), b.manifest)],
        "remove_image reports the canonical name"
    );
    let r = gc0(&store);
    let after = stored(&store);
    let gone: BTreeSet<Digest> = before
        .keys()
        .filter(|d| !after.contains(d))
        .copied()
        .collect();
    assert_eq!(gone, b_only, "exactly b's own blobs go");
    assert_eq!(r.removed_blobs, 5);
    assert_eq!(r.removed_bytes, bytes_of(&before, &b_only));
    assert_eq!(r.removed_by_kind, by_kind(&before, &b_only));
    let counts: Vec<(&str, u64)> = r
        .removed_by_kind
        .iter()
        .map(|(k, s)| (k.as_str(), s.blobs))
        .collect();
    assert_eq!(counts, vec![("config", 1), ("layer", 3), ("manifest", 1)]);
    assert!(r.removed.is_empty(), "only a dry run lists digests");
    assert!(!r.dry_run);
    assert_gone(&store, &b_only);
    for p in &b_big_files {
        assert!(
            !p.exists(),
            "large file {} of a removed blob unlinked",
            p.display()
        );
    }
    assert_eq!(
        large_files_of(root, &a_big).len(),
        1,
        "a's large layer file stays"
    );
    assert_complete(&store, &a);
    for s in &shared {
        assert_eq!(store.counts(s).expect("counts"), (1, 0), "one parent left");
    }
    assert_consistent(&store);

    // Putting a removed large layer again stores a new copy that a later collection keeps
    // while it is young (the default grace period) and that reads back intact.
    let again = common::blob(20 * 1_000 + 1, 90 * KIB);
    assert_eq!(store.put(&again).expect("put again").digest, b_big);
    let r = run_gc(&store, &GcOptions::default());
    assert_eq!(r.removed_blobs, 0);
    assert!(*store.get(&b_big).expect("get re-put blob") == *again);
    assert_eq!(large_files_of(root, &b_big).len(), 1);
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 2. Containers.

#[test]
fn a_container_keeps_its_untagged_image_until_the_container_goes() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let a = put_image(&store, 30, &[], &[KIB, 70 * KIB, 2 * KIB]);
    let b = put_image(&store, 31, &[], &[KIB]);
    store.tag("example.com/a:1", &a.manifest).expect("tag");
    store.tag("example.com/b:1", &b.manifest).expect("tag");
    let web = store
        .container_create("example.com/a:1", Some("web"))
        .expect("container on a");
    assert_eq!(web.image, a.manifest);
    store
        .container_create("example.com/b:1", Some("db"))
        .expect("container on b");
    let junk = common::put_kind(&store, &common::blob(39, 500), Kind::Other);

    match store.remove_image("example.com/a:1", false) {
        Err(Error::InUse {
            image, containers, ..
        }) => {
            assert_eq!(image, a.manifest);
            assert_eq!(containers, vec![(web.id.clone(), "web".to_owned())]);
        }
        other => panic!("rmi of an image a container uses must be InUse, got {other:?}"),
    }
    assert_eq!(
        store.names().expect("names").len(),
        2,
        "a refused rmi removes nothing"
    );
    let untagged = store.remove_image("example.com/a:1", true).expect("rmi -f");
    assert_eq!(untagged.len(), 1);

    let r = gc0(&store);
    assert_eq!(
        r.kept_for_containers,
        vec![a.manifest],
        "a is kept only for its container; b is also named"
    );
    assert_eq!(r.removed_blobs, 1, "only the loose blob goes");
    assert!(!store.contains(&junk).expect("contains"));
    assert_complete(&store, &a);
    assert_complete(&store, &b);
    assert_eq!(
        large_files_of(root, &common::sha256(&common::blob(30_001, 70 * KIB))).len(),
        1
    );

    let removed = store.container_remove("web").expect("container rm");
    assert_eq!(removed.id, web.id);
    let before = listing(&store);
    let r = gc0(&store);
    assert!(r.kept_for_containers.is_empty());
    assert_eq!(r.removed_blobs, a.blobs.len() as u64);
    assert_eq!(r.removed_bytes, bytes_of(&before, &a.digests()));
    assert_gone(&store, &a.digests());
    assert!(
        large_files_of(root, &common::sha256(&common::blob(30_001, 70 * KIB))).is_empty(),
        "a's large layer file is unlinked"
    );
    assert_complete(&store, &b);
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 3. Leases, their expiry, and the grace period.

#[test]
fn leases_protect_blobs_and_manifests_until_removed() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let lease = store.lease_create(None).expect("lease");
    let x = common::put_kind(&store, &common::blob(40, 2 * KIB), Kind::Other);
    store.lease_add(&lease.id, &[x]).expect("lease add");
    let y = store
        .put_with(
            &common::blob(41, 90 * KIB),
            PutOptions::default().lease(lease.id.clone()),
        )
        .expect("put under lease")
        .digest;
    // The manifest is put under the lease; its children only through its edges.
    let img = put_image_with(
        &store,
        42,
        &[],
        &[KIB, 3 * KIB],
        PutOptions::default().lease(lease.id.clone()),
    );
    let junk = common::put_kind(&store, &common::blob(43, 100), Kind::Other);
    assert_eq!(store.counts(&x).expect("counts"), (0, 1));
    assert_eq!(store.counts(&y).expect("counts"), (0, 1));
    assert_eq!(store.counts(&img.manifest).expect("counts"), (0, 1));
    let held: BTreeSet<Digest> = store.leases().expect("leases")[0]
        .resources
        .iter()
        .copied()
        .collect();
    assert_eq!(held, BTreeSet::from([x, y, img.manifest]));

    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 1);
    assert!(!store.contains(&junk).expect("contains"));
    assert_intact(&store, &x, "lease_add");
    assert_intact(&store, &y, "put with lease");
    assert_complete(&store, &img);

    store.lease_remove(&lease.id).expect("lease rm");
    assert!(store.leases().expect("leases").is_empty());
    assert_eq!(store.counts(&x).expect("counts"), (0, 0), "holds released");
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 2 + img.blobs.len() as u64);
    assert_gone(&store, &BTreeSet::from([x, y]));
    assert_gone(&store, &img.digests());
    assert_eq!(store.info().expect("info").blobs, 0);
    assert_consistent(&store);
}

/// containerd's pull pattern: content already stored is put again under the pull's lease,
/// and the lease must hold it just as it holds new content (DESIGN.md: roots are "every
/// unexpired lease's resources").
#[test]
fn content_already_stored_and_put_again_under_a_lease_is_held() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let img = put_image(&store, 44, &[], &[KIB, 2 * KIB]);
    let x_bytes = common::blob(45, 500);
    let x = common::put_kind(&store, &x_bytes, Kind::Other);
    let junk = common::put_kind(&store, &common::blob(46, 100), Kind::Other);
    let lease = store.lease_create(None).expect("lease");
    let again = put_manifest(
        &store,
        &img.json,
        PutOptions::default().lease(lease.id.clone()),
    );
    assert_eq!(again, img.manifest);
    store
        .put_with(&x_bytes, PutOptions::default().lease(lease.id.clone()))
        .expect("put blob again under the lease");
    let resources: BTreeSet<Digest> = store.leases().expect("leases")[0]
        .resources
        .iter()
        .copied()
        .collect();
    let counts = store.counts(&img.manifest).expect("counts");

    let r = gc0(&store);
    assert!(!store.contains(&junk).expect("contains"));
    assert_eq!(
        r.removed_blobs, 1,
        "only the loose blob may go; lease resources {resources:?}, \
         (refcount, holds) of the manifest {counts:?}: {r:?}"
    );
    assert_complete(&store, &img);
    assert_intact(&store, &x, "plain blob put again under the lease");
    assert_eq!(resources, BTreeSet::from([img.manifest, x]));
    assert_eq!(counts, (0, 1));
}

#[test]
fn an_expired_lease_is_dropped_and_its_blobs_collected_in_the_same_run() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let short = store
        .lease_create(Some(Duration::from_millis(300)))
        .expect("short lease");
    let forever = store.lease_create(None).expect("lease");
    let x = common::put_kind(&store, &common::blob(50, KIB), Kind::Other);
    store.lease_add(&short.id, &[x]).expect("lease add");
    let img = put_image_with(
        &store,
        51,
        &[],
        &[2 * KIB, 70 * KIB],
        PutOptions::default().lease(short.id.clone()),
    );
    let z = common::put_kind(&store, &common::blob(52, KIB), Kind::Other);
    store.lease_add(&forever.id, &[z]).expect("lease add");

    let r = gc0(&store);
    assert!(r.expired_leases.is_empty(), "not expired yet: {r:?}");
    assert_eq!(r.removed_blobs, 0);
    assert_intact(&store, &x, "under an unexpired lease");
    assert_complete(&store, &img);

    let expires = short.expires_ms.expect("has an expiry");
    while now_ms() <= expires + 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = gc0(&store);
    assert_eq!(r.expired_leases, vec![short.id.clone()]);
    assert_eq!(
        r.removed_blobs,
        1 + img.blobs.len() as u64,
        "what the expired lease alone held goes in the same run"
    );
    assert_gone(&store, &BTreeSet::from([x]));
    assert_gone(&store, &img.digests());
    assert_intact(&store, &z, "under a lease without expiry");
    let ids: Vec<String> = store
        .leases()
        .expect("leases")
        .into_iter()
        .map(|l| l.record.id)
        .collect();
    assert_eq!(ids, vec![forever.id.clone()]);
    let r = gc0(&store);
    assert!(
        r.expired_leases.is_empty(),
        "an expired lease is reported once"
    );
    assert_eq!(r.removed_blobs, 0);
    assert_consistent(&store);
}

#[test]
fn grace_period_keeps_fresh_blobs_and_what_young_manifests_reach() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let fresh = common::put_kind(&store, &common::blob(60, KIB), Kind::Other);
    let r = run_gc(&store, &GcOptions::default().grace(Duration::from_secs(2)));
    assert_eq!(
        r.removed_blobs, 0,
        "a blob put just now is within a 2 s grace"
    );
    assert!(store.contains(&fresh).expect("contains"));
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 1, "without grace it goes");
    assert!(!store.contains(&fresh).expect("contains"));

    // Old layers and config, then a young manifest naming them: the manifest is a root
    // (young), and the mark carries that to its old children.
    let cfg = config_json(61);
    let l1 = common::blob(62, 2 * KIB);
    let l2 = common::blob(63, 80 * KIB);
    common::put_kind(&store, &cfg, Kind::Config);
    common::put_kind(&store, &l1, Kind::Layer);
    common::put_kind(&store, &l2, Kind::Layer);
    let stray = common::put_kind(&store, &common::blob(64, KIB), Kind::Other);
    std::thread::sleep(YOUNG_GRACE + Duration::from_millis(300));
    let put_at = Instant::now();
    let json = manifest_json(media::OCI_CONFIG, &cfg, &[&l1, &l2], None);
    let m = put_manifest(&store, &json, PutOptions::default());
    let r = run_gc(&store, &GcOptions::default().grace(YOUNG_GRACE));
    assert!(
        put_at.elapsed() < YOUNG_GRACE,
        "the collection must run within the grace period of the manifest put (took {:?})",
        put_at.elapsed()
    );
    assert_eq!(
        r.removed_blobs, 1,
        "only the old unreferenced blob goes: {r:?}"
    );
    assert!(!store.contains(&stray).expect("contains"));
    let img = Image {
        manifest: m,
        json: json.clone(),
        blobs: BTreeMap::from([
            (m, json),
            (common::sha256(&cfg), cfg),
            (common::sha256(&l1), l1),
            (common::sha256(&l2), l2),
        ]),
    };
    assert_complete(&store, &img);

    // Once the manifest is old too, all of it goes.
    std::thread::sleep(YOUNG_GRACE + Duration::from_millis(300));
    let r = run_gc(&store, &GcOptions::default().grace(YOUNG_GRACE));
    assert_eq!(r.removed_blobs, 4);
    assert_gone(&store, &img.digests());
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 4. Indexes.

#[test]
fn an_index_keeps_its_platform_manifests_and_goes_with_them_in_one_run() {
    for batch in [None, Some(1)] {
        let dir = common::tempdir();
        let root = dir.path();
        let store = common::open_with(root, small_opts());
        let shared = vec![common::blob(70, 3 * KIB)];
        let amd = put_image(&store, 71, &shared, &[KIB, 75 * KIB]);
        let arm = put_image(&store, 72, &shared, &[2 * KIB]);
        let idx_json = index_json(&[(&amd.json, "amd64"), (&arm.json, "arm64")]);
        let p = store
            .put_manifest(&idx_json, PutOptions::default())
            .expect("put index");
        assert_eq!(p.kind, Kind::Index);
        let idx = p.descriptor.digest;
        store.tag("example.com/multi:1", &idx).expect("tag index");
        let junk = common::put_kind(&store, &common::blob(73, 200), Kind::Other);
        let mut all: BTreeSet<Digest> = amd.digests();
        all.extend(arm.digests());
        all.insert(idx);
        assert_eq!(
            all.len(),
            1 + 2 + 2 + 4,
            "index, manifests, configs, layers"
        );
        assert_eq!(reach(&store, &idx), all);
        assert_eq!(store.counts(&amd.manifest).expect("counts"), (1, 0));
        assert_eq!(
            store.counts(&common::sha256(&shared[0])).expect("counts"),
            (2, 0)
        );

        let r = gc0(&store);
        assert_eq!(r.removed_blobs, 1, "only the loose blob");
        assert!(!store.contains(&junk).expect("contains"));
        assert_complete(&store, &amd);
        assert_complete(&store, &arm);
        assert_intact(&store, &idx, "tagged index");

        store
            .remove_image("example.com/multi:1", false)
            .expect("untag");
        let before = listing(&store);
        let mut opts = zero();
        if let Some(b) = batch {
            opts.batch = b;
        }
        settle();
        let r = run_gc(&store, &opts);
        assert_eq!(
            r.removed_blobs,
            all.len() as u64,
            "one run frees the whole index (batch {batch:?})"
        );
        assert_eq!(r.removed_by_kind, by_kind(&before, &all));
        let kinds: Vec<(&str, u64)> = r
            .removed_by_kind
            .iter()
            .map(|(k, s)| (k.as_str(), s.blobs))
            .collect();
        assert_eq!(
            kinds,
            vec![("config", 2), ("index", 1), ("layer", 4), ("manifest", 2)]
        );
        assert_gone(&store, &all);
        assert_eq!(store.info().expect("info").blobs, 0);
        assert!(
            common::large_files(root).is_empty(),
            "the large layer's file is gone"
        );
        assert_consistent(&store);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Writers between the mark and the sweep.

#[test]
fn writes_between_mark_and_sweep_keep_what_they_reference() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    // A dead image whose layer `l` a new push will reuse inside the window.
    let l = common::blob(80, 4 * KIB);
    let l_d = common::sha256(&l);
    let dead = put_image(&store, 81, std::slice::from_ref(&l), &[KIB]);
    // A dead image that gets tagged inside the window.
    let revived = put_image(&store, 82, &[], &[2 * KIB, 70 * KIB]);
    // Loose blobs: leased, re-put and `ensure`d inside the window; one stays garbage.
    let leased = common::put_kind(&store, &common::blob(83, 300), Kind::Other);
    let reput_bytes = common::blob(84, 300);
    let reput = common::put_kind(&store, &reput_bytes, Kind::Other);
    let ensured = common::put_kind(&store, &common::blob(85, 300), Kind::Other);
    let junk = common::put_kind(&store, &common::blob(86, 300), Kind::Other);
    let before = stored(&store);
    assert_eq!(store.counts(&l_d).expect("counts"), (1, 0));

    let new_cfg = config_json(87);
    let new_json = manifest_json(media::OCI_CONFIG, &new_cfg, &[&l], None);
    let new_m = common::sha256(&new_json);
    let mut lease_id = String::new();
    let mut ran = false;
    settle();
    let r = store
        .gc_with(&zero(), &AtomicBool::new(false), &mut || {
            ran = true;
            // The layer is a candidate, but still stored: a push may reuse it.
            assert!(store.contains(&l_d).expect("contains"));
            common::put_kind(&store, &new_cfg, Kind::Config);
            assert_eq!(
                put_manifest(&store, &new_json, PutOptions::default()),
                new_m
            );
            store.tag("example.com/new:1", &new_m).expect("tag new");
            store
                .tag("example.com/revived:1", &revived.manifest)
                .expect("tag a candidate");
            lease_id = store.lease_create(None).expect("lease").id;
            store.lease_add(&lease_id, &[leased]).expect("lease add");
            store.put(&reput_bytes).expect("re-put");
            assert!(store.ensure(&ensured).expect("ensure"));
        })
        .expect("gc");
    assert!(ran, "gc_with runs the closure");

    let dead_only: BTreeSet<Digest> = dead.digests().into_iter().filter(|d| *d != l_d).collect();
    let mut expect_gone = dead_only.clone();
    expect_gone.insert(junk);
    let after = stored(&store);
    let gone: BTreeSet<Digest> = before.difference(&after).copied().collect();
    assert_eq!(
        gone, expect_gone,
        "only the dead image (without l) and the junk go"
    );
    assert_eq!(r.removed_blobs, 4);
    // l, the revived image's manifest, and the leased, re-put and ensured blobs were
    // candidates that the re-check found live. (The revived image's config and layers
    // are never offered: they are live through their kept parent.)
    assert_eq!(r.kept_live, 5, "{r:?}");
    assert_intact(&store, &l_d, "reused layer");
    assert_intact(&store, &new_m, "new manifest");
    assert_complete(&store, &revived);
    for d in [leased, reput, ensured] {
        assert_intact(&store, &d, "touched or leased in the window");
    }
    assert_eq!(
        store.counts(&l_d).expect("counts"),
        (1, 0),
        "only the new manifest"
    );
    assert_eq!(store.counts(&new_m).expect("counts"), (0, 1));
    assert_eq!(
        store.counts(&common::sha256(&new_cfg)).expect("counts"),
        (1, 0)
    );
    assert_eq!(store.counts(&revived.manifest).expect("counts"), (0, 1));
    for c in revived.digests().iter().filter(|d| **d != revived.manifest) {
        assert_eq!(store.counts(c).expect("counts"), (1, 0));
    }
    assert_eq!(store.counts(&leased).expect("counts"), (0, 1));
    assert_eq!(store.children(&new_m).expect("children").len(), 2);
    assert_consistent(&store);

    // Once the window's roots go, everything goes in one run (the refcounts were right).
    store
        .remove_image("example.com/new:1", false)
        .expect("untag");
    store
        .remove_image("example.com/revived:1", false)
        .expect("untag");
    store.lease_remove(&lease_id).expect("lease rm");
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 2 + 1 + 4 + 3);
    assert_eq!(store.info().expect("info").blobs, 0);
}

// ---------------------------------------------------------------------------------------
// 6. Dry run.

#[test]
fn dry_run_reports_exactly_what_the_real_run_removes() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let base = vec![common::blob(90, 2 * KIB)];
    let tagged = put_image(&store, 91, &base, &[KIB, 80 * KIB]);
    store.tag("example.com/t:1", &tagged.manifest).expect("tag");
    let untagged = put_image(&store, 92, &base, &[2 * KIB, 90 * KIB]);
    let used = put_image(&store, 93, &[], &[KIB]);
    store
        .container_create(&used.manifest.to_string(), Some("c"))
        .expect("container by digest");
    let sig_kept = put_referrer(&store, &tagged, 94);
    let sig_gone = put_referrer(&store, &untagged, 95);
    // An untagged index over the tagged image: the index goes, the manifest stays.
    let idx = put_manifest(
        &store,
        &index_json(&[(&tagged.json, "amd64")]),
        PutOptions::default(),
    );
    let lease = store.lease_create(None).expect("lease");
    let leased = common::put_kind(&store, &common::blob(96, KIB), Kind::Other);
    store.lease_add(&lease.id, &[leased]).expect("lease add");
    let short = store
        .lease_create(Some(Duration::from_millis(50)))
        .expect("lease");
    let expiring = common::put_kind(&store, &common::blob(97, KIB), Kind::Other);
    store.lease_add(&short.id, &[expiring]).expect("lease add");
    let loose = store
        .put_many((0..20).map(|i| common::blob(1_000 + i, 200 + i as usize * 150)))
        .expect("put many");
    let orphan = root
        .join("large")
        .join("ab")
        .join(format!("sha256-ab{}.777", "cd".repeat(31)));
    std::fs::create_dir_all(orphan.parent().expect("parent")).expect("mkdir");
    std::fs::write(&orphan, b"orphan").expect("write orphan");
    while now_ms() <= short.expires_ms.expect("expiry") + 10 {
        std::thread::sleep(Duration::from_millis(10));
    }
    settle();

    let mut expect_gone: BTreeSet<Digest> = untagged
        .digests()
        .into_iter()
        .filter(|d| *d != common::sha256(&base[0]))
        .collect();
    expect_gone.insert(sig_gone.manifest);
    expect_gone.insert(common::sha256(&common::blob(95, 300)));
    expect_gone.insert(idx);
    expect_gone.insert(expiring);
    expect_gone.extend(loose.iter().map(|d| d.digest));
    assert_eq!(expect_gone.len(), 4 + 2 + 1 + 1 + 20);

    let opts = zero().orphan_age(Duration::ZERO);
    let before = listing(&store);
    let info = store.info().expect("info");
    let all_leases = store.leases().expect("leases");
    let names = store.names().expect("names");
    let packs = common::pack_files(root);
    let large = common::large_files(root);

    let dry = run_gc(&store, &opts.clone().dry_run(true));
    assert!(dry.dry_run);
    let dry_set: BTreeSet<Digest> = dry.removed.iter().copied().collect();
    assert_eq!(dry_set.len(), dry.removed.len(), "no digest listed twice");
    assert_eq!(dry.removed_blobs, dry.removed.len() as u64);
    assert_eq!(dry.expired_leases, vec![short.id.clone()]);
    // Nothing changed: blobs (with touch times), counters, leases, names, files.
    assert_eq!(listing(&store), before, "dry run changed the index");
    assert_eq!(store.info().expect("info"), info, "dry run changed info()");
    assert_eq!(
        store.leases().expect("leases"),
        all_leases,
        "dry run dropped a lease"
    );
    assert_eq!(store.names().expect("names"), names);
    assert_eq!(common::pack_files(root), packs, "dry run touched segments");
    assert_eq!(
        common::large_files(root),
        large,
        "dry run touched large files"
    );
    assert!(orphan.exists());

    let real = run_gc(&store, &opts);
    let after = stored(&store);
    let gone: BTreeSet<Digest> = before
        .keys()
        .filter(|d| !after.contains(d))
        .copied()
        .collect();
    assert_eq!(
        dry_set, gone,
        "the dry run's list is exactly what the real run removed"
    );
    assert_eq!(gone, expect_gone);
    assert!(!real.dry_run);
    assert!(real.removed.is_empty());
    assert_eq!(real.removed_blobs, dry.removed_blobs);
    assert_eq!(real.removed_bytes, dry.removed_bytes);
    assert_eq!(real.removed_bytes, bytes_of(&before, &gone));
    assert_eq!(real.removed_by_kind, dry.removed_by_kind);
    assert_eq!(real.removed_by_kind, by_kind(&before, &gone));
    assert_eq!(real.expired_leases, dry.expired_leases);
    assert_eq!(real.kept_for_containers, dry.kept_for_containers);
    assert_eq!(real.kept_for_containers, vec![used.manifest]);
    assert!(real.orphans_removed >= 1 && !orphan.exists());
    assert_complete(&store, &tagged);
    assert_complete(&store, &used);
    assert_complete(&store, &sig_kept);
    assert_intact(&store, &leased, "leased");
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 7. Compaction.

#[test]
fn compaction_reclaims_dead_segments_under_live_readers() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open_with(&root, small_opts());
    // 60 images of 6 small layers; all layers in one batch (one shard), so they fill
    // consecutive sealed 64 KiB segments.
    let layers: Vec<Vec<Vec<u8>>> = (0..60u64)
        .map(|i| {
            (0..6u64)
                .map(|j| {
                    common::blob(
                        2_000 + i * 10 + j,
                        900 + ((i * 7 + j * 13) % 10) as usize * 100,
                    )
                })
                .collect()
        })
        .collect();
    store.put_many(layers.iter().flatten()).expect("put layers");
    let mut images = Vec::new();
    for (i, ls) in layers.iter().enumerate() {
        let img = image_over(&store, 3_000 + i as u64, ls);
        store
            .tag(&format!("example.com/c:{i}"), &img.manifest)
            .expect("tag");
        images.push(img);
    }
    let sealed_before = store.info().expect("info").sealed_segments;
    assert!(sealed_before >= 5, "{sealed_before} sealed segments");
    let keep: Vec<&Image> = images.iter().step_by(10).collect();
    for i in (0..60).filter(|i| i % 10 != 0) {
        store
            .remove_image(&format!("example.com/c:{i}"), false)
            .expect("untag");
    }
    let mut kept_blobs: BTreeMap<Digest, Vec<u8>> = BTreeMap::new();
    for img in &keep {
        kept_blobs.extend(img.blobs.clone());
    }

    // Sweep only: dead records stay in their segments.
    settle();
    let packs_before = common::pack_files(&root);
    let r = run_gc(&store, &zero().compact_threshold(2.0));
    assert_eq!(r.removed_blobs, 54 * 8);
    assert_eq!(r.segments_compacted, 0);
    assert_eq!(
        common::pack_files(&root),
        packs_before,
        "no compaction above 100 %"
    );
    let dead_before = store.info().expect("info").dead_bytes;
    assert!(dead_before > 0);
    common::assert_listing(&store, &kept_blobs);

    // Predict compaction from the files: a sealed segment (not the newest of its shard)
    // whose dead records are at least half its body.
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut in_segment: BTreeMap<u64, Vec<Digest>> = BTreeMap::new();
    for (d, i) in listing(&store) {
        if let Location::Packed { segment, .. } = i.location {
            *live.entry(segment).or_default() += RECORD_HEADER + i.size;
            in_segment.entry(segment).or_default().push(d);
        }
    }
    let newest: BTreeSet<PathBuf> = common::newest_pack_per_shard(&root)
        .into_values()
        .map(|(p, _)| p)
        .collect();
    let mut dead_total = 0;
    let mut expect_compacted: BTreeSet<PathBuf> = BTreeSet::new();
    let mut dead_left = 0;
    for (p, len) in &packs_before {
        let id = common::segment_id(p);
        let body = len - SEGMENT_HEADER;
        let dead = body - live.get(&id).copied().unwrap_or(0);
        dead_total += dead;
        if !newest.contains(p) && dead > 0 && 2 * dead >= body {
            expect_compacted.insert(p.clone());
        } else {
            dead_left += dead;
        }
    }
    assert_eq!(
        dead_total, dead_before,
        "dead_bytes counts exactly the dead records"
    );
    assert!(expect_compacted.len() >= 3, "{expect_compacted:?}");
    // Hold blobs read (mapped) from segments about to be compacted.
    let mut held = Vec::new();
    for p in &expect_compacted {
        let id = common::segment_id(p);
        for d in in_segment.get(&id).into_iter().flatten() {
            let b = store.get(d).expect("get before compaction");
            assert!(
                b.is_mapped(),
                "a sealed segment is read through its mapping"
            );
            held.push((*d, id, b));
        }
    }
    assert!(
        !held.is_empty(),
        "some live blob sits in a segment that gets compacted"
    );
    // And a read snapshot opened before the compaction, still pointing at the old records.
    let snap = store.snapshot().expect("snapshot");

    // An active segment that is still mostly dead once the sealed ones' live records were
    // copied is compacted too (sealed first): it may join the expected ones.
    let active_candidates: BTreeSet<PathBuf> = packs_before
        .iter()
        .filter(|(p, len)| {
            let body = *len - SEGMENT_HEADER;
            let dead = body - live.get(&common::segment_id(p)).copied().unwrap_or(0);
            newest.contains(*p) && dead > 0 && 2 * dead >= body
        })
        .map(|(p, _)| p.clone())
        .collect();
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 0);
    assert!(r.compacted_bytes > 0);
    let packs_after = common::pack_files(&root);
    let vanished: BTreeSet<PathBuf> = packs_before
        .keys()
        .filter(|p| !packs_after.contains_key(*p))
        .cloned()
        .collect();
    assert_eq!(r.segments_compacted, vanished.len() as u64);
    assert!(
        vanished.is_superset(&expect_compacted),
        "every mostly-dead sealed segment is compacted: {vanished:?}"
    );
    assert!(
        vanished
            .difference(&expect_compacted)
            .all(|p| active_candidates.contains(p)),
        "exactly the compacted segment files are unlinked: {vanished:?}"
    );
    let info = store.info().expect("info");
    assert!(info.dead_bytes < dead_before);
    assert!(
        info.dead_bytes <= dead_left,
        "dead bytes of the uncompacted segments remain, at most"
    );
    let dead_left = info.dead_bytes;
    assert!(
        packs_after.values().sum::<u64>() < packs_before.values().sum::<u64>(),
        "segment files shrank on disk"
    );
    for (d, old, b) in &held {
        assert_eq!(
            common::sha256(b),
            *d,
            "a blob read before compaction still reads"
        );
        assert!(**b == *kept_blobs[d]);
        match store.stat(d).expect("stat").expect("stored").location {
            Location::Packed { segment, .. } => assert_ne!(segment, *old, "{d} moved"),
            Location::Large { .. } => panic!("{d} became a large file"),
        }
    }
    for (d, old, _) in &held {
        match snap
            .stat(d)
            .expect("old snapshot stat")
            .expect("stored")
            .location
        {
            Location::Packed { segment, .. } => assert_eq!(segment, *old, "the old view"),
            Location::Large { .. } => panic!("{d} was packed"),
        }
        let b = snap
            .get(d)
            .unwrap_or_else(|e| panic!("old snapshot reads {d} after its segment went: {e:?}"));
        assert!(*b == *kept_blobs[d], "old snapshot bytes of {d}");
    }
    drop(snap);
    common::assert_all_readable(&store, &kept_blobs);
    common::assert_listing(&store, &kept_blobs);
    assert_consistent(&store);
    for img in &keep {
        assert_complete(&store, img);
    }
    drop(held);
    drop(store);

    let store = common::open_with(&root, small_opts());
    common::assert_all_readable(&store, &kept_blobs);
    common::assert_listing(&store, &kept_blobs);
    assert_consistent(&store);
    assert_eq!(store.info().expect("info").dead_bytes, dead_left);
    // A later collection has nothing to compact, and puts still work.
    let r = gc0(&store);
    assert_eq!((r.removed_blobs, r.segments_compacted), (0, 0));
    let d = store
        .put(&common::blob(4_000, 5 * KIB))
        .expect("put")
        .digest;
    assert_intact(&store, &d, "put after compaction");
}

// ---------------------------------------------------------------------------------------
// 8. Orphan files.

#[test]
fn orphan_large_files_and_stale_ingests_go_after_the_orphan_age() {
    let dir = common::tempdir();
    let root = dir.path();
    let store = common::open_with(root, small_opts());
    let img = put_image(&store, 100, &[], &[90 * KIB]);
    store.tag("example.com/o:1", &img.manifest).expect("tag");
    let big = common::sha256(&common::blob(100_000, 90 * KIB));
    let live_file = large_files_of(root, &big);
    assert_eq!(live_file.len(), 1);
    // A large file no entry names.
    let orphan = root
        .join("large")
        .join("ab")
        .join(format!("sha256-ab{}.12345", "cd".repeat(31)));
    std::fs::create_dir_all(orphan.parent().expect("parent")).expect("mkdir");
    std::fs::write(&orphan, common::blob(101, 2 * KIB)).expect("write orphan");
    // Another generation of a stored digest: the entry names only its own generation.
    let name = live_file[0]
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    let (stem, generation) = name.rsplit_once('.').expect("gen");
    let generation: u64 = generation.parse().expect("gen number");
    let stale_gen = live_file[0].with_file_name(format!("{stem}.{}", generation + 1_000));
    std::fs::write(&stale_gen, b"stale generation").expect("write");
    // An abandoned directory under ingest/, a suspended ingest, and one in progress.
    let junk_ingest = root.join("ingest").join("abandoned");
    std::fs::create_dir_all(&junk_ingest).expect("mkdir");
    std::fs::write(junk_ingest.join("data"), b"partial").expect("write");
    let mut suspended = store
        .ingest("push-1", PutOptions::default())
        .expect("ingest");
    suspended
        .write_all(&common::blob(102, 10 * KIB))
        .expect("write");
    suspended.suspend().expect("suspend");
    let suspended_dir = common::ingest_dir(root, "push-1");
    assert!(suspended_dir.exists());
    let live_bytes = common::blob(103, 20 * KIB);
    let mut live = store
        .ingest("push-2", PutOptions::default())
        .expect("ingest");
    live.write_all(&live_bytes[..10 * KIB]).expect("write");
    live.sync().expect("sync");
    let live_dir = common::ingest_dir(root, "push-2");
    assert!(live_dir.exists());

    // Default orphan age (a day): everything stays.
    let r = run_gc(&store, &GcOptions::default());
    assert_eq!((r.removed_blobs, r.orphans_removed), (0, 0));
    for p in [&orphan, &stale_gen, &junk_ingest, &suspended_dir, &live_dir] {
        assert!(
            p.exists(),
            "{} removed under the default orphan age",
            p.display()
        );
    }

    // Backdated past an hour: those two go with an age of one hour, the fresh ones stay.
    let old = SystemTime::now() - Duration::from_secs(2 * 3600);
    set_mtime(&orphan, old);
    set_mtime(&junk_ingest.join("data"), old);
    set_mtime(&junk_ingest, old);
    let r = run_gc(
        &store,
        &GcOptions::default().orphan_age(Duration::from_secs(3600)),
    );
    assert_eq!(r.orphans_removed, 2, "{r:?}");
    assert!(!orphan.exists() && !junk_ingest.exists());
    for p in [&stale_gen, &suspended_dir, &live_dir] {
        assert!(p.exists(), "{} is younger than an hour", p.display());
    }

    // Age zero: the stale generation and the suspended ingest go; the indexed file and the
    // ingest this process is writing stay.
    let r = run_gc(&store, &GcOptions::default().orphan_age(Duration::ZERO));
    assert_eq!(r.orphans_removed, 2, "{r:?}");
    assert_eq!(r.removed_blobs, 0);
    assert!(!stale_gen.exists() && !suspended_dir.exists());
    assert!(
        store
            .ingests()
            .expect("ingests")
            .iter()
            .all(|(r, _)| r != "push-1")
    );
    assert!(
        live_file[0].exists(),
        "an indexed large file is never an orphan"
    );
    assert!(live_dir.exists(), "an ingest in progress is not stale");
    assert_complete(&store, &img);
    live.write_all(&live_bytes[10 * KIB..]).expect("write rest");
    let d = live.commit().expect("commit after gc");
    assert_eq!(d.digest, common::sha256(&live_bytes));
    assert_intact(&store, &d.digest, "ingest that outlived a gc");
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 9. Referrers.

#[test]
fn referrers_live_with_their_subject_unless_dropped() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let subject = put_image(&store, 110, &[], &[KIB, 2 * KIB]);
    store
        .tag("example.com/s:1", &subject.manifest)
        .expect("tag");
    let sig = put_referrer(&store, &subject, 111);
    assert_eq!(
        store.referrers(&subject.manifest).expect("referrers"),
        vec![sig.manifest]
    );
    // A referrer stored before its subject hangs off it once the subject arrives.
    let cfg2 = config_json(112);
    let l2 = common::blob(113, KIB);
    let json2 = manifest_json(media::OCI_CONFIG, &cfg2, &[&l2], None);
    let early_subject = Image {
        manifest: common::sha256(&json2),
        json: json2.clone(),
        blobs: BTreeMap::new(),
    };
    let early = put_referrer(&store, &early_subject, 114);
    let subject2 = put_parts(
        &store,
        media::OCI_CONFIG,
        &cfg2,
        &[&l2],
        None,
        PutOptions::default(),
    );
    store
        .tag("example.com/s:2", &subject2.manifest)
        .expect("tag");
    assert_eq!(
        store.referrers(&subject2.manifest).expect("referrers"),
        vec![early.manifest]
    );
    // A referrer of a dead image goes with it.
    let dead = put_image(&store, 115, &[], &[KIB]);
    let dead_sig = put_referrer(&store, &dead, 116);

    let r = gc0(&store);
    let mut expect = dead.digests();
    expect.insert(dead_sig.manifest);
    expect.insert(common::sha256(&common::blob(116, 300)));
    assert_eq!(r.removed_blobs, expect.len() as u64, "{r:?}");
    assert_gone(&store, &expect);
    assert_complete(&store, &subject);
    assert_complete(&store, &subject2);
    assert_complete(&store, &sig);
    assert_complete(&store, &early);

    // Dropping referrers: both signatures and their payloads go (the shared empty config
    // with them), the subjects stay.
    settle();
    let r = run_gc(&store, &zero().drop_referrers(true));
    let dropped: BTreeSet<Digest> = sig.digests().union(&early.digests()).copied().collect();
    assert_eq!(
        dropped.len(),
        5,
        "two referrers, two payloads, one shared empty config"
    );
    assert_eq!(r.removed_blobs, 5, "{r:?}");
    assert_gone(&store, &dropped);
    assert_complete(&store, &subject);
    assert_complete(&store, &subject2);
    assert!(
        store
            .referrers(&subject.manifest)
            .expect("referrers")
            .is_empty()
    );
    assert!(
        store
            .referrers(&subject2.manifest)
            .expect("referrers")
            .is_empty()
    );
    assert_eq!(store.counts(&subject.manifest).expect("counts"), (0, 1));
    assert_consistent(&store);

    // A referrer put again after being dropped hangs off its (live) subject again.
    let again = put_referrer(&store, &subject, 111);
    assert_eq!(again.manifest, sig.manifest);
    assert_eq!(
        store.referrers(&subject.manifest).expect("referrers"),
        vec![sig.manifest]
    );
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, 0);
    assert_complete(&store, &again);
}

/// `kept_live` counts candidates a writer revived; with no writer it must be zero, even
/// when a dead child is offered before its dead parent (a referrer whose digest sorts
/// before its subject's, an index nested in an index).
#[test]
fn kept_live_is_zero_without_concurrent_writers() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let subject = put_image(&store, 120, &[], &[KIB]);
    // A referrer whose digest sorts before its subject's: the sweep meets it first.
    let sig = (121..10_000)
        .map(|seed| {
            let payload = common::blob(seed, 300);
            let json = manifest_json(EMPTY_TYPE, b"{}", &[&payload], Some(&subject.json));
            (seed, common::sha256(&json))
        })
        .find(|(_, d)| *d < subject.manifest)
        .map(|(seed, _)| put_referrer(&store, &subject, seed))
        .expect("some seed sorts first");
    assert!(sig.manifest < subject.manifest);
    // An index inside an index, the inner one sorting first.
    let m2 = put_image(&store, 130, &[], &[KIB]);
    let (inner, outer) = (0..10_000)
        .map(|n| {
            let arch = format!("arch{n}");
            let inner = index_json(&[(&m2.json, arch.as_str())]);
            let d = common::sha256(&inner);
            let outer_json = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_INDEX,
                "manifests": [desc(media::OCI_INDEX, &inner)],
            }))
            .expect("json");
            (inner, d, outer_json)
        })
        .find(|(_, d, outer)| *d < common::sha256(outer))
        .map(|(inner, _, outer)| (inner, outer))
        .expect("some nesting sorts inner first");
    let inner_d = put_manifest(&store, &inner, PutOptions::default());
    let outer_d = put_manifest(&store, &outer, PutOptions::default());
    assert_eq!(store.counts(&inner_d).expect("counts"), (1, 0));

    let expect = subject.digests().len() + sig.digests().len() + 2 + m2.digests().len();
    let r = gc0(&store);
    assert_eq!(
        r.removed_blobs, expect as u64,
        "everything is garbage: {r:?}"
    );
    assert_eq!(store.info().expect("info").blobs, 0);
    assert!(!store.contains(&outer_d).expect("contains"));
    assert_eq!(
        r.kept_live, 0,
        "no writer ran, yet the report says candidates were made live again: {r:?}"
    );
}

/// An interrupt, before the mark or between the mark and the sweep, stops the collection
/// with `Interrupted` before it deletes anything; the next collection does the work.
#[test]
fn an_interrupted_collection_deletes_nothing() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let img = put_image(&store, 125, &[], &[KIB, 70 * KIB]);
    let junk = common::put_kind(&store, &common::blob(126, 100), Kind::Other);
    settle();
    let before = listing(&store);
    let stop = AtomicBool::new(true);
    assert!(matches!(store.gc(&zero(), &stop), Err(Error::Interrupted)));
    assert_eq!(listing(&store), before);
    let stop = AtomicBool::new(false);
    let r = store.gc_with(&zero(), &stop, &mut || {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert_eq!(listing(&store), before, "nothing swept after the interrupt");
    assert_complete(&store, &img);
    let r = gc0(&store);
    assert_eq!(r.removed_blobs, img.blobs.len() as u64 + 1);
    assert!(!store.contains(&junk).expect("contains"));
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------
// 10. SIGKILL during `store gc`.

/// What a store built by [`build_kill_template`] must keep.
struct Live {
    names: Vec<(String, Digest)>,
    /// Every blob the roots reach, with its bytes.
    blobs: BTreeMap<Digest, Vec<u8>>,
    /// What each name reaches.
    images: BTreeMap<Digest, BTreeSet<Digest>>,
}

fn build_kill_template(root: &Path) -> Live {
    let store = common::open_with(root, small_opts());
    let bases: Vec<Vec<u8>> = (0..4u64)
        .map(|i| common::blob(9_000 + i, 2 * KIB + i as usize * 100))
        .collect();
    let mut images = Vec::new();
    for i in 0..120u64 {
        let mut layers = vec![bases[(i % 4) as usize].clone()];
        layers.extend((0..5u64).map(|j| {
            common::blob(
                10_000 + i * 10 + j,
                300 + ((i * 7 + j * 13) % 30) as usize * 100,
            )
        }));
        if i % 4 == 0 {
            layers.push(common::blob(20_000 + i, 70 * KIB + i as usize));
        }
        store.put_many(&layers).expect("put layers");
        images.push(image_over(&store, 30_000 + i, &layers));
    }
    store
        .put_many((0..300u64).map(|i| common::blob(40_000 + i, 100 + (i as usize % 40) * 50)))
        .expect("loose blobs");
    for (i, img) in images.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        store
            .tag(&format!("example.com/k:{i}"), &img.manifest)
            .expect("tag");
    }
    store
        .container_create(&images[1].manifest.to_string(), Some("c1"))
        .expect("container");
    let lease = store.lease_create(None).expect("lease");
    store
        .lease_add(&lease.id, &[images[2].manifest])
        .expect("lease add");
    let mut live = Live {
        names: store.names().expect("names"),
        blobs: BTreeMap::new(),
        images: BTreeMap::new(),
    };
    for (i, img) in images.iter().enumerate() {
        if i % 5 == 0 || i == 1 || i == 2 {
            live.blobs.extend(img.blobs.clone());
            live.images.insert(img.manifest, img.digests());
        }
    }
    live
}

/// After a kill: the store opens, named images are complete, listed blobs are intact and
/// counted, and a second collection completes and leaves exactly the live set.
fn check_after_kill(root: &Path, live: &Live, ctx: &str) {
    let store = common::open_when_unlocked(root, &Options::default());
    assert_eq!(store.names().expect("names"), live.names, "{ctx}: names");
    for (_, d) in &live.names {
        let want = &live.images[d];
        assert_eq!(&reach(&store, d), want, "{ctx}: edges of {d}");
        for b in want {
            assert_intact(&store, b, ctx);
        }
    }
    for d in live.blobs.keys() {
        assert_intact(&store, d, ctx);
    }
    assert_consistent(&store);
    let r = store
        .gc(&zero().orphan_age(Duration::ZERO), &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("{ctx}: second gc failed: {e:?}"));
    let left = stored(&store);
    let want: BTreeSet<Digest> = live.blobs.keys().copied().collect();
    assert_eq!(
        left, want,
        "{ctx}: after the second gc exactly the live blobs remain ({r:?})"
    );
    common::assert_all_readable(&store, &live.blobs);
    assert_consistent(&store);
    // No file is left that the index does not name.
    let mut indexed_large = BTreeSet::new();
    let mut segments = BTreeSet::new();
    for (d, i) in listing(&store) {
        match i.location {
            Location::Large { generation } => {
                indexed_large.insert(
                    root.join("large")
                        .join(format!("{:02x}", d.hash()[0]))
                        .join(format!("{}-{}.{generation}", d.algorithm(), d.hex())),
                );
            }
            Location::Packed { segment, .. } => {
                segments.insert(segment);
            }
        }
    }
    let on_disk: BTreeSet<PathBuf> = common::large_files(root).into_keys().collect();
    assert_eq!(
        on_disk, indexed_large,
        "{ctx}: large files on disk vs the index"
    );
    let packs: BTreeSet<u64> = common::pack_files(root)
        .keys()
        .map(|p| common::segment_id(p))
        .collect();
    assert!(
        segments.is_subset(&packs),
        "{ctx}: a segment the index names is missing"
    );
    drop(store);
    let store = common::open(root);
    assert_consistent(&store);
}

/// Runs `store gc --grace 0s` on a copy of `template` to completion; returns its report
/// and how long it took.
fn full_cli_gc(template: &Path, scratch: &Path) -> (Value, Duration) {
    common::copy_dir(template, scratch);
    let t = Instant::now();
    let out = common::cli(scratch, &["gc", "--grace", "0s", "--json"]);
    let took = t.elapsed();
    let v: Value = serde_json::from_str(&common::ok_stdout(&out)).expect("gc --json");
    (v, took)
}

#[test]
fn sigkill_during_cli_gc_keeps_the_store_consistent() {
    const KILLS: usize = 8;
    let dir = common::tempdir();
    let sweep_tpl = dir.path().join("template-sweep");
    let live = build_kill_template(&sweep_tpl);
    // A second template where the sweep already ran (without compacting): `store gc` then
    // only compacts.
    let compact_tpl = dir.path().join("template-compact");
    common::copy_dir(&sweep_tpl, &compact_tpl);
    {
        let store = common::open(&compact_tpl);
        settle();
        let r = run_gc(&store, &zero().compact_threshold(2.0));
        assert!(r.removed_blobs > 0 && r.segments_compacted == 0);
        assert!(store.info().expect("info").dead_bytes > 0);
    }

    let mut rng = common::rng(0x6c5);
    for (label, tpl) in [("sweep", &sweep_tpl), ("compact", &compact_tpl)] {
        let (report, took) = full_cli_gc(tpl, &dir.path().join(format!("full-{label}")));
        assert!(
            report["segments_compacted"]
                .as_u64()
                .expect("segments_compacted")
                > 0,
            "{label}: the full run compacts: {report}"
        );
        if label == "compact" {
            assert_eq!(report["removed_blobs"], 0, "{report}");
        }
        check_after_kill(&dir.path().join(format!("full-{label}")), &live, label);

        let max_ms = took.as_millis().max(10) as u64;
        let mut mid_run = 0;
        for k in 0..KILLS {
            let delay = rng.random_range(0..=max_ms);
            let run = dir.path().join(format!("{label}-{k}"));
            common::copy_dir(tpl, &run);
            let mut child = common::store_cmd(&run)
                .args(["gc", "--grace", "0s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn store gc");
            std::thread::sleep(Duration::from_millis(delay));
            let running = child.try_wait().expect("try_wait").is_none();
            // Our own child, by its pid: SIGKILL.
            child.kill().expect("kill store gc");
            child.wait().expect("wait for store gc");
            mid_run += usize::from(running);
            let ctx = format!("{label} run {k}, killed after {delay} ms (of ~{max_ms} ms)");
            check_after_kill(&run, &live, &ctx);
            std::fs::remove_dir_all(&run).expect("remove run copy");
        }
        eprintln!(
            "{label}: a full `store gc` took {max_ms} ms; {mid_run} of {KILLS} kills landed mid-run"
        );
        assert!(mid_run > 0, "{label}: no kill landed while gc was running");
    }
}

// ---------------------------------------------------------------------------------------
// 11. A property test against a model of the roots.

#[derive(Clone, Debug)]
enum Step {
    Blob {
        seed: u8,
        large: bool,
    },
    Manifest {
        config: usize,
        layers: Vec<usize>,
        lease: Option<u8>,
    },
    Index {
        manifests: Vec<usize>,
    },
    Tag {
        name: u8,
        image: usize,
    },
    Untag {
        name: u8,
        force: bool,
    },
    Container {
        image: usize,
    },
    ContainerRm {
        which: usize,
    },
    LeaseAdd {
        lease: u8,
        target: usize,
    },
    LeaseRm {
        lease: u8,
    },
    Gc,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0u8..16, prop::bool::weighted(0.15))
            .prop_map(|(seed, large)| Step::Blob { seed, large }),
        3 => (
            any::<usize>(),
            prop::collection::vec(any::<usize>(), 1..4),
            prop::option::weighted(0.25, 0u8..2),
        )
            .prop_map(|(config, layers, lease)| Step::Manifest { config, layers, lease }),
        1 => prop::collection::vec(any::<usize>(), 1..3)
            .prop_map(|manifests| Step::Index { manifests }),
        2 => (0u8..3, any::<usize>()).prop_map(|(name, image)| Step::Tag { name, image }),
        2 => (0u8..3, any::<bool>()).prop_map(|(name, force)| Step::Untag { name, force }),
        1 => any::<usize>().prop_map(|image| Step::Container { image }),
        1 => any::<usize>().prop_map(|which| Step::ContainerRm { which }),
        1 => (0u8..2, any::<usize>()).prop_map(|(lease, target)| Step::LeaseAdd { lease, target }),
        1 => (0u8..2).prop_map(|lease| Step::LeaseRm { lease }),
        2 => Just(Step::Gc),
    ]
}

/// What the store must hold: blobs with their children, and the roots.
#[derive(Default)]
struct Model {
    /// Stored blobs: bytes, kind, and distinct children.
    stored: BTreeMap<Digest, (Vec<u8>, Kind, BTreeSet<Digest>)>,
    /// Every digest ever stored (lease targets may be absent).
    seen: Vec<Digest>,
    names: BTreeMap<String, Digest>,
    /// (container id, image).
    containers: Vec<(String, Digest)>,
    /// slot -> (lease id, resources).
    leases: BTreeMap<u8, (String, BTreeSet<Digest>)>,
}

impl Model {
    fn of_kind(&self, pick: impl Fn(Kind) -> bool) -> Vec<Digest> {
        self.stored
            .iter()
            .filter(|(_, (_, k, _))| pick(*k))
            .map(|(d, _)| *d)
            .collect()
    }

    fn note(&mut self, d: Digest, bytes: Vec<u8>, kind: Kind, children: BTreeSet<Digest>) {
        if !self.seen.contains(&d) {
            self.seen.push(d);
        }
        self.stored.entry(d).or_insert((bytes, kind, children));
    }

    fn lease(&mut self, store: &Store, slot: u8) -> String {
        self.leases
            .entry(slot)
            .or_insert_with(|| {
                let id = store.lease_create(None).expect("lease").id;
                (id, BTreeSet::new())
            })
            .0
            .clone()
    }

    fn live(&self) -> BTreeSet<Digest> {
        let mut stack: Vec<Digest> = self.names.values().copied().collect();
        stack.extend(self.containers.iter().map(|(_, d)| *d));
        stack.extend(self.leases.values().flat_map(|(_, r)| r.iter().copied()));
        let mut seen = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if let Some((_, _, cs)) = self.stored.get(&d)
                && seen.insert(d)
            {
                stack.extend(cs.iter().copied());
            }
        }
        seen
    }

    /// The store holds exactly the model's blobs, intact, with the model's counts.
    fn check(&self, store: &Store, ctx: &str) {
        let want: BTreeSet<Digest> = self.stored.keys().copied().collect();
        assert_eq!(stored(store), want, "{ctx}: stored blobs");
        for (d, (bytes, _, _)) in &self.stored {
            let got = store
                .get(d)
                .unwrap_or_else(|e| panic!("{ctx}: get {d}: {e:?}"));
            assert!(*got == **bytes, "{ctx}: bytes of {d}");
            let parents = self
                .stored
                .values()
                .filter(|(_, _, cs)| cs.contains(d))
                .count() as u64;
            let holds = self.names.values().filter(|t| *t == d).count()
                + self.containers.iter().filter(|(_, t)| t == d).count()
                + self.leases.values().filter(|(_, r)| r.contains(d)).count();
            assert_eq!(
                store.counts(d).expect("counts"),
                (parents, holds as u64),
                "{ctx}: (refcount, holds) of {d}"
            );
        }
        assert_consistent(store);
    }
}

fn run_steps(steps: &[Step]) {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let mut m = Model::default();
    for (n, s) in steps.iter().enumerate() {
        let ctx = format!("step {n} {s:?}");
        match s {
            Step::Blob { seed, large } => {
                let len = if *large {
                    70 * KIB + usize::from(*seed)
                } else {
                    100 + usize::from(*seed) * 37
                };
                let bytes = common::blob(50_000 + u64::from(*seed) + u64::from(*large) * 100, len);
                let d = store.put(&bytes).expect("put").digest;
                m.note(d, bytes, Kind::Other, BTreeSet::new());
            }
            Step::Manifest {
                config,
                layers,
                lease,
            } => {
                let raw = m.of_kind(|k| k == Kind::Other);
                if raw.is_empty() {
                    continue;
                }
                let cfg = m.stored[&raw[config % raw.len()]].0.clone();
                let ls: Vec<Vec<u8>> = layers
                    .iter()
                    .map(|i| m.stored[&raw[i % raw.len()]].0.clone())
                    .collect();
                let refs: Vec<&[u8]> = ls.iter().map(Vec::as_slice).collect();
                let json = manifest_json(media::OCI_CONFIG, &cfg, &refs, None);
                let mut opts = PutOptions::default();
                let lease_id = lease.map(|slot| (slot, m.lease(&store, slot)));
                if let Some((_, id)) = &lease_id {
                    opts = opts.lease(id.clone());
                }
                let d = put_manifest(&store, &json, opts);
                let children: BTreeSet<Digest> = std::iter::once(&cfg)
                    .chain(&ls)
                    .map(|b| common::sha256(b))
                    .collect();
                m.note(d, json, Kind::Manifest, children);
                if let Some((slot, _)) = lease_id {
                    m.leases.get_mut(&slot).expect("lease").1.insert(d);
                }
            }
            Step::Index { manifests } => {
                let ms = m.of_kind(|k| k == Kind::Manifest);
                if ms.is_empty() {
                    continue;
                }
                let picked: Vec<Vec<u8>> = manifests
                    .iter()
                    .map(|i| m.stored[&ms[i % ms.len()]].0.clone())
                    .collect();
                let entries: Vec<(&[u8], &str)> =
                    picked.iter().map(|j| (j.as_slice(), "amd64")).collect();
                let json = index_json(&entries);
                let d = put_manifest(&store, &json, PutOptions::default());
                let children = picked.iter().map(|b| common::sha256(b)).collect();
                m.note(d, json, Kind::Index, children);
            }
            Step::Tag { name, image } => {
                let imgs = m.of_kind(|k| matches!(k, Kind::Manifest | Kind::Index));
                if imgs.is_empty() {
                    continue;
                }
                let d = imgs[image % imgs.len()];
                let name = format!("example.com/p:{name}");
                store.tag(&name, &d).expect("tag");
                m.names.insert(name, d);
            }
            Step::Untag { name, force } => {
                let name = format!("example.com/p:{name}");
                let r = store.remove_image(&name, *force);
                match m.names.get(&name).copied() {
                    None => assert!(
                        matches!(r, Err(Error::NameNotFound(_))),
                        "{ctx}: untag of an absent name: {r:?}"
                    ),
                    Some(d) => {
                        let last = m.names.values().filter(|t| **t == d).count() == 1;
                        let used = m.containers.iter().any(|(_, t)| *t == d);
                        if !force && last && used {
                            assert!(matches!(r, Err(Error::InUse { .. })), "{ctx}: {r:?}");
                        } else {
                            assert_eq!(r.expect("untag"), vec![(name.clone(), d)], "{ctx}");
                            m.names.remove(&name);
                        }
                    }
                }
            }
            Step::Container { image } => {
                let imgs = m.of_kind(|k| matches!(k, Kind::Manifest | Kind::Index));
                if imgs.is_empty() {
                    continue;
                }
                let d = imgs[image % imgs.len()];
                let c = store
                    .container_create(&d.to_string(), None)
                    .expect("container");
                m.containers.push((c.id, d));
            }
            Step::ContainerRm { which } => {
                if m.containers.is_empty() {
                    continue;
                }
                let (id, _) = m.containers.remove(which % m.containers.len());
                store.container_remove(&id).expect("container rm");
            }
            Step::LeaseAdd { lease, target } => {
                if m.seen.is_empty() {
                    continue;
                }
                let d = m.seen[target % m.seen.len()];
                let id = m.lease(&store, *lease);
                store.lease_add(&id, &[d]).expect("lease add");
                m.leases.get_mut(lease).expect("lease").1.insert(d);
            }
            Step::LeaseRm { lease } => {
                if let Some((id, _)) = m.leases.remove(lease) {
                    store.lease_remove(&id).expect("lease rm");
                }
            }
            Step::Gc => {
                let live = m.live();
                let dead: BTreeSet<Digest> = m
                    .stored
                    .keys()
                    .filter(|d| !live.contains(d))
                    .copied()
                    .collect();
                let r = gc0(&store);
                m.stored.retain(|d, _| live.contains(d));
                assert_eq!(r.removed_blobs, dead.len() as u64, "{ctx}: {r:?}");
                assert_gone(&store, &dead);
                m.check(&store, &ctx);
            }
        }
    }
    m.check(&store, "end");
    drop(store);
    let store = common::open_with(dir.path(), small_opts());
    m.check(&store, "after reopen");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// After every collection exactly the blobs no name, container or live lease reaches
    /// are gone, the rest read back intact, and refcounts and holds match the model.
    #[test]
    fn gc_removes_exactly_what_no_root_reaches(
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let mut steps = steps;
        steps.push(Step::Gc);
        run_steps(&steps);
    }
}

// ---------------------------------------------------------------------------------------
// 12. The command line.

#[test]
fn cli_gc_dry_run_json_image_prune_and_text() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let (a, b, c, junk) = {
        let store = common::open_with(&root, small_opts());
        let a = put_image(&store, 140, &[], &[KIB, 70 * KIB]);
        let b = put_image(&store, 141, &[], &[2 * KIB]);
        let c = put_image(&store, 142, &[], &[3 * KIB]);
        store.tag("example.com/a:1", &a.manifest).expect("tag");
        store.tag("example.com/b:1", &b.manifest).expect("tag");
        store
            .container_create("example.com/b:1", Some("web"))
            .expect("container");
        let junk = common::put_kind(&store, &common::blob(143, 500), Kind::Other);
        (a, b, c, junk)
    };
    settle();
    let mut size: BTreeMap<Digest, u64> = BTreeMap::from([(junk, 500)]);
    for img in [&a, &b, &c] {
        size.extend(img.blobs.iter().map(|(d, v)| (*d, v.len() as u64)));
    }
    let total = size.len();
    let sizes = |ds: &BTreeSet<Digest>| -> u64 { ds.iter().map(|d| size[d]).sum() };

    // The default grace (an hour) keeps everything just put.
    let text = common::ok_stdout(&common::cli(&root, &["gc"]));
    assert!(text.contains("removed 0 blobs"), "{text}");

    let mut garbage = c.digests();
    garbage.insert(junk);
    let v: Value = serde_json::from_str(&common::ok_stdout(&common::cli(
        &root,
        &["gc", "--dry-run", "--grace", "0s", "--json"],
    )))
    .expect("json");
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["removed_blobs"], garbage.len() as u64, "{v}");
    assert_eq!(v["removed_bytes"], sizes(&garbage), "{v}");
    let listed: BTreeSet<String> = v["removed"]
        .as_array()
        .expect("removed list")
        .iter()
        .map(|x| x.as_str().expect("digest string").to_owned())
        .collect();
    let want: BTreeSet<String> = garbage.iter().map(ToString::to_string).collect();
    assert_eq!(listed, want);
    let text = common::ok_stdout(&common::cli(&root, &["gc", "--dry-run", "--grace", "0s"]));
    assert!(
        text.contains(&format!("would remove {} blobs", garbage.len())),
        "{text}"
    );
    {
        let store = common::open(&root);
        assert_eq!(
            store.info().expect("info").blobs,
            total as u64,
            "a dry run removes nothing"
        );
    }

    // `image prune --all`: untags what no container uses, then collects.
    let v: Value = serde_json::from_str(&common::ok_stdout(&common::cli(
        &root,
        &["image", "prune", "--all", "--grace", "0s", "--json"],
    )))
    .expect("json");
    assert_eq!(v["untagged"], json!(["example.com/a:1"]), "{v}");
    let mut pruned = garbage.clone();
    pruned.extend(a.digests());
    assert_eq!(v["gc"]["removed_blobs"], pruned.len() as u64, "{v}");
    assert_eq!(v["gc"]["removed_bytes"], sizes(&pruned), "{v}");
    {
        let store = common::open(&root);
        assert_eq!(
            store.names().expect("names"),
            vec![("example.com/b:1".to_owned(), b.manifest)]
        );
        assert_eq!(stored(&store), b.digests());
        assert_complete(&store, &b);
        assert!(
            large_files_of(&root, &common::sha256(&common::blob(140_001, 70 * KIB))).is_empty()
        );
        // New garbage for the text report.
        let store_junk = store
            .put_many((0..3u64).map(|i| common::blob(144 + i, 100)))
            .expect("put");
        assert_eq!(store_junk.len(), 3);
    }
    settle();
    let text = common::ok_stdout(&common::cli(&root, &["gc", "--grace", "0s"]));
    assert!(text.contains("removed 3 blobs"), "{text}");
    assert!(text.contains("other"), "by-kind lines: {text}");
    assert!(!text.contains("would remove"), "{text}");
    let store = common::open(&root);
    assert_eq!(stored(&store), b.digests());
}

/// Collections racing a writer that pushes images the way a registry client does (under a
/// lease, released once the tag is set) — re-pushing images the collector may be deleting,
/// so parents come back while their children's decrements are still owed — and tags and
/// untags them: whatever the interleaving, every named image ends complete and, once a
/// last collection has settled, every reference count equals what the edges say.
#[test]
fn collections_racing_a_writer_leave_exact_counts_and_complete_images() {
    use layerstore::{Depth, VerifyOptions};
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), small_opts());
    let base = [common::blob(140, 2 * KIB)];
    let seeds: Vec<u64> = (141..165).collect();
    let push = |seed: u64| -> (Image, String) {
        let lease = store.lease_create(None).expect("lease").id;
        let with = |k: Kind| PutOptions::default().kind(k).lease(lease.clone());
        let own: Vec<Vec<u8>> = [KIB, 300]
            .iter()
            .enumerate()
            .map(|(i, &n)| common::blob(seed * 1_000 + i as u64, n))
            .collect();
        let layers: Vec<&[u8]> = base.iter().chain(&own).map(Vec::as_slice).collect();
        let mut blobs = BTreeMap::new();
        for l in &layers {
            let d = store
                .put_with(l, with(Kind::Layer))
                .expect("put layer")
                .digest;
            blobs.insert(d, l.to_vec());
        }
        let config = config_json(seed);
        let d = store
            .put_with(&config, with(Kind::Config))
            .expect("put config")
            .digest;
        blobs.insert(d, config.clone());
        let json = manifest_json(media::OCI_CONFIG, &config, &layers, None);
        let manifest = put_manifest(&store, &json, PutOptions::default().lease(lease.clone()));
        blobs.insert(manifest, json.clone());
        (
            Image {
                manifest,
                json,
                blobs,
            },
            lease,
        )
    };
    for &s in &seeds {
        let (_, lease) = push(s);
        store.lease_remove(&lease).expect("release");
    }
    let stop = AtomicBool::new(false);
    let named = std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            let mut rng = rand::rng();
            let mut named: BTreeMap<String, Image> = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 60 {
                i += 1;
                let seed = seeds[rng.random_range(0..seeds.len())];
                let name = format!("race/img{seed}:latest");
                if rng.random_bool(0.5) {
                    let (img, lease) = push(seed);
                    store.tag(&name, &img.manifest).expect("tag");
                    store.lease_remove(&lease).expect("release");
                    named.insert(name, img);
                } else if named.remove(&name).is_some() {
                    store.remove_image(&name, false).expect("rmi");
                }
            }
            named
        });
        let mut removed = 0;
        for _ in 0..12 {
            settle();
            removed += run_gc(&store, &zero()).removed_blobs;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            removed > 0,
            "the collections raced the writer without deleting"
        );
        writer.join().expect("writer")
    });
    settle();
    run_gc(&store, &zero());
    for img in named.values() {
        assert_complete(&store, img);
    }
    let report = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    let graph: Vec<_> = report
        .problems
        .iter()
        .filter(|p| ["refcount", "holds", "missing-child"].contains(&p.kind.name()))
        .collect();
    assert!(graph.is_empty(), "{graph:?}");
    // Exactly the named images (and nothing else) are left.
    let want: BTreeSet<Digest> = named.values().flat_map(Image::digests).collect();
    assert_eq!(stored(&store), want);
    assert_consistent(&store);
}
