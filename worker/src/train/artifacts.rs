//! What training leaves on disk: checkpoints (resumable state) and exports (merged
//! weights, docs/method.md §6), and restoring a trainer from a checkpoint of the same
//! job.

use std::path::{Path, PathBuf};
use std::time::Instant;

use proto::job::JobSpec;
use proto::plan::order::Cursor;

use super::checkpoint::{self, Checkpoint, CheckpointState};
use super::error::RunError;
use super::export;
use super::trainer::Trainer;

/// The checkpoints of one run: each step is written once, into `run_dir/checkpoints`.
pub struct Checkpointer {
    root: PathBuf,
    keep: usize,
    /// Steps of the whole job (recorded in each checkpoint).
    total: u64,
    /// The last step checkpointed (a resume step counts).
    saved: u64,
    /// The newest checkpoint written or resumed from.
    latest: Option<PathBuf>,
}

/// A checkpoint just written.
#[derive(Clone, Debug)]
pub struct WrittenCheckpoint {
    pub dir: PathBuf,
    pub step: u64,
    pub cursor: Cursor,
    /// Seconds it took to write.
    pub seconds: f64,
}

impl Checkpointer {
    /// Checkpoints of `spec`'s run, which starts at `start` (restored from `resumed`,
    /// if any).
    pub fn new(spec: &JobSpec, total: u64, start: u64, resumed: Option<PathBuf>) -> Self {
        Self {
            root: checkpoints_root(spec),
            keep: spec.checkpoint.keep,
            total,
            saved: start,
            latest: resumed,
        }
    }

    /// Whether `step` has no checkpoint yet.
    pub fn is_new(&self, step: u64) -> bool {
        step > self.saved
    }

    /// The newest checkpoint written or resumed from.
    pub fn latest(&self) -> Option<&Path> {
        self.latest.as_deref()
    }

    /// Writes the trainer's state after `step` (atomically; older ones pruned to
    /// `checkpoint.keep`).
    pub fn save(
        &mut self,
        trainer: &Trainer,
        spec: &JobSpec,
        step: u64,
        cursor: Cursor,
        last_loss: f64,
    ) -> Result<WrittenCheckpoint, RunError> {
        let started = Instant::now();
        let ckpt = Checkpoint {
            state: CheckpointState {
                format: checkpoint::FORMAT,
                step,
                cursor,
                config_hash: spec.hash_hex(),
                total_steps: self.total,
                last_loss,
                files: Default::default(),
            },
            student: trainer.student_tensors(),
            optimizer: trainer.optimizer_tensors(),
            job_toml: spec.to_toml(),
        };
        let dir = checkpoint::save(&self.root, &ckpt, self.keep)?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!("checkpoint {} ({seconds:.2} s)", dir.display());
        self.saved = step;
        self.latest = Some(dir.clone());
        Ok(WrittenCheckpoint {
            dir,
            step,
            cursor,
            seconds,
        })
    }
}

/// `run_dir/checkpoints` of `spec`.
pub fn checkpoints_root(spec: &JobSpec) -> PathBuf {
    PathBuf::from(&spec.job.run_dir).join("checkpoints")
}

/// Restores `trainer` from `ckpt` (read from `dir`), refusing a checkpoint that
/// another job config wrote. Returns the step it continues from.
pub fn restore(
    trainer: &mut Trainer,
    spec: &JobSpec,
    dir: &Path,
    ckpt: &Checkpoint,
) -> Result<u64, RunError> {
    let expected = spec.hash_hex();
    if ckpt.state.config_hash != expected {
        return Err(RunError::ConfigChanged {
            dir: dir.to_path_buf(),
            found: ckpt.state.config_hash.clone(),
            expected,
        });
    }
    trainer.restore(&ckpt.state, &ckpt.student, &ckpt.optimizer)?;
    Ok(ckpt.state.step)
}

/// Which merged-weights export to write (docs/method.md §6): after an epoch, or the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportPoint {
    /// The epoch that just ended.
    EpochEnd(u32),
    Final,
}

impl ExportPoint {
    /// The export due once the step that moved the order to `cursor` is done: one at
    /// the end of every epoch.
    pub fn after_step(cursor: Cursor) -> Option<ExportPoint> {
        (cursor.step == 0).then_some(ExportPoint::EpochEnd(cursor.epoch))
    }

    fn file_name(self) -> String {
        match self {
            ExportPoint::EpochEnd(epoch) => format!("epoch-{epoch:04}.safetensors"),
            ExportPoint::Final => "final.safetensors".to_string(),
        }
    }
}

/// Writes `alpha·student + (1−alpha)·original` to `run_dir/exports/` (atomically) and
/// returns the file.
pub fn write_export(
    trainer: &Trainer,
    spec: &JobSpec,
    point: ExportPoint,
) -> Result<PathBuf, RunError> {
    let path = PathBuf::from(&spec.job.run_dir)
        .join("exports")
        .join(point.file_name());
    export::write_atomic(&path, &trainer.merged_export(spec.export.alpha)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_due_exactly_at_each_epoch_end() {
        let at = |epoch, step| ExportPoint::after_step(Cursor { epoch, step });
        assert_eq!(at(1, 0), Some(ExportPoint::EpochEnd(1)));
        assert_eq!(at(3, 0), Some(ExportPoint::EpochEnd(3)));
        assert_eq!(at(1, 1), None);
        assert_eq!(at(0, 7), None);
    }

    #[test]
    fn exports_are_named_by_epoch_or_final() {
        assert_eq!(
            ExportPoint::EpochEnd(4).file_name(),
            "epoch-0004.safetensors"
        );
        assert_eq!(ExportPoint::Final.file_name(), "final.safetensors");
    }
}
