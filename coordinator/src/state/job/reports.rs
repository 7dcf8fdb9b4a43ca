//! A worker's report on its command stream: checked against the generations and the
//! job's steps, recorded, then acted on (a member back to idle or failed leaves its
//! generation, rank 0 hands out the NCCL id, a trainer of an old generation aborts it).

use std::time::Instant;

use proto::wire::{command, AbortGroup, NcclId, Role, WorkerReport, WorkerState};

use super::outcome::{refuse, Result};
use super::wire::command;
use super::{JobState, Outgoing};
use crate::state::lost::LostReason;
use crate::state::rendezvous::World;
use crate::validate::{self, Code};

impl JobState {
    /// One report on the stream `session` of `worker_id`.
    pub fn report(
        &mut self,
        worker_id: &str,
        session: u64,
        report: WorkerReport,
        now: Instant,
    ) -> Result<Vec<Outgoing>> {
        validate::report(&report, worker_id)?;
        let Some(w) = self.workers.get(worker_id) else {
            return refuse(
                Code::NotFound,
                "unknown_worker_id",
                format!("worker id {worker_id:?} is not registered"),
            );
        };
        if w.session != Some(session) {
            return refuse(
                Code::FailedPrecondition,
                "stale_stream",
                "a newer stream of this worker replaced this one",
            );
        }
        let role = w.role;
        self.check_generation(worker_id, role, &report)?;
        let left = role == Role::Trainer && self.went_idle_in_world(worker_id, &w.report, &report);
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.last_seen = now;
            // A worker learns its /metrics address after registering (see declip.proto).
            if !report.metrics_address.is_empty() {
                w.metrics_address = report.metrics_address.clone();
            }
            w.report = report.clone();
        }
        let mut out = Vec::new();
        if left {
            out.extend(self.leave_generation(worker_id, &LostReason::BackToIdle, now)?);
        } else if role == Role::Trainer {
            out.extend(self.trainer_report(worker_id, &report, now)?);
        }
        out.extend(self.try_form(now)?);
        Ok(out)
    }

    /// Whether a member that had reported in the current generation now reports IDLE: it
    /// left the generation by itself (a collective failed or timed out on its side, e.g.
    /// while a peer waited for a recomputed cache shard), and no process was lost that
    /// would tell. Reports arrive in order, so an IDLE sent before it joined cannot
    /// follow its first report of the generation.
    fn went_idle_in_world(
        &self,
        worker_id: &str,
        before: &WorkerReport,
        now: &WorkerReport,
    ) -> bool {
        let Some(world) = self.member_of_live_world(worker_id) else {
            return false;
        };
        before.generation == world.generation
            && before.state != WorkerState::Idle as i32
            && now.state == WorkerState::Idle as i32
    }

    fn check_generation(&self, worker_id: &str, role: Role, r: &WorkerReport) -> Result<()> {
        if r.generation > self.generation {
            return refuse(
                Code::FailedPrecondition,
                "unknown_generation",
                format!(
                    "generation {} does not exist (latest is {})",
                    r.generation, self.generation
                ),
            );
        }
        if r.step > self.cfg.total_steps {
            return refuse(
                Code::InvalidArgument,
                "step_from_future",
                format!(
                    "step {} is past the job's {} steps",
                    r.step, self.cfg.total_steps
                ),
            );
        }
        let current = self.world.as_ref().filter(|w| w.generation == r.generation);
        if let Some(world) = current {
            if role != Role::Trainer || world.rank_of(worker_id).is_none() {
                return refuse(
                    Code::FailedPrecondition,
                    "rank_outside_world",
                    format!(
                        "{worker_id} is not a member of generation {} ({} ranks)",
                        r.generation,
                        world.size()
                    ),
                );
            }
        }
        Ok(())
    }

    fn trainer_report(
        &mut self,
        worker_id: &str,
        r: &WorkerReport,
        now: Instant,
    ) -> Result<Vec<Outgoing>> {
        let Some(world) = self.world.clone().filter(|w| w.generation == r.generation) else {
            return Ok(self.abort_stale(worker_id, r));
        };
        let rank = world.rank_of(worker_id).unwrap_or(u32::MAX);
        self.max_step = self.max_step.max(r.step);
        let mut out = Vec::new();
        if r.state == WorkerState::Failed as i32 {
            let reason = LostReason::ReportedFailure(r.error.clone());
            return self.lose(worker_id, &reason, now);
        }
        if rank == 0 && !world.nccl_id_sent && !r.nccl_unique_id.is_empty() {
            out.extend(self.send_nccl_id(&world, &r.nccl_unique_id));
        }
        out.extend(self.maybe_complete()?);
        out.extend(self.maybe_stop()?);
        Ok(out)
    }

    /// A trainer still busy in a generation that is over is told (once) to abort it.
    fn abort_stale(&mut self, worker_id: &str, r: &WorkerReport) -> Vec<Outgoing> {
        let busy = [
            WorkerState::Joining,
            WorkerState::Training,
            WorkerState::Checkpointing,
            WorkerState::WaitingForCache,
        ]
        .iter()
        .any(|s| *s as i32 == r.state);
        let Some(w) = self.workers.get_mut(worker_id) else {
            return Vec::new();
        };
        if r.generation == 0 || !busy || w.aborted == r.generation {
            return Vec::new();
        }
        w.aborted = r.generation;
        vec![Outgoing::Send(
            worker_id.to_string(),
            command(command::Kind::Abort(AbortGroup {
                generation: r.generation,
                reason: format!("generation {} is over", r.generation),
            })),
        )]
    }

    fn send_nccl_id(&mut self, world: &World, id: &[u8]) -> Vec<Outgoing> {
        if let Some(w) = &mut self.world {
            w.nccl_id_sent = true;
        }
        let cmd = command(command::Kind::NcclId(NcclId {
            generation: world.generation,
            unique_id: id.to_vec(),
        }));
        world
            .members
            .iter()
            .map(|m| Outgoing::Send(m.clone(), cmd.clone()))
            .collect()
    }

    pub(super) fn rank0_report(&self) -> Option<&WorkerReport> {
        let world = self.world.as_ref()?;
        let w = self.workers.get(world.members.first()?)?;
        (w.report.generation == world.generation).then_some(&w.report)
    }
}
