//! The student's decoupled last block (docs/method.md §1.2).
//!
//! Blocks 0..n-2 run normally. The last block runs without its residual and
//! without its MLP: with X = LN1(x), Q = X Wqᵀ + bq, K = X Wkᵀ (+ bk), V = X Wvᵀ + bv,
//! no RoPE, per head A = softmax(Q Qᵀ) (no 1/√Dh by default, as the released
//! training code), O = proj(inner_ln(concat_h A V)).
//! - content map: O without CLS -> final norm -> head, as `[B,E,gh,gw]`, not normalised;
//! - context: Q of the patch tokens (CLS dropped), heads concatenated, bias included.

use proto::job::arch::VitArch;
use proto::job::DecoupledMode;
use tch::{Kind, Tensor};

use super::vit::{self, Grid};
use super::ModelError;

/// What a CLIP image tower exposes so its last block can be decoupled.
pub trait DecoupledTower {
    fn arch(&self) -> &VitArch;
    /// Tokens `[B,1+N,D]` entering the last block, and the patch grid.
    fn tokens_before_last(&self, images: &Tensor) -> Result<(Tensor, Grid), ModelError>;
    /// The last block's q, k, v `[B,T,A]` for tokens x (its LN1 applied here), no RoPE.
    fn last_block_qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor);
    /// Attention output with heads merged `[B,T,A]` -> block output `[B,T,D]`.
    fn last_block_output(&self, merged: &Tensor) -> Tensor;
    /// Final norm and head: tokens `[B,T,D]` -> embeddings `[B,T,E]`.
    fn project(&self, tokens: &Tensor) -> Tensor;
}

/// How the decoupled attention is formed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecoupledConfig {
    pub mode: DecoupledMode,
    /// Multiply the similarity by 1/√Dh before the softmax.
    pub scale: bool,
}

/// Dense features of a batch.
#[derive(Debug)]
pub struct DenseFeatures {
    /// `[B,E,gh,gw]`: content tokens through the final norm and head.
    pub content_map: Tensor,
    /// `[B,N,A]` (`qq`: Q, `kk`: K) or `[B,N,2A]` (`csa`: [Q̂, K̂], each L2-normalised
    /// per token, so that the normalised Gram matrix is (Q̂Q̂ᵀ + K̂K̂ᵀ) / 2).
    pub context: Tensor,
}

/// Runs the tower with its last block decoupled.
pub fn encode_dense(
    tower: &impl DecoupledTower,
    cfg: DecoupledConfig,
    images: &Tensor,
) -> Result<DenseFeatures, ModelError> {
    let (x, grid) = tower.tokens_before_last(images)?;
    let heads = tower.arch().heads;
    let (q, k, v) = tower.last_block_qkv(&x);
    let scale = if cfg.scale {
        (tower.arch().head_dim as f64).powf(-0.5)
    } else {
        1.0
    };
    let (qh, kh, vh) = (
        vit::split_heads(&q, heads),
        vit::split_heads(&k, heads),
        vit::split_heads(&v, heads),
    );
    let attended = match cfg.mode {
        DecoupledMode::Qq => vit::attention(&qh, &qh, &vh, scale),
        DecoupledMode::Kk => vit::attention(&kh, &kh, &vh, scale),
        DecoupledMode::Csa => {
            vit::attention(&qh, &qh, &vh, scale) + vit::attention(&kh, &kh, &vh, scale)
        }
    };
    let content = tower.last_block_output(&vit::merge_heads(&attended));
    let patches = grid.tokens();
    let content_map = vit::tokens_to_map(&tower.project(&content.narrow(1, 1, patches)), grid);
    let patch_q = q.narrow(1, 1, patches);
    let patch_k = k.narrow(1, 1, patches);
    let context = match cfg.mode {
        DecoupledMode::Qq => patch_q,
        DecoupledMode::Kk => patch_k,
        DecoupledMode::Csa => Tensor::cat(
            &[vit::l2_normalize(&patch_q), vit::l2_normalize(&patch_k)],
            -1,
        ),
    };
    Ok(DenseFeatures {
        content_map,
        context,
    })
}

/// Cosine-similarity matrix of per-token features `[B,N,C]` -> `[B,N,N]`.
pub fn affinity(features: &Tensor) -> Tensor {
    let f = vit::l2_normalize(&features.to_kind(Kind::Float));
    f.matmul(&f.transpose(1, 2))
}
