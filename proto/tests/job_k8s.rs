//! The `[k8s]` section of the job spec: defaults that render a working cluster
//! job, and refusals that name the key.

use proto::job::{self, ConfigError, Gang, PullPolicy};

fn load(sets: &[&str]) -> Result<job::LoadedJob, ConfigError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    job::load(&job::DEMO_CONFIG, Vec::new(), &sets)
}

fn refused_keys(sets: &[&str]) -> Vec<String> {
    match load(sets) {
        Err(ConfigError::Invalid(problems)) => problems.into_iter().map(|p| p.key).collect(),
        other => panic!("{sets:?}: expected refusal, got {other:?}"),
    }
}

#[test]
fn defaults_are_valid_and_overridable() {
    let spec = load(&[]).unwrap().spec;
    assert_eq!(spec.k8s.namespace, "declip");
    assert_eq!(spec.k8s.gpus_per_trainer, 1);
    assert_eq!(spec.k8s.gang, Gang::None);
    let spec = load(&[
        "k8s.namespace=\"ml-team\"",
        "k8s.image_pull_policy=\"Always\"",
        "k8s.gang=\"kueue\"",
        "k8s.kueue_queue=\"gpu-queue\"",
        "k8s.trainer.memory_limit=\"96Gi\"",
    ])
    .unwrap()
    .spec;
    assert_eq!(spec.k8s.namespace, "ml-team");
    assert_eq!(spec.k8s.image_pull_policy, PullPolicy::Always);
    assert_eq!(spec.k8s.gang, Gang::Kueue);
    assert_eq!(spec.k8s.trainer.memory_limit, "96Gi");
}

#[test]
fn bad_kubernetes_settings_are_refused_by_key() {
    let cases: [(&[&str], &str); 9] = [
        (&["k8s.namespace=\"ML_team\""], "k8s.namespace"),
        (&["k8s.image=\"\""], "k8s.image"),
        (&["k8s.gang=\"kueue\""], "k8s.kueue_queue"),
        (
            &["k8s.trainer.cpu_request=\"lots\""],
            "k8s.trainer.cpu_request",
        ),
        (
            &[
                "k8s.teacher.memory_request=\"64Gi\"",
                "k8s.teacher.memory_limit=\"32Gi\"",
            ],
            "k8s.teacher.memory_request",
        ),
        (
            &["k8s.coordinator.cpu_limit=\"-1\""],
            "k8s.coordinator.cpu_limit",
        ),
        (&["k8s.cache_size=\"0Gi\""], "k8s.cache_size"),
        (&["k8s.gpus_per_trainer=99"], "k8s.gpus_per_trainer"),
        (&["k8s.grpc_port=9464"], "k8s.grpc_port"),
    ];
    for (sets, key) in cases {
        let keys = refused_keys(sets);
        assert!(
            keys.iter().any(|k| k == key),
            "{sets:?}: {keys:?} lacks {key}"
        );
    }
}

#[test]
fn quantities_in_every_kubernetes_spelling_are_accepted() {
    load(&[
        "k8s.trainer.cpu_request=\"500m\"",
        "k8s.trainer.cpu_limit=\"1.5\"",
        "k8s.trainer.memory_request=\"512Mi\"",
        "k8s.trainer.memory_limit=\"1G\"",
        "k8s.data_size=\"2Ti\"",
    ])
    .unwrap();
}
