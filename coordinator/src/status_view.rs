//! `coordinator status`: a [`JobStatus`] as a readable table (or JSON).

use std::fmt::Write as _;

use proto::wire::{JobPhase, JobStatus, WorkerState};
use serde_json::{json, Value};

use crate::state::job::phase_name;

fn state_name(state: i32) -> &'static str {
    let name = WorkerState::try_from(state).map_or("WORKER_STATE_UNSPECIFIED", |s| s.as_str_name());
    name.strip_prefix("WORKER_STATE_").unwrap_or(name)
}

fn phase(status: &JobStatus) -> &'static str {
    JobPhase::try_from(status.phase).map_or("UNSPECIFIED", phase_name)
}

fn duration(seconds: f64) -> String {
    if seconds <= 0.0 || !seconds.is_finite() {
        return "-".into();
    }
    let s = seconds.round() as u64;
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// The status as a table for a terminal.
fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

pub fn table(s: &JobStatus) -> String {
    let mut out = String::new();
    let losses = s.losses.unwrap_or_default();
    let _ = writeln!(
        out,
        "job {}  phase {}  generation {}  world {}  restarts {}",
        s.job,
        phase(s),
        s.generation,
        s.world_size,
        s.restarts
    );
    let _ = writeln!(
        out,
        "step {}/{}  epoch {}  {:.1} img/s  ETA {}  elapsed {}",
        s.step,
        s.total_steps,
        s.epoch,
        s.images_per_s,
        duration(s.eta_s),
        duration(s.elapsed_s)
    );
    let _ = writeln!(
        out,
        "loss total {:.4}  content {:.4}  context {:.4}",
        losses.total, losses.content, losses.context
    );
    if !s.error.is_empty() {
        let _ = writeln!(out, "error: {}", s.error);
    }
    let _ = writeln!(
        out,
        "\n{:>4}  {:<8} {:<16} {:>8} {:>8} {:>9}  host  metrics",
        "rank", "worker", "state", "step", "img/s", "heartbeat"
    );
    for r in &s.ranks {
        let rank = if r.rank == u32::MAX {
            "-".to_string()
        } else {
            r.rank.to_string()
        };
        let _ = writeln!(
            out,
            "{rank:>4}  {:<8} {:<16} {:>8} {:>8.1} {:>8.1}s  {}  {}",
            r.worker_id,
            state_name(r.state),
            r.step,
            r.images_per_s,
            r.heartbeat_age,
            r.host,
            or_dash(&r.metrics_address)
        );
    }
    let p = s.teacher_progress.unwrap_or_default();
    let _ = writeln!(
        out,
        "\nteachers: shards {}/{} done, {} leased, {} bytes",
        p.shards_done, p.shards_total, p.shards_leased, p.bytes_written
    );
    for t in &s.teachers {
        let shard = if t.shard < 0 {
            "-".into()
        } else {
            t.shard.to_string()
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<16} shard {shard:<6} {:>8.1} img/s  heartbeat {:.1}s  {}  metrics {}",
            t.worker_id,
            state_name(t.state),
            t.images_per_s,
            t.heartbeat_age,
            t.host,
            or_dash(&t.metrics_address)
        );
    }
    match &s.last_checkpoint {
        Some(c) => {
            let _ = writeln!(out, "last checkpoint: step {} at {}", c.step, c.path);
        }
        None => {
            let _ = writeln!(out, "last checkpoint: none");
        }
    }
    if !s.recent_events.is_empty() {
        let _ = writeln!(out, "recent events:");
        for e in &s.recent_events {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}

/// The status as JSON (phase and states by name).
pub fn to_json(s: &JobStatus) -> Value {
    let losses = |l: Option<proto::wire::Losses>| {
        let l = l.unwrap_or_default();
        json!({"content": l.content, "context": l.context, "total": l.total})
    };
    let p = s.teacher_progress.unwrap_or_default();
    json!({
        "job": s.job,
        "phase": phase(s),
        "generation": s.generation,
        "world_size": s.world_size,
        "step": s.step,
        "total_steps": s.total_steps,
        "epoch": s.epoch,
        "images_per_s": s.images_per_s,
        "eta_s": s.eta_s,
        "elapsed_s": s.elapsed_s,
        "restarts": s.restarts,
        "error": s.error,
        "losses": losses(s.losses),
        "ranks": s.ranks.iter().map(|r| json!({
            "rank": (r.rank != u32::MAX).then_some(r.rank),
            "worker_id": r.worker_id,
            "host": r.host,
            "state": state_name(r.state),
            "step": r.step,
            "images_per_s": r.images_per_s,
            "heartbeat_age_s": r.heartbeat_age,
            "collective_seq": r.collective_seq,
            "losses": losses(r.losses),
            "metrics_address": r.metrics_address,
        })).collect::<Vec<_>>(),
        "teachers": s.teachers.iter().map(|t| json!({
            "worker_id": t.worker_id,
            "host": t.host,
            "state": state_name(t.state),
            "shard": (t.shard >= 0).then_some(t.shard),
            "images_per_s": t.images_per_s,
            "heartbeat_age_s": t.heartbeat_age,
            "metrics_address": t.metrics_address,
        })).collect::<Vec<_>>(),
        "teacher_progress": {
            "shards_total": p.shards_total,
            "shards_done": p.shards_done,
            "shards_leased": p.shards_leased,
            "bytes_written": p.bytes_written,
        },
        "last_checkpoint": s.last_checkpoint.as_ref().map(|c| json!({
            "step": c.step, "path": c.path, "checksum": c.checksum,
        })),
        "recent_events": s.recent_events,
        "skips": s.skips.iter().map(|k| (k.reason.clone(), k.count)).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::RankStatus;

    #[test]
    fn the_table_names_phase_ranks_and_checkpoint() {
        let s = JobStatus {
            job: "demo".into(),
            phase: JobPhase::Training as i32,
            generation: 2,
            world_size: 1,
            step: 5,
            total_steps: 10,
            ranks: vec![RankStatus {
                rank: 0,
                worker_id: "w1".into(),
                state: WorkerState::Training as i32,
                step: 5,
                metrics_address: "127.0.0.1:9100".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = table(&s);
        assert!(t.contains("127.0.0.1:9100"), "{t}");
        assert!(t.contains("phase TRAINING"), "{t}");
        assert!(t.contains("step 5/10"), "{t}");
        assert!(t.contains("w1") && t.contains("TRAINING"), "{t}");
        assert!(t.contains("last checkpoint: none"), "{t}");
        let j = to_json(&s);
        assert_eq!(j["phase"], "TRAINING");
        assert_eq!(j["ranks"][0]["state"], "TRAINING");
        assert_eq!(j["ranks"][0]["metrics_address"], "127.0.0.1:9100");
    }
}
