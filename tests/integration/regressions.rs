//! Regression tests for the data-loss and robustness bugs found by an adversarial review
//! (the reliability issue's list, numbered as there). Each test fails on the code before
//! its fix: it asserts what a user relies on — nothing committed is lost, bad input gets a
//! clear error and changes nothing — not how the fix works.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use layerstore::backend::sim::{Fault, SimBackend, SimOp};
use layerstore::unpack::UnpackOptions;
use layerstore::{
    Depth, Digest, Error, GcOptions, ImportOptions, Kind, Location, Options, PutOptions, Store,
    VerifyOptions,
};
use serde_json::json;

use crate::common::{self, KIB, MIB};
use crate::oci::{self, Built, OCI_LAYER, OCI_MANIFEST};

fn no() -> AtomicBool {
    AtomicBool::new(false)
}

fn gc0() -> GcOptions {
    GcOptions::default().grace(Duration::ZERO)
}

fn deep(store: &Store) -> layerstore::VerifyReport {
    store
        .verify(&VerifyOptions::depth(Depth::Deep), &no(), &|_| {})
        .expect("verify runs")
}

/// Every regular file under the root's `packs/` and `large/`, with its bytes' sha256.
fn data_files(root: &Path) -> BTreeMap<PathBuf, Digest> {
    let mut out = BTreeMap::new();
    for dir in ["packs", "large"] {
        for p in common::files_under(&root.join(dir)).keys() {
            out.insert(p.clone(), common::sha256(&std::fs::read(p).expect("read")));
        }
    }
    out
}

/// A store with packed and large blobs in several segments; returns what was put.
fn store_with_data(root: &Path) -> BTreeMap<Digest, Vec<u8>> {
    let opts = Options::default()
        .shards(2)
        .large_threshold(64 * KIB as u64);
    let store = common::open_with(root, opts);
    let mut expected = BTreeMap::new();
    for i in 0..30 {
        let b = common::blob(i, 100 + (i as usize * 131) % (4 * KIB));
        expected.insert(store.put(&b).expect("put").digest, b);
    }
    for i in 0..3 {
        let b = common::blob(100 + i, 64 * KIB + 7 * i as usize);
        expected.insert(store.put(&b).expect("put large").digest, b);
    }
    expected
}

fn assert_refused_with_repair_hint(out: &std::process::Output, what: &str) {
    let err = common::failed_stderr(out);
    assert!(
        err.contains("repair --rebuild-index"),
        "{what}: the error names the repair: {err}"
    );
}

/// `store repair --rebuild-index` brings back every blob.
fn repair_recovers(root: &Path, expected: &BTreeMap<Digest, Vec<u8>>) {
    common::ok_stdout(&common::cli(root, &["repair", "--rebuild-index"]));
    let store = common::open(root);
    common::assert_all_readable(&store, expected);
    common::assert_listing(&store, expected);
}

// ---------------------------------------------------------------------------------------
// 1. Open never destroys data the index does not know about.
// ---------------------------------------------------------------------------------------

#[test]
fn bug1_an_empty_index_is_refused_by_every_command_and_nothing_is_unlinked() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let expected = store_with_data(&root);
    let before = data_files(&root);
    std::fs::write(root.join("meta.redb"), b"").expect("empty the index");
    let put_file = root.join("../extra");
    std::fs::write(&put_file, b"another blob").expect("write");
    for args in [
        vec!["info"],
        vec!["verify"],
        vec!["images"],
        vec!["gc"],
        vec!["blob", "put", put_file.to_str().unwrap()],
    ] {
        assert_refused_with_repair_hint(&common::cli(&root, &args), &args.join(" "));
        assert_eq!(
            data_files(&root),
            before,
            "`store {}` changed nothing",
            args.join(" ")
        );
    }
    match Store::open(&root, Options::default()) {
        Err(Error::NeedsRepair { reason, .. }) => assert!(reason.contains("missing or empty")),
        other => panic!("expected NeedsRepair, got {:?}", other.map(|_| ())),
    }
    assert_eq!(data_files(&root), before);
    repair_recovers(&root, &expected);
}

#[test]
fn bug1_a_missing_index_is_refused_by_a_write_command() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let expected = store_with_data(&root);
    let before = data_files(&root);
    std::fs::remove_file(root.join("meta.redb")).expect("remove the index");
    let f = root.join("../extra-missing");
    std::fs::write(&f, b"another blob").expect("write");
    assert_refused_with_repair_hint(
        &common::cli(&root, &["blob", "put", f.to_str().unwrap()]),
        "blob put",
    );
    assert!(!root.join("meta.redb").exists(), "no new index was made");
    assert_eq!(data_files(&root), before);
    repair_recovers(&root, &expected);
}

/// What a repair killed after making its new (empty) index used to leave: a valid index
/// that knows nothing of the data. Refused, not "cleaned up".
#[test]
fn bug1_a_valid_index_younger_than_the_data_is_refused() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let expected = store_with_data(&root);
    let before = data_files(&root);
    let other = common::tempdir();
    drop(common::open(other.path()));
    std::fs::copy(other.path().join("meta.redb"), root.join("meta.redb")).expect("copy index");
    assert_refused_with_repair_hint(&common::cli(&root, &["info"]), "info");
    assert_refused_with_repair_hint(&common::cli(&root, &["gc"]), "gc");
    assert_eq!(data_files(&root), before);
    repair_recovers(&root, &expected);
}

#[test]
fn bug1_an_index_restored_from_an_older_copy_is_refused_and_no_tail_is_cut() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let mut expected = store_with_data(&root);
    std::fs::copy(root.join("meta.redb"), root.join("../meta.backup")).expect("back up");
    {
        // More blobs after the copy: they land in the same active segments (past the
        // committed length the old index knows) and in new large files.
        let store = common::open_with(&root, Options::default().large_threshold(64 * KIB as u64));
        for i in 0..20 {
            let b = common::blob(1000 + i, 300 + i as usize);
            expected.insert(store.put(&b).expect("put").digest, b);
        }
        let b = common::blob(2000, 70 * KIB);
        expected.insert(store.put(&b).expect("put").digest, b);
    }
    let before = data_files(&root);
    std::fs::copy(root.join("../meta.backup"), root.join("meta.redb")).expect("restore");
    for args in [
        vec!["info"],
        vec!["verify"],
        vec!["gc", "--dry-run"],
        vec!["gc"],
    ] {
        let out = common::cli(&root, &args);
        assert_refused_with_repair_hint(&out, &args.join(" "));
        assert!(
            common::failed_stderr(&out).contains("older than the data"),
            "{args:?}"
        );
    }
    assert!(matches!(
        Store::open(&root, Options::default()),
        Err(Error::NeedsRepair { .. })
    ));
    assert_eq!(
        data_files(&root),
        before,
        "no segment tail was cut, no file removed"
    );
    repair_recovers(&root, &expected);
}

