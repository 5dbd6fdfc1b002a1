//! `repair --rebuild-index`: a new index from the self-describing pack records and large
//! files, for when `meta.redb` is lost, damaged, or older than the data.
//!
//! This module owns recovery from blob bytes alone. Every record is checked (header
//! checksum, and the payload's blake3) before its blob is trusted; a segment is scanned to
//! its end, stepping over damage to the next record that can be trusted, and every stretch
//! stepped over is reported. Manifests and indexes (by kind byte, or JSON that parses as
//! one) get their edges and reference counts back. The new index is built beside the old
//! one and put in its place in one rename only when complete, so a repair killed at any
//! point loses nothing and can simply be run again. Names, containers and leases live only
//! in the index and cannot be recovered: every recovered blob is put under the
//! non-expiring lease `recovered`, and the collector refuses to run while it exists, so
//! nothing recovered is collected before an operator has re-created names (by `store tag`
//! or a re-import) and released the lease. It never removes or changes a blob file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::local::LocalBackend;
use crate::backend::{Backend, Control, Key, List, LockMode, MetaFile};
use crate::blobs::Files;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{Kind, RECORD_HEADER_LEN, RecordHeader};
use crate::gc::RECOVERED_LEASE;
use crate::meta::{
    BlobEntry, LeaseRecord, Location, Meta, NewBlob, Op, PutOp, SegmentUpdate, Status,
};
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
    /// Records, stretches or files skipped as damaged, with why.
    pub skipped: Vec<String>,
    /// Where the previous index was kept, if there was one.
    pub old_index: Option<std::path::PathBuf>,
}

/// A large file that passed its checks (digest, generation, header), or why it did not.
type Checked = std::result::Result<(Digest, u64, RecordHeader), String>;

