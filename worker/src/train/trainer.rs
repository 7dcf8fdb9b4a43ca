//! One trainer's state and its optimizer step: the student being fine-tuned, the
//! frozen teachers (online mode only; in cache mode the student's original weights,
//! for exports), AdamW and the schedule.
//!
//! A step takes the micro-batches that make up this trainer's share of the global
//! batch and this trainer's item counts. With a [`Collective`] the counts and the loss
//! sums are all-reduced, so each loss term is a mean over the *global* batch however
//! it is split over ranks and micro-batches, and the gradients are summed over the
//! ranks in flat buckets before the optimizer step: every rank applies the same update
//! to the same weights.

use std::time::Instant;

use proto::job::{JobSpec, TeacherMode};
use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::CheckpointState;
use super::export::{self, ExportError};
use super::optimizer::{AdamW, AdamWConfig, TrainedParam, WarmupCosine};
use super::params::{ParamRole, TrainableSplit};
use super::precision::{LossScaler, Mode};
use crate::comm::buckets::{GradBuckets, WireDtype, DEFAULT_CAP_BYTES};
use crate::comm::{Collective, CommError};
use crate::data::sample::Batch;
use crate::distill::losses::LossWeights;
use crate::distill::step::{self, StepConfig, Targets};
use crate::model::decoupled::{DecoupledConfig, DecoupledTower};
use crate::model::towers::{build_student, Student};
use crate::model::weights::{sorted_cpu, WeightsError};
use crate::model::ModelError;
use crate::teacher::models::TeacherModels;
use crate::teacher::TeacherError;

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
    #[error(transparent)]
    Teacher(#[from] TeacherError),
    #[error("this trainer has no teachers: the job reads its targets from the teacher cache (teachers.mode = \"cache\")")]
    NoTeachers,
    #[error("collective: {0}")]
    Comm(#[from] CommError),
    #[error("weights diverged at step {step}: rank(s) {ranks:?} differ from rank 0")]
    Diverged { step: u64, ranks: Vec<usize> },
}

/// Loss values of one optimizer step (global-batch means) and where its time went.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    pub content: f64,
    pub context: f64,
    pub total: f64,
    pub lr: f64,
    /// Seconds in student forwards (all micro-batches), including the count all-reduce.
    pub forward_s: f64,
    /// Seconds in backwards.
    pub backward_s: f64,
    /// Seconds in the loss and gradient all-reduces (0 without a collective).
    pub all_reduce_s: f64,
    /// Seconds in unscaling and AdamW.
    pub optimizer_s: f64,
}

/// Item counts of a batch: valid crops, and affinity rows (images × tokens).
/// [`Trainer::train_step`] takes this rank's and sums them over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalCounts {
    pub crops: i64,
    pub rows: i64,
}

pub struct Trainer {
    device: Device,
    student_vs: nn::VarStore,
    pub student: Student,
    frozen: Frozen,
    /// The VFM's patch size (its token grid sets the context loss's rows).
    vfm_patch: usize,
    pub optimizer: AdamW,
    pub schedule: WarmupCosine,
    step_cfg: StepConfig,
    weights: LossWeights,
    precision: Mode,
    /// Loss scaling for fp16 autocast.
    scaler: Option<LossScaler>,
    /// Flat gradient buffers; made at the first step with a collective.
    buckets: Option<GradBuckets>,
    /// How gradients travel in the all-reduce.
    grad_wire: WireDtype,
}

/// What a trainer keeps frozen besides the student.
enum Frozen {
    /// Online mode: both teachers, run on every batch. The crop teacher is the
    /// student's original weights, which exports merge with.
    Teachers(Box<TeacherModels>),
    /// Cache mode (targets come from the teacher cache): only the student's original
    /// weights, sorted by name, on the CPU, for exports.
    Original(Vec<(String, Tensor)>),
}