/// A repair cut short at any sync (power loss: the image is what was durable then) loses
/// nothing: the root either opens with every blob, or is refused for repair, and a repair
/// run again then recovers every blob.
#[test]
fn bug1_repair_is_restartable_from_any_point() {
    let sim = SimBackend::new();
    let opts = Options::default()
        .reserve(0)
        .large_threshold(8 * KIB as u64);
    let mut expected = BTreeMap::new();
    {
        let store = Store::open_with(Arc::new(sim.clone()), opts.clone()).expect("open");
        for i in 0..20 {
            let b = common::blob(i, 200 + 500 * (i as usize % 20));
            expected.insert(store.put(&b).expect("put").digest, b);
        }
    }
    sim.set_meta_bytes(Vec::new());
    let objects = sim.objects();
    let run = sim.crash();
    let images = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = images.clone();
    run.on_sync(move |n, img| keep.lock().unwrap().push((n, img)));
    layerstore::repair::rebuild_index_with(Arc::new(run.clone())).expect("repair");
    run.clear_on_sync();
    let images = std::mem::take(&mut *images.lock().unwrap());
    assert!(images.len() >= 3, "{} syncs", images.len());
    for (n, img) in images {
        let blob_objects: Vec<_> = img
            .objects()
            .into_iter()
            .filter(|(k, _)| {
                matches!(
                    k,
                    layerstore::backend::Key::Segment { .. }
                        | layerstore::backend::Key::Large { .. }
                )
            })
            .collect();
        let want: Vec<_> = objects
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k,
                    layerstore::backend::Key::Segment { .. }
                        | layerstore::backend::Key::Large { .. }
                )
            })
            .cloned()
            .collect();
        assert_eq!(blob_objects, want, "sync {n}: no blob file changed");
        match Store::open_with(Arc::new(img.clone()), opts.clone()) {
            Ok(s) => {
                common::assert_all_readable(&s, &expected);
                continue;
            }
            Err(Error::NeedsRepair { .. }) => {}
            Err(e) => panic!("cut at sync {n}: {e:?}"),
        }
        layerstore::repair::rebuild_index_with(Arc::new(img.clone()))
            .unwrap_or_else(|e| panic!("cut at sync {n}: repair again: {e:?}"));
        let s = Store::open_with(Arc::new(img), opts.clone()).expect("open");
        common::assert_all_readable(&s, &expected);
    }
}

// ---------------------------------------------------------------------------------------
// 2. A large put racing a sweep stores its bytes.
// ---------------------------------------------------------------------------------------

/// The blob is stored (unprotected), then put again under a lease while a collection
/// deletes it at each point of the put: afterwards the put's bytes are there, and the
/// lease keeps them.
#[test]
fn bug2_a_large_put_racing_a_sweep_stores_its_bytes() {
    // At the first write of its own copy (before its dedupe check), and at the removal of
    // that copy (after it). (A hook at a metadata sync would run inside a commit, where a
    // collection cannot start.)
    for op in [SimOp::Write, SimOp::Remove] {
        let sim = SimBackend::new();
        let store = Arc::new(
            Store::open_with(
                Arc::new(sim.clone()),
                Options::default()
                    .reserve(0)
                    .large_threshold(16 * KIB as u64),
            )
            .expect("open"),
        );
        let data = common::blob(7, 64 * KIB);
        let d = store.put(&data).expect("first put").digest;
        let lease = store.lease_create(None).expect("lease").id;
        let s = store.clone();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        // At the first `op` of the second put, a collection deletes the stored copy.
        sim.hook(op, move |_| {
            if f.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            s.gc(&gc0(), &no()).expect("gc in the hook");
            false
        });
        store
            .put_with(&data, PutOptions::default().lease(&lease))
            .expect("second put");
        assert!(
            fired.load(std::sync::atomic::Ordering::SeqCst),
            "{op:?} hook ran"
        );
        let got = store
            .get(&d)
            .unwrap_or_else(|e| panic!("{op:?}: put returned Ok, blob gone: {e:?}"));
        assert!(*got == *data);
        store.gc(&gc0(), &no()).expect("gc");
        assert!(store.get(&d).is_ok(), "{op:?}: the lease keeps it");
    }
}

/// The same race with real threads on local files: a collector in a loop, a writer that
/// re-puts a blob nothing else protects under a fresh lease and reads it back.
#[test]
fn bug2_a_leased_large_put_survives_a_collector_loop() {
    let dir = common::tempdir();
    let store = Arc::new(common::open_with(
        dir.path(),
        Options::default().large_threshold(16 * KIB as u64),
    ));
    let data = common::blob(9, 20 * KIB);
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (s, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.gc(&gc0(), &no()).expect("gc");
                runs += 1;
            }
            runs
        })
    };
    for i in 0..150 {
        let lease = store.lease_create(None).expect("lease").id;
        let d = store
            .put_with(&data, PutOptions::default().lease(&lease))
            .expect("put")
            .digest;
        assert!(
            store.get(&d).is_ok(),
            "round {i}: the put returned Ok but stored nothing"
        );
        store.lease_remove(&lease).expect("lease rm");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(collector.join().expect("collector") > 0);
}

// ---------------------------------------------------------------------------------------
// 3. Every dedupe path does what a fresh put does.
// ---------------------------------------------------------------------------------------

#[test]
fn bug3_an_ingest_deduped_under_a_second_lease_is_held_by_it() {
    let dir = common::tempdir();
    let store = common::open_with(
        dir.path(),
        Options::default().large_threshold(16 * KIB as u64),
    );
    let data = common::blob(3, 100 * KIB);
    let l1 = store.lease_create(None).expect("lease").id;
    let l2 = store.lease_create(None).expect("lease").id;
    let d = store
        .put_with(&data, PutOptions::default().lease(&l1))
        .expect("put")
        .digest;
    let mut ing = store
        .ingest("second", PutOptions::default().lease(&l2))
        .expect("ingest");
    ing.write_all(&data).expect("write");
    assert_eq!(ing.commit().expect("commit").digest, d);
    store.lease_remove(&l1).expect("lease rm");
    store.gc(&gc0(), &no()).expect("gc");
    assert!(*store.get(&d).expect("held by the second lease") == *data);
    assert!(
        store
            .leases()
            .unwrap()
            .iter()
            .any(|l| l.record.id == l2 && l.resources == [d])
    );
    // And the same for a put_with that dedupes.
    let l3 = store.lease_create(None).expect("lease").id;
    store
        .put_with(&data, PutOptions::default().lease(&l3))
        .expect("put again");
    store.lease_remove(&l2).expect("lease rm");
    store.gc(&gc0(), &no()).expect("gc");
    assert!(store.get(&d).is_ok(), "held by the third lease");
}

