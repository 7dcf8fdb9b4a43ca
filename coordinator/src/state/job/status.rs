//! The status view (`coordinator status`, the metrics): the job, its ranks and teachers.

use std::collections::BTreeMap;
use std::time::Instant;

use proto::wire::{JobStatus, Losses, RankStatus, Role, SkipCount, TeacherStatus, WorkerReport};

use super::wire::checkpoint_ref;
use super::{JobState, WorkerInfo};
use crate::state::rendezvous::World;

impl JobState {
    /// The job as `coordinator status` and the metrics show it at `now`.
    pub fn status(&self, now: Instant) -> JobStatus {
        let members: Vec<String> = self
            .world
            .as_ref()
            .map_or_else(Vec::new, |w| w.members.clone());
        let mut ranks: Vec<RankStatus> = members
            .iter()
            .enumerate()
            .filter_map(|(rank, id)| Some(rank_status(rank as u32, id, self.workers.get(id)?, now)))
            .collect();
        // Trainers outside the world are listed with rank u32::MAX.
        ranks.extend(
            self.workers
                .iter()
                .filter(|(id, w)| w.role == Role::Trainer && !members.contains(id))
                .map(|(id, w)| rank_status(u32::MAX, id, w, now)),
        );
        let teachers = self
            .workers
            .iter()
            .filter(|(_, w)| w.role == Role::Teacher)
            .map(|(id, w)| teacher_status(id, w, self.teachers.lease_of(id), now))
            .collect();
        let in_world: Vec<&RankStatus> = ranks.iter().filter(|r| r.rank != u32::MAX).collect();
        let images_per_s: f64 = in_world.iter().map(|r| r.images_per_s).sum();
        let step = if self.world.is_some() {
            self.max_step
        } else {
            self.checkpoints.latest_step()
        };
        let left = self.cfg.total_steps.saturating_sub(step) as f64;
        let eta_s = if images_per_s > 0.0 {
            left * self.cfg.global_batch as f64 / images_per_s
        } else {
            0.0
        };
        let rank0 = self.rank0_report();
        JobStatus {
            job: self.cfg.job.clone(),
            phase: self.phase as i32,
            generation: self.generation,
            world_size: self.world.as_ref().map_or(0, World::size),
            step,
            total_steps: self.cfg.total_steps,
            epoch: rank0.map_or(0, |r| r.epoch),
            images_per_s,
            eta_s,
            losses: rank0.and_then(|r| r.losses),
            teacher_progress: Some(self.teachers.progress()),
            last_checkpoint: self.checkpoints.latest().map(checkpoint_ref),
            recent_events: self.events.iter().cloned().collect(),
            skips: self.skips(),
            images_total: self.trainer_sum(|r| r.images_total),
            cache_hits: self.trainer_sum(|r| r.cache_hits),
            cache_misses: self.trainer_sum(|r| r.cache_misses),
            elapsed_s: now.saturating_duration_since(self.started).as_secs_f64(),
            restarts: self.restarts,
            error: self.error.clone(),
            ranks,
            teachers,
        }
    }

    /// A cumulative count summed over every trainer's last report.
    fn trainer_sum(&self, count: impl Fn(&WorkerReport) -> u64) -> u64 {
        self.workers
            .values()
            .filter(|w| w.role == Role::Trainer)
            .map(|w| count(&w.report))
            .sum()
    }

    fn skips(&self) -> Vec<SkipCount> {
        let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
        for w in self.workers.values() {
            for s in &w.report.skips {
                *by_reason.entry(s.reason.as_str()).or_default() += s.count;
            }
        }
        by_reason
            .into_iter()
            .map(|(reason, count)| SkipCount {
                reason: reason.to_string(),
                count,
            })
            .collect()
    }
}

fn age(now: Instant, then: Instant) -> f64 {
    now.saturating_duration_since(then).as_secs_f64()
}

fn rank_status(rank: u32, id: &str, w: &WorkerInfo, now: Instant) -> RankStatus {
    let r = &w.report;
    RankStatus {
        rank,
        worker_id: id.to_string(),
        host: w.host.clone(),
        state: r.state,
        step: r.step,
        images_per_s: r.images_per_s,
        heartbeat_age: age(now, w.last_seen),
        collective_seq: r.collective_seq,
        losses: r.losses.or(Some(Losses::default())),
        step_times: r.step_times,
        memory_bytes: r.memory_bytes,
        gpu_memory_bytes: r.gpu_memory_bytes,
        metrics_address: w.metrics_address.clone(),
    }
}

fn teacher_status(id: &str, w: &WorkerInfo, shard: Option<u32>, now: Instant) -> TeacherStatus {
    TeacherStatus {
        worker_id: id.to_string(),
        host: w.host.clone(),
        state: w.report.state,
        shard: shard.map_or(-1, i64::from),
        images_total: w.report.images_total,
        images_per_s: w.report.images_per_s,
        heartbeat_age: age(now, w.last_seen),
        metrics_address: w.metrics_address.clone(),
    }
}
