//! Interop with the tools people use: real images built by umoci, skopeo and buildah
//! (`tests/fixtures/make-images.sh`, described in `tests/fixtures/README.md`) are imported
//! through the library and the `store` binary, checked blob by blob against what skopeo
//! reports for the source, exported in every format and read back by skopeo. Bad archives
//! must be refused without changing the store and without writing anything outside it.
//!
//! The fixtures are generated once per test binary run, into a directory under
//! `CARGO_TARGET_TMPDIR` keyed by the script's content and the tool versions, so repeated
//! runs reuse them. skopeo and umoci are required: without them every test here fails with
//! a message saying so (CI installs them). buildah is needed only for `oci-multiarch/`;
//! the tests that use it fail, with a message, when it is missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerstore::{Digest, Error, ExportFormat, ImportOptions, Kind, Reference, Store};
use serde_json::Value;

use crate::common;
use crate::common::fixtures;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A fixture path, failing clearly when the fixture was not built.
fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(
        rel != "oci-multiarch" || p.exists(),
        "{} was not built: buildah is not installed (apt-get install -y \
         --no-install-recommends buildah); the multi-platform tests need it",
        p.display()
    );
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

// ---------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------

/// Runs skopeo (without reading any system policy) and returns its output.
fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run skopeo ({e}); it is required by the interop tests (CI installs it)")
        })
}

/// Runs skopeo, failing the test with its output if it fails; returns stdout.
fn skopeo_ok(args: &[&str]) -> Vec<u8> {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `skopeo inspect --raw SRC`: the manifest or index bytes as the source holds them.
fn skopeo_raw(src: &str) -> Vec<u8> {
    skopeo_ok(&["inspect", "--raw", src])
}

/// `skopeo inspect SRC` as JSON.
fn skopeo_inspect(src: &str) -> Value {
    json(&skopeo_ok(&["inspect", src]))
}

/// The `Layers` that `skopeo inspect` reports.
fn skopeo_layers(src: &str) -> Vec<Digest> {
    skopeo_layers_of(&skopeo_inspect(src))
}

/// The `Layers` of `skopeo inspect` output.
fn skopeo_layers_of(v: &Value) -> Vec<Digest> {
    v["Layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no Layers in skopeo inspect output {v}"))
        .iter()
        .map(|l| digest(l.as_str().expect("layer digest string")))
        .collect()
}

/// `skopeo copy` into a fresh `oci:` layout at `dst` (tag `copy`), keeping uncompressed
/// layers as they are so that blobs can be compared byte for byte.
fn skopeo_copy(src: &str, dst: &Path, all: bool) {
    let dst = format!("oci:{}:copy", dst.display());
    let mut args = vec!["copy", "--quiet", "--dest-oci-accept-uncompressed-layers"];
    if all {
        args.push("--all");
    }
    args.push(src);
    args.push(&dst);
    skopeo_ok(&args);
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

fn digest(s: &str) -> Digest {
    Digest::parse(s).unwrap_or_else(|e| panic!("bad digest {s:?}: {e}"))
}

/// The tag of a canonical name (`docker.io/test/x:app` -> `app`).
fn tag_of(name: &str) -> &str {
    match name.rsplit_once(':') {
        Some((_, t)) if !t.contains('/') => t,
        _ => panic!("{name} has no tag"),
    }
}

fn familiar(name: &str) -> String {
    Reference::parse(name)
        .unwrap_or_else(|e| panic!("parse {name}: {e}"))
        .familiar()
}

fn import_opts(base_name: Option<&str>, tags: &[&str]) -> ImportOptions {
    let mut o = ImportOptions::default();
    o.base_name = base_name.map(str::to_owned);
    o.tags = tags.iter().map(|t| (*t).to_owned()).collect();
    o
}

/// The descriptors a manifest or index names: `(digest, size, media type, kind)`.
fn descriptors(doc: &Value) -> Vec<(Digest, u64, String, Kind)> {
    let one = |d: &Value, kind: Kind| {
        (
            digest(d["digest"].as_str().expect("descriptor digest")),
            d["size"].as_u64().expect("descriptor size"),
            d["mediaType"].as_str().unwrap_or_default().to_owned(),
            kind,
        )
    };
    if let Some(ms) = doc["manifests"].as_array() {
        return ms
            .iter()
            .map(|m| {
                let mt = m["mediaType"].as_str().unwrap_or_default();
                let kind = if mt.contains("index") || mt.contains("manifest.list") {
                    Kind::Index
                } else {
                    Kind::Manifest
                };
                one(m, kind)
            })
            .collect();
    }
    let mut out = vec![one(&doc["config"], Kind::Config)];
    for l in doc["layers"].as_array().expect("manifest layers") {
        out.push(one(l, Kind::Layer));
    }
    out
}

/// Layer digests of a manifest document.
fn manifest_layers(doc: &Value) -> Vec<Digest> {
    descriptors(doc)
        .into_iter()
        .filter(|d| d.3 == Kind::Layer)
        .map(|d| d.0)
        .collect()
}

/// Every blob reachable from `root` by parsing the stored JSON (independently of the
/// store's own edges), with its size.
fn walk(store: &Store, root: &Digest) -> BTreeMap<Digest, u64> {
    let mut out = BTreeMap::new();
    let mut queue = vec![*root];
    while let Some(d) = queue.pop() {
        if out.contains_key(&d) {
            continue;
        }
        let bytes = store.get(&d).unwrap_or_else(|e| panic!("get {d}: {e}"));
        out.insert(d, bytes.len() as u64);
        if let Ok(doc) = serde_json::from_slice::<Value>(&bytes)
            && (doc.get("manifests").is_some() || doc.get("layers").is_some())
        {
            for (c, size, _, kind) in descriptors(&doc) {
                if matches!(kind, Kind::Manifest | Kind::Index) {
                    queue.push(c);
                } else if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(c) {
                    let b = store.get(&c).unwrap_or_else(|e| panic!("get {c}: {e}"));
                    assert_eq!(b.len() as u64, size, "size of {c}");
                    slot.insert(size);
                }
            }
        }
    }
    out
}

fn walk_all(store: &Store, roots: &[Digest]) -> BTreeMap<Digest, u64> {
    let mut out = BTreeMap::new();
    for r in roots {
        out.extend(walk(store, r));
    }
    out
}

/// Every blob: digest -> (size, kind name).
fn blob_set(store: &Store) -> BTreeMap<Digest, (u64, &'static str)> {
    store
        .iter()
        .map(|r| {
            let i = r.expect("iterate blobs");
            (i.digest, (i.size, i.kind.name()))
        })
        .collect()
}

/// The regular files under `dir/blobs/sha256`, each checked to hash to its name.
fn layout_blobs(dir: &Path) -> BTreeMap<Digest, Vec<u8>> {
    let mut out = BTreeMap::new();
    let bdir = dir.join("blobs").join("sha256");
    for ent in std::fs::read_dir(&bdir).unwrap_or_else(|e| panic!("list {}: {e}", bdir.display())) {
        let ent = ent.expect("entry");
        let name = ent.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(ent.path()).expect("read blob");
        let d = common::sha256(&bytes);
        assert_eq!(
            d.hex(),
            name,
            "{} does not hash to its name",
            ent.path().display()
        );
        out.insert(d, bytes);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Reading and writing tars
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Item {
    File(Vec<u8>),
    Symlink(String),
    /// A hard link to an earlier entry (target relative to the archive root).
    Hardlink(String),
    Dir,
}

/// Every entry of a tar, in order, by its normalised path.
fn read_tar(bytes: &[u8]) -> Vec<(String, Item)> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let path = e.path().expect("entry path").to_string_lossy().into_owned();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_owned();
        let ty = e.header().entry_type();
        let link = || {
            e.link_name()
                .expect("link name")
                .expect("link target")
                .to_string_lossy()
                .into_owned()
        };
        let item = if ty.is_symlink() {
            Item::Symlink(link())
        } else if ty.is_hard_link() {
            Item::Hardlink(link())
        } else if ty.is_dir() {
            Item::Dir
        } else {
            let mut v = Vec::new();
            e.read_to_end(&mut v).expect("read entry");
            Item::File(v)
        };
        out.push((path, item));
    }
    out
}

/// The bytes at `path` in a tar's entries, following symlinks (relative to the link).
fn tar_file<'a>(items: &'a HashMap<String, Item>, path: &str) -> &'a [u8] {
    let mut p = path.to_owned();
    for _ in 0..8 {
        match items.get(&p) {
            Some(Item::File(v)) => return v,
            Some(Item::Hardlink(t)) => t.clone_into(&mut p),
            Some(Item::Symlink(t)) => {
                let mut parts: Vec<&str> = p.split('/').collect();
                parts.pop();
                for c in t.split('/') {
                    match c {
                        "" | "." => {}
                        ".." => {
                            parts.pop();
                        }
                        c => parts.push(c),
                    }
                }
                p = parts.join("/");
            }
            other => panic!("{path}: not a file in the archive ({other:?})"),
        }
    }
    panic!("{path}: symlink loop")
}

/// Builds a tar whose entry names and link targets are written verbatim (so that hostile
/// names like `../evil` can be made; `tar::Builder` would refuse them).
fn write_tar(entries: &[(String, Item)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, item) in entries {
        let mut h = tar::Header::new_ustar();
        let (data, ty, mode): (&[u8], _, _) = match item {
            Item::File(v) => (v, tar::EntryType::Regular, 0o644),
            Item::Symlink(_) => (&[], tar::EntryType::Symlink, 0o777),
            Item::Hardlink(_) => (&[], tar::EntryType::Link, 0o644),
            Item::Dir => (&[], tar::EntryType::Directory, 0o755),
        };
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        {
            let old = h.as_old_mut();
            let n = name.as_bytes();
            assert!(n.len() <= old.name.len(), "entry name too long: {name}");
            old.name.fill(0);
            old.name[..n.len()].copy_from_slice(n);
            if let Item::Symlink(t) | Item::Hardlink(t) = item {
                let t = t.as_bytes();
                assert!(t.len() <= old.linkname.len(), "link target too long");
                old.linkname.fill(0);
                old.linkname[..t.len()].copy_from_slice(t);
            }
        }
        h.set_cksum();
        b.append(&h, data).expect("append entry");
    }
    b.into_inner().expect("finish tar")
}

