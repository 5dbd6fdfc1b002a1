//! Image references: parsing and normalising names such as `nginx`, `user/app:1.0`,
//! `localhost:5000/a/b:1` or `quay.io/x/y@sha256:…` exactly as Docker does
//! (distribution/reference's `ParseNormalizedNamed` followed by `TagNameOnly`), and
//! printing them back as the canonical key of the store's names table
//! ([`Reference::canonical`]) or as Docker's short display form ([`Reference::familiar`]).
//! This module is pure string handling: it owns the grammar and the normalisation rules
//! and never touches the store.
//!
//! The grammar, as in distribution/reference:
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [ domain "/" ] path
//! domain           := host [ ":" port ]
//! host             := domain-component ( "." domain-component )* | "[" ipv6 "]"
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! ipv6             := [a-fA-F0-9:]+
//! port             := [0-9]+
//! path             := path-component ( "/" path-component )*
//! path-component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest           := see crate::digest (sha256, sha512 or blake3, lower-case hex)
//! ```
//!
//! Normalisation: the first `/`-separated component is a registry domain only if it
//! contains `.` or `:`, is `localhost`, or has upper-case letters; otherwise the registry
//! is `docker.io`. `index.docker.io` becomes `docker.io`, and a one-component path on
//! `docker.io` gets the `library/` prefix. A reference with neither tag nor digest gets
//! the tag `latest`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry a reference without one refers to (Docker Hub).
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// The tag given to a reference that has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// Longest repository path (the name without its registry, e.g. `library/nginx`), in
/// bytes. As in distribution/reference since v0.6.0, the registry does not count.
pub const MAX_REPOSITORY_LEN: usize = 255;

/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// Docker Hub's legacy name, normalised to [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";

/// The namespace of Docker Hub's official images.
const OFFICIAL_PREFIX: &str = "library/";

/// Why a string is not a valid image reference (or tag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    /// The reference is the empty string.
    #[error("invalid reference format: the image reference is empty")]
    Empty,
    /// The reference is 64 hex digits: that is an image ID, which Docker refuses as a name.
    #[error(
        "invalid repository name {0:?}: cannot specify 64-byte hexadecimal strings \
         (that is an image ID, not a name)"
    )]
    HexIdentifier(String),
    /// The repository path has upper-case letters.
    #[error(
        "invalid reference format {reference:?}: repository name {repository:?} \
         must be lowercase"
    )]
    Uppercase {
        /// The whole input.
        reference: String,
        /// The repository path as normalised so far (e.g. `library/Nginx`).
        repository: String,
    },
    /// The registry part is not a valid `host[:port]`.
    #[error(
        "invalid reference {reference:?}: {domain:?} is not a valid registry (a first \
         component with '.' or ':', upper case, or equal to 'localhost' names the \
         registry, which must be host[:port]: a DNS-style name, an IPv4 address or a \
         bracketed IPv6 address, then an optional numeric port)"
    )]
    InvalidDomain {
        /// The whole input.
        reference: String,
        /// The part taken as the registry (everything before the first `/`).
        domain: String,
    },
    /// A `/`-separated component of the repository path is malformed (or empty).
    #[error(
        "invalid reference {reference:?}: repository path component {component:?} is \
         invalid (components are non-empty runs of lower-case letters and digits, joined \
         inside by '.', '_', '__' or dashes)"
    )]
    InvalidPathComponent {
        /// The whole input.
        reference: String,
        /// The offending component (empty for `a//b`, a leading or a trailing `/`).
        component: String,
    },
    /// The tag is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error(
        "invalid reference {reference:?}: tag {tag:?} is invalid (expected 1 to 128 \
         characters from [A-Za-z0-9_.-], not starting with '.' or '-')"
    )]
    InvalidTag {
        /// The whole input (for [`Reference::with_tag`]: the reference being retagged).
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The part after `@` is not a valid digest.
    #[error("invalid reference {reference:?}: digest {digest:?} is invalid: {source}")]
    InvalidDigest {
        /// The whole input.
        reference: String,
        /// The part after `@`.
        digest: String,
        /// Why the digest was rejected.
        source: DigestError,
    },
    /// The repository path is longer than [`MAX_REPOSITORY_LEN`].
    #[error(
        "invalid reference {reference:?}: repository name is {len} characters long, \
         must not be more than {MAX_REPOSITORY_LEN} characters"
    )]
    NameTooLong {
        /// The whole input.
        reference: String,
        /// Length of the normalised repository path in bytes.
        len: usize,
    },
}

