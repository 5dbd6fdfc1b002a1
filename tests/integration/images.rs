//! The image model: manifests and indexes add edges to their children (stored before or
//! after them), referrers hang off their subject (stored before or after it), refcounts
//! equal the number of distinct stored parents, and holds equal the names, containers
//! and lease entries naming a digest. Tags normalise the way Docker does; `rmi` refuses
//! to take the last name of an image a container uses; all of it survives a reopen. A
//! property test checks both invariants against a model after every step, and the last
//! tests drive the same through the `store` binary.
//!
//! Manifests are written by hand as JSON over blobs the test stores, so every digest and
//! size in them is real.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use layerstore::image::{ImageError, media};
use layerstore::{Digest, Error, Kind, ManifestPut, Options, PutOptions, Store};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::common;

// ---------------------------------------------------------------------------------------
// Building manifests and indexes by hand.
// ---------------------------------------------------------------------------------------

/// A descriptor of `data` with `media_type`.
fn desc(media_type: &str, data: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": common::sha256(data).to_string(),
        "size": data.len(),
    })
}

/// `d` with a platform (`os/arch[/variant]`).
fn with_platform(mut d: Value, os: &str, arch: &str, variant: Option<&str>) -> Value {
    let mut p = json!({ "os": os, "architecture": arch });
    if let Some(v) = variant {
        p["variant"] = json!(v);
    }
    d["platform"] = p;
    d
}

/// A manifest with `config` and `layers` (and `mediaType` only when given: umoci omits it).
fn manifest_json(media_type: Option<&str>, config: Value, layers: Vec<Value>) -> Value {
    let mut m = json!({ "schemaVersion": 2 });
    m["config"] = config;
    m["layers"] = Value::Array(layers);
    if let Some(mt) = media_type {
        m["mediaType"] = json!(mt);
    }
    m
}

/// An index (or Docker manifest list) of `manifests`.
fn index_json(media_type: Option<&str>, manifests: Vec<Value>) -> Value {
    let mut m = json!({ "schemaVersion": 2 });
    m["manifests"] = Value::Array(manifests);
    if let Some(mt) = media_type {
        m["mediaType"] = json!(mt);
    }
    m
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("serialize JSON")
}

/// An image config naming `layers` as its diff ids, distinct per `seed`.
fn config_bytes(seed: u64, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| common::sha256(l).to_string())
        .collect();
    bytes(&json!({
        "created": format!("2024-01-{:02}T00:00:00Z", seed % 28 + 1),
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": [format!("SEED={seed}")] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
}

/// An image: config, layers (in manifest order, possibly repeated) and its manifest.
struct TestImage {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

impl TestImage {
    /// An OCI image over `layers`.
    fn oci(seed: u64, layers: Vec<Vec<u8>>) -> TestImage {
        let config = config_bytes(seed, &layers);
        let m = manifest_json(
            Some(media::OCI_MANIFEST),
            desc(media::OCI_CONFIG, &config),
            layers
                .iter()
                .map(|l| desc(media::OCI_LAYER_GZIP, l))
                .collect(),
        );
        TestImage {
            manifest: bytes(&m),
            config,
            layers,
        }
    }

    /// An OCI image with `n` fresh layers of `len` bytes.
    fn fresh(seed: u64, n: u64, len: usize) -> TestImage {
        TestImage::oci(
            seed,
            (0..n)
                .map(|i| common::blob(seed * 1000 + i, len + i as usize))
                .collect(),
        )
    }

    fn digest(&self) -> Digest {
        common::sha256(&self.manifest)
    }

    fn config_digest(&self) -> Digest {
        common::sha256(&self.config)
    }

    fn layer_digest(&self, i: usize) -> Digest {
        common::sha256(&self.layers[i])
    }

    /// The distinct children: config and layers.
    fn children(&self) -> BTreeSet<Digest> {
        self.blobs().map(common::sha256).collect()
    }

    /// Config then layers (repeats included).
    fn blobs(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.config.as_slice()).chain(self.layers.iter().map(Vec::as_slice))
    }

    /// Bytes of the manifest and its distinct children.
    fn bytes_reached(&self) -> u64 {
        let mut seen = BTreeMap::new();
        for b in self.blobs() {
            seen.insert(common::sha256(b), b.len() as u64);
        }
        self.manifest.len() as u64 + seen.values().sum::<u64>()
    }

    fn put_blobs(&self, store: &Store) {
        for b in self.blobs() {
            store.put(b).expect("put child");
        }
    }

    /// Stores the children, then the manifest.
    fn put_all(&self, store: &Store) -> ManifestPut {
        self.put_blobs(store);
        let put = store
            .put_manifest(&self.manifest, PutOptions::default())
            .expect("put manifest");
        assert!(put.absent_children.is_empty(), "{put:?}");
        put
    }
}

fn set(v: impl IntoIterator<Item = Digest>) -> BTreeSet<Digest> {
    v.into_iter().collect()
}

/// `children(d)` as a set, checking it has no repeats.
fn children_of(store: &Store, d: &Digest) -> BTreeSet<Digest> {
    let v = store.children(d).expect("children");
    let s = set(v.iter().copied());
    assert_eq!(s.len(), v.len(), "children of {d} repeat: {v:?}");
    s
}

/// `referrers(d)` as a set, checking it has no repeats.
fn referrers_of(store: &Store, d: &Digest) -> BTreeSet<Digest> {
    let v = store.referrers(d).expect("referrers");
    let s = set(v.iter().copied());
    assert_eq!(s.len(), v.len(), "referrers of {d} repeat: {v:?}");
    s
}

fn counts(store: &Store, d: &Digest) -> (u64, u64) {
    store.counts(d).expect("counts")
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Edges and refcounts.
// ---------------------------------------------------------------------------------------

#[test]
fn children_may_arrive_before_or_after_their_manifest() {
    let dir = common::tempdir();
    let store = common::open(dir.path());

    // Children first.
    let a = TestImage::fresh(1, 2, 300);
    a.put_blobs(&store);
    let put = store
        .put_manifest(&a.manifest, PutOptions::default())
        .expect("put manifest");
    assert_eq!(put.descriptor.digest, a.digest());
    assert_eq!(put.descriptor.size, a.manifest.len() as u64);
    assert_eq!(put.kind, Kind::Manifest);
    assert!(put.absent_children.is_empty(), "{put:?}");
    assert_eq!(
        store.stat(&a.digest()).expect("stat").expect("stored").kind,
        Kind::Manifest
    );
    assert_eq!(children_of(&store, &a.digest()), a.children());
    assert_eq!(a.children().len(), 3);
    for c in a.children() {
        assert_eq!(counts(&store, &c), (1, 0), "child {c}");
    }
    assert_eq!(
        counts(&store, &a.digest()),
        (0, 0),
        "nothing names the manifest"
    );

    // Manifest first: every child is reported absent, and the edges exist already.
    let b = TestImage::fresh(2, 2, 100);
    let put = store
        .put_manifest(&b.manifest, PutOptions::default())
        .expect("put manifest before children");
    assert_eq!(put.kind, Kind::Manifest);
    assert_eq!(put.absent_children.len(), 3, "{put:?}");
    assert_eq!(set(put.absent_children), b.children());
    assert_eq!(children_of(&store, &b.digest()), b.children());
    for c in b.children() {
        assert!(!store.contains(&c).expect("contains"), "{c} not stored yet");
        assert_eq!(counts(&store, &c), (1, 0), "absent child {c} is counted");
    }
    let details = store.inspect(&b.digest().to_string()).expect("inspect");
    assert_eq!(set(details.missing), b.children());
    assert!(details.config_info.is_none());

    // One child arrives: its count does not change, the others stay absent.
    store.put(&b.layers[0]).expect("put layer");
    assert_eq!(counts(&store, &b.layer_digest(0)), (1, 0));
    let again = store
        .put_manifest(&b.manifest, PutOptions::default())
        .expect("put manifest again");
    assert_eq!(
        set(again.absent_children),
        set([b.config_digest(), b.layer_digest(1)])
    );

    // The rest arrive; putting the manifest again adds no edge.
    b.put_blobs(&store);
    let again = store
        .put_manifest(&b.manifest, PutOptions::default())
        .expect("put manifest a third time");
    assert!(again.absent_children.is_empty(), "{again:?}");
    assert_eq!(children_of(&store, &b.digest()), b.children());
    for c in b.children() {
        assert_eq!(counts(&store, &c), (1, 0), "child {c}");
    }
    let details = store.inspect(&b.digest().to_string()).expect("inspect");
    assert!(details.missing.is_empty(), "{:?}", details.missing);
    let info = details.config_info.expect("config parsed");
    assert_eq!(info.os.as_deref(), Some("linux"));
    assert_eq!(info.diff_ids.len(), 2);
}

#[test]
fn shared_layers_count_each_manifest_once() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let base = common::blob(100, 1000);
    let mid = common::blob(101, 700);
    let mut images: Vec<TestImage> = (0..3)
        .map(|i| TestImage::oci(200 + i, vec![base.clone(), common::blob(300 + i, 50)]))
        .collect();
    images.push(TestImage::oci(210, vec![base.clone(), mid.clone()]));
    // `mid` listed twice: one edge.
    images.push(TestImage::oci(
        211,
        vec![mid.clone(), base.clone(), mid.clone()],
    ));
    let base_d = common::sha256(&base);
    let mid_d = common::sha256(&mid);

    // Interleave: two manifests before any blob, then all blobs, then the rest.
    for img in &images[..2] {
        store
            .put_manifest(&img.manifest, PutOptions::default())
            .expect("put manifest");
    }
    assert_eq!(counts(&store, &base_d), (2, 0));
    for img in &images {
        img.put_blobs(&store);
    }
    assert_eq!(
        counts(&store, &base_d),
        (2, 0),
        "storing a child adds no count"
    );
    for img in &images[2..] {
        store
            .put_manifest(&img.manifest, PutOptions::default())
            .expect("put manifest");
    }
    assert_eq!(counts(&store, &base_d), (5, 0));
    assert_eq!(counts(&store, &mid_d), (2, 0));
    let twice = &images[4];
    assert_eq!(twice.children().len(), 3);
    assert_eq!(children_of(&store, &twice.digest()), twice.children());
    for (i, img) in images.iter().enumerate().take(3) {
        assert_eq!(counts(&store, &img.layer_digest(1)), (1, 0), "image {i}");
        assert_eq!(counts(&store, &img.config_digest()), (1, 0), "image {i}");
    }

    // Storing the manifests again changes nothing.
    for img in &images {
        let put = store
            .put_manifest(&img.manifest, PutOptions::default())
            .expect("put again");
        assert!(put.absent_children.is_empty());
    }
    assert_eq!(counts(&store, &base_d), (5, 0));
    assert_eq!(counts(&store, &mid_d), (2, 0));
}

#[test]
fn an_index_counts_once_for_each_of_its_manifests() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let amd = TestImage::fresh(1, 2, 200);
    let arm = TestImage::fresh(2, 1, 300);
    amd.put_all(&store);
    arm.put_all(&store);

    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![
            with_platform(
                desc(media::OCI_MANIFEST, &amd.manifest),
                "linux",
                "amd64",
                None,
            ),
            with_platform(
                desc(media::OCI_MANIFEST, &arm.manifest),
                "linux",
                "arm64",
                Some("v8"),
            ),
        ],
    ));
    let put = store
        .put_manifest(&idx, PutOptions::default())
        .expect("put index");
    let idx_d = common::sha256(&idx);
    assert_eq!(put.kind, Kind::Index);
    assert_eq!(put.descriptor.digest, idx_d);
    assert!(put.absent_children.is_empty(), "{put:?}");
    assert_eq!(
        store.stat(&idx_d).expect("stat").expect("stored").kind,
        Kind::Index
    );
    assert_eq!(
        children_of(&store, &idx_d),
        set([amd.digest(), arm.digest()])
    );
    assert_eq!(counts(&store, &amd.digest()), (1, 0));
    assert_eq!(counts(&store, &arm.digest()), (1, 0));
    // The index does not count for its manifests' children.
    assert_eq!(counts(&store, &amd.config_digest()), (1, 0));
    assert_eq!(counts(&store, &amd.layer_digest(0)), (1, 0));

    // A Docker manifest list of the same manifests is another parent.
    let list = bytes(&index_json(
        Some(media::DOCKER_LIST),
        vec![
            with_platform(
                desc(media::DOCKER_MANIFEST, &amd.manifest),
                "linux",
                "amd64",
                None,
            ),
            with_platform(
                desc(media::DOCKER_MANIFEST, &arm.manifest),
                "linux",
                "arm64",
                Some("v8"),
            ),
        ],
    ));
    let put = store
        .put_manifest(&list, PutOptions::default())
        .expect("put list");
    assert_eq!(put.kind, Kind::Index);
    assert_eq!(counts(&store, &amd.digest()), (2, 0));
    assert_eq!(counts(&store, &arm.digest()), (2, 0));

    // An index naming one manifest twice (two platforms) is one edge.
    let twice = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![
            with_platform(
                desc(media::OCI_MANIFEST, &amd.manifest),
                "linux",
                "amd64",
                None,
            ),
            with_platform(
                desc(media::OCI_MANIFEST, &amd.manifest),
                "linux",
                "386",
                None,
            ),
        ],
    ));
    store
        .put_manifest(&twice, PutOptions::default())
        .expect("put index naming one manifest twice");
    assert_eq!(
        children_of(&store, &common::sha256(&twice)),
        set([amd.digest()])
    );
    assert_eq!(counts(&store, &amd.digest()), (3, 0));
    assert_eq!(counts(&store, &arm.digest()), (2, 0));

    // An index stored before its manifest.
    let late = TestImage::fresh(3, 1, 10);
    let early = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![desc(media::OCI_MANIFEST, &late.manifest)],
    ));
    let put = store
        .put_manifest(&early, PutOptions::default())
        .expect("put index first");
    assert_eq!(put.absent_children, vec![late.digest()]);
    assert_eq!(counts(&store, &late.digest()), (1, 0));
    late.put_all(&store);
    assert_eq!(counts(&store, &late.digest()), (1, 0));
    assert_eq!(counts(&store, &late.config_digest()), (1, 0));

    // inspect shows the platforms.
    let details = store.inspect(&idx_d.to_string()).expect("inspect index");
    assert_eq!(details.kind, Kind::Index);
    assert_eq!(details.media_type.as_deref(), Some(media::OCI_INDEX));
    let platforms: Vec<(Digest, Option<String>)> = details
        .platforms
        .iter()
        .map(|c| (c.digest, c.platform.clone()))
        .collect();
    assert_eq!(
        platforms,
        vec![
            (amd.digest(), Some("linux/amd64".to_owned())),
            (arm.digest(), Some("linux/arm64/v8".to_owned())),
        ]
    );
    assert!(details.layers.is_empty() && details.config.is_none());
}

