//! Recovery at open: uncommitted tails of active segments are cut back, segment files no
//! committed transaction names are removed, and a segment shorter than its committed
//! length is reported as corruption (an error, not a panic).

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

fn expect_corrupt(root: &Path, what: &str) -> String {
    match Store::open(root, Options::default()) {
        Err(Error::Corrupt(msg)) => msg,
        Err(e) => panic!("{what}: expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("{what}: expected Error::Corrupt, the store opened"),
    }
}

#[test]
fn torn_segment_tail_is_cut_back_on_open() {
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

    let store = common::open_with(&root, Options::default());
    let after = common::pack_files(&root);
    assert_eq!(
        after, before,
        "open cuts every active segment back to its committed length"
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
    assert_eq!(
        packed,
        info.live_bytes - info.large_bytes + info.dead_bytes,
        "pack files hold exactly the committed records"
    );
}

#[test]
fn uncommitted_pack_file_is_removed_on_open() {
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
        assert!(!fake.exists(), "{} must be removed at open", fake.display());
    }
    assert_eq!(common::pack_files(&root), before);
    common::assert_all_readable(&store, &expected);

    expected.extend(put_some(&store, 50_000, 6));
    drop(store);
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
}

#[test]
fn segment_shorter_than_committed_is_corrupt() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, Options::default().shards(1));
    let expected = put_some(&store, 0, 5);
    drop(store);

    let packs = common::pack_files(&root);
    assert_eq!(packs.len(), 1, "one shard, one active segment");
    let (path, len) = packs.into_iter().next().expect("segment");
    let original = std::fs::read(&path).expect("read segment");
    let f = OpenOptions::new().write(true).open(&path).expect("open");

    // A few bytes short: open fails with Corrupt, and keeps failing the same way (the failed
    // open released the lock), and never extends the file.
    f.set_len(len - 10).expect("truncate");
    let msg = expect_corrupt(&root, "10 bytes short");
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    expect_corrupt(&root, "10 bytes short, second open");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), len - 10);

    // Shorter than a segment header.
    f.set_len(10).expect("truncate");
    expect_corrupt(&root, "10 bytes long");
    f.set_len(0).expect("truncate");
    expect_corrupt(&root, "empty");

    // Restoring the bytes makes it whole again: the failed opens changed nothing else.
    drop(f);
    std::fs::write(&path, &original).expect("restore segment");
    let store = common::open(&root);
    common::assert_all_readable(&store, &expected);
    common::assert_listing(&store, &expected);
}

#[test]
fn damaged_segment_header_is_corrupt() {
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
        let msg = expect_corrupt(&root, &format!("header byte {at} flipped"));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    std::fs::write(&path, &original).expect("restore");
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
fn missing_active_segment_is_corrupt_at_open() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let (_, _, ids) = several_segments(&root);
    let (_, active_path) = ids.last().expect("active").clone();
    std::fs::remove_file(&active_path).expect("remove active segment");
    expect_corrupt(&root, "active segment missing");
}