/// A parsed, normalised image reference: registry, repository path, and a tag, a digest
/// or both.
///
/// A value of this type is always valid and normalised: `nginx`, `docker.io/nginx` and
/// `index.docker.io/library/nginx:latest` all parse to the same value, whose
/// [`canonical`](Reference::canonical) form is `docker.io/library/nginx:latest`. It
/// compares and hashes by that canonical form, and serialises as it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises a reference the way Docker does.
    ///
    /// `nginx` becomes `docker.io/library/nginx:latest`; `user/app` becomes
    /// `docker.io/user/app:latest`; `localhost:5000/a/b:1` keeps its registry;
    /// `quay.io/x/y@sha256:<64 hex>` is digest-only; `name:tag@digest` keeps both. A
    /// reference with neither tag nor digest gets the tag `latest`.
    ///
    /// One deliberate difference from Docker: when the first component is taken as a
    /// registry (it holds a `.`) but is not a valid host, such as `foo_bar.com/app`,
    /// Docker quietly returns a reference with *no* registry at all; this parser rejects
    /// it with [`ReferenceError::InvalidDomain`].
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ReferenceError::HexIdentifier(s.to_owned()));
        }

        let (registry, explicit_registry, remainder) = split_registry(s);
        let (name_and_tag, digest) = match remainder.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (&*remainder, None),
        };
        // A path never holds ':', so the first one starts the tag.
        let (repository, tag) = match name_and_tag.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (name_and_tag, None),
        };

        if repository.to_lowercase() != repository {
            return Err(ReferenceError::Uppercase {
                reference: s.to_owned(),
                repository: repository.to_owned(),
            });
        }
        if explicit_registry && !is_valid_domain(registry) {
            return Err(ReferenceError::InvalidDomain {
                reference: s.to_owned(),
                domain: registry.to_owned(),
            });
        }
        if let Some(component) = repository.split('/').find(|c| !is_valid_path_component(c)) {
            return Err(ReferenceError::InvalidPathComponent {
                reference: s.to_owned(),
                component: component.to_owned(),
            });
        }
        if let Some(tag) = tag.filter(|t| !is_valid_tag(t)) {
            return Err(ReferenceError::InvalidTag {
                reference: s.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let digest = digest
            .map(|d| {
                Digest::parse(d).map_err(|source| ReferenceError::InvalidDigest {
                    reference: s.to_owned(),
                    digest: d.to_owned(),
                    source,
                })
            })
            .transpose()?;
        if repository.len() > MAX_REPOSITORY_LEN {
            return Err(ReferenceError::NameTooLong {
                reference: s.to_owned(),
                len: repository.len(),
            });
        }

        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// The registry: `docker.io`, `localhost:5000`, `quay.io`, `[::1]:5000`, …
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path without the registry, e.g. `library/nginx`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The full name without tag or digest: `registry/repository`, e.g.
    /// `docker.io/library/nginx`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag, if any (always present when there is no digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The canonical string, used as the key of the store's names table:
    /// `registry/repository:tag`, `registry/repository@digest` for a digest-only
    /// reference, or `registry/repository:tag@digest` when it has both.
    ///
    /// [`Reference::parse`] of this string returns an equal reference.
    pub fn canonical(&self) -> String {
        self.with_suffix(self.name())
    }

    /// Docker's short form for display: `nginx:latest`, `user/app:1.0`, `quay.io/x/y:2`.
    ///
    /// Drops the registry when it is `docker.io`, and then the `library/` namespace when
    /// one component is left after it. As in Docker, this form is not always unambiguous:
    /// `docker.io/my.org/app` displays as `my.org/app`, which parses with registry
    /// `my.org`. Use [`canonical`](Reference::canonical) to store or compare.
    pub fn familiar(&self) -> String {
        let name = if self.registry == DEFAULT_REGISTRY {
            match self.repository.strip_prefix(OFFICIAL_PREFIX) {
                Some(rest) if !rest.contains('/') => rest.to_owned(),
                _ => self.repository.clone(),
            }
        } else {
            self.name()
        };
        self.with_suffix(name)
    }

    /// The same repository with another tag (validated with [`is_valid_tag`]).
    ///
    /// As Docker's `WithTag`, a digest the reference has is kept: the result is
    /// `registry/repository:tag@digest`.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        if !is_valid_tag(tag) {
            return Err(ReferenceError::InvalidTag {
                reference: self.canonical(),
                tag: tag.to_owned(),
            });
        }
        Ok(Reference {
            tag: Some(tag.to_owned()),
            ..self.clone()
        })
    }

    /// Appends `:tag` and `@digest` (those present) to `name`.
    fn with_suffix(&self, mut name: String) -> String {
        if let Some(tag) = &self.tag {
            name.push(':');
            name.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            name.push('@');
            name.push_str(&digest.to_string());
        }
        name
    }
}

