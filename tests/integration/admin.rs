//! Admin commands beside a live embedder, with two real processes: the example embedder
//! (`store/examples/embedder.rs`: pushes images through the async API under leases, tags,
//! registers containers, untags old images and collects garbage every 300 ms) holds the
//! store and serves its admin socket, while the `store` binary runs every admin command
//! against the same root. Each must succeed as it does alone — reads, `verify --deep`
//! finding nothing while collections and compactions run, `gc`, `tag`, `rmi`, `import`
//! and `export` with relative paths, `blob put -` from standard input, `unpack`,
//! `verify --repair` — with the output it gives alone once the embedder is gone;
//! `repair` is refused with a reason; a peer that is neither root nor the store's owner
//! is refused; the embedder's own work goes on and its store verifies clean at the end.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;
use crate::oci;

/// An example of the `layerstore` package, built (or found fresh) by cargo.
fn example_bin(name: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "layerstore", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo to build an example");
    assert!(status.success(), "building the example {name} failed");
    // target/debug/deps/integration-… -> target/debug/examples/NAME
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

fn embedder_bin() -> PathBuf {
    example_bin("embedder")
}

/// The embedder process; stopped (standard input closed, then waited for) when dropped.
struct Embedder {
    child: Option<Child>,
}

impl Embedder {
    fn start(root: &Path) -> Embedder {
        let mut child = Command::new(embedder_bin())
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the embedder");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("serving "), "embedder said {line:?}");
        Embedder { child: Some(child) }
    }

    /// Stops it and returns its last line ("pushed N images, ran M collections").
    fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "the embedder failed: {}", out.status);
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Embedder {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(&common::ok_stdout(out)).expect("JSON output")
}

#[test]
fn every_admin_command_works_beside_a_live_embedder() {
    let tmp = common::tempdir();
    let root = tmp.path().join("store");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let emb = Embedder::start(&root);
    // It is the store's writer: a plain open from here is refused.
    let err = layerstore::Store::open(&root, layerstore::Options::default()).unwrap_err();
    assert_eq!(err.kind(), layerstore::ErrorKind::Busy, "{err}");

    // Wait for some pushes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let images = json(&common::cli(&root, &["images", "--json"]));
        if images.as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the embedder pushed nothing");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Reads.
    let info = json(&common::cli(&root, &["info", "--json"]));
    assert!(info["blobs"].as_u64().unwrap() > 0, "{info}");
    let text = common::ok_stdout(&common::cli(&root, &["info"]));
    assert!(text.starts_with("root:"), "{text}");
    // The newest push (older ones are being untagged), pinned by a name of our own.
    let images = json(&common::cli(&root, &["images", "--json"]));
    let newest = images
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| {
            i["name"]
                .as_str()?
                .strip_prefix("example.com/app:")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    let name = format!("example.com/app:{newest}");
    let out = common::ok_stdout(&common::cli(&root, &["tag", &name, "admin/kept:1"]));
    assert!(out.contains("admin/kept:1"), "{out}");
    let name = "admin/kept:1".to_owned();
    common::ok_stdout(&common::cli(&root, &["inspect", &name]));
    common::ok_stdout(&common::cli(&root, &["df"]));
    let blobs = common::ok_stdout(&common::cli(&root, &["blob", "ls"]));
    assert!(blobs.lines().count() > 3, "{blobs}");
    common::ok_stdout(&common::cli(&root, &["lease", "ls"]));
    common::ok_stdout(&common::cli(&root, &["container", "ls"]));

    // Checks while the embedder pushes, untags and collects: no false problem.
    for depth in ["--fast", "--deep", "--deep", "--deep"] {
        let out = common::cli(&root, &["verify", depth, "--json"]);
        let report = json(&out);
        assert_eq!(report["errors"], 0, "verify {depth}: {report}");
    }
    let dry = json(&common::cli(&root, &["gc", "--dry-run", "--json"]));
    assert_eq!(dry["dry_run"], true);
    let gc = json(&common::cli(&root, &["gc", "--json"]));
    assert_eq!(gc["dry_run"], false);

    // Writes.
    let out = common::ok_stdout(&common::cli(&root, &["tag", &name, "admin/second:1"]));
    assert!(out.contains("admin/second:1"), "{out}");
    let img = oci::plain(&[vec![oci::file("hello", b"from the admin side")]]);
    std::fs::write(work.join("in.tar"), oci::oci_archive(&[(&img, "v1")], &[])).unwrap();
    // Relative paths are the caller's, not the embedder's.
    let out = common::run(
        common::store_cmd(&root)
            .args(["import", "in.tar", "--tag", "admin/imported:1", "--json"])
            .current_dir(&work),
    );
    let imported = json(&out);
    assert_eq!(imported["images"][0]["digest"], img.digest.to_string());
    common::ok_stdout(&common::run(
        common::store_cmd(&root)
            .args(["export", "admin/imported:1", "-o", "out.tar"])
            .current_dir(&work),
    ));
    let back = common::open(&tmp.path().join("back"));
    let o = back
        .import_path(&work.join("out.tar"), &layerstore::ImportOptions::default())
        .unwrap();
    assert_eq!(o.images[0].digest, img.digest);
    common::ok_stdout(&common::run(
        common::store_cmd(&root)
            .args(["unpack", "admin/imported:1", "rootfs"])
            .current_dir(&work),
    ));
    assert_eq!(
        std::fs::read(work.join("rootfs/hello")).unwrap(),
        b"from the admin side"
    );
    // Standard input is the caller's.
    let out = common::run_with_stdin(
        common::store_cmd(&root).args(["blob", "put", "-"]),
        Some(b"bytes on stdin"),
    );
    let digest = common::ok_stdout(&out).trim().to_owned();
    assert_eq!(digest, common::sha256(b"bytes on stdin").to_string());
    let got = common::cli(&root, &["blob", "get", &digest]);
    assert_eq!(got.stdout, b"bytes on stdin");
    let id = common::ok_stdout(&common::cli(
        &root,
        &["container", "create", "--image", "admin/imported:1"],
    ));
    common::ok_stdout(&common::cli(&root, &["container", "rm", id.trim()]));
    let lease = common::ok_stdout(&common::cli(&root, &["lease", "create"]));
    common::ok_stdout(&common::cli(&root, &["lease", "rm", lease.trim()]));
    let out = common::ok_stdout(&common::cli(&root, &["rmi", "admin/second:1"]));
    assert!(out.contains("Untagged: admin/second:1"), "{out}");
    let repaired = json(&common::cli(&root, &["verify", "--repair", "--json"]));
    assert_eq!(repaired["errors"], 0, "{repaired}");
    // Errors and their exit status as alone.
    let err = common::failed_stderr(&common::cli(&root, &["inspect", "admin/none:1"]));
    assert!(err.contains("admin/none"), "{err}");
    let err = common::failed_stderr(&common::cli(&root, &["repair", "--rebuild-index"]));
    assert!(err.contains("stop that process first"), "{err}");
    // A path naming this process's own descriptors would be the embedder's.
    let err = common::failed_stderr(&common::cli(&root, &["blob", "put", "/dev/stdin"]));
    assert!(err.contains("own descriptor"), "{err}");

    // Served output is the output alone: the same command once the embedder is gone.
    let served = common::ok_stdout(&common::cli(&root, &["inspect", "admin/imported:1"]));
    let served_json = json(&common::cli(
        &root,
        &["inspect", "admin/imported:1", "--json"],
    ));
    let last = emb.stop();
    assert!(last.contains("pushed"), "{last}");
    assert!(
        !root.join(layerstore::admin::SOCKET).exists(),
        "socket left behind"
    );
    assert_eq!(
        common::ok_stdout(&common::cli(&root, &["inspect", "admin/imported:1"])),
        served
    );
    assert_eq!(
        json(&common::cli(
            &root,
            &["inspect", "admin/imported:1", "--json"]
        )),
        served_json
    );
    let report = json(&common::cli(&root, &["verify", "--deep", "--json"]));
    assert_eq!(report["errors"], 0, "{report}");
}

#[test]
fn a_peer_that_is_not_the_owner_or_root_is_refused() {
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var_os("LAYERSTORE_CI").is_none(),
            "CI must run as root to test another user's access"
        );
        eprintln!("SKIPPED: running the CLI as another user needs root (CI runs this test)");
        return;
    }
    let tmp = common::tempdir();
    let root = tmp.path().join("store");
    let emb = Embedder::start(&root);
    // `nobody` may reach the socket (the temporary directories are 0700), but must not
    // be served.
    for dir in [tmp.path(), root.as_path()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    }
    let sock = root.join(layerstore::admin::SOCKET);
    let mode = std::fs::metadata(&sock).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Opened up, so that only the credential check stands in the way.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = common::run(
        common::store_cmd(&root)
            .args(["images"])
            .uid(65534)
            .gid(65534),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("owner and root only"), "{err}");
    assert!(out.stdout.is_empty());
    emb.stop();
}

