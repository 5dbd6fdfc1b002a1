//! Integration tests of `layerstore` and the `store` binary.
//!
//! One test binary: each submodule covers one concern of the store's contract — the blob
//! store (round trips, rejected puts, dedupe, reopening, recovery of torn segments,
//! sealing, streaming ingest, concurrency, locking, crash durability, the command line, a
//! model test), the image model (`images`), import and export against real tools
//! (`interop`), garbage collection (`gc`), verification and repair (`verify`), and
//! unpacking (`unpack`). Shared fixtures live in `common`; real images are built by
//! `tests/fixtures/make-images.sh` with umoci, skopeo and buildah.

mod admin;
mod asyncapi;
mod cli;
mod common;
mod concurrency;
mod crash;
mod dedupe;
mod faults;
mod fuzzed;
mod gc;
mod hostile;
mod images;
mod ingest;
mod interop;
mod interrupt;
mod locking;
mod mismatch;
mod model;
mod oci;
mod powerloss;
mod recovery;
mod registry;
mod regressions;
mod reopen;
mod roundtrip;
mod sealing;
mod stress;
mod unpack;
mod uploads;
mod verify;
