//! The simulated backend: a store's files in memory, for tests of what a power loss, a
//! full disk or a failing device does to the store.
//!
//! It owns a tiny file system with the durability rules the local backend relies on
//! (docs/FORMAT.md §15): an object's bytes are durable after its handle's `sync`, a name
//! (creation, rename, removal) after `sync_names` of its directory, and a rename is atomic
//! (both of its directories become durable together). Everything else may or may not
//! survive a crash, and a write that was not synced may be torn (any subset of its
//! 512-byte sectors lands, nothing outside it changes — redb's own assumption). Every sync
//! is numbered; [`SimBackend::on_sync`] hands a test the image a power loss right after
//! that sync would leave, as a fresh backend to reopen. [`SimBackend::inject`] makes
//! chosen operations fail with an errno (ENOSPC, EMFILE, EIO), [`SimBackend::set_capacity`]
//! gives the disk a size, and [`SimBackend::hook`] runs code at a chosen operation, so a
//! race can be made to happen deterministically. It must never be used for real data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    Backend, Control, Dir, Handle, Key, List, Listed, LockMode, Mapping, MetaFile, MetaHandle,
    MetaStorage, UploadPart,
};

/// The operations a fault or a hook can be attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// [`Backend::create`].
    Create,
    /// [`Backend::open`].
    Open,
    /// [`Handle::read_at`] and [`Backend::map`].
    Read,
    /// [`Handle::write_at`] and [`Handle::set_len`].
    Write,
    /// [`Handle::sync`].
    Sync,
    /// [`Backend::rename`].
    Rename,
    /// [`Backend::remove`] and [`Backend::remove_upload`].
    Remove,
    /// [`Backend::sync_names`].
    SyncNames,
    /// Reads of the metadata database.
    MetaRead,
    /// Writes (and length changes) of the metadata database.
    MetaWrite,
    /// Syncs of the metadata database.
    MetaSync,
}

/// Which objects a fault or hook applies to.
pub type KeyFilter = Arc<dyn Fn(Option<&Key>) -> bool + Send + Sync>;

/// An injected failure: the matching operations after the first `skip` fail `times` times
/// with `errno`.
#[derive(Clone)]
pub struct Fault {
    /// The operation.
    pub op: SimOp,
    /// Only objects this accepts (`None` is the metadata database); every object if unset.
    pub filter: Option<KeyFilter>,
    /// Matching operations that still succeed first.
    pub skip: u64,
    /// How many then fail (`u64::MAX`: all).
    pub times: u64,
    /// The error (`libc` errno: 28 ENOSPC, 24 EMFILE, 5 EIO).
    pub errno: i32,
}

impl Fault {
    /// Fails every `op` after the first `skip` with `errno`.
    pub fn after(op: SimOp, skip: u64, errno: i32) -> Fault {
        Fault {
            op,
            filter: None,
            skip,
            times: u64::MAX,
            errno,
        }
    }

    /// Fails only the one `op` after the first `skip`.
    pub fn once(op: SimOp, skip: u64, errno: i32) -> Fault {
        Fault {
            times: 1,
            ..Fault::after(op, skip, errno)
        }
    }

    /// Restricts the fault to objects `f` accepts.
    #[must_use]
    pub fn only(mut self, f: impl Fn(Option<&Key>) -> bool + Send + Sync + 'static) -> Fault {
        self.filter = Some(Arc::new(f));
        self
    }
}

/// ENOSPC.
pub const ENOSPC: i32 = 28;
/// EMFILE.
pub const EMFILE: i32 = 24;
/// EIO.
pub const EIO: i32 = 5;

