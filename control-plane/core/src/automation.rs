//! Automated failover, as the control loop (and the simulator) run it:
//! feeds the verdict logic ([`crate::health`]) with observations, bounds
//! automated failover ([`crate::failover`]), builds the [`Signals`] the
//! solver sees, and says whether the routing must change, with the audit
//! lines that explain why. Pure: time and reports come in as arguments.

use std::collections::{BTreeMap, BTreeSet};

use crate::failover::{self, Bounds, Held};
use crate::health::{HealthConfig, HealthTracker, Transition, Verdict};
use crate::ids::EdgeId;
use crate::signals::{EdgeSignal, Health, Signals};
use crate::Fleet;

/// One health result: `voter` (a vantage id, or [`crate::health::AGENT`]
/// for the edge's own report) saw `edge` pass or fail at `at_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub edge: String,
    pub voter: String,
    pub ok: bool,
    pub at_ms: i64,
    pub error: String,
}

/// What an edge's latest fresh report says about it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    /// The capacity it says it can take now, rps.
    pub capacity_rps: Option<f64>,
    /// The load it serves now, rps.
    pub load_rps: Option<f64>,
}

/// What readers see of automated failover (status, metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailoverView {
    /// Edges that look down but stay in the routing (alarms).
    pub held: Vec<Held>,
    /// Verdict changes so far, by the verdict reached (`down`, `up`).
    pub verdict_changes: BTreeMap<&'static str, u64>,
    /// Automated actions so far: `failover` (an edge taken out),
    /// `restore` (put back), `held` (beyond the bound).
    pub actions: BTreeMap<&'static str, u64>,
    /// Share of total capacity automation has taken out.
    pub removed_share: f64,
    /// Observations taken in.
    pub observations: u64,
}

/// One audit line for the loop to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    pub action: &'static str,
    pub target: String,
    pub reason: String,
    pub details: Vec<String>,
}

/// What a step decided.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub signals: Signals,
    /// The routing must be recomputed (and the audits committed).
    pub routing: bool,
    pub audits: Vec<AuditLine>,
    /// Verdict changes in this step (for logs).
    pub transitions: Vec<Transition>,
}

/// A reported capacity change smaller than this share does not re-solve.
const CAPACITY_CHANGE: f64 = 0.1;

/// A decision not yet committed: edges down, edges held, capacities.
#[derive(Debug, Clone)]
struct Pending {
    down: BTreeSet<EdgeId>,
    held: BTreeSet<EdgeId>,
    caps: BTreeMap<EdgeId, f64>,
}

/// Health verdicts, the failover bound, and what was last committed.
#[derive(Debug, Clone)]
pub struct Automation {
    tracker: HealthTracker,
    /// Steps taken (for occasional housekeeping).
    steps: u64,
    bounds: Bounds,
    committed_down: BTreeSet<EdgeId>,
    committed_held: BTreeSet<EdgeId>,
    committed_caps: BTreeMap<EdgeId, f64>,
    pending: Option<Pending>,
    pub view: FailoverView,
}

impl Automation {
    pub fn new(config: HealthConfig, bounds: Bounds) -> Self {
        Self {
            tracker: HealthTracker::new(config),
            steps: 0,
            bounds,
            committed_down: BTreeSet::new(),
            committed_held: BTreeSet::new(),
            committed_caps: BTreeMap::new(),
            pending: None,
            view: FailoverView::default(),
        }
    }

    /// Whether anything is tracked (then the loop re-evaluates on a timer:
    /// heartbeats go missing without an event).
    pub fn active(&self) -> bool {
        !self.tracker.is_empty()
    }

    /// The verdict settings.
    pub fn config(&self) -> &HealthConfig {
        self.tracker.config()
    }

