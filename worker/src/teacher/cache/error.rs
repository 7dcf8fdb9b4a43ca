//! [`CacheError`]: what can go wrong writing or reading the teacher cache, each case naming
//! the shard and its file.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::teacher::compress::CompressError;

/// Why a shard could not be written or a record read. Every case about a file names the
/// shard and the file; the ones about a record name the image too.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No file for the shard yet.
    #[error("teacher cache shard {shard} is missing ({file}): no teacher has written it yet")]
    Missing {
        /// The shard.
        shard: u32,
        /// Where its file should be.
        file: PathBuf,
    },
    /// The file was written by teachers of another fingerprint.
    #[error(
        "teacher cache shard {shard} ({file}) is stale: written by teachers with fingerprint \
         {found}, this job needs {expected}; recompute it (delete the file or rerun `worker teach`)"
    )]
    Stale {
        /// The shard.
        shard: u32,
        /// Its file.
        file: PathBuf,
        /// The fingerprint in the file's header.
        found: String,
        /// The fingerprint this job's teachers have.
        expected: String,
    },
    /// A record (or its crop boxes) does not match what was written for it.
    #[error("teacher cache shard {shard} ({file}) is corrupt at image {image_id}: {detail}")]
    Corrupt {
        /// The shard.
        shard: u32,
        /// Its file.
        file: PathBuf,
        /// Dataset id of the image whose record is damaged.
        image_id: u64,
        /// What was found (e.g. the checksum mismatch).
        detail: String,
    },
    /// The file's framing or header cannot be read (truncated, bad magic, other version,
    /// damaged header, a header for another shard).
    #[error("teacher cache shard {shard} ({file}) is unreadable: {detail}")]
    BadFile {
        /// The shard.
        shard: u32,
        /// Its file.
        file: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The shard has no usable record for a sample: the index is not in it, or the record
    /// is of another image or epoch than the trainer's sample.
    #[error(
        "teacher cache shard {shard} ({file}) has no record for sample index {index} \
         (image {image_id}): {detail}"
    )]
    NoRecord {
        /// The shard.
        shard: u32,
        /// Its file.
        file: PathBuf,
        /// The sample's position in the dataset index.
        index: u32,
        /// The image the trainer read (0 when the index is not in the shard).
        image_id: u64,
        /// Why there is no record.
        detail: String,
    },
    /// A sample index beyond the dataset.
    #[error("sample index {index} is outside the dataset's {images} images")]
    OutOfRange {
        /// The index asked for.
        index: u32,
        /// Images in the dataset index.
        images: u32,
    },
    /// [`CacheStore::wait_for`](super::CacheStore::wait_for) gave up.
    #[error("shards {shards:?} still missing after waiting {waited:?}")]
    Timeout {
        /// The shards still without a usable file.
        shards: Vec<u32>,
        /// How long it waited.
        waited: Duration,
    },
    /// A file system operation failed.
    #[error("{file}: {source}")]
    Io {
        /// The file or folder it was about.
        file: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Encoding or decoding VFM features failed.
    #[error(transparent)]
    Compress(#[from] CompressError),
}
