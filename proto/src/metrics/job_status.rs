//! The coordinator's job-level and per-rank series, derived from the `JobStatus`
//! it already builds for `Status`/`WatchStatus`: one source for the CLI and the
//! scrape, so they cannot disagree.

use crate::wire::{JobStatus, Losses, RankStatus, StepTimes, TeacherProgress};

use super::names::*;

/// Sets every `declip_job_*` and `declip_rank_*` series (and the generation, world
/// size, last checkpoint and skip counts) from `status`. Call whenever the status
/// changes or before each scrape; counters only move forward (`absolute`), so a
/// status replayed after a coordinator restart never makes them go back.
pub fn export_job_status(status: &JobStatus) {
    export_phase(status.phase);
    metrics::gauge!(JOB_STEP).set(status.step as f64);
    metrics::gauge!(JOB_TOTAL_STEPS).set(status.total_steps as f64);
    metrics::gauge!(JOB_EPOCH).set(status.epoch as f64);
    metrics::gauge!(JOB_ETA_SECONDS).set(status.eta_s);
    metrics::gauge!(JOB_ELAPSED_SECONDS).set(status.elapsed_s);
    metrics::gauge!(JOB_IMAGES_PER_SECOND).set(status.images_per_s);
    metrics::counter!(JOB_IMAGES_TOTAL).absolute(status.images_total);
    metrics::counter!(JOB_CACHE_HITS_TOTAL).absolute(status.cache_hits);
    metrics::counter!(JOB_CACHE_MISSES_TOTAL).absolute(status.cache_misses);
    metrics::gauge!(GENERATION).set(status.generation as f64);
    metrics::gauge!(WORLD_SIZE).set(f64::from(status.world_size));
    if let Some(losses) = &status.losses {
        export_losses(losses);
    }
    if let Some(progress) = &status.teacher_progress {
        export_teacher_progress(progress);
    }
    let last = status.last_checkpoint.as_ref().map_or(0, |c| c.step);
    metrics::gauge!(CHECKPOINT_LAST_STEP).set(last as f64);
    // Every known reason from 0, so the skip panels and alerts have series in a clean
    // run; a reason this build does not know is exported as reported.
    for reason in crate::dataset::SkipReason::ALL.map(|r| r.as_str()) {
        metrics::counter!(JOB_DATA_SKIPS_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    for skip in &status.skips {
        metrics::counter!(JOB_DATA_SKIPS_TOTAL, LABEL_REASON => skip.reason.clone())
            .absolute(skip.count);
    }
    // Trainers waiting outside the world are listed with rank u32::MAX: not a rank.
    for rank in status.ranks.iter().filter(|r| r.rank != u32::MAX) {
        export_rank(rank);
    }
}

/// One 0/1 series per phase, so `declip_job_phase == 1` names the current one.
fn export_phase(phase: i32) {
    // JobPhase numbers the phases from 1 in the order of JOB_PHASES; 0 = unknown.
    let current = usize::try_from(phase).ok().and_then(|p| p.checked_sub(1));
    for (i, name) in JOB_PHASES.iter().enumerate() {
        let flag = if current == Some(i) { 1.0 } else { 0.0 };
        metrics::gauge!(JOB_PHASE, LABEL_JOB_PHASE => *name).set(flag);
    }
}

fn export_losses(losses: &Losses) {
    for (component, value) in
        LOSS_COMPONENTS
            .iter()
            .zip([losses.content, losses.context, losses.total])
    {
        metrics::gauge!(JOB_LOSS, LABEL_COMPONENT => *component).set(value);
    }
}

fn export_teacher_progress(p: &TeacherProgress) {
    let pending = p
        .shards_total
        .saturating_sub(p.shards_done + p.shards_leased + p.shards_failed);
    for (state, count) in
        SHARD_STATES
            .iter()
            .zip([pending, p.shards_leased, p.shards_done, p.shards_failed])
    {
        metrics::gauge!(JOB_SHARDS, LABEL_STATE => *state).set(f64::from(count));
    }
    metrics::counter!(JOB_TEACHER_WRITTEN_BYTES_TOTAL).absolute(p.bytes_written);
}

fn export_rank(r: &RankStatus) {
    let rank = r.rank.to_string();
    let gauge = |name: &'static str, value: f64| {
        metrics::gauge!(name, LABEL_RANK => rank.clone()).set(value);
    };
    gauge(RANK_HEARTBEAT_AGE_SECONDS, r.heartbeat_age);
    gauge(RANK_STEP, r.step as f64);
    gauge(RANK_IMAGES_PER_SECOND, r.images_per_s);
    gauge(RANK_COLLECTIVE_SEQUENCE, r.collective_seq as f64);
    gauge(RANK_GPU_MEMORY_BYTES, r.gpu_memory_bytes as f64);
    if let Some(times) = &r.step_times {
        for (phase, seconds) in step_parts(times) {
            metrics::gauge!(RANK_STEP_PHASE_SECONDS, LABEL_RANK => rank.clone(), LABEL_PHASE => phase)
                .set(seconds);
        }
    }
}

/// The parts of a step in [`STEP_PHASES`] order, then the whole step as `total`.
fn step_parts(t: &StepTimes) -> [(&'static str, f64); 6] {
    [
        (STEP_PHASES[0], t.data_wait),
        (STEP_PHASES[1], t.forward),
        (STEP_PHASES[2], t.backward),
        (STEP_PHASES[3], t.all_reduce),
        (STEP_PHASES[4], t.optimizer),
        ("total", t.total),
    ]
}
