//! The data loader: a pool of decode threads with a bounded prefetch, feeding batch
//! assembly in order.
//!
//! # Contract
//! - **Order.** Batches come out in the order of the batch sequence given to
//!   [`Loader::new`] (normally [`OrderPlan::resume`](proto::plan::order::OrderPlan::resume)),
//!   and samples in the order of each batch's indices, whatever the thread count and
//!   timing. A batch equals what a serial loop calling the source and [`Prepare`] would
//!   build; only *when* each sample is prepared changes.
//! - **Memory bound.** At most `prefetch` samples are in flight: taken by a worker and
//!   not yet handed to the consumer (being decoded, or finished and waiting for their
//!   turn). Workers start a new sample only when a slot is free, so decoded images never
//!   pile up when the consumer (the training step) is slower than the decoders.
//! - **Errors.** A sample that fails (its image is missing or corrupt, or preparing it
//!   panicked) is delivered as an `Err` at its position in its batch; the loader goes on.
//!   What to do with it (skip, count, fail the job) is the consumer's decision.
//! - **Shutdown.** Dropping the [`Loader`] stops the workers and joins them: a worker
//!   busy with an image finishes it first, so the drop waits for at most one sample
//!   preparation.
//!
//! # Why this design
//! Std threads, one mutex and two condition variables, and no dependency. Each worker
//! takes the next sample in sequence order (a global sequence number across batches)
//! and the consumer reorders by that number, so the order is deterministic without
//! workers waiting on each other. The bound counts slots up to the *consumer*, not up to
//! a channel, because finished samples waiting behind a slow one hold memory too. The
//! sample the consumer waits for is always the oldest one issued, so it always holds a
//! slot and the bound cannot deadlock (even with `prefetch` below the batch size).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::job::DataSpec;
use proto::plan::crops::CropPlan;
use proto::plan::order::Cursor;

use super::image::RgbImage;
use super::sample::{self, CachedSample, Resolutions, Sample, SampleError};
use crate::data::source::{ImageSource, SourceImage};

/// An image source the worker threads can share.
pub type SharedSource = Arc<dyn ImageSource + Send + Sync>;

/// The global batches to load, in order: the cursor of the step each belongs to and its
/// sample indices (positions in the source's index). `OrderPlan::resume` yields these;
/// bound it (`take`) where training ends.
pub type BatchFeed = Box<dyn Iterator<Item = (Cursor, Vec<u32>)> + Send>;

/// The loader's own section of the job config (`data.loader_threads`, `data.prefetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Worker threads decoding and preparing samples (≥ 1).
    pub threads: usize,
    /// Samples in flight at most (≥ 1); see the module doc.
    pub prefetch: usize,
}

impl LoaderConfig {
    pub fn from_spec(data: &DataSpec) -> Self {
        Self {
            threads: data.loader_threads,
            prefetch: data.prefetch,
        }
    }
}

/// Why a loader could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("data loader needs at least 1 thread")]
    NoThreads,
    #[error("data loader needs a prefetch of at least 1 sample")]
    NoPrefetch,
    #[error("cannot start a data loader thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Why one sample could not be loaded. Delivered in the sample's place.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("preparing sample index {index} panicked: {message}")]
    Panicked { index: u32, message: String },
    #[error("sample index {index} was never prepared: every loader thread has exited")]
    WorkersGone { index: u32 },
}

/// Turns one decoded image into what a batch holds. Runs on the worker threads.
pub trait Prepare: Send + Sync + 'static {
    type Output: Send + 'static;
    /// Prepares image `image_id` (its dataset id) for `epoch`.
    fn prepare(
        &self,
        image: &RgbImage,
        image_id: u64,
        epoch: u32,
    ) -> Result<Self::Output, SampleError>;

    /// Whether [`Prepare::prepare_read`] needs the image's cache key (hashing costs a
    /// pass over the file, so the loader reads keys only for preparations that ask).
    fn needs_key(&self) -> bool {
        false
    }

    /// Prepares `read` (index position `index`); the default ignores key and index.
    fn prepare_read(
        &self,
        read: &SourceImage,
        index: u32,
        epoch: u32,
    ) -> Result<Self::Output, SampleError> {
        let _ = index;
        self.prepare(&read.image, read.id, epoch)
    }
}

