//! Vision-tower architectures and their named presets.
//!
//! A preset only supplies defaults: every hyperparameter can be overridden in the
//! job config (`[model.student] preset = "eva02-b16"` then `width = 64`).

use serde::{Deserialize, Serialize};

/// Which transformer family a tower belongs to; decides block layout and weights layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// EVA02-CLIP: 2-D RoPE, sub-LN attention without k bias, SwiGLU MLP with inner LN.
    Eva02,
    /// OpenAI CLIP ViT: pre-LN, QuickGELU MLP, learned absolute positions, no RoPE.
    OpenaiClip,
    /// DINOv2 (with or without registers): LayerScale, antialiased position resize.
    Dinov2,
    /// DINO v1 ViT.
    Dino,
}

impl Family {
    /// Families whose last block can be decoupled and trained as a DeCLIP student.
    pub fn can_be_student(self) -> bool {
        matches!(self, Family::Eva02 | Family::OpenaiClip)
    }
    /// Families usable as the context teacher (vision foundation model).
    pub fn can_be_vfm(self) -> bool {
        matches!(self, Family::Dinov2 | Family::Dino)
    }
}

/// A fully resolved vision-tower architecture (every field known).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitArch {
    pub family: Family,
    /// Token width D.
    pub width: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    pub heads: usize,
    /// Per-head dimension; `heads * head_dim` is the attention width.
    pub head_dim: usize,
    /// Hidden size of the MLP (SwiGLU inner size for EVA02).
    pub mlp_hidden: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Native (pre-training) input side in pixels; the position table covers
    /// `image_size / patch_size` patches per side.
    pub image_size: usize,
    /// CLIP embedding size (output of the head). 0 for towers without a head (VFMs).
    pub embed_dim: usize,
    /// Register tokens after CLS (DINOv2-reg: 4).
    pub register_tokens: usize,
    /// Whether blocks scale their residual branches by learned LayerScale gammas.
    pub layer_scale: bool,
    /// Side of the grid RoPE positions are rescaled into (EVA02: 16). 0 when no RoPE.
    pub rope_ref_grid: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl VitArch {
    /// Side of the stored absolute position table, in patches.
    pub fn pos_grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn attention_width(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn uses_rope(&self) -> bool {
        self.family == Family::Eva02
    }
}

/// The named presets. Values are those of the published checkpoints.
pub const PRESET_NAMES: &[&str] = &[
    "eva02-b16",
    "eva02-l14-336",
    "openai-b16",
    "openai-l14",
    "dinov2-b14-reg",
    "dinov2-l14-reg",
    "dino-b8",
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Option<VitArch> {
    let base =
        |family, width, depth, heads, mlp_hidden, patch_size, image_size, embed_dim| VitArch {
            family,
            width,
            depth,
            heads,
            head_dim: 64,
            mlp_hidden,
            patch_size,
            image_size,
            embed_dim,
            register_tokens: 0,
            layer_scale: false,
            rope_ref_grid: 0,
            layer_norm_eps: 1e-6,
        };
    let arch = match name {
        "eva02-b16" => VitArch {
            rope_ref_grid: 16,
            ..base(Family::Eva02, 768, 12, 12, 2048, 16, 224, 512)
        },
        "eva02-l14-336" => VitArch {
            rope_ref_grid: 16,
            ..base(Family::Eva02, 1024, 24, 16, 2730, 14, 336, 768)
        },
        "openai-b16" => VitArch {
            layer_norm_eps: 1e-5,
            ..base(Family::OpenaiClip, 768, 12, 12, 3072, 16, 224, 512)
        },
        "openai-l14" => VitArch {
            layer_norm_eps: 1e-5,
            ..base(Family::OpenaiClip, 1024, 24, 16, 4096, 14, 224, 768)
        },
        "dinov2-b14-reg" => VitArch {
            register_tokens: 4,
            layer_scale: true,
            ..base(Family::Dinov2, 768, 12, 12, 3072, 14, 518, 0)
        },
        "dinov2-l14-reg" => VitArch {
            register_tokens: 4,
            layer_scale: true,
            ..base(Family::Dinov2, 1024, 24, 16, 4096, 14, 518, 0)
        },
        "dino-b8" => base(Family::Dino, 768, 12, 12, 3072, 8, 224, 0),
        _ => return None,
    };
    Some(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_preset_resolves_and_is_self_consistent() {
        for name in PRESET_NAMES {
            let arch = preset(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(arch.attention_width(), arch.width, "{name}");
            assert_eq!(arch.image_size % arch.patch_size, 0, "{name}");
        }
        assert!(preset("eva02-b17").is_none());
    }

    #[test]
    fn method_spec_shapes() {
        let b = preset("eva02-b16").unwrap();
        assert_eq!(
            (b.width, b.depth, b.heads, b.mlp_hidden, b.embed_dim),
            (768, 12, 12, 2048, 512)
        );
        assert_eq!(b.pos_grid(), 14);
        let l = preset("eva02-l14-336").unwrap();
        assert_eq!(
            (l.width, l.depth, l.mlp_hidden, l.embed_dim, l.pos_grid()),
            (1024, 24, 2730, 768, 24)
        );
        let d = preset("dinov2-b14-reg").unwrap();
        assert_eq!((d.register_tokens, d.pos_grid()), (4, 37));
    }
}
