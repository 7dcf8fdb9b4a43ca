//! Where things are in every pod of a job: the fixed mount points and the
//! coordinator's metrics port. A leaf shared by the spec rewrite (`in_cluster_spec`)
//! and the objects that mount and expose them.

use proto::job::JobSpec;

/// Where the data volume is mounted in every pod (fixed, so configs need not say it).
pub const DATA_MOUNT: &str = "/data";
/// Where the run-directory volume is mounted in every pod.
pub const RUNS_MOUNT: &str = "/runs";
/// Where the ConfigMap holding the job config is mounted in every pod.
pub const CONFIG_MOUNT: &str = "/etc/declip";
/// The job config's file name inside [`CONFIG_MOUNT`].
pub const CONFIG_FILE: &str = "job.toml";

/// A cluster cannot scrape a port picked at start, so port 0 becomes the worker
/// metrics port (the coordinator has its own pod, so they do not collide).
pub fn coordinator_metrics_port(spec: &JobSpec) -> u16 {
    match spec.coordinator.metrics_port {
        0 => spec.k8s.worker_metrics_port,
        port => port,
    }
}
