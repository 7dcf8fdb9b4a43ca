//! `worker inspect` through the real binary: a tiny EVA student (EVA-CLIP layout)
//! and a tiny DINOv2 teacher (Meta layout), two real photos and six boxes.

mod common;

use std::process::Command;

use common::{assert_close, fixture_path, Fixture};
use tch::Tensor;

const JOB: &str = r#"
[job]
name = "inspect-test"

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

[model.vfm]
family = "dinov2"
width = 48
depth = 3
heads = 3
head_dim = 16
mlp_hidden = 192
patch_size = 14
image_size = 518
register_tokens = 4
layer_scale = true

[data]
student_resolution = 320   # 20 x 20, as the EVA fixture at 320
vfm_resolution = 280       # 20 x 20, as the DINOv2 fixture at 280
crop_resolution = 224
"#;

const BOXES: &str = "[[[0, 0, 451, 300], [10.5, 20.25, 200, 150], [300, 100, 451, 300]],
                      [[0, 0, 600, 400], [100, 50, 160, 90.5], [599, 399, 600, 400]]]";

fn run_inspect(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let job = dir.join("job.toml");
    std::fs::write(&job, JOB).unwrap();
    let boxes = dir.join("boxes.json");
    std::fs::write(&boxes, BOXES).unwrap();
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("inspect")
        .arg("--config")
        .arg(&job)
        .arg("--student-weights")
        .arg(fixture_path("reference/eva_tiny.evaclip.safetensors"))
        .arg("--vfm-weights")
        .arg(fixture_path("reference/dinov2_tiny.meta.safetensors"))
        .arg("--image")
        .arg(fixture_path("images/chelsea.png"))
        .arg("--image")
        .arg(fixture_path("images/coffee.png"))
        .args(["--boxes", boxes.to_str().unwrap(), "--device", "cpu"])
        .args(extra)
        .output()
        .expect("run worker inspect")
}

