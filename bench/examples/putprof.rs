//! Ad-hoc timing of one 100k x 4 KiB put_many (not a benchmark; see benches/).
use rand::{RngCore, SeedableRng};
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().unwrap());
    let size: usize = std::env::args().nth(2).map_or(4096, |s| s.parse().unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id().into());
    let blobs: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            v
        })
        .collect();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let store = layerstore::Store::open(dir.path(), layerstore::Options::default()).unwrap();
    let t = std::time::Instant::now();
    store.put_many(&blobs).unwrap();
    let e = t.elapsed();
    eprintln!(
        "{n} x {size}: {:?} = {:.0} blobs/s, {:.2} GB/s",
        e,
        n as f64 / e.as_secs_f64(),
        (n * size) as f64 / e.as_secs_f64() / 1e9
    );
}
