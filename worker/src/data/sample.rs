//! One training sample, prepared exactly as docs/method.md §2–3 says: the
//! student and VFM letterboxes, and the crop plan of (seed, epoch, image id):
//! RoI boxes on the student's feature grid and the teacher's crops.
//!
//! The crop plan and the box mappings come from `proto::plan::crops`, so a
//! teacher pool and a trainer derive the same boxes.

use proto::cache::ContentKey;
use proto::plan::crops::{CanvasMap, CropBox, CropPlan, ImageCrops};
use tch::Tensor;

pub use super::error::SampleError;
use super::image::{self, Normalization, Placement, RgbImage};
use super::source::SourceImage;
use super::tensor::{batch, TensorError};
use crate::geometry::RoiBox;

/// Input sizes of one job (pixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolutions {
    pub student: u32,
    /// Side of the student's patch grid (`student / patch`).
    pub student_grid: u32,
    pub vfm: u32,
    pub crop: u32,
}

impl Resolutions {
    /// The input sizes a job configures (`data.*_resolution`, the student's patch size).
    pub fn of_job(spec: &proto::job::JobSpec) -> Self {
        let d = &spec.data;
        Self {
            student: d.student_resolution as u32,
            student_grid: (d.student_resolution / spec.model.student.arch().patch_size) as u32,
            vfm: d.vfm_resolution as u32,
            crop: d.crop_resolution as u32,
        }
    }
}

/// A prepared image: model inputs and its crops.
#[derive(Debug)]
pub struct Sample {
    pub image_id: u64,
    /// `[3,S,S]` CLIP-normalised.
    pub student_input: Tensor,
    /// `[3,V,V]` ImageNet-normalised.
    pub vfm_input: Tensor,
    /// RoI boxes on the student grid (patch units), `batch` left 0.
    pub grid_boxes: Vec<RoiBox>,
    /// `[K,3,c,c]` CLIP-normalised centred crops, one per grid box.
    pub crop_inputs: Tensor,
}

/// Prepares `img` (COCO id `image_id`) for `epoch` under `plan`: [`model_inputs`] and
/// [`crops`].
pub fn prepare(
    img: &RgbImage,
    image_id: u64,
    epoch: u32,
    plan: &CropPlan,
    res: Resolutions,
) -> Result<Sample, SampleError> {
    let (student_input, vfm_input) = model_inputs(img, image_id, res)?;
    let (grid_boxes, crop_inputs) = crops(img, image_id, epoch, plan, res)?;
    Ok(Sample {
        image_id,
        student_input,
        vfm_input,
        grid_boxes,
        crop_inputs,
    })
}

/// The student and VFM inputs of `img`: `[3,S,S]` CLIP-normalised and `[3,V,V]`
/// ImageNet-normalised, both letterboxed top-left.
pub fn model_inputs(
    img: &RgbImage,
    image_id: u64,
    res: Resolutions,
) -> Result<(Tensor, Tensor), SampleError> {
    let image_err = |source| SampleError::Image { image_id, source };
    let student = image::letterbox(img, res.student, Placement::TopLeft).map_err(image_err)?;
    let vfm = image::letterbox(img, res.vfm, Placement::TopLeft).map_err(image_err)?;
    Ok((
        student.to_input_tensor(&Normalization::CLIP),
        vfm.to_input_tensor(&Normalization::IMAGENET),
    ))
}

