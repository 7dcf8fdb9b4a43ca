//! The GPU check for a one-GPU machine (bench/gpu.sh runs it there, prebuilt), and its
//! CPU smoke run (`cargo test` runs this target: `test = true` in worker/Cargo.toml).
//!
//! Parts (positional words; all three when none is named):
//! - `nccl`: a communicator (NCCL on a GPU, world of one; the CPU ring otherwise) and
//!   the median time of an all-reduce of `--allreduce-mb` MB, checked for the right sum;
//! - `train`: training steps with that collective in the loop (counts, loss sums and
//!   gradient buckets all-reduced, as the distributed trainer does): images/s, the
//!   step's time split, peak memory;
//! - `teacher`: teacher images/s as `worker teach` computes them (`write_shard`: the VFM
//!   on the image and the crop teacher on every epoch's crop plan, encoded and written),
//!   and the teachers' forward alone on the same inputs.
//!
//! Without `--full` it runs the tiny demo job with a few steps on whatever device is
//! there (the smoke run); `--full` runs the B recipe (configs/eva02-b16-coco.toml, or
//! `DECLIP_BENCH_CONFIG`: random weights, synthetic images, online teachers). One JSON
//! object per line on stdout; exit status 1 when any part failed.

mod common;

use std::time::{Duration, Instant};

use proto::job::{self, ConfigSource, JobSpec};
use proto::plan::crops::CropPlan;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use worker::comm::nccl::{self, NcclCollective};
use worker::comm::ring::{RingCollective, RingListener};
use worker::comm::Collective;
use worker::data::sample::{self, Resolutions};
use worker::data::source::{ImageSource, SyntheticSource};
use worker::data::synthetic;
use worker::teacher::models::TeacherModels;
use worker::teacher::shard::write_shard;
use worker::train::precision::Mode;
use worker::train::trainer::{GlobalCounts, StepReport, Trainer};

const TIMEOUT: Duration = Duration::from_secs(120);
const PARTS: [&str; 3] = ["nccl", "train", "teacher"];

struct Args {
    full: bool,
    parts: Vec<String>,
    steps: u64,
    batch: usize,
    allreduce_mb: usize,
    teacher_images: u32,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.parts.is_empty() || self.parts.iter().any(|p| p == part)
    }
}

/// Unknown flags and words are ignored: `cargo test` passes its own (filters, --quiet).
fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let full = argv.iter().any(|a| a == "--full");
    let value = |flag: &str, smoke: usize, full_default: usize| -> usize {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { full_default } else { smoke })
    };
    Args {
        full,
        parts: argv
            .iter()
            .filter(|a| PARTS.contains(&a.as_str()))
            .cloned()
            .collect(),
        steps: value("--steps", 3, 20) as u64,
        batch: value("--batch", 2, 4),
        allreduce_mb: value("--allreduce-mb", 1, 100),
        teacher_images: value("--teacher-images", 1, 16) as u32,
    }
}

fn emit(v: Value) {
    println!("{v}");
}

fn main() {
    let info = worker::runtime::init();
    let args = args();
    let device = if info.cuda_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    emit(
        json!({"check": "cuda", "summary": info.summary(), "devices": info.cuda_devices,
                "device": format!("{device:?}")}),
    );
    let mut failed = false;
    let mut report = |check: &str, result: Result<(), String>| {
        if let Err(error) = result {
            emit(json!({"check": check, "ok": false, "error": error}));
            failed = true;
        }
    };
    let spec = match spec(args.full, args.batch) {
        Ok(spec) => spec,
        Err(e) => {
            report("config", Err(e));
            std::process::exit(1);
        }
    };
    let mut comm = None;
    if args.wants("nccl") || args.wants("train") {
        match collective(device) {
            Ok(c) => comm = Some(c),
            Err(e) => report("collective", Err(e)),
        }
    }
    if let (true, Some(c)) = (args.wants("nccl"), comm.as_mut()) {
        report(
            "all_reduce",
            all_reduce(c.as_mut(), device, args.allreduce_mb),
        );
    }
    if args.wants("train") {
        // Without a collective (NCCL broken) the steps still say what the GPU does.
        let c = comm.as_mut().map(|c| c.as_mut() as &mut dyn Collective);
        report("training", training(&spec, c, device, &args));
    }
    drop(comm);
    if args.wants("teacher") {
        report("teacher", teacher(&spec, device, args.teacher_images));
    }
    if failed {
        std::process::exit(1);
    }
}