/// A file name of the simulated root.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Key(Key),
    Meta(MetaFile),
    Root(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum SimDir {
    Key(Dir),
    Root,
}

impl Name {
    fn dir(&self) -> SimDir {
        match self {
            Name::Key(k) => SimDir::Key(k.dir()),
            Name::Meta(_) | Name::Root(_) => SimDir::Root,
        }
    }
}

#[derive(Clone, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges written since the last sync (what a crash may tear).
    pending: Vec<(u64, u64)>,
    /// Volatile names and open handles: while either is non-zero, the bytes count against
    /// the capacity.
    links: usize,
    handles: usize,
    /// Names in the durable namespace (the inode is kept for the crash image).
    durable_links: usize,
    mtime: u64,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    names: BTreeMap<Name, u64>,
    durable: BTreeMap<Name, u64>,
    /// Directories whose names changed since their last sync.
    dirty: BTreeSet<SimDir>,
    /// Pending renames across directories: such directories become durable together.
    coupled: Vec<(SimDir, SimDir)>,
    control: HashMap<ControlKey, Vec<u8>>,
    durable_control: HashMap<ControlKey, Vec<u8>>,
    shards: u32,
    reserve: u64,
    capacity: Option<u64>,
    syncs: u64,
    clock_ms: u64,
    faults: Vec<Fault>,
    counts: HashMap<SimOp, u64>,
    lock: Option<LockMode>,
    readers: usize,
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ControlKey {
    Witness,
}

fn control_key(c: Control) -> ControlKey {
    match c {
        Control::Witness => ControlKey::Witness,
    }
}

type SyncHook = (
    Box<dyn Fn(u64) -> bool + Send>,
    Box<dyn FnMut(u64, SimBackend) + Send>,
);
type OpHook = Box<dyn FnMut(Option<&Key>) -> bool + Send>;

struct Fs {
    state: Mutex<State>,
    hooks: Mutex<Vec<(SimOp, OpHook)>>,
    on_sync: Mutex<Option<SyncHook>>,
}

/// A simulated store root, in memory. Clones share it.
#[derive(Clone)]
pub struct SimBackend {
    fs: Arc<Fs>,
}

impl fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimBackend({} syncs)", self.syncs())
    }
}

impl Default for SimBackend {
    fn default() -> Self {
        SimBackend::new()
    }
}

/// splitmix64: a deterministic generator for crash images (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

const SECTOR: u64 = 512;

impl State {
    fn fault(&mut self, op: SimOp, key: Option<&Key>) -> io::Result<()> {
        *self.counts.entry(op).or_default() += 1;
        for f in &mut self.faults {
            if f.op != op || f.times == 0 || !f.filter.as_ref().is_none_or(|p| p(key)) {
                continue;
            }
            if f.skip > 0 {
                f.skip -= 1;
                continue;
            }
            f.times -= 1;
            return Err(io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }

    fn used(&self) -> u64 {
        self.inodes
            .values()
            .filter(|i| i.links > 0 || i.handles > 0)
            .map(|i| i.data.len() as u64)
            .sum::<u64>()
            + self.reserve
    }

    fn room_for(&self, ino: u64, new_len: u64) -> io::Result<()> {
        let Some(cap) = self.capacity else {
            return Ok(());
        };
        let old = self.inodes.get(&ino).map_or(0, |i| i.data.len() as u64);
        if new_len > old && self.used() + (new_len - old) > cap {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(())
    }

    fn new_inode(&mut self) -> u64 {
        self.next_ino += 1;
        let ino = self.next_ino;
        self.inodes.insert(
            ino,
            Inode {
                mtime: self.clock_ms,
                ..Inode::default()
            },
        );
        ino
    }

    fn gc_inode(&mut self, ino: u64) {
        if self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.links == 0 && i.handles == 0 && i.durable_links == 0)
        {
            self.inodes.remove(&ino);
        }
    }

    fn link(&mut self, name: Name, ino: u64) -> Option<u64> {
        self.dirty.insert(name.dir());
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.links += 1;
        }
        let old = self.names.insert(name, ino);
        if let Some(o) = old {
            self.unlink_ino(o);
        }
        old
    }

    fn unlink(&mut self, name: &Name) -> Option<u64> {
        let ino = self.names.remove(name)?;
        self.dirty.insert(name.dir());
        self.unlink_ino(ino);
        Some(ino)
    }

    fn unlink_ino(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.links -= 1;
        }
        self.gc_inode(ino);
    }

    /// The directories that must become durable with `dirs` (renames across them).
    fn closure(&self, dirs: &BTreeSet<SimDir>) -> BTreeSet<SimDir> {
        let mut out = dirs.clone();
        loop {
            let before = out.len();
            for (a, b) in &self.coupled {
                if out.contains(a) || out.contains(b) {
                    out.insert(a.clone());
                    out.insert(b.clone());
                }
            }
            if out.len() == before {
                return out;
            }
        }
    }

