//! OpenAI CLIP (as open_clip holds it): the ViT image tower, usable as DeCLIP
//! student, and the causal text tower for class-name embeddings.
//!
//! Pre-LN residual blocks with `nn.MultiheadAttention` (fused `in_proj`, with bias)
//! and a QuickGELU MLP (`x * sigmoid(1.702 x)`). The image tower adds a class
//! embedding and a learned position table (resized with plain bicubic), applies
//! `ln_pre` before the blocks and `ln_post` + `proj` (no bias) after them. The text
//! tower pools the token with the highest id (EOT) after `ln_final`.
//!
//! Parameter names are open_clip's (the image tower without its `visual.` prefix).

use proto::job::arch::VitArch;
use tch::{nn, Kind, Tensor};

use super::decoupled::DecoupledTower;
use super::vit::{self, Grid, PatchEmbed, PosResize, PositionTable};
use super::ModelError;

fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}

/// `nn.MultiheadAttention` weights: in_proj `[3A,D]` (+ bias) and out_proj.
#[derive(Debug)]
struct Attention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(p: nn::Path, width: usize, heads: usize) -> Self {
        let w = width as i64;
        Self {
            in_proj_weight: p.var(
                "in_proj_weight",
                &[3 * w, w],
                nn::init::DEFAULT_KAIMING_UNIFORM,
            ),
            in_proj_bias: p.zeros("in_proj_bias", &[3 * w]),
            out_proj: vit::linear(&p / "out_proj", width, width, true),
            heads,
            scale: ((width / heads) as f64).powf(-0.5),
        }
    }

    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .chunk(3, -1);
        (
            qkv[0].shallow_clone(),
            qkv[1].shallow_clone(),
            qkv[2].shallow_clone(),
        )
    }

    /// `mask`: additive `[T,T]` (causal text attention) or none.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (q, k, v) = self.qkv(x);
        let [q, k, v] = [&q, &k, &v].map(|t| vit::split_heads(t, self.heads));
        let out = match mask {
            None => vit::attention(&q, &k, &v, self.scale),
            Some(mask) => ((q.matmul(&k.transpose(-2, -1)) * self.scale) + mask)
                .softmax(-1, Kind::Float)
                .matmul(&v),
        };
        vit::merge_heads(&out).apply(&self.out_proj)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: nn::LayerNorm,
    attn: Attention,
    ln_2: nn::LayerNorm,
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

impl Block {
    fn new(p: nn::Path, width: usize, heads: usize, mlp_hidden: usize, eps: f64) -> Self {
        Self {
            ln_1: vit::layer_norm(&p / "ln_1", width, eps),
            attn: Attention::new(&p / "attn", width, heads),
            ln_2: vit::layer_norm(&p / "ln_2", width, eps),
            c_fc: vit::linear(&p / "mlp" / "c_fc", width, mlp_hidden, true),
            c_proj: vit::linear(&p / "mlp" / "c_proj", mlp_hidden, width, true),
        }
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.ln_1), mask);
        &x + quick_gelu(&x.apply(&self.ln_2).apply(&self.c_fc)).apply(&self.c_proj)
    }
}

fn blocks(
    p: &nn::Path,
    depth: usize,
    width: usize,
    heads: usize,
    mlp: usize,
    eps: f64,
) -> Vec<Block> {
    let p = p / "transformer" / "resblocks";
    (0..depth)
        .map(|i| Block::new(&p / i, width, heads, mlp, eps))
        .collect()
}

/// The OpenAI CLIP image tower.
#[derive(Debug)]
pub struct ClipVision {
    arch: VitArch,
    conv1: PatchEmbed,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    positions: PositionTable,
    ln_pre: nn::LayerNorm,
    blocks: Vec<Block>,
    ln_post: nn::LayerNorm,
    proj: Tensor,
}

impl ClipVision {
    /// Declares every parameter under `p` (open_clip names without `visual.`).
    pub fn new(p: &nn::Path, arch: &VitArch) -> Self {
        let (d, side) = (arch.width, arch.pos_grid());
        let eps = arch.layer_norm_eps;
        Self {
            arch: arch.clone(),
            conv1: PatchEmbed::new(p / "conv1", d, arch.patch_size, false),
            class_embedding: p.var("class_embedding", &[d as i64], vit::TOKEN_INIT),
            positional_embedding: p.var(
                "positional_embedding",
                &[1 + (side * side) as i64, d as i64],
                vit::TOKEN_INIT,
            ),
            positions: PositionTable::new(PosResize::Bicubic, side),
            ln_pre: vit::layer_norm(p / "ln_pre", d, eps),
            blocks: blocks(p, arch.depth, d, arch.heads, arch.mlp_hidden, eps),
            ln_post: vit::layer_norm(p / "ln_post", d, eps),
            proj: p.var(
                "proj",
                &[d as i64, arch.embed_dim as i64],
                nn::init::DEFAULT_KAIMING_UNIFORM,
            ),
        }
    }

