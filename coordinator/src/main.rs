//! `coordinator`: the DeCLIP control plane. It never links libtorch.

mod manifests;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proto::cli::{self, ConfigArgs, LogArgs, EXIT_CONFIG};

/// Coordinates a DeCLIP training job: validates the job config, and (as the
/// corresponding features land) schedules teachers and trainers.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load, resolve and validate a job config, then print it fully resolved (after
    /// environment variables and --set). Exits 2 with every problem when it is refused.
    Validate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the Kubernetes objects that run this job (multi-document YAML), rendered
    /// from the same resolved config as `launch`. See docs/kubernetes.md.
    Manifests(manifests::ManifestsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { config } => Ok(validate(&config)),
        Command::Manifests(args) => manifests::command(args),
    }
}

fn validate(config: &ConfigArgs) -> ExitCode {
    let Some(loaded) = config.load_or_report() else {
        return ExitCode::from(EXIT_CONFIG);
    };
    println!(
        "# resolved from {} (hash {})",
        loaded.source,
        loaded.spec.hash_hex()
    );
    print!("{}", loaded.spec.to_toml());
    ExitCode::SUCCESS
}
