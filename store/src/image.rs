//! Image content: media types, parsing of manifests, indexes and configs (OCI and Docker
//! schema2, via `oci-spec`), and the edges a manifest or index contributes to the graph.
//!
//! This module owns the interpretation of image JSON. It is pure: it never touches the
//! store. Parsing is strict where it matters for safety (every child digest must parse,
//! schema 1 is refused) and lenient where real tools differ (umoci writes manifests
//! without `mediaType`; Docker media types are accepted alongside OCI ones).

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::{Digest, DigestError};
use crate::format::Kind;

/// OCI and Docker media types the store recognises.
pub mod media {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed tar.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker schema2 manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker schema1 manifest (refused).
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Docker schema1 signed manifest (refused).
    pub const DOCKER_SCHEMA1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker layer, uncompressed.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker foreign layer (may be absent: its bytes live elsewhere).
    pub const DOCKER_FOREIGN_LAYER: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
}

/// Largest manifest, index or config the store parses (and so holds in memory at once):
/// registries refuse manifests above 4 MiB; this leaves room for indexes of many images.
pub const MAX_JSON: u64 = 16 << 20;

fn too_large(what: &'static str, len: usize) -> ImageError {
    malformed(
        what,
        format!(
            "{len} bytes, more than the {} MiB the store parses",
            MAX_JSON >> 20
        ),
    )
}

/// How a layer's bytes are compressed, by their first bytes (media types lie: skopeo labels
/// plain tar `+gzip`, so the bytes decide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (one or more members).
    Gzip,
    /// zstd.
    Zstd,
    /// None: a plain tar, or something else.
    None,
}

impl Compression {
    /// The compression of bytes starting with `prefix`.
    pub fn sniff(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for it.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media::OCI_LAYER_GZIP,
            Compression::Zstd => media::OCI_LAYER_ZSTD,
            Compression::None => media::OCI_LAYER,
        }
    }
}

/// Largest zstd window a layer may ask for (2^27 = 128 MiB, zstd's own default limit): a
/// frame that asks for more is refused rather than given the memory.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// A reader of a layer's decompressed bytes (gzip, including multi-member; zstd; or the
/// bytes as they are). Streams: memory stays bounded whatever the ratio.
pub fn decompress(blob: &[u8]) -> std::io::Result<Box<dyn std::io::Read + Send + '_>> {
    Ok(match Compression::sniff(blob) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(blob)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Compression::None => Box::new(blob),
    })
}

/// The content class a media type names.
pub fn kind_of_media_type(mt: &str) -> Kind {
    match mt {
        media::OCI_INDEX | media::DOCKER_LIST => Kind::Index,
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => Kind::Manifest,
        media::OCI_CONFIG | media::DOCKER_CONFIG => Kind::Config,
        _ if mt.contains(".layer.") || mt.contains(".rootfs.") => Kind::Layer,
        _ => Kind::Other,
    }
}

/// Why image JSON was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Docker schema 1 manifests are not supported.
    #[error(
        "schema 1 manifests are not supported (deprecated by Docker; convert with a newer tool)"
    )]
    Schema1,
    /// Not valid JSON, or JSON of the wrong shape.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// A descriptor names a digest this store cannot hold.
    #[error("descriptor digest: {0}")]
    Digest(#[from] DigestError),
}

/// A child named by a manifest or index.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Child {
    /// Its digest.
    pub digest: Digest,
    /// Its declared size.
    pub size: u64,
    /// Its declared media type.
    pub media_type: String,
    /// Its content class (from the media type; for an index's children, what the
    /// descriptor says).
    pub kind: Kind,
    /// For an index's children: `os/arch[/variant]`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// A parsed manifest or index.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// [`Kind::Manifest`] or [`Kind::Index`].
    pub kind: Kind,
    /// The declared media type, if any (umoci omits it).
    pub media_type: Option<String>,
    /// For a manifest: the config (first) then the layers in order. For an index: the
    /// manifests.
    pub children: Vec<Child>,
    /// The `subject` this is a referrer of.
    pub subject: Option<Digest>,
    /// The `org.opencontainers.image.ref.name` / `io.containerd.image.name` annotations of
    /// an index's children, in order (None where absent).
    pub ref_names: Vec<(Option<String>, Option<String>)>,
}

