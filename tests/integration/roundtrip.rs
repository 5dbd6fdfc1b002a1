//! Round trips: many blobs of mixed sizes in, the same bytes out, digests that agree with
//! the system `sha256sum`, and the on-disk layout the index points at.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerstore::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN};
use layerstore::{Algorithm, Descriptor, Digest, Error, Location, Options, PutOptions, Store};

use crate::common::{self, DEFAULT_LARGE, KIB, MIB};

/// Writes `blobs` (index, bytes) to files under `dir`, runs one `sha256sum` over all of
/// them, and asserts each reported hash equals the digest the store returned.
fn check_with_sha256sum(dir: &Path, blobs: &[(usize, &[u8], Digest)]) {
    let mut paths = Vec::with_capacity(blobs.len());
    let mut want: HashMap<PathBuf, Digest> = HashMap::new();
    for (i, data, d) in blobs {
        let p = dir.join(format!("blob-{i:05}"));
        std::fs::write(&p, data).expect("write sample file");
        want.insert(p.clone(), *d);
        paths.push(p);
    }
    let out = Command::new("sha256sum")
        .args(&paths)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut seen = 0;
    for line in text.lines() {
        let (hex, path) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("unexpected sha256sum line {line:?}"));
        let d = want
            .get(Path::new(path))
            .unwrap_or_else(|| panic!("sha256sum reported an unknown path {path}"));
        assert_eq!(
            format!("sha256:{hex}"),
            d.to_string(),
            "sha256sum disagrees with the store for {path}"
        );
        seen += 1;
    }
    assert_eq!(seen, blobs.len(), "sha256sum must report every file");
}

/// Reads the pack record behind a packed blob straight from the segment file and checks
/// its header and payload.
fn check_packed_record(root: &Path, d: &Digest, data: &[u8], segment: u64, offset: u64) {
    let name = format!("pack-{segment:016x}.pack");
    let path = common::pack_files(root)
        .into_keys()
        .find(|p| p.file_name().is_some_and(|n| n == name.as_str()))
        .unwrap_or_else(|| panic!("no file {name} for {d}"));
    let f = std::fs::File::open(&path).expect("open segment");
    assert!(offset >= SEGMENT_HEADER_LEN + RECORD_HEADER_LEN);
    let mut rec = vec![0u8; RECORD_HEADER_LEN as usize + data.len()];
    f.read_exact_at(&mut rec, offset - RECORD_HEADER_LEN)
        .expect("read record");
    let h = RecordHeader::decode(&rec[..RECORD_HEADER_LEN as usize]).expect("record header");
    assert_eq!(h.digest, *d);
    assert_eq!(h.stored_len, data.len() as u64);
    assert_eq!(h.raw_len, data.len() as u64);
    assert_eq!(h.blake3, *blake3::hash(data).as_bytes());
    assert!(&rec[RECORD_HEADER_LEN as usize..] == data, "payload of {d}");
}

/// Checks the large-blob file behind a blob: `ROOT/large/<first hash byte>/sha256-<hex>.<gen>`,
/// a 128-byte record header and then the payload.
fn check_large_file(root: &Path, d: &Digest, data: &[u8], generation: u64) {
    let path = root
        .join("large")
        .join(format!("{:02x}", d.hash()[0]))
        .join(format!("sha256-{}.{generation}", d.hex()));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(bytes.len(), RECORD_HEADER_LEN as usize + data.len());
    let h = RecordHeader::decode(&bytes[..RECORD_HEADER_LEN as usize]).expect("record header");
    assert_eq!(h.digest, *d);
    assert_eq!(h.stored_len, data.len() as u64);
    assert!(
        &bytes[RECORD_HEADER_LEN as usize..] == data,
        "payload of {d}"
    );
}

/// Checks `put`'s descriptors against an independent sha256.
fn check_descriptors(descs: &[Descriptor], blobs: &[&[u8]]) {
    assert_eq!(descs.len(), blobs.len(), "one descriptor per input");
    for (desc, data) in descs.iter().zip(blobs) {
        assert_eq!(desc.digest, common::sha256(data), "digest in input order");
        assert_eq!(desc.size, data.len() as u64);
    }
}

