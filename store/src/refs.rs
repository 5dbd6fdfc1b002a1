//! Roots of the graph: names (tags), containers and leases, as [`Store`] methods.
//!
//! This module owns the rules for what may be named and used: a name or a container
//! points at a stored manifest or index; removing the last name of an image that a
//! container uses is refused unless forced; every change refreshes the target's `touched`
//! time inside the write transaction that makes it. It never deletes blobs: that is the
//! collector's job.

use std::time::Duration;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::meta::{ContainerRecord, LeaseRecord, Op, PutOp};
use crate::reference::Reference;
use crate::store::Store;

/// A referrer of an image as the OCI referrers API lists it: the descriptor of a stored
/// manifest or index whose `subject` is the image ([`Store::referrer_descriptors`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerDescriptor {
    /// The referrer's `mediaType`.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its `artifactType`, else (for an image manifest) its config's `mediaType`, as the
    /// distribution spec says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its `annotations`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A lease and the blobs it holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// The lease record.
    #[serde(flatten)]
    pub record: LeaseRecord,
    /// Digests it protects.
    pub resources: Vec<Digest>,
}

impl Store {
    /// Points `reference` (a tag reference, normalised the way Docker does) at a stored
    /// manifest or index. Returns the normalised reference.
    pub fn tag(&self, reference: &str, target: &Digest) -> Result<Reference> {
        let r = Reference::parse(reference)?;
        if r.digest().is_some() {
            return Err(Error::Invalid(format!(
                "cannot tag with a digest reference: {reference}"
            )));
        }
        self.inner.meta.submit(Op::Put(PutOp {
            names: vec![(r.canonical(), *target)],
            ..PutOp::default()
        }))?;
        Ok(r)
    }

