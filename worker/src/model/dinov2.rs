//! DINOv2 (with registers) and DINO v1 ViTs: the context teachers (VFMs).
//!
//! Pre-norm blocks with a fused qkv (with bias), exact-erf GELU MLP and, for
//! DINOv2, LayerScale on both residual branches. Tokens are [CLS, registers,
//! patches]; registers carry no position. The output used by DeCLIP is the last
//! layer after the final norm, CLS and registers dropped (docs/method.md §4).
//!
//! Position tables are resized as each family's reference code does it: DINOv2
//! reg models with antialiased bicubic to the target size (Meta's hub code sets
//! `interpolate_antialias=True, interpolate_offset=0`; timm agrees), DINO v1 with
//! plain bicubic at `scale_factor = (g + 0.1) / M`. At the native grid the table
//! is used as stored.
//!
//! Parameter names follow Meta's hub layout (`register_tokens`, `blocks.N.ls1.gamma`).

use proto::job::arch::{Family, VitArch};
use tch::{nn, nn::Module, Tensor};

use super::vit::{self, Grid, PatchEmbed, PosResize, PositionTable};
use super::ModelError;

#[derive(Debug)]
struct LayerScale {
    gamma: Tensor,
}

impl LayerScale {
    fn new(p: nn::Path, width: usize) -> Self {
        Self {
            gamma: p.ones("gamma", &[width as i64]),
        }
    }
}

#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(p: nn::Path, arch: &VitArch) -> Self {
        Self {
            qkv: vit::linear(&p / "qkv", arch.width, 3 * arch.attention_width(), true),
            proj: vit::linear(&p / "proj", arch.attention_width(), arch.width, true),
            heads: arch.heads,
            scale: (arch.head_dim as f64).powf(-0.5),
        }
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let qkv = x.apply(&self.qkv).chunk(3, -1);
        let [q, k, v] = [&qkv[0], &qkv[1], &qkv[2]].map(|t| vit::split_heads(t, self.heads));
        vit::merge_heads(&vit::attention(&q, &k, &v, self.scale)).apply(&self.proj)
    }
}

#[derive(Debug)]
struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.fc1).gelu("none").apply(&self.fc2)
    }
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    ls1: Option<LayerScale>,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    ls2: Option<LayerScale>,
}

impl Block {
    fn new(p: nn::Path, arch: &VitArch) -> Self {
        let ls = |name: &str| {
            arch.layer_scale
                .then(|| LayerScale::new(&p / name, arch.width))
        };
        Self {
            norm1: vit::layer_norm(&p / "norm1", arch.width, arch.layer_norm_eps),
            attn: Attention::new(&p / "attn", arch),
            ls1: ls("ls1"),
            norm2: vit::layer_norm(&p / "norm2", arch.width, arch.layer_norm_eps),
            mlp: Mlp {
                fc1: vit::linear(&p / "mlp" / "fc1", arch.width, arch.mlp_hidden, true),
                fc2: vit::linear(&p / "mlp" / "fc2", arch.mlp_hidden, arch.width, true),
            },
            ls2: ls("ls2"),
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let scaled = |y: Tensor, ls: &Option<LayerScale>| match ls {
            Some(ls) => y * &ls.gamma,
            None => y,
        };
        let x = x + scaled(x.apply(&self.norm1).apply(&self.attn), &self.ls1);
        &x + scaled(x.apply(&self.norm2).apply(&self.mlp), &self.ls2)
    }
}

/// A DINOv2 or DINO v1 ViT without a head.
#[derive(Debug)]
pub struct DinoVit {
    arch: VitArch,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    register_tokens: Option<Tensor>,
    pos_embed: Tensor,
    positions: PositionTable,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

impl DinoVit {
    /// Declares every parameter under `p` (Meta's hub names). `arch.family` must be
    /// `Dinov2` or `Dino`.
    pub fn new(p: &nn::Path, arch: &VitArch) -> Self {
        let d = arch.width as i64;
        let side = arch.pos_grid();
        let resize = match arch.family {
            Family::Dino => PosResize::BicubicScaleOffset,
            _ => PosResize::BicubicAntialias,
        };
        Self {
            arch: arch.clone(),
            patch_embed: PatchEmbed::new(
                p / "patch_embed" / "proj",
                arch.width,
                arch.patch_size,
                true,
            ),
            cls_token: p.var("cls_token", &[1, 1, d], vit::TOKEN_INIT),
            register_tokens: (arch.register_tokens > 0).then(|| {
                p.var(
                    "register_tokens",
                    &[1, arch.register_tokens as i64, d],
                    vit::TOKEN_INIT,
                )
            }),
            pos_embed: p.var(
                "pos_embed",
                &[1, 1 + (side * side) as i64, d],
                vit::TOKEN_INIT,
            ),
            positions: PositionTable::new(resize, side),
            blocks: (0..arch.depth)
                .map(|i| Block::new(p / "blocks" / i, arch))
                .collect(),
            norm: vit::layer_norm(p / "norm", arch.width, arch.layer_norm_eps),
        }
    }

    pub fn arch(&self) -> &VitArch {
        &self.arch
    }

    /// Forgets per-resolution caches; call after loading new weights.
    pub fn clear_caches(&self) {
        self.positions.clear();
    }

    /// Last-layer patch features after the final norm, `[B,C,gh,gw]`.
    pub fn patch_features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let grid = Grid::of_images(images, self.arch.patch_size)?;
        let patches = self.patch_embed.forward(images);
        let b = patches.size()[0];
        let table_len = self.pos_embed.size()[1] - 1;
        let pos_patches = self
            .positions
            .for_grid(&self.pos_embed.narrow(1, 1, table_len), grid);
        let cls = self.cls_token.expand([b, 1, -1], false) + self.pos_embed.narrow(1, 0, 1);
        let mut parts = vec![cls];
        if let Some(registers) = &self.register_tokens {
            parts.push(registers.expand([b, -1, -1], false));
        }
        parts.push(patches + pos_patches);
        let mut x = Tensor::cat(&parts, 1);
        for block in &self.blocks {
            x = x.apply(block);
        }
        let prefix = 1 + self.arch.register_tokens as i64;
        let tokens = x.apply(&self.norm).narrow(1, prefix, grid.tokens());
        Ok(vit::tokens_to_map(&tokens, grid))
    }
}
