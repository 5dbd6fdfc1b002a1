//! Injected faults: ENOSPC, EMFILE and EIO at every write, create, sync or read an
//! operation makes (an import, puts, an ingest, a collection with compaction), one
//! position at a time, on the simulated backend; and a real full disk (a small tmpfs, as
//! root). An operation may fail, never panic; once the fault is gone the store opens,
//! verifies clean, still holds every acknowledged blob, name and image whole, and takes
//! writes. `LAYERSTORE_FAULTS=all` tries every position (CI: up to 12 per operation and
//! kind of fault).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use layerstore::backend::sim::{EIO, EMFILE, ENOSPC, Fault, SimBackend, SimOp};
use layerstore::{
    Depth, Digest, GcOptions, ImportOptions, Options, PutOptions, Store, VerifyOptions,
};

use crate::common::{self, KIB, MIB};
use crate::oci;

fn opts() -> Options {
    Options::default()
        .reserve(0)
        .shards(2)
        .segment_size(32 * KIB as u64)
        .large_threshold(16 * KIB as u64)
}

/// A store with protected blobs, named images and garbage; and what must survive.
struct Template {
    sim: SimBackend,
    lease: String,
    kept: BTreeMap<Digest, Vec<u8>>,
    named: Vec<(String, oci::Built)>,
}

fn template() -> Template {
    let sim = SimBackend::new();
    let store = Store::open_with(Arc::new(sim.clone()), opts()).expect("open");
    let lease = store.lease_create(None).expect("lease").id;
    let mut kept = BTreeMap::new();
    for i in 0..30 {
        let b = common::blob(i, if i % 5 == 0 { 20 * KIB } else { 900 });
        let d = store
            .put_with(&b, PutOptions::default().lease(&lease))
            .expect("put")
            .digest;
        kept.insert(d, b);
    }
    let mut named = Vec::new();
    for i in 0..3 {
        let img = oci::plain(&[vec![oci::file("f", &common::blob(100 + i, 10 * KIB))]]);
        let n = format!("docker.io/faults/x:{i}");
        img.store(&store, &n);
        named.push((n, img));
    }
    for i in 0..20 {
        store.put(&common::blob(200 + i, 3000)).expect("garbage");
    }
    // Garbage images too, for the collection to sweep and compact.
    for i in 0..3 {
        let img = oci::plain(&[vec![oci::file("g", &common::blob(300 + i, 18 * KIB))]]);
        img.store(&store, &format!("faults/gone:{i}"));
        store
            .remove_image(&format!("faults/gone:{i}"), false)
            .expect("rmi");
    }
    drop(store);
    Template {
        sim,
        lease,
        kept,
        named,
    }
}

type Action = fn(&Store, &Template) -> layerstore::Result<()>;

fn import(store: &Store, _: &Template) -> layerstore::Result<()> {
    let a = oci::plain(&[vec![oci::file("a", &common::blob(400, 30 * KIB))]]);
    let b = oci::plain(&[vec![oci::file("b", &common::blob(401, 2 * KIB))]]);
    let mut o = ImportOptions::default();
    o.base_name = Some("faults/new".into());
    store
        .import_tar(
            oci::oci_archive(&[(&a, "a"), (&b, "b")], &[]).as_slice(),
            &o,
        )
        .map(|_| ())
}

fn puts(store: &Store, t: &Template) -> layerstore::Result<()> {
    store.put_with(
        &common::blob(500, 40 * KIB),
        PutOptions::default().lease(&t.lease),
    )?;
    let batch: Vec<Vec<u8>> = (0..15).map(|i| common::blob(600 + i, 2500)).collect();
    store.put_many(&batch)?;
    let mut ing = store.ingest("faulty", PutOptions::default().lease(&t.lease))?;
    ing.write_all(&common::blob(700, 50 * KIB))?;
    ing.sync()?;
    ing.write_all(&common::blob(701, 1000))?;
    ing.commit().map(|_| ())
}

