//! Teacher cache: VFM feature compression fidelity on real photos, teacher throughput,
//! and trainer step time in cache vs online mode (issue 8).
//!
//! `cargo bench -p worker --bench teacher_cache [-- fidelity|teacher|steps]` prints one
//! JSON line per measurement.
//!
//! - fidelity: DINOv2-B/14 with 4 registers (the real architecture, seeded random
//!   weights: no real weights exist here) at 490 px on the four photos of `fixtures/`.
//!   Per format: bytes per image, mean and max |T − T̂| of the 1225×1225 affinity, and
//!   the change of L_context against a fixed student affinity S (the demo student's,
//!   35×35 grid at 560). PCA is fitted leave-one-out on the other three photos.
//! - teacher: images/s of `write_shard` on CPU for the demo job (2 epochs of crops).
//! - steps: the demo job's step time with online teachers and from a ready cache, same
//!   process, alternating, median of the runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use proto::job::{self, ConfigSource, JobSpec};
use tch::{Device, Tensor};
use worker::data::image::{self, Normalization, Placement};
use worker::data::source::ImageSource;
use worker::distill::losses;
use worker::model::decoupled::{affinity, encode_dense, DecoupledConfig};
use worker::model::towers::{build_student, build_vfm};
use worker::teacher::compress::{self, PcaBasis, Storage};
use worker::teacher::models::TeacherModels;
use worker::teacher::shard::write_shard;

