//! Interrupt flags and cancellation by drop: a put, an ingest, an import, an export and an
//! unpack stopped part-way (by their flag, set at a chosen point of their work, or by
//! dropping their `aio` future at that point) fail with `Interrupted` and leave nothing
//! visible: no name, no blob, no scratch object, no partial file or tree; and the same
//! work, not stopped, then succeeds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use layerstore::aio::AsyncStore;
use layerstore::backend::Key;
use layerstore::backend::sim::{SimBackend, SimOp};
use layerstore::unpack::UnpackOptions;
use layerstore::{ErrorKind, ExportFormat, ImportOptions, Kind, Options, PutOptions, Store};

use crate::common::{self, MIB};
use crate::oci;

fn sim_store() -> (SimBackend, Store) {
    let sim = SimBackend::new();
    let store = Store::open_with(Arc::new(sim.clone()), Options::default()).unwrap();
    (sim, store)
}

fn scratch(sim: &SimBackend) -> Vec<Key> {
    sim.objects()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| matches!(k, Key::Scratch(_)))
        .collect()
}

/// An image of four 8 MiB layers (staged through scratch files, never in memory).
fn big_image() -> oci::Built {
    let layers: Vec<Vec<oci::Ent>> = (0..4)
        .map(|i| vec![oci::file(&format!("f{i}"), &common::blob(900 + i, 8 * MIB))])
        .collect();
    oci::plain(&layers)
}

fn import_opts(flag: &Arc<AtomicBool>) -> ImportOptions {
    let mut o = ImportOptions::default();
    o.base_name = Some("test/cancel".to_owned());
    o.interrupt = Some(flag.clone());
    o
}

/// Nothing of `img` is in the store, and no import left scratch behind.
fn assert_nothing_of(sim: &SimBackend, store: &Store, img: &oci::Built) {
    assert!(store.names().unwrap().is_empty(), "{:?}", store.names());
    for b in img.blobs() {
        let d = common::sha256(b);
        assert!(!store.contains(&d).unwrap(), "{d} became visible");
    }
    assert!(scratch(sim).is_empty(), "left {:?}", scratch(sim));
}

/// Sets `flag` at the `n`-th write to a scratch object; counts every such write.
fn set_at_scratch_write(sim: &SimBackend, flag: &Arc<AtomicBool>, n: u64) -> Arc<AtomicU64> {
    let (flag, seen) = (flag.clone(), Arc::new(AtomicU64::new(0)));
    let count = seen.clone();
    sim.hook(SimOp::Write, move |k| {
        if matches!(k, Some(Key::Scratch(_))) && seen.fetch_add(1, Ordering::SeqCst) + 1 == n {
            flag.store(true, Ordering::SeqCst);
        }
        true
    });
    count
}

#[test]
fn an_import_interrupted_mid_layer_commits_nothing_and_removes_its_stage() {
    let img = big_image();
    let tmp = common::tempdir();
    let layout = tmp.path().join("layout");
    img.layout(&layout);
    let archive = oci::oci_archive(&[(&img, "t")], &[]);
    for source in ["layout", "archive"] {
        let (sim, store) = sim_store();
        let flag = Arc::new(AtomicBool::new(false));
        // The third chunk of the first layer staged.
        let writes = set_at_scratch_write(&sim, &flag, 3);
        let opts = import_opts(&flag);
        let run = |opts: &ImportOptions| match source {
            "layout" => store.import_path(&layout, opts),
            _ => store.import_tar(&archive[..], opts),
        };
        let err = run(&opts).unwrap_err();
        assert!(flag.load(Ordering::SeqCst), "{source}: the hook never ran");
        assert_eq!(err.kind(), ErrorKind::Interrupted, "{source}: {err}");
        assert_nothing_of(&sim, &store, &img);
        // It stopped there, not after staging the rest (32 MiB, 32 chunks or more).
        let n = writes.load(Ordering::SeqCst);
        assert!(n < 8, "{source}: {n} scratch writes after the interrupt");
        // Not interrupted, the same import succeeds.
        flag.store(false, Ordering::SeqCst);
        let outcome = run(&opts).unwrap();
        assert_eq!(outcome.images.len(), 1, "{source}");
        for b in img.blobs() {
            assert!(store.contains(&common::sha256(b)).unwrap(), "{source}");
        }
        assert!(scratch(&sim).is_empty(), "{source}");
    }
}

