//! The GPU check for a one-GPU machine (bench/gpu.sh runs it there, prebuilt):
//! CUDA through the dlopen path, a 1-rank NCCL communicator, a 100 MB all-reduce
//! with its bandwidth, and training steps of the B/16-at-560 recipe (random weights,
//! synthetic images, online teachers) with the NCCL all-reduce in the loop: images/s,
//! the step's time split and peak memory. One JSON object per line on stdout.
//!
//! Without a GPU it runs the same code on CPU with the tiny demo job and a 1-rank ring
//! (`--tiny`), which is how it is tested where it is built.

mod common;

use std::time::{Duration, Instant};

use proto::job::{self, ConfigSource, JobSpec};
use proto::plan::crops::CropPlan;
use tch::{Device, Kind, Tensor};
use worker::comm::nccl::{self, NcclCollective};
use worker::comm::ring::{RingCollective, RingListener};
use worker::comm::Collective;
use worker::data::sample::{self, Resolutions};
use worker::data::synthetic;
use worker::train::trainer::{GlobalCounts, StepReport, Trainer};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    tiny: bool,
    steps: u64,
    batch: usize,
    allreduce_mb: usize,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: usize| -> usize {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    Args {
        tiny: argv.iter().any(|a| a == "--tiny"),
        steps: value("--steps", 20) as u64,
        batch: value("--batch", 4),
        allreduce_mb: value("--allreduce-mb", 100),
    }
}

fn main() {
    let info = worker::runtime::init();
    let args = args();
    let device = if info.cuda_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    println!(
        "{{\"check\": \"cuda\", \"summary\": {:?}, \"devices\": {}, \"device\": \"{device:?}\"}}",
        info.summary(),
        info.cuda_devices
    );
    let mut comm = match collective(device) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "{{\"check\": \"collective\", \"ok\": false, \"error\": {:?}}}",
                e
            );
            std::process::exit(1);
        }
    };
    all_reduce_bandwidth(comm.as_mut(), device, args.allreduce_mb);
    if let Err(e) = training(comm.as_mut(), device, &args) {
        println!("{{\"check\": \"training\", \"ok\": false, \"error\": {e:?}}}");
        std::process::exit(1);
    }
}

