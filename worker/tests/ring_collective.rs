//! The CPU ring: sums and broadcasts of awkward sizes, bitwise agreement between
//! ranks, refusal of stale generations, abort from another thread, and a peer killed
//! (SIGKILL, real processes) in the middle of an all-reduce.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use worker::comm::ring::{RingCollective, RingListener};
use worker::comm::{Collective, CommError};

const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for something that should take a second before calling it a
/// hang: generous, so a loaded 2-core machine cannot fail it.
const HANG_DEADLINE: Duration = Duration::from_secs(120);

fn listeners(world: usize) -> (Vec<RingListener>, Vec<String>) {
    let ls: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers = ls.iter().map(RingListener::address).collect();
    (ls, peers)
}

/// Runs `f(rank, ring)` on every rank of a fresh ring, one thread each.
fn on_ring<T: Send>(
    world: usize,
    chunk_bytes: usize,
    f: impl Fn(usize, &mut RingCollective) -> T + Sync,
) -> Vec<T> {
    let (ls, peers) = listeners(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, f) = (peers.clone(), &f);
                s.spawn(move || {
                    let mut ring =
                        RingCollective::connect(l, 3, rank, &peers, TIMEOUT).expect("ring");
                    ring.set_chunk_bytes(chunk_bytes);
                    f(rank, &mut ring)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

/// Values whose sums round differently in different orders.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i * 7919 + rank * 104_729) % 1013) as f32 - 506.0) * 0.1371 + rank as f32 * 1e-3
        })
        .collect()
}

#[test]
fn all_reduce_sums_odd_sizes_and_ranks_agree_bitwise() {
    for world in [2, 3, 4] {
        for n in [0usize, 1, 2, 3, 5, 7, 64, 1001, 100_003] {
            // 64-byte pieces: many pieces per segment, and uneven segments.
            let results = on_ring(world, 64, |rank, ring| {
                let mut v = values(rank, n);
                ring.all_reduce_slice(&mut v).expect("all-reduce");
                assert_eq!(ring.sequence(), 1);
                v
            });
            for (rank, r) in results.iter().enumerate() {
                let same = r
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "world {world}, n {n}: rank {rank} differs from rank 0"
                );
            }
            // Rigorous on any CPU: each element is world ≤ 4 fp32 additions in some
            // order, and every |value| ≤ 506·0.1371 + 0.003 < 70, so the sum errs by at most
            // (world − 1)·u·Σ|x| ≤ 3 · 2^-24 · 280 ≈ 5e-5 (plus ½ ulp of the result),
            // below the 1e-4 allowed (absolute below 1, relative above).
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| values(r, n)).collect();
            for i in 0..n {
                let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
                let got = f64::from(results[0][i]);
                assert!(
                    (got - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                    "world {world}, n {n}, [{i}]: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn tensor_all_reduce_and_broadcast_work_in_f32_and_f64() {
    worker::runtime::init();
    let out = on_ring(3, 1 << 10, |rank, ring| {
        let mut a = Tensor::full([5, 7], rank as f64 + 1.0, (Kind::Double, Device::Cpu));
        ring.all_reduce_sum(&mut a).expect("f64 all-reduce");
        let mut b = Tensor::arange(1000, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
        ring.broadcast(&mut b, 1).expect("broadcast from rank 1");
        ring.barrier().expect("barrier");
        (
            Vec::<f64>::try_from(a.view([-1])).unwrap(),
            Vec::<f32>::try_from(&b).unwrap(),
            ring.sequence(),
        )
    });
    for (a, b, seq) in out {
        assert!(a.iter().all(|&x| x == 6.0));
        assert_eq!(b, (0..1000).map(|i| i as f32 * 2.0).collect::<Vec<_>>());
        assert_eq!(seq, 3);
    }
}

#[test]
fn bf16_and_non_contiguous_buffers_are_refused_on_cpu() {
    worker::runtime::init();
    on_ring(1, 1024, |_, ring| {
        let mut bf = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
        assert!(matches!(
            ring.all_reduce_sum(&mut bf),
            Err(CommError::Unsupported(_))
        ));
        let mut strided = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        assert!(matches!(
            ring.all_reduce_sum(&mut strided),
            Err(CommError::Unsupported(_))
        ));
    });
}

#[test]
fn mismatched_calls_fail_instead_of_mixing_buffers() {
    let errors = on_ring(2, 1024, |rank, ring| {
        let mut v = vec![1.0f32; 10 + rank];
        ring.all_reduce_slice(&mut v).err().map(|e| e.to_string())
    });
    assert!(
        errors
            .iter()
            .any(|e| e.as_deref().is_some_and(|e| e.contains("made call"))),
        "{errors:?}"
    );
    assert!(errors.iter().all(Option::is_some), "{errors:?}");
}

#[test]
fn abort_from_another_thread_unblocks_a_collective_promptly() {
    let (ls, peers) = listeners(2);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let peers1 = peers.clone();
        let l1 = &ls[1];
        // Rank 1 joins and then never calls the collective.
        let idle = s.spawn(move || {
            let ring = RingCollective::connect(l1, 1, 1, &peers1, TIMEOUT).expect("ring");
            rx.recv().ok();
            drop(ring);
        });
        let mut ring =
            RingCollective::connect(&ls[0], 1, 0, &peers, Duration::from_secs(3600)).expect("ring");
        let handle = ring.abort_handle();
        let aborter = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            handle.abort();
        });
        let started = Instant::now();
        let mut v = vec![1.0f32; 1 << 20];
        let err = ring.all_reduce_slice(&mut v).expect_err("aborted");
        let waited = started.elapsed();
        assert!(matches!(err, CommError::Aborted), "{err}");
        // Only the abort can end it this side of the hour-long timeout; the deadline
        // just catches a hang.
        assert!(
            waited < HANG_DEADLINE,
            "abort took {waited:?} (timeout was 3600 s)"
        );
        assert!(
            matches!(ring.barrier(), Err(CommError::Aborted)),
            "unusable after an abort"
        );
        aborter.join().unwrap();
        tx.send(()).ok();
        idle.join().unwrap();
    });
}

