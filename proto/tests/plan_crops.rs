//! The crop plan (docs/method.md §3): layouts, tiling, expected counts, box mappings and
//! the pinned contract.
//!
//! The written-out plans and the pinned hash were computed with an independent Python
//! transcription of the algorithm text in `proto/src/plan/{rng,crops}.rs` (Python floats
//! are IEEE doubles, `round` ties to even as PIL's crop does), then checked against
//! this crate: two implementations agree bit for bit.

use std::collections::HashSet;

use proptest::prelude::*;
use proto::plan::crops::{
    cell_box, CanvasMap, CropBox, CropError, CropPlan, ImageCrops, Layout, PixelBox,
    DEFAULT_MAX_CROPS, LAYOUTS, LAYOUT_COUNT,
};
use sha2::{Digest, Sha256};

const PLAN: CropPlan = CropPlan {
    seed: 0,
    max_crops: DEFAULT_MAX_CROPS,
};

#[test]
fn there_are_24_layouts_in_table_order() {
    assert_eq!(LAYOUT_COUNT, 24);
    let mut expected = Vec::new();
    for m in 1u32..=6 {
        for n in m.div_ceil(2)..=(2 * m).min(6) {
            expected.push(Layout { rows: m, cols: n });
        }
    }
    assert_eq!(LAYOUTS.to_vec(), expected);
    assert_eq!(LAYOUTS.iter().collect::<HashSet<_>>().len(), 24);
    // Spot checks of the bounds: 1x1, 1x2, 2x1..2x4, 6x3..6x6.
    assert_eq!(LAYOUTS[0], Layout { rows: 1, cols: 1 });
    assert_eq!(LAYOUTS[1], Layout { rows: 1, cols: 2 });
    assert_eq!(LAYOUTS[2], Layout { rows: 2, cols: 1 });
    assert_eq!(LAYOUTS[23], Layout { rows: 6, cols: 6 });
}

/// The spec's "361 distinct cells over all layouts": it is the total number of cells of the
/// 24 layouts (Σ m·n = 361), and also the number of *distinct* cells, because a cell's
/// relative size (1/n × 1/m) identifies its layout, so no two layouts share a cell.
/// Cells are compared as exact fractions of the image (j/n, i/m, (j+1)/n, (i+1)/m).
#[test]
fn there_are_361_distinct_cells() {
    let total: u32 = LAYOUTS.iter().map(|l| l.cells()).sum();
    assert_eq!(total, 361);
    // Fractions a/b stored reduced over the common denominator lcm(1..=6) = 60.
    let mut cells = HashSet::new();
    for l in LAYOUTS {
        for i in 0..l.rows {
            for j in 0..l.cols {
                let (fx, fy) = (60 / l.cols, 60 / l.rows);
                cells.insert((j * fx, i * fy, (j + 1) * fx, (i + 1) * fy));
            }
        }
    }
    assert_eq!(cells.len(), 361);
}

/// 13.0 crops per image in expectation, exactly: Σ_layouts min(m·n, 20) = 312 = 13 · 24.
#[test]
fn expected_crops_is_13_by_enumeration() {
    let kept: u32 = LAYOUTS.iter().map(|l| l.cells().min(20)).sum();
    assert_eq!(kept, 312);
    assert_eq!(f64::from(kept) / 24.0, 13.0);
}

/// Over 48,000 draws the mean is 13.0 within 0.1 (the per-draw standard deviation is
/// about 6.3, so the standard error is about 0.03).
#[test]
fn expected_crops_is_about_13_empirically() {
    let mut total = 0usize;
    let mut layouts = [0u32; 24];
    let draws = 48_000u64;
    for image_id in 0..draws {
        let plan = PLAN
            .draw((image_id % 6) as u32, image_id / 6, 640, 480)
            .expect("valid size");
        total += plan.crops.len();
        let k = LAYOUTS
            .iter()
            .position(|l| *l == plan.layout)
            .expect("a table layout");
        layouts[k] += 1;
    }
    let mean = total as f64 / draws as f64;
    assert!((mean - 13.0).abs() < 0.1, "mean {mean}");
    // Each layout about 2,000 times (binomial sd ≈ 44).
    for c in layouts {
        assert!((1_800..=2_200).contains(&c), "{layouts:?}");
    }
}

