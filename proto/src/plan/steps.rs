//! How many optimizer steps a whole job takes: the one formula the coordinator (which
//! tells every generation the total) and the standalone trainer (which sizes its
//! learning-rate schedule with it) must share.
//!
//! `total = min(epochs · ⌊N / B⌋, max_steps)`, `N` the samples of an epoch (the
//! dataset index), `B` the global batch, and `max_steps = 0` meaning no cap. An epoch
//! drops its last incomplete batch ([`super::order`]), so a step is always `B` samples.

use super::order::{steps_per_epoch, OrderError};

/// Optimizer steps of a job of `epochs` epochs over `num_samples` samples at global
/// batch `global_batch`, capped at `max_steps` when that is non-zero:
/// `min(epochs · ⌊num_samples / global_batch⌋, max_steps)`.
///
/// Errors as [`steps_per_epoch`] does: a batch of 0, or one larger than the epoch.
pub fn total_steps(
    num_samples: u32,
    global_batch: usize,
    epochs: usize,
    max_steps: u64,
) -> Result<u64, OrderError> {
    let per_epoch = steps_per_epoch(num_samples, global_batch)?;
    Ok(capped_total(per_epoch, epochs, max_steps))
}

/// [`total_steps`] from an epoch's step count already known (e.g.
/// `OrderPlan::steps_per_epoch`): `min(epochs · steps_per_epoch, max_steps)`, with
/// `max_steps = 0` meaning no cap. Saturates instead of overflowing.
pub fn capped_total(steps_per_epoch: u64, epochs: usize, max_steps: u64) -> u64 {
    let epochs = u64::try_from(epochs).unwrap_or(u64::MAX);
    let total = epochs.saturating_mul(steps_per_epoch);
    if max_steps > 0 {
        total.min(max_steps)
    } else {
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_times_whole_batches() {
        // 96 / 4 = 24 steps per epoch.
        assert_eq!(total_steps(96, 4, 4, 0), Ok(96));
        assert_eq!(total_steps(96, 4, 1, 0), Ok(24));
    }

    #[test]
    fn the_last_incomplete_batch_is_dropped() {
        // 10 / 4 = 2 full batches; the remaining 2 samples make no step.
        assert_eq!(total_steps(10, 4, 3, 0), Ok(6));
        assert_eq!(total_steps(7, 7, 2, 0), Ok(2));
        assert_eq!(total_steps(13, 7, 2, 0), Ok(2));
    }

    #[test]
    fn max_steps_caps_and_zero_means_no_cap() {
        assert_eq!(total_steps(96, 4, 4, 10), Ok(10));
        assert_eq!(total_steps(96, 4, 4, 96), Ok(96));
        assert_eq!(total_steps(96, 4, 4, 1000), Ok(96), "a cap above the total");
        assert_eq!(total_steps(96, 4, 4, 0), Ok(96));
        assert_eq!(capped_total(24, 4, 10), 10);
        assert_eq!(capped_total(24, 4, 0), 96);
    }

    #[test]
    fn zero_epochs_is_zero_steps() {
        assert_eq!(total_steps(96, 4, 0, 0), Ok(0));
        assert_eq!(total_steps(96, 4, 0, 5), Ok(0));
    }

    #[test]
    fn a_batch_that_makes_no_step_is_refused() {
        assert_eq!(total_steps(96, 0, 4, 0), Err(OrderError::ZeroBatch));
        assert_eq!(
            total_steps(3, 4, 4, 10),
            Err(OrderError::BatchExceedsSamples {
                batch: 4,
                samples: 3
            })
        );
    }

    #[test]
    fn agrees_with_steps_per_epoch_and_saturates() {
        for (n, b) in [(96u32, 4usize), (1000, 33), (7, 1), (u32::MAX, 1)] {
            let per_epoch = steps_per_epoch(n, b).unwrap();
            for epochs in [1usize, 2, 6] {
                for max_steps in [0u64, 1, 50, u64::MAX] {
                    assert_eq!(
                        total_steps(n, b, epochs, max_steps),
                        Ok(capped_total(per_epoch, epochs, max_steps))
                    );
                }
            }
        }
        assert_eq!(capped_total(u64::MAX, 2, 0), u64::MAX);
        assert_eq!(capped_total(u64::MAX, 2, 7), 7);
    }
}
