//! A real Prometheus server (Debian's package) for the end-to-end tests: started on a
//! free loopback port with the shipped rule files, queried through its HTTP API.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::repo_root;

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `tool --version` runs. In CI (`CI` set) a missing tool fails the test:
/// scripts/test installs it (scripts/setup-prometheus).
pub fn installed(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing in CI: scripts/test runs scripts/setup-prometheus first"
        );
        eprintln!("SKIPPED: {tool} not installed (run scripts/setup-prometheus)");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Starts Prometheus in `dir` with a 1 s scrape and evaluation interval, the shipped
/// recording and alert rules, and `scrape_configs` (YAML list items, indented by 2).
pub fn start(dir: &Path, scrape_configs: &str) -> Prometheus {
    let rules = repo_root().join("deploy/prometheus/rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n  - {}\n\
         scrape_configs:\n{scrape_configs}",
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

/// The last lines of the server's log, newest first (for failure messages).
pub fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
}

pub fn get_json(url: &str, query: Option<&str>) -> Option<Value> {
    let mut req = ureq::get(url);
    if let Some(q) = query {
        req = req.query("query", q);
    }
    let mut resp = req.call().ok()?;
    let text = resp.body_mut().read_to_string().ok()?;
    serde_json::from_str(&text).ok()
}

/// GET `http://{addr}{path}` as text.
pub fn get_text(addr: &str, path: &str) -> Option<String> {
    let mut resp = ureq::get(format!("http://{addr}{path}")).call().ok()?;
    resp.body_mut().read_to_string().ok()
}

impl Prometheus {
    /// The result of an instant query, or the error Prometheus gave.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let body = get_json(&url, Some(expr)).ok_or("no answer")?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every rule group loaded and every rule `health: ok`; returns how many rules.
    pub fn rules_healthy(&self) -> Result<usize, String> {
        let url = format!("http://{}/api/v1/rules", self.addr);
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
}

/// Rules in the shipped files (recording + alerts).
pub fn shipped_rule_count() -> usize {
    ["declip-recording.yml", "declip-alerts.yml"]
        .iter()
        .map(|f| {
            let path = repo_root().join("deploy/prometheus/rules").join(f);
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    l.starts_with("- record:") || l.starts_with("- alert:")
                })
                .count()
        })
        .sum()
}

/// Every PromQL expression of the Grafana dashboard, with `$job` set to `job` and the
/// rate interval to 1m.
pub fn dashboard_exprs(job: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/grafana/declip-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            out.push(e.replace("$__rate_interval", "1m").replace("$job", job));
        }
    }
    out
}

/// The names the recording rules record.
pub fn recorded_names() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/rules/declip-recording.yml"))
            .unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect()
}

/// `promtool check metrics` on an exposition text: `(passed, promtool's output)`.
pub fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
