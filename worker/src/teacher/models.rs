//! The frozen teachers of a job and their fingerprint.

use proto::job::JobSpec;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use super::TeacherError;
use crate::data::image::Normalization;
use crate::distill::step::{OnlineTeachers, Targets};
use crate::model::towers::{build_student, build_vfm};
use crate::model::weights::sorted_cpu;

/// Version of the teacher-side preprocessing (resize kernel, crop cutting, padding).
/// Bump it when `data::image` or `data::sample` changes what a teacher sees.
pub const PREPROCESS_VERSION: u32 = 1;

/// The crop teacher (a frozen copy of the student's original weights) and the VFM,
/// frozen, with the fingerprint of their weights and configuration.
pub struct TeacherModels {
    /// Kept alive for `teachers`.
    _stores: (nn::VarStore, nn::VarStore),
    pub teachers: OnlineTeachers,
    device: Device,
    fingerprint: String,
}

impl TeacherModels {
    /// Builds both teachers of `spec` on `device` (weights from the spec, or its seeded
    /// random initialisation) and hashes them.
    pub fn new(spec: &JobSpec, device: Device) -> Result<Self, TeacherError> {
        let (mut crop_vs, crop_teacher, _) = build_student(&spec.model.student, None, device)?;
        let (mut vfm_vs, vfm, vfm_source) = build_vfm(&spec.model.vfm, None, device)?;
        tracing::info!("VFM: {vfm_source}");
        crop_vs.freeze();
        vfm_vs.freeze();
        let fingerprint = fingerprint(spec, &crop_vs, &vfm_vs);
        Ok(Self {
            _stores: (crop_vs, vfm_vs),
            teachers: OnlineTeachers { crop_teacher, vfm },
            device,
            fingerprint,
        })
    }

    /// 64 hex digits; equal fingerprints mean equal cached values.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The crop teacher's weights, which are the student's original ones: every
    /// variable, detached, on the CPU, sorted by name.
    pub fn original_student(&self) -> Vec<(String, Tensor)> {
        sorted_cpu(&self._stores.0)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Targets of crops `[K,3,c,c]` and VFM inputs `[B,3,V,V]` (CPU or device tensors).
    pub fn targets(&self, crops: &Tensor, vfm_inputs: &Tensor) -> Result<Targets, TeacherError> {
        Ok(self.teachers.targets(
            &crops.to_device(self.device),
            &vfm_inputs.to_device(self.device),
        )?)
    }
}

/// The cache fingerprint of teachers with these frozen weights under `spec`.
pub fn fingerprint(spec: &JobSpec, crop_teacher: &nn::VarStore, vfm: &nn::VarStore) -> String {
    let digest = weights_digest(&[("crop_teacher", crop_teacher), ("vfm", vfm)]);
    proto::cache::teacher_fingerprint(spec, &digest, &preprocessing())
}

/// How crops and VFM inputs are made, with every constant that changes them.
pub fn preprocessing() -> String {
    let (c, i) = (Normalization::CLIP, Normalization::IMAGENET);
    format!(
        "v{PREPROCESS_VERSION}; resize: PIL bicubic a=-0.5 antialiased; \
         crops: cut at the rounded box from the original, longer side to crop_resolution, \
         centred zero pad, mean {:?} std {:?}; vfm: longer side to vfm_resolution, \
         top-left zero pad, mean {:?} std {:?}",
        c.mean, c.std, i.mean, i.std
    )
}

/// SHA-256 over every variable of the stores: store label, name, shape and fp32 bytes,
/// names sorted within each store.
pub fn weights_digest(stores: &[(&str, &nn::VarStore)]) -> String {
    let mut h = Sha256::new();
    for (label, vs) in stores {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            h.update(label.as_bytes());
            h.update([0]);
            h.update(name.as_bytes());
            h.update(format!("{:?}", t.size()).as_bytes());
            let t = t.detach().to_kind(Kind::Float);
            h.update(super::compress::tensor_bytes(&t));
        }
    }
    proto::cache::hex(&h.finalize())
}
