//! Unpacking one layer: the bytes are a layer blob (plain tar, or gzip/zstd as sniffed)
//! of an image whose config lists its true diff_id. Whatever the entries say, nothing
//! may appear outside the target directory: not in its parent, not beside the store,
//! not in a fixed canary directory that seeds aim absolute symlinks at; and a failed
//! unpack leaves no target and no temporary sibling.
#![no_main]

#[path = "common.rs"]
mod common;

use std::io::Read;
use std::path::Path;

use layerstore::{Digest, Kind, PutOptions, image};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

/// Seeds point absolute symlinks here; it must stay empty.
const CANARY: &str = "/dev/shm/layerstore-fuzz-canary";

fn diff_id(blob: &[u8]) -> String {
    let mut h = Sha256::new();
    let ok = image::decompress(blob).is_ok_and(|r| {
        let mut r = r.take(64 << 20);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => h.update(&buf[..n]),
                Err(_) => break false,
            }
        }
    });
    if ok {
        format!("sha256:{}", hex::encode(h.finalize()))
    } else {
        Digest::compute(layerstore::Algorithm::Sha256, blob).to_string()
    }
}

fuzz_target!(|data: &[u8]| {
    let canary = Path::new(CANARY);
    std::fs::create_dir_all(canary).expect("canary");
    let dir = common::scratch();
    let store = common::open(&dir.path().join("store"));
    let layer = store
        .put_with(data, PutOptions::default().kind(Kind::Layer))
        .expect("put layer")
        .digest;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id(data)]},
    }))
    .unwrap();
    let cfg = store
        .put_with(&config, PutOptions::default().kind(Kind::Config))
        .expect("put config")
        .digest;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg.to_string(), "size": config.len()},
        "layers": [{"mediaType": image::Compression::sniff(data).layer_media_type(),
                    "digest": layer.to_string(), "size": data.len()}],
    }))
    .unwrap();
    let m = store
        .put_manifest(&manifest, PutOptions::default())
        .expect("put manifest")
        .descriptor
        .digest;

    let parent = dir.path().join("out");
    std::fs::create_dir(&parent).unwrap();
    let target = parent.join("root");
    let r = store.unpack(&m.to_string(), &target, &Default::default());
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("unpack: {r:?}");
    }
    let beside = common::listing(&parent);
    match &r {
        Ok(report) => {
            assert_eq!(
                beside,
                vec![target.clone()],
                "unpack ({report:?}) wrote beside its target"
            );
            assert!(target.symlink_metadata().unwrap().is_dir());
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(beside.is_empty(), "failed unpack ({e}) left {beside:?}");
        }
    }
    assert_eq!(
        common::listing(dir.path()),
        vec![parent.clone(), dir.path().join("store")],
        "unpack ({r:?}) wrote beside the store"
    );
    let c = common::listing(canary);
    assert!(
        c.is_empty(),
        "unpack ({r:?}) wrote to the canary {CANARY}: {c:?}"
    );
    drop(store);
    // Unpacked trees may hold read-only directories; the scratch dir must still go.
    let _ = make_removable(&target);
});

/// Gives the owner rwx on every directory under `p` so the scratch dir can be removed.
fn make_removable(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = p.symlink_metadata()?;
    if m.is_dir() {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
        for e in std::fs::read_dir(p)? {
            make_removable(&e?.path())?;
        }
    }
    Ok(())
}
