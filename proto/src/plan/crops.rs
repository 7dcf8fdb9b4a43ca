//! The crop plan (docs/method.md §3): which crops of an image the content loss uses in
//! an epoch.
//!
//! For each `(seed, epoch, image id)` one of the 24 [`LAYOUTS`] is picked uniformly;
//! its cells tile the whole image; the cells are shuffled and at most `max_crops` are
//! kept. The crop teacher (cutting crops from the original image) and the trainer
//! (RoIAlign on the student's content map) must agree on every box, so the draw is a
//! pure function of those inputs and of [`super::rng`], and the box arithmetic below is
//! specified to the floating-point operation.
//!
//! # The draw, exactly
//! 1. `rng = PlanRng::new(seed, Purpose::CropPlan, epoch, image_id)`.
//! 2. `layout = LAYOUTS[rng.below(24)]` (the table order: rows ascending, then columns).
//! 3. `cells = [0, 1, .., rows·cols)` (row-major: cell `c` is row `c / cols`,
//!    column `c % cols`); `rng.shuffle(cells)`; keep the first `min(rows·cols, max_crops)`,
//!    in shuffled order.
//! 4. Cell (row `i`, column `j`) of a `w × h` image is the box
//!    `[w·j/n, h·i/m, w·(j+1)/n, h·(i+1)/m]` in original pixels, each coordinate computed
//!    in `f64` as `(w as f64 * k as f64) / d as f64`: the product is exact (integers far
//!    below 2⁵³) and the one division is correctly rounded, so every IEEE-754 machine gets
//!    the same bits, neighbouring cells share their edge exactly, and the outer edges are
//!    exactly `0` and `w` (or `h`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::rng::{PlanRng, Purpose};

/// A crop layout: the image is cut into `rows × cols` equal cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// `m`: cells stacked vertically (1..=6).
    pub rows: u32,
    /// `n`: cells side by side (⌈m/2⌉..=min(2m, 6)).
    pub cols: u32,
}

impl Layout {
    /// Number of cells (`rows · cols`).
    pub const fn cells(self) -> u32 {
        self.rows * self.cols
    }
}

const fn layout_table() -> [Layout; LAYOUT_COUNT] {
    let mut out = [Layout { rows: 0, cols: 0 }; LAYOUT_COUNT];
    let mut k = 0;
    let mut m: u32 = 1;
    while m <= 6 {
        let mut n = m.div_ceil(2);
        let last = if 2 * m < 6 { 2 * m } else { 6 };
        while n <= last {
            out[k] = Layout { rows: m, cols: n };
            k += 1;
            n += 1;
        }
        m += 1;
    }
    // A wrong LAYOUT_COUNT fails to compile (index out of bounds in const eval) or here.
    assert!(k == LAYOUT_COUNT);
    out
}

/// How many layouts there are.
pub const LAYOUT_COUNT: usize = 24;

/// The 24 layouts `m × n` with `m ∈ 1..=6`, `n ∈ ⌈m/2⌉..=min(2m, 6)`, ordered by rows
/// then columns. The order is part of the contract: the draw indexes this table.
pub const LAYOUTS: [Layout; LAYOUT_COUNT] = layout_table();

/// The method's cap on crops per image (`data.max_crops` default).
pub const DEFAULT_MAX_CROPS: usize = 20;

/// Errors from the crop plan and its box mappings.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CropError {
    /// An image (or canvas, or grid) side of 0 pixels has nothing to crop or map.
    #[error("{what} has an empty side: {w}x{h}")]
    EmptySize {
        /// Which size was empty ("image", "canvas", "feature grid").
        what: &'static str,
        w: u32,
        h: u32,
    },
}

fn non_empty(what: &'static str, w: u32, h: u32) -> Result<(), CropError> {
    if w == 0 || h == 0 {
        Err(CropError::EmptySize { what, w, h })
    } else {
        Ok(())
    }
}

