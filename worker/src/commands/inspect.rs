//! `worker inspect`: every intermediate tensor of the DeCLIP forward for a few
//! images, through the job's real preprocessing and models. The user's tool to
//! check a weights conversion, and the test hook for parity.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use proto::job::JobSpec;
use proto::plan::crops::{CanvasMap, CropBox};
use tch::{Device, Kind, Tensor};
use worker::data::image::{self, DecodeOptions, Normalization, Placement, RgbImage};
use worker::data::tensor::batch;
use worker::distill::losses::LossWeights;
use worker::distill::roi_align::RoiBox;
use worker::distill::step::{self, StepConfig, Targets};
use worker::model::decoupled::{DecoupledConfig, DecoupledTower};
use worker::model::towers::{build_student, build_vfm};

/// What to inspect.
pub struct InspectRequest {
    pub job: JobSpec,
    pub student_weights: Option<PathBuf>,
    pub vfm_weights: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub boxes: Option<PathBuf>,
    pub device: Device,
}

/// Runs the forward and returns the named tensors (float32, CPU), in output order.
pub fn inspect(req: &InspectRequest) -> anyhow::Result<Vec<(String, Tensor)>> {
    ensure!(!req.images.is_empty(), "give at least one --image");
    let images: Vec<RgbImage> = req
        .images
        .iter()
        .map(|p| {
            image::open(p, &DecodeOptions::default())
                .with_context(|| format!("reading image {}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let boxes = match &req.boxes {
        Some(path) => Some(read_boxes(path, images.len())?),
        None => None,
    };
    let spec = &req.job;
    let (_student_vs, student, student_source) = build_student(
        &spec.model.student,
        req.student_weights.as_deref(),
        req.device,
    )
    .context("student weights")?;
    let (_vfm_vs, vfm, vfm_source) =
        build_vfm(&spec.model.vfm, req.vfm_weights.as_deref(), req.device)
            .context("VFM weights")?;
    tracing::info!("student: {student_source}; VFM: {vfm_source}");

    let data = &spec.data;
    let letterboxed =
        |size: usize, norm: &Normalization, placement: Placement, imgs: &[RgbImage]| {
            let inputs = imgs
                .iter()
                .map(|img| Ok(image::letterbox(img, size as u32, placement)?.to_input_tensor(norm)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok::<_, anyhow::Error>(batch(&inputs)?.to_device(req.device))
        };
    let student_input = letterboxed(
        data.student_resolution,
        &Normalization::CLIP,
        Placement::TopLeft,
        &images,
    )?;
    let vfm_input = letterboxed(
        data.vfm_resolution,
        &Normalization::IMAGENET,
        Placement::TopLeft,
        &images,
    )?;

    let step = StepConfig {
        decoupled: DecoupledConfig {
            mode: spec.model.student.decoupled.unwrap_or_default(),
            scale: spec.model.student.attention_scale.unwrap_or(false),
        },
        context_resize: spec.loss.context_resize,
    };
    let student_grid = data.student_resolution / DecoupledTower::arch(&student).patch_size;
    let mut rois = Vec::new();
    let mut crops = Vec::new();
    for (index, (img, img_boxes)) in images.iter().zip(boxes.iter().flatten()).enumerate() {
        let map = CanvasMap::new(
            img.width,
            img.height,
            data.student_resolution as u32,
            student_grid as u32,
        )?;
        for b in img_boxes {
            let on_grid = map.grid_box(*b);
            rois.push(RoiBox {
                batch: index,
                x0: on_grid.x0 as f32,
                y0: on_grid.y0 as f32,
                x1: on_grid.x1 as f32,
                y1: on_grid.y1 as f32,
            });
            let pixels = b.pixel_box(img.width, img.height)?;
            let crop = image::crop(
                img,
                [pixels.x0, pixels.y0, pixels.x1, pixels.y1].map(i64::from),
            )?;
            crops.push(
                image::letterbox(&crop, data.crop_resolution as u32, Placement::Centred)?
                    .to_input_tensor(&Normalization::CLIP),
            );
        }
    }
    if boxes.is_some() {
        ensure!(!rois.is_empty(), "--boxes lists no box");
    }
    tch::no_grad(|| {
        // The crop teacher is the original student: these are its weights.
        let crop_inputs = (!crops.is_empty())
            .then(|| batch(&crops))
            .transpose()?
            .map(|t| t.to_device(req.device));
        let crop_embeddings = match &crop_inputs {
            Some(inputs) => student.image_embedding(inputs)?,
            None => Tensor::zeros(
                [0, DecoupledTower::arch(&student).embed_dim as i64],
                (Kind::Float, req.device),
            ),
        };
        let targets = Targets {
            crop_embeddings,
            vfm_features: vfm.patch_features(&vfm_input)?,
        };
        let outputs = step::forward(&student, step, &student_input, &rois, &targets)?;
        let mut out = vec![
            ("student_input".to_string(), student_input.shallow_clone()),
            ("content_map".into(), outputs.content_map),
            ("context".into(), outputs.context),
            ("vfm_input".into(), vfm_input),
            ("vfm_features".into(), targets.vfm_features),
            ("affinity_teacher".into(), outputs.affinity_teacher),
            ("affinity_student".into(), outputs.affinity_student),
        ];
        if let Some(crop_inputs) = crop_inputs {
            let weights = LossWeights {
                content: spec.loss.content_weight,
                context: spec.loss.context_weight,
            };
            out.push(("roi_features".into(), outputs.roi_features));
            out.push(("crop_inputs".into(), crop_inputs));
            out.push(("crop_embeddings".into(), targets.crop_embeddings));
            out.push(("loss_content".into(), outputs.terms.content.mean()));
            out.push(("loss_context".into(), outputs.terms.context.mean()));
            out.push(("loss_total".into(), outputs.terms.total(weights)));
        }
        Ok(out
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous(),
                )
            })
            .collect())
    })
}

/// BOXES.json: one list per image, each box `[x0, y0, x1, y1]` in original pixels.
fn read_boxes(path: &Path, images: usize) -> anyhow::Result<Vec<Vec<CropBox>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lists: Vec<Vec<[f64; 4]>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list (one per --image) of lists of [x0, y0, x1, y1]",
            path.display()
        )
    })?;
    if lists.len() != images {
        bail!(
            "{}: {} box lists for {} images; give one list per --image, in order",
            path.display(),
            lists.len(),
            images
        );
    }
    lists
        .into_iter()
        .enumerate()
        .map(|(i, boxes)| {
            boxes
                .into_iter()
                .enumerate()
                .map(|(j, [x0, y0, x1, y1])| {
                    let ok = [x0, y0, x1, y1].iter().all(|v| v.is_finite()) && x1 > x0 && y1 > y0;
                    ensure!(
                        ok,
                        "{}: image {i} box {j} [{x0}, {y0}, {x1}, {y1}] needs x1 > x0 and y1 > y0",
                        path.display()
                    );
                    Ok(CropBox { x0, y0, x1, y1 })
                })
                .collect()
        })
        .collect()
}

/// Writes the tensors to `out` atomically (temp file, fsync, rename).
pub fn write_tensors(out: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        out.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("inspect"),
        std::process::id()
    ));
    Tensor::write_safetensors(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(())
}
