//! The async face of the store (feature `tokio`): every call of [`AsyncStore`] runs the
//! blocking core on tokio's blocking pool (whose work fans out to rayon where the core
//! does), so no store I/O and no hashing ever runs on a runtime worker thread.
//!
//! This module owns only the bridge: moving arguments into blocking tasks, channels with
//! backpressure between an `AsyncWrite` and the [`Ingest`](crate::Ingest) it feeds, and
//! cancellation: dropping the future of a put, an import, an export, an unpack, a
//! collection or a verify sets the interrupt flag the core polls (so the work stops and
//! leaves nothing partial visible), and dropping an [`AsyncIngest`] (or the future of
//! [`AsyncStore::ingest_from`]) discards the upload in the blocking pool. It has no logic
//! of its own: what a call does, and what it guarantees, is what the sync call of the
//! same name does and guarantees.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use crate::{
    Blob, Descriptor, Digest, Error, GcOptions, GcReport, Options, PutOptions, Result, Store,
    VerifyOptions, VerifyReport,
};

/// Bytes an [`AsyncIngest`] hands to its blocking writer at once, and how many such
/// chunks may wait (the backpressure: a writer more than this ahead of the disk waits).
const CHUNK: usize = 1 << 20;
const QUEUED: usize = 4;

/// Runs `f` on the blocking pool. A panic in `f` resumes here; a runtime shutting down
/// reads as [`Error::Interrupted`].
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::Interrupted),
    }
}

/// Runs a short read `f` (an index lookup, a mapping) off the runtime's async work: in
/// place on a multi-thread runtime (`block_in_place`: this worker's other tasks move to
/// another thread while `f` runs, and no thread hand-off is paid when none wait), on the
/// blocking pool on a current-thread runtime (where nothing may run in place). A
/// round trip through the blocking pool costs ~18 us on the reference machine; in place
/// costs nothing over the sync call (PERFORMANCE.md).
async fn quick<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        return Ok(tokio::task::block_in_place(f));
    }
    blocking(f).await
}

/// Sets an interrupt flag if dropped before [`CancelOnDrop::disarm`]: a future dropped
/// before its blocking work ends stops that work at its next check; one that completes
/// leaves the flag as it was (it may be the caller's own, reused).
struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `f` on the blocking pool with `flag` set if the returned future is dropped first.
async fn interruptible<T: Send + 'static>(
    flag: Arc<AtomicBool>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let cancel = CancelOnDrop(Some(flag));
    let r = blocking(f).await;
    cancel.disarm();
    r?
}

/// A [`Store`] for async code. Cheap to clone (it is the store's handle); the sync
/// [`Store`] stays reachable through [`AsyncStore::blocking`] for code that runs on
/// the blocking pool already.
#[derive(Clone)]
pub struct AsyncStore {
    store: Store,
}

impl AsyncStore {
    /// Wraps an open store.
    pub fn new(store: Store) -> AsyncStore {
        AsyncStore { store }
    }

    /// Opens (or creates) the store at `root`, as [`Store::open`].
    pub async fn open(root: impl Into<std::path::PathBuf>, opts: Options) -> Result<AsyncStore> {
        let root = root.into();
        let store = blocking(move || Store::open(root, opts)).await??;
        Ok(AsyncStore { store })
    }

    /// The sync store, for code on the blocking pool.
    pub fn blocking(&self) -> &Store {
        &self.store
    }

    /// [`Store::put_with`]: durable when the future completes. Dropping the future
    /// before then stops the put, which stores nothing.
    pub async fn put_with(&self, data: impl Into<Bytes>, opts: PutOptions) -> Result<Descriptor> {
        let (store, data) = (self.store.clone(), data.into());
        let mut opts = opts;
        let flag = opts.interrupt.get_or_insert_with(Default::default).clone();
        interruptible(flag, move || store.put_with(&data, opts)).await
    }

    /// [`Store::put`].
    pub async fn put(&self, data: impl Into<Bytes>) -> Result<Descriptor> {
        self.put_with(data, PutOptions::default()).await
    }