#[test]
fn docker_and_umoci_manifests_parse_and_schema1_is_refused() {
    let dir = common::tempdir();
    let store = common::open(dir.path());

    // umoci: no mediaType anywhere at the top level.
    let layer = common::blob(1, 400);
    let config = config_bytes(1, std::slice::from_ref(&layer));
    store.put(&layer).expect("put layer");
    store.put(&config).expect("put config");
    let umoci = bytes(&manifest_json(
        None,
        desc(media::OCI_CONFIG, &config),
        vec![desc(media::OCI_LAYER, &layer)],
    ));
    let put = store
        .put_manifest(&umoci, PutOptions::default())
        .expect("put umoci manifest");
    assert_eq!(put.kind, Kind::Manifest);
    assert!(put.absent_children.is_empty());
    assert_eq!(
        children_of(&store, &common::sha256(&umoci)),
        set([common::sha256(&layer), common::sha256(&config)])
    );
    assert_eq!(
        store
            .inspect(&common::sha256(&umoci).to_string())
            .expect("inspect")
            .media_type,
        None
    );

    // Docker schema2 manifest and manifest list.
    let dlayer = common::blob(2, 500);
    let dconfig = config_bytes(2, std::slice::from_ref(&dlayer));
    let docker = bytes(&manifest_json(
        Some(media::DOCKER_MANIFEST),
        desc(media::DOCKER_CONFIG, &dconfig),
        vec![
            desc(media::DOCKER_LAYER_GZIP, &dlayer),
            desc(media::DOCKER_LAYER_GZIP, &layer),
        ],
    ));
    let put = store
        .put_manifest(&docker, PutOptions::default())
        .expect("put docker manifest");
    assert_eq!(put.kind, Kind::Manifest);
    assert_eq!(
        set(put.absent_children),
        set([common::sha256(&dlayer), common::sha256(&dconfig)])
    );
    assert_eq!(counts(&store, &common::sha256(&layer)), (2, 0));
    assert_eq!(counts(&store, &common::sha256(&dlayer)), (1, 0));
    let list = bytes(&index_json(
        Some(media::DOCKER_LIST),
        vec![with_platform(
            desc(media::DOCKER_MANIFEST, &docker),
            "linux",
            "amd64",
            None,
        )],
    ));
    let put = store
        .put_manifest(&list, PutOptions::default())
        .expect("put docker list");
    assert_eq!(put.kind, Kind::Index);
    assert_eq!(counts(&store, &common::sha256(&docker)), (1, 0));
    // An index without mediaType, recognised by shape.
    let bare_index = bytes(&index_json(None, vec![desc(media::OCI_MANIFEST, &umoci)]));
    let put = store
        .put_manifest(&bare_index, PutOptions::default())
        .expect("put index without mediaType");
    assert_eq!(put.kind, Kind::Index);
    assert_eq!(counts(&store, &common::sha256(&umoci)), (1, 0));

    // Refused: schema 1 (plain and signed), garbage, wrong shape, bad child digest. None of
    // them stores anything or changes a count.
    let before = store.info().expect("info").blobs;
    let layer_counts = counts(&store, &common::sha256(&layer));
    let schema1 = bytes(&json!({
        "schemaVersion": 1,
        "name": "library/old",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [{ "blobSum": common::sha256(&layer).to_string() }],
        "history": [{ "v1Compatibility": "{}" }],
    }));
    let signed = bytes(&json!({
        "schemaVersion": 1,
        "mediaType": media::DOCKER_SCHEMA1_SIGNED,
        "name": "library/old",
        "tag": "latest",
        "fsLayers": [{ "blobSum": common::sha256(&layer).to_string() }],
        "signatures": [{ "header": {}, "signature": "x", "protected": "y" }],
    }));
    for s1 in [&schema1, &signed] {
        let r = store.put_manifest(s1, PutOptions::default());
        assert!(
            matches!(r, Err(Error::Image(ImageError::Schema1))),
            "schema 1 must be refused: {r:?}"
        );
        assert!(!store.contains(&common::sha256(s1)).expect("contains"));
    }
    let bad_digest = String::from_utf8(umoci.clone())
        .expect("utf-8")
        .replace(&common::sha256(&layer).to_string(), "sha256:XYZ")
        .into_bytes();
    let garbage: [&[u8]; 4] = [
        b"{ not json",
        br#"{"schemaVersion":2}"#,
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":42,"layers":[]}"#,
        &bad_digest,
    ];
    for g in garbage {
        let r = store.put_manifest(g, PutOptions::default());
        assert!(
            matches!(r, Err(Error::Image(_))),
            "malformed manifest {:?} must be refused with Error::Image: {r:?}",
            String::from_utf8_lossy(g)
        );
        assert!(!store.contains(&common::sha256(g)).expect("contains"));
    }
    assert_eq!(store.info().expect("info").blobs, before, "nothing stored");
    assert_eq!(counts(&store, &common::sha256(&layer)), layer_counts);
}

#[test]
fn require_children_refuses_and_stores_nothing() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let img = TestImage::fresh(7, 2, 100);
    // Only the config and the first layer are stored.
    store.put(&img.config).expect("put config");
    store.put(&img.layers[0]).expect("put layer");
    let before = store.info().expect("info");

    let r = store.put_manifest(&img.manifest, PutOptions::default().require_children(true));
    match r {
        Err(Error::MissingChildren { parent, missing }) => {
            assert_eq!(parent, img.digest());
            assert_eq!(missing, vec![img.layer_digest(1)]);
        }
        other => panic!("expected MissingChildren, got {other:?}"),
    }
    assert!(!store.contains(&img.digest()).expect("contains"));
    assert_eq!(store.info().expect("info").blobs, before.blobs);
    assert_eq!(store.info().expect("info").bytes, before.bytes);
    for c in img.children() {
        assert_eq!(counts(&store, &c), (0, 0), "no edge to {c}");
    }
    assert!(children_of(&store, &img.digest()).is_empty());

    // Once every child is stored, it is accepted.
    store.put(&img.layers[1]).expect("put layer");
    let put = store
        .put_manifest(&img.manifest, PutOptions::default().require_children(true))
        .expect("accepted with every child stored");
    assert!(put.absent_children.is_empty());
    for c in img.children() {
        assert_eq!(counts(&store, &c), (1, 0), "child {c}");
    }

    // An index is checked the same way.
    let other = TestImage::fresh(8, 1, 10);
    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![
            desc(media::OCI_MANIFEST, &img.manifest),
            desc(media::OCI_MANIFEST, &other.manifest),
        ],
    ));
    match store.put_manifest(&idx, PutOptions::default().require_children(true)) {
        Err(Error::MissingChildren { parent, missing }) => {
            assert_eq!(parent, common::sha256(&idx));
            assert_eq!(missing, vec![other.digest()]);
        }
        other => panic!("expected MissingChildren, got {other:?}"),
    }
    assert!(!store.contains(&common::sha256(&idx)).expect("contains"));
    assert_eq!(counts(&store, &img.digest()), (0, 0));
}