/// Before capping, the cells tile the image exactly: shared edges are bit-identical, the
/// outer edges are exactly 0 and w (h), and the areas sum to w·h.
#[test]
fn cells_tile_the_image() {
    for (w, h) in [(640, 427), (7, 5), (1, 1), (4000, 3), (333, 777)] {
        for l in LAYOUTS {
            let mut area = 0.0;
            for i in 0..l.rows {
                for j in 0..l.cols {
                    let b = cell_box(l, i, j, w, h);
                    assert!(b.x0 < b.x1 && b.y0 < b.y1);
                    area += b.area();
                    if j + 1 < l.cols {
                        assert_eq!(b.x1.to_bits(), cell_box(l, i, j + 1, w, h).x0.to_bits());
                    } else {
                        assert_eq!(b.x1, f64::from(w));
                    }
                    if i + 1 < l.rows {
                        assert_eq!(b.y1.to_bits(), cell_box(l, i + 1, j, w, h).y0.to_bits());
                    } else {
                        assert_eq!(b.y1, f64::from(h));
                    }
                    if j == 0 {
                        assert_eq!(b.x0, 0.0);
                    }
                    if i == 0 {
                        assert_eq!(b.y0, 0.0);
                    }
                }
            }
            let full = f64::from(w) * f64::from(h);
            assert!(
                (area - full).abs() <= full * 1e-12,
                "{l:?} {w}x{h}: {area} vs {full}"
            );
        }
    }
}

#[test]
fn uncapped_plan_keeps_every_cell_once() {
    let plan = CropPlan {
        seed: 3,
        max_crops: 36,
    };
    for image_id in 0..200 {
        let p = plan.draw(1, image_id, 640, 480).expect("valid size");
        assert_eq!(p.crops.len() as u32, p.layout.cells());
        let cells: HashSet<_> = p.crops.iter().map(|c| (c.row, c.col)).collect();
        assert_eq!(cells.len(), p.crops.len());
        let area: f64 = p.crops.iter().map(|c| c.bbox.area()).sum();
        assert!((area - 640.0 * 480.0).abs() < 1e-6);
    }
}

#[test]
fn zero_sized_image_is_refused() {
    assert_eq!(
        PLAN.draw(0, 1, 0, 10),
        Err(CropError::EmptySize {
            what: "image",
            w: 0,
            h: 10
        })
    );
    assert!(CanvasMap::new(10, 10, 0, 35).is_err());
    assert!(CanvasMap::new(10, 10, 560, 0).is_err());
    assert!(CropBox {
        x0: 0.0,
        y0: 0.0,
        x1: 1.0,
        y1: 1.0
    }
    .pixel_box(3, 0)
    .is_err());
}

/// Written-out plan: seed 0, epoch 0, COCO id 139 (640×427). Layout 3×5, all 15 cells,
/// in the drawn order.
#[test]
fn golden_plan_seed0_epoch0_image139() {
    let p = PLAN.draw(0, 139, 640, 427).expect("valid size");
    assert_eq!(p.layout, Layout { rows: 3, cols: 5 });
    let cells: Vec<(u32, u32)> = p.crops.iter().map(|c| (c.row, c.col)).collect();
    assert_eq!(
        cells,
        [
            (2, 3),
            (0, 0),
            (0, 3),
            (2, 2),
            (1, 0),
            (1, 2),
            (0, 4),
            (0, 1),
            (2, 0),
            (2, 1),
            (0, 2),
            (1, 4),
            (1, 1),
            (2, 4),
            (1, 3)
        ]
    );
    let first = p.crops[0].bbox;
    assert_eq!(
        first.to_array(),
        [384.0, 284.666_666_666_666_7, 512.0, 427.0]
    );
    assert_eq!(
        first.pixel_box(640, 427),
        Ok(PixelBox {
            x0: 384,
            y0: 285,
            x1: 512,
            y1: 427
        })
    );
    // y edge 142.333 rounds down, 284.667 up.
    assert_eq!(
        p.crops[4].bbox.pixel_box(640, 427),
        Ok(PixelBox {
            x0: 0,
            y0: 142,
            x1: 128,
            y1: 285
        })
    );
}

/// Written-out plan: seed 42, epoch 5, id 285 (500×375): a 2×3 layout. The y edge 187.5
/// is a tie and rounds to even (188); the x edges 166.67 and 333.33 round to 167 and 333.
#[test]
fn golden_plan_seed42_epoch5_image285() {
    let p = CropPlan {
        seed: 42,
        max_crops: 20,
    }
    .draw(5, 285, 500, 375)
    .expect("valid size");
    assert_eq!(p.layout, Layout { rows: 2, cols: 3 });
    let cells: Vec<(u32, u32)> = p.crops.iter().map(|c| (c.row, c.col)).collect();
    assert_eq!(cells, [(0, 1), (1, 2), (0, 0), (1, 1), (0, 2), (1, 0)]);
    let b = p.crops[0].bbox;
    assert_eq!(b.to_array(), [500.0 / 3.0, 0.0, 1000.0 / 3.0, 187.5]);
    let boxes = p.pixel_boxes().expect("valid size");
    let pixel: Vec<[u32; 4]> = boxes.iter().map(|b| [b.x0, b.y0, b.x1, b.y1]).collect();
    assert_eq!(
        pixel,
        [
            [167, 0, 333, 188],
            [333, 188, 500, 375],
            [0, 0, 167, 188],
            [167, 188, 333, 375],
            [333, 0, 500, 188],
            [0, 188, 167, 375]
        ]
    );
}

