//! The one seam for store files: every read, write, sync, rename and unlink of a store
//! object goes through a [`Backend`], and the metadata database's storage comes from it.
//!
//! This module owns the vocabulary of that seam: [`Key`] names a store object by what it
//! is (a pack segment, a large blob of a generation, scratch space, a resumable upload, a
//! quarantined copy), never by a path; [`Handle`] reads and writes one object; durability
//! is what the backend says it is — an object's bytes after [`Handle::sync`], its name
//! after [`Backend::sync_names`], the metadata after [`MetaStorage::sync_data`]. The
//! backends are [`local`] (files under a root directory, read through mmap) and, behind
//! the `sim` feature, `sim` (in memory, recording every write and sync so that a test
//! can freeze the image a power loss would leave, or inject I/O errors). Nothing above
//! this module names a store path or calls `std::fs` on store files; nothing in it knows
//! what a blob, an index entry or a commit is.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::digest::Digest;

pub mod local;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

/// A store object, named by what it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A pack segment of a shard.
    Segment {
        /// The shard.
        shard: u32,
        /// The segment id (store-wide).
        id: u64,
    },
    /// The file of one large blob, of one generation.
    Large {
        /// The blob.
        digest: Digest,
        /// The generation (a re-put after a deletion gets a new one).
        generation: u64,
    },
    /// Scratch space (a large put being written, an import's staging): every writable
    /// open of the store discards it. The name is one path component.
    Scratch(String),
    /// One part of a resumable upload. `id` is one path component.
    Upload {
        /// The upload's id (the blake3 hex of its ref).
        id: String,
        /// Which part.
        part: UploadPart,
    },
    /// A copy kept by `verify --repair` for inspection. The name is one path component.
    Quarantine(String),
}

/// The parts of a resumable upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UploadPart {
    /// The bytes, after a record-header slot.
    Data,
    /// The resume point (JSON).
    State,
    /// A new resume point being written, renamed over `State` once synced.
    StateNew,
}

impl Key {
    /// The relative path of this object in the local layout (`docs/FORMAT.md` §1), which is
    /// also how messages name it.
    pub fn relative_path(&self) -> PathBuf {
        match self {
            Key::Segment { shard, id } => {
                PathBuf::from(format!("packs/{shard:03}/pack-{id:016x}.pack"))
            }
            Key::Large { digest, generation } => PathBuf::from(format!(
                "large/{:02x}/{}-{}.{generation}",
                digest.hash()[0],
                digest.algorithm(),
                digest.hex()
            )),
            Key::Scratch(name) => PathBuf::from(format!("ingest/tmp/{name}")),
            Key::Upload { id, part } => PathBuf::from(format!(
                "ingest/{id}/{}",
                match part {
                    UploadPart::Data => "data",
                    UploadPart::State => "state",
                    UploadPart::StateNew => "state.tmp",
                }
            )),
            Key::Quarantine(name) => PathBuf::from(format!("quarantine/{name}")),
        }
    }

    /// The "directory" the name lives in: names in one directory become durable together
    /// ([`Backend::sync_names`]).
    #[cfg_attr(not(any(test, feature = "sim")), allow(dead_code))]
    pub(crate) fn dir(&self) -> Dir {
        match self {
            Key::Segment { shard, .. } => Dir::Shard(*shard),
            Key::Large { digest, .. } => Dir::Fanout(digest.hash()[0]),
            Key::Scratch(_) => Dir::Scratch,
            Key::Upload { id, .. } => Dir::Upload(id.clone()),
            Key::Quarantine(_) => Dir::Quarantine,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.relative_path().display())
    }
}

/// A directory of names (for [`Backend::sync_names`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(not(any(test, feature = "sim")), allow(dead_code))]
pub(crate) enum Dir {
    Shard(u32),
    Fanout(u8),
    Scratch,
    Upload(String),
    Quarantine,
}

/// The metadata database files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaFile {
    /// `meta.redb`: the index.
    Main,
    /// `meta.redb.rebuild`: an index being rebuilt by `repair --rebuild-index`, installed
    /// over the main one only once complete ([`Backend::install_rebuilt_meta`]).
    Rebuild,
}

/// Small files of the store root that are not objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Control {
    /// The witness: the sequence number of the newest durable index commit, written after
    /// each one (never synced). An index whose own number is smaller is older than data
    /// the store has committed (docs/FORMAT.md §11).
    Witness,
}

