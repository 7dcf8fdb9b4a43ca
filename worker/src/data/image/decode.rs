//! Bytes to [`RgbImage`] as `PIL.Image.open(..).convert("RGB")` does: the format from the
//! magic bytes ([`ImageFormat`]), the decompression-bomb guard ([`DecodeOptions`]), JPEG
//! through libjpeg-turbo (`mozjpeg`), PNG through the `png` crate.

use std::io::Cursor;
use std::os::raw::c_int;
use std::path::Path;

use mozjpeg::ColorSpace as J_COLOR_SPACE;

use super::error::ImageError;
use super::rgb::RgbImage;

/// Pillow's `Image.MAX_IMAGE_PIXELS`: `1024 * 1024 * 1024 // 4 // 3` (a 24-bit image of
/// 256 MiB). Pillow *warns* above it and refuses above twice it; [`DecodeOptions`] refuses
/// above it (the default), which is stricter.
pub const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The encodings [`decode`] reads, recognised by their magic bytes (not by the file name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// JPEG (`FF D8 FF`), decoded by libjpeg-turbo.
    Jpeg,
    /// PNG (`89 50 4E 47 0D 0A 1A 0A`), decoded by the `png` crate.
    Png,
}

impl ImageFormat {
    /// The format whose signature starts `bytes`, if any.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
        }
    }
}

/// Decoding limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Refuse images whose header claims more pixels (width × height) than this, before any
    /// pixel buffer is allocated. Default [`PIL_MAX_IMAGE_PIXELS`] (89,478,485).
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_pixels: PIL_MAX_IMAGE_PIXELS,
        }
    }
}

/// Reads and decodes the image file at `path` (see [`decode`]).
pub fn open(path: &Path, options: &DecodeOptions) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, path, options)
}

/// Decodes a JPEG or PNG to RGB8 as `PIL.Image.open(..).convert("RGB")` does. `origin` names the
/// data in errors (a path, or any label for in-memory data).
///
/// Conversions to RGB, all as Pillow 13 does them (checked against it, see the unit tests):
/// - grayscale (any bit depth below 16, scaled to 0..255 as PNG prescribes) is replicated;
/// - alpha (gray+alpha, RGBA, and `tRNS` transparency) is **dropped, not composited**;
/// - palette images are looked up in their palette;
/// - 16-bit **grayscale** PNG opens as Pillow's mode `I;16`, whose conversion **clips**:
///   `min(v, 255)` (so most 16-bit gray photos come out nearly white);
///   16-bit RGB, RGBA and gray+alpha PNG keep the **high byte** (`v >> 8`);
/// - CMYK JPEG: Pillow always assumes Adobe's inverted polarity (`CMYK;I`) and converts with
///   `nk = 255 − K`, `R = nk − MULDIV255(C, nk)` on the inverted values (so
///   `R = K_s − MULDIV255(255 − C_s, K_s)` on the stored ones); YCCK JPEG is first turned into
///   CMYK by libjpeg;
///
/// JPEG is decoded by libjpeg-turbo (through `mozjpeg`, whose decoder is libjpeg-turbo's,
/// built from source without SIMD), with libjpeg's defaults as Pillow uses them (`JDCT_ISLOW`,
/// fancy upsampling, libjpeg's YCbCr→RGB), so decoded pixels are Pillow's, bit for bit. The
/// pure-Rust `zune-jpeg` was measured first: its IDCT (stb_image's) differs from libjpeg's
/// `jpeg_idct_islow`, and on `rocket.jpg` it is off by up to 2 levels (0.7 % of samples by 1,
/// 0.1 % by 2), still 2 after letterboxing. PNG is decoded by the pure-Rust `png` crate (exact).
///
/// Truncated files are an error (Pillow: "image file is truncated"). Other JPEG stream damage
/// that libjpeg only warns about (stray bytes before a marker, a bad restart marker) is
/// tolerated, as Pillow does. EXIF orientation is ignored, as `Image.open` does.
pub fn decode(
    bytes: &[u8],
    origin: &Path,
    options: &DecodeOptions,
) -> Result<RgbImage, ImageError> {
    match ImageFormat::sniff(bytes) {
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes, origin, options),
        Some(ImageFormat::Png) => decode_png(bytes, origin, options),
        None => Err(ImageError::Unsupported {
            path: origin.to_path_buf(),
            reason: unknown_format(bytes),
        }),
    }
}

