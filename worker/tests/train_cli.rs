//! Standalone training through the real binary: the demo learns, an interrupted
//! run resumes to bitwise the same weights, and exports are the α-merge.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proto::job;
use tch::Tensor;

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env_remove("DECLIP__JOB__RUN_DIR");
    cmd
}

fn train(run_dir: &Path, sets: &[&str]) -> Command {
    let mut cmd = worker();
    cmd.args(["train", "--standalone", "--device", "cpu", "--set"])
        .arg(format!("job.run_dir={:?}", run_dir.display().to_string()));
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn figure(summary: &str, label: &str) -> f64 {
    let line = summary
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("{label} in {summary}"));
    line[label.len()..].trim().parse().unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn latest_checkpoint(run_dir: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("state.json").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a checkpoint")
}

#[test]
fn the_demo_job_learns() {
    let dir = tempfile::tempdir().unwrap();
    let summary = stdout_of(&train(dir.path(), &[]).output().unwrap());
    let (first, last) = (
        figure(&summary, "loss first 20"),
        figure(&summary, "loss last 20"),
    );
    eprintln!(
        "demo: mean loss of the first 20 steps {first:.4}, of the last 20 {last:.4} (ratio {:.3})",
        last / first
    );
    assert!(last <= 0.8 * first, "{summary}");
    assert!(dir.path().join("exports/final.safetensors").exists());
    assert!(dir.path().join("exports/epoch-0004.safetensors").exists());
}

/// A short job: 32 images, batch 4, 2 epochs = 16 steps, a checkpoint every 4.
const SHORT: &[&str] = &[
    "data.synthetic_images=32",
    "train.epochs=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep=10",
];

#[test]
fn a_killed_run_resumes_to_bitwise_the_same_weights() {
    let whole = tempfile::tempdir().unwrap();
    stdout_of(&train(whole.path(), SHORT).output().unwrap());

    let broken = tempfile::tempdir().unwrap();
    // The run holds after its first checkpoint (step 4) until a file that never appears
    // exists, so the kill lands at step 4 however fast or loaded the machine is.
    let never = broken.path().join("never-released");
    let mut child = train(broken.path(), SHORT)
        .env(
            proto::faults::ENV,
            proto::faults::hold_at(proto::faults::CHECKPOINT_WRITTEN, 1, &never),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = broken.path().join("checkpoints/step-00000004/state.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !first.exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        !broken.path().join("exports/final.safetensors").exists(),
        "killed before the end"
    );

    let resumed = stdout_of(&train(broken.path(), SHORT).output().unwrap());
    assert!(resumed.contains("resumed from"), "{resumed}");
    let (a, b) = (
        latest_checkpoint(whole.path()),
        latest_checkpoint(broken.path()),
    );
    assert_eq!(a.file_name(), b.file_name());
    for file in ["student.safetensors", "optimizer.safetensors"] {
        let (x, y) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert_eq!(x.len(), y.len());
        for (name, t) in &x {
            assert!(t.equal(&y[name]), "{file}: {name} differs after resume");
        }
    }
    let (x, y) = (
        tensors(&whole.path().join("exports/final.safetensors")),
        tensors(&broken.path().join("exports/final.safetensors")),
    );
    assert!(
        x.iter().all(|(n, t)| t.equal(&y[n])),
        "final exports differ"
    );
}

/// Files of `a` and `b` (checkpoint directories or exports) hold bitwise equal tensors.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    for (name, t) in &x {
        assert!(t.equal(&y[name]), "{}: {name} differs", a.display());
    }
}

#[test]
fn a_sigterm_checkpoints_the_next_step_and_the_run_resumes_to_the_same_weights() {
    let whole = tempfile::tempdir().unwrap();
    stdout_of(&train(whole.path(), SHORT).output().unwrap());

    let stopped = tempfile::tempdir().unwrap();
    // Held after the step-4 checkpoint until `gate` exists: the SIGTERM lands there, and
    // the run stops right after that step however fast the machine is.
    let gate = stopped.path().join("gate");
    let child = train(stopped.path(), SHORT)
        .env(
            proto::faults::ENV,
            proto::faults::hold_at(proto::faults::CHECKPOINT_WRITTEN, 1, &gate),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = stopped.path().join("checkpoints/step-00000004/state.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !first.exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::fs::write(&gate, b"").unwrap();
    let summary = stdout_of(&child.wait_with_output().unwrap());
    assert!(summary.contains("interrupted    at step 4"), "{summary}");
    assert!(!stopped.path().join("checkpoints/step-00000005").exists());
    assert!(
        !stopped.path().join("exports/final.safetensors").exists(),
        "stopped before the end"
    );

    let resumed = stdout_of(&train(stopped.path(), SHORT).output().unwrap());
    assert!(resumed.contains("resumed from"), "{resumed}");
    let (a, b) = (
        latest_checkpoint(whole.path()),
        latest_checkpoint(stopped.path()),
    );
    assert_eq!(a.file_name(), b.file_name());
    for file in ["student.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&a.join(file), &b.join(file));
    }
    assert_same_tensors(
        &whole.path().join("exports/final.safetensors"),
        &stopped.path().join("exports/final.safetensors"),
    );
}

#[test]
fn an_export_is_the_alpha_merge_in_the_original_layout_and_loads_into_inspect() {
    let dir = tempfile::tempdir().unwrap();
    stdout_of(
        &train(dir.path(), &["data.synthetic_images=16", "train.epochs=1"])
            .output()
            .unwrap(),
    );
    let ckpt = latest_checkpoint(dir.path());
    let out = dir.path().join("merged.safetensors");
    let alpha = 0.3;
    let said = stdout_of(
        &worker()
            .args([
                "export",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--alpha",
                &alpha.to_string(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    );
    assert!(said.contains("wrote"), "{said}");

    // Key by key: fl(α·s) + fl((1−α)·o), the original being the demo's seeded init.
    worker::runtime::init();
    let merged = tensors(&out);
    let student = tensors(&ckpt.join("student.safetensors"));
    let spec = job::load(&job::DEMO_CONFIG, Vec::new(), &[]).unwrap().spec;
    let (original_vs, _, _) =
        worker::model::towers::build_student(&spec.model.student, None, tch::Device::Cpu).unwrap();
    let original = original_vs.variables();
    assert_eq!(merged.len(), student.len());
    let mut moved = 0;
    for (name, s) in &student {
        let m = &merged[&format!("visual.{name}")];
        let o = &original[name];
        let expected = s * alpha + o * (1.0 - alpha);
        assert!(m.equal(&expected), "{name} is not the α-merge");
        moved += usize::from(!s.equal(o));
    }
    assert!(moved > 0, "training changed the student");

    // The export loads back as EVA-CLIP-layout student weights.
    let features = dir.path().join("f.safetensors");
    let inspect = worker()
        .args([
            "inspect",
            "--device",
            "cpu",
            "--student-weights",
            out.to_str().unwrap(),
            "--out",
            features.to_str().unwrap(),
        ])
        .arg("--image")
        .arg(common::fixture_path("images/coffee.png"))
        .output()
        .unwrap();
    stdout_of(&inspect);
    assert!(features.exists());
}

#[test]
fn a_checkpoint_of_another_config_is_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    stdout_of(
        &train(dir.path(), &["data.synthetic_images=8", "train.epochs=1"])
            .output()
            .unwrap(),
    );
    let output = train(
        dir.path(),
        &["data.synthetic_images=8", "train.epochs=1", "train.lr=0.01"],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another job config"), "{stderr}");
}