/// An axis-aligned box `[x0, y0, x1, y1]` with `x0 ≤ x1`, `y0 ≤ y1`, in continuous
/// coordinates whose unit depends on the frame: original image pixels for plan boxes,
/// canvas pixels after [`CanvasMap::canvas_box`], patches after [`CanvasMap::grid_box`].
/// Pixel `(px, py)` covers `[px, px+1) × [py, py+1)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl CropBox {
    /// `[x0, y0, x1, y1]`.
    pub const fn to_array(self) -> [f64; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }

    /// Width × height, in the box's unit squared.
    pub fn area(self) -> f64 {
        (self.x1 - self.x0) * (self.y1 - self.y0)
    }

    /// Every coordinate multiplied by `s` (one multiplication per coordinate).
    pub fn scaled(self, s: f64) -> CropBox {
        CropBox {
            x0: self.x0 * s,
            y0: self.y0 * s,
            x1: self.x1 * s,
            y1: self.y1 * s,
        }
    }

    /// The whole-pixel box the crop teacher cuts from a `image_w × image_h` image.
    ///
    /// Each coordinate is rounded half-to-even, as PIL's `Image.crop` does
    /// (`map(int, map(round, box))`, and Python's `round` ties to even), so it matches the
    /// reference's crops. Then it is clamped to the image, and a side that rounded to zero
    /// length (possible only for a side of at most 1 pixel, e.g. `[1.5, 2.5]` → `[2, 2]`)
    /// is grown to one pixel, rightwards/downwards unless that leaves the image, so every
    /// crop has at least one pixel (PIL would return an empty image). For plan cells,
    /// clamping never changes anything (they lie inside the image), and growing can only
    /// happen on images at most 6 pixels wide or high.
    pub fn pixel_box(self, image_w: u32, image_h: u32) -> Result<PixelBox, CropError> {
        non_empty("image", image_w, image_h)?;
        let (x0, x1) = pixel_span(self.x0, self.x1, image_w);
        let (y0, y1) = pixel_span(self.y0, self.y1, image_h);
        Ok(PixelBox { x0, y0, x1, y1 })
    }
}

/// Round half-to-even and clamp into `[0, limit]`; NaN goes to 0.
fn pixel_edge(v: f64, limit: u32) -> u32 {
    let r = v.round_ties_even();
    if r >= f64::from(limit) {
        limit
    } else if r > 0.0 {
        // 0 < r < limit <= u32::MAX and r is integral: the cast is exact.
        r as u32
    } else {
        0 // also NaN
    }
}

/// A non-empty `[lo, hi)` within `[0, limit]` (`limit >= 1`).
fn pixel_span(a: f64, b: f64, limit: u32) -> (u32, u32) {
    let (lo, hi) = (pixel_edge(a, limit), pixel_edge(b, limit));
    if hi > lo {
        (lo, hi)
    } else if lo < limit {
        (lo, lo + 1)
    } else {
        (limit - 1, limit)
    }
}

/// A crop box in whole pixels of the original image: columns `x0..x1`, rows `y0..y1`
/// (half-open, non-empty, inside the image). This is the box passed to PIL's `crop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PixelBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl PixelBox {
    /// Width in pixels (≥ 1).
    pub const fn width(self) -> u32 {
        self.x1 - self.x0
    }

    /// Height in pixels (≥ 1).
    pub const fn height(self) -> u32 {
        self.y1 - self.y0
    }
}

/// One kept cell of an image's layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Crop {
    /// Row `i` of the layout (0-based, top to bottom).
    pub row: u32,
    /// Column `j` of the layout (0-based, left to right).
    pub col: u32,
    /// The cell in original image pixels, unrounded.
    pub bbox: CropBox,
}

/// The crop plan of one image in one epoch.
///
/// Invariants: `crops.len() == min(layout.cells(), max_crops)`; the crops are distinct
/// cells of `layout`, in the shuffled order the draw produced (the order of the crop
/// teacher's outputs and of the student's RoIs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCrops {
    pub epoch: u32,
    pub image_id: u64,
    /// Original image width in pixels.
    pub image_w: u32,
    /// Original image height in pixels.
    pub image_h: u32,
    pub layout: Layout,
    pub crops: Vec<Crop>,
}

impl ImageCrops {
    /// The teachers' whole-pixel boxes, in crop order.
    pub fn pixel_boxes(&self) -> Result<Vec<PixelBox>, CropError> {
        self.crops
            .iter()
            .map(|c| c.bbox.pixel_box(self.image_w, self.image_h))
            .collect()
    }
}

