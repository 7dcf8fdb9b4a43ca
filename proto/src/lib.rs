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
//! - [`cli`]: the flags, logging and exit codes both binaries share.

pub mod cli;
pub mod dataset;
pub mod job;
pub mod plan;
