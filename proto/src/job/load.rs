//! Loading a job spec: a TOML file (or the embedded demo), then environment
//! variables (`DECLIP__TRAIN__BATCH_SIZE=8`), then `--set key=value` flags, merged
//! by the `config` crate in that order of precedence.
//!
//! Every problem is reported against the source that supplied the key, so the
//! user learns whether to fix the file, an environment variable or a flag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{ConfigError, Problem};
use super::spec::JobSpec;
use super::{resolve, validate};

/// Prefix of environment variables that override config keys; `__` separates levels.
pub const ENV_PREFIX: &str = "DECLIP";
const ENV_SEPARATOR: &str = "__";

/// Where the base config comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A TOML file on disk.
    File(PathBuf),
    /// Text compiled into the binary (the demo job), with a display name.
    Embedded {
        name: &'static str,
        text: &'static str,
    },
}

impl ConfigSource {
    fn describe(&self) -> String {
        match self {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Embedded { name, .. } => format!("{name} (embedded)"),
        }
    }
}

/// A validated job spec and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedJob {
    pub spec: JobSpec,
    /// The file (or embedded name) the base config came from.
    pub source: String,
}

/// Loads, resolves and validates a job spec. `env` is the process environment
/// (passed in so tests need not mutate it); only `DECLIP__*` entries are used.
pub fn load(
    source: &ConfigSource,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<LoadedJob, ConfigError> {
    let origins = Origins::new(source, env, sets)?;
    let mut builder = config::Config::builder();
    builder = match source {
        ConfigSource::File(path) => {
            check_readable(path)?;
            builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
        }
        ConfigSource::Embedded { text, .. } => {
            builder.add_source(config::File::from_str(text, config::FileFormat::Toml))
        }
    };
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .source(Some(origins.env_map())),
    );
    for set in &origins.sets {
        builder = builder
            .set_override(set.key.clone(), set.value.clone())
            .map_err(|e| ConfigError::Syntax {
                origin: set.describe(),
                message: e.to_string(),
            })?;
    }
    let merged = builder.build().map_err(|e| ConfigError::Syntax {
        origin: origins.base.clone(),
        message: e.to_string(),
    })?;

    let mut spec: JobSpec = serde_path_to_error::deserialize(merged.clone()).map_err(|e| {
        let key = e.path().to_string();
        let message = strip_config_suffix(&e.inner().to_string());
        let value = merged
            .get::<config::Value>(&key)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "(not set)".into());
        ConfigError::Invalid(vec![Problem {
            origin: origins.of(&key),
            key,
            value,
            allowed: message,
        }])
    })?;

    let mut problems = resolve::resolve_towers(&mut spec);
    if problems.is_empty() {
        problems = validate::validate(&spec);
    }
    if !problems.is_empty() {
        for p in &mut problems {
            p.origin = origins.of(&p.key);
        }
        return Err(ConfigError::Invalid(problems));
    }
    Ok(LoadedJob {
        spec,
        source: origins.base,
    })
}

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// serde errors from the `config` crate end with " for key `x` in <origin>";
/// we name key and origin ourselves, more precisely.
fn strip_config_suffix(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// One `--set key=value` flag, the value parsed as a TOML value when it is one
/// (`8`, `1e-5`, `true`, `[0.9, 0.99]`, `"text"`) and taken as a string otherwise.
#[derive(Clone, Debug)]
struct SetFlag {
    raw: String,
    key: String,
    value: config::Value,
}

impl SetFlag {
    fn parse(raw: &str) -> Result<Self, ConfigError> {
        let (key, text) = raw.split_once('=').ok_or_else(|| ConfigError::Syntax {
            origin: format!("--set {raw}"),
            message: "expected key=value, e.g. --set train.batch_size=8".into(),
        })?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ConfigError::Syntax {
                origin: format!("--set {raw}"),
                message: "the key must be a dotted path such as train.batch_size".into(),
            });
        }
        let value = match toml::from_str::<toml::Table>(&format!("v = {text}")) {
            Ok(mut table) => toml_to_config(table.remove("v").expect("parsed key")),
            Err(_) => config::Value::from(text.to_string()),
        };
        Ok(Self {
            raw: raw.to_string(),
            key: key.to_string(),
            value,
        })
    }

    fn describe(&self) -> String {
        format!("--set {}", self.raw)
    }
}

fn toml_to_config(value: toml::Value) -> config::Value {
    use config::{Value, ValueKind};
    let kind = match value {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(items) => {
            ValueKind::Array(items.into_iter().map(toml_to_config).collect())
        }
        toml::Value::Table(table) => ValueKind::Table(
            table
                .into_iter()
                .map(|(k, v)| (k, toml_to_config(v)))
                .collect(),
        ),
    };
    Value::new(None, kind)
}

/// Which source supplied each key, for error messages.
struct Origins {
    base: String,
    /// (dotted key, variable name, value) for every `DECLIP__*` variable.
    env: Vec<(String, String, String)>,
    sets: Vec<SetFlag>,
}

impl Origins {
    fn new(
        source: &ConfigSource,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
        let env = env
            .into_iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix(&prefix)?;
                let key = rest.to_lowercase().replace(ENV_SEPARATOR, ".");
                Some((key, name, value))
            })
            .collect();
        let sets = sets
            .iter()
            .map(|s| SetFlag::parse(s))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            base: source.describe(),
            env,
            sets,
        })
    }

    fn env_map(&self) -> HashMap<String, String> {
        self.env
            .iter()
            .map(|(_, name, value)| (name.clone(), value.clone()))
            .collect()
    }

    /// The source of `key`: the last `--set` touching it, else an environment
    /// variable touching it, else the base file.
    fn of(&self, key: &str) -> String {
        let touches = |k: &str| k == key || is_under(key, k) || is_under(k, key);
        if let Some(set) = self.sets.iter().rev().find(|s| touches(&s.key)) {
            return set.describe();
        }
        if let Some((_, name, _)) = self.env.iter().find(|(k, _, _)| touches(k)) {
            return format!("environment variable {name}");
        }
        self.base.clone()
    }
}

/// Whether `key` lies inside the table `parent` (`train.lr` inside `train`).
fn is_under(key: &str, parent: &str) -> bool {
    key.len() > parent.len() && key.starts_with(parent) && key.as_bytes()[parent.len()] == b'.'
}
