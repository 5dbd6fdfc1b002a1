//! The [`Store`]: opening a store root, the put pipeline (hash in parallel, dedupe, append
//! or write large files, fsync, one group commit), reads, and store-wide statistics.
//!
//! This module owns the order of the write path (DESIGN.md "Write path and crash
//! safety"): bytes become durable before the index commit that makes them visible, and a
//! failure at any step leaves nothing visible. It must never hand out bytes whose index
//! entry is not committed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

use crate::backend::local::LocalBackend;
use crate::backend::{Backend, Control, Key, List, LockMode, MetaFile};
use crate::blobs::{Blob, Files, ShardWriter};
use crate::digest::{Algorithm, Digest, DualHasher};
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN};
use crate::meta::{
    Barrier, BlobEntry, Counters, Location, Meta, NewBlob, Op, PutOp, SegmentUpdate, Status,
};

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
    /// Bytes of index pages the metadata database keeps in memory (redb's cache; the rest
    /// is read through the OS page cache). Default 128 MiB, which bounds the resident
    /// memory the index adds (redb's own default is 1 GiB).
    pub meta_cache: usize,
    /// Open without writing anything, ever (a shared lock; the index opened read-only).
    /// Puts, tags and collections then fail with [`Error::ReadOnly`]. Default false.
    pub read_only: bool,
    /// Bytes of disk kept in a reserve file that the collector gives back first when the
    /// disk is full, so that a full disk can always be collected (the index needs new
    /// pages even to delete). Default 64 MiB; 0 keeps none.
    pub reserve: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shards: 16,
            large_threshold: 4 << 20,
            segment_size: 256 << 20,
            create: true,
            meta_cache: 128 << 20,
            read_only: false,
            reserve: 64 << 20,
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
    /// Sets the metadata database's page cache size.
    #[must_use]
    pub fn meta_cache(mut self, bytes: usize) -> Self {
        self.meta_cache = bytes;
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
    /// Opens without writing anything (see [`Options::read_only`]).
    #[must_use]
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }
    /// Sets the size of the disk-full reserve (0: none).
    #[must_use]
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
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
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PutOptions {
    /// The content class to record.
    pub kind: Option<Kind>,
    /// The digest the bytes must have (its algorithm is the one computed).
    pub expected: Option<Digest>,
    /// The size the bytes must have.
    pub expected_size: Option<u64>,
    /// A lease that takes the blob as a resource, in the same commit.
    pub lease: Option<String>,
    /// For a manifest or index: refuse it (storing nothing) if a child is not stored.
    pub require_children: bool,
    /// Set from another thread to stop the put: it then fails with
    /// [`Error::Interrupted`] and stores nothing (checked between chunks and before the
    /// commit; a put past its commit completes).
    pub interrupt: Option<Arc<AtomicBool>>,
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
    /// Adds the blob to lease `id` in the same commit.
    #[must_use]
    pub fn lease(mut self, id: impl Into<String>) -> Self {
        self.lease = Some(id.into());
        self
    }
    /// Refuses a manifest or index whose children are not all stored.
    #[must_use]
    pub fn require_children(mut self, yes: bool) -> Self {
        self.require_children = yes;
        self
    }
    /// Stops the put when `flag` is set ([`PutOptions::interrupt`]).
    #[must_use]
    pub fn interrupt(mut self, flag: Arc<AtomicBool>) -> Self {
        self.interrupt = Some(flag);
        self
    }
}

/// [`Error::Interrupted`] if the optional interrupt flag of an operation is set: the one
/// check every interruptible loop makes.
pub(crate) fn check_interrupt(flag: Option<&Arc<AtomicBool>>) -> Result<()> {
    match flag {
        Some(f) if f.load(Ordering::Relaxed) => Err(Error::Interrupted),
        _ => Ok(()),
    }
}

/// What storing a manifest or index did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ManifestPut {
    /// Digest and size.
    pub descriptor: Descriptor,
    /// [`Kind::Manifest`] or [`Kind::Index`].
    pub kind: Kind,
    /// Children it names that are not stored (yet); they may arrive later.
    pub absent_children: Vec<Digest>,
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
    /// Bytes of live records (headers included) in segments and in large files.
    pub live_bytes: u64,
    /// Bytes of dead records in segments, reclaimable by compaction.
    pub dead_bytes: u64,
    /// In-progress uploads (resumable ingests) and scratch objects (large puts, imports
    /// and unnamed ingests running now, or left by a killed process until the next
    /// writable open).
    pub ingests: u64,
    /// Their bytes.
    pub ingest_bytes: u64,
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

/// A [`Store`] that does not keep it open: [`WeakStore::upgrade`] gives the store while
/// another handle holds it.
#[cfg(feature = "cli")]
#[derive(Clone)]
pub(crate) struct WeakStore(std::sync::Weak<Inner>);

#[cfg(feature = "cli")]
impl WeakStore {
    /// The store, if it is still open.
    pub fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

#[cfg(feature = "cli")]
impl Store {
    /// A handle that does not keep the store open.
    pub(crate) fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .field("read_only", &self.inner.opts.read_only)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub root: PathBuf,
    pub opts: Options,
    pub meta: Meta,
    pub files: Files,
    shards: Vec<Mutex<ShardWriter>>,
    next_shard: AtomicUsize,
    /// Uploads live in this process (ingest.rs).
    pub ingests: Mutex<crate::ingest::LiveUploads>,
    /// One collection at a time per process.
    pub gc_lock: Mutex<()>,
    _lock: Box<dyn Send + Sync>,
}

/// A blob hashed and ready to store.
pub(crate) struct Hashed<'a> {
    pub data: &'a [u8],
    pub digest: Digest,
    pub blake3: [u8; 32],
    pub kind: Kind,
}

/// `put_many` hashes and writes in waves of about this many bytes.
const WAVE_BYTES: u64 = 2 << 20;

