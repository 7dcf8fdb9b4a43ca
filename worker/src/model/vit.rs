//! Building blocks shared by the ViT families.
//!
//! Shape suffixes used across `model/`: B batch, T tokens (prefix + patches),
//! N patch tokens, D width, Hd heads, Dh head dim, E embedding, gh x gw patch grid.

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{nn, Tensor};

use super::ModelError;

/// Initialisation of class/register tokens and position tables when no weights
/// are loaded (the usual truncated-normal scale of ViTs; demo and tests only).
pub const TOKEN_INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Patch grid of an input image: rows x cols of patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Grid {
    pub rows: i64,
    pub cols: i64,
}

impl Grid {
    /// The grid of `images` `[B,3,H,W]` for `patch`-pixel patches; refuses sizes that
    /// do not divide (a silent crop would change the method).
    pub fn of_images(images: &Tensor, patch: usize) -> Result<Self, ModelError> {
        let size = images.size();
        let [_, c, h, w] = size[..] else {
            return Err(ModelError::InputShape(format!(
                "expected images [B,3,H,W], got {size:?}"
            )));
        };
        let p = patch as i64;
        if c != 3 || h % p != 0 || w % p != 0 {
            return Err(ModelError::InputShape(format!(
                "images {size:?}: need 3 channels and H, W multiples of the patch size {patch}"
            )));
        }
        Ok(Self {
            rows: h / p,
            cols: w / p,
        })
    }

    pub fn tokens(&self) -> i64 {
        self.rows * self.cols
    }
}

/// How a stored square position table is resampled to another grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosResize {
    /// `F.interpolate(size=grid, mode="bicubic", align_corners=False)`: EVA02, OpenAI CLIP.
    Bicubic,
    /// The same with `antialias=True`: DINOv2 (Meta's hub code for the reg models, timm).
    BicubicAntialias,
    /// Meta's DINO v1: `scale_factor=(g + 0.1) / table_side`, plain bicubic.
    BicubicScaleOffset,
}

/// A frozen patch-position table `[1, M*M, D]` (prefix entries kept apart) and its
/// resampled versions, computed once per grid.
#[derive(Debug)]
pub struct PositionTable {
    resize: PosResize,
    side: i64,
    cache: Mutex<HashMap<Grid, Tensor>>,
}

impl PositionTable {
    pub fn new(resize: PosResize, side: usize) -> Self {
        Self {
            resize,
            side: side as i64,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The patch part of `table` `[1, M*M, D]` resampled to `grid`: `[1, N, D]`.
    /// Cached per grid: the table is frozen (docs/method.md §1.3).
    pub fn for_grid(&self, table: &Tensor, grid: Grid) -> Tensor {
        let mut cache = self.cache.lock().expect("position cache lock");
        if let Some(t) = cache.get(&grid) {
            return t.shallow_clone();
        }
        let resized = tch::no_grad(|| self.resample(table, grid));
        cache.insert(grid, resized.shallow_clone());
        resized
    }

    /// Forgets resampled tables (after new weights are loaded).
    pub fn clear(&self) {
        self.cache.lock().expect("position cache lock").clear();
    }

    fn resample(&self, table: &Tensor, grid: Grid) -> Tensor {
        let m = self.side;
        if grid.rows == m && grid.cols == m {
            return table.copy();
        }
        let d = table.size()[2];
        let square = table.reshape([1, m, m, d]).permute([0, 3, 1, 2]);
        let out = [grid.rows, grid.cols];
        let resized = match self.resize {
            PosResize::Bicubic => square.upsample_bicubic2d(out, false, None, None),
            PosResize::BicubicAntialias => {
                square.internal_upsample_bicubic2d_aa(out, false, None, None)
            }
            PosResize::BicubicScaleOffset => {
                let sh = (grid.rows as f64 + 0.1) / m as f64;
                let sw = (grid.cols as f64 + 0.1) / m as f64;
                square.upsample_bicubic2d(out, false, sh, sw)
            }
        };
        resized.permute([0, 2, 3, 1]).reshape([1, grid.tokens(), d])
    }
}

/// Conv patch embedding: images `[B,3,H,W]` -> tokens `[B,N,D]` in row-major order.
#[derive(Debug)]
pub struct PatchEmbed {
    proj: nn::Conv2D,
}

impl PatchEmbed {
    pub fn new(p: nn::Path, width: usize, patch: usize, bias: bool) -> Self {
        let cfg = nn::ConvConfig {
            stride: patch as i64,
            bias,
            ..Default::default()
        };
        Self {
            proj: nn::conv2d(p, 3, width as i64, patch as i64, cfg),
        }
    }

    pub fn forward(&self, images: &Tensor) -> Tensor {
        images.apply(&self.proj).flatten(2, 3).transpose(1, 2)
    }
}

pub fn layer_norm(p: nn::Path, width: usize, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![width as i64], cfg)
}

pub fn linear(p: nn::Path, input: usize, output: usize, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        bias,
        ..Default::default()
    };
    nn::linear(p, input as i64, output as i64, cfg)
}

/// `[B,T,Hd*Dh]` -> `[B,Hd,T,Dh]`
pub fn split_heads(x: &Tensor, heads: usize) -> Tensor {
    let (b, t, d) = x.size3().expect("[B,T,D]");
    x.reshape([b, t, heads as i64, d / heads as i64])
        .transpose(1, 2)
}

/// `[B,Hd,T,Dh]` -> `[B,T,Hd*Dh]`
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, t, dh) = x.size4().expect("[B,Hd,T,Dh]");
    x.transpose(1, 2).reshape([b, t, h * dh])
}

/// softmax(q kᵀ · scale) v over the last two dims; `[B,Hd,T,Dh]` each.
///
/// libtorch's fused `scaled_dot_product_attention` (flash kernel on CPU and GPU):
/// it never materialises the T×T matrix, which at 560 px (1226 tokens, 12 heads)
/// made the explicit version 1.7× slower than PyTorch.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, scale, false)
}

/// Patch tokens `[B,N,C]` -> map `[B,C,rows,cols]` (token n = row * cols + col).
pub fn tokens_to_map(tokens: &Tensor, grid: Grid) -> Tensor {
    let (b, _, c) = tokens.size3().expect("[B,N,C]");
    tokens.transpose(1, 2).reshape([b, c, grid.rows, grid.cols])
}

/// L2-normalises the last dimension.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true);
    x / norm.clamp_min(1e-12)
}
