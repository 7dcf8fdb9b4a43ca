//! `coordinator manifests` through the real binary: the committed examples in
//! deploy/k8s are what the reference configs render today (drift), the core objects
//! pass `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, installed
//! into .venv-k8s by scripts/setup-k8s-validate), the custom resources it cannot
//! know (PodMonitor, JobSet, PodGroup) are checked here, and the objects follow the
//! config (world size, GPUs, image, namespace).

mod common;

use std::path::{Path, PathBuf};

use common::{binary, repo_root, text};
use serde_json::Value;

/// The reference configs and the examples rendered from them.
const REFERENCE: [&str; 3] = ["eva02-b16-coco", "eva02-l14-336-coco", "openai-b16-coco"];
/// The reference configs name no dataset; the examples are rendered with this.
const COCO_ROOT: &str = "data.coco_root=/data/coco";
/// Kubernetes version the core objects are validated against.
const K8S_VERSION: &str = "1.31.0";

fn render(config: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let path = repo_root().join("configs").join(format!("{config}.toml"));
    let out = binary("coordinator")
        .arg("manifests")
        .arg("--config")
        .arg(&path)
        .args(["--set", COCO_ROOT])
        .args(args)
        .output()
        .expect("run coordinator manifests");
    let (stdout, stderr) = text(&out);
    (out.status.code(), stdout, stderr)
}

fn render_ok(config: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = render(config, args);
    assert_eq!(code, Some(0), "{config} {args:?}: {stderr}");
    stdout
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .map(|doc| serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("{e}:\n{doc}")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix}"))
}

fn example_path(config: &str) -> PathBuf {
    repo_root()
        .join("deploy/k8s")
        .join(format!("{config}.yaml"))
}

#[test]
fn committed_examples_match_what_the_reference_configs_render() {
    // DECLIP_BLESS=1 rewrites the examples after an intended change.
    let bless = std::env::var_os("DECLIP_BLESS").is_some();
    for config in REFERENCE {
        let rendered = render_ok(config, &[]);
        let path = example_path(config);
        if bless {
            std::fs::write(&path, &rendered).unwrap();
        }
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == rendered,
            "{} is stale: re-render with `DECLIP_BLESS=1 cargo test -p declip-e2e --test manifests` \
             (or `coordinator manifests --config configs/{config}.toml --set {COCO_ROOT}`)",
            path.display()
        );
    }
}

/// `.venv-k8s/bin/kubernetes-validate`, or `None` with a message on a developer
/// machine that has not run the setup; in CI it must be there.
fn kubernetes_validate() -> Option<PathBuf> {
    let path = repo_root().join(".venv-k8s/bin/kubernetes-validate");
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kubernetes-validate is missing in CI: scripts/test runs scripts/setup-k8s-validate"
    );
    eprintln!("SKIPPED: .venv-k8s missing (run scripts/setup-k8s-validate)");
    None
}

/// Writes each object to its own file and validates them all strictly.
fn validate_strict(tool: &Path, objects: &[Value]) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let path = dir.path().join(format!("{i:02}.yaml"));
            std::fs::write(&path, serde_yaml_ng::to_string(o).unwrap()).unwrap();
            path
        })
        .collect();
    let out = std::process::Command::new(tool)
        .args(["--strict", "-k", K8S_VERSION])
        .args(&files)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    let report = format!("{stdout}{stderr}");
    assert!(out.status.success(), "{report}");
    assert_eq!(
        report.matches("passed for resource").count(),
        objects.len(),
        "not every object was validated:\n{report}"
    );
}

const CORE_API: [&str; 3] = ["v1", "apps/v1", "batch/v1"];

/// The core objects as they are; a JobSet's trainer Job template as the batch/v1
/// Job it becomes (so its pod spec is checked strictly too).
fn strictly_checkable(objects: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = objects
        .iter()
        .filter(|o| CORE_API.contains(&o["apiVersion"].as_str().unwrap_or("")))
        .cloned()
        .collect();
    for set in objects.iter().filter(|o| o["kind"] == "JobSet") {
        let template = &set["spec"]["replicatedJobs"][0]["template"];
        out.push(serde_json::json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": { "name": "jobset-template", "labels": template["metadata"]["labels"] },
            "spec": template["spec"],
        }));
    }
    out
}

