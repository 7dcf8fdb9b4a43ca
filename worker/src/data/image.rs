//! Images as the reference pipeline sees them: decoding to RGB8 and PIL-exact preprocessing.
//!
//! Everything here reproduces Pillow, because the fixtures (tools/reference) and the authors'
//! PyTorch pipeline were made with it:
//!
//! | here | Pillow |
//! | --- | --- |
//! | [`open`], [`decode`] | `Image.open(p).convert("RGB")` (no EXIF rotation) |
//! | [`resize`], [`ResizePlan`] | `Image.resize((w, h), Image.BICUBIC)` (`reducing_gap=None`) |
//! | [`crop`] | `Image.crop(box)` |
//! | [`letterbox`] | `resize` + `paste` onto a black square (docs/method.md §2) |
//!
//! Pixels are `u8` RGB, row-major, channels last (HWC) in [`RgbImage`] and channels first
//! (CHW) in [`Letterboxed`], which is what the model input is built from (see
//! [`super::tensor`]).

use std::io::Cursor;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};

use mozjpeg::ColorSpace as J_COLOR_SPACE;

/// Pillow's `Image.MAX_IMAGE_PIXELS`: `1024 * 1024 * 1024 // 4 // 3` (a 24-bit image of
/// 256 MiB). Pillow *warns* above it and refuses above twice it; [`DecodeOptions`] refuses
/// above it (the default), which is stricter.
pub const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The encodings [`decode`] reads, recognised by their magic bytes (not by the file name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
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

/// Why an image could not be read or processed. Decoding errors name the file (or the label
/// passed to [`decode`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unsupported image: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: truncated {format} data: {reason}")]
    Truncated {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: corrupt {format} data: {reason}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(
        "{path}: header says {width}x{height} = {pixels} pixels, more than the limit of {limit} \
         (decompression-bomb guard, DecodeOptions::max_pixels)"
    )]
    TooLarge {
        path: PathBuf,
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    #[error("crop box {0:?} has right < left or bottom < top")]
    InvalidBox([i64; 4]),
    #[error("cannot resize {from_w}x{from_h} to {to_w}x{to_h}: every side must be at least 1")]
    EmptyResize {
        from_w: u32,
        from_h: u32,
        to_w: u32,
        to_h: u32,
    },
    #[error("resize plan is for {plan_w}x{plan_h} input, got a {w}x{h} image")]
    PlanMismatch {
        plan_w: u32,
        plan_h: u32,
        w: u32,
        h: u32,
    },
    #[error("pixel buffer holds {got} bytes, {width}x{height} RGB needs {expected}")]
    BufferSize {
        width: u32,
        height: u32,
        expected: usize,
        got: usize,
    },
}

/// An 8-bit RGB image, row-major, channels last: `pixels[(y * width + x) * 3 + c]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
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

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

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
    // SAFETY: jpeg_error_mgr is a plain C struct for which all-zero is a valid (empty) value,
    // and jpeg_std_error only fills in its fields.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(jpeg_error_exit);
    err.emit_message = Some(jpeg_emit_message);
    err
}

