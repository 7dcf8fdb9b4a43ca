//! Loading and validating job configs through the public API.

use std::path::PathBuf;

use proto::job::{self, ConfigError, ConfigSource, Precision, Problem};

fn repo_config(name: &str) -> ConfigSource {
    ConfigSource::File(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name),
    )
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn problems(result: Result<job::LoadedJob, ConfigError>) -> Vec<Problem> {
    match result {
        Err(ConfigError::Invalid(problems)) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

#[test]
fn every_shipped_config_is_valid_once_the_user_sets_the_data_root() {
    let demo = job::load(&job::DEMO_CONFIG, no_env(), &[]).expect("demo config");
    assert_eq!(demo.spec.trainers.max, 2);
    for name in [
        "eva02-b16-coco.toml",
        "eva02-l14-336-coco.toml",
        "openai-b16-coco.toml",
    ] {
        let sets = ["data.coco_root=/data/coco".to_string()];
        let loaded = job::load(&repo_config(name), no_env(), &sets)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let student = loaded.spec.model.student.arch();
        let vfm = loaded.spec.model.vfm.arch();
        // docs/method.md §1: student and VFM grids agree (35x35 for B, 40x40 for L).
        assert_eq!(
            loaded.spec.data.student_resolution / student.patch_size,
            loaded.spec.data.vfm_resolution / vfm.patch_size,
            "{name}"
        );
    }
}

#[test]
fn a_reference_config_without_its_data_root_is_refused_naming_the_key() {
    let found = problems(job::load(
        &repo_config("eva02-b16-coco.toml"),
        no_env(),
        &[],
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "data.coco_root");
    assert!(
        found[0].origin.ends_with("configs/eva02-b16-coco.toml"),
        "{}",
        found[0].origin
    );
}

#[test]
fn presets_are_defaults_that_explicit_fields_override() {
    let sets = [
        "data.coco_root=/d".to_string(),
        "model.student.width=1536".to_string(),
        "model.student.heads=24".to_string(),
    ];
    let loaded = job::load(&repo_config("eva02-b16-coco.toml"), no_env(), &sets).unwrap();
    let arch = loaded.spec.model.student.arch();
    assert_eq!(
        (arch.width, arch.heads, arch.head_dim, arch.depth),
        (1536, 24, 64, 12)
    );
}

#[test]
fn environment_overrides_the_file_and_set_overrides_the_environment() {
    let env = vec![
        ("DECLIP__TRAIN__BATCH_SIZE".to_string(), "8".to_string()),
        ("DECLIP__TRAIN__PRECISION".to_string(), "bf16".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let loaded = job::load(&job::DEMO_CONFIG, env.clone(), &[]).unwrap();
    assert_eq!(loaded.spec.train.batch_size, 8);
    assert_eq!(loaded.spec.train.precision, Precision::Bf16);
    let sets = [
        "train.batch_size=12".to_string(),
        "train.betas=[0.8, 0.9]".to_string(),
    ];
    let loaded = job::load(&job::DEMO_CONFIG, env, &sets).unwrap();
    assert_eq!(loaded.spec.train.batch_size, 12);
    assert_eq!(loaded.spec.train.betas, [0.8, 0.9]);
}

#[test]
fn problems_name_the_source_that_set_the_key() {
    let env = vec![("DECLIP__TRAIN__LR".to_string(), "-1".to_string())];
    let found = problems(job::load(
        &job::DEMO_CONFIG,
        env,
        &["export.alpha=1.5".into()],
    ));
    let lr = found
        .iter()
        .find(|p| p.key == "train.lr")
        .expect("lr problem");
    assert_eq!(lr.origin, "environment variable DECLIP__TRAIN__LR");
    let alpha = found
        .iter()
        .find(|p| p.key == "export.alpha")
        .expect("alpha problem");
    assert_eq!(alpha.origin, "--set export.alpha=1.5");
    assert_eq!(alpha.value, "1.5");
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let found = problems(job::load(
        &job::DEMO_CONFIG,
        no_env(),
        &["train.batchsize=4".into()],
    ));
    assert_eq!(found[0].key, "train.batchsize");
    assert!(
        found[0].allowed.contains("unknown field"),
        "{}",
        found[0].allowed
    );
    assert_eq!(found[0].origin, "--set train.batchsize=4");
}

#[test]
fn wrong_types_are_refused_with_their_path() {
    let found = problems(job::load(
        &job::DEMO_CONFIG,
        no_env(),
        &["train.epochs=\"many\"".into()],
    ));
    assert_eq!(found[0].key, "train.epochs");
    assert!(
        found[0].allowed.contains("invalid type"),
        "{}",
        found[0].allowed
    );
}

#[test]
fn inconsistent_values_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (&["train.batch_size=5"], "train.batch_size"),
        (&["train.micro_batch_size=3"], "train.micro_batch_size"),
        (&["data.student_resolution=230"], "data.student_resolution"),
        (&["data.vfm_resolution=210"], "data.vfm_resolution"),
        (&["model.student.head_dim=8"], "model.student.head_dim"),
        (&["data.source=\"coco\""], "data.coco_root"),
        (&["trainers.min=3"], "trainers.min"),
        (&["model.student.preset=\"eva03\""], "model.student.preset"),
        (&["model.vfm.family=\"eva02\""], "model.vfm.family"),
        (&["model.vfm.decoupled=\"kk\""], "model.vfm.decoupled"),
        (&["trainers.device=\"gpu0\""], "trainers.device"),
        (&["job.name=\"Demo Run\""], "job.name"),
    ];
    for (sets, key) in cases {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let found = problems(job::load(&job::DEMO_CONFIG, no_env(), &sets));
        assert!(
            found.iter().any(|p| p.key == *key),
            "{sets:?}: expected {key}, got {found:?}"
        );
    }
}

#[test]
fn a_grid_mismatch_suggests_the_matching_resolution() {
    let found = problems(job::load(
        &job::DEMO_CONFIG,
        no_env(),
        &["data.vfm_resolution=210".into()],
    ));
    let p = found
        .iter()
        .find(|p| p.key == "data.vfm_resolution")
        .unwrap();
    assert!(
        p.allowed.contains("data.vfm_resolution = 196"),
        "{}",
        p.allowed
    );
}

#[test]
fn a_missing_file_and_bad_toml_are_reported_with_the_path() {
    let missing = job::load(
        &ConfigSource::File("/nonexistent/job.toml".into()),
        no_env(),
        &[],
    );
    assert!(
        matches!(missing, Err(ConfigError::Read { ref path, .. }) if path == "/nonexistent/job.toml")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[train]\nbatch_size = = 4\n").unwrap();
    let err = job::load(&ConfigSource::File(path.clone()), no_env(), &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("bad.toml") && text.contains("line 2"),
        "{text}"
    );
}

#[test]
fn a_malformed_set_flag_is_refused() {
    let err = job::load(&job::DEMO_CONFIG, no_env(), &["train.lr".into()]).unwrap_err();
    assert!(err.to_string().contains("--set train.lr"), "{err}");
}

#[test]
fn the_resolved_spec_round_trips_through_toml_and_hashes_stably() {
    let loaded = job::load(&job::DEMO_CONFIG, no_env(), &[]).unwrap();
    let text = loaded.spec.to_toml();
    let again: job::JobSpec = toml::from_str(&text).unwrap();
    assert_eq!(again, loaded.spec);
    assert_eq!(again.hash_hex(), loaded.spec.hash_hex());
    let other = job::load(&job::DEMO_CONFIG, no_env(), &["train.lr=0.01".into()]).unwrap();
    assert_ne!(other.spec.hash_hex(), loaded.spec.hash_hex());
}
