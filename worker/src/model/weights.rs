//! Loading safetensors weights into a model, from the layouts users hold.
//!
//! Models name their parameters after their family's original release (EVA-CLIP,
//! open_clip, Meta's hub). This module is the only home of other names: one key
//! map per layout turns a file's keys into those names. The loader reports every
//! missing, unexpected and mis-shaped tensor in one error, and refuses files that
//! are not safetensors, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proto::job::WeightsLayout;
use safetensors::{Dtype, SafeTensors};
use tch::{nn, Device, Kind, Tensor};

/// Which model the weights are for; decides the prefixes and maps that apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tower {
    /// `eva::EvaVision`
    EvaVision,
    /// `openai_clip::ClipVision`
    ClipVision,
    /// `openai_clip::ClipText`
    ClipText,
    /// `dinov2::DinoVit` (DINOv2 and DINO v1)
    DinoVit,
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path} is not a valid safetensors file (truncated or another format?): {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: cannot tell its weights layout for {tower:?} from its keys (first: {first_keys}); set weights_layout")]
    UnknownLayout {
        path: PathBuf,
        tower: Tower,
        first_keys: String,
    },
    #[error("{path}: layout {layout:?} does not apply to {tower:?}")]
    WrongLayout {
        path: PathBuf,
        tower: Tower,
        layout: WeightsLayout,
    },
    #[error("{path}: tensor {name} has dtype {dtype:?}; expected a float type")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
    #[error("{path} ({layout:?} layout) does not match the model:{}", mismatch_lines(.missing, .unexpected, .misshaped))]
    Mismatch {
        path: PathBuf,
        layout: WeightsLayout,
        /// (model name, model shape)
        missing: Vec<(String, Vec<i64>)>,
        /// (file name, file shape)
        unexpected: Vec<(String, Vec<i64>)>,
        /// (model name, model shape, file shape)
        misshaped: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
}

fn mismatch_lines(
    missing: &[(String, Vec<i64>)],
    unexpected: &[(String, Vec<i64>)],
    misshaped: &[(String, Vec<i64>, Vec<i64>)],
) -> String {
    let mut out = String::new();
    for (name, shape) in missing {
        out += &format!("\n  missing    {name} {shape:?}");
    }
    for (name, shape) in unexpected {
        out += &format!("\n  unexpected {name} {shape:?}");
    }
    for (name, want, got) in misshaped {
        out += &format!("\n  mis-shaped {name}: model {want:?}, file {got:?}");
    }
    out
}

/// What a load did.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    pub layout: WeightsLayout,
    pub loaded: usize,
    /// File keys deliberately not used (derived buffers, other towers).
    pub ignored: usize,
}

/// What a file key becomes.
#[derive(Debug, PartialEq)]
enum Target {
    Param(String),
    /// timm's DINOv2 keeps no position for CLS (folded into `cls_token`): prepend a zero row.
    PosWithoutClass(String),
    Ignore,
}

