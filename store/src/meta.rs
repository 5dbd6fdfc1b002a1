//! The metadata database (redb): table definitions, the fixed-width encodings of their
//! values, and every transaction that changes them, applied through one group-commit queue.
//!
//! This module is the only writer of `meta.redb`. Every mutation is an [`Op`] submitted to
//! [`Meta::submit`]; a leader thread commits all ops queued while the previous commit ran
//! in one durable transaction, so N concurrent writers pay about one fsync per round.
//! It must never make a blob visible before its bytes are durable: callers submit a put
//! only after the data fsync.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::Kind;

/// digest key -> [`BlobEntry`] encoding.
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// segment id -> [`SegmentRow`] encoding.
pub(crate) const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
/// Named counters and settings.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the table layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u64 = 1;
pub(crate) const K_SCHEMA: &str = "schema_version";
pub(crate) const K_SHARDS: &str = "shard_count";
const K_BLOBS: &str = "blob_count";
const K_BYTES: &str = "blob_bytes";
const K_LARGE_BLOBS: &str = "large_count";
const K_LARGE_BYTES: &str = "large_bytes";

/// Where a blob's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
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

/// One unit of work for the commit queue.
#[derive(Debug)]
pub(crate) enum Op {
    /// Make blobs visible, advance segments, and refresh `touched` of existing blobs.
    Put {
        blobs: Vec<NewBlob>,
        segments: Vec<SegmentUpdate>,
        touch: Vec<Digest>,
        /// The data fsync of these blobs, still running: the commit waits for it (so the
        /// index work overlaps the fsync) and drops this op if it failed.
        durable: Option<Barrier>,
    },
    /// Mark segments sealed (after a write failure, or at open).
    Seal(Vec<u64>),
}

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
    fn barrier(&self) -> Option<&Barrier> {
        match self {
            Op::Put { durable, .. } => durable.as_ref(),
            Op::Seal(_) => None,
        }
    }
}

/// What an [`Op`] did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Indices into `Op::Put::blobs` whose digest was already stored; their bytes are dead.
    pub lost: Vec<usize>,
    /// Digests in `Op::Put::touch` that are no longer stored (deleted after the caller's
    /// existence check): the caller must store them after all.
    pub missing: Vec<Digest>,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Op)>,
    done: HashMap<u64, Result<Outcome>>,
    leader: bool,
}

