//! `store unpack`: real umoci images unpack to the same tree as `umoci unpack` (paths,
//! types, permission bits, owners, mtimes, contents, symlink targets, hardlinks), every
//! encoding of an image gives the same tree, whiteouts follow the OCI spec, malicious
//! layers are refused or contained without touching anything outside the target (checked
//! against a sentinel next to it and a whole-sandbox snapshot), a wrong `diff_id` fails
//! the unpack and leaves nothing, an index picks the asked platform, FIFOs and (as root)
//! device nodes are made with their metadata, and the command line prints its report and
//! refuses an existing target.
//!
//! The real images come from `tests/fixtures/make-images.sh`, generated once per test
//! binary run into the same cache directory as `interop.rs` (`CARGO_TARGET_TMPDIR`, keyed
//! by the script and the tool versions), so a run that already made them reuses them.
//! skopeo and umoci are required (CI installs them); buildah only for `oci-multiarch/`.
//! Malicious images are built in the test: tar layers with raw header names (so `..` and
//! absolute paths can be written), config and manifest by hand, every digest real.
//! Every absolute path a malicious layer names points into the test's own sandbox.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use layerstore::unpack::{UnpackOptions, UnpackReport};
use layerstore::{Digest, Error, ImportOptions, Store};
use serde_json::Value;

use crate::common;
use crate::common::fixtures;
use crate::oci::*;

// ---------------------------------------------------------------------------------------
// Fixtures (the same generator and cache directory as interop.rs)
// ---------------------------------------------------------------------------------------

/// A fixture path, failing clearly when the fixture was not built.
fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(
        rel != "oci-multiarch" || p.exists(),
        "{} was not built: buildah is not installed (apt-get install -y \
         --no-install-recommends buildah); the multi-platform unpack test needs it",
        p.display()
    );
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

fn import_opts(base_name: &str) -> ImportOptions {
    let mut o = ImportOptions::default();
    o.base_name = Some(base_name.to_owned());
    o
}

fn opts() -> UnpackOptions {
    UnpackOptions::default()
}

fn platform(p: &str) -> UnpackOptions {
    let mut o = UnpackOptions::default();
    o.platform = Some(p.to_owned());
    o
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `umoci unpack --rootless --image LAYOUT:TAG BUNDLE`; returns `BUNDLE/rootfs`.
fn umoci_rootfs(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let out = Command::new("umoci")
        .args(["--log", "error", "unpack", "--rootless", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run umoci ({e}); it is required by the unpack tests (CI installs it)")
        });
    assert!(
        out.status.success(),
        "umoci unpack {}:{tag} failed ({}): {}",
        layout.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

// ---------------------------------------------------------------------------------------
// Trees on disk
// ---------------------------------------------------------------------------------------

/// What a path is, with what identifies its content.
#[derive(Clone, Debug, PartialEq, Eq)]
enum What {
    Dir,
    /// Size and sha256 of the contents.
    File(u64, Digest),
    Symlink(PathBuf),
    Fifo,
    Char(u64),
    Block(u64),
    Socket,
}

/// One path's type, content and metadata (lstat, never following a symlink).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    what: What,
    /// `st_mode & 0o7777`.
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// Link count, for non-directories (directory counts depend on the file system).
    nlink: Option<u64>,
}

/// A tree: every path (relative, `""` for the root) and the groups of paths that share
/// an inode.
#[derive(Debug)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    links: BTreeSet<BTreeSet<String>>,
}

impl Tree {
    fn node(&self, p: &str) -> &Node {
        self.nodes
            .get(p)
            .unwrap_or_else(|| panic!("{p:?} is missing from the tree"))
    }

    fn file(&self, p: &str, root: &Path) -> String {
        assert!(
            matches!(self.node(p).what, What::File(..)),
            "{p} is not a regular file: {:?}",
            self.node(p)
        );
        String::from_utf8(std::fs::read(root.join(p)).expect("read file")).expect("utf-8")
    }

    fn target(&self, p: &str) -> &Path {
        match &self.node(p).what {
            What::Symlink(t) => t,
            other => panic!("{p} is not a symlink: {other:?}"),
        }
    }

    fn same_inode(&self, a: &str, b: &str) -> bool {
        self.links.iter().any(|g| g.contains(a) && g.contains(b))
    }

    fn children(&self, dir: &str) -> BTreeSet<String> {
        let prefix = format!("{dir}/");
        self.nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_owned)
            .collect()
    }
}

fn scan(root: &Path) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(&rel)
        };
        let m =
            std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = m.file_type();
        let what = if ft.is_dir() {
            let mut names: Vec<String> = std::fs::read_dir(&p)
                .unwrap_or_else(|e| panic!("list {}: {e}", p.display()))
                .map(|e| {
                    e.expect("directory entry")
                        .file_name()
                        .into_string()
                        .expect("utf-8 name")
                })
                .collect();
            names.sort();
            for n in names {
                stack.push(if rel.is_empty() {
                    n
                } else {
                    format!("{rel}/{n}")
                });
            }
            What::Dir
        } else if ft.is_file() {
            What::File(
                m.len(),
                common::sha256(&std::fs::read(&p).expect("read file")),
            )
        } else if ft.is_symlink() {
            What::Symlink(std::fs::read_link(&p).expect("readlink"))
        } else if ft.is_fifo() {
            What::Fifo
        } else if ft.is_char_device() {
            What::Char(m.rdev())
        } else if ft.is_block_device() {
            What::Block(m.rdev())
        } else {
            What::Socket
        };
        let is_dir = what == What::Dir;
        if !is_dir {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .insert(rel.clone());
        }
        nodes.insert(
            rel,
            Node {
                what,
                perm: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                nlink: (!is_dir).then(|| m.nlink()),
            },
        );
    }
    let links = inodes.into_values().filter(|g| g.len() > 1).collect();
    Tree { nodes, links }
}

/// Differences between two trees, one line each. The root's own mtime is left out: the
/// store builds the root itself and does not apply a layer's `.` entry to it (umoci
/// does); that is the one difference allowed against umoci.
fn diff_trees(ours: &Tree, theirs: &Tree, them: &str) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = ours.nodes.keys().chain(theirs.nodes.keys()).collect();
    for k in keys {
        match (ours.nodes.get(k), theirs.nodes.get(k)) {
            (Some(a), Some(b)) => {
                let mut a = a.clone();
                let mut b = b.clone();
                if k.is_empty() {
                    a.mtime = 0;
                    b.mtime = 0;
                }
                if a != b {
                    out.push(format!("{k:?}: ours {a:?}, {them} {b:?}"));
                }
            }
            (Some(a), None) => out.push(format!("{k:?}: only in ours ({a:?})")),
            (None, Some(b)) => out.push(format!("{k:?}: only in {them} ({b:?})")),
            (None, None) => unreachable!(),
        }
    }
    if ours.links != theirs.links {
        out.push(format!(
            "hardlink groups: ours {:?}, {them} {:?}",
            ours.links, theirs.links
        ));
    }
    out
}

fn assert_same_tree(ours: &Tree, theirs: &Tree, them: &str, what: &str) {
    let d = diff_trees(ours, theirs, them);
    assert!(
        d.is_empty(),
        "{what}: the unpacked tree differs from {them}'s in {} place(s):\n  {}",
        d.len(),
        d.join("\n  ")
    );
}