// ---------------------------------------------------------------------------------------
// 4. verify --repair quarantines only bytes proven wrong.
// ---------------------------------------------------------------------------------------

fn sim_store(sim: &SimBackend) -> Store {
    Store::open_with(
        Arc::new(sim.clone()),
        Options::default()
            .reserve(0)
            .shards(2)
            .large_threshold(8 * KIB as u64),
    )
    .expect("open")
}

/// EMFILE (or EIO) on reads: an `io` finding, the repair refuses and removes nothing.
#[test]
fn bug4_an_io_error_is_never_corruption() {
    for errno in [24, 5] {
        let sim = SimBackend::new();
        let store = sim_store(&sim);
        let mut expected = BTreeMap::new();
        for i in 0..40 {
            let b = common::blob(i, if i % 4 == 0 { 9 * KIB } else { 300 });
            expected.insert(store.put(&b).expect("put").digest, b);
        }
        sim.inject(Fault::after(SimOp::Read, 10, errno));
        sim.inject(Fault::after(SimOp::Open, 3, errno));
        let r = store
            .verify(&VerifyOptions::default(), &no(), &|_| {})
            .expect("verify runs");
        assert!(
            r.problems.iter().any(|p| p.kind == "io"),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems.iter().all(|p| p.kind == "io"),
            "{:#?}",
            r.problems
        );
        match store.verify(&VerifyOptions::default().repair(true), &no(), &|_| {}) {
            Err(Error::ReadFailures { count, .. }) => assert!(count > 0),
            other => panic!("errno {errno}: expected ReadFailures, got {other:?}"),
        }
        sim.clear_faults();
        common::assert_all_readable(&store, &expected);
        assert_eq!(deep(&store).errors, 0);
    }
}

/// The same through the command line with a real, low open-file limit: whatever the
/// limit breaks, no blob leaves the index.
#[test]
fn bug4_verify_repair_under_a_low_fd_limit_keeps_every_blob() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().large_threshold(4 * KIB as u64));
    let mut expected = BTreeMap::new();
    for i in 0..300 {
        let b = common::blob(i, if i % 3 == 0 { 5 * KIB } else { 200 });
        expected.insert(store.put(&b).expect("put").digest, b);
    }
    drop(store);
    for limit in [8, 12, 16, 24, 32] {
        let out = common::run(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ulimit -n {limit} && exec \"$STORE\" --root \"$ROOT\" --quiet verify --repair"
                ))
                .env("STORE", env!("CARGO_BIN_EXE_store"))
                .env("ROOT", &root)
                .stdin(std::process::Stdio::null()),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(3), "limit {limit}: {stderr}");
        let store = common::open(&root);
        common::assert_all_readable(&store, &expected);
        common::assert_listing(&store, &expected);
    }
}

/// A verify racing a collection and a compaction (run at its first read, in its thread)
/// reports nothing and quarantines nothing: what it read by its snapshot moved or went.
#[test]
fn bug4_verify_beside_a_collector_reports_no_false_problems() {
    for repair in [false, true] {
        let sim = SimBackend::new();
        let store = Arc::new(
            Store::open_with(
                Arc::new(sim.clone()),
                Options::default()
                    .reserve(0)
                    .shards(1)
                    .segment_size(8 * KIB as u64)
                    .large_threshold(8 * KIB as u64),
            )
            .expect("open"),
        );
        let lease = store.lease_create(None).expect("lease").id;
        let mut kept = BTreeMap::new();
        for i in 0..60 {
            let b = common::blob(i, if i % 10 == 0 { 9 * KIB } else { 700 });
            let d = store.put(&b).expect("put").digest;
            if i % 3 == 0 {
                store.lease_add(&lease, &[d]).expect("lease add");
                kept.insert(d, b);
            }
        }
        let s = store.clone();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        sim.hook(SimOp::Read, move |_| {
            if f.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            let r = s
                .gc(
                    &gc0().compact_threshold(0.1).orphan_age(Duration::ZERO),
                    &no(),
                )
                .expect("gc");
            assert!(r.removed_blobs > 0 && r.segments_compacted > 0, "{r:?}");
            false
        });
        let r = store
            .verify(&VerifyOptions::default().repair(repair), &no(), &|_| {})
            .expect("verify");
        assert!(fired.load(std::sync::atomic::Ordering::SeqCst));
        assert!(r.problems.is_empty(), "repair {repair}: {:#?}", r.problems);
        if let Some(rep) = &r.repaired {
            assert!(rep.quarantined.is_empty(), "{rep:?}");
        }
        common::assert_all_readable(&store, &kept);
    }
}

// ---------------------------------------------------------------------------------------
// 5. A digest reached as a manifest is parsed as one; incomplete images are named.
// ---------------------------------------------------------------------------------------

/// M1 is a real image; M2 lists M1's bytes as one of its layers (the graph allows it).
fn kind_clash_images() -> (Built, Built) {
    let l1 = oci::layer(&[oci::file("hello", b"hello\n")]);
    let m1 = oci::build(vec![(OCI_LAYER, l1.clone())], &[oci::sha(&l1)]);
    // M2's config lists no diff_ids: its "layer" is a manifest, not a tar.
    let config2 = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let manifest2 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": oci::OCI_CONFIG, "digest": oci::sha(&config2), "size": config2.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": m1.digest.to_string(), "size": m1.manifest.len()}],
    }))
    .unwrap();
    let m2 = Built {
        digest: common::sha256(&manifest2),
        manifest: manifest2,
        config: config2,
        layers: vec![(OCI_LAYER, m1.manifest.clone())],
    };
    (m1, m2)
}