/// A referrer (an SBOM or signature with `subject`) of `subject_manifest`.
fn referrer(subject_manifest: &[u8], payload: &[u8], artifact: &str) -> Vec<u8> {
    let mut m = manifest_json(
        Some(media::OCI_MANIFEST),
        desc("application/vnd.oci.empty.v1+json", b"{}"),
        vec![desc(artifact, payload)],
    );
    m["artifactType"] = json!(artifact);
    m["subject"] = desc(media::OCI_MANIFEST, subject_manifest);
    bytes(&m)
}

#[test]
fn referrers_hang_off_their_subject_whenever_they_arrive() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    store.put(b"{}").expect("put empty config");
    let empty = common::sha256(b"{}");

    // After the subject.
    let subject = TestImage::fresh(1, 1, 100);
    subject.put_all(&store);
    let sbom = common::blob(50, 90);
    store.put(&sbom).expect("put sbom");
    let r1 = referrer(&subject.manifest, &sbom, "application/spdx+json");
    let r1_d = common::sha256(&r1);
    let put = store
        .put_manifest(&r1, PutOptions::default())
        .expect("put referrer");
    assert_eq!(put.kind, Kind::Manifest);
    assert!(
        put.absent_children.is_empty(),
        "the subject is not a child: {put:?}"
    );
    assert_eq!(referrers_of(&store, &subject.digest()), set([r1_d]));
    assert_eq!(
        children_of(&store, &subject.digest()),
        subject.children(),
        "a referrer is not one of its subject's declared children"
    );
    assert!(referrers_of(&store, &r1_d).is_empty());
    assert_eq!(
        counts(&store, &r1_d),
        (1, 0),
        "the subject holds its referrer"
    );
    assert_eq!(
        counts(&store, &subject.digest()),
        (0, 0),
        "a referrer does not hold its subject"
    );
    assert_eq!(
        children_of(&store, &r1_d),
        set([empty, common::sha256(&sbom)])
    );

    // Before the subject: pending until the subject arrives.
    let later = TestImage::fresh(2, 2, 50);
    let sig = common::blob(51, 64);
    let r2 = referrer(
        &later.manifest,
        &sig,
        "application/vnd.dev.cosign.artifact.sig.v1+json",
    );
    let r2_d = common::sha256(&r2);
    store
        .put_manifest(&r2, PutOptions::default())
        .expect("put referrer before subject");
    assert_eq!(counts(&store, &r2_d), (0, 0), "its subject is not stored");
    assert!(children_of(&store, &later.digest()).is_empty());
    assert!(referrers_of(&store, &later.digest()).is_empty());
    assert_eq!(
        counts(&store, &empty),
        (2, 0),
        "both referrers name the empty config"
    );
    later.put_blobs(&store);
    assert_eq!(
        counts(&store, &r2_d),
        (0, 0),
        "the subject's children are not the subject"
    );
    store
        .put_manifest(&later.manifest, PutOptions::default())
        .expect("put subject");
    assert_eq!(children_of(&store, &later.digest()), later.children());
    let mut want = set([r2_d]);
    assert_eq!(referrers_of(&store, &later.digest()), want);
    assert_eq!(counts(&store, &r2_d), (1, 0));

    // Storing either again adds nothing.
    store
        .put_manifest(&r2, PutOptions::default())
        .expect("put referrer again");
    store
        .put_manifest(&later.manifest, PutOptions::default())
        .expect("put subject again");
    assert_eq!(counts(&store, &r2_d), (1, 0));
    assert_eq!(referrers_of(&store, &later.digest()), want);
    assert_eq!(children_of(&store, &later.digest()), later.children());

    // A second referrer of the same subject, stored after it.
    let r3 = referrer(
        &later.manifest,
        &common::blob(52, 10),
        "application/example",
    );
    store
        .put_manifest(&r3, PutOptions::default())
        .expect("put second referrer");
    want.insert(common::sha256(&r3));
    assert_eq!(referrers_of(&store, &later.digest()), want);
    assert_eq!(counts(&store, &common::sha256(&r3)), (1, 0));
    assert_eq!(counts(&store, &r2_d), (1, 0));
}

/// Bytes first stored as a plain blob (as a registry client may upload them) and then
/// declared a manifest with `put_manifest` must become a manifest with its edges: the
/// put says `Kind::Manifest`, so the store must treat it as one (tag it, count its
/// children).
#[test]
fn a_manifest_first_stored_as_a_plain_blob_gains_its_edges() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let img = TestImage::fresh(1, 2, 100);
    img.put_blobs(&store);
    store
        .put(&img.manifest)
        .expect("put manifest bytes as a blob");
    let put = store
        .put_manifest(&img.manifest, PutOptions::default())
        .expect("put manifest");
    assert_eq!(put.kind, Kind::Manifest);
    assert_eq!(
        store
            .stat(&img.digest())
            .expect("stat")
            .expect("stored")
            .kind,
        Kind::Manifest,
        "put_manifest reported a manifest, the index must record one"
    );
    assert_eq!(children_of(&store, &img.digest()), img.children());
    for c in img.children() {
        assert_eq!(counts(&store, &c), (1, 0), "child {c}");
    }
    store
        .tag("late:1", &img.digest())
        .expect("a manifest put with put_manifest can be tagged");
}

// ---------------------------------------------------------------------------------------
// Property test: refcounts and holds against a model.
// ---------------------------------------------------------------------------------------

/// The shape of a random image graph: blob sizes; manifests as (config, layers, subject)
/// indices (taken modulo what exists); indexes as manifest indices.
#[derive(Clone, Debug)]
struct Plan {
    blobs: Vec<usize>,
    manifests: Vec<(usize, Vec<usize>, Option<usize>)>,
    indexes: Vec<Vec<usize>>,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(0usize..200, 1..6),
        prop::collection::vec(
            (
                0usize..16,
                prop::collection::vec(0usize..16, 0..4),
                prop::option::of(0usize..16),
            ),
            1..5,
        ),
        prop::collection::vec(prop::collection::vec(0usize..16, 1..4), 0..3),
    )
        .prop_map(|(blobs, manifests, indexes)| Plan {
            blobs,
            manifests,
            indexes,
        })
}

/// One random operation; indices are taken modulo what exists at that point.
#[derive(Clone, Debug)]
enum Step {
    Put(usize),
    PutLeased(usize, usize),
    Tag(usize, usize),
    Untag(usize, bool),
    RmiDigest(usize, bool),
    Create(usize, usize),
    RemoveContainer(usize),
    LeaseCreate(bool),
    LeaseAdd(usize, Vec<usize>),
    LeaseRemove(usize),
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0usize..64).prop_map(Step::Put),
        2 => (0usize..64, 0usize..8).prop_map(|(i, l)| Step::PutLeased(i, l)),
        5 => (0usize..8, 0usize..64).prop_map(|(n, t)| Step::Tag(n, t)),
        3 => (0usize..8, any::<bool>()).prop_map(|(n, f)| Step::Untag(n, f)),
        1 => (0usize..64, any::<bool>()).prop_map(|(t, f)| Step::RmiDigest(t, f)),
        3 => (0usize..64, 0usize..3).prop_map(|(t, n)| Step::Create(t, n)),
        2 => (0usize..8).prop_map(Step::RemoveContainer),
        1 => any::<bool>().prop_map(Step::LeaseCreate),
        2 => (0usize..8, prop::collection::vec(0usize..64, 0..4))
            .prop_map(|(l, ds)| Step::LeaseAdd(l, ds)),
        1 => (0usize..8).prop_map(Step::LeaseRemove),
        1 => Just(Step::Reopen),
    ]
}

/// Names the test tags with, and their canonical forms.
const NAMES: [(&str, &str); 4] = [
    ("app", "docker.io/library/app:latest"),
    ("app:v2", "docker.io/library/app:v2"),
    ("quay.io/team/app:1", "quay.io/team/app:1"),
    ("localhost:5000/x/y:z", "localhost:5000/x/y:z"),
];

/// One blob, manifest or index of the universe.
struct Item {
    bytes: Vec<u8>,
    digest: Digest,
    kind: Kind,
    children: BTreeSet<Digest>,
    subject: Option<Digest>,
}

fn universe(plan: &Plan) -> Vec<Item> {
    let mut items = Vec::new();
    let blobs: Vec<Vec<u8>> = plan
        .blobs
        .iter()
        .enumerate()
        .map(|(i, &n)| common::blob(i as u64, n))
        .collect();
    for b in &blobs {
        items.push(Item {
            digest: common::sha256(b),
            bytes: b.clone(),
            kind: Kind::Other,
            children: BTreeSet::new(),
            subject: None,
        });
    }
    let mut manifests: Vec<Vec<u8>> = Vec::new();
    for (i, (c, ls, s)) in plan.manifests.iter().enumerate() {
        let config = &blobs[c % blobs.len()];
        let layers: Vec<&Vec<u8>> = ls.iter().map(|l| &blobs[l % blobs.len()]).collect();
        let mut m = manifest_json(
            Some(media::OCI_MANIFEST),
            desc(media::OCI_CONFIG, config),
            layers
                .iter()
                .map(|l| desc(media::OCI_LAYER_GZIP, l))
                .collect(),
        );
        let subject = s.filter(|_| i > 0).map(|s| manifests[s % i].clone());
        if let Some(sb) = &subject {
            m["subject"] = desc(media::OCI_MANIFEST, sb);
        }
        let b = bytes(&m);
        items.push(Item {
            digest: common::sha256(&b),
            kind: Kind::Manifest,
            children: std::iter::once(config)
                .chain(layers.iter().copied())
                .map(|x| common::sha256(x))
                .collect(),
            subject: subject.map(|sb| common::sha256(&sb)),
            bytes: b.clone(),
        });
        manifests.push(b);
    }
    for entries in &plan.indexes {
        let ms: Vec<&Vec<u8>> = entries
            .iter()
            .map(|e| &manifests[e % manifests.len()])
            .collect();
        let b = bytes(&index_json(
            Some(media::OCI_INDEX),
            ms.iter().map(|m| desc(media::OCI_MANIFEST, m)).collect(),
        ));
        items.push(Item {
            digest: common::sha256(&b),
            kind: Kind::Index,
            children: ms.iter().map(|m| common::sha256(m)).collect(),
            subject: None,
            bytes: b,
        });
    }
    items
}

/// A set of (parent, child) edges.
type Edges = BTreeSet<(Digest, Digest)>;

/// What the store must hold.
#[derive(Default)]
struct Model {
    stored: BTreeSet<Digest>,
    names: BTreeMap<String, Digest>,
    /// (id, name, image)
    containers: Vec<(String, String, Digest)>,
    /// (id, resources), in creation order.
    leases: Vec<(String, BTreeSet<Digest>)>,
}

