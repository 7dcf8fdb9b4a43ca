//! RoIAlign with output 1×1, `aligned=true` and adaptive sampling
//! (`sampling_ratio=-1`), as `torchvision.ops.roi_align` computes it (docs/method.md
//! §3). libtorch has no RoIAlign; this builds it from a gather and an
//! index-add so autograd carries gradients to the feature map.
//!
//! Per box (coordinates × `spatial_scale`, shifted by −0.5): a grid of
//! ⌈h⌉ × ⌈w⌉ points at `y0 + (iy + 0.5)·h/⌈h⌉`, `x0 + (ix + 0.5)·w/⌈w⌉`, each
//! sampled bilinearly (zero outside [−1, size], clamped at the border), averaged.
//! The sampling positions are computed in f32 with torchvision's operation order,
//! so ⌈h⌉ and the weights agree with it exactly; only the summation order differs.

use tch::{Kind, Tensor};

pub use crate::geometry::RoiBox;

/// The gather plan of a set of boxes: for every bilinear tap, the flat cell index,
/// its weight (already divided by the box's point count) and the box it feeds.
#[derive(Debug, Default, PartialEq)]
struct Taps {
    cells: Vec<i64>,
    weights: Vec<f32>,
    boxes: Vec<i64>,
}

impl Taps {
    fn push(&mut self, cell: i64, weight: f32, roi: i64) {
        if weight != 0.0 {
            self.cells.push(cell);
            self.weights.push(weight);
            self.boxes.push(roi);
        }
    }
}

/// Region features `[K,C]` of `map` `[B,C,H,W]` for `boxes`, differentiable w.r.t. `map`.
pub fn roi_align(map: &Tensor, boxes: &[RoiBox], spatial_scale: f32) -> Tensor {
    let (b, c, h, w) = map.size4().expect("feature map [B,C,H,W]");
    let taps = plan_taps(boxes, spatial_scale, h, w);
    let device = map.device();
    let flat = map.permute([0, 2, 3, 1]).reshape([b * h * w, c]);
    let cells = Tensor::from_slice(&taps.cells).to_device(device);
    let weights = Tensor::from_slice(&taps.weights)
        .to_device(device)
        .to_kind(map.kind());
    let roi = Tensor::from_slice(&taps.boxes).to_device(device);
    let values = flat.index_select(0, &cells) * weights.unsqueeze(1);
    Tensor::zeros([boxes.len() as i64, c], (map.kind(), device)).index_add(0, &roi, &values)
}

fn plan_taps(boxes: &[RoiBox], spatial_scale: f32, height: i64, width: i64) -> Taps {
    let mut taps = Taps::default();
    let (hf, wf) = (height as f32, width as f32);
    for (k, roi) in boxes.iter().enumerate() {
        let base = roi.batch as i64 * height * width;
        // torchvision (aligned): start = x * scale - 0.5, size = end - start.
        let start_w = roi.x0 * spatial_scale - 0.5;
        let start_h = roi.y0 * spatial_scale - 0.5;
        let roi_w = (roi.x1 * spatial_scale - 0.5) - start_w;
        let roi_h = (roi.y1 * spatial_scale - 0.5) - start_h;
        // Adaptive sampling: ceil(size / pooled) points per bin; pooled = 1.
        let grid_h = roi_h.ceil().max(0.0) as i64;
        let grid_w = roi_w.ceil().max(0.0) as i64;
        let count = (grid_h * grid_w).max(1) as f32;
        for iy in 0..grid_h {
            let y = start_h + (iy as f32 + 0.5) * roi_h / grid_h as f32;
            for ix in 0..grid_w {
                let x = start_w + (ix as f32 + 0.5) * roi_w / grid_w as f32;
                if y < -1.0 || y > hf || x < -1.0 || x > wf {
                    continue;
                }
                let (y_low, y_high, ly) = corners(y, height);
                let (x_low, x_high, lx) = corners(x, width);
                let (hy, hx) = (1.0 - ly, 1.0 - lx);
                let k = k as i64;
                taps.push(base + y_low * width + x_low, hy * hx / count, k);
                taps.push(base + y_low * width + x_high, hy * lx / count, k);
                taps.push(base + y_high * width + x_low, ly * hx / count, k);
                taps.push(base + y_high * width + x_high, ly * lx / count, k);
            }
        }
    }
    taps
}

/// Bilinear neighbours of coordinate `v` on an axis of `size` cells: (low, high, frac).
fn corners(v: f32, size: i64) -> (i64, i64, f32) {
    let v = v.max(0.0);
    let low = v as i64;
    if low >= size - 1 {
        (size - 1, size - 1, 0.0)
    } else {
        (low, low + 1, v - low as f32)
    }
}

/// L2-normalised region features, as the content loss uses them.
pub fn roi_embeddings(map: &Tensor, boxes: &[RoiBox], spatial_scale: f32) -> Tensor {
    let features = roi_align(map, boxes, spatial_scale);
    let norm = features
        .to_kind(Kind::Float)
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true);
    features / norm.clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_box_covering_one_cell_centre_reads_that_cell() {
        crate::runtime::init();
        // 1x1 box centred on cell (row 1, col 2): one sample at the cell centre.
        let map = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([1, 1, 3, 4]);
        let roi = RoiBox {
            batch: 0,
            x0: 2.0,
            y0: 1.0,
            x1: 3.0,
            y1: 2.0,
        };
        let out = roi_align(&map, &[roi], 1.0);
        assert_eq!(out.double_value(&[0, 0]), 6.0);
    }

    #[test]
    fn boxes_far_outside_the_map_give_zero_and_zero_size_boxes_give_zero() {
        crate::runtime::init();
        let map = Tensor::ones([1, 2, 4, 4], (Kind::Float, Device::Cpu));
        let outside = RoiBox {
            batch: 0,
            x0: 10.0,
            y0: 10.0,
            x1: 12.0,
            y1: 12.0,
        };
        let empty = RoiBox {
            batch: 0,
            x0: 1.0,
            y0: 1.0,
            x1: 1.0,
            y1: 3.0,
        };
        let out = roi_align(&map, &[outside, empty], 1.0);
        assert_eq!(out.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