#[test]
fn bug5_a_manifest_also_listed_as_a_layer_is_imported_whole() {
    let (m1, m2) = kind_clash_images();
    for order in [[(&m1, "one"), (&m2, "two")], [(&m2, "two"), (&m1, "one")]] {
        let dir = common::tempdir();
        let store = common::open(dir.path());
        let archive = oci::oci_archive(&order, &[]);
        let mut opts = ImportOptions::default();
        opts.base_name = Some("test/clash".into());
        let out = store.import_tar(archive.as_slice(), &opts).expect("import");
        assert_eq!(out.images.len(), 2);
        let info = store.stat(&m1.digest).unwrap().expect("M1 stored");
        assert_eq!(
            info.kind,
            Kind::Manifest,
            "M1 keeps the kind it was reached by"
        );
        let mut children = store.children(&m1.digest).expect("children");
        children.sort();
        let mut want = vec![common::sha256(&m1.config), common::sha256(&m1.layers[0].1)];
        want.sort();
        assert_eq!(children, want, "M1's edges");
        for c in &want {
            assert!(
                store.stat(c).unwrap().is_some(),
                "M1's child {c} was imported"
            );
        }
        let r = deep(&store);
        assert_eq!(r.errors, 0, "{:#?}", r.problems);
        let target = dir.path().join("rootfs");
        store
            .unpack("test/clash:one", &target, &UnpackOptions::default())
            .expect("M1 unpacks");
        assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"hello\n");
    }
}

#[test]
fn bug5_verify_deep_names_an_image_whose_manifest_is_stored_as_a_layer() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let (m1, _) = kind_clash_images();
    for b in m1.blobs().into_iter().take(2) {
        store.put(b).expect("put");
    }
    // M1's bytes stored as a layer: nothing tracks its config and layers.
    oci::put(&store, &m1.manifest, Kind::Layer);
    let index = oci::index_of(&[(m1.digest, m1.manifest.len(), OCI_MANIFEST, None)]);
    let idx = store
        .put_manifest(&index, PutOptions::default())
        .expect("put index")
        .descriptor
        .digest;
    store.tag("test/mis:kind", &idx).expect("tag");
    let r = deep(&store);
    let p = r
        .problems
        .iter()
        .find(|p| p.kind == "incomplete" && p.digest == Some(m1.digest))
        .unwrap_or_else(|| panic!("{:#?}", r.problems));
    assert!(p.detail.contains("stored as a layer"), "{}", p.detail);
    assert_eq!(p.images, ["docker.io/test/mis:kind"]);
    assert!(r.errors > 0);
    // Importing it properly puts it right.
    let mut opts = ImportOptions::default();
    opts.base_name = Some("test/mis".into());
    store
        .import_tar(oci::oci_archive(&[(&m1, "kind")], &[]).as_slice(), &opts)
        .expect("import");
    assert_eq!(
        store.stat(&m1.digest).unwrap().unwrap().kind,
        Kind::Manifest
    );
    assert_eq!(deep(&store).errors, 0, "{:#?}", deep(&store).problems);
}

// ---------------------------------------------------------------------------------------
// 6. Unpack of hostile trees: memory, stack, leftovers, links, the root entry.
// ---------------------------------------------------------------------------------------

fn deep_path(depth: usize) -> String {
    vec!["d"; depth].join("/")
}

#[test]
fn bug6_a_path_thousands_deep_unpacks_in_linear_memory_and_its_whiteout_works() {
    let depth = 20_000;
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);
    let deep_file = format!("{}/leaf", deep_path(depth));
    let l1 = oci::layer(&[oci::file(&deep_file, b"at the bottom\n")]);
    let l2 = oci::layer(&[oci::file(".wh.d", b"")]);
    let one = oci::plain(&[vec![oci::file(&deep_file, b"at the bottom\n")]]);
    one.store(&store, "test/deep:one");
    let two = oci::build(
        vec![(OCI_LAYER, l1.clone()), (OCI_LAYER, l2.clone())],
        &[oci::sha(&l1), oci::sha(&l2)],
    );
    two.store(&store, "test/deep:two");
    drop(store);

    let t1 = dir.path().join("one");
    let (out, rss) = common::run_peak_rss(common::store_cmd(&root).args([
        "--quiet",
        "unpack",
        "test/deep:one",
        t1.to_str().unwrap(),
    ]));
    common::ok_stdout(&out);
    assert!(
        rss < 300 * 1024,
        "peak RSS {rss} KiB for one path {depth} deep"
    );
    // Too deep for one path syscall: walk it.
    assert_eq!(walk_read(&t1, depth), b"at the bottom\n");

    let t2 = dir.path().join("two");
    let out = common::run(common::store_cmd(&root).args([
        "--quiet",
        "unpack",
        "test/deep:two",
        t2.to_str().unwrap(),
    ]));
    common::ok_stdout(&out);
    assert!(
        std::fs::read_dir(&t2).unwrap().next().is_none(),
        "the whiteout removed it all"
    );
    remove_deep(&t1, depth);
}

/// Reads `d/d/.../d/leaf` (`depth` levels) one directory at a time.
fn walk_read(top: &Path, depth: usize) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    let mut fd = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        fd = rustix::fs::openat(&fd, "d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .unwrap();
    }
    let f = rustix::fs::openat(&fd, "leaf", OFlags::RDONLY, Mode::empty()).unwrap();
    let mut v = Vec::new();
    std::fs::File::from(f).read_to_end(&mut v).unwrap();
    v
}

/// Removes a chain `depth` deep without recursion (`std::fs::remove_dir_all` may not manage).
fn remove_deep(top: &Path, depth: usize) {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let mut fd = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        fd = rustix::fs::openat(&fd, "d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .unwrap();
    }
    let _ = rustix::fs::unlinkat(&fd, "leaf", AtFlags::empty());
    for _ in 0..depth {
        fd = rustix::fs::openat(&fd, "..", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .unwrap();
        rustix::fs::unlinkat(&fd, "d", AtFlags::REMOVEDIR).unwrap();
    }
}

#[test]
fn bug6_a_failed_unpack_of_a_deep_tree_leaves_nothing() {
    let depth = 20_000;
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    let l1 = oci::layer(&[oci::file(&format!("{}/leaf", deep_path(depth)), b"x")]);
    // The wrong diff_id fails the unpack after the whole tree was written.
    let bad = oci::build(vec![(OCI_LAYER, l1)], &[oci::sha(b"not the layer")]);
    bad.store(&store, "test/deep:bad");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let err = store
        .unpack(
            "test/deep:bad",
            &work.join("rootfs"),
            &UnpackOptions::default(),
        )
        .expect_err("wrong diff_id");
    assert!(err.to_string().contains("diff_id"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
    assert!(left.is_empty(), "a failed unpack leaves nothing: {left:?}");
}

#[test]
fn bug6_a_hardlink_to_itself_is_refused() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    oci::plain(&[vec![oci::hardlink("self", "self")]]).store(&store, "test/link:self");
    let target = dir.path().join("rootfs");
    let err = store
        .unpack("test/link:self", &target, &UnpackOptions::default())
        .expect_err("a self-link");
    assert!(err.to_string().contains("points at itself"), "{err}");
    assert!(!target.exists());
}

#[test]
fn bug6_a_layers_root_entry_sets_the_roots_mode_and_time() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    oci::plain(&[vec![
        oci::dir("./").mode(0o750).mtime(1_234_567),
        oci::file("f", b"x"),
    ]])
    .store(&store, "test/root:entry");
    let target = dir.path().join("rootfs");
    store
        .unpack("test/root:entry", &target, &UnpackOptions::default())
        .expect("unpack");
    let m = std::fs::metadata(&target).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750);
    assert_eq!(m.mtime(), 1_234_567);
}

