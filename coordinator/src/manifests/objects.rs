//! The Kubernetes objects of one job, as JSON values (serialised to YAML by the
//! caller). Every function takes the in-cluster spec (see `in_cluster_spec`).

use proto::auth::TOKEN_ENV;
use proto::job::{Gang, JobSpec, PodResources, TeacherMode, RANK_HINT_ENV};
use proto::metrics::{HOST_ENV, METRICS_LISTEN_ENV};
use serde_json::{json, Map, Value};

use super::layout::{coordinator_metrics_port, CONFIG_FILE, CONFIG_MOUNT, DATA_MOUNT, RUNS_MOUNT};

/// Environment variable the worker command line expands (`$(COORDINATOR_ADDR)`).
const COORDINATOR_ADDR_ENV: &str = "COORDINATOR_ADDR";
/// Key of the token inside the Secret `k8s.token_secret`.
const TOKEN_KEY: &str = "token";
/// The annotation an Indexed Job puts on each pod: its completion index, the rank hint.
const COMPLETION_INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Grace before SIGKILL. Trainers handle no SIGTERM yet (a drain on it is planned,
/// docs/kubernetes.md); the time is rendered now so that manifests need not change then.
const TRAINER_GRACE_S: u64 = 300;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Component {
    Coordinator,
    Trainer,
    Teacher,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Component::Coordinator => "coordinator",
            Component::Trainer => "trainer",
            Component::Teacher => "teacher",
        }
    }
}

pub fn all(spec: &JobSpec) -> Vec<Value> {
    let mut out = vec![config_map(spec)];
    out.extend(
        [Volume::Data, Volume::Cache, Volume::Runs]
            .into_iter()
            .map(|v| pvc(spec, v)),
    );
    out.push(coordinator_service(spec));
    out.push(coordinator_deployment(spec));
    if spec.k8s.gang == Gang::Volcano {
        out.push(pod_group(spec));
    }
    out.push(trainers(spec));
    if spec.teachers.mode == TeacherMode::Cache {
        out.push(teachers(spec));
    }
    out.push(pod_monitor(spec));
    out
}

// ---- names, labels, metadata ----------------------------------------------------

fn name(spec: &JobSpec, suffix: &str) -> String {
    format!("{}-{suffix}", spec.job.name)
}

fn selector_labels(spec: &JobSpec, component: Option<Component>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("app.kubernetes.io/name".into(), json!("declip"));
    m.insert("app.kubernetes.io/instance".into(), json!(spec.job.name));
    if let Some(c) = component {
        m.insert("app.kubernetes.io/component".into(), json!(c.as_str()));
    }
    m
}

fn labels(spec: &JobSpec, component: Option<Component>) -> Value {
    let mut m = selector_labels(spec, component);
    m.insert(
        "app.kubernetes.io/managed-by".into(),
        json!("declip-coordinator"),
    );
    m.insert(
        "app.kubernetes.io/version".into(),
        json!(env!("CARGO_PKG_VERSION")),
    );
    Value::Object(m)
}

fn metadata(spec: &JobSpec, object_name: &str, component: Option<Component>) -> Value {
    json!({
        "name": object_name,
        "namespace": spec.k8s.namespace,
        "labels": labels(spec, component),
    })
}

/// Kueue admits whole jobs: the label names the queue, `suspend` lets Kueue start it.
fn queue_metadata(spec: &JobSpec, object_name: &str, component: Component) -> Value {
    let mut meta = metadata(spec, object_name, Some(component));
    if spec.k8s.gang == Gang::Kueue {
        meta["labels"]["kueue.x-k8s.io/queue-name"] = json!(spec.k8s.kueue_queue);
    }
    meta
}

// ---- config and volumes ---------------------------------------------------------

fn config_map(spec: &JobSpec) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(spec, &name(spec, "config"), None),
        "data": { CONFIG_FILE: spec.to_toml() },
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Volume {
    Data,
    Cache,
    Runs,
}

