//! Resuming a large upload (issue 10's goal: a 2 GiB upload resumes in under 50 ms after
//! the open). Writes one upload of `UPLOAD_MIB` MiB (default 2048) under a ref, syncs and
//! suspends it, then times, over 5 rounds: opening the store, resuming the upload (from
//! the hash state saved at the sync point), and — once — resuming it the way a state
//! without a saved hash must (re-reading and re-hashing every byte), and committing the
//! resumed upload (which computes its blake3 over the data on every core).
//!
//! Run: `cargo bench -p layerstore-bench --bench uploads` (`BENCH_DIR` picks the disk;
//! default `target/bench-tmp`).

use std::time::{Duration, Instant};

use layerstore::{Options, PutOptions, Store};

const MIB: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let mib: usize = std::env::var("UPLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let dir = layerstore_bench::bench_dir();
    let root = dir.path().join("store");
    let chunk: Vec<u8> = (0..8 * MIB)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    {
        let store = Store::open(&root, Options::default()).expect("open");
        let mut ing = store.ingest("big", PutOptions::default()).expect("ingest");
        let t = Instant::now();
        for _ in 0..mib / 8 {
            ing.write_all(&chunk).expect("write");
        }
        let n = ing.suspend().expect("suspend");
        println!("wrote and synced {n} bytes in {:.0} ms", ms(t.elapsed()));
    }
    let (mut opens, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let store = Store::open(&root, Options::default()).expect("open");
        opens.push(t.elapsed());
        let t = Instant::now();
        let ing = store.ingest("big", PutOptions::default()).expect("resume");
        resumes.push(t.elapsed());
        assert_eq!(ing.offset(), (mib * MIB) as u64);
        ing.suspend().expect("suspend");
    }
    let resume = median(resumes);
    println!(
        "{mib} MiB upload: open {:.1} ms, resume from the saved hash state {:.2} ms (median of 5)",
        ms(median(opens)),
        ms(resume)
    );
    // The same resume without a saved hash state: what every resume cost before.
    let state = root
        .join("ingest")
        .join(blake3::hash(b"big").to_hex().as_str())
        .join("state");
    let saved = std::fs::read(&state).expect("state");
    let mut v: serde_json::Value = serde_json::from_slice(&saved).expect("json");
    v.as_object_mut().expect("object").remove("hash");
    std::fs::write(&state, serde_json::to_vec(&v).expect("json")).expect("write");
    let store = Store::open(&root, Options::default()).expect("open");
    let t = Instant::now();
    let ing = store.ingest("big", PutOptions::default()).expect("resume");
    let rehash = t.elapsed();
    ing.suspend().expect("suspend");
    println!(
        "resume re-hashing everything: {:.0} ms ({:.0}x the saved-state resume)",
        ms(rehash),
        rehash.as_secs_f64() / resume.as_secs_f64()
    );
    let ing = store.ingest("big", PutOptions::default()).expect("resume");
    let t = Instant::now();
    let d = ing.commit().expect("commit");
    println!(
        "commit of the resumed upload (blake3 of all of it, publish, index): {:.0} ms, {}",
        ms(t.elapsed()),
        d.digest
    );
}