/// What [`Backend::list`] lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum List {
    /// The shard numbers that have a segment directory.
    Shards,
    /// The segments of one shard.
    Segments(u32),
    /// Every large-blob file.
    Large,
    /// Every part of every upload, and upload directories that have none.
    Uploads,
    /// Every scratch object.
    Scratch,
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The object, when its name parses as one; `None` for a name no writer produces.
    pub key: Option<Key>,
    /// The name as found (a file name, a shard number, an upload id).
    pub name: String,
    /// How long ago it was last modified, when known.
    pub age: Option<Duration>,
    /// Its length, when known.
    pub len: Option<u64>,
}

/// A read-only view of an object's bytes (a memory map for local files).
pub trait Mapping: Send + Sync {
    /// The mapped bytes.
    fn bytes(&self) -> &[u8];
}

/// One open object.
#[allow(clippy::len_without_is_empty)] // a length, not a collection
pub trait Handle: Send + Sync {
    /// Writes `bufs` back to back at `offset`; returns how many bytes were written (a
    /// short write is possible, as with `pwritev`).
    fn write_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize>;
    /// Fills `buf` from `offset`; an object that ends first is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes every byte written so far, and the length, durable. Never retried by the
    /// store: after a failure the written bytes may be lost.
    fn sync(&self) -> io::Result<()>;
    /// The current length.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (new bytes read as zero).
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Writes all of `data` at `offset`.
pub(crate) fn write_all_at(h: &dyn Handle, data: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let n = h.write_at(&[IoSlice::new(&data[done..])], offset + done as u64)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// The storage of one metadata database file: what redb reads and writes.
#[allow(clippy::len_without_is_empty)] // a length, not a collection
pub trait MetaStorage: Send + Sync + fmt::Debug {
    /// The current length.
    fn len(&self) -> io::Result<u64>;
    /// Fills `out` from `offset` (`UnexpectedEof` past the end).
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    /// Sets the length (new bytes read as zero).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// An opened metadata database file.
pub struct MetaHandle(pub(crate) MetaImpl);

pub(crate) enum MetaImpl {
    /// A local file, with redb's own file locks.
    File(redb::backends::FileBackend),
    /// Any other storage (no file locks: the store lock excludes other writers).
    Custom(Box<dyn MetaStorage>),
}

impl MetaHandle {
    /// Metadata in a local file.
    pub fn file(file: std::fs::File) -> io::Result<MetaHandle> {
        redb::backends::FileBackend::new(file)
            .map(|b| MetaHandle(MetaImpl::File(b)))
            .map_err(io::Error::other)
    }

    /// Metadata in some other storage.
    pub fn custom(storage: Box<dyn MetaStorage>) -> MetaHandle {
        MetaHandle(MetaImpl::Custom(storage))
    }
}

impl fmt::Debug for MetaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            MetaImpl::File(_) => f.write_str("MetaHandle(file)"),
            MetaImpl::Custom(s) => write!(f, "MetaHandle({s:?})"),
        }
    }
}

/// Whether a lock is taken to write or only to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// The one writer of the store.
    Exclusive,
    /// A reader that shares the store with other readers.
    Shared,
}

