//! SHA-256 and SHA-512 whose state can be saved and restored, so that a resumed upload
//! continues hashing where it stopped instead of re-reading everything it wrote.
//!
//! This module owns only the Merkle–Damgård framing (block buffering, padding, length)
//! around sha2's block functions (`compress256` / `compress512`, the same code, and the
//! same SHA-NI / AVX2 paths, that `sha2::Sha256` runs). It never decides what is trusted:
//! a restored state is only as good as the file it came from, and a caller that restores
//! one must hold the bytes it stands for (the upload's durable data).

use sha2::digest::consts::{U64, U128};
use sha2::digest::generic_array::{ArrayLength, GenericArray};

use crate::digest::{Algorithm, Digest};

const H256: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];
const H512: [u64; 8] = [
    0x6a09_e667_f3bc_c908,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x9b05_688c_2b3e_6c1f,
    0x1f83_d9ab_fb41_bd6b,
    0x5be0_cd19_137e_2179,
];

#[derive(Clone, Copy)]
enum Words {
    S256([u32; 8]),
    S512([u64; 8]),
}

/// An incremental SHA-256 or SHA-512 with a [`Sha2::save`]able state.
#[derive(Clone)]
pub struct Sha2 {
    words: Words,
    /// Bytes fed but not yet compressed: always fewer than one block.
    tail: [u8; 128],
    tail_len: usize,
    len: u64,
}

/// The saved state of a [`Sha2`]: what [`Sha2::restore`] needs to go on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSha2 {
    /// `sha256` or `sha512`.
    pub algorithm: String,
    /// Bytes hashed.
    pub len: u64,
    /// The chaining value, big-endian hex.
    pub state: String,
    /// The bytes of the last partial block, hex.
    pub tail: String,
}

