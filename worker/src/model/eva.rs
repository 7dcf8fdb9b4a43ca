//! EVA02-CLIP vision tower (docs/method.md §1.1).
//!
//! Pre-norm blocks `x += Attn(LN1 x)`, `x += SwiGLU(LN2 x)`. Attention has q and v
//! biases but no k bias, 2-D RoPE on the patch tokens (CLS is not rotated) and a
//! LayerNorm over all heads before the output projection ("sub-LN"). The SwiGLU
//! MLP is `w3(ffn_ln(silu(w1 x) * w2 x))`. The absolute position table is resized
//! with plain bicubic interpolation to the working grid; RoPE positions are
//! rescaled into the pre-training grid (`rope_ref_grid`).
//!
//! Parameter names follow the EVA-CLIP release without its `visual.` prefix
//! (`blocks.N.attn.q_bias`, `blocks.N.mlp.w1`, ...); other layouts are mapped in
//! `weights.rs`.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::job::arch::VitArch;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::decoupled::DecoupledTower;
use super::vit::{self, Grid, PatchEmbed, PosResize, PositionTable};
use super::ModelError;

/// 2-D "fast" rotary embedding: for a head of Dh dims, the first Dh/2 encode the
/// patch row and the last Dh/2 the column; each angle rotates an adjacent pair.
#[derive(Debug)]
struct Rope {
    head_dim: i64,
    ref_grid: f64,
    /// (sin, cos) `[N, Dh]` per grid.
    cache: Mutex<HashMap<Grid, (Tensor, Tensor)>>,
}

impl Rope {
    fn new(head_dim: usize, ref_grid: usize) -> Self {
        Self {
            head_dim: head_dim as i64,
            ref_grid: ref_grid as f64,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn tables(&self, grid: Grid, device: Device) -> (Tensor, Tensor) {
        let mut cache = self.cache.lock().expect("rope cache lock");
        let (sin, cos) = cache.entry(grid).or_insert_with(|| self.build(grid));
        (sin.to_device(device), cos.to_device(device))
    }

    /// Angles: row i of a grid of R rows sits at t = i * ref / R; band j has
    /// frequency 1 / 10000^(j / bands) with bands = Dh / 4.
    fn build(&self, grid: Grid) -> (Tensor, Tensor) {
        let bands = self.head_dim / 4;
        let opts = (Kind::Float, Device::Cpu);
        let freqs = (Tensor::arange(bands, opts) / bands as f64 * -(10000f64.ln())).exp();
        let rows = Tensor::arange(grid.rows, opts) / grid.rows as f64 * self.ref_grid;
        let cols = Tensor::arange(grid.cols, opts) / grid.cols as f64 * self.ref_grid;
        let row_angles = rows
            .outer(&freqs)
            .unsqueeze(1)
            .expand([grid.rows, grid.cols, bands], false);
        let col_angles = cols
            .outer(&freqs)
            .unsqueeze(0)
            .expand([grid.rows, grid.cols, bands], false);
        let angles = Tensor::cat(&[row_angles, col_angles], -1)
            .reshape([grid.tokens(), 2 * bands])
            .repeat_interleave_self_int(2, -1, None);
        (angles.sin(), angles.cos())
    }

    /// Rotates x `[B,Hd,N,Dh]`: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
    fn apply(&self, x: &Tensor, sin: &Tensor, cos: &Tensor) -> Tensor {
        let size = x.size();
        let pairs = x.reshape([size[0], size[1], size[2], size[3] / 2, 2]);
        let rotated =
            Tensor::stack(&[-pairs.select(-1, 1), pairs.select(-1, 0)], -1).reshape(&size[..]);
        x * cos + rotated * sin
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    q_bias: Tensor,
    v_bias: Tensor,
    inner_attn_ln: nn::LayerNorm,
    proj: nn::Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(p: nn::Path, arch: &VitArch) -> Self {
        let (d, a) = (arch.width, arch.attention_width());
        Self {
            q_proj: vit::linear(&p / "q_proj", d, a, false),
            k_proj: vit::linear(&p / "k_proj", d, a, false),
            v_proj: vit::linear(&p / "v_proj", d, a, false),
            q_bias: p.zeros("q_bias", &[a as i64]),
            v_bias: p.zeros("v_bias", &[a as i64]),
            inner_attn_ln: vit::layer_norm(&p / "inner_attn_ln", a, arch.layer_norm_eps),
            proj: vit::linear(&p / "proj", a, d, true),
            heads: arch.heads,
            scale: (arch.head_dim as f64).powf(-0.5),
        }
    }

    /// q, k, v `[B,T,A]` of already-normalised tokens; no RoPE.
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        (
            x.apply(&self.q_proj) + &self.q_bias,
            x.apply(&self.k_proj),
            x.apply(&self.v_proj) + &self.v_bias,
        )
    }

    /// Merged heads `[B,T,A]` -> output `[B,T,D]`.
    fn output(&self, merged: &Tensor) -> Tensor {
        merged.apply(&self.inner_attn_ln).apply(&self.proj)
    }

    fn forward(&self, x: &Tensor, rope: &Rope, grid: Grid) -> Tensor {
        let (q, k, v) = self.qkv(x);
        let (q, k, v) = (
            vit::split_heads(&q, self.heads),
            vit::split_heads(&k, self.heads),
            vit::split_heads(&v, self.heads),
        );
        let (sin, cos) = rope.tables(grid, x.device());
        let prefix = q.size()[2] - grid.tokens();
        let rotate = |t: &Tensor| {
            let patches = t.narrow(2, prefix, grid.tokens());
            Tensor::cat(
                &[t.narrow(2, 0, prefix), rope.apply(&patches, &sin, &cos)],
                2,
            )
        };
        let out = vit::attention(&rotate(&q), &rotate(&k), &v, self.scale);
        self.output(&vit::merge_heads(&out))
    }
}

#[derive(Debug)]
struct SwiGlu {
    w1: nn::Linear,
    w2: nn::Linear,
    ffn_ln: nn::LayerNorm,
    w3: nn::Linear,
}

impl SwiGlu {
    fn new(p: nn::Path, arch: &VitArch) -> Self {
        let (d, h) = (arch.width, arch.mlp_hidden);
        Self {
            w1: vit::linear(&p / "w1", d, h, true),
            w2: vit::linear(&p / "w2", d, h, true),
            ffn_ln: vit::layer_norm(&p / "ffn_ln", h, arch.layer_norm_eps),
            w3: vit::linear(&p / "w3", h, d, true),
        }
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Tensor {
        (x.apply(&self.w1).silu() * x.apply(&self.w2))
            .apply(&self.ffn_ln)
            .apply(&self.w3)
    }
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: SwiGlu,
}

impl Block {
    fn new(p: nn::Path, arch: &VitArch) -> Self {
        Self {
            norm1: vit::layer_norm(&p / "norm1", arch.width, arch.layer_norm_eps),
            attn: Attention::new(&p / "attn", arch),
            norm2: vit::layer_norm(&p / "norm2", arch.width, arch.layer_norm_eps),
            mlp: SwiGlu::new(&p / "mlp", arch),
        }
    }

    fn forward(&self, x: &Tensor, rope: &Rope, grid: Grid) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.norm1), rope, grid);
        &x + x.apply(&self.norm2).apply(&self.mlp)
    }
}

