//! `coordinator`: the DeCLIP control plane. It never links libtorch.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coordinator::{auth, manifests, status_view, ServeOptions, ServerTls};
use proto::cli::{self, ConfigArgs, LogArgs, EXIT_CONFIG};
use proto::client::{self, ClientTls};
use proto::wire::{JobPhase, StatusRequest};

/// Coordinates a DeCLIP training job: validates the job config, serves the control
/// protocol to trainers and teachers, and reports the job's status.
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
    /// Serve the control protocol for one job until it completes, stops or fails.
    /// The token comes from DECLIP_TOKEN or coordinator.token_file. Ctrl-C drains.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Resume the job journaled in RUN_DIR (default: job.run_dir of the config).
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// gRPC listen address (default: coordinator.listen).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Run the whole job on this machine: the coordinator in this process, teachers and
    /// trainers as child processes (a log file each under job.run_dir/logs), with
    /// progress, restarts and a summary. Ctrl-C drains (checkpoint at the next step).
    /// Without --config it runs the embedded demo job.
    Launch {
        #[command(flatten)]
        config: ConfigArgs,
        /// Continue the job journaled in job.run_dir instead of starting a new one.
        #[arg(long)]
        resume: bool,
        /// The worker binary (default: `worker` next to this executable, or DECLIP_WORKER_BIN).
        #[arg(long, value_name = "FILE")]
        worker_bin: Option<PathBuf>,
    },
    /// Show the job's phase, world, ranks, teachers and checkpoints.
    Status {
        /// The coordinator's address (IP:port or URI).
        #[arg(long, value_name = "ADDR")]
        addr: String,
        /// Keep printing as the status changes.
        #[arg(long)]
        watch: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// File with the job token (default: DECLIP_TOKEN).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
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
        Command::Serve {
            config,
            resume,
            listen,
        } => runtime()?.block_on(serve(config, resume, listen)),
        Command::Launch {
            config,
            resume,
            worker_bin,
        } => {
            let Some(loaded) = config.load_or_report() else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            runtime()?.block_on(coordinator::launch::launch(
                coordinator::launch::LaunchArgs {
                    spec: loaded.spec,
                    source: loaded.source,
                    resume,
                    worker_bin,
                },
            ))
        }
        Command::Status {
            addr,
            watch,
            json,
            token_file,
        } => runtime()?.block_on(status(&addr, watch, json, token_file)),
        Command::Manifests(args) => manifests::command(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
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

async fn serve(
    config: ConfigArgs,
    resume: Option<PathBuf>,
    listen: Option<String>,
) -> anyhow::Result<ExitCode> {
    let Some(loaded) = config.load_or_report() else {
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let spec = loaded.spec;
    let token = auth::resolve_token(
        std::env::var(proto::auth::TOKEN_ENV).ok(),
        spec.coordinator
            .token_file
            .as_deref()
            .map(std::path::Path::new),
    )?;
    let listen = listen.unwrap_or_else(|| spec.coordinator.listen.clone());
    let opts = ServeOptions {
        metrics_listen: Some(coordinator::metrics_listen(
            &listen,
            spec.coordinator.metrics_port,
        )),
        listen,
        run_dir: resume
            .clone()
            .unwrap_or_else(|| PathBuf::from(&spec.job.run_dir)),
        token,
        resume: resume.is_some(),
        tls: ServerTls::from_spec(&spec.coordinator),
    };
    let running = coordinator::start(spec, opts).await?;
    if let Some(metrics) = running.metrics_addr() {
        eprintln!(
            "coordinator on {}, metrics on http://{metrics}/metrics",
            running.addr()
        );
    }
    Ok(match wait_or_drain(running).await? {
        JobPhase::Completed | JobPhase::Stopped => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// Waits for the job to finish. The first Ctrl-C or SIGTERM drains it (a checkpoint at
/// the next step, then Stop); a second Ctrl-C exits at once.
async fn wait_or_drain(running: coordinator::Running) -> anyhow::Result<JobPhase> {
    let mut status = running.subscribe();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("Ctrl-C: draining (press again to exit at once)");
            running.drain("Ctrl-C");
        }
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: draining");
            running.drain("SIGTERM");
        }
        _ = status.wait_for(|s| coordinator::service::is_terminal(s.phase)) => {}
    }
    tokio::select! {
        phase = running.finished() => phase,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted twice; exiting without a drain"),
    }
}

async fn status(
    addr: &str,
    watch: bool,
    json: bool,
    token_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let token = auth::resolve_token(
        std::env::var(proto::auth::TOKEN_ENV).ok(),
        token_file.as_deref(),
    )?;
    let tls = ClientTls::from_env();
    let mut client = client::connect(addr, Some(&token), tls.as_ref()).await?;
    let show = |s: &proto::wire::JobStatus| {
        if json {
            println!("{}", status_view::to_json(s));
        } else {
            println!("{}", status_view::table(s));
        }
    };
    if !watch {
        let s = client.status(StatusRequest {}).await?.into_inner();
        show(&s);
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = client.watch_status(StatusRequest {}).await?.into_inner();
    while let Some(s) = stream.message().await? {
        if !json {
            // Clear the screen and home the cursor (ANSI) so the table updates in place.
            print!("\x1b[2J\x1b[H");
        }
        show(&s);
        if coordinator::service::is_terminal(s.phase) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
