//! Reopening: what was put before a store was dropped is all there after it is opened
//! again, with the same statistics, kinds and listing.

use std::collections::BTreeMap;

use layerstore::{Digest, Error, Kind, Options, PutOptions, Store};

use crate::common::{self, KIB};

const LARGE: usize = 64 * KIB;

#[test]
fn everything_put_is_readable_after_reopen() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let opts = Options::default().large_threshold(LARGE as u64).shards(4);
    let store = common::open_with(&root, opts.clone());

    let mut expected: BTreeMap<Digest, Vec<u8>> = BTreeMap::new();
    let mut kinds: BTreeMap<Digest, Kind> = BTreeMap::new();
    let mut rng = common::rng(42);
    // Index and manifest kinds must be valid image JSON (they are parsed for edges);
    // their round trip through a reopen is covered in `images`.
    let all_kinds = [Kind::Other, Kind::Config, Kind::Layer];
    for round in 0..10u64 {
        let batch: Vec<Vec<u8>> = (0..40)
            .map(|i| common::blob(round * 1000 + i, common::mixed_size(&mut rng, LARGE)))
            .collect();
        for d in store.put_many(&batch).expect("put_many") {
            kinds.entry(d.digest).or_insert(Kind::Other);
        }
        for b in batch {
            expected.insert(common::sha256(&b), b);
        }
        for (i, kind) in all_kinds.iter().enumerate() {
            let data = common::blob(round * 1000 + 500 + i as u64, 100 + i * LARGE / 2);
            let d = store
                .put_with(&data, PutOptions::default().kind(*kind))
                .expect("put_with kind")
                .digest;
            kinds.insert(d, *kind);
            expected.insert(d, data);
        }
    }
    let info_before = store.info().expect("info");
    assert_eq!(info_before.blobs, expected.len() as u64);
    common::assert_listing(&store, &expected);
    drop(store);

    // Reopen with create(false) (the store exists) and different per-open settings.
    let store = common::open_with(
        &root,
        Options::default().create(false).large_threshold(1 << 30),
    );
    assert_eq!(
        store.info().expect("info"),
        info_before,
        "statistics survive"
    );
    assert_eq!(
        store.info().expect("info").shards,
        4,
        "the shard count is fixed at init"
    );
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
    for (d, kind) in &kinds {
        let info = store.stat(d).expect("stat").expect("present");
        assert_eq!(info.kind, *kind, "kind of {d}");
        assert_eq!(info.blake3, *blake3::hash(&expected[d]).as_bytes());
    }

    // Puts after the reopen land next to the old blobs.
    let more = common::blob(99_999, 3 * KIB);
    let d = store.put(&more).expect("put after reopen").digest;
    expected.insert(d, more);
    drop(store);
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
}

#[test]
fn open_without_create_on_missing_store_is_no_store() {
    let dir = common::tempdir();
    let root = dir.path().join("absent");
    match Store::open(&root, Options::default().create(false)) {
        Err(Error::NoStore { path }) => assert_eq!(path, root),
        Err(e) => panic!("expected NoStore, got {e:?}"),
        Ok(_) => panic!("expected NoStore, got a store"),
    }
    assert!(!root.exists(), "a refused open creates nothing");
}
