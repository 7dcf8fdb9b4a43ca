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

use std::fmt;
use std::fs::File;
use std::io::{BufReader, ErrorKind};
use std::path::{Path, PathBuf};

use proto::cache::ContentKey;
use proto::dataset::{
    check_file_name, DatasetError, DatasetIndex, ImageEntry, SkipCounts, SkipReason, SkippedImage,
};
use proto::job::DataSpec;
use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::image::{self, DecodeOptions, ImageError, RgbImage};
use super::sample::SampleError;
use super::skips::{SkippingSource, TooManySkips};
use crate::data::source::{ImageSource, SourceImage};

/// Buffer of the annotations reader, in bytes: large reads keep the per-byte parsing fed
/// without holding more than this of the file in memory.
const READ_BUFFER: usize = 1 << 20;

/// Why a dataset could not be opened at all (as opposed to single bad images, which are
/// skipped).
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("data.coco_root is not set (required when data.source = \"coco\")")]
    NoRoot,
    #[error("{path}: cannot read the annotations: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Malformed json or a schema error (an `images` entry without `width`, ...).
    /// `line` and `column` are 1-based, as serde_json counts them.
    #[error("{path}: invalid COCO json at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: DatasetError,
    },
    #[error(transparent)]
    TooManySkips(#[from] TooManySkips),
}

