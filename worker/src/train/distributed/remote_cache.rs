//! Cache-mode steps under a coordinator: a shard that is not there yet is waited for
//! (asking the coordinator, reporting `WAITING_FOR_CACHE`, bounded); a corrupt one is
//! reported, recomputed by a teacher, and read again.

use std::time::{Duration, Instant};

use proto::wire::{self, WorkerState};

use crate::control::Control;
use crate::teacher::cache::{CacheError, CacheStore};
use crate::train::cache_gate::CacheGate;
use crate::train::error::RunError;

/// Longest a step waits for teacher shards before the trainer fails, naming them.
const CACHE_WAIT_LIMIT: Duration = Duration::from_secs(1800);
const CACHE_POLL: Duration = Duration::from_millis(250);

/// The cache gate of one generation.
pub struct RemoteCache<'a> {
    pub control: &'a Control,
    pub generation: u64,
}

impl RemoteCache<'_> {
    fn shard_status(&self, shard: u32) -> Result<wire::ShardStatusResponse, RunError> {
        let request = wire::ShardStatusRequest { shard };
        Ok(self.control.call("ShardStatus", |mut c| async move {
            c.shard_status(request).await
        })?)
    }

    fn set_state(&self, state: WorkerState) {
        let mut report = self.control.last_report();
        report.state = state as i32;
        report.generation = self.generation;
        self.control.report(report);
    }

    /// Waits until `done(shard)` holds for every shard, bounded by [`CACHE_WAIT_LIMIT`].
    fn wait(
        &self,
        store: &CacheStore,
        mut missing: Vec<u32>,
        done: impl Fn(&wire::ShardStatusResponse) -> bool,
    ) -> Result<(), RunError> {
        let started = Instant::now();
        self.set_state(WorkerState::WaitingForCache);
        tracing::info!("waiting for teacher cache shards {missing:?}");
        while !missing.is_empty() {
            if started.elapsed() > CACHE_WAIT_LIMIT {
                return Err(CacheError::Timeout {
                    shards: missing,
                    waited: started.elapsed(),
                }
                .into());
            }
            std::thread::sleep(CACHE_POLL);
            let mut still = Vec::new();
            for shard in missing {
                let status = self.shard_status(shard)?;
                if done(&status) {
                    store.reopen(shard);
                    if store.reader(shard).is_ok() {
                        continue;
                    }
                }
                still.push(shard);
            }
            missing = still;
        }
        tracing::info!(
            "cache shards ready after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        self.set_state(WorkerState::Training);
        Ok(())
    }
}

impl CacheGate for RemoteCache<'_> {
    fn ready(&mut self, store: &CacheStore, shards: &[u32]) -> Result<(), RunError> {
        let missing = store.unusable(shards);
        if missing.is_empty() {
            return Ok(());
        }
        self.wait(store, missing, |s| s.state() == wire::ShardState::Done)
    }

    fn corrupt(&mut self, store: &CacheStore, err: CacheError) -> Result<(), RunError> {
        let (shard, image_id) = match &err {
            CacheError::Corrupt {
                shard, image_id, ..
            } => (*shard, *image_id),
            CacheError::NoRecord {
                shard, image_id, ..
            } => (*shard, *image_id),
            CacheError::BadFile { shard, .. } | CacheError::Stale { shard, .. } => (*shard, 0),
            _ => return Err(err.into()),
        };
        if store.reopen_if_replaced(shard) {
            tracing::warn!("{err}; that file has been replaced since, reading the new one");
            return Ok(());
        }
        tracing::error!("{err}; asking the coordinator to recompute shard {shard}");
        let request = wire::ReportCorruptShardRequest {
            worker_id: self.control.worker_id(),
            shard,
            checksum: self.shard_status(shard)?.checksum,
            image_id,
            reason: err.to_string(),
        };
        self.control.call("ReportCorruptShard", |mut c| {
            let request = request.clone();
            async move { c.report_corrupt_shard(request).await }
        })?;
        store.reopen(shard);
        // The report answers after the requeue is journaled, so from here on `Done` means
        // a new completion. Its checksum cannot tell: teachers are deterministic, and a
        // recomputed shard has the bytes (and checksum) of the file before the damage.
        self.wait(store, vec![shard], |s| s.state() == wire::ShardState::Done)
    }
}
