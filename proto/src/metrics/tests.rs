use std::collections::HashSet;
use std::io::{Read, Write};
use std::process::Command;

use super::*;

/// Records one sample for every metric `role` exports, with a value for each of
/// its labels, so the rendered output holds every line the role can produce.
fn touch_all(role: Role) {
    for d in CATALOG.iter().filter(|d| d.exported_by(role)) {
        let labels: Vec<(&str, String)> = d
            .labels
            .iter()
            .map(|k| (*k, sample_label_value(k)))
            .collect();
        match d.kind {
            MetricKind::Counter => metrics::counter!(d.name, &labels).increment(3),
            MetricKind::Gauge => metrics::gauge!(d.name, &labels).set(1.5),
            MetricKind::Histogram => {
                let h = metrics::histogram!(d.name, &labels);
                for v in [0.02, 0.3, 4.0] {
                    h.record(v);
                }
            }
        }
    }
}

fn sample_label_value(key: &str) -> String {
    match key {
        LABEL_PHASE => STEP_PHASES[2].into(),
        LABEL_COMPONENT => LOSS_COMPONENTS[0].into(),
        LABEL_STATE => SHARD_STATES[1].into(),
        LABEL_JOB_PHASE => JOB_PHASES[1].into(),
        LABEL_REASON => "corrupt".into(),
        LABEL_POOL => "trainer".into(),
        LABEL_VERSION => "0.1.0".into(),
        _ => "0".into(),
    }
}

fn render(role: Role) -> String {
    let recorder = local_recorder(&[
        (LABEL_JOB, "unit-test"),
        (LABEL_ROLE, role.as_str()),
        (LABEL_HOST, "node-a"),
    ]);
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        describe(role);
        touch_all(role);
    });
    handle.render()
}

/// `promtool` from Debian's prometheus (scripts/setup-prometheus). Absent only on a
/// developer machine that has not run the setup; CI must have it.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool is missing in CI: scripts/test runs scripts/setup-prometheus first"
    );
    eprintln!("SKIPPED: promtool not installed (run scripts/setup-prometheus)");
    None
}

fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

#[test]
fn names_follow_the_conventions_and_are_unique() {
    let mut seen = HashSet::new();
    for d in CATALOG {
        assert!(seen.insert(d.name), "{} twice", d.name);
        assert!(d.name.starts_with("declip_"), "{}", d.name);
        assert!(
            d.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{} is not snake_case",
            d.name
        );
        let is_counter = d.kind == MetricKind::Counter;
        assert_eq!(d.name.ends_with("_total"), is_counter, "{}", d.name);
        let stem = d.name.trim_end_matches("_total");
        match d.unit {
            MetricUnit::Seconds => assert!(stem.ends_with("_seconds"), "{}", d.name),
            MetricUnit::Bytes => assert!(stem.ends_with("_bytes"), "{}", d.name),
            MetricUnit::PerSecond => assert!(stem.ends_with("_per_second"), "{}", d.name),
            _ => assert!(
                !stem.ends_with("_seconds") && !stem.ends_with("_bytes"),
                "{} has a unit suffix but unit {:?}",
                d.name,
                d.unit
            ),
        }
        if d.kind == MetricKind::Histogram {
            assert_eq!(
                d.unit,
                MetricUnit::Seconds,
                "{}: buckets are seconds",
                d.name
            );
        }
        for label in d.labels {
            assert!(
                !GLOBAL_LABELS.contains(label),
                "{}: {label} is global",
                d.name
            );
        }
        assert!(!d.roles.is_empty() && !d.help.is_empty(), "{}", d.name);
    }
}

#[test]
fn every_role_has_the_issue_s_minimum_set() {
    let has = |role: Role, name: &str| find(name).is_some_and(|d| d.exported_by(role));
    for name in [
        IMAGES_TOTAL,
        STEPS_TOTAL,
        STEP_SECONDS,
        STEP_PHASE_SECONDS,
        LOSS,
        LEARNING_RATE,
        IMAGES_PER_SECOND,
        PROCESS_MEMORY_BYTES,
        GPU_MEMORY_BYTES,
        CACHE_HITS_TOTAL,
        CACHE_MISSES_TOTAL,
        CACHE_WAIT_SECONDS,
        DATA_SKIPS_TOTAL,
        CHECKPOINT_SECONDS,
        GENERATION,
        WORLD_SIZE,
    ] {
        assert!(has(Role::Trainer, name), "trainer lacks {name}");
    }
    for name in [
        TEACHER_SHARDS_DONE_TOTAL,
        TEACHER_SHARDS_LEASED,
        TEACHER_SHARDS_FAILED_TOTAL,
        TEACHER_WRITTEN_BYTES_TOTAL,
        IMAGES_TOTAL,
    ] {
        assert!(has(Role::Teacher, name), "teacher lacks {name}");
    }
    for name in [
        RANK_HEARTBEAT_AGE_SECONDS,
        RPC_REJECTED_TOTAL,
        GENERATION,
        WORLD_SIZE,
        RESTARTS_TOTAL,
        CHECKPOINT_LAST_STEP,
        JOB_SHARDS,
        JOB_IMAGES_TOTAL,
        JOB_LOSS,
        JOB_PHASE,
        JOB_ETA_SECONDS,
    ] {
        assert!(has(Role::Coordinator, name), "coordinator lacks {name}");
    }
}