/// NCCL on a GPU (world of one: one GPU), the ring on CPU.
fn collective(device: Device) -> Result<Box<dyn Collective>, String> {
    let started = Instant::now();
    let (comm, kind): (Box<dyn Collective>, _) = match device {
        Device::Cuda(ordinal) => {
            let id = NcclCollective::unique_id().map_err(|e| e.to_string())?;
            let c = NcclCollective::new(&id, 0, 1, ordinal, TIMEOUT).map_err(|e| e.to_string())?;
            (Box::new(c), "nccl")
        }
        _ => {
            if let Err(e) = nccl::probe() {
                emit(json!({"check": "nccl", "available": false, "why": e.to_string()}));
            }
            let listener = RingListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let peers = [listener.address()];
            let c = RingCollective::connect(&listener, 1, 0, &peers, TIMEOUT)
                .map_err(|e| e.to_string())?;
            (Box::new(c), "ring")
        }
    };
    emit(
        json!({"check": "collective", "ok": true, "kind": kind, "world": comm.world_size(),
                "init_s": started.elapsed().as_secs_f64()}),
    );
    Ok(comm)
}

/// Median of 10 timed all-reduces (after 2 warm-ups) of `mb` MB of f32 ones; every
/// element must come back as the world size.
fn all_reduce(comm: &mut dyn Collective, device: Device, mb: usize) -> Result<(), String> {
    let bytes = mb * 1_000_000;
    let mut buf = Tensor::ones([(bytes / 4) as i64], (Kind::Float, device));
    let mut times = Vec::new();
    for round in 0..12 {
        let _ = buf.fill_(1.0);
        sync(device);
        let started = Instant::now();
        comm.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        // The collective returns once its work is done (NCCL: event polled on stream 0).
        if round >= 2 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let w = comm.world_size() as f64;
    let wrong = buf.ne(w).sum(Kind::Int64).int64_value(&[]);
    if wrong != 0 {
        return Err(format!(
            "{wrong} elements of the all-reduce are not {w} (the world size)"
        ));
    }
    let median = median(times.clone());
    let algbw = bytes as f64 / median / 1e9;
    emit(
        json!({"check": "all_reduce", "ok": true, "bytes": bytes, "rounds": times.len(),
        "median_s": median, "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2.0 * (w - 1.0) / w,
        "note": "busbw = algbw*2(W-1)/W (nccl-tests) is 0 for a world of one: one GPU \
                 exercises NCCL's launch and kernel path, not a link"}),
    );
    Ok(())
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn spec(full: bool, batch: usize) -> Result<JobSpec, String> {
    let mut sets = vec![
        format!("train.batch_size={batch}"),
        "trainers.min=1".into(),
        "trainers.max=1".into(),
        // The step takes its targets from the trainer's own teachers.
        "teachers.mode=\"online\"".into(),
    ];
    let source = if full {
        // bench/gpu.sh passes the carried copy; the build machine's path is the fallback.
        let path = std::env::var_os("DECLIP_BENCH_CONFIG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../configs/eva02-b16-coco.toml")
            });
        // Never read: the images are synthetic and made in memory.
        sets.push("data.coco_root=\"/unused\"".into());
        ConfigSource::File(path)
    } else {
        job::DEMO_CONFIG
    };
    job::load(&source, Vec::new(), &sets)
        .map(|l| l.spec)
        .map_err(|e| format!("{e:?}"))
}

