//! Hostile inputs, table-driven: archives and layers built to hurt — traversal, absolute
//! paths, symlink and hardlink escapes, device nodes, duplicate entries, entries larger
//! than the archive, truncated tars, gzip and zstd bombs, wrong digests and sizes,
//! malformed and enormous JSON, a million layers, unknown media types, link cycles, deep
//! nesting. Each must get a clear error naming the problem (or, where the input is valid
//! if odd, be handled), and afterwards the store must be unchanged (the same blobs and
//! names, a clean `verify --deep`) and nothing may exist outside the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use layerstore::{Depth, Digest, ImportOptions, Store, VerifyOptions};
use serde_json::json;

use crate::common::{self, KIB, MIB};
use crate::oci::{self, Built, Ent, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST};

/// The store's visible state: every blob with its size, and every name.
fn state(store: &Store) -> (BTreeMap<Digest, u64>, Vec<(String, Digest)>) {
    (
        store
            .iter()
            .map(|i| {
                let i = i.expect("iter");
                (i.digest, i.size)
            })
            .collect(),
        store.names().expect("names"),
    )
}

fn clean(store: &Store, what: &str) {
    let r = store
        .verify(
            &VerifyOptions::depth(Depth::Deep),
            &AtomicBool::new(false),
            &|_| {},
        )
        .expect("verify");
    assert_eq!(r.errors, 0, "{what}: {:#?}", r.problems);
}

/// A store holding one named image, so "unchanged" means something.
fn store_with_an_image(root: &Path) -> Store {
    let store = common::open(root);
    oci::plain(&[vec![oci::file("keep", b"keep me\n")]]).store(&store, "hostile/keep:1");
    store
}

/// An archive entry of any type, with raw name and link.
fn raw(name: &str, ty: tar::EntryType, link: &str, data: &[u8]) -> Ent {
    Ent {
        data: data.to_vec(),
        link: link.to_owned(),
        ..oci::ent(name, ty, 0o644)
    }
}

fn reg(name: &str, data: &[u8]) -> Ent {
    oci::file(name, data)
}

