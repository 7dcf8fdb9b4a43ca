//! [`ShardWriter`]: writes one shard file atomically (a hidden temporary, synced and renamed
//! into place), and clears the temporaries that killed teachers left behind.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use proto::cache::{hex, shard_path, temp_prefix};
use sha2::{Digest, Sha256};

use super::error::CacheError;
use super::format::{header_and_trailer, prefix, Blob, ShardHeader, PREFIX_LEN};

/// A shard file that is complete and renamed into place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardWritten {
    /// Where it is (`proto::cache::shard_path`).
    pub file: PathBuf,
    /// SHA-256 of the whole file, hex.
    pub checksum: String,
    /// Its length.
    pub bytes: u64,
    /// Records in it (one per image).
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
        writer.write(&prefix())?;
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
        let trailer = header_and_trailer(header).map_err(|e| CacheError::Io {
            file: self.temp.clone(),
            source: io::Error::other(e),
        })?;
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

/// Removes temporaries of `shard` under `dir` left by processes of this host that no longer
/// run: names `temp_prefix(shard)` + a pid for which no process exists. Temporaries of live
/// processes (or of pids it cannot tell about), of other shards and other files are kept.
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
        // SAFETY: kill takes two integers and touches no memory of ours; signal 0 sends
        // nothing (it only checks that `pid` exists and may be signalled), and errno is read
        // right after, on this thread, before any other call can change it.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::cache::format::CropDtype;
    use crate::teacher::cache::test_shards::names;

    /// No process has this pid: Linux caps pids at PID_MAX_LIMIT = 2^22 (4,194,304), far
    /// below i32::MAX, so kill(pid, 0) answers ESRCH on every host.
    const DEAD_PID: i32 = i32::MAX;

    fn temp_name(shard: u32, pid: impl std::fmt::Display) -> String {
        format!("{}{pid}", temp_prefix(shard))
    }

    #[test]
    fn finish_renames_the_temporary_into_place_and_reports_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("run/cache");
        let mut writer = ShardWriter::create(&cache, 2).unwrap();
        // While it writes: only the hidden temporary, named after this process.
        assert_eq!(names(&cache), [temp_name(2, std::process::id())]);
        let first = writer.blob(b"first record").unwrap();
        let second = writer.blob(b"2nd").unwrap();
        assert_eq!(
            first,
            Blob {
                offset: PREFIX_LEN,
                len: 12,
                sha256: hex(&Sha256::digest(b"first record")),
            }
        );
        assert_eq!((second.offset, second.len), (PREFIX_LEN + 12, 3));
        let header = ShardHeader {
            format_version: proto::cache::FORMAT_VERSION,
            fingerprint: "f".into(),
            shard: 2,
            start: 10,
            end: 12,
            epochs: 0,
            vfm_channels: 0,
            grid_h: 0,
            grid_w: 0,
            vfm_storage: crate::teacher::compress::Storage::Fp32,
            pca: None,
            embed_dim: 0,
            crop_dtype: CropDtype::Fp32,
            records: Vec::new(),
        };
        let written = writer.finish(&header).unwrap();

        assert_eq!(names(&cache), ["shard-00002.dcache"]);
        let bytes = fs::read(&written.file).unwrap();
        assert_eq!(written.file, shard_path(&cache, 2));
        assert_eq!(written.bytes, bytes.len() as u64);
        assert_eq!(written.checksum, hex(&Sha256::digest(&bytes)));
        assert_eq!(written.images, 0);
        let expected = [
            prefix(),
            b"first record2nd".to_vec(),
            header_and_trailer(&header).unwrap(),
        ]
        .concat();
        assert!(
            bytes == expected,
            "file differs from prefix | blobs | header"
        );
    }

    #[test]
    fn a_writer_dropped_unfinished_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = ShardWriter::create(dir.path(), 0).unwrap();
        writer.blob(&[1; 100]).unwrap();
        drop(writer);
        assert!(names(dir.path()).is_empty());

        // A finished shard is not touched by an abandoned rewrite of it.
        fs::write(shard_path(dir.path(), 0), b"finished").unwrap();
        drop(ShardWriter::create(dir.path(), 0).unwrap());
        assert_eq!(names(dir.path()), ["shard-00000.dcache"]);
        assert_eq!(fs::read(shard_path(dir.path(), 0)).unwrap(), b"finished");
    }

    #[test]
    fn only_temporaries_of_dead_processes_of_that_shard_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let kept = [
            temp_name(3, std::process::id()), // this process: alive
            temp_name(3, 1),                  // pid 1 exists in every pid namespace
            temp_name(4, DEAD_PID),           // another shard
            temp_name(3, "12ab"),             // not a pid
            format!("{}{DEAD_PID}", temp_prefix(3).trim_start_matches('.')), // not hidden
            "shard-00003.dcache".to_string(), // the finished shard
        ];
        for name in kept.iter().chain([&temp_name(3, DEAD_PID)]) {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_dead_temps(dir.path(), 3);
        let mut expected = kept.to_vec();
        expected.sort();
        assert_eq!(names(dir.path()), expected);

        // Starting a writer clears its shard's dead temporaries first.
        let writer = ShardWriter::create(dir.path(), 4).unwrap();
        assert!(!dir.path().join(temp_name(4, DEAD_PID)).exists());
        assert!(dir.path().join(temp_name(4, std::process::id())).exists());
        drop(writer);
        // A missing folder is nothing to clean.
        remove_dead_temps(&dir.path().join("absent"), 3);
    }
}
