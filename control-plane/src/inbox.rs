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

/// An edge's reports become its agent's vote at most this often (ms);
/// those in between only replace its latest report, unless they change
/// its health (then at most every [`MIN_CHANGE_GAP_MS`]). An edge
/// reporting in a tight loop (broken or hostile) cannot fill the queue
/// and push out other edges' and probers' votes, nor wake the loop for
/// each report.
pub const MIN_VOTE_GAP_MS: i64 = 100;
pub const MIN_CHANGE_GAP_MS: i64 = 10;

/// Latest edge reports by edge id, and the observation queue.
#[derive(Debug, Default)]
pub struct Reports {
    latest: Mutex<BTreeMap<String, Received>>,
    queue: Mutex<Vec<Observation>>,
    wake: Notify,
    dropped: AtomicU64,
    /// When each edge's last vote was queued, and what it said.
    voted: Mutex<BTreeMap<String, (i64, bool)>>,
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
    /// vote, unless the edge's last vote is less than [`MIN_VOTE_GAP_MS`]
    /// old and said the same (or, when it said otherwise, is less than
    /// [`MIN_CHANGE_GAP_MS`] old).
    pub fn put(&self, edge: String, r: Received) {
        if let Ok(mut v) = self.voted.lock() {
            let (at, ok) = (r.received_at_ms, r.report.healthy);
            match v.get_mut(&edge) {
                Some((last, said)) => {
                    let gap = if *said == ok {
                        MIN_VOTE_GAP_MS
                    } else {
                        MIN_CHANGE_GAP_MS
                    };
                    if (*last..last.saturating_add(gap)).contains(&at) {
                        drop(v);
                        self.keep(edge, r);
                        return;
                    }
                    (*last, *said) = (at, ok);
                }
                None => {
                    v.insert(edge.clone(), (at, ok));
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(edge: &str, at: i64, healthy: bool) -> Received {
        Received {
            report: pb::EdgeReport {
                node_id: edge.into(),
                healthy,
                ..Default::default()
            },
            received_at_ms: at,
        }
    }

    #[test]
    fn one_edge_reporting_in_a_tight_loop_cannot_push_out_other_votes() {
        let r = Reports::default();
        r.push(vec![Observation {
            edge: "e2".into(),
            voter: "p1".into(),
            ok: false,
            at_ms: 0,
            error: "refused".into(),
        }]);
        // 200,000 reports in 10 s: one vote per 100 ms is queued.
        for i in 0..MAX_QUEUED as i64 {
            r.put("e1".into(), report("e1", i / 20, true));
        }
        let q = r.take();
        assert_eq!(r.dropped(), 0);
        assert!(q.iter().any(|o| o.edge == "e2" && o.voter == "p1"));
        let votes = q.iter().filter(|o| o.edge == "e1").count();
        assert_eq!(votes, 100, "{votes} votes of e1 queued");
        // The latest report is still the last one received.
        assert_eq!(r.get("e1").map(|x| x.received_at_ms), Some(9_999));
    }

    #[test]
    fn reports_at_the_usual_pace_are_each_a_vote() {
        let r = Reports::default();
        for (i, healthy) in [true, false, true].into_iter().enumerate() {
            r.put("e1".into(), report("e1", 1_000 * i as i64, healthy));
            r.put("e2".into(), report("e2", 1_000 * i as i64, true));
        }
        let q = r.take();
        let e1: Vec<bool> = q.iter().filter(|o| o.edge == "e1").map(|o| o.ok).collect();
        assert_eq!(e1, [true, false, true]);
        assert_eq!(q.iter().filter(|o| o.edge == "e2").count(), 3);
        // A clock gone backwards (a new leader's) does not silence an edge.
        r.put("e1".into(), report("e1", 500, false));
        assert_eq!(r.take().len(), 1);
    }

    #[test]
    fn a_change_of_health_in_a_burst_is_voted_at_once() {
        let r = Reports::default();
        r.put("e1".into(), report("e1", 1_000, true));
        r.put("e1".into(), report("e1", 1_040, false));
        r.put("e1".into(), report("e1", 1_041, true));
        r.put("e1".into(), report("e1", 1_045, false));
        let votes: Vec<(i64, bool)> = r.take().iter().map(|o| (o.at_ms, o.ok)).collect();
        assert_eq!(votes, [(1_000, true), (1_040, false)]);
        assert_eq!(r.get("e1").map(|x| x.report.healthy), Some(false));
        // Flipping every 5 ms for half a second is voted at most every
        // 10 ms.
        for i in 0..100 {
            r.put("e2".into(), report("e2", 5_000 + i * 5, i % 2 == 0));
        }
        let n = r.take().len();
        assert!((20..=50).contains(&n), "{n} votes");
    }
}
