//! The driver of one generation under a coordinator: the step's peers are the
//! generation's collective; checkpoints, drains, aborts and stops are the coordinator's
//! commands, applied between steps; every step is reported to it; rank 0's checkpoints
//! are committed through it.

use std::time::Duration;

use proto::wire::{
    self, command, CheckpointRef, CommitCheckpointRequest, WorkerReport, WorkerState,
};
use tch::Device;

use super::remote_cache::RemoteCache;
use crate::comm::Collective;
use crate::control::{Control, ControlError, ControlEvent};
use crate::data::loader::SharedSource;
use crate::telemetry::{self, TrainerSeries};
use crate::train::artifacts::WrittenCheckpoint;
use crate::train::cache_gate::{CacheGate, CacheLookups};
use crate::train::checkpoint;
use crate::train::driver::{Driver, LoopEnd, Placement, StepRecord};
use crate::train::error::RunError;

/// One generation's driver.
pub struct Coordinated<'a> {
    control: &'a Control,
    generation: u64,
    placement: Placement,
    comm: Box<dyn Collective>,
    gate: RemoteCache<'a>,
    /// Commands received and not yet applied.
    pending: Pending,
    series: TrainerSeries,
    /// Process totals: they continue across generations, as the coordinator sums them.
    images_total: u64,
    cache: CacheLookups,
    /// For the skip counts in each report.
    source: SharedSource,
    device: Device,
}

/// Commands that arrived during a generation, applied between steps.
#[derive(Default)]
struct Pending {
    checkpoint_at: Option<u64>,
    drain_at: Option<u64>,
    end: Option<LoopEnd>,
}

impl<'a> Coordinated<'a> {
    /// The driver of `generation` with this process at `placement`, stepping over `comm`.
    pub fn new(
        control: &'a Control,
        generation: u64,
        placement: Placement,
        comm: Box<dyn Collective>,
        source: SharedSource,
        device: Device,
    ) -> Self {
        let last = control.last_report();
        Self {
            control,
            generation,
            placement,
            comm,
            gate: RemoteCache {
                control,
                generation,
            },
            pending: Pending::default(),
            series: TrainerSeries::new(placement.rank, placement.world, generation, &last),
            images_total: last.images_total,
            cache: CacheLookups {
                hits: last.cache_hits,
                misses: last.cache_misses,
            },
            source,
            device,
        }
    }

