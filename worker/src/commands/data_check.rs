//! `worker data-check`: reads the whole dataset as training would (annotations, every file,
//! every decode, every size) without training, and reports each problem with its path and
//! reason, then a summary by reason.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::dataset::{SkipCounts, SkipReason, SkippedImage};
use proto::job::DataSpec;
use worker::data::coco::{self, CocoPaths, CocoSource};
use worker::data::image::DecodeOptions;

/// Checks the dataset of `data`; with `index_only`, only reads the annotations (no file is
/// touched) and reports time and memory, for the index benchmark. Returns whether the
/// dataset is usable: its skips do not exceed `data.max_skip_fraction` of its entries.
pub fn data_check(data: &DataSpec, index_only: bool) -> anyhow::Result<bool> {
    let paths = CocoPaths::of(data)?;
    let rss_before = memory_kb("VmRSS");
    let started = Instant::now();
    let mut index = coco::read_annotations(&paths.annotations)?;
    let read_s = started.elapsed().as_secs_f64();
    println!(
        "annotations  {}: {} image entries, read in {read_s:.2} s",
        paths.annotations.display(),
        index.entries
    );
    if let (Some(before), Some(peak)) = (rss_before, memory_kb("VmHWM")) {
        println!(
            "memory       peak RSS {:.1} MiB ({:.1} MiB before reading)",
            peak as f64 / 1024.0,
            before as f64 / 1024.0
        );
    }
    if !index_only {
        coco::check_files(&mut index, &paths.images_dir);
    }
    println!(
        "index        {} images, fingerprint {}",
        index.images.len(),
        index.images.fingerprint()
    );
    let mut problems = index.skipped.clone();
    let mut counts = index.counts;
    if !index_only {
        let source = CocoSource::new(
            paths.images_dir.clone(),
            index.images.clone(),
            DecodeOptions::default(),
        );
        for bad in scan(&source) {
            counts.add(bad.reason);
            problems.push(bad);
        }
    }
    report(&problems, &counts, index.entries, data.max_skip_fraction);
    let usable = index.entries > 0 && !counts.exceeds(data.max_skip_fraction, index.entries);
    println!(
        "usable       {}",
        if usable {
            "yes"
        } else if index.entries == 0 {
            "NO: the annotations list no image"
        } else {
            "NO: more skips than data.max_skip_fraction allows (training would stop)"
        }
    );
    std::io::stdout().flush().context("writing the report")?;
    Ok(usable)
}

/// Loads every image of `source` on all cores; returns the failures in index order.
fn scan(source: &CocoSource) -> Vec<SkippedImage> {
    let images = source.index().images();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(images.len().max(1));
    println!(
        "scanning     {} images with {threads} threads",
        images.len()
    );
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let mut progress = Progress::new(images.len());
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<()>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, failures) = (&next, &failures);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(entry) = images.get(i) else {
                    break;
                };
                if let Err(bad) = source.load(entry) {
                    failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((i, bad));
                }
                if tx.send(()).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut done = 0;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(()) => done += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            progress.show(done);
        }
        progress.finish(done);
    });
    let mut failures = failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    failures.sort_by_key(|(i, _)| *i);
    failures.into_iter().map(|(_, bad)| bad).collect()
}

/// Every problem (stdout, one per line), then the counts by reason and the verdict's
/// arithmetic.
fn report(problems: &[SkippedImage], counts: &SkipCounts, entries: u64, max_fraction: f64) {
    println!("problems     {}", problems.len());
    for p in problems {
        println!("  {:<15} {p}", p.reason.as_str());
    }
    println!("skipped by reason");
    for reason in SkipReason::ALL {
        println!("  {:<15} {}", reason.as_str(), counts.get(reason));
    }
    println!(
        "skipped      {} of {entries} entries ({:.3} %); data.max_skip_fraction = {max_fraction} allows {}",
        counts.total(),
        100.0 * counts.fraction(entries),
        SkipCounts::limit(max_fraction, entries)
    );
}

/// A progress bar on a terminal (redrawn at most 10 times a second), or a plain line every
/// 10 seconds otherwise (logs, CI).
struct Progress {
    total: usize,
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let now = Instant::now();
        Self {
            total,
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, done: usize) {
        let every = if self.terminal {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.draw(done);
        }
    }

    fn finish(&mut self, done: usize) {
        self.draw(done);
        if self.terminal {
            eprintln!();
        }
    }

    fn draw(&self, done: usize) {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let eta = (self.total - done.min(self.total)) as f64 / rate.max(1e-9);
        let frac = done as f64 / self.total.max(1) as f64;
        let text = format!(
            "{done}/{} images ({:.0} %), {rate:.0} img/s, elapsed {}, ETA {}",
            self.total,
            100.0 * frac,
            clock(secs),
            clock(eta)
        );
        if self.terminal {
            const WIDTH: usize = 30;
            let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
            eprint!(
                "\r[{}{}] {text}\x1b[K",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled)
            );
        } else {
            eprintln!("scan: {text}");
        }
    }
}

/// `m:ss` (or `h:mm:ss`).
fn clock(secs: f64) -> String {
    let s = if secs.is_finite() { secs as u64 } else { 0 };
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// A `/proc/self/status` memory figure (`VmRSS`, `VmHWM`), in KiB; `None` off Linux.
fn memory_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