/// A batch of synthetic images for `step` and this rank's (the whole world's) counts.
fn batch_for(
    spec: &JobSpec,
    step: u64,
    batch: usize,
    rows_per_image: i64,
) -> Result<(sample::Batch, GlobalCounts), String> {
    let res = Resolutions::of_job(spec);
    let plan = CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    };
    let samples: Vec<_> = (0..batch as u64)
        .map(|i| {
            let id = step * batch as u64 + i + 1;
            sample::prepare(&synthetic::image(0, id), id, 0, &plan, res)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let counts = GlobalCounts {
        crops: samples.iter().map(|s| s.grid_boxes.len() as i64).sum(),
        rows: batch as i64 * rows_per_image,
    };
    Ok((sample::collate(samples).map_err(|e| e.to_string())?, counts))
}

fn training(
    spec: &JobSpec,
    mut comm: Option<&mut dyn Collective>,
    device: Device,
    args: &Args,
) -> Result<(), String> {
    // Context and NCCL buffers only, before any model is on the GPU.
    let before_model = nccl::device_memory_used().unwrap_or(0);
    let mut trainer = Trainer::new(spec, device, 1000).map_err(|e| e.to_string())?;
    if let Some(c) = comm.as_deref_mut() {
        trainer.broadcast_weights(c).map_err(|e| e.to_string())?;
    }
    let rows = trainer.rows_per_image(spec.data.vfm_resolution);
    let (mut reports, mut step_times, mut peak_used) = (Vec::new(), Vec::new(), 0usize);
    for step in 0..args.steps {
        // Batch preparation (CPU: decode-free images, letterboxes, crops) is not timed.
        let (batch, counts) = batch_for(spec, step, args.batch, rows)?;
        let started = Instant::now();
        let targets = trainer.online_targets(&batch).map_err(|e| e.to_string())?;
        let c = comm.as_mut().map(|c| &mut **c as &mut dyn Collective);
        let report = trainer
            .train_step(step, &[(batch, targets)], counts, c)
            .map_err(|e| e.to_string())?;
        step_times.push(started.elapsed().as_secs_f64());
        peak_used = peak_used.max(nccl::device_memory_used().unwrap_or(0));
        reports.push(report);
    }
    let collective = comm.map_or("none".to_string(), |c| format!("world {}", c.world_size()));
    let mut summary = summarise(spec, device, args, &reports, &step_times);
    summary["collective"] = json!(collective);
    summary["gpu_mib_used_before_model"] = json!(before_model >> 20);
    summary["gpu_mib_used_peak"] = json!(peak_used >> 20);
    emit(summary);
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summarise(
    spec: &JobSpec,
    device: Device,
    args: &Args,
    reports: &[StepReport],
    times: &[f64],
) -> Value {
    // The first steps warm up kernels and the caching allocator.
    let skip = (times.len() / 4).min(3);
    let measured = &times[skip..];
    let part = |f: fn(&StepReport) -> f64| median(reports[skip..].iter().map(f).collect());
    let images_per_s = (measured.len() * args.batch) as f64 / measured.iter().sum::<f64>();
    json!({"check": "training", "ok": true, "job": spec.job.name, "device": format!("{device:?}"),
        "precision": match Mode::resolve(spec.train.precision, device) {
            Ok(mode) => format!("{mode:?}"),
            Err(e) => e,
        },
        "student_resolution": spec.data.student_resolution, "batch": args.batch,
        "steps": times.len(), "measured_steps": measured.len(), "images_per_s": images_per_s,
        "median_step_s": median(measured.to_vec()), "forward_s": part(|r| r.forward_s),
        "backward_s": part(|r| r.backward_s), "all_reduce_s": part(|r| r.all_reduce_s),
        "optimizer_s": part(|r| r.optimizer_s),
        "first_loss": reports.first().map_or(f64::NAN, |r| r.total),
        "last_loss": reports.last().map_or(f64::NAN, |r| r.total),
        "peak_rss_mib": common::peak_rss_mib()})
}

/// Teacher images/s: `write_shard` (what `worker teach` runs per shard) over `images`
/// synthetic images after a one-image warm-up shard, then the two teachers' forwards
/// alone on the same images' inputs (all epochs' crops and the VFM image).
fn teacher(spec: &JobSpec, device: Device, images: u32) -> Result<(), String> {
    let models = TeacherModels::new(spec, device).map_err(|e| e.to_string())?;
    let source = SyntheticSource {
        seed: spec.job.seed,
        images: images + 1,
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let shard = |shard: u32, range| {
        write_shard(
            spec,
            &models,
            &source,
            shard,
            range,
            dir.path(),
            &mut |_| true,
        )
        .map_err(|e| e.to_string())
    };
    shard(0, 0..1)?;
    let started = Instant::now();
    let written = shard(1, 1..images + 1)?;
    let shard_s = started.elapsed().as_secs_f64();
    let (forward_s, crops) = teacher_forwards(spec, &models, &source, 1..images + 1)?;
    emit(json!({"check": "teacher", "ok": true, "job": spec.job.name,
        "device": format!("{device:?}"), "images": images, "epochs": spec.train.epochs,
        "vfm_resolution": spec.data.vfm_resolution, "crop_resolution": spec.data.crop_resolution,
        "crops_per_image": crops as f64 / f64::from(images),
        "images_per_s": f64::from(images) / shard_s,
        "forward_images_per_s": f64::from(images) / forward_s,
        "bytes_per_image": written.bytes / u64::from(images.max(1)),
        "note": "images_per_s: write_shard end to end (CPU crop cutting, both teachers, \
                 compression, file); forward_images_per_s: the teachers alone"}));
    Ok(())
}

/// Seconds in the teachers' forwards over `range` (inputs prepared untimed), and crops.
fn teacher_forwards(
    spec: &JobSpec,
    models: &TeacherModels,
    source: &SyntheticSource,
    range: std::ops::Range<u32>,
) -> Result<(f64, usize), String> {
    let res = Resolutions::of_job(spec);
    let plan = CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    };
    let (mut seconds, mut crops) = (0.0, 0);
    for index in range {
        let (id, img) = source.image(index).map_err(|e| e.to_string())?;
        let vfm = sample::vfm_input(&img, id, res).map_err(|e| e.to_string())?;
        let mut inputs = Vec::new();
        for epoch in 0..spec.train.epochs as u32 {
            let (boxes, _) = sample::plan_boxes(img.width, img.height, id, epoch, &plan, res)
                .map_err(|e| e.to_string())?;
            inputs.push(sample::crop_inputs(&img, &boxes, res).map_err(|e| e.to_string())?);
        }
        let inputs = Tensor::cat(&inputs, 0).to_device(models.device());
        let vfm = vfm.unsqueeze(0).to_device(models.device());
        crops += inputs.size()[0] as usize;
        sync(models.device());
        let started = Instant::now();
        let targets = models.targets(&inputs, &vfm).map_err(|e| e.to_string())?;
        sync(models.device());
        seconds += started.elapsed().as_secs_f64();
        drop(targets);
    }
    Ok((seconds, crops))
}
