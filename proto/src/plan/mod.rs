//! Deterministic plans every process derives identically from (seed, epoch, ids):
//! epoch order and sharding, and the crop plan.
//!
//! - [`rng`]: the generator every plan draws from (SplitMix64-based, owned here so no
//!   dependency update can change a plan).
//! - [`crops`]: the crop plan (docs/method.md §3) and its box mappings.
//! - [`order`]: shards, epoch order, global steps, rank slices and the resume cursor.
//! - [`steps`]: how many optimizer steps a whole job takes (epochs, drop-last, `max_steps`).

pub mod crops;
pub mod order;
pub mod rng;
pub mod steps;

/// Version of the plan contract: the generator ([`rng::RNG_VERSION`]), the layout table,
/// how the crop plan and the epoch order consume draws, and the box arithmetic. Anything
/// that changes a plan (and so the pinned hashes in `proto/tests/plan_*.rs`) must bump it:
/// caches of teacher targets record it and refuse a different one.
pub const PLAN_VERSION: u32 = 1;
