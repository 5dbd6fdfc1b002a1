//! Locking: one handle (and its clones) owns a store root; a second open in this process
//! or in another process fails at once with a `Locked` error that names the root.

use layerstore::{Error, Options, Store};

use crate::common;

#[test]
fn second_process_is_refused_with_locked() {
    let dir = common::tempdir();
    let root = dir.path().join("held");
    let store = common::open(&root);
    let d = store
        .put(b"held by the test")
        .expect("put")
        .digest
        .to_string();

    for args in [
        vec!["info"],
        vec!["info", "--json"],
        vec!["blob", "ls"],
        vec!["blob", "get", d.as_str()],
        vec!["init"],
    ] {
        let out = common::cli(&root, &args);
        let stderr = common::failed_stderr(&out);
        assert!(stderr.contains("locked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&root.display().to_string()),
            "{args:?}: the error names the root: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    // A writing command is refused the same way, and writes nothing.
    let file = dir.path().join("f");
    std::fs::write(&file, b"from another process").expect("write");
    let out = common::cli(&root, &["blob", "put", file.to_str().expect("utf-8 path")]);
    assert!(common::failed_stderr(&out).contains("locked"));
    assert_eq!(store.info().expect("info").blobs, 1);

    // Once the holder is gone, the other process gets in.
    drop(store);
    let out = common::cli(&root, &["info", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::ok_stdout(&out)).expect("json");
    assert_eq!(v["blobs"], 1);
}

#[test]
fn second_open_in_process_is_locked() {
    let dir = common::tempdir();
    let root = dir.path().to_owned();
    let store = common::open(&root);
    let expect_locked = |what: &str| match Store::open(&root, Options::default()) {
        Err(Error::Locked { path }) => {
            assert_eq!(path, root, "{what}: Locked names the root");
        }
        Err(e) => panic!("{what}: expected Locked, got {e:?}"),
        Ok(_) => panic!("{what}: a second handle opened the same root"),
    };
    expect_locked("while the first handle is open");
    let msg = Store::open(&root, Options::default().create(false))
        .expect_err("locked")
        .to_string();
    assert!(
        msg.contains("locked") && msg.contains(&root.display().to_string()),
        "{msg}"
    );

    // A clone keeps the lock after the original handle is dropped.
    let clone = store.clone();
    drop(store);
    expect_locked("while a clone is alive");
    clone.put(b"still usable").expect("put through the clone");
    drop(clone);

    let store = Store::open(&root, Options::default()).expect("open after release");
    assert_eq!(store.info().expect("info").blobs, 1);
}