// ---------------------------------------------------------------------------------------
// 7. Leftovers.
// ---------------------------------------------------------------------------------------

/// The bug: aborting a live ingest returned Ok and deleted its files under the writer.
/// Now the abort marks the upload: nothing is removed while its writer holds it, the
/// writer's next call fails clearly and removes it, and the ref is free afterwards.
#[test]
fn bug7_abort_of_a_live_ingest_deletes_nothing_under_its_writer() {
    let dir = common::tempdir();
    let store = common::open_with(
        dir.path(),
        Options::default().large_threshold(64 * KIB as u64),
    );
    let data = common::blob(1, 200 * KIB);
    let mut ing = store.ingest("live", PutOptions::default()).expect("ingest");
    ing.write_all(&data[..100 * KIB]).expect("write");
    ing.sync().expect("sync");
    let upload_dir = || {
        std::fs::read_dir(dir.path().join("ingest"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "tmp")
            .count()
    };
    assert_eq!(upload_dir(), 1);
    store.abort_ingest("live").expect("abort of a live upload");
    // Still on disk under the writer, gone from status, and its ref still busy.
    assert_eq!(upload_dir(), 1, "nothing is removed under a writer");
    assert_eq!(store.upload("live").unwrap(), None);
    assert!(store.uploads().unwrap().is_empty());
    assert!(matches!(
        store.ingest("live", PutOptions::default()),
        Err(Error::IngestBusy(_))
    ));
    let err = ing.write_all(&data[100 * KIB..]).unwrap_err();
    assert!(
        matches!(err, Error::UploadAborted(ref r) if r == "live"),
        "{err:?}"
    );
    assert!(err.is_refusal());
    assert!(matches!(ing.commit(), Err(Error::UploadAborted(_))));
    assert_eq!(upload_dir(), 0, "the writer removed it");
    assert!(store.iter().next().is_none(), "nothing became visible");
    let again = store
        .ingest("live", PutOptions::default())
        .expect("the ref is free");
    assert_eq!(again.offset(), 0);
    drop(again);
    // Once nothing writes it, a suspended one can be aborted.
    let mut ing = store
        .ingest("suspended", PutOptions::default())
        .expect("ingest");
    ing.write_all(b"abc").unwrap();
    ing.suspend().unwrap();
    store.abort_ingest("suspended").expect("abort");
    assert!(store.ingests().unwrap().is_empty());
}

#[test]
fn bug7_a_put_refused_for_its_lease_leaves_no_file() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().large_threshold(16 * KIB as u64));
    let data = common::blob(2, 64 * KIB);
    assert!(matches!(
        store.put_with(&data, PutOptions::default().lease("no-such-lease")),
        Err(Error::LeaseNotFound(_))
    ));
    let mut ing = store
        .ingest("leased", PutOptions::default().lease("no-such-lease"))
        .expect("ingest");
    ing.write_all(&data).unwrap();
    assert!(matches!(ing.commit(), Err(Error::LeaseNotFound(_))));
    assert!(
        common::large_files(&root).is_empty(),
        "{:?}",
        common::large_files(&root)
    );
    let r = deep(&store);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    common::assert_ingest_clean(&root);
}

