//! The admin socket (feature `cli`): the process that holds a store open serves the
//! `store` command line on `ROOT/admin.sock`, so that every admin command works beside a
//! live embedder, with the output and exit status it has alone.
//!
//! This module owns the socket and its one-message protocol, and nothing else. The client
//! (`store`, on finding the store locked) sends its parsed command, with its relative paths
//! made absolute, and passes its standard input, output and error as file descriptors
//! (`SCM_RIGHTS`); the server checks the peer's credentials (root, or the user the server
//! runs as when that user owns the store root), runs the command in-process on its open
//! [`Store`] through [`cli::run_in`] — writing straight to the client's descriptors — and
//! answers with the exit status byte. A client that goes away (its socket closes) sets the
//! command's interrupt flag. It must never run a command for a peer that fails the check,
//! and never interpret a command itself: what a command does is `cli`'s business.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::cli::{self, Cli, Session};
use crate::error::{Error, IoContext, Result};
use crate::store::Store;

/// The socket's name in the store root.
pub const SOCKET: &str = "admin.sock";
/// Version of the request message; a server refuses others.
const PROTOCOL: u32 = 1;
/// The largest request accepted (a command line, as JSON).
const MAX_REQUEST: usize = 1 << 20;

/// What the client sends (with its three standard descriptors).
#[derive(serde::Serialize, serde::Deserialize)]
struct Request {
    protocol: u32,
    cli: Cli,
}

/// A path to `name` in the directory `dir` that fits a socket address whatever the
/// directory's own length: `/proc/self/fd/N/name` (`sun_path` holds 108 bytes).
fn via_fd(dir: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// The root, opened for reaching names in it (`O_PATH`: search permission is enough).
fn open_dir(root: &Path) -> Result<File> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(|e| Error::io("open", root, e.into()))
}

/// Serves the store's command line to other processes until dropped.
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    dir: File,
    /// The listening socket, shut down to wake the accept loop.
    listener: UnixListener,
    /// Commands running, interrupted when the server is dropped.
    live: Live,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts serving `store`'s command line on `ROOT/admin.sock` (a stale socket of an
/// earlier owner is replaced: holding the store's lock, this process is its only owner).
/// Each command runs on a thread of its own against `store`. The store must be open
/// read-write. Dropping the server stops serving and interrupts the commands in flight
/// (a command blocked reading its caller's standard input holds its clone of the store
/// until that input moves or ends). The server holds no clone of the store itself.
///
/// Commands write to the client's standard output, which may be a pipe whose reader
/// goes away: the process must ignore `SIGPIPE`, as every Rust binary does unless built
/// otherwise.
pub fn serve(store: &Store) -> Result<AdminServer> {
    if store.is_read_only() {
        return Err(Error::Invalid(
            "only the process holding the store read-write serves its admin socket".into(),
        ));
    }
    let root = store.root().to_owned();
    let dir = open_dir(&root)?;
    let path = root.join(SOCKET);
    let addr = via_fd(&dir, SOCKET);
    match std::fs::remove_file(&addr) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove", &path, e));
        }
        _ => {}
    }
    let listener = UnixListener::bind(&addr).ctx("bind", &path)?;
    // The peer check decides; the mode keeps other users from even connecting.
    std::fs::set_permissions(&addr, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .ctx("chmod", &path)?;
    let stop = Arc::new(AtomicBool::new(false));
    let owner = std::fs::metadata(&root).ctx("stat", &root)?.uid();
    let wake = listener.try_clone().ctx("dup", &path)?;
    let live: Live = Arc::default();
    let thread = {
        // Weak: neither the server nor a connection that has not passed the peer check
        // keeps the store open.
        let (stop, store, live) = (stop.clone(), store.downgrade(), live.clone());
        std::thread::Builder::new()
            .name("layerstore-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else {
                        // Out of descriptors, say: wait instead of spinning.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    };
                    let (store, live) = (store.clone(), live.clone());
                    let _ = std::thread::Builder::new()
                        .name("layerstore-admin-cmd".into())
                        .spawn(move || handle(&store, owner, &conn, &live));
                }
            })
            .ctx("spawn", &path)?
    };
    Ok(AdminServer {
        path,
        stop,
        dir,
        listener: wake,
        live,
        thread: Some(thread),
    })
}

