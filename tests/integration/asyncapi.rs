//! The async face (`layerstore::aio`): 64 concurrent ingests on a multi-threaded runtime;
//! no store I/O on a current-thread runtime's own thread (checked at every backend call,
//! and by a watchdog task); reads as `Bytes`, by range and as `AsyncRead`; cancellation of
//! an ingest and of a collection by dropping the future.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerstore::aio::AsyncStore;
use layerstore::backend::sim::{SimBackend, SimOp};
use layerstore::{Depth, Digest, ErrorKind, GcOptions, Options, PutOptions, Store, VerifyOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, KIB, MIB};

fn multi() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

fn current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// A task that measures the longest time its runtime could not run it (it wakes every
/// 5 ms): a liveness check, not a speed goal.
struct Watchdog {
    stop: Arc<AtomicBool>,
    gap: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchdog {
    fn start() -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let gap = Arc::new(AtomicU64::new(0));
        let (s, g) = (stop.clone(), gap.clone());
        let task = tokio::spawn(async move {
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = Instant::now();
                g.fetch_max((now - last).as_micros() as u64, Ordering::Relaxed);
                last = now;
            }
        });
        Watchdog { stop, gap, task }
    }

    /// Stops it; the longest gap seen, in microseconds.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.gap.load(Ordering::Relaxed)
    }
}

/// Records every thread that did store I/O on a simulated backend.
fn io_threads(sim: &SimBackend) -> Arc<Mutex<Vec<std::thread::ThreadId>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for op in [
        SimOp::Create,
        SimOp::Open,
        SimOp::Read,
        SimOp::Write,
        SimOp::Sync,
        SimOp::Rename,
        SimOp::Remove,
        SimOp::MetaRead,
        SimOp::MetaWrite,
    ] {
        let seen = seen.clone();
        sim.hook(op, move |_| {
            let me = std::thread::current().id();
            let mut s = seen.lock().unwrap();
            if !s.contains(&me) {
                s.push(me);
            }
            true
        });
    }
    seen
}

#[test]
fn sixty_four_concurrent_ingests() {
    let dir = common::tempdir();
    let rt = multi();
    rt.block_on(async {
        let store = AsyncStore::open(
            dir.path(),
            Options::default().large_threshold(256 * KIB as u64),
        )
        .await
        .unwrap();
        let lease = store.blocking().lease_create(None).unwrap().id;
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (store, lease) = (store.clone(), lease.clone());
            tasks.push(tokio::spawn(async move {
                let len = if i % 4 == 0 {
                    3 * MIB + i as usize
                } else {
                    16 * KIB * (i as usize + 1)
                };
                let data = common::blob(i, len);
                let want = common::sha256(&data);
                let r#ref = format!("push-{i}");
                let mut w = store
                    .ingest(&r#ref, PutOptions::default().lease(lease))
                    .await
                    .unwrap();
                // Odd-sized writes through AsyncWrite, a sync in the middle.
                let (a, b) = data.split_at(len / 2);
                for c in a.chunks(100_003) {
                    w.write_all(c).await.unwrap();
                }
                assert_eq!(w.sync().await.unwrap(), a.len() as u64);
                w.write_all(b).await.unwrap();
                assert_eq!(w.offset(), len as u64);
                let d = w
                    .commit_expecting(Some(want), Some(len as u64))
                    .await
                    .unwrap();
                (d.digest, data)
            }));
        }
        let mut want = BTreeMap::new();
        for t in tasks {
            let (d, data) = t.await.unwrap();
            want.insert(d, data);
        }
        assert_eq!(want.len(), 64);
        for (d, data) in &want {
            assert!(store.get_bytes(*d).await.unwrap() == data[..], "{d}");
        }
        assert!(store.blocking().uploads().unwrap().is_empty());
    });
}

