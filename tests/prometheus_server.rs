//! A real Prometheus server (Debian's package, started here on loopback) scrapes a
//! real exporter (`proto::metrics::install_for` in this test process) that serves
//! every catalog metric of every role, plus the two DCGM series the GPU panels
//! join. Through Prometheus's HTTP API, every dashboard expression and every
//! recording rule must return data, and every rule (alerts included) must load
//! and evaluate without error.
//!
//! The exporter here is fed by the test, not by a running job: it proves the
//! names, labels, types and buckets the dashboard and rules rely on against a
//! real server, for every series, including those a healthy run never moves.
//! tests/prometheus_launch.rs scrapes a running `coordinator launch`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::prometheus;
use proto::metrics::{self, MetricKind, Role, CATALOG};

const JOB: &str = "demo";
const HOST: &str = "node-a";
/// Generous: Prometheus needs a few scrapes and rule evaluations (1 s apart) on a
/// loaded 2-core machine. Not a timing assertion: the loop ends as soon as all pass.
const DEADLINE: Duration = Duration::from_secs(120);

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

#[test]
fn prometheus_scrapes_the_exporter_and_every_dashboard_and_recording_expression_has_data() {
    if !prometheus::installed("prometheus") {
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
    let scrape = format!(
        "  - job_name: declip\n    honor_labels: true\n    \
         static_configs:\n      - targets: [\"{target}\"]\n"
    );
    let prom = prometheus::start(dir.path(), &scrape);

    let mut exprs = prometheus::dashboard_exprs(JOB);
    exprs.extend(prometheus::recorded_names());
    let rules = prometheus::shipped_rule_count();
    let started = Instant::now();
    let mut missing: Vec<String>;
    loop {
        missing = exprs
            .iter()
            .filter(|e| !prom.query(e).is_ok_and(|r| !r.is_empty()))
            .cloned()
            .collect();
        let health = prom.rules_healthy();
        if missing.is_empty() && health.as_ref().is_ok_and(|n| *n == rules) {
            break;
        }
        if started.elapsed() > DEADLINE {
            panic!(
                "after {DEADLINE:?}: rules {health:?} (of {rules}); no data for {} expressions:\n{}\nprometheus log (last lines, newest first):\n{}",
                missing.len(),
                missing.join("\n"),
                prometheus::log_tail(dir.path())
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // The scrape really carried the process's labels (honor_labels kept `job`).
    let up = prom.query("declip_build_info").unwrap();
    assert_eq!(up[0]["metric"]["job"], JOB, "{up:?}");
    assert_eq!(up[0]["metric"]["host"], HOST, "{up:?}");
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}
