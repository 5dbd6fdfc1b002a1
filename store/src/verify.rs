//! Integrity checks at three depths, and repair.
//!
//! This module owns the question "is what the store holds what the index says?". `Fast`
//! re-hashes stored bytes with blake3 against the index; `Digest` (the default)
//! recomputes every blob's OCI digest and size and checks its record header; `Deep` adds
//! decompression of every layer against its config's `diff_ids`, parsing of every
//! manifest, index and config, the graph (children exist, reference counts and holds equal
//! their recomputed values), segment record headers, and orphan files. Every finding is
//! collected (it never stops at the first), in parallel across blobs. Blobs are read as
//! the verify's own snapshot names them, and a finding is checked again against a fresh
//! snapshot before it is reported, so a collection or compaction running meanwhile never
//! shows up as damage. Only bytes proven wrong count as corruption; a read that fails for
//! another reason (EIO, EMFILE) is an `io` finding. It changes nothing unless asked to
//! repair, and a repair changes nothing while any `io` finding stands: corrupt blobs are
//! then copied to quarantine and removed from the index (a re-import or re-pull restores
//! them), and counts are rebuilt from the edges.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use redb::{ReadableMultimapTable, ReadableTable};

use crate::digest::{Algorithm, Digest, HASH_CHUNK, Hasher};
use crate::error::{Error, Result};
use crate::format::{FLAG_ZSTD, Kind};
use crate::image;
use crate::meta::{self, BlobEntry, Location, Op};
use crate::store::Store;

/// How much to check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// The bytes the index names are not there: the file is missing or shorter.
    Missing,
    /// The record header does not decode or disagrees with the index.
    Header,
    /// The stored bytes' blake3 differs from the index's.
    Blake3,
    /// The bytes hash to another OCI digest.
    Digest,
    /// The stored length differs from the index's.
    Size,
    /// A layer decompresses to another digest than its config lists.
    DiffId,
    /// A layer does not decompress.
    Decompress,
    /// A manifest, index or config does not parse.
    Json,
    /// A manifest or index names a child that is not stored.
    MissingChild,
    /// An image whose graph is wrong: a child a manifest or index names as a manifest is
    /// stored as something else (so its own children are not tracked), or a child its
    /// JSON names has no edge.
    Incomplete,
    /// A reference count differs from the edges.
    Refcount,
    /// A hold count differs from the names, containers and leases.
    Holds,
    /// A stretch of a segment holds no record that can be trusted.
    Segment,
    /// A file nothing names: debris of a crash, which the collector removes. Not an error.
    OrphanFile,
    /// Reading failed for a reason that says nothing about the bytes (EIO, EMFILE, ...).
    Io,
}

impl ProblemKind {
    /// The name used in reports (`missing`, `diff-id`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::Missing => "missing",
            ProblemKind::Header => "header",
            ProblemKind::Blake3 => "blake3",
            ProblemKind::Digest => "digest",
            ProblemKind::Size => "size",
            ProblemKind::DiffId => "diff-id",
            ProblemKind::Decompress => "decompress",
            ProblemKind::Json => "json",
            ProblemKind::MissingChild => "missing-child",
            ProblemKind::Incomplete => "incomplete",
            ProblemKind::Refcount => "refcount",
            ProblemKind::Holds => "holds",
            ProblemKind::Segment => "segment",
            ProblemKind::OrphanFile => "orphan-file",
            ProblemKind::Io => "io",
        }
    }

    /// Whether the blob's stored bytes are proven bad (what `--repair` quarantines).
    pub fn is_corruption(self) -> bool {
        matches!(
            self,
            ProblemKind::Missing
                | ProblemKind::Header
                | ProblemKind::Blake3
                | ProblemKind::Digest
                | ProblemKind::Size
        )
    }

    /// Whether it counts as a problem (everything but debris).
    pub fn is_error(self) -> bool {
        self != ProblemKind::OrphanFile
    }
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl PartialEq<&str> for ProblemKind {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The blob concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What is wrong.
    pub kind: ProblemKind,
    /// Names of the images that reach the blob.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// A file involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Details.
    pub detail: String,
    /// Where the blob was when it was checked (what a repair may remove).
    #[serde(skip)]
    location: Option<Location>,
}

impl Problem {
    fn blob(d: Digest, kind: ProblemKind, detail: impl Into<String>) -> Problem {
        Problem {
            digest: Some(d),
            kind,
            images: Vec::new(),
            path: None,
            detail: detail.into(),
            location: None,
        }
    }

