//! The bridge from preprocessed pixels to libtorch: model inputs `[3, S, S]` f32 and batches.
//!
//! Normalisation runs in Rust on the CPU ([`Normalization::apply_chw`]), so the values are
//! bit-identical to the reference's CPU PyTorch ops whatever device the tensor goes to later
//! (CUDA divides by a scalar through its reciprocal, which is not bit-identical).

use tch::{Kind, Tensor};

use super::image::{Letterboxed, Normalization};

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("CHW pixels hold {got} bytes, 3x{size}x{size} needs {expected}")]
    Shape {
        size: usize,
        expected: usize,
        got: usize,
    },
    #[error("cannot batch zero images")]
    EmptyBatch,
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `(u8 / 255 − mean) / std` of CHW pixels `[3, size, size]` → f32 CPU tensor `[3, size, size]`.
pub fn to_input_tensor(
    chw: &[u8],
    size: usize,
    norm: &Normalization,
) -> Result<Tensor, TensorError> {
    let expected = 3 * size * size;
    if chw.len() != expected {
        return Err(TensorError::Shape {
            size,
            expected,
            got: chw.len(),
        });
    }
    let size = size as i64;
    Ok(Tensor::from_slice(&norm.apply_chw(chw)).view([3, size, size]))
}

impl Letterboxed {
    /// This image as a model input (see [`to_input_tensor`]).
    pub fn to_input_tensor(&self, norm: &Normalization) -> Tensor {
        let s = self.size as i64;
        Tensor::from_slice(&norm.apply_chw(&self.pixels)).view([3, s, s])
    }

    /// The raw pixels as a u8 CPU tensor `[3, S, S]`.
    pub fn to_u8_tensor(&self) -> Tensor {
        let s = self.size as i64;
        Tensor::from_slice(&self.pixels).view([3, s, s])
    }
}

/// Stacks `[3, S, S]` inputs into `[B, 3, S, S]`.
pub fn batch(images: &[Tensor]) -> Result<Tensor, TensorError> {
    if images.is_empty() {
        return Err(TensorError::EmptyBatch);
    }
    Ok(Tensor::f_stack(images, 0)?)
}

/// The same normalisation done by libtorch on a u8 tensor `[..., 3, H, W]` (on its device):
/// the reference's exact ops on CPU; on CUDA the division may differ in the last bit.
pub fn normalize_u8(images: &Tensor, norm: &Normalization) -> Tensor {
    let device = images.device();
    let mean = Tensor::from_slice(&norm.mean)
        .to_device(device)
        .view([3, 1, 1]);
    let std = Tensor::from_slice(&norm.std)
        .to_device(device)
        .view([3, 1, 1]);
    (images.to_kind(Kind::Float) / 255.0 - mean) / std
}
