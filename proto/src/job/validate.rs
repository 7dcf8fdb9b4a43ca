//! Range and consistency checks that run before any work starts.
//!
//! Each check names the key, shows the value and says what is allowed; they all
//! run, so one attempt reports every problem.

use std::net::SocketAddr;

use super::arch::VitArch;
use super::error::Problem;
use super::spec::{
    Compression, ContextResize, DataSource, Gang, JobSpec, PodResources, TeacherMode, TowerSpec,
};

pub(crate) fn validate(spec: &JobSpec) -> Vec<Problem> {
    let mut v = Checks::default();
    check_job(spec, &mut v);
    let student = spec.model.student.arch();
    let vfm = spec.model.vfm.arch();
    check_arch("model.student", &student, &mut v);
    check_arch("model.vfm", &vfm, &mut v);
    check_roles(spec, &student, &vfm, &mut v);
    check_data(spec, &student, &vfm, &mut v);
    check_train(spec, &mut v);
    check_world(spec, &mut v);
    check_k8s(spec, &mut v);
    v.problems
}

#[derive(Default)]
struct Checks {
    problems: Vec<Problem>,
}

impl Checks {
    fn require(&mut self, ok: bool, key: &str, value: impl ToString, allowed: impl Into<String>) {
        if !ok {
            self.problems
                .push(Problem::new(key, value.to_string(), allowed));
        }
    }
    fn at_least(&mut self, key: &str, value: usize, min: usize) {
        self.require(value >= min, key, value, format!("an integer >= {min}"));
    }
    fn finite_in(&mut self, key: &str, value: f64, lo: f64, hi: f64, allowed: &str) {
        let ok = value.is_finite() && value >= lo && value <= hi;
        self.require(ok, key, value, allowed);
    }
}

fn check_job(spec: &JobSpec, v: &mut Checks) {
    let name = &spec.job.name;
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    v.require(
        ok,
        "job.name",
        format!("{name:?}"),
        "1-40 characters of a-z, 0-9 and '-', not starting or ending with '-' (it names Kubernetes objects)",
    );
    v.require(
        !spec.job.run_dir.trim().is_empty(),
        "job.run_dir",
        "\"\"",
        "a directory path",
    );
}

fn check_arch(section: &str, arch: &VitArch, v: &mut Checks) {
    let key = |field: &str| format!("{section}.{field}");
    for (field, value) in [
        ("width", arch.width),
        ("depth", arch.depth),
        ("heads", arch.heads),
        ("head_dim", arch.head_dim),
        ("mlp_hidden", arch.mlp_hidden),
        ("patch_size", arch.patch_size),
        ("image_size", arch.image_size),
    ] {
        v.at_least(&key(field), value, 1);
    }
    v.require(
        arch.heads * arch.head_dim == arch.width,
        &key("head_dim"),
        arch.head_dim,
        format!(
            "heads x head_dim must equal width ({} x {} != {})",
            arch.heads, arch.head_dim, arch.width
        ),
    );
    if arch.patch_size > 0 {
        v.require(
            arch.image_size % arch.patch_size == 0,
            &key("image_size"),
            arch.image_size,
            format!("a multiple of patch_size {}", arch.patch_size),
        );
    }
    if arch.uses_rope() {
        v.require(
            arch.head_dim % 4 == 0,
            &key("head_dim"),
            arch.head_dim,
            "a multiple of 4 (2-D RoPE rotates pairs within each half of the head)",
        );
        v.at_least(&key("rope_ref_grid"), arch.rope_ref_grid, 1);
    }
    v.finite_in(
        &key("layer_norm_eps"),
        arch.layer_norm_eps,
        1e-12,
        1e-2,
        "a number in [1e-12, 1e-2]",
    );
}

fn check_roles(spec: &JobSpec, student: &VitArch, vfm: &VitArch, v: &mut Checks) {
    v.require(
        student.family.can_be_student(),
        "model.student.family",
        format!("{:?}", student.family),
        "eva02 or openai-clip (a CLIP image tower)",
    );
    v.at_least("model.student.embed_dim", student.embed_dim, 1);
    v.require(
        vfm.family.can_be_vfm(),
        "model.vfm.family",
        format!("{:?}", vfm.family),
        "dinov2 or dino (a vision foundation model)",
    );
    let vfm_spec: &TowerSpec = &spec.model.vfm;
    v.require(
        vfm_spec.decoupled.is_none(),
        "model.vfm.decoupled",
        format!("{:?}", vfm_spec.decoupled),
        "not set: only the student has a decoupled block",
    );
    v.require(
        vfm_spec.attention_scale.is_none(),
        "model.vfm.attention_scale",
        format!("{:?}", vfm_spec.attention_scale),
        "not set: only the student has a decoupled block",
    );
}

