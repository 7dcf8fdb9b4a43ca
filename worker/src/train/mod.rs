//! Training, as a map of the data flow:
//!
//! - [`standalone`] and [`distributed`] set a run up (resume, teacher cache, the
//!   generation's peers) and hand it to [`train_loop`], the one loop, through a
//!   [`driver::Driver`] that decides what differs: peers, checkpoint and drain points,
//!   commits, stops, reports.
//! - [`feed`] turns the sample order into each step's micro-batches and targets
//!   (through the [`cache_gate`] in cache mode).
//! - [`trainer`] holds the student, the frozen teachers (online mode) and AdamW
//!   ([`optimizer`], [`params`], [`precision`]) and takes one optimizer step.
//! - [`artifacts`] writes checkpoints ([`checkpoint`]) and merged exports ([`export`]).
//! - [`error`]: why a run stopped.

pub mod artifacts;
pub mod cache_gate;
pub mod checkpoint;
pub mod distributed;
pub mod driver;
pub mod error;
pub mod export;
pub mod feed;
pub mod optimizer;
pub mod params;
pub mod precision;
pub mod standalone;
pub mod train_loop;
pub mod trainer;
