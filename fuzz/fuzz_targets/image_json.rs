//! Manifest, index and config parsing: a parse either fails with a message or gives a
//! result whose parts agree with each other and with `sniff`.
#![no_main]

use layerstore::Kind;
use layerstore::image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match image::parse(data) {
        Ok(p) => {
            assert_eq!(
                image::sniff(data),
                Some(p.kind),
                "sniff disagrees with parse"
            );
            match p.kind {
                Kind::Manifest => {
                    let config = p.config().expect("a manifest has a config");
                    assert_eq!(config.kind, Kind::Config);
                    assert_eq!(p.layers().len() + 1, p.children.len());
                    assert!(p.layers().iter().all(|l| l.kind == Kind::Layer));
                    assert!(p.ref_names.is_empty());
                }
                Kind::Index => {
                    assert!(p.config().is_none());
                    assert!(p.layers().is_empty());
                    assert_eq!(p.ref_names.len(), p.children.len());
                }
                k => panic!("parse returned kind {k:?}"),
            }
            let edges = p.edge_targets();
            assert!(
                edges.windows(2).all(|w| w[0] < w[1]),
                "edges not sorted/deduped"
            );
            assert!(
                p.children
                    .iter()
                    .all(|c| edges.binary_search(&c.digest).is_ok())
            );
            for c in &p.children {
                let _ = image::kind_of_media_type(&c.media_type);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match image::parse_config(data) {
        Ok(info) => {
            let _ = serde_json::to_vec(&info).unwrap();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _ = image::Compression::sniff(data);
});
