//! What the store did since it was opened, as counters a host exports (`Store::metrics`):
//! bytes and blobs in and out, commit rounds and their latency, the time writers waited
//! for the group commit, collections and their durations.
//!
//! This module owns only the counters: relaxed atomics bumped where the work happens (the
//! commit queue, reads, the collector) and a plain snapshot of them. It must never block,
//! allocate or take a lock on a hot path; tracing spans are emitted at the sites
//! themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The live counters (one set per open store).
#[derive(Default)]
pub(crate) struct Stats {
    pub blobs_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub blobs_removed: AtomicU64,
    pub bytes_removed: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub commits: AtomicU64,
    pub durable_commits: AtomicU64,
    pub commit_ops: AtomicU64,
    pub commit_us: AtomicU64,
    pub commit_us_max: AtomicU64,
    pub submitted: AtomicU64,
    pub submit_wait_us: AtomicU64,
    pub gc_runs: AtomicU64,
    pub gc_us: AtomicU64,
    pub gc_us_last: AtomicU64,
    pub gc_lock_wait_us: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Counters of one open store since it was opened (monotonic, except the `last` and
/// `max` values). Cheap to take: a handful of relaxed loads.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Metrics {
    /// Blobs made visible (a put of a blob already stored counts nothing).
    pub blobs_written: u64,
    /// Their bytes.
    pub bytes_written: u64,
    /// Blobs removed (collections and deletes).
    pub blobs_removed: u64,
    /// Their bytes.
    pub bytes_removed: u64,
    /// Blob reads (`get`, `read_range`).
    pub reads: u64,
    /// Bytes handed out by them.
    pub bytes_read: u64,
    /// Index transactions committed (group-commit rounds and the collector's own).
    pub commits: u64,
    /// Of those, the ones made durable (fsynced) before their callers returned.
    pub durable_commits: u64,
    /// Operations the commits carried (a round carries every writer waiting).
    pub commit_ops: u64,
    /// Time spent in commits, in microseconds (mean latency: `commit_us / commits`).
    pub commit_us: u64,
    /// The slowest commit, in microseconds.
    pub commit_us_max: u64,
    /// Operations submitted to the commit queue.
    pub submitted: u64,
    /// Time they waited from submission to their result (queue and commit), in
    /// microseconds.
    pub submit_wait_us: u64,
    /// Collections run (dry runs included).
    pub gc_runs: u64,
    /// Their total time, in microseconds.
    pub gc_us: u64,
    /// The last one's time, in microseconds.
    pub gc_us_last: u64,
    /// Time collections waited for the one running before them, in microseconds.
    pub gc_lock_wait_us: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Metrics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            blobs_written: g(&self.blobs_written),
            bytes_written: g(&self.bytes_written),
            blobs_removed: g(&self.blobs_removed),
            bytes_removed: g(&self.bytes_removed),
            reads: g(&self.reads),
            bytes_read: g(&self.bytes_read),
            commits: g(&self.commits),
            durable_commits: g(&self.durable_commits),
            commit_ops: g(&self.commit_ops),
            commit_us: g(&self.commit_us),
            commit_us_max: g(&self.commit_us_max),
            submitted: g(&self.submitted),
            submit_wait_us: g(&self.submit_wait_us),
            gc_runs: g(&self.gc_runs),
            gc_us: g(&self.gc_us),
            gc_us_last: g(&self.gc_us_last),
            gc_lock_wait_us: g(&self.gc_lock_wait_us),
        }
    }
}
