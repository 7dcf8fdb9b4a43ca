//! A teacher under a coordinator (`worker teach --coordinator ADDR`): lease a shard,
//! compute its targets while renewing the lease, publish the cache file, complete the
//! lease with the file's checksum; repeat until the coordinator says stop. A lease lost
//! mid-shard (this process was too slow, the coordinator re-issued it) abandons the
//! shard: its temp file is removed and nothing visible is left.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::job::JobSpec;
use proto::wire::{
    acquire_shard_response, command, AcquireShardRequest, CompleteShardRequest, FailShardRequest,
    RenewLeaseRequest, ShardLease, WorkerReport, WorkerState,
};
use tch::Device;

use crate::control::{Control, ControlError, ControlEvent};
use crate::data::job_source::{job_source, JobSourceError};
use crate::data::source::ImageSource;
use crate::telemetry::{self, ShardGiveUp, TeacherSeries};

use super::cache::ShardWritten;
use super::models::TeacherModels;
use super::shard::write_shard;
use super::TeacherError;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Teacher(#[from] TeacherError),
    #[error(transparent)]
    Source(#[from] JobSourceError),
}

/// Leases and computes shards until the coordinator says stop.
pub fn run_teacher(control: &Control, spec: &JobSpec, device: Device) -> Result<(), PoolError> {
    let source = job_source(spec)?;
    let models = TeacherModels::new(spec, device)?;
    let dir = proto::cache::cache_dir(Path::new(&spec.job.run_dir));
    let mut images_total = 0u64;
    let teacher = Teacher {
        control,
        series: TeacherSeries::new(),
        source: &source,
        device,
    };
    loop {
        if stop_requested(control)? {
            return Ok(());
        }
        if crate::shutdown::requested() {
            // The drain was requested (`Control::poll_event`): no new shards, wait for Stop.
            teacher.publish(WorkerState::Idle, images_total, 0.0);
            if wait_or_stop(control, Duration::from_secs(2))? {
                return Ok(());
            }
            continue;
        }
        let request = AcquireShardRequest {
            worker_id: control.worker_id().to_string(),
        };
        let answer = control.call("AcquireShard", |mut c| {
            let request = request.clone();
            async move { c.acquire_shard(request).await }
        })?;
        match answer.outcome {
            Some(acquire_shard_response::Outcome::Lease(lease)) => {
                images_total += teach_shard(&teacher, spec, &models, &dir, &lease, images_total)?;
            }
            Some(acquire_shard_response::Outcome::RetryInMs(ms)) => {
                teacher.publish(WorkerState::Idle, images_total, 0.0);
                if wait_or_stop(control, Duration::from_millis(ms.clamp(50, 5000)))? {
                    return Ok(());
                }
            }
            // Everything is cached; stay for recomputations (a corrupt shard) until Stop.
            Some(acquire_shard_response::Outcome::AllDone(_)) | None => {
                teacher.publish(WorkerState::Idle, images_total, 0.0);
                if wait_or_stop(control, Duration::from_secs(2))? {
                    return Ok(());
                }
            }
        }
    }
}

/// What every shard of this process shares: where it reports, its series, its images.
struct Teacher<'a> {
    control: &'a Control,
    series: TeacherSeries,
    source: &'a dyn ImageSource,
    device: Device,
}

impl Teacher<'_> {
    /// The teacher's report (its shard is known to the coordinator from the lease) and
    /// the same facts on `/metrics`.
    fn publish(&self, state: WorkerState, images_total: u64, rate: f64) {
        let gpu = telemetry::gpu_memory_bytes(self.device);
        self.series
            .progress(images_total, &self.source.skip_counts(), gpu);
        self.control.report(WorkerReport {
            state: state as i32,
            images_total,
            images_per_s: rate,
            memory_bytes: crate::runtime::resident_bytes(),
            gpu_memory_bytes: gpu,
            ..Default::default()
        });
    }
}

/// One leased shard; returns the images computed (0 when the lease was lost).
fn teach_shard(
    teacher: &Teacher<'_>,
    spec: &JobSpec,
    models: &TeacherModels,
    dir: &Path,
    lease: &ShardLease,
    images_before: u64,
) -> Result<u64, PoolError> {
    teacher.series.leased(1);
    let result = compute_shard(teacher, spec, models, dir, lease, images_before);
    teacher.series.leased(0);
    match &result {
        Ok(0) => teacher.series.shard_given_up(ShardGiveUp::LeaseLost),
        Ok(_) => {}
        Err(_) => teacher.series.shard_given_up(ShardGiveUp::Error),
    }
    result
}

