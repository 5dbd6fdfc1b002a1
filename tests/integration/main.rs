//! Integration tests of the `layerstore` blob store and the `store` binary.
//!
//! One test binary: each submodule covers one concern of the store's contract (round trips,
//! rejected puts, dedupe, reopening, recovery of torn segments, sealing, streaming ingest,
//! concurrency, locking, crash durability and the command line), and `model` runs random
//! operation sequences against a `BTreeMap`. Shared fixtures live in `common`.

mod cli;
mod common;
mod concurrency;
mod crash;
mod dedupe;
mod gc;
mod images;
mod ingest;
mod interop;
mod locking;
mod mismatch;
mod model;
mod recovery;
mod reopen;
mod roundtrip;
mod sealing;
