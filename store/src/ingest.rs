//! Streaming, resumable ingest: write a blob chunk by chunk under a caller-chosen ref,
//! check it against an expected digest and size, and commit it, or resume it after a
//! crash or restart from its last durable offset.
//!
//! This module owns `ROOT/ingest/<id>/` (one directory per ref: `data`, the bytes behind a
//! 128-byte header slot, and `state`, the durable offset and expectations). It never makes
//! anything visible except through [`Ingest::commit`], and an ingest that is dropped or
//! fails leaves no files behind; only [`Ingest::suspend`] (or a crash) keeps one to resume.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::digest::{Algorithm, Digest, DualHasher, HASH_CHUNK};
use crate::error::{Error, IoContext, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader};
use crate::store::{Descriptor, Hashed, PutOptions, Store, check_expected};

/// Longest ref accepted.
pub const MAX_REF_LEN: usize = 1024;
/// Buffered bytes flushed to the data file at once.
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

/// An in-progress ingest. Write bytes with [`Ingest::write_all`] (or `std::io::Write`),
/// then [`commit`](Ingest::commit). Dropping it without committing or suspending removes
/// everything it wrote.
pub struct Ingest {
    store: Store,
    r#ref: String,
    dir: PathBuf,
    data_path: PathBuf,
    file: File,
    hasher: DualHasher,
    buf: Vec<u8>,
    /// Bytes in the file (after the header slot), excluding `buf`.
    written: u64,
    opts: PutOptions,
    finished: bool,
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
        {
            let mut busy = self
                .inner
                .ingests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !busy.insert(r#ref.to_owned()) {
                return Err(Error::IngestBusy(r#ref.to_owned()));
            }
        }
        let r = self.open_ingest(r#ref, opts);
        if r.is_err() {
            self.release_ref(r#ref);
        }
        r
    }

    /// Refs of suspended or interrupted ingests and their durable offsets.
    pub fn ingests(&self) -> Result<Vec<(String, u64)>> {
        let base = self.inner.root.join("ingest");
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&base).ctx("list", &base)? {
            let ent = ent.ctx("list", &base)?;
            let p = ent.path().join("state");
            if ent.path().join("data").exists()
                && let Ok(bytes) = std::fs::read(&p)
                && let Ok(s) = serde_json::from_slice::<State>(&bytes)
            {
                out.push((s.r#ref, s.offset));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Discards a suspended ingest.
    pub fn abort_ingest(&self, r#ref: &str) -> Result<()> {
        let dir = ingest_dir(self, r#ref);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        }
    }

    fn release_ref(&self, r#ref: &str) {
        self.inner
            .ingests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(r#ref);
    }

    fn open_ingest(&self, r#ref: &str, opts: PutOptions) -> Result<Ingest> {
        let dir = ingest_dir(self, r#ref);
        let data_path = dir.join("data");
        let state_path = dir.join("state");
        let algorithm = opts.expected.map_or(Algorithm::Sha256, |d| d.algorithm());
        let mut hasher = DualHasher::new(algorithm);
        let mut opts = opts;
        // A state without data is what a crash leaves after a commit moved the data into
        // the store and before it removed the directory: nothing to resume.
        let state = if data_path.exists() {
            std::fs::read(&state_path)
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        let (file, written, fresh) = match state {
            Ok(bytes) => {
                let st: State = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Corrupt(format!("{}: {e}", state_path.display())))?;
                if st.r#ref != r#ref {
                    return Err(Error::Corrupt(format!(
                        "{} belongs to ref {:?}",
                        state_path.display(),
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
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&data_path)
                    .ctx("open", &data_path)?;
                let len = file.metadata().ctx("stat", &data_path)?.len();
                if len < RECORD_HEADER_LEN + st.offset {
                    return Err(Error::Corrupt(format!(
                        "{} is shorter than its durable offset {}",
                        data_path.display(),
                        st.offset
                    )));
                }
                // Bytes past the durable offset may be torn: drop them, re-hash the rest.
                file.set_len(RECORD_HEADER_LEN + st.offset)
                    .ctx("truncate", &data_path)?;
                let mut chunk = vec![0u8; 16 * HASH_CHUNK];
                let mut at = 0u64;
                while at < st.offset {
                    let n = chunk.len().min((st.offset - at) as usize);
                    file.read_exact_at(&mut chunk[..n], RECORD_HEADER_LEN + at)
                        .ctx("read", &data_path)?;
                    hasher.update(&chunk[..n]);
                    at += n as u64;
                }
                (file, st.offset, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::sys::create_dir_durable(&dir)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&data_path)
                    .ctx("create", &data_path)?;
                file.set_len(RECORD_HEADER_LEN).ctx("write", &data_path)?;
                (file, 0, true)
            }
            Err(e) => return Err(Error::io("read", &state_path, e)),
        };
        let ing = Ingest {
            store: self.clone(),
            r#ref: r#ref.to_owned(),
            dir,
            data_path,
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

fn ingest_dir(store: &Store, r#ref: &str) -> PathBuf {
    store
        .inner
        .root
        .join("ingest")
        .join(blake3::hash(r#ref.as_bytes()).to_hex().as_str())
}

impl Ingest {
    /// The ref this ingest is named by.
    pub fn ref_name(&self) -> &str {
        &self.r#ref
    }

    /// Bytes received so far (after a resume: the durable offset it resumed from).
    pub fn offset(&self) -> u64 {
        self.hasher.len()
    }

    /// Appends bytes. Fails with [`Error::SizeMismatch`] as soon as the stream exceeds the
    /// expected size.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        if let Some(expected) = self.opts.expected_size {
            let actual = self.offset() + data.len() as u64;
            if actual > expected {
                return Err(Error::SizeMismatch { expected, actual });
            }
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

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, RECORD_HEADER_LEN + self.written)
                .ctx("write", &self.data_path)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn save_state(&self) -> Result<()> {
        let st = State {
            r#ref: self.r#ref.clone(),
            offset: self.written,
            algorithm: self.hasher_algorithm().name().to_owned(),
            expected: self.opts.expected,
            expected_size: self.opts.expected_size,
            kind: self.opts.kind.unwrap_or(Kind::Other),
        };
        let tmp = self.dir.join("state.tmp");
        let bytes = serde_json::to_vec(&st).map_err(|e| Error::Invalid(e.to_string()))?;
        let f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all_at(&bytes, 0).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        std::fs::rename(&tmp, self.dir.join("state")).ctx("rename", &tmp)?;
        crate::sys::sync_dir(&self.dir)
    }

    fn hasher_algorithm(&self) -> Algorithm {
        self.opts
            .expected
            .map_or(Algorithm::Sha256, |d| d.algorithm())
    }

    /// Makes everything written so far durable and records it as the resume point.
    pub fn sync(&mut self) -> Result<u64> {
        self.flush_buf()?;
        self.file.sync_data().ctx("fsync", &self.data_path)?;
        self.save_state()?;
        Ok(self.written)
    }

    /// Makes the bytes durable and keeps the ingest for a later [`Store::ingest`] with the
    /// same ref. Returns the offset to resume from.
    pub fn suspend(mut self) -> Result<u64> {
        let n = self.sync()?;
        self.finished = true;
        self.store.release_ref(&self.r#ref);
        Ok(n)
    }

    /// Checks size and digest and makes the blob visible. On a mismatch the ingest is
    /// discarded and nothing becomes visible.
    pub fn commit(mut self) -> Result<Descriptor> {
        let r = self.commit_inner();
        // Success or failure, the ingest directory is done with.
        self.finished = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.store.release_ref(&self.r#ref);
        r
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
        // Manifests and indexes go through the batch path, which parses them for edges.
        if size < inner.opts.large_threshold || matches!(kind, Kind::Manifest | Kind::Index) {
            let mut data = vec![0u8; size as usize];
            self.file
                .read_exact_at(&mut data, RECORD_HEADER_LEN)
                .ctx("read", &self.data_path)?;
            let item = Hashed {
                data: &data,
                digest,
                blake3,
                kind,
            };
            inner.store_hashed(std::slice::from_ref(&item), &self.opts)?;
            return Ok(desc);
        }
        if self.store.ensure(&digest)? {
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
        self.file
            .write_all_at(&header.encode(), 0)
            .ctx("write", &self.data_path)?;
        let generation = inner
            .files
            .install_large(&self.data_path, &self.file, &digest)?;
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
            let _ = std::fs::remove_dir_all(&self.dir);
            self.store.release_ref(&self.r#ref);
        }
    }
}
