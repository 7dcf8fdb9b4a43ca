//! Shard files of the teacher cache (docs/cache-format.md): the atomic writer, the
//! memory-mapped reader that checks every record it hands out, and the store a trainer
//! asks for the targets of a micro-batch.
//!
//! File layout: `MAGIC | version u32 | 0u32 | record blobs… | header JSON |
//! header length u64 | header SHA-256 | MAGIC`. The header (with each record's offset,
//! length and SHA-256) is written last, so a teacher streams records without holding
//! a shard in memory; readers start from the trailer.
//!
//! The files of this folder (each holds the unit tests of what it defines; every public
//! item is used through this module, `teacher::cache::X`):
//!
//! | file | holds |
//! | --- | --- |
//! | `error.rs` | [`CacheError`] |
//! | `format.rs` | the layout: prefix, header ([`ShardHeader`], [`RecordEntry`], [`Blob`]) and trailer, records ([`encode_record`], [`Record`], [`CropDtype`]) |
//! | `writer.rs` | [`ShardWriter`] (temporary file, atomic rename) and [`ShardWritten`] |
//! | `reader.rs` | [`ShardReader`]: mapped, header checked on open, records on read |
//! | `store.rs` | [`CacheStore`]: shards a batch needs, waiting for them, a batch's targets |
//! | `test_shards.rs` | small shards written through the real writer, for the unit tests |

mod error;
mod format;
mod reader;
mod store;
#[cfg(test)]
mod test_shards;
mod writer;

pub use error::CacheError;
pub use format::{encode_record, Blob, CropDtype, Record, RecordEntry, ShardHeader};
pub use reader::ShardReader;
pub use store::CacheStore;
pub use writer::{ShardWriter, ShardWritten};
