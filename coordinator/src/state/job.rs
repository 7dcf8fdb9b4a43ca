//! The job's state and every decision the coordinator takes about it.
//!
//! One owner (`JobState`, behind the service's lock). Each decision is a method that
//! validates its input, writes the facts it must not forget to the journal (fsync) and
//! only then applies them ([`JobState::apply`], the same function a replay uses), and
//! returns the commands to send ([`Outgoing`]). Nothing here does I/O besides the journal;
//! time comes in as `now`, so tests drive it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use proto::job::{JobSpec, TeacherMode};
use proto::plan::order::{OrderError, Shards};
use proto::plan::steps;
use proto::wire::{
    command, AbortGroup, CheckpointAt, CheckpointRef, CollectiveBackend, Command,
    CommitCheckpointRequest, CompleteShardRequest, Drain, JobPhase, JobStatus, JoinGroup, Losses,
    NcclId, RankStatus, RegisterRequest, RegisterResponse, Role, SkipCount, Stop, TeacherStatus,
    WorkerReport, WorkerState,
};

use super::checkpoints::Checkpoints;
use super::lost::LostReason;
use super::rendezvous::{assign_ranks, world_size, Candidate, World};
use super::teachers::{Acquired, DoneShard, LeaseError, TeacherQueue};
use crate::journal::{Checkpoint, Journal, JournalError, Record};
use crate::validate::{self, Code, Refusal};

/// Recent events kept for `coordinator status`.
const EVENTS_KEPT: usize = 20;

/// What the job's spec fixes for the coordinator.
#[derive(Clone, Debug)]
pub struct JobConfig {
    pub job: String,
    pub job_hash: String,
    pub job_toml: String,
    pub seed: u64,
    pub image_count: u32,
    pub shards: Shards,
    /// epochs × steps_per_epoch, capped by train.max_steps ([`steps::total_steps`]).
    pub total_steps: u64,
    pub global_batch: u64,
    pub every_steps: u64,
    pub keep: usize,
    pub min: usize,
    pub max: usize,
    pub join_wait: Duration,
    pub heartbeat_timeout: Duration,
    pub lease: Duration,
    pub teacher_cache: bool,
    /// trainers.device (`auto`, `cpu`, `cuda:N`): picks the collective backend.
    pub trainer_device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the dataset of {images} images cannot be planned: {source}")]
    Order {
        images: u32,
        #[source]
        source: OrderError,
    },
}

impl JobConfig {
    pub fn from_spec(spec: &JobSpec, image_count: u32) -> Result<Self, PlanError> {
        let plan_err = |source| PlanError::Order {
            images: image_count,
            source,
        };
        let total_steps = steps::total_steps(
            image_count,
            spec.train.batch_size,
            spec.train.epochs,
            spec.train.max_steps,
        )
        .map_err(plan_err)?;
        let shard_size = u32::try_from(spec.data.shard_size).unwrap_or(u32::MAX);
        Ok(Self {
            job: spec.job.name.clone(),
            job_hash: spec.hash_hex(),
            job_toml: spec.to_toml(),
            seed: spec.job.seed,
            image_count,
            shards: Shards::new(image_count, shard_size).map_err(plan_err)?,
            total_steps,
            global_batch: spec.train.batch_size as u64,
            every_steps: spec.checkpoint.every_steps,
            keep: spec.checkpoint.keep,
            min: spec.trainers.min,
            max: spec.trainers.max,
            join_wait: Duration::from_secs(spec.trainers.join_wait_s),
            heartbeat_timeout: Duration::from_secs(spec.coordinator.heartbeat_timeout_s),
            lease: Duration::from_secs(spec.teachers.lease_s),
            teacher_cache: spec.teachers.mode == TeacherMode::Cache,
            trainer_device: spec.trainers.device.clone(),
        })
    }