fn unknown_format(bytes: &[u8]) -> String {
    let known: &[(&[u8], &str)] = &[
        (b"GIF8", "GIF"),
        (b"RIFF", "RIFF (WebP?)"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
    ];
    match known.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        Some((_, name)) => format!("{name} is not supported (only JPEG and PNG)"),
        None if bytes.is_empty() => "empty file".to_string(),
        None => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("not a JPEG or PNG (starts {})", head.join(" "))
        }
    }
}

fn check_pixels(
    origin: &Path,
    width: u64,
    height: u64,
    options: &DecodeOptions,
) -> Result<(), ImageError> {
    let pixels = width.saturating_mul(height);
    if pixels > options.max_pixels {
        return Err(ImageError::TooLarge {
            path: origin.to_path_buf(),
            width,
            height,
            pixels,
            limit: options.max_pixels,
        });
    }
    Ok(())
}

fn decode_jpeg(
    bytes: &[u8],
    origin: &Path,
    options: &DecodeOptions,
) -> Result<RgbImage, ImageError> {
    let path = || origin.to_path_buf();
    let format = ImageFormat::Jpeg.name();
    JPEG_HIT_EOF.with(|eof| eof.set(false));
    // libjpeg reports fatal errors by unwinding out of its callbacks (mozjpeg's contract).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<RgbImage, ImageError> {
            let io_error = |e: std::io::Error| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ImageError::Truncated {
                    path: path(),
                    format,
                    reason: e.to_string(),
                },
                _ => ImageError::Corrupt {
                    path: path(),
                    format,
                    reason: e.to_string(),
                },
            };
            let header = mozjpeg::Decompress::with_err(jpeg_error_mgr())
                .from_mem(bytes)
                .map_err(io_error)?;
            let (width, height) = header.size();
            check_pixels(origin, width as u64, height as u64, options)?;
            let source = header.color_space();
            let (wanted, channels) = match source {
                J_COLOR_SPACE::JCS_GRAYSCALE => (J_COLOR_SPACE::JCS_GRAYSCALE, 1),
                J_COLOR_SPACE::JCS_YCbCr | J_COLOR_SPACE::JCS_RGB => (J_COLOR_SPACE::JCS_RGB, 3),
                J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK => (J_COLOR_SPACE::JCS_CMYK, 4),
                other => {
                    return Err(ImageError::Unsupported {
                        path: path(),
                        reason: format!("JPEG colour space {other:?}"),
                    })
                }
            };
            let mut started = header.to_colorspace(wanted).map_err(io_error)?;
            let samples: Vec<u8> = started.read_scanlines().map_err(io_error)?;
            // Reads up to EOI, so that a file cut after its last scan is caught too (Pillow refuses it).
            started.finish().map_err(io_error)?;
            let n = width * height;
            if samples.len() != n * channels {
                return Err(ImageError::Truncated {
                    path: path(),
                    format,
                    reason: format!("{} samples for {width}x{height}x{channels}", samples.len()),
                });
            }
            let pixels = match channels {
                1 => samples.iter().flat_map(|&v| [v, v, v]).collect(),
                3 => samples,
                _ => samples
                    .chunks_exact(4)
                    .flat_map(|p| cmyk_stored_to_rgb([p[0], p[1], p[2], p[3]]))
                    .collect(),
            };
            Ok(RgbImage {
                width: width as u32,
                height: height as u32,
                pixels,
            })
        },
    ));
    let truncated = JPEG_HIT_EOF.with(|eof| eof.replace(false));
    match decoded {
        _ if truncated => Err(ImageError::Truncated {
            path: path(),
            format,
            reason: "premature end of JPEG file".to_string(),
        }),
        Ok(result) => result,
        Err(payload) => match payload.downcast::<JpegFatal>() {
            Ok(fatal) => {
                let JpegFatal {
                    code,
                    message: reason,
                } = *fatal;
                Err(
                    if code == mozjpeg_sys::JERR_INPUT_EOF as c_int
                        || code == mozjpeg_sys::JERR_FILE_READ as c_int
                    {
                        ImageError::Truncated {
                            path: path(),
                            format,
                            reason,
                        }
                    } else if reason.contains("Unsupported") || reason.contains("not supported") {
                        ImageError::Unsupported {
                            path: path(),
                            reason,
                        }
                    } else {
                        ImageError::Corrupt {
                            path: path(),
                            format,
                            reason,
                        }
                    },
                )
            }
            // Not libjpeg's: a bug of ours or of the binding; don't hide it.
            Err(payload) => std::panic::resume_unwind(payload),
        },
    }
}

