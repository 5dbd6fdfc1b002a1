//! Dedupe: the same bytes stored twice (one put after another, twice in one batch, or
//! across `put`, `put_many` and ingest) are kept once, and the second put writes nothing.

use std::path::Path;
use std::time::Duration;

use layerstore::format::SEGMENT_HEADER_LEN;
use layerstore::{Digest, Options, PutOptions, Store};

use crate::common::{self, KIB};

const LARGE: usize = 64 * KIB;

/// Blob count, bytes of pack files and bytes of large files.
fn usage(store: &Store, root: &Path) -> (u64, u64, u64) {
    let (packs, large) = common::disk_totals(root);
    (store.info().expect("info").blobs, packs, large)
}

/// Bytes of records in pack files (without segment headers).
fn pack_records(root: &Path) -> u64 {
    common::pack_files(root)
        .values()
        .map(|n| n - SEGMENT_HEADER_LEN)
        .sum()
}

fn ingest(store: &Store, r#ref: &str, data: &[u8]) -> Digest {
    let mut ing = store
        .ingest(r#ref, PutOptions::default())
        .expect("start ingest");
    for c in data.chunks(3_333) {
        ing.write_all(c).expect("write");
    }
    ing.commit().expect("commit").digest
}

#[test]
fn same_bytes_are_stored_once() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().large_threshold(LARGE as u64));

    // One put after another, small and large.
    for (seed, len) in [
        (1u64, 0usize),
        (2, 1),
        (3, 10 * KIB),
        (4, LARGE),
        (5, 3 * LARGE),
    ] {
        let data = common::blob(seed, len);
        let first = store.put(&data).expect("first put");
        let after_first = usage(&store, &root);
        let second = store.put(&data).expect("second put");
        assert_eq!(first, second, "same descriptor for the same bytes");
        assert_eq!(usage(&store, &root), after_first, "{len} bytes put twice");
    }
    let base = usage(&store, &root);
    let base_records = pack_records(&root);

    // Twice (and three times) in one batch.
    let one = common::blob(10, 2 * KIB);
    let two = common::blob(11, 5 * KIB);
    let big = common::blob(12, 2 * LARGE);
    let batch = [&one, &one, &two, &big, &one, &big];
    let descs = store.put_many(batch).expect("batch with repeats");
    assert_eq!(descs.len(), 6, "one descriptor per input, repeats included");
    for (desc, data) in descs.iter().zip(batch) {
        assert_eq!(desc.digest, common::sha256(data));
    }
    let after_batch = usage(&store, &root);
    assert_eq!(
        after_batch.0,
        base.0 + 3,
        "three distinct blobs in the batch"
    );
    assert_eq!(
        pack_records(&root) - base_records,
        (128 + one.len() + 128 + two.len()) as u64,
        "each small blob appended once"
    );
    assert_eq!(
        after_batch.2 - base.2,
        (128 + big.len()) as u64,
        "one large file"
    );
    store.put_many([&two, &one, &big]).expect("batch again");
    assert_eq!(
        usage(&store, &root),
        after_batch,
        "a repeated batch writes nothing"
    );

    // Across put, put_many and ingest, in every order.
    for (i, len) in [7 * KIB, LARGE + 1].into_iter().enumerate() {
        let seed = 20 + i as u64 * 10;
        let first = common::blob(seed, len);
        let digest = store.put_many([&first]).expect("put_many")[0].digest;
        let used = usage(&store, &root);
        assert_eq!(store.put(&first).expect("put").digest, digest);
        assert_eq!(ingest(&store, &format!("x-{i}"), &first), digest);
        assert_eq!(
            usage(&store, &root),
            used,
            "put_many, then put and ingest ({len} bytes)"
        );

        let second = common::blob(seed + 1, len);
        let digest = ingest(&store, &format!("y-{i}"), &second);
        let used = usage(&store, &root);
        assert_eq!(store.put(&second).expect("put").digest, digest);
        assert_eq!(
            store.put_many([&second, &second]).expect("put_many")[1].digest,
            digest
        );
        assert_eq!(
            usage(&store, &root),
            used,
            "ingest, then put and put_many ({len} bytes)"
        );

        let third = common::blob(seed + 2, len);
        let digest = store.put(&third).expect("put").digest;
        let used = usage(&store, &root);
        assert_eq!(ingest(&store, &format!("z-{i}"), &third), digest);
        assert_eq!(
            store.put_many([&third]).expect("put_many")[0].digest,
            digest
        );
        assert_eq!(
            usage(&store, &root),
            used,
            "put, then ingest and put_many ({len} bytes)"
        );
    }
    common::assert_ingest_clean(&root);

    // Every large blob has exactly one file.
    let info = store.info().expect("info");
    assert_eq!(common::large_files(&root).len() as u64, info.large_blobs);
    assert_eq!(info.dead_bytes, 0, "no duplicate record was written");
}

