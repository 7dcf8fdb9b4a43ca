//! Synthetic images shared by the unit tests of the image module.

use super::rgb::RgbImage;

/// A `width × height` image whose pixel (x, y) is `f(x, y)`.
pub(super) fn image(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            pixels.extend(f(x, y));
        }
    }
    RgbImage::from_raw(width, height, pixels).unwrap()
}

/// An image with a different, non-linear ramp per channel (wrapping at 256).
pub(super) fn gradient(width: u32, height: u32) -> RgbImage {
    image(width, height, |x, y| {
        [
            (x * 7 + y * 3) as u8,
            (x * x + 5 * y) as u8,
            255u32.wrapping_sub(x * 11 + y) as u8,
        ]
    })
}
