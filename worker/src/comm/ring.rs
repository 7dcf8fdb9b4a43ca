//! CPU collectives: a ring over TCP between the trainers of one generation.
//!
//! Rank r sends to rank r+1 and receives from rank r−1 (mod W), one TCP connection
//! per direction. All-reduce is the bandwidth-optimal ring: a reduce-scatter then an
//! all-gather, each W−1 steps over W segments of the buffer. Segments are cut into
//! pieces of about `chunk_bytes`, and piece j of step k is sent as soon as piece j of
//! step k−1 has arrived (pipelining), while a receiver thread keeps draining the left
//! socket so that no two ranks can block each other on full socket buffers.
//!
//! Bitwise agreement: segment s is summed along the ring starting at rank s, each hop
//! computing `local + received`, so its summation order depends only on s, never on
//! which rank computes it; the all-gather then copies the finished segment to every
//! rank. All ranks end with the same bits.
//!
//! Failure: every socket read and write is bounded by the timeout; any error shuts
//! both sockets down so that the neighbours fail fast too, and the communicator
//! refuses further calls. A peer that dies mid-collective shows up as a closed or
//! reset connection at its neighbours, a stalled one as a timeout.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::{Add, Range};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{AbortHandle, Collective, CommError};

/// First word of the connection handshake ("DCRG").
const HELLO_MAGIC: u32 = 0x4443_5247;
/// Bumped when the wire format changes.
const WIRE_VERSION: u32 = 1;
/// First word of every collective's header ("DCOP").
const OP_MAGIC: u32 = 0x4443_4f50;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;
/// Default piece size: large enough to amortise syscalls, small enough to pipeline.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// The listening socket of one trainer process, bound once and reused by every
/// generation (the coordinator hands its address to the other ranks).
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    address: String,
}

impl RingListener {
    /// Binds `addr` (e.g. `0.0.0.0:0` for any free port).
    pub fn bind(addr: &str) -> Result<RingListener, CommError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| CommError::Io(format!("bind {addr}: {e}")))?;
        // Accepting polls, so a connect can give up at its deadline.
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::Io(format!("listener: {e}")))?;
        let address = listener
            .local_addr()
            .map_err(|e| CommError::Io(format!("listener address: {e}")))?
            .to_string();
        Ok(RingListener { listener, address })
    }

    /// `ip:port` actually bound (the port resolved when 0 was asked for).
    pub fn address(&self) -> String {
        self.address.clone()
    }
}

/// What a connecting rank announces: 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    generation: u64,
    rank: u64,
    world: u64,
}

impl Hello {
    fn encode(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.rank.to_le_bytes());
        b[24..32].copy_from_slice(&self.world.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 32]) -> Result<Hello, String> {
        let word = |r: Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or([0; 8]));
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let version = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if magic != HELLO_MAGIC || version != WIRE_VERSION {
            return Err(format!(
                "not a ring peer of this version (magic {magic:#x}, version {version})"
            ));
        }
        Ok(Hello {
            generation: word(8..16),
            rank: word(16..24),
            world: word(24..32),
        })
    }
}

/// Header each rank sends its right neighbour before a collective, so that
/// mismatched calls fail loudly instead of mixing buffers: 40 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpHeader {
    op: u32,
    dtype: u32,
    seq: u64,
    len: u64,
    root: u64,
}

impl OpHeader {
    fn encode(self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..4].copy_from_slice(&OP_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..12].copy_from_slice(&self.dtype.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.root.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 40]) -> Option<OpHeader> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        (u32_at(0) == OP_MAGIC).then(|| OpHeader {
            op: u32_at(4),
            dtype: u32_at(8),
            seq: u64_at(16),
            len: u64_at(24),
            root: u64_at(32),
        })
    }
}

const OP_ALL_REDUCE: u32 = 1;
const OP_BROADCAST: u32 = 2;

/// Element types the ring sums.
pub trait Elem: Copy + Default + Send + Add<Output = Self> + 'static {
    const DTYPE: u32;
}
impl Elem for f32 {
    const DTYPE: u32 = 1;
}
impl Elem for f64 {
    const DTYPE: u32 = 2;
}

fn bytes_of<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: f32/f64 have no padding and every bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32/f64.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// `[i·n/parts, (i+1)·n/parts)`: a balanced split, the same on every rank.
fn part(n: usize, parts: usize, i: usize) -> Range<usize> {
    (i * n / parts)..((i + 1) * n / parts)
}

