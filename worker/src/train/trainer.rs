//! One trainer's state and its optimizer step: the student being fine-tuned, the
//! frozen teachers (online mode), AdamW and the schedule.
//!
//! A step takes the micro-batches that make up this trainer's share of the global
//! batch and the *global* item counts, so each loss term is a mean over the global
//! batch however it is split (accumulation now, data parallelism later).

use proto::job::JobSpec;
use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::CheckpointState;
use super::export::{self, ExportError};
use super::optimizer::{AdamW, AdamWConfig, WarmupCosine};
use super::params::{ParamRole, TrainableSplit};
use super::precision::{LossScaler, Mode};
use crate::data::sample::Batch;
use crate::distill::losses::LossWeights;
use crate::distill::step::{self, OnlineTeachers, StepConfig, Targets};
use crate::model::decoupled::{DecoupledConfig, DecoupledTower};
use crate::model::towers::{build_student, build_vfm, Student, WeightsSource};
use crate::model::weights::WeightsError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("weights: {0}")]
    Weights(#[from] WeightsError),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("non-finite loss at step {step} (content {content}, context {context}); the update was not applied")]
    NonFinite {
        step: u64,
        content: f64,
        context: f64,
    },
    #[error("checkpoint does not fit this job: {0}")]
    Restore(String),
    #[error("export: {0}")]
    Export(#[from] ExportError),
    #[error("{0}")]
    Precision(String),
}

/// Loss values of one optimizer step (global-batch means).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    pub content: f64,
    pub context: f64,
    pub total: f64,
    pub lr: f64,
}

/// Item counts of the global batch: valid crops, and affinity rows (images × tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalCounts {
    pub crops: i64,
    pub rows: i64,
}

pub struct Trainer {
    device: Device,
    student_vs: nn::VarStore,
    pub student: Student,
    /// Frozen copies; kept alive for `teachers`.
    _teacher_vs: (nn::VarStore, nn::VarStore),
    pub teachers: OnlineTeachers,
    pub optimizer: AdamW,
    pub schedule: WarmupCosine,
    step_cfg: StepConfig,
    weights: LossWeights,
    precision: Mode,
    /// Loss scaling for fp16 autocast.
    scaler: Option<LossScaler>,
    pub sources: (WeightsSource, WeightsSource),
}