#[test]
fn rendered_output_of_every_role_passes_promtool_and_has_help_and_type() {
    for role in Role::ALL {
        let text = render(role);
        for d in CATALOG.iter().filter(|d| d.exported_by(role)) {
            assert!(
                text.contains(&format!("# HELP {} {}", d.name, d.help_text())),
                "{role:?}: no HELP for {}:\n{text}",
                d.name
            );
            assert!(
                text.contains(&format!("# TYPE {} {}", d.name, d.kind.as_str())),
                "{role:?}: wrong TYPE for {}:\n{text}",
                d.name
            );
        }
        assert!(
            text.contains(&format!("role=\"{}\"", role.as_str())),
            "{text}"
        );
        assert!(text.contains("host=\"node-a\""), "{text}");
        if promtool().is_none() {
            return;
        }
        let (ok, msg) = promtool_check_metrics(&text);
        assert!(ok, "{role:?}: promtool check metrics: {msg}\n{text}");
    }
}

#[test]
fn promtool_catches_a_metric_without_help() {
    // Guards the test above: it would pass vacuously if promtool accepted anything.
    if promtool().is_none() {
        return;
    }
    let (ok, _) = promtool_check_metrics("# TYPE declip_x_total counter\ndeclip_x_total 1\n");
    assert!(!ok, "promtool must refuse a metric without HELP");
}

#[test]
fn the_exporter_serves_metrics_on_the_port_it_reports() {
    // The recorder is process-wide: this is the only test that installs one.
    let addr = install_exporter(
        "127.0.0.1:0",
        &[(LABEL_JOB, "t"), (LABEL_ROLE, "trainer"), (LABEL_HOST, "h")],
    )
    .unwrap();
    assert_ne!(addr.port(), 0);
    describe(Role::Trainer);
    metrics::counter!(STEPS_TOTAL, LABEL_RANK => "0", LABEL_GENERATION => "1").increment(7);
    let body = http_get(addr, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let series = body
        .lines()
        .find(|l| l.starts_with("declip_steps_total{"))
        .unwrap_or_else(|| panic!("no declip_steps_total series: {body}"));
    for label in [
        "job=\"t\"",
        "role=\"trainer\"",
        "host=\"h\"",
        "rank=\"0\"",
        "generation=\"1\"",
    ] {
        assert!(series.contains(label), "{label} missing: {series}");
    }
    assert!(series.ends_with(" 7"), "{series}");
    assert!(body.contains("# HELP declip_steps_total"), "{body}");
    // A second exporter in the same process is refused, not silently ignored.
    assert!(install_exporter("127.0.0.1:0", &[]).is_err());
}

#[test]
fn global_labels_take_the_host_from_the_environment_or_the_kernel() {
    let labels = global_labels("j", Role::Teacher);
    assert_eq!(labels[0], (LABEL_JOB, "j".to_string()));
    assert_eq!(labels[1], (LABEL_ROLE, "teacher".to_string()));
    let host = &labels[2].1;
    let expected = std::env::var(HOST_ENV)
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
                .to_string()
        });
    assert_eq!(host, &expected);
}

#[test]
fn process_memory_is_the_resident_size() {
    let before = process_memory_bytes().expect("Linux has /proc/self/status");
    // Touch 64 MiB so the resident size must grow by most of it.
    let block = vec![1u8; 64 << 20];
    let after = process_memory_bytes().unwrap();
    assert_eq!(block.iter().map(|b| u64::from(*b)).sum::<u64>(), 64 << 20);
    assert!(after >= before + (32 << 20), "{before} -> {after}");
}