#[test]
fn a_current_thread_runtime_never_does_store_io_itself() {
    let sim = SimBackend::new();
    let seen = io_threads(&sim);
    let rt = current();
    let runtime_thread = std::thread::current().id();
    // Opened and dropped outside the runtime: only what runs inside is checked.
    let sync_store = Store::open_with(
        Arc::new(sim.clone()),
        Options::default().large_threshold(64 * KIB as u64),
    )
    .unwrap();
    seen.lock().unwrap().clear();
    let store = AsyncStore::new(sync_store.clone());
    let max_gap = rt.block_on(async {
        let watchdog = Watchdog::start();
        let mut digests = Vec::new();
        for i in 0..16u64 {
            let data = common::blob(100 + i, if i % 3 == 0 { 2 * MIB } else { 9 * KIB });
            let d = store
                .ingest_from(
                    &data[..],
                    PutOptions::default(),
                    Some(common::sha256(&data)),
                    None,
                )
                .await
                .unwrap();
            digests.push((d.digest, data));
        }
        let small = store.put(&b"small"[..]).await.unwrap();
        for (d, data) in &digests {
            let mut r = store.reader(*d).await.unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            assert!(back == *data);
            let range = store.read_range(*d, 3, 1000).await.unwrap();
            assert!(range[..] == data[3..1003]);
        }
        let err = store.read_range(small.digest, 6, 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange, "{err:?}");
        let report = store
            .verify(VerifyOptions::depth(Depth::Deep))
            .await
            .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        store
            .gc(GcOptions::default().grace(Duration::ZERO))
            .await
            .unwrap();
        watchdog.finish().await
    });
    // Before anything is dropped on this thread (a store's drop does I/O).
    let seen = seen.lock().unwrap().clone();
    drop(rt);
    drop(store);
    drop(sync_store);
    assert!(!seen.is_empty(), "the hooks saw the store's I/O");
    assert!(
        !seen.contains(&runtime_thread),
        "store I/O ran on the runtime's thread"
    );
    // A liveness bound, not a speed goal: the runtime thread was never held for long.
    assert!(
        max_gap < 2_000_000,
        "the runtime was blocked for {max_gap} us"
    );
}

/// On a multi-thread runtime, reads run in place (`block_in_place`): with one worker and
/// a disk that takes 300 ms per read, a task awaiting reads never holds up the others.
#[test]
fn in_place_reads_on_a_multi_thread_runtime_never_stall_other_tasks() {
    let sim = SimBackend::new();
    let sync_store = Store::open_with(Arc::new(sim.clone()), Options::default()).unwrap();
    let digests: Vec<Digest> = (0..4u64)
        .map(|i| sync_store.put(&common::blob(700 + i, 5000)).unwrap().digest)
        .collect();
    let slow = Arc::new(AtomicU64::new(0));
    for op in [SimOp::Read, SimOp::MetaRead] {
        let slow = slow.clone();
        sim.hook(op, move |_| {
            slow.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(300));
            true
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let store = AsyncStore::new(sync_store.clone());
    let max_gap = rt.block_on(async {
        tokio::spawn(async move {
            let watchdog = Watchdog::start();
            // Let the watchdog start, then read.
            tokio::time::sleep(Duration::from_millis(20)).await;
            for d in &digests {
                let b = store.get_bytes(*d).await.unwrap();
                assert_eq!(b.len(), 5000);
                assert!(store.contains(*d).await.unwrap());
            }
            watchdog.finish().await
        })
        .await
        .unwrap()
    });
    let reads = slow.load(Ordering::Relaxed);
    assert!(reads > 0, "no read reached the (slow) backend");
    // Liveness, not speed: each slow read holds a thread for 300 ms, never the runtime.
    assert!(
        max_gap < 250_000,
        "the runtime was held for {max_gap} us by {reads} slow reads"
    );
}

/// Dropping an ingest mid-stream discards it: nothing visible, no upload left.
#[test]
fn dropping_an_ingest_discards_it() {
    let dir = common::tempdir();
    let rt = multi();
    rt.block_on(async {
        let store = AsyncStore::open(dir.path(), Options::default())
            .await
            .unwrap();
        let data = common::blob(1, 8 * MIB);
        let mut w = store
            .ingest("dropped", PutOptions::default())
            .await
            .unwrap();
        w.write_all(&data[..5 * MIB]).await.unwrap();
        w.sync().await.unwrap();
        assert_eq!(
            store
                .blocking()
                .upload("dropped")
                .unwrap()
                .unwrap()
                .durable_offset,
            5 * MIB as u64
        );
        drop(w);
        // The blocking writer discards it once it sees the channel closed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.blocking().upload("dropped").unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "the dropped upload was never discarded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!store.blocking().contains(&common::sha256(&data)).unwrap());

        // The future of `ingest_from` dropped mid-stream: the same.
        let (mut tx, rx) = tokio::io::duplex(64 * KIB);
        let fut = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .ingest_from(rx, PutOptions::default(), None, None)
                    .await
            })
        };
        tx.write_all(&data[..2 * MIB]).await.unwrap();
        fut.abort();
        assert!(fut.await.unwrap_err().is_cancelled());
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.blocking().info().unwrap().ingests > 0 {
            assert!(
                Instant::now() < deadline,
                "the aborted ingest left its scratch file"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        common::assert_ingest_clean(dir.path());
    });
}

/// Dropping the future of a collection interrupts it. Made deterministic with the
/// one-collection-at-a-time lock: collection A (sync, on a thread) holds it while the
/// async collection B is polled once (its blocking task starts and waits for the lock)
/// and dropped; once A ends, B runs with its flag set and must remove nothing of the
/// garbage made during A (which A does not see, and B would remove).
#[test]
fn dropping_a_gc_future_interrupts_the_collection() {
    let dir = common::tempdir();
    let store = common::open_with(dir.path(), Options::default());
    let zero = GcOptions::default().grace(Duration::ZERO);
    let (in_a_tx, in_a_rx) = std::sync::mpsc::channel::<Vec<Digest>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let a = {
        let (store, zero) = (store.clone(), zero.clone());
        std::thread::spawn(move || {
            store
                .gc_with(&zero, &AtomicBool::new(false), &mut || {
                    let made: Vec<Digest> = (0..100)
                        .map(|i| store.put(&common::blob(1000 + i, 700)).unwrap().digest)
                        .collect();
                    in_a_tx.send(made).unwrap();
                    go_rx.recv().unwrap();
                })
                .unwrap()
        })
    };
    let garbage = in_a_rx.recv().unwrap();
    // One blocking thread: tasks on the pool run in the order they were spawned.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let astore = AsyncStore::new(store.clone());
    rt.block_on(async {
        let mut b = Box::pin(astore.gc(zero.clone()));
        // One poll starts B's blocking task, which waits for A's lock.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut b)
                .await
                .is_err()
        );
        drop(b);
        go_tx.send(()).unwrap();
        // Runs after B's task.
        tokio::task::spawn_blocking(|| ()).await.unwrap();
    });
    a.join().unwrap();
    for d in &garbage {
        assert!(
            store.contains(d).unwrap(),
            "the dropped collection removed {d}"
        );
    }
    // Not dropped, the same collection removes them.
    let report = rt.block_on(astore.gc(zero.clone())).unwrap();
    assert!(report.removed_blobs >= garbage.len() as u64, "{report:?}");
    for d in &garbage {
        assert!(!store.contains(d).unwrap(), "{d} survived");
    }
    let v = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// Cancelling the resume of a suspended upload (its future polled, then dropped, while
/// the blocking open runs) keeps the upload at its sync point.
#[test]
fn a_cancelled_resume_keeps_the_suspended_upload() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let data = common::blob(42, 3 * MIB);
    let mut ing = store.ingest("up", PutOptions::default()).unwrap();
    ing.write_all(&data).unwrap();
    assert_eq!(ing.suspend().unwrap(), data.len() as u64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let astore = AsyncStore::new(store.clone());
    rt.block_on(async {
        // Hold the one blocking thread, so the resume is queued behind it and surely
        // still running when its future goes.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let gate = tokio::task::spawn_blocking(move || go_rx.recv().unwrap());
        let mut fut = Box::pin(astore.ingest("up", PutOptions::default()));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut fut)
                .await
                .is_err()
        );
        drop(fut);
        go_tx.send(()).unwrap();
        gate.await.unwrap();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
    });
    let st = store
        .upload("up")
        .unwrap()
        .expect("the upload is still there");
    assert_eq!(st.durable_offset, data.len() as u64);
    assert!(!st.active, "{st:?}");
    let ing = rt
        .block_on(astore.ingest("up", PutOptions::default()))
        .unwrap();
    assert_eq!(ing.offset(), data.len() as u64);
    let d = rt.block_on(ing.commit()).unwrap();
    assert_eq!(d.digest, common::sha256(&data));
}

