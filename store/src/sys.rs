//! Thin, safe wrappers over the file-system calls the local backend's durability rests
//! on: directory fsync, `RENAME_NOREPLACE`, and the network-file-system check.
//!
//! This module owns no state, and none of its functions retries an fsync (after a failed
//! fsync the kernel may have dropped the dirty pages, so a retry can report success over
//! lost data).

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{CWD, RenameFlags};

use crate::error::{Error, IoContext, Result};

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) and fsyncs the parent of each directory it created,
/// so the new entries survive a crash. Returns whether anything was created.
pub fn create_dir_durable(dir: &Path) -> io::Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    sync_dir(parent.unwrap_or(Path::new(".")))?;
    Ok(true)
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(Into::into)
}

/// Fails when `path` is on a network file system, where flock and mmap are unsafe.
pub fn refuse_network_fs(path: &Path) -> Result<()> {
    let st = rustix::fs::statfs(path).ctx("statfs", path)?;
    // Magic numbers from linux/magic.h and statfs(2).
    #[allow(clippy::unreadable_literal)]
    let fs = match st.f_type as i64 {
        0x6969 => Some("nfs"),
        0xFF53_4D42 => Some("cifs"),
        0xFE53_4D42 => Some("smb2"),
        0x517B => Some("smb"),
        0x0102_1997 => Some("9p"),
        0x6B41_4653 => Some("afs"),
        0x0BD0_0BD0 => Some("lustre"),
        0x4750_4653 => Some("gpfs"),
        0x00C3_6400 => Some("ceph"),
        _ => None,
    };
    match fs {
        Some(fs) => Err(Error::NetworkFilesystem {
            path: path.to_owned(),
            fs,
        }),
        None => Ok(()),
    }
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A duration in whole milliseconds, saturating (a `--grace` of centuries is "forever",
/// never a wrapped small number).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