impl Parsed {
    /// The config of a manifest.
    pub fn config(&self) -> Option<&Child> {
        (self.kind == Kind::Manifest)
            .then(|| self.children.first())
            .flatten()
    }

    /// The layers of a manifest (empty for an index).
    pub fn layers(&self) -> &[Child] {
        if self.kind == Kind::Manifest {
            &self.children[1.min(self.children.len())..]
        } else {
            &[]
        }
    }

    /// Distinct child digests: the edges this blob adds.
    pub fn edge_targets(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.children.iter().map(|c| c.digest).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
    layers: Option<serde::de::IgnoredAny>,
    signatures: Option<serde::de::IgnoredAny>,
    fs_layers: Option<serde::de::IgnoredAny>,
}

fn malformed(what: &'static str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Malformed {
        what,
        reason: e.to_string(),
    }
}

fn digest_of(d: &Descriptor) -> Result<Digest, ImageError> {
    Ok(Digest::parse(d.digest().as_ref())?)
}

fn platform_of(d: &Descriptor) -> Option<String> {
    d.platform().as_ref().map(|p| {
        let mut s = format!("{}/{}", p.os(), p.architecture());
        if let Some(v) = p.variant() {
            s.push('/');
            s.push_str(v);
        }
        s
    })
}

fn child(d: &Descriptor, kind: Option<Kind>) -> Result<Child, ImageError> {
    let media_type = d.media_type().to_string();
    Ok(Child {
        digest: digest_of(d)?,
        size: d.size(),
        kind: kind.unwrap_or_else(|| kind_of_media_type(&media_type)),
        media_type,
        platform: platform_of(d),
    })
}

/// Whether bytes look like a manifest or an index (by media type, else by shape), without
/// a full parse. `None` for anything else.
pub fn sniff(bytes: &[u8]) -> Option<Kind> {
    if bytes.len() as u64 > MAX_JSON {
        return None;
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    shape(&p)
}

fn shape(p: &Probe) -> Option<Kind> {
    match p.media_type.as_deref() {
        Some(media::OCI_INDEX | media::DOCKER_LIST) => Some(Kind::Index),
        Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST) => Some(Kind::Manifest),
        _ if p.manifests.is_some() => Some(Kind::Index),
        _ if p.config.is_some() && p.layers.is_some() => Some(Kind::Manifest),
        _ => None,
    }
}

/// Parses a manifest or an index (OCI or Docker schema2; recognised by `mediaType`, or by
/// shape when it is absent). Schema 1 is refused.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ImageError> {
    if bytes.len() as u64 > MAX_JSON {
        return Err(too_large("manifest", bytes.len()));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(malformed("manifest", "not a JSON object"));
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e))?;
    let schema1 = matches!(&probe.schema_version, Some(v) if v.as_u64() == Some(1))
        || matches!(
            probe.media_type.as_deref(),
            Some(media::DOCKER_SCHEMA1 | media::DOCKER_SCHEMA1_SIGNED)
        )
        || probe.fs_layers.is_some()
        || probe.signatures.is_some();
    if schema1 {
        return Err(ImageError::Schema1);
    }
    match shape(&probe) {
        Some(Kind::Index) => {
            let idx: ImageIndex =
                serde_json::from_slice(bytes).map_err(|e| malformed("image index", e))?;
            let mut children = Vec::with_capacity(idx.manifests().len());
            let mut ref_names = Vec::with_capacity(idx.manifests().len());
            for m in idx.manifests() {
                children.push(child(m, None)?);
                let ann = m.annotations().as_ref();
                let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
                ref_names.push((
                    get("org.opencontainers.image.ref.name"),
                    get("io.containerd.image.name"),
                ));
            }
            Ok(Parsed {
                kind: Kind::Index,
                media_type: probe.media_type,
                children,
                subject: idx.subject().as_ref().map(digest_of).transpose()?,
                ref_names,
            })
        }
        Some(_) => {
            let m: ImageManifest =
                serde_json::from_slice(bytes).map_err(|e| malformed("image manifest", e))?;
            let mut children = Vec::with_capacity(m.layers().len() + 1);
            children.push(child(m.config(), Some(Kind::Config))?);
            for l in m.layers() {
                children.push(child(l, Some(Kind::Layer))?);
            }
            Ok(Parsed {
                kind: Kind::Manifest,
                media_type: probe.media_type,
                children,
                subject: m.subject().as_ref().map(digest_of).transpose()?,
                ref_names: Vec::new(),
            })
        }
        None => Err(malformed(
            "manifest",
            "neither an image manifest (config + layers) nor an index (manifests)",
        )),
    }
}