    /// Makes the volatile names of `dirs` durable.
    fn persist_dirs(&mut self, dirs: &BTreeSet<SimDir>) {
        let dirs = self.closure(dirs);
        let gone: Vec<Name> = self
            .durable
            .keys()
            .filter(|n| dirs.contains(&n.dir()))
            .cloned()
            .collect();
        for n in gone {
            if let Some(ino) = self.durable.remove(&n)
                && let Some(i) = self.inodes.get_mut(&ino)
            {
                i.durable_links -= 1;
            }
        }
        let now: Vec<(Name, u64)> = self
            .names
            .iter()
            .filter(|(n, _)| dirs.contains(&n.dir()))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (n, ino) in now {
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.durable_links += 1;
            }
            self.durable.insert(n, ino);
        }
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            self.gc_inode(ino);
        }
        for d in &dirs {
            self.dirty.remove(d);
        }
        self.coupled
            .retain(|(a, b)| !dirs.contains(a) && !dirs.contains(b));
    }

    fn sync_inode(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.durable.clone_from(&i.data);
            i.pending.clear();
        }
        self.syncs += 1;
    }

    /// The state a power loss now would leave: durable names and bytes, and, at random,
    /// some of what was not yet synced (directories whole, file writes by sectors).
    fn crash_image(&self, seed: u64) -> State {
        let mut rng = Rng(seed ^ self.syncs.wrapping_mul(0x2545_F491_4F6C_DD1D));
        // Unsynced directory changes: each group of coupled directories lands or not.
        let mut landed: BTreeSet<SimDir> = BTreeSet::new();
        for d in &self.dirty {
            if landed.contains(d) {
                continue;
            }
            let group = self.closure(&std::iter::once(d.clone()).collect());
            if rng.coin() {
                landed.extend(group);
            }
        }
        let mut names: BTreeMap<Name, u64> = self
            .durable
            .iter()
            .filter(|(n, _)| !landed.contains(&n.dir()))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (n, i) in &self.names {
            if landed.contains(&n.dir()) {
                names.insert(n.clone(), *i);
            }
        }
        let mut inodes = HashMap::new();
        for ino in names.values() {
            if inodes.contains_key(ino) {
                continue;
            }
            let i = &self.inodes[ino];
            let mut img = i.durable.clone();
            if img.len() != i.data.len() && rng.coin() {
                img.resize(i.data.len(), 0);
            }
            for &(off, len) in &i.pending {
                match rng.below(3) {
                    0 => {}
                    fate => {
                        let end = (off + len).min(img.len() as u64);
                        let mut s = off;
                        while s < end {
                            let e = ((s / SECTOR + 1) * SECTOR).min(end);
                            if fate == 1 || rng.coin() {
                                let (a, b) = (s as usize, e as usize);
                                let src = &i.data[a.min(i.data.len())..b.min(i.data.len())];
                                img[a..a + src.len()].copy_from_slice(src);
                            }
                            s = e;
                        }
                    }
                }
            }
            inodes.insert(
                *ino,
                Inode {
                    durable: img.clone(),
                    data: img,
                    pending: Vec::new(),
                    links: 0,
                    handles: 0,
                    durable_links: 0,
                    mtime: i.mtime,
                },
            );
        }
        for ino in names.values() {
            let i = inodes.get_mut(ino).expect("inode of a name");
            i.links += 1;
            i.durable_links += 1;
        }
        let mut control = self.durable_control.clone();
        for (k, v) in &self.control {
            if rng.coin() {
                control.insert(*k, v.clone());
            }
        }
        State {
            inodes,
            next_ino: self.next_ino,
            durable: names.clone(),
            names,
            durable_control: control.clone(),
            control,
            shards: self.shards,
            capacity: self.capacity,
            clock_ms: self.clock_ms,
            seed: self.seed.wrapping_add(1),
            ..State::default()
        }
    }
}

struct SimHandle {
    fs: Arc<Fs>,
    ino: u64,
    key: Option<Key>,
    write: bool,
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let mut s = lock(&self.fs.state);
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            i.handles -= 1;
        }
        s.gc_inode(self.ino);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bad_fd() -> io::Error {
    io::Error::from_raw_os_error(9) // EBADF: not open for writing
}

