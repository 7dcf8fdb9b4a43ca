//! Single-process training, top to bottom: data order, teachers, step, log,
//! checkpoint, export. `worker train --standalone` runs this.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::dataset::SkipCounts;
use proto::job::{DataSource, DataSpec, JobSpec};
use proto::plan::crops::CropPlan;
use proto::plan::order::{Cursor, OrderError, OrderPlan};
use tch::Device;

use super::checkpoint::{self, Checkpoint, CheckpointError, CheckpointState};
use super::export::{self, ExportError};
use super::trainer::{GlobalCounts, StepReport, TrainError, Trainer};
use crate::data::coco::{self, CocoError};
use crate::data::loader::{LoadError, Loader, LoaderConfig, LoaderError, SamplePrep, SharedSource};
use crate::data::sample::{self, Batch, Resolutions, SampleError};
use crate::data::synth_coco::{self, SynthError};
use crate::distill::step::Targets;

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
    #[error("dataset: {0}")]
    Dataset(#[from] CocoError),
    #[error("synthetic dataset: {0}")]
    Synthetic(#[from] SynthError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("export: {0}")]
    Export(#[from] ExportError),
    #[error("{0}")]
    Unsupported(String),
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
    /// Bad images skipped, by reason (each replaced by the next good image in index
    /// order, see `data::skips`); all zero for synthetic data.
    pub skips: SkipCounts,
}

/// Runs the job in this process on `device` until its last step.
pub fn run_standalone(spec: &JobSpec, device: Device) -> Result<RunSummary, RunError> {
    match spec.data.source {
        DataSource::Synthetic => {
            // The demo's data is a real COCO-format dataset in the run directory, read
            // through the same pipeline as COCO itself.
            let root = PathBuf::from(&spec.job.run_dir).join("synthetic-coco");
            let data = synth_coco::ensure_job_dataset(&spec.data, spec.job.seed, &root)?;
            run_coco(spec, &data, device)
        }
        DataSource::Coco => run_coco(spec, &spec.data, device),
    }
}

/// Trains on the COCO-format dataset `data`. Bad images are skipped, logged with their
/// path, counted by reason and replaced deterministically; past `data.max_skip_fraction`
/// the run fails (`data::skips`).
fn run_coco(spec: &JobSpec, data: &DataSpec, device: Device) -> Result<RunSummary, RunError> {
    let source = Arc::new(coco::training_source(data)?);
    let mut summary = run(spec, device, source.clone())?;
    summary.skips = source.counts();
    Ok(summary)
}

/// The loop, over any image source (shared with the data loader's threads).
pub fn run(spec: &JobSpec, device: Device, source: SharedSource) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let run_dir = PathBuf::from(&spec.job.run_dir);
    let ckpt_root = run_dir.join("checkpoints");
    let batch_size = spec.train.batch_size;
    let order = OrderPlan::new(spec.job.seed, source.image_count(), batch_size)?;
    let steps_per_epoch = order.steps_per_epoch();
    let mut total = spec.train.epochs as u64 * steps_per_epoch;
    if spec.train.max_steps > 0 {
        total = total.min(spec.train.max_steps);
    }
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
    let resolutions = Resolutions::of_job(spec);
    let crop_plan = CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    };
    let micro = spec.train.micro_batch_size.unwrap_or(batch_size).max(1);
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
        skips: SkipCounts::default(),
    };
    let mut last_saved = step;
    let mut window = (Instant::now(), 0u64);
    // Samples are prepared ahead on data.loader_threads threads, in the order's order.
    let prep = SamplePrep {
        plan: crop_plan,
        resolutions,
    };
    let batches = order
        .resume(cursor)?
        .take(total.saturating_sub(step) as usize);
    let mut loader = Loader::new(
        LoaderConfig::from_spec(&spec.data),
        source,
        prep,
        Box::new(batches),
    )?;
    while step < total {
        let loaded = loader.next_batch().ok_or(RunError::LoaderEnded(step))?;
        debug_assert_eq!(loaded.cursor, cursor, "the loader follows the order");
        let images = loaded.indices.len() as u64;
        let samples = loaded.into_samples()?;
        let counts = GlobalCounts {
            crops: samples.iter().map(|s| s.grid_boxes.len() as i64).sum(),
            rows: samples.len() as i64 * rows_per_image,
        };
        let mut micro_batches: Vec<(Batch, Targets)> = Vec::new();
        let mut rest = samples;
        while !rest.is_empty() {
            let tail = rest.split_off(micro.min(rest.len()));
            let batch = sample::collate(std::mem::replace(&mut rest, tail))?;
            let targets = trainer.online_targets(&batch)?;
            micro_batches.push((batch, targets));
        }
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
            tracing::info!("data: {}", loader.stats());
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
            // An epoch just ended: save its merged weights (method spec §6).
            let path = run_dir
                .join("exports")
                .join(format!("epoch-{:04}.safetensors", cursor.epoch));
            export::write_atomic(&path, &trainer.merged_export(spec.export.alpha)?)?;
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
    let final_export = run_dir.join("exports").join("final.safetensors");
    export::write_atomic(&final_export, &trainer.merged_export(spec.export.alpha)?)?;
    summary.exports.push(final_export);
    summary.final_step = step;
    summary.wall = started.elapsed();
    Ok(summary)
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

fn save(
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