/// Paths with a component that starts with `.wh.`.
fn whiteout_leftovers(t: &Tree) -> Vec<&String> {
    t.nodes
        .keys()
        .filter(|k| k.split('/').any(|c| c.starts_with(".wh.")))
        .collect()
}

/// Names directly in `dir`.
fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Decompresses a layer blob by its magic bytes (gzip, zstd or plain tar).
fn decompress(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if blob.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .expect("gunzip");
    } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(blob)
            .expect("zstd")
            .read_to_end(&mut out)
            .expect("unzstd");
    } else {
        out.extend_from_slice(blob);
    }
    out
}

/// Counted independently from the layers of manifest `d`: tar entries of an applied type
/// (whiteouts included, and a layer's `./`), and bytes of regular files. A
/// read error ends a layer (W4 has no end-of-archive trailer).
fn layer_counts(store: &Store, d: &Digest) -> (usize, u64, u64) {
    let m: Value = serde_json::from_slice(&store.get(d).expect("manifest")).expect("json");
    let layers = m["layers"].as_array().expect("layers");
    let (mut entries, mut bytes) = (0u64, 0u64);
    for l in layers {
        let ld = Digest::parse(l["digest"].as_str().expect("digest")).expect("digest");
        let tar_bytes = decompress(&store.get(&ld).expect("layer"));
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        for e in ar.entries().expect("entries") {
            let Ok(e) = e else { break };
            let path = e.path().expect("path").to_string_lossy().into_owned();
            let comps: Vec<&str> = path
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            let ty = e.header().entry_type();
            let Some(name) = comps.last() else {
                // The layer's `./`: its mode, owner and time go to the root.
                if ty == tar::EntryType::Directory {
                    entries += 1;
                }
                continue;
            };
            let whiteout = name.starts_with(".wh.");
            let regular = matches!(ty, tar::EntryType::Regular | tar::EntryType::Continuous);
            if whiteout
                || regular
                || matches!(
                    ty,
                    tar::EntryType::Directory
                        | tar::EntryType::Symlink
                        | tar::EntryType::Link
                        | tar::EntryType::Char
                        | tar::EntryType::Block
                        | tar::EntryType::Fifo
                )
            {
                entries += 1;
            }
            if regular && !whiteout {
                bytes += e.size();
            }
        }
    }
    (layers.len(), entries, bytes)
}

/// Checks a report against the manifest it should have unpacked.
fn check_report(store: &Store, r: &UnpackReport, manifest: &Digest, what: &str) {
    let (layers, entries, bytes) = layer_counts(store, manifest);
    assert_eq!(
        r.manifest.as_ref(),
        Some(manifest),
        "{what}: report.manifest"
    );
    assert_eq!(r.layers, layers, "{what}: report.layers");
    assert_eq!(r.entries, entries, "{what}: report.entries");
    assert_eq!(r.bytes, bytes, "{what}: report.bytes");
    assert_eq!(r.skipped_devices, 0, "{what}: no devices in the fixtures");
    assert_eq!(r.skipped_xattrs, 0, "{what}: no xattrs in the fixtures");
}

// ---------------------------------------------------------------------------------------
// 1. Real umoci images against `umoci unpack`
// ---------------------------------------------------------------------------------------

/// Imports `oci-layout`, unpacks `tag` with the store and with umoci, and compares.
/// Returns (our tree, our root) for image-specific checks.
fn unpack_like_umoci(tag: &str, dir: &Path) -> (Tree, PathBuf) {
    let layout = fixture("oci-layout");
    let store = common::open(&dir.join("store"));
    store
        .import_path(&layout, &import_opts("test/x"))
        .expect("import oci-layout");
    let name = format!("test/x:{tag}");
    let work = dir.join("work");
    std::fs::create_dir(&work).expect("create work");
    let ours = work.join("rootfs");
    let report = store
        .unpack(&name, &ours, &opts())
        .unwrap_or_else(|e| panic!("unpack {name}: {e:?}"));
    assert_eq!(
        names_in(&work),
        set(&["rootfs"]),
        "{name}: the temporary sibling must be renamed away"
    );
    let manifest = store.resolve(&name).expect("resolve");
    check_report(&store, &report, &manifest, &name);

    let theirs_root = umoci_rootfs(&layout, tag, &dir.join("bundle"));
    let a = scan(&ours);
    let b = scan(&theirs_root);
    assert_same_tree(&a, &b, "umoci", &name);
    for (who, t) in [("ours", &a), ("umoci", &b)] {
        let left = whiteout_leftovers(t);
        assert!(
            left.is_empty(),
            "{name}: {who} kept whiteout entries {left:?}"
        );
    }
    // What the comparison rests on must hold by itself too (umoci could be wrong the
    // same way): the fixtures' mtimes, modes, links and names.
    for (p, n) in &a.nodes {
        if !p.is_empty() {
            assert_eq!(n.mtime, EPOCH, "{name}: mtime of {p}");
            assert_eq!((n.uid, n.gid), (0, 0), "{name}: owner of {p}");
        }
    }
    assert_eq!(a.node("").perm, 0o755, "{name}: root mode");
    assert_eq!(a.node("etc/os-release").perm, 0o600, "{name}: chmod in L2");
    assert_eq!(
        a.file("etc/os-release", &ours),
        "NAME=fixture\nVERSION_ID=1\n"
    );
    assert_eq!(
        a.node("usr/bin/suid-tool").perm,
        0o4755,
        "{name}: setuid kept"
    );
    assert_eq!(a.node("usr/bin/tool").perm, 0o755);
    assert!(
        a.same_inode("usr/bin/tool", "usr/bin/tool-hardlink"),
        "{name}: L1 hardlink: {:?}",
        a.links
    );
    assert!(
        a.same_inode("data/hl/one", "data/hl/two"),
        "{name}: L2 hardlink: {:?}",
        a.links
    );
    assert_eq!(a.node("data/hl/one").nlink, Some(2));
    assert_eq!(a.target("usr/bin/tool-symlink"), Path::new("tool"));
    assert_eq!(
        a.target("usr/share/doc/fixture/abs-link"),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        a.target("usr/share/doc/fixture/rel-link"),
        Path::new("../../../etc/os-release")
    );
    assert_eq!(
        a.target("usr/lib/libfixture.so"),
        Path::new("libfixture.so.1")
    );
    assert_eq!(
        a.target("usr/lib/libfixture.so.1"),
        Path::new("libfixture.so.1.0")
    );
    assert_eq!(
        a.node("usr/lib/libfixture.so.1.0").what,
        What::File(
            3000,
            common::sha256(&std::fs::read(ours.join("usr/lib/libfixture.so.1.0")).unwrap())
        )
    );
    assert_eq!(a.file("data/ünïcødé-名前.txt", &ours), "unicode\n");
    assert!(
        !a.nodes.contains_key("data/ncd-.txt"),
        "{name}: the PAX path must win over the mangled ustar name"
    );
    assert_eq!(
        a.file(
            "data/a-directory-name-that-is-quite-long-0123456789/another-long-directory-name-\
             abcdefghijklmnopqrstuvwxyz/file-with-a-long-name-so-the-path-exceeds-one-hundred-bytes.txt",
            &ours
        ),
        "long\n"
    );
    assert_eq!(a.file("data/with space.txt", &ours), "spaces\n");
    assert_eq!(a.file("data/empty-file", &ours), "");
    assert_eq!(a.node("var/empty").what, What::Dir);
    (a, ours)
}

