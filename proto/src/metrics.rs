//! The metric catalog: every Prometheus metric a DeCLIP process exports, its type,
//! unit, labels and meaning, in one table ([`CATALOG`]). Processes record through
//! the `metrics` facade using the name constants (defined in `metrics/names.rs`,
//! re-exported here); [`describe`] gives each metric of a role its HELP text and
//! unit; [`install_exporter`] serves `/metrics`.
//!
//! Naming (checked by the tests): every name starts with `declip_`, is in base
//! units (seconds, bytes), counters end in `_total` and nothing else does. Every
//! series carries the global labels `job`, `role` and `host` (set once by
//! [`install_exporter`]; `host` joins with the DCGM exporter's `Hostname`). Trainer
//! series also carry `rank` and `generation`; the coordinator's per-rank series
//! carry `rank`. `docs/metrics.md` lists the same table for people, and
//! `deploy/` (alerts, recording rules, dashboard) may use only names listed here.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

mod names;
pub use names::*;

// ---- the catalog -----------------------------------------------------------------

/// The process kinds that export metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Trainer,
    Teacher,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Trainer, Role::Teacher];

    /// The value of the `role` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Trainer => "trainer",
            Role::Teacher => "teacher",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Unit of a metric's values; base units only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricUnit {
    Seconds,
    Bytes,
    /// A number of things (images, steps, shards, events).
    Count,
    /// Things per second (images/s).
    PerSecond,
    /// A dimensionless number (loss, learning rate, an index such as a step number
    /// or rank, a 0/1 flag).
    Dimensionless,
}

impl MetricUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricUnit::Seconds => "seconds",
            MetricUnit::Bytes => "bytes",
            MetricUnit::Count => "count",
            MetricUnit::PerSecond => "per second",
            MetricUnit::Dimensionless => "none",
        }
    }

    fn to_metrics(self) -> Option<metrics::Unit> {
        match self {
            MetricUnit::Seconds => Some(metrics::Unit::Seconds),
            MetricUnit::Bytes => Some(metrics::Unit::Bytes),
            MetricUnit::Count => Some(metrics::Unit::Count),
            MetricUnit::PerSecond => Some(metrics::Unit::CountPerSecond),
            MetricUnit::Dimensionless => None,
        }
    }
}

/// One metric of the catalog.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: MetricUnit,
    /// Labels besides the global ones ([`GLOBAL_LABELS`]).
    pub labels: &'static [&'static str],
    pub help: &'static str,
    pub roles: &'static [Role],
}

impl MetricDef {
    /// HELP text as exported: the meaning plus the unit, so a scrape alone says both.
    pub fn help_text(&self) -> String {
        format!("{} (unit: {})", self.help, self.unit.as_str())
    }

    pub fn exported_by(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

use MetricKind::{Counter, Gauge, Histogram};
use MetricUnit::{Bytes, Count, Dimensionless, PerSecond, Seconds};
use Role::{Coordinator as C, Teacher as Te, Trainer as Tr};

const fn def(
    name: &'static str,
    kind: MetricKind,
    unit: MetricUnit,
    labels: &'static [&'static str],
    roles: &'static [Role],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        labels,
        help,
        roles,
    }
}

const RG: &[&str] = &[LABEL_RANK, LABEL_GENERATION];
const RG_PHASE: &[&str] = &[LABEL_RANK, LABEL_GENERATION, LABEL_PHASE];
const RG_COMPONENT: &[&str] = &[LABEL_RANK, LABEL_GENERATION, LABEL_COMPONENT];
const NONE: &[&str] = &[];
const ALL: &[Role] = &[C, Tr, Te];
const WORKERS_ROLES: &[Role] = &[Tr, Te];