/// A tar of an OCI layout directory (`oci-layout`, `index.json`, `blobs/sha256/*`).
fn tar_layout(dir: &Path) -> Vec<u8> {
    let mut entries = vec![
        (
            "oci-layout".to_owned(),
            Item::File(std::fs::read(dir.join("oci-layout")).expect("read oci-layout")),
        ),
        ("blobs/".to_owned(), Item::Dir),
        ("blobs/sha256/".to_owned(), Item::Dir),
    ];
    let bdir = dir.join("blobs").join("sha256");
    let mut names: Vec<_> = std::fs::read_dir(&bdir)
        .expect("list blobs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let v = std::fs::read(bdir.join(&n)).expect("read blob");
        entries.push((format!("blobs/sha256/{n}"), Item::File(v)));
    }
    entries.push((
        "index.json".to_owned(),
        Item::File(std::fs::read(dir.join("index.json")).expect("read index.json")),
    ));
    write_tar(&entries)
}

/// All source blobs of a fixture (layout directory, `dir:` directory or tar), by the
/// digest of their content.
fn source_blobs(src: &Path) -> HashMap<Digest, Vec<u8>> {
    let mut out = HashMap::new();
    if src.is_dir() {
        let mut files: Vec<PathBuf> = common::files_under(src).into_keys().collect();
        files.sort();
        for f in files {
            let v = std::fs::read(&f).expect("read source file");
            out.insert(common::sha256(&v), v);
        }
    } else {
        let bytes = std::fs::read(src).expect("read source archive");
        for (_, item) in read_tar(&bytes) {
            if let Item::File(v) = item {
                out.insert(common::sha256(&v), v);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The fixtures, as test cases
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `Store::import_path`.
    Lib,
    /// `store import PATH --json`.
    Cli,
    /// `store import -` with the archive on standard input (human output).
    Stdin,
}

/// One image of a fixture.
struct Img {
    /// Where skopeo reads it (`{F}` is the fixture directory). `layout:DIR:TAG` reads an
    /// OCI layout directly instead: skopeo 1.9 cannot read Docker media types from an
    /// `oci:` layout (README quirk S5).
    source: &'static str,
    /// The canonical names it must get.
    names: &'static [&'static str],
}

/// One fixture and how to import it.
struct Case {
    /// Path under the fixture directory.
    path: &'static str,
    base_name: Option<&'static str>,
    tags: &'static [&'static str],
    via: Via,
    images: &'static [Img],
    /// A legacy `docker save` archive: the store writes the manifest itself.
    legacy: bool,
}

const OCI_LAYOUT: Case = Case {
    path: "oci-layout",
    base_name: Some("test/layout"),
    tags: &[],
    via: Via::Lib,
    images: &[
        Img {
            source: "oci:{F}/oci-layout:base",
            names: &["docker.io/test/layout:base"],
        },
        Img {
            source: "oci:{F}/oci-layout:app",
            names: &["docker.io/test/layout:app", "docker.io/test/layout:latest"],
        },
        Img {
            source: "oci:{F}/oci-layout:whiteout",
            names: &["docker.io/test/layout:whiteout"],
        },
    ],
    legacy: false,
};

const OCI_ZSTD: Case = Case {
    path: "oci-zstd",
    base_name: Some("test/zstd"),
    tags: &[],
    via: Via::Cli,
    images: &[Img {
        source: "oci:{F}/oci-zstd:app",
        names: &["docker.io/test/zstd:app"],
    }],
    legacy: false,
};

const OCI_UNCOMPRESSED: Case = Case {
    path: "oci-uncompressed",
    base_name: Some("test/uncompressed"),
    tags: &[],
    via: Via::Lib,
    images: &[Img {
        source: "oci:{F}/oci-uncompressed:app",
        names: &["docker.io/test/uncompressed:app"],
    }],
    legacy: false,
};

const OCI_ARCHIVE: Case = Case {
    path: "oci-archive.tar",
    base_name: Some("example.com/arch"),
    tags: &[],
    via: Via::Cli,
    images: &[Img {
        source: "oci-archive:{F}/oci-archive.tar:app",
        names: &["example.com/arch:app"],
    }],
    legacy: false,
};

const DOCKER_ARCHIVE: Case = Case {
    path: "docker-archive.tar",
    base_name: None,
    tags: &[],
    via: Via::Stdin,
    images: &[Img {
        source: "docker-archive:{F}/docker-archive.tar",
        names: &["example.com/test/app:1.0"],
    }],
    legacy: true,
};

const MULTI_DOCKER_ARCHIVE: Case = Case {
    path: "multi-docker-archive.tar",
    base_name: None,
    tags: &[],
    via: Via::Lib,
    images: &[Img {
        source: "docker-archive:{F}/multi-docker-archive.tar",
        names: &[
            "example.com/test/app:1.0",
            "example.com/test/app:latest",
            "other.example/app:2",
        ],
    }],
    legacy: true,
};

const DOCKER_V2S2: Case = Case {
    path: "docker-v2s2-oci",
    base_name: Some("test/v2s2"),
    tags: &[],
    via: Via::Lib,
    // The same manifest as docker-v2s2-dir/ (README section 6), which skopeo can read.
    images: &[Img {
        source: "dir:{F}/docker-v2s2-dir",
        names: &["docker.io/test/v2s2:app"],
    }],
    legacy: false,
};

const OCI_MULTIARCH: Case = Case {
    path: "oci-multiarch",
    base_name: Some("test/multi"),
    tags: &[],
    via: Via::Lib,
    images: &[
        Img {
            source: "oci:{F}/oci-multiarch:multi",
            names: &["docker.io/test/multi:multi"],
        },
        Img {
            source: "layout:{F}/oci-multiarch:multi-v2s2",
            names: &["docker.io/test/multi:multi-v2s2"],
        },
    ],
    legacy: false,
};

const OCI_MISLABELED_GZIP: Case = Case {
    path: "oci-mislabeled-gzip",
    base_name: Some("test/mislabeled"),
    tags: &[],
    via: Via::Cli,
    images: &[Img {
        source: "oci:{F}/oci-mislabeled-gzip:app",
        names: &["docker.io/test/mislabeled:app"],
    }],
    legacy: false,
};

const DOCKER_ARCHIVE_NOTAG: Case = Case {
    path: "docker-archive-notag.tar",
    base_name: None,
    tags: &["notag:1.0"],
    via: Via::Cli,
    images: &[Img {
        source: "docker-archive:{F}/docker-archive-notag.tar",
        names: &["docker.io/library/notag:1.0"],
    }],
    legacy: true,
};

const OCI_ARCHIVE_NOREF: Case = Case {
    path: "oci-archive-noref.tar",
    base_name: None,
    tags: &["example.com/noref:1", "noref:2"],
    via: Via::Stdin,
    images: &[Img {
        source: "oci-archive:{F}/oci-archive-noref.tar",
        names: &["docker.io/library/noref:2", "example.com/noref:1"],
    }],
    legacy: false,
};

const OCI_ARCHIVE_FULLREF: Case = Case {
    path: "oci-archive-fullref.tar",
    base_name: None,
    tags: &[],
    via: Via::Lib,
    images: &[Img {
        source: "oci-archive:{F}/oci-archive-fullref.tar",
        names: &["example.com/test/base:1.0"],
    }],
    legacy: false,
};

impl Case {
    fn src(&self) -> PathBuf {
        fixture(self.path)
    }

    fn opts(&self) -> ImportOptions {
        import_opts(self.base_name, self.tags)
    }

    fn all_names(&self) -> BTreeSet<String> {
        self.images
            .iter()
            .flat_map(|i| i.names.iter().map(|n| (*n).to_owned()))
            .collect()
    }
}

impl Img {
    fn source(&self) -> String {
        self.source
            .replace("{F}", &fixtures().display().to_string())
    }

    /// The manifest or index bytes as the source holds them (skopeo's view; for a
    /// `docker-archive:` source, the manifest skopeo synthesizes).
    fn raw(&self) -> Vec<u8> {
        let src = self.source();
        match src.strip_prefix("layout:") {
            Some(rest) => {
                let (dir, tag) = rest.rsplit_once(':').expect("layout:DIR:TAG");
                let dir = Path::new(dir);
                let index = json(&std::fs::read(dir.join("index.json")).expect("index.json"));
                let entry = index["manifests"]
                    .as_array()
                    .expect("manifests")
                    .iter()
                    .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
                    .unwrap_or_else(|| panic!("{tag} not in {}", dir.display()));
                let d = digest(entry["digest"].as_str().expect("digest"));
                std::fs::read(dir.join("blobs/sha256").join(d.hex())).expect("read manifest")
            }
            None => skopeo_raw(&src),
        }
    }

    /// Whether skopeo can read this source with `skopeo inspect` (not `layout:`).
    fn skopeo_readable(&self) -> bool {
        !self.source.starts_with("layout:")
    }
}

/// What an import reported, from the library or the command line.
#[derive(Debug)]
struct Outcome {
    images: Vec<(Digest, Vec<String>)>,
    /// Blob count and bytes (not printed by the human output).
    totals: Option<(u64, u64)>,
}

/// Imports a fixture as the case says, into the store at `root` (not open elsewhere).
fn import_case(case: &Case, root: &Path) -> Outcome {
    let src = case.src();
    if case.via == Via::Lib {
        let store = common::open(root);
        let o = store
            .import_path(&src, &case.opts())
            .unwrap_or_else(|e| panic!("import {}: {e}", src.display()));
        return Outcome {
            images: o.images.into_iter().map(|i| (i.digest, i.names)).collect(),
            totals: Some((o.blobs, o.bytes)),
        };
    }
    let mut cmd = common::store_cmd(root);
    cmd.arg("import");
    let stdin = if case.via == Via::Stdin {
        cmd.arg("-");
        Some(std::fs::read(&src).expect("read archive"))
    } else {
        cmd.arg(&src).arg("--json");
        None
    };
    for t in case.tags {
        cmd.args(["--tag", t]);
    }
    if let Some(b) = case.base_name {
        cmd.args(["--base-name", b]);
    }
    let out = common::run_with_stdin(&mut cmd, stdin.as_deref());
    let stdout = common::ok_stdout(&out);
    if case.via == Via::Stdin {
        // `imported NAME DIGEST`, one line per name.
        let mut images: Vec<(Digest, Vec<String>)> = Vec::new();
        for line in stdout.lines() {
            let mut w = line.split_whitespace();
            assert_eq!(w.next(), Some("imported"), "output line {line:?}");
            let name = w.next().expect("name").to_owned();
            let d = digest(w.next().expect("digest"));
            assert_eq!(w.next(), None, "output line {line:?}");
            match images.iter_mut().find(|(x, _)| *x == d) {
                Some((_, names)) => names.push(name),
                None => images.push((d, vec![name])),
            }
        }
        return Outcome {
            images,
            totals: None,
        };
    }
    let v = json(stdout.as_bytes());
    Outcome {
        images: v["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| {
                (
                    digest(i["digest"].as_str().expect("digest")),
                    i["names"]
                        .as_array()
                        .expect("names")
                        .iter()
                        .map(|n| n.as_str().expect("name").to_owned())
                        .collect(),
                )
            })
            .collect(),
        totals: Some((
            v["blobs"].as_u64().expect("blobs"),
            v["bytes"].as_u64().expect("bytes"),
        )),
    }
}

