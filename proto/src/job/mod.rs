//! The job spec: schema (`spec`), architecture presets ([`arch`]), loading with
//! overrides ([`load`]) and validation. A spec that comes out of [`load`] is
//! resolved (every tower's architecture filled in) and valid.

pub mod arch;
mod error;
mod load;
mod resolve;
mod spec;
mod validate;

use sha2::{Digest, Sha256};

pub use error::{ConfigError, Problem};
pub use load::{load, ConfigSource, LoadedJob, ENV_PREFIX};
pub use spec::*;
pub use validate::{parse_device, DeviceRequest};

/// The embedded default job (`configs/demo.toml`): a tiny CPU run on synthetic data.
pub const DEMO_CONFIG: ConfigSource = ConfigSource::Embedded {
    name: "configs/demo.toml",
    text: include_str!("../../../configs/demo.toml"),
};

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
