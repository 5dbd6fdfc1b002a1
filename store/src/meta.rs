//! The metadata database (redb): table definitions, the fixed-width encodings of their
//! values, and every transaction that changes them, applied through one group-commit queue.
//!
//! This module is the only writer of `meta.redb`. Every mutation is an [`Op`] submitted to
//! [`Meta::submit`]; a leader thread commits all ops queued while the previous commit ran
//! in one durable transaction, so N concurrent writers pay about one fsync per round.
//! It must never make a blob visible before its bytes are durable: callers submit a put
//! only after the data fsync.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use redb::{
    Database, MultimapTableDefinition, MultimapTableHandle, ReadTransaction, ReadableDatabase,
    ReadableMultimapTable, ReadableTable, TableDefinition, TableHandle,
};

use crate::backend::{Backend, Control, MetaFile};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN};

/// digest key -> [`BlobEntry`] encoding.
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// segment id -> [`SegmentRow`] encoding.
pub(crate) const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
/// Named counters and settings.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// parent key -> child keys (index->manifest, manifest->config/layers).
pub(crate) const EDGES: MultimapTableDefinition<&[u8], &[u8]> =
    MultimapTableDefinition::new("edges");
/// subject key -> referrer keys (signatures, SBOMs: manifests whose `subject` is the key),
/// kept apart from `edges` so the collector can follow or drop them.
pub(crate) const REFERRERS: MultimapTableDefinition<&[u8], &[u8]> =
    MultimapTableDefinition::new("referrers");
/// referrer key -> its subject's key (every stored referrer, whether its subject is
/// stored or pending).
pub(crate) const REFERRER_OF: TableDefinition<&[u8], &[u8]> = TableDefinition::new("referrer_of");
/// subject key -> referrer keys, for referrers stored before their subject.
pub(crate) const PENDING_REFERRERS: MultimapTableDefinition<&[u8], &[u8]> =
    MultimapTableDefinition::new("pending_referrers");
/// child key -> number of distinct stored parents naming it.
pub(crate) const REFCOUNT: TableDefinition<&[u8], u64> = TableDefinition::new("refcount");
/// digest key -> number of root holders (names, containers, lease entries).
pub(crate) const HOLDS: TableDefinition<&[u8], u64> = TableDefinition::new("holds");
/// canonical name "registry/repository:tag" -> digest key.
pub(crate) const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("names");
/// container id -> JSON [`ContainerRecord`].
pub(crate) const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
/// lease id -> JSON [`LeaseRecord`].
pub(crate) const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// lease id -> digest keys it holds.
pub(crate) const LEASE_RESOURCES: MultimapTableDefinition<&str, &[u8]> =
    MultimapTableDefinition::new("lease_resources");

/// `Error::NeedsRecovery`'s reason for an index a crash left needing recovery.
pub(crate) const NOT_CLOSED: &str = "was not closed cleanly and its index needs recovery";

/// The name of every table of the current form (what `create_tables` makes).
const TABLE_NAMES: [&str; 13] = [
    "blobs",
    "segments",
    "meta",
    "edges",
    "referrers",
    "referrer_of",
    "pending_referrers",
    "refcount",
    "holds",
    "names",
    "containers",
    "leases",
    "lease_resources",
];

/// Opens (and so creates) every table; opening one that exists changes nothing.
fn create_tables(txn: &redb::WriteTransaction) -> Result<()> {
    txn.open_table(BLOBS)?;
    txn.open_table(SEGMENTS)?;
    txn.open_table(META)?;
    txn.open_multimap_table(EDGES)?;
    txn.open_multimap_table(PENDING_REFERRERS)?;
    txn.open_multimap_table(REFERRERS)?;
    txn.open_table(REFERRER_OF)?;
    txn.open_table(REFCOUNT)?;
    txn.open_table(HOLDS)?;
    txn.open_table(NAMES)?;
    txn.open_table(CONTAINERS)?;
    txn.open_table(LEASES)?;
    txn.open_multimap_table(LEASE_RESOURCES)?;
    Ok(())
}

/// Version of the table layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u64 = 1;
pub(crate) const K_SCHEMA: &str = "schema_version";
pub(crate) const K_SHARDS: &str = "shard_count";
const K_BLOBS: &str = "blob_count";
const K_BYTES: &str = "blob_bytes";
const K_LARGE_BLOBS: &str = "large_count";
const K_LARGE_BYTES: &str = "large_bytes";
/// Set (to 1) while a collection owes reference-count decrements it has not written yet:
/// a crash leaves it set, and open then rebuilds the counts from the edges.
const K_OWED: &str = "gc_owed_counts";
/// The sequence number of the newest durable commit (every durable transaction adds one);
/// the witness file repeats it outside the index (`encode_witness`).
const K_SEQ: &str = "commit_seq";

/// Where a blob's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Location {
    /// In a pack segment; `offset` is where the payload starts (after the record header).
    Packed {
        /// Segment id.
        segment: u64,
        /// Byte offset of the payload in the segment file.
        offset: u64,
    },
    /// In a file of its own under `large/`.
    Large {
        /// Generation number in the file name.
        generation: u64,
    },
}

/// The index entry of one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    /// Length of the blob.
    pub size: u64,
    /// Length as stored (equal to `size` unless compressed).
    pub stored_len: u64,
    /// Content class.
    pub kind: Kind,
    /// Record flags.
    pub flags: u8,
    /// Where the bytes are.
    pub location: Location,
    /// blake3 of the stored bytes.
    pub blake3: [u8; 32],
    /// Last put or existence check, milliseconds since the Unix epoch.
    pub touched_ms: u64,
}

const ENTRY_LEN: usize = 76;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl BlobEntry {
    /// Fixed 76-byte little-endian encoding (see docs/FORMAT.md).
    pub(crate) fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16] = self.kind as u8;
        b[17] = self.flags;
        let (tag, x, y) = match self.location {
            Location::Packed { segment, offset } => (1u8, segment, offset),
            Location::Large { generation } => (2u8, generation, 0),
        };
        b[18] = tag;
        // 19 reserved.
        b[20..28].copy_from_slice(&x.to_le_bytes());
        b[28..36].copy_from_slice(&y.to_le_bytes());
        b[36..44].copy_from_slice(&self.touched_ms.to_le_bytes());
        b[44..76].copy_from_slice(&self.blake3);
        b
    }

    /// Decodes an entry written by [`BlobEntry::encode`].
    pub(crate) fn decode(b: &[u8]) -> Result<BlobEntry> {
        if b.len() != ENTRY_LEN {
            return Err(Error::Corrupt(format!("blob entry of {} bytes", b.len())));
        }
        let (x, y) = (u64_at(b, 20), u64_at(b, 28));
        let location = match b[18] {
            1 => Location::Packed {
                segment: x,
                offset: y,
            },
            2 => Location::Large { generation: x },
            t => return Err(Error::Corrupt(format!("blob entry location tag {t}"))),
        };
        let mut blake3 = [0u8; 32];
        blake3.copy_from_slice(&b[44..76]);
        Ok(BlobEntry {
            size: u64_at(b, 0),
            stored_len: u64_at(b, 8),
            kind: Kind::from_u8(b[16]),
            flags: b[17],
            location,
            blake3,
            touched_ms: u64_at(b, 36),
        })
    }
}

/// The index row of one pack segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegmentRow {
    /// Shard the segment belongs to.
    pub shard: u32,
    /// Sealed segments take no more appends and may be memory-mapped.
    pub sealed: bool,
    /// Bytes of the file that committed transactions vouch for.
    pub committed_len: u64,
    /// Bytes of records no index entry names (deleted or lost a put race).
    pub dead_bytes: u64,
}

impl SegmentRow {
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.shard.to_le_bytes());
        b[4] = u8::from(self.sealed);
        b[8..16].copy_from_slice(&self.committed_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.dead_bytes.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<SegmentRow> {
        if b.len() != 24 {
            return Err(Error::Corrupt(format!("segment row of {} bytes", b.len())));
        }
        let mut shard = [0u8; 4];
        shard.copy_from_slice(&b[0..4]);
        Ok(SegmentRow {
            shard: u32::from_le_bytes(shard),
            sealed: b[4] != 0,
            committed_len: u64_at(b, 8),
            dead_bytes: u64_at(b, 16),
        })
    }
}

/// A blob to insert, with the record length to count as dead if the digest turns out to
/// be stored already (a concurrent put of the same bytes won).
#[derive(Clone, Debug)]
pub(crate) struct NewBlob {
    pub digest: Digest,
    pub entry: BlobEntry,
    /// Header plus payload, for packed blobs; 0 for large ones.
    pub record_len: u64,
    /// For a manifest or index: the distinct children it names (edges to add), with the
    /// kind the parent gives each (a child stored as `other` takes it).
    pub children: Vec<(Digest, Kind)>,
    /// For a referrer: its subject (edge subject -> this blob).
    pub subject: Option<Digest>,
}

/// New state of a segment touched by a batch: `committed_len` only grows, `sealed` only
/// turns on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentUpdate {
    pub id: u64,
    pub shard: u32,
    pub committed_len: u64,
    pub sealed: bool,
}

