//! Local worker processes: spawn each with its own log file and the job token in its
//! environment, restart a failed one per the job's restart policy, stop them in order.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{watch, Mutex};

/// What a slot runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRole {
    Trainer,
    Teacher,
}

impl SlotRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotRole::Trainer => "trainer",
            SlotRole::Teacher => "teacher",
        }
    }
}

/// One worker process the launcher keeps alive.
#[derive(Clone, Debug)]
pub struct Slot {
    pub role: SlotRole,
    pub index: usize,
    /// `worker` arguments (after the binary).
    pub args: Vec<String>,
    pub log: PathBuf,
}

/// How restarts are paced and bounded (`trainers.max_restarts`, `restart_backoff_s`).
#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub backoff: Duration,
}

/// How a slot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotEnd {
    /// Exited 0 (the coordinator told it to stop).
    Finished,
    /// Failed more often than the policy allows; the last exit status.
    GaveUp { restarts: u32, status: String },
    /// The launcher stopped it.
    Stopped,
}

/// Everything the slots share: the worker binary, its environment, and the switch that
/// tells supervisors to stop restarting.
pub struct Supervisor {
    worker_bin: PathBuf,
    env: Vec<(String, String)>,
    policy: RestartPolicy,
    stopping: watch::Sender<bool>,
    /// Live children by slot, so `stop_all` can signal them.
    children: Mutex<Vec<(Slot, Option<u32>)>>,
    restarts: std::sync::atomic::AtomicU32,
}

impl Supervisor {
    pub fn new(
        worker_bin: PathBuf,
        env: Vec<(String, String)>,
        policy: RestartPolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            worker_bin,
            env,
            policy,
            stopping: watch::channel(false).0,
            children: Mutex::new(Vec::new()),
            restarts: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Restarts performed so far, all slots together.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `slot` until it finishes, gives up, or the launcher stops.
    pub async fn run(self: Arc<Self>, slot: Slot) -> SlotEnd {
        let mut stopping = self.stopping.subscribe();
        let mut restarts = 0u32;
        loop {
            let mut child = match self.spawn(&slot).await {
                Ok(child) => child,
                Err(err) => {
                    return SlotEnd::GaveUp {
                        restarts,
                        status: format!("cannot start {}: {err}", self.worker_bin.display()),
                    }
                }
            };
            self.track(&slot, child.id()).await;
            let status = tokio::select! {
                status = child.wait() => status,
                _ = stopped(&mut stopping) => {
                    // signal_role signals every child; here we only reap ours.
                    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
                    let _ = child.kill().await;
                    return SlotEnd::Stopped;
                }
            };
            self.track(&slot, None).await;
            let status = match status {
                Ok(s) if s.success() => return SlotEnd::Finished,
                Ok(s) => describe_exit(s),
                Err(e) => e.to_string(),
            };
            if *stopping.borrow() {
                return SlotEnd::Stopped;
            }
            if restarts >= self.policy.max_restarts {
                tracing::error!(
                    "{} {} failed ({status}) after {restarts} restarts; giving up (see {})",
                    slot.role.as_str(),
                    slot.index,
                    slot.log.display()
                );
                return SlotEnd::GaveUp { restarts, status };
            }
            restarts += 1;
            self.restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::worker_restarted(slot.role.as_str());
            let pause = self.policy.backoff * restarts;
            tracing::warn!(
                "{} {} failed ({status}); restart {restarts}/{} in {:.0} s (log {})",
                slot.role.as_str(),
                slot.index,
                self.policy.max_restarts,
                pause.as_secs_f64(),
                slot.log.display()
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped(&mut stopping) => return SlotEnd::Stopped,
            }
        }
    }

    async fn spawn(&self, slot: &Slot) -> std::io::Result<Child> {
        let log = open_log(&slot.log)?;
        let mut command = Command::new(&self.worker_bin);
        command
            .args(&slot.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A worker must not outlive an interrupted launcher by accident: it gets its
            // own process group so our Ctrl-C reaches it only through us, in order.
            .process_group(0)
            .kill_on_drop(true);
        command.spawn()
    }

    async fn track(&self, slot: &Slot, pid: Option<u32>) {
        let mut children = self.children.lock().await;
        match children
            .iter_mut()
            .find(|(s, _)| s.role == slot.role && s.index == slot.index)
        {
            Some(entry) => entry.1 = pid,
            None => children.push((slot.clone(), pid)),
        }
    }

    /// Stops restarting, then sends SIGTERM to the live children of `role` (teachers
    /// first, then trainers, is the caller's order).
    pub async fn signal_role(&self, role: SlotRole, signal: i32) {
        self.stopping.send_replace(true);
        for (slot, pid) in self.children.lock().await.iter() {
            if slot.role == role {
                if let Some(pid) = pid {
                    // SAFETY: kill(2) with a pid we spawned; no memory is touched.
                    unsafe { libc::kill(*pid as i32, signal) };
                }
            }
        }
    }

    /// Stops restarting; children still get to exit on their own.
    pub fn stop_restarting(&self) {
        self.stopping.send_replace(true);
    }
}

/// Resolves once the launcher stops (the watch guard is not held across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(dir: &Path, args: &[&str]) -> Slot {
        Slot {
            role: SlotRole::Trainer,
            index: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            log: dir.join("logs/trainer-0.log"),
        }
    }

    #[tokio::test]
    async fn a_failing_worker_is_restarted_up_to_the_limit_and_logs_go_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let policy = RestartPolicy {
            max_restarts: 2,
            backoff: Duration::from_millis(10),
        };
        // `sh -c` stands in for the worker binary: it writes a line and fails.
        let sup = Supervisor::new(
            PathBuf::from("/bin/sh"),
            vec![("X".into(), "y".into())],
            policy,
        );
        let end = sup
            .clone()
            .run(slot(dir.path(), &["-c", "echo run $X; exit 3"]))
            .await;
        assert_eq!(
            end,
            SlotEnd::GaveUp {
                restarts: 2,
                status: "exit code 3".into()
            }
        );
        assert_eq!(sup.restarts(), 2);
        let log = std::fs::read_to_string(dir.path().join("logs/trainer-0.log")).unwrap();
        assert_eq!(
            log, "run y\nrun y\nrun y\n",
            "three runs, environment passed"
        );
    }

    #[tokio::test]
    async fn a_worker_that_exits_zero_is_finished_and_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let policy = RestartPolicy {
            max_restarts: 5,
            backoff: Duration::from_millis(10),
        };
        let sup = Supervisor::new(PathBuf::from("/bin/sh"), vec![], policy);
        let end = sup.clone().run(slot(dir.path(), &["-c", "exit 0"])).await;
        assert_eq!(end, SlotEnd::Finished);
        assert_eq!(sup.restarts(), 0);
    }

    #[tokio::test]
    async fn stopping_signals_the_child_and_ends_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let policy = RestartPolicy {
            max_restarts: 5,
            backoff: Duration::from_millis(10),
        };
        let sup = Supervisor::new(PathBuf::from("/bin/sh"), vec![], policy);
        let task = tokio::spawn(sup.clone().run(slot(dir.path(), &["-c", "sleep 30"])));
        tokio::time::sleep(Duration::from_millis(300)).await;
        sup.signal_role(SlotRole::Trainer, libc::SIGTERM).await;
        let end = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the slot ends once its child is signalled")
            .unwrap();
        assert_eq!(end, SlotEnd::Stopped);
    }
}
