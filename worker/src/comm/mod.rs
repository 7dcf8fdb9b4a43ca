//! Collective communication between data-parallel trainers.
//!
//! One interface ([`Collective`]) with two implementations: NCCL on GPUs
//! ([`nccl::NcclCollective`], loaded at run time) and a ring over TCP for CPU runs and
//! multi-rank tests ([`ring::RingCollective`]). A communicator belongs to one
//! *generation* (one world the coordinator formed); a new world means a new
//! communicator. Every call is bounded by the communicator's timeout, and another
//! thread can abort a blocked call through an [`AbortHandle`].
//!
//! Gradients travel in flat buckets ([`buckets::GradBuckets`]): one all-reduce per
//! bucket instead of one per tensor.

pub mod buckets;
pub mod nccl;
pub mod ring;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{what}: no progress for {after:?} (peer rank {peer} stalled or gone)")]
    Timeout {
        what: String,
        peer: usize,
        after: Duration,
    },
    #[error("{what}: peer rank {peer} failed: {source}")]
    Peer {
        what: String,
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: peer rank {peer} closed the connection")]
    PeerClosed { what: String, peer: usize },
    #[error("the collective was aborted")]
    Aborted,
    #[error("{0}")]
    Io(String),
    #[error("connection refused by the ring: {0}")]
    Refused(String),
    #[error("ring protocol: {0}")]
    Protocol(String),
    #[error("unsupported buffer: {0}")]
    Unsupported(String),
    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("bad argument: {0}")]
    Argument(String),
}

/// A data-parallel communicator of one generation. Calls are collective: every
/// rank makes the same calls, in the same order, with buffers of the same size.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place, over a contiguous tensor on this collective's device (f32 or f64;
    /// bf16 allowed on NCCL).
    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CommError>;
    /// Overwrites `buf` on every rank with `root`'s.
    fn broadcast(&mut self, buf: &mut Tensor, root: usize) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;
    /// Collectives completed so far in this communicator (reported to the coordinator).
    fn sequence(&self) -> u64;
    /// A handle another thread can use to abort a blocked collective (coordinator said AbortGroup).
    fn abort_handle(&self) -> AbortHandle;
}

/// Shared between a communicator and the threads that may abort it.
#[derive(Debug, Default)]
struct AbortState {
    aborted: AtomicBool,
    /// Sockets to shut down on abort, which wakes any thread blocked on them.
    sockets: Mutex<Vec<TcpStream>>,
}

/// Aborts a communicator from any thread: the blocked call (and every later one)
/// returns [`CommError::Aborted`] or a peer error. The communicator is unusable after.
#[derive(Clone, Debug, Default)]
pub struct AbortHandle {
    state: Arc<AbortState>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.state.aborted.store(true, Ordering::SeqCst);
        if let Ok(sockets) = self.state.sockets.lock() {
            for s in sockets.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.state.aborted.load(Ordering::SeqCst)
    }

    /// Registers a socket clone to shut down on abort.
    fn watch(&self, socket: &TcpStream) -> Result<(), CommError> {
        let clone = socket
            .try_clone()
            .map_err(|e| CommError::Io(format!("clone socket: {e}")))?;
        if let Ok(mut sockets) = self.state.sockets.lock() {
            sockets.push(clone);
        }
        Ok(())
    }
}
