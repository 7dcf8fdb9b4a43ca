//! [`ShardReader`]: a shard file memory-mapped for reading, its header checked on open and
//! each record checked (SHA-256, length) when it is read.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use proto::cache::shard_path;

use super::error::CacheError;
use super::format::{checked_blob, decode_record, parse_header, Record, RecordEntry, ShardHeader};
use crate::teacher::compress::{PcaBasis, Storage};

/// A shard file opened for reading: header checked, records checked when read.
pub struct ShardReader {
    /// The shard file (`proto::cache::shard_path`).
    pub file: PathBuf,
    /// Its header, checked (framing, checksum, fingerprint, shard).
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
        // SAFETY: the map is read-only, and its bytes must not change while it lives (the
        // only hazard of a file mapping: a write or truncation by anyone would show through
        // or fault). Shard files are never modified in place: a writer fills a hidden
        // temporary and renames it over `file`, which leaves this mapped inode untouched.
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
        let record =
            decode_record(h, self.pca.as_ref(), bytes).map_err(|e| corrupt(e.to_string()))?;
        Ok((entry, record))
    }
}

/// (device, inode) of a file: what tells a file renamed over a path from the one before.
fn identity(meta: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use tch::Tensor;

    use super::*;
    use crate::teacher::cache::format::CropDtype;
    use crate::teacher::cache::test_shards::{
        bits, image_id, through_fp16, write_shard, write_shard_with, Layout, Source, CHANNELS,
        FINGERPRINT,
    };
    use crate::teacher::compress;

    /// Every record of `sources` read from `reader` against what it was written from:
    /// `features` and `embedding` give what a read must return for the written tensors.
    fn assert_reads_back<'a>(
        reader: &ShardReader,
        sources: impl IntoIterator<Item = &'a Source>,
        features: impl Fn(&Tensor) -> Tensor,
        embedding: impl Fn(&Tensor) -> Tensor,
    ) {
        for s in sources {
            let (entry, record) = reader.record(s.index).unwrap();
            assert_eq!(
                (entry.index, entry.image_id, entry.key.clone()),
                (s.index, s.image_id, s.key.hex())
            );
            assert_eq!(
                bits(&record.vfm_features),
                bits(&features(&s.features)),
                "index {}",
                s.index
            );
            assert_eq!(record.epochs.len(), s.epochs.len());
            for (epoch, ((boxes, emb), (want_boxes, want_emb))) in
                record.epochs.iter().zip(&s.epochs).enumerate()
            {
                assert_eq!(boxes, want_boxes, "index {} epoch {epoch}", s.index);
                assert_eq!(
                    bits(emb),
                    bits(&embedding(want_emb)),
                    "index {} epoch {epoch}",
                    s.index
                );
            }
        }
    }

    #[test]
    fn a_written_shard_reads_back_every_record_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (written, sources) = write_shard(dir.path(), 1, 4..8, &Layout::default());
        let reader = ShardReader::open(dir.path(), 1, FINGERPRINT).unwrap();
        assert_eq!(reader.file, written.file);
        let h = &reader.header;
        assert_eq!((h.shard, h.start, h.end, h.records.len()), (1, 4, 8, 4));
        assert_eq!(
            (h.vfm_storage, h.crop_dtype),
            (Storage::Fp32, CropDtype::Fp32)
        );
        assert_reads_back(
            &reader,
            &sources,
            Tensor::shallow_clone,
            Tensor::shallow_clone,
        );
        // Reading a record again, out of order, gives the same.
        assert_reads_back(
            &reader,
            sources.iter().rev(),
            Tensor::shallow_clone,
            Tensor::shallow_clone,
        );
    }

    /// fp16 features and crops read back as the fp32 values rounded to fp16 and widened,
    /// exactly (IEEE round to nearest even, then an exact widening).
    #[test]
    fn an_fp16_shard_reads_back_the_fp16_rounding_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            storage: Storage::Fp16,
            crop: CropDtype::Fp16,
            ..Layout::default()
        };
        let (_, sources) = write_shard(dir.path(), 0, 0..3, &layout);
        let reader = ShardReader::open(dir.path(), 0, FINGERPRINT).unwrap();
        assert_reads_back(&reader, &sources, through_fp16, through_fp16);
        // The test values are not all halves, so the rounding is really exercised.
        assert_ne!(
            bits(&through_fp16(&sources[0].features)),
            bits(&sources[0].features)
        );
    }

    /// A PCA shard decodes with the basis stored in the file. With a basis of the first two
    /// unit vectors, the third channel comes back as the mean's third value exactly: its
    /// reconstruction is z₀·0 + z₁·0 + μ₂, with no rounding anywhere.
    #[test]
    fn a_pca_shard_decodes_with_its_stored_basis() {
        let dir = tempfile::tempdir().unwrap();
        crate::runtime::init();
        let pca = PcaBasis {
            mean: Tensor::from_slice(&[0.5f32, -0.25, 1.75]),
            basis: Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0]).reshape([3, 2]),
        };
        let storage = Storage::Pca { rank: 2 };
        let layout = Layout {
            storage,
            pca: Some(&pca),
            crop: CropDtype::Fp16,
            ..Layout::default()
        };
        let (_, sources) = write_shard(dir.path(), 0, 0..2, &layout);
        let reader = ShardReader::open(dir.path(), 0, FINGERPRINT).unwrap();
        assert!(reader.header.pca.is_some());
        for s in &sources {
            let (_, record) = reader.record(s.index).unwrap();
            let third: Vec<f32> = Vec::try_from(record.vfm_features.get(2).flatten(0, -1)).unwrap();
            assert!(third.iter().all(|&v| v == 1.75), "{third:?}");
            // All channels: what compress decodes with that basis (the same ops on the same
            // values in the same process, so the same bits).
            let tokens = compress::to_tokens(&s.features);
            let stored = compress::encode(&tokens, storage, Some(&pca)).unwrap();
            let n = tokens.size()[0] as usize;
            let decoded = compress::decode(&stored, storage, n, CHANNELS, Some(&pca)).unwrap();
            let size = s.features.size();
            let want = compress::from_tokens(&decoded, size[1], size[2]);
            assert_eq!(bits(&record.vfm_features), bits(&want));
            assert_reads_back(&reader, [s], |_| want.shallow_clone(), through_fp16);
        }
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_corrupt_naming_shard_file_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let (written, sources) = write_shard(dir.path(), 1, 4..8, &Layout::default());
        let blob = {
            let reader = ShardReader::open(dir.path(), 1, FINGERPRINT).unwrap();
            reader.header.records[2].blob.clone()
        };
        let mut bytes = fs::read(&written.file).unwrap();
        bytes[(blob.offset + blob.len - 1) as usize] ^= 0x80;
        fs::write(&written.file, &bytes).unwrap();

        let reader = ShardReader::open(dir.path(), 1, FINGERPRINT).unwrap();
        let err = reader.record(6).unwrap_err();
        let message = err.to_string();
        match &err {
            CacheError::Corrupt {
                shard: 1,
                file,
                image_id: id,
                detail,
            } => {
                assert_eq!(file, &written.file);
                assert_eq!(*id, image_id(6));
                assert!(detail.starts_with("checksum mismatch"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(message.contains("shard 1"), "{message}");
        assert!(
            message.contains(&written.file.display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&format!("image {}", image_id(6))),
            "{message}"
        );
        // The other records are intact.
        let others = sources.iter().filter(|s| s.index != 6);
        assert_reads_back(
            &reader,
            others,
            Tensor::shallow_clone,
            Tensor::shallow_clone,
        );
    }

    /// A record whose checksum is right but whose length is not what the header's layout
    /// says (a writer bug, not damage) is reported as corrupt, not misread.
    #[test]
    fn a_record_of_the_wrong_length_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        write_shard_with(
            dir.path(),
            0,
            0..3,
            &Layout::default(),
            |index, bytes| match index {
                0 => bytes.push(0),
                2 => {
                    bytes.pop();
                }
                _ => {}
            },
        );
        let reader = ShardReader::open(dir.path(), 0, FINGERPRINT).unwrap();
        for index in [0, 2] {
            let err = reader.record(index).unwrap_err();
            assert!(
                matches!(&err, CacheError::Corrupt { shard: 0, image_id: id, detail, .. }
                    if *id == image_id(index) && detail.starts_with("record: ")),
                "{err:?}"
            );
        }
        assert!(reader.record(1).is_ok());
    }

    #[test]
    fn a_truncated_or_damaged_file_is_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let (written, _) = write_shard(dir.path(), 3, 0..2, &Layout::default());
        let whole = fs::read(&written.file).unwrap();
        let bad_file = |bytes: &[u8]| {
            fs::write(&written.file, bytes).unwrap();
            match ShardReader::open(dir.path(), 3, FINGERPRINT) {
                Err(CacheError::BadFile {
                    shard: 3,
                    file,
                    detail,
                }) => {
                    assert_eq!(file, written.file);
                    detail
                }
                Err(other) => panic!("expected BadFile, got {other:?}"),
                Ok(_) => panic!("a damaged file opened"),
            }
        };
        for cut in [0, 10, whole.len() / 2, whole.len() - 1] {
            let detail = bad_file(&whole[..cut]);
            assert!(
                detail.contains("shorter than any shard file") || detail.contains("bad magic"),
                "cut at {cut}: {detail}"
            );
        }
        let mut header_flip = whole.clone();
        header_flip[whole.len() - 60] ^= 0x04; // in the header JSON, before the 48-byte trailer
        assert_eq!(bad_file(&header_flip), "header checksum mismatch");
        let mut version = whole.clone();
        version[8] ^= 0x02;
        assert!(bad_file(&version).starts_with("format version 3,"));
        fs::write(&written.file, &whole).unwrap();
        assert!(ShardReader::open(dir.path(), 3, FINGERPRINT).is_ok());
    }

    #[test]
    fn a_shard_of_another_fingerprint_is_stale_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            fingerprint: "teachers-b",
            ..Layout::default()
        };
        let (written, _) = write_shard(dir.path(), 2, 0..1, &layout);
        let err = ShardReader::open(dir.path(), 2, FINGERPRINT).err().unwrap();
        let message = err.to_string();
        match err {
            CacheError::Stale {
                shard: 2,
                file,
                found,
                expected,
            } => {
                assert_eq!(file, written.file);
                assert_eq!(
                    (found.as_str(), expected.as_str()),
                    ("teachers-b", FINGERPRINT)
                );
            }
            other => panic!("expected Stale, got {other:?}"),
        }
        assert!(
            message.contains("teachers-b") && message.contains(FINGERPRINT),
            "{message}"
        );
        assert!(ShardReader::open(dir.path(), 2, "teachers-b").is_ok());
    }

    #[test]
    fn a_file_of_another_shard_or_a_pca_shard_without_basis_is_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let (written, _) = write_shard(dir.path(), 2, 0..1, &Layout::default());
        fs::rename(&written.file, shard_path(dir.path(), 5)).unwrap();
        let err = ShardReader::open(dir.path(), 5, FINGERPRINT).err().unwrap();
        assert!(
            matches!(&err, CacheError::BadFile { shard: 5, detail, .. }
                if detail == "the header says shard 2"),
            "{err:?}"
        );

        // No records, so nothing needs the basis to be encoded.
        let layout = Layout {
            storage: Storage::Pca { rank: 2 },
            ..Layout::default()
        };
        write_shard(dir.path(), 6, 0..0, &layout);
        let err = ShardReader::open(dir.path(), 6, FINGERPRINT).err().unwrap();
        assert!(
            matches!(&err, CacheError::BadFile { shard: 6, detail, .. }
                if detail == "PCA storage without a basis"),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_file_is_missing_and_foreign_indices_have_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let err = ShardReader::open(dir.path(), 9, FINGERPRINT).err().unwrap();
        assert!(
            matches!(&err, CacheError::Missing { shard: 9, file } if *file == shard_path(dir.path(), 9)),
            "{err:?}"
        );

        let (written, _) = write_shard(dir.path(), 1, 4..8, &Layout::default());
        let reader = ShardReader::open(dir.path(), 1, FINGERPRINT).unwrap();
        for index in [0, 3, 8, u32::MAX] {
            let err = reader.record(index).unwrap_err();
            match err {
                CacheError::NoRecord {
                    shard: 1,
                    file,
                    index: i,
                    image_id: 0,
                    detail,
                } => {
                    assert_eq!((file, i), (written.file.clone(), index));
                    assert_eq!(detail, "the shard holds indices 4..8");
                }
                other => panic!("index {index}: expected NoRecord, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_reader_is_current_until_its_file_is_replaced_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sources) = write_shard(dir.path(), 0, 0..2, &Layout::default());
        let old = ShardReader::open(dir.path(), 0, FINGERPRINT).unwrap();
        assert!(old.is_current());
        // Rewriting the same content is still another file.
        write_shard(dir.path(), 0, 0..2, &Layout::default());
        assert!(!old.is_current());
        // The old mapping still reads the file it mapped.
        assert_reads_back(&old, &sources, Tensor::shallow_clone, Tensor::shallow_clone);
        let new = ShardReader::open(dir.path(), 0, FINGERPRINT).unwrap();
        assert!(new.is_current());
        fs::remove_file(&new.file).unwrap();
        assert!(!new.is_current());
    }
}