/// The entries of a valid OCI archive of `img` (named `t`), to be tampered with.
fn entries_of(img: &Built) -> Vec<Ent> {
    let index = oci::index_of(&[(img.digest, img.manifest.len(), OCI_MANIFEST, Some("t"))]);
    let mut v = vec![reg("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)];
    for b in img.blobs() {
        v.push(reg(&oci::blob_path(b), b));
    }
    v.push(reg("index.json", &index));
    v
}

fn small_image() -> Built {
    oci::plain(&[vec![oci::file("f", b"hello\n")]])
}

/// A tar whose last entry claims `claim` bytes but holds fewer.
fn with_short_entry(mut entries: Vec<Ent>, claim: u64) -> Vec<u8> {
    let last = entries.pop().expect("an entry");
    let mut t = oci::layer(&entries);
    t.truncate(t.len() - 1024); // drop the end-of-archive trailer
    let mut h = tar::Header::new_ustar();
    h.set_path(&last.name).expect("name");
    h.set_size(claim);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    t.extend_from_slice(h.as_bytes());
    t.extend_from_slice(&last.data);
    t
}

/// One archive case: its bytes and what the error must say (`None`: it imports).
struct Case {
    what: &'static str,
    archive: Vec<u8>,
    error: Option<&'static str>,
}

fn archive_cases() -> Vec<Case> {
    let img = small_image();
    let base = entries_of(&img);
    let with = |extra: Vec<Ent>| {
        let mut e = base.clone();
        e.splice(1..1, extra);
        oci::layer(&e)
    };
    let replace = |name: &str, data: &[u8]| {
        let mut e = base.clone();
        for x in &mut e {
            if x.name == name {
                x.data = data.to_vec();
            }
        }
        oci::layer(&e)
    };
    let layer_path = oci::blob_path(&img.layers[0].1);
    let manifest_path = oci::blob_path(&img.manifest);
    let mut cases = vec![
        Case {
            what: "traversal",
            archive: with(vec![reg("../../evil", b"x")]),
            error: Some("leaves the archive"),
        },
        Case {
            what: "traversal inside",
            archive: with(vec![reg("blobs/../../evil", b"x")]),
            error: Some("leaves the archive"),
        },
        Case {
            what: "absolute path",
            archive: with(vec![reg("/etc/evil", b"x")]),
            error: Some("absolute path"),
        },
        Case {
            what: "symlink escape",
            archive: with(vec![raw("esc", tar::EntryType::Symlink, "../../outside", b"")]),
            error: Some("points outside"),
        },
        Case {
            what: "absolute symlink",
            archive: with(vec![raw("esc", tar::EntryType::Symlink, "/etc/passwd", b"")]),
            error: Some("points outside"),
        },
        Case {
            what: "hardlink escape",
            archive: with(vec![raw("esc", tar::EntryType::Link, "../../outside", b"")]),
            error: Some("leaves the archive"),
        },
        Case {
            what: "device nodes are no blobs",
            archive: {
                let mut e = base.clone();
                for x in &mut e {
                    if x.name == layer_path {
                        x.ty = tar::EntryType::Char;
                        x.data.clear();
                    }
                }
                oci::layer(&e)
            },
            error: Some("is listed but not in the archive"),
        },
        Case {
            what: "a duplicate entry with other content",
            archive: with(vec![reg(&layer_path, b"not the layer")]),
            error: Some("but its name says"),
        },
        Case {
            what: "an entry larger than the archive",
            archive: with_short_entry(base.clone(), 10 * MIB as u64),
            error: Some("reading the archive"),
        },
        Case {
            what: "a truncated archive",
            archive: {
                let t = oci::layer(&base);
                t[..t.len() / 2 + 7].to_vec()
            },
            error: Some("archive"),
        },
        Case {
            what: "a blob that is not what its name says",
            archive: replace(&layer_path, b"other bytes"),
            error: Some("but its name says"),
        },
        Case {
            what: "a descriptor with the wrong size",
            archive: {
                let mut m: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
                m["layers"][0]["size"] = json!(img.layers[0].1.len() + 1);
                let mb = serde_json::to_vec(&m).unwrap();
                let mut e = base.clone();
                e.retain(|x| x.name != manifest_path && x.name != "index.json");
                e.push(reg(&oci::blob_path(&mb), &mb));
                e.push(reg(
                    "index.json",
                    &oci::index_of(&[(common::sha256(&mb), mb.len(), OCI_MANIFEST, Some("t"))]),
                ));
                oci::layer(&e)
            },
            error: Some("but its descriptor says"),
        },
        Case {
            what: "malformed index.json",
            archive: replace("index.json", b"{\"manifests\": ["),
            error: Some("index.json"),
        },
        Case {
            what: "index.json that is a manifest",
            archive: replace("index.json", &img.manifest),
            error: Some("is not an image index"),
        },
        Case {
            what: "enormous index.json",
            archive: replace("index.json", &vec![b' '; 70 * MIB]),
            error: Some("bytes"),
        },
        Case {
            what: "a future layout version",
            archive: replace("oci-layout", br#"{"imageLayoutVersion":"2.0.0"}"#),
            error: Some("unsupported image layout version"),
        },
        Case {
            what: "a manifest of an unknown shape",
            archive: {
                let odd = br#"{"schemaVersion":2,"mediaType":"application/x-unknown"}"#;
                let mut e = base.clone();
                e.retain(|x| x.name != "index.json");
                e.push(reg(&oci::blob_path(odd), odd));
                e.push(reg(
                    "index.json",
                    &oci::index_of(&[(common::sha256(odd), odd.len(), "application/x-unknown", Some("t"))]),
                ));
                oci::layer(&e)
            },
            error: Some("neither an image manifest"),
        },
        Case {
            what: "schema 1",
            archive: {
                let s1 = br#"{"schemaVersion":1,"name":"x","tag":"t","fsLayers":[]}"#;
                let mut e = base.clone();
                e.retain(|x| x.name != "index.json");
                e.push(reg(&oci::blob_path(s1), s1));
                e.push(reg(
                    "index.json",
                    &oci::index_of(&[(common::sha256(s1), s1.len(), OCI_MANIFEST, Some("t"))]),
                ));
                oci::layer(&e)
            },
            error: Some("schema 1"),
        },
        Case {
            what: "an invalid name",
            archive: {
                let mut e = base.clone();
                e.retain(|x| x.name != "index.json");
                e.push(reg(
                    "index.json",
                    &oci::index_of(&[(img.digest, img.manifest.len(), OCI_MANIFEST, Some("Bad/UPPER:t"))]),
                ));
                oci::layer(&e)
            },
            error: Some("must be lowercase"),
        },
        Case {
            what: "neither layout nor docker archive",
            archive: oci::layer(&[reg("README", b"hello")]),
            error: Some("neither an OCI layout"),
        },
        Case {
            what: "an empty index",
            archive: replace("index.json", br#"{"schemaVersion":2,"manifests":[]}"#),
            error: Some("holds no image"),
        },
        Case {
            what: "docker manifest.json null",
            archive: oci::layer(&[reg("manifest.json", b"null")]),
            error: Some("holds no image"),
        },
        Case {
            what: "a docker link cycle",
            archive: oci::layer(&[
                raw("a/layer.tar", tar::EntryType::Symlink, "../b/layer.tar", b""),
                raw("b/layer.tar", tar::EntryType::Symlink, "../a/layer.tar", b""),
                reg("c.json", br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#),
                reg("manifest.json", br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["a/layer.tar"]}]"#),
            ]),
            error: Some("is not in the archive"),
        },
        Case {
            what: "a docker layer that is not its diff_id",
            archive: oci::layer(&[
                reg("l/layer.tar", &oci::layer(&[oci::file("f", b"x")])),
                reg("c.json", br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#),
                reg("manifest.json", br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]"#),
            ]),
            error: Some("diff_id"),
        },
    ];
    // A million layers: the manifest is too large to parse.
    let million = {
        let one = format!(
            r#"{{"mediaType":"{OCI_LAYER}","digest":"{}","size":{}}}"#,
            oci::sha(&img.layers[0].1),
            img.layers[0].1.len()
        );
        let layers = vec![one; 1_000_000].join(",");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":{}}},"layers":[{layers}]}}"#,
            oci::sha(&img.config),
            img.config.len()
        )
        .into_bytes();
        let mut e = base.clone();
        e.retain(|x| x.name != "index.json");
        e.push(reg(&oci::blob_path(&m), &m));
        e.push(reg(
            "index.json",
            &oci::index_of(&[(common::sha256(&m), m.len(), OCI_MANIFEST, Some("t"))]),
        ));
        oci::layer(&e)
    };
    cases.push(Case {
        what: "a million layers",
        archive: million,
        error: Some("too large"),
    });
    // Accepted: odd but valid.
    cases.push(Case {
        what: "an unknown layer media type",
        archive: {
            let l = oci::layer(&[oci::file("f", b"odd")]);
            let odd = oci::build(
                vec![("application/vnd.example.layer.v1", l.clone())],
                &[oci::sha(&l)],
            );
            oci::oci_archive(&[(&odd, "odd")], &[])
        },
        error: None,
    });
    cases.push(Case {
        what: "indexes nested deep",
        archive: {
            let mut blobs: Vec<Vec<u8>> = img.blobs().iter().map(|b| b.to_vec()).collect();
            let (mut d, mut len, mut mt) = (img.digest, img.manifest.len(), OCI_MANIFEST);
            for _ in 0..40 {
                let idx = oci::index_of(&[(d, len, mt, None)]);
                d = common::sha256(&idx);
                len = idx.len();
                mt = OCI_INDEX;
                blobs.push(idx);
            }
            let mut e = vec![reg("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)];
            for b in &blobs {
                e.push(reg(&oci::blob_path(b), b));
            }
            e.push(reg(
                "index.json",
                &oci::index_of(&[(d, len, mt, Some("deep"))]),
            ));
            oci::layer(&e)
        },
        error: None,
    });
    cases
}

#[test]
fn hostile_archives_get_clear_errors_and_change_nothing() {
    let dir = common::tempdir();
    let store = store_with_an_image(&dir.path().join("store"));
    let mut accepted = 0;
    let cases = archive_cases();
    let n = cases.len();
    for c in cases {
        let before = state(&store);
        let mut o = ImportOptions::default();
        o.base_name = Some("hostile/x".into());
        let r = store.import_tar(c.archive.as_slice(), &o);
        match (c.error, r) {
            (Some(want), Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.to_lowercase().contains(&want.to_lowercase()),
                    "{}: the error names the problem ({want}): {msg}",
                    c.what
                );
                assert!(!msg.chars().any(char::is_control), "{}: {msg:?}", c.what);
                assert_eq!(
                    state(&store),
                    before,
                    "{}: a refused archive commits nothing",
                    c.what
                );
            }
            (Some(want), Ok(o)) => panic!(
                "{}: accepted ({o:?}), expected an error about {want}",
                c.what
            ),
            (None, Err(e)) => panic!("{}: refused: {e}", c.what),
            (None, Ok(_)) => accepted += 1,
        }
        clean(&store, c.what);
        common::assert_ingest_clean(store.root());
    }
    assert_eq!(accepted, 2);
    eprintln!("hostile archives: {n} cases");
}

/// The same archives as layout directories (the directory importer's own checks).
#[test]
fn hostile_layout_directories_are_refused() {
    let dir = common::tempdir();
    let store = store_with_an_image(&dir.path().join("store"));
    let img = small_image();
    let layout = |name: &str| -> PathBuf {
        let p = dir.path().join(name);
        img.layout(&p);
        p
    };
    let before = state(&store);
    let l = layout("symlinked");
    let blob = l.join(oci::blob_path(&img.layers[0].1));
    let target = dir.path().join("outside-blob");
    std::fs::rename(&blob, &target).unwrap();
    std::os::unix::fs::symlink(&target, &blob).unwrap();
    let e = store
        .import_path(&l, &ImportOptions::default())
        .expect_err("a symlinked blob");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let l = layout("wrong");
    std::fs::write(l.join(oci::blob_path(&img.layers[0].1)), b"tampered").unwrap();
    let e = store
        .import_path(&l, &ImportOptions::default())
        .expect_err("a tampered blob");
    assert!(e.to_string().contains("bytes"), "{e}");
    let l = layout("missing");
    std::fs::remove_file(l.join(oci::blob_path(&img.config))).unwrap();
    let e = store
        .import_path(&l, &ImportOptions::default())
        .expect_err("a missing blob");
    assert!(e.to_string().contains("not in the layout"), "{e}");
    assert_eq!(state(&store), before);
    clean(&store, "layouts");
}

// ---------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------

/// `outside/` (what a layer must not reach) and `work/` (where the target goes).
struct Sandbox {
    _dir: tempfile::TempDir,
    outside: PathBuf,
    work: PathBuf,
}

fn sandbox() -> Sandbox {
    let d = common::tempdir();
    let outside = d.path().join("outside");
    let work = d.path().join("work");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("file"), b"must not change").unwrap();
    std::fs::create_dir_all(&work).unwrap();
    Sandbox {
        outside,
        work,
        _dir: d,
    }
}

fn tree(p: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (f, _) in common::files_under(p) {
        out.insert(f.clone(), std::fs::read(&f).unwrap_or_default());
    }
    out
}

/// One layer case: the layers (as stored, with their media types and `diff_ids`) and what
/// the unpack error must say (`None`: it unpacks).
struct LayerCase {
    what: &'static str,
    image: Built,
    error: Option<&'static str>,
}

fn gzip_of(data_len: usize) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut b = tar::Builder::new(&mut e);
    let mut h = tar::Header::new_ustar();
    h.set_size(data_len as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append_data(
        &mut h,
        "zeros",
        std::io::Read::take(std::io::repeat(0), data_len as u64),
    )
    .unwrap();
    b.finish().unwrap();
    drop(b);
    e.flush().unwrap();
    e.finish().unwrap()
}

fn layer_cases(outside: &Path) -> Vec<LayerCase> {
    let o = outside.display().to_string();
    let plain = |entries: Vec<Ent>| oci::plain(&[entries]);
    vec![
        LayerCase {
            what: "traversal",
            image: plain(vec![oci::file("../../x", b"x")]),
            error: Some("leaves the root"),
        },
        LayerCase {
            what: "absolute path",
            image: plain(vec![oci::file(&format!("{o}/file"), b"x")]),
            error: Some("absolute path"),
        },
        LayerCase {
            what: "write through a symlink",
            image: plain(vec![oci::symlink("l", &o), oci::file("l/file", b"x")]),
            error: None,
        },
        LayerCase {
            what: "hardlink out of the root",
            image: plain(vec![oci::hardlink("h", &format!("{o}/file"))]),
            error: Some("absolute path"),
        },
        LayerCase {
            what: "hardlink through a symlink",
            image: plain(vec![oci::symlink("l", &o), oci::hardlink("h", "l/file")]),
            error: Some("hardlink target directory"),
        },
        LayerCase {
            what: "hardlink to itself",
            image: plain(vec![oci::hardlink("h", "h")]),
            error: Some("points at itself"),
        },
        LayerCase {
            what: "whiteout of ..",
            image: plain(vec![oci::file("d/.wh...", b"")]),
            error: Some("not a valid whiteout"),
        },
        LayerCase {
            what: "duplicate entries",
            image: plain(vec![
                oci::file("x", b"1"),
                oci::dir("x"),
                oci::file("x", b"3"),
            ]),
            error: None,
        },
        LayerCase {
            what: "a layer cut inside a file",
            image: {
                let mut l = oci::layer(&[oci::file("big", &common::blob(1, 64 * KIB))]);
                l.truncate(30 * KIB);
                oci::build(vec![(OCI_LAYER, l.clone())], &[oci::sha(&l)])
            },
            error: Some("cut short"),
        },
        LayerCase {
            what: "a gzip bomb that lies about its diff_id",
            image: oci::build(
                vec![(oci::OCI_LAYER_GZIP, gzip_of(48 * MIB))],
                &[oci::sha(b"not what it decompresses to")],
            ),
            error: Some("diff_id"),
        },
        LayerCase {
            what: "a zstd frame that wants a 2 GiB window",
            image: {
                // A frame header asking for a 2^31-byte window, then one raw block.
                let z = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa8, 0x09, 0x00, 0x00, 0x41];
                oci::build(vec![(oci::OCI_LAYER_ZSTD, z)], &[oci::sha(b"x")])
            },
            error: Some("decompress"),
        },
        LayerCase {
            what: "an id past 32 bits",
            image: plain(vec![oci::file("f", b"x").owner(1 << 33, 0)]),
            error: Some("larger than a Linux id"),
        },
        LayerCase {
            what: "thousands of entries",
            image: plain(
                (0..5_000)
                    .map(|i| oci::file(&format!("d{}/f{i}", i % 50), b"x"))
                    .collect(),
            ),
            error: None,
        },
    ]
}

#[test]
fn hostile_layers_are_refused_or_contained() {
    let sb = sandbox();
    let root = sb.work.join("../store");
    let outside_before = tree(&sb.outside);
    for (i, c) in layer_cases(&sb.outside).into_iter().enumerate() {
        let name = format!("hostile/layer:{i}");
        let before = {
            let store = common::open(&root);
            c.image.store(&store, &name);
            state(&store)
        };
        let target = sb.work.join(format!("t{i}"));
        let (out, peak) = common::run_peak_rss(common::store_cmd(&root).args([
            "--quiet",
            "unpack",
            &name,
            target.to_str().unwrap(),
        ]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match c.error {
            Some(want) => {
                assert_eq!(out.status.code(), Some(1), "{}: {stderr}", c.what);
                assert!(
                    stderr.contains(want),
                    "{}: the error names the problem ({want}): {stderr}",
                    c.what
                );
                assert!(
                    !target.exists(),
                    "{}: a failed unpack leaves no target",
                    c.what
                );
            }
            None => assert!(out.status.success(), "{}: {stderr}", c.what),
        }
        assert!(peak < 200 * 1024, "{}: peak RSS {peak} KiB", c.what);
        let names: Vec<String> = std::fs::read_dir(&sb.work)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "{}: leftovers {names:?}", c.what);
        assert_eq!(
            tree(&sb.outside),
            outside_before,
            "{}: outside changed",
            c.what
        );
        assert_eq!(
            state(&common::open(&root)),
            before,
            "{}: the store changed",
            c.what
        );
    }
}