/// Every metric any DeCLIP process exports.
#[rustfmt::skip]
pub const CATALOG: &[MetricDef] = &[
    // Shared.
    def(BUILD_INFO, Gauge, Dimensionless, &[LABEL_VERSION], ALL,
        "Always 1; the version label names the binary's version"),
    def(IMAGES_TOTAL, Counter, Count, NONE, WORKERS_ROLES,
        "Images this process has trained on (trainer) or computed teacher targets for (teacher)"),
    def(PROCESS_MEMORY_BYTES, Gauge, Bytes, NONE, ALL,
        "Resident set size of this process"),
    def(GPU_MEMORY_BYTES, Gauge, Bytes, NONE, WORKERS_ROLES,
        "GPU memory in use on this process's device, every process's allocations and caches included (total minus free; 0 on CPU)"),
    def(DATA_SKIPS_TOTAL, Counter, Count, &[LABEL_REASON], WORKERS_ROLES,
        "Images this process skipped, by reason (missing, empty, unreadable, not_an_image, truncated, corrupt, too_large, size_mismatch, duplicate_id, path_traversal)"),
    def(GENERATION, Gauge, Dimensionless, NONE, &[C, Tr],
        "Current generation (trainer world); 0 before the first one forms"),
    def(WORLD_SIZE, Gauge, Count, NONE, &[C, Tr],
        "Trainers in the current generation"),
    // Trainer.
    def(STEPS_TOTAL, Counter, Count, RG, &[Tr],
        "Optimizer steps this trainer has completed"),
    def(STEP, Gauge, Dimensionless, RG, &[Tr],
        "Global step of the job this trainer last completed"),
    def(EPOCH, Gauge, Dimensionless, RG, &[Tr],
        "Epoch this trainer is in"),
    def(STEP_SECONDS, Histogram, Seconds, RG, &[Tr],
        "Wall time of one optimizer step, all parts included"),
    def(STEP_PHASE_SECONDS, Histogram, Seconds, RG_PHASE, &[Tr],
        "Wall time of one part of an optimizer step (phase: data_wait, forward, backward, all_reduce, optimizer)"),
    def(LOSS, Gauge, Dimensionless, RG_COMPONENT, &[Tr],
        "Loss of the last step by component (content, context, total), averaged over the global batch"),
    def(LEARNING_RATE, Gauge, Dimensionless, RG, &[Tr],
        "Learning rate of the last optimizer step"),
    def(IMAGES_PER_SECOND, Gauge, PerSecond, RG, &[Tr],
        "Training images per second of this rank's slice over its last step (the job's rate is the sum over ranks)"),
    def(CACHE_HITS_TOTAL, Counter, Count, RG, &[Tr],
        "Teacher-target records found in the cache when a step needed them"),
    def(CACHE_MISSES_TOTAL, Counter, Count, RG, &[Tr],
        "Teacher-target records not yet in the cache when a step needed them"),
    def(CACHE_WAIT_SECONDS, Histogram, Seconds, RG, &[Tr],
        "Time one step waited for teacher-target records to appear in the cache"),
    def(CHECKPOINT_SECONDS, Histogram, Seconds, RG, &[Tr],
        "Time to write one checkpoint (rank 0), from command to durable files"),
    def(COLLECTIVE_SEQUENCE, Gauge, Dimensionless, RG, &[Tr],
        "Collectives this rank has completed in its generation; a rank behind its peers is the one they wait for"),
    // Teacher.
    def(TEACHER_SHARDS_DONE_TOTAL, Counter, Count, NONE, &[Te],
        "Shards this teacher completed and reported"),
    def(TEACHER_SHARDS_FAILED_TOTAL, Counter, Count, &[LABEL_REASON], &[Te],
        "Shards this teacher gave up on, by reason"),
    def(TEACHER_SHARDS_LEASED, Gauge, Count, NONE, &[Te],
        "Shards this teacher holds a lease on right now"),
    def(TEACHER_WRITTEN_BYTES_TOTAL, Counter, Bytes, NONE, &[Te],
        "Bytes of cache files this teacher has written (committed files only)"),
    def(TEACHER_SHARD_SECONDS, Histogram, Seconds, NONE, &[Te],
        "Time to compute and write one shard's teacher targets"),
    // Coordinator: the job.
    def(JOB_PHASE, Gauge, Dimensionless, &[LABEL_JOB_PHASE], &[C],
        "1 for the job's current phase, 0 for the others (job_phase: forming, training, recovering, draining, completed, failed, stopped)"),
    def(JOB_STEP, Gauge, Dimensionless, NONE, &[C],
        "Global step the job has reached (committed by the current generation's reports)"),
    def(JOB_TOTAL_STEPS, Gauge, Count, NONE, &[C],
        "Optimizer steps the whole job will take"),
    def(JOB_EPOCH, Gauge, Dimensionless, NONE, &[C],
        "Epoch the job is in"),
    def(JOB_ETA_SECONDS, Gauge, Seconds, NONE, &[C],
        "Estimated time until the last step, at the current rate"),
    def(JOB_ELAPSED_SECONDS, Gauge, Seconds, NONE, &[C],
        "Time since the job started (across coordinator restarts, from its journal)"),
    def(JOB_IMAGES_PER_SECOND, Gauge, PerSecond, NONE, &[C],
        "Training images per second of the whole job (sum over ranks)"),
    def(JOB_IMAGES_TOTAL, Counter, Count, NONE, &[C],
        "Images the job has trained on (sum over ranks and generations)"),
    def(JOB_LOSS, Gauge, Dimensionless, &[LABEL_COMPONENT], &[C],
        "Loss of the job's last step by component (content, context, total)"),
    def(JOB_SHARDS, Gauge, Count, &[LABEL_STATE], &[C],
        "Teacher shards by state (pending, leased, done, failed)"),
    def(JOB_TEACHER_WRITTEN_BYTES_TOTAL, Counter, Bytes, NONE, &[C],
        "Bytes of committed teacher cache files over the whole pool"),
    def(JOB_CACHE_HITS_TOTAL, Counter, Count, NONE, &[C],
        "Cache hits summed over every trainer's reports"),
    def(JOB_CACHE_MISSES_TOTAL, Counter, Count, NONE, &[C],
        "Cache misses summed over every trainer's reports"),
    def(JOB_DATA_SKIPS_TOTAL, Counter, Count, &[LABEL_REASON], &[C],
        "Images skipped over the whole job (index and workers), by reason"),
    // Coordinator: per rank.
    def(RANK_HEARTBEAT_AGE_SECONDS, Gauge, Seconds, &[LABEL_RANK], &[C],
        "Time since the coordinator last heard from the trainer holding this rank"),
    def(RANK_STEP, Gauge, Dimensionless, &[LABEL_RANK], &[C],
        "Last step the trainer holding this rank reported"),
    def(RANK_IMAGES_PER_SECOND, Gauge, PerSecond, &[LABEL_RANK], &[C],
        "Images per second the trainer holding this rank reported"),
    def(RANK_STEP_PHASE_SECONDS, Gauge, Seconds, &[LABEL_RANK, LABEL_PHASE], &[C],
        "Time of each part of the last step the trainer holding this rank reported (phase: data_wait, forward, backward, all_reduce, optimizer, total)"),
    def(RANK_COLLECTIVE_SEQUENCE, Gauge, Dimensionless, &[LABEL_RANK], &[C],
        "Collectives the trainer holding this rank reported completed in the current generation"),
    def(RANK_GPU_MEMORY_BYTES, Gauge, Bytes, &[LABEL_RANK], &[C],
        "GPU memory the trainer holding this rank reported"),
    // Coordinator: control plane.
    def(WORKERS, Gauge, Count, &[LABEL_POOL, LABEL_STATE], &[C],
        "Workers attached to the coordinator, by pool (trainer, teacher) and state"),
    def(RESTARTS_TOTAL, Counter, Count, &[LABEL_POOL], &[C],
        "Worker processes restarted after a failure, by pool"),
    def(GENERATION_ABORTS_TOTAL, Counter, Count, &[LABEL_REASON], &[C],
        "Generations aborted, by reason (lost_member, hang, error, drain)"),
    def(CHECKPOINT_LAST_STEP, Gauge, Dimensionless, NONE, &[C],
        "Step of the last committed checkpoint (0 = none)"),
    def(CHECKPOINT_COMMITS_TOTAL, Counter, Count, NONE, &[C],
        "Checkpoints committed"),
    def(RPC_REJECTED_TOTAL, Counter, Count, &[LABEL_REASON], &[C],
        "RPCs refused, by reason (unauthenticated, version_mismatch, invalid_argument, failed_precondition, ...)"),
];

