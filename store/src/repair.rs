//! `repair --rebuild-index`: a new index from the self-describing pack records and large
//! files, for when `meta.redb` is lost or damaged.
//!
//! This module owns recovery from blob bytes alone. Every record header is checked
//! (checksum, and the payload's blake3) before its blob is trusted; a segment is read up
//! to its first bad record (what follows is an uncommitted or torn tail). Manifests and
//! indexes (the kind byte says which) are parsed so their edges and reference counts come
//! back. Names, containers and leases live only in the index and cannot be recovered:
//! every recovered blob is put under the non-expiring lease `recovered`, and the collector
//! refuses to run while it exists, so nothing recovered is collected before an operator
//! has re-created names (by `store tag` or a re-import) and released the lease.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::gc::RECOVERED_LEASE;
use crate::meta::{BlobEntry, LeaseRecord, Location, Meta, NewBlob, Op, PutOp, SegmentUpdate};
use crate::store::{Options, Store};

/// What a rebuild recovered.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    /// Blobs recovered.
    pub blobs: u64,
    /// Of which manifests and indexes.
    pub manifests: u64,
    /// Edges recovered.
    pub edges: u64,
    /// Segments read.
    pub segments: u64,
    /// Large files read.
    pub large_files: u64,
    /// Records or files skipped as damaged, with why.
    pub skipped: Vec<String>,
    /// Where the previous index was moved, if there was one.
    pub old_index: Option<PathBuf>,
}

/// One recovered blob and where its bytes are.
struct Found {
    entry: BlobEntry,
    shard: Option<u32>,
}

/// A scanned segment: its header, the end of its last good record, and its blobs.
type Scanned = (SegmentHeader, u64, Vec<(Digest, Found)>);

