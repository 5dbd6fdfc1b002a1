//! Recovery at open, which never removes or shortens blob data: uncommitted tails of
//! active segments stay for the next append to overwrite, segment files no committed
//! transaction names stay until the collector finds them old, and a damaged segment
//! (missing, short, a bad header) is contained: the store opens, its lost records read as
//! corruption (an error, not a panic), and verify names them.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use layerstore::format::SEGMENT_HEADER_LEN;
use layerstore::{Digest, Error, Options, Store};

use crate::common::{self, KIB};

/// Blobs put, by digest.
type Expected = BTreeMap<Digest, Vec<u8>>;

fn put_some(store: &Store, seed: u64, n: u64) -> BTreeMap<Digest, Vec<u8>> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        // Single puts rotate over the shards, so several segments are active.
        let data = common::blob(seed + i, 200 + (i as usize * 997) % (20 * KIB));
        let d = store.put(&data).expect("put").digest;
        out.insert(d, data);
    }
    let batch: Vec<Vec<u8>> = (0..20)
        .map(|i| common::blob(seed + 500 + i, 1_000))
        .collect();
    for (d, b) in store.put_many(&batch).expect("put_many").iter().zip(batch) {
        out.insert(d.digest, b);
    }
    out
}

#[test]
fn torn_segment_tail_is_left_for_the_next_append() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(4));
    let mut expected = put_some(&store, 0, 12);
    drop(store);

    let before = common::pack_files(&root);
    assert!(
        before.len() >= 2,
        "single puts used several shards: {before:?}"
    );
    let newest = common::newest_pack_per_shard(&root);
    let (largest, _) = newest
        .values()
        .max_by_key(|(_, id)| *id)
        .expect("a pack file")
        .clone();
    // Garbage after the committed end of every active segment: random bytes on most, and a
    // plausible-looking but uncommitted record (a real header) on the largest-id one.
    for (i, (path, _)) in newest.values().enumerate() {
        let mut f = OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open segment");
        if *path == largest {
            let fake =
                Store::open(dir.path().join("scratch"), Options::default()).expect("scratch store");
            let d = fake.put(&common::blob(777, 300)).expect("put").digest;
            let loc = fake.stat(&d).expect("stat").expect("present").location;
            let layerstore::Location::Packed { segment, offset } = loc else {
                panic!("300 bytes are packed");
            };
            let rec_path = common::pack_files(fake.root())
                .into_keys()
                .find(|p| common::segment_id(p) == segment)
                .expect("scratch segment");
            let bytes = std::fs::read(rec_path).expect("read scratch segment");
            let start = (offset - 128) as usize;
            f.write_all(&bytes[start..start + 128 + 300])
                .expect("append record");
            drop(fake);
        } else {
            f.write_all(&common::blob(9_000 + i as u64, 1_000 + i * 17))
                .expect("append garbage");
        }
    }
    for (path, _) in newest.values() {
        assert!(std::fs::metadata(path).expect("stat").len() > before[path]);
    }

    let grown = common::pack_files(&root);
    let store = common::open_with(&root, Options::default());
    let after = common::pack_files(&root);
    assert_eq!(
        after, grown,
        "open never shortens a segment: the uncommitted tail stays for the next append to \
         overwrite (or for `repair` to read, if the index turns out older than the data)"
    );
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
    assert_eq!(store.info().expect("info").blobs, expected.len() as u64);

    // Further puts land where the garbage was and survive another reopen.
    expected.extend(put_some(&store, 100_000, 12));
    common::assert_all_readable(&store, &expected);
    drop(store);
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
    let info = store.info().expect("info");
    let packed: u64 = common::pack_files(&root)
        .values()
        .map(|n| n - SEGMENT_HEADER_LEN)
        .sum();
    let committed = info.live_bytes - info.large_bytes - info.large_blobs * 128 + info.dead_bytes;
    assert!(
        packed >= committed,
        "pack files hold at least the committed records ({packed} < {committed})"
    );
}

