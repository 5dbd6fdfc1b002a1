//! The garbage collector: roots, the store's graph for the generic engine
//! (`layerstore-gc`), the re-checking sweeper, physical reclaim (large files, segment
//! compaction) and removal of expired leases and orphan files.
//!
//! This module owns *what* may be deleted; the rule is DESIGN.md's: the mark runs on a
//! read snapshot without blocking writers, and a blob is deleted only if, re-checked
//! inside the deleting write transaction, nothing holds it (names, containers, leases), no
//! stored parent names it, and it was not touched within the grace period. The re-check,
//! not the snapshot, decides. It must never delete a blob reachable from a root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use redb::{ReadableMultimapTable, ReadableTable};

use crate::backend::{Key, List};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::meta::{self, Location, Op, RelocateOp, SegmentRow, SweepOp};
use crate::store::Store;

pub use layerstore_gc::{NoProgress, Progress};

/// The lease `repair --rebuild-index` puts recovered blobs under; GC refuses to run while
/// it exists (names, containers and leases cannot be rebuilt from blob bytes).
pub const RECOVERED_LEASE: &str = "recovered";

/// Choices for a collection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GcOptions {
    /// Blobs touched (put, or checked by `ensure`, tag, container create, lease add)
    /// within this period are roots. Default 1 hour (DESIGN.md: a multi-GB layer pushed
    /// early in a slow push must outlive it).
    pub grace: Duration,
    /// Collect referrers (signatures, SBOMs) even when their subject is live.
    pub drop_referrers: bool,
    /// Report what would be removed; change nothing.
    pub dry_run: bool,
    /// Compact sealed segments whose dead fraction reaches this. Default 0.5.
    pub compact_threshold: f64,
    /// Orphan files (large files no entry names, abandoned ingests) older than this are
    /// removed. Default 24 hours, so resumable ingests survive a day.
    pub orphan_age: Duration,
    /// Candidates offered per sweep transaction. Default 2048; each transaction also
    /// stops after about 15 ms of work (the rest is offered again), so writers queued
    /// behind it never wait long.
    pub batch: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            drop_referrers: false,
            dry_run: false,
            compact_threshold: 0.5,
            orphan_age: Duration::from_secs(24 * 3600),
            batch: 2048,
        }
    }
}

impl GcOptions {
    /// Sets the grace period.
    #[must_use]
    pub fn grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }
    /// Sets dry-run.
    #[must_use]
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }
    /// Drops referrers of live subjects.
    #[must_use]
    pub fn drop_referrers(mut self, yes: bool) -> Self {
        self.drop_referrers = yes;
        self
    }
    /// Sets the orphan age.
    #[must_use]
    pub fn orphan_age(mut self, d: Duration) -> Self {
        self.orphan_age = d;
        self
    }
    /// Sets the compaction threshold (dead fraction, 0..=1).
    #[must_use]
    pub fn compact_threshold(mut self, f: f64) -> Self {
        self.compact_threshold = f;
        self
    }
}

/// Count and bytes of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindStats {
    /// Blobs.
    pub blobs: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Time spent in each phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Phases {
    /// Removing expired leases.
    pub expire_ms: u64,
    /// Snapshot scan and mark.
    pub mark_ms: u64,
    /// Sweep transactions and file unlinks.
    pub sweep_ms: u64,
    /// Segment compaction.
    pub compact_ms: u64,
    /// Orphan files.
    pub orphans_ms: u64,
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Blobs removed.
    pub removed_blobs: u64,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Removed, by kind (`index`, `manifest`, `config`, `layer`, `other`).
    pub removed_by_kind: BTreeMap<String, KindStats>,
    /// With `dry_run`: every digest a real run would remove.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Digest>,
    /// Blobs reachable from the roots (kept).
    pub marked: u64,
    /// Candidates a concurrent writer made live again before their sweep (kept). The
    /// children of such a candidate are live through it and are not offered (nor counted).
    pub kept_live: u64,
    /// Images kept only because a container uses them (no name points at them).
    pub kept_for_containers: Vec<Digest>,
    /// Leases removed because they expired.
    pub expired_leases: Vec<String>,
    /// Segments compacted.
    pub segments_compacted: u64,
    /// Bytes of segment files freed by compaction.
    pub compacted_bytes: u64,
    /// Orphan files and directories removed.
    pub orphans_removed: u64,
    /// Segments compaction left alone because their records are damaged (`verify --deep`
    /// names the blobs concerned).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub segments_damaged: Vec<u64>,
    /// The disk was full: the reserve was given back first, and the run committed each
    /// sweep as it went.
    pub released_reserve: bool,
    /// Phase timings.
    pub phases: Phases,
}

/// The store's graph on one read snapshot. A node is a position in `all`, every blob of
/// the snapshot in key order: a `u32` hashes, sorts and stores cheaply (millions of them
/// are marked), and its order is the index's key order.
struct SnapGraph<'a> {
    all: &'a Nodes,
    /// Whether each node is a manifest or index: only those have `edges`.
    images: &'a [bool],
    edges: redb::ReadOnlyMultimapTable<&'static [u8], &'static [u8]>,
    /// `None` when referrers are not followed or there are none.
    referrers: Option<redb::ReadOnlyMultimapTable<&'static [u8], &'static [u8]>>,
}

/// Every blob of the snapshot in key order, and the way back from a digest to its
/// position. A binary search over millions of 65-byte digests misses the cache at every
/// step; instead each node has an 8-byte prefix (algorithm byte, then the first 7 hash
/// bytes), and the prefixes are cut into about one bucket per node by their value
/// (digests are uniform, so the buckets are even): a lookup reads the bucket's start,
/// the few prefixes in it, and one digest.
#[derive(Default)]
struct Nodes {
    all: Vec<Digest>,
    prefix: Vec<u64>,
    /// `start[k]`: the first node of bucket `k`; one more entry closes the last bucket.
    start: Vec<u32>,
    buckets: u128,
    lo: u64,
    span: u128,
}

