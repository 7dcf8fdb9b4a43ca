//! Dataset shards, epoch order, global steps and rank slices (architecture,
//! "Determinism contract").
//!
//! As in mosaicml/streaming's partitioning, the sample order is a pure function and
//! resuming recomputes it from counts: the only training-progress state is a
//! [`Cursor`] `(epoch, step)`, plus the job's `(seed, global batch)`. There is no
//! iterator or loader state to save, and a job can resume on any world size that
//! divides the global batch, seeing the same samples in the same global steps.
//!
//! # The order, exactly
//! - Samples are positions `0..N` in the dataset index (images sorted by COCO id).
//! - The order of epoch `e` is `0..N` shuffled by
//!   `PlanRng::new(seed, Purpose::EpochOrder, e, N)` ([`super::rng`]). It depends on
//!   `(seed, e, N)` only: never on the world size, ranks or batch size.
//! - Global step `g` of an epoch covers order positions `[g·B, (g+1)·B)`, `B` the global
//!   batch. An epoch has `⌊N / B⌋` steps: the last incomplete batch is **dropped**, so the
//!   last `N mod B` positions of each epoch's order are not trained on in that epoch (they
//!   are different samples every epoch, since the order is reshuffled). Every step then has
//!   exactly `B` samples: the loss is always a mean over `B` images, every rank does equal
//!   work with no padding, and resume arithmetic stays `epoch · steps + step`.
//! - Rank `r` of a world of `W` (with `W | B`) takes the contiguous slice
//!   `[r·B/W, (r+1)·B/W)` of the global batch; with accumulation it walks its slice in
//!   micro-batches of `M` (`M | B/W`). The concatenation of the ranks' slices in rank order
//!   is the global batch, whatever `W`.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::rng::{PlanRng, Purpose};

/// Errors from planning shards, batches and slices. Each names the offending values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OrderError {
    #[error("shard size must be at least 1 image")]
    ZeroShardSize,
    #[error("global batch must be at least 1 sample")]
    ZeroBatch,
    #[error("global batch of {batch} is larger than the {samples} samples of an epoch: an epoch would have no step")]
    BatchExceedsSamples { batch: usize, samples: u32 },
    #[error("world size must be at least 1")]
    ZeroWorld,
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
    #[error("a batch of {batch} samples does not split evenly over {world} ranks")]
    BatchNotDivisible { batch: usize, world: usize },
    #[error("micro-batch size must be at least 1 sample")]
    ZeroMicroBatch,
    #[error("a rank's share of {share} samples does not split into micro-batches of {micro}")]
    MicroNotDivisible { share: usize, micro: usize },
    #[error("step {step} is outside an epoch of {steps} steps")]
    StepOutOfRange { step: u64, steps: u64 },
}

/// The dataset index cut into fixed-size runs: shard `s` holds indices
/// `[s·size, min((s+1)·size, N))`. The last shard may be short. Shards are the unit of
/// teacher work and of cache files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shards {
    num_images: u32,
    shard_size: u32,
}

impl Shards {
    /// Shards of `shard_size` images over an index of `num_images` images
    /// (`num_images` may be 0: no shards).
    pub fn new(num_images: u32, shard_size: u32) -> Result<Self, OrderError> {
        if shard_size == 0 {
            return Err(OrderError::ZeroShardSize);
        }
        Ok(Self {
            num_images,
            shard_size,
        })
    }

    /// Images in the index.
    pub const fn num_images(&self) -> u32 {
        self.num_images
    }

    /// Images per shard (the last may hold fewer).
    pub const fn shard_size(&self) -> u32 {
        self.shard_size
    }

    /// Number of shards: `⌈num_images / shard_size⌉`.
    pub const fn len(&self) -> u32 {
        self.num_images.div_ceil(self.shard_size)
    }

    /// Whether there is no shard (an empty index).
    pub const fn is_empty(&self) -> bool {
        self.num_images == 0
    }

    /// The shard holding index `index`, if the index exists.
    pub const fn shard_of(&self, index: u32) -> Option<u32> {
        if index < self.num_images {
            Some(index / self.shard_size)
        } else {
            None
        }
    }

    /// The index range of shard `shard`, if the shard exists.
    pub fn range(&self, shard: u32) -> Option<Range<u32>> {
        if shard >= self.len() {
            return None;
        }
        // shard < len, so shard·size < num_images + size; computed in u64 to stay exact.
        let start = u64::from(shard) * u64::from(self.shard_size);
        let end = (start + u64::from(self.shard_size)).min(u64::from(self.num_images));
        // Both are <= num_images, a u32.
        Some(start as u32..end as u32)
    }