/// A ring communicator of one generation.
#[derive(Debug)]
pub struct RingCollective {
    rank: usize,
    world: usize,
    generation: u64,
    timeout: Duration,
    chunk_bytes: usize,
    /// Receives from rank − 1; `None` in a world of one.
    left: Option<TcpStream>,
    /// Sends to rank + 1.
    right: Option<TcpStream>,
    seq: u64,
    abort: AbortHandle,
    /// Set by the first failure; the ring is unusable after it.
    broken: Option<String>,
}

impl RingCollective {
    /// Joins the ring of `generation` as `rank` of `peers.len()`: connects to the
    /// right neighbour's listener, accepts the left neighbour on `listener`. Hellos
    /// of another generation, world or neighbour are refused (and waited past) until
    /// `timeout`; a refusal of our own hello is an error.
    pub fn connect(
        listener: &RingListener,
        generation: u64,
        rank: usize,
        peers: &[String],
        timeout: Duration,
    ) -> Result<RingCollective, CommError> {
        let world = peers.len();
        if rank >= world {
            return Err(CommError::Argument(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let mut ring = RingCollective {
            rank,
            world,
            generation,
            timeout,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            left: None,
            right: None,
            seq: 0,
            abort: AbortHandle::default(),
            broken: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let hello = Hello {
            generation,
            rank: rank as u64,
            world: world as u64,
        };
        let right_rank = (rank + 1) % world;
        let mut right = connect_until(&peers[right_rank], deadline)?;
        configure(&right, timeout)?;
        right
            .write_all(&hello.encode())
            .map_err(|e| ring.peer_error("hello", right_rank, e))?;
        let left = ring.accept_left(listener, &right, deadline)?;
        let mut reply = [0u8; 1];
        right
            .read_exact(&mut reply)
            .map_err(|e| ring.peer_error("handshake reply", right_rank, e))?;
        if reply[0] != ACCEPTED {
            return Err(CommError::Refused(format!(
                "rank {right_rank} at {} refused generation {generation} rank {rank}",
                peers[right_rank]
            )));
        }
        ring.abort.watch(&left)?;
        ring.abort.watch(&right)?;
        ring.left = Some(left);
        ring.right = Some(right);
        Ok(ring)
    }

    /// Bytes per pipelined piece (default 1 MiB). Must be equal on every rank.
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(64);
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn left_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn right_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn accept_left(
        &self,
        listener: &RingListener,
        right: &TcpStream,
        deadline: Instant,
    ) -> Result<TcpStream, CommError> {
        let want = self.left_rank() as u64;
        loop {
            if refused(right) {
                return Err(CommError::Refused(format!(
                    "rank {} refused generation {} rank {} (another generation or world)",
                    self.right_rank(),
                    self.generation,
                    self.rank
                )));
            }
            match listener.listener.accept() {
                Ok((stream, from)) => {
                    if let Some(stream) = self.vet_hello(stream, want, deadline) {
                        return Ok(stream);
                    }
                    tracing::warn!("ring: refused a connection from {from}");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(CommError::Io(format!("accept: {e}"))),
            }
            if self.abort.is_aborted() {
                return Err(CommError::Aborted);
            }
            if Instant::now() >= deadline {
                return Err(CommError::Timeout {
                    what: format!(
                        "generation {} waiting for its left neighbour",
                        self.generation
                    ),
                    peer: want as usize,
                    after: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The accepted stream if its hello is our left neighbour of this generation.
    fn vet_hello(&self, mut stream: TcpStream, want: u64, deadline: Instant) -> Option<TcpStream> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        configure(&stream, left).ok()?;
        let mut buf = [0u8; 32];
        stream.read_exact(&mut buf).ok()?;
        let ok = match Hello::decode(&buf) {
            Ok(h) => {
                h.generation == self.generation && h.world == self.world as u64 && h.rank == want
            }
            Err(_) => false,
        };
        let _ = stream.write_all(&[if ok { ACCEPTED } else { REFUSED }]);
        if !ok {
            let _ = stream.shutdown(Shutdown::Both);
            return None;
        }
        configure(&stream, self.timeout).ok()?;
        Some(stream)
    }

    fn peer_error(&self, what: &str, peer: usize, e: io::Error) -> CommError {
        if self.abort.is_aborted() {
            return CommError::Aborted;
        }
        let what = format!(
            "ring generation {} rank {}: {what}",
            self.generation, self.rank
        );
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CommError::Timeout {
                what,
                peer,
                after: self.timeout,
            },
            io::ErrorKind::UnexpectedEof => CommError::PeerClosed { what, peer },
            _ => CommError::Peer {
                what,
                peer,
                source: e,
            },
        }
    }

    /// Marks the ring broken and shuts its sockets so the neighbours fail fast.
    fn fail(&mut self, err: CommError) -> CommError {
        self.broken = Some(err.to_string());
        for s in [&self.left, &self.right].into_iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
        err
    }

    fn check_usable(&self) -> Result<(), CommError> {
        if self.abort.is_aborted() {
            return Err(CommError::Aborted);
        }
        match &self.broken {
            Some(why) => Err(CommError::Io(format!(
                "the ring of generation {} failed earlier ({why}); form a new generation",
                self.generation
            ))),
            None => Ok(()),
        }
    }

    /// Sends our header right, reads the left one and checks both ranks make the same call.
    fn exchange_header(&mut self, mine: OpHeader) -> Result<(), CommError> {
        let (left_rank, right_rank) = (self.left_rank(), self.right_rank());
        let (Some(left), Some(right)) = (&self.left, &self.right) else {
            return Ok(());
        };
        let mut right_w = right;
        if let Err(e) = right_w.write_all(&mine.encode()) {
            return Err(self.peer_error("send header", right_rank, e));
        }
        let mut buf = [0u8; 40];
        let mut left_r = left;
        if let Err(e) = left_r.read_exact(&mut buf) {
            return Err(self.peer_error("receive header", left_rank, e));
        }
        match OpHeader::decode(&buf) {
            Some(theirs) if theirs == mine => Ok(()),
            theirs => Err(CommError::Protocol(format!(
                "rank {left_rank} made call {theirs:?} while rank {} made {mine:?}",
                self.rank
            ))),
        }
    }

    /// Sums `buf` over all ranks, in place.
    pub fn all_reduce_slice<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        self.check_usable()?;
        if self.world > 1 {
            let header = OpHeader {
                op: OP_ALL_REDUCE,
                dtype: T::DTYPE,
                seq: self.seq,
                len: buf.len() as u64,
                root: 0,
            };
            let result = self
                .exchange_header(header)
                .and_then(|()| self.ring_all_reduce(buf));
            if let Err(e) = result {
                return Err(self.fail(e));
            }
        }
        self.seq += 1;
        Ok(())
    }

    /// Overwrites `buf` with rank `root`'s, in place.
    pub fn broadcast_slice<T: Elem>(
        &mut self,
        buf: &mut [T],
        root: usize,
    ) -> Result<(), CommError> {
        self.check_usable()?;
        if root >= self.world {
            return Err(CommError::Argument(format!(
                "broadcast root {root} outside a world of {}",
                self.world
            )));
        }
        if self.world > 1 {
            let header = OpHeader {
                op: OP_BROADCAST,
                dtype: T::DTYPE,
                seq: self.seq,
                len: buf.len() as u64,
                root: root as u64,
            };
            let result = self
                .exchange_header(header)
                .and_then(|()| self.chain_broadcast(buf, root));
            if let Err(e) = result {
                return Err(self.fail(e));
            }
        }
        self.seq += 1;
        Ok(())
    }

    /// Elements per piece, and pieces per segment (equal for all segments).
    fn pieces(&self, n: usize, elem_bytes: usize) -> usize {
        let longest = n.div_ceil(self.world);
        let per_piece = (self.chunk_bytes / elem_bytes).max(1);
        longest.div_ceil(per_piece).max(1)
    }

    fn ring_all_reduce<T: Elem>(&self, buf: &mut [T]) -> Result<(), CommError> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        let p = self.pieces(n, std::mem::size_of::<T>());
        let (Some(left), Some(right)) = (&self.left, &self.right) else {
            return Ok(());
        };
        // Step k of the reduce-scatter sends segment r−k and receives r−k−1; step k of
        // the all-gather sends r+1−k and receives r−k (all mod W).
        let seg = |s: isize| part(n, w, s.rem_euclid(w as isize) as usize);
        let piece = |s: Range<usize>, j: usize| {
            let sub = part(s.len(), p, j);
            (s.start + sub.start)..(s.start + sub.end)
        };
        let ri = r as isize;
        let steps = w - 1;
        let recv_ranges: Vec<Range<usize>> = (0..2)
            .flat_map(|phase| (0..steps).map(move |k| (phase, k)))
            .flat_map(|(phase, k)| {
                let s = if phase == 0 {
                    ri - k as isize - 1
                } else {
                    ri - k as isize
                };
                (0..p).map(move |j| piece(seg(s), j))
            })
            .collect();
        let seg_send = |phase: usize, k: usize, j: usize| {
            let s = if phase == 0 {
                ri - k as isize
            } else {
                ri + 1 - k as isize
            };
            piece(seg(s), j)
        };
        let (tx, rx) = mpsc::channel::<io::Result<Vec<T>>>();
        std::thread::scope(|scope| {
            let lens: Vec<usize> = recv_ranges.iter().map(|r| r.len()).collect();
            scope.spawn(move || receive_pieces(left, &lens, tx));
            let result = self.pump(buf, right, &rx, &recv_ranges, p, &seg_send);
            if result.is_err() {
                // Wakes the receiver thread if it is blocked, so the scope can join it.
                let _ = left.shutdown(Shutdown::Both);
            }
            result
        })
    }

    /// The main thread's side of the all-reduce: sends every piece once its input
    /// has arrived, applying received pieces in order.
    fn pump<T: Elem>(
        &self,
        buf: &mut [T],
        right: &TcpStream,
        rx: &mpsc::Receiver<io::Result<Vec<T>>>,
        recv_ranges: &[Range<usize>],
        p: usize,
        seg_send: &dyn Fn(usize, usize, usize) -> Range<usize>,
    ) -> Result<(), CommError> {
        let mut received = 0usize;
        let mut right_w = right;
        let total = (self.world - 1) * p;
        for phase in 0..2 {
            for i in 0..total {
                let (k, j) = (i / p, i % p);
                // Piece j of step k is what piece j of step k−1 brought in.
                while k > 0 && received <= phase * total + i - p {
                    self.take_piece(rx, buf, &recv_ranges[received], phase)?;
                    received += 1;
                }
                let range = seg_send(phase, k, j);
                right_w
                    .write_all(bytes_of(&buf[range]))
                    .map_err(|e| self.peer_error("send", self.right_rank(), e))?;
            }
            while received < (phase + 1) * total {
                self.take_piece(rx, buf, &recv_ranges[received], phase)?;
                received += 1;
            }
        }
        Ok(())
    }

    /// Applies the next received piece: add during the reduce-scatter (phase 0),
    /// copy during the all-gather.
    fn take_piece<T: Elem>(
        &self,
        rx: &mpsc::Receiver<io::Result<Vec<T>>>,
        buf: &mut [T],
        range: &Range<usize>,
        phase: usize,
    ) -> Result<(), CommError> {
        let left = self.left_rank();
        let data = match rx.recv_timeout(self.timeout) {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return Err(self.peer_error("receive", left, e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(self.peer_error("receive", left, io::ErrorKind::TimedOut.into()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(self.peer_error("receive", left, io::ErrorKind::UnexpectedEof.into()))
            }
        };
        let dst = &mut buf[range.clone()];
        if phase == 0 {
            for (d, s) in dst.iter_mut().zip(&data) {
                *d = *d + *s;
            }
        } else {
            dst.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Root sends right; each other rank receives from the left, keeps the piece and
    /// forwards it unless its right neighbour is the root.
    fn chain_broadcast<T: Elem>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let (Some(mut left), Some(mut right)) = (self.left.as_ref(), self.right.as_ref()) else {
            return Ok(());
        };
        let position = (self.rank + self.world - root) % self.world;
        let n = buf.len();
        let p = n
            .div_ceil((self.chunk_bytes / std::mem::size_of::<T>()).max(1))
            .max(1);
        for j in 0..p {
            let range = part(n, p, j);
            if position > 0 {
                left.read_exact(bytes_of_mut(&mut buf[range.clone()]))
                    .map_err(|e| self.peer_error("broadcast receive", self.left_rank(), e))?;
            }
            if position + 1 < self.world {
                right
                    .write_all(bytes_of(&buf[range]))
                    .map_err(|e| self.peer_error("broadcast send", self.right_rank(), e))?;
            }
        }
        Ok(())
    }
}

/// Whether the right neighbour already answered our hello with a refusal (or hung
/// up); an acceptance stays unread for the handshake to consume.
fn refused(right: &TcpStream) -> bool {
    if right.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let answer = right.peek(&mut byte);
    let _ = right.set_nonblocking(false);
    matches!(answer, Ok(0)) || matches!(answer, Ok(1) if byte[0] == REFUSED)
}

/// Reads pieces of `lens` elements in order from `left`, handing each to the main
/// thread; stops at the first error (which it hands over too).
fn receive_pieces<T: Elem>(left: &TcpStream, lens: &[usize], tx: mpsc::Sender<io::Result<Vec<T>>>) {
    let mut left = left;
    for &len in lens {
        let mut piece = vec![T::default(); len];
        let result = left.read_exact(bytes_of_mut(&mut piece)).map(|()| piece);
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream, CommError> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| CommError::Argument(format!("peer address {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| CommError::Argument(format!("peer address {addr:?} resolves to nothing")))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommError::Io(format!(
                "could not connect to {addr} before the deadline"
            )));
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(s) => return Ok(s),
            // The peer may not listen yet: retry until the deadline.
            Err(_) => std::thread::sleep(Duration::from_millis(20).min(left)),
        }
    }
}

fn configure(s: &TcpStream, timeout: Duration) -> Result<(), CommError> {
    let io = |e: io::Error| CommError::Io(format!("socket options: {e}"));
    s.set_nonblocking(false).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    Ok(())
}

/// The f32 or f64 elements of a contiguous CPU tensor, for in-place collectives.
fn with_cpu_slice<R>(
    buf: &mut Tensor,
    f32_op: impl FnOnce(&mut [f32]) -> R,
    f64_op: impl FnOnce(&mut [f64]) -> R,
) -> Result<R, CommError> {
    if buf.device() != Device::Cpu {
        return Err(CommError::Unsupported(format!(
            "the CPU ring needs CPU tensors, got {:?}",
            buf.device()
        )));
    }
    if !buf.is_contiguous() {
        return Err(CommError::Unsupported(
            "the tensor is not contiguous".into(),
        ));
    }
    let n = buf.numel();
    let ptr = buf.data_ptr();
    match buf.kind() {
        // SAFETY: a contiguous CPU tensor of `n` f32 elements starts at `ptr`; `buf`
        // is borrowed mutably for the whole call, so nothing else touches it.
        Kind::Float => Ok(f32_op(unsafe {
            std::slice::from_raw_parts_mut(ptr.cast::<f32>(), n)
        })),
        // SAFETY: as above, with `n` f64 elements.
        Kind::Double => Ok(f64_op(unsafe {
            std::slice::from_raw_parts_mut(ptr.cast::<f64>(), n)
        })),
        other => Err(CommError::Unsupported(format!(
            "the CPU ring sums f32 or f64, not {other:?} (bf16 all-reduce is an NCCL option)"
        ))),
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CommError> {
        // Two closures need `self` mutably; only one ever runs.
        let this = std::cell::RefCell::new(self);
        with_cpu_slice(
            buf,
            |s| this.borrow_mut().all_reduce_slice(s),
            |s| this.borrow_mut().all_reduce_slice(s),
        )?
    }

    fn broadcast(&mut self, buf: &mut Tensor, root: usize) -> Result<(), CommError> {
        let this = std::cell::RefCell::new(self);
        with_cpu_slice(
            buf,
            |s| this.borrow_mut().broadcast_slice(s, root),
            |s| this.borrow_mut().broadcast_slice(s, root),
        )?
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.all_reduce_slice(&mut [0f32])
    }

    fn sequence(&self) -> u64 {
        self.seq
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_parts_cover_the_range_in_order() {
        for n in [0, 1, 2, 5, 7, 100] {
            for parts in 1..5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = part(n, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn headers_round_trip() {
        let h = Hello {
            generation: 7,
            rank: 2,
            world: 3,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let op = OpHeader {
            op: OP_BROADCAST,
            dtype: 2,
            seq: 9,
            len: 1 << 40,
            root: 1,
        };
        assert_eq!(OpHeader::decode(&op.encode()), Some(op));
        assert!(Hello::decode(&[0u8; 32]).is_err());
    }
}
