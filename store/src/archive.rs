//! Import and export of image archives: OCI image layouts (directories and tars), and
//! `docker save` archives (the legacy `manifest.json` + `<id>/layer.tar` form and the
//! Docker 25+ form with an OCI layout inside).
//!
//! This module owns the translation between archive formats and store content. Import is
//! atomic: every blob is checked against its descriptor (digest and size) while it is
//! staged, and the blobs, their edges and the names are made visible by one commit, so a
//! malformed or lying archive commits nothing. Memory stays bounded: blobs stream through
//! hashing into staging files; only small blobs (under the large threshold) are held in
//! memory, up to a budget. Entry names in a tar are used only as keys, never as paths to
//! write, so a hostile archive cannot write outside the store.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::{Handle, Key};
use crate::digest::{Algorithm, Digest, DualHasher};
use crate::error::{Error, IoContext, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader};
use crate::image::{self, MAX_JSON, media};
use crate::meta::Location;
use crate::reference::Reference;
use crate::store::{Batch, Hashed, Store, check_interrupt};
/// Small blobs held in memory during one import, at most; beyond it they spill to files.
/// Also the most bytes of spilled small blobs read back at once when committing.
const MEM_BUDGET: u64 = 32 << 20;
/// Read size while streaming a blob.
const CHUNK: usize = 1 << 20;

/// Choices for an import.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Names to give the imported image (requires the archive to hold exactly one).
    pub tags: Vec<String>,
    /// Repository for images whose archive name is a bare tag (`latest`): `REPO:latest`.
    pub base_name: Option<String>,
    /// Set from another thread to stop the import: it then fails with
    /// [`Error::Interrupted`], commits nothing and removes what it staged (checked
    /// between chunks of every blob and before the commit; an import past its commit
    /// completes).
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// One imported image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImportedImage {
    /// Its manifest or index digest.
    pub digest: Digest,
    /// The names it now has (canonical form).
    pub names: Vec<String>,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportOutcome {
    /// The images, in archive order.
    pub images: Vec<ImportedImage>,
    /// Blobs in the archive that the images use.
    pub blobs: u64,
    /// Their total size.
    pub bytes: u64,
}

/// A blob received from an archive, verified, waiting for the commit.
struct Staged {
    blake3: [u8; 32],
    size: u64,
    data: StagedData,
}

enum StagedData {
    Mem(Vec<u8>),
    /// A scratch object with a record-header slot before the bytes (published as a large
    /// blob at commit when large; read back when small). No handle is kept: an archive of
    /// any number of blobs holds a bounded number of open files.
    File(Key),
}

/// Staging area of one import: scratch objects, removed when dropped.
struct Stage<'s> {
    store: &'s Store,
    /// Scratch objects this import created (those not published are removed on drop).
    created: Vec<Key>,
    mem: u64,
    blobs: HashMap<Digest, Staged>,
    /// Legacy docker archive: entry path -> digest of its content.
    by_path: HashMap<String, Digest>,
    /// Legacy docker archive: symlink entry path -> target path.
    links: HashMap<String, String>,
    /// Small JSON documents by entry path (`index.json`, `manifest.json`, `oci-layout`).
    docs: HashMap<String, Vec<u8>>,
    /// fsyncs staged files in the background while the archive is still being read.
    syncer: Syncer,
    /// The import's interrupt flag.
    interrupt: Option<Arc<AtomicBool>>,
}

/// A thread that syncs staged objects as they are finished, so that the durability of a
/// multi-layer import overlaps reading the next layers. The queue is bounded, so it holds
/// a bounded number of open files.
struct Syncer {
    tx: Option<std::sync::mpsc::SyncSender<(Key, Arc<dyn Handle>)>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Syncer {
    fn new(store: &Store) -> Syncer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Key, Arc<dyn Handle>)>(8);
        let backend = store.inner.files.backend.clone();
        let thread = std::thread::spawn(move || {
            let mut first_err = Ok(());
            for (k, h) in rx {
                if first_err.is_ok() {
                    first_err = h
                        .sync()
                        .map_err(|e| Error::io("sync", backend.display(&k), e));
                }
            }
            first_err
        });
        Syncer {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&self, k: &Key, h: Arc<dyn Handle>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((k.clone(), h));
        }
    }

    /// Waits for every sync sent so far; the first failure is returned.
    fn wait(&mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Corrupt("sync thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        let _ = self.syncer.wait();
        for k in &self.created {
            let _ = self.store.inner.files.backend.remove(k);
        }
    }
}

