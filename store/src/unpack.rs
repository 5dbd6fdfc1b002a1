//! Unpacking an image's layers into a root filesystem, safely.
//!
//! This module owns the application of layer tars to a directory: regular files,
//! directories, symlinks, hardlinks, modes, mtimes, ownership (as root), xattrs (where the
//! file system allows), device nodes (as root only), and the OCI whiteouts (`.wh.NAME`
//! deletes NAME from lower layers; `.wh..wh..opq` hides every lower child of its
//! directory). Layers are untrusted input: every file-system call is made relative to an
//! already-open directory with `*at` calls and `O_NOFOLLOW`, so a symlink written by a
//! layer is never followed — a later entry under it replaces it with a directory, as
//! overlayfs shows it — and `..` or absolute paths are refused. Decompression of the next
//! layers runs on other threads while the current one is applied, and each layer's
//! `diff_id` is checked as it streams. The tree is built in a temporary sibling and
//! renamed into place, so a failure leaves no half-made directory.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::format::Kind;
use crate::image;
use crate::store::Store;

/// Choices for [`Store::unpack`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct UnpackOptions {
    /// For an index: `os/arch[/variant]` (default: this machine's, e.g. `linux/amd64`).
    pub platform: Option<String>,
    /// Set from another thread to stop the unpack: it then fails with
    /// [`Error::Interrupted`] and removes the partial tree (checked before every tar
    /// entry; an unpack past its final rename completes).
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What an unpack did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UnpackReport {
    /// The manifest unpacked.
    pub manifest: Option<Digest>,
    /// Layers applied.
    pub layers: usize,
    /// Tar entries applied.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Device nodes skipped (not running as root).
    pub skipped_devices: u64,
    /// Extended attributes the file system refused.
    pub skipped_xattrs: u64,
    /// Wall time in milliseconds.
    pub elapsed_ms: u64,
}

/// This machine's platform in OCI terms.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    };
    format!("linux/{arch}")
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Archive(msg.into())
}

/// Splits an entry path into components, refusing absolute paths and `..`.
fn components(p: &str) -> Result<Vec<String>> {
    if p.starts_with('/') {
        return Err(bad(format!("layer entry {p:?} is an absolute path")));
    }
    let mut out = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad(format!("layer entry {p:?} leaves the root"))),
            c => out.push(c.to_owned()),
        }
    }
    Ok(out)
}

/// Chunks of one layer's decompressed bytes, then the sha256 of all of them.
enum Chunk {
    Data(Vec<u8>),
    Done(std::io::Result<Digest>),
}

/// Decompresses a layer on its own thread, hashing what it produces.
fn spawn_layer(blob: crate::Blob) -> Receiver<Chunk> {
    let (tx, rx) = sync_channel::<Chunk>(8);
    std::thread::spawn(move || {
        let r = produce(&blob, &tx);
        let _ = tx.send(Chunk::Done(r));
    });
    rx
}

fn produce(blob: &[u8], tx: &SyncSender<Chunk>) -> std::io::Result<Digest> {
    let mut reader = image::decompress(blob)?;
    let mut h = Hasher::new(Algorithm::Sha256);
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < buf.len() {
            let m = reader.read(&mut buf[n..])?;
            if m == 0 {
                break;
            }
            n += m;
        }
        if n == 0 {
            return Ok(h.finish());
        }
        buf.truncate(n);
        h.update(&buf);
        if tx.send(Chunk::Data(buf)).is_err() {
            // The consumer gave up (an error elsewhere): stop quietly.
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
    }
}

/// `Read` over a layer's chunks; remembers the producer's digest.
struct LayerReader {
    rx: Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
    done: Option<std::io::Result<Digest>>,
    /// Set once a read returned the end of the stream.
    eof: std::rc::Rc<std::cell::Cell<bool>>,
}

