//! Streaming, resumable ingest, shaped like an OCI distribution upload and containerd's
//! content `Writer`: start under a caller-chosen ref without knowing the digest, write
//! chunk by chunk, sync, truncate, commit with the expected digest and size (or without,
//! for a trusted caller), abort, or resume after a crash or restart from the last sync
//! point without re-hashing what was written.
//!
//! This module owns the uploads of the backend (`Key::Upload`: per ref, `data` — the
//! bytes behind a 128-byte header slot — and `state`, the durable offset, expectations,
//! times and the saved SHA-2 state), the table of uploads live in this process, and
//! unnamed ingests in scratch space. It never makes anything visible except through
//! [`Ingest::commit`], and an ingest that is dropped or fails leaves no objects behind;
//! only [`Ingest::suspend`] (or a crash) keeps a named one to resume. It never removes an
//! upload that a live [`Ingest`] of this process is writing: an abort marks it, and the
//! writer removes it at its next call or when it is dropped.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::{Handle, Key, List, UploadPart};
use crate::digest::{Algorithm, Digest, DualHasher};
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader};
use crate::resumable::SavedSha2;
use crate::store::{Descriptor, Hashed, PutOptions, Store, check_expected};

/// Longest ref accepted.
pub const MAX_REF_LEN: usize = 1024;
/// Buffered bytes flushed to the data object at once.
const FLUSH_AT: usize = 1 << 20;

/// An upload's durable state (`state` in its directory, JSON; FORMAT.md §8). Fields
/// added later are optional, so a state written by an older build still resumes (by
/// re-hashing) and an older build ignores what it does not know.
#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    r#ref: String,
    offset: u64,
    algorithm: String,
    expected: Option<Digest>,
    expected_size: Option<u64>,
    kind: Kind,
    /// The OCI hash's state after exactly `offset` bytes: resume goes on from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<SavedSha2>,
    /// When the upload started and when this state was written (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_ms: Option<u64>,
}

/// What this process knows of an upload a live [`Ingest`] is writing: shared between
/// the writer (which updates it on every call) and status queries.
pub(crate) struct Live {
    offset: AtomicU64,
    durable: AtomicU64,
    updated_ms: AtomicU64,
    started_ms: AtomicU64,
    aborted: AtomicBool,
    expected: Option<Digest>,
    expected_size: Option<u64>,
}

/// The uploads live in this process, by ref.
pub(crate) type LiveUploads = HashMap<String, Arc<Live>>;

/// The state of an upload, from [`Store::upload`] or [`Store::uploads`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadStatus {
    /// The ref it was started under.
    pub r#ref: String,
    /// Bytes received, including bytes a live writer has not synced yet.
    pub offset: u64,
    /// Bytes that survive a crash: where a resume starts.
    pub durable_offset: u64,
    /// The digest given when it started, if any (checked at commit).
    pub expected: Option<Digest>,
    /// The size given when it started, if any (checked on every write and at commit).
    pub expected_size: Option<u64>,
    /// When it started (for an upload written by an older build: its last update).
    pub started: SystemTime,
    /// When it last received bytes (suspended: when it was last synced).
    pub updated: SystemTime,
    /// Whether an [`Ingest`] of this process is writing it now.
    pub active: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Where an ingest's bytes live.