const PHOTOS: &[&str] = &["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
const RUNS: usize = 3;

fn main() {
    worker::runtime::init();
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if wants("fidelity") {
        fidelity();
    }
    if wants("teacher") {
        teacher_throughput();
    }
    if wants("steps") {
        step_times();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_spec(run_dir: &Path, sets: &[String]) -> JobSpec {
    let path = repo().join("configs/demo.toml");
    let mut all = vec![
        format!("job.run_dir={:?}", run_dir.display().to_string()),
        "trainers.min=1".into(),
        "trainers.max=1".into(),
        "checkpoint.every_steps=0".into(),
    ];
    all.extend_from_slice(sets);
    job::load(&ConfigSource::File(path), Vec::new(), &all)
        .expect("demo config")
        .spec
}

/// B-recipe VFM (random weights) and the demo student at 560 for a fixed S.
fn fidelity() {
    let text = r#"
[job]
name = "fidelity"
[model.student]
family = "eva02"
width = 64
depth = 3
heads = 4
head_dim = 16
mlp_hidden = 170
patch_size = 16
image_size = 224
embed_dim = 32
rope_ref_grid = 16
init_seed = 1
[model.vfm]
preset = "dinov2-b14-reg"
init_seed = 2
"#;
    let spec = job::load(
        &ConfigSource::Embedded {
            name: "fidelity",
            text,
        },
        Vec::new(),
        &[],
    )
    .expect("fidelity job")
    .spec;
    let (_svs, student, _) =
        build_student(&spec.model.student, None, Device::Cpu).expect("student");
    let (_vvs, vfm, _) = build_vfm(&spec.model.vfm, None, Device::Cpu).expect("vfm");
    let mut features = Vec::new();
    let mut student_affinity = Vec::new();
    let started = Instant::now();
    for name in PHOTOS {
        let path = repo().join("fixtures/images").join(name);
        let img = image::open(&path, &Default::default()).expect("photo");
        let input = |side, norm: &Normalization| {
            image::letterbox(&img, side, Placement::TopLeft)
                .expect("letterbox")
                .to_input_tensor(norm)
                .unsqueeze(0)
        };
        tch::no_grad(|| {
            features.push(
                vfm.patch_features(&input(490, &Normalization::IMAGENET))
                    .expect("vfm forward"),
            );
            let dense = encode_dense(
                &student,
                DecoupledConfig {
                    mode: Default::default(),
                    scale: false,
                },
                &input(560, &Normalization::CLIP),
            )
            .expect("student forward");
            student_affinity.push(affinity(&dense.context));
        });
    }
    eprintln!(
        "VFM + student forward on {} photos: {:.1} s",
        PHOTOS.len(),
        started.elapsed().as_secs_f64()
    );
    let size = features[0].size();
    let (c, n) = (size[1] as usize, (size[2] * size[3]) as usize);
    let mut formats = vec![Storage::Fp32, Storage::Fp16, Storage::Int8];
    formats.extend([16, 32, 64, 128, 256].map(|rank| Storage::Pca { rank }));
    for storage in formats {
        let (mut mean, mut max, mut dl, mut l0) = (0.0, 0.0f64, 0.0f64, 0.0);
        for (i, f) in features.iter().enumerate() {
            let pca = match storage {
                Storage::Pca { rank } => {
                    let others: Vec<Tensor> = features
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, g)| g.shallow_clone())
                        .collect();
                    let sample = compress::batch_tokens(&Tensor::cat(&others, 0));
                    Some(PcaBasis::fit(&sample, rank).expect("pca"))
                }
                _ => None,
            };
            let back = compress::round_trip(f, storage, pca.as_ref()).expect("round trip");
            let (m, x) = compress::affinity_error(f, &back);
            mean += m / features.len() as f64;
            max = max.max(x);
            let s = &student_affinity[i];
            let l = |t: &Tensor| {
                losses::context_loss(&losses::teacher_affinity(t), s)
                    .mean()
                    .double_value(&[])
            };
            let (exact, approx) = (l(f), l(&back));
            l0 += exact / features.len() as f64;
            dl = dl.max((approx - exact).abs());
        }
        let bytes = storage.encoded_len(n, c);
        let basis = match storage {
            Storage::Pca { rank } => 4 * c * (rank + 1),
            _ => 0,
        };
        println!(
            "{{\"bench\":\"fidelity\",\"vfm\":\"dinov2-b14-reg@490 (random weights)\",\"format\":\"{}\",\
             \"bytes_per_image\":{bytes},\"basis_bytes_per_shard\":{basis},\
             \"coco_train2017_gb\":{:.1},\"affinity_mean_abs_err\":{mean:.3e},\
             \"affinity_max_abs_err\":{max:.3e},\"l_context\":{l0:.4},\"max_abs_delta_l_context\":{dl:.3e}}}",
            storage.label(),
            118_287.0 * bytes as f64 / 1e9
        );
    }
}

fn teacher_throughput() {
    let mut rates = Vec::new();
    let mut shard_bytes = 0;
    for _ in 0..RUNS {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = demo_spec(dir.path(), &["teachers.compression=\"fp16\"".into()]);
        let source = worker::data::job_source::job_source(&spec).expect("source");
        let models = TeacherModels::new(&spec, Device::Cpu).expect("teachers");
        let images = 16u32.min(source.image_count());
        let started = Instant::now();
        let written = write_shard(
            &spec,
            &models,
            &source,
            0,
            0..images,
            &dir.path().join("cache"),
            &mut |_| true,
        )
        .expect("shard");
        rates.push(f64::from(images) / started.elapsed().as_secs_f64());
        shard_bytes = written.bytes / u64::from(images);
    }
    println!(
        "{{\"bench\":\"teacher\",\"job\":\"demo (fp16, {} epochs of crops)\",\"device\":\"cpu\",\
         \"images_per_s_median\":{:.2},\"runs\":{rates:?},\"bytes_per_image\":{shard_bytes}}}",
        4,
        median(&mut rates)
    );
}

fn step_times() {
    let steps = 24u64;
    let (mut online, mut cached) = (Vec::new(), Vec::new());
    let cache_src = tempfile::tempdir().expect("tempdir");
    let base = [
        format!("train.max_steps={steps}"),
        "teachers.compression=\"fp16\"".into(),
    ];
    // Fill the cache once; each cache run gets a copy, so it only reads.
    let spec = demo_spec(cache_src.path(), &base);
    let source = worker::data::job_source::job_source(&spec).expect("source");
    worker::train::standalone::prepare_cache(&spec, Device::Cpu, &source).expect("cache");
    for _ in 0..RUNS {
        for mode in ["online", "cache"] {
            let dir = tempfile::tempdir().expect("tempdir");
            if mode == "cache" {
                copy_dir(&cache_src.path().join("cache"), &dir.path().join("cache"));
            }
            let mut sets = base.to_vec();
            sets.push(format!("teachers.mode={mode:?}"));
            let spec = demo_spec(dir.path(), &sets);
            let summary =
                worker::train::standalone::run_standalone(&spec, Device::Cpu).expect("run");
            let per_step = summary.loop_wall.as_secs_f64() / summary.steps_run as f64;
            if mode == "cache" {
                &mut cached
            } else {
                &mut online
            }
            .push(per_step);
        }
    }
    let (o, c) = (median(&mut online), median(&mut cached));
    println!(
        "{{\"bench\":\"steps\",\"job\":\"demo, batch 4, {steps} steps\",\"device\":\"cpu\",\
         \"online_step_s_median\":{o:.4},\"cache_step_s_median\":{c:.4},\"online_over_cache\":{:.2},\
         \"online_runs\":{online:?},\"cache_runs\":{cached:?}}}",
        o / c
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read cache dir").flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
