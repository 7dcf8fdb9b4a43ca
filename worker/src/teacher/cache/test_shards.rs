//! Small shard files written through the real [`ShardWriter`], and what each record was
//! made from, for the unit tests of the cache module (no teacher models needed).

use std::ops::Range;
use std::path::Path;

use proto::cache::{ContentKey, FORMAT_VERSION};
use proto::plan::crops::CropBox;
use tch::{Kind, Tensor};

use super::format::{encode_record, CropDtype, RecordEntry, ShardHeader};
use super::writer::{ShardWriter, ShardWritten};
use crate::data::sample::CacheRef;
use crate::teacher::compress::{self, PcaBasis, Storage};

/// The fingerprint test shards are written with (unless a test asks for another).
pub(super) const FINGERPRINT: &str = "teachers-a";
/// VFM channels, patch grid (not square, so a transposed grid would show) and crop
/// embedding width of every test shard.
pub(super) const CHANNELS: usize = 3;
pub(super) const GRID_H: usize = 2;
pub(super) const GRID_W: usize = 3;
pub(super) const EMBED: usize = 4;
/// Crop-plan epochs per record.
pub(super) const EPOCHS: u32 = 2;

/// How a test shard is stored.
pub(super) struct Layout<'a> {
    pub fingerprint: &'a str,
    pub storage: Storage,
    /// Written as the shard's PCA blob when given.
    pub pca: Option<&'a PcaBasis>,
    pub crop: CropDtype,
}

impl Default for Layout<'_> {
    fn default() -> Self {
        Self {
            fingerprint: FINGERPRINT,
            storage: Storage::Fp32,
            pca: None,
            crop: CropDtype::Fp32,
        }
    }
}

/// What one record was made from: what reading it must give back.
pub(super) struct Source {
    pub index: u32,
    pub image_id: u64,
    pub key: ContentKey,
    /// `[C, gh, gw]` fp32.
    pub features: Tensor,
    /// Per epoch: boxes and embeddings `[K, E]` fp32.
    pub epochs: Vec<(Vec<CropBox>, Tensor)>,
}

impl Source {
    /// The trainer's reference to this record for `epoch`, as `data::sample` makes it.
    pub fn cache_ref(&self, epoch: u32) -> CacheRef {
        CacheRef {
            index: self.index,
            image_id: self.image_id,
            key: self.key,
            epoch,
            boxes: self.epochs[epoch as usize].0.clone(),
        }
    }
}

/// The dataset id of the image at index position `index` (not the index itself, so a
/// mix-up of the two shows).
pub(super) fn image_id(index: u32) -> u64 {
    1000 + 7 * u64::from(index)
}

/// The record of index position `index`: values that differ per index, channel, token,
/// epoch and crop, most of them not representable in fp16 (thirds and sevenths).
pub(super) fn source(index: u32) -> Source {
    let n = CHANNELS * GRID_H * GRID_W;
    let features: Vec<f32> = (0..n)
        .map(|i| (index as f32 * 100.0 + i as f32) / 3.0 - 5.0)
        .collect();
    let epochs = (0..EPOCHS)
        .map(|epoch| {
            // 1 or 2 crops, alternating, so records differ in length.
            let k = 1 + (index + epoch) as usize % 2;
            let boxes = (0..k)
                .map(|c| CropBox {
                    x0: f64::from(index) + 0.25,
                    y0: f64::from(epoch) + 0.5,
                    x1: 10.125 + c as f64,
                    y1: 20.0 + 1.0 / 3.0,
                })
                .collect();
            let emb: Vec<f32> = (0..k * EMBED)
                .map(|i| (index as f32 * 10.0 + epoch as f32 + i as f32 * 0.5) / 7.0)
                .collect();
            let emb = Tensor::from_slice(&emb).reshape([k as i64, EMBED as i64]);
            (boxes, emb)
        })
        .collect();
    Source {
        index,
        image_id: image_id(index),
        key: ContentKey::of_file_bytes(&index.to_le_bytes()),
        features: Tensor::from_slice(&features).reshape([
            CHANNELS as i64,
            GRID_H as i64,
            GRID_W as i64,
        ]),
        epochs,
    }
}

/// Writes shard `shard` holding index positions `range` under `dir`; `edit` may change a
/// record's bytes before they are written (its blob's checksum is of the edited bytes).
pub(super) fn write_shard_with(
    dir: &Path,
    shard: u32,
    range: Range<u32>,
    layout: &Layout<'_>,
    edit: impl Fn(u32, &mut Vec<u8>),
) -> (ShardWritten, Vec<Source>) {
    crate::runtime::init();
    let mut writer = ShardWriter::create(dir, shard).expect("create");
    let mut sources = Vec::new();
    let mut records = Vec::new();
    for index in range.clone() {
        let s = source(index);
        let tokens = compress::to_tokens(&s.features);
        let vfm = compress::encode(&tokens, layout.storage, layout.pca).expect("encode");
        let mut bytes = encode_record(&vfm, &s.epochs, layout.crop);
        edit(index, &mut bytes);
        records.push(RecordEntry {
            index,
            image_id: s.image_id,
            key: s.key.hex(),
            blob: writer.blob(&bytes).expect("blob"),
        });
        sources.push(s);
    }
    let pca = layout
        .pca
        .map(|p| writer.blob(&p.to_bytes()).expect("PCA blob"));
    let header = ShardHeader {
        format_version: FORMAT_VERSION,
        fingerprint: layout.fingerprint.to_string(),
        shard,
        start: range.start,
        end: range.end,
        epochs: EPOCHS,
        vfm_channels: CHANNELS,
        grid_h: GRID_H,
        grid_w: GRID_W,
        vfm_storage: layout.storage,
        pca,
        embed_dim: EMBED,
        crop_dtype: layout.crop,
        records,
    };
    (writer.finish(&header).expect("finish"), sources)
}

/// [`write_shard_with`] without edits.
pub(super) fn write_shard(
    dir: &Path,
    shard: u32,
    range: Range<u32>,
    layout: &Layout<'_>,
) -> (ShardWritten, Vec<Source>) {
    write_shard_with(dir, shard, range, layout, |_, _| {})
}

/// A tensor's dtype, shape and bytes: equal exactly when the tensors are bit for bit.
pub(super) fn bits(t: &Tensor) -> (Kind, Vec<i64>, Vec<u8>) {
    (t.kind(), t.size(), compress::tensor_bytes(t))
}

/// `t` rounded to fp16 and back (round to nearest even, the same on every CPU).
pub(super) fn through_fp16(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Half).to_kind(Kind::Float)
}

/// Names of the entries of `dir`, sorted.
pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .collect();
    names.sort();
    names
}
