//! The async face's cost (issue 10's goal: under 2 us per small-blob `get` over the sync
//! call). Stores `BLOBS` 4 KiB blobs, then times, over 5 interleaved rounds, `N` gets of
//! them in a row: `Store::get` on this thread, and `AsyncStore::get` / `get_bytes`
//! awaited one after another on a multi-thread runtime (two workers) and on a
//! current-thread runtime. Prints the per-call median and the overhead over the sync call.
//!
//! Run: `cargo bench -p layerstore-bench --bench asyncapi` (`BENCH_DIR` picks the disk;
//! default `target/bench-tmp`).

use std::time::{Duration, Instant};

use layerstore::aio::AsyncStore;
use layerstore::{Digest, Options, Store};

const BLOBS: usize = 10_000;
const N: usize = 100_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per_call_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9 / f64::from(u32::try_from(N).expect("N fits u32"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let dir = layerstore_bench::bench_dir();
    let store = Store::open(dir.path().join("store"), Options::default()).expect("open");
    let digests: Vec<Digest> = layerstore_bench::small_blobs(&store, BLOBS as u64);
    let astore = AsyncStore::new(store.clone());
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let current = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    let sync = || {
        let t = Instant::now();
        let mut sum = 0usize;
        for i in 0..N {
            sum += store.get(&digests[i % BLOBS]).expect("get")[0] as usize;
        }
        std::hint::black_box(sum);
        t.elapsed()
    };
    let run_async = |rt: &tokio::runtime::Runtime, bytes: bool| {
        rt.block_on(async {
            let t = Instant::now();
            let mut sum = 0usize;
            for i in 0..N {
                let d = digests[i % BLOBS];
                sum += if bytes {
                    astore.get_bytes(d).await.expect("get")[0] as usize
                } else {
                    astore.get(d).await.expect("get")[0] as usize
                };
            }
            std::hint::black_box(sum);
            t.elapsed()
        })
    };
    // Floors: an empty blocking-pool round trip, and the sync call moved in place.
    let empty = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let t = Instant::now();
            for _ in 0..N {
                tokio::task::spawn_blocking(|| ()).await.expect("join");
            }
            t.elapsed()
        })
    };
    let shared = std::sync::Arc::new((store.clone(), digests.clone()));
    let in_place = |rt: &tokio::runtime::Runtime| {
        let shared = shared.clone();
        rt.block_on(async {
            tokio::spawn(async move {
                let (store, digests) = &*shared;
                let t = Instant::now();
                let mut sum = 0usize;
                for i in 0..N {
                    let d = &digests[i % BLOBS];
                    sum += tokio::task::block_in_place(|| store.get(d).expect("get")[0]) as usize;
                }
                std::hint::black_box(sum);
                t.elapsed()
            })
            .await
            .expect("join")
        })
    };
    let mut rows: Vec<(&str, Vec<Duration>)> = vec![
        ("Store::get (sync)", Vec::new()),
        ("AsyncStore::get, multi-thread", Vec::new()),
        ("AsyncStore::get_bytes, multi-thread", Vec::new()),
        ("AsyncStore::get, current-thread", Vec::new()),
        ("spawn_blocking(|| ()) alone, multi-thread", Vec::new()),
        ("block_in_place(get), multi-thread", Vec::new()),
    ];
    // Warm every path once.
    sync();
    run_async(&multi, false);
    run_async(&current, false);
    for _ in 0..5 {
        rows[0].1.push(sync());
        rows[1].1.push(run_async(&multi, false));
        rows[2].1.push(run_async(&multi, true));
        rows[3].1.push(run_async(&current, false));
        rows[4].1.push(empty(&multi));
        rows[5].1.push(in_place(&multi));
    }
    let base = per_call_ns(median(rows[0].1.clone()));
    println!("{N} gets of 4 KiB blobs ({BLOBS} distinct), median of 5 rounds:");
    for (name, times) in rows {
        let ns = per_call_ns(median(times));
        println!(
            "  {name:42} {:8.2} us/call   overhead {:+8.2} us",
            ns / 1e3,
            (ns - base) / 1e3
        );
    }
}
