//! The DeCLIP losses (docs/method.md §3–4), kept as sums and counts.
//!
//! A mean is `sum / count`; keeping the two apart lets a data-parallel step
//! divide by the *global* count (all valid crops, all affinity rows of every
//! rank) instead of averaging per-rank means. On one process both are the same.

use tch::{Kind, Tensor};

use crate::model::decoupled::affinity;
use crate::model::vit::Grid;

/// One loss: the sum of its per-item values and how many items were summed.
#[derive(Debug)]
pub struct LossSum {
    /// Scalar tensor (differentiable).
    pub sum: Tensor,
    pub count: i64,
}

impl LossSum {
    /// The mean over this process's items.
    pub fn mean(&self) -> Tensor {
        &self.sum / (self.count.max(1) as f64)
    }
}

/// Both loss parts of a batch.
#[derive(Debug)]
pub struct LossTerms {
    /// Σ over valid crops of 1 − cos(s_k, t_k).
    pub content: LossSum,
    /// Σ over affinity rows (b, m) of ‖T`[b,m,:]` − S`[b,m,:]`‖₂.
    pub context: LossSum,
}

/// Loss weights (method: content 1.0, context 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    pub content: f64,
    pub context: f64,
}

impl LossTerms {
    /// `w_content · L_content + w_context · L_context` with local means.
    pub fn total(&self, weights: LossWeights) -> Tensor {
        self.content.mean() * weights.content + self.context.mean() * weights.context
    }

    /// The same with means over `global` counts (data parallel: counts summed over ranks).
    pub fn total_with_counts(
        &self,
        weights: LossWeights,
        content_count: i64,
        context_count: i64,
    ) -> Tensor {
        &self.content.sum * (weights.content / content_count.max(1) as f64)
            + &self.context.sum * (weights.context / context_count.max(1) as f64)
    }
}

/// Content term: student region embeddings `[K,E]` against the crop teacher's
/// embeddings `[K,E]`, both L2-normalised; K counts only valid crops.
pub fn content_loss(student_regions: &Tensor, teacher_crops: &Tensor) -> LossSum {
    let k = student_regions.size()[0];
    let cos = (student_regions * teacher_crops.to_kind(student_regions.kind())).sum_dim_intlist(
        [-1i64].as_slice(),
        false,
        Kind::Float,
    );
    LossSum {
        sum: (cos.neg() + 1.0).sum(Kind::Float),
        count: k,
    }
}

/// Context term: teacher affinity T `[B,N,N]` (cosines of VFM tokens) against the
/// student's affinity S `[B,N,N]` of its context features.
pub fn context_loss(teacher_affinity: &Tensor, student_affinity: &Tensor) -> LossSum {
    let (b, n, _) = teacher_affinity.size3().expect("[B,N,N]");
    let rows =
        (teacher_affinity - student_affinity).norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    LossSum {
        sum: rows.sum(Kind::Float),
        count: b * n,
    }
}

/// Student context features `[B,N,C]` on `from` resized bilinearly to the VFM grid
/// `to` (docs/method.md §4; identity when the grids agree).
pub fn context_on_grid(context: &Tensor, from: Grid, to: Grid) -> Tensor {
    if from == to {
        return context.shallow_clone();
    }
    let (b, _, c) = context.size3().expect("[B,N,C]");
    let map = context
        .transpose(1, 2)
        .reshape([b, c, from.rows, from.cols]);
    map.upsample_bilinear2d([to.rows, to.cols], false, None, None)
        .reshape([b, c, to.tokens()])
        .transpose(1, 2)
}

/// Affinity of VFM patch features `[B,C,gh,gw]`: cosine similarity of all token pairs.
pub fn teacher_affinity(vfm_features: &Tensor) -> Tensor {
    affinity(&vfm_features.flatten(2, 3).transpose(1, 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn content_loss_is_one_minus_mean_cosine() {
        crate::runtime::init();
        let s = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([2, 2]);
        let t = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).reshape([2, 2]);
        let loss = content_loss(&s, &t);
        assert_eq!(loss.count, 2);
        assert_eq!(loss.mean().double_value(&[]), 0.5); // cos 1 and cos 0
    }

    #[test]
    fn context_loss_is_the_mean_of_row_norms_not_a_squared_error() {
        crate::runtime::init();
        let t = Tensor::zeros([1, 2, 2], (Kind::Float, Device::Cpu));
        let s = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0]).reshape([1, 2, 2]);
        let loss = context_loss(&t, &s);
        assert_eq!((loss.count, loss.mean().double_value(&[])), (2, 2.5)); // (5 + 0) / 2
    }

    #[test]
    fn global_counts_turn_local_sums_into_global_means() {
        crate::runtime::init();
        let terms = LossTerms {
            content: LossSum {
                sum: Tensor::from(3.0f32),
                count: 3,
            },
            context: LossSum {
                sum: Tensor::from(8.0f32),
                count: 4,
            },
        };
        let w = LossWeights {
            content: 1.0,
            context: 0.1,
        };
        assert!((terms.total(w).double_value(&[]) - 1.2).abs() < 1e-6);
        // Another rank holds 3 more crops and 4 more rows: the same sums weigh half.
        assert!((terms.total_with_counts(w, 6, 8).double_value(&[]) - 0.6).abs() < 1e-6);
    }
}
