//! A real Prometheus server (Debian's package, started here on loopback) scrapes a
//! real exporter (`proto::metrics::install_for` in this test process) that serves
//! every catalog metric of every role, plus the two DCGM series the GPU panels
//! join. Through Prometheus's HTTP API, every dashboard expression and every
//! recording rule must return data, and every rule (alerts included) must load
//! and evaluate without error.
//!
//! The exporter here is fed by the test, not by a running job: it proves the
//! names, labels, types and buckets the dashboard and rules rely on against a
//! real server. The same helpers scrape a running `coordinator launch` once the
//! processes export (docs/metrics.md).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::repo_root;
use proto::metrics::{self, MetricKind, Role, CATALOG};
use serde_json::Value;

const JOB: &str = "demo";
const HOST: &str = "node-a";
/// Generous: Prometheus needs a few scrapes and rule evaluations (1 s apart) on a
/// loaded 2-core machine. Not a timing assertion: the loop ends as soon as all pass.
const DEADLINE: Duration = Duration::from_secs(120);

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let rules = repo_root().join("deploy/prometheus/rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n  - {}\n\
         scrape_configs:\n  - job_name: declip\n    honor_labels: true\n    \
         static_configs:\n      - targets: [\"{target}\"]\n",
        rules.join("declip-recording.yml").display(),
        rules.join("declip-alerts.yml").display(),
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr }
}

fn get_json(url: &str, query: Option<&str>) -> Option<Value> {
    let mut req = ureq::get(url);
    if let Some(q) = query {
        req = req.query("query", q);
    }
    let mut resp = req.call().ok()?;
    let text = resp.body_mut().read_to_string().ok()?;
    serde_json::from_str(&text).ok()
}

/// The result of an instant query, or the error Prometheus gave.
fn instant_query(prom: &Prometheus, expr: &str) -> Result<Vec<Value>, String> {
    let url = format!("http://{}/api/v1/query", prom.addr);
    let body = get_json(&url, Some(expr)).ok_or("no answer")?;
    if body["status"] != "success" {
        return Err(body.to_string());
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn sample_label(key: &str, i: u64) -> String {
    match key {
        metrics::LABEL_RANK => (i % 2).to_string(),
        metrics::LABEL_GENERATION => "1".into(),
        metrics::LABEL_PHASE => metrics::STEP_PHASES[(i % 5) as usize].into(),
        metrics::LABEL_COMPONENT => metrics::LOSS_COMPONENTS[(i % 3) as usize].into(),
        metrics::LABEL_STATE => metrics::SHARD_STATES[(i % 4) as usize].into(),
        metrics::LABEL_JOB_PHASE => "training".into(),
        metrics::LABEL_REASON => "unauthenticated".into(),
        metrics::LABEL_POOL => "trainer".into(),
        _ => "0.1.0".into(),
    }
}

/// One round of samples: every metric, for every role that exports it and a few
/// label values, counters and histograms growing so rates are non-zero.
fn feed(round: u64) {
    for d in CATALOG {
        for role in d.roles {
            for i in 0..5 {
                let mut labels = vec![(metrics::LABEL_ROLE, role.as_str().to_string())];
                labels.extend(d.labels.iter().map(|k| (*k, sample_label(k, i))));
                match d.kind {
                    MetricKind::Counter => ::metrics::counter!(d.name, &labels).increment(i + 1),
                    // The phase gauge is a 0/1 flag (the Phase panel selects `== 1`).
                    MetricKind::Gauge if d.name == metrics::JOB_PHASE => {
                        ::metrics::gauge!(d.name, &labels).set(1.0)
                    }
                    MetricKind::Gauge => {
                        ::metrics::gauge!(d.name, &labels).set(1.0 + (round + i) as f64)
                    }
                    MetricKind::Histogram => {
                        ::metrics::histogram!(d.name, &labels).record(0.05 * (i + 1) as f64)
                    }
                }
            }
        }
    }
    // What the DCGM exporter serves for the GPU on this node (the join key).
    for name in ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"] {
        ::metrics::gauge!(name, "Hostname" => HOST, "gpu" => "0").set(40.0 + round as f64);
    }
}

fn dashboard_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/grafana/declip-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            out.push(e.replace("$__rate_interval", "1m").replace("$job", JOB));
        }
    }
    out
}

fn recorded_names() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/rules/declip-recording.yml"))
            .unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect()
}

/// Every rule group loaded, every rule `health: ok`; returns how many rules.
fn rules_healthy(prom: &Prometheus) -> Result<usize, String> {
    let url = format!("http://{}/api/v1/rules", prom.addr);
    let body = get_json(&url, None).ok_or("no answer")?;
    let mut n = 0;
    for group in body["data"]["groups"].as_array().ok_or("no groups")? {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if rule["health"] != "ok" {
                return Err(format!(
                    "{} is {}: {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn prometheus_scrapes_the_exporter_and_every_dashboard_and_recording_expression_has_data() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is missing in CI: scripts/test runs scripts/setup-prometheus"
        );
        eprintln!("SKIPPED: prometheus not installed (run scripts/setup-prometheus)");
        return;
    }
    std::env::set_var(metrics::HOST_ENV, HOST);
    let target = metrics::install_for("127.0.0.1:0", JOB, Role::Coordinator).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                feed(round);
                round += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(dir.path(), target);

    let mut exprs = dashboard_exprs();
    exprs.extend(recorded_names());
    let started = Instant::now();
    let mut missing: Vec<String>;
    loop {
        missing = exprs
            .iter()
            .filter(|e| !instant_query(&prom, e).is_ok_and(|r| !r.is_empty()))
            .cloned()
            .collect();
        let health = rules_healthy(&prom);
        if missing.is_empty() && health.as_ref().is_ok_and(|n| *n == 19) {
            break;
        }
        if started.elapsed() > DEADLINE {
            let log =
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            panic!(
                "after {DEADLINE:?}: rules {health:?}; no data for {} expressions:\n{}\nprometheus log (last lines, newest first):\n{tail}",
                missing.len(),
                missing.join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // The scrape really carried the process's labels (honor_labels kept `job`).
    let up = instant_query(&prom, "declip_build_info").unwrap();
    assert_eq!(up[0]["metric"]["job"], JOB, "{up:?}");
    assert_eq!(up[0]["metric"]["host"], HOST, "{up:?}");
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}
