//! Where a step's micro-batches and their targets come from: the data loader over this
//! rank's slice of every global batch, then either the teachers (online mode) or the
//! teacher cache (cache mode).

use std::time::Instant;

use proto::job::JobSpec;
use proto::plan::crops::CropPlan;
use proto::plan::order::{rank_slice, world_fits, Cursor, OrderError, OrderPlan};
use tch::Device;

use super::cache_gate::{CacheGate, CacheLookups};
use super::driver::Placement;
use super::error::RunError;
use super::trainer::{GlobalCounts, Trainer};
use crate::data::loader::{
    BatchFeed, CachePrep, Loader, LoaderConfig, LoaderStats, SamplePrep, SharedSource,
};
use crate::data::sample::{self, Batch, CacheRef, CachedSample, Resolutions, Sample};
use crate::distill::step::Targets;
use crate::teacher::cache::CacheStore;

/// How often a step re-reads a shard that was corrupt and is being recomputed.
const MAX_CACHE_RETRIES: usize = 3;

/// One step's inputs on this rank.
pub struct StepInput {
    /// Where in the sample order this step is.
    pub cursor: Cursor,
    /// Images in this rank's slice of the global batch.
    pub images: u64,
    /// Micro-batches of at most the micro-batch size, with their targets.
    pub micro_batches: Vec<(Batch, Targets)>,
    /// This rank's loss denominators (the trainer sums them over the ranks).
    pub counts: GlobalCounts,
    /// Cache mode: this slice's records by whether their shard was usable when the
    /// step asked (zero online).
    pub cache: CacheLookups,
    /// Seconds spent waiting for teacher shards (zero online).
    pub cache_wait: f64,
}

/// What the feed reads: the job's sample order from `start` for `steps` steps, sliced
/// for `placement`.
pub struct FeedPlan {
    pub order: OrderPlan,
    pub start: Cursor,
    pub steps: u64,
    pub placement: Placement,
}

/// The online loader (crops and VFM inputs prepared, teachers run in the trainer) or
/// the cache loader (student inputs and record references only, targets read from the
/// teacher cache).
pub struct StepFeed {
    loader: Samples,
    order: OrderPlan,
    /// Images per forward.
    micro: usize,
    /// Affinity rows per image (the context loss's denominator).
    rows_per_image: i64,
}

enum Samples {
    Online(Loader<Sample>),
    Cached {
        loader: Loader<CachedSample>,
        store: CacheStore,
        resolutions: Resolutions,
    },
}

impl StepFeed {
    /// The feed over `plan`: targets read from `store` (cache mode), or computed by the
    /// trainer's teachers when there is none (online mode). `rows_per_image`: affinity rows per image
    /// ([`Trainer::rows_per_image`]).
    pub fn new(
        spec: &JobSpec,
        source: SharedSource,
        plan: FeedPlan,
        store: Option<CacheStore>,
        rows_per_image: i64,
    ) -> Result<Self, RunError> {
        let (crops, resolutions) = (crop_plan(spec), Resolutions::of_job(spec));
        let config = LoaderConfig::from_spec(&spec.data);
        let batches = rank_batches(&plan)?;
        let loader = match store {
            None => {
                let prep = SamplePrep {
                    plan: crops,
                    resolutions,
                };
                Samples::Online(Loader::new(config, source, prep, batches)?)
            }
            Some(store) => {
                let prep = CachePrep {
                    plan: crops,
                    resolutions,
                };
                Samples::Cached {
                    loader: Loader::new(config, source, prep, batches)?,
                    store,
                    resolutions,
                }
            }
        };
        Ok(Self {
            loader,
            order: plan.order,
            micro: micro_batch_size(spec, plan.placement.world),
            rows_per_image,
        })
    }

    /// The loader's counters (waits, queue depth), for the log.
    pub fn stats(&self) -> LoaderStats {
        match &self.loader {
            Samples::Online(loader) => loader.stats(),
            Samples::Cached { loader, .. } => loader.stats(),
        }
    }

    /// The next step's inputs; `None` when the plan's steps are used up.
    ///
    /// Cache mode waits, through `gate`, for the shards of the whole *global* batch, so
    /// that no rank sits in a collective while another waits for the cache.
    pub fn next_step(
        &mut self,
        trainer: &Trainer,
        gate: &mut dyn CacheGate,
    ) -> Result<Option<StepInput>, RunError> {
        let (micro, rows) = (self.micro, self.rows_per_image);
        match &mut self.loader {
            Samples::Online(loader) => {
                let Some(next) = take(loader, |s| s.grid_boxes.len(), rows)? else {
                    return Ok(None);
                };
                let mut micro_batches = Vec::new();
                for part in split(next.samples, micro) {
                    let batch = sample::collate(part)?;
                    let targets = trainer.online_targets(&batch)?;
                    micro_batches.push((batch, targets));
                }
                Ok(Some(StepInput {
                    cursor: next.cursor,
                    images: next.images,
                    micro_batches,
                    counts: next.counts,
                    cache: CacheLookups::default(),
                    cache_wait: 0.0,
                }))
            }
            Samples::Cached {
                loader,
                store,
                resolutions,
            } => {
                let Some(next) = take(loader, |s| s.grid_boxes.len(), rows)? else {
                    return Ok(None);
                };
                let mine: Vec<u32> = next.samples.iter().map(|s| s.record.index).collect();
                let (hits, misses) = store.hits_and_misses(&mine)?;
                let waited = Instant::now();
                let global = self.order.batch_at(next.cursor)?;
                gate.ready(store, &store.shards_needed(&global)?)?;
                let cache_wait = waited.elapsed().as_secs_f64();
                let mut micro_batches = Vec::new();
                for part in split(next.samples, micro) {
                    let (batch, refs) = sample::collate_cached(part, *resolutions)?;
                    let targets = read_targets(store, &refs, trainer.device(), gate)?;
                    micro_batches.push((batch, targets));
                }
                Ok(Some(StepInput {
                    cursor: next.cursor,
                    images: next.images,
                    micro_batches,
                    counts: next.counts,
                    cache: CacheLookups { hits, misses },
                    cache_wait,
                }))
            }
        }
    }
}

