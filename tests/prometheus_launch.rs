//! A real Prometheus server scrapes a running `coordinator launch` (the embedded demo:
//! a coordinator, 2 trainers and a teacher, each serving `/metrics`), discovering the
//! processes through the `metrics-targets.json` file launch keeps in its run directory.
//! While the job runs:
//! - `promtool check metrics` passes on the live `/metrics` of the coordinator, a
//!   trainer and a teacher;
//! - every PromQL expression of the Grafana dashboard and every recording rule returns
//!   data through Prometheus's HTTP API;
//! - every rule of the shipped files (alerts included) loads and evaluates (`health: ok`).
//!
//! Then Ctrl-C (SIGINT) drains the job. The GPU panels join the DCGM exporter's series
//! by host; this machine has no GPU and so no DCGM exporter, so this test process serves
//! the two DCGM series a GPU node's exporter would, labelled with the host the job's
//! processes report (`DECLIP_HOST`). Everything else is the real job.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{binary, prometheus};
use proto::metrics;

const JOB: &str = "demo";
const HOST: &str = "node-live";
/// Generous for a loaded 2-core machine; the loop ends as soon as everything holds.
const DEADLINE: Duration = Duration::from_secs(300);

struct Launch(Child);

impl Drop for Launch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo with enough epochs that it is still training when every check has passed
/// (the test stops it then); every process labels its series with [`HOST`].
fn start_launch(dir: &Path) -> Launch {
    let log = std::fs::File::create(dir.join("launch.log")).unwrap();
    let child = binary("coordinator")
        .current_dir(dir)
        .args([
            "launch",
            "--set",
            "job.run_dir=run",
            "--set",
            "train.epochs=60",
        ])
        .env(metrics::HOST_ENV, HOST)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start coordinator launch");
    Launch(child)
}

/// The two DCGM series the GPU panels join (what dcgm-exporter serves on a GPU node).
fn serve_dcgm_series() -> std::net::SocketAddr {
    let addr = metrics::install_exporter("127.0.0.1:0", &[]).unwrap();
    ::metrics::gauge!("DCGM_FI_DEV_GPU_UTIL", "Hostname" => HOST, "gpu" => "0").set(57.0);
    ::metrics::gauge!("DCGM_FI_DEV_FB_USED", "Hostname" => HOST, "gpu" => "0").set(2048.0);
    addr
}

fn targets(file: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    parsed[0]["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect()
}

/// The series that show a process has done its work, by role: its exposition is then
/// checked with promtool (histograms included).
const EVIDENCE: [(&str, &str); 3] = [
    ("coordinator", "declip_job_step{"),
    ("trainer", "declip_step_seconds_bucket{"),
    ("teacher", "declip_teacher_shard_seconds_bucket{"),
];

/// Runs `promtool check metrics` on each target's live `/metrics` that shows its role's
/// evidence and whose role is not checked yet; adds the roles checked.
fn check_live_expositions(addrs: &[String], checked: &mut BTreeSet<&'static str>) {
    for addr in addrs {
        let Some(text) = prometheus::get_text(addr, "/metrics") else {
            continue;
        };
        for (role, evidence) in EVIDENCE {
            let labelled = text.contains(&format!("role=\"{role}\""));
            if checked.contains(role) || !labelled || !text.contains(evidence) {
                continue;
            }
            let (ok, message) = prometheus::promtool_check_metrics(&text);
            assert!(
                ok,
                "promtool check metrics failed on the {role} at {addr}:\n{message}\n{text}"
            );
            checked.insert(role);
        }
    }
}

#[test]
fn prometheus_scrapes_a_running_launch_and_every_dashboard_and_rule_expression_has_data() {
    if !prometheus::installed("prometheus") || !prometheus::installed("promtool") {
        return;
    }
    let dcgm = serve_dcgm_series();
    let dir = tempfile::tempdir().unwrap();
    let mut launch = start_launch(dir.path());
    let targets_file = dir.path().join("run/metrics-targets.json");
    let scrape = format!(
        "  - job_name: declip\n    honor_labels: true\n    \
         file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n  \
         - job_name: dcgm\n    static_configs:\n      - targets: [\"{dcgm}\"]\n",
        targets_file.display()
    );
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = prometheus::start(&prom_dir, &scrape);

    let mut waiting: Vec<String> = prometheus::dashboard_exprs(JOB);
    waiting.extend(prometheus::recorded_names());
    let rules = prometheus::shipped_rule_count();
    let mut checked = BTreeSet::new();
    let mut health = Err("not asked yet".to_string());
    let started = Instant::now();
    loop {
        let addrs = targets(&targets_file);
        check_live_expositions(&addrs, &mut checked);
        // An expression counts once it has returned data (the job moves on meanwhile).
        waiting.retain(|e| !prom.query(e).is_ok_and(|r| !r.is_empty()));
        if health.as_ref().map_or(true, |n| *n != rules) {
            health = prom.rules_healthy();
        }
        let all_roles = checked.len() == EVIDENCE.len();
        if waiting.is_empty() && all_roles && health.as_ref().is_ok_and(|n| *n == rules) {
            break;
        }
        let exited = launch.0.try_wait().unwrap();
        if started.elapsed() > DEADLINE || exited.is_some() {
            let log = std::fs::read_to_string(dir.path().join("launch.log")).unwrap_or_default();
            panic!(
                "after {:?} (launch exited: {exited:?}): promtool checked {checked:?} of {} roles; \
                 rules {health:?} of {rules}; targets {addrs:?}; no data for {} expressions:\n{}\n\
                 prometheus log (newest first):\n{}\nlaunch log:\n{log}",
                started.elapsed(),
                EVIDENCE.len(),
                waiting.len(),
                waiting.join("\n"),
                prometheus::log_tail(&prom_dir)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // Every process was a target, and its series carry the job's labels.
    let up = prom
        .query("count by (role) (declip_build_info{job=\"demo\"})")
        .unwrap();
    let roles: BTreeSet<String> = up
        .iter()
        .filter_map(|s| s["metric"]["role"].as_str().map(str::to_string))
        .collect();
    assert_eq!(roles.len(), 3, "{up:?}");
    let trainers = prom
        .query("count(declip_steps_total{job=\"demo\",host=\"node-live\"})")
        .unwrap();
    assert_eq!(trainers[0]["value"][1], "2", "{trainers:?}");

    // Ctrl-C drains the job: a checkpoint at the next step, then every process exits.
    let pid = launch.0.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = launch.0.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("launch.log")).unwrap_or_default();
    assert!(
        status.code() == Some(130) || status.success(),
        "launch after Ctrl-C: {status:?}\n{log}"
    );
}
