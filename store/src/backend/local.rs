//! The local backend: store objects as files under one root directory (the layout of
//! docs/FORMAT.md §1), read through mmap where the store asks for a mapping.
//!
//! It owns the POSIX spelling of durability: `fdatasync` of a file for its bytes, `fsync`
//! of the directories for names (creations, `RENAME_NOREPLACE` renames, unlinks), `flock`
//! for the store lock, `statfs` to refuse network file systems. It never retries a failed
//! sync (the kernel may have dropped the dirty pages) and never decides what a file
//! means.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{
    Backend, Control, Handle, Key, List, Listed, LockMode, Mapping, MetaFile, MetaHandle,
    UploadPart,
};
use crate::digest::Digest;
use crate::map::Map;
use crate::sys;

/// The smallest reserve worth keeping.
const MIN_RESERVE: u64 = 1 << 20;

/// Store files under a root directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// A backend for the store at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { root: root.into() }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.relative_path())
    }

    fn meta_path(&self, which: MetaFile) -> PathBuf {
        self.root.join(match which {
            MetaFile::Main => "meta.redb",
            MetaFile::Rebuild => "meta.redb.rebuild",
        })
    }

    fn control_path(&self, c: Control) -> PathBuf {
        self.root.join(match c {
            Control::Witness => "witness",
        })
    }

    fn reserve_path(&self) -> PathBuf {
        self.root.join("reserve")
    }

    /// Ensures the directory of `path` exists (durably).
    fn parent_dir(path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) => sys::create_dir_durable(dir).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// An open file.
struct FileHandle {
    file: File,
}

impl Handle for FileHandle {
    fn write_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        rustix::io::pwritev(&self.file, bufs, offset).map_err(Into::into)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

impl Mapping for Map {
    fn bytes(&self) -> &[u8] {
        Map::bytes(self)
    }
}

fn absent_ok<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn age_of(m: &std::fs::Metadata) -> Option<Duration> {
    m.modified()
        .ok()
        .map(|t| t.elapsed().unwrap_or(Duration::ZERO))
}

/// The entries of a directory (an absent directory has none).
fn entries(dir: &Path) -> io::Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn listed(key: Option<Key>, ent: &std::fs::DirEntry) -> io::Result<Listed> {
    let m = ent.metadata()?;
    Ok(Listed {
        key,
        name: ent.file_name().to_string_lossy().into_owned(),
        age: age_of(&m),
        len: m.is_file().then_some(m.len()),
    })
}

/// The key a large file's name (`<alg>-<hex>.<gen>`) promises.
pub(crate) fn parse_large_name(name: &str) -> Option<Key> {
    let (stem, generation) = name.rsplit_once('.')?;
    let (alg, hex) = stem.split_once('-')?;
    Some(Key::Large {
        digest: Digest::parse(&format!("{alg}:{hex}")).ok()?,
        generation: generation.parse().ok()?,
    })
}

fn parse_segment_name(shard: u32, name: &str) -> Option<Key> {
    let hex = name.strip_prefix("pack-")?.strip_suffix(".pack")?;
    if hex.len() != 16 {
        return None;
    }
    Some(Key::Segment {
        shard,
        id: u64::from_str_radix(hex, 16).ok()?,
    })
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn display(&self, key: &Key) -> PathBuf {
        self.path(key)
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn check(&self) -> crate::Result<()> {
        // The nearest existing ancestor tells the file system the store will be on.
        let mut p = self.root.as_path();
        while !p.exists() {
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => return Ok(()),
            }
        }
        sys::refuse_network_fs(p).map_err(|e| match e {
            crate::Error::NetworkFilesystem { fs, .. } => crate::Error::NetworkFilesystem {
                path: self.root.clone(),
                fs,
            },
            e => e,
        })
    }

    fn prepare(&self, shards: u32) -> io::Result<()> {
        sys::create_dir_durable(&self.root)?;
        for dir in ["packs", "large", "ingest", "quarantine"] {
            sys::create_dir_durable(&self.root.join(dir))?;
        }
        std::fs::create_dir_all(self.root.join("ingest").join("tmp"))?;
        for shard in 0..shards {
            sys::create_dir_durable(&crate::blobs::shard_dir(&self.root, shard))?;
        }
        // The witness exists from the start, so that updating it never needs a new name.
        let w = self.control_path(Control::Witness);
        if !w.exists() {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&w)?;
            sys::sync_dir(&self.root)?;
        }
        Ok(())
    }

