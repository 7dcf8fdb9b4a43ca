//! What the job's spec fixes for the coordinator, planned once at start: the shards,
//! the step count and the checkpoint schedule. A leaf: it knows nothing of `JobState`.

use std::time::Duration;

use proto::job::{JobSpec, TeacherMode};
use proto::plan::order::{OrderError, Shards};
use proto::plan::steps;

/// What the job's spec fixes for the coordinator.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// job.name.
    pub job: String,
    /// The spec's hash (hex); a journal of another hash is refused on replay.
    pub job_hash: String,
    /// The spec as TOML, handed to every worker that registers.
    pub job_toml: String,
    /// job.seed (the coordinator draws the teacher queue's shard order from it).
    pub seed: u64,
    /// Images in the dataset.
    pub image_count: u32,
    /// The dataset cut into data.shard_size shards.
    pub shards: Shards,
    /// epochs × steps_per_epoch, capped by train.max_steps ([`steps::total_steps`]).
    pub total_steps: u64,
    /// train.batch_size over the whole world.
    pub global_batch: u64,
    /// train.micro_batch_size (each rank's share must be whole micro-batches).
    pub micro_batch: Option<usize>,
    /// checkpoint.every_steps (0: only the final step).
    pub every_steps: u64,
    /// checkpoint.keep: how many committed checkpoints the registry keeps.
    pub keep: usize,
    /// trainers.min: the smallest world.
    pub min: usize,
    /// trainers.max: the largest world.
    pub max: usize,
    /// trainers.join_wait_s: how long a world waits for `max` before forming with `min`.
    pub join_wait: Duration,
    /// coordinator.heartbeat_timeout_s: a silent worker is lost after it.
    pub heartbeat_timeout: Duration,
    /// teachers.lease_s: a teacher's shard lease.
    pub lease: Duration,
    /// teachers.mode is `cache`: teachers fill the cache from the queue.
    pub teacher_cache: bool,
    /// trainers.device (`auto`, `cpu`, `cuda:N`): picks the collective backend.
    pub trainer_device: String,
}

/// The dataset cannot be cut into shards and steps as the spec asks.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The shard or step plan of `images` images failed.
    #[error("the dataset of {images} images cannot be planned: {source}")]
    Order {
        /// Images in the dataset.
        images: u32,
        /// Why the plan failed.
        #[source]
        source: OrderError,
    },
}

impl JobConfig {
    /// Whether a world of `size` trainers can run this job
    /// ([`proto::plan::order::world_fits`]).
    pub fn world_fits(&self, size: usize) -> bool {
        proto::plan::order::world_fits(self.global_batch as usize, self.micro_batch, size)
    }

    /// The configuration of `spec` over a dataset of `image_count` images.
    pub fn from_spec(spec: &JobSpec, image_count: u32) -> Result<Self, PlanError> {
        let plan_err = |source| PlanError::Order {
            images: image_count,
            source,
        };
        let total_steps = steps::total_steps(
            image_count,
            spec.train.batch_size,
            spec.train.epochs,
            spec.train.max_steps,
        )
        .map_err(plan_err)?;
        let shard_size = u32::try_from(spec.data.shard_size).unwrap_or(u32::MAX);
        Ok(Self {
            job: spec.job.name.clone(),
            job_hash: spec.hash_hex(),
            job_toml: spec.to_toml(),
            seed: spec.job.seed,
            image_count,
            shards: Shards::new(image_count, shard_size).map_err(plan_err)?,
            total_steps,
            global_batch: spec.train.batch_size as u64,
            micro_batch: spec.train.micro_batch_size,
            every_steps: spec.checkpoint.every_steps,
            keep: spec.checkpoint.keep,
            min: spec.trainers.min,
            max: spec.trainers.max,
            join_wait: Duration::from_secs(spec.trainers.join_wait_s),
            heartbeat_timeout: Duration::from_secs(spec.coordinator.heartbeat_timeout_s),
            lease: Duration::from_secs(spec.teachers.lease_s),
            teacher_cache: spec.teachers.mode == TeacherMode::Cache,
            trainer_device: spec.trainers.device.clone(),
        })
    }

    /// The first checkpoint step strictly after `after` (the final step is always one).
    pub fn next_checkpoint(&self, after: u64) -> Option<u64> {
        if after >= self.total_steps {
            return None;
        }
        let next = match self.every_steps {
            0 => self.total_steps,
            every => (after / every + 1) * every,
        };
        Some(next.min(self.total_steps))
    }
}
