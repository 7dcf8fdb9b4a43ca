//! This worker's Prometheus series (names, units and meanings in
//! `proto::metrics::CATALOG`). Everything a trainer exports per step comes from the
//! `WorkerReport` it sends the coordinator anyway, so the scrape and `status` agree.
//!
//! Without an installed exporter (tests, `--standalone` runs) the `metrics` facade
//! drops every sample, so callers never check whether one is serving.

use std::net::SocketAddr;

use proto::dataset::{SkipCounts, SkipReason};
use proto::metrics::{self as m, MetricsError, Role};
use proto::wire::{SkipCount, WorkerReport};

/// Serves `/metrics` on `listen` (`IP:port`, port 0 picks one) with this process's
/// `job`, `role` and `host` labels, and returns the address to report: the bound one,
/// with the host name in place of an unspecified IP (`0.0.0.0` in a pod).
pub fn serve(listen: &str, job: &str, role: Role, host: &str) -> Result<String, MetricsError> {
    let addr: SocketAddr = m::install_for(listen, job, role)?;
    Ok(if addr.ip().is_unspecified() {
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    })
}

/// Skip counts as the report carries them (non-zero reasons only) and as the
/// `declip_data_skips_total{reason}` counters (cumulative, so set absolutely).
pub fn skips(counts: &SkipCounts) -> Vec<SkipCount> {
    // Every reason, zeros included: a clean run still has the series.
    for reason in SkipReason::ALL {
        metrics::counter!(m::DATA_SKIPS_TOTAL, m::LABEL_REASON => reason.as_str())
            .absolute(counts.get(reason));
    }
    counts
        .iter()
        .map(|(reason, count)| SkipCount {
            reason: reason.as_str().to_string(),
            count,
        })
        .collect()
}

/// Bytes in use on `device`'s GPU, as the driver counts them (0 on CPU).
pub fn gpu_memory_bytes(device: tch::Device) -> u64 {
    match device {
        tch::Device::Cuda(_) => crate::comm::nccl::device_memory_used().unwrap_or(0) as u64,
        _ => 0,
    }
}

fn memory(gpu_bytes: u64) {
    if let Some(rss) = m::process_memory_bytes() {
        metrics::gauge!(m::PROCESS_MEMORY_BYTES).set(rss as f64);
    }
    metrics::gauge!(m::GPU_MEMORY_BYTES).set(gpu_bytes as f64);
}

