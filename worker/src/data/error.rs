//! The data pipeline's errors, apart from the modules that raise them, so that samples,
//! sources and the skipping source can all name them without depending on each other.

use proto::dataset::{SkipCounts, SkippedImage};
use proto::plan::crops::CropError;

use super::image::ImageError;
use super::tensor::TensorError;

/// Why a sample could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("image {image_id}: {source}")]
    Image { image_id: u64, source: ImageError },
    #[error("image {image_id}: {source}")]
    Crop { image_id: u64, source: CropError },
    #[error("cannot assemble a batch")]
    Batch(#[from] TensorError),
    #[error("sample index {index} is outside the dataset of {images} images")]
    OutOfRange { index: u32, images: usize },
    /// A cache-mode sample was prepared without its index and key (a caller bug).
    #[error("a cache-mode sample needs its index and key: call prepare_read")]
    NeedsRead,
    #[error("every one of the {images} images of the index was skipped ({counts})")]
    NothingUsable { images: u32, counts: SkipCounts },
    /// A bad image (missing, truncated, ...): skipped, never fatal on its own.
    #[error("skipped {0}")]
    Skipped(SkippedImage),
    /// More bad images than `data.max_skip_fraction` tolerates.
    #[error(transparent)]
    TooManySkips(#[from] TooManySkips),
}

/// The job must stop: more images were skipped than `data.max_skip_fraction` allows.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "too many bad images: {skipped} of the {entries} images in the annotations were skipped \
     ({counts}), more than data.max_skip_fraction = {max_fraction} allows ({limit}); the \
     warnings above name each file and its reason (`worker data-check` lists them all). \
     Fix or remove those files, or raise data.max_skip_fraction"
)]
pub struct TooManySkips {
    /// Skipped images by reason.
    pub counts: SkipCounts,
    /// `counts.total()`.
    pub skipped: u64,
    /// Image entries in the annotations.
    pub entries: u64,
    /// The most skips tolerated: `⌊max_fraction × entries⌋`.
    pub limit: u64,
    pub max_fraction: f64,
}
