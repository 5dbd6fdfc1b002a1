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
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use redb::ReadableTable;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::meta::{self, Location, Op, RelocateOp, SegmentRow, SweepOp};
use crate::store::Store;

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
    /// Candidates offered per sweep transaction. Default 16384; each transaction also
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
            batch: 16384,
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
    /// Candidates a concurrent writer made live again before their sweep (kept).
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
    /// Phase timings.
    pub phases: Phases,
}

/// The store's graph on one read snapshot.
struct SnapGraph {
    edges: redb::ReadOnlyMultimapTable<&'static [u8], &'static [u8]>,
    referrers: Option<redb::ReadOnlyMultimapTable<&'static [u8], &'static [u8]>>,
}

impl layerstore_gc::Graph for SnapGraph {
    type Node = Digest;
    type Error = Error;

    fn children(&self, node: &Digest, out: &mut Vec<Digest>) -> Result<()> {
        let k = node.key();
        for c in self.edges.get(&*k)? {
            out.push(Digest::from_key(c?.value())?);
        }
        if let Some(r) = &self.referrers {
            for c in r.get(&*k)? {
                out.push(Digest::from_key(c?.value())?);
            }
        }
        Ok(())
    }
}

/// Deletes through the commit queue (non-durable commits), collecting the large files
/// it deleted; they are unlinked only after the collector's final durable commit.
struct Sweeper<'a> {
    store: &'a Store,
    cutoff_ms: u64,
    drop_referrers: bool,
    report: &'a mut GcReport,
    unlink: Vec<std::path::PathBuf>,
}

impl layerstore_gc::Sweeper<Digest> for Sweeper<'_> {
    type Error = Error;

    fn sweep(&mut self, batch: &[Digest]) -> Result<layerstore_gc::Swept<Digest>> {
        let o = self.store.inner.meta.submit(Op::Sweep(SweepOp {
            candidates: batch.to_vec(),
            keep_touched_after_ms: self.cutoff_ms,
            drop_referrers: self.drop_referrers,
        }))?;
        let files = &self.store.inner.files;
        let mut deleted = Vec::with_capacity(o.sweep.deleted.len());
        for (d, e) in o.sweep.deleted {
            // Only the generation this sweep deleted: a newer copy is never touched.
            if let Location::Large { generation } = e.location {
                self.unlink.push(files.large_path(&d, generation));
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
            deleted.push(d);
        }
        Ok(layerstore_gc::Swept {
            deleted,
            kept: o.sweep.kept,
            orphaned: o.sweep.orphaned,
            deferred: o.sweep.deferred,
        })
    }
}

fn gc_err(e: layerstore_gc::Error<Error>) -> Error {
    match e {
        layerstore_gc::Error::Interrupted => Error::Interrupted,
        layerstore_gc::Error::Stalled => Error::Corrupt("the collector made no progress".into()),
        layerstore_gc::Error::Graph(e) => e,
    }
}

fn kind_rank(k: Kind) -> u8 {
    match k {
        Kind::Index => 0,
        Kind::Manifest => 1,
        _ => 2,
    }
}