/// The metadata database and its commit queue.
pub(crate) struct Meta {
    db: Database,
    queue: Mutex<Queue>,
    wake: Condvar,
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

impl Meta {
    /// Opens (or creates) `meta.redb`. A database another process holds is `Locked`.
    pub fn open(path: &Path, root: &Path) -> Result<Meta> {
        let db = Database::builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Locked {
                path: root.to_owned(),
            },
            e => e.into(),
        })?;
        Ok(Meta {
            db,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        })
    }

    /// Creates the tables and settings of a new store, or checks an existing one's schema.
    /// Returns the shard count.
    pub fn init(&self, shards: u32) -> Result<u32> {
        let existing = {
            let txn = self.read()?;
            match txn.open_table(META) {
                Ok(meta) => Some((
                    meta.get(K_SCHEMA)?.map(|v| v.value()),
                    meta.get(K_SHARDS)?.map_or(0, |v| v.value()),
                )),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            }
        };
        match existing {
            Some((Some(SCHEMA_VERSION), n)) => u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::Corrupt(format!("shard count {n}"))),
            Some((Some(v), _)) => Err(Error::Corrupt(format!(
                "schema version {v}; this build reads {SCHEMA_VERSION}"
            ))),
            // A new store (or one whose creating transaction never committed).
            Some((None, _)) | None => {
                let mut txn = self.db.begin_write()?;
                txn.set_quick_repair(true);
                {
                    let mut meta = txn.open_table(META)?;
                    meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
                    meta.insert(K_SHARDS, u64::from(shards))?;
                }
                txn.open_table(BLOBS)?;
                txn.open_table(SEGMENTS)?;
                txn.commit()?;
                Ok(shards)
            }
        }
    }

    /// A read snapshot.
    pub fn read(&self) -> Result<ReadTransaction> {
        Ok(self.db.begin_read()?)
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

    /// Applies `op` durably, batched with whatever other threads submit meanwhile.
    pub fn submit(&self, op: Op) -> Result<Outcome> {
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
            let results = self.commit_batch(batch);
            q = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.done.extend(results);
            q.leader = false;
            self.wake.notify_all();
        }
    }

    fn commit_batch(&self, mut batch: Vec<(u64, Op)>) -> Vec<(u64, Result<Outcome>)> {
        let mut results = Vec::with_capacity(batch.len());
        // Each barrier is waited for once; an op whose fsync failed is dropped from the
        // batch with that error and the rest are applied again in a fresh transaction.
        let mut resolved: HashMap<u64, Result<()>> = HashMap::new();
        loop {
            let tickets: Vec<u64> = batch.iter().map(|(t, _)| *t).collect();
            match self.try_commit(&batch, &mut resolved) {
                Ok(outcomes) => {
                    results.extend(tickets.into_iter().zip(outcomes.into_iter().map(Ok)));
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
    ) -> Result<Vec<Outcome>> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(true);
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut blobs = txn.open_table(BLOBS)?;
            let mut segs = txn.open_table(SEGMENTS)?;
            let mut meta = txn.open_table(META)?;
            let mut c = read_counters(&meta)?;
            let now = crate::sys::now_ms();
            for (_, op) in batch {
                outcomes.push(match op {
                    Op::Put {
                        blobs: new,
                        segments,
                        touch,
                        ..
                    } => apply_put(&mut blobs, &mut segs, &mut c, now, new, segments, touch)?,
                    Op::Seal(ids) => {
                        for &id in ids {
                            let row = segs.get(id)?.map(|v| SegmentRow::decode(v.value()));
                            if let Some(row) = row {
                                let row = SegmentRow {
                                    sealed: true,
                                    ..row?
                                };
                                segs.insert(id, &row.encode()[..])?;
                            }
                        }
                        Outcome::default()
                    }
                });
            }
            write_counters(&mut meta, c)?;
        }
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
        Ok(outcomes)
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

fn apply_put(
    blobs: &mut redb::Table<&[u8], &[u8]>,
    segs: &mut redb::Table<u64, &[u8]>,
    c: &mut Counters,
    now: u64,
    new: &[NewBlob],
    segments: &[SegmentUpdate],
    touch: &[Digest],
) -> Result<Outcome> {
    let mut rows: HashMap<u64, SegmentRow> = HashMap::with_capacity(segments.len());
    for u in segments {
        let old = segs
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
    let mut outcome = Outcome::default();
    // Inserting in key order keeps the B-tree walk cache-friendly.
    let mut order: Vec<usize> = (0..new.len()).collect();
    order.sort_unstable_by_key(|&i| new[i].digest);
    for i in order {
        let b = &new[i];
        let key = b.digest.key();
        let entry = BlobEntry {
            touched_ms: now,
            ..b.entry
        };
        let old = blobs
            .insert(&*key, &entry.encode()[..])?
            .map(|v| BlobEntry::decode(v.value()));
        if let Some(old) = old {
            // Lost a race with a concurrent put of the same bytes: keep the stored copy,
            // refresh it, and count our record as dead.
            let old = BlobEntry {
                touched_ms: now,
                ..old?
            };
            blobs.insert(&*key, &old.encode()[..])?;
            if let Location::Packed { segment, .. } = b.entry.location
                && let Some(row) = rows.get_mut(&segment)
            {
                row.dead_bytes += b.record_len;
            }
            outcome.lost.push(i);
            continue;
        }
        c.blobs += 1;
        c.bytes += entry.size;
        if matches!(entry.location, Location::Large { .. }) {
            c.large_blobs += 1;
            c.large_bytes += entry.size;
        }
    }
    outcome.lost.sort_unstable();
    for d in touch {
        let key = d.key();
        let existing = blobs.get(&*key)?.map(|v| BlobEntry::decode(v.value()));
        if let Some(old) = existing {
            let e = BlobEntry {
                touched_ms: now,
                ..old?
            };
            blobs.insert(&*key, &e.encode()[..])?;
        } else {
            outcome.missing.push(*d);
        }
    }
    for (id, row) in rows {
        segs.insert(id, &row.encode()[..])?;
    }
    Ok(outcome)
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