    /// Every shard's index range, in shard order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u32>> + '_ {
        (0..self.len()).filter_map(|s| self.range(s))
    }

    /// Shards in the order a sample `order` first touches them: each shard appears once,
    /// at the position of its first sample in `order`; shards `order` never touches follow
    /// in ascending order. Indices outside the index are ignored.
    pub fn first_use_order(&self, order: &[u32]) -> Vec<u32> {
        let mut seen = vec![false; self.len() as usize];
        let mut out = Vec::with_capacity(seen.len());
        for shard in order.iter().filter_map(|&i| self.shard_of(i)) {
            let slot = &mut seen[shard as usize];
            if !*slot {
                *slot = true;
                out.push(shard);
            }
        }
        out.extend((0..self.len()).filter(|&s| !seen[s as usize]));
        out
    }

    /// The order in which a teacher pool should compute shards so trainers wait least:
    /// the shards as epoch 0's order first needs them ([`Shards::first_use_order`] of
    /// [`epoch_order`]`(seed, 0, num_images)`). Covers every shard exactly once.
    pub fn teacher_order(&self, seed: u64) -> Vec<u32> {
        self.first_use_order(&epoch_order(seed, 0, self.num_images))
    }
}

/// The order of epoch `epoch`: a permutation of `0..num_samples` that depends only on
/// `(seed, epoch, num_samples)` (module doc). O(N) time and memory; compute it once per
/// epoch ([`EpochOrder`]) rather than once per step.
pub fn epoch_order(seed: u64, epoch: u32, num_samples: u32) -> Vec<u32> {
    let mut rng = PlanRng::new(
        seed,
        Purpose::EpochOrder,
        u64::from(epoch),
        u64::from(num_samples),
    );
    let mut order: Vec<u32> = (0..num_samples).collect();
    rng.shuffle(&mut order);
    order
}

/// Optimizer steps in an epoch of `num_samples` samples at global batch `global_batch`:
/// `⌊num_samples / global_batch⌋` (the last incomplete batch is dropped; module doc).
/// Errors if the batch is 0 or larger than the epoch (an epoch without steps would make
/// no progress).
pub fn steps_per_epoch(num_samples: u32, global_batch: usize) -> Result<u64, OrderError> {
    if global_batch == 0 {
        return Err(OrderError::ZeroBatch);
    }
    let steps = num_samples as usize / global_batch;
    if steps == 0 {
        return Err(OrderError::BatchExceedsSamples {
            batch: global_batch,
            samples: num_samples,
        });
    }
    // steps <= num_samples, a u32.
    Ok(steps as u64)
}

/// The samples of global step `step` of epoch `epoch`: order positions
/// `[step·B, (step+1)·B)`. Recomputes the whole epoch order: for loops, use
/// [`EpochOrder::batch`] or [`OrderPlan::resume`].
pub fn global_batch(
    seed: u64,
    epoch: u32,
    step: u64,
    global_batch: usize,
    num_samples: u32,
) -> Result<Vec<u32>, OrderError> {
    let plan = OrderPlan::new(seed, num_samples, global_batch)?;
    Ok(plan.epoch(epoch).batch(step)?.to_vec())
}

/// Whether a world of `world` ranks can run a job of global batch `global_batch`: the
/// batch splits evenly over the ranks and, with a micro-batch size, each rank's share is
/// whole micro-batches. Job validation demands it of `trainers.min` and `trainers.max`;
/// the coordinator forms worlds only of sizes that fit.
pub fn world_fits(global_batch: usize, micro: Option<usize>, world: usize) -> bool {
    world >= 1
        && global_batch % world == 0
        && micro.is_none_or(|m| m >= 1 && (global_batch / world) % m == 0)
}

/// Rank `rank`'s contiguous share of a global batch: `[rank·B/W, (rank+1)·B/W)`.
/// The batch must split evenly (`W | B`, which job validation also demands).
pub fn rank_slice<T>(batch: &[T], rank: usize, world: usize) -> Result<&[T], OrderError> {
    if world == 0 {
        return Err(OrderError::ZeroWorld);
    }
    if rank >= world {
        return Err(OrderError::RankOutOfRange { rank, world });
    }
    // (`is_multiple_of` would need Rust 1.87; the workspace supports 1.85.)
    let leftover = batch.len() % world;
    if leftover != 0 {
        return Err(OrderError::BatchNotDivisible {
            batch: batch.len(),
            world,
        });
    }
    let share = batch.len() / world;
    Ok(&batch[rank * share..(rank + 1) * share])
}

/// A rank's share cut into consecutive micro-batches of `micro` samples for gradient
/// accumulation. `micro` must divide the share (as job validation demands), so every
/// forward has the same shape.
pub fn micro_batches<T>(
    rank_samples: &[T],
    micro: usize,
) -> Result<std::slice::Chunks<'_, T>, OrderError> {
    if micro == 0 {
        return Err(OrderError::ZeroMicroBatch);
    }
    let leftover = rank_samples.len() % micro;
    if leftover != 0 {
        return Err(OrderError::MicroNotDivisible {
            share: rank_samples.len(),
            micro,
        });
    }
    Ok(rank_samples.chunks(micro))
}

/// Training progress: the next step to run is step `step` (0-based) of epoch `epoch`.
/// Steps `0..step` of `epoch` and all steps of earlier epochs are done. This is the
/// whole resume state (with the job's seed and global batch).
///
/// Invariant (kept by [`Cursor::advance`], checked by [`OrderPlan::resume`]):
/// `step < steps_per_epoch`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Cursor {
    pub epoch: u32,
    pub step: u64,
}

