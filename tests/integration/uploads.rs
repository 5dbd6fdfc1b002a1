//! The upload model of OCI distribution and containerd's content `Writer`: a digest known
//! only at commit, status by ref (unsynced bytes included) and a listing, truncation,
//! resumption from the saved hash state without reading back what was written, and an
//! upload's protection from the collector while it is in progress.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use layerstore::backend::sim::{SimBackend, SimOp};
use layerstore::backend::{Key, UploadPart};
use layerstore::{Algorithm, Digest, Error, ErrorKind, GcOptions, Options, PutOptions, Store};

use crate::common::{self, KIB, MIB};

const LARGE: usize = 256 * KIB;

fn opts() -> Options {
    Options::default().large_threshold(LARGE as u64)
}

/// Counts reads of upload data objects on a simulated backend.
fn count_data_reads(sim: &SimBackend) -> Arc<AtomicU64> {
    let n = Arc::new(AtomicU64::new(0));
    let seen = n.clone();
    sim.hook(SimOp::Read, move |k| {
        if matches!(
            k,
            Some(Key::Upload {
                part: UploadPart::Data,
                ..
            })
        ) {
            seen.fetch_add(1, Ordering::Relaxed);
        }
        true
    });
    n
}

#[test]
fn the_digest_may_be_given_only_at_commit() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    for len in [10 * KIB, 3 * LARGE + 5] {
        let data = common::blob(len as u64, len);
        let want = common::sha256(&data);

        // Right digest and size at commit.
        let mut ing = store.ingest("u", PutOptions::default()).unwrap();
        ing.write_all(&data).unwrap();
        let d = ing.commit_expecting(Some(want), Some(len as u64)).unwrap();
        assert_eq!((d.digest, d.size), (want, len as u64));
        assert_eq!(&*store.get(&want).unwrap(), &data[..]);

        // Wrong digest: refused, nothing visible, the upload gone.
        let other = common::blob(7, len);
        let mut ing = store.ingest("w", PutOptions::default()).unwrap();
        ing.write_all(&other).unwrap();
        let err = ing.commit_expecting(Some(want), None).unwrap_err();
        assert!(
            matches!(err, Error::DigestMismatch { expected, .. } if expected == want),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Mismatch);
        assert!(err.is_refusal());
        assert!(!store.contains(&common::sha256(&other)).unwrap());
        assert_eq!(store.upload("w").unwrap(), None);

        // Wrong size.
        let mut ing = store.ingest("s", PutOptions::default()).unwrap();
        ing.write_all(&other).unwrap();
        let err = ing
            .commit_expecting(Some(common::sha256(&other)), Some(len as u64 + 1))
            .unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err:?}");
        assert!(err.is_refusal());
        assert!(!store.contains(&common::sha256(&other)).unwrap());
    }
    common::assert_ingest_clean(dir.path());
}

#[test]
fn a_commit_digest_of_another_algorithm_is_computed_from_the_bytes() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    for len in [5 * KIB, 2 * LARGE] {
        let data = common::blob(3, len);
        let want = Digest::compute(Algorithm::Sha512, &data);
        let mut ing = store.ingest("x", PutOptions::default()).unwrap();
        ing.write_all(&data).unwrap();
        let d = ing.commit_expecting(Some(want), None).unwrap();
        assert_eq!(d.digest, want);
        assert_eq!(&*store.get(&want).unwrap(), &data[..]);
        assert!(!store.contains(&common::sha256(&data)).unwrap());
    }
}