/// Uploads left open between writes hold no blocking-pool thread: with a pool of two,
/// three idle uploads do not stop a put.
#[test]
fn idle_async_uploads_hold_no_blocking_thread() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let astore = AsyncStore::new(store.clone());
    rt.block_on(async {
        let mut open = Vec::new();
        for i in 0..3 {
            let mut up = astore
                .ingest(&format!("idle-{i}"), PutOptions::default())
                .await
                .unwrap();
            up.write_all(&common::blob(i, 3 * MIB)).await.unwrap();
            up.flush().await.unwrap();
            open.push(up);
        }
        // A hang guard, not a speed check.
        let put = tokio::time::timeout(Duration::from_secs(30), astore.put(&b"next"[..]))
            .await
            .expect("a put waited behind idle uploads")
            .unwrap();
        assert!(store.contains(&put.digest).unwrap());
        for (i, up) in open.into_iter().enumerate() {
            let d = up.commit().await.unwrap();
            assert_eq!(d.digest, common::sha256(&common::blob(i as u64, 3 * MIB)));
        }
    });
}

/// A flag given in the options is the caller's: an async call replaces it with its own
/// and never sets the caller's, completed or dropped.
#[test]
fn an_async_call_never_sets_the_callers_flag() {
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let astore = AsyncStore::new(store.clone());
    let rt = multi();
    let mine = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        astore
            .put_with(&b"one"[..], PutOptions::default().interrupt(mine.clone()))
            .await
            .unwrap();
        let fut = astore.put_with(
            common::blob(5, 8 * MIB),
            PutOptions::default().interrupt(mine.clone()),
        );
        drop(fut);
    });
    assert!(!mine.load(Ordering::SeqCst));
}
