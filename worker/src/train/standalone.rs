//! Training in one process, without a coordinator (`worker train --standalone`):
//! resume from the run directory's newest checkpoint, fill the teacher cache (cache
//! mode), then the training loop with a world of one, checkpointing every
//! `checkpoint.every_steps`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::dataset::SkipCounts;
use proto::job::{JobSpec, TeacherMode};
use proto::plan::order::OrderPlan;
use tch::Device;

use super::artifacts::{self, WrittenCheckpoint};
use super::cache_gate::{CacheGate, LocalCache};
use super::checkpoint;
use super::driver::{Driver, LoopEnd, Placement, StepRecord};
use super::error::RunError;
use super::feed::micro_batch_size;
use super::train_loop::{self, LoopRun};
use super::trainer::Trainer;
use crate::comm::Collective;
use crate::data::job_source::job_source;
use crate::data::loader::SharedSource;
use crate::data::source::ImageSource;
use crate::teacher::cache::CacheStore;
use crate::teacher::job_cache::JobCache;
use crate::teacher::models::TeacherModels;
use crate::teacher::shard::ShardOutcome;

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    pub steps_run: u64,
    pub final_step: u64,
    pub images: u64,
    /// Total loss of every step this process ran, in order.
    pub losses: Vec<f64>,
    pub resumed_from: Option<PathBuf>,
    /// The newest checkpoint (written by this run, or resumed from).
    pub checkpoint: Option<PathBuf>,
    pub exports: Vec<PathBuf>,
    pub wall: Duration,
    /// Time inside the step loop (data wait, targets, steps, checkpoints, exports):
    /// `wall` without building models and the teacher cache.
    pub loop_wall: Duration,
    /// Stopped early by SIGTERM or Ctrl-C, after checkpointing `final_step`.
    pub interrupted: bool,
    /// Bad images skipped, by reason (each replaced by the next good image in index
    /// order, see `data::skips`); all zero for synthetic data.
    pub skips: SkipCounts,
}

/// Runs the job in this process on `device` until its last step.
pub fn run_standalone(spec: &JobSpec, device: Device) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let source: SharedSource = Arc::new(job_source(spec)?);
    let order = OrderPlan::new(spec.job.seed, source.image_count(), spec.train.batch_size)?;
    let steps_per_epoch = order.steps_per_epoch();
    let total =
        proto::plan::steps::capped_total(steps_per_epoch, spec.train.epochs, spec.train.max_steps);
    let mut trainer = Trainer::new(spec, device, total)?;
    let (start, resumed_from) = resume_latest(&mut trainer, spec)?;
    let store = match spec.teachers.mode {
        TeacherMode::Cache => Some(prepare_cache(spec, device, source.as_ref())?),
        TeacherMode::Online => None,
    };
    tracing::info!(
        "training {total} steps ({steps_per_epoch} per epoch, {} images, global batch {}, micro-batch {}) on {device:?}",
        source.image_count(),
        spec.train.batch_size,
        micro_batch_size(spec, 1),
    );
    let run = LoopRun {
        spec,
        trainer: &mut trainer,
        source: source.clone(),
        store,
        start,
        total,
        resumed_from: resumed_from.clone(),
    };
    let outcome = train_loop::train(run, &mut Standalone::new(spec))?;
    Ok(RunSummary {
        steps_run: outcome.steps_run,
        final_step: outcome.final_step,
        images: outcome.images,
        losses: outcome.losses,
        resumed_from,
        checkpoint: outcome.checkpoint,
        exports: outcome.exports,
        wall: started.elapsed(),
        loop_wall: outcome.wall,
        interrupted: outcome.end == LoopEnd::Drained,
        skips: source.skip_counts(),
    })
}

/// Restores `trainer` from the run directory's newest checkpoint, if there is one:
/// the step to start from and the checkpoint.
fn resume_latest(
    trainer: &mut Trainer,
    spec: &JobSpec,
) -> Result<(u64, Option<PathBuf>), RunError> {
    let Some((dir, ckpt)) = checkpoint::load_latest(&artifacts::checkpoints_root(spec)) else {
        return Ok((0, None));
    };
    let step = artifacts::restore(trainer, spec, &dir, &ckpt)?;
    let cursor = ckpt.state.cursor;
    tracing::info!(
        "resumed from {} (step {step}, epoch {}, epoch step {})",
        dir.display(),
        cursor.epoch,
        cursor.step
    );
    Ok((step, Some(dir)))
}

/// Cache mode in one process: computes every shard without a usable file (teachers
/// built here and dropped afterwards), then opens the store the loop reads.
pub fn prepare_cache(
    spec: &JobSpec,
    device: Device,
    source: &dyn ImageSource,
) -> Result<CacheStore, RunError> {
    let cache = JobCache::of(spec, source.image_count())?;
    let models = TeacherModels::new(spec, device)?;
    for shard in 0..cache.shards.len() {
        if let ShardOutcome::Written(w) = cache.ensure(spec, &models, source, shard)? {
            tracing::info!(
                "teacher cache shard {shard}: {} images, {} bytes, sha256 {}",
                w.images,
                w.bytes,
                w.checksum
            );
        }
    }
    Ok(cache.open(&models.fingerprint()))
}

/// A world of one that checkpoints every `checkpoint.every_steps` and stops only at
/// the job's end.
struct Standalone {
    every_steps: u64,
    gate: LocalCache,
}

impl Standalone {
    fn new(spec: &JobSpec) -> Self {
        Self {
            every_steps: spec.checkpoint.every_steps,
            gate: LocalCache,
        }
    }
}

impl Driver for Standalone {
    fn placement(&self) -> Placement {
        Placement::ALONE
    }

    fn peers(&mut self) -> Option<&mut dyn Collective> {
        None
    }

    fn cache_gate(&mut self) -> &mut dyn CacheGate {
        &mut self.gate
    }

    fn interrupt(&mut self) -> Result<Option<LoopEnd>, RunError> {
        Ok(None)
    }

    fn stepped(&mut self, _: &StepRecord<'_>) -> Result<(), RunError> {
        Ok(())
    }

    fn checkpoint_due(&mut self, step: u64) -> bool {
        self.every_steps > 0 && step % self.every_steps == 0
    }

    /// After SIGTERM or Ctrl-C ([`crate::shutdown`]): checkpoint this step and stop.
    fn drain_due(&mut self, step: u64) -> bool {
        let stop = crate::shutdown::requested();
        if stop {
            tracing::warn!("told to stop: checkpointing step {step} and ending the run");
        }
        stop
    }

    fn checkpoint_started(&mut self, _: u64) {}

    fn checkpoint_written(&mut self, _: &WrittenCheckpoint) -> Result<(), RunError> {
        Ok(())
    }

    fn finish(&mut self, end: LoopEnd, _: u64) -> Result<LoopEnd, RunError> {
        Ok(end)
    }

    fn log_prefix(&self) -> String {
        String::new()
    }
}