enum Place {
    /// A named, resumable upload.
    Upload { r#ref: String, id: String },
    /// Scratch space: gone at the next open, not resumable (a stream nobody can resume).
    Scratch,
}

/// An in-progress ingest. Write bytes with [`Ingest::write_all`] (or `std::io::Write`),
/// then [`commit`](Ingest::commit). Dropping it without committing or suspending removes
/// everything it wrote.
pub struct Ingest {
    store: Store,
    place: Place,
    data_key: Key,
    file: Arc<dyn Handle>,
    hasher: DualHasher,
    buf: Vec<u8>,
    /// Bytes in the data object (after the header slot), excluding `buf`.
    written: u64,
    /// The last sync point: its offset, and the OCI hash's state there if it can be
    /// saved (truncation goes back to it instead of re-hashing from the start).
    durable: u64,
    checkpoint: Option<SavedSha2>,
    /// Shared with status queries and aborts (none for an unnamed ingest).
    live: Option<Arc<Live>>,
    opts: PutOptions,
    finished: bool,
}

/// The upload id of a ref: the blake3 hex of its bytes (one path component, any ref).
fn upload_id(r#ref: &str) -> String {
    blake3::hash(r#ref.as_bytes()).to_hex().to_string()
}

fn data_key(id: &str) -> Key {
    Key::Upload {
        id: id.to_owned(),
        part: UploadPart::Data,
    }
}

fn state_key(id: &str) -> Key {
    Key::Upload {
        id: id.to_owned(),
        part: UploadPart::State,
    }
}

fn state_new_key(id: &str) -> Key {
    Key::Upload {
        id: id.to_owned(),
        part: UploadPart::StateNew,
    }
}

impl Store {
    /// Starts an ingest named `r#ref`, or resumes the one left under that name by a crash
    /// or [`Ingest::suspend`] (check [`Ingest::offset`] and continue from there). A resume
    /// goes on from the saved hash state of the last sync point: it reads none of the
    /// bytes already written.
    ///
    /// The digest may be left for [`Ingest::commit_expecting`], as an OCI distribution
    /// upload learns it only with its final `PUT`. If `opts.expected` is given it selects
    /// the digest algorithm and is checked at commit, as is `opts.expected_size` (also
    /// checked on every write, so an oversized stream fails early). Resuming with other
    /// expectations than the upload was started with is an error.
    pub fn ingest(&self, r#ref: &str, opts: PutOptions) -> Result<Ingest> {
        if r#ref.is_empty() || r#ref.len() > MAX_REF_LEN {
            return Err(Error::Invalid(format!(
                "ingest ref must be 1..={MAX_REF_LEN} bytes"
            )));
        }
        self.inner.files.writable()?;
        let live = Arc::new(Live {
            offset: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            updated_ms: AtomicU64::new(now_ms()),
            started_ms: AtomicU64::new(now_ms()),
            aborted: AtomicBool::new(false),
            expected: opts.expected,
            expected_size: opts.expected_size,
        });
        {
            let mut map = self.live_uploads();
            if map.contains_key(r#ref) {
                return Err(Error::IngestBusy(r#ref.to_owned()));
            }
            map.insert(r#ref.to_owned(), live.clone());
        }
        let r = self.open_ingest(r#ref, opts, live);
        if r.is_err() {
            self.release_ref(r#ref);
        }
        r
    }

    /// Starts an ingest that nobody can resume (a stream from a pipe): its bytes live in
    /// scratch space, which the next open of the store discards whatever happened.
    pub fn ingest_unnamed(&self, opts: PutOptions) -> Result<Ingest> {
        let st = self.inner.files.stage("ingest")?;
        st.handle
            .set_len(RECORD_HEADER_LEN)
            .map_err(|e| self.inner.files.io("write", &st.key, e))?;
        Ok(Ingest {
            store: self.clone(),
            place: Place::Scratch,
            data_key: st.key,
            file: st.handle,
            hasher: DualHasher::new(algorithm_of(&opts)),
            buf: Vec::new(),
            written: 0,
            durable: 0,
            checkpoint: None,
            live: None,
            opts,
            finished: false,
        })
    }

    /// Refs of uploads in progress (live, suspended or interrupted) and their durable
    /// offsets: a shorthand of [`Store::uploads`].
    pub fn ingests(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .uploads()?
            .into_iter()
            .map(|u| (u.r#ref, u.durable_offset))
            .collect())
    }

    /// Every upload in progress — written now by an [`Ingest`] of this process, suspended,
    /// or left by a crash — in ref order.
    pub fn uploads(&self) -> Result<Vec<UploadStatus>> {
        let files = &self.inner.files;
        let listed = files
            .backend
            .list(&List::Uploads)
            .map_err(|e| Error::io("list", files.backend.describe() + "/ingest", e))?;
        let with_data: std::collections::HashSet<&str> = listed
            .iter()
            .filter_map(|l| match &l.key {
                Some(Key::Upload {
                    id,
                    part: UploadPart::Data,
                }) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let live: Vec<(String, Arc<Live>)> = self
            .live_uploads()
            .iter()
            .map(|(r, l)| (r.clone(), l.clone()))
            .collect();
        let mut out: Vec<UploadStatus> =
            live.iter().filter_map(|(r, l)| live_status(r, l)).collect();
        for l in &listed {
            if let Some(Key::Upload {
                id,
                part: UploadPart::State,
            }) = &l.key
                && with_data.contains(id.as_str())
                && let Ok(Some(bytes)) = self.read_object(&state_key(id))
                && let Ok(st) = serde_json::from_slice::<State>(&bytes)
                && !live.iter().any(|(r, _)| *r == st.r#ref)
            {
                let age = l.age.unwrap_or_default();
                out.push(stored_status(st, SystemTime::now() - age));
            }
        }
        out.sort_by(|a, b| a.r#ref.cmp(&b.r#ref));
        Ok(out)
    }

    /// The upload under `r#ref`, or `None` if there is none (never started, committed,
    /// aborted or expired).
    pub fn upload(&self, r#ref: &str) -> Result<Option<UploadStatus>> {
        let live = self.live_uploads().get(r#ref).cloned();
        if let Some(l) = live {
            return Ok(live_status(r#ref, &l));
        }
        let files = &self.inner.files;
        let id = upload_id(r#ref);
        if files
            .backend
            .len(&data_key(&id))
            .map_err(|e| files.io("stat", &data_key(&id), e))?
            .is_none()
        {
            return Ok(None);
        }
        let Some(bytes) = self.read_object(&state_key(&id))? else {
            return Ok(None);
        };
        let shown = files.backend.display(&state_key(&id));
        let st: State = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", shown.display())))?;
        if st.r#ref != r#ref {
            return Ok(None);
        }
        Ok(Some(stored_status(st, SystemTime::now())))
    }

    /// Discards an upload. A suspended one is removed now. One that a live [`Ingest`] of
    /// this process is writing is marked aborted: nothing is removed under its writer,
    /// whose next call fails with [`Error::UploadAborted`] and removes the upload (as does
    /// dropping it); status queries no longer show it, and its ref is busy until then.
    pub fn abort_ingest(&self, r#ref: &str) -> Result<()> {
        self.inner.files.writable()?;
        {
            let mut map = self.live_uploads();
            if let Some(l) = map.get(r#ref) {
                l.aborted.store(true, Ordering::Release);
                return Ok(());
            }
            // Held busy (under a placeholder) while the files go, so that no ingest of
            // the ref starts meanwhile.
            map.insert(r#ref.to_owned(), Arc::new(placeholder()));
        }
        let id = upload_id(r#ref);
        let r = self
            .inner
            .files
            .backend
            .remove_upload(&id)
            .map_err(|e| self.inner.files.io("remove", &data_key(&id), e));
        self.release_ref(r#ref);
        r
    }

    /// Removes the upload directory `id` if no [`Ingest`] of this process holds its ref,
    /// deciding and removing under the table's lock so that no ingest can start on it
    /// meanwhile. Returns whether it was removed.
    pub(crate) fn remove_upload_if_idle(&self, id: &str) -> Result<bool> {
        let map = self.live_uploads();
        if map.keys().any(|r| upload_id(r) == id) {
            return Ok(false);
        }
        self.inner
            .files
            .backend
            .remove_upload(id)
            .map_err(|e| self.inner.files.io("remove", &data_key(id), e))?;
        Ok(true)
    }

    fn live_uploads(&self) -> std::sync::MutexGuard<'_, LiveUploads> {
        self.inner
            .ingests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release_ref(&self, r#ref: &str) {
        self.live_uploads().remove(r#ref);
    }

    /// The whole content of a small object, or `None` if absent.
    fn read_object(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let files = &self.inner.files;
        let h = match files.backend.open(key, false) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(files.io("open", key, e)),
        };
        let len = h.len().map_err(|e| files.io("stat", key, e))?;
        if len > 1 << 20 {
            return Err(Error::Corrupt(format!(
                "{} is {len} bytes, not an ingest state",
                files.backend.display(key).display()
            )));
        }
        let mut v = vec![0u8; len as usize];
        h.read_at(&mut v, 0).map_err(|e| files.io("read", key, e))?;
        Ok(Some(v))
    }

    fn open_ingest(&self, r#ref: &str, opts: PutOptions, live: Arc<Live>) -> Result<Ingest> {
        let files = &self.inner.files;
        let id = upload_id(r#ref);
        let dkey = data_key(&id);
        let skey = state_key(&id);
        let algorithm = algorithm_of(&opts);
        let mut opts = opts;
        // A state without data is what a crash leaves after a commit moved the data into
        // the store and before it removed the upload: nothing to resume.
        let has_data = files
            .backend
            .len(&dkey)
            .map_err(|e| files.io("stat", &dkey, e))?
            .is_some();
        let state = if has_data {
            self.read_object(&skey)?
        } else {
            None
        };
        let (file, hasher, written) = if let Some(bytes) = state {
            let shown = files.backend.display(&skey);
            let st: State = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", shown.display())))?;
            if st.r#ref != r#ref {
                return Err(Error::Corrupt(format!(
                    "{} belongs to ref {:?}",
                    shown.display(),
                    st.r#ref
                )));
            }
            if st.expected != opts.expected
                || st.expected_size != opts.expected_size
                || st.algorithm != algorithm.name()
            {
                return Err(Error::Invalid(format!(
                    "ingest {ref:?} was started with other expectations \
                     (digest {:?}, size {:?})",
                    st.expected, st.expected_size
                )));
            }
            opts.kind = Some(st.kind);
            let file = files
                .backend
                .open(&dkey, true)
                .map_err(|e| files.io("open", &dkey, e))?;
            let len = file.len().map_err(|e| files.io("stat", &dkey, e))?;
            if len < RECORD_HEADER_LEN + st.offset {
                return Err(Error::Corrupt(format!(
                    "{} is shorter than its durable offset {}",
                    files.backend.display(&dkey).display(),
                    st.offset
                )));
            }
            // Bytes past the durable offset may be torn: drop them.
            file.set_len(RECORD_HEADER_LEN + st.offset)
                .map_err(|e| files.io("truncate", &dkey, e))?;
            // Go on from the saved hash state; a state without one (written by an older
            // build, or for a blake3 digest, whose state cannot be saved) re-hashes.
            let resumed = st
                .hash
                .as_ref()
                .filter(|h| h.len == st.offset && h.algorithm == algorithm.name())
                .and_then(DualHasher::resume);
            let hasher = if let Some(h) = resumed {
                h
            } else {
                let mut h = DualHasher::new(algorithm);
                hash_range(files, &dkey, &*file, &mut h, 0, st.offset)?;
                h
            };
            live.offset.store(st.offset, Ordering::Relaxed);
            live.durable.store(st.offset, Ordering::Relaxed);
            if let Some(ms) = st.started_ms.or(st.updated_ms) {
                live.started_ms.store(ms, Ordering::Relaxed);
            }
            (file, hasher, Some(st.offset))
        } else {
            // Whatever a crash left of an earlier attempt goes first.
            files
                .backend
                .remove_upload(&id)
                .map_err(|e| files.io("remove", &dkey, e))?;
            let file = files
                .backend
                .create(&dkey)
                .map_err(|e| files.io("create", &dkey, e))?;
            file.set_len(RECORD_HEADER_LEN)
                .map_err(|e| files.io("write", &dkey, e))?;
            (file, DualHasher::new(algorithm), None)
        };
        let ing = Ingest {
            store: self.clone(),
            place: Place::Upload {
                r#ref: r#ref.to_owned(),
                id,
            },
            data_key: dkey,
            file,
            checkpoint: hasher.save(),
            hasher,
            buf: Vec::new(),
            written: written.unwrap_or(0),
            durable: written.unwrap_or(0),
            live: Some(live),
            opts,
            finished: false,
        };
        if written.is_none() {
            ing.save_state()?;
        }
        Ok(ing)
    }
}

/// Feeds bytes `from..to` of an upload's data (after its header slot) to `hasher`.
fn hash_range(
    files: &crate::blobs::Files,
    key: &Key,
    file: &dyn Handle,
    hasher: &mut DualHasher,
    from: u64,
    to: u64,
) -> Result<()> {
    read_range(files, key, file, from, to, |c| hasher.update(c))
}

/// A stand-in that keeps a ref busy while [`Store::abort_ingest`] removes its files.
fn placeholder() -> Live {
    Live {
        offset: AtomicU64::new(0),
        durable: AtomicU64::new(0),
        updated_ms: AtomicU64::new(0),
        started_ms: AtomicU64::new(0),
        aborted: AtomicBool::new(true),
        expected: None,
        expected_size: None,
    }
}

/// The status of a live upload; `None` once it is aborted.
fn live_status(r#ref: &str, l: &Live) -> Option<UploadStatus> {
    if l.aborted.load(Ordering::Acquire) {
        return None;
    }
    Some(UploadStatus {
        r#ref: r#ref.to_owned(),
        offset: l.offset.load(Ordering::Relaxed),
        durable_offset: l.durable.load(Ordering::Relaxed),
        expected: l.expected,
        expected_size: l.expected_size,
        started: at_ms(l.started_ms.load(Ordering::Relaxed)),
        updated: at_ms(l.updated_ms.load(Ordering::Relaxed)),
        active: true,
    })
}

/// The status of an upload nobody writes, from its state (`seen`: when the state file
/// was last written, for a state that does not say).
fn stored_status(st: State, seen: SystemTime) -> UploadStatus {
    let updated = st.updated_ms.map_or(seen, at_ms);
    UploadStatus {
        r#ref: st.r#ref,
        offset: st.offset,
        durable_offset: st.offset,
        expected: st.expected,
        expected_size: st.expected_size,
        started: st.started_ms.map_or(updated, at_ms),
        updated,
        active: false,
    }
}

fn algorithm_of(opts: &PutOptions) -> Algorithm {
    opts.expected.map_or(Algorithm::Sha256, |d| d.algorithm())
}

impl Ingest {
    /// The ref this ingest is named by (empty for an unnamed one).
    pub fn ref_name(&self) -> &str {
        match &self.place {
            Place::Upload { r#ref, .. } => r#ref,
            Place::Scratch => "",
        }
    }

    /// Bytes received so far (after a resume: the durable offset it resumed from).
    pub fn offset(&self) -> u64 {
        self.hasher.len()
    }

    /// Bytes that survive a crash: the offset of the last [`Ingest::sync`].
    pub fn durable_offset(&self) -> u64 {
        self.durable
    }

    /// Fails with [`Error::UploadAborted`] if [`Store::abort_ingest`] aborted this upload.
    fn check_live(&self) -> Result<()> {
        match &self.live {
            Some(l) if l.aborted.load(Ordering::Acquire) => {
                Err(Error::UploadAborted(self.ref_name().to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Publishes the offset to status queries.
    fn publish_offset(&self) {
        if let Some(l) = &self.live {
            l.offset.store(self.hasher.len(), Ordering::Relaxed);
            l.updated_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Appends bytes. Fails with [`Error::SizeMismatch`] as soon as the stream exceeds the
    /// expected size, refuses a manifest or index larger than the store parses, and fails
    /// with [`Error::UploadAborted`] once the upload was aborted (it is then discarded),
    /// or [`Error::Interrupted`] once `PutOptions::interrupt` is set (the upload stays, for
    /// its owner to suspend, release or drop; a commit after the flag is set fails with
    /// `Interrupted` too and, as every failed commit, discards the upload).
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.alive()?;
        crate::store::check_interrupt(self.opts.interrupt.as_ref())?;
        let actual = self.offset() + data.len() as u64;
        if let Some(expected) = self.opts.expected_size
            && actual > expected
        {
            return Err(Error::SizeMismatch { expected, actual });
        }
        if matches!(self.opts.kind, Some(Kind::Manifest | Kind::Index))
            && actual > crate::image::MAX_JSON
        {
            return Err(too_large_manifest(actual));
        }
        // Hash while the bytes are hot, then buffer them for a large write.
        self.hasher.update(data);
        self.buf.extend_from_slice(data);
        self.publish_offset();
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
    }

    /// [`Ingest::check_live`], discarding the upload if it was aborted.
    fn alive(&mut self) -> Result<()> {
        let r = self.check_live();
        if r.is_err() {
            self.discard();
        }
        r
    }

    /// Copies everything from `r` into the ingest.
    pub fn write_from(&mut self, r: &mut impl Read) -> Result<u64> {
        let mut chunk = vec![0u8; FLUSH_AT];
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut chunk) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read", "input", e)),
            };
            self.write_all(&chunk[..n])?;
            total += n as u64;
        }
    }

    fn files(&self) -> &crate::blobs::Files {
        &self.store.inner.files
    }

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            crate::backend::write_all_at(&*self.file, &self.buf, RECORD_HEADER_LEN + self.written)
                .map_err(|e| self.files().io("write", &self.data_key, e))?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the state for `self.written` bytes (all flushed) and makes it durable by
    /// replace-by-rename; the caller has synced the data up to there.
    fn save_state(&self) -> Result<()> {
        let Place::Upload { r#ref, id } = &self.place else {
            return Ok(());
        };
        debug_assert!(self.buf.is_empty());
        let live = self.live.as_ref().expect("a named ingest is live");
        let st = State {
            r#ref: r#ref.clone(),
            offset: self.written,
            algorithm: algorithm_of(&self.opts).name().to_owned(),
            expected: self.opts.expected,
            expected_size: self.opts.expected_size,
            kind: self.opts.kind.unwrap_or(Kind::Other),
            hash: self.hasher.save().filter(|h| h.len == self.written),
            started_ms: Some(live.started_ms.load(Ordering::Relaxed)),
            updated_ms: Some(now_ms()),
        };
        let bytes = serde_json::to_vec(&st).map_err(|e| Error::Invalid(e.to_string()))?;
        let files = self.files();
        let (new, cur) = (state_new_key(id), state_key(id));
        let io = |op, e| files.io(op, &new, e);
        files.backend.remove(&new).map_err(|e| io("remove", e))?;
        let f = files.backend.create(&new).map_err(|e| io("create", e))?;
        crate::backend::write_all_at(&*f, &bytes, 0).map_err(|e| io("write", e))?;
        f.sync().map_err(|e| io("sync", e))?;
        files
            .backend
            .rename(&new, &cur, true)
            .map_err(|e| io("rename", e))?;
        // Also makes the data object's name durable (same upload).
        files
            .backend
            .sync_names(&[cur, self.data_key.clone()])
            .map_err(|e| io("sync", e))?;
        live.durable.store(self.written, Ordering::Relaxed);
        Ok(())
    }

    /// Makes everything written so far durable and records it, with the hash state, as
    /// the resume point.
    pub fn sync(&mut self) -> Result<u64> {
        self.alive()?;
        self.flush_buf()?;
        self.file
            .sync()
            .map_err(|e| self.files().io("sync", &self.data_key, e))?;
        self.save_state()?;
        self.durable = self.written;
        self.checkpoint = self.hasher.save();
        Ok(self.written)
    }

    /// Cuts the upload back to `offset` bytes (at most [`Ingest::offset`]), as
    /// containerd's `Writer.Truncate`; writing goes on from there. Going back to the last
    /// sync point or later re-hashes only the bytes after it; earlier, from the start.
    /// The cut is durable before it returns if it reaches below the durable offset.
    pub fn truncate(&mut self, offset: u64) -> Result<()> {
        self.alive()?;
        let have = self.offset();
        if offset > have {
            return Err(Error::Invalid(format!(
                "cannot truncate ingest {:?} to {offset} bytes: it has {have}",
                self.ref_name()
            )));
        }
        if offset == have {
            return Ok(());
        }
        self.flush_buf()?;
        let algorithm = algorithm_of(&self.opts);
        let (mut hasher, from) = match self
            .checkpoint
            .as_ref()
            .filter(|c| c.len <= offset)
            .and_then(|c| Some((DualHasher::resume(c)?, c.len)))
        {
            // From a checkpoint past the start; from the start, a fresh hasher keeps the
            // blake3 whole (no extra pass at commit).
            Some(h) if h.1 > 0 => h,
            _ => (DualHasher::new(algorithm), 0),
        };
        let files = &self.store.inner.files;
        hash_range(
            files,
            &self.data_key,
            &*self.file,
            &mut hasher,
            from,
            offset,
        )?;
        self.hasher = hasher;
        self.written = offset;
        if offset < self.durable {
            // The state must not promise bytes the data no longer has: it goes first (a
            // crash between leaves a longer file, which a resume cuts to the state).
            self.save_state()?;
            self.durable = offset;
            self.checkpoint = self.hasher.save();
        }
        self.file
            .set_len(RECORD_HEADER_LEN + offset)
            .map_err(|e| files.io("truncate", &self.data_key, e))?;
        self.publish_offset();
        Ok(())
    }

    /// Makes the bytes durable and keeps the ingest for a later [`Store::ingest`] with the
    /// same ref. Returns the offset to resume from. An unnamed ingest cannot be suspended.
    pub fn suspend(mut self) -> Result<u64> {
        if matches!(self.place, Place::Scratch) {
            return Err(Error::Invalid(
                "an unnamed ingest cannot be suspended (nothing could resume it)".into(),
            ));
        }
        let n = self.sync()?;
        self.finished = true;
        if let Place::Upload { r#ref, .. } = &self.place {
            self.store.release_ref(r#ref);
        }
        Ok(n)
    }

    /// Stops writing without syncing or discarding: a named upload stays as its last
    /// `sync` left it (what a crash would leave), for a later resume from there; an
    /// unnamed ingest, which nothing could resume, is discarded. Does no I/O for a named
    /// upload. For a writer that must let go after an error or a cancellation.
    pub fn release(mut self) {
        if matches!(self.place, Place::Scratch) {
            return; // dropped: discarded
        }
        self.finished = true;
        if let Place::Upload { r#ref, .. } = &self.place {
            self.store.release_ref(r#ref);
        }
    }

    /// Checks the size and digest given when the ingest started (if any) and makes the
    /// blob visible. On a mismatch the ingest is discarded and nothing becomes visible.
    pub fn commit(self) -> Result<Descriptor> {
        self.commit_expecting(None, None)
    }

    /// [`Ingest::commit`], also checking a digest and size known only now (as in an OCI
    /// distribution upload's final `PUT`). A digest of another algorithm than the one
    /// hashed while writing is computed from the stored bytes. On a mismatch the ingest
    /// is discarded and nothing becomes visible.
    pub fn commit_expecting(
        mut self,
        digest: Option<Digest>,
        size: Option<u64>,
    ) -> Result<Descriptor> {
        let r = self.alive().and_then(|()| self.commit_inner(digest, size));
        // Success or failure, the ingest is done with.
        self.discard();
        r
    }

    /// Removes the ingest's objects and frees its ref.
    fn discard(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let backend = &self.store.inner.files.backend;
        match &self.place {
            Place::Upload { r#ref, id } => {
                let _ = backend.remove_upload(id);
                self.store.release_ref(r#ref);
            }
            Place::Scratch => {
                let _ = backend.remove(&self.data_key);
            }
        }
    }

    #[tracing::instrument(level = "debug", name = "ingest_commit", skip(self), fields(written = self.written))]
    fn commit_inner(&mut self, digest: Option<Digest>, size: Option<u64>) -> Result<Descriptor> {
        crate::store::check_interrupt(self.opts.interrupt.as_ref())?;
        self.flush_buf()?;
        let written = self.written;
        let hasher = std::mem::replace(&mut self.hasher, DualHasher::new(Algorithm::Sha256));
        let (mut actual, blake3) = hasher.finish_partial();
        check_expected(&self.opts, actual, written)?;
        if let Some(expected) = size
            && expected != written
        {
            return Err(Error::SizeMismatch {
                expected,
                actual: written,
            });
        }
        let files = &self.store.inner.files;
        let (data_key, file) = (&self.data_key, &*self.file);
        if let Some(expected) = digest {
            if expected.algorithm() != actual.algorithm() {
                let mut h = crate::digest::Hasher::new(expected.algorithm());
                read_range(files, data_key, file, 0, written, |c| h.update(c))?;
                actual = h.finish();
            }
            if expected != actual {
                return Err(Error::DigestMismatch { expected, actual });
            }
        }
        let kind = self.opts.kind.unwrap_or(Kind::Other);
        let desc = Descriptor {
            digest: actual,
            size: written,
        };
        let inner = &self.store.inner;
        // Manifests and indexes go through the batch path, which parses them for edges.
        if written < inner.opts.large_threshold || matches!(kind, Kind::Manifest | Kind::Index) {
            if matches!(kind, Kind::Manifest | Kind::Index) && written > crate::image::MAX_JSON {
                return Err(too_large_manifest(written));
            }
            let mut data = vec![0u8; written as usize];
            file.read_at(&mut data, RECORD_HEADER_LEN)
                .map_err(|e| files.io("read", data_key, e))?;
            let item = Hashed {
                blake3: blake3.unwrap_or_else(|| *blake3::hash(&data).as_bytes()),
                data: &data,
                digest: actual,
                kind,
            };
            inner.store_hashed(std::slice::from_ref(&item), &self.opts)?;
            return Ok(desc);
        }
        // Stored already: refreshed and leased as a fresh put would be.
        if inner.touch_stored(&actual, self.opts.lease.as_deref())? {
            return Ok(desc);
        }
        // A resumed upload's blake3 misses what was written before the resume: it is
        // computed now, over the whole data, on every core.
        let blake3 = if let Some(b) = blake3 {
            b
        } else {
            let mut h = blake3::Hasher::new();
            read_range(files, data_key, file, 0, written, |c| {
                h.update_rayon(c);
            })?;
            *h.finalize().as_bytes()
        };
        let header = RecordHeader {
            digest: actual,
            kind,
            flags: 0,
            stored_len: written,
            raw_len: written,
            blake3,
        };
        crate::backend::write_all_at(file, &header.encode(), 0)
            .map_err(|e| files.io("write", data_key, e))?;
        let generation = files.publish(&[(data_key, file, actual)])?[0];
        let item = Hashed {
            data: &[],
            digest: actual,
            blake3,
            kind,
        };
        inner.commit_large(&item, written, generation, self.opts.lease.clone())?;
        Ok(desc)
    }
}

/// Hands bytes `from..to` of an upload's data (after its header slot) to `f`, in
/// chunks.
fn read_range(
    files: &crate::blobs::Files,
    key: &Key,
    file: &dyn Handle,
    from: u64,
    to: u64,
    mut f: impl FnMut(&[u8]),
) -> Result<()> {
    let mut chunk = vec![0u8; (8 << 20).min((to - from) as usize)];
    let mut at = from;
    while at < to {
        let n = chunk.len().min((to - at) as usize);
        file.read_at(&mut chunk[..n], RECORD_HEADER_LEN + at)
            .map_err(|e| files.io("read", key, e))?;
        f(&chunk[..n]);
        at += n as u64;
    }
    Ok(())
}

fn too_large_manifest(n: u64) -> Error {
    Error::Invalid(format!(
        "a manifest or index of {n} bytes: the store parses at most {} MiB",
        crate::image::MAX_JSON >> 20
    ))
}

impl std::io::Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)
            .map(|()| buf.len())
            .map_err(std::io::Error::other)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod sim_tests {
    use super::*;

    #[test]
    /// The state file's replace-by-rename keeps the resume point.
    fn suspend_and_resume_on_the_simulated_backend() {
        let sim = crate::backend::sim::SimBackend::new();
        let store = Store::open_with(
            std::sync::Arc::new(sim.clone()),
            crate::Options::default().reserve(0),
        )
        .unwrap();
        let mut ing = store.ingest("r", PutOptions::default()).unwrap();
        ing.write_all(b"hello").unwrap();
        assert_eq!(ing.suspend().unwrap(), 5);
        let ing = store.ingest("r", PutOptions::default()).unwrap();
        assert_eq!(ing.offset(), 5);
    }
}
