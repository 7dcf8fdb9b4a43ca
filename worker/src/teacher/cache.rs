//! Shard files of the teacher cache (docs/cache-format.md): the atomic writer, the
//! memory-mapped reader that checks every record it hands out, and the store a trainer
//! asks for the targets of a micro-batch.
//!
//! File layout: `MAGIC | version u32 | 0u32 | record blobs… | header JSON |
//! header length u64 | header SHA-256 | MAGIC`. The header (with each record's offset,
//! length and SHA-256) is written last, so a teacher streams records without holding
//! a shard in memory; readers start from the trailer.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use proto::cache::{hex, shard_path, temp_prefix, FORMAT_VERSION, MAGIC};
use proto::plan::crops::CropBox;
use proto::plan::order::Shards;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::compress::{self, CompressError, PcaBasis, Storage};
use crate::data::sample::CacheRef;
use crate::distill::step::Targets;

/// Bytes before the first record: magic, version, reserved.
const PREFIX_LEN: u64 = 16;
/// Bytes after the header: its length, its SHA-256, the magic again.
const TRAILER_LEN: usize = 8 + 32 + 8;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("teacher cache shard {shard} is missing ({file}): no teacher has written it yet")]
    Missing { shard: u32, file: PathBuf },
    #[error(
        "teacher cache shard {shard} ({file}) is stale: written by teachers with fingerprint \
         {found}, this job needs {expected}; recompute it (delete the file or rerun `worker teach`)"
    )]
    Stale {
        shard: u32,
        file: PathBuf,
        found: String,
        expected: String,
    },
    #[error("teacher cache shard {shard} ({file}) is corrupt at image {image_id}: {detail}")]
    Corrupt {
        shard: u32,
        file: PathBuf,
        image_id: u64,
        detail: String,
    },
    #[error("teacher cache shard {shard} ({file}) is unreadable: {detail}")]
    BadFile {
        shard: u32,
        file: PathBuf,
        detail: String,
    },
    #[error(
        "teacher cache shard {shard} ({file}) has no record for sample index {index} \
         (image {image_id}): {detail}"
    )]
    NoRecord {
        shard: u32,
        file: PathBuf,
        index: u32,
        image_id: u64,
        detail: String,
    },
    #[error("sample index {index} is outside the dataset's {images} images")]
    OutOfRange { index: u32, images: u32 },
    #[error("shards {shards:?} still missing after waiting {waited:?}")]
    Timeout { shards: Vec<u32>, waited: Duration },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Compress(#[from] CompressError),
}

/// Where one blob lies in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub len: u64,
    /// SHA-256 of the blob's bytes, hex.
    pub sha256: String,
}

/// One image's record entry in the header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// Position in the dataset index.
    pub index: u32,
    /// Dataset id of the image the teacher read for that position.
    pub image_id: u64,
    /// SHA-256 of the image's bytes, hex.
    pub key: String,
    pub blob: Blob,
}

/// The shard header (JSON). Everything needed to decode the records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    pub format_version: u32,
    pub fingerprint: String,
    pub shard: u32,
    /// Index positions `[start, end)`.
    pub start: u32,
    pub end: u32,
    /// Crop-plan epochs held per image (0..epochs).
    pub epochs: u32,
    pub vfm_channels: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    pub vfm_storage: Storage,
    /// PCA mean and basis (fp32), for `vfm_storage = pca`.
    pub pca: Option<Blob>,
    pub embed_dim: usize,
    /// `fp32` (with fp32 VFM storage) or `fp16`.
    pub crop_dtype: CropDtype,
    pub records: Vec<RecordEntry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CropDtype {
    Fp32,
    Fp16,
}

impl CropDtype {
    fn kind(self) -> Kind {
        match self {
            CropDtype::Fp32 => Kind::Float,
            CropDtype::Fp16 => Kind::Half,
        }
    }
}

/// A shard file that is complete and renamed into place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardWritten {
    pub file: PathBuf,
    /// SHA-256 of the whole file, hex.
    pub checksum: String,
    pub bytes: u64,
    pub images: u32,
}

/// Writes one shard into a hidden temporary file in the target folder; [`finish`]
/// syncs and renames it into place. Dropped unfinished, it deletes the temporary file,
/// so an abandoned or failed shard leaves nothing behind (a killed process leaves a
/// hidden temporary, removed by the next writer of that shard).
///
/// [`finish`]: ShardWriter::finish
pub struct ShardWriter {
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    offset: u64,
    whole: Sha256,
}

