//! Digest parsing from strings (and binary index keys): whatever parses prints back to
//! the same string and round-trips through its key and serde; whatever fails says why.
#![no_main]

use layerstore::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Binary keys, as read back from the index.
    if let Ok(d) = Digest::from_key(data) {
        assert_eq!(&*d.key(), data, "from_key/key round trip");
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Digest::parse(s) {
        Ok(d) => {
            // Parsing is strict, so the canonical form is the input itself.
            assert_eq!(d.to_string(), s, "Display differs from the parsed string");
            assert_eq!(Digest::parse(&d.to_string()), Ok(d));
            assert_eq!(d.hex().len(), 2 * d.algorithm().hash_len());
            assert_eq!(d.hash().len(), d.algorithm().hash_len());
            assert_eq!(Digest::from_key(&d.key()), Ok(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
            assert_eq!(s.parse::<Digest>(), Ok(d));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
