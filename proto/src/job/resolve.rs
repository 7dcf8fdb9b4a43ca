//! Fills each tower's architecture from its preset; explicit fields win.

use super::arch::{self, Family, VitArch, PRESET_NAMES};
use super::error::Problem;
use super::spec::{JobSpec, TowerSpec};

/// Resolves `model.student` and `model.vfm` in place; returns the problems found.
pub(crate) fn resolve_towers(spec: &mut JobSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    resolve_tower("model.student", &mut spec.model.student, &mut problems);
    resolve_tower("model.vfm", &mut spec.model.vfm, &mut problems);
    problems
}

fn resolve_tower(section: &str, tower: &mut TowerSpec, problems: &mut Vec<Problem>) {
    let base = match tower.preset.as_deref() {
        Some(name) => match arch::preset(name) {
            Some(arch) => Some(arch),
            None => {
                problems.push(Problem::new(
                    format!("{section}.preset"),
                    format!("{name:?}"),
                    format!("one of {}", PRESET_NAMES.join(", ")),
                ));
                return;
            }
        },
        None => None,
    };
    macro_rules! fill {
        ($field:ident, $fallback:expr) => {
            if tower.$field.is_none() {
                tower.$field = base.as_ref().map(|b: &VitArch| b.$field).or($fallback);
            }
            if tower.$field.is_none() {
                problems.push(Problem::new(
                    format!("{section}.{}", stringify!($field)),
                    "(not set)",
                    format!(
                        "required without a preset: set it, or set {section}.preset to one of {}",
                        PRESET_NAMES.join(", ")
                    ),
                ));
            }
        };
    }
    fill!(family, None);
    fill!(width, None);
    fill!(depth, None);
    fill!(heads, None);
    fill!(mlp_hidden, None);
    fill!(patch_size, None);
    fill!(image_size, None);
    // Fields with a sensible value for hand-written towers.
    let heads = tower.heads;
    fill!(head_dim, tower.width.zip(heads).map(|(w, h)| w / h.max(1)));
    fill!(embed_dim, Some(0));
    fill!(register_tokens, Some(0));
    fill!(layer_scale, Some(tower.family == Some(Family::Dinov2)));
    fill!(
        rope_ref_grid,
        Some(if tower.family == Some(Family::Eva02) {
            16
        } else {
            0
        })
    );
    fill!(layer_norm_eps, Some(1e-6));
}
