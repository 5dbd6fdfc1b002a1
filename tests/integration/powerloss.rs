//! Simulated power loss: a scripted workload of every kind of operation runs on the
//! simulated backend, and at every sync (or one in `LAYERSTORE_POWERLOSS_EVERY`) the
//! image a power loss right after it would leave — durable bytes and names, with unsynced
//! writes torn at random — is reopened and checked against a model of what was
//! acknowledged: every acknowledged operation is there with the right bytes, nothing never
//! started is visible, an operation in flight is all or nothing, refcounts and holds equal
//! their definitions (`verify --deep` finds no problem), and the store takes writes, a
//! collection and the resumption of a suspended ingest.
//!
//! Every sync of a 3-round run is checked by default (about 300 points, the CI sample);
//! `LAYERSTORE_POWERLOSS_ROUNDS=30 cargo test --release -p layerstore --test integration
//! powerloss -- --nocapture` checks thousands (docs/RELIABILITY.md);
//! `LAYERSTORE_POWERLOSS_EVERY=N` checks one sync in N.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use layerstore::backend::sim::SimBackend;
use layerstore::{
    Depth, Digest, Error, GcOptions, ImportOptions, Options, PutOptions, Store, VerifyOptions,
};
use rand::Rng;

use crate::common::{self, KIB};
use crate::oci;

fn opts() -> Options {
    Options::default()
        .reserve(0)
        .shards(2)
        .segment_size(16 * KIB as u64)
        .large_threshold(8 * KIB as u64)
}

/// What the workload knows for certain (acknowledged), and what the operation in flight
/// may or may not have done.
#[derive(Clone, Default)]
struct Model {
    /// The lease every protected blob is added to.
    lease: String,
    /// Blobs acknowledged under `lease`.
    leased: BTreeMap<Digest, Arc<Vec<u8>>>,
    /// Every image put or imported: its digest and every blob of its closure.
    images: BTreeMap<Digest, Closure>,
    /// Acknowledged names, containers (id -> image) and leases (other than `lease`).
    names: BTreeMap<String, Digest>,
    containers: BTreeMap<String, Digest>,
    leases: BTreeSet<String>,
    /// A suspended ingest: ref, its bytes, and the acknowledged offset.
    suspended: Option<(String, Arc<Vec<u8>>, u64)>,
    /// Every digest an operation began to store, acknowledged or not.
    started: BTreeSet<Digest>,
    /// What the operation in flight may change.
    flight: Flight,
}

#[derive(Clone, Default, Debug)]
struct Flight {
    what: &'static str,
    /// Names it may add or remove; `atomic`: all of them or none.
    names: BTreeSet<String>,
    atomic: bool,
    containers: BTreeSet<String>,
    leases: BTreeSet<String>,
    /// It may leave leases of its own (an import's short one).
    any_lease: bool,
    /// The suspended ingest may be committed by it.
    ingest: bool,
}

type Shared = Arc<Mutex<Arc<Model>>>;

/// An image's blobs and their bytes.
type Closure = Vec<(Digest, Arc<Vec<u8>>)>;

/// Runs one operation of the workload: `begin` marks what it may do, `act` does it, and
/// `done` records what it did once acknowledged.
fn step<T>(
    shared: &Shared,
    begin: impl FnOnce(&mut Model),
    act: impl FnOnce() -> T,
    done: impl FnOnce(&mut Model, &T),
) -> T {
    {
        let mut g = shared.lock().unwrap();
        let mut m = (**g).clone();
        begin(&mut m);
        *g = Arc::new(m);
    }
    let r = act();
    let mut g = shared.lock().unwrap();
    let mut m = (**g).clone();
    done(&mut m, &r);
    m.flight = Flight::default();
    *g = Arc::new(m);
    r
}

fn flight(what: &'static str) -> Flight {
    Flight {
        what,
        ..Flight::default()
    }
}

fn rc(v: Vec<u8>) -> Arc<Vec<u8>> {
    Arc::new(v)
}