/// The EVA02-CLIP image tower with a CLIP head.
#[derive(Debug)]
pub struct EvaVision {
    arch: VitArch,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    positions: PositionTable,
    rope: Rope,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    head: nn::Linear,
}

impl EvaVision {
    /// Declares every parameter under `p` (names as in EVA-CLIP, without `visual.`).
    pub fn new(p: &nn::Path, arch: &VitArch) -> Self {
        let d = arch.width as i64;
        let side = arch.pos_grid();
        Self {
            arch: arch.clone(),
            patch_embed: PatchEmbed::new(
                p / "patch_embed" / "proj",
                arch.width,
                arch.patch_size,
                true,
            ),
            cls_token: p.var("cls_token", &[1, 1, d], vit::TOKEN_INIT),
            pos_embed: p.var(
                "pos_embed",
                &[1, 1 + (side * side) as i64, d],
                vit::TOKEN_INIT,
            ),
            positions: PositionTable::new(PosResize::Bicubic, side),
            rope: Rope::new(arch.head_dim, arch.rope_ref_grid),
            blocks: (0..arch.depth)
                .map(|i| Block::new(p / "blocks" / i, arch))
                .collect(),
            norm: vit::layer_norm(p / "norm", arch.width, arch.layer_norm_eps),
            head: vit::linear(p / "head", arch.width, arch.embed_dim, true),
        }
    }

    pub fn arch(&self) -> &VitArch {
        &self.arch
    }

    /// Forgets per-resolution caches; call after loading new weights.
    pub fn clear_caches(&self) {
        self.positions.clear();
    }

    /// Patch embedding, CLS and positions: tokens `[B,1+N,D]` entering block 0.
    fn embed(&self, images: &Tensor) -> Result<(Tensor, Grid), ModelError> {
        let grid = Grid::of_images(images, self.arch.patch_size)?;
        let patches = self.patch_embed.forward(images);
        let b = patches.size()[0];
        let cls = self.cls_token.expand([b, 1, -1], false);
        let pos_cls = self.pos_embed.narrow(1, 0, 1);
        let pos_patches = self.positions.for_grid(
            &self.pos_embed.narrow(1, 1, self.pos_embed.size()[1] - 1),
            grid,
        );
        let x = Tensor::cat(&[cls + pos_cls, patches + pos_patches], 1);
        Ok((x, grid))
    }

    /// CLIP image embedding `[B,E]`: the ordinary forward, `head(norm(x)[CLS])`, L2-normalised.
    pub fn image_embedding(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let (x, grid) = self.tokens_before_last(images)?;
        let last = self.blocks.last().expect("depth >= 1");
        let x = last.forward(&x, &self.rope, grid);
        let cls = x.select(1, 0).apply(&self.norm).apply(&self.head);
        Ok(vit::l2_normalize(&cls))
    }
}

impl DecoupledTower for EvaVision {
    fn arch(&self) -> &VitArch {
        &self.arch
    }

    fn tokens_before_last(&self, images: &Tensor) -> Result<(Tensor, Grid), ModelError> {
        let (mut x, grid) = self.embed(images)?;
        for block in &self.blocks[..self.blocks.len() - 1] {
            x = block.forward(&x, &self.rope, grid);
        }
        Ok((x, grid))
    }

    fn last_block_qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let last = self.blocks.last().expect("depth >= 1");
        last.attn.qkv(&x.apply(&last.norm1))
    }

    fn last_block_output(&self, merged: &Tensor) -> Tensor {
        self.blocks.last().expect("depth >= 1").attn.output(merged)
    }

    fn project(&self, tokens: &Tensor) -> Tensor {
        tokens.apply(&self.norm).apply(&self.head)
    }
}
