//! Images as the reference pipeline sees them: decoding to RGB8 and PIL-exact preprocessing.
//!
//! Everything here reproduces Pillow, because the fixtures (tools/reference) and the authors'
//! PyTorch pipeline were made with it:
//!
//! | here | Pillow |
//! | --- | --- |
//! | [`open`], [`decode`] | `Image.open(p).convert("RGB")` (no EXIF rotation) |
//! | [`resize`], [`ResizePlan`] | `Image.resize((w, h), Image.BICUBIC)` (`reducing_gap=None`) |
//! | [`crop`] | `Image.crop(box)` |
//! | [`letterbox`] | `resize` + `paste` onto a black square (docs/method.md §2) |
//!
//! Pixels are `u8` RGB, row-major, channels last (HWC) in [`RgbImage`] and channels first
//! (CHW) in [`Letterboxed`], which is what the model input is built from (see
//! [`super::tensor`]).
//!
//! The files of this folder, in pipeline order (each holds the unit tests of what it
//! defines; every public item is used through this module, `data::image::X`):
//!
//! | file | holds |
//! | --- | --- |
//! | `error.rs` | [`ImageError`], the error of every step |
//! | `rgb.rs` | [`RgbImage`], the HWC buffer the steps pass along |
//! | `decode.rs` | [`ImageFormat`], [`DecodeOptions`], [`open`], [`decode`]: JPEG (libjpeg-turbo) and PNG to RGB8 |
//! | `resize.rs` | [`AxisKernel`], [`ResizePlan`], [`resize`]: Pillow's bicubic, with the row-blocked passes |
//! | `letterbox.rs` | [`crop`], [`letterbox_size`], [`letterbox`], [`Placement`], [`Letterboxed`] |
//! | `normalize.rs` | [`Normalization`]: `u8` to the model's normalised `f32` |
//! | `test_images.rs` | synthetic images for the unit tests (test builds only) |

mod decode;
mod error;
mod letterbox;
mod normalize;
mod resize;
mod rgb;
#[cfg(test)]
mod test_images;

pub use decode::{decode, open, DecodeOptions, ImageFormat, PIL_MAX_IMAGE_PIXELS};
pub use error::ImageError;
pub use letterbox::{crop, letterbox, letterbox_size, Letterboxed, Placement};
pub use normalize::Normalization;
pub use resize::{resize, AxisKernel, ResizePlan};
pub use rgb::RgbImage;