impl Cursor {
    /// The start of training.
    pub const START: Cursor = Cursor { epoch: 0, step: 0 };

    /// Move past one finished step; after the last step of an epoch, to step 0 of the next.
    pub fn advance(&mut self, steps_per_epoch: u64) {
        self.step += 1;
        if self.step >= steps_per_epoch {
            self.epoch = self.epoch.saturating_add(1);
            self.step = 0;
        }
    }

    /// Optimizer steps done before this cursor: `epoch · steps_per_epoch + step`
    /// (the learning-rate schedule's step).
    pub const fn global_step(self, steps_per_epoch: u64) -> u64 {
        self.epoch as u64 * steps_per_epoch + self.step
    }

    /// The cursor after `global_step` finished steps (inverse of [`Cursor::global_step`]).
    /// Errors if `steps_per_epoch` is 0.
    pub fn from_global_step(global_step: u64, steps_per_epoch: u64) -> Result<Cursor, OrderError> {
        if steps_per_epoch == 0 {
            return Err(OrderError::ZeroBatch);
        }
        let epoch = global_step / steps_per_epoch;
        Ok(Cursor {
            // Epochs beyond u32::MAX are not a real job; saturate rather than wrap.
            epoch: u32::try_from(epoch).unwrap_or(u32::MAX),
            step: global_step % steps_per_epoch,
        })
    }
}

/// A job's order: seed, dataset size and global batch, validated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlan {
    seed: u64,
    num_samples: u32,
    global_batch: usize,
    steps_per_epoch: u64,
}

impl OrderPlan {
    /// `seed` = `job.seed`, `num_samples` = images in the dataset index,
    /// `global_batch` = `train.batch_size` (images per optimizer step over all ranks).
    pub fn new(seed: u64, num_samples: u32, global_batch: usize) -> Result<Self, OrderError> {
        Ok(Self {
            seed,
            num_samples,
            global_batch,
            steps_per_epoch: steps_per_epoch(num_samples, global_batch)?,
        })
    }

    pub const fn seed(&self) -> u64 {
        self.seed
    }

    pub const fn num_samples(&self) -> u32 {
        self.num_samples
    }

    pub const fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// `⌊N / B⌋`.
    pub const fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Samples left out of every epoch by dropping the incomplete last batch: `N mod B`.
    pub const fn dropped_per_epoch(&self) -> usize {
        self.num_samples as usize % self.global_batch
    }

    /// Epoch `epoch`'s order, computed once, to slice batches from.
    pub fn epoch(&self, epoch: u32) -> EpochOrder {
        EpochOrder {
            plan: *self,
            epoch,
            order: epoch_order(self.seed, epoch, self.num_samples),
        }
    }

    /// The global batch at `cursor`, recomputed from scratch.
    pub fn batch_at(&self, cursor: Cursor) -> Result<Vec<u32>, OrderError> {
        Ok(self.epoch(cursor.epoch).batch(cursor.step)?.to_vec())
    }

    /// The continuation of training from `cursor`: the global batches of `cursor`, then
    /// of every following step, across epoch boundaries, without end (the caller stops
    /// at its epoch or step limit). Computed from `(seed, N, B, cursor)` only, so it
    /// equals what an uninterrupted run would have seen from that point.
    pub fn resume(&self, cursor: Cursor) -> Result<Batches, OrderError> {
        if cursor.step >= self.steps_per_epoch {
            return Err(OrderError::StepOutOfRange {
                step: cursor.step,
                steps: self.steps_per_epoch,
            });
        }
        Ok(Batches {
            order: self.epoch(cursor.epoch),
            cursor,
        })
    }
}

/// One epoch's order with its batches.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochOrder {
    plan: OrderPlan,
    epoch: u32,
    order: Vec<u32>,
}

impl EpochOrder {
    pub const fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The full permutation of `0..N`.
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// Global step `step`'s samples: positions `[step·B, (step+1)·B)` of the order.
    pub fn batch(&self, step: u64) -> Result<&[u32], OrderError> {
        let steps = self.plan.steps_per_epoch;
        if step >= steps {
            return Err(OrderError::StepOutOfRange { step, steps });
        }
        // step < steps <= N, so it fits usize and (step+1)·B <= N.
        let b = self.plan.global_batch;
        let start = step as usize * b;
        Ok(&self.order[start..start + b])
    }
}

/// The batches from a cursor on (see [`OrderPlan::resume`]). Yields `(cursor, batch)`:
/// the cursor of the step the batch belongs to, and its global batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batches {
    order: EpochOrder,
    cursor: Cursor,
}

impl Batches {
    /// The cursor of the next batch this iterator yields.
    pub const fn cursor(&self) -> Cursor {
        self.cursor
    }
}

impl Iterator for Batches {
    type Item = (Cursor, Vec<u32>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.cursor.epoch != self.order.epoch {
            self.order = self.order.plan.epoch(self.cursor.epoch);
        }
        let here = self.cursor;
        // The cursor is kept in range by `resume` and `advance`; a failure ends the stream.
        let batch = self.order.batch(here.step).ok()?.to_vec();
        self.cursor.advance(self.order.plan.steps_per_epoch);
        Some((here, batch))
    }
}