fn check_data(spec: &JobSpec, student: &VitArch, vfm: &VitArch, v: &mut Checks) {
    let d = &spec.data;
    let multiple = |v: &mut Checks, key: &str, side: usize, patch: usize, tower: &str| {
        let ok = patch > 0 && side >= patch && side % patch == 0;
        v.require(
            ok,
            key,
            side,
            format!("a positive multiple of the {tower} patch size {patch}"),
        );
    };
    multiple(
        v,
        "data.student_resolution",
        d.student_resolution,
        student.patch_size,
        "student",
    );
    multiple(
        v,
        "data.vfm_resolution",
        d.vfm_resolution,
        vfm.patch_size,
        "VFM",
    );
    multiple(
        v,
        "data.crop_resolution",
        d.crop_resolution,
        student.patch_size,
        "crop teacher (student)",
    );
    if student.patch_size > 0
        && vfm.patch_size > 0
        && spec.loss.context_resize == ContextResize::None
    {
        let sg = d.student_resolution / student.patch_size;
        let vg = d.vfm_resolution / vfm.patch_size;
        v.require(
            sg == vg,
            "data.vfm_resolution",
            d.vfm_resolution,
            format!(
                "a VFM grid equal to the student grid {sg}x{sg} ({} / {}): set data.vfm_resolution = {} \
                 ({sg} x {}), or loss.context_resize = \"bilinear\"",
                d.student_resolution,
                student.patch_size,
                sg * vfm.patch_size,
                vfm.patch_size
            ),
        );
    }
    v.require(
        (1..=36).contains(&d.max_crops),
        "data.max_crops",
        d.max_crops,
        "an integer in 1..=36 (a 6x6 layout has 36 cells)",
    );
    v.at_least("data.shard_size", d.shard_size, 1);
    v.require(
        (1..=256).contains(&d.loader_threads),
        "data.loader_threads",
        d.loader_threads,
        "an integer in 1..=256",
    );
    v.at_least("data.prefetch", d.prefetch, 1);
    v.finite_in(
        "data.max_skip_fraction",
        d.max_skip_fraction,
        0.0,
        1.0,
        "a fraction in [0, 1]",
    );
    match d.source {
        DataSource::Coco => v.require(
            d.coco_root.as_deref().is_some_and(|r| !r.trim().is_empty()),
            "data.coco_root",
            "(not set)",
            "the COCO dataset root (required when data.source = \"coco\"), e.g. --set data.coco_root=/data/coco",
        ),
        DataSource::Synthetic => v.at_least("data.synthetic_images", d.synthetic_images, 1),
    }
}

fn check_train(spec: &JobSpec, v: &mut Checks) {
    let t = &spec.train;
    v.at_least("train.epochs", t.epochs, 1);
    v.at_least("train.batch_size", t.batch_size, 1);
    if let Some(micro) = t.micro_batch_size {
        v.at_least("train.micro_batch_size", micro, 1);
    }
    v.require(
        t.lr.is_finite() && t.lr > 0.0,
        "train.lr",
        t.lr,
        "a positive number",
    );
    for (i, beta) in t.betas.iter().enumerate() {
        v.require(
            beta.is_finite() && (0.0..1.0).contains(beta),
            "train.betas",
            format!("{:?}", t.betas),
            format!("two numbers in [0, 1) (element {i} is {beta})"),
        );
    }
    v.require(
        t.eps.is_finite() && t.eps > 0.0,
        "train.eps",
        t.eps,
        "a positive number",
    );
    v.finite_in(
        "train.weight_decay",
        t.weight_decay,
        0.0,
        10.0,
        "a number in [0, 10]",
    );
    v.require(
        t.log_every >= 1,
        "train.log_every",
        t.log_every,
        "an integer >= 1",
    );
    let l = &spec.loss;
    v.finite_in(
        "loss.content_weight",
        l.content_weight,
        0.0,
        1e6,
        "a number >= 0",
    );
    v.finite_in(
        "loss.context_weight",
        l.context_weight,
        0.0,
        1e6,
        "a number >= 0",
    );
    v.require(
        l.content_weight > 0.0 || l.context_weight > 0.0,
        "loss.content_weight",
        l.content_weight,
        "at least one of loss.content_weight and loss.context_weight above 0",
    );
    v.at_least("checkpoint.keep", spec.checkpoint.keep, 1);
    v.finite_in(
        "export.alpha",
        spec.export.alpha,
        0.0,
        1.0,
        "a number in [0, 1]",
    );
}