impl Model {
    /// Every edge: parent -> child for stored manifests and indexes (`children`), and
    /// subject -> referrer when both are stored (`referrers`).
    fn edges(&self, items: &[Item]) -> (Edges, Edges) {
        let (mut children, mut referrers) = (BTreeSet::new(), BTreeSet::new());
        for it in items.iter().filter(|it| self.stored.contains(&it.digest)) {
            for c in &it.children {
                children.insert((it.digest, *c));
            }
            if let Some(s) = it.subject.filter(|s| self.stored.contains(s)) {
                referrers.insert((s, it.digest));
            }
        }
        (children, referrers)
    }

    fn holds(&self, d: &Digest) -> u64 {
        let names = self.names.values().filter(|t| *t == d).count();
        let containers = self.containers.iter().filter(|c| c.2 == *d).count();
        let leases = self.leases.iter().filter(|l| l.1.contains(d)).count();
        (names + containers + leases) as u64
    }

    fn used_by_container(&self, d: &Digest) -> bool {
        self.containers.iter().any(|c| c.2 == *d)
    }

    fn check(&self, store: &Store, items: &[Item], absent: Digest, ctx: &str) {
        let (children, referrers) = self.edges(items);
        let edges = || children.iter().chain(&referrers);
        let universe: BTreeSet<Digest> = items.iter().map(|i| i.digest).chain([absent]).collect();
        for d in &universe {
            let refcount = edges().filter(|(_, c)| c == d).count() as u64;
            assert_eq!(
                counts(store, d),
                (refcount, self.holds(d)),
                "{ctx}: (refcount, holds) of {d}"
            );
            let out = |e: &Edges| -> BTreeSet<Digest> {
                e.iter().filter(|(p, _)| p == d).map(|(_, c)| *c).collect()
            };
            assert_eq!(
                children_of(store, d),
                out(&children),
                "{ctx}: children of {d}"
            );
            assert_eq!(
                referrers_of(store, d),
                out(&referrers),
                "{ctx}: referrers of {d}"
            );
            assert_eq!(
                store.contains(d).expect("contains"),
                self.stored.contains(d),
                "{ctx}: stored {d}"
            );
        }
        let names: Vec<(String, Digest)> =
            self.names.iter().map(|(n, d)| (n.clone(), *d)).collect();
        assert_eq!(store.names().expect("names"), names, "{ctx}: names");
        let containers: BTreeSet<(String, String, Digest)> = store
            .containers()
            .expect("containers")
            .into_iter()
            .map(|c| (c.id, c.name, c.image))
            .collect();
        assert_eq!(
            containers,
            self.containers.iter().cloned().collect(),
            "{ctx}: containers"
        );
        let leases: BTreeMap<String, BTreeSet<Digest>> = store
            .leases()
            .expect("leases")
            .into_iter()
            .map(|l| (l.record.id, set(l.resources)))
            .collect();
        assert_eq!(
            leases,
            self.leases.iter().cloned().collect(),
            "{ctx}: leases"
        );
    }
}

/// The target of a tag, rmi or container: mostly a manifest or index, now and then any
/// item (a blob, to be refused).
fn target(items: &[Item], t: usize) -> &Item {
    let images: Vec<&Item> = items.iter().filter(|i| i.kind != Kind::Other).collect();
    if t.is_multiple_of(5) {
        &items[(t / 5) % items.len()]
    } else {
        images[t % images.len()]
    }
}

/// Applies one step to the store and the model, checking the store's answer.
fn apply(store: &Store, items: &[Item], absent: Digest, m: &mut Model, step: &Step, ctx: &str) {
    let lease_id = |m: &Model, k: usize| -> Option<String> {
        (!m.leases.is_empty()).then(|| m.leases[k % m.leases.len()].0.clone())
    };
    match step {
        Step::Put(i) | Step::PutLeased(i, _) => {
            let it = &items[i % items.len()];
            let lease = match step {
                Step::PutLeased(_, k) => {
                    Some(lease_id(m, *k).unwrap_or_else(|| "no-such-lease".to_owned()))
                }
                _ => None,
            };
            let known_lease = lease
                .as_ref()
                .is_none_or(|l| m.leases.iter().any(|x| &x.0 == l));
            let mut opts = PutOptions::default();
            if let Some(l) = &lease {
                opts = opts.lease(l.clone());
            }
            let absent_children: BTreeSet<Digest> = it
                .children
                .iter()
                .filter(|c| !m.stored.contains(c))
                .copied()
                .collect();
            let r = if it.kind == Kind::Other {
                store.put_with(&it.bytes, opts).map(|d| {
                    assert_eq!(d.digest, it.digest, "{ctx}");
                })
            } else {
                store.put_manifest(&it.bytes, opts).map(|p| {
                    assert_eq!(p.descriptor.digest, it.digest, "{ctx}");
                    assert_eq!(p.kind, it.kind, "{ctx}");
                    assert_eq!(p.absent_children.len(), absent_children.len(), "{ctx}");
                    assert_eq!(set(p.absent_children), absent_children, "{ctx}");
                })
            };
            if known_lease {
                r.unwrap_or_else(|e| panic!("{ctx}: put failed: {e:?}"));
                m.stored.insert(it.digest);
                if let Some(l) = lease {
                    let entry = m.leases.iter_mut().find(|x| x.0 == l).expect("lease");
                    entry.1.insert(it.digest);
                }
            } else {
                assert!(
                    matches!(&r, Err(Error::LeaseNotFound(l)) if l == "no-such-lease"),
                    "{ctx}: {r:?}"
                );
            }
        }
        Step::Tag(n, t) => {
            let (name, canonical) = NAMES[n % NAMES.len()];
            let it = target(items, *t);
            let r = store.tag(name, &it.digest);
            if !m.stored.contains(&it.digest) {
                assert!(
                    matches!(&r, Err(Error::NotFound(d)) if *d == it.digest),
                    "{ctx}: {r:?}"
                );
            } else if it.kind == Kind::Other {
                assert!(
                    matches!(&r, Err(Error::NotAnImage(d)) if *d == it.digest),
                    "{ctx}: {r:?}"
                );
            } else {
                let r = r.unwrap_or_else(|e| panic!("{ctx}: tag failed: {e:?}"));
                assert_eq!(r.canonical(), canonical, "{ctx}");
                m.names.insert(canonical.to_owned(), it.digest);
            }
        }
        Step::Untag(n, force) => {
            let (name, canonical) = NAMES[n % NAMES.len()];
            let r = store.remove_image(name, *force);
            match m.names.get(canonical).copied() {
                None => assert!(matches!(&r, Err(Error::NameNotFound(_))), "{ctx}: {r:?}"),
                Some(d) => {
                    let others = m.names.values().filter(|t| **t == d).count() - 1;
                    if !force && others == 0 && m.used_by_container(&d) {
                        assert!(
                            matches!(&r, Err(Error::InUse { image, .. }) if *image == d),
                            "{ctx}: {r:?}"
                        );
                    } else {
                        let r = r.unwrap_or_else(|e| panic!("{ctx}: rmi failed: {e:?}"));
                        assert_eq!(r, vec![(canonical.to_owned(), d)], "{ctx}");
                        m.names.remove(canonical);
                    }
                }
            }
        }
        Step::RmiDigest(t, force) => {
            let d = target(items, *t).digest;
            let r = store.remove_image(&d.to_string(), *force);
            let named: Vec<(String, Digest)> = m
                .names
                .iter()
                .filter(|(_, t)| **t == d)
                .map(|(n, t)| (n.clone(), *t))
                .collect();
            if named.is_empty() {
                assert!(matches!(&r, Err(Error::NameNotFound(_))), "{ctx}: {r:?}");
            } else if !force && m.used_by_container(&d) {
                assert!(
                    matches!(&r, Err(Error::InUse { image, .. }) if *image == d),
                    "{ctx}: {r:?}"
                );
            } else {
                let mut r = r.unwrap_or_else(|e| panic!("{ctx}: rmi by digest failed: {e:?}"));
                r.sort();
                assert_eq!(r, named, "{ctx}");
                m.names.retain(|_, t| *t != d);
            }
        }
        Step::Create(t, n) => {
            let it = target(items, *t);
            let name = format!("c{n}");
            let r = store.container_create(&it.digest.to_string(), Some(&name));
            if !m.stored.contains(&it.digest) {
                assert!(
                    matches!(&r, Err(Error::NotFound(d)) if *d == it.digest),
                    "{ctx}: {r:?}"
                );
            } else if it.kind == Kind::Other {
                assert!(
                    matches!(&r, Err(Error::NotAnImage(d)) if *d == it.digest),
                    "{ctx}: {r:?}"
                );
            } else if m.containers.iter().any(|c| c.1 == name) {
                assert!(matches!(&r, Err(Error::Invalid(_))), "{ctx}: {r:?}");
            } else {
                let c = r.unwrap_or_else(|e| panic!("{ctx}: container create failed: {e:?}"));
                assert_eq!(
                    (c.image, c.name.as_str()),
                    (it.digest, name.as_str()),
                    "{ctx}"
                );
                m.containers.push((c.id, c.name, c.image));
            }
        }
        Step::RemoveContainer(k) => {
            if m.containers.is_empty() {
                let r = store.container_remove("nosuch");
                assert!(
                    matches!(&r, Err(Error::ContainerNotFound(_))),
                    "{ctx}: {r:?}"
                );
            } else {
                let (id, name, image) = m.containers.remove(k % m.containers.len());
                let key = match k % 3 {
                    0 => id.clone(),
                    1 => name.clone(),
                    _ => id[..10].to_owned(),
                };
                let c = store
                    .container_remove(&key)
                    .unwrap_or_else(|e| panic!("{ctx}: container rm {key} failed: {e:?}"));
                assert_eq!((c.id, c.name, c.image), (id, name, image), "{ctx}");
            }
        }
        Step::LeaseCreate(expire) => {
            let l = store
                .lease_create(expire.then(|| Duration::from_secs(3600)))
                .unwrap_or_else(|e| panic!("{ctx}: lease create failed: {e:?}"));
            m.leases.push((l.id, BTreeSet::new()));
        }
        Step::LeaseAdd(k, ds) => {
            let all: Vec<Digest> = items.iter().map(|i| i.digest).chain([absent]).collect();
            let ds: Vec<Digest> = ds.iter().map(|i| all[i % all.len()]).collect();
            match lease_id(m, *k) {
                None => {
                    let r = store.lease_add("no-such-lease", &ds);
                    assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{ctx}: {r:?}");
                }
                Some(l) => {
                    store
                        .lease_add(&l, &ds)
                        .unwrap_or_else(|e| panic!("{ctx}: lease add failed: {e:?}"));
                    let entry = m.leases.iter_mut().find(|x| x.0 == l).expect("lease");
                    entry.1.extend(ds);
                }
            }
        }
        Step::LeaseRemove(k) => match lease_id(m, *k) {
            None => {
                let r = store.lease_remove("no-such-lease");
                assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{ctx}: {r:?}");
            }
            Some(l) => {
                store
                    .lease_remove(&l)
                    .unwrap_or_else(|e| panic!("{ctx}: lease rm failed: {e:?}"));
                m.leases.retain(|x| x.0 != l);
            }
        },
        Step::Reopen => {}
    }
}