impl Read for LayerReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done.is_some() {
                self.eof.set(true);
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Chunk::Done(r)) => self.done = Some(r),
                Err(_) => self.done = Some(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl LayerReader {
    /// Reads to the end (past the tar's end) and returns the layer's `diff_id`.
    fn finish(&mut self) -> std::io::Result<Digest> {
        std::io::copy(self, &mut std::io::sink())?;
        self.done
            .take()
            .unwrap_or_else(|| Err(std::io::ErrorKind::UnexpectedEof.into()))
    }
}

/// Paths as a tree of components: memory linear in the distinct components, and a
/// lookup costs the path's length (a set of whole paths costs the square of the depth).
#[derive(Default)]
struct Trie {
    /// Node 0 is the root; each node's children by component.
    nodes: Vec<std::collections::HashMap<Box<str>, u32>>,
    /// A directory's mtime, by node (directory entries only).
    times: std::collections::HashMap<u32, i64>,
}

impl Trie {
    fn new() -> Trie {
        Trie {
            nodes: vec![std::collections::HashMap::new()],
            times: std::collections::HashMap::new(),
        }
    }

    fn clear(&mut self) {
        *self = Trie::new();
    }

    /// Adds `path` (and so every prefix of it); returns its node.
    fn insert(&mut self, path: &[String]) -> u32 {
        let mut n = 0u32;
        for c in path {
            let next = self.nodes.len() as u32;
            n = if let Some(&m) = self.nodes[n as usize].get(c.as_str()) {
                m
            } else {
                self.nodes[n as usize].insert(c.as_str().into(), next);
                self.nodes.push(std::collections::HashMap::new());
                next
            };
        }
        n
    }

    fn child(&self, n: u32, name: &str) -> Option<u32> {
        self.nodes[n as usize].get(name).copied()
    }

    /// The node of `path`, if it was inserted (or is a prefix of one that was).
    fn find(&self, path: &[String]) -> Option<u32> {
        path.iter().try_fold(0u32, |n, c| self.child(n, c))
    }
}

/// The tree being built, addressed only through directory file descriptors.
struct Tree {
    root: OwnedFd,
    root_path: PathBuf,
    as_root: bool,
    /// Every directory entry of every layer, with its mtime, applied last (children
    /// change a directory's mtime).
    dirs: Trie,
    /// Paths created by the current layer (an opaque marker spares them).
    this_layer: Trie,
    /// The directory the last entry went into, kept open: archives list a directory's
    /// entries together, so most entries need no walk from the root.
    last_dir: Option<(Vec<String>, OwnedFd)>,
    report: UnpackReport,
}

fn io_at(op: &'static str, path: &[String], e: impl Into<std::io::Error>) -> Error {
    Error::io(op, printable(&path.join("/")), e.into())
}

fn printable(s: &str) -> String {
    crate::verify::printable(s)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Tree {
    /// A fresh descriptor of the root directory.
    fn open_root(&self) -> Result<OwnedFd> {
        rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", &self.root_path, e.into()))
    }

    /// Opens (creating as needed) the directory `dirs` beneath the root without following
    /// any symlink; a non-directory in the way is replaced by a directory.
    fn dir(&mut self, dirs: &[String]) -> Result<OwnedFd> {
        // Start from the last directory when it is on the way.
        let (mut fd, done) = match &self.last_dir {
            Some((p, fd)) if dirs.starts_with(p) => (
                rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| io_at("dup", p, e))?,
                p.len(),
            ),
            _ => (self.open_root()?, 0),
        };
        for (i, c) in dirs.iter().enumerate().skip(done) {
            fd = match rustix::fs::openat(&fd, c.as_str(), DIR_FLAGS, Mode::empty()) {
                Ok(next) => next,
                Err(e) if e == rustix::io::Errno::NOENT => {
                    rustix::fs::mkdirat(&fd, c.as_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| io_at("mkdir", &dirs[..=i], e))?;
                    rustix::fs::openat(&fd, c.as_str(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| io_at("open", &dirs[..=i], e))?
                }
                // A symlink (ELOOP) or a file (ENOTDIR) where a directory must be: replace it.
                Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                    remove_at(&fd, c)?;
                    rustix::fs::mkdirat(&fd, c.as_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| io_at("mkdir", &dirs[..=i], e))?;
                    rustix::fs::openat(&fd, c.as_str(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| io_at("open", &dirs[..=i], e))?
                }
                Err(e) => return Err(io_at("open", &dirs[..=i], e)),
            };
        }
        let keep = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| io_at("dup", dirs, e))?;
        self.last_dir = Some((dirs.to_vec(), keep));
        Ok(fd)
    }

    /// Like [`Tree::dir`], but never creates or replaces anything (for hardlink targets).
    fn existing_dir(&self, dirs: &[String]) -> Result<OwnedFd> {
        let mut fd = self.open_root()?;
        for (i, c) in dirs.iter().enumerate() {
            fd = rustix::fs::openat(&fd, c.as_str(), DIR_FLAGS, Mode::empty()).map_err(|e| {
                bad(format!(
                    "hardlink target directory {} is not a directory inside the root: {e}",
                    printable(&dirs[..=i].join("/"))
                ))
            })?;
        }
        Ok(fd)
    }

    /// Anything removed may be the kept directory or one above it.
    fn forget_last_dir(&mut self) {
        self.last_dir = None;
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw = entry
            .path()
            .map_err(|e| bad(format!("entry path: {}", printable(&e.to_string()))))?;
        let path = components(&raw.to_string_lossy())?;
        let header = entry.header().clone();
        let ty = header.entry_type();
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let mtime = i64::try_from(header.mtime().unwrap_or(0)).unwrap_or(i64::MAX);
        let id = |what: &str, v: std::io::Result<u64>| -> Result<u32> {
            let v = v.unwrap_or(0);
            // u32::MAX is "no change" to chown: an id that large is never a real one.
            u32::try_from(v)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| {
                    bad(format!(
                        "layer entry {} has {what} {v}, larger than a Linux id",
                        printable(&path.join("/"))
                    ))
                })
        };
        let (uid, gid) = (id("uid", header.uid())?, id("gid", header.gid())?);
        let Some((name, dirs)) = path.split_last() else {
            // The layer's `./`: the root's own mode, owner and time (as umoci applies them).
            if ty != tar::EntryType::Directory {
                return Err(bad("a layer's root entry `./` is not a directory"));
            }
            let root = self.open_root()?;
            self.own(&root, uid, gid, &path)?;
            rustix::fs::fchmod(&root, mode).map_err(|e| io_at("chmod", &path, e))?;
            self.xattrs(&mut entry, &root);
            self.dirs.times.insert(0, mtime);
            self.report.entries += 1;
            return Ok(());
        };
        // Whiteouts.
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = self.dir(dirs)?;
            self.forget_last_dir();
            if hidden == ".wh..opq" {
                // Opaque: every lower child goes; what this layer put there stays.
                let node = self.this_layer.find(dirs);
                self.prune(parent, node)?;
            } else {
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(bad(format!(
                        "layer entry {:?} is not a valid whiteout",
                        printable(&path.join("/"))
                    )));
                }
                // A whiteout hides lower layers only, never its own layer's entries.
                let mut p = dirs.to_vec();
                p.push(hidden.to_owned());
                match self.this_layer.find(&p) {
                    Some(node) => {
                        if let Ok(sub) =
                            rustix::fs::openat(&parent, hidden, DIR_FLAGS, Mode::empty())
                        {
                            self.prune(sub, Some(node))?;
                        }
                    }
                    None => remove_at(&parent, hidden)?,
                }
            }
            self.report.entries += 1;
            return Ok(());
        }
        let parent = self.dir(dirs)?;
        let exists = rustix::fs::statat(&parent, name.as_str(), AtFlags::SYMLINK_NOFOLLOW).ok();
        let is_dir = |st: &rustix::fs::Stat| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        };
        // Replacing what is there may remove a directory below the kept one.
        if exists.is_some() {
            self.forget_last_dir();
        }
        match ty {
            tar::EntryType::Directory => {
                match &exists {
                    Some(st) if is_dir(st) => {}
                    Some(_) => {
                        remove_at(&parent, name)?;
                        mkdir(&parent, name, &path)?;
                    }
                    None => mkdir(&parent, name, &path)?,
                }
                let fd = rustix::fs::openat(&parent, name.as_str(), DIR_FLAGS, Mode::empty())
                    .map_err(|e| io_at("open", &path, e))?;
                self.own(&fd, uid, gid, &path)?;
                rustix::fs::fchmod(&fd, mode).map_err(|e| io_at("chmod", &path, e))?;
                self.xattrs(&mut entry, &fd);
                let node = self.dirs.insert(&path);
                self.dirs.times.insert(node, mtime);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if exists.is_some() {
                    remove_at(&parent, name)?;
                }
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_at("create", &path, e))?;
                let mut f = std::fs::File::from(fd);
                let n = std::io::copy(&mut entry, &mut f).map_err(|e| io_at("write", &path, e))?;
                let want = header.entry_size().unwrap_or(0);
                if n != want {
                    // The layer ends inside this file: it would be silently short.
                    return Err(bad(format!(
                        "layer entry {} is cut short: {n} of its {want} bytes",
                        printable(&path.join("/"))
                    )));
                }
                self.report.bytes += n;
                self.own(&f, uid, gid, &path)?;
                rustix::fs::fchmod(&f, mode).map_err(|e| io_at("chmod", &path, e))?;
                self.xattrs(&mut entry, &f);
                set_mtime(&f, mtime, &path)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("symlink target: {}", printable(&e.to_string()))))?
                    .ok_or_else(|| {
                        bad(format!(
                            "symlink {} has no target",
                            printable(&path.join("/"))
                        ))
                    })?;
                if exists.is_some() {
                    remove_at(&parent, name)?;
                }
                // Stored as written: it is never followed while unpacking.
                rustix::fs::symlinkat(target.as_os_str(), &parent, name.as_str())
                    .map_err(|e| io_at("symlink", &path, e))?;
                // Times of a symlink are best effort (some file systems refuse).
                let _ = self.own_at(&parent, name, uid, gid, mtime, &path);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("hardlink target: {}", printable(&e.to_string()))))?
                    .ok_or_else(|| {
                        bad(format!(
                            "hardlink {} has no target",
                            printable(&path.join("/"))
                        ))
                    })?;
                let tpath = components(&target.to_string_lossy())?;
                if tpath == path {
                    // GNU tar and umoci refuse it too: the file would silently be absent.
                    return Err(bad(format!(
                        "hardlink {} points at itself",
                        printable(&path.join("/"))
                    )));
                }
                let Some((tname, tdirs)) = tpath.split_last() else {
                    return Err(bad(format!(
                        "hardlink {} points at the root",
                        printable(&path.join("/"))
                    )));
                };
                let tparent = self.existing_dir(tdirs)?;
                if exists.is_some() {
                    remove_at(&parent, name)?;
                }
                rustix::fs::linkat(
                    &tparent,
                    tname.as_str(),
                    &parent,
                    name.as_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| io_at("link", &path, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match ty {
                    tar::EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    tar::EntryType::Block => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                if ft != rustix::fs::FileType::Fifo && !self.as_root {
                    self.report.skipped_devices += 1;
                    return Ok(());
                }
                if exists.is_some() {
                    remove_at(&parent, name)?;
                }
                let dev = rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                rustix::fs::mknodat(&parent, name.as_str(), ft, mode, dev)
                    .map_err(|e| io_at("mknod", &path, e))?;
                // mknod applies the umask: set the entry's mode, owner and times exactly.
                rustix::fs::chmodat(&parent, name.as_str(), mode, AtFlags::empty())
                    .map_err(|e| io_at("chmod", &path, e))?;
                self.own_at(&parent, name, uid, gid, mtime, &path)?;
            }
            // PAX and GNU metadata entries are consumed by the tar reader; others are
            // ignored as Docker ignores them.
            _ => return Ok(()),
        }
        // The entry and its implied parent directories are this layer's.
        self.this_layer.insert(&path);
        self.report.entries += 1;
        Ok(())
    }

    /// Removes everything beneath the directory `dir` that the layer node `keep` (and its
    /// descendants) does not name; with `keep` `None`, everything. Directories the layer
    /// (re)sent are pruned the same way inside. Iterative, holding one directory open at a
    /// time (a tree of any depth costs neither stack nor file descriptors).
    fn prune(&self, dir: OwnedFd, keep: Option<u32>) -> Result<()> {
        prune_tree(dir, keep, Some(&self.this_layer))
    }

    /// Owner (as root) and times of `name` in `parent`, without following it.
    fn own_at(
        &self,
        parent: &OwnedFd,
        name: &str,
        uid: u32,
        gid: u32,
        mtime: i64,
        path: &[String],
    ) -> Result<()> {
        if self.as_root {
            rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at("chown", path, e))?;
        }
        let t = Timestamps {
            last_access: ts(mtime),
            last_modification: ts(mtime),
        };
        rustix::fs::utimensat(parent, name, &t, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_at("set times", path, e))
    }

    fn own(&self, fd: &impl AsFd, uid: u32, gid: u32, path: &[String]) -> Result<()> {
        if self.as_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| io_at("chown", path, e))?;
        }
        Ok(())
    }

    fn xattrs<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, fd: &impl AsFd) {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                && rustix::fs::fsetxattr(
                    fd,
                    name,
                    ext.value_bytes(),
                    rustix::fs::XattrFlags::empty(),
                )
                .is_err()
            {
                self.report.skipped_xattrs += 1;
            }
        }
    }

    /// Sets every directory's recorded mtime, children before parents, walking the
    /// recorded directories down from the root with one descriptor open at a time.
    fn set_dir_times(&self) -> Result<()> {
        // (node, fd, children left to visit)
        let mut cur = self.open_root()?;
        let mut stack: Vec<(u32, Children)> = vec![(0, children_of(&self.dirs, 0))];
        loop {
            let Some((node, todo)) = stack.last_mut() else {
                return Ok(());
            };
            if let Some((name, child)) = todo.pop() {
                // Removed or replaced by a later layer: nothing to set below it.
                if let Ok(next) = rustix::fs::openat(&cur, &*name, DIR_FLAGS, Mode::empty()) {
                    cur = next;
                    stack.push((child, children_of(&self.dirs, child)));
                }
                continue;
            }
            let node = *node;
            if let Some(&t) = self.dirs.times.get(&node) {
                set_mtime(&cur, t, &[])?;
            }
            stack.pop();
            if stack.is_empty() {
                return Ok(());
            }
            cur = rustix::fs::openat(
                &cur,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io("open", &self.root_path, e.into()))?;
        }
    }
}

