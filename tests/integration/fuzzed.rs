//! Regression tests for what coverage-guided fuzzing (`fuzz/`, `scripts/fuzz.sh`) found:
//! each feeds the minimised input, or the smallest program that reaches the same code,
//! and asserts the right behaviour — a clear error naming the problem, the store
//! unchanged and clean, nothing written outside a target directory.

use std::io::Read;

use layerstore::{ExportFormat, Reference};

use crate::common;
use crate::oci;

/// The `reference` target: the familiar form of `docker.io/my.org/app:1` is `my.org/app:1`,
/// which names registry `my.org` (and of `docker.io/a_b.c/x` one that does not parse at
/// all). A docker archive's `RepoTags` must read back as the exported name.
#[test]
fn docker_export_repo_tags_read_back_as_the_exported_name() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("s"));
    let img = oci::plain(&[vec![oci::file("f", b"x\n")]]);
    for name in [
        "docker.io/my.org/app:1",
        "docker.io/a_b.c/x:2",
        "docker.io/localhost/y:3",
        "docker.io/library/busybox:1",
        "quay.io/x/y:4",
    ] {
        img.store(&store, name);
        let mut tar = Vec::new();
        store
            .export(&[name.to_owned()], ExportFormat::Docker, &mut tar)
            .expect("export");
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut mj = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            if e.path().expect("path").to_str() == Some("manifest.json") {
                e.read_to_end(&mut mj).expect("read manifest.json");
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&mj).expect("manifest.json");
        let tags: Vec<&str> = v[0]["RepoTags"]
            .as_array()
            .expect("RepoTags")
            .iter()
            .map(|t| t.as_str().expect("tag"))
            .collect();
        assert_eq!(tags.len(), 1, "{name}: {tags:?}");
        assert_eq!(
            Reference::parse(tags[0]).as_ref().ok(),
            Some(&Reference::parse(name).unwrap()),
            "{name} exported as RepoTags {tags:?}"
        );
    }
    assert_eq!(
        Reference::parse("docker.io/library/busybox:1")
            .unwrap()
            .familiar(),
        "busybox:1",
        "unambiguous names keep Docker's short form"
    );
}
