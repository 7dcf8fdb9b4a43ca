//! Preemption end to end (`coordinator launch`, real binaries on loopback): SIGTERM to one
//! trainer, or to the launcher, drains the job (an agreed stop step, a committed
//! checkpoint, every process exits, the launcher with 0), and `coordinator launch --resume`
//! continues it to the end with final weights bitwise equal to an uninterrupted run's.
//!
//! The trainers hold after their first committed checkpoint until a gate file exists
//! (`proto::faults`), so each SIGTERM lands mid-job however fast the machine is.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary, text};

const TOKEN: &str = "e2e-preemption-token";

/// 32 images, batch 4, 2 epochs: 16 steps over a world of two, the teachers online (no
/// teacher processes), a checkpoint every 4 steps.
const SETS: &[&str] = &[
    "job.run_dir=\"run\"",
    "data.synthetic_images=32",
    "train.epochs=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep=10",
    "trainers.min=2",
    "trainers.max=2",
    "teachers.mode=\"online\"",
];

/// Only catches hangs.
const HANG_DEADLINE: Duration = Duration::from_secs(600);

fn launch(dir: &Path, resume: bool, gate: Option<&Path>) -> Child {
    let mut cmd = binary("coordinator");
    cmd.current_dir(dir)
        .arg("launch")
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    if let Some(gate) = gate {
        // Inherited by the workers the launcher spawns.
        cmd.env(
            proto::faults::ENV,
            proto::faults::hold_at(proto::faults::CHECKPOINT_WRITTEN, 1, gate),
        );
    }
    for set in SETS {
        cmd.args(["--set", set]);
    }
    cmd.spawn().expect("start coordinator launch")
}

/// Waits for `child` (a hang fails the test) and returns its output.
fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(HANG_DEADLINE) {
        Ok(output) => output.expect("wait for launch"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("coordinator launch did not finish within {HANG_DEADLINE:?}");
        }
    }
}

fn assert_success(output: &Output, what: &str) {
    let (stdout, stderr) = text(output);
    assert!(
        output.status.success(),
        "{what}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
}

/// Process ids of the children of `parent` whose command line contains `needle`.
fn children(parent: u32, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if ppid == Some(parent) && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Waits until the job in `dir` has a committed checkpoint (the journal records it).
fn wait_for_commit(dir: &Path, launcher: &mut Child) {
    let journal = dir.join("run").join("journal.jsonl");
    let deadline = Instant::now() + HANG_DEADLINE;
    loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        if text.lines().any(|l| l.contains("\"committed\"")) {
            return;
        }
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "launch ended before a checkpoint was committed"
        );
        assert!(Instant::now() < deadline, "no checkpoint was committed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    // safetensors files written by the same code: equal tensors are equal bytes, so
    // comparing the files' tensor payloads by name is a bitwise comparison.
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let offsets = &info["data_offsets"];
            let (a, b) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            (name.clone(), data[a..b].to_vec())
        })
        .collect()
}

fn final_export(dir: &Path) -> PathBuf {
    dir.join("run/exports/final.safetensors")
}

/// Drains a held launch with `stop` (it sends the SIGTERM), then checks the drain and
/// resumes the job to its end.
fn drain_and_resume(dir: &Path, stop: impl FnOnce(&mut Child)) {
    let gate = dir.join("gate");
    let mut held = launch(dir, false, Some(&gate));
    wait_for_commit(dir, &mut held);
    stop(&mut held);
    std::fs::write(&gate, b"").expect("release the trainers");
    let drained = finish(held);
    assert_success(&drained, "the drained launch");
    let journal = std::fs::read_to_string(dir.join("run/journal.jsonl")).unwrap();
    assert!(journal.contains("DRAINING"), "{journal}");
    assert!(journal.contains("STOPPED"), "{journal}");
    assert!(
        !final_export(dir).exists(),
        "the job was drained before its end"
    );
    let resumed = finish(launch(dir, true, None));
    assert_success(&resumed, "the resumed launch");
    let (stdout, _) = text(&resumed);
    assert!(stdout.contains("steps          16/16"), "{stdout}");
}

#[test]
fn a_sigterm_drains_the_job_and_resume_ends_with_the_uninterrupted_weights() {
    let whole = tempfile::tempdir().unwrap();
    assert_success(&finish(launch(whole.path(), false, None)), "uninterrupted");
    let reference = tensors(&final_export(whole.path()));

    // SIGTERM to one trainer: it asks the coordinator to drain the job.
    let by_trainer = tempfile::tempdir().unwrap();
    drain_and_resume(by_trainer.path(), |launcher| {
        let trainers = children(launcher.id(), "train --coordinator");
        assert_eq!(trainers.len(), 2, "two trainer processes");
        sigterm(trainers[1]);
    });
    assert!(
        reference == tensors(&final_export(by_trainer.path())),
        "after a trainer's SIGTERM and --resume the final weights differ"
    );

    // SIGTERM to the launcher: the same drain.
    let by_launcher = tempfile::tempdir().unwrap();
    drain_and_resume(by_launcher.path(), |launcher| sigterm(launcher.id()));
    assert!(
        reference == tensors(&final_export(by_launcher.path())),
        "after the launcher's SIGTERM and --resume the final weights differ"
    );
}
