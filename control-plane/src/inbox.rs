//! Signals that arrive from the data plane, kept for the control loop and
//! the read APIs: the latest report of each edge, and the health results
//! (probes, agent reports) queued for the loop's verdicts, with a wake-up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sextant_proto::v1 as pb;
use tokio::sync::Notify;

/// The latest report of one edge, and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub report: pb::EdgeReport,
    pub received_at_ms: i64,
}

pub use sextant_core::automation::Observation;

/// Most observations queued before the loop takes them; beyond, the
/// oldest are dropped (and counted): verdicts want the newest.
const MAX_QUEUED: usize = 200_000;

/// Latest edge reports by edge id, and the observation queue.
#[derive(Debug, Default)]
pub struct Reports {
    latest: Mutex<BTreeMap<String, Received>>,
    queue: Mutex<Vec<Observation>>,
    wake: Notify,
    dropped: AtomicU64,
}

impl Reports {
    pub fn get(&self, edge: &str) -> Option<Received> {
        self.latest.lock().ok()?.get(edge).cloned()
    }

    /// Keeps `r` as the edge's latest report, without a vote (a follower
    /// forwards the vote to the leader).
    pub fn keep(&self, edge: String, r: Received) {
        if let Ok(mut m) = self.latest.lock() {
            m.insert(edge, r);
        }
    }

    /// Keeps `r` as the edge's latest report and queues it as the agent's
    /// vote.
    pub fn put(&self, edge: String, r: Received) {
        let obs = Observation {
            edge: edge.clone(),
            voter: sextant_core::health::AGENT.to_owned(),
            ok: r.report.healthy,
            at_ms: r.received_at_ms,
            error: if r.report.healthy {
                String::new()
            } else {
                "the edge reports itself unhealthy".to_owned()
            },
        };
        if let Ok(mut m) = self.latest.lock() {
            m.insert(edge, r);
        }
        self.push(vec![obs]);
    }

    /// Queues observations and wakes the loop.
    pub fn push(&self, obs: Vec<Observation>) {
        if obs.is_empty() {
            return;
        }
        if let Ok(mut q) = self.queue.lock() {
            q.extend(obs);
            if q.len() > MAX_QUEUED {
                let extra = q.len() - MAX_QUEUED;
                q.drain(..extra);
                self.dropped.fetch_add(extra as u64, Ordering::Relaxed);
            }
        }
        self.wake.notify_one();
    }

    /// Takes every queued observation.
    pub fn take(&self) -> Vec<Observation> {
        self.queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Resolves when observations were queued since the last call.
    pub async fn arrived(&self) {
        self.wake.notified().await;
    }

    /// Observations dropped because the loop fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

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