impl SimHandle {
    fn write_op(&self, offset: u64, data: &[&[u8]], op: SimOp) -> io::Result<usize> {
        if !self.write {
            return Err(bad_fd());
        }
        run_hooks(&self.fs, op, self.key.as_ref());
        let mut s = lock(&self.fs.state);
        s.fault(op, self.key.as_ref())?;
        let total: usize = data.iter().map(|b| b.len()).sum();
        let end = offset + total as u64;
        let cur = s.inodes[&self.ino].data.len() as u64;
        s.room_for(self.ino, end.max(cur))?;
        let clock = s.clock_ms;
        let i = s.inodes.get_mut(&self.ino).expect("open inode");
        if i.data.len() < end as usize {
            i.data.resize(end as usize, 0);
        }
        let mut at = offset as usize;
        for b in data {
            i.data[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        if total > 0 {
            i.pending.push((offset, total as u64));
        }
        i.mtime = clock;
        Ok(total)
    }
}

fn run_hooks(fs: &Fs, op: SimOp, key: Option<&Key>) {
    let mut hooks = std::mem::take(&mut *lock(&fs.hooks));
    hooks.retain_mut(|(o, f)| *o != op || f(key));
    lock(&fs.hooks).extend(hooks);
}

fn after_sync(fs: &Arc<Fs>) {
    let mut guard = lock(&fs.on_sync);
    if let Some((want, f)) = guard.as_mut() {
        let image = {
            let s = lock(&fs.state);
            want(s.syncs).then(|| (s.syncs, s.crash_image(s.seed)))
        };
        if let Some((n, image)) = image {
            f(n, SimBackend::from_state(image));
        }
    }
}

impl Handle for SimHandle {
    fn write_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.write_op(offset, &slices, SimOp::Write)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        run_hooks(&self.fs, SimOp::Read, self.key.as_ref());
        let mut s = lock(&self.fs.state);
        s.fault(SimOp::Read, self.key.as_ref())?;
        let d = &s.inodes[&self.ino].data;
        let (a, b) = (offset as usize, offset as usize + buf.len());
        if b > d.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d[a..b]);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        run_hooks(&self.fs, SimOp::Sync, self.key.as_ref());
        {
            let mut s = lock(&self.fs.state);
            s.fault(SimOp::Sync, self.key.as_ref())?;
            s.sync_inode(self.ino);
        }
        after_sync(&self.fs);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.fs.state).inodes[&self.ino].data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.write {
            return Err(bad_fd());
        }
        run_hooks(&self.fs, SimOp::Write, self.key.as_ref());
        let mut s = lock(&self.fs.state);
        s.fault(SimOp::Write, self.key.as_ref())?;
        s.room_for(self.ino, len)?;
        let i = s.inodes.get_mut(&self.ino).expect("open inode");
        i.data.resize(len as usize, 0);
        i.pending.retain(|(o, _)| *o < len);
        Ok(())
    }
}

struct SimMap(Vec<u8>);

impl Mapping for SimMap {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug)]
struct SimMeta {
    fs: Arc<Fs>,
    ino: u64,
}

impl fmt::Debug for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fs")
    }
}

impl Drop for SimMeta {
    fn drop(&mut self) {
        let mut s = lock(&self.fs.state);
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            i.handles -= 1;
        }
        s.gc_inode(self.ino);
    }
}

impl MetaStorage for SimMeta {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.fs.state).inodes[&self.ino].data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut s = lock(&self.fs.state);
        s.fault(SimOp::MetaRead, None)?;
        let d = &s.inodes[&self.ino].data;
        let (a, b) = (offset as usize, offset as usize + out.len());
        if b > d.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.copy_from_slice(&d[a..b]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = lock(&self.fs.state);
        s.fault(SimOp::MetaWrite, None)?;
        s.room_for(self.ino, len)?;
        let i = s.inodes.get_mut(&self.ino).expect("meta inode");
        if len > i.data.len() as u64 {
            let old = i.data.len() as u64;
            i.pending.push((old, len - old));
        }
        i.data.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        run_hooks(&self.fs, SimOp::MetaSync, None);
        {
            let mut s = lock(&self.fs.state);
            s.fault(SimOp::MetaSync, None)?;
            s.sync_inode(self.ino);
        }
        after_sync(&self.fs);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = lock(&self.fs.state);
        s.fault(SimOp::MetaWrite, None)?;
        let end = offset + data.len() as u64;
        let cur = s.inodes[&self.ino].data.len() as u64;
        s.room_for(self.ino, end.max(cur))?;
        let i = s.inodes.get_mut(&self.ino).expect("meta inode");
        if i.data.len() < end as usize {
            i.data.resize(end as usize, 0);
        }
        i.data[offset as usize..end as usize].copy_from_slice(data);
        i.pending.push((offset, data.len() as u64));
        Ok(())
    }
}

