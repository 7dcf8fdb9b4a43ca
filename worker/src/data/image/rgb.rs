//! [`RgbImage`]: the 8-bit RGB buffer (HWC) that decoding produces and the other steps take.

use super::error::ImageError;

/// An 8-bit RGB image, row-major, channels last: `pixels[(y * width + x) * 3 + c]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width · height · 3` bytes, HWC.
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps an HWC buffer, checking its length.
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self, ImageError> {
        let expected = width as usize * height as usize * 3;
        if pixels.len() != expected {
            return Err(ImageError::BufferSize {
                width,
                height,
                expected,
                got: pixels.len(),
            });
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// A black image.
    pub fn zeros(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * 3],
        }
    }

    /// The pixel at (x, y).
    pub fn get(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Whether the image has no pixels (a zero-width or zero-height crop).
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_raw_checks_the_length_and_get_reads_hwc() {
        let img = RgbImage::from_raw(2, 3, (0..18).collect()).unwrap();
        assert_eq!(img.get(0, 0), [0, 1, 2]);
        assert_eq!(img.get(1, 0), [3, 4, 5]);
        assert_eq!(img.get(0, 1), [6, 7, 8]);
        assert_eq!(img.get(1, 2), [15, 16, 17]);
        assert!(!img.is_empty());
        // Debug names the size, never the pixels.
        assert_eq!(format!("{img:?}"), "RgbImage(2x3)");
        assert!(matches!(
            RgbImage::from_raw(2, 3, vec![0; 17]),
            Err(ImageError::BufferSize {
                width: 2,
                height: 3,
                expected: 18,
                got: 17
            })
        ));
        let black = RgbImage::zeros(4, 0);
        assert!(black.is_empty() && black.pixels.is_empty());
        assert_eq!(RgbImage::zeros(2, 1).pixels, [0; 6]);
    }
}
