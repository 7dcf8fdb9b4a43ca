//! Plain geometry shared by the data pipeline (which plans boxes) and distillation
//! (which pools features in them), so neither depends on the other.

/// A region on the image of batch entry `batch`, in the map's input coordinates
/// (multiplied by `spatial_scale` to reach map cells).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiBox {
    pub batch: usize,
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}