/// Checks that every blob a manifest or index names is stored with the right size, kind
/// and exactly the source's bytes, recursively; and that the store's edges are the
/// descriptors. Returns how many blobs it checked.
fn verify_tree(store: &Store, doc_bytes: &[u8], src: &HashMap<Digest, Vec<u8>>) -> usize {
    let doc = json(doc_bytes);
    let parent = common::sha256(doc_bytes);
    let descs = descriptors(&doc);
    let edges: BTreeSet<Digest> = store
        .children(&parent)
        .unwrap_or_else(|e| panic!("children of {parent}: {e}"))
        .into_iter()
        .collect();
    let named: BTreeSet<Digest> = descs.iter().map(|d| d.0).collect();
    assert_eq!(edges, named, "edges of {parent} must be its descriptors");
    let mut n = 0;
    for (d, size, media_type, kind) in descs {
        let got = store
            .get(&d)
            .unwrap_or_else(|e| panic!("{d} ({media_type}) named by {parent} is not stored: {e}"));
        assert_eq!(got.len() as u64, size, "size of {d}");
        assert_eq!(
            common::sha256(&got),
            d,
            "stored bytes of {d} hash elsewhere"
        );
        let want = src
            .get(&d)
            .unwrap_or_else(|| panic!("the source has no blob {d}"));
        assert!(
            *got == want[..],
            "stored bytes of {d} differ from the source"
        );
        let info = store.stat(&d).expect("stat").expect("stored");
        assert_eq!(info.size, size, "recorded size of {d}");
        assert_eq!(info.kind, kind, "recorded kind of {d} ({media_type})");
        n += 1;
        if matches!(kind, Kind::Manifest | Kind::Index) {
            n += verify_tree(store, &got, src);
        }
    }
    n
}

/// For a legacy `docker save` archive: the manifest the store generated names the
/// archive's config and its layer tars (which are the config's `diff_ids`), in order.
fn check_legacy(store: &Store, archive: &Path, d: Digest, skopeo_raw: &[u8]) {
    let bytes = std::fs::read(archive).expect("read archive");
    let items: HashMap<String, Item> = read_tar(&bytes).into_iter().collect();
    let mj = json(tar_file(&items, "manifest.json"));
    let entries = mj.as_array().expect("manifest.json is an array");
    assert_eq!(entries.len(), 1, "skopeo writes one image per archive");
    let entry = &entries[0];
    let cfg_path = entry["Config"].as_str().expect("Config");
    let cfg = tar_file(&items, cfg_path);
    let cfg_digest = common::sha256(cfg);
    assert_eq!(cfg_path, format!("{}.json", cfg_digest.hex()));
    let layers: Vec<(Digest, u64)> = entry["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .map(|p| {
            let b = tar_file(&items, p.as_str().expect("layer path"));
            (common::sha256(b), b.len() as u64)
        })
        .collect();
    // The `<id>/layer.tar` entries (symlinks here) name the same tars.
    let layer_tars: BTreeSet<Digest> = items
        .keys()
        .filter(|k| k.ends_with("/layer.tar"))
        .map(|k| common::sha256(tar_file(&items, k)))
        .collect();
    assert_eq!(
        layer_tars,
        layers.iter().map(|l| l.0).collect::<BTreeSet<_>>(),
        "layer.tar entries"
    );
    let diff_ids: Vec<Digest> = json(cfg)["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|x| digest(x.as_str().expect("diff_id")))
        .collect();
    assert_eq!(
        layers.iter().map(|l| l.0).collect::<Vec<_>>(),
        diff_ids,
        "archive layers are the diff_ids"
    );

    let m = store.get(&d).expect("generated manifest");
    assert_eq!(common::sha256(&m), d);
    let mv = json(&m);
    assert_eq!(mv["schemaVersion"], 2);
    assert_eq!(mv["mediaType"], OCI_MANIFEST);
    assert_eq!(
        mv["config"]["digest"],
        cfg_digest.to_string(),
        "config digest"
    );
    assert_eq!(mv["config"]["size"], cfg.len() as u64, "config size");
    let got: Vec<(Digest, u64, String)> = mv["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                digest(l["digest"].as_str().expect("digest")),
                l["size"].as_u64().expect("size"),
                l["mediaType"].as_str().expect("mediaType").to_owned(),
            )
        })
        .collect();
    let want: Vec<(Digest, u64, String)> = layers
        .iter()
        .map(|(d, s)| (*d, *s, OCI_LAYER.to_owned()))
        .collect();
    assert_eq!(
        got, want,
        "generated layers: the archive's uncompressed layer tars, in order"
    );
    // skopeo's synthesized manifest names the same config and layers.
    let sv = json(skopeo_raw);
    assert_eq!(sv["config"]["digest"], cfg_digest.to_string());
    assert_eq!(manifest_layers(&sv), diff_ids);
}

/// Test 1: import a fixture and check names and every blob against the source.
fn check_import(case: &Case) {
    let src = case.src();
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let outcome = import_case(case, &root);
    let store = common::open(&root);

    let names: BTreeSet<String> = store
        .names()
        .expect("names")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        case.all_names(),
        "names after importing {}",
        case.path
    );
    let reported: BTreeSet<String> = outcome
        .images
        .iter()
        .flat_map(|(_, n)| n.iter().cloned())
        .collect();
    assert_eq!(reported, case.all_names(), "names the import reported");
    for (d, ns) in &outcome.images {
        for n in ns {
            assert_eq!(store.resolve(n).expect("resolve"), *d, "{n}");
        }
    }

    // The import stores exactly what its images reach, and says so.
    let roots: Vec<Digest> = outcome.images.iter().map(|(d, _)| *d).collect();
    let reach = walk_all(&store, &roots);
    let stored = blob_set(&store);
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        reach.keys().collect::<Vec<_>>(),
        "blobs stored by importing {}",
        case.path
    );
    if let Some((blobs, bytes)) = outcome.totals {
        assert_eq!(blobs, reach.len() as u64, "reported blob count");
        assert_eq!(bytes, reach.values().sum::<u64>(), "reported bytes");
    }

    let source = source_blobs(&src);
    for img in case.images {
        let d = store.resolve(img.names[0]).expect("resolve");
        for n in img.names {
            assert_eq!(
                store.resolve(n).expect("resolve"),
                d,
                "{n} and {}",
                img.names[0]
            );
        }
        let raw = img.raw();
        if case.legacy {
            check_legacy(&store, &src, d, &raw);
            let m = store.get(&d).expect("manifest");
            let layers = manifest_layers(&json(&m)).len();
            assert_eq!(
                verify_tree(&store, &m, &source),
                1 + layers,
                "config and layers"
            );
        } else {
            assert_eq!(common::sha256(&raw), d, "digest of {}", img.source);
            assert!(
                *store.get(&d).expect("manifest") == raw[..],
                "stored manifest bytes of {}",
                img.names[0]
            );
            assert!(verify_tree(&store, &raw, &source) >= 2);
        }
        if img.skopeo_readable() {
            for l in skopeo_layers(&img.source()) {
                let b = store
                    .get(&l)
                    .unwrap_or_else(|e| panic!("layer {l} skopeo reports is not stored: {e}"));
                assert_eq!(common::sha256(&b), l);
            }
        }

        // What `inspect` and `images` say.
        let det = store.inspect(img.names[0]).expect("inspect");
        assert_eq!(det.digest, d);
        let mut want_names: Vec<String> = img.names.iter().map(|n| (*n).to_owned()).collect();
        want_names.sort();
        assert_eq!(det.names, want_names, "inspect names");
        assert!(
            det.missing.is_empty(),
            "inspect reports missing {:?}",
            det.missing
        );
        let doc = json(&store.get(&d).expect("manifest"));
        let size: u64 = walk(&store, &d).values().sum();
        assert_eq!(det.size, size, "inspect size");
        if doc.get("manifests").is_some() {
            assert_eq!(det.kind, Kind::Index);
            let want: Vec<Digest> = descriptors(&doc).into_iter().map(|c| c.0).collect();
            let got: Vec<Digest> = det.platforms.iter().map(|p| p.digest).collect();
            assert_eq!(got, want, "inspect platforms");
        } else {
            assert_eq!(det.kind, Kind::Manifest);
            let layers: Vec<Digest> = det.layers.iter().map(|l| l.digest).collect();
            assert_eq!(layers, manifest_layers(&doc), "inspect layers");
            let info = det.config_info.as_ref().expect("config info");
            assert_eq!(info.os.as_deref(), Some("linux"));
            assert_eq!(info.created.as_deref(), Some("2023-11-14T22:13:20Z"));
        }
    }
    let images = store.images().expect("images");
    assert_eq!(
        images
            .iter()
            .map(|i| i.canonical.clone())
            .collect::<BTreeSet<_>>(),
        case.all_names()
    );
    for i in &images {
        assert_eq!(i.digest, store.resolve(&i.canonical).expect("resolve"));
        assert_eq!(i.name, familiar(&i.canonical));
        assert_eq!(
            i.size,
            walk(&store, &i.digest).values().sum::<u64>(),
            "{}",
            i.name
        );
    }
    common::assert_ingest_clean(&root);
}