fn run_plan(plan: &Plan, steps: &[Step]) {
    let items = universe(plan);
    let absent = common::absent_digest();
    let dir = common::tempdir();
    let opts = Options::default().shards(2);
    let mut store = common::open_with(dir.path(), opts.clone());
    let mut model = Model::default();
    model.check(&store, &items, absent, "empty store");
    for (n, step) in steps.iter().enumerate() {
        let ctx = format!("step {n} {step:?}");
        if let Step::Reopen = step {
            drop(store);
            store = common::open_with(dir.path(), opts.clone());
        } else {
            apply(&store, &items, absent, &mut model, step, &ctx);
        }
        model.check(&store, &items, absent, &ctx);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        max_shrink_iters: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// After every step, `refcount[d]` equals the number of distinct stored parents naming
    /// `d` and `holds[d]` the names, containers and lease entries naming it.
    #[test]
    fn refcounts_and_holds_follow_the_model(
        plan in plan(),
        steps in prop::collection::vec(step(), 1..60),
    ) {
        run_plan(&plan, &steps);
    }
}

// ---------------------------------------------------------------------------------------
// Names.
// ---------------------------------------------------------------------------------------

#[test]
fn tags_normalise_like_docker_and_retagging_moves_the_hold() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let a = TestImage::fresh(1, 1, 100);
    let b = TestImage::fresh(2, 1, 100);
    a.put_all(&store);
    b.put_all(&store);

    let r = store.tag("nginx", &a.digest()).expect("tag");
    assert_eq!(r.canonical(), "docker.io/library/nginx:latest");
    assert_eq!(r.familiar(), "nginx:latest");
    assert_eq!(
        store.names().expect("names"),
        vec![("docker.io/library/nginx:latest".to_owned(), a.digest())]
    );
    for spelling in [
        "nginx",
        "nginx:latest",
        "library/nginx",
        "docker.io/nginx",
        "docker.io/library/nginx:latest",
        "index.docker.io/library/nginx",
    ] {
        assert_eq!(
            store.resolve(spelling).expect(spelling),
            a.digest(),
            "{spelling}"
        );
    }
    assert_eq!(counts(&store, &a.digest()), (0, 1));

    // Another spelling of the same name is the same name.
    store
        .tag("docker.io/library/nginx:latest", &a.digest())
        .expect("tag again");
    assert_eq!(store.names().expect("names").len(), 1);
    assert_eq!(counts(&store, &a.digest()), (0, 1));

    // More names, more holds.
    store.tag("nginx:1.25", &a.digest()).expect("tag");
    store
        .tag("registry.example.com:5000/team/nginx:1.25", &a.digest())
        .expect("tag");
    assert_eq!(counts(&store, &a.digest()), (0, 3));
    assert_eq!(
        store
            .resolve("registry.example.com:5000/team/nginx:1.25")
            .expect("resolve"),
        a.digest()
    );

    // Retag: the old target loses a hold, the new one gains it.
    store.tag("nginx", &b.digest()).expect("retag");
    assert_eq!(counts(&store, &a.digest()), (0, 2));
    assert_eq!(counts(&store, &b.digest()), (0, 1));
    assert_eq!(store.resolve("nginx").expect("resolve"), b.digest());
    assert_eq!(store.resolve("nginx:1.25").expect("resolve"), a.digest());
    // Names hold the image, not its children.
    for c in a.children().into_iter().chain(b.children()) {
        assert_eq!(counts(&store, &c), (1, 0), "child {c}");
    }

    // Refused: a layer, a config, a missing digest, a digest reference, a bad reference.
    let names = store.names().expect("names");
    let r = store.tag("layer:1", &a.layer_digest(0));
    assert!(
        matches!(&r, Err(Error::NotAnImage(d)) if *d == a.layer_digest(0)),
        "{r:?}"
    );
    let r = store.tag("config:1", &a.config_digest());
    assert!(
        matches!(&r, Err(Error::NotAnImage(d)) if *d == a.config_digest()),
        "{r:?}"
    );
    let absent = common::absent_digest();
    let r = store.tag("ghost", &absent);
    assert!(
        matches!(&r, Err(Error::NotFound(d)) if *d == absent),
        "{r:?}"
    );
    let r = store.tag(&format!("nginx@{}", a.digest()), &a.digest());
    assert!(matches!(&r, Err(Error::Invalid(_))), "{r:?}");
    let r = store.tag("Nginx", &a.digest());
    assert!(matches!(&r, Err(Error::Reference(_))), "{r:?}");
    assert_eq!(
        store.names().expect("names"),
        names,
        "refused tags change nothing"
    );
    assert_eq!(counts(&store, &a.layer_digest(0)), (1, 0));
    assert_eq!(counts(&store, &absent), (0, 0));

    // resolve: unknown names and absent digests.
    assert!(matches!(
        store.resolve("ghost"),
        Err(Error::NameNotFound(_))
    ));
    assert!(matches!(store.resolve(&absent.to_string()), Err(Error::NotFound(d)) if d == absent));
    assert_eq!(
        store
            .resolve(&a.layer_digest(0).to_string())
            .expect("a digest resolves"),
        a.layer_digest(0)
    );

    // An index can be tagged; so can a manifest whose children are absent.
    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![desc(media::OCI_MANIFEST, &a.manifest)],
    ));
    store
        .put_manifest(&idx, PutOptions::default())
        .expect("put index");
    store
        .tag("multi", &common::sha256(&idx))
        .expect("tag index");
    let hollow = TestImage::fresh(3, 1, 10);
    store
        .put_manifest(&hollow.manifest, PutOptions::default())
        .expect("put hollow");
    store.tag("hollow", &hollow.digest()).expect("tag hollow");
    assert_eq!(counts(&store, &common::sha256(&idx)), (0, 1));
    assert_eq!(counts(&store, &hollow.digest()), (0, 1));
}

