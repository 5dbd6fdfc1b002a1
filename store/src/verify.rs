//! Integrity checks at three depths, and repair.
//!
//! This module owns the question "is what the store holds what the index says?". `Fast`
//! re-hashes stored bytes with blake3 against the index; `Digest` (the default)
//! recomputes every blob's OCI digest and size and checks its record header; `Deep` adds
//! decompression of every layer against its config's `diff_ids`, parsing of every
//! manifest, index and config, the graph (children exist, reference counts and holds equal
//! their recomputed values), segment record headers, and orphan files. Every finding is
//! collected (it never stops at the first), in parallel across blobs. It changes nothing
//! unless asked to repair: corrupt blobs are then moved to `quarantine/` and out of the
//! index (a re-import or re-pull restores them), and counts are rebuilt from the edges.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use redb::{ReadableMultimapTable, ReadableTable};

use crate::digest::{Algorithm, Digest, HASH_CHUNK, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::format::{FLAG_ZSTD, Kind};
use crate::image;
use crate::meta::{self, BlobEntry, Location, Op};
use crate::store::Store;

/// How much to check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Depth {
    /// blake3 of the stored bytes against the index.
    Fast,
    /// Every blob's OCI digest, size and record header.
    #[default]
    Digest,
    /// `Digest`, plus layers against `diff_ids`, JSON, the graph, segments and orphans.
    Deep,
}

/// Choices for [`Store::verify`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// How much to check.
    pub depth: Depth,
    /// Quarantine corrupt blobs and rebuild reference counts and holds.
    pub repair: bool,
}

impl VerifyOptions {
    /// Options for a depth.
    pub fn depth(depth: Depth) -> VerifyOptions {
        VerifyOptions {
            depth,
            repair: false,
        }
    }
    /// Also repair.
    #[must_use]
    pub fn repair(mut self, yes: bool) -> Self {
        self.repair = yes;
        self
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The blob concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What is wrong: `unreadable`, `header`, `blake3`, `digest`, `size`, `diff-id`,
    /// `decompress`, `json`, `missing-child`, `refcount`, `holds`, `segment`,
    /// `orphan-file`.
    pub kind: &'static str,
    /// Names of the images that reach the blob.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// A file involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Details.
    pub detail: String,
}

impl Problem {
    fn blob(d: Digest, kind: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            digest: Some(d),
            kind,
            images: Vec::new(),
            path: None,
            detail: detail.into(),
        }
    }

    /// Whether the blob's stored bytes are bad (what `--repair` quarantines).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self.kind,
            "unreadable" | "header" | "blake3" | "digest" | "size"
        )
    }
}

/// What a repair did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repaired {
    /// Blobs moved to `quarantine/` and removed from the index.
    pub quarantined: Vec<Digest>,
    /// Reference counts rewritten.
    pub refcounts_fixed: u64,
    /// Holds rewritten.
    pub holds_fixed: u64,
    /// Each image that now lacks blobs, with the missing ones (re-import or re-pull it).
    pub images_lacking: BTreeMap<String, Vec<Digest>>,
}

/// The result of [`Store::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// The depth checked.
    pub depth: Depth,
    /// Blobs checked.
    pub blobs: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Every finding.
    pub problems: Vec<Problem>,
    /// With `repair`: what was done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
    /// Wall time in milliseconds.
    pub elapsed_ms: u64,
}

/// A progress sink: called with bytes checked so far (from any thread).
pub type ProgressFn<'a> = &'a (dyn Fn(u64) + Sync);

fn hash_chunks(alg: Algorithm, data: &[u8]) -> Digest {
    let mut h = Hasher::new(alg);
    for c in data.chunks(HASH_CHUNK) {
        h.update(c);
    }
    h.finish()
}

fn blake3_chunks(data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for c in data.chunks(16 * HASH_CHUNK) {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// sha256 of a layer's decompressed bytes (gzip, including multi-member; zstd; or plain).
fn diff_id(data: &[u8]) -> std::io::Result<Digest> {
    let mut reader: Box<dyn Read> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(data))
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(data)?)
    } else {
        return Ok(hash_chunks(Algorithm::Sha256, data));
    };
    let mut h = Hasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