/// The crop plan of `img` for `epoch` and its RoI boxes on the student grid (patch
/// units, `batch` 0), in the plan's order. No pixel is touched: cache-mode trainers need
/// only this.
pub fn plan_boxes(
    img_w: u32,
    img_h: u32,
    image_id: u64,
    epoch: u32,
    plan: &CropPlan,
    res: Resolutions,
) -> Result<(ImageCrops, Vec<RoiBox>), SampleError> {
    let crop_err = |source| SampleError::Crop { image_id, source };
    let crops = plan.draw(epoch, image_id, img_w, img_h).map_err(crop_err)?;
    let map = CanvasMap::new(img_w, img_h, res.student, res.student_grid).map_err(crop_err)?;
    let grid_boxes = crops
        .crops
        .iter()
        .map(|crop| {
            let g = map.grid_box(crop.bbox);
            RoiBox {
                batch: 0,
                x0: g.x0 as f32,
                y0: g.y0 as f32,
                x1: g.x1 as f32,
                y1: g.y1 as f32,
            }
        })
        .collect();
    Ok((crops, grid_boxes))
}

/// The teacher's crops of a plan: `[K,3,c,c]` CLIP-normalised, each cut from the
/// original image at its whole-pixel box and letterboxed centred (docs/method.md §2).
pub fn crop_inputs(
    img: &RgbImage,
    crops: &ImageCrops,
    res: Resolutions,
) -> Result<Tensor, SampleError> {
    let image_id = crops.image_id;
    let image_err = |source| SampleError::Image { image_id, source };
    let crop_err = |source| SampleError::Crop { image_id, source };
    let mut inputs = Vec::with_capacity(crops.crops.len());
    for crop in &crops.crops {
        let px = crop
            .bbox
            .pixel_box(img.width, img.height)
            .map_err(crop_err)?;
        let cut =
            image::crop(img, [px.x0, px.y0, px.x1, px.y1].map(i64::from)).map_err(image_err)?;
        let boxed = image::letterbox(&cut, res.crop, Placement::Centred).map_err(image_err)?;
        inputs.push(boxed.to_input_tensor(&Normalization::CLIP));
    }
    Ok(batch(&inputs)?)
}

/// The crops of `img` for `epoch` under `plan`: their RoI boxes on the student grid
/// (patch units, `batch` 0) and `[K,3,c,c]` CLIP-normalised centred crops, in the same
/// order.
pub fn crops(
    img: &RgbImage,
    image_id: u64,
    epoch: u32,
    plan: &CropPlan,
    res: Resolutions,
) -> Result<(Vec<RoiBox>, Tensor), SampleError> {
    let (plan_crops, grid_boxes) = plan_boxes(img.width, img.height, image_id, epoch, plan, res)?;
    Ok((grid_boxes, crop_inputs(img, &plan_crops, res)?))
}

/// The student input of `img` alone: `[3,S,S]` CLIP-normalised, letterboxed top-left.
pub fn student_input(
    img: &RgbImage,
    image_id: u64,
    res: Resolutions,
) -> Result<Tensor, SampleError> {
    let student = image::letterbox(img, res.student, Placement::TopLeft)
        .map_err(|source| SampleError::Image { image_id, source })?;
    Ok(student.to_input_tensor(&Normalization::CLIP))
}

/// The VFM input of `img` alone: `[3,V,V]` ImageNet-normalised, letterboxed top-left.
pub fn vfm_input(img: &RgbImage, image_id: u64, res: Resolutions) -> Result<Tensor, SampleError> {
    let vfm = image::letterbox(img, res.vfm, Placement::TopLeft)
        .map_err(|source| SampleError::Image { image_id, source })?;
    Ok(vfm.to_input_tensor(&Normalization::IMAGENET))
}

/// What finds a sample's record in the teacher cache and checks it is the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheRef {
    /// Position in the dataset index (selects the shard and the record).
    pub index: u32,
    /// Dataset id of the image actually read (after skip replacement).
    pub image_id: u64,
    /// Hash of the bytes read.
    pub key: ContentKey,
    pub epoch: u32,
    /// The plan's boxes for `epoch` (original pixels, unrounded), in crop order.
    pub boxes: Vec<CropBox>,
}

