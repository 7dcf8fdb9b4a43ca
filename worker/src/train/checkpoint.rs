//! Checkpoints: `checkpoints/step-NNNNNNNN/` with the student's weights, the
//! optimizer's moments, the resolved job config and `state.json`.
//!
//! A checkpoint is assembled in a hidden temp directory, every file fsynced,
//! `state.json` (with each file's SHA-256) written last, then the directory is
//! renamed into place and its parent fsynced: a crash leaves either the old set
//! or a complete new one. Loading verifies the checksums and falls back to the
//! previous checkpoint when one is damaged. Only the newest `keep` are kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use proto::plan::order::Cursor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// Bumped when the layout changes.
pub const FORMAT: u32 = 1;
const STATE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: checksum mismatch (file damaged)")]
    Checksum { path: PathBuf },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What `state.json` records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Where the data order resumes.
    pub cursor: Cursor,
    /// Hash of the resolved job config that produced it.
    pub config_hash: String,
    /// The schedule's total steps (so a resume sees the same schedule).
    pub total_steps: u64,
    /// Loss of the last step (for summaries).
    pub last_loss: f64,
    /// File name -> SHA-256 hex.
    pub files: BTreeMap<String, String>,
}

/// A checkpoint's contents in memory.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub student: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub job_toml: String,
}

/// Name of the checkpoint directory for `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes `ckpt` under `root` atomically, prunes to `keep`; returns its directory.
pub fn save(root: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(root).map_err(io(root))?;
    let name = dir_name(ckpt.state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let mut state = ckpt.state.clone();
    state.files.clear();
    for (file, tensors) in [
        ("student.safetensors", &ckpt.student),
        ("optimizer.safetensors", &ckpt.optimizer),
    ] {
        let path = tmp.join(file);
        Tensor::write_safetensors(tensors, &path).map_err(|e| CheckpointError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        state.files.insert(file.into(), sync_and_hash(&path)?);
    }
    let job = tmp.join("job.toml");
    fs::write(&job, &ckpt.job_toml).map_err(io(&job))?;
    state.files.insert("job.toml".into(), sync_and_hash(&job)?);
    let state_path = tmp.join(STATE);
    let json = serde_json::to_vec_pretty(&state).expect("state serialises");
    let mut f = File::create(&state_path).map_err(io(&state_path))?;
    f.write_all(&json)
        .and_then(|_| f.sync_all())
        .map_err(io(&state_path))?;
    File::open(&tmp)
        .and_then(|d| d.sync_all())
        .map_err(io(&tmp))?;
    let dest = root.join(&name);
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io(&dest))?;
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io(root))?;
    prune(root, keep)?;
    Ok(dest)
}

/// The checksum the coordinator's registry records for a checkpoint: sha256 of its
/// `state.json`, which itself lists the sha256 of every other file.
pub fn state_checksum(dir: &Path) -> Result<String, CheckpointError> {
    hash_file(&dir.join(STATE))
}

fn sync_and_hash(path: &Path) -> Result<String, CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))?;
    hash_file(path)
}

fn hash_file(path: &Path) -> Result<String, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Complete checkpoint directories under `root`, newest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join(STATE).exists()
        })
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    for old in list(root).into_iter().skip(keep.max(1)) {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Loads and verifies one checkpoint directory.
pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let state_path = dir.join(STATE);
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
    if state.format != FORMAT {
        return Err(CheckpointError::Format {
            path: state_path,
            message: format!("format {} (this build reads {FORMAT})", state.format),
        });
    }
    for (file, expected) in &state.files {
        let path = dir.join(file);
        if &hash_file(&path)? != expected {
            return Err(CheckpointError::Checksum { path });
        }
    }
    let read = |file: &str| {
        let path = dir.join(file);
        Tensor::read_safetensors(&path).map_err(|e| CheckpointError::Format {
            path,
            message: e.to_string(),
        })
    };
    let job_path = dir.join("job.toml");
    Ok(Checkpoint {
        student: read("student.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
        job_toml: fs::read_to_string(&job_path).map_err(io(&job_path))?,
        state,
    })
}

/// The newest checkpoint under `root` that verifies; damaged ones are skipped
/// with a warning (the failure model's "fall back to the previous committed one").
pub fn load_latest(root: &Path) -> Option<(PathBuf, Checkpoint)> {
    for dir in list(root) {
        match load(&dir) {
            Ok(ckpt) => return Some((dir, ckpt)),
            Err(err) => tracing::warn!("skipping damaged checkpoint: {err}"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        Checkpoint {
            state: CheckpointState {
                format: FORMAT,
                step,
                cursor: Cursor { epoch: 0, step },
                config_hash: "abc".into(),
                total_steps: 10,
                last_loss: 1.5,
                files: BTreeMap::new(),
            },
            student: vec![("w".into(), Tensor::from_slice(&[1.0f32, 2.0]))],
            optimizer: vec![("exp_avg.w".into(), Tensor::from_slice(&[0.5f32, 0.25]))],
            job_toml: "[job]\n".into(),
        }
    }

    #[test]
    fn saves_atomically_prunes_and_falls_back_past_a_damaged_checkpoint() {
        crate::runtime::init();
        let dir = tempfile::tempdir().unwrap();
        for step in [2, 4, 6] {
            save(dir.path(), &sample(step), 2).unwrap();
        }
        let names: Vec<_> = list(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["step-00000006", "step-00000004"]);
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));
        let (_, latest) = load_latest(dir.path()).unwrap();
        assert_eq!(latest.state.step, 6);
        assert_eq!(latest.state.files.len(), 3);
        // Flip one byte of the newest student file: it is refused, the previous one is used.
        let file = dir.path().join("step-00000006/student.safetensors");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&file, bytes).unwrap();
        assert!(matches!(
            load(&dir.path().join("step-00000006")),
            Err(CheckpointError::Checksum { .. })
        ));
        let (path, fallback) = load_latest(dir.path()).unwrap();
        assert_eq!(
            (
                fallback.state.step,
                path.file_name().unwrap().to_str().unwrap()
            ),
            (4, "step-00000004")
        );
    }
}
