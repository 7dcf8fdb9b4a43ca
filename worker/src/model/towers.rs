//! The towers a job configures: the student (an EVA02 or OpenAI CLIP image
//! tower, whose frozen copy is also the crop teacher) and the VFM, each built
//! from its `TowerSpec` and filled from a weights file or a seeded random init.

use std::path::{Path, PathBuf};

use proto::job::arch::Family;
use proto::job::{TowerSpec, WeightsLayout};
use tch::{nn, Device, Tensor};

use super::decoupled::DecoupledTower;
use super::dinov2::DinoVit;
use super::eva::EvaVision;
use super::openai_clip::ClipVision;
use super::vit::Grid;
use super::weights::{self, LoadReport, Tower, WeightsError};
use super::ModelError;
use proto::job::arch::VitArch;

/// Where a tower's weights came from.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsSource {
    File { path: PathBuf, report: LoadReport },
    Random { seed: u64 },
}

impl std::fmt::Display for WeightsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsSource::File { path, report } => write!(
                f,
                "{} ({:?} layout, {} tensors)",
                path.display(),
                report.layout,
                report.loaded
            ),
            WeightsSource::Random { seed } => write!(f, "random init (seed {seed})"),
        }
    }
}

/// A CLIP image tower usable as DeCLIP student.
#[derive(Debug)]
pub enum Student {
    Eva(EvaVision),
    Clip(ClipVision),
}

impl Student {
    /// CLIP image embedding `[B,E]`, L2-normalised (the crop teacher's output).
    pub fn image_embedding(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Student::Eva(m) => m.image_embedding(images),
            Student::Clip(m) => m.image_embedding(images),
        }
    }

    fn weights_tower(family: Family) -> Tower {
        match family {
            Family::OpenaiClip => Tower::ClipVision,
            _ => Tower::EvaVision,
        }
    }
}

impl DecoupledTower for Student {
    fn arch(&self) -> &VitArch {
        match self {
            Student::Eva(m) => DecoupledTower::arch(m),
            Student::Clip(m) => m.arch(),
        }
    }
    fn tokens_before_last(&self, images: &Tensor) -> Result<(Tensor, Grid), ModelError> {
        match self {
            Student::Eva(m) => m.tokens_before_last(images),
            Student::Clip(m) => m.tokens_before_last(images),
        }
    }
    fn last_block_qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        match self {
            Student::Eva(m) => m.last_block_qkv(x),
            Student::Clip(m) => m.last_block_qkv(x),
        }
    }
    fn last_block_output(&self, merged: &Tensor) -> Tensor {
        match self {
            Student::Eva(m) => m.last_block_output(merged),
            Student::Clip(m) => m.last_block_output(merged),
        }
    }
    fn project(&self, tokens: &Tensor) -> Tensor {
        match self {
            Student::Eva(m) => m.project(tokens),
            Student::Clip(m) => m.project(tokens),
        }
    }
}

/// Builds the student described by `spec` on `device`. `weights` overrides the
/// spec's `weights` path.
pub fn build_student(
    spec: &TowerSpec,
    weights: Option<&Path>,
    device: Device,
) -> Result<(nn::VarStore, Student, WeightsSource), WeightsError> {
    let arch = spec.arch();
    let build = |vs: &nn::VarStore| match arch.family {
        Family::OpenaiClip => Student::Clip(ClipVision::new(&vs.root(), &arch)),
        _ => Student::Eva(EvaVision::new(&vs.root(), &arch)),
    };
    let (vs, model, source) = fill(
        spec,
        weights,
        device,
        Student::weights_tower(arch.family),
        build,
    )?;
    Ok((vs, model, source))
}

/// Builds the VFM (DINOv2 or DINO) described by `spec` on `device`.
pub fn build_vfm(
    spec: &TowerSpec,
    weights: Option<&Path>,
    device: Device,
) -> Result<(nn::VarStore, DinoVit, WeightsSource), WeightsError> {
    let arch = spec.arch();
    fill(spec, weights, device, Tower::DinoVit, |vs| {
        DinoVit::new(&vs.root(), &arch)
    })
}

fn fill<M>(
    spec: &TowerSpec,
    weights: Option<&Path>,
    device: Device,
    tower: Tower,
    build: impl FnOnce(&nn::VarStore) -> M,
) -> Result<(nn::VarStore, M, WeightsSource), WeightsError> {
    // Variables draw their random init when declared: seeded, and alone, so a random
    // init is reproducible.
    let (mut vs, model) = crate::runtime::with_seed(spec.init_seed, || {
        let vs = nn::VarStore::new(device);
        let model = build(&vs);
        (vs, model)
    });
    let path = weights
        .map(Path::to_path_buf)
        .or_else(|| spec.weights.as_ref().map(PathBuf::from));
    let source = match path {
        Some(path) => {
            let layout = if weights.is_some() {
                WeightsLayout::Auto
            } else {
                spec.weights_layout
            };
            let report = weights::load(&mut vs, &path, tower, layout)?;
            WeightsSource::File { path, report }
        }
        None => WeightsSource::Random {
            seed: spec.init_seed,
        },
    };
    Ok((vs, model, source))
}