fn blake3_problem(d: Digest, b3: [u8; 32], e: &BlobEntry) -> Problem {
    Problem::blob(
        d,
        "blake3",
        format!(
            "stored bytes hash to blake3 {}, the index says {}",
            hex::encode(b3),
            hex::encode(e.blake3)
        ),
    )
}

/// What streaming a large blob computed.
enum Streamed {
    Blake3([u8; 32]),
    Digest(Digest),
}

impl Store {
    /// Hashes a large blob's payload (blake3 for `Fast`, its OCI digest otherwise) from a
    /// mapping whose pages are faulted in at once: verify reads all of it, and per-page
    /// faults would cost more than the hashing. A short file is an error, not a SIGBUS.
    fn stream_large(
        &self,
        d: &Digest,
        generation: u64,
        len: u64,
        depth: Depth,
    ) -> Result<Streamed> {
        let path = self.inner.files.large_path(d, generation);
        let f = std::fs::File::open(&path).ctx("open", &path)?;
        let total = crate::format::RECORD_HEADER_LEN + len;
        let actual = f.metadata().ctx("stat", &path)?.len();
        if actual != total {
            return Err(Error::Corrupt(format!(
                "{} is {actual} bytes, the index says {total}",
                path.display()
            )));
        }
        let map = crate::map::Map::populated(&f, &path, total)?;
        let payload = &map.bytes()[crate::format::RECORD_HEADER_LEN as usize..];
        Ok(if depth == Depth::Fast {
            Streamed::Blake3(blake3_chunks(payload))
        } else {
            Streamed::Digest(hash_chunks(d.algorithm(), payload))
        })
    }

    /// Checks the store at `opts.depth`, collecting every problem; with `opts.repair`,
    /// quarantines corrupt blobs and rebuilds counts. `progress` receives bytes checked.
    pub fn verify(
        &self,
        opts: &VerifyOptions,
        interrupt: &AtomicBool,
        progress: ProgressFn<'_>,
    ) -> Result<VerifyReport> {
        let start = Instant::now();
        let mut report = VerifyReport {
            depth: opts.depth,
            ..VerifyReport::default()
        };
        let txn = self.inner.meta.read()?;
        let shards: HashMap<u64, u32> = self
            .inner
            .meta
            .segments()?
            .into_iter()
            .map(|(id, r)| (id, r.shard))
            .collect();
        let mut entries: Vec<(Digest, BlobEntry)> = Vec::new();
        for r in txn.open_table(meta::BLOBS)?.iter()? {
            let (k, v) = r?;
            entries.push((Digest::from_key(k.value())?, BlobEntry::decode(v.value())?));
        }
        report.blobs = entries.len() as u64;

        // Deep: which diff_id each layer must have (from every config that lists it).
        let mut expected_diff: HashMap<Digest, Vec<(String, Digest)>> = HashMap::new();
        let mut problems: Vec<Problem> = Vec::new();
        if opts.depth == Depth::Deep {
            for (d, e) in &entries {
                if !matches!(e.kind, Kind::Manifest) {
                    continue;
                }
                let Ok(bytes) = self.get(d) else { continue };
                let Ok(p) = image::parse(&bytes) else {
                    continue;
                };
                let Some(cfg) = p.config() else { continue };
                let Ok(cfg_bytes) = self.get(&cfg.digest) else {
                    continue;
                };
                match image::parse_config(&cfg_bytes) {
                    Ok(info) => {
                        // (A config with no diff_ids at all is not an image config
                        // we can check; one with some must list every layer.)
                        if !info.diff_ids.is_empty() && info.diff_ids.len() != p.layers().len() {
                            problems.push(Problem::blob(
                                cfg.digest,
                                "diff-id",
                                format!(
                                    "lists {} diff_ids, but manifest {d} has {} layers",
                                    info.diff_ids.len(),
                                    p.layers().len()
                                ),
                            ));
                        }
                        for (l, want) in p.layers().iter().zip(&info.diff_ids) {
                            expected_diff
                                .entry(l.digest)
                                .or_default()
                                .push((want.clone(), *d));
                        }
                    }
                    Err(err) => problems.push(Problem::blob(cfg.digest, "json", err.to_string())),
                }
            }
        }

        let bytes = AtomicU64::new(0);
        let per_blob: Vec<Vec<Problem>> = entries
            .par_iter()
            .map(|(d, e)| {
                if interrupt.load(Ordering::Relaxed) {
                    return Vec::new();
                }
                let found = self.check_blob(d, e, opts.depth, &shards, &expected_diff);
                progress(bytes.fetch_add(e.size, Ordering::Relaxed) + e.size);
                found
            })
            .collect();
        if interrupt.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        report.bytes = bytes.into_inner();
        problems.extend(per_blob.into_iter().flatten());
        if opts.depth == Depth::Deep {
            problems.extend(Self::check_graph(&txn, &entries)?);
            problems.extend(self.check_segments()?);
            problems.extend(self.check_orphans(&txn)?);
        }
        drop(txn);
        if !problems.is_empty() {
            let owners = self.image_owners()?;
            for p in &mut problems {
                if let Some(d) = &p.digest
                    && let Some(names) = owners.get(d)
                {
                    p.images.clone_from(names);
                }
            }
        }
        if opts.repair {
            report.repaired = Some(self.repair(&problems)?);
        }
        report.problems = problems;
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        Ok(report)
    }

