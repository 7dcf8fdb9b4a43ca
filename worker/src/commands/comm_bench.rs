//! `worker comm-bench` (hidden): the CPU ring between processes on one machine, for
//! the ring benchmark (bench/ring.sh) and the killed-peer test. Ranks find each
//! other through a rendezvous directory: each binds a free port and writes its
//! address to `DIR/rank-R.addr`, then waits for the others' files.
//!
//! With `baseline`, every ring round is followed by a plain TCP copy round between the
//! same processes: each rank streams to its right neighbour, while receiving from its
//! left, exactly the bytes one ring all-reduce moves per rank (2(W−1)/W of the buffer),
//! in the same piece size, with no arithmetic and no pipelining bookkeeping. That is the
//! wire ceiling the ring can at best reach on this machine, measured under the same load.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
    /// Also time the plain TCP copy of the same bytes (see the module doc).
    pub baseline: bool,
}

pub fn comm_bench(b: &CommBench) -> anyhow::Result<()> {
    let listener = RingListener::bind("127.0.0.1:0")?;
    publish(&b.rendezvous, "rank", b.rank, &listener.address())?;
    let peers = gather(&b.rendezvous, "rank", b.world, b.timeout)?;
    let mut ring = RingCollective::connect(&listener, 1, b.rank, &peers, b.timeout)
        .context("joining the ring")?;
    ring.set_chunk_bytes(b.chunk_kib << 10);
    let mut copy = match b.baseline && b.world > 1 {
        true => Some(CopyPair::connect(b)?),
        false => None,
    };
    println!("ready rank {} of {}", b.rank, b.world);
    std::io::stdout().flush().ok();
    for &mib in &b.sizes_mib {
        let (mut ring_times, mut copy_times) = (Vec::new(), Vec::new());
        let n = mib << 18;
        let mut buf = vec![0f32; n];
        // One warm-up round, then the measured ones; ring and copy alternate so that
        // both see the same background load.
        for round in 0..=b.rounds {
            let ring_s = ring_round(b, &mut ring, &mut buf, round)?;
            let copy_s = match copy.as_mut() {
                Some(pair) => Some(pair.round(&buf, b.world)?),
                None => None,
            };
            if round > 0 {
                ring_times.push(ring_s);
                copy_times.extend(copy_s);
            }
        }
        if b.rank == 0 {
            report(b, mib, &mut ring_times, &mut copy_times);
        }
    }
    Ok(())
}

