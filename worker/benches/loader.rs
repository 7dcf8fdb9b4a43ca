//! Loader throughput on CPU (issue #5). `bench/loader.sh` makes the JPEGs, runs this and
//! the Pillow baseline (`bench/loader_pil.py`) together, three rounds.
//!
//! `cargo bench -p worker --bench loader -- DIR` prints one JSON line per case:
//! - `student_per_core`: one thread, decode + letterbox 560 + CLIP normalise (to a tensor),
//!   the same work as the Pillow baseline;
//! - `loader.student`: the [`Loader`] with 2 threads, student 560 and VFM 490 inputs;
//! - `loader.crops`: the [`Loader`] with 2 threads, the crop plan's crops at 224 (centred).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use proto::plan::crops::{CropPlan, DEFAULT_MAX_CROPS};
use proto::plan::order::{Cursor, OrderPlan};
use worker::data::image::{self, DecodeOptions, Normalization, Placement, RgbImage};
use worker::data::loader::{Loader, LoaderConfig, Prepare};
use worker::data::sample::{self, Resolutions, SampleError};
use worker::data::source::ImageSource;

/// Passes over the files timed in the per-core case (after one warm-up pass).
const PASSES: usize = 3;
/// Images each loader case prepares.
const LOADER_IMAGES: usize = 200;
const BATCH: usize = 10;
const RESOLUTIONS: Resolutions = Resolutions {
    student: 560,
    student_grid: 40,
    vfm: 490,
    crop: 224,
};

/// JPEG files of a folder, read and decoded on each call (ids `index + 1`).
struct Files(Vec<PathBuf>);

impl ImageSource for Files {
    fn image_count(&self) -> u32 {
        self.0.len() as u32
    }
    fn image(&self, index: u32) -> Result<(u64, RgbImage), SampleError> {
        let path = &self.0[index as usize];
        let img =
            image::open(path, &DecodeOptions::default()).map_err(|source| SampleError::Image {
                image_id: u64::from(index) + 1,
                source,
            })?;
        Ok((u64::from(index) + 1, img))
    }
}

fn main() {
    worker::runtime::init();
    // One intra-op thread: the loader's parallelism is its own threads.
    tch::set_num_threads(1);
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .expect("usage: loader DIR (a folder of JPEGs)");
    let files = jpegs(Path::new(&dir));
    assert!(!files.is_empty(), "no .jpg in {dir}");
    per_core(&files);
    let source = Arc::new(Files(files));
    loader_case(
        "loader.student",
        &source,
        |img: &RgbImage, id: u64, _: u32| {
            sample::model_inputs(img, id, RESOLUTIONS).map(|_| 0usize)
        },
    );
    let plan = CropPlan {
        seed: 0,
        max_crops: DEFAULT_MAX_CROPS,
    };
    loader_case(
        "loader.crops",
        &source,
        move |img: &RgbImage, id: u64, epoch: u32| {
            sample::crops(img, id, epoch, &plan, RESOLUTIONS).map(|(boxes, _)| boxes.len())
        },
    );
}

fn jpegs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read JPEG folder")
        .map(|e| e.expect("folder entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
}

/// One thread: what the Pillow baseline does, per image, with the time of each stage.
fn per_core(files: &[PathBuf]) {
    let mut warm_up = [0.0; 3];
    files.iter().for_each(|f| student_input(f, &mut warm_up));
    let mut stages = [0.0; 3];
    let (started, cpu) = (Instant::now(), cpu_seconds());
    for _ in 0..PASSES {
        files.iter().for_each(|f| student_input(f, &mut stages));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let images = PASSES * files.len();
    let ms = stages.map(|s| 1e3 * s / images as f64);
    println!(
        "{{\"case\":\"student_per_core\",\"images\":{images},\"seconds\":{seconds:.4},\"images_per_s\":{:.2},\"cpu_s\":{cpu:.4},\"images_per_cpu_s\":{:.2},\"decode_ms\":{:.3},\"letterbox_ms\":{:.3},\"normalise_ms\":{:.3}}}",
        images as f64 / seconds,
        images as f64 / cpu,
        ms[0],
        ms[1],
        ms[2]
    );
}

/// Decode, letterbox 560, CLIP-normalise to a tensor; adds each stage's seconds to `stages`.
fn student_input(path: &Path, stages: &mut [f64; 3]) {
    let t = Instant::now();
    let img = image::open(path, &DecodeOptions::default()).expect("decode");
    let decoded = t.elapsed().as_secs_f64();
    let boxed = image::letterbox(&img, RESOLUTIONS.student, Placement::TopLeft).expect("letterbox");
    let boxed_at = t.elapsed().as_secs_f64();
    drop(boxed.to_input_tensor(&Normalization::CLIP));
    let done = t.elapsed().as_secs_f64();
    for (s, v) in stages
        .iter_mut()
        .zip([decoded, boxed_at - decoded, done - boxed_at])
    {
        *s += v;
    }
}

/// The loader with 2 threads over `LOADER_IMAGES` images; `prep` returns the crop count.
fn loader_case<P: Prepare<Output = usize>>(name: &str, source: &Arc<Files>, prep: P) {
    let plan = OrderPlan::new(0, source.image_count(), BATCH).expect("order plan");
    let feed = plan
        .resume(Cursor::START)
        .expect("resume")
        .take(LOADER_IMAGES / BATCH);
    let config = LoaderConfig {
        threads: 2,
        prefetch: 16,
    };
    let mut loader = Loader::new(config, source.clone(), prep, Box::new(feed)).expect("loader");
    let mut crops = 0;
    let cpu = cpu_seconds();
    while let Some(batch) = loader.next_batch() {
        crops += batch
            .into_samples()
            .expect("sample")
            .into_iter()
            .sum::<usize>();
    }
    let stats = loader.stats();
    let cpu = cpu_seconds() - cpu;
    println!(
        "{{\"case\":\"{name}\",\"threads\":2,\"prefetch\":16,\"images\":{},\"seconds\":{:.4},\"images_per_s\":{:.2},\"waiting_s\":{:.4},\"utilisation\":{:.3},\"cpu_s\":{cpu:.4},\"images_per_cpu_s\":{:.2},\"crops_per_image\":{:.2}}}",
        stats.images,
        stats.elapsed.as_secs_f64(),
        stats.images_per_s(),
        stats.waiting.as_secs_f64(),
        stats.utilisation(),
        stats.images as f64 / cpu,
        crops as f64 / stats.images as f64
    );
}

/// CPU seconds this process has used (all threads): unlike wall time, barely changed by
/// other processes competing for the cores, so "per core" figures stay comparable on a
/// busy machine.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}
