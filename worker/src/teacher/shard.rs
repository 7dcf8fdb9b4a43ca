//! One teacher task: compute and write the cache file of one shard.

use std::ops::Range;
use std::path::Path;

use proto::job::{Compression, JobSpec};
use proto::plan::crops::{CropBox, CropPlan};
use tch::{Kind, Tensor};

pub use super::cache::ShardWritten;
use super::cache::{CropDtype, RecordEntry, ShardHeader, ShardWriter};
use super::compress::{self, PcaBasis, Storage};
use super::models::TeacherModels;
use super::TeacherError;
use crate::data::sample::{self, Resolutions};
use crate::data::source::ImageSource;
use crate::faults;

/// Images whose features fit the PCA basis and decide `auto` (the shard's first ones).
pub const FIT_IMAGES: usize = 4;

/// One image's teacher outputs before encoding.
struct Computed {
    index: u32,
    image_id: u64,
    key: String,
    /// `[C, gh, gw]` fp32, CPU.
    features: Tensor,
    /// Per epoch: the plan's boxes and the crop embeddings `[K, E]`, CPU.
    epochs: Vec<(Vec<CropBox>, Tensor)>,
}

/// Computes shard `shard` (index positions `range`) of `spec` from `source` with
/// `models` and writes it atomically under `dir`: VFM features of every image and the
/// crop teacher's embeddings of the crop plan of every epoch of the job, the crops cut
/// exactly as the online path cuts them (`data::sample`). `progress(done)` is called
/// after each image; when it returns false (the lease is lost) the shard is abandoned
/// and its temporary file deleted.
pub fn write_shard(
    spec: &JobSpec,
    models: &TeacherModels,
    source: &dyn ImageSource,
    shard: u32,
    range: Range<u32>,
    dir: &Path,
    progress: &mut dyn FnMut(u32) -> bool,
) -> Result<ShardWritten, TeacherError> {
    let mut writer = ShardWriter::create(dir, shard)?;
    let epochs = spec.train.epochs as u32;
    let crop_dtype = match spec.teachers.compression {
        Compression::Fp32 => CropDtype::Fp32,
        _ => CropDtype::Fp16,
    };
    let mut codec: Option<(Storage, Option<PcaBasis>)> = None;
    let mut pending: Vec<Computed> = Vec::new();
    let mut records = Vec::with_capacity(range.len());
    let mut layout = None;
    let fit_images = FIT_IMAGES.min(range.len());
    for (done, index) in range.clone().enumerate() {
        let computed = compute_image(spec, models, source, index, epochs)?;
        let size = computed.features.size();
        let embed = computed.epochs.first().map(|(_, e)| e.size()[1]);
        layout.get_or_insert((size[0] as usize, size[1] as usize, size[2] as usize, embed));
        pending.push(computed);
        if codec.is_none() && pending.len() >= fit_images {
            codec = Some(resolve_codec(spec, &pending)?);
        }
        if let Some((storage, pca)) = &codec {
            for c in pending.drain(..) {
                records.push(write_record(
                    &mut writer,
                    c,
                    *storage,
                    pca.as_ref(),
                    crop_dtype,
                )?);
                faults::hold(faults::RECORD_WRITTEN);
            }
        }
        if !progress(done as u32 + 1) {
            return Err(TeacherError::Abandoned { shard });
        }
    }
    let (storage, pca) = match codec {
        Some(c) => c,
        None => resolve_codec(spec, &pending)?,
    };
    let pca_blob = match &pca {
        Some(p) => Some(writer.blob(&p.to_bytes())?),
        None => None,
    };
    let (channels, grid_h, grid_w, embed) = layout.unwrap_or((0, 0, 0, None));
    let header = ShardHeader {
        format_version: proto::cache::FORMAT_VERSION,
        fingerprint: models.fingerprint(),
        shard,
        start: range.start,
        end: range.end,
        epochs,
        vfm_channels: channels,
        grid_h,
        grid_w,
        vfm_storage: storage,
        pca: pca_blob,
        embed_dim: embed.unwrap_or(spec.model.student.arch().embed_dim as i64) as usize,
        crop_dtype,
        records,
    };
    Ok(writer.finish(&header)?)
}

