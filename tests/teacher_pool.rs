//! The teacher pool under a real `coordinator serve`, with real worker processes:
//! - a teacher SIGKILLed mid-shard leaves no visible partial file; its lease expires and
//!   another teacher completes the shard;
//! - a flipped byte in a cached record is caught by the trainer that reads it (naming
//!   shard and image), the coordinator requeues the shard, a teacher recomputes it, and
//!   the job completes every step.
//!
//! Cache files are checked here with an independent reader of docs/cache-format.md.

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::binary;
use proto::cache::{cache_dir, shard_path, temp_prefix, MAGIC};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOKEN: &str = "e2e-teacher-pool-token";

/// Generous: these machines are shared by parallel builds (and swap while those link).
/// Every wait ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(300);
/// For a whole training job, as tests/coordinator_restart.rs allows.
const JOB_DEADLINE: Duration = Duration::from_secs(600);

/// Every process a test started; all of them are SIGKILLed when the test ends, however
/// it ends.
#[derive(Default)]
struct Processes(Vec<Child>);

impl Processes {
    fn add(&mut self, child: Child) -> usize {
        self.0.push(child);
        self.0.len() - 1
    }

    fn get(&mut self, at: usize) -> &mut Child {
        &mut self.0[at]
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `coordinator serve` in `dir` with the embedded demo job and `sets`; its stderr lines
/// are collected in the returned log.
struct Coordinator {
    addr: String,
    at: usize,
    log: Arc<Mutex<Vec<String>>>,
}

impl Coordinator {
    fn serve(procs: &mut Processes, dir: &Path, sets: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = binary("coordinator")
            .current_dir(dir)
            .args(["serve", "--listen", &addr])
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .env(proto::auth::TOKEN_ENV, TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start coordinator serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        let coordinator = Self {
            addr,
            at: procs.add(child),
            log,
        };
        wait_until("the coordinator to listen", || {
            coordinator.has_line(&["listening on"])
        });
        coordinator
    }

    fn lines(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// Whether one line holds every one of `words`.
    fn has_line(&self, words: &[&str]) -> bool {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|l| words.iter().all(|w| l.contains(w)))
    }

    /// `coordinator status --json`; `None` while it cannot answer.
    fn status(&self) -> Option<Value> {
        let output = binary("coordinator")
            .args(["status", "--json", "--addr", &self.addr])
            .env(proto::auth::TOKEN_ENV, TOKEN)
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    fn shards_done(&self) -> Option<(u64, u64)> {
        let status = self.status()?;
        let progress = &status["teacher_progress"];
        Some((
            progress["shards_done"].as_u64()?,
            progress["shards_total"].as_u64()?,
        ))
    }
}

/// `worker teach|train --coordinator ADDR` in `dir`, stdout and stderr into `dir/log`.
fn worker(procs: &mut Processes, dir: &Path, command: &str, addr: &str, log: &str) -> usize {
    worker_with(procs, dir, command, addr, log, &[])
}

/// [`worker`] with extra environment variables.
fn worker_with(
    procs: &mut Processes,
    dir: &Path,
    command: &str,
    addr: &str,
    log: &str,
    env: &[(&str, String)],
) -> usize {
    let log = std::fs::File::create(dir.join(log)).expect("create the worker log");
    let child = binary("worker")
        .current_dir(dir)
        .args([command, "--coordinator", addr, "--device", "cpu"])
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .expect("start a worker");
    procs.add(child)
}

fn read_log(dir: &Path, log: &str) -> String {
    std::fs::read_to_string(dir.join(log)).unwrap_or_default()
}

/// Polls `done` every 200 ms until it holds (true) or `limit` passes (false).
fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    assert!(poll_until(DEADLINE, done), "timed out waiting for {what}");
}

/// The child's exit status; `None` if it is still running after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    poll_until(limit, || {
        status = child.try_wait().expect("poll a child");
        status.is_some()
    });
    status
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn journal(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("journal.jsonl"))
        .expect("the coordinator's journal")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a journal record is JSON"))
        .collect()
}

