//! Shards, epoch order, global steps, rank slices and resume (architecture,
//! "Determinism contract").
//!
//! Written-out orders and the pinned hash were computed with an independent Python
//! transcription of the algorithm text in `proto/src/plan/{rng,order}.rs`.

use std::collections::HashSet;

use proptest::prelude::*;
use proto::plan::order::{
    epoch_order, global_batch, micro_batches, rank_slice, steps_per_epoch, Cursor, OrderError,
    OrderPlan, Shards,
};
use sha2::{Digest, Sha256};

#[test]
fn shards_are_fixed_runs_with_a_short_tail() {
    let s = Shards::new(10, 3).expect("valid");
    assert_eq!(s.len(), 4);
    assert_eq!(s.iter().collect::<Vec<_>>(), [0..3, 3..6, 6..9, 9..10]);
    assert_eq!(s.shard_of(0), Some(0));
    assert_eq!(s.shard_of(8), Some(2));
    assert_eq!(s.shard_of(9), Some(3));
    assert_eq!(s.shard_of(10), None);
    assert_eq!(s.range(4), None);
    let exact = Shards::new(512, 256).expect("valid");
    assert_eq!(exact.iter().collect::<Vec<_>>(), [0..256, 256..512]);
    let empty = Shards::new(0, 256).expect("valid");
    assert!(empty.is_empty());
    assert_eq!(empty.len(), 0);
    assert_eq!(empty.teacher_order(0), Vec::<u32>::new());
    assert_eq!(Shards::new(10, 0), Err(OrderError::ZeroShardSize));
    // COCO train2017 at the default shard size.
    let coco = Shards::new(118_287, 256).expect("valid");
    assert_eq!(coco.len(), 463);
    assert_eq!(coco.range(462), Some(118_272..118_287));
}

#[test]
fn epoch_orders_match_reference() {
    assert_eq!(epoch_order(0, 0, 10), [3, 4, 0, 7, 6, 2, 5, 8, 9, 1]);
    assert_eq!(epoch_order(42, 1, 10), [9, 1, 2, 3, 6, 0, 4, 8, 5, 7]);
    assert_eq!(epoch_order(0, 0, 0), Vec::<u32>::new());
    assert_eq!(epoch_order(5, 9, 1), [0]);
}

/// Epoch 0 of seed 0 over 10 images is [3, 4, 0, 7, 6, 2, 5, 8, 9, 1]; with shards of 3
/// ({0,1,2}, {3,4,5}, {6,7,8}, {9}) it first touches shard 1, then 0, 2, 3.
#[test]
fn teacher_order_follows_first_use() {
    let s = Shards::new(10, 3).expect("valid");
    assert_eq!(s.teacher_order(0), [1, 0, 2, 3]);
    // Shards an order never touches follow in ascending order.
    assert_eq!(s.first_use_order(&[7, 8]), [2, 0, 1, 3]);
    assert_eq!(s.first_use_order(&[99]), [0, 1, 2, 3]);
}

/// **This constant pins the epoch-order contract**: the SHA-256 of the orders for seeds
/// 0 and 42, epochs 0..3 and dataset sizes 0, 1, 2, 3, 10, 1000 and 118,287 (COCO train2017),
/// as little-endian u32s. An independent Python implementation gives the same digest. A
/// change means a resumed job would see different samples in its remaining steps: a
/// breaking change, which must bump `proto::plan::PLAN_VERSION`.
const EPOCH_ORDER_HASH: &str = "73aa478822d43e7b34532276848f62ce3d9fa465e388aca3f99294161f75fc10";

#[test]
fn epoch_order_contract_is_pinned() {
    let mut h = Sha256::new();
    for seed in [0u64, 42] {
        for epoch in 0u32..3 {
            for n in [0u32, 1, 2, 3, 10, 1000, 118_287] {
                let order = epoch_order(seed, epoch, n);
                h.update(seed.to_le_bytes());
                h.update(epoch.to_le_bytes());
                h.update(n.to_le_bytes());
                h.update((order.len() as u32).to_le_bytes());
                for i in order {
                    h.update(i.to_le_bytes());
                }
            }
        }
    }
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, EPOCH_ORDER_HASH);
}