    fn file(kind: ProblemKind, path: PathBuf, detail: impl Into<String>) -> Problem {
        Problem {
            digest: None,
            kind,
            images: Vec::new(),
            path: Some(path),
            detail: detail.into(),
            location: None,
        }
    }

    /// A failed read of a blob: corruption if the bytes are gone, else an I/O finding.
    fn read_failed(d: Digest, e: &Error) -> Problem {
        let kind = match e {
            Error::Corrupt(_) => ProblemKind::Missing,
            _ => ProblemKind::Io,
        };
        Problem::blob(d, kind, e.to_string())
    }

    /// Whether the blob's stored bytes are bad (what `--repair` quarantines).
    pub fn is_corruption(&self) -> bool {
        self.kind.is_corruption()
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
    /// Findings that are problems (everything but debris such as orphan files).
    pub errors: usize,
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
    if image::Compression::sniff(data) == image::Compression::None {
        return Ok(hash_chunks(Algorithm::Sha256, data));
    }
    let mut reader = image::decompress(data)?;
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
        ProblemKind::Blake3,
        format!(
            "stored bytes hash to blake3 {}, the index says {}",
            hex::encode(b3),
            hex::encode(e.blake3)
        ),
    )
}

impl Store {
    /// The stored bytes of a blob at the place `e` (an entry of some snapshot) names. A
    /// large blob's file must be exactly as long as its record.
    fn read_entry(&self, d: &Digest, e: &BlobEntry, populate: bool) -> Result<crate::Blob> {
        let files = &self.inner.files;
        match e.location {
            Location::Packed { segment, offset } => {
                files.read_packed(segment, offset, e.stored_len)
            }
            Location::Large { generation } => {
                let key = crate::backend::Key::Large {
                    digest: *d,
                    generation,
                };
                let want = crate::format::RECORD_HEADER_LEN.saturating_add(e.stored_len);
                match files.backend.len(&key) {
                    Ok(Some(n)) if n > want => {
                        return Err(Error::Corrupt(format!(
                            "{} is {n} bytes, the index says {want}",
                            files.backend.display(&key).display()
                        )));
                    }
                    Ok(_) => {}
                    Err(err) => return Err(files.io("stat", &key, err)),
                }
                files.read_large(d, generation, e.stored_len, populate)
            }
        }
    }

    /// Checks the store at `opts.depth`, collecting every problem; with `opts.repair`,
    /// quarantines corrupt blobs and rebuilds counts. `progress` receives bytes checked.
    #[tracing::instrument(level = "info", skip_all, fields(depth = ?opts.depth, repair = opts.repair))]
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
        // The snapshot stays registered for the whole run: segments a compaction retires
        // meanwhile stay mapped for it.
        let txn = self.inner.meta.read()?;
        let mut entries: Vec<(Digest, BlobEntry)> = Vec::new();
        for r in txn.open_table(meta::BLOBS)?.iter()? {
            let (k, v) = r?;
            entries.push((Digest::from_key(k.value())?, BlobEntry::decode(v.value())?));
        }
        report.blobs = entries.len() as u64;
        let by_digest: HashMap<Digest, &BlobEntry> = entries.iter().map(|(d, e)| (*d, e)).collect();