struct SimLock {
    fs: Arc<Fs>,
    mode: LockMode,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut s = lock(&self.fs.state);
        match self.mode {
            LockMode::Exclusive => s.lock = None,
            LockMode::Shared => s.readers -= 1,
        }
    }
}

impl SimBackend {
    /// An empty root.
    pub fn new() -> SimBackend {
        SimBackend::from_state(State::default())
    }

    fn from_state(state: State) -> SimBackend {
        SimBackend {
            fs: Arc::new(Fs {
                state: Mutex::new(state),
                hooks: Mutex::new(Vec::new()),
                on_sync: Mutex::new(None),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.fs.state)
    }

    /// Syncs so far (every [`Handle::sync`], [`Backend::sync_names`] and metadata sync).
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }

    /// How many times `op` was attempted.
    pub fn count(&self, op: SimOp) -> u64 {
        self.state().counts.get(&op).copied().unwrap_or(0)
    }

    /// Seeds the choices crash images make about what was not synced.
    pub fn seed(&self, seed: u64) {
        self.state().seed = seed;
    }

    /// After every sync, calls `f` with the sync's number and the image a power loss right
    /// then would leave (a fresh backend, unlocked). Replaces an earlier callback.
    pub fn on_sync(&self, f: impl FnMut(u64, SimBackend) + Send + 'static) {
        self.on_sync_where(|_| true, f);
    }

    /// [`SimBackend::on_sync`] for the syncs `want` accepts only (no image is made for
    /// the others). The callback runs on the thread that synced, with this backend's
    /// callback lock held: it must not sync on this backend itself.
    pub fn on_sync_where(
        &self,
        want: impl Fn(u64) -> bool + Send + 'static,
        f: impl FnMut(u64, SimBackend) + Send + 'static,
    ) {
        *lock(&self.fs.on_sync) = Some((Box::new(want), Box::new(f)));
    }

    /// Stops calling the [`SimBackend::on_sync`] callback.
    pub fn clear_on_sync(&self) {
        *lock(&self.fs.on_sync) = None;
    }

    /// The image a power loss now would leave.
    #[must_use]
    pub fn crash(&self) -> SimBackend {
        let s = self.state();
        SimBackend::from_state(s.crash_image(s.seed))
    }

    /// Adds an injected failure.
    pub fn inject(&self, f: Fault) {
        self.state().faults.push(f);
    }

    /// Removes every injected failure.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Gives the disk a size (`None`: unbounded): writes past it fail with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state().capacity = bytes;
    }

    /// Bytes in use (files reachable or open, and the reserve).
    pub fn used(&self) -> u64 {
        self.state().used()
    }

    /// Runs `f` before every `op` (outside the backend's lock, so it may use the store)
    /// until it returns `false`.
    pub fn hook(&self, op: SimOp, f: impl FnMut(Option<&Key>) -> bool + Send + 'static) {
        lock(&self.fs.hooks).push((op, Box::new(f)));
    }

    /// Moves the clock that object ages are measured by.
    pub fn advance_clock(&self, d: Duration) {
        self.state().clock_ms += u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    }

    /// Every object and its current length, in key order.
    pub fn objects(&self) -> Vec<(Key, u64)> {
        let s = self.state();
        s.names
            .iter()
            .filter_map(|(n, ino)| match n {
                Name::Key(k) => Some((k.clone(), s.inodes[ino].data.len() as u64)),
                _ => None,
            })
            .collect()
    }

    /// The current bytes of an object.
    pub fn contents(&self, key: &Key) -> Option<Vec<u8>> {
        let s = self.state();
        s.names
            .get(&Name::Key(key.clone()))
            .map(|ino| s.inodes[ino].data.clone())
    }

