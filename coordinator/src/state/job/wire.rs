//! The state's facts in the wire's terms: commands, checkpoint references, phase names.
//! A leaf: it knows nothing of `JobState`, so `mod.rs` and the status views outside the
//! state can use it.

use proto::wire::{command, CheckpointRef, Command, JobPhase};

use crate::journal::Checkpoint;

pub(super) fn command(kind: command::Kind) -> Command {
    Command { kind: Some(kind) }
}

/// `TRAINING` for `JOB_PHASE_TRAINING`.
pub fn phase_name(phase: JobPhase) -> &'static str {
    let name = phase.as_str_name();
    name.strip_prefix("JOB_PHASE_").unwrap_or(name)
}

/// A committed checkpoint as the wire names it (a resume point, the status's last one).
pub fn checkpoint_ref(c: &Checkpoint) -> CheckpointRef {
    CheckpointRef {
        step: c.step,
        path: c.path.clone(),
        checksum: c.checksum.clone(),
        epoch: c.epoch,
        epoch_step: c.epoch_step,
    }
}