thread_local! {
    /// Set by [`jpeg_emit_message`] when libjpeg ran out of data (it then pads the image and
    /// goes on; Pillow calls that "image file is truncated").
    static JPEG_HIT_EOF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// libjpeg's standard error manager, with warnings recorded (only running out of data
/// matters) and fatal errors unwinding with libjpeg's message.
fn jpeg_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is a plain C struct of integers, a fixed-size byte array and
    // `Option`s of function pointers and references, for all of which all-zero is a valid
    // value (0, an empty array, `None`).
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid, exclusively borrowed jpeg_error_mgr. jpeg_std_error (jerror.c)
    // only stores libjpeg's default methods, counters and its static message table into the
    // fields and returns the same pointer; it keeps no pointer to `err`, so moving `err` out
    // below is fine.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(jpeg_error_exit);
    err.emit_message = Some(jpeg_emit_message);
    err
}

extern "C-unwind" fn jpeg_emit_message(
    cinfo: &mut mozjpeg_sys::jpeg_common_struct,
    msg_level: c_int,
) {
    // SAFETY: libjpeg calls this with its own cinfo, whose `err` is null or points at the
    // error manager `mozjpeg::Decompress::with_err` owns for as long as the decompressor lives
    // (the duration of this call); `as_ref` handles null.
    let code = unsafe { cinfo.err.as_ref() }.map_or(-1, |err| err.msg_code);
    if msg_level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as c_int {
        JPEG_HIT_EOF.with(|eof| eof.set(true));
    }
}

/// What [`jpeg_error_exit`] unwinds with.
struct JpegFatal {
    code: c_int,
    message: String,
}

extern "C-unwind" fn jpeg_error_exit(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    // JMSG_LENGTH_MAX: the binding types the buffer `&[u8; 80]`, which is too short.
    let mut buffer = [0u8; 200];
    // SAFETY: `cinfo.err` is null or valid, as in jpeg_emit_message. Its format_message is
    // libjpeg's (set by jpeg_std_error), which writes a NUL-terminated message of at most
    // JMSG_LENGTH_MAX (200) bytes into its buffer, so `buffer` is large enough; the
    // transmute only changes the buffer parameter from `&[u8; 80]` to `*mut u8`, which have
    // the same ABI (a non-null pointer), and `cinfo` is the live struct libjpeg passed in.
    let message = unsafe {
        match cinfo.err.as_ref().and_then(|err| err.format_message) {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(
                    &mut mozjpeg_sys::jpeg_common_struct,
                    *mut u8,
                ) = std::mem::transmute(format);
                format(cinfo, buffer.as_mut_ptr());
                let len = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
                String::from_utf8_lossy(&buffer[..len]).into_owned()
            }
            None => "libjpeg fatal error".to_string(),
        }
    };
    // SAFETY: `cinfo.err` is null or valid, as in jpeg_emit_message; `as_ref` handles null.
    let code = unsafe { cinfo.err.as_ref() }.map_or(-1, |err| err.msg_code);
    std::panic::resume_unwind(Box::new(JpegFatal { code, message }));
}

/// Pillow's `MULDIV255(a, b)`: `a·b/255` rounded.
fn muldiv255(a: u8, b: u8) -> i32 {
    let t = i32::from(a) * i32::from(b) + 128;
    ((t >> 8) + t) >> 8
}

/// A CMYK JPEG sample as stored (Adobe polarity) to RGB as Pillow does: it unpacks with
/// `CMYK;I` (inverting) and converts with `cmyk2rgb`: `nk = 255 − k`, `out = nk − MULDIV255(c, nk)`.
fn cmyk_stored_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let (c, m, y, k) = (255 - c, 255 - m, 255 - y, 255 - k); // CMYK;I
    let nk = 255 - k;
    [c, m, y].map(|v| (i32::from(nk) - muldiv255(v, nk)).clamp(0, 255) as u8)
}