fn collect(store: &Store, _: &Template) -> layerstore::Result<()> {
    store
        .gc(
            &GcOptions::default()
                .grace(Duration::ZERO)
                .compact_threshold(0.2)
                .orphan_age(Duration::ZERO),
            &AtomicBool::new(false),
        )
        .map(|_| ())
}

/// After the fault is gone: everything acknowledged is there and the store works.
fn healthy(sim: &SimBackend, t: &Template, what: &str) {
    let store = Store::open_with(Arc::new(sim.clone()), opts())
        .unwrap_or_else(|e| panic!("{what}: open after the fault: {e:?}"));
    for (d, b) in &t.kept {
        let got = store
            .get(d)
            .unwrap_or_else(|e| panic!("{what}: {d} lost: {e:?}"));
        assert!(*got == **b, "{what}: {d}: wrong bytes");
    }
    for (n, img) in &t.named {
        assert_eq!(store.resolve(n).ok(), Some(img.digest), "{what}: {n}");
        for b in img.blobs() {
            assert!(
                store.get(&common::sha256(b)).is_ok(),
                "{what}: {n} lacks a blob"
            );
        }
    }
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    assert_eq!(r.errors, 0, "{what}: {:#?}", r.problems);
    store
        .put(b"writes after the fault")
        .unwrap_or_else(|e| panic!("{what}: put: {e:?}"));
    collect(&store, t).unwrap_or_else(|e| panic!("{what}: gc: {e:?}"));
}

/// How many times `op` happens during `action` on a copy of the template.
fn count(t: &Template, action: Action, op: SimOp) -> u64 {
    let sim = t.sim.crash();
    let store = Store::open_with(Arc::new(sim.clone()), opts()).expect("open");
    let before = sim.count(op);
    action(&store, t).expect("the action works without faults");
    sim.count(op) - before
}

/// The positions to try: all of them, or about 12 spread evenly.
fn positions(n: u64) -> Vec<u64> {
    if std::env::var("LAYERSTORE_FAULTS").is_ok_and(|v| v == "all") || n <= 12 {
        (0..n).collect()
    } else {
        (0..12).map(|i| i * n / 12).collect()
    }
}

#[test]
fn a_fault_at_any_point_of_an_operation_loses_nothing() {
    let t = template();
    let actions: [(&str, Action); 3] = [("import", import), ("puts", puts), ("gc", collect)];
    let faults = [
        (SimOp::Write, ENOSPC),
        (SimOp::MetaWrite, ENOSPC),
        (SimOp::Create, EMFILE),
        (SimOp::Open, EMFILE),
        (SimOp::Sync, EIO),
        (SimOp::MetaSync, EIO),
        (SimOp::Read, EIO),
        (SimOp::Rename, EIO),
    ];
    let mut tried = 0u64;
    for (name, action) in actions {
        for (op, errno) in faults {
            let n = count(&t, action, op);
            for at in positions(n) {
                let what = format!("{name}: errno {errno} at {op:?} #{at} of {n}");
                let sim = t.sim.crash();
                let store = Store::open_with(Arc::new(sim.clone()), opts()).expect("open");
                sim.inject(Fault::after(op, at, errno));
                // An error is fine; a panic fails the test.
                let _ = action(&store, &t);
                sim.clear_faults();
                drop(store);
                healthy(&sim, &t, &what);
                // And after a power loss right then.
                healthy(&sim.crash(), &t, &format!("{what}, then a crash"));
                tried += 1;
            }
        }
    }
    eprintln!("faults: {tried} injected");
    assert!(tried > 100, "{tried}");
}

