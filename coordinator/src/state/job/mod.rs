//! The job's state and every decision the coordinator takes about it.
//!
//! One owner (`JobState`, behind the service's lock). Each decision is a method that
//! validates its input, writes the facts it must not forget to the journal (fsync) and
//! only then applies them ([`JobState::apply`], the same function a replay uses), and
//! returns the commands to send ([`Outgoing`]). Nothing here does I/O besides the journal;
//! time comes in as `now`, so tests drive it.
//!
//! This file holds the struct and its core: construction, replay, the journal
//! ([`JobState::apply`]), the periodic [`JobState::tick`] and the helpers every decision
//! shares. The decisions themselves are `impl JobState` blocks, one file per concern:
//!
//! - `registration.rs`: workers register, attach and detach their command streams; a
//!   lost worker.
//! - `generations.rs`: a world forms from idle trainers (ranks, backend, join commands)
//!   and a member leaves it.
//! - `reports.rs`: a worker's report: checked against the generation, then what it
//!   changes (a member back to idle, a failure, rank 0's NCCL id, a stale generation).
//! - `checkpointing.rs`: the checkpoint schedule, commits, the drain, and how the job
//!   ends (completed or stopped, both on a committed checkpoint).
//! - `leases.rs`: the teachers' shard leases.
//! - `status.rs`: the status view.
//!
//! A helper that one of these files calls from another is `pub(super)`: shared within
//! `job`, still private to the rest of the crate, as it was before the split.
//!
//! and three leaves that know nothing of `JobState`, so that this file can re-export
//! them while the files above use this one (the module graph stays acyclic):
//! `config.rs` ([`JobConfig`]), `outcome.rs` ([`Outgoing`], [`StateError`],
//! [`Decision`]) and `wire.rs` ([`phase_name`], [`checkpoint_ref`]).

mod checkpointing;
mod config;
mod generations;
mod leases;
mod outcome;
mod registration;
mod reports;
mod status;
mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use proto::wire::{command, JobPhase, Role, Stop, WorkerReport};

pub use self::config::{JobConfig, PlanError};
pub use self::outcome::{Decision, Outgoing, StateError};
pub use self::wire::{checkpoint_ref, phase_name};

use self::outcome::{refuse, Result};
use self::wire::command;
use super::checkpoints::Checkpoints;
use super::lost::LostReason;
use super::rendezvous::World;
use super::teachers::{DoneShard, TeacherQueue};
use crate::journal::{Journal, Record};
use crate::validate::Code;

/// Recent events kept for `coordinator status`.
const EVENTS_KEPT: usize = 20;

/// A registered worker and what it last reported.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// Registration order (ranks are filled in it).
    pub order: u64,
    /// Trainer or teacher, fixed at the first registration.
    pub role: Role,
    /// The host of its latest registration.
    pub host: String,
    /// Its devices (`cpu`, `cuda:N`): all CUDA picks NCCL when trainers.device is `auto`.
    pub devices: Vec<String>,
    /// Where its ring peers reach it.
    pub ring_address: String,
    /// Preferred rank (Kubernetes completion index); negative = none.
    pub rank_hint: i32,
    /// Its /metrics address (a worker may learn it after registering, then reports it).
    pub metrics_address: String,
    /// The open Attach stream, if any.
    pub session: Option<u64>,
    /// Its latest registration, attach or report: a heartbeat timeout counts from it.
    pub last_seen: Instant,
    /// Its latest report.
    pub report: WorkerReport,
    /// The old generation this worker was last told to abort (sent once).
    aborted: u64,
}

/// The job's state and the one owner of every decision about it (see the module docs).
pub struct JobState {
    cfg: JobConfig,
    journal: Option<Journal>,
    phase: JobPhase,
    /// Highest generation ever formed (0 = none yet).
    generation: u64,
    world: Option<World>,
    workers: BTreeMap<String, WorkerInfo>,
    next_worker: u64,
    next_session: u64,
    checkpoints: Checkpoints,
    teachers: TeacherQueue,
    /// Highest step a member of the current world reported.
    max_step: u64,
    drain_step: Option<u64>,
    forming_since: Instant,
    started: Instant,
    restarts: u32,
    events: VecDeque<String>,
    error: String,
    /// Live decisions not yet taken by [`JobState::take_decisions`].
    decisions: Vec<Decision>,
}