/// The scripted workload: `rounds` rounds of puts (small, batched, large), a suspended and
/// resumed ingest, an import, tags, rmi (forced past a container), containers, leases,
/// garbage, collections with compaction, and a `verify --repair` of a healthy store.
fn workload(store: &Store, shared: &Shared, rounds: u64) {
    let mut rng = common::rng(7);
    let lease = step(
        shared,
        |m| {
            m.flight = Flight {
                any_lease: true,
                ..flight("lease create")
            };
        },
        || store.lease_create(None).expect("lease").id,
        |m, id| m.lease.clone_from(id),
    );
    let protect = PutOptions::default().lease(&lease);
    let no = AtomicBool::new(false);
    for r in 0..rounds {
        // Small puts under the lease.
        for i in 0..4 {
            let b = rc(common::blob(r * 1000 + i, rng.random_range(1..3000)));
            let d = common::sha256(&b);
            step(
                shared,
                |m| {
                    m.started.insert(d);
                    m.flight = flight("put");
                },
                || store.put_with(&b, protect.clone()).expect("put"),
                |m, _| {
                    m.leased.insert(d, b.clone());
                },
            );
        }
        // A batch, then leased in a second step.
        let batch: Vec<Arc<Vec<u8>>> = (0..12)
            .map(|i| rc(common::blob(r * 1000 + 100 + i, rng.random_range(0..2000))))
            .collect();
        let digests: Vec<Digest> = batch.iter().map(|b| common::sha256(b)).collect();
        step(
            shared,
            |m| {
                m.started.extend(digests.iter().copied());
                m.flight = flight("put_many");
            },
            || {
                store
                    .put_many(batch.iter().map(|b| b.as_slice()))
                    .expect("put_many")
            },
            |_, _| {},
        );
        step(
            shared,
            |m| m.flight = flight("lease add"),
            || store.lease_add(&lease, &digests).expect("lease add"),
            |m, ()| {
                for (d, b) in digests.iter().zip(&batch) {
                    m.leased.insert(*d, b.clone());
                }
            },
        );
        // A large put.
        let big = rc(common::blob(
            r * 1000 + 200,
            9 * KIB + rng.random_range(0..20_000),
        ));
        let bd = common::sha256(&big);
        step(
            shared,
            |m| {
                m.started.insert(bd);
                m.flight = flight("large put");
            },
            || store.put_with(&big, protect.clone()).expect("large put"),
            |m, _| {
                m.leased.insert(bd, big.clone());
            },
        );
        // An ingest: half, suspended; resumed and committed in the next round.
        let prev = shared.lock().unwrap().suspended.clone();
        if let Some((rf, data, off)) = prev {
            let d = common::sha256(&data);
            step(
                shared,
                |m| {
                    m.started.insert(d);
                    m.flight = Flight {
                        ingest: true,
                        ..flight("ingest commit")
                    };
                },
                || {
                    let mut ing = store.ingest(&rf, protect.clone()).expect("resume");
                    assert_eq!(ing.offset(), off);
                    ing.write_all(&data[off as usize..]).expect("write");
                    ing.commit().expect("commit")
                },
                |m, _| {
                    m.suspended = None;
                    m.leased.insert(d, data.clone());
                },
            );
        }
        let data = rc(common::blob(r * 1000 + 300, rng.random_range(2000..20_000)));
        let rf = format!("upload-{r}");
        let half = data.len() as u64 / 2;
        step(
            shared,
            |m| m.flight = flight("ingest suspend"),
            || {
                let mut ing = store.ingest(&rf, protect.clone()).expect("ingest");
                ing.write_all(&data[..half as usize]).expect("write");
                ing.suspend().expect("suspend")
            },
            |m, off| m.suspended = Some((rf.clone(), data.clone(), *off)),
        );
        // An import of two images.
        let imgs: Vec<oci::Built> = (0..2)
            .map(|i| {
                oci::plain(&[vec![oci::file(
                    "f",
                    &common::blob(r * 1000 + 400 + i, rng.random_range(100..12_000)),
                )]])
            })
            .collect();
        let names = [format!("t{r}a"), format!("t{r}b")];
        let archive = oci::oci_archive(&[(&imgs[0], &names[0]), (&imgs[1], &names[1])], &[]);
        let full: Vec<String> = names
            .iter()
            .map(|n| format!("docker.io/test/pl:{n}"))
            .collect();
        step(
            shared,
            |m| {
                for b in &imgs {
                    m.started
                        .extend(b.blobs().iter().map(|x| common::sha256(x)));
                }
                m.flight = Flight {
                    names: full.iter().cloned().collect(),
                    atomic: true,
                    any_lease: true,
                    ..flight("import")
                };
            },
            || {
                let mut o = ImportOptions::default();
                o.base_name = Some("test/pl".into());
                store.import_tar(archive.as_slice(), &o).expect("import")
            },
            |m, _| {
                for (b, n) in imgs.iter().zip(&full) {
                    m.images.insert(
                        b.digest,
                        b.blobs()
                            .iter()
                            .map(|x| (common::sha256(x), rc(x.to_vec())))
                            .collect(),
                    );
                    m.names.insert(n.clone(), b.digest);
                }
            },
        );
        // Another name for the first; the previous round's second image loses its name.
        let alias = format!("docker.io/test/alias:{r}");
        step(
            shared,
            |m| {
                m.flight = Flight {
                    names: [alias.clone()].into(),
                    ..flight("tag")
                };
            },
            || store.tag(&alias, &imgs[0].digest).expect("tag"),
            |m, _| {
                m.names.insert(alias.clone(), imgs[0].digest);
            },
        );
        if r > 0 {
            // Every name of the previous round's first image (by digest): it is garbage.
            let prev = shared.lock().unwrap().names[&format!("docker.io/test/pl:t{}a", r - 1)];
            let old: BTreeSet<String> = [
                format!("docker.io/test/pl:t{}a", r - 1),
                format!("docker.io/test/alias:{}", r - 1),
            ]
            .into();
            step(
                shared,
                |m| {
                    m.flight = Flight {
                        names: old.clone(),
                        atomic: true,
                        ..flight("rmi")
                    };
                },
                || store.remove_image(&prev.to_string(), false).expect("rmi"),
                |m, _| {
                    for n in &old {
                        m.names.remove(n);
                    }
                },
            );
        }
        // A container on the second image; its name goes (forced); the container keeps it.
        let c = step(
            shared,
            |m| {
                m.flight = Flight {
                    containers: BTreeSet::new(),
                    ..flight("container create")
                }
            },
            || store.container_create(&full[1], None).expect("container"),
            |m, c| {
                m.containers.insert(c.id.clone(), c.image);
            },
        );
        step(
            shared,
            |m| {
                m.flight = Flight {
                    names: [full[1].clone()].into(),
                    ..flight("rmi --force")
                };
            },
            || {
                assert!(matches!(
                    store.remove_image(&full[1], false),
                    Err(Error::InUse { .. })
                ));
                store.remove_image(&full[1], true).expect("rmi --force")
            },
            |m, _| {
                m.names.remove(&full[1]);
            },
        );
        if r % 2 == 1 {
            step(
                shared,
                |m| {
                    m.flight = Flight {
                        containers: [c.id.clone()].into(),
                        ..flight("container rm")
                    };
                },
                || store.container_remove(&c.id).expect("container rm"),
                |m, _| {
                    m.containers.remove(&c.id);
                },
            );
        }
        // A second lease that comes and goes.
        let l = step(
            shared,
            |m| {
                m.flight = Flight {
                    any_lease: true,
                    ..flight("lease create")
                }
            },
            || {
                store
                    .lease_create(Some(Duration::from_secs(3600)))
                    .expect("lease")
                    .id
            },
            |m, id| {
                m.leases.insert(id.clone());
            },
        );
        step(
            shared,
            |m| m.flight = flight("lease add"),
            || {
                store
                    .lease_add(&l, &[bd, imgs[1].digest])
                    .expect("lease add");
            },
            |_, ()| {},
        );
        step(
            shared,
            |m| {
                m.flight = Flight {
                    leases: [l.clone()].into(),
                    ..flight("lease rm")
                };
            },
            || store.lease_remove(&l).expect("lease rm"),
            |m, ()| {
                m.leases.remove(&l);
            },
        );
        // Garbage, then a collection that compacts.
        for i in 0..6 {
            let g = common::blob(r * 1000 + 500 + i, rng.random_range(100..9000));
            let d = common::sha256(&g);
            step(
                shared,
                |m| {
                    m.started.insert(d);
                    m.flight = flight("garbage put");
                },
                || store.put(&g).expect("put"),
                |_, _| {},
            );
        }
        step(
            shared,
            |m| m.flight = flight("gc"),
            || {
                store
                    .gc(
                        &GcOptions::default()
                            .grace(Duration::ZERO)
                            .compact_threshold(0.3)
                            // Not the suspended upload (the simulated clock stands still).
                            .orphan_age(Duration::from_secs(3600)),
                        &no,
                    )
                    .expect("gc")
            },
            |_, _| {},
        );
        if r % 3 == 2 {
            step(
                shared,
                |m| m.flight = flight("verify --repair"),
                || {
                    store
                        .verify(&VerifyOptions::default().repair(true), &no, &|_| {})
                        .expect("verify --repair")
                },
                |_, rep| {
                    assert_eq!(rep.errors, 0, "{:#?}", rep.problems);
                    assert!(
                        rep.repaired
                            .as_ref()
                            .is_some_and(|r| r.quarantined.is_empty())
                    );
                },
            );
        }
    }
}