    /// Overwrites bytes of an object in place, durably (a test's bit flip or bad sector).
    pub fn corrupt(&self, key: &Key, offset: u64, bytes: &[u8]) {
        let mut s = self.state();
        let ino = s.names[&Name::Key(key.clone())];
        let i = s.inodes.get_mut(&ino).expect("inode");
        let end = offset as usize + bytes.len();
        if i.data.len() < end {
            i.data.resize(end, 0);
        }
        i.data[offset as usize..end].copy_from_slice(bytes);
        i.durable.clone_from(&i.data);
    }

    /// A copy of the metadata database's current bytes (a backup), or `None`.
    pub fn meta_bytes(&self) -> Option<Vec<u8>> {
        let s = self.state();
        s.names
            .get(&Name::Meta(MetaFile::Main))
            .map(|ino| s.inodes[ino].data.clone())
    }

    /// Replaces the metadata database with `bytes` (restoring a backup), durably.
    pub fn set_meta_bytes(&self, bytes: Vec<u8>) {
        let mut s = self.state();
        let ino = s.new_inode();
        let i = s.inodes.get_mut(&ino).expect("inode");
        i.durable.clone_from(&bytes);
        i.data = bytes;
        s.link(Name::Meta(MetaFile::Main), ino);
        s.persist_dirs(&std::iter::once(SimDir::Root).collect());
    }

    fn open_inode(&self, key: &Key) -> io::Result<u64> {
        self.state()
            .names
            .get(&Name::Key(key.clone()))
            .copied()
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn handle(&self, ino: u64, key: &Key, write: bool) -> Arc<dyn Handle> {
        if let Some(i) = self.state().inodes.get_mut(&ino) {
            i.handles += 1;
        }
        Arc::new(SimHandle {
            fs: self.fs.clone(),
            ino,
            key: Some(key.clone()),
            write,
        })
    }

    fn keyed_op(&self, op: SimOp, key: &Key) -> io::Result<MutexGuard<'_, State>> {
        run_hooks(&self.fs, op, Some(key));
        let mut s = self.state();
        s.fault(op, Some(key))?;
        Ok(s)
    }
}

fn dir_matches(what: &List, k: &Key) -> bool {
    match (what, k) {
        (List::Segments(s), Key::Segment { shard, .. }) => s == shard,
        (List::Large, Key::Large { .. }) | (List::Scratch, Key::Scratch(_)) => true,
        _ => false,
    }
}

impl Backend for SimBackend {
    fn describe(&self) -> String {
        "sim".into()
    }

    fn display(&self, key: &Key) -> PathBuf {
        Path::new("sim:").join(key.relative_path())
    }

    fn local_root(&self) -> Option<&Path> {
        None
    }

    fn check(&self) -> crate::Result<()> {
        Ok(())
    }

    fn prepare(&self, shards: u32) -> io::Result<()> {
        let mut s = self.state();
        s.shards = s.shards.max(shards);
        if let std::collections::hash_map::Entry::Vacant(v) = s.control.entry(ControlKey::Witness) {
            v.insert(Vec::new());
            s.durable_control.insert(ControlKey::Witness, Vec::new());
        }
        Ok(())
    }

    fn lock(&self, mode: LockMode) -> io::Result<Option<Box<dyn Send + Sync>>> {
        let mut s = self.state();
        let free = match mode {
            LockMode::Exclusive => s.lock.is_none() && s.readers == 0,
            LockMode::Shared => s.lock.is_none(),
        };
        if !free {
            return Ok(None);
        }
        match mode {
            LockMode::Exclusive => s.lock = Some(mode),
            LockMode::Shared => s.readers += 1,
        }
        Ok(Some(Box::new(SimLock {
            fs: self.fs.clone(),
            mode,
        })))
    }

    fn meta(&self, which: MetaFile, create: bool, write: bool) -> io::Result<Option<MetaHandle>> {
        let (ino, created) = {
            let mut s = self.state();
            let (ino, created) = match s.names.get(&Name::Meta(which)).copied() {
                Some(ino) => (ino, false),
                None if create && write => {
                    let ino = s.new_inode();
                    s.link(Name::Meta(which), ino);
                    s.persist_dirs(&std::iter::once(SimDir::Root).collect());
                    s.syncs += 1;
                    (ino, true)
                }
                None => return Ok(None),
            };
            s.inodes.get_mut(&ino).expect("inode").handles += 1;
            (ino, created)
        };
        if created {
            after_sync(&self.fs);
        }
        Ok(Some(MetaHandle::custom(Box::new(SimMeta {
            fs: self.fs.clone(),
            ino,
        }))))
    }