impl ShardWriter {
    /// Starts shard `shard` under `dir` (created if needed).
    pub fn create(dir: &Path, shard: u32) -> Result<Self, CacheError> {
        let io = |file: &Path| {
            let file = file.to_path_buf();
            move |source: io::Error| CacheError::Io { file, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        remove_dead_temps(dir, shard);
        let temp = dir.join(format!("{}{}", temp_prefix(shard), std::process::id()));
        let file = File::create(&temp).map_err(io(&temp))?;
        let mut writer = Self {
            file: Some(file),
            temp,
            target: shard_path(dir, shard),
            dir: dir.to_path_buf(),
            offset: 0,
            whole: Sha256::new(),
        };
        let mut prefix = MAGIC.to_vec();
        prefix.extend(FORMAT_VERSION.to_le_bytes());
        prefix.extend(0u32.to_le_bytes());
        writer.write(&prefix)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), CacheError> {
        let file = self.file.as_mut().ok_or_else(|| CacheError::Io {
            file: self.temp.clone(),
            source: io::Error::other("writer already finished"),
        })?;
        file.write_all(bytes).map_err(|source| CacheError::Io {
            file: self.temp.clone(),
            source,
        })?;
        self.whole.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Appends a blob and says where it went.
    pub fn blob(&mut self, bytes: &[u8]) -> Result<Blob, CacheError> {
        let offset = self.offset;
        self.write(bytes)?;
        Ok(Blob {
            offset,
            len: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        })
    }

    /// Writes the header and trailer, syncs, renames into place and syncs the folder.
    pub fn finish(mut self, header: &ShardHeader) -> Result<ShardWritten, CacheError> {
        debug_assert!(self.offset >= PREFIX_LEN);
        let json = serde_json::to_vec(header).map_err(|e| CacheError::Io {
            file: self.temp.clone(),
            source: io::Error::other(e),
        })?;
        let mut trailer = json.clone();
        trailer.extend((json.len() as u64).to_le_bytes());
        trailer.extend(Sha256::digest(&json));
        trailer.extend(MAGIC);
        self.write(&trailer)?;
        let io = |file: &Path| {
            let file = file.to_path_buf();
            move |source: io::Error| CacheError::Io { file, source }
        };
        if let Some(file) = &self.file {
            file.sync_all().map_err(io(&self.temp))?;
        }
        fs::rename(&self.temp, &self.target).map_err(io(&self.target))?;
        // Renamed: nothing for Drop to delete any more.
        self.file = None;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(ShardWritten {
            file: self.target.clone(),
            checksum: hex(&self.whole.clone().finalize()),
            bytes: self.offset,
            images: header.records.len() as u32,
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Removes temporaries of `shard` left by processes of this host that no longer run.
fn identity(meta: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

fn remove_dead_temps(dir: &Path, shard: u32) {
    let prefix = temp_prefix(shard);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // kill(pid, 0) probes without signalling; ESRCH means no such process.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// One image's record, decoded: features `[C, gh, gw]` fp32 and per epoch the crop
/// boxes and embeddings `[K, E]` fp32.
#[derive(Debug)]
pub struct Record {
    pub vfm_features: Tensor,
    pub epochs: Vec<(Vec<CropBox>, Tensor)>,
}

/// Serialises a record: the encoded VFM features, then per epoch `K` (u32), `K` boxes
/// (4 × f64: x0, y0, x1, y1 in original pixels) and the embeddings `[K, E]`.
pub fn encode_record(vfm: &[u8], epochs: &[(Vec<CropBox>, Tensor)], crop: CropDtype) -> Vec<u8> {
    let mut out = vfm.to_vec();
    for (boxes, emb) in epochs {
        out.extend((boxes.len() as u32).to_le_bytes());
        for b in boxes {
            for v in [b.x0, b.y0, b.x1, b.y1] {
                out.extend(v.to_le_bytes());
            }
        }
        out.extend(compress::tensor_bytes(&emb.to_kind(crop.kind())));
    }
    out
}

/// A shard file opened for reading: header checked, records checked when read.
pub struct ShardReader {
    pub file: PathBuf,
    pub header: ShardHeader,
    map: Mmap,
    pca: Option<PcaBasis>,
    /// (device, inode) of the mapped file: a recomputed shard is renamed over `file`, so
    /// a different identity at that path means this mapping is of the replaced file.
    identity: (u64, u64),
}

impl ShardReader {
    /// Opens shard `shard` under `dir`, refusing another fingerprint than `expected`.
    pub fn open(dir: &Path, shard: u32, expected: &str) -> Result<Self, CacheError> {
        let file = shard_path(dir, shard);
        let handle = match File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheError::Missing { shard, file })
            }
            Err(source) => return Err(CacheError::Io { file, source }),
        };
        // Safety: shard files are never modified in place (written to a temporary and
        // renamed), so the mapping's bytes do not change under us.
        let map = unsafe { Mmap::map(&handle) }.map_err(|source| CacheError::Io {
            file: file.clone(),
            source,
        })?;
        let identity =
            handle
                .metadata()
                .map(|m| identity(&m))
                .map_err(|source| CacheError::Io {
                    file: file.clone(),
                    source,
                })?;
        let bad = |detail: String| CacheError::BadFile {
            shard,
            file: file.clone(),
            detail,
        };
        let header = parse_header(&map).map_err(bad)?;
        if header.fingerprint != expected {
            return Err(CacheError::Stale {
                shard,
                file,
                found: header.fingerprint,
                expected: expected.to_string(),
            });
        }
        if header.shard != shard {
            return Err(bad(format!("the header says shard {}", header.shard)));
        }
        let pca = match (&header.pca, header.vfm_storage) {
            (Some(blob), Storage::Pca { rank }) => {
                let bytes = checked_blob(&map, blob).map_err(|d| bad(format!("PCA basis: {d}")))?;
                Some(PcaBasis::from_bytes(bytes, header.vfm_channels, rank)?)
            }
            (None, Storage::Pca { .. }) => return Err(bad("PCA storage without a basis".into())),
            _ => None,
        };
        Ok(Self {
            file,
            header,
            map,
            pca,
            identity,
        })
    }

    /// Whether the file at this reader's path is still the one it mapped (false once a
    /// teacher renamed a recomputed shard over it, or the file is gone).
    pub fn is_current(&self) -> bool {
        fs::metadata(&self.file).is_ok_and(|m| identity(&m) == self.identity)
    }

    /// The record at index position `index`, checksum verified, as stored.
    pub fn record(&self, index: u32) -> Result<(&RecordEntry, Record), CacheError> {
        let h = &self.header;
        let entry = index
            .checked_sub(h.start)
            .and_then(|i| h.records.get(i as usize))
            .filter(|e| e.index == index)
            .ok_or_else(|| CacheError::NoRecord {
                shard: h.shard,
                file: self.file.clone(),
                index,
                image_id: 0,
                detail: format!("the shard holds indices {}..{}", h.start, h.end),
            })?;
        let corrupt = |detail: String| CacheError::Corrupt {
            shard: h.shard,
            file: self.file.clone(),
            image_id: entry.image_id,
            detail,
        };
        let bytes = checked_blob(&self.map, &entry.blob).map_err(corrupt)?;
        let record = self.decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        Ok((entry, record))
    }

    fn decode(&self, bytes: &[u8]) -> Result<Record, CompressError> {
        let h = &self.header;
        let n = h.grid_h * h.grid_w;
        let vfm_len = h.vfm_storage.encoded_len(n, h.vfm_channels);
        let mut cursor = Cursor { bytes, at: 0 };
        let tokens = compress::decode(
            cursor.take(vfm_len)?,
            h.vfm_storage,
            n,
            h.vfm_channels,
            self.pca.as_ref(),
        )?;
        let vfm_features = compress::from_tokens(&tokens, h.grid_h as i64, h.grid_w as i64);
        let mut epochs = Vec::with_capacity(h.epochs as usize);
        let elt = h.crop_dtype.kind().elt_size_in_bytes();
        for _ in 0..h.epochs {
            let k = u32::from_le_bytes(cursor.array()?) as usize;
            let mut boxes = Vec::with_capacity(k);
            for _ in 0..k {
                let mut v = [0f64; 4];
                for x in &mut v {
                    *x = f64::from_le_bytes(cursor.array()?);
                }
                boxes.push(CropBox {
                    x0: v[0],
                    y0: v[1],
                    x1: v[2],
                    y1: v[3],
                });
            }
            let emb = compress::from_bytes(
                cursor.take(k * h.embed_dim * elt)?,
                &[k as i64, h.embed_dim as i64],
                h.crop_dtype.kind(),
            )?
            .to_kind(Kind::Float);
            epochs.push((boxes, emb));
        }
        if cursor.at != bytes.len() {
            return Err(CompressError::Length {
                what: "record",
                got: bytes.len(),
                expected: cursor.at,
            });
        }
        Ok(Record {
            vfm_features,
            epochs,
        })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CompressError> {
        let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(CompressError::Length {
            what: "record",
            got: self.bytes.len(),
            expected: self.at.saturating_add(len),
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CompressError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

/// The blob's bytes after checking bounds and SHA-256.
fn checked_blob<'a>(map: &'a [u8], blob: &Blob) -> Result<&'a [u8], String> {
    let start = usize::try_from(blob.offset).map_err(|e| e.to_string())?;
    let len = usize::try_from(blob.len).map_err(|e| e.to_string())?;
    let bytes = start
        .checked_add(len)
        .and_then(|end| map.get(start..end))
        .ok_or_else(|| {
            format!(
                "bytes {start}+{len} lie outside the {}-byte file",
                map.len()
            )
        })?;
    let sum = hex(&Sha256::digest(bytes));
    if sum != blob.sha256 {
        return Err(format!(
            "checksum mismatch (stored {}, computed {sum})",
            blob.sha256
        ));
    }
    Ok(bytes)
}

fn parse_header(map: &[u8]) -> Result<ShardHeader, String> {
    let min = PREFIX_LEN as usize + TRAILER_LEN;
    if map.len() < min {
        return Err(format!("{} bytes, shorter than any shard file", map.len()));
    }
    if map[..8] != MAGIC || map[map.len() - 8..] != MAGIC {
        return Err("not a teacher cache shard (bad magic)".into());
    }
    let version = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this worker reads {FORMAT_VERSION}"
        ));
    }
    let trailer = &map[map.len() - TRAILER_LEN..];
    let mut len = [0u8; 8];
    len.copy_from_slice(&trailer[..8]);
    let len = u64::from_le_bytes(len);
    let end = map.len() - TRAILER_LEN;
    let start = usize::try_from(len)
        .ok()
        .and_then(|l| end.checked_sub(l))
        .filter(|&s| s >= PREFIX_LEN as usize)
        .ok_or_else(|| format!("header length {len} does not fit the file"))?;
    let json = &map[start..end];
    if Sha256::digest(json).as_slice() != &trailer[8..40] {
        return Err("header checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("header: {e}"))
}

/// The cache of one job as a trainer sees it: shard files under `dir` with one
/// fingerprint, opened on first use and kept open.
pub struct CacheStore {
    dir: PathBuf,
    fingerprint: String,
    shards: Shards,
    open: Mutex<HashMap<u32, Arc<ShardReader>>>,
}

impl CacheStore {
    /// The store of `dir` for teachers of `fingerprint` over `shards`. Opens nothing yet.
    pub fn open(dir: &Path, fingerprint: &str, shards: Shards) -> Self {
        Self {
            dir: dir.to_path_buf(),
            fingerprint: fingerprint.to_string(),
            shards,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shards holding `indices` (index positions), ascending, each once: what a
    /// global batch needs before its step can run.
    pub fn shards_needed(&self, indices: &[u32]) -> Result<Vec<u32>, CacheError> {
        let mut out = Vec::new();
        for &index in indices {
            let shard = self.shard_of(index)?;
            if !out.contains(&shard) {
                out.push(shard);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn shard_of(&self, index: u32) -> Result<u32, CacheError> {
        self.shards.shard_of(index).ok_or(CacheError::OutOfRange {
            index,
            images: self.shards.num_images(),
        })
    }

    /// Of `indices`, how many have a usable shard file now and how many do not
    /// (`(hits, misses)`: the cache's hit count when a step needs them).
    pub fn hits_and_misses(&self, indices: &[u32]) -> Result<(u64, u64), CacheError> {
        let needed = self.shards_needed(indices)?;
        let unusable = self.unusable(&needed);
        let mut misses = 0;
        for &index in indices {
            if unusable.contains(&self.shard_of(index)?) {
                misses += 1;
            }
        }
        Ok((indices.len() as u64 - misses, misses))
    }

    /// Of `shards`, those without a usable file (missing, stale or unreadable header).
    pub fn unusable(&self, shards: &[u32]) -> Vec<u32> {
        shards
            .iter()
            .copied()
            .filter(|&s| self.reader(s).is_err())
            .collect()
    }

    /// Waits until every shard of `shards` has a usable file, checking every `poll`, at
    /// most `limit`; then names the ones still missing.
    pub fn wait_for(
        &self,
        shards: &[u32],
        limit: Duration,
        poll: Duration,
    ) -> Result<(), CacheError> {
        let started = Instant::now();
        loop {
            let missing = self.unusable(shards);
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= limit {
                return Err(CacheError::Timeout {
                    shards: missing,
                    waited: started.elapsed(),
                });
            }
            tracing::info!("waiting for teacher cache shards {missing:?}");
            std::thread::sleep(poll);
        }
    }

    /// Forgets the open file of `shard`, so the next read opens the file now in place
    /// (after a teacher recomputed it).
    pub fn reopen(&self, shard: u32) {
        self.lock().remove(&shard);
    }

    /// Forgets the open file of `shard` if another file has replaced it since it was
    /// opened (a recomputation this trainer did not ask for); true when it did. A bad
    /// record read from a replaced file says nothing about the file now in place.
    pub fn reopen_if_replaced(&self, shard: u32) -> bool {
        let mut open = self.lock();
        let replaced = open.get(&shard).is_some_and(|r| !r.is_current());
        if replaced {
            open.remove(&shard);
        }
        replaced
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<ShardReader>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reader of `shard`, opening it on first use.
    pub fn reader(&self, shard: u32) -> Result<Arc<ShardReader>, CacheError> {
        if let Some(r) = self.lock().get(&shard) {
            return Ok(r.clone());
        }
        // The store lives on the trainer's thread; the Arc only lets a reader outlive a
        // `reopen` of its shard, it is never sent to another thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let reader = Arc::new(ShardReader::open(&self.dir, shard, &self.fingerprint)?);
        self.lock().insert(shard, reader.clone());
        Ok(reader)
    }

    /// The record of one sample, checked against it: same image, same bytes, same crop
    /// boxes for its epoch. Returns features `[C,gh,gw]` and embeddings `[K,E]`.
    pub fn sample_targets(&self, r: &CacheRef) -> Result<(Tensor, Tensor), CacheError> {
        let shard = self.shard_of(r.index)?;
        let reader = self.reader(shard)?;
        let (entry, mut record) = reader.record(r.index)?;
        let mismatch = |detail: String| CacheError::NoRecord {
            shard,
            file: reader.file.clone(),
            index: r.index,
            image_id: r.image_id,
            detail,
        };
        if entry.image_id != r.image_id || entry.key != r.key.hex() {
            return Err(mismatch(format!(
                "the record is image {} with key {}, the trainer read image {} with key {} \
                 (the dataset changed since the teacher ran: recompute the shard)",
                entry.image_id, entry.key, r.image_id, r.key
            )));
        }
        let epochs = record.epochs.len();
        let (boxes, emb) = record
            .epochs
            .get_mut(r.epoch as usize)
            .ok_or_else(|| mismatch(format!("epoch {} not cached (0..{epochs})", r.epoch)))?;
        if *boxes != r.boxes {
            return Err(CacheError::Corrupt {
                shard,
                file: reader.file.clone(),
                image_id: r.image_id,
                detail: format!(
                    "epoch {} crop boxes differ from the crop plan ({} stored, {} planned)",
                    r.epoch,
                    boxes.len(),
                    r.boxes.len()
                ),
            });
        }
        Ok((record.vfm_features, std::mem::replace(emb, Tensor::new())))
    }

    /// The targets of a micro-batch (records in batch order) on `device`: crop
    /// embeddings `[K,E]` in RoI order, VFM features `[B,C,gh,gw]`.
    pub fn targets(&self, refs: &[CacheRef], device: Device) -> Result<Targets, CacheError> {
        let mut features = Vec::with_capacity(refs.len());
        let mut crops = Vec::with_capacity(refs.len());
        for r in refs {
            let (f, e) = self.sample_targets(r)?;
            features.push(f);
            crops.push(e);
        }
        Ok(Targets {
            crop_embeddings: Tensor::cat(&crops, 0).to_device(device),
            vfm_features: Tensor::stack(&features, 0).to_device(device),
        })
    }
}
