//! What the store holds, seen as images: the image list (`store images`), one image's
//! details (`store inspect`) and disk usage (`store df`).
//!
//! This module owns read-only views computed from names, containers, edges and blob
//! sizes on one read snapshot. It never changes the store.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::Kind;
use crate::image::{self, Child, ConfigInfo};
use crate::meta::Meta;
use crate::reference::Reference;
use crate::store::Store;

/// One named image (`store images`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageSummary {
    /// The name, in Docker's short form (`nginx:latest`).
    pub name: String,
    /// The canonical name (`docker.io/library/nginx:latest`).
    pub canonical: String,
    /// The manifest or index digest.
    pub digest: Digest,
    /// `manifest` or `index`.
    pub kind: Kind,
    /// Bytes of all stored blobs the image reaches (each once).
    pub size: u64,
    /// The config's creation time, as written (for an index, its first manifest's).
    pub created: Option<String>,
    /// Containers using the image (ids).
    pub containers: Vec<String>,
}

/// One image in detail (`store inspect`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageDetails {
    /// The digest.
    pub digest: Digest,
    /// `manifest` or `index`.
    pub kind: Kind,
    /// The manifest's or index's media type, when it declares one.
    pub media_type: Option<String>,
    /// Names pointing at it.
    pub names: Vec<String>,
    /// The manifest or index JSON as stored.
    pub manifest: serde_json::Value,
    /// For a manifest: its config descriptor.
    pub config: Option<Child>,
    /// For a manifest: the parsed config fields.
    pub config_info: Option<ConfigInfo>,
    /// For a manifest: its layers.
    pub layers: Vec<Child>,
    /// For an index: its manifests with their platforms.
    pub platforms: Vec<Child>,
    /// Children not in the store.
    pub missing: Vec<Digest>,
    /// Bytes of all stored blobs the image reaches.
    pub size: u64,
    /// Containers using it.
    pub containers: Vec<String>,
}

/// Disk usage of one image (`store df`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageUsage {
    /// Its names (short form).
    pub names: Vec<String>,
    /// The digest.
    pub digest: Digest,
    /// Bytes it reaches.
    pub size: u64,
    /// Of which also reached by another image.
    pub shared: u64,
    /// Of which reached by no other image.
    pub unique: u64,
    /// Containers using it.
    pub containers: usize,
}

/// Disk usage of one layer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerUsage {
    /// The digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// How many images use it.
    pub images: usize,
}

/// Disk usage (`store df`), in the manner of `docker system df -v`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiskUsage {
    /// Per image.
    pub images: Vec<ImageUsage>,
    /// Per layer.
    pub layers: Vec<LayerUsage>,
    /// Number of containers.
    pub containers: usize,
    /// Bytes of all blobs in the store.
    pub total: u64,
    /// Bytes reached by more than one image.
    pub shared: u64,
    /// Bytes reached by exactly one image.
    pub unique: u64,
    /// Bytes not reached from any container's image or lease: what `gc` would free if
    /// every image no container uses were removed.
    pub reclaimable: u64,
}

impl Store {
    /// Reachable stored blobs and their sizes, on one snapshot.
    fn reach(txn: &redb::ReadTransaction, root: &Digest) -> Result<HashMap<Digest, u64>> {
        let mut out = HashMap::new();
        let mut queue = vec![*root];
        while let Some(d) = queue.pop() {
            if out.contains_key(&d) {
                continue;
            }
            if let Some(e) = Meta::entry(txn, &d)? {
                out.insert(d, e.size);
                queue.extend(Meta::children(txn, &d)?);
            }
        }
        Ok(out)
    }

    fn created_of(&self, d: &Digest) -> Result<Option<String>> {
        let m = self.get(d)?;
        let p = image::parse(&m)?;
        let manifest = match p.kind {
            Kind::Index => match p.children.first() {
                Some(c) if self.contains(&c.digest)? => {
                    let m = self.get(&c.digest)?;
                    image::parse(&m)?
                }
                _ => return Ok(None),
            },
            _ => p,
        };
        match manifest.config() {
            Some(c) if self.contains(&c.digest)? => Ok(image::parse_config(&self.get(&c.digest)?)
                .ok()
                .and_then(|i| i.created)),
            _ => Ok(None),
        }
    }

