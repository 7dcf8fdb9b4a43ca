//! Data-parallel training over the CPU ring (ranks are threads of this process):
//! a world of W trainers with batch B/W each must end where one trainer with batch B
//! over the same global samples ends, with every rank bitwise equal; accumulation
//! keeps the global batch fixed; divergence is detected and names the rank.

mod common;

use std::time::Duration;

use proto::job::JobSpec;
use proto::plan::crops::CropPlan;
use proto::plan::order::{micro_batches, rank_slice};
use tch::{Device, Tensor};
use worker::comm::ring::{RingCollective, RingListener};
use worker::comm::Collective;
use worker::data::sample::{self, Resolutions};
use worker::data::synthetic;
use worker::distill::step::Targets;
use worker::train::trainer::{GlobalCounts, TrainError, Trainer};

const STEPS: u64 = 5;
const TIMEOUT: Duration = Duration::from_secs(60);

fn spec(micro: Option<usize>) -> JobSpec {
    let mut spec = common::tiny_job(224, 196);
    spec.train.micro_batch_size = micro;
    spec
}

/// What a trainer ends with: its student weights, and the gradients its first
/// optimizer step applied (summed over the ranks), taken while every rank and the
/// single trainer still hold the same weights.
struct Trained {
    weights: Vec<(String, Tensor)>,
    first_grads: Vec<(String, Tensor)>,
}

/// Trains `STEPS` steps as `rank` of `comm`'s world (or alone) on global batches of
/// `global` synthetic images, micro-batches of `micro`.
fn train(
    spec: &JobSpec,
    global: usize,
    rank: usize,
    world: usize,
    mut comm: Option<&mut dyn Collective>,
) -> Trained {
    let mut trainer = Trainer::new(spec, Device::Cpu, 20).expect("trainer");
    if let Some(c) = comm.as_deref_mut() {
        trainer.broadcast_weights(c).expect("broadcast");
    }
    let res = Resolutions::of_job(spec);
    let plan = CropPlan {
        seed: 0,
        max_crops: spec.data.max_crops,
    };
    let rows = trainer.rows_per_image(spec.data.vfm_resolution);
    let mut first_grads = Vec::new();
    for step in 0..STEPS {
        let ids: Vec<u64> = (0..global as u64)
            .map(|i| step * global as u64 + i + 1)
            .collect();
        let mine = rank_slice(&ids, rank, world).expect("share");
        let micro = spec.train.micro_batch_size.unwrap_or(mine.len());
        let mut local = GlobalCounts { crops: 0, rows: 0 };
        let mut batches: Vec<(sample::Batch, Targets)> = Vec::new();
        for chunk in micro_batches(mine, micro).expect("micro-batches") {
            let samples: Vec<_> = chunk
                .iter()
                .map(|&id| {
                    sample::prepare(&synthetic::image(0, id), id, 0, &plan, res).expect("sample")
                })
                .collect();
            local.crops += samples
                .iter()
                .map(|s| s.grid_boxes.len() as i64)
                .sum::<i64>();
            local.rows += samples.len() as i64 * rows;
            let batch = sample::collate(samples).expect("collate");
            let targets = trainer.online_targets(&batch).expect("targets");
            batches.push((batch, targets));
        }
        let report = trainer
            .train_step(step, &batches, local, reborrow(&mut comm))
            .expect("step");
        assert!(report.total.is_finite());
        if step == 0 {
            // `.grad()` keeps the summed gradients until the next step zeroes them.
            first_grads = trainer
                .optimizer
                .params
                .iter()
                .map(|p| (p.name.clone(), p.param.grad().copy()))
                .collect();
        }
    }
    if let Some(c) = comm {
        trainer.check_consistency(c, STEPS).expect("ranks agree");
    }
    Trained {
        weights: trainer.student_tensors(),
        first_grads,
    }
}

/// `comm.as_deref_mut()`, with the trait object's lifetime shortened to the borrow's.
fn reborrow<'b>(comm: &'b mut Option<&mut dyn Collective>) -> Option<&'b mut dyn Collective> {
    comm.as_mut().map(|c| &mut **c as &mut dyn Collective)
}

