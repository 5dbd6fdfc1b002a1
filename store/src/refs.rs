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