#[test]
fn bug7_a_killed_streaming_put_leaves_nothing_after_the_next_open() {
    use std::io::Write;
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    drop(common::open(&root));
    let mut child = common::store_cmd(&root)
        .args(["--quiet", "blob", "put", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&common::blob(5, 8 * MIB)).expect("feed");
    stdin.flush().unwrap();
    // Wait until the bytes reached the store, then kill it mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while common::files_under(&root.join("ingest"))
        .values()
        .sum::<u64>()
        < 4 * MIB as u64
    {
        assert!(std::time::Instant::now() < deadline, "the put never wrote");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    drop(stdin);
    assert!(
        common::files_under(&root.join("ingest"))
            .values()
            .sum::<u64>()
            >= 4 * MIB as u64
    );
    // The next command (even one that only reads: the killed writer left the index to
    // recover, which a writable open does) discards what nobody can resume.
    let info: serde_json::Value =
        serde_json::from_str(&common::ok_stdout(&common::cli(&root, &["info", "--json"]))).unwrap();
    assert_eq!(info["ingest_bytes"], 0, "{info}");
    common::assert_ingest_clean(&root);
}

/// What `store info` shows of uploads in progress.
#[test]
fn bug7_uploads_in_progress_are_reported() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open(&root);
    let mut ing = store
        .ingest("resumable", PutOptions::default())
        .expect("ingest");
    ing.write_all(&common::blob(1, 3 * MIB)).unwrap();
    ing.suspend().unwrap();
    drop(store);
    let info: serde_json::Value =
        serde_json::from_str(&common::ok_stdout(&common::cli(&root, &["info", "--json"]))).unwrap();
    assert_eq!(info["ingests"], 1, "{info}");
    assert!(
        info["ingest_bytes"].as_u64().unwrap() >= 3 * MIB as u64,
        "{info}"
    );
}

// ---------------------------------------------------------------------------------------
// 8. A full disk can be collected; active segments are compacted.
// ---------------------------------------------------------------------------------------

#[test]
fn bug8_a_full_disk_is_collected_through_the_reserve() {
    let sim = SimBackend::new();
    let opts = Options::default()
        .reserve(2 * MIB as u64)
        .shards(2)
        .large_threshold(64 * KIB as u64);
    let store = Store::open_with(Arc::new(sim.clone()), opts.clone()).expect("open");
    sim.set_capacity(Some(sim.used() + 12 * MIB as u64));
    let mut names = Vec::new();
    let mut i = 0u64;
    // Fill the disk with named images until writes fail.
    let full = loop {
        let layer = common::blob(i, 90 * KIB + (i as usize % 7) * 1000);
        let img = oci::build(vec![(OCI_LAYER, layer.clone())], &[oci::sha(&layer)]);
        let name = format!("test/full:{i}");
        let r = (|| -> layerstore::Result<()> {
            store.put_with(&img.layers[0].1, PutOptions::default().kind(Kind::Layer))?;
            store.put_with(&img.config, PutOptions::default().kind(Kind::Config))?;
            store.put_manifest(&img.manifest, PutOptions::default())?;
            store.tag(&name, &img.digest)?;
            Ok(())
        })();
        match r {
            Ok(()) => names.push(name),
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 10_000);
    };
    assert!(full.is_no_space(), "{full:?}");
    assert!(names.len() > 10);
    for n in &names {
        // Removing a name needs space in the index too: on a full disk it gives the
        // reserve back.
        store.remove_image(n, false).expect("rmi on a full disk");
    }
    let r = store.gc(&gc0(), &no()).expect("a full disk is collected");
    assert!(r.removed_blobs > 0);
    let left = store.names().unwrap();
    for (n, _) in &left {
        store
            .remove_image(n, false)
            .expect("rmi after space came back");
    }
    store.gc(&gc0(), &no()).expect("gc");
    let info = store.info().unwrap();
    assert_eq!((info.blobs, info.dead_bytes), (0, 0), "{info:?}");
    assert_eq!(deep(&store).errors, 0);
    store.put(b"writes work again").expect("put");
    drop(store);
    let store = Store::open_with(Arc::new(sim.clone()), opts).expect("reopen");
    assert_eq!(deep(&store).errors, 0);
}

#[test]
fn bug8_removing_every_image_frees_the_active_segments_too() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(4));
    for i in 0..200 {
        store.put(&common::blob(i, 10 * KIB)).expect("put");
    }
    let before = common::disk_totals(&root).0;
    assert!(before > 1_500_000);
    store.gc(&gc0(), &no()).expect("gc");
    let info = store.info().unwrap();
    assert_eq!(
        (info.blobs, info.live_bytes, info.dead_bytes),
        (0, 0, 0),
        "{info:?}"
    );
    let after = common::disk_totals(&root).0;
    assert!(
        after < 4 * 1024,
        "pack files hold {after} bytes after everything went"
    );
    store.put(b"and the shards still take writes").expect("put");
}

// ---------------------------------------------------------------------------------------
// 9. Input reaching arithmetic, and other sharp edges.
// ---------------------------------------------------------------------------------------

#[test]
fn bug9_a_uid_past_32_bits_is_refused_not_truncated_to_root() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    for (uid, gid) in [
        (1u64 << 32, 0u64),
        (0, (1 << 32) + 5),
        (u64::from(u32::MAX), 0),
    ] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o4755);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(uid);
        h.set_gid(gid);
        b.append_data(&mut h, "suid", &b"x"[..]).expect("entry");
        let l = b.into_inner().unwrap();
        let img = oci::build(vec![(OCI_LAYER, l.clone())], &[oci::sha(&l)]);
        let name = format!("test/uid:{uid}-{gid}");
        img.store(&store, &name);
        let target = dir.path().join(format!("rootfs-{uid}-{gid}"));
        let err = store
            .unpack(&name, &target, &UnpackOptions::default())
            .expect_err("an id that is no Linux id");
        assert!(err.to_string().contains("larger than a Linux id"), "{err}");
        assert!(!target.exists());
    }
}

#[test]
fn bug9_an_enormous_grace_or_expiry_saturates_instead_of_wrapping() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open(&root);
    let d = store.put(b"young, unprotected").unwrap().digest;
    let r = store
        .gc(&GcOptions::default().grace(Duration::MAX), &no())
        .expect("gc");
    assert_eq!(r.removed_blobs, 0);
    let lease = store.lease_create(Some(Duration::MAX)).unwrap();
    assert!(lease.expires_ms.is_some_and(|e| e > 1 << 50), "{lease:?}");
    let e = store.put(b"leased for ever").unwrap().digest;
    store.lease_add(&lease.id, &[e]).unwrap();
    let r = store.gc(&gc0(), &no()).expect("gc");
    assert!(r.expired_leases.is_empty());
    assert!(store.stat(&e).unwrap().is_some());
    assert!(
        store.stat(&d).unwrap().is_none(),
        "the unprotected one went with grace 0"
    );
    drop(store);
    // Through the command line: the largest duration humantime takes.
    common::ok_stdout(&common::cli(&root, &["gc", "--grace", "500000000years"]));
}

/// A container record with a short id (a hand-edited or damaged index) is listed, not a
/// panic.
#[test]
fn bug9_a_short_container_id_is_listed_not_a_panic() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open(&root);
    let img = oci::plain(&[vec![oci::file("f", b"x")]]);
    img.store(&store, "test/c:1");
    store.container_create("test/c:1", Some("web")).unwrap();
    drop(store);
    {
        let db = redb::Database::open(root.join("meta.redb")).expect("open index");
        let t: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("containers");
        let w = db.begin_write().unwrap();
        {
            let mut tab = w.open_table(t).unwrap();
            let rec = json!({"id": "ab", "image": img.digest.to_string(), "name": "short",
                "image_ref": "test/c:1", "created_ms": 1});
            tab.insert("ab", serde_json::to_vec(&rec).unwrap().as_slice())
                .unwrap();
        }
        w.commit().unwrap();
    }
    let out = common::ok_stdout(&common::cli(&root, &["container", "ls"]));
    assert!(out.contains("short") && out.contains("web"), "{out}");
}

/// A damaged index entry that claims terabytes is an error, not an allocation.
#[test]
fn bug9_an_index_entry_claiming_terabytes_is_corrupt_not_an_allocation() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open(&root);
    let d = store.put(b"small").unwrap().digest;
    drop(store);
    {
        let db = redb::Database::open(root.join("meta.redb")).expect("open index");
        let t: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blobs");
        let w = db.begin_write().unwrap();
        {
            let mut tab = w.open_table(t).unwrap();
            let mut v = redb::ReadableTable::get(&tab, &*d.key())
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            v[0..8].copy_from_slice(&(1u64 << 42).to_le_bytes());
            v[8..16].copy_from_slice(&(1u64 << 42).to_le_bytes());
            tab.insert(&*d.key(), v.as_slice()).unwrap();
        }
        w.commit().unwrap();
    }
    let store = common::open(&root);
    assert!(matches!(store.get(&d), Err(Error::Corrupt(_))));
    let r = store
        .verify(&VerifyOptions::default(), &no(), &|_| {})
        .expect("verify");
    assert!(
        r.problems.iter().any(|p| p.digest == Some(d)),
        "{:#?}",
        r.problems
    );
}

