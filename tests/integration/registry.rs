//! What a registry needs beyond a blob store: tag lists by repository and a catalog by
//! prefix, referrers as descriptors (with the artifact-type filter), blob and manifest
//! deletion refused while anything uses them, and existence checks that protect a blob
//! from the collector without a commit each.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use layerstore::backend::sim::SimBackend;
use layerstore::{
    Depth, Digest, ErrorKind, GcOptions, Kind, Options, PutOptions, Store, VerifyOptions,
};
use serde_json::json;

use crate::common::{self, MIB};
use crate::oci;

fn image(seed: u64) -> oci::Built {
    oci::plain(&[vec![oci::file(
        &format!("f{seed}"),
        &common::blob(seed, 2000),
    )]])
}

fn verify_clean(store: &Store) {
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn tags_by_repository_and_repositories_by_prefix() {
    let store = common::open(&common::tempdir().keep());
    let (a, b) = (image(1), image(2));
    a.store(&store, "alpine:3.19");
    a.store(&store, "alpine:latest");
    b.store(&store, "alpine:3.20");
    b.store(&store, "alpinex:1");
    b.store(&store, "example.com/team/app:v1");
    a.store(&store, "example.com/team/app:v2");
    b.store(&store, "example.com/team/app/sub:v1");
    let tags = store.tags("alpine").unwrap();
    assert_eq!(
        tags,
        vec![
            ("3.19".to_owned(), a.digest),
            ("3.20".to_owned(), b.digest),
            ("latest".to_owned(), a.digest),
        ]
    );
    assert_eq!(store.tags("docker.io/library/alpine").unwrap(), tags);
    let app: Vec<String> = store
        .tags("example.com/team/app")
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(app, ["v1", "v2"]);
    assert!(store.tags("example.com/none").unwrap().is_empty());
    for bad in ["alpine:3.19", "alpine@sha256:abcd"] {
        let e = store.tags(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}: {e}");
    }
    assert_eq!(
        store.repositories("example.com/").unwrap(),
        ["example.com/team/app", "example.com/team/app/sub"]
    );
    assert_eq!(
        store.repositories("").unwrap(),
        [
            "docker.io/library/alpine",
            "docker.io/library/alpinex",
            "example.com/team/app",
            "example.com/team/app/sub"
        ]
    );
}

/// A referrer manifest of `subject`: with `artifactType`, or (None) an image manifest
/// whose config media type is the artifact type.
fn referrer(
    subject: &oci::Built,
    artifact: Option<&str>,
    config_type: &str,
    note: &str,
) -> Vec<u8> {
    let config = b"{}";
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": oci::sha(config), "size": 2},
        "layers": [],
        "subject": {"mediaType": oci::OCI_MANIFEST, "digest": subject.digest.to_string(),
                    "size": subject.manifest.len()},
        "annotations": {"org.example.note": note},
    });
    if let Some(a) = artifact {
        m["artifactType"] = json!(a);
    }
    serde_json::to_vec(&m).unwrap()
}

#[test]
fn referrers_come_as_descriptors_and_filter_by_artifact_type() {
    let store = common::open(&common::tempdir().keep());
    let img = image(3);
    img.store(&store, "app:1");
    store
        .put_with(b"{}", PutOptions::default().kind(Kind::Config))
        .unwrap();
    let sig = referrer(
        &img,
        Some("application/vnd.example.sig"),
        "application/vnd.oci.empty.v1+json",
        "signed",
    );
    let sbom = referrer(&img, None, "application/vnd.example.sbom", "sbom");
    let mut want = Vec::new();
    for (m, artifact, note) in [
        (&sig, "application/vnd.example.sig", "signed"),
        (&sbom, "application/vnd.example.sbom", "sbom"),
    ] {
        let d = store
            .put_manifest(m, PutOptions::default())
            .unwrap()
            .descriptor;
        want.push((d.digest, d.size, artifact, note));
    }
    want.sort();
    let got = store.referrer_descriptors(&img.digest, None).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    for (g, (digest, size, artifact, note)) in got.iter().zip(&want) {
        assert_eq!(g.digest, *digest);
        assert_eq!(g.size, *size);
        assert_eq!(g.media_type, oci::OCI_MANIFEST);
        assert_eq!(g.artifact_type.as_deref(), Some(*artifact));
        assert_eq!(g.annotations["org.example.note"], *note);
    }
    // The JSON is the referrers API's descriptor shape.
    let v = serde_json::to_value(&got[0]).unwrap();
    assert!(
        v.get("mediaType").is_some() && v.get("artifactType").is_some(),
        "{v}"
    );
    let only = store
        .referrer_descriptors(&img.digest, Some("application/vnd.example.sbom"))
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].annotations["org.example.note"], "sbom");
    assert!(
        store
            .referrer_descriptors(&img.digest, Some("application/none"))
            .unwrap()
            .is_empty()
    );
    // A referrer can be deleted while its subject stays; the rest are still listed.
    store.delete(&only[0].digest).unwrap();
    let left = store.referrer_descriptors(&img.digest, None).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].annotations["org.example.note"], "signed");
    verify_clean(&store);
}