    /// [`Store::get`]: the bytes, zero-copy from the store's mapping.
    pub async fn get(&self, d: Digest) -> Result<Blob> {
        let store = self.store.clone();
        quick(move || store.get(&d)).await?
    }

    /// [`Store::stat`]: what the index records for a blob, if it is stored.
    pub async fn stat(&self, d: Digest) -> Result<Option<crate::BlobInfo>> {
        let store = self.store.clone();
        quick(move || store.stat(&d)).await?
    }

    /// [`Store::contains`].
    pub async fn contains(&self, d: Digest) -> Result<bool> {
        let store = self.store.clone();
        quick(move || store.contains(&d)).await?
    }

    /// [`Store::get`] as [`Bytes`] (zero-copy: the `Bytes` keeps the mapping alive). The
    /// pages are faulted in on the blocking pool, so reading the `Bytes` on a runtime
    /// thread does not wait for the disk.
    pub async fn get_bytes(&self, d: Digest) -> Result<Bytes> {
        let store = self.store.clone();
        quick(move || store.get(&d).map(prefault)).await?
    }

    /// [`Store::read_range`] as [`Bytes`]: `len` bytes from `offset` (fewer at the end
    /// of the blob). A range that starts past the end is [`Error::OutOfRange`], naming
    /// the blob's size.
    pub async fn read_range(&self, d: Digest, offset: u64, len: u64) -> Result<Bytes> {
        let store = self.store.clone();
        quick(move || store.read_range(&d, offset, len).map(prefault)).await?
    }

    /// The blob as an [`AsyncRead`]: it hands out the bytes of the mapping window by
    /// window, each faulted in on the blocking pool first.
    pub async fn reader(&self, d: Digest) -> Result<BlobReader> {
        let blob = self.get(d).await?;
        Ok(BlobReader {
            blob,
            at: 0,
            ready: 0,
            pending: None,
        })
    }

