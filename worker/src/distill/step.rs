//! The DeCLIP forward of one batch: the student's dense features, region
//! features on the crop plan's boxes, both affinity matrices and the loss terms
//! against the teachers' targets. Trainers (online or from the cache) and
//! `worker inspect` all call this; the losses cannot drift apart.

use proto::job::ContextResize;
use tch::Tensor;

use super::losses::{self, LossTerms};
use super::roi_align::{roi_embeddings, RoiBox};
use crate::model::decoupled::{affinity, encode_dense, DecoupledConfig, DecoupledTower};
use crate::model::dinov2::DinoVit;
use crate::model::towers::Student;
use crate::model::vit::Grid;
use crate::model::ModelError;

/// What the frozen teachers say about a batch.
#[derive(Debug)]
pub struct Targets {
    /// Crop teacher's L2-normalised embedding of every crop, `[K,E]` (RoI order).
    pub crop_embeddings: Tensor,
    /// VFM patch features after the final norm, `[B,C,gh,gw]`.
    pub vfm_features: Tensor,
}

/// The frozen teachers run inside the trainer (`teacher.mode = "online"`).
#[derive(Debug)]
pub struct OnlineTeachers {
    /// A frozen copy of the original student weights.
    pub crop_teacher: Student,
    pub vfm: DinoVit,
}

impl OnlineTeachers {
    /// Targets for crops `[K,3,c,c]` and VFM inputs `[B,3,V,V]` (no gradients).
    pub fn targets(
        &self,
        crop_inputs: &Tensor,
        vfm_inputs: &Tensor,
    ) -> Result<Targets, ModelError> {
        tch::no_grad(|| {
            Ok(Targets {
                crop_embeddings: self.crop_teacher.image_embedding(crop_inputs)?,
                vfm_features: self.vfm.patch_features(vfm_inputs)?,
            })
        })
    }
}

/// How the student side of the step is configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConfig {
    pub decoupled: DecoupledConfig,
    pub context_resize: ContextResize,
}

/// Everything the forward computed (inspect writes these; the trainer uses `terms`).
#[derive(Debug)]
pub struct StepOutputs {
    pub content_map: Tensor,
    pub context: Tensor,
    /// L2-normalised RoIAlign features `[K,E]`.
    pub roi_features: Tensor,
    pub affinity_teacher: Tensor,
    pub affinity_student: Tensor,
    pub terms: LossTerms,
}

/// Student forward and loss terms for `student_inputs` `[B,3,S,S]` and `rois` (on
/// the student grid, `batch` indexing the inputs), against `targets`.
pub fn forward(
    student: &Student,
    cfg: StepConfig,
    student_inputs: &Tensor,
    rois: &[RoiBox],
    targets: &Targets,
) -> Result<StepOutputs, ModelError> {
    let dense = encode_dense(student, cfg.decoupled, student_inputs)?;
    let student_grid = grid_of(&dense.content_map);
    let vfm_grid = grid_of(&targets.vfm_features);
    if student_grid != vfm_grid && cfg.context_resize == ContextResize::None {
        return Err(ModelError::InputShape(format!(
            "student grid {student_grid:?} differs from the VFM grid {vfm_grid:?} and loss.context_resize is none"
        )));
    }
    let roi_features = roi_embeddings(&dense.content_map, rois, 1.0);
    let affinity_teacher = losses::teacher_affinity(&targets.vfm_features);
    let affinity_student = affinity(&losses::context_on_grid(
        &dense.context,
        student_grid,
        vfm_grid,
    ));
    let terms = LossTerms {
        content: losses::content_loss(&roi_features, &targets.crop_embeddings),
        context: losses::context_loss(&affinity_teacher, &affinity_student),
    };
    Ok(StepOutputs {
        content_map: dense.content_map,
        context: dense.context,
        roi_features,
        affinity_teacher,
        affinity_student,
        terms,
    })
}

fn grid_of(map: &Tensor) -> Grid {
    let size = map.size();
    Grid {
        rows: size[2],
        cols: size[3],
    }
}

/// Patch grid side of a student for `resolution`-pixel inputs.
pub fn student_grid(student: &Student, resolution: usize) -> usize {
    resolution / DecoupledTower::arch(student).patch_size
}
