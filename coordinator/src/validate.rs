//! Field validation of everything a worker sends. A refused message changes nothing; the
//! service turns the [`Refusal`] into a gRPC status, logs it with the peer address and
//! counts it by [`Refusal::reason`].

use std::net::SocketAddr;

use proto::wire::{
    CommitCheckpointRequest, CompleteShardRequest, RegisterRequest, Role, WorkerReport, WorkerState,
};

use crate::journal::Checkpoint;

/// Longest worker id, host name, device name or address accepted (bytes).
const MAX_NAME: usize = 256;
/// Longest path (checkpoint directory, cache file) accepted (bytes).
const MAX_PATH: usize = 4096;
/// Most devices one worker may list.
const MAX_DEVICES: usize = 64;

/// The gRPC code a refusal maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    FailedPrecondition,
    NotFound,
}

/// Why a request was refused: a gRPC code, a stable snake_case reason (metrics label)
/// and a message for the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        match self.code {
            Code::InvalidArgument => tonic::Status::invalid_argument(&self.message),
            Code::FailedPrecondition => tonic::Status::failed_precondition(&self.message),
            Code::NotFound => tonic::Status::not_found(&self.message),
        }
    }
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal::new(Code::InvalidArgument, reason, message))
}

fn name(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.len() > max || value.chars().any(char::is_control) {
        return invalid(
            "bad_field",
            format!("{field}: at most {max} bytes of printable text"),
        );
    }
    Ok(())
}

/// A number a worker reports: finite and not negative.
fn amount(field: &str, value: f64) -> Result<(), Refusal> {
    if !value.is_finite() || value < 0.0 {
        return invalid(
            "negative_count",
            format!("{field} = {value}: must be a finite number >= 0"),
        );
    }
    Ok(())
}

pub fn register(req: &RegisterRequest) -> Result<(), Refusal> {
    if req.protocol_version != proto::PROTOCOL_VERSION {
        return Err(Refusal::new(
            Code::FailedPrecondition,
            "protocol_version",
            format!(
                "worker speaks protocol v{}, coordinator v{}",
                req.protocol_version,
                proto::PROTOCOL_VERSION
            ),
        ));
    }
    match Role::try_from(req.role) {
        Ok(Role::Trainer | Role::Teacher) => {}
        _ => {
            return invalid(
                "bad_field",
                format!("role {} is not trainer or teacher", req.role),
            )
        }
    }
    name("host", &req.host, MAX_NAME)?;
    name("worker_id", &req.worker_id, MAX_NAME)?;
    name("metrics_address", &req.metrics_address, MAX_NAME)?;
    if req.devices.len() > MAX_DEVICES {
        return invalid("bad_field", format!("at most {MAX_DEVICES} devices"));
    }
    for d in &req.devices {
        name("devices", d, MAX_NAME)?;
    }
    if !req.ring_address.is_empty() && req.ring_address.parse::<SocketAddr>().is_err() {
        return invalid(
            "bad_field",
            format!("ring_address {:?} is not IP:port", req.ring_address),
        );
    }
    if req.rank_hint < -1 {
        return invalid(
            "negative_count",
            format!("rank_hint {} < -1", req.rank_hint),
        );
    }
    Ok(())
}

pub fn report(r: &WorkerReport, worker_id: &str) -> Result<(), Refusal> {
    if r.worker_id != worker_id {
        return invalid(
            "bad_field",
            format!(
                "report names {:?}, the stream is {worker_id:?}",
                r.worker_id
            ),
        );
    }
    if WorkerState::try_from(r.state).is_err() {
        return invalid("bad_field", format!("unknown worker state {}", r.state));
    }
    name("metrics_address", &r.metrics_address, MAX_NAME)?;
    amount("images_per_s", r.images_per_s)?;
    amount("learning_rate", r.learning_rate)?;
    amount("cache_wait", r.cache_wait)?;
    if let Some(t) = &r.step_times {
        for (f, v) in [
            ("step_times.data_wait", t.data_wait),
            ("step_times.forward", t.forward),
            ("step_times.backward", t.backward),
            ("step_times.all_reduce", t.all_reduce),
            ("step_times.optimizer", t.optimizer),
            ("step_times.total", t.total),
        ] {
            amount(f, v)?;
        }
    }
    if let Some(l) = &r.losses {
        for (f, v) in [
            ("losses.content", l.content),
            ("losses.context", l.context),
            ("losses.total", l.total),
        ] {
            // A loss may be any finite number; NaN/inf would poison averages and ETAs.
            if !v.is_finite() {
                return invalid("bad_field", format!("{f} = {v}: not finite"));
            }
        }
    }
    name("error", &r.error, MAX_PATH)?;
    if r.nccl_unique_id.len() > 512 {
        return invalid("bad_field", "nccl_unique_id: at most 512 bytes");
    }
    for s in &r.skips {
        name("skips.reason", &s.reason, MAX_NAME)?;
    }
    Ok(())
}