/// A disk that really fills (the simulated one has a size): every write fails with
/// ENOSPC from some point on; removing names and collecting still work, then writes do.
#[test]
fn a_disk_that_fills_up_is_collected_and_writable_again() {
    let sim = SimBackend::new();
    let o = opts().reserve(2 * MIB as u64);
    let store = Store::open_with(Arc::new(sim.clone()), o.clone()).expect("open");
    sim.set_capacity(Some(sim.used() + 6 * MIB as u64));
    let mut names = Vec::new();
    for i in 0.. {
        let img = oci::plain(&[vec![oci::file("f", &common::blob(i, 60 * KIB))]]);
        let n = format!("fill/x:{i}");
        let mut o = ImportOptions::default();
        o.tags = vec![n.clone()];
        match store.import_tar(oci::oci_archive(&[(&img, "t")], &[]).as_slice(), &o) {
            Ok(_) => names.push(n),
            Err(e) => {
                assert!(e.is_no_space(), "{e:?}");
                break;
            }
        }
    }
    assert!(names.len() > 5);
    for n in &names {
        store.remove_image(n, false).expect("rmi on a full disk");
    }
    store
        .gc(
            &GcOptions::default().grace(Duration::ZERO),
            &AtomicBool::new(false),
        )
        .expect("gc on a full disk");
    let info = store.info().unwrap();
    assert_eq!(info.blobs, 0, "{info:?}");
    store
        .put(&common::blob(9, 100 * KIB))
        .expect("writes again");
    drop(store);
    let store = Store::open_with(Arc::new(sim.crash()), o).expect("reopen");
    assert_eq!(
        store
            .verify(
                &VerifyOptions::depth(Depth::Deep),
                &AtomicBool::new(false),
                &|_| {}
            )
            .unwrap()
            .errors,
        0
    );
}

// ---------------------------------------------------------------------------------------
// A real full disk: a small tmpfs (needs root; CI runs as root and sets LAYERSTORE_CI).
// ---------------------------------------------------------------------------------------

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn tmpfs(size: &str) -> Option<Tmpfs> {
    let dir = common::tempdir();
    let ok = rustix::process::geteuid().is_root()
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(Tmpfs { dir });
    }
    assert!(
        std::env::var_os("LAYERSTORE_CI").is_none(),
        "CI must be able to mount a tmpfs (it runs as root)"
    );
    eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this test)");
    None
}

fn cli_at(root: &Path, args: &[&str]) -> std::process::Output {
    common::cli(root, args)
}

#[test]
fn a_really_full_disk_is_collected_through_the_reserve() {
    let Some(fs) = tmpfs("24m") else { return };
    let root = fs.dir.path().join("store");
    common::ok_stdout(&cli_at(&root, &["init", "--shards", "2"]));
    assert!(
        root.join("reserve").exists(),
        "a small disk gets a small reserve"
    );
    let src = common::tempdir();
    let mut names = Vec::new();
    let mut full = None;
    for i in 0..200 {
        let img = oci::plain(&[vec![oci::file("f", &common::blob(i, 700 * KIB))]]);
        let ar = src.path().join(format!("{i}.tar"));
        std::fs::write(&ar, oci::oci_archive(&[(&img, "t")], &[])).unwrap();
        let n = format!("full/x:{i}");
        let out = cli_at(&root, &["import", ar.to_str().unwrap(), "--tag", &n]);
        if out.status.success() {
            names.push(n);
        } else {
            full = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let full = full.expect("the disk filled up");
    assert!(full.contains("No space left"), "{full}");
    assert!(names.len() > 5);
    for n in &names {
        common::ok_stdout(&cli_at(&root, &["rmi", n]));
    }
    common::ok_stdout(&cli_at(&root, &["gc", "--grace", "0s"]));
    let info: serde_json::Value =
        serde_json::from_str(&common::ok_stdout(&cli_at(&root, &["info", "--json"]))).unwrap();
    assert_eq!(info["blobs"], 0, "{info}");
    common::ok_stdout(&cli_at(&root, &["verify", "--deep"]));
    let f = src.path().join("again");
    std::fs::write(&f, common::blob(7, 2 * MIB)).unwrap();
    common::ok_stdout(&cli_at(&root, &["blob", "put", f.to_str().unwrap()]));
    assert!(
        root.join("reserve").exists(),
        "the reserve is back once there is room"
    );
}
