//! Bad images during training: skip, count by reason, log the path, replace
//! deterministically, and stop the job past `data.max_skip_fraction`.
//!
//! # Replacement (why the global batch stays deterministic)
//! A bad image at sample index `i` is replaced by the first good image at `i+1, i+2, …`
//! (wrapping to 0) in **index order**. Whether an image is bad depends only on its file, so
//! the replacement is a pure function of `(dataset, i)`: every rank, every world size and a
//! resumed run put the same image in the same slot, and every global batch keeps its `B`
//! samples (the epoch order and the step count do not change). The price is that the
//! replacement image is seen twice in that epoch, which is negligible at the fractions
//! allowed. A file that fails for a passing reason (an I/O error on a flaky mount) breaks
//! that purity; it is counted as `unreadable` so it shows.
//!
//! # Counting and the limit
//! Each bad image is counted (and logged with its path) **once per process**, when first
//! met; it is remembered, so later epochs replace it without reading it again. The limit is
//! `⌊data.max_skip_fraction × entries⌋` with `entries` the image entries of the
//! annotations, the same rule `worker data-check` applies to the whole dataset. Counting
//! distinct images against the dataset size (rather than skips against images seen so far)
//! keeps one bad image among the first batches from failing a long run, while a disaster
//! (an unmounted folder: everything `missing`) still stops the job after `limit + 1` images.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use proto::dataset::{SkipCounts, SkippedImage};

use super::error::SampleError;
pub use super::error::TooManySkips;
use super::image::RgbImage;
use super::source::{ImageSource, SourceImage};

/// What has been skipped so far.
#[derive(Debug, Default)]
struct Skips {
    /// Sample indices known to be bad, so later epochs replace them without reading.
    bad: HashMap<u32, SkippedImage>,
    counts: SkipCounts,
}

/// An [`ImageSource`] whose bad images (reported by the inner source as
/// [`SampleError::Skipped`]) are replaced by the next good one (module doc), counted and
/// logged, until there are more than the job tolerates.
#[derive(Debug)]
pub struct SkippingSource<S> {
    inner: S,
    entries: u64,
    max_fraction: f64,
    /// Shared by the loader threads; no I/O happens under the lock.
    skips: Mutex<Skips>,
}

impl<S: ImageSource> SkippingSource<S> {
    /// Wraps `inner`. `entries` is the number of image entries in the annotations (the base
    /// of the fraction); `already` are the entries the index left out (duplicate ids, path
    /// traversal, missing or empty files), which are logged here and count toward the limit:
    /// if they alone exceed it, this fails.
    pub fn new(
        inner: S,
        entries: u64,
        already: &[SkippedImage],
        max_fraction: f64,
    ) -> Result<Self, TooManySkips> {
        let mut counts = SkipCounts::default();
        for s in already {
            tracing::warn!("skipped {s}");
            counts.add(s.reason);
        }
        let source = Self {
            inner,
            entries,
            max_fraction,
            skips: Mutex::new(Skips {
                bad: HashMap::new(),
                counts,
            }),
        };
        source.check(&counts)?;
        Ok(source)
    }

    /// Skipped images so far, by reason (for metrics and the run summary).
    pub fn counts(&self) -> SkipCounts {
        self.lock().counts
    }

    /// The inner source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Skips> {
        self.skips.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, counts: &SkipCounts) -> Result<(), TooManySkips> {
        if counts.exceeds(self.max_fraction, self.entries) {
            return Err(TooManySkips {
                counts: *counts,
                skipped: counts.total(),
                entries: self.entries,
                limit: SkipCounts::limit(self.max_fraction, self.entries),
                max_fraction: self.max_fraction,
            });
        }
        Ok(())
    }

    /// Records that sample index `index` is bad: counted and logged the first time only.
    fn record(&self, index: u32, skipped: SkippedImage) -> Result<(), TooManySkips> {
        let counts = {
            let mut skips = self.lock();
            if skips.bad.contains_key(&index) {
                return Ok(());
            }
            skips.counts.add(skipped.reason);
            tracing::warn!(
                "skipped {skipped}; sample {index} uses the next good image in index order"
            );
            skips.bad.insert(index, skipped);
            skips.counts
        };
        self.check(&counts)
    }

    fn known_bad(&self, index: u32) -> bool {
        self.lock().bad.contains_key(&index)
    }
}

impl<S: ImageSource> ImageSource for SkippingSource<S> {
    fn image_count(&self) -> u32 {
        self.inner.image_count()
    }