fn sha256_hex(field: &str, value: &str) -> Result<(), Refusal> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid(
            "bad_field",
            format!("{field}: a sha256 in hex (64 characters), got {value:?}"),
        );
    }
    Ok(())
}

fn safe_path(field: &str, value: &str) -> Result<(), Refusal> {
    name(field, value, MAX_PATH)?;
    if value.is_empty() || value.split('/').any(|p| p == "..") {
        return invalid(
            "bad_field",
            format!("{field} {value:?}: a non-empty path without '..'"),
        );
    }
    Ok(())
}

/// The checkpoint of a commit, if its fields are well-formed.
pub fn checkpoint(req: &CommitCheckpointRequest) -> Result<Checkpoint, Refusal> {
    let Some(c) = &req.checkpoint else {
        return Err(Refusal::new(
            Code::InvalidArgument,
            "bad_field",
            "checkpoint is missing",
        ));
    };
    safe_path("checkpoint.path", &c.path)?;
    sha256_hex("checkpoint.checksum", &c.checksum)?;
    if c.step == 0 {
        invalid("bad_field", "checkpoint.step must be at least 1")?;
    }
    Ok(Checkpoint {
        step: c.step,
        path: c.path.clone(),
        checksum: c.checksum.to_ascii_lowercase(),
        epoch: c.epoch,
        epoch_step: c.epoch_step,
    })
}

pub fn completion(req: &CompleteShardRequest) -> Result<(), Refusal> {
    safe_path("file", &req.file)?;
    if req.file.starts_with('/') {
        invalid("bad_field", "file must be relative to the cache directory")?;
    }
    sha256_hex("checksum", &req.checksum)?;
    if req.bytes == 0 {
        invalid("bad_field", "bytes must be at least 1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_mismatch_names_both_versions() {
        let req = RegisterRequest {
            protocol_version: 99,
            role: Role::Trainer as i32,
            ..Default::default()
        };
        let err = register(&req).unwrap_err();
        assert_eq!(err.code, Code::FailedPrecondition);
        assert_eq!(
            err.message,
            format!(
                "worker speaks protocol v99, coordinator v{}",
                proto::PROTOCOL_VERSION
            )
        );
    }

    #[test]
    fn negative_and_non_finite_numbers_are_refused() {
        let mut r = WorkerReport {
            worker_id: "w1".into(),
            state: WorkerState::Training as i32,
            images_per_s: -1.0,
            ..Default::default()
        };
        assert_eq!(report(&r, "w1").unwrap_err().reason, "negative_count");
        r.images_per_s = 3.0;
        assert!(report(&r, "w1").is_ok());
        assert_eq!(report(&r, "w2").unwrap_err().reason, "bad_field");
        r.learning_rate = f64::NAN;
        assert!(report(&r, "w1").is_err());
        r.learning_rate = 0.0;
        r.state = 42;
        assert!(report(&r, "w1").is_err());
    }

    #[test]
    fn checksums_and_paths_are_checked() {
        let ok = CompleteShardRequest {
            file: "shard-00001.bin".into(),
            checksum: "a".repeat(64),
            bytes: 10,
            ..Default::default()
        };
        assert!(completion(&ok).is_ok());
        for bad in [
            CompleteShardRequest {
                checksum: "xyz".into(),
                ..ok.clone()
            },
            CompleteShardRequest {
                file: "../x".into(),
                ..ok.clone()
            },
            CompleteShardRequest {
                file: "/abs".into(),
                ..ok.clone()
            },
            CompleteShardRequest { bytes: 0, ..ok },
        ] {
            assert!(completion(&bad).is_err(), "{bad:?}");
        }
    }
}
