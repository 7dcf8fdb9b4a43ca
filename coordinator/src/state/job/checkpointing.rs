//! Checkpoints and the job's end: which step rank 0 checkpoints next, its commits, the
//! coordinated drain, and completion. Completion and the end of a drain both wait for
//! rank 0's checkpoint of their step to be committed, which is why they are checked
//! after each commit as well as after each report.

use proto::wire::{command, CheckpointAt, CommitCheckpointRequest, Drain, JobPhase, WorkerState};

use super::outcome::{refuse, Result};
use super::wire::command;
use super::{Decision, JobState, Outgoing};
use crate::journal::Record;
use crate::validate::{self, Code};

impl JobState {
    /// `CheckpointAt` for rank 0: the next checkpoint step after `after`.
    pub(super) fn checkpoint_command(&self, after: u64) -> Option<Outgoing> {
        let world = self.world.as_ref()?;
        let step = self.cfg.next_checkpoint(after)?;
        let rank0 = world.members.first()?;
        Some(Outgoing::Send(
            rank0.clone(),
            command(command::Kind::Checkpoint(CheckpointAt {
                generation: world.generation,
                step,
            })),
        ))
    }

    /// Rank 0 of the current generation commits its checkpoint: the step must have been
    /// reported and be after the last committed one. Journaled; then rank 0 is told the
    /// next checkpoint step (not during a drain), and the job may complete or stop.
    pub fn commit_checkpoint(&mut self, req: &CommitCheckpointRequest) -> Result<Vec<Outgoing>> {
        let ckpt = validate::checkpoint(req)?;
        let world = match &self.world {
            Some(w) if w.generation == req.generation => w.clone(),
            _ => {
                return refuse(
                    Code::FailedPrecondition,
                    "unknown_generation",
                    format!(
                        "generation {} is not the current one ({})",
                        req.generation,
                        self.world.as_ref().map_or(0, |w| w.generation)
                    ),
                )
            }
        };
        if world.rank_of(&req.worker_id) != Some(0) {
            return refuse(
                Code::FailedPrecondition,
                "commit_not_rank0",
                format!(
                    "{} is not rank 0 of generation {}",
                    req.worker_id, world.generation
                ),
            );
        }
        if ckpt.step > self.max_step {
            return refuse(
                Code::FailedPrecondition,
                "step_from_future",
                format!(
                    "checkpoint step {} is past the highest step reported ({})",
                    ckpt.step, self.max_step
                ),
            );
        }
        if ckpt.step <= self.checkpoints.latest_step() && self.checkpoints.latest().is_some() {
            return refuse(
                Code::FailedPrecondition,
                "checkpoint_not_newer",
                format!(
                    "step {} is not after the last committed checkpoint ({})",
                    ckpt.step,
                    self.checkpoints.latest_step()
                ),
            );
        }
        let step = ckpt.step;
        self.decide(Record::Committed {
            generation: world.generation,
            checkpoint: ckpt,
        })?;
        self.decisions.push(Decision::CheckpointCommitted { step });
        let mut out = Vec::new();
        if self.drain_step.is_none() {
            out.extend(self.checkpoint_command(step));
        }
        out.extend(self.maybe_complete()?);
        out.extend(self.maybe_stop()?);
        Ok(out)
    }

    /// A coordinated stop: every member trains through the next step, rank 0 checkpoints
    /// it, then everyone stops. Without a world the job stops at once.
    pub fn drain(&mut self, reason: &str) -> Result<Vec<Outgoing>> {
        if self.is_finished() || self.phase == JobPhase::Draining {
            return Ok(Vec::new());
        }
        let Some(world) = self.world.clone() else {
            self.set_phase(JobPhase::Stopped, reason)?;
            return Ok(self.stop_everyone(reason));
        };
        let stop_step = (self.max_step + 1).min(self.cfg.total_steps);
        self.decide(Record::Drain {
            generation: world.generation,
            stop_step,
        })?;
        self.set_phase(JobPhase::Draining, reason)?;
        let cmd = command(command::Kind::Drain(Drain {
            generation: world.generation,
            stop_step,
        }));
        Ok(world
            .members
            .iter()
            .map(|m| Outgoing::Send(m.clone(), cmd.clone()))
            .collect())
    }

    /// A worker was told to stop (SIGTERM, Ctrl-C) and asks for the drain: the same
    /// coordinated stop as [`JobState::drain`]. Returns the phase and the stop step.
    pub fn request_drain(
        &mut self,
        worker_id: &str,
        reason: &str,
    ) -> Result<(Vec<Outgoing>, JobPhase, u64)> {
        if !self.workers.contains_key(worker_id) {
            return refuse(
                Code::NotFound,
                "unknown_worker",
                format!("no worker {worker_id:?} is registered"),
            );
        }
        let out = self.drain(&format!("{worker_id} asked to drain: {reason}"))?;
        Ok((out, self.phase, self.drain_step.unwrap_or(0)))
    }

    /// Rank 0 is done at the last step and that step's checkpoint is committed.
    pub(super) fn maybe_complete(&mut self) -> Result<Vec<Outgoing>> {
        let total = self.cfg.total_steps;
        let done = self
            .rank0_report()
            .is_some_and(|r| r.state == WorkerState::Done as i32 && r.step == total);
        if self.phase != JobPhase::Training || !done || self.checkpoints.latest_step() != total {
            return Ok(Vec::new());
        }
        self.set_phase(
            JobPhase::Completed,
            "the last step is trained and committed",
        )?;
        Ok(self.stop_everyone("the job is complete"))
    }

    /// Draining: the stop step is committed and every member has drained.
    pub(super) fn maybe_stop(&mut self) -> Result<Vec<Outgoing>> {
        let (Some(stop_step), Some(world)) = (self.drain_step, self.world.as_ref()) else {
            return Ok(Vec::new());
        };
        let drained = world.members.iter().all(|m| {
            self.workers.get(m).is_some_and(|w| {
                w.report.generation == world.generation
                    && (w.report.state == WorkerState::Drained as i32
                        || w.report.state == WorkerState::Done as i32)
            })
        });
        if self.phase != JobPhase::Draining
            || !drained
            || self.checkpoints.latest_step() < stop_step
        {
            return Ok(Vec::new());
        }
        self.set_phase(JobPhase::Stopped, "drained")?;
        Ok(self.stop_everyone("the job was drained"))
    }
}
