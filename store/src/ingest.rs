//! Streaming, resumable ingest: write a blob chunk by chunk under a caller-chosen ref,
//! check it against an expected digest and size, and commit it, or resume it after a
//! crash or restart from its last durable offset.
//!
//! This module owns the uploads of the backend (`Key::Upload`: per ref, `data` — the
//! bytes behind a 128-byte header slot — and `state`, the durable offset and
//! expectations) and unnamed ingests in scratch space. It never makes anything visible
//! except through [`Ingest::commit`], and an ingest that is dropped or fails leaves no
//! objects behind; only [`Ingest::suspend`] (or a crash) keeps a named one to resume. It
//! never removes an upload that a live [`Ingest`] of this process is writing.

use std::io::Read;
use std::sync::Arc;

use crate::backend::{Handle, Key, List, UploadPart};
use crate::digest::{Algorithm, Digest, DualHasher, HASH_CHUNK};
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader};
use crate::store::{Descriptor, Hashed, PutOptions, Store, check_expected};

/// Longest ref accepted.
pub const MAX_REF_LEN: usize = 1024;
/// Buffered bytes flushed to the data object at once.
const FLUSH_AT: usize = 1 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    r#ref: String,
    offset: u64,
    algorithm: String,
    expected: Option<Digest>,
    expected_size: Option<u64>,
    kind: Kind,
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
    /// or [`Ingest::suspend`] (check [`Ingest::offset`] and continue from there).
    ///
    /// `opts.expected` selects the digest algorithm and is checked at commit, as is
    /// `opts.expected_size` (also checked on every write, so an oversized stream fails
    /// early). Resuming with different expectations than the suspended ingest is an error.
    pub fn ingest(&self, r#ref: &str, opts: PutOptions) -> Result<Ingest> {
        if r#ref.is_empty() || r#ref.len() > MAX_REF_LEN {
            return Err(Error::Invalid(format!(
                "ingest ref must be 1..={MAX_REF_LEN} bytes"
            )));
        }
        self.inner.files.writable()?;
        if !self.busy_refs().insert(r#ref.to_owned()) {
            return Err(Error::IngestBusy(r#ref.to_owned()));
        }
        let r = self.open_ingest(r#ref, opts);
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
            opts,
            finished: false,
        })
    }

    /// Refs of suspended or interrupted ingests and their durable offsets.
    pub fn ingests(&self) -> Result<Vec<(String, u64)>> {
        let files = &self.inner.files;
        let listed = files
            .backend
            .list(&List::Uploads)
            .map_err(|e| Error::io("list", files.backend.describe() + "/ingest", e))?;
        let with_data: std::collections::HashSet<String> = listed
            .iter()
            .filter_map(|l| match &l.key {
                Some(Key::Upload {
                    id,
                    part: UploadPart::Data,
                }) => Some(id.clone()),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for l in &listed {
            if let Some(Key::Upload {
                id,
                part: UploadPart::State,
            }) = &l.key
                && with_data.contains(id)
                && let Ok(Some(bytes)) = self.read_object(&state_key(id))
                && let Ok(s) = serde_json::from_slice::<State>(&bytes)
            {
                out.push((s.r#ref, s.offset));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Discards a suspended ingest. One that a live [`Ingest`] of this process is writing
    /// is refused with [`Error::IngestBusy`]: nothing is removed under a writer.
    pub fn abort_ingest(&self, r#ref: &str) -> Result<()> {
        self.inner.files.writable()?;
        if !self.busy_refs().insert(r#ref.to_owned()) {
            return Err(Error::IngestBusy(r#ref.to_owned()));
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

    fn busy_refs(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.inner
            .ingests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release_ref(&self, r#ref: &str) {
        self.busy_refs().remove(r#ref);
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

    fn open_ingest(&self, r#ref: &str, opts: PutOptions) -> Result<Ingest> {
        let files = &self.inner.files;
        let id = upload_id(r#ref);
        let dkey = data_key(&id);
        let skey = state_key(&id);
        let algorithm = algorithm_of(&opts);
        let mut hasher = DualHasher::new(algorithm);
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
        let (file, written, fresh) = if let Some(bytes) = state {
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
            // Bytes past the durable offset may be torn: drop them, re-hash the rest.
            file.set_len(RECORD_HEADER_LEN + st.offset)
                .map_err(|e| files.io("truncate", &dkey, e))?;
            let mut chunk = vec![0u8; 16 * HASH_CHUNK];
            let mut at = 0u64;
            while at < st.offset {
                let n = chunk.len().min((st.offset - at) as usize);
                file.read_at(&mut chunk[..n], RECORD_HEADER_LEN + at)
                    .map_err(|e| files.io("read", &dkey, e))?;
                hasher.update(&chunk[..n]);
                at += n as u64;
            }
            (file, st.offset, false)
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
            (file, 0, true)
        };
        let ing = Ingest {
            store: self.clone(),
            place: Place::Upload {
                r#ref: r#ref.to_owned(),
                id,
            },
            data_key: dkey,
            file,
            hasher,
            buf: Vec::new(),
            written,
            opts,
            finished: false,
        };
        if fresh {
            ing.save_state()?;
        }
        Ok(ing)
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

    /// Appends bytes. Fails with [`Error::SizeMismatch`] as soon as the stream exceeds the
    /// expected size, and refuses a manifest or index larger than the store parses.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
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
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
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

    fn save_state(&self) -> Result<()> {
        let Place::Upload { r#ref, id } = &self.place else {
            return Ok(());
        };
        let st = State {
            r#ref: r#ref.clone(),
            offset: self.written,
            algorithm: algorithm_of(&self.opts).name().to_owned(),
            expected: self.opts.expected,
            expected_size: self.opts.expected_size,
            kind: self.opts.kind.unwrap_or(Kind::Other),
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
            .map_err(|e| io("sync", e))
    }

    /// Makes everything written so far durable and records it as the resume point.
    pub fn sync(&mut self) -> Result<u64> {
        self.flush_buf()?;
        self.file
            .sync()
            .map_err(|e| self.files().io("sync", &self.data_key, e))?;
        self.save_state()?;
        Ok(self.written)
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

    /// Checks size and digest and makes the blob visible. On a mismatch the ingest is
    /// discarded and nothing becomes visible.
    pub fn commit(mut self) -> Result<Descriptor> {
        let r = self.commit_inner();
        // Success or failure, the ingest is done with.
        self.discard();
        r
    }

    /// Removes the ingest's objects and frees its ref.
    fn discard(&mut self) {
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

    fn commit_inner(&mut self) -> Result<Descriptor> {
        self.flush_buf()?;
        let size = self.written;
        let hasher = std::mem::replace(&mut self.hasher, DualHasher::new(Algorithm::Sha256));
        let (digest, blake3) = hasher.finish();
        check_expected(&self.opts, digest, size)?;
        let kind = self.opts.kind.unwrap_or(Kind::Other);
        let desc = Descriptor { digest, size };
        let inner = &self.store.inner;
        let files = &inner.files;
        // Manifests and indexes go through the batch path, which parses them for edges.
        if size < inner.opts.large_threshold || matches!(kind, Kind::Manifest | Kind::Index) {
            if matches!(kind, Kind::Manifest | Kind::Index) && size > crate::image::MAX_JSON {
                return Err(too_large_manifest(size));
            }
            let mut data = vec![0u8; size as usize];
            self.file
                .read_at(&mut data, RECORD_HEADER_LEN)
                .map_err(|e| files.io("read", &self.data_key, e))?;
            let item = Hashed {
                data: &data,
                digest,
                blake3,
                kind,
            };
            inner.store_hashed(std::slice::from_ref(&item), &self.opts)?;
            return Ok(desc);
        }
        // Stored already: refreshed and leased as a fresh put would be.
        if inner.touch_stored(&digest, self.opts.lease.as_deref())? {
            return Ok(desc);
        }
        let header = RecordHeader {
            digest,
            kind,
            flags: 0,
            stored_len: size,
            raw_len: size,
            blake3,
        };
        crate::backend::write_all_at(&*self.file, &header.encode(), 0)
            .map_err(|e| files.io("write", &self.data_key, e))?;
        let generation = files.publish(&[(&self.data_key, &*self.file, digest)])?[0];
        let item = Hashed {
            data: &[],
            digest,
            blake3,
            kind,
        };
        inner.commit_large(&item, size, generation, self.opts.lease.clone())?;
        Ok(desc)
    }
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
        if !self.finished {
            self.discard();
        }
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