    /// Takes in `obs`, evaluates at `now_ms`, and decides. `reported` holds
    /// the edges' fresh reports; `fmt_time` renders a time for the audit.
    pub fn step(
        &mut self,
        fleet: &Fleet,
        reported: &BTreeMap<EdgeId, Reported>,
        obs: Vec<Observation>,
        now_ms: i64,
        fmt_time: &dyn Fn(i64) -> String,
    ) -> Decision {
        self.view.observations += obs.len() as u64;
        for o in &obs {
            if let Some((edge, _)) = fleet.edges.get_key_value(o.edge.as_str()) {
                self.tracker
                    .observe(edge, &o.voter, o.ok, o.at_ms, &o.error);
            }
        }
        // Anycast sites' BGP voters count against their own quorum.
        for a in fleet.anycast.values() {
            if let Some(info) = fleet.domains.get(&a.site) {
                for edge in &info.edges {
                    self.tracker.set_bgp_quorum(edge, Some(a.quorum));
                }
            }
        }
        // Forget edges the fleet lost (cheaply: now and then, or when there
        // are more tracked than the fleet has).
        self.steps += 1;
        if self.tracker.len() > fleet.edges.len() || self.steps.is_multiple_of(64) {
            self.tracker.retain(|e| fleet.edges.contains_key(e));
        }
        let transitions = self.tracker.evaluate(now_ms);
        for t in &transitions {
            *self.view.verdict_changes.entry(t.to.as_str()).or_default() += 1;
        }
        let verdicts: BTreeMap<&EdgeId, &Verdict> = self.tracker.verdict_refs().collect();

        // Edges that look down, earliest first.
        let mut looks_down: Vec<(&EdgeId, &Verdict)> = verdicts
            .iter()
            .map(|(e, v)| (*e, *v))
            .filter(|(_, v)| v.health == Health::Down)
            .collect();
        looks_down.sort_by(|a, b| a.1.since_ms.cmp(&b.1.since_ms).then(a.0.cmp(b.0)));
        let order: Vec<EdgeId> = looks_down.iter().map(|(e, _)| (*e).clone()).collect();
        let bounded = failover::bound(fleet, &order, &self.committed_down, &self.bounds);
        let held_ids: BTreeSet<EdgeId> = bounded.held.iter().map(|h| h.edge.clone()).collect();

        // The signals routing will see.
        let mut signals = Signals::default();
        let mut caps = BTreeMap::new();
        for id in fleet.edges.keys() {
            let report = reported.get(id);
            let measured = report
                .and_then(|r| r.capacity_rps)
                .filter(|c| *c > 0.0 && c.is_finite());
            if let Some(c) = measured {
                caps.insert(id.clone(), c);
            }
            let v = verdicts.get(id);
            if v.is_none() && report.is_none() {
                continue;
            }
            let held = held_ids.contains(id);
            let health = match v.map(|v| v.health) {
                Some(Health::Down) if bounded.down.contains(id) => Health::Down,
                Some(Health::Down) => Health::Up,
                Some(h) => h,
                None => Health::Unknown,
            };
            let reason = match (v, held) {
                (Some(v), true) => {
                    let why = bounded
                        .held
                        .iter()
                        .find(|h| &h.edge == id)
                        .map(|h| h.why.clone())
                        .unwrap_or_default();
                    format!("looks down but held in the routing: {why}; {}", v.reason)
                }
                (Some(v), false) => v.reason.clone(),
                (None, _) => "no health votes yet".to_owned(),
            };
            signals.edges.insert(
                id.clone(),
                EdgeSignal {
                    health,
                    reason,
                    measured_capacity_rps: measured,
                    current_load_rps: report.and_then(|r| r.load_rps),
                    since_ms: v.map_or(0, |v| v.since_ms),
                    penalty: v.map_or(0.0, |v| v.penalty),
                    damped: v.is_some_and(|v| v.damped),
                    held,
                },
            );
        }

        let caps_moved = caps.len() != self.committed_caps.len()
            || caps.iter().any(|(e, c)| {
                self.committed_caps
                    .get(e)
                    .is_none_or(|old| (c - old).abs() > CAPACITY_CHANGE * old.max(1.0))
            });
        let mut audits = Vec::new();
        let removed = format!(
            "automation removes {:.1}% of total capacity",
            bounded.removed_share * 100.0
        );
        for e in bounded.down.difference(&self.committed_down) {
            let v = verdicts[e];
            let mut details: Vec<String> = v
                .failing
                .iter()
                .map(|(voter, since, err)| {
                    format!("{voter} failing since {}: {err}", fmt_time(*since))
                })
                .collect();
            details.push(removed.clone());
            audits.push(AuditLine {
                action: "failover.down",
                target: e.to_string(),
                reason: v.reason.clone(),
                details,
            });
        }
        for e in self.committed_down.difference(&bounded.down) {
            let reason = match verdicts.get(e) {
                Some(v) if v.health == Health::Down => {
                    format!("held in by the bound now; {}", v.reason)
                }
                Some(v) => v.reason.clone(),
                None => "no longer in the fleet".to_owned(),
            };
            audits.push(AuditLine {
                action: "failover.up",
                target: e.to_string(),
                reason,
                details: vec![removed.clone()],
            });
        }
        for h in bounded
            .held
            .iter()
            .filter(|h| !self.committed_held.contains(&h.edge))
        {
            audits.push(AuditLine {
                action: "failover.held",
                target: h.edge.to_string(),
                reason: format!("automation bound reached: {}; an operator must decide (drain it, or fix the signals)", h.why),
                details: verdicts
                    .get(&h.edge)
                    .map(|v| vec![v.reason.clone()])
                    .unwrap_or_default(),
            });
        }
        let routing = !audits.is_empty() || caps_moved;
        self.view.held = bounded.held;
        self.view.removed_share = bounded.removed_share;
        self.pending = routing.then_some(Pending {
            down: bounded.down,
            held: held_ids,
            caps,
        });
        Decision {
            signals,
            routing,
            audits,
            transitions,
        }
    }

