//! Counters the coordinator updates; the Prometheus exporter reads them later. One
//! struct, shared by the service and the auth layer, so every refusal is counted once.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Refused RPCs and reports by reason (`unauthenticated_missing`, `rank_outside_world`, ...).
#[derive(Debug, Default)]
pub struct Metrics {
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one refusal for `reason` (a stable snake_case label).
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut map) = self.rejected.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }

    /// Refusals counted for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .map(|m| m.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every reason with its count.
    pub fn rejected_all(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let m = Metrics::default();
        m.reject("a");
        m.reject("a");
        m.reject("b");
        assert_eq!(m.rejected("a"), 2);
        assert_eq!(m.rejected("b"), 1);
        assert_eq!(m.rejected("c"), 0);
        assert_eq!(m.rejected_all().len(), 2);
    }
}
