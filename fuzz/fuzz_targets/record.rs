//! On-disk headers: segment and record headers decode from any bytes without panicking,
//! and whatever decodes re-encodes to a header that decodes to the same value. Then the
//! bytes are scanned as a segment; the scan must account for every byte exactly once.
//!
//! The first input byte picks a mode: bit 0 "fixes up" every record magic in the rest
//! (version byte and checksum made right), so that the fuzzer reaches the field checks
//! and the scan's trusted path instead of dying at the checksum; bit 1 makes the scan's
//! check demand a matching payload blake3.
#![no_main]

use layerstore::format::{
    FORMAT_VERSION, RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader, SEGMENT_HEADER_LEN,
    SEGMENT_MAGIC, SegmentHeader, scan,
};
use libfuzzer_sys::fuzz_target;

fn check8(b: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::hash(b).as_bytes()[..8]);
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let mut data = rest.to_vec();
    let rec = RECORD_HEADER_LEN as usize;
    if mode & 1 != 0 {
        if data.len() >= SEGMENT_HEADER_LEN as usize && data[..8] == SEGMENT_MAGIC {
            data[8] = FORMAT_VERSION;
            let c = check8(&data[..24]);
            data[24..32].copy_from_slice(&c);
        }
        let mut i = 0;
        while i + rec <= data.len() {
            if data[i..i + 4] == RECORD_MAGIC {
                data[i + 4] = FORMAT_VERSION;
                let c = check8(&data[i..i + 120]);
                data[i + 120..i + 128].copy_from_slice(&c);
            }
            i += 1;
        }
    }

    if let Ok(h) = SegmentHeader::decode(&data) {
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc), Ok(h));
        // Only the reserved bytes 9..12 may differ from the input.
        assert_eq!(enc[..9], data[..9]);
        assert_eq!(enc[12..24], data[12..24]);
    }
    if let Ok(h) = RecordHeader::decode(&data) {
        let enc = h.encode();
        assert_eq!(RecordHeader::decode(&enc), Ok(h));
        // Unknown kind bytes read as Other; every other byte is checked.
        if data[6] <= 4 {
            assert_eq!(enc[..], data[..rec], "re-encoding changed the header");
        }
        assert!(h.flags & !layerstore::format::FLAG_ZSTD == 0);
    }

    // Scan the bytes as a segment body.
    let start = if SegmentHeader::decode(&data).is_ok() {
        SEGMENT_HEADER_LEN
    } else {
        0
    };
    let end = data.len() as u64;
    let mut read = |off: u64, buf: &mut [u8]| -> std::io::Result<usize> {
        let off = off as usize;
        if off >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - off);
        buf[..n].copy_from_slice(&data[off..off + n]);
        Ok(n)
    };
    let want_blake3 = mode & 2 != 0;
    let data2 = data.clone();
    let mut check = |off: u64, h: &RecordHeader| -> std::io::Result<Result<(), String>> {
        if !want_blake3 {
            return Ok(Ok(()));
        }
        let p = (off + RECORD_HEADER_LEN) as usize;
        let payload = &data2[p..p + h.stored_len as usize];
        Ok(if *blake3::hash(payload).as_bytes() == h.blake3 {
            Ok(())
        } else {
            Err("blake3".into())
        })
    };
    let s = scan(start, end, &mut read, &mut check).expect("scan of memory failed");
    // Records and damaged stretches tile [start, end) in order.
    let mut pieces: Vec<(u64, u64, bool)> = s
        .records
        .iter()
        .map(|(off, h)| (*off, off + RECORD_HEADER_LEN + h.stored_len, true))
        .chain(s.damaged.iter().map(|d| (d.start, d.end, false)))
        .collect();
    pieces.sort();
    let mut at = start;
    for (a, b, _) in &pieces {
        assert_eq!(*a, at, "gap or overlap in scan at {at}: {pieces:?}");
        assert!(b > a, "empty piece {pieces:?}");
        at = *b;
    }
    assert_eq!(at, end.max(start), "scan did not reach the end: {pieces:?}");
    for (off, h) in &s.records {
        let o = *off as usize;
        assert_eq!(RecordHeader::decode(&data[o..o + rec]).as_ref(), Ok(h));
    }
    for d in &s.damaged {
        assert!(!d.reason.is_empty());
    }
});
