//! The `/metrics` addresses of a local run, for people and for Prometheus: each new
//! address is printed once, and all of them are kept in `run_dir/metrics-targets.json`
//! in Prometheus's file service-discovery format, which `deploy/prometheus/local.yml`
//! reads (Prometheus re-reads the file when it changes).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use proto::wire::JobStatus;

pub const FILE_NAME: &str = "metrics-targets.json";

/// Every `/metrics` address seen so far, by the process that serves it.
pub struct MetricsTargets {
    path: PathBuf,
    /// Address → who serves it ("coordinator", "trainer w3", "teacher w1").
    known: BTreeMap<String, String>,
}

impl MetricsTargets {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join(FILE_NAME),
            known: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `addr` served by `who`; returns whether it is new (and the file rewritten).
    pub fn add(&mut self, who: &str, addr: &str) -> std::io::Result<bool> {
        if addr.is_empty() || self.known.contains_key(addr) {
            return Ok(false);
        }
        self.known.insert(addr.to_string(), who.to_string());
        self.write()?;
        Ok(true)
    }

    /// The workers' addresses in `status` that were not seen before, as
    /// `(who, address)`, after adding them.
    pub fn observe(&mut self, status: &JobStatus) -> std::io::Result<Vec<(String, String)>> {
        let trainers = status
            .ranks
            .iter()
            .map(|r| (format!("trainer {}", r.worker_id), &r.metrics_address));
        let teachers = status
            .teachers
            .iter()
            .map(|t| (format!("teacher {}", t.worker_id), &t.metrics_address));
        let mut new = Vec::new();
        for (who, addr) in trainers.chain(teachers) {
            if self.add(&who, addr)? {
                new.push((who, addr.clone()));
            }
        }
        Ok(new)
    }

    /// `[{"targets": [...], "labels": {}}]`, written to a temp file and renamed so
    /// Prometheus never reads half a file. Restarted workers add addresses; old ones
    /// stay (a dead target shows as down, which is what happened).
    fn write(&self) -> std::io::Result<()> {
        let targets: Vec<&String> = self.known.keys().collect();
        let body = serde_json::json!([{ "targets": targets, "labels": {} }]);
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(body.to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::{RankStatus, TeacherStatus};

    #[test]
    fn new_addresses_are_reported_once_and_written_for_file_discovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut targets = MetricsTargets::new(dir.path());
        assert!(targets.add("coordinator", "127.0.0.1:9000").unwrap());
        let status = JobStatus {
            ranks: vec![RankStatus {
                worker_id: "w2".into(),
                metrics_address: "127.0.0.1:9002".into(),
                ..Default::default()
            }],
            teachers: vec![
                TeacherStatus {
                    worker_id: "w1".into(),
                    metrics_address: "127.0.0.1:9001".into(),
                    ..Default::default()
                },
                // Not serving yet.
                TeacherStatus {
                    worker_id: "w3".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let new = targets.observe(&status).unwrap();
        assert_eq!(
            new,
            [
                ("trainer w2".to_string(), "127.0.0.1:9002".to_string()),
                ("teacher w1".to_string(), "127.0.0.1:9001".to_string()),
            ]
        );
        assert!(targets.observe(&status).unwrap().is_empty());
        let text = std::fs::read_to_string(targets.path()).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed[0]["targets"],
            serde_json::json!(["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"])
        );
    }
}
