//! A trainer under a coordinator (`worker train --coordinator ADDR`), top to bottom:
//! wait for a group, join it (communicator, checkpoint, weights from rank 0), then step
//! in lockstep with the other ranks over this rank's slice of every global batch,
//! reporting each step, checkpointing when rank 0 is told to, until the job's last step,
//! a drain, an abort (then wait for the next group) or a stop.
//!
//! The coordinator owns the cursor: a generation starts from the checkpoint it names (or
//! from step 0) and every rank derives the same global batches from `proto::plan`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::job::{JobSpec, TeacherMode};
use proto::plan::order::{rank_slice, Cursor, OrderPlan};
use proto::wire::{
    self, command, CheckpointRef, CollectiveBackend, CommitCheckpointRequest, JoinGroup,
    WorkerReport, WorkerState,
};
use tch::Device;

use super::checkpoint;
use super::run::{self, CacheGate, ExportPoint, RunError, StepFeed};
use super::trainer::{StepReport, TrainError, Trainer};
use crate::comm::nccl::NcclCollective;
use crate::comm::ring::{RingCollective, RingListener};
use crate::comm::{Collective, CommError};
use crate::control::{Control, ControlError, ControlEvent};
use crate::data::loader::{BatchFeed, SharedSource};
use crate::teacher::cache::{CacheError, CacheStore};
use crate::telemetry::{self, TrainerSeries};

/// How long ranks wait for each other (connect, collectives) before calling a peer lost.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Compare a weight checksum across ranks this often (steps).
const CONSISTENCY_EVERY: u64 = 50;

#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// Boxed: a run error is large, and every call here returns this type.
    #[error(transparent)]
    Run(Box<RunError>),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("collective: {0}")]
    Comm(#[from] CommError),
    #[error("the coordinator sent a job spec this worker cannot read: {0}")]
    BadSpec(String),
    /// The coordinator moved on from this generation (it restarted or lost a member).
    #[error("generation {0} is over: {1}")]
    GenerationOver(u64, String),
    #[error("the dataset here has {here} images but the coordinator planned {coordinator}: every process must see the same data")]
    DatasetMismatch { here: u64, coordinator: u64 },
}

impl From<RunError> for DistributedError {
    fn from(err: RunError) -> Self {
        DistributedError::Run(Box::new(err))
    }
}

