//! The shard file format (docs/cache-format.md), both ways: the prefix, the header and its
//! trailer, and one image's record, encoded for the writer and checked and decoded for the
//! reader.
//!
//! File layout: `MAGIC | version u32 | 0u32 | record blobs… | header JSON |
//! header length u64 | header SHA-256 | MAGIC`, integers little-endian.

use proto::cache::{hex, FORMAT_VERSION, MAGIC};
use proto::plan::crops::CropBox;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::teacher::compress::{self, CompressError, PcaBasis, Storage};

/// Bytes before the first record: magic, version, reserved.
pub(super) const PREFIX_LEN: u64 = 16;
/// Bytes after the header: its length, its SHA-256, the magic again.
pub(super) const TRAILER_LEN: usize = 8 + 32 + 8;

/// Where one blob lies in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// First byte, from the start of the file.
    pub offset: u64,
    /// Length in bytes.
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
    /// Where the record's bytes ([`encode_record`]) are.
    pub blob: Blob,
}

/// The shard header (JSON). Everything needed to decode the records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    /// `proto::cache::FORMAT_VERSION` of the writer.
    pub format_version: u32,
    /// The teacher fingerprint (`proto::cache::teacher_fingerprint`) of the writer.
    pub fingerprint: String,
    /// The shard this file holds.
    pub shard: u32,
    /// Index positions `[start, end)`.
    pub start: u32,
    /// End of the index positions (exclusive).
    pub end: u32,
    /// Crop-plan epochs held per image (0..epochs).
    pub epochs: u32,
    /// VFM feature channels `C`.
    pub vfm_channels: usize,
    /// VFM patch grid height.
    pub grid_h: usize,
    /// VFM patch grid width.
    pub grid_w: usize,
    /// How the VFM features are stored.
    pub vfm_storage: Storage,
    /// PCA mean and basis (fp32), for `vfm_storage = pca`.
    pub pca: Option<Blob>,
    /// Crop embedding width `E`.
    pub embed_dim: usize,
    /// `fp32` (with fp32 VFM storage) or `fp16`.
    pub crop_dtype: CropDtype,
    /// One entry per index position, in index order.
    pub records: Vec<RecordEntry>,
}

/// How crop embeddings are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CropDtype {
    /// IEEE single precision.
    Fp32,
    /// IEEE half precision (read back as fp32).
    Fp16,
}

impl CropDtype {
    pub(super) fn kind(self) -> Kind {
        match self {
            CropDtype::Fp32 => Kind::Float,
            CropDtype::Fp16 => Kind::Half,
        }
    }
}

/// One image's record, decoded: features `[C, gh, gw]` fp32 and per epoch the crop
/// boxes and embeddings `[K, E]` fp32.
#[derive(Debug)]
pub struct Record {
    /// VFM features `[C, gh, gw]`, fp32.
    pub vfm_features: Tensor,
    /// Per epoch: the crop boxes and their embeddings `[K, E]`, fp32.
    pub epochs: Vec<(Vec<CropBox>, Tensor)>,
}

/// The first [`PREFIX_LEN`] bytes of a shard file: magic, format version, reserved 0.
pub(super) fn prefix() -> Vec<u8> {
    let mut prefix = MAGIC.to_vec();
    prefix.extend(FORMAT_VERSION.to_le_bytes());
    prefix.extend(0u32.to_le_bytes());
    prefix
}

/// The end of a shard file: the header JSON, then the trailer (its length, its SHA-256,
/// the magic).
pub(super) fn header_and_trailer(header: &ShardHeader) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(header)?;
    let mut trailer = json.clone();
    trailer.extend((json.len() as u64).to_le_bytes());
    trailer.extend(Sha256::digest(&json));
    trailer.extend(MAGIC);
    Ok(trailer)
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

