//! The worker's side of the control protocol (`proto/declip.proto`): register, keep the
//! `Attach` stream up (reports up, commands down), reconnect with backoff when it breaks,
//! and make unary calls. Training and teaching run on the caller's thread; this module
//! owns a small tokio runtime that does the networking beside them.
//!
//! Reports are *state*, not events: the caller publishes its latest report and the
//! stream task sends it when it changes and at least every [`HEARTBEAT`], so a busy
//! trainer never has to remember to heartbeat.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::client::{self, Client, ClientTls};
use proto::wire::{self, command, Command, RegisterRequest, RegisterResponse, Role, WorkerReport};
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// Longest gap between two reports on the stream: the coordinator's heartbeat timeout
/// must be several times this.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// First and largest pause between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// How often a wait for commands checks whether this process was told to stop.
const STOP_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Connect(#[from] client::ConnectError),
    #[error("coordinator refused {call}: {status}")]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("lost the coordinator at {addr} for {secs} s (gave up reconnecting): {last}")]
    Lost {
        addr: String,
        secs: u64,
        last: String,
    },
    #[error("cannot start the networking runtime: {0}")]
    Runtime(std::io::Error),
}

/// Who this worker is and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub addr: String,
    pub token: Option<String>,
    pub tls: Option<ClientTls>,
    pub role: Role,
    pub host: String,
    pub devices: Vec<String>,
    /// Trainers on CPU: where this process's ring listener accepts peers.
    pub ring_address: String,
    /// Preferred rank (Kubernetes JOB_COMPLETION_INDEX), -1 = none.
    pub rank_hint: i32,
    pub metrics_address: String,
    /// Give up after the coordinator has been unreachable this long.
    pub reconnect_timeout: Duration,
}

/// What the stream task hands the worker's loop.
#[derive(Debug)]
pub enum ControlEvent {
    Command(command::Kind),
    /// The coordinator stayed unreachable past `reconnect_timeout`.
    Lost(ControlError),
}

/// Called on the stream task as soon as an `AbortGroup` (or `Stop`) arrives, before the
/// loop sees it: the loop may be blocked inside a collective that only an abort ends.
pub type AbortHook = Box<dyn Fn(u64) + Send + Sync>;

pub struct Control {
    runtime: tokio::runtime::Runtime,
    client: Client,
    config: ControlConfig,
    /// What `Register` answered (the job spec and the dataset size).
    pub registration: RegisterResponse,
    reports: watch::Sender<WorkerReport>,
    events: mpsc::Receiver<ControlEvent>,
    abort_hook: Arc<Mutex<Option<AbortHook>>>,
    /// Our worker id; a coordinator that forgot us (not resumed) hands out a new one.
    identity: Arc<Mutex<String>>,
    /// Where this process serves `/metrics`, stamped on every report ("" = none yet).
    metrics_address: Mutex<String>,
    /// A SIGTERM/Ctrl-C of this process was passed on as `RequestDrain`.
    stop_forwarded: AtomicBool,
}