/// One all-reduce of `buf`, checked; seconds.
fn ring_round(
    b: &CommBench,
    ring: &mut RingCollective,
    buf: &mut [f32],
    round: usize,
) -> anyhow::Result<f64> {
    let mib = buf.len() >> 18;
    buf.fill((b.rank + 1) as f32);
    let started = Instant::now();
    ring.all_reduce_slice(buf)
        .with_context(|| format!("all-reduce of {mib} MiB, round {round}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let want = (b.world * (b.world + 1) / 2) as f32;
    if buf.iter().any(|&x| x != want) {
        bail!("all-reduce of {mib} MiB gave a wrong sum (want {want} everywhere)");
    }
    Ok(seconds)
}

/// The baseline's own TCP connections: to the right neighbour and from the left one.
struct CopyPair {
    right: TcpStream,
    left: TcpStream,
    chunk: usize,
}

impl CopyPair {
    fn connect(b: &CommBench) -> anyhow::Result<CopyPair> {
        let listener = TcpListener::bind("127.0.0.1:0").context("baseline listener")?;
        let address = listener.local_addr().context("baseline address")?;
        publish(&b.rendezvous, "copy", b.rank, &address.to_string())?;
        let peers = gather(&b.rendezvous, "copy", b.world, b.timeout)?;
        let right_address = &peers[(b.rank + 1) % b.world];
        // Every rank connects before it accepts; the kernel completes the handshake
        // from the backlog, so this cannot deadlock.
        let right = TcpStream::connect(right_address)
            .with_context(|| format!("baseline: connect to {right_address}"))?;
        let left = accept_until(&listener, Instant::now() + b.timeout)?;
        for s in [&right, &left] {
            // As the ring configures its sockets.
            s.set_nodelay(true).context("baseline socket")?;
            s.set_read_timeout(Some(b.timeout))
                .context("baseline socket")?;
            s.set_write_timeout(Some(b.timeout))
                .context("baseline socket")?;
        }
        Ok(CopyPair {
            right,
            left,
            chunk: (b.chunk_kib << 10).max(64),
        })
    }

    /// Streams 2(W−1)/W of `buf`'s bytes right while receiving as many from the left;
    /// seconds until both are done.
    fn round(&mut self, buf: &[f32], world: usize) -> anyhow::Result<f64> {
        let all = bytes_of(buf);
        let segment = all.len().div_ceil(world);
        let total = 2 * (world - 1) * segment;
        let chunk = self.chunk;
        let started = Instant::now();
        let (left, right) = (&mut self.left, &mut self.right);
        std::thread::scope(|scope| {
            let receiver = scope.spawn(move || receive(left, total, chunk));
            let sent = send(right, all, total, chunk);
            let received = receiver
                .join()
                .map_err(|_| anyhow::anyhow!("baseline receiver panicked"))?;
            sent.and(received)
        })?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The left neighbour's connection, or an error once `deadline` passes.
fn accept_until(listener: &TcpListener, deadline: Instant) -> anyhow::Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .context("baseline listener")?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).context("baseline socket")?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("baseline: accept"),
        }
        if Instant::now() >= deadline {
            bail!("baseline: the left neighbour did not connect in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `total` bytes, cycling through `data` piece by piece.
fn send(socket: &mut TcpStream, data: &[u8], total: usize, chunk: usize) -> anyhow::Result<()> {
    let mut sent = 0;
    while sent < total {
        let offset = sent % data.len();
        let len = chunk.min(total - sent).min(data.len() - offset);
        socket
            .write_all(&data[offset..offset + len])
            .context("baseline: send")?;
        sent += len;
    }
    Ok(())
}

/// Reads `total` bytes in pieces into one reused buffer (the ring allocates a piece
/// per read and adds it; the baseline only lands the bytes).
fn receive(socket: &mut TcpStream, total: usize, chunk: usize) -> anyhow::Result<()> {
    let mut piece = vec![0u8; chunk];
    let mut got = 0;
    while got < total {
        let len = chunk.min(total - got);
        socket
            .read_exact(&mut piece[..len])
            .context("baseline: receive")?;
        got += len;
    }
    Ok(())
}

fn bytes_of(buf: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 no alignment; same memory, 4× the length.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), std::mem::size_of_val(buf)) }
}

fn median(times: &mut [f64]) -> Option<(f64, f64, f64)> {
    times.sort_by(f64::total_cmp);
    Some((
        *times.get(times.len() / 2)?,
        times[0],
        times[times.len() - 1],
    ))
}

fn report(b: &CommBench, mib: usize, ring: &mut [f64], copy: &mut [f64]) {
    let Some((med, min, max)) = median(ring) else {
        return;
    };
    let bytes = (mib << 20) as f64;
    let algbw = bytes / med / 1e9;
    // nccl-tests' convention: each rank sends and receives 2(W−1)/W of the buffer.
    let busbw = algbw * 2.0 * (b.world - 1) as f64 / b.world as f64;
    let baseline = match median(copy) {
        // The copy moves busbw's bytes, so its rate is directly comparable to busbw.
        Some((copy_med, ..)) => format!(
            ", \"copy_median_s\": {copy_med:.4}, \"copy_gb_s\": {:.3}, \"ring_over_copy\": {:.3}",
            busbw * med / copy_med,
            copy_med / med
        ),
        None => String::new(),
    };
    println!(
        "{{\"world\": {}, \"mib\": {mib}, \"rounds\": {}, \"median_s\": {med:.4}, \"min_s\": {min:.4}, \"max_s\": {max:.4}, \"algbw_gb_s\": {algbw:.3}, \"busbw_gb_s\": {busbw:.3}, \"chunk_kib\": {}{baseline}}}",
        b.world,
        ring.len(),
        b.chunk_kib
    );
}

fn publish(dir: &Path, kind: &str, rank: usize, address: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(".{kind}-{rank}.tmp"));
    std::fs::write(&tmp, address).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(format!("{kind}-{rank}.addr")))
        .with_context(|| format!("publish {kind} {rank} in {}", dir.display()))?;
    Ok(())
}

fn gather(dir: &Path, kind: &str, world: usize, timeout: Duration) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut peers = vec![None; world];
    while peers.iter().any(Option::is_none) {
        for (r, slot) in peers.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = std::fs::read_to_string(dir.join(format!("{kind}-{r}.addr"))).ok();
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
