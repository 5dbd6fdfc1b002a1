//! The on-disk byte formats of blob storage: the segment header and the self-describing
//! record header that precedes every stored blob (in a pack segment or in a large file).
//!
//! This module owns encoding and decoding only; it does no I/O. Every integer is
//! little-endian with a fixed width (never `usize`), and every header carries a checksum,
//! so a record can be found and trusted by a scan without the index. `docs/FORMAT.md`
//! draws the same layouts; the two must change together.

use crate::digest::{Algorithm, Digest};

/// Magic bytes at offset 0 of every pack segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"LSTPACK\0";
/// Magic bytes at offset 0 of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"LSR\x01";
/// Current version of both headers.
pub const FORMAT_VERSION: u8 = 1;
/// Size of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Size of a record header; the payload starts right after it.
pub const RECORD_HEADER_LEN: u64 = 128;
/// Flag bit: the payload is zstd-compressed (reserved for compaction; never set by ingest).
pub const FLAG_ZSTD: u8 = 1;

/// The class of content a blob holds, from its media type. Recorded so that an index
/// rebuilt from records alone knows which blobs to parse for edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Kind {
    /// Anything else (or not yet known).
    Other = 0,
    /// An image index or manifest list.
    Index = 1,
    /// An image manifest.
    Manifest = 2,
    /// An image configuration.
    Config = 3,
    /// A layer.
    Layer = 4,
}

impl Kind {
    /// The kind for its on-disk byte; unknown bytes read as [`Kind::Other`].
    pub fn from_u8(b: u8) -> Kind {
        match b {
            1 => Kind::Index,
            2 => Kind::Manifest,
            3 => Kind::Config,
            4 => Kind::Layer,
            _ => Kind::Other,
        }
    }

    /// Lower-case name, as used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "other",
            Kind::Index => "index",
            Kind::Manifest => "manifest",
            Kind::Config => "config",
            Kind::Layer => "layer",
        }
    }
}

/// Why a header failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("header truncated: {0} bytes")]
    Truncated(usize),
    /// Magic bytes differ.
    #[error("bad magic")]
    BadMagic,
    /// A version this build does not know.
    #[error("unsupported format version {0}")]
    Version(u8),
    /// The header checksum does not match its bytes.
    #[error("header checksum mismatch")]
    Checksum,
    /// A field holds a value that no writer produces.
    #[error("invalid field: {0}")]
    Field(&'static str),
}

fn check8(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Header of a pack segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Shard the segment belongs to.
    pub shard: u32,
    /// Segment id (also in the file name).
    pub id: u64,
}

impl SegmentHeader {
    /// Encodes the 32-byte header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8] = FORMAT_VERSION;
        // 9..12 reserved, zero.
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        let c = check8(&b[..24]);
        b[24..32].copy_from_slice(&c);
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err(HeaderError::Truncated(b.len()));
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if b[24..32] != check8(&b[..24]) {
            return Err(HeaderError::Checksum);
        }
        if b[8] != FORMAT_VERSION {
            return Err(HeaderError::Version(b[8]));
        }
        let mut shard = [0u8; 4];
        shard.copy_from_slice(&b[12..16]);
        Ok(SegmentHeader {
            shard: u32::from_le_bytes(shard),
            id: u64_at(b, 16),
        })
    }
}

/// Header of one stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The blob's OCI digest (over the raw bytes).
    pub digest: Digest,
    /// Content class.
    pub kind: Kind,
    /// Flag bits ([`FLAG_ZSTD`]).
    pub flags: u8,
    /// Length of the payload as stored.
    pub stored_len: u64,
    /// Length of the blob itself (equal to `stored_len` unless compressed).
    pub raw_len: u64,
    /// blake3 of the stored payload.
    pub blake3: [u8; 32],
}

