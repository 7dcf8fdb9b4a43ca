//! Training: what trains, the optimizer and schedule, checkpoints, export, the loop.

pub mod checkpoint;
pub mod distributed;
pub mod export;
pub mod optimizer;
pub mod params;
pub mod precision;
pub mod run;
pub mod trainer;
