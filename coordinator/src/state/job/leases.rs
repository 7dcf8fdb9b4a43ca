//! The teachers' shard leases: acquire, renew, complete (journaled), fail, and a
//! trainer's report of a corrupt cache shard (requeued, journaled). Only registered
//! teachers hold leases.

use std::time::{Duration, Instant};

use proto::wire::{CompleteShardRequest, Role};

use super::outcome::{refuse, Result};
use super::{JobState, StateError};
use crate::journal::Record;
use crate::state::teachers::{Acquired, LeaseError};
use crate::validate::{self, Code, Refusal};

impl JobState {
    fn teacher(&self, worker_id: &str) -> Result<()> {
        match self.workers.get(worker_id) {
            Some(w) if w.role == Role::Teacher => Ok(()),
            Some(_) => refuse(
                Code::FailedPrecondition,
                "not_a_teacher",
                format!("{worker_id} is not a teacher"),
            ),
            None => refuse(
                Code::NotFound,
                "unknown_worker_id",
                format!("worker id {worker_id:?} is not registered"),
            ),
        }
    }

    /// A teacher asks for work: a shard lease, a retry delay, or `AllDone` (also when the
    /// job fills no cache or is finished).
    pub fn acquire_shard(&mut self, worker_id: &str, now: Instant) -> Result<Acquired> {
        self.teacher(worker_id)?;
        if !self.cfg.teacher_cache || self.is_finished() {
            return Ok(Acquired::AllDone);
        }
        // Before the queue hands out a shard whose lease ran out between two ticks, so
        // that its expiry is still recorded as an event.
        self.expire_leases(now);
        Ok(self.teachers.acquire(worker_id, now))
    }

    /// Returns expired leases to the queue, one event each (who lost which shard).
    pub(super) fn expire_leases(&mut self, now: Instant) {
        for (shard, worker) in self.teachers.expire(now) {
            self.event(format!("lease of shard {shard} by {worker} expired"));
        }
    }

    /// A teacher's lease renewal (with its progress): the new lease duration, or `None`
    /// when the lease expired or was re-issued, so the teacher drops the shard.
    pub fn renew_lease(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        images_done: u32,
        now: Instant,
    ) -> Result<Option<Duration>> {
        self.teacher(worker_id)?;
        match self
            .teachers
            .renew(worker_id, shard, lease_id, images_done, now)
        {
            Ok(d) => Ok(Some(d)),
            Err(LeaseError::Stale { .. }) => Ok(None),
            Err(e) => refuse(Code::InvalidArgument, "no_such_shard", e.to_string()),
        }
    }

    /// A teacher finished the shard it holds: its cache file is journaled, so the shard
    /// stays done across restarts.
    pub fn complete_shard(&mut self, req: &CompleteShardRequest, now: Instant) -> Result<()> {
        self.teacher(&req.worker_id)?;
        validate::completion(req)?;
        let expected = self
            .cfg
            .shards
            .range(req.shard)
            .map_or(0, |r| r.end - r.start);
        if req.images != expected {
            return refuse(
                Code::InvalidArgument,
                "wrong_image_count",
                format!(
                    "shard {} has {expected} images, the completion says {}",
                    req.shard, req.images
                ),
            );
        }
        self.teachers
            .check_held(&req.worker_id, req.shard, req.lease_id, now)
            .map_err(lease_refusal)?;
        self.decide(Record::ShardDone {
            shard: req.shard,
            file: req.file.clone(),
            checksum: req.checksum.clone(),
            bytes: req.bytes,
        })
    }

    /// A teacher gave up the shard it holds: back to the queue. Not journaled: leases
    /// live in memory only.
    pub fn fail_shard(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        reason: &str,
        now: Instant,
    ) -> Result<()> {
        self.teacher(worker_id)?;
        self.teachers
            .fail(worker_id, shard, lease_id, now)
            .map_err(lease_refusal)?;
        self.event(format!("{worker_id} failed shard {shard}: {reason}"));
        Ok(())
    }

    /// A worker found a done shard's cache file corrupt: the shard is requeued (journaled)
    /// unless it was already recomputed. Returns whether it was requeued.
    pub fn report_corrupt_shard(
        &mut self,
        worker_id: &str,
        shard: u32,
        checksum: &str,
        reason: &str,
    ) -> Result<bool> {
        if !self.workers.contains_key(worker_id) {
            return refuse(
                Code::NotFound,
                "unknown_worker_id",
                format!("worker id {worker_id:?} is not registered"),
            );
        }
        let requeue = self
            .teachers
            .should_requeue(shard, checksum)
            .map_err(lease_refusal)?;
        if requeue {
            self.decide(Record::ShardRequeued {
                shard,
                reason: format!("{worker_id}: {reason}"),
            })?;
        }
        Ok(requeue)
    }
}

fn lease_refusal(e: LeaseError) -> StateError {
    let reason = match e {
        LeaseError::NoSuchShard { .. } => "no_such_shard",
        LeaseError::Stale { .. } => "stale_lease",
    };
    let code = match e {
        LeaseError::NoSuchShard { .. } => Code::InvalidArgument,
        LeaseError::Stale { .. } => Code::FailedPrecondition,
    };
    Refusal::new(code, reason, e.to_string()).into()
}