#[test]
fn status_by_ref_counts_unsynced_bytes_and_lists_every_upload() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    let before = SystemTime::now() - Duration::from_secs(1);
    let data = common::blob(1, 3 * MIB + 11);
    let want = common::sha256(&data);
    let mut a = store
        .ingest(
            "a",
            PutOptions::default()
                .expect(want)
                .expect_size(data.len() as u64),
        )
        .unwrap();
    // Less than one flush (1 MiB) buffered, then several flushes: unsynced either way.
    a.write_all(&data[..100]).unwrap();
    let s = store.upload("a").unwrap().expect("live upload");
    assert_eq!((s.offset, s.durable_offset, s.active), (100, 0, true));
    assert_eq!(s.expected, Some(want));
    assert_eq!(s.expected_size, Some(data.len() as u64));
    a.write_all(&data[100..2 * MIB]).unwrap();
    assert_eq!(store.upload("a").unwrap().unwrap().offset, 2 * MIB as u64);
    assert_eq!(a.sync().unwrap(), 2 * MIB as u64);
    let s = store.upload("a").unwrap().unwrap();
    assert_eq!(
        (s.offset, s.durable_offset),
        (2 * MIB as u64, 2 * MIB as u64)
    );
    assert!(before <= s.started && s.started <= s.updated, "{s:?}");

    let mut b = store.ingest("b", PutOptions::default()).unwrap();
    b.write_all(b"xyz").unwrap();
    assert_eq!(b.suspend().unwrap(), 3);

    let all = store.uploads().unwrap();
    let refs: Vec<(&str, u64, bool)> = all
        .iter()
        .map(|u| (u.r#ref.as_str(), u.offset, u.active))
        .collect();
    assert_eq!(refs, [("a", 2 * MIB as u64, true), ("b", 3, false)]);

    // Suspended, the status comes from the state: same offsets, same start.
    let started = store.upload("a").unwrap().unwrap().started;
    assert_eq!(a.suspend().unwrap(), 2 * MIB as u64);
    let s = store.upload("a").unwrap().unwrap();
    assert_eq!(
        (s.offset, s.durable_offset, s.active),
        (2 * MIB as u64, 2 * MIB as u64, false)
    );
    assert_eq!(s.started, started);
    assert_eq!(s.expected, Some(want));
    // ... and after a reopen.
    drop(store);
    let store = common::open_with(dir.path(), opts());
    let s = store.upload("a").unwrap().unwrap();
    assert_eq!((s.offset, s.started), (2 * MIB as u64, started));
    let mut a = store
        .ingest(
            "a",
            PutOptions::default()
                .expect(want)
                .expect_size(data.len() as u64),
        )
        .unwrap();
    a.write_all(&data[2 * MIB..]).unwrap();
    assert_eq!(a.commit().unwrap().digest, want);
    assert_eq!(store.upload("a").unwrap(), None);
    assert_eq!(store.upload("never").unwrap(), None);
}

#[test]
fn truncate_goes_back_to_any_offset() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    let data = common::blob(9, 3 * MIB);
    let (m1, m2) = (MIB, 2 * MIB);

    // After the sync point: re-hashes only from there.
    let mut ing = store.ingest("t", PutOptions::default()).unwrap();
    ing.write_all(&data[..m1]).unwrap();
    ing.sync().unwrap();
    ing.write_all(&common::blob(77, m2)).unwrap();
    ing.truncate(m1 as u64 + 1000).unwrap();
    assert_eq!(ing.offset(), m1 as u64 + 1000);
    assert_eq!(store.upload("t").unwrap().unwrap().offset, m1 as u64 + 1000);
    // Back to the sync point itself, then the right bytes.
    ing.truncate(m1 as u64).unwrap();
    ing.write_all(&data[m1..]).unwrap();
    let want = common::sha256(&data);
    assert_eq!(ing.commit().unwrap().digest, want);
    assert_eq!(&*store.get(&want).unwrap(), &data[..]);

    // Below the durable offset: the state is cut first, so a resume starts there.
    let mut ing = store.ingest("t2", PutOptions::default()).unwrap();
    ing.write_all(&data[..m2]).unwrap();
    ing.sync().unwrap();
    ing.truncate(100).unwrap();
    assert_eq!(ing.durable_offset(), 100);
    assert_eq!(store.upload("t2").unwrap().unwrap().durable_offset, 100);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::ingest_dir(dir.path(), "t2").join("state")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["offset"], 100);
    assert_eq!(ing.suspend().unwrap(), 100);
    let mut ing = store.ingest("t2", PutOptions::default()).unwrap();
    assert_eq!(ing.offset(), 100);
    ing.write_all(&data[100..]).unwrap();
    assert_eq!(ing.commit().unwrap().digest, want);

    // To zero: a restart. Past the end: refused, nothing changed.
    let mut ing = store.ingest("t3", PutOptions::default()).unwrap();
    ing.write_all(b"wrong start").unwrap();
    let err = ing.truncate(12).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(ing.offset(), 11);
    ing.truncate(0).unwrap();
    ing.write_all(b"right").unwrap();
    assert_eq!(ing.commit().unwrap().digest, common::sha256(b"right"));
}

