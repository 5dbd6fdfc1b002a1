//! Concurrency: eight threads share one store, putting (single, batched and streamed) and
//! reading at once, racing on a pool of shared blobs; every read is checked, and the counts,
//! the files on disk and a reopen agree with the union of what they put.

use std::collections::BTreeMap;

use layerstore::format::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use layerstore::{Digest, Options, PutOptions, Store};
use rand::Rng;

use crate::common::{self, KIB};

const LARGE: usize = 32 * KIB;
const THREADS: u64 = 8;
const ROUNDS: u64 = 60;
const SHARED: u64 = 30;

fn opts() -> Options {
    // Fewer shards than threads, so writers also wait for a shard; small segments, so
    // segments are sealed while other threads read them.
    Options::default()
        .large_threshold(LARGE as u64)
        .segment_size(256 * KIB as u64)
        .shards(4)
}

/// Length of a shared-pool blob (every thread derives the same bytes for a seed).
fn shared_len(s: u64) -> usize {
    [0, 100, 5 * KIB, LARGE - 1, LARGE, LARGE + 77, 3 * LARGE][(s % 7) as usize]
}

/// A blob spec: seed and length; bytes are `common::blob(seed, len)`.
type Spec = (u64, usize);

fn pick(rng: &mut rand::rngs::StdRng, t: u64, i: u64, j: u64) -> Spec {
    if rng.random_range(0..10) < 3 {
        let s = 1_000_000 + rng.random_range(0..SHARED);
        (s, shared_len(s))
    } else {
        let seed = t * 1_000_000_000 + i * 1_000 + j;
        (seed, common::mixed_size(rng, LARGE))
    }
}

fn verify(store: &Store, d: &Digest, spec: Spec) {
    let got = store.get(d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
    assert!(
        &*got == common::blob(spec.0, spec.1).as_slice(),
        "bytes of {d} differ"
    );
}

fn worker(store: &Store, t: u64) -> Vec<(Digest, Spec)> {
    let mut rng = common::rng(0xC0C0 + t);
    let mut mine: Vec<(Digest, Spec)> = Vec::new();
    for i in 0..ROUNDS {
        let written: Vec<(Digest, Spec)> = match i % 3 {
            0 => {
                let spec = pick(&mut rng, t, i, 0);
                let data = common::blob(spec.0, spec.1);
                let d = store.put(&data).expect("put");
                vec![(d.digest, spec)]
            }
            1 => {
                let specs: Vec<Spec> = (0..6).map(|j| pick(&mut rng, t, i, j)).collect();
                let blobs: Vec<Vec<u8>> = specs.iter().map(|&(s, n)| common::blob(s, n)).collect();
                let descs = store.put_many(&blobs).expect("put_many");
                assert_eq!(descs.len(), specs.len());
                descs.iter().map(|d| d.digest).zip(specs).collect()
            }
            _ => {
                let spec = pick(&mut rng, t, i, 0);
                let data = common::blob(spec.0, spec.1);
                let mut ing = store
                    .ingest(&format!("thread-{t}-{i}"), PutOptions::default())
                    .expect("ingest");
                for c in data.chunks(5_000) {
                    ing.write_all(c).expect("write");
                }
                vec![(ing.commit().expect("commit").digest, spec)]
            }
        };
        for (d, spec) in &written {
            assert_eq!(*d, common::sha256(&common::blob(spec.0, spec.1)));
            verify(store, d, *spec);
            assert!(store.contains(d).expect("contains"));
        }
        mine.extend(written);
        // Read back some older blobs of ours, and whatever of the shared pool is there.
        for _ in 0..3 {
            let (d, spec) = mine[rng.random_range(0..mine.len())];
            verify(store, &d, spec);
        }
        let s = 1_000_000 + rng.random_range(0..SHARED);
        let spec = (s, shared_len(s));
        let d = common::sha256(&common::blob(spec.0, spec.1));
        if store.contains(&d).expect("contains") {
            verify(store, &d, spec);
        }
    }
    mine
}

#[test]
fn eight_threads_put_and_read_one_store() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, opts());

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = store.clone();
            std::thread::spawn(move || worker(&s, t))
        })
        .collect();
    let mut all: BTreeMap<Digest, Spec> = BTreeMap::new();
    for h in handles {
        all.extend(h.join().expect("worker thread"));
    }
    let expected: BTreeMap<Digest, Vec<u8>> = all
        .iter()
        .map(|(d, &(s, n))| (*d, common::blob(s, n)))
        .collect();

    let check = |store: &Store| {
        let info = store.info().expect("info");
        assert_eq!(
            info.blobs,
            expected.len() as u64,
            "one entry per distinct blob"
        );
        assert_eq!(
            info.bytes,
            expected.values().map(|v| v.len() as u64).sum::<u64>()
        );
        let large: Vec<u64> = expected
            .values()
            .map(|v| v.len() as u64)
            .filter(|&n| n >= LARGE as u64)
            .collect();
        assert_eq!(info.large_blobs, large.len() as u64);
        assert_eq!(info.large_bytes, large.iter().sum::<u64>());
        assert_eq!(
            common::large_files(&root).len() as u64,
            info.large_blobs,
            "copies that lost a put race are removed"
        );
        let packed: u64 = common::pack_files(&root)
            .values()
            .map(|n| n - SEGMENT_HEADER_LEN)
            .sum();
        assert_eq!(
            packed,
            info.live_bytes - info.large_bytes - info.large_blobs * RECORD_HEADER_LEN
                + info.dead_bytes,
            "pack bytes are live records plus dead ones from lost races"
        );
        common::assert_all_readable(store, &expected);
        common::assert_listing(store, &expected);
        common::assert_ingest_clean(&root);
    };
    check(&store);
    drop(store);
    let store = common::open_with(&root, opts());
    check(&store);
}