    /// The first checkpoint step strictly after `after` (the final step is always one).
    pub fn next_checkpoint(&self, after: u64) -> Option<u64> {
        if after >= self.total_steps {
            return None;
        }
        let next = match self.every_steps {
            0 => self.total_steps,
            every => (after / every + 1) * every,
        };
        Some(next.min(self.total_steps))
    }
}

/// A command for one worker, or the end of its command stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    Send(String, Command),
    Close(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
}

type Result<T, E = StateError> = std::result::Result<T, E>;

fn refuse<T>(code: Code, reason: &'static str, message: impl Into<String>) -> Result<T> {
    Err(Refusal::new(code, reason, message).into())
}

/// A decision taken live (journaled by this process, not replayed) that the service
/// counts in the metrics, once: [`JobState::take_decisions`] hands each out once, and a
/// journal replay ([`JobState::replay`], [`JobState::apply`]) produces none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The current generation was aborted because a member was lost.
    GenerationAborted(LostReason),
    /// Rank 0's checkpoint at `step` was committed.
    CheckpointCommitted {
        /// The global step of the committed checkpoint.
        step: u64,
    },
}

/// A registered worker and what it last reported.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// Registration order (ranks are filled in it).
    pub order: u64,
    pub role: Role,
    pub host: String,
    pub devices: Vec<String>,
    pub ring_address: String,
    pub rank_hint: i32,
    pub metrics_address: String,
    /// The open Attach stream, if any.
    pub session: Option<u64>,
    pub last_seen: Instant,
    pub report: WorkerReport,
    /// The old generation this worker was last told to abort (sent once).
    aborted: u64,
}

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
    /// job that was training (or recovering) recovers; one that was draining stops.
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
            JobPhase::Draining => state.set_phase(
                JobPhase::Stopped,
                "coordinator restarted during a drain; the last committed checkpoint stands",
            )?,
            _ => {}
        }
        state.forming_since = now;
        Ok(state)
    }

    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    pub fn phase(&self) -> JobPhase {
        self.phase
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn world(&self) -> Option<&World> {
        self.world.as_ref()
    }

    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    pub fn teachers(&self) -> &TeacherQueue {
        &self.teachers
    }

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

    // ---- registration and streams -------------------------------------------------

    pub fn register(&mut self, req: &RegisterRequest, now: Instant) -> Result<RegisterResponse> {
        validate::register(req)?;
        if self.is_finished() {
            return refuse(
                Code::FailedPrecondition,
                "job_finished",
                format!("the job is {}", phase_name(self.phase)),
            );
        }
        let role = Role::try_from(req.role).unwrap_or(Role::Unspecified);
        let id = if req.worker_id.is_empty() {
            let id = format!("w{}", self.next_worker);
            self.decide(Record::Registered {
                worker_id: id.clone(),
                role: role.as_str_name().to_string(),
                host: req.host.clone(),
            })?;
            id
        } else {
            match self.workers.get(&req.worker_id) {
                None => {
                    return refuse(
                        Code::NotFound,
                        "unknown_worker_id",
                        format!(
                            "worker id {:?} is not known to this job; register without one",
                            req.worker_id
                        ),
                    )
                }
                Some(w) if w.role != role => {
                    return refuse(
                        Code::InvalidArgument,
                        "role_changed",
                        format!(
                            "worker {} registered as {}, not {}",
                            req.worker_id,
                            w.role.as_str_name(),
                            role.as_str_name()
                        ),
                    )
                }
                Some(_) => req.worker_id.clone(),
            }
        };
        if let Some(w) = self.workers.get_mut(&id) {
            w.host = req.host.clone();
            w.devices = req.devices.clone();
            w.ring_address = req.ring_address.clone();
            w.rank_hint = req.rank_hint;
            w.metrics_address = req.metrics_address.clone();
            w.last_seen = now;
        }
        self.event(format!(
            "{id} registered ({} on {})",
            role.as_str_name(),
            req.host
        ));
        Ok(RegisterResponse {
            worker_id: id,
            job_toml: self.cfg.job_toml.clone(),
            job_hash: self.cfg.job_hash.clone(),
            protocol_version: proto::PROTOCOL_VERSION,
            image_count: u64::from(self.cfg.image_count),
        })
    }

    /// Opens a command stream for a registered worker; returns its session number. A
    /// newer stream replaces an older one (`Close` for the old one is the caller's job).
    pub fn attach(&mut self, worker_id: &str, now: Instant) -> Result<u64> {
        let session = self.next_session;
        let Some(w) = self.workers.get_mut(worker_id) else {
            return refuse(
                Code::NotFound,
                "unknown_worker_id",
                format!("worker id {worker_id:?} is not registered"),
            );
        };
        self.next_session += 1;
        w.session = Some(session);
        w.last_seen = now;
        Ok(session)
    }

    /// The stream of `session` ended: the worker is lost (if that is still its stream).
    pub fn detach(&mut self, worker_id: &str, session: u64, now: Instant) -> Result<Vec<Outgoing>> {
        match self.workers.get(worker_id) {
            Some(w) if w.session == Some(session) => {
                self.lose(worker_id, &LostReason::StreamClosed, now)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// A worker is gone: during training its generation is aborted and a new one forms.
    fn lose(
        &mut self,
        worker_id: &str,
        reason: &LostReason,
        now: Instant,
    ) -> Result<Vec<Outgoing>> {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.session = None;
        }
        let mut out = vec![Outgoing::Close(worker_id.to_string())];
        if self.member_of_live_world(worker_id).is_none() {
            self.event(format!("{worker_id} detached: {reason}"));
            return Ok(out);
        }
        out.extend(self.leave_generation(worker_id, reason, now)?);
        Ok(out)
    }

    /// The current world while the job runs, if `worker_id` is one of its members.
    fn member_of_live_world(&self, worker_id: &str) -> Option<World> {
        let world = self.world.as_ref()?;
        (world.rank_of(worker_id).is_some() && !self.is_finished()).then(|| world.clone())
    }

    /// `worker_id`, a member of the current generation, is out of it (lost, failed, or
    /// back to IDLE on its own): journaled, the other members are told to abort, and the
    /// job recovers with a new generation (or stops, during a drain).
    fn leave_generation(
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

    fn try_form(&mut self, now: Instant) -> Result<Vec<Outgoing>> {
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

    /// `CheckpointAt` for rank 0: the next checkpoint step after `after`.
    fn checkpoint_command(&self, after: u64) -> Option<Outgoing> {
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

    // ---- reports --------------------------------------------------------------------

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

    fn rank0_report(&self) -> Option<&WorkerReport> {
        let world = self.world.as_ref()?;
        let w = self.workers.get(world.members.first()?)?;
        (w.report.generation == world.generation).then_some(&w.report)
    }

    /// Rank 0 is done at the last step and that step's checkpoint is committed.
    fn maybe_complete(&mut self) -> Result<Vec<Outgoing>> {
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
    fn maybe_stop(&mut self) -> Result<Vec<Outgoing>> {
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

    // ---- checkpoints and drain --------------------------------------------------------

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

    // ---- teacher leases -----------------------------------------------------------------

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
    fn expire_leases(&mut self, now: Instant) {
        for (shard, worker) in self.teachers.expire(now) {
            self.event(format!("lease of shard {shard} by {worker} expired"));
        }
    }

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

    // ---- status ---------------------------------------------------------------------

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

fn command(kind: command::Kind) -> Command {
    Command { kind: Some(kind) }
}

/// `TRAINING` for `JOB_PHASE_TRAINING`.
pub fn phase_name(phase: JobPhase) -> &'static str {
    let name = phase.as_str_name();
    name.strip_prefix("JOB_PHASE_").unwrap_or(name)
}

pub fn checkpoint_ref(c: &Checkpoint) -> CheckpointRef {
    CheckpointRef {
        step: c.step,
        path: c.path.clone(),
        checksum: c.checksum.clone(),
        epoch: c.epoch,
        epoch_step: c.epoch_step,
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

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