impl Volume {
    fn volume_name(self) -> &'static str {
        match self {
            Volume::Data => "data",
            Volume::Cache => "cache",
            Volume::Runs => "runs",
        }
    }
}

fn pvc(spec: &JobSpec, volume: Volume) -> Value {
    let k = &spec.k8s;
    let size = match volume {
        Volume::Data => &k.data_size,
        Volume::Cache => &k.cache_size,
        Volume::Runs => &k.checkpoint_size,
    };
    // Pods on several nodes share each volume (teachers write the cache that
    // trainers read; any trainer may be rank 0 and write checkpoints).
    let mut pvc_spec = json!({
        "accessModes": ["ReadWriteMany"],
        "resources": { "requests": { "storage": size } },
    });
    if !k.storage_class.is_empty() {
        pvc_spec["storageClassName"] = json!(k.storage_class);
    }
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(spec, &name(spec, volume.volume_name()), None),
        "spec": pvc_spec,
    })
}

fn pod_volumes(spec: &JobSpec, component: Component) -> Value {
    let claim = |v: Volume| {
        json!({
            "name": v.volume_name(),
            "persistentVolumeClaim": { "claimName": name(spec, v.volume_name()) },
        })
    };
    let mut volumes = vec![
        claim(Volume::Data),
        claim(Volume::Cache),
        claim(Volume::Runs),
    ];
    match component {
        Component::Coordinator => volumes.push(json!({
            "name": "config",
            "configMap": { "name": name(spec, "config") },
        })),
        // The loader's worker threads and NCCL exchange through /dev/shm; the
        // container default of 64 MiB is too small for either.
        _ => volumes.push(json!({ "name": "shm", "emptyDir": { "medium": "Memory" } })),
    }
    Value::Array(volumes)
}

/// The cache lives at `run_dir/cache` (proto::cache), on its own volume so it can
/// be sized and kept apart from checkpoints; only teachers write it.
fn volume_mounts(spec: &JobSpec, component: Component) -> Value {
    let cache_read_only = component == Component::Trainer;
    let mut mounts = vec![
        json!({ "name": "data", "mountPath": DATA_MOUNT, "readOnly": true }),
        json!({ "name": "runs", "mountPath": RUNS_MOUNT }),
        json!({
            "name": "cache",
            "mountPath": format!("{}/cache", spec.job.run_dir),
            "readOnly": cache_read_only,
        }),
    ];
    match component {
        Component::Coordinator => {
            mounts.push(json!({ "name": "config", "mountPath": CONFIG_MOUNT, "readOnly": true }))
        }
        _ => mounts.push(json!({ "name": "shm", "mountPath": "/dev/shm" })),
    }
    Value::Array(mounts)
}

// ---- containers -----------------------------------------------------------------

fn resources(r: &PodResources, gpus: u32) -> Value {
    let mut requests = json!({ "cpu": r.cpu_request, "memory": r.memory_request });
    let mut limits = json!({ "cpu": r.cpu_limit, "memory": r.memory_limit });
    if gpus > 0 {
        // Extended resources cannot be overcommitted: request = limit.
        requests[GPU_RESOURCE] = json!(gpus);
        limits[GPU_RESOURCE] = json!(gpus);
    }
    json!({ "requests": requests, "limits": limits })
}

fn common_env(spec: &JobSpec) -> Vec<Value> {
    vec![
        json!({
            "name": TOKEN_ENV,
            "valueFrom": { "secretKeyRef": { "name": spec.k8s.token_secret, "key": TOKEN_KEY } },
        }),
        // The `host` metrics label is the node name, which is what the DCGM
        // exporter's `Hostname` label holds, so GPU and job metrics join.
        json!({
            "name": HOST_ENV,
            "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } },
        }),
    ]
}

