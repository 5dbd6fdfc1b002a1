//! Blob bytes on disk: pack segments per shard, large-blob files, and reads of both.
//!
//! This module owns the files under `packs/` and `large/` and the in-process segment
//! table that readers go through. It writes records and makes them durable (fsync of the
//! data, then of any directory it created) but never touches the index: the caller commits
//! the returned placements through `meta` only after these calls return. Sealed segments
//! and large files are read through mmap (zero-copy); the one active segment per shard is
//! read with `pread`, so a short file is an error and never a SIGBUS.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::ops::{Deref, Range};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::map::Map;
use crate::meta::SegmentUpdate;
use crate::sys;

/// A blob's bytes: a view into a memory map (sealed segments and large files) or an owned
/// buffer (the active segment). Either way it stays valid while other threads write,
/// compact or collect.
#[derive(Clone)]
pub struct Blob(Repr);

#[derive(Clone)]
enum Repr {
    Mapped { map: Arc<Map>, range: Range<usize> },
    Owned(Arc<[u8]>, Range<usize>),
}

impl Blob {
    fn mapped(map: Arc<Map>, range: Range<usize>) -> Blob {
        Blob(Repr::Mapped { map, range })
    }

    fn owned(v: Vec<u8>) -> Blob {
        let n = v.len();
        Blob(Repr::Owned(v.into(), 0..n))
    }

    /// Whether the bytes are read straight from a memory map (no copy).
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

/// A segment file the index names but the disk lacks is corruption, not an I/O hiccup.
fn missing_is_corrupt(e: std::io::Error, path: &Path) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Corrupt(format!("segment file {} is missing", path.display()))
    } else {
        Error::io("open segment", path, e)
    }
}

fn open_segment(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| missing_is_corrupt(e, path))
}

/// The read side of one segment: lazily opened, mapped once sealed.
struct SegView {
    path: PathBuf,
    sealed_len: OnceLock<u64>,
    map: OnceLock<Arc<Map>>,
    file: OnceLock<File>,
}

impl SegView {
    fn new(path: PathBuf, sealed_len: Option<u64>) -> SegView {
        let v = SegView {
            path,
            sealed_len: OnceLock::new(),
            map: OnceLock::new(),
            file: OnceLock::new(),
        };
        if let Some(l) = sealed_len {
            let _ = v.sealed_len.set(l);
        }
        v
    }

    fn file(&self) -> Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = open_segment(&self.path)?;
        Ok(self.file.get_or_init(|| f))
    }

    fn read(&self, offset: u64, len: u64) -> Result<Blob> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::Corrupt("record range overflows".into()))?;
        if let Some(&sealed_len) = self.sealed_len.get() {
            let map = if let Some(m) = self.map.get() {
                m.clone()
            } else {
                let f = open_segment(&self.path)?;
                match Map::new(&f, &self.path, sealed_len, false) {
                    Ok(m) => self.map.get_or_init(|| Arc::new(m)).clone(),
                    // A file shorter than committed is damaged: what it still holds is
                    // read with pread (records past its end fail on their own).
                    Err(Error::Corrupt(_)) => return self.pread(offset, len, end),
                    Err(e) => return Err(e),
                }
            };
            if end > map.bytes().len() as u64 {
                return Err(Error::Corrupt(format!(
                    "{}: record {offset}..{end} past committed length {sealed_len}",
                    self.path.display()
                )));
            }
            return Ok(Blob::mapped(map, offset as usize..end as usize));
        }
        self.pread(offset, len, end)
    }

    fn pread(&self, offset: u64, len: u64, end: u64) -> Result<Blob> {
        let mut v = vec![0u8; len as usize];
        self.file()?
            .read_exact_at(&mut v, offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::Corrupt(format!(
                    "{}: short read at {offset}..{end}",
                    self.path.display()
                )),
                _ => Error::io("read segment", &self.path, e),
            })?;
        Ok(Blob::owned(v))
    }
}

/// The append end of a shard: its active segment.
pub(crate) struct Active {
    pub id: u64,
    file: File,
    path: PathBuf,
    /// Committed length: what the index vouches for.
    pub len: u64,
    /// End of what this batch wrote (== `len` between batches).
    end: u64,
}