#[test]
fn dropping_the_server_stops_serving_and_releases_the_store() {
    let tmp = common::tempdir();
    let root = tmp.path().join("store");
    let store = common::open(&root);
    let server = layerstore::admin::serve(&store).unwrap();
    assert_eq!(server.path(), root.join(layerstore::admin::SOCKET));
    let out = common::cli(&root, &["images", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]));
    drop(server);
    assert!(!root.join(layerstore::admin::SOCKET).exists());
    // Not served any more: the plain refusal, naming the root.
    let err = common::failed_stderr(&common::cli(&root, &["images"]));
    assert!(err.contains("locked"), "{err}");
    // No clone of the store outlives the server: the lock is free once it is dropped.
    drop(store);
    common::open(&root);
}

#[test]
fn a_stalled_or_malformed_client_neither_pins_the_store_nor_hangs() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let tmp = common::tempdir();
    let root = tmp.path().join("store");
    let store = common::open(&root);
    let server = layerstore::admin::serve(&store).unwrap();
    // A request that does not parse, with no descriptors: status 1, connection closed.
    let mut bad = UnixStream::connect(server.path()).unwrap();
    bad.write_all(&5u32.to_le_bytes()).unwrap();
    bad.write_all(b"nope!").unwrap();
    let mut got = Vec::new();
    bad.read_to_end(&mut got).unwrap();
    assert!(got.len() <= 1, "{got:?}");
    // A client that connects and says nothing.
    let stalled = UnixStream::connect(server.path()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(server);
    drop(store);
    // Neither connection holds the store: it opens again at once.
    let again = layerstore::Store::open(&root, layerstore::Options::default());
    assert!(again.is_ok(), "{:?}", again.err());
    drop(stalled);
}

