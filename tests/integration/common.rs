//! Shared helpers: temporary stores, deterministic blob bytes, an independent sha256,
//! on-disk inventories of a store root, and running the `store` binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use layerstore::{Algorithm, Digest, Error, Kind, Options, PutOptions, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest as _;

/// One KiB.
pub const KIB: usize = 1 << 10;
/// One MiB.
pub const MIB: usize = 1 << 20;
/// The store's default large-blob threshold (4 MiB).
pub const DEFAULT_LARGE: usize = 4 * MIB;

/// A fresh temporary directory (removed when dropped).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("layerstore-it-")
        .tempdir()
        .expect("create temporary directory")
}

/// Opens (creating) a store with default options, panicking on error.
pub fn open(root: &Path) -> Store {
    open_with(root, Options::default())
}

/// Opens (creating) a store with `opts`, panicking on error.
pub fn open_with(root: &Path, opts: Options) -> Store {
    match Store::open(root, opts) {
        Ok(s) => s,
        Err(e) => panic!("open store at {}: {e:?}", root.display()),
    }
}

/// Opens a store, retrying while another (dying) process still holds its lock.
/// Used after SIGKILL, which is delivered asynchronously.
pub fn open_when_unlocked(root: &Path, opts: &Options) -> Store {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Store::open(root, opts.clone()) {
            Ok(s) => return s,
            Err(Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open store at {} after kill: {e:?}", root.display()),
        }
    }
}

/// `len` deterministic pseudo-random bytes for `seed` (the blake3 XOF of the seed, so
/// generating even 64 MiB is fast in a debug build).
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(b"layerstore integration blob");
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// A seeded random number generator for choosing sizes and operations.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A random size from a mix weighted towards small blobs: 60% under 512 bytes, 28% up to
/// 8 KiB, 10% up to `large` (exclusive) and 2% from `large` up to twice that.
pub fn mixed_size(rng: &mut StdRng, large: usize) -> usize {
    match rng.random_range(0..100u32) {
        0..=59 => rng.random_range(0..512),
        60..=87 => rng.random_range(512..8 * KIB),
        88..=97 => rng.random_range(8 * KIB..large),
        _ => rng.random_range(large..2 * large),
    }
}

/// sha256 of `data` computed with `sha2` directly, independent of the store's hashers.
pub fn sha256(data: &[u8]) -> Digest {
    let h = sha2::Sha256::digest(data);
    Digest::from_raw(Algorithm::Sha256, &h).expect("32-byte hash")
}

/// A sha256 digest that no test stores (hash of a marker string).
pub fn absent_digest() -> Digest {
    sha256(b"layerstore integration: never stored")
}

/// Every regular file under `dir` (recursively) with its size, keyed by path.
pub fn files_under(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for ent in rd {
            let ent = ent.expect("read directory entry");
            let ty = ent.file_type().expect("file type");
            if ty.is_dir() {
                stack.push(ent.path());
            } else if ty.is_file() {
                let len = ent.metadata().expect("metadata").len();
                out.insert(ent.path(), len);
            }
        }
    }
    out
}

/// Pack segment files (`ROOT/packs/<shard>/pack-<id>.pack`) and their sizes.
pub fn pack_files(root: &Path) -> BTreeMap<PathBuf, u64> {
    files_under(&root.join("packs"))
}

/// Large-blob files (`ROOT/large/<xx>/<alg>-<hex>.<gen>`) and their sizes.
pub fn large_files(root: &Path) -> BTreeMap<PathBuf, u64> {
    files_under(&root.join("large"))
}

/// Total bytes of pack files and of large files under a root.
pub fn disk_totals(root: &Path) -> (u64, u64) {
    (
        pack_files(root).values().sum(),
        large_files(root).values().sum(),
    )
}

/// The segment id in a pack file name (`pack-<16 hex>.pack`).
pub fn segment_id(path: &Path) -> u64 {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    let hex = name
        .strip_prefix("pack-")
        .and_then(|n| n.strip_suffix(".pack"))
        .unwrap_or_else(|| panic!("not a pack file name: {name}"));
    assert_eq!(hex.len(), 16, "pack file id is 16 hex digits: {name}");
    u64::from_str_radix(hex, 16).expect("hex segment id")
}

