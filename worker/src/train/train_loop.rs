//! The training loop, top to bottom, for a trainer alone or one rank of a world: read
//! the step's data, step, report, export at epoch ends, checkpoint when due, stop when
//! the job is done or the driver says so. What differs between standalone and
//! coordinated training is behind [`Driver`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::job::JobSpec;
use proto::plan::order::{Cursor, OrderPlan};

use super::artifacts::{self, Checkpointer, ExportPoint};
use super::driver::{Driver, LoopEnd, StepRecord};
use super::error::RunError;
use super::feed::{FeedPlan, StepFeed};
use super::trainer::Trainer;
use crate::data::loader::SharedSource;
use crate::faults;
use crate::teacher::cache::CacheStore;

/// Compare a weight checksum across ranks this often (steps).
const CONSISTENCY_EVERY: u64 = 50;

/// What one run of the loop trains.
pub struct LoopRun<'a> {
    pub spec: &'a JobSpec,
    /// Restored to `start` already (or fresh at step 0).
    pub trainer: &'a mut Trainer,
    pub source: SharedSource,
    /// The teacher cache (cache mode only).
    pub store: Option<CacheStore>,
    /// The step to start from (0-based; the checkpoint's step on a resume).
    pub start: u64,
    /// The job's steps.
    pub total: u64,
    /// The checkpoint `trainer` was restored from, if any.
    pub resumed_from: Option<PathBuf>,
}

/// What a run of the loop did.
#[derive(Debug)]
pub struct LoopOutcome {
    pub end: LoopEnd,
    pub steps_run: u64,
    pub final_step: u64,
    /// Images of the global batches this loop stepped through.
    pub images: u64,
    /// Total loss of every step run, in order.
    pub losses: Vec<f64>,
    /// The newest checkpoint written or resumed from.
    pub checkpoint: Option<PathBuf>,
    /// Exports this process wrote, in order.
    pub exports: Vec<PathBuf>,
    /// Time inside the loop (data, steps, checkpoints, exports).
    pub wall: Duration,
}

/// Trains `run` from its start step until the job's last step or until `driver` ends it.
pub fn train(run: LoopRun<'_>, driver: &mut dyn Driver) -> Result<LoopOutcome, RunError> {
    let started = Instant::now();
    let LoopRun {
        spec,
        trainer,
        source,
        store,
        start,
        total,
        resumed_from,
    } = run;
    let placement = driver.placement();
    let order = OrderPlan::new(spec.job.seed, source.image_count(), spec.train.batch_size)?;
    let steps_per_epoch = order.steps_per_epoch();
    let mut step = start;
    let mut cursor = Cursor::from_global_step(step, steps_per_epoch)?;
    let plan = FeedPlan {
        order,
        start: cursor,
        steps: total.saturating_sub(step),
        placement,
    };
    // Samples are prepared ahead on data.loader_threads threads, in the order's order.
    let rows_per_image = trainer.rows_per_image(spec.data.vfm_resolution);
    let mut feed = StepFeed::new(spec, source, plan, store, rows_per_image)?;
    let mut checkpoints = Checkpointer::new(spec, total, start, resumed_from);
    let mut log = StepLog::new(spec.train.log_every, driver.log_prefix());
    let mut exports = Vec::new();
    let mut losses = Vec::new();
    let mut images = 0;

    let end = loop {
        if let Some(end) = driver.interrupt()? {
            break end;
        }
        if step >= total {
            break LoopEnd::Completed;
        }
        let asked = Instant::now();
        let input = feed
            .next_step(trainer, driver.cache_gate())?
            .ok_or(RunError::LoaderEnded(step))?;
        debug_assert_eq!(input.cursor, cursor, "the loader follows the order");
        let data_wait = asked.elapsed().as_secs_f64();
        let report =
            trainer.train_step(step, &input.micro_batches, input.counts, driver.peers())?;
        step += 1;
        cursor.advance(steps_per_epoch);
        if let Some(peers) = driver.peers() {
            if step % CONSISTENCY_EVERY == 0 {
                trainer.check_consistency(peers, step)?;
            }
        }
        let record = StepRecord {
            step,
            total,
            cursor,
            losses: &report,
            rank_images: input.images,
            seconds: asked.elapsed().as_secs_f64(),
            data_wait,
            cache_wait: input.cache_wait,
            cache: input.cache,
            collective_seq: driver.peers().map_or(0, |p| p.sequence()),
        };
        let at = At {
            step,
            cursor,
            loss: report.total,
        };
        losses.push(report.total);
        images += input.images * placement.world as u64;
        log.after_step(&record, placement.world, &feed);
        driver.stepped(&record)?;

        if placement.writes_artifacts() {
            if let Some(point) = ExportPoint::after_step(cursor) {
                let path = artifacts::write_export(trainer, spec, point)?;
                tracing::info!("epoch {} done: exported {}", cursor.epoch, path.display());
                exports.push(path);
            }
            if driver.checkpoint_due(step) {
                checkpoint(&mut checkpoints, driver, trainer, spec, at)?;
            }
        }
        if driver.drain_due(step) {
            if placement.writes_artifacts() {
                checkpoint(&mut checkpoints, driver, trainer, spec, at)?;
            }
            break LoopEnd::Drained;
        }
    };
    if end == LoopEnd::Completed && placement.writes_artifacts() {
        let loss = losses.last().copied().unwrap_or(f64::NAN);
        let at = At { step, cursor, loss };
        checkpoint(&mut checkpoints, driver, trainer, spec, at)?;
        let path = artifacts::write_export(trainer, spec, ExportPoint::Final)?;
        tracing::info!("job done at step {step}: exported {}", path.display());
        exports.push(path);
    }
    let wall = started.elapsed();
    let end = driver.finish(end, step)?;
    Ok(LoopOutcome {
        end,
        steps_run: step - start,
        final_step: step,
        images,
        losses,
        checkpoint: checkpoints.latest().map(PathBuf::from),
        exports,
        wall,
    })
}

