//! Rejected content: a wrong expected digest or size (through `put_with`, through an
//! ingest's commit, and an ingest that grows past its expected size) fails with an error
//! naming both sides and leaves nothing behind: no index entry, no counter change, no
//! pack or large bytes, no ingest directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use layerstore::{Digest, Error, Info, Options, PutOptions, Store};

use crate::common::{self, KIB};

const LARGE: usize = 64 * KIB;

/// What must not change when a put is rejected.
#[derive(Debug, PartialEq)]
struct Footprint {
    blobs: u64,
    bytes: u64,
    large_blobs: u64,
    live_bytes: u64,
    packs: BTreeMap<PathBuf, u64>,
    large: BTreeMap<PathBuf, u64>,
}

fn footprint(store: &Store, root: &Path) -> Footprint {
    let Info {
        blobs,
        bytes,
        large_blobs,
        live_bytes,
        ..
    } = store.info().expect("info");
    Footprint {
        blobs,
        bytes,
        large_blobs,
        live_bytes,
        packs: common::pack_files(root),
        large: common::large_files(root),
    }
}

/// A store with a few small and large blobs in it already.
fn seeded_store(root: &Path) -> Store {
    let store = common::open_with(root, Options::default().large_threshold(LARGE as u64));
    store
        .put_many([
            common::blob(1, 10),
            common::blob(2, 3 * KIB),
            common::blob(3, LARGE + 5),
        ])
        .expect("seed");
    store
}

fn assert_absent(store: &Store, digests: &[Digest]) {
    for d in digests {
        assert!(
            !store.contains(d).expect("contains"),
            "{d} must not be stored"
        );
        assert!(store.stat(d).expect("stat").is_none());
        assert!(matches!(store.get(d), Err(Error::NotFound(x)) if x == *d));
    }
}

#[test]
fn put_with_wrong_digest_or_size_stores_nothing() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = seeded_store(&root);
    let before = footprint(&store, &root);

    let wrong = common::sha256(b"something else entirely");
    for (seed, len) in [
        (10u64, 0usize),
        (11, 100),
        (12, LARGE - 1),
        (13, LARGE),
        (14, 3 * LARGE),
    ] {
        let data = common::blob(seed, len);
        let actual = common::sha256(&data);

        // Wrong digest.
        match store.put_with(&data, PutOptions::default().expect(wrong)) {
            Err(Error::DigestMismatch {
                expected,
                actual: got,
            }) => {
                assert_eq!(expected, wrong, "expected side of a {len}-byte mismatch");
                assert_eq!(got, actual, "actual side of a {len}-byte mismatch");
            }
            other => panic!("{len} bytes with a wrong digest: {other:?}"),
        }
        let msg = store
            .put_with(&data, PutOptions::default().expect(wrong))
            .expect_err("mismatch")
            .to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&actual.to_string()),
            "the message names both digests: {msg}"
        );

        // Wrong size, right digest.
        let bad_size = len as u64 + 1;
        match store.put_with(
            &data,
            PutOptions::default().expect(actual).expect_size(bad_size),
        ) {
            Err(Error::SizeMismatch {
                expected,
                actual: got,
            }) => {
                assert_eq!(expected, bad_size);
                assert_eq!(got, len as u64);
            }
            other => panic!("{len} bytes with a wrong size: {other:?}"),
        }
        // Wrong size only.
        assert!(matches!(
            store.put_with(&data, PutOptions::default().expect_size(len as u64 + 7)),
            Err(Error::SizeMismatch { .. })
        ));

        assert_absent(&store, &[actual, wrong]);
        assert_eq!(
            footprint(&store, &root),
            before,
            "after {len}-byte rejections"
        );
        common::assert_ingest_clean(&root);
    }

    // The same store still accepts the right expectations.
    let data = common::blob(15, 2 * LARGE);
    let d = common::sha256(&data);
    let got = store
        .put_with(
            &data,
            PutOptions::default()
                .expect(d)
                .expect_size(data.len() as u64),
        )
        .expect("matching expectations");
    assert_eq!(got.digest, d);
    assert!(store.contains(&d).expect("contains"));
}