/// A trie node's children: (component, node).
type Children = Vec<(Box<str>, u32)>;

fn children_of(t: &Trie, n: u32) -> Children {
    t.nodes[n as usize]
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn ts(secs: i64) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    }
}

fn set_mtime(fd: &impl AsFd, mtime: i64, path: &[String]) -> Result<()> {
    let t = Timestamps {
        last_access: ts(mtime),
        last_modification: ts(mtime),
    };
    rustix::fs::futimens(fd, &t).map_err(|e| io_at("set times", path, e))
}

fn mkdir(parent: &OwnedFd, name: &str, path: &[String]) -> Result<()> {
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755))
        .map_err(|e| io_at("mkdir", path, e))
}

/// The names in a directory, without `.` and `..`.
fn names_in(dir: &OwnedFd) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for ent in
        rustix::fs::Dir::read_from(dir).map_err(|e| Error::io("list", "directory", e.into()))?
    {
        let ent = ent.map_err(|e| Error::io("list", "directory", e.into()))?;
        let n = ent.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            names.push(n);
        }
    }
    Ok(names)
}

/// Removes everything beneath `dir` except what the node `keep` of `layer` names (all of
/// it when `keep` is `None`), descending into kept directories to prune them the same way.
/// Iterative: directories are entered with `openat(child, O_NOFOLLOW)` and left with
/// `openat("..")`, so one descriptor is open at a time and the stack is the heap's.
fn prune_tree(dir: OwnedFd, keep: Option<u32>, layer: Option<&Trie>) -> Result<()> {
    struct Level {
        /// The directory's name in its parent, and whether to remove it once emptied.
        name: String,
        remove: bool,
        /// Subdirectories still to visit: (name, node to keep in it, remove it after).
        todo: Vec<(String, Option<u32>, bool)>,
    }
    // Removing a whole tree (nothing kept): each directory is made writable first, so
    // that a layer's read-only directory does not keep its entries (and the tree) alive.
    let whole = keep.is_none() && layer.is_none();
    let enter = |fd: &OwnedFd, keep: Option<u32>| -> Result<Vec<(String, Option<u32>, bool)>> {
        if whole {
            let _ = rustix::fs::fchmod(fd, Mode::from_raw_mode(0o700));
        }
        let mut todo = Vec::new();
        for n in names_in(fd)? {
            let kept = keep.and_then(|k| layer.and_then(|t| t.child(k, &n)));
            if let Some(node) = kept {
                if rustix::fs::statat(fd, n.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                }) {
                    todo.push((n, Some(node), false));
                }
                continue;
            }
            match rustix::fs::unlinkat(fd, n.as_str(), AtFlags::empty()) {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::NOENT => {}
                Err(e) if e == rustix::io::Errno::ISDIR || e == rustix::io::Errno::PERM => {
                    todo.push((n, None, true));
                }
                Err(e) => return Err(Error::io("remove", printable(&n), e.into())),
            }
        }
        Ok(todo)
    };
    let mut cur = dir;
    let mut stack = vec![Level {
        name: String::new(),
        remove: false,
        todo: enter(&cur, keep)?,
    }];
    loop {
        let top = stack.last_mut().expect("a level");
        if let Some((name, node, remove)) = top.todo.pop() {
            if whole {
                // (A directory without read permission cannot be opened to fix it.)
                let _ = rustix::fs::chmodat(
                    &cur,
                    name.as_str(),
                    Mode::from_raw_mode(0o700),
                    AtFlags::empty(),
                );
            }
            match rustix::fs::openat(&cur, name.as_str(), DIR_FLAGS, Mode::empty()) {
                Ok(next) => {
                    cur = next;
                    let todo = enter(&cur, node)?;
                    stack.push(Level { name, remove, todo });
                }
                // Gone, or no longer a directory: nothing beneath it to prune.
                Err(e)
                    if e == rustix::io::Errno::NOENT
                        || e == rustix::io::Errno::NOTDIR
                        || e == rustix::io::Errno::LOOP => {}
                Err(e) => return Err(Error::io("open", printable(&name), e.into())),
            }
            continue;
        }
        let done = stack.pop().expect("a level");
        if stack.is_empty() {
            return Ok(());
        }
        cur = rustix::fs::openat(
            &cur,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", "..", e.into()))?;
        if done.remove {
            rustix::fs::unlinkat(&cur, done.name.as_str(), AtFlags::REMOVEDIR)
                .map_err(|e| Error::io("remove", printable(&done.name), e.into()))?;
        }
    }
}