fn worker_env(spec: &JobSpec, component: Component) -> Value {
    let mut env = common_env(spec);
    env.push(json!({
        "name": COORDINATOR_ADDR_ENV,
        "value": format!(
            "{}.{}.svc:{}",
            name(spec, "coordinator"),
            spec.k8s.namespace,
            spec.k8s.grpc_port
        ),
    }));
    env.push(json!({
        "name": METRICS_LISTEN_ENV,
        "value": format!("0.0.0.0:{}", spec.k8s.worker_metrics_port),
    }));
    if component == Component::Trainer {
        let path = format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']");
        env.push(json!({
            "name": RANK_HINT_ENV,
            "valueFrom": { "fieldRef": { "fieldPath": path } },
        }));
    }
    Value::Array(env)
}

fn worker_container(spec: &JobSpec, component: Component) -> Value {
    let (subcommand, gpus, res) = match component {
        Component::Trainer => ("train", spec.k8s.gpus_per_trainer, &spec.k8s.trainer),
        _ => ("teach", spec.k8s.gpus_per_teacher, &spec.k8s.teacher),
    };
    json!({
        "name": component.as_str(),
        "image": spec.k8s.image,
        "imagePullPolicy": spec.k8s.image_pull_policy.as_str(),
        "command": [
            "worker", subcommand, "--coordinator", format!("$({COORDINATOR_ADDR_ENV})")
        ],
        "env": worker_env(spec, component),
        "ports": [{ "name": "metrics", "containerPort": spec.k8s.worker_metrics_port }],
        "resources": resources(res, gpus),
        "volumeMounts": volume_mounts(spec, component),
    })
}

/// `serve --resume` needs a journal; the first start of the job has none.
fn coordinator_command(spec: &JobSpec) -> Value {
    let config = format!("{CONFIG_MOUNT}/{CONFIG_FILE}");
    let run = &spec.job.run_dir;
    json!([
        "/bin/sh",
        "-c",
        format!(
            "if [ -f {run}/journal.jsonl ]; then \
             exec coordinator serve --config {config} --resume {run}; \
             else exec coordinator serve --config {config}; fi"
        ),
    ])
}

fn coordinator_container(spec: &JobSpec) -> Value {
    json!({
        "name": "coordinator",
        "image": spec.k8s.image,
        "imagePullPolicy": spec.k8s.image_pull_policy.as_str(),
        "command": coordinator_command(spec),
        "env": common_env(spec),
        "ports": [
            { "name": "grpc", "containerPort": spec.k8s.grpc_port },
            { "name": "metrics", "containerPort": coordinator_metrics_port(spec) },
        ],
        "readinessProbe": { "tcpSocket": { "port": "grpc" }, "periodSeconds": 5 },
        "resources": resources(&spec.k8s.coordinator, 0),
        "volumeMounts": volume_mounts(spec, Component::Coordinator),
    })
}

// ---- pods and workloads -----------------------------------------------------------

fn scrape_annotations(port: u16) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("prometheus.io/scrape".into(), json!("true"));
    m.insert("prometheus.io/port".into(), json!(port.to_string()));
    m.insert("prometheus.io/path".into(), json!("/metrics"));
    m
}

fn pod_template(spec: &JobSpec, component: Component, container: Value, port: u16) -> Value {
    let mut annotations = scrape_annotations(port);
    let mut pod = json!({
        "containers": [container],
        "volumes": pod_volumes(spec, component),
    });
    if component != Component::Coordinator {
        // backoffLimitPerIndex requires it; the Job, not the kubelet, retries.
        pod["restartPolicy"] = json!("Never");
    }
    if component == Component::Trainer {
        pod["terminationGracePeriodSeconds"] = json!(TRAINER_GRACE_S);
        if spec.k8s.gang == Gang::Volcano {
            pod["schedulerName"] = json!("volcano");
            annotations.insert(
                "scheduling.k8s.io/group-name".into(),
                json!(name(spec, "trainers")),
            );
        }
    }
    if !spec.k8s.service_account.is_empty() {
        pod["serviceAccountName"] = json!(spec.k8s.service_account);
    }
    json!({
        "metadata": { "labels": labels(spec, Some(component)), "annotations": annotations },
        "spec": pod,
    })
}