/// Pod templates of every workload (Deployment, Job, JobSet).
fn pod_templates(objects: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for o in objects {
        match o["kind"].as_str() {
            Some("Deployment") | Some("Job") => out.push(&o["spec"]["template"]),
            Some("JobSet") => {
                out.push(&o["spec"]["replicatedJobs"][0]["template"]["spec"]["template"])
            }
            _ => {}
        }
    }
    out
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
}

/// The custom resources kubernetes-validate has no schema for: their API group,
/// version and the fields the controllers need, tied to the pods they act on.
fn check_custom_resources(objects: &[Value]) {
    let templates = pod_templates(objects);
    let monitor = find(objects, "PodMonitor", "");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["honorLabels"], true);
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let port = endpoint["port"].as_str().unwrap();
    for t in &templates {
        assert!(
            labels_match(selector, &t["metadata"]["labels"]),
            "PodMonitor misses {t}"
        );
        let ports = &t["spec"]["containers"][0]["ports"];
        assert!(
            ports.as_array().unwrap().iter().any(|p| p["name"] == port),
            "pod has no port {port}"
        );
    }
    for set in objects.iter().filter(|o| o["kind"] == "JobSet") {
        assert_eq!(set["apiVersion"], "jobset.x-k8s.io/v1alpha2");
        let rj = &set["spec"]["replicatedJobs"][0];
        assert_eq!(rj["replicas"], 1);
        assert!(set["spec"]["failurePolicy"]["maxRestarts"].is_u64());
    }
    for group in objects.iter().filter(|o| o["kind"] == "PodGroup") {
        assert_eq!(group["apiVersion"], "scheduling.volcano.sh/v1beta1");
        let name = &group["metadata"]["name"];
        let trainers = templates
            .iter()
            .find(|t| t["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer")
            .unwrap();
        assert_eq!(
            &trainers["metadata"]["annotations"]["scheduling.k8s.io/group-name"],
            name
        );
        assert_eq!(trainers["spec"]["schedulerName"], "volcano");
        assert!(group["spec"]["minMember"].as_u64().is_some_and(|m| m >= 1));
    }
}

#[test]
fn rendered_objects_pass_kubernetes_validate_strict() {
    let variants: [&[&str]; 4] = [
        &[],
        &["--set", "k8s.jobset=true"],
        &["--set", "k8s.gang=\"volcano\""],
        &[
            "--set",
            "k8s.gang=\"kueue\"",
            "--set",
            "k8s.kueue_queue=\"gpu\"",
            "--set",
            "k8s.jobset=true",
        ],
    ];
    let tool = kubernetes_validate();
    for config in REFERENCE {
        for args in variants {
            let objects = documents(&render_ok(config, args));
            check_custom_resources(&objects);
            if let Some(tool) = &tool {
                validate_strict(tool, &strictly_checkable(&objects));
            }
        }
    }
}

#[test]
fn strict_validation_catches_an_unknown_field() {
    // Guards the test above: without --strict an unknown field passes.
    let Some(tool) = kubernetes_validate() else {
        return;
    };
    let mut objects = documents(&render_ok(REFERENCE[0], &[]));
    let service = objects.iter_mut().find(|o| o["kind"] == "Service").unwrap();
    service["spec"]["portz"] = serde_json::json!([]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(service).unwrap()).unwrap();
    let out = std::process::Command::new(tool)
        .args(["--strict", "-k", K8S_VERSION])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out).0);
}

fn container<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    &find(objects, kind, suffix)["spec"]["template"]["spec"]["containers"][0]
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