impl Hashed<'_> {
    fn clone_ref(&self) -> Hashed<'_> {
        Hashed {
            data: self.data,
            digest: self.digest,
            blake3: self.blake3,
            kind: self.kind,
        }
    }

    fn descriptor(&self) -> Descriptor {
        Descriptor {
            digest: self.digest,
            size: self.data.len() as u64,
        }
    }

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

/// Whether a root holds blob data: a segment file or a large-blob file.
fn has_data(backend: &dyn Backend, root: &Path) -> Result<bool> {
    let io = |e| Error::io("list", root.to_owned(), e);
    for l in backend.list(&List::Shards).map_err(io)? {
        let Ok(shard) = l.name.parse::<u32>() else {
            continue;
        };
        if backend
            .list(&List::Segments(shard))
            .map_err(io)?
            .iter()
            .any(|l| l.key.is_some())
        {
            return Ok(true);
        }
    }
    Ok(!backend.list(&List::Large).map_err(io)?.is_empty())
}

impl Store {
    /// Opens the store at `root` (local files), creating it if `opts.create` is set.
    ///
    /// Open does work proportional to the number of segments, never to the number of
    /// blobs, and never removes or shortens blob data: a root whose index is missing,
    /// empty or older than its data is refused with [`Error::NeedsRepair`].
    pub fn open(root: impl AsRef<Path>, opts: Options) -> Result<Store> {
        Store::open_with(Arc::new(LocalBackend::new(root.as_ref())), opts)
    }

