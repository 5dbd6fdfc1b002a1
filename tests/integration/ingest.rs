//! Streaming ingest: chunked writes equal a one-shot put, suspend and resume (in the same
//! store, and after the store was dropped and reopened) continue at the durable offset, a
//! ref is busy while an ingest holds it, and a dropped ingest leaves no files.

use std::io::Write as _;

use layerstore::{Error, Kind, Location, Options, PutOptions, Store};

use crate::common::{self, KIB, MIB};

const LARGE: usize = 256 * KIB;

fn opts() -> Options {
    Options::default().large_threshold(LARGE as u64)
}

#[test]
fn chunked_ingest_equals_put() {
    let dir = common::tempdir();
    let root = dir.path().join("a");
    let other = dir.path().join("b");
    let store = common::open_with(&root, opts());
    let reference = common::open_with(&other, opts());
    let mut rng = common::rng(5);

    for (seed, len) in [
        (1u64, 0usize),
        (2, 1),
        (3, 3 * KIB + 7),
        (4, LARGE - 1),
        (5, LARGE),
        (6, 3 * MIB + 11),
    ] {
        let data = common::blob(seed, len);
        let r#ref = format!("chunks-{len}");
        let mut ing = store.ingest(&r#ref, PutOptions::default()).expect("ingest");
        let mut at = 0;
        while at < data.len() {
            let n = rand::Rng::random_range(&mut rng, 1..=4 * KIB).min(data.len() - at);
            ing.write_all(&data[at..at + n]).expect("write");
            at += n;
            assert_eq!(ing.offset(), at as u64);
        }
        let via_ingest = ing.commit().expect("commit");
        let via_put = reference.put(&data).expect("put");
        assert_eq!(via_ingest, via_put, "{len} bytes: ingest and put agree");
        assert_eq!(via_ingest.digest, common::sha256(&data));
        assert!(&*store.get(&via_ingest.digest).expect("get") == data.as_slice());
        let a = store
            .stat(&via_ingest.digest)
            .expect("stat")
            .expect("present");
        let b = reference
            .stat(&via_put.digest)
            .expect("stat")
            .expect("present");
        assert_eq!(a.blake3, b.blake3);
        assert_eq!(
            matches!(a.location, Location::Large { .. }),
            len >= LARGE,
            "{len} bytes: large iff at least the threshold"
        );
        assert!(!common::ingest_dir(&root, &r#ref).exists());
    }

    // write_from and std::io::Write reach the same result.
    let data = common::blob(7, 700 * KIB + 3);
    let mut ing = store
        .ingest("from-reader", PutOptions::default())
        .expect("ingest");
    let n = ing
        .write_from(&mut std::io::Cursor::new(&data))
        .expect("write_from");
    assert_eq!(n, data.len() as u64);
    let d1 = ing.commit().expect("commit");
    let mut ing = store
        .ingest("io-write", PutOptions::default())
        .expect("ingest");
    for c in data.chunks(10_000) {
        std::io::Write::write_all(&mut ing, c).expect("io write");
    }
    ing.flush().expect("flush");
    let d2 = ing.commit().expect("commit");
    assert_eq!(d1, d2);
    assert_eq!(d1.digest, common::sha256(&data));
    assert_eq!(store.info().expect("info").blobs, 7);
    common::assert_ingest_clean(&root);
}

/// Writes `data[from..to]` in uneven chunks.
fn write_range(ing: &mut layerstore::Ingest, data: &[u8], from: usize, to: usize) {
    for c in data[from..to].chunks(123_457) {
        ing.write_all(c).expect("write");
    }
}

/// The durable offset `ingests()` lists for a ref.
fn listed_offset(store: &Store, r#ref: &str) -> Option<u64> {
    store
        .ingests()
        .expect("ingests")
        .into_iter()
        .find(|(r, _)| r == r#ref)
        .map(|(_, o)| o)
}

#[test]
fn suspend_and_resume_continue_at_the_offset() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, opts());

    for (seed, len) in [(1u64, 100 * KIB), (2, 3 * MIB + 5)] {
        let data = common::blob(seed, len);
        let d = common::sha256(&data);
        let po = PutOptions::default()
            .expect(d)
            .expect_size(len as u64)
            .kind(Kind::Layer);
        let r#ref = format!("resume-{len}");

        // First part, suspend; the ref is listed with its durable offset.
        let cut1 = len / 3;
        let mut ing = store.ingest(&r#ref, po.clone()).expect("start");
        assert_eq!(ing.offset(), 0);
        write_range(&mut ing, &data, 0, cut1);
        assert_eq!(ing.suspend().expect("suspend"), cut1 as u64);
        assert!(common::ingest_dir(&root, &r#ref).exists());
        assert_eq!(listed_offset(&store, &r#ref), Some(cut1 as u64));
        assert!(
            !store.contains(&d).expect("contains"),
            "not visible before commit"
        );

        // Resume in the same store, write more, suspend again.
        let cut2 = 2 * len / 3;
        let mut ing = store.ingest(&r#ref, po.clone()).expect("resume");
        assert_eq!(ing.offset(), cut1 as u64, "resumes at the suspended offset");
        write_range(&mut ing, &data, cut1, cut2);
        assert_eq!(ing.suspend().expect("suspend"), cut2 as u64);

        // Resuming with other expectations is refused and does not disturb it.
        let other = PutOptions::default().expect(d).expect_size(len as u64 + 1);
        assert!(matches!(
            store.ingest(&r#ref, other),
            Err(Error::Invalid(_))
        ));
        assert_eq!(listed_offset(&store, &r#ref), Some(cut2 as u64));
    }

    // Drop the store, reopen, resume both and commit.
    drop(store);
    let store = common::open_with(&root, opts());
    let listed = store.ingests().expect("ingests");
    assert_eq!(
        listed.len(),
        2,
        "suspended ingests survive a reopen: {listed:?}"
    );
    for (seed, len) in [(1u64, 100 * KIB), (2, 3 * MIB + 5)] {
        let data = common::blob(seed, len);
        let d = common::sha256(&data);
        let po = PutOptions::default()
            .expect(d)
            .expect_size(len as u64)
            .kind(Kind::Layer);
        let r#ref = format!("resume-{len}");
        let cut2 = 2 * len / 3;
        assert_eq!(listed_offset(&store, &r#ref), Some(cut2 as u64));
        let mut ing = store
            .ingest(&r#ref, po.clone())
            .expect("resume after reopen");
        assert_eq!(ing.offset(), cut2 as u64);
        write_range(&mut ing, &data, cut2, len);
        let desc = ing.commit().expect("commit");
        assert_eq!(desc.digest, d);
        assert_eq!(desc.size, len as u64);
        let info = store.stat(&d).expect("stat").expect("present");
        assert_eq!(info.kind, Kind::Layer);
        assert_eq!(
            matches!(info.location, Location::Large { .. }),
            len >= LARGE
        );
        assert!(&*store.get(&d).expect("get") == data.as_slice());
    }
    assert!(store.ingests().expect("ingests").is_empty());
    common::assert_ingest_clean(&root);
    drop(store);
    let store = common::open_with(&root, opts());
    assert_eq!(store.info().expect("info").blobs, 2);
}

#[test]
fn a_ref_is_busy_while_held_and_dropping_removes_it() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open_with(&root, opts());

    let mut a = store.ingest("busy", PutOptions::default()).expect("first");
    a.write_all(&common::blob(1, 2 * MIB)).expect("write");
    let clone = store.clone();
    match clone.ingest("busy", PutOptions::default()) {
        Err(Error::IngestBusy(r)) => assert_eq!(r, "busy"),
        Err(e) => panic!("expected IngestBusy, got {e:?}"),
        Ok(_) => panic!("expected IngestBusy, got a second ingest"),
    }
    // Another thread sees the same.
    let s2 = store.clone();
    let from_thread = std::thread::spawn(move || {
        matches!(
            s2.ingest("busy", PutOptions::default()),
            Err(Error::IngestBusy(_))
        )
    })
    .join()
    .expect("thread");
    assert!(from_thread, "IngestBusy from another thread");
    // Other refs are independent.
    let b = store
        .ingest("other", PutOptions::default())
        .expect("other ref");

    let dir_a = common::ingest_dir(&root, "busy");
    assert!(
        dir_a.join("data").exists(),
        "ingest data lives in ROOT/ingest/<blake3(ref)>/"
    );
    drop(a);
    assert!(!dir_a.exists(), "dropping an ingest removes its directory");
    drop(b);
    common::assert_ingest_clean(&root);
    assert!(store.ingests().expect("ingests").is_empty());

    // The ref is free again, and starts from scratch.
    let mut a = store
        .ingest("busy", PutOptions::default())
        .expect("free again");
    assert_eq!(a.offset(), 0);
    let data = common::blob(2, 10);
    a.write_all(&data).expect("write");
    assert_eq!(a.commit().expect("commit").digest, common::sha256(&data));
    assert_eq!(
        store.info().expect("info").blobs,
        1,
        "dropped ingests stored nothing"
    );

    // Invalid refs are refused.
    assert!(matches!(
        store.ingest("", PutOptions::default()),
        Err(Error::Invalid(_))
    ));
    let long = "x".repeat(layerstore::MAX_REF_LEN + 1);
    assert!(matches!(
        store.ingest(&long, PutOptions::default()),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn dropping_the_store_keeps_an_unfinished_ingest_alive() {
    // An ingest holds its store: dropping the caller's handle does not close it, and the
    // ingest still commits into it.
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store: Store = common::open_with(&root, opts());
    let mut ing = store.ingest("held", PutOptions::default()).expect("ingest");
    drop(store);
    let data = common::blob(3, LARGE + 1);
    ing.write_all(&data).expect("write");
    let d = ing.commit().expect("commit").digest;
    let store = common::open_with(&root, opts());
    assert!(&*store.get(&d).expect("get") == data.as_slice());
    common::assert_ingest_clean(&root);
}

#[test]
fn interrupted_ingest_resumes_from_its_last_sync() {
    let dir = common::tempdir();
    let root = dir.path().join("live");
    let crashed = dir.path().join("crashed");
    let store = common::open_with(&root, opts());
    let data = common::blob(11, 3 * MIB + 17);
    let d = common::sha256(&data);
    let po = PutOptions::default()
        .expect(d)
        .expect_size(data.len() as u64);

    let mut ing = store.ingest("interrupted", po.clone()).expect("ingest");
    write_range(&mut ing, &data, 0, MIB + 5);
    let synced = ing.sync().expect("sync");
    assert_eq!(synced, (MIB + 5) as u64);
    // More than a flush's worth after the sync: bytes past the durable offset reach the file.
    write_range(&mut ing, &data, MIB + 5, 2 * MIB + 100);
    let data_file = common::ingest_dir(&root, "interrupted").join("data");
    let on_disk = std::fs::metadata(&data_file).expect("stat data").len();
    assert!(
        on_disk > 128 + synced,
        "unsynced bytes reached the data file"
    );

    // The crash: the files as they are at this instant, with the ingest still open.
    common::copy_dir(&root, &crashed);
    drop(ing);
    drop(store);

    let store = common::open_with(&crashed, opts());
    assert_eq!(listed_offset(&store, "interrupted"), Some(synced));
    let mut ing = store.ingest("interrupted", po.clone()).expect("resume");
    assert_eq!(
        ing.offset(),
        synced,
        "resumes at the last sync, not at the file's end"
    );
    write_range(&mut ing, &data, synced as usize, data.len());
    let desc = ing.commit().expect("commit");
    assert_eq!(desc.digest, d);
    assert!(&*store.get(&d).expect("get") == data.as_slice());
    common::assert_ingest_clean(&crashed);
}
