//! The store's error type: one enum whose variants a caller can match on.
//!
//! This module owns error classification only. I/O errors carry the path they concern;
//! mismatch errors carry both sides ("was X, should have been Y").

use std::path::PathBuf;
use std::sync::Arc;

use crate::digest::{Digest, DigestError};
use crate::format::HeaderError;

/// Result alias for store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a store operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store is open read-write in another process (or another handle in this one).
    #[error("store {path} is locked: another process has it open read-write")]
    Locked {
        /// The store root.
        path: PathBuf,
    },
    /// No store exists at the path (read-only commands never create one).
    #[error("no store at {path}")]
    NoStore {
        /// The store root.
        path: PathBuf,
    },
    /// The root holds store data that its index does not account for: the index is
    /// missing, empty, or older than the data. Nothing was changed; the index must be
    /// rebuilt from the data (`store repair --rebuild-index`).
    #[error(
        "store {path}: {reason}; nothing was changed — run `store repair --rebuild-index` \
         to rebuild the index from the data"
    )]
    NeedsRepair {
        /// The store root.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// A read-only open found an index that only a writable open can bring up to date:
    /// a crash left it needing recovery, or an earlier build made it without some tables.
    #[error("store {path} {why}; that needs a writable open")]
    NeedsRecovery {
        /// The store root.
        path: PathBuf,
        /// What the writable open would do.
        why: &'static str,
    },
    /// `verify --repair` changed nothing: some reads failed for reasons that say nothing
    /// about the bytes (EIO, EMFILE, ...), and only bytes proven wrong are ever removed.
    #[error(
        "{count} read(s) failed for reasons that say nothing about the bytes (the first: \
         {first}); repair changes nothing until every blob can be read"
    )]
    ReadFailures {
        /// How many reads failed.
        count: usize,
        /// The first failure.
        first: String,
    },
    /// A write was asked of a store opened read-only.
    #[error("the store is open read-only")]
    ReadOnly,
    /// The store lives on a file system where locks and mmap are unsafe.
    #[error("{path} is on a network file system ({fs}); layerstore needs a local disk")]
    NetworkFilesystem {
        /// The store root.
        path: PathBuf,
        /// The file system type.
        fs: &'static str,
    },
    /// No blob with this digest is stored.
    #[error("blob {0} not found")]
    NotFound(Digest),
    /// The bytes hash to something other than what the caller expected.
    #[error("digest mismatch: content hashes to {actual}, but should have been {expected}")]
    DigestMismatch {
        /// The digest the caller named.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The caller's expected size differs from the bytes received.
    #[error("size mismatch: received {actual} bytes, but should have been {expected}")]
    SizeMismatch {
        /// The size the caller named.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A blob asked to be deleted is still used.
    #[error(
        "blob {digest} is in use: {parents} stored manifest(s) or index(es) name it and \
         {holders} name(s), container(s) or lease entries hold it; remove those first"
    )]
    Referenced {
        /// The blob.
        digest: Digest,
        /// Stored manifests and indexes that name it.
        parents: u64,
        /// Names, containers and lease entries that hold it.
        holders: u64,
    },
    /// A read range starts past the end of the blob.
    #[error("range starts at byte {offset}, past the end of blob {digest} ({size} bytes)")]
    OutOfRange {
        /// The blob.
        digest: Digest,
        /// Where the range was asked to start.
        offset: u64,
        /// The blob's size.
        size: u64,
    },
    /// A digest string or key is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Stored data contradicts the index or its own headers.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// An ingest with this ref is already being written in this process.
    #[error("ingest {0:?} is already in progress")]
    IngestBusy(String),
    /// The upload was aborted ([`crate::Store::abort_ingest`]) while this writer held
    /// it; its bytes are discarded.
    #[error("upload {0:?} was aborted; its bytes are discarded")]
    UploadAborted(String),
    /// A name is not in the store.
    #[error("no such image: {0}")]
    NameNotFound(String),
    /// A name or container must point at a manifest or index.
    #[error("{0} is not an image (a manifest or index)")]
    NotAnImage(Digest),
    /// Removing the name would leave an image that containers use without a name.
    #[error("conflict: unable to remove {reference:?}: image {image} is in use by container {}", fmt_containers(.containers))]
    InUse {
        /// The name asked for.
        reference: String,
        /// The image it points at.
        image: Digest,
        /// (id, name) of the containers using it.
        containers: Vec<(String, String)>,
    },
    /// A manifest or index names children that are not stored.
    #[error("{parent} names {} blob(s) not in the store: {}", .missing.len(), fmt_digests(.missing))]
    MissingChildren {
        /// The manifest or index.
        parent: Digest,
        /// The absent children.
        missing: Vec<Digest>,
    },
    /// Image JSON was refused.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// A reference could not be parsed.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// No container with that id or name.
    #[error("no such container: {0}")]
    ContainerNotFound(String),
    /// No lease with that id.
    #[error("no such lease: {0}")]
    LeaseNotFound(String),
    /// An archive or layout is malformed or unsafe.
    #[error("invalid archive: {0}")]
    Archive(String),
    /// `verify` found problems (the CLI exits with status 3).
    #[error("{0} problem(s) found")]
    ProblemsFound(usize),
    /// The operation was interrupted by its caller.
    #[error("interrupted")]
    Interrupted,
    /// An invalid argument (ref name, option value).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: Arc<std::io::Error>,
    },
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(DbError),
}

