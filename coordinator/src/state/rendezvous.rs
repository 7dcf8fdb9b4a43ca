//! Forming a world: when enough idle trainers are there, who gets which rank.

use std::time::Duration;

/// An idle, attached trainer that may join the next world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub worker_id: String,
    /// Preferred rank (Kubernetes completion index); negative = none.
    pub rank_hint: i32,
}

/// A generation's world: `members[r]` is the worker id of rank r.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub generation: u64,
    pub members: Vec<String>,
    /// NCCL: rank 0's unique id has been handed to every member.
    pub nccl_id_sent: bool,
}

impl World {
    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.members
            .iter()
            .position(|m| m == worker_id)
            .map(|r| r as u32)
    }

    pub fn size(&self) -> u32 {
        self.members.len() as u32
    }
}

/// The world size to form now, if any: `max` as soon as `max` trainers wait, otherwise,
/// once they have waited `join_wait`, as many of the idle ones (at least `min`) as make a
/// world that `fits` (the global batch splits evenly over it, see
/// `proto::plan::order::world_fits`).
pub fn world_size(
    idle: usize,
    min: usize,
    max: usize,
    waited: Duration,
    join_wait: Duration,
    fits: impl Fn(usize) -> bool,
) -> Option<usize> {
    let ready = idle >= max || (idle >= min && waited >= join_wait);
    if !ready {
        return None;
    }
    (min..=idle.min(max)).rev().find(|&size| fits(size))
}

/// Ranks for the first `size` candidates (in the order given): a candidate whose hint is a
/// free rank below `size` gets it; the others fill the remaining ranks in order.
pub fn assign_ranks(candidates: &[Candidate], size: usize) -> Vec<String> {
    let chosen = &candidates[..size.min(candidates.len())];
    let mut ranks: Vec<Option<String>> = vec![None; chosen.len()];
    let mut rest = Vec::new();
    for c in chosen {
        match usize::try_from(c.rank_hint) {
            Ok(r) if r < ranks.len() && ranks[r].is_none() => ranks[r] = Some(c.worker_id.clone()),
            _ => rest.push(c.worker_id.clone()),
        }
    }
    let mut rest = rest.into_iter();
    ranks
        .into_iter()
        .map(|slot| slot.or_else(|| rest.next()).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, hint: i32) -> Candidate {
        Candidate {
            worker_id: id.into(),
            rank_hint: hint,
        }
    }

    #[test]
    fn forms_at_max_at_once_and_at_min_after_the_wait() {
        let wait = Duration::from_secs(10);
        let none = Duration::ZERO;
        let any = |_: usize| true;
        assert_eq!(world_size(1, 2, 4, wait, wait, any), None);
        assert_eq!(world_size(2, 2, 4, none, wait, any), None);
        assert_eq!(world_size(3, 2, 4, wait, wait, any), Some(3));
        assert_eq!(world_size(4, 2, 4, none, wait, any), Some(4));
        assert_eq!(world_size(6, 2, 4, none, wait, any), Some(4));
    }

    #[test]
    fn a_world_that_would_not_split_the_batch_is_not_formed() {
        let wait = Duration::from_secs(10);
        // Global batch 8: three idle trainers form a world of two, not three.
        let batch_of_8 = |w: usize| proto::plan::order::world_fits(8, None, w);
        assert_eq!(world_size(3, 2, 4, wait, wait, batch_of_8), Some(2));
        assert_eq!(world_size(5, 2, 8, wait, wait, batch_of_8), Some(4));
        // Micro-batches of 2: a world of 4 gives each rank 2 images, a world of 8 one.
        let micro_2 = |w: usize| proto::plan::order::world_fits(8, Some(2), w);
        assert_eq!(world_size(8, 2, 8, wait, wait, micro_2), Some(4));
        assert_eq!(world_size(1, 1, 8, wait, wait, micro_2), Some(1));
    }

    #[test]
    fn hints_are_honoured_and_the_rest_fill_in_order() {
        let got = assign_ranks(&[c("a", -1), c("b", 0), c("c", 7), c("d", 0)], 3);
        assert_eq!(got, ["b", "a", "c"]);
        let got = assign_ranks(&[c("a", 1), c("b", 0)], 2);
        assert_eq!(got, ["b", "a"]);
    }
}