    /// Sets many names in one commit (all or none: every target must be a stored image).
    pub fn tag_many(&self, names: &[(&str, Digest)]) -> Result<()> {
        let names = names
            .iter()
            .map(|(n, d)| {
                let r = Reference::parse(n)?;
                if r.digest().is_some() {
                    return Err(Error::Invalid(format!(
                        "cannot tag with a digest reference: {n}"
                    )));
                }
                Ok((r.canonical(), *d))
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner.meta.submit(Op::Put(PutOp {
            names,
            ..PutOp::default()
        }))?;
        Ok(())
    }

    /// Resolves a reference to the digest it names: a bare digest (`sha256:...`) or a
    /// reference with a digest must be stored; a name must exist.
    pub fn resolve(&self, reference: &str) -> Result<Digest> {
        if let Ok(d) = Digest::parse(reference) {
            return if self.contains(&d)? {
                Ok(d)
            } else {
                Err(Error::NotFound(d))
            };
        }
        let r = Reference::parse(reference)?;
        if let Some(d) = r.digest() {
            return if self.contains(d)? {
                Ok(*d)
            } else {
                Err(Error::NotFound(*d))
            };
        }
        self.inner
            .meta
            .name(&r.canonical())?
            .ok_or_else(|| Error::NameNotFound(r.familiar()))
    }

    /// Every name and the image it points at, in name order.
    pub fn names(&self) -> Result<Vec<(String, Digest)>> {
        self.inner.meta.names()
    }

    /// The tags of one repository and what each points at, in tag order (a registry's
    /// tag list). `repository` is normalised as Docker does (`alpine` is
    /// `docker.io/library/alpine`) and must carry no tag or digest. One range scan.
    pub fn tags(&self, repository: &str) -> Result<Vec<(String, Digest)>> {
        let last = repository.rsplit('/').next().unwrap_or(repository);
        if last.contains(':') || last.contains('@') {
            return Err(Error::Invalid(format!(
                "{repository:?} names a tag or digest; give the repository alone"
            )));
        }
        let name = Reference::parse(repository)?.name();
        let start = format!("{name}:");
        let txn = self.inner.meta.read()?;
        let t = redb::ReadTransaction::open_table(&txn, crate::meta::NAMES)?;
        let mut out = Vec::new();
        for r in redb::ReadableTable::range::<&str>(&t, start.as_str()..)? {
            let (k, v) = r?;
            let Some(tag) = k.value().strip_prefix(start.as_str()) else {
                break;
            };
            // `name:tag@digest` forms list under their tag.
            let tag = tag.split('@').next().unwrap_or(tag);
            out.push((tag.to_owned(), Digest::from_key(v.value())?));
        }
        Ok(out)
    }

    /// The repositories (canonical `registry/repository`) that have a name starting with
    /// `prefix`, each once, in order (a registry's catalog; `""` for all).
    pub fn repositories(&self, prefix: &str) -> Result<Vec<String>> {
        let txn = self.inner.meta.read()?;
        let t = redb::ReadTransaction::open_table(&txn, crate::meta::NAMES)?;
        let mut out = std::collections::BTreeSet::new();
        for r in redb::ReadableTable::range::<&str>(&t, prefix..)? {
            let (k, _) = r?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            // The repository ends at the tag's ':' or the digest's '@' after the last '/'.
            let slash = k.rfind('/').map_or(0, |i| i + 1);
            let end = k[slash..].find([':', '@']).map_or(k.len(), |i| slash + i);
            out.insert(k[..end].to_owned());
        }
        Ok(out.into_iter().collect())
    }

    /// Removes a name (`rmi`). Given a digest (or `name@digest`), removes every name that
    /// points at it. Refuses, with [`Error::InUse`], to remove the last name of an image a
    /// container uses, unless `force`: then only the name goes, and the container keeps
    /// the image alive. Blobs are never deleted here (see `gc`). Returns what was untagged.
    pub fn remove_image(&self, reference: &str, force: bool) -> Result<Vec<(String, Digest)>> {
        let by_digest = Digest::parse(reference).ok().or_else(|| {
            Reference::parse(reference)
                .ok()
                .and_then(|r| r.digest().copied())
        });
        let names = match by_digest {
            Some(d) => {
                let names: Vec<String> = self
                    .names()?
                    .into_iter()
                    .filter(|(_, t)| *t == d)
                    .map(|(n, _)| n)
                    .collect();
                if names.is_empty() {
                    return Err(Error::NameNotFound(reference.to_owned()));
                }
                names
            }
            None => vec![Reference::parse(reference)?.canonical()],
        };
        let o = self.inner.freeing(|| Op::Untag {
            names: names.clone(),
            force,
        })?;
        Ok(o.untagged)
    }

    /// Creates a container using the image `image` (a name or digest) and returns it. The
    /// name defaults to the first 12 digits of the id; names are unique.
    pub fn container_create(&self, image: &str, name: Option<&str>) -> Result<ContainerRecord> {
        let digest = self.resolve(image)?;
        let id = new_id("container");
        let name = name.map_or_else(|| id[..12].to_owned(), str::to_owned);
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(format!("container name {name:?}")));
        }
        let rec = ContainerRecord {
            id,
            image: digest,
            name,
            image_ref: image.to_owned(),
            created_ms: crate::sys::now_ms(),
        };
        self.inner.meta.submit(Op::ContainerCreate(rec.clone()))?;
        Ok(rec)
    }

    /// Removes a container given its id, a unique id prefix (at least 4 digits), or its
    /// name. Returns the removed record.
    pub fn container_remove(&self, id_or_name: &str) -> Result<ContainerRecord> {
        let rec = self.find_container(id_or_name)?;
        self.inner.freeing(|| Op::ContainerRemove(rec.id.clone()))?;
        Ok(rec)
    }

    /// Every container.
    pub fn containers(&self) -> Result<Vec<ContainerRecord>> {
        self.inner.meta.containers()
    }