#[test]
fn a_put_or_ingest_with_its_flag_set_stores_nothing() {
    let (sim, store) = sim_store();
    let flag = Arc::new(AtomicBool::new(false));
    let small = common::blob(1, 1000);
    let large = common::blob(2, 6 * MIB);
    // Large: set while its chunks are written to the scratch file.
    set_at_scratch_write(&sim, &flag, 2);
    let err = store
        .put_with(&large, PutOptions::default().interrupt(flag.clone()))
        .unwrap_err();
    assert!(flag.load(Ordering::SeqCst));
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    // Small: set before the call.
    let err = store
        .put_with(&small, PutOptions::default().interrupt(flag.clone()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    for b in [&small, &large] {
        assert!(!store.contains(&common::sha256(b)).unwrap());
    }
    assert!(scratch(&sim).is_empty(), "left {:?}", scratch(&sim));
    // An ingest refuses the next write and its commit, and stays for its owner.
    flag.store(false, Ordering::SeqCst);
    let mut ing = store
        .ingest("up-1", PutOptions::default().interrupt(flag.clone()))
        .unwrap();
    ing.write_all(&large[..MIB]).unwrap();
    flag.store(true, Ordering::SeqCst);
    let err = ing.write_all(&large[MIB..]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    assert_eq!(ing.offset(), MIB as u64);
    let err = ing.commit().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    assert!(!store.contains(&common::sha256(&large)).unwrap());
    assert!(store.uploads().unwrap().is_empty(), "{:?}", store.uploads());
    // Not interrupted, both puts succeed.
    flag.store(false, Ordering::SeqCst);
    for b in [&small, &large] {
        let opts = PutOptions::default().interrupt(flag.clone());
        let d = store.put_with(b, opts.kind(Kind::Layer)).unwrap();
        assert_eq!(&*store.get(&d.digest).unwrap(), &b[..]);
    }
}

/// Entries of the directory `parent` whose name starts with `.`: an export's or an
/// unpack's temporary.
fn hidden(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// A writer that keeps what it is given and sets a flag past 2 MiB.
struct SetAfter<'a>(&'a mut Vec<u8>, &'a AtomicBool);
impl std::io::Write for SetAfter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        if self.0.len() > 2 * MIB {
            self.1.store(true, Ordering::SeqCst);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_interrupted_export_leaves_no_file_and_no_temporary() {
    let store = common::open(&common::tempdir().keep());
    let img = big_image();
    img.store(&store, "test/export:1");
    let out = common::tempdir();
    let refs = ["test/export:1".to_owned()];
    for format in [
        ExportFormat::Oci,
        ExportFormat::Docker,
        ExportFormat::OciDir,
    ] {
        let path = out.path().join(format!("{format:?}"));
        let err = store
            .export_path(&refs, format, &path, &AtomicBool::new(true))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Interrupted, "{format:?}: {err}");
        assert!(!path.exists(), "{format:?}: {} exists", path.display());
        assert!(hidden(out.path()).is_empty(), "{:?}", hidden(out.path()));
    }
    // Cut short mid-stream: the stream holds part of an archive, and the error says so.
    let mut seen = Vec::new();
    let flag = AtomicBool::new(false);
    let err = store
        .export_with(&refs, ExportFormat::Oci, SetAfter(&mut seen, &flag), &flag)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    let whole: usize = img.blobs().iter().map(|b| b.len()).sum();
    assert!(seen.len() < whole, "{} of {whole}", seen.len());
    // Not interrupted, every format is written whole.
    for format in [ExportFormat::Oci, ExportFormat::OciDir] {
        let path = out.path().join(format!("{format:?}"));
        store
            .export_path(&refs, format, &path, &AtomicBool::new(false))
            .unwrap();
        let back = common::open(&common::tempdir().keep());
        let o = back.import_path(&path, &ImportOptions::default()).unwrap();
        assert_eq!(o.images[0].digest, img.digest, "{format:?}");
    }
    assert!(hidden(out.path()).is_empty(), "{:?}", hidden(out.path()));
}

/// An image with one layer of `n` empty files: an unpack of many entries.
fn many_files(n: usize) -> oci::Built {
    let mut ents = vec![oci::dir("d/")];
    ents.extend((0..n).map(|i| oci::file(&format!("d/{i}"), b"")));
    oci::plain(&[ents])
}

/// Waits (polling) until the unpack into `target` has its temporary tree.
fn wait_for_unpack_tree(target: &Path) {
    let parent = target.parent().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hidden(parent).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no unpack started");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn an_unpack_interrupted_mid_layer_removes_its_tree() {
    let store = common::open(&common::tempdir().keep());
    many_files(20_000).store(&store, "test/many:1");
    let out = common::tempdir();
    let target = out.path().join("rootfs");
    let flag = Arc::new(AtomicBool::new(false));
    let mut opts = UnpackOptions::default();
    opts.interrupt = Some(flag.clone());
    let err = std::thread::scope(|s| {
        let run = s.spawn(|| store.unpack("test/many:1", &target, &opts));
        wait_for_unpack_tree(&target);
        flag.store(true, Ordering::SeqCst);
        run.join().unwrap()
    })
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
    assert!(!target.exists());
    assert!(hidden(out.path()).is_empty(), "{:?}", hidden(out.path()));
    flag.store(false, Ordering::SeqCst);
    let report = store.unpack("test/many:1", &target, &opts).unwrap();
    assert_eq!(report.entries, 20_001);
    assert_eq!(std::fs::read_dir(target.join("d")).unwrap().count(), 20_000);
}

/// A runtime with one blocking thread, so that `spawn_blocking(|| ()).await` returns only
/// after every blocking task spawned before it has ended.
fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn dropping_an_import_future_mid_layer_commits_nothing() {
    let img = big_image();
    let tmp = common::tempdir();
    let archive = tmp.path().join("image.tar");
    std::fs::write(&archive, oci::oci_archive(&[(&img, "t")], &[])).unwrap();
    let (sim, store) = sim_store();
    // The import's second scratch write says it started, then waits for the drop.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let mut seen = 0;
    sim.hook(SimOp::Write, move |k| {
        if matches!(k, Some(Key::Scratch(_))) {
            seen += 1;
            if seen == 2 {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                return false;
            }
        }
        true
    });
    let astore = AsyncStore::new(store.clone());
    let rt = one_blocking_thread();
    rt.block_on(async {
        let mut opts = ImportOptions::default();
        opts.base_name = Some("test/cancel".to_owned());
        let mut fut = Box::pin(astore.import_path(archive.clone(), opts));
        tokio::select! {
            r = &mut fut => panic!("the import ended first: {r:?}"),
            _ = started_rx.recv() => {}
        }
        drop(fut);
        go_tx.send(()).unwrap();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
    });
    assert_nothing_of(&sim, &store, &img);
    // Not dropped, the same import completes.
    let mut opts = ImportOptions::default();
    opts.base_name = Some("test/cancel".to_owned());
    let outcome = rt.block_on(astore.import_path(archive, opts)).unwrap();
    assert_eq!(outcome.images[0].digest, img.digest);
    assert!(scratch(&sim).is_empty());
}

#[test]
fn dropping_an_unpack_future_mid_layer_removes_its_tree() {
    let store = common::open(&common::tempdir().keep());
    many_files(20_000).store(&store, "test/many:1");
    let out = common::tempdir();
    let target = out.path().join("rootfs");
    let astore = AsyncStore::new(store.clone());
    let rt = one_blocking_thread();
    rt.block_on(async {
        let mut fut =
            Box::pin(astore.unpack("test/many:1", target.clone(), UnpackOptions::default()));
        // Watched from a plain thread: the one blocking thread runs the unpack.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = target.clone();
        std::thread::spawn(move || {
            wait_for_unpack_tree(&t);
            let _ = tx.send(());
        });
        tokio::select! {
            r = &mut fut => panic!("the unpack ended first: {r:?}"),
            _ = rx => {}
        }
        drop(fut);
        tokio::task::spawn_blocking(|| ()).await.unwrap();
    });
    assert!(!target.exists());
    assert!(hidden(out.path()).is_empty(), "{:?}", hidden(out.path()));
    let report = rt
        .block_on(astore.unpack("test/many:1", target.clone(), UnpackOptions::default()))
        .unwrap();
    assert_eq!(report.entries, 20_001);
}
