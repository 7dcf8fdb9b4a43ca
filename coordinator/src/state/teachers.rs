//! The teacher task queue: shards handed out in `Shards::teacher_order` (the order the
//! first epoch needs them), under leases that expire so a dead teacher's shard is re-issued.
//! Only completed shards are durable (journaled); leases live in memory, so after a
//! coordinator restart a teacher simply acquires again.

use std::time::{Duration, Instant};

use proto::plan::order::Shards;
use proto::wire::{ShardLease, ShardState, TeacherProgress};

/// A finished shard's cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoneShard {
    /// Relative to the job's cache directory.
    pub file: String,
    /// sha256 hex of the whole file.
    pub checksum: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Pending,
    Leased {
        lease_id: u64,
        worker_id: String,
        expires: Instant,
        images_done: u32,
    },
    Done(DoneShard),
}

/// What an acquire gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    Lease(ShardLease),
    /// Every open shard is leased; ask again after this many milliseconds.
    RetryInMs(u64),
    AllDone,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("shard {shard} does not exist (the job has {shards} shards)")]
    NoSuchShard { shard: u32, shards: u32 },
    #[error("lease {lease_id} of shard {shard} is not held by {worker_id} (expired or re-issued)")]
    Stale {
        shard: u32,
        lease_id: u64,
        worker_id: String,
    },
}

#[derive(Clone, Debug)]
pub struct TeacherQueue {
    shards: Shards,
    order: Vec<u32>,
    slots: Vec<Slot>,
    lease: Duration,
    next_lease_id: u64,
}

