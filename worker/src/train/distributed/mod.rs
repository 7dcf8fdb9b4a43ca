//! A trainer under a coordinator (`worker train --coordinator ADDR`), top to bottom:
//! wait for a group, join it (communicator, checkpoint, weights from rank 0), then run
//! the training loop in lockstep with the other ranks over this rank's slice of every
//! global batch (driven by [`coordinated::Coordinated`]), until the job's last step, a
//! drain, an abort (then wait for the next group) or a stop.
//!
//! The coordinator owns the cursor: a generation starts from the checkpoint it names (or
//! from step 0) and every rank derives the same global batches from `proto::plan`.

pub mod coordinated;
pub mod remote_cache;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::job::{JobSpec, TeacherMode};
use proto::wire::{self, command, CheckpointRef, CollectiveBackend, JoinGroup, WorkerState};
use tch::Device;

use self::coordinated::{report_state, Coordinated};
use super::artifacts;
use super::checkpoint;
use super::driver::{LoopEnd, Placement};
use super::error::RunError;
use super::train_loop::{self, LoopRun};
use super::trainer::{TrainError, Trainer};
use crate::comm::nccl::NcclCollective;
use crate::comm::ring::{RingCollective, RingListener};
use crate::comm::{Collective, CommError};
use crate::control::{Control, ControlError, ControlEvent};
use crate::data::loader::SharedSource;
use crate::teacher::job_cache::JobCache;
use crate::teacher::models::TeacherModels;

/// How long ranks wait for each other (connect, collectives) before calling a peer lost.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// Boxed: a run error is large, and every call here returns this type.
    #[error(transparent)]
    Run(Box<RunError>),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("the coordinator sent a job spec this worker cannot read")]
    UnreadableSpec(#[source] toml::de::Error),
    #[error("the job spec's hash here is {here} but the coordinator's is {coordinator} (another version of the job schema?)")]
    SpecHashMismatch { here: String, coordinator: String },
    #[error("the dataset here has {here} images but the coordinator planned {coordinator}: every process must see the same data")]
    DatasetMismatch { here: u64, coordinator: u64 },
}

impl From<RunError> for DistributedError {
    fn from(err: RunError) -> Self {
        DistributedError::Run(Box::new(err))
    }
}

impl DistributedError {
    /// Errors that end one generation but not this trainer: a failed or aborted
    /// collective, or a coordinator that moved on.
    fn ends_generation_only(&self) -> bool {
        match self {
            DistributedError::Comm(_) => true,
            DistributedError::Run(run) => matches!(
                **run,
                RunError::Train(TrainError::Comm(_)) | RunError::GenerationOver { .. }
            ),
            _ => false,
        }
    }
}

/// How this process's work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerExit {
    /// The job reached its last step (and was told to stop).
    Completed,
    /// Drained (Ctrl-C / preemption) and stopped.
    Drained,
    /// The coordinator said stop.
    Stopped,
}

/// The job spec the coordinator sent, checked against its hash.
pub fn job_from_registration(r: &wire::RegisterResponse) -> Result<JobSpec, DistributedError> {
    let spec: JobSpec = toml::from_str(&r.job_toml).map_err(DistributedError::UnreadableSpec)?;
    if spec.hash_hex() != r.job_hash {
        return Err(DistributedError::SpecHashMismatch {
            here: spec.hash_hex(),
            coordinator: r.job_hash.clone(),
        });
    }
    Ok(spec)
}

/// What every generation of this trainer shares.
struct TrainerContext<'a> {
    control: &'a Control,
    spec: &'a JobSpec,
    device: Device,
    listener: &'a RingListener,
    source: SharedSource,
    /// Cache mode: the job's cache and its teachers' fingerprint.
    cache: Option<(JobCache, String)>,
}