#[test]
fn inspect_writes_every_tensor_and_matches_the_reference_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("features.safetensors");
    let output = run_inspect(dir.path(), &["--out", out.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let shape = |name: &str| {
        tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .size()
    };
    let expected: &[(&str, &[i64])] = &[
        ("student_input", &[2, 3, 320, 320]),
        ("content_map", &[2, 32, 20, 20]),
        ("context", &[2, 400, 64]),
        ("vfm_input", &[2, 3, 280, 280]),
        ("vfm_features", &[2, 48, 20, 20]),
        ("affinity_teacher", &[2, 400, 400]),
        ("affinity_student", &[2, 400, 400]),
        ("roi_features", &[6, 32]),
        ("crop_inputs", &[6, 3, 224, 224]),
        ("crop_embeddings", &[6, 32]),
        ("loss_content", &[]),
        ("loss_context", &[]),
        ("loss_total", &[]),
    ];
    for (name, dims) in expected {
        assert_eq!(shape(name), dims.to_vec(), "{name}");
    }
    assert_eq!(tensors.len(), expected.len());

    // Our decoding + PIL-exact preprocessing + models reproduce PyTorch's outputs.
    let eva = Fixture::open("eva_tiny.io");
    assert_close(
        "student_input",
        &tensors["student_input"],
        &eva.input(320),
        1e-6,
    );
    assert_close(
        "content_map",
        &tensors["content_map"],
        &eva.get("320.content_map.qq"),
        1e-5,
    );
    assert_close(
        "context",
        &tensors["context"],
        &eva.get("320.context.qq"),
        1e-5,
    );
    let dino = Fixture::open("dinov2_tiny.io");
    assert_close(
        "vfm_features",
        &tensors["vfm_features"],
        &dino.get("280.patch_features"),
        1e-5,
    );

    // The losses are consistent with the tensors written beside them.
    let content = tensors["loss_content"].double_value(&[]);
    let cos = (&tensors["roi_features"] * &tensors["crop_embeddings"]).sum_dim_intlist(
        [1i64].as_slice(),
        false,
        tch::Kind::Double,
    );
    assert!((content - (1.0 - cos.mean(tch::Kind::Double).double_value(&[]))).abs() < 1e-6);
    let total = tensors["loss_total"].double_value(&[]);
    assert!((total - (content + 0.1 * tensors["loss_context"].double_value(&[]))).abs() < 1e-6);
    // The whole-image boxes' crops are the letterboxed photos themselves, centred.
    assert!(
        tensors["crop_inputs"]
            .abs()
            .sum(tch::Kind::Double)
            .double_value(&[])
            > 0.0
    );
}

#[test]
fn bad_boxes_and_bad_configs_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let bad = dir.path().join("bad-boxes.json");
    std::fs::write(&bad, "[[[0, 0, 10, 10]]]").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["inspect", "--image"])
        .arg(fixture_path("images/chelsea.png"))
        .args(["--image"])
        .arg(fixture_path("images/coffee.png"))
        .args([
            "--boxes",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bad-boxes.json") && stderr.contains("1 box lists for 2 images"),
        "{stderr}"
    );
    assert!(!out.exists());

    let output = run_inspect(
        dir.path(),
        &[
            "--out",
            out.to_str().unwrap(),
            "--set",
            "data.student_resolution=300",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("data.student_resolution"));
    assert!(!out.exists());
}

#[test]
fn inspect_losses_equal_the_training_steps_on_the_same_inputs() {
    // The train-step fixture's job: student 224, VFM 196, crops 224, 11 crop boxes.
    let fx = Fixture::open("train_step");
    let original: Vec<f64> = Vec::try_from(&fx.get("boxes.original").flatten(0, 1)).unwrap();
    let boxes: Vec<[f64; 4]> = original
        .chunks(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    let per_image = [&boxes[..6], &boxes[6..]];
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        JOB.replace("student_resolution = 320", "student_resolution = 224")
            .replace("vfm_resolution = 280", "vfm_resolution = 196"),
    )
    .unwrap();
    let boxes_json = dir.path().join("boxes.json");
    std::fs::write(&boxes_json, serde_json::to_string(&per_image).unwrap()).unwrap();
    let out = dir.path().join("losses.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "inspect",
            "--device",
            "cpu",
            "--config",
            job.to_str().unwrap(),
        ])
        .arg("--student-weights")
        .arg(fixture_path("reference/eva_tiny.evaclip.safetensors"))
        .arg("--vfm-weights")
        .arg(fixture_path("reference/dinov2_tiny.meta.safetensors"))
        .arg("--image")
        .arg(fixture_path("images/chelsea.png"))
        .arg("--image")
        .arg(fixture_path("images/coffee.png"))
        .args([
            "--boxes",
            boxes_json.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();

    // The trainer's step on the fixture's (PyTorch-made) inputs.
    let sets = [
        format!(
            "model.student.weights={:?}",
            fixture_path("reference/eva_tiny.evaclip.safetensors")
                .display()
                .to_string()
        ),
        format!(
            "model.vfm.weights={:?}",
            fixture_path("reference/dinov2_tiny.meta.safetensors")
                .display()
                .to_string()
        ),
    ];
    let text: &'static str = Box::leak(std::fs::read_to_string(&job).unwrap().into_boxed_str());
    let spec = proto::job::load(
        &proto::job::ConfigSource::Embedded {
            name: "inspect-job",
            text,
        },
        Vec::new(),
        &sets,
    )
    .unwrap()
    .spec;
    let mut trainer = worker::train::trainer::Trainer::new(&spec, tch::Device::Cpu, 6).unwrap();
    let grid = fx.get("boxes.grid");
    let rois = (0..grid.size()[0])
        .map(|k| {
            let v = |j: i64| grid.double_value(&[k, j]) as f32;
            worker::distill::roi_align::RoiBox {
                batch: v(0) as usize,
                x0: v(1),
                y0: v(2),
                x1: v(3),
                y1: v(4),
            }
        })
        .collect();
    use worker::data::{image::Normalization as N, tensor::normalize_u8};
    let batch = worker::data::sample::Batch {
        image_ids: vec![1, 2],
        student_inputs: normalize_u8(&fx.get("in.student.u8"), &N::CLIP),
        vfm_inputs: normalize_u8(&fx.get("in.vfm.u8"), &N::IMAGENET),
        rois,
        crop_inputs: normalize_u8(&fx.get("in.crops.u8"), &N::CLIP),
    };
    let targets = trainer.online_targets(&batch).unwrap();
    let counts = worker::train::trainer::GlobalCounts {
        crops: 11,
        rows: 2 * 196,
    };
    let (content, context) = trainer.accumulate(&batch, &targets, counts).unwrap();
    for (name, step_value) in [
        ("loss_content", content),
        ("loss_context", context),
        ("loss_total", content + 0.1 * context),
    ] {
        let inspected = tensors[name].double_value(&[]);
        eprintln!("{name}: inspect {inspected:.8}, training step {step_value:.8}");
        assert!(
            (inspected - step_value).abs() <= 1e-6 * step_value.abs(),
            "{name}: {inspected} vs {step_value}"
        );
    }
}
