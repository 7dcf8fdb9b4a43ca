//! The coordinator killed with SIGKILL mid-run and restarted with `--resume`: the workers
//! (real processes) reconnect, and the job completes with the configured number of steps.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::binary;

const TOKEN: &str = "e2e-restart-token";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `coordinator serve` on `addr`; its stderr lines arrive on the channel.
fn serve(dir: &Path, addr: &str, resume: bool) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = binary("coordinator");
    cmd.current_dir(dir)
        .args(["serve", "--listen", addr])
        .args(SETS.iter().flat_map(|s| ["--set", s]))
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.args(["--resume", "run"]);
    }
    let mut child = cmd.spawn().expect("start coordinator serve");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

const SETS: [&str; 5] = [
    "job.run_dir=\"run\"",
    "data.synthetic_images=48",
    "train.epochs=12",
    "checkpoint.every_steps=6",
    "trainers.join_wait_s=5",
];

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return seen;
            }
        }
    }
    panic!(
        "no line with {needle:?} within {limit:?}:\n{}",
        seen.join("\n")
    );
}

/// The file that releases rank 0 from its hold after the second checkpoint.
fn release_gate(dir: &Path) -> std::path::PathBuf {
    dir.join("release-rank-0")
}

/// `worker teach|train` in `dir`. Trainers hold after their second committed checkpoint
/// (step 12) until [`release_gate`] exists, so the coordinator dies while the job is
/// mid-run however fast the machine is (only rank 0 writes checkpoints).
fn worker(dir: &Path, command: &str, addr: &str, log: &str) -> Child {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let hold = proto::faults::hold_at(proto::faults::CHECKPOINT_WRITTEN, 2, &release_gate(dir));
    binary("worker")
        .current_dir(dir)
        .args([command, "--coordinator", addr, "--device", "cpu"])
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .env(proto::faults::ENV, hold)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start worker")
}

fn status_step(addr: &str) -> Option<(u64, bool)> {
    let out = binary("coordinator")
        .args(["status", "--json", "--addr", addr])
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["step"].as_u64().unwrap_or(0),
        !v["last_checkpoint"].is_null(),
    ))
}

fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    panic!("{what} did not exit within {limit:?}");
}

#[test]
fn a_sigkilled_coordinator_resumes_from_its_journal_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut first, lines) = serve(dir.path(), &addr, false);
    wait_for_line(&lines, "listening on", Duration::from_secs(60));
    let mut workers = [
        worker(dir.path(), "teach", &addr, "teacher-0.log"),
        worker(dir.path(), "train", &addr, "trainer-0.log"),
        worker(dir.path(), "train", &addr, "trainer-1.log"),
    ];

    // Kill it once a checkpoint is committed and training is under way.
    let deadline = Instant::now() + Duration::from_secs(300);
    let killed_at = loop {
        assert!(Instant::now() < deadline, "no committed checkpoint in time");
        if let Some((step, committed)) = status_step(&addr) {
            if committed && step >= 7 {
                break step;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    first.kill().expect("SIGKILL the coordinator");
    first.wait().unwrap();
    assert!(
        killed_at < 48,
        "killed too late to prove anything (step {killed_at})"
    );

    std::thread::sleep(Duration::from_secs(1));
    let (mut second, lines) = serve(dir.path(), &addr, true);
    let seen = wait_for_line(&lines, "listening on", Duration::from_secs(60));
    assert!(
        seen.iter().any(|l| l.contains("journal")),
        "the restarted coordinator should say it replayed its journal:\n{}",
        seen.join("\n")
    );
    std::fs::write(release_gate(dir.path()), b"").expect("release rank 0");
    let status = wait_exit(
        &mut second,
        Duration::from_secs(600),
        "the resumed coordinator",
    );
    assert!(status.success(), "resumed coordinator failed: {status:?}");
    for (i, w) in workers.iter_mut().enumerate() {
        let status = wait_exit(w, Duration::from_secs(60), "a worker");
        let log = ["teacher-0.log", "trainer-0.log", "trainer-1.log"][i];
        assert!(
            status.success(),
            "{log}: {status:?}\n{}",
            std::fs::read_to_string(dir.path().join(log)).unwrap_or_default()
        );
    }
    let run = dir.path().join("run");
    // 48 images / batch 4 × 12 epochs = 144 steps, the last one checkpointed and exported.
    assert!(run.join("checkpoints/step-00000144").is_dir());
    assert!(run.join("exports/final.safetensors").exists());
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(journal.to_lowercase().contains("completed"), "{journal}");
}