impl fmt::Display for Reference {
    /// Writes the [canonical](Reference::canonical) form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.canonical())
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        Reference::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether `s` is a valid tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (ASCII only).
pub fn is_valid_tag(s: &str) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    match s.as_bytes() {
        [first, rest @ ..] => {
            s.len() <= MAX_TAG_LEN
                && is_word(*first)
                && rest.iter().all(|&b| is_word(b) || b == b'.' || b == b'-')
        }
        [] => false,
    }
}

/// Docker's `splitDockerDomain`: the registry (normalised), whether it was spelled out
/// in `s`, and the rest of `s` (with `library/` prefixed where Docker Hub wants it).
fn split_registry(s: &str) -> (&str, bool, Cow<'_, str>) {
    let (registry, explicit, rest) = match s.split_once('/') {
        Some((first, rest))
            if first == "localhost"
                || first.contains(['.', ':'])
                || first.to_lowercase() != first =>
        {
            if first == LEGACY_DEFAULT_REGISTRY || first == DEFAULT_REGISTRY {
                (DEFAULT_REGISTRY, false, rest)
            } else {
                (first, true, rest)
            }
        }
        _ => (DEFAULT_REGISTRY, false, s),
    };
    if registry == DEFAULT_REGISTRY && !rest.contains('/') {
        (
            registry,
            explicit,
            Cow::Owned(format!("{OFFICIAL_PREFIX}{rest}")),
        )
    } else {
        (registry, explicit, Cow::Borrowed(rest))
    }
}

