//! Ad-hoc: hash rates of sha2 and blake3 on 4 KiB and 64 KiB inputs.
use sha2::Digest as _;
fn main() {
    for size in [4096usize, 65536] {
        let buf = vec![7u8; size];
        let n = (1usize << 30) / size;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(sha2::Sha256::digest(&buf));
        }
        let e = t.elapsed().as_secs_f64();
        let t2 = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(blake3::hash(&buf));
        }
        let e2 = t2.elapsed().as_secs_f64();
        println!(
            "{size}: sha256 {:.2} GB/s, blake3 {:.2} GB/s",
            1.073741824 / e,
            1.073741824 / e2
        );
    }
}
