//! AdamW over named parameters, with its state in plain tensors so checkpoints
//! can save and restore it exactly (tch's optimizers hide their moments).
//!
//! The update is PyTorch's single-tensor AdamW, op for op:
//! `p *= 1 − lr·wd; m.lerp_(g, 1 − β1); v = β2·v + (1 − β2)·g²;
//!  p −= lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + ε)`.
//! A schedule sets `lr` before every step: linear warm-up `base·(s+1)/warmup`, then
//! cosine to 0 (open_clip's `cosine_lr`, which the reference uses).

use tch::{Kind, Tensor};

use super::params::FrozenRows;

/// Hyperparameters (docs/method.md §5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// A parameter to train, as [`AdamW::new`] takes it.
#[derive(Debug)]
pub struct TrainedParam {
    pub name: String,
    /// The tensor (requires grad) the update writes into.
    pub param: Tensor,
    /// Whether weight decay applies to it.
    pub decay: bool,
    /// Rows of a fused tensor that must never change.
    pub frozen_rows: Option<FrozenRows>,
}

/// One trained parameter and its moments.
#[derive(Debug)]
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub decay: bool,
    pub frozen_rows: Option<FrozenRows>,
    /// First moment (same shape as the parameter, f32).
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Optimizer steps taken (PyTorch's per-parameter `step`, shared here).
    pub step: u64,
}

impl AdamW {
    /// AdamW over `params`, with zero moments.
    pub fn new(config: AdamWConfig, params: Vec<TrainedParam>) -> Self {
        let params = params
            .into_iter()
            .map(|p| ParamState {
                exp_avg: p.param.zeros_like(),
                exp_avg_sq: p.param.zeros_like(),
                name: p.name,
                param: p.param,
                decay: p.decay,
                frozen_rows: p.frozen_rows,
            })
            .collect();
        Self {
            config,
            params,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.param.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// One update with learning rate `lr` using the gradients in `.grad()`.
    /// Parameters without a gradient are left alone (PyTorch does the same).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = self.config.betas;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - b1.powi(t);
        let bias_correction2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.to_kind(Kind::Float);
                let before = p
                    .frozen_rows
                    .map(|rows| p.param.narrow(0, rows.start, rows.len).copy());
                let wd = if p.decay {
                    self.config.weight_decay
                } else {
                    0.0
                };
                if wd != 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = p.exp_avg.lerp_(&grad, 1.0 - b1);
                let _ = p.exp_avg_sq.g_mul_scalar_(b2);
                let _ = p.exp_avg_sq.addcmul_(&(&grad * (1.0 - b2)), &grad);
                let denom = (p.exp_avg_sq.sqrt() / bias_correction2_sqrt) + self.config.eps;
                let _ = p.param.addcdiv_(&(&p.exp_avg * -step_size), &denom);
                if let (Some(rows), Some(before)) = (p.frozen_rows, before) {
                    p.param.narrow(0, rows.start, rows.len).copy_(&before);
                }
            }
        });
    }
}

/// Linear warm-up then cosine decay to 0, evaluated at optimizer step `step` (0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl WarmupCosine {
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * self.base_lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_follows_a_cosine_to_zero() {
        let s = WarmupCosine {
            base_lr: 1.0,
            warmup_steps: 4,
            total_steps: 8,
        };
        let lrs: Vec<f64> = (0..=8).map(|i| s.lr(i)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0);
        assert!((lrs[6] - 0.5).abs() < 1e-12);
        assert!(lrs[8].abs() < 1e-12);
    }

    #[test]
    fn a_first_adamw_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        crate::runtime::init();
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            AdamWConfig {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            vec![TrainedParam {
                name: "w".into(),
                param: p.shallow_clone(),
                decay: false,
                frozen_rows: None,
            }],
        );
        (&p * Tensor::from_slice(&[3.0f32, -0.5]))
            .sum(Kind::Float)
            .backward();
        opt.step(0.1);
        // Bias-corrected first step: m̂/sqrt(v̂) = sign(g).
        let v: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn frozen_rows_of_a_fused_tensor_never_change() {
        crate::runtime::init();
        let p = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            AdamWConfig {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            vec![TrainedParam {
                name: "in_proj".into(),
                param: p.shallow_clone(),
                decay: true,
                frozen_rows: Some(FrozenRows { start: 1, len: 1 }),
            }],
        );
        p.sum(Kind::Float).backward();
        opt.step(0.1);
        let rows: Vec<Vec<f32>> = Vec::try_from(&p.detach()).unwrap();
        assert_eq!(rows[1], vec![1.0, 1.0]);
        assert_ne!(rows[0], vec![1.0, 1.0]);
    }
}
