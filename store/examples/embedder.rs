//! A small service built on layerstore, as a registry or build cache would embed it:
//!
//! * it opens the store once (holding it read-write) and serves the `store` command line
//!   on `ROOT/admin.sock`, so `store images`, `store gc`, `store verify` ... work from a
//!   shell while it runs;
//! * every round it pushes an image the way an OCI distribution push does: a lease first,
//!   the layers streamed concurrently into uploads (`AsyncWrite`), config and manifest,
//!   a tag, a container for some images, then the lease released;
//! * it keeps the newest `KEEP` tags and untags older ones, so the collector, run on a
//!   schedule, has work;
//! * it stops when its standard input closes (or after `--rounds N`), printing a summary.
//!
//! ```text
//! cargo run --example embedder -- /tmp/store          # then, in another shell:
//! store --root /tmp/store images
//! store --root /tmp/store verify --deep
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use layerstore::aio::AsyncStore;
use layerstore::{GcOptions, Kind, Options, PutOptions};
use tokio::io::AsyncWriteExt;

/// Tags kept; older ones are removed (their images become garbage).
const KEEP: u64 = 5;
/// Layers per image, pushed concurrently.
const LAYERS: u64 = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let root = args.next().ok_or("usage: embedder ROOT [--rounds N]")?;
    let rounds: Option<u64> = match (args.next().as_deref(), args.next()) {
        (Some("--rounds"), Some(n)) => Some(n.parse()?),
        (None, _) => None,
        _ => return Err("usage: embedder ROOT [--rounds N]".into()),
    };
    let store = AsyncStore::open(&root, Options::default()).await?;
    let _admin = layerstore::admin::serve(store.blocking())?;
    println!("serving {root}");

    // Stop when standard input closes.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            stop.store(true, Ordering::SeqCst);
        });
    }

    // The collector, on a schedule.
    let gc = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            let mut runs = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let opts = GcOptions::default().grace(Duration::ZERO);
                match store.gc(opts).await {
                    Ok(_) => runs += 1,
                    // An admin `store gc` may hold the collector right now.
                    Err(e) => eprintln!("embedder: gc: {e}"),
                }
            }
            runs
        })
    };

    let mut pushed = 0u64;
    while !stop.load(Ordering::SeqCst) && rounds.is_none_or(|r| pushed < r) {
        push(&store, pushed).await?;
        pushed += 1;
        if pushed > KEEP {
            let old = format!("example.com/app:{}", pushed - KEEP - 1);
            let s = store.blocking().clone();
            tokio::task::spawn_blocking(move || s.remove_image(&old, true)).await??;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let gc_runs = gc.await?;
    println!("pushed {pushed} images, ran {gc_runs} collections");
    Ok(())
}

/// One push, as a registry client makes it: under a lease until the tag holds it.
async fn push(store: &AsyncStore, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let s = store.blocking().clone();
    let lease = tokio::task::spawn_blocking(move || s.lease_create(Some(Duration::from_secs(600))))
        .await??
        .id;
    // The layers arrive as concurrent streams.
    let uploads = (0..LAYERS).map(|i| {
        let (store, lease) = (store.clone(), lease.clone());
        tokio::spawn(async move {
            let opts = PutOptions::default().kind(Kind::Layer).lease(&lease);
            let mut up = store.ingest(&format!("push-{n}-{i}"), opts).await?;
            for chunk in 0..8u64 {
                // Some layers are shared between images, most are new.
                let seed = if i == 0 {
                    chunk
                } else {
                    n * 1000 + i * 100 + chunk
                };
                up.write_all(&bytes(seed, 64 << 10)).await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(up.commit().await?)
        })
    });
    let mut layers = Vec::new();
    for u in uploads.collect::<Vec<_>>() {
        layers.push(u.await?.map_err(|e| e.to_string())?);
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        layers
            .iter()
            .map(|l| format!("\"{}\"", l.digest))
            .collect::<Vec<_>>()
            .join(",")
    );
    let config = store
        .put_with(
            config.into_bytes(),
            PutOptions::default().kind(Kind::Config).lease(&lease),
        )
        .await?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.digest,
        config.size,
        layers
            .iter()
            .map(|l| format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#,
                l.digest, l.size
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let s = store.blocking().clone();
    tokio::task::spawn_blocking(move || -> layerstore::Result<()> {
        let m = s.put_manifest(manifest.as_bytes(), PutOptions::default().lease(&lease))?;
        let name = format!("example.com/app:{n}");
        s.tag(&name, &m.descriptor.digest)?;
        if n.is_multiple_of(4) {
            s.container_create(&name, Some(&format!("app-{n}")))?;
        }
        s.lease_remove(&lease)
    })
    .await??;
    Ok(())
}

/// `len` bytes that depend on `seed` only.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