    /// The image at `index`, or the first good one after it (module doc). Fails with
    /// [`SampleError::TooManySkips`] once the skips exceed the limit.
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
        self.read(index).map(|r| (r.id, r.image))
    }

    /// The image at `index`, or the first good one after it, with its key.
    fn read(&self, index: u32) -> Result<SourceImage, SampleError> {
        let n = self.inner.image_count();
        for k in 0..n {
            // (index + k) mod n, in u64 so it cannot overflow; the result is < n, a u32.
            let i = ((u64::from(index) + u64::from(k)) % u64::from(n)) as u32;
            if self.known_bad(i) {
                continue;
            }
            match self.inner.read(i) {
                Err(SampleError::Skipped(skipped)) => self.record(i, skipped)?,
                other => return other,
            }
        }
        Err(SampleError::NothingUsable {
            images: n,
            counts: self.counts(),
        })
    }

    fn skip_counts(&self) -> SkipCounts {
        self.counts()
    }
}

#[cfg(test)]
mod tests {
    use proto::dataset::SkipReason;

    use super::*;

    /// Images 0..n, where the indices in `bad` fail as truncated.
    #[derive(Debug)]
    struct Fake {
        n: u32,
        bad: Vec<u32>,
        reads: Mutex<Vec<u32>>,
    }

    impl ImageSource for Fake {
        fn image_count(&self) -> u32 {
            self.n
        }
        fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
            self.reads.lock().unwrap().push(index);
            if self.bad.contains(&index) {
                return Err(SampleError::Skipped(SkippedImage {
                    id: Some(u64::from(index) + 100),
                    path: format!("/data/{index}.jpg"),
                    reason: SkipReason::Truncated,
                    detail: "premature end".into(),
                }));
            }
            Ok((u64::from(index) + 100, RgbImage::zeros(1, 1)))
        }
    }

    fn fake(n: u32, bad: &[u32]) -> Fake {
        Fake {
            n,
            bad: bad.to_vec(),
            reads: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn a_bad_image_is_replaced_by_the_next_good_one_and_counted_once() {
        let source = SkippingSource::new(fake(10, &[3, 4, 9]), 10, &[], 0.5).unwrap();
        let ids: Vec<u64> = (0..10).map(|i| source.image(i).unwrap().0).collect();
        assert_eq!(ids, [100, 101, 102, 105, 105, 105, 106, 107, 108, 100]);
        assert_eq!(source.counts().get(SkipReason::Truncated), 3);
        // A second epoch reads no bad file again and counts nothing new.
        source.inner().reads.lock().unwrap().clear();
        let again: Vec<u64> = (0..10).map(|i| source.image(i).unwrap().0).collect();
        assert_eq!(again, ids);
        assert_eq!(source.counts().total(), 3);
        let reads = source.inner().reads.lock().unwrap().clone();
        assert!(reads.iter().all(|i| ![3, 4, 9].contains(i)), "{reads:?}");
    }

    #[test]
    fn skips_past_the_fraction_stop_with_the_counts() {
        // 10 entries at 0.2: two skips are tolerated, the third is not.
        let already = [SkippedImage {
            id: Some(1),
            path: "../evil.jpg".into(),
            reason: SkipReason::PathTraversal,
            detail: String::new(),
        }];
        let source = SkippingSource::new(fake(9, &[2, 5]), 10, &already, 0.2).unwrap();
        source.image(0).unwrap();
        assert_eq!(source.image(2).unwrap().0, 103);
        let err = source.image(5).unwrap_err();
        let SampleError::TooManySkips(e) = &err else {
            panic!("{err}");
        };
        assert_eq!((e.skipped, e.entries, e.limit), (3, 10, 2));
        let text = err.to_string();
        assert!(
            text.contains("truncated=2")
                && text.contains("path_traversal=1")
                && text.contains("data.max_skip_fraction"),
            "{text}"
        );
        // Index skips alone can refuse the job before any image is read.
        let err = SkippingSource::new(fake(9, &[]), 10, &already, 0.0).unwrap_err();
        assert_eq!(err.limit, 0);
    }

    #[test]
    fn all_bad_is_an_error_not_a_loop() {
        let source = SkippingSource::new(fake(3, &[0, 1, 2]), 3, &[], 1.0).unwrap();
        let err = source.image(1).unwrap_err().to_string();
        assert!(err.contains("every one of the 3 images"), "{err}");
    }
}