// ---------------------------------------------------------------------------------------
// Exports
// ---------------------------------------------------------------------------------------

/// An OCI layout read back from an export (tar or directory).
struct Layout {
    /// The `oci-layout` file.
    version: Value,
    index: Value,
    blobs: BTreeMap<Digest, Vec<u8>>,
    /// `manifest.json` (docker format only).
    docker_manifest: Option<Value>,
}

fn layout_from_tar(bytes: &[u8]) -> Layout {
    let mut version = None;
    let mut index = None;
    let mut docker_manifest = None;
    let mut blobs = BTreeMap::new();
    for (path, item) in read_tar(bytes) {
        match (path.as_str(), item) {
            ("oci-layout", Item::File(v)) => version = Some(json(&v)),
            ("index.json", Item::File(v)) => index = Some(json(&v)),
            ("manifest.json", Item::File(v)) => docker_manifest = Some(json(&v)),
            ("blobs" | "blobs/sha256", Item::Dir) => {}
            (p, Item::File(v)) if p.starts_with("blobs/sha256/") => {
                let d = common::sha256(&v);
                assert_eq!(
                    Some(d.hex().as_str()),
                    p.strip_prefix("blobs/sha256/"),
                    "{p}"
                );
                assert!(blobs.insert(d, v).is_none(), "{p} twice in the archive");
            }
            (p, i) => panic!("unexpected entry {p} ({i:?}) in an export"),
        }
    }
    Layout {
        version: version.expect("oci-layout in the export"),
        index: index.expect("index.json in the export"),
        blobs,
        docker_manifest,
    }
}