#[test]
fn the_runtime_example_unpacks_under_a_container() {
    let tmp = common::tempdir();
    let root = tmp.path().join("store");
    let store = common::open(&root);
    let img = oci::plain(&[vec![oci::file("etc/motd", b"hello runtime")]]);
    img.store(&store, "example.com/rt:1");
    drop(store);
    let rootfs = tmp.path().join("rootfs");
    let out = common::run(
        Command::new(example_bin("unpack"))
            .arg(&root)
            .arg("example.com/rt:1")
            .arg(&rootfs)
            .arg("web"),
    );
    let text = common::ok_stdout(&out);
    assert!(text.contains("1 layers"), "{text}");
    assert_eq!(
        std::fs::read(rootfs.join("etc/motd")).unwrap(),
        b"hello runtime"
    );
    // The container holds the image against a collection.
    let store = common::open(&root);
    let c = store.containers().unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].name, "web");
    assert_eq!(c[0].image, img.digest);
    store.remove_image("example.com/rt:1", true).unwrap();
    store
        .gc(
            &layerstore::GcOptions::default().grace(Duration::ZERO),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
    assert!(store.contains(&img.digest).unwrap());
    // A second unpack into the same directory fails and leaves no container behind.
    drop(store);
    let out = common::run(
        Command::new(example_bin("unpack"))
            .arg(&root)
            .arg(img.digest.to_string())
            .arg(&rootfs)
            .arg("web2"),
    );
    assert!(!out.status.success());
    assert_eq!(common::open(&root).containers().unwrap().len(), 1);
}
