//! Process start-up for anything that uses libtorch.
//!
//! The binary links only the CPU libtorch, so it starts on machines without a
//! GPU. On a GPU machine `libtorch_cuda.so` must be `dlopen`ed with
//! `RTLD_GLOBAL` *before the first CUDA query*: ATen caches its CPU-only hooks on
//! first use, and a later dlopen has no effect. [`init`] does that exactly once.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use proto::job::DeviceRequest;
use tch::Device;

/// Environment variable naming an explicit `libtorch_cuda.so` to load.
pub const CUDA_LIBRARY_ENV: &str = "DECLIP_LIBTORCH_CUDA";
/// The libtorch version the binary was built against (from `.libtorch/build-version`).
pub const LIBTORCH_VERSION: &str = env!("DECLIP_LIBTORCH_VERSION");

/// What the process found at start-up.
#[derive(Clone, Debug)]
pub struct RuntimeInfo {
    /// Whether `libtorch_cuda.so` was loaded, and from where or why not.
    pub cuda_library: Result<String, String>,
    /// CUDA devices libtorch can use (0 without CUDA).
    pub cuda_devices: usize,
    /// Intra-op threads libtorch uses on CPU.
    pub cpu_threads: i32,
}

impl RuntimeInfo {
    pub fn cuda_available(&self) -> bool {
        self.cuda_devices > 0
    }

    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        let cuda = match (&self.cuda_library, self.cuda_devices) {
            (Ok(path), n) if n > 0 => format!("yes, {n} device(s) via {path}"),
            (Ok(path), _) => format!("no: {path} loaded but no device is visible"),
            (Err(why), _) => format!("no: {why}"),
        };
        format!(
            "libtorch {LIBTORCH_VERSION}; CUDA {cuda}; {} CPU threads",
            self.cpu_threads
        )
    }
}

static RUNTIME: OnceLock<RuntimeInfo> = OnceLock::new();

/// Loads CUDA support if present (once per process) and reports what was found.
/// Call before any other use of tch.
pub fn init() -> &'static RuntimeInfo {
    RUNTIME.get_or_init(|| {
        let cuda_library = load_cuda_library();
        // Only now is it safe to ask libtorch about CUDA.
        let cuda_devices = if cuda_library.is_ok() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        RuntimeInfo {
            cuda_library,
            cuda_devices,
            cpu_threads: tch::get_num_threads(),
        }
    })
}

fn load_cuda_library() -> Result<String, String> {
    let candidate = std::env::var(CUDA_LIBRARY_ENV).unwrap_or_else(|_| "libtorch_cuda.so".into());
    let name = CString::new(candidate.clone())
        .map_err(|_| format!("{CUDA_LIBRARY_ENV} contains a NUL byte"))?;
    // SAFETY: dlopen with a valid C string; the handle is deliberately never closed
    // (libtorch keeps references into the library for the life of the process).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe {
            let err = libc::dlerror();
            if err.is_null() {
                "unknown dlopen error".to_string()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            }
        };
        return Err(format!("{candidate} not loaded ({why})"));
    }
    Ok(candidate)
}

/// Why a requested device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device cuda:{index} requested but CUDA is unavailable: {why}")]
    NoCuda { index: usize, why: String },
    #[error("--device cuda:{index} requested but only {count} CUDA device(s) are visible")]
    NoSuchGpu { index: usize, count: usize },
}

/// Turns a device request into a tch device: `auto` prefers the first GPU.
pub fn select_device(request: DeviceRequest, info: &RuntimeInfo) -> Result<Device, DeviceError> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto if info.cuda_available() => Ok(Device::Cuda(0)),
        DeviceRequest::Auto => Ok(Device::Cpu),
        DeviceRequest::Cuda(index) if !info.cuda_available() => Err(DeviceError::NoCuda {
            index,
            why: info.summary(),
        }),
        DeviceRequest::Cuda(index) if index >= info.cuda_devices => Err(DeviceError::NoSuchGpu {
            index,
            count: info.cuda_devices,
        }),
        DeviceRequest::Cuda(index) => Ok(Device::Cuda(index)),
    }
}

/// libtorch has one random generator per process: two threads that seed it and draw
/// from it at the same time interleave their draws, and a "seeded" initialisation is
/// then not reproducible (seen with test threads building models side by side).
static SEEDED_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `draw` with libtorch's generator seeded to `seed`, no other seeded draw of this
/// process in between: the same seed gives the same values whatever other threads do
/// through this function.
pub fn with_seed<T>(seed: u64, draw: impl FnOnce() -> T) -> T {
    let _only_us = SEEDED_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    draw()
}

/// This process's resident memory in bytes (from `/proc/self/statm`; 0 where unreadable).
pub fn resident_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_only() -> RuntimeInfo {
        RuntimeInfo {
            cuda_library: Err("libtorch_cuda.so not loaded (test)".into()),
            cuda_devices: 0,
            cpu_threads: 2,
        }
    }

    #[test]
    fn init_reports_the_build_version_and_runs_tensor_code() {
        let info = init();
        assert_eq!(LIBTORCH_VERSION, "2.11.0");
        assert!(info.cpu_threads >= 1);
        assert!(info.summary().starts_with("libtorch 2.11.0; CUDA "));
        let x = tch::Tensor::ones([2, 2], (tch::Kind::Float, Device::Cpu));
        assert_eq!(x.matmul(&x).sum(tch::Kind::Float).double_value(&[]), 8.0);
    }

    #[test]
    fn auto_falls_back_to_cpu_and_explicit_gpus_are_checked() {
        let info = cpu_only();
        assert_eq!(
            select_device(DeviceRequest::Auto, &info).unwrap(),
            Device::Cpu
        );
        assert_eq!(
            select_device(DeviceRequest::Cpu, &info).unwrap(),
            Device::Cpu
        );
        let err = select_device(DeviceRequest::Cuda(1), &info).unwrap_err();
        assert!(err.to_string().contains("CUDA is unavailable"), "{err}");
        let two_gpus = RuntimeInfo {
            cuda_library: Ok("libtorch_cuda.so".into()),
            cuda_devices: 2,
            cpu_threads: 2,
        };
        assert_eq!(
            select_device(DeviceRequest::Auto, &two_gpus).unwrap(),
            Device::Cuda(0)
        );
        assert_eq!(
            select_device(DeviceRequest::Cuda(1), &two_gpus).unwrap(),
            Device::Cuda(1)
        );
        assert!(matches!(
            select_device(DeviceRequest::Cuda(2), &two_gpus),
            Err(DeviceError::NoSuchGpu { index: 2, count: 2 })
        ));
    }
}
