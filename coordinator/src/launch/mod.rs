//! `coordinator launch`: the whole job on this machine. Starts the coordinator's server
//! in this process, spawns the teacher and trainer processes (a log file each under
//! `run_dir/logs/`), restarts failed ones per the job's policy, shows progress, and on
//! Ctrl-C or SIGTERM drains the job (checkpoint at the next step) and stops workers in order.

mod progress;
mod supervisor;
mod targets;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::job::{JobSpec, TeacherMode};
use proto::wire::{JobPhase, JobStatus};
use tokio::task::JoinSet;

pub use progress::{bytes, duration, phase_name, plain_line};
use supervisor::{RestartPolicy, Slot, SlotEnd, SlotRole, Supervisor};

use crate::{ServeOptions, ServerTls};

/// How long workers get to leave on their own after the coordinator told them to stop.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(30);

pub struct LaunchArgs {
    pub spec: JobSpec,
    /// Where the config came from (for the banner).
    pub source: String,
    pub resume: bool,
    /// The `worker` binary; default: next to this executable.
    pub worker_bin: Option<PathBuf>,
}

pub async fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let spec = args.spec;
    let run_dir = PathBuf::from(&spec.job.run_dir);
    refuse_to_overwrite(&run_dir, args.resume)?;
    let worker_bin = match args.worker_bin {
        Some(path) => path,
        None => default_worker_bin()?,
    };
    // An operator's token (DECLIP_TOKEN) is kept so their `coordinator status` works;
    // otherwise each launch makes its own.
    let token = match std::env::var(proto::auth::TOKEN_ENV) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => generate_token()?,
    };
    let running = crate::start(
        spec.clone(),
        ServeOptions {
            listen: spec.coordinator.listen.clone(),
            run_dir: run_dir.clone(),
            token: token.clone(),
            resume: args.resume,
            tls: ServerTls::from_spec(&spec.coordinator),
            metrics_listen: Some(crate::metrics_listen(
                &spec.coordinator.listen,
                spec.coordinator.metrics_port,
            )),
        },
    )
    .await
    .context("starting the coordinator")?;
    let addr = running.addr().to_string();
    eprintln!(
        "job {:?} from {}: coordinator on {addr}, logs in {}",
        spec.job.name,
        args.source,
        run_dir.join("logs").display()
    );

    let supervisor = Supervisor::new(
        worker_bin,
        vec![(proto::auth::TOKEN_ENV.to_string(), token)],
        RestartPolicy {
            max_restarts: spec.trainers.max_restarts,
            backoff: Duration::from_secs(spec.trainers.restart_backoff_s),
        },
    );
    let mut slots = JoinSet::new();
    for slot in plan_slots(&spec, &addr, &run_dir) {
        let role = slot.role;
        let sup = supervisor.clone();
        slots.spawn(async move { (role, sup.run(slot).await) });
    }

    let cache_mode = spec.teachers.mode == TeacherMode::Cache;
    let mut view = progress::Progress::new(cache_mode);
    let mut seen = LossHistory::default();
    let mut targets = targets::MetricsTargets::new(&run_dir);
    if let Some(metrics) = running.metrics_addr() {
        targets
            .add("coordinator", &metrics.to_string())
            .with_context(|| format!("writing {}", targets.path().display()))?;
        eprintln!(
            "metrics: coordinator on http://{metrics}/metrics (job-level series); every address in {}",
            targets.path().display()
        );
    }
    let mut status_rx = running.subscribe();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut interrupted = false;
    // SIGTERM (preemption, `kill`) drains like Ctrl-C; a drained job then exits 0.
    let mut terminated = false;
    let mut trainers_left = spec.trainers.max;
    let failed_slots = loop {
        tokio::select! {
            changed = status_rx.changed() => {
                if changed.is_err() { break None; }
                let status = status_rx.borrow_and_update().clone();
                seen.observe(&status);
                announce_metrics(&mut targets, &status, &view);
                view.update(&status);
                if is_final(status.phase()) { break None; }
            }
            Some(ended) = slots.join_next() => {
                if let Ok((SlotRole::Trainer, SlotEnd::GaveUp { .. })) = ended {
                    trainers_left = trainers_left.saturating_sub(1);
                    if trainers_left < spec.trainers.min {
                        break Some("too few trainers are left (restart limit reached)");
                    }
                }
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                eprintln!("\ninterrupted: draining (checkpoint at the next step); Ctrl-C again to stop at once");
                running.drain("interrupted (Ctrl-C)");
            }
            _ = sigterm.recv(), if !interrupted => {
                interrupted = true;
                terminated = true;
                eprintln!("\nSIGTERM: draining (checkpoint at the next step); `--resume` continues the job");
                running.drain("SIGTERM");
            }
            _ = tokio::signal::ctrl_c(), if interrupted => {
                break Some("interrupted twice");
            }
        }
    };
    view.finish();
    let final_status = running.status();
    if let Some(reason) = failed_slots {
        eprintln!("stopping: {reason}");
    }
    stop_workers(&supervisor, &mut slots).await;
    let phase = final_status.phase();
    print_summary(
        &final_status,
        &seen,
        &run_dir,
        started.elapsed(),
        supervisor.restarts(),
    );
    // A drain asked by Ctrl-C exits 130 (the shell's convention); one asked by SIGTERM,
    // or by a worker that was told to stop, is a clean stop: 0.
    Ok(match phase {
        JobPhase::Completed => ExitCode::SUCCESS,
        JobPhase::Stopped if interrupted && !terminated => ExitCode::from(130),
        JobPhase::Stopped => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// Prints each worker's `/metrics` address once and adds it to the targets file.
fn announce_metrics(
    targets: &mut targets::MetricsTargets,
    status: &JobStatus,
    view: &progress::Progress,
) {
    match targets.observe(status) {
        Ok(new) => {
            for (who, addr) in new {
                view.note(&format!("metrics: {who} on http://{addr}/metrics"));
            }
        }
        Err(err) => tracing::warn!("writing {}: {err}", targets.path().display()),
    }
}

/// A fresh job token: 32 random bytes from the kernel, hex. It reaches the workers only
/// through their environment.
fn generate_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the job token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn is_final(phase: JobPhase) -> bool {
    matches!(
        phase,
        JobPhase::Completed | JobPhase::Failed | JobPhase::Stopped
    )
}

/// A run directory with a journal belongs to a job: continue it with --resume, or choose
/// another directory; never mix two jobs' checkpoints.
fn refuse_to_overwrite(run_dir: &Path, resume: bool) -> anyhow::Result<()> {
    let journal = run_dir.join(crate::journal::FILE_NAME);
    if resume {
        anyhow::ensure!(
            journal.exists(),
            "--resume: {} has no journal ({}); nothing to resume",
            run_dir.display(),
            journal.display()
        );
    } else {
        anyhow::ensure!(
            !journal.exists(),
            "{} already holds a job (journal {}): add --resume to continue it, or remove the directory (or set job.run_dir) to start over",
            run_dir.display(),
            journal.display()
        );
    }
    Ok(())
}

fn default_worker_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("DECLIP_WORKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.with_file_name("worker");
    anyhow::ensure!(
        path.exists(),
        "the worker binary is not next to {} (build it: cargo build --release --bins), or set DECLIP_WORKER_BIN",
        exe.display()
    );
    Ok(path)
}

/// Teachers (cache mode) then trainers, each with its own log file.
fn plan_slots(spec: &JobSpec, addr: &str, run_dir: &Path) -> Vec<Slot> {
    let logs = run_dir.join("logs");
    let mut slots = Vec::new();
    if spec.teachers.mode == TeacherMode::Cache {
        for index in 0..spec.teachers.count {
            slots.push(Slot {
                role: SlotRole::Teacher,
                index,
                args: worker_args("teach", addr, &spec.teachers.device),
                log: logs.join(format!("teacher-{index}.log")),
            });
        }
    }
    for index in 0..spec.trainers.max {
        slots.push(Slot {
            role: SlotRole::Trainer,
            index,
            args: worker_args("train", addr, &spec.trainers.device),
            log: logs.join(format!("trainer-{index}.log")),
        });
    }
    slots
}

fn worker_args(command: &str, addr: &str, device: &str) -> Vec<String> {
    [command, "--coordinator", addr, "--device", device]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Workers normally leave on the coordinator's Stop; give them a grace period, then
/// SIGTERM teachers before trainers, then SIGKILL whatever is left.
async fn stop_workers(
    supervisor: &std::sync::Arc<Supervisor>,
    slots: &mut JoinSet<(SlotRole, SlotEnd)>,
) {
    supervisor.stop_restarting();
    let drained = tokio::time::timeout(WORKER_EXIT_GRACE, async {
        while slots.join_next().await.is_some() {}
    })
    .await;
    if drained.is_ok() {
        return;
    }
    for role in [SlotRole::Teacher, SlotRole::Trainer] {
        supervisor.signal_role(role, libc::SIGTERM).await;
    }
    if tokio::time::timeout(Duration::from_secs(10), async {
        while slots.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        for role in [SlotRole::Teacher, SlotRole::Trainer] {
            supervisor.signal_role(role, libc::SIGKILL).await;
        }
        slots.abort_all();
    }
}

/// The first and last losses the job reported (the summary compares them).
#[derive(Default)]
struct LossHistory {
    first: Vec<f64>,
    last: std::collections::VecDeque<f64>,
    last_step: u64,
}

/// Steps averaged for "loss first N" / "loss last N".
const LOSS_WINDOW: usize = 10;

impl LossHistory {
    fn observe(&mut self, status: &JobStatus) {
        let Some(losses) = &status.losses else { return };
        if status.step == 0 || status.step == self.last_step || !losses.total.is_finite() {
            return;
        }
        self.last_step = status.step;
        if self.first.len() < LOSS_WINDOW {
            self.first.push(losses.total);
        }
        self.last.push_back(losses.total);
        if self.last.len() > LOSS_WINDOW {
            self.last.pop_front();
        }
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn print_summary(
    status: &JobStatus,
    losses: &LossHistory,
    run_dir: &Path,
    wall: Duration,
    restarts: u32,
) {
    println!(
        "job            {} ({})",
        status.job,
        phase_name(status.phase())
    );
    if !status.error.is_empty() {
        println!("error          {}", status.error);
    }
    println!("steps          {}/{}", status.step, status.total_steps);
    println!("images         {}", status.images_total);
    println!("wall time      {}", duration(wall.as_secs_f64()));
    println!("generations    {}", status.generation);
    println!("restarts       {restarts}");
    if let (Some(first), Some(last)) = (
        mean(losses.first.iter().copied()),
        mean(losses.last.iter().copied()),
    ) {
        println!(
            "loss first     {first:.4} (mean of the first {} reported steps)",
            losses.first.len()
        );
        println!(
            "loss last      {last:.4} (mean of the last {} reported steps)",
            losses.last.len()
        );
    }
    if let Some(t) = &status.teacher_progress {
        if t.shards_total > 0 {
            println!(
                "teacher cache  {}/{} shards, {}",
                t.shards_done,
                t.shards_total,
                bytes(t.bytes_written)
            );
        }
    }
    let skipped: u64 = status.skips.iter().map(|s| s.count).sum();
    println!("skipped        {skipped}");
    for s in &status.skips {
        println!("  {:<13}{}", s.reason, s.count);
    }
    match &status.last_checkpoint {
        Some(c) => println!("checkpoint     {} (step {})", c.path, c.step),
        None => println!("checkpoint     none committed"),
    }
    for export in list_exports(&run_dir.join("exports")) {
        println!("export         {}", export.display());
    }
    println!(
        "journal        {}",
        run_dir.join(crate::journal::FILE_NAME).display()
    );
    println!("logs           {}", run_dir.join("logs").display());
}

fn list_exports(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_teachers_then_trainers_with_a_log_each() {
        let spec = proto::job::load(&proto::job::DEMO_CONFIG, Vec::new(), &[])
            .unwrap()
            .spec;
        let slots = plan_slots(&spec, "127.0.0.1:5000", Path::new("runs/x"));
        let names: Vec<String> = slots
            .iter()
            .map(|s| format!("{}:{}", s.role.as_str(), s.log.display()))
            .collect();
        assert_eq!(
            names,
            [
                "teacher:runs/x/logs/teacher-0.log",
                "trainer:runs/x/logs/trainer-0.log",
                "trainer:runs/x/logs/trainer-1.log"
            ]
        );
        assert_eq!(
            slots[1].args,
            [
                "train",
                "--coordinator",
                "127.0.0.1:5000",
                "--device",
                "cpu"
            ]
        );
    }

    #[test]
    fn loss_history_keeps_first_and_last_windows_of_distinct_steps() {
        let mut h = LossHistory::default();
        for step in 1..=30u64 {
            for _ in 0..2 {
                h.observe(&JobStatus {
                    step,
                    losses: Some(proto::wire::Losses {
                        total: step as f64,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        assert_eq!(mean(h.first.iter().copied()), Some(5.5));
        assert_eq!(mean(h.last.iter().copied()), Some(25.5));
    }
}