impl Active {
    /// Opens the active segment found at open, cutting an uncommitted tail.
    pub fn reopen(id: u64, path: PathBuf, committed_len: u64) -> Result<Active> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| missing_is_corrupt(e, &path))?;
        let actual = file.metadata().ctx("stat", &path)?.len();
        if actual < committed_len {
            return Err(Error::Corrupt(format!(
                "{} is {actual} bytes, but {committed_len} are committed",
                path.display()
            )));
        }
        let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
        file.read_exact_at(&mut hdr, 0).ctx("read", &path)?;
        let h = SegmentHeader::decode(&hdr).map_err(|e| Error::bad_header(path.display(), &e))?;
        if h.id != id {
            return Err(Error::Corrupt(format!(
                "{} holds segment {}, expected {id}",
                path.display(),
                h.id
            )));
        }
        if actual > committed_len {
            // Never mapped (only sealed segments are), so shrinking it is safe.
            file.set_len(committed_len).ctx("truncate", &path)?;
            file.sync_all().ctx("fsync", &path)?;
        }
        Ok(Active {
            id,
            file,
            path,
            len: committed_len,
            end: committed_len,
        })
    }
}

/// One shard's writer state, guarded by the shard's append lock.
pub(crate) struct ShardWriter {
    pub shard: u32,
    pub active: Option<Active>,
    /// The current batch created a segment file: the shard directory needs an fsync.
    pub dir_dirty: bool,
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
    /// Segments sealed (and fsynced) during the append.
    pub updates: Vec<SegmentUpdate>,
}

/// `ROOT/packs/<shard>`: the directory of a shard's segments.
pub(crate) fn shard_dir(root: &Path, shard: u32) -> PathBuf {
    root.join("packs").join(format!("{shard:03}"))
}

/// The blob files of a store and the read-side segment table.
pub(crate) struct Files {
    root: PathBuf,
    segment_size: u64,
    views: RwLock<HashMap<u64, Arc<SegView>>>,
    next_segment: AtomicU64,
    next_gen: AtomicU64,
    tmp_seq: AtomicU64,
    /// Large files renamed into `large/` whose index entry is not committed (or given up)
    /// yet: the collector's orphan pass leaves them alone, whatever their age.
    in_flight: Mutex<HashSet<(Digest, u64)>>,
    /// Segments compacted away (file unlinked, still mapped), with the reader epoch that
    /// began after their records moved: dropped from `views` by [`Files::reap`].
    retired: Mutex<Vec<(u64, u64)>>,
}

impl Files {
    pub fn new(root: &Path, segment_size: u64, next_segment: u64) -> Files {
        Files {
            root: root.to_owned(),
            segment_size,
            views: RwLock::new(HashMap::new()),
            next_segment: AtomicU64::new(next_segment),
            // Generations only need to differ from any a deleted copy used; wall-clock
            // microseconds at open keep them increasing across restarts, and
            // RENAME_NOREPLACE catches the rest.
            next_gen: AtomicU64::new(sys::now_ms().saturating_mul(1000)),
            tmp_seq: AtomicU64::new(0),
            in_flight: Mutex::new(HashSet::new()),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// `ROOT/packs/<shard>`.
    pub fn shard_dir(&self, shard: u32) -> PathBuf {
        shard_dir(&self.root, shard)
    }

    /// Path of a segment file.
    pub fn segment_path(&self, shard: u32, id: u64) -> PathBuf {
        self.shard_dir(shard).join(format!("pack-{id:016x}.pack"))
    }

    /// Path of a large-blob file of a given generation.
    pub fn large_path(&self, d: &Digest, generation: u64) -> PathBuf {
        self.large_dir(d)
            .join(format!("{}-{}.{generation}", d.algorithm(), d.hex()))
    }

    /// Every file under `large/<xx>/`, in no particular order.
    pub fn large_files(&self) -> Result<Vec<PathBuf>> {
        let large = self.root.join("large");
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&large).ctx("list", &large)? {
            let dir = dir.ctx("list", &large)?.path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).ctx("list", &dir)? {
                out.push(f.ctx("list", &dir)?.path());
            }
        }
        Ok(out)
    }

    /// The digest and generation a large file's name (`<alg>-<hex>.<gen>`) promises.
    pub fn parse_large_name(name: &str) -> Option<(Digest, u64)> {
        let (stem, generation) = name.rsplit_once('.')?;
        let (alg, hex) = stem.split_once('-')?;
        Some((
            Digest::parse(&format!("{alg}:{hex}")).ok()?,
            generation.parse().ok()?,
        ))
    }

