//! Blob bytes: pack segments per shard, large-blob files, the protocol that makes them
//! durable, and reads of both — all through the store's [`Backend`].
//!
//! This module owns the writer state of each shard, the in-process segment table that
//! readers go through, and the one implementation of publishing a large blob (sync the
//! staged record, rename it under a fresh generation without replacing, make the name
//! durable). It never touches the index: it returns placements and `SegmentUpdate`s, and
//! the caller commits them through `meta` only after these calls return. Sealed segments
//! and large files are read through mappings (zero-copy for local files); the one active
//! segment per shard is read with positioned reads, so a short file is an error and never
//! a SIGBUS. It never shortens a segment.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::backend::{Backend, Handle, Key, List, Listed, Mapping};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{self, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::meta::SegmentUpdate;

/// A blob's bytes: a view into a mapping (sealed segments and large files) or an owned
/// buffer (the active segment). Either way it stays valid while other threads write,
/// compact or collect.
#[derive(Clone)]
pub struct Blob(Repr);

#[derive(Clone)]
enum Repr {
    Mapped {
        map: Arc<dyn Mapping>,
        range: Range<usize>,
    },
    Owned(Arc<[u8]>, Range<usize>),
}

impl Blob {
    fn mapped(map: Arc<dyn Mapping>, range: Range<usize>) -> Blob {
        Blob(Repr::Mapped { map, range })
    }

    pub(crate) fn owned(v: Vec<u8>) -> Blob {
        let n = v.len();
        Blob(Repr::Owned(v.into(), 0..n))
    }

    /// Whether the bytes are read straight from a mapping (no copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// A sub-range of the blob, sharing its storage. Panics if out of bounds, like slicing.
    #[must_use]
    pub fn slice(&self, r: Range<usize>) -> Blob {
        assert!(
            r.start <= r.end && r.end <= self.len(),
            "range out of bounds"
        );
        let sub = |base: &Range<usize>| base.start + r.start..base.start + r.end;
        Blob(match &self.0 {
            Repr::Mapped { map, range } => Repr::Mapped {
                map: map.clone(),
                range: sub(range),
            },
            Repr::Owned(v, range) => Repr::Owned(v.clone(), sub(range)),
        })
    }
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Mapped { map, range } => &map.bytes()[range.clone()],
            Repr::Owned(v, range) => &v[range.clone()],
        }
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Blob({} bytes, mapped: {})",
            self.len(),
            self.is_mapped()
        )
    }
}

/// The read side of one segment: opened on first use, mapped once sealed.
struct SegView {
    key: Key,
    sealed_len: OnceLock<u64>,
    map: OnceLock<Arc<dyn Mapping>>,
    file: OnceLock<Arc<dyn Handle>>,
}

impl SegView {
    fn new(key: Key, sealed_len: Option<u64>) -> SegView {
        let v = SegView {
            key,
            sealed_len: OnceLock::new(),
            map: OnceLock::new(),
            file: OnceLock::new(),
        };
        if let Some(l) = sealed_len {
            let _ = v.sealed_len.set(l);
        }
        v
    }
}

/// The append end of a shard: its active segment.
pub(crate) struct Active {
    pub id: u64,
    handle: Arc<dyn Handle>,
    key: Key,
    /// Committed length: what the index vouches for.
    pub len: u64,
    /// End of what this batch wrote (== `len` between batches).
    end: u64,
}

/// One shard's writer state, guarded by the shard's append lock.
pub(crate) struct ShardWriter {
    pub shard: u32,
    pub active: Option<Active>,
    /// The current batch created a segment: its name must be made durable too.
    pub created: Vec<Key>,
}

/// Where a record landed: the segment and the payload's offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub segment: u64,
    pub offset: u64,
}

/// Result of one append: placements (in input order) and the segment updates to commit
/// with them.
pub(crate) struct Appended {
    pub placed: Vec<Placed>,
    /// Segments sealed (and synced) during the append.
    pub updates: Vec<SegmentUpdate>,
}

/// `ROOT/packs/<shard>`: the directory of a shard's segments (local layout).
pub(crate) fn shard_dir(root: &std::path::Path, shard: u32) -> std::path::PathBuf {
    root.join("packs").join(format!("{shard:03}"))
}

/// A scratch object being filled (a large put, an import's staging): removed when
/// dropped unless it was published.
pub(crate) struct Staged {
    pub key: Key,
    pub handle: Arc<dyn Handle>,
}

