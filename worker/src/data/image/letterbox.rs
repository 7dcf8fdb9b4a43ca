//! Placing an image on the model's square canvas: [`crop`] (Pillow's, black outside the
//! image), [`letterbox_size`] and [`letterbox`] (resize the longer side, paste at a
//! [`Placement`]), giving a channels-first [`Letterboxed`].

use super::error::ImageError;
use super::resize::resize;
use super::rgb::RgbImage;

/// `img.crop((x0, y0, x1, y1))`: the box may reach outside the image; those pixels are black,
/// as Pillow fills them. A zero-width or zero-height box gives an empty image; a box with
/// `x1 < x0` or `y1 < y0` is an error (Pillow raises `ValueError`).
pub fn crop(img: &RgbImage, [x0, y0, x1, y1]: [i64; 4]) -> Result<RgbImage, ImageError> {
    if x1 < x0 || y1 < y0 {
        return Err(ImageError::InvalidBox([x0, y0, x1, y1]));
    }
    let (w, h) = ((x1 - x0) as u32, (y1 - y0) as u32);
    let mut out = RgbImage::zeros(w, h);
    // The part of the box inside the image, in image coordinates.
    let (ix0, iy0) = (x0.max(0), y0.max(0));
    let (ix1, iy1) = (x1.min(i64::from(img.width)), y1.min(i64::from(img.height)));
    if ix0 < ix1 && iy0 < iy1 {
        let len = (ix1 - ix0) as usize * 3;
        for y in iy0..iy1 {
            let src = (y as usize * img.width as usize + ix0 as usize) * 3;
            let dst = ((y - y0) as usize * w as usize + (ix0 - x0) as usize) * 3;
            out.pixels[dst..dst + len].copy_from_slice(&img.pixels[src..src + len]);
        }
    }
    Ok(out)
}

/// Where the resized image goes on the square canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// At (0, 0), padding right and bottom (student and VFM images).
    TopLeft,
    /// At `((size − w) / 2, (size − h) / 2)`, integer division (crops for the crop teacher).
    Centred,
}

/// A letterboxed image: `size × size`, channels first.
#[derive(Clone, PartialEq)]
pub struct Letterboxed {
    /// Side of the square canvas.
    pub size: u32,
    /// CHW: `pixels[(c * size + y) * size + x]`.
    pub pixels: Vec<u8>,
    /// `size / max(w, h)` of the source image (f64).
    pub scale: f64,
    /// Size of the resized image on the canvas.
    pub content: (u32, u32),
    /// Where its top-left corner is.
    pub offset: (u32, u32),
}

impl std::fmt::Debug for Letterboxed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Letterboxed")
            .field("size", &self.size)
            .field("scale", &self.scale)
            .field("content", &self.content)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// The resized size of a `width × height` image whose longer side goes to `size`:
/// `scale = size / max(w, h)` in f64, then `round(w · scale)` with Python's `round` (half to
/// even), as open_clip's `ResizeKeepRatio` and the fixture generator do. Exact ties occur
/// (448×225 → 224×112.5 → 112).
///
/// Unlike Pillow, which refuses to resize to 0, a side that rounds to 0 (an image more than
/// `2·size` times longer than wide) is kept at 1 pixel. Both sides must be ≥ 1.
pub fn letterbox_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let scale = f64::from(size) / f64::from(width.max(height));
    let side = |v: u32| ((f64::from(v) * scale).round_ties_even() as u32).clamp(1, size.max(1));
    (side(width), side(height))
}

