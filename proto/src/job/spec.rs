//! The job spec: one schema for every process of a job.
//!
//! Each component gets only its own section (`TrainSpec`, `DataSpec`, ...). Every
//! field has a serde default so a config file states only what differs from the
//! defaults; unknown keys are refused (`deny_unknown_fields`) so a typo never
//! silently falls back to a default.

use serde::{Deserialize, Serialize};

use super::arch::{Family, VitArch};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub job: JobMeta,
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub loss: LossSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub export: ExportSpec,
    #[serde(default)]
    pub trainers: TrainersSpec,
    #[serde(default)]
    pub teachers: TeachersSpec,
    #[serde(default)]
    pub coordinator: CoordinatorSpec,
    #[serde(default)]
    pub k8s: K8sSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobMeta {
    /// Job name; labels metrics and names the run directory.
    pub name: String,
    /// Seeds the epoch order, the crop plan and random initialisation.
    pub seed: u64,
    /// Where logs, checkpoints, exports and the journal go.
    pub run_dir: String,
}

impl Default for JobMeta {
    fn default() -> Self {
        Self {
            name: "declip".into(),
            seed: 0,
            run_dir: "runs/declip".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The CLIP image tower being fine-tuned; its frozen copy is the crop teacher.
    pub student: TowerSpec,
    /// The context teacher (vision foundation model).
    pub vfm: TowerSpec,
}

/// One vision tower: a preset and/or explicit hyperparameters, plus where its
/// weights come from. Architecture fields left out take the preset's value;
/// without a preset every architecture field must be given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerSpec {
    pub preset: Option<String>,
    pub family: Option<Family>,
    pub width: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub mlp_hidden: Option<usize>,
    pub patch_size: Option<usize>,
    pub image_size: Option<usize>,
    pub embed_dim: Option<usize>,
    pub register_tokens: Option<usize>,
    pub layer_scale: Option<bool>,
    pub rope_ref_grid: Option<usize>,
    pub layer_norm_eps: Option<f64>,
    /// A safetensors file with the tower's weights; without it the tower is
    /// initialised randomly from `init_seed` (demo and tests).
    pub weights: Option<String>,
    /// Key layout of `weights`; `auto` detects it from the key names.
    #[serde(default)]
    pub weights_layout: WeightsLayout,
    /// Seed of the random initialisation used when `weights` is not set.
    #[serde(default)]
    pub init_seed: u64,
    /// Student only: how the decoupled last block forms its attention.
    pub decoupled: Option<DecoupledMode>,
    /// Student only: apply 1/sqrt(head_dim) inside the decoupled attention
    /// (the released training code does not).
    pub attention_scale: Option<bool>,
}

impl TowerSpec {
    /// The architecture after `resolve` (every field known). Only valid on a spec
    /// that went through [`super::load`], which fills every field or refuses.
    pub fn arch(&self) -> VitArch {
        VitArch {
            family: self.family.expect("resolved"),
            width: self.width.expect("resolved"),
            depth: self.depth.expect("resolved"),
            heads: self.heads.expect("resolved"),
            head_dim: self.head_dim.expect("resolved"),
            mlp_hidden: self.mlp_hidden.expect("resolved"),
            patch_size: self.patch_size.expect("resolved"),
            image_size: self.image_size.expect("resolved"),
            embed_dim: self.embed_dim.expect("resolved"),
            register_tokens: self.register_tokens.expect("resolved"),
            layer_scale: self.layer_scale.expect("resolved"),
            rope_ref_grid: self.rope_ref_grid.expect("resolved"),
            layer_norm_eps: self.layer_norm_eps.expect("resolved"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsLayout {
    #[default]
    Auto,
    /// EVA-CLIP original checkpoints (`visual.blocks.N.attn.q_proj.weight`, `q_bias`, ...).
    Evaclip,
    /// open_clip state dicts (OpenAI CLIP models).
    Openclip,
    /// timm state dicts (EVA02, DINOv2).
    Timm,
    /// Meta's DINOv2 / DINO hub layout.
    Meta,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecoupledMode {
    /// softmax(Q Qᵀ): the method's default.
    #[default]
    Qq,
    /// softmax(K Kᵀ).
    Kk,
    /// softmax(Q Qᵀ) + softmax(K Kᵀ), context similarity averaged over Q and K.
    Csa,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    /// A COCO-format dataset (`data.synthetic_images` JPEG/PNG files and an instances
    /// json) written into `job.run_dir/synthetic-coco` once, then read as COCO (demo, tests).
    #[default]
    Synthetic,
    /// A COCO-format dataset on disk (`coco_root`).
    Coco,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    pub source: DataSource,
    /// Root of the COCO dataset; required when `source = "coco"`.
    pub coco_root: Option<String>,
    /// Image folder, relative to `coco_root`.
    pub images_dir: String,
    /// Instances or panoptic json, relative to `coco_root`.
    pub annotations: String,
    /// Number of images generated when `source = "synthetic"`.
    pub synthetic_images: usize,
    /// Student input side in pixels (longer side resized, right/bottom padded).
    pub student_resolution: usize,
    /// VFM input side in pixels.
    pub vfm_resolution: usize,
    /// Crop-teacher input side in pixels (centred padding).
    pub crop_resolution: usize,
    /// At most this many crops per image (method: 20).
    pub max_crops: usize,
    /// Images per shard (unit of teacher work and of cache files).
    pub shard_size: usize,
    /// Decode threads per process.
    pub loader_threads: usize,
    /// Decoded samples in flight at most.
    pub prefetch: usize,
    /// The job fails once skipped (corrupt/missing) images exceed this fraction.
    pub max_skip_fraction: f64,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            source: DataSource::Synthetic,
            coco_root: None,
            images_dir: "train2017".into(),
            annotations: "annotations/instances_train2017.json".into(),
            synthetic_images: 64,
            student_resolution: 560,
            vfm_resolution: 490,
            crop_resolution: 224,
            max_crops: 20,
            shard_size: 256,
            loader_threads: 2,
            prefetch: 16,
            max_skip_fraction: 0.001,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// fp32 on CPU, bf16 autocast on GPU.
    #[default]
    Auto,
    Fp32,
    Bf16,
    /// fp16 autocast with a dynamic loss scaler (the reference's setting).
    Fp16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub epochs: usize,
    /// Stop after this many optimizer steps even if epochs remain (0 = no cap).
    pub max_steps: u64,
    /// Global batch: images per optimizer step over all trainers.
    pub batch_size: usize,
    /// Images per forward on one trainer; accumulation covers the rest of its
    /// share. Defaults to the whole share (no accumulation).
    pub micro_batch_size: Option<usize>,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up `lr * (step + 1) / warmup_steps`, then cosine to 0.
    pub warmup_steps: u64,
    pub precision: Precision,
    /// Log a line every this many steps.
    pub log_every: u64,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            epochs: 6,
            max_steps: 0,
            batch_size: 16,
            micro_batch_size: None,
            lr: 1e-5,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.1,
            warmup_steps: 1000,
            precision: Precision::Auto,
            log_every: 10,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContextResize {
    /// Student and VFM grids must be equal.
    #[default]
    None,
    /// Resize the student's context features bilinearly to the VFM grid.
    Bilinear,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSpec {
    pub content_weight: f64,
    pub context_weight: f64,
    pub context_resize: ContextResize,
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            content_weight: 1.0,
            context_weight: 0.1,
            context_resize: ContextResize::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Checkpoint every this many optimizer steps (0 = only at the end).
    pub every_steps: u64,
    /// Committed checkpoints kept; older ones are pruned.
    pub keep: usize,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: 500,
            keep: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSpec {
    /// Weight-space merge `alpha * student + (1 - alpha) * original` (B: 0.7, L: 0.95).
    pub alpha: f64,
}

impl Default for ExportSpec {
    fn default() -> Self {
        Self { alpha: 0.7 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainersSpec {
    /// A world forms with `max` trainers, or with `min` after `join_wait_s`.
    pub min: usize,
    pub max: usize,
    pub join_wait_s: u64,
    /// `auto`, `cpu` or `cuda:N` (`cuda` picks GPU `local index`).
    pub device: String,
    /// A failed trainer is restarted at most this many times.
    pub max_restarts: u32,
    pub restart_backoff_s: u64,
}

impl Default for TrainersSpec {
    fn default() -> Self {
        Self {
            min: 1,
            max: 1,
            join_wait_s: 30,
            device: "auto".into(),
            max_restarts: 3,
            restart_backoff_s: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherMode {
    /// A teacher pool computes the frozen teachers' targets once into a cache.
    #[default]
    Cache,
    /// Trainers run the frozen teachers inside every step (the reference's way).
    Online,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeachersSpec {
    pub mode: TeacherMode,
    /// Teacher processes `coordinator launch` starts (cache mode).
    pub count: usize,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Seconds a shard lease lasts without a renewal; teachers renew at a third of it.
    pub lease_s: u64,
    /// How the cache stores VFM features (docs/cache-format.md).
    pub compression: Compression,
    /// Channels kept by `compression = "pca"` (and the PCA candidate of `auto`).
    pub pca_rank: usize,
}

impl Default for TeachersSpec {
    fn default() -> Self {
        Self {
            mode: TeacherMode::Cache,
            count: 1,
            device: "auto".into(),
            lease_s: 30,
            compression: Compression::Auto,
            pca_rank: 64,
        }
    }
}

/// VFM feature storage in the teacher cache. Crop embeddings are fp32 with `fp32`
/// and fp16 otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Per shard, the smallest of pca / int8 / fp16 whose mean affinity error on the
    /// shard's first images is at most 0.01 (fp16 if none is).
    #[default]
    Auto,
    /// Exact: the only format with which cache mode equals online mode.
    Fp32,
    Fp16,
    /// int8 with one fp32 scale per token (max |x| / 127).
    Int8,
    /// Projection onto `pca_rank` principal channels fitted on the shard's first
    /// images; basis and mean stored in the shard file.
    Pca,
}

impl Compression {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Auto => "auto",
            Compression::Fp32 => "fp32",
            Compression::Fp16 => "fp16",
            Compression::Int8 => "int8",
            Compression::Pca => "pca",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSpec {
    /// gRPC listen address; port 0 picks a free port and reports it.
    pub listen: String,
    /// Prometheus `/metrics` port; 0 picks one and reports it.
    pub metrics_port: u16,
    /// File holding the job's bearer token (used when `DECLIP_TOKEN` is not set).
    pub token_file: Option<String>,
    /// TLS: the server certificate chain and its private key (PEM). Both or neither.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// mTLS: CA (PEM) that must have signed every client's certificate. Needs TLS.
    pub client_ca: Option<String>,
    /// A worker silent for this many seconds is lost (workers report at least every 2 s).
    pub heartbeat_timeout_s: u64,
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            metrics_port: 0,
            token_file: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            heartbeat_timeout_s: 30,
        }
    }
}

/// Environment variable that carries a worker's preferred rank (an integer; on
/// Kubernetes the Indexed Job's completion index). Absent or unparsable = none.
pub const RANK_HINT_ENV: &str = "DECLIP_RANK_HINT";

/// Where and how `coordinator manifests` runs the job on Kubernetes. Quantities are
/// Kubernetes quantity strings (`"500m"`, `"4"` CPUs; `"16Gi"` bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sSpec {
    pub namespace: String,
    /// Image holding both binaries (see the Dockerfile).
    pub image: String,
    pub image_pull_policy: PullPolicy,
    /// Service account of every pod; empty = the namespace's default.
    pub service_account: String,
    /// Secret holding the job token under the key `token`; it is referenced, never rendered.
    pub token_secret: String,
    /// GPUs (`nvidia.com/gpu`) per trainer pod; 0 for CPU trainers.
    pub gpus_per_trainer: u32,
    /// GPUs per teacher pod; 0 for CPU teachers.
    pub gpus_per_teacher: u32,
    /// The coordinator's gRPC port inside the cluster (its Service exposes it).
    pub grpc_port: u16,
    /// `/metrics` port of every worker pod (and of the coordinator when
    /// `coordinator.metrics_port` is 0, which a cluster cannot scrape).
    pub worker_metrics_port: u16,
    /// Render the trainers as a JobSet (jobset.x-k8s.io) instead of an Indexed Job.
    pub jobset: bool,
    /// Gang scheduling of the trainers, so a world's pods start together or not at all.
    pub gang: Gang,
    /// Kueue LocalQueue the jobs are submitted to (`gang = "kueue"`).
    pub kueue_queue: String,
    /// Failed pods tolerated per teacher index before that index fails.
    pub teacher_backoff_limit_per_index: u32,
    pub trainer: PodResources,
    pub teacher: PodResources,
    pub coordinator: PodResources,
    /// StorageClass of the three PersistentVolumeClaims; empty = the cluster default.
    pub storage_class: String,
    /// Size of the data volume (the COCO root is mounted from it at /data).
    pub data_size: String,
    /// Size of the teacher-target cache volume.
    pub cache_size: String,
    /// Size of the run volume (journal, checkpoints, exports).
    pub checkpoint_size: String,
}

impl Default for K8sSpec {
    fn default() -> Self {
        Self {
            namespace: "declip".into(),
            image: "declip-orchestrator:0.1.0".into(),
            image_pull_policy: PullPolicy::IfNotPresent,
            service_account: String::new(),
            token_secret: "declip-token".into(),
            gpus_per_trainer: 1,
            gpus_per_teacher: 1,
            grpc_port: 50051,
            worker_metrics_port: 9464,
            jobset: false,
            gang: Gang::None,
            kueue_queue: String::new(),
            teacher_backoff_limit_per_index: 3,
            trainer: PodResources::new("8", "16", "48Gi", "64Gi"),
            teacher: PodResources::new("4", "8", "32Gi", "48Gi"),
            coordinator: PodResources::new("500m", "2", "1Gi", "4Gi"),
            storage_class: String::new(),
            data_size: "50Gi".into(),
            cache_size: "200Gi".into(),
            checkpoint_size: "100Gi".into(),
        }
    }
}

/// CPU and memory requests and limits of one kind of pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodResources {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl PodResources {
    pub fn new(
        cpu_request: &str,
        cpu_limit: &str,
        memory_request: &str,
        memory_limit: &str,
    ) -> Self {
        Self {
            cpu_request: cpu_request.into(),
            cpu_limit: cpu_limit.into(),
            memory_request: memory_request.into(),
            memory_limit: memory_limit.into(),
        }
    }
}

impl Default for PodResources {
    fn default() -> Self {
        Self::new("1", "2", "2Gi", "4Gi")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gang {
    /// The default scheduler; pods of a world may start one by one.
    #[default]
    None,
    /// Volcano: a PodGroup with minMember = trainers.min, pods scheduled by `volcano`.
    Volcano,
    /// Kueue: the jobs carry `kueue.x-k8s.io/queue-name` and start suspended.
    Kueue,
}