/// Computes, writes and completes one leased shard, renewing the lease meanwhile.
fn compute_shard(
    teacher: &Teacher<'_>,
    spec: &JobSpec,
    models: &TeacherModels,
    dir: &Path,
    lease: &ShardLease,
    images_before: u64,
) -> Result<u64, PoolError> {
    let (control, source) = (teacher.control, teacher.source);
    let started = Instant::now();
    let renew_every =
        Duration::from_millis(lease.expires_in_ms / 3).max(Duration::from_millis(100));
    let mut last_renewal = Instant::now();
    let worker_id = control.worker_id().to_string();
    teacher.publish(WorkerState::Teaching, images_before, 0.0);
    let range = lease.first_image as u32..(lease.first_image as u32 + lease.image_count);
    let mut progress = |done: u32| -> bool {
        if crate::shutdown::requested() {
            return false;
        }
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        teacher.publish(WorkerState::Teaching, images_before + done as u64, rate);
        if last_renewal.elapsed() < renew_every {
            return true;
        }
        last_renewal = Instant::now();
        let request = RenewLeaseRequest {
            worker_id: worker_id.clone(),
            shard: lease.shard,
            lease_id: lease.lease_id,
            images_done: done,
        };
        match control.call("RenewLease", |mut c| {
            let request = request.clone();
            async move { c.renew_lease(request).await }
        }) {
            Ok(answer) if answer.ok => true,
            Ok(_) => false,
            Err(err) => {
                tracing::warn!("renewing the lease of shard {}: {err}", lease.shard);
                false
            }
        }
    };
    let written = write_shard(spec, models, source, lease.shard, range, dir, &mut progress);
    match written {
        Ok(ShardWritten {
            file,
            checksum,
            bytes,
            images,
            ..
        }) => {
            let request = CompleteShardRequest {
                worker_id,
                shard: lease.shard,
                lease_id: lease.lease_id,
                file: file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                checksum,
                bytes,
                images,
            };
            let answer = control.call("CompleteShard", |mut c| {
                let request = request.clone();
                async move { c.complete_shard(request).await }
            })?;
            teacher
                .series
                .shard_done(bytes, started.elapsed().as_secs_f64());
            tracing::info!(
                "shard {} done: {images} images, {bytes} bytes in {:.1} s{}",
                lease.shard,
                started.elapsed().as_secs_f64(),
                if answer.accepted {
                    ""
                } else {
                    " (not accepted: the lease had moved on)"
                }
            );
            Ok(images as u64)
        }
        Err(TeacherError::Abandoned { shard }) if crate::shutdown::requested() => {
            // Told to stop: give the lease back so another teacher (or this job resumed)
            // takes the shard at once instead of after the lease expires.
            tracing::warn!("told to stop: giving back the lease of shard {shard}");
            let request = FailShardRequest {
                worker_id,
                shard,
                lease_id: lease.lease_id,
                reason: "the teacher was told to stop (SIGTERM or Ctrl-C)".into(),
            };
            if let Err(err) = control.call("FailShard", |mut c| {
                let request = request.clone();
                async move { c.fail_shard(request).await }
            }) {
                tracing::warn!("giving back the lease of shard {shard}: {err}");
            }
            Ok(0)
        }
        Err(TeacherError::Abandoned { shard }) => {
            tracing::warn!("lease of shard {shard} lost; abandoned it (another teacher has it)");
            Ok(0)
        }
        Err(err) => {
            let request = FailShardRequest {
                worker_id,
                shard: lease.shard,
                lease_id: lease.lease_id,
                reason: err.to_string(),
            };
            let _ = control.call("FailShard", |mut c| {
                let request = request.clone();
                async move { c.fail_shard(request).await }
            });
            Err(err.into())
        }
    }
}

fn stop_requested(control: &Control) -> Result<bool, PoolError> {
    while let Some(event) = control.poll_event() {
        match event {
            ControlEvent::Command(command::Kind::Stop(_)) => return Ok(true),
            ControlEvent::Lost(err) => return Err(err.into()),
            ControlEvent::Command(_) => {}
        }
    }
    Ok(false)
}

/// Waits up to `pause` for a Stop; true when one came.
fn wait_or_stop(control: &Control, pause: Duration) -> Result<bool, PoolError> {
    match control.next_event(pause) {
        Some(ControlEvent::Command(command::Kind::Stop(_))) => Ok(true),
        Some(ControlEvent::Lost(err)) => Err(err.into()),
        _ => Ok(false),
    }
}
