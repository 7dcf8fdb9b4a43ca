//! What a decision hands back to the service: commands to send ([`Outgoing`]), a refusal
//! or a journal failure ([`StateError`]), and the live decisions it counts ([`Decision`]).
//! A leaf: it knows nothing of `JobState`, so `mod.rs` can re-export it.

use proto::wire::Command;

use crate::journal::JournalError;
use crate::state::lost::LostReason;
use crate::validate::{Code, Refusal};

/// A command for one worker, or the end of its command stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// Send the command to the worker of that id.
    Send(String, Command),
    /// End the command stream of the worker of that id.
    Close(String),
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The request is refused; the state is unchanged.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The journal could not record the decision, so it was not applied.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
}

pub(super) type Result<T, E = StateError> = std::result::Result<T, E>;

pub(super) fn refuse<T>(code: Code, reason: &'static str, message: impl Into<String>) -> Result<T> {
    Err(Refusal::new(code, reason, message).into())
}

/// A decision taken live (journaled by this process, not replayed) that the service
/// counts in the metrics, once: [`JobState::take_decisions`] hands each out once, and a
/// journal replay ([`JobState::replay`], [`JobState::apply`]) produces none.
///
/// [`JobState::take_decisions`]: super::JobState::take_decisions
/// [`JobState::replay`]: super::JobState::replay
/// [`JobState::apply`]: super::JobState::apply
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The current generation was aborted because a member was lost.
    GenerationAborted(LostReason),
    /// Rank 0's checkpoint at `step` was committed.
    CheckpointCommitted {
        /// The global step of the committed checkpoint.
        step: u64,
    },
}
