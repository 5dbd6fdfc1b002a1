//! The [`Store`]: opening a store root, the put pipeline (hash in parallel, dedupe, append
//! or write large files, fsync, one group commit), reads, and store-wide statistics.
//!
//! This module owns the order of the write path (DESIGN.md "Write path and crash
//! safety"): bytes become durable before the index commit that makes them visible, and a
//! failure at any step leaves nothing visible. It must never hand out bytes whose index
//! entry is not committed.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

use crate::blobs::{Active, Blob, Files, ShardWriter};
use crate::digest::{Algorithm, Digest, DualHasher};
use crate::error::{Error, IoContext, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN};
use crate::meta::{BlobEntry, Counters, Location, Meta, NewBlob, Op};
use crate::sys;

/// Choices for opening a store. Settings marked "init" only apply when the store is
/// created; the others may differ per open.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// (init) Number of pack shards: parallel writers each take one. Default 16.
    pub shards: u32,
    /// Blobs of at least this many bytes get a file of their own. Default 4 MiB.
    pub large_threshold: u64,
    /// A segment is sealed (and later mapped) once it reaches this size. Default 256 MiB.
    pub segment_size: u64,
    /// Create the store if it does not exist. Default true.
    pub create: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shards: 16,
            large_threshold: 4 << 20,
            segment_size: 256 << 20,
            create: true,
        }
    }
}

impl Options {
    /// Sets the shard count (used only when creating the store).
    #[must_use]
    pub fn shards(mut self, n: u32) -> Self {
        self.shards = n;
        self
    }
    /// Sets the large-blob threshold.
    #[must_use]
    pub fn large_threshold(mut self, bytes: u64) -> Self {
        self.large_threshold = bytes;
        self
    }
    /// Sets the segment size limit.
    #[must_use]
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }
    /// Whether to create a missing store.
    #[must_use]
    pub fn create(mut self, yes: bool) -> Self {
        self.create = yes;
        self
    }
}

/// What a put returns: the blob's digest and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Descriptor {
    /// The OCI digest of the bytes.
    pub digest: Digest,
    /// Their length.
    pub size: u64,
}

/// Per-put choices.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct PutOptions {
    /// The content class to record.
    pub kind: Option<Kind>,
    /// The digest the bytes must have (its algorithm is the one computed).
    pub expected: Option<Digest>,
    /// The size the bytes must have.
    pub expected_size: Option<u64>,
}

impl PutOptions {
    /// Records `kind`.
    #[must_use]
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = Some(kind);
        self
    }
    /// Requires the bytes to hash to `d`.
    #[must_use]
    pub fn expect(mut self, d: Digest) -> Self {
        self.expected = Some(d);
        self
    }
    /// Requires the bytes to be `n` long.
    #[must_use]
    pub fn expect_size(mut self, n: u64) -> Self {
        self.expected_size = Some(n);
        self
    }
}

/// Everything the index knows about one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    /// The digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Content class.
    pub kind: Kind,
    /// Where the bytes live.
    pub location: Location,
    /// blake3 of the stored bytes, hex.
    #[serde(serialize_with = "hex32")]
    pub blake3: [u8; 32],
    /// Last put or existence check, milliseconds since the Unix epoch.
    pub touched_ms: u64,
}

fn hex32<S: serde::Serializer>(b: &[u8; 32], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

impl BlobInfo {
    fn new(digest: Digest, e: &BlobEntry) -> BlobInfo {
        BlobInfo {
            digest,
            size: e.size,
            kind: e.kind,
            location: e.location,
            blake3: e.blake3,
            touched_ms: e.touched_ms,
        }
    }
}

/// Store-wide statistics (`store info`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Info {
    /// The store root.
    pub root: PathBuf,
    /// Number of blobs.
    pub blobs: u64,
    /// Sum of blob sizes.
    pub bytes: u64,
    /// Blobs stored as files of their own.
    pub large_blobs: u64,
    /// Sum of their sizes.
    pub large_bytes: u64,
    /// Pack shards.
    pub shards: u32,
    /// Pack segments.
    pub segments: u64,
    /// Of which sealed.
    pub sealed_segments: u64,
    /// Bytes of live records (headers included) in segments, plus large files.
    pub live_bytes: u64,
    /// Bytes of dead records in segments, reclaimable by compaction.
    pub dead_bytes: u64,
}

