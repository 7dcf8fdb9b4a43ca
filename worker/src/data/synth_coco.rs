//! Synthetic COCO datasets on disk (`worker synth-coco`): real JPEG and PNG files of the
//! [`super::synthetic`] images and a valid instances json, for the demo, tests and the index
//! benchmark.
//!
//! Layout (COCO's, and the defaults of `data.images_dir` / `data.annotations`):
//! `OUT/train2017/<id:012>.jpg|png` and `OUT/annotations/instances_train2017.json`.
//! Image `k` (0-based) has COCO id `7·(k+1)` (sparse, as COCO's are), every third one is a
//! PNG, and the json lists images in **descending** id order, so readers must sort.
//!
//! With defects ([`SynthOptions::defects`]) one entry of each kind a reader must survive is
//! appended after the good images ([`Defect`]), with ids above every good one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use proto::dataset::SkipReason;
use proto::job::{DataSource, DataSpec};
use proto::plan::rng::{PlanRng, Purpose};
use serde::Serialize;

use super::image::RgbImage;
use super::synthetic;

/// The image folder under the dataset root.
pub const IMAGES_DIR: &str = "train2017";
/// The annotations file under the dataset root.
pub const ANNOTATIONS: &str = "annotations/instances_train2017.json";
/// Side claimed by the decompression-bomb defect's header (30000 × 30000 = 900 M pixels,
/// ten times Pillow's limit), in pixels.
pub const BOMB_SIDE: u32 = 30_000;
/// JPEG quality of the written images (libjpeg scale 1–100).
const JPEG_QUALITY: f32 = 90.0;

/// The defects `--defects` adds, one json entry each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    /// `missing.jpg`: listed, never written.
    Missing,
    /// `empty.jpg`: zero bytes.
    Empty,
    /// `truncated.jpg`: the first half of a valid JPEG.
    Truncated,
    /// `not-an-image.jpg`: a text file.
    NotAnImage,
    /// `size-mismatch.jpg`: a valid JPEG whose json width is 7 pixels too large.
    SizeMismatch,
    /// `bomb.png`: a PNG header claiming [`BOMB_SIDE`]² pixels, with no pixel data.
    Bomb,
    /// `duplicate.jpg`: a valid JPEG listed under the id of the first good image.
    DuplicateId,
    /// `../evil.jpg`, written next to the image folder so a careless reader would find it.
    ParentDir,
    /// `/etc/passwd`.
    AbsolutePath,
}

impl Defect {
    pub const ALL: [Defect; 9] = [
        Defect::Missing,
        Defect::Empty,
        Defect::Truncated,
        Defect::NotAnImage,
        Defect::SizeMismatch,
        Defect::Bomb,
        Defect::DuplicateId,
        Defect::ParentDir,
        Defect::AbsolutePath,
    ];

    /// The entry's `file_name` in the json.
    pub const fn file_name(self) -> &'static str {
        match self {
            Defect::Missing => "missing.jpg",
            Defect::Empty => "empty.jpg",
            Defect::Truncated => "truncated.jpg",
            Defect::NotAnImage => "not-an-image.jpg",
            Defect::SizeMismatch => "size-mismatch.jpg",
            Defect::Bomb => "bomb.png",
            Defect::DuplicateId => "duplicate.jpg",
            Defect::ParentDir => "../evil.jpg",
            Defect::AbsolutePath => "/etc/passwd",
        }
    }

    /// Why a reader must skip it.
    pub const fn reason(self) -> SkipReason {
        match self {
            Defect::Missing => SkipReason::Missing,
            Defect::Empty => SkipReason::Empty,
            Defect::Truncated => SkipReason::Truncated,
            Defect::NotAnImage => SkipReason::NotAnImage,
            Defect::SizeMismatch => SkipReason::SizeMismatch,
            Defect::Bomb => SkipReason::TooLarge,
            Defect::DuplicateId => SkipReason::DuplicateId,
            Defect::ParentDir | Defect::AbsolutePath => SkipReason::PathTraversal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode a {format} image: {reason}")]
    Encode {
        format: &'static str,
        reason: String,
    },
    #[error("--images must be at least 1")]
    NoImages,
}

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    /// Good images.
    pub images: u32,
    /// Seeds the pixels ([`synthetic::image`]) and the boxes.
    pub seed: u64,
    /// Append one entry of each [`Defect`].
    pub defects: bool,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthReport {
    pub annotations: PathBuf,
    pub images_dir: PathBuf,
    /// Good images written.
    pub images: u32,
    /// Entries in the json's `images` (good images plus defects).
    pub entries: u32,
    /// Bytes of the annotations file.
    pub json_bytes: u64,
}

/// COCO id of good image `k` (0-based).
pub fn image_id(k: u32) -> u64 {
    7 * (u64::from(k) + 1)
}

#[derive(Serialize)]
struct JsonImage<'a> {
    license: u32,
    file_name: &'a str,
    coco_url: String,
    height: u32,
    width: u32,
    date_captured: &'static str,
    id: u64,
}

