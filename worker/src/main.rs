//! `worker`: a DeCLIP trainer or teacher process.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use commands::device::select;
use proto::cli::{self, ConfigArgs, LogArgs, EXIT_CONFIG};
use proto::job::DataSource;
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
    /// Train the job's student. Under a coordinator (`--coordinator ADDR`, the job comes
    /// from it): join its groups and train data-parallel with the other trainers. With
    /// --standalone: in this process alone (the whole global batch, teachers online),
    /// resuming from the newest valid checkpoint under job.run_dir/checkpoints.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Train alone, without a coordinator.
        #[arg(long, conflicts_with = "coordinator")]
        standalone: bool,
        #[command(flatten)]
        remote: RemoteArgs,
        /// `auto`, `cpu`, `cuda` or `cuda:N`; default: trainers.device of the config.
        #[arg(long)]
        device: Option<String>,
    },
    /// Compute the frozen teachers' targets into the teacher cache
    /// (job.run_dir/cache/shard-NNNNN.dcache, written atomically). With --standalone, in
    /// this process without a coordinator; shards already cached with the same teacher
    /// fingerprint are kept.
    Teach {
        #[command(flatten)]
        config: ConfigArgs,
        /// Work without a coordinator: compute the job's shards (or --shards) and exit.
        #[arg(long, conflicts_with = "coordinator")]
        standalone: bool,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only shards A..B (B excluded), or one shard A; default: every shard.
        #[arg(long, value_name = "A..B")]
        shards: Option<String>,
        /// `auto`, `cpu`, `cuda` or `cuda:N`; default: teachers.device of the config.
        #[arg(long)]
        device: Option<String>,
    },
    /// Write `alpha * student + (1 - alpha) * original` of a checkpoint as safetensors in
    /// the original key layout (EVA-CLIP / open_clip), loadable by `inspect`.
    Export {
        /// A checkpoint directory (job.run_dir/checkpoints/step-NNNNNNNN).
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Merge weight of the trained student; default: export.alpha of its job.
        #[arg(long)]
        alpha: Option<f64>,
        /// Output safetensors file (written atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Run the job's preprocessing and models on a few images and write every
    /// intermediate tensor (float32) to a safetensors file: student_input, content_map,
    /// context, vfm_input, vfm_features, affinity_teacher, affinity_student; with --boxes
    /// also roi_features, crop_inputs, crop_embeddings and the losses. Use it to check a
    /// weights conversion against your PyTorch setup.
    Inspect {
        #[command(flatten)]
        config: ConfigArgs,
        /// Student weights (safetensors); overrides model.student.weights. Without
        /// either, the config's seeded random initialisation is used.
        #[arg(long, value_name = "FILE")]
        student_weights: Option<PathBuf>,
        /// VFM weights (safetensors); overrides model.vfm.weights.
        #[arg(long, value_name = "FILE")]
        vfm_weights: Option<PathBuf>,
        /// An image (JPEG or PNG). Repeat for a batch; outputs keep this order.
        #[arg(long = "image", value_name = "FILE", required = true)]
        images: Vec<PathBuf>,
        /// JSON list with one entry per --image, each a list of `[x0, y0, x1, y1]` boxes in
        /// original-image pixels. Crops and region outputs follow image-then-box order.
        #[arg(long, value_name = "FILE")]
        boxes: Option<PathBuf>,
        /// Where to write the tensors (written atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// `auto`, `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Write a synthetic COCO dataset: N JPEG and PNG images of varied sizes under
    /// OUT/train2017 and OUT/annotations/instances_train2017.json (one box per image).
    SynthCoco {
        /// Good images to write.
        #[arg(long, value_name = "N")]
        images: u32,
        /// Dataset root (use it as data.coco_root).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Also add one entry of each defect a reader must survive: a missing file, a
        /// zero-byte file, a truncated JPEG, a text file named .jpg, a size that disagrees
        /// with the json, a decompression bomb, a duplicate id, `../evil.jpg`, `/etc/passwd`.
        #[arg(long)]
        defects: bool,
        /// Seeds pixels and boxes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write only the annotations json, with COCO-like annotation bulk (≈3.8 kB per
        /// image) and no image files: input for the index benchmark.
        #[arg(long, conflicts_with = "defects")]
        index_only: bool,
    },
    /// Diagnostic: all-reduce buffers over a CPU ring of processes on this machine and
    /// print the bandwidth (bench/ring.sh; the killed-peer test).
    #[command(hide = true)]
    CommBench {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        world: usize,
        /// Directory where the ranks exchange their addresses.
        #[arg(long, value_name = "DIR")]
        rendezvous: PathBuf,
        /// Buffer sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "4,64,256")]
        sizes_mib: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Collective timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout_s: f64,
        #[arg(long, default_value_t = 1024)]
        chunk_kib: usize,
        /// After each ring round, time a plain TCP copy of the same bytes between the
        /// same processes (the wire ceiling, for the ratio in BENCHMARKS.md).
        #[arg(long)]
        baseline: bool,
    },
    /// Scan the job's COCO dataset as training would read it (annotations, every file,
    /// decode, size check) without training. Prints every problem with its path and reason
    /// and a summary by reason. Exits 0 when the skips stay within data.max_skip_fraction,
    /// 1 when they do not (or the annotations cannot be read), 2 for a config error.
    DataCheck {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only read the annotations (no image file is touched) and report the time and
        /// peak memory it took.
        #[arg(long)]
        index_only: bool,
    },
}

/// How a worker reaches its coordinator. The token comes from `DECLIP_TOKEN` (never a
/// flag: other users can read command lines); TLS from `DECLIP_TLS_CA` / `_CERT` / `_KEY`.
#[derive(clap::Args, Debug, Clone)]
struct RemoteArgs {
    /// The coordinator's gRPC address (host:port).
    #[arg(long, value_name = "ADDR")]
    coordinator: Option<String>,
    /// A file holding the job token (alternative to DECLIP_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Preferred rank (Kubernetes: the job completion index).
    #[arg(long, env = "DECLIP_RANK_HINT")]
    rank_hint: Option<i32>,
    /// Give up after the coordinator has been unreachable this many seconds.
    #[arg(long, default_value_t = 120)]
    reconnect_timeout_s: u64,
    /// Where this trainer's CPU ring listener binds (peers connect to it).
    #[arg(long, env = "DECLIP_RING_LISTEN", default_value = "127.0.0.1:0")]
    ring_listen: String,
    /// Where this process serves Prometheus `/metrics` (IP:port; port 0 picks one and
    /// reports it to the coordinator, which `coordinator launch` prints).
    #[arg(long, env = "DECLIP_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    metrics_listen: String,
}

fn main() -> ExitCode {
    // First act: make CUDA visible to libtorch before anything queries it.
    let info = runtime::init();
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    tracing::info!("{}", info.summary());
    if let Err(err) = worker::shutdown::install() {
        eprintln!("error: installing the SIGTERM/SIGINT handlers: {err}");
        return ExitCode::FAILURE;
    }
    if let Err(err) = worker::faults::install_from_env() {
        eprintln!("error: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
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
            let selected = select(&device, info)?;
            println!("{}", info.summary());
            println!("device: {selected:?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            config,
            standalone,
            remote,
            device,
        } => {
            if let Some(addr) = remote.coordinator.clone() {
                return commands::remote::train(&addr, &remote.options(), device.as_deref(), info);
            }
            let Some(job) = config.load_or_report().map(|loaded| loaded.spec) else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            anyhow::ensure!(
                standalone,
                "worker train needs --coordinator ADDR (the job comes from the coordinator) or --standalone"
            );
            let device = select(device.as_deref().unwrap_or(&job.trainers.device), info)?;
            let summary = worker::train::standalone::run_standalone(&job, device)?;
            print_summary(&summary);
            Ok(ExitCode::SUCCESS)
        }
        Command::Teach {
            config,
            standalone,
            remote,
            shards,
            device,
        } => {
            if let Some(addr) = remote.coordinator.clone() {
                return commands::remote::teach(&addr, &remote.options(), device.as_deref(), info);
            }
            let Some(job) = config.load_or_report().map(|loaded| loaded.spec) else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            anyhow::ensure!(
                standalone,
                "worker teach needs --coordinator ADDR (leases shards from it) or --standalone"
            );
            let only = shards
                .as_deref()
                .map(commands::teach::parse_shards)
                .transpose()?;
            let device = select(device.as_deref().unwrap_or(&job.teachers.device), info)?;
            commands::teach::teach_standalone(&job, only, device)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            checkpoint,
            alpha,
            out,
        } => {
            println!(
                "{}",
                commands::export::export_checkpoint(&checkpoint, alpha, &out)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            config,
            student_weights,
            vfm_weights,
            images,
            boxes,
            out,
            device,
        } => {
            let Some(job) = config.load_or_report().map(|loaded| loaded.spec) else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            let device = select(&device, info)?;
            let request = commands::inspect::InspectRequest {
                job,
                student_weights,
                vfm_weights,
                images,
                boxes,
                device,
            };
            let tensors = commands::inspect::inspect(&request)?;
            commands::inspect::write_tensors(&out, &tensors)?;
            let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
            println!(
                "wrote {} tensors to {}: {}",
                tensors.len(),
                out.display(),
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::SynthCoco {
            images,
            out,
            defects,
            seed,
            index_only,
        } => {
            println!(
                "{}",
                commands::synth_coco::synth_coco(&out, images, seed, defects, index_only)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CommBench {
            rank,
            world,
            rendezvous,
            sizes_mib,
            rounds,
            timeout_s,
            chunk_kib,
            baseline,
        } => {
            let timeout = std::time::Duration::try_from_secs_f64(timeout_s)
                .context("--timeout-s must be a non-negative number of seconds")?;
            commands::comm_bench::comm_bench(&commands::comm_bench::CommBench {
                rank,
                world,
                rendezvous,
                sizes_mib,
                rounds,
                timeout,
                chunk_kib,
                baseline,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DataCheck { config, index_only } => {
            let Some(job) = config.load_or_report().map(|loaded| loaded.spec) else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            if job.data.source != DataSource::Coco {
                eprintln!(
                    "error: data-check reads a COCO dataset: set data.source = \"coco\" and data.coco_root"
                );
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            let usable = commands::data_check::data_check(&job.data, index_only)?;
            Ok(if usable {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_summary(s: &worker::train::standalone::RunSummary) {
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let n = s.losses.len().min(20);
    println!(
        "steps run      {} (now at step {})",
        s.steps_run, s.final_step
    );
    println!("images         {}", s.images);
    println!("wall time      {:.1} s", s.wall.as_secs_f64());
    if n > 0 {
        println!("loss first {n:>2}  {:.4}", mean(&s.losses[..n]));
        println!(
            "loss last {n:>2}   {:.4}",
            mean(&s.losses[s.losses.len() - n..])
        );
    }
    if let Some(dir) = &s.resumed_from {
        println!("resumed from   {}", dir.display());
    }
    if s.interrupted {
        println!(
            "interrupted    at step {} (the same command resumes it)",
            s.final_step
        );
    }
    if let Some(dir) = &s.checkpoint {
        println!("checkpoint     {}", dir.display());
    }
    for path in &s.exports {
        println!("export         {}", path.display());
    }
    if s.skips.total() > 0 {
        // Each was replaced by the next good image in index order (worker::data::skips).
        println!("skipped        {}", s.skips.total());
        for (reason, n) in s.skips.iter() {
            println!("skipped {:<15}{n}", reason.as_str());
        }
    }
}

impl RemoteArgs {
    fn options(&self) -> commands::remote::RemoteOptions {
        commands::remote::RemoteOptions {
            token_file: self.token_file.clone(),
            rank_hint: self.rank_hint.unwrap_or(-1),
            reconnect_timeout: std::time::Duration::from_secs(self.reconnect_timeout_s),
            ring_listen: self.ring_listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
        }
    }
}