    /// Starts (or resumes) the upload `r#ref` for writing through [`AsyncWrite`], as
    /// [`Store::ingest`]. Dropping it without [`AsyncIngest::commit`] or
    /// [`AsyncIngest::suspend`] discards the upload.
    pub async fn ingest(&self, r#ref: &str, opts: PutOptions) -> Result<AsyncIngest> {
        let (store, r#ref) = (self.store.clone(), r#ref.to_owned());
        let ing = blocking(move || store.ingest(&r#ref, opts)).await??;
        Ok(AsyncIngest::start(ing))
    }

    /// An unnamed ingest ([`Store::ingest_unnamed`]) for writing through [`AsyncWrite`].
    pub async fn ingest_unnamed(&self, opts: PutOptions) -> Result<AsyncIngest> {
        let store = self.store.clone();
        let ing = blocking(move || store.ingest_unnamed(opts)).await??;
        Ok(AsyncIngest::start(ing))
    }

    /// Streams `reader` into a new unnamed ingest and commits it, checking `digest` and
    /// `size` if given. Dropping the future discards what was written.
    pub async fn ingest_from(
        &self,
        reader: impl AsyncRead + Unpin,
        opts: PutOptions,
        digest: Option<Digest>,
        size: Option<u64>,
    ) -> Result<Descriptor> {
        let mut w = self.ingest_unnamed(opts).await?;
        w.copy_from(reader).await?;
        w.commit_expecting(digest, size).await
    }

    /// [`Store::gc`]. Dropping the future interrupts the collection (it stops at its next
    /// check and commits nothing more).
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let store = self.store.clone();
        let flag = Arc::new(AtomicBool::new(false));
        interruptible(flag.clone(), move || store.gc(&opts, &flag)).await
    }

    /// [`Store::verify`]. Dropping the future interrupts it.
    pub async fn verify(&self, opts: VerifyOptions) -> Result<VerifyReport> {
        let store = self.store.clone();
        let flag = Arc::new(AtomicBool::new(false));
        interruptible(flag.clone(), move || store.verify(&opts, &flag, &|_| {})).await
    }

    /// [`Store::import_path`]. Dropping the future interrupts the import: it commits
    /// nothing and removes what it staged (an import is one commit: all or nothing).
    pub async fn import_path(
        &self,
        path: impl Into<std::path::PathBuf>,
        mut opts: crate::ImportOptions,
    ) -> Result<crate::ImportOutcome> {
        let (store, path) = (self.store.clone(), path.into());
        let flag = opts.interrupt.get_or_insert_with(Default::default).clone();
        interruptible(flag, move || store.import_path(&path, &opts)).await
    }

    /// [`Store::export_path`]: the file or directory appears whole or not at all.
    /// Dropping the future interrupts the export and removes its temporary.
    pub async fn export_path(
        &self,
        refs: Vec<String>,
        format: crate::ExportFormat,
        path: impl Into<std::path::PathBuf>,
    ) -> Result<()> {
        let (store, path) = (self.store.clone(), path.into());
        let flag = Arc::new(AtomicBool::new(false));
        interruptible(flag.clone(), move || {
            store.export_path(&refs, format, &path, &flag)
        })
        .await
    }

    /// [`Store::unpack`]. Dropping the future interrupts the unpack, which removes its
    /// partial tree: `dir` appears whole or not at all.
    pub async fn unpack(
        &self,
        reference: &str,
        dir: impl Into<std::path::PathBuf>,
        mut opts: crate::unpack::UnpackOptions,
    ) -> Result<crate::unpack::UnpackReport> {
        let (store, reference, dir) = (self.store.clone(), reference.to_owned(), dir.into());
        let flag = opts.interrupt.get_or_insert_with(Default::default).clone();
        interruptible(flag, move || store.unpack(&reference, &dir, &opts)).await
    }
}

/// Touches one byte per page so that reading the bytes later does not fault on the
/// disk (a mapped blob's pages come from the page cache or the disk on first touch).
fn prefault(b: Blob) -> Bytes {
    touch(&b);
    Bytes::from_owner(b)
}

fn touch(b: &[u8]) {
    let mut sum = 0u8;
    for i in (0..b.len()).step_by(4096) {
        sum = sum.wrapping_add(b[i]);
    }
    std::hint::black_box(sum);
}

/// An [`AsyncRead`] over a stored blob, from [`AsyncStore::reader`].
pub struct BlobReader {
    blob: Blob,
    at: usize,
    /// Bytes from `at` known to be faulted in.
    ready: usize,
    pending: Option<tokio::task::JoinHandle<()>>,
}

impl AsyncRead for BlobReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at == this.blob.len() {
            return Poll::Ready(Ok(()));
        }
        if this.ready == 0 {
            if this.pending.is_none() {
                let (blob, at) = (this.blob.clone(), this.at);
                this.pending = Some(tokio::task::spawn_blocking(move || {
                    let end = (at + CHUNK).min(blob.len());
                    touch(&blob[at..end]);
                }));
            }
            let handle = this.pending.as_mut().expect("set above");
            let r = ready!(Pin::new(handle).poll(cx));
            this.pending = None;
            r.map_err(std::io::Error::other)?;
            this.ready = CHUNK.min(this.blob.len() - this.at);
        }
        let n = this.ready.min(buf.remaining());
        buf.put_slice(&this.blob[this.at..this.at + n]);
        this.at += n;
        this.ready -= n;
        Poll::Ready(Ok(()))
    }
}

/// What an [`AsyncIngest`] asks of its blocking writer.
enum Msg {
    Data(Bytes),
    Sync(oneshot::Sender<Result<u64>>),
    Suspend(oneshot::Sender<Result<u64>>),
    Commit(
        Option<Digest>,
        Option<u64>,
        oneshot::Sender<Result<Descriptor>>,
    ),
}

/// An upload written through [`AsyncWrite`]: its bytes go, with backpressure, to an
/// [`Ingest`](crate::Ingest) that a task on the blocking pool holds. Finish it with
/// [`AsyncIngest::commit`] (or `commit_expecting`, or `suspend`); dropping it discards
/// the upload, in the blocking pool.
pub struct AsyncIngest {
    tx: PollSender<Msg>,
    /// The first write error of the blocking writer, reported at the next call.
    failed: Arc<std::sync::Mutex<Option<Error>>>,
    offset: u64,
}

