//! A model check: long random sequences of puts, batches, ingests (some suspended and
//! resumed), rejected puts, reopens and torn segment tails, against a `BTreeMap` of what
//! must be stored. Small segments and a small large-blob threshold make every sequence
//! seal segments and write large files. Seeds are fixed, so a failure replays exactly.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use layerstore::{Digest, Error, Options, PutOptions, Store};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::{self, KIB};

const LARGE: usize = 16 * KIB;

fn opts() -> Options {
    Options::default()
        .large_threshold(LARGE as u64)
        .segment_size(8 * KIB as u64)
        .shards(3)
}

struct Run {
    rng: StdRng,
    model: BTreeMap<Digest, Vec<u8>>,
    next_seed: u64,
    /// A suspended ingest: ref, all its bytes, and how many were written.
    suspended: Option<(String, Vec<u8>, usize)>,
}

impl Run {
    fn new_blob(&mut self) -> Vec<u8> {
        // Now and then bytes that are already stored.
        if !self.model.is_empty() && self.rng.random_range(0..5) == 0 {
            let i = self.rng.random_range(0..self.model.len());
            return self.model.values().nth(i).expect("index in range").clone();
        }
        self.next_seed += 1;
        let len = match self.rng.random_range(0..10) {
            0 => 0,
            1..=6 => self.rng.random_range(1..4 * KIB),
            7 | 8 => self.rng.random_range(4 * KIB..LARGE),
            _ => self.rng.random_range(LARGE..3 * LARGE),
        };
        common::blob(self.next_seed, len)
    }

    /// Runs one random operation; returns what the caller must do with the store.
    fn step(&mut self, store: &Store) -> Next {
        match self.rng.random_range(0..100) {
            0..=29 => {
                let b = self.new_blob();
                let d = store.put(&b).expect("put");
                assert_eq!(d.digest, common::sha256(&b));
                self.model.insert(d.digest, b);
            }
            30..=49 => {
                let n = self.rng.random_range(0..8);
                let batch: Vec<Vec<u8>> = (0..n).map(|_| self.new_blob()).collect();
                let descs = store.put_many(&batch).expect("put_many");
                assert_eq!(descs.len(), batch.len());
                for (d, b) in descs.iter().zip(batch) {
                    assert_eq!(d.digest, common::sha256(&b));
                    self.model.insert(d.digest, b);
                }
            }
            50..=59 => self.ingest_step(store),
            60..=64 => {
                // A rejected put changes nothing.
                let b = self.new_blob();
                let before = store.info().expect("info").blobs;
                let wrong = common::sha256(&[b.as_slice(), b"x"].concat());
                assert!(matches!(
                    store.put_with(&b, PutOptions::default().expect(wrong)),
                    Err(Error::DigestMismatch { .. })
                ));
                assert_eq!(store.info().expect("info").blobs, before);
            }
            65..=69 => return Next::Reopen,
            70..=72 => return Next::TornReopen,
            _ => {
                // Read a few blobs back, whole and in ranges.
                for _ in 0..4 {
                    if self.model.is_empty() {
                        break;
                    }
                    let i = self.rng.random_range(0..self.model.len());
                    let (d, b) = self.model.iter().nth(i).expect("index in range");
                    let got = store.get(d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
                    assert!(*got == **b, "bytes of {d}");
                    let off = self.rng.random_range(0..=b.len()) as u64;
                    let r = store.read_range(d, off, 100).expect("read_range");
                    let end = (off as usize + 100).min(b.len());
                    assert!(*r == b[off as usize..end], "range of {d}");
                }
            }
        }
        Next::Continue
    }

    fn ingest_step(&mut self, store: &Store) {
        let (r#ref, data, from) = if let Some(s) = self.suspended.take() {
            s
        } else {
            self.next_seed += 1;
            (format!("model-{}", self.next_seed), self.new_blob(), 0)
        };
        let po = PutOptions::default().expect(common::sha256(&data));
        let mut ing = store.ingest(&r#ref, po).expect("ingest");
        assert_eq!(ing.offset(), from as u64, "resumes where it stopped");
        let to = if self.rng.random_range(0..3) == 0 {
            self.rng.random_range(from..=data.len())
        } else {
            data.len()
        };
        let mut at = from;
        while at < to {
            let n = self.rng.random_range(1..=3 * KIB).min(to - at);
            ing.write_all(&data[at..at + n]).expect("write");
            at += n;
        }
        if to < data.len() {
            assert_eq!(ing.suspend().expect("suspend"), to as u64);
            self.suspended = Some((r#ref, data, to));
        } else {
            let d = ing.commit().expect("commit");
            assert_eq!(d.digest, common::sha256(&data));
            self.model.insert(d.digest, data);
        }
    }

    fn check_all(&self, store: &Store) {
        common::assert_all_readable(store, &self.model);
        common::assert_listing(store, &self.model);
        let info = store.info().expect("info");
        assert_eq!(info.blobs, self.model.len() as u64);
        assert_eq!(
            info.bytes,
            self.model.values().map(|v| v.len() as u64).sum::<u64>()
        );
    }
}

/// What to do with the store after a step.
enum Next {
    Continue,
    /// Drop it and open it again.
    Reopen,
    /// Drop it, append garbage to the newest segment of every shard, and open it again.
    TornReopen,
}

/// Appends garbage to the newest segment of every shard (the store must be closed).
fn tear_tails(root: &Path, rng: &mut StdRng) {
    for (path, _) in common::newest_pack_per_shard(root).into_values() {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open segment");
        let n = rng.random_range(1..2_000);
        f.write_all(&common::blob(rng.random(), n))
            .expect("append garbage");
    }
}

#[test]
fn random_operations_match_a_model() {
    for seed in 1..=4u64 {
        let dir = common::tempdir();
        let root = dir.path().to_owned();
        let mut store = Some(common::open_with(&root, opts()));
        let mut run = Run {
            rng: common::rng(seed),
            model: BTreeMap::new(),
            next_seed: seed * 1_000_000,
            suspended: None,
        };
        for _ in 0..250 {
            let next = run.step(store.as_ref().expect("open store"));
            match next {
                Next::Continue => {}
                Next::Reopen => {
                    drop(store.take());
                    store = Some(common::open_with(&root, opts()));
                }
                Next::TornReopen => {
                    drop(store.take());
                    tear_tails(&root, &mut run.rng);
                    store = Some(common::open_with(&root, opts()));
                }
            }
        }
        let store = store.expect("open store");
        run.check_all(&store);
        let info = store.info().expect("info");
        assert!(
            info.sealed_segments > 0,
            "seed {seed} sealed segments: {info:?}"
        );
        assert!(info.large_blobs > 0, "seed {seed} wrote large blobs");
        drop(store);
        let store = common::open_with(&root, opts());
        run.check_all(&store);
    }
}
