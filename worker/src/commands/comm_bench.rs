//! `worker comm-bench` (hidden): the CPU ring between processes on one machine, for
//! the ring benchmark (bench/ring.sh) and the killed-peer test. Ranks find each
//! other through a rendezvous directory: each binds a free port and writes its
//! address to `DIR/rank-R.addr`, then waits for the others' files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use worker::comm::ring::{RingCollective, RingListener};

/// What one process of the benchmark does.
#[derive(Debug, Clone)]
pub struct CommBench {
    pub rank: usize,
    pub world: usize,
    pub rendezvous: PathBuf,
    /// Buffer sizes in MiB (f32 elements: MiB · 2^18).
    pub sizes_mib: Vec<usize>,
    pub rounds: usize,
    pub timeout: Duration,
    pub chunk_kib: usize,
}

pub fn comm_bench(b: &CommBench) -> anyhow::Result<()> {
    let listener = RingListener::bind("127.0.0.1:0")?;
    publish(&b.rendezvous, b.rank, &listener.address())?;
    let peers = gather(&b.rendezvous, b.world, b.timeout)?;
    let mut ring = RingCollective::connect(&listener, 1, b.rank, &peers, b.timeout)
        .context("joining the ring")?;
    ring.set_chunk_bytes(b.chunk_kib << 10);
    println!("ready rank {} of {}", b.rank, b.world);
    std::io::stdout().flush().ok();
    for &mib in &b.sizes_mib {
        let n = mib << 18;
        let mut buf = vec![0f32; n];
        let mut times = Vec::with_capacity(b.rounds);
        // One warm-up round, then the measured ones.
        for round in 0..=b.rounds {
            buf.fill((b.rank + 1) as f32);
            let started = Instant::now();
            ring.all_reduce_slice(&mut buf)
                .with_context(|| format!("all-reduce of {mib} MiB, round {round}"))?;
            if round > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
            let want = (b.world * (b.world + 1) / 2) as f32;
            if buf.iter().any(|&x| x != want) {
                bail!("all-reduce of {mib} MiB gave a wrong sum (want {want} everywhere)");
            }
        }
        report(b, mib, &mut times);
    }
    Ok(())
}

fn report(b: &CommBench, mib: usize, times: &mut [f64]) {
    if b.rank != 0 || times.is_empty() {
        return;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let bytes = (mib << 20) as f64;
    let algbw = bytes / median / 1e9;
    // nccl-tests' convention: each rank sends and receives 2(W−1)/W of the buffer.
    let busbw = algbw * 2.0 * (b.world - 1) as f64 / b.world as f64;
    println!(
        "{{\"world\": {}, \"mib\": {mib}, \"rounds\": {}, \"median_s\": {median:.4}, \"min_s\": {:.4}, \"max_s\": {:.4}, \"algbw_gb_s\": {algbw:.3}, \"busbw_gb_s\": {busbw:.3}, \"chunk_kib\": {}}}",
        b.world,
        times.len(),
        times[0],
        times[times.len() - 1],
        b.chunk_kib
    );
}

fn publish(dir: &Path, rank: usize, address: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(".rank-{rank}.tmp"));
    std::fs::write(&tmp, address).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(format!("rank-{rank}.addr")))
        .with_context(|| format!("publish rank {rank} in {}", dir.display()))?;
    Ok(())
}

fn gather(dir: &Path, world: usize, timeout: Duration) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut peers = vec![None; world];
    while peers.iter().any(Option::is_none) {
        for (r, slot) in peers.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = std::fs::read_to_string(dir.join(format!("rank-{r}.addr"))).ok();
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "not every rank published its address in {} within {timeout:?}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(peers.into_iter().flatten().collect())
}