#[test]
fn rmi_refuses_the_last_name_of_an_image_a_container_uses() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let a = TestImage::fresh(1, 2, 100);
    a.put_all(&store);
    store.tag("app:1", &a.digest()).expect("tag");
    let c = store
        .container_create("app:1", Some("web"))
        .expect("create container");
    assert_eq!(counts(&store, &a.digest()), (0, 2));

    let err = store
        .remove_image("app:1", false)
        .expect_err("the image is in use");
    match &err {
        Error::InUse {
            reference,
            image,
            containers,
        } => {
            assert!(
                ["app:1", "docker.io/library/app:1"].contains(&reference.as_str()),
                "{reference}"
            );
            assert_eq!(*image, a.digest());
            assert_eq!(containers, &vec![(c.id.clone(), "web".to_owned())]);
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    let msg = err.to_string();
    for part in [
        "conflict: unable to remove",
        "in use by container",
        &c.id[..12],
        "web",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
    assert_eq!(store.names().expect("names").len(), 1, "nothing removed");
    assert_eq!(counts(&store, &a.digest()), (0, 2));
    // By digest too.
    let r = store.remove_image(&a.digest().to_string(), false);
    assert!(matches!(&r, Err(Error::InUse { .. })), "{r:?}");
    assert_eq!(store.names().expect("names").len(), 1);

    // Forced: only the name goes; the container keeps the image and its content.
    let untagged = store.remove_image("app:1", true).expect("rmi --force");
    assert_eq!(
        untagged,
        vec![("docker.io/library/app:1".to_owned(), a.digest())]
    );
    assert!(store.names().expect("names").is_empty());
    assert!(matches!(
        store.resolve("app:1"),
        Err(Error::NameNotFound(_))
    ));
    assert_eq!(counts(&store, &a.digest()), (0, 1), "the container's hold");
    assert_eq!(
        &*store.get(&a.digest()).expect("get manifest"),
        a.manifest.as_slice()
    );
    for b in a.blobs() {
        assert_eq!(&*store.get(&common::sha256(b)).expect("get child"), b);
    }
    assert_eq!(children_of(&store, &a.digest()), a.children());
    for ch in a.children() {
        assert_eq!(counts(&store, &ch), (1, 0));
    }
    assert_eq!(store.containers().expect("containers"), vec![c.clone()]);

    // The container goes: nothing holds the image any more.
    assert_eq!(store.container_remove(&c.id).expect("container rm"), c);
    assert_eq!(counts(&store, &a.digest()), (0, 0));
    assert!(
        store.contains(&a.digest()).expect("contains"),
        "rmi never deletes blobs"
    );
    let r = store.remove_image("app:1", false);
    assert!(matches!(&r, Err(Error::NameNotFound(_))), "{r:?}");
}

#[test]
fn rmi_of_an_alias_is_allowed_and_rmi_by_digest_removes_every_name() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let a = TestImage::fresh(1, 1, 100);
    let b = TestImage::fresh(2, 1, 100);
    let c = TestImage::fresh(3, 1, 100);
    for img in [&a, &b, &c] {
        img.put_all(&store);
    }
    for n in ["app:1", "app:latest", "quay.io/x/app:1"] {
        store.tag(n, &a.digest()).expect("tag");
    }
    store
        .container_create("app:1", Some("db"))
        .expect("container");
    assert_eq!(counts(&store, &a.digest()), (0, 4));

    // Untagging aliases is fine while another name remains (Docker's rule).
    assert_eq!(
        store.remove_image("app", false).expect("rmi alias"),
        vec![("docker.io/library/app:latest".to_owned(), a.digest())]
    );
    assert_eq!(
        store
            .remove_image("quay.io/x/app:1", false)
            .expect("rmi alias"),
        vec![("quay.io/x/app:1".to_owned(), a.digest())]
    );
    assert_eq!(counts(&store, &a.digest()), (0, 2));
    let r = store.remove_image("app:1", false);
    assert!(matches!(&r, Err(Error::InUse { .. })), "{r:?}");
    store.container_remove("db").expect("container rm by name");
    assert!(store.containers().expect("containers").is_empty());
    store.remove_image("app:1", false).expect("rmi once unused");
    assert_eq!(counts(&store, &a.digest()), (0, 0));

    // By digest: every name of the image.
    for n in ["b:1", "b:2", "quay.io/b/b:3"] {
        store.tag(n, &b.digest()).expect("tag");
    }
    store.tag("other:1", &c.digest()).expect("tag");
    let mut untagged = store
        .remove_image(&b.digest().to_string(), false)
        .expect("rmi by digest");
    untagged.sort();
    assert_eq!(
        untagged,
        vec![
            ("docker.io/library/b:1".to_owned(), b.digest()),
            ("docker.io/library/b:2".to_owned(), b.digest()),
            ("quay.io/b/b:3".to_owned(), b.digest()),
        ]
    );
    assert_eq!(counts(&store, &b.digest()), (0, 0));
    assert_eq!(
        store.names().expect("names"),
        vec![("docker.io/library/other:1".to_owned(), c.digest())],
        "other images keep their names"
    );
    assert!(store.contains(&b.digest()).expect("contains"));
    let r = store.remove_image(&b.digest().to_string(), false);
    assert!(matches!(&r, Err(Error::NameNotFound(_))), "{r:?}");
    let r = store.remove_image("nosuch:1", false);
    assert!(matches!(&r, Err(Error::NameNotFound(_))), "{r:?}");

    // By digest with a container: refused, then forced.
    store.tag("c:2", &c.digest()).expect("tag");
    store.container_create("c:2", None).expect("container");
    assert_eq!(counts(&store, &c.digest()), (0, 3));
    let r = store.remove_image(&c.digest().to_string(), false);
    assert!(
        matches!(&r, Err(Error::InUse { image, .. }) if *image == c.digest()),
        "{r:?}"
    );
    assert_eq!(counts(&store, &c.digest()), (0, 3));
    let untagged = store
        .remove_image(&c.digest().to_string(), true)
        .expect("rmi --force by digest");
    assert_eq!(untagged.len(), 2);
    assert_eq!(counts(&store, &c.digest()), (0, 1));
    assert!(store.names().expect("names").is_empty());

    // name@digest removes the image's names.
    store.tag("d:1", &a.digest()).expect("tag");
    let untagged = store
        .remove_image(&format!("d@{}", a.digest()), false)
        .expect("rmi name@digest");
    assert_eq!(
        untagged,
        vec![("docker.io/library/d:1".to_owned(), a.digest())]
    );
}

// ---------------------------------------------------------------------------------------
// Containers and leases.
// ---------------------------------------------------------------------------------------

#[test]
fn containers_hold_their_image_and_are_found_by_id_prefix_or_name() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let a = TestImage::fresh(1, 1, 100);
    a.put_all(&store);
    store.tag("app:1", &a.digest()).expect("tag");

    let before = now_ms();
    let c1 = store
        .container_create("app:1", Some("web"))
        .expect("create");
    assert!(is_hex(&c1.id, 64), "{}", c1.id);
    assert_eq!(c1.image, a.digest());
    assert_eq!(c1.name, "web");
    assert_eq!(c1.image_ref, "app:1");
    assert!(c1.created_ms >= before.saturating_sub(1000) && c1.created_ms <= now_ms() + 1000);
    let c2 = store
        .container_create(&a.digest().to_string(), None)
        .expect("create by digest");
    assert_ne!(c1.id, c2.id);
    assert_eq!(c2.name, c2.id[..12], "default name");
    assert_eq!(counts(&store, &a.digest()), (0, 3));
    let mut listed = store.containers().expect("containers");
    listed.sort_by(|x, y| x.name.cmp(&y.name));
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(listed, want);

    // Refused: a duplicate name, a non-image, a missing name or digest.
    let r = store.container_create("app:1", Some("web"));
    assert!(
        matches!(&r, Err(Error::Invalid(m)) if m.contains("web")),
        "{r:?}"
    );
    let r = store.container_create(&a.layer_digest(0).to_string(), Some("layer"));
    assert!(
        matches!(&r, Err(Error::NotAnImage(d)) if *d == a.layer_digest(0)),
        "{r:?}"
    );
    let r = store.container_create("ghost:1", None);
    assert!(matches!(&r, Err(Error::NameNotFound(_))), "{r:?}");
    let absent = common::absent_digest();
    let r = store.container_create(&absent.to_string(), None);
    assert!(
        matches!(&r, Err(Error::NotFound(d)) if *d == absent),
        "{r:?}"
    );
    assert_eq!(store.containers().expect("containers").len(), 2);
    assert_eq!(counts(&store, &a.digest()), (0, 3));
    assert_eq!(counts(&store, &a.layer_digest(0)), (1, 0));

    // Unknown containers, and prefixes too short to use.
    let r = store.container_remove("nosuch");
    assert!(
        matches!(&r, Err(Error::ContainerNotFound(k)) if k == "nosuch"),
        "{r:?}"
    );
    let r = store.container_remove(&c2.id[..3]);
    assert!(matches!(&r, Err(Error::ContainerNotFound(_))), "{r:?}");
    assert_eq!(store.containers().expect("containers").len(), 2);

    // By unique prefix, then by name.
    assert_eq!(
        store.container_remove(&c2.id[..8]).expect("rm by prefix"),
        c2
    );
    assert_eq!(counts(&store, &a.digest()), (0, 2));
    assert_eq!(store.container_remove("web").expect("rm by name"), c1);
    assert_eq!(
        counts(&store, &a.digest()),
        (0, 1),
        "only the name holds it"
    );
    assert!(store.containers().expect("containers").is_empty());
    let r = store.container_remove(&c1.id);
    assert!(matches!(&r, Err(Error::ContainerNotFound(_))), "{r:?}");
    let r = store.container_remove("web");
    assert!(matches!(&r, Err(Error::ContainerNotFound(_))), "{r:?}");

    // A freed name can be used again; a container on an index works.
    store
        .container_create("app:1", Some("web"))
        .expect("name free again");
    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![desc(media::OCI_MANIFEST, &a.manifest)],
    ));
    store
        .put_manifest(&idx, PutOptions::default())
        .expect("put index");
    let ci = store
        .container_create(&common::sha256(&idx).to_string(), Some("multi"))
        .expect("container on an index");
    assert_eq!(counts(&store, &common::sha256(&idx)), (0, 1));
    store.container_remove(&ci.id).expect("rm");
    assert_eq!(counts(&store, &common::sha256(&idx)), (0, 0));
}

#[test]
fn leases_hold_what_they_name_until_removed() {
    let dir = common::tempdir();
    let store = common::open(dir.path());

    let before = now_ms();
    let l1 = store
        .lease_create(Some(Duration::from_secs(3600)))
        .expect("lease create");
    assert!(l1.created_ms >= before.saturating_sub(1000) && l1.created_ms <= now_ms() + 1000);
    assert_eq!(
        l1.expires_ms,
        Some(l1.created_ms + 3_600_000),
        "expiry recorded"
    );
    let l2 = store.lease_create(None).expect("lease create");
    assert_eq!(l2.expires_ms, None);
    assert!(!l1.id.is_empty() && l1.id != l2.id);

    // put with a lease.
    let x = common::blob(1, 100);
    let dx = store
        .put_with(&x, PutOptions::default().lease(l1.id.clone()))
        .expect("put leased")
        .digest;
    assert_eq!(counts(&store, &dx), (0, 1));
    store
        .put_with(&x, PutOptions::default().lease(l1.id.clone()))
        .expect("put leased again");
    assert_eq!(
        counts(&store, &dx),
        (0, 1),
        "one entry per lease and digest"
    );
    store
        .put_with(&x, PutOptions::default().lease(l2.id.clone()))
        .expect("put under another lease");
    assert_eq!(counts(&store, &dx), (0, 2));

    // A leased manifest: the lease holds it, not its children.
    let img = TestImage::fresh(2, 2, 50);
    img.put_blobs(&store);
    store
        .put_manifest(&img.manifest, PutOptions::default().lease(l1.id.clone()))
        .expect("put leased manifest");
    assert_eq!(counts(&store, &img.digest()), (0, 1));
    for c in img.children() {
        assert_eq!(counts(&store, &c), (1, 0));
    }

    // lease_add: stored or not, repeats once.
    let y = store.put(&common::blob(3, 10)).expect("put").digest;
    let absent = common::absent_digest();
    store.lease_add(&l2.id, &[y, absent, y]).expect("lease add");
    store.lease_add(&l2.id, &[y]).expect("lease add again");
    assert_eq!(counts(&store, &y), (0, 1));
    assert_eq!(counts(&store, &absent), (0, 1));
    let leases: BTreeMap<String, (Option<u64>, BTreeSet<Digest>)> = store
        .leases()
        .expect("leases")
        .into_iter()
        .map(|l| (l.record.id.clone(), (l.record.expires_ms, set(l.resources))))
        .collect();
    let want: BTreeMap<String, (Option<u64>, BTreeSet<Digest>)> = [
        (l1.id.clone(), (l1.expires_ms, set([dx, img.digest()]))),
        (l2.id.clone(), (None, set([dx, y, absent]))),
    ]
    .into_iter()
    .collect();
    assert_eq!(leases, want);

    // Unknown leases change nothing and store nothing.
    let blobs = store.info().expect("info").blobs;
    let r = store.lease_add("nosuch", &[y]);
    assert!(
        matches!(&r, Err(Error::LeaseNotFound(l)) if l == "nosuch"),
        "{r:?}"
    );
    assert_eq!(counts(&store, &y), (0, 1));
    let r = store.lease_remove("nosuch");
    assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{r:?}");
    let z = common::blob(4, 33);
    let r = store.put_with(&z, PutOptions::default().lease("nosuch"));
    assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{r:?}");
    assert!(!store.contains(&common::sha256(&z)).expect("contains"));
    let other = TestImage::fresh(5, 1, 10);
    let r = store.put_manifest(&other.manifest, PutOptions::default().lease("nosuch"));
    assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{r:?}");
    assert!(!store.contains(&other.digest()).expect("contains"));
    assert_eq!(counts(&store, &other.config_digest()), (0, 0));
    assert_eq!(store.info().expect("info").blobs, blobs);

    // Removing a lease drops its holds only.
    store.lease_remove(&l1.id).expect("lease rm");
    assert_eq!(counts(&store, &dx), (0, 1));
    assert_eq!(counts(&store, &img.digest()), (0, 0));
    let r = store.lease_remove(&l1.id);
    assert!(matches!(&r, Err(Error::LeaseNotFound(_))), "{r:?}");
    assert_eq!(store.leases().expect("leases").len(), 1);
    store.lease_remove(&l2.id).expect("lease rm");
    for d in [dx, y, absent, img.digest()] {
        assert_eq!(counts(&store, &d).1, 0, "{d}");
    }
    assert!(store.leases().expect("leases").is_empty());
    assert!(
        store.contains(&dx).expect("contains"),
        "removing a lease deletes nothing"
    );
}

// ---------------------------------------------------------------------------------------
// Reopen.
// ---------------------------------------------------------------------------------------

/// `(refcount, holds)`, children, referrers and kind of one digest.
type GraphEntry = ((u64, u64), BTreeSet<Digest>, BTreeSet<Digest>, Option<Kind>);

/// Everything the image model records about `digests`.
#[derive(Debug, PartialEq, Eq)]
struct Snap {
    names: Vec<(String, Digest)>,
    containers: BTreeMap<String, (Digest, String, String, u64)>,
    leases: BTreeMap<String, (u64, Option<u64>, BTreeSet<Digest>)>,
    graph: BTreeMap<Digest, GraphEntry>,
}