extern "C-unwind" fn jpeg_emit_message(
    cinfo: &mut mozjpeg_sys::jpeg_common_struct,
    msg_level: c_int,
) {
    // SAFETY: libjpeg calls this with its own cinfo, whose `err` points at our error manager.
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
    // SAFETY: as above. format_message writes a NUL-terminated message of at most
    // JMSG_LENGTH_MAX bytes into `buffer`; a reference and a raw pointer have the same ABI.
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
    // SAFETY: as above.
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

// ---------------------------------------------------------------------------------------------
// Resize: Pillow's antialiased bicubic
// ---------------------------------------------------------------------------------------------

/// Pillow's fixed-point precision for 8-bit resampling (`Resample.c`: `32 - 8 - 2`): 255 times
/// a coefficient sum a little above 1 still fits an `i32` accumulator.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bicubic_filter`: Keys' cubic convolution with a = −0.5, support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The resampling weights of one axis (`in_size` → `out_size`), as Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` compute them.
#[derive(Clone, Debug)]
pub struct AxisKernel {
    in_size: usize,
    out_size: usize,
    /// Taps reserved per output sample: `2·ceil(support) + 1`.
    ksize: usize,
    /// Per output sample: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size × ksize` normalised weights (f64, before fixed point); unused taps are 0.
    weights: Vec<f64>,
    /// The same in fixed point, `round_away(w · 2^22)`.
    fixed: Vec<i32>,
}

impl AxisKernel {
    /// Pillow's coefficients for the box `(0, in_size)` → `out_size` samples. Both sizes ≥ 1.
    pub fn bicubic(in_size: usize, out_size: usize) -> Self {
        assert!(
            in_size > 0 && out_size > 0,
            "AxisKernel::bicubic: sizes must be positive"
        );
        // Pillow: `scale = (double)(in1 - in0) / outSize` with a float box (in0 = 0, in1 = in_size).
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0.0; out_size * ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale; // in0 + (xx + 0.5) * scale, in0 = 0
                                                    // C's `(int)` truncates toward zero; then clamp into the image.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let count = (xmax - xmin).max(0) as usize;
            let k = &mut weights[xx * ksize..xx * ksize + count];
            let mut ww = 0.0;
            for (x, w) in k.iter_mut().enumerate() {
                *w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            if ww != 0.0 {
                for w in k.iter_mut() {
                    *w /= ww;
                }
            }
            bounds.push((xmin as usize, count));
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        let fixed = weights
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        Self {
            in_size,
            out_size,
            ksize,
            bounds,
            weights,
            fixed,
        }
    }

    pub fn in_size(&self) -> usize {
        self.in_size
    }

    pub fn out_size(&self) -> usize {
        self.out_size
    }

    /// The first input index and the normalised f64 weights of output sample `i`.
    pub fn weights(&self, i: usize) -> (usize, &[f64]) {
        let (first, count) = self.bounds[i];
        (first, &self.weights[i * self.ksize..i * self.ksize + count])
    }

    /// The same weights in Pillow's 22-bit fixed point.
    pub fn fixed_weights(&self, i: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[i];
        (first, &self.fixed[i * self.ksize..i * self.ksize + count])
    }
}

/// Pillow's `clip8`: drop the fixed-point fraction (arithmetic shift = floor) and clamp.
#[inline]
fn clip8(v: i32) -> u8 {
    if v >= 1 << (PRECISION_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// A bicubic resize from one size to another, coefficients computed once and reusable for any
/// image of that size.
///
/// It is Pillow's `ImagingResample` for 8-bit RGB, step for step, so that outputs are
/// bit-identical: weights in f64 normalised to sum 1, then 22-bit fixed point (rounded away
/// from zero); two separable passes with an 8-bit intermediate; each sum starts at ½
/// (`1 << 21`) and is clipped by `clip8`. A pass whose size does not change is skipped, as
/// Pillow skips it.
///
/// **Pass order** (it changes the 8-bit intermediate, so the result, by up to a few levels):
/// Pillow 13 (the fixtures' version; python-pillow/Pillow#9549) runs the vertical pass first
/// when the height shrinks by more than twice as many pixels as the width,
/// `out_h < in_h && in_h − out_h > 2·(in_w − out_w)`, and the horizontal pass first otherwise
/// (then only over the rows the vertical pass reads). Pillow before that change (12.x and
/// older) always runs the horizontal pass first, so its output differs slightly in the
/// vertical-first cases. The rule was found by comparing `resize` with the two single-pass
/// orders on 1,344 random sizes (Pillow 13.0.0), all of which it predicts.
///
/// Why not `fast_image_resize`: same kernel family, but its u8 path uses i16 coefficients with
/// a per-kernel precision (Pillow-SIMD's scheme) and its own rounding, so it is not Pillow.
/// Measured (release build, this 2-core machine, fast_image_resize 5 `CatmullRom` with AVX2,
/// against this code): astronaut 512² → 560²: max |Δ| vs Pillow 8 on 13 % of the values in
/// 1.3 ms, against 0 in 6–9 ms; rocket 640×427 → 560×374: 5 on 8 % in 1.2 ms, against 0 in
/// 5 ms. docs/method.md §2 makes Pillow parity a test, so parity wins; a few ms per image is
/// small next to a model step, and loader threads run in parallel.
#[derive(Clone, Debug)]
pub struct ResizePlan {
    horizontal: AxisKernel,
    vertical: AxisKernel,
}

impl ResizePlan {
    /// The plan for `in_w × in_h` → `out_w × out_h`; every side must be ≥ 1 (Pillow refuses 0).
    pub fn bicubic(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> Result<Self, ImageError> {
        if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
            return Err(ImageError::EmptyResize {
                from_w: in_w,
                from_h: in_h,
                to_w: out_w,
                to_h: out_h,
            });
        }
        Ok(Self {
            horizontal: AxisKernel::bicubic(in_w as usize, out_w as usize),
            vertical: AxisKernel::bicubic(in_h as usize, out_h as usize),
        })
    }

    pub fn out_size(&self) -> (u32, u32) {
        (
            self.horizontal.out_size as u32,
            self.vertical.out_size as u32,
        )
    }

    /// Whether Pillow 13 runs the vertical pass first (see the type's doc).
    pub fn vertical_first(&self) -> bool {
        let (h, v) = (&self.horizontal, &self.vertical);
        let shrink = |k: &AxisKernel| k.in_size as i64 - k.out_size as i64;
        v.out_size < v.in_size && shrink(v) > 2 * shrink(h)
    }

    /// Resizes `img`, which must have the plan's input size.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage, ImageError> {
        let (h, v) = (&self.horizontal, &self.vertical);
        if img.width as usize != h.in_size || img.height as usize != v.in_size {
            return Err(ImageError::PlanMismatch {
                plan_w: h.in_size as u32,
                plan_h: v.in_size as u32,
                w: img.width,
                h: img.height,
            });
        }
        let need_horizontal = h.out_size != h.in_size;
        let need_vertical = v.out_size != v.in_size;
        let (out_w, out_h) = self.out_size();
        let out = match (need_horizontal, need_vertical) {
            (false, false) => img.pixels.clone(),
            (true, false) => resample_horizontal(&img.pixels, h, 0, v.in_size),
            (false, true) => resample_vertical(&img.pixels, h.in_size, v, 0),
            (true, true) if self.vertical_first() => {
                let temp = resample_vertical(&img.pixels, h.in_size, v, 0);
                resample_horizontal(&temp, h, 0, v.out_size)
            }
            (true, true) => {
                // Only the rows the vertical pass reads: [first tap of row 0, last tap of the last row).
                let first = v.bounds[0].0;
                let (last_min, last_count) = v.bounds[v.out_size - 1];
                let temp = resample_horizontal(&img.pixels, h, first, last_min + last_count);
                resample_vertical(&temp, h.out_size, v, first)
            }
        };
        Ok(RgbImage {
            width: out_w,
            height: out_h,
            pixels: out,
        })
    }
}

/// Pillow's `ImagingResampleHorizontal_8bpc` over rows `[row_first, row_last)` of `src`, which
/// is `k.in_size` pixels wide.
///
/// The passes are integer arithmetic only, so any instruction set gives the same bits; on
/// x86-64 with AVX2 they are compiled a second time with it enabled, which lets the
/// compiler vectorise the sums (the build targets baseline x86-64, SSE2, without).
fn resample_horizontal(src: &[u8], k: &AxisKernel, row_first: usize, row_last: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only requirement of the target-feature function.
        return unsafe { resample_horizontal_avx2(src, k, row_first, row_last) };
    }
    resample_horizontal_any(src, k, row_first, row_last)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resample_horizontal_avx2(
    src: &[u8],
    k: &AxisKernel,
    row_first: usize,
    row_last: usize,
) -> Vec<u8> {
    resample_horizontal_any(src, k, row_first, row_last)
}

/// Rows that [`resample_horizontal`] resamples together: interleaved column by column,
/// one tap weight then multiplies `BLOCK_ROWS × 3` contiguous values, which vectorises
/// (a single row's 3 channels do not). Each sum still adds the same products in the same
/// order as Pillow's loop, so the result is the same.
const BLOCK_ROWS: usize = 8;
/// Sums per output column of a block.
const BLOCK_LANES: usize = BLOCK_ROWS * 3;

#[inline(always)]
fn resample_horizontal_any(
    src: &[u8],
    k: &AxisKernel,
    row_first: usize,
    row_last: usize,
) -> Vec<u8> {
    let (in_stride, out_stride) = (k.in_size * 3, k.out_size * 3);
    let blocks = (row_last - row_first) / BLOCK_ROWS;
    let blocked_last = row_first + blocks * BLOCK_ROWS;
    let mut out = vec![0u8; (row_last - row_first) * out_stride];
    let mut columns = vec![0u8; k.in_size * BLOCK_LANES];
    let block_rows =
        src[row_first * in_stride..blocked_last * in_stride].chunks_exact(BLOCK_ROWS * in_stride);
    for (rows, dst) in block_rows.zip(out.chunks_exact_mut(BLOCK_ROWS * out_stride)) {
        interleave_rows(rows, in_stride, &mut columns);
        resample_block(&columns, k, dst);
    }
    let tail = resample_rows(src, k, blocked_last, row_last);
    out[blocks * BLOCK_ROWS * out_stride..].copy_from_slice(&tail);
    out
}

/// `columns[(x · BLOCK_ROWS + r) · 3 + c]` = channel `c` of pixel `x` of row `r` of `rows`
/// (`BLOCK_ROWS` rows of `stride` bytes).
#[inline(always)]
fn interleave_rows(rows: &[u8], stride: usize, columns: &mut [u8]) {
    for (r, row) in rows.chunks_exact(stride).enumerate() {
        for (x, px) in row.chunks_exact(3).enumerate() {
            let at = (x * BLOCK_ROWS + r) * 3;
            columns[at..at + 3].copy_from_slice(px);
        }
    }
}

/// The horizontal pass of one interleaved block into `dst`: `BLOCK_ROWS` rows of
/// `k.out_size` pixels, row-major.
#[inline(always)]
fn resample_block(columns: &[u8], k: &AxisKernel, dst: &mut [u8]) {
    let out_stride = k.out_size * 3;
    for xx in 0..k.out_size {
        let (first, weights) = k.fixed_weights(xx);
        let mut sums = [1i32 << (PRECISION_BITS - 1); BLOCK_LANES];
        let taps = &columns[first * BLOCK_LANES..(first + weights.len()) * BLOCK_LANES];
        for (&w, column) in weights.iter().zip(taps.chunks_exact(BLOCK_LANES)) {
            let column: &[u8; BLOCK_LANES] = column.try_into().expect("chunks of BLOCK_LANES");
            for (s, &p) in sums.iter_mut().zip(column) {
                *s += i32::from(p) * w;
            }
        }
        for (r, px) in sums.chunks_exact(3).enumerate() {
            let at = r * out_stride + xx * 3;
            dst[at..at + 3].copy_from_slice(&[clip8(px[0]), clip8(px[1]), clip8(px[2])]);
        }
    }
}

/// Pillow's loop itself, row by row (the rows left over after the blocks).
fn resample_rows(src: &[u8], k: &AxisKernel, row_first: usize, row_last: usize) -> Vec<u8> {
    let in_stride = k.in_size * 3;
    let mut out = vec![0u8; (row_last - row_first) * k.out_size * 3];
    for (src, dst) in src[row_first * in_stride..row_last * in_stride]
        .chunks_exact(in_stride)
        .zip(out.chunks_exact_mut(k.out_size * 3))
    {
        for (xx, px) in dst.chunks_exact_mut(3).enumerate() {
            let (first, weights) = k.fixed_weights(xx);
            let taps = &src[first * 3..(first + weights.len()) * 3];
            let half = 1i32 << (PRECISION_BITS - 1);
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (&w, p) in weights.iter().zip(taps.chunks_exact(3)) {
                let &[r, g, b] = p else {
                    unreachable!("chunks of 3")
                };
                s0 += i32::from(r) * w;
                s1 += i32::from(g) * w;
                s2 += i32::from(b) * w;
            }
            px.copy_from_slice(&[clip8(s0), clip8(s1), clip8(s2)]);
        }
    }
    out
}

/// Pillow's `ImagingResampleVertical_8bpc`; `src` is `width` pixels wide and its row 0 is input
/// row `row_offset` (the horizontal pass may have skipped rows above). Dispatched as
/// [`resample_horizontal`] is.
fn resample_vertical(src: &[u8], width: usize, k: &AxisKernel, row_offset: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only requirement of the target-feature function.
        return unsafe { resample_vertical_avx2(src, width, k, row_offset) };
    }
    resample_vertical_any(src, width, k, row_offset)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resample_vertical_avx2(
    src: &[u8],
    width: usize,
    k: &AxisKernel,
    row_offset: usize,
) -> Vec<u8> {
    resample_vertical_any(src, width, k, row_offset)
}

#[inline(always)]
fn resample_vertical_any(src: &[u8], width: usize, k: &AxisKernel, row_offset: usize) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; k.out_size * stride];
    let mut sums = vec![0i32; stride];
    for (yy, dst) in out.chunks_exact_mut(stride).enumerate() {
        let (first, weights) = k.fixed_weights(yy);
        sums.fill(1 << (PRECISION_BITS - 1));
        for (i, &w) in weights.iter().enumerate() {
            let row = &src[(first - row_offset + i) * stride..][..stride];
            for (s, &p) in sums.iter_mut().zip(row) {
                *s += i32::from(p) * w;
            }
        }
        for (d, &s) in dst.iter_mut().zip(&sums) {
            *d = clip8(s);
        }
    }
    out
}

/// `img.resize((width, height), Image.BICUBIC)`.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage, ImageError> {
    ResizePlan::bicubic(img.width, img.height, width, height)?.apply(img)
}

