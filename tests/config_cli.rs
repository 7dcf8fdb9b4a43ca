//! The job config through the real binaries: malformed configs are refused with
//! exit code 2, a message naming the source and the key, and nothing on disk.

mod common;

use std::path::Path;
use std::process::Output;

use common::{binary, repo_root, text, tree};

/// (args, environment, expected origin in the message, expected key)
type RefusalCase<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, String, &'a str);

/// Runs `coordinator validate` in an empty folder whose run_dir points inside it.
fn validate_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = binary("coordinator");
    cmd.current_dir(dir).arg("validate").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run coordinator")
}

fn assert_refused(output: &Output, origin: &str, key: &str) {
    let (stdout, stderr) = text(output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains(origin),
        "stderr should name {origin:?}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("`{key}`")),
        "stderr should name key {key:?}: {stderr}"
    );
}

/// Writes a copy of the demo config with the first `key = ...` line of each edit
/// replaced by `key = value`, returns its path. Panics if a key is not in the demo,
/// so a change to the demo cannot silently turn a refusal test into a no-op.
fn demo_variant(dir: &Path, name: &str, edits: &[(&str, &str)]) -> String {
    let demo = std::fs::read_to_string(repo_root().join("configs/demo.toml")).unwrap();
    let mut lines: Vec<String> = demo.lines().map(String::from).collect();
    for (key, value) in edits {
        let line = lines
            .iter_mut()
            .find(|l| l.split('=').next().map(str::trim) == Some(*key))
            .unwrap_or_else(|| panic!("configs/demo.toml has no `{key} =` line"));
        *line = format!("{key} = {value}");
    }
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

#[test]
fn the_embedded_demo_validates_and_prints_the_resolved_config() {
    let dir = tempfile::tempdir().unwrap();
    let output = validate_in(
        dir.path(),
        &["--set", "train.epochs=2"],
        &[("DECLIP__TRAIN__LR", "0.004")],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("epochs = 2"), "{stdout}");
    assert!(stdout.contains("lr = 0.004"), "{stdout}");
    // Resolved: architecture fields and defaults are all printed.
    assert!(stdout.contains("layer_norm_eps = 0.000001"), "{stdout}");
    assert!(tree(dir.path()).is_empty(), "validate writes nothing");
}

#[test]
fn malformed_configs_are_refused_naming_file_and_key_and_leave_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let configs = tempfile::tempdir().unwrap();
    let cfg = configs.path();
    // (config file, extra args, env, expected origin, expected key)
    // An extra line inside [train]: `epochs = 4` followed by an unknown key.
    let unknown = demo_variant(cfg, "unknown.toml", &[("epochs", "4\nbatchsize = 4")]);
    let wrong_type = demo_variant(cfg, "type.toml", &[("epochs", "\"three\"")]);
    let range = demo_variant(cfg, "range.toml", &[("lr", "-1.0")]);
    let batch = demo_variant(cfg, "batch.toml", &[("batch_size", "5")]);
    let patch = demo_variant(cfg, "patch.toml", &[("student_resolution", "200")]);
    let grid = demo_variant(cfg, "grid.toml", &[("vfm_resolution", "168")]);
    let coco = demo_variant(cfg, "coco.toml", &[("source", "\"coco\"")]);
    let cases: Vec<RefusalCase> = vec![
        (
            vec!["--config".into(), unknown.clone()],
            vec![],
            unknown.clone(),
            "train.batchsize",
        ),
        (
            vec!["--config".into(), wrong_type.clone()],
            vec![],
            wrong_type.clone(),
            "train.epochs",
        ),
        (
            vec!["--config".into(), range.clone()],
            vec![],
            range.clone(),
            "train.lr",
        ),
        (
            vec!["--config".into(), batch.clone()],
            vec![],
            batch.clone(),
            "train.batch_size",
        ),
        (
            vec!["--config".into(), patch.clone()],
            vec![],
            patch.clone(),
            "data.student_resolution",
        ),
        (
            vec!["--config".into(), grid.clone()],
            vec![],
            grid.clone(),
            "data.vfm_resolution",
        ),
        (
            vec!["--config".into(), coco.clone()],
            vec![],
            coco.clone(),
            "data.coco_root",
        ),
        (
            vec![],
            vec![("DECLIP__TRAIN__BATCH_SIZE", "3")],
            "environment variable DECLIP__TRAIN__BATCH_SIZE".into(),
            "train.batch_size",
        ),
        (
            vec!["--set".into(), "data.max_crops=99".into()],
            vec![],
            "--set data.max_crops=99".into(),
            "data.max_crops",
        ),
    ];
    for (args, env, origin, key) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = validate_in(dir.path(), &args, &env);
        assert_refused(&output, &origin, key);
    }
    assert!(
        tree(dir.path()).is_empty(),
        "refused configs write nothing: {:?}",
        tree(dir.path())
    );
}

#[test]
fn every_reference_config_validates_with_a_data_root() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "eva02-b16-coco.toml",
        "eva02-l14-336-coco.toml",
        "openai-b16-coco.toml",
    ] {
        let path = repo_root().join("configs").join(name);
        let path = path.display().to_string();
        let output = validate_in(
            dir.path(),
            &["--config", &path, "--set", "data.coco_root=/data/coco"],
            &[],
        );
        assert!(output.status.success(), "{name}: {}", text(&output).1);
        let without_root = validate_in(dir.path(), &["--config", &path], &[]);
        assert_refused(&without_root, name, "data.coco_root");
    }
}

#[test]
fn the_worker_reports_what_libtorch_found_and_refuses_a_missing_gpu() {
    let output = binary("worker")
        .args(["devices", "--device", "cpu"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("libtorch 2.11.0; CUDA "), "{stdout}");
    assert!(stdout.contains("device: Cpu"), "{stdout}");
    // The start-up log carries the same line.
    assert!(stderr.contains("libtorch 2.11.0"), "{stderr}");
    let json = binary("worker")
        .args(["--log-format", "json", "devices", "--device", "cpu"])
        .output()
        .unwrap();
    let first_line = text(&json).1.lines().next().unwrap_or_default().to_string();
    assert!(
        first_line.starts_with('{') && first_line.contains("\"level\":\"INFO\""),
        "{first_line}"
    );
    // A GPU index beyond what is visible is an error, not a silent CPU run.
    let missing = binary("worker")
        .args(["devices", "--device", "cuda:7"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(text(&missing).1.contains("cuda:7"), "{}", text(&missing).1);
}