#[test]
fn objects_follow_world_size_gpus_image_and_namespace() {
    let objects = documents(&render_ok(
        "eva02-b16-coco",
        &[
            "--set",
            "trainers.max=8",
            "--set",
            "trainers.min=8",
            "--set",
            "k8s.gpus_per_trainer=2",
            "--set",
            "teachers.count=3",
            "--image",
            "registry.example/declip:9.9",
            "--namespace",
            "vision-team",
        ],
    ));
    let trainers = find(&objects, "Job", "-trainer");
    assert_eq!(trainers["spec"]["completions"], 8);
    assert_eq!(trainers["spec"]["parallelism"], 8);
    assert_eq!(trainers["spec"]["completionMode"], "Indexed");
    let teachers = find(&objects, "Job", "-teacher");
    assert_eq!(teachers["spec"]["completions"], 3);
    assert!(teachers["spec"]["backoffLimitPerIndex"].is_u64());
    let trainer = container(&objects, "Job", "-trainer");
    assert_eq!(trainer["resources"]["limits"]["nvidia.com/gpu"], 2);
    assert_eq!(trainer["resources"]["requests"]["nvidia.com/gpu"], 2);
    assert_eq!(
        env_value(trainer, "DECLIP_RANK_HINT")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    assert_eq!(
        env_value(trainer, "COORDINATOR_ADDR")["value"],
        "declip-eva02-b16-coordinator.vision-team.svc:50051"
    );
    assert_eq!(
        env_value(trainer, "DECLIP_TOKEN")["valueFrom"]["secretKeyRef"]["name"],
        "declip-token"
    );
    for t in pod_templates(&objects) {
        assert_eq!(
            t["spec"]["containers"][0]["image"],
            "registry.example/declip:9.9"
        );
    }
    for o in &objects {
        assert_eq!(o["metadata"]["namespace"], "vision-team", "{}", o["kind"]);
    }
    // The pods run the config that rendered them, with the in-cluster addresses.
    let config = find(&objects, "ConfigMap", "-config")["data"]["job.toml"]
        .as_str()
        .unwrap();
    assert!(config.contains("max = 8"), "{config}");
    assert!(config.contains("listen = \"0.0.0.0:50051\""), "{config}");
    assert!(
        config.contains("run_dir = \"/runs/declip-eva02-b16\""),
        "{config}"
    );
}

#[test]
fn cpu_workers_request_no_gpu_and_online_mode_has_no_teacher_pool() {
    let objects = documents(&render_ok(
        "openai-b16-coco",
        &[
            "--set",
            "k8s.gpus_per_trainer=0",
            "--set",
            "teachers.mode=\"online\"",
        ],
    ));
    let trainer = container(&objects, "Job", "-trainer");
    assert!(trainer["resources"]["limits"]
        .get("nvidia.com/gpu")
        .is_none());
    assert!(!objects.iter().any(|o| o["metadata"]["name"]
        .as_str()
        .unwrap()
        .ends_with("-teacher")));
}

#[test]
fn the_coordinator_is_one_recreated_pod_behind_a_service_with_both_ports() {
    let objects = documents(&render_ok("eva02-l14-336-coco", &[]));
    let deployment = find(&objects, "Deployment", "-coordinator");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let service = find(&objects, "Service", "-coordinator");
    let ports: Vec<&str> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["grpc", "metrics"]);
    assert!(labels_match(
        &service["spec"]["selector"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    ));
    let command = container(&objects, "Deployment", "-coordinator")["command"][2]
        .as_str()
        .unwrap();
    assert!(
        command.contains("coordinator serve --config /etc/declip/job.toml --resume"),
        "{command}"
    );
    let claims = objects
        .iter()
        .filter(|o| o["kind"] == "PersistentVolumeClaim")
        .count();
    assert_eq!(claims, 3);
}

#[test]
fn a_refused_setting_exits_2_naming_the_key_and_prints_nothing() {
    let (code, stdout, stderr) = render("eva02-b16-coco", &["--namespace", "Not_A_Label"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`k8s.namespace`"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}