    fn check_blob(
        &self,
        d: &Digest,
        e: &BlobEntry,
        depth: Depth,
        shards: &HashMap<u64, u32>,
        expected_diff: &HashMap<Digest, Vec<(String, Digest)>>,
    ) -> Vec<Problem> {
        let mut out = Vec::new();
        if depth != Depth::Fast {
            let shard = match e.location {
                Location::Packed { segment, .. } => shards.get(&segment).copied(),
                Location::Large { .. } => None,
            };
            match self.inner.files.record_header(d, e.location, shard) {
                Ok(h) => {
                    if h.digest != *d
                        || h.raw_len != e.size
                        || h.stored_len != e.stored_len
                        || h.blake3 != e.blake3
                    {
                        out.push(Problem::blob(
                            *d,
                            "header",
                            format!(
                                "record header says {} ({} bytes), the index says {d} ({} bytes)",
                                h.digest, h.raw_len, e.size
                            ),
                        ));
                    }
                }
                Err(err) => out.push(Problem::blob(*d, "header", err.to_string())),
            }
        }
        // A large blob is streamed with pread through one cache-sized buffer: it checks
        // what the disk returns, and costs no page-table work for a mapping.
        if depth != Depth::Deep
            && let Location::Large { generation } = e.location
        {
            match self.stream_large(d, generation, e.stored_len, depth) {
                Ok(Streamed::Blake3(b3)) if b3 != e.blake3 => out.push(blake3_problem(*d, b3, e)),
                Ok(Streamed::Digest(actual)) if actual != *d => out.push(Problem::blob(
                    *d,
                    "digest",
                    format!("content hashes to {actual}, but should have been {d}"),
                )),
                Ok(_) => {}
                Err(err) => out.push(Problem::blob(*d, "unreadable", err.to_string())),
            }
            return out;
        }
        let blob = match self.get(d) {
            Ok(b) => b,
            Err(err) => {
                out.push(Problem::blob(*d, "unreadable", err.to_string()));
                return out;
            }
        };
        if blob.len() as u64 != e.stored_len {
            out.push(Problem::blob(
                *d,
                "size",
                format!(
                    "{} bytes stored, the index says {}",
                    blob.len(),
                    e.stored_len
                ),
            ));
            return out;
        }
        match depth {
            Depth::Fast => {
                let b3 = blake3_chunks(&blob);
                if b3 != e.blake3 {
                    out.push(blake3_problem(*d, b3, e));
                }
            }
            Depth::Digest | Depth::Deep => {
                if e.flags & FLAG_ZSTD == 0 {
                    let actual = hash_chunks(d.algorithm(), &blob);
                    if actual != *d {
                        out.push(Problem::blob(
                            *d,
                            "digest",
                            format!("content hashes to {actual}, but should have been {d}"),
                        ));
                        return out;
                    }
                }
            }
        }
        if depth == Depth::Deep {
            match e.kind {
                Kind::Manifest | Kind::Index => {
                    if let Err(err) = image::parse(&blob) {
                        out.push(Problem::blob(*d, "json", err.to_string()));
                    }
                }
                Kind::Config => {
                    if let Err(err) = image::parse_config(&blob) {
                        out.push(Problem::blob(*d, "json", err.to_string()));
                    }
                }
                _ => {}
            }
            if let Some(wants) = expected_diff.get(d) {
                match diff_id(&blob) {
                    Ok(got) => {
                        for (want, manifest) in wants {
                            if got.to_string() != *want {
                                out.push(Problem::blob(
                                    *d,
                                    "diff-id",
                                    format!(
                                        "layer decompresses to {got}, but the config of {manifest} lists {want}"
                                    ),
                                ));
                            }
                        }
                    }
                    Err(err) => out.push(Problem::blob(
                        *d,
                        "decompress",
                        format!("layer does not decompress: {err}"),
                    )),
                }
            }
        }
        out
    }

