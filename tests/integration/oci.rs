//! Hand-built images for tests: tar layers with raw header fields (so `..`, absolute and
//! very long names can be written), configs, manifests, indexes, and OCI archives and
//! layouts of them, every digest real.

use std::path::Path;

use layerstore::{Digest, Kind, PutOptions, Store};
use serde_json::json;

use crate::common;

/// The mtime hand-built entries carry unless told otherwise.
pub const EPOCH: i64 = 1_700_000_000;
/// OCI media types used by the builders.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI plain tar layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// One tar entry, written with raw header fields (no path checks: `..` and absolute
/// names go in as given).
#[derive(Clone, Debug)]
pub struct Ent {
    pub name: String,
    pub ty: tar::EntryType,
    pub data: Vec<u8>,
    pub link: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub dev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

pub fn ent(name: &str, ty: tar::EntryType, mode: u32) -> Ent {
    Ent {
        name: name.to_owned(),
        ty,
        data: Vec::new(),
        link: String::new(),
        mode,
        uid: 0,
        gid: 0,
        mtime: EPOCH as u64,
        dev: (0, 0),
        xattrs: Vec::new(),
    }
}

pub fn file(name: &str, data: &[u8]) -> Ent {
    Ent {
        data: data.to_vec(),
        ..ent(name, tar::EntryType::Regular, 0o644)
    }
}

pub fn dir(name: &str) -> Ent {
    ent(name, tar::EntryType::Directory, 0o755)
}

pub fn symlink(name: &str, target: &str) -> Ent {
    Ent {
        link: target.to_owned(),
        ..ent(name, tar::EntryType::Symlink, 0o777)
    }
}

pub fn hardlink(name: &str, target: &str) -> Ent {
    Ent {
        link: target.to_owned(),
        ..ent(name, tar::EntryType::Link, 0o644)
    }
}

impl Ent {
    pub fn mode(mut self, m: u32) -> Ent {
        self.mode = m;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Ent {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, t: u64) -> Ent {
        self.mtime = t;
        self
    }
    pub fn dev(mut self, major: u32, minor: u32) -> Ent {
        self.dev = (major, minor);
        self
    }
    pub fn xattr(mut self, key: &str, value: &[u8]) -> Ent {
        self.xattrs.push((key.to_owned(), value.to_vec()));
        self
    }
}

/// A tar (with the end-of-archive trailer) of `entries`, in order.
pub fn layer(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        assert!(e.link.len() <= 100, "{e:?}");
        if e.name.len() > 100 {
            // GNU long name: an `L` entry holding the name, then the entry itself.
            let mut l = tar::Header::new_gnu();
            l.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
            l.set_entry_type(tar::EntryType::GNULongName);
            l.set_size(e.name.len() as u64 + 1);
            l.set_mode(0o644);
            l.set_cksum();
            let mut name = e.name.as_bytes().to_vec();
            name.push(0);
            b.append(&l, name.as_slice()).expect("append long name");
        }
        let mut h = tar::Header::new_ustar();
        let old = h.as_old_mut();
        let n = e.name.len().min(100);
        old.name = [0; 100];
        old.name[..n].copy_from_slice(&e.name.as_bytes()[..n]);
        old.linkname = [0; 100];
        old.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        h.set_entry_type(e.ty);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_device_major(e.dev.0).expect("ustar device");
        h.set_device_minor(e.dev.1).expect("ustar device");
        h.set_cksum();
        if !e.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                .expect("pax");
        }
        b.append(&h, e.data.as_slice()).expect("append entry");
    }
    b.into_inner().expect("finish tar")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn sha(data: &[u8]) -> String {
    common::sha256(data).to_string()
}

/// The blobs of a hand-built image.
pub struct Built {
    pub digest: Digest,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    /// (media type, blob) per layer.
    pub layers: Vec<(&'static str, Vec<u8>)>,
}

/// An image of `layers` (blobs as stored, with their media types) whose config lists
/// `diff_ids`.
pub fn build(layers: Vec<(&'static str, Vec<u8>)>, diff_ids: &[String]) -> Built {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config json");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(&config), "size": config.len()},
        "layers": layers.iter().map(|(mt, b)| json!({
            "mediaType": mt, "digest": sha(b), "size": b.len(),
        })).collect::<Vec<_>>(),
    }))
    .expect("manifest json");
    Built {
        digest: common::sha256(&manifest),
        manifest,
        config,
        layers,
    }
}