/// A segment file no committed transaction names is left alone by open (it may hold
/// records of an index that is gone, which `repair` can read); new segments get ids past
/// it, and the collector's orphan pass removes it once it is old.
#[test]
fn uncommitted_pack_file_is_kept_at_open_and_collected_when_old() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(3));
    let mut expected = put_some(&store, 0, 3);
    drop(store);
    let before = common::pack_files(&root);

    // A segment file that no committed transaction names, in every shard directory.
    let mut fakes = Vec::new();
    for shard in 0..3 {
        let fake = root
            .join("packs")
            .join(format!("{shard:03}"))
            .join(format!("pack-{:016x}.pack", 0xff + shard));
        std::fs::write(&fake, common::blob(shard, 4 * KIB)).expect("write fake segment");
        fakes.push(fake);
    }
    let store = common::open(&root);
    for fake in &fakes {
        assert!(
            fake.exists(),
            "{} must be left alone at open",
            fake.display()
        );
        assert_eq!(std::fs::metadata(fake).unwrap().len(), 4 * KIB as u64);
    }
    common::assert_all_readable(&store, &expected);
    let deep = store
        .verify(
            &layerstore::VerifyOptions::depth(layerstore::Depth::Deep),
            &std::sync::atomic::AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    assert_eq!(deep.errors, 0, "{:#?}", deep.problems);
    let orphans = deep
        .problems
        .iter()
        .filter(|p| p.kind == "orphan-file")
        .count();
    assert_eq!(
        orphans, 3,
        "verify names the debris without calling it a problem"
    );

    expected.extend(put_some(&store, 50_000, 6));
    for p in common::pack_files(&root).keys() {
        if !before.contains_key(p) && !fakes.contains(p) {
            assert!(
                common::segment_id(p) > 0xff + 2,
                "new segments come after {p:?}"
            );
        }
    }
    let young = store
        .gc(
            &layerstore::GcOptions::default(),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .expect("gc");
    assert_eq!(
        young.orphans_removed, 0,
        "younger than the orphan age: kept"
    );
    let r = store
        .gc(
            &layerstore::GcOptions::default().orphan_age(std::time::Duration::ZERO),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .expect("gc");
    assert_eq!(r.orphans_removed, 3);
    for fake in &fakes {
        assert!(
            !fake.exists(),
            "{} is an old orphan: removed",
            fake.display()
        );
    }
    drop(store);
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
}

/// What a store with a damaged active segment gives: it opens (the rest stays usable),
/// the damaged segment takes no more appends, a blob whose record is gone reads as
/// `Corrupt` and every other blob reads, and plain `verify` names each lost blob and no
/// other. The file is never extended or shortened.
fn damaged_active_segment_is_contained(
    root: &Path,
    expected: &BTreeMap<Digest, Vec<u8>>,
    lost: &dyn Fn(&Digest) -> bool,
    what: &str,
) {
    let packs_before = common::pack_files(root);
    let store = common::open(root);
    let mut gone = std::collections::BTreeSet::new();
    for (d, data) in expected {
        match store.get(d) {
            Ok(b) => assert!(*b == **data, "{what}: {d} reads its own bytes"),
            Err(Error::Corrupt(_)) if lost(d) => {
                gone.insert(*d);
            }
            Err(e) => panic!("{what}: {d}: {e:?}"),
        }
    }
    let report = store
        .verify(
            &layerstore::VerifyOptions::default(),
            &std::sync::atomic::AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify runs");
    let named: std::collections::BTreeSet<Digest> =
        report.problems.iter().filter_map(|p| p.digest).collect();
    assert_eq!(named, gone, "{what}: verify names exactly the lost blobs");
    for p in &report.problems {
        assert!(
            ["missing", "header", "size"].contains(&p.kind.name()),
            "{what}: {p:?}"
        );
    }
    // New puts go to a new segment and survive a reopen.
    let more = put_some(&store, 77_000, 3);
    drop(store);
    for (p, len) in &packs_before {
        assert_eq!(
            common::pack_files(root).get(p),
            Some(len),
            "{what}: {} untouched",
            p.display()
        );
    }
    let store = common::open(root);
    common::assert_all_readable(&store, &more);
}

#[test]
fn segment_shorter_than_committed_is_contained() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let expected = put_some(&store, 0, 5);
    let locations: BTreeMap<Digest, u64> = expected
        .keys()
        .map(|d| match store.stat(d).unwrap().unwrap().location {
            layerstore::Location::Packed { offset, .. } => (*d, offset),
            layerstore::Location::Large { .. } => (*d, u64::MAX),
        })
        .collect();
    drop(store);

    let packs = common::pack_files(&root);
    assert_eq!(packs.len(), 1, "one shard, one active segment");
    let (path, len) = packs.into_iter().next().expect("segment");
    let original = std::fs::read(&path).expect("read segment");
    // A few bytes short: only the blob whose record ran into the cut is lost.
    let cut = len - 10;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(cut)
        .expect("truncate");
    let size = |d: &Digest| expected[d].len() as u64;
    damaged_active_segment_is_contained(
        &root,
        &expected,
        &|d| locations[d] + size(d) > cut,
        "10 bytes short",
    );
    // Restoring the bytes makes every blob read again: nothing else was changed.
    let dir2 = common::tempdir();
    let root2 = dir2.path().to_owned();
    let store = common::open_with(&root2, Options::default().shards(1));
    let expected2 = put_some(&store, 0, 5);
    drop(store);
    let (path2, _) = common::pack_files(&root2).into_iter().next().unwrap();
    std::fs::write(&path2, b"").expect("empty");
    damaged_active_segment_is_contained(&root2, &expected2, &|_| true, "empty");
    std::fs::write(&path, &original).expect("restore");
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
}

#[test]
fn damaged_segment_header_is_reported_and_contained() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let expected = put_some(&store, 0, 4);
    drop(store);
    let (path, _) = common::pack_files(&root)
        .into_iter()
        .next()
        .expect("segment");
    let original = std::fs::read(&path).expect("read");
    for at in [0usize, 8, 16, 28] {
        let mut bad = original.clone();
        bad[at] ^= 0x20;
        std::fs::write(&path, &bad).expect("write");
        // The records behind the header are intact: every blob reads.
        let store = common::open(&root);
        common::assert_all_readable(&store, &expected);
        let deep = store
            .verify(
                &layerstore::VerifyOptions::depth(layerstore::Depth::Deep),
                &std::sync::atomic::AtomicBool::new(false),
                &|_| {},
            )
            .expect("verify");
        assert!(
            deep.problems.iter().any(|p| p.kind == "segment"
                && p.path.as_deref() == Some(path.as_path())
                && p.detail.contains("header")),
            "header byte {at} flipped: {:#?}",
            deep.problems
        );
        drop(store);
        std::fs::write(&path, &original).expect("restore");
    }
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
}

#[test]
fn missing_large_file_is_corrupt_on_read() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let large = 64 * KIB;
    let store = common::open_with(&root, Options::default().large_threshold(large as u64));
    let keep = common::blob(1, large + 1);
    let lose = common::blob(2, large + 2);
    let dk = store.put(&keep).expect("put").digest;
    let dl = store.put(&lose).expect("put").digest;
    drop(store);
    let victim = common::large_files(&root)
        .into_keys()
        .find(|p| p.to_string_lossy().contains(&dl.hex()))
        .expect("large file of the victim");
    std::fs::remove_file(&victim).expect("remove");

    let store = common::open(&root);
    assert!(&*store.get(&dk).expect("other blob") == keep.as_slice());
    match store.get(&dl) {
        Err(Error::Corrupt(msg)) => assert!(msg.contains("missing"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// A store with one shard and small segments: several sealed segments and an active one.
/// Returns the options, what was put, and the segment files by id.
fn several_segments(root: &Path) -> (Options, Expected, Vec<(u64, PathBuf)>) {
    let opts = Options::default().shards(1).segment_size(16 * KIB as u64);
    let store = common::open_with(root, opts.clone());
    let mut expected = BTreeMap::new();
    for i in 0..40 {
        let b = common::blob(i, 2 * KIB);
        expected.insert(store.put(&b).expect("put").digest, b);
    }
    drop(store);
    let mut ids: Vec<(u64, PathBuf)> = common::pack_files(root)
        .into_keys()
        .map(|p| (common::segment_id(&p), p))
        .collect();
    ids.sort();
    assert!(ids.len() >= 3, "several segments: {ids:?}");
    (opts, expected, ids)
}

/// A sealed segment file that the index names but that is gone is stored data contradicting
/// the index, like a short one: reads of its blobs fail with `Error::Corrupt` (as for a
/// missing large file), the other blobs still read.
#[test]
fn missing_sealed_segment_is_corrupt_on_read() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let (opts, expected, ids) = several_segments(&root);
    let (sealed_id, sealed_path) = ids[0].clone();
    std::fs::remove_file(&sealed_path).expect("remove sealed segment");
    match Store::open(&root, opts) {
        // Detecting it at open would be fine too.
        Err(Error::Corrupt(_)) => {}
        Err(e) => panic!("sealed segment missing: expected Corrupt at open, got {e:?}"),
        Ok(store) => {
            let mut corrupt = 0;
            for (d, data) in &expected {
                let in_victim = matches!(
                    store.stat(d).expect("stat").expect("present").location,
                    layerstore::Location::Packed { segment, .. } if segment == sealed_id
                );
                match store.get(d) {
                    Ok(b) => assert!(!in_victim && *b == **data),
                    Err(Error::Corrupt(_)) => {
                        assert!(in_victim);
                        corrupt += 1;
                    }
                    Err(e) => panic!(
                        "get {d} from missing segment {}: expected Error::Corrupt, got {e:?}",
                        sealed_path.display()
                    ),
                }
            }
            assert!(corrupt > 0);
        }
    }
}

/// The active segment's file gone: open fails with `Error::Corrupt`, as when it is short.
#[test]
fn missing_active_segment_is_contained() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let (_, expected, ids) = several_segments(&root);
    let (active_id, active_path) = ids.last().expect("active").clone();
    let store = common::open(&root);
    let in_active: std::collections::BTreeSet<Digest> = expected
        .keys()
        .filter(|d| {
            matches!(store.stat(d).unwrap().unwrap().location,
                layerstore::Location::Packed { segment, .. } if segment == active_id)
        })
        .copied()
        .collect();
    drop(store);
    assert!(!in_active.is_empty());
    std::fs::remove_file(&active_path).expect("remove active segment");
    damaged_active_segment_is_contained(
        &root,
        &expected,
        &|d| in_active.contains(d),
        "active segment missing",
    );
}
