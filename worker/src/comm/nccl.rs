//! GPU collectives through NCCL, loaded at run time by cudarc.
//!
//! The binary must start on machines without CUDA, so NCCL (`libnccl.so`) and the
//! driver (`libcuda.so`) are `dlopen`ed on first use. cudarc panics when a library or
//! symbol is missing; [`probe`] checks first and every entry point runs under
//! `catch_unwind`, so a missing library is [`CommError::NcclUnavailable`], never a panic.
//!
//! Ordering: libtorch computes on the legacy default stream (stream 0), so collectives
//! are enqueued on stream 0: after the backward that produced the gradients and before
//! the optimizer that reads them, with no extra synchronisation.
//!
//! Bounded waits: the communicator is created non-blocking (`blocking = 0`), and after
//! every collective we record an event on stream 0 and poll it together with
//! `ncclCommGetAsyncError`, the abort flag and the deadline. A dead or stalled peer
//! therefore surfaces as an error (after `ncclCommAbort`, which frees the GPU from the
//! stuck kernel), not as a hang.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cu_sys};
use cudarc::nccl::sys as nccl_sys;
use tch::{Device, Kind, Tensor};

use super::{AbortHandle, Collective, CommError};

/// `NCCL_CONFIG_INITIALIZER`'s magic word.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_VERSION(2, 28, 0)`: the config layout cudarc's `nccl-02028` binding declares.
const CONFIG_VERSION: u32 = 22_800;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF_INT: i32 = i32::MIN;
/// How often a wait looks at the event, NCCL's error state and the deadline.
const POLL: Duration = Duration::from_micros(50);

/// Checks that the NCCL and CUDA driver libraries can be loaded.
pub fn probe() -> Result<(), CommError> {
    // SAFETY: the probes only try to dlopen candidate names.
    let nccl = catch_unwind(|| unsafe { nccl_sys::is_culib_present() }).unwrap_or(false);
    if !nccl {
        return Err(CommError::NcclUnavailable(
            "libnccl.so not found on the library path (the NCCL wheel ships libnccl.so.2 only: \
             add a libnccl.so symlink to a directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    // SAFETY: as above.
    let driver = catch_unwind(|| unsafe { cu_sys::is_culib_present() }).unwrap_or(false);
    if !driver {
        return Err(CommError::NcclUnavailable(
            "the CUDA driver library (libcuda.so) is not loadable".into(),
        ));
    }
    Ok(())
}

/// Bytes in use on the current context's GPU (every process, the caching allocator's
/// reserve included), if the driver can say.
pub fn device_memory_used() -> Option<usize> {
    probe().ok()?;
    catch_unwind(|| cu::mem_get_info().ok().map(|(free, total)| total - free))
        .ok()
        .flatten()
}

/// Runs `f`, turning a cudarc loading panic into `NcclUnavailable`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
    probe()?;
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(CommError::NcclUnavailable(format!("{what}: {why}")))
    })
}

fn nccl_message(code: nccl_sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let text = unsafe { nccl_sys::ncclGetErrorString(code) };
    if text.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    format!("{code:?} ({text})")
}

fn driver_message(what: &str, e: cu::DriverError) -> CommError {
    CommError::Nccl(format!("{what}: CUDA driver error {:?}", e.0))
}

/// A raw communicator pointer; NCCL communicators may be used from any one thread
/// at a time, which `&mut self` guarantees.
struct Comm(nccl_sys::ncclComm_t);
// SAFETY: see above; the pointer is only used through `&mut NcclCollective` or Drop.
unsafe impl Send for Comm {}

struct Event(cu_sys::CUevent);
// SAFETY: CUDA events are usable from any thread with the context current.
unsafe impl Send for Event {}

/// One rank of an NCCL communicator (one generation).
pub struct NcclCollective {
    comm: Comm,
    event: Event,
    context: cu_sys::CUcontext,
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    seq: u64,
    abort: AbortHandle,
    broken: Option<String>,
}

// SAFETY: the context pointer is the device's primary context, valid for the process.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("seq", &self.seq)
            .finish()
    }
}

impl NcclCollective {
    /// A fresh unique id (rank 0 makes it; the coordinator hands it to the others).
    pub fn unique_id() -> Result<Vec<u8>, CommError> {
        guarded("ncclGetUniqueId", || {
            let id = cudarc::nccl::result::get_uniqueid()
                .map_err(|e| CommError::Nccl(format!("ncclGetUniqueId: {}", nccl_message(e.0))))?;
            Ok(id.internal.iter().map(|&c| c as u8).collect())
        })
    }