    fn find_container(&self, key: &str) -> Result<ContainerRecord> {
        let all = self.containers()?;
        if let Some(c) = all.iter().find(|c| c.id == key || c.name == key) {
            return Ok(c.clone());
        }
        let matches: Vec<&ContainerRecord> = all
            .iter()
            .filter(|c| key.len() >= 4 && c.id.starts_with(key))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::ContainerNotFound(key.to_owned())),
            _ => Err(Error::Invalid(format!(
                "container id prefix {key:?} is ambiguous"
            ))),
        }
    }

    /// Creates a lease that expires after `expire` (never, when `None`).
    pub fn lease_create(&self, expire: Option<Duration>) -> Result<LeaseRecord> {
        let now = crate::sys::now_ms();
        let rec = LeaseRecord {
            id: new_id("lease")[..16].to_owned(),
            created_ms: now,
            expires_ms: expire.map(|d| now.saturating_add(crate::sys::millis(d))),
        };
        self.inner.meta.submit(Op::LeaseCreate(rec.clone()))?;
        Ok(rec)
    }

    /// Adds blobs to a lease: they are protected until it ends, stored yet or not.
    pub fn lease_add(&self, id: &str, digests: &[Digest]) -> Result<()> {
        self.inner.meta.submit(Op::Put(PutOp {
            touch: digests.to_vec(),
            lease: Some(id.to_owned()),
            ..PutOp::default()
        }))?;
        Ok(())
    }

    /// Removes a lease; what it alone protected becomes collectable.
    pub fn lease_remove(&self, id: &str) -> Result<()> {
        self.inner.freeing(|| Op::LeaseRemove(id.to_owned()))?;
        Ok(())
    }

    /// Every lease with its resources.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        Ok(self
            .inner
            .meta
            .leases()?
            .into_iter()
            .map(|(record, resources)| Lease { record, resources })
            .collect())
    }

    /// `(refcount, holds)` of a digest: how many stored parents name it, and how many
    /// names, containers and lease entries hold it.
    pub fn counts(&self, d: &Digest) -> Result<(u64, u64)> {
        self.inner.meta.counts(d)
    }

    /// The referrers (manifests whose `subject` is `d`: signatures, SBOMs) stored for `d`.
    pub fn referrers(&self, d: &Digest) -> Result<Vec<Digest>> {
        let txn = self.inner.meta.read()?;
        crate::meta::Meta::referrers(&txn, d)
    }

    /// The referrers of `subject` as descriptors (the OCI referrers API's answer),
    /// optionally only those of `artifact_type`, in digest order. Each is read from the
    /// stored manifest (small JSON, from the mapping); a referrer collected meanwhile is
    /// left out.
    pub fn referrer_descriptors(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerDescriptor>> {
        let mut out = Vec::new();
        for d in self.referrers(subject)? {
            let bytes = match self.get(&d) {
                Ok(b) => b,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("stored referrer {d} is not JSON: {e}")))?;
            let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            let kind = self.stat(&d)?.map(|i| i.kind);
            let media_type = text(&v["mediaType"]).unwrap_or_else(|| {
                match kind {
                    Some(crate::Kind::Index) => crate::image::media::OCI_INDEX,
                    _ => crate::image::media::OCI_MANIFEST,
                }
                .to_owned()
            });
            let found = text(&v["artifactType"]).or_else(|| text(&v["config"]["mediaType"]));
            if artifact_type.is_some_and(|want| found.as_deref() != Some(want)) {
                continue;
            }
            let annotations = v["annotations"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(ReferrerDescriptor {
                media_type,
                digest: d,
                size: bytes.len() as u64,
                artifact_type: found,
                annotations,
            });
        }
        Ok(out)
    }

    /// The children a stored manifest or index names (its edges).
    pub fn children(&self, d: &Digest) -> Result<Vec<Digest>> {
        let txn = self.inner.meta.read()?;
        crate::meta::Meta::children(&txn, d)
    }
}

/// A fresh random-looking 64-hex id (blake3 of time, process, a counter and a stack
/// address; unique per store, not a secret).
fn new_id(domain: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(domain.as_bytes());
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(
        &SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    let local = 0u8;
    h.update(&(std::ptr::addr_of!(local) as u64).to_le_bytes());
    h.finalize().to_hex().to_string()
}
