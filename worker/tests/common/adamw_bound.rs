//! How far apart two AdamW trajectories can end when they start from the same weights
//! and moments and each step's gradients differ by at most a known tolerance (float
//! reassociation: another CPU's kernels, another summation order, another library).
//!
//! A relative bound on the weights is the wrong measure for that: AdamW normalises each
//! element's gradient by its own history, `u = m̂/(√v̂ + ε)`, so an element whose gradient
//! is within a few ε of zero moves by up to ~lr whatever rounding did to it, while an
//! element with a large gradient barely reacts. The bound below follows each element.
//!
//! Derivation (all per element; step τ counts from 1; `c1 = 1−β1^τ`, `c2 = 1−β2^τ`):
//! `m̂ = Σ_j a_j g_j` and `v̂ = Σ_j b_j g_j²` with `a_j = (1−β1)β1^(τ−j)/c1`,
//! `b_j = (1−β2)β2^(τ−j)/c2` (moments from before the recorded steps are identical in
//! both runs and enter `v̂` as a constant). Cauchy–Schwarz gives `|m̂| ≤ R_τ·√v̂` with
//! `R_τ² = Σ_j a_j²/b_j`, so `|u| ≤ R_τ` and two updates differ by at most `2·lr·R_τ`.
//! Differentiating, `∂u/∂g_j = a_j/(√v̂+ε) − m̂·b_j·g_j/(√v̂·(√v̂+ε)²)`, and since
//! `b_j g_j² ≤ v̂`, `|∂u/∂g_j| ≤ (a_j + R_τ·√b_j)/(√v̂+ε)`. Between the two gradient
//! histories (each `g_j` within `Δ_j` of the recorded one) `v̂` is at least
//! `v̂_lo = v̂_prior + Σ_j b_j·max(|g_j|−Δ_j, 0)²`, so by the mean value theorem
//! `|Δu_τ| ≤ min(2R_τ, Σ_j (a_j + R_τ√b_j)·Δ_j/(√v̂_lo+ε))`. The weight update
//! `w ← w·(1−lr·wd) − lr·u` then gives `|Δw_τ| ≤ |Δw_(τ−1)| + lr_τ·|Δu_τ|`, plus each
//! run's own fp32 rounding of the update (two roundings of |w| and at most five of
//! `lr·u` per step, 2^-24 each, for each of the two runs).

use tch::{Kind, Tensor};

/// AdamW's hyperparameters as the bound needs them.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One recorded optimizer step: its learning rate, one run's gradient of every
/// parameter, and how far the other run's gradient may be from it (absolute, per
/// parameter tensor).
pub struct RecordedStep {
    pub lr: f64,
    pub grads: Vec<Tensor>,
    pub tolerance: Vec<f64>,
}

/// Per-element bounds on |w_a − w_b| after the recorded steps.
pub struct WeightBounds {
    /// One tensor per parameter, shaped like it.
    pub bounds: Vec<Tensor>,
    /// Elements whose bound is the optimizer's cap `2·lr·R` at some step (gradients
    /// too close to zero for their sign to survive rounding): the test is blind there.
    pub capped: i64,
    pub elements: i64,
}

/// fp32 unit roundoff.
const UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

impl AdamW {
    /// `R_τ`: the largest `|m̂|/√v̂` any gradient history allows at step `tau`.
    pub fn update_cap(&self, tau: u64) -> f64 {
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(tau as i32);
        let c2 = 1.0 - b2.powi(tau as i32);
        let ratio = b1 * b1 / b2;
        let geometric: f64 = (0..tau).map(|k| ratio.powi(k as i32)).sum();
        (1.0 - b1) / c1 * (c2 / (1.0 - b2)).sqrt() * geometric.sqrt()
    }

    /// Bounds after `steps`, taken as optimizer steps `prior_steps + 1 ..`, starting from
    /// weights `start` (one run's) and second moments `prior_v` (equal in both runs;
    /// zeros for a fresh optimizer).
    pub fn weight_bounds(
        &self,
        prior_steps: u64,
        prior_v: &[Tensor],
        start: &[Tensor],
        steps: &[RecordedStep],
    ) -> WeightBounds {
        let (b1, b2) = (self.beta1, self.beta2);
        let double = |t: &Tensor| t.to_kind(Kind::Double);
        let mut bounds: Vec<Tensor> = start.iter().map(|w| double(w).zeros_like()).collect();
        let mut capped_mask: Vec<Tensor> = start
            .iter()
            .map(|w| w.zeros_like().to_kind(Kind::Bool))
            .collect();
        for (k, step) in steps.iter().enumerate() {
            let tau = prior_steps + k as u64 + 1;
            let c1 = 1.0 - b1.powi(tau as i32);
            let c2 = 1.0 - b2.powi(tau as i32);
            let cap = self.update_cap(tau);
            for (p, w) in start.iter().enumerate() {
                let mut v_lo = double(&prior_v[p]) * (b2.powi((tau - prior_steps) as i32) / c2);
                let mut sensitivity = double(w).zeros_like();
                for (j, earlier) in steps[..=k].iter().enumerate() {
                    let age = (k - j) as i32;
                    let a = (1.0 - b1) * b1.powi(age) / c1;
                    let b = (1.0 - b2) * b2.powi(age) / c2;
                    let tol = earlier.tolerance[p];
                    let g_lo = (double(&earlier.grads[p]).abs() - tol).clamp_min(0.0);
                    v_lo += g_lo.square() * b;
                    sensitivity += (a + cap * b.sqrt()) * tol;
                }
                let derived = sensitivity / (v_lo.sqrt() + self.eps);
                let at_cap = derived.ge(2.0 * cap);
                let delta_u = derived.clamp_max(2.0 * cap);
                // |w| may have grown by at most lr·R per step since `start`.
                let moved: f64 = steps[..=k].iter().map(|s| s.lr * 2.0 * cap).sum();
                let rounding =
                    ((double(w).abs() + moved) * 2.0 + 5.0 * step.lr * cap) * (2.0 * UNIT_ROUNDOFF);
                bounds[p] = &bounds[p] + delta_u * step.lr + rounding;
                capped_mask[p] = capped_mask[p].logical_or(&at_cap);
            }
        }
        let capped = capped_mask
            .iter()
            .map(|m| m.sum(Kind::Int64).int64_value(&[]))
            .sum();
        let elements = start.iter().map(|w| w.numel() as i64).sum();
        WeightBounds {
            bounds,
            capped,
            elements,
        }
    }
}

impl WeightBounds {
    /// The largest `|a − b| / bound` over every element (≤ 1 when the runs agree), and the
    /// parameter index where it is.
    pub fn worst_ratio(&self, a: &[Tensor], b: &[Tensor]) -> (f64, usize) {
        let mut worst = (0.0, 0);
        for (p, bound) in self.bounds.iter().enumerate() {
            let diff = (a[p].to_kind(Kind::Double) - b[p].to_kind(Kind::Double)).abs();
            let ratio = (diff / bound).max().double_value(&[]);
            if ratio > worst.0 {
                worst = (ratio, p);
            }
        }
        worst
    }
}
