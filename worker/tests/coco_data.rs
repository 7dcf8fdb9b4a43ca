//! COCO data through the real binary: `synth-coco` datasets with every defect, training that
//! skips, counts and logs each bad image and goes on, the `data.max_skip_fraction` stop,
//! malformed annotations, and `data-check`'s report and exit codes.
//!
//! One defective dataset and one short training run on it are shared by the per-defect
//! tests (`OnceLock`), so the file stays fast.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use proto::dataset::SkipReason;
use worker::data::synth_coco::Defect;

/// Good images of the defective dataset. With the four defects that reach the decoder
/// (truncated, not an image, size mismatch, bomb) the index holds 16 images: 4 steps of 4,
/// so one epoch reads every image. 12 good + 9 defect entries = 21 entries.
const GOOD: u32 = 12;
const ENTRIES: usize = GOOD as usize + Defect::ALL.len();

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    for var in [
        "DECLIP__JOB__RUN_DIR",
        "DECLIP__DATA__COCO_ROOT",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn synth(root: &Path, images: u32, defects: bool) {
    let mut cmd = worker();
    cmd.args(["synth-coco", "--images", &images.to_string(), "--out"])
        .arg(root);
    if defects {
        cmd.arg("--defects");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `worker train --standalone` on the COCO dataset at `root` with the tiny demo models,
/// one epoch, no intermediate checkpoint.
fn train(root: &Path, run_dir: &Path, sets: &[&str]) -> Output {
    let mut cmd = worker();
    cmd.args(["train", "--standalone", "--device", "cpu"]);
    let base = [
        format!("job.run_dir={}", toml_str(run_dir)),
        "data.source=\"coco\"".to_string(),
        format!("data.coco_root={}", toml_str(root)),
        "train.epochs=1".to_string(),
        "checkpoint.every_steps=0".to_string(),
    ];
    for s in base.iter().map(String::as_str).chain(sets.iter().copied()) {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

fn data_check(root: &Path, sets: &[&str]) -> Output {
    let mut cmd = worker();
    cmd.args(["data-check", "--set", "data.source=\"coco\"", "--set"])
        .arg(format!("data.coco_root={}", toml_str(root)));
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

/// A fresh directory under cargo's per-target temp dir (kept after the run for
/// inspection, replaced by the next run).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("coco_data")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shared dataset: `GOOD` images plus one of each defect.
fn defective() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = scratch("defective");
        synth(&root, GOOD, true);
        root
    })
}

struct Run {
    output: Output,
    stdout: String,
    stderr: String,
    run_dir: PathBuf,
}

/// The shared training run on the defective dataset, tolerant enough to finish.
fn defect_run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let run_dir = scratch("defect-run");
        let output = train(defective(), &run_dir, &["data.max_skip_fraction=0.5"]);
        Run {
            stdout: text(&output.stdout),
            stderr: text(&output.stderr),
            output,
            run_dir,
        }
    })
}

/// The number on the line that reads `label` then that number (whitespace-insensitive).
fn count(summary: &str, label: &str) -> Option<u64> {
    let want: Vec<&str> = label.split_whitespace().collect();
    summary.lines().find_map(|l| {
        let tokens: Vec<&str> = l.split_whitespace().collect();
        if tokens.len() == want.len() + 1 && tokens[..want.len()] == want[..] {
            tokens[want.len()].parse().ok()
        } else {
            None
        }
    })
}

/// The defect is skipped (never fatal), counted under its reason in the run summary,
/// logged with its path and reason, and training ran every step to the end.
fn assert_skipped_and_training_went_on(defect: Defect) {
    let run = defect_run();
    assert!(run.output.status.success(), "{}", run.stderr);
    let reason = defect.reason();
    let expected = Defect::ALL.iter().filter(|d| d.reason() == reason).count() as u64;
    assert_eq!(
        count(&run.stdout, &format!("skipped {}", reason.as_str())),
        Some(expected),
        "{}",
        run.stdout
    );
    assert_eq!(
        count(&run.stdout, "skipped"),
        Some(Defect::ALL.len() as u64),
        "{}",
        run.stdout
    );
    let logged = run.stderr.lines().find(|l| {
        l.contains("WARN")
            && l.contains("skipped")
            && l.contains(defect.file_name())
            && l.contains(reason.as_str())
    });
    assert!(
        logged.is_some(),
        "no warning for {defect:?}: {}",
        run.stderr
    );
    // Files the reader actually opened are named by their full path.
    if !matches!(
        defect,
        Defect::DuplicateId | Defect::ParentDir | Defect::AbsolutePath
    ) {
        let path = defective().join("train2017").join(defect.file_name());
        assert!(
            logged.is_some_and(|l| l.contains(&path.display().to_string())),
            "{defect:?} logged without its path {}: {}",
            path.display(),
            run.stderr
        );
    }
    assert!(
        run.stdout.contains("steps run      4 (now at step 4)"),
        "{}",
        run.stdout
    );
    assert!(run.run_dir.join("exports/final.safetensors").exists());
}