impl JobState {
    /// A fresh job (journal `None` in unit tests: decisions are then kept in memory only).
    pub fn new(cfg: JobConfig, journal: Option<Journal>, now: Instant) -> Result<Self> {
        let first_lease_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let mut state = Self {
            teachers: TeacherQueue::new(cfg.shards, cfg.seed, cfg.lease, first_lease_id),
            checkpoints: Checkpoints::new(cfg.keep),
            cfg,
            journal,
            phase: JobPhase::Forming,
            generation: 0,
            world: None,
            workers: BTreeMap::new(),
            next_worker: 1,
            next_session: 1,
            max_step: 0,
            drain_step: None,
            forming_since: now,
            started: now,
            restarts: 0,
            events: VecDeque::new(),
            error: String::new(),
            decisions: Vec::new(),
        };
        state.decide(Record::Started {
            job: state.cfg.job.clone(),
            job_hash: state.cfg.job_hash.clone(),
            total_steps: state.cfg.total_steps,
            image_count: u64::from(state.cfg.image_count),
        })?;
        Ok(state)
    }

    /// The state a journal's records describe. The world of the old process is gone, so a
    /// job that was training, recovering, draining or drained (stopped) recovers: it goes
    /// on from its last committed checkpoint. A completed or failed job stays finished.
    pub fn replay(
        cfg: JobConfig,
        journal: Journal,
        records: &[Record],
        now: Instant,
    ) -> Result<Self> {
        let mut state = Self::new(cfg, None, now)?;
        for record in records {
            if let Record::Started { job_hash, .. } = record {
                if *job_hash != state.cfg.job_hash {
                    return refuse(
                        Code::FailedPrecondition,
                        "journal_of_another_job",
                        format!(
                            "the journal belongs to job {job_hash}, this config is {}",
                            state.cfg.job_hash
                        ),
                    );
                }
            }
            state.apply(record);
        }
        state.journal = Some(journal);
        // The old process's world is gone with it: members rejoin a new generation.
        state.world = None;
        state.event("coordinator restarted; journal replayed");
        match state.phase {
            JobPhase::Training | JobPhase::Recovering => {
                state.set_phase(JobPhase::Recovering, "coordinator restarted")?;
            }
            // A drained job (or one whose drain the old process did not finish) goes on
            // from its last committed checkpoint: a resume after preemption.
            JobPhase::Draining | JobPhase::Stopped => {
                state.drain_step = None;
                state.set_phase(JobPhase::Recovering, "resumed after a drain")?;
            }
            _ => {}
        }
        state.forming_since = now;
        Ok(state)
    }

    /// What the spec fixes for this job.
    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    /// The job's phase.
    pub fn phase(&self) -> JobPhase {
        self.phase
    }

    /// The highest generation ever formed (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current generation's world, while one is formed.
    pub fn world(&self) -> Option<&World> {
        self.world.as_ref()
    }

    /// The committed checkpoints.
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    /// The teacher task queue.
    pub fn teachers(&self) -> &TeacherQueue {
        &self.teachers
    }

    /// A registered worker, by id.
    pub fn worker(&self, id: &str) -> Option<&WorkerInfo> {
        self.workers.get(id)
    }