impl Trainer {
    /// Builds student, teachers and optimizer for `spec` on `device`;
    /// `total_steps` sizes the cosine schedule.
    pub fn new(spec: &JobSpec, device: Device, total_steps: u64) -> Result<Self, TrainError> {
        let (student_vs, student, student_source) =
            build_student(&spec.model.student, None, device)?;
        let (mut teacher_vs, crop_teacher, _) = build_student(&spec.model.student, None, device)?;
        let (mut vfm_vs, vfm, vfm_source) = build_vfm(&spec.model.vfm, None, device)?;
        teacher_vs.freeze();
        vfm_vs.freeze();
        let mode = spec.model.student.decoupled.unwrap_or_default();
        let split = TrainableSplit::new(DecoupledTower::arch(&student), mode);
        let mut variables: Vec<(String, Tensor)> = student_vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut trained = Vec::new();
        for (name, tensor) in variables {
            match split.role(&name, tensor.dim()) {
                ParamRole::Frozen => {
                    let _ = tensor.set_requires_grad(false);
                }
                role => {
                    let rows = split.frozen_rows(&name);
                    trained.push((name, tensor, role == ParamRole::Decay, rows));
                }
            }
        }
        let count: i64 = trained.iter().map(|(_, t, _, _)| t.numel() as i64).sum();
        tracing::info!(
            "student: {student_source}; {count} trainable parameters in {} tensors",
            trained.len()
        );
        let train = &spec.train;
        let precision = Mode::resolve(train.precision, device).map_err(TrainError::Precision)?;
        Ok(Self {
            device,
            student_vs,
            student,
            _teacher_vs: (teacher_vs, vfm_vs),
            teachers: OnlineTeachers { crop_teacher, vfm },
            optimizer: AdamW::new(
                AdamWConfig {
                    betas: (train.betas[0], train.betas[1]),
                    eps: train.eps,
                    weight_decay: train.weight_decay,
                },
                trained,
            ),
            schedule: WarmupCosine {
                base_lr: train.lr,
                warmup_steps: train.warmup_steps,
                total_steps,
            },
            step_cfg: StepConfig {
                decoupled: DecoupledConfig {
                    mode,
                    scale: spec.model.student.attention_scale.unwrap_or(false),
                },
                context_resize: spec.loss.context_resize,
            },
            weights: LossWeights {
                content: spec.loss.content_weight,
                context: spec.loss.context_weight,
            },
            precision,
            scaler: (precision == Mode::Fp16).then(LossScaler::default),
            sources: (student_source, vfm_source),
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Affinity rows per image (VFM grid tokens) for `vfm_resolution`-pixel inputs.
    pub fn rows_per_image(&self, vfm_resolution: usize) -> i64 {
        let side = (vfm_resolution / self.teachers.vfm.arch().patch_size) as i64;
        side * side
    }

    /// The teachers' targets for a batch (online mode).
    pub fn online_targets(&self, batch: &Batch) -> Result<Targets, TrainError> {
        let crops = batch.crop_inputs.to_device(self.device);
        let vfm = batch.vfm_inputs.to_device(self.device);
        Ok(self.teachers.targets(&crops, &vfm)?)
    }

    /// Forward and backward of one micro-batch; gradients accumulate. Returns this
    /// micro-batch's (content, context) contributions to the global means.
    pub fn accumulate(
        &mut self,
        batch: &Batch,
        targets: &Targets,
        counts: GlobalCounts,
    ) -> Result<(f64, f64), TrainError> {
        let inputs = batch.student_inputs.to_device(self.device);
        let outputs = self
            .precision
            .run(|| step::forward(&self.student, self.step_cfg, &inputs, &batch.rois, targets))?;
        let content = &outputs.terms.content.sum / counts.crops.max(1) as f64;
        let context = &outputs.terms.context.sum / counts.rows.max(1) as f64;
        let loss = &content * self.weights.content + &context * self.weights.context;
        match &self.scaler {
            Some(scaler) => scaler.scale_loss(&loss).backward(),
            None => loss.to_kind(Kind::Float).backward(),
        }
        Ok((content.double_value(&[]), context.double_value(&[])))
    }

    /// One optimizer step over `micro_batches` (this trainer's share of the global
    /// batch) with their targets. `step` is the 0-based global optimizer step.
    pub fn train_step(
        &mut self,
        step: u64,
        micro_batches: &[(Batch, Targets)],
        counts: GlobalCounts,
    ) -> Result<StepReport, TrainError> {
        self.optimizer.zero_grad();
        let (mut content, mut context) = (0.0, 0.0);
        for (batch, targets) in micro_batches {
            let (c, x) = self.accumulate(batch, targets, counts)?;
            content += c;
            context += x;
        }
        if !(content.is_finite() && context.is_finite()) {
            return Err(TrainError::NonFinite {
                step,
                content,
                context,
            });
        }
        let lr = self.schedule.lr(step);
        let mut applied = true;
        if let Some(scaler) = &mut self.scaler {
            let mut grads: Vec<Tensor> = self
                .optimizer
                .params
                .iter()
                .map(|p| p.param.grad())
                .collect();
            applied = scaler.unscale(&mut grads);
            scaler.update(applied);
            if !applied {
                tracing::warn!(
                    "step {step}: fp16 gradients overflowed; update skipped, loss scale now {}",
                    scaler.scale
                );
            }
        }
        if applied {
            self.optimizer.step(lr);
        }
        Ok(StepReport {
            content,
            context,
            total: content * self.weights.content + context * self.weights.context,
            lr,
        })
    }

    /// The student's weights (every tensor, model names), CPU.
    pub fn student_tensors(&self) -> Vec<(String, Tensor)> {
        sorted_cpu(&self.student_vs)
    }

    /// The optimizer's moments as named tensors.
    pub fn optimizer_tensors(&self) -> Vec<(String, Tensor)> {
        self.optimizer
            .params
            .iter()
            .flat_map(|p| {
                [
                    (
                        format!("exp_avg.{}", p.name),
                        p.exp_avg.to_device(Device::Cpu),
                    ),
                    (
                        format!("exp_avg_sq.{}", p.name),
                        p.exp_avg_sq.to_device(Device::Cpu),
                    ),
                ]
            })
            .collect()
    }

    /// Restores student weights, optimizer moments and step from a checkpoint.
    pub fn restore(
        &mut self,
        state: &CheckpointState,
        student: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
    ) -> Result<(), TrainError> {
        let mut vars = self.student_vs.variables();
        let saved: std::collections::HashMap<&str, &Tensor> =
            student.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let moments: std::collections::HashMap<&str, &Tensor> =
            optimizer.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tch::no_grad(|| {
            for (name, var) in vars.iter_mut() {
                let src = saved
                    .get(name.as_str())
                    .ok_or_else(|| TrainError::Restore(format!("no student tensor {name}")))?;
                var.f_copy_(src)
                    .map_err(|e| TrainError::Restore(format!("{name}: {e}")))?;
            }
            for p in &mut self.optimizer.params {
                for (key, dst) in [
                    ("exp_avg", &mut p.exp_avg),
                    ("exp_avg_sq", &mut p.exp_avg_sq),
                ] {
                    let name = format!("{key}.{}", p.name);
                    let src = moments.get(name.as_str()).ok_or_else(|| {
                        TrainError::Restore(format!("no optimizer tensor {name}"))
                    })?;
                    dst.f_copy_(src)
                        .map_err(|e| TrainError::Restore(format!("{name}: {e}")))?;
                }
            }
            Ok::<_, TrainError>(())
        })?;
        self.optimizer.step = state.step;
        Ok(())
    }

    /// `alpha·student + (1−alpha)·original` in the original key layout.
    pub fn merged_export(&self, alpha: f64) -> Result<Vec<(String, Tensor)>, TrainError> {
        let original = sorted_cpu(&self._teacher_vs.0);
        Ok(export::merge(&self.student_tensors(), &original, alpha)?)
    }
}

fn sorted_cpu(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