fn prefix_of(d: &Digest) -> u64 {
    let mut b = [0u8; 8];
    b[0] = d.algorithm().id();
    b[1..].copy_from_slice(&d.hash()[..7]);
    u64::from_be_bytes(b)
}

impl Nodes {
    /// Appends `d`, which must sort after every digest already here.
    fn push(&mut self, d: Digest) {
        debug_assert!(self.all.last().is_none_or(|l| *l < d));
        self.prefix.push(prefix_of(&d));
        self.all.push(d);
    }

    /// Builds the buckets; call once, after the last push.
    fn seal(&mut self) {
        let (Some(&lo), Some(&hi)) = (self.prefix.first(), self.prefix.last()) else {
            return;
        };
        self.lo = lo;
        self.span = u128::from(hi - lo) + 1;
        let buckets = self.all.len();
        self.buckets = buckets as u128;
        self.start = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for k in 0..buckets {
            while i < self.prefix.len() && self.bucket(self.prefix[i]) < k {
                i += 1;
            }
            self.start.push(i as u32);
        }
        self.start.push(self.all.len() as u32);
    }

    /// The bucket of a prefix within `lo..=hi`.
    fn bucket(&self, p: u64) -> usize {
        (u128::from(p - self.lo) * self.buckets / self.span) as usize
    }

    fn len(&self) -> usize {
        self.all.len()
    }

    fn digest(&self, n: u32) -> Digest {
        self.all[n as usize]
    }

    /// The position of `d`, if the snapshot stores it.
    fn find(&self, d: &Digest) -> Option<u32> {
        let p = prefix_of(d);
        let (&lo, &hi) = (self.prefix.first()?, self.prefix.last()?);
        if p < lo || p > hi {
            return None;
        }
        let k = self.bucket(p);
        let (from, to) = (self.start[k] as usize, self.start[k + 1] as usize);
        let at = from + self.prefix[from..to].partition_point(|&x| x < p);
        // Digests sharing a 7-byte prefix are rare: compare them whole.
        (at..self.all.len())
            .take_while(|&i| self.prefix[i] == p)
            .find(|&i| self.all[i] == *d)
            .map(|i| i as u32)
    }
}

impl layerstore_gc::Graph for SnapGraph<'_> {
    type Node = u32;
    type Error = Error;

    fn children(&self, node: &u32, out: &mut Vec<u32>) -> Result<()> {
        let n = *node as usize;
        let k = self.all.digest(*node).key();
        // A child the snapshot does not store cannot be collected: it needs no node.
        if self.images[n] {
            for c in self.edges.get(&*k)? {
                out.extend(self.all.find(&Digest::from_key(c?.value())?));
            }
        }
        if let Some(r) = &self.referrers {
            for c in r.get(&*k)? {
                out.extend(self.all.find(&Digest::from_key(c?.value())?));
            }
        }
        Ok(())
    }
}

/// Deletes through the commit queue (non-durable commits), collecting the large files
/// it deleted; they are unlinked only after the collector's final durable commit.
///
/// It also keeps the reference-count decrements the deletions owe (a child once per
/// removed edge) and hands each back with the batch that offers that child (children are
/// offered in key order, in the round after their parents), so a transaction's writes
/// stay among neighbouring keys; [`Sweeper::settle`] writes the rest (children that were
/// not candidates), also in key order.
struct Sweeper<'a> {
    store: &'a Store,
    all: &'a Nodes,
    cutoff_ms: u64,
    drop_referrers: bool,
    report: &'a mut GcReport,
    /// Large files of deleted generations, unlinked after the durable commit.
    unlink: Vec<(Digest, u64)>,
    /// Decrements owed to nodes, by node (which is key order).
    owed: BTreeMap<u32, u64>,
    /// Decrements owed to children the snapshot does not store (absent ones).
    stray: BTreeMap<Digest, u64>,
    batch: usize,
    /// The disk is full: each sweep is made durable at once and its large files removed,
    /// so space comes back as the run goes (the index can reuse its freed pages only
    /// after a durable commit).
    low_space: bool,
}

impl Sweeper<'_> {
    /// Records a decrement owed to `d`; returns its node.
    fn owe(&mut self, d: Digest, by: u64) -> Option<u32> {
        let n = self.all.find(&d);
        match n {
            Some(n) => *self.owed.entry(n).or_default() += by,
            None => *self.stray.entry(d).or_default() += by,
        }
        n
    }

    /// Runs one sweep op; returns what it did and the nodes it now owes decrements.
    fn submit(&mut self, mut op: SweepOp) -> Result<(meta::Sweep, Vec<u32>)> {
        op.keep_touched_after_ms = self.cutoff_ms;
        op.drop_referrers = self.drop_referrers;
        let sent = op.decrements.clone();
        let o = match self.store.inner.meta.submit(Op::Sweep(op)) {
            Ok(o) => o,
            Err(e) => {
                // Not applied: still owed.
                for (c, by) in sent {
                    self.owe(c, by);
                }
                return Err(e);
            }
        };
        let owed_nodes = o
            .sweep
            .owed
            .iter()
            .filter_map(|c| self.owe(*c, 1))
            .collect();
        if self.low_space && !o.sweep.deleted.is_empty() {
            self.store.inner.meta.submit(Op::Seal(Vec::new()))?;
            let files = &self.store.inner.files;
            for (d, e) in &o.sweep.deleted {
                if let Location::Large { generation } = e.location {
                    files.remove_large(d, generation);
                }
            }
        }
        for (d, e) in &o.sweep.deleted {
            // Only the generation this sweep deleted: a newer copy is never touched.
            if let Location::Large { generation } = e.location {
                self.unlink.push((*d, generation));
            }
            self.report.removed_blobs += 1;
            self.report.removed_bytes += e.size;
            let k = self
                .report
                .removed_by_kind
                .entry(e.kind.name().to_owned())
                .or_default();
            k.blobs += 1;
            k.bytes += e.size;
        }
        Ok((o.sweep, owed_nodes))
    }

    /// Writes every decrement still owed, in key order and bounded batches; the last
    /// batch clears the store's `gc_owed_counts` flag.
    fn settle(&mut self) -> Result<()> {
        let mut rest: Vec<(Digest, u64)> = std::mem::take(&mut self.owed)
            .into_iter()
            .map(|(n, by)| (self.all.digest(n), by))
            .chain(std::mem::take(&mut self.stray))
            .collect();
        rest.sort_unstable();
        let mut chunks = rest.chunks(self.batch.max(1)).peekable();
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let settled = chunks.peek().is_none();
            self.submit(SweepOp {
                decrements: chunk.to_vec(),
                settled,
                ..SweepOp::default()
            })?;
            if settled {
                return Ok(());
            }
        }
    }
}

