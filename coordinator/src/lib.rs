//! The DeCLIP control plane as a library: `coordinator serve` and `coordinator launch`
//! both [`start`] it. It never links libtorch.
//!
//! - [`state`]: the job's state and every decision (rendezvous, checkpoints, teacher
//!   leases, drain, completion), journaled through [`journal`] before it is acted on.
//! - [`service`]: the tonic service (thin), [`auth`]: the job token, [`tls`]: TLS/mTLS,
//!   [`validate`]: field validation, [`metrics`]: counters for the exporter.
//! - [`status_view`]: how `coordinator status` shows a [`proto::wire::JobStatus`].

pub mod auth;
pub mod dataset;
pub mod journal;
pub mod launch;
pub mod manifests;
pub mod metrics;
pub mod service;
pub mod state;
pub mod status_view;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::client::MAX_MESSAGE_BYTES;
use proto::job::JobSpec;
use proto::wire::coordinator_server::CoordinatorServer;
use proto::wire::{JobPhase, JobStatus};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

pub use tls::ServerTls;

use crate::auth::AuthInterceptor;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::service::{Core, Service};
use crate::state::{JobConfig, JobState};

/// How long a finished coordinator waits for clients to hang up before it closes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Where and how to serve a job.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// gRPC listen address (`IP:port`; port 0 picks a free one, see [`Running::addr`]).
    pub listen: String,
    /// Holds `journal.jsonl`.
    pub run_dir: PathBuf,
    /// The job's bearer token (required, non-empty).
    pub token: String,
    /// Replay `run_dir/journal.jsonl` instead of starting a new job.
    pub resume: bool,
    pub tls: Option<ServerTls>,
    /// `/metrics` listen address (`IP:port`, port 0 picks one, see
    /// [`Running::metrics_addr`]); `None` serves none. The exporter is process-wide:
    /// at most one coordinator per process may have one.
    pub metrics_listen: Option<String>,
}

/// Where the coordinator serves `/metrics`: the gRPC listen address's host with
/// `coordinator.metrics_port` (0 = pick one).
pub fn metrics_listen(grpc_listen: &str, metrics_port: u16) -> String {
    let host = grpc_listen
        .rsplit_once(':')
        .map_or(grpc_listen, |(host, _port)| host);
    format!("{host}:{metrics_port}")
}

/// A serving coordinator. Dropping it aborts the server (as a crash would: the journal
/// is all that is left).
pub struct Running {
    addr: SocketAddr,
    core: Arc<Core>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    ticker: JoinHandle<()>,
    metrics_addr: Option<SocketAddr>,
    exporter: Option<JoinHandle<()>>,
}

/// Counts the dataset, opens (or replays) the journal, binds and serves.
pub async fn start(spec: JobSpec, opts: ServeOptions) -> anyhow::Result<Running> {
    auth::check_token(&opts.token).context("job token")?;
    let data = spec.data.clone();
    let image_count = tokio::task::spawn_blocking(move || dataset::image_count(&data))
        .await
        .context("counting the dataset")??;
    let cfg = JobConfig::from_spec(&spec, image_count)?;
    let sizes: Vec<usize> = (cfg.min..=cfg.max).filter(|&w| cfg.world_fits(w)).collect();
    tracing::info!(
        "{} steps; worlds of {sizes:?} trainers can run them (the global batch of {} splits evenly)",
        cfg.total_steps,
        cfg.global_batch
    );
    let job_name = spec.job.name.clone();
    let heartbeat = cfg.heartbeat_timeout;
    let (journal, records) = Journal::open(&opts.run_dir, opts.resume)?;
    let now = Instant::now();
    let state = if opts.resume {
        JobState::replay(cfg, journal, &records, now)?
    } else {
        JobState::new(cfg, Some(journal), now)?
    };
    let metrics = Arc::new(Metrics::default());
    let core = Core::new(state, metrics.clone());

    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let mut builder = Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.config()?)?;
    }
    let server = CoordinatorServer::new(Service::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service = InterceptedService::new(server, AuthInterceptor::new(&opts.token, metrics));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let serve = builder.add_service(service).serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async {
            let _ = shutdown_rx.await;
        },
    );
    let server = tokio::spawn(serve);
    let ticker = tokio::spawn(tick_forever(core.clone(), heartbeat));
    tracing::info!("listening on {addr}");
    let metrics_addr = match &opts.metrics_listen {
        Some(listen) => Some(
            proto::metrics::install_for(listen, &job_name, proto::metrics::Role::Coordinator)
                .context("starting the /metrics exporter")?,
        ),
        None => None,
    };
    let exporter = metrics_addr.map(|metrics_addr| {
        tracing::info!("serving /metrics on {metrics_addr}");
        tokio::spawn(metrics::export_forever(core.subscribe()))
    });
    Ok(Running {
        addr,
        core,
        shutdown: Some(shutdown_tx),
        server: Some(server),
        ticker,
        metrics_addr,
        exporter,
    })
}

async fn tick_forever(core: Arc<Core>, heartbeat: Duration) {
    let mut interval = tokio::time::interval(service::tick_interval(heartbeat));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        core.tick();
    }
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served, if [`ServeOptions::metrics_listen`] asked for it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn status(&self) -> JobStatus {
        self.core.subscribe().borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.core.subscribe()
    }

    /// Refused calls by reason (the Prometheus exporter's source).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.core.metrics().clone()
    }

    /// A coordinated stop at the next step, with a checkpoint (Ctrl-C, SIGTERM).
    pub fn drain(&self, reason: &str) {
        self.core.drain(reason);
    }

    /// Waits until the job completes, stops or fails, then closes the server.
    pub async fn finished(mut self) -> anyhow::Result<JobPhase> {
        let mut rx = self.core.subscribe();
        let status = rx
            .wait_for(|s| service::is_terminal(s.phase))
            .await
            .context("the coordinator's status channel closed")?
            .clone();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(joined) => joined.context("server task")??,
                Err(_) => {
                    tracing::debug!("clients still connected after the grace period");
                    server.abort();
                }
            }
        }
        Ok(JobPhase::try_from(status.phase).unwrap_or(JobPhase::Failed))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ticker.abort();
        if let Some(exporter) = &self.exporter {
            exporter.abort();
        }
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}