fn records<'a>(journal: &'a [Value], kind: &str, shard: u64) -> Vec<&'a Value> {
    journal
        .iter()
        .filter(|r| r["record"] == kind && r["shard"] == shard)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    proto::cache::hex(&Sha256::digest(bytes))
}

/// A shard file per docs/cache-format.md: its header JSON, after checking both magics and
/// the header's SHA-256 (not the records).
fn shard_header(bytes: &[u8]) -> Result<Value, String> {
    const TRAILER: usize = 8 + 32 + 8;
    if bytes.len() < 16 + TRAILER || bytes[..8] != MAGIC || bytes[bytes.len() - 8..] != MAGIC {
        return Err("bad magic or too short".into());
    }
    let trailer = bytes.len() - TRAILER;
    let len_bytes: [u8; 8] = bytes[trailer..trailer + 8]
        .try_into()
        .map_err(|_| "header length")?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|e| e.to_string())?;
    let start = trailer.checked_sub(len).ok_or("header length too large")?;
    let json = &bytes[start..trailer];
    if Sha256::digest(json).as_slice() != &bytes[trailer + 8..trailer + 40] {
        return Err("header checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

/// `(offset, len, sha256)` of a record's blob.
fn blob(record: &Value) -> (usize, usize, &str) {
    let b = &record["blob"];
    (
        b["offset"].as_u64().expect("blob offset") as usize,
        b["len"].as_u64().expect("blob len") as usize,
        b["sha256"].as_str().expect("blob sha256"),
    )
}

/// Checks a whole shard file: header, and every record's checksum; returns the header.
fn verify_shard(bytes: &[u8], shard: u64, images: std::ops::Range<u64>) -> Result<Value, String> {
    let header = shard_header(bytes)?;
    if header["shard"] != shard || header["start"] != images.start || header["end"] != images.end {
        return Err(format!("header of another shard: {header}"));
    }
    let records = header["records"].as_array().ok_or("no records")?;
    let indices: Vec<u64> = records.iter().filter_map(|r| r["index"].as_u64()).collect();
    if indices != images.clone().collect::<Vec<_>>() {
        return Err(format!("record indices {indices:?}, want {images:?}"));
    }
    for record in records {
        let (offset, len, sha) = blob(record);
        let payload = bytes
            .get(offset..offset + len)
            .ok_or_else(|| format!("record {record} outside the file"))?;
        if sha256_hex(payload) != sha {
            return Err(format!(
                "record of image {} checksum mismatch",
                record["image_id"]
            ));
        }
    }
    Ok(header)
}

/// XORs one byte in place (no rewrite of the file, as a disk fault would).
fn flip_byte(file: &Path, offset: u64) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open the shard file");
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x10;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
}

/// The size of a file, 0 when it is not there.
fn size_of(file: &Path) -> u64 {
    std::fs::metadata(file).map_or(0, |m| m.len())
}

#[test]
fn a_teacher_killed_mid_shard_leaves_nothing_visible_and_another_completes_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Processes::default();
    // One shard of 32 images, leases of 3 s.
    let coordinator = Coordinator::serve(
        &mut procs,
        dir.path(),
        &[
            "job.run_dir=\"run\"",
            "data.synthetic_images=32",
            "data.shard_size=32",
            "teachers.lease_s=3",
        ],
    );
    let run = dir.path().join("run");
    let cache = cache_dir(&run);
    let final_file = shard_path(&cache, 0);

    // Teacher A holds after its third record until a file that never appears exists:
    // it cannot finish the shard before the kill, however fast the machine is.
    let never = dir.path().join("never-released");
    let a = worker_with(
        &mut procs,
        dir.path(),
        "teach",
        &coordinator.addr,
        "teacher-a.log",
        &[(
            proto::faults::ENV,
            proto::faults::hold_at(proto::faults::RECORD_WRITTEN, 3, &never),
        )],
    );
    let a_pid = procs.get(a).id();
    let a_temp = cache.join(format!("{}{a_pid}", temp_prefix(0)));
    // Mid-shard: the coordinator shows A holding shard 0, and A's temporary already holds
    // records (more than the 16-byte prefix) but the shard is not published.
    // The lease is seen at any time before it lapses during the hold; remembered once seen.
    let mut seen_lease = false;
    wait_until("teacher A to be mid-shard", || {
        assert!(
            !final_file.exists(),
            "teacher A finished before the kill; make its shard larger\n{}",
            read_log(dir.path(), "teacher-a.log")
        );
        let leased = || {
            coordinator.status().is_some_and(|s| {
                s["teachers"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["worker_id"] == "w1" && t["shard"] == 0))
            })
        };
        seen_lease = seen_lease || leased();
        size_of(&a_temp) > 16 && seen_lease
    });
    procs.get(a).kill().expect("SIGKILL teacher A");
    procs.get(a).wait().expect("reap teacher A");
    let partial = size_of(&a_temp);

    // Nothing visible: no shard file, only A's hidden temporary, which no reader opens
    // (they open `shard-NNNNN.dcache` only).
    let left = names(&cache);
    assert!(!final_file.exists(), "a partial shard is visible: {left:?}");
    let temp_name = a_temp.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        left,
        std::slice::from_ref(&temp_name),
        "only A's temporary remains"
    );
    assert!(temp_name.starts_with('.') && !temp_name.ends_with(proto::cache::SHARD_SUFFIX));
    assert_eq!(coordinator.shards_done(), Some((0, 1)));

    let b = worker(
        &mut procs,
        dir.path(),
        "teach",
        &coordinator.addr,
        "teacher-b.log",
    );
    wait_until("teacher B to complete shard 0", || {
        coordinator.shards_done() == Some((1, 1))
    });
    let b_log = read_log(dir.path(), "teacher-b.log");
    assert!(
        b_log.contains("registered") && b_log.contains(" as w2 "),
        "{b_log}"
    );
    assert!(b_log.contains("shard 0 done: 32 images"), "{b_log}");
    assert!(
        coordinator.has_line(&["lease of shard 0 by w1 expired"]),
        "the coordinator should re-issue A's shard after its lease expired:\n{}",
        coordinator.lines()
    );
    assert!(
        !read_log(dir.path(), "teacher-a.log").contains("shard 0 done"),
        "A never completed the shard"
    );

    // B's file is whole and is the one the coordinator recorded; A's temporary is gone
    // (B's writer removes temporaries of dead processes).
    assert_eq!(names(&cache), [proto::cache::shard_file_name(0)]);
    let bytes = std::fs::read(&final_file).unwrap();
    assert!(bytes.len() as u64 > partial);
    verify_shard(&bytes, 0, 0..32).unwrap_or_else(|e| panic!("B's shard: {e}"));
    let journal = journal(&run);
    let done = records(&journal, "shard_done", 0);
    assert_eq!(done.len(), 1, "one completion, by B: {journal:?}");
    assert_eq!(done[0]["checksum"], sha256_hex(&bytes).as_str());
    assert_eq!(done[0]["bytes"], bytes.len() as u64);
    assert!(
        procs.get(b).try_wait().unwrap().is_none(),
        "B stays for more work"
    );
}