    fn lock(&self, mode: LockMode) -> io::Result<Option<Box<dyn Send + Sync>>> {
        let path = self.root.join("lock");
        let file = match mode {
            LockMode::Exclusive => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
            LockMode::Shared => match File::open(&path) {
                Ok(f) => f,
                // A root no writer ever opened has no lock file to share.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Box::new(()))),
                Err(e) => return Err(e),
            },
        };
        let op = match mode {
            LockMode::Exclusive => rustix::fs::FlockOperation::NonBlockingLockExclusive,
            LockMode::Shared => rustix::fs::FlockOperation::NonBlockingLockShared,
        };
        match rustix::fs::flock(&file, op) {
            Ok(()) => Ok(Some(Box::new(file))),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn meta(&self, which: MetaFile, create: bool, write: bool) -> io::Result<Option<MetaHandle>> {
        let path = self.meta_path(which);
        let existed = path.exists();
        let r = OpenOptions::new()
            .read(true)
            .write(write)
            .create(create && write)
            .truncate(false)
            .open(&path);
        let Some(file) = absent_ok(r)? else {
            return Ok(None);
        };
        if !existed {
            // The new name must survive a crash as surely as what is then committed in it.
            sys::sync_dir(&self.root)?;
        }
        MetaHandle::file(file).map(Some)
    }

    fn meta_len(&self, which: MetaFile) -> io::Result<Option<u64>> {
        Ok(absent_ok(std::fs::metadata(self.meta_path(which)))?.map(|m| m.len()))
    }

    fn remove_meta(&self, which: MetaFile) -> io::Result<()> {
        if absent_ok(std::fs::remove_file(self.meta_path(which)))?.is_some() {
            sys::sync_dir(&self.root)?;
        }
        Ok(())
    }

    fn install_rebuilt_meta(&self) -> io::Result<Option<String>> {
        let main = self.meta_path(MetaFile::Main);
        let rebuilt = self.meta_path(MetaFile::Rebuild);
        File::open(&rebuilt)?.sync_all()?;
        let kept = if main.exists() {
            let name = format!("meta.redb.damaged-{}", sys::now_ms());
            // A second name for the old index; the rename below replaces `meta.redb` in
            // one step, so a crash leaves either index in place, never neither.
            std::fs::hard_link(&main, self.root.join(&name))?;
            Some(name)
        } else {
            None
        };
        std::fs::rename(&rebuilt, &main)?;
        sys::sync_dir(&self.root)?;
        Ok(kept)
    }

    fn read_control(&self, c: Control) -> io::Result<Option<Vec<u8>>> {
        absent_ok(std::fs::read(self.control_path(c)))
    }

    fn write_control(&self, c: Control, bytes: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.control_path(c))?;
        f.write_all_at(bytes, 0)
    }

    fn create(&self, key: &Key) -> io::Result<Arc<dyn Handle>> {
        let path = self.path(key);
        Self::parent_dir(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Arc::new(FileHandle { file }))
    }

    fn open(&self, key: &Key, write: bool) -> io::Result<Arc<dyn Handle>> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(self.path(key))?;
        Ok(Arc::new(FileHandle { file }))
    }

    fn map(&self, key: &Key, len: u64, populate: bool) -> io::Result<Arc<dyn Mapping>> {
        let f = File::open(self.path(key))?;
        // Segments are read a record at a time, large blobs front to back.
        let sequential = !matches!(key, Key::Segment { .. });
        Ok(Arc::new(Map::new(&f, len, sequential, populate)?))
    }

    fn len(&self, key: &Key) -> io::Result<Option<u64>> {
        Ok(absent_ok(std::fs::metadata(self.path(key)))?.map(|m| m.len()))
    }

    fn remove(&self, key: &Key) -> io::Result<bool> {
        Ok(absent_ok(std::fs::remove_file(self.path(key)))?.is_some())
    }