/// Gets every blob back and compares it, its stat and its location with what was put.
fn check_reads(store: &Store, blobs: &[Vec<u8>], digests: &[Digest], large: usize) {
    for (data, d) in blobs.iter().zip(digests) {
        let got = store
            .get(d)
            .unwrap_or_else(|e| panic!("get {d} ({} bytes): {e:?}", data.len()));
        assert_eq!(got.len(), data.len(), "length of {d}");
        assert!(&*got == data.as_slice(), "bytes of {d} differ");
        let info = store.stat(d).expect("stat").expect("stat finds the blob");
        assert_eq!(info.size, data.len() as u64);
        match info.location {
            Location::Large { .. } => {
                assert!(data.len() >= large, "{} bytes stored large", data.len());
                assert!(got.is_mapped(), "large blobs are read from a mapping");
            }
            Location::Packed { .. } => {
                assert!(data.len() < large, "{} bytes stored packed", data.len());
            }
        }
    }
}

#[test]
fn round_trip_10k_mixed_sizes() {
    const N: usize = 10_000;
    const LARGE: usize = 64 * KIB;
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open_with(&root, Options::default().large_threshold(LARGE as u64));

    let mut rng = common::rng(0x5eed_0001);
    let edges = [0, 1, 2, LARGE - 1, LARGE, LARGE + 1];
    let mut sizes: Vec<usize> = edges.to_vec();
    while sizes.len() < 9_000 {
        sizes.push(common::mixed_size(&mut rng, LARGE));
    }
    // The single-put part starts with the edge sizes again (other bytes, except for 0).
    sizes.extend_from_slice(&edges);
    while sizes.len() < N {
        sizes.push(common::mixed_size(&mut rng, LARGE));
    }
    let blobs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| common::blob(i as u64, n))
        .collect();

    let mut digests: Vec<Digest> = Vec::with_capacity(N);
    // put_many in batches of varying size, then single puts.
    let mut at = 0;
    let mut batch = 1;
    while at < 9_000 {
        let end = (at + batch).min(9_000);
        let descs = store
            .put_many(blobs[at..end].iter())
            .expect("put_many batch");
        let want: Vec<&[u8]> = blobs[at..end].iter().map(Vec::as_slice).collect();
        check_descriptors(&descs, &want);
        digests.extend(descs.iter().map(|d| d.digest));
        at = end;
        batch = (batch * 3 + 7) % 700 + 1;
    }
    for data in &blobs[9_000..] {
        let desc = store.put(data).expect("put");
        check_descriptors(&[desc], &[data]);
        digests.push(desc.digest);
    }

    check_reads(&store, &blobs, &digests, LARGE);
    // The listing pages through the index (more than one page of 4096).
    let listed: BTreeMap<Digest, u64> = store
        .iter()
        .map(|r| {
            let i = r.expect("iterate");
            (i.digest, i.size)
        })
        .collect();
    let want: BTreeMap<Digest, u64> = digests
        .iter()
        .zip(&blobs)
        .map(|(d, b)| (*d, b.len() as u64))
        .collect();
    assert_eq!(listed.len(), want.len());
    assert_eq!(listed, want, "iter() lists every distinct blob once");
    assert_eq!(store.iter().count(), want.len(), "no entry listed twice");

    // Ranges and readers on a sample.
    for i in (0..N).step_by(97) {
        let (data, d) = (&blobs[i], &digests[i]);
        let n = data.len() as u64;
        let (off, len) = (n / 3, n / 2);
        let r = store.read_range(d, off, len).expect("read_range");
        let end = (off + len).min(n) as usize;
        assert!(*r == data[off as usize..end], "range of {d}");
        let past = store.read_range(d, n + 5, 10).unwrap_err();
        assert!(
            matches!(past, Error::OutOfRange { offset, size, .. } if offset == n + 5 && size == n),
            "a range past the end: {past:?}"
        );
        assert_eq!(past.kind(), layerstore::ErrorKind::OutOfRange);
        assert!(store.read_range(d, n, 10).expect("at the end").is_empty());
        let mut rd = store.reader(d).expect("reader");
        rd.seek(SeekFrom::Start(n / 2)).expect("seek");
        let mut tail = Vec::new();
        rd.read_to_end(&mut tail).expect("read");
        assert!(tail == data[(n / 2) as usize..], "reader tail of {d}");
    }

    // Counters and the bytes on disk.
    let mut distinct: BTreeMap<Digest, usize> = BTreeMap::new();
    for (d, data) in digests.iter().zip(&blobs) {
        distinct.insert(*d, data.len());
    }
    let info = store.info().expect("info");
    assert_eq!(info.blobs, distinct.len() as u64);
    assert_eq!(
        info.bytes,
        distinct.values().map(|&n| n as u64).sum::<u64>()
    );
    let large: Vec<u64> = distinct
        .values()
        .filter(|&&n| n >= LARGE)
        .map(|&n| n as u64)
        .collect();
    assert_eq!(info.large_blobs, large.len() as u64);
    assert_eq!(info.large_bytes, large.iter().sum::<u64>());
    assert_eq!(info.dead_bytes, 0, "sequential puts leave no dead records");
    let small_records: u64 = distinct
        .values()
        .filter(|&&n| n < LARGE)
        .map(|&n| RECORD_HEADER_LEN + n as u64)
        .sum();
    let packs = common::pack_files(&root);
    let pack_payload: u64 = packs.values().map(|&n| n - SEGMENT_HEADER_LEN).sum();
    assert_eq!(
        pack_payload, small_records,
        "pack files hold exactly one record per distinct small blob"
    );
    assert_eq!(
        info.live_bytes,
        small_records + info.large_bytes + info.large_blobs * RECORD_HEADER_LEN,
        "live bytes count every record, header included"
    );
    assert_eq!(info.segments, packs.len() as u64);
    let large_files = common::large_files(&root);
    assert_eq!(
        large_files.len() as u64,
        info.large_blobs,
        "one file per large blob"
    );
    assert_eq!(
        large_files.values().sum::<u64>(),
        large.iter().map(|n| n + RECORD_HEADER_LEN).sum::<u64>()
    );
    common::assert_ingest_clean(&root);

    // The system sha256sum agrees on a sample that includes every edge size.
    let mut sample: Vec<(usize, &[u8], Digest)> = Vec::new();
    for i in 0..N {
        let edge = i < edges.len() || (9_000..9_000 + edges.len()).contains(&i);
        if edge || i % 25 == 0 {
            sample.push((i, &blobs[i], digests[i]));
        }
    }
    assert!(sample.len() >= 400);
    let sample_dir = dir.path().join("sample");
    std::fs::create_dir(&sample_dir).expect("mkdir");
    check_with_sha256sum(&sample_dir, &sample);
}

