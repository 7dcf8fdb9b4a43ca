//! SIGTERM (preemption, `kubectl delete`, the launcher) and SIGINT (Ctrl-C): the first one
//! asks this worker to stop cleanly: under a coordinator the job drains (an agreed stop
//! step, a committed checkpoint, then Stop for everyone; see `Control::poll_event`),
//! standalone the run checkpoints after the step in flight and ends. A second signal
//! exits at once with status 130.
//!
//! The handlers only set a flag (async-signal-safe); the loops read it between steps.
//! Installing them also means a worker running as PID 1 in a container does not ignore
//! SIGTERM (the kernel drops signals to PID 1 that have no handler).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

/// Exit status after a second signal (the shell's convention for SIGINT).
pub const FORCED_EXIT: i32 = 130;

static REQUESTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the handlers (once; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    if REQUESTED.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag as the previous signal left it: the
        // second signal exits, the first only sets the flag.
        signal_hook::flag::register_conditional_shutdown(signal, FORCED_EXIT, flag.clone())?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    let _ = REQUESTED.set(flag);
    Ok(())
}

/// Whether a stop was asked for (a first SIGTERM or SIGINT arrived).
pub fn requested() -> bool {
    REQUESTED.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_sigterm_only_raises_the_request() {
        install().unwrap();
        install().unwrap();
        assert!(!requested());
        signal_hook::low_level::raise(SIGTERM).unwrap();
        // The handler runs on this thread before `raise` returns.
        assert!(requested());
    }
}