/// A write batch: blobs, the segments they landed in, and what to do with names and
/// leases in the same transaction.
#[derive(Debug, Default)]
pub(crate) struct PutOp {
    pub blobs: Vec<NewBlob>,
    pub segments: Vec<SegmentUpdate>,
    /// Existing blobs to refresh (the caller skipped writing them).
    pub touch: Vec<Digest>,
    /// Existing blobs now stored as manifests or indexes: a blob first stored plainly
    /// (kind `other`) takes the kind and gains its edges; one already a manifest is only
    /// refreshed. (`entry.kind`, `children` and `subject` are used.)
    pub upgrade: Vec<NewBlob>,
    /// The data fsync of these blobs, still running: the commit waits for it (so the
    /// index work overlaps the fsync) and drops this op if it failed.
    pub durable: Option<Barrier>,
    /// Names to point at images (stored before or in this op), after the blobs.
    pub names: Vec<(String, Digest)>,
    /// A lease that takes every blob of the op (new and touched) as a resource.
    pub lease: Option<String>,
    /// Fail with [`Error::MissingChildren`] (and change nothing) if a new manifest or index
    /// names a child that is neither stored nor part of this op.
    pub require_children: bool,
}

/// A stored container record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerRecord {
    /// The container id (64 hex digits).
    pub id: String,
    /// The image it uses (a manifest or index).
    pub image: Digest,
    /// Its unique name.
    pub name: String,
    /// The reference it was created from, as given.
    pub image_ref: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// A stored lease record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    /// The lease id.
    pub id: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Expiry, milliseconds since the Unix epoch; `None` never expires.
    pub expires_ms: Option<u64>,
}

/// One unit of work for the commit queue.
#[derive(Debug)]
pub(crate) enum Op {
    /// Make blobs visible (with their edges), advance segments, refresh existing blobs,
    /// and set names and lease resources.
    Put(PutOp),
    /// Mark segments sealed (after a write failure, or at open).
    Seal(Vec<u64>),
    /// Remove names (`rmi`). Without `force`, refuses to remove the last name of an image
    /// that a container uses.
    Untag { names: Vec<String>, force: bool },
    /// Create a container using `record.image`.
    ContainerCreate(ContainerRecord),
    /// Remove a container by id.
    ContainerRemove(String),
    /// Create a lease.
    LeaseCreate(LeaseRecord),
    /// Remove a lease and its holds.
    LeaseRemove(String),
    /// Remove leases that expired at or before `now_ms`.
    ExpireLeases { now_ms: u64 },
    /// Delete candidates that are still garbage at this instant (the collector's re-check).
    Sweep(SweepOp),
    /// Point blobs at their copies in a new segment (compaction) and retire the old one.
    Relocate(RelocateOp),
    /// Remove corrupt blobs from the index whatever holds them (`verify --repair`): their
    /// parents keep naming them, so a re-import restores them in place. Each goes only if
    /// its entry still names the location that was found corrupt (a blob moved or
    /// re-stored since is not the bytes that were checked).
    Quarantine(Vec<(Digest, Location)>),
    /// Recompute `refcount` and `holds` from edges, names, containers and leases.
    RebuildCounts,
    /// Delete one blob now, whatever its age, unless a stored manifest or index names it
    /// or a name, container or lease holds it (`Referenced`); a referrer may go while
    /// its subject stays. Its children are decremented at once.
    Delete(Digest),
}

/// The collector's deletion of one batch of candidates.
///
/// Deleting a parent removes its edges at once but defers the decrement of its children's
/// `refcount`s: the collector collects them and hands them back in key order (here, in
/// `decrements`), so each transaction writes neighbouring keys instead of one random
/// B-tree page per child. Until a decrement is applied the child's count is too high,
/// never too low, so nothing live can look deletable; the `gc_owed_counts` flag marks
/// the window for crash recovery.
#[derive(Debug, Default)]
pub(crate) struct SweepOp {
    /// Candidates, in key order.
    pub candidates: Vec<Digest>,
    /// Owed decrements `(child, by)`, applied before the candidates are re-checked.
    pub decrements: Vec<(Digest, u64)>,
    /// The collector owes nothing more after this op: clear the flag.
    pub settled: bool,
    /// Blobs touched at or after this instant are kept (the grace period).
    pub keep_touched_after_ms: u64,
    /// A referrer whose only parent is its subject goes even if the subject stays.
    pub drop_referrers: bool,
}

/// One compaction step: live records copied from `old` into the segments of `segments`.
#[derive(Debug)]
pub(crate) struct RelocateOp {
    /// (digest, old payload offset in `old`, new location, record length).
    pub moves: Vec<(Digest, u64, Location, u64)>,
    pub segments: Vec<SegmentUpdate>,
    pub durable: Option<Barrier>,
    pub old: u64,
}

/// What a sweep deleted.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    /// Deleted blobs with their entries.
    pub deleted: Vec<(Digest, BlobEntry)>,
    /// Candidates found live.
    pub kept: Vec<Digest>,
    /// One entry per edge the deletions removed: the child whose `refcount` the
    /// collector now owes a decrement (it may be a candidate in turn).
    pub owed: Vec<Digest>,
    /// Candidates not looked at (the transaction's time budget ran out).
    pub deferred: Vec<Digest>,
}

/// How [`Tx::sweep_one`] removes a blob.
#[derive(Clone, Copy)]
enum Removal {
    /// Whatever holds it (quarantine); its children are decremented at once.
    Forced,
    /// Only if the re-check finds it garbage; `refs` is its count if the caller has just
    /// read it. Its children's decrements are deferred.
    IfGarbage { refs: Option<u64> },
}

/// What the re-check did with one blob.
enum Swept {
    Deleted(BlobEntry),
    /// Not stored (deleted earlier).
    Gone,
    /// Held, referenced or young.
    Live,
}

/// Work one sweep transaction does at most, so writers behind it wait little.
const SWEEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(15);

/// The result of a data fsync running on another thread.
#[derive(Debug)]
pub(crate) struct Barrier(std::sync::mpsc::Receiver<Result<()>>);

impl Barrier {
    /// A barrier and the sender that resolves it.
    pub fn new() -> (std::sync::mpsc::Sender<Result<()>>, Barrier) {
        let (tx, rx) = std::sync::mpsc::channel();
        (tx, Barrier(rx))
    }

    fn wait(&self) -> Result<()> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(Error::Corrupt("data fsync thread vanished".into())))
    }
}

impl Op {
    /// Whether the op's caller relies on its commit being durable when it returns. Only
    /// the collector's sweeps do not: it makes them durable with one final commit before it
    /// unlinks any file, so a crash in between only undoes deletions (garbage that the
    /// next run collects again), never loses bytes an entry names.
    fn needs_durability(&self) -> bool {
        !matches!(self, Op::Sweep(_))
    }

    fn barrier(&self) -> Option<&Barrier> {
        match self {
            Op::Put(p) => p.durable.as_ref(),
            Op::Relocate(r) => r.durable.as_ref(),
            _ => None,
        }
    }
}

/// The live read snapshots, by the epoch they registered under. Compaction retires a
/// segment file only from the view of snapshots that began after the commit that moved
/// its records (FORMAT.md §10.4): the mapping is dropped once no older snapshot is alive.
#[derive(Default)]
pub(crate) struct Readers(Mutex<(u64, BTreeMap<u64, usize>)>);

impl Readers {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, usize>)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(&self) -> u64 {
        let mut g = self.lock();
        let e = g.0;
        *g.1.entry(e).or_default() += 1;
        e
    }

    fn leave(&self, epoch: u64) {
        let mut g = self.lock();
        if let Some(n) = g.1.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&epoch);
            }
        }
    }

    fn advance(&self) -> u64 {
        let mut g = self.lock();
        g.0 += 1;
        g.0
    }

    fn oldest(&self) -> Option<u64> {
        self.lock().1.keys().next().copied()
    }
}

/// A registered read snapshot ([`Meta::read`]); dereferences to the redb transaction.
pub(crate) struct Read<'m> {
    txn: ReadTransaction,
    epoch: u64,
    readers: &'m Readers,
}

impl std::ops::Deref for Read<'_> {
    type Target = ReadTransaction;
    fn deref(&self) -> &ReadTransaction {
        &self.txn
    }
}

impl Drop for Read<'_> {
    fn drop(&mut self) {
        self.readers.leave(self.epoch);
    }
}

/// What an [`Op`] did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Indices into `PutOp::blobs` whose digest was already stored; their bytes are dead.
    pub lost: Vec<usize>,
    /// Digests in `PutOp::touch` that are no longer stored (deleted after the caller's
    /// existence check): the caller must store them after all.
    pub missing: Vec<Digest>,
    /// For each new manifest or index: children that are not stored (yet).
    pub absent_children: Vec<(Digest, Vec<Digest>)>,
    /// Names removed by `Untag`, with the image each pointed at.
    pub untagged: Vec<(String, Digest)>,
    /// What a `Sweep` did.
    pub sweep: Sweep,
    /// Leases removed by `ExpireLeases`.
    pub expired: Vec<String>,
    /// `RebuildCounts`: (refcounts, holds) rewritten.
    pub rebuilt: (u64, u64),
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Op)>,
    done: HashMap<u64, Result<Outcome>>,
    leader: bool,
}

