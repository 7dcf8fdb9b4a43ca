//! What a cache-mode step does when the teacher shards it reads are not usable:
//! standalone, they were all computed before the loop, so it fails; under a
//! coordinator it asks for them and waits (`train::distributed::remote_cache`). Also
//! what a step counts of its lookups.

use std::time::Duration;

use super::error::RunError;
use crate::teacher::cache::{CacheError, CacheStore};

pub trait CacheGate {
    /// Returns once every shard of `shards` can be read (or fails, naming them).
    fn ready(&mut self, store: &CacheStore, shards: &[u32]) -> Result<(), RunError>;
    /// A record failed its checks: `Ok` once its shard was recomputed and may be read
    /// again, `Err` to fail the step.
    fn corrupt(&mut self, store: &CacheStore, err: CacheError) -> Result<(), RunError>;
}

/// Standalone: every shard was computed before the loop; a bad record fails the run.
pub struct LocalCache;

impl CacheGate for LocalCache {
    fn ready(&mut self, store: &CacheStore, shards: &[u32]) -> Result<(), RunError> {
        Ok(store.wait_for(shards, Duration::ZERO, Duration::ZERO)?)
    }

    fn corrupt(&mut self, _: &CacheStore, err: CacheError) -> Result<(), RunError> {
        Err(err.into())
    }
}

/// Cache records looked up, by whether their shard file was usable at the time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheLookups {
    pub hits: u64,
    pub misses: u64,
}

impl std::ops::AddAssign for CacheLookups {
    fn add_assign(&mut self, other: Self) {
        self.hits += other.hits;
        self.misses += other.misses;
    }
}