/// `host[:port]` where host is a DNS-style name (or IPv4 address) or `[IPv6]`.
fn is_valid_domain(domain: &str) -> bool {
    let (host_ok, port) = if let Some(bracketed) = domain.strip_prefix('[') {
        let Some((inner, rest)) = bracketed.split_once(']') else {
            return false;
        };
        let ok = !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        (ok, rest)
    } else {
        let (host, rest) = domain.split_at(domain.find(':').unwrap_or(domain.len()));
        (host.split('.').all(is_domain_component), rest)
    };
    host_ok
        && (port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
}

/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn is_domain_component(c: &str) -> bool {
    let b = c.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`.
fn is_valid_path_component(c: &str) -> bool {
    let is_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let is_sep = |b: &u8| matches!(b, b'.' | b'_' | b'-');
    let mut rest = c.as_bytes();
    loop {
        let alnum = rest.iter().take_while(|b| is_alnum(b)).count();
        if alnum == 0 {
            return false;
        }
        rest = &rest[alnum..];
        if rest.is_empty() {
            return true;
        }
        let sep_len = rest.iter().take_while(|b| is_sep(b)).count();
        let sep = &rest[..sep_len];
        let sep_ok = matches!(sep, b"." | b"_" | b"__")
            || (!sep.is_empty() && sep.iter().all(|&b| b == b'-'));
        if !sep_ok {
            return false;
        }
        rest = &rest[sep_len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sha(hex: &str) -> String {
        format!("sha256:{hex}")
    }

    /// The variant of an error, for table tests.
    fn kind(e: &ReferenceError) -> &'static str {
        match e {
            ReferenceError::Empty => "Empty",
            ReferenceError::HexIdentifier(_) => "HexIdentifier",
            ReferenceError::Uppercase { .. } => "Uppercase",
            ReferenceError::InvalidDomain { .. } => "InvalidDomain",
            ReferenceError::InvalidPathComponent { .. } => "InvalidPathComponent",
            ReferenceError::InvalidTag { .. } => "InvalidTag",
            ReferenceError::InvalidDigest { .. } => "InvalidDigest",
            ReferenceError::NameTooLong { .. } => "NameTooLong",
        }
    }

    #[test]
    fn valid_references() {
        let d = sha(HEX);
        // (input, canonical, familiar)
        #[rustfmt::skip]
        let mut cases: Vec<(String, String, String)> = [
            ("nginx", "docker.io/library/nginx:latest", "nginx:latest"),
            ("nginx:1.25", "docker.io/library/nginx:1.25", "nginx:1.25"),
            ("library/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
            ("docker.io/library/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
            ("index.docker.io/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
            ("index.docker.io/library/nginx:x", "docker.io/library/nginx:x", "nginx:x"),
            ("user/app", "docker.io/user/app:latest", "user/app:latest"),
            ("user/app:1.0", "docker.io/user/app:1.0", "user/app:1.0"),
            ("index.docker.io/user/app", "docker.io/user/app:latest", "user/app:latest"),
            ("library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
            ("store/foo/bar", "docker.io/store/foo/bar:latest", "store/foo/bar:latest"),
            ("other/library", "docker.io/other/library:latest", "other/library:latest"),
            ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
            ("localhost:5000/a/b:1", "localhost:5000/a/b:1", "localhost:5000/a/b:1"),
            ("localhost:5000/app", "localhost:5000/app:latest", "localhost:5000/app:latest"),
            ("quay.io/x/y:2", "quay.io/x/y:2", "quay.io/x/y:2"),
            ("example.com/app", "example.com/app:latest", "example.com/app:latest"),
            ("example.com:8000/a/b", "example.com:8000/a/b:latest", "example.com:8000/a/b:latest"),
            ("127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest", "127.0.0.1:5000/debian:latest"),
            ("test-com:8080/foo", "test-com:8080/foo:latest", "test-com:8080/foo:latest"),
            ("xn--n3h.com/img:xn--n3h.com", "xn--n3h.com/img:xn--n3h.com", "xn--n3h.com/img:xn--n3h.com"),
            ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io/test.example.com/my-app:test.example.com"),
            ("[::1]:5000/repo", "[::1]:5000/repo:latest", "[::1]:5000/repo:latest"),
            ("[2001:db8::1]/repo:tag", "[2001:db8::1]/repo:tag", "[2001:db8::1]/repo:tag"),
            // Docker checks bracketed hosts loosely: any hex digits and colons.
            ("[:]/x", "[:]/x:latest", "[:]/x:latest"),
            ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest", "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest"),
            // An upper-case first component is a registry, kept as written.
            ("Foo/bar", "Foo/bar:latest", "Foo/bar:latest"),
            ("FOO/bar:baz", "FOO/bar:baz", "FOO/bar:baz"),
            ("Docker.io/nginx", "Docker.io/nginx:latest", "Docker.io/nginx:latest"),
            // Without a '/', something that looks like a host is a Docker Hub name.
            ("localhost", "docker.io/library/localhost:latest", "localhost:latest"),
            ("localhost:5000", "docker.io/library/localhost:5000", "localhost:5000"),
            ("example.com", "docker.io/library/example.com:latest", "example.com:latest"),
            ("test.com:5000", "docker.io/library/test.com:5000", "test.com:5000"),
            ("192.168.0.1", "docker.io/library/192.168.0.1:latest", "192.168.0.1:latest"),
            ("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080", "foo_bar.com:8080"),
            ("test_com/foo", "docker.io/test_com/foo:latest", "test_com/foo:latest"),
            // Separators.
            ("docker---rules/docker", "docker.io/docker---rules/docker:latest", "docker---rules/docker:latest"),
            ("dock__er/d_o.c-k", "docker.io/dock__er/d_o.c-k:latest", "dock__er/d_o.c-k:latest"),
            ("d/t", "docker.io/d/t:latest", "d/t:latest"),
            ("a/b/c/d/e", "docker.io/a/b/c/d/e:latest", "a/b/c/d/e:latest"),
            // Tags.
            ("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase", "lowercase:Uppercase"),
            ("a:_", "docker.io/library/a:_", "a:_"),
            ("a:1.2-rc_3", "docker.io/library/a:1.2-rc_3", "a:1.2-rc_3"),
        ]
        .into_iter()
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
        .collect();
        let h63 = &HEX[..63];
        #[rustfmt::skip]
        let formatted = [
            // 63 hex digits, and 64 hex digits with a tag or a registry, are names.
            (h63.to_owned(), format!("docker.io/library/{h63}:latest"), format!("{h63}:latest")),
            (format!("{HEX}:t"), format!("docker.io/library/{HEX}:t"), format!("{HEX}:t")),
            (format!("docker.io/{HEX}"), format!("docker.io/library/{HEX}:latest"), format!("{HEX}:latest")),
            // Digests: digest-only, and tag plus digest (both kept).
            (format!("nginx@{d}"), format!("docker.io/library/nginx@{d}"), format!("nginx@{d}")),
            (format!("quay.io/x/y@{d}"), format!("quay.io/x/y@{d}"), format!("quay.io/x/y@{d}")),
            (format!("busybox:latest@{d}"), format!("docker.io/library/busybox:latest@{d}"), format!("busybox:latest@{d}")),
            (format!("localhost:5000/a:1@{d}"), format!("localhost:5000/a:1@{d}"), format!("localhost:5000/a:1@{d}")),
            (format!("[::1]:5000/repo:tag@{d}"), format!("[::1]:5000/repo:tag@{d}"), format!("[::1]:5000/repo:tag@{d}")),
        ];
        cases.extend(formatted);

        for (input, canonical, familiar) in &cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(&r.canonical(), canonical, "canonical of {input:?}");
            assert_eq!(&r.familiar(), familiar, "familiar of {input:?}");
            assert_eq!(&r.to_string(), canonical, "Display of {input:?}");
            assert_eq!(r.name(), format!("{}/{}", r.registry(), r.repository()));
            assert!(r.tag().is_some() || r.digest().is_some());
            // Round trips: canonical always, familiar for all of these.
            assert_eq!(
                Reference::parse(canonical).as_ref(),
                Ok(&r),
                "{canonical:?}"
            );
            assert_eq!(Reference::parse(familiar).as_ref(), Ok(&r), "{familiar:?}");
            assert_eq!(input.parse::<Reference>().as_ref(), Ok(&r));
        }
    }

    #[test]
    fn accessors() {
        let r = Reference::parse("nginx").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/nginx");
        assert_eq!(r.name(), "docker.io/library/nginx");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);

        let r = Reference::parse("localhost:5000/a/b:1").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.name(), "localhost:5000/a/b");
        assert_eq!(r.tag(), Some("1"));

        let d = Digest::parse(&sha(HEX)).unwrap();
        let r = Reference::parse(&format!("quay.io/x/y@{d}")).unwrap();
        assert_eq!(r.registry(), "quay.io");
        assert_eq!(r.repository(), "x/y");
        assert_eq!(r.tag(), None, "a digest-only reference gets no default tag");
        assert_eq!(r.digest(), Some(&d));

        let r = Reference::parse(&format!("app:v2@{d}")).unwrap();
        assert_eq!(r.tag(), Some("v2"));
        assert_eq!(r.digest(), Some(&d));

        let long = format!("sha512:{}", "ab".repeat(64));
        let r = Reference::parse(&format!("a@{long}")).unwrap();
        assert_eq!(r.digest().unwrap().to_string(), long);
        let b3 = format!("blake3:{HEX}");
        let r = Reference::parse(&format!("a@{b3}")).unwrap();
        assert_eq!(r.digest().unwrap().to_string(), b3);
    }

    #[test]
    fn invalid_references() {
        let d = sha(HEX);
        #[rustfmt::skip]
        let mut cases: Vec<(String, &str)> = [
            ("", "Empty"),
            (HEX, "HexIdentifier"),
            ("Nginx", "Uppercase"),
            ("Uppercase:tag", "Uppercase"),
            ("docker/Docker", "Uppercase"),
            ("docker.io/docker/Docker", "Uppercase"),
            ("test:5000/Uppercase/lowercase:tag", "Uppercase"),
            ("Foo/Bar", "Uppercase"),
            ("https://github.com/docker/docker", "InvalidDomain"),
            ("-docker.io/docker/docker", "InvalidDomain"),
            ("docker.io-/x", "InvalidDomain"),
            ("a..b/x", "InvalidDomain"),
            ("host:/x", "InvalidDomain"),
            ("host:50a0/x", "InvalidDomain"),
            ("host:1:2/x", "InvalidDomain"),
            ("fc00::1:5000/debian", "InvalidDomain"),
            ("[fe80::1%eth0]:5000/debian", "InvalidDomain"),
            ("[2001:db8:3:4::192.0.2.33]:5000/debian", "InvalidDomain"),
            ("[]/x", "InvalidPathComponent"),
            ("[::1]]/x", "InvalidDomain"),
            ("[::1/x", "InvalidDomain"),
            ("[::1]x/x", "InvalidDomain"),
            ("[::g]/x", "InvalidDomain"),
            ("ex_ample.com/x", "InvalidDomain"),
            ("foo:bar/baz", "InvalidDomain"),
            ("A_b/c", "InvalidDomain"),
            ("-docker", "InvalidPathComponent"),
            ("-docker/docker", "InvalidPathComponent"),
            ("docker-/docker", "InvalidPathComponent"),
            ("_docker/_docker", "InvalidPathComponent"),
            ("____/____", "InvalidPathComponent"),
            ("dock..er/docker", "InvalidDomain"),
            ("dock_.er/docker", "InvalidDomain"),
            ("dock-.er/docker", "InvalidDomain"),
            ("dock___er/docker", "InvalidPathComponent"),
            ("docker///docker", "InvalidPathComponent"),
            ("docker/", "InvalidPathComponent"),
            ("/docker", "InvalidPathComponent"),
            ("docker.io/", "InvalidPathComponent"),
            ("docker.io/docker///docker", "InvalidPathComponent"),
            ("aa/asdf$$^/aa", "InvalidPathComponent"),
            ("a b", "InvalidPathComponent"),
            ("caf\u{e9}", "InvalidPathComponent"),
            (":justtag", "InvalidPathComponent"),
            ("[fc00::1]", "InvalidPathComponent"),
            ("[fc00::1]:5000", "InvalidPathComponent"),
            ("[2001:db8::1]:tag", "InvalidPathComponent"),
            ("localhost:5000/", "InvalidPathComponent"),
            ("nginx:", "InvalidTag"),
            ("nginx:-x", "InvalidTag"),
            ("nginx:.x", "InvalidTag"),
            ("nginx:a:b", "InvalidTag"),
            ("nginx:a/b", "InvalidDomain"),
            ("nginx:t\u{e9}", "InvalidTag"),
            ("docker.io/foo:bar/baz", "InvalidTag"),
            ("nginx@", "InvalidDigest"),
            ("nginx:1@", "InvalidDigest"),
            ("nginx@sha256", "InvalidDigest"),
            ("nginx@sha256:abc", "InvalidDigest"),
            ("repo@sha256:ffffffffffffffffffffffffffffffffff", "InvalidDigest"),
            ("validname@invaliddigest:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "InvalidDigest"),
            ("@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "InvalidPathComponent"),
            ("nginx@md5:d41d8cd98f00b204e9800998ecf8427e", "InvalidDigest"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b))
        .collect();
        let upper_hex = d.to_uppercase().replace("SHA256", "sha256");
        cases.push((format!("nginx@{upper_hex}"), "InvalidDigest"));
        cases.push((format!("nginx@{d}@{d}"), "InvalidDigest"));
        cases.push((format!("nginx@{d} "), "InvalidDigest"));

        for (input, want) in &cases {
            match Reference::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r}, wanted {want}"),
                Err(e) => {
                    assert_eq!(kind(&e), *want, "{input:?}: {e}");
                    let msg = e.to_string();
                    if !input.is_empty() {
                        assert!(msg.contains(&format!("{input:?}")), "{msg} names its input");
                    }
                }
            }
        }
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let e = Reference::parse("Nginx").unwrap_err();
        assert_eq!(
            e,
            ReferenceError::Uppercase {
                reference: "Nginx".into(),
                repository: "library/Nginx".into()
            }
        );
        assert!(
            e.to_string()
                .contains("repository name \"library/Nginx\" must be lowercase")
        );

        let e = Reference::parse(HEX).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot specify 64-byte hexadecimal strings")
        );

        let e = Reference::parse("nginx@sha256:abc").unwrap_err();
        let ReferenceError::InvalidDigest { digest, source, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(digest, "sha256:abc");
        assert!(matches!(source, DigestError::BadLength { actual: 3, .. }));
        assert!(std::error::Error::source(&e).is_some());

        let e = Reference::parse("a//b").unwrap_err();
        assert_eq!(
            e,
            ReferenceError::InvalidPathComponent {
                reference: "a//b".into(),
                component: String::new()
            }
        );
        let e = Reference::parse("host:x/a").unwrap_err();
        assert!(matches!(&e, ReferenceError::InvalidDomain { domain, .. } if domain == "host:x"));
        let e = Reference::parse("a:-b").unwrap_err();
        assert!(matches!(&e, ReferenceError::InvalidTag { tag, .. } if tag == "-b"));
        assert_eq!(
            Reference::parse("").unwrap_err().to_string(),
            "invalid reference format: the image reference is empty"
        );
    }

    #[test]
    fn repository_length_limit() {
        // The limit applies to the repository path (with `library/`), not the registry.
        let at_limit = format!("example.com:5000/{}", "a".repeat(MAX_REPOSITORY_LEN));
        assert_eq!(Reference::parse(&at_limit).unwrap().repository().len(), 255);
        let over = format!("example.com:5000/{}", "a".repeat(MAX_REPOSITORY_LEN + 1));
        assert!(matches!(
            Reference::parse(&over),
            Err(ReferenceError::NameTooLong { len: 256, .. })
        ));

        let official = "a".repeat(MAX_REPOSITORY_LEN - OFFICIAL_PREFIX.len());
        assert!(Reference::parse(&official).is_ok());
        assert!(matches!(
            Reference::parse(&format!("{official}a")),
            Err(ReferenceError::NameTooLong { len: 256, .. })
        ));

        // distribution/reference's own boundary cases: "a" has no '.', so this is a Docker
        // Hub path of 257 characters; with one "a/" less it is 255 and fits.
        let long = format!("{}a:tag", "a/".repeat(128));
        assert!(matches!(
            Reference::parse(&long),
            Err(ReferenceError::NameTooLong { len: 257, .. })
        ));
        let fits = format!("{}a:tag-puts-this-over-max", "a/".repeat(127));
        assert_eq!(Reference::parse(&fits).unwrap().repository().len(), 255);

        let ns = "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_".repeat(4);
        assert!(matches!(
            Reference::parse(&format!("{ns}x/docker")),
            Err(ReferenceError::NameTooLong { .. })
        ));
    }

    #[test]
    fn tags() {
        assert!(is_valid_tag("latest"));
        assert!(is_valid_tag("_"));
        assert!(is_valid_tag("0"));
        assert!(is_valid_tag("V1.2.3-rc.1_b"));
        assert!(is_valid_tag(&"a".repeat(MAX_TAG_LEN)));
        assert!(is_valid_tag(&format!("_{}", "-".repeat(MAX_TAG_LEN - 1))));
        assert!(!is_valid_tag(&"a".repeat(MAX_TAG_LEN + 1)));
        assert!(!is_valid_tag(""));
        assert!(!is_valid_tag(".a"));
        assert!(!is_valid_tag("-a"));
        assert!(!is_valid_tag("a:b"));
        assert!(!is_valid_tag("a b"));
        assert!(!is_valid_tag("a@b"));
        assert!(!is_valid_tag("\u{e9}"));
        assert!(!is_valid_tag("a\u{e9}"));

        let long = "t".repeat(MAX_TAG_LEN);
        assert_eq!(
            Reference::parse(&format!("nginx:{long}")).unwrap().tag(),
            Some(long.as_str())
        );
        assert!(matches!(
            Reference::parse(&format!("nginx:{long}t")),
            Err(ReferenceError::InvalidTag { .. })
        ));
    }

    #[test]
    fn with_tag() {
        let r = Reference::parse("nginx").unwrap();
        let t = r.with_tag("1.25-alpine").unwrap();
        assert_eq!(t.canonical(), "docker.io/library/nginx:1.25-alpine");
        assert_eq!(t.familiar(), "nginx:1.25-alpine");
        assert_eq!(t.name(), r.name());
        assert_eq!(t.with_tag("latest").unwrap(), r);

        let e = r.with_tag("-bad").unwrap_err();
        assert_eq!(
            e,
            ReferenceError::InvalidTag {
                reference: "docker.io/library/nginx:latest".into(),
                tag: "-bad".into()
            }
        );
        for bad in ["", "a:b", "a/b", ".x", &"x".repeat(129)] {
            assert!(r.with_tag(bad).is_err(), "{bad:?}");
        }

        // A digest is kept, as Docker's WithTag does.
        let d = sha(HEX);
        let r = Reference::parse(&format!("localhost:5000/a/b@{d}")).unwrap();
        let t = r.with_tag("v1").unwrap();
        assert_eq!(t.canonical(), format!("localhost:5000/a/b:v1@{d}"));
        assert_eq!(t.digest(), r.digest());
        assert_eq!(Reference::parse(&t.canonical()).unwrap(), t);
    }

    #[test]
    fn familiar_is_display_only() {
        // As in Docker, a Docker Hub namespace that looks like a host makes the familiar
        // form re-parse elsewhere; the canonical form does not.
        let r = Reference::parse("docker.io/my.org/app").unwrap();
        assert_eq!(r.familiar(), "my.org/app:latest");
        assert_eq!(
            Reference::parse(&r.familiar()).unwrap().registry(),
            "my.org"
        );
        assert_eq!(Reference::parse(&r.canonical()).unwrap(), r);
        let r = Reference::parse("docker.io/localhost/app").unwrap();
        assert_eq!(r.familiar(), "localhost/app:latest");
        assert_eq!(Reference::parse(&r.canonical()).unwrap(), r);
    }

    #[test]
    fn docker_quirk_rejected() {
        // Docker returns a reference with an empty domain for these; they are refused.
        for s in ["foo_bar.com/app", "a.b_c/x/y:1", "my__reg.io/app"] {
            assert!(
                matches!(
                    Reference::parse(s),
                    Err(ReferenceError::InvalidDomain { .. })
                ),
                "{s}"
            );
        }
    }

    #[test]
    fn equality_hash_and_serde() {
        use std::collections::HashSet;
        let same = [
            "nginx",
            "nginx:latest",
            "library/nginx",
            "docker.io/nginx:latest",
            "docker.io/library/nginx",
            "index.docker.io/library/nginx:latest",
        ];
        let set: HashSet<Reference> = same.iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(set.len(), 1);
        assert_ne!(
            Reference::parse("nginx").unwrap(),
            Reference::parse("nginx:1").unwrap()
        );

        let r = Reference::parse(&format!("app:1@{}", sha(HEX))).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("\"docker.io/library/app:1@{}\"", sha(HEX)));
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Reference>("\"nginx\"")
                .unwrap()
                .canonical(),
            "docker.io/library/nginx:latest"
        );
        assert!(serde_json::from_str::<Reference>("\"Nginx\"").is_err());
    }

    #[test]
    fn helpers() {
        for ok in [
            "a",
            "a0",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a.b_c__d-e--f",
        ] {
            assert!(is_valid_path_component(ok), "{ok}");
        }
        for bad in [
            "", "A", ".a", "a.", "a..b", "a._b", "a___b", "a_-b", "a-", "-a", "a/b",
        ] {
            assert!(!is_valid_path_component(bad), "{bad}");
        }
        for ok in [
            "a",
            "a.b",
            "A-1.b",
            "a:1",
            "a.b:65535",
            "[::1]",
            "[::1]:5",
            "1.2.3.4:0",
        ] {
            assert!(is_valid_domain(ok), "{ok}");
        }
        for bad in [
            "", "a.", ".a", "-a", "a-", "a:", "a:b", "[]", "[::1]:", "[x]", "a_b",
        ] {
            assert!(!is_valid_domain(bad), "{bad}");
        }
    }

    /// A valid path component (kept short so that four fit within the length limit).
    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}"
    }

    /// A registry that Docker recognises as one (has '.' or ':' or upper case, or is
    /// localhost), optionally with a port.
    fn registry() -> impl Strategy<Value = String> {
        let label = "[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?";
        let port = "(:[0-9]{1,5})?";
        let re = |pattern: String| proptest::string::string_regex(&pattern).unwrap();
        prop_oneof![
            re(format!("{label}(\\.{label}){{1,3}}{port}")),
            re(format!("{label}:[0-9]{{1,5}}")),
            re(format!("[A-Z]{label}{port}")),
            re(format!("localhost{port}")),
            re(format!(
                "\\[[0-9a-fA-F]{{0,4}}:[0-9a-fA-F:]{{0,12}}\\]{port}"
            )),
        ]
    }

    fn tag() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
    }

    fn digest() -> impl Strategy<Value = Digest> {
        proptest::collection::vec(any::<u8>(), 32)
            .prop_map(|b| Digest::from_raw(crate::digest::Algorithm::Sha256, &b).unwrap())
    }

    proptest! {
        #[test]
        fn generated_references_round_trip(
            registry in proptest::option::of(registry()),
            path in proptest::collection::vec(component(), 1..=4),
            tag in proptest::option::of(tag()),
            digest in proptest::option::of(digest()),
        ) {
            let mut input = String::new();
            if let Some(r) = &registry {
                input.push_str(r);
                input.push('/');
            }
            input.push_str(&path.join("/"));
            if let Some(t) = &tag {
                input.push(':');
                input.push_str(t);
            }
            if let Some(d) = &digest {
                input.push('@');
                input.push_str(&d.to_string());
            }

            // The model: which registry and repository Docker would pick.
            let (mut want_registry, want_path) = match &registry {
                Some(r) => (r.clone(), path.clone()),
                None if path.len() > 1 && (path[0].contains('.') || path[0] == "localhost") => {
                    (path[0].clone(), path[1..].to_vec())
                }
                None => ("docker.io".to_owned(), path.clone()),
            };
            if want_registry == "index.docker.io" {
                want_registry = "docker.io".to_owned();
            }
            let mut want_repository = want_path.join("/");
            if want_registry == "docker.io" && want_path.len() == 1 {
                want_repository = format!("library/{want_repository}");
            }
            let parsed = Reference::parse(&input);
            if registry.is_none() && want_registry != "docker.io" && want_registry.contains('_') {
                // A namespace with '.' and '_' is taken as a registry, and is not one.
                let is_domain_error = matches!(parsed, Err(ReferenceError::InvalidDomain { .. }));
                prop_assert!(is_domain_error, "{:?}", parsed);
                return Ok(());
            }
            let r = parsed.map_err(|e| TestCaseError::fail(format!("{input:?}: {e}")))?;
            prop_assert_eq!(r.registry(), want_registry.as_str());
            prop_assert_eq!(r.repository(), want_repository.as_str());
            let want_tag = match (&tag, &digest) {
                (None, None) => Some("latest"),
                (t, _) => t.as_deref(),
            };
            prop_assert_eq!(r.tag(), want_tag);
            prop_assert_eq!(r.digest(), digest.as_ref());

            let canonical = r.canonical();
            prop_assert_eq!(Reference::parse(&canonical), Ok(r.clone()));
            prop_assert_eq!(r.to_string(), canonical);
            // The familiar form re-parses to the same reference unless it is a Docker Hub
            // name whose namespace looks like a registry (Docker's own ambiguity).
            let familiar = r.familiar();
            let ambiguous = r.registry() == "docker.io"
                && familiar
                    .split_once('/')
                    .is_some_and(|(first, _)| first.contains('.') || first == "localhost");
            if !ambiguous {
                prop_assert_eq!(Reference::parse(&familiar), Ok(r.clone()));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic_and_normalise_idempotently(
            s in "[a-zA-Z0-9._:/@\\[\\]-]{0,40}|[ -~]{0,20}"
        ) {
            if let Ok(r) = Reference::parse(&s) {
                let canonical = r.canonical();
                prop_assert_eq!(Reference::parse(&canonical), Ok(r.clone()));
                prop_assert!(r.tag().is_some() || r.digest().is_some());
                prop_assert!(r.repository().len() <= MAX_REPOSITORY_LEN);
            }
        }
    }
}
