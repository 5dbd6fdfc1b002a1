//! Crash durability: a shell runs `store blob put` over many files, one invocation after
//! another, and is killed with `SIGKILL` (with its current `store` process) part-way. Every digest the
//! CLI printed (it prints only after the put committed) must be present with the right
//! bytes, no visible blob may have wrong bytes, and the store must open and take new puts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use layerstore::{Digest, Options, Store};

use crate::common::{self, DEFAULT_LARGE, KIB};

/// Files per `store blob put` invocation.
const PER_CALL: usize = 10;
/// Invocations the shell would run if not killed.
const CALLS: usize = 30;

/// Writes the files of one round; returns their paths and sha256 digests, in order.
fn make_files(dir: &Path, round: u64) -> Vec<(PathBuf, Digest)> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut rng = common::rng(round);
    (0..PER_CALL * CALLS)
        .map(|i| {
            let len = if i % 15 == 7 {
                // Large files go through the CLI's streaming ingest path.
                DEFAULT_LARGE + i * 1_000
            } else {
                common::mixed_size(&mut rng, 64 * KIB)
            };
            let data = common::blob(round * 1_000_000 + i as u64, len);
            let path = dir.join(format!("f{i:04}"));
            std::fs::write(&path, &data).expect("write file");
            (path, common::sha256(&data))
        })
        .collect()
}

/// Runs the put loop and SIGKILLs its process group once `kill_after` digests were printed.
/// Returns the complete lines printed.
fn run_and_kill(root: &Path, files: &[(PathBuf, Digest)], kill_after: usize) -> Vec<String> {
    let mut script = String::new();
    for call in files.chunks(PER_CALL) {
        script.push_str("\"$STORE\" --root \"$ROOT\" blob put");
        for (p, _) in call {
            write!(script, " '{}'", p.display()).expect("write to a String");
        }
        script.push_str(" || exit 1\n");
    }
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("STORE", env!("CARGO_BIN_EXE_store"))
        .env("ROOT", root)
        .env_remove("STORE_ROOT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so the kill reaches the running `store` as well.
        .process_group(0)
        .spawn()
        .expect("spawn shell");
    let pgid = child.id();
    let mut stderr = child.stderr.take().expect("stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    let mut killed = false;
    loop {
        let mut buf = Vec::new();
        let n = out.read_until(b'\n', &mut buf).expect("read stdout");
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            // Cut off by the kill: not a complete report.
            break;
        }
        buf.pop();
        lines.push(String::from_utf8(buf).expect("utf-8 digest line"));
        if lines.len() >= kill_after && !killed {
            // The shell's own `kill` (no dependency on procps): the whole group, by its id.
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!("kill -s KILL -- -{pgid}"))
                .status()
                .expect("run kill");
            assert!(st.success(), "kill the put loop's process group");
            killed = true;
        }
    }
    let status = child.wait().expect("wait for shell");
    let stderr = stderr_reader.join().expect("stderr reader");
    assert!(
        killed,
        "the loop ended before {kill_after} digests were printed ({} lines, {status}); stderr: {stderr}",
        lines.len()
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the shell must die by SIGKILL part-way, not finish ({status}); stderr: {stderr}"
    );
    assert!(lines.len() < files.len(), "killed before the last put");
    lines
}

/// Everything listed must read back with bytes that hash to its digest.
fn assert_no_wrong_bytes(store: &Store) -> u64 {
    let mut n = 0;
    for item in store.iter() {
        let info = item.expect("iterate");
        let b = store
            .get(&info.digest)
            .unwrap_or_else(|e| panic!("listed blob {} unreadable: {e:?}", info.digest));
        assert_eq!(b.len() as u64, info.size);
        assert_eq!(
            common::sha256(&b),
            info.digest,
            "visible blob with wrong bytes"
        );
        n += 1;
    }
    assert_eq!(
        store.info().expect("info").blobs,
        n,
        "counters match the listing"
    );
    n
}

#[test]
fn sigkill_during_cli_puts_keeps_every_reported_blob() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let mut reported: BTreeMap<Digest, PathBuf> = BTreeMap::new();

    for (round, kill_after) in [(1u64, 5 * PER_CALL), (2, 3 * PER_CALL + 1)] {
        let files = make_files(&dir.path().join(format!("files-{round}")), round);
        let lines = run_and_kill(&root, &files, kill_after);
        assert!(lines.len() >= kill_after);
        for (k, line) in lines.iter().enumerate() {
            let (path, want) = &files[k];
            assert_eq!(
                line,
                &want.to_string(),
                "line {k} reports the digest of {}",
                path.display()
            );
            reported.insert(*want, path.clone());
        }

        let store = common::open_when_unlocked(&root, &Options::default());
        for (d, path) in &reported {
            let got = store
                .get(d)
                .unwrap_or_else(|e| panic!("reported {d} ({}) lost: {e:?}", path.display()));
            assert_eq!(common::sha256(&got), *d);
            assert!(
                *got == *std::fs::read(path).expect("read file"),
                "bytes of {d}"
            );
        }
        let listed = assert_no_wrong_bytes(&store);
        assert!(listed >= reported.len() as u64);
        // Suspended or interrupted ingests are listable (the CLI's may have been cut off).
        store.ingests().expect("ingests after a crash");

        // The store takes new puts, small and large, which survive a reopen.
        let small = common::blob(round * 77, 3 * KIB);
        let large = common::blob(round * 77 + 1, DEFAULT_LARGE + 3);
        let ds = store.put_many([&small, &large]).expect("put after crash");
        drop(store);
        let store = common::open(&root);
        assert!(*store.get(&ds[0].digest).expect("get") == *small);
        assert!(*store.get(&ds[1].digest).expect("get") == *large);
        assert_no_wrong_bytes(&store);
        drop(store);
    }

    // The CLI also opens it cleanly.
    let out = common::cli(&root, &["info", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::ok_stdout(&out)).expect("json");
    assert!(v["blobs"].as_u64().expect("blobs") >= reported.len() as u64);
    let store = Store::open(&root, Options::default()).expect("open");
    assert_no_wrong_bytes(&store);
}