    fn rename(&self, from: &Key, to: &Key, replace: bool) -> io::Result<bool> {
        let (src, dst) = (self.path(from), self.path(to));
        Self::parent_dir(&dst)?;
        if replace {
            std::fs::rename(&src, &dst)?;
            return Ok(true);
        }
        match sys::rename_noreplace(&src, &dst) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sync_names(&self, keys: &[Key]) -> io::Result<()> {
        let dirs: BTreeSet<PathBuf> = keys
            .iter()
            .filter_map(|k| self.path(k).parent().map(Path::to_owned))
            .collect();
        for d in dirs {
            sys::sync_dir(&d)?;
        }
        Ok(())
    }

    fn list(&self, what: &List) -> io::Result<Vec<Listed>> {
        let mut out = Vec::new();
        match what {
            List::Shards => {
                for ent in entries(&self.root.join("packs"))? {
                    if ent.file_type()?.is_dir() {
                        out.push(listed(None, &ent)?);
                    }
                }
            }
            List::Segments(shard) => {
                for ent in entries(&crate::blobs::shard_dir(&self.root, *shard))? {
                    let key = parse_segment_name(*shard, &ent.file_name().to_string_lossy());
                    out.push(listed(key, &ent)?);
                }
            }
            List::Large => {
                for dir in entries(&self.root.join("large"))? {
                    if !dir.file_type()?.is_dir() {
                        continue;
                    }
                    for ent in entries(&dir.path())? {
                        let key = parse_large_name(&ent.file_name().to_string_lossy())
                            // A name filed under another fan-out directory is not that blob's.
                            .filter(|k| self.path(k) == ent.path());
                        out.push(listed(key, &ent)?);
                    }
                }
            }
            List::Uploads => {
                for dir in entries(&self.root.join("ingest"))? {
                    let id = dir.file_name().to_string_lossy().into_owned();
                    if id == "tmp" || !dir.file_type()?.is_dir() {
                        continue;
                    }
                    let mut youngest = age_of(&dir.metadata()?);
                    for ent in entries(&dir.path())? {
                        let part = match ent.file_name().to_str() {
                            Some("data") => Some(UploadPart::Data),
                            Some("state") => Some(UploadPart::State),
                            Some("state.tmp") => Some(UploadPart::StateNew),
                            _ => None,
                        };
                        let l = listed(
                            part.map(|part| Key::Upload {
                                id: id.clone(),
                                part,
                            }),
                            &ent,
                        )?;
                        youngest = match (youngest, l.age) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            _ => None,
                        };
                        out.push(Listed {
                            name: format!("{id}/{}", l.name),
                            ..l
                        });
                    }
                    out.push(Listed {
                        key: None,
                        name: id,
                        age: youngest,
                        len: None,
                    });
                }
            }
            List::Scratch => {
                for ent in entries(&self.root.join("ingest").join("tmp"))? {
                    let key = Key::Scratch(ent.file_name().to_string_lossy().into_owned());
                    out.push(listed(Some(key), &ent)?);
                }
            }
        }
        Ok(out)
    }

    fn remove_upload(&self, id: &str) -> io::Result<()> {
        absent_ok(std::fs::remove_dir_all(self.root.join("ingest").join(id))).map(|_| ())
    }

    fn clear_scratch(&self) -> io::Result<()> {
        let tmp = self.root.join("ingest").join("tmp");
        absent_ok(std::fs::remove_dir_all(&tmp))?;
        // Only scratch lives here: its name need not be durable.
        std::fs::create_dir_all(&tmp)
    }

    fn free_space(&self) -> io::Result<Option<u64>> {
        let st = rustix::fs::statvfs(&self.root)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }

    fn ensure_reserve(&self, bytes: u64) -> io::Result<bool> {
        let path = self.reserve_path();
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Ok(true);
        }
        // Never the last of the space: an eighth of what is free at most, on a small disk.
        let bytes = self.free_space()?.map_or(bytes, |free| bytes.min(free / 8));
        if bytes < MIN_RESERVE {
            return Ok(false);
        }
        let tmp = self.root.join("reserve.tmp");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let r = (|| {
            if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, bytes).is_err() {
                // No fallocate here: real zeros hold the space as well.
                let zeros = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < bytes {
                    let n = (bytes - at).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sys::sync_dir(&self.root)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map(|()| true)
    }

    fn release_reserve(&self) -> io::Result<bool> {
        Ok(absent_ok(std::fs::remove_file(self.reserve_path()))?.is_some())
    }
}