impl RecordHeader {
    /// Encodes the 128-byte header.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut b = [0u8; RECORD_HEADER_LEN as usize];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = FORMAT_VERSION;
        b[5] = self.digest.algorithm().id();
        b[6] = self.kind as u8;
        b[7] = self.flags;
        let h = self.digest.hash();
        b[8..8 + h.len()].copy_from_slice(h);
        b[72..80].copy_from_slice(&self.stored_len.to_le_bytes());
        b[80..88].copy_from_slice(&self.raw_len.to_le_bytes());
        b[88..120].copy_from_slice(&self.blake3);
        let c = check8(&b[..120]);
        b[120..128].copy_from_slice(&c);
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, HeaderError> {
        if b.len() < RECORD_HEADER_LEN as usize {
            return Err(HeaderError::Truncated(b.len()));
        }
        if b[0..4] != RECORD_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if b[120..128] != check8(&b[..120]) {
            return Err(HeaderError::Checksum);
        }
        if b[4] != FORMAT_VERSION {
            return Err(HeaderError::Version(b[4]));
        }
        let algorithm = Algorithm::from_id(b[5]).ok_or(HeaderError::Field("algorithm"))?;
        let n = algorithm.hash_len();
        if b[8 + n..72].iter().any(|&x| x != 0) {
            return Err(HeaderError::Field("digest padding"));
        }
        let digest =
            Digest::from_raw(algorithm, &b[8..8 + n]).ok_or(HeaderError::Field("digest"))?;
        let flags = b[7];
        if flags & !FLAG_ZSTD != 0 {
            return Err(HeaderError::Field("flags"));
        }
        let stored_len = u64_at(b, 72);
        let raw_len = u64_at(b, 80);
        if flags & FLAG_ZSTD == 0 && stored_len != raw_len {
            return Err(HeaderError::Field("lengths"));
        }
        let mut blake3 = [0u8; 32];
        blake3.copy_from_slice(&b[88..120]);
        Ok(RecordHeader {
            digest,
            kind: Kind::from_u8(b[6]),
            flags,
            stored_len,
            raw_len,
            blake3,
        })
    }
}

/// A stretch of a segment that holds no record a scan could trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// First byte of the stretch.
    pub start: u64,
    /// One past its last byte (where the next trusted record, or the end, begins).
    pub end: u64,
    /// What was wrong at `start`.
    pub reason: String,
}

/// What [`scan`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Every record whose header decodes, fits and passes `check`, with its offset.
    pub records: Vec<(u64, RecordHeader)>,
    /// Every stretch stepped over, in order.
    pub damaged: Vec<Damage>,
}

/// What a scan asks of each record that decodes and fits: `Ok(Err(why))` rejects it (it is
/// damage); an error ends the scan.
pub type Check<'a> = &'a mut dyn FnMut(u64, &RecordHeader) -> std::io::Result<Result<(), String>>;

/// Bytes read per step while looking for the next record after damage.
const RESYNC_WINDOW: usize = 64 << 10;

/// Walks the records of a segment from `start` to `end`, reading through `read` (which
/// fills as much of the buffer as the object holds from an offset and returns how much).
///
/// A record is trusted when its header decodes (magic, checksum, fields), it ends at or
/// before `end`, and `check` accepts it (repair checks the payload's blake3 there). At a
/// record that is not trusted the scan does not stop: it looks for the next offset where
/// one is, and reports the stretch in between, so one flipped bit costs one record, not
/// the rest of the segment. Errors from `read` or `check` (I/O) end the scan: they say
/// nothing about the bytes.
pub fn scan(
    start: u64,
    end: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<usize>,
    check: Check<'_>,
) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let mut at = start;
    let mut window = Vec::new();
    while at < end {
        let why = match trusted(at, end, read, check)? {
            Ok((h, e)) => {
                out.records.push((at, h));
                at = e;
                continue;
            }
            Err(why) => why,
        };
        // Look for the next trusted record: candidates start with the record magic.
        window.resize(RESYNC_WINDOW, 0);
        let mut next = end;
        let mut from = at + 1;
        'search: while from + RECORD_HEADER_LEN <= end {
            let want = ((end - from) as usize).min(window.len());
            let n = read(from, &mut window[..want])?;
            if n < RECORD_MAGIC.len() {
                break;
            }
            for i in 0..=(n - RECORD_MAGIC.len()) {
                if window[i..i + RECORD_MAGIC.len()] == RECORD_MAGIC
                    && trusted(from + i as u64, end, read, check)?.is_ok()
                {
                    next = from + i as u64;
                    break 'search;
                }
            }
            // The magic may straddle two windows.
            from += (n - (RECORD_MAGIC.len() - 1)) as u64;
        }
        out.damaged.push(Damage {
            start: at,
            end: next,
            reason: why,
        });
        at = next;
    }
    Ok(out)
}