#[test]
fn round_trip_default_threshold_edges_and_64mib() {
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let store = common::open(&root);

    let sizes = [
        0,
        1,
        DEFAULT_LARGE - 1,
        DEFAULT_LARGE,
        DEFAULT_LARGE + 1,
        64 * MIB,
    ];
    let mut blobs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| common::blob(1_000 + i as u64, n))
        .collect();
    let mut rng = common::rng(7);
    for i in 0..24 {
        blobs.push(common::blob(
            2_000 + i,
            common::mixed_size(&mut rng, 64 * KIB),
        ));
    }

    let mut digests = Vec::new();
    // Below and at the threshold in one batch; above it and 64 MiB singly; the rest batched.
    let descs = store.put_many(&blobs[0..4]).expect("put_many edges");
    let want: Vec<&[u8]> = blobs[0..4].iter().map(Vec::as_slice).collect();
    check_descriptors(&descs, &want);
    digests.extend(descs.iter().map(|d| d.digest));
    for data in &blobs[4..6] {
        let d = store.put(data).expect("put");
        check_descriptors(&[d], &[data]);
        digests.push(d.digest);
    }
    let descs = store.put_many(&blobs[6..]).expect("put_many rest");
    let want: Vec<&[u8]> = blobs[6..].iter().map(Vec::as_slice).collect();
    check_descriptors(&descs, &want);
    digests.extend(descs.iter().map(|d| d.digest));

    check_reads(&store, &blobs, &digests, DEFAULT_LARGE);
    let info = store.info().expect("info");
    assert_eq!(info.large_blobs, 3, "4 MiB, 4 MiB + 1 and 64 MiB are large");
    assert_eq!(
        info.large_bytes,
        (DEFAULT_LARGE + DEFAULT_LARGE + 1 + 64 * MIB) as u64
    );

    // The index points at the right bytes on disk, in the documented layout.
    for (data, d) in blobs.iter().zip(&digests) {
        match store.stat(d).expect("stat").expect("present").location {
            Location::Packed { segment, offset } => {
                check_packed_record(&root, d, data, segment, offset);
            }
            Location::Large { generation } => check_large_file(&root, d, data, generation),
        }
    }

    let sample: Vec<(usize, &[u8], Digest)> = blobs
        .iter()
        .zip(&digests)
        .enumerate()
        .map(|(i, (b, d))| (i, b.as_slice(), *d))
        .collect();
    let sample_dir = dir.path().join("sample");
    std::fs::create_dir(&sample_dir).expect("mkdir");
    check_with_sha256sum(&sample_dir, &sample);

    // The big ones again after a reopen.
    drop(store);
    let store = common::open(&root);
    check_reads(&store, &blobs, &digests, DEFAULT_LARGE);
}

