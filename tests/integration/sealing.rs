//! Sealing: with a small segment size, full segments are sealed and read through memory
//! maps (zero-copy), the active one is read with `pread`, every segment file holds exactly
//! its records, and a sealed file that was shortened behind the store's back is an error
//! on read, never a SIGBUS.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use layerstore::format::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use layerstore::{Digest, Error, Location, Options, Store};

use crate::common::{self, KIB};

const SEGMENT: u64 = 64 * KIB as u64;

fn opts() -> Options {
    Options::default().segment_size(SEGMENT).shards(2)
}

/// Fills a store with enough blobs to seal many segments; returns what it put.
fn fill(store: &Store, seed: u64) -> BTreeMap<Digest, Vec<u8>> {
    let mut expected = BTreeMap::new();
    let mut rng = common::rng(seed);
    for round in 0..15u64 {
        let batch: Vec<Vec<u8>> = (0..20)
            .map(|i| {
                let n = rand::Rng::random_range(&mut rng, 1..6 * KIB);
                common::blob(seed * 10_000 + round * 100 + i, n)
            })
            .collect();
        for (d, b) in store.put_many(&batch).expect("put_many").iter().zip(batch) {
            expected.insert(d.digest, b);
        }
        for i in 0..5 {
            let b = common::blob(seed * 10_000 + round * 100 + 50 + i, 3 * KIB + i as usize);
            expected.insert(store.put(&b).expect("put").digest, b);
        }
    }
    // Larger than a segment but below the large threshold: a segment of its own.
    let big = common::blob(seed * 10_000 + 9_999, 100 * KIB);
    expected.insert(store.put(&big).expect("put").digest, big);
    expected
}

/// Segment files by id, and the ids of each shard's newest file that is still below the
/// segment size (so certainly the active, unsealed one).
fn segments(root: &Path) -> (BTreeMap<u64, (PathBuf, u64)>, BTreeSet<u64>) {
    let all: BTreeMap<u64, (PathBuf, u64)> = common::pack_files(root)
        .into_iter()
        .map(|(p, n)| (common::segment_id(&p), (p, n)))
        .collect();
    let active = common::newest_pack_per_shard(root)
        .into_values()
        .filter(|(p, _)| all[&common::segment_id(p)].1 < SEGMENT)
        .map(|(_, id)| id)
        .collect();
    (all, active)
}