/// The catalog entry of `name`.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    CATALOG.iter().find(|d| d.name == name)
}

/// Registers HELP text and unit of every metric `role` exports with the installed
/// recorder. Call once after [`install_exporter`] (or inside a local recorder).
pub fn describe(role: Role) {
    for d in CATALOG.iter().filter(|d| d.exported_by(role)) {
        let help = d.help_text();
        match (d.kind, d.unit.to_metrics()) {
            (Counter, Some(u)) => metrics::describe_counter!(d.name, u, help),
            (Counter, None) => metrics::describe_counter!(d.name, help),
            (Gauge, Some(u)) => metrics::describe_gauge!(d.name, u, help),
            (Gauge, None) => metrics::describe_gauge!(d.name, help),
            (Histogram, Some(u)) => metrics::describe_histogram!(d.name, u, help),
            (Histogram, None) => metrics::describe_histogram!(d.name, help),
        }
    }
}

// ---- exporter ---------------------------------------------------------------------

/// Upper bounds (seconds) of step-time buckets: a tiny CPU step takes tens of
/// milliseconds, an L/14 step at 336 px a few seconds, a stalled step minutes.
pub const STEP_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Upper bounds (seconds) for checkpoint writes and teacher shards: seconds to an hour.
pub const LONG_BUCKETS_S: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics listen address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("cannot listen for /metrics on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("cannot install the Prometheus exporter: {0}")]
    Install(String),
}