/// A record header whose length wraps past 2^64 is damage to step over, not a panic or an
/// enormous allocation; repair recovers the records around it.
#[test]
fn bug9_a_record_length_that_overflows_is_damage_for_repair() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let mut expected = BTreeMap::new();
    for i in 0..5 {
        let b = common::blob(i, 500);
        expected.insert(store.put(&b).unwrap().digest, b);
    }
    let victim = common::blob(99, 500);
    let vd = store.put(&victim).unwrap().digest;
    let Location::Packed { offset, .. } = store.stat(&vd).unwrap().unwrap().location else {
        panic!("packed")
    };
    drop(store);
    let (seg, _) = common::pack_files(&root).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = (offset - 128) as usize;
    let mut h = layerstore::format::RecordHeader::decode(&bytes[at..at + 128]).unwrap();
    h.stored_len = u64::MAX - 64;
    h.raw_len = h.stored_len;
    bytes[at..at + 128].copy_from_slice(&h.encode());
    std::fs::write(&seg, &bytes).unwrap();
    let report = layerstore::repair::rebuild_index(&root).expect("repair");
    assert_eq!(report.blobs, 5, "{report:?}");
    assert!(
        report.skipped.iter().any(|s| s.contains("runs past")),
        "{report:?}"
    );
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
}

#[test]
fn bug9_a_manifest_kind_ingest_is_capped() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let mut ing = store
        .ingest("big-manifest", PutOptions::default().kind(Kind::Manifest))
        .expect("ingest");
    let chunk = vec![b' '; MIB];
    let mut err = None;
    for _ in 0..20 {
        if let Err(e) = ing.write_all(&chunk) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("refused before 20 MiB");
    assert!(e.to_string().contains("MiB"), "{e}");
}

#[test]
fn bug9_repair_checks_the_blake3_of_large_files() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().large_threshold(16 * KIB as u64));
    let good = common::blob(1, 40 * KIB);
    let bad = common::blob(2, 40 * KIB);
    let dg = store.put(&good).unwrap().digest;
    let db = store.put(&bad).unwrap().digest;
    drop(store);
    let file = common::large_files(&root)
        .into_keys()
        .find(|p| p.to_string_lossy().contains(&db.hex()))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[128 + 1000] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let report = layerstore::repair::rebuild_index(&root).expect("repair");
    assert!(
        report.skipped.iter().any(|s| s.contains("blake3")),
        "{report:?}"
    );
    let store = common::open(&root);
    assert!(
        store.stat(&db).unwrap().is_none(),
        "damaged bytes are not indexed"
    );
    assert!(*store.get(&dg).unwrap() == *good);
}

#[test]
fn bug9_a_layer_that_is_not_what_it_says_gets_a_printable_error() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    let mut garbage = vec![0x1f, 0x8b, 0x08, 0x00];
    garbage.extend((0..400u32).map(|i| (i * 7 % 256) as u8));
    let img = oci::build(
        vec![(oci::OCI_LAYER_GZIP, garbage.clone())],
        &[oci::sha(b"x")],
    );
    img.store(&store, "test/garbage:gz");
    let mut tarish = vec![0u8; 1024];
    tarish[..8].copy_from_slice(b"\x01\x02\x03\xff\xfe\x00\x07\x1b");
    tarish[124..136].copy_from_slice(b"\x1b[31mxx\x07\x08\x00\x00\x00");
    let img2 = oci::build(vec![(OCI_LAYER, tarish.clone())], &[oci::sha(&tarish)]);
    img2.store(&store, "test/garbage:tar");
    for name in ["test/garbage:gz", "test/garbage:tar"] {
        let err = store
            .unpack(
                name,
                &dir.path().join(name.replace([':', '/'], "-")),
                &UnpackOptions::default(),
            )
            .expect_err("garbage");
        let msg = err.to_string();
        assert!(!msg.chars().any(char::is_control), "{name}: {msg:?}");
    }
}

#[test]
fn bug9_a_nested_index_unpacks() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("store"));
    let img = oci::plain(&[vec![oci::file("nested", b"yes\n")]]);
    img.store(&store, "test/nest:m");
    let mut desc = json!({"mediaType": OCI_MANIFEST, "digest": img.digest.to_string(),
        "size": img.manifest.len(), "platform": {"os": "linux", "architecture": layerstore::unpack::host_platform().split('/').nth(1).unwrap()}});
    let inner = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX,
        "manifests": [desc.take()]}))
    .unwrap();
    let inner_d = store
        .put_manifest(&inner, PutOptions::default())
        .unwrap()
        .descriptor
        .digest;
    let outer = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX,
        "manifests": [{"mediaType": oci::OCI_INDEX, "digest": inner_d.to_string(), "size": inner.len()}]}))
    .unwrap();
    let outer_d = store
        .put_manifest(&outer, PutOptions::default())
        .unwrap()
        .descriptor
        .digest;
    store.tag("test/nest:outer", &outer_d).unwrap();
    let target = dir.path().join("rootfs");
    store
        .unpack("test/nest:outer", &target, &UnpackOptions::default())
        .expect("index -> index -> manifest");
    assert_eq!(std::fs::read(target.join("nested")).unwrap(), b"yes\n");
}

/// A read-only open writes nothing at all to the root.
#[test]
fn bug9_read_only_commands_write_nothing() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    store_with_data(&root);
    let snapshot = |root: &Path| -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
        out
    };
    let before = snapshot(&root);
    for args in [
        vec!["info"],
        vec!["verify"],
        vec!["verify", "--deep"],
        vec!["images"],
        vec!["df"],
        vec!["gc", "--dry-run"],
        vec!["blob", "ls"],
    ] {
        let out = common::cli(&root, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            snapshot(&root),
            before,
            "`store {}` wrote to the root",
            args.join(" ")
        );
    }
    let store = Store::open(&root, Options::default().read_only(true)).expect("read-only open");
    assert!(matches!(store.put(b"x"), Err(Error::ReadOnly)));
    drop(store);
    assert_eq!(snapshot(&root), before);
}