#[test]
fn delete_is_refused_while_anything_uses_the_blob() {
    let root = common::tempdir().keep();
    let store = common::open_with(&root, Options::default().large_threshold(MIB as u64));
    let img = image(4);
    img.store(&store, "app:1");
    let layer = common::sha256(&img.layers[0].1);
    let config = common::sha256(&img.config);
    let used = |d: &Digest| {
        let e = store.delete(d).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert!(e.is_refusal());
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(store.contains(d).unwrap());
    };
    used(&layer); // named by the manifest
    used(&config);
    used(&img.digest); // held by its name
    // A leased blob.
    let lease = store.lease_create(None).unwrap().id;
    let held = store
        .put_with(b"held", PutOptions::default().lease(&lease))
        .unwrap()
        .digest;
    used(&held);
    store.lease_remove(&lease).unwrap();
    assert_eq!(store.delete(&held).unwrap(), 4);
    // Untagged, the manifest goes; then its children are free to go.
    store.remove_image("app:1", false).unwrap();
    let before = store.info().unwrap();
    store.delete(&img.digest).unwrap();
    assert_eq!(store.counts(&layer).unwrap().0, 0);
    store.delete(&layer).unwrap();
    store.delete(&config).unwrap();
    for d in [img.digest, layer, config, held] {
        let e = store.get(&d).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert_eq!(store.delete(&d).unwrap_err().kind(), ErrorKind::NotFound);
    }
    let after = store.info().unwrap();
    assert_eq!(after.blobs, before.blobs - 3);
    // A large blob's file goes with it (after the commit).
    let big = store.put(&common::blob(9, 3 * MIB)).unwrap().digest;
    assert_eq!(common::large_files(&root).len(), 1);
    assert_eq!(store.delete(&big).unwrap(), 3 * MIB as u64);
    assert!(common::large_files(&root).is_empty());
    verify_clean(&store);
    drop(store);
    // And it stays deleted across a reopen.
    let store = common::open(&root);
    assert!(!store.contains(&big).unwrap());
    assert!(!store.contains(&layer).unwrap());
    verify_clean(&store);
}

#[test]
fn an_existence_check_protects_the_blob_without_a_commit() {
    let sim = SimBackend::new();
    let store = Store::open_with(Arc::new(sim.clone()), Options::default()).unwrap();
    let kept = store.put(&common::blob(20, 5000)).unwrap().digest;
    let gone = store.put(&common::blob(21, 5000)).unwrap().digest;
    std::thread::sleep(Duration::from_millis(300));
    let syncs = sim.syncs();
    for _ in 0..100 {
        assert!(store.ensure(&kept).unwrap());
    }
    assert!(!store.ensure(&common::absent_digest()).unwrap());
    assert_eq!(sim.syncs(), syncs, "an existence check committed");
    // Both were stored 300 ms ago; only the checked one was relied on within the grace.
    let report = store
        .gc(
            &GcOptions::default().grace(Duration::from_millis(200)),
            &AtomicBool::new(false),
        )
        .unwrap();
    assert!(store.contains(&kept).unwrap(), "{report:?}");
    assert!(!store.contains(&gone).unwrap(), "{report:?}");
    // The refresh was written by the collection's transactions, and is durable now.
    let touched = store.stat(&kept).unwrap().unwrap().touched_ms;
    drop(store);
    let store = Store::open_with(Arc::new(sim.crash()), Options::default()).unwrap();
    assert_eq!(store.stat(&kept).unwrap().unwrap().touched_ms, touched);
}

