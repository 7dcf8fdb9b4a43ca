//! The DeCLIP worker: trainer and teacher processes and the model library.
//!
//! Every entry point (the binary's `main`, each test) calls [`runtime::init`]
//! first: it makes CUDA visible to libtorch before anything asks about it.

pub mod comm;
pub mod control;
pub mod data;
pub mod distill;
pub mod faults;
pub mod geometry;
pub mod model;
pub mod runtime;
pub mod shutdown;
pub mod teacher;
pub mod telemetry;
pub mod train;
