//! [`ImageError`]: why an image could not be read or processed, for every step of the
//! module (decoding, resize, crop, letterbox).

use std::path::PathBuf;

/// Why an image could not be read or processed. Decoding errors name the file (or the label
/// passed to [`decode`](super::decode)).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        #[source]
        source: std::io::Error,
    },
    /// Not a JPEG or PNG, or a variant of one that is not read (e.g. a JPEG colour space).
    #[error("{path}: unsupported image: {reason}")]
    Unsupported {
        /// The file (or label).
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// The data ends before the image does (Pillow: "image file is truncated").
    #[error("{path}: truncated {format} data: {reason}")]
    Truncated {
        /// The file (or label).
        path: PathBuf,
        /// `"JPEG"` or `"PNG"`.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// The decoder refused the data.
    #[error("{path}: corrupt {format} data: {reason}")]
    Corrupt {
        /// The file (or label).
        path: PathBuf,
        /// `"JPEG"` or `"PNG"`.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// The header claims more pixels than [`DecodeOptions::max_pixels`](super::DecodeOptions::max_pixels).
    #[error(
        "{path}: header says {width}x{height} = {pixels} pixels, more than the limit of {limit} \
         (decompression-bomb guard, DecodeOptions::max_pixels)"
    )]
    TooLarge {
        /// The file (or label).
        path: PathBuf,
        /// Width in the header.
        width: u64,
        /// Height in the header.
        height: u64,
        /// `width · height` (saturating).
        pixels: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// A [`crop`](super::crop) box `[x0, y0, x1, y1]` with `x1 < x0` or `y1 < y0`.
    #[error("crop box {0:?} has right < left or bottom < top")]
    InvalidBox([i64; 4]),
    /// A resize from or to a size with a zero side.
    #[error("cannot resize {from_w}x{from_h} to {to_w}x{to_h}: every side must be at least 1")]
    EmptyResize {
        /// Input width.
        from_w: u32,
        /// Input height.
        from_h: u32,
        /// Output width.
        to_w: u32,
        /// Output height.
        to_h: u32,
    },
    /// A [`ResizePlan`](super::ResizePlan) applied to an image of another size.
    #[error("resize plan is for {plan_w}x{plan_h} input, got a {w}x{h} image")]
    PlanMismatch {
        /// The plan's input width.
        plan_w: u32,
        /// The plan's input height.
        plan_h: u32,
        /// The image's width.
        w: u32,
        /// The image's height.
        h: u32,
    },
    /// A pixel buffer whose length is not `width · height · 3`.
    #[error("pixel buffer holds {got} bytes, {width}x{height} RGB needs {expected}")]
    BufferSize {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
        /// `width · height · 3`.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
}
