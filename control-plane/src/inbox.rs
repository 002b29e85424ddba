//! Signals that arrive from the data plane, kept for the control loop and
//! the read APIs: the latest report of each edge.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sextant_proto::v1 as pb;

/// The latest report of one edge, and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub report: pb::EdgeReport,
    pub received_at_ms: i64,
}

/// Latest edge reports by edge id.
#[derive(Debug, Default)]
pub struct Reports {
    latest: Mutex<BTreeMap<String, Received>>,
}

impl Reports {
    pub fn get(&self, edge: &str) -> Option<Received> {
        self.latest.lock().ok()?.get(edge).cloned()
    }

    pub fn put(&self, edge: String, r: Received) {
        if let Ok(mut m) = self.latest.lock() {
            m.insert(edge, r);
        }
    }
}

impl Reports {
    /// Every edge's latest report received at or after `since_ms`.
    pub fn fresh(&self, since_ms: i64) -> Vec<(String, Received)> {
        self.latest
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, r)| r.received_at_ms >= since_ms)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}
