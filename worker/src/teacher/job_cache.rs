//! A job's teacher cache as trainers and `worker teach` open it: the shard plan over
//! the job's images and the directory under the run directory.

use std::path::{Path, PathBuf};

use proto::job::JobSpec;
use proto::plan::order::{OrderError, Shards};

use super::cache::CacheStore;
use super::models::TeacherModels;
use super::shard::{ensure_shard, ShardOutcome};
use super::TeacherError;
use crate::data::source::ImageSource;

/// Where `spec`'s cache lives and how its `image_count` images are sharded.
#[derive(Clone, Debug)]
pub struct JobCache {
    pub dir: PathBuf,
    pub shards: Shards,
}

impl JobCache {
    /// The cache of `spec` over a dataset of `image_count` images.
    pub fn of(spec: &JobSpec, image_count: u32) -> Result<Self, OrderError> {
        Ok(Self {
            dir: proto::cache::cache_dir(Path::new(&spec.job.run_dir)),
            shards: Shards::new(image_count, spec.data.shard_size as u32)?,
        })
    }

    /// Computes `shard` with `models` unless a usable file of it exists.
    pub fn ensure(
        &self,
        spec: &JobSpec,
        models: &TeacherModels,
        source: &dyn ImageSource,
        shard: u32,
    ) -> Result<ShardOutcome, TeacherError> {
        ensure_shard(spec, models, source, &self.shards, shard, &self.dir)
    }

    /// The store trainers read, for teachers of `fingerprint`. Opens no file yet.
    pub fn open(&self, fingerprint: &str) -> CacheStore {
        CacheStore::open(&self.dir, fingerprint, self.shards)
    }
}
