//! Why a training run (alone or one generation under a coordinator) stopped with an
//! error. Each variant keeps the error it wraps as its source.

use std::path::PathBuf;

use proto::plan::order::OrderError;

use super::checkpoint::CheckpointError;
use super::export::ExportError;
use super::trainer::TrainError;
use crate::control::ControlError;
use crate::data::error::SampleError;
use crate::data::job_source::JobSourceError;
use crate::data::loader::{LoadError, LoaderError};
use crate::teacher::cache::CacheError;
use crate::teacher::TeacherError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The step itself: model, loss, collective, divergence.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The job's sample order cannot be planned (batch larger than the dataset, ...).
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("the data loader ended before step {0}: a loader bug")]
    LoaderEnded(u64),
    #[error(transparent)]
    Source(#[from] JobSourceError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Teacher(#[from] TeacherError),
    /// A call to the coordinator failed or the coordinator was lost.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The coordinator moved on from this generation (it restarted or lost a member).
    #[error("generation {generation} is over: {reason}")]
    GenerationOver { generation: u64, reason: String },
    #[error("{dir} was written by another job config (hash {found}, this job {expected}); use another job.run_dir or remove the checkpoints")]
    ConfigChanged {
        dir: PathBuf,
        found: String,
        expected: String,
    },
}