/// Runs `world` ranks as threads over a loopback ring.
fn train_world(spec: &JobSpec, global: usize, world: usize) -> Vec<Trained> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners.iter().map(RingListener::address).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                s.spawn(move || {
                    let mut ring =
                        RingCollective::connect(listener, 1, rank, &peers, TIMEOUT).expect("ring");
                    train(spec, global, rank, world, Some(&mut ring))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn worst_relative_error(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for ((name, x), (name_b, y)) in a.iter().zip(b) {
        assert_eq!(name, name_b);
        let err = common::relative_error(x, y);
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    worst
}

fn assert_bitwise_equal(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        assert!(x.equal(y), "{what}: {name} differs");
    }
}

fn moved(before: &[(String, Tensor)], after: &[(String, Tensor)]) -> bool {
    before.iter().zip(after).any(|((_, x), (_, y))| !x.equal(y))
}

#[test]
fn two_ranks_of_batch_two_match_one_rank_of_batch_four() {
    worker::runtime::init();
    let spec = spec(None);
    let alone = train(&spec, 4, 0, 1, None);
    let ranks = train_world(&spec, 4, 2);
    let initial = Trainer::new(&spec, Device::Cpu, 20)
        .unwrap()
        .student_tensors();
    assert!(
        moved(&initial, &alone.weights),
        "training changed the weights"
    );
    assert_bitwise_equal(&ranks[0].weights, &ranks[1].weights, "rank 0 vs rank 1");
    let (grad_err, grad_name) = worst_relative_error(&ranks[0].first_grads, &alone.first_grads);
    let (err, name) = worst_relative_error(&ranks[0].weights, &alone.weights);
    eprintln!(
        "world 2 vs world 1: first step's gradients {grad_err:.2e} ({grad_name}); \
         weights after {STEPS} steps {err:.2e} ({name})"
    );
    assert!(
        grad_err <= 1e-6,
        "{grad_name}: gradient relative error {grad_err:.2e}"
    );
    assert!(err <= 1e-6, "{name}: relative error {err:.2e}");
}

/// Six forwards of one image (two micro-batches on each of three ranks, summed in
/// `.grad` and then over the ring) against one forward of six: the same sums in another
/// order. Measured (2-core EPYC, libtorch 2.11 CPU): the first step's gradients differ by
/// at most 6.3e-7 of each tensor's largest element, a few fp32 ulps and no more than world
/// 2 without accumulation (6.9e-7): float reassociation, not accumulation. The per-micro-
/// batch normalisation by the global counts is one rounding of ≤ ½ ulp and cannot explain
/// more (a wrong count would show as a percent-level error here). The weights then differ
/// more, 7.3e-6 after 5 steps (world 2: 3.8e-7), and that is AdamW: its first update is
/// `lr·g/(|g|+ε)` with ε = 1e-8, whose slope in g is `lr·ε/(|g|+ε)²`, up to lr/(4ε) = 1.25e4 at lr 5e-4 where |g| ≈ ε, and reassociation
/// moves such tiny elements by a few percent of themselves (≈2e-10, a tenth of one ulp of
/// the tensor's largest element). Probed in one process (six micro-batches of one vs one
/// of six): blocks.0.attn.v_proj.weight[116] had g = 3.97e-8 vs 3.77e-8, hence updates of
/// 0.799·lr vs 0.790·lr, 4.2e-6 apart, 8.4e-6 of that tensor's largest weight after one
/// step. Summing in f64 or normalising after accumulation cannot remove this: the fp32
/// GEMMs of one image and of six round differently. The bounds keep ≈1.5× the measured.
#[test]
fn three_ranks_accumulating_match_one_rank_on_a_global_batch_of_six() {
    worker::runtime::init();
    let alone = train(&spec(None), 6, 0, 1, None);
    let ranks = train_world(&spec(Some(1)), 6, 3);
    assert_bitwise_equal(&ranks[0].weights, &ranks[1].weights, "rank 0 vs rank 1");
    assert_bitwise_equal(&ranks[0].weights, &ranks[2].weights, "rank 0 vs rank 2");
    let (grad_err, grad_name) = worst_relative_error(&ranks[2].first_grads, &alone.first_grads);
    let (err, name) = worst_relative_error(&ranks[2].weights, &alone.weights);
    eprintln!(
        "world 3 (micro 1) vs world 1: first step's gradients {grad_err:.2e} ({grad_name}); \
         weights after {STEPS} steps {err:.2e} ({name})"
    );
    assert!(
        grad_err <= 1e-6,
        "{grad_name}: gradient relative error {grad_err:.2e}"
    );
    assert!(err <= 1.1e-5, "{name}: relative error {err:.2e}");
}

#[test]
fn a_diverged_rank_is_named() {
    worker::runtime::init();
    let spec = spec(None);
    let world = 3;
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners.iter().map(RingListener::address).collect();
    let results: Vec<Result<(), TrainError>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, spec) = (peers.clone(), &spec);
                s.spawn(move || {
                    let mut ring =
                        RingCollective::connect(listener, 7, rank, &peers, TIMEOUT).expect("ring");
                    let mut trainer = Trainer::new(spec, Device::Cpu, 20).expect("trainer");
                    trainer.broadcast_weights(&mut ring).expect("broadcast");
                    trainer
                        .check_consistency(&mut ring, 0)
                        .expect("equal after broadcast");
                    if rank == 2 {
                        // One ulp-sized change in one weight is enough.
                        let p = &trainer.optimizer.params[3].param;
                        tch::no_grad(|| {
                            let mut first = p.view([-1]).get(0);
                            let bumped = first.double_value(&[]) * (1.0 + 1e-6) + 1e-12;
                            let _ = first.fill_(bumped);
                        });
                    }
                    trainer.check_consistency(&mut ring, 10)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Err(TrainError::Diverged { step: 10, ranks }) => {
                assert_eq!(ranks, vec![2], "rank {rank}")
            }
            other => panic!("rank {rank}: expected a divergence naming rank 2, got {other:?}"),
        }
    }
}

#[test]
fn broadcast_makes_differently_initialised_ranks_equal() {
    worker::runtime::init();
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners.iter().map(RingListener::address).collect();
    let weights: Vec<Vec<(String, Tensor)>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                s.spawn(move || {
                    let mut ring =
                        RingCollective::connect(listener, 1, rank, &peers, TIMEOUT).expect("ring");
                    let mut spec = spec(None);
                    // Rank 1 starts from other (seeded random) weights than rank 0.
                    spec.model.student.weights = None;
                    spec.model.student.init_seed = 100 + rank as u64;
                    let mut trainer = Trainer::new(&spec, Device::Cpu, 20).expect("trainer");
                    trainer.optimizer.step = 3 + rank as u64;
                    match trainer.check_consistency(&mut ring, 0) {
                        Err(TrainError::Diverged { ranks, .. }) => assert_eq!(ranks, vec![1]),
                        other => panic!("different inits must differ, got {other:?}"),
                    }
                    trainer.broadcast_weights(&mut ring).expect("broadcast");
                    assert_eq!(trainer.optimizer.step, 3, "rank 0's step count");
                    trainer.check_consistency(&mut ring, 0).expect("consistent");
                    trainer.student_tensors()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    assert_bitwise_equal(&weights[0], &weights[1], "after broadcast");
}
