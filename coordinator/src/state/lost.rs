//! Why a member left its generation: [`LostReason`]. Its text is what the journal's
//! `Lost` record, the events and the other members' `AbortGroup` say; its
//! [`label`](LostReason::label) is the `reason` of the aborted-generations counter.
//! A leaf, so the metrics depend on it and not on the state.

use std::fmt;

/// Why a member of the current generation is out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// Its Attach stream ended (the process exited, or the connection broke).
    StreamClosed,
    /// It sent no report for longer than the heartbeat timeout.
    HeartbeatTimeout,
    /// It reported `FAILED`, with its error text.
    ReportedFailure(String),
    /// It came back IDLE on its own: its generation ended on its side (a failed
    /// collective), though no process was lost.
    BackToIdle,
}

impl LostReason {
    /// Every value [`LostReason::label`] takes, for exporting the counter from 0.
    pub const LABELS: [&'static str; 3] = ["lost_member", "hang", "error"];

    /// The `reason` label of the aborted generation: `hang` for a silent member,
    /// `error` for one that failed or gave up on its generation, `lost_member` when
    /// its stream ended.
    pub fn label(&self) -> &'static str {
        match self {
            LostReason::StreamClosed => "lost_member",
            LostReason::HeartbeatTimeout => "hang",
            LostReason::ReportedFailure(_) | LostReason::BackToIdle => "error",
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::StreamClosed => f.write_str("stream closed"),
            LostReason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            LostReason::ReportedFailure(error) => write!(f, "reported failure: {error}"),
            LostReason::BackToIdle => {
                f.write_str("back to IDLE: its generation ended on its side (a failed collective)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_listed() {
        let all = [
            LostReason::StreamClosed,
            LostReason::HeartbeatTimeout,
            LostReason::ReportedFailure("x".into()),
            LostReason::BackToIdle,
        ];
        for reason in &all {
            assert!(LostReason::LABELS.contains(&reason.label()), "{reason}");
        }
        for label in LostReason::LABELS {
            assert!(all.iter().any(|r| r.label() == label), "{label}");
        }
    }

    /// The text is journaled: it must read as before the reasons were typed.
    #[test]
    fn the_text_is_what_the_journal_has_always_said() {
        assert_eq!(LostReason::StreamClosed.to_string(), "stream closed");
        assert_eq!(
            LostReason::HeartbeatTimeout.to_string(),
            "heartbeat timeout"
        );
        assert_eq!(
            LostReason::ReportedFailure("ring peer 1 closed".into()).to_string(),
            "reported failure: ring peer 1 closed"
        );
        assert_eq!(
            LostReason::BackToIdle.to_string(),
            "back to IDLE: its generation ended on its side (a failed collective)"
        );
    }
}