/// Where the run stands after a step: steps done, the order's position, the step's loss.
#[derive(Clone, Copy, Debug)]
struct At {
    step: u64,
    cursor: Cursor,
    loss: f64,
}

/// Writes a checkpoint at `at` unless its step has one, and hands it to the driver.
fn checkpoint(
    checkpoints: &mut Checkpointer,
    driver: &mut dyn Driver,
    trainer: &Trainer,
    spec: &JobSpec,
    at: At,
) -> Result<(), RunError> {
    if !checkpoints.is_new(at.step) {
        return Ok(());
    }
    driver.checkpoint_started(at.step);
    let written = checkpoints.save(trainer, spec, at.step, at.cursor, at.loss)?;
    driver.checkpoint_written(&written)?;
    faults::hold(faults::CHECKPOINT_WRITTEN);
    Ok(())
}

/// The step log: every `train.log_every` steps and at the last, the losses and the
/// job's image rate since the previous line, then the loader's counters.
struct StepLog {
    every: u64,
    prefix: String,
    window_start: Instant,
    window_images: u64,
}

impl StepLog {
    fn new(every: u64, prefix: String) -> Self {
        Self {
            every: every.max(1),
            prefix,
            window_start: Instant::now(),
            window_images: 0,
        }
    }

    fn after_step(&mut self, r: &StepRecord<'_>, world: usize, feed: &StepFeed) {
        self.window_images += r.rank_images * world as u64;
        if r.step % self.every != 0 && r.step != r.total {
            return;
        }
        let rate = self.window_images as f64 / self.window_start.elapsed().as_secs_f64().max(1e-9);
        let l = r.losses;
        tracing::info!(
            "{}step {}/{} epoch {} loss {:.4} content {:.4} context {:.4} lr {:.3e} {rate:.1} img/s",
            self.prefix,
            r.step,
            r.total,
            r.cursor.epoch,
            l.total,
            l.content,
            l.context,
            l.lr,
        );
        tracing::info!("{}data: {}", self.prefix, feed.stats());
        self.window_start = Instant::now();
        self.window_images = 0;
    }
}