/// A content-addressed blob store rooted at one directory.
///
/// Cheap to clone (an `Arc`); `Send + Sync`; any number of threads may put and read at
/// once. Only one process may open a root read-write: a second open fails with
/// [`Error::Locked`].
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    pub opts: Options,
    pub meta: Meta,
    pub files: Files,
    shards: Vec<Mutex<ShardWriter>>,
    next_shard: AtomicUsize,
    pub ingests: Mutex<HashSet<String>>,
    _lock: File,
}

/// A blob hashed and ready to store.
pub(crate) struct Hashed<'a> {
    pub data: &'a [u8],
    pub digest: Digest,
    pub blake3: [u8; 32],
    pub kind: Kind,
}

impl Hashed<'_> {
    fn header(&self) -> RecordHeader {
        RecordHeader {
            digest: self.digest,
            kind: self.kind,
            flags: 0,
            stored_len: self.data.len() as u64,
            raw_len: self.data.len() as u64,
            blake3: self.blake3,
        }
    }
}

impl Store {
    /// Opens the store at `root`, creating it if `opts.create` is set.
    ///
    /// Open does work proportional to the number of segments, never to the number of
    /// blobs: it cuts uncommitted tails of active segments, removes segment files no
    /// committed transaction names, and clears `ingest/tmp`.
    pub fn open(root: impl AsRef<Path>, opts: Options) -> Result<Store> {
        let root = root.as_ref().to_owned();
        if opts.shards == 0 || opts.shards > 1024 {
            return Err(Error::Invalid(format!(
                "shard count {} (must be 1..=1024)",
                opts.shards
            )));
        }
        if opts.segment_size < SEGMENT_HEADER_LEN + RECORD_HEADER_LEN {
            return Err(Error::Invalid("segment size too small".into()));
        }
        let meta_path = root.join("meta.redb");
        if !meta_path.exists() && !opts.create {
            return Err(Error::NoStore { path: root });
        }
        std::fs::create_dir_all(&root).ctx("create directory", &root)?;
        sys::refuse_network_fs(&root)?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        if !sys::try_lock(&lock, &lock_path)? {
            return Err(Error::Locked { path: root });
        }
        let meta = Meta::open(&meta_path, &root)?;
        let shard_count = meta.init(opts.shards)?;
        for dir in ["packs", "large", "ingest", "quarantine"] {
            std::fs::create_dir_all(root.join(dir)).ctx("create directory", &root.join(dir))?;
        }
        let tmp = root.join("ingest").join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).ctx("remove", &tmp)?;
        }
        std::fs::create_dir_all(&tmp).ctx("create directory", &tmp)?;

        let rows = meta.segments()?;
        let max_id = rows.iter().map(|(id, _)| *id).max();
        let mut files = Files::new(&root, opts.segment_size, 0);
        let mut next_segment = max_id.map_or(1, |m| m + 1);
        for shard in 0..shard_count {
            let dir = files.shard_dir(shard);
            std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
            // Segment files no committed transaction names hold only uncommitted bytes.
            let mut removed = false;
            for ent in std::fs::read_dir(&dir).ctx("list", &dir)? {
                let ent = ent.ctx("list", &dir)?;
                let name = ent.file_name();
                let id = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("pack-"))
                    .and_then(|n| n.strip_suffix(".pack"))
                    .and_then(|n| u64::from_str_radix(n, 16).ok());
                if let Some(id) = id {
                    next_segment = next_segment.max(id + 1);
                    if !rows.iter().any(|(r, _)| *r == id) {
                        std::fs::remove_file(ent.path()).ctx("remove", &ent.path())?;
                        removed = true;
                    }
                }
            }
            if removed {
                sys::sync_dir(&dir)?;
            }
        }
        files = Files::new(&root, opts.segment_size, next_segment);

        let mut writers: Vec<ShardWriter> = (0..shard_count)
            .map(|shard| ShardWriter {
                shard,
                active: None,
            })
            .collect();
        let mut to_seal = Vec::new();
        let mut sorted = rows;
        sorted.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        for (id, row) in &sorted {
            let w = writers
                .get_mut(row.shard as usize)
                .ok_or_else(|| Error::Corrupt(format!("segment {id} in shard {}", row.shard)))?;
            if !row.sealed && w.active.is_none() {
                let path = files.segment_path(row.shard, *id);
                w.active = Some(Active::reopen(*id, path, row.committed_len)?);
                files.add_view(*id, row.shard, None);
            } else {
                if !row.sealed {
                    // An older unsealed segment (its shard moved on after a write failure).
                    to_seal.push(*id);
                }
                files.add_view(*id, row.shard, Some(row.committed_len));
            }
        }
        if !to_seal.is_empty() {
            meta.submit(Op::Seal(to_seal))?;
        }
        Ok(Store {
            inner: Arc::new(Inner {
                root,
                opts,
                meta,
                files,
                shards: writers.into_iter().map(Mutex::new).collect(),
                next_shard: AtomicUsize::new(0),
                ingests: Mutex::new(HashSet::new()),
                _lock: lock,
            }),
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Stores one blob (sha256) and returns its descriptor. Storing bytes that are already
    /// present writes nothing and refreshes the blob's `touched` time.
    pub fn put(&self, data: &[u8]) -> Result<Descriptor> {
        self.put_with(data, PutOptions::default())
    }

    /// Stores one blob with options (kind, expected digest and size).
    pub fn put_with(&self, data: &[u8], opts: PutOptions) -> Result<Descriptor> {
        let alg = opts.expected.map_or(Algorithm::Sha256, |d| d.algorithm());
        let mut h = DualHasher::new(alg);
        h.update(data);
        let (digest, blake3) = h.finish();
        check_expected(&opts, digest, data.len() as u64)?;
        let item = Hashed {
            data,
            digest,
            blake3,
            kind: opts.kind.unwrap_or(Kind::Other),
        };
        self.inner.store_hashed(&[item])?;
        Ok(Descriptor {
            digest,
            size: data.len() as u64,
        })
    }

    /// Stores many blobs (sha256) in one batch: hashed in parallel, appended to one shard
    /// with one fsync per touched segment, and made visible by one commit. Returns the
    /// descriptors in input order.
    pub fn put_many<B>(&self, blobs: impl IntoIterator<Item = B>) -> Result<Vec<Descriptor>>
    where
        B: AsRef<[u8]> + Sync,
    {
        let blobs: Vec<B> = blobs.into_iter().collect();
        let items: Vec<Hashed<'_>> = blobs
            .par_iter()
            .map(|b| {
                let data = b.as_ref();
                let mut h = DualHasher::new(Algorithm::Sha256);
                h.update(data);
                let (digest, blake3) = h.finish();
                Hashed {
                    data,
                    digest,
                    blake3,
                    kind: Kind::Other,
                }
            })
            .collect();
        self.inner.store_hashed(&items)?;
        Ok(items
            .iter()
            .map(|i| Descriptor {
                digest: i.digest,
                size: i.data.len() as u64,
            })
            .collect())
    }

    /// A read snapshot: many lookups against one consistent view of the index.
    pub fn snapshot(&self) -> Result<Snapshot<'_>> {
        Ok(Snapshot {
            store: self,
            txn: self.inner.meta.read()?,
        })
    }

    /// The bytes of a blob: zero-copy from a memory map for sealed segments and large
    /// files, a copy for the active segment.
    pub fn get(&self, d: &Digest) -> Result<Blob> {
        self.snapshot()?.get(d)
    }

    /// `len` bytes of a blob from `offset` (clamped to the blob's end).
    pub fn read_range(&self, d: &Digest, offset: u64, len: u64) -> Result<Blob> {
        let b = self.get(d)?;
        let start = (offset.min(b.len() as u64)) as usize;
        let end = (offset.saturating_add(len).min(b.len() as u64)) as usize;
        Ok(b.slice(start..end))
    }

    /// A `Read + Seek` reader over a blob.
    pub fn reader(&self, d: &Digest) -> Result<std::io::Cursor<Blob>> {
        Ok(std::io::Cursor::new(self.get(d)?))
    }

    /// What the index knows about a blob, or `None`.
    pub fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        self.snapshot()?.stat(d)
    }

    /// Whether a blob is stored (a pure read; see [`Store::ensure`] for the check a client
    /// relies on before skipping an upload).
    pub fn contains(&self, d: &Digest) -> Result<bool> {
        Ok(self.stat(d)?.is_some())
    }

    /// Whether a blob is stored, refreshing its `touched` time durably when it is, so that a
    /// client that skips an upload because of this answer is covered by the GC grace period.
    pub fn ensure(&self, d: &Digest) -> Result<bool> {
        if !self.contains(d)? {
            return Ok(false);
        }
        self.inner.meta.submit(Op::Put {
            blobs: Vec::new(),
            segments: Vec::new(),
            touch: vec![*d],
        })?;
        self.contains(d)
    }

    /// Every blob in digest order. Each page of the scan runs in a fresh read snapshot.
    #[allow(clippy::iter_without_into_iter)] // a store is not a collection of its blobs
    pub fn iter(&self) -> BlobIter<'_> {
        BlobIter {
            store: self,
            page: Vec::new().into_iter(),
            last: None,
            done: false,
        }
    }

    /// Store-wide statistics. O(segments).
    pub fn info(&self) -> Result<Info> {
        let Counters {
            blobs,
            bytes,
            large_blobs,
            large_bytes,
        } = self.inner.meta.counters()?;
        let rows = self.inner.meta.segments()?;
        let (mut packed, mut dead, mut sealed) = (0u64, 0u64, 0u64);
        for (_, r) in &rows {
            packed += r.committed_len.saturating_sub(SEGMENT_HEADER_LEN);
            dead += r.dead_bytes;
            sealed += u64::from(r.sealed);
        }
        Ok(Info {
            root: self.inner.root.clone(),
            blobs,
            bytes,
            large_blobs,
            large_bytes,
            shards: self.inner.shards.len() as u32,
            segments: rows.len() as u64,
            sealed_segments: sealed,
            live_bytes: packed.saturating_sub(dead) + large_bytes,
            dead_bytes: dead,
        })
    }
}