/// The redb database: writable, or opened read-only (which never writes the file).
enum Db {
    Rw(Database),
    Ro(redb::ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> std::result::Result<ReadTransaction, redb::TransactionError> {
        match self {
            Db::Rw(db) => db.begin_read(),
            Db::Ro(db) => db.begin_read(),
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction> {
        match self {
            Db::Rw(db) => Ok(db.begin_write()?),
            Db::Ro(_) => Err(Error::ReadOnly),
        }
    }
}

/// The metadata database and its commit queue.
pub(crate) struct Meta {
    db: Db,
    queue: Mutex<Queue>,
    wake: Condvar,
    readers: Readers,
    /// Where the witness of durable commits is written (the main index only).
    witness: Option<Arc<dyn Backend>>,
    /// Existence checks' refreshes of `touched`, applied by the next transaction.
    touches: Mutex<Touches>,
    /// The store's counters (`Store::metrics`).
    pub stats: crate::metrics::Stats,
}

/// Refreshes of `touched` not yet written ([`Meta::touch_later`]), and whether a
/// transaction with a sweep is running (a touch then cannot wait for the next one).
#[derive(Default)]
struct Touches {
    pending: HashMap<Digest, u64>,
    sweeping: bool,
}

/// Counters kept in the `meta` table, so `info` is O(1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Number of blobs.
    pub blobs: u64,
    /// Sum of blob sizes.
    pub bytes: u64,
    /// Blobs stored as large files.
    pub large_blobs: u64,
    /// Sum of their sizes.
    pub large_bytes: u64,
}

/// What an opened index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// No settings: a new index (or one whose creating transaction never committed).
    Empty,
    /// A store: its shard count and the sequence number of its newest durable commit.
    Ready { shards: u32, seq: u64 },
}

/// The witness file's bytes for commit `seq`: the number and a checksum of it, so that a
/// torn write reads as no witness rather than as another number.
pub(crate) fn encode_witness(seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    let check = blake3::hash(&seq.to_le_bytes());
    b[8..].copy_from_slice(&check.as_bytes()[..8]);
    b
}

/// The commit number a witness file records, if it is intact.
pub(crate) fn decode_witness(b: &[u8]) -> Option<u64> {
    if b.len() < 16 || b[8..16] != blake3::hash(&b[..8]).as_bytes()[..8] {
        return None;
    }
    Some(u64_at(b, 0))
}

impl Meta {
    /// Opens a metadata database file with a page cache of `cache` bytes; `write: false`
    /// opens it read-only (nothing is ever written to it). `Ok(None)`: it does not exist.
    /// A database another process holds is `Locked`.
    pub fn open(
        backend: &Arc<dyn Backend>,
        which: MetaFile,
        cache: usize,
        write: bool,
    ) -> Result<Option<Meta>> {
        let name = |e| Error::io("open", backend.describe() + "/meta.redb", e);
        let Some(h) = backend.meta(which, write, write).map_err(name)? else {
            return Ok(None);
        };
        let storage = crate::backend::RedbStorage(h.0);
        let mut builder = Database::builder();
        builder.set_cache_size(cache);
        let locked = |e: redb::DatabaseError| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Locked {
                path: backend.describe().into(),
            },
            redb::DatabaseError::RepairAborted => Error::NeedsRecovery {
                path: backend.describe().into(),
                why: NOT_CLOSED,
            },
            e => e.into(),
        };
        let db = if write {
            Db::Rw(builder.create_with_backend(storage).map_err(locked)?)
        } else {
            Db::Ro(
                builder
                    .open_read_only_with_backend(storage)
                    .map_err(locked)?,
            )
        };
        Ok(Some(Meta {
            db,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            readers: Readers::default(),
            witness: (write && which == MetaFile::Main).then(|| backend.clone()),
            touches: Mutex::default(),
            stats: crate::metrics::Stats::default(),
        }))
    }