#[test]
fn ingest_commit_with_wrong_digest_or_size_stores_nothing() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = seeded_store(&root);
    let before = footprint(&store, &root);
    let wrong = common::sha256(b"not these bytes");

    for (seed, len) in [
        (20u64, 0usize),
        (21, 5 * KIB),
        (22, LARGE),
        (23, 4 * LARGE + 3),
    ] {
        let data = common::blob(seed, len);
        let actual = common::sha256(&data);

        // Wrong digest, found at commit.
        let r#ref = format!("wrong-digest-{len}");
        let mut ing = store
            .ingest(&r#ref, PutOptions::default().expect(wrong))
            .expect("start ingest");
        for chunk in data.chunks(7_001) {
            ing.write_all(chunk).expect("write");
        }
        assert!(common::ingest_dir(&root, &r#ref).exists());
        match ing.commit() {
            Err(Error::DigestMismatch {
                expected,
                actual: got,
            }) => {
                assert_eq!(expected, wrong);
                assert_eq!(got, actual);
            }
            other => panic!("ingest of {len} bytes with a wrong digest: {other:?}"),
        }
        assert!(!common::ingest_dir(&root, &r#ref).exists());

        // Expected size larger than what arrives, found at commit.
        let r#ref = format!("short-{len}");
        let mut ing = store
            .ingest(&r#ref, PutOptions::default().expect_size(len as u64 + 10))
            .expect("start ingest");
        ing.write_all(&data).expect("write");
        match ing.commit() {
            Err(Error::SizeMismatch {
                expected,
                actual: got,
            }) => {
                assert_eq!(expected, len as u64 + 10);
                assert_eq!(got, len as u64);
            }
            other => panic!("short ingest of {len} bytes: {other:?}"),
        }

        assert_absent(&store, &[actual, wrong]);
        assert_eq!(footprint(&store, &root), before, "after {len}-byte ingests");
        assert!(store.ingests().expect("ingests").is_empty());
        common::assert_ingest_clean(&root);
    }
}

#[test]
fn ingest_growing_past_expected_size_fails_early_and_leaves_nothing() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = seeded_store(&root);
    let before = footprint(&store, &root);

    for (seed, limit) in [(30u64, 100usize), (31, LARGE + 10), (32, 3 * LARGE)] {
        let data = common::blob(seed, limit + 50);
        let r#ref = format!("too-long-{limit}");
        let mut ing = store
            .ingest(&r#ref, PutOptions::default().expect_size(limit as u64))
            .expect("start ingest");
        let first = limit - 20;
        ing.write_all(&data[..first]).expect("within the limit");
        match ing.write_all(&data[first..]) {
            Err(Error::SizeMismatch { expected, actual }) => {
                assert_eq!(expected, limit as u64);
                assert_eq!(
                    actual,
                    data.len() as u64,
                    "actual counts the rejected write"
                );
            }
            other => panic!("writing past {limit} bytes: {other:?}"),
        }
        assert_eq!(ing.offset(), first as u64, "a rejected write adds nothing");
        drop(ing);
        assert!(!common::ingest_dir(&root, &r#ref).exists());
        assert_absent(
            &store,
            &[common::sha256(&data), common::sha256(&data[..first])],
        );
        assert_eq!(footprint(&store, &root), before);
        common::assert_ingest_clean(&root);
    }

    // Same, but committing after the rejected write: the short content is refused too.
    let data = common::blob(33, 2 * LARGE);
    let mut ing = store
        .ingest(
            "commit-after-overflow",
            PutOptions::default().expect_size(LARGE as u64 + 1),
        )
        .expect("start ingest");
    ing.write_all(&data[..LARGE]).expect("within the limit");
    assert!(matches!(
        ing.write_all(&data[LARGE..]),
        Err(Error::SizeMismatch { .. })
    ));
    assert!(matches!(
        ing.commit(),
        Err(Error::SizeMismatch { expected, actual })
            if expected == LARGE as u64 + 1 && actual == LARGE as u64
    ));
    assert_absent(
        &store,
        &[common::sha256(&data), common::sha256(&data[..LARGE])],
    );
    assert_eq!(footprint(&store, &root), before);
    common::assert_ingest_clean(&root);

    // And nothing came back after a reopen either.
    drop(store);
    let store = common::open_with(&root, Options::default().large_threshold(LARGE as u64));
    assert_eq!(footprint(&store, &root), before);
    assert!(store.ingests().expect("ingests").is_empty());
}
