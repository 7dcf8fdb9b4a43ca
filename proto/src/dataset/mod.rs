//! The dataset index (architecture, "Determinism contract") and the vocabulary of bad
//! images: why one is skipped, and the counts by reason.
//!
//! The index is the list of usable COCO images **sorted by image id**; a sample index
//! (`0..N`, what [`crate::plan::order`] permutes) is a position in it. Every process that
//! reads the same annotations and sees the same image folder derives the same index, and
//! its [`DatasetIndex::fingerprint`] lets them check that cheaply.
//!
//! [`coco`] reads a COCO dataset's annotations into the index (the coordinator counts the
//! images with it; the worker's `data::coco` adds image loading on top).

pub mod coco;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// One image of the index, as the annotations describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// COCO image id.
    pub id: u64,
    /// Path relative to the image folder (`data.images_dir`), `/`-separated.
    pub file_name: String,
    /// Width in pixels, as the annotations claim it (checked against the decoded image).
    pub width: u32,
    /// Height in pixels, as the annotations claim it.
    pub height: u32,
}

/// Errors building an index.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DatasetError {
    #[error(
        "{count} images do not fit a sample index (at most {} images)",
        u32::MAX
    )]
    TooManyImages { count: usize },
}

/// The usable images sorted by id: position `i` is sample index `i`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetIndex {
    images: Vec<ImageEntry>,
}

impl DatasetIndex {
    /// The index of `entries` (in any order): sorted by id, keeping for each id the entry
    /// that came **first** in `entries`. Returns the index and the dropped later entries of
    /// repeated ids (in their original order), so the caller can report them.
    pub fn new(entries: Vec<ImageEntry>) -> Result<(Self, Vec<ImageEntry>), DatasetError> {
        // A stable sort keeps entries of equal id in their input order, so the first
        // occurrence is the one kept.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].id);
        let mut slots: Vec<Option<ImageEntry>> = entries.into_iter().map(Some).collect();
        let mut images = Vec::with_capacity(slots.len());
        let mut repeated = Vec::new();
        for i in order {
            let Some(entry) = slots[i].take() else {
                continue;
            };
            let repeats = images
                .last()
                .is_some_and(|kept: &ImageEntry| kept.id == entry.id);
            if repeats {
                repeated.push((i, entry));
            } else {
                images.push(entry);
            }
        }
        if u32::try_from(images.len()).is_err() {
            return Err(DatasetError::TooManyImages {
                count: images.len(),
            });
        }
        repeated.sort_by_key(|(i, _)| *i);
        Ok((
            Self { images },
            repeated.into_iter().map(|(_, e)| e).collect(),
        ))
    }

    /// The images, sorted by id.
    pub fn images(&self) -> &[ImageEntry] {
        &self.images
    }

    /// Number of images (fits a `u32`, checked by [`DatasetIndex::new`]).
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Number of images as the sample-index type of the plans.
    pub fn image_count(&self) -> u32 {
        // new() refuses more than u32::MAX images.
        self.images.len() as u32
    }

    /// Whether the index holds no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The image at sample index `index`.
    pub fn get(&self, index: u32) -> Option<&ImageEntry> {
        self.images.get(index as usize)
    }

    /// The sample index of image `id` (binary search: the index is sorted by id).
    pub fn position(&self, id: u64) -> Option<u32> {
        self.images
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| i as u32)
    }

    /// Keeps only the images for which `keep` is true (order is preserved, so the result is
    /// still sorted by id).
    pub fn retain(&mut self, keep: impl FnMut(&ImageEntry) -> bool) {
        self.images.retain(keep);
    }

    /// SHA-256 (lowercase hex, 64 characters) of the index: the ASCII tag
    /// `declip-dataset-index-v1`, then for each image in index order its id (u64
    /// little-endian), the byte length of its file name (u64 little-endian), the file name's
    /// UTF-8 bytes, width and height (u32 little-endian each). The length prefix keeps names
    /// from running into each other; the tag versions the layout. Two processes with equal
    /// fingerprints train on the same samples in the same positions.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"declip-dataset-index-v1");
        for e in &self.images {
            hash.update(e.id.to_le_bytes());
            hash.update((e.file_name.len() as u64).to_le_bytes());
            hash.update(e.file_name.as_bytes());
            hash.update(e.width.to_le_bytes());
            hash.update(e.height.to_le_bytes());
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why an image (or an annotations entry) is not used. The snake_case names
/// ([`SkipReason::as_str`]) are stable: they appear in logs, metrics labels and run
/// summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The file does not exist.
    Missing,
    /// The file has zero bytes.
    Empty,
    /// The file exists but cannot be read (permissions, a directory, an I/O error).
    Unreadable,
    /// The content is not a JPEG or PNG (whatever the file name says).
    NotAnImage,
    /// The image data ends early.
    Truncated,
    /// The image data is damaged in some other way.
    Corrupt,
    /// The header claims more pixels than the decoder accepts (decompression-bomb guard).
    TooLarge,
    /// The decoded size differs from the width and height in the annotations.
    SizeMismatch,
    /// An annotations entry repeats an image id already seen (the first one is kept).
    DuplicateId,
    /// The file name would leave the image folder (`..`, an absolute path, a backslash,
    /// NUL, or an empty name).
    PathTraversal,
}