impl<'s> Stage<'s> {
    fn new(store: &'s Store, opts: &ImportOptions) -> Stage<'s> {
        Stage {
            interrupt: opts.interrupt.clone(),
            store,
            created: Vec::new(),
            mem: 0,
            blobs: HashMap::new(),
            by_path: HashMap::new(),
            links: HashMap::new(),
            docs: HashMap::new(),
            syncer: Syncer::new(store),
        }
    }

    /// Streams one blob from `r` (of `size` bytes, when known), hashing with `alg`.
    /// Returns its digest and size; identical content is staged once.
    fn stage(
        &mut self,
        r: &mut dyn Read,
        size: Option<u64>,
        alg: Algorithm,
    ) -> Result<(Digest, u64)> {
        let threshold = self.store.inner.opts.large_threshold;
        let in_mem = size.is_some_and(|s| s < threshold && self.mem + s <= MEM_BUDGET);
        let mut h = DualHasher::new(alg);
        let mut buf = vec![0u8; CHUNK];
        let data = if in_mem {
            let mut v = Vec::with_capacity(size.unwrap_or(0) as usize);
            loop {
                check_interrupt(self.interrupt.as_ref())?;
                let n = read_some(r, &mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                v.extend_from_slice(&buf[..n]);
            }
            self.mem += v.len() as u64;
            StagedData::Mem(v)
        } else {
            let files = &self.store.inner.files;
            let st = files.stage("import")?;
            self.created.push(st.key.clone());
            // Pipelined: while chunk k is hashed (sha256 on one core, blake3 and the write
            // on the other), this thread reads chunk k+1.
            let mut at = RECORD_HEADER_LEN;
            let mut next = vec![0u8; CHUNK];
            let mut n = read_full(r, &mut buf)?;
            while n > 0 {
                check_interrupt(self.interrupt.as_ref())?;
                let (chunk, spare, file) = (&buf[..n], &mut next, &*st.handle);
                let (written, m) = h.update_overlapped(
                    chunk,
                    || crate::backend::write_all_at(file, chunk, at),
                    || read_full(r, spare),
                );
                written.map_err(|e| files.io("write", &st.key, e))?;
                at += n as u64;
                n = m?;
                std::mem::swap(&mut buf, &mut next);
            }
            // Start making it durable now; the commit waits for all of them.
            self.syncer.send(&st.key, st.handle);
            StagedData::File(st.key)
        };
        let len = h.len();
        if let Some(s) = size
            && s != len
        {
            return Err(Error::Archive(format!(
                "entry is {len} bytes, but its header says {s}"
            )));
        }
        let (digest, blake3) = h.finish();
        if let StagedData::File(k) = &data
            && self.blobs.contains_key(&digest)
        {
            let _ = self.store.inner.files.backend.remove(k);
        } else {
            self.blobs.entry(digest).or_insert(Staged {
                blake3,
                size: len,
                data,
            });
        }
        Ok((digest, len))
    }

    /// The bytes of a small staged blob.
    fn bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let s = self
            .blobs
            .get(d)
            .ok_or_else(|| Error::Archive(format!("blob {d} is not in the archive")))?;
        if s.size > MAX_JSON {
            return Err(Error::Archive(format!(
                "{d} is {} bytes, too large for a JSON document",
                s.size
            )));
        }
        match &s.data {
            StagedData::Mem(v) => Ok(v.clone()),
            StagedData::File(k) => self.read_staged(k, 0, s.size),
        }
    }

    /// `len` bytes of a staged object from `offset` (after its header slot).
    fn read_staged(&self, k: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        let files = &self.store.inner.files;
        let h = files
            .backend
            .open(k, false)
            .map_err(|e| files.io("open", k, e))?;
        let mut v = vec![0u8; len as usize];
        h.read_at(&mut v, RECORD_HEADER_LEN + offset)
            .map_err(|e| files.io("read", k, e))?;
        Ok(v)
    }

    /// Checks a descriptor against the staged blob it names.
    fn check(&self, d: &Digest, size: u64, what: &str) -> Result<()> {
        match self.blobs.get(d) {
            None => Err(Error::Archive(format!(
                "{what} {d} is listed but not in the archive"
            ))),
            Some(s) if s.size != size => Err(Error::Archive(format!(
                "{what} {d} is {} bytes, but its descriptor says {size}",
                s.size
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Reads one tar stream into the stage.
    fn read_tar(&mut self, r: impl Read) -> Result<()> {
        let mut ar = tar::Archive::new(r);
        let entries = ar.entries().map_err(|e| tar_err(&e))?;
        for e in entries {
            check_interrupt(self.interrupt.as_ref())?;
            let mut e = e.map_err(|e| tar_err(&e))?;
            let path = e.path().map_err(|e| tar_err(&e))?;
            let path = normalize(&path.to_string_lossy())?;
            let ty = e.header().entry_type();
            if ty.is_symlink() || ty.is_hard_link() {
                if let Some(target) = e.link_name().map_err(|e| tar_err(&e))? {
                    let t = target.to_string_lossy().into_owned();
                    let t = if ty.is_symlink() {
                        resolve_link(&path, &t)?
                    } else {
                        normalize(&t)?
                    };
                    self.links.insert(path, t);
                }
                continue;
            }
            if !ty.is_file() {
                continue;
            }
            let size = e.size();
            match path.as_str() {
                "oci-layout" | "index.json" | "manifest.json" | "repositories" => {
                    if size > MAX_JSON {
                        return Err(Error::Archive(format!("{path} is {size} bytes")));
                    }
                    let mut v = Vec::with_capacity(size as usize);
                    e.read_to_end(&mut v).map_err(|e| tar_err(&e))?;
                    self.docs.insert(path, v);
                }
                p => {
                    let named = blob_path_digest(p);
                    let alg = named.map_or(Algorithm::Sha256, |d| d.algorithm());
                    let (d, _) = self.stage(&mut e, Some(size), alg)?;
                    if let Some(want) = named
                        && want != d
                    {
                        return Err(Error::Archive(format!(
                            "{p} holds content with digest {d}, but its name says {want}"
                        )));
                    }
                    self.by_path.insert(path, d);
                }
            }
        }
        Ok(())
    }

    /// Follows symlinks between entries (legacy docker archives link duplicate layers).
    fn path_digest(&self, path: &str) -> Result<Digest> {
        let mut p = normalize(path)?;
        for _ in 0..16 {
            if let Some(d) = self.by_path.get(&p) {
                return Ok(*d);
            }
            match self.links.get(&p) {
                Some(t) => p.clone_from(t),
                None => break,
            }
        }
        Err(Error::Archive(format!("{path} is not in the archive")))
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let m = read_some(r, &mut buf[n..])?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Ok(n)
}

fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(tar_err(&e)),
        }
    }
}

fn tar_err(e: &std::io::Error) -> Error {
    Error::Archive(format!("reading the archive: {e}"))
}

/// Normalises an entry path (`./a//b` -> `a/b`); refuses absolute paths and `..`.
fn normalize(p: &str) -> Result<String> {
    let mut out: Vec<&str> = Vec::new();
    if p.starts_with('/') {
        return Err(Error::Archive(format!("absolute path {p:?} in archive")));
    }
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Error::Archive(format!("path {p:?} leaves the archive"))),
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

/// The target of a symlink entry at `from`, as an archive path.
fn resolve_link(from: &str, target: &str) -> Result<String> {
    if target.starts_with('/') {
        return Err(Error::Archive(format!(
            "symlink {from:?} points outside the archive"
        )));
    }
    let mut parts: Vec<&str> = from.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(Error::Archive(format!(
                        "symlink {from:?} points outside the archive"
                    )));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// `blobs/<alg>/<hex>` -> the digest its name promises.
fn blob_path_digest(p: &str) -> Option<Digest> {
    let rest = p.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// An image found in an archive: its top digest, the names the archive gives it.
struct Found {
    digest: Digest,
    names: Vec<String>,
    /// Bare tags (`latest`) that need a base name.
    bare: Vec<String>,
}

impl Store {
    /// Imports an OCI layout directory, or a tar file (OCI archive or `docker save`).
    #[tracing::instrument(level = "info", name = "import", skip(self, opts), fields(path = %path.display()))]
    pub fn import_path(&self, path: &Path, opts: &ImportOptions) -> Result<ImportOutcome> {
        let meta = std::fs::metadata(path).ctx("stat", path)?;
        if meta.is_dir() {
            return self.import_dir(path, opts);
        }
        let f = File::open(path).ctx("open", path)?;
        self.import_tar(std::io::BufReader::with_capacity(CHUNK, f), opts)
    }

    /// Imports a tar stream (OCI archive or `docker save`, as written by skopeo, umoci,
    /// Docker or `store export`).
    pub fn import_tar(&self, r: impl Read, opts: &ImportOptions) -> Result<ImportOutcome> {
        let mut st = Stage::new(self, opts);
        st.read_tar(r)?;
        self.finish_import(st, opts)
    }

    /// Imports an OCI image layout directory. Only blobs that the index reaches are read;
    /// each must be a regular file (a symlink is refused).
    pub fn import_dir(&self, dir: &Path, opts: &ImportOptions) -> Result<ImportOutcome> {
        let mut st = Stage::new(self, opts);
        for doc in ["oci-layout", "index.json", "manifest.json"] {
            let p = dir.join(doc);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() && m.len() <= MAX_JSON => {
                    st.docs
                        .insert(doc.to_owned(), std::fs::read(&p).ctx("read", &p)?);
                }
                Ok(_) => {
                    return Err(Error::Archive(format!(
                        "{} is not a regular file",
                        p.display()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat", &p, e)),
            }
        }
        if !st.docs.contains_key("index.json") {
            return Err(Error::Archive(format!(
                "{} is not an OCI image layout (no index.json)",
                dir.display()
            )));
        }
        // Walk the graph, staging each blob as it is needed (JSON first, to find the rest).
        let index = st.docs["index.json"].clone();
        let mut queue: Vec<(Digest, u64, Kind)> = image::parse(&index)
            .map_err(|e| Error::Archive(format!("index.json: {e}")))?
            .children
            .iter()
            .map(|c| (c.digest, c.size, c.kind))
            .collect();
        // A digest reached as a manifest or index is staged and parsed as one, whatever
        // else names it (a manifest may also be listed as another's layer).
        let mut parsed = HashSet::new();
        let mut layers: HashMap<Digest, u64> = HashMap::new();
        while let Some((d, size, kind)) = queue.pop() {
            if matches!(kind, Kind::Layer) {
                layers.insert(d, size);
                continue;
            }
            if !parsed.insert(d) {
                continue;
            }
            stage_file(&mut st, dir, &d, size)?;
            if matches!(kind, Kind::Manifest | Kind::Index) {
                let p = image::parse(&st.bytes(&d)?)
                    .map_err(|e| Error::Archive(format!("{d}: {e}")))?;
                for c in &p.children {
                    queue.push((c.digest, c.size, c.kind));
                }
            }
        }
        // Layers are the bulk: read them in parallel.
        let layers: Vec<(Digest, u64)> = layers
            .into_iter()
            .filter(|(d, _)| !st.blobs.contains_key(d))
            .collect();
        let staged: Vec<Result<Stage1>> = {
            use rayon::prelude::*;
            layers
                .par_iter()
                .map(|(d, size)| stage_layer_file(self, dir, d, *size, st.interrupt.as_ref()))
                .collect()
        };
        for s in staged.iter().flatten() {
            st.created.push(s.key.clone());
        }
        for s in staged {
            let s = s?;
            st.blobs.insert(
                s.digest,
                Staged {
                    blake3: s.blake3,
                    size: s.size,
                    data: StagedData::File(s.key),
                },
            );
        }
        self.finish_import(st, opts)
    }

    /// Interprets the staged archive, checks every descriptor, and commits blobs, edges
    /// and names in one transaction.
    #[tracing::instrument(level = "debug", name = "import_commit", skip_all, fields(blobs = st.blobs.len()))]
    fn finish_import(&self, mut st: Stage<'_>, opts: &ImportOptions) -> Result<ImportOutcome> {
        let mut kinds: HashMap<Digest, Kind> = HashMap::new();
        let mut found = Vec::new();
        if let Some(index) = st.docs.get("index.json").cloned() {
            if let Some(layout) = st.docs.get("oci-layout") {
                check_layout(layout)?;
            }
            let idx =
                image::parse(&index).map_err(|e| Error::Archive(format!("index.json: {e}")))?;
            if idx.kind != Kind::Index {
                return Err(Error::Archive("index.json is not an image index".into()));
            }
            let repo_tags = docker_repo_tags(&st)?;
            for (c, (ref_name, containerd_name)) in idx.children.iter().zip(&idx.ref_names) {
                st.check(&c.digest, c.size, "manifest")?;
                let mut f = Found {
                    digest: c.digest,
                    names: Vec::new(),
                    bare: Vec::new(),
                };
                if let Some(n) = containerd_name {
                    f.names.push(n.clone());
                } else if let Some(n) = ref_name {
                    if n.contains('/') || n.contains(':') || n.contains('@') {
                        f.names.push(n.clone());
                    } else {
                        f.bare.push(n.clone());
                    }
                }
                found.push(f);
            }
            // Walk and check everything the index reaches. A digest reached as a manifest
            // or index is parsed as one, whatever else names it (its config and layers
            // must be there too), and keeps that kind.
            let mut queue: Vec<(Digest, Kind)> =
                idx.children.iter().map(|c| (c.digest, c.kind)).collect();
            let mut parsed = HashSet::new();
            while let Some((d, kind_hint)) = queue.pop() {
                if !parsed.insert(d) {
                    continue;
                }
                let bytes = st.bytes(&d)?;
                let p = image::parse(&bytes)
                    .map_err(|e| Error::Archive(format!("{d} ({}): {e}", kind_hint.name())))?;
                kinds.insert(d, p.kind);
                for c in &p.children {
                    if c.media_type == media::DOCKER_FOREIGN_LAYER
                        && !st.blobs.contains_key(&c.digest)
                    {
                        continue;
                    }
                    st.check(&c.digest, c.size, c.kind.name())?;
                    match c.kind {
                        Kind::Manifest | Kind::Index => queue.push((c.digest, c.kind)),
                        k => {
                            kinds.entry(c.digest).or_insert(k);
                        }
                    }
                }
                if p.kind == Kind::Manifest
                    && let Some(cfg) = p.config()
                    && let Some(tags) = repo_tags.get(&cfg.digest)
                {
                    for f in found
                        .iter_mut()
                        .filter(|f| f.digest == d && f.names.is_empty())
                    {
                        f.names.extend(tags.iter().cloned());
                    }
                }
            }
        } else if let Some(mj) = st.docs.get("manifest.json").cloned() {
            // Legacy `docker save`: write an OCI manifest for each image.
            for entry in parse_docker_manifest(&mj)? {
                let config = st.path_digest(&entry.config)?;
                let config_size = st.blobs[&config].size;
                kinds.insert(config, Kind::Config);
                // The archive carries no layer digests of its own: check each plain-tar
                // layer against the config's diff_ids (a compressed one's diff_id is over
                // its decompressed bytes, which `verify --deep` checks).
                let info = image::parse_config(&st.bytes(&config)?)
                    .map_err(|e| Error::Archive(format!("{}: {e}", entry.config)))?;
                if info.diff_ids.len() != entry.layers.len() {
                    return Err(Error::Archive(format!(
                        "{} lists {} layers, but its config has {} diff_ids",
                        entry.config,
                        entry.layers.len(),
                        info.diff_ids.len()
                    )));
                }
                let mut layers = Vec::new();
                for (l, diff_id) in entry.layers.iter().zip(&info.diff_ids) {
                    let d = st.path_digest(l)?;
                    let size = st.blobs[&d].size;
                    let media_type =
                        image::Compression::sniff(&st.bytes_prefix(&d)?).layer_media_type();
                    if media_type == media::OCI_LAYER && d.to_string() != *diff_id {
                        return Err(Error::Archive(format!(
                            "layer {l} hashes to {d}, but the config's diff_id is {diff_id}"
                        )));
                    }
                    kinds.insert(d, Kind::Layer);
                    layers.push(serde_json::json!({
                        "mediaType": media_type,
                        "digest": d.to_string(),
                        "size": size,
                    }));
                }
                let manifest = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": media::OCI_MANIFEST,
                    "config": {
                        "mediaType": media::OCI_CONFIG,
                        "digest": config.to_string(),
                        "size": config_size,
                    },
                    "layers": layers,
                });
                let bytes = serde_json::to_vec_pretty(&manifest)
                    .map_err(|e| Error::Archive(e.to_string()))?;
                let (d, _) = st.stage(
                    &mut bytes.as_slice(),
                    Some(bytes.len() as u64),
                    Algorithm::Sha256,
                )?;
                kinds.insert(d, Kind::Manifest);
                found.push(Found {
                    digest: d,
                    names: entry.repo_tags.clone(),
                    bare: Vec::new(),
                });
            }
        } else {
            return Err(Error::Archive(
                "neither an OCI layout (index.json) nor a docker archive (manifest.json)".into(),
            ));
        }
        if found.is_empty() {
            return Err(Error::Archive("the archive holds no image".into()));
        }

        // Names: the archive's, or --tag, or base name + bare tag.
        let mut names: Vec<(String, Digest)> = Vec::new();
        let mut images = Vec::new();
        if !opts.tags.is_empty() {
            let tops: HashSet<Digest> = found.iter().map(|f| f.digest).collect();
            if tops.len() != 1 {
                return Err(Error::Invalid(format!(
                    "--tag needs an archive with one image; this one has {}",
                    tops.len()
                )));
            }
        }
        for f in &found {
            let mut these = Vec::new();
            for n in &f.names {
                these.extend(tag_name(n, &f.digest)?);
            }
            for t in &f.bare {
                if let Some(base) = &opts.base_name {
                    these.extend(tag_name(
                        &Reference::parse(base)?.with_tag(t)?.canonical(),
                        &f.digest,
                    )?);
                }
            }
            for t in &opts.tags {
                let r = Reference::parse(t)?;
                if r.digest().is_some() {
                    return Err(Error::Invalid(format!(
                        "--tag {t}: a name is a tag, not a digest reference"
                    )));
                }
                these.push(r.canonical());
            }
            these.sort();
            these.dedup();
            if these.is_empty() {
                let hint = if f.bare.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (its archive name is the bare tag {:?}: pass --base-name REPO)",
                        f.bare[0]
                    )
                };
                return Err(Error::Invalid(format!(
                    "image {} in the archive has no name{hint}; pass --tag NAME",
                    f.digest
                )));
            }
            names.extend(these.iter().map(|n| (n.clone(), f.digest)));
            match images
                .iter_mut()
                .find(|i: &&mut ImportedImage| i.digest == f.digest)
            {
                Some(i) => i.names.extend(these),
                None => images.push(ImportedImage {
                    digest: f.digest,
                    names: these,
                }),
            }
        }

        // Commit: only what the images use, in one batch.
        let mut outcome = ImportOutcome {
            images,
            ..ImportOutcome::default()
        };
        st.syncer.wait()?;
        check_interrupt(st.interrupt.as_ref())?;
        let mut ordered: Vec<Digest> = kinds.keys().copied().collect();
        ordered.sort();
        // Blobs the store has already are not written again. A collection running now
        // could delete one of them before the commit and leave a named image incomplete,
        // so they are first held by a short lease (one transaction, which also tells which
        // are really there); what turns out gone is stored from the stage instead.
        let mut existing: HashSet<Digest> = {
            let snap = self.snapshot()?;
            let mut e = HashSet::new();
            for d in &ordered {
                if snap.stat(d)?.is_some() {
                    e.insert(*d);
                }
            }
            e
        };
        let guard = if existing.is_empty() {
            None
        } else {
            let lease = self.lease_create(Some(std::time::Duration::from_secs(3600)))?;
            let held = LeaseGuard {
                store: self,
                id: lease.id,
            };
            let mut list: Vec<Digest> = existing.iter().copied().collect();
            list.sort();
            let o = self
                .inner
                .meta
                .submit(crate::meta::Op::Put(crate::meta::PutOp {
                    touch: list,
                    lease: Some(held.id.clone()),
                    ..crate::meta::PutOp::default()
                }))?;
            for d in o.missing {
                existing.remove(&d);
            }
            Some(held)
        };
        let mut batch = Batch::new(&self.inner);
        batch.names = names;
        let mut small: Vec<(Digest, u64, [u8; 32], Kind)> = Vec::new();
        let mut large: Vec<(Key, Digest, [u8; 32], u64, Kind)> = Vec::new();
        let threshold = self.inner.opts.large_threshold;
        let files = &self.inner.files;
        for d in &ordered {
            let s = &st.blobs[d];
            let kind = kinds[d];
            outcome.blobs += 1;
            outcome.bytes += s.size;
            if existing.contains(d) && !matches!(kind, Kind::Manifest | Kind::Index) {
                // Refreshed in the commit, like any put of existing content. (Manifests
                // go through the batch: one stored plainly gains its edges.)
                batch.touch_existing(*d);
                continue;
            }
            match &s.data {
                StagedData::File(k)
                    if s.size >= threshold && !matches!(kind, Kind::Manifest | Kind::Index) =>
                {
                    large.push((k.clone(), *d, s.blake3, s.size, kind));
                }
                _ => small.push((*d, s.size, s.blake3, kind)),
            }
        }
        // Large files are published a bounded number at a time (open files), each group's
        // names made durable together.
        for group in large.chunks(64) {
            let mut handles = Vec::with_capacity(group.len());
            for (k, d, blake3, size, kind) in group {
                let h = files
                    .backend
                    .open(k, true)
                    .map_err(|e| files.io("open", k, e))?;
                let header = RecordHeader {
                    digest: *d,
                    kind: *kind,
                    flags: 0,
                    stored_len: *size,
                    raw_len: *size,
                    blake3: *blake3,
                };
                crate::backend::write_all_at(&*h, &header.encode(), 0)
                    .map_err(|e| files.io("write", k, e))?;
                handles.push(h);
            }
            let items: Vec<(&Key, &dyn Handle, Digest)> = group
                .iter()
                .zip(&handles)
                .map(|((k, d, ..), h)| (k, &**h, *d))
                .collect();
            let gens = files.publish(&items)?;
            for ((_, d, blake3, size, kind), generation) in group.iter().zip(gens) {
                let it = Hashed {
                    data: &[],
                    digest: *d,
                    blake3: *blake3,
                    kind: *kind,
                };
                batch.add_installed(&it, *size, Location::Large { generation })?;
            }
        }
        // Small blobs go to the batch's shard in groups, so that spilled ones are read back
        // a budget's worth at a time.
        let mut start = 0;
        while start < small.len() {
            let (mut end, mut bytes) = (start, 0);
            while end < small.len() && (end == start || bytes + small[end].1 <= MEM_BUDGET) {
                bytes += small[end].1;
                end += 1;
            }
            let data: Vec<std::borrow::Cow<'_, [u8]>> = small[start..end]
                .iter()
                .map(|(d, ..)| st.bytes_any(d))
                .collect::<Result<_>>()?;
            let items: Vec<Hashed<'_>> = small[start..end]
                .iter()
                .zip(&data)
                .map(|((d, _, b3, kind), data)| Hashed {
                    data,
                    digest: *d,
                    blake3: *b3,
                    kind: *kind,
                })
                .collect();
            batch.add(&items)?;
            start = end;
        }
        let committed = batch.commit()?;
        drop(guard);
        if !committed.missing.is_empty() {
            // Held by the lease: only a forced removal (`verify --repair`) gets here.
            return Err(Error::Archive(format!(
                "{} blob(s) the import relied on were removed while it committed (by \
                 `verify --repair`?); run it again",
                committed.missing.len()
            )));
        }
        Ok(outcome)
    }
}

/// The name an archive's reference `n` gives `image`: a tag reference as it is; one
/// pinned to the image's own digest by its tag part (`repo:tag@sha256:…` → `repo:tag`),
/// or none if it has no tag (the image is reachable by digest anyway). A reference
/// pinned to another digest is refused: the archive contradicts itself.
fn tag_name(n: &str, image: &Digest) -> Result<Option<String>> {
    let r = Reference::parse(n)?;
    match r.digest() {
        None => Ok(Some(r.canonical())),
        Some(d) if d != image => Err(Error::Archive(format!(
            "the archive names image {image} {n:?}, a reference to another digest"
        ))),
        Some(_) => match r.tag() {
            Some(t) => Ok(Some(format!("{}:{t}", r.name()))),
            None => Ok(None),
        },
    }
}

/// [`Error::Interrupted`] once `flag` is set.
fn stop_if(flag: &AtomicBool) -> Result<()> {
    if flag.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Removes the import's short lease when the import ends, however it ends (a crash leaves
/// it to expire).
struct LeaseGuard<'s> {
    store: &'s Store,
    id: String,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        let _ = self.store.lease_remove(&self.id);
    }
}

/// Staging result of one layer file read on a worker.
struct Stage1 {
    digest: Digest,
    blake3: [u8; 32],
    size: u64,
    key: Key,
}

fn layout_blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join(d.algorithm().name()).join(d.hex())
}

fn open_layout_blob(dir: &Path, d: &Digest) -> Result<(PathBuf, File, u64)> {
    let p = layout_blob_path(dir, d);
    let m = std::fs::symlink_metadata(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::Archive(format!("blob {d} is listed but not in the layout"))
        }
        _ => Error::io("stat", &p, e),
    })?;
    if !m.is_file() {
        return Err(Error::Archive(format!(
            "{} is not a regular file",
            p.display()
        )));
    }
    let f = File::open(&p).ctx("open", &p)?;
    Ok((p, f, m.len()))
}

/// Stages a (small, JSON) blob of a layout directory through the stage.
fn stage_file(st: &mut Stage<'_>, dir: &Path, d: &Digest, size: u64) -> Result<()> {
    if st.blobs.contains_key(d) {
        return Ok(());
    }
    let (p, mut f, len) = open_layout_blob(dir, d)?;
    if len != size {
        return Err(Error::Archive(format!(
            "{} is {len} bytes, but its descriptor says {size}",
            p.display()
        )));
    }
    let (got, _) = st.stage(&mut f, Some(len), d.algorithm())?;
    if got != *d {
        return Err(Error::Archive(format!(
            "{} hashes to {got}, not to the digest its name says",
            layout_blob_path(dir, d).display()
        )));
    }
    Ok(())
}

/// Reads, hashes and stages one layer of a layout directory into a scratch object (on a
/// worker thread; the caller merges the results). The object is closed when this returns.
fn stage_layer_file(
    store: &Store,
    dir: &Path,
    d: &Digest,
    size: u64,
    interrupt: Option<&Arc<AtomicBool>>,
) -> Result<Stage1> {
    let (p, mut f, len) = open_layout_blob(dir, d)?;
    if len != size {
        return Err(Error::Archive(format!(
            "{} is {len} bytes, but its descriptor says {size}",
            p.display()
        )));
    }
    let files = &store.inner.files;
    let st = files.stage("layer")?;
    let r = (|| {
        let mut h = DualHasher::new(d.algorithm());
        let mut buf = vec![0u8; CHUNK];
        let mut at = RECORD_HEADER_LEN;
        loop {
            check_interrupt(interrupt)?;
            let n = f.read(&mut buf).ctx("read", &p)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            crate::backend::write_all_at(&*st.handle, &buf[..n], at)
                .map_err(|e| files.io("write", &st.key, e))?;
            at += n as u64;
        }
        let (got, blake3) = h.finish();
        if got != *d {
            return Err(Error::Archive(format!(
                "{} hashes to {got}, not to the digest its name says",
                p.display()
            )));
        }
        Ok((got, blake3))
    })();
    match r {
        Ok((digest, blake3)) => Ok(Stage1 {
            digest,
            blake3,
            size: len,
            key: st.key,
        }),
        Err(e) => {
            let _ = files.backend.remove(&st.key);
            Err(e)
        }
    }
}

impl Stage<'_> {
    /// The bytes of any staged blob (small enough to append to a pack).
    fn bytes_any(&self, d: &Digest) -> Result<std::borrow::Cow<'_, [u8]>> {
        let s = &self.blobs[d];
        match &s.data {
            StagedData::Mem(v) => Ok(std::borrow::Cow::Borrowed(v)),
            StagedData::File(k) => Ok(std::borrow::Cow::Owned(self.read_staged(k, 0, s.size)?)),
        }
    }

    /// The first bytes of a staged blob (to sniff compression).
    fn bytes_prefix(&self, d: &Digest) -> Result<Vec<u8>> {
        let s = &self.blobs[d];
        let n = s.size.min(8) as usize;
        match &s.data {
            StagedData::Mem(v) => Ok(v[..n].to_vec()),
            StagedData::File(k) => self.read_staged(k, 0, n as u64),
        }
    }
}