/// Loads `path` into the variables of `vs` (built for `tower`).
pub fn load(
    vs: &mut nn::VarStore,
    path: &Path,
    tower: Tower,
    layout: WeightsLayout,
) -> Result<LoadReport, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let keys: BTreeSet<String> = file.names().into_iter().cloned().collect();
    let layout = match layout {
        WeightsLayout::Auto => detect(&keys, tower).ok_or_else(|| WeightsError::UnknownLayout {
            path: path.to_path_buf(),
            tower,
            first_keys: keys.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
        })?,
        named => named,
    };
    if !applies(layout, tower) {
        return Err(WeightsError::WrongLayout {
            path: path.to_path_buf(),
            tower,
            layout,
        });
    }
    let has_visual_prefix = keys.iter().any(|k| k.starts_with("visual."));
    let variables = vs.variables();
    let mut sources: BTreeMap<String, Tensor> = BTreeMap::new();
    let (mut unexpected, mut ignored) = (Vec::new(), 0);
    for key in &keys {
        let view = file.tensor(key).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        match map_key(key, tower, layout, has_visual_prefix) {
            Target::Ignore => ignored += 1,
            Target::Param(name) | Target::PosWithoutClass(name)
                if !variables.contains_key(&name) =>
            {
                unexpected.push((key.clone(), shape))
            }
            target => {
                let mut tensor = to_tensor(path, key, &view)?;
                if let Target::PosWithoutClass(_) = target {
                    let expected = variables[&name_of(&target)].size();
                    if shape.len() == 3 && shape[1] + 1 == expected[1] {
                        let zero = Tensor::zeros([1, 1, shape[2]], (Kind::Float, Device::Cpu));
                        tensor = Tensor::cat(&[zero, tensor], 1);
                    }
                }
                sources.insert(name_of(&target), tensor);
            }
        }
    }
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, var) in &variables {
        match sources.get(name) {
            None => missing.push((name.clone(), var.size())),
            Some(src) if src.size() != var.size() => {
                misshaped.push((name.clone(), var.size(), src.size()))
            }
            Some(_) => {}
        }
    }
    if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            layout,
            missing,
            unexpected,
            misshaped,
        });
    }
    tch::no_grad(|| {
        for (name, mut var) in variables {
            var.copy_(&sources[&name].to_kind(var.kind()));
        }
    });
    Ok(LoadReport {
        layout,
        loaded: sources.len(),
        ignored,
    })
}

fn name_of(target: &Target) -> String {
    match target {
        Target::Param(n) | Target::PosWithoutClass(n) => n.clone(),
        _ => unreachable!("only parameter targets have names"),
    }
}