fn decode_png(
    bytes: &[u8],
    origin: &Path,
    options: &DecodeOptions,
) -> Result<RgbImage, ImageError> {
    let format = ImageFormat::Png.name();
    let error = |e: png::DecodingError| match e {
        png::DecodingError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                path: origin.to_path_buf(),
                format,
                reason: e.to_string(),
            }
        }
        e => ImageError::Corrupt {
            path: origin.to_path_buf(),
            format,
            reason: e.to_string(),
        },
    };
    // Our pixel-count guard replaces png's 64 MiB allocation limit.
    let mut decoder =
        png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: usize::MAX });
    let (width, height, source_color) = {
        let info = decoder.read_header_info().map_err(error)?;
        (info.width, info.height, info.color_type)
    };
    check_pixels(origin, u64::from(width), u64::from(height), options)?;
    // EXPAND: palette → RGB(A), gray below 8 bits → 8 bits scaled, tRNS → an alpha channel
    // (dropped below, as Pillow's convert("RGB") drops transparency). 16 bits stay 16 bits.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(error)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ImageError::TooLarge {
            path: origin.to_path_buf(),
            width: u64::from(width),
            height: u64::from(height),
            pixels: u64::from(width) * u64::from(height),
            limit: options.max_pixels,
        })?;
    let mut buf = vec![0; size];
    let frame = reader.next_frame(&mut buf).map_err(error)?;
    let channels = frame.color_type.samples();
    let sixteen = frame.bit_depth == png::BitDepth::Sixteen;
    let bytes_per_sample = if sixteen { 2 } else { 1 };
    let n = width as usize * height as usize;
    let mut pixels = Vec::with_capacity(n * 3);
    // 16-bit gray is Pillow's I;16, whose conversion to L/RGB clips; other 16-bit modes are
    // unpacked to 8 bits by their high byte (rawmodes RGB;16B, RGBA;16B, LA;16B).
    let sample: fn(&[u8]) -> u8 = match (sixteen, source_color) {
        (false, _) => |s| s[0],
        (true, png::ColorType::Grayscale) => |s| if s[0] == 0 { s[1] } else { 255 },
        (true, _) => |s| s[0],
    };
    for row in buf[..frame.buffer_size()].chunks_exact(frame.line_size) {
        for px in row[..width as usize * channels * bytes_per_sample]
            .chunks_exact(channels * bytes_per_sample)
        {
            let s = |c: usize| sample(&px[c * bytes_per_sample..]);
            match frame.color_type {
                png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => {
                    let v = s(0);
                    pixels.extend([v, v, v]);
                }
                png::ColorType::Rgb | png::ColorType::Rgba => pixels.extend([s(0), s(1), s(2)]),
                png::ColorType::Indexed => {
                    return Err(ImageError::Unsupported {
                        path: origin.to_path_buf(),
                        reason: "palette was not expanded".to_string(),
                    })
                }
            }
        }
    }
    RgbImage::from_raw(width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/data/testdata");

    /// A PNG made in memory with the `png` crate.
    fn png_bytes(
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        data: &[u8],
        setup: impl FnOnce(&mut png::Encoder<'_, &mut Vec<u8>>),
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_color(color);
            encoder.set_depth(depth);
            setup(&mut encoder);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(data).unwrap();
        }
        out
    }

    fn decode_png_bytes(bytes: &[u8]) -> RgbImage {
        decode(bytes, Path::new("test.png"), &DecodeOptions::default()).unwrap()
    }

    // --- decoding: conversions to RGB as Pillow's convert("RGB") -----------------------------

    #[test]
    fn grayscale_png_is_replicated_and_low_bit_depths_are_scaled() {
        let gray = png_bytes(
            3,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &[0, 128, 255],
            |_| {},
        );
        assert_eq!(
            decode_png_bytes(&gray).pixels,
            [0, 0, 0, 128, 128, 128, 255, 255, 255]
        );
        // 2-bit samples 0, 1, 2, 3 → ×85; 1-bit → 0 / 255 (as Pillow: L;2 and mode "1").
        let two = png_bytes(
            4,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Two,
            &[0b0001_1011],
            |_| {},
        );
        assert_eq!(
            decode_png_bytes(&two)
                .pixels
                .iter()
                .step_by(3)
                .copied()
                .collect::<Vec<_>>(),
            [0, 85, 170, 255]
        );
        let one = png_bytes(
            8,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            &[0b1011_0010],
            |_| {},
        );
        let one = decode_png_bytes(&one);
        assert_eq!(
            one.pixels.iter().step_by(3).copied().collect::<Vec<_>>(),
            [255, 0, 255, 255, 0, 0, 255, 0]
        );
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let rgba = png_bytes(
            2,
            1,
            png::ColorType::Rgba,
            png::BitDepth::Eight,
            &[200, 100, 50, 0, 10, 20, 30, 128],
            |_| {},
        );
        assert_eq!(decode_png_bytes(&rgba).pixels, [200, 100, 50, 10, 20, 30]);
        let gray_alpha = png_bytes(
            2,
            1,
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Eight,
            &[100, 0, 200, 255],
            |_| {},
        );
        assert_eq!(
            decode_png_bytes(&gray_alpha).pixels,
            [100, 100, 100, 200, 200, 200]
        );
        // tRNS on a truecolour image makes the decoder add alpha; it is dropped too.
        let trns = png_bytes(
            2,
            1,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &[0, 0, 0, 9, 8, 7],
            |e| {
                e.set_trns(vec![0, 0, 0, 0, 0, 0]);
            },
        );
        assert_eq!(decode_png_bytes(&trns).pixels, [0, 0, 0, 9, 8, 7]);
    }

    #[test]
    fn palette_png_is_looked_up_and_its_transparency_dropped() {
        let palette = png_bytes(
            3,
            1,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            &[2, 0, 1],
            |e| {
                e.set_palette(vec![255, 0, 0, 0, 255, 0, 1, 2, 3]);
                e.set_trns(vec![0, 128]);
            },
        );
        assert_eq!(
            decode_png_bytes(&palette).pixels,
            [1, 2, 3, 255, 0, 0, 0, 255, 0]
        );
        let four_bit = png_bytes(
            2,
            1,
            png::ColorType::Indexed,
            png::BitDepth::Four,
            &[0x10],
            |e| {
                e.set_palette(vec![5, 6, 7, 8, 9, 10]);
            },
        );
        assert_eq!(decode_png_bytes(&four_bit).pixels, [8, 9, 10, 5, 6, 7]);
    }

    #[test]
    fn sixteen_bit_png_clips_gray_and_keeps_the_high_byte_of_colour() {
        let be = |v: &[u16]| v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        // Pillow: 16-bit gray opens as I;16, whose conversion clips to 255.
        let gray = png_bytes(
            4,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &be(&[0, 200, 256, 65535]),
            |_| {},
        );
        assert_eq!(
            decode_png_bytes(&gray)
                .pixels
                .iter()
                .step_by(3)
                .copied()
                .collect::<Vec<_>>(),
            [0, 200, 255, 255]
        );
        // RGB;16B / RGBA;16B / LA;16B unpack the most significant byte.
        let rgb = png_bytes(
            2,
            1,
            png::ColorType::Rgb,
            png::BitDepth::Sixteen,
            &be(&[0x1234, 0x80ff, 0x00ff, 256, 65535, 0]),
            |_| {},
        );
        assert_eq!(decode_png_bytes(&rgb).pixels, [0x12, 0x80, 0x00, 1, 255, 0]);
        let rgba = png_bytes(
            1,
            1,
            png::ColorType::Rgba,
            png::BitDepth::Sixteen,
            &be(&[0xab00, 0x0100, 0xffff, 0]),
            |_| {},
        );
        assert_eq!(decode_png_bytes(&rgba).pixels, [0xab, 0x01, 0xff]);
        let la = png_bytes(
            2,
            1,
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Sixteen,
            &be(&[300, 7, 0x8000, 0]),
            |_| {},
        );
        assert_eq!(decode_png_bytes(&la).pixels, [1, 1, 1, 128, 128, 128]);
    }

    #[test]
    fn cmyk_conversion_is_pillows() {
        // Pillow 13, Image.new("CMYK").convert("RGB") on ink values (c, m, y, k); the JPEG
        // stores 255 − ink (Adobe polarity), which is what cmyk_stored_to_rgb takes.
        let stored = |ink: [u8; 4]| ink.map(|v| 255 - v);
        for (ink, rgb) in [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([255, 0, 0, 0], [0, 255, 255]),
            ([0, 0, 0, 255], [0, 0, 0]),
            ([100, 50, 25, 10], [149, 197, 221]),
            ([200, 150, 100, 50], [44, 84, 125]),
            ([10, 20, 30, 128], [122, 117, 112]),
            ([128, 128, 128, 128], [63, 63, 63]),
        ] {
            assert_eq!(cmyk_stored_to_rgb(stored(ink)), rgb, "ink {ink:?}");
        }
        // MULDIV255 is exact rounding of a·b/255 (never a tie), for every pair.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(
                    muldiv255(a, b),
                    (f64::from(a) * f64::from(b) / 255.0).round() as i32
                );
            }
        }
    }

    /// JPEGs written by Pillow 13 (tools/reference/.venv) with what Pillow decodes them to
    /// (`Image.open(p).convert("RGB")`, raw HWC bytes): a CMYK JPEG (Adobe marker, transform 0),
    /// the same bytes with the Adobe transform patched to 2 (YCCK), a grayscale JPEG and a
    /// progressive 4:2:0 colour JPEG.
    #[test]
    fn jpeg_decoding_matches_pillow_exactly() {
        for (name, size) in [
            ("cmyk", (19, 21)),
            ("ycck", (19, 21)),
            ("gray", (31, 29)),
            ("progressive420", (53, 37)),
        ] {
            let path = Path::new(TESTDATA).join(format!("{name}.jpg"));
            let img = open(&path, &DecodeOptions::default()).unwrap();
            assert_eq!((img.width, img.height), size, "{name}");
            let expected =
                std::fs::read(Path::new(TESTDATA).join(format!("{name}.pil.rgb"))).unwrap();
            assert!(img.pixels == expected, "{name}: differs from Pillow");
        }
    }

    // --- decoding: errors ------------------------------------------------------------------

    fn rocket() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/images/rocket.jpg"
        ))
        .unwrap()
    }

    #[test]
    fn truncated_jpeg_is_an_error_naming_the_file() {
        let bytes = rocket();
        let path = Path::new("/data/coco/000000000042.jpg");
        for cut in [bytes.len() / 2, bytes.len() - 2, 300] {
            let err = decode(&bytes[..cut], path, &DecodeOptions::default()).unwrap_err();
            assert!(
                matches!(err, ImageError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
            assert!(
                err.to_string().contains("/data/coco/000000000042.jpg"),
                "{err}"
            );
        }
        // `open` names the file it read.
        let dir = std::env::temp_dir().join(format!("declip-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cut.jpg");
        std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
        let err = open(&file, &DecodeOptions::default()).unwrap_err();
        assert!(err.to_string().contains(file.to_str().unwrap()), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = open(Path::new("/nonexistent/x.png"), &DecodeOptions::default()).unwrap_err();
        assert!(
            matches!(missing, ImageError::Io { .. })
                && missing.to_string().contains("/nonexistent/x.png")
        );
    }

    #[test]
    fn truncated_png_and_unknown_formats_are_errors() {
        let bytes = png_bytes(
            16,
            16,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &[7; 16 * 16 * 3],
            |_| {},
        );
        let err = decode(
            &bytes[..bytes.len() - 20],
            Path::new("cut.png"),
            &DecodeOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated { .. } | ImageError::Corrupt { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cut.png"));
        let gif = decode(
            b"GIF89a\x01\x00",
            Path::new("a.gif"),
            &DecodeOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(gif, ImageError::Unsupported { .. }) && gif.to_string().contains("GIF"),
            "{gif}"
        );
        assert!(decode(b"", Path::new("empty"), &DecodeOptions::default()).is_err());
    }

    #[test]
    fn the_bomb_guard_refuses_before_decoding() {
        let small = DecodeOptions { max_pixels: 1000 };
        let err = decode(&rocket(), Path::new("rocket.jpg"), &small).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooLarge {
                    pixels: 273_280,
                    limit: 1000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(DecodeOptions::default().max_pixels, 89_478_485);

        // Headers claiming 60000 x 60000 (3.6 G pixels) with almost no data behind them: refused
        // from the header alone, nothing allocated.
        let png = crate::data::synth_coco::bomb_png(60_000, 60_000);
        let err = decode(&png, Path::new("bomb.png"), &DecodeOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooLarge {
                    width: 60_000,
                    height: 60_000,
                    ..
                }
            ),
            "{err}"
        );

        let mut jpeg = rocket();
        let sof = jpeg
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF0");
        jpeg[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes()); // height
        jpeg[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes()); // width
        let err = decode(&jpeg, Path::new("bomb.jpg"), &DecodeOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooLarge {
                    width: 60_000,
                    height: 60_000,
                    ..
                }
            ),
            "{err}"
        );
    }
}
