//! The names of the catalog: label keys and their known values, the environment
//! variables of the exporter, and every metric name. A leaf: the catalog
//! (`super::CATALOG`), the exporter and the job-status export all use these.

// ---- label keys -----------------------------------------------------------------

/// Job name (`job.name`). Global label.
pub const LABEL_JOB: &str = "job";
/// The exporting process: `coordinator`, `trainer` or `teacher`. Global label.
pub const LABEL_ROLE: &str = "role";
/// Host name of the exporting process (the node name on Kubernetes). Global label.
pub const LABEL_HOST: &str = "host";
/// Trainer rank in its generation (a decimal integer).
pub const LABEL_RANK: &str = "rank";
/// Generation (trainer world) the series belongs to (a decimal integer).
pub const LABEL_GENERATION: &str = "generation";
/// Part of a training step: see [`STEP_PHASES`].
pub const LABEL_PHASE: &str = "phase";
/// Loss component: see [`LOSS_COMPONENTS`].
pub const LABEL_COMPONENT: &str = "component";
/// Why something was skipped, rejected or aborted (free-form snake_case word).
pub const LABEL_REASON: &str = "reason";
/// Teacher shard state: see [`SHARD_STATES`].
pub const LABEL_STATE: &str = "state";
/// Which worker pool a series is about: `trainer` or `teacher`.
pub const LABEL_POOL: &str = "pool";
/// Job phase name for [`JOB_PHASE`]: see [`JOB_PHASES`].
pub const LABEL_JOB_PHASE: &str = "job_phase";
/// Version of the binary for [`BUILD_INFO`].
pub const LABEL_VERSION: &str = "version";

/// Labels every series carries, set once per process by [`super::install_exporter`].
pub const GLOBAL_LABELS: [&str; 3] = [LABEL_JOB, LABEL_ROLE, LABEL_HOST];

/// Values of [`LABEL_PHASE`], in the order a step runs them.
pub const STEP_PHASES: [&str; 5] = [
    "data_wait",
    "forward",
    "backward",
    "all_reduce",
    "optimizer",
];
/// Values of [`LABEL_COMPONENT`].
pub const LOSS_COMPONENTS: [&str; 3] = ["content", "context", "total"];
/// Values of [`LABEL_STATE`] for shards.
pub const SHARD_STATES: [&str; 4] = ["pending", "leased", "done", "failed"];
/// Values of [`LABEL_JOB_PHASE`] (the `JobPhase` enum of `declip.proto`, lower case).
pub const JOB_PHASES: [&str; 7] = [
    "forming",
    "training",
    "recovering",
    "draining",
    "completed",
    "failed",
    "stopped",
];

/// Environment variable a worker reads its `/metrics` listen address from
/// (`host:port`, port 0 = pick one); the Kubernetes manifests set it.
pub const METRICS_LISTEN_ENV: &str = "DECLIP_METRICS_LISTEN";
/// Environment variable that overrides the `host` label (default: the host name).
/// The manifests set it to the node name, which the DCGM exporter's `Hostname` holds.
pub const HOST_ENV: &str = "DECLIP_HOST";

// ---- metric names -----------------------------------------------------------------

// Shared by several roles.
pub const BUILD_INFO: &str = "declip_build_info";
pub const IMAGES_TOTAL: &str = "declip_images_total";
pub const PROCESS_MEMORY_BYTES: &str = "declip_process_memory_bytes";
pub const GPU_MEMORY_BYTES: &str = "declip_gpu_memory_bytes";
pub const DATA_SKIPS_TOTAL: &str = "declip_data_skips_total";
pub const GENERATION: &str = "declip_generation";
pub const WORLD_SIZE: &str = "declip_world_size";

// Trainer.
pub const STEPS_TOTAL: &str = "declip_steps_total";
pub const STEP: &str = "declip_step";
pub const EPOCH: &str = "declip_epoch";
pub const STEP_SECONDS: &str = "declip_step_seconds";
pub const STEP_PHASE_SECONDS: &str = "declip_step_phase_seconds";
pub const LOSS: &str = "declip_loss";
pub const LEARNING_RATE: &str = "declip_learning_rate";
pub const IMAGES_PER_SECOND: &str = "declip_images_per_second";
pub const CACHE_HITS_TOTAL: &str = "declip_cache_hits_total";
pub const CACHE_MISSES_TOTAL: &str = "declip_cache_misses_total";
pub const CACHE_WAIT_SECONDS: &str = "declip_cache_wait_seconds";
pub const CHECKPOINT_SECONDS: &str = "declip_checkpoint_seconds";
pub const COLLECTIVE_SEQUENCE: &str = "declip_collective_sequence";

// Teacher.
pub const TEACHER_SHARDS_DONE_TOTAL: &str = "declip_teacher_shards_done_total";
pub const TEACHER_SHARDS_FAILED_TOTAL: &str = "declip_teacher_shards_failed_total";
pub const TEACHER_SHARDS_LEASED: &str = "declip_teacher_shards_leased";
pub const TEACHER_WRITTEN_BYTES_TOTAL: &str = "declip_teacher_written_bytes_total";
pub const TEACHER_SHARD_SECONDS: &str = "declip_teacher_shard_seconds";

// Coordinator: job-level aggregates of the workers' reports.
pub const JOB_PHASE: &str = "declip_job_phase";
pub const JOB_STEP: &str = "declip_job_step";
pub const JOB_TOTAL_STEPS: &str = "declip_job_total_steps";
pub const JOB_EPOCH: &str = "declip_job_epoch";
pub const JOB_ETA_SECONDS: &str = "declip_job_eta_seconds";
pub const JOB_ELAPSED_SECONDS: &str = "declip_job_elapsed_seconds";
pub const JOB_IMAGES_PER_SECOND: &str = "declip_job_images_per_second";
pub const JOB_IMAGES_TOTAL: &str = "declip_job_images_total";
pub const JOB_LOSS: &str = "declip_job_loss";
pub const JOB_SHARDS: &str = "declip_job_shards";
pub const JOB_TEACHER_WRITTEN_BYTES_TOTAL: &str = "declip_job_teacher_written_bytes_total";
pub const JOB_CACHE_HITS_TOTAL: &str = "declip_job_cache_hits_total";
pub const JOB_CACHE_MISSES_TOTAL: &str = "declip_job_cache_misses_total";
pub const JOB_DATA_SKIPS_TOTAL: &str = "declip_job_data_skips_total";
// Coordinator: per rank, from the trainers' reports.
pub const RANK_HEARTBEAT_AGE_SECONDS: &str = "declip_rank_heartbeat_age_seconds";
pub const RANK_STEP: &str = "declip_rank_step";
pub const RANK_IMAGES_PER_SECOND: &str = "declip_rank_images_per_second";
pub const RANK_STEP_PHASE_SECONDS: &str = "declip_rank_step_phase_seconds";
pub const RANK_COLLECTIVE_SEQUENCE: &str = "declip_rank_collective_sequence";
pub const RANK_GPU_MEMORY_BYTES: &str = "declip_rank_gpu_memory_bytes";
// Coordinator: control plane.
pub const WORKERS: &str = "declip_workers";
pub const RESTARTS_TOTAL: &str = "declip_restarts_total";
pub const GENERATION_ABORTS_TOTAL: &str = "declip_generation_aborts_total";
pub const CHECKPOINT_LAST_STEP: &str = "declip_checkpoint_last_step";
pub const CHECKPOINT_COMMITS_TOTAL: &str = "declip_checkpoint_commits_total";
pub const RPC_REJECTED_TOTAL: &str = "declip_rpc_rejected_total";
