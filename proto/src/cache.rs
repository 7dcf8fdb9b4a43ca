//! The teacher-cache contract: where shard files live, how an image is keyed, and
//! what the teacher fingerprint covers. The file layout itself is in
//! `docs/cache-format.md` and `worker::teacher::cache`.
//!
//! A trainer and a teacher that agree on these never exchange stale targets: a record
//! is used only when its shard's fingerprint equals the trainer's and its key equals
//! the hash of the bytes the trainer read.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::job::arch::VitArch;
use crate::job::{Compression, JobSpec};

/// First 8 bytes of every shard file (and its last 8).
pub const MAGIC: [u8; 8] = *b"DCLPTCH\x01";

/// Version of the file layout; a reader refuses any other.
pub const FORMAT_VERSION: u32 = 1;

/// Suffix of finished shard files. Temporary files start with `.` and never carry it
/// as their last component, so a listing of `*.dcache` sees only complete shards.
pub const SHARD_SUFFIX: &str = ".dcache";

/// The cache folder of a job: `job.run_dir/cache`.
pub fn cache_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("cache")
}

/// File name of shard `shard`: `shard-00007.dcache`.
pub fn shard_file_name(shard: u32) -> String {
    format!("shard-{shard:05}{SHARD_SUFFIX}")
}

/// The shard file `shard` under `dir`.
pub fn shard_path(dir: &Path, shard: u32) -> PathBuf {
    dir.join(shard_file_name(shard))
}

/// Prefix of the temporary files a teacher writes shard `shard` into
/// (`.shard-00007.dcache.tmp.<pid>`): hidden, and without the shard suffix at the end.
pub fn temp_prefix(shard: u32) -> String {
    format!(".{}.tmp.", shard_file_name(shard))
}

/// An image's cache key: SHA-256 of the bytes of its file (of the decoded RGB pixels
/// and size for sources without a file).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentKey(pub [u8; 32]);

impl ContentKey {
    /// Key of an image file's bytes.
    pub fn of_file_bytes(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Key of an image that has no file: width and height (u32 LE) then RGB8 pixels.
    pub fn of_pixels(width: u32, height: u32, rgb: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(width.to_le_bytes());
        h.update(height.to_le_bytes());
        h.update(rgb);
        Self(h.finalize().into())
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentKey({})", self.hex())
    }
}

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the teacher fingerprint hashes, as canonical JSON (field order fixed here).
/// Every input that changes a cached value is in it.
#[derive(Serialize)]
struct FingerprintParts<'a> {
    format_version: u32,
    plan_version: u32,
    /// SHA-256 over the frozen teachers' tensors (names, shapes, fp32 bytes).
    weights_digest: &'a str,
    /// Resize and normalisation of crop and VFM inputs, as the worker describes them.
    preprocessing: &'a str,
    crop_teacher: &'a VitArch,
    vfm: &'a VitArch,
    vfm_resolution: usize,
    crop_resolution: usize,
    /// The crop plan: seed, cap, and how many epochs of it the cache holds.
    seed: u64,
    max_crops: usize,
    epochs: usize,
    compression: Compression,
    pca_rank: usize,
}

/// The teacher fingerprint of `spec` with teachers whose weights hash to
/// `weights_digest` and whose preprocessing the worker spells `preprocessing`.
/// 64 hex digits.
pub fn teacher_fingerprint(spec: &JobSpec, weights_digest: &str, preprocessing: &str) -> String {
    let crop_teacher = spec.model.student.arch();
    let vfm = spec.model.vfm.arch();
    let parts = FingerprintParts {
        format_version: FORMAT_VERSION,
        plan_version: crate::plan::PLAN_VERSION,
        weights_digest,
        preprocessing,
        crop_teacher: &crop_teacher,
        vfm: &vfm,
        vfm_resolution: spec.data.vfm_resolution,
        crop_resolution: spec.data.crop_resolution,
        seed: spec.job.seed,
        max_crops: spec.data.max_crops,
        epochs: spec.train.epochs,
        compression: spec.teachers.compression,
        pca_rank: spec.teachers.pca_rank,
    };
    let canonical = serde_json::to_vec(&parts).expect("plain data always serialises");
    hex(&Sha256::digest(&canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_sort_and_temps_are_hidden() {
        assert_eq!(shard_file_name(7), "shard-00007.dcache");
        assert!(shard_file_name(9) < shard_file_name(10));
        let tmp = format!("{}123", temp_prefix(7));
        assert!(
            tmp.starts_with('.') && !tmp.ends_with(SHARD_SUFFIX),
            "{tmp}"
        );
    }

    #[test]
    fn keys_differ_for_different_bytes() {
        let a = ContentKey::of_file_bytes(b"abc");
        assert_eq!(
            a.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(a, ContentKey::of_file_bytes(b"abd"));
        assert_ne!(
            ContentKey::of_pixels(1, 2, &[0; 6]),
            ContentKey::of_pixels(2, 1, &[0; 6])
        );
    }
}
