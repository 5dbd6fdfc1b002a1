//! Concurrency stress in one process: a collector in a loop (with compaction), 8 writers
//! (puts small and large, batches, ingests under leases, imports, tag and rmi,
//! containers, lease rotation, garbage), 8 readers checking the bytes of protected blobs,
//! and a `verify --repair` in a loop — for a bounded number of operations. Nothing
//! protected may be lost or read wrong, no healthy blob may be quarantined, verify may
//! report no problem, and everything must finish (a watchdog fails a deadlock).
//!
//! CI runs a short sample; `LAYERSTORE_STRESS_OPS=2000 cargo test --release -p layerstore
//! --test integration stress -- --nocapture` is the long run (docs/RELIABILITY.md).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerstore::{
    Depth, Digest, GcOptions, ImportOptions, Options, PutOptions, Store, VerifyOptions,
};
use rand::Rng;

use crate::common::{self, KIB};
use crate::oci;

/// Protected blobs every reader may check: digest -> bytes.
type Protected = Arc<Mutex<BTreeMap<Digest, Arc<Vec<u8>>>>>;

fn writer(store: &Store, w: u64, ops: u64, protected: &Protected) {
    let mut rng = common::rng(w);
    let mut lease = store.lease_create(None).expect("lease").id;
    let mut mine: Vec<Digest> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let protect = |store: &Store, lease: &str, b: Vec<u8>, mine: &mut Vec<Digest>| {
        let b = Arc::new(b);
        let d = store
            .put_with(&b, PutOptions::default().lease(lease))
            .expect("put")
            .digest;
        assert!(*store.get(&d).expect("read back") == *b);
        mine.push(d);
        protected.lock().unwrap().insert(d, b);
    };
    for i in 0..ops {
        let seed = w * 1_000_000 + i;
        match rng.random_range(0..100u32) {
            0..=29 => protect(
                store,
                &lease,
                common::blob(seed, rng.random_range(0..5000)),
                &mut mine,
            ),
            30..=37 => protect(
                store,
                &lease,
                common::blob(seed, rng.random_range(40 * KIB..200 * KIB)),
                &mut mine,
            ),
            38..=47 => {
                let batch: Vec<Vec<u8>> = (0..20)
                    .map(|j| common::blob(seed * 100 + j, rng.random_range(0..3000)))
                    .collect();
                let ds: Vec<Digest> = store
                    .put_many(&batch)
                    .expect("put_many")
                    .iter()
                    .map(|d| d.digest)
                    .collect();
                store.lease_add(&lease, &ds).expect("lease add");
                let mut p = protected.lock().unwrap();
                for (d, b) in ds.iter().zip(batch) {
                    mine.push(*d);
                    p.insert(*d, Arc::new(b));
                }
            }
            48..=54 => {
                let data = Arc::new(common::blob(seed, rng.random_range(1000..150 * KIB)));
                let mut ing = store
                    .ingest(&format!("w{w}-{i}"), PutOptions::default().lease(&lease))
                    .expect("ingest");
                for c in data.chunks(8 * KIB) {
                    ing.write_all(c).expect("write");
                }
                let d = ing.commit().expect("commit").digest;
                mine.push(d);
                protected.lock().unwrap().insert(d, data);
            }
            55..=64 => {
                let img = oci::plain(&[vec![oci::file(
                    "f",
                    &common::blob(seed, rng.random_range(10..60 * KIB)),
                )]]);
                let name = format!("i{i}");
                let mut o = ImportOptions::default();
                o.base_name = Some(format!("stress/w{w}"));
                store
                    .import_tar(oci::oci_archive(&[(&img, &name)], &[]).as_slice(), &o)
                    .expect("import");
                names.push(format!("stress/w{w}:{name}"));
                let target = common::tempdir();
                store
                    .unpack(
                        &format!("stress/w{w}:{name}"),
                        &target.path().join("r"),
                        &layerstore::unpack::UnpackOptions::default(),
                    )
                    .expect("a named image unpacks whole");
            }
            65..=71 if !names.is_empty() => {
                let n = names.swap_remove(rng.random_range(0..names.len()));
                store.remove_image(&n, false).expect("rmi");
            }
            72..=76 if !names.is_empty() => {
                let n = names[rng.random_range(0..names.len())].clone();
                let c = store.container_create(&n, None).expect("container");
                store.remove_image(&n, true).expect("rmi --force");
                assert!(
                    store.resolve(&c.image.to_string()).is_ok(),
                    "the container keeps it"
                );
                store.container_remove(&c.id).expect("container rm");
                names.retain(|x| *x != n);
            }
            77..=80 => {
                // Lease rotation: everything moves to a new lease, the old one goes.
                let next = store.lease_create(None).expect("lease").id;
                store.lease_add(&next, &mine).expect("lease add");
                store.lease_remove(&lease).expect("lease rm");
                lease = next;
            }
            _ => {
                store
                    .put(&common::blob(seed, rng.random_range(0..20 * KIB)))
                    .expect("garbage");
            }
        }
    }
}