fn check_layout(bytes: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let l: Layout =
        serde_json::from_slice(bytes).map_err(|e| Error::Archive(format!("oci-layout: {e}")))?;
    if !l.version.starts_with("1.") {
        return Err(Error::Archive(format!(
            "unsupported image layout version {}",
            l.version
        )));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn parse_docker_manifest(bytes: &[u8]) -> Result<Vec<DockerEntry>> {
    // Seen in the wild: `null` instead of an array.
    let v: Option<Vec<Option<DockerEntry>>> =
        serde_json::from_slice(bytes).map_err(|e| Error::Archive(format!("manifest.json: {e}")))?;
    Ok(v.unwrap_or_default().into_iter().flatten().collect())
}

/// Docker 25+ archives: `manifest.json` `RepoTags` by config digest.
fn docker_repo_tags(st: &Stage<'_>) -> Result<HashMap<Digest, Vec<String>>> {
    let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
    if let Some(mj) = st.docs.get("manifest.json") {
        for e in parse_docker_manifest(mj)? {
            if let Ok(d) = st.path_digest(&e.config) {
                out.entry(d).or_default().extend(e.repo_tags);
            }
        }
    }
    Ok(out)
}

/// A name as a docker archive's `RepoTags` lists it: Docker's familiar form, unless that
/// reads back as another name (`docker.io/my.org/app:1` would become `my.org/app:1` on
/// registry `my.org`); then the canonical form, which `docker load` reads the same way.
fn repo_tag(r: &Reference) -> String {
    let familiar = r.familiar();
    if Reference::parse(&familiar).as_ref() == Ok(r) {
        familiar
    } else {
        r.canonical()
    }
}

/// Archive formats `store export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout in a tar (what `skopeo copy oci-archive:` reads).
    Oci,
    /// A `docker save` archive: an OCI layout plus `manifest.json` (the Docker 25+ form).
    Docker,
    /// An OCI image layout directory.
    OciDir,
}

/// One image chosen for export.
struct Chosen {
    reference: Option<Reference>,
    digest: Digest,
}

impl Store {
    fn choose(&self, refs: &[String]) -> Result<Vec<Chosen>> {
        refs.iter()
            .map(|r| {
                let digest = self.resolve(r)?;
                let reference = if Digest::parse(r).is_ok() {
                    None
                } else {
                    Some(Reference::parse(r)?)
                };
                Ok(Chosen { reference, digest })
            })
            .collect()
    }

    /// Every blob reachable from `roots`, parents before children, each once.
    fn reachable(&self, roots: &[Digest]) -> Result<Vec<Digest>> {
        let txn = self.inner.meta.read()?;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut queue: Vec<Digest> = roots.to_vec();
        while let Some(d) = queue.pop() {
            if !seen.insert(d) {
                continue;
            }
            if crate::meta::Meta::entry(&txn, &d)?.is_none() {
                return Err(Error::MissingChildren {
                    parent: roots[0],
                    missing: vec![d],
                });
            }
            out.push(d);
            queue.extend(crate::meta::Meta::children(&txn, &d)?);
        }
        Ok(out)
    }

    /// The index.json and the blob list for an export.
    fn export_plan(&self, refs: &[String]) -> Result<(Vec<u8>, Vec<Digest>, Vec<Chosen>)> {
        let chosen = self.choose(refs)?;
        let mut manifests = Vec::new();
        for c in &chosen {
            let info = self.stat(&c.digest)?.ok_or(Error::NotFound(c.digest))?;
            let blob = self.get(&c.digest)?;
            let media_type = match serde_json::from_slice::<serde_json::Value>(&blob)
                .ok()
                .and_then(|v| {
                    v.get("mediaType")
                        .and_then(|m| m.as_str().map(str::to_owned))
                }) {
                Some(m) => m,
                None if info.kind == Kind::Index => media::OCI_INDEX.to_owned(),
                None => media::OCI_MANIFEST.to_owned(),
            };
            let mut desc = serde_json::json!({
                "mediaType": media_type,
                "digest": c.digest.to_string(),
                "size": info.size,
            });
            if let Some(r) = &c.reference {
                let mut ann = serde_json::Map::new();
                ann.insert("io.containerd.image.name".into(), r.canonical().into());
                if let Some(t) = r.tag() {
                    ann.insert("org.opencontainers.image.ref.name".into(), t.into());
                }
                desc["annotations"] = ann.into();
            }
            manifests.push(desc);
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": manifests,
        });
        let index = serde_json::to_vec(&index).map_err(|e| Error::Archive(e.to_string()))?;
        let roots: Vec<Digest> = chosen.iter().map(|c| c.digest).collect();
        let blobs = self.reachable(&roots)?;
        Ok((index, blobs, chosen))
    }

    /// Writes the images named by `refs` as an archive to `out` (byte-exact blobs).
    pub fn export(&self, refs: &[String], format: ExportFormat, out: impl Write) -> Result<()> {
        self.export_with(refs, format, out, &AtomicBool::new(false))
    }

    /// [`Store::export`] that stops with [`Error::Interrupted`] once `interrupt` is set
    /// (checked before every blob): what was written to `out` by then is a cut-short
    /// archive, which [`Store::export_path`] never lets anyone see.
    #[tracing::instrument(level = "info", name = "export", skip(self, out, interrupt))]
    pub fn export_with(
        &self,
        refs: &[String],
        format: ExportFormat,
        out: impl Write,
        interrupt: &AtomicBool,
    ) -> Result<()> {
        let (index, blobs, chosen) = self.export_plan(refs)?;
        // Everything that can be refused is checked before the first byte is written.
        let docker_manifest = if format == ExportFormat::Docker {
            Some(self.docker_manifest(&chosen)?)
        } else {
            None
        };
        let mut tar = tar::Builder::new(out);
        let io = |e: std::io::Error| Error::io("write", "archive", e);
        append(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
        let mut dirs = BTreeSet::new();
        for d in &blobs {
            stop_if(interrupt)?;
            let dir = format!("blobs/{}/", d.algorithm().name());
            if dirs.insert(dir.clone()) {
                append_dir(&mut tar, &dir).map_err(io)?;
            }
            let blob = self.get(d)?;
            append(&mut tar, &format!("{dir}{}", d.hex()), &blob).map_err(io)?;
        }
        append(&mut tar, "index.json", &index).map_err(io)?;
        if let Some(mj) = docker_manifest {
            append(&mut tar, "manifest.json", &mj).map_err(io)?;
        }
        tar.into_inner().map_err(io)?.flush().map_err(io)
    }

    /// Exports to the file or directory `path` so that it appears whole or not at all: an
    /// archive is written to a temporary file beside it, synced and renamed over `path`;
    /// an OCI layout directory ([`ExportFormat::OciDir`]) is built beside it and renamed
    /// into place (`path` must not exist or be an empty directory). An error or an
    /// interrupt removes the temporary.
    pub fn export_path(
        &self,
        refs: &[String],
        format: ExportFormat,
        path: &Path,
        interrupt: &AtomicBool,
    ) -> Result<()> {
        if format == ExportFormat::OciDir {
            return self.export_dir_with(refs, path, interrupt);
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).ctx("create", dir)?;
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        self.export_with(refs, format, &mut w, interrupt)?;
        w.flush().ctx("write", path)?;
        drop(w);
        tmp.as_file().sync_all().ctx("fsync", tmp.path())?;
        tmp.persist(path)
            .map_err(|e| Error::io("rename", path, e.error))?;
        Ok(())
    }

    /// Writes the images named by `refs` as an OCI image layout directory `dir` (created;
    /// it must not exist or be empty).
    pub fn export_dir(&self, refs: &[String], dir: &Path) -> Result<()> {
        self.export_dir_with(refs, dir, &AtomicBool::new(false))
    }

    /// [`Store::export_dir`], built in a directory beside `dir` and renamed into place,
    /// so that `dir` appears whole or not at all; stops with [`Error::Interrupted`] once
    /// `interrupt` is set (checked before every blob).
    #[tracing::instrument(level = "info", name = "export_dir", skip(self, interrupt), fields(dir = %dir.display()))]
    pub fn export_dir_with(
        &self,
        refs: &[String],
        dir: &Path,
        interrupt: &AtomicBool,
    ) -> Result<()> {
        if dir.exists() && std::fs::read_dir(dir).ctx("list", dir)?.next().is_some() {
            return Err(Error::Invalid(format!("{} is not empty", dir.display())));
        }
        let (index, blobs, _) = self.export_plan(refs)?;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).ctx("create directory", parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".export-")
            .tempdir_in(parent)
            .ctx("create directory", parent)?;
        let t = tmp.path();
        // Every file and directory is synced before the rename, and the parent after it:
        // a layout that survives a crash is whole.
        let write = |p: &Path, data: &[u8]| -> Result<()> {
            let mut f = File::create(p).ctx("create", p)?;
            f.write_all(data).ctx("write", p)?;
            f.sync_all().ctx("fsync", p)
        };
        write(&t.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut made = BTreeSet::new();
        for d in &blobs {
            stop_if(interrupt)?;
            let bdir = t.join("blobs").join(d.algorithm().name());
            if made.insert(bdir.clone()) {
                std::fs::create_dir_all(&bdir).ctx("create directory", &bdir)?;
            }
            write(&bdir.join(d.hex()), &self.get(d)?)?;
        }
        write(&t.join("index.json"), &index)?;
        for bdir in &made {
            crate::sys::sync_dir(bdir).ctx("fsync", bdir)?;
        }
        let blobs_dir = t.join("blobs");
        if !made.is_empty() {
            crate::sys::sync_dir(&blobs_dir).ctx("fsync", &blobs_dir)?;
        }
        // A layout directory is 0755 like any `mkdir`, not a tempdir's 0700.
        std::fs::set_permissions(t, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .ctx("chmod", t)?;
        crate::sys::sync_dir(t).ctx("fsync", t)?;
        // rename(2) replaces an empty directory, and refuses a non-empty one.
        std::fs::rename(t, dir).ctx("rename", dir)?;
        // Renamed away: nothing is left for the guard to remove.
        let _ = tmp.keep();
        crate::sys::sync_dir(parent).ctx("fsync", parent)
    }

    /// The `manifest.json` of a docker archive for `chosen` (single-platform images only).
    fn docker_manifest(&self, chosen: &[Chosen]) -> Result<Vec<u8>> {
        let mut entries = Vec::new();
        for c in chosen {
            let m = self.get(&c.digest)?;
            let p = image::parse(&m)?;
            if p.kind != Kind::Manifest {
                return Err(Error::Invalid(format!(
                    "{} is an index; the docker format holds single-platform images \
                     (export the platform's manifest digest)",
                    c.digest
                )));
            }
            let path = |d: &Digest| format!("blobs/{}/{}", d.algorithm().name(), d.hex());
            let config = p
                .config()
                .ok_or_else(|| Error::Corrupt("manifest without config".into()))?;
            entries.push(serde_json::json!({
                "Config": path(&config.digest),
                "RepoTags": c.reference.iter().filter(|r| r.tag().is_some()).map(repo_tag).collect::<Vec<_>>(),
                "Layers": p.layers().iter().map(|l| path(&l.digest)).collect::<Vec<_>>(),
            }));
        }
        serde_json::to_vec(&entries).map_err(|e| Error::Archive(e.to_string()))
    }
}

fn header(size: u64, ty: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = header(data.len() as u64, tar::EntryType::Regular, 0o644);
    tar.append_data(&mut h, path, data)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> std::io::Result<()> {
    let mut h = header(0, tar::EntryType::Directory, 0o755);
    tar.append_data(&mut h, path, std::io::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_confined() {
        assert_eq!(normalize("./blobs//sha256/ab").unwrap(), "blobs/sha256/ab");
        assert!(normalize("/etc/passwd").is_err());
        assert!(normalize("a/../../x").is_err());
        assert_eq!(
            resolve_link("a/layer.tar", "../b/layer.tar").unwrap(),
            "b/layer.tar"
        );
        assert!(resolve_link("a/layer.tar", "../../x").is_err());
        assert!(resolve_link("a/layer.tar", "/x").is_err());
    }

    #[test]
    fn blob_paths_name_digests() {
        let hex = "a".repeat(64);
        assert_eq!(
            blob_path_digest(&format!("blobs/sha256/{hex}"))
                .unwrap()
                .hex(),
            hex
        );
        assert!(blob_path_digest("blobs/sha256/zz").is_none());
        assert!(blob_path_digest("other/sha256/aa").is_none());
    }

    #[test]
    fn docker_manifest_null_is_empty() {
        assert!(parse_docker_manifest(b"null").unwrap().is_empty());
        assert!(parse_docker_manifest(b"[null]").unwrap().is_empty());
        assert!(parse_docker_manifest(b"{").is_err());
    }

    #[test]
    fn layer_types_by_magic() {
        let mt = |p: &[u8]| image::Compression::sniff(p).layer_media_type();
        assert_eq!(mt(&[0x1f, 0x8b, 8]), media::OCI_LAYER_GZIP);
        assert_eq!(mt(&[0x28, 0xb5, 0x2f, 0xfd]), media::OCI_LAYER_ZSTD);
        assert_eq!(mt(b"ustar"), media::OCI_LAYER);
    }
}
