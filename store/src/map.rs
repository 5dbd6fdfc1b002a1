//! The only place that memory-maps files, and so the only module allowed `unsafe`.
//!
//! It owns [`Map`], a read-only mapping of a prefix of a file that the store guarantees
//! never shrinks while mapped. It must never map a file that may still be written in the
//! mapped range or truncated: only sealed segments (up to their committed length) and
//! large-blob files (immutable once renamed into place) are mapped.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// A read-only mapping of the first `len` bytes of a file.
pub struct Map {
    map: Option<memmap2::Mmap>,
}

impl Map {
    /// Maps `len` bytes of `file` (which lives at `path`, for error messages), advising the
    /// kernel of `sequential` or random access.
    ///
    /// Fails with [`Error::Corrupt`] if the file is shorter than `len`, so that a short
    /// file is an error here rather than a SIGBUS on access.
    pub fn new(file: &File, path: &Path, len: u64, sequential: bool) -> Result<Map> {
        Map::with(file, path, len, sequential, false)
    }

    /// [`Map::new`], faulting every page in at once (`MAP_POPULATE`): for a caller about to
    /// read all of it (verify), much cheaper than one fault per page.
    pub fn populated(file: &File, path: &Path, len: u64) -> Result<Map> {
        Map::with(file, path, len, true, true)
    }

    fn with(file: &File, path: &Path, len: u64, sequential: bool, populate: bool) -> Result<Map> {
        let actual = file.metadata().ctx("stat", path)?.len();
        if actual < len {
            return Err(Error::Corrupt(format!(
                "{} is {actual} bytes, but {len} are committed",
                path.display()
            )));
        }
        if len == 0 {
            return Ok(Map { map: None });
        }
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::Corrupt(format!("{}: length overflows", path.display())))?;
        // SAFETY: the store maps only files whose mapped range is never written again and
        // that are never truncated while mapped: sealed pack segments (append-only, sealed
        // before mapping, mapped up to their committed length; compaction unlinks them only
        // after the last mapping is dropped, and unlinking does not shrink a mapping) and
        // large-blob files (written, fsynced and renamed into place before being indexed;
        // GC only unlinks them). The store's directory is private to its one writer
        // process (flock on ROOT/lock). A third party truncating these files is outside
        // the contract, as it is for every mmap-based store.
        let mut opts = memmap2::MmapOptions::new();
        opts.len(len_usize);
        if populate {
            opts.populate();
        }
        let map = unsafe { opts.map(file) }.ctx("mmap", path)?;
        // Segments are read a record at a time; large files front to back.
        let _ = map.advise(if sequential {
            memmap2::Advice::Sequential
        } else {
            memmap2::Advice::Random
        });
        Ok(Map { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}