fn snap(store: &Store, digests: &BTreeSet<Digest>) -> Snap {
    Snap {
        names: store.names().expect("names"),
        containers: store
            .containers()
            .expect("containers")
            .into_iter()
            .map(|c| (c.id, (c.image, c.name, c.image_ref, c.created_ms)))
            .collect(),
        leases: store
            .leases()
            .expect("leases")
            .into_iter()
            .map(|l| {
                (
                    l.record.id,
                    (l.record.created_ms, l.record.expires_ms, set(l.resources)),
                )
            })
            .collect(),
        graph: digests
            .iter()
            .map(|d| {
                let kind = store.stat(d).expect("stat").map(|i| i.kind);
                let edges = (
                    counts(store, d),
                    children_of(store, d),
                    referrers_of(store, d),
                );
                (*d, (edges.0, edges.1, edges.2, kind))
            })
            .collect(),
    }
}

#[test]
fn reopen_keeps_names_containers_leases_edges_and_counts() {
    let dir = common::tempdir();
    let a = TestImage::fresh(1, 2, 100);
    let b = TestImage::fresh(2, 2, 100);
    let late = TestImage::fresh(3, 1, 100);
    let r_a = referrer(&a.manifest, &common::blob(40, 20), "application/spdx+json");
    let r_late = referrer(
        &late.manifest,
        &common::blob(41, 20),
        "application/spdx+json",
    );
    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![
            with_platform(
                desc(media::OCI_MANIFEST, &a.manifest),
                "linux",
                "amd64",
                None,
            ),
            with_platform(
                desc(media::OCI_MANIFEST, &b.manifest),
                "linux",
                "arm64",
                None,
            ),
        ],
    ));
    let mut digests: BTreeSet<Digest> = a
        .children()
        .into_iter()
        .chain(b.children())
        .chain(late.children())
        .chain([a.digest(), b.digest(), late.digest()])
        .chain([r_a.as_slice(), r_late.as_slice(), idx.as_slice(), b"{}"].map(common::sha256))
        .collect();
    digests.insert(common::absent_digest());

    let (before, c_web, lease) = {
        let store = common::open(dir.path());
        store.put(b"{}").expect("put");
        a.put_all(&store);
        // b: manifest first, one layer never stored.
        store
            .put_manifest(&b.manifest, PutOptions::default())
            .expect("put b");
        store.put(&b.config).expect("put");
        store.put(&b.layers[0]).expect("put");
        store
            .put_manifest(&idx, PutOptions::default())
            .expect("put index");
        store
            .put_manifest(&r_a, PutOptions::default())
            .expect("referrer");
        // A referrer whose subject is not stored yet: pending across the reopen.
        store
            .put_manifest(&r_late, PutOptions::default())
            .expect("early referrer");
        store.tag("app:a", &a.digest()).expect("tag");
        store.tag("quay.io/x/app:b", &b.digest()).expect("tag");
        store.tag("multi", &common::sha256(&idx)).expect("tag");
        store.tag("gone", &b.digest()).expect("tag");
        let c_web = store
            .container_create("app:a", Some("web"))
            .expect("container");
        store
            .container_create("gone", Some("db"))
            .expect("container");
        store.remove_image("gone", true).expect("rmi --force");
        let lease = store
            .lease_create(Some(Duration::from_secs(7200)))
            .expect("lease");
        store
            .lease_add(
                &lease.id,
                &[
                    b.layer_digest(1),
                    a.config_digest(),
                    common::absent_digest(),
                ],
            )
            .expect("lease add");
        store.lease_create(None).expect("empty lease");
        (snap(&store, &digests), c_web, lease)
    };
    // Sanity: the snapshot recorded what was built.
    assert_eq!(before.names.len(), 3);
    assert_eq!(before.containers.len(), 2);
    assert_eq!(before.leases.len(), 2);
    assert_eq!(
        before.graph[&a.digest()].0,
        (1, 2),
        "index edge; name + container"
    );
    assert_eq!(
        before.graph[&b.digest()].0,
        (1, 2),
        "index edge; name + container"
    );
    assert_eq!(before.graph[&common::sha256(&r_a)].0, (1, 0));
    assert_eq!(before.graph[&common::sha256(&r_late)].0, (0, 0));
    assert_eq!(before.graph[&b.layer_digest(1)].0, (1, 1));

    let store = common::open(dir.path());
    assert_eq!(snap(&store, &digests), before, "reopen changes nothing");

    // Carrying on after the reopen: the pending referrer attaches, removals release.
    late.put_all(&store);
    assert_eq!(counts(&store, &common::sha256(&r_late)), (1, 0));
    assert_eq!(
        referrers_of(&store, &late.digest()),
        set([common::sha256(&r_late)])
    );
    store.container_remove("db").expect("container rm");
    assert_eq!(counts(&store, &b.digest()), (1, 1));
    store
        .container_remove(&c_web.id[..6])
        .expect("container rm");
    assert_eq!(counts(&store, &a.digest()), (1, 1));
    store.lease_remove(&lease.id).expect("lease rm");
    assert_eq!(counts(&store, &b.layer_digest(1)), (1, 0));
    assert_eq!(counts(&store, &common::absent_digest()), (0, 0));
}

// ---------------------------------------------------------------------------------------
// images, inspect, df (library).
// ---------------------------------------------------------------------------------------

/// Two images sharing one layer, stored with their kinds recorded (as an importer does).
fn two_images_sharing_a_layer(store: &Store, kinds: bool) -> (TestImage, TestImage, Vec<u8>) {
    let shared = common::blob(500, 4000);
    let a = TestImage::oci(501, vec![shared.clone(), common::blob(502, 1000)]);
    let b = TestImage::oci(503, vec![shared.clone(), common::blob(504, 2000)]);
    for img in [&a, &b] {
        if kinds {
            store
                .put_with(&img.config, PutOptions::default().kind(Kind::Config))
                .expect("put config");
            for l in &img.layers {
                store
                    .put_with(l, PutOptions::default().kind(Kind::Layer))
                    .expect("put layer");
            }
        } else {
            img.put_blobs(store);
        }
        store
            .put_manifest(&img.manifest, PutOptions::default())
            .expect("put manifest");
    }
    (a, b, shared)
}

#[test]
fn images_inspect_and_disk_usage_account_for_shared_layers() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let (a, b, shared) = two_images_sharing_a_layer(&store, true);
    let s = shared.len() as u64;
    store.tag("app:a", &a.digest()).expect("tag");
    store.tag("app:b", &b.digest()).expect("tag");
    let c = store
        .container_create("app:a", Some("web"))
        .expect("container");
    let lease = store.lease_create(None).expect("lease");
    let loose = common::blob(505, 777);
    store
        .put_with(&loose, PutOptions::default().lease(lease.id.clone()))
        .expect("put leased");
    let orphan = common::blob(506, 300);
    store.put(&orphan).expect("put unreferenced");

    // images
    let images = store.images().expect("images");
    assert_eq!(images.len(), 2);
    let (ia, ib) = (&images[0], &images[1]);
    assert_eq!(ia.name, "app:a");
    assert_eq!(ia.canonical, "docker.io/library/app:a");
    assert_eq!(ia.digest, a.digest());
    assert_eq!(ia.kind, Kind::Manifest);
    assert_eq!(ia.size, a.bytes_reached());
    assert_eq!(ia.created.as_deref(), Some("2024-01-26T00:00:00Z"));
    assert_eq!(ia.containers, vec![c.id.clone()]);
    assert_eq!(ib.name, "app:b");
    assert_eq!(ib.size, b.bytes_reached());
    assert!(ib.containers.is_empty());

    // inspect
    let d = store.inspect("app:a").expect("inspect");
    assert_eq!(d.digest, a.digest());
    assert_eq!(d.kind, Kind::Manifest);
    assert_eq!(d.media_type.as_deref(), Some(media::OCI_MANIFEST));
    assert_eq!(d.names, vec!["docker.io/library/app:a".to_owned()]);
    let config = d.config.as_ref().expect("config");
    assert_eq!(
        (config.digest, config.size),
        (a.config_digest(), a.config.len() as u64)
    );
    let layers: Vec<(Digest, u64)> = d.layers.iter().map(|l| (l.digest, l.size)).collect();
    assert_eq!(
        layers,
        a.layers
            .iter()
            .map(|l| (common::sha256(l), l.len() as u64))
            .collect::<Vec<_>>()
    );
    let info = d.config_info.as_ref().expect("config info");
    assert_eq!(info.architecture.as_deref(), Some("amd64"));
    assert_eq!(info.diff_ids.len(), 2);
    assert!(d.missing.is_empty() && d.platforms.is_empty());
    assert_eq!(d.size, a.bytes_reached());
    assert_eq!(d.containers, vec![c.id.clone()]);
    assert_eq!(d.manifest["mediaType"], media::OCI_MANIFEST);

    // df
    let u = store.disk_usage().expect("df");
    let total =
        a.bytes_reached() + b.bytes_reached() - s + loose.len() as u64 + orphan.len() as u64;
    assert_eq!(u.total, total);
    assert_eq!(u.total, store.info().expect("info").bytes);
    assert_eq!(u.shared, s, "one shared layer");
    assert_eq!(u.unique, a.bytes_reached() + b.bytes_reached() - 2 * s);
    assert_eq!(u.containers, 1);
    assert_eq!(
        u.reclaimable,
        total - a.bytes_reached() - loose.len() as u64,
        "all but what the container's image and the lease reach"
    );
    assert_eq!(u.images.len(), 2);
    let ua = u.images.iter().find(|i| i.digest == a.digest()).expect("a");
    assert_eq!(ua.names, vec!["app:a".to_owned()]);
    assert_eq!(
        (ua.size, ua.shared, ua.unique),
        (a.bytes_reached(), s, a.bytes_reached() - s)
    );
    assert_eq!(ua.containers, 1);
    let ub = u.images.iter().find(|i| i.digest == b.digest()).expect("b");
    assert_eq!(
        (ub.size, ub.shared, ub.unique),
        (b.bytes_reached(), s, b.bytes_reached() - s)
    );
    assert_eq!(ub.containers, 0);
    let layers: BTreeMap<Digest, (u64, usize)> = u
        .layers
        .iter()
        .map(|l| (l.digest, (l.size, l.images)))
        .collect();
    let want: BTreeMap<Digest, (u64, usize)> = [
        (common::sha256(&shared), (s, 2)),
        (a.layer_digest(1), (a.layers[1].len() as u64, 1)),
        (b.layer_digest(1), (b.layers[1].len() as u64, 1)),
    ]
    .into_iter()
    .collect();
    assert_eq!(layers, want);

    // After rmi --force, the image stays in df (its container uses it) without a name.
    store.remove_image("app:a", true).expect("rmi --force");
    let u = store.disk_usage().expect("df");
    let ua = u.images.iter().find(|i| i.digest == a.digest()).expect("a");
    assert!(ua.names.is_empty());
    assert_eq!(ua.containers, 1);
    assert_eq!(store.images().expect("images").len(), 1);

    // An index: its size counts every distinct blob it reaches once.
    let idx = bytes(&index_json(
        Some(media::OCI_INDEX),
        vec![
            with_platform(
                desc(media::OCI_MANIFEST, &a.manifest),
                "linux",
                "amd64",
                None,
            ),
            with_platform(
                desc(media::OCI_MANIFEST, &b.manifest),
                "linux",
                "arm64",
                None,
            ),
        ],
    ));
    store
        .put_manifest(&idx, PutOptions::default())
        .expect("put index");
    store.tag("app:multi", &common::sha256(&idx)).expect("tag");
    let multi = store
        .images()
        .expect("images")
        .into_iter()
        .find(|i| i.name == "app:multi")
        .expect("listed");
    assert_eq!(multi.kind, Kind::Index);
    assert_eq!(
        multi.size,
        idx.len() as u64 + a.bytes_reached() + b.bytes_reached() - s
    );
    assert_eq!(
        multi.created.as_deref(),
        Some("2024-01-26T00:00:00Z"),
        "first manifest's"
    );
}