#[test]
fn base_unpacks_like_umoci() {
    let dir = common::tempdir();
    let (t, root) = unpack_like_umoci("base", dir.path());
    assert_eq!(t.file("etc/hostname", &root), "fixture-host-v2\n");
    assert_eq!(t.file("data/delete-me.txt", &root), "delete me\n");
    assert_eq!(t.file("data/keep/k", &root), "keep\n");
    assert_eq!(t.children("data/opaque-me"), set(&["a", "sub"]));
    assert!(!t.nodes.contains_key("opt") && !t.nodes.contains_key("app"));
}

#[test]
fn app_unpacks_like_umoci() {
    let dir = common::tempdir();
    let (t, root) = unpack_like_umoci("app", dir.path());
    assert_eq!(t.file("etc/hostname", &root), "fixture-host-app\n");
    match &t.node("opt/big/random.bin").what {
        What::File(n, _) => assert_eq!(*n, 20 << 20, "the 20 MiB file"),
        other => panic!("opt/big/random.bin: {other:?}"),
    }
    let data = t.file("app/share/data.txt", &root);
    assert_eq!(data.lines().count(), 20000);
    assert!(data.starts_with("1\n2\n") && data.ends_with("\n20000\n"));
    assert_eq!(t.node("app/bin/app").perm, 0o755);
    assert_eq!(t.file("data/delete-me.txt", &root), "delete me\n");
    assert_eq!(t.file("data/keep/k", &root), "keep\n");
}

/// W3 (file and directory whiteouts) and W4 (opaque marker before its directory, no tar
/// end-of-archive trailer).
#[test]
fn whiteout_image_with_opaque_dir_and_truncated_layer_unpacks_like_umoci() {
    let dir = common::tempdir();
    let (t, root) = unpack_like_umoci("whiteout", dir.path());
    assert!(
        !t.nodes.contains_key("data/delete-me.txt"),
        "W3 whites out data/delete-me.txt"
    );
    assert!(
        !t.nodes
            .keys()
            .any(|k| k == "data/keep" || k.starts_with("data/keep/")),
        "W3 whites out the directory data/keep"
    );
    assert_eq!(
        t.children("data/opaque-me"),
        set(&["only.txt"]),
        "W4's opaque marker hides a and sub/"
    );
    assert_eq!(t.file("data/opaque-me/only.txt", &root), "replacement\n");
    assert_eq!(t.file("etc/hostname", &root), "fixture-host-v2\n");
    // What the lower layers put beside the whited-out paths stays.
    assert_eq!(t.file("data/hl/one", &root), "shared-inode\n");
}

/// The same image in every other encoding the fixtures hold (zstd, plain tar, plain tar
/// mislabelled gzip, docker-archive) unpacks to the tree umoci makes of `app`.
#[test]
fn every_encoding_of_app_unpacks_to_the_same_tree() {
    let dir = common::tempdir();
    let theirs = scan(&umoci_rootfs(
        &fixture("oci-layout"),
        "app",
        &dir.path().join("bundle"),
    ));
    for (src, name) in [
        ("oci-zstd", "test/x:app"),
        ("oci-uncompressed", "test/x:app"),
        ("oci-mislabeled-gzip", "test/x:app"),
        ("docker-archive.tar", "example.com/test/app:1.0"),
    ] {
        let store_root = dir.path().join(format!("store-{src}"));
        let store = common::open(&store_root);
        store
            .import_path(&fixture(src), &import_opts("test/x"))
            .unwrap_or_else(|e| panic!("import {src}: {e:?}"));
        let out = dir.path().join(format!("rootfs-{src}"));
        let report = store
            .unpack(name, &out, &opts())
            .unwrap_or_else(|e| panic!("unpack {src} {name}: {e:?}"));
        let manifest = store.resolve(name).expect("resolve");
        check_report(&store, &report, &manifest, src);
        assert_same_tree(&scan(&out), &theirs, "umoci (oci-layout:app)", src);
        drop(store);
        std::fs::remove_dir_all(&out).expect("remove rootfs");
        std::fs::remove_dir_all(&store_root).expect("remove store");
    }
}

// ---------------------------------------------------------------------------------------
// Hand-built layers and images
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// The sandbox for malicious layers
// ---------------------------------------------------------------------------------------

/// `top/store` (the store), `top/outside` (what symlinks and absolute names in a layer
/// aim at), `top/work/sentinel` (next to the target) and the target `top/work/rootfs`.
struct Sandbox {
    _dir: tempfile::TempDir,
    top: PathBuf,
    root: PathBuf,
    work: PathBuf,
    outside: PathBuf,
    target: PathBuf,
}

fn sandbox() -> Sandbox {
    let d = common::tempdir();
    let top = d.path().to_owned();
    let outside = top.join("outside");
    let work = top.join("work");
    std::fs::create_dir_all(outside.join("sub")).expect("create outside");
    std::fs::write(outside.join("file"), b"outside: must not change\n").expect("write");
    std::fs::write(outside.join("victim"), b"outside: must not be deleted\n").expect("write");
    std::fs::write(outside.join("sub/deep"), b"deep\n").expect("write");
    std::fs::create_dir_all(work.join("sentinel")).expect("create sentinel");
    std::fs::write(work.join("sentinel/file"), b"sentinel\n").expect("write");
    std::fs::write(work.join("beside-target"), b"beside\n").expect("write");
    Sandbox {
        root: top.join("store"),
        target: work.join("rootfs"),
        _dir: d,
        top,
        work,
        outside,
    }
}

/// Everything under `top` except the store and the target: type, permission bits, and for
/// non-directories the link count, mtime, content hash or symlink target.
fn state(s: &Sandbox) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![s.top.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            if p == s.root || p == s.target {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let mut v = format!("{:?} {:o}", m.file_type(), m.mode() & 0o7777);
            if m.is_dir() {
                // A directory's link count and mtime change when the target (or its
                // temporary sibling) is made next to it; its entries are listed anyway.
                stack.push(p.clone());
            } else {
                let _ = write!(v, " nlink={} mtime={}", m.nlink(), m.mtime());
            }
            if m.is_file() {
                let _ = write!(v, " {}", common::sha256(&std::fs::read(&p).expect("read")));
            }
            if m.file_type().is_symlink() {
                let _ = write!(
                    v,
                    " -> {}",
                    std::fs::read_link(&p).expect("readlink").display()
                );
            }
            out.insert(p, v);
        }
    }
    out
}

/// In a malicious entry's name or link target: the sandbox's `outside` directory.
const OUT: &str = "@OUT@";