/// A resume after a power loss goes on from the saved hash state: it reads none of the
/// bytes already written, and the blob it commits is right (its blake3, computed at
/// commit for a resumed upload, passes a fast verify).
#[test]
fn resume_after_a_crash_reads_nothing_back() {
    let sim = SimBackend::new();
    let store = Store::open_with(Arc::new(sim.clone()), opts()).unwrap();
    let data = common::blob(4, 5 * MIB + 3);
    let cut = 3 * MIB + 7;
    let mut ing = store.ingest("r", PutOptions::default()).unwrap();
    ing.write_all(&data[..cut]).unwrap();
    ing.sync().unwrap();
    ing.write_all(&data[cut..4 * MIB]).unwrap(); // lost with the power
    let image = sim.crash();
    drop(ing);
    drop(store);

    let reads = count_data_reads(&image);
    let store = Store::open_with(Arc::new(image.clone()), opts()).unwrap();
    let mut ing = store.ingest("r", PutOptions::default()).unwrap();
    assert_eq!(ing.offset(), cut as u64);
    assert_eq!(reads.load(Ordering::Relaxed), 0, "resume read data back");
    ing.write_all(&data[cut..]).unwrap();
    let want = common::sha256(&data);
    assert_eq!(ing.commit().unwrap().digest, want);
    assert_eq!(&*store.get(&want).unwrap(), &data[..]);
    let report = store
        .verify(
            &layerstore::VerifyOptions::depth(layerstore::Depth::Fast),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A state written without a hash state (by an older build) still resumes, by
/// re-hashing, to the right digest.
#[test]
fn an_older_state_without_a_hash_resumes_by_re_hashing() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    let data = common::blob(8, 2 * MIB);
    let mut ing = store.ingest("old", PutOptions::default()).unwrap();
    ing.write_all(&data[..MIB + 5]).unwrap();
    ing.suspend().unwrap();
    let path = common::ingest_dir(dir.path(), "old").join("state");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let obj = state.as_object_mut().unwrap();
    assert!(obj.contains_key("hash"), "{obj:?}");
    for k in ["hash", "started_ms", "updated_ms"] {
        obj.remove(k);
    }
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let mut ing = store.ingest("old", PutOptions::default()).unwrap();
    assert_eq!(ing.offset(), MIB as u64 + 5);
    ing.write_all(&data[MIB + 5..]).unwrap();
    assert_eq!(ing.commit().unwrap().digest, common::sha256(&data));
}

/// A live upload's bytes survive any number of collections with orphan age 0; a
/// suspended one survives until it is older than the orphan age.
#[test]
fn a_live_upload_is_never_collected() {
    let sim = SimBackend::new();
    let store = Store::open_with(Arc::new(sim.clone()), opts()).unwrap();
    let data = common::blob(5, 2 * MIB);
    let zero = GcOptions::default()
        .grace(Duration::ZERO)
        .orphan_age(Duration::ZERO);
    let mut ing = store.ingest("live", PutOptions::default()).unwrap();
    ing.write_all(&data[..MIB]).unwrap();
    ing.sync().unwrap();
    sim.advance_clock(Duration::from_secs(30 * 24 * 3600));
    for _ in 0..3 {
        store.gc(&zero, &AtomicBool::new(false)).unwrap();
    }
    ing.write_all(&data[MIB..]).unwrap();
    let want = common::sha256(&data);
    assert_eq!(ing.commit().unwrap().digest, want);
    assert_eq!(&*store.get(&want).unwrap(), &data[..]);

    let mut s = store.ingest("suspended", PutOptions::default()).unwrap();
    s.write_all(b"abc").unwrap();
    s.suspend().unwrap();
    let day = GcOptions::default().orphan_age(Duration::from_secs(24 * 3600));
    store.gc(&day, &AtomicBool::new(false)).unwrap();
    assert!(store.upload("suspended").unwrap().is_some(), "young: kept");
    sim.advance_clock(Duration::from_secs(25 * 3600));
    store.gc(&day, &AtomicBool::new(false)).unwrap();
    assert_eq!(store.upload("suspended").unwrap(), None, "expired");
}

/// A collection's orphan pass racing the resumption of an old suspended upload: the
/// pass decides and removes under the live table's lock, so either the resume starts
/// afresh (offset 0) or the pass leaves the upload alone; a resumed writer never loses
/// its files.
#[test]
fn an_orphan_pass_racing_a_resume_never_removes_a_resumed_upload() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), opts());
    let zero = GcOptions::default().orphan_age(Duration::ZERO);
    let data = common::blob(6, 600 * KIB);
    let want = common::sha256(&data);
    let errors = Mutex::new(Vec::new());
    for round in 0..40 {
        let r#ref = format!("race-{round}");
        let mut ing = store.ingest(&r#ref, PutOptions::default()).unwrap();
        ing.write_all(&data[..300 * KIB]).unwrap();
        ing.suspend().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Err(e) = store.gc(&zero, &AtomicBool::new(false)) {
                    errors.lock().unwrap().push(format!("gc: {e}"));
                }
            });
            s.spawn(|| {
                let r = (|| {
                    let mut ing = store.ingest(&r#ref, PutOptions::default())?;
                    let from = ing.offset() as usize;
                    assert!(from == 0 || from == 300 * KIB, "{from}");
                    ing.write_all(&data[from..])?;
                    ing.commit()
                })();
                match r {
                    Ok(d) => assert_eq!(d.digest, want),
                    Err(e) => errors.lock().unwrap().push(format!("ingest: {e}")),
                }
            });
        });
    }
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    assert_eq!(&*store.get(&want).unwrap(), &data[..]);
}

