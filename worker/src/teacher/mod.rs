//! The teacher cache: frozen teachers computed once per image into per-shard files
//! that trainers read instead of running the teachers (docs/cache-format.md).
//!
//! - [`models`]: the frozen crop teacher and VFM of a job, and their fingerprint.
//! - [`compress`]: VFM feature storage (fp32, fp16, int8 per token, PCA) and fidelity.
//! - [`cache`]: the shard file writer (atomic), reader (memory-mapped, checked) and the
//!   trainer's [`cache::CacheStore`].
//! - [`shard`]: one teacher task, [`shard::write_shard`].
//! - [`job_cache`]: a job's cache directory and shard plan, as trainers open it.
//! - [`pool`]: a teacher under a coordinator: lease, compute, publish, complete.

pub mod cache;
pub mod compress;
pub mod job_cache;
pub mod models;
pub mod pool;
pub mod shard;

use crate::data::sample::SampleError;
use crate::model::weights::WeightsError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error("teacher weights: {0}")]
    Weights(#[from] WeightsError),
    #[error("teacher model: {0}")]
    Model(#[from] ModelError),
    #[error("data: {0}")]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error("{0}")]
    Compress(#[from] compress::CompressError),
    #[error("shard {shard} abandoned: the lease was lost; its temporary file was deleted")]
    Abandoned { shard: u32 },
}