/// The storage of this shard: the configured one, or `auto`'s choice on `sample`.
fn resolve_codec(
    spec: &JobSpec,
    sample: &[Computed],
) -> Result<(Storage, Option<PcaBasis>), TeacherError> {
    let rank = spec.teachers.pca_rank;
    let stacked = || {
        let f: Vec<Tensor> = sample.iter().map(|c| c.features.shallow_clone()).collect();
        Tensor::stack(&f, 0)
    };
    Ok(match spec.teachers.compression {
        Compression::Fp32 => (Storage::Fp32, None),
        Compression::Fp16 => (Storage::Fp16, None),
        Compression::Int8 => (Storage::Int8, None),
        Compression::Pca => {
            let pca = PcaBasis::fit(&compress::batch_tokens(&stacked()), rank)?;
            (Storage::Pca { rank: pca.rank() }, Some(pca))
        }
        Compression::Auto if sample.is_empty() => (Storage::Fp16, None),
        Compression::Auto => compress::choose_auto(&stacked(), rank)?,
    })
}

fn write_record(
    writer: &mut ShardWriter,
    c: Computed,
    storage: Storage,
    pca: Option<&PcaBasis>,
    crop_dtype: CropDtype,
) -> Result<RecordEntry, TeacherError> {
    let vfm = compress::encode(&compress::to_tokens(&c.features), storage, pca)?;
    let bytes = super::cache::encode_record(&vfm, &c.epochs, crop_dtype);
    Ok(RecordEntry {
        index: c.index,
        image_id: c.image_id,
        key: c.key,
        blob: writer.blob(&bytes)?,
    })
}

/// The teachers on one image: VFM features of the whole image and crop embeddings of
/// every epoch's plan (all epochs' crops in one forward).
fn compute_image(
    spec: &JobSpec,
    models: &TeacherModels,
    source: &dyn ImageSource,
    index: u32,
    epochs: u32,
) -> Result<Computed, TeacherError> {
    let res = Resolutions::of_job(spec);
    let plan = CropPlan {
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
    };
    let read = source.read(index)?;
    let img = &read.image;
    let vfm_input = sample::vfm_input(img, read.id, res)?;
    let mut plans = Vec::with_capacity(epochs as usize);
    let mut crops = Vec::with_capacity(epochs as usize);
    for epoch in 0..epochs {
        let (plan_crops, _) =
            sample::plan_boxes(img.width, img.height, read.id, epoch, &plan, res)?;
        crops.push(sample::crop_inputs(img, &plan_crops, res)?);
        plans.push(plan_crops.crops.iter().map(|c| c.bbox).collect::<Vec<_>>());
    }
    let targets = models.targets(&Tensor::cat(&crops, 0), &vfm_input.unsqueeze(0))?;
    let embeddings = targets
        .crop_embeddings
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float);
    let mut at = 0i64;
    let mut per_epoch = Vec::with_capacity(plans.len());
    for boxes in plans {
        let k = boxes.len() as i64;
        per_epoch.push((boxes, embeddings.narrow(0, at, k)));
        at += k;
    }
    Ok(Computed {
        index,
        image_id: read.id,
        key: read.key.hex(),
        features: targets
            .vfm_features
            .get(0)
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float),
        epochs: per_epoch,
    })
}

/// What [`ensure_shard`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardOutcome {
    /// A usable file (same fingerprint) was already in place.
    Present {
        shard: u32,
    },
    Written(ShardWritten),
}

/// Writes shard `shard` unless `dir` already holds a usable file of it (same
/// fingerprint, readable header). A stale or unreadable file is replaced.
pub fn ensure_shard(
    spec: &JobSpec,
    models: &TeacherModels,
    source: &dyn ImageSource,
    shards: &proto::plan::order::Shards,
    shard: u32,
    dir: &Path,
) -> Result<ShardOutcome, TeacherError> {
    match super::cache::ShardReader::open(dir, shard, &models.fingerprint()) {
        Ok(_) => return Ok(ShardOutcome::Present { shard }),
        Err(super::cache::CacheError::Missing { .. }) => {}
        Err(e) => tracing::warn!("recomputing: {e}"),
    }
    let range = shards
        .range(shard)
        .ok_or(super::cache::CacheError::OutOfRange {
            index: shard.saturating_mul(shards.shard_size()),
            images: shards.num_images(),
        })?;
    let total = range.len();
    let mut progress = |done: u32| {
        tracing::info!("shard {shard}: image {done}/{total}");
        true
    };
    Ok(ShardOutcome::Written(write_shard(
        spec,
        models,
        source,
        shard,
        range,
        dir,
        &mut progress,
    )?))
}