/// The blob files of a store and the read-side segment table.
pub(crate) struct Files {
    pub backend: Arc<dyn Backend>,
    /// Opened read-only: nothing may be created, renamed or removed.
    read_only: bool,
    segment_size: u64,
    views: RwLock<HashMap<u64, Arc<SegView>>>,
    next_segment: AtomicU64,
    next_gen: AtomicU64,
    tmp_seq: AtomicU64,
    /// Large files renamed into place whose index entry is not committed (or given up)
    /// yet: the collector's orphan pass leaves them alone, whatever their age.
    in_flight: Mutex<HashSet<(Digest, u64)>>,
    /// Segments compacted away (removed, still mapped), with the reader epoch that began
    /// after their records moved: dropped from `views` by [`Files::reap`].
    retired: Mutex<Vec<(u64, u64)>>,
}

impl Files {
    pub fn new(
        backend: Arc<dyn Backend>,
        read_only: bool,
        segment_size: u64,
        next_segment: u64,
    ) -> Files {
        Files {
            backend,
            read_only,
            segment_size,
            views: RwLock::new(HashMap::new()),
            next_segment: AtomicU64::new(next_segment),
            // Generations only need to differ from any a deleted copy used; wall-clock
            // microseconds at open keep them increasing across restarts, and renames
            // that never replace catch the rest.
            next_gen: AtomicU64::new(crate::sys::now_ms().saturating_mul(1000)),
            tmp_seq: AtomicU64::new(0),
            in_flight: Mutex::new(HashSet::new()),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// Refuses a write to a store opened read-only.
    pub fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// An I/O error on `key`, with the object named as the backend shows it.
    pub fn io(&self, op: &'static str, key: &Key, e: std::io::Error) -> Error {
        Error::io(op, self.backend.display(key), e)
    }

    /// A read of an object the index names: absent or short is corruption (the bytes the
    /// index vouches for are not there); anything else is an I/O error.
    pub fn indexed_read_err(&self, what: &str, key: &Key, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::Corrupt(format!(
                "{what} {} is missing",
                self.backend.display(key).display()
            )),
            std::io::ErrorKind::UnexpectedEof => Error::Corrupt(format!(
                "{what} {} is shorter than the index says ({e})",
                self.backend.display(key).display()
            )),
            _ => self.io("read", key, e),
        }
    }

    fn views(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<SegView>>> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn view(&self, id: u64) -> Result<Arc<SegView>> {
        self.views()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Corrupt(format!("index names unknown segment {id}")))
    }

    /// Registers the read view of a segment known to the index.
    pub fn add_view(&self, id: u64, shard: u32, sealed_len: Option<u64>) {
        let v = Arc::new(SegView::new(Key::Segment { shard, id }, sealed_len));
        self.views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, v);
    }

    /// Whether segment `id` has a view in this process (it is known to this process: in
    /// the index, or being written).
    pub fn has_view(&self, id: u64) -> bool {
        self.views().contains_key(&id)
    }

    /// Records that a segment was sealed at `len`: readers map it from now on.
    pub fn mark_sealed(&self, id: u64, len: u64) {
        if let Some(v) = self.views().get(&id) {
            let _ = v.sealed_len.set(len);
        }
    }

