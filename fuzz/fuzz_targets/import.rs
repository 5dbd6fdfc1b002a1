//! Archive import: the bytes are fed as a tar stream (OCI archive or `docker save`) to
//! a fresh store. A refused archive leaves the store as it was (it opens, has no names,
//! no blobs, no scratch files, and verifies clean); an accepted one verifies deeply with
//! no problems, and every image it reports resolves.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::atomic::AtomicBool;

use layerstore::{Depth, ImportOptions, VerifyOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    let root = dir.path().join("store");
    let store = common::open(&root);
    let result = store.import_tar(data, &ImportOptions::default());
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("import: {result:?}");
    }
    drop(store);
    let store = common::open(&root);
    let report = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify failed to run");
    match result {
        Err(e) => {
            assert!(!e.to_string().is_empty());
            let names = store.names().expect("names");
            assert!(
                names.is_empty(),
                "refused import ({e}) left names {names:?}"
            );
            let info = store.info().expect("info");
            assert_eq!(info.blobs, 0, "refused import ({e}) left blobs: {info:?}");
            assert_eq!(
                info.ingests, 0,
                "refused import ({e}) left scratch: {info:?}"
            );
            assert!(
                report.problems.is_empty(),
                "refused import ({e}) left problems: {:?}",
                report.problems
            );
        }
        Ok(out) => {
            assert!(
                report.problems.is_empty(),
                "accepted import ({out:?}) verifies with problems: {:?}",
                report.problems
            );
            let info = store.info().expect("info");
            assert_eq!(info.ingests, 0, "import left scratch: {info:?}");
            assert!(out.blobs <= info.blobs, "{out:?} vs {info:?}");
            for img in &out.images {
                assert!(store.contains(&img.digest).expect("contains"));
                for n in &img.names {
                    assert_eq!(store.resolve(n).expect("resolve imported name"), img.digest);
                }
            }
        }
    }
});