fn docker_archive(repo_tag: &str) -> (Vec<u8>, Digest) {
    let layer = oci::layer(&[oci::file("f", b"docker\n")]);
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [oci::sha(&layer)]}}))
    .unwrap();
    let cfg_d = common::sha256(&config);
    let manifest = serde_json::to_vec(&json!([{"Config": format!("{}.json", cfg_d.hex()),
        "RepoTags": [repo_tag], "Layers": ["l1/layer.tar"]}]))
    .unwrap();
    let tar = oci::tar_of(&[
        (&format!("{}.json", cfg_d.hex()), &config),
        ("l1/layer.tar", &layer),
        ("manifest.json", &manifest),
    ]);
    (tar, cfg_d)
}

#[test]
fn bug9_a_digest_pinned_name_in_an_archive_is_refused() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let other = common::sha256(b"some other image");
    let (tar, _) = docker_archive(&format!("example.com/x@{other}"));
    let err = store
        .import_tar(tar.as_slice(), &ImportOptions::default())
        .expect_err("a name pinned to another digest");
    assert!(err.to_string().contains("another digest"), "{err}");
    assert!(store.iter().next().is_none(), "nothing was committed");
    assert!(store.names().unwrap().is_empty());
    let (tar, _) = docker_archive("example.com/x:1");
    store
        .import_tar(tar.as_slice(), &ImportOptions::default())
        .expect("a plain tag");
    assert_eq!(store.names().unwrap()[0].0, "example.com/x:1");
}

// ---------------------------------------------------------------------------------------
// 10. Repair and verify step over damaged records.
// ---------------------------------------------------------------------------------------

#[test]
fn bug10_one_flipped_header_bit_costs_one_record() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let mut all = Vec::new();
    for i in 0..40 {
        let b = common::blob(i, 300 + i as usize);
        let d = store.put(&b).unwrap().digest;
        all.push((d, b));
    }
    let (victim, _) = all[20].clone();
    let img = oci::plain(&[vec![oci::file("f", b"named")]]);
    img.store(&store, "test/flip:1");
    let Location::Packed { offset, .. } = store.stat(&victim).unwrap().unwrap().location else {
        panic!()
    };
    drop(store);
    let (seg, _) = common::pack_files(&root).into_iter().next().unwrap();
    let original = std::fs::read(&seg).unwrap();
    for byte in [0usize, 5, 40, 75, 100, 127] {
        let mut bytes = original.clone();
        bytes[(offset - 128) as usize + byte] ^= 0x10;
        std::fs::write(&seg, &bytes).unwrap();
        let store = common::open(&root);
        let r = deep(&store);
        assert!(
            r.problems.iter().any(|p| p.digest == Some(victim)),
            "byte {byte}: verify --deep names the damaged record: {:#?}",
            r.problems
        );
        assert!(
            r.problems.iter().any(|p| p.kind == "segment"),
            "{:#?}",
            r.problems
        );
        drop(store);
        let _ = std::fs::remove_file(root.join("meta.redb"));
        let report = layerstore::repair::rebuild_index(&root).expect("repair");
        assert!(
            !report.skipped.is_empty(),
            "byte {byte}: the damage is reported"
        );
        let store = common::open(&root);
        for (d, b) in &all {
            if *d != victim {
                assert!(*store.get(d).unwrap() == **b, "byte {byte}: {d} recovered");
            }
        }
        assert!(
            store.stat(&img.digest).unwrap().is_some(),
            "the manifest after it too"
        );
        drop(store);
        std::fs::write(&seg, &original).unwrap();
        layerstore::repair::rebuild_index(&root).expect("repair back");
    }
}

#[test]
fn bug10_a_truncated_segment_names_its_lost_blobs_in_plain_verify() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let img = oci::plain(&[vec![oci::file("f", &common::blob(1, 3000))]]);
    img.store(&store, "test/cut:1");
    let last = store.put(&common::blob(2, 2000)).unwrap().digest;
    drop(store);
    let (seg, len) = common::pack_files(&root).into_iter().next().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let out = common::cli(&root, &["verify", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let named: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["digest"].as_str())
        .collect();
    assert_eq!(named, [last.to_string()], "{v}");
    let report = layerstore::repair::rebuild_index(&root).expect("repair");
    assert!(
        report.skipped.iter().any(|s| s.contains("bytes")),
        "{report:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 11. Open files stay bounded whatever the archive's size.
// ---------------------------------------------------------------------------------------

#[test]
fn bug11_a_layout_of_many_blobs_imports_under_a_low_fd_limit() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);
    // 150 images of 4 layers each, past the in-memory staging budget (spilled to files).
    let mut images = Vec::new();
    for i in 0..150u64 {
        let layers: Vec<Vec<oci::Ent>> = (0..4)
            .map(|j| vec![oci::file("f", &common::blob(i * 10 + j, 60 * KIB))])
            .collect();
        images.push(oci::plain(&layers));
    }
    let named: Vec<(&Built, String)> = images
        .iter()
        .enumerate()
        .map(|(i, b)| (b, format!("t{i}")))
        .collect();
    let refs: Vec<(&Built, &str)> = named.iter().map(|(b, n)| (*b, n.as_str())).collect();
    let archive = dir.path().join("many.tar");
    std::fs::write(&archive, oci::oci_archive(&refs, &[])).unwrap();
    drop(store);
    let limited = |args: &str| {
        common::run(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ulimit -n 64 && exec \"$STORE\" --root \"$ROOT\" --quiet {args}"
                ))
                .env("STORE", env!("CARGO_BIN_EXE_store"))
                .env("ROOT", &root)
                .env("ARCHIVE", &archive)
                .stdin(std::process::Stdio::null()),
        )
    };
    common::ok_stdout(&limited("import \"$ARCHIVE\" --base-name test/many"));
    common::ok_stdout(&limited("verify --deep"));
    common::ok_stdout(&limited(
        "export test/many:t7 test/many:t99 -o \"$ARCHIVE.out\"",
    ));
    common::ok_stdout(&limited("unpack test/many:t3 \"$ARCHIVE.rootfs\""));
    common::ok_stdout(&limited("rmi test/many:t1 test/many:t2"));
    common::ok_stdout(&limited("gc --grace 0s"));
    let store = common::open(&root);
    assert_eq!(store.names().unwrap().len(), 148);
    assert_eq!(deep(&store).errors, 0);
}