    /// Reads `len` bytes at `offset` of segment `id`: a zero-copy slice of its mapping when
    /// sealed, a positioned read otherwise.
    pub fn read_packed(&self, id: u64, offset: u64, len: u64) -> Result<Blob> {
        let v = self.view(id)?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::Corrupt("record range overflows".into()))?;
        if let Some(&sealed_len) = v.sealed_len.get() {
            if end > sealed_len {
                return Err(Error::Corrupt(format!(
                    "{}: record {offset}..{end} past committed length {sealed_len}",
                    self.backend.display(&v.key).display()
                )));
            }
            let map = if let Some(m) = v.map.get() {
                Some(m.clone())
            } else {
                match self.backend.map(&v.key, sealed_len, false) {
                    Ok(m) => Some(v.map.get_or_init(|| m).clone()),
                    // Shorter than committed: damaged. What it still holds is read with
                    // positioned reads (records past its end fail on their own).
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                    Err(e) => return Err(self.indexed_read_err("segment file", &v.key, e)),
                }
            };
            if let Some(map) = map {
                return Ok(Blob::mapped(map, offset as usize..end as usize));
            }
        }
        self.pread(&v, offset, len)
    }

    fn pread(&self, v: &SegView, offset: u64, len: u64) -> Result<Blob> {
        let f = if let Some(f) = v.file.get() {
            f.clone()
        } else {
            let f = self
                .backend
                .open(&v.key, false)
                .map_err(|e| self.indexed_read_err("segment file", &v.key, e))?;
            v.file.get_or_init(|| f).clone()
        };
        // The index (not the file) gave `len`: check it against the file before
        // allocating, so a damaged entry cannot ask for terabytes.
        let actual = f.len().map_err(|e| self.io("stat", &v.key, e))?;
        if offset.saturating_add(len) > actual {
            return Err(Error::Corrupt(format!(
                "{}: record {offset}..{} past the end of the file ({actual} bytes)",
                self.backend.display(&v.key).display(),
                offset.saturating_add(len)
            )));
        }
        let mut buf = vec![0u8; len as usize];
        f.read_at(&mut buf, offset)
            .map_err(|e| self.indexed_read_err("segment file", &v.key, e))?;
        Ok(Blob::owned(buf))
    }

    /// Maps the payload of a large blob (`populate`: read it all in at once).
    pub fn read_large(
        &self,
        d: &Digest,
        generation: u64,
        len: u64,
        populate: bool,
    ) -> Result<Blob> {
        let key = Key::Large {
            digest: *d,
            generation,
        };
        let total = RECORD_HEADER_LEN
            .checked_add(len)
            .ok_or_else(|| Error::Corrupt(format!("{d}: length {len} overflows")))?;
        let map = self
            .backend
            .map(&key, total, populate)
            .map_err(|e| self.indexed_read_err("large blob file", &key, e))?;
        Ok(Blob::mapped(
            map,
            RECORD_HEADER_LEN as usize..total as usize,
        ))
    }

    /// The record header of a stored blob, read the way its payload is (through the segment
    /// view for a packed blob, so a compacted segment an older snapshot names still reads).
    pub fn record_header(
        &self,
        d: &Digest,
        location: crate::meta::Location,
    ) -> Result<RecordHeader> {
        let (bytes, what) = match location {
            crate::meta::Location::Packed { segment, offset } => {
                let at = offset.checked_sub(RECORD_HEADER_LEN).ok_or_else(|| {
                    Error::Corrupt(format!("payload offset {offset} inside the segment header"))
                })?;
                (
                    self.read_packed(segment, at, RECORD_HEADER_LEN)?,
                    format!("segment {segment} at {at}"),
                )
            }
            crate::meta::Location::Large { generation } => {
                let key = Key::Large {
                    digest: *d,
                    generation,
                };
                let h = self
                    .backend
                    .open(&key, false)
                    .map_err(|e| self.indexed_read_err("large blob file", &key, e))?;
                let mut b = vec![0u8; RECORD_HEADER_LEN as usize];
                h.read_at(&mut b, 0)
                    .map_err(|e| self.indexed_read_err("large blob file", &key, e))?;
                (
                    Blob::owned(b),
                    self.backend.display(&key).display().to_string(),
                )
            }
        };
        RecordHeader::decode(&bytes).map_err(|e| Error::bad_header(what, &e))
    }

    /// The records of segment `id` from its first record to `len`, resynchronising after
    /// damage (`format::scan`), read with positioned reads (never a mapping, so a short
    /// file is damage, not a SIGBUS). `check` may reject a record (repair: its blake3).
    pub fn scan_segment(
        &self,
        shard: u32,
        id: u64,
        len: u64,
        check: SegmentCheck<'_>,
    ) -> Result<format::Scan> {
        let key = Key::Segment { shard, id };
        let f = self
            .backend
            .open(&key, false)
            .map_err(|e| self.indexed_read_err("segment file", &key, e))?;
        let actual = f.len().map_err(|e| self.io("stat", &key, e))?;
        let mut read = |off: u64, buf: &mut [u8]| -> std::io::Result<usize> {
            if off >= actual {
                return Ok(0);
            }
            let n = buf.len().min((actual - off) as usize);
            f.read_at(&mut buf[..n], off)?;
            Ok(n)
        };
        let mut scan = format::scan(
            SEGMENT_HEADER_LEN,
            len.min(actual),
            &mut read,
            &mut |at, h| check(&*f, at, h),
        )
        .map_err(|e| self.io("read", &key, e))?;
        if actual < len {
            scan.damaged.push(format::Damage {
                start: actual,
                end: len,
                reason: format!("the file ends at {actual}, before the committed length {len}"),
            });
        }
        Ok(scan)
    }

    /// Retires a compacted segment: keeps its read view alive for readers that still hold
    /// an older snapshot (the mapping outlives the object), then removes it durably.
    pub fn retire_segment(&self, shard: u32, id: u64, len: u64, epoch: u64) -> Result<()> {
        self.writable()?;
        if let Some(v) = self.views().get(&id).cloned() {
            let _ = v.sealed_len.set(len);
            // Map it now, while it still has a name.
            self.read_packed(id, SEGMENT_HEADER_LEN.min(len), 0)?;
        }
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((epoch, id));
        let key = Key::Segment { shard, id };
        self.backend
            .remove(&key)
            .map_err(|e| self.io("remove", &key, e))?;
        self.backend
            .sync_names(std::slice::from_ref(&key))
            .map_err(|e| self.io("sync", &key, e))
    }

    /// Drops the mappings of retired segments that no live snapshot can still name: those
    /// retired at an epoch no newer than the oldest live snapshot's (`oldest`; `None`: no
    /// snapshot is live). The space returns once the last `Blob` read from them is dropped
    /// too. Returns how many were dropped.
    pub fn reap(&self, oldest: Option<u64>) -> usize {
        let mut retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (gone, kept): (Vec<_>, Vec<_>) = retired
            .drain(..)
            .partition(|(epoch, _)| oldest.is_none_or(|o| o >= *epoch));
        *retired = kept;
        let mut views = self
            .views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, id) in &gone {
            views.remove(id);
        }
        gone.len()
    }

    /// Opens the active segment found at open. Its bytes past the committed length (an
    /// uncommitted batch's) are left in place: the next append overwrites them.
    pub fn reopen_active(&self, shard: u32, id: u64, committed_len: u64) -> Result<Active> {
        let key = Key::Segment { shard, id };
        let handle = self
            .backend
            .open(&key, true)
            .map_err(|e| self.indexed_read_err("segment file", &key, e))?;
        let actual = handle.len().map_err(|e| self.io("stat", &key, e))?;
        if actual < committed_len {
            return Err(Error::Corrupt(format!(
                "{} is {actual} bytes, but {committed_len} are committed",
                self.backend.display(&key).display()
            )));
        }
        let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
        handle
            .read_at(&mut hdr, 0)
            .map_err(|e| self.indexed_read_err("segment file", &key, e))?;
        let h = SegmentHeader::decode(&hdr)
            .map_err(|e| Error::bad_header(self.backend.display(&key).display(), &e))?;
        if h.id != id {
            return Err(Error::Corrupt(format!(
                "{} holds segment {}, expected {id}",
                self.backend.display(&key).display(),
                h.id
            )));
        }
        Ok(Active {
            id,
            handle,
            key,
            len: committed_len,
            end: committed_len,
        })
    }

    /// Creates a new segment for `shard` (durable only after the batch's syncs).
    fn create_segment(&self, shard: u32) -> Result<Active> {
        self.writable()?;
        let id = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let key = Key::Segment { shard, id };
        let handle = self
            .backend
            .create(&key)
            .map_err(|e| self.io("create segment", &key, e))?;
        crate::backend::write_all_at(&*handle, &SegmentHeader { shard, id }.encode(), 0)
            .map_err(|e| self.io("write", &key, e))?;
        self.add_view(id, shard, None);
        Ok(Active {
            id,
            handle,
            key,
            len: SEGMENT_HEADER_LEN,
            end: SEGMENT_HEADER_LEN,
        })
    }

    /// Appends records to the shard's active segment after what the current batch already
    /// wrote, sealing it and starting another when it fills (a segment sealed here is
    /// synced here). Returns placements and the updates of sealed segments; the active
    /// segment's update and sync come from [`Files::finish_batch`]. On error the active
    /// segment is dropped from the writer (poisoned: it takes no more appends).
    pub fn append(&self, w: &mut ShardWriter, recs: &[(RecordHeader, &[u8])]) -> Result<Appended> {
        let r = self.append_inner(w, recs);
        if r.is_err() {
            w.active = None;
        }
        r
    }

    fn append_inner(
        &self,
        w: &mut ShardWriter,
        recs: &[(RecordHeader, &[u8])],
    ) -> Result<Appended> {
        let mut active = if let Some(a) = w.active.take() {
            a
        } else {
            let a = self.create_segment(w.shard)?;
            w.created.push(a.key.clone());
            a
        };
        let mut placed = Vec::with_capacity(recs.len());
        let mut updates = Vec::new();
        // Records are written in runs straight from the callers' buffers (vectored).
        let mut run_start = 0;
        let mut run_pos = active.end;
        for (i, (_, data)) in recs.iter().enumerate() {
            let rec_len = RECORD_HEADER_LEN + data.len() as u64;
            if active.end > SEGMENT_HEADER_LEN && active.end + rec_len > self.segment_size {
                self.write_records(&active, run_pos, &recs[run_start..i])?;
                active
                    .handle
                    .sync()
                    .map_err(|e| self.io("sync", &active.key, e))?;
                updates.push(SegmentUpdate {
                    id: active.id,
                    shard: w.shard,
                    committed_len: active.end,
                    sealed: true,
                });
                active = self.create_segment(w.shard)?;
                w.created.push(active.key.clone());
                run_start = i;
                run_pos = active.end;
            }
            placed.push(Placed {
                segment: active.id,
                offset: active.end + RECORD_HEADER_LEN,
            });
            active.end += rec_len;
        }
        let r = self.write_records(&active, run_pos, &recs[run_start..]);
        w.active = Some(active);
        r.map(|()| Appended { placed, updates })
    }

    /// Writes records (header, payload) back to back at `at` with vectored writes, without
    /// copying the payloads.
    fn write_records(
        &self,
        active: &Active,
        at: u64,
        recs: &[(RecordHeader, &[u8])],
    ) -> Result<()> {
        let mut off = at;
        // IOV_MAX is 1024 on Linux: a header and a payload per record.
        for group in recs.chunks(512) {
            let headers: Vec<[u8; RECORD_HEADER_LEN as usize]> =
                group.iter().map(|(h, _)| h.encode()).collect();
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * group.len());
            for (h, (_, data)) in headers.iter().zip(group) {
                slices.push(IoSlice::new(h));
                if !data.is_empty() {
                    slices.push(IoSlice::new(data));
                }
            }
            let mut rest: &mut [IoSlice<'_>] = &mut slices;
            while !rest.is_empty() {
                let n = active
                    .handle
                    .write_at(rest, off)
                    .map_err(|e| self.io("write", &active.key, e))?;
                if n == 0 {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Err(self.io("write", &active.key, e));
                }
                off += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        Ok(())
    }

    /// The active segment's update and the sync that must finish before the commit of the
    /// current batch (`None` when the batch wrote nothing to an active segment).
    pub fn finish_batch(&self, w: &mut ShardWriter) -> Option<(SegmentUpdate, SyncJob)> {
        let names = std::mem::take(&mut w.created);
        let a = w.active.as_ref()?;
        if a.end == a.len && names.is_empty() {
            return None;
        }
        let update = SegmentUpdate {
            id: a.id,
            shard: w.shard,
            committed_len: a.end,
            sealed: a.end >= self.segment_size,
        };
        let job = SyncJob {
            backend: self.backend.clone(),
            handle: a.handle.clone(),
            key: a.key.clone(),
            names,
        };
        Some((update, job))
    }

    /// After a batch the index refused: what it wrote past the committed length is
    /// overwritten by the next append.
    pub fn rewind(w: &mut ShardWriter) {
        if let Some(a) = &mut w.active {
            a.end = a.len;
        }
    }

    /// After a successful commit: advances the writer and seals what the batch sealed.
    pub fn committed(&self, w: &mut ShardWriter, updates: &[SegmentUpdate]) {
        for u in updates {
            if u.sealed {
                self.mark_sealed(u.id, u.committed_len);
            }
            if let Some(a) = &mut w.active
                && a.id == u.id
            {
                a.len = u.committed_len;
                a.end = u.committed_len;
                if u.sealed {
                    w.active = None;
                }
            }
        }
    }

    /// A fresh scratch object, named after `what` (`put`, `import-3-blob`, ...).
    pub fn stage(&self, what: &str) -> Result<Staged> {
        self.writable()?;
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let key = Key::Scratch(format!("{what}-{}-{n}", std::process::id()));
        let handle = self
            .backend
            .create(&key)
            .map_err(|e| self.io("create", &key, e))?;
        Ok(Staged { key, handle })
    }

    /// Writes a record (header + payload) as a scratch object and publishes it as a large
    /// blob. Returns the generation.
    pub fn write_large(&self, header: &RecordHeader, data: &[u8]) -> Result<u64> {
        let st = self.stage("put")?;
        let r = (|| {
            crate::backend::write_all_at(&*st.handle, &header.encode(), 0)
                .map_err(|e| self.io("write", &st.key, e))?;
            crate::backend::write_all_at(&*st.handle, data, RECORD_HEADER_LEN)
                .map_err(|e| self.io("write", &st.key, e))?;
            self.publish(&[(&st.key, &*st.handle, header.digest)])
        })();
        match r {
            Ok(g) => Ok(g[0]),
            Err(e) => {
                let _ = self.backend.remove(&st.key);
                Err(e)
            }
        }
    }

    /// Publishes staged records (each `(object, its handle, digest)`: a scratch object or
    /// an upload's data, already holding header and payload) as large blobs: each is
    /// synced and renamed under a fresh generation without replacing anything, then the
    /// new names are made durable together. Returns the generations. On error, what was
    /// already renamed is removed again (nothing indexes it yet).
    ///
    /// Each published file is *in flight* (see [`Files::in_flight`]) until its publisher
    /// calls [`Files::settled`], after the commit that indexes it (or gives up).
    pub fn publish(&self, items: &[(&Key, &dyn Handle, Digest)]) -> Result<Vec<u64>> {
        self.writable()?;
        let mut done: Vec<Key> = Vec::with_capacity(items.len());
        let r = (|| {
            let mut gens = Vec::with_capacity(items.len());
            for (src, handle, d) in items {
                handle.sync().map_err(|e| self.io("sync", src, e))?;
                loop {
                    let generation = self.next_gen.fetch_add(1, Ordering::Relaxed);
                    let dst = Key::Large {
                        digest: *d,
                        generation,
                    };
                    // In flight before it has its name, so no orphan pass sees it without.
                    self.lock_in_flight().insert((*d, generation));
                    match self.backend.rename(src, &dst, false) {
                        Ok(true) => {
                            done.push(dst);
                            gens.push(generation);
                            break;
                        }
                        Ok(false) => self.settled(d, generation),
                        Err(e) => {
                            self.settled(d, generation);
                            return Err(self.io("rename", &dst, e));
                        }
                    }
                }
            }
            // A rename is atomic: making the new names durable makes it whole.
            if let Some(first) = done.first() {
                self.backend
                    .sync_names(&done)
                    .map_err(|e| self.io("sync", first, e))?;
            }
            Ok(gens)
        })();
        if r.is_err() {
            for k in done {
                let _ = self.backend.remove(&k);
                if let Key::Large { digest, generation } = k {
                    self.settled(&digest, generation);
                }
            }
        }
        r
    }

    /// Removes a large file that no commit names (a lost race, a refused batch).
    pub fn remove_large(&self, d: &Digest, generation: u64) {
        let _ = self.backend.remove(&Key::Large {
            digest: *d,
            generation,
        });
    }

    /// Every large file (parsed names in `key`).
    pub fn large_files(&self) -> Result<Vec<Listed>> {
        self.backend
            .list(&List::Large)
            .map_err(|e| Error::io("list", self.backend.describe() + "/large", e))
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<(Digest, u64)>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the large file `(d, generation)` was published and its commit has not
    /// finished: an unindexed file that is in flight is not an orphan.
    pub fn in_flight(&self, d: &Digest, generation: u64) -> bool {
        self.lock_in_flight().contains(&(*d, generation))
    }

    /// Ends the flight of a published large file: its commit finished (it is indexed) or
    /// was given up (it was removed, or is an orphan now).
    pub fn settled(&self, d: &Digest, generation: u64) {
        self.lock_in_flight().remove(&(*d, generation));
    }
}

/// A scan's say on one record (see [`Files::scan_segment`]): `Ok(Err(why))` rejects it.
pub(crate) type SegmentCheck<'a> =
    &'a mut dyn FnMut(&dyn Handle, u64, &RecordHeader) -> std::io::Result<Result<(), String>>;

/// The data sync of an append, run (possibly on another thread) before the commit.
pub(crate) struct SyncJob {
    backend: Arc<dyn Backend>,
    handle: Arc<dyn Handle>,
    key: Key,
    /// Segments the batch created: their names must be durable too.
    names: Vec<Key>,
}

impl SyncJob {
    /// Syncs the segment's bytes, then the names of segments the batch created.
    pub fn run(&self) -> Result<()> {
        self.handle
            .sync()
            .map_err(|e| Error::io("sync", self.backend.display(&self.key), e))?;
        if !self.names.is_empty() {
            self.backend
                .sync_names(&self.names)
                .map_err(|e| Error::io("sync", self.backend.display(&self.key), e))?;
        }
        Ok(())
    }
}