impl Store {
    /// Collects garbage: removes expired leases, marks from the roots on a snapshot,
    /// sweeps the rest with a re-check per blob, compacts mostly-dead segments and removes
    /// orphan files. With `opts.dry_run`, reports exactly what a real run would remove
    /// (when no writer runs in between) and changes nothing.
    pub fn gc(&self, opts: &GcOptions, interrupt: &AtomicBool) -> Result<GcReport> {
        self.gc_with(opts, interrupt, &mut || {})
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
        let _one_at_a_time = self
            .inner
            .gc_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
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
        let cutoff = now.saturating_sub(opts.grace.as_millis() as u64);
        let txn = self.inner.meta.read()?;
        let mut roots: Vec<Digest> = Vec::new();
        for r in txn.open_table(meta::NAMES)?.iter()? {
            roots.push(Digest::from_key(r?.1.value())?);
        }
        let named: HashSet<Digest> = roots.iter().copied().collect();
        let mut for_containers = HashSet::new();
        for r in txn.open_table(meta::CONTAINERS)?.iter()? {
            let rec: meta::ContainerRecord = serde_json::from_slice(r?.1.value())
                .map_err(|e| Error::Corrupt(format!("container record: {e}")))?;
            if !named.contains(&rec.image) {
                for_containers.insert(rec.image);
            }
            roots.push(rec.image);
        }
        let live_leases: HashSet<&str> = leases
            .iter()
            .filter(|l| l.record.expires_ms.is_none_or(|e| e > now))
            .map(|l| l.record.id.as_str())
            .collect();
        for l in &leases {
            if live_leases.contains(l.record.id.as_str()) {
                roots.extend(l.resources.iter().copied());
            }
        }
        let mut all: Vec<(u8, Digest)> = Vec::new();
        let mut sizes: HashMap<Digest, (Kind, u64)> = HashMap::new();
        for r in txn.open_table(meta::BLOBS)?.iter()? {
            let (k, v) = r?;
            let d = Digest::from_key(k.value())?;
            let e = meta::BlobEntry::decode(v.value())?;
            if e.touched_ms >= cutoff {
                roots.push(d);
            }
            all.push((kind_rank(e.kind), d));
            if opts.dry_run {
                sizes.insert(d, (e.kind, e.size));
            }
        }
        // Parents before children: indexes, then manifests, then the rest.
        all.sort_unstable();
        report.kept_for_containers = for_containers.into_iter().collect();
        report.kept_for_containers.sort();
        let graph = SnapGraph {
            edges: txn.open_multimap_table(meta::EDGES)?,
            referrers: if opts.drop_referrers {
                None
            } else {
                Some(txn.open_multimap_table(meta::REFERRERS)?)
            },
        };
        let mut engine_opts = layerstore_gc::Options::new(interrupt);
        engine_opts.batch = opts.batch.max(1);
        let plan =
            layerstore_gc::plan(&graph, roots, all.into_iter().map(|(_, d)| d), &engine_opts)
                .map_err(gc_err)?;
        drop(graph);
        drop(txn);
        report.marked = plan.marked as u64;
        report.phases.mark_ms = t.elapsed().as_millis() as u64;

        if opts.dry_run {
            for d in &plan.candidates {
                let (kind, size) = sizes[d];
                report.removed_blobs += 1;
                report.removed_bytes += size;
                let k = report
                    .removed_by_kind
                    .entry(kind.name().to_owned())
                    .or_default();
                k.blobs += 1;
                k.bytes += size;
            }
            report.removed = plan.candidates;
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
        };
        let swept = layerstore_gc::execute(&plan, &mut sweeper, &engine_opts);
        let unlink = std::mem::take(&mut sweeper.unlink);
        // One durable commit makes every sweep durable; only then may files go. (Also
        // after an interrupt or error: what was swept stays swept.)
        self.inner.meta.submit(Op::Seal(Vec::new()))?;
        for p in unlink {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io("remove", &p, err)),
            }
        }
        let outcome = swept.map_err(gc_err)?;
        // Kept at the end: a candidate kept at its first offer and deleted once its last
        // parent went does not count.
        report.kept_live = outcome.kept.len() as u64;
        report.phases.sweep_ms = t.elapsed().as_millis() as u64;

        // 4. Compaction.
        let t = Instant::now();
        for (id, row) in self.inner.meta.segments()? {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let body = row.committed_len.saturating_sub(SEGMENT_HEADER_LEN);
            #[allow(clippy::cast_precision_loss)]
            let dead = if body == 0 {
                0.0
            } else {
                row.dead_bytes as f64 / body as f64
            };
            if row.sealed && row.dead_bytes > 0 && dead >= opts.compact_threshold {
                self.compact(id, row)?;
                report.segments_compacted += 1;
                report.compacted_bytes += row.dead_bytes;
            }
        }
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
    fn compact(&self, id: u64, row: SegmentRow) -> Result<()> {
        let files = &self.inner.files;
        let records = files.scan_records(row.shard, id, row.committed_len)?;
        let txn = self.inner.meta.read()?;
        let mut live = Vec::new();
        for (at, h) in records {
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
            let finish = files.finish_batch(&mut w)?;
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
        if result.is_err() {
            // The active segment may hold an unfinished copy: take no more appends on it.
            w.active = None;
            return result;
        }
        drop(w);
        files.retire_segment(row.shard, id, row.committed_len)
    }

    /// Removes large files no index entry names and ingest directories untouched for
    /// longer than `age`. Returns how many were removed.
    fn remove_orphans(&self, age: Duration) -> Result<u64> {
        let mut removed = 0;
        let old = |p: &Path| -> bool {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|e| e >= age)
        };
        let large = self.root().join("large");
        let txn = self.inner.meta.read()?;
        for dir in std::fs::read_dir(&large).ctx("list", &large)? {
            let dir = dir.ctx("list", &large)?.path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).ctx("list", &dir)? {
                let p = f.ctx("list", &dir)?.path();
                let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let parsed = crate::blobs::Files::parse_large_name(name);
                let indexed = match parsed {
                    Some((d, g)) => meta::Meta::entry(&txn, &d)?
                        .is_some_and(|e| e.location == Location::Large { generation: g }),
                    None => false,
                };
                if !indexed && old(&p) {
                    std::fs::remove_file(&p).ctx("remove", &p)?;
                    removed += 1;
                }
            }
        }
        drop(txn);
        let ingest = self.root().join("ingest");
        let busy: HashSet<String> = self
            .inner
            .ingests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|r| blake3::hash(r.as_bytes()).to_hex().to_string())
            .collect();
        for ent in std::fs::read_dir(&ingest).ctx("list", &ingest)? {
            let p = ent.ctx("list", &ingest)?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == "tmp" || busy.contains(name) {
                continue;
            }
            let all_old =
                std::fs::read_dir(&p).map_or(true, |it| it.flatten().all(|e| old(&e.path())));
            if all_old && old(&p) {
                std::fs::remove_dir_all(&p).ctx("remove", &p)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