impl<F, T> Prepare for F
where
    F: Fn(&RgbImage, u64, u32) -> Result<T, SampleError> + Send + Sync + 'static,
    T: Send + 'static,
{
    type Output = T;
    fn prepare(&self, image: &RgbImage, image_id: u64, epoch: u32) -> Result<T, SampleError> {
        self(image, image_id, epoch)
    }
}

/// The training preparation: [`sample::prepare`] (letterboxes, crop plan, crops).
#[derive(Clone, Copy, Debug)]
pub struct SamplePrep {
    pub plan: CropPlan,
    pub resolutions: Resolutions,
}

impl Prepare for SamplePrep {
    type Output = Sample;
    fn prepare(&self, image: &RgbImage, image_id: u64, epoch: u32) -> Result<Sample, SampleError> {
        sample::prepare(image, image_id, epoch, &self.plan, self.resolutions)
    }
}

/// The cache-mode preparation: [`sample::prepare_cached`] (student input, crop plan
/// boxes and the record reference; no crop cutting, no VFM input).
#[derive(Clone, Copy, Debug)]
pub struct CachePrep {
    pub plan: CropPlan,
    pub resolutions: Resolutions,
}

impl Prepare for CachePrep {
    type Output = CachedSample;
    fn needs_key(&self) -> bool {
        true
    }

    /// Only [`Prepare::prepare_read`] is used by the loader; this keys the pixels.
    fn prepare(
        &self,
        image: &RgbImage,
        image_id: u64,
        epoch: u32,
    ) -> Result<CachedSample, SampleError> {
        let _ = (image, image_id, epoch);
        Err(SampleError::NeedsRead)
    }

    fn prepare_read(
        &self,
        read: &SourceImage,
        index: u32,
        epoch: u32,
    ) -> Result<CachedSample, SampleError> {
        sample::prepare_cached(read, index, epoch, &self.plan, self.resolutions)
    }
}

/// One global batch as loaded: each sample or its error, in the batch's order.
#[derive(Debug)]
pub struct LoadedBatch<T> {
    /// The training step this batch belongs to.
    pub cursor: Cursor,
    /// Sample indices, as the batch feed gave them.
    pub indices: Vec<u32>,
    /// `samples[i]` is index `indices[i]`.
    pub samples: Vec<Result<T, LoadError>>,
}

impl<T> LoadedBatch<T> {
    /// All samples, or the first error (for consumers that fail on any bad sample).
    pub fn into_samples(self) -> Result<Vec<T>, LoadError> {
        self.samples.into_iter().collect()
    }
}

/// What the loader did so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoaderStats {
    /// Samples handed to the consumer (errors included).
    pub images: u64,
    /// Since the loader started.
    pub elapsed: Duration,
    /// Time the consumer spent blocked waiting for samples: the training loop's data stall.
    pub waiting: Duration,
    /// Worker time spent reading and preparing samples, all threads added up.
    pub busy: Duration,
    /// Most samples ever in flight at once; never above `prefetch`.
    pub max_in_flight: usize,
    pub threads: usize,
    pub prefetch: usize,
}

impl LoaderStats {
    /// Samples delivered per second of wall time.
    pub fn images_per_s(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Share of the workers' wall time spent preparing (0..=1): near 1, the loader is the
    /// bottleneck; low with a high `waiting`, the source is slow (I/O).
    pub fn utilisation(&self) -> f64 {
        let capacity = self.elapsed.as_secs_f64() * self.threads as f64;
        self.busy.as_secs_f64() / capacity.max(1e-9)
    }
}

impl fmt::Display for LoaderStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} images, {:.1} img/s, consumer waited {:.2} s, {} threads {:.0} % busy, \
             in flight at most {}/{}",
            self.images,
            self.images_per_s(),
            self.waiting.as_secs_f64(),
            self.threads,
            100.0 * self.utilisation(),
            self.max_in_flight,
            self.prefetch
        )
    }
}

/// A pool of worker threads preparing the batches of a [`BatchFeed`]; iterate it for
/// [`LoadedBatch`]es in order (module doc).
pub struct Loader<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    config: LoaderConfig,
    started: Instant,
    images: u64,
    waiting: Duration,
}

