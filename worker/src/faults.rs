//! Fault-injection points, for tests that must stop a process at a known point instead
//! of racing a kill against its progress. Built on the `fail` crate's registry; a
//! worker reads its configuration from `FAILPOINTS` at start (names and the value
//! format: `proto::faults`). At a [`hold`] point, `return(FILE)` holds the process
//! until FILE exists; `1*off->1*return(FILE)` lets the first hit pass and holds at the
//! second. Without `FAILPOINTS` every point is a no-op.

use std::path::Path;
use std::time::Duration;

pub use proto::faults::{CHECKPOINT_WRITTEN, ENV, POINTS, RECORD_WRITTEN};

/// Why `FAILPOINTS` could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{ENV}: {entry:?}: {reason} (expected NAME=ACTIONS;NAME=ACTIONS...)")]
pub struct FaultConfigError {
    entry: String,
    reason: String,
}

/// Configures the points from `FAILPOINTS`, if set.
pub fn install_from_env() -> Result<(), FaultConfigError> {
    match std::env::var(ENV) {
        Ok(text) => install(&text),
        Err(_) => Ok(()),
    }
}

/// Configures the points from `text` (`NAME=ACTIONS`, separated by `;`).
pub fn install(text: &str) -> Result<(), FaultConfigError> {
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let error = |reason: String| FaultConfigError {
            entry: entry.to_string(),
            reason,
        };
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| error("no '='".into()))?;
        if !POINTS.contains(&name.trim()) {
            return Err(error(format!("unknown point; the points are {POINTS:?}")));
        }
        fail::cfg(name.trim(), actions.trim()).map_err(error)?;
    }
    Ok(())
}

/// A hold point: when `name` is configured to `return(FILE)` (and its count allows),
/// blocks until FILE exists. Other actions (`sleep`, `panic`, ...) act as the `fail`
/// crate defines them.
pub fn hold(name: &str) {
    if let Some(Some(gate)) = fail::eval(name, |arg| arg) {
        tracing::warn!("fault point {name}: holding until {gate} exists");
        while !Path::new(&gate).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!("fault point {name}: released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_name_the_entry() {
        let err = install("train.checkpoint_written").unwrap_err().to_string();
        assert!(
            err.contains("no '='") && err.contains("train.checkpoint_written"),
            "{err}"
        );
        let err = install("nowhere=return").unwrap_err().to_string();
        assert!(err.contains("unknown point"), "{err}");
        let err = install("teacher.record_written=explode(3)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("teacher.record_written"), "{err}");
    }

    #[test]
    fn a_hold_point_waits_for_its_file_and_counts_hits() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("gate");
        // The first hit passes, the second holds until the file appears, later ones pass.
        install(&proto::faults::hold_at(RECORD_WRITTEN, 2, &gate)).unwrap();
        hold(RECORD_WRITTEN);
        let (tx, rx) = std::sync::mpsc::channel();
        let held = std::thread::spawn(move || {
            hold(RECORD_WRITTEN);
            tx.send(()).unwrap();
        });
        // Held: nothing arrives while the gate is missing (a lower bound only; the
        // assertion that matters is that it returns once the file exists).
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        std::fs::write(&gate, b"").unwrap();
        rx.recv_timeout(Duration::from_secs(60)).expect("released");
        held.join().unwrap();
        hold(RECORD_WRITTEN);
        fail::remove(RECORD_WRITTEN);
    }
}
