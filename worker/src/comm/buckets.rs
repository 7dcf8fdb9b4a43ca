//! Gradient buckets: the trainable parameters' gradients laid out as views into a few
//! flat, contiguous f32 buffers, so a step all-reduces one buffer per bucket instead of
//! one tensor per parameter.
//!
//! Each parameter's `.grad` is set to its view (`csrc/grad.cpp`); autograd then
//! accumulates into the view in place, micro-batch after micro-batch, and the bucket
//! already holds the local gradient sum when backward ends: no copy in or out. Should
//! anything replace a `.grad` with a fresh tensor, [`GradBuckets::all_reduce`] notices
//! (the data pointer moved), copies it into the view and re-binds it.
//!
//! Parameters fill buckets in the order given (the optimizer's, sorted by name) up to
//! `cap_bytes` each; a parameter larger than the cap gets a bucket of its own.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::{Collective, CommError};

extern "C" {
    /// `param.mutable_grad() = grad` on two `torch::Tensor*`; 0 on success.
    fn declip_set_grad(param: *const c_void, grad: *const c_void) -> i32;
}

/// Default bucket size: PyTorch DDP's 25 MiB.
pub const DEFAULT_CAP_BYTES: usize = 25 << 20;

/// The element type gradients travel in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireDtype {
    /// Exact f32 sums.
    #[default]
    F32,
    /// Half the bytes: each bucket is cast to bf16, summed, cast back (NCCL only).
    Bf16,
}

#[derive(Debug)]
struct Member {
    param: Tensor,
    view: Tensor,
}

#[derive(Debug)]
struct Bucket {
    flat: Tensor,
    members: Vec<Member>,
}

/// The flat gradient buffers of a set of parameters (f32, on their device).
#[derive(Debug)]
pub struct GradBuckets {
    buckets: Vec<Bucket>,
    wire: WireDtype,
    /// Gradients found detached from their view and copied back in (should stay 0).
    pub rebinds: u64,
}

impl GradBuckets {
    /// Buckets for `params` (f32 leaves with `requires_grad`, one device), each at most
    /// `cap_bytes` unless a single parameter is larger. Existing gradients are kept.
    pub fn new(params: &[Tensor], cap_bytes: usize, wire: WireDtype) -> Result<Self, CommError> {
        let cap = (cap_bytes / 4).max(1) as i64;
        let mut groups: Vec<Vec<&Tensor>> = Vec::new();
        let mut filled = cap;
        for p in params {
            if p.kind() != Kind::Float {
                return Err(CommError::Unsupported(format!(
                    "gradient buckets hold f32 parameters, got {:?}",
                    p.kind()
                )));
            }
            let n = p.numel() as i64;
            if filled + n > cap {
                groups.push(Vec::new());
                filled = 0;
            }
            filled += n;
            if let Some(g) = groups.last_mut() {
                g.push(p);
            }
        }
        let buckets = groups
            .into_iter()
            .map(|g| Bucket::new(&g))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            buckets,
            wire,
            rebinds: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Bytes of f32 gradient held (what one all-reduce of all buckets moves per rank).
    pub fn bytes(&self) -> usize {
        self.buckets.iter().map(|b| b.flat.numel() * 4).sum()
    }

    /// The flat buffers (for tests and benchmarks).
    pub fn flats(&self) -> impl Iterator<Item = &Tensor> {
        self.buckets.iter().map(|b| &b.flat)
    }

    /// Sums every bucket over the ranks of `comm`, in place; afterwards each
    /// parameter's `.grad` holds the global gradient.
    pub fn all_reduce(&mut self, comm: &mut dyn Collective) -> Result<(), CommError> {
        for b in &mut self.buckets {
            self.rebinds += b.rebind()?;
            match self.wire {
                WireDtype::F32 => comm.all_reduce_sum(&mut b.flat)?,
                WireDtype::Bf16 => {
                    let mut wire = b.flat.to_kind(Kind::BFloat16);
                    comm.all_reduce_sum(&mut wire)?;
                    tch::no_grad(|| b.flat.copy_(&wire));
                }
            }
        }
        Ok(())
    }
}

impl Bucket {
    fn new(params: &[&Tensor]) -> Result<Self, CommError> {
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let mut members = Vec::with_capacity(params.len());
        let mut offset = 0;
        for p in params {
            let n = p.numel() as i64;
            let mut view = flat.narrow(0, offset, n).view(p.size().as_slice());
            offset += n;
            let old = p.grad();
            if old.defined() {
                tch::no_grad(|| view.copy_(&old));
            }
            set_grad(p, &view)?;
            members.push(Member {
                param: p.shallow_clone(),
                view,
            });
        }
        Ok(Self { flat, members })
    }

    /// Re-binds any gradient that is no longer our view; returns how many were.
    fn rebind(&mut self) -> Result<u64, CommError> {
        let mut moved = 0;
        for m in &mut self.members {
            let grad = m.param.grad();
            if grad.defined() && grad.data_ptr() == m.view.data_ptr() {
                continue;
            }
            if grad.defined() {
                tch::no_grad(|| m.view.copy_(&grad));
            } else {
                let _ = tch::no_grad(|| m.view.zero_());
            }
            set_grad(&m.param, &m.view)?;
            moved += 1;
        }
        Ok(moved)
    }
}

fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), CommError> {
    // SAFETY: both pointers are live `torch::Tensor`s owned by tch wrappers that
    // outlive the call; the shim catches libtorch exceptions.
    let rc = unsafe { declip_set_grad(param.as_ptr().cast(), grad.as_ptr().cast()) };
    if rc != 0 {
        return Err(CommError::Argument(format!(
            "cannot make a {:?} view the gradient of a {:?} parameter",
            grad.size(),
            param.size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn backward_accumulates_into_the_bucket_in_place() {
        crate::runtime::init();
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::ones([2, 3], opts).set_requires_grad(true);
        let b = Tensor::ones([5], opts).set_requires_grad(true);
        let c = Tensor::ones([4], opts).set_requires_grad(true);
        // 24-byte cap: a (6 floats) alone, then b and c share... no: b (5) + c (4) > 6.
        let buckets = GradBuckets::new(
            &[a.shallow_clone(), b.shallow_clone(), c.shallow_clone()],
            24,
            WireDtype::F32,
        )
        .unwrap();
        assert_eq!(buckets.len(), 3);
        let buckets = GradBuckets::new(
            &[a.shallow_clone(), b.shallow_clone(), c.shallow_clone()],
            48,
            WireDtype::F32,
        )
        .unwrap();
        assert_eq!(
            buckets.len(),
            2,
            "a+b (11 floats) fit in 12, c opens a second bucket"
        );
        for _ in 0..2 {
            ((&a * 2.0).sum(Kind::Float)
                + (&b * 3.0).sum(Kind::Float)
                + (&c * 4.0).sum(Kind::Float))
            .backward();
        }
        let flats: Vec<Vec<f32>> = buckets.flats().map(|f| Vec::try_from(f).unwrap()).collect();
        let mut want = vec![4.0f32; 6];
        want.extend([6.0f32; 5]);
        assert_eq!(flats[0], want, "two backwards summed in the bucket itself");
        assert_eq!(flats[1], vec![8.0f32; 4]);
        assert_eq!(
            a.grad().data_ptr(),
            buckets.flats().next().unwrap().data_ptr()
        );
    }
}