    /// Opens the store whose files `backend` holds (see [`Store::open`]).
    pub fn open_with(backend: Arc<dyn Backend>, opts: Options) -> Result<Store> {
        if opts.shards == 0 || opts.shards > 1024 {
            return Err(Error::Invalid(format!(
                "shard count {} (must be 1..=1024)",
                opts.shards
            )));
        }
        if opts.segment_size < SEGMENT_HEADER_LEN + RECORD_HEADER_LEN {
            return Err(Error::Invalid("segment size too small".into()));
        }
        let root = backend
            .local_root()
            .map_or_else(|| PathBuf::from(backend.describe()), Path::to_owned);
        let write = !opts.read_only;
        let io = |op: &'static str| {
            let root = root.clone();
            move |e| Error::io(op, root.clone(), e)
        };
        backend.check()?;
        let witness = backend
            .read_control(Control::Witness)
            .map_err(io("read"))?
            .and_then(|b| crate::meta::decode_witness(&b))
            .unwrap_or(0);
        let meta_len = backend.meta_len(MetaFile::Main).map_err(io("stat"))?;
        if meta_len.is_none_or(|n| n == 0) {
            // No index: refused before anything is written if there is data it would
            // have to account for.
            if witness > 0 || has_data(&*backend, &root)? {
                return Err(Error::NeedsRepair {
                    path: root,
                    reason: "the root holds store data but its index (meta.redb) is missing \
                             or empty"
                        .into(),
                });
            }
            if meta_len.is_none() && (!opts.create || !write) {
                return Err(Error::NoStore { path: root });
            }
        }
        if write {
            backend.prepare(0).map_err(io("create"))?;
        }
        let mode = if write {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        let lock = backend
            .lock(mode)
            .map_err(io("lock"))?
            .ok_or_else(|| Error::Locked { path: root.clone() })?;
        let meta = Meta::open(&backend, MetaFile::Main, opts.meta_cache, write)?
            .ok_or_else(|| Error::NoStore { path: root.clone() })?;
        let shard_count = match meta.status()? {
            Status::Ready { shards, seq } => {
                if witness > seq {
                    return Err(Error::NeedsRepair {
                        path: root,
                        reason: format!(
                            "the index (meta.redb) is older than the data: its newest commit \
                             is number {seq}, but commit {witness} was made (was an older copy \
                             of it restored?)"
                        ),
                    });
                }
                shards
            }
            Status::Empty => {
                if witness > 0 || has_data(&*backend, &root)? {
                    return Err(Error::NeedsRepair {
                        path: root,
                        reason: "the root holds store data but its index (meta.redb) is \
                                 missing or empty"
                            .into(),
                    });
                }
                if !write || !opts.create {
                    return Err(Error::NoStore { path: root });
                }
                meta.init(opts.shards, witness)?;
                opts.shards
            }
        };
        if write {
            meta.ensure_tables()?;
            if Meta::owes_counts(&*meta.read()?)? {
                // A collection was cut short between deleting parents and writing their
                // children's decrements: the edges are the truth.
                meta.submit(Op::RebuildCounts)?;
            }
            backend.prepare(shard_count).map_err(io("create"))?;
            // Scratch belongs to writers that are gone; uploads are kept for resume.
            backend.clear_scratch().map_err(io("clear scratch"))?;
            if opts.reserve > 0 {
                // A disk too full for the reserve still opens: the collector is what
                // frees it, and it makes the reserve again once there is room.
                let reserved = backend.ensure_reserve(opts.reserve).map_err(io("reserve"));
                if let Err(e) = reserved
                    && !e.is_no_space()
                {
                    return Err(e);
                }
            }
        } else if meta.lacks_tables()? {
            return Err(Error::NeedsRecovery {
                path: root,
                why: "was made by an earlier build and its index lacks tables this one reads",
            });
        }

        // Segment files no row names are left alone (an uncommitted batch's, or one whose
        // index is lost: `repair` can read them); new ids are past every one of them.
        let rows = meta.segments()?;
        let mut next_segment = rows.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
        for shard in 0..shard_count {
            for l in backend.list(&List::Segments(shard)).map_err(io("list"))? {
                if let Some(Key::Segment { id, .. }) = l.key {
                    next_segment = next_segment.max(id + 1);
                }
            }
        }
        let files = Files::new(backend, !write, opts.segment_size, next_segment);

        let mut writers: Vec<ShardWriter> = (0..shard_count)
            .map(|shard| ShardWriter {
                shard,
                active: None,
                created: Vec::new(),
            })
            .collect();
        let mut to_seal = Vec::new();
        let mut sorted = rows;
        sorted.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        for (id, row) in &sorted {
            let w = writers
                .get_mut(row.shard as usize)
                .ok_or_else(|| Error::Corrupt(format!("segment {id} in shard {}", row.shard)))?;
            if write && !row.sealed && w.active.is_none() {
                match files.reopen_active(row.shard, *id, row.committed_len) {
                    Ok(a) => {
                        w.active = Some(a);
                        files.add_view(*id, row.shard, None);
                    }
                    // Missing, short or with a bad header: it takes no appends, and the
                    // rest of the store stays usable. Its records read as far as they are
                    // there (the rest are `Corrupt`), and `verify` names them.
                    Err(Error::Corrupt(_)) => {
                        to_seal.push(*id);
                        files.add_view(*id, row.shard, Some(row.committed_len));
                    }
                    Err(e) => return Err(e),
                }
            } else if row.sealed {
                files.add_view(*id, row.shard, Some(row.committed_len));
            } else {
                // An older unsealed segment (its shard moved on after a write failure), or
                // any unsealed one of a read-only open: read with positioned reads.
                if write {
                    to_seal.push(*id);
                }
                files.add_view(*id, row.shard, None);
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
                ingests: Mutex::new(crate::ingest::LiveUploads::new()),
                gc_lock: Mutex::new(()),
                _lock: lock,
            }),
        })
    }

    /// Whether the store was opened read-only (`Options::read_only`).
    pub fn is_read_only(&self) -> bool {
        self.inner.opts.read_only
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
    #[allow(clippy::needless_pass_by_value)] // options are built inline by callers
    #[tracing::instrument(level = "debug", name = "put", skip_all, fields(size = data.len()))]
    pub fn put_with(&self, data: &[u8], opts: PutOptions) -> Result<Descriptor> {
        let alg = opts.expected.map_or(Algorithm::Sha256, |d| d.algorithm());
        let kind = opts.kind.unwrap_or(Kind::Other);
        let known = match opts.expected {
            Some(d) => self.contains(&d)?,
            None => false,
        };
        if data.len() as u64 >= self.inner.opts.large_threshold
            && !known
            && !matches!(kind, Kind::Manifest | Kind::Index)
        {
            return self.put_large(data, &opts, alg, kind);
        }
        let mut h = DualHasher::new(alg);
        h.update(data);
        let (digest, blake3) = h.finish();
        check_expected(&opts, digest, data.len() as u64)?;
        check_interrupt(opts.interrupt.as_ref())?;
        let item = Hashed {
            data,
            digest,
            blake3,
            kind: opts.kind.unwrap_or(Kind::Other),
        };
        self.inner.store_hashed(&[item], &opts)?;
        Ok(Descriptor {
            digest,
            size: data.len() as u64,
        })
    }

    /// A large blob in one pass: each chunk is written to its file while it is hashed
    /// (the OCI hash on one core, blake3 and the write on the other), so the data is
    /// mostly on its way to the disk when hashing ends; then header, fsync, rename, commit.
    fn put_large(
        &self,
        data: &[u8],
        opts: &PutOptions,
        alg: Algorithm,
        kind: Kind,
    ) -> Result<Descriptor> {
        let files = &self.inner.files;
        let st = files.stage("put")?;
        let handle = st.handle.clone();
        // Writeback starts while hashing goes on: every 16 MiB a helper thread syncs what
        // is written so far, so the final sync finds little left to do.
        let (kick, kicks) = std::sync::mpsc::sync_channel::<()>(1);
        let flusher_handle = handle.clone();
        let flusher = std::thread::spawn(move || {
            while kicks.recv().is_ok() {
                let _ = flusher_handle.sync();
            }
        });
        let written = (|| {
            let mut h = DualHasher::new(alg);
            let mut at = RECORD_HEADER_LEN;
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                check_interrupt(opts.interrupt.as_ref())?;
                let (w, ()) = h.update_overlapped(
                    chunk,
                    || crate::backend::write_all_at(&*handle, chunk, at),
                    || (),
                );
                w.map_err(|e| files.io("write", &st.key, e))?;
                at += chunk.len() as u64;
                if i % 16 == 15 {
                    let _ = kick.try_send(());
                }
            }
            drop(kick);
            let (digest, blake3) = h.finish();
            check_expected(opts, digest, data.len() as u64)?;
            let header = RecordHeader {
                digest,
                kind,
                flags: 0,
                stored_len: data.len() as u64,
                raw_len: data.len() as u64,
                blake3,
            };
            crate::backend::write_all_at(&*handle, &header.encode(), 0)
                .map_err(|e| files.io("write", &st.key, e))?;
            Ok((digest, blake3))
        })();
        let _ = flusher.join();
        let discard = || {
            let _ = files.backend.remove(&st.key);
        };
        let (digest, blake3) = match written.and_then(|x| {
            check_interrupt(opts.interrupt.as_ref())?;
            Ok(x)
        }) {
            Ok(x) => x,
            Err(e) => {
                discard();
                return Err(e);
            }
        };
        // Stored already (or meanwhile)? Then that copy is refreshed (and leased) in a
        // write transaction, exactly as a fresh put would be, and ours is dropped; if the
        // check finds it gone, ours is stored after all.
        match self.inner.touch_stored(&digest, opts.lease.as_deref()) {
            Ok(true) => {
                discard();
                return Ok(Descriptor {
                    digest,
                    size: data.len() as u64,
                });
            }
            Ok(false) => {}
            Err(e) => {
                discard();
                return Err(e);
            }
        }
        let generation = match files.publish(&[(&st.key, &*handle, digest)]) {
            Ok(g) => g[0],
            Err(e) => {
                discard();
                return Err(e);
            }
        };
        let item = Hashed {
            data: &[],
            digest,
            blake3,
            kind,
        };
        self.inner
            .commit_large(&item, data.len() as u64, generation, opts.lease.clone())?;
        Ok(Descriptor {
            digest,
            size: data.len() as u64,
        })
    }

    /// Stores a manifest or index (recognised by media type or shape; schema 1 refused),
    /// adding its edges and its children's reference counts in the same commit that makes
    /// it visible. Children may be stored before or after; those absent are reported, or
    /// refused with [`Error::MissingChildren`] under `opts.require_children`.
    pub fn put_manifest(&self, data: &[u8], opts: PutOptions) -> Result<ManifestPut> {
        let parsed = crate::image::parse(data)?;
        let kind = parsed.kind;
        let descriptor = self.put_with(
            data,
            PutOptions {
                kind: Some(kind),
                ..opts
            },
        )?;
        let txn = self.inner.meta.read()?;
        let blobs = txn.open_table(crate::meta::BLOBS)?;
        let mut absent_children = Vec::new();
        for c in parsed.edge_targets() {
            if redb::ReadableTable::get(&blobs, &*c.key())?.is_none() {
                absent_children.push(c);
            }
        }
        Ok(ManifestPut {
            descriptor,
            kind,
            absent_children,
        })
    }

    /// Stores many blobs (sha256) in one batch: hashed in parallel, appended to one shard
    /// with one fsync per touched segment, and made visible by one commit. Returns the
    /// descriptors in input order.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn put_many<B>(&self, blobs: impl IntoIterator<Item = B>) -> Result<Vec<Descriptor>>
    where
        B: AsRef<[u8]> + Sync,
    {
        self.put_many_kinds(blobs.into_iter().map(|b| (b, Kind::Other)))
    }

    /// [`Store::put_many`] with a kind per blob: manifests and indexes are parsed and their
    /// edges written in the same commit (a malformed one fails the whole batch, storing
    /// nothing).
    pub fn put_many_kinds<B>(
        &self,
        blobs: impl IntoIterator<Item = (B, Kind)>,
    ) -> Result<Vec<Descriptor>>
    where
        B: AsRef<[u8]> + Sync,
    {
        let blobs: Vec<(B, Kind)> = blobs.into_iter().collect();
        // Waves of about WAVE_BYTES: hashing wave k+1 overlaps writing wave k.
        let mut waves = Vec::new();
        let (mut start, mut bytes) = (0, 0u64);
        for (i, (b, _)) in blobs.iter().enumerate() {
            bytes += b.as_ref().len() as u64 + RECORD_HEADER_LEN;
            if bytes >= WAVE_BYTES {
                waves.push(&blobs[start..=i]);
                (start, bytes) = (i + 1, 0);
            }
        }
        if start < blobs.len() {
            waves.push(&blobs[start..]);
        }
        let mut all: Vec<Hashed<'_>> = Vec::with_capacity(blobs.len());
        let mut batch = Batch::new(&self.inner);
        let mut current = waves.first().map(|w| hash_wave(w)).unwrap_or_default();
        for next in waves.iter().skip(1) {
            // The batch holds the shard's lock guard, which stays on this thread; the next
            // wave is hashed on the pool meanwhile.
            let mut hashed = Vec::new();
            let written = rayon::in_place_scope(|s| {
                s.spawn(|_| hashed = hash_wave(next));
                batch.add(&current)
            });
            written?;
            all.append(&mut current);
            current = hashed;
        }
        batch.add(&current)?;
        all.append(&mut current);
        let missing = batch.commit()?;
        self.inner
            .store_missing(&all, missing.missing, &PutOptions::default())?;
        Ok(all.iter().map(Hashed::descriptor).collect())
    }

    /// A read snapshot: many lookups against one consistent view of the index.
    pub fn snapshot(&self) -> Result<Snapshot<'_>> {
        let read = self.inner.meta.read()?;
        Ok(Snapshot {
            store: self,
            blobs: read.open_table(crate::meta::BLOBS)?,
            _read: read,
        })
    }

    /// The bytes of a blob: zero-copy from a memory map for sealed segments and large
    /// files, a copy for the active segment.
    pub fn get(&self, d: &Digest) -> Result<Blob> {
        let b = self.snapshot()?.get(d)?;
        self.count_read(b.len());
        Ok(b)
    }

    fn count_read(&self, n: usize) {
        let st = &self.inner.meta.stats;
        crate::metrics::add(&st.reads, 1);
        crate::metrics::add(&st.bytes_read, n as u64);
    }

    /// The store's counters since it was opened (bytes and blobs in and out, commits
    /// and their latency, waits, collections): cheap, for a host to export.
    pub fn metrics(&self) -> crate::Metrics {
        self.inner.meta.stats.snapshot()
    }

    /// `len` bytes of a blob from `offset`, clamped to the blob's end (as an HTTP range
    /// is). An `offset` past the end is [`Error::OutOfRange`]; at the end, the range is
    /// empty.
    pub fn read_range(&self, d: &Digest, offset: u64, len: u64) -> Result<Blob> {
        let b = self.snapshot()?.get(d)?;
        let size = b.len() as u64;
        if offset > size {
            return Err(Error::OutOfRange {
                digest: *d,
                offset,
                size,
            });
        }
        let end = offset.saturating_add(len).min(size) as usize;
        self.count_read(end - offset as usize);
        Ok(b.slice(offset as usize..end))
    }

    /// A `Read + Seek` reader over a blob.
    pub fn reader(&self, d: &Digest) -> Result<std::io::Cursor<Blob>> {
        Ok(std::io::Cursor::new(self.get(d)?))
    }

    /// What the index knows about a blob, or `None`.
    ///
    /// `touched_ms` includes a refresh by [`Store::ensure`] that no transaction has
    /// written yet.
    pub fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        let mut info = self.snapshot()?.stat(d)?;
        if let (Some(i), Some(ms)) = (info.as_mut(), self.inner.meta.pending_touch(d)) {
            i.touched_ms = i.touched_ms.max(ms);
        }
        Ok(info)
    }

    /// Whether a blob is stored (a pure read; see [`Store::ensure`] for the check a client
    /// relies on before skipping an upload).
    pub fn contains(&self, d: &Digest) -> Result<bool> {
        Ok(self.stat(d)?.is_some())
    }

    /// Whether a blob is stored, refreshing its `touched` time when it is, so that a client
    /// that skips an upload because of this answer (a registry's `HEAD`) is covered by the
    /// GC grace period. Costs no commit of its own: the refresh is written by the next
    /// transaction of any writer or collection, and a collection in this process always
    /// honours it. A crash before that commit loses the refresh — safe, because the worst
    /// it allows is a later collection taking the blob, which a manifest put then reports
    /// as an absent child (the client uploads it again). [`Store::ensure_durable`] commits
    /// the refresh before it answers.
    pub fn ensure(&self, d: &Digest) -> Result<bool> {
        /// Waiting refreshes beyond this are committed at once (memory stays bounded).
        const MAX_PENDING: usize = 1 << 16;
        let (later, pending) = self.inner.meta.touch_later(d, crate::sys::now_ms());
        if !later {
            // A collection is deciding right now; order the refresh after it.
            return self.ensure_durable(d);
        }
        let there = self.contains(d)?;
        if pending > MAX_PENDING {
            self.inner.meta.submit(crate::meta::Op::Seal(Vec::new()))?;
        }
        Ok(there)
    }

    /// [`Store::ensure`] with the refresh committed durably before it answers (one commit,
    /// shared with concurrent writers).
    pub fn ensure_durable(&self, d: &Digest) -> Result<bool> {
        if !self.contains(d)? {
            return Ok(false);
        }
        self.inner.touch_stored(d, None)
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
        let backend = &self.inner.files.backend;
        let (mut ingests, mut ingest_bytes) = (0u64, 0u64);
        for what in [List::Uploads, List::Scratch] {
            for l in backend
                .list(&what)
                .map_err(|e| Error::io("list", self.inner.root.clone(), e))?
            {
                if matches!(
                    l.key,
                    Some(
                        Key::Scratch(_)
                            | Key::Upload {
                                part: crate::backend::UploadPart::Data,
                                ..
                            }
                    )
                ) {
                    ingests += 1;
                    ingest_bytes += l.len.unwrap_or(0);
                }
            }
        }
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
            live_bytes: packed.saturating_sub(dead) + large_bytes + large_blobs * RECORD_HEADER_LEN,
            dead_bytes: dead,
            ingests,
            ingest_bytes,
        })
    }
}

