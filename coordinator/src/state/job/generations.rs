//! Generations: a world forms from the idle, attached trainers (who gets which rank,
//! which collective backend, where to resume), and a member leaves it, which aborts it.

use std::time::Instant;

use proto::wire::{command, AbortGroup, CollectiveBackend, JobPhase, JoinGroup, Role, WorkerState};

use super::outcome::Result;
use super::wire::{checkpoint_ref, command};
use super::{Decision, JobState, Outgoing, WorkerInfo};
use crate::journal::Record;
use crate::state::lost::LostReason;
use crate::state::rendezvous::{assign_ranks, world_size, Candidate, World};

impl JobState {
    /// The current world while the job runs, if `worker_id` is one of its members.
    pub(super) fn member_of_live_world(&self, worker_id: &str) -> Option<World> {
        let world = self.world.as_ref()?;
        (world.rank_of(worker_id).is_some() && !self.is_finished()).then(|| world.clone())
    }

    /// `worker_id`, a member of the current generation, is out of it (lost, failed, or
    /// back to IDLE on its own): journaled, the other members are told to abort, and the
    /// job recovers with a new generation (or stops, during a drain).
    pub(super) fn leave_generation(
        &mut self,
        worker_id: &str,
        reason: &LostReason,
        now: Instant,
    ) -> Result<Vec<Outgoing>> {
        let Some(world) = self.member_of_live_world(worker_id) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        self.decide(Record::Lost {
            generation: world.generation,
            worker_id: worker_id.to_string(),
            reason: reason.to_string(),
        })?;
        self.decisions
            .push(Decision::GenerationAborted(reason.clone()));
        let abort = command(command::Kind::Abort(AbortGroup {
            generation: world.generation,
            reason: format!("{worker_id} lost: {reason}"),
        }));
        for member in world.members.iter().filter(|m| *m != worker_id) {
            out.push(Outgoing::Send(member.clone(), abort.clone()));
            if let Some(w) = self.workers.get_mut(member) {
                w.aborted = world.generation;
            }
        }
        if self.phase == JobPhase::Draining {
            self.set_phase(JobPhase::Stopped, "a member was lost during the drain")?;
            out.extend(self.stop_everyone("the job stopped during a drain"));
        } else {
            self.set_phase(JobPhase::Recovering, &reason.to_string())?;
            self.forming_since = now;
        }
        Ok(out)
    }

    pub(super) fn try_form(&mut self, now: Instant) -> Result<Vec<Outgoing>> {
        if self.world.is_some() || !matches!(self.phase, JobPhase::Forming | JobPhase::Recovering) {
            return Ok(Vec::new());
        }
        let mut idle: Vec<(&String, &WorkerInfo)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.role == Role::Trainer
                    && w.session.is_some()
                    && w.report.state == WorkerState::Idle as i32
            })
            .collect();
        idle.sort_by_key(|(_, w)| w.order);
        let waited = now.saturating_duration_since(self.forming_since);
        let Some(size) = world_size(
            idle.len(),
            self.cfg.min,
            self.cfg.max,
            waited,
            self.cfg.join_wait,
            |size| self.cfg.world_fits(size),
        ) else {
            return Ok(Vec::new());
        };
        let candidates: Vec<Candidate> = idle
            .iter()
            .map(|(id, w)| Candidate {
                worker_id: (*id).clone(),
                rank_hint: w.rank_hint,
            })
            .collect();
        let members = assign_ranks(&candidates, size);
        let generation = self.generation + 1;
        self.decide(Record::Generation {
            generation,
            members: members.clone(),
        })?;
        self.set_phase(JobPhase::Training, "a world formed")?;
        Ok(self.join_commands(generation, &members))
    }

    fn backend(&self, members: &[String]) -> CollectiveBackend {
        let device = self.cfg.trainer_device.as_str();
        let all_cuda = || {
            members.iter().all(|m| {
                self.workers.get(m).is_some_and(|w| {
                    !w.devices.is_empty() && w.devices.iter().all(|d| d.starts_with("cuda"))
                })
            })
        };
        if device.starts_with("cuda") || (device == "auto" && all_cuda()) {
            CollectiveBackend::Nccl
        } else {
            CollectiveBackend::Ring
        }
    }

    fn join_commands(&self, generation: u64, members: &[String]) -> Vec<Outgoing> {
        let backend = self.backend(members);
        let ring_peers: Vec<String> = members
            .iter()
            .map(|m| {
                self.workers
                    .get(m)
                    .map_or(String::new(), |w| w.ring_address.clone())
            })
            .collect();
        let resume = self.checkpoints.latest().map(checkpoint_ref);
        let mut out: Vec<Outgoing> = members
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let join = JoinGroup {
                    generation,
                    rank: rank as u32,
                    world_size: members.len() as u32,
                    backend: backend as i32,
                    ring_peers: ring_peers.clone(),
                    resume: resume.clone(),
                    total_steps: self.cfg.total_steps,
                };
                Outgoing::Send(m.clone(), command(command::Kind::Join(join)))
            })
            .collect();
        out.extend(self.checkpoint_command(self.checkpoints.latest_step()));
        out
    }
}