impl<T: Send + 'static> Loader<T> {
    /// Starts `config.threads` workers preparing `batches` from `source` with `prep`.
    pub fn new<P: Prepare<Output = T>>(
        config: LoaderConfig,
        source: SharedSource,
        prep: P,
        batches: BatchFeed,
    ) -> Result<Self, LoaderError> {
        if config.threads == 0 {
            return Err(LoaderError::NoThreads);
        }
        if config.prefetch == 0 {
            return Err(LoaderError::NoPrefetch);
        }
        let shared = Arc::new(Shared::new(source, Box::new(prep), batches, config));
        let mut loader = Self {
            shared,
            workers: Vec::with_capacity(config.threads),
            config,
            started: Instant::now(),
            images: 0,
            waiting: Duration::ZERO,
        };
        for i in 0..config.threads {
            let shared = Arc::clone(&loader.shared);
            let handle = std::thread::Builder::new()
                .name(format!("loader-{i}"))
                .spawn(move || worker(&shared))
                // Dropping `loader` stops and joins the workers already started.
                .map_err(LoaderError::Spawn)?;
            loader.workers.push(handle);
        }
        Ok(loader)
    }

    /// The next batch, blocking until all its samples are prepared; `None` once the feed
    /// is exhausted.
    pub fn next_batch(&mut self) -> Option<LoadedBatch<T>> {
        let mut blocked = Duration::ZERO;
        let mut state = self.shared.lock();
        let header = loop {
            if let Some(header) = state.headers.pop_front() {
                break header;
            }
            if state.feed.exhausted || state.live_workers == 0 {
                self.waiting += blocked;
                return None;
            }
            state = self.shared.wait_ready(state, &mut blocked);
        };
        let mut samples = Vec::with_capacity(header.indices.len());
        for (offset, &index) in header.indices.iter().enumerate() {
            let seq = header.first_seq + offset as u64;
            let (next, sample) = self.shared.take(state, seq, index, &mut blocked);
            state = next;
            samples.push(sample);
        }
        drop(state);
        self.images += samples.len() as u64;
        self.waiting += blocked;
        Some(LoadedBatch {
            cursor: header.cursor,
            indices: header.indices,
            samples,
        })
    }

    pub fn stats(&self) -> LoaderStats {
        let state = self.shared.lock();
        LoaderStats {
            images: self.images,
            elapsed: self.started.elapsed(),
            waiting: self.waiting,
            busy: state.busy,
            max_in_flight: state.max_in_flight,
            threads: self.config.threads,
            prefetch: self.config.prefetch,
        }
    }
}

impl<T: Send + 'static> Iterator for Loader<T> {
    type Item = LoadedBatch<T>;

    fn next(&mut self) -> Option<LoadedBatch<T>> {
        self.next_batch()
    }
}

impl<T: Send + 'static> Drop for Loader<T> {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.slot_freed.notify_all();
        for handle in self.workers.drain(..) {
            // Sample panics are caught in the worker; one escaping is a loader bug.
            if handle.join().is_err() {
                tracing::error!("a data loader thread panicked");
            }
        }
    }
}

/// A sample to prepare: its place in the global sequence, its index and epoch.
struct Job {
    seq: u64,
    index: u32,
    epoch: u32,
}

/// A batch as the consumer will assemble it: its samples are `first_seq..first_seq + len`.
struct Header {
    cursor: Cursor,
    indices: Vec<u32>,
    first_seq: u64,
}

/// The batch feed cut into jobs, handed out in sequence order.
struct Feed {
    batches: BatchFeed,
    pending: VecDeque<Job>,
    next_seq: u64,
    /// The feed has no more batches (its last jobs may still be pending or running).
    exhausted: bool,
}

impl Feed {
    /// The next job; pulls the next batch when needed and announces it in `headers`.
    fn next_job(&mut self, headers: &mut VecDeque<Header>) -> Option<Job> {
        loop {
            if let Some(job) = self.pending.pop_front() {
                return Some(job);
            }
            if self.exhausted {
                return None;
            }
            let Some((cursor, indices)) = self.batches.next() else {
                self.exhausted = true;
                return None;
            };
            let first_seq = self.next_seq;
            for &index in &indices {
                self.pending.push_back(Job {
                    seq: self.next_seq,
                    index,
                    epoch: cursor.epoch,
                });
                self.next_seq += 1;
            }
            headers.push_back(Header {
                cursor,
                indices,
                first_seq,
            });
        }
    }
}