impl SkipReason {
    /// Every reason, in the order reports list them.
    pub const ALL: [SkipReason; 10] = [
        SkipReason::Missing,
        SkipReason::Empty,
        SkipReason::Unreadable,
        SkipReason::NotAnImage,
        SkipReason::Truncated,
        SkipReason::Corrupt,
        SkipReason::TooLarge,
        SkipReason::SizeMismatch,
        SkipReason::DuplicateId,
        SkipReason::PathTraversal,
    ];

    /// The stable snake_case name (as serde writes it).
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipReason::Missing => "missing",
            SkipReason::Empty => "empty",
            SkipReason::Unreadable => "unreadable",
            SkipReason::NotAnImage => "not_an_image",
            SkipReason::Truncated => "truncated",
            SkipReason::Corrupt => "corrupt",
            SkipReason::TooLarge => "too_large",
            SkipReason::SizeMismatch => "size_mismatch",
            SkipReason::DuplicateId => "duplicate_id",
            SkipReason::PathTraversal => "path_traversal",
        }
    }

    /// The reason named `name` ([`SkipReason::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    const fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One skipped image or annotations entry, for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedImage {
    /// Image id, when the entry got that far.
    pub id: Option<u64>,
    /// The file's path (or the entry's `file_name` when it was refused before any path was
    /// built).
    pub path: String,
    pub reason: SkipReason,
    /// What exactly was wrong (the decoder's message, the two sizes, ...).
    pub detail: String,
}

impl fmt::Display for SkippedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id {
            Some(id) => write!(f, "{} (image {id}): {}", self.path, self.reason)?,
            None => write!(f, "{}: {}", self.path, self.reason)?,
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// Skipped images counted by reason. Serialises as a map from reason name to count
/// (reasons with a zero count left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "BTreeMap<SkipReason, u64>", from = "BTreeMap<SkipReason, u64>")]
pub struct SkipCounts {
    counts: [u64; SkipReason::ALL.len()],
}

impl SkipCounts {
    /// Counts one more skip for `reason`.
    pub fn add(&mut self, reason: SkipReason) {
        self.counts[reason.slot()] += 1;
    }

    /// The count for `reason`.
    pub fn get(&self, reason: SkipReason) -> u64 {
        self.counts[reason.slot()]
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &SkipCounts) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    /// All skips, whatever the reason.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `total / of` (0 when `of` is 0).
    pub fn fraction(&self, of: u64) -> f64 {
        if of == 0 {
            0.0
        } else {
            self.total() as f64 / of as f64
        }
    }

    /// Whether the skips are more than `max_fraction` of `of` images (the job's
    /// `data.max_skip_fraction` rule: exactly at the fraction is still acceptable).
    pub fn exceeds(&self, max_fraction: f64, of: u64) -> bool {
        self.total() > Self::limit(max_fraction, of)
    }

    /// The most skips `max_fraction` of `of` images tolerates: `⌊max_fraction · of⌋`.
    pub fn limit(max_fraction: f64, of: u64) -> u64 {
        if max_fraction.is_nan() || max_fraction <= 0.0 {
            0
        } else {
            // Saturating float-to-int cast; `of` images is the most that can be skipped.
            ((max_fraction * of as f64).floor() as u64).min(of)
        }
    }

    /// The non-zero counts, in [`SkipReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (SkipReason, u64)> + '_ {
        SkipReason::ALL
            .into_iter()
            .map(|r| (r, self.get(r)))
            .filter(|&(_, n)| n > 0)
    }
}