#[test]
fn a_missing_file_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::Missing);
}

#[test]
fn a_zero_byte_file_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::Empty);
}

#[test]
fn a_truncated_jpeg_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::Truncated);
}

#[test]
fn a_text_file_named_jpg_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::NotAnImage);
}

#[test]
fn a_size_that_disagrees_with_the_json_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::SizeMismatch);
}

#[test]
fn a_decompression_bomb_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::Bomb);
    let run = defect_run();
    assert!(
        run.stderr.contains("30000x30000"),
        "the bomb's claimed size is named: {}",
        run.stderr
    );
}

#[test]
fn a_duplicate_id_is_skipped_counted_and_logged() {
    assert_skipped_and_training_went_on(Defect::DuplicateId);
}

#[test]
fn a_parent_dir_file_name_is_refused_as_path_traversal() {
    assert_skipped_and_training_went_on(Defect::ParentDir);
}

#[test]
fn an_absolute_file_name_is_refused_as_path_traversal() {
    assert_skipped_and_training_went_on(Defect::AbsolutePath);
}

/// With the default fraction (0.001 of 21 entries: none tolerated) the entries the index
/// already refuses stop the job before any training, naming the counts.
#[test]
fn too_many_skips_stop_the_job_before_training() {
    let output = train(defective(), &scratch("strict-run"), &[]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("too many bad images: 5 of the 21 images")
            && stderr.contains("duplicate_id=1")
            && stderr.contains("path_traversal=2")
            && stderr.contains("data.max_skip_fraction = 0.001"),
        "{stderr}"
    );
    assert!(!stderr.contains("step 1/"), "no step ran: {stderr}");
}

/// At 0.3 (6 of 21 tolerated) the 5 index skips pass, and the second bad image met while
/// training stops the job.
#[test]
fn too_many_skips_stop_the_job_during_training() {
    let output = train(
        defective(),
        &scratch("mid-run"),
        &["data.max_skip_fraction=0.3"],
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("too many bad images: 7 of the {ENTRIES} images"))
            && stderr.contains("allows (6)"),
        "{stderr}"
    );
}

#[test]
fn malformed_annotations_name_the_line_and_column() {
    let root = scratch("malformed");
    synth(&root, 2, false);
    let line = r#"    {"id": 1, "file_name": "a.jpg", "width": 10 "height": 5}"#;
    std::fs::write(
        root.join("annotations/instances_train2017.json"),
        format!("{{\n  \"images\": [\n{line}\n  ]\n}}\n"),
    )
    .unwrap();
    let column = line.find(" \"height\"").unwrap() + 2;
    let expected = format!("line 3, column {column}");
    let check = data_check(&root, &[]);
    assert_eq!(check.status.code(), Some(1));
    let stderr = text(&check.stderr);
    assert!(
        stderr.contains("instances_train2017.json") && stderr.contains(&expected),
        "{stderr}"
    );
    let output = train(&root, &scratch("malformed-run"), &[]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains(&expected));
}

#[test]
fn data_check_passes_a_clean_dataset() {
    let root = scratch("clean");
    synth(&root, 6, false);
    let check = data_check(&root, &[]);
    let stdout = text(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("problems     0"), "{stdout}");
    assert!(
        stdout.contains("index        6 images, fingerprint"),
        "{stdout}"
    );
    assert!(stdout.contains("usable       yes"), "{stdout}");
}

#[test]
fn data_check_reports_every_problem_and_fails_past_the_fraction() {
    let check = data_check(defective(), &[]);
    let stdout = text(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    for defect in Defect::ALL {
        assert!(
            stdout.lines().any(|l| l.contains(defect.file_name())
                && l.trim_start().starts_with(defect.reason().as_str())),
            "{defect:?} not reported: {stdout}"
        );
    }
    for reason in [SkipReason::PathTraversal, SkipReason::TooLarge] {
        let expected = Defect::ALL.iter().filter(|d| d.reason() == reason).count() as u64;
        assert_eq!(count(&stdout, reason.as_str()), Some(expected), "{stdout}");
    }
    assert!(
        stdout.contains(&format!("skipped      9 of {ENTRIES} entries")),
        "{stdout}"
    );
    // The same dataset is usable when the job tolerates that many skips.
    let tolerant = data_check(defective(), &["data.max_skip_fraction=0.5"]);
    assert_eq!(
        tolerant.status.code(),
        Some(0),
        "{}",
        text(&tolerant.stdout)
    );
}

#[test]
fn data_check_refuses_bad_configs_with_exit_2() {
    let root = defective();
    let bad_fraction = data_check(root, &["data.max_skip_fraction=2.0"]);
    assert_eq!(bad_fraction.status.code(), Some(2));
    let synthetic = worker().arg("data-check").output().unwrap();
    assert_eq!(synthetic.status.code(), Some(2));
    assert!(text(&synthetic.stderr).contains("data.source"));
}
