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

use crate::{
    Blob, Descriptor, Digest, Error, GcOptions, GcReport, Options, PutOptions, Result, Store,
    VerifyOptions, VerifyReport,
};

/// Bytes an [`AsyncIngest`] hands to a blocking job at once (one chunk is in flight while
/// the next fills), and the window a [`BlobReader`] faults in at a time.
const CHUNK: usize = 1 << 20;

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

/// Puts a new interrupt flag in an operation's options (replacing one the caller gave:
/// async work is cancelled by dropping its future, and setting a caller's flag would stop
/// whatever else shares it) and returns it.
fn fresh_flag(slot: &mut Option<Arc<AtomicBool>>) -> Arc<AtomicBool> {
    slot.insert(Arc::default()).clone()
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
        let flag = fresh_flag(&mut opts.interrupt);
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
        let r#ref = r#ref.to_owned();
        self.open_ingest(move |s| s.ingest(&r#ref, opts)).await
    }

    /// An unnamed ingest ([`Store::ingest_unnamed`]) for writing through [`AsyncWrite`].
    pub async fn ingest_unnamed(&self, opts: PutOptions) -> Result<AsyncIngest> {
        self.open_ingest(move |s| s.ingest_unnamed(opts)).await
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
        let flag = fresh_flag(&mut opts.interrupt);
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
        let flag = fresh_flag(&mut opts.interrupt);
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

/// An upload written through [`AsyncWrite`]: bytes are gathered into 1 MiB chunks, and
/// each chunk is written (and hashed) by a job on the blocking pool that holds the
/// [`Ingest`](crate::Ingest) while it runs and hands it back. One chunk is in flight while
/// the next one fills, which is the backpressure: a writer more than a chunk ahead of the
/// disk waits. No thread is held between writes, so idle uploads cost no pool thread.
/// Finish with [`AsyncIngest::commit`] (or `commit_expecting`, or `suspend`); dropping it
/// discards the upload, on the blocking pool.
pub struct AsyncIngest {
    /// The ingest, while no job holds it.
    ing: Option<crate::Ingest>,
    /// The job writing a chunk; it hands the ingest back with its result.
    job: Option<tokio::task::JoinHandle<(crate::Ingest, Result<()>)>>,
    /// Bytes accepted and not yet handed to a job.
    buf: bytes::BytesMut,
    /// The first failure of a job: every later call reports it.
    failed: Option<Error>,
    offset: u64,
}

/// Hands over an ingest being opened: if the caller's future was dropped meanwhile, the
/// ingest is released (kept at its last sync point), never discarded.
struct Claim(Option<crate::Ingest>);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(ing) = self.0.take() {
            ing.release();
        }
    }
}

impl AsyncStore {
    async fn open_ingest(
        &self,
        f: impl FnOnce(&Store) -> Result<crate::Ingest> + Send + 'static,
    ) -> Result<AsyncIngest> {
        let store = self.store.clone();
        let mut claim = blocking(move || f(&store).map(|i| Claim(Some(i)))).await??;
        let ing = claim.0.take().expect("claimed once");
        Ok(AsyncIngest {
            offset: ing.offset(),
            ing: Some(ing),
            job: None,
            buf: bytes::BytesMut::new(),
            failed: None,
        })
    }
}

impl AsyncIngest {
    /// Bytes accepted so far (after a resume: from the durable offset it resumed at).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Waits for the job in flight, if any, and takes the ingest back.
    fn poll_job(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Some(job) = &mut self.job {
            let joined = ready!(Pin::new(job).poll(cx));
            self.job = None;
            let (ing, r) = match joined {
                Ok(x) => x,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Poll::Ready(Err(Error::Interrupted)),
            };
            self.ing = Some(ing);
            if let Err(e) = r {
                self.failed = Some(e);
            }
        }
        match &self.failed {
            Some(e) => Poll::Ready(Err(e.clone())),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Hands the gathered bytes to a job (after the previous one finished).
    fn poll_hand_over(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        ready!(self.poll_job(cx))?;
        if !self.buf.is_empty() {
            let data = self.buf.split().freeze();
            let mut ing = self.ing.take().ok_or(Error::Interrupted)?;
            self.job = Some(tokio::task::spawn_blocking(move || {
                let r = ing.write_all(&data);
                (ing, r)
            }));
        }
        Poll::Ready(Ok(()))
    }

    /// Every accepted byte written, no job running: the ingest is back.
    async fn settle(&mut self) -> Result<crate::Ingest> {
        std::future::poll_fn(|cx| self.poll_hand_over(cx)).await?;
        std::future::poll_fn(|cx| self.poll_job(cx)).await?;
        self.ing.take().ok_or(Error::Interrupted)
    }

    /// Copies `reader` to the end into the upload.
    pub async fn copy_from(&mut self, mut reader: impl AsyncRead + Unpin) -> Result<u64> {
        let mut total = 0;
        loop {
            if self.buf.len() >= CHUNK {
                std::future::poll_fn(|cx| self.poll_hand_over(cx)).await?;
            }
            self.buf.reserve(CHUNK - self.buf.len());
            let n = reader
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| Error::io("read", "input", e))?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            self.offset += n as u64;
        }
    }

    /// [`Ingest::sync`](crate::Ingest::sync): waits for every byte written so far.
    pub async fn sync(&mut self) -> Result<u64> {
        let mut ing = self.settle().await?;
        let (ing, r) = blocking(move || {
            let r = ing.sync();
            (ing, r)
        })
        .await?;
        self.ing = Some(ing);
        r
    }

    /// [`Ingest::suspend`](crate::Ingest::suspend). After a failed write the upload is
    /// released at its last sync point instead (its durable bytes are kept) and the
    /// failure is returned.
    pub async fn suspend(mut self) -> Result<u64> {
        match self.settle().await {
            Ok(ing) => blocking(move || ing.suspend()).await?,
            Err(e) => {
                if let Some(ing) = self.ing.take() {
                    ing.release();
                }
                Err(e)
            }
        }
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
        let ing = self.settle().await?;
        blocking(move || ing.commit_expecting(digest, size)).await?
    }
}

impl Drop for AsyncIngest {
    fn drop(&mut self) {
        // A job in flight drops its ingest (discarding it) on its own blocking thread.
        if let Some(ing) = self.ing.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || drop(ing));
                }
                Err(_) => drop(ing),
            }
        }
    }
}

impl AsyncWrite for AsyncIngest {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() >= CHUNK {
            ready!(this.poll_hand_over(cx)).map_err(std::io::Error::other)?;
        }
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(std::io::Error::other(e.clone())));
        }
        let n = buf.len().min(CHUNK - this.buf.len());
        this.buf.extend_from_slice(&buf[..n]);
        this.offset += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Every accepted byte handed to the ingest (durability is `sync`'s business).
        let this = &mut *self;
        ready!(this.poll_hand_over(cx)).map_err(std::io::Error::other)?;
        this.poll_job(cx).map_err(std::io::Error::other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}
