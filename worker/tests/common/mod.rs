//! Shared test helpers: reference fixtures (produced by tools/reference from the real
//! open_clip / timm / torchvision) and comparison.

#![allow(dead_code)]

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
