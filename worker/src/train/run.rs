//! Single-process training, top to bottom: data order, teachers, step, log,
//! checkpoint, export. `worker train --standalone` runs this.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::dataset::SkipCounts;
use proto::job::{JobSpec, TeacherMode};
use proto::plan::crops::CropPlan;
use proto::plan::order::{Cursor, OrderError, OrderPlan, Shards};
use tch::Device;

use super::checkpoint::{self, Checkpoint, CheckpointError, CheckpointState};
use super::export::{self, ExportError};
use super::trainer::{GlobalCounts, StepReport, TrainError, Trainer};
use crate::data::job_source::{job_source, JobSourceError};
use crate::data::loader::{
    BatchFeed, CachePrep, LoadError, LoadedBatch, Loader, LoaderConfig, LoaderError, LoaderStats,
    SamplePrep, SharedSource,
};
use crate::data::sample::{self, Batch, CacheRef, CachedSample, Resolutions, Sample, SampleError};
use crate::data::source::ImageSource;
use crate::distill::step::Targets;
use crate::teacher::cache::{CacheError, CacheStore};
use crate::teacher::models::TeacherModels;
use crate::teacher::shard::{ensure_shard, ShardOutcome};
use crate::teacher::TeacherError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("data order: {0}")]
    Order(#[from] OrderError),
    #[error("data: {0}")]
    Sample(#[from] SampleError),
    #[error("data: {0}")]
    Load(#[from] LoadError),
    #[error("data loader: {0}")]
    Loader(#[from] LoaderError),
    #[error("the data loader ended before step {0}: a loader bug")]
    LoaderEnded(u64),
    #[error(transparent)]
    Source(#[from] JobSourceError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("export: {0}")]
    Export(#[from] ExportError),
    #[error("{0}")]
    Unsupported(String),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("teacher cache: {0}")]
    Cache(#[from] CacheError),
    #[error("teachers: {0}")]
    Teacher(#[from] TeacherError),
    #[error("{dir} was written by another job config (hash {found}, this job {expected}); use another job.run_dir or remove the checkpoints")]
    ConfigChanged {
        dir: PathBuf,
        found: String,
        expected: String,
    },
}

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    pub steps_run: u64,
    pub final_step: u64,
    pub images: u64,
    /// Total loss of every step this process ran, in order.
    pub losses: Vec<f64>,
    pub resumed_from: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub exports: Vec<PathBuf>,
    pub wall: Duration,
    /// Time inside the step loop (data wait, targets, steps, checkpoints, exports):
    /// `wall` without building models and the teacher cache.
    pub loop_wall: Duration,
    /// Bad images skipped, by reason (each replaced by the next good image in index
    /// order, see `data::skips`); all zero for synthetic data.
    pub skips: SkipCounts,
}

/// Runs the job in this process on `device` until its last step.
pub fn run_standalone(spec: &JobSpec, device: Device) -> Result<RunSummary, RunError> {
    let source = Arc::new(job_source(spec)?);
    let mut summary = run(spec, device, source.clone())?;
    summary.skips = source.counts();
    Ok(summary)
}

/// Cache mode in one process: computes every shard without a usable file (teachers
/// built here and dropped afterwards), then opens the store the loop reads.
pub fn prepare_cache(
    spec: &JobSpec,
    device: Device,
    source: &dyn ImageSource,
) -> Result<CacheStore, RunError> {
    let shards = Shards::new(source.image_count(), spec.data.shard_size as u32)?;
    let dir = proto::cache::cache_dir(Path::new(&spec.job.run_dir));
    let models = TeacherModels::new(spec, device)?;
    for shard in 0..shards.len() {
        if let ShardOutcome::Written(w) = ensure_shard(spec, &models, source, &shards, shard, &dir)?
        {
            tracing::info!(
                "teacher cache shard {shard}: {} images, {} bytes, sha256 {}",
                w.images,
                w.bytes,
                w.checksum
            );
        }
    }
    Ok(CacheStore::open(&dir, &models.fingerprint(), shards))
}

/// The loop, over any image source (shared with the data loader's threads).
pub fn run(spec: &JobSpec, device: Device, source: SharedSource) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let run_dir = PathBuf::from(&spec.job.run_dir);
    let ckpt_root = run_dir.join("checkpoints");
    let batch_size = spec.train.batch_size;
    let order = OrderPlan::new(spec.job.seed, source.image_count(), batch_size)?;
    let steps_per_epoch = order.steps_per_epoch();
    let total =
        proto::plan::steps::capped_total(steps_per_epoch, spec.train.epochs, spec.train.max_steps);
    let mut trainer = Trainer::new(spec, device, total)?;
    tracing::info!("VFM: {}", trainer.sources.1);
    let config_hash = spec.hash_hex();

    let (mut step, mut cursor, mut resumed_from) = (0u64, Cursor { epoch: 0, step: 0 }, None);
    if let Some((dir, ckpt)) = checkpoint::load_latest(&ckpt_root) {
        if ckpt.state.config_hash != config_hash {
            return Err(RunError::ConfigChanged {
                dir,
                found: ckpt.state.config_hash,
                expected: config_hash,
            });
        }
        trainer.restore(&ckpt.state, &ckpt.student, &ckpt.optimizer)?;
        (step, cursor) = (ckpt.state.step, ckpt.state.cursor);
        tracing::info!(
            "resumed from {} (step {step}, epoch {}, epoch step {})",
            dir.display(),
            cursor.epoch,
            cursor.step
        );
        resumed_from = Some(dir);
    }
    let micro = micro_batch_size(spec, 1);
    let rows_per_image = trainer.rows_per_image(spec.data.vfm_resolution);
    tracing::info!(
        "training {total} steps ({steps_per_epoch} per epoch, {} images, global batch {batch_size}, micro-batch {micro}) on {device:?}",
        source.image_count()
    );

    let mut summary = RunSummary {
        steps_run: 0,
        final_step: step,
        images: 0,
        losses: Vec::new(),
        resumed_from,
        checkpoint: None,
        exports: Vec::new(),
        wall: Duration::ZERO,
        loop_wall: Duration::ZERO,
        skips: SkipCounts::default(),
    };
    let mut last_saved = step;
    let mut window = (Instant::now(), 0u64);
    // Samples are prepared ahead on data.loader_threads threads, in the order's order.
    let batches: BatchFeed = Box::new(
        order
            .resume(cursor)?
            .take(total.saturating_sub(step) as usize),
    );
    let mut feed = StepFeed::new(spec, device, source, batches, None)?;
    let loop_started = Instant::now();
    while step < total {
        let (loaded_cursor, images, micro_batches, counts) = feed
            .next_step(&trainer, micro, rows_per_image, &mut LocalCache)?
            .ok_or(RunError::LoaderEnded(step))?;
        debug_assert_eq!(loaded_cursor, cursor, "the loader follows the order");
        let report = trainer.train_step(step, &micro_batches, counts, None)?;
        step += 1;
        cursor.advance(steps_per_epoch);
        summary.steps_run += 1;
        summary.images += images;
        summary.losses.push(report.total);
        window.1 += images;
        if step % spec.train.log_every == 0 || step == total {
            log_step(
                step,
                total,
                cursor,
                &report,
                window.1 as f64 / window.0.elapsed().as_secs_f64(),
            );
            window = (Instant::now(), 0);
            tracing::info!("data: {}", feed.stats());
        }
        if spec.checkpoint.every_steps > 0 && step % spec.checkpoint.every_steps == 0 {
            summary.checkpoint = Some(save(
                &trainer,
                spec,
                &ckpt_root,
                step,
                cursor,
                total,
                report.total,
            )?);
            last_saved = step;
        }
        if cursor.step == 0 {
            // An epoch just ended: save its merged weights (docs/method.md §6).
            let path = write_export(&trainer, spec, ExportPoint::EpochEnd(cursor.epoch))?;
            tracing::info!("epoch {} done: exported {}", cursor.epoch, path.display());
            summary.exports.push(path);
        }
    }
    if step > last_saved || summary.checkpoint.is_none() {
        let last_loss = summary.losses.last().copied().unwrap_or(f64::NAN);
        summary.checkpoint = Some(save(
            &trainer, spec, &ckpt_root, step, cursor, total, last_loss,
        )?);
    }
    summary
        .exports
        .push(write_export(&trainer, spec, ExportPoint::Final)?);
    summary.final_step = step;
    summary.loop_wall = loop_started.elapsed();
    summary.wall = started.elapsed();
    Ok(summary)
}

/// One step's inputs: its cursor, images, micro-batches with targets, this trainer's
/// item counts (the trainer sums them over the ranks).
pub(crate) type StepInput = (Cursor, u64, Vec<(Batch, Targets)>, GlobalCounts);

/// What a cache-mode step does when the shards it reads are not usable: standalone, they
/// were all computed up front, so it fails; under a coordinator it asks for them and
/// waits (`train::distributed`).
pub(crate) trait CacheGate {
    /// Returns once every shard of `shards` can be read (or fails, naming them).
    fn ready(&mut self, store: &CacheStore, shards: &[u32]) -> Result<(), RunError>;
    /// A record failed its checks: `Ok` once its shard was recomputed and may be read
    /// again, `Err` to fail the step.
    fn corrupt(&mut self, store: &CacheStore, err: CacheError) -> Result<(), RunError>;
}

/// Standalone: every shard was computed before the loop; a bad record fails the run.
pub(crate) struct LocalCache;

impl CacheGate for LocalCache {
    fn ready(&mut self, store: &CacheStore, shards: &[u32]) -> Result<(), RunError> {
        Ok(store.wait_for(shards, Duration::ZERO, Duration::ZERO)?)
    }

    fn corrupt(&mut self, _: &CacheStore, err: CacheError) -> Result<(), RunError> {
        Err(err.into())
    }
}

/// How often a step re-reads a shard that was corrupt and is being recomputed.
const MAX_CACHE_RETRIES: usize = 3;

/// Where a step's batches and targets come from: the online loader (crops and VFM
/// inputs prepared, teachers run in the trainer) or the cache loader (student inputs
/// and record references only, targets read from the teacher cache).
pub(crate) enum StepFeed {
    Online(Loader<Sample>),
    Cached {
        loader: Loader<CachedSample>,
        store: CacheStore,
        resolutions: Resolutions,
    },
}

impl StepFeed {
    /// The feed of `spec`'s teacher mode. Cache mode reads `store`, or (standalone,
    /// `None`) computes the missing shards in this process first.
    pub(crate) fn new(
        spec: &JobSpec,
        device: Device,
        source: SharedSource,
        batches: BatchFeed,
        store: Option<CacheStore>,
    ) -> Result<Self, RunError> {
        let (plan, resolutions) = (crop_plan(spec), Resolutions::of_job(spec));
        let config = LoaderConfig::from_spec(&spec.data);
        Ok(match spec.teachers.mode {
            TeacherMode::Online => {
                let prep = SamplePrep { plan, resolutions };
                StepFeed::Online(Loader::new(config, source, prep, batches)?)
            }
            TeacherMode::Cache => {
                let store = match store {
                    Some(store) => store,
                    None => prepare_cache(spec, device, source.as_ref())?,
                };
                let prep = CachePrep { plan, resolutions };
                StepFeed::Cached {
                    loader: Loader::new(config, source, prep, batches)?,
                    store,
                    resolutions,
                }
            }
        })
    }

    pub(crate) fn stats(&self) -> LoaderStats {
        match self {
            StepFeed::Online(loader) => loader.stats(),
            StepFeed::Cached { loader, .. } => loader.stats(),
        }
    }

    /// The next step's micro-batches of at most `micro` images, with their targets.
    pub(crate) fn next_step(
        &mut self,
        trainer: &Trainer,
        micro: usize,
        rows_per_image: i64,
        gate: &mut dyn CacheGate,
    ) -> Result<Option<StepInput>, RunError> {
        match self {
            StepFeed::Online(loader) => {
                let Some(loaded) = loader.next_batch() else {
                    return Ok(None);
                };
                let (cursor, images, samples) = unpack(loaded)?;
                let counts =
                    local_counts(samples.iter().map(|s| s.grid_boxes.len()), rows_per_image);
                let mut out = Vec::new();
                for part in split(samples, micro) {
                    let batch = sample::collate(part)?;
                    let targets = trainer.online_targets(&batch)?;
                    out.push((batch, targets));
                }
                Ok(Some((cursor, images, out, counts)))
            }
            StepFeed::Cached {
                loader,
                store,
                resolutions,
            } => {
                let Some(loaded) = loader.next_batch() else {
                    return Ok(None);
                };
                let (cursor, images, samples) = unpack(loaded)?;
                let counts =
                    local_counts(samples.iter().map(|s| s.grid_boxes.len()), rows_per_image);
                let indices: Vec<u32> = samples.iter().map(|s| s.record.index).collect();
                gate.ready(store, &store.shards_needed(&indices)?)?;
                let mut out = Vec::new();
                for part in split(samples, micro) {
                    let (batch, refs) = sample::collate_cached(part, *resolutions)?;
                    let targets = read_targets(store, &refs, trainer.device(), gate)?;
                    out.push((batch, targets));
                }
                Ok(Some((cursor, images, out, counts)))
            }
        }
    }
}

/// A micro-batch's cached targets; a corrupt record goes through `gate` (recompute and
/// retry) at most [`MAX_CACHE_RETRIES`] times.
fn read_targets(
    store: &CacheStore,
    refs: &[CacheRef],
    device: Device,
    gate: &mut dyn CacheGate,
) -> Result<Targets, RunError> {
    let mut tries = 0;
    loop {
        match store.targets(refs, device) {
            Ok(targets) => return Ok(targets),
            Err(err) if tries < MAX_CACHE_RETRIES => {
                tries += 1;
                gate.corrupt(store, err)?;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The crop plan of `spec` (seed and crop budget).
pub(crate) fn crop_plan(spec: &JobSpec) -> CropPlan {
    CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    }
}

/// Images per forward on one of `world` trainers: `train.micro_batch_size`, or the
/// trainer's whole share of the global batch.
pub fn micro_batch_size(spec: &JobSpec, world: usize) -> usize {
    let share = (spec.train.batch_size / world.max(1)).max(1);
    spec.train.micro_batch_size.unwrap_or(share).clamp(1, share)
}

/// This rank's share of a step's loss denominators: crops with a box (content loss) and
/// affinity rows (context loss), one entry of `boxes_per_image` per image.
fn local_counts(boxes_per_image: impl Iterator<Item = usize>, rows_per_image: i64) -> GlobalCounts {
    let (mut crops, mut images) = (0i64, 0i64);
    for boxes in boxes_per_image {
        crops += boxes as i64;
        images += 1;
    }
    GlobalCounts {
        crops,
        rows: images * rows_per_image,
    }
}

fn unpack<T>(loaded: LoadedBatch<T>) -> Result<(Cursor, u64, Vec<T>), RunError> {
    let cursor = loaded.cursor;
    let images = loaded.indices.len() as u64;
    Ok((cursor, images, loaded.into_samples()?))
}

/// `items` in consecutive runs of at most `size` (≥ 1), in order.
fn split<T>(mut items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while !items.is_empty() {
        let tail = items.split_off(size.max(1).min(items.len()));
        out.push(std::mem::replace(&mut items, tail));
    }
    out
}

fn log_step(step: u64, total: u64, cursor: Cursor, r: &StepReport, images_per_s: f64) {
    tracing::info!(
        "step {step}/{total} epoch {} loss {:.4} content {:.4} context {:.4} lr {:.3e} {:.1} img/s",
        cursor.epoch,
        r.total,
        r.content,
        r.context,
        r.lr,
        images_per_s
    );
}

/// Which merged-weights export to write (docs/method.md §6): after an epoch, or the last.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ExportPoint {
    /// The epoch that just ended.
    EpochEnd(u32),
    Final,
}

/// Writes `alpha·student + (1−alpha)·original` to `run_dir/exports/` (atomically) and
/// returns the file.
pub(crate) fn write_export(
    trainer: &Trainer,
    spec: &JobSpec,
    point: ExportPoint,
) -> Result<PathBuf, RunError> {
    let name = match point {
        ExportPoint::EpochEnd(epoch) => format!("epoch-{epoch:04}.safetensors"),
        ExportPoint::Final => "final.safetensors".to_string(),
    };
    let path = PathBuf::from(&spec.job.run_dir).join("exports").join(name);
    export::write_atomic(&path, &trainer.merged_export(spec.export.alpha)?)?;
    Ok(path)
}

pub(crate) fn save(
    trainer: &Trainer,
    spec: &JobSpec,
    root: &Path,
    step: u64,
    cursor: Cursor,
    total: u64,
    last_loss: f64,
) -> Result<PathBuf, RunError> {
    let started = Instant::now();
    let ckpt = Checkpoint {
        state: CheckpointState {
            format: checkpoint::FORMAT,
            step,
            cursor,
            config_hash: spec.hash_hex(),
            total_steps: total,
            last_loss,
            files: Default::default(),
        },
        student: trainer.student_tensors(),
        optimizer: trainer.optimizer_tensors(),
        job_toml: spec.to_toml(),
    };
    let dir = checkpoint::save(root, &ckpt, spec.checkpoint.keep)?;
    tracing::info!(
        "checkpoint {} ({:.2} s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}
