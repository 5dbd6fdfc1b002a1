//! The floor under the collector's sweep (issue 4): what redb alone takes to delete half
//! of a 1M-key table shaped like the blob index (33-byte digest keys, 76-byte values), in
//! key order, in 32 non-durable transactions plus one durable commit — no re-checks, no
//! other tables. The sweep must do at least this (plus a `refcount` row per child and the
//! edges of each manifest), so it bounds how fast a collection of 1M blobs can be.
//!
//! Not a criterion benchmark: building the table takes longer than the measurement.
//! Run: `cargo bench -p layerstore-bench --bench redb_floor` (`FLOOR_KEYS=200000` for less).

use std::time::Instant;

use redb::{Database, Durability, ReadableDatabase, TableDefinition};

const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");

fn key(i: u64) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = 1;
    k[1..].copy_from_slice(blake3::hash(&i.to_le_bytes()).as_bytes());
    k
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let n: u64 = std::env::var("FLOOR_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let db = Database::builder()
        .set_cache_size(256 << 20)
        .create(dir.path().join("floor.redb"))
        .unwrap();
    let mut keys: Vec<[u8; 33]> = (0..n).map(key).collect();
    keys.sort_unstable();
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(T).unwrap();
        for k in &keys {
            t.insert(&k[..], &[7u8; 76][..]).unwrap();
        }
    }
    w.commit().unwrap();
    // Every other digest, in key order, as the sweep offers them.
    let doomed: Vec<&[u8; 33]> = keys.iter().step_by(2).collect();
    let t = Instant::now();
    for chunk in doomed.chunks(doomed.len().div_ceil(32)) {
        let mut w = db.begin_write().unwrap();
        w.set_durability(Durability::None).unwrap();
        {
            let mut t = w.open_table(T).unwrap();
            for k in chunk {
                t.remove(&k[..]).unwrap();
            }
        }
        w.commit().unwrap();
    }
    let mut w = db.begin_write().unwrap();
    w.set_quick_repair(true);
    w.commit().unwrap();
    let took = t.elapsed();
    let r = db.begin_read().unwrap();
    let left = redb::ReadableTableMetadata::len(&r.open_table(T).unwrap()).unwrap();
    assert_eq!(left, n - doomed.len() as u64);
    println!(
        "redb: deleted {} of {n} keys in key order in {:.3} s ({:.2} µs per key)",
        doomed.len(),
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(u32::try_from(doomed.len()).unwrap())
    );
}
