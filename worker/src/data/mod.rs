//! Data: images and their preprocessing.
//!
//! [`image`] needs no libtorch: decoding to RGB8 (PNG in Rust, JPEG through libjpeg-turbo),
//! Pillow-exact bicubic resize, crop and letterbox, and the normalisation constants.
//! [`tensor`] is the small bridge that turns letterboxed pixels into model inputs.
//!
//! COCO on disk: [`coco`] reads the annotations into the dataset index and loads images with
//! every failure classified, [`skips`] replaces bad images deterministically during training
//! and enforces `data.max_skip_fraction`, and [`synth_coco`] writes synthetic COCO datasets
//! (with defects on demand) for the demo, tests and benchmarks.

pub mod coco;
pub mod error;
pub mod image;
pub mod job_source;
pub mod loader;
pub mod sample;
pub mod skips;
pub mod source;
pub mod synth_coco;
pub mod synthetic;
pub mod tensor;

pub use image::{
    crop, decode, letterbox, letterbox_size, open, resize, DecodeOptions, ImageError, ImageFormat,
    Letterboxed, Normalization, Placement, ResizePlan, RgbImage,
};
pub use tensor::{batch, normalize_u8, to_input_tensor, TensorError};
