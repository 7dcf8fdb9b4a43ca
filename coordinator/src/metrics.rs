//! What the coordinator exports to Prometheus (names and meanings in
//! `proto::metrics::CATALOG`):
//! - [`Metrics`]: refused RPCs by reason, counted once per refusal by the service and
//!   the auth layer (and kept here for `status` and the tests);
//! - [`generation_aborted`] and [`checkpoint_committed`]: called by the service for the
//!   live decisions the state hands out ([`crate::state::Decision`]), once each; a
//!   journal replay (`--resume`) counts nothing;
//! - [`export_status`]: every job-level and per-rank series, from the `JobStatus` the
//!   coordinator publishes anyway, refreshed by [`export_forever`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use proto::metrics::{self as m, LABEL_POOL, LABEL_REASON, LABEL_STATE};
use proto::wire::{JobStatus, WorkerState};
use tokio::sync::watch;

use crate::auth::refusal::AuthRefusal;
use crate::state::lost::LostReason;

/// Refused RPCs and reports by reason (`unauthenticated_missing_token`,
/// `rank_outside_world`, ...).
#[derive(Debug, Default)]
pub struct Metrics {
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one refusal for `reason` (a stable snake_case label).
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut map) = self.rejected.lock() {
            *map.entry(reason).or_default() += 1;
        }
        metrics::counter!(m::RPC_REJECTED_TOTAL, LABEL_REASON => reason).increment(1);
    }

    /// Refusals counted for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .map(|m| m.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every reason with its count.
    pub fn rejected_all(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Reasons of a refused call by the token check ([`AuthRefusal`]), exported from 0 so
/// that a rate over them has data before the first refusal.
pub const AUTH_REASONS: [&str; 3] = [
    AuthRefusal::ALL[0].label(),
    AuthRefusal::ALL[1].label(),
    AuthRefusal::ALL[2].label(),
];

/// Values of the `reason` label of [`m::GENERATION_ABORTS_TOTAL`] ([`LostReason::label`]).
pub const ABORT_REASONS: [&str; 3] = LostReason::LABELS;

/// One generation aborted because a member was lost for `lost`, counted under
/// [`LostReason::label`].
pub fn generation_aborted(lost: &LostReason) {
    metrics::counter!(m::GENERATION_ABORTS_TOTAL, LABEL_REASON => lost.label()).increment(1);
}

/// One checkpoint committed.
pub fn checkpoint_committed() {
    metrics::counter!(m::CHECKPOINT_COMMITS_TOTAL).increment(1);
}

/// One worker process restarted by `coordinator launch` (`pool`: trainer or teacher).
pub fn worker_restarted(pool: &'static str) {
    metrics::counter!(m::RESTARTS_TOTAL, LABEL_POOL => pool).increment(1);
}

/// Every counter the coordinator may never move in a healthy run, at 0, so dashboards
/// and alerts over their rates have a series to evaluate from the first scrape.
pub fn export_zeros() {
    for pool in ["trainer", "teacher"] {
        metrics::counter!(m::RESTARTS_TOTAL, LABEL_POOL => pool).absolute(0);
    }
    for reason in ABORT_REASONS {
        metrics::counter!(m::GENERATION_ABORTS_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    for reason in AUTH_REASONS {
        metrics::counter!(m::RPC_REJECTED_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    metrics::counter!(m::CHECKPOINT_COMMITS_TOTAL).absolute(0);
}

/// The states [`m::WORKERS`] counts workers in (lower-case `WorkerState` names).
const WORKER_STATES: [WorkerState; 9] = [
    WorkerState::Idle,
    WorkerState::Joining,
    WorkerState::Training,
    WorkerState::Checkpointing,
    WorkerState::WaitingForCache,
    WorkerState::Teaching,
    WorkerState::Drained,
    WorkerState::Done,
    WorkerState::Failed,
];

fn state_label(state: WorkerState) -> String {
    state
        .as_str_name()
        .trim_start_matches("WORKER_STATE_")
        .to_ascii_lowercase()
}

/// Sets every series derived from `status`: the job and rank series
/// ([`m::export_job_status`]), workers by pool and state, and this process's memory.
pub fn export_status(status: &JobStatus) {
    m::export_job_status(status);
    let trainers = status.ranks.iter().map(|r| r.state);
    let teachers = status.teachers.iter().map(|t| t.state);
    export_workers("trainer", trainers);
    export_workers("teacher", teachers);
    if let Some(rss) = m::process_memory_bytes() {
        metrics::gauge!(m::PROCESS_MEMORY_BYTES).set(rss as f64);
    }
}

fn export_workers(pool: &'static str, states: impl Iterator<Item = i32>) {
    let mut counts = [0u32; WORKER_STATES.len()];
    for state in states {
        if let Some(i) = WORKER_STATES.iter().position(|s| *s as i32 == state) {
            counts[i] += 1;
        }
    }
    for (state, count) in WORKER_STATES.iter().zip(counts) {
        metrics::gauge!(m::WORKERS, LABEL_POOL => pool, LABEL_STATE => state_label(*state))
            .set(f64::from(count));
    }
}

/// How often the scrape's view of the status is refreshed (heartbeat ages move
/// between decisions; the status channel only changes on decisions and ticks).
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Exports the published status every `EXPORT_EVERY` (1 s) until the channel closes.
pub async fn export_forever(mut status: watch::Receiver<JobStatus>) {
    export_zeros();
    loop {
        export_status(&status.borrow_and_update());
        // A change or a second without one: export again; a closed channel: stop.
        if let Ok(Err(_)) = tokio::time::timeout(EXPORT_EVERY, status.changed()).await {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::metrics::local_recorder;
    use proto::wire::{RankStatus, TeacherStatus};

    #[test]
    fn counts_by_reason() {
        let m = Metrics::default();
        m.reject("a");
        m.reject("a");
        m.reject("b");
        assert_eq!(m.rejected("a"), 2);
        assert_eq!(m.rejected("b"), 1);
        assert_eq!(m.rejected("c"), 0);
        assert_eq!(m.rejected_all().len(), 2);
    }

    #[test]
    fn lost_members_are_labelled_by_why_the_generation_ended() {
        assert_eq!(LostReason::HeartbeatTimeout.label(), "hang");
        let failed = LostReason::ReportedFailure("ring peer 1 closed".into());
        assert_eq!(failed.label(), "error");
        assert_eq!(LostReason::BackToIdle.label(), "error");
        assert_eq!(LostReason::StreamClosed.label(), "lost_member");
    }

    /// The value of the first exposition line of `text` that starts with `prefix`.
    pub(crate) fn value(text: &str, prefix: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_scrape_counts_refusals_aborts_and_workers_by_state() {
        let recorder = local_recorder(&[]);
        let handle = recorder.handle();
        let status = JobStatus {
            ranks: vec![
                RankStatus {
                    state: WorkerState::Training as i32,
                    ..Default::default()
                },
                RankStatus {
                    state: WorkerState::WaitingForCache as i32,
                    ..Default::default()
                },
            ],
            teachers: vec![TeacherStatus {
                state: WorkerState::Teaching as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        metrics::with_local_recorder(&recorder, || {
            export_zeros();
            Metrics::default().reject("unauthenticated_wrong_token");
            generation_aborted(&LostReason::HeartbeatTimeout);
            generation_aborted(&LostReason::HeartbeatTimeout);
            export_status(&status);
        });
        let text = handle.render();
        let rejected = "declip_rpc_rejected_total{reason=\"unauthenticated_wrong_token\"}";
        assert_eq!(value(&text, rejected), 1.0);
        let missing = "declip_rpc_rejected_total{reason=\"unauthenticated_missing_token\"}";
        assert_eq!(value(&text, missing), 0.0);
        let hang = "declip_generation_aborts_total{reason=\"hang\"}";
        assert_eq!(value(&text, hang), 2.0);
        let restarts = "declip_restarts_total{pool=\"teacher\"}";
        assert_eq!(value(&text, restarts), 0.0);
        let training = "declip_workers{pool=\"trainer\",state=\"training\"}";
        assert_eq!(value(&text, training), 1.0);
        let waiting = "declip_workers{pool=\"trainer\",state=\"waiting_for_cache\"}";
        assert_eq!(value(&text, waiting), 1.0);
        let idle = "declip_workers{pool=\"teacher\",state=\"idle\"}";
        assert_eq!(value(&text, idle), 0.0);
        let teaching = "declip_workers{pool=\"teacher\",state=\"teaching\"}";
        assert_eq!(value(&text, teaching), 1.0);
    }
}
