//! The job spec: schema ([`spec`]), architecture presets ([`arch`]), loading with
//! overrides ([`load`]) and validation. A spec that comes out of [`load`] is
//! resolved (every tower's architecture filled in) and valid.

pub mod arch;
mod load;
mod resolve;
mod spec;
mod validate;

use std::fmt;

use sha2::{Digest, Sha256};

pub use load::{load, ConfigSource, LoadedJob, ENV_PREFIX};
pub use spec::*;
pub use validate::{parse_device, DeviceRequest};

/// The embedded default job (`configs/demo.toml`): a tiny CPU run on synthetic data.
pub const DEMO_CONFIG: ConfigSource = ConfigSource::Embedded {
    name: "configs/demo.toml",
    text: include_str!("../../../configs/demo.toml"),
};

/// Why a config was refused. Nothing has been written to disk when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{}", ProblemList(.0))]
    Invalid(Vec<Problem>),
}

/// One refused key: where it was set, its value, and what would be accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// The file, environment variable or `--set` flag that supplied the key.
    pub origin: String,
    /// Dotted key path, e.g. `train.batch_size`.
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl Problem {
    pub(crate) fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        Self {
            origin: String::new(),
            key: key.into(),
            value: value.into(),
            allowed: allowed.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: key `{}` = {}: expected {}",
            self.origin, self.key, self.value, self.allowed
        )
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid job config ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for p in self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl JobSpec {
    /// The resolved spec as TOML (what `coordinator validate` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a JobSpec always serialises")
    }

    /// A stable hash of the resolved spec; checkpoints record it so a resume with
    /// another config is noticed.
    pub fn hash_hex(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a JobSpec always serialises");
        let digest = Sha256::digest(&canonical);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}