/// A failure of the metadata database. Opaque on purpose: the engine behind the index is
/// not part of the API (its message is kept, and [`std::error::Error::source`] reaches
/// its error).
#[derive(Debug, Clone)]
pub struct DbError(Arc<redb::Error>);

impl DbError {
    /// Whether the database ran out of space (ENOSPC).
    pub fn is_no_space(&self) -> bool {
        const ENOSPC: i32 = 28;
        matches!(&*self.0, redb::Error::Io(io) if io.raw_os_error() == Some(ENOSPC))
    }

    /// The OS error beneath, if the database failed on I/O.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match &*self.0 {
            redb::Error::Io(io) => Some(io),
            _ => None,
        }
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The class of an [`Error`], from [`Error::kind`]. The comments give the HTTP status a
/// registry front would answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such blob, name, container, lease or store (404).
    NotFound,
    /// The request or its content is malformed or not allowed: a bad digest, reference,
    /// argument, image JSON or archive (400).
    Invalid,
    /// A manifest or index names blobs that are not stored (400, `MANIFEST_BLOB_UNKNOWN`).
    MissingChildren,
    /// The content does not match the digest or size the caller gave (400,
    /// `DIGEST_INVALID` / `SIZE_INVALID`).
    Mismatch,
    /// A read range starts past the end of the blob (416).
    OutOfRange,
    /// The change conflicts with what the store holds: an image in use, a blob still
    /// referenced (409).
    Conflict,
    /// Someone else holds what the call needs: an ingest ref being written, the store's
    /// lock (409 for an ingest; retry later).
    Busy,
    /// A write on a store opened read-only (405 / 503).
    ReadOnly,
    /// The store needs `store repair --rebuild-index` or a writable open first (503).
    NeedsRepair,
    /// Stored bytes are proven wrong (500; run `store verify`).
    Corrupt,
    /// The caller interrupted the operation; nothing partial is visible (499).
    Interrupted,
    /// The store cannot run here (a network file system) (500).
    Unsupported,
    /// The storage failed: an OS or database error, not a statement about the bytes (500
    /// / 503; often transient).
    Io,
}

fn fmt_containers(c: &[(String, String)]) -> String {
    c.iter()
        .map(|(id, name)| format!("{} ({name})", &id[..id.len().min(12)]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_digests(d: &[Digest]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    /// Wraps an I/O error with the operation and path it concerns.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// What kind of failure this is, for a caller that maps errors to its own (an HTTP
    /// front to status codes, a CLI to exit codes) without matching every variant.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_)
            | Error::NameNotFound(_)
            | Error::ContainerNotFound(_)
            | Error::LeaseNotFound(_)
            | Error::UploadAborted(_)
            | Error::NoStore { .. } => ErrorKind::NotFound,
            Error::Digest(_)
            | Error::Reference(_)
            | Error::Image(_)
            | Error::Archive(_)
            | Error::Invalid(_)
            | Error::NotAnImage(_) => ErrorKind::Invalid,
            Error::MissingChildren { .. } => ErrorKind::MissingChildren,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => ErrorKind::Mismatch,
            Error::InUse { .. } | Error::Referenced { .. } => ErrorKind::Conflict,
            Error::IngestBusy(_) | Error::Locked { .. } => ErrorKind::Busy,
            Error::ReadOnly => ErrorKind::ReadOnly,
            Error::NeedsRepair { .. } | Error::NeedsRecovery { .. } => ErrorKind::NeedsRepair,
            Error::Corrupt(_) | Error::ProblemsFound(_) => ErrorKind::Corrupt,
            Error::Interrupted => ErrorKind::Interrupted,
            Error::NetworkFilesystem { .. } => ErrorKind::Unsupported,
            Error::Io { .. } | Error::Db(_) | Error::ReadFailures { .. } => ErrorKind::Io,
        }
    }

    /// Whether the store refused the caller's request or content (it then committed
    /// nothing): a client error in HTTP terms, as opposed to a failure of the storage.
    /// True for [`ErrorKind::NotFound`], [`ErrorKind::Invalid`],
    /// [`ErrorKind::MissingChildren`], [`ErrorKind::Mismatch`], [`ErrorKind::OutOfRange`],
    /// [`ErrorKind::Conflict`],
    /// and for an ingest ref already being written ([`Error::IngestBusy`]).
    pub fn is_refusal(&self) -> bool {
        match self.kind() {
            ErrorKind::NotFound
            | ErrorKind::Invalid
            | ErrorKind::MissingChildren
            | ErrorKind::Mismatch
            | ErrorKind::OutOfRange
            | ErrorKind::Conflict => !matches!(self, Error::NoStore { .. }),
            ErrorKind::Busy => matches!(self, Error::IngestBusy(_)),
            _ => false,
        }
    }

    /// Whether the storage ran out of space (ENOSPC), from a file operation or from the
    /// metadata database.
    pub fn is_no_space(&self) -> bool {
        const ENOSPC: i32 = 28;
        match self {
            Error::Io { source, .. } => source.raw_os_error() == Some(ENOSPC),
            Error::Db(e) => e.is_no_space(),
            _ => false,
        }
    }

    /// A corruption error for a bad header at a place.
    pub(crate) fn bad_header(what: impl std::fmt::Display, e: &HeaderError) -> Error {
        Error::Corrupt(format!("{what}: {e}"))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Db(DbError(Arc::new(e.into())))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Adds path context to `std::io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`Error::Io`] with `op` and `path`.
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e.into()))
    }
}
