//! RoIAlign against `torchvision.ops.roi_align(aligned=True, sampling_ratio=-1,
//! output_size=1)`: values and gradients, on boxes inside, on the border, partly
//! and fully outside, sub-pixel and empty (fixture from tools/reference).

mod common;

use common::{assert_close, Fixture};
use tch::Kind;
use worker::distill::roi_align::roi_align;

/// RoIAlign's bound. Each output is the mean of bilinear samples (4 taps at each of
/// ≤ 12×15 sampling points on this map) with weights in [0, 1], in fp32: reassociation
/// errs by ≈ √K·u ≈ 2e-6 of the values' scale (K ≤ 720 taps, u = 2^-24) and by at most
/// K·u ≈ 4e-5 of Σ|taps|; the gradient scatters the same weights. Measured 1.0e-7
/// (values) and 9.7e-8 (gradients) on an Intel Xeon with AVX-512; a wrong sampling point
/// or a missing `aligned` half-pixel shift errs by ≥ 1e-2.
const TOL: f64 = 1e-5;

fn check(fx: &Fixture, prefix: &str, scale: f32) {
    let map = fx.get(&format!("{prefix}map")).set_requires_grad(true);
    let boxes = common::roi_boxes(&fx.get(&format!("{prefix}boxes")));
    let out = roi_align(&map, &boxes, scale);
    let expected = fx.get(&format!("{prefix}out")).flatten(1, 3);
    assert_close(&format!("{prefix}out"), &out, &expected, TOL);
    let upstream = fx.get(&format!("{prefix}upstream")).flatten(1, 3);
    (&out * upstream).sum(Kind::Float).backward();
    assert_close(
        &format!("{prefix}grad_map"),
        &map.grad(),
        &fx.get(&format!("{prefix}grad_map")),
        TOL,
    );
}

#[test]
fn values_and_gradients_match_torchvision_at_scale_1_and_a_quarter() {
    let fx = Fixture::open("roi_align");
    check(&fx, "", 1.0);
    check(&fx, "s025.", 0.25);
}
