//! Helpers shared by the targets that need a store on disk.

use std::path::{Path, PathBuf};

use layerstore::{Options, Store};

/// A fresh scratch directory, on tmpfs where there is one (a store per input is the
/// slow part of these targets).
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

/// Options for a small, quick store: few shards, no reserve file, a small cache.
pub fn options() -> Options {
    Options::default().shards(2).reserve(0).meta_cache(1 << 20)
}

pub fn open(root: &Path) -> Store {
    Store::open(root, options()).unwrap_or_else(|e| panic!("store does not open: {e}"))
}

/// The names in `dir`, sorted.
#[allow(dead_code)] // (not every target uses it)
pub fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("read_dir entry").path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read_dir {}: {e}", dir.display()),
    };
    v.sort();
    v
}
