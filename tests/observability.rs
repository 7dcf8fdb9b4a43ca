//! The shipped observability files against the real tools and the metric catalog:
//! `promtool` (Debian's prometheus, installed by scripts/setup-prometheus) checks
//! the rules and scrape configs, runs the alert unit tests and parses every
//! dashboard expression; every `declip_*` name used in deploy/ and docs/metrics.md
//! must be a name of `proto::metrics::CATALOG`, and the docs must list all of them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{prometheus, repo_root};
use proto::metrics::{MetricKind, CATALOG};

/// `promtool`, or `None` (with a message) on a developer machine without it. In CI
/// (`CI` set) a missing promtool fails the test: scripts/test installs it.
fn promtool() -> Option<Command> {
    prometheus::installed("promtool").then(|| Command::new("promtool"))
}

fn run_ok(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

const RULE_FILES: [&str; 2] = [
    "prometheus/rules/declip-recording.yml",
    "prometheus/rules/declip-alerts.yml",
];

#[test]
fn promtool_accepts_the_rules_and_the_scrape_config() {
    let Some(mut cmd) = promtool() else { return };
    cmd.args(["check", "rules"]).args(RULE_FILES.map(deploy));
    let text = run_ok(cmd, "promtool check rules");
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
    assert!(text.contains("SUCCESS: 11 rules found"), "{text}");
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "config"])
        .arg(deploy("prometheus/local.yml"));
    run_ok(cmd, "promtool check config local.yml");
}

#[test]
fn the_alerts_fire_on_synthetic_series() {
    let Some(mut cmd) = promtool() else { return };
    cmd.args(["test", "rules"])
        .arg(deploy("prometheus/tests/declip-alerts.test.yml"));
    run_ok(cmd, "promtool test rules");
}

#[test]
fn promtool_rejects_an_invalid_expression() {
    // Guards the dashboard test below: it relies on promtool parsing expressions.
    let Some(mut cmd) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = write_rules(dir.path(), &["sum by (job (declip_job_step)".to_string()]);
    let out = cmd.args(["check", "rules"]).arg(&file).output().unwrap();
    assert!(!out.status.success(), "promtool accepted broken PromQL");
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(deploy("grafana/declip-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// Every panel target's expression, panels inside rows included.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Grafana variables are not PromQL: substitute what Grafana would.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$job", "demo")
}

fn write_rules(dir: &Path, exprs: &[String]) -> PathBuf {
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        text.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let path = dir.join("dashboard-rules.yml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn every_dashboard_expression_is_valid_promql() {
    let exprs = dashboard_exprs(&dashboard());
    assert!(exprs.len() >= 30, "only {} expressions", exprs.len());
    let Some(mut cmd) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    let promql: Vec<String> = exprs.iter().map(|(_, e)| as_promql(e)).collect();
    let file = write_rules(dir.path(), &promql);
    cmd.args(["check", "rules"]).arg(&file);
    let text = run_ok(cmd, "promtool check rules (dashboard expressions)");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{text}"
    );
}

#[test]
fn the_dashboard_has_the_issue_s_panels_and_joins_gpus_by_host() {
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for row in [
        "Job overview",
        "Per-rank step time",
        "Losses",
        "Teacher pool",
        "Cache",
        "Failures",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(row)),
            "no row {row}: {rows:?}"
        );
    }
    let uses = |name: &str| exprs.iter().any(|(_, e)| e.contains(name));
    for name in [
        "declip_job_phase",
        "declip_job_step",
        "declip_job_eta_seconds",
        "declip_job_images_per_second",
        "declip_step_seconds_bucket",
        "rank:declip_step_phase_seconds:mean5m",
        "declip_job_loss",
        "declip_job_shards",
        "job:declip_cache_hit:ratio5m",
        "declip_restarts_total",
        "declip_rpc_rejected_total",
    ] {
        assert!(uses(name), "dashboard does not show {name}");
    }
    for dcgm in ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"] {
        let joined = exprs.iter().any(|(_, e)| {
            e.contains(dcgm) && e.contains("\"Hostname\"") && e.contains("on (host)")
        });
        assert!(joined, "{dcgm} is not joined to declip metrics by host");
    }
}

/// Every `declip_` metric name in `text`, with histogram series suffixes removed
/// when the base name is a histogram of the catalog.
fn declip_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("declip_") {
        let start = i + pos;
        let preceded = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        // `declip_` or `declip_job_*` is a prefix being talked about, not a metric.
        if !preceded && !text[start..end].ends_with('_') {
            out.insert(base_name(&text[start..end]));
        }
        i = end;
    }
    out
}

fn base_name(series: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if proto::metrics::find(base).is_some_and(|d| d.kind == MetricKind::Histogram) {
                return base.to_string();
            }
        }
    }
    series.to_string()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    common::tree(dir)
        .into_iter()
        .map(|p| dir.join(p))
        .filter(|p| p.is_file())
        .collect()
}

#[test]
fn every_declip_name_in_deploy_is_a_catalog_metric() {
    let mut checked = 0;
    for file in files_under(&repo_root().join("deploy")) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for name in declip_names(&text) {
            assert!(
                proto::metrics::find(&name).is_some(),
                "{}: {name} is not in proto::metrics::CATALOG",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} names found: is the scan broken?"
    );
}

#[test]
fn recording_rules_used_by_the_dashboard_and_alerts_exist() {
    let recording =
        std::fs::read_to_string(deploy("prometheus/rules/declip-recording.yml")).unwrap();
    let recorded: BTreeSet<String> = recording
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect();
    let alerts = std::fs::read_to_string(deploy("prometheus/rules/declip-alerts.yml")).unwrap();
    let mut used = dashboard_exprs(&dashboard())
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>();
    used.push(alerts);
    for text in used {
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.matches(':').count() == 2 && word.contains("declip_") {
                assert!(recorded.contains(word), "{word} is used but not recorded");
            }
        }
    }
}

#[test]
fn docs_metrics_md_lists_exactly_the_catalog() {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| `declip_"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let documented: BTreeSet<String> = rows
        .iter()
        .map(|r| r[1].trim_matches('`').to_string())
        .collect();
    let catalog: BTreeSet<String> = CATALOG.iter().map(|d| d.name.to_string()).collect();
    assert_eq!(rows.len(), documented.len(), "a metric is listed twice");
    assert_eq!(
        documented, catalog,
        "docs/metrics.md and the catalog differ"
    );
    for r in &rows {
        let d = proto::metrics::find(r[1].trim_matches('`')).unwrap();
        assert_eq!(r[2], d.kind.as_str(), "type of {}", d.name);
        assert_eq!(r[3], d.unit.as_str(), "unit of {}", d.name);
        for label in d.labels {
            assert!(r[4].contains(&format!("`{label}`")), "labels of {}", d.name);
        }
    }
    for name in declip_names(&doc) {
        assert!(proto::metrics::find(&name).is_some(), "docs name {name}");
    }
}