struct State<T> {
    feed: Feed,
    /// Batches pulled from the feed and not yet taken by the consumer, in order.
    headers: VecDeque<Header>,
    /// Prepared samples by sequence number, waiting for the consumer.
    finished: BTreeMap<u64, Result<T, LoadError>>,
    /// Jobs taken by a worker and not yet handed to the consumer (≤ prefetch).
    in_flight: usize,
    max_in_flight: usize,
    busy: Duration,
    /// Workers not yet exited; 0 with work left means nothing will arrive any more.
    live_workers: usize,
    /// Set by the loader's drop: workers exit at their next look at the state.
    stop: bool,
}

struct Shared<T: Send + 'static> {
    source: SharedSource,
    prep: Box<dyn Prepare<Output = T>>,
    prefetch: usize,
    state: Mutex<State<T>>,
    /// Workers wait here for a free slot (or the stop).
    slot_freed: Condvar,
    /// The consumer waits here for a sample, a batch header or the end.
    ready: Condvar,
}

impl<T: Send + 'static> Shared<T> {
    fn new(
        source: SharedSource,
        prep: Box<dyn Prepare<Output = T>>,
        batches: BatchFeed,
        config: LoaderConfig,
    ) -> Self {
        Self {
            source,
            prep,
            prefetch: config.prefetch,
            state: Mutex::new(State {
                feed: Feed {
                    batches,
                    pending: VecDeque::new(),
                    next_seq: 0,
                    exhausted: false,
                },
                headers: VecDeque::new(),
                finished: BTreeMap::new(),
                in_flight: 0,
                max_in_flight: 0,
                busy: Duration::ZERO,
                live_workers: config.threads,
                stop: false,
            }),
            slot_freed: Condvar::new(),
            ready: Condvar::new(),
        }
    }

    /// The state; a panic under the lock (a loader bug) must not wedge shutdown.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Consumer side: waits for news, adding the time blocked to `blocked`.
    fn wait_ready<'a>(
        &self,
        state: MutexGuard<'a, State<T>>,
        blocked: &mut Duration,
    ) -> MutexGuard<'a, State<T>> {
        let t = Instant::now();
        let state = self
            .ready
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
        *blocked += t.elapsed();
        state
    }

    /// Consumer side: takes sample `seq` (index `index`) once it is finished, freeing
    /// its slot.
    fn take<'a>(
        &self,
        mut state: MutexGuard<'a, State<T>>,
        seq: u64,
        index: u32,
        blocked: &mut Duration,
    ) -> (MutexGuard<'a, State<T>>, Result<T, LoadError>) {
        loop {
            if let Some(sample) = state.finished.remove(&seq) {
                state.in_flight -= 1;
                self.slot_freed.notify_one();
                return (state, sample);
            }
            if state.live_workers == 0 {
                return (state, Err(LoadError::WorkersGone { index }));
            }
            state = self.wait_ready(state, blocked);
        }
    }

    /// Worker side: the next job once a slot is free; `None` when the feed is done or
    /// the loader stops.
    fn claim(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.stop {
                return None;
            }
            if state.in_flight < self.prefetch {
                let st = &mut *state;
                let Some(job) = st.feed.next_job(&mut st.headers) else {
                    // Wake the consumer (it may wait for a header) and idle workers.
                    self.ready.notify_all();
                    self.slot_freed.notify_all();
                    return None;
                };
                st.in_flight += 1;
                st.max_in_flight = st.max_in_flight.max(st.in_flight);
                // The consumer may be waiting for the header this job announced.
                self.ready.notify_all();
                return Some(job);
            }
            state = self
                .slot_freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Worker side: reads and prepares one sample, catching panics into an error.
    fn run(&self, job: &Job) -> Result<T, LoadError> {
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            if self.prep.needs_key() {
                let read = self.source.read(job.index)?;
                Ok(self.prep.prepare_read(&read, job.index, job.epoch)?)
            } else {
                let (id, image) = self.source.image(job.index)?;
                Ok(self.prep.prepare(&image, id, job.epoch)?)
            }
        }));
        result.unwrap_or_else(|payload| {
            Err(LoadError::Panicked {
                index: job.index,
                message: panic_message(payload.as_ref()),
            })
        })
    }

    fn finish(&self, seq: u64, sample: Result<T, LoadError>, took: Duration) {
        let mut state = self.lock();
        state.finished.insert(seq, sample);
        state.busy += took;
        self.ready.notify_all();
    }
}