/// One recovered blob.
struct Found {
    entry: BlobEntry,
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

/// blake3 of `len` bytes of `h` from `at`, read in chunks.
fn blake3_of(h: &dyn crate::backend::Handle, at: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        h.read_at(&mut buf[..n], at + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Rebuilds the index of the store at `root` from its blob files (the store must not be
/// open anywhere). The old `meta.redb`, if any, is kept as `meta.redb.damaged-<ms>`.
pub fn rebuild_index(root: &Path) -> Result<RebuildReport> {
    rebuild_index_with(Arc::new(LocalBackend::new(root)))
}

/// [`rebuild_index`] for the store whose files `backend` holds.
pub fn rebuild_index_with(backend: Arc<dyn Backend>) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    let root = backend
        .local_root()
        .map_or_else(|| backend.describe().into(), Path::to_owned);
    let io = |op: &'static str| {
        let root = root.clone();
        move |e| Error::io(op, root.clone(), e)
    };
    backend.check()?;
    let lock = backend
        .lock(LockMode::Exclusive)
        .map_err(io("lock"))?
        .ok_or_else(|| Error::Locked { path: root.clone() })?;
    let files = Files::new(backend.clone(), false, Options::default().segment_size, 0);

    // Read everything before the new index is written.
    let mut found: HashMap<Digest, Found> = HashMap::new();
    let mut segments: Vec<SegmentUpdate> = Vec::new();
    let mut shard_count = 0u32;
    for shard in backend.list(&List::Shards).map_err(io("list"))? {
        let Ok(shard) = shard.name.parse::<u32>() else {
            continue;
        };
        shard_count = shard_count.max(shard + 1);
        for l in backend.list(&List::Segments(shard)).map_err(io("list"))? {
            let Some(Key::Segment { id, .. }) = l.key else {
                continue;
            };
            let len = l.len.unwrap_or(0);
            let shown = backend.display(&Key::Segment { shard, id });
            let scan = files.scan_segment(shard, id, len, &mut |h, at, rec| {
                let got = blake3_of(h, at + RECORD_HEADER_LEN, rec.stored_len)?;
                Ok(if got == rec.blake3 {
                    Ok(())
                } else {
                    Err("the payload does not match its blake3".to_owned())
                })
            });
            let scan = match scan {
                Ok(s) => s,
                // An I/O error says nothing about the bytes: stop, change nothing.
                Err(e @ Error::Io { .. }) => return Err(e),
                Err(e) => {
                    report.skipped.push(format!("{}: {e}", shown.display()));
                    continue;
                }
            };
            report.segments += 1;
            for d in &scan.damaged {
                report.skipped.push(format!(
                    "{} bytes {}..{}: {}",
                    shown.display(),
                    d.start,
                    d.end,
                    d.reason
                ));
            }
            let end = scan
                .records
                .last()
                .map_or(crate::format::SEGMENT_HEADER_LEN, |(at, h)| {
                    at + RECORD_HEADER_LEN + h.stored_len
                });
            segments.push(SegmentUpdate {
                id,
                shard,
                committed_len: end,
                // Recovered segments take no appends: new ones are started.
                sealed: true,
            });
            for (at, h) in scan.records {
                let location = Location::Packed {
                    segment: id,
                    offset: at + RECORD_HEADER_LEN,
                };
                found.entry(h.digest).or_insert(Found {
                    entry: entry_of(&h, location),
                });
            }
        }
    }
    // Large files: each header and payload checked (in parallel: they are the bulk).
    let large: Vec<crate::backend::Listed> = backend.list(&List::Large).map_err(io("list"))?;
    let checked: Vec<Result<Checked>> = large
        .par_iter()
        .map(|l| {
            let Some(key @ Key::Large { digest, generation }) = &l.key else {
                return Ok(Err(format!("{}: not a large-blob file name", l.name)));
            };
            let shown = backend.display(key);
            let h = backend
                .open(key, false)
                .map_err(|e| files.io("open", key, e))?;
            let len = h.len().map_err(|e| files.io("stat", key, e))?;
            let mut rec = [0u8; RECORD_HEADER_LEN as usize];
            if len < RECORD_HEADER_LEN {
                return Ok(Err(format!(
                    "{}: {len} bytes, shorter than a header",
                    shown.display()
                )));
            }
            h.read_at(&mut rec, 0)
                .map_err(|e| files.io("read", key, e))?;
            let hdr = match RecordHeader::decode(&rec) {
                Ok(hdr) if hdr.digest == *digest => hdr,
                Ok(hdr) => {
                    return Ok(Err(format!(
                        "{}: its header is for {}, not the blob its name says",
                        shown.display(),
                        hdr.digest
                    )));
                }
                Err(e) => return Ok(Err(format!("{}: record header: {e}", shown.display()))),
            };
            if RECORD_HEADER_LEN.checked_add(hdr.stored_len) != Some(len) {
                return Ok(Err(format!(
                    "{}: {len} bytes, but its header says {}",
                    shown.display(),
                    RECORD_HEADER_LEN.saturating_add(hdr.stored_len)
                )));
            }
            let got = blake3_of(&*h, RECORD_HEADER_LEN, hdr.stored_len)
                .map_err(|e| files.io("read", key, e))?;
            if got != hdr.blake3 {
                return Ok(Err(format!(
                    "{}: the payload does not match its blake3",
                    shown.display()
                )));
            }
            Ok(Ok((*digest, *generation, hdr)))
        })
        .collect();
    for c in checked {
        match c? {
            Err(why) => report.skipped.push(why),
            Ok((d, generation, h)) => {
                report.large_files += 1;
                let keep = match found.get(&d) {
                    Some(Found {
                        entry:
                            BlobEntry {
                                location: Location::Large { generation: g },
                                ..
                            },
                    }) => generation > *g,
                    Some(_) => false,
                    None => true,
                };
                if keep {
                    found.insert(
                        d,
                        Found {
                            entry: entry_of(&h, Location::Large { generation }),
                        },
                    );
                }
            }
        }
    }

    // The commit numbers go on from whatever the root has seen.
    let witness = backend
        .read_control(Control::Witness)
        .map_err(io("read"))?
        .and_then(|b| crate::meta::decode_witness(&b))
        .unwrap_or(0);
    let old_seq = Meta::open(&backend, MetaFile::Main, 16 << 20, false)
        .ok()
        .flatten()
        .and_then(|m| match m.status() {
            Ok(Status::Ready { seq, .. }) => Some(seq),
            _ => None,
        })
        .unwrap_or(0);

    // The new index, beside the old one.
    backend
        .remove_meta(MetaFile::Rebuild)
        .map_err(io("remove"))?;
    {
        let meta = Meta::open(
            &backend,
            MetaFile::Rebuild,
            Options::default().meta_cache,
            true,
        )?
        .ok_or_else(|| Error::NoStore { path: root.clone() })?;
        meta.init(shard_count.max(1), witness.max(old_seq))?;
        meta.submit(Op::LeaseCreate(LeaseRecord {
            id: RECOVERED_LEASE.to_owned(),
            created_ms: crate::sys::now_ms(),
            expires_ms: None,
        }))?;
        // Manifests and indexes get their edges back from their own bytes.
        for u in &segments {
            files.add_view(u.id, u.shard, Some(u.committed_len));
        }
        let mut blobs = Vec::with_capacity(found.len());
        let mut found: Vec<(Digest, Found)> = found.into_iter().collect();
        found.sort_by_key(|(d, _)| *d);
        for (d, f) in found {
            let mut nb = NewBlob {
                digest: d,
                entry: f.entry,
                record_len: 0,
                children: Vec::new(),
                subject: None,
            };
            // A manifest's kind byte says so; one first stored plainly says `other`, and
            // its JSON is asked.
            let maybe_image = match f.entry.kind {
                Kind::Manifest | Kind::Index => true,
                Kind::Other => f.entry.stored_len <= crate::image::MAX_JSON,
                _ => false,
            };
            if maybe_image {
                let bytes = match f.entry.location {
                    Location::Packed { segment, offset } => {
                        files.read_packed(segment, offset, f.entry.stored_len)
                    }
                    Location::Large { generation } => {
                        files.read_large(&d, generation, f.entry.stored_len, false)
                    }
                };
                let bytes = bytes?;
                let sniffed = f.entry.kind != Kind::Other || crate::image::sniff(&bytes).is_some();
                match crate::image::parse(&bytes) {
                    Ok(p) if sniffed => {
                        report.manifests += 1;
                        let mut seen = std::collections::HashSet::new();
                        nb.entry.kind = p.kind;
                        nb.children = p
                            .children
                            .iter()
                            .filter(|c| seen.insert(c.digest))
                            .map(|c| (c.digest, c.kind))
                            .collect();
                        report.edges += nb.children.len() as u64;
                        nb.subject = p.subject;
                    }
                    Err(e) if f.entry.kind != Kind::Other => {
                        report
                            .skipped
                            .push(format!("{d}: its kind says manifest, but {e}"));
                        nb.entry.kind = Kind::Other;
                    }
                    Ok(_) | Err(_) => {}
                }
            }
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
    // Complete: in place of the old index, in one step.
    report.old_index = backend
        .install_rebuilt_meta()
        .map_err(io("install"))?
        .map(|name| root.join(name));
    {
        let meta = Meta::open(&backend, MetaFile::Main, 16 << 20, false)?
            .ok_or_else(|| Error::NoStore { path: root.clone() })?;
        if let Status::Ready { seq, .. } = meta.status()? {
            backend
                .write_control(Control::Witness, &crate::meta::encode_witness(seq))
                .map_err(io("write"))?;
        }
    }
    drop(lock);
    // A normal open now checks and settles the rebuilt store.
    drop(Store::open_with(backend, Options::default().create(false))?);
    Ok(report)
}