fn layout_from_dir(dir: &Path) -> Layout {
    let files: BTreeSet<String> = common::files_under(dir)
        .into_keys()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .filter(|p| !p.starts_with("blobs/"))
        .collect();
    assert_eq!(
        files,
        ["index.json", "oci-layout"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        "files of an oci-dir export"
    );
    Layout {
        version: json(&std::fs::read(dir.join("oci-layout")).expect("oci-layout")),
        index: json(&std::fs::read(dir.join("index.json")).expect("index.json")),
        blobs: layout_blobs(dir),
        docker_manifest: None,
    }
}

/// Checks an export of `names` (each a stored name) against the store: the index names
/// each image with its tag, and the blobs are exactly what the images reach, byte-exact.
fn check_layout(store: &Store, l: &Layout, names: &[&str]) {
    assert_eq!(l.version["imageLayoutVersion"], "1.0.0");
    let entries = l.index["manifests"].as_array().expect("index manifests");
    assert_eq!(entries.len(), names.len(), "index entries: {}", l.index);
    let mut roots = Vec::new();
    for (e, n) in entries.iter().zip(names) {
        let d = store.resolve(n).expect("resolve");
        roots.push(d);
        let m = store.get(&d).expect("manifest");
        assert_eq!(e["digest"], d.to_string(), "{n}");
        assert_eq!(e["size"], m.len() as u64, "{n}");
        let declared = json(&m)["mediaType"].as_str().map(str::to_owned);
        let is_index = json(&m).get("manifests").is_some();
        let want =
            declared.unwrap_or_else(|| if is_index { OCI_INDEX } else { OCI_MANIFEST }.to_owned());
        assert_eq!(e["mediaType"], want.as_str(), "{n}");
        assert_eq!(
            e["annotations"]["org.opencontainers.image.ref.name"],
            tag_of(n),
            "{n}"
        );
        assert_eq!(e["annotations"]["io.containerd.image.name"], *n, "{n}");
    }
    let reach = walk_all(store, &roots);
    assert_eq!(
        l.blobs.keys().collect::<Vec<_>>(),
        reach.keys().collect::<Vec<_>>(),
        "an export holds exactly the blobs its images reach"
    );
    for (d, v) in &l.blobs {
        assert!(
            *store.get(d).expect("get") == v[..],
            "exported bytes of {d}"
        );
    }
}

/// The exporting half of test 2 for one name: all three formats, read back by skopeo.
fn check_export_of(root: &Path, name: &str, work: &Path) {
    let tag = tag_of(name);
    let oci = work.join("image.oci.tar");
    let docker = work.join("image.docker.tar");
    let ocidir = work.join("image.oci-dir");
    let (manifest, config_diff_ids, docker_media, is_index) = {
        let store = common::open(root);
        let d = store.resolve(name).expect("resolve");
        let m = store.get(&d).expect("manifest").to_vec();
        let doc = json(&m);
        let is_index = doc.get("manifests").is_some();
        let diff_ids: Vec<Digest> = if is_index {
            Vec::new()
        } else {
            let cfg = descriptors(&doc)[0].0;
            json(&store.get(&cfg).expect("config"))["rootfs"]["diff_ids"]
                .as_array()
                .expect("diff_ids")
                .iter()
                .map(|x| digest(x.as_str().expect("diff_id")))
                .collect()
        };
        let docker_media = doc["mediaType"]
            .as_str()
            .is_some_and(|m| m.starts_with("application/vnd.docker."));
        // OCI archive through the library.
        let f = std::io::BufWriter::new(File::create(&oci).expect("create export"));
        store
            .export(&[name.to_owned()], ExportFormat::Oci, f)
            .unwrap_or_else(|e| panic!("export {name}: {e}"));
        check_layout(
            &store,
            &layout_from_tar(&std::fs::read(&oci).expect("read export")),
            &[name],
        );
        (m, diff_ids, docker_media, is_index)
    };

    // OCI directory and docker archive through the command line; `-o -` must write the
    // same bytes as `-o FILE`.
    common::ok_stdout(&common::cli(
        root,
        &[
            "export",
            name,
            "-o",
            ocidir.to_str().unwrap(),
            "--format",
            "oci-dir",
        ],
    ));
    let stdout_oci = common::run(common::store_cmd(root).args(["export", name, "-o", "-"]));
    assert!(stdout_oci.status.success(), "export -o -: {stdout_oci:?}");
    assert!(
        stdout_oci.stdout == std::fs::read(&oci).expect("read"),
        "`export -o -` and the library wrote different archives"
    );
    if !is_index {
        common::ok_stdout(&common::cli(
            root,
            &[
                "export",
                name,
                "-o",
                docker.to_str().unwrap(),
                "--format",
                "docker",
            ],
        ));
    }
    {
        let store = common::open(root);
        check_layout(&store, &layout_from_dir(&ocidir), &[name]);
        if !is_index {
            let l = layout_from_tar(&std::fs::read(&docker).expect("read docker export"));
            check_layout(&store, &l, &[name]);
            let mj = l.docker_manifest.expect("manifest.json in a docker export");
            let doc = json(&manifest);
            let descs = descriptors(&doc);
            let path = |d: &Digest| format!("blobs/sha256/{}", d.hex());
            let want = serde_json::json!([{
                "Config": path(&descs[0].0),
                "RepoTags": [familiar(name)],
                "Layers": manifest_layers(&doc).iter().map(path).collect::<Vec<_>>(),
            }]);
            assert_eq!(mj, want, "manifest.json of the docker export");
        }
    }

    let d = common::sha256(&manifest);
    let layers = if is_index {
        Vec::new()
    } else {
        manifest_layers(&json(&manifest))
    };
    let oci_src = format!("oci-archive:{}:{tag}", oci.display());
    let dir_src = format!("oci:{}:{tag}", ocidir.display());
    if docker_media {
        // skopeo 1.9 cannot read Docker media types from an OCI layout (README S5): the
        // layouts were checked above by reading them directly.
    } else {
        for src in [&oci_src, &dir_src] {
            assert!(skopeo_raw(src) == manifest, "skopeo inspect --raw {src}");
            if !is_index {
                let v = skopeo_inspect(src);
                assert_eq!(v["Digest"], d.to_string(), "{src}");
                assert_eq!(skopeo_layers(src), layers, "{src}");
            }
            // A copy by skopeo holds our blobs, byte for byte, and nothing else.
            let copy = work.join(format!("copy-{}", src.split(':').next().unwrap()));
            skopeo_copy(src, &copy, is_index);
            let copied = layout_blobs(&copy);
            let store = common::open(root);
            let reach = walk(&store, &d);
            assert_eq!(
                copied.keys().collect::<Vec<_>>(),
                reach.keys().collect::<Vec<_>>(),
                "blobs of skopeo's copy of {src}"
            );
            for (b, v) in &copied {
                assert!(*store.get(b).expect("get") == v[..], "copied bytes of {b}");
            }
        }
    }
    if !is_index {
        let src = format!("docker-archive:{}", docker.display());
        assert_eq!(
            skopeo_layers(&src),
            config_diff_ids,
            "skopeo reads a docker archive's layers by diff_id"
        );
        let raw = json(&skopeo_raw(&src));
        assert_eq!(
            raw["config"]["digest"],
            descriptors(&json(&manifest))[0].0.to_string(),
            "config of the docker export"
        );
        // skopeo decompresses docker-archive layers; kept uncompressed, the copy's layers
        // are named by diff_id, which proves our layers decompress to them.
        let copy = work.join("copy-docker");
        skopeo_copy(&src, &copy, false);
        let copied = layout_blobs(&copy);
        for id in &config_diff_ids {
            assert!(copied.contains_key(id), "copy of {src} lacks layer {id}");
        }
    }
}

/// Test 2: export every imported image in every format and read it back with skopeo.
fn check_export(case: &Case) {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    common::open(&root)
        .import_path(&case.src(), &case.opts())
        .unwrap_or_else(|e| panic!("import {}: {e}", case.path));
    for (i, img) in case.images.iter().enumerate() {
        for (j, name) in img.names.iter().enumerate() {
            let work = dir.path().join(format!("export-{i}-{j}"));
            std::fs::create_dir_all(&work).expect("create work dir");
            check_export_of(&root, name, &work);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------

/// Exports `refs` from the store at `root` in `format` to `out` (a file or a directory).
fn export_to(store: &Store, refs: &[String], format: ExportFormat, out: &Path) {
    if format == ExportFormat::OciDir {
        store
            .export_dir(refs, out)
            .unwrap_or_else(|e| panic!("export {refs:?}: {e}"));
    } else {
        let f = std::io::BufWriter::new(File::create(out).expect("create export"));
        store
            .export(refs, format, f)
            .unwrap_or_else(|e| panic!("export {refs:?} as {format:?}: {e}"));
    }
}

/// A file tree: relative path -> bytes.
fn tree(p: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    if p.is_file() {
        return BTreeMap::from([(PathBuf::new(), std::fs::read(p).expect("read"))]);
    }
    common::files_under(p)
        .into_keys()
        .map(|f| {
            let v = std::fs::read(&f).expect("read");
            (f.strip_prefix(p).unwrap().to_owned(), v)
        })
        .collect()
}

/// Test 3: import -> export -> import into a fresh store -> export is byte-identical, and
/// both stores hold the same blobs and names.
fn check_roundtrip(case: &Case) {
    let dir = common::tempdir();
    let root1 = dir.path().join("store1");
    let store1 = common::open(&root1);
    store1
        .import_path(&case.src(), &case.opts())
        .unwrap_or_else(|e| panic!("import {}: {e}", case.path));
    let names = store1.names().expect("names");
    for (n, format) in [
        ExportFormat::Oci,
        ExportFormat::OciDir,
        ExportFormat::Docker,
    ]
    .into_iter()
    .enumerate()
    {
        // The docker format holds single-platform images only.
        let picked: Vec<(String, Digest)> = names
            .iter()
            .filter(|(_, d)| {
                format != ExportFormat::Docker
                    || json(&store1.get(d).expect("get"))
                        .get("manifests")
                        .is_none()
            })
            .cloned()
            .collect();
        if picked.is_empty() {
            continue;
        }
        let refs: Vec<String> = picked.iter().map(|(r, _)| r.clone()).collect();
        let first = dir.path().join(format!("first-{n}"));
        export_to(&store1, &refs, format, &first);

        let root2 = dir.path().join(format!("store2-{n}"));
        {
            let store2 = common::open(&root2);
            store2
                .import_path(&first, &ImportOptions::default())
                .unwrap_or_else(|e| panic!("re-import of the {format:?} export: {e}"));
            assert_eq!(
                store2.names().expect("names"),
                picked,
                "names after re-importing the {format:?} export"
            );
            let tops: Vec<Digest> = picked.iter().map(|(_, d)| *d).collect();
            let reach = walk_all(&store1, &tops);
            let want: BTreeMap<Digest, (u64, &str)> = blob_set(&store1)
                .into_iter()
                .filter(|(d, _)| reach.contains_key(d))
                .collect();
            assert_eq!(
                blob_set(&store2),
                want,
                "blobs after the {format:?} round trip"
            );
            let second = dir.path().join(format!("second-{n}"));
            export_to(&store2, &refs, format, &second);
            let (a, b) = (tree(&first), tree(&second));
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{format:?} export files"
            );
            for (p, v) in &a {
                assert!(
                    *v == b[p],
                    "{format:?} export is not byte-identical after a round trip: {}",
                    p.display()
                );
            }
        }
    }
}

macro_rules! fixture_tests {
    ($($m:ident: $case:ident;)*) => {$(
        mod $m {
            /// Test 1: import, names, and every blob against skopeo's view of the source.
            #[test]
            fn import() {
                super::check_import(&super::$case);
            }

            /// Test 2: export in every format; skopeo reads and copies each.
            #[test]
            fn export() {
                super::check_export(&super::$case);
            }

            /// Test 3: import -> export -> import -> export is byte-identical.
            #[test]
            fn roundtrip() {
                super::check_roundtrip(&super::$case);
            }
        }
    )*};
}

fixture_tests! {
    oci_layout: OCI_LAYOUT;
    oci_zstd: OCI_ZSTD;
    oci_uncompressed: OCI_UNCOMPRESSED;
    oci_archive: OCI_ARCHIVE;
    docker_archive: DOCKER_ARCHIVE;
    multi_docker_archive: MULTI_DOCKER_ARCHIVE;
    docker_v2s2: DOCKER_V2S2;
    oci_multiarch: OCI_MULTIARCH;
    oci_mislabeled_gzip: OCI_MISLABELED_GZIP;
    docker_archive_notag: DOCKER_ARCHIVE_NOTAG;
    oci_archive_noref: OCI_ARCHIVE_NOREF;
    oci_archive_fullref: OCI_ARCHIVE_FULLREF;
}

// ---------------------------------------------------------------------------------------
// Names: bare tags need a base name
// ---------------------------------------------------------------------------------------

/// An archive that names images only by bare tags is refused without `--base-name`, with
/// an error naming the image, and nothing is committed; with it, every image is named.
#[test]
fn bare_tags_need_a_base_name() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let src = fixture("oci-layout");
    let before = {
        let store = common::open(&root);
        let before = (blob_set(&store), store.names().expect("names"));
        let err = store
            .import_path(&src, &ImportOptions::default())
            .expect_err("bare tags without a base name must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("--base-name"),
            "error should suggest --base-name: {msg}"
        );
        let base =
            json(&std::fs::read(src.join("index.json")).expect("index"))["manifests"][0]["digest"]
                .as_str()
                .expect("digest")
                .to_owned();
        assert!(
            msg.contains(&base),
            "error should name the image {base}: {msg}"
        );
        assert_eq!((blob_set(&store), store.names().expect("names")), before);
        before
    };
    let out = common::cli(&root, &["import", src.to_str().unwrap()]);
    let stderr = common::failed_stderr(&out);
    assert!(stderr.contains("--base-name"), "{stderr}");
    {
        let store = common::open(&root);
        assert_eq!((blob_set(&store), store.names().expect("names")), before);
    }
    // A docker archive without RepoTags needs --tag.
    let out = common::cli(
        &root,
        &[
            "import",
            fixture("docker-archive-notag.tar").to_str().unwrap(),
        ],
    );
    let stderr = common::failed_stderr(&out);
    assert!(stderr.contains("--tag"), "{stderr}");
    let store = common::open(&root);
    assert_eq!((blob_set(&store), store.names().expect("names")), before);
}

// ---------------------------------------------------------------------------------------
// Shared layers
// ---------------------------------------------------------------------------------------

/// The model of reference counts: for each blob, how many distinct stored manifests or
/// indexes name it; holds = how many names point at it. Checks every stored blob.
fn assert_counts_model(store: &Store) {
    let blobs = blob_set(store);
    let mut parents: HashMap<Digest, u64> = HashMap::new();
    for (d, (_, kind)) in &blobs {
        if *kind == Kind::Manifest.name() || *kind == Kind::Index.name() {
            let doc = json(&store.get(d).expect("get"));
            let children: BTreeSet<Digest> = descriptors(&doc).into_iter().map(|c| c.0).collect();
            let edges: BTreeSet<Digest> =
                store.children(d).expect("children").into_iter().collect();
            assert_eq!(edges, children, "edges of {d}");
            for c in children {
                *parents.entry(c).or_default() += 1;
            }
        }
    }
    let mut holds: HashMap<Digest, u64> = HashMap::new();
    for (_, d) in store.names().expect("names") {
        *holds.entry(d).or_default() += 1;
    }
    for d in blobs.keys() {
        let want = (
            parents.get(d).copied().unwrap_or(0),
            holds.get(d).copied().unwrap_or(0),
        );
        assert_eq!(
            store.counts(d).expect("counts"),
            want,
            "(refcount, holds) of {d}"
        );
    }
}

/// Test 4: `base` and `app` share L1 and L2; each shared blob is stored once and its
/// refcount is the number of distinct manifests naming it.
#[test]
fn shared_layers_are_stored_once() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);

    // base alone (L1, L2) from one archive, then app (L1..L4) from another.
    store
        .import_path(
            &fixture("oci-archive-fullref.tar"),
            &ImportOptions::default(),
        )
        .expect("import base");
    assert_eq!(blob_set(&store).len(), 4, "manifest, config, L1, L2");
    let base = store.resolve("example.com/test/base:1.0").expect("base");
    let base_doc = json(&store.get(&base).expect("base manifest"));
    let base_layers = manifest_layers(&base_doc);
    assert_eq!(base_layers.len(), 2);
    store
        .import_path(
            &fixture("oci-archive.tar"),
            &import_opts(Some("example.com/test/app"), &[]),
        )
        .expect("import app");
    let app = store.resolve("example.com/test/app:app").expect("app");
    let app_layers = manifest_layers(&json(&store.get(&app).expect("app manifest")));
    assert_eq!(app_layers[..2], base_layers[..], "app is built on base");
    assert_eq!(
        blob_set(&store).len(),
        8,
        "app adds its manifest, config, L3 and L4 only"
    );
    for l in &base_layers {
        assert_eq!(store.counts(l).expect("counts"), (2, 0), "shared layer {l}");
    }
    for l in &app_layers[2..] {
        assert_eq!(store.counts(l).expect("counts"), (1, 0), "app layer {l}");
    }
    assert_eq!(store.counts(&app).expect("counts"), (0, 1));
    assert_counts_model(&store);
    assert_eq!(
        common::large_files(&root).len(),
        1,
        "only L3 is large, stored once"
    );

    // The whole umoci layout: base, app (twice), whiteout; adds only whiteout's blobs.
    let layout = fixture("oci-layout");
    store
        .import_path(&layout, &import_opts(Some("test/layout"), &[]))
        .expect("import layout");
    let want: BTreeSet<Digest> = layout_blobs(&layout).into_keys().collect();
    let have: BTreeSet<Digest> = blob_set(&store).into_keys().collect();
    assert_eq!(
        have, want,
        "the store holds the layout's 12 blobs, each once"
    );
    assert_eq!(have.len(), 12);
    for l in &base_layers {
        assert_eq!(
            store.counts(l).expect("counts").0,
            3,
            "base, app and whiteout name {l}"
        );
    }
    assert_eq!(
        store.counts(&app).expect("counts"),
        (0, 3),
        "app is named app:app, layout:app, layout:latest"
    );
    assert_counts_model(&store);

    // Docker schema2 manifest of the same image: one new blob, refcounts rise by one.
    store
        .import_path(
            &fixture("docker-v2s2-oci"),
            &import_opts(Some("test/v2s2"), &[]),
        )
        .expect("import v2s2");
    assert_eq!(blob_set(&store).len(), 13, "only the v2s2 manifest is new");
    for l in &base_layers {
        assert_eq!(store.counts(l).expect("counts").0, 4, "{l}");
    }
    assert_counts_model(&store);
    assert_eq!(
        common::large_files(&root).len(),
        1,
        "L3 is still stored once"
    );
    let info = store.info().expect("info");
    let sizes: u64 = blob_set(&store).values().map(|v| v.0).sum();
    assert_eq!(info.blobs, 13);
    assert_eq!(info.bytes, sizes);
    drop(store);

    // The same through the CLI: `store df` sees L1 shared by the images.
    let out = common::ok_stdout(&common::cli(&root, &["df", "--json"]));
    let df = json(out.as_bytes());
    let l1 = base_layers[0].to_string();
    let row = df["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["digest"] == l1.as_str())
        .unwrap_or_else(|| panic!("df lists no {l1}: {df}"));
    assert_eq!(row["images"], 4, "distinct images using L1: {row}");
}

// ---------------------------------------------------------------------------------------
// Atomicity on bad input
// ---------------------------------------------------------------------------------------

/// Everything observable about a store root.
#[derive(Debug, PartialEq, Eq)]
struct Snap {
    blobs: BTreeMap<Digest, (u64, &'static str, (u64, u64))>,
    names: Vec<(String, Digest)>,
    large: BTreeMap<PathBuf, u64>,
    packs: BTreeMap<PathBuf, u64>,
}

fn snap(store: &Store, root: &Path) -> Snap {
    Snap {
        blobs: blob_set(store)
            .into_iter()
            .map(|(d, (s, k))| (d, (s, k, store.counts(&d).expect("counts"))))
            .collect(),
        names: store.names().expect("names"),
        large: common::large_files(root),
        packs: common::pack_files(root),
    }
}

/// Every path under `dir` except the store root, with its type and size.
fn outside(dir: &Path, root: &Path) -> BTreeMap<PathBuf, (String, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).expect("list") {
            let ent = ent.expect("entry");
            let p = ent.path();
            if p == root {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            out.insert(p.clone(), (format!("{:?}", m.file_type()), m.len()));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// A store with some content, a working directory for the CLI, and room for inputs.
struct Sandbox {
    dir: tempfile::TempDir,
    root: PathBuf,
    cwd: PathBuf,
}

fn sandbox() -> Sandbox {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let cwd = dir.path().join("cwd");
    std::fs::create_dir_all(&cwd).expect("create cwd");
    common::open(&root)
        .import_path(
            &fixture("oci-archive-fullref.tar"),
            &ImportOptions::default(),
        )
        .expect("seed the store");
    Sandbox { dir, root, cwd }
}

impl Sandbox {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write input");
        p
    }

    /// Asserts that importing `input` fails through the library, `store import PATH` and
    /// (for a file) `store import -`, each leaving the store as it was and writing nothing
    /// outside it. `markers`: one of them must appear in each error message.
    fn refuse(&self, what: &str, input: &Path, base_name: Option<&str>, markers: &[&str]) {
        let passwd = std::fs::read("/etc/passwd").ok();
        let out_before = outside(self.dir.path(), &self.root);
        let before = {
            let store = common::open(&self.root);
            let before = snap(&store, &self.root);
            let err = match store.import_path(input, &import_opts(base_name, &[])) {
                Ok(o) => panic!("{what}: the library imported it: {o:?}"),
                Err(e) => e,
            };
            let msg = err.to_string();
            assert!(
                markers.iter().any(|m| msg.contains(m)),
                "{what}: library error {msg:?} ({err:?}) mentions none of {markers:?}"
            );
            assert!(
                !matches!(err, Error::Io { .. } | Error::Db(_) | Error::Corrupt(_)),
                "{what}: bad input must be reported as such, not as {err:?}"
            );
            common::assert_ingest_clean(&self.root);
            assert_eq!(
                snap(&store, &self.root),
                before,
                "{what}: library import changed the store"
            );
            before
        };
        let mut runs: Vec<(&str, Output)> = Vec::new();
        let mut cmd = common::store_cmd(&self.root);
        cmd.current_dir(&self.cwd).arg("import").arg(input);
        if let Some(b) = base_name {
            cmd.args(["--base-name", b]);
        }
        runs.push(("store import PATH", common::run(&mut cmd)));
        if input.is_file() {
            let bytes = std::fs::read(input).expect("read input");
            let mut cmd = common::store_cmd(&self.root);
            cmd.current_dir(&self.cwd).args(["import", "-"]);
            if let Some(b) = base_name {
                cmd.args(["--base-name", b]);
            }
            runs.push((
                "store import -",
                common::run_with_stdin(&mut cmd, Some(&bytes)),
            ));
        }
        for (how, out) in &runs {
            let stderr = common::failed_stderr(out);
            assert!(
                markers.iter().any(|m| stderr.contains(m)),
                "{what}: `{how}` error {stderr:?} mentions none of {markers:?}"
            );
            assert!(
                out.stdout.is_empty(),
                "{what}: `{how}` printed {:?}",
                out.stdout
            );
            common::assert_ingest_clean(&self.root);
        }
        let store = common::open(&self.root);
        assert_eq!(
            snap(&store, &self.root),
            before,
            "{what}: the CLI changed the store"
        );
        assert_eq!(
            outside(self.dir.path(), &self.root),
            out_before,
            "{what}: something was written outside the store"
        );
        assert_eq!(
            std::fs::read("/etc/passwd").ok(),
            passwd,
            "{what}: /etc/passwd changed"
        );
    }
}

const INVALID: &[&str] = &["invalid archive"];

/// The entries of a fixture archive.
fn fixture_entries(name: &str) -> Vec<(String, Item)> {
    read_tar(&std::fs::read(fixture(name)).expect("read fixture"))
}

/// Position of the data of entry `path` in a tar file.
fn data_offset(bytes: &[u8], path: &str) -> u64 {
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().expect("entries") {
        let e = e.expect("entry");
        if e.path().expect("path").to_string_lossy() == path {
            return e.raw_file_position();
        }
    }
    panic!("no {path} in the archive")
}

/// Test 5a: a blob whose content does not match its `blobs/sha256/<hex>` name.
#[test]
fn refuses_blob_not_matching_its_name() {
    let sb = sandbox();
    let src = std::fs::read(fixture("oci-archive.tar")).expect("read");
    let manifest = json(&skopeo_raw(&format!(
        "oci-archive:{}",
        fixture("oci-archive.tar").display()
    )));
    let layers = manifest_layers(&manifest);
    // L1 is small (staged in memory), L3 is 20 MiB (staged in a file).
    for (n, l) in [layers[0], layers[2]].iter().enumerate() {
        let mut bytes = src.clone();
        let at = data_offset(&bytes, &format!("blobs/sha256/{}", l.hex())) as usize + 100;
        bytes[at] ^= 0x01;
        let p = sb.write(&format!("flipped-{n}.tar"), &bytes);
        sb.refuse(
            &format!("layer {l} with a flipped byte"),
            &p,
            Some("test/flip"),
            INVALID,
        );
    }
    // The same in a layout directory.
    let dir = sb.path("flipped-layout");
    common::copy_dir(&fixture("oci-layout"), &dir);
    let blob = dir.join("blobs/sha256").join(layers[1].hex());
    let mut v = std::fs::read(&blob).expect("read blob");
    v[10] ^= 0x80;
    std::fs::write(&blob, v).expect("write blob");
    sb.refuse(
        "layout with a corrupted layer file",
        &dir,
        Some("test/flip"),
        &["invalid archive", "digest mismatch"],
    );
}

/// Test 5a (docker): a legacy docker archive whose layer tar no longer matches its name
/// (`<diff_id>.tar`) and the config's `diff_ids`. skopeo refuses to copy it ("Digest did
/// not match"); the store must refuse to import it rather than store an image whose
/// layers contradict its config.
#[test]
fn refuses_docker_layer_not_matching_diff_id() {
    let sb = sandbox();
    let name = "docker-archive.tar";
    let src = std::fs::read(fixture(name)).expect("read");
    let items: HashMap<String, Item> = read_tar(&src).into_iter().collect();
    let mj = json(tar_file(&items, "manifest.json"));
    let layer = mj[0]["Layers"][1].as_str().expect("layer path").to_owned();
    let mut bytes = src.clone();
    let at = data_offset(&bytes, &layer) as usize + 600;
    bytes[at] ^= 0x01;
    let p = sb.write("tampered-docker.tar", &bytes);
    sb.refuse(
        &format!("docker archive whose {layer} was altered"),
        &p,
        None,
        &["invalid archive", "digest mismatch", "diff_id"],
    );
}

/// Test 5b: an index that lists a manifest (or a manifest that lists a layer) missing
/// from the layout.
#[test]
fn refuses_missing_manifest_or_layer() {
    let sb = sandbox();
    let index = json(&std::fs::read(fixture("oci-layout").join("index.json")).expect("index"));
    let app = digest(index["manifests"][1]["digest"].as_str().expect("digest"));
    let dir = sb.path("no-manifest");
    common::copy_dir(&fixture("oci-layout"), &dir);
    std::fs::remove_file(dir.join("blobs/sha256").join(app.hex())).expect("remove manifest");
    sb.refuse(
        "layout without the app manifest",
        &dir,
        Some("test/missing"),
        INVALID,
    );
    let p = sb.write("no-manifest.tar", &tar_layout(&dir));
    sb.refuse(
        "archive without the app manifest",
        &p,
        Some("test/missing"),
        INVALID,
    );

    let dir = sb.path("no-layer");
    common::copy_dir(&fixture("oci-layout"), &dir);
    let app_doc = json(&std::fs::read(dir.join("blobs/sha256").join(app.hex())).expect("app"));
    let l4 = *manifest_layers(&app_doc).last().expect("layers");
    std::fs::remove_file(dir.join("blobs/sha256").join(l4.hex())).expect("remove layer");
    sb.refuse("layout without L4", &dir, Some("test/missing"), INVALID);
    let p = sb.write("no-layer.tar", &tar_layout(&dir));
    sb.refuse("archive without L4", &p, Some("test/missing"), INVALID);
}

/// Rewrites the manifest of `tag` in a layout directory with `edit`, storing it under
/// its new digest and pointing the index at it.
fn edit_manifest(dir: &Path, tag: &str, edit: impl FnOnce(&mut Value)) {
    let index_path = dir.join("index.json");
    let mut index = json(&std::fs::read(&index_path).expect("index"));
    let entry = index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .iter_mut()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("tag in index");
    let old = digest(entry["digest"].as_str().expect("digest"));
    let mut doc = json(&std::fs::read(dir.join("blobs/sha256").join(old.hex())).expect("read"));
    edit(&mut doc);
    let bytes = serde_json::to_vec(&doc).expect("serialize");
    let new = common::sha256(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(new.hex()), &bytes).expect("write manifest");
    entry["digest"] = new.to_string().into();
    entry["size"] = (bytes.len() as u64).into();
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("serialize")).expect("write");
}

/// Test 5c: a manifest whose layer descriptor gives the wrong size (with correct images
/// alongside it in the same index: none of them may be committed).
#[test]
fn refuses_layer_size_mismatch() {
    let sb = sandbox();
    for (n, delta) in [(0, 1i64), (1, -1)] {
        let dir = sb.path(&format!("bad-size-{n}"));
        common::copy_dir(&fixture("oci-layout"), &dir);
        edit_manifest(&dir, "whiteout", |m| {
            let s = m["layers"][3]["size"].as_i64().expect("size");
            m["layers"][3]["size"] = (s + delta).into();
        });
        sb.refuse(
            &format!("layout with a layer size off by {delta}"),
            &dir,
            Some("test/size"),
            INVALID,
        );
        let p = sb.write(&format!("bad-size-{n}.tar"), &tar_layout(&dir));
        sb.refuse(
            &format!("archive with a layer size off by {delta}"),
            &p,
            Some("test/size"),
            INVALID,
        );
    }
    // The config's size, too.
    let dir = sb.path("bad-config-size");
    common::copy_dir(&fixture("oci-layout"), &dir);
    edit_manifest(&dir, "base", |m| {
        let s = m["config"]["size"].as_u64().expect("size");
        m["config"]["size"] = (s + 7).into();
    });
    sb.refuse(
        "layout with a wrong config size",
        &dir,
        Some("test/size"),
        INVALID,
    );
}

/// Test 5d: truncated archives (cut in half, and cut inside the trailing `index.json`).
#[test]
fn refuses_truncated_archives() {
    let sb = sandbox();
    for name in [
        "oci-archive.tar",
        "docker-archive.tar",
        "oci-archive-fullref.tar",
    ] {
        let bytes = std::fs::read(fixture(name)).expect("read");
        let p = sb.write(&format!("half-{name}"), &bytes[..bytes.len() / 2]);
        sb.refuse(
            &format!("{name} cut in half"),
            &p,
            Some("test/cut"),
            INVALID,
        );
    }
    // Cut in the middle of index.json's data.
    let bytes = std::fs::read(fixture("oci-archive-fullref.tar")).expect("read");
    let at = data_offset(&bytes, "index.json") as usize + 50;
    let p = sb.write("cut-index.tar", &bytes[..at]);
    sb.refuse(
        "archive cut inside index.json",
        &p,
        Some("test/cut"),
        INVALID,
    );
}

/// Malformed `index.json` documents: (what, bytes).
const BAD_INDEXES: [(&str, &[u8]); 5] = [
        ("truncated JSON", br#"{"schemaVersion":2,"manifests":[{"mediaType":"#),
        ("not JSON", b"\x00\x01 this is not json"),
        ("an array", b"[]"),
        (
            "a bad digest",
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:xyz","size":500}]}"#,
        ),
        ("null", b"null"),
    ];

/// An archive (from `oci-archive-fullref.tar`) whose `index.json` is `index`.
fn archive_with_index(index: &[u8]) -> Vec<u8> {
    let entries: Vec<(String, Item)> = fixture_entries("oci-archive-fullref.tar")
        .into_iter()
        .map(|(p, i)| {
            if p == "index.json" {
                (p, Item::File(index.to_vec()))
            } else {
                (p, i)
            }
        })
        .collect();
    write_tar(&entries)
}

/// Test 5e: malformed `index.json` (truncated, not JSON, not an index, a bad digest).
#[test]
fn refuses_malformed_index() {
    let sb = sandbox();
    for (n, (what, index)) in BAD_INDEXES.iter().enumerate() {
        let p = sb.write(&format!("bad-index-{n}.tar"), &archive_with_index(index));
        sb.refuse(
            &format!("archive whose index.json is {what}"),
            &p,
            None,
            &["invalid archive", "malformed"],
        );
        let dir = sb.path(&format!("bad-index-{n}"));
        common::copy_dir(&fixture("oci-layout"), &dir);
        std::fs::write(dir.join("index.json"), index).expect("write index");
        sb.refuse(
            &format!("layout whose index.json is {what}"),
            &dir,
            Some("test/bad"),
            &["invalid archive", "malformed"],
        );
    }
}

/// docs/CLI.md: "any mismatch or malformed input fails with `invalid archive: …`". Checks
/// that wording for a malformed `index.json` (in a tar and in a layout directory) and for
/// a layout file whose bytes do not match its digest, through the library and the CLI.
#[test]
fn bad_input_errors_say_invalid_archive() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let mut inputs: Vec<(String, PathBuf)> = Vec::new();
    for (n, (what, index)) in BAD_INDEXES.iter().enumerate() {
        let p = dir.path().join(format!("bad-index-{n}.tar"));
        std::fs::write(&p, archive_with_index(index)).expect("write");
        inputs.push((format!("archive whose index.json is {what}"), p));
        let d = dir.path().join(format!("bad-index-{n}"));
        common::copy_dir(&fixture("oci-layout"), &d);
        std::fs::write(d.join("index.json"), index).expect("write index");
        inputs.push((format!("layout whose index.json is {what}"), d));
    }
    let d = dir.path().join("corrupt-layer");
    common::copy_dir(&fixture("oci-layout"), &d);
    let layer = layout_blobs(&d)
        .into_iter()
        .find(|(_, v)| v.starts_with(&[0x1f, 0x8b]))
        .map(|(k, _)| k)
        .expect("a gzip layer");
    let p = d.join("blobs/sha256").join(layer.hex());
    let mut v = std::fs::read(&p).expect("read");
    v[20] ^= 0x01;
    std::fs::write(&p, v).expect("write");
    inputs.push(("layout with a corrupted layer file".to_owned(), d));

    let mut bad = Vec::new();
    for (what, input) in &inputs {
        let msg = common::open(&root)
            .import_path(input, &import_opts(Some("test/bad"), &[]))
            .expect_err(what)
            .to_string();
        if !msg.starts_with("invalid archive: ") {
            bad.push(format!("library, {what}: {msg:?}"));
        }
        let out = common::cli(
            &root,
            &["import", input.to_str().unwrap(), "--base-name", "test/bad"],
        );
        let stderr = common::failed_stderr(&out);
        if !stderr.starts_with("store: error: invalid archive: ") {
            bad.push(format!("CLI, {what}: {:?}", stderr.trim_end()));
        }
    }
    assert!(
        bad.is_empty(),
        "bad input must be reported as `invalid archive: …` (docs/CLI.md):\n{}",
        bad.join("\n")
    );
}

/// Test 5f: entry names that leave the archive: `../evil`, an absolute path, and `..`
/// inside a blob path.
#[test]
fn refuses_path_traversal_entries() {
    let sb = sandbox();
    let base = fixture_entries("oci-archive-fullref.tar");
    let abs = sb.path("abs-evil");
    let abs = abs.to_str().expect("utf-8 path").to_owned();
    let evil: [(&str, usize); 3] = [
        ("../evil", 0),
        (abs.as_str(), base.len()),
        ("blobs/../../evil-2", 2),
    ];
    for (n, (name, at)) in evil.iter().enumerate() {
        let mut entries = base.clone();
        entries.insert(*at, ((*name).to_owned(), Item::File(b"pwned\n".to_vec())));
        let p = sb.write(&format!("traversal-{n}.tar"), &write_tar(&entries));
        sb.refuse(&format!("archive with entry {name:?}"), &p, None, INVALID);
        assert!(!sb.path("evil").exists() && !Path::new(&abs).exists());
    }
    // Links whose targets leave the archive.
    let l1 = fixture_entries("oci-archive-fullref.tar")
        .iter()
        .find(|(p, i)| {
            p.starts_with("blobs/sha256/") && matches!(i, Item::File(v) if v.len() > 600)
        })
        .map(|(p, _)| p.clone())
        .expect("a layer blob");
    for (n, link) in [
        Item::Hardlink("../../etc/passwd".to_owned()),
        Item::Hardlink("/etc/passwd".to_owned()),
        Item::Symlink("/etc/passwd".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut entries = base.clone();
        entries.insert(2, (format!("{l1}-link"), link.clone()));
        let p = sb.write(&format!("link-{n}.tar"), &write_tar(&entries));
        sb.refuse(&format!("archive with a link {link:?}"), &p, None, INVALID);
    }
}

/// The entries of `docker-archive-notag.tar` with `manifest.json` listing the
/// `<id>/layer.tar` symlinks instead of the top-level tars, and `retarget` applied to the
/// first symlink.
fn docker_via_symlinks(retarget: Option<&str>) -> Vec<u8> {
    let mut entries = fixture_entries("docker-archive-notag.tar");
    let links: Vec<String> = entries
        .iter()
        .filter(|(p, i)| p.ends_with("/layer.tar") && matches!(i, Item::Symlink(_)))
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(
        links.len(),
        2,
        "base has two layers, each a layer.tar symlink"
    );
    let items: HashMap<String, Item> = entries.iter().cloned().collect();
    let mut mj = json(tar_file(&items, "manifest.json"));
    // Order the symlinks as the layers they point at.
    let layers: Vec<String> = mj[0]["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .map(|l| {
            let want = tar_file(&items, l.as_str().expect("path"));
            links
                .iter()
                .find(|s| tar_file(&items, s) == want)
                .expect("a symlink for each layer")
                .clone()
        })
        .collect();
    mj[0]["Layers"] = layers.iter().cloned().map(Value::from).collect();
    for (p, i) in &mut entries {
        if p == "manifest.json" {
            *i = Item::File(serde_json::to_vec(&mj).expect("serialize"));
        } else if let Some(t) = retarget
            && *p == layers[0]
        {
            *i = Item::Symlink(t.to_owned());
        }
    }
    write_tar(&entries)
}

/// Test 5g: a docker archive whose `layer.tar` symlink points outside the archive.
#[test]
fn refuses_symlink_out_of_docker_archive() {
    let sb = sandbox();
    // Control: the same archive with its symlinks intact imports, with the same layers.
    let good = sb.write("docker-symlinks.tar", &docker_via_symlinks(None));
    let dir = common::tempdir();
    let store = common::open(dir.path());
    let via_links = store
        .import_path(&good, &import_opts(None, &["control:1"]))
        .expect("a docker archive read through its layer.tar symlinks imports");
    let direct = store
        .import_path(
            &fixture("docker-archive-notag.tar"),
            &import_opts(None, &["control:2"]),
        )
        .expect("import docker-archive-notag.tar");
    assert_eq!(
        via_links.images[0].digest, direct.images[0].digest,
        "the symlinks name the same layers"
    );
    drop(store);
    for target in [
        "../../etc/passwd",
        "/etc/passwd",
        "../../../../../../etc/passwd",
    ] {
        let p = sb.write("docker-evil-link.tar", &docker_via_symlinks(Some(target)));
        sb.refuse(
            &format!("docker archive with layer.tar -> {target}"),
            &p,
            None,
            INVALID,
        );
    }
}

/// Test 5h: tars (and files) that hold no image.
#[test]
fn refuses_non_images() {
    let sb = sandbox();
    let plain = write_tar(&[
        ("hello.txt".to_owned(), Item::File(b"hello\n".to_vec())),
        ("dir/".to_owned(), Item::Dir),
        ("dir/data.bin".to_owned(), Item::File(common::blob(7, 5000))),
    ]);
    let p = sb.write("plain.tar", &plain);
    sb.refuse("a tar of plain files", &p, None, INVALID);
    let p = sb.write("random.bin", &common::blob(8, 10_000));
    sb.refuse("random bytes", &p, None, INVALID);
    let p = sb.write("empty.tar", &[0u8; 1024]);
    sb.refuse("an empty tar", &p, None, INVALID);
    // An image layer is a tar, but not an image.
    let layer = layout_blobs(&fixture("oci-uncompressed"))
        .into_values()
        .find(|v| v.len() > 1024 && v.get(257..262) == Some(&b"ustar"[..]))
        .expect("an uncompressed layer");
    let p = sb.write("layer.tar", &layer);
    sb.refuse("a layer tar", &p, None, INVALID);
    let d = sb.path("empty-dir");
    std::fs::create_dir_all(&d).expect("mkdir");
    sb.refuse("an empty directory", &d, None, INVALID);
}

// ---------------------------------------------------------------------------------------
// Multi-platform index
// ---------------------------------------------------------------------------------------

/// `os/arch[/variant]` of each entry of an index.
fn platforms(index: &Value) -> Vec<(String, Digest)> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().expect("os"),
                p["architecture"].as_str().expect("architecture")
            );
            if let Some(v) = p["variant"].as_str() {
                s.push('/');
                s.push_str(v);
            }
            (s, digest(m["digest"].as_str().expect("digest")))
        })
        .collect()
}