/// Written-out plan on a tiny 7×5 image (seed 7, epoch 2, id 9): a 6×3 layout whose
/// 0.83-pixel rows exercise the non-empty rule: row 2 spans y 1.667..2.5, which rounds to
/// 2..2 and is grown to 2..3.
#[test]
fn golden_plan_tiny_image() {
    let p = CropPlan {
        seed: 7,
        max_crops: 20,
    }
    .draw(2, 9, 7, 5)
    .expect("valid size");
    assert_eq!(p.layout, Layout { rows: 6, cols: 3 });
    let cells: Vec<(u32, u32)> = p.crops.iter().map(|c| (c.row, c.col)).collect();
    assert_eq!(
        cells,
        [
            (1, 1),
            (3, 2),
            (2, 1),
            (4, 0),
            (4, 1),
            (2, 0),
            (4, 2),
            (5, 2),
            (1, 0),
            (0, 1),
            (1, 2),
            (5, 0),
            (3, 0),
            (0, 2),
            (0, 0),
            (3, 1),
            (2, 2),
            (5, 1)
        ]
    );
    assert_eq!(
        p.crops[2].bbox.pixel_box(7, 5),
        Ok(PixelBox {
            x0: 2,
            y0: 2,
            x1: 5,
            y1: 3
        })
    );
    for b in p.pixel_boxes().expect("valid size") {
        assert!(b.width() >= 1 && b.height() >= 1 && b.x1 <= 7 && b.y1 <= 5);
    }
}

/// Canonical bytes of a plan for the pinned hash: little-endian integers, f64 as IEEE bits.
fn hash_plan(h: &mut Sha256, seed: u64, p: &ImageCrops) {
    h.update(seed.to_le_bytes());
    h.update(p.epoch.to_le_bytes());
    h.update(p.image_id.to_le_bytes());
    for v in [
        p.image_w,
        p.image_h,
        p.layout.rows,
        p.layout.cols,
        p.crops.len() as u32,
    ] {
        h.update(v.to_le_bytes());
    }
    for c in &p.crops {
        h.update(c.row.to_le_bytes());
        h.update(c.col.to_le_bytes());
        for v in c.bbox.to_array() {
            h.update(v.to_bits().to_le_bytes());
        }
        let px = c.bbox.pixel_box(p.image_w, p.image_h).expect("valid size");
        for v in [px.x0, px.y0, px.x1, px.y1] {
            h.update(v.to_le_bytes());
        }
    }
}

/// **This constant pins the crop-plan contract.** It is the SHA-256 of 9,000 plans (seeds
/// 0, 42 and 2⁶⁴−1; epochs 0..6; image ids 1..=500 with assorted sizes, some tiny): layout,
/// kept cells in order, every f64 box coordinate bit for bit, and the teacher's pixel boxes.
/// An independent Python implementation of the documented algorithm yields the same digest,
/// so the plan does not depend on this code's incidental choices. If it changes, every
/// cached crop embedding and every run resumed across the change sees different crops:
/// that is a breaking change, which must bump `proto::plan::PLAN_VERSION`.
const CROP_PLAN_HASH: &str = "251dcf7cefb9ef3abf9ab8971a70f78cd57f00895348c95110d16b804fa0d658";

#[test]
fn crop_plan_contract_is_pinned() {
    assert_eq!(proto::plan::PLAN_VERSION, 1);
    let mut h = Sha256::new();
    for seed in [0u64, 42, u64::MAX] {
        let plan = CropPlan {
            seed,
            max_crops: 20,
        };
        for epoch in 0u32..6 {
            for image_id in 1u64..=500 {
                let w = 1 + ((image_id * 7919) % 1000) as u32;
                let hh = 1 + ((image_id * 104_729) % 1000) as u32;
                let p = plan.draw(epoch, image_id, w, hh).expect("valid size");
                hash_plan(&mut h, seed, &p);
            }
        }
    }
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, CROP_PLAN_HASH);
}