    /// What the index holds; a schema this build does not read is `Corrupt`.
    pub fn status(&self) -> Result<Status> {
        let txn = self.read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Status::Empty),
            Err(e) => return Err(e.into()),
        };
        match meta.get(K_SCHEMA)?.map(|v| v.value()) {
            None => Ok(Status::Empty),
            Some(SCHEMA_VERSION) => {
                let n = meta.get(K_SHARDS)?.map_or(0, |v| v.value());
                let shards = u32::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| Error::Corrupt(format!("shard count {n}")))?;
                let seq = meta.get(K_SEQ)?.map_or(0, |v| v.value());
                Ok(Status::Ready { shards, seq })
            }
            Some(v) => Err(Error::Corrupt(format!(
                "schema version {v}; this build reads {SCHEMA_VERSION}"
            ))),
        }
    }

    /// Creates the tables and settings of a new store. Its first commit is numbered after
    /// `after` (the witness of any earlier index of this root), so the witness it writes
    /// never falls behind.
    pub fn init(&self, shards: u32, after: u64) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(true);
        let seq = after + 1;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
            meta.insert(K_SHARDS, u64::from(shards))?;
            meta.insert(K_SEQ, seq)?;
        }
        create_tables(&txn)?;
        txn.commit()?;
        self.write_witness(seq);
        Ok(())
    }

    /// Records that commit `seq` is durable (best effort: the witness only ever helps to
    /// detect an index older than the data; a failed write detects less, never wrongly).
    fn write_witness(&self, seq: u64) {
        if let Some(b) = &self.witness {
            let _ = b.write_control(Control::Witness, &encode_witness(seq));
        }
    }

    /// Whether the index lacks tables of the current form (a store made by an earlier
    /// build of this schema, §16 of FORMAT.md).
    pub fn lacks_tables(&self) -> Result<bool> {
        let txn = self.read()?;
        let mut have: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
        have.extend(txn.list_multimap_tables()?.map(|t| t.name().to_owned()));
        Ok(TABLE_NAMES.iter().any(|n| !have.iter().any(|h| h == n)))
    }

    /// Creates the tables a store made by an earlier build of this schema lacks (only
    /// when one is missing: an open normally writes nothing).
    pub fn ensure_tables(&self) -> Result<()> {
        if self.lacks_tables()? {
            let mut txn = self.db.begin_write()?;
            txn.set_quick_repair(true);
            create_tables(&txn)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// Whether a collection owes reference-count decrements in this snapshot (one is
    /// running, or one was cut short and the counts await a rebuild): counts may then be
    /// higher than the edges imply, never lower.
    pub fn owes_counts(txn: &ReadTransaction) -> Result<bool> {
        Ok(txn.open_table(META)?.get(K_OWED)?.is_some())
    }

    /// A read snapshot, registered under the current reader epoch until it is dropped.
    pub fn read(&self) -> Result<Read<'_>> {
        // Registered before the transaction begins: its epoch is never newer than its view.
        let epoch = self.readers.enter();
        match self.db.begin_read() {
            Ok(txn) => Ok(Read {
                txn,
                epoch,
                readers: &self.readers,
            }),
            Err(e) => {
                self.readers.leave(epoch);
                Err(e.into())
            }
        }
    }

    /// Starts a new reader epoch and returns it: every snapshot registered from now on
    /// began after whatever the caller committed before this call.
    pub fn advance_epoch(&self) -> u64 {
        self.readers.advance()
    }

    /// The epoch of the oldest live snapshot, if any.
    pub fn oldest_reader(&self) -> Option<u64> {
        self.readers.oldest()
    }

    /// Whether the snapshot's entry for `d` names exactly the large file of `generation`.
    pub fn names_large(txn: &ReadTransaction, d: &Digest, generation: u64) -> Result<bool> {
        Ok(Meta::entry(txn, d)?.is_some_and(|e| e.location == Location::Large { generation }))
    }

    /// Looks up one blob in a snapshot.
    pub fn entry(txn: &ReadTransaction, digest: &Digest) -> Result<Option<BlobEntry>> {
        let t = txn.open_table(BLOBS)?;
        t.get(&*digest.key())?
            .map(|v| BlobEntry::decode(v.value()))
            .transpose()
    }

    /// Every segment row.
    pub fn segments(&self) -> Result<Vec<(u64, SegmentRow)>> {
        let txn = self.read()?;
        let t = txn.open_table(SEGMENTS)?;
        t.iter()?
            .map(|r| {
                let (k, v) = r?;
                Ok((k.value(), SegmentRow::decode(v.value())?))
            })
            .collect()
    }

    /// The O(1) counters.
    pub fn counters(&self) -> Result<Counters> {
        let txn = self.read()?;
        let t = txn.open_table(META)?;
        let get = |k: &str| -> Result<u64> { Ok(t.get(k)?.map_or(0, |v| v.value())) };
        Ok(Counters {
            blobs: get(K_BLOBS)?,
            bytes: get(K_BYTES)?,
            large_blobs: get(K_LARGE_BLOBS)?,
            large_bytes: get(K_LARGE_BYTES)?,
        })
    }

    /// Up to `limit` blobs with keys after `after` (all from the start when `None`), each
    /// page in a fresh snapshot so a long listing never pins old pages.
    pub fn page(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<(Digest, BlobEntry)>> {
        let txn = self.read()?;
        let t = txn.open_table(BLOBS)?;
        let key = after.map(Digest::key);
        let range = match &key {
            Some(k) => {
                t.range::<&[u8]>((std::ops::Bound::Excluded(&**k), std::ops::Bound::Unbounded))?
            }
            None => t.range::<&[u8]>(..)?,
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for r in range.take(limit) {
            let (k, v) = r?;
            out.push((Digest::from_key(k.value())?, BlobEntry::decode(v.value())?));
        }
        Ok(out)
    }

    /// All names and their targets, in name order.
    pub fn names(&self) -> Result<Vec<(String, Digest)>> {
        let txn = self.read()?;
        let t = txn.open_table(NAMES)?;
        t.iter()?
            .map(|r| {
                let (k, v) = r?;
                Ok((k.value().to_owned(), Digest::from_key(v.value())?))
            })
            .collect()
    }

    /// The target of one name.
    pub fn name(&self, name: &str) -> Result<Option<Digest>> {
        let txn = self.read()?;
        let t = txn.open_table(NAMES)?;
        t.get(name)?
            .map(|v| Digest::from_key(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// The children a stored manifest or index names (its edges), in key order.
    pub fn children(txn: &ReadTransaction, d: &Digest) -> Result<Vec<Digest>> {
        let t = txn.open_multimap_table(EDGES)?;
        t.get(&*d.key())?
            .map(|r| Ok(Digest::from_key(r?.value())?))
            .collect()
    }

    /// The referrers (signatures, SBOMs) of a stored subject.
    pub fn referrers(txn: &ReadTransaction, d: &Digest) -> Result<Vec<Digest>> {
        let t = txn.open_multimap_table(REFERRERS)?;
        t.get(&*d.key())?
            .map(|r| Ok(Digest::from_key(r?.value())?))
            .collect()
    }

    /// `refcount[d]` and `holds[d]`.
    pub fn counts(&self, d: &Digest) -> Result<(u64, u64)> {
        let txn = self.read()?;
        let rc = txn.open_table(REFCOUNT)?;
        let h = txn.open_table(HOLDS)?;
        let k = d.key();
        Ok((
            rc.get(&*k)?.map_or(0, |v| v.value()),
            h.get(&*k)?.map_or(0, |v| v.value()),
        ))
    }

    /// Every container.
    pub fn containers(&self) -> Result<Vec<ContainerRecord>> {
        let txn = self.read()?;
        let t = txn.open_table(CONTAINERS)?;
        t.iter()?.map(|r| unjson(r?.1.value())).collect()
    }

    /// Every lease with its resources.
    pub fn leases(&self) -> Result<Vec<(LeaseRecord, Vec<Digest>)>> {
        let txn = self.read()?;
        let t = txn.open_table(LEASES)?;
        let res = txn.open_multimap_table(LEASE_RESOURCES)?;
        t.iter()?
            .map(|r| {
                let (k, v) = r?;
                let rec: LeaseRecord = unjson(v.value())?;
                let ds = res
                    .get(k.value())?
                    .map(|x| Ok(Digest::from_key(x?.value())?))
                    .collect::<Result<Vec<_>>>()?;
                Ok((rec, ds))
            })
            .collect()
    }

    /// Records that `d` was just relied on (an existence check), for the next
    /// transaction to write into its `touched` time, with no commit of its own. Returns
    /// `false` when that cannot be relied on: a transaction that may delete blobs is
    /// running and has already taken the touches it honours; the caller then makes the
    /// touch a commit of its own, which orders it after that one. Also returns how many
    /// touches wait.
    pub fn touch_later(&self, d: &Digest, now_ms: u64) -> (bool, usize) {
        let mut t = self
            .touches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.sweeping {
            return (false, t.pending.len());
        }
        let e = t.pending.entry(*d).or_insert(now_ms);
        *e = (*e).max(now_ms);
        (true, t.pending.len())
    }

    /// The time of a touch of `d` that waits for a transaction, if any.
    pub fn pending_touch(&self, d: &Digest) -> Option<u64> {
        self.touches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pending
            .get(d)
            .copied()
    }

    /// Takes the waiting touches for a transaction; `sweeping` marks it as one that may
    /// delete blobs (so touches arriving meanwhile go their own way).
    fn take_touches(&self, sweeping: bool) -> HashMap<Digest, u64> {
        let mut t = self
            .touches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.sweeping = sweeping;
        std::mem::take(&mut t.pending)
    }

    /// After a transaction: touches it did not write (it failed) wait for the next one.
    fn end_touches(&self, unwritten: Option<HashMap<Digest, u64>>) {
        let mut t = self
            .touches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.sweeping = false;
        for (d, ms) in unwritten.into_iter().flatten() {
            let e = t.pending.entry(d).or_insert(ms);
            *e = (*e).max(ms);
        }
    }

    /// Applies `op` durably, batched with whatever other threads submit meanwhile.
    pub fn submit(&self, op: Op) -> Result<Outcome> {
        let start = std::time::Instant::now();
        let r = self.submit_inner(op);
        crate::metrics::add(&self.stats.submitted, 1);
        crate::metrics::add(
            &self.stats.submit_wait_us,
            crate::metrics::us(start.elapsed()),
        );
        r
    }

    fn submit_inner(&self, op: Op) -> Result<Outcome> {
        let mut q = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.pending.push((ticket, op));
        loop {
            if let Some(r) = q.done.remove(&ticket) {
                return r;
            }
            if q.leader {
                q = self
                    .wake
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            q.leader = true;
            let batch = std::mem::take(&mut q.pending);
            drop(q);
            // Ops that need no durable commit (the collector's sweeps) go in a transaction
            // of their own, so they do not pay for a writer's fsync, and after the writers'
            // one, whose results are published first, so a writer does not wait for their
            // work either. The ops of one round are concurrent, so any order is a valid
            // serialisation.
            let (relaxed, durable): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|(_, op)| !op.needs_durability());
            for part in [durable, relaxed] {
                if part.is_empty() {
                    continue;
                }
                let results = self.commit_part(part);
                let mut q = self
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                q.done.extend(results);
                self.wake.notify_all();
            }
            q = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.leader = false;
            self.wake.notify_all();
        }
    }

    fn commit_part(&self, mut batch: Vec<(u64, Op)>) -> Vec<(u64, Result<Outcome>)> {
        let mut results = Vec::with_capacity(batch.len());
        // Each barrier is waited for once; an op whose fsync failed is dropped from the
        // batch with that error and the rest are applied again in a fresh transaction.
        let mut resolved: HashMap<u64, Result<()>> = HashMap::new();
        loop {
            let tickets: Vec<u64> = batch.iter().map(|(t, _)| *t).collect();
            match self.try_commit(&batch, &mut resolved) {
                Ok(outcomes) => {
                    results.extend(tickets.into_iter().zip(outcomes));
                    return results;
                }
                Err(e) => {
                    let failed: Vec<u64> = resolved
                        .iter()
                        .filter(|(_, r)| r.is_err())
                        .map(|(t, _)| *t)
                        .collect();
                    if failed.is_empty() {
                        results.extend(tickets.into_iter().map(|t| (t, Err(e.clone()))));
                        return results;
                    }
                    for t in failed {
                        if let Some(Err(fe)) = resolved.remove(&t) {
                            results.push((t, Err(fe)));
                        }
                        batch.retain(|(bt, _)| *bt != t);
                    }
                }
            }
        }
    }

    fn try_commit(
        &self,
        batch: &[(u64, Op)],
        resolved: &mut HashMap<u64, Result<()>>,
    ) -> Result<Vec<Result<Outcome>>> {
        let sweeping = batch.iter().any(|(_, op)| matches!(op, Op::Sweep(_)));
        let touches = self.take_touches(sweeping);
        let r = self.try_commit_with(batch, resolved, &touches);
        self.end_touches(r.is_err().then_some(touches));
        r
    }

    fn try_commit_with(
        &self,
        batch: &[(u64, Op)],
        resolved: &mut HashMap<u64, Result<()>>,
        touches: &HashMap<Digest, u64>,
    ) -> Result<Vec<Result<Outcome>>> {
        let start = std::time::Instant::now();
        let mut txn = self.db.begin_write()?;
        let durable = batch.iter().any(|(_, op)| op.needs_durability())
            || txn.set_durability(redb::Durability::None).is_err();
        let _span = tracing::trace_span!("commit", ops = batch.len(), durable).entered();
        if durable {
            txn.set_quick_repair(true);
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        let seq = {
            let mut tx = Tx::open(&txn)?;
            // First, so that a sweep in this transaction sees them.
            tx.touch_at(touches)?;
            for (_, op) in batch {
                outcomes.push(tx.apply(op)?);
            }
            tx.finish(durable)?
        };
        // Nothing becomes visible before its bytes are durable.
        for (t, op) in batch {
            if let Some(b) = op.barrier() {
                let r = resolved.entry(*t).or_insert_with(|| b.wait());
                if let Err(e) = r {
                    return Err(e.clone());
                }
            }
        }
        txn.commit()?;
        if durable {
            self.write_witness(seq);
        }
        self.count(batch, &outcomes, durable, start.elapsed());
        Ok(outcomes)
    }

    /// Counts a committed transaction and what it wrote and removed.
    fn count(
        &self,
        batch: &[(u64, Op)],
        outcomes: &[Result<Outcome>],
        durable: bool,
        took: std::time::Duration,
    ) {
        use crate::metrics::add;
        let st = &self.stats;
        let us = crate::metrics::us(took);
        add(&st.commits, 1);
        add(&st.durable_commits, u64::from(durable));
        add(&st.commit_ops, batch.len() as u64);
        add(&st.commit_us, us);
        st.commit_us_max
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        for ((_, op), o) in batch.iter().zip(outcomes) {
            let Ok(o) = o else { continue };
            if let Op::Put(p) = op {
                let (mut n, mut bytes) = (0, 0);
                for (i, b) in p.blobs.iter().enumerate() {
                    if !o.lost.contains(&i) {
                        n += 1;
                        bytes += b.entry.size;
                    }
                }
                add(&st.blobs_written, n);
                add(&st.bytes_written, bytes);
            }
            add(&st.blobs_removed, o.sweep.deleted.len() as u64);
            add(
                &st.bytes_removed,
                o.sweep.deleted.iter().map(|(_, e)| e.size).sum(),
            );
        }
    }
}

fn read_counters(meta: &redb::Table<&str, u64>) -> Result<Counters> {
    let get = |k: &str| -> Result<u64> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
    Ok(Counters {
        blobs: get(K_BLOBS)?,
        bytes: get(K_BYTES)?,
        large_blobs: get(K_LARGE_BLOBS)?,
        large_bytes: get(K_LARGE_BYTES)?,
    })
}

fn write_counters(meta: &mut redb::Table<&str, u64>, c: Counters) -> Result<()> {
    meta.insert(K_BLOBS, c.blobs)?;
    meta.insert(K_BYTES, c.bytes)?;
    meta.insert(K_LARGE_BLOBS, c.large_blobs)?;
    meta.insert(K_LARGE_BYTES, c.large_bytes)?;
    Ok(())
}

/// The tables of one write transaction, and the mutations that keep their invariants:
/// `refcount[c] == |{p : c in edges[p]}|` and `holds[d] ==` the names, containers and
/// lease entries naming `d`.
struct Tx<'t> {
    blobs: redb::Table<'t, &'static [u8], &'static [u8]>,
    segs: redb::Table<'t, u64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
    edges: redb::MultimapTable<'t, &'static [u8], &'static [u8]>,
    referrers: redb::MultimapTable<'t, &'static [u8], &'static [u8]>,
    referrer_of: redb::Table<'t, &'static [u8], &'static [u8]>,
    pending: redb::MultimapTable<'t, &'static [u8], &'static [u8]>,
    refcount: redb::Table<'t, &'static [u8], u64>,
    holds: redb::Table<'t, &'static [u8], u64>,
    names: redb::Table<'t, &'static str, &'static [u8]>,
    containers: redb::Table<'t, &'static str, &'static [u8]>,
    leases: redb::Table<'t, &'static str, &'static [u8]>,
    lease_res: redb::MultimapTable<'t, &'static str, &'static [u8]>,
    c: Counters,
    now: u64,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Tx<'t>> {
        let meta = txn.open_table(META)?;
        let c = read_counters(&meta)?;
        Ok(Tx {
            blobs: txn.open_table(BLOBS)?,
            segs: txn.open_table(SEGMENTS)?,
            meta,
            edges: txn.open_multimap_table(EDGES)?,
            referrers: txn.open_multimap_table(REFERRERS)?,
            referrer_of: txn.open_table(REFERRER_OF)?,
            pending: txn.open_multimap_table(PENDING_REFERRERS)?,
            refcount: txn.open_table(REFCOUNT)?,
            holds: txn.open_table(HOLDS)?,
            names: txn.open_table(NAMES)?,
            containers: txn.open_table(CONTAINERS)?,
            leases: txn.open_table(LEASES)?,
            lease_res: txn.open_multimap_table(LEASE_RESOURCES)?,
            c,
            now: crate::sys::now_ms(),
        })
    }

    /// Writes the counters; a durable transaction also takes the next commit number,
    /// which it returns.
    fn finish(mut self, durable: bool) -> Result<u64> {
        write_counters(&mut self.meta, self.c)?;
        let seq = self.meta.get(K_SEQ)?.map_or(0, |v| v.value());
        if !durable {
            return Ok(seq);
        }
        self.meta.insert(K_SEQ, seq + 1)?;
        Ok(seq + 1)
    }

    /// Applies one op. The outer error aborts the whole transaction (storage); the inner
    /// one fails only this op, which then has changed nothing.
    fn apply(&mut self, op: &Op) -> Result<Result<Outcome>> {
        match op {
            Op::Put(p) => self.put(p),
            Op::Seal(ids) => {
                for &id in ids {
                    let row = self.segs.get(id)?.map(|v| SegmentRow::decode(v.value()));
                    if let Some(row) = row {
                        let row = SegmentRow {
                            sealed: true,
                            ..row?
                        };
                        self.segs.insert(id, &row.encode()[..])?;
                    }
                }
                Ok(Ok(Outcome::default()))
            }
            Op::Untag { names, force } => self.untag(names, *force),
            Op::ContainerCreate(rec) => self.container_create(rec),
            Op::ContainerRemove(id) => self.container_remove(id),
            Op::LeaseCreate(rec) => {
                if self.leases.get(rec.id.as_str())?.is_some() {
                    return Ok(Err(Error::Invalid(format!("lease {} exists", rec.id))));
                }
                self.leases.insert(rec.id.as_str(), &json(rec)[..])?;
                Ok(Ok(Outcome::default()))
            }
            Op::ExpireLeases { now_ms } => self.expire_leases(*now_ms),
            Op::Sweep(op) => self.sweep(op),
            Op::Delete(d) => self.delete(d),
            Op::Relocate(op) => self.relocate(op),
            Op::Quarantine(ds) => {
                let op = SweepOp {
                    keep_touched_after_ms: u64::MAX,
                    ..SweepOp::default()
                };
                let mut dead = HashMap::new();
                let mut sw = Sweep::default();
                for (d, at) in ds {
                    if self.entry(d)?.is_none_or(|e| e.location != *at) {
                        continue;
                    }
                    // Forced: the children's counts are decremented at once.
                    if let Swept::Deleted(e) =
                        self.sweep_one(d, &op, true, Removal::Forced, &mut dead, &mut Vec::new())?
                    {
                        sw.deleted.push((*d, e));
                    }
                }
                self.add_dead(dead)?;
                Ok(Ok(Outcome {
                    sweep: sw,
                    ..Outcome::default()
                }))
            }
            Op::RebuildCounts => self.rebuild_counts(),
            Op::LeaseRemove(id) => {
                if self.leases.remove(id.as_str())?.is_none() {
                    return Ok(Err(Error::LeaseNotFound(id.clone())));
                }
                self.release_lease_resources(id)?;
                Ok(Ok(Outcome::default()))
            }
        }
    }

    fn entry(&self, d: &Digest) -> Result<Option<BlobEntry>> {
        self.blobs
            .get(&*d.key())?
            .map(|v| BlobEntry::decode(v.value()))
            .transpose()
    }

    /// Raises the `touched` time of each stored blob of `touches` to the time given.
    fn touch_at(&mut self, touches: &HashMap<Digest, u64>) -> Result<()> {
        for (d, &ms) in touches {
            if let Some(e) = self.entry(d)?
                && e.touched_ms < ms
            {
                let e = BlobEntry {
                    touched_ms: ms,
                    ..e
                };
                self.blobs.insert(&*d.key(), &e.encode()[..])?;
            }
        }
        Ok(())
    }

    /// [`Op::Delete`].
    fn delete(&mut self, d: &Digest) -> Result<Result<Outcome>> {
        let key = d.key();
        let holders = self.holds.get(&*key)?.map_or(0, |v| v.value());
        let mut parents = self.refcount.get(&*key)?.map_or(0, |v| v.value());
        // A referrer's own count is its subject's edge: that one does not keep it.
        if parents > 0 && self.subject_edge(&key)?.is_some() {
            parents -= 1;
        }
        if holders > 0 || parents > 0 {
            return Ok(Err(Error::Referenced {
                digest: *d,
                parents,
                holders,
            }));
        }
        let op = SweepOp {
            keep_touched_after_ms: u64::MAX,
            drop_referrers: true,
            ..SweepOp::default()
        };
        let any_referrers = self.referrers.iter()?.next().is_some();
        let (mut dead, mut owed) = (HashMap::new(), Vec::new());
        let how = Removal::IfGarbage { refs: Some(0) };
        match self.sweep_one(d, &op, any_referrers, how, &mut dead, &mut owed)? {
            Swept::Deleted(e) => {
                for c in owed {
                    self.decrement(&c.key(), 1)?;
                }
                self.add_dead(dead)?;
                Ok(Ok(Outcome {
                    sweep: Sweep {
                        deleted: vec![(*d, e)],
                        ..Sweep::default()
                    },
                    ..Outcome::default()
                }))
            }
            Swept::Gone => Ok(Err(Error::NotFound(*d))),
            Swept::Live => Ok(Err(Error::Referenced {
                digest: *d,
                parents,
                holders,
            })),
        }
    }

    fn touch(&mut self, d: &Digest) -> Result<bool> {
        let Some(e) = self.entry(d)? else {
            return Ok(false);
        };
        let e = BlobEntry {
            touched_ms: self.now,
            ..e
        };
        self.blobs.insert(&*d.key(), &e.encode()[..])?;
        Ok(true)
    }

    /// Adds `parent -> child` to `edges` (or to `referrers` for a subject -> referrer
    /// edge) and counts the new parent in `refcount[child]`.
    fn add_edge(&mut self, parent: &Digest, child: &Digest, referrer: bool) -> Result<()> {
        let table = if referrer {
            &mut self.referrers
        } else {
            &mut self.edges
        };
        let existed = table.insert(&*parent.key(), &*child.key())?;
        if !existed {
            let k = child.key();
            let n = self.refcount.get(&*k)?.map_or(0, |v| v.value());
            self.refcount.insert(&*k, n + 1)?;
        }
        Ok(())
    }

    fn hold(&mut self, key: &[u8]) -> Result<()> {
        let n = self.holds.get(key)?.map_or(0, |v| v.value());
        self.holds.insert(key, n + 1)?;
        Ok(())
    }

    fn unhold(&mut self, key: &[u8]) -> Result<()> {
        let n = self.holds.get(key)?.map_or(0, |v| v.value());
        if n <= 1 {
            self.holds.remove(key)?;
        } else {
            self.holds.insert(key, n - 1)?;
        }
        Ok(())
    }

    /// A stored manifest or index, or the reason it cannot be a name's or container's target.
    fn require_image(&self, d: &Digest) -> Result<Result<()>> {
        match self.entry(d)? {
            None => Ok(Err(Error::NotFound(*d))),
            Some(e) if matches!(e.kind, Kind::Manifest | Kind::Index) => Ok(Ok(())),
            Some(_) => Ok(Err(Error::NotAnImage(*d))),
        }
    }

    fn put(&mut self, p: &PutOp) -> Result<Result<Outcome>> {
        // Checks first: a failing op changes nothing.
        let in_op: std::collections::HashSet<Digest> = p.blobs.iter().map(|b| b.digest).collect();
        let mut outcome = Outcome::default();
        for b in &p.blobs {
            let mut absent = Vec::new();
            for (c, _) in &b.children {
                if !in_op.contains(c) && self.blobs.get(&*c.key())?.is_none() {
                    absent.push(*c);
                }
            }
            if !absent.is_empty() {
                outcome.absent_children.push((b.digest, absent));
            }
        }
        if p.require_children
            && let Some((parent, missing)) = outcome.absent_children.first()
        {
            return Ok(Err(Error::MissingChildren {
                parent: *parent,
                missing: missing.clone(),
            }));
        }
        if let Some(l) = &p.lease
            && self.leases.get(l.as_str())?.is_none()
        {
            return Ok(Err(Error::LeaseNotFound(l.clone())));
        }
        for (_, target) in &p.names {
            // A target this op stores has the kind the op gives it; so does one it stores
            // again as a manifest or index, if it is still stored.
            let new = p.blobs.iter().find(|b| b.digest == *target);
            let again = p.upgrade.iter().find(|b| b.digest == *target);
            let ok = match (new, again) {
                (Some(b), _) => Ok(matches!(b.entry.kind, Kind::Manifest | Kind::Index)),
                (None, Some(b)) if self.blobs.get(&*target.key())?.is_some() => {
                    Ok(matches!(b.entry.kind, Kind::Manifest | Kind::Index))
                }
                _ => self.require_image(target)?.map(|()| true),
            };
            match ok {
                Ok(true) => {}
                Ok(false) => return Ok(Err(Error::NotAnImage(*target))),
                Err(e) => return Ok(Err(e)),
            }
        }

        let mut rows = self.updated_rows(&p.segments)?;
        // Inserting in key order keeps the B-tree walk cache-friendly.
        let mut order: Vec<usize> = (0..p.blobs.len()).collect();
        order.sort_unstable_by_key(|&i| p.blobs[i].digest);
        let mut inserted = Vec::with_capacity(p.blobs.len());
        let mut lost_images: Vec<usize> = Vec::new();
        for i in order {
            let b = &p.blobs[i];
            let key = b.digest.key();
            let entry = BlobEntry {
                touched_ms: self.now,
                ..b.entry
            };
            let old = self
                .blobs
                .insert(&*key, &entry.encode()[..])?
                .map(|v| BlobEntry::decode(v.value()));
            if let Some(old) = old {
                // Lost a race with a concurrent put of the same bytes: keep the stored
                // copy (and its edges), refresh it, and count our record as dead.
                let old = BlobEntry {
                    touched_ms: self.now,
                    ..old?
                };
                self.blobs.insert(&*key, &old.encode()[..])?;
                if let Location::Packed { segment, .. } = b.entry.location
                    && let Some(row) = rows.get_mut(&segment)
                {
                    row.dead_bytes += b.record_len;
                }
                outcome.lost.push(i);
                if !b.children.is_empty() {
                    lost_images.push(i);
                }
                continue;
            }
            self.c.blobs += 1;
            self.c.bytes += entry.size;
            if matches!(entry.location, Location::Large { .. }) {
                self.c.large_blobs += 1;
                self.c.large_bytes += entry.size;
            }
            inserted.push(i);
        }
        outcome.lost.sort_unstable();
        // Edges of the new blobs, in the transaction that makes them visible.
        let mut linked: Vec<&NewBlob> = inserted.iter().map(|&i| &p.blobs[i]).collect();
        for &i in &lost_images {
            // The stored copy won a race; if it was stored plainly it has no edges yet.
            let b = &p.blobs[i];
            if !self.has_edges(&b.digest)?
                && let Some(e) = self.entry(&b.digest)?
            {
                let e = BlobEntry {
                    kind: b.entry.kind,
                    ..e
                };
                self.blobs.insert(&*b.digest.key(), &e.encode()[..])?;
                linked.push(b);
            }
        }
        let mut relink: Vec<&NewBlob> = Vec::new();
        for u in &p.upgrade {
            match self.entry(&u.digest)? {
                None => outcome.missing.push(u.digest),
                Some(e) if self.has_edges(&u.digest)? || u.children.is_empty() => {
                    let _ = e;
                    self.touch(&u.digest)?;
                }
                Some(e) => {
                    let e = BlobEntry {
                        kind: u.entry.kind,
                        touched_ms: self.now,
                        ..e
                    };
                    self.blobs.insert(&*u.digest.key(), &e.encode()[..])?;
                    relink.push(u);
                }
            }
        }
        linked.extend(relink);
        for b in &linked {
            self.link(b)?;
        }
        for b in &linked {
            if let Some(s) = &b.subject {
                self.referrer_of.insert(&*b.digest.key(), &*s.key())?;
                if self.blobs.get(&*s.key())?.is_some() {
                    self.add_edge(s, &b.digest, true)?;
                } else {
                    self.pending.insert(&*s.key(), &*b.digest.key())?;
                }
            }
        }
        for d in &p.touch {
            if !self.touch(d)? {
                outcome.missing.push(*d);
            }
        }
        for (id, row) in rows {
            self.segs.insert(id, &row.encode()[..])?;
        }
        for (name, target) in &p.names {
            self.set_name(name, target)?;
        }
        if let Some(l) = &p.lease {
            let upgraded = p.upgrade.iter().map(|b| &b.digest);
            for d in p
                .blobs
                .iter()
                .map(|b| &b.digest)
                .chain(&p.touch)
                .chain(upgraded)
            {
                if !self.lease_res.insert(l.as_str(), &*d.key())? {
                    self.hold(&d.key())?;
                }
            }
        }
        Ok(Ok(outcome))
    }

    /// Whether `d` has outgoing edges (a manifest or index stored as one has).
    fn has_edges(&self, d: &Digest) -> Result<bool> {
        Ok(self.edges.get(&*d.key())?.next().is_some())
    }

    /// Adds a new manifest's or index's edges (giving plainly stored children the kind it
    /// names them by), and attaches referrers that were waiting for it.
    fn link(&mut self, b: &NewBlob) -> Result<()> {
        for (c, kind) in &b.children {
            self.add_edge(&b.digest, c, false)?;
            // Only data kinds: a child manifest becomes one when it is stored as one
            // (and so gains its own edges), never by hearsay.
            if matches!(kind, Kind::Config | Kind::Layer)
                && let Some(e) = self.entry(c)?
                && e.kind == Kind::Other
            {
                let e = BlobEntry { kind: *kind, ..e };
                self.blobs.insert(&*c.key(), &e.encode()[..])?;
            }
        }
        let waiting: Vec<Vec<u8>> = self
            .pending
            .remove_all(&*b.digest.key())?
            .map(|v| v.map(|g| g.value().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        for r in waiting {
            self.add_edge(&b.digest, &Digest::from_key(&r)?, true)?;
        }
        Ok(())
    }

    fn set_name(&mut self, name: &str, target: &Digest) -> Result<()> {
        let key = target.key();
        let old = self.names.insert(name, &*key)?.map(|v| v.value().to_vec());
        match old {
            Some(o) if o == *key => {}
            Some(o) => {
                self.unhold(&o)?;
                self.hold(&key)?;
            }
            None => self.hold(&key)?,
        }
        self.touch(target)?;
        Ok(())
    }

    /// Drops a (removed) lease's resources and the holds they were.
    fn release_lease_resources(&mut self, id: &str) -> Result<()> {
        let res: Vec<Vec<u8>> = self
            .lease_res
            .remove_all(id)?
            .map(|v| v.map(|g| g.value().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        for k in res {
            self.unhold(&k)?;
        }
        Ok(())
    }

    fn expire_leases(&mut self, now_ms: u64) -> Result<Result<Outcome>> {
        let mut expired = Vec::new();
        for r in self.leases.iter()? {
            let (k, v) = r?;
            let rec: LeaseRecord = unjson(v.value())?;
            if rec.expires_ms.is_some_and(|e| e <= now_ms) {
                expired.push(k.value().to_owned());
            }
        }
        for id in &expired {
            self.leases.remove(id.as_str())?;
            self.release_lease_resources(id)?;
        }
        Ok(Ok(Outcome {
            expired,
            ..Outcome::default()
        }))
    }

    /// Removes `parent`'s outgoing edges in `referrers` or `edges`. With `owed`, the
    /// children's decrements are deferred: each child is pushed there once per edge;
    /// without, they are applied now.
    fn drop_edges(
        &mut self,
        parent: &Digest,
        referrer: bool,
        mut owed: Option<&mut Vec<Digest>>,
    ) -> Result<()> {
        let table = if referrer {
            &mut self.referrers
        } else {
            &mut self.edges
        };
        let children: Vec<Vec<u8>> = table
            .remove_all(&*parent.key())?
            .map(|v| v.map(|g| g.value().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        for c in children {
            match owed.as_deref_mut() {
                Some(owed) => owed.push(Digest::from_key(&c)?),
                None => {
                    self.decrement(&c, 1)?;
                }
            }
        }
        Ok(())
    }

    /// Lowers `refcount[key]` by `by` (removing it at 0); returns what is left.
    fn decrement(&mut self, key: &[u8], by: u64) -> Result<u64> {
        let old = self.refcount.remove(key)?.map_or(0, |v| v.value());
        let left = old.saturating_sub(by);
        if left > 0 {
            self.refcount.insert(key, left)?;
        }
        Ok(left)
    }

    /// The subject of the referrer `key`, if the `subject -> key` edge is stored.
    fn subject_edge(&mut self, key: &[u8]) -> Result<Option<Digest>> {
        let Some(s) = self
            .referrer_of
            .get(key)?
            .map(|v| Digest::from_key(v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let stored = self
            .referrers
            .get(&*s.key())?
            .any(|r| r.is_ok_and(|r| r.value() == key));
        Ok(stored.then_some(s))
    }

    /// The collector's re-check and delete. First the owed decrements, then each
    /// candidate goes only if, now, nothing holds it, no stored parent names it, and it
    /// was not touched within the grace period. Children of what it deletes are not
    /// visited here (that would be a random B-tree page each): they come back as `owed`.
    fn sweep(&mut self, op: &SweepOp) -> Result<Result<Outcome>> {
        let start = std::time::Instant::now();
        let mut sw = Sweep::default();
        // What is left of each decremented count, so a candidate among them needs no
        // second look.
        let mut left: HashMap<Digest, u64> = HashMap::with_capacity(op.decrements.len());
        for (c, by) in &op.decrements {
            left.insert(*c, self.decrement(&c.key(), *by)?);
        }
        let any_referrers = self.referrers.iter()?.next().is_some();
        let mut dead: HashMap<u64, u64> = HashMap::new();
        for (n, d) in op.candidates.iter().enumerate() {
            if n > 0 && n % 64 == 0 && start.elapsed() > SWEEP_BUDGET {
                sw.deferred.extend_from_slice(&op.candidates[n..]);
                break;
            }
            let how = Removal::IfGarbage {
                refs: left.get(d).copied(),
            };
            match self.sweep_one(d, op, any_referrers, how, &mut dead, &mut sw.owed)? {
                Swept::Deleted(e) => sw.deleted.push((*d, e)),
                Swept::Gone => {}
                Swept::Live => sw.kept.push(*d),
            }
        }
        if op.settled {
            self.meta.remove(K_OWED)?;
        } else if !sw.owed.is_empty() {
            self.meta.insert(K_OWED, 1)?;
        }
        self.add_dead(dead)?;
        Ok(Ok(Outcome {
            sweep: sw,
            ..Outcome::default()
        }))
    }

    /// The rows of `updates`' segments after them: `committed_len` only grows, `sealed`
    /// only turns on, dead bytes are kept. (Written back by the caller.)
    fn updated_rows(&self, updates: &[SegmentUpdate]) -> Result<HashMap<u64, SegmentRow>> {
        let mut rows = HashMap::with_capacity(updates.len());
        for u in updates {
            let old = self
                .segs
                .get(u.id)?
                .map(|v| SegmentRow::decode(v.value()))
                .transpose()?
                .unwrap_or(SegmentRow {
                    shard: u.shard,
                    ..SegmentRow::default()
                });
            rows.insert(
                u.id,
                SegmentRow {
                    committed_len: old.committed_len.max(u.committed_len),
                    sealed: old.sealed || u.sealed,
                    ..old
                },
            );
        }
        Ok(rows)
    }

    fn add_dead(&mut self, dead: HashMap<u64, u64>) -> Result<()> {
        for (segment, bytes) in dead {
            let row = self
                .segs
                .get(segment)?
                .map(|v| SegmentRow::decode(v.value()))
                .transpose()?;
            if let Some(row) = row {
                let row = SegmentRow {
                    dead_bytes: row.dead_bytes + bytes,
                    ..row
                };
                self.segs.insert(segment, &row.encode()[..])?;
            }
        }
        Ok(())
    }

    fn rebuild_counts(&mut self) -> Result<Result<Outcome>> {
        let mut indegree: HashMap<Vec<u8>, u64> = HashMap::new();
        for table in [&self.edges, &self.referrers] {
            for r in table.iter()? {
                for c in r?.1 {
                    *indegree.entry(c?.value().to_vec()).or_default() += 1;
                }
            }
        }
        let mut holders: HashMap<Vec<u8>, u64> = HashMap::new();
        for r in self.names.iter()? {
            *holders.entry(r?.1.value().to_vec()).or_default() += 1;
        }
        for r in self.containers.iter()? {
            let rec: ContainerRecord = unjson(r?.1.value())?;
            *holders.entry(rec.image.key().to_vec()).or_default() += 1;
        }
        for r in self.lease_res.iter()? {
            for d in r?.1 {
                *holders.entry(d?.value().to_vec()).or_default() += 1;
            }
        }
        let fixed_rc = rewrite_counts(&mut self.refcount, &indegree)?;
        // Whatever a collection still owed is in these counts now.
        self.meta.remove(K_OWED)?;
        let fixed_holds = rewrite_counts(&mut self.holds, &holders)?;
        Ok(Ok(Outcome {
            rebuilt: (fixed_rc, fixed_holds),
            ..Outcome::default()
        }))
    }

    /// Re-checks one blob and deletes it if it is garbage now (or, `force`d, whatever
    /// holds it). Unforced, the decrements its children are owed go to `owed`; forced,
    /// they are applied at once.
    fn sweep_one(
        &mut self,
        d: &Digest,
        op: &SweepOp,
        any_referrers: bool,
        how: Removal,
        dead: &mut HashMap<u64, u64>,
        owed: &mut Vec<Digest>,
    ) -> Result<Swept> {
        let key = d.key();
        let (force, known_refs) = match how {
            Removal::Forced => (true, None),
            Removal::IfGarbage { refs } => (false, refs),
        };
        let e = if force {
            match self.blobs.remove(&*key)? {
                Some(v) => BlobEntry::decode(v.value())?,
                None => return Ok(Swept::Gone),
            }
        } else {
            // The cheap checks first; the entry is read by removing it (one B-tree
            // operation, not two) and put back in the rare case it turns out young.
            if self.holds.get(&*key)?.is_some_and(|v| v.value() > 0) {
                return Ok(Swept::Live);
            }
            let mut refs = match known_refs {
                Some(n) => n,
                None => self.refcount.get(&*key)?.map_or(0, |v| v.value()),
            };
            if refs > 0 && op.drop_referrers && self.subject_edge(&key)?.is_some() {
                refs -= 1;
            }
            if refs > 0 {
                return Ok(Swept::Live);
            }
            let Some(e) = self
                .blobs
                .remove(&*key)?
                .map(|v| BlobEntry::decode(v.value()))
                .transpose()?
            else {
                return Ok(Swept::Gone);
            };
            if e.touched_ms >= op.keep_touched_after_ms {
                self.blobs.insert(&*key, &e.encode()[..])?;
                return Ok(Swept::Live);
            }
            e
        };
        let image = matches!(e.kind, Kind::Manifest | Kind::Index);
        // A forced removal (quarantine) keeps the blob's incoming edges: it comes back in
        // place when re-stored. Otherwise a referrer (only manifests and indexes are) is
        // unhooked from its subject, stored or pending.
        if image
            && !force
            && let Some(s) = self
                .referrer_of
                .remove(&*key)?
                .map(|v| Digest::from_key(v.value()))
                .transpose()?
        {
            if self.referrers.remove(&*s.key(), &*key)? {
                // Its count was that one edge (dropped with `drop_referrers`).
                self.refcount.remove(&*key)?;
            }
            self.pending.remove(&*s.key(), &*key)?;
        }
        self.c.blobs -= 1;
        self.c.bytes -= e.size;
        match e.location {
            Location::Large { .. } => {
                self.c.large_blobs -= 1;
                self.c.large_bytes -= e.size;
            }
            Location::Packed { segment, .. } => {
                *dead.entry(segment).or_default() += RECORD_HEADER_LEN + e.stored_len;
            }
        }
        let mut owed = (!force).then_some(owed);
        if image {
            self.drop_edges(d, false, owed.as_deref_mut())?;
        }
        if any_referrers {
            self.drop_edges(d, true, owed)?;
        }
        Ok(Swept::Deleted(e))
    }

    /// Compaction: repoint each moved blob whose entry still names its old record (a
    /// concurrent delete wins), then retire the old segment.
    fn relocate(&mut self, op: &RelocateOp) -> Result<Result<Outcome>> {
        let mut rows = self.updated_rows(&op.segments)?;
        for (d, old_offset, new_loc, rec_len) in &op.moves {
            let current = self.entry(d)?;
            match current {
                Some(e)
                    if e.location
                        == (Location::Packed {
                            segment: op.old,
                            offset: *old_offset,
                        }) =>
                {
                    let e = BlobEntry {
                        location: *new_loc,
                        ..e
                    };
                    self.blobs.insert(&*d.key(), &e.encode()[..])?;
                }
                // Deleted or replaced meanwhile: the new copy is dead.
                _ => {
                    if let Location::Packed { segment, .. } = new_loc
                        && let Some(row) = rows.get_mut(segment)
                    {
                        row.dead_bytes += rec_len;
                    }
                }
            }
        }
        for (id, row) in rows {
            self.segs.insert(id, &row.encode()[..])?;
        }
        self.segs.remove(op.old)?;
        Ok(Ok(Outcome::default()))
    }

    fn containers_using(&self, d: &Digest) -> Result<Vec<ContainerRecord>> {
        let mut out = Vec::new();
        for r in self.containers.iter()? {
            let (_, v) = r?;
            let rec: ContainerRecord = unjson(v.value())?;
            if rec.image == *d {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn untag(&mut self, names: &[String], force: bool) -> Result<Result<Outcome>> {
        let mut targets = Vec::with_capacity(names.len());
        for n in names {
            match self.names.get(n.as_str())? {
                Some(v) => targets.push(Digest::from_key(v.value())?),
                None => return Ok(Err(Error::NameNotFound(n.clone()))),
            }
        }
        if !force {
            for (n, d) in names.iter().zip(&targets) {
                // Removing a name is refused only when it is the image's last one and a
                // container uses the image (Docker's rule: untagging an alias is fine).
                let mut others = 0usize;
                for r in self.names.iter()? {
                    let (k, v) = r?;
                    if v.value() == &*d.key() && !names.iter().any(|x| x == k.value()) {
                        others += 1;
                    }
                }
                if others == 0 {
                    let users = self.containers_using(d)?;
                    if !users.is_empty() {
                        return Ok(Err(Error::InUse {
                            reference: n.clone(),
                            image: *d,
                            containers: users.into_iter().map(|c| (c.id, c.name)).collect(),
                        }));
                    }
                }
            }
        }
        let mut outcome = Outcome::default();
        for (n, d) in names.iter().zip(targets) {
            if self.names.remove(n.as_str())?.is_some() {
                self.unhold(&d.key())?;
                outcome.untagged.push((n.clone(), d));
            }
        }
        Ok(Ok(outcome))
    }

    fn container_create(&mut self, rec: &ContainerRecord) -> Result<Result<Outcome>> {
        if let Err(e) = self.require_image(&rec.image)? {
            return Ok(Err(e));
        }
        for r in self.containers.iter()? {
            let (_, v) = r?;
            let other: ContainerRecord = unjson(v.value())?;
            if other.name == rec.name || other.id == rec.id {
                return Ok(Err(Error::Invalid(format!(
                    "container name {:?} is already in use by container {}",
                    rec.name, other.id
                ))));
            }
        }
        self.containers.insert(rec.id.as_str(), &json(rec)[..])?;
        self.hold(&rec.image.key())?;
        self.touch(&rec.image)?;
        Ok(Ok(Outcome::default()))
    }

    fn container_remove(&mut self, id: &str) -> Result<Result<Outcome>> {
        let rec = match self.containers.remove(id)? {
            Some(v) => unjson::<ContainerRecord>(v.value())?,
            None => return Ok(Err(Error::ContainerNotFound(id.to_owned()))),
        };
        self.unhold(&rec.image.key())?;
        Ok(Ok(Outcome::default()))
    }
}

/// Makes `table` equal `want` (absent = 0). Returns the number of keys changed.
fn rewrite_counts(
    table: &mut redb::Table<'_, &'static [u8], u64>,
    want: &HashMap<Vec<u8>, u64>,
) -> Result<u64> {
    let mut have: HashMap<Vec<u8>, u64> = HashMap::new();
    for r in table.iter()? {
        let (k, v) = r?;
        have.insert(k.value().to_vec(), v.value());
    }
    let mut fixed = 0;
    for (k, v) in &have {
        if want.get(k) != Some(v) {
            fixed += 1;
            match want.get(k) {
                Some(n) => table.insert(&k[..], *n)?,
                None => table.remove(&k[..])?,
            };
        }
    }
    for (k, n) in want {
        if !have.contains_key(k) {
            fixed += 1;
            table.insert(&k[..], *n)?;
        }
    }
    Ok(fixed)
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn unjson<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("metadata record: {e}")))
}

#[cfg(test)]
impl Meta {
    /// Removes a blob's index entry, as a collector would (tests only; the collector with
    /// its re-checks comes with the GC).
    pub(crate) fn remove_for_test(&self, d: &Digest) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(BLOBS)?;
            t.remove(&*d.key())?;
            let mut meta = txn.open_table(META)?;
            let c = read_counters(&meta)?;
            write_counters(
                &mut meta,
                Counters {
                    blobs: c.blobs - 1,
                    ..c
                },
            )?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        for location in [
            Location::Packed {
                segment: 3,
                offset: 1 << 40,
            },
            Location::Large {
                generation: u64::MAX,
            },
        ] {
            let e = BlobEntry {
                size: 12,
                stored_len: 12,
                kind: Kind::Manifest,
                flags: 0,
                location,
                blake3: [7; 32],
                touched_ms: 99,
            };
            assert_eq!(BlobEntry::decode(&e.encode()).unwrap(), e);
        }
        assert!(BlobEntry::decode(&[0; 10]).is_err());
        let mut bad = [0u8; ENTRY_LEN];
        bad[18] = 9;
        assert!(BlobEntry::decode(&bad).is_err());
    }

    #[test]
    fn segment_row_round_trip() {
        let r = SegmentRow {
            shard: 5,
            sealed: true,
            committed_len: 77,
            dead_bytes: 12,
        };
        assert_eq!(SegmentRow::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn touches_wait_for_a_transaction_and_never_slip_past_a_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path(), crate::Options::default()).unwrap();
        let meta = &store.inner.meta;
        let d = store.put(b"x").unwrap().digest;
        assert_eq!(meta.touch_later(&d, 5), (true, 1));
        // A transaction that may delete takes them, and refuses new ones meanwhile.
        let taken = meta.take_touches(true);
        assert_eq!(taken.get(&d), Some(&5));
        assert_eq!(meta.touch_later(&d, 6), (false, 0));
        // It failed: its touches wait again, and touches are taken again.
        meta.end_touches(Some(taken));
        assert_eq!(meta.touch_later(&d, 7), (true, 1));
        assert_eq!(meta.take_touches(false).get(&d), Some(&7));
        meta.end_touches(None);
        // While a sweep runs, an existence check still answers, with a commit of its own.
        let _ = meta.take_touches(true);
        assert!(store.ensure(&d).unwrap());
        assert!(store.stat(&d).unwrap().unwrap().touched_ms > 7);
    }
}
