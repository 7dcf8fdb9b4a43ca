//! The training images a job names: COCO on disk (`data.source = "coco"`), or a synthetic
//! COCO written once under the run directory (`"synthetic"`), read through the same
//! pipeline. Trainers, teachers and `worker teach` all open their images here.

use std::path::PathBuf;

use proto::job::{DataSource, JobSpec};

use super::coco::{self, CocoError, CocoSource};
use super::skips::SkippingSource;
use super::synth_coco::{self, SynthError};

/// Why a job's images could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JobSourceError {
    #[error("dataset: {0}")]
    Dataset(#[from] CocoError),
    #[error("synthetic dataset: {0}")]
    Synthetic(#[from] SynthError),
}

/// The images of `spec`. Bad images are skipped, logged with their path, counted by
/// reason and replaced deterministically; past `data.max_skip_fraction` reading fails
/// (`data::skips`).
pub fn job_source(spec: &JobSpec) -> Result<SkippingSource<CocoSource>, JobSourceError> {
    let data = match spec.data.source {
        DataSource::Synthetic => {
            let root = PathBuf::from(&spec.job.run_dir).join("synthetic-coco");
            synth_coco::ensure_job_dataset(&spec.data, spec.job.seed, &root)?
        }
        DataSource::Coco => spec.data.clone(),
    };
    Ok(coco::training_source(&data)?)
}
