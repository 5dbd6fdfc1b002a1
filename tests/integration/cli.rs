//! The `store` command line: every command in human and JSON form, standard input and
//! output, `STORE_ROOT`, and the errors a user sees (bad digest, missing blob, missing store).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use layerstore::{Digest, Location, Options, Store};
use serde_json::Value;

use crate::common::{self, DEFAULT_LARGE, KIB};

/// Checks one `blob stat --json` / `blob ls --json` object against the bytes it describes.
fn check_stat_json(v: &Value, data: &[u8]) {
    let d = common::sha256(data);
    let obj = v.as_object().expect("object");
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["digest", "size", "kind", "location", "blake3", "touched_ms"]),
        "stat JSON keys"
    );
    assert_eq!(v["digest"], d.to_string());
    assert_eq!(v["size"], data.len() as u64);
    assert_eq!(v["kind"], "other");
    assert_eq!(v["blake3"], blake3::hash(data).to_hex().as_str());
    assert!(v["touched_ms"].as_u64().expect("touched_ms") > 0);
    let loc = &v["location"];
    if data.len() >= DEFAULT_LARGE {
        assert_eq!(loc["type"], "large", "{d}");
        assert!(loc["generation"].is_u64());
    } else {
        assert_eq!(loc["type"], "packed", "{d}");
        assert!(loc["segment"].is_u64() && loc["offset"].is_u64());
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn every_command_works() {
    let dir = common::tempdir();
    let root = dir.path().join("store");

    // init with a shard count.
    let out = common::ok_stdout(&common::cli(&root, &["init", "--shards", "3"]));
    assert!(
        out.contains(&format!("initialized store at {}", root.display()))
            && out.contains("3 shards"),
        "{out}"
    );
    assert!(root.join("meta.redb").exists() && root.join("packs").is_dir());
    // An empty store lists an empty JSON array and nothing in plain form.
    let v: Value = serde_json::from_str(&common::ok_stdout(&common::cli(
        &root,
        &["blob", "ls", "--json"],
    )))
    .expect("ls json");
    assert_eq!(v, Value::Array(Vec::new()));
    assert_eq!(common::ok_stdout(&common::cli(&root, &["blob", "ls"])), "");

    // blob put of files (empty, small, large, a repeat) and of standard input.
    let files_dir = dir.path().join("in");
    std::fs::create_dir(&files_dir).expect("mkdir");
    let contents: Vec<Vec<u8>> = vec![
        Vec::new(),
        common::blob(1, 1),
        common::blob(2, 10 * KIB),
        common::blob(3, DEFAULT_LARGE + 1),
        common::blob(4, 777),
    ];
    let paths: Vec<_> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = files_dir.join(format!("f{i}"));
            std::fs::write(&p, c).expect("write");
            p
        })
        .collect();
    let mut args = vec!["blob", "put"];
    args.extend(paths.iter().map(|p| path_str(p)));
    args.push(path_str(&paths[2])); // the same file again
    let out = common::ok_stdout(&common::cli(&root, &args));
    let mut want: Vec<String> = contents
        .iter()
        .map(|c| common::sha256(c).to_string())
        .collect();
    want.push(want[2].clone());
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        want,
        "one digest per input, in order"
    );
    for line in out.lines() {
        assert!(line.starts_with("sha256:") && Digest::parse(line).is_ok());
    }

    let stdin_data = common::blob(5, 200 * KIB);
    let out = common::run_with_stdin(
        common::store_cmd(&root).args(["blob", "put", "-"]),
        Some(&stdin_data),
    );
    assert_eq!(
        common::ok_stdout(&out).trim_end(),
        common::sha256(&stdin_data).to_string()
    );
    // Standard input between files keeps the order.
    let stdin_small = common::blob(6, 33);
    let out = common::run_with_stdin(
        common::store_cmd(&root).args([
            "blob",
            "put",
            path_str(&paths[1]),
            "-",
            path_str(&paths[4]),
        ]),
        Some(&stdin_small),
    );
    assert_eq!(
        common::ok_stdout(&out).lines().collect::<Vec<_>>(),
        vec![
            want[1].as_str(),
            &common::sha256(&stdin_small).to_string(),
            want[4].as_str()
        ]
    );

    let mut all: BTreeMap<Digest, Vec<u8>> = contents
        .iter()
        .map(|c| (common::sha256(c), c.clone()))
        .collect();
    all.insert(common::sha256(&stdin_data), stdin_data.clone());
    all.insert(common::sha256(&stdin_small), stdin_small.clone());

    // blob get to standard output and to a file.
    for (d, data) in &all {
        let out = common::cli(&root, &["blob", "get", &d.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *data, "stdout bytes of {d}");
    }
    let target = dir.path().join("out.bin");
    let d_large = common::sha256(&contents[3]);
    let out = common::cli(
        &root,
        &["blob", "get", &d_large.to_string(), "-o", path_str(&target)],
    );
    assert!(
        common::ok_stdout(&out).is_empty(),
        "-o writes nothing to stdout"
    );
    assert!(std::fs::read(&target).expect("read -o file") == contents[3]);

    // blob stat, human and JSON.
    let d_small = common::sha256(&contents[2]);
    let human = common::ok_stdout(&common::cli(&root, &["blob", "stat", &d_small.to_string()]));
    for want_line in [
        format!("digest:   {d_small}"),
        format!("size:     {}", contents[2].len()),
        "kind:     other".to_owned(),
        "location: packed (segment ".to_owned(),
        format!("blake3:   {}", blake3::hash(&contents[2]).to_hex()),
    ] {
        assert!(human.contains(&want_line), "{want_line:?} in {human}");
    }
    let human = common::ok_stdout(&common::cli(&root, &["blob", "stat", &d_large.to_string()]));
    assert!(
        human.contains("location: large file (generation "),
        "{human}"
    );
    for (d, data) in &all {
        let out = common::ok_stdout(&common::cli(
            &root,
            &["blob", "stat", &d.to_string(), "--json"],
        ));
        let v: Value = serde_json::from_str(&out).expect("stat json");
        check_stat_json(&v, data);
    }

    // blob ls, human and JSON, list exactly what was put.
    let plain = common::ok_stdout(&common::cli(&root, &["blob", "ls"]));
    let listed: BTreeMap<Digest, (u64, String)> = plain
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "digest<TAB>size<TAB>kind: {l:?}");
            (
                Digest::parse(f[0]).expect("digest"),
                (f[1].parse().expect("size"), f[2].to_owned()),
            )
        })
        .collect();
    let want_listed: BTreeMap<Digest, (u64, String)> = all
        .iter()
        .map(|(d, v)| (*d, (v.len() as u64, "other".to_owned())))
        .collect();
    assert_eq!(listed, want_listed);
    assert_eq!(plain.lines().count(), all.len(), "no duplicates");
    let v: Value = serde_json::from_str(&common::ok_stdout(&common::cli(
        &root,
        &["blob", "ls", "--json"],
    )))
    .expect("ls json");
    let arr = v.as_array().expect("array");
    assert_eq!(arr.len(), all.len());
    let mut seen = BTreeSet::new();
    for item in arr {
        let d = Digest::parse(item["digest"].as_str().expect("digest")).expect("digest");
        check_stat_json(item, &all[&d]);
        seen.insert(d);
    }
    assert_eq!(seen, all.keys().copied().collect());

    // info, human and JSON.
    let total: u64 = all.values().map(|v| v.len() as u64).sum();
    let human = common::ok_stdout(&common::cli(&root, &["info"]));
    assert!(
        human.contains(&format!("blobs:           {}", all.len())),
        "{human}"
    );
    assert!(
        human.contains(&format!("bytes:           {total}")),
        "{human}"
    );
    assert!(human.contains("shards:          3"), "{human}");
    let v: Value =
        serde_json::from_str(&common::ok_stdout(&common::cli(&root, &["info", "--json"])))
            .expect("info json");
    let keys = common::json_keys(&v);
    assert_eq!(
        keys,
        BTreeSet::from([
            "root",
            "blobs",
            "bytes",
            "large_blobs",
            "large_bytes",
            "shards",
            "segments",
            "sealed_segments",
            "live_bytes",
            "dead_bytes",
            "ingests",
            "ingest_bytes",
            "metrics"
        ])
    );
    // This command's own counters: it opened the store read-only and wrote nothing.
    assert_eq!(v["metrics"]["blobs_written"], 0);
    assert_eq!(
        (v["ingests"].as_u64(), v["ingest_bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(v["root"], root.display().to_string());
    assert_eq!(v["blobs"], all.len() as u64);
    assert_eq!(v["bytes"], total);
    assert_eq!(v["large_blobs"], 1);
    assert_eq!(v["large_bytes"], contents[3].len() as u64);
    assert_eq!(v["shards"], 3);
    assert_eq!(v["dead_bytes"], 0);

    // The library sees the same store.
    let store = Store::open(&root, Options::default().create(false)).expect("open");
    let info = store.info().expect("info");
    let mut without_metrics = v.clone();
    without_metrics.as_object_mut().unwrap().remove("metrics");
    assert_eq!(
        serde_json::to_value(&info).expect("serialize"),
        without_metrics
    );
    assert!(matches!(
        store
            .stat(&d_large)
            .expect("stat")
            .expect("present")
            .location,
        Location::Large { .. }
    ));
    common::assert_all_readable(&store, &all);
    drop(store);
}

#[test]
fn errors_are_clear() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let data = b"present".to_vec();
    let f = dir.path().join("f");
    std::fs::write(&f, &data).expect("write");
    common::ok_stdout(&common::cli(&root, &["blob", "put", path_str(&f)]));

    // Malformed digests: exit 1, a message that says what is wrong with it.
    for (bad, says) in [
        ("nonsense", "expected ALGORITHM:HEX"),
        ("md5:0123", "unsupported digest algorithm"),
        ("sha256:abc", "expected 64 hex digits"),
        (
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "not lower-case hex",
        ),
    ] {
        for cmd in [["blob", "get"], ["blob", "stat"]] {
            let out = common::cli(&root, &[cmd[0], cmd[1], bad]);
            let stderr = common::failed_stderr(&out);
            assert!(stderr.contains("digest"), "{bad}: {stderr}");
            assert!(stderr.contains(says), "{bad}: {stderr}");
            assert!(out.stdout.is_empty());
        }
    }

    // A well-formed digest that is not stored.
    let absent = common::absent_digest().to_string();
    for args in [
        vec!["blob", "get", absent.as_str()],
        vec!["blob", "stat", absent.as_str()],
        vec!["blob", "stat", absent.as_str(), "--json"],
    ] {
        let out = common::cli(&root, &args);
        let stderr = common::failed_stderr(&out);
        assert!(
            stderr.contains("not found") && stderr.contains(&absent),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    // get -o of a missing blob leaves no file.
    let target = dir.path().join("never");
    let out = common::cli(&root, &["blob", "get", &absent, "-o", path_str(&target)]);
    assert!(common::failed_stderr(&out).contains("not found"));
    assert!(!target.exists());

    // Read commands on a missing store never create one.
    let missing = dir.path().join("missing");
    let present = common::sha256(&data).to_string();
    for args in [
        vec!["info"],
        vec!["info", "--json"],
        vec!["blob", "ls"],
        vec!["blob", "ls", "--json"],
        vec!["blob", "get", present.as_str()],
        vec!["blob", "stat", present.as_str()],
    ] {
        let out = common::cli(&missing, &args);
        let stderr = common::failed_stderr(&out);
        assert!(
            stderr.contains(&format!("no store at {}", missing.display())),
            "{args:?}: {stderr}"
        );
        assert!(!missing.exists(), "{args:?} must not create the store");
    }

    // A missing input file and a bad shard count are errors too.
    let out = common::cli(&root, &["blob", "put", path_str(&dir.path().join("nope"))]);
    assert!(common::failed_stderr(&out).contains("nope"));
    let out = common::cli(&dir.path().join("s0"), &["init", "--shards", "0"]);
    assert!(common::failed_stderr(&out).contains("shard count"));
}

#[test]
fn store_root_environment_is_honoured() {
    let dir = common::tempdir();
    let root = dir.path().join("from-env");
    let f = dir.path().join("f");
    let data = common::blob(9, 4 * KIB);
    std::fs::write(&f, &data).expect("write");
    let d = common::sha256(&data).to_string();

    let out = common::run(common::bare_store_cmd().env("STORE_ROOT", &root).args([
        "blob",
        "put",
        path_str(&f),
    ]));
    assert_eq!(common::ok_stdout(&out).trim_end(), d);
    assert!(
        root.join("meta.redb").exists(),
        "the put created the store at $STORE_ROOT"
    );

    let out = common::run(
        common::bare_store_cmd()
            .env("STORE_ROOT", &root)
            .args(["info", "--json"]),
    );
    let v: Value = serde_json::from_str(&common::ok_stdout(&out)).expect("json");
    assert_eq!(v["root"], root.display().to_string());
    assert_eq!(v["blobs"], 1);
    let out = common::run(common::bare_store_cmd().env("STORE_ROOT", &root).args([
        "blob",
        "get",
        d.as_str(),
    ]));
    assert!(out.status.success() && out.stdout == data);

    // --root wins over STORE_ROOT.
    let other = dir.path().join("other");
    let out = common::run(
        common::store_cmd(&other)
            .env("STORE_ROOT", &root)
            .args(["info"]),
    );
    assert!(common::failed_stderr(&out).contains(&format!("no store at {}", other.display())));

    // Without either, XDG_DATA_HOME/layerstore is used.
    let xdg = dir.path().join("xdg");
    let out = common::run(common::bare_store_cmd().env("XDG_DATA_HOME", &xdg).args([
        "blob",
        "put",
        path_str(&f),
    ]));
    assert_eq!(common::ok_stdout(&out).trim_end(), d);
    assert!(xdg.join("layerstore").join("meta.redb").exists());
}
