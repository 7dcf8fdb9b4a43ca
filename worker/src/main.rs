//! `worker`: a DeCLIP trainer or teacher process.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use proto::cli::{self, LogArgs};
use proto::job::parse_device;
use worker::runtime;

/// Runs DeCLIP work on one device: trainer or teacher processes (as those land),
/// and tools around the models.
#[derive(Parser, Debug)]
#[command(name = "worker", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Report what this machine offers libtorch: version, CUDA (and why not), CPU
    /// threads, and the device `--device` resolves to. Exits 1 if that device is unusable.
    Devices {
        /// `auto` (first GPU if any, else CPU), `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

fn main() -> ExitCode {
    // First act: make CUDA visible to libtorch before anything queries it.
    let info = runtime::init();
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    tracing::info!("{}", info.summary());
    match run(cli, info) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, info: &runtime::RuntimeInfo) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Devices { device } => {
            let request = parse_device(&device)
                .with_context(|| format!("--device {device:?}: expected auto, cpu, cuda or cuda:N"))?;
            let selected = runtime::select_device(request, info)?;
            println!("{}", info.summary());
            println!("device: {selected:?}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
