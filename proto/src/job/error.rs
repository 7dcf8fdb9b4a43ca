//! Why a config is refused: [`ConfigError`] and the [`Problem`]s it lists. A leaf
//! of the job module: loading, resolving and validating all report through it.

use std::fmt;

/// Why a config was refused. Nothing has been written to disk when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    /// A source (file, environment variable, `--set` flag) is not valid TOML or
    /// does not fit the schema.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// The merged config parsed but some keys are out of range or inconsistent.
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
    /// The refused value, as shown to the user.
    pub value: String,
    /// What would be accepted instead.
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
