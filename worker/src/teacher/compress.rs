//! VFM feature storage formats and their fidelity measure.
//!
//! Features are stored token-major, `[N, C]` (N = gh·gw tokens, C channels), so the
//! int8 scale is one per token and a PCA projection is one matmul. Byte order is the
//! machine's (little-endian on every platform we build for).
//!
//! | format | bytes per image | decode |
//! | --- | --- | --- |
//! | fp32 | 4·N·C | exact |
//! | fp16 | 2·N·C | round to nearest half |
//! | int8 | N·C + 4·N | `q · scale`, `scale = max_c |x| / 127` per token |
//! | pca r | 2·N·r (+ 4·C·(r+1) per shard) | `z Bᵀ + μ`, z in fp16 |

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How a shard stores its VFM features (a resolved `teachers.compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    Fp32,
    Fp16,
    Int8,
    Pca { rank: usize },
}

impl Storage {
    /// Bytes of one image's features (`n` tokens of `c` channels), basis excluded.
    pub fn encoded_len(self, n: usize, c: usize) -> usize {
        match self {
            Storage::Fp32 => 4 * n * c,
            Storage::Fp16 => 2 * n * c,
            Storage::Int8 => n * c + 4 * n,
            Storage::Pca { rank } => 2 * n * rank,
        }
    }

    /// Short name for tables and logs (`pca64`).
    pub fn label(self) -> String {
        match self {
            Storage::Fp32 => "fp32".into(),
            Storage::Fp16 => "fp16".into(),
            Storage::Int8 => "int8".into(),
            Storage::Pca { rank } => format!("pca{rank}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("{what}: {got} bytes, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("format {0} needs a PCA basis and the shard has none")]
    NoBasis(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A PCA projection: mean `[C]` and basis `[C, r]` (orthonormal columns, largest
/// variance first), fp32.
#[derive(Debug)]
pub struct PcaBasis {
    pub mean: Tensor,
    pub basis: Tensor,
}

impl PcaBasis {
    /// Fits `rank` principal channels on `tokens` `[M, C]` (M ≥ 2).
    pub fn fit(tokens: &Tensor, rank: usize) -> Result<Self, CompressError> {
        let x = tokens.to_kind(Kind::Double).to_device(Device::Cpu);
        let m = x.size()[0].max(2);
        let mean = x.mean_dim([0i64].as_slice(), false, Kind::Double);
        let centred = &x - &mean;
        let cov = centred.transpose(0, 1).matmul(&centred) / (m - 1) as f64;
        let (_values, vectors) = cov.f_linalg_eigh("L")?;
        // Eigenvalues ascend: the last `rank` columns, largest first.
        let c = vectors.size()[1];
        let rank = (rank as i64).min(c);
        let basis = vectors.narrow(1, c - rank, rank).flip([1]);
        Ok(Self {
            mean: mean.to_kind(Kind::Float),
            basis: basis.to_kind(Kind::Float).contiguous(),
        })
    }

    pub fn rank(&self) -> usize {
        self.basis.size()[1] as usize
    }

    /// Serialised: mean `[C]` then basis `[C, r]`, fp32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = tensor_bytes(&self.mean);
        out.extend(tensor_bytes(&self.basis));
        out
    }

    pub fn from_bytes(bytes: &[u8], c: usize, rank: usize) -> Result<Self, CompressError> {
        let expected = 4 * c * (rank + 1);
        if bytes.len() != expected {
            return Err(CompressError::Length {
                what: "PCA basis",
                got: bytes.len(),
                expected,
            });
        }
        let (mean, basis) = bytes.split_at(4 * c);
        Ok(Self {
            mean: from_bytes(mean, &[c as i64], Kind::Float)?,
            basis: from_bytes(basis, &[c as i64, rank as i64], Kind::Float)?,
        })
    }
}

/// Encodes `tokens` `[N, C]` (fp32, any device) as `storage`.
pub fn encode(
    tokens: &Tensor,
    storage: Storage,
    pca: Option<&PcaBasis>,
) -> Result<Vec<u8>, CompressError> {
    let x = tokens
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    Ok(match storage {
        Storage::Fp32 => tensor_bytes(&x),
        Storage::Fp16 => tensor_bytes(&x.to_kind(Kind::Half)),
        Storage::Int8 => {
            let scale = int8_scale(&x);
            let q = (&x / &scale.unsqueeze(1))
                .round()
                .clamp(-127, 127)
                .to_kind(Kind::Int8);
            let mut out = tensor_bytes(&scale);
            out.extend(tensor_bytes(&q));
            out
        }
        Storage::Pca { .. } => {
            let pca = pca.ok_or_else(|| CompressError::NoBasis(storage.label()))?;
            let z = (&x - &pca.mean).matmul(&pca.basis);
            tensor_bytes(&z.to_kind(Kind::Half))
        }
    })
}

/// Decodes `n × c` features stored as `storage` into an fp32 `[N, C]` CPU tensor.
pub fn decode(
    bytes: &[u8],
    storage: Storage,
    n: usize,
    c: usize,
    pca: Option<&PcaBasis>,
) -> Result<Tensor, CompressError> {
    let expected = storage.encoded_len(n, c);
    if bytes.len() != expected {
        return Err(CompressError::Length {
            what: "VFM features",
            got: bytes.len(),
            expected,
        });
    }
    let size = [n as i64, c as i64];
    Ok(match storage {
        Storage::Fp32 => from_bytes(bytes, &size, Kind::Float)?,
        Storage::Fp16 => from_bytes(bytes, &size, Kind::Half)?.to_kind(Kind::Float),
        Storage::Int8 => {
            let (scale, q) = bytes.split_at(4 * n);
            let scale = from_bytes(scale, &[n as i64], Kind::Float)?;
            from_bytes(q, &size, Kind::Int8)?.to_kind(Kind::Float) * scale.unsqueeze(1)
        }
        Storage::Pca { rank } => {
            let pca = pca.ok_or_else(|| CompressError::NoBasis(storage.label()))?;
            let z = from_bytes(bytes, &[n as i64, rank as i64], Kind::Half)?.to_kind(Kind::Float);
            z.matmul(&pca.basis.transpose(0, 1)) + &pca.mean
        }
    })
}

/// Per-token scale `max_c |x| / 127`, never 0 (an all-zero token stays zero).
fn int8_scale(x: &Tensor) -> Tensor {
    x.abs().amax([1], false).clamp_min(1e-30) / 127.0
}

/// Mean and max |T − T̂| of the cosine affinity matrices of `original` and
/// `reconstructed` features `[B, C, gh, gw]` (docs/method.md §4).
pub fn affinity_error(original: &Tensor, reconstructed: &Tensor) -> (f64, f64) {
    let t = crate::distill::losses::teacher_affinity(original);
    let t_hat = crate::distill::losses::teacher_affinity(reconstructed);
    let diff = (t - t_hat).abs();
    (
        diff.mean(Kind::Double).double_value(&[]),
        diff.max().double_value(&[]),
    )
}

/// Features `[C, gh, gw]` as tokens `[N, C]`.
pub fn to_tokens(features: &Tensor) -> Tensor {
    let c = features.size()[0];
    features.reshape([c, -1]).transpose(0, 1).contiguous()
}

/// Tokens `[N, C]` back to features `[C, gh, gw]`.
pub fn from_tokens(tokens: &Tensor, gh: i64, gw: i64) -> Tensor {
    let c = tokens.size()[1];
    tokens.transpose(0, 1).reshape([c, gh, gw])
}

/// The mean affinity error `teachers.compression = "auto"` accepts.
pub const AUTO_MAX_MEAN_AFFINITY_ERROR: f64 = 0.01;

/// `auto`: the smallest of pca(`rank`), int8 and fp16 whose mean affinity error on
/// `features` (`[B, C, gh, gw]`, the shard's first images) is at most
/// [`AUTO_MAX_MEAN_AFFINITY_ERROR`]; fp16 when none is. The PCA basis is fitted on
/// the same images.
pub fn choose_auto(
    features: &Tensor,
    rank: usize,
) -> Result<(Storage, Option<PcaBasis>), CompressError> {
    let size = features.size();
    let (c, n) = (size[1] as usize, (size[2] * size[3]) as usize);
    let pca = PcaBasis::fit(&batch_tokens(features), rank)?;
    let mut candidates = vec![Storage::Pca { rank: pca.rank() }, Storage::Int8];
    candidates.sort_by_key(|s| s.encoded_len(n, c));
    for storage in candidates {
        let basis = matches!(storage, Storage::Pca { .. }).then_some(&pca);
        let (mean, _) = affinity_error(features, &round_trip(features, storage, basis)?);
        if mean <= AUTO_MAX_MEAN_AFFINITY_ERROR {
            return Ok((storage, basis.is_some().then_some(pca)));
        }
    }
    Ok((Storage::Fp16, None))
}

/// Every token of a `[B, C, gh, gw]` batch as `[B·N, C]` (the PCA fit sample).
pub fn batch_tokens(features: &Tensor) -> Tensor {
    let c = features.size()[1];
    features
        .permute([0, 2, 3, 1])
        .reshape([-1, c])
        .to_kind(Kind::Float)
}

/// Encodes and decodes every image of `features` `[B, C, gh, gw]` (CPU result).
pub fn round_trip(
    features: &Tensor,
    storage: Storage,
    pca: Option<&PcaBasis>,
) -> Result<Tensor, CompressError> {
    let size = features.size();
    let (c, gh, gw) = (size[1], size[2], size[3]);
    let mut out = Vec::with_capacity(size[0] as usize);
    for b in 0..size[0] {
        let tokens = to_tokens(&features.get(b));
        let bytes = encode(&tokens, storage, pca)?;
        let back = decode(&bytes, storage, (gh * gw) as usize, c as usize, pca)?;
        out.push(from_tokens(&back, gh, gw));
    }
    Ok(Tensor::stack(&out, 0))
}

/// A CPU tensor's bytes (contiguous copy).
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut out = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, numel);
    out
}

/// A CPU tensor of `size` and `kind` from exactly as many bytes as it needs (checked:
/// libtorch would read past a short slice).
pub fn from_bytes(bytes: &[u8], size: &[i64], kind: Kind) -> Result<Tensor, CompressError> {
    let numel: i64 = size.iter().product();
    let expected = numel.max(0) as usize * kind.elt_size_in_bytes();
    if bytes.len() != expected {
        return Err(CompressError::Length {
            what: "tensor",
            got: bytes.len(),
            expected,
        });
    }
    Ok(Tensor::f_from_data_size(bytes, size, kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> Tensor {
        crate::runtime::init();
        crate::runtime::with_seed(3, || {
            Tensor::randn([2, 16, 3, 4], (Kind::Float, Device::Cpu))
        })
    }

    #[test]
    fn fp32_round_trip_is_exact_and_lengths_match() {
        let f = features();
        let back = round_trip(&f, Storage::Fp32, None).unwrap();
        assert!(back.equal(&f));
        for s in [Storage::Fp32, Storage::Fp16, Storage::Int8] {
            let bytes = encode(&to_tokens(&f.get(0)), s, None).unwrap();
            assert_eq!(bytes.len(), s.encoded_len(12, 16), "{s:?}");
        }
    }

    #[test]
    fn lossy_formats_stay_close_and_full_rank_pca_is_near_exact() {
        let f = features();
        // Rigorous on any CPU: the features are 384 standard-normal draws (|x| < 5.5 at
        // any seed's realistic extreme), fp16 rounds each by ≤ 2^-11·|x| < 2.7e-3, and int8
        // with a per-token absmax scale by ≤ scale/2 = max|x|/254 < 2.2e-2.
        for (s, tol) in [(Storage::Fp16, 1e-2), (Storage::Int8, 5e-2)] {
            let back = round_trip(&f, s, None).unwrap();
            let err = (&back - &f).abs().max().double_value(&[]);
            assert!(err < tol, "{s:?}: {err}");
        }
        let pca = PcaBasis::fit(&batch_tokens(&f), 16).unwrap();
        let back = round_trip(&f, Storage::Pca { rank: 16 }, Some(&pca)).unwrap();
        let (mean, max) = affinity_error(&f, &back);
        // Full rank (16 of 16 channels): the projection is the identity up to the fp32
        // eigendecomposition's rounding, ≈1e-6 of unit-scale affinities whatever LAPACK
        // kernel a CPU runs; 1e-3 / 1e-2 only catch a wrong basis or a dropped component.
        assert!(mean < 1e-3 && max < 1e-2, "{mean} {max}");
        let small = PcaBasis::fit(&batch_tokens(&f), 2).unwrap();
        let back = round_trip(&f, Storage::Pca { rank: 2 }, Some(&small)).unwrap();
        assert!(affinity_error(&f, &back).0 > mean);
    }

    #[test]
    fn short_or_long_bytes_are_refused() {
        assert!(decode(&[0; 7], Storage::Fp16, 2, 2, None).is_err());
        assert!(from_bytes(&[0; 9], &[2], Kind::Float).is_err());
        assert!(decode(&[0; 8], Storage::Pca { rank: 2 }, 2, 4, None).is_err());
    }
}
