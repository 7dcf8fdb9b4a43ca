//! What `launch` shows while the job runs: on a terminal, a bar for the teacher shards and
//! one for the training steps (ETA, images/s, losses); otherwise a plain line now and then
//! (CI logs, `nohup`). Both read the coordinator's own `JobStatus`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::wire::{JobPhase, JobStatus};

/// Seconds between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub enum Progress {
    Bars {
        multi: MultiProgress,
        teachers: Option<ProgressBar>,
        steps: ProgressBar,
    },
    Plain {
        last: Option<Instant>,
        last_line: String,
    },
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise. `cache_mode`: show teachers.
    pub fn new(cache_mode: bool) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Plain {
                last: None,
                last_line: String::new(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let teachers = cache_mode.then(|| {
            multi.add(ProgressBar::new(0).with_style(style(
                "teachers {bar:30.cyan/blue} {pos}/{len} shards  {msg}",
            )))
        });
        let steps = multi.add(ProgressBar::new(0).with_style(style(
            "training {bar:30.green/white} {pos}/{len} steps  ETA {eta}  {msg}",
        )));
        Progress::Bars {
            multi,
            teachers,
            steps,
        }
    }

    pub fn update(&mut self, status: &JobStatus) {
        match self {
            Progress::Bars {
                teachers, steps, ..
            } => {
                if let (Some(bar), Some(t)) = (teachers, &status.teacher_progress) {
                    bar.set_length(t.shards_total as u64);
                    bar.set_position(t.shards_done as u64);
                    bar.set_message(format!(
                        "{} leased, {} failed, {}",
                        t.shards_leased,
                        t.shards_failed,
                        bytes(t.bytes_written)
                    ));
                }
                steps.set_length(status.total_steps);
                steps.set_position(status.step);
                steps.set_message(training_message(status));
            }
            Progress::Plain { last, last_line } => {
                let line = plain_line(status);
                let due = last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if due && line != *last_line {
                    eprintln!("{line}");
                    *last = Some(Instant::now());
                    *last_line = line;
                }
            }
        }
    }

    /// A line above the bars (or on its own line without them).
    pub fn note(&self, line: &str) {
        match self {
            Progress::Bars { multi, .. } => {
                if multi.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            Progress::Plain { .. } => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Progress::Bars {
            teachers, steps, ..
        } = self
        {
            if let Some(bar) = teachers {
                bar.finish();
            }
            steps.finish();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn training_message(s: &JobStatus) -> String {
    let phase = phase_name(s.phase());
    let losses = s
        .losses
        .as_ref()
        .map(|l| {
            format!(
                "loss {:.4} (content {:.4}, context {:.4})",
                l.total, l.content, l.context
            )
        })
        .unwrap_or_default();
    format!(
        "{phase} gen {} world {}  {:.1} img/s  {losses}",
        s.generation, s.world_size, s.images_per_s
    )
}

/// One line for logs: phase, teachers, step/total, rate, ETA, loss.
pub fn plain_line(s: &JobStatus) -> String {
    let mut line = format!("[{}]", phase_name(s.phase()));
    if let Some(t) = &s.teacher_progress {
        if t.shards_total > 0 {
            line += &format!(" teachers {}/{} shards", t.shards_done, t.shards_total);
        }
    }
    line += &format!(
        " step {}/{} gen {} world {}",
        s.step, s.total_steps, s.generation, s.world_size
    );
    if s.images_per_s > 0.0 {
        line += &format!(" {:.1} img/s", s.images_per_s);
    }
    if s.eta_s > 0.0 && s.step < s.total_steps {
        line += &format!(" ETA {}", duration(s.eta_s));
    }
    if let Some(l) = &s.losses {
        line += &format!(" loss {:.4}", l.total);
    }
    line
}

/// `training` for `JOB_PHASE_TRAINING` (lower case reads better in progress lines).
pub fn phase_name(phase: JobPhase) -> String {
    crate::state::job::phase_name(phase).to_lowercase()
}

pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::{Losses, TeacherProgress};

    #[test]
    fn plain_line_says_phase_teachers_step_rate_eta_and_loss() {
        let status = JobStatus {
            phase: JobPhase::Training as i32,
            step: 12,
            total_steps: 96,
            generation: 1,
            world_size: 2,
            images_per_s: 8.0,
            eta_s: 130.0,
            losses: Some(Losses {
                content: 0.5,
                context: 0.25,
                total: 0.525,
            }),
            teacher_progress: Some(TeacherProgress {
                shards_total: 6,
                shards_done: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            plain_line(&status),
            "[training] teachers 4/6 shards step 12/96 gen 1 world 2 8.0 img/s ETA 2m10s loss 0.5250"
        );
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(duration(59.4), "59s");
        assert_eq!(duration(3725.0), "62m05s");
        assert_eq!(duration(7325.0), "2h02m");
    }
}
