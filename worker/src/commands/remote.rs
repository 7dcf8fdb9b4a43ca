//! `worker train --coordinator` and `worker teach --coordinator`: connect, register, take
//! the job spec from the coordinator, and run the trainer or teacher loop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use proto::client::ClientTls;
use proto::job::JobSpec;
use proto::metrics;
use proto::wire::Role;
use worker::comm::ring::RingListener;
use worker::control::{self, Control, ControlConfig};
use worker::runtime::RuntimeInfo;
use worker::telemetry;
use worker::train::distributed::{self, TrainerExit};

#[derive(Clone, Debug)]
pub struct RemoteOptions {
    pub token_file: Option<PathBuf>,
    pub rank_hint: i32,
    pub reconnect_timeout: Duration,
    pub ring_listen: String,
    pub metrics_listen: String,
}

/// The job token: `DECLIP_TOKEN`, else `--token-file`.
fn token(options: &RemoteOptions) -> anyhow::Result<Option<String>> {
    if let Ok(token) = std::env::var(proto::auth::TOKEN_ENV) {
        return Ok(Some(token.trim().to_string()));
    }
    match &options.token_file {
        Some(path) => Ok(Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the job token from {}", path.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

fn connect(
    addr: &str,
    options: &RemoteOptions,
    role: Role,
    device: &str,
    ring_address: String,
) -> anyhow::Result<(Control, JobSpec)> {
    let config = ControlConfig {
        addr: addr.to_string(),
        token: token(options)?,
        tls: ClientTls::from_env(),
        role,
        host: control::host_name(),
        devices: vec![device.to_string()],
        ring_address,
        rank_hint: options.rank_hint,
        metrics_address: String::new(),
        reconnect_timeout: options.reconnect_timeout,
    };
    let host = config.host.clone();
    let control = Control::connect(config)
        .with_context(|| format!("registering with the coordinator at {addr}"))?;
    let spec = distributed::job_from_registration(&control.registration)?;
    tracing::info!(
        "registered with {addr} as {} for job {:?} ({} images)",
        control.worker_id(),
        spec.job.name,
        control.registration.image_count
    );
    // The exporter starts now: its `job` label is the job name the coordinator sent.
    let metrics_role = match role {
        Role::Teacher => metrics::Role::Teacher,
        _ => metrics::Role::Trainer,
    };
    let metrics = telemetry::serve(&options.metrics_listen, &spec.job.name, metrics_role, &host)
        .with_context(|| format!("serving /metrics on {}", options.metrics_listen))?;
    tracing::info!("serving /metrics on {metrics}");
    control.set_metrics_address(&metrics);
    Ok((control, spec))
}

pub fn train(
    addr: &str,
    options: &RemoteOptions,
    device: Option<&str>,
    info: &RuntimeInfo,
) -> anyhow::Result<ExitCode> {
    // The ring listener exists before registering: its address is part of the registration.
    let listener = RingListener::bind(&options.ring_listen)
        .with_context(|| format!("binding the ring listener on {}", options.ring_listen))?;
    let requested = device.unwrap_or("auto");
    let (control, spec) = connect(addr, options, Role::Trainer, requested, listener.address())?;
    let device = super::device::select(device.unwrap_or(&spec.trainers.device), info)?;
    let exit = distributed::run_trainer(&control, &spec, device, &listener)?;
    tracing::info!("trainer exits: {exit:?}");
    Ok(match exit {
        TrainerExit::Completed | TrainerExit::Drained | TrainerExit::Stopped => ExitCode::SUCCESS,
    })
}

pub fn teach(
    addr: &str,
    options: &RemoteOptions,
    device: Option<&str>,
    info: &RuntimeInfo,
) -> anyhow::Result<ExitCode> {
    let requested = device.unwrap_or("auto");
    let (control, spec) = connect(addr, options, Role::Teacher, requested, String::new())?;
    let device = super::device::select(device.unwrap_or(&spec.teachers.device), info)?;
    worker::teacher::pool::run_teacher(&control, &spec, device)?;
    tracing::info!("teacher exits: the coordinator said stop");
    Ok(ExitCode::SUCCESS)
}