/// A worker thread: claim, prepare, hand over, until the feed ends or the loader stops.
fn worker<T: Send + 'static>(shared: &Shared<T>) {
    let _exit = ExitGuard(shared);
    while let Some(job) = shared.claim() {
        let t = Instant::now();
        let sample = shared.run(&job);
        shared.finish(job.seq, sample, t.elapsed());
    }
}

/// Counts a worker out however it exits, and wakes the consumer so that it never waits
/// for a sample no thread will prepare.
struct ExitGuard<'a, T: Send + 'static>(&'a Shared<T>);

impl<T: Send + 'static> Drop for ExitGuard<'_, T> {
    fn drop(&mut self) {
        self.0.lock().live_workers -= 1;
        self.0.ready.notify_all();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::ImageError;
    use crate::data::source::SyntheticSource;
    use crate::data::synthetic;
    use proto::plan::order::OrderPlan;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A source of tiny images whose `image` calls are counted; index `fail` (if any)
    /// is a corrupt file and index `boom` panics.
    #[derive(Default)]
    struct CountingSource {
        started: AtomicUsize,
        fail: Option<u32>,
        boom: Option<u32>,
        /// Signalled on each `image` call, so tests wait for a count without sleeping.
        calls: (Mutex<usize>, Condvar),
    }

    impl CountingSource {
        fn wait_for_calls(&self, n: usize) {
            let (lock, cv) = &self.calls;
            let guard = lock.lock().unwrap();
            drop(cv.wait_while(guard, |c| *c < n).unwrap());
        }
    }

    impl ImageSource for CountingSource {
        fn image_count(&self) -> u32 {
            1000
        }
        fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            {
                let (lock, cv) = &self.calls;
                *lock.lock().unwrap() += 1;
                cv.notify_all();
            }
            if Some(index) == self.boom {
                panic!("boom at {index}");
            }
            if Some(index) == self.fail {
                return Err(SampleError::Image {
                    image_id: u64::from(index) + 1,
                    source: ImageError::Unsupported {
                        path: PathBuf::from(format!("{index}.jpg")),
                        reason: "corrupt".into(),
                    },
                });
            }
            Ok((u64::from(index) + 1, RgbImage::zeros(4, 3)))
        }
    }

    /// The sample's (id, epoch): enough to check order without libtorch.
    fn id_and_epoch(_: &RgbImage, id: u64, epoch: u32) -> Result<(u64, u32), SampleError> {
        Ok((id, epoch))
    }

    fn feed(images: u32, batch: usize, batches: usize) -> BatchFeed {
        let plan = OrderPlan::new(3, images, batch).unwrap();
        Box::new(plan.resume(Cursor::START).unwrap().take(batches))
    }

    fn config(threads: usize, prefetch: usize) -> LoaderConfig {
        LoaderConfig { threads, prefetch }
    }

    fn tiny_resolutions() -> Resolutions {
        Resolutions {
            student: 56,
            student_grid: 4,
            vfm: 42,
            crop: 28,
        }
    }

    #[test]
    fn batches_equal_serial_preparation_with_1_and_4_threads() {
        crate::runtime::init();
        let source = Arc::new(SyntheticSource {
            seed: 5,
            images: 12,
        });
        let prep = SamplePrep {
            plan: CropPlan {
                seed: 5,
                max_crops: 20,
            },
            resolutions: tiny_resolutions(),
        };
        // 12 images, batch 4: 3 steps per epoch; 5 batches cross into epoch 1.
        let expected: Vec<(Cursor, Vec<Sample>)> = OrderPlan::new(5, 12, 4)
            .unwrap()
            .resume(Cursor::START)
            .unwrap()
            .take(5)
            .map(|(cursor, indices)| {
                let samples = indices
                    .iter()
                    .map(|&i| {
                        let (id, img) = source.image(i).unwrap();
                        prep.prepare(&img, id, cursor.epoch).unwrap()
                    })
                    .collect();
                (cursor, samples)
            })
            .collect();
        for threads in [1, 4] {
            let batches = OrderPlan::new(5, 12, 4)
                .unwrap()
                .resume(Cursor::START)
                .unwrap()
                .take(5);
            let loader =
                Loader::new(config(threads, 3), source.clone(), prep, Box::new(batches)).unwrap();
            let got: Vec<LoadedBatch<Sample>> = loader.collect();
            assert_eq!(got.len(), expected.len(), "{threads} threads");
            for (batch, (cursor, want)) in got.into_iter().zip(&expected) {
                assert_eq!(batch.cursor, *cursor, "{threads} threads");
                let samples = batch.into_samples().unwrap();
                for (a, b) in samples.iter().zip(want) {
                    assert_eq!(a.image_id, b.image_id, "{threads} threads");
                    assert_eq!(a.grid_boxes, b.grid_boxes);
                    assert!(a.student_input.equal(&b.student_input));
                    assert!(a.vfm_input.equal(&b.vfm_input));
                    assert!(a.crop_inputs.equal(&b.crop_inputs));
                }
            }
        }
    }

    #[test]
    fn order_is_deterministic_across_thread_counts() {
        let run = |threads| {
            let source = Arc::new(CountingSource::default());
            let loader =
                Loader::new(config(threads, 5), source, id_and_epoch, feed(50, 7, 20)).unwrap();
            loader
                .map(|b| {
                    let LoadedBatch {
                        cursor,
                        indices,
                        samples,
                    } = b;
                    let samples: Vec<_> = samples.into_iter().map(Result::unwrap).collect();
                    (cursor, indices, samples)
                })
                .collect::<Vec<_>>()
        };
        let serial: Vec<_> = OrderPlan::new(3, 50, 7)
            .unwrap()
            .resume(Cursor::START)
            .unwrap()
            .take(20)
            .map(|(c, ix)| {
                let samples = ix.iter().map(|&i| (u64::from(i) + 1, c.epoch)).collect();
                (c, ix, samples)
            })
            .collect();
        assert_eq!(serial.len(), 20);
        for threads in [1, 2, 4] {
            assert_eq!(run(threads), serial, "{threads} threads");
        }
    }

    /// The bound counts samples up to the consumer: with a consumer that takes nothing,
    /// workers fill exactly `prefetch` slots and start no more.
    #[test]
    fn never_more_than_prefetch_samples_in_flight() {
        let source = Arc::new(CountingSource::default());
        let prefetch = 3;
        let total = 10 * 2;
        let mut loader = Loader::new(
            config(4, prefetch),
            source.clone(),
            id_and_epoch,
            feed(100, 2, 10),
        )
        .unwrap();
        let mut consumed = 0;
        loop {
            let want = (consumed + prefetch).min(total);
            source.wait_for_calls(want);
            // Let any worker that would overshoot the bound try to.
            for _ in 0..100 {
                std::thread::yield_now();
            }
            assert_eq!(source.started.load(Ordering::SeqCst), want);
            let Some(batch) = loader.next_batch() else {
                break;
            };
            consumed += batch.samples.len();
        }
        assert_eq!(consumed, total);
        let stats = loader.stats();
        assert_eq!(stats.max_in_flight, prefetch);
        assert_eq!(stats.images, total as u64);
    }

    #[test]
    fn a_prefetch_below_the_batch_size_still_makes_progress() {
        let source = Arc::new(CountingSource::default());
        let loader = Loader::new(config(2, 1), source, id_and_epoch, feed(64, 16, 8)).unwrap();
        let batches: Vec<_> = loader.collect();
        assert_eq!(batches.len(), 8);
        assert!(batches.iter().all(|b| b.samples.len() == 16));
    }

    #[test]
    fn dropping_mid_stream_stops_and_joins_the_workers() {
        let source = Arc::new(CountingSource::default());
        let mut loader = Loader::new(
            config(4, 8),
            source.clone(),
            id_and_epoch,
            // Without end: only the drop stops the workers.
            Box::new(
                OrderPlan::new(3, 100, 4)
                    .unwrap()
                    .resume(Cursor::START)
                    .unwrap(),
            ),
        )
        .unwrap();
        assert!(loader.next_batch().is_some());
        drop(loader);
        // The workers held the shared state, which holds the source: all gone once joined.
        assert_eq!(Arc::strong_count(&source), 1);
        let started = source.started.load(Ordering::SeqCst);
        assert!(started <= 4 + 8, "started {started}");
    }

    #[test]
    fn a_failed_sample_is_delivered_at_its_position() {
        let plan = OrderPlan::new(3, 40, 5).unwrap();
        let (bad_step, bad_pos) = (2u64, 3usize);
        let bad_index = plan
            .batch_at(Cursor {
                epoch: 0,
                step: bad_step,
            })
            .unwrap()[bad_pos];
        let source = Arc::new(CountingSource {
            fail: Some(bad_index),
            ..Default::default()
        });
        let loader = Loader::new(config(3, 4), source, id_and_epoch, feed(40, 5, 6)).unwrap();
        let batches: Vec<_> = loader.collect();
        assert_eq!(batches.len(), 6, "the loader goes on after the error");
        for batch in &batches {
            for (pos, (sample, &index)) in batch.samples.iter().zip(&batch.indices).enumerate() {
                if batch.cursor.step == bad_step && pos == bad_pos {
                    assert_eq!(index, bad_index);
                    let err = sample.as_ref().unwrap_err();
                    assert!(
                        matches!(err, LoadError::Sample(SampleError::Image { .. })),
                        "{err}"
                    );
                } else {
                    assert_eq!(sample.as_ref().unwrap().0, u64::from(index) + 1);
                }
            }
        }
    }

    #[test]
    fn a_panicking_sample_becomes_an_error_and_the_loader_goes_on() {
        let plan = OrderPlan::new(3, 40, 5).unwrap();
        let bad_index = plan.batch_at(Cursor::START).unwrap()[1];
        let source = Arc::new(CountingSource {
            boom: Some(bad_index),
            ..Default::default()
        });
        let loader = Loader::new(config(2, 4), source, id_and_epoch, feed(40, 5, 3)).unwrap();
        let batches: Vec<_> = loader.collect();
        assert_eq!(batches.len(), 3);
        let err = batches[0].samples[1].as_ref().unwrap_err();
        assert!(
            matches!(err, LoadError::Panicked { index, .. } if *index == bad_index),
            "{err}"
        );
        assert!(batches[1..]
            .iter()
            .all(|b| b.samples.iter().all(Result::is_ok)));
    }

    #[test]
    fn zero_threads_or_prefetch_is_refused() {
        let source: SharedSource = Arc::new(CountingSource::default());
        let err = Loader::new(config(0, 4), source.clone(), id_and_epoch, feed(10, 2, 1));
        assert!(matches!(err, Err(LoaderError::NoThreads)));
        let err = Loader::new(config(2, 0), source, id_and_epoch, feed(10, 2, 1));
        assert!(matches!(err, Err(LoaderError::NoPrefetch)));
    }

    #[test]
    fn stats_count_images_and_waiting() {
        let source = Arc::new(SyntheticSource {
            seed: 1,
            images: 16,
        });
        let prep = |img: &RgbImage, id: u64, _: u32| Ok::<_, SampleError>((id, img.pixels.len()));
        let mut loader = Loader::new(config(2, 4), source, prep, feed(16, 4, 4)).unwrap();
        let mut n = 0;
        while let Some(batch) = loader.next_batch() {
            for s in batch.into_samples().unwrap() {
                let (id, len) = s;
                let img = synthetic::image(1, id);
                assert_eq!(len, img.pixels.len());
                n += 1;
            }
        }
        let stats = loader.stats();
        assert_eq!((stats.images, n), (16, 16));
        assert!(stats.waiting <= stats.elapsed);
        assert!(stats.max_in_flight <= 4);
        assert!(stats.images_per_s() > 0.0);
        assert!(stats.to_string().contains("16 images"), "{stats}");
    }
}