/// Cell `(row, col)` of `layout` on a `w × h` image, in original pixels (module doc, step 4).
pub fn cell_box(layout: Layout, row: u32, col: u32, image_w: u32, image_h: u32) -> CropBox {
    let edge = |size: u32, k: u32, d: u32| (f64::from(size) * f64::from(k)) / f64::from(d);
    CropBox {
        x0: edge(image_w, col, layout.cols),
        y0: edge(image_h, row, layout.rows),
        x1: edge(image_w, col + 1, layout.cols),
        y1: edge(image_h, row + 1, layout.rows),
    }
}

/// The crop plan of a job: its seed and cap. Draws are pure functions of
/// `(seed, max_crops, epoch, image id, image size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropPlan {
    /// `job.seed`.
    pub seed: u64,
    /// `data.max_crops` (method: 20). 0 keeps no crop.
    pub max_crops: usize,
}

impl CropPlan {
    /// The plan of image `image_id` (its COCO id, not its index) of size
    /// `image_w × image_h` original pixels, in epoch `epoch`.
    pub fn draw(
        &self,
        epoch: u32,
        image_id: u64,
        image_w: u32,
        image_h: u32,
    ) -> Result<ImageCrops, CropError> {
        non_empty("image", image_w, image_h)?;
        let mut rng = PlanRng::new(self.seed, Purpose::CropPlan, u64::from(epoch), image_id);
        // LAYOUT_COUNT (24) fits u64, and below() returns < 24: both casts are exact.
        let layout = LAYOUTS[rng.below(LAYOUT_COUNT as u64) as usize];
        let mut cells: Vec<u32> = (0..layout.cells()).collect();
        rng.shuffle(&mut cells);
        cells.truncate(self.max_crops);
        let crops = cells
            .into_iter()
            .map(|c| {
                let (row, col) = (c / layout.cols, c % layout.cols);
                Crop {
                    row,
                    col,
                    bbox: cell_box(layout, row, col, image_w, image_h),
                }
            })
            .collect();
        Ok(ImageCrops {
            epoch,
            image_id,
            image_w,
            image_h,
            layout,
            crops,
        })
    }
}

/// Maps plan boxes (original pixels) into the student's padded canvas and onto its
/// feature grid.
///
/// The student image is the original resized so its longer side is `canvas` pixels,
/// padded right and bottom to `canvas × canvas` (docs/method.md §2). So a point maps by
/// one scale, `scale = canvas / max(w, h)` (canvas pixels per image pixel), with no
/// offset; the feature grid (`grid × grid` patches over the canvas) is a further
/// `grid / canvas` patches per canvas pixel. The student's RoI boxes keep these
/// unrounded values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CanvasMap {
    /// Canvas pixels per original pixel: `canvas as f64 / max(w, h) as f64`.
    pub scale: f64,
    /// Patches per canvas pixel: `grid as f64 / canvas as f64`.
    pub patches_per_pixel: f64,
}

impl CanvasMap {
    /// The map for an `image_w × image_h` image on a `canvas`-pixel student canvas with a
    /// `grid × grid` feature map (B recipe: canvas 560, grid 35).
    pub fn new(image_w: u32, image_h: u32, canvas: u32, grid: u32) -> Result<Self, CropError> {
        non_empty("image", image_w, image_h)?;
        non_empty("canvas", canvas, canvas)?;
        non_empty("feature grid", grid, grid)?;
        Ok(Self {
            scale: f64::from(canvas) / f64::from(image_w.max(image_h)),
            patches_per_pixel: f64::from(grid) / f64::from(canvas),
        })
    }

    /// The box in canvas pixels: each coordinate `× scale`.
    pub fn canvas_box(&self, b: CropBox) -> CropBox {
        b.scaled(self.scale)
    }

    /// The box in feature-grid units (patches; patch `k` spans `[k, k+1)`):
    /// each coordinate `× scale`, then `× patches_per_pixel` (two roundings, in that order).
    pub fn grid_box(&self, b: CropBox) -> CropBox {
        self.canvas_box(b).scaled(self.patches_per_pixel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_span_never_empty() {
        assert_eq!(pixel_span(1.5, 2.5, 9), (2, 3));
        assert_eq!(pixel_span(0.1, 0.2, 1), (0, 1));
        assert_eq!(pixel_span(0.9, 1.0, 1), (0, 1));
        assert_eq!(pixel_span(f64::NAN, f64::NAN, 4), (0, 1));
        assert_eq!(pixel_span(-3.0, 100.0, 4), (0, 4));
    }
}