/// Serves groups until the job completes, drains, or the coordinator says stop.
pub fn run_trainer(
    control: &Control,
    spec: &JobSpec,
    device: Device,
    listener: &RingListener,
) -> Result<TrainerExit, DistributedError> {
    let source: SharedSource =
        Arc::new(crate::data::job_source::job_source(spec).map_err(RunError::from)?);
    let here = source.image_count() as u64;
    if here != control.registration.image_count {
        return Err(DistributedError::DatasetMismatch {
            here,
            coordinator: control.registration.image_count,
        });
    }
    let cache = match spec.teachers.mode {
        TeacherMode::Cache => Some(cache_of(spec, device, source.image_count())?),
        TeacherMode::Online => None,
    };
    let ctx = TrainerContext {
        control,
        spec,
        device,
        listener,
        source,
        cache,
    };
    let mut trainer: Option<Trainer> = None;
    loop {
        report_state(control, WorkerState::Idle, 0, None);
        let join = match wait_for_join(control)? {
            Some(join) => join,
            None => return Ok(TrainerExit::Stopped),
        };
        tracing::info!(
            "joining generation {} as rank {}/{} (resume: {})",
            join.generation,
            join.rank,
            join.world_size,
            join.resume.as_ref().map_or("none".to_string(), |c| format!(
                "step {} at {}",
                c.step, c.path
            ))
        );
        match run_generation(&ctx, &join, &mut trainer) {
            Ok(LoopEnd::Completed) => return Ok(TrainerExit::Completed),
            Ok(LoopEnd::Drained) => return Ok(TrainerExit::Drained),
            Ok(LoopEnd::Stopped) => return Ok(TrainerExit::Stopped),
            Ok(LoopEnd::Aborted(why)) => {
                tracing::warn!("generation {} aborted: {why}", join.generation);
            }
            Err(err) if err.ends_generation_only() => {
                // A failed peer, an abort, or a coordinator that moved on: it forms a new
                // generation; this trainer reports IDLE and rejoins.
                tracing::warn!("generation {} ended: {err}", join.generation);
            }
            Err(err) => return Err(err),
        }
    }
}

/// The job's teacher cache and the fingerprint of its teachers, computed from frozen
/// copies built here and dropped (same weights, same fingerprint as the teachers').
fn cache_of(
    spec: &JobSpec,
    device: Device,
    image_count: u32,
) -> Result<(JobCache, String), RunError> {
    let cache = JobCache::of(spec, image_count)?;
    let fingerprint = TeacherModels::new(spec, device)?.fingerprint();
    Ok((cache, fingerprint))
}

/// Blocks until the coordinator sends a group (`Some`) or says stop (`None`).
fn wait_for_join(control: &Control) -> Result<Option<JoinGroup>, DistributedError> {
    loop {
        match control.next_event(Duration::from_secs(3600)) {
            Some(ControlEvent::Command(command::Kind::Join(join))) => return Ok(Some(join)),
            Some(ControlEvent::Command(command::Kind::Stop(stop))) => {
                tracing::info!("coordinator says stop: {}", stop.reason);
                return Ok(None);
            }
            Some(ControlEvent::Command(other)) => {
                tracing::debug!("ignoring {other:?} while waiting for a group");
            }
            Some(ControlEvent::Lost(err)) => return Err(err.into()),
            None => {}
        }
    }
}

fn connect_collective(
    control: &Control,
    join: &JoinGroup,
    device: Device,
    listener: &RingListener,
) -> Result<Box<dyn Collective>, DistributedError> {
    let (rank, world) = (join.rank as usize, join.world_size as usize);
    match join.backend() {
        CollectiveBackend::Nccl => {
            let ordinal = match device {
                Device::Cuda(i) => i,
                _ => 0,
            };
            let id = if rank == 0 {
                let id = NcclCollective::unique_id()?;
                let mut report = control.last_report();
                report.nccl_unique_id = id.clone();
                report.generation = join.generation;
                control.report(report);
                id
            } else {
                wait_for_nccl_id(control, join.generation)?
            };
            Ok(Box::new(NcclCollective::new(
                &id,
                rank,
                world,
                ordinal,
                COLLECTIVE_TIMEOUT,
            )?))
        }
        _ => Ok(Box::new(RingCollective::connect(
            listener,
            join.generation,
            rank,
            &join.ring_peers,
            COLLECTIVE_TIMEOUT,
        )?)),
    }
}