    fn meta_len(&self, which: MetaFile) -> io::Result<Option<u64>> {
        let s = self.state();
        Ok(s.names
            .get(&Name::Meta(which))
            .map(|ino| s.inodes[ino].data.len() as u64))
    }

    fn remove_meta(&self, which: MetaFile) -> io::Result<()> {
        let removed = {
            let mut s = self.state();
            let removed = s.unlink(&Name::Meta(which)).is_some();
            if removed {
                s.persist_dirs(&std::iter::once(SimDir::Root).collect());
                s.syncs += 1;
            }
            removed
        };
        if removed {
            after_sync(&self.fs);
        }
        Ok(())
    }

    fn install_rebuilt_meta(&self) -> io::Result<Option<String>> {
        {
            let mut s = self.state();
            let new = s
                .names
                .get(&Name::Meta(MetaFile::Rebuild))
                .copied()
                .ok_or(io::ErrorKind::NotFound)?;
            s.sync_inode(new);
        }
        after_sync(&self.fs);
        let kept = {
            let mut s = self.state();
            let new = s.names[&Name::Meta(MetaFile::Rebuild)];
            let kept = s
                .names
                .get(&Name::Meta(MetaFile::Main))
                .copied()
                .map(|old| {
                    let name = format!("meta.redb.damaged-{}", s.clock_ms);
                    s.link(Name::Root(name.clone()), old);
                    name
                });
            s.unlink(&Name::Meta(MetaFile::Rebuild));
            s.link(Name::Meta(MetaFile::Main), new);
            s.persist_dirs(&std::iter::once(SimDir::Root).collect());
            s.syncs += 1;
            kept
        };
        after_sync(&self.fs);
        Ok(kept)
    }

    fn read_control(&self, c: Control) -> io::Result<Option<Vec<u8>>> {
        Ok(self.state().control.get(&control_key(c)).cloned())
    }