/// A trainer's series in one generation (labels `rank` and `generation`).
pub struct TrainerSeries {
    labels: [(&'static str, String); 2],
    /// The process's cache hits and misses when the generation began.
    cache_base: (u64, u64),
}

impl TrainerSeries {
    /// Sets the generation and world size; counters start at 0 so their rates exist
    /// from the first scrape of the generation. `last`: the process's last report
    /// (its running cache totals are the generation's starting point).
    pub fn new(rank: usize, world: usize, generation: u64, last: &WorkerReport) -> Self {
        metrics::gauge!(m::GENERATION).set(generation as f64);
        metrics::gauge!(m::WORLD_SIZE).set(world as f64);
        let series = Self {
            labels: [
                (m::LABEL_RANK, rank.to_string()),
                (m::LABEL_GENERATION, generation.to_string()),
            ],
            cache_base: (last.cache_hits, last.cache_misses),
        };
        for name in [m::STEPS_TOTAL, m::CACHE_HITS_TOTAL, m::CACHE_MISSES_TOTAL] {
            metrics::counter!(name, &series.labels).absolute(0);
        }
        series
    }

    /// One completed step, as reported to the coordinator (`r.step_times` holds the
    /// parts; `r.cache_hits`/`r.cache_misses` are the process's running totals, of
    /// which this generation's series show the part since it began).
    pub fn step(&self, r: &WorkerReport) {
        let labels = &self.labels;
        metrics::counter!(m::STEPS_TOTAL, labels).increment(1);
        metrics::gauge!(m::STEP, labels).set(r.step as f64);
        metrics::gauge!(m::EPOCH, labels).set(r.epoch as f64);
        metrics::gauge!(m::LEARNING_RATE, labels).set(r.learning_rate);
        metrics::gauge!(m::IMAGES_PER_SECOND, labels).set(r.images_per_s);
        metrics::gauge!(m::COLLECTIVE_SEQUENCE, labels).set(r.collective_seq as f64);
        metrics::counter!(m::IMAGES_TOTAL).absolute(r.images_total);
        if let Some(l) = &r.losses {
            for (component, value) in m::LOSS_COMPONENTS
                .iter()
                .zip([l.content, l.context, l.total])
            {
                metrics::gauge!(m::LOSS, &self.with(m::LABEL_COMPONENT, component)).set(value);
            }
        }
        if let Some(t) = &r.step_times {
            metrics::histogram!(m::STEP_SECONDS, labels).record(t.total);
            let parts = [
                t.data_wait,
                t.forward,
                t.backward,
                t.all_reduce,
                t.optimizer,
            ];
            for (phase, seconds) in m::STEP_PHASES.iter().zip(parts) {
                metrics::histogram!(m::STEP_PHASE_SECONDS, &self.with(m::LABEL_PHASE, phase))
                    .record(seconds);
            }
        }
        metrics::histogram!(m::CACHE_WAIT_SECONDS, labels).record(r.cache_wait);
        let (hits_before, misses_before) = self.cache_base;
        metrics::counter!(m::CACHE_HITS_TOTAL, labels)
            .absolute(r.cache_hits.saturating_sub(hits_before));
        metrics::counter!(m::CACHE_MISSES_TOTAL, labels)
            .absolute(r.cache_misses.saturating_sub(misses_before));
        memory(r.gpu_memory_bytes);
    }

    /// The rank and generation labels plus `key = value`.
    fn with(&self, key: &'static str, value: &'static str) -> [(&'static str, String); 3] {
        let [rank, generation] = self.labels.clone();
        [rank, generation, (key, value.to_string())]
    }

    /// Rank 0 wrote (and the coordinator was asked to commit) a checkpoint.
    pub fn checkpoint(&self, seconds: f64) {
        metrics::histogram!(m::CHECKPOINT_SECONDS, &self.labels).record(seconds);
    }
}

/// Why a teacher gave up a shard (`reason` of `declip_teacher_shards_failed_total`).
#[derive(Clone, Copy, Debug)]
pub enum ShardGiveUp {
    /// The lease expired or moved to another teacher; the shard is theirs now.
    LeaseLost,
    /// Computing or writing failed (reported with FailShard).
    Error,
}

impl ShardGiveUp {
    const ALL: [ShardGiveUp; 2] = [ShardGiveUp::LeaseLost, ShardGiveUp::Error];

    fn label(self) -> &'static str {
        match self {
            ShardGiveUp::LeaseLost => "lease_lost",
            ShardGiveUp::Error => "error",
        }
    }
}

/// A teacher's series.
pub struct TeacherSeries;

impl TeacherSeries {
    /// Counters at 0, so their rates exist before the first shard.
    pub fn new() -> Self {
        metrics::counter!(m::TEACHER_SHARDS_DONE_TOTAL).absolute(0);
        metrics::counter!(m::TEACHER_WRITTEN_BYTES_TOTAL).absolute(0);
        metrics::counter!(m::IMAGES_TOTAL).absolute(0);
        for why in ShardGiveUp::ALL {
            metrics::counter!(m::TEACHER_SHARDS_FAILED_TOTAL, m::LABEL_REASON => why.label())
                .absolute(0);
        }
        metrics::gauge!(m::TEACHER_SHARDS_LEASED).set(0.0);
        TeacherSeries
    }

    pub fn leased(&self, shards: u32) {
        metrics::gauge!(m::TEACHER_SHARDS_LEASED).set(f64::from(shards));
    }

    /// Images computed so far (process total), images skipped, GPU memory in use.
    pub fn progress(&self, images_total: u64, skips: &SkipCounts, gpu_bytes: u64) {
        metrics::counter!(m::IMAGES_TOTAL).absolute(images_total);
        self::skips(skips);
        memory(gpu_bytes);
    }

    /// A shard's file is committed and reported: `bytes` written in `seconds`.
    pub fn shard_done(&self, bytes: u64, seconds: f64) {
        metrics::counter!(m::TEACHER_SHARDS_DONE_TOTAL).increment(1);
        metrics::counter!(m::TEACHER_WRITTEN_BYTES_TOTAL).increment(bytes);
        metrics::histogram!(m::TEACHER_SHARD_SECONDS).record(seconds);
    }

    pub fn shard_given_up(&self, why: ShardGiveUp) {
        metrics::counter!(m::TEACHER_SHARDS_FAILED_TOTAL, m::LABEL_REASON => why.label())
            .increment(1);
    }
}

impl Default for TeacherSeries {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::{Losses, StepTimes};

    fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_step_report_becomes_the_trainer_s_series() {
        let recorder = m::local_recorder(&[]);
        let handle = recorder.handle();
        let before = WorkerReport {
            cache_hits: 10,
            cache_misses: 4,
            ..Default::default()
        };
        let step = WorkerReport {
            step: 7,
            epoch: 1,
            learning_rate: 1e-3,
            losses: Some(Losses {
                content: 0.5,
                context: 0.25,
                total: 0.6,
            }),
            step_times: Some(StepTimes {
                data_wait: 0.01,
                forward: 0.1,
                backward: 0.2,
                all_reduce: 0.03,
                optimizer: 0.02,
                total: 0.36,
            }),
            cache_wait: 0.005,
            cache_hits: 16,
            cache_misses: 4,
            images_total: 28,
            ..Default::default()
        };
        metrics::with_local_recorder(&recorder, || {
            let series = TrainerSeries::new(1, 2, 3, &before);
            series.step(&step);
            series.checkpoint(0.8);
        });
        let text = handle.render();
        let rg = ["rank=\"1\"", "generation=\"3\""];
        assert_eq!(value(&text, m::STEPS_TOTAL, &rg), 1.0);
        assert_eq!(value(&text, "declip_step{", &rg), 7.0);
        assert_eq!(value(&text, m::WORLD_SIZE, &[]), 2.0);
        assert_eq!(value(&text, m::GENERATION, &[]), 3.0);
        let context = ["generation=\"3\"", "component=\"context\""];
        assert_eq!(value(&text, m::LOSS, &context), 0.25);
        let backward = ["phase=\"backward\"", "le=\"0.25\""];
        assert_eq!(
            value(&text, "declip_step_phase_seconds_bucket", &backward),
            1.0
        );
        let backward_below = ["phase=\"backward\"", "le=\"0.1\""];
        assert_eq!(
            value(&text, "declip_step_phase_seconds_bucket", &backward_below),
            0.0
        );
        // This generation's share of the process's running cache totals.
        assert_eq!(value(&text, m::CACHE_HITS_TOTAL, &rg), 6.0);
        assert_eq!(value(&text, m::CACHE_MISSES_TOTAL, &rg), 0.0);
        assert_eq!(value(&text, "declip_checkpoint_seconds_count", &rg), 1.0);
        assert_eq!(value(&text, m::IMAGES_TOTAL, &[]), 28.0);
    }

    #[test]
    fn a_teacher_counts_shards_bytes_and_give_ups_from_zero() {
        let recorder = m::local_recorder(&[]);
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let series = TeacherSeries::new();
            series.leased(1);
            series.shard_done(1000, 2.0);
            series.shard_done(500, 3.0);
            series.shard_given_up(ShardGiveUp::LeaseLost);
            series.progress(40, &SkipCounts::default(), 0);
        });
        let text = handle.render();
        assert_eq!(value(&text, m::TEACHER_SHARDS_DONE_TOTAL, &[]), 2.0);
        assert_eq!(value(&text, m::TEACHER_WRITTEN_BYTES_TOTAL, &[]), 1500.0);
        let lost = ["reason=\"lease_lost\""];
        assert_eq!(value(&text, m::TEACHER_SHARDS_FAILED_TOTAL, &lost), 1.0);
        let error = ["reason=\"error\""];
        assert_eq!(value(&text, m::TEACHER_SHARDS_FAILED_TOTAL, &error), 0.0);
        assert_eq!(value(&text, m::IMAGES_TOTAL, &[]), 40.0);
        let missing = ["reason=\"missing\""];
        assert_eq!(value(&text, m::DATA_SKIPS_TOTAL, &missing), 0.0);
    }
}
