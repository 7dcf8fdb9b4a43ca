//! The contract crate: everything two DeCLIP processes must agree on, and nothing
//! that needs libtorch.
//!
//! - [`job`]: the job spec (one schema for every process), its named architecture
//!   presets, how it is loaded from TOML + environment + `--set` overrides, and the
//!   validation that runs before any work starts.
//! - [`dataset`]: the dataset index (images sorted by id), its fingerprint, and why
//!   images are skipped (reasons and counts).
//! - [`plan`]: deterministic plans (epoch order, shards, crop plan) that trainers,
//!   teachers and the coordinator must derive identically.
//! - [`metrics`]: the metric catalog (names, units, labels, HELP) and the
//!   Prometheus exporter every process serves `/metrics` with.
//! - [`cache`]: the teacher cache contract: shard file names, image keys, fingerprint.
//! - [`cli`]: the flags, logging and exit codes both binaries share.
//! - [`wire`]: the control protocol (`declip.proto`, package `declip.v1`), generated
//!   by tonic/prost; [`auth`] says how its calls carry the job's token.

pub mod auth;
pub mod cache;
pub mod cli;
pub mod client;
pub mod dataset;
pub mod faults;
pub mod job;
pub mod metrics;
pub mod plan;

/// Version of the control protocol. A worker whose version differs from the
/// coordinator's is refused at `Register` with both versions in the message.
pub const PROTOCOL_VERSION: u32 = 1;

/// Types and gRPC client/server of `declip.proto` (package `declip.v1`).
#[allow(clippy::all, missing_docs)]
pub mod wire {
    tonic::include_proto!("declip.v1");
}