fn wait_for_nccl_id(control: &Control, generation: u64) -> Result<Vec<u8>, DistributedError> {
    let deadline = Instant::now() + COLLECTIVE_TIMEOUT;
    while Instant::now() < deadline {
        match control.next_event(Duration::from_millis(200)) {
            Some(ControlEvent::Command(command::Kind::NcclId(id)))
                if id.generation == generation =>
            {
                return Ok(id.unique_id)
            }
            Some(ControlEvent::Lost(err)) => return Err(err.into()),
            Some(ControlEvent::Command(command::Kind::Abort(a))) if a.generation == generation => {
                return Err(CommError::Aborted.into())
            }
            _ => {}
        }
    }
    Err(CommError::Timeout {
        what: "waiting for the NCCL unique id of rank 0".into(),
        peer: 0,
        after: COLLECTIVE_TIMEOUT,
    }
    .into())
}

/// One generation: connect to the peers, agree on the weights, then the training loop.
fn run_generation(
    ctx: &TrainerContext<'_>,
    join: &JoinGroup,
    slot: &mut Option<Trainer>,
) -> Result<LoopEnd, DistributedError> {
    let (control, device) = (ctx.control, ctx.device);
    let generation = join.generation;
    let placement = Placement {
        rank: join.rank as usize,
        world: join.world_size as usize,
    };
    report_state(control, WorkerState::Joining, generation, None);
    let comm = connect_collective(control, join, device, ctx.listener)?;
    let abort = comm.abort_handle();
    control.set_abort_hook(Some(Box::new(move |g| {
        if g == generation || g == u64::MAX {
            abort.abort();
        }
    })));
    let result = train_generation(ctx, join, placement, comm, slot);
    control.set_abort_hook(None);
    result
}

/// The generation's trainer restored and agreed on (rank 0's weights on every rank),
/// then the training loop over `comm`.
fn train_generation(
    ctx: &TrainerContext<'_>,
    join: &JoinGroup,
    placement: Placement,
    mut comm: Box<dyn Collective>,
    slot: &mut Option<Trainer>,
) -> Result<LoopEnd, DistributedError> {
    let total = join.total_steps;
    let trainer = prepare_trainer(slot, ctx.spec, ctx.device, total, join.resume.as_ref())?;
    let start = join.resume.as_ref().map_or(0, |c| c.step);
    trainer
        .broadcast_weights(comm.as_mut())
        .map_err(RunError::from)?;
    trainer
        .check_consistency(comm.as_mut(), start)
        .map_err(RunError::from)?;
    let run = LoopRun {
        spec: ctx.spec,
        trainer,
        source: ctx.source.clone(),
        store: ctx
            .cache
            .as_ref()
            .map(|(cache, fingerprint)| cache.open(fingerprint)),
        start,
        total,
        resumed_from: join.resume.as_ref().map(|c| PathBuf::from(&c.path)),
    };
    let source = ctx.source.clone();
    let mut driver = Coordinated::new(
        ctx.control,
        join.generation,
        placement,
        comm,
        source,
        ctx.device,
    );
    Ok(train_loop::train(run, &mut driver)?.end)
}

/// The trainer for a new generation: restored from `resume`, or fresh when the job
/// starts from step 0 (a trainer that already stepped in an aborted generation is
/// rebuilt: its weights are no longer the initial ones).
fn prepare_trainer<'a>(
    slot: &'a mut Option<Trainer>,
    spec: &JobSpec,
    device: Device,
    total: u64,
    resume: Option<&CheckpointRef>,
) -> Result<&'a mut Trainer, DistributedError> {
    let stale = slot.as_ref().is_some_and(|t| t.optimizer.step > 0);
    if slot.is_none() || (resume.is_none() && stale) {
        *slot = Some(Trainer::new(spec, device, total).map_err(RunError::from)?);
    }
    let Some(trainer) = slot.as_mut() else {
        unreachable!("just filled")
    };
    if let Some(c) = resume {
        let dir = Path::new(&c.path);
        let ckpt = checkpoint::load(dir).map_err(RunError::from)?;
        artifacts::restore(trainer, spec, dir, &ckpt)?;
    }
    Ok(trainer)
}