impl layerstore_gc::Sweeper<u32> for Sweeper<'_> {
    type Error = Error;

    fn sweep(&mut self, batch: &[u32]) -> Result<layerstore_gc::Swept<u32>> {
        let mut nodes = batch.to_vec();
        nodes.sort_unstable();
        if nodes.is_empty() {
            return Ok(layerstore_gc::Swept::default());
        }
        // The decrements owed to this batch's candidates (each must see its own before
        // its re-check). Those owed to blobs that are not candidates wait for the settling
        // at the end, so no transaction takes more than its batch's worth.
        let mut decrements: Vec<(Digest, u64)> = Vec::new();
        for &n in &nodes {
            if let Some(by) = self.owed.remove(&n) {
                decrements.push((self.all.digest(n), by));
            }
        }
        let of_batch: HashMap<Digest, u32> =
            nodes.iter().map(|&n| (self.all.digest(n), n)).collect();
        let (sw, orphaned) = self.submit(SweepOp {
            candidates: nodes.iter().map(|&n| self.all.digest(n)).collect(),
            decrements,
            ..SweepOp::default()
        })?;
        let back = |ds: &[Digest]| ds.iter().filter_map(|d| of_batch.get(d).copied()).collect();
        let deleted: Vec<Digest> = sw.deleted.iter().map(|(d, _)| *d).collect();
        Ok(layerstore_gc::Swept {
            deleted: back(&deleted),
            kept: back(&sw.kept),
            orphaned,
            deferred: back(&sw.deferred),
        })
    }
}

/// The share of a segment's records (by bytes) that no entry names.
fn dead_fraction(row: &SegmentRow) -> f64 {
    let body = row.committed_len.saturating_sub(SEGMENT_HEADER_LEN);
    #[allow(clippy::cast_precision_loss)]
    if body == 0 {
        0.0
    } else {
        row.dead_bytes as f64 / body as f64
    }
}

fn gc_err(e: layerstore_gc::Error<Error>) -> Error {
    match e {
        layerstore_gc::Error::Interrupted => Error::Interrupted,
        layerstore_gc::Error::Stalled => Error::Corrupt("the collector made no progress".into()),
        layerstore_gc::Error::Graph(e) => e,
    }
}