#[test]
fn different_epochs_and_images_differ() {
    let base = PLAN.draw(0, 139, 640, 427).expect("valid size");
    let mut differ_epoch = 0;
    let mut differ_image = 0;
    for k in 1..=50u32 {
        let e = PLAN.draw(k, 139, 640, 427).expect("valid size");
        differ_epoch += usize::from(e.crops != base.crops);
        let i = PLAN
            .draw(0, 139 + u64::from(k), 640, 427)
            .expect("valid size");
        differ_image += usize::from(i.crops != base.crops);
    }
    // Two plans coincide only with the same layout and the same kept order (≥ 1/24 · 1/1),
    // so almost all of 50 differ; 1x1 layouts make a few collisions possible.
    assert!(differ_epoch >= 40, "{differ_epoch}");
    assert!(differ_image >= 40, "{differ_image}");
    let other_seed = CropPlan {
        seed: 1,
        max_crops: 20,
    }
    .draw(0, 139, 640, 427)
    .expect("valid size");
    assert_ne!(other_seed.crops, base.crops);
}

/// B recipe numbers: a 640×427 image on the 560 canvas (scale 0.875) and the 35×35 grid
/// (16 canvas pixels per patch).
#[test]
fn canvas_and_grid_mapping() {
    let map = CanvasMap::new(640, 427, 560, 35).expect("valid sizes");
    assert_eq!(map.scale, 0.875);
    assert_eq!(map.patches_per_pixel, 0.0625);
    let b = CropBox {
        x0: 128.0,
        y0: 0.0,
        x1: 640.0,
        y1: 427.0,
    };
    assert_eq!(map.canvas_box(b).to_array(), [112.0, 0.0, 560.0, 373.625]);
    assert_eq!(map.grid_box(b).to_array(), [7.0, 0.0, 35.0, 23.351_562_5]);
    // Portrait: the height is the longer side; the pad is on the right.
    let tall = CanvasMap::new(300, 600, 560, 35).expect("valid sizes");
    let whole = CropBox {
        x0: 0.0,
        y0: 0.0,
        x1: 300.0,
        y1: 600.0,
    };
    assert_eq!(tall.canvas_box(whole).to_array(), [0.0, 0.0, 280.0, 560.0]);
    assert_eq!(tall.grid_box(whole).to_array(), [0.0, 0.0, 17.5, 35.0]);
}

#[test]
fn serde_round_trip() {
    let p = PLAN.draw(3, 42, 640, 480).expect("valid size");
    let json = serde_json::to_string(&p).expect("serialise");
    let back: ImageCrops = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, p);
}

proptest! {
    /// Same inputs, same plan; the plan's invariants hold for any image and cap.
    #[test]
    fn draw_is_pure_and_well_formed(
        seed in any::<u64>(),
        epoch in any::<u32>(),
        image_id in any::<u64>(),
        w in 1u32..5000,
        h in 1u32..5000,
        max_crops in 0usize..40,
    ) {
        let plan = CropPlan { seed, max_crops };
        let p = plan.draw(epoch, image_id, w, h).expect("valid size");
        prop_assert_eq!(&p, &plan.draw(epoch, image_id, w, h).expect("valid size"));
        prop_assert!(LAYOUTS.contains(&p.layout));
        prop_assert_eq!(p.crops.len(), (p.layout.cells() as usize).min(max_crops));
        let distinct: HashSet<_> = p.crops.iter().map(|c| (c.row, c.col)).collect();
        prop_assert_eq!(distinct.len(), p.crops.len());
        for c in &p.crops {
            prop_assert!(c.row < p.layout.rows && c.col < p.layout.cols);
            prop_assert_eq!(c.bbox, cell_box(p.layout, c.row, c.col, w, h));
            let b = c.bbox;
            prop_assert!(0.0 <= b.x0 && b.x0 < b.x1 && b.x1 <= f64::from(w));
            prop_assert!(0.0 <= b.y0 && b.y0 < b.y1 && b.y1 <= f64::from(h));
            let px = b.pixel_box(w, h).expect("valid size");
            prop_assert!(px.x0 < px.x1 && px.x1 <= w && px.y0 < px.y1 && px.y1 <= h);
            // Rounding moves an edge by at most half a pixel, unless the side was grown.
            if px.width() > 1 {
                prop_assert!((f64::from(px.x0) - b.x0).abs() <= 0.5);
                prop_assert!((f64::from(px.x1) - b.x1).abs() <= 0.5);
            }
            let map = CanvasMap::new(w, h, 560, 35).expect("valid sizes");
            let g = map.grid_box(b);
            prop_assert!(g.x1 <= 35.0 + 1e-9 && g.y1 <= 35.0 + 1e-9);
        }
    }
}
