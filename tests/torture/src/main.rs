//! `layerstore-torture`: the kill -9 driver.
//!
//! `layerstore-torture run --points N` makes a store, then N times starts a child
//! (`layerstore-torture child`) that runs a random workload of every store operation on it
//! — puts small and large, batches, ingests, imports, tags, rmi, containers, leases,
//! garbage, collections with compaction, `verify --repair` — and prints, for each
//! operation, what it may do before it starts and what it did once it returned. The
//! parent kills the child with SIGKILL at a random moment, reopens the store and checks it
//! against what was acknowledged: every acknowledged blob is there with its bytes, every
//! acknowledged name, container and lease is there and nothing unacknowledged is, the
//! operation that was cut is all or nothing, nothing never put is visible, and `verify
//! --deep` finds no problem. Every 100 points it starts over with a fresh store.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use layerstore::{
    Depth, Digest, Error, GcOptions, ImportOptions, Options, PutOptions, Store, VerifyOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "kill -9 torture for layerstore")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Kill children at N random moments and check the store after each.
    Run {
        /// Kill points.
        #[arg(long, default_value_t = 100)]
        points: u64,
        /// Seed of the whole run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Store root (default: a temporary directory).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Longest a child runs before it is killed, in milliseconds.
        #[arg(long, default_value_t = 400)]
        max_ms: u64,
    },
    /// Run the workload until killed (what `run` starts).
    Child {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        seed: u64,
        /// The lease that protects every acknowledged blob.
        #[arg(long)]
        lease: String,
    },
}

fn opts() -> Options {
    Options::default()
        .shards(4)
        .segment_size(256 << 10)
        .large_threshold(64 << 10)
}

/// Bytes for a seed (blake3's XOF: the parent regenerates them to check).
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(b"layerstore torture");
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

fn sha256(data: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest::from_raw(layerstore::Algorithm::Sha256, &sha2::Sha256::digest(data)).expect("digest")
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Child { root, seed, lease } => child(&root, seed, &lease),
        Cmd::Run {
            points,
            seed,
            root,
            max_ms,
        } => match run(points, seed, root, max_ms) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("layerstore-torture: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

// ---------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------

/// One line to the parent, flushed at once (the kill may come any moment after).
fn say(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// An image's (manifest, config, layer), as bytes.
type Image = (Vec<u8>, Vec<u8>, Vec<u8>);

/// A small image of one layer made from `seed`.
fn image(seed: u64, rng: &mut StdRng) -> Image {
    let mut b = tar::Builder::new(Vec::new());
    let data = blob(seed, rng.random_range(10..90_000));
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "file", data.as_slice()).expect("tar");
    let layer = b.into_inner().expect("tar");
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer).to_string()]}}))
    .expect("json");
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": sha256(&layer).to_string(), "size": layer.len()}]}))
    .expect("json");
    (manifest, config, layer)
}

fn archive(images: &[(&str, &Image)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("tar");
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let mut manifests = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, (m, c, l)) in images {
        for x in [m, c, l] {
            let d = sha256(x);
            if seen.insert(d) {
                add(&format!("blobs/sha256/{}", d.hex()), x);
            }
        }
        manifests.push(
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(m).to_string(), "size": m.len(),
            "annotations": {"org.opencontainers.image.ref.name": name}}),
        );
    }
    let index =
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).expect("json");
    add("index.json", &index);
    b.into_inner().expect("tar")
}

