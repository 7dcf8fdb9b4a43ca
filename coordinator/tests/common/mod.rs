//! A real coordinator on 127.0.0.1:0 and real `proto::client` clients acting as workers.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use coordinator::{Running, ServeOptions, ServerTls};
use proto::client::{self, Client, ClientTls};
use proto::job::JobSpec;
use proto::wire::{
    command, Command, JobStatus, RegisterRequest, RegisterResponse, Role, StatusRequest,
    WorkerReport, WorkerState,
};
use tokio::sync::mpsc;
use tonic::Streaming;

pub const TOKEN: &str = "test-token-0123456789";

/// The demo job with `sets` applied (96 images, batch 4: 24 steps per epoch).
pub fn spec(sets: &[&str]) -> JobSpec {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    proto::job::load(
        &proto::job::DEMO_CONFIG,
        std::iter::empty::<(String, String)>(),
        &sets,
    )
    .expect("test spec")
    .spec
}

pub async fn serve(spec: JobSpec, run_dir: &Path, resume: bool, tls: Option<ServerTls>) -> Running {
    coordinator::start(
        spec,
        ServeOptions {
            listen: "127.0.0.1:0".into(),
            run_dir: run_dir.to_path_buf(),
            token: TOKEN.into(),
            resume,
            tls,
            metrics_listen: None,
        },
    )
    .await
    .expect("coordinator starts")
}

pub async fn connect(running: &Running) -> Client {
    client::connect(&running.addr().to_string(), Some(TOKEN), None)
        .await
        .expect("connect")
}

pub async fn connect_tls(running: &Running, tls: &ClientTls) -> Client {
    client::connect(&running.addr().to_string(), Some(TOKEN), Some(tls))
        .await
        .expect("connect")
}

pub fn register_request(role: Role, ring_port: u16) -> RegisterRequest {
    RegisterRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        role: role as i32,
        host: "localhost".into(),
        devices: vec!["cpu".into()],
        ring_address: if ring_port == 0 {
            String::new()
        } else {
            format!("127.0.0.1:{ring_port}")
        },
        rank_hint: -1,
        pid: std::process::id(),
        ..Default::default()
    }
}

/// A worker attached to the coordinator: reports go up `reports`, commands come down.
pub struct Worker {
    pub id: String,
    pub client: Client,
    pub registered: RegisterResponse,
    reports: mpsc::UnboundedSender<WorkerReport>,
    commands: Streaming<Command>,
}

impl Worker {
    pub async fn start(running: &Running, role: Role, ring_port: u16) -> Worker {
        let mut client = connect(running).await;
        let registered = client
            .register(register_request(role, ring_port))
            .await
            .expect("register")
            .into_inner();
        Self::attach(client, registered).await
    }

    pub async fn attach(mut client: Client, registered: RegisterResponse) -> Worker {
        let id = registered.worker_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(report(&id, WorkerState::Idle, 0, 0))
            .expect("queue");
        let commands = client
            .attach(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .expect("attach")
            .into_inner();
        Worker {
            id,
            client,
            registered,
            reports: tx,
            commands,
        }
    }

    pub fn report(&self, state: WorkerState, generation: u64, step: u64) {
        self.send(report(&self.id, state, generation, step));
    }

    pub fn send(&self, report: WorkerReport) {
        self.reports.send(report).expect("report stream open");
    }

    /// The next command (fails the test after 10 s).
    pub async fn next(&mut self) -> Result<command::Kind, tonic::Status> {
        let got = tokio::time::timeout(Duration::from_secs(10), self.commands.message())
            .await
            .expect("a command within 10 s")?;
        Ok(got
            .and_then(|c| c.kind)
            .expect("a command, not the end of the stream"))
    }

    /// The end of the command stream (`Ok(())`) or its error status.
    pub async fn ended(&mut self) -> Result<(), tonic::Status> {
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), self.commands.message())
                .await
                .expect("stream end within 10 s")?;
            if got.is_none() {
                return Ok(());
            }
        }
    }
}

pub fn report(id: &str, state: WorkerState, generation: u64, step: u64) -> WorkerReport {
    WorkerReport {
        worker_id: id.into(),
        state: state as i32,
        generation,
        step,
        ..Default::default()
    }
}

pub async fn status(client: &mut Client) -> JobStatus {
    client
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// The parts of a status that only change when the job does (not ages or elapsed time).
pub fn essence(s: &JobStatus) -> String {
    let mut s = s.clone();
    s.elapsed_s = 0.0;
    for r in &mut s.ranks {
        r.heartbeat_age = 0.0;
    }
    for t in &mut s.teachers {
        t.heartbeat_age = 0.0;
    }
    format!("{s:?}")
}

/// Waits until `f` holds for the published status (10 s at most).
pub async fn wait_for(running: &Running, what: &str, f: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let mut rx = running.subscribe();
    let status = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("status channel")
        .clone();
    status
}