fn scan_segment(path: &Path, report: &mut RebuildReport) -> Result<Scanned> {
    let f = std::fs::File::open(path).ctx("open", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
    f.read_exact_at(&mut hdr, 0).ctx("read", path)?;
    let seg = SegmentHeader::decode(&hdr).map_err(|e| Error::bad_header(path.display(), &e))?;
    let mut at = SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    let mut rec = [0u8; RECORD_HEADER_LEN as usize];
    while at + RECORD_HEADER_LEN <= len {
        if f.read_exact_at(&mut rec, at).is_err() {
            break;
        }
        let Ok(h) = RecordHeader::decode(&rec) else {
            break; // the end of what was ever committed, or a torn write
        };
        let end = at + RECORD_HEADER_LEN + h.stored_len;
        if end > len {
            break;
        }
        let mut payload = vec![0u8; h.stored_len as usize];
        f.read_exact_at(&mut payload, at + RECORD_HEADER_LEN)
            .ctx("read", path)?;
        if *blake3::hash(&payload).as_bytes() == h.blake3 {
            out.push((
                h.digest,
                Found {
                    entry: entry_of(
                        &h,
                        Location::Packed {
                            segment: seg.id,
                            offset: at + RECORD_HEADER_LEN,
                        },
                    ),
                    shard: Some(seg.shard),
                },
            ));
        } else {
            report.skipped.push(format!(
                "{} at {at}: payload does not match its blake3",
                path.display()
            ));
        }
        at = end;
    }
    Ok((seg, at, out))
}

fn entry_of(h: &RecordHeader, location: Location) -> BlobEntry {
    BlobEntry {
        size: h.raw_len,
        stored_len: h.stored_len,
        kind: h.kind,
        flags: h.flags,
        location,
        blake3: h.blake3,
        touched_ms: 0,
    }
}

/// Rebuilds the index of the store at `root` from its blob files (the store must not be
/// open anywhere). The old `meta.redb`, if any, is kept as `meta.redb.damaged-<ms>`.
pub fn rebuild_index(root: &Path) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    let lock_path = root.join("lock");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .ctx("open", &lock_path)?;
    if !crate::sys::try_lock(&lock, &lock_path)? {
        return Err(Error::Locked {
            path: root.to_owned(),
        });
    }
    // Read everything before touching the old index.
    let mut found: HashMap<Digest, Found> = HashMap::new();
    let mut segments: Vec<SegmentUpdate> = Vec::new();
    let packs = root.join("packs");
    let mut shard_count = 0u32;
    if packs.is_dir() {
        for shard_dir in std::fs::read_dir(&packs).ctx("list", &packs)? {
            let shard_dir = shard_dir.ctx("list", &packs)?.path();
            if let Some(n) = shard_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
            {
                shard_count = shard_count.max(n + 1);
            }
            for f in std::fs::read_dir(&shard_dir).ctx("list", &shard_dir)? {
                let p = f.ctx("list", &shard_dir)?.path();
                if p.extension().and_then(|e| e.to_str()) != Some("pack") {
                    continue;
                }
                match scan_segment(&p, &mut report) {
                    Ok((seg, end, blobs)) => {
                        report.segments += 1;
                        segments.push(SegmentUpdate {
                            id: seg.id,
                            shard: seg.shard,
                            committed_len: end,
                            // Recovered segments take no appends: new ones are started.
                            sealed: true,
                        });
                        for (d, f) in blobs {
                            found.entry(d).or_insert(f);
                        }
                    }
                    Err(e) => report.skipped.push(format!("{}: {e}", p.display())),
                }
            }
        }
    }
    let large = root.join("large");
    if large.is_dir() {
        for dir in std::fs::read_dir(&large).ctx("list", &large)? {
            let dir = dir.ctx("list", &large)?.path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).ctx("list", &dir)? {
                let p = f.ctx("list", &dir)?.path();
                let Some(generation) = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .and_then(|g| g.parse::<u64>().ok())
                else {
                    continue;
                };
                let file = std::fs::File::open(&p).ctx("open", &p)?;
                let mut rec = [0u8; RECORD_HEADER_LEN as usize];
                let header = file
                    .read_exact_at(&mut rec, 0)
                    .ok()
                    .and_then(|()| RecordHeader::decode(&rec).ok());
                let Some(h) = header else {
                    report
                        .skipped
                        .push(format!("{}: bad record header", p.display()));
                    continue;
                };
                let len = file.metadata().ctx("stat", &p)?.len();
                if len != RECORD_HEADER_LEN + h.stored_len {
                    report
                        .skipped
                        .push(format!("{}: {len} bytes, header says more", p.display()));
                    continue;
                }
                report.large_files += 1;
                let keep = match found.get(&h.digest) {
                    Some(Found {
                        entry:
                            BlobEntry {
                                location: Location::Large { generation: g },
                                ..
                            },
                        ..
                    }) => generation > *g,
                    Some(_) => false,
                    None => true,
                };
                if keep {
                    found.insert(
                        h.digest,
                        Found {
                            entry: entry_of(&h, Location::Large { generation }),
                            shard: None,
                        },
                    );
                }
            }
        }
    }

    // Now the new index.
    let meta_path = root.join("meta.redb");
    if meta_path.exists() {
        let old = root.join(format!("meta.redb.damaged-{}", crate::sys::now_ms()));
        std::fs::rename(&meta_path, &old).ctx("rename", &meta_path)?;
        report.old_index = Some(old);
    }
    {
        let meta = Meta::open(&meta_path, root, crate::Options::default().meta_cache)?;
        meta.init(shard_count.max(1))?;
        meta.submit(Op::LeaseCreate(LeaseRecord {
            id: RECOVERED_LEASE.to_owned(),
            created_ms: crate::sys::now_ms(),
            expires_ms: None,
        }))?;
        // Manifests and indexes get their edges back from their own bytes.
        let files = crate::blobs::Files::new(root, Options::default().segment_size, 0);
        for u in &segments {
            files.add_view(u.id, u.shard, Some(u.committed_len));
        }
        let mut blobs = Vec::with_capacity(found.len());
        for (d, f) in found {
            let mut nb = NewBlob {
                digest: d,
                entry: f.entry,
                record_len: 0,
                children: Vec::new(),
                subject: None,
            };
            if matches!(f.entry.kind, Kind::Manifest | Kind::Index) {
                let bytes = match f.entry.location {
                    Location::Packed { segment, offset } => {
                        files.read_packed(segment, offset, f.entry.stored_len)
                    }
                    Location::Large { generation } => {
                        files.read_large(&d, generation, f.entry.stored_len)
                    }
                };
                match bytes.map(|b| crate::image::parse(&b)) {
                    Ok(Ok(p)) => {
                        report.manifests += 1;
                        let mut seen = std::collections::HashSet::new();
                        nb.children = p
                            .children
                            .iter()
                            .filter(|c| seen.insert(c.digest))
                            .map(|c| (c.digest, c.kind))
                            .collect();
                        report.edges += nb.children.len() as u64;
                        nb.subject = p.subject;
                    }
                    Ok(Err(e)) => {
                        report
                            .skipped
                            .push(format!("{d}: kind says manifest, but {e}"));
                        nb.entry.kind = Kind::Other;
                    }
                    Err(e) => report.skipped.push(format!("{d}: {e}")),
                }
            }
            let _ = f.shard;
            blobs.push(nb);
        }
        report.blobs = blobs.len() as u64;
        meta.submit(Op::Put(PutOp {
            blobs,
            segments,
            lease: Some(RECOVERED_LEASE.to_owned()),
            ..PutOp::default()
        }))?;
    }
    drop(lock);
    // A normal open now checks and settles the rebuilt store.
    drop(Store::open(root, Options::default().create(false))?);
    Ok(report)
}
