//! Command-line pieces both binaries share, so they accept the same config flags,
//! log the same way and exit with the same codes.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::job::{self, ConfigError, ConfigSource, LoadedJob};

/// Exit code for a refused configuration (nothing was started or written).
pub const EXIT_CONFIG: u8 = 2;

/// Which job config to use and how to override it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// Job config (TOML). Without it the embedded demo job (configs/demo.toml) is used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.batch_size=8`. Repeatable. Values are
    /// TOML (`8`, `1e-5`, `true`, `"text"`, `[0.9, 0.99]`); wins over `DECLIP__*`
    /// environment variables (`DECLIP__TRAIN__BATCH_SIZE=8`), which win over the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    pub fn source(&self) -> ConfigSource {
        match &self.config {
            Some(path) => ConfigSource::File(path.clone()),
            None => job::DEMO_CONFIG,
        }
    }

    /// Loads, resolves and validates the job config from the process environment.
    pub fn load(&self) -> Result<LoadedJob, ConfigError> {
        job::load(&self.source(), std::env::vars(), &self.sets)
    }

    /// [`Self::load`], printing every problem to stderr when the config is refused;
    /// the caller then exits with [`EXIT_CONFIG`].
    pub fn load_or_report(&self) -> Option<LoadedJob> {
        self.load().map_err(|err| eprintln!("error: {err}")).ok()
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Installs the global `tracing` subscriber on stderr. The level comes from
/// `RUST_LOG` (default `info`). Safe to call more than once (later calls do nothing).
pub fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
