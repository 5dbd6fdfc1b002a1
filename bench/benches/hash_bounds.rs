//! The ceiling of `verify --fast`'s speed-up over the default (issue 5): the same 400 MiB
//! buffer, already in memory, hashed on both cores with blake3 (what `--fast` computes)
//! and with sha256 (what the default computes). No files, no mapping, no store: the ratio
//! printed is the most any verify can gain from switching hashes on this machine.
//!
//! Run: `cargo bench -p layerstore-bench --bench hash_bounds` (5 rounds, medians).

use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::Digest as _;

const MIB: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let buf: Vec<u8> = (0..400 * MIB)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    // Twelve "layers", as in the verify comparison, hashed two at a time.
    let parts: Vec<&[u8]> = buf.chunks(buf.len() / 12).collect();
    let (mut b3, mut sha) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let out: Vec<[u8; 32]> = parts
            .par_iter()
            .map(|p| {
                let mut h = blake3::Hasher::new();
                for c in p.chunks(MIB) {
                    h.update(c);
                }
                *h.finalize().as_bytes()
            })
            .collect();
        std::hint::black_box(out);
        b3.push(t.elapsed());
        let t = Instant::now();
        let out: Vec<Vec<u8>> = parts
            .par_iter()
            .map(|p| sha2::Sha256::digest(p).to_vec())
            .collect();
        std::hint::black_box(out);
        sha.push(t.elapsed());
    }
    let (b3, sha) = (median(b3), median(sha));
    let gbs = |d: Duration| 400.0 * 1.048_576e6 / d.as_secs_f64() / 1e9;
    println!(
        "400 MiB in memory, {} threads: blake3 {:.1} ms ({:.2} GB/s), sha256 {:.1} ms ({:.2} GB/s): \
         blake3 is {:.2}x faster",
        rayon::current_num_threads(),
        b3.as_secs_f64() * 1e3,
        gbs(b3),
        sha.as_secs_f64() * 1e3,
        gbs(sha),
        sha.as_secs_f64() / b3.as_secs_f64()
    );
}
