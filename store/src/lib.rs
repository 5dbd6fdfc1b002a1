//! `layerstore`: an embeddable, crash-safe, content-addressed store for OCI and Docker
//! image content.
//!
//! Blobs are kept byte-exact under their digest. Small blobs are appended to sharded,
//! append-only pack segments; large ones get a file each; both are read through mmap.
//! The index lives in redb and is the only source of truth for what exists: a blob
//! becomes visible only in the transaction that commits it, after its bytes are durable.
//! See `docs/ARCHITECTURE.md` for the modules and `docs/FORMAT.md` for the bytes on disk.
//!
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! use layerstore::{Options, Store};
//! let store = Store::open(dir.path(), Options::default())?;
//! let d = store.put(b"hello")?;
//! assert_eq!(&*store.get(&d.digest)?, b"hello");
//! # Ok::<(), layerstore::Error>(())
//! ```

#[cfg(feature = "cli")]
pub mod admin;
#[cfg(feature = "tokio")]
pub mod aio;
pub mod archive;
pub mod backend;
mod blobs;
pub mod catalog;
#[cfg(feature = "cli")]
pub mod cli;
pub mod digest;
mod error;
pub mod format;
pub mod gc;
pub mod image;
mod ingest;
mod map;
mod meta;
mod metrics;
pub mod reference;
mod refs;
pub mod repair;
mod resumable;
mod store;
mod sys;
pub mod unpack;
pub mod verify;

// docs/EMBEDDING.md's code blocks run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/EMBEDDING.md")]
mod embedding_doc {}

pub use archive::{ExportFormat, ImportOptions, ImportOutcome, ImportedImage};
pub use blobs::Blob;
pub use digest::{Algorithm, Digest, DigestError};
pub use error::{DbError, Error, ErrorKind, Result};
pub use format::Kind;
pub use gc::{GcOptions, GcReport, NoProgress, Progress};
pub use ingest::{Ingest, MAX_REF_LEN, UploadStatus};
pub use meta::{ContainerRecord, Counters, LeaseRecord, Location, SCHEMA_VERSION};
pub use metrics::Metrics;
pub use reference::Reference;
pub use refs::{Lease, ReferrerDescriptor};
pub use store::{
    BlobInfo, BlobIter, Descriptor, Info, ManifestPut, Options, PutOptions, Snapshot, Store,
};
pub use verify::{Depth, Problem, ProblemKind, VerifyOptions, VerifyReport};