/// The newest (largest-id) pack file of each shard directory.
pub fn newest_pack_per_shard(root: &Path) -> BTreeMap<PathBuf, (PathBuf, u64)> {
    let mut newest: BTreeMap<PathBuf, (PathBuf, u64)> = BTreeMap::new();
    for path in pack_files(root).keys() {
        let shard = path.parent().expect("shard dir").to_owned();
        let id = segment_id(path);
        match newest.get(&shard) {
            Some((_, best)) if *best >= id => {}
            _ => {
                newest.insert(shard, (path.clone(), id));
            }
        }
    }
    newest
}

/// Names of the entries directly under `ROOT/ingest`.
pub fn ingest_entries(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("ingest"))
        .expect("list ingest dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that `ROOT/ingest` holds only an empty `tmp` directory.
pub fn assert_ingest_clean(root: &Path) {
    assert_eq!(
        ingest_entries(root),
        vec!["tmp".to_owned()],
        "ingest/ must hold only tmp/"
    );
    let tmp: Vec<_> = std::fs::read_dir(root.join("ingest").join("tmp"))
        .expect("list ingest/tmp")
        .collect();
    assert!(tmp.is_empty(), "ingest/tmp must be empty, has {tmp:?}");
}

/// The ingest directory of a ref: `ROOT/ingest/<blake3 hex of ref>`.
pub fn ingest_dir(root: &Path, r#ref: &str) -> PathBuf {
    root.join("ingest")
        .join(blake3::hash(r#ref.as_bytes()).to_hex().as_str())
}

/// Asserts that every blob in `expected` reads back byte for byte.
pub fn assert_all_readable(store: &Store, expected: &BTreeMap<Digest, Vec<u8>>) {
    for (d, data) in expected {
        let got = store.get(d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
        assert!(&*got == data.as_slice(), "bytes of {d} differ");
    }
}

/// Asserts that `iter()` lists exactly the digests in `expected`, with their sizes.
pub fn assert_listing(store: &Store, expected: &BTreeMap<Digest, Vec<u8>>) {
    let listed: BTreeMap<Digest, u64> = store
        .iter()
        .map(|r| {
            let i = r.expect("iterate blobs");
            (i.digest, i.size)
        })
        .collect();
    let want: BTreeMap<Digest, u64> = expected.iter().map(|(d, v)| (*d, v.len() as u64)).collect();
    assert_eq!(listed, want, "iter() must list exactly the stored blobs");
}

/// A `Command` for the `store` binary with `--root root`, isolated from the caller's
/// `STORE_ROOT`, `XDG_DATA_HOME` and `HOME`.
pub fn store_cmd(root: &Path) -> Command {
    let mut c = bare_store_cmd();
    c.arg("--root").arg(root);
    c
}

/// A `Command` for the `store` binary without `--root` and without any inherited root
/// variables.
pub fn bare_store_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_store"));
    c.env_remove("STORE_ROOT")
        .env_remove("XDG_DATA_HOME")
        .env("HOME", "/nonexistent-layerstore-test-home")
        .stdin(Stdio::null());
    c
}

/// Runs a command to completion (with a generous hang guard) and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    run_with_stdin(cmd, None)
}

/// Runs a command, feeding `stdin` if given, and returns its output. Kills it and fails
/// the test if it has not exited after two minutes (a hang guard, not a speed check).
pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn store binary");
    let feeder = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        // The child is ours; end it by its pid so the test fails instead of hanging.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -s KILL {pid}"))
            .status();
        panic!("store binary (pid {pid}) did not exit within two minutes: {cmd:?}");
    }
    if let Some(f) = feeder {
        f.join().expect("stdin feeder");
    }
    waiter
        .join()
        .expect("waiter thread")
        .expect("wait for child")
}

/// Runs a command to completion and returns its output and its peak resident memory in
/// KiB (`VmHWM`, read from `/proc` while it runs: a high-water mark, so the last reading
/// before it exits is its peak up to then).
pub fn run_peak_rss(cmd: &mut Command) -> (Output, u64) {
    use std::io::Read;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .iter_mut()
        .map(|p| {
            let mut p = p.take().expect("pipe");
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = p.read_to_end(&mut v);
                v
            })
        })
        .collect();
    let mut peak = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = s.lines().find(|l| l.starts_with("VmHWM:"))
            && let Some(kb) = line.split_whitespace().nth(1).and_then(|n| n.parse().ok())
        {
            peak = peak.max(kb);
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "command did not finish: {cmd:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut outs = readers.into_iter().map(|r| r.join().expect("pipe reader"));
    let out = Output {
        status,
        stdout: outs.next().unwrap_or_default(),
        stderr: outs.next().unwrap_or_default(),
    };
    (out, peak)
}