#[test]
fn steps_drop_the_last_incomplete_batch() {
    assert_eq!(steps_per_epoch(10, 3), Ok(3));
    assert_eq!(steps_per_epoch(9, 3), Ok(3));
    assert_eq!(steps_per_epoch(118_287, 16), Ok(7392));
    assert_eq!(steps_per_epoch(10, 0), Err(OrderError::ZeroBatch));
    assert_eq!(
        steps_per_epoch(3, 4),
        Err(OrderError::BatchExceedsSamples {
            batch: 4,
            samples: 3
        })
    );
    let plan = OrderPlan::new(0, 118_287, 16).expect("valid");
    assert_eq!(plan.dropped_per_epoch(), 15);
}

#[test]
fn global_batches_are_consecutive_runs_of_the_order() {
    let order = epoch_order(0, 0, 10);
    assert_eq!(global_batch(0, 0, 0, 3, 10), Ok(order[0..3].to_vec()));
    assert_eq!(global_batch(0, 0, 2, 3, 10), Ok(order[6..9].to_vec()));
    assert_eq!(
        global_batch(0, 0, 3, 3, 10),
        Err(OrderError::StepOutOfRange { step: 3, steps: 3 })
    );
}

#[test]
fn slice_and_micro_batch_errors() {
    let batch = [1u32, 2, 3, 4, 5, 6];
    assert_eq!(rank_slice(&batch, 0, 0), Err(OrderError::ZeroWorld));
    assert_eq!(
        rank_slice(&batch, 2, 2),
        Err(OrderError::RankOutOfRange { rank: 2, world: 2 })
    );
    assert_eq!(
        rank_slice(&batch, 0, 4),
        Err(OrderError::BatchNotDivisible { batch: 6, world: 4 })
    );
    assert_eq!(rank_slice(&batch, 1, 3), Ok(&batch[2..4]));
    assert_eq!(
        micro_batches(&batch, 0).err(),
        Some(OrderError::ZeroMicroBatch)
    );
    assert_eq!(
        micro_batches(&batch, 4).err(),
        Some(OrderError::MicroNotDivisible { share: 6, micro: 4 })
    );
    let micro: Vec<&[u32]> = micro_batches(&batch, 2).expect("divides").collect();
    assert_eq!(micro, [&[1, 2][..], &[3, 4], &[5, 6]]);
}

#[test]
fn cursor_advances_across_epochs() {
    let mut c = Cursor::START;
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push((c.epoch, c.step));
        c.advance(3);
    }
    assert_eq!(
        seen,
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    );
    assert_eq!(c, Cursor { epoch: 2, step: 1 });
    assert_eq!(c.global_step(3), 7);
    assert_eq!(Cursor::from_global_step(7, 3), Ok(c));
    assert_eq!(Cursor::from_global_step(7, 0), Err(OrderError::ZeroBatch));
    let json = serde_json::to_string(&c).expect("serialise");
    assert_eq!(json, r#"{"epoch":2,"step":1}"#);
    assert_eq!(
        serde_json::from_str::<Cursor>(&json).expect("deserialise"),
        c
    );
}

#[test]
fn resume_refuses_a_step_past_the_epoch() {
    let plan = OrderPlan::new(0, 10, 3).expect("valid");
    assert_eq!(
        plan.resume(Cursor { epoch: 1, step: 3 }).err(),
        Some(OrderError::StepOutOfRange { step: 3, steps: 3 })
    );
}

/// An epoch covers ⌊N/B⌋·B distinct samples, and the batches walk the order.
#[test]
fn an_epoch_of_batches_covers_the_order_prefix() {
    let plan = OrderPlan::new(9, 1000, 16).expect("valid");
    let epoch = plan.epoch(4);
    let mut seen = Vec::new();
    for step in 0..plan.steps_per_epoch() {
        seen.extend_from_slice(epoch.batch(step).expect("in range"));
    }
    assert_eq!(seen.len(), 992);
    assert_eq!(seen, epoch.order()[..992]);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 992);
}