#[test]
fn a_malformed_listen_address_is_refused_with_the_address() {
    let err = install_exporter("not an address", &[]).unwrap_err();
    assert!(err.to_string().contains("not an address"), "{err}");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    // The listener runs on its own thread; it may need a moment to accept.
    let mut last = String::new();
    for _ in 0..50 {
        match std::net::TcpStream::connect(addr) {
            Ok(mut s) => {
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                return out;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("cannot connect to {addr}: {last}");
}

fn sample_status() -> crate::wire::JobStatus {
    use crate::wire::*;
    let rank = |r: u32, age: f64| RankStatus {
        rank: r,
        host: "node-a".into(),
        step: 40 + u64::from(r),
        images_per_s: 12.5,
        heartbeat_age: age,
        collective_seq: 7,
        step_times: Some(StepTimes {
            data_wait: 0.01,
            forward: 0.2,
            backward: 0.4,
            all_reduce: 0.05,
            optimizer: 0.02,
            total: 0.68,
        }),
        gpu_memory_bytes: 1 << 30,
        ..Default::default()
    };
    JobStatus {
        job: "demo".into(),
        phase: JobPhase::Training as i32,
        generation: 3,
        world_size: 2,
        step: 42,
        total_steps: 100,
        epoch: 1,
        images_per_s: 25.0,
        eta_s: 230.0,
        losses: Some(Losses {
            content: 0.5,
            context: 0.25,
            total: 0.525,
        }),
        // The third trainer waits outside the world (rank u32::MAX): no rank series.
        ranks: vec![rank(0, 0.5), rank(1, 3.5), rank(u32::MAX, 1.0)],
        teacher_progress: Some(TeacherProgress {
            shards_total: 10,
            shards_done: 6,
            shards_leased: 2,
            shards_failed: 1,
            bytes_written: 123456,
        }),
        last_checkpoint: Some(CheckpointRef {
            step: 40,
            ..Default::default()
        }),
        skips: vec![SkipCount {
            reason: "corrupt".into(),
            count: 2,
        }],
        images_total: 672,
        elapsed_s: 30.0,
        cache_hits: 600,
        cache_misses: 72,
        ..Default::default()
    }
}

fn series_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|lab| l.contains(lab)))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn the_job_status_becomes_the_coordinator_s_job_and_rank_series() {
    let recorder = local_recorder(&[
        (LABEL_JOB, "demo"),
        (LABEL_ROLE, "coordinator"),
        (LABEL_HOST, "node-a"),
    ]);
    let handle = recorder.handle();
    let mut status = sample_status();
    metrics::with_local_recorder(&recorder, || {
        describe(Role::Coordinator);
        export_job_status(&status);
        // A replayed, older status must not move counters back.
        status.images_total = 10;
        export_job_status(&status);
    });
    let text = handle.render();
    assert_eq!(series_value(&text, JOB_STEP, &[]), 42.0);
    assert_eq!(
        series_value(&text, JOB_PHASE, &["job_phase=\"training\""]),
        1.0
    );
    assert_eq!(
        series_value(&text, JOB_PHASE, &["job_phase=\"forming\""]),
        0.0
    );
    assert_eq!(series_value(&text, JOB_IMAGES_TOTAL, &[]), 672.0);
    assert_eq!(series_value(&text, JOB_CACHE_HITS_TOTAL, &[]), 600.0);
    assert_eq!(series_value(&text, JOB_CACHE_MISSES_TOTAL, &[]), 72.0);
    assert_eq!(
        series_value(&text, JOB_LOSS, &["component=\"context\""]),
        0.25
    );
    assert_eq!(series_value(&text, JOB_SHARDS, &["state=\"pending\""]), 1.0);
    assert_eq!(series_value(&text, JOB_SHARDS, &["state=\"leased\""]), 2.0);
    assert_eq!(
        series_value(&text, JOB_TEACHER_WRITTEN_BYTES_TOTAL, &[]),
        123456.0
    );
    assert_eq!(
        series_value(&text, JOB_DATA_SKIPS_TOTAL, &["reason=\"corrupt\""]),
        2.0
    );
    assert_eq!(
        series_value(&text, JOB_DATA_SKIPS_TOTAL, &["reason=\"missing\""]),
        0.0
    );
    assert_eq!(series_value(&text, CHECKPOINT_LAST_STEP, &[]), 40.0);
    assert_eq!(
        series_value(&text, RANK_HEARTBEAT_AGE_SECONDS, &["rank=\"1\""]),
        3.5
    );
    assert_eq!(series_value(&text, RANK_STEP, &["rank=\"1\""]), 41.0);
    assert_eq!(
        series_value(
            &text,
            RANK_STEP_PHASE_SECONDS,
            &["rank=\"0\"", "phase=\"backward\""]
        ),
        0.4
    );
    assert_eq!(series_value(&text, WORLD_SIZE, &[]), 2.0);
    assert!(!text.contains(&u32::MAX.to_string()), "{text}");
    for line in text.lines().filter(|l| l.starts_with("declip_")) {
        let name = line.split(['{', ' ']).next().unwrap();
        let def = find(name).unwrap_or_else(|| panic!("{name} is not in the catalog"));
        assert!(
            def.exported_by(Role::Coordinator),
            "{name} is not a coordinator metric"
        );
    }
    if promtool().is_some() {
        let (ok, msg) = promtool_check_metrics(&text);
        assert!(ok, "{msg}\n{text}");
    }
}