/// Test 6: inspect shows the platforms; the index exports to an OCI archive skopeo reads
/// (and copies with `--all`); the docker format refuses it with a clear error.
#[test]
fn multiarch_index_inspect_and_export() {
    let src = fixture("oci-multiarch");
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let raw = skopeo_raw(&format!("oci:{}:multi", src.display()));
    let want = platforms(&json(&raw));
    assert_eq!(
        want.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["linux/amd64", "linux/arm64/v8"]
    );
    {
        let store = common::open(&root);
        store
            .import_path(&src, &import_opts(Some("test/multi"), &[]))
            .expect("import");
        for tag in ["multi", "multi-v2s2"] {
            let name = format!("test/multi:{tag}");
            let det = store.inspect(&name).expect("inspect");
            assert_eq!(det.kind, Kind::Index, "{name}");
            let stored = json(&store.get(&det.digest).expect("index"));
            let got: Vec<(String, Digest)> = det
                .platforms
                .iter()
                .map(|p| (p.platform.clone().expect("platform"), p.digest))
                .collect();
            assert_eq!(got, platforms(&stored), "{name}");
            assert_eq!(
                got.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
                ["linux/amd64", "linux/arm64/v8"]
            );
            assert!(det.layers.is_empty() && det.config.is_none());
        }
        assert!(*store.get(&common::sha256(&raw)).expect("index") == raw[..]);
        let mut f = Vec::new();
        store
            .export(&["test/multi:multi".to_owned()], ExportFormat::Oci, &mut f)
            .expect("export the index");
        std::fs::write(dir.path().join("multi.tar"), &f).expect("write");
    }

    // The command line shows the platforms too.
    let text = common::ok_stdout(&common::cli(&root, &["inspect", "test/multi:multi"]));
    assert!(text.contains("Platforms:"), "{text}");
    for (p, d) in &want {
        assert!(
            text.lines()
                .any(|l| l.contains(p.as_str()) && l.contains(&d.to_string())),
            "inspect should list {p} {d}: {text}"
        );
    }
    let v = json(
        common::ok_stdout(&common::cli(
            &root,
            &["inspect", "test/multi:multi", "--json"],
        ))
        .as_bytes(),
    );
    let got: Vec<(String, Digest)> = v["platforms"]
        .as_array()
        .expect("platforms")
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().expect("platform").to_owned(),
                digest(p["digest"].as_str().expect("digest")),
            )
        })
        .collect();
    assert_eq!(got, want, "inspect --json platforms");

    // skopeo reads the exported index, and each platform's image.
    let archive = dir.path().join("multi.tar");
    let src_ref = format!("oci-archive:{}:multi", archive.display());
    assert!(
        skopeo_raw(&src_ref) == raw,
        "skopeo inspect --raw of the exported index"
    );
    for ((p, d), (arch, variant)) in want.iter().zip([("amd64", None), ("arm64", Some("v8"))]) {
        let mut args = vec!["--override-os", "linux", "--override-arch", arch];
        if let Some(v) = variant {
            args.extend(["--override-variant", v]);
        }
        args.extend(["inspect", src_ref.as_str()]);
        // skopeo reports the index's digest, and the chosen platform's config and layers.
        let v = json(&skopeo_ok(&args));
        assert_eq!(v["Digest"], common::sha256(&raw).to_string(), "{p}");
        assert_eq!(v["Architecture"], arch, "skopeo picks the {p} image");
        let m = json(&std::fs::read(src.join("blobs/sha256").join(d.hex())).expect("read"));
        assert_eq!(
            skopeo_layers_of(&v),
            manifest_layers(&m),
            "layers of the {p} image"
        );
    }
    let copy = dir.path().join("copy");
    skopeo_copy(&src_ref, &copy, true);
    let copied = layout_blobs(&copy);
    let store = common::open(&root);
    let reach = walk(&store, &common::sha256(&raw));
    assert_eq!(
        copied.keys().collect::<Vec<_>>(),
        reach.keys().collect::<Vec<_>>(),
        "skopeo copy --all of the exported index"
    );

    // The docker format holds single-platform images: an index is refused, clearly.
    for tag in ["multi", "multi-v2s2"] {
        let name = format!("test/multi:{tag}");
        let err = store
            .export(
                std::slice::from_ref(&name),
                ExportFormat::Docker,
                std::io::sink(),
            )
            .expect_err("docker export of an index must be refused");
        let msg = err.to_string();
        assert!(msg.contains("index"), "error should say why: {msg}");
    }
    // A platform's manifest exports fine in the docker format.
    let amd64 = want[0].1.to_string();
    let out = dir.path().join("amd64.docker.tar");
    let f = std::io::BufWriter::new(File::create(&out).expect("create"));
    store
        .export(std::slice::from_ref(&amd64), ExportFormat::Docker, f)
        .expect("docker export of one platform's manifest");
    drop(store);
    let layers = skopeo_layers(&format!("docker-archive:{}", out.display()));
    assert_eq!(layers.len(), 2, "base has two layers");

    for tag in ["multi", "multi-v2s2"] {
        let name = format!("test/multi:{tag}");
        let file = dir.path().join(format!("refused-{tag}.tar"));
        let out = common::cli(
            &root,
            &[
                "export",
                &name,
                "-o",
                file.to_str().unwrap(),
                "--format",
                "docker",
            ],
        );
        let stderr = common::failed_stderr(&out);
        assert!(stderr.contains("index"), "{stderr}");
        assert!(
            !file.exists(),
            "a refused export must not leave {}",
            file.display()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

/// A refused docker export of an index writes nothing: neither to the library's writer
/// nor to standard output (`-o -`), where a partial tar would reach a consumer.
#[test]
fn refused_docker_export_writes_nothing() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    {
        let store = common::open(&root);
        store
            .import_path(
                &fixture("oci-multiarch"),
                &import_opts(Some("test/multi"), &[]),
            )
            .expect("import");
        let mut buf = Vec::new();
        let r = store.export(
            &["test/multi:multi".to_owned()],
            ExportFormat::Docker,
            &mut buf,
        );
        assert!(r.is_err(), "docker export of an index must be refused");
        assert!(
            buf.is_empty(),
            "the refused export wrote {} bytes of a partial archive first",
            buf.len()
        );
    }
    let out = common::cli(
        &root,
        &[
            "export",
            "test/multi:multi",
            "-o",
            "-",
            "--format",
            "docker",
        ],
    );
    common::failed_stderr(&out);
    assert!(
        out.stdout.is_empty(),
        "the refused `export -o -` wrote {} bytes to standard output",
        out.stdout.len()
    );
}