proptest! {
    /// For world sizes 1, 2 and 4 (and with micro-batches of any divisor), the ranks' slices
    /// in rank order are exactly the global batch, at every step.
    #[test]
    fn rank_slices_reassemble_the_global_batch(
        seed in any::<u64>(),
        epoch in 0u32..20,
        n in 4u32..400,
        per_rank in 1usize..8,
    ) {
        let b = 4 * per_rank; // divisible by 1, 2 and 4
        prop_assume!(b as u32 <= n);
        let plan = OrderPlan::new(seed, n, b).expect("valid");
        let order = plan.epoch(epoch);
        for step in 0..plan.steps_per_epoch() {
            let batch = order.batch(step).expect("in range");
            prop_assert_eq!(batch.len(), b);
            for world in [1usize, 2, 4] {
                let mut joined = Vec::new();
                for rank in 0..world {
                    let share = rank_slice(batch, rank, world).expect("divisible");
                    prop_assert_eq!(share.len(), b / world);
                    for micro in (1..=share.len()).filter(|m| share.len() % m == 0) {
                        let flat: Vec<u32> =
                            micro_batches(share, micro).expect("divides").flatten().copied().collect();
                        prop_assert_eq!(&flat[..], share);
                    }
                    joined.extend_from_slice(share);
                }
                prop_assert_eq!(&joined[..], batch);
            }
        }
    }

    /// Resuming at (epoch, step) yields exactly what the uninterrupted run yields from there.
    #[test]
    fn resume_is_the_continuation(
        seed in any::<u64>(),
        n in 1u32..200,
        b in 1usize..20,
        stop_after in 0u64..60,
    ) {
        prop_assume!(b as u32 <= n);
        let plan = OrderPlan::new(seed, n, b).expect("valid");
        let horizon = 80usize;
        let full: Vec<_> = plan.resume(Cursor::START).expect("start").take(horizon).collect();
        // Interrupt after `stop_after` steps: all the state kept is the cursor.
        let mut cursor = Cursor::START;
        for _ in 0..stop_after {
            cursor.advance(plan.steps_per_epoch());
        }
        let saved = serde_json::to_string(&cursor).expect("serialise");
        let restored: Cursor = serde_json::from_str(&saved).expect("deserialise");
        let k = stop_after as usize;
        let rest: Vec<_> = plan.resume(restored).expect("in range").take(horizon - k).collect();
        prop_assert_eq!(&rest[..], &full[k..]);
        prop_assert_eq!(restored.global_step(plan.steps_per_epoch()), stop_after);
        prop_assert_eq!(plan.batch_at(restored).expect("in range"), full[k].1.clone());
        // The cursor each batch reports is where resuming would reproduce it.
        for (c, batch) in full.iter().take(10) {
            prop_assert_eq!(&plan.batch_at(*c).expect("in range"), batch);
        }
    }

    #[test]
    fn each_epoch_order_is_a_permutation(seed in any::<u64>(), epoch in any::<u32>(), n in 0u32..2000) {
        let mut order = epoch_order(seed, epoch, n);
        prop_assert_eq!(&order, &epoch_order(seed, epoch, n));
        order.sort_unstable();
        prop_assert_eq!(order, (0..n).collect::<Vec<_>>());
    }

    /// Different epochs give different orders (for n ≥ 20 a collision has probability ≤ 1/20!).
    #[test]
    fn different_epochs_differ(seed in any::<u64>(), epoch in 0u32..1000, gap in 1u32..1000, n in 20u32..500) {
        prop_assert_ne!(epoch_order(seed, epoch, n), epoch_order(seed, epoch + gap, n));
    }

    #[test]
    fn teacher_order_covers_every_shard_once(seed in any::<u64>(), n in 0u32..3000, size in 1u32..300) {
        let shards = Shards::new(n, size).expect("valid");
        let order = shards.teacher_order(seed);
        prop_assert_eq!(order.len() as u32, shards.len());
        let mut sorted = order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..shards.len()).collect::<Vec<_>>());
        // The first shard is the one holding epoch 0's first sample.
        if n > 0 {
            prop_assert_eq!(Some(order[0]), shards.shard_of(epoch_order(seed, 0, n)[0]));
        }
    }

    #[test]
    fn shard_ranges_partition_the_index(n in 0u32..5000, size in 1u32..600) {
        let shards = Shards::new(n, size).expect("valid");
        let mut next = 0;
        for (s, r) in shards.iter().enumerate() {
            prop_assert_eq!(r.start, next);
            prop_assert!(r.end > r.start && r.end - r.start <= size);
            if (s as u32) + 1 < shards.len() {
                prop_assert_eq!(r.end - r.start, size);
            }
            for i in [r.start, r.end - 1] {
                prop_assert_eq!(shards.shard_of(i), Some(s as u32));
            }
            next = r.end;
        }
        prop_assert_eq!(next, n);
    }
}
