//! GC at scale (issue 4): a store of 1M blobs — 100k images of 8 layers and a config,
//! half of them unnamed — collected while a writer puts and tags images throughout.
//! Reports the collection's time per phase, its peak memory (the process high-water
//! mark, reset just before the collection), and the writer's worst operation latency.
//!
//! Not a criterion benchmark: one collection of a freshly built store is the measurement,
//! and building it takes longer than collecting it.
//! Run: `cargo bench -p layerstore-bench --bench gc` (`GC_IMAGES=20000` for a smaller run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use layerstore::{GcOptions, Kind, Options, Store};

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn manifest(config: &layerstore::Descriptor, layers: &[layerstore::Descriptor]) -> Vec<u8> {
    let layer = |d: &layerstore::Descriptor| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#,
            d.digest, d.size
        )
    };
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.digest,
        config.size,
        layers.iter().map(layer).collect::<Vec<_>>().join(",")
    )
    .into_bytes()
}

fn main() {
    const CHUNK: usize = 10_000;
    let images: usize = std::env::var("GC_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    // GC_TEMPLATE=DIR: build the store once into DIR, and copy it from there on later runs
    // (building takes longer than collecting).
    let template = std::env::var_os("GC_TEMPLATE").map(std::path::PathBuf::from);
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a {} {}", from.display(), to.display());
        // Write the copy back now, not during the measured collection.
        assert!(
            std::process::Command::new("sync")
                .status()
                .unwrap()
                .success()
        );
    };
    let reuse = template.as_ref().filter(|t| t.join("meta.redb").exists());
    if let Some(t) = reuse {
        copy(t, dir.path());
    }
    let mut store_opts = Options::default();
    if let Some(c) = std::env::var("GC_META_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        store_opts = store_opts.meta_cache(c);
    }
    let store = Store::open(dir.path(), store_opts.clone()).unwrap();

    let t = Instant::now();
    let to_build = if reuse.is_some() { 0 } else { images };
    for start in (0..to_build).step_by(CHUNK) {
        let n = CHUNK.min(images - start);
        // 9 small unique blobs per image: a config and 8 layers.
        let blobs: Vec<Vec<u8>> = (0..n * 9)
            .map(|i| format!("image {} blob {}", start + i / 9, i % 9).into_bytes())
            .collect();
        let descs = store.put_many(&blobs).unwrap();
        let manifests: Vec<(Vec<u8>, Kind)> = descs
            .chunks(9)
            .map(|c| (manifest(&c[0], &c[1..]), Kind::Manifest))
            .collect();
        let mds = store.put_many_kinds(manifests).unwrap();
        // Name every other image: the rest is garbage.
        let tags: Vec<(String, layerstore::Digest)> = mds
            .iter()
            .enumerate()
            .filter(|(i, _)| (start + i) % 2 == 0)
            .map(|(i, d)| (format!("bench/image{}:latest", start + i), d.digest))
            .collect();
        let refs: Vec<(&str, layerstore::Digest)> =
            tags.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        store.tag_many(&refs).unwrap();
    }
    let built = t.elapsed();
    let store = match template.as_ref().filter(|_| reuse.is_none()) {
        Some(t) => {
            drop(store);
            std::fs::create_dir_all(t).unwrap();
            copy(dir.path(), t);
            Store::open(dir.path(), store_opts).unwrap()
        }
        None => store,
    };
    let info = store.info().unwrap();
    println!(
        "built {} blobs ({} images, {} named) in {:.1} s",
        info.blobs,
        images,
        images.div_ceil(2),
        built.as_secs_f64()
    );

    // A writer putting and tagging images throughout the collection.
    let stop = AtomicBool::new(false);
    let rss_before = vm_hwm_kib();
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the high-water mark
    let origin = Instant::now();
    let (report, times) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            // (latency, when it started after `origin`, what)
            let mut latencies: Vec<(Duration, Duration, &str)> = Vec::new();
            let mut i = 0u64;
            let writer_on = std::env::var_os("GC_NO_WRITER").is_none();
            while writer_on && !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut timed = |what: &'static str, f: &mut dyn FnMut()| {
                    let t = Instant::now();
                    f();
                    latencies.push((t.elapsed(), t - origin, what));
                };
                let (mut layer, mut config, mut m) = (None, None, None);
                timed("put", &mut || {
                    layer = Some(store.put(format!("writer layer {i}").as_bytes()).unwrap());
                });
                timed("put", &mut || {
                    config = Some(store.put(format!("writer config {i}").as_bytes()).unwrap());
                });
                let json = manifest(config.as_ref().unwrap(), &[layer.unwrap()]);
                timed("put_manifest", &mut || {
                    m = Some(
                        store
                            .put_manifest(&json, layerstore::PutOptions::default())
                            .unwrap(),
                    );
                });
                let d = m.as_ref().unwrap().descriptor.digest;
                timed("tag", &mut || {
                    store.tag(&format!("bench/writer{i}:latest"), &d).unwrap();
                });
                std::thread::sleep(Duration::from_millis(2));
            }
            latencies.sort();
            latencies
        });
        let t = Instant::now();
        let mut opts = GcOptions::default().grace(Duration::ZERO);
        if let Some(b) = std::env::var("GC_BATCH").ok().and_then(|v| v.parse().ok()) {
            opts.batch = b;
        }
        // GC_BASELINE=1: the writer alone for 3 s (its latencies without a collection).
        let baseline = std::env::var_os("GC_BASELINE").is_some();
        let r = if baseline {
            std::thread::sleep(Duration::from_secs(3));
            layerstore::GcReport::default()
        } else {
            store.gc(&opts, &AtomicBool::new(false)).unwrap()
        };
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let times = writer.join().unwrap();
        println!("gc took {:.3} s", took.as_secs_f64());
        (r, times)
    });
    let rss = vm_hwm_kib();
    println!(
        "removed {} blobs ({} bytes); marked {}; phases: {:?}",
        report.removed_blobs, report.removed_bytes, report.marked, report.phases
    );
    println!(
        "peak RSS during gc: {} MiB (before: {} MiB)",
        rss / 1024,
        rss_before / 1024
    );
    let ms = |d: Option<&(Duration, Duration, &str)>| d.map_or(0.0, |d| d.0.as_secs_f64() * 1000.0);
    println!(
        "writer: {} operations (put, put, put_manifest, tag, ...) during gc; p99 {:.1} ms, worst {:.1} ms",
        times.len(),
        ms(times.get(times.len() * 99 / 100)),
        ms(times.last())
    );
    let mark_end = report.phases.expire_ms + report.phases.mark_ms;
    for (lat, at, what) in times.iter().rev().take(5) {
        println!(
            "  slow: {what} {:.1} ms at {} ms (mark ends at {mark_end} ms)",
            lat.as_secs_f64() * 1000.0,
            at.as_millis()
        );
    }
    if std::env::var_os("GC_BASELINE").is_none() {
        assert_eq!(report.removed_blobs, (images / 2 * 10) as u64);
    }
}