    /// Forgets per-resolution caches; call after loading new weights.
    pub fn clear_caches(&self) {
        self.positions.clear();
    }

    /// CLIP image embedding `[B,E]`: `ln_post(x)[CLS] @ proj`, L2-normalised.
    pub fn image_embedding(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let (x, _) = self.tokens_before_last(images)?;
        let x = self.blocks.last().expect("depth >= 1").forward(&x, None);
        Ok(vit::l2_normalize(
            &self.project(&x.narrow(1, 0, 1)).squeeze_dim(1),
        ))
    }
}

impl DecoupledTower for ClipVision {
    fn arch(&self) -> &VitArch {
        &self.arch
    }

    fn tokens_before_last(&self, images: &Tensor) -> Result<(Tensor, Grid), ModelError> {
        let grid = Grid::of_images(images, self.arch.patch_size)?;
        let patches = self.conv1.forward(images);
        let (b, _, d) = patches.size3().expect("[B,N,D]");
        let table = self.positional_embedding.unsqueeze(0);
        let pos_patches = self
            .positions
            .for_grid(&table.narrow(1, 1, table.size()[1] - 1), grid);
        let cls =
            (&self.class_embedding + table.select(1, 0).squeeze_dim(0)).expand([b, 1, d], false);
        let mut x = Tensor::cat(&[cls, patches + pos_patches], 1).apply(&self.ln_pre);
        for block in &self.blocks[..self.blocks.len() - 1] {
            x = block.forward(&x, None);
        }
        Ok((x, grid))
    }

    fn last_block_qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let last = self.blocks.last().expect("depth >= 1");
        last.attn.qkv(&x.apply(&last.ln_1))
    }

    fn last_block_output(&self, merged: &Tensor) -> Tensor {
        merged.apply(&self.blocks.last().expect("depth >= 1").attn.out_proj)
    }

    fn project(&self, tokens: &Tensor) -> Tensor {
        tokens.apply(&self.ln_post).matmul(&self.proj)
    }
}

/// Text tower hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub embed_dim: usize,
    pub layer_norm_eps: f64,
}

impl TextConfig {
    /// OpenAI CLIP ViT-B/16's text tower.
    pub fn openai_b16() -> Self {
        Self {
            width: 512,
            layers: 12,
            heads: 8,
            mlp_hidden: 2048,
            context_length: 77,
            vocab_size: 49408,
            embed_dim: 512,
            layer_norm_eps: 1e-5,
        }
    }

    /// OpenAI CLIP ViT-L/14's text tower.
    pub fn openai_l14() -> Self {
        Self {
            width: 768,
            heads: 12,
            mlp_hidden: 3072,
            embed_dim: 768,
            ..Self::openai_b16()
        }
    }
}

/// The CLIP text tower.
#[derive(Debug)]
pub struct ClipText {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<Block>,
    ln_final: nn::LayerNorm,
    text_projection: Tensor,
    causal_mask: Tensor,
}

impl ClipText {
    /// Declares every parameter under `p` (open_clip's top-level text names).
    pub fn new(p: &nn::Path, cfg: &TextConfig) -> Self {
        let (w, ctx) = (cfg.width as i64, cfg.context_length as i64);
        let causal_mask =
            Tensor::full([ctx, ctx], f64::NEG_INFINITY, (Kind::Float, p.device())).triu(1);
        Self {
            token_embedding: (p / "token_embedding").var(
                "weight",
                &[cfg.vocab_size as i64, w],
                vit::TOKEN_INIT,
            ),
            positional_embedding: p.var("positional_embedding", &[ctx, w], vit::TOKEN_INIT),
            blocks: blocks(
                p,
                cfg.layers,
                cfg.width,
                cfg.heads,
                cfg.mlp_hidden,
                cfg.layer_norm_eps,
            ),
            ln_final: vit::layer_norm(p / "ln_final", cfg.width, cfg.layer_norm_eps),
            text_projection: p.var(
                "text_projection",
                &[w, cfg.embed_dim as i64],
                nn::init::DEFAULT_KAIMING_UNIFORM,
            ),
            causal_mask,
        }
    }

    /// Text embeddings `[T,E]` of token ids `[T,ctx]` (tokenizer output), L2-normalised.
    pub fn text_embedding(&self, ids: &Tensor) -> Tensor {
        let mut x = Tensor::embedding(&self.token_embedding, ids, -1, false, false)
            + &self.positional_embedding;
        for block in &self.blocks {
            x = block.forward(&x, Some(&self.causal_mask));
        }
        let x = x.apply(&self.ln_final);
        let eot = ids.argmax(-1, false);
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
        let pooled = x.index(&[Some(rows), Some(eot)]);
        vit::l2_normalize(&pooled.matmul(&self.text_projection))
    }
}
