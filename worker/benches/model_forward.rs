//! Forward time and peak memory on CPU of the full-size towers (issue: models).
//!
//! `cargo bench -p worker --bench model_forward` runs every case in its own child
//! process (so each peak-RSS figure belongs to one model) and prints one JSON line
//! per case. `bench/model-forward.sh` runs this and the PyTorch baseline together.

mod common;

use std::process::Command;
use std::time::Instant;

use proto::job::arch::{preset, VitArch};
use proto::job::DecoupledMode;
use tch::{nn, Device, Kind, Tensor};
use worker::model::decoupled::{encode_dense, DecoupledConfig};
use worker::model::dinov2::DinoVit;
use worker::model::eva::EvaVision;

const CASES: &[(&str, &str, i64)] = &[
    ("eva02-b16.encode_dense", "eva02-b16", 560),
    ("dinov2-b14-reg.patch_features", "dinov2-b14-reg", 490),
];
const RUNS: usize = 5;

fn main() {
    worker::runtime::init();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        run_case(&args[i + 1]);
        return;
    }
    let exe = std::env::current_exe().expect("bench executable");
    for (name, _, _) in CASES {
        let out = Command::new(&exe)
            .args(["--case", name])
            .output()
            .expect("run case");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn run_case(name: &str) {
    let &(_, preset_name, side) = CASES.iter().find(|c| c.0 == name).expect("known case");
    let arch: VitArch = preset(preset_name).expect("preset");
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let images = Tensor::randn([1, 3, side, side], (Kind::Float, Device::Cpu));
    let forward: Box<dyn Fn() -> Tensor> = if name.starts_with("eva") {
        let eva = EvaVision::new(&vs.root(), &arch);
        let cfg = DecoupledConfig {
            mode: DecoupledMode::Qq,
            scale: false,
        };
        Box::new(move || {
            encode_dense(&eva, cfg, &images)
                .expect("forward")
                .content_map
        })
    } else {
        let dino = DinoVit::new(&vs.root(), &arch);
        Box::new(move || dino.patch_features(&images).expect("forward"))
    };
    let mut times = tch::no_grad(|| {
        let _ = forward(); // warm-up (allocator, position-table cache)
        (0..RUNS)
            .map(|_| {
                let start = Instant::now();
                let out = forward();
                let _ = out.sum(Kind::Float).double_value(&[]);
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect::<Vec<_>>()
    });
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"impl\": \"rust-tch\", \"case\": \"{name}\", \"input\": [1, 3, {side}, {side}], \"threads\": {}, \"median_ms\": {:.1}, \"min_ms\": {:.1}, \"runs\": {RUNS}, \"peak_rss_mib\": {:.0}}}",
        tch::get_num_threads(),
        times[RUNS / 2],
        times[0],
        common::peak_rss_mib()
    );
}
