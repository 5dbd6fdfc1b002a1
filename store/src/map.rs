//! The only place that memory-maps files, and so the only module allowed `unsafe`.
//!
//! It owns [`Map`], a read-only mapping of a prefix of a file that the store guarantees
//! never shrinks while mapped. It must never map a file that may still be written in the
//! mapped range or truncated: only sealed segments (up to their committed length) and
//! large-blob files (immutable once renamed into place) are mapped.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// A read-only mapping of the first `len` bytes of a file.
pub struct Map {
    map: Option<memmap2::Mmap>,
}

impl Map {
    /// Maps `len` bytes of `file`, advising the kernel of `sequential` or random access;
    /// `populate` faults every page in at once (`MAP_POPULATE`), which is much cheaper than
    /// one fault per page for a caller about to read all of it (verify).
    ///
    /// A file shorter than `len` is `UnexpectedEof` here, rather than a SIGBUS on access.
    pub fn new(file: &File, len: u64, sequential: bool, populate: bool) -> io::Result<Map> {
        let actual = file.metadata()?.len();
        if actual < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file is {actual} bytes, {len} are expected"),
            ));
        }
        if len == 0 {
            return Ok(Map { map: None });
        }
        let len_usize = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length overflows"))?;
        // SAFETY: the store maps only files whose mapped range is never written again and
        // that are never truncated while mapped: sealed pack segments (append-only, sealed
        // before mapping, mapped up to their committed length; nothing ever shortens a
        // segment file, and compaction only unlinks one, which does not shrink a mapping)
        // and large-blob files (written, synced and renamed into place before being
        // indexed; the collector only unlinks them). The store's directory is private to
        // its one writer process (flock on ROOT/lock). A third party truncating these files
        // is outside the contract, as it is for every mmap-based store.
        let mut opts = memmap2::MmapOptions::new();
        opts.len(len_usize);
        if populate {
            opts.populate();
        }
        let map = unsafe { opts.map(file) }?;
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
