//! Benchmarks for layerstore live in `benches/`; this crate holds only what several of
//! them set up the same way.

/// A fresh directory for a bench's store, under `BENCH_DIR` (default `target/bench-tmp`,
/// on the disk the target directory is on); removed when dropped.
///
/// # Panics
/// If the directory cannot be created.
#[must_use]
pub fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&base).expect("bench dir");
    tempfile::tempdir_in(base).expect("bench dir")
}

/// `n` distinct 4 KiB blobs (the first 8 bytes are the index), stored with `put_many`;
/// returns their digests.
///
/// # Panics
/// If the store fails.
#[must_use]
pub fn small_blobs(store: &layerstore::Store, n: u64) -> Vec<layerstore::Digest> {
    let blobs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut b = vec![0u8; 4096];
            b[..8].copy_from_slice(&i.to_le_bytes());
            b
        })
        .collect();
    store
        .put_many(&blobs)
        .expect("put")
        .into_iter()
        .map(|d| d.digest)
        .collect()
}