    fn poll_commands(&mut self) -> Result<(), RunError> {
        let generation = self.generation;
        while let Some(event) = self.control.poll_event() {
            match event {
                ControlEvent::Command(command::Kind::Checkpoint(c))
                    if c.generation == generation =>
                {
                    self.pending.checkpoint_at = Some(c.step);
                }
                ControlEvent::Command(command::Kind::Drain(d)) if d.generation == generation => {
                    self.pending.drain_at = Some(d.stop_step);
                }
                ControlEvent::Command(command::Kind::Abort(a)) if a.generation == generation => {
                    self.pending.end = Some(LoopEnd::Aborted(a.reason));
                }
                ControlEvent::Command(command::Kind::Stop(s)) => {
                    tracing::info!("coordinator says stop: {}", s.reason);
                    self.pending.end = Some(LoopEnd::Stopped);
                }
                ControlEvent::Command(other) => tracing::debug!("ignoring stale {other:?}"),
                ControlEvent::Lost(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// After DONE or DRAINED: the coordinator either stops us (`end`) or, if it lost a
    /// member before it could finish the job, aborts the generation so we rejoin.
    fn wait_for_stop(&self, end: LoopEnd) -> LoopEnd {
        loop {
            match self.control.next_event(Duration::from_secs(60)) {
                Some(ControlEvent::Command(command::Kind::Stop(_)))
                | Some(ControlEvent::Lost(_)) => return end,
                Some(ControlEvent::Command(command::Kind::Abort(a)))
                    if a.generation == self.generation =>
                {
                    return LoopEnd::Aborted(a.reason)
                }
                _ => {}
            }
        }
    }

    /// Asks the coordinator to commit `w`; a refusal because the generation is over
    /// ends this generation.
    fn commit(&self, w: &WrittenCheckpoint) -> Result<(), RunError> {
        let request = CommitCheckpointRequest {
            worker_id: self.control.worker_id(),
            generation: self.generation,
            checkpoint: Some(CheckpointRef {
                step: w.step,
                path: w.dir.display().to_string(),
                checksum: checkpoint::state_checksum(&w.dir)?,
                epoch: w.cursor.epoch as u64,
                epoch_step: w.cursor.step,
            }),
        };
        let answer = match self.control.call("CommitCheckpoint", |mut c| {
            let request = request.clone();
            async move { c.commit_checkpoint(request).await }
        }) {
            Ok(answer) => answer,
            Err(ControlError::Refused { status, .. })
                if status.code() == tonic::Code::FailedPrecondition =>
            {
                return Err(RunError::GenerationOver {
                    generation: self.generation,
                    reason: status.message().to_string(),
                })
            }
            Err(err) => return Err(err.into()),
        };
        if !answer.accepted {
            tracing::warn!("coordinator did not accept checkpoint {}", w.dir.display());
        }
        Ok(())
    }
}

impl Driver for Coordinated<'_> {
    fn placement(&self) -> Placement {
        self.placement
    }

    fn peers(&mut self) -> Option<&mut dyn Collective> {
        Some(self.comm.as_mut())
    }

    fn cache_gate(&mut self) -> &mut dyn CacheGate {
        &mut self.gate
    }

    fn interrupt(&mut self) -> Result<Option<LoopEnd>, RunError> {
        self.poll_commands()?;
        Ok(self.pending.end.take())
    }

    fn stepped(&mut self, r: &StepRecord<'_>) -> Result<(), RunError> {
        self.images_total += r.rank_images;
        self.cache += r.cache;
        let report = step_report(r, self);
        self.series.step(&report);
        self.control.report(report);
        Ok(())
    }

    fn checkpoint_due(&mut self, step: u64) -> bool {
        let due = self.pending.checkpoint_at.is_some_and(|at| step >= at);
        if due {
            self.pending.checkpoint_at = None;
        }
        due
    }

    fn drain_due(&mut self, step: u64) -> bool {
        self.pending.drain_at.is_some_and(|at| step >= at)
    }

    fn checkpoint_started(&mut self, step: u64) {
        report_state(
            self.control,
            WorkerState::Checkpointing,
            self.generation,
            Some(step),
        );
    }

    fn checkpoint_written(&mut self, written: &WrittenCheckpoint) -> Result<(), RunError> {
        self.commit(written)?;
        self.series.checkpoint(written.seconds);
        Ok(())
    }

    fn finish(&mut self, end: LoopEnd, step: u64) -> Result<LoopEnd, RunError> {
        let state = match end {
            LoopEnd::Completed => WorkerState::Done,
            LoopEnd::Drained => WorkerState::Drained,
            LoopEnd::Stopped | LoopEnd::Aborted(_) => return Ok(end),
        };
        report_state(self.control, state, self.generation, Some(step));
        Ok(self.wait_for_stop(end))
    }

    fn log_prefix(&self) -> String {
        format!("gen {} rank {}: ", self.generation, self.placement.rank)
    }
}

/// Publishes this worker's `state` in `generation` (at `step`, when given).
pub fn report_state(control: &Control, state: WorkerState, generation: u64, step: Option<u64>) {
    let mut report = control.last_report();
    report.state = state as i32;
    report.generation = generation;
    if let Some(step) = step {
        report.step = step;
    }
    if state != WorkerState::Joining {
        report.nccl_unique_id.clear();
    }
    control.report(report);
}

/// The report of a completed step: for the coordinator and, through
/// [`TrainerSeries::step`], for this process's `/metrics`.
fn step_report(r: &StepRecord<'_>, d: &Coordinated<'_>) -> WorkerReport {
    let l = r.losses;
    WorkerReport {
        worker_id: String::new(),
        state: WorkerState::Training as i32,
        generation: d.generation,
        step: r.step,
        epoch: r.cursor.epoch as u64,
        losses: Some(wire::Losses {
            content: l.content,
            context: l.context,
            total: l.total,
        }),
        images_per_s: r.rank_images as f64 / r.seconds.max(1e-9),
        step_times: Some(wire::StepTimes {
            data_wait: r.data_wait,
            forward: l.forward_s,
            backward: l.backward_s,
            all_reduce: l.all_reduce_s,
            optimizer: l.optimizer_s,
            total: r.seconds,
        }),
        collective_seq: r.collective_seq,
        memory_bytes: crate::runtime::resident_bytes(),
        gpu_memory_bytes: telemetry::gpu_memory_bytes(d.device),
        images_total: d.images_total,
        learning_rate: l.lr,
        skips: telemetry::skips(&d.source.skip_counts()),
        cache_wait: r.cache_wait,
        cache_hits: d.cache.hits,
        cache_misses: d.cache.misses,
        ..Default::default()
    }
}