/// Decodes the bytes of one record of a shard with header `h` (and its PCA basis, for
/// PCA storage): the inverse of [`encode_record`]. Every byte must be used.
pub(super) fn decode_record(
    h: &ShardHeader,
    pca: Option<&PcaBasis>,
    bytes: &[u8],
) -> Result<Record, CompressError> {
    let n = h.grid_h * h.grid_w;
    let vfm_len = h.vfm_storage.encoded_len(n, h.vfm_channels);
    let mut cursor = Cursor { bytes, at: 0 };
    let tokens = compress::decode(cursor.take(vfm_len)?, h.vfm_storage, n, h.vfm_channels, pca)?;
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
pub(super) fn checked_blob<'a>(map: &'a [u8], blob: &Blob) -> Result<&'a [u8], String> {
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

/// The header of a whole shard file `map`, after checking its framing (length, magic at
/// both ends, version) and the header's SHA-256.
pub(super) fn parse_header(map: &[u8]) -> Result<ShardHeader, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::cache::test_shards::{
        bits, source, through_fp16, CHANNELS, EMBED, EPOCHS, GRID_H, GRID_W,
    };

    fn header(storage: Storage, crop_dtype: CropDtype) -> ShardHeader {
        ShardHeader {
            format_version: FORMAT_VERSION,
            fingerprint: "0123abcd".into(),
            shard: 1,
            start: 3,
            end: 4,
            epochs: EPOCHS,
            vfm_channels: CHANNELS,
            grid_h: GRID_H,
            grid_w: GRID_W,
            vfm_storage: storage,
            pca: None,
            embed_dim: EMBED,
            crop_dtype,
            records: vec![RecordEntry {
                index: 3,
                image_id: 1021,
                key: "ab".repeat(32),
                blob: Blob {
                    offset: PREFIX_LEN,
                    len: 5,
                    sha256: "cd".repeat(32),
                },
            }],
        }
    }

    /// A file with `middle` between prefix and header: what the parser sees.
    fn file_with(header: &ShardHeader, middle: &[u8]) -> Vec<u8> {
        [
            prefix(),
            middle.to_vec(),
            header_and_trailer(header).unwrap(),
        ]
        .concat()
    }

    #[test]
    fn the_prefix_and_trailer_frame_a_header_that_parses_back() {
        let p = prefix();
        assert_eq!(p.len() as u64, PREFIX_LEN);
        assert_eq!(p[..8], MAGIC);
        assert_eq!(p[8..12], FORMAT_VERSION.to_le_bytes());
        assert_eq!(p[12..], [0, 0, 0, 0]);

        let h = header(Storage::Int8, CropDtype::Fp16);
        let json = serde_json::to_vec(&h).unwrap();
        let tail = header_and_trailer(&h).unwrap();
        assert_eq!(tail.len(), json.len() + TRAILER_LEN);
        assert_eq!(tail[..json.len()], json);
        let trailer = &tail[json.len()..];
        assert_eq!(trailer[..8], (json.len() as u64).to_le_bytes());
        assert_eq!(&trailer[8..40], Sha256::digest(&json).as_slice());
        assert_eq!(trailer[40..], MAGIC);

        // The parser starts from the trailer, whatever the records in between hold.
        for middle in [&[][..], &[0xAB; 37][..], &MAGIC[..]] {
            assert_eq!(parse_header(&file_with(&h, middle)).unwrap(), h);
        }
    }

    /// docs/cache-format.md's table of header fields, and the spelling of the enums.
    #[test]
    fn the_header_json_has_the_documented_fields() {
        let mut h = header(Storage::Pca { rank: 8 }, CropDtype::Fp16);
        h.pca = Some(h.records[0].blob.clone());
        let value = serde_json::to_value(&h).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "crop_dtype",
                "embed_dim",
                "end",
                "epochs",
                "fingerprint",
                "format_version",
                "grid_h",
                "grid_w",
                "pca",
                "records",
                "shard",
                "start",
                "vfm_channels",
                "vfm_storage",
            ]
        );
        assert_eq!(
            value["vfm_storage"],
            serde_json::json!({"pca": {"rank": 8}})
        );
        assert_eq!(value["crop_dtype"], "fp16");
        assert_eq!(
            value["records"][0],
            serde_json::json!({
                "index": 3,
                "image_id": 1021,
                "key": "ab".repeat(32),
                "blob": {"offset": 16, "len": 5, "sha256": "cd".repeat(32)},
            })
        );
        assert_eq!(value["pca"], value["records"][0]["blob"]);
        let fp32 = header(Storage::Fp32, CropDtype::Fp32);
        let value = serde_json::to_value(&fp32).unwrap();
        assert_eq!(value["vfm_storage"], "fp32");
        assert_eq!(value["crop_dtype"], "fp32");
        assert_eq!(value["pca"], serde_json::Value::Null);
    }

    #[test]
    fn parse_header_names_what_is_wrong_with_the_framing() {
        let h = header(Storage::Fp16, CropDtype::Fp16);
        let file = file_with(&h, &[7; 5]);
        let err = |bytes: &[u8]| parse_header(bytes).unwrap_err();
        let trailer_at = file.len() - TRAILER_LEN;

        let short = PREFIX_LEN as usize + TRAILER_LEN - 1;
        assert_eq!(
            err(&file[..short]),
            format!("{short} bytes, shorter than any shard file")
        );
        assert_eq!(err(&[]), "0 bytes, shorter than any shard file");
        // Cut anywhere, the magic at the end is gone.
        for cut in [file.len() - 1, file.len() / 2, short + 1] {
            assert_eq!(err(&file[..cut]), "not a teacher cache shard (bad magic)");
        }
        let mut other = file.clone();
        other[0] ^= 0x20;
        assert_eq!(err(&other), "not a teacher cache shard (bad magic)");

        let mut newer = file.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            err(&newer),
            format!(
                "format version {}, this worker reads {FORMAT_VERSION}",
                FORMAT_VERSION + 1
            )
        );

        let mut damaged = file.clone();
        damaged[trailer_at - 3] ^= 0x01;
        assert_eq!(err(&damaged), "header checksum mismatch");

        // A length reaching into the prefix, or beyond any file.
        for len in [(trailer_at - 15) as u64, u64::MAX] {
            let mut long = file.clone();
            long[trailer_at..trailer_at + 8].copy_from_slice(&len.to_le_bytes());
            assert_eq!(
                err(&long),
                format!("header length {len} does not fit the file")
            );
        }

        // Framed and checksummed, but not a header.
        let json = br#"{"shard": 1}"#;
        let mut not_a_header = prefix();
        not_a_header.extend(json);
        not_a_header.extend((json.len() as u64).to_le_bytes());
        not_a_header.extend(Sha256::digest(json));
        not_a_header.extend(MAGIC);
        assert!(
            err(&not_a_header).starts_with("header: missing field"),
            "{}",
            err(&not_a_header)
        );
    }

    #[test]
    fn a_record_is_the_features_then_per_epoch_count_boxes_and_embeddings() {
        crate::runtime::init();
        let vfm = [1u8, 2, 3, 4, 5];
        let one = CropBox {
            x0: 1.25,
            y0: -0.5,
            x1: 3.0,
            y1: 1e10,
        };
        let two = CropBox {
            x0: 0.0,
            y0: 1.0 / 3.0,
            x1: 2.0,
            y1: 4.0,
        };
        let epochs = vec![
            (
                vec![one],
                Tensor::from_slice(&[1.5f32, -2.0]).reshape([1, 2]),
            ),
            (
                vec![two, one],
                Tensor::from_slice(&[0.1f32, 3.0, 0.0, -0.25]).reshape([2, 2]),
            ),
        ];
        let expected = |embedding: &dyn Fn(f32) -> Vec<u8>| {
            let mut out = vfm.to_vec();
            out.extend(1u32.to_le_bytes());
            for v in [1.25f64, -0.5, 3.0, 1e10] {
                out.extend(v.to_le_bytes());
            }
            out.extend([1.5f32, -2.0].into_iter().flat_map(embedding));
            out.extend(2u32.to_le_bytes());
            for v in [0.0, 1.0 / 3.0, 2.0, 4.0, 1.25f64, -0.5, 3.0, 1e10] {
                out.extend(v.to_le_bytes());
            }
            out.extend([0.1f32, 3.0, 0.0, -0.25].into_iter().flat_map(embedding));
            out
        };
        assert_eq!(
            encode_record(&vfm, &epochs, CropDtype::Fp32),
            expected(&|v| v.to_le_bytes().to_vec())
        );
        // IEEE halves, by hand: 0.1 = 1.6 · 2^-4, whose 10-bit mantissa 0.6 · 1024 = 614.4
        // rounds to 614 (0x266) under the biased exponent 11: 0x2E66. The others are exact.
        let halves = [
            (1.5f32, 0x3E00u16),
            (-2.0, 0xC000),
            (0.1, 0x2E66),
            (3.0, 0x4200),
            (0.0, 0x0000),
            (-0.25, 0xB400),
        ];
        let half = |v: f32| -> Vec<u8> {
            let (_, bits) = halves.iter().find(|(f, _)| *f == v).expect("listed");
            bits.to_le_bytes().to_vec()
        };
        assert_eq!(
            encode_record(&vfm, &epochs, CropDtype::Fp16),
            expected(&half)
        );
    }

    #[test]
    fn decode_record_inverts_encode_record_and_uses_every_byte() {
        crate::runtime::init();
        let s = source(3);
        let vfm = compress::encode(&compress::to_tokens(&s.features), Storage::Fp32, None).unwrap();
        for crop in [CropDtype::Fp32, CropDtype::Fp16] {
            let h = header(Storage::Fp32, crop);
            let bytes = encode_record(&vfm, &s.epochs, crop);
            let record = decode_record(&h, None, &bytes).unwrap();
            assert_eq!(bits(&record.vfm_features), bits(&s.features));
            assert_eq!(record.epochs.len(), s.epochs.len());
            for ((boxes, emb), (want_boxes, want_emb)) in record.epochs.iter().zip(&s.epochs) {
                assert_eq!(boxes, want_boxes);
                let want = match crop {
                    CropDtype::Fp32 => want_emb.shallow_clone(),
                    CropDtype::Fp16 => through_fp16(want_emb),
                };
                assert_eq!(bits(emb), bits(&want), "{crop:?}");
            }

            // A byte more or one less is a length error, never a shifted read.
            let mut longer = bytes.clone();
            longer.push(0);
            let err = decode_record(&h, None, &longer).unwrap_err();
            assert!(
                matches!(err, CompressError::Length { what: "record", got, expected }
                    if got == bytes.len() + 1 && expected == bytes.len()),
                "{err}"
            );
            let err = decode_record(&h, None, &bytes[..bytes.len() - 1]).unwrap_err();
            assert!(
                matches!(err, CompressError::Length { what: "record", .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn checked_blob_checks_bounds_and_checksum() {
        let map: Vec<u8> = (0..64).collect();
        let blob = |offset: u64, len: u64| Blob {
            offset,
            len,
            sha256: hex(&Sha256::digest(&map[offset as usize..][..len as usize])),
        };
        assert_eq!(checked_blob(&map, &blob(10, 20)).unwrap(), &map[10..30]);
        assert_eq!(checked_blob(&map, &blob(64, 0)).unwrap(), &[] as &[u8]);

        let outside = Blob {
            offset: 60,
            len: 5,
            sha256: String::new(),
        };
        assert_eq!(
            checked_blob(&map, &outside).unwrap_err(),
            "bytes 60+5 lie outside the 64-byte file"
        );
        let wrapping = Blob {
            offset: u64::MAX,
            len: 2,
            sha256: String::new(),
        };
        assert!(checked_blob(&map, &wrapping)
            .unwrap_err()
            .contains("lie outside the 64-byte file"));

        let mut other = blob(10, 20);
        other.sha256 = hex(&Sha256::digest(&map[11..31]));
        let err = checked_blob(&map, &other).unwrap_err();
        assert!(err.starts_with("checksum mismatch (stored "), "{err}");
    }
}
