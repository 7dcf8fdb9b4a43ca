//! Where training images come from: an index of images, each with its dataset id.
//! Sources are shared with the loader's threads, hence `Send + Sync` where used.

use proto::cache::ContentKey;
use proto::dataset::SkipCounts;

use super::error::SampleError;
use super::image::RgbImage;
use super::synthetic;

/// One image as read: the dataset id of the image actually read (after any skip
/// replacement), its pixels, and its cache key.
#[derive(Debug)]
pub struct SourceImage {
    pub id: u64,
    pub image: RgbImage,
    /// SHA-256 of the file's bytes (of the pixels for sources without files).
    pub key: ContentKey,
}

/// Where the images come from.
pub trait ImageSource {
    /// Number of images in the index.
    fn image_count(&self) -> u32;
    /// The image at index position `index`: its dataset id and pixels.
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError>;
    /// The image at `index` with its cache key. Sources that read files override this
    /// to key the file's bytes; the default keys the decoded pixels.
    fn read(&self, index: u32) -> Result<SourceImage, SampleError> {
        let (id, image) = self.image(index)?;
        let key = ContentKey::of_pixels(image.width, image.height, &image.pixels);
        Ok(SourceImage { id, image, key })
    }
    /// Images skipped so far, by reason (sources that skip bad files override this).
    fn skip_counts(&self) -> SkipCounts {
        SkipCounts::default()
    }
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