#[derive(Serialize)]
struct JsonAnnotation {
    segmentation: Vec<Vec<f64>>,
    area: f64,
    iscrowd: u8,
    image_id: u64,
    bbox: [f64; 4],
    category_id: u32,
    id: u64,
}

/// One image as the json lists it.
struct Listed {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// The synthetic dataset of a job (`data.source = "synthetic"`): written once into
/// `root` (assembled in a temp folder and renamed, so an interrupted write is redone,
/// never half-used), then read like any COCO dataset. Returns the `DataSpec` that
/// points at it.
///
/// Every process of a job (trainers, teachers) calls this at start: an exclusive lock on
/// `root.lock` makes one of them write while the others wait, then find it written.
pub fn ensure_job_dataset(data: &DataSpec, seed: u64, root: &Path) -> Result<DataSpec, SynthError> {
    let _lock = DirLock::acquire(&root.with_extension("lock"))?;
    if !root.join(ANNOTATIONS).exists() {
        let tmp = root.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        let options = SynthOptions {
            images: data.synthetic_images as u32,
            seed,
            defects: false,
        };
        write_dataset(&tmp, &options)?;
        if root.exists() {
            std::fs::remove_dir_all(root).map_err(io_err(root))?;
        }
        std::fs::rename(&tmp, root).map_err(io_err(root))?;
        tracing::info!(
            "wrote {} synthetic COCO images into {}",
            options.images,
            root.display()
        );
    }
    Ok(DataSpec {
        source: DataSource::Coco,
        coco_root: Some(root.display().to_string()),
        images_dir: IMAGES_DIR.into(),
        annotations: ANNOTATIONS.into(),
        ..data.clone()
    })
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(path: &Path) -> Result<Self, SynthError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = File::create(path).map_err(io_err(path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(path)(std::io::Error::last_os_error()));
        }
        Ok(Self { _file: file })
    }
}