/// Checks one crash image against the model; returns what is wrong.
fn check(image: &SimBackend, m: &Model) -> Vec<String> {
    let mut bad = Vec::new();
    let f = &m.flight;
    let store = match Store::open_with(Arc::new(image.clone()), opts()) {
        Ok(s) => s,
        Err(e) => return vec![format!("({}) open: {e:?}", f.what)],
    };
    // Acknowledged, leased blobs.
    for (d, b) in &m.leased {
        match store.get(d) {
            Ok(got) if *got == ***b => {}
            Ok(_) => bad.push(format!("({}) {d}: wrong bytes", f.what)),
            Err(e) => bad.push(format!("({}) leased {d} lost: {e:?}", f.what)),
        }
    }
    // Names: acknowledged ones there (with their images whole), others absent; an atomic
    // operation in flight all or nothing.
    let names: BTreeMap<String, Digest> = store.names().expect("names").into_iter().collect();
    for (n, d) in &m.names {
        if f.names.contains(n) {
            continue;
        }
        match names.get(n) {
            Some(x) if x == d => {}
            other => bad.push(format!(
                "({}) name {n}: {other:?}, acknowledged {d}",
                f.what
            )),
        }
    }
    for (n, d) in &names {
        if !m.names.contains_key(n) && !f.names.contains(n) {
            bad.push(format!(
                "({}) name {n} -> {d} was never acknowledged",
                f.what
            ));
        }
    }
    if f.atomic {
        let seen = f.names.iter().filter(|n| names.contains_key(*n)).count();
        if seen != 0 && seen != f.names.len() {
            bad.push(format!(
                "({}) {seen} of {} names: not atomic",
                f.what,
                f.names.len()
            ));
        }
    }
    let mut live_images: BTreeSet<Digest> = names.values().copied().collect();
    // Containers.
    let containers: BTreeMap<String, Digest> = store
        .containers()
        .expect("containers")
        .into_iter()
        .map(|c| (c.id, c.image))
        .collect();
    for (id, d) in &m.containers {
        if !f.containers.contains(id) && containers.get(id) != Some(d) {
            bad.push(format!("({}) container {id} lost", f.what));
        }
    }
    for id in containers.keys() {
        if !m.containers.contains_key(id)
            && !f.containers.contains(id)
            && f.what != "container create"
        {
            bad.push(format!("({}) container {id} never acknowledged", f.what));
        }
    }
    live_images.extend(containers.values().copied());
    for img in &live_images {
        if let Some(closure) = m.images.get(img) {
            for (d, b) in closure {
                match store.get(d) {
                    Ok(got) if *got == ***b => {}
                    other => bad.push(format!(
                        "({}) image {img}: blob {d}: {:?}",
                        f.what,
                        other.map(|_| "wrong bytes")
                    )),
                }
            }
        }
    }
    // Leases.
    let leases: BTreeSet<String> = store
        .leases()
        .expect("leases")
        .into_iter()
        .map(|l| l.record.id)
        .collect();
    if !m.lease.is_empty() && !leases.contains(&m.lease) {
        bad.push(format!("({}) the main lease is gone", f.what));
    }
    for l in &m.leases {
        if !f.leases.contains(l) && !leases.contains(l) {
            bad.push(format!("({}) lease {l} lost", f.what));
        }
    }
    for l in &leases {
        if *l != m.lease && !m.leases.contains(l) && !f.leases.contains(l) && !f.any_lease {
            bad.push(format!("({}) lease {l} never acknowledged", f.what));
        }
    }
    // Nothing that no operation started.
    for info in store.iter() {
        let info = info.expect("iter");
        if !m.started.contains(&info.digest) {
            bad.push(format!("({}) {} was never put", f.what, info.digest));
        }
    }
    // The graph and every byte.
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    if r.errors > 0 {
        bad.push(format!("({}) verify --deep: {:#?}", f.what, r.problems));
    }
    // The suspended ingest resumes from its acknowledged offset and commits.
    if let Some((rf, data, off)) = &m.suspended {
        let listed = store.ingests().expect("ingests");
        match listed.iter().find(|(r, _)| r == rf) {
            Some((_, o)) if o == off => {
                let mut ing = store
                    .ingest(rf, PutOptions::default().lease(&m.lease))
                    .expect("resume");
                ing.write_all(&data[*off as usize..]).expect("write");
                let d = ing.commit().expect("commit").digest;
                if *store.get(&d).expect("get") != ***data {
                    bad.push(format!("({}) resumed ingest: wrong bytes", f.what));
                }
            }
            Some((_, o)) => bad.push(format!(
                "({}) ingest {rf} at {o}, acknowledged {off}",
                f.what
            )),
            None if f.ingest => {}
            None => bad.push(format!("({}) suspended ingest {rf} lost", f.what)),
        }
    }
    // It takes writes and a collection.
    if let Err(e) = store.put(b"after the power came back") {
        bad.push(format!("({}) put after reopen: {e:?}", f.what));
    }
    if let Err(e) = store.gc(
        &GcOptions::default().grace(Duration::ZERO),
        &AtomicBool::new(false),
    ) {
        bad.push(format!("({}) gc after reopen: {e:?}", f.what));
    }
    if let Some(n) = m
        .leased
        .keys()
        .find(|d| store.stat(d).ok().flatten().is_none())
    {
        bad.push(format!(
            "({}) {n} collected after reopen though leased",
            f.what
        ));
    }
    bad
}