impl TeacherQueue {
    /// Every shard of `shards` pending, handed out in `teacher_order(seed)`. Lease ids start
    /// at `first_lease_id` (distinct per coordinator process, so a lease of a previous
    /// process is never mistaken for a current one).
    pub fn new(shards: Shards, seed: u64, lease: Duration, first_lease_id: u64) -> Self {
        Self {
            order: shards.teacher_order(seed),
            slots: vec![Slot::Pending; shards.len() as usize],
            shards,
            lease,
            next_lease_id: first_lease_id.max(1),
        }
    }

    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// Returns expired leases to the queue; the worker ids whose lease expired.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, String)> {
        let mut expired = Vec::new();
        for (shard, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Leased {
                expires, worker_id, ..
            } = slot
            {
                if *expires <= now {
                    expired.push((shard as u32, std::mem::take(worker_id)));
                    *slot = Slot::Pending;
                }
            }
        }
        expired
    }

    /// The next pending shard in teacher order, leased to `worker_id`.
    pub fn acquire(&mut self, worker_id: &str, now: Instant) -> Acquired {
        self.expire(now);
        let next = self
            .order
            .iter()
            .copied()
            .find(|&s| self.slots[s as usize] == Slot::Pending);
        let Some(shard) = next else {
            return if self.all_done() {
                Acquired::AllDone
            } else {
                // Half a lease: by then a leased shard is done or its lease has expired.
                Acquired::RetryInMs((self.lease.as_millis() as u64 / 2).max(100))
            };
        };
        let lease_id = self.next_lease_id;
        self.next_lease_id += 1;
        self.slots[shard as usize] = Slot::Leased {
            lease_id,
            worker_id: worker_id.to_string(),
            expires: now + self.lease,
            images_done: 0,
        };
        let range = self.shards.range(shard).unwrap_or(0..0);
        Acquired::Lease(ShardLease {
            shard,
            lease_id,
            expires_in_ms: self.lease.as_millis() as u64,
            first_image: u64::from(range.start),
            image_count: range.end - range.start,
        })
    }

    fn held(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        now: Instant,
    ) -> Result<&mut Slot, LeaseError> {
        let shards = self.shards.len();
        let slot = self
            .slots
            .get_mut(shard as usize)
            .ok_or(LeaseError::NoSuchShard { shard, shards })?;
        match slot {
            Slot::Leased {
                lease_id: id,
                worker_id: w,
                expires,
                ..
            } if *id == lease_id && w == worker_id && *expires > now => Ok(slot),
            _ => Err(LeaseError::Stale {
                shard,
                lease_id,
                worker_id: worker_id.to_string(),
            }),
        }
    }

    /// Extends a held lease by a full lease duration.
    pub fn renew(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        images_done: u32,
        now: Instant,
    ) -> Result<Duration, LeaseError> {
        let lease = self.lease;
        if let Slot::Leased {
            expires,
            images_done: done,
            ..
        } = self.held(worker_id, shard, lease_id, now)?
        {
            *expires = now + lease;
            *done = images_done;
        }
        Ok(lease)
    }

    /// Checks that `worker_id` holds the lease (before the completion is journaled).
    pub fn check_held(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        now: Instant,
    ) -> Result<(), LeaseError> {
        self.held(worker_id, shard, lease_id, now).map(|_| ())
    }

    /// Gives a held shard back to the queue (the teacher failed on it).
    pub fn fail(
        &mut self,
        worker_id: &str,
        shard: u32,
        lease_id: u64,
        now: Instant,
    ) -> Result<(), LeaseError> {
        *self.held(worker_id, shard, lease_id, now)? = Slot::Pending;
        Ok(())
    }

    /// Marks `shard` done (a journaled completion, live or replayed).
    pub fn apply_done(&mut self, shard: u32, done: DoneShard) {
        if let Some(slot) = self.slots.get_mut(shard as usize) {
            *slot = Slot::Done(done);
        }
    }

    /// Queues `shard` again (a journaled requeue).
    pub fn apply_requeue(&mut self, shard: u32) {
        if let Some(slot) = self.slots.get_mut(shard as usize) {
            *slot = Slot::Pending;
        }
    }

    /// Whether a trainer's corruption report should requeue `shard`: it is done and its
    /// checksum is the one reported (empty = unknown, also requeues). A different checksum
    /// means the shard was already recomputed.
    pub fn should_requeue(&self, shard: u32, checksum: &str) -> Result<bool, LeaseError> {
        match self.slots.get(shard as usize) {
            None => Err(LeaseError::NoSuchShard {
                shard,
                shards: self.shards.len(),
            }),
            Some(Slot::Done(d)) => Ok(checksum.is_empty() || d.checksum == checksum),
            Some(_) => Ok(false),
        }
    }

    pub fn state(&self, shard: u32) -> Option<(ShardState, Option<&DoneShard>)> {
        Some(match self.slots.get(shard as usize)? {
            Slot::Pending => (ShardState::Pending, None),
            Slot::Leased { .. } => (ShardState::Leased, None),
            Slot::Done(d) => (ShardState::Done, Some(d)),
        })
    }

    /// The shard `worker_id` holds, if any.
    pub fn lease_of(&self, worker_id: &str) -> Option<u32> {
        self.slots
            .iter()
            .position(|s| matches!(s, Slot::Leased { worker_id: w, .. } if w == worker_id))
            .map(|i| i as u32)
    }

    pub fn all_done(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Done(_)))
    }

    pub fn progress(&self) -> TeacherProgress {
        let mut p = TeacherProgress {
            shards_total: self.shards.len(),
            ..TeacherProgress::default()
        };
        for slot in &self.slots {
            match slot {
                Slot::Pending => {}
                Slot::Leased { .. } => p.shards_leased += 1,
                Slot::Done(d) => {
                    p.shards_done += 1;
                    p.bytes_written += d.bytes;
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (TeacherQueue, Instant) {
        let shards = Shards::new(10, 4).unwrap();
        (
            TeacherQueue::new(shards, 5, Duration::from_secs(30), 100),
            Instant::now(),
        )
    }

    fn lease(a: Acquired) -> ShardLease {
        match a {
            Acquired::Lease(l) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shards_go_out_in_teacher_order_then_retry_then_all_done() {
        let (mut q, t) = queue();
        let order = Shards::new(10, 4).unwrap().teacher_order(5);
        let got: Vec<u32> = (0..3).map(|_| lease(q.acquire("a", t)).shard).collect();
        assert_eq!(got, order);
        assert!(matches!(q.acquire("a", t), Acquired::RetryInMs(_)));
        let l = q.state(2).unwrap();
        assert_eq!(l.0, ShardState::Leased);
        let done = DoneShard {
            file: "f".into(),
            checksum: "c".into(),
            bytes: 9,
        };
        for s in 0..3 {
            q.apply_done(s, done.clone());
        }
        assert_eq!(q.acquire("a", t), Acquired::AllDone);
        assert_eq!(q.progress().bytes_written, 27);
    }

    #[test]
    fn an_expired_lease_is_reissued_and_the_old_id_refused() {
        let (mut q, t) = queue();
        let first = lease(q.acquire("a", t));
        assert_eq!(first.expires_in_ms, 30_000);
        let range_len = first.image_count;
        assert!(range_len == 4 || range_len == 2);
        let later = t + Duration::from_secs(31);
        // b gets a's expired shard first (it is first in teacher order).
        let second = lease(q.acquire("b", later));
        assert_eq!(second.shard, first.shard);
        assert_ne!(second.lease_id, first.lease_id);
        let stale = q.renew("a", first.shard, first.lease_id, 1, later);
        assert!(matches!(stale, Err(LeaseError::Stale { .. })));
        assert!(q
            .check_held("a", first.shard, first.lease_id, later)
            .is_err());
        assert!(q
            .renew("b", second.shard, second.lease_id, 2, later)
            .is_ok());
        assert_eq!(q.lease_of("b"), Some(second.shard));
        q.fail("b", second.shard, second.lease_id, later).unwrap();
        assert_eq!(q.lease_of("b"), None);
        assert!(matches!(
            q.renew("b", 99, 1, 0, later),
            Err(LeaseError::NoSuchShard { .. })
        ));
    }

    #[test]
    fn corruption_requeues_only_the_current_file() {
        let (mut q, _) = queue();
        q.apply_done(
            1,
            DoneShard {
                file: "f".into(),
                checksum: "c1".into(),
                bytes: 1,
            },
        );
        assert_eq!(q.should_requeue(1, "c0"), Ok(false));
        assert_eq!(q.should_requeue(1, "c1"), Ok(true));
        assert_eq!(q.should_requeue(0, "c1"), Ok(false));
        q.apply_requeue(1);
        assert_eq!(q.state(1).unwrap().0, ShardState::Pending);
    }
}