/// A sample for a cache-mode trainer: the student input, the RoIs and the record
/// reference. No crop is cut and no VFM input is made (the teacher did that work).
#[derive(Debug)]
pub struct CachedSample {
    /// `[3,S,S]` CLIP-normalised.
    pub student_input: Tensor,
    /// RoI boxes on the student grid (patch units), `batch` left 0.
    pub grid_boxes: Vec<RoiBox>,
    pub record: CacheRef,
}

/// Prepares a cache-mode sample of `read` (index position `index`) for `epoch`.
pub fn prepare_cached(
    read: &SourceImage,
    index: u32,
    epoch: u32,
    plan: &CropPlan,
    res: Resolutions,
) -> Result<CachedSample, SampleError> {
    let img = &read.image;
    let (crops, grid_boxes) = plan_boxes(img.width, img.height, read.id, epoch, plan, res)?;
    Ok(CachedSample {
        student_input: student_input(img, read.id, res)?,
        grid_boxes,
        record: CacheRef {
            index,
            image_id: read.id,
            key: read.key,
            epoch,
            boxes: crops.crops.iter().map(|c| c.bbox).collect(),
        },
    })
}

/// Stacks cache-mode samples into a [`Batch`] whose `vfm_inputs` and `crop_inputs` are
/// empty (zero rows), and the record references in batch order.
pub fn collate_cached(
    samples: Vec<CachedSample>,
    res: Resolutions,
) -> Result<(Batch, Vec<CacheRef>), SampleError> {
    let mut rois = Vec::new();
    for (index, s) in samples.iter().enumerate() {
        rois.extend(s.grid_boxes.iter().map(|b| RoiBox { batch: index, ..*b }));
    }
    let student: Vec<Tensor> = samples
        .iter()
        .map(|s| s.student_input.shallow_clone())
        .collect();
    let (v, c) = (i64::from(res.vfm), i64::from(res.crop));
    let batch = Batch {
        image_ids: samples.iter().map(|s| s.record.image_id).collect(),
        student_inputs: batch(&student)?,
        vfm_inputs: Tensor::zeros([0, 3, v, v], (tch::Kind::Float, tch::Device::Cpu)),
        rois,
        crop_inputs: Tensor::zeros([0, 3, c, c], (tch::Kind::Float, tch::Device::Cpu)),
    };
    Ok((batch, samples.into_iter().map(|s| s.record).collect()))
}

/// A batch of prepared samples (CPU tensors).
#[derive(Debug)]
pub struct Batch {
    pub image_ids: Vec<u64>,
    /// `[B,3,S,S]`
    pub student_inputs: Tensor,
    /// `[B,3,V,V]`
    pub vfm_inputs: Tensor,
    /// All crops in image-then-box order; `batch` is the image's index in this batch.
    pub rois: Vec<RoiBox>,
    /// `[K,3,c,c]`, same order as `rois`; zero rows in cache mode.
    pub crop_inputs: Tensor,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.image_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image_ids.is_empty()
    }
}

/// Stacks samples into a batch.
pub fn collate(samples: Vec<Sample>) -> Result<Batch, SampleError> {
    let mut rois = Vec::new();
    for (index, s) in samples.iter().enumerate() {
        rois.extend(s.grid_boxes.iter().map(|b| RoiBox { batch: index, ..*b }));
    }
    let student: Vec<Tensor> = samples
        .iter()
        .map(|s| s.student_input.shallow_clone())
        .collect();
    let vfm: Vec<Tensor> = samples
        .iter()
        .map(|s| s.vfm_input.shallow_clone())
        .collect();
    let crops: Vec<Tensor> = samples
        .iter()
        .map(|s| s.crop_inputs.shallow_clone())
        .collect();
    Ok(Batch {
        image_ids: samples.iter().map(|s| s.image_id).collect(),
        student_inputs: batch(&student)?,
        vfm_inputs: batch(&vfm)?,
        rois,
        crop_inputs: Tensor::f_cat(&crops, 0).map_err(TensorError::from)?,
    })
}