/// A step's samples as the loader hands them over, with this rank's counts.
struct Taken<T> {
    cursor: Cursor,
    images: u64,
    samples: Vec<T>,
    counts: GlobalCounts,
}

/// The loader's next batch (`None` once the plan is done); `boxes` counts a sample's
/// crops with a box.
fn take<T: Send + 'static>(
    loader: &mut Loader<T>,
    boxes: impl Fn(&T) -> usize,
    rows_per_image: i64,
) -> Result<Option<Taken<T>>, RunError> {
    let Some(loaded) = loader.next_batch() else {
        return Ok(None);
    };
    let cursor = loaded.cursor;
    let images = loaded.indices.len() as u64;
    let samples = loaded.into_samples()?;
    let counts = local_counts(samples.iter().map(boxes), rows_per_image);
    Ok(Some(Taken {
        cursor,
        images,
        samples,
        counts,
    }))
}

/// `plan`'s global batches, each cut to this rank's slice.
fn rank_batches(plan: &FeedPlan) -> Result<BatchFeed, RunError> {
    let Placement { rank, world } = plan.placement;
    let batch = plan.order.global_batch();
    // A coordinator forms only worlds that fit; anything else is a protocol violation.
    if rank >= world {
        return Err(OrderError::RankOutOfRange { rank, world }.into());
    }
    if !world_fits(batch, None, world) {
        return Err(OrderError::BatchNotDivisible { batch, world }.into());
    }
    Ok(Box::new(
        plan.order
            .resume(plan.start)?
            .take(plan.steps as usize)
            .map(move |(cursor, global)| {
                // Cannot fail: the world and the rank were checked above.
                let mine = rank_slice(&global, rank, world)
                    .map(|s| s.to_vec())
                    .unwrap_or_default();
                (cursor, mine)
            }),
    ))
}

/// A micro-batch's cached targets; a corrupt record goes through `gate` (recompute and
/// retry) at most [`MAX_CACHE_RETRIES`] times.
fn read_targets(
    store: &CacheStore,
    refs: &[CacheRef],
    device: Device,
    gate: &mut dyn CacheGate,
) -> Result<Targets, RunError> {
    let mut tries = 0;
    loop {
        match store.targets(refs, device) {
            Ok(targets) => return Ok(targets),
            Err(err) if tries < MAX_CACHE_RETRIES => {
                tries += 1;
                gate.corrupt(store, err)?;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The crop plan of `spec` (seed and crop budget).
pub fn crop_plan(spec: &JobSpec) -> CropPlan {
    CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    }
}

/// Images per forward on one of `world` trainers: `train.micro_batch_size`, or the
/// trainer's whole share of the global batch.
pub fn micro_batch_size(spec: &JobSpec, world: usize) -> usize {
    let share = (spec.train.batch_size / world.max(1)).max(1);
    spec.train.micro_batch_size.unwrap_or(share).clamp(1, share)
}

/// This rank's share of a step's loss denominators: crops with a box (content loss) and
/// affinity rows (context loss), one entry of `boxes_per_image` per image.
fn local_counts(boxes_per_image: impl Iterator<Item = usize>, rows_per_image: i64) -> GlobalCounts {
    let (mut crops, mut images) = (0i64, 0i64);
    for boxes in boxes_per_image {
        crops += boxes as i64;
        images += 1;
    }
    GlobalCounts {
        crops,
        rows: images * rows_per_image,
    }
}

/// `items` in consecutive runs of at most `size` (≥ 1), in order.
fn split<T>(mut items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while !items.is_empty() {
        let tail = items.split_off(size.max(1).min(items.len()));
        out.push(std::mem::replace(&mut items, tail));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_order_and_caps_each_run() {
        let runs = split((0..7).collect::<Vec<_>>(), 3);
        assert_eq!(runs, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(split(vec![1, 2], 0), vec![vec![1], vec![2]]);
        assert!(split(Vec::<u8>::new(), 4).is_empty());
    }

    #[test]
    fn local_counts_sum_boxes_and_rows() {
        let counts = local_counts([2usize, 0, 5].into_iter(), 16);
        assert_eq!(counts, GlobalCounts { crops: 7, rows: 48 });
    }

    fn demo() -> JobSpec {
        proto::job::load(&proto::job::DEMO_CONFIG, Vec::new(), &[])
            .expect("the demo job is valid")
            .spec
    }

    #[test]
    fn micro_batches_never_exceed_a_ranks_share() {
        let mut spec = demo();
        spec.train.batch_size = 8;
        spec.train.micro_batch_size = None;
        assert_eq!(micro_batch_size(&spec, 2), 4);
        spec.train.micro_batch_size = Some(3);
        assert_eq!(micro_batch_size(&spec, 2), 3);
        spec.train.micro_batch_size = Some(16);
        assert_eq!(micro_batch_size(&spec, 4), 2);
    }
}