fn to_tensor(
    path: &Path,
    key: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor, WeightsError> {
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        dtype => {
            return Err(WeightsError::Dtype {
                path: path.to_path_buf(),
                name: key.to_string(),
                dtype,
            })
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| WeightsError::Format {
        path: path.to_path_buf(),
        message: format!("{key}: {e}"),
    })
}

fn applies(layout: WeightsLayout, tower: Tower) -> bool {
    use WeightsLayout::*;
    match tower {
        Tower::EvaVision => matches!(layout, Evaclip | Timm),
        Tower::ClipVision | Tower::ClipText => layout == Openclip,
        Tower::DinoVit => matches!(layout, Meta | Timm),
    }
}

/// Guesses the layout from key names.
fn detect(keys: &BTreeSet<String>, tower: Tower) -> Option<WeightsLayout> {
    let any = |needle: &str| keys.iter().any(|k| k.contains(needle));
    match tower {
        Tower::EvaVision if any("attn.q_bias") => Some(WeightsLayout::Evaclip),
        Tower::EvaVision if any("mlp.fc1_g") => Some(WeightsLayout::Timm),
        Tower::ClipVision | Tower::ClipText if any("transformer.resblocks.") => {
            Some(WeightsLayout::Openclip)
        }
        Tower::DinoVit if any("reg_token") && !any("register_tokens") => Some(WeightsLayout::Timm),
        Tower::DinoVit if any("blocks.0.attn.qkv.weight") => Some(WeightsLayout::Meta),
        _ => None,
    }
}

/// The model parameter a file key feeds, per layout.
fn map_key(key: &str, tower: Tower, layout: WeightsLayout, has_visual_prefix: bool) -> Target {
    match tower {
        Tower::EvaVision => {
            let Some(key) = strip_vision_prefix(key, has_visual_prefix) else {
                return Target::Ignore; // text tower / logit_scale of a full CLIP checkpoint
            };
            // EVA-CLIP stores RoPE tables for the native grid: derived, recomputed per grid.
            if key.starts_with("rope.") || key.contains(".attn.rope.") {
                return Target::Ignore;
            }
            match layout {
                WeightsLayout::Timm => Target::Param(eva_from_timm(key)),
                _ => Target::Param(key.to_string()),
            }
        }
        Tower::ClipVision => match key.strip_prefix("visual.") {
            Some(rest) => Target::Param(rest.to_string()),
            None if has_visual_prefix => Target::Ignore,
            None => Target::Param(key.to_string()),
        },
        Tower::ClipText => {
            if key.starts_with("visual.") || key == "logit_scale" || key == "attn_mask" {
                Target::Ignore
            } else {
                Target::Param(key.to_string())
            }
        }
        Tower::DinoVit => match (layout, key) {
            (_, "mask_token") => Target::Ignore, // used only by masked-image pre-training
            (WeightsLayout::Timm, "reg_token") => Target::Param("register_tokens".into()),
            (WeightsLayout::Timm, "pos_embed") => Target::PosWithoutClass("pos_embed".into()),
            (_, key) if key.starts_with("head.") => Target::Ignore,
            (_, key) => Target::Param(key.to_string()),
        },
    }
}

/// Vision keys of EVA checkpoints: `visual.` (EVA-CLIP) or `visual.trunk.` (open_clip
/// wrapping timm); a file without either prefix holds the vision tower alone.
fn strip_vision_prefix(key: &str, has_visual_prefix: bool) -> Option<&str> {
    if !has_visual_prefix {
        return Some(key);
    }
    key.strip_prefix("visual.trunk.")
        .or_else(|| key.strip_prefix("visual."))
}

/// timm `Eva` names -> EVA-CLIP names.
fn eva_from_timm(key: &str) -> String {
    const RENAMES: &[(&str, &str)] = &[
        (".attn.q_proj.bias", ".attn.q_bias"),
        (".attn.v_proj.bias", ".attn.v_bias"),
        (".attn.norm.", ".attn.inner_attn_ln."),
        (".mlp.fc1_g.", ".mlp.w1."),
        (".mlp.fc1_x.", ".mlp.w2."),
        (".mlp.norm.", ".mlp.ffn_ln."),
        (".mlp.fc2.", ".mlp.w3."),
    ];
    let mut name = key.to_string();
    for (from, to) in RENAMES {
        if name.contains(from) {
            name = name.replace(from, to);
        }
    }
    name
}

/// Every variable of `vs` as a detached, contiguous CPU tensor, sorted by name (the
/// layout checkpoints and exports are written in).
pub fn sorted_cpu(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_eva_names_map_to_eva_clip_names() {
        assert_eq!(
            eva_from_timm("blocks.3.attn.q_proj.bias"),
            "blocks.3.attn.q_bias"
        );
        assert_eq!(
            eva_from_timm("blocks.3.attn.q_proj.weight"),
            "blocks.3.attn.q_proj.weight"
        );
        assert_eq!(
            eva_from_timm("blocks.0.mlp.fc1_g.weight"),
            "blocks.0.mlp.w1.weight"
        );
        assert_eq!(
            eva_from_timm("blocks.0.attn.norm.bias"),
            "blocks.0.attn.inner_attn_ln.bias"
        );
        assert_eq!(eva_from_timm("norm.weight"), "norm.weight");
    }

    #[test]
    fn layouts_are_detected_from_characteristic_keys() {
        let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let eva = keys(&["visual.blocks.0.attn.q_bias", "visual.cls_token"]);
        assert_eq!(detect(&eva, Tower::EvaVision), Some(WeightsLayout::Evaclip));
        let timm = keys(&["blocks.0.mlp.fc1_g.weight"]);
        assert_eq!(detect(&timm, Tower::EvaVision), Some(WeightsLayout::Timm));
        let dino_timm = keys(&["reg_token", "blocks.0.attn.qkv.weight"]);
        assert_eq!(
            detect(&dino_timm, Tower::DinoVit),
            Some(WeightsLayout::Timm)
        );
        let dino_meta = keys(&["register_tokens", "mask_token", "blocks.0.attn.qkv.weight"]);
        assert_eq!(
            detect(&dino_meta, Tower::DinoVit),
            Some(WeightsLayout::Meta)
        );
        assert_eq!(detect(&dino_meta, Tower::EvaVision), None);
    }
}
