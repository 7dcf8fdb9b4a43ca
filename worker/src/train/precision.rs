//! Mixed precision (docs/method.md §5): fp32 on CPU; on GPU autocast with bf16 by
//! default, or fp16 with a dynamic loss scaler as the reference trains.

use proto::job::Precision;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn declip_set_cuda_autocast_bf16(bf16: i32);
    fn declip_cuda_autocast_is_bf16() -> i32;
}

/// What the forward runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fp32,
    /// CUDA autocast to bfloat16.
    Bf16,
    /// CUDA autocast to float16, loss scaled.
    Fp16,
}

impl Mode {
    /// The mode for `precision` on `device`; reduced precision needs a GPU.
    pub fn resolve(precision: Precision, device: Device) -> Result<Self, String> {
        let gpu = matches!(device, Device::Cuda(_));
        match (precision, gpu) {
            (Precision::Auto, true) | (Precision::Bf16, true) => Ok(Mode::Bf16),
            (Precision::Fp16, true) => Ok(Mode::Fp16),
            (Precision::Auto | Precision::Fp32, _) => Ok(Mode::Fp32),
            (other, false) => Err(format!(
                "train.precision = {other:?} needs a GPU; use fp32 or auto on {device:?}"
            )),
        }
    }

    /// Runs `f` under autocast for this mode.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        match self {
            Mode::Fp32 => f(),
            Mode::Bf16 | Mode::Fp16 => {
                // SAFETY: plain calls into libtorch's autocast state (thread-safe setters).
                unsafe { declip_set_cuda_autocast_bf16(i32::from(self == Mode::Bf16)) };
                tch::autocast(true, f)
            }
        }
    }
}

/// Whether CUDA autocast currently targets bfloat16 (for tests and logs).
pub fn cuda_autocast_is_bf16() -> bool {
    // SAFETY: a getter of libtorch's global autocast dtype.
    unsafe { declip_cuda_autocast_is_bf16() != 0 }
}

/// PyTorch's `GradScaler` policy: scale the loss, skip steps whose gradients
/// overflow and halve the scale; double it after `growth_interval` clean steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    clean_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            clean_steps: 0,
        }
    }
}

impl LossScaler {
    /// Divides every gradient by the scale; returns false if any is not finite
    /// (then the step must be skipped).
    pub fn unscale(&self, grads: &mut [Tensor]) -> bool {
        let mut finite = true;
        tch::no_grad(|| {
            for g in grads.iter_mut() {
                if !g.defined() {
                    continue;
                }
                let _ = g.g_div_scalar_(self.scale);
                let bad = g.isfinite().logical_not().any().int64_value(&[]) != 0;
                finite &= !bad;
            }
        });
        finite
    }

    /// Updates the scale after a step whose gradients were `finite`.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.clean_steps = 0;
        }
    }

    /// The loss to backpropagate.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss.to_kind(Kind::Float) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_precision_needs_a_gpu() {
        assert_eq!(Mode::resolve(Precision::Auto, Device::Cpu), Ok(Mode::Fp32));
        assert_eq!(
            Mode::resolve(Precision::Auto, Device::Cuda(0)),
            Ok(Mode::Bf16)
        );
        assert_eq!(
            Mode::resolve(Precision::Fp16, Device::Cuda(0)),
            Ok(Mode::Fp16)
        );
        assert!(Mode::resolve(Precision::Bf16, Device::Cpu).is_err());
    }

    #[test]
    fn the_shim_sets_the_cuda_autocast_dtype() {
        crate::runtime::init();
        let x = Mode::Bf16.run(|| 1);
        assert_eq!(x, 1);
        assert!(cuda_autocast_is_bf16());
        Mode::Fp16.run(|| ());
        assert!(!cuda_autocast_is_bf16());
    }

    #[test]
    fn overflowing_gradients_skip_the_step_and_halve_the_scale() {
        crate::runtime::init();
        let mut scaler = LossScaler {
            growth_interval: 2,
            ..LossScaler::default()
        };
        let mut grads = vec![Tensor::from_slice(&[65536.0f32, -131072.0])];
        assert!(scaler.unscale(&mut grads));
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), vec![1.0, -2.0]);
        scaler.update(true);
        scaler.update(true);
        assert_eq!(scaler.scale, 131072.0);
        let mut bad = vec![Tensor::from_slice(&[f32::INFINITY, 1.0])];
        assert!(!scaler.unscale(&mut bad));
        scaler.update(false);
        assert_eq!(scaler.scale, 65536.0);
    }
}
