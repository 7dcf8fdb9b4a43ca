//! A COCO dataset on disk: the annotations read into a [`DatasetIndex`], and the images
//! read from the image folder with every failure named and classified.
//!
//! - [`read_annotations`] streams an instances or panoptic json (`images` is the only
//!   section kept; `annotations`, 448 MB in COCO train2017, is skipped token by token and
//!   never held in memory). Entries whose `file_name` would leave the image folder and
//!   repeated ids are skipped and counted.
//! - [`check_files`] drops index entries whose file is missing, empty or not a file (one
//!   `stat` per image, no read), so the index is "the images found under the image folder".
//! - [`CocoSource`] reads, decodes and size-checks one image ([`CocoSource::load`]); as an
//!   [`ImageSource`] it reports a bad image as [`SampleError::Skipped`]. Training wraps it in
//!   [`SkippingSource`], which replaces bad images deterministically and enforces
//!   `data.max_skip_fraction`.

use std::io::ErrorKind;
use std::path::PathBuf;

use proto::cache::ContentKey;
pub use proto::dataset::coco::{
    check_files, open_index, read_annotations, CocoError as IndexError, CocoIndex, CocoPaths,
};
use proto::dataset::{DatasetIndex, ImageEntry, SkipReason, SkippedImage};
use proto::job::DataSpec;

use super::image::{self, DecodeOptions, ImageError, RgbImage};
use super::sample::SampleError;
use super::skips::{SkippingSource, TooManySkips};
use crate::data::source::{ImageSource, SourceImage};

/// Why a dataset could not be opened at all (as opposed to single bad images, which are
/// skipped).
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    /// The annotations or the image folder could not be indexed.
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    TooManySkips(#[from] TooManySkips),
}

/// The training source of `data`: the index ([`open_index`]) behind a [`SkippingSource`].
/// Entries already skipped by the index are logged and count toward
/// `data.max_skip_fraction`; if they alone exceed it, this fails before any training.
pub fn training_source(data: &DataSpec) -> Result<SkippingSource<CocoSource>, CocoError> {
    let (index, paths) = open_index(data)?;
    tracing::info!(
        "dataset {}: {} images indexed of {} entries, fingerprint {}",
        paths.annotations.display(),
        index.images.len(),
        index.entries,
        index.images.fingerprint()
    );
    let source = CocoSource::new(paths.images_dir, index.images, DecodeOptions::default());
    Ok(SkippingSource::new(
        source,
        index.entries,
        &index.skipped,
        data.max_skip_fraction,
    )?)
}

/// The images of a [`DatasetIndex`] under an image folder.
#[derive(Clone, Debug)]
pub struct CocoSource {
    images_dir: PathBuf,
    index: DatasetIndex,
    decode: DecodeOptions,
}

impl CocoSource {
    pub fn new(images_dir: PathBuf, index: DatasetIndex, decode: DecodeOptions) -> Self {
        Self {
            images_dir,
            index,
            decode,
        }
    }

    /// The index this source reads.
    pub fn index(&self) -> &DatasetIndex {
        &self.index
    }

    /// The file of `entry`.
    pub fn path(&self, entry: &ImageEntry) -> PathBuf {
        self.images_dir.join(&entry.file_name)
    }

    /// Reads and decodes `entry`'s file and checks its size against the annotations. Every
    /// failure is classified: no file → `missing`, zero bytes → `empty`, not JPEG/PNG →
    /// `not_an_image`, data ending early → `truncated`, a header over
    /// [`DecodeOptions::max_pixels`] → `too_large` (refused before any pixel is allocated),
    /// a size other than the json's → `size_mismatch`.
    pub fn load(&self, entry: &ImageEntry) -> Result<RgbImage, SkippedImage> {
        self.load_keyed(entry).map(|(img, _)| img)
    }

    /// [`CocoSource::load`], also returning the cache key of the file's bytes.
    pub fn load_keyed(&self, entry: &ImageEntry) -> Result<(RgbImage, ContentKey), SkippedImage> {
        let path = self.path(entry);
        let skipped = |reason, detail: String| SkippedImage {
            id: Some(entry.id),
            path: path.display().to_string(),
            reason,
            detail,
        };
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => skipped(SkipReason::Missing, "no such file".into()),
            _ => skipped(SkipReason::Unreadable, e.to_string()),
        })?;
        if bytes.is_empty() {
            return Err(skipped(SkipReason::Empty, "zero bytes".into()));
        }
        let img = image::decode(&bytes, &path, &self.decode).map_err(|e| {
            let reason = skip_reason(&e);
            // The error starts with the path, which the skip record already holds.
            let text = e.to_string();
            let prefix = format!("{}: ", path.display());
            skipped(
                reason,
                text.strip_prefix(&prefix).unwrap_or(&text).to_string(),
            )
        })?;
        if (img.width, img.height) != (entry.width, entry.height) {
            return Err(skipped(
                SkipReason::SizeMismatch,
                format!(
                    "decoded {}x{}, the annotations say {}x{}",
                    img.width, img.height, entry.width, entry.height
                ),
            ));
        }
        Ok((img, ContentKey::of_file_bytes(&bytes)))
    }
}