    /// The last decision was committed.
    pub fn committed(&mut self) {
        if let Some(Pending { down, held, caps }) = self.pending.take() {
            for _ in down.difference(&self.committed_down) {
                *self.view.actions.entry("failover").or_default() += 1;
            }
            for _ in self.committed_down.difference(&down) {
                *self.view.actions.entry("restore").or_default() += 1;
            }
            for _ in held.difference(&self.committed_held) {
                *self.view.actions.entry("held").or_default() += 1;
            }
            self.committed_down = down;
            self.committed_held = held;
            self.committed_caps = caps;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four edges of 100 rps in two regions.
    fn fleet() -> Fleet {
        let mut text = String::from(
            "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
             default_group = \"g\"\nnameservers = [\"ns1.example.com\"]\n\n",
        );
        for i in 1..=4 {
            let r = if i <= 2 { "r1" } else { "r2" };
            text.push_str(&format!(
                "[[edges]]\nid = \"e{i}\"\nkind = \"self_built\"\nsite = \"region/{r}/metro/m{i}/site/s{i}\"\n\
                 addresses = [\"127.0.0.{i}\"]\ncapacity_rps = 100\nhealth_check = \"127.0.0.{i}:80\"\n\n"
            ));
        }
        text.push_str(
            "[[groups]]\nid = \"g\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 10 }\n\
             latency_ms = { \"region/r1\" = 10, \"region/r2\" = 20 }\n",
        );
        Fleet::from_toml(&text).expect("valid fleet")
    }

    fn obs(edge: &str, ok: bool, t: i64) -> Vec<Observation> {
        ["p1", "p2"]
            .iter()
            .map(|v| Observation {
                edge: edge.into(),
                voter: (*v).into(),
                ok,
                at_ms: t,
                error: if ok { String::new() } else { "refused".into() },
            })
            .collect()
    }

    fn step(a: &mut Automation, f: &Fleet, o: Vec<Observation>, t: i64) -> Decision {
        let none = BTreeMap::new();
        a.step(f, &none, o, t, &|ms| format!("t={ms}"))
    }

    #[test]
    fn a_fall_fails_over_and_the_second_is_held_at_the_bound() {
        let f = fleet();
        let mut a = Automation::new(HealthConfig::default(), Bounds::default());
        for t in 0..3 {
            let mut o = obs("e1", true, t * 1000);
            o.extend(obs("e2", true, t * 1000));
            let d = step(&mut a, &f, o, t * 1000);
            assert!(!d.routing, "t={t}");
        }
        step(&mut a, &f, obs("e1", false, 3000), 3000);
        let d = step(&mut a, &f, obs("e1", false, 4000), 4000);
        assert!(d.routing);
        assert_eq!(d.audits.len(), 1);
        assert_eq!(
            (d.audits[0].action, d.audits[0].target.as_str()),
            ("failover.down", "e1")
        );
        assert!(
            d.audits[0]
                .details
                .iter()
                .any(|x| x.contains("p1 failing since t=3000")),
            "{:?}",
            d.audits[0].details
        );
        assert_eq!(d.signals.health(&EdgeId::from("e1")), Health::Down);
        a.committed();
        assert_eq!(a.view.actions.get("failover"), Some(&1));

        // 25% of 400 rps is one edge: the next is held, and stays usable.
        step(&mut a, &f, obs("e2", false, 5000), 5000);
        let d = step(&mut a, &f, obs("e2", false, 6000), 6000);
        assert!(d.routing);
        assert_eq!(d.audits[0].action, "failover.held");
        let s = &d.signals.edges[&EdgeId::from("e2")];
        assert!(s.held && s.health == Health::Up, "{s:?}");
        a.committed();
        assert_eq!(a.view.held.len(), 1);
        // Nothing new: no routing change.
        let d = step(&mut a, &f, vec![], 6500);
        assert!(!d.routing);
    }

    #[test]
    fn an_anycast_block_sets_the_quorum_of_its_routers() {
        let mut spec = fleet().spec().clone();
        spec.anycast.push(crate::fleet::AnycastSpec {
            site: "region/r1/metro/m1/site/s1".into(),
            routers: vec!["r1".into(), "r2".into()],
            prefixes: vec!["203.0.113.0/24".into()],
            quorum: Some(1),
        });
        let f = Fleet::from_spec(spec).expect("valid");
        let mut a = Automation::new(HealthConfig::default(), Bounds::default());
        let with = |t: i64, r1: bool| {
            let mut o = obs("e1", true, t);
            for (r, ok) in [("bgp:r1", r1), ("bgp:r2", true)] {
                o.push(Observation {
                    edge: "e1".into(),
                    voter: r.into(),
                    ok,
                    at_ms: t,
                    error: if ok {
                        String::new()
                    } else {
                        "withdrawn".into()
                    },
                });
            }
            o
        };
        for t in 0..3 {
            step(&mut a, &f, with(t * 1000, true), t * 1000);
        }
        step(&mut a, &f, with(3000, false), 3000);
        let d = step(&mut a, &f, with(4000, false), 4000);
        assert!(d.routing, "one router of two is the quorum of 1");
        assert_eq!(d.signals.health(&EdgeId::from("e1")), Health::Down);
        assert!(
            d.signals.edges[&EdgeId::from("e1")]
                .reason
                .contains("bgp:r1 failing: withdrawn"),
            "{:?}",
            d.signals.edges[&EdgeId::from("e1")]
        );
    }

    #[test]
    fn a_reported_capacity_change_re_solves_only_when_it_matters() {
        let f = fleet();
        let mut a = Automation::new(HealthConfig::default(), Bounds::default());
        let rep = |c: f64| {
            BTreeMap::from([(
                EdgeId::from("e1"),
                Reported {
                    capacity_rps: Some(c),
                    load_rps: Some(5.0),
                },
            )])
        };
        let d = a.step(&f, &rep(80.0), vec![], 0, &|_| String::new());
        assert!(d.routing);
        assert_eq!(
            d.signals.edges[&EdgeId::from("e1")].measured_capacity_rps,
            Some(80.0)
        );
        a.committed();
        let d = a.step(&f, &rep(78.0), vec![], 1000, &|_| String::new());
        assert!(!d.routing, "a 2.5% change does not re-solve");
        let d = a.step(&f, &rep(50.0), vec![], 2000, &|_| String::new());
        assert!(d.routing);
    }
}
