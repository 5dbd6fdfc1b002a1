//! Content digests: the [`Digest`] type, its [`Algorithm`], the strict OCI grammar, the
//! compact binary key used in the index, and the one-pass hashers that produce them.
//!
//! This module owns the mapping between digest strings (`sha256:<64 hex>`) and bytes. It
//! never accepts a digest it cannot verify: unknown algorithms, upper-case hex, wrong
//! lengths and stray characters are all rejected with a [`DigestError`] that says which.

use std::fmt;
use std::str::FromStr;

/// The hash algorithms a digest may use.
///
/// The discriminant is the algorithm byte written to disk (index keys and pack records);
/// it must never change for an existing variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Algorithm {
    /// SHA-256, the OCI default: `sha256:` followed by 64 lower-case hex digits.
    Sha256 = 1,
    /// SHA-512: `sha512:` followed by 128 lower-case hex digits.
    Sha512 = 2,
    /// BLAKE3 (256-bit output), registered on the image-spec main branch: `blake3:` + 64 hex.
    Blake3 = 3,
}

impl Algorithm {
    /// Every supported algorithm, in on-disk id order.
    pub const ALL: [Algorithm; 3] = [Algorithm::Sha256, Algorithm::Sha512, Algorithm::Blake3];

    /// The name used in digest strings (`sha256`, `sha512`, `blake3`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// Length of the raw hash in bytes.
    pub fn hash_len(self) -> usize {
        match self {
            Algorithm::Sha256 | Algorithm::Blake3 => 32,
            Algorithm::Sha512 => 64,
        }
    }

    /// The on-disk id byte.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The algorithm for an on-disk id byte.
    pub fn from_id(id: u8) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.id() == id)
    }

    /// The algorithm for a name as it appears before the `:` of a digest string.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a string or key is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The string has no `:` separating algorithm and hex.
    #[error("invalid digest {0:?}: expected ALGORITHM:HEX")]
    MissingSeparator(String),
    /// The algorithm is not one this store supports.
    #[error("unsupported digest algorithm {0:?} (supported: sha256, sha512, blake3)")]
    UnknownAlgorithm(String),
    /// The hex part has the wrong length for its algorithm.
    #[error("invalid {algorithm} digest: expected {expected} hex digits, got {actual}")]
    BadLength {
        /// The algorithm named by the digest.
        algorithm: Algorithm,
        /// Hex digits the algorithm needs.
        expected: usize,
        /// Hex digits given.
        actual: usize,
    },
    /// The hex part holds a character other than `0-9a-f`.
    #[error("invalid digest: character {character:?} at position {position} is not lower-case hex")]
    BadCharacter {
        /// The offending character.
        character: char,
        /// Its byte position in the hex part.
        position: usize,
    },
    /// A binary key is malformed (wrong length or unknown algorithm byte).
    #[error("invalid binary digest key of {0} bytes")]
    BadKey(usize),
}

/// A content digest: an algorithm and the hash it produced.
///
/// A value of this type is always valid ("parse, don't validate"). It is `Copy` and
/// compares and orders by (algorithm, hash bytes), which is also the order of its binary
/// [`key`](Digest::key) in the index.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    // The first `algorithm.hash_len()` bytes are the hash; the rest are zero.
    hash: [u8; 64],
}

/// Hashes the algorithm and the first 8 bytes of the hash only: they are already uniform,
/// and hash sets of millions of digests (the collector's mark) spend their time here.
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.hash[..8]);
        state.write_u64(u64::from_le_bytes(head) ^ u64::from(self.algorithm.id()));
    }
}

/// Largest binary key: one algorithm byte plus a 64-byte hash.
pub const MAX_KEY_LEN: usize = 65;

impl Digest {
    /// Builds a digest from an algorithm and raw hash bytes.
    ///
    /// Returns `None` when `hash` has the wrong length for `algorithm`.
    pub fn from_raw(algorithm: Algorithm, hash: &[u8]) -> Option<Digest> {
        if hash.len() != algorithm.hash_len() {
            return None;
        }
        let mut buf = [0u8; 64];
        buf[..hash.len()].copy_from_slice(hash);
        Some(Digest {
            algorithm,
            hash: buf,
        })
    }

