//! What differs between training alone and training under a coordinator, as the one
//! training loop (`train_loop`) asks it: where this process sits and who its peers
//! are, when to checkpoint, what a written checkpoint means (committed or not), when to
//! stop, and whom to tell about each step. `standalone::Standalone` and
//! `distributed::coordinated::Coordinated` implement it.

use proto::plan::order::Cursor;

use super::artifacts::WrittenCheckpoint;
use super::cache_gate::CacheGate;
use super::cache_gate::CacheLookups;
use super::error::RunError;
use super::trainer::StepReport;
use crate::comm::Collective;

/// This process's rank in a world of `world` data-parallel trainers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
}

impl Placement {
    /// A world of one.
    pub const ALONE: Placement = Placement { rank: 0, world: 1 };

    /// Rank 0 writes the checkpoints and exports (every rank holds the same weights).
    pub fn writes_artifacts(self) -> bool {
        self.rank == 0
    }
}

/// Why the loop stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoopEnd {
    /// The job's last step is done (checkpointed and exported).
    Completed,
    /// Checkpointed and stopped at the coordinator's drain step (Ctrl-C, preemption).
    Drained,
    /// The coordinator said stop.
    Stopped,
    /// The coordinator aborted this generation: wait for the next.
    Aborted(String),
}

/// A step just done, as the driver reports it.
#[derive(Clone, Copy, Debug)]
pub struct StepRecord<'a> {
    /// Steps done, this one included (the next step's 0-based index).
    pub step: u64,
    pub total: u64,
    /// The order's position after this step.
    pub cursor: Cursor,
    pub losses: &'a StepReport,
    /// Images in this rank's slice.
    pub rank_images: u64,
    /// Seconds from asking for the data to the end of the optimizer step.
    pub seconds: f64,
    /// Seconds of `seconds` spent waiting for data (teacher shards included).
    pub data_wait: f64,
    /// Seconds of `data_wait` spent waiting for teacher shards.
    pub cache_wait: f64,
    pub cache: CacheLookups,
    /// Collectives issued so far (0 alone).
    pub collective_seq: u64,
}

pub trait Driver {
    fn placement(&self) -> Placement;

    /// The collective over this step's peers; `None` alone.
    fn peers(&mut self) -> Option<&mut dyn Collective>;

    /// How cache-mode steps get shards that are missing or corrupt.
    fn cache_gate(&mut self) -> &mut dyn CacheGate;

    /// Before every step and before finishing: `Some` ends the loop at once, without
    /// a checkpoint (an abort, a stop).
    fn interrupt(&mut self) -> Result<Option<LoopEnd>, RunError>;

    /// A step is done: tell whoever watches (coordinator reports, metrics).
    fn stepped(&mut self, record: &StepRecord<'_>) -> Result<(), RunError>;

    /// Whether to checkpoint after `step` (asked of the process that writes artifacts).
    fn checkpoint_due(&mut self, step: u64) -> bool;

    /// Whether to checkpoint and stop after `step` (a drain).
    fn drain_due(&mut self, step: u64) -> bool;

    /// A checkpoint of `step` is about to be written.
    fn checkpoint_started(&mut self, step: u64);

    /// A checkpoint was written: make it count (a coordinator commits it).
    fn checkpoint_written(&mut self, written: &WrittenCheckpoint) -> Result<(), RunError>;

    /// The loop ended with `end` after `step` steps (artifacts written); returns how
    /// the run ends (under a coordinator: once it says stop, or aborts after all).
    fn finish(&mut self, end: LoopEnd, step: u64) -> Result<LoopEnd, RunError>;

    /// What the step log lines start with (which generation and rank), if anything.
    fn log_prefix(&self) -> String;
}