#[test]
fn a_flipped_byte_is_reported_recomputed_and_training_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Processes::default();
    // 16 images in 2 shards of 8; 2 epochs of batch 4 = 8 steps for 2 trainers.
    let coordinator = Coordinator::serve(
        &mut procs,
        dir.path(),
        &[
            "job.run_dir=\"run\"",
            "data.synthetic_images=16",
            "data.shard_size=8",
            "train.epochs=2",
        ],
    );
    let run = dir.path().join("run");
    let teacher = worker(
        &mut procs,
        dir.path(),
        "teach",
        &coordinator.addr,
        "teacher.log",
    );
    wait_until("the teacher to cache both shards", || {
        coordinator.shards_done() == Some((2, 2))
    });

    // Flip a byte in the middle of the record of the 3rd image of shard 1.
    let file = shard_path(&cache_dir(&run), 1);
    let original = std::fs::read(&file).unwrap();
    let header = verify_shard(&original, 1, 8..16).expect("the teacher's shard verifies");
    let record = &header["records"][2];
    let image_id = record["image_id"].as_u64().expect("image id");
    let (offset, len, _) = blob(record);
    flip_byte(&file, (offset + len / 2) as u64);
    let flipped = std::fs::read(&file).unwrap();
    assert_eq!(
        verify_shard(&flipped, 1, 8..16),
        Err(format!("record of image {image_id} checksum mismatch")),
        "the flip landed inside that record"
    );

    let trainers = [
        worker(
            &mut procs,
            dir.path(),
            "train",
            &coordinator.addr,
            "trainer-0.log",
        ),
        worker(
            &mut procs,
            dir.path(),
            "train",
            &coordinator.addr,
            "trainer-1.log",
        ),
    ];
    // `serve` exits once the job is over.
    let status = wait_exit(procs.get(coordinator.at), JOB_DEADLINE);
    let logs = ["trainer-0.log", "trainer-1.log", "teacher.log"]
        .map(|l| format!("--- {l}\n{}", read_log(dir.path(), l)))
        .join("\n");
    assert!(
        status.is_some_and(|s| s.success()),
        "coordinator: {status:?}\n{}\n{logs}",
        coordinator.lines()
    );
    for at in trainers.into_iter().chain([teacher]) {
        let status = wait_exit(procs.get(at), DEADLINE);
        assert!(status.is_some_and(|s| s.success()), "{status:?}\n{logs}");
    }

    // The trainer that read the record named the shard and the image.
    let trainer_logs: Vec<String> = ["trainer-0.log", "trainer-1.log"]
        .iter()
        .map(|l| read_log(dir.path(), l))
        .collect();
    assert!(
        trainer_logs.iter().any(|l| l
            .lines()
            .any(|line| line.contains("run/cache/shard-00001.dcache")
                && line.contains(&format!("corrupt at image {image_id}")))),
        "no trainer reported image {image_id} of shard 1 as corrupt\n{logs}"
    );

    // The coordinator requeued shard 1, then a teacher completed it again.
    let journal = journal(&run);
    let requeued = records(&journal, "shard_requeued", 1);
    assert_eq!(requeued.len(), 1, "{journal:?}");
    let reason = requeued[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("image {image_id}")), "{reason}");
    let at = |r: &Value| journal.iter().position(|j| std::ptr::eq(j, r));
    let done = records(&journal, "shard_done", 1);
    assert_eq!(done.len(), 2, "computed, then recomputed: {journal:?}");
    assert!(at(done[0]) < at(requeued[0]) && at(requeued[0]) < at(done[1]));
    assert_eq!(records(&journal, "shard_requeued", 0).len(), 0);
    let teacher_log = read_log(dir.path(), "teacher.log");
    assert_eq!(
        teacher_log.matches("shard 1 done: 8 images").count(),
        2,
        "{teacher_log}"
    );

    // The recomputed file verifies, is the one recorded, and (teachers are deterministic)
    // has the bytes of the first computation.
    let recomputed = std::fs::read(&file).unwrap();
    verify_shard(&recomputed, 1, 8..16).unwrap_or_else(|e| panic!("recomputed shard: {e}"));
    assert_eq!(done[1]["checksum"], sha256_hex(&recomputed).as_str());
    assert_eq!(recomputed, original);

    // Every step ran: 16 images / batch 4 x 2 epochs = 8, checkpointed and exported.
    assert!(journal
        .iter()
        .any(|r| r["record"] == "phase" && r.to_string().contains("COMPLETED")));
    assert!(run.join("checkpoints/step-00000008").is_dir());
    assert!(run.join("exports/final.safetensors").exists());
}