/// The skip reason of a decoding error.
pub fn skip_reason(err: &ImageError) -> SkipReason {
    match err {
        ImageError::Io { source, .. } if source.kind() == ErrorKind::NotFound => {
            SkipReason::Missing
        }
        ImageError::Io { .. } => SkipReason::Unreadable,
        ImageError::Unsupported { .. } => SkipReason::NotAnImage,
        ImageError::Truncated { .. } => SkipReason::Truncated,
        ImageError::TooLarge { .. } => SkipReason::TooLarge,
        _ => SkipReason::Corrupt,
    }
}

impl CocoSource {
    fn entry(&self, index: u32) -> Result<&ImageEntry, SampleError> {
        self.index
            .get(index)
            .ok_or_else(|| SampleError::OutOfRange {
                index,
                images: self.index.len(),
            })
    }
}

impl ImageSource for CocoSource {
    fn image_count(&self) -> u32 {
        self.index.image_count()
    }

    /// The image at `index`, or [`SampleError::Skipped`] naming its path and reason.
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
        let entry = self.entry(index)?;
        let img = self.load(entry).map_err(SampleError::Skipped)?;
        Ok((entry.id, img))
    }

    /// The image at `index` keyed by its file's bytes.
    fn read(&self, index: u32) -> Result<SourceImage, SampleError> {
        let entry = self.entry(index)?;
        let (image, key) = self.load_keyed(entry).map_err(SampleError::Skipped)?;
        Ok(SourceImage {
            id: entry.id,
            image,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader shares the training source between threads.
    #[test]
    fn the_training_source_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<SkippingSource<CocoSource>>();
    }

    #[test]
    fn files_are_checked_and_loaded_with_every_failure_classified() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("img");
        std::fs::create_dir(&images).unwrap();
        let good = crate::data::synthetic::image(1, 1);
        let png = crate::data::synth_coco::encode_png(&good).unwrap();
        std::fs::write(images.join("good.png"), &png).unwrap();
        std::fs::write(images.join("empty.jpg"), b"").unwrap();
        std::fs::write(images.join("text.jpg"), b"hello, not a jpeg\n").unwrap();
        let jpeg = crate::data::synth_coco::encode_jpeg(&good).unwrap();
        std::fs::write(images.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
        std::fs::write(
            images.join("bomb.png"),
            crate::data::synth_coco::bomb_png(30_000, 30_000),
        )
        .unwrap();
        let entry = |id, name: &str, width, height| ImageEntry {
            id,
            file_name: name.into(),
            width,
            height,
        };
        let (w, h) = (good.width, good.height);
        let entries = vec![
            entry(1, "good.png", w, h),
            entry(2, "missing.jpg", 5, 5),
            entry(3, "empty.jpg", 5, 5),
            entry(4, "text.jpg", 5, 5),
            entry(5, "cut.jpg", w, h),
            entry(6, "bomb.png", 30_000, 30_000),
            entry(7, "good.png", w + 1, h),
        ];
        let mut index = CocoIndex {
            entries: entries.len() as u64,
            images: DatasetIndex::new(entries).unwrap().0,
            ..CocoIndex::default()
        };
        check_files(&mut index, &images);
        assert_eq!(index.counts.to_string(), "missing=1, empty=1");
        assert_eq!(index.images.len(), 5);
        let source = CocoSource::new(images.clone(), index.images, DecodeOptions::default());
        let reasons: Vec<Result<(), SkipReason>> = source
            .index()
            .images()
            .iter()
            .map(|e| source.load(e).map(|_| ()).map_err(|s| s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                Ok(()),
                Err(SkipReason::NotAnImage),
                Err(SkipReason::Truncated),
                Err(SkipReason::TooLarge),
                Err(SkipReason::SizeMismatch),
            ]
        );
        let err = source.image(1).unwrap_err().to_string();
        assert!(
            err.contains(&images.join("text.jpg").display().to_string()),
            "{err}"
        );
        let (id, img) = source.image(0).unwrap();
        assert_eq!((id, img.pixels), (1, good.pixels));
    }
}