    /// Every named image, in name order.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let names = self.names()?;
        let containers = self.containers()?;
        let txn = self.inner.meta.read()?;
        let mut cache: HashMap<Digest, (u64, Option<String>, Kind)> = HashMap::new();
        let mut out = Vec::with_capacity(names.len());
        for (name, d) in names {
            if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(d) {
                let size = Self::reach(&txn, &d)?.values().sum();
                let kind = Meta::entry(&txn, &d)?.map_or(Kind::Other, |e| e.kind);
                slot.insert((size, self.created_of(&d)?, kind));
            }
            let (size, created, kind) = cache[&d].clone();
            let familiar = Reference::parse(&name).map_or_else(|_| name.clone(), |r| r.familiar());
            out.push(ImageSummary {
                name: familiar,
                canonical: name,
                digest: d,
                kind,
                size,
                created,
                containers: containers
                    .iter()
                    .filter(|c| c.image == d)
                    .map(|c| c.id.clone())
                    .collect(),
            });
        }
        Ok(out)
    }

    /// One image in detail.
    pub fn inspect(&self, reference: &str) -> Result<ImageDetails> {
        let d = self.resolve(reference)?;
        let bytes = self.get(&d)?;
        let p = image::parse(&bytes)?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(e.to_string()))?;
        let txn = self.inner.meta.read()?;
        let size = Self::reach(&txn, &d)?.values().sum();
        let mut missing = Vec::new();
        for c in &p.children {
            if Meta::entry(&txn, &c.digest)?.is_none() {
                missing.push(c.digest);
            }
        }
        let config_info = match p.config() {
            Some(c) if !missing.contains(&c.digest) => {
                Some(image::parse_config(&self.get(&c.digest)?)?)
            }
            _ => None,
        };
        let names = self
            .names()?
            .into_iter()
            .filter(|(_, t)| *t == d)
            .map(|(n, _)| n)
            .collect();
        Ok(ImageDetails {
            digest: d,
            kind: p.kind,
            media_type: p.media_type.clone(),
            names,
            manifest,
            config: p.config().cloned(),
            config_info,
            layers: p.layers().to_vec(),
            platforms: if p.kind == Kind::Index {
                p.children.clone()
            } else {
                Vec::new()
            },
            missing,
            size,
            containers: self
                .containers()?
                .into_iter()
                .filter(|c| c.image == d)
                .map(|c| c.id)
                .collect(),
        })
    }

    /// Disk usage by image and layer.
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let names = self.names()?;
        let containers = self.containers()?;
        let leases = self.leases()?;
        let txn = self.inner.meta.read()?;
        let mut by_image: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
        for (n, d) in &names {
            let f = Reference::parse(n).map_or_else(|_| n.clone(), |r| r.familiar());
            by_image.entry(*d).or_default().push(f);
        }
        for c in &containers {
            by_image.entry(c.image).or_default();
        }
        let mut reach: BTreeMap<Digest, HashMap<Digest, u64>> = BTreeMap::new();
        let mut users: HashMap<Digest, usize> = HashMap::new();
        for d in by_image.keys() {
            let r = Self::reach(&txn, d)?;
            for b in r.keys() {
                *users.entry(*b).or_default() += 1;
            }
            reach.insert(*d, r);
        }
        let mut images = Vec::new();
        for (d, names) in &by_image {
            let r = &reach[d];
            let (mut shared, mut unique) = (0, 0);
            for (b, s) in r {
                if users[b] > 1 {
                    shared += s;
                } else {
                    unique += s;
                }
            }
            images.push(ImageUsage {
                names: names.clone(),
                digest: *d,
                size: shared + unique,
                shared,
                unique,
                containers: containers.iter().filter(|c| c.image == *d).count(),
            });
        }
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        for r in reach.values() {
            sizes.extend(r.iter().map(|(k, v)| (*k, *v)));
        }
        let mut layers: Vec<LayerUsage> = Vec::new();
        for (b, n) in &users {
            if Meta::entry(&txn, b)?.is_some_and(|e| e.kind == Kind::Layer) {
                layers.push(LayerUsage {
                    digest: *b,
                    size: sizes[b],
                    images: *n,
                });
            }
        }
        layers.sort_by(|a, b| b.size.cmp(&a.size).then(a.digest.cmp(&b.digest)));
        let shared = users
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(b, _)| sizes[b])
            .sum();
        let unique = users
            .iter()
            .filter(|(_, n)| **n == 1)
            .map(|(b, _)| sizes[b])
            .sum();
        // In use: what containers' images and leases reach.
        let mut in_use: HashSet<Digest> = HashSet::new();
        for c in &containers {
            in_use.extend(reach[&c.image].keys().copied());
        }
        for l in &leases {
            for d in &l.resources {
                in_use.extend(Self::reach(&txn, d)?.keys().copied());
            }
        }
        let total = self.info()?.bytes;
        let used: u64 = in_use
            .iter()
            .filter_map(|d| Meta::entry(&txn, d).ok().flatten().map(|e| e.size))
            .sum();
        Ok(DiskUsage {
            images,
            layers,
            containers: containers.len(),
            total,
            shared,
            unique,
            reclaimable: total.saturating_sub(used),
        })
    }
}