/// Runs the CLI on `root` with `args` and returns its output.
pub fn cli(root: &Path, args: &[&str]) -> Output {
    run(store_cmd(root).args(args))
}

/// Asserts success and returns stdout as UTF-8.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// Asserts exit code 1 and an error on stderr; returns stderr.
pub fn failed_stderr(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1, got {}; stdout: {} stderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.starts_with("store: error: "),
        "errors are prefixed `store: error:`; got {stderr:?}"
    );
    stderr
}

/// Copies a directory tree (regular files and directories only), as a crash would leave it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create copy");
    for ent in std::fs::read_dir(src).expect("list") {
        let ent = ent.expect("entry");
        let ty = ent.file_type().expect("file type");
        let to = dst.join(ent.file_name());
        if ty.is_dir() {
            copy_dir(&ent.path(), &to);
        } else if ty.is_file() {
            std::fs::copy(ent.path(), &to).expect("copy file");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Real images built by tests/fixtures/make-images.sh (umoci, skopeo, buildah), once per
// test binary run and cached under the target dir by the script's bytes and tool versions.

/// Marker written into a fixture directory once it is complete.
pub const COMPLETE: &str = ".interop-complete";
/// Tools the fixtures cannot be built without (CI installs them).
pub const REQUIRED_TOOLS: [&str; 2] = ["skopeo", "umoci"];

/// The fixture directory, generated on first use (once per test binary run).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(build_fixtures) {
        Ok(p) => p,
        Err(e) => panic!("interop fixtures are unavailable: {e}"),
    }
}

/// `tool --version`, or why it cannot run.
fn tool_version(tool: &str) -> Result<String, String> {
    match Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(o) => Err(format!(
            "`{tool} --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run `{tool}`: {e}")),
    }
}

/// Runs `make-images.sh` into a fresh directory under `CARGO_TARGET_TMPDIR` (reusing a
/// complete one made by the same script and tool versions).
fn build_fixtures() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/make-images.sh");
    let body = std::fs::read(&script).map_err(|e| format!("read {}: {e}", script.display()))?;
    let mut key = blake3::Hasher::new();
    key.update(&body);
    for tool in REQUIRED_TOOLS {
        let v = tool_version(tool).map_err(|e| {
            format!(
                "{e}\n`{tool}` is required by the interop tests (CI installs it); on Debian: \
                 apt-get install -y --no-install-recommends skopeo umoci zstd"
            )
        })?;
        key.update(v.as_bytes());
    }
    // Optional: only oci-multiarch/ needs it.
    key.update(tool_version("buildah").unwrap_or_default().as_bytes());
    let key = key.finalize().to_hex();
    let key = &key.as_str()[..16];
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join(format!("interop-fixtures-{key}"));
    if dir.join(COMPLETE).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let staging = tmp.join(format!("interop-fixtures-{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("create {}: {e}", staging.display()))?;
    let out = Command::new("bash")
        .arg(&script)
        .arg(&staging)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("FIXTURE_BIG_MIB", "20")
        .env("FIXTURE_MULTIARCH", "auto")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(staging.join(COMPLETE), key)
        .map_err(|e| format!("write marker in {}: {e}", staging.display()))?;
    if dir.exists() && !dir.join(COMPLETE).is_file() {
        // Left by an interrupted run that never finished; ours replaces it.
        let _ = std::fs::remove_dir_all(&dir);
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another test binary finished first: use its (identical) output.
        Err(_) if dir.join(COMPLETE).is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(format!(
                "rename {} to {}: {e}",
                staging.display(),
                dir.display()
            ))
        }
    }
}

/// Puts `data` with a kind and checks the digest it gets.
pub fn put_kind(store: &Store, data: &[u8], kind: Kind) -> Digest {
    let d = store
        .put_with(data, PutOptions::default().kind(kind))
        .unwrap_or_else(|e| panic!("put: {e:?}"))
        .digest;
    assert_eq!(d, sha256(data));
    d
}

/// The keys of a JSON object (panics on anything else).
pub fn json_keys(v: &serde_json::Value) -> std::collections::BTreeSet<&str> {
    v.as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect()
}