/// splitmix64, to sample syncs evenly and deterministically.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn every_acknowledged_operation_survives_power_loss_at_every_sync() {
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("LAYERSTORE_POWERLOSS_ROUNDS", 3);
    let every = env("LAYERSTORE_POWERLOSS_EVERY", 1).max(1);
    let sim = SimBackend::new();
    sim.seed(11);
    let store = Store::open_with(Arc::new(sim.clone()), opts()).expect("open");
    let shared: Shared = Arc::new(Mutex::new(Arc::new(Model::default())));
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, SimBackend, Arc<Model>)>(2);
    let model = shared.clone();
    sim.on_sync_where(
        move |n| mix(n).is_multiple_of(every),
        move |n, img| {
            let m = model.lock().unwrap().clone();
            let _ = tx.send((n, img, m));
        },
    );
    // The checks run on a thread and a pool of their own: the workload may sync from the
    // global pool's threads, which then wait for the checker.
    let checker = std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let (mut points, mut failures) = (0u64, Vec::new());
        let mut flights: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (n, img, m) in rx {
            points += 1;
            *flights.entry(m.flight.what).or_default() += 1;
            for b in pool.install(|| check(&img, &m)) {
                failures.push(format!("sync {n}: {b}"));
            }
        }
        (points, failures, flights)
    });
    workload(&store, &shared, rounds);
    sim.clear_on_sync();
    let (points, failures, flights) = checker.join().expect("checker");
    let syncs = sim.syncs();
    eprintln!(
        "power loss: {points} of {syncs} syncs checked ({rounds} rounds); in flight: {flights:?}"
    );
    assert!(points >= syncs / every / 2, "{points} of {syncs}");
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The workload itself ends consistent.
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    assert_eq!(r.errors, 0, "{:#?}", r.problems);
}
