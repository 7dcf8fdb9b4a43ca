//! The gRPC service: a thin layer that turns calls into [`JobState`] decisions under one
//! lock, sends the resulting commands down the workers' Attach streams, and publishes
//! the job status after every change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::wire::coordinator_server::Coordinator;
use proto::wire::{
    acquire_shard_response, AcquireShardRequest, AcquireShardResponse, Command,
    CommitCheckpointRequest, CommitCheckpointResponse, CompleteShardRequest, CompleteShardResponse,
    FailShardRequest, FailShardResponse, JobPhase, JobStatus, RegisterRequest, RegisterResponse,
    RenewLeaseRequest, RenewLeaseResponse, ReportCorruptShardRequest, ReportCorruptShardResponse,
    RequestDrainRequest, RequestDrainResponse, ShardStatusRequest, ShardStatusResponse,
    StatusRequest, WorkerReport,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{UnboundedReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{self, Metrics};
use crate::state::teachers::Acquired;
use crate::state::{Decision, JobState, Outgoing, StateError};

type CommandTx = mpsc::UnboundedSender<Result<Command, Status>>;

struct Inner {
    state: JobState,
    /// The open command stream of each attached worker, with its session number.
    streams: HashMap<String, (u64, CommandTx)>,
}

/// The state, its command streams and its published status: shared by the service,
/// the heartbeat ticker and [`crate::Running`].
pub struct Core {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    status: watch::Sender<JobStatus>,
}

impl Core {
    pub fn new(state: JobState, metrics: Arc<Metrics>) -> Arc<Self> {
        let status = watch::Sender::new(state.status(Instant::now()));
        Arc::new(Self {
            inner: Mutex::new(Inner {
                state,
                streams: HashMap::new(),
            }),
            metrics,
            status,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.status.subscribe()
    }

    /// Runs one decision under the lock: sends its commands, counts what it decided
    /// ([`count_decisions`]), publishes the status, and turns a refusal into a counted,
    /// logged status code.
    fn decide<T>(
        &self,
        peer: Option<SocketAddr>,
        what: &str,
        f: impl FnOnce(&mut Inner, Instant) -> Result<(T, Vec<Outgoing>), StateError>,
    ) -> Result<T, Status> {
        let now = Instant::now();
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Status::internal("coordinator state lock poisoned"))?;
        let result = f(&mut inner, now);
        let result = match result {
            Ok((value, out)) => {
                dispatch(&mut inner.streams, out);
                Ok(value)
            }
            Err(StateError::Refused(refusal)) => {
                self.metrics.reject(refusal.reason);
                let peer = peer.map_or_else(|| "unknown".into(), |p| p.to_string());
                tracing::warn!(%peer, reason = refusal.reason, "refused {what}: {refusal}");
                Err(refusal.to_status())
            }
            Err(StateError::Journal(err)) => {
                // The coordinator can no longer keep its promises: fail the job.
                tracing::error!("journal write failed, failing the job: {err}");
                let out = inner.state.fail_unjournaled(&format!("journal: {err}"));
                dispatch(&mut inner.streams, out);
                Err(Status::internal(format!("journal: {err}")))
            }
        };
        // Also after an error: what was journaled before it stands.
        count_decisions(inner.state.take_decisions());
        self.status.send_replace(inner.state.status(now));
        result
    }

    fn decide_out(
        &self,
        peer: Option<SocketAddr>,
        what: &str,
        f: impl FnOnce(&mut JobState, Instant) -> Result<Vec<Outgoing>, StateError>,
    ) -> Result<(), Status> {
        self.decide(peer, what, |inner, now| Ok(((), f(&mut inner.state, now)?)))
    }

    /// Heartbeats, lease expiry, world formation; refreshes the status (heartbeat ages).
    pub fn tick(&self) {
        let _ = self.decide_out(None, "tick", |s, now| s.tick(now));
    }

    /// Ctrl-C / SIGTERM: a coordinated stop.
    pub fn drain(&self, reason: &str) {
        let _ = self.decide_out(None, "drain", |s, _| s.drain(reason));
    }

    fn attach(
        &self,
        peer: Option<SocketAddr>,
        worker_id: &str,
        tx: CommandTx,
    ) -> Result<u64, Status> {
        self.decide(peer, "attach", |inner, now| {
            let session = inner.state.attach(worker_id, now)?;
            // Replacing the sender ends the previous stream of this worker.
            inner.streams.insert(worker_id.to_string(), (session, tx));
            Ok((session, Vec::new()))
        })
    }

    fn report(
        &self,
        peer: Option<SocketAddr>,
        worker_id: &str,
        session: u64,
        report: WorkerReport,
    ) -> Result<(), Status> {
        self.decide_out(peer, "report", |s, now| {
            s.report(worker_id, session, report, now)
        })
    }

    fn detach(&self, worker_id: &str, session: u64) {
        let _ = self.decide(None, "detach", |inner, now| {
            let out = inner.state.detach(worker_id, session, now)?;
            if inner
                .streams
                .get(worker_id)
                .is_some_and(|(s, _)| *s == session)
            {
                inner.streams.remove(worker_id);
            }
            Ok(((), out))
        });
    }
}

/// Counts the decisions the state took live, once each. A journal replay hands out
/// none, so `--resume` recounts nothing.
fn count_decisions(decisions: Vec<Decision>) {
    for decision in decisions {
        match decision {
            Decision::GenerationAborted(reason) => metrics::generation_aborted(&reason),
            Decision::CheckpointCommitted { .. } => metrics::checkpoint_committed(),
        }
    }
}

fn dispatch(streams: &mut HashMap<String, (u64, CommandTx)>, out: Vec<Outgoing>) {
    for o in out {
        match o {
            Outgoing::Send(id, cmd) => match streams.get(&id) {
                Some((_, tx)) => {
                    let _ = tx.send(Ok(cmd));
                }
                None => tracing::debug!("{id} has no stream; command dropped"),
            },
            Outgoing::Close(id) => {
                streams.remove(&id);
            }
        }
    }
}

/// The tonic service over a shared [`Core`].
pub struct Service {
    core: Arc<Core>,
}

impl Service {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often the coordinator checks heartbeats and leases.
pub fn tick_interval(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        self.core
            .decide(peer, "register", |inner, now| {
                Ok((inner.state.register(&req, now)?, Vec::new()))
            })
            .map(Response::new)
    }

    type AttachStream = BoxStream<Command>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerReport>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first report"))?;
        let worker_id = first.worker_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        // The reader keeps only a weak sender: dropping the registered one (Close, or a
        // newer stream of the same worker) must end the command stream.
        let weak = tx.downgrade();
        let session = self.core.attach(peer, &worker_id, tx)?;
        let core = self.core.clone();
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(report) = next.take() {
                if let Err(status) = core.report(peer, &worker_id, session, report) {
                    // A refused report ends the stream with its status code.
                    if let Some(tx) = weak.upgrade() {
                        let _ = tx.send(Err(status));
                    }
                    break;
                }
                next = inbound.message().await.ok().flatten();
            }
            core.detach(&worker_id, session);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn acquire_shard(
        &self,
        request: Request<AcquireShardRequest>,
    ) -> Result<Response<AcquireShardResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let got = self.core.decide(peer, "acquire_shard", |inner, now| {
            Ok((inner.state.acquire_shard(&req.worker_id, now)?, Vec::new()))
        })?;
        let outcome = match got {
            Acquired::Lease(l) => acquire_shard_response::Outcome::Lease(l),
            Acquired::RetryInMs(ms) => acquire_shard_response::Outcome::RetryInMs(ms),
            Acquired::AllDone => acquire_shard_response::Outcome::AllDone(true),
        };
        Ok(Response::new(AcquireShardResponse {
            outcome: Some(outcome),
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let renewed = self.core.decide(peer, "renew_lease", |inner, now| {
            let d =
                inner
                    .state
                    .renew_lease(&r.worker_id, r.shard, r.lease_id, r.images_done, now)?;
            Ok((d, Vec::new()))
        })?;
        Ok(Response::new(RenewLeaseResponse {
            ok: renewed.is_some(),
            expires_in_ms: renewed.map_or(0, |d| d.as_millis() as u64),
        }))
    }

    async fn complete_shard(
        &self,
        request: Request<CompleteShardRequest>,
    ) -> Result<Response<CompleteShardResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        self.core.decide(peer, "complete_shard", |inner, now| {
            Ok((inner.state.complete_shard(&r, now)?, Vec::new()))
        })?;
        Ok(Response::new(CompleteShardResponse { accepted: true }))
    }

    async fn fail_shard(
        &self,
        request: Request<FailShardRequest>,
    ) -> Result<Response<FailShardResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        self.core.decide(peer, "fail_shard", |inner, now| {
            let v = inner
                .state
                .fail_shard(&r.worker_id, r.shard, r.lease_id, &r.reason, now)?;
            Ok((v, Vec::new()))
        })?;
        Ok(Response::new(FailShardResponse {}))
    }

    async fn shard_status(
        &self,
        request: Request<ShardStatusRequest>,
    ) -> Result<Response<ShardStatusResponse>, Status> {
        let shard = request.into_inner().shard;
        let inner = self
            .core
            .inner
            .lock()
            .map_err(|_| Status::internal("coordinator state lock poisoned"))?;
        let Some((state, done)) = inner.state.teachers().state(shard) else {
            self.core.metrics.reject("no_such_shard");
            return Err(Status::invalid_argument(format!(
                "shard {shard} does not exist"
            )));
        };
        Ok(Response::new(ShardStatusResponse {
            state: state as i32,
            file: done.map_or(String::new(), |d| d.file.clone()),
            checksum: done.map_or(String::new(), |d| d.checksum.clone()),
            bytes: done.map_or(0, |d| d.bytes),
        }))
    }

    async fn report_corrupt_shard(
        &self,
        request: Request<ReportCorruptShardRequest>,
    ) -> Result<Response<ReportCorruptShardResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let requeued = self.core.decide(peer, "report_corrupt_shard", |inner, _| {
            let v =
                inner
                    .state
                    .report_corrupt_shard(&r.worker_id, r.shard, &r.checksum, &r.reason)?;
            Ok((v, Vec::new()))
        })?;
        Ok(Response::new(ReportCorruptShardResponse { requeued }))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<CommitCheckpointRequest>,
    ) -> Result<Response<CommitCheckpointResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        self.core
            .decide_out(peer, "commit_checkpoint", |s, _| s.commit_checkpoint(&r))?;
        Ok(Response::new(CommitCheckpointResponse { accepted: true }))
    }

    async fn request_drain(
        &self,
        request: Request<RequestDrainRequest>,
    ) -> Result<Response<RequestDrainResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let (phase, stop_step) = self.core.decide(peer, "request_drain", |inner, _| {
            let (out, phase, stop_step) = inner.state.request_drain(&r.worker_id, &r.reason)?;
            Ok(((phase, stop_step), out))
        })?;
        Ok(Response::new(RequestDrainResponse {
            phase: phase as i32,
            stop_step,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        let mut status = self.core.status.borrow().clone();
        refresh_ages(&self.core, &mut status);
        Ok(Response::new(status))
    }

    type WatchStatusStream = BoxStream<JobStatus>;

    async fn watch_status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let stream = WatchStream::new(self.core.subscribe()).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The published status is as old as the last change; recompute it for a direct query.
fn refresh_ages(core: &Core, status: &mut JobStatus) {
    if let Ok(inner) = core.inner.lock() {
        *status = inner.state.status(Instant::now());
    }
}

/// Whether `phase` is one the job never leaves.
pub fn is_terminal(phase: i32) -> bool {
    [JobPhase::Completed, JobPhase::Stopped, JobPhase::Failed]
        .iter()
        .any(|p| *p as i32 == phase)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::metrics::tests::value;
    use crate::state::JobConfig;
    use proto::metrics::local_recorder;
    use proto::wire::{CheckpointRef, Role, WorkerState};

    fn config() -> JobConfig {
        let spec = proto::job::load(
            &proto::job::DEMO_CONFIG,
            std::iter::empty::<(String, String)>(),
            &[
                "trainers.min=1".to_string(),
                "trainers.max=1".to_string(),
                "checkpoint.every_steps=4".to_string(),
                "train.max_steps=10".to_string(),
            ],
        )
        .unwrap()
        .spec;
        JobConfig::from_spec(&spec, 96).unwrap()
    }

    fn report(id: &str, state: WorkerState, generation: u64, step: u64) -> WorkerReport {
        WorkerReport {
            worker_id: id.into(),
            state: state as i32,
            generation,
            step,
            ..Default::default()
        }
    }

    /// A trainer that forms generation 1, commits step 4, then is lost: one commit and
    /// one abort, counted by the service that took them.
    fn run_live(core: &Core) {
        let req = RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            role: Role::Trainer as i32,
            host: "h".into(),
            devices: vec!["cpu".into()],
            rank_hint: -1,
            ..Default::default()
        };
        let id = core
            .decide(None, "register", |inner, now| {
                Ok((inner.state.register(&req, now)?, Vec::new()))
            })
            .unwrap()
            .worker_id;
        let (tx, _rx) = mpsc::unbounded_channel();
        let session = core.attach(None, &id, tx).unwrap();
        core.report(None, &id, session, report(&id, WorkerState::Idle, 0, 0))
            .unwrap();
        core.report(None, &id, session, report(&id, WorkerState::Training, 1, 4))
            .unwrap();
        let commit = CommitCheckpointRequest {
            worker_id: id.clone(),
            generation: 1,
            checkpoint: Some(CheckpointRef {
                step: 4,
                path: "checkpoints/step-4".into(),
                checksum: "c".repeat(64),
                epoch: 0,
                epoch_step: 4,
            }),
        };
        core.decide_out(None, "commit_checkpoint", |s, _| {
            s.commit_checkpoint(&commit)
        })
        .unwrap();
        core.detach(&id, session);
    }

    const COMMITS: &str = "declip_checkpoint_commits_total ";
    const LOST_MEMBER: &str = "declip_generation_aborts_total{reason=\"lost_member\"}";

    #[test]
    fn live_decisions_are_counted_once_and_a_resume_replay_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = local_recorder(&[]);
        let handle = recorder.handle();
        let cfg = config();
        let metrics = Arc::new(Metrics::default());

        let (journal, _) = Journal::open(dir.path(), false).unwrap();
        let live = JobState::new(cfg.clone(), Some(journal), Instant::now()).unwrap();
        let core = Core::new(live, metrics.clone());
        ::metrics::with_local_recorder(&recorder, || {
            crate::metrics::export_zeros();
            run_live(&core);
        });
        drop(core);
        let text = handle.render();
        assert_eq!(value(&text, COMMITS), 1.0);
        assert_eq!(value(&text, LOST_MEMBER), 1.0);

        // `--resume`: the same journal through the same state, then the service runs.
        // All of it under the recorder, so a count anywhere on that path would show.
        let (journal, records) = Journal::open(dir.path(), true).unwrap();
        ::metrics::with_local_recorder(&recorder, || {
            let mut replayed = JobState::replay(cfg, journal, &records, Instant::now()).unwrap();
            assert_eq!(replayed.checkpoints().latest_step(), 4, "commit replayed");
            assert_eq!(replayed.status(Instant::now()).restarts, 1, "loss replayed");
            assert!(replayed.take_decisions().is_empty());
            let core = Core::new(replayed, metrics);
            core.tick();
        });
        let after = handle.render();
        assert_eq!(value(&after, COMMITS), 1.0, "{after}");
        assert_eq!(value(&after, LOST_MEMBER), 1.0, "{after}");
    }
}
