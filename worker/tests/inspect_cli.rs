//! `worker inspect` through the real binary: a tiny EVA student (EVA-CLIP layout)
//! and a tiny DINOv2 teacher (Meta layout), two real photos and six boxes.

mod common;

use std::process::Command;

use common::{assert_close, fixture_path, Fixture};
use tch::Tensor;

const BOXES: &str = "[[[0, 0, 451, 300], [10.5, 20.25, 200, 150], [300, 100, 451, 300]],
                      [[0, 0, 600, 400], [100, 50, 160, 90.5], [599, 399, 600, 400]]]";

fn run_inspect(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let boxes = dir.join("boxes.json");
    std::fs::write(&boxes, BOXES).unwrap();
    // 320 and 280: 20 x 20 grids, as the EVA fixture at 320 and the DINOv2 fixture at 280.
    inspect_command(dir, &common::tiny_job_toml(320, 280), &boxes)
        .args(extra)
        .output()
        .expect("run worker inspect")
}

/// `worker inspect` of chelsea and coffee with the fixtures' tiny EVA (EVA-CLIP
/// layout) and DINOv2 (Meta layout) weights, under `job` (written into `dir`).
fn inspect_command(dir: &std::path::Path, job: &str, boxes: &std::path::Path) -> Command {
    let job_path = dir.join("job.toml");
    std::fs::write(&job_path, job).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.arg("inspect")
        .arg("--config")
        .arg(&job_path)
        .arg("--student-weights")
        .arg(fixture_path("reference/eva_tiny.evaclip.safetensors"))
        .arg("--vfm-weights")
        .arg(fixture_path("reference/dinov2_tiny.meta.safetensors"))
        .arg("--image")
        .arg(fixture_path("images/chelsea.png"))
        .arg("--image")
        .arg(fixture_path("images/coffee.png"))
        .args(["--boxes", boxes.to_str().unwrap(), "--device", "cpu"]);
    cmd
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

    // Our decoding + PIL-exact preprocessing + models reproduce PyTorch's outputs. The
    // input is (u8/255 − mean)/std elementwise, three correctly rounded fp32 operations
    // whatever the CPU (≤ 1.5 ulp, 3e-7 of its largest value; measured 0): 1e-6 is safe.
    // The model outputs take model_parity's bound (1e-5, derived there).
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
    // The loss is 1 − mean of 6 cosines of unit vectors with 32 channels, in fp32; here it is
    // recomputed in f64 from the written fp32 tensors. A 32-term dot product of unit vectors
    // errs by ≤ 32·u (Σ|r_d·e_d| ≤ 1 by Cauchy–Schwarz; u = 2^-24), the mean of 6 by ≤ 6·u,
    // and the normalisation and 1 − x by a few u more: ≤ 48·u ≈ 2.9e-6 on any CPU.
    let recomputed = 1.0 - cos.mean(tch::Kind::Double).double_value(&[]);
    eprintln!("loss_content: {content} vs recomputed {recomputed}");
    assert!((content - recomputed).abs() <= 3e-6);
    // total = content + 0.1·context from the same two fp32 values: two roundings of
    // a value < 2, ≤ 2.4e-7.
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
    let boxes_json = dir.path().join("boxes.json");
    std::fs::write(&boxes_json, serde_json::to_string(&per_image).unwrap()).unwrap();
    let out = dir.path().join("losses.safetensors");
    let output = inspect_command(dir.path(), &common::tiny_job_toml(224, 196), &boxes_json)
        .args(["--out", out.to_str().unwrap()])
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
    let spec = common::tiny_online_job(224, 196);
    let mut trainer = worker::train::trainer::Trainer::new(&spec, tch::Device::Cpu, 6).unwrap();
    let batch = common::train_step_batch(&fx);
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
        // Same code, inputs and weights in two processes; only libtorch's split of
        // reductions over threads may differ. Its float sums cascade (error ≤ ~log2(K)·u
        // of Σ|terms|, K ≤ 392·196 affinity terms: 17·u ≈ 1e-6), and the loss terms are
        // non-negative, so Σ|terms| is the sum: 2e-6 relative holds on any CPU.
        assert!(
            (inspected - step_value).abs() <= 2e-6 * step_value.abs(),
            "{name}: {inspected} vs {step_value}"
        );
    }
}