fn child(root: &Path, seed: u64, lease: &str) -> ExitCode {
    let store = match Store::open(root, opts()) {
        Ok(s) => s,
        Err(e) => {
            say(&json!({"error": format!("open: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let no = AtomicBool::new(false);
    let protect = PutOptions::default().lease(lease);
    let mut n = seed.wrapping_mul(1_000_000);
    let mut next = || {
        n += 1;
        n
    };
    loop {
        let r = (|| -> layerstore::Result<()> {
            match rng.random_range(0..100u32) {
                // Small and large puts under the lease.
                0..=24 => {
                    let s = next();
                    let len = if rng.random_range(0..6) == 0 {
                        rng.random_range(64 << 10..400 << 10)
                    } else {
                        rng.random_range(0..6000)
                    };
                    let d = sha256(&blob(s, len));
                    say(&json!({"begin": "put", "started": [[d.to_string(), s, len]]}));
                    store.put_with(&blob(s, len), protect.clone())?;
                    say(&json!({"ack": "put", "protect": [[d.to_string(), s, len]]}));
                }
                // A batch, then the lease takes it.
                25..=34 => {
                    let items: Vec<(u64, usize)> = (0..rng.random_range(2..40))
                        .map(|_| (next(), rng.random_range(0..4000)))
                        .collect();
                    let blobs: Vec<Vec<u8>> = items.iter().map(|&(s, l)| blob(s, l)).collect();
                    let list: Vec<Value> = items
                        .iter()
                        .zip(&blobs)
                        .map(|(&(s, l), b)| json!([sha256(b).to_string(), s, l]))
                        .collect();
                    say(&json!({"begin": "put_many", "started": list}));
                    let ds: Vec<Digest> =
                        store.put_many(&blobs)?.iter().map(|d| d.digest).collect();
                    say(&json!({"ack": "put_many"}));
                    say(&json!({"begin": "lease add"}));
                    store.lease_add(lease, &ds)?;
                    say(&json!({"ack": "lease add", "protect": list}));
                }
                // A streamed ingest.
                35..=41 => {
                    let s = next();
                    let len = rng.random_range(1000..300_000);
                    let data = blob(s, len);
                    let d = sha256(&data);
                    say(&json!({"begin": "ingest", "started": [[d.to_string(), s, len]]}));
                    let mut ing = store.ingest(&format!("upload-{s}"), protect.clone())?;
                    for c in data.chunks(16 << 10) {
                        ing.write_all(c)?;
                    }
                    ing.commit()?;
                    say(&json!({"ack": "ingest", "protect": [[d.to_string(), s, len]]}));
                }
                // An import of one or two images.
                42..=53 => {
                    let k = rng.random_range(1..=2);
                    let imgs: Vec<(String, Image)> = (0..k)
                        .map(|_| {
                            let s = next();
                            (format!("i{s}"), image(s, &mut rng))
                        })
                        .collect();
                    let refs: Vec<(&str, &Image)> =
                        imgs.iter().map(|(n, i)| (n.as_str(), i)).collect();
                    let ar = archive(&refs);
                    let names: Vec<String> = imgs
                        .iter()
                        .map(|(n, _)| format!("docker.io/torture/x:{n}"))
                        .collect();
                    let images: Vec<Value> = imgs
                        .iter()
                        .map(|(_, (m, c, l))| {
                            json!([
                                sha256(m).to_string(),
                                [
                                    sha256(m).to_string(),
                                    sha256(c).to_string(),
                                    sha256(l).to_string()
                                ]
                            ])
                        })
                        .collect();
                    let started: Vec<String> = images
                        .iter()
                        .flat_map(|v| v[1].as_array().expect("closure").clone())
                        .map(|d| d.as_str().expect("digest").to_owned())
                        .collect();
                    say(&json!({"begin": "import", "names": names, "atomic": true,
                        "digests": started, "images": images, "any_lease": true}));
                    let mut o = ImportOptions::default();
                    o.base_name = Some("torture/x".into());
                    store.import_tar(ar.as_slice(), &o)?;
                    let set: Vec<Value> = names
                        .iter()
                        .zip(&images)
                        .map(|(n, i)| json!([n, i[0]]))
                        .collect();
                    say(&json!({"ack": "import", "names_set": set, "images": images}));
                }
                // Another name, or one name fewer.
                54..=59 => {
                    let names = store.names()?;
                    if names.is_empty() {
                        return Ok(());
                    }
                    let (src, d) = &names[rng.random_range(0..names.len())];
                    let alias = format!("docker.io/torture/alias:a{}", next());
                    say(&json!({"begin": "tag", "names": [alias]}));
                    store.tag(&alias, d)?;
                    say(&json!({"ack": "tag", "names_set": [[alias, d.to_string()]]}));
                    let _ = src;
                }
                60..=65 => {
                    let names = store.names()?;
                    if names.is_empty() {
                        return Ok(());
                    }
                    let (n, _) = &names[rng.random_range(0..names.len())];
                    say(&json!({"begin": "rmi", "names": [n]}));
                    match store.remove_image(n, false) {
                        Ok(_) => say(&json!({"ack": "rmi", "names_removed": [n]})),
                        Err(Error::InUse { .. }) => say(&json!({"ack": "rmi"})),
                        Err(e) => return Err(e),
                    }
                }
                // Containers.
                66..=70 => {
                    let names = store.names()?;
                    if names.is_empty() {
                        return Ok(());
                    }
                    let (n, _) = &names[rng.random_range(0..names.len())];
                    say(&json!({"begin": "container create", "any_container": true}));
                    let c = store.container_create(n, None)?;
                    say(&json!({"ack": "container create",
                        "containers_set": [[c.id, c.image.to_string()]]}));
                }
                71..=74 => {
                    let cs = store.containers()?;
                    if cs.is_empty() {
                        return Ok(());
                    }
                    let c = &cs[rng.random_range(0..cs.len())];
                    say(&json!({"begin": "container rm", "containers": [c.id]}));
                    store.container_remove(&c.id)?;
                    say(&json!({"ack": "container rm", "containers_removed": [c.id]}));
                }
                // A lease that comes and goes.
                75..=79 => {
                    say(&json!({"begin": "lease create", "any_lease": true}));
                    let l = store.lease_create(Some(Duration::from_secs(3600)))?.id;
                    say(&json!({"ack": "lease create", "lease_created": l}));
                    let names = store.names()?;
                    if let Some((_, d)) = names.first() {
                        say(&json!({"begin": "lease add"}));
                        store.lease_add(&l, &[*d])?;
                        say(&json!({"ack": "lease add"}));
                    }
                    say(&json!({"begin": "lease rm", "leases": [l]}));
                    store.lease_remove(&l)?;
                    say(&json!({"ack": "lease rm", "lease_removed": l}));
                }
                // Garbage.
                80..=87 => {
                    let s = next();
                    let len = rng.random_range(0..120_000);
                    let d = sha256(&blob(s, len));
                    say(&json!({"begin": "garbage", "started": [[d.to_string(), s, len]]}));
                    store.put(&blob(s, len))?;
                    say(&json!({"ack": "garbage"}));
                }
                // Collections.
                88..=96 => {
                    say(&json!({"begin": "gc"}));
                    store.gc(
                        &GcOptions::default()
                            .grace(Duration::ZERO)
                            .compact_threshold(0.3)
                            .orphan_age(Duration::ZERO),
                        &no,
                    )?;
                    say(&json!({"ack": "gc"}));
                }
                _ => {
                    say(&json!({"begin": "verify --repair"}));
                    let r = store.verify(&VerifyOptions::default().repair(true), &no, &|_| {})?;
                    let q = r.repaired.map_or(0, |r| r.quarantined.len());
                    say(&json!({"ack": "verify --repair", "quarantined": q, "errors": r.errors}));
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            say(&json!({"error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------------------

/// What was acknowledged.
#[derive(Default)]
struct Model {
    lease: String,
    /// Protected blobs: digest -> (seed, length).
    blobs: BTreeMap<Digest, (u64, usize)>,
    names: BTreeMap<String, Digest>,
    images: BTreeMap<Digest, Vec<Digest>>,
    containers: BTreeMap<String, Digest>,
    leases: BTreeSet<String>,
    started: BTreeSet<Digest>,
}

fn digest(v: &Value) -> Digest {
    Digest::parse(v.as_str().expect("a digest string")).expect("a digest")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Model {
    fn begin(&mut self, b: &Value) {
        for s in b["started"].as_array().into_iter().flatten() {
            self.started.insert(digest(&s[0]));
        }
        for d in b["digests"].as_array().into_iter().flatten() {
            self.started.insert(digest(d));
        }
    }

    fn ack(&mut self, a: &Value) {
        for s in a["protect"].as_array().into_iter().flatten() {
            let len = s[2].as_u64().expect("len") as usize;
            self.blobs
                .insert(digest(&s[0]), (s[1].as_u64().expect("seed"), len));
        }
        for i in a["images"].as_array().into_iter().flatten() {
            let closure = i[1]
                .as_array()
                .expect("closure")
                .iter()
                .map(digest)
                .collect();
            self.images.insert(digest(&i[0]), closure);
        }
        for s in a["names_set"].as_array().into_iter().flatten() {
            self.names
                .insert(s[0].as_str().expect("name").to_owned(), digest(&s[1]));
        }
        for n in strings(&a["names_removed"]) {
            self.names.remove(&n);
        }
        for s in a["containers_set"].as_array().into_iter().flatten() {
            self.containers
                .insert(s[0].as_str().expect("id").to_owned(), digest(&s[1]));
        }
        for c in strings(&a["containers_removed"]) {
            self.containers.remove(&c);
        }
        if let Some(l) = a["lease_created"].as_str() {
            self.leases.insert(l.to_owned());
        }
        if let Some(l) = a["lease_removed"].as_str() {
            self.leases.remove(l);
        }
    }

    /// After a cut operation was checked to be all or nothing: what it did is now known
    /// from the store, and the model takes it.
    fn settle(&mut self, store: &Store, cut: &Value) {
        self.ack(&json!({"images": cut["images"]}));
        let names: BTreeMap<String, Digest> = store.names().expect("names").into_iter().collect();
        for n in strings(&cut["names"]) {
            match names.get(&n) {
                Some(d) => self.names.insert(n, *d),
                None => self.names.remove(&n),
            };
        }
        let containers: BTreeMap<String, Digest> = store
            .containers()
            .expect("containers")
            .into_iter()
            .map(|c| (c.id, c.image))
            .collect();
        if cut["any_container"].as_bool() == Some(true) {
            self.containers.clone_from(&containers);
        }
        for c in strings(&cut["containers"]) {
            if !containers.contains_key(&c) {
                self.containers.remove(&c);
            }
        }
        let leases: BTreeSet<String> = store
            .leases()
            .expect("leases")
            .into_iter()
            .map(|l| l.record.id)
            .collect();
        if cut["any_lease"].as_bool() == Some(true) {
            self.leases = leases
                .iter()
                .filter(|l| **l != self.lease)
                .cloned()
                .collect();
        }
        for l in strings(&cut["leases"]) {
            if !leases.contains(&l) {
                self.leases.remove(&l);
            }
        }
    }

    /// Checks a reopened store; `cut` is the operation that was in flight, if any.
    fn check(&self, store: &Store, cut: Option<&Value>) -> Vec<String> {
        let mut bad = Vec::new();
        let null = Value::Null;
        let cut = cut.unwrap_or(&null);
        let what = cut["begin"].as_str().unwrap_or("nothing");
        let may_names: BTreeSet<String> = strings(&cut["names"]).into_iter().collect();
        for (d, (seed, len)) in &self.blobs {
            match store.get(d) {
                Ok(b) if *b == *blob(*seed, *len) => {}
                Ok(_) => bad.push(format!("({what}) {d}: wrong bytes")),
                Err(e) => bad.push(format!("({what}) acknowledged {d} lost: {e}")),
            }
        }
        let names: BTreeMap<String, Digest> = store.names().expect("names").into_iter().collect();
        for (n, d) in &self.names {
            if !may_names.contains(n) && names.get(n) != Some(d) {
                bad.push(format!(
                    "({what}) name {n}: {:?}, acknowledged {d}",
                    names.get(n)
                ));
            }
        }
        for n in names.keys() {
            if !self.names.contains_key(n) && !may_names.contains(n) {
                bad.push(format!("({what}) name {n} was never acknowledged"));
            }
        }
        if cut["atomic"].as_bool() == Some(true) {
            let seen = may_names.iter().filter(|n| names.contains_key(*n)).count();
            if seen != 0 && seen != may_names.len() {
                bad.push(format!(
                    "({what}) {seen} of {} names: not atomic",
                    may_names.len()
                ));
            }
        }
        let containers: BTreeMap<String, Digest> = store
            .containers()
            .expect("containers")
            .into_iter()
            .map(|c| (c.id, c.image))
            .collect();
        let may_containers: BTreeSet<String> = strings(&cut["containers"]).into_iter().collect();
        for (id, d) in &self.containers {
            if !may_containers.contains(id) && containers.get(id) != Some(d) {
                bad.push(format!("({what}) container {id} lost"));
            }
        }
        for id in containers.keys() {
            if !self.containers.contains_key(id)
                && !may_containers.contains(id)
                && cut["any_container"].as_bool() != Some(true)
            {
                bad.push(format!("({what}) container {id} never acknowledged"));
            }
        }
        for img in names.values().chain(containers.values()) {
            for d in self.images.get(img).into_iter().flatten() {
                if let Err(e) = store.get(d) {
                    bad.push(format!("({what}) image {img} lacks {d}: {e}"));
                }
            }
        }
        let leases: BTreeSet<String> = store
            .leases()
            .expect("leases")
            .into_iter()
            .map(|l| l.record.id)
            .collect();
        let may_leases: BTreeSet<String> = strings(&cut["leases"]).into_iter().collect();
        if !leases.contains(&self.lease) {
            bad.push(format!("({what}) the protecting lease is gone"));
        }
        for l in &self.leases {
            if !may_leases.contains(l) && !leases.contains(l) {
                bad.push(format!("({what}) lease {l} lost"));
            }
        }
        for l in &leases {
            if *l != self.lease
                && !self.leases.contains(l)
                && !may_leases.contains(l)
                && cut["any_lease"].as_bool() != Some(true)
            {
                bad.push(format!("({what}) lease {l} never acknowledged"));
            }
        }
        for info in store.iter() {
            let info = info.expect("iter");
            if !self.started.contains(&info.digest) {
                bad.push(format!("({what}) {} was never put", info.digest));
            }
        }
        let r = store
            .verify(
                &VerifyOptions::depth(Depth::Deep),
                &AtomicBool::new(false),
                &|_| {},
            )
            .expect("verify");
        for p in r.problems.iter().filter(|p| p.kind.is_error()) {
            bad.push(format!("({what}) verify --deep: {p:?}"));
        }
        bad
    }
}

fn fresh(root: &Path) -> Result<Model, String> {
    let _ = std::fs::remove_dir_all(root);
    let store = Store::open(root, opts()).map_err(|e| format!("open: {e}"))?;
    let lease = store
        .lease_create(None)
        .map_err(|e| format!("lease: {e}"))?
        .id;
    Ok(Model {
        lease,
        ..Model::default()
    })
}

fn run(points: u64, seed: u64, root: Option<PathBuf>, max_ms: u64) -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = root.unwrap_or_else(|| tmp.path().join("store"));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = fresh(&root)?;
    let started = Instant::now();
    let (mut acks, mut mid_op, mut failures) = (0u64, 0u64, Vec::new());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for point in 0..points {
        if point > 0 && point % 100 == 0 {
            model = fresh(&root)?;
        }
        let mut child = Command::new(&exe)
            .args(["child", "--root"])
            .arg(&root)
            .args([
                "--seed",
                &(seed * 1_000_003 + point).to_string(),
                "--lease",
                &model.lease,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(5..max_ms.max(6))));
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        let mut cut: Option<Value> = None;
        for line in rx.try_iter() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue; // a line torn by the kill
            };
            if v.get("begin").is_some() {
                model.begin(&v);
                cut = Some(v);
            } else if v.get("ack").is_some() {
                if v["quarantined"].as_u64().is_some_and(|q| q > 0)
                    || v["errors"].as_u64().is_some_and(|e| e > 0)
                {
                    failures.push(format!(
                        "point {point}: verify --repair on a healthy store: {v}"
                    ));
                }
                model.ack(&v);
                acks += 1;
                cut = None;
            } else if let Some(e) = v.get("error") {
                failures.push(format!("point {point}: the child failed: {e}"));
            }
        }
        if cut.is_some() {
            mid_op += 1;
        }
        let store = Store::open(&root, opts()).map_err(|e| format!("point {point}: open: {e}"))?;
        for b in model.check(&store, cut.as_ref()) {
            failures.push(format!("point {point}: {b}"));
        }
        if let Some(c) = &cut {
            model.settle(&store, c);
        }
        if !failures.is_empty() {
            break;
        }
    }
    println!(
        "{points} kill points, {mid_op} of them mid-operation, {acks} operations acknowledged, \
         in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        if failures.is_empty() {
            "nothing lost"
        } else {
            "FAILED"
        }
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}