/// Connections running a command: their sockets and interrupt flags.
type Live = Arc<std::sync::Mutex<Vec<(u64, UnixStream, Arc<AtomicBool>)>>>;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl AdminServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (accept fails on a shut-down socket), which sees `stop`.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Read);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(via_fd(&self.dir, SOCKET));
        // Commands in flight stop at their next check.
        for (_, conn, flag) in lock(&self.live).iter() {
            flag.store(true, Ordering::SeqCst);
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a peer may run commands: root, or the user this process runs as when that
/// user owns the store (a user must not make a root-run embedder write their paths).
fn allowed(peer_uid: u32, owner: u32) -> bool {
    let me = rustix::process::geteuid().as_raw();
    peer_uid == 0 || (peer_uid == me && peer_uid == owner)
}

/// Serves one connection: a request with three descriptors, the command, the status
/// byte. The socket is shut down however this ends (a panicking command included), so
/// the client never waits forever.
fn handle(store: &crate::store::WeakStore, owner: u32, conn: &UnixStream, live: &Live) {
    struct Close<'a>(&'a UnixStream);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            let _ = self.0.shutdown(std::net::Shutdown::Both);
        }
    }
    let _close = Close(conn);
    let peer = rustix::net::sockopt::socket_peercred(conn).map(|c| c.uid.as_raw());
    if conn.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err() {
        return;
    }
    let Ok((request, fds)) = receive(conn) else {
        return;
    };
    let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
        return;
    };
    let (stdin, stdout, mut stderr) = (File::from(stdin), File::from(stdout), File::from(stderr));
    let fail = |stderr: &mut File, msg: &str| {
        let _ = writeln!(stderr, "store: error: {msg}");
        1
    };
    let code = match (peer, request) {
        (Ok(uid), _) if !allowed(uid, owner) => fail(
            &mut stderr,
            "the process holding this store serves its owner and root only",
        ),
        (Err(e), _) => fail(&mut stderr, &format!("reading the peer's credentials: {e}")),
        (Ok(_), Err(e)) => fail(&mut stderr, &e.to_string()),
        (Ok(_), Ok(req)) => match store.upgrade() {
            None => fail(&mut stderr, "the process holding this store is closing it"),
            Some(store) => run(&store, conn, &req, stdin, stdout, &mut stderr, live),
        },
    };
    let _ = (&*conn).write_all(&[code]);
}

/// Runs an admitted request; returns its exit status.
fn run(
    store: &Store,
    conn: &UnixStream,
    req: &Request,
    stdin: File,
    stdout: File,
    stderr: &mut File,
    live: &Live,
) -> u8 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let _ = conn.set_read_timeout(None);
    // The client's socket closing (it was killed, or ^C) stops long work.
    let interrupt = Arc::new(AtomicBool::new(false));
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let (Ok(mut watch), Ok(kept)) = (conn.try_clone(), conn.try_clone()) {
        lock(live).push((id, kept, interrupt.clone()));
        let flag = interrupt.clone();
        let _ = std::thread::Builder::new()
            .name("layerstore-admin-watch".into())
            .spawn(move || {
                let _ = watch.read(&mut [0u8; 1]);
                flag.store(true, Ordering::SeqCst);
            });
    }
    let session = Session::served(store.clone(), stdin, interrupt);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cli::run_in(&req.cli, &session, &mut out)
    }));
    lock(live).retain(|(i, ..)| *i != id);
    let r = match r {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Corrupt(format!(
                "the command panicked in the process holding the store: {what}"
            )))
        }
    };
    let r = match (r, out.flush()) {
        (Ok(()), Err(e)) => Err(Error::io("write", "standard output", e)),
        (r, _) => r,
    };
    cli::exit_status(&r, stderr)
}

/// Reads the request: a 4-byte length, that much JSON, and the descriptors that came
/// with the first bytes.
fn receive(conn: &UnixStream) -> std::io::Result<(Result<Request>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    let mut data = buf[..got.bytes].to_vec();
    if data.len() < 4 {
        return Ok((Err(bad("a request shorter than its length")), fds));
    }
    let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_REQUEST {
        return Ok((Err(bad("a request over 1 MiB")), fds));
    }
    while data.len() < 4 + len {
        let mut more = vec![0u8; 4 + len - data.len()];
        let n = (&*conn).read(&mut more)?;
        if n == 0 {
            return Ok((Err(bad("a request cut short")), fds));
        }
        data.extend_from_slice(&more[..n]);
    }
    let req: Result<Request> = serde_json::from_slice::<Request>(&data[4..4 + len])
        .map_err(|e| bad(&format!("a request that does not parse: {e}")))
        .and_then(|r| {
            if r.protocol == PROTOCOL {
                Ok(r)
            } else {
                Err(bad(&format!(
                    "protocol {} (this store serves {PROTOCOL}: use its `store` binary)",
                    r.protocol
                )))
            }
        });
    Ok((req, fds))
}

fn bad(what: &str) -> Error {
    Error::Invalid(format!("the admin socket got {what}"))
}

/// Runs `cli` in the process that holds the store at `root`, through its admin socket,
/// with this process's standard input, output and error. Returns the command's exit
/// status, or `None` when nothing serves the store (no socket, or a stale one).
pub fn forward(root: &Path, mut cli: Cli) -> Result<Option<u8>> {
    let dir = open_dir(root)?;
    let conn = match UnixStream::connect(via_fd(&dir, SOCKET)) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(Error::io("connect", root.join(SOCKET), e)),
    };
    let cwd = std::env::current_dir().ctx("getcwd", Path::new("."))?;
    cli.absolutize(root, &cwd)?;
    let json = serde_json::to_vec(&Request {
        protocol: PROTOCOL,
        cli,
    })
    .map_err(|e| Error::Invalid(format!("encoding the command: {e}")))?;
    let mut msg = u32::try_from(json.len())
        .map_err(|_| Error::Invalid("command line too long".into()))?
        .to_le_bytes()
        .to_vec();
    msg.extend_from_slice(&json);
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let fds = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sock = root.join(SOCKET);
    let sent = rustix::net::sendmsg(
        &conn,
        &[IoSlice::new(&msg)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| Error::io("send", &sock, e.into()))?;
    (&conn).write_all(&msg[sent..]).ctx("send", &sock)?;
    let mut code = [0u8; 1];
    match (&conn).read_exact(&mut code) {
        Ok(()) => Ok(Some(code[0])),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Invalid(format!(
            "the process holding {} ended the command without a status (did it exit?)",
            root.display()
        ))),
        Err(e) => Err(Error::io("receive", &sock, e)),
    }
}