    /// Children exist; refcounts and holds equal what the tables imply.
    fn check_graph(
        txn: &redb::ReadTransaction,
        entries: &[(Digest, BlobEntry)],
    ) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        let stored: HashSet<Digest> = entries.iter().map(|(d, _)| *d).collect();
        let mut indegree: HashMap<Digest, u64> = HashMap::new();
        for (table, is_edges) in [(meta::EDGES, true), (meta::REFERRERS, false)] {
            for r in txn.open_multimap_table(table)?.iter()? {
                let (p, cs) = r?;
                let parent = Digest::from_key(p.value())?;
                for c in cs {
                    let c = Digest::from_key(c?.value())?;
                    *indegree.entry(c).or_default() += 1;
                    if is_edges && !stored.contains(&c) {
                        out.push(Problem::blob(
                            c,
                            "missing-child",
                            format!("{parent} names it, but it is not stored"),
                        ));
                    }
                }
            }
        }
        let owed = meta::Meta::owes_counts(txn)?;
        let mut recorded: HashMap<Digest, u64> = HashMap::new();
        for r in txn.open_table(meta::REFCOUNT)?.iter()? {
            let (k, v) = r?;
            recorded.insert(Digest::from_key(k.value())?, v.value());
        }
        for d in indegree
            .keys()
            .chain(recorded.keys())
            .collect::<HashSet<_>>()
        {
            let (want, have) = (
                indegree.get(d).copied().unwrap_or(0),
                recorded.get(d).copied().unwrap_or(0),
            );
            // A collection that owes decrements leaves counts too high for a while
            // (never too low); open or the next run settles them.
            if want > have || (want < have && !owed) {
                out.push(Problem::blob(
                    *d,
                    "refcount",
                    format!("refcount is {have}, but {want} stored parents name it"),
                ));
            }
        }
        let mut holders: HashMap<Digest, u64> = HashMap::new();
        for r in txn.open_table(meta::NAMES)?.iter()? {
            *holders.entry(Digest::from_key(r?.1.value())?).or_default() += 1;
        }
        for r in txn.open_table(meta::CONTAINERS)?.iter()? {
            let rec: meta::ContainerRecord = serde_json::from_slice(r?.1.value())
                .map_err(|e| Error::Corrupt(format!("container record: {e}")))?;
            *holders.entry(rec.image).or_default() += 1;
        }
        for r in txn.open_multimap_table(meta::LEASE_RESOURCES)?.iter()? {
            for d in r?.1 {
                *holders.entry(Digest::from_key(d?.value())?).or_default() += 1;
            }
        }
        let mut held: HashMap<Digest, u64> = HashMap::new();
        for r in txn.open_table(meta::HOLDS)?.iter()? {
            let (k, v) = r?;
            held.insert(Digest::from_key(k.value())?, v.value());
        }
        for d in holders.keys().chain(held.keys()).collect::<HashSet<_>>() {
            let (want, have) = (
                holders.get(d).copied().unwrap_or(0),
                held.get(d).copied().unwrap_or(0),
            );
            if want != have {
                out.push(Problem::blob(
                    *d,
                    "holds",
                    format!(
                        "holds is {have}, but {want} names, containers and lease entries name it"
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Segment headers and every record header up to the committed length.
    fn check_segments(&self) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        for (id, row) in self.inner.meta.segments()? {
            if let Err(e) = self
                .inner
                .files
                .scan_records(row.shard, id, row.committed_len)
            {
                out.push(Problem {
                    digest: None,
                    kind: "segment",
                    images: Vec::new(),
                    path: Some(self.inner.files.segment_path(row.shard, id)),
                    detail: e.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Large files no entry names.
    fn check_orphans(&self, txn: &redb::ReadTransaction) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        for p in self.inner.files.large_files()? {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let parsed = crate::blobs::Files::parse_large_name(name);
            let indexed = match parsed {
                Some((d, g)) => meta::Meta::names_large(txn, &d, g)?,
                None => false,
            };
            if !indexed {
                out.push(Problem {
                    digest: parsed.map(|(d, _)| d),
                    kind: "orphan-file",
                    images: Vec::new(),
                    path: Some(p.clone()),
                    detail: "no index entry names this file (gc removes it after a day)".into(),
                });
            }
        }
        Ok(out)
    }

    /// Digest -> names of the images that reach it.
    fn image_owners(&self) -> Result<HashMap<Digest, Vec<String>>> {
        let txn = self.inner.meta.read()?;
        let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
        for (name, root) in self.names()? {
            let mut seen = HashSet::new();
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                if seen.insert(d) {
                    out.entry(d).or_default().push(name.clone());
                    stack.extend(meta::Meta::children(&txn, &d)?);
                }
            }
        }
        Ok(out)
    }

    /// Quarantines corrupt blobs, rebuilds counts, and reports what images now lack.
    fn repair(&self, problems: &[Problem]) -> Result<Repaired> {
        // Not beside a collection: it owes decrements the rebuilt counts would already
        // have, and would apply them twice.
        let _no_gc = self
            .inner
            .gc_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rep = Repaired::default();
        let corrupt: Vec<Digest> = problems
            .iter()
            .filter(|p| p.is_corruption())
            .filter_map(|p| p.digest)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let qdir = self.root().join("quarantine");
        for d in &corrupt {
            let stamp = crate::sys::now_ms();
            let dst = qdir.join(format!("{}-{}.{stamp}", d.algorithm(), d.hex()));
            // Keep what can still be read, for inspection; a large file moves as it is.
            if let Some(info) = self.stat(d)? {
                match info.location {
                    Location::Large { generation } => {
                        let src = self.inner.files.large_path(d, generation);
                        if src.exists() {
                            std::fs::rename(&src, &dst).ctx("rename", &src)?;
                        }
                    }
                    Location::Packed { .. } => {
                        if let Ok(b) = self.get(d) {
                            std::fs::write(&dst, &*b).ctx("write", &dst)?;
                        }
                    }
                }
            }
        }
        if !corrupt.is_empty() {
            crate::sys::sync_dir(&qdir)?;
            self.inner.meta.submit(Op::Quarantine(corrupt.clone()))?;
        }
        let fixed = self.inner.meta.submit(Op::RebuildCounts)?;
        rep.refcounts_fixed = fixed.rebuilt.0;
        rep.holds_fixed = fixed.rebuilt.1;
        rep.quarantined = corrupt;
        rep.quarantined.sort();
        let txn = self.inner.meta.read()?;
        for (name, root) in self.names()? {
            let mut seen = HashSet::new();
            let mut stack = vec![root];
            let mut missing = Vec::new();
            while let Some(d) = stack.pop() {
                if !seen.insert(d) {
                    continue;
                }
                if meta::Meta::entry(&txn, &d)?.is_none() {
                    missing.push(d);
                    continue;
                }
                stack.extend(meta::Meta::children(&txn, &d)?);
            }
            if !missing.is_empty() {
                missing.sort();
                rep.images_lacking.insert(name, missing);
            }
        }
        Ok(rep)
    }
}