/// An image of plain tar layers with correct `diff_ids`.
pub fn plain(layers: &[Vec<Ent>]) -> Built {
    let tars: Vec<Vec<u8>> = layers.iter().map(|l| layer(l)).collect();
    let ids: Vec<String> = tars.iter().map(|t| sha(t)).collect();
    build(tars.into_iter().map(|t| (OCI_LAYER, t)).collect(), &ids)
}

impl Built {
    /// Stores the blobs and names the manifest `name`.
    pub fn store(&self, store: &Store, name: &str) {
        for (_, b) in &self.layers {
            store
                .put_with(b, PutOptions::default().kind(Kind::Layer))
                .expect("put layer");
        }
        store
            .put_with(&self.config, PutOptions::default().kind(Kind::Config))
            .expect("put config");
        let put = store
            .put_manifest(&self.manifest, PutOptions::default())
            .expect("put manifest");
        assert_eq!(put.descriptor.digest, self.digest);
        assert!(put.absent_children.is_empty(), "{:?}", put.absent_children);
        store.tag(name, &self.digest).expect("tag");
    }

    /// Writes the image as an OCI layout (tag `t`) that umoci can unpack.
    pub fn layout(&self, dir: &Path) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("create layout");
        let put = |b: &[u8]| {
            std::fs::write(blobs.join(&sha(b)["sha256:".len()..]), b).expect("write blob");
        };
        for (_, b) in &self.layers {
            put(b);
        }
        put(&self.config);
        put(&self.manifest);
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": self.digest.to_string(),
            "size": self.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }]});
        std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    }
}

/// A tar of `(path, bytes)` entries as given (regular files), in order: an archive of any
/// shape, hostile ones included.
pub fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let ents: Vec<Ent> = entries.iter().map(|(p, d)| file(p, d)).collect();
    layer(&ents)
}

/// `blobs/sha256/<hex>` for a blob.
pub fn blob_path(data: &[u8]) -> String {
    format!("blobs/sha256/{}", &sha(data)["sha256:".len()..])
}

/// An index.json naming `manifests` (digest, size, media type, `ref.name`).
pub fn index_of(manifests: &[(Digest, usize, &str, Option<&str>)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests.iter().map(|(d, size, mt, name)| {
            let mut v = json!({"mediaType": mt, "digest": d.to_string(), "size": size});
            if let Some(n) = name {
                v["annotations"] = json!({"org.opencontainers.image.ref.name": n});
            }
            v
        }).collect::<Vec<_>>(),
    }))
    .expect("index json")
}

impl Built {
    /// Every blob of the image: layers, config, manifest.
    pub fn blobs(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = self.layers.iter().map(|(_, b)| b.as_slice()).collect();
        v.push(&self.config);
        v.push(&self.manifest);
        v
    }
}

/// An OCI archive (a tar of an image layout) of `images`, each named by its `ref.name`,
/// with `extra` blobs added (their digests real).
pub fn oci_archive(images: &[(&Built, &str)], extra: &[&[u8]]) -> Vec<u8> {
    let index = index_of(
        &images
            .iter()
            .map(|(b, n)| (b.digest, b.manifest.len(), OCI_MANIFEST, Some(*n)))
            .collect::<Vec<_>>(),
    );
    let mut blobs: Vec<(String, &[u8])> = Vec::new();
    for (b, _) in images {
        for x in b.blobs() {
            blobs.push((blob_path(x), x));
        }
    }
    for x in extra {
        blobs.push((blob_path(x), x));
    }
    blobs.sort();
    blobs.dedup();
    let mut entries: Vec<(&str, &[u8])> =
        vec![("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)];
    for (p, d) in &blobs {
        entries.push((p.as_str(), d));
    }
    entries.push(("index.json", &index));
    tar_of(&entries)
}

/// Puts `data` with `kind` into the store, checking its digest.
pub fn put(store: &Store, data: &[u8], kind: Kind) -> Digest {
    let d = store
        .put_with(data, PutOptions::default().kind(kind))
        .expect("put")
        .digest;
    assert_eq!(d, common::sha256(data));
    d
}