impl DistributedError {
    /// Errors that end one generation but not this trainer.
    fn ends_generation_only(&self) -> bool {
        matches!(
            self,
            DistributedError::Comm(_) | DistributedError::GenerationOver(..)
        ) || matches!(self, DistributedError::Run(run) if matches!(**run, RunError::Train(TrainError::Comm(_))))
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

/// What ended one generation.
enum GenerationEnd {
    Completed,
    Drained,
    Stopped,
    /// Aborted by the coordinator or by a failed collective: wait for the next group.
    Aborted(String),
}

/// The job spec the coordinator sent, checked against its hash.
pub fn job_from_registration(r: &wire::RegisterResponse) -> Result<JobSpec, DistributedError> {
    let spec: JobSpec =
        toml::from_str(&r.job_toml).map_err(|e| DistributedError::BadSpec(e.to_string()))?;
    if spec.hash_hex() != r.job_hash {
        return Err(DistributedError::BadSpec(format!(
            "hash {} differs from the coordinator's {} (another version of the job schema?)",
            spec.hash_hex(),
            r.job_hash
        )));
    }
    Ok(spec)
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
        match run_generation(
            control,
            spec,
            device,
            listener,
            &join,
            &source,
            &mut trainer,
        ) {
            Ok(GenerationEnd::Completed) => return Ok(TrainerExit::Completed),
            Ok(GenerationEnd::Drained) => return Ok(TrainerExit::Drained),
            Ok(GenerationEnd::Stopped) => return Ok(TrainerExit::Stopped),
            Ok(GenerationEnd::Aborted(why)) => {
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

/// Commands that arrived during a generation, applied between steps.
#[derive(Default)]
struct Pending {
    checkpoint_at: Option<u64>,
    drain_at: Option<u64>,
    end: Option<GenerationEnd>,
}

fn poll_commands(
    control: &Control,
    generation: u64,
    pending: &mut Pending,
) -> Result<(), DistributedError> {
    while let Some(event) = control.poll_event() {
        match event {
            ControlEvent::Command(command::Kind::Checkpoint(c)) if c.generation == generation => {
                pending.checkpoint_at = Some(c.step);
            }
            ControlEvent::Command(command::Kind::Drain(d)) if d.generation == generation => {
                pending.drain_at = Some(d.stop_step);
            }
            ControlEvent::Command(command::Kind::Abort(a)) if a.generation == generation => {
                pending.end = Some(GenerationEnd::Aborted(a.reason));
            }
            ControlEvent::Command(command::Kind::Stop(s)) => {
                tracing::info!("coordinator says stop: {}", s.reason);
                pending.end = Some(GenerationEnd::Stopped);
            }
            ControlEvent::Command(other) => tracing::debug!("ignoring stale {other:?}"),
            ControlEvent::Lost(err) => return Err(err.into()),
        }
    }
    Ok(())
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

#[allow(clippy::too_many_arguments)]
fn run_generation(
    control: &Control,
    spec: &JobSpec,
    device: Device,
    listener: &RingListener,
    join: &JoinGroup,
    source: &SharedSource,
    slot: &mut Option<Trainer>,
) -> Result<GenerationEnd, DistributedError> {
    let generation = join.generation;
    let (rank, world) = (join.rank as usize, join.world_size as usize);
    report_state(control, WorkerState::Joining, generation, None);
    let mut comm = connect_collective(control, join, device, listener)?;
    let abort = comm.abort_handle();
    control.set_abort_hook(Some(Box::new(move |g| {
        if g == generation || g == u64::MAX {
            abort.abort();
        }
    })));

    let total = join.total_steps;
    let trainer = prepare_trainer(slot, spec, device, total, join.resume.as_ref())?;
    let mut step = join.resume.as_ref().map_or(0, |c| c.step);
    trainer
        .broadcast_weights(comm.as_mut())
        .map_err(RunError::from)?;
    trainer
        .check_consistency(comm.as_mut(), step)
        .map_err(RunError::from)?;

    let order = OrderPlan::new(spec.job.seed, source.image_count(), spec.train.batch_size)
        .map_err(RunError::from)?;
    let steps_per_epoch = order.steps_per_epoch();
    let mut cursor = Cursor::from_global_step(step, steps_per_epoch).map_err(RunError::from)?;
    let feed: BatchFeed = Box::new(
        order
            .resume(cursor)
            .map_err(RunError::from)?
            .take(total.saturating_sub(step) as usize)
            .map(move |(cursor, global)| {
                // The loader prepares only this rank's slice; validation guarantees W | B.
                let mine = rank_slice(&global, rank, world)
                    .map(|s| s.to_vec())
                    .unwrap_or_default();
                (cursor, mine)
            }),
    );
    let store = match spec.teachers.mode {
        TeacherMode::Cache => Some(open_cache(spec, source.as_ref(), trainer)?),
        TeacherMode::Online => None,
    };
    let mut gate = RemoteCache {
        control,
        generation,
    };
    let mut steps = StepFeed::new(spec, device, source.clone(), feed, store)?;

    let run_dir = PathBuf::from(&spec.job.run_dir);
    let micro = run::micro_batch_size(spec, world);
    let rows_per_image = trainer.rows_per_image(spec.data.vfm_resolution);
    let mut pending = Pending::default();
    // Process totals: they continue across generations, as the coordinator sums them.
    let last = control.last_report();
    let mut images_total = last.images_total;
    let mut cache = CacheCounts {
        hits: last.cache_hits,
        misses: last.cache_misses,
    };
    let series = TrainerSeries::new(rank, world, generation, &last);
    let mut checkpoints = Committer {
        control,
        generation,
        spec,
        root: run_dir.join("checkpoints"),
        total,
        saved: step,
        series: &series,
    };
    let result = loop {
        poll_commands(control, generation, &mut pending)?;
        if let Some(end) = pending.end.take() {
            break end;
        }
        if step >= total {
            if rank == 0 {
                checkpoints.save(trainer, step, cursor, None)?;
                let path = run::write_export(trainer, spec, ExportPoint::Final)?;
                tracing::info!("job done at step {step}: exported {}", path.display());
            }
            report_state(control, WorkerState::Done, generation, Some(step));
            break wait_for_stop(control, generation, GenerationEnd::Completed);
        }
        let waited = Instant::now();
        let mut cache_wait = 0.0;
        if let (StepFeed::Cached { store, .. }, Ok(global)) = (&steps, order.batch_at(cursor)) {
            // Every rank waits for the whole global batch's shards, so no rank sits in a
            // collective while another waits for the cache.
            let needed = store.shards_needed(&global).map_err(RunError::from)?;
            let mine = rank_slice(&global, rank, world).unwrap_or_default();
            let (hits, misses) = store.hits_and_misses(mine).map_err(RunError::from)?;
            cache.hits += hits;
            cache.misses += misses;
            gate.ready(store, &needed)?;
            cache_wait = waited.elapsed().as_secs_f64();
        }
        let (_, rank_images, micro_batches, counts) = steps
            .next_step(trainer, micro, rows_per_image, &mut gate)?
            .ok_or(RunError::LoaderEnded(step))?;
        let data_wait = waited.elapsed().as_secs_f64();
        let images = rank_images * world as u64;
        let started = Instant::now();
        let report = trainer
            .train_step(step, &micro_batches, counts, Some(comm.as_mut()))
            .map_err(RunError::from)?;
        step += 1;
        cursor.advance(steps_per_epoch);
        images_total += rank_images;
        if step % CONSISTENCY_EVERY == 0 {
            trainer
                .check_consistency(comm.as_mut(), step)
                .map_err(RunError::from)?;
        }
        let elapsed = started.elapsed().as_secs_f64() + data_wait;
        let published = step_report(StepFacts {
            generation,
            step,
            cursor,
            report: &report,
            sequence: comm.sequence(),
            rank_images,
            elapsed,
            data_wait,
            images_total,
            cache_wait,
            cache,
            skips: telemetry::skips(&source.skip_counts()),
            gpu_memory_bytes: telemetry::gpu_memory_bytes(device),
        });
        series.step(&published);
        control.report(published);
        if step % spec.train.log_every == 0 || step == total {
            tracing::info!(
                "gen {generation} rank {rank}: step {step}/{total} epoch {} loss {:.4} ({:.1} img/s)",
                cursor.epoch,
                report.total,
                images as f64 / elapsed.max(1e-9)
            );
        }
        if rank == 0 && cursor.step == 0 && step < total {
            run::write_export(trainer, spec, ExportPoint::EpochEnd(cursor.epoch))?;
        }
        if rank == 0 && pending.checkpoint_at.is_some_and(|at| step >= at) {
            pending.checkpoint_at = None;
            checkpoints.save(trainer, step, cursor, Some(report.total))?;
        }
        if pending.drain_at.is_some_and(|at| step >= at) {
            if rank == 0 {
                checkpoints.save(trainer, step, cursor, Some(report.total))?;
            }
            report_state(control, WorkerState::Drained, generation, Some(step));
            break wait_for_stop(control, generation, GenerationEnd::Drained);
        }
    };
    control.set_abort_hook(None);
    Ok(result)
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
        let ckpt = checkpoint::load(Path::new(&c.path)).map_err(RunError::from)?;
        if ckpt.state.config_hash != spec.hash_hex() {
            return Err(RunError::ConfigChanged {
                dir: PathBuf::from(&c.path),
                found: ckpt.state.config_hash,
                expected: spec.hash_hex(),
            }
            .into());
        }
        trainer
            .restore(&ckpt.state, &ckpt.student, &ckpt.optimizer)
            .map_err(RunError::from)?;
    }
    Ok(trainer)
}

/// Rank 0's checkpoints in one generation: each step is written and committed once.
struct Committer<'a> {
    control: &'a Control,
    generation: u64,
    spec: &'a JobSpec,
    root: PathBuf,
    total: u64,
    /// The last step checkpointed (the resume step counts).
    saved: u64,
    series: &'a TrainerSeries,
}

impl Committer<'_> {
    /// Writes a checkpoint of `step` unless it exists, and asks the coordinator to
    /// commit it.
    fn save(
        &mut self,
        trainer: &Trainer,
        step: u64,
        cursor: Cursor,
        last_loss: Option<f64>,
    ) -> Result<(), DistributedError> {
        if self.saved >= step {
            return Ok(());
        }
        let started = Instant::now();
        commit(self, trainer, step, cursor, last_loss)?;
        self.series.checkpoint(started.elapsed().as_secs_f64());
        self.saved = step;
        Ok(())
    }
}

fn commit(
    c: &Committer<'_>,
    trainer: &Trainer,
    step: u64,
    cursor: Cursor,
    last_loss: Option<f64>,
) -> Result<(), DistributedError> {
    let (control, generation) = (c.control, c.generation);
    report_state(control, WorkerState::Checkpointing, generation, Some(step));
    let dir = run::save(
        trainer,
        c.spec,
        &c.root,
        step,
        cursor,
        c.total,
        last_loss.unwrap_or(f64::NAN),
    )?;
    let checksum = checkpoint::state_checksum(&dir).map_err(RunError::from)?;
    let request = CommitCheckpointRequest {
        worker_id: control.worker_id(),
        generation,
        checkpoint: Some(CheckpointRef {
            step,
            path: dir.display().to_string(),
            checksum,
            epoch: cursor.epoch as u64,
            epoch_step: cursor.step,
        }),
    };
    let answer = match control.call("CommitCheckpoint", |mut c| {
        let request = request.clone();
        async move { c.commit_checkpoint(request).await }
    }) {
        Ok(answer) => answer,
        Err(ControlError::Refused { status, .. })
            if status.code() == tonic::Code::FailedPrecondition =>
        {
            return Err(DistributedError::GenerationOver(
                generation,
                status.message().to_string(),
            ))
        }
        Err(err) => return Err(err.into()),
    };
    if !answer.accepted {
        tracing::warn!("coordinator did not accept checkpoint {}", dir.display());
    }
    Ok(())
}

/// After DONE or DRAINED: the coordinator either stops us (`end`) or, if it lost a
/// member before it could finish the job, aborts the generation so we rejoin.
fn wait_for_stop(control: &Control, generation: u64, end: GenerationEnd) -> GenerationEnd {
    loop {
        match control.next_event(Duration::from_secs(60)) {
            Some(ControlEvent::Command(command::Kind::Stop(_))) | Some(ControlEvent::Lost(_)) => {
                return end
            }
            Some(ControlEvent::Command(command::Kind::Abort(a))) if a.generation == generation => {
                return GenerationEnd::Aborted(a.reason)
            }
            _ => {}
        }
    }
}

fn report_state(control: &Control, state: WorkerState, generation: u64, step: Option<u64>) {
    let mut report = control.last_report();
    report.state = state as i32;
    report.generation = generation;
    if let Some(step) = step {
        report.step = step;
    }
    if state != WorkerState::Joining {
        report.nccl_unique_id.clear();
    }
    control.report(report);
}

/// What a step's report is made of.
struct StepFacts<'a> {
    generation: u64,
    step: u64,
    cursor: Cursor,
    report: &'a StepReport,
    sequence: u64,
    /// Images of this rank's slice (the job's rate is the sum over ranks).
    rank_images: u64,
    /// Seconds, the data wait included.
    elapsed: f64,
    data_wait: f64,
    images_total: u64,
    /// Seconds of `data_wait` spent waiting for teacher shards.
    cache_wait: f64,
    cache: CacheCounts,
    skips: Vec<wire::SkipCount>,
    gpu_memory_bytes: u64,
}

/// This process's cache lookups so far (records of its slices).
#[derive(Clone, Copy, Debug, Default)]
struct CacheCounts {
    hits: u64,
    misses: u64,
}

/// The report of a completed step: for the coordinator and, through
/// [`TrainerSeries::step`], for this process's `/metrics`.
fn step_report(f: StepFacts<'_>) -> WorkerReport {
    let r = f.report;
    WorkerReport {
        worker_id: String::new(),
        state: WorkerState::Training as i32,
        generation: f.generation,
        step: f.step,
        epoch: f.cursor.epoch as u64,
        losses: Some(wire::Losses {
            content: r.content,
            context: r.context,
            total: r.total,
        }),
        images_per_s: f.rank_images as f64 / f.elapsed.max(1e-9),
        step_times: Some(wire::StepTimes {
            data_wait: f.data_wait,
            forward: r.forward_s,
            backward: r.backward_s,
            all_reduce: r.all_reduce_s,
            optimizer: r.optimizer_s,
            total: f.elapsed,
        }),
        collective_seq: f.sequence,
        memory_bytes: crate::runtime::resident_bytes(),
        gpu_memory_bytes: f.gpu_memory_bytes,
        images_total: f.images_total,
        learning_rate: r.lr,
        skips: f.skips,
        cache_wait: f.cache_wait,
        cache_hits: f.cache.hits,
        cache_misses: f.cache.misses,
        ..Default::default()
    }
}

/// The job's teacher cache as this trainer reads it (teachers' fingerprint from the
/// trainer's own frozen copies: same weights, same fingerprint).
fn open_cache(
    spec: &JobSpec,
    source: &dyn crate::data::source::ImageSource,
    trainer: &Trainer,
) -> Result<CacheStore, DistributedError> {
    let shards = proto::plan::order::Shards::new(source.image_count(), spec.data.shard_size as u32)
        .map_err(RunError::from)?;
    let dir = proto::cache::cache_dir(Path::new(&spec.job.run_dir));
    Ok(CacheStore::open(
        &dir,
        &trainer.teacher_fingerprint(spec),
        shards,
    ))
}

/// Longest a step waits for teacher shards before the trainer fails, naming them.
const CACHE_WAIT_LIMIT: Duration = Duration::from_secs(1800);
const CACHE_POLL: Duration = Duration::from_millis(250);

/// Cache-mode steps under a coordinator: a shard that is not there yet is waited for
/// (asking the coordinator, reporting `WAITING_FOR_CACHE`, bounded); a corrupt one is
/// reported, recomputed by a teacher, and read again.
struct RemoteCache<'a> {
    control: &'a Control,
    generation: u64,
}

impl RemoteCache<'_> {
    fn shard_status(&self, shard: u32) -> Result<wire::ShardStatusResponse, RunError> {
        let request = wire::ShardStatusRequest { shard };
        self.control
            .call("ShardStatus", |mut c| async move {
                c.shard_status(request).await
            })
            .map_err(|e| RunError::Coordinator(e.to_string()))
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
        self.control
            .call("ReportCorruptShard", |mut c| {
                let request = request.clone();
                async move { c.report_corrupt_shard(request).await }
            })
            .map_err(|e| RunError::Coordinator(e.to_string()))?;
        store.reopen(shard);
        // The report answers after the requeue is journaled, so from here on `Done` means
        // a new completion. Its checksum cannot tell: teachers are deterministic, and a
        // recomputed shard has the bytes (and checksum) of the file before the damage.
        self.wait(store, vec![shard], |s| s.state() == wire::ShardState::Done)
    }
}