/// Checks every blob's bytes and that exactly the blobs of sealed segments are mapped.
/// Returns how many mapped reads it saw.
fn check(store: &Store, root: &Path, expected: &BTreeMap<Digest, Vec<u8>>) -> usize {
    let (files, active) = segments(root);
    let newest: BTreeSet<u64> = common::newest_pack_per_shard(root)
        .into_values()
        .map(|(_, id)| id)
        .collect();
    let mut records: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut mapped = 0;
    for (d, data) in expected {
        let b = store.get(d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
        assert!(&*b == data.as_slice(), "bytes of {d}");
        let Location::Packed { segment, offset } =
            store.stat(d).expect("stat").expect("present").location
        else {
            panic!("{d} ({} bytes) should be packed", data.len());
        };
        records
            .entry(segment)
            .or_default()
            .push(RECORD_HEADER_LEN + data.len() as u64);
        assert!(offset < files[&segment].1, "offset inside the file");
        if !newest.contains(&segment) {
            assert!(
                b.is_mapped(),
                "{d} is in sealed segment {segment}: read via mmap"
            );
            mapped += 1;
        }
        if active.contains(&segment) {
            assert!(
                !b.is_mapped(),
                "{d} is in active segment {segment}: read via pread"
            );
        }
    }
    // Every segment file is its header plus exactly its records; sealed ones are within
    // the segment size unless a single record is larger.
    assert_eq!(
        records.keys().collect::<BTreeSet<_>>(),
        files.keys().collect::<BTreeSet<_>>(),
        "every segment file holds blobs, and every blob's segment exists"
    );
    for (id, recs) in &records {
        let len = files[id].1;
        assert_eq!(
            len,
            SEGMENT_HEADER_LEN + recs.iter().sum::<u64>(),
            "segment {id} holds exactly its records"
        );
        if !newest.contains(id) {
            assert!(
                len <= SEGMENT || recs.len() == 1,
                "sealed segment {id} is {len} bytes with {} records",
                recs.len()
            );
        }
    }
    let info = store.info().expect("info");
    assert_eq!(info.segments, files.len() as u64);
    assert!(
        info.sealed_segments >= (files.len() - newest.len()) as u64,
        "{} sealed of {} segments",
        info.sealed_segments,
        files.len()
    );
    mapped
}

#[test]
fn full_segments_are_sealed_and_mapped() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, opts());

    // While its segment is active a blob is copied out; once the segment is sealed, mapped.
    let first = common::blob(1, 2 * KIB);
    let d = store.put(&first).expect("put").digest;
    assert!(
        !store.get(&d).expect("get").is_mapped(),
        "active segment: pread"
    );

    let mut expected = fill(&store, 1);
    expected.insert(d, first);
    let info = store.info().expect("info");
    assert!(
        info.sealed_segments >= 6,
        "~1 MiB into 64 KiB segments seals several: {info:?}"
    );
    assert!(
        store.get(&d).expect("get").is_mapped(),
        "sealed segment: mmap"
    );
    let mapped = check(&store, &root, &expected);
    assert!(
        mapped > 100,
        "most blobs are in sealed segments ({mapped} mapped)"
    );

    drop(store);
    let store = common::open_with(&root, opts());
    let mapped_after = check(&store, &root, &expected);
    assert_eq!(mapped_after, mapped, "sealed stays sealed across a reopen");
    common::assert_listing(&store, &expected);

    // More puts after the reopen keep sealing, and everything survives another reopen.
    expected.extend(fill(&store, 2));
    check(&store, &root, &expected);
    drop(store);
    let store = common::open_with(&root, opts());
    check(&store, &root, &expected);
    common::assert_listing(&store, &expected);
}

#[test]
fn shortened_sealed_segment_is_an_error_not_a_crash() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, opts());
    let expected = fill(&store, 3);
    let victim_id = {
        let (files, _) = segments(&root);
        let newest: BTreeSet<u64> = common::newest_pack_per_shard(&root)
            .into_values()
            .map(|(_, id)| id)
            .collect();
        *files
            .keys()
            .find(|id| !newest.contains(id))
            .expect("a sealed segment")
    };
    let in_victim: BTreeSet<Digest> = expected
        .keys()
        .filter(|d| {
            matches!(store.stat(d).expect("stat").expect("present").location,
                Location::Packed { segment, .. } if segment == victim_id)
        })
        .copied()
        .collect();
    assert!(!in_victim.is_empty());
    drop(store);

    let (files, _) = segments(&root);
    let (path, len) = &files[&victim_id];
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len - 100)
        .expect("truncate");

    match Store::open(&root, opts()) {
        // Detecting it at open is fine too.
        Err(Error::Corrupt(_)) => {}
        Err(e) => panic!("expected Corrupt or a working store, got {e:?}"),
        Ok(store) => {
            // Records before the cut still read (with pread, the right bytes); those it
            // cut are Corrupt; nothing outside the short segment is affected.
            let mut lost = 0;
            for (d, data) in &expected {
                match store.get(d) {
                    Ok(b) => assert!(&*b == data.as_slice(), "{d} read back wrong"),
                    Err(Error::Corrupt(_)) => {
                        assert!(in_victim.contains(d), "{d} is not in the short segment");
                        lost += 1;
                    }
                    Err(e) => panic!("get {d}: expected Corrupt, got {e:?}"),
                }
            }
            assert!(lost >= 1, "the record the cut went through is reported");
        }
    }
}