impl AsyncIngest {
    fn start(mut ing: crate::Ingest) -> AsyncIngest {
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUED);
        let failed = Arc::new(std::sync::Mutex::new(None));
        let offset = ing.offset();
        let seen = failed.clone();
        tokio::task::spawn_blocking(move || {
            let mut error: Option<Error> = None;
            // The channel closing without a final message drops `ing` here: discarded.
            while let Some(m) = rx.blocking_recv() {
                let fail = |e: &Error| {
                    *seen
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.clone());
                };
                match m {
                    Msg::Data(b) => {
                        if error.is_none()
                            && let Err(e) = ing.write_all(&b)
                        {
                            fail(&e);
                            error = Some(e);
                        }
                    }
                    Msg::Sync(reply) => {
                        let r = match &error {
                            Some(e) => Err(e.clone()),
                            None => ing.sync(),
                        };
                        let _ = reply.send(r);
                    }
                    Msg::Suspend(reply) => {
                        let r = match error {
                            Some(e) => Err(e),
                            None => ing.suspend(),
                        };
                        let _ = reply.send(r);
                        return;
                    }
                    Msg::Commit(digest, size, reply) => {
                        let r = match error {
                            Some(e) => Err(e),
                            None => ing.commit_expecting(digest, size),
                        };
                        let _ = reply.send(r);
                        return;
                    }
                }
            }
        });
        AsyncIngest {
            tx: PollSender::new(tx),
            failed,
            offset,
        }
    }

    /// Bytes accepted so far (after a resume: from the durable offset it resumed at).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn take_failure(&self) -> Option<Error> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    async fn ask<T>(&mut self, m: impl FnOnce(oneshot::Sender<Result<T>>) -> Msg) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let sender = self.tx.get_ref().cloned().ok_or(Error::Interrupted)?;
        sender
            .send(m(reply))
            .await
            .map_err(|_| Error::Interrupted)?;
        rx.await.map_err(|_| Error::Interrupted)?
    }

    /// Copies `reader` to the end into the upload.
    pub async fn copy_from(&mut self, mut reader: impl AsyncRead + Unpin) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut buf = bytes::BytesMut::with_capacity(CHUNK);
            while buf.len() < CHUNK {
                if reader
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| Error::io("read", "input", e))?
                    == 0
                {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(total);
            }
            total += buf.len() as u64;
            self.send_data(buf.freeze()).await?;
        }
    }

    async fn send_data(&mut self, b: Bytes) -> Result<()> {
        if let Some(e) = self.take_failure() {
            return Err(e);
        }
        self.offset += b.len() as u64;
        let sender = self.tx.get_ref().cloned().ok_or(Error::Interrupted)?;
        sender
            .send(Msg::Data(b))
            .await
            .map_err(|_| Error::Interrupted)
    }

    /// [`Ingest::sync`](crate::Ingest::sync): waits for every byte written so far.
    pub async fn sync(&mut self) -> Result<u64> {
        self.ask(Msg::Sync).await
    }

    /// [`Ingest::suspend`](crate::Ingest::suspend).
    pub async fn suspend(mut self) -> Result<u64> {
        self.ask(Msg::Suspend).await
    }

    /// [`Ingest::commit`](crate::Ingest::commit).
    pub async fn commit(self) -> Result<Descriptor> {
        self.commit_expecting(None, None).await
    }

    /// [`Ingest::commit_expecting`](crate::Ingest::commit_expecting).
    pub async fn commit_expecting(
        mut self,
        digest: Option<Digest>,
        size: Option<u64>,
    ) -> Result<Descriptor> {
        self.ask(|r| Msg::Commit(digest, size, r)).await
    }
}

impl AsyncWrite for AsyncIngest {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.take_failure() {
            return Poll::Ready(Err(std::io::Error::other(e)));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(CHUNK);
        self.tx
            .send_item(Msg::Data(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| closed())?;
        self.offset += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Bytes handed over are the writer's; durability is `sync`'s business.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn closed() -> std::io::Error {
    std::io::Error::other(Error::Interrupted)
}