/// Hashes blobs in parallel (sha256 + blake3 each).
fn hash_wave<B: AsRef<[u8]> + Sync>(wave: &[(B, Kind)]) -> Vec<Hashed<'_>> {
    wave.par_iter()
        .map(|(b, kind)| {
            let data = b.as_ref();
            let mut h = DualHasher::new(Algorithm::Sha256);
            h.update(data);
            let (digest, blake3) = h.finish();
            Hashed {
                data,
                digest,
                blake3,
                kind: *kind,
            }
        })
        .collect()
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
    pub(crate) fn take_shard(&self) -> MutexGuard<'_, ShardWriter> {
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

    /// Submits a change that frees space (removing a name, a container, a lease): on a
    /// full disk the index cannot take even that, so its ENOSPC gives the disk-full
    /// reserve back and it is tried once more.
    pub(crate) fn freeing(&self, make: impl Fn() -> Op) -> Result<crate::meta::Outcome> {
        match self.meta.submit(make()) {
            Err(e)
                if e.is_no_space()
                    && self
                        .files
                        .backend
                        .release_reserve()
                        .map_err(|e| Error::io("reserve", self.root.clone(), e))? =>
            {
                self.meta.submit(make())
            }
            r => r,
        }
    }

    /// Takes one shard's append lock, waiting for it.
    pub(crate) fn lock_shard(&self, shard: u32) -> MutexGuard<'_, ShardWriter> {
        self.shards[shard as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store's shard count.
    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Stores hashed blobs in one batch (see [`Batch`]).
    pub fn store_hashed(&self, items: &[Hashed<'_>], opts: &PutOptions) -> Result<()> {
        let mut batch = Batch::new(self);
        batch.lease.clone_from(&opts.lease);
        batch.require_children = opts.require_children;
        batch.add(items)?;
        let missing = batch.commit()?.missing;
        self.store_missing(items, missing, opts)
    }

    /// Stores again the blobs a batch found present at its existence check but gone by
    /// its commit (a collector deleted them in between), until none is missing.
    pub fn store_missing(
        &self,
        items: &[Hashed<'_>],
        mut missing: Vec<Digest>,
        opts: &PutOptions,
    ) -> Result<()> {
        for _ in 0..8 {
            if missing.is_empty() {
                return Ok(());
            }
            let want: HashSet<Digest> = missing.drain(..).collect();
            let again: Vec<Hashed<'_>> = items
                .iter()
                .filter(|it| want.contains(&it.digest))
                .map(Hashed::clone_ref)
                .collect();
            let mut batch = Batch::new(self);
            batch.lease.clone_from(&opts.lease);
            batch.add(&again)?;
            missing = batch.commit()?.missing;
        }
        Err(Error::Corrupt(
            "blobs kept disappearing between existence check and commit".into(),
        ))
    }

    /// The dedupe check every put path makes before skipping its own copy: in one write
    /// transaction, refreshes `d`'s touch time and adds it to `lease` (exactly what storing
    /// it would do). `Ok(false)`: it is not stored (never was, or a collector deleted it
    /// since the caller looked), and the caller must store its bytes.
    pub(crate) fn touch_stored(&self, d: &Digest, lease: Option<&str>) -> Result<bool> {
        let o = self.meta.submit(Op::Put(PutOp {
            touch: vec![*d],
            lease: lease.map(str::to_owned),
            ..PutOp::default()
        }))?;
        Ok(o.missing.is_empty())
    }

    /// Commits a large blob whose record file is already installed under `generation`.
    /// Returns whether it was new (false: the digest was stored meanwhile; the file was
    /// removed).
    pub fn commit_large(
        &self,
        it: &Hashed<'_>,
        size: u64,
        generation: u64,
        lease: Option<String>,
    ) -> Result<bool> {
        let mut nb = new_blob(it, Location::Large { generation }, &Graph::default());
        nb.entry.size = size;
        nb.entry.stored_len = size;
        let r = match self.meta.submit(Op::Put(PutOp {
            blobs: vec![nb],
            lease,
            ..PutOp::default()
        })) {
            Ok(o) if o.lost.is_empty() => Ok(true),
            Ok(_) => {
                // A concurrent put of the same bytes won: ours is dead.
                self.files.remove_large(&it.digest, generation);
                Ok(false)
            }
            // The commit may have reached the disk: leave the file (an orphan at worst),
            // and in flight for the life of this process, so that no orphan pass removes
            // a file the index may name.
            Err(e) if !e.is_refusal() => return Err(e),
            // Refused inside the transaction: certainly not indexed.
            Err(e) => {
                self.files.remove_large(&it.digest, generation);
                Err(e)
            }
        };
        self.files.settled(&it.digest, generation);
        r
    }
}

/// One write batch: blobs added in one or more steps (so hashing the next step can overlap
/// writing this one), made durable and visible by one commit. Small blobs go to one shard
/// whose append lock the batch holds until it commits; large ones get files of their own.
/// A batch dropped without a successful commit removes its large files and leaves its
/// appended records uncommitted (the next append overwrites them).
pub(crate) struct Batch<'a> {
    inner: &'a Inner,
    shard: Option<MutexGuard<'a, ShardWriter>>,
    seen: HashSet<Digest>,
    new: Vec<NewBlob>,
    segments: Vec<SegmentUpdate>,
    touch: Vec<Digest>,
    /// Installed large files (digest, generation), removed unless committed.
    large: Vec<(Digest, u64)>,
    /// Records were appended to the shard's active segment.
    appended: bool,
    /// Settled: committed, or refused and cleaned up; nothing is left for `Drop` to undo.
    committed: bool,
    /// Existing blobs stored again as manifests or indexes.
    upgrade: Vec<NewBlob>,
    /// Names to set in the commit.
    pub names: Vec<(String, Digest)>,
    /// Lease taking every blob of the batch.
    pub lease: Option<String>,
    /// Refuse manifests whose children are absent.
    pub require_children: bool,
}

/// The edges a blob adds (for manifests and indexes).
#[derive(Default)]
pub(crate) struct Graph {
    kind: Option<Kind>,
    children: Vec<(Digest, Kind)>,
    subject: Option<Digest>,
}

impl Graph {
    /// Parses a manifest or index; other kinds add no edges.
    fn of(it: &Hashed<'_>) -> Result<Graph> {
        if !matches!(it.kind, Kind::Manifest | Kind::Index) {
            return Ok(Graph::default());
        }
        let p = crate::image::parse(it.data)?;
        Ok(Graph {
            kind: Some(p.kind),
            children: {
                let mut seen = HashSet::new();
                p.children
                    .iter()
                    .filter(|c| seen.insert(c.digest))
                    .map(|c| (c.digest, c.kind))
                    .collect()
            },
            subject: p.subject,
        })
    }
}

/// What a batch commit reports.
pub(crate) struct Committed {
    /// Blobs seen at the existence check but gone at commit.
    pub missing: Vec<Digest>,
}

impl<'a> Batch<'a> {
    pub fn new(inner: &'a Inner) -> Batch<'a> {
        Batch {
            inner,
            shard: None,
            seen: HashSet::new(),
            new: Vec::new(),
            segments: Vec::new(),
            touch: Vec::new(),
            large: Vec::new(),
            appended: false,
            committed: false,
            upgrade: Vec::new(),
            names: Vec::new(),
            lease: None,
            require_children: false,
        }
    }

    /// Writes the blobs not yet stored (small ones appended to the batch's shard, large
    /// ones as files, in parallel); blobs already stored are only refreshed at commit.
    pub fn add(&mut self, items: &[Hashed<'_>]) -> Result<()> {
        let inner = self.inner;
        let mut fresh: Vec<&Hashed<'_>> = Vec::with_capacity(items.len());
        {
            let txn = inner.meta.read()?;
            let table = txn.open_table(crate::meta::BLOBS)?;
            for it in items {
                if !self.seen.insert(it.digest) {
                    continue;
                }
                if redb::ReadableTable::get(&table, &*it.digest.key())?.is_some() {
                    if matches!(it.kind, Kind::Manifest | Kind::Index) {
                        // Stored before, maybe plainly: it takes the kind and its edges.
                        self.upgrade.push(new_blob(
                            it,
                            Location::Large { generation: 0 },
                            &Graph::of(it)?,
                        ));
                    } else {
                        self.touch.push(it.digest);
                    }
                } else {
                    fresh.push(it);
                }
            }
        }
        // Parse manifests before writing anything: malformed JSON stores nothing.
        let graphs: HashMap<Digest, Graph> = fresh
            .iter()
            .filter(|it| matches!(it.kind, Kind::Manifest | Kind::Index))
            .map(|it| Ok((it.digest, Graph::of(it)?)))
            .collect::<Result<_>>()?;
        let none = Graph::default();
        let graph = |d: &Digest| graphs.get(d).unwrap_or(&none);
        let (large, small): (Vec<&Hashed<'_>>, Vec<&Hashed<'_>>) = fresh
            .into_iter()
            .partition(|it| it.data.len() as u64 >= inner.opts.large_threshold);
        if !small.is_empty() && self.shard.is_none() {
            self.shard = Some(inner.take_shard());
        }
        let writer: Option<&mut ShardWriter> = self.shard.as_deref_mut();
        let write_large = || {
            large
                .par_iter()
                .map(|it| inner.files.write_large(&it.header(), it.data))
                .collect::<Vec<Result<u64>>>()
        };
        let appended = &mut self.appended;
        let append_small = || match writer {
            Some(w) if !small.is_empty() => {
                *appended = true;
                let recs: Vec<_> = small.iter().map(|it| (it.header(), it.data)).collect();
                inner.files.append(w, &recs).map(Some)
            }
            _ => Ok(None),
        };
        // Only large files are worth the pool: a small put must not queue behind whatever
        // else the pool runs (a collector's mark, another caller's hashing).
        let (large_res, small_res) = if large.is_empty() {
            (Vec::new(), append_small())
        } else {
            rayon::join(write_large, append_small)
        };
        let mut first_err = None;
        for (it, r) in large.iter().zip(large_res) {
            match r {
                Ok(g) => {
                    self.large.push((it.digest, g));
                    let location = Location::Large { generation: g };
                    self.new.push(new_blob(it, location, graph(&it.digest)));
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        match small_res {
            Ok(Some(a)) => {
                for (it, p) in small.iter().zip(&a.placed) {
                    let location = Location::Packed {
                        segment: p.segment,
                        offset: p.offset,
                    };
                    self.new.push(new_blob(it, location, graph(&it.digest)));
                }
                self.segments.extend(a.updates);
            }
            Ok(None) => {}
            Err(e) => first_err = first_err.or(Some(e)),
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Refreshes an existing blob in the commit (it is reported missing if it is gone by
    /// then).
    pub fn touch_existing(&mut self, d: Digest) {
        if self.seen.insert(d) {
            self.touch.push(d);
        }
    }

    /// Adds a blob whose record file the caller already installed in `large/`. The file is
    /// removed if the batch is dropped before its commit.
    pub fn add_installed(&mut self, it: &Hashed<'_>, size: u64, location: Location) -> Result<()> {
        let Location::Large { generation } = location else {
            return Err(Error::Invalid("add_installed takes large blobs".into()));
        };
        if !self.seen.insert(it.digest) {
            self.inner.files.remove_large(&it.digest, generation);
            self.inner.files.settled(&it.digest, generation);
            return Ok(());
        }
        self.large.push((it.digest, generation));
        let mut nb = new_blob(it, location, &Graph::of(it)?);
        nb.entry.size = size;
        nb.entry.stored_len = size;
        self.new.push(nb);
        Ok(())
    }

    /// fsyncs the shard's active segment on another thread while the commit queue does
    /// the index work, and commits once the fsync is done. Returns the digests that were
    /// present at [`Batch::add`] but gone at the commit (see `Inner::store_missing`).
    ///
    /// Once the commit is attempted, large files are no longer removed on failure: a
    /// failed commit may still have reached the disk, and an unindexed file is only an
    /// orphan for the collector, while a removed indexed one would be lost.
    pub fn commit(mut self) -> Result<Committed> {
        let inner = self.inner;
        let finish = match self.shard.as_deref_mut() {
            Some(w) => inner.files.finish_batch(w),
            None => None,
        };
        let (job, segments) = match finish {
            Some((update, job)) => {
                let mut segs = std::mem::take(&mut self.segments);
                segs.push(update);
                (Some(job), segs)
            }
            None => (None, std::mem::take(&mut self.segments)),
        };
        let blobs = std::mem::take(&mut self.new);
        let locations: Vec<(Digest, Location)> =
            blobs.iter().map(|b| (b.digest, b.entry.location)).collect();
        let large = std::mem::take(&mut self.large);
        let committed = std::thread::scope(|s| {
            let durable = job.as_ref().map(|job| {
                let (tx, barrier) = Barrier::new();
                s.spawn(move || {
                    let _ = tx.send(job.run());
                });
                barrier
            });
            inner.meta.submit(Op::Put(PutOp {
                blobs,
                segments: segments.clone(),
                touch: std::mem::take(&mut self.touch),
                upgrade: std::mem::take(&mut self.upgrade),
                durable,
                names: std::mem::take(&mut self.names),
                lease: self.lease.take(),
                require_children: self.require_children,
            }))
        });
        // Indexed now, or refused (removed below): no longer in flight. After any other
        // failure the commit may have landed: the files stay in flight for the life of
        // this process, so no orphan pass removes a file the index may name.
        if committed.as_ref().map_or_else(Error::is_refusal, |_| true) {
            for (d, g) in &large {
                inner.files.settled(d, *g);
            }
        }
        let committed = match committed {
            Ok(c) => c,
            Err(e) => {
                if e.is_refusal() {
                    // Refused inside the transaction: certainly nothing committed. Its
                    // large files go now, and the shard rewinds (the next append
                    // overwrites the records) instead of retiring its segment.
                    for (d, g) in large {
                        inner.files.remove_large(&d, g);
                    }
                    if let Some(w) = self.shard.as_deref_mut() {
                        Files::rewind(w);
                    }
                    self.committed = true;
                }
                return Err(e);
            }
        };
        if let Some(w) = self.shard.as_deref_mut() {
            inner.files.committed(w, &segments);
        }
        self.committed = true;
        // Large copies that lost a race with a concurrent put of the same digest are dead.
        for i in committed.lost {
            if let Some((d, Location::Large { generation })) = locations.get(i) {
                inner.files.remove_large(d, *generation);
            }
        }
        Ok(Committed {
            missing: committed.missing,
        })
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.committed {
            for (d, g) in &self.large {
                self.inner.files.settled(d, *g);
            }
            return;
        }
        // Not committed: installed large files are orphans, and the shard's active segment
        // may hold a failed write or an fsync error: it takes no more appends.
        for (d, g) in self.large.drain(..) {
            self.inner.files.remove_large(&d, g);
            self.inner.files.settled(&d, g);
        }
        if self.appended
            && let Some(w) = self.shard.as_deref_mut()
        {
            w.active = None;
        }
    }
}

fn new_blob(it: &Hashed<'_>, location: Location, graph: &Graph) -> NewBlob {
    let size = it.data.len() as u64;
    NewBlob {
        digest: it.digest,
        children: graph.children.clone(),
        subject: graph.subject,
        entry: BlobEntry {
            size,
            stored_len: size,
            kind: graph.kind.unwrap_or(it.kind),
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
    /// The `blobs` table, opened once for every lookup through this snapshot.
    blobs: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    /// Keeps the snapshot registered (segments it may read stay mapped).
    _read: crate::meta::Read<'s>,
}

impl Snapshot<'_> {
    /// The index entry of a blob in this snapshot.
    pub(crate) fn entry(&self, d: &Digest) -> Result<Option<BlobEntry>> {
        redb::ReadableTable::get(&self.blobs, &*d.key())?
            .map(|v| BlobEntry::decode(v.value()))
            .transpose()
    }

    /// What the index knows about a blob, or `None`.
    pub fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        Ok(self.entry(d)?.map(|e| BlobInfo::new(*d, &e)))
    }

    /// The bytes of a blob; [`Error::NotFound`] if absent.
    pub fn get(&self, d: &Digest) -> Result<Blob> {
        let e = self.entry(d)?.ok_or(Error::NotFound(*d))?;
        let files = &self.store.inner.files;
        match e.location {
            Location::Packed { segment, offset } => {
                files.read_packed(segment, offset, e.stored_len)
            }
            Location::Large { generation } => files.read_large(d, generation, e.stored_len, false),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hashed(data: &[u8]) -> Hashed<'_> {
        let mut h = DualHasher::new(Algorithm::Sha256);
        h.update(data);
        let (digest, blake3) = h.finish();
        Hashed {
            data,
            digest,
            blake3,
            kind: Kind::Other,
        }
    }

    /// A blob that a batch saw as stored (so it skipped writing it) but that a collector
    /// deleted before the batch committed is written after all.
    #[test]
    fn blob_deleted_between_check_and_commit_is_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let data = b"deleted under our feet".to_vec();
        let d = store.put(&data).unwrap().digest;
        let items = [hashed(&data)];

        let mut batch = Batch::new(&store.inner);
        batch.add(&items).unwrap();
        store.inner.meta.remove_for_test(&d).unwrap();
        assert!(!store.contains(&d).unwrap());
        let missing = batch.commit().unwrap().missing;
        assert_eq!(missing, vec![d]);

        store
            .inner
            .store_missing(&items, missing, &PutOptions::default())
            .unwrap();
        assert_eq!(&*store.get(&d).unwrap(), &data[..]);
        assert_eq!(store.info().unwrap().blobs, 1);
    }

    /// `ensure` answers from a write transaction: after a delete it says absent.
    #[test]
    fn ensure_reports_absent_after_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let d = store.put(b"x").unwrap().digest;
        assert!(store.ensure(&d).unwrap());
        store.inner.meta.remove_for_test(&d).unwrap();
        assert!(!store.ensure(&d).unwrap());
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    /// A batch the index refuses (here: a manifest whose children are absent, under
    /// `require_children`) leaves no large file behind and keeps its shard's segment.
    #[test]
    fn a_refused_batch_leaves_no_files_and_keeps_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            Options::default().shards(1).large_threshold(1024),
        )
        .unwrap();
        store.put(b"first").unwrap();
        let seg = |s: &Store| match s
            .stat(&Digest::compute(Algorithm::Sha256, b"first"))
            .unwrap()
            .unwrap()
            .location
        {
            Location::Packed { segment, .. } => segment,
            Location::Large { .. } => unreachable!(),
        };
        let before = seg(&store);
        let big = vec![7u8; 4096];
        let absent = Digest::compute(Algorithm::Sha256, b"absent");
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{absent}","size":1}},"layers":[]}}"#
        );
        let mut h = DualHasher::new(Algorithm::Sha256);
        h.update(&big);
        let (bd, bb) = h.finish();
        let mut h = DualHasher::new(Algorithm::Sha256);
        h.update(manifest.as_bytes());
        let (md, mb) = h.finish();
        let items = [
            Hashed {
                data: &big,
                digest: bd,
                blake3: bb,
                kind: Kind::Layer,
            },
            Hashed {
                data: manifest.as_bytes(),
                digest: md,
                blake3: mb,
                kind: Kind::Manifest,
            },
        ];
        let err = store
            .inner
            .store_hashed(&items, &PutOptions::default().require_children(true))
            .unwrap_err();
        assert!(matches!(err, Error::MissingChildren { .. }), "{err:?}");
        assert!(!store.contains(&bd).unwrap() && !store.contains(&md).unwrap());
        let large: Vec<_> = walk(&dir.path().join("large"));
        assert!(large.is_empty(), "large files left behind: {large:?}");
        store.put(b"second").unwrap();
        let second = store
            .stat(&Digest::compute(Algorithm::Sha256, b"second"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(second.location, Location::Packed { segment, .. } if segment == before),
            "the shard kept its segment after the refusal"
        );
        assert_eq!(&*store.get(&second.digest).unwrap(), b"second");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