#[test]
fn collector_writers_readers_and_repair_at_once_lose_nothing() {
    let ops: u64 = std::env::var("LAYERSTORE_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let dir = common::tempdir();
    let store = Arc::new(common::open_with(
        dir.path(),
        Options::default()
            .shards(4)
            .segment_size(64 * KIB as u64)
            .large_threshold(32 * KIB as u64),
    ));
    let protected: Protected = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, gcs, verifies) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let mut background = Vec::new();
    {
        let (s, stop, gcs) = (store.clone(), stop.clone(), gcs.clone());
        background.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                s.gc(
                    &GcOptions::default()
                        .grace(Duration::ZERO)
                        .compact_threshold(0.3)
                        .orphan_age(Duration::ZERO),
                    &AtomicBool::new(false),
                )
                .expect("gc");
                gcs.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (s, stop, verifies) = (store.clone(), stop.clone(), verifies.clone());
        background.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = s
                    .verify(
                        &VerifyOptions::default().repair(true),
                        &AtomicBool::new(false),
                        &|_| {},
                    )
                    .expect("verify --repair");
                assert_eq!(r.errors, 0, "verify beside everything: {:#?}", r.problems);
                let q = r.repaired.map(|r| r.quarantined).unwrap_or_default();
                assert!(q.is_empty(), "healthy blobs quarantined: {q:?}");
                verifies.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for r in 0..8u64 {
        let (s, stop, p, reads) = (
            store.clone(),
            stop.clone(),
            protected.clone(),
            reads.clone(),
        );
        background.push(std::thread::spawn(move || {
            let mut rng = common::rng(100 + r);
            while !stop.load(Ordering::Relaxed) {
                let pick = {
                    let p = p.lock().unwrap();
                    if p.is_empty() {
                        None
                    } else {
                        let k = rng.random_range(0..p.len());
                        p.iter().nth(k).map(|(d, b)| (*d, b.clone()))
                    }
                };
                let Some((d, b)) = pick else {
                    std::thread::yield_now();
                    continue;
                };
                match s.get(&d) {
                    Ok(got) => assert!(*got == *b, "reader: wrong bytes for {d}"),
                    Err(e) => panic!("reader: protected {d}: {e:?}"),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let (s, p) = (store.clone(), protected.clone());
            std::thread::spawn(move || writer(&s, w, ops, &p))
        })
        .collect();
    // A watchdog: a deadlock fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(600);
    for w in writers {
        while !w.is_finished() {
            assert!(
                Instant::now() < deadline,
                "writers did not finish: deadlock?"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        while !b.is_finished() {
            assert!(
                Instant::now() < deadline,
                "background did not finish: deadlock?"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b.join().expect("background thread");
    }
    let p = protected.lock().unwrap();
    for (d, b) in p.iter() {
        assert!(*store.get(d).expect("protected") == **b);
    }
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    assert_eq!(r.errors, 0, "{:#?}", r.problems);
    eprintln!(
        "stress: {} writer ops, {} protected blobs, {} reads, {} collections, {} verify --repair, {:.1} s",
        8 * ops,
        p.len(),
        reads.load(Ordering::Relaxed),
        gcs.load(Ordering::Relaxed),
        verifies.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert!(gcs.load(Ordering::Relaxed) > 0 && verifies.load(Ordering::Relaxed) > 0);
}
