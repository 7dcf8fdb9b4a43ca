//! Deterministic synthetic photos for training without a dataset (demo, tests):
//! image `id` of seed `seed` always has the same size and pixels. Sizes and
//! aspect ratios vary (landscape and portrait), content is smooth gradients with
//! a few solid shapes, so crops differ in colour and layout and the teachers'
//! targets carry signal.

use proto::plan::rng::{PlanRng, Purpose};

use super::image::RgbImage;

/// Smallest and largest side of a synthetic image, in pixels.
pub const SIDES: (u32, u32) = (96, 320);

/// The synthetic image `id` of `seed`.
pub fn image(seed: u64, id: u64) -> RgbImage {
    let mut rng = PlanRng::new(seed, Purpose::SyntheticImage, 0, id);
    let mut side = || SIDES.0 + rng.below(u64::from(SIDES.1 - SIDES.0 + 1)) as u32;
    let (width, height) = (side(), side());
    let mut draw = || rng.below(256) as f32;
    let corner = [[draw(), draw(), draw()], [draw(), draw(), draw()]];
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    for y in 0..height {
        for x in 0..width {
            let t = (x + y) as f32 / (width + height) as f32;
            let i = ((y * width + x) * 3) as usize;
            for c in 0..3 {
                pixels[i + c] = (corner[0][c] * (1.0 - t) + corner[1][c] * t) as u8;
            }
        }
    }
    let shapes = 2 + rng.below(4);
    for _ in 0..shapes {
        let (w, h) = (u64::from(width), u64::from(height));
        let x0 = rng.below(w) as u32;
        let y0 = rng.below(h) as u32;
        let x1 = (x0 + 8 + rng.below(w / 2) as u32).min(width);
        let y1 = (y0 + 8 + rng.below(h / 2) as u32).min(height);
        let colour = [
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ];
        let ellipse = rng.below(2) == 1;
        let (cx, cy) = ((x0 + x1) as f32 / 2.0, (y0 + y1) as f32 / 2.0);
        let (rx, ry) = ((x1 - x0) as f32 / 2.0, (y1 - y0) as f32 / 2.0);
        for y in y0..y1 {
            for x in x0..x1 {
                let inside = !ellipse || {
                    let (dx, dy) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                    dx * dx + dy * dy <= 1.0
                };
                if inside {
                    let i = ((y * width + x) * 3) as usize;
                    pixels[i..i + 3].copy_from_slice(&colour);
                }
            }
        }
    }
    RgbImage::from_raw(width, height, pixels).expect("synthetic image has width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_deterministic_and_varied() {
        let a = image(7, 3);
        assert_eq!(a.pixels, image(7, 3).pixels);
        let b = image(7, 4);
        assert_ne!(
            (a.width, a.height, a.pixels.len()),
            (b.width, b.height, b.pixels.len() + 1)
        );
        assert_ne!(a.pixels, b.pixels);
        let sizes: std::collections::HashSet<_> = (0..20)
            .map(|i| {
                let im = image(7, i);
                (im.width, im.height)
            })
            .collect();
        assert!(sizes.len() > 10, "sizes vary: {sizes:?}");
        assert!(
            (0..20).any(|i| {
                let im = image(7, i);
                im.height > im.width
            }),
            "portrait images exist"
        );
    }
}