    fn large_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("large").join(format!("{:02x}", d.hash()[0]))
    }

    /// A fresh temporary path under `ingest/tmp` (cleared at every open).
    pub fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("ingest")
            .join("tmp")
            .join(format!("put-{}-{n}", std::process::id()))
    }

    /// Registers the read view of a segment known to the index.
    pub fn add_view(&self, id: u64, shard: u32, sealed_len: Option<u64>) {
        let v = Arc::new(SegView::new(self.segment_path(shard, id), sealed_len));
        self.views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, v);
    }

    /// Records that a segment was sealed at `len`: readers map it from now on.
    pub fn mark_sealed(&self, id: u64, len: u64) {
        if let Some(v) = self
            .views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            let _ = v.sealed_len.set(len);
        }
    }

    /// The record headers of a segment up to `len`, with the offset of each header. Reads
    /// with `pread`, so a short or damaged file is an error, never a SIGBUS.
    pub fn scan_records(&self, shard: u32, id: u64, len: u64) -> Result<Vec<(u64, RecordHeader)>> {
        let path = self.segment_path(shard, id);
        let f = open_segment(&path)?;
        let mut out = Vec::new();
        let mut at = SEGMENT_HEADER_LEN;
        let mut hdr = [0u8; RECORD_HEADER_LEN as usize];
        while at < len {
            f.read_exact_at(&mut hdr, at).ctx("read", &path)?;
            let h = RecordHeader::decode(&hdr)
                .map_err(|e| Error::bad_header(format!("{} at {at}", path.display()), &e))?;
            let end = at + RECORD_HEADER_LEN + h.stored_len;
            if end > len {
                return Err(Error::Corrupt(format!(
                    "{}: record at {at} runs past the committed length {len}",
                    path.display()
                )));
            }
            out.push((at, h));
            at = end;
        }
        Ok(out)
    }

    /// Retires a compacted segment: keeps its read view alive for readers that still hold
    /// an older snapshot (the mapping outlives the file), then unlinks the file.
    pub fn retire_segment(&self, shard: u32, id: u64, len: u64, epoch: u64) -> Result<()> {
        let view = self
            .views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(v) = view {
            let _ = v.sealed_len.set(len);
            // Map it now, while the file still has a name.
            v.read(SEGMENT_HEADER_LEN.min(len), 0)?;
        }
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((epoch, id));
        let path = self.segment_path(shard, id);
        std::fs::remove_file(&path).ctx("remove", &path)?;
        sys::sync_dir(&self.shard_dir(shard))
    }

    /// Whether segment `id` has a view (mapped or mappable) in this process.
    #[cfg(test)]
    pub fn has_view(&self, id: u64) -> bool {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&id)
    }

    /// Drops the mappings of retired segments that no live snapshot can still name: those
    /// retired at an epoch no newer than the oldest live snapshot's (`oldest`; `None`: no
    /// snapshot is live). The unlinked file's space returns once the last `Blob` read from
    /// it is dropped too. Returns how many were dropped.
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

    /// Reads the record header of a stored blob with `pread` (never through a mapping, so a
    /// short file is an error). `segment_shard` names the shard of a packed blob's segment.
    pub fn record_header(
        &self,
        d: &Digest,
        location: crate::meta::Location,
        segment_shard: Option<u32>,
    ) -> Result<RecordHeader> {
        let (path, at) = match location {
            crate::meta::Location::Packed { segment, offset } => {
                let shard = segment_shard.ok_or_else(|| {
                    Error::Corrupt(format!("index names unknown segment {segment}"))
                })?;
                let at = offset.checked_sub(RECORD_HEADER_LEN).ok_or_else(|| {
                    Error::Corrupt(format!("payload offset {offset} inside the segment header"))
                })?;
                (self.segment_path(shard, segment), at)
            }
            crate::meta::Location::Large { generation } => (self.large_path(d, generation), 0),
        };
        let f = File::open(&path).map_err(|e| missing_is_corrupt(e, &path))?;
        let mut hdr = [0u8; RECORD_HEADER_LEN as usize];
        f.read_exact_at(&mut hdr, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::Corrupt(format!("{}: short read at {at}", path.display()))
            }
            _ => Error::io("read", &path, e),
        })?;
        RecordHeader::decode(&hdr)
            .map_err(|e| Error::bad_header(format!("{} at {at}", path.display()), &e))
    }

    /// Reads `len` payload bytes at `offset` of segment `id`.
    pub fn read_packed(&self, id: u64, offset: u64, len: u64) -> Result<Blob> {
        let v = self
            .views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Corrupt(format!("index names unknown segment {id}")))?;
        v.read(offset, len)
    }

    /// Maps the payload of a large blob.
    pub fn read_large(&self, d: &Digest, generation: u64, len: u64) -> Result<Blob> {
        let path = self.large_path(d, generation);
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::Corrupt(format!("large blob file {} is missing", path.display()))
            }
            _ => Error::io("open", &path, e),
        })?;
        let total = RECORD_HEADER_LEN + len;
        let map = Arc::new(Map::new(&f, &path, total, true)?);
        Ok(Blob::mapped(
            map,
            RECORD_HEADER_LEN as usize..total as usize,
        ))
    }

    /// Creates a new segment file for `shard` (durable only after the batch's fsyncs).
    fn create_segment(&self, shard: u32) -> Result<Active> {
        let id = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let path = self.segment_path(shard, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create segment", &path)?;
        file.write_all_at(&SegmentHeader { shard, id }.encode(), 0)
            .ctx("write", &path)?;
        self.add_view(id, shard, None);
        Ok(Active {
            id,
            file,
            path,
            len: SEGMENT_HEADER_LEN,
            end: SEGMENT_HEADER_LEN,
        })
    }

    /// Appends records to the shard's active segment after what the current batch already
    /// wrote, sealing it and starting another when it fills (a segment sealed here is
    /// fsynced here). Returns placements and the updates of sealed segments; the active
    /// segment's update and fsync come from [`Files::finish_batch`]. On error the active
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
            w.dir_dirty = true;
            self.create_segment(w.shard)?
        };
        let mut placed = Vec::with_capacity(recs.len());
        let mut updates = Vec::new();
        // Records are written in runs straight from the callers' buffers (pwritev).
        let mut run_start = 0;
        let mut run_pos = active.end;
        for (i, (_, data)) in recs.iter().enumerate() {
            let rec_len = RECORD_HEADER_LEN + data.len() as u64;
            if active.end > SEGMENT_HEADER_LEN && active.end + rec_len > self.segment_size {
                write_records(&active, run_pos, &recs[run_start..i])?;
                active.file.sync_data().ctx("fsync", &active.path)?;
                updates.push(SegmentUpdate {
                    id: active.id,
                    shard: w.shard,
                    committed_len: active.end,
                    sealed: true,
                });
                active = self.create_segment(w.shard)?;
                w.dir_dirty = true;
                run_start = i;
                run_pos = active.end;
            }
            placed.push(Placed {
                segment: active.id,
                offset: active.end + RECORD_HEADER_LEN,
            });
            active.end += rec_len;
        }
        let r = write_records(&active, run_pos, &recs[run_start..]);
        w.active = Some(active);
        r.map(|()| Appended { placed, updates })
    }

    /// The active segment's update and the fsync that must finish before the commit of
    /// the current batch (`None` when the batch wrote nothing to an active segment).
    pub fn finish_batch(&self, w: &mut ShardWriter) -> Result<Option<(SegmentUpdate, SyncJob)>> {
        let dir = std::mem::take(&mut w.dir_dirty).then(|| self.shard_dir(w.shard));
        let Some(a) = &w.active else {
            return Ok(None);
        };
        if a.end == a.len && dir.is_none() {
            return Ok(None);
        }
        let update = SegmentUpdate {
            id: a.id,
            shard: w.shard,
            committed_len: a.end,
            sealed: a.end >= self.segment_size,
        };
        let job = SyncJob {
            file: a.file.try_clone().ctx("dup", &a.path)?,
            path: a.path.clone(),
            dir,
        };
        Ok(Some((update, job)))
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

    /// Writes a record (header + payload) as a new file in `ingest/tmp`, fsyncs it, and
    /// renames it into `large/`. Returns the generation.
    pub fn write_large(&self, header: &RecordHeader, data: &[u8]) -> Result<u64> {
        let tmp = self.tmp_path();
        let r = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .ctx("create", &tmp)?;
            f.write_all_at(&header.encode(), 0).ctx("write", &tmp)?;
            f.write_all_at(data, RECORD_HEADER_LEN).ctx("write", &tmp)?;
            self.install_large(&tmp, &f, &header.digest)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// fsyncs `file` (at `tmp`, already holding header and payload) and renames it into
    /// `large/` under a fresh generation, then fsyncs the directory.
    pub fn install_large(&self, tmp: &Path, file: &File, d: &Digest) -> Result<u64> {
        Ok(self.install_many(&[(tmp, file, *d)])?[0])
    }

    /// [`Files::install_large`] for many files: each is fsynced and renamed, then each
    /// directory that received one is fsynced once. On error, files already renamed are
    /// removed again (nothing indexes them yet).
    ///
    /// Each installed file is *in flight* (see [`Files::in_flight`]) until its installer
    /// calls [`Files::settled`], after the commit that indexes it (or gives up).
    pub fn install_many(&self, items: &[(&Path, &File, Digest)]) -> Result<Vec<u64>> {
        let mut done: Vec<(Digest, u64)> = Vec::with_capacity(items.len());
        let r = (|| {
            let mut gens = Vec::with_capacity(items.len());
            let mut dirs = std::collections::BTreeSet::new();
            for (tmp, file, d) in items {
                file.sync_all().ctx("fsync", tmp)?;
                let dir = self.large_dir(d);
                sys::create_dir_durable(&dir)?;
                loop {
                    let generation = self.next_gen.fetch_add(1, Ordering::Relaxed);
                    let dst = self.large_path(d, generation);
                    // In flight before it has its name, so no orphan pass sees it without.
                    self.lock_in_flight().insert((*d, generation));
                    match sys::rename_noreplace(tmp, &dst) {
                        Ok(()) => {
                            done.push((*d, generation));
                            gens.push(generation);
                            break;
                        }
                        Err(e) => {
                            self.settled(d, generation);
                            if e.kind() != std::io::ErrorKind::AlreadyExists {
                                return Err(Error::io("rename", &dst, e));
                            }
                        }
                    }
                }
                dirs.insert(dir);
            }
            for dir in &dirs {
                sys::sync_dir(dir)?;
            }
            Ok(gens)
        })();
        if r.is_err() {
            for (d, generation) in done {
                let _ = std::fs::remove_file(self.large_path(&d, generation));
                self.settled(&d, generation);
            }
        }
        r
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<(Digest, u64)>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the large file `(d, generation)` was installed and its commit has not
    /// finished: an unindexed file that is in flight is not an orphan.
    pub fn in_flight(&self, d: &Digest, generation: u64) -> bool {
        self.lock_in_flight().contains(&(*d, generation))
    }

    /// Ends the flight of an installed large file: its commit finished (it is indexed) or
    /// was given up (it was removed, or is an orphan now).
    pub fn settled(&self, d: &Digest, generation: u64) {
        self.lock_in_flight().remove(&(*d, generation));
    }
}

/// Writes records (header, payload) back to back at `at` with vectored writes, without
/// copying the payloads.
fn write_records(active: &Active, at: u64, recs: &[(RecordHeader, &[u8])]) -> Result<()> {
    let mut off = at;
    // IOV_MAX is 1024 on Linux: a header and a payload per record.
    for group in recs.chunks(512) {
        let headers: Vec<[u8; RECORD_HEADER_LEN as usize]> =
            group.iter().map(|(h, _)| h.encode()).collect();
        let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(2 * group.len());
        for (h, (_, data)) in headers.iter().zip(group) {
            slices.push(std::io::IoSlice::new(h));
            if !data.is_empty() {
                slices.push(std::io::IoSlice::new(data));
            }
        }
        let mut rest: &mut [std::io::IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = rustix::io::pwritev(&active.file, rest, off)
                .map_err(|e| Error::io("write", &active.path, e.into()))?;
            if n == 0 {
                let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                return Err(Error::io("write", &active.path, e));
            }
            off += n as u64;
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

/// The data fsync of an append, run (possibly on another thread) before the commit.
pub(crate) struct SyncJob {
    file: File,
    path: PathBuf,
    /// The shard directory, when the append created a segment file in it.
    dir: Option<PathBuf>,
}

impl SyncJob {
    /// fsyncs the segment's data, then the directory entry of a new segment.
    pub fn run(&self) -> Result<()> {
        self.file.sync_data().ctx("fsync", &self.path)?;
        if let Some(d) = &self.dir {
            sys::sync_dir(d)?;
        }
        Ok(())
    }
}
