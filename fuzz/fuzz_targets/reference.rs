//! Image reference parsing: a parsed reference's canonical form parses to an equal
//! reference (and is a fixed point), its familiar form parses, and it is normalised.
#![no_main]

use layerstore::Reference;
use layerstore::reference::{MAX_REPOSITORY_LEN, is_valid_tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = is_valid_tag(s);
    match Reference::parse(s) {
        Ok(r) => {
            let canonical = r.canonical();
            let again = Reference::parse(&canonical)
                .unwrap_or_else(|e| panic!("canonical {canonical:?} of {s:?} does not parse: {e}"));
            assert_eq!(
                again, r,
                "canonical {canonical:?} of {s:?} parses differently"
            );
            assert_eq!(
                again.canonical(),
                canonical,
                "canonical form is not a fixed point"
            );
            assert_eq!(r.to_string(), canonical);
            // The familiar form drops `docker.io/`; it reads back as the same reference
            // unless the repository's first component then looks like a registry
            // (`docker.io/my.org/app` -> `my.org/app`), which the docs call out.
            let familiar = r.familiar();
            let first = r.repository().split('/').next().unwrap_or_default();
            let ambiguous =
                r.registry() == "docker.io" && (first.contains(['.', ':']) || first == "localhost");
            if !ambiguous {
                match Reference::parse(&familiar) {
                    Ok(f) => assert_eq!(
                        f, r,
                        "familiar {familiar:?} of {s:?} reads back differently"
                    ),
                    Err(e) => panic!("familiar {familiar:?} of {s:?} does not parse: {e}"),
                }
            }
            assert!(r.tag().is_some() || r.digest().is_some());
            assert!(r.repository().len() <= MAX_REPOSITORY_LEN);
            assert_eq!(r.name(), format!("{}/{}", r.registry(), r.repository()));
            let retagged = r.with_tag("fuzz").expect("valid tag refused");
            assert_eq!(retagged.tag(), Some("fuzz"));
            assert_eq!(retagged.digest(), r.digest());
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