#[test]
fn sha512_and_blake3_digests_round_trip() {
    use sha2::Digest as _;
    let dir = common::tempdir();
    let root = dir.path().join("store");
    let large = 64 * KIB;
    let store = common::open_with(&root, Options::default().large_threshold(large as u64));

    let mut expected = Vec::new();
    for (i, len) in [0usize, 10, 5 * KIB, large, 3 * large]
        .into_iter()
        .enumerate()
    {
        let data = common::blob(3_000 + i as u64, len);
        let sha512 = Digest::from_raw(Algorithm::Sha512, &sha2::Sha512::digest(&data))
            .expect("64-byte hash");
        let b3 = Digest::from_raw(Algorithm::Blake3, blake3::hash(&data).as_bytes())
            .expect("32-byte hash");
        for d in [sha512, b3] {
            // The expected digest picks the algorithm; a wrong one of that algorithm fails.
            let wrong = Digest::from_raw(d.algorithm(), &vec![0xab; d.algorithm().hash_len()])
                .expect("hash");
            match store.put_with(&data, PutOptions::default().expect(wrong)) {
                Err(layerstore::Error::DigestMismatch { expected, actual }) => {
                    assert_eq!((expected, actual), (wrong, d));
                }
                other => panic!("wrong {} digest: {other:?}", d.algorithm()),
            }
            let desc = store
                .put_with(&data, PutOptions::default().expect(d))
                .expect("put_with");
            assert_eq!(desc.digest, d);
            assert_eq!(desc.size, len as u64);
            expected.push((d, data.clone()));
        }
        // Through an ingest as well (dedupes against the put above).
        let mut ing = store
            .ingest(&format!("alg-{i}"), PutOptions::default().expect(sha512))
            .expect("ingest");
        ing.write_all(&data).expect("write");
        assert_eq!(ing.commit().expect("commit").digest, sha512);
        // The sha256 of the same bytes is a different key, not stored.
        assert!(!store.contains(&common::sha256(&data)).expect("contains"));
    }
    let check = |store: &Store| {
        for (d, data) in &expected {
            let got = store.get(d).unwrap_or_else(|e| panic!("get {d}: {e:?}"));
            assert!(&*got == data.as_slice(), "bytes of {d}");
            let info = store.stat(d).expect("stat").expect("present");
            if let Location::Large { generation } = info.location {
                let path = root
                    .join("large")
                    .join(format!("{:02x}", d.hash()[0]))
                    .join(format!("{}-{}.{generation}", d.algorithm(), d.hex()));
                assert!(path.exists(), "{}", path.display());
            }
        }
        let listed: Vec<Digest> = store.iter().map(|r| r.expect("iterate").digest).collect();
        assert_eq!(listed.len(), expected.len());
        for (d, _) in &expected {
            assert!(listed.contains(d), "{d} listed");
        }
    };
    check(&store);
    drop(store);
    let store = common::open(&root);
    check(&store);

    // The CLI reads them by their own names.
    drop(store);
    let (d, data) = &expected[3];
    let out = common::cli(&root, &["blob", "get", &d.to_string()]);
    assert!(out.status.success() && out.stdout == *data, "{out:?}");
}
