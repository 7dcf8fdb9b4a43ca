//! Which student parameters train (docs/method.md §1.3), and their weight-decay group (§5).
//!
//! All blocks train except what the decoupled last block leaves unused: its MLP,
//! LN2 and the projection its attention does not use (K in `qq` mode, Q in `kk`).
//! Everything outside the blocks (patch embedding, class token, position table,
//! final norm, head; `ln_pre` for OpenAI CLIP) is frozen. For EVA02-B/16 in `qq`
//! mode that is 79,806,208 trainable values.

use proto::job::arch::{Family, VitArch};
use proto::job::DecoupledMode;

/// The role of one parameter in training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    Frozen,
    /// Trained with weight decay (matrices).
    Decay,
    /// Trained without weight decay (norms, biases, vectors).
    NoDecay,
}

/// Rows of a fused tensor that stay frozen: OpenAI CLIP's `in_proj_weight`/`bias`
/// stacks [Q; K; V], and the last block leaves one of them unused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrozenRows {
    pub start: i64,
    pub len: i64,
}

/// How to train a student of `arch` with decoupled attention `mode`.
#[derive(Clone, Debug)]
pub struct TrainableSplit {
    family: Family,
    last_block: usize,
    mode: DecoupledMode,
    width: i64,
}

impl TrainableSplit {
    pub fn new(arch: &VitArch, mode: DecoupledMode) -> Self {
        Self {
            family: arch.family,
            last_block: arch.depth - 1,
            mode,
            width: arch.attention_width() as i64,
        }
    }

    /// The role of parameter `name` (the model's own names) with `ndim` dimensions.
    pub fn role(&self, name: &str, ndim: usize) -> ParamRole {
        if self.is_frozen(name) {
            return ParamRole::Frozen;
        }
        // docs/method.md §5: decay on tensors of >= 2 dims whose names hold none of these.
        let no_decay_name = ["bn", "ln", "bias", "logit_scale"]
            .iter()
            .any(|s| name.contains(s));
        if ndim >= 2 && !no_decay_name {
            ParamRole::Decay
        } else {
            ParamRole::NoDecay
        }
    }

    fn is_frozen(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(self.block_prefix()) else {
            return true; // outside the blocks: stem, final norm, head
        };
        let (index, inner) = rest.split_once('.').unwrap_or((rest, ""));
        if index.parse::<usize>().ok() != Some(self.last_block) {
            return false;
        }
        match self.family {
            Family::OpenaiClip => inner.starts_with("ln_2.") || inner.starts_with("mlp."),
            _ => {
                let unused_projection = match self.mode {
                    DecoupledMode::Qq => inner == "attn.k_proj.weight",
                    DecoupledMode::Kk => inner == "attn.q_proj.weight" || inner == "attn.q_bias",
                    DecoupledMode::Csa => false,
                };
                unused_projection || inner.starts_with("norm2.") || inner.starts_with("mlp.")
            }
        }
    }

    fn block_prefix(&self) -> &'static str {
        match self.family {
            Family::OpenaiClip => "transformer.resblocks.",
            _ => "blocks.",
        }
    }

    /// For OpenAI CLIP's fused last-block `in_proj`, the rows that must not change.
    pub fn frozen_rows(&self, name: &str) -> Option<FrozenRows> {
        if self.family != Family::OpenaiClip {
            return None;
        }
        let last = format!("transformer.resblocks.{}.attn.in_proj_", self.last_block);
        if !name.starts_with(&last) {
            return None;
        }
        match self.mode {
            DecoupledMode::Qq => Some(FrozenRows {
                start: self.width,
                len: self.width,
            }),
            DecoupledMode::Kk => Some(FrozenRows {
                start: 0,
                len: self.width,
            }),
            DecoupledMode::Csa => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::job::arch::preset;

    #[test]
    fn eva02_b16_has_the_method_specs_trainable_count() {
        crate::runtime::init();
        let arch = preset("eva02-b16").unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = crate::model::eva::EvaVision::new(&vs.root(), &arch);
        let split = TrainableSplit::new(&arch, DecoupledMode::Qq);
        let trainable: i64 = vs
            .variables()
            .iter()
            .filter(|(name, t)| split.role(name, t.dim()) != ParamRole::Frozen)
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(trainable, 79_806_208);
    }

    #[test]
    fn roles_follow_the_rules() {
        let arch = VitArch {
            depth: 3,
            ..preset("eva02-b16").unwrap()
        };
        let s = TrainableSplit::new(&arch, DecoupledMode::Qq);
        assert_eq!(s.role("blocks.0.attn.k_proj.weight", 2), ParamRole::Decay);
        assert_eq!(s.role("blocks.2.attn.k_proj.weight", 2), ParamRole::Frozen);
        assert_eq!(s.role("blocks.2.attn.q_proj.weight", 2), ParamRole::Decay);
        assert_eq!(s.role("blocks.2.attn.q_bias", 1), ParamRole::NoDecay);
        assert_eq!(s.role("blocks.2.mlp.w1.weight", 2), ParamRole::Frozen);
        assert_eq!(
            s.role("blocks.1.attn.inner_attn_ln.weight", 1),
            ParamRole::NoDecay
        );
        assert_eq!(s.role("pos_embed", 3), ParamRole::Frozen);
        assert_eq!(s.role("head.weight", 2), ParamRole::Frozen);
        let kk = TrainableSplit::new(&arch, DecoupledMode::Kk);
        assert_eq!(kk.role("blocks.2.attn.q_bias", 1), ParamRole::Frozen);
        assert_eq!(kk.role("blocks.2.attn.k_proj.weight", 2), ParamRole::Decay);
        let openai = TrainableSplit::new(
            &VitArch {
                depth: 3,
                ..preset("openai-b16").unwrap()
            },
            DecoupledMode::Qq,
        );
        assert_eq!(openai.role("ln_pre.weight", 1), ParamRole::Frozen);
        assert_eq!(
            openai.role("transformer.resblocks.2.mlp.c_fc.weight", 2),
            ParamRole::Frozen
        );
        assert_eq!(
            openai.frozen_rows("transformer.resblocks.2.attn.in_proj_weight"),
            Some(FrozenRows {
                start: 768,
                len: 768
            })
        );
        assert_eq!(
            openai.frozen_rows("transformer.resblocks.1.attn.in_proj_weight"),
            None
        );
    }
}
