//! Shared test helpers: reference fixtures (produced by tools/reference from the real
//! open_clip / timm / torchvision) and comparison.

#![allow(dead_code)]

pub mod adamw_bound;

use std::collections::HashMap;
use std::path::PathBuf;

use proto::job::arch::{Family, VitArch};
use tch::{Kind, Tensor};

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

/// A fixture file: its tensors and its `config` metadata.
pub struct Fixture {
    pub name: String,
    tensors: HashMap<String, Tensor>,
    pub config: serde_json::Value,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        worker::runtime::init();
        let path = fixture_path(&format!("reference/{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .map(|c| serde_json::from_str(c).expect("config json"))
            .unwrap_or(serde_json::Value::Null);
        let tensors = Tensor::read_safetensors(&path)
            .expect("read fixture")
            .into_iter()
            .collect();
        Self {
            name: name.to_string(),
            tensors,
            config,
        }
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
            .shallow_clone()
    }

    /// Model input `in.{res}.u8` rebuilt as the generator did: (u8/255 - mean) / std.
    pub fn input(&self, res: usize) -> Tensor {
        let u8 = self.get(&format!("in.{res}.u8"));
        let mean = self.get("norm.mean").view([3, 1, 1]);
        let std = self.get("norm.std").view([3, 1, 1]);
        (u8.to_kind(Kind::Float) / 255.0 - mean) / std
    }

    fn usize(&self, key: &str) -> usize {
        self.config[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: config.{key}", self.name)) as usize
    }

    /// The architecture recorded by the generator.
    pub fn arch(&self, family: Family) -> VitArch {
        let opt = |key: &str| self.config[key].as_u64().unwrap_or(0) as usize;
        VitArch {
            family,
            width: self.usize("width"),
            depth: self.usize("depth"),
            heads: self.usize("heads"),
            head_dim: self.usize("head_dim"),
            mlp_hidden: self.usize("mlp_hidden"),
            patch_size: self.usize("patch_size"),
            image_size: self.usize("image_size"),
            embed_dim: if family.can_be_student() {
                self.usize("embed_dim")
            } else {
                0
            },
            register_tokens: opt("register_tokens"),
            layer_scale: self.config["layer_scale"].as_bool().unwrap_or(false),
            rope_ref_grid: opt("rope_ref_grid"),
            layer_norm_eps: self.config["eps"].as_f64().expect("eps"),
        }
    }
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let diff = (&a - &e).abs().max().double_value(&[]);
    diff / e.abs().max().double_value(&[]).max(1e-30)
}

/// Asserts `actual` matches `expected` to fp32 relative error `tol`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = relative_error(actual, expected);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
    eprintln!("{what}: relative error {err:.2e}");
}

/// A job with the tiny reference architectures of the fixtures (EVA student,
/// DINOv2 VFM), at the given student and VFM resolutions (crops at 224).
pub fn tiny_job_toml(student_resolution: usize, vfm_resolution: usize) -> String {
    format!(
        r#"
[job]
name = "tiny-reference"

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
student_resolution = {student_resolution}
vfm_resolution = {vfm_resolution}
crop_resolution = 224

[train]
lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
precision = "fp32"
"#
    )
}

/// `--set` overrides pointing the tiny job at the fixtures' weights.
pub fn fixture_weight_sets() -> Vec<String> {
    let path = |f: &str| {
        fixture_path(&format!("reference/{f}"))
            .display()
            .to_string()
    };
    vec![
        format!(
            "model.student.weights={:?}",
            path("eva_tiny.evaclip.safetensors")
        ),
        format!(
            "model.vfm.weights={:?}",
            path("dinov2_tiny.meta.safetensors")
        ),
    ]
}

/// The tiny job, resolved, with the fixtures' weights.
pub fn tiny_job(student_resolution: usize, vfm_resolution: usize) -> proto::job::JobSpec {
    let text: &'static str =
        Box::leak(tiny_job_toml(student_resolution, vfm_resolution).into_boxed_str());
    let source = proto::job::ConfigSource::Embedded {
        name: "tiny-reference",
        text,
    };
    proto::job::load(&source, Vec::new(), &fixture_weight_sets())
        .expect("valid tiny job")
        .spec
}

/// The tiny job with the teachers run by the trainer (online mode): for tests that
/// take targets from [`Trainer::online_targets`](worker::train::trainer::Trainer::online_targets).
pub fn tiny_online_job(student_resolution: usize, vfm_resolution: usize) -> proto::job::JobSpec {
    let mut spec = tiny_job(student_resolution, vfm_resolution);
    spec.teachers.mode = proto::job::TeacherMode::Online;
    spec
}

/// RoI boxes from rows `[batch, x0, y0, x1, y1]` of a [K,5] tensor.
pub fn roi_boxes(rows: &Tensor) -> Vec<worker::distill::roi_align::RoiBox> {
    (0..rows.size()[0])
        .map(|k| {
            let v = |j: i64| rows.double_value(&[k, j]) as f32;
            worker::distill::roi_align::RoiBox {
                batch: v(0) as usize,
                x0: v(1),
                y0: v(2),
                x1: v(3),
                y1: v(4),
            }
        })
        .collect()
}

/// The batch of the train-step fixture (PyTorch-made inputs, 11 crops).
pub fn train_step_batch(fx: &Fixture) -> worker::data::sample::Batch {
    use worker::data::image::Normalization;
    use worker::data::tensor::normalize_u8;
    worker::data::sample::Batch {
        image_ids: vec![1, 2],
        student_inputs: normalize_u8(&fx.get("in.student.u8"), &Normalization::CLIP),
        vfm_inputs: normalize_u8(&fx.get("in.vfm.u8"), &Normalization::IMAGENET),
        rois: roi_boxes(&fx.get("boxes.grid")),
        crop_inputs: normalize_u8(&fx.get("in.crops.u8"), &Normalization::CLIP),
    }
}
