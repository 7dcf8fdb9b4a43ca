//! `worker export`: the α-merge of a checkpoint with the original weights, offline.

use std::path::Path;

use anyhow::{ensure, Context};
use proto::job::JobSpec;
use tch::Device;
use worker::model::towers::build_student;
use worker::train::{checkpoint, export};

/// Merges the student of checkpoint `dir` with its job's original weights.
pub fn export_checkpoint(dir: &Path, alpha: Option<f64>, out: &Path) -> anyhow::Result<String> {
    let ckpt =
        checkpoint::load(dir).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let spec: JobSpec =
        toml::from_str(&ckpt.job_toml).with_context(|| format!("{}/job.toml", dir.display()))?;
    let alpha = alpha.unwrap_or(spec.export.alpha);
    ensure!(
        (0.0..=1.0).contains(&alpha),
        "--alpha {alpha}: expected a number in [0, 1]"
    );
    let (original_vs, _original, source) = build_student(&spec.model.student, None, Device::Cpu)
        .context("rebuilding the original student weights")?;
    let mut original: Vec<(String, tch::Tensor)> = original_vs.variables().into_iter().collect();
    original.sort_by(|a, b| a.0.cmp(&b.0));
    let merged = export::merge(&ckpt.student, &original, alpha)?;
    export::write_atomic(out, &merged)?;
    Ok(format!(
        "wrote {} ({} tensors): {alpha} x step {} + {} x original ({source})",
        out.display(),
        merged.len(),
        ckpt.state.step,
        1.0 - alpha
    ))
}