// ---------------------------------------------------------------------------------------------
// Crop and letterbox
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Per-channel mean and std applied as `(u8 / 255 − mean) / std`, in f32, in that order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// CLIP (OpenAI, open_clip, EVA-CLIP): student and crop-teacher inputs.
    pub const CLIP: Self = Self::from_f64(
        [0.48145466, 0.4578275, 0.40821073],
        [0.26862954, 0.26130258, 0.27577711],
    );
    /// ImageNet (DINOv2, DINO): the VFM input.
    pub const IMAGENET: Self = Self::from_f64([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

    /// From the published (decimal, f64) constants, rounded to f32 once, as
    /// `torch.tensor(mean, dtype=torch.float32)` does.
    pub const fn from_f64(mean: [f64; 3], std: [f64; 3]) -> Self {
        Self {
            mean: [mean[0] as f32, mean[1] as f32, mean[2] as f32],
            std: [std[0] as f32, std[1] as f32, std[2] as f32],
        }
    }

    /// Normalises CHW pixels (3 planes of equal size) into f32, exactly as the reference does in
    /// PyTorch on CPU: `x = u8 as f32 / 255; (x − mean[c]) / std[c]`, each op rounded to f32.
    ///
    /// Each (channel, value) pair has one result, so it is computed once into a table and
    /// looked up: bit-identical to computing it per pixel, and several times faster (the
    /// data loader's hot path; `bench/loader.sh`). A length that is not a multiple of 3
    /// puts the extra values in the last channel.
    pub fn apply_chw(&self, chw: &[u8]) -> Vec<f32> {
        let tables = self.tables();
        let plane = chw.len() / 3;
        if plane == 0 {
            return chw
                .iter()
                .enumerate()
                .map(|(i, &v)| tables[i.min(2)][usize::from(v)])
                .collect();
        }
        let mut out = Vec::with_capacity(chw.len());
        let (first, rest) = chw.split_at(plane);
        let (second, third) = rest.split_at(plane);
        for (values, table) in [first, second, third].into_iter().zip(&tables) {
            out.extend(values.iter().map(|&v| table[usize::from(v)]));
        }
        out
    }

    /// `tables[c][v]` = `(v / 255 − mean[c]) / std[c]`, each op rounded to f32.
    fn tables(&self) -> [[f32; 256]; 3] {
        let mut tables = [[0.0f32; 256]; 3];
        for (c, table) in tables.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (f32::from(v as u8) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/data/testdata");

    fn image(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
        for y in 0..height {
            for x in 0..width {
                pixels.extend(f(x, y));
            }
        }
        RgbImage::from_raw(width, height, pixels).unwrap()
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        image(width, height, |x, y| {
            [
                (x * 7 + y * 3) as u8,
                (x * x + 5 * y) as u8,
                255u32.wrapping_sub(x * 11 + y) as u8,
            ]
        })
    }

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

    // --- resize coefficients -------------------------------------------------------------

    #[test]
    fn coefficients_are_normalised_and_stay_inside_the_input() {
        for (n_in, n_out) in [
            (640, 560),
            (512, 560),
            (37, 224),
            (451, 224),
            (350, 224),
            (7, 3),
            (1, 5),
            (5, 1),
            (1000, 7),
        ] {
            let k = AxisKernel::bicubic(n_in, n_out);
            for i in 0..n_out {
                let (first, w) = k.weights(i);
                assert!(
                    !w.is_empty() && first + w.len() <= n_in,
                    "{n_in}->{n_out} sample {i}: taps out of range"
                );
                let sum: f64 = w.iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-12,
                    "{n_in}->{n_out} sample {i}: f64 sum {sum}"
                );
                let (_, fixed) = k.fixed_weights(i);
                let fixed_sum: i64 = fixed.iter().map(|&v| i64::from(v)).sum();
                // Each weight is rounded on its own: the sum is within half a unit per tap.
                assert!(
                    (fixed_sum - (1 << PRECISION_BITS)).abs() <= fixed.len() as i64,
                    "{n_in}->{n_out} sample {i}: fixed sum {fixed_sum}"
                );
            }
        }
    }

    #[test]
    fn the_kernel_is_pillows_bicubic() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(2.0), 0.0);
        assert_eq!(bicubic_filter(0.5), 0.5625); // a = -0.5: 1.5·⅛ − 2.5·¼ + 1
        assert_eq!(bicubic_filter(-1.5), -0.0625);
        // Support scales with the reduction: 2 taps each side when enlarging, 2·scale when reducing.
        assert_eq!(AxisKernel::bicubic(10, 20).ksize, 5);
        assert_eq!(AxisKernel::bicubic(640, 224).ksize, 2 * 6 + 1);
    }

    // --- resize ----------------------------------------------------------------------------

    #[test]
    fn resize_to_the_same_size_is_the_identity() {
        let img = gradient(23, 17);
        assert_eq!(resize(&img, 23, 17).unwrap(), img);
        // A single pass where only one side changes leaves the other untouched too.
        let tall = resize(&img, 23, 40).unwrap();
        assert_eq!((tall.width, tall.height), (23, 40));
        let flat = image(9, 4, |_, y| [y as u8 * 60; 3]);
        let wider = resize(&flat, 20, 4).unwrap();
        for y in 0..4 {
            assert!((0..20).all(|x| wider.get(x, y) == [y as u8 * 60; 3]));
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let img = image(13, 7, |_, _| [17, 200, 255]);
        for (w, h) in [(5, 3), (40, 9), (13, 2), (1, 1)] {
            let out = resize(&img, w, h).unwrap();
            assert!(
                out.pixels.chunks_exact(3).all(|p| p == [17, 200, 255]),
                "{w}x{h}"
            );
        }
    }

    /// Hand-checked (and confirmed with Pillow 13): `[0, 0, 255, 255]` → 2 samples. Scale 2,
    /// support 4, output 0 centred at 1.0 sees inputs 0..3 at distances (−0.25, 0.25, 0.75,
    /// 1.25) → weights (0.8671875, 0.8671875, 0.2265625, −0.0703125) / 1.890625, so
    /// 255 · 0.15625 / 1.890625 = 21.07 → 21, and by symmetry 233.93 → 234.
    #[test]
    fn a_tiny_downscale_matches_the_hand_computation() {
        let img = image(4, 1, |x, _| [if x < 2 { 0 } else { 255 }; 3]);
        assert_eq!(
            resize(&img, 2, 1).unwrap().pixels,
            [21, 21, 21, 234, 234, 234]
        );
        // Enlarging 3 → 5, values from Pillow 13 (note the overshoot clipped at 0 and 255).
        let img = RgbImage::from_raw(3, 1, vec![10, 20, 30, 200, 100, 0, 50, 250, 120]).unwrap();
        let expected = [
            0, 14, 32, 83, 41, 14, 200, 100, 0, 111, 201, 77, 39, 255, 129,
        ];
        assert_eq!(resize(&img, 5, 1).unwrap().pixels, expected);
    }

    /// The blocked (and, with AVX2, vectorised) horizontal pass gives Pillow's row-by-row
    /// loop exactly, for row counts around the block size and any starting row.
    #[test]
    fn the_blocked_horizontal_pass_equals_the_row_loop() {
        for (w, h, out_w) in [
            (37, 29, 23),
            (64, 8, 90),
            (17, 7, 5),
            (640, 20, 560),
            (9, 41, 200),
        ] {
            let img = gradient(w, h);
            let k = AxisKernel::bicubic(w as usize, out_w);
            for (first, last) in [(0, h as usize), (3, h as usize), (1, 2), (0, 0)] {
                assert_eq!(
                    resample_horizontal(&img.pixels, &k, first, last),
                    resample_rows(&img.pixels, &k, first, last),
                    "{w}x{h} -> {out_w}, rows {first}..{last}"
                );
            }
        }
    }

    #[test]
    fn pillow_13_runs_the_vertical_pass_first_when_the_height_shrinks_much_more() {
        let plan = |w, h, ow, oh| ResizePlan::bicubic(w, h, ow, oh).unwrap().vertical_first();
        assert!(plan(160, 350, 102, 224)); // 126 > 2·58: the astronaut crop of the fixtures
        assert!(!plan(640, 427, 560, 374));
        assert!(!plan(180, 256, 56, 8)); // 248 = 2·124: not more than twice
        assert!(plan(50, 100, 80, 60)); // wider and shorter
        assert!(!plan(20, 30, 40, 60)); // enlarging
    }

    #[test]
    fn resize_refuses_empty_sizes_and_mismatched_plans() {
        let img = gradient(8, 8);
        assert!(matches!(
            resize(&img, 0, 4),
            Err(ImageError::EmptyResize { .. })
        ));
        let plan = ResizePlan::bicubic(9, 8, 4, 4).unwrap();
        assert!(matches!(
            plan.apply(&img),
            Err(ImageError::PlanMismatch { .. })
        ));
    }

    // --- crop and letterbox ----------------------------------------------------------------

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

    // --- normalisation ---------------------------------------------------------------------

    #[test]
    fn normalisation_is_u8_over_255_minus_mean_over_std_in_f32() {
        let norm = Normalization::CLIP;
        let chw = [0u8, 255, 128, 0, 255, 128];
        let out = norm.apply_chw(&chw);
        for (i, &v) in chw.iter().enumerate() {
            let c = i / 2;
            let x = f32::from(v) / 255.0;
            assert_eq!(
                out[i].to_bits(),
                ((x - norm.mean[c]) / norm.std[c]).to_bits()
            );
        }
        assert_eq!(
            Normalization::IMAGENET.mean,
            [0.485f64 as f32, 0.456f64 as f32, 0.406f64 as f32]
        );
        assert_eq!(Normalization::CLIP.std[2], 0.27577711f64 as f32);
    }

    /// The lookup tables give, value for value, the per-pixel formula (every u8, every
    /// channel, both constant sets), and odd lengths keep their channel assignment.
    #[test]
    fn normalisation_tables_match_the_formula_bit_for_bit() {
        for norm in [Normalization::CLIP, Normalization::IMAGENET] {
            for len in [0usize, 1, 2, 3 * 256, 3 * 256 + 2] {
                let chw: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
                let plane = len / 3;
                let out = norm.apply_chw(&chw);
                assert_eq!(out.len(), len);
                for (i, &v) in chw.iter().enumerate() {
                    let c = (i / plane.max(1)).min(2);
                    let want = (f32::from(v) / 255.0 - norm.mean[c]) / norm.std[c];
                    assert_eq!(out[i].to_bits(), want.to_bits(), "len {len} index {i}");
                }
            }
        }
    }
}