/// How a malicious image must end.
enum Expect {
    /// The unpack fails with a message containing one of these.
    Refused(&'static [&'static str]),
    /// The unpack succeeds; the check gets the target and returns problems.
    Contained(fn(&Path, &Sandbox) -> Vec<String>),
    /// Either refused or contained (the check runs only on success).
    Either(fn(&Path, &Sandbox) -> Vec<String>),
}

/// Unpacks `layers` in a fresh sandbox and returns the problems found (empty if none):
/// the outcome, the sandbox outside the target unchanged, the sentinel intact, no
/// temporary sibling left, and no target after a refusal.
fn evil(what: &str, layers: &[Vec<Ent>], expect: &Expect) -> Vec<String> {
    let s = sandbox();
    let out = s.outside.display().to_string();
    let layers: Vec<Vec<Ent>> = layers
        .iter()
        .map(|l| {
            l.iter()
                .map(|e| Ent {
                    name: e.name.replace(OUT, &out),
                    link: e.link.replace(OUT, &out),
                    ..e.clone()
                })
                .collect()
        })
        .collect();
    let img = plain(&layers);
    let store = common::open(&s.root);
    img.store(&store, "test/evil:1");
    let before = state(&s);
    let r = store.unpack("test/evil:1", &s.target, &opts());
    let mut problems = Vec::new();
    let mut bad = |m: String| problems.push(format!("{what}: {m}"));
    let after = state(&s);
    if after != before {
        let keys: BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
        for k in keys {
            if before.get(k) != after.get(k) {
                bad(format!(
                    "changed outside the target: {} was {:?}, now {:?}",
                    k.display(),
                    before.get(k),
                    after.get(k)
                ));
            }
        }
    }
    let mut want_work = set(&["sentinel", "beside-target"]);
    match (&r, expect) {
        (Err(e), Expect::Refused(markers)) => {
            let msg = e.to_string();
            if !markers.iter().any(|m| msg.contains(m)) {
                bad(format!("error {msg:?} mentions none of {markers:?}"));
            }
        }
        (Err(_), Expect::Either(_)) => {}
        (Err(e), Expect::Contained(_)) => bad(format!("expected success, got {e:?}")),
        (Ok(rep), Expect::Refused(_)) => bad(format!("expected a refusal, got {rep:?}")),
        (Ok(_), Expect::Contained(check) | Expect::Either(check)) => {
            want_work.insert("rootfs".to_owned());
            for p in check(&s.target, &s) {
                bad(p);
            }
        }
    }
    if r.is_err() && s.target.symlink_metadata().is_ok() {
        bad("the target exists after a refused unpack".into());
    }
    if s.work.exists() {
        let got = names_in(&s.work);
        if got != want_work {
            bad(format!(
                "the target's parent holds {got:?}, expected {want_work:?}"
            ));
        }
    } else {
        bad("the target's parent directory is gone".into());
    }
    problems
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// The type of `p` (lstat), as text, or "absent".
fn kind_of(p: &Path) -> String {
    match std::fs::symlink_metadata(p) {
        Ok(m) => format!("{:?}", m.file_type()),
        Err(_) => "absent".into(),
    }
}

fn expect_dir_with_file(t: &Path, dir: &str, file: &str, content: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let d = t.join(dir);
    match std::fs::symlink_metadata(&d) {
        Ok(m) if m.is_dir() => {}
        _ => out.push(format!(
            "{dir} should have been replaced by a directory inside the target, is {}",
            kind_of(&d)
        )),
    }
    match std::fs::read(d.join(file)) {
        Ok(b) if b == content => {}
        other => out.push(format!("{dir}/{file} inside the target: {other:?}")),
    }
    out
}

// ---------------------------------------------------------------------------------------
// 2. Malicious layers
// ---------------------------------------------------------------------------------------

#[test]
fn refuses_parent_and_absolute_entry_names() {
    let abs = format!("{OUT}/evil");
    let abs_dir = format!("{OUT}/");
    let mut problems = Vec::new();
    for (what, layers) in [
        ("../evil", vec![vec![file("../evil", b"x")]]),
        (
            "sub/../../evil",
            vec![vec![dir("sub"), file("sub/../../evil", b"x")]],
        ),
        (
            "./../outside/evil",
            vec![vec![file("./../outside/evil", b"x")]],
        ),
        ("absolute file", vec![vec![file(&abs, b"x")]]),
        ("absolute directory", vec![vec![dir(&abs_dir).mode(0o700)]]),
        (
            "absolute name in a second layer",
            vec![vec![file("ok", b"ok")], vec![file(&abs, b"x")]],
        ),
        ("absolute symlink name", vec![vec![symlink(&abs, "/")]]),
        ("../ symlink name", vec![vec![symlink("../evil", "/")]]),
    ] {
        problems.extend(evil(
            what,
            &layers,
            &Expect::Refused(&["absolute path", "leaves the root"]),
        ));
    }
    assert_no_problems(&problems);

    // The same through the command line: exit status 1, a clear error, no target.
    let s = sandbox();
    let img = plain(&[vec![file("ok", b"ok"), file("../evil", b"x")]]);
    img.store(&common::open(&s.root), "test/evil:1");
    let out = common::cli(
        &s.root,
        &["unpack", "test/evil:1", s.target.to_str().expect("utf-8")],
    );
    let stderr = common::failed_stderr(&out);
    assert!(stderr.contains("leaves the root"), "{stderr}");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    assert!(!s.target.exists() && !s.work.join("evil").exists());
    assert_eq!(names_in(&s.work), set(&["sentinel", "beside-target"]));
}

/// A symlink a layer writes is never followed: an entry beneath it replaces it with a
/// directory inside the target (the documented rule), in the same or a later layer.
#[test]
fn symlinks_in_layers_are_never_followed() {
    let out = OUT;
    // The target is top/work/rootfs (built in top/work/.rootfs.unpack-PID): ../../outside
    // from its root is top/outside.
    let cases: Vec<(&str, Vec<Vec<Ent>>, Expect)> = vec![
        (
            "absolute symlink to an outside dir, then link/file",
            vec![vec![symlink("link", out), file("link/file", b"in")]],
            Expect::Contained(|t, _| expect_dir_with_file(t, "link", "file", b"in")),
        ),
        (
            "relative symlink ../../outside, then up/file",
            vec![vec![symlink("up", "../../outside"), file("up/file", b"in")]],
            Expect::Contained(|t, _| expect_dir_with_file(t, "up", "file", b"in")),
        ),
        (
            "symlink in layer 1, write through it in layer 2",
            vec![vec![symlink("link", out)], vec![file("link/victim", b"in")]],
            Expect::Contained(|t, _| expect_dir_with_file(t, "link", "victim", b"in")),
        ),
        (
            "nested: a/b -> ../../../outside, then a/b/sub/new",
            vec![vec![
                dir("a"),
                symlink("a/b", "../../../outside"),
                file("a/b/sub/new", b"in"),
            ]],
            Expect::Contained(|t, _| expect_dir_with_file(t, "a/b/sub", "new", b"in")),
        ),
        (
            "symlink to an outside file, then a regular file of the same name",
            vec![vec![
                symlink("f", &format!("{out}/file")),
                file("f", b"replaced"),
            ]],
            Expect::Contained(|t, _| match std::fs::symlink_metadata(t.join("f")) {
                Ok(m) if m.is_file() && std::fs::read(t.join("f")).unwrap() == b"replaced" => {
                    vec![]
                }
                _ => vec![format!(
                    "f should be a regular file, is {}",
                    kind_of(&t.join("f"))
                )],
            }),
        ),
        (
            "symlink to an outside dir, then a directory entry of the same name (chmod 0700)",
            vec![vec![symlink("d", out), dir("d").mode(0o700)]],
            Expect::Contained(|t, _| match std::fs::symlink_metadata(t.join("d")) {
                Ok(m) if m.is_dir() && m.mode() & 0o7777 == 0o700 => vec![],
                _ => vec![format!(
                    "d should be a 0700 directory, is {}",
                    kind_of(&t.join("d"))
                )],
            }),
        ),
        (
            "symlink to an outside dir, then a directory below it",
            vec![vec![symlink("d", out), dir("d/sub/x")]],
            Expect::Contained(|t, _| {
                if t.join("d/sub/x").is_dir() && !t.join("d").is_symlink() {
                    vec![]
                } else {
                    vec![format!("d: {}", kind_of(&t.join("d")))]
                }
            }),
        ),
    ];
    let mut problems = Vec::new();
    for (what, layers, expect) in &cases {
        problems.extend(evil(what, layers, expect));
    }
    assert_no_problems(&problems);
}

/// A hardlink's target must be a file inside the target reached without symlinks; a
/// hardlink to a symlink must not become a link to what the symlink points at.
#[test]
fn hardlinks_cannot_reach_outside() {
    let out = OUT;
    let outside_file = format!("{OUT}/file");
    let cases: Vec<(&str, Vec<Vec<Ent>>, Expect)> = vec![
        (
            "hardlink to ../outside/file",
            vec![vec![hardlink("hl", "../outside/file")]],
            Expect::Refused(&["leaves the root"]),
        ),
        (
            "hardlink to ../../outside/file",
            vec![vec![hardlink("hl", "../../outside/file")]],
            Expect::Refused(&["leaves the root"]),
        ),
        (
            "hardlink to an absolute path",
            vec![vec![hardlink("hl", &outside_file)]],
            Expect::Refused(&["absolute path"]),
        ),
        (
            "hardlink through a symlinked directory",
            vec![vec![symlink("sd", out), hardlink("hl", "sd/file")]],
            Expect::Refused(&["hardlink target"]),
        ),
        (
            "hardlink through a relative symlinked directory",
            vec![vec![
                symlink("sd", "../../outside"),
                hardlink("hl", "sd/file"),
            ]],
            Expect::Refused(&["hardlink target"]),
        ),
        (
            "hardlink to a symlink that points at an outside file",
            vec![vec![symlink("sl", &outside_file), hardlink("hl", "sl")]],
            // Refused, or a second name for the symlink itself (never the outside file,
            // whose link count the sandbox snapshot checks).
            Expect::Either(|t, _| {
                let (Ok(a), Ok(b)) = (
                    std::fs::symlink_metadata(t.join("sl")),
                    std::fs::symlink_metadata(t.join("hl")),
                ) else {
                    return vec!["sl or hl missing".into()];
                };
                if b.file_type().is_symlink() && a.ino() == b.ino() {
                    vec![]
                } else {
                    vec![format!(
                        "hl should be the symlink sl's inode, is {}",
                        kind_of(&t.join("hl"))
                    )]
                }
            }),
        ),
        (
            "hardlink (layer 2) to a symlink (layer 1) to an outside file, then write hl",
            vec![
                vec![symlink("sl", &outside_file)],
                vec![hardlink("hl", "sl"), file("hl", b"through the link?")],
            ],
            Expect::Either(|t, _| match std::fs::read(t.join("hl")) {
                Ok(b) if b == b"through the link?" && t.join("sl").is_symlink() => vec![],
                other => vec![format!("hl: {other:?}, sl: {}", kind_of(&t.join("sl")))],
            }),
        ),
    ];
    let mut problems = Vec::new();
    for (what, layers, expect) in &cases {
        problems.extend(evil(what, layers, expect));
    }
    assert_no_problems(&problems);
}

/// Whiteouts remove only inside the target: not through a symlink, and not `..` (a
/// whiteout named `.wh...` names the parent directory).
#[test]
fn whiteouts_cannot_reach_outside() {
    let out = OUT;
    let cases: Vec<(&str, Vec<Vec<Ent>>, Expect)> = vec![
        (
            "link -> outside, then link/.wh.victim",
            vec![
                vec![symlink("link", out)],
                vec![file("link/.wh.victim", b"")],
            ],
            Expect::Either(|_, _| vec![]),
        ),
        (
            "link -> outside, then link/.wh..wh..opq",
            vec![
                vec![symlink("link", out)],
                vec![file("link/.wh..wh..opq", b"")],
            ],
            Expect::Either(|_, _| vec![]),
        ),
        (
            "up -> ../../outside, then .wh.up and up/.wh.file",
            vec![
                vec![symlink("up", "../../outside")],
                vec![file("up/.wh.file", b""), file(".wh.up", b"")],
            ],
            Expect::Either(|_, _| vec![]),
        ),
        (
            ".wh... at the root (whiteout of `..`)",
            vec![vec![file("keep", b"k")], vec![file(".wh...", b"")]],
            Expect::Either(|t, _| {
                if t.join("keep").is_file() {
                    vec![]
                } else {
                    vec!["keep was removed".into()]
                }
            }),
        ),
        (
            "sub/.wh... (whiteout of the root, from a subdirectory)",
            vec![
                vec![file("keep", b"k"), dir("sub")],
                vec![file("sub/.wh...", b"")],
            ],
            Expect::Either(|t, _| {
                if t.join("keep").is_file() {
                    vec![]
                } else {
                    vec!["keep was removed".into()]
                }
            }),
        ),
        (
            ".wh.. at the root (whiteout of `.`)",
            vec![vec![file("keep", b"k")], vec![file(".wh..", b"")]],
            Expect::Either(|t, _| {
                if t.join("keep").is_file() {
                    vec![]
                } else {
                    vec!["keep was removed".into()]
                }
            }),
        ),
    ];
    let mut problems = Vec::new();
    for (what, layers, expect) in &cases {
        problems.extend(evil(what, layers, expect));
    }
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------------------------------
// Whiteout semantics (OCI image spec, layer.md "Whiteouts"), against umoci
// ---------------------------------------------------------------------------------------

/// "Whiteout files MUST only apply to resources in lower/parent layers. Files that are
/// present in the same layer as a whiteout file can only be hidden by whiteout files in
/// subsequent layers." Each case is checked against the spec's result and against umoci.
#[test]
fn whiteouts_apply_only_to_lower_layers_like_umoci() {
    // (what, layers, every path of the expected tree, contents of some files)
    type Case = (
        &'static str,
        Vec<Vec<Ent>>,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    );
    let cases: Vec<Case> = vec![
        (
            "f then .wh.f in the same layer",
            vec![
                vec![file("f", b"lower")],
                vec![file("f", b"upper"), file(".wh.f", b"")],
            ],
            &["", "f"],
            &[("f", "upper")],
        ),
        (
            "d/x then .wh.d in the same layer",
            vec![
                vec![dir("d"), file("d/x", b"lower"), file("d/y", b"lower")],
                vec![file("d/x", b"upper"), file(".wh.d", b"")],
            ],
            &["", "d", "d/x"],
            &[("d/x", "upper")],
        ),
        (
            "opaque marker after a file in a parent the same layer created implicitly",
            vec![
                vec![dir("d"), file("d/old", b"lower")],
                vec![file("d/sub/new", b"upper"), file("d/.wh..wh..opq", b"")],
            ],
            &["", "d", "d/sub", "d/sub/new"],
            &[("d/sub/new", "upper")],
        ),
        (
            "opaque marker after a re-emitted subdirectory: its lower children are hidden",
            vec![
                vec![dir("d"), dir("d/sub"), file("d/sub/old", b"lower")],
                vec![
                    dir("d"),
                    dir("d/sub"),
                    file("d/sub/new", b"upper"),
                    file("d/.wh..wh..opq", b""),
                ],
            ],
            &["", "d", "d/sub", "d/sub/new"],
            &[("d/sub/new", "upper")],
        ),
        (
            "control: opaque marker first (as umoci insert writes it)",
            vec![
                vec![
                    dir("d"),
                    file("d/old", b"lower"),
                    dir("d/sub"),
                    file("d/sub/o", b""),
                ],
                vec![
                    file("d/.wh..wh..opq", b""),
                    dir("d"),
                    file("d/new", b"upper"),
                ],
            ],
            &["", "d", "d/new"],
            &[("d/new", "upper")],
        ),
        (
            "control: .wh. of a lower file and a lower directory",
            vec![
                vec![
                    file("f", b"lower"),
                    dir("d"),
                    file("d/x", b""),
                    file("g", b"g"),
                ],
                vec![file(".wh.f", b""), file(".wh.d", b"")],
            ],
            &["", "g"],
            &[("g", "g")],
        ),
    ];
    let dir = common::tempdir();
    let mut problems = Vec::new();
    for (i, (what, layers, paths, contents)) in cases.iter().enumerate() {
        let img = plain(layers);
        let store = common::open(&dir.path().join(format!("store-{i}")));
        img.store(&store, "test/wh:1");
        let ours = dir.path().join(format!("ours-{i}"));
        if let Err(e) = store.unpack("test/wh:1", &ours, &opts()) {
            problems.push(format!("{what}: unpack failed: {e:?}"));
            continue;
        }
        let layout = dir.path().join(format!("layout-{i}"));
        img.layout(&layout);
        let theirs = umoci_rootfs(&layout, "t", &dir.path().join(format!("bundle-{i}")));
        let a = scan(&ours);
        let b = scan(&theirs);
        let want: BTreeSet<String> = paths.iter().map(|p| (*p).to_owned()).collect();
        let got: BTreeSet<String> = a.nodes.keys().cloned().collect();
        let umoci: BTreeSet<String> = b.nodes.keys().cloned().collect();
        if umoci != want {
            problems.push(format!(
                "{what}: umoci gives {umoci:?}, the spec {want:?} (the test's premise)"
            ));
        }
        if got != want {
            problems.push(format!("{what}: ours has {got:?}, the spec wants {want:?}"));
        }
        for (p, c) in *contents {
            match std::fs::read(ours.join(p)) {
                Ok(b) if b == c.as_bytes() => {}
                other => problems.push(format!("{what}: {p} is {other:?}, want {c:?}")),
            }
        }
        if got == want {
            // A directory whose contents a later layer changed without re-sending the
            // directory: umoci stamps it with the time of the unpack, the store keeps the
            // mtime its layer gave it. Neither is wrong (the spec is silent); compare the
            // rest.
            let (mut a, mut b) = (a, b);
            for t in [&mut a, &mut b] {
                for n in t.nodes.values_mut() {
                    if n.what == What::Dir {
                        n.mtime = 0;
                    }
                }
            }
            for d in diff_trees(&a, &b, "umoci") {
                problems.push(format!("{what}: {d}"));
            }
        }
    }
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------------------------------
// 3. diff_id
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_diff_id_fails_and_leaves_nothing() {
    let l1 = layer(&[dir("etc"), file("etc/one", b"one")]);
    let l2 = layer(&[
        file("etc/two", b"two"),
        file("big", &common::blob(7, 3 << 20)),
    ]);
    let gz1 = gzip(&l1);
    let cases: Vec<(&str, Built, Option<&[&str]>)> = vec![
        (
            "control: gzip layer, diff_id of the uncompressed tar",
            build(vec![(OCI_LAYER_GZIP, gz1.clone())], &[sha(&l1)]),
            None,
        ),
        (
            "gzip layer whose config lists the compressed digest",
            build(vec![(OCI_LAYER_GZIP, gz1.clone())], &[sha(&gz1)]),
            Some(&["diff_id", "layer 0"]),
        ),
        (
            "second (3 MiB) layer with a wrong diff_id, after a good one was applied",
            build(
                vec![(OCI_LAYER_GZIP, gz1.clone()), (OCI_LAYER, l2.clone())],
                &[sha(&l1), sha(b"something else")],
            ),
            Some(&["diff_id", "layer 1"]),
        ),
        (
            "fewer diff_ids than layers",
            build(
                vec![(OCI_LAYER_GZIP, gz1.clone()), (OCI_LAYER, l2.clone())],
                &[sha(&l1)],
            ),
            Some(&["diff_ids"]),
        ),
    ];
    let d = common::tempdir();
    for (i, (what, img, markers)) in cases.iter().enumerate() {
        let store = common::open(&d.path().join(format!("store-{i}")));
        img.store(&store, "test/diff:1");
        let work = d.path().join(format!("work-{i}"));
        std::fs::create_dir(&work).expect("create work");
        let target = work.join("rootfs");
        let r = store.unpack("test/diff:1", &target, &opts());
        match (r, markers) {
            (Ok(rep), None) => {
                assert_eq!(rep.layers, 1, "{what}");
                assert_eq!(std::fs::read(target.join("etc/one")).unwrap(), b"one");
                assert_eq!(names_in(&work), set(&["rootfs"]), "{what}");
            }
            (Ok(rep), Some(_)) => panic!("{what}: unpacked: {rep:?}"),
            (Err(e), None) => panic!("{what}: {e:?}"),
            (Err(e), Some(markers)) => {
                let msg = e.to_string();
                for m in *markers {
                    assert!(msg.contains(m), "{what}: error {msg:?} lacks {m:?}");
                }
                assert!(
                    !target.exists() && target.symlink_metadata().is_err(),
                    "{what}: the target exists after the failure"
                );
                assert!(
                    names_in(&work).is_empty(),
                    "{what}: left behind {:?}",
                    names_in(&work)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. An index
// ---------------------------------------------------------------------------------------

#[test]
fn index_unpacks_the_asked_platform() {
    let src = fixture("oci-multiarch");
    // The platforms, read from the layout itself.
    let blob = |d: &str| {
        std::fs::read(
            src.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .expect("read blob")
    };
    let top: Value =
        serde_json::from_slice(&std::fs::read(src.join("index.json")).unwrap()).unwrap();
    let mut by_tag: BTreeMap<String, BTreeMap<String, Digest>> = BTreeMap::new();
    for m in top["manifests"].as_array().expect("manifests") {
        let tag = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .expect("ref.name")
            .to_owned();
        let idx: Value = serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        let mut plats = BTreeMap::new();
        for c in idx["manifests"].as_array().expect("children") {
            let p = &c["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                s = format!("{s}/{v}");
            }
            plats.insert(s, Digest::parse(c["digest"].as_str().unwrap()).unwrap());
        }
        by_tag.insert(tag, plats);
    }
    assert_eq!(
        by_tag.keys().map(String::as_str).collect::<Vec<_>>(),
        ["multi", "multi-v2s2"]
    );

    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);
    store
        .import_path(&src, &import_opts("test/multi"))
        .expect("import oci-multiarch");
    let mut trees = Vec::new();
    for (tag, plats) in &by_tag {
        assert_eq!(
            plats.keys().map(String::as_str).collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64/v8"]
        );
        let name = format!("test/multi:{tag}");
        for (p, want) in plats {
            let out = dir.path().join(format!("{tag}-{}", p.replace('/', "-")));
            let r = store
                .unpack(&name, &out, &platform(p))
                .unwrap_or_else(|e| panic!("unpack {name} {p}: {e:?}"));
            assert_eq!(r.manifest.as_ref(), Some(want), "{name} --platform {p}");
            check_report(&store, &r, want, &format!("{name} {p}"));
            let t = scan(&out);
            assert_eq!(
                std::fs::read_to_string(out.join("etc/hostname")).unwrap(),
                "fixture-host-v2\n"
            );
            trees.push((format!("{name} {p}"), t));
        }
        // `linux/arm64` matches `linux/arm64/v8`; `linux/arm` must not.
        let out = dir.path().join(format!("{tag}-arm64-novariant"));
        let r = store
            .unpack(&name, &out, &platform("linux/arm64"))
            .unwrap_or_else(|e| panic!("unpack {name} linux/arm64: {e:?}"));
        assert_eq!(r.manifest.as_ref(), Some(&plats["linux/arm64/v8"]));
        // The default is this machine's platform.
        let host = layerstore::unpack::host_platform();
        let out = dir.path().join(format!("{tag}-default"));
        match (store.unpack(&name, &out, &opts()), plats.get(&host)) {
            (Ok(r), Some(d)) => assert_eq!(r.manifest.as_ref(), Some(d), "default {host}"),
            (Err(e), None) => assert!(e.to_string().contains(&host), "{e}"),
            (r, d) => panic!("{name} on {host}: {r:?}, expected {d:?}"),
        }
        for p in ["linux/s390x", "linux/arm", "windows/amd64"] {
            let out = dir.path().join(format!("{tag}-none"));
            let e = store
                .unpack(&name, &out, &platform(p))
                .expect_err(&format!("{name} has no {p}"));
            let msg = e.to_string();
            assert!(matches!(e, Error::Invalid(_)), "{e:?}");
            assert!(msg.contains(p), "{msg}");
            for have in plats.keys() {
                assert!(msg.contains(have.as_str()), "{msg} should list {have}");
            }
            assert!(out.symlink_metadata().is_err(), "{p}: target created");
        }
    }
    // Same layers on both platforms and in both formats: the same tree.
    let (first, t0) = &trees[0];
    for (other, t) in &trees[1..] {
        assert_same_tree(t, t0, first, other);
    }

    // The command line's --platform.
    drop(store);
    let out = dir.path().join("cli-arm64");
    let v: Value = serde_json::from_str(&common::ok_stdout(&common::cli(
        &root,
        &[
            "unpack",
            "test/multi:multi",
            out.to_str().unwrap(),
            "--platform",
            "linux/arm64/v8",
            "--json",
        ],
    )))
    .expect("json report");
    assert_eq!(
        v["manifest"],
        by_tag["multi"]["linux/arm64/v8"].to_string(),
        "{v}"
    );
    let out = dir.path().join("cli-none");
    let stderr = common::failed_stderr(&common::cli(
        &root,
        &[
            "unpack",
            "test/multi:multi",
            out.to_str().unwrap(),
            "--platform",
            "linux/riscv64",
        ],
    ));
    assert!(
        stderr.contains("linux/riscv64")
            && stderr.contains("linux/amd64")
            && stderr.contains("linux/arm64/v8"),
        "{stderr}"
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------
// 5. FIFOs, devices and metadata
// ---------------------------------------------------------------------------------------

/// The current umask, from /proc (reading it with umask(2) would change it for every
/// thread).
fn umask() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

#[test]
fn fifos_devices_owners_and_xattrs() {
    let root_user = is_root();
    let img = plain(&[
        vec![
            dir("dev"),
            dir("srv")
                .owner(1000, 1001)
                .mode(0o2775)
                .mtime(1_600_000_000),
        ],
        vec![
            ent("dev/null", tar::EntryType::Char, 0o666)
                .dev(1, 3)
                .mtime(1_500_000_000),
            ent("dev/loop0", tar::EntryType::Block, 0o660)
                .dev(7, 0)
                .owner(0, 6)
                .mtime(1_500_000_000),
            ent("srv/fifo", tar::EntryType::Fifo, 0o666)
                .owner(1000, 1001)
                .mtime(1_500_000_000),
            file("srv/owned", b"mine")
                .owner(1000, 1001)
                .mode(0o4750)
                .mtime(1_400_000_000),
            symlink("srv/link", "owned").owner(1000, 1001),
            file("srv/xattr", b"x").xattr("user.layerstore", b"hello"),
        ],
    ]);
    let d = common::tempdir();
    let store = common::open(&d.path().join("store"));
    img.store(&store, "test/special:1");
    let out = d.path().join("rootfs");
    let r = store
        .unpack("test/special:1", &out, &opts())
        .expect("unpack");
    let t = scan(&out);
    let mut problems = Vec::new();
    let mut check = |what: &str, ok: bool, got: String| {
        if !ok {
            problems.push(format!("{what}: got {got}"));
        }
    };

    let fifo = t.node("srv/fifo");
    check(
        "srv/fifo is a FIFO",
        fifo.what == What::Fifo,
        format!("{fifo:?}"),
    );
    check(
        "srv/fifo mode 0666 (not masked by the umask)",
        fifo.perm == 0o666,
        format!(
            "{:o} (umask {:?})",
            fifo.perm,
            umask().map(|m| format!("{m:o}"))
        ),
    );
    check(
        "srv/fifo mtime from the header",
        fifo.mtime == 1_500_000_000,
        fifo.mtime.to_string(),
    );

    let owned = t.node("srv/owned");
    check(
        "srv/owned mode 04750 (setuid kept after chown)",
        owned.perm == 0o4750,
        format!("{:o}", owned.perm),
    );
    check(
        "srv/owned mtime",
        owned.mtime == 1_400_000_000,
        owned.mtime.to_string(),
    );
    let srv = t.node("srv");
    check(
        "srv mode 02775 and mtime",
        srv.perm == 0o2775 && srv.mtime == 1_600_000_000,
        format!("{srv:?}"),
    );

    // xattrs: applied, or counted as refused by the file system.
    let mut buf = [0u8; 64];
    match rustix::fs::lgetxattr(out.join("srv/xattr"), "user.layerstore", &mut buf[..]) {
        Ok(n) => check(
            "srv/xattr user.layerstore",
            &buf[..n] == b"hello" && r.skipped_xattrs == 0,
            format!("{:?}, skipped {}", &buf[..n], r.skipped_xattrs),
        ),
        Err(e) => check(
            "srv/xattr refused by the file system is counted",
            r.skipped_xattrs == 1,
            format!("{e}, skipped_xattrs {}", r.skipped_xattrs),
        ),
    }

    if root_user {
        check(
            "no device skipped as root",
            r.skipped_devices == 0,
            r.skipped_devices.to_string(),
        );
        let null = t.node("dev/null");
        check(
            "dev/null is char 1:3",
            null.what == What::Char(rustix::fs::makedev(1, 3)),
            format!("{null:?}"),
        );
        check(
            "dev/null mode 0666 (not masked by the umask)",
            null.perm == 0o666,
            format!("{:o}", null.perm),
        );
        check(
            "dev/null mtime from the header",
            null.mtime == 1_500_000_000,
            null.mtime.to_string(),
        );
        let lo = t.node("dev/loop0");
        check(
            "dev/loop0 is block 7:0, mode 0660",
            lo.what == What::Block(rustix::fs::makedev(7, 0)) && lo.perm == 0o660,
            format!("{lo:?}"),
        );
        check(
            "dev/loop0 group 6 from the header",
            lo.gid == 6,
            lo.gid.to_string(),
        );
        for p in ["srv/fifo", "srv/owned", "srv/link", "srv"] {
            let n = t.node(p);
            check(
                &format!("{p} owned 1000:1001 (as root)"),
                (n.uid, n.gid) == (1000, 1001),
                format!("{}:{}", n.uid, n.gid),
            );
        }
    } else {
        eprintln!(
            "fifos_devices_owners_and_xattrs: not running as root, so device nodes are \
             skipped and owners are not applied; checking the skip count only (CI runs as root)"
        );
        check(
            "both devices skipped",
            r.skipped_devices == 2 && !t.nodes.contains_key("dev/null"),
            format!("{r:?}"),
        );
    }
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------------------------------
// 6. The command line
// ---------------------------------------------------------------------------------------

#[test]
fn cli_unpack_reports_and_refuses_an_existing_target() {
    let d = common::tempdir();
    let root = d.path().join("store");
    let (lib_report, manifest) = {
        let store = common::open(&root);
        store
            .import_path(&fixture("oci-layout"), &import_opts("test/x"))
            .expect("import");
        let r = store
            .unpack("test/x:base", &d.path().join("lib"), &opts())
            .expect("library unpack");
        (r, store.resolve("test/x:base").expect("resolve"))
    };
    let work = d.path().join("work");
    std::fs::create_dir(&work).expect("create work");

    // --json
    let target = work.join("json");
    let stdout = common::ok_stdout(&common::cli(
        &root,
        &["unpack", "test/x:base", target.to_str().unwrap(), "--json"],
    ));
    let v: Value = serde_json::from_str(&stdout).expect("a JSON report");
    let keys = common::json_keys(&v);
    assert_eq!(
        keys,
        BTreeSet::from([
            "manifest",
            "layers",
            "entries",
            "bytes",
            "skipped_devices",
            "skipped_xattrs",
            "elapsed_ms"
        ])
    );
    assert_eq!(v["manifest"], manifest.to_string());
    assert_eq!(v["layers"], 2);
    assert_eq!(v["entries"], lib_report.entries);
    assert_eq!(v["entries"], 45, "L1 has 24 entries and `./`, L2 has 20");
    assert_eq!(v["bytes"], lib_report.bytes);
    assert!(v["elapsed_ms"].is_u64());
    assert_same_tree(
        &scan(&target),
        &scan(&d.path().join("lib")),
        "library",
        "CLI",
    );

    // Human form.
    let target = work.join("human");
    let stdout = common::ok_stdout(&common::cli(
        &root,
        &["unpack", "test/x:base", target.to_str().unwrap()],
    ));
    assert!(
        stdout.starts_with("unpacked 2 layers (45 entries, ")
            && stdout
                .trim_end()
                .ends_with(&format!("into {}", target.display())),
        "{stdout}"
    );
    assert!(target.join("etc/hostname").is_file());
    assert_eq!(names_in(&work), set(&["json", "human"]));

    // Existing targets: a directory with content, a file, a dangling symlink and a
    // symlink to a directory. Each is refused and left exactly as it was.
    let existing_dir = work.join("exists-dir");
    std::fs::create_dir(&existing_dir).unwrap();
    std::fs::write(existing_dir.join("keep"), b"keep\n").unwrap();
    let existing_file = work.join("exists-file");
    std::fs::write(&existing_file, b"file\n").unwrap();
    let dangling = work.join("exists-dangling");
    std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let to_dir = work.join("exists-symlink");
    std::os::unix::fs::symlink(&elsewhere, &to_dir).unwrap();
    let snapshot = |p: &Path| {
        let mut m = BTreeMap::new();
        for q in [p, &p.join("keep")] {
            if let Ok(md) = std::fs::symlink_metadata(q) {
                m.insert(
                    q.to_owned(),
                    (
                        format!("{:?}", md.file_type()),
                        md.mode(),
                        md.mtime(),
                        std::fs::read(q).ok(),
                        std::fs::read_link(q).ok(),
                    ),
                );
            }
        }
        m
    };
    for t in [&existing_dir, &existing_file, &dangling, &to_dir] {
        let before = snapshot(t);
        let work_before = names_in(&work);
        let stderr = common::failed_stderr(&common::cli(
            &root,
            &["unpack", "test/x:base", t.to_str().unwrap()],
        ));
        assert!(
            stderr.contains("already exists") && stderr.contains(t.to_str().unwrap()),
            "{}: {stderr}",
            t.display()
        );
        assert_eq!(snapshot(t), before, "{} changed", t.display());
        assert_eq!(names_in(&work), work_before, "{}", t.display());
        assert!(names_in(&elsewhere).is_empty(), "wrote through the symlink");
        assert!(
            !d.path().join("nowhere").exists(),
            "created the dangling target"
        );
    }
    // The library says the same.
    let store = common::open(&root);
    let e = store
        .unpack("test/x:base", &existing_dir, &opts())
        .expect_err("existing target");
    assert!(
        matches!(e, Error::Invalid(_)) && e.to_string().contains("already exists"),
        "{e:?}"
    );
    drop(store);

    // An unknown image: an error, and no target.
    let target = work.join("unknown");
    let stderr = common::failed_stderr(&common::cli(
        &root,
        &["unpack", "test/x:nope", target.to_str().unwrap()],
    ));
    assert!(stderr.contains("test/x:nope"), "{stderr}");
    assert!(target.symlink_metadata().is_err());
    assert_eq!(
        names_in(&work),
        set(&[
            "json",
            "human",
            "exists-dir",
            "exists-file",
            "exists-dangling",
            "exists-symlink"
        ])
    );
}