fn coordinator_service(spec: &JobSpec) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec, &name(spec, "coordinator"), Some(Component::Coordinator)),
        "spec": {
            "selector": selector_labels(spec, Some(Component::Coordinator)),
            "ports": [
                { "name": "grpc", "port": spec.k8s.grpc_port, "targetPort": "grpc" },
                { "name": "metrics", "port": coordinator_metrics_port(spec), "targetPort": "metrics" },
            ],
        },
    })
}

fn coordinator_deployment(spec: &JobSpec) -> Value {
    let template = pod_template(
        spec,
        Component::Coordinator,
        coordinator_container(spec),
        coordinator_metrics_port(spec),
    );
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(spec, &name(spec, "coordinator"), Some(Component::Coordinator)),
        "spec": {
            // One coordinator owns the journal: never two at once, even during a rollout.
            "replicas": 1,
            "strategy": { "type": "Recreate" },
            "selector": { "matchLabels": selector_labels(spec, Some(Component::Coordinator)) },
            "template": template,
        },
    })
}

/// An Indexed Job: pod i gets completion index i, which workers send as their
/// rank hint; a failed pod is replaced with the same index.
fn indexed_job_spec(spec: &JobSpec, component: Component) -> Value {
    let (count, backoff) = match component {
        Component::Trainer => (spec.trainers.max, spec.trainers.max_restarts),
        _ => (
            spec.teachers.count,
            spec.k8s.teacher_backoff_limit_per_index,
        ),
    };
    let container = worker_container(spec, component);
    let template = pod_template(spec, component, container, spec.k8s.worker_metrics_port);
    let mut job = json!({
        "completionMode": "Indexed",
        "completions": count,
        "parallelism": count,
        "backoffLimitPerIndex": backoff,
        "template": template,
    });
    if spec.k8s.gang == Gang::Kueue {
        job["suspend"] = json!(true);
    }
    job
}

fn trainers(spec: &JobSpec) -> Value {
    let job_spec = indexed_job_spec(spec, Component::Trainer);
    let object_name = name(spec, "trainer");
    if !spec.k8s.jobset {
        return json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": queue_metadata(spec, &object_name, Component::Trainer),
            "spec": job_spec,
        });
    }
    let mut inner = job_spec;
    // JobSet suspends and resumes the whole set itself.
    if let Some(m) = inner.as_object_mut() {
        m.remove("suspend");
    }
    let mut set = json!({
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": queue_metadata(spec, &object_name, Component::Trainer),
        "spec": {
            "failurePolicy": { "maxRestarts": spec.trainers.max_restarts },
            "replicatedJobs": [{
                "name": "trainer",
                "replicas": 1,
                "template": { "metadata": { "labels": labels(spec, Some(Component::Trainer)) }, "spec": inner },
            }],
        },
    });
    if spec.k8s.gang == Gang::Kueue {
        set["spec"]["suspend"] = json!(true);
    }
    set
}

fn teachers(spec: &JobSpec) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": queue_metadata(spec, &name(spec, "teacher"), Component::Teacher),
        "spec": indexed_job_spec(spec, Component::Teacher),
    })
}

/// Volcano schedules the trainer pods only when `trainers.min` of them fit at once.
fn pod_group(spec: &JobSpec) -> Value {
    json!({
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata(spec, &name(spec, "trainers"), Some(Component::Trainer)),
        "spec": { "minMember": spec.trainers.min },
    })
}

/// Scrapes every pod of the job. `honorLabels` keeps the processes' own `job`
/// label (the DeCLIP job name) instead of renaming it `exported_job`.
fn pod_monitor(spec: &JobSpec) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata(spec, &spec.job.name, None),
        "spec": {
            "selector": { "matchLabels": selector_labels(spec, None) },
            "podMetricsEndpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "interval": "15s",
                "honorLabels": true,
            }],
        },
    })
}