    fn write_control(&self, c: Control, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let v = s.control.entry(control_key(c)).or_default();
        if v.len() < bytes.len() {
            v.resize(bytes.len(), 0);
        }
        v[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn create(&self, key: &Key) -> io::Result<Arc<dyn Handle>> {
        let ino = {
            let mut s = self.keyed_op(SimOp::Create, key)?;
            if s.names.contains_key(&Name::Key(key.clone())) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            let ino = s.new_inode();
            s.link(Name::Key(key.clone()), ino);
            ino
        };
        Ok(self.handle(ino, key, true))
    }

    fn open(&self, key: &Key, write: bool) -> io::Result<Arc<dyn Handle>> {
        drop(self.keyed_op(SimOp::Open, key)?);
        let ino = self.open_inode(key)?;
        Ok(self.handle(ino, key, write))
    }

    fn map(&self, key: &Key, len: u64, _populate: bool) -> io::Result<Arc<dyn Mapping>> {
        let s = self.keyed_op(SimOp::Read, key)?;
        let ino = *s
            .names
            .get(&Name::Key(key.clone()))
            .ok_or(io::ErrorKind::NotFound)?;
        let d = &s.inodes[&ino].data;
        if (d.len() as u64) < len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Arc::new(SimMap(d[..len as usize].to_vec())))
    }

    fn len(&self, key: &Key) -> io::Result<Option<u64>> {
        let s = self.state();
        Ok(s.names
            .get(&Name::Key(key.clone()))
            .map(|ino| s.inodes[ino].data.len() as u64))
    }

    fn remove(&self, key: &Key) -> io::Result<bool> {
        let mut s = self.keyed_op(SimOp::Remove, key)?;
        Ok(s.unlink(&Name::Key(key.clone())).is_some())
    }

    fn rename(&self, from: &Key, to: &Key, replace: bool) -> io::Result<bool> {
        let mut s = self.keyed_op(SimOp::Rename, to)?;
        let src = Name::Key(from.clone());
        let dst = Name::Key(to.clone());
        let ino = *s.names.get(&src).ok_or(io::ErrorKind::NotFound)?;
        if !replace && s.names.contains_key(&dst) {
            return Ok(false);
        }
        // The new name first, so the inode never has no name.
        s.link(dst.clone(), ino);
        s.unlink(&src);
        if src.dir() != dst.dir() {
            s.coupled.push((src.dir(), dst.dir()));
        }
        Ok(true)
    }

    fn sync_names(&self, keys: &[Key]) -> io::Result<()> {
        run_hooks(&self.fs, SimOp::SyncNames, keys.first());
        {
            let mut s = self.state();
            s.fault(SimOp::SyncNames, keys.first())?;
            let dirs: BTreeSet<SimDir> = keys.iter().map(|k| SimDir::Key(k.dir())).collect();
            s.persist_dirs(&dirs);
            s.syncs += 1;
        }
        after_sync(&self.fs);
        Ok(())
    }

    fn list(&self, what: &List) -> io::Result<Vec<Listed>> {
        let s = self.state();
        let entry = |k: &Key, ino: &u64| Listed {
            key: Some(k.clone()),
            name: k
                .relative_path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            age: Some(Duration::from_millis(s.clock_ms - s.inodes[ino].mtime)),
            len: Some(s.inodes[ino].data.len() as u64),
        };
        let mut out = Vec::new();
        match what {
            List::Shards => {
                let mut shards: BTreeSet<u32> = (0..s.shards).collect();
                for n in s.names.keys() {
                    if let Name::Key(Key::Segment { shard, .. }) = n {
                        shards.insert(*shard);
                    }
                }
                out.extend(shards.into_iter().map(|sh| Listed {
                    key: None,
                    name: format!("{sh:03}"),
                    age: None,
                    len: None,
                }));
            }
            List::Uploads => {
                let mut youngest: BTreeMap<String, u64> = BTreeMap::new();
                for (n, ino) in &s.names {
                    if let Name::Key(k @ Key::Upload { id, part }) = n {
                        let l = entry(k, ino);
                        let age = l.age.map_or(0, |a| a.as_millis() as u64);
                        let y = youngest.entry(id.clone()).or_insert(age);
                        *y = (*y).min(age);
                        out.push(Listed {
                            name: format!(
                                "{id}/{}",
                                match part {
                                    UploadPart::Data => "data",
                                    UploadPart::State => "state",
                                    UploadPart::StateNew => "state.tmp",
                                }
                            ),
                            ..l
                        });
                    }
                }
                out.extend(youngest.into_iter().map(|(id, age)| Listed {
                    key: None,
                    name: id,
                    age: Some(Duration::from_millis(age)),
                    len: None,
                }));
            }
            _ => {
                for (n, ino) in &s.names {
                    if let Name::Key(k) = n
                        && dir_matches(what, k)
                    {
                        out.push(entry(k, ino));
                    }
                }
            }
        }
        Ok(out)
    }

    fn remove_upload(&self, id: &str) -> io::Result<()> {
        let mut s = self.state();
        s.fault(SimOp::Remove, None)?;
        for part in [UploadPart::Data, UploadPart::State, UploadPart::StateNew] {
            s.unlink(&Name::Key(Key::Upload {
                id: id.to_owned(),
                part,
            }));
        }
        Ok(())
    }

    fn clear_scratch(&self) -> io::Result<()> {
        let mut s = self.state();
        let scratch: Vec<Name> = s
            .names
            .keys()
            .filter(|n| matches!(n, Name::Key(Key::Scratch(_))))
            .cloned()
            .collect();
        for n in scratch {
            s.unlink(&n);
        }
        Ok(())
    }

    fn free_space(&self) -> io::Result<Option<u64>> {
        let s = self.state();
        Ok(s.capacity.map(|c| c.saturating_sub(s.used())))
    }

    fn ensure_reserve(&self, bytes: u64) -> io::Result<bool> {
        let mut s = self.state();
        if s.reserve > 0 {
            return Ok(true);
        }
        let free = s.capacity.map(|c| c.saturating_sub(s.used()));
        let bytes = free.map_or(bytes, |f| bytes.min(f / 8));
        if bytes < 1 << 20 {
            return Ok(false);
        }
        s.reserve = bytes;
        Ok(true)
    }

    fn release_reserve(&self) -> io::Result<bool> {
        let mut s = self.state();
        let had = s.reserve > 0;
        s.reserve = 0;
        Ok(had)
    }
}