/// Where a store's files live. See the module documentation for the contract.
///
/// Methods report plain [`io::Error`]s; the store adds what it was doing and classifies
/// them (a missing object an index entry names is corruption, anything else an operational
/// error).
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A one-line description for messages and `store info` (`/var/lib/images`).
    fn describe(&self) -> String;
    /// How messages name an object (an absolute path, for local files).
    fn display(&self, key: &Key) -> PathBuf;
    /// The local directory of the store, if it has one.
    fn local_root(&self) -> Option<&std::path::Path>;

    /// Refuses storage the store cannot run on safely (a network file system for local
    /// files). Called before anything is written.
    fn check(&self) -> crate::Result<()>;
    /// Creates the layout of a writable store (directories, for local files) durably.
    /// Idempotent.
    fn prepare(&self, shards: u32) -> io::Result<()>;
    /// Takes the store lock. `Ok(None)`: another holder has it.
    fn lock(&self, mode: LockMode) -> io::Result<Option<Box<dyn Send + Sync>>>;

    /// Opens a metadata database file; `create` makes a missing one (empty). `Ok(None)`:
    /// it does not exist (and `create` was false).
    fn meta(&self, which: MetaFile, create: bool, write: bool) -> io::Result<Option<MetaHandle>>;
    /// The length of a metadata database file, or `None` if it does not exist.
    fn meta_len(&self, which: MetaFile) -> io::Result<Option<u64>>;
    /// Removes a metadata database file (a stale rebuild).
    fn remove_meta(&self, which: MetaFile) -> io::Result<()>;
    /// Atomically puts the rebuilt index in place of the main one (which is kept aside,
    /// when there is one, under the returned name); durable when it returns.
    fn install_rebuilt_meta(&self) -> io::Result<Option<String>>;

    /// Reads a control file (`None`: absent).
    fn read_control(&self, c: Control) -> io::Result<Option<Vec<u8>>>;
    /// Writes a control file in place, without syncing it.
    fn write_control(&self, c: Control, bytes: &[u8]) -> io::Result<()>;

    /// Creates a new, empty object (`AlreadyExists` if it exists). Its name is durable
    /// after [`Backend::sync_names`]; its bytes after [`Handle::sync`].
    fn create(&self, key: &Key) -> io::Result<Arc<dyn Handle>>;
    /// Opens an existing object (`NotFound` if absent), for reading and, with `write`,
    /// writing.
    fn open(&self, key: &Key, write: bool) -> io::Result<Arc<dyn Handle>>;
    /// A read-only view of the first `len` bytes of an object that is never written again
    /// in that range nor shortened (a sealed segment, a large blob). `UnexpectedEof` if
    /// the object is shorter. `populate` asks for the bytes to be read in at once.
    fn map(&self, key: &Key, len: u64, populate: bool) -> io::Result<Arc<dyn Mapping>>;
    /// The length of an object, or `None` if absent.
    fn len(&self, key: &Key) -> io::Result<Option<u64>>;
    /// Removes an object; `Ok(false)` if it was absent. Durable after
    /// [`Backend::sync_names`].
    fn remove(&self, key: &Key) -> io::Result<bool>;
    /// Renames an object. Without `replace`, an existing `to` is left alone and the call
    /// returns `Ok(false)`. The rename is atomic; durable after [`Backend::sync_names`] of
    /// either name.
    fn rename(&self, from: &Key, to: &Key, replace: bool) -> io::Result<bool>;
    /// Makes the creations, renames and removals of these names durable.
    fn sync_names(&self, keys: &[Key]) -> io::Result<()>;
    /// Lists objects.
    fn list(&self, what: &List) -> io::Result<Vec<Listed>>;
    /// Removes an upload's directory and everything in it (not durable).
    fn remove_upload(&self, id: &str) -> io::Result<()>;
    /// Removes every scratch object (at a writable open: they belong to writers that are
    /// gone).
    fn clear_scratch(&self) -> io::Result<()>;

    /// Free bytes where the store writes, when known.
    fn free_space(&self) -> io::Result<Option<u64>>;
    /// Makes sure the disk-full reserve exists: `bytes`, or less on a small disk (at most an
    /// eighth of the free space). An existing one is kept as it is. `Ok(false)`: there is
    /// not enough space to make one now.
    fn ensure_reserve(&self, bytes: u64) -> io::Result<bool>;
    /// Gives the reserve's space back (`Ok(false)`: there was none).
    fn release_reserve(&self) -> io::Result<bool>;
}

/// The adapter between a [`MetaHandle`] and redb.
#[derive(Debug)]
pub(crate) struct RedbStorage(pub MetaImpl);

impl fmt::Debug for MetaImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaImpl::File(b) => b.fmt(f),
            MetaImpl::Custom(s) => s.fmt(f),
        }
    }
}

impl redb::StorageBackend for RedbStorage {
    fn len(&self) -> io::Result<u64> {
        match &self.0 {
            MetaImpl::File(b) => b.len(),
            MetaImpl::Custom(s) => s.len(),
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        match &self.0 {
            MetaImpl::File(b) => b.read(offset, out),
            MetaImpl::Custom(s) => s.read(offset, out),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match &self.0 {
            MetaImpl::File(b) => b.set_len(len),
            MetaImpl::Custom(s) => s.set_len(len),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        match &self.0 {
            MetaImpl::File(b) => b.sync_data(),
            MetaImpl::Custom(s) => s.sync_data(),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &self.0 {
            MetaImpl::File(b) => b.write(offset, data),
            MetaImpl::Custom(s) => s.write(offset, data),
        }
    }

    fn close(&self) -> io::Result<()> {
        match &self.0 {
            MetaImpl::File(b) => b.close(),
            MetaImpl::Custom(_) => Ok(()),
        }
    }

    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.try_lock_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }

    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.try_lock_shared_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }

    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.lock_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }

    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.lock_shared_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }

    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.unlock_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }

    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        match &self.0 {
            MetaImpl::File(b) => b.query_lock_range(start, end),
            MetaImpl::Custom(_) => Err(redb::BackendError::Unsupported),
        }
    }
}