/// Seconds per phase of one step, summed over micro-batches.
#[derive(Clone, Copy, Debug, Default)]
struct Timings {
    forward: f64,
    backward: f64,
    all_reduce: f64,
    optimizer: f64,
}

impl Trainer {
    /// Builds student, optimizer and (online mode) teachers for `spec` on `device`;
    /// `total_steps` sizes the cosine schedule.
    pub fn new(spec: &JobSpec, device: Device, total_steps: u64) -> Result<Self, TrainError> {
        let (student_vs, student, student_source) =
            build_student(&spec.model.student, None, device)?;
        let frozen = match spec.teachers.mode {
            TeacherMode::Online => Frozen::Teachers(Box::new(TeacherModels::new(spec, device)?)),
            // Before any step, the student's weights are the original ones.
            TeacherMode::Cache => Frozen::Original(sorted_cpu(&student_vs)),
        };
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
                role => trained.push(TrainedParam {
                    frozen_rows: split.frozen_rows(&name),
                    decay: role == ParamRole::Decay,
                    name,
                    param: tensor,
                }),
            }
        }
        let count: i64 = trained.iter().map(|p| p.param.numel() as i64).sum();
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
            frozen,
            vfm_patch: spec.model.vfm.arch().patch_size,
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
            buckets: None,
            grad_wire: WireDtype::F32,
        })
    }

    /// Sends gradients as bf16 in the all-reduce (half the bytes; NCCL only, and no
    /// longer bitwise equal to a world of one). Call before the first step.
    pub fn set_gradient_wire(&mut self, wire: WireDtype) {
        self.grad_wire = wire;
    }

    /// Waits for queued GPU work so that wall-clock phases mean something.
    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Affinity rows per image (VFM grid tokens) for `vfm_resolution`-pixel inputs.
    pub fn rows_per_image(&self, vfm_resolution: usize) -> i64 {
        let side = (vfm_resolution / self.vfm_patch) as i64;
        side * side
    }

    /// The teachers' targets for a batch (online mode; [`TrainError::NoTeachers`] in
    /// cache mode).
    pub fn online_targets(&self, batch: &Batch) -> Result<Targets, TrainError> {
        match &self.frozen {
            Frozen::Teachers(teachers) => {
                Ok(teachers.targets(&batch.crop_inputs, &batch.vfm_inputs)?)
            }
            Frozen::Original(_) => Err(TrainError::NoTeachers),
        }
    }

    /// Forward and backward of one micro-batch; gradients accumulate. Returns this
    /// micro-batch's (content, context) contributions to the global means.
    pub fn accumulate(
        &mut self,
        batch: &Batch,
        targets: &Targets,
        counts: GlobalCounts,
    ) -> Result<(f64, f64), TrainError> {
        let mut timings = Timings::default();
        self.accumulate_timed(batch, targets, counts, &mut timings)
    }

    fn accumulate_timed(
        &mut self,
        batch: &Batch,
        targets: &Targets,
        counts: GlobalCounts,
        timings: &mut Timings,
    ) -> Result<(f64, f64), TrainError> {
        let started = Instant::now();
        let inputs = batch.student_inputs.to_device(self.device);
        let outputs = self
            .precision
            .run(|| step::forward(&self.student, self.step_cfg, &inputs, &batch.rois, targets))?;
        let content = &outputs.terms.content.sum / counts.crops.max(1) as f64;
        let context = &outputs.terms.context.sum / counts.rows.max(1) as f64;
        let loss = &content * self.weights.content + &context * self.weights.context;
        let values = (content.double_value(&[]), context.double_value(&[]));
        let forward_done = Instant::now();
        timings.forward += (forward_done - started).as_secs_f64();
        match &self.scaler {
            Some(scaler) => scaler.scale_loss(&loss).backward(),
            None => loss.to_kind(Kind::Float).backward(),
        }
        self.sync();
        timings.backward += forward_done.elapsed().as_secs_f64();
        Ok(values)
    }

    /// One optimizer step over `micro_batches` (this trainer's share of the global
    /// batch) with their targets and this trainer's `counts`. `step` is the 0-based
    /// global optimizer step. With `comm`, counts, loss sums and gradients are summed
    /// over its ranks (every rank must call this with the same `step`); without, this
    /// trainer is the whole world.
    pub fn train_step(
        &mut self,
        step: u64,
        micro_batches: &[(Batch, Targets)],
        counts: GlobalCounts,
        mut comm: Option<&mut dyn Collective>,
    ) -> Result<StepReport, TrainError> {
        let mut timings = Timings::default();
        let started = Instant::now();
        let counts = match comm.as_deref_mut() {
            Some(c) => self.global_counts(c, counts)?,
            None => counts,
        };
        if comm.is_some() && self.buckets.is_none() {
            let params: Vec<Tensor> = self
                .optimizer
                .params
                .iter()
                .map(|p| p.param.shallow_clone())
                .collect();
            let buckets = GradBuckets::new(&params, DEFAULT_CAP_BYTES, self.grad_wire)?;
            tracing::info!(
                "gradients in {} bucket(s), {} bytes",
                buckets.len(),
                buckets.bytes()
            );
            self.buckets = Some(buckets);
        }
        timings.forward += started.elapsed().as_secs_f64();
        self.optimizer.zero_grad();
        let mut local = [0.0f64; 2];
        for (batch, targets) in micro_batches {
            let (c, x) = self.accumulate_timed(batch, targets, counts, &mut timings)?;
            local[0] += c;
            local[1] += x;
        }
        let reduce_started = Instant::now();
        let [content, context] = match comm.as_deref_mut() {
            Some(c) => self.sum_over_ranks(c, local)?,
            None => local,
        };
        // Every rank sees the same global losses, so all stop here together.
        if !(content.is_finite() && context.is_finite()) {
            return Err(TrainError::NonFinite {
                step,
                content,
                context,
            });
        }
        if let (Some(c), Some(buckets)) = (comm, self.buckets.as_mut()) {
            buckets.all_reduce(c)?;
        }
        self.sync();
        timings.all_reduce = reduce_started.elapsed().as_secs_f64();
        let optimizer_started = Instant::now();
        let lr = self.schedule.lr(step);
        self.apply_update(step, lr);
        self.sync();
        timings.optimizer = optimizer_started.elapsed().as_secs_f64();
        Ok(StepReport {
            content,
            context,
            total: content * self.weights.content + context * self.weights.context,
            lr,
            forward_s: timings.forward,
            backward_s: timings.backward,
            all_reduce_s: timings.all_reduce,
            optimizer_s: timings.optimizer,
        })
    }

    /// Unscales fp16 gradients (skipping the step on overflow) and steps AdamW.
    fn apply_update(&mut self, step: u64, lr: f64) {
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
    }

    /// This rank's counts summed over all ranks (exact: f64 holds integers to 2^53).
    fn global_counts(
        &self,
        comm: &mut dyn Collective,
        local: GlobalCounts,
    ) -> Result<GlobalCounts, TrainError> {
        let [crops, rows] = self.sum_over_ranks(comm, [local.crops as f64, local.rows as f64])?;
        Ok(GlobalCounts {
            crops: crops as i64,
            rows: rows as i64,
        })
    }

    fn sum_over_ranks(
        &self,
        comm: &mut dyn Collective,
        values: [f64; 2],
    ) -> Result<[f64; 2], TrainError> {
        let mut buf = Tensor::from_slice(&values).to_device(self.device);
        comm.all_reduce_sum(&mut buf)?;
        Ok([buf.double_value(&[0]), buf.double_value(&[1])])
    }

    /// Makes every rank's student weights, optimizer moments, step count and loss
    /// scale rank 0's. Call when a generation starts (after a restore on rank 0, or
    /// with the seeded initialisation everywhere).
    pub fn broadcast_weights(&mut self, comm: &mut dyn Collective) -> Result<(), TrainError> {
        let mut tensors: Vec<Tensor> = sorted_vars(&self.student_vs);
        for p in &self.optimizer.params {
            tensors.push(p.exp_avg.shallow_clone());
            tensors.push(p.exp_avg_sq.shallow_clone());
        }
        broadcast_tensors(comm, &tensors, self.device)?;
        let scale = self.scaler.as_ref().map_or(0.0, |s| s.scale);
        let mut scalars =
            Tensor::from_slice(&[self.optimizer.step as f64, scale]).to_device(self.device);
        comm.broadcast(&mut scalars, 0)?;
        self.optimizer.step = scalars.double_value(&[0]) as u64;
        if let Some(s) = &mut self.scaler {
            s.scale = scalars.double_value(&[1]);
        }
        Ok(())
    }

    /// Compares a cheap checksum of the trainable weights (per tensor: f64 sum and sum
    /// of squares, on the device) across ranks; `Diverged` names the ranks that differ
    /// from rank 0. Collective: every rank calls it at the same step.
    pub fn check_consistency(
        &mut self,
        comm: &mut dyn Collective,
        step: u64,
    ) -> Result<(), TrainError> {
        let local = tch::no_grad(|| {
            let parts: Vec<Tensor> = self
                .optimizer
                .params
                .iter()
                .flat_map(|p| {
                    let x = p.param.to_kind(Kind::Double);
                    [x.sum(Kind::Double), (&x * &x).sum(Kind::Double)]
                })
                .collect();
            Tensor::stack(&parts, 0)
        });
        let (world, rank) = (comm.world_size(), comm.rank());
        let width = local.size()[0];
        // Each rank fills its own row; the sum of rows, one of them non-zero per
        // row, is an exact all-gather.
        let mut table = Tensor::zeros([world as i64, width], (Kind::Double, self.device));
        tch::no_grad(|| table.get(rank as i64).copy_(&local));
        comm.all_reduce_sum(&mut table)?;
        let rows: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&table.to_device(Device::Cpu))
            .map_err(|e| TrainError::Restore(format!("checksum table: {e}")))?;
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let ranks: Vec<usize> = (1..world).filter(|&r| !same(&rows[r], &rows[0])).collect();
        if ranks.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Diverged { step, ranks })
        }
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
        let copied;
        let original: &[(String, Tensor)] = match &self.frozen {
            Frozen::Teachers(teachers) => {
                copied = teachers.original_student();
                &copied
            }
            Frozen::Original(original) => original,
        };
        Ok(export::merge(&self.student_tensors(), original, alpha)?)
    }
}

/// Every variable of `vs`, sorted by name (the same order on every rank).
fn sorted_vars(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().map(|(_, t)| t).collect()
}

/// Broadcasts `tensors` from rank 0 in flat f32 groups of at most 64 MiB.
fn broadcast_tensors(
    comm: &mut dyn Collective,
    tensors: &[Tensor],
    device: Device,
) -> Result<(), TrainError> {
    const GROUP: i64 = 16 << 20; // f32 elements
    let mut start = 0;
    while start < tensors.len() {
        let mut end = start;
        let mut n = 0;
        while end < tensors.len() && (end == start || n + tensors[end].numel() as i64 <= GROUP) {
            n += tensors[end].numel() as i64;
            end += 1;
        }
        let group = &tensors[start..end];
        let parts: Vec<Tensor> = group
            .iter()
            .map(|t| t.detach().to_kind(Kind::Float).reshape([-1]))
            .collect();
        let mut flat = Tensor::cat(&parts, 0).to_device(device).contiguous();
        comm.broadcast(&mut flat, 0)?;
        tch::no_grad(|| {
            let mut offset = 0;
            for t in group {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
        });
        start = end;
    }
    Ok(())
}
