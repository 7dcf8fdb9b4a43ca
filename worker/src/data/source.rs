//! Where training images come from: an index of images, each with its dataset id.
//! Sources are shared with the loader's threads, hence `Send + Sync` where used.

use super::image::RgbImage;
use super::sample::SampleError;
use super::synthetic;

/// Where the images come from.
pub trait ImageSource {
    /// Number of images in the index.
    fn image_count(&self) -> u32;
    /// The image at index position `index`: its dataset id and pixels.
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError>;
}

/// The synthetic images of `data.source = "synthetic"` (ids 1..=n).
pub struct SyntheticSource {
    pub seed: u64,
    pub images: u32,
}

impl ImageSource for SyntheticSource {
    fn image_count(&self) -> u32 {
        self.images
    }
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
        let id = u64::from(index) + 1;
        Ok((id, synthetic::image(self.seed, id)))
    }
}