/// Where `upload_writer_child` finds its store root: set only for that child process.
const CHILD_ROOT: &str = "LAYERSTORE_UPLOAD_CHILD_ROOT";

/// The writer process of `resume_after_kill_9_starts_at_the_last_sync`: syncs 12 MiB of
/// a 20 MiB upload, writes the rest unsynced, and waits to be killed.
#[test]
#[ignore = "the child process of resume_after_kill_9_starts_at_the_last_sync"]
fn upload_writer_child() {
    let root = std::env::var_os(CHILD_ROOT).expect("run by its parent test");
    let store = common::open_with(std::path::Path::new(&root), opts());
    let data = common::blob(77, 20 * MIB);
    let mut ing = store.ingest("killed", PutOptions::default()).unwrap();
    for (i, chunk) in data.chunks(4 * MIB).enumerate() {
        ing.write_all(chunk).unwrap();
        if i < 3 {
            println!("synced {}", ing.sync().unwrap());
        }
    }
    println!("waiting");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A real process killed with SIGKILL mid-upload: the upload resumes at its last sync
/// point, from the hash state saved there (nothing is read back), and commits to the
/// right digest.
#[test]
fn resume_after_kill_9_starts_at_the_last_sync() {
    use std::io::BufRead;
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "uploads::upload_writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ROOT, &root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut synced = 0u64;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("synced ") {
            synced = n.parse().unwrap();
        }
        if line == "waiting" {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(synced, 12 * MIB as u64);

    let store = common::open_with(&root, opts());
    let st = store
        .upload("killed")
        .unwrap()
        .expect("the upload survived");
    assert_eq!(st.durable_offset, synced);
    assert!(!st.active);
    // The state holds the hash of exactly the durable bytes: a resume starts from it.
    let state = root
        .join("ingest")
        .join(blake3::hash(b"killed").to_hex().as_str())
        .join("state");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(v["hash"]["len"].as_u64(), Some(synced), "{v}");
    let data = common::blob(77, 20 * MIB);
    let mut ing = store.ingest("killed", PutOptions::default()).unwrap();
    assert_eq!(ing.offset(), synced);
    ing.write_all(&data[synced as usize..]).unwrap();
    let d = ing.commit().unwrap();
    assert_eq!(d.digest, common::sha256(&data));
    assert_eq!(&*store.get(&d.digest).unwrap(), &data[..]);
}