/// `df` lists an image's layers whether their bytes were put with `Kind::Layer` or as plain
/// blobs (a registry push uploads layers before the manifest, without a media type): the
/// manifests say which blobs are layers.
#[test]
fn disk_usage_lists_layers_put_as_plain_blobs() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let (a, b, shared) = two_images_sharing_a_layer(&store, false);
    store.tag("app:a", &a.digest()).expect("tag");
    store.tag("app:b", &b.digest()).expect("tag");
    let u = store.disk_usage().expect("df");
    assert_eq!(u.shared, shared.len() as u64);
    let layers: BTreeMap<Digest, usize> = u.layers.iter().map(|l| (l.digest, l.images)).collect();
    let want: BTreeMap<Digest, usize> = [
        (common::sha256(&shared), 2),
        (a.layer_digest(1), 1),
        (b.layer_digest(1), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        layers, want,
        "df layers of images whose layers were put without a kind"
    );
}

// ---------------------------------------------------------------------------------------
// The command line.
// ---------------------------------------------------------------------------------------

fn json_out(root: &Path, args: &[&str]) -> Value {
    let out = common::ok_stdout(&common::cli(root, args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

#[test]
fn cli_tag_rmi_and_containers() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let a = TestImage::fresh(1, 2, 100);
    {
        let store = common::open(&root);
        a.put_all(&store);
    }
    let digest = a.digest().to_string();

    // tag by digest, then by name.
    let out = common::ok_stdout(&common::cli(&root, &["tag", &digest, "app:1"]));
    assert_eq!(out.trim(), format!("app:1 -> {digest}"));
    let out = common::ok_stdout(&common::cli(
        &root,
        &["tag", "app:1", "registry.example.com/team/app:2"],
    ));
    assert_eq!(
        out.trim(),
        format!("registry.example.com/team/app:2 -> {digest}")
    );
    // Tagging a layer is refused.
    let err = common::failed_stderr(&common::cli(
        &root,
        &["tag", &a.layer_digest(0).to_string(), "layer:1"],
    ));
    assert!(err.contains("is not an image"), "{err}");

    // container create prints a 64-hex id.
    let out = common::ok_stdout(&common::cli(
        &root,
        &["container", "create", "--image", "app:1", "--name", "web"],
    ));
    let id = out.trim().to_owned();
    assert!(is_hex(&id, 64), "{out:?}");
    let err = common::failed_stderr(&common::cli(
        &root,
        &["container", "create", "--image", "app:1", "--name", "web"],
    ));
    assert!(err.contains("web"), "{err}");
    let v = json_out(&root, &["container", "ls", "--json"]);
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["image"], digest.as_str());
    assert_eq!(list[0]["name"], "web");

    // rmi of an alias works; of the last name, it is a conflict.
    let out = common::ok_stdout(&common::cli(&root, &["rmi", "app:1"]));
    assert_eq!(out.trim(), "Untagged: app:1");
    let out = common::cli(&root, &["rmi", "registry.example.com/team/app:2"]);
    assert!(!out.status.success());
    let err = common::failed_stderr(&out);
    for part in [
        "conflict: unable to remove",
        "in use by container",
        &id[..12],
        "web",
    ] {
        assert!(err.contains(part), "{part:?} not in {err:?}");
    }
    let v = json_out(&root, &["images", "--json"]);
    assert_eq!(v.as_array().expect("array").len(), 1, "{v}");

    // --force removes the name; the content stays.
    let out = common::ok_stdout(&common::cli(
        &root,
        &["rmi", "--force", "registry.example.com/team/app:2"],
    ));
    assert_eq!(out.trim(), "Untagged: registry.example.com/team/app:2");
    let v = json_out(&root, &["images", "--json"]);
    assert_eq!(v, json!([]));
    let out = common::cli(&root, &["blob", "get", &digest]);
    assert_eq!(common::ok_stdout(&out).as_bytes(), a.manifest.as_slice());

    // container rm by prefix; again: not found.
    let out = common::ok_stdout(&common::cli(&root, &["container", "rm", &id[..10]]));
    assert_eq!(out.trim(), id);
    assert_eq!(json_out(&root, &["container", "ls", "--json"]), json!([]));
    let err = common::failed_stderr(&common::cli(&root, &["container", "rm", "web"]));
    assert!(err.contains("no such container"), "{err}");

    let store = common::open(&root);
    assert_eq!(counts(&store, &a.digest()), (0, 0));
    assert!(store.contains(&a.digest()).expect("contains"));
}

#[test]
fn cli_leases() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let x = common::blob(1, 100);
    {
        let store = common::open(&root);
        store.put(&x).expect("put");
    }
    let dx = common::sha256(&x);

    let before = now_ms();
    let out = common::ok_stdout(&common::cli(&root, &["lease", "create", "--expire", "1h"]));
    let l1 = out.trim().to_owned();
    assert!(
        !l1.is_empty() && !l1.contains(char::is_whitespace),
        "{out:?}"
    );
    let out = common::ok_stdout(&common::cli(&root, &["lease", "create"]));
    let l2 = out.trim().to_owned();
    assert_ne!(l1, l2);
    common::ok_stdout(&common::cli(&root, &["lease", "add", &l1, &dx.to_string()]));

    let v = json_out(&root, &["lease", "ls", "--json"]);
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 2, "{v}");
    let one = list
        .iter()
        .find(|l| l["id"] == l1.as_str())
        .expect("l1 listed");
    let created = one["created_ms"].as_u64().expect("created_ms");
    assert!(created >= before.saturating_sub(1000) && created <= now_ms() + 1000);
    assert_eq!(
        one["expires_ms"].as_u64(),
        Some(created + 3_600_000),
        "{one}"
    );
    assert_eq!(one["resources"], json!([dx.to_string()]));
    let two = list
        .iter()
        .find(|l| l["id"] == l2.as_str())
        .expect("l2 listed");
    assert_eq!(two["expires_ms"], Value::Null);
    assert_eq!(two["resources"], json!([]));

    common::ok_stdout(&common::cli(&root, &["lease", "rm", &l1]));
    let v = json_out(&root, &["lease", "ls", "--json"]);
    assert_eq!(v.as_array().expect("array").len(), 1, "{v}");
    let err = common::failed_stderr(&common::cli(&root, &["lease", "rm", &l1]));
    assert!(err.contains("no such lease"), "{err}");

    let store = common::open(&root);
    assert_eq!(counts(&store, &dx), (0, 0));
}

#[test]
fn cli_images_inspect_and_df() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let (a, b, shared, cid) = {
        let store = common::open(&root);
        let (a, b, shared) = two_images_sharing_a_layer(&store, true);
        store.tag("app:a", &a.digest()).expect("tag");
        store.tag("app:b", &b.digest()).expect("tag");
        let c = store.container_create("app:a", None).expect("container");
        (a, b, shared, c.id)
    };
    let s = shared.len() as u64;

    let v = json_out(&root, &["images", "--json"]);
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 2, "{v}");
    for (entry, img, name) in [(&list[0], &a, "app:a"), (&list[1], &b, "app:b")] {
        assert_eq!(entry["name"], name);
        assert_eq!(entry["digest"], img.digest().to_string());
        assert_eq!(entry["size"].as_u64(), Some(img.bytes_reached()), "{entry}");
    }
    assert_eq!(list[0]["containers"], json!([cid]));

    let v = json_out(&root, &["inspect", "app:a", "--json"]);
    assert_eq!(v["digest"], a.digest().to_string());
    assert_eq!(v["config"]["digest"], a.config_digest().to_string());
    assert_eq!(v["config"]["size"].as_u64(), Some(a.config.len() as u64));
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "{v}");
    for (l, bytes) in layers.iter().zip(&a.layers) {
        assert_eq!(l["digest"], common::sha256(bytes).to_string());
        assert_eq!(l["size"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(l["media_type"], media::OCI_LAYER_GZIP);
    }
    let err = common::failed_stderr(&common::cli(&root, &["inspect", "ghost:1", "--json"]));
    assert!(err.contains("no such image"), "{err}");

    let v = json_out(&root, &["df", "--json"]);
    let total = a.bytes_reached() + b.bytes_reached() - s;
    assert_eq!(v["total"].as_u64(), Some(total), "{v}");
    assert_eq!(v["shared"].as_u64(), Some(s), "{v}");
    assert_eq!(v["unique"].as_u64(), Some(total - s), "{v}");
    assert_eq!(
        v["reclaimable"].as_u64(),
        Some(total - a.bytes_reached()),
        "{v}"
    );
    assert_eq!(v["containers"].as_u64(), Some(1));
    let images = v["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{v}");
    for img in [&a, &b] {
        let e = images
            .iter()
            .find(|e| e["digest"] == img.digest().to_string())
            .expect("image in df");
        assert_eq!(e["size"].as_u64(), Some(img.bytes_reached()));
        assert_eq!(e["shared"].as_u64(), Some(s));
        assert_eq!(e["unique"].as_u64(), Some(img.bytes_reached() - s));
    }
    let layers = v["layers"].as_array().expect("layers");
    let sl = layers
        .iter()
        .find(|l| l["digest"] == common::sha256(&shared).to_string())
        .expect("shared layer in df");
    assert_eq!(sl["images"].as_u64(), Some(2));
    assert_eq!(sl["size"].as_u64(), Some(s));
    assert_eq!(layers.len(), 3, "{v}");

    // The human form says the same in a table.
    let out = common::ok_stdout(&common::cli(&root, &["df"]));
    assert!(
        out.contains("Containers:  1") && out.contains("LAYER"),
        "{out}"
    );
    let out = common::ok_stdout(&common::cli(&root, &["images"]));
    assert!(
        out.starts_with("NAME") && out.contains("app:a") && out.contains("app:b"),
        "{out}"
    );
}
