//! 64 concurrent async ingests of 4-64 MiB layers (issue 10's goal: no longer than hashing
//! the same bytes with two `openssl dgst -sha256` processes plus writing them once with
//! `dd conv=fsync`, measured in the same run).
//!
//! The layers (sizes 4 + i * 60/63 MiB for i in 0..64, ~2.1 GiB of pseudo-random bytes)
//! are in memory, as a registry receives them from clients. Each round, interleaved:
//! * store: a fresh store; 64 tasks on a two-worker tokio runtime each stream one layer
//!   into `AsyncStore::ingest` (1 MiB writes) and commit it with its digest — durable when
//!   the last commit returns;
//! * peer: the same bytes as two files (halves, in the page cache) hashed by two
//!   `openssl dgst -sha256` processes at once, then one file of all of them written with
//!   `dd bs=1M conv=fsync`; the limit is the sum of the two.
//!
//! Run: `cargo bench -p layerstore-bench --bench async_ingest` (`BENCH_DIR` picks the
//! disk, default `target/bench-tmp`; `ROUNDS`, default 5; `LAYERS`, default 64).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerstore::aio::AsyncStore;
use layerstore::{Algorithm, Digest, Options, PutOptions};
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(cmd: &mut Command) {
    let st = cmd.status().expect("run a peer tool");
    assert!(st.success(), "{cmd:?} failed");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let rounds = env("ROUNDS", 5);
    let n = env("LAYERS", 64);
    let dir = layerstore_bench::bench_dir();

    // The layers: xorshift bytes, so neither side can compress or dedupe them.
    let layers: Vec<Arc<Vec<u8>>> = (0..n)
        .map(|i| {
            let len = 4 * MIB + i * 60 * MIB / (n - 1).max(1);
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let v: Vec<u8> = (0..len / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            Arc::new(v)
        })
        .collect();
    let total: usize = layers.iter().map(|l| l.len()).sum();
    let digests: Vec<Digest> = layers
        .iter()
        .map(|l| Digest::compute(Algorithm::Sha256, l))
        .collect();
    // The peer's inputs: two halves (by bytes) and the whole.
    let (a, b, all) = (
        dir.path().join("half-a"),
        dir.path().join("half-b"),
        dir.path().join("all"),
    );
    {
        use std::io::Write;
        let mut fa = std::io::BufWriter::new(std::fs::File::create(&a).expect("create"));
        let mut fb = std::io::BufWriter::new(std::fs::File::create(&b).expect("create"));
        let mut fall = std::io::BufWriter::new(std::fs::File::create(&all).expect("create"));
        let mut seen = 0;
        for l in &layers {
            if seen < total / 2 {
                fa.write_all(l).expect("write");
            } else {
                fb.write_all(l).expect("write");
            }
            fall.write_all(l).expect("write");
            seen += l.len();
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");

    let store_round = |r: usize| {
        let root = dir.path().join(format!("store-{r}"));
        let t = Instant::now();
        rt.block_on(async {
            let store = AsyncStore::open(&root, Options::default())
                .await
                .expect("open");
            let tasks: Vec<_> = layers
                .iter()
                .zip(&digests)
                .enumerate()
                .map(|(i, (l, d))| {
                    let (store, l, d) = (store.clone(), l.clone(), *d);
                    tokio::spawn(async move {
                        let mut up = store
                            .ingest(&format!("layer-{i}"), PutOptions::default())
                            .await
                            .expect("ingest");
                        for chunk in l.chunks(MIB) {
                            up.write_all(chunk).await.expect("write");
                        }
                        up.commit_expecting(Some(d), Some(l.len() as u64))
                            .await
                            .expect("commit")
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        let took = t.elapsed();
        std::fs::remove_dir_all(&root).expect("clean");
        took
    };
    let peer_round = || {
        let t = Instant::now();
        let mut p1 = Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(&a)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("openssl");
        run(Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(&b)
            .stdout(std::process::Stdio::null()));
        assert!(p1.wait().expect("openssl").success());
        let hash = t.elapsed();
        let out = dir.path().join("dd-out");
        let t = Instant::now();
        run(Command::new("dd")
            .arg(format!("if={}", all.display()))
            .arg(format!("of={}", out.display()))
            .args(["bs=1M", "conv=fsync", "status=none"]));
        let write = t.elapsed();
        std::fs::remove_file(&out).expect("clean");
        (hash, write)
    };

    let (mut store_t, mut hash_t, mut write_t, mut limit_t) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        store_t.push(store_round(r));
        let (h, w) = peer_round();
        hash_t.push(h);
        write_t.push(w);
        limit_t.push(h + w);
    }
    let (s, h, w, l) = (
        median(store_t),
        median(hash_t),
        median(write_t),
        median(limit_t),
    );
    println!(
        "{n} concurrent async ingests, {} MiB in all, median of {rounds} interleaved rounds:",
        total / MIB
    );
    println!("  store (ingest, hash, fsync, commit)   {:7.3} s", secs(s));
    println!("  two openssl dgst -sha256 at once      {:7.3} s", secs(h));
    println!("  dd bs=1M conv=fsync                   {:7.3} s", secs(w));
    println!("  limit (openssl + dd)                  {:7.3} s", secs(l));
    println!(
        "  store / limit                         {:7.2}",
        secs(s) / secs(l)
    );
}