/// NCCL on a GPU (world of one: one GPU), the ring on CPU.
fn collective(device: Device) -> Result<Box<dyn Collective>, String> {
    let started = Instant::now();
    let comm: Box<dyn Collective> = match device {
        Device::Cuda(ordinal) => {
            let id = NcclCollective::unique_id().map_err(|e| e.to_string())?;
            Box::new(NcclCollective::new(&id, 0, 1, ordinal, TIMEOUT).map_err(|e| e.to_string())?)
        }
        _ => {
            if let Err(e) = nccl::probe() {
                println!(
                    "{{\"check\": \"nccl\", \"available\": false, \"why\": {:?}}}",
                    e.to_string()
                );
            }
            let listener = RingListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let peers = [listener.address()];
            Box::new(
                RingCollective::connect(&listener, 1, 0, &peers, TIMEOUT)
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    println!(
        "{{\"check\": \"collective\", \"ok\": true, \"kind\": \"{}\", \"world\": {}, \"init_s\": {:.3}}}",
        if matches!(device, Device::Cuda(_)) { "nccl" } else { "ring" },
        comm.world_size(),
        started.elapsed().as_secs_f64()
    );
    Ok(comm)
}

fn all_reduce_bandwidth(comm: &mut dyn Collective, device: Device, mb: usize) {
    let bytes = mb * 1_000_000;
    let mut buf = Tensor::ones([(bytes / 4) as i64], (Kind::Float, device));
    let mut times = Vec::new();
    for round in 0..12 {
        let started = Instant::now();
        if let Err(e) = comm.all_reduce_sum(&mut buf) {
            println!(
                "{{\"check\": \"all_reduce\", \"ok\": false, \"error\": {:?}}}",
                e.to_string()
            );
            return;
        }
        if round >= 2 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let w = comm.world_size() as f64;
    let algbw = bytes as f64 / median / 1e9;
    let ok = buf.double_value(&[0]) == 1.0;
    println!(
        "{{\"check\": \"all_reduce\", \"ok\": {ok}, \"bytes\": {bytes}, \"rounds\": {}, \"median_s\": {median:.6}, \"algbw_gb_s\": {algbw:.2}, \"busbw_gb_s\": {:.2}, \"note\": \"busbw = algbw*2(W-1)/W is 0 for a world of one\"}}",
        times.len(),
        algbw * 2.0 * (w - 1.0) / w
    );
}

fn spec(tiny: bool, batch: usize) -> Result<JobSpec, String> {
    let mut sets = vec![
        format!("train.batch_size={batch}"),
        "trainers.min=1".into(),
        "trainers.max=1".into(),
    ];
    let source = if tiny {
        job::DEMO_CONFIG
    } else {
        sets.push("data.coco_root=\"/unused\"".into());
        ConfigSource::File(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/eva02-b16-coco.toml"),
        )
    };
    // The config path is the build machine's; bench/gpu.sh passes the carried copy.
    let source = match std::env::var("DECLIP_BENCH_CONFIG") {
        Ok(path) if !tiny => ConfigSource::File(path.into()),
        _ => source,
    };
    job::load(&source, Vec::new(), &sets)
        .map(|l| l.spec)
        .map_err(|e| format!("{e:?}"))
}

fn training(comm: &mut dyn Collective, device: Device, args: &Args) -> Result<(), String> {
    let spec = spec(args.tiny || device == Device::Cpu, args.batch)?;
    // Context and NCCL buffers only, before any model is on the GPU.
    let baseline = nccl::device_memory_used().unwrap_or(0);
    let mut trainer = Trainer::new(&spec, device, 1000).map_err(|e| e.to_string())?;
    trainer.broadcast_weights(comm).map_err(|e| e.to_string())?;
    let res = Resolutions::of_job(&spec);
    let plan = CropPlan {
        seed: 0,
        max_crops: spec.data.max_crops,
    };
    let rows = trainer.rows_per_image(spec.data.vfm_resolution);
    let (mut reports, mut step_times, mut peak_used) = (Vec::new(), Vec::new(), 0usize);
    for step in 0..args.steps {
        let samples: Vec<_> = (0..args.batch as u64)
            .map(|i| {
                let id = step * args.batch as u64 + i + 1;
                sample::prepare(&synthetic::image(0, id), id, 0, &plan, res)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let counts = GlobalCounts {
            crops: samples.iter().map(|s| s.grid_boxes.len() as i64).sum(),
            rows: args.batch as i64 * rows,
        };
        let batch = sample::collate(samples).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let targets = trainer.online_targets(&batch).map_err(|e| e.to_string())?;
        let report = trainer
            .train_step(step, &[(batch, targets)], counts, Some(comm))
            .map_err(|e| e.to_string())?;
        step_times.push(started.elapsed().as_secs_f64());
        peak_used = peak_used.max(nccl::device_memory_used().unwrap_or(0));
        reports.push(report);
    }
    summarise(
        &spec,
        device,
        args,
        &reports,
        &step_times,
        (baseline, peak_used),
    );
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
    gpu_bytes: (usize, usize),
) {
    // The first steps warm up kernels and the caching allocator.
    let skip = (times.len() / 4).min(3);
    let measured = &times[skip..];
    let part = |f: fn(&StepReport) -> f64| median(reports[skip..].iter().map(f).collect());
    let images_per_s = (measured.len() * args.batch) as f64 / measured.iter().sum::<f64>();
    println!(
        "{{\"check\": \"training\", \"ok\": true, \"job\": {:?}, \"device\": \"{device:?}\", \"precision\": \"{:?}\", \"student_resolution\": {}, \"batch\": {}, \"steps\": {}, \"measured_steps\": {}, \"images_per_s\": {images_per_s:.2}, \"median_step_s\": {:.4}, \"forward_s\": {:.4}, \"backward_s\": {:.4}, \"all_reduce_s\": {:.4}, \"optimizer_s\": {:.4}, \"first_loss\": {:.5}, \"last_loss\": {:.5}, \"gpu_mib_used_before_model\": {:.0}, \"gpu_mib_used_peak\": {:.0}, \"peak_rss_mib\": {:.0}}}",
        spec.job.name,
        spec.train.precision,
        spec.data.student_resolution,
        args.batch,
        times.len(),
        measured.len(),
        median(measured.to_vec()),
        part(|r| r.forward_s),
        part(|r| r.backward_s),
        part(|r| r.all_reduce_s),
        part(|r| r.optimizer_s),
        reports.first().map_or(f64::NAN, |r| r.total),
        reports.last().map_or(f64::NAN, |r| r.total),
        gpu_bytes.0 as f64 / (1 << 20) as f64,
        gpu_bytes.1 as f64 / (1 << 20) as f64,
        common::peak_rss_mib()
    );
}