/// Whether a trusted record starts at `p` (see [`scan`]), and where it ends.
fn trusted(
    p: u64,
    end: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<usize>,
    check: Check<'_>,
) -> std::io::Result<Result<(RecordHeader, u64), String>> {
    if p.checked_add(RECORD_HEADER_LEN).is_none_or(|e| e > end) {
        return Ok(Err(format!(
            "{} bytes left, less than a record header",
            end.saturating_sub(p)
        )));
    }
    let mut hdr = [0u8; RECORD_HEADER_LEN as usize];
    let n = read(p, &mut hdr)?;
    if n < hdr.len() {
        return Ok(Err(format!("the data ends {n} bytes into a record header")));
    }
    let h = match RecordHeader::decode(&hdr) {
        Ok(h) => h,
        Err(e) => return Ok(Err(format!("record header: {e}"))),
    };
    match (p + RECORD_HEADER_LEN).checked_add(h.stored_len) {
        Some(e) if e <= end => Ok(check(p, &h)?.map(|()| (h, e))),
        _ => Ok(Err(format!(
            "a record of {} bytes runs past the end ({end})",
            h.stored_len
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            digest: Digest::compute(Algorithm::Sha512, b"x"),
            kind: Kind::Layer,
            flags: 0,
            stored_len: 1,
            raw_len: 1,
            blake3: *blake3::hash(b"x").as_bytes(),
        }
    }

    #[test]
    fn record_round_trip_and_every_byte_is_checked() {
        let h = sample();
        let enc = h.encode();
        assert_eq!(RecordHeader::decode(&enc).unwrap(), h);
        for i in 0..enc.len() {
            let mut bad = enc;
            bad[i] ^= 0x40;
            assert!(RecordHeader::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(
            RecordHeader::decode(&enc[..100]),
            Err(HeaderError::Truncated(100))
        );
    }

    #[test]
    fn segment_round_trip_and_every_byte_is_checked() {
        let h = SegmentHeader { shard: 7, id: 99 };
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc).unwrap(), h);
        for i in 0..enc.len() {
            let mut bad = enc;
            bad[i] ^= 1;
            assert!(SegmentHeader::decode(&bad).is_err(), "flip at {i} accepted");
        }
    }

    fn segment_of(payloads: &[&[u8]]) -> (Vec<u8>, Vec<u64>) {
        let mut seg = SegmentHeader { shard: 0, id: 1 }.encode().to_vec();
        let mut at = Vec::new();
        for p in payloads {
            at.push(seg.len() as u64);
            let h = RecordHeader {
                digest: Digest::compute(Algorithm::Sha256, p),
                kind: Kind::Other,
                flags: 0,
                stored_len: p.len() as u64,
                raw_len: p.len() as u64,
                blake3: *blake3::hash(p).as_bytes(),
            };
            seg.extend_from_slice(&h.encode());
            seg.extend_from_slice(p);
        }
        (seg, at)
    }

    fn scan_bytes(seg: &[u8]) -> Scan {
        let mut read = |off: u64, buf: &mut [u8]| -> std::io::Result<usize> {
            let off = (off as usize).min(seg.len());
            let n = buf.len().min(seg.len() - off);
            buf[..n].copy_from_slice(&seg[off..off + n]);
            Ok(n)
        };
        scan(
            SEGMENT_HEADER_LEN,
            seg.len() as u64,
            &mut read,
            &mut |_, _| Ok(Ok(())),
        )
        .unwrap()
    }

    /// A flipped bit anywhere in a record header costs that record only: the scan finds
    /// the next one and reports the stretch it stepped over.
    #[test]
    fn scan_resynchronises_after_any_flipped_header_bit() {
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let (seg, at) = segment_of(&refs);
        assert_eq!(scan_bytes(&seg).records.len(), 5);
        for byte in 0..RECORD_HEADER_LEN as usize {
            for bit in [0x01u8, 0x80] {
                let mut bad = seg.clone();
                bad[at[2] as usize + byte] ^= bit;
                let s = scan_bytes(&bad);
                let found: Vec<u64> = s.records.iter().map(|(o, _)| *o).collect();
                assert_eq!(
                    found,
                    [at[0], at[1], at[3], at[4]],
                    "flip at header byte {byte}"
                );
                assert_eq!(s.damaged.len(), 1);
                assert_eq!((s.damaged[0].start, s.damaged[0].end), (at[2], at[3]));
            }
        }
    }

    /// A cut mid-record is one damaged stretch to the end; a length that overflows is
    /// refused, not wrapped.
    #[test]
    fn scan_reports_a_torn_tail_and_refuses_overflowing_lengths() {
        let (seg, at) = segment_of(&[b"one", b"two", b"three"]);
        let cut = &seg[..at[2] as usize + 130];
        let s = scan_bytes(cut);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.damaged[0].start, at[2]);
        assert_eq!(s.damaged[0].end, cut.len() as u64);

        let mut h = RecordHeader::decode(&seg[at[0] as usize..]).unwrap();
        h.stored_len = u64::MAX - 64;
        h.raw_len = h.stored_len;
        let mut bad = seg.clone();
        bad[at[0] as usize..at[0] as usize + 128].copy_from_slice(&h.encode());
        let s = scan_bytes(&bad);
        assert_eq!(s.records.len(), 2, "{s:?}");
        assert!(s.damaged[0].reason.contains("runs past"), "{s:?}");
    }
}
