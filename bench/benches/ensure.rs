//! A registry's existence check (`HEAD` of a blob): `Store::ensure`, which refreshes the
//! blob's `touched` time without a commit of its own, against `Store::ensure_durable`,
//! which commits the refresh before it answers (what every `ensure` cost before). Prints
//! p50 and p99 of single calls on one thread, page cache warm.
//!
//! Run: `cargo bench -p layerstore-bench --bench ensure` (`BENCH_DIR` picks the disk;
//! default `target/bench-tmp`).

use std::time::{Duration, Instant};

use layerstore::{Digest, Options, Store};

fn pct(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let dir = layerstore_bench::bench_dir();
    let store = Store::open(dir.path().join("store"), Options::default()).expect("open");
    let digests: Vec<Digest> = layerstore_bench::small_blobs(&store, 10_000);
    let time = |n: usize, f: &dyn Fn(&Digest) -> bool| {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            assert!(f(&digests[i % digests.len()]));
            v.push(t.elapsed());
        }
        v
    };
    let mut durable = time(2_000, &|d| store.ensure_durable(d).expect("ensure"));
    let mut cheap = time(100_000, &|d| store.ensure(d).expect("ensure"));
    println!("existence checks of stored 4 KiB blobs, one thread:");
    println!(
        "  ensure_durable (a commit each)   p50 {:9.1} us   p99 {:9.1} us",
        pct(&mut durable, 50),
        pct(&mut durable, 99)
    );
    println!(
        "  ensure (refresh, no commit)      p50 {:9.1} us   p99 {:9.1} us",
        pct(&mut cheap, 50),
        pct(&mut cheap, 99)
    );
}