/// The parts of an image config the store reads.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ConfigInfo {
    /// Creation time as written (RFC 3339).
    #[serde(default)]
    pub created: Option<String>,
    /// Operating system.
    #[serde(default)]
    pub os: Option<String>,
    /// CPU architecture.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Uncompressed layer digests, bottom to top.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Reads created, platform and `diff_ids` from an image config (OCI or Docker).
pub fn parse_config(bytes: &[u8]) -> Result<ConfigInfo, ImageError> {
    #[derive(serde::Deserialize)]
    struct Raw {
        created: Option<String>,
        os: Option<String>,
        architecture: Option<String>,
        rootfs: Option<RootFs>,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    if bytes.len() as u64 > MAX_JSON {
        return Err(too_large("image config", bytes.len()));
    }
    let r: Raw = serde_json::from_slice(bytes).map_err(|e| malformed("image config", e))?;
    Ok(ConfigInfo {
        created: r.created,
        os: r.os,
        architecture: r.architecture,
        diff_ids: r.rootfs.map(|x| x.diff_ids).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(media_type: Option<&str>) -> String {
        let mt = media_type.map_or(String::new(), |m| format!(r#""mediaType":"{m}","#));
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"{}","digest":"{D1}","size":3}},
            "layers":[{{"mediaType":"{}","digest":"{D2}","size":5}},
                      {{"mediaType":"{}","digest":"{D2}","size":5}}]}}"#,
            media::OCI_CONFIG,
            media::OCI_LAYER_GZIP,
            media::OCI_LAYER_GZIP
        )
    }

    #[test]
    fn manifest_with_and_without_media_type() {
        for mt in [
            Some(media::OCI_MANIFEST),
            Some(media::DOCKER_MANIFEST),
            None,
        ] {
            let p = parse(manifest(mt).as_bytes()).unwrap();
            assert_eq!(p.kind, Kind::Manifest);
            assert_eq!(p.config().unwrap().digest.to_string(), D1);
            assert_eq!(p.layers().len(), 2);
            // A layer listed twice is one edge.
            assert_eq!(p.edge_targets().len(), 2);
            assert_eq!(sniff(manifest(mt).as_bytes()), Some(Kind::Manifest));
        }
    }

    #[test]
    fn index_with_platforms_and_names() {
        let j = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{D1}","size":7,
            "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}},
            "annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
            media::OCI_MANIFEST
        );
        let p = parse(j.as_bytes()).unwrap();
        assert_eq!(p.kind, Kind::Index);
        assert_eq!(p.children[0].platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(p.children[0].kind, Kind::Manifest);
        assert_eq!(p.ref_names[0].0.as_deref(), Some("latest"));
    }

    #[test]
    fn refuses_schema1_and_garbage() {
        let s1 = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert_eq!(parse(s1.as_bytes()).unwrap_err(), ImageError::Schema1);
        assert!(matches!(
            parse(b"not json"),
            Err(ImageError::Malformed { .. })
        ));
        assert!(matches!(
            parse(br#"{"schemaVersion":2}"#),
            Err(ImageError::Malformed { .. })
        ));
        let bad_digest = manifest(None).replace(D1, "sha256:XYZ");
        assert!(parse(bad_digest.as_bytes()).is_err());
    }

    #[test]
    fn referrer_subject() {
        let j = manifest(Some(media::OCI_MANIFEST)).replacen(
            "\"config\"",
            &format!(
                r#""subject":{{"mediaType":"{}","digest":"{D2}","size":1}},"config""#,
                media::OCI_MANIFEST
            ),
            1,
        );
        assert_eq!(
            parse(j.as_bytes()).unwrap().subject.unwrap().to_string(),
            D2
        );
    }

    #[test]
    fn config_fields() {
        let c = br#"{"created":"2024-01-01T00:00:00Z","os":"linux","architecture":"amd64",
                     "rootfs":{"type":"layers","diff_ids":["sha256:ab"]}}"#;
        let info = parse_config(c).unwrap();
        assert_eq!(info.diff_ids, vec!["sha256:ab"]);
        assert_eq!(info.os.as_deref(), Some("linux"));
    }
}
