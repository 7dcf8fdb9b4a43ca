//! The weight-space merge saved at epoch ends and at the end (docs/method.md §6):
//! `θ = α·θ_student + (1−α)·θ_original` for every key (frozen ones included),
//! computed in fp32 as `fl(α·s) + fl((1−α)·o)`, written in the original release's
//! key layout (the `visual.` prefix of EVA-CLIP and open_clip checkpoints), so the
//! file loads anywhere the original loads, `worker inspect` included.

use std::fs::File;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// Prefix of the image tower's keys in the original checkpoints.
pub const VISUAL_PREFIX: &str = "visual.";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the student has {name} but the original weights do not")]
    Missing { name: String },
    #[error("{name}: student {student:?} vs original {original:?}")]
    Shape {
        name: String,
        student: Vec<i64>,
        original: Vec<i64>,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// Merged tensors, named in the original layout, sorted by name.
pub fn merge(
    student: &[(String, Tensor)],
    original: &[(String, Tensor)],
    alpha: f64,
) -> Result<Vec<(String, Tensor)>, ExportError> {
    let originals: std::collections::HashMap<&str, &Tensor> =
        original.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut merged = student
        .iter()
        .map(|(name, s)| {
            let o = originals
                .get(name.as_str())
                .ok_or_else(|| ExportError::Missing { name: name.clone() })?;
            if s.size() != o.size() {
                return Err(ExportError::Shape {
                    name: name.clone(),
                    student: s.size(),
                    original: o.size(),
                });
            }
            let (s, o) = (
                s.to_kind(Kind::Float),
                o.to_kind(Kind::Float).to_device(s.device()),
            );
            let value = tch::no_grad(|| &s * alpha + &o * (1.0 - alpha));
            Ok((
                format!("{VISUAL_PREFIX}{name}"),
                value.to_device(tch::Device::Cpu).contiguous(),
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(merged)
}

/// Writes tensors to `out` atomically (temp file, fsync, rename, fsync directory).
pub fn write_atomic(out: &Path, tensors: &[(String, Tensor)]) -> Result<(), ExportError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| ExportError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let file_name = out.file_name().and_then(|n| n.to_str()).unwrap_or("export");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    Tensor::write_safetensors(tensors, &tmp).map_err(|e| err(&tmp, &e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(&tmp, &e))?;
    std::fs::rename(&tmp, out).map_err(|e| err(out, &e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, &e))?;
    Ok(())
}