impl Control {
    /// Connects (retrying with backoff up to `reconnect_timeout`), registers and opens
    /// the `Attach` stream.
    pub fn connect(config: ControlConfig) -> Result<Self, ControlError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("control")
            .enable_all()
            .build()
            .map_err(ControlError::Runtime)?;
        let (client, registration) =
            runtime.block_on(connect_and_register(&config, String::new()))?;
        let first = WorkerReport {
            worker_id: registration.worker_id.clone(),
            state: wire::WorkerState::Idle as i32,
            ..Default::default()
        };
        let (reports, reports_rx) = watch::channel(first);
        let (events_tx, events) = mpsc::channel();
        let abort_hook: Arc<Mutex<Option<AbortHook>>> = Arc::new(Mutex::new(None));
        let identity = Arc::new(Mutex::new(registration.worker_id.clone()));
        runtime.spawn(stream_task(
            config.clone(),
            client.clone(),
            identity.clone(),
            reports_rx,
            events_tx,
            abort_hook.clone(),
        ));
        Ok(Self {
            runtime,
            client,
            metrics_address: Mutex::new(config.metrics_address.clone()),
            config,
            registration,
            reports,
            events,
            abort_hook,
            identity,
            stop_forwarded: AtomicBool::new(false),
        })
    }

    pub fn worker_id(&self) -> String {
        current(&self.identity)
    }

    /// Publishes the latest report (sent now, and repeated as the heartbeat).
    pub fn report(&self, mut report: WorkerReport) {
        if let Ok(addr) = self.metrics_address.lock() {
            report.metrics_address.clone_from(&addr);
        }
        self.reports.send_replace(report);
    }

    /// Where this process serves `/metrics` (known only after registering: the
    /// exporter's `job` label is the registration's job name). Sent with the next report.
    pub fn set_metrics_address(&self, addr: &str) {
        if let Ok(mut mine) = self.metrics_address.lock() {
            *mine = addr.to_string();
        }
        self.report(self.last_report());
    }

    /// The last published report, to change a few fields of it.
    pub fn last_report(&self) -> WorkerReport {
        self.reports.borrow().clone()
    }

    /// The next command or loss, waiting at most `timeout`. A stop this process was asked
    /// for (SIGTERM, Ctrl-C) is passed on to the coordinator meanwhile.
    pub fn next_event(&self, timeout: Duration) -> Option<ControlEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.forward_stop_request();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left.min(STOP_POLL)) {
                Ok(event) => return Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => return None,
            }
        }
    }

    /// A command or loss that has already arrived, if any (passing on a stop request
    /// first, as [`Control::next_event`] does).
    pub fn poll_event(&self) -> Option<ControlEvent> {
        self.forward_stop_request();
        self.events.try_recv().ok()
    }

    /// The first time a stop was asked of this process (`crate::shutdown`), asks the
    /// coordinator to drain the job. Its Drain and Stop commands then end this worker's
    /// work as they end everyone's.
    fn forward_stop_request(&self) {
        if !crate::shutdown::requested() || self.stop_forwarded.swap(true, Ordering::SeqCst) {
            return;
        }
        let request = wire::RequestDrainRequest {
            worker_id: self.worker_id(),
            reason: "the worker was told to stop (SIGTERM or Ctrl-C)".into(),
        };
        tracing::warn!("told to stop: asking the coordinator to drain the job");
        match self.call("RequestDrain", |mut c| {
            let request = request.clone();
            async move { c.request_drain(request).await }
        }) {
            Ok(answer) => tracing::warn!(
                "the job is {} (stop step {})",
                answer.phase().as_str_name(),
                answer.stop_step
            ),
            Err(err) => tracing::error!("asking the coordinator to drain failed: {err}"),
        }
    }

    pub fn set_abort_hook(&self, hook: Option<AbortHook>) {
        if let Ok(mut slot) = self.abort_hook.lock() {
            *slot = hook;
        }
    }

    /// Runs a unary call, retrying transport failures (coordinator restarting) with
    /// backoff until `reconnect_timeout`; a status the coordinator chose is returned.
    pub fn call<T, F, Fut>(&self, name: &'static str, f: F) -> Result<T, ControlError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        loop {
            match self.runtime.block_on(f(self.client.clone())) {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_transient(&status) => {
                    if started.elapsed() > self.config.reconnect_timeout {
                        return Err(ControlError::Lost {
                            addr: self.config.addr.clone(),
                            secs: started.elapsed().as_secs(),
                            last: status.to_string(),
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(status) => return Err(ControlError::Refused { call: name, status }),
            }
        }
    }
}

/// Transport-level failures worth retrying (the coordinator is restarting or the
/// network blipped), as opposed to decisions (unauthenticated, invalid argument, ...).
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

async fn connect_and_register(
    config: &ControlConfig,
    mut worker_id: String,
) -> Result<(Client, RegisterResponse), ControlError> {
    let started = Instant::now();
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = async {
            let mut client =
                client::connect(&config.addr, config.token.as_deref(), config.tls.as_ref()).await?;
            let request = RegisterRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                role: config.role as i32,
                host: config.host.clone(),
                devices: config.devices.clone(),
                worker_id: worker_id.clone(),
                ring_address: config.ring_address.clone(),
                rank_hint: config.rank_hint,
                pid: std::process::id(),
                metrics_address: config.metrics_address.clone(),
            };
            let response =
                client
                    .register(request)
                    .await
                    .map_err(|status| ControlError::Refused {
                        call: "Register",
                        status,
                    })?;
            Ok::<_, ControlError>((client, response.into_inner()))
        };
        match attempt.await {
            Ok(done) => return Ok(done),
            // A coordinator that does not know our id (a fresh one, not a resumed one):
            // register as a new worker.
            Err(ControlError::Refused { status, .. })
                if status.code() == tonic::Code::NotFound && !worker_id.is_empty() =>
            {
                tracing::warn!(
                    "the coordinator does not know worker {worker_id}; registering anew"
                );
                worker_id.clear();
            }
            Err(ControlError::Refused { status, call }) if !is_transient(&status) => {
                return Err(ControlError::Refused { call, status })
            }
            Err(err) if started.elapsed() > config.reconnect_timeout => {
                return Err(ControlError::Lost {
                    addr: config.addr.clone(),
                    secs: started.elapsed().as_secs(),
                    last: err.to_string(),
                })
            }
            Err(err) => {
                tracing::debug!("coordinator not reachable yet ({err}); retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Keeps one `Attach` stream up for the life of the process: sends the latest report on
/// change and every [`HEARTBEAT`], forwards commands, and on a broken stream registers
/// again (same worker id) and reattaches.
async fn stream_task(
    config: ControlConfig,
    mut client: Client,
    identity: Arc<Mutex<String>>,
    reports: watch::Receiver<WorkerReport>,
    events: mpsc::Sender<ControlEvent>,
    abort_hook: Arc<Mutex<Option<AbortHook>>>,
) {
    loop {
        let Some(why) = attach_once(&mut client, &identity, &reports, &events, &abort_hook).await
        else {
            return; // Stop received, or the worker's loop is gone
        };
        tracing::warn!(
            "control stream to {} broke ({why}); reconnecting",
            config.addr
        );
        let worker_id = current(&identity);
        match connect_and_register(&config, worker_id.clone()).await {
            Ok((fresh, response)) => {
                if response.worker_id != worker_id {
                    tracing::warn!(
                        "coordinator gave a new worker id {} (was {worker_id})",
                        response.worker_id
                    );
                    if let Ok(mut id) = identity.lock() {
                        *id = response.worker_id;
                    }
                }
                client = fresh;
            }
            Err(err) => {
                let _ = events.send(ControlEvent::Lost(err));
                return;
            }
        }
    }
}

/// One `Attach` stream until it breaks (`Some(reason)`) or the coordinator closes it
/// cleanly (`None`).
async fn attach_once(
    client: &mut Client,
    identity: &Arc<Mutex<String>>,
    reports: &watch::Receiver<WorkerReport>,
    events: &mpsc::Sender<ControlEvent>,
    abort_hook: &Arc<Mutex<Option<AbortHook>>>,
) -> Option<String> {
    let mut outgoing = reports.clone();
    let upstream = async_stream_of_reports(outgoing.clone(), current(identity));
    let mut inbound = match client.attach(upstream).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Some(status.to_string()),
    };
    outgoing.mark_unchanged();
    loop {
        match inbound.next().await {
            Some(Ok(Command { kind: Some(kind) })) => {
                let generation = match &kind {
                    command::Kind::Abort(a) => Some(a.generation),
                    command::Kind::Stop(_) => Some(u64::MAX),
                    _ => None,
                };
                if let Some(generation) = generation {
                    if let Ok(hook) = abort_hook.lock() {
                        if let Some(hook) = hook.as_ref() {
                            hook(generation);
                        }
                    }
                }
                let stop = matches!(kind, command::Kind::Stop(_));
                if events.send(ControlEvent::Command(kind)).is_err() {
                    return None;
                }
                if stop {
                    return None;
                }
            }
            Some(Ok(Command { kind: None })) => {}
            Some(Err(status)) => return Some(status.to_string()),
            None => return Some("the coordinator closed the stream".into()),
        }
    }
}

/// The upstream half of `Attach`: the current report now, then on every change, and
/// again after [`HEARTBEAT`] without one.
fn async_stream_of_reports(
    mut reports: watch::Receiver<WorkerReport>,
    worker_id: String,
) -> impl tokio_stream::Stream<Item = WorkerReport> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let mut report = reports.borrow_and_update().clone();
            report.worker_id = worker_id.clone();
            if tx.send(report).await.is_err() {
                return; // the stream was dropped: attach_once will make a new one
            }
            let changed = tokio::time::timeout(HEARTBEAT, reports.changed()).await;
            if let Ok(Err(_)) = changed {
                return; // the worker is shutting down
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn current(identity: &Mutex<String>) -> String {
    identity.lock().map(|id| id.clone()).unwrap_or_default()
}

/// This machine's host name (labels, status), from the kernel.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
