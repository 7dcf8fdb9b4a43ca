//! `coordinator manifests`: the Kubernetes objects that run a job, rendered from the
//! same resolved [`JobSpec`] that `launch` and `serve` use, so the two cannot drift.
//!
//! What is rendered (in this order, one YAML document each):
//! ConfigMap (the job config as the pods see it), three PersistentVolumeClaims (data,
//! teacher cache, run directory), the coordinator Service and Deployment, the
//! trainers (an Indexed Job, or a JobSet), the teacher pool (an Indexed Job, cache
//! mode only), a Volcano PodGroup when `k8s.gang = "volcano"`, and a PodMonitor.
//! The token Secret is referenced by name (`k8s.token_secret`), never rendered.

mod layout;
mod objects;

use std::process::ExitCode;

use anyhow::Context;
use proto::cli::{ConfigArgs, EXIT_CONFIG};
use proto::job::JobSpec;
use serde_json::Value;

pub use layout::{coordinator_metrics_port, CONFIG_FILE, CONFIG_MOUNT, DATA_MOUNT, RUNS_MOUNT};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot write {kind} as YAML: {source}")]
    Yaml {
        kind: String,
        source: serde_yaml_ng::Error,
    },
}

/// The spec as the pods see it: run directory on the run volume, the coordinator
/// listening on all interfaces at the Service's ports. The ConfigMap carries it.
pub fn in_cluster_spec(spec: &JobSpec) -> JobSpec {
    let mut s = spec.clone();
    s.job.run_dir = format!("{RUNS_MOUNT}/{}", spec.job.name);
    s.coordinator.listen = format!("0.0.0.0:{}", spec.k8s.grpc_port);
    s.coordinator.metrics_port = coordinator_metrics_port(spec);
    s
}

/// Every object, in apply order (volumes and config before the pods that use them).
pub fn objects(spec: &JobSpec) -> Vec<Value> {
    let cluster = in_cluster_spec(spec);
    objects::all(&cluster)
}

/// The objects as one multi-document YAML stream.
pub fn render(spec: &JobSpec) -> Result<String, ManifestError> {
    let mut out = format!(
        "# Rendered by `coordinator manifests` from job {:?} (config hash {}).\n\
         # Create the token Secret first: see docs/kubernetes.md.\n",
        spec.job.name,
        spec.hash_hex()
    );
    for object in objects(spec) {
        let yaml = serde_yaml_ng::to_string(&object).map_err(|source| ManifestError::Yaml {
            kind: object["kind"].as_str().unwrap_or("object").to_string(),
            source,
        })?;
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}

/// Flags of `coordinator manifests`.
#[derive(clap::Args, Debug)]
pub struct ManifestsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Namespace of every object (same as `--set k8s.namespace=N`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Image of every pod (same as `--set k8s.image=I`).
    #[arg(long)]
    pub image: Option<String>,
}

/// `coordinator manifests`: the flags become `--set` overrides, so they go through
/// the same validation as every other key; refused configs exit with [`EXIT_CONFIG`].
pub fn command(args: ManifestsArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.config;
    for (key, value) in [("k8s.namespace", args.namespace), ("k8s.image", args.image)] {
        if let Some(value) = value {
            // A TOML string literal, so any text survives the `--set` parser intact.
            let literal = toml::Value::String(value).to_string();
            config.sets.push(format!("{key}={literal}"));
        }
    }
    let Some(loaded) = config.load_or_report() else {
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let yaml = render(&loaded.spec).context("rendering the Kubernetes objects")?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}
