//! Reopening: what was put before a store was dropped is all there after it is opened
//! again, with the same statistics, kinds and listing.

use std::collections::BTreeMap;

use layerstore::{Digest, Error, Kind, Options, PutOptions, Store};
use redb::{MultimapTableHandle, ReadableDatabase, TableHandle};

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

/// Turns a store's index into the first form of schema 1 (§16 of FORMAT.md): only the
/// `blobs`, `segments` and `meta` tables.
fn strip_to_first_form(root: &std::path::Path) {
    let db = redb::Database::open(root.join("meta.redb")).expect("open the index directly");
    let txn = db.begin_write().expect("write");
    let later: Vec<String> = txn
        .list_tables()
        .expect("tables")
        .map(|t| t.name().to_owned())
        .filter(|n| !["blobs", "segments", "meta"].contains(&n.as_str()))
        .collect();
    for n in &later {
        let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(n);
        // Tables of other key types: deleting by name does not check the types.
        let _ = txn.delete_table(def);
    }
    let multimaps: Vec<String> = txn
        .list_multimap_tables()
        .expect("multimap tables")
        .map(|t| t.name().to_owned())
        .collect();
    for n in &multimaps {
        let def: redb::MultimapTableDefinition<&[u8], &[u8]> =
            redb::MultimapTableDefinition::new(n);
        txn.delete_multimap_table(def)
            .expect("delete multimap table");
    }
    txn.commit().expect("commit");
    let txn = db.begin_read().expect("read");
    let left: Vec<String> = txn
        .list_tables()
        .expect("tables")
        .map(|t| t.name().to_owned())
        .collect();
    assert_eq!(
        left.len(),
        3,
        "only the first form's tables are left: {left:?}"
    );
    assert_eq!(txn.list_multimap_tables().expect("multimap").count(), 0);
}

#[test]
fn a_store_of_the_first_form_is_upgraded_by_a_writable_open_and_read_only_commands_work() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);
    let small = store.put(b"first form").expect("put").digest;
    let large = store
        .put(&common::blob(7, 3 << 20))
        .expect("put large")
        .digest;
    drop(store);
    strip_to_first_form(&root);
    let index = std::fs::read(root.join("meta.redb")).expect("read index");

    // A read-only open writes nothing and says what it needs.
    match Store::open(&root, Options::default().read_only(true)) {
        Err(Error::NeedsRecovery { why, .. }) => assert!(why.contains("earlier build"), "{why}"),
        other => panic!("expected NeedsRecovery, got {:?}", other.map(|_| ())),
    }
    assert_eq!(std::fs::read(root.join("meta.redb")).expect("read"), index);

    // Read-only commands open it writable once (as after a crash) and work.
    for args in [
        vec!["images"],
        vec!["lease", "ls"],
        vec!["container", "ls"],
        vec!["df"],
    ] {
        let out = common::cli(&root, &args);
        assert!(
            out.status.success(),
            "`store {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = Store::open(&root, Options::default().read_only(true)).expect("now current");
    assert_eq!(&*store.get(&small).expect("small"), b"first form");
    assert_eq!(store.get(&large).expect("large").len(), 3 << 20);
    assert!(store.images().expect("images").is_empty());
    drop(store);
    let store = common::open(&root);
    let report = store
        .gc(
            &layerstore::GcOptions::default().grace(std::time::Duration::ZERO),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .expect("gc works on the upgraded store");
    assert_eq!(report.removed_blobs, 2, "nothing roots the two plain blobs");
}