/// Removes `name` in `dir` (everything beneath it, for a directory) without following
/// symlinks.
fn remove_at(dir: &OwnedFd, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(bad(format!("refusing to remove {:?}", printable(name))));
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
        Err(e) if e == rustix::io::Errno::ISDIR || e == rustix::io::Errno::PERM => {}
        Err(e) => return Err(Error::io("remove", printable(name), e.into())),
    }
    let sub = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
        .map_err(|e| Error::io("open", printable(name), e.into()))?;
    prune_tree(sub, None, None)?;
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        .map_err(|e| Error::io("remove", printable(name), e.into()))
}

/// Removes a whole directory tree at `path` (a failed unpack's temporary directory):
/// iteratively, whatever its depth.
fn remove_tree(path: &Path) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} names no directory", path.display())))?;
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open", parent, e.into()))?;
    remove_at(&dir, &name.to_string_lossy())
}

impl Store {
    /// Unpacks the image `reference` (a name or digest; an index picks `opts.platform`)
    /// into `dir`, which must not exist. See the module documentation for the rules.
    #[tracing::instrument(level = "info", skip(self, opts), fields(dir = %dir.display()))]
    pub fn unpack(
        &self,
        reference: &str,
        dir: &Path,
        opts: &UnpackOptions,
    ) -> Result<UnpackReport> {
        // Temporary trees are unique per unpack, also within one process (an embedder
        // serving many).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let start = Instant::now();
        if dir.symlink_metadata().is_ok() {
            return Err(Error::Invalid(format!("{} already exists", dir.display())));
        }
        let mut d = self.resolve(reference)?;
        let mut parsed = image::parse(&self.get(&d)?)?;
        // An index may name indexes: descend (a bounded number of levels) to a manifest.
        let want = opts.platform.clone().unwrap_or_else(host_platform);
        let mut levels = 0;
        while parsed.kind == Kind::Index {
            levels += 1;
            if levels > MAX_INDEX_DEPTH {
                return Err(bad(format!(
                    "{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep"
                )));
            }
            let pick = parsed
                .children
                .iter()
                .find(|c| c.kind == Kind::Manifest && c.platform.as_deref() == Some(want.as_str()))
                .or_else(|| {
                    parsed.children.iter().find(|c| {
                        c.kind == Kind::Manifest
                            && c.platform
                                .as_deref()
                                .is_some_and(|p| p.starts_with(&format!("{want}/")))
                    })
                })
                // A nested index (by media type), whatever its platform, is looked into.
                .or_else(|| parsed.children.iter().find(|c| c.kind == Kind::Index))
                .ok_or_else(|| {
                    let have: Vec<String> = parsed
                        .children
                        .iter()
                        .filter_map(|c| c.platform.clone())
                        .collect();
                    Error::Invalid(format!(
                        "{reference} has no manifest for {want} (it has: {})",
                        have.join(", ")
                    ))
                })?;
            d = pick.digest;
            parsed = image::parse(&self.get(&d)?)?;
        }
        let config = parsed
            .config()
            .ok_or_else(|| bad(format!("{d} has no config")))?;
        let info = image::parse_config(&self.get(&config.digest)?)?;
        let layers = parsed.layers().to_vec();
        if layers.len() > MAX_LAYERS {
            return Err(bad(format!(
                "{d} has {} layers; at most {MAX_LAYERS} are unpacked",
                layers.len()
            )));
        }
        if info.diff_ids.len() != layers.len() {
            return Err(bad(format!(
                "{d} has {} layers, but its config lists {} diff_ids",
                layers.len(),
                info.diff_ids.len()
            )));
        }
        let blobs: Vec<crate::Blob> = layers
            .iter()
            .map(|l| self.get(&l.digest))
            .collect::<Result<_>>()?;

        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let leaf = dir
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} names no directory", dir.display())))?;
        let tmp = parent.join(format!(
            ".{}.unpack-{}-{}",
            leaf.to_string_lossy(),
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir(&tmp).ctx("create directory", &tmp)?;
        let r = unpack_into(&tmp, &blobs, &info.diff_ids, d, opts.interrupt.as_ref());
        match r {
            Ok(mut report) => {
                crate::sys::rename_noreplace(&tmp, dir).map_err(|e| {
                    let _ = remove_tree(&tmp);
                    Error::io("rename", dir, e)
                })?;
                report.elapsed_ms = start.elapsed().as_millis() as u64;
                Ok(report)
            }
            Err(e) => {
                let _ = remove_tree(&tmp);
                Err(e)
            }
        }
    }
}

/// Layers decompressed ahead of the one being applied.
const AHEAD: usize = 2;
/// Images of more layers are refused (Docker's overlay driver takes 128; every layer costs
/// a pass and a thread here).
const MAX_LAYERS: usize = 4096;
/// Indexes nested deeper than this are refused (a cycle would be endless).
const MAX_INDEX_DEPTH: usize = 8;

/// Applies the layers into the (new, empty) directory `tmp`.
fn unpack_into(
    tmp: &Path,
    blobs: &[crate::Blob],
    diff_ids: &[String],
    manifest: Digest,
    interrupt: Option<&std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Result<UnpackReport> {
    let root = rustix::fs::open(
        tmp,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open", tmp, e.into()))?;
    rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755))
        .map_err(|e| Error::io("chmod", tmp, e.into()))?;
    let mut tree = Tree {
        root,
        root_path: tmp.to_owned(),
        as_root: rustix::process::geteuid().is_root(),
        dirs: Trie::new(),
        this_layer: Trie::new(),
        last_dir: None,
        report: UnpackReport {
            manifest: Some(manifest),
            ..UnpackReport::default()
        },
    };
    // Decompress up to AHEAD layers ahead of the one being applied.
    let mut pending: std::collections::VecDeque<Receiver<Chunk>> = blobs
        .iter()
        .take(AHEAD + 1)
        .map(|b| spawn_layer(b.clone()))
        .collect();
    for (i, want) in diff_ids.iter().enumerate() {
        let rx = pending.pop_front().expect("a producer per layer");
        if let Some(b) = blobs.get(i + AHEAD + 1) {
            pending.push_back(spawn_layer(b.clone()));
        }
        let eof = std::rc::Rc::new(std::cell::Cell::new(false));
        let mut reader = LayerReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: None,
            eof: eof.clone(),
        };
        tree.this_layer.clear();
        {
            let mut ar = tar::Archive::new(&mut reader);
            let entries = ar
                .entries()
                .map_err(|e| bad(format!("layer {i}: {}", printable(&e.to_string()))))?;
            for entry in entries {
                crate::store::check_interrupt(interrupt)?;
                match entry {
                    Ok(e) => tree.apply(e)?,
                    // Real tools write layers without the end-of-archive trailer (or its
                    // final padding); containerd and Docker accept them, and so do we —
                    // only when the stream really ended there.
                    Err(_) if eof.get() => break,
                    Err(e) => {
                        return Err(bad(format!("layer {i}: {}", printable(&e.to_string()))));
                    }
                }
            }
        }
        let got = reader.finish().map_err(|e| {
            bad(format!(
                "layer {i} does not decompress: {}",
                printable(&e.to_string())
            ))
        })?;
        if got.to_string() != *want {
            return Err(bad(format!(
                "layer {i} decompresses to {got}, but the config lists diff_id {want}"
            )));
        }
        tree.report.layers += 1;
    }
    // Directory times last, children first (creating children changed them).
    tree.set_dir_times()?;
    Ok(tree.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components("./a//b/").unwrap(), vec!["a", "b"]);
        assert!(components("/etc/passwd").is_err());
        assert!(components("a/../../b").is_err());
        assert!(components("..").is_err());
        assert!(components("").unwrap().is_empty());
    }

    #[test]
    fn host_platform_is_linux() {
        assert!(host_platform().starts_with("linux/"));
    }
}