    /// Whether the job reached a phase it never leaves.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            JobPhase::Completed | JobPhase::Stopped | JobPhase::Failed
        )
    }

    /// The journal failed: the job fails in memory (nothing more can be made durable) and
    /// every worker is stopped.
    pub fn fail_unjournaled(&mut self, reason: &str) -> Vec<Outgoing> {
        self.phase = JobPhase::Failed;
        self.error = reason.to_string();
        self.event(format!("phase FAILED ({reason})"));
        self.stop_everyone(reason)
    }

    /// The live decisions taken since the last call (each returned once), for the
    /// caller to count. Applying or replaying journaled records adds none.
    pub fn take_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.decisions)
    }

    /// Periodic work: heartbeat timeouts, expired leases, forming a world.
    pub fn tick(&mut self, now: Instant) -> Result<Vec<Outgoing>> {
        let timeout = self.cfg.heartbeat_timeout;
        let silent: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.session.is_some() && now.duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in silent {
            out.extend(self.lose(&id, &LostReason::HeartbeatTimeout, now)?);
        }
        self.expire_leases(now);
        out.extend(self.try_form(now)?);
        Ok(out)
    }

    /// Journals `record` (fsync) and applies it.
    fn decide(&mut self, record: Record) -> Result<()> {
        if let Some(journal) = &mut self.journal {
            journal.append(&record)?;
        }
        self.apply(&record);
        Ok(())
    }

    /// The effect of one journaled fact (live or replayed). No side effects outside the
    /// state: what is counted is counted from [`JobState::take_decisions`].
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Started { .. } => {}
            Record::Registered {
                worker_id,
                role,
                host,
            } => self.apply_registered(worker_id, role, host),
            Record::Phase { phase, reason } => {
                self.phase = JobPhase::from_str_name(phase).unwrap_or(JobPhase::Failed);
                if self.phase == JobPhase::Failed {
                    self.error = reason.clone();
                }
                self.event(format!("phase {} ({reason})", phase_name(self.phase)));
            }
            Record::Generation {
                generation,
                members,
            } => {
                self.generation = *generation;
                self.max_step = self.checkpoints.latest_step();
                self.world = Some(World {
                    generation: *generation,
                    members: members.clone(),
                    nccl_id_sent: false,
                });
                self.event(format!(
                    "generation {generation} formed: {} ranks {members:?}",
                    members.len()
                ));
            }
            Record::Lost {
                generation,
                worker_id,
                reason,
            } => {
                if self.world.as_ref().map(|w| w.generation) == Some(*generation) {
                    self.world = None;
                }
                self.restarts += 1;
                self.event(format!(
                    "{worker_id} lost from generation {generation}: {reason}"
                ));
            }
            Record::Committed {
                generation,
                checkpoint,
            } => {
                self.event(format!(
                    "checkpoint at step {} committed by generation {generation}",
                    checkpoint.step
                ));
                self.checkpoints.push(checkpoint.clone());
            }
            Record::Drain {
                generation,
                stop_step,
            } => {
                self.drain_step = Some(*stop_step);
                self.event(format!(
                    "drain of generation {generation} at step {stop_step}"
                ));
            }
            Record::ShardDone {
                shard,
                file,
                checksum,
                bytes,
            } => self.teachers.apply_done(
                *shard,
                DoneShard {
                    file: file.clone(),
                    checksum: checksum.clone(),
                    bytes: *bytes,
                },
            ),
            Record::ShardRequeued { shard, reason } => {
                self.teachers.apply_requeue(*shard);
                self.event(format!("shard {shard} requeued: {reason}"));
            }
        }
    }

    fn apply_registered(&mut self, worker_id: &str, role: &str, host: &str) {
        if let Some(n) = worker_id
            .strip_prefix('w')
            .and_then(|n| n.parse::<u64>().ok())
        {
            self.next_worker = self.next_worker.max(n + 1);
        }
        let order = self.workers.len() as u64;
        self.workers
            .entry(worker_id.to_string())
            .or_insert_with(|| WorkerInfo {
                order,
                role: Role::from_str_name(role).unwrap_or(Role::Unspecified),
                host: host.to_string(),
                devices: Vec::new(),
                ring_address: String::new(),
                rank_hint: -1,
                metrics_address: String::new(),
                session: None,
                last_seen: Instant::now(),
                report: WorkerReport::default(),
                aborted: 0,
            });
    }

    fn event(&mut self, text: impl Into<String>) {
        let text = text.into();
        tracing::info!("{text}");
        let at = self.started.elapsed().as_secs_f64();
        self.events.push_back(format!("+{at:.1}s {text}"));
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    fn set_phase(&mut self, phase: JobPhase, reason: &str) -> Result<()> {
        if self.phase == phase {
            return Ok(());
        }
        self.decide(Record::Phase {
            phase: phase.as_str_name().to_string(),
            reason: reason.to_string(),
        })
    }

    /// Stop to every attached worker, then the end of every command stream.
    fn stop_everyone(&self, reason: &str) -> Vec<Outgoing> {
        let attached: Vec<&String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.session.is_some())
            .map(|(id, _)| id)
            .collect();
        let stop = command(command::Kind::Stop(Stop {
            reason: reason.to_string(),
        }));
        let sends = attached
            .iter()
            .map(|id| Outgoing::Send((*id).clone(), stop.clone()));
        let closes = attached.iter().map(|id| Outgoing::Close((*id).clone()));
        sends.chain(closes).collect()
    }
}

// The tests (`use super::*`) also name wire messages and state types that only the
// concern files use.
#[cfg(test)]
use {
    super::teachers::Acquired,
    proto::job::JobSpec,
    proto::wire::{
        AbortGroup, CheckpointAt, CheckpointRef, CollectiveBackend, Command,
        CommitCheckpointRequest, Drain, JoinGroup, RegisterRequest, WorkerState,
    },
    std::time::Duration,
};

#[cfg(test)]
mod tests;