    /// Joins communicator `unique_id` as `rank` of `world` on GPU `device_ordinal`.
    /// Initialisation is non-blocking and bounded by `timeout` like every collective.
    pub fn new(
        unique_id: &[u8],
        rank: usize,
        world: usize,
        device_ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        if rank >= world {
            return Err(CommError::Argument(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let mut id = nccl_sys::ncclUniqueId { internal: [0; 128] };
        if unique_id.len() != id.internal.len() {
            return Err(CommError::Argument(format!(
                "an NCCL unique id has 128 bytes, got {}",
                unique_id.len()
            )));
        }
        for (dst, &src) in id.internal.iter_mut().zip(unique_id) {
            *dst = src as _;
        }
        guarded("ncclCommInitRankConfig", || {
            let context = make_context_current(device_ordinal)?;
            let event = cu::event::create(cu_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| driver_message("cuEventCreate", e))?;
            let mut this = NcclCollective {
                comm: Comm(std::ptr::null_mut()),
                event: Event(event),
                context,
                rank,
                world,
                device: device_ordinal,
                timeout,
                seq: 0,
                abort: AbortHandle::default(),
                broken: None,
            };
            let mut config = default_config();
            config.blocking = 0;
            // SAFETY: valid out-pointer, id and config; NCCL copies the config.
            let status = unsafe {
                nccl_sys::ncclCommInitRankConfig(
                    &mut this.comm.0,
                    world as i32,
                    id,
                    rank as i32,
                    &mut config,
                )
            };
            this.check_call("ncclCommInitRankConfig", status)?;
            this.wait_comm_ready("communicator init")?;
            Ok(this)
        })
    }

    fn check_call(&mut self, what: &str, status: nccl_sys::ncclResult_t) -> Result<(), CommError> {
        match status {
            nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => Ok(()),
            other => Err(self.fail(CommError::Nccl(format!("{what}: {}", nccl_message(other))))),
        }
    }

    /// The communicator's asynchronous error state (`ncclInProgress` while a
    /// non-blocking call is still being set up).
    fn async_state(&self) -> nccl_sys::ncclResult_t {
        let mut state = nccl_sys::ncclResult_t::ncclSuccess;
        if self.comm.0.is_null() {
            return state;
        }
        // SAFETY: a live communicator and a valid out-pointer.
        let rc = unsafe { nccl_sys::ncclCommGetAsyncError(self.comm.0, &mut state) };
        if rc != nccl_sys::ncclResult_t::ncclSuccess {
            return rc;
        }
        state
    }

    /// Waits until a non-blocking NCCL call has been issued (state leaves InProgress).
    fn wait_comm_ready(&mut self, what: &str) -> Result<(), CommError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.async_state() {
                nccl_sys::ncclResult_t::ncclSuccess => return Ok(()),
                nccl_sys::ncclResult_t::ncclInProgress => {}
                other => {
                    return Err(
                        self.fail(CommError::Nccl(format!("{what}: {}", nccl_message(other))))
                    )
                }
            }
            self.check_abort_and_deadline(what, deadline)?;
            std::thread::sleep(POLL);
        }
    }

    fn check_abort_and_deadline(&mut self, what: &str, deadline: Instant) -> Result<(), CommError> {
        if self.abort.is_aborted() {
            return Err(self.fail(CommError::Aborted));
        }
        if Instant::now() >= deadline {
            let err = CommError::Timeout {
                what: format!("NCCL rank {} of {}: {what}", self.rank, self.world),
                // NCCL does not say which peer is missing; the coordinator's collective
                // sequence numbers do.
                peer: usize::MAX,
                after: self.timeout,
            };
            return Err(self.fail(err));
        }
        Ok(())
    }

    /// Waits for the work enqueued on stream 0 so far, watching NCCL's error state.
    fn wait_stream(&mut self, what: &str) -> Result<(), CommError> {
        // SAFETY: our event, recorded on the legacy default stream of the current context.
        unsafe { cu::event::record(self.event.0, std::ptr::null_mut()) }
            .map_err(|e| driver_message("cuEventRecord", e))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: our live event.
            match unsafe { cu::event::query(self.event.0) } {
                Ok(()) => return Ok(()),
                Err(cu::DriverError(cu_sys::CUresult::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => return Err(self.fail(driver_message(what, e))),
            }
            match self.async_state() {
                nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => {}
                other => {
                    return Err(
                        self.fail(CommError::Nccl(format!("{what}: {}", nccl_message(other))))
                    )
                }
            }
            self.check_abort_and_deadline(what, deadline)?;
            std::thread::sleep(POLL);
        }
    }

    /// Aborts the communicator (frees peers' and our stuck kernels); it is unusable after.
    fn fail(&mut self, err: CommError) -> CommError {
        if self.broken.is_none() {
            self.broken = Some(err.to_string());
            if !self.comm.0.is_null() {
                // SAFETY: a live communicator, aborted once.
                let _ = unsafe { nccl_sys::ncclCommAbort(self.comm.0) };
                self.comm.0 = std::ptr::null_mut();
            }
        }
        err
    }

    fn check_usable(&self, buf: &Tensor) -> Result<nccl_sys::ncclDataType_t, CommError> {
        if self.abort.is_aborted() {
            return Err(CommError::Aborted);
        }
        if let Some(why) = &self.broken {
            return Err(CommError::Nccl(format!(
                "the communicator failed earlier ({why}); form a new generation"
            )));
        }
        if buf.device() != Device::Cuda(self.device) {
            return Err(CommError::Unsupported(format!(
                "NCCL rank {} works on cuda:{}, got a tensor on {:?}",
                self.rank,
                self.device,
                buf.device()
            )));
        }
        if !buf.is_contiguous() {
            return Err(CommError::Unsupported(
                "the tensor is not contiguous".into(),
            ));
        }
        match buf.kind() {
            Kind::Float => Ok(nccl_sys::ncclDataType_t::ncclFloat32),
            Kind::Double => Ok(nccl_sys::ncclDataType_t::ncclFloat64),
            Kind::BFloat16 => Ok(nccl_sys::ncclDataType_t::ncclBfloat16),
            Kind::Half => Ok(nccl_sys::ncclDataType_t::ncclFloat16),
            other => Err(CommError::Unsupported(format!(
                "NCCL sums floats, not {other:?}"
            ))),
        }
    }

    /// Enqueues `call` on stream 0 and waits for it within the timeout.
    fn run(
        &mut self,
        what: &str,
        call: impl FnOnce(nccl_sys::ncclComm_t) -> nccl_sys::ncclResult_t,
    ) -> Result<(), CommError> {
        // SAFETY: the primary context of our device, retained for the process.
        unsafe { cu::ctx::set_current(self.context) }
            .map_err(|e| driver_message("cuCtxSetCurrent", e))?;
        let status = call(self.comm.0);
        self.check_call(what, status)?;
        self.wait_comm_ready(what)?;
        self.wait_stream(what)?;
        self.seq += 1;
        Ok(())
    }
}

/// `NCCL_CONFIG_INITIALIZER`.
fn default_config() -> nccl_sys::ncclConfig_t {
    nccl_sys::ncclConfig_t {
        size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: UNDEF_INT,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
    }
}

/// Makes the device's primary context (the one libtorch's runtime uses) current.
fn make_context_current(ordinal: usize) -> Result<cu_sys::CUcontext, CommError> {
    cu::init().map_err(|e| driver_message("cuInit", e))?;
    let device = cu::device::get(ordinal as i32).map_err(|e| driver_message("cuDeviceGet", e))?;
    // SAFETY: a valid device handle; the retained context lives for the process.
    let context = unsafe { cu::primary_ctx::retain(device) }
        .map_err(|e| driver_message("cuDevicePrimaryCtxRetain", e))?;
    // SAFETY: the context just retained.
    unsafe { cu::ctx::set_current(context) }.map_err(|e| driver_message("cuCtxSetCurrent", e))?;
    Ok(context)
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CommError> {
        let dtype = self.check_usable(buf)?;
        let (ptr, count) = (buf.data_ptr(), buf.numel());
        // SAFETY: an in-place all-reduce over `count` elements of a contiguous tensor on
        // our device, borrowed mutably until the wait below has seen it finish.
        self.run("ncclAllReduce", |comm| unsafe {
            nccl_sys::ncclAllReduce(
                ptr,
                ptr,
                count,
                dtype,
                nccl_sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })
    }

    fn broadcast(&mut self, buf: &mut Tensor, root: usize) -> Result<(), CommError> {
        let dtype = self.check_usable(buf)?;
        if root >= self.world {
            return Err(CommError::Argument(format!(
                "broadcast root {root} outside a world of {}",
                self.world
            )));
        }
        let (ptr, count) = (buf.data_ptr(), buf.numel());
        // SAFETY: as for the all-reduce, in place.
        self.run("ncclBroadcast", |comm| unsafe {
            nccl_sys::ncclBroadcast(
                ptr,
                ptr,
                count,
                dtype,
                root as i32,
                comm,
                std::ptr::null_mut(),
            )
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut one = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce_sum(&mut one)
    }

    fn sequence(&self) -> u64 {
        self.seq
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Abort rather than destroy: destroy waits for peers, which may be gone.
        if !self.comm.0.is_null() {
            // SAFETY: a live communicator, released once.
            let _ = unsafe { nccl_sys::ncclCommAbort(self.comm.0) };
        }
        // SAFETY: our event, destroyed once.
        let _ = unsafe { cu::event::destroy(self.event.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_without_nccl_gets_an_error_not_a_panic() {
        crate::runtime::init();
        if probe().is_ok() {
            eprintln!("NCCL is loadable here; the unavailable path is not exercised");
            return;
        }
        assert!(matches!(
            NcclCollective::unique_id(),
            Err(CommError::NcclUnavailable(_))
        ));
        let err = NcclCollective::new(&[0u8; 128], 0, 1, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CommError::NcclUnavailable(_)), "{err}");
        let short = NcclCollective::new(&[0u8; 5], 0, 1, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(short, CommError::Argument(_)), "{short}");
    }
}
