//! Training-step time and peak memory on CPU, online teachers (issue: training step).
//!
//! `cargo bench -p worker --bench train_step` runs each case in its own child
//! process (peak RSS per case) and prints one JSON line per case: median step time
//! over the measured steps and its parts (data preparation, teachers, student
//! forward + backward + AdamW).

mod common;

use std::process::Command;
use std::time::Instant;

use proto::job::{self, ConfigSource};
use proto::plan::crops::CropPlan;
use tch::Device;
use worker::data::sample::{self, Resolutions};
use worker::data::synthetic;
use worker::train::trainer::{GlobalCounts, Trainer};

const CASES: &[(&str, usize, usize)] = &[
    ("tiny", 1, 5),
    ("tiny", 4, 5),
    ("b16-560", 1, 3),
    ("b16-560", 4, 3),
];

fn main() {
    worker::runtime::init();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let (name, batch): (&str, usize) = (&args[i + 1], args[i + 2].parse().expect("batch"));
        let runs = CASES
            .iter()
            .find(|c| c.0 == name && c.1 == batch)
            .expect("known case")
            .2;
        run_case(name, batch, runs);
        return;
    }
    let exe = std::env::current_exe().expect("bench executable");
    for (name, batch, _) in CASES {
        let out = Command::new(&exe)
            .args(["--case", name, &batch.to_string()])
            .output()
            .expect("run case");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!(
                "{name} x{batch} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn spec(name: &str, batch: usize) -> job::JobSpec {
    let sets = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("train.batch_size={batch}"),
            "trainers.min=1".into(),
            "trainers.max=1".into(),
            // The step takes its targets from the trainer's own teachers.
            "teachers.mode=\"online\"".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    match name {
        "tiny" => {
            job::load(&job::DEMO_CONFIG, Vec::new(), &sets(&[]))
                .expect("demo")
                .spec
        }
        _ => {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs/eva02-b16-coco.toml");
            let extra = ["data.coco_root=\"/unused\"", "train.precision=\"fp32\""];
            job::load(&ConfigSource::File(path), Vec::new(), &sets(&extra))
                .expect("b16")
                .spec
        }
    }
}

fn run_case(name: &str, batch: usize, runs: usize) {
    let spec = spec(name, batch);
    let mut trainer = Trainer::new(&spec, Device::Cpu, 1000).expect("trainer");
    let res = Resolutions::of_job(&spec);
    let plan = CropPlan {
        seed: 0,
        max_crops: spec.data.max_crops,
    };
    let rows = trainer.rows_per_image(spec.data.vfm_resolution);
    let mut timings = Vec::new();
    let mut crops = 0;
    for step in 0..=runs as u64 {
        let t0 = Instant::now();
        let samples: Vec<_> = (0..batch as u64)
            .map(|i| {
                let id = step * batch as u64 + i + 1;
                sample::prepare(&synthetic::image(0, id), id, 0, &plan, res).expect("sample")
            })
            .collect();
        let counts = GlobalCounts {
            crops: samples.iter().map(|s| s.grid_boxes.len() as i64).sum(),
            rows: batch as i64 * rows,
        };
        crops += counts.crops;
        let b = sample::collate(samples).expect("batch");
        let t1 = Instant::now();
        let targets = trainer.online_targets(&b).expect("targets");
        let t2 = Instant::now();
        trainer
            .train_step(step, &[(b, targets)], counts, None)
            .expect("step");
        let t3 = Instant::now();
        if step > 0 {
            // step 0 warms up allocator and caches
            let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
            timings.push((s(t0, t3), s(t0, t1), s(t1, t2), s(t2, t3)));
        }
    }
    timings.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (total, data, teachers, student) = timings[timings.len() / 2];
    println!(
        "{{\"case\": \"{name}\", \"batch\": {batch}, \"threads\": {}, \"steps_measured\": {runs}, \"median_step_s\": {total:.3}, \"data_s\": {data:.3}, \"teachers_s\": {teachers:.3}, \"student_fwd_bwd_opt_s\": {student:.3}, \"crops_per_image\": {:.1}, \"peak_rss_mib\": {:.0}}}",
        tch::get_num_threads(),
        crops as f64 / ((runs + 1) * batch) as f64,
        common::peak_rss_mib()
    );
}