#[test]
fn a_stalled_peer_times_out() {
    let (ls, peers) = listeners(2);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let peers1 = peers.clone();
        let l1 = &ls[1];
        let idle = s.spawn(move || {
            let ring = RingCollective::connect(l1, 1, 1, &peers1, TIMEOUT).expect("ring");
            rx.recv().ok();
            drop(ring);
        });
        let timeout = Duration::from_millis(800);
        let mut ring = RingCollective::connect(&ls[0], 1, 0, &peers, timeout).expect("ring");
        let started = Instant::now();
        let err = ring.barrier().expect_err("no peer to answer");
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
        assert!(started.elapsed() < HANG_DEADLINE, "the timeout never fired");
        tx.send(()).ok();
        idle.join().unwrap();
    });
}

#[test]
fn a_connection_of_another_generation_is_refused_and_the_ring_still_forms() {
    let (ls, peers) = listeners(2);
    let stale_listener = RingListener::bind("127.0.0.1:0").unwrap();
    std::thread::scope(|s| {
        // A laggard from generation 1 knocks on rank 0 of generation 2 first.
        let stale_peers = vec![peers[0].clone(), stale_listener.address()];
        let stale_listener = &stale_listener;
        let stale = s.spawn(move || {
            RingCollective::connect(stale_listener, 1, 1, &stale_peers, Duration::from_secs(20))
        });
        let rank0 = s.spawn(|| RingCollective::connect(&ls[0], 2, 0, &peers, TIMEOUT));
        let refused = stale.join().unwrap().expect_err("stale generation refused");
        assert!(matches!(refused, CommError::Refused(_)), "{refused}");
        let mut rank1 = RingCollective::connect(&ls[1], 2, 1, &peers, TIMEOUT).expect("rank 1");
        let mut rank0 = rank0.join().unwrap().expect("rank 0 of generation 2");
        let a = s.spawn(move || {
            let mut v = vec![1.0f32, 2.0];
            rank0.all_reduce_slice(&mut v).map(|()| v)
        });
        let mut v = vec![10.0f32, 20.0];
        rank1.all_reduce_slice(&mut v).unwrap();
        assert_eq!(a.join().unwrap().unwrap(), vec![11.0, 22.0]);
        assert_eq!(v, vec![11.0, 22.0]);
    });
}

fn spawn_rank(rank: usize, world: usize, dir: &std::path::Path, timeout_s: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "comm-bench",
            "--rank",
            &rank.to_string(),
            "--world",
            &world.to_string(),
        ])
        .arg("--rendezvous")
        .arg(dir)
        .args([
            "--sizes-mib",
            "64",
            "--rounds",
            "100000",
            "--timeout-s",
            &timeout_s.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker comm-bench")
}

#[test]
fn killing_a_peer_mid_all_reduce_makes_the_others_fail_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (world, timeout_s) = (3, 5);
    let mut children: Vec<Child> = (0..world)
        .map(|r| spawn_rank(r, world, dir.path(), timeout_s))
        .collect();
    for child in &mut children {
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert!(line.starts_with("ready"), "got {line:?}");
    }
    // The ranks now all-reduce 64 MiB back to back: wherever the kill lands, the others
    // are in, or about to enter, an all-reduce that needs rank 1.
    children[1].kill().expect("SIGKILL rank 1");
    let killed_at = Instant::now();
    children[1].wait().ok();
    for rank in [0, 2] {
        let out = finish(&mut children[rank]);
        let waited = killed_at.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {rank} must fail");
        assert!(stderr.contains("peer rank"), "rank {rank}: {stderr}");
        // They fail after about `timeout_s`; the deadline only catches a hang.
        assert!(
            waited < Duration::from_secs(timeout_s) + HANG_DEADLINE,
            "rank {rank} took {waited:?}"
        );
        eprintln!(
            "rank {rank} failed {waited:?} after the kill: {}",
            stderr.trim()
        );
    }
}

/// Waits for exit and collects stderr (stdout was taken for the ready line).
fn finish(child: &mut Child) -> std::process::Output {
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_end(&mut e, &mut stderr).ok();
    }
    let status = child.wait().expect("wait");
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

#[test]
fn comm_bench_reports_the_ring_against_a_plain_copy_of_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = |rank: usize| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["comm-bench", "--rank", &rank.to_string(), "--world", "3"])
            .arg("--rendezvous")
            .arg(dir.path())
            .args(["--sizes-mib", "1", "--rounds", "2", "--timeout-s", "30"])
            .arg("--baseline")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker comm-bench")
    };
    let children: Vec<Child> = (0..3).map(spawn).collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    for (rank, out) in outputs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {rank}: {stderr}");
    }
    // Only rank 0 reports, with both medians (over the measured rounds) and their ratio.
    let stdout = String::from_utf8_lossy(&outputs[0].stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report in {stdout:?}"));
    let report: serde_json::Value = serde_json::from_str(line).expect("json");
    let number = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {line}"))
    };
    assert_eq!(number("world"), 3.0);
    assert_eq!(number("rounds"), 2.0);
    for key in ["copy_median_s", "copy_gb_s", "ring_over_copy"] {
        let x = number(key);
        assert!(x.is_finite() && x > 0.0, "{key} in {line}");
    }
}
