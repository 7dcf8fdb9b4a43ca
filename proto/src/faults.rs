//! Names of the worker's fault-injection points (`worker::faults`), shared with the
//! end-to-end tests that configure them. A worker reads `FAILPOINTS` at start:
//! `NAME=ACTIONS;NAME=ACTIONS`, with the `fail` crate's actions; at these points
//! `return(FILE)` holds the process until FILE exists.

/// The environment variable that configures the points.
pub const ENV: &str = "FAILPOINTS";

/// After a trainer wrote a checkpoint (and, under a coordinator, it was committed).
pub const CHECKPOINT_WRITTEN: &str = "train.checkpoint_written";

/// After a teacher appended one image's record to the shard it is writing.
pub const RECORD_WRITTEN: &str = "teacher.record_written";

/// Every point.
pub const POINTS: [&str; 2] = [CHECKPOINT_WRITTEN, RECORD_WRITTEN];

/// The `FAILPOINTS` value that holds `point` at its `hit`-th hit (1-based) until
/// `gate` exists; earlier and later hits pass.
pub fn hold_at(point: &str, hit: u32, gate: &std::path::Path) -> String {
    let pass = match hit.saturating_sub(1) {
        0 => String::new(),
        n => format!("{n}*off->"),
    };
    format!("{point}={pass}1*return({})", gate.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_at_passes_the_earlier_hits() {
        let gate = std::path::Path::new("/tmp/gate");
        assert_eq!(
            hold_at(CHECKPOINT_WRITTEN, 1, gate),
            "train.checkpoint_written=1*return(/tmp/gate)"
        );
        assert_eq!(
            hold_at(RECORD_WRITTEN, 3, gate),
            "teacher.record_written=2*off->1*return(/tmp/gate)"
        );
    }
}
