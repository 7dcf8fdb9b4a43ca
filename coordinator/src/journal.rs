//! The coordinator's durable memory: every decision it must not forget is one JSON line
//! in `run_dir/journal.jsonl`, appended and fsynced **before** it is acted on, so a
//! restarted coordinator (`serve --resume`) replays the lines into the same state.
//!
//! The cursor needs no record of its own: training resumes from the last committed
//! checkpoint, whose `step`/`epoch`/`epoch_step` are the cursor.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the journal inside the run directory.
pub const FILE_NAME: &str = "journal.jsonl";

/// A committed checkpoint as the registry and the journal keep it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub path: String,
    /// sha256 hex of the checkpoint's state.json.
    pub checksum: String,
    pub epoch: u64,
    pub epoch_step: u64,
}

/// One decision. Phases are `proto::wire::JobPhase` names (`JOB_PHASE_TRAINING`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// First line of a run: which job (hash) the journal belongs to.
    Started {
        job: String,
        job_hash: String,
        total_steps: u64,
        image_count: u64,
    },
    Registered {
        worker_id: String,
        role: String,
        host: String,
    },
    Phase {
        phase: String,
        reason: String,
    },
    /// A world formed: `members[r]` is the worker id of rank r.
    Generation {
        generation: u64,
        members: Vec<String>,
    },
    Lost {
        generation: u64,
        worker_id: String,
        reason: String,
    },
    Committed {
        generation: u64,
        checkpoint: Checkpoint,
    },
    Drain {
        generation: u64,
        stop_step: u64,
    },
    ShardDone {
        shard: u32,
        file: String,
        checksum: String,
        bytes: u64,
    },
    ShardRequeued {
        shard: u32,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a journal record: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{path} already holds a journal: resume it (--resume) or choose another run directory"
    )]
    Exists { path: PathBuf },
    #[error("{path}: no journal to resume")]
    Missing { path: PathBuf },
}

/// The open journal file (append-only).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens `run_dir/journal.jsonl`. A fresh run refuses an existing non-empty journal;
    /// a resume requires one and returns its records.
    pub fn open(run_dir: &Path, resume: bool) -> Result<(Self, Vec<Record>), JournalError> {
        let path = run_dir.join(FILE_NAME);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(io)?;
        let exists = std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let records = match (resume, exists) {
            (false, true) => return Err(JournalError::Exists { path }),
            (true, false) => return Err(JournalError::Missing { path }),
            (true, true) => read(&path)?,
            (false, false) => Vec::new(),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok((Self { path, file }, records))
    }

    /// Appends `record` and waits until it is on disk.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(record).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every record of the journal at `path`. A last line without its newline is a write
/// the crash interrupted (never acted on, since acting waits for the fsync): dropped.
pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
    let file = File::open(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut buf = String::new();
    for line_no in 1.. {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        if !buf.ends_with('\n') {
            tracing::warn!("{}:{line_no}: dropping a torn last line", path.display());
            break;
        }
        let record = serde_json::from_str(buf.trim_end()).map_err(|e| JournalError::Corrupt {
            path: path.to_path_buf(),
            line: line_no,
            message: e.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, old) = Journal::open(dir.path(), false).unwrap();
        assert!(old.is_empty());
        let a = Record::Generation {
            generation: 3,
            members: vec!["w-1".into(), "w-2".into()],
        };
        let b = Record::ShardRequeued {
            shard: 7,
            reason: "corrupt".into(),
        };
        j.append(&a).unwrap();
        j.append(&b).unwrap();
        drop(j);
        assert!(matches!(
            Journal::open(dir.path(), false),
            Err(JournalError::Exists { .. })
        ));
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"record":"pha"#).unwrap();
        let (_, records) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(records, vec![a, b]);
    }

    #[test]
    fn a_damaged_middle_line_is_an_error_and_resume_needs_a_journal() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Journal::open(dir.path(), true),
            Err(JournalError::Missing { .. })
        ));
        std::fs::write(dir.path().join(FILE_NAME), "garbage\n{}\n").unwrap();
        let err = Journal::open(dir.path(), true).unwrap_err();
        assert!(err.to_string().contains(":1:"), "{err}");
    }
}