    /// Parses `algorithm:hex` strictly: a known algorithm, exactly the right number of
    /// lower-case hex digits, nothing else.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex_part) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingSeparator(s.to_owned()))?;
        let algorithm =
            Algorithm::from_name(alg).ok_or_else(|| DigestError::UnknownAlgorithm(alg.into()))?;
        let expected = algorithm.hash_len() * 2;
        if let Some((position, character)) = hex_part
            .char_indices()
            .find(|&(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(DigestError::BadCharacter {
                character,
                position,
            });
        }
        if hex_part.len() != expected {
            return Err(DigestError::BadLength {
                algorithm,
                expected,
                actual: hex_part.len(),
            });
        }
        let mut hash = [0u8; 64];
        hex::decode_to_slice(hex_part, &mut hash[..algorithm.hash_len()]).map_err(|_| {
            DigestError::BadLength {
                algorithm,
                expected,
                actual: hex_part.len(),
            }
        })?;
        Ok(Digest { algorithm, hash })
    }

    /// Hashes `data` with `algorithm`.
    pub fn compute(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The raw hash bytes.
    pub fn hash(&self) -> &[u8] {
        &self.hash[..self.algorithm.hash_len()]
    }

    /// The lower-case hex of the hash (the part after `:`).
    pub fn hex(&self) -> String {
        hex::encode(self.hash())
    }

    /// The compact binary form used as an index key: the algorithm byte, then the hash.
    pub fn key(&self) -> DigestKey {
        let mut buf = [0u8; MAX_KEY_LEN];
        buf[0] = self.algorithm.id();
        let n = self.algorithm.hash_len();
        buf[1..=n].copy_from_slice(self.hash());
        DigestKey { buf, len: n + 1 }
    }

    /// Decodes a binary key made by [`Digest::key`].
    pub fn from_key(key: &[u8]) -> Result<Digest, DigestError> {
        let (&id, hash) = key.split_first().ok_or(DigestError::BadKey(0))?;
        let algorithm = Algorithm::from_id(id).ok_or(DigestError::BadKey(key.len()))?;
        Digest::from_raw(algorithm, hash).ok_or(DigestError::BadKey(key.len()))
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The binary index key of a digest (at most [`MAX_KEY_LEN`] bytes, no allocation).
#[derive(Clone, Copy)]
pub struct DigestKey {
    buf: [u8; MAX_KEY_LEN],
    len: usize,
}

impl std::ops::Deref for DigestKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// An incremental hasher for any [`Algorithm`]. Its SHA-2 state can be saved and
/// restored (within the crate), which a resumed upload uses.
#[derive(Clone)]
pub struct Hasher(Inner);

#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // SHA-2, the common case, stays inline.
enum Inner {
    Sha2(crate::resumable::Sha2),
    /// Boxed: it is large.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Hasher {
        Hasher(match crate::resumable::Sha2::new(algorithm) {
            Some(h) => Inner::Sha2(h),
            None => Inner::Blake3(Box::default()),
        })
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            Inner::Sha2(h) => h.update(data),
            Inner::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self.0 {
            Inner::Sha2(h) => h.finish(),
            Inner::Blake3(h) => digest_of(Algorithm::Blake3, h.finalize().as_bytes()),
        }
    }
}

fn digest_of(algorithm: Algorithm, hash: &[u8]) -> Digest {
    Digest::from_raw(algorithm, hash).expect("hash output has the algorithm's length")
}

/// Chunk size for one-pass hashing: small enough that a chunk is still in L1/L2 when the
/// second hash (`blake3`) reads it after the first (the OCI digest).
pub const HASH_CHUNK: usize = 64 * 1024;

/// Above this size a blob's two hashes run on two cores (`rayon::join` per block) instead of
/// interleaved on one.
const PARALLEL_HASH_MIN: usize = 1024 * 1024;

/// Both hashes the store keeps for a blob: its OCI digest and the blake3 of its stored
/// bytes (the fast integrity check).
#[derive(Clone)]
pub struct DualHasher {
    oci: Hasher,
    check: blake3::Hasher,
    /// Whether `check` saw every byte (false after [`DualHasher::resume`]: a blake3 state
    /// cannot be saved, so a resumed hasher knows only the OCI digest's).
    check_whole: bool,
    len: u64,
}

impl DualHasher {
    /// A fresh pair: `algorithm` for the OCI digest plus blake3.
    pub fn new(algorithm: Algorithm) -> DualHasher {
        DualHasher {
            oci: Hasher::new(algorithm),
            check: blake3::Hasher::new(),
            check_whole: true,
            len: 0,
        }
    }

    /// The OCI hash's state, to [`DualHasher::resume`] from later; `None` if its
    /// algorithm's state cannot be saved (blake3).
    pub(crate) fn save(&self) -> Option<crate::resumable::SavedSha2> {
        match &self.oci.0 {
            Inner::Sha2(h) => Some(h.save()),
            Inner::Blake3(_) => None,
        }
    }

    /// A hasher that goes on from a saved OCI state. Its blake3 misses the bytes before
    /// the save: [`DualHasher::finish_partial`] reports it as unknown. `None` if the
    /// state is malformed.
    pub(crate) fn resume(saved: &crate::resumable::SavedSha2) -> Option<DualHasher> {
        let h = crate::resumable::Sha2::restore(saved)?;
        Some(DualHasher {
            len: h.len(),
            oci: Hasher(Inner::Sha2(h)),
            check: blake3::Hasher::new(),
            check_whole: false,
        })
    }

    /// Feeds bytes to both hashes, chunk by chunk while each chunk is hot in cache; a
    /// large input runs the two hashes on two cores when one is free.
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        if data.len() >= PARALLEL_HASH_MIN {
            for block in data.chunks(PARALLEL_HASH_MIN) {
                let (oci, check) = (&mut self.oci, &mut self.check);
                rayon::join(
                    || {
                        for c in block.chunks(HASH_CHUNK) {
                            oci.update(c);
                        }
                    },
                    || {
                        check.update(block);
                    },
                );
            }
        } else {
            for c in data.chunks(HASH_CHUNK) {
                self.oci.update(c);
                self.check.update(c);
            }
        }
    }

    /// Feeds one chunk while the calling thread runs `here` (say, reading the next
    /// chunk of a stream that cannot leave this thread): the OCI hash runs on one pool
    /// thread, blake3 and then `beside` (say, writing the chunk out) on another.
    pub fn update_overlapped<A: Send, B>(
        &mut self,
        data: &[u8],
        beside: impl FnOnce() -> A + Send,
        here: impl FnOnce() -> B,
    ) -> (A, B) {
        self.len += data.len() as u64;
        let (oci, check) = (&mut self.oci, &mut self.check);
        let mut a = None;
        let b = rayon::in_place_scope(|s| {
            s.spawn(|_| {
                for c in data.chunks(HASH_CHUNK) {
                    oci.update(c);
                }
            });
            s.spawn(|_| {
                check.update(data);
                a = Some(beside());
            });
            here()
        });
        (a.expect("the scope ran the task"), b)
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The OCI digest and the blake3 of everything fed.
    ///
    /// # Panics
    /// If the hasher was resumed (its blake3 is unknown; see [`DualHasher::finish_partial`]).
    pub fn finish(self) -> (Digest, [u8; 32]) {
        let (d, b) = self.finish_partial();
        (
            d,
            b.expect("finish of a resumed hasher: its blake3 is unknown"),
        )
    }

    /// The OCI digest, and the blake3 of everything fed if the hasher saw all of it.
    pub fn finish_partial(self) -> (Digest, Option<[u8; 32]>) {
        let check = self.check_whole.then(|| *self.check.finalize().as_bytes());
        (self.oci.finish(), check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_canonically() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(d, Digest::compute(Algorithm::Sha256, b""));
        let k = d.key();
        assert_eq!(k.len(), 33);
        assert_eq!(Digest::from_key(&k).unwrap(), d);
    }

    #[test]
    fn rejects_bad_digests() {
        let upper = EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256");
        assert!(matches!(
            Digest::parse(&upper),
            Err(DigestError::BadCharacter { .. })
        ));
        assert!(matches!(
            Digest::parse("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(DigestError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            Digest::parse("sha256:abc"),
            Err(DigestError::BadLength {
                expected: 64,
                actual: 3,
                ..
            })
        ));
        assert!(matches!(
            Digest::parse("sha256"),
            Err(DigestError::MissingSeparator(_))
        ));
        assert!(Digest::parse(&format!("{EMPTY_SHA256} ")).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert!(Digest::parse(&format!("blake3:{}", "0".repeat(64))).is_ok());
        assert!(Digest::from_key(&[9; 33]).is_err());
        assert!(Digest::from_key(&[1; 32]).is_err());
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            Digest::compute(Algorithm::Blake3, b"").hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            &Digest::compute(Algorithm::Sha512, b"abc").hex()[..16],
            "ddaf35a193617aba"
        );
    }

    #[test]
    fn dual_hasher_matches_one_shot_for_every_split() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let want = Digest::compute(Algorithm::Sha256, &data);
        let want_b3 = *blake3::hash(&data).as_bytes();
        for split in [0, 1, 65_536, 1_048_576, 2_999_999] {
            let mut h = DualHasher::new(Algorithm::Sha256);
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.len(), data.len() as u64);
            assert_eq!(h.finish(), (want, want_b3));
        }
    }

    proptest::proptest! {
        #[test]
        fn display_parse_round_trip(bytes in proptest::collection::vec(0u8..=255, 32)) {
            let d = Digest::from_raw(Algorithm::Sha256, &bytes).unwrap();
            proptest::prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
            proptest::prop_assert_eq!(Digest::from_key(&d.key()).unwrap(), d);
        }
    }
}