impl Store {
    /// Deletes one blob now, as containerd's content `Delete` and a registry's blob or
    /// manifest `DELETE` do: refused with [`Error::Referenced`] (nothing changed) while a
    /// stored manifest or index names it or a name, container or lease holds it; a
    /// referrer may go while its subject stays. Deleting a manifest or index removes its
    /// edges (its children become collectable, not deleted). The commit is durable before
    /// a large blob's file is removed. Returns the blob's size; [`Error::NotFound`] if it
    /// is not stored.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn delete(&self, d: &Digest) -> Result<u64> {
        let o = self.inner.meta.submit(Op::Delete(*d))?;
        let mut size = 0;
        for (d, e) in &o.sweep.deleted {
            size += e.size;
            // Only the generation deleted: a newer copy is never touched.
            if let Location::Large { generation } = e.location {
                let key = Key::Large {
                    digest: *d,
                    generation,
                };
                let files = &self.inner.files;
                files
                    .backend
                    .remove(&key)
                    .map_err(|e| files.io("remove", &key, e))?;
            }
        }
        Ok(size)
    }

    /// Collects garbage: removes expired leases, marks from the roots on a snapshot,
    /// sweeps the rest with a re-check per blob, compacts mostly-dead segments and removes
    /// orphan files. With `opts.dry_run`, reports exactly what a real run would remove
    /// (when no writer runs in between) and changes nothing.
    pub fn gc(&self, opts: &GcOptions, interrupt: &AtomicBool) -> Result<GcReport> {
        self.collect(opts, interrupt, &mut || {}, &layerstore_gc::NoProgress)
    }

    /// [`Store::gc`], reporting progress: `("scan", blobs read, None)` while it reads the
    /// index, `("mark", blobs marked, None)` after each frontier, `("sweep", blobs
    /// removed, Some(candidates))` after each sweep transaction, and `("compact", segments
    /// looked at, Some(segments))`.
    pub fn gc_progress(
        &self,
        opts: &GcOptions,
        interrupt: &AtomicBool,
        progress: &dyn Progress,
    ) -> Result<GcReport> {
        self.collect(opts, interrupt, &mut || {}, progress)
    }

    /// [`Store::gc`], running `between` after the mark and before the sweep: the window in
    /// which a concurrent writer may make a candidate live again (tests use it to make
    /// that race happen deterministically).
    pub fn gc_with(
        &self,
        opts: &GcOptions,
        interrupt: &AtomicBool,
        between: &mut dyn FnMut(),
    ) -> Result<GcReport> {
        self.collect(opts, interrupt, between, &layerstore_gc::NoProgress)
    }

    fn collect(
        &self,
        opts: &GcOptions,
        interrupt: &AtomicBool,
        between: &mut dyn FnMut(),
        progress: &dyn Progress,
    ) -> Result<GcReport> {
        let _span = tracing::info_span!("gc", dry_run = opts.dry_run).entered();
        let waited = Instant::now();
        let _one_at_a_time = self
            .inner
            .gc_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = &self.inner.meta.stats;
        crate::metrics::add(&st.gc_lock_wait_us, crate::metrics::us(waited.elapsed()));
        let start = Instant::now();
        let r = self.collect_locked(opts, interrupt, between, progress);
        let took = crate::metrics::us(start.elapsed());
        crate::metrics::add(&st.gc_runs, 1);
        crate::metrics::add(&st.gc_us, took);
        st.gc_us_last
            .store(took, std::sync::atomic::Ordering::Relaxed);
        match &r {
            Ok(rep) => tracing::info!(
                removed_blobs = rep.removed_blobs,
                removed_bytes = rep.removed_bytes,
                marked = rep.marked,
                mark_ms = rep.phases.mark_ms,
                sweep_ms = rep.phases.sweep_ms,
                compact_ms = rep.phases.compact_ms,
                orphans_ms = rep.phases.orphans_ms,
                took_us = took,
                "collected"
            ),
            Err(e) => tracing::warn!(error = %e, took_us = took, "collection failed"),
        }
        r
    }

    fn collect_locked(
        &self,
        opts: &GcOptions,
        interrupt: &AtomicBool,
        between: &mut dyn FnMut(),
        progress: &dyn Progress,
    ) -> Result<GcReport> {
        if opts.dry_run {
            return self.collect_once(opts, interrupt, between, progress, false);
        }
        // A full disk: the index needs new pages even to delete, so the reserve goes
        // first, and the run commits each sweep durably and frees its files at once.
        let backend = &self.inner.files.backend;
        let reserve = self.inner.opts.reserve;
        let io = |e| Error::io("reserve", self.inner.root.clone(), e);
        let mut low = reserve > 0
            && backend
                .free_space()
                .map_err(io)?
                .is_some_and(|free| free < reserve);
        if low {
            backend.release_reserve().map_err(io)?;
        }
        let mut r = self.collect_once(opts, interrupt, between, progress, low);
        if let Err(e) = &r
            && e.is_no_space()
            && !low
        {
            backend.release_reserve().map_err(io)?;
            low = true;
            r = self.collect_once(opts, interrupt, between, progress, low);
        }
        if low {
            r = r.map(|mut rep| {
                rep.released_reserve = true;
                rep
            });
            // Back once there is room for it again (not at the cost of the last of it).
            if reserve > 0 {
                let _ = backend.ensure_reserve(reserve);
            }
        }
        r
    }

    fn collect_once(
        &self,
        opts: &GcOptions,
        interrupt: &AtomicBool,
        between: &mut dyn FnMut(),
        progress: &dyn Progress,
        low_space: bool,
    ) -> Result<GcReport> {
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        if !opts.dry_run && meta::Meta::owes_counts(&*self.inner.meta.read()?)? {
            // An earlier run stopped before writing all its decrements.
            self.inner.meta.submit(Op::RebuildCounts)?;
        }
        let leases = self.leases()?;
        if leases.iter().any(|l| l.record.id == RECOVERED_LEASE) {
            return Err(Error::Invalid(format!(
                "the store holds recovered blobs under lease {RECOVERED_LEASE:?} \
                 (after `repair --rebuild-index`): re-create names, then \
                 `store lease rm {RECOVERED_LEASE}` before collecting"
            )));
        }

        // 1. Expired leases.
        let t = Instant::now();
        let now = crate::sys::now_ms();
        if opts.dry_run {
            report.expired_leases = leases
                .iter()
                .filter(|l| l.record.expires_ms.is_some_and(|e| e <= now))
                .map(|l| l.record.id.clone())
                .collect();
        } else {
            report.expired_leases = self
                .inner
                .meta
                .submit(Op::ExpireLeases { now_ms: now })?
                .expired;
        }
        report.phases.expire_ms = t.elapsed().as_millis() as u64;

        // 2. Mark on one snapshot.
        let t = Instant::now();
        let cutoff = now.saturating_sub(crate::sys::millis(opts.grace));
        let txn = self.inner.meta.read()?;
        // Every blob, in key order (the order the sweep keeps: neighbouring keys per
        // transaction), and the young ones, which are roots.
        let mut all = Nodes::default();
        let mut images: Vec<bool> = Vec::new();
        let mut roots: Vec<u32> = Vec::new();
        let mut sizes: Vec<(Kind, u64)> = Vec::new();
        for r in txn.open_table(meta::BLOBS)?.iter()? {
            let (k, v) = r?;
            let e = meta::BlobEntry::decode(v.value())?;
            if all.len().is_multiple_of(65536) {
                progress.report("scan", all.len() as u64, None);
            }
            if e.touched_ms >= cutoff {
                roots.push(all.len() as u32);
            }
            all.push(Digest::from_key(k.value())?);
            images.push(matches!(e.kind, Kind::Manifest | Kind::Index));
            if all.len() > u32::MAX as usize {
                return Err(Error::Invalid(format!(
                    "more than {} blobs: the collector numbers them in 32 bits",
                    u32::MAX
                )));
            }
            if opts.dry_run {
                sizes.push((e.kind, e.size));
            }
        }
        all.seal();
        let mut named: HashSet<Digest> = HashSet::new();
        for r in txn.open_table(meta::NAMES)?.iter()? {
            let d = Digest::from_key(r?.1.value())?;
            roots.extend(all.find(&d));
            named.insert(d);
        }
        let mut for_containers = HashSet::new();
        for r in txn.open_table(meta::CONTAINERS)?.iter()? {
            let rec: meta::ContainerRecord = serde_json::from_slice(r?.1.value())
                .map_err(|e| Error::Corrupt(format!("container record: {e}")))?;
            if !named.contains(&rec.image) {
                for_containers.insert(rec.image);
            }
            roots.extend(all.find(&rec.image));
        }
        for l in &leases {
            if l.record.expires_ms.is_none_or(|e| e > now) {
                roots.extend(l.resources.iter().filter_map(|d| all.find(d)));
            }
        }
        report.kept_for_containers = for_containers.into_iter().collect();
        report.kept_for_containers.sort();
        let referrers = txn.open_multimap_table(meta::REFERRERS)?;
        let graph = SnapGraph {
            all: &all,
            images: &images,
            edges: txn.open_multimap_table(meta::EDGES)?,
            referrers: (!opts.drop_referrers && referrers.iter()?.next().is_some())
                .then_some(referrers),
        };
        let mut engine_opts = layerstore_gc::Options::new(interrupt);
        engine_opts.progress = progress;
        engine_opts.batch = opts.batch.max(1);
        let plan = layerstore_gc::plan(&graph, roots, 0..all.len() as u32, &engine_opts)
            .map_err(gc_err)?;
        drop(graph);
        drop(txn);
        drop(images);
        report.marked = plan.marked as u64;
        report.phases.mark_ms = t.elapsed().as_millis() as u64;

        if opts.dry_run {
            for &n in &plan.candidates {
                let (kind, size) = sizes[n as usize];
                report.removed_blobs += 1;
                report.removed_bytes += size;
                let k = report
                    .removed_by_kind
                    .entry(kind.name().to_owned())
                    .or_default();
                k.blobs += 1;
                k.bytes += size;
            }
            report.removed = plan.candidates.iter().map(|&n| all.digest(n)).collect();
            return Ok(report);
        }

        between();

        // 3. Sweep.
        let t = Instant::now();
        let mut sweeper = Sweeper {
            store: self,
            cutoff_ms: cutoff,
            drop_referrers: opts.drop_referrers,
            report: &mut report,
            unlink: Vec::new(),
            all: &all,
            owed: BTreeMap::new(),
            stray: BTreeMap::new(),
            batch: engine_opts.batch,
            low_space,
        };
        let swept = layerstore_gc::execute(&plan, &mut sweeper, &engine_opts);
        // The decrements still owed, also after an interrupt or error (if this fails
        // too, the flag stays and the next open or run rebuilds the counts).
        let settled = sweeper.settle();
        let unlink = std::mem::take(&mut sweeper.unlink);
        // One durable commit makes every sweep durable; only then may files go. (Also
        // after an interrupt or error: what was swept stays swept.)
        self.inner.meta.submit(Op::Seal(Vec::new()))?;
        let files = &self.inner.files;
        for (d, generation) in unlink {
            let key = Key::Large {
                digest: d,
                generation,
            };
            files
                .backend
                .remove(&key)
                .map_err(|e| files.io("remove", &key, e))?;
        }
        let outcome = swept.map_err(gc_err)?;
        settled?;
        // Kept at the end: a candidate kept at its first offer and deleted once its last
        // parent went does not count.
        report.kept_live = outcome.kept.len() as u64;
        report.phases.sweep_ms = t.elapsed().as_millis() as u64;

        // 4. Compaction.
        let t = Instant::now();
        let mut segments = self.inner.meta.segments()?;
        let n_segments = segments.len() as u64;
        // Sealed segments first; then active ones, looked at again (the copies just
        // appended to them are live).
        segments.sort_by_key(|(id, row)| (!row.sealed, *id));
        let worth =
            |row: &SegmentRow| row.dead_bytes > 0 && dead_fraction(row) >= opts.compact_threshold;
        for (i, (id, row)) in segments.into_iter().enumerate() {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            progress.report("compact", i as u64, Some(n_segments));
            if !worth(&row) {
                continue;
            }
            // A shard's active segment is sealed first (under its append lock): a store
            // whose images were all removed gets its space back too.
            let row = if row.sealed {
                row
            } else {
                match self.seal_active(id, row.shard, &worth)? {
                    Some(row) => row,
                    None => continue,
                }
            };
            if self.compact(id, row)? {
                report.segments_compacted += 1;
                report.compacted_bytes += row.dead_bytes;
            } else {
                report.segments_damaged.push(id);
            }
        }
        // Mappings of segments compacted now or by earlier runs that no snapshot needs.
        self.inner.files.reap(self.inner.meta.oldest_reader());
        report.phases.compact_ms = t.elapsed().as_millis() as u64;

        // 5. Orphan files.
        let t = Instant::now();
        report.orphans_removed = self.remove_orphans(opts.orphan_age)?;
        report.phases.orphans_ms = t.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Copies the live records of a sealed segment into the active segment of a shard,
    /// commits the new locations (a blob deleted meanwhile keeps its deletion), and
    /// unlinks the old file. A crash at any point loses nothing: before the commit the
    /// old records are still the indexed ones; after it, the new ones are durable.
    #[tracing::instrument(level = "debug", skip(self, row), fields(dead_bytes = row.dead_bytes))]
    fn compact(&self, id: u64, row: SegmentRow) -> Result<bool> {
        let files = &self.inner.files;
        let scan =
            files.scan_segment(row.shard, id, row.committed_len, &mut |_, _, _| Ok(Ok(())))?;
        if !scan.damaged.is_empty() {
            // Entries may name records in the damage: never drop the segment under them
            // (`verify --deep` names them; `verify --repair` settles them).
            return Ok(false);
        }
        let txn = self.inner.meta.read()?;
        let mut live = Vec::new();
        for (at, h) in scan.records {
            let payload = at + RECORD_HEADER_LEN;
            if let Some(e) = meta::Meta::entry(&txn, &h.digest)?
                && e.location
                    == (Location::Packed {
                        segment: id,
                        offset: payload,
                    })
            {
                live.push((h, payload));
            }
        }
        drop(txn);
        let mut w = self.inner.take_shard();
        let blobs: Vec<crate::Blob> = live
            .iter()
            .map(|(h, payload)| files.read_packed(id, *payload, h.stored_len))
            .collect::<Result<_>>()?;
        let recs: Vec<(crate::format::RecordHeader, &[u8])> = live
            .iter()
            .zip(&blobs)
            .map(|((h, _), b)| (*h, &b[..]))
            .collect();
        let result = (|| {
            let appended = if recs.is_empty() {
                None
            } else {
                Some(files.append(&mut w, &recs)?)
            };
            let finish = files.finish_batch(&mut w);
            let mut segments = appended
                .as_ref()
                .map(|a| a.updates.clone())
                .unwrap_or_default();
            let mut job = None;
            if let Some((u, j)) = finish {
                segments.push(u);
                job = Some(j);
            }
            let moves = match &appended {
                Some(a) => live
                    .iter()
                    .zip(&a.placed)
                    .map(|((h, old), p)| {
                        (
                            h.digest,
                            *old,
                            Location::Packed {
                                segment: p.segment,
                                offset: p.offset,
                            },
                            RECORD_HEADER_LEN + h.stored_len,
                        )
                    })
                    .collect(),
                None => Vec::new(),
            };
            if let Some(j) = &job {
                j.run()?;
            }
            self.inner.meta.submit(Op::Relocate(RelocateOp {
                moves,
                segments: segments.clone(),
                durable: None,
                old: id,
            }))?;
            files.committed(&mut w, &segments);
            Ok(())
        })();
        if let Err(e) = result {
            // The active segment may hold an unfinished copy: take no more appends on it.
            w.active = None;
            return Err(e);
        }
        drop(w);
        // Snapshots from now on see the new locations; older ones keep the old mapping
        // until they are gone (`Files::reap`).
        let epoch = self.inner.meta.advance_epoch();
        files.retire_segment(row.shard, id, row.committed_len, epoch)?;
        Ok(true)
    }

    /// Seals segment `id` if it is still `shard`'s active segment, under the shard's
    /// append lock; returns its row as sealed (`None`: it is gone or moved on).
    /// Seals segment `id` if it is still `shard`'s active segment and its row (read again
    /// under the shard's append lock) is still `worth` compacting; returns that row.
    fn seal_active(
        &self,
        id: u64,
        shard: u32,
        worth: &dyn Fn(&SegmentRow) -> bool,
    ) -> Result<Option<SegmentRow>> {
        let mut w = self.inner.lock_shard(shard);
        if w.active.as_ref().is_none_or(|a| a.id != id) {
            return Ok(None);
        }
        let Some(row) = self
            .inner
            .meta
            .segments()?
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, r)| r)
            .filter(|r| worth(r))
        else {
            return Ok(None);
        };
        self.inner.meta.submit(Op::Seal(vec![id]))?;
        self.inner.files.mark_sealed(id, row.committed_len);
        w.active = None;
        Ok(Some(SegmentRow {
            sealed: true,
            ..row
        }))
    }

    /// Removes objects nothing names that have not changed for `age`: large files no entry
    /// names, segment files no row names, and uploads no live ingest of this process
    /// writes. Returns how many were removed.
    fn remove_orphans(&self, age: Duration) -> Result<u64> {
        let mut removed = 0;
        let files = &self.inner.files;
        let backend = &files.backend;
        let old = |l: &crate::backend::Listed| l.age.is_some_and(|a| a >= age);
        let list = |what: &List| {
            backend
                .list(what)
                .map_err(|e| Error::io("list", self.inner.root.clone(), e))
        };
        let remove = |k: &Key| backend.remove(k).map_err(|e| files.io("remove", k, e));
        // Large files: those no entry names, in two passes. A file is published (and in
        // flight) before the commit that names it; the second pass skips files in flight
        // and only then takes the snapshot it checks against, so a file whose commit
        // finished after the first snapshot is seen indexed, and one still committing is
        // seen in flight. (Age alone is not enough: `orphan_age` may be 0, a commit may
        // stall behind a slow disk.)
        let mut unnamed: Vec<crate::backend::Listed> = Vec::new();
        let txn = self.inner.meta.read()?;
        for l in files.large_files()? {
            let named = match &l.key {
                Some(Key::Large { digest, generation }) => {
                    meta::Meta::names_large(&txn, digest, *generation)?
                }
                _ => false,
            };
            if !named && old(&l) {
                unnamed.push(l);
            }
        }
        drop(txn);
        unnamed.retain(|l| match &l.key {
            Some(Key::Large { digest, generation }) => !files.in_flight(digest, *generation),
            _ => true,
        });
        let txn = self.inner.meta.read()?;
        for l in unnamed {
            // A name no writer produces is not ours to interpret, and is not removed.
            if let Some(k @ Key::Large { digest, generation }) = &l.key
                && !meta::Meta::names_large(&txn, digest, *generation)?
                && remove(k)?
            {
                removed += 1;
            }
        }
        drop(txn);
        // Segment files no row names and this process has not created (an uncommitted
        // batch of an earlier process, or a compacted segment whose removal a crash
        // undid).
        let rows: HashSet<u64> = self
            .inner
            .meta
            .segments()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for shard in 0..self.inner.shard_count() {
            for l in list(&List::Segments(shard))? {
                if let Some(k @ Key::Segment { id, .. }) = &l.key
                    && !rows.contains(id)
                    && !files.has_view(*id)
                    && old(&l)
                    && remove(k)?
                {
                    removed += 1;
                }
            }
        }
        // Uploads whose directory and every part are old, and that no live ingest holds
        // (checked and removed under the live table's lock: a resume cannot start on one
        // that is going).
        for l in list(&List::Uploads)? {
            if l.key.is_none() && old(&l) && self.remove_upload_if_idle(&l.name)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Depth, Options, PutOptions, VerifyOptions};

    /// What `verify --deep` finds wrong with the graph (counts, holds, missing children):
    /// the tests' configs and layers are not real ones, so only these findings count.
    fn graph_problems(store: &Store) -> Vec<crate::Problem> {
        store
            .verify(
                &VerifyOptions::depth(Depth::Deep),
                &AtomicBool::new(false),
                &|_| {},
            )
            .unwrap()
            .problems
            .into_iter()
            .filter(|p| ["refcount", "holds", "missing-child"].contains(&p.kind.name()))
            .collect()
    }

    fn manifest(config: &crate::Descriptor, layer: &crate::Descriptor) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            config.digest, config.size, layer.digest, layer.size
        )
        .into_bytes()
    }

    /// A large file renamed into `large/` whose commit has not finished is not an
    /// orphan, even with `orphan_age` 0; once its installer gives up, it is.
    #[test]
    fn a_large_file_in_flight_is_no_orphan_whatever_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let files = &store.inner.files;
        let d = Digest::compute(crate::Algorithm::Sha256, b"in flight");
        let st = files.stage("flight").unwrap();
        crate::backend::write_all_at(&*st.handle, b"a record, as far as the orphan pass cares", 0)
            .unwrap();
        let g = files.publish(&[(&st.key, &*st.handle, d)]).unwrap()[0];
        let path = dir.path().join(
            Key::Large {
                digest: d,
                generation: g,
            }
            .relative_path(),
        );
        assert!(path.exists());
        let opts = GcOptions::default()
            .grace(Duration::ZERO)
            .orphan_age(Duration::ZERO);
        let r = store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert_eq!(r.orphans_removed, 0);
        assert!(path.exists(), "in flight: kept");
        files.settled(&d, g);
        let r = store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert_eq!(r.orphans_removed, 1);
        assert!(!path.exists(), "given up: an orphan");
    }

    /// A snapshot older than a compaction still reads the moved blobs from the old
    /// segment (unlinked, still mapped); once it is gone, the mapping is dropped, so the
    /// file's space comes back without closing the store.
    #[test]
    fn a_compacted_segment_is_unmapped_once_no_older_snapshot_lives() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(dir.path(), Options::default().shards(1).segment_size(4096)).unwrap();
        let lease = store.lease_create(None).unwrap().id;
        let mut keep = Vec::new();
        for i in 0..24 {
            let d = store
                .put(format!("blob {i} ").repeat(40).as_bytes())
                .unwrap();
            if i % 2 == 0 {
                keep.push(d.digest);
            }
        }
        store.lease_add(&lease, &keep).unwrap();
        let segment_of =
            |s: &crate::Snapshot<'_>, d: &Digest| match s.stat(d).unwrap().unwrap().location {
                Location::Packed { segment, .. } => segment,
                Location::Large { .. } => unreachable!(),
            };
        let old = store.snapshot().unwrap();
        let first = segment_of(&old, &keep[0]);
        let opts = GcOptions::default()
            .grace(Duration::ZERO)
            .compact_threshold(0.3);
        let r = store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert!(r.segments_compacted > 0, "{r:?}");
        let now = store.snapshot().unwrap();
        assert_ne!(segment_of(&now, &keep[0]), first, "moved by compaction");
        drop(now);
        // The older snapshot still names the old segment, whose file is gone.
        assert!(
            !dir.path()
                .join(
                    Key::Segment {
                        shard: 0,
                        id: first
                    }
                    .relative_path()
                )
                .exists()
        );
        assert!(store.inner.files.has_view(first));
        assert_eq!(
            &old.get(&keep[0]).unwrap()[..],
            "blob 0 ".repeat(40).as_bytes()
        );
        store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert!(
            store.inner.files.has_view(first),
            "kept while the old snapshot lives"
        );
        drop(old);
        store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert!(
            !store.inner.files.has_view(first),
            "dropped once it is gone"
        );
        for d in &keep {
            assert!(store.get(d).is_ok());
        }
    }

    /// Progress arrives phase by phase, and the sweep's last report is the whole run.
    #[test]
    fn progress_reports_each_phase() {
        struct Log(std::sync::Mutex<Vec<(&'static str, u64, Option<u64>)>>);
        impl Progress for Log {
            fn report(&self, phase: &'static str, done: u64, total: Option<u64>) {
                self.0.lock().unwrap().push((phase, done, total));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        for i in 0..10 {
            let c = store.put(format!("config {i}").as_bytes()).unwrap();
            let l = store.put(format!("layer {i}").as_bytes()).unwrap();
            let m = store
                .put_manifest(&manifest(&c, &l), PutOptions::default())
                .unwrap()
                .descriptor
                .digest;
            if i % 2 == 0 {
                store.tag(&format!("keep{i}:latest"), &m).unwrap();
            }
        }
        let log = Log(std::sync::Mutex::new(Vec::new()));
        let r = store
            .gc_progress(
                &GcOptions::default().grace(Duration::ZERO),
                &AtomicBool::new(false),
                &log,
            )
            .unwrap();
        assert_eq!(r.removed_blobs, 15);
        let log = log.0.into_inner().unwrap();
        let mut phases: Vec<&str> = log.iter().map(|(p, ..)| *p).collect();
        phases.dedup();
        assert_eq!(phases, ["scan", "mark", "sweep", "compact"], "{log:?}");
        let last_mark = log.iter().rev().find(|(p, ..)| *p == "mark").unwrap();
        assert_eq!(last_mark.1, r.marked);
        let last_sweep = log.iter().rev().find(|(p, ..)| *p == "sweep").unwrap();
        assert_eq!((last_sweep.1, last_sweep.2), (15, Some(15)));
    }

    #[test]
    fn nodes_find_every_member_and_nothing_else() {
        use crate::Algorithm;
        let mut ds: Vec<Digest> = (0..5000u32)
            .map(|i| Digest::compute(Algorithm::Sha256, &i.to_le_bytes()))
            .chain((0..50u32).map(|i| Digest::compute(Algorithm::Sha512, &i.to_le_bytes())))
            .collect();
        // Digests sharing their 7-byte prefix, and runs of them.
        let base = ds[0].hash().to_vec();
        for last in [1u8, 2, 3] {
            let mut h = base.clone();
            h[31] ^= last;
            ds.push(Digest::from_raw(Algorithm::Sha256, &h).unwrap());
        }
        ds.sort_unstable();
        ds.dedup();
        // Every seventh left out (absent ones in the middle), and the last few (after it).
        let kept = |i: usize| !i.is_multiple_of(7) && i < ds.len() - 20;
        let members: Vec<Digest> = (0..ds.len()).filter(|&i| kept(i)).map(|i| ds[i]).collect();
        let absent: Vec<Digest> = (0..ds.len()).filter(|&i| !kept(i)).map(|i| ds[i]).collect();
        let mut nodes = Nodes::default();
        for d in &members {
            nodes.push(*d);
        }
        nodes.seal();
        for (i, d) in members.iter().enumerate() {
            assert_eq!(nodes.find(d), Some(i as u32), "{d}");
        }
        for d in &absent {
            assert_eq!(nodes.find(d), None);
        }
        for i in 5000..6000u32 {
            let d = Digest::compute(Algorithm::Blake3, &i.to_le_bytes());
            assert_eq!(nodes.find(&d), None);
        }
        assert_eq!(Nodes::default().find(&members[0]), None);
    }

    /// The window between a sweep that deleted a parent and the write of its children's
    /// decrements: made durable (as a writer's commit would) and then cut short, the store
    /// reopens with the counts rebuilt from the edges, verifies clean, and a collection
    /// frees the children.
    #[test]
    fn counts_owed_by_a_cut_short_sweep_are_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (m, config, layer, shared_by) = {
            let store = Store::open(dir.path(), Options::default()).unwrap();
            let config = store.put(b"config").unwrap();
            let layer = store.put(b"layer").unwrap();
            let m = store
                .put_manifest(&manifest(&config, &layer), PutOptions::default())
                .unwrap()
                .descriptor
                .digest;
            // A second, named image shares the layer: its count must end at 1, not 0.
            let config2 = store.put(b"config 2").unwrap();
            let m2 = store
                .put_manifest(&manifest(&config2, &layer), PutOptions::default())
                .unwrap()
                .descriptor
                .digest;
            store.tag("keep:latest", &m2).unwrap();
            assert_eq!(store.counts(&layer.digest).unwrap().0, 2);

            let mut report = GcReport::default();
            let mut sweeper = Sweeper {
                store: &store,
                all: &Nodes::default(),
                cutoff_ms: u64::MAX,
                drop_referrers: false,
                report: &mut report,
                unlink: Vec::new(),
                owed: BTreeMap::new(),
                stray: BTreeMap::new(),
                batch: 16,
                low_space: false,
            };
            let (swept, _) = sweeper
                .submit(SweepOp {
                    candidates: vec![m],
                    ..SweepOp::default()
                })
                .unwrap();
            assert_eq!(swept.deleted.len(), 1);
            assert_eq!(swept.owed.len(), 2, "one decrement per removed edge");
            assert_eq!(sweeper.stray.len(), 2);
            // Stale, never low: the layer still counts the deleted parent.
            assert_eq!(store.counts(&layer.digest).unwrap().0, 2);
            assert!(meta::Meta::owes_counts(&store.inner.meta.read().unwrap()).unwrap());
            // Verify, meanwhile, takes a count that is too high for what it is.
            let graph = graph_problems(&store);
            assert!(!graph.iter().any(|p| p.kind == "refcount"), "{graph:?}");
            // A writer's durable commit makes the sweep durable; then the process dies
            // (the store is dropped without settling).
            store.inner.meta.submit(Op::Seal(Vec::new())).unwrap();
            (m, config.digest, layer.digest, m2)
        };
        let store = Store::open(dir.path(), Options::default()).unwrap();
        assert!(!meta::Meta::owes_counts(&store.inner.meta.read().unwrap()).unwrap());
        assert_eq!(store.counts(&layer).unwrap().0, 1);
        assert_eq!(store.counts(&config).unwrap().0, 0);
        let graph = graph_problems(&store);
        assert!(graph.is_empty(), "{graph:?}");
        let r = store
            .gc(
                &GcOptions::default().grace(Duration::ZERO),
                &AtomicBool::new(false),
            )
            .unwrap();
        assert_eq!(r.removed_blobs, 1, "the orphaned config only");
        assert!(store.stat(&m).unwrap().is_none());
        assert!(store.stat(&config).unwrap().is_none());
        assert!(store.stat(&layer).unwrap().is_some());
        assert!(store.stat(&shared_by).unwrap().is_some());
    }

    /// Decrements handed back with a later batch and those settled at the end leave the
    /// counts exact, and the flag clear.
    #[test]
    fn a_run_settles_every_decrement_it_owes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let shared = store.put(b"shared layer").unwrap();
        let mut keep = Vec::new();
        for i in 0..40 {
            let c = store.put(format!("config {i}").as_bytes()).unwrap();
            let m = store
                .put_manifest(&manifest(&c, &shared), PutOptions::default())
                .unwrap()
                .descriptor
                .digest;
            if i % 4 == 0 {
                store.tag(&format!("keep{i}:latest"), &m).unwrap();
                keep.push(m);
            }
        }
        let mut opts = GcOptions::default().grace(Duration::ZERO);
        opts.batch = 3;
        let r = store.gc(&opts, &AtomicBool::new(false)).unwrap();
        assert_eq!(r.removed_blobs, 30 * 2);
        assert_eq!(store.counts(&shared.digest).unwrap().0, keep.len() as u64);
        assert!(!meta::Meta::owes_counts(&store.inner.meta.read().unwrap()).unwrap());
        let graph = graph_problems(&store);
        assert!(graph.is_empty(), "{graph:?}");
    }
}