/// Existence checks racing collections with no grace: a check that answers `true` is a
/// promise the blob survives the collection running beside it.
#[test]
fn an_existence_check_racing_collections_is_never_broken() {
    let store = common::open(&common::tempdir().keep());
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store
                    .gc(
                        &GcOptions::default().grace(Duration::from_millis(150)),
                        &AtomicBool::new(false),
                    )
                    .unwrap();
                runs += 1;
            }
            runs
        })
    };
    let mut promised = 0;
    for i in 0..64u64 {
        let d = store.put(&common::blob(1000 + i, 700)).unwrap().digest;
        // Some are collected before their check, some just after it would have been.
        std::thread::sleep(Duration::from_millis(50 * (i % 8)));
        if store.ensure(&d).unwrap() {
            promised += 1;
            // Within the grace of the check: still there, whatever the collector did.
            assert!(
                store.contains(&d).unwrap(),
                "{d} was promised and collected"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = collector.join().unwrap();
    assert!(runs > 5, "only {runs} collections ran");
    assert!(promised > 0 && promised < 64, "{promised} of 64 promised");
}

#[test]
fn metrics_count_what_the_store_did() {
    let store = common::open(&common::tempdir().keep());
    let m0 = store.metrics();
    assert_eq!(m0.blobs_written, 0);
    let a = store.put(b"metrics-a").unwrap().digest;
    store.put(b"metrics-a").unwrap(); // stored already: nothing written
    store.put(&common::blob(77, 2 * MIB)).unwrap();
    let m = store.metrics();
    assert_eq!(m.blobs_written, 2, "{m:?}");
    assert_eq!(m.bytes_written, 9 + 2 * MIB as u64);
    assert!(
        m.commits >= 2 && m.durable_commits >= 2 && m.commit_ops >= m.commits,
        "{m:?}"
    );
    assert!(
        m.commit_us_max > 0 && m.commit_us >= m.commit_us_max,
        "{m:?}"
    );
    assert!(m.submitted >= 3 && m.submit_wait_us > 0, "{m:?}");
    assert_eq!(&*store.get(&a).unwrap(), b"metrics-a");
    assert_eq!(store.read_range(&a, 2, 3).unwrap().len(), 3);
    let m = store.metrics();
    assert_eq!((m.reads, m.bytes_read), (2, 12), "{m:?}");
    store.delete(&a).unwrap();
    store
        .gc(
            &GcOptions::default().grace(Duration::ZERO),
            &AtomicBool::new(false),
        )
        .unwrap();
    let m = store.metrics();
    assert_eq!(m.blobs_removed, 2, "{m:?}");
    assert_eq!(m.bytes_removed, 9 + 2 * MIB as u64);
    assert_eq!(m.gc_runs, 1);
    assert!(m.gc_us > 0 && m.gc_us_last == m.gc_us, "{m:?}");
}

#[test]
fn verbose_logs_spans_with_durations_and_is_silent_otherwise() {
    let root = common::tempdir().keep();
    common::ok_stdout(&common::run_with_stdin(
        common::store_cmd(&root).args(["blob", "put", "-"]),
        Some(b"logged"),
    ));
    let out = common::run(common::store_cmd(&root).args(["--verbose", "gc"]));
    common::ok_stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collected") && err.contains("removed_blobs"),
        "{err}"
    );
    assert!(
        err.contains("time.busy"),
        "spans close with their duration: {err}"
    );
    let out = common::run(common::store_cmd(&root).env_remove("RUST_LOG").args(["gc"]));
    common::ok_stdout(&out);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = common::ok_stdout(&common::cli(&root, &["info", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(v["metrics"]["commits"].is_u64(), "{v}");
}