pub(crate) fn check_expected(opts: &PutOptions, actual: Digest, size: u64) -> Result<()> {
    if let Some(expected) = opts.expected_size
        && expected != size
    {
        return Err(Error::SizeMismatch {
            expected,
            actual: size,
        });
    }
    if let Some(expected) = opts.expected
        && expected != actual
    {
        return Err(Error::DigestMismatch { expected, actual });
    }
    Ok(())
}

impl Inner {
    /// Takes a free shard's append lock, or waits for one.
    fn take_shard(&self) -> MutexGuard<'_, ShardWriter> {
        let n = self.shards.len();
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(g) = self.shards[(start + i) % n].try_lock() {
                return g;
            }
        }
        self.shards[start]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores hashed blobs: skips those already stored (refreshing them), writes the
    /// rest (small ones appended to one shard, large ones as files, in parallel), and
    /// commits everything in one transaction.
    pub fn store_hashed(&self, items: &[Hashed<'_>]) -> Result<()> {
        let mut seen = HashSet::with_capacity(items.len());
        let mut fresh: Vec<&Hashed<'_>> = Vec::with_capacity(items.len());
        let mut touch = Vec::new();
        {
            let txn = self.meta.read()?;
            let table = txn.open_table(crate::meta::BLOBS)?;
            for it in items {
                if !seen.insert(it.digest) {
                    continue;
                }
                if redb::ReadableTable::get(&table, &*it.digest.key())?.is_some() {
                    touch.push(it.digest);
                } else {
                    fresh.push(it);
                }
            }
        }
        let (large, small): (Vec<&Hashed<'_>>, Vec<&Hashed<'_>>) = fresh
            .into_iter()
            .partition(|it| it.data.len() as u64 >= self.opts.large_threshold);

        let mut shard = if small.is_empty() {
            None
        } else {
            Some(self.take_shard())
        };
        let writer: Option<&mut ShardWriter> = shard.as_deref_mut();
        let (large_res, small_res) = rayon::join(
            || {
                large
                    .par_iter()
                    .map(|it| self.files.write_large(&it.header(), it.data))
                    .collect::<Result<Vec<u64>>>()
            },
            || match writer {
                Some(w) => {
                    let recs: Vec<_> = small.iter().map(|it| (it.header(), it.data)).collect();
                    self.files.append(w, &recs).map(Some)
                }
                None => Ok(None),
            },
        );
        let (gens, appended) = match (large_res, small_res) {
            (Ok(g), Ok(a)) => (g, a),
            (l, s) => {
                // Nothing was committed; installed large files are orphans to remove.
                if let Ok(gens) = &l {
                    for (it, g) in large.iter().zip(gens) {
                        let _ = std::fs::remove_file(self.files.large_path(&it.digest, *g));
                    }
                }
                return Err(l.err().or(s.err()).expect("one side failed"));
            }
        };

        let mut new = Vec::with_capacity(small.len() + large.len());
        let mut segments = Vec::new();
        if let Some(a) = &appended {
            for (it, p) in small.iter().zip(&a.placed) {
                new.push(new_blob(
                    it,
                    Location::Packed {
                        segment: p.segment,
                        offset: p.offset,
                    },
                ));
            }
            segments.clone_from(&a.updates);
        }
        for (it, g) in large.iter().zip(&gens) {
            new.push(new_blob(it, Location::Large { generation: *g }));
        }
        match self.meta.submit(Op::Put {
            blobs: new,
            segments,
            touch,
        }) {
            Ok(outcome) => {
                if let (Some(w), Some(a)) = (shard.as_deref_mut(), &appended) {
                    self.files.committed(w, &a.updates);
                }
                // Large copies that lost a race with a concurrent put of the same digest.
                for i in outcome.lost {
                    if let Some(k) = i.checked_sub(small.len()) {
                        let _ =
                            std::fs::remove_file(self.files.large_path(&large[k].digest, gens[k]));
                    }
                }
                Ok(())
            }
            Err(e) => {
                for (it, g) in large.iter().zip(&gens) {
                    let _ = std::fs::remove_file(self.files.large_path(&it.digest, *g));
                }
                Err(e)
            }
        }
    }

    /// Commits a large blob whose record file is already installed under `generation`.
    /// Returns whether it was new (false: the digest was stored meanwhile; the file was
    /// removed).
    pub fn commit_large(&self, it: &Hashed<'_>, size: u64, generation: u64) -> Result<bool> {
        let nb = NewBlob {
            digest: it.digest,
            entry: BlobEntry {
                size,
                stored_len: size,
                kind: it.kind,
                flags: 0,
                location: Location::Large { generation },
                blake3: it.blake3,
                touched_ms: 0,
            },
            record_len: 0,
        };
        let path = self.files.large_path(&it.digest, generation);
        match self.meta.submit(Op::Put {
            blobs: vec![nb],
            segments: Vec::new(),
            touch: Vec::new(),
        }) {
            Ok(o) if o.lost.is_empty() => Ok(true),
            Ok(_) => {
                let _ = std::fs::remove_file(path);
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }
}

fn new_blob(it: &Hashed<'_>, location: Location) -> NewBlob {
    let size = it.data.len() as u64;
    NewBlob {
        digest: it.digest,
        entry: BlobEntry {
            size,
            stored_len: size,
            kind: it.kind,
            flags: 0,
            location,
            blake3: it.blake3,
            touched_ms: 0,
        },
        record_len: match location {
            Location::Packed { .. } => RECORD_HEADER_LEN + size,
            Location::Large { .. } => 0,
        },
    }
}

/// A consistent read view of the index (a redb read transaction).
pub struct Snapshot<'s> {
    store: &'s Store,
    txn: redb::ReadTransaction,
}

impl Snapshot<'_> {
    /// What the index knows about a blob, or `None`.
    pub fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        Ok(Meta::entry(&self.txn, d)?.map(|e| BlobInfo::new(*d, &e)))
    }

    /// The bytes of a blob; [`Error::NotFound`] if absent.
    pub fn get(&self, d: &Digest) -> Result<Blob> {
        let e = Meta::entry(&self.txn, d)?.ok_or(Error::NotFound(*d))?;
        let files = &self.store.inner.files;
        match e.location {
            Location::Packed { segment, offset } => {
                files.read_packed(segment, offset, e.stored_len)
            }
            Location::Large { generation } => files.read_large(d, generation, e.stored_len),
        }
    }
}

/// Iterator over every blob (see [`Store::iter`]).
pub struct BlobIter<'s> {
    store: &'s Store,
    page: std::vec::IntoIter<(Digest, BlobEntry)>,
    last: Option<Digest>,
    done: bool,
}

const PAGE: usize = 4096;

impl Iterator for BlobIter<'_> {
    type Item = Result<BlobInfo>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((d, e)) = self.page.next() {
                self.last = Some(d);
                return Some(Ok(BlobInfo::new(d, &e)));
            }
            if self.done {
                return None;
            }
            match self.store.inner.meta.page(self.last.as_ref(), PAGE) {
                Ok(p) => {
                    self.done = p.len() < PAGE;
                    self.page = p.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
