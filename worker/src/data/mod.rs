//! Data: images and their preprocessing.
//!
//! [`image`] needs no libtorch: decoding to RGB8 (PNG in Rust, JPEG through libjpeg-turbo),
//! Pillow-exact bicubic resize, crop and letterbox, and the normalisation constants.
//! [`tensor`] is the small bridge that turns letterboxed pixels into model inputs.

pub mod image;
pub mod sample;
pub mod synthetic;
pub mod tensor;

pub use image::{
    crop, decode, letterbox, letterbox_size, open, resize, DecodeOptions, ImageError, ImageFormat,
    Letterboxed, Normalization, Placement, ResizePlan, RgbImage,
};
pub use tensor::{batch, normalize_u8, to_input_tensor, TensorError};