/// Writes a synthetic dataset under `out` (module doc).
pub fn write_dataset(out: &Path, options: &SynthOptions) -> Result<SynthReport, SynthError> {
    if options.images == 0 {
        return Err(SynthError::NoImages);
    }
    let images_dir = out.join(IMAGES_DIR);
    std::fs::create_dir_all(&images_dir).map_err(io_err(&images_dir))?;
    let mut listed = Vec::new();
    for k in (0..options.images).rev() {
        let id = image_id(k);
        let img = synthetic::image(options.seed, id);
        let (file_name, bytes) = if k % 3 == 2 {
            (format!("{id:012}.png"), encode_png(&img)?)
        } else {
            (format!("{id:012}.jpg"), encode_jpeg(&img)?)
        };
        write_file(&images_dir.join(&file_name), &bytes)?;
        listed.push(Listed {
            id,
            file_name,
            width: img.width,
            height: img.height,
        });
    }
    if options.defects {
        let first_defect = image_id(options.images);
        for (k, defect) in Defect::ALL.into_iter().enumerate() {
            let id = first_defect + k as u64;
            listed.push(write_defect(out, &images_dir, defect, id, options.seed)?);
        }
    }
    let annotations = out.join(ANNOTATIONS);
    let json_bytes = write_json(&annotations, &listed, options.seed, |img, rng, ann| {
        // One box per image, inside it.
        let (w, h) = (u64::from(img.width.max(2)), u64::from(img.height.max(2)));
        let (x, y) = (rng.below(w / 2) as f64, rng.below(h / 2) as f64);
        let (bw, bh) = (1.0 + rng.below(w / 2) as f64, 1.0 + rng.below(h / 2) as f64);
        ann(JsonAnnotation {
            segmentation: vec![vec![x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            area: bw * bh,
            iscrowd: 0,
            image_id: img.id,
            bbox: [x, y, bw, bh],
            category_id: 1 + rng.below(2) as u32,
            id: 0,
        })
    })?;
    Ok(SynthReport {
        annotations,
        images_dir,
        images: options.images,
        entries: listed.len() as u32,
        json_bytes,
    })
}

/// Writes the file of `defect` (if it has one) and returns its json entry.
fn write_defect(
    out: &Path,
    images_dir: &Path,
    defect: Defect,
    id: u64,
    seed: u64,
) -> Result<Listed, SynthError> {
    let img = synthetic::image(seed, id);
    let mut entry = Listed {
        id,
        file_name: defect.file_name().to_string(),
        width: img.width,
        height: img.height,
    };
    let path = images_dir.join(defect.file_name());
    match defect {
        Defect::Missing | Defect::AbsolutePath => {}
        Defect::Empty => write_file(&path, b"")?,
        Defect::Truncated => {
            let jpeg = encode_jpeg(&img)?;
            write_file(&path, &jpeg[..jpeg.len() / 2])?;
        }
        Defect::NotAnImage => write_file(&path, b"This is a text file, not a JPEG.\n")?,
        Defect::SizeMismatch => {
            write_file(&path, &encode_jpeg(&img)?)?;
            entry.width += 7;
        }
        Defect::Bomb => {
            write_file(&path, &bomb_png(BOMB_SIDE, BOMB_SIDE))?;
            (entry.width, entry.height) = (BOMB_SIDE, BOMB_SIDE);
        }
        Defect::DuplicateId => {
            write_file(&path, &encode_jpeg(&img)?)?;
            entry.id = image_id(0);
        }
        Defect::ParentDir => write_file(&out.join("evil.jpg"), &encode_jpeg(&img)?)?,
    }
    Ok(entry)
}

/// Writes an annotations json of `images` entries only (no image files) with COCO-like
/// bulk: about 7 annotations per image, each with a polygon of 8 to 47 points, so that
/// 118,287 images give a file of COCO train2017's order of size (≈450 MB). For the index
/// benchmark. Returns the file's size in bytes.
pub fn write_index_only(path: &Path, images: u32, seed: u64) -> Result<u64, SynthError> {
    if images == 0 {
        return Err(SynthError::NoImages);
    }
    const SIDES: [u32; 6] = [640, 480, 427, 500, 375, 612];
    let mut rng = PlanRng::new(seed, Purpose::SyntheticImage, 2, 0);
    let listed: Vec<Listed> = (0..images)
        .rev()
        .map(|k| {
            let id = image_id(k);
            let (a, b) = (SIDES[rng.below(6) as usize], SIDES[rng.below(6) as usize]);
            Listed {
                id,
                file_name: format!("{id:012}.jpg"),
                width: a.max(b),
                height: a.min(b),
            }
        })
        .collect();
    write_json(path, &listed, seed, |img, rng, ann| {
        let round = |v: f64| (v * 100.0).round() / 100.0;
        for _ in 0..rng.below(15) {
            let (w, h) = (f64::from(img.width), f64::from(img.height));
            let points = 8 + rng.below(40);
            let mut polygon = Vec::with_capacity(2 * points as usize);
            for _ in 0..points {
                polygon.push(round(rng.below(u64::from(img.width) * 100) as f64 / 100.0));
                polygon.push(round(rng.below(u64::from(img.height) * 100) as f64 / 100.0));
            }
            let (x, y) = (round(w / 4.0), round(h / 4.0));
            ann(JsonAnnotation {
                segmentation: vec![polygon],
                area: round(w * h / 9.0),
                iscrowd: 0,
                image_id: img.id,
                bbox: [x, y, round(w / 3.0), round(h / 3.0)],
                category_id: 1 + rng.below(90) as u32,
                id: 0,
            })?;
        }
        Ok(())
    })
}

/// Receives one annotation of the image being written (its `id` is assigned on write).
type Emit<'a> = dyn FnMut(JsonAnnotation) -> std::io::Result<()> + 'a;

/// Streams a COCO instances json to `path` (atomically: temp file + rename): `info`,
/// `licenses`, `images`, then the annotations `annotate` emits for each image (ids are
/// assigned here, in order), then `categories`. Returns the file size in bytes.
fn write_json(
    path: &Path,
    images: &[Listed],
    seed: u64,
    annotate: impl FnMut(&Listed, &mut PlanRng, &mut Emit<'_>) -> std::io::Result<()>,
) -> Result<u64, SynthError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = path.with_extension("json.tmp");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write_json_to(&mut w, images, seed, annotate).map_err(io_err(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    let bytes = std::fs::metadata(path).map_err(io_err(path))?.len();
    Ok(bytes)
}

fn write_json_to(
    w: &mut BufWriter<File>,
    images: &[Listed],
    seed: u64,
    mut annotate: impl FnMut(&Listed, &mut PlanRng, &mut Emit<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    w.write_all(
        br#"{"info":{"description":"DeCLIP synthetic COCO","version":"1.0","year":2026,"contributor":"worker synth-coco","date_created":"2026/01/01"},"licenses":[{"url":"https://creativecommons.org/publicdomain/zero/1.0/","id":1,"name":"CC0"}],"images":["#,
    )?;
    for (i, img) in images.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(
            &mut *w,
            &JsonImage {
                license: 1,
                file_name: &img.file_name,
                coco_url: format!("http://synthetic.invalid/{}", img.file_name),
                height: img.height,
                width: img.width,
                date_captured: "2026-01-01 00:00:00",
                id: img.id,
            },
        )?;
    }
    w.write_all(br#"],"annotations":["#)?;
    let mut next_id = 1u64;
    let mut rng = PlanRng::new(seed, Purpose::SyntheticImage, 1, 0);
    for img in images {
        let mut emit = |mut a: JsonAnnotation| -> std::io::Result<()> {
            if next_id > 1 {
                w.write_all(b",")?;
            }
            a.id = next_id;
            next_id += 1;
            serde_json::to_writer(&mut *w, &a)?;
            Ok(())
        };
        annotate(img, &mut rng, &mut emit)?;
    }
    w.write_all(
        br#"],"categories":[{"supercategory":"shape","id":1,"name":"rectangle"},{"supercategory":"shape","id":2,"name":"ellipse"}]}"#,
    )?;
    w.flush()
}

/// `img` as an 8-bit RGB PNG.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, SynthError> {
    let err = |e: png::EncodingError| SynthError::Encode {
        format: "PNG",
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, img.width, img.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(&img.pixels).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

/// `img` as a baseline JPEG (libjpeg through mozjpeg, quality 90, libjpeg-turbo's defaults
/// rather than mozjpeg's slower progressive/trellis ones).
pub fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>, SynthError> {
    // libjpeg reports errors by unwinding (mozjpeg's contract).
    std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(img.width as usize, img.height as usize);
        c.set_quality(JPEG_QUALITY);
        let mut started = c.start_compress(Vec::new())?;
        started.write_scanlines(&img.pixels)?;
        started.finish()
    })
    .map_err(|_| SynthError::Encode {
        format: "JPEG",
        reason: "libjpeg failed".into(),
    })?
    .map_err(|e| SynthError::Encode {
        format: "JPEG",
        reason: e.to_string(),
    })
}

/// A PNG whose header claims `width × height` RGB pixels with a single empty IDAT behind it:
/// a decompression bomb as a reader sees it before decoding (a few dozen bytes on disk).
pub fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    // 8-bit RGB, deflate, adaptive filtering, no interlace.
    ihdr.extend([8, 2, 0, 0, 0]);
    for (kind, data) in [
        (*b"IHDR", &ihdr[..]),
        (*b"IDAT", &[][..]),
        (*b"IEND", &[][..]),
    ] {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    out
}

/// CRC-32 (PNG's and zlib's: reflected, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::data::image::{decode, DecodeOptions, ImageError};

    #[test]
    fn written_images_decode_to_their_listed_size() {
        let img = synthetic::image(3, 7);
        let png = decode(
            &encode_png(&img).unwrap(),
            Path::new("x.png"),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(png, img);
        let jpeg = decode(
            &encode_jpeg(&img).unwrap(),
            Path::new("x.jpg"),
            &Default::default(),
        )
        .unwrap();
        assert_eq!((jpeg.width, jpeg.height), (img.width, img.height));
    }

    #[test]
    fn the_bomb_is_refused_from_its_header() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        let err = decode(
            &bomb_png(BOMB_SIDE, BOMB_SIDE),
            Path::new("bomb.png"),
            &DecodeOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooLarge {
                    width: 30_000,
                    height: 30_000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_dataset_lists_every_image_and_defect() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_dataset(
            dir.path(),
            &SynthOptions {
                images: 4,
                seed: 1,
                defects: true,
            },
        )
        .unwrap();
        assert_eq!(report.entries, 4 + Defect::ALL.len() as u32);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report.annotations).unwrap()).unwrap();
        let images = json["images"].as_array().unwrap();
        assert_eq!(images.len(), 13);
        assert_eq!(images[0]["id"], 28, "descending ids");
        assert_eq!(json["annotations"].as_array().unwrap().len(), 13);
        assert!(dir.path().join("evil.jpg").exists());
        assert!(report.images_dir.join("000000000021.png").exists());
        assert_eq!(
            std::fs::metadata(report.images_dir.join("empty.jpg"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn index_only_json_has_bulk_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/instances.json");
        let bytes = write_index_only(&path, 100, 0).unwrap();
        // ≈ 3.8 kB per image, as COCO train2017 (448 MB / 118,287 images).
        assert!((200_000..800_000).contains(&bytes), "{bytes}");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["images"].as_array().unwrap().len(), 100);
    }
}
