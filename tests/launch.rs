//! `coordinator launch` end to end with the real binaries on loopback: 2 trainers and 1
//! teacher complete a small job; `coordinator status` during the run shows both ranks and
//! the teacher; the run directory holds logs, checkpoints, the export and the journal.
//! And the README's first command (`coordinator launch`, embedded demo) completes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{binary, text};

/// A token the test knows, so `coordinator status` can authenticate (launch uses
/// `DECLIP_TOKEN` when it is set, and generates one otherwise).
const TOKEN: &str = "e2e-launch-token";

/// Starts `coordinator launch` in `dir` with the demo config and `sets`; returns the
/// child and a channel of its stderr lines.
fn start_launch(dir: &Path, sets: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = binary("coordinator");
    cmd.current_dir(dir)
        .arg("launch")
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for set in sets {
        cmd.args(["--set", set]);
    }
    let mut child = cmd.spawn().expect("start coordinator launch");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The gRPC address from launch's banner line ("... coordinator on ADDR, logs in ...").
fn wait_for_address(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            seen.push(line.clone());
            if let Some(rest) = line.split(" coordinator on ").nth(1) {
                return rest.split(',').next().unwrap_or_default().to_string();
            }
        }
    }
    panic!("launch printed no address:\n{}", seen.join("\n"));
}

fn status_json(addr: &str) -> Option<serde_json::Value> {
    let output = binary("coordinator")
        .args(["status", "--json", "--addr", addr])
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .output()
        .expect("run coordinator status");
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())
        .flatten()
}

#[test]
fn launch_trains_two_ranks_with_a_teacher_and_status_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = start_launch(
        dir.path(),
        &[
            "job.run_dir=\"run\"",
            "data.synthetic_images=48",
            "train.epochs=3",
            "checkpoint.every_steps=8",
        ],
    );
    let mut seen = Vec::new();
    let addr = wait_for_address(&lines, &mut seen);

    // Poll status until both ranks and the teacher have shown up while training.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut saw_ranks = false;
    let mut saw_teacher = false;
    while Instant::now() < deadline && !(saw_ranks && saw_teacher) {
        if let Some(status) = status_json(&addr) {
            let ranks = status["ranks"].as_array().map_or(0, |r| r.len());
            saw_ranks |= ranks == 2 && status["world_size"] == 2;
            saw_teacher |= status["teachers"].as_array().is_some_and(|t| !t.is_empty());
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = child.wait_with_output_timeout(Duration::from_secs(600));
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    let (stdout, _) = text(&status);
    assert!(
        status.status.success(),
        "launch failed\nstdout:\n{stdout}\nstderr:\n{}",
        seen.join("\n")
    );
    assert!(saw_ranks, "status never showed 2 ranks in a world of 2");
    assert!(saw_teacher, "status never showed the teacher");

    // 48 images / batch 4 × 3 epochs.
    assert!(stdout.contains("steps          36/36"), "{stdout}");
    let run = dir.path().join("run");
    for log in [
        "logs/trainer-0.log",
        "logs/trainer-1.log",
        "logs/teacher-0.log",
    ] {
        let text = std::fs::read_to_string(run.join(log)).unwrap_or_default();
        assert!(!text.is_empty(), "{log} is empty or missing");
    }
    assert!(run.join("journal.jsonl").exists());
    assert!(run.join("exports/final.safetensors").exists());
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        checkpoints.iter().any(|c| c == "step-00000036"),
        "final checkpoint missing: {checkpoints:?}"
    );
}

#[test]
fn readme_first_command_runs_the_demo_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let (child, lines) = start_launch(dir.path(), &[]);
    let output = child.wait_with_output_timeout(Duration::from_secs(900));
    let stderr: Vec<String> = lines.try_iter().collect();
    let (stdout, _) = text(&output);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        stderr.join("\n")
    );
    assert!(stdout.contains("(completed)"), "{stdout}");
    assert!(dir
        .path()
        .join("runs/demo/exports/final.safetensors")
        .exists());
}

trait WaitTimeout {
    fn wait_with_output_timeout(self, limit: Duration) -> std::process::Output;
}

impl WaitTimeout for Child {
    /// Waits for the child, killing it past `limit` (a hung job must fail the test, not CI).
    fn wait_with_output_timeout(mut self, limit: Duration) -> std::process::Output {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.try_wait().unwrap().is_some() {
                return self.wait_with_output().unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.kill();
        let output = self.wait_with_output().unwrap();
        panic!(
            "timed out after {limit:?}; stdout so far:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}