        // Deep: which diff_id each layer must have (from every config that lists it), and
        // what every manifest and index names (for the graph check).
        let mut expected_diff: HashMap<Digest, Vec<(String, Digest)>> = HashMap::new();
        let mut named: Vec<(Digest, image::Parsed)> = Vec::new();
        let mut problems: Vec<Problem> = Vec::new();
        if opts.depth == Depth::Deep {
            for (d, e) in &entries {
                if !matches!(e.kind, Kind::Manifest | Kind::Index) {
                    continue;
                }
                let Ok(bytes) = self.read_entry(d, e, false) else {
                    continue;
                };
                let Ok(p) = image::parse(&bytes) else {
                    continue;
                };
                if let Some(cfg) = p.config()
                    && let Some(ce) = by_digest.get(&cfg.digest)
                    && let Ok(cfg_bytes) = self.read_entry(&cfg.digest, ce, false)
                {
                    match image::parse_config(&cfg_bytes) {
                        Ok(info) => {
                            // (A config with no diff_ids at all is not an image config
                            // we can check; one with some must list every layer.)
                            if !info.diff_ids.is_empty() && info.diff_ids.len() != p.layers().len()
                            {
                                problems.push(Problem::blob(
                                    cfg.digest,
                                    ProblemKind::DiffId,
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
                        Err(err) => problems.push(Problem::blob(
                            cfg.digest,
                            ProblemKind::Json,
                            err.to_string(),
                        )),
                    }
                }
                named.push((*d, p));
            }
        }

        let bytes = AtomicU64::new(0);
        let per_blob: Vec<Vec<Problem>> = entries
            .par_iter()
            .map(|(d, e)| {
                if interrupt.load(Ordering::Relaxed) {
                    return Vec::new();
                }
                let found = self.check_blob(d, e, opts.depth, &expected_diff);
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
            problems.extend(Self::check_graph(&txn, &entries, &named)?);
            problems.extend(self.check_segments(&txn, &entries)?);
            problems.extend(self.check_orphans(&txn)?);
        }
        drop(txn);
        let problems = self.recheck(problems, opts.depth, &expected_diff)?;
        let mut problems = problems;
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
        report.errors = problems.iter().filter(|p| p.kind.is_error()).count();
        report.problems = problems;
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Checks every blob finding again against a fresh snapshot: a blob deleted since is
    /// no problem, one moved (compacted) or stored again is checked at its new place, and
    /// only what still holds is reported. Graph and file findings are kept as they are.
    fn recheck(
        &self,
        problems: Vec<Problem>,
        depth: Depth,
        expected_diff: &HashMap<Digest, Vec<(String, Digest)>>,
    ) -> Result<Vec<Problem>> {
        let blob_kinds = |k: ProblemKind| {
            matches!(
                k,
                ProblemKind::Missing
                    | ProblemKind::Header
                    | ProblemKind::Blake3
                    | ProblemKind::Digest
                    | ProblemKind::Size
                    | ProblemKind::Io
                    | ProblemKind::DiffId
                    | ProblemKind::Decompress
                    | ProblemKind::Json
            )
        };
        let (mut keep, suspect): (Vec<Problem>, Vec<Problem>) = problems
            .into_iter()
            .partition(|p| p.location.is_none() || !blob_kinds(p.kind));
        if suspect.is_empty() {
            return Ok(keep);
        }
        let snap = self.snapshot()?;
        let mut redo: HashSet<Digest> = HashSet::new();
        for p in suspect {
            let Some(d) = p.digest else {
                keep.push(p);
                continue;
            };
            match snap.stat(&d)? {
                None => {}
                Some(now) if Some(now.location) == p.location => keep.push(p),
                Some(_) => {
                    redo.insert(d);
                }
            }
        }
        let mut redo: Vec<Digest> = redo.into_iter().collect();
        redo.sort();
        for d in redo {
            if let Some(e) = snap.entry(&d)? {
                keep.extend(self.check_blob(&d, &e, depth, expected_diff));
            }
        }
        Ok(keep)
    }

    fn check_blob(
        &self,
        d: &Digest,
        e: &BlobEntry,
        depth: Depth,
        expected_diff: &HashMap<Digest, Vec<(String, Digest)>>,
    ) -> Vec<Problem> {
        let mut out = Vec::new();
        self.check_blob_into(d, e, depth, expected_diff, &mut out);
        for p in &mut out {
            p.location = Some(e.location);
        }
        out
    }

    fn check_blob_into(
        &self,
        d: &Digest,
        e: &BlobEntry,
        depth: Depth,
        expected_diff: &HashMap<Digest, Vec<(String, Digest)>>,
        out: &mut Vec<Problem>,
    ) {
        if depth != Depth::Fast {
            match self.inner.files.record_header(d, e.location) {
                Ok(h) => {
                    if h.digest != *d
                        || h.raw_len != e.size
                        || h.stored_len != e.stored_len
                        || h.blake3 != e.blake3
                    {
                        out.push(Problem::blob(
                            *d,
                            ProblemKind::Header,
                            format!(
                                "record header says {} ({} bytes), the index says {d} ({} bytes)",
                                h.digest, h.raw_len, e.size
                            ),
                        ));
                    }
                }
                Err(Error::Corrupt(msg)) => {
                    out.push(Problem::blob(*d, ProblemKind::Header, msg));
                }
                Err(err) => out.push(Problem::read_failed(*d, &err)),
            }
        }
        // Large blobs are read in whole (every page faulted in at once: verify reads all
        // of it, and per-page faults would cost more than the hashing).
        let populate = matches!(e.location, Location::Large { .. }) && depth != Depth::Deep;
        let blob = match self.read_entry(d, e, populate) {
            Ok(b) => b,
            Err(err) => {
                out.push(Problem::read_failed(*d, &err));
                return;
            }
        };
        if blob.len() as u64 != e.stored_len {
            out.push(Problem::blob(
                *d,
                ProblemKind::Size,
                format!(
                    "{} bytes stored, the index says {}",
                    blob.len(),
                    e.stored_len
                ),
            ));
            return;
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
                            ProblemKind::Digest,
                            format!("content hashes to {actual}, but should have been {d}"),
                        ));
                        return;
                    }
                }
            }
        }
        if depth == Depth::Deep {
            match e.kind {
                Kind::Manifest | Kind::Index => {
                    if let Err(err) = image::parse(&blob) {
                        out.push(Problem::blob(*d, ProblemKind::Json, err.to_string()));
                    }
                }
                Kind::Config => {
                    if let Err(err) = image::parse_config(&blob) {
                        out.push(Problem::blob(*d, ProblemKind::Json, err.to_string()));
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
                                    ProblemKind::DiffId,
                                    format!(
                                        "layer decompresses to {got}, but the config of {manifest} lists {want}"
                                    ),
                                ));
                            }
                        }
                    }
                    Err(err) => out.push(Problem::blob(
                        *d,
                        ProblemKind::Decompress,
                        format!("layer does not decompress: {}", printable(&err.to_string())),
                    )),
                }
            }
        }
    }

    /// Children exist; refcounts and holds equal what the tables imply.
    fn check_graph(
        txn: &redb::ReadTransaction,
        entries: &[(Digest, BlobEntry)],
        named: &[(Digest, image::Parsed)],
    ) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        let stored: HashMap<Digest, Kind> = entries.iter().map(|(d, e)| (*d, e.kind)).collect();
        // What the JSON of every manifest and index names must be in the graph: an edge per
        // child, and a child named as a manifest or index stored as one (else its own
        // config and layers are tracked by nothing).
        let edges = txn.open_multimap_table(meta::EDGES)?;
        for (parent, p) in named {
            let have: HashSet<Digest> = edges
                .get(&*parent.key())?
                .map(|c| Ok(Digest::from_key(c?.value())?))
                .collect::<Result<_>>()?;
            for c in &p.children {
                if !have.contains(&c.digest) {
                    out.push(Problem::blob(
                        *parent,
                        ProblemKind::Incomplete,
                        format!("it names {}, but the graph has no edge to it", c.digest),
                    ));
                }
                if matches!(c.kind, Kind::Manifest | Kind::Index)
                    && let Some(k) = stored.get(&c.digest)
                    && !matches!(k, Kind::Manifest | Kind::Index)
                {
                    out.push(Problem::blob(
                        c.digest,
                        ProblemKind::Incomplete,
                        format!(
                            "{parent} names it as {} {}, but it is stored as {} {}: its own \
                             children are not tracked (import or put it as a manifest again)",
                            article(c.kind),
                            c.kind.name(),
                            article(*k),
                            k.name()
                        ),
                    ));
                }
            }
        }
        let mut indegree: HashMap<Digest, u64> = HashMap::new();
        for (table, is_edges) in [(meta::EDGES, true), (meta::REFERRERS, false)] {
            for r in txn.open_multimap_table(table)?.iter()? {
                let (p, cs) = r?;
                let parent = Digest::from_key(p.value())?;
                for c in cs {
                    let c = Digest::from_key(c?.value())?;
                    *indegree.entry(c).or_default() += 1;
                    if is_edges && !stored.contains_key(&c) {
                        out.push(Problem::blob(
                            c,
                            ProblemKind::MissingChild,
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
                    ProblemKind::Refcount,
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
                    ProblemKind::Holds,
                    format!(
                        "holds is {have}, but {want} names, containers and lease entries name it"
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Every segment's records up to its committed length, resynchronising after damage:
    /// each damaged stretch is reported, with every blob whose record lies in it.
    fn check_segments(
        &self,
        txn: &redb::ReadTransaction,
        entries: &[(Digest, BlobEntry)],
    ) -> Result<Vec<Problem>> {
        let files = &self.inner.files;
        let segments = txn.open_table(meta::SEGMENTS)?;
        // The blobs of each segment, by record start.
        let mut by_segment: HashMap<u64, Vec<(u64, Digest)>> = HashMap::new();
        for (d, e) in entries {
            if let Location::Packed { segment, offset } = e.location {
                by_segment
                    .entry(segment)
                    .or_default()
                    .push((offset.saturating_sub(crate::format::RECORD_HEADER_LEN), *d));
            }
        }
        // Problems by segment, confirmed against a fresh snapshot at the end: a compaction
        // running meanwhile retires (and unlinks) segments this run's snapshot still names.
        let mut suspect: Vec<(u64, Vec<Problem>)> = Vec::new();
        for r in segments.iter()? {
            let (k, v) = r?;
            let mut out = Vec::new();
            let (id, row) = (k.value(), meta::SegmentRow::decode(v.value())?);
            let key = crate::backend::Key::Segment {
                shard: row.shard,
                id,
            };
            let path = files.backend.display(&key);
            let scan = match files
                .scan_segment(row.shard, id, row.committed_len, &mut |_, _, _| Ok(Ok(())))
            {
                Ok(s) => s,
                Err(Error::Corrupt(msg)) => {
                    out.push(Problem::file(ProblemKind::Segment, path, msg));
                    suspect.push((id, out));
                    continue;
                }
                Err(e) => {
                    out.push(Problem::file(ProblemKind::Io, path, e.to_string()));
                    suspect.push((id, out));
                    continue;
                }
            };
            match self.segment_header_problem(&key, row.shard, id) {
                Ok(None) => {}
                Ok(Some(why)) => out.push(Problem::file(ProblemKind::Segment, path.clone(), why)),
                Err(Error::Corrupt(why)) => {
                    out.push(Problem::file(ProblemKind::Segment, path.clone(), why));
                }
                Err(e) => out.push(Problem::file(ProblemKind::Io, path.clone(), e.to_string())),
            }
            let blobs = by_segment.get(&id).map_or(&[][..], Vec::as_slice);
            for dmg in &scan.damaged {
                let inside: Vec<&Digest> = blobs
                    .iter()
                    .filter(|(at, _)| (dmg.start..dmg.end).contains(at))
                    .map(|(_, d)| d)
                    .collect();
                out.push(Problem::file(
                    ProblemKind::Segment,
                    path.clone(),
                    format!(
                        "bytes {}..{}: {} ({} indexed blob(s) in it)",
                        dmg.start,
                        dmg.end,
                        dmg.reason,
                        inside.len()
                    ),
                ));
                for d in inside {
                    let mut p = Problem::blob(
                        *d,
                        ProblemKind::Header,
                        format!(
                            "its record in {} lies in damaged bytes {}..{}: {}",
                            path.display(),
                            dmg.start,
                            dmg.end,
                            dmg.reason
                        ),
                    );
                    p.location = entries
                        .iter()
                        .find(|(x, _)| x == d)
                        .map(|(_, e)| e.location);
                    out.push(p);
                }
            }
            if !out.is_empty() {
                suspect.push((id, out));
            }
        }
        let mut out = Vec::new();
        if suspect.is_empty() {
            return Ok(out);
        }
        let fresh = self.inner.meta.read()?;
        let now = fresh.open_table(meta::SEGMENTS)?;
        for (id, found) in suspect {
            if redb::ReadableTable::get(&now, id)?.is_some() {
                out.extend(found);
            }
        }
        Ok(out)
    }

    /// What is wrong with a segment's header, if anything.
    fn segment_header_problem(
        &self,
        key: &crate::backend::Key,
        shard: u32,
        id: u64,
    ) -> Result<Option<String>> {
        let files = &self.inner.files;
        let h = match files.backend.open(key, false) {
            Ok(h) => h,
            Err(e) => return Err(files.indexed_read_err("segment file", key, e)),
        };
        let mut hdr = [0u8; crate::format::SEGMENT_HEADER_LEN as usize];
        if let Err(e) = h.read_at(&mut hdr, 0) {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    Ok(Some("shorter than a segment header".into()))
                }
                _ => Err(files.io("read", key, e)),
            };
        }
        Ok(match crate::format::SegmentHeader::decode(&hdr) {
            Err(e) => Some(format!("segment header: {e}")),
            Ok(h) if h.id != id || h.shard != shard => Some(format!(
                "its header says segment {} of shard {}, the index says {id} of shard {shard}",
                h.id, h.shard
            )),
            Ok(_) => None,
        })
    }

    /// Files nothing names: large files no entry names, segment files no row names (debris,
    /// not errors: a crash leaves them, the collector removes them).
    fn check_orphans(&self, txn: &redb::ReadTransaction) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        let files = &self.inner.files;
        for l in files.large_files()? {
            let indexed = match &l.key {
                Some(crate::backend::Key::Large { digest, generation }) => {
                    meta::Meta::names_large(txn, digest, *generation)?
                }
                _ => false,
            };
            if indexed {
                continue;
            }
            let (digest, path) = match &l.key {
                Some(k @ crate::backend::Key::Large { digest, .. }) => {
                    (Some(*digest), files.backend.display(k))
                }
                _ => (None, PathBuf::from(&l.name)),
            };
            out.push(Problem {
                digest,
                ..Problem::file(
                    ProblemKind::OrphanFile,
                    path,
                    "no index entry names this file (gc removes it after a day)",
                )
            });
        }
        let rows = txn.open_table(meta::SEGMENTS)?;
        for shard in 0..self.inner.shard_count() {
            let listed = files
                .backend
                .list(&crate::backend::List::Segments(shard))
                .map_err(|e| Error::io("list", self.inner.root.clone(), e))?;
            for l in listed {
                if let Some(k @ crate::backend::Key::Segment { id, .. }) = &l.key
                    && rows.get(*id)?.is_none()
                    && !files.has_view(*id)
                {
                    out.push(Problem::file(
                        ProblemKind::OrphanFile,
                        files.backend.display(k),
                        "no segment row names this file (an uncommitted batch's; gc removes \
                         it after a day)",
                    ));
                }
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
        // Only bytes proven wrong are removed: while any read failed for another reason,
        // nothing is.
        let io: Vec<&Problem> = problems
            .iter()
            .filter(|p| p.kind == ProblemKind::Io)
            .collect();
        if let Some(first) = io.first() {
            return Err(Error::ReadFailures {
                count: io.len(),
                first: first.detail.clone(),
            });
        }
        // Not beside a collection: it owes decrements the rebuilt counts would already
        // have, and would apply them twice.
        let _no_gc = self
            .inner
            .gc_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rep = Repaired::default();
        let corrupt: Vec<(Digest, Location)> = problems
            .iter()
            .filter(|p| p.is_corruption())
            .filter_map(|p| Some((p.digest?, p.location?)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let files = &self.inner.files;
        let stamp = crate::sys::now_ms();
        let qkey = |d: &Digest| {
            crate::backend::Key::Quarantine(format!("{}-{}.{stamp}", d.algorithm(), d.hex()))
        };
        // Packed bytes are copied out first (what can still be read, for inspection).
        for (d, at) in &corrupt {
            if let Location::Packed { segment, offset } = at
                && let Some(e) = self.stat(d)?
                && let Ok(b) = files.read_packed(*segment, *offset, e.size)
            {
                let k = qkey(d);
                let h = files
                    .backend
                    .create(&k)
                    .map_err(|e| files.io("create", &k, e))?;
                crate::backend::write_all_at(&*h, &b, 0).map_err(|e| files.io("write", &k, e))?;
                h.sync().map_err(|e| files.io("sync", &k, e))?;
                files
                    .backend
                    .sync_names(std::slice::from_ref(&k))
                    .map_err(|e| files.io("sync", &k, e))?;
            }
        }
        if !corrupt.is_empty() {
            let o = self.inner.meta.submit(Op::Quarantine(corrupt.clone()))?;
            // A large file moves to quarantine once no entry names it.
            for (d, e) in &o.sweep.deleted {
                if let Location::Large { generation } = e.location {
                    let from = crate::backend::Key::Large {
                        digest: *d,
                        generation,
                    };
                    let to = qkey(d);
                    let moved = match files.backend.rename(&from, &to, false) {
                        Ok(moved) => moved,
                        // Corrupt because it is missing: nothing to keep.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                        Err(e) => return Err(files.io("rename", &from, e)),
                    };
                    if moved {
                        files
                            .backend
                            .sync_names(&[to])
                            .map_err(|e| files.io("sync", &from, e))?;
                    }
                }
                rep.quarantined.push(*d);
            }
        }
        let fixed = self.inner.meta.submit(Op::RebuildCounts)?;
        rep.refcounts_fixed = fixed.rebuilt.0;
        rep.holds_fixed = fixed.rebuilt.1;
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

/// "a" or "an" before a kind's name.
fn article(k: Kind) -> &'static str {
    match k {
        Kind::Index | Kind::Other => "an",
        _ => "a",
    }
}

/// `s` with control characters escaped: messages from decoders may quote binary input.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}