impl CocoError {
    fn json(path: &Path, err: serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        let text = err.to_string();
        // serde_json appends " at line L column C"; we say it once, up front.
        let suffix = format!(" at line {line} column {column}");
        let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
        Self::Json {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

/// The annotations of a dataset as an index, with what was left out of it.
#[derive(Clone, Debug, Default)]
pub struct CocoIndex {
    /// The usable images, sorted by id.
    pub images: DatasetIndex,
    /// `images` entries in the annotations (usable or not): the base of
    /// `data.max_skip_fraction`.
    pub entries: u64,
    /// Every entry left out, in the order found.
    pub skipped: Vec<SkippedImage>,
    /// `skipped` counted by reason.
    pub counts: SkipCounts,
}

impl CocoIndex {
    fn skip(&mut self, skipped: SkippedImage) {
        self.counts.add(skipped.reason);
        self.skipped.push(skipped);
    }
}

/// The fields of an `images` entry we use; other fields (`license`, `coco_url`, ...) are
/// ignored.
#[derive(Deserialize)]
struct RawImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

/// A top-level map visitor that keeps `images` and skips every other value with
/// [`IgnoredAny`], so memory stays bounded by the image list whatever the file size.
struct ImagesOnly;

impl<'de> Visitor<'de> for ImagesOnly {
    type Value = Vec<RawImage>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a COCO json object with an \"images\" list")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut images = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "images" {
                if images.is_some() {
                    return Err(de::Error::duplicate_field("images"));
                }
                images = Some(map.next_value::<Vec<RawImage>>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        images.ok_or_else(|| de::Error::missing_field("images"))
    }
}

/// Reads the `images` of a COCO instances or panoptic json at `path` into an index.
///
/// Entries whose `file_name` fails [`check_file_name`] are skipped as
/// [`SkipReason::PathTraversal`]; an id seen before is skipped as
/// [`SkipReason::DuplicateId`] (the first entry in file order is kept). Malformed json is
/// an error naming the file, line and column.
pub fn read_annotations(path: &Path) -> Result<CocoIndex, CocoError> {
    let file = File::open(path).map_err(|source| CocoError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut json =
        serde_json::Deserializer::from_reader(BufReader::with_capacity(READ_BUFFER, file));
    let raw = json
        .deserialize_map(ImagesOnly)
        .map_err(|e| CocoError::json(path, e))?;
    json.end().map_err(|e| CocoError::json(path, e))?;

    let mut index = CocoIndex {
        entries: raw.len() as u64,
        ..CocoIndex::default()
    };
    let mut entries = Vec::with_capacity(raw.len());
    for r in raw {
        match check_file_name(&r.file_name) {
            Ok(()) => entries.push(ImageEntry {
                id: r.id,
                file_name: r.file_name,
                width: r.width,
                height: r.height,
            }),
            Err(reason) => index.skip(SkippedImage {
                id: Some(r.id),
                detail: format!(
                    "file_name {:?} is absolute or leaves the image folder; not opened",
                    r.file_name
                ),
                path: r.file_name,
                reason,
            }),
        }
    }
    let (images, repeated) = DatasetIndex::new(entries).map_err(|source| CocoError::Index {
        path: path.to_path_buf(),
        source,
    })?;
    for r in repeated {
        let first = images
            .position(r.id)
            .and_then(|i| images.get(i))
            .map_or(String::new(), |e| e.file_name.clone());
        index.skip(SkippedImage {
            id: Some(r.id),
            detail: format!("image id {} is already used by {first:?}", r.id),
            path: r.file_name,
            reason: SkipReason::DuplicateId,
        });
    }
    index.images = images;
    Ok(index)
}

/// Drops from `index` the images whose file under `images_dir` is missing, empty or not a
/// regular file, recording each as skipped. One `stat` per image, in index order.
pub fn check_files(index: &mut CocoIndex, images_dir: &Path) {
    let mut found = Vec::new();
    for entry in index.images.images() {
        let path = images_dir.join(&entry.file_name);
        let problem = match std::fs::metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Some((SkipReason::Missing, "no such file".to_string()))
            }
            Err(e) => Some((SkipReason::Unreadable, e.to_string())),
            Ok(m) if !m.is_file() => Some((SkipReason::Unreadable, "not a file".to_string())),
            Ok(m) if m.len() == 0 => Some((SkipReason::Empty, "zero bytes".to_string())),
            Ok(_) => None,
        };
        if let Some((reason, detail)) = problem {
            found.push(SkippedImage {
                id: Some(entry.id),
                path: path.display().to_string(),
                reason,
                detail,
            });
        }
    }
    let bad: std::collections::HashSet<u64> = found.iter().filter_map(|s| s.id).collect();
    index.images.retain(|e| !bad.contains(&e.id));
    for s in found {
        index.skip(s);
    }
}

/// Where a job's COCO data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CocoPaths {
    /// `coco_root / annotations`.
    pub annotations: PathBuf,
    /// `coco_root / images_dir`.
    pub images_dir: PathBuf,
}

impl CocoPaths {
    /// The paths of `data` (which must have `coco_root`).
    pub fn of(data: &DataSpec) -> Result<Self, CocoError> {
        let root = PathBuf::from(data.coco_root.as_deref().ok_or(CocoError::NoRoot)?);
        Ok(Self {
            annotations: root.join(&data.annotations),
            images_dir: root.join(&data.images_dir),
        })
    }
}

/// Reads the annotations of `data` and checks that each image's file exists and is not
/// empty ([`read_annotations`] then [`check_files`]).
pub fn open_index(data: &DataSpec) -> Result<(CocoIndex, CocoPaths), CocoError> {
    let paths = CocoPaths::of(data)?;
    let mut index = read_annotations(&paths.annotations)?;
    check_files(&mut index, &paths.images_dir);
    Ok((index, paths))
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
        self.index.get(index).ok_or_else(|| {
            SampleError::Batch(format!(
                "sample index {index} is outside the dataset of {} images",
                self.index.len()
            ))
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

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The loader shares the training source between threads.
    #[test]
    fn the_training_source_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<SkippingSource<CocoSource>>();
    }

    #[test]
    fn only_images_are_kept_and_other_sections_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.json",
            r#"{"info": {"year": 2017, "nested": [1, {"x": null}]},
                "annotations": [{"segmentation": [[1.5, 2, 3]], "image_id": 3, "id": 1}],
                "images": [
                    {"id": 3, "file_name": "c.jpg", "width": 30, "height": 20, "license": 1},
                    {"id": 1, "file_name": "a.jpg", "width": 10, "height": 5,
                     "coco_url": "http://x/a.jpg", "extra": {"deep": [true]}}
                ],
                "segments_info_like_panoptic": [], "categories": [{"id": 1, "name": "x"}]}"#,
        );
        let index = read_annotations(&path).unwrap();
        assert_eq!(index.entries, 2);
        assert!(index.skipped.is_empty());
        let names: Vec<&str> = index
            .images
            .images()
            .iter()
            .map(|e| e.file_name.as_str())
            .collect();
        assert_eq!(names, ["a.jpg", "c.jpg"]);
        assert_eq!(index.images.get(0).unwrap().width, 10);
    }

    #[test]
    fn duplicates_and_traversal_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.json",
            r#"{"images": [
                {"id": 5, "file_name": "five.jpg", "width": 1, "height": 1},
                {"id": 6, "file_name": "../evil.jpg", "width": 1, "height": 1},
                {"id": 7, "file_name": "/etc/passwd", "width": 1, "height": 1},
                {"id": 5, "file_name": "five-again.jpg", "width": 1, "height": 1}
            ]}"#,
        );
        let index = read_annotations(&path).unwrap();
        assert_eq!(index.entries, 4);
        assert_eq!(index.images.len(), 1);
        assert_eq!(index.images.get(0).unwrap().file_name, "five.jpg");
        assert_eq!(index.counts.get(SkipReason::PathTraversal), 2);
        assert_eq!(index.counts.get(SkipReason::DuplicateId), 1);
        let dup = &index.skipped[2];
        assert_eq!(dup.path, "five-again.jpg");
        assert!(dup.detail.contains("five.jpg"), "{dup}");
        assert_eq!(index.skipped[0].path, "../evil.jpg");
    }

    #[test]
    fn malformed_json_names_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "bad.json",
            "{\n  \"images\": [\n    {\"id\": 1, \"file_name\": \"a.jpg\", \"width\": 10 \"height\": 5}\n  ]\n}\n",
        );
        let err = read_annotations(&path).unwrap_err();
        let CocoError::Json { line, column, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*line, 3);
        // Column of the `"` that should have been a `,`.
        let expected = "    {\"id\": 1, \"file_name\": \"a.jpg\", \"width\": 10 \"".len();
        assert_eq!(*column, expected, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("bad.json") && text.contains(&format!("line 3, column {expected}")),
            "{text}"
        );

        let schema = write(
            dir.path(),
            "schema.json",
            r#"{"images": [{"id": 1, "file_name": "a.jpg", "width": 10}]}"#,
        );
        let err = read_annotations(&schema).unwrap_err().to_string();
        assert!(err.contains("height") && err.contains("line 1"), "{err}");
        let no_images = write(dir.path(), "none.json", r#"{"annotations": []}"#);
        let err = read_annotations(&no_images).unwrap_err().to_string();
        assert!(err.contains("images"), "{err}");
        let trailing = write(dir.path(), "trailing.json", r#"{"images": []} x"#);
        assert!(read_annotations(&trailing).is_err());
        let missing = read_annotations(&dir.path().join("nope.json")).unwrap_err();
        assert!(matches!(missing, CocoError::Io { .. }), "{missing}");
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
