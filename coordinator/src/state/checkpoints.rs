//! The registry of committed checkpoints: the last `keep`, newest last. A new generation
//! resumes from [`Checkpoints::latest`].

use std::collections::VecDeque;

use crate::journal::Checkpoint;

#[derive(Clone, Debug)]
pub struct Checkpoints {
    keep: usize,
    list: VecDeque<Checkpoint>,
}

impl Checkpoints {
    /// A registry keeping at most `keep` (at least 1) checkpoints.
    pub fn new(keep: usize) -> Self {
        Self {
            keep: keep.max(1),
            list: VecDeque::new(),
        }
    }

    /// Records `ckpt`; returns the ones that fell out of the window (oldest first).
    pub fn push(&mut self, ckpt: Checkpoint) -> Vec<Checkpoint> {
        self.list.push_back(ckpt);
        let excess = self.list.len().saturating_sub(self.keep);
        self.list.drain(..excess).collect()
    }

    pub fn latest(&self) -> Option<&Checkpoint> {
        self.list.back()
    }

    /// Step of the latest checkpoint (0 = none: training starts from scratch).
    pub fn latest_step(&self) -> u64 {
        self.latest().map_or(0, |c| c.step)
    }

    pub fn all(&self) -> impl Iterator<Item = &Checkpoint> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64) -> Checkpoint {
        Checkpoint {
            step,
            path: format!("ckpt-{step}"),
            checksum: "ab".into(),
            epoch: 0,
            epoch_step: step,
        }
    }

    #[test]
    fn keeps_the_last_k() {
        let mut r = Checkpoints::new(2);
        assert_eq!(r.latest_step(), 0);
        assert!(r.push(ckpt(10)).is_empty());
        assert!(r.push(ckpt(20)).is_empty());
        let pruned = r.push(ckpt(30));
        assert_eq!(pruned, vec![ckpt(10)]);
        let steps: Vec<u64> = r.all().map(|c| c.step).collect();
        assert_eq!(steps, [20, 30]);
        assert_eq!(r.latest().unwrap().path, "ckpt-30");
    }
}