impl Sha2 {
    /// A fresh hasher, or `None` for an algorithm that is not SHA-2.
    pub fn new(algorithm: Algorithm) -> Option<Sha2> {
        let words = match algorithm {
            Algorithm::Sha256 => Words::S256(H256),
            Algorithm::Sha512 => Words::S512(H512),
            Algorithm::Blake3 => return None,
        };
        Some(Sha2 {
            words,
            tail: [0; 128],
            tail_len: 0,
            len: 0,
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self.words {
            Words::S256(_) => Algorithm::Sha256,
            Words::S512(_) => Algorithm::Sha512,
        }
    }

    fn block_len(&self) -> usize {
        match self.words {
            Words::S256(_) => 64,
            Words::S512(_) => 128,
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Feeds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        let bl = self.block_len();
        if self.tail_len > 0 {
            let take = (bl - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < bl {
                return;
            }
            let block = self.tail;
            self.compress(&block[..bl]);
            self.tail_len = 0;
        }
        let whole = data.len() / bl * bl;
        self.compress(&data[..whole]);
        let rest = &data[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// Runs the block function over `bytes` (a whole number of blocks) in one call.
    fn compress(&mut self, bytes: &[u8]) {
        match &mut self.words {
            Words::S256(h) => sha2::compress256(h, as_blocks::<U64>(bytes)),
            Words::S512(h) => sha2::compress512(h, as_blocks::<U128>(bytes)),
        }
    }

    /// The digest of everything fed.
    pub fn finish(mut self) -> Digest {
        let bl = self.block_len();
        let bits = u128::from(self.len) * 8;
        // Padding: 0x80, zeros, then the length in bits (8 bytes for SHA-256, 16 for
        // SHA-512) ending a block.
        let len_bytes = bl / 8;
        let mut pad = [0u8; 256];
        pad[0] = 0x80;
        let used = self.tail_len + 1;
        let zeros = (bl + bl - len_bytes - used % bl) % bl;
        let n = 1 + zeros;
        let be = bits.to_be_bytes();
        pad[n..n + len_bytes].copy_from_slice(&be[16 - len_bytes..]);
        let len = self.len;
        self.update(&pad[..n + len_bytes]);
        self.len = len;
        debug_assert_eq!(self.tail_len, 0);
        let mut out = [0u8; 64];
        let out = match self.words {
            Words::S256(h) => {
                for (o, w) in out.chunks_exact_mut(4).zip(h) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
                &out[..32]
            }
            Words::S512(h) => {
                for (o, w) in out.chunks_exact_mut(8).zip(h) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
                &out[..]
            }
        };
        Digest::from_raw(self.algorithm(), out).expect("a SHA-2 output has its length")
    }

    /// The state, to go on later from exactly here.
    pub fn save(&self) -> SavedSha2 {
        let state: Vec<u8> = match self.words {
            Words::S256(h) => h.iter().flat_map(|w| w.to_be_bytes()).collect(),
            Words::S512(h) => h.iter().flat_map(|w| w.to_be_bytes()).collect(),
        };
        SavedSha2 {
            algorithm: self.algorithm().name().to_owned(),
            len: self.len,
            state: hex::encode(state),
            tail: hex::encode(&self.tail[..self.tail_len]),
        }
    }

    /// A hasher that goes on from a saved state; `None` if the state is malformed (wrong
    /// algorithm name, lengths or hex).
    pub fn restore(s: &SavedSha2) -> Option<Sha2> {
        let algorithm = Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s.algorithm)?;
        let mut h = Sha2::new(algorithm)?;
        let tail = hex::decode(&s.tail).ok()?;
        if tail.len() as u64 != s.len % h.block_len() as u64 {
            return None;
        }
        let raw = hex::decode(&s.state).ok()?;
        match &mut h.words {
            Words::S256(w) if raw.len() == 32 => {
                for (w, b) in w.iter_mut().zip(raw.chunks_exact(4)) {
                    *w = u32::from_be_bytes(b.try_into().ok()?);
                }
            }
            Words::S512(w) if raw.len() == 64 => {
                for (w, b) in w.iter_mut().zip(raw.chunks_exact(8)) {
                    *w = u64::from_be_bytes(b.try_into().ok()?);
                }
            }
            _ => return None,
        }
        h.tail[..tail.len()].copy_from_slice(&tail);
        h.tail_len = tail.len();
        h.len = s.len;
        Some(h)
    }
}

/// Views a byte slice of whole blocks as sha2's block type, without a copy (copying
/// into a batch, or one call per block, cost 12–23% of SHA-256's speed here).
#[allow(unsafe_code)]
fn as_blocks<N: ArrayLength<u8>>(bytes: &[u8]) -> &[GenericArray<u8, N>] {
    let n = bytes.len() / N::USIZE;
    assert_eq!(n * N::USIZE, bytes.len(), "whole blocks only");
    // SAFETY: `GenericArray<u8, N>` is `#[repr(transparent)]` over an array of `N` bytes:
    // size `N`, alignment 1, no invalid bit patterns. `bytes` holds exactly `n * N`
    // initialised bytes and outlives the returned slice (same lifetime). This is the
    // cast sha2's own block buffer makes.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<GenericArray<u8, N>>(), n) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    /// The digest sha2's own hashers give (`Digest::compute` runs this module's code).
    fn reference(algorithm: Algorithm, data: &[u8]) -> Digest {
        let raw = match algorithm {
            Algorithm::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Algorithm::Sha512 => sha2::Sha512::digest(data).to_vec(),
            Algorithm::Blake3 => unreachable!(),
        };
        Digest::from_raw(algorithm, &raw).unwrap()
    }

    proptest::proptest! {
        /// Any split of any input, saved and restored at the split, gives what the plain
        /// hash gives.
        #[test]
        fn matches_the_plain_hash_across_a_save(
            data in proptest::collection::vec(0u8..=255, 0..1200),
            cut in 0usize..1200,
            step in 1usize..300,
        ) {
            let cut = cut.min(data.len());
            for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
                let mut h = Sha2::new(algorithm).unwrap();
                for c in data[..cut].chunks(step) {
                    h.update(c);
                }
                let saved = h.save();
                let json = serde_json::to_string(&saved).unwrap();
                let mut r = Sha2::restore(&serde_json::from_str(&json).unwrap()).unwrap();
                r.update(&data[cut..]);
                proptest::prop_assert_eq!(r.len(), data.len() as u64);
                proptest::prop_assert_eq!(r.finish(), reference(algorithm, &data));
            }
        }
    }

    #[test]
    fn large_inputs_and_block_edges_match() {
        let data: Vec<u8> = (0u32..(3 << 20) + 77)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            for n in [0, 55, 56, 63, 64, 65, 111, 112, 127, 128, 129, data.len()] {
                let mut h = Sha2::new(algorithm).unwrap();
                h.update(&data[..n]);
                assert_eq!(h.finish(), reference(algorithm, &data[..n]), "{n}");
            }
        }
    }

    #[test]
    fn malformed_states_are_refused() {
        let mut h = Sha2::new(Algorithm::Sha256).unwrap();
        h.update(b"abc");
        let good = h.save();
        assert!(Sha2::restore(&good).is_some());
        for bad in [
            SavedSha2 {
                algorithm: "md5".into(),
                ..good.clone()
            },
            SavedSha2 {
                len: 4,
                ..good.clone()
            },
            SavedSha2 {
                state: "00".into(),
                ..good.clone()
            },
            SavedSha2 {
                tail: "zz".into(),
                ..good.clone()
            },
            SavedSha2 {
                algorithm: "sha512".into(),
                ..good.clone()
            },
        ] {
            assert!(Sha2::restore(&bad).is_none(), "{bad:?}");
        }
    }
}