fn check_world(spec: &JobSpec, v: &mut Checks) {
    let tr = &spec.trainers;
    v.at_least("trainers.min", tr.min, 1);
    v.require(
        tr.min <= tr.max,
        "trainers.min",
        tr.min,
        format!("at most trainers.max = {}", tr.max),
    );
    for (key, device) in [
        ("trainers.device", &tr.device),
        ("teachers.device", &spec.teachers.device),
    ] {
        v.require(
            parse_device(device).is_some(),
            key,
            format!("{device:?}"),
            "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        );
    }
    let batch = spec.train.batch_size;
    if tr.min >= 1 && batch >= 1 {
        for world in [tr.min, tr.max] {
            if batch % world != 0 {
                v.require(
                    false,
                    "train.batch_size",
                    batch,
                    format!(
                        "a multiple of every world size the job may run at (trainers.min = {}, trainers.max = {}): \
                         {batch} images do not split evenly over {world} trainers",
                        tr.min, tr.max
                    ),
                );
            } else if let Some(micro) = spec.train.micro_batch_size.filter(|m| *m >= 1) {
                let share = batch / world;
                v.require(
                    share % micro == 0,
                    "train.micro_batch_size",
                    micro,
                    format!("a divisor of each trainer's share ({batch} / {world} trainers = {share} images)"),
                );
            }
        }
    }
    if spec.teachers.mode == TeacherMode::Cache {
        v.at_least("teachers.count", spec.teachers.count, 1);
    }
    check_coordinator(spec, v);
    check_teachers(spec, v);
}

fn check_coordinator(spec: &JobSpec, v: &mut Checks) {
    let c = &spec.coordinator;
    v.require(
        c.tls_cert.is_some() == c.tls_key.is_some(),
        "coordinator.tls_cert",
        format!("{:?}", c.tls_cert),
        "set together with coordinator.tls_key (a certificate and its private key)",
    );
    v.require(
        c.client_ca.is_none() || c.tls_cert.is_some(),
        "coordinator.client_ca",
        format!("{:?}", c.client_ca),
        "only with coordinator.tls_cert and tls_key (mTLS needs TLS)",
    );
    for (key, path) in [
        ("coordinator.token_file", &c.token_file),
        ("coordinator.tls_cert", &c.tls_cert),
        ("coordinator.tls_key", &c.tls_key),
        ("coordinator.client_ca", &c.client_ca),
    ] {
        if let Some(path) = path {
            v.require(!path.trim().is_empty(), key, "\"\"", "a file path");
        }
    }
    v.require(
        (1..=3600).contains(&c.heartbeat_timeout_s),
        "coordinator.heartbeat_timeout_s",
        c.heartbeat_timeout_s,
        "an integer in 1..=3600 (workers report at least every 2 s)",
    );
    v.require(
        spec.coordinator.listen.parse::<SocketAddr>().is_ok(),
        "coordinator.listen",
        format!("{:?}", spec.coordinator.listen),
        "an IP:port address such as 127.0.0.1:50051 (port 0 picks a free one)",
    );
}

fn check_teachers(spec: &JobSpec, v: &mut Checks) {
    v.require(
        (3..=3600).contains(&spec.teachers.lease_s),
        "teachers.lease_s",
        spec.teachers.lease_s,
        "an integer in 3..=3600 (teachers renew at a third of it)",
    );
    // `auto` clamps its PCA candidate to the VFM width; an explicit `pca` must fit it.
    let vfm_width = spec.model.vfm.arch().width;
    let rank_max = match spec.teachers.compression {
        Compression::Pca => vfm_width.max(1),
        _ => usize::MAX,
    };
    v.require(
        (1..=rank_max).contains(&spec.teachers.pca_rank),
        "teachers.pca_rank",
        spec.teachers.pca_rank,
        format!(
            "an integer in 1..={vfm_width} (the VFM width) with teachers.compression = \"pca\""
        ),
    );
}

fn check_k8s(spec: &JobSpec, v: &mut Checks) {
    let k = &spec.k8s;
    v.require(
        is_dns_label(&k.namespace),
        "k8s.namespace",
        format!("{:?}", k.namespace),
        "a DNS-1123 label: 1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric",
    );
    v.require(
        !k.image.is_empty() && !k.image.contains(char::is_whitespace),
        "k8s.image",
        format!("{:?}", k.image),
        "an image reference such as registry.example/declip:0.1.0",
    );
    for (key, name) in [
        ("k8s.token_secret", &k.token_secret),
        ("k8s.service_account", &k.service_account),
    ] {
        let optional = key == "k8s.service_account" && name.is_empty();
        v.require(
            optional || is_dns_subdomain(name),
            key,
            format!("{name:?}"),
            "a DNS-1123 subdomain: lower-case alphanumerics, '-' and '.', at most 253 characters",
        );
    }
    for (key, gpus) in [
        ("k8s.gpus_per_trainer", k.gpus_per_trainer),
        ("k8s.gpus_per_teacher", k.gpus_per_teacher),
    ] {
        v.require(gpus <= 16, key, gpus, "an integer in 0..=16");
    }
    check_ports(spec, v);
    v.require(
        k.gang != Gang::Kueue || is_dns_subdomain(&k.kueue_queue),
        "k8s.kueue_queue",
        format!("{:?}", k.kueue_queue),
        "the name of a Kueue LocalQueue (required when k8s.gang = \"kueue\")",
    );
    for (role, r) in [
        ("trainer", &k.trainer),
        ("teacher", &k.teacher),
        ("coordinator", &k.coordinator),
    ] {
        check_resources(role, r, v);
    }
    v.require(
        k.storage_class.is_empty() || is_dns_subdomain(&k.storage_class),
        "k8s.storage_class",
        format!("{:?}", k.storage_class),
        "empty (the cluster default) or a StorageClass name",
    );
    for (key, size) in [
        ("k8s.data_size", &k.data_size),
        ("k8s.cache_size", &k.cache_size),
        ("k8s.checkpoint_size", &k.checkpoint_size),
    ] {
        v.require(
            parse_memory(size).is_some_and(|b| b > 0.0),
            key,
            format!("{size:?}"),
            "a positive storage quantity such as 100Gi",
        );
    }
}

fn check_ports(spec: &JobSpec, v: &mut Checks) {
    let k = &spec.k8s;
    v.require(
        k.grpc_port > 0,
        "k8s.grpc_port",
        k.grpc_port,
        "a port in 1..=65535",
    );
    v.require(
        k.worker_metrics_port > 0,
        "k8s.worker_metrics_port",
        k.worker_metrics_port,
        "a port in 1..=65535",
    );
    let coordinator_metrics = match spec.coordinator.metrics_port {
        0 => k.worker_metrics_port,
        port => port,
    };
    v.require(
        coordinator_metrics != k.grpc_port,
        "k8s.grpc_port",
        k.grpc_port,
        format!("a port other than the coordinator's metrics port {coordinator_metrics}"),
    );
}

fn check_resources(role: &str, r: &PodResources, v: &mut Checks) {
    let key = |field: &str| format!("k8s.{role}.{field}");
    let pairs = [
        (
            "cpu_request",
            "cpu_limit",
            &r.cpu_request,
            &r.cpu_limit,
            parse_cpu as fn(&str) -> Option<f64>,
            "a CPU quantity such as 500m or 4",
        ),
        (
            "memory_request",
            "memory_limit",
            &r.memory_request,
            &r.memory_limit,
            parse_memory,
            "a memory quantity such as 512Mi or 16Gi",
        ),
    ];
    for (req_key, lim_key, request, limit, parse, allowed) in pairs {
        let req = parse(request).filter(|x| *x > 0.0);
        let lim = parse(limit).filter(|x| *x > 0.0);
        v.require(
            req.is_some(),
            &key(req_key),
            format!("{request:?}"),
            allowed,
        );
        v.require(lim.is_some(), &key(lim_key), format!("{limit:?}"), allowed);
        if let (Some(req), Some(lim)) = (req, lim) {
            v.require(
                req <= lim,
                &key(req_key),
                format!("{request:?}"),
                format!("at most the limit {limit:?}"),
            );
        }
    }
}

fn is_dns_label(name: &str) -> bool {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    (1..=63).contains(&name.len()) && ok_chars && !name.starts_with('-') && !name.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// A Kubernetes CPU quantity in cores (`"500m"` = 0.5).
pub(crate) fn parse_cpu(text: &str) -> Option<f64> {
    let (number, scale) = match text.strip_suffix('m') {
        Some(milli) => (milli, 1e-3),
        None => (text, 1.0),
    };
    parse_decimal(number).map(|x| x * scale)
}

/// A Kubernetes memory or storage quantity in bytes (`"16Gi"`, `"500M"`, `"1024"`).
pub(crate) fn parse_memory(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1.0));
    parse_decimal(number).map(|x| x * scale)
}

/// Digits with at most one '.', nothing else (no sign, exponent or spaces).
fn parse_decimal(text: &str) -> Option<f64> {
    let plain = !text.is_empty()
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.matches('.').count() <= 1
        && text.chars().any(|c| c.is_ascii_digit());
    plain.then(|| text.parse().ok()).flatten()
}

/// A device string: `auto`, `cpu`, `cuda` (the first visible GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse_device(text: &str) -> Option<DeviceRequest> {
    match text {
        "auto" => Some(DeviceRequest::Auto),
        "cpu" => Some(DeviceRequest::Cpu),
        "cuda" => Some(DeviceRequest::Cuda(0)),
        other => other
            .strip_prefix("cuda:")?
            .parse()
            .ok()
            .map(DeviceRequest::Cuda),
    }
}