/// docs/method.md §2: longer side resized to `size` (Pillow bicubic), pasted on a black
/// `size × size` canvas at `placement`. The image must not be empty.
pub fn letterbox(
    img: &RgbImage,
    size: u32,
    placement: Placement,
) -> Result<Letterboxed, ImageError> {
    if img.is_empty() || size == 0 {
        return Err(ImageError::EmptyResize {
            from_w: img.width,
            from_h: img.height,
            to_w: size,
            to_h: size,
        });
    }
    let (nw, nh) = letterbox_size(img.width, img.height, size);
    let resized = resize(img, nw, nh)?;
    let offset = match placement {
        Placement::TopLeft => (0, 0),
        Placement::Centred => ((size - nw) / 2, (size - nh) / 2),
    };
    let s = size as usize;
    let mut pixels = vec![0u8; 3 * s * s];
    for y in 0..nh as usize {
        let src_row = &resized.pixels[y * nw as usize * 3..(y + 1) * nw as usize * 3];
        for c in 0..3 {
            let dst = (c * s + y + offset.1 as usize) * s + offset.0 as usize;
            for (d, p) in pixels[dst..dst + nw as usize]
                .iter_mut()
                .zip(src_row.chunks_exact(3))
            {
                *d = p[c];
            }
        }
    }
    Ok(Letterboxed {
        size,
        pixels,
        scale: f64::from(size) / f64::from(img.width.max(img.height)),
        content: (nw, nh),
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::test_images::{gradient, image};

    #[test]
    fn crop_copies_inside_and_fills_outside_with_black() {
        let img = gradient(10, 6);
        let inside = crop(&img, [2, 1, 7, 4]).unwrap();
        assert_eq!((inside.width, inside.height), (5, 3));
        assert_eq!(inside.get(0, 0), img.get(2, 1));
        assert_eq!(inside.get(4, 2), img.get(6, 3));
        let over = crop(&img, [-2, -1, 12, 3]).unwrap();
        assert_eq!((over.width, over.height), (14, 4));
        assert_eq!(over.get(0, 0), [0, 0, 0]);
        assert_eq!(over.get(1, 3), [0, 0, 0]);
        assert_eq!(over.get(2, 1), img.get(0, 0));
        assert_eq!(over.get(11, 3), img.get(9, 2));
        assert_eq!(over.get(12, 2), [0, 0, 0]);
        let outside = crop(&img, [20, 20, 23, 22]).unwrap();
        assert!(outside.pixels.iter().all(|&v| v == 0));
        assert!(crop(&img, [3, 3, 3, 5]).unwrap().is_empty());
        assert!(matches!(
            crop(&img, [5, 0, 4, 2]),
            Err(ImageError::InvalidBox(_))
        ));
    }

    #[test]
    fn letterbox_sizes_round_half_to_even() {
        assert_eq!(letterbox_size(448, 225, 224), (224, 112)); // 112.5 → 112
        assert_eq!(letterbox_size(448, 227, 224), (224, 114)); // 113.5 → 114
        assert_eq!(letterbox_size(640, 427, 560), (560, 374)); // 373.625
        assert_eq!(letterbox_size(451, 300, 490), (490, 326));
        assert_eq!(letterbox_size(512, 512, 560), (560, 560));
        assert_eq!(letterbox_size(37, 23, 224), (224, 139));
        assert_eq!(letterbox_size(1000, 1, 224), (224, 1)); // 0.224 would be 0: kept at 1
    }

    #[test]
    fn letterbox_places_the_image_and_pads_with_zeros() {
        let img = image(8, 4, |_, _| [10, 20, 30]);
        let top_left = letterbox(&img, 6, Placement::TopLeft).unwrap();
        assert_eq!(
            (top_left.content, top_left.offset, top_left.scale),
            ((6, 3), (0, 0), 0.75)
        );
        let centred = letterbox(&img, 6, Placement::Centred).unwrap();
        assert_eq!((centred.content, centred.offset), ((6, 3), (0, 1)));
        for (lb, rows) in [(&top_left, 0..3), (&centred, 1..4)] {
            for c in 0..3 {
                for y in 0..6 {
                    for x in 0..6 {
                        let v = lb.pixels[(c * 6 + y) * 6 + x];
                        let expected = if rows.contains(&y) {
                            [10, 20, 30][c]
                        } else {
                            0
                        };
                        assert_eq!(v, expected, "c {c} y {y} x {x}");
                    }
                }
            }
        }
        // Odd padding: (7 − 2) / 2 = 2 on the left.
        let narrow = letterbox(&image(2, 7, |_, _| [1, 1, 1]), 7, Placement::Centred).unwrap();
        assert_eq!(narrow.offset, (2, 0));
        assert!(letterbox(&RgbImage::zeros(0, 5), 7, Placement::TopLeft).is_err());
    }

    #[test]
    fn letterbox_at_the_native_size_is_a_transpose_to_chw() {
        let img = gradient(5, 5);
        let lb = letterbox(&img, 5, Placement::TopLeft).unwrap();
        for (i, &v) in lb.pixels.iter().enumerate() {
            let (c, y, x) = (i / 25, i / 5 % 5, i % 5);
            assert_eq!(v, img.get(x as u32, y as u32)[c]);
        }
    }
}
