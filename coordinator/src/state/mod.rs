//! The coordinator's state: plain structs with one owner each, no I/O but the journal.
//! [`job::JobState`] owns the rest and takes every decision.

pub mod checkpoints;
pub mod job;
pub mod lost;
pub mod rendezvous;
pub mod teachers;

pub use job::{Decision, JobConfig, JobState, Outgoing, StateError};
pub use lost::LostReason;