/// `missing=1, truncated=2` (non-zero counts only; `none` when there is no skip).
impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (reason, n) in self.iter() {
            if any {
                f.write_str(", ")?;
            }
            write!(f, "{reason}={n}")?;
            any = true;
        }
        if !any {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl From<SkipCounts> for BTreeMap<SkipReason, u64> {
    fn from(counts: SkipCounts) -> Self {
        counts.iter().collect()
    }
}

impl From<BTreeMap<SkipReason, u64>> for SkipCounts {
    fn from(map: BTreeMap<SkipReason, u64>) -> Self {
        let mut counts = SkipCounts::default();
        for (reason, n) in map {
            counts.counts[reason.slot()] = n;
        }
        counts
    }
}

/// Checks that an annotations `file_name` names a file **inside** the image folder: it
/// must be non-empty, relative (no leading `/`), contain no `..` component, no backslash
/// (a Windows separator that could hide a `..`) and no NUL. Anything else is
/// [`SkipReason::PathTraversal`]: such an entry is skipped, never opened.
pub fn check_file_name(name: &str) -> Result<(), SkipReason> {
    let refused = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|part| part == "..");
    if refused {
        Err(SkipReason::PathTraversal)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, name: &str) -> ImageEntry {
        ImageEntry {
            id,
            file_name: name.into(),
            width: 640,
            height: 480,
        }
    }

    #[test]
    fn the_index_is_sorted_by_id_and_keeps_the_first_of_a_repeated_id() {
        let (index, repeated) = DatasetIndex::new(vec![
            entry(9, "nine.jpg"),
            entry(3, "three.jpg"),
            entry(9, "nine-again.jpg"),
            entry(1, "one.jpg"),
            entry(9, "nine-thrice.jpg"),
        ])
        .unwrap();
        let ids: Vec<u64> = index.images().iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 3, 9]);
        assert_eq!(index.get(2).unwrap().file_name, "nine.jpg");
        let names: Vec<&str> = repeated.iter().map(|e| e.file_name.as_str()).collect();
        assert_eq!(names, ["nine-again.jpg", "nine-thrice.jpg"]);
        assert_eq!(index.position(3), Some(1));
        assert_eq!(index.position(4), None);
        assert_eq!(index.image_count(), 3);
    }

    #[test]
    fn the_fingerprint_depends_on_every_field_and_not_on_input_order() {
        let base = vec![entry(1, "a.jpg"), entry(2, "b.jpg")];
        let fp = |entries: Vec<ImageEntry>| DatasetIndex::new(entries).unwrap().0.fingerprint();
        let reference = fp(base.clone());
        assert_eq!(reference.len(), 64);
        assert!(reference.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(fp(vec![base[1].clone(), base[0].clone()]), reference);
        let mut changed = base.clone();
        changed[0].width += 1;
        assert_ne!(fp(changed), reference);
        let mut changed = base.clone();
        changed[1].height += 1;
        assert_ne!(fp(changed), reference);
        let mut changed = base.clone();
        changed[1].id = 3;
        assert_ne!(fp(changed), reference);
        // Names cannot run into each other: ("a.jp", "gb.jpg") differs from ("a.jpg", "b.jpg").
        let shifted = vec![entry(1, "a.jp"), entry(2, "gb.jpg")];
        assert_ne!(fp(shifted), reference);
        // Pinned (computed independently with Python's hashlib from the documented layout):
        // a change to the layout must change these on purpose.
        assert_eq!(
            reference,
            "f9cd7cf1bc279cfc1aaf755bd2e88ebb2c149d6b1a0d5253605750ebcf1ac689"
        );
        assert_eq!(
            fp(Vec::new()),
            "6af6d5b47e8ab1c93778ebad40327713761045759894d6bdf617d681db7329c6"
        );
    }

    #[test]
    fn reason_names_are_stable_snake_case_and_round_trip() {
        let names: Vec<&str> = SkipReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "missing",
                "empty",
                "unreadable",
                "not_an_image",
                "truncated",
                "corrupt",
                "too_large",
                "size_mismatch",
                "duplicate_id",
                "path_traversal"
            ]
        );
        for r in SkipReason::ALL {
            assert_eq!(SkipReason::from_name(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(SkipReason::from_name("bogus"), None);
    }

    #[test]
    fn counts_add_up_and_compare_with_the_fraction() {
        let mut c = SkipCounts::default();
        assert_eq!(c.to_string(), "none");
        assert_eq!(c.fraction(0), 0.0);
        c.add(SkipReason::Missing);
        c.add(SkipReason::Truncated);
        c.add(SkipReason::Truncated);
        assert_eq!(c.total(), 3);
        assert_eq!(c.get(SkipReason::Truncated), 2);
        assert_eq!(c.to_string(), "missing=1, truncated=2");
        assert!((c.fraction(1000) - 0.003).abs() < 1e-12);
        // 0.001 of 3000 is 3: three skips are still fine, four are not.
        assert!(!c.exceeds(0.001, 3000));
        c.add(SkipReason::Empty);
        assert!(c.exceeds(0.001, 3000));
        assert_eq!(SkipCounts::limit(0.001, 118_287), 118);
        assert_eq!(SkipCounts::limit(0.0, 10), 0);
        assert_eq!(SkipCounts::limit(1.0, 10), 10);
        let mut d = SkipCounts::default();
        d.add(SkipReason::DuplicateId);
        d.merge(&c);
        assert_eq!(d.total(), 5);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"missing":1,"empty":1,"truncated":2,"duplicate_id":1}"#
        );
        assert_eq!(serde_json::from_str::<SkipCounts>(&json).unwrap(), d);
    }

    #[test]
    fn file_names_that_leave_the_image_folder_are_refused() {
        for ok in [
            "000000000009.jpg",
            "sub/dir/x.png",
            "..hidden.jpg",
            "a..b.jpg",
            "./x.jpg",
        ] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "../evil.jpg",
            "/etc/passwd",
            "a/../../b.jpg",
            "a/..",
            "..",
            "a\\..\\b.jpg",
            "x\0.jpg",
            "",
        ] {
            assert_eq!(
                check_file_name(bad),
                Err(SkipReason::PathTraversal),
                "{bad:?}"
            );
        }
    }
}