/// A builder with the catalog's histogram buckets and the given global labels,
/// without a listener (tests render its recorder directly).
pub fn builder(global_labels: &[(&str, &str)]) -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for (k, v) in global_labels {
        b = b.add_global_label(*k, *v);
    }
    // Every histogram is in seconds; buckets make them Prometheus histograms (not
    // summaries), so `histogram_quantile` can aggregate them over ranks.
    let long = [CHECKPOINT_SECONDS, TEACHER_SHARD_SECONDS];
    let with_long = long.iter().try_fold(b, |b, name| {
        b.set_buckets_for_metric(Matcher::Full((*name).into()), LONG_BUCKETS_S)
    });
    with_long
        .and_then(|b| b.set_buckets(STEP_BUCKETS_S))
        .expect("bucket lists are non-empty constants")
}

/// A recorder that is not installed globally: for rendering in tests.
pub fn local_recorder(global_labels: &[(&str, &str)]) -> PrometheusRecorder {
    builder(global_labels).build_recorder()
}

/// Serves `/metrics` on `listen` (`host:port`; port 0 picks a free port) with the
/// catalog's buckets and `global_labels` on every series, installs the recorder
/// process-wide, and returns the address actually listened on (the one to report).
/// Works inside or outside a tokio runtime. Call at most once per process.
pub fn install_exporter(
    listen: &str,
    global_labels: &[(&str, &str)],
) -> Result<SocketAddr, MetricsError> {
    let requested = resolve(listen)?;
    if requested.port() != 0 {
        return install_at(requested, global_labels);
    }
    // A picked port can be taken by someone else's connection before the exporter
    // binds it (see `pick_port`); picking again is then the right answer.
    let mut last = None;
    for _ in 0..PICK_ATTEMPTS {
        match install_at(pick_port(requested)?, global_labels) {
            Err(e @ MetricsError::Bind { .. }) => last = Some(e),
            other => return other,
        }
    }
    Err(last.expect("PICK_ATTEMPTS > 0"))
}

const PICK_ATTEMPTS: usize = 5;

fn install_at(
    addr: SocketAddr,
    global_labels: &[(&str, &str)],
) -> Result<SocketAddr, MetricsError> {
    builder(global_labels)
        .with_http_listener(addr)
        .install()
        .map_err(|e| match e {
            metrics_exporter_prometheus::BuildError::FailedToCreateHTTPListener(message) => {
                MetricsError::Bind {
                    addr: addr.to_string(),
                    message,
                }
            }
            other => MetricsError::Install(other.to_string()),
        })?;
    Ok(addr)
}

/// [`install_exporter`] with this process's global labels (see [`global_labels`]),
/// then [`describe`] for `role`: the one call each process makes at start.
pub fn install_for(listen: &str, job: &str, role: Role) -> Result<SocketAddr, MetricsError> {
    let labels = global_labels(job, role);
    let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let addr = install_exporter(listen, &pairs)?;
    describe(role);
    metrics::gauge!(BUILD_INFO, LABEL_VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(addr)
}

/// `job`, `role` and `host` of this process. `host` is [`HOST_ENV`] when set (the
/// node name on Kubernetes), else the kernel's host name.
pub fn global_labels(job: &str, role: Role) -> [(&'static str, String); 3] {
    let host = std::env::var(HOST_ENV)
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    [
        (LABEL_JOB, job.to_string()),
        (LABEL_ROLE, role.as_str().to_string()),
        (LABEL_HOST, host),
    ]
}

/// Resident set size of this process in bytes (for [`PROCESS_MEMORY_BYTES`]);
/// `None` where `/proc` is not available.
pub fn process_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

fn resolve(listen: &str) -> Result<SocketAddr, MetricsError> {
    let err = |message: String| MetricsError::Address {
        addr: listen.to_string(),
        message,
    };
    listen
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("resolves to no address".into()))
}

/// The exporter binds its own listener from an address, so a free port is found by
/// binding port 0 and releasing it. In the short window before the exporter binds
/// it, another process's outgoing connection can take the same ephemeral port (seen
/// on a busy test machine); [`install_exporter`] then picks again.
fn pick_port(requested: SocketAddr) -> Result<SocketAddr, MetricsError> {
    let probe = TcpListener::bind(requested).map_err(|e| MetricsError::Bind {
        addr: requested.to_string(),
        message: e.to_string(),
    })?;
    probe.local_addr().map_err(|e| MetricsError::Bind {
        addr: requested.to_string(),
        message: e.to_string(),
    })
}

mod job_status;
pub use job_status::export_job_status;

#[cfg(test)]
mod tests;