#[test]
fn repeated_put_and_ensure_refresh_touched() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let data = common::blob(1, 1_000);
    let d = store.put(&data).expect("put").digest;
    let t0 = store.stat(&d).expect("stat").expect("present").touched_ms;
    assert!(t0 > 0, "a put records when it happened");

    std::thread::sleep(Duration::from_millis(20));
    store.put(&data).expect("second put");
    let t1 = store.stat(&d).expect("stat").expect("present").touched_ms;
    assert!(t1 > t0, "a repeated put refreshes touched ({t0} -> {t1})");

    std::thread::sleep(Duration::from_millis(20));
    assert!(store.ensure(&d).expect("ensure"));
    let t2 = store.stat(&d).expect("stat").expect("present").touched_ms;
    assert!(t2 > t1, "ensure refreshes touched ({t1} -> {t2})");

    // contains is a pure read; ensure of an absent blob stores nothing.
    assert!(store.contains(&d).expect("contains"));
    let t3 = store.stat(&d).expect("stat").expect("present").touched_ms;
    assert_eq!(t3, t2);
    let absent = common::absent_digest();
    assert!(!store.ensure(&absent).expect("ensure absent"));
    assert_eq!(store.info().expect("info").blobs, 1);
}

#[test]
fn repeats_far_apart_in_one_big_batch_are_stored_once() {
    // A batch of several MiB (put_many may process it in parts), with the same small and
    // large blobs at its start, middle and end.
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().large_threshold(LARGE as u64));
    let small = common::blob(1, 3 * KIB);
    let big = common::blob(2, 2 * LARGE);
    let fillers: Vec<Vec<u8>> = (0..200).map(|i| common::blob(100 + i, 30 * KIB)).collect();
    let mut batch: Vec<&Vec<u8>> = vec![&small, &big];
    for (i, f) in fillers.iter().enumerate() {
        batch.push(f);
        if i == 100 {
            batch.extend([&small, &big]);
        }
    }
    batch.extend([&fillers[0], &small, &big]);

    let descs = store.put_many(&batch).expect("put_many");
    assert_eq!(descs.len(), batch.len());
    for (d, data) in descs.iter().zip(&batch) {
        assert_eq!(d.digest, common::sha256(data), "descriptors in input order");
    }
    let info = store.info().expect("info");
    assert_eq!(info.blobs, 202, "200 fillers, one small, one large");
    assert_eq!(info.large_blobs, 1);
    assert_eq!(
        pack_records(&root),
        (128 + small.len() + 200 * (128 + 30 * KIB)) as u64,
        "each small blob appended once"
    );
    assert_eq!(common::large_files(&root).len(), 1);
    assert_eq!(info.dead_bytes, 0);

    // An empty batch stores nothing and returns nothing.
    let none = store
        .put_many(Vec::<Vec<u8>>::new())
        .expect("empty put_many");
    assert!(none.is_empty());
    assert_eq!(store.info().expect("info").blobs, 202);
}
