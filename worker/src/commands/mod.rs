//! The binary's subcommands that are more than a few lines: glue between the
//! command line, the job config and the library (errors with context via anyhow).

pub mod comm_bench;
pub mod data_check;
pub mod device;
pub mod export;
pub mod inspect;
pub mod remote;
pub mod synth_coco;
pub mod teach;
