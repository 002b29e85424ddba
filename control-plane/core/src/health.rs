//! Health verdicts from signals: pure logic with injected time.
//!
//! Each edge is judged by its *voters*: every vantage point that probes it,
//! and its own agent (the edge's report stream; a report saying unhealthy,
//! or a missed heartbeat, is a failing vote). A voter votes *down* after
//! [`HealthConfig::down_after`] consecutive failures and *up* after
//! [`HealthConfig::up_after`] consecutive passes; results older than
//! [`HealthConfig::stale_after_ms`] do not vote. An edge is down when at
//! least [`HealthConfig::quorum`] voters vote down, so a partitioned
//! vantage point or a broken probe alone moves nothing; it is up again when
//! no quorum votes down and enough voters vote up (hysteresis).
//!
//! **Flap damping**, as BGP route-flap damping does: every fall adds a
//! penalty that decays with a half-life; while the penalty is above the
//! suppress threshold the edge is held down even when its voters say up,
//! until the penalty decays below the reuse threshold. An edge that flaps
//! therefore leaves the routing once and stays out instead of oscillating.
//!
//! An edge whose voters all went silent keeps its last verdict (a prober
//! fleet that dies must not bring a dead edge back), and says so.
//!
//! **Anycast voters** (names starting with [`BGP_PREFIX`], one per BGP
//! router of an anycast site, fed from BMP) are counted apart from the
//! probes: they take the edge down by themselves when their own quorum
//! ([`HealthTracker::set_bgp_quorum`], default all of them) votes down,
//! whatever the probes say, so a site with one router can be taken out by
//! that router. Each router's vote has the same K/M hysteresis and
//! staleness as a probe's. Both quorums count the fresh voters of their
//! kind only. The edge is up when neither kind has a quorum down and each
//! kind that has fresh voters is up by its rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::EdgeId;
use crate::signals::Health;

/// The voter name of an edge's own agent.
pub const AGENT: &str = "agent";

/// Voter names of BGP routers (anycast health from BMP) start with this;
/// probers may not use it.
pub const BGP_PREFIX: &str = "bgp:";

/// Whether `voter` is a BGP router's.
pub fn is_bgp(voter: &str) -> bool {
    voter.starts_with(BGP_PREFIX)
}

/// Flap damping settings (BGP-style: penalty, thresholds, half-life).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Damping {
    /// Added at each fall.
    pub penalty: f64,
    /// Held down while the penalty is at or above this...
    pub suppress: f64,
    /// ...until it decays below this.
    pub reuse: f64,
    pub half_life_ms: i64,
    /// The penalty never exceeds this (bounds the hold after flapping stops).
    pub max_penalty: f64,
}

impl Default for Damping {
    fn default() -> Self {
        Self {
            penalty: 1000.0,
            suppress: 1000.0,
            reuse: 500.0,
            half_life_ms: 10_000,
            max_penalty: 4000.0,
        }
    }
}

impl Damping {
    /// `p` decayed over `dt_ms`.
    pub fn decay(&self, p: f64, dt_ms: i64) -> f64 {
        if self.half_life_ms <= 0 || dt_ms <= 0 {
            return p;
        }
        p * 0.5f64.powf(dt_ms as f64 / self.half_life_ms as f64)
    }

    /// How long a penalty `p` takes to decay below the reuse threshold.
    pub fn hold_ms(&self, p: f64) -> i64 {
        if p < self.reuse || self.reuse <= 0.0 || self.half_life_ms <= 0 {
            return 0;
        }
        ((p / self.reuse).log2() * self.half_life_ms as f64).ceil() as i64 + 1
    }
}

/// How verdicts are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// Voters that must vote down for an edge to be down.
    pub quorum: usize,
    /// Consecutive failures before a voter votes down (K).
    pub down_after: u32,
    /// Consecutive passes before a voter votes up (M).
    pub up_after: u32,
    /// A voter's results older than this do not count.
    pub stale_after_ms: i64,
    /// An agent silent this long votes down (a missed heartbeat).
    pub heartbeat_timeout_ms: i64,
    pub damping: Damping,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            quorum: 2,
            down_after: 2,
            up_after: 3,
            stale_after_ms: 5_000,
            heartbeat_timeout_ms: 3_000,
            damping: Damping::default(),
        }
    }
}

/// Why a health setting is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HealthConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{field} must be a finite number > 0, got {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("damping: reuse ({reuse}) must be below suppress ({suppress}), and suppress at most max_penalty ({max})")]
    Thresholds { reuse: f64, suppress: f64, max: f64 },
}

impl HealthConfig {
    pub fn check(&self) -> Result<(), HealthConfigError> {
        if self.quorum == 0 {
            return Err(HealthConfigError::Zero("quorum"));
        }
        if self.down_after == 0 {
            return Err(HealthConfigError::Zero("down_after"));
        }
        if self.up_after == 0 {
            return Err(HealthConfigError::Zero("up_after"));
        }
        let d = &self.damping;
        for (field, value) in [
            ("stale_after_ms", self.stale_after_ms as f64),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms as f64),
            ("damping.penalty", d.penalty),
            ("damping.suppress", d.suppress),
            ("damping.reuse", d.reuse),
            ("damping.half_life_ms", d.half_life_ms as f64),
            ("damping.max_penalty", d.max_penalty),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(HealthConfigError::NotPositive { field, value });
            }
        }
        if !(d.reuse < d.suppress && d.suppress <= d.max_penalty) {
            return Err(HealthConfigError::Thresholds {
                reuse: d.reuse,
                suppress: d.suppress,
                max: d.max_penalty,
            });
        }
        Ok(())
    }
}

/// One voter's record for one edge.
#[derive(Debug, Clone, Default, PartialEq)]
struct Voter {
    fails: u32,
    passes: u32,
    last_at_ms: i64,
    /// Start of the current run of failures.
    failing_since_ms: Option<i64>,
    last_error: String,
}

/// The judgement of one edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub health: Health,
    /// Since when (ms) the edge has had this verdict.
    pub since_ms: i64,
    /// Why: the voters and what they see.
    pub reason: String,
    /// Flap-damping penalty now.
    pub penalty: f64,
    /// Held down by damping although its voters say up.
    pub damped: bool,
    /// Voters voting down now, with since when they fail and their error.
    pub failing: Vec<(String, i64, String)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct EdgeState {
    voters: BTreeMap<String, Voter>,
    /// What the voters last said (before damping).
    raw: Health,
    health: Health,
    since_ms: i64,
    penalty: f64,
    penalty_at_ms: i64,
    damped: bool,
    falls: u32,
    /// As of the last evaluation.
    verdict: Option<Verdict>,
    /// The voters' reason in words, and the key of the voter states it
    /// was written for: words are written again only when those change
    /// (evaluation runs every interval for every edge).
    words: (u64, String),
    /// BGP voters that must vote down (`None`: all fresh ones).
    bgp_quorum: Option<usize>,
}

/// A change of verdict, for the caller to act on and audit.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub edge: EdgeId,
    pub from: Health,
    pub to: Health,
    pub verdict: Verdict,
}

/// Verdicts of every edge, fed with results as they arrive.
#[derive(Debug, Clone, Default)]
pub struct HealthTracker {
    config: HealthConfig,
    edges: BTreeMap<EdgeId, EdgeState>,
}

impl HealthTracker {
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            edges: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// One result from `voter` (a vantage id, or [`AGENT`]) about `edge`.
    /// Results older than the voter's last one are ignored (reordering).
    pub fn observe(&mut self, edge: &EdgeId, voter: &str, ok: bool, at_ms: i64, error: &str) {
        let st = match self.edges.get_mut(edge) {
            Some(st) => st,
            None => self.edges.entry(edge.clone()).or_default(),
        };
        if !st.voters.contains_key(voter) {
            st.voters.insert(voter.to_owned(), Voter::default());
        }
        let Some(v) = st.voters.get_mut(voter) else {
            return;
        };
        if at_ms < v.last_at_ms {
            return;
        }
        v.last_at_ms = at_ms;
        if ok {
            v.passes = v.passes.saturating_add(1);
            v.fails = 0;
            v.failing_since_ms = None;
            v.last_error.clear();
        } else {
            v.fails = v.fails.saturating_add(1);
            v.passes = 0;
            v.failing_since_ms.get_or_insert(at_ms);
            let error = if error.is_empty() { "failed" } else { error };
            if v.last_error != error {
                v.last_error = error.to_owned();
            }
        }
    }

    /// How many of `edge`'s BGP voters must vote down to take it down
    /// (capped at the fresh ones); `None`: all of them. Only for an edge
    /// already tracked (set it after [`Self::observe`]).
    pub fn set_bgp_quorum(&mut self, edge: &EdgeId, quorum: Option<usize>) {
        if let Some(st) = self.edges.get_mut(edge) {
            st.bgp_quorum = quorum;
        }
    }

    /// Forgets edges not in `known` (removed from the fleet).
    pub fn retain(&mut self, known: impl Fn(&EdgeId) -> bool) {
        self.edges.retain(|e, _| known(e));
    }

    /// How many edges are tracked.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether any edge is tracked (the caller then re-evaluates on a timer).
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Evaluates every edge at `now_ms` and returns the verdicts that changed.
    pub fn evaluate(&mut self, now_ms: i64) -> Vec<Transition> {
        let cfg = self.config.clone();
        let mut out = Vec::new();
        for (id, st) in &mut self.edges {
            let from = st.health;
            let (probes, bgp, key) = tally(&cfg, st, now_ms);
            let raw = combine(&cfg, st, &probes, &bgp);
            if key != st.words.0 || st.words.1.is_empty() {
                st.words = (key, describe(&cfg, st, now_ms, raw, &probes, &bgp));
            }
            let mut failing = probes.failing;
            failing.extend(bgp.failing);
            let reason = st.words.1.clone();
            // Damping: a fall adds penalty; a held edge stays down until
            // the penalty decays below reuse.
            let decayed = cfg.damping.decay(st.penalty, now_ms - st.penalty_at_ms);
            st.penalty = decayed;
            st.penalty_at_ms = now_ms;
            // Every fall counts, also while held down by damping.
            let falls = raw == Some(Health::Down) && st.raw != Health::Down;
            if let Some(r) = raw {
                st.raw = r;
            }
            if falls {
                st.penalty = (st.penalty + cfg.damping.penalty).min(cfg.damping.max_penalty);
                st.falls += 1;
                if st.penalty >= cfg.damping.suppress {
                    st.damped = true;
                }
            }
            if st.damped && st.penalty < cfg.damping.reuse {
                st.damped = false;
            }
            // While damped, a flap back down still adds penalty (above),
            // and an up vote does not bring the edge back.
            let to = match raw {
                Some(Health::Up) if st.damped => Health::Down,
                Some(h) => h,
                None => from,
            };
            let reason = if to == Health::Down && raw == Some(Health::Up) {
                format!(
                    "damped: {} falls, penalty {:.0} above reuse {:.0} (back in about {}s); {reason}",
                    st.falls,
                    st.penalty,
                    cfg.damping.reuse,
                    (cfg.damping.hold_ms(st.penalty) + 999) / 1000
                )
            } else {
                reason
            };
            if to != from {
                st.health = to;
                st.since_ms = now_ms;
            }
            let verdict = Verdict {
                health: st.health,
                since_ms: st.since_ms,
                reason,
                penalty: st.penalty,
                damped: st.damped && st.health == Health::Down,
                failing,
            };
            st.verdict = Some(verdict.clone());
            if to != from {
                out.push(Transition {
                    edge: id.clone(),
                    from,
                    to,
                    verdict,
                });
            }
        }
        out
    }

    /// The verdict of every evaluated edge, as of the last
    /// [`Self::evaluate`], borrowed.
    pub fn verdict_refs(&self) -> impl Iterator<Item = (&EdgeId, &Verdict)> {
        self.edges
            .iter()
            .filter_map(|(id, st)| Some((id, st.verdict.as_ref()?)))
    }

    /// The verdict of every evaluated edge, as of the last [`Self::evaluate`].
    pub fn verdicts(&self) -> BTreeMap<EdgeId, Verdict> {
        self.edges
            .iter()
            .filter_map(|(id, st)| Some((id.clone(), st.verdict.clone()?)))
            .collect()
    }
}

/// Where one voter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stand {
    /// An agent that stopped reporting: a failing vote.
    Silent,
    /// Too old to vote.
    Stale,
    /// Votes down.
    Failing,
    /// Votes up.
    Ok,
    /// Failed, not yet K times.
    Failed,
    /// Passed, not yet M times.
    Recovering,
}

fn stand(cfg: &HealthConfig, name: &str, v: &Voter, now_ms: i64) -> Stand {
    let age = now_ms - v.last_at_ms;
    if name == AGENT && age > cfg.heartbeat_timeout_ms {
        Stand::Silent
    } else if age > cfg.stale_after_ms {
        Stand::Stale
    } else if v.fails >= cfg.down_after {
        Stand::Failing
    } else if v.passes >= cfg.up_after {
        Stand::Ok
    } else if v.fails > 0 {
        Stand::Failed
    } else {
        Stand::Recovering
    }
}

/// One kind of voters (probes and agent, or BGP routers), counted.
#[derive(Debug, Default)]
struct Tally {
    failing: Vec<(String, i64, String)>,
    up: usize,
    fresh: usize,
    n: usize,
}

impl Tally {
    fn add(&mut self, name: &str, v: &Voter, s: Stand) {
        self.n += 1;
        match s {
            Stand::Silent => {
                self.failing
                    .push((name.to_owned(), v.last_at_ms, "no report".to_owned()));
                self.fresh += 1;
            }
            Stand::Stale => {}
            Stand::Failing => {
                let since = v.failing_since_ms.unwrap_or(v.last_at_ms);
                self.failing
                    .push((name.to_owned(), since, v.last_error.clone()));
                self.fresh += 1;
            }
            Stand::Ok => {
                self.up += 1;
                self.fresh += 1;
            }
            Stand::Failed | Stand::Recovering => self.fresh += 1,
        }
    }

    /// Probes: down with `quorum` failing, up with `quorum` (or every
    /// fresh voter, if fewer) passing.
    fn probe_rule(&self, quorum: usize) -> Option<Health> {
        if self.failing.len() >= quorum {
            Some(Health::Down)
        } else if self.fresh > 0 && self.up >= quorum.min(self.fresh) {
            Some(Health::Up)
        } else {
            None
        }
    }

    /// The BGP quorum in effect: as set, at most the fresh voters.
    fn bgp_quorum(&self, quorum: Option<usize>) -> usize {
        quorum.unwrap_or(self.fresh).min(self.fresh).max(1)
    }

    /// BGP routers: down with the quorum failing; up when so many pass
    /// that fewer than the quorum could be failing.
    fn bgp_rule(&self, quorum: Option<usize>) -> Option<Health> {
        if self.fresh == 0 {
            return None;
        }
        let q = self.bgp_quorum(quorum);
        if self.failing.len() >= q {
            Some(Health::Down)
        } else if self.up > self.fresh - q {
            Some(Health::Up)
        } else {
            None
        }
    }
}

/// The voters of `st`, counted by kind, and a key of their stands.
fn tally(cfg: &HealthConfig, st: &EdgeState, now_ms: i64) -> (Tally, Tally, u64) {
    use std::hash::{Hash, Hasher};
    let mut probes = Tally::default();
    let mut bgp = Tally::default();
    let mut key = std::collections::hash_map::DefaultHasher::new();
    for (name, v) in &st.voters {
        let s = stand(cfg, name, v, now_ms);
        name.hash(&mut key);
        s.hash(&mut key);
        if matches!(s, Stand::Failing | Stand::Failed) {
            v.last_error.hash(&mut key);
        }
        if is_bgp(name) {
            bgp.add(name, v, s);
        } else {
            probes.add(name, v, s);
        }
    }
    (probes, bgp, key.finish())
}

/// Both kinds' verdicts combined: down if either has its quorum down; up
/// if each kind with fresh voters is up; else `None` (hold).
fn combine(cfg: &HealthConfig, st: &EdgeState, probes: &Tally, bgp: &Tally) -> Option<Health> {
    let p = probes.probe_rule(cfg.quorum);
    if bgp.fresh == 0 {
        return p;
    }
    let b = bgp.bgp_rule(st.bgp_quorum);
    if p == Some(Health::Down) || b == Some(Health::Down) {
        Some(Health::Down)
    } else if b == Some(Health::Up) && (p == Some(Health::Up) || probes.fresh == 0) {
        Some(Health::Up)
    } else {
        None
    }
}

/// The voters' reason in words.
fn describe(
    cfg: &HealthConfig,
    st: &EdgeState,
    now_ms: i64,
    raw: Option<Health>,
    probes: &Tally,
    bgp: &Tally,
) -> String {
    let words: Vec<String> = st
        .voters
        .iter()
        .map(|(name, v)| match stand(cfg, name, v, now_ms) {
            Stand::Silent => "agent silent".to_owned(),
            Stand::Stale => format!("{name} stale"),
            Stand::Failing => format!("{name} failing: {}", v.last_error),
            Stand::Ok => format!("{name} ok"),
            Stand::Failed => format!("{name} failed ({})", v.last_error),
            Stand::Recovering => format!("{name} recovering"),
        })
        .collect();
    let n = probes.n;
    let (failing, up, fresh) = (probes.failing.len(), probes.up, probes.fresh);
    let mut head = match raw {
        _ if n == 0 => String::new(),
        Some(Health::Down) if failing >= cfg.quorum => format!(
            "{failing} of {n} voters see it down (quorum {})",
            cfg.quorum
        ),
        Some(Health::Up) => format!("{up} of {n} voters see it up"),
        _ if fresh == 0 => "no fresh probes".to_owned(),
        _ => format!("{failing} of {n} voters see it down, {up} up"),
    };
    if bgp.n > 0 {
        if !head.is_empty() {
            head.push_str("; ");
        }
        let lost = bgp.failing.len();
        if bgp.fresh == 0 {
            head.push_str("anycast: no fresh BGP votes");
        } else {
            let q = bgp.bgp_quorum(st.bgp_quorum);
            head.push_str(&format!(
                "anycast: {lost} of {} routers lost the route (quorum {q})",
                bgp.n
            ));
            if lost >= q {
                head.push_str(": not reachable by anycast");
            }
        }
    }
    if raw.is_none() {
        if probes.fresh == 0 && bgp.fresh == 0 {
            head = "no fresh signals".to_owned();
        }
        head.push_str(": holding the last verdict");
    }
    format!("{head}: {}", words.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            quorum: 2,
            down_after: 2,
            up_after: 2,
            stale_after_ms: 3_000,
            heartbeat_timeout_ms: 3_000,
            damping: Damping {
                penalty: 1000.0,
                suppress: 1000.0,
                reuse: 500.0,
                half_life_ms: 10_000,
                max_penalty: 4000.0,
            },
        }
    }

    fn e() -> EdgeId {
        EdgeId::from("e1")
    }

    /// One round at `t` seconds: each vantage's result.
    fn round(h: &mut HealthTracker, t: i64, results: &[(&str, bool)]) -> Vec<Transition> {
        for (v, ok) in results {
            h.observe(
                &e(),
                v,
                *ok,
                t * 1000,
                if *ok { "" } else { "connect: refused" },
            );
        }
        h.evaluate(t * 1000)
    }

    #[test]
    fn a_quorum_of_vantages_failing_k_times_takes_an_edge_down() {
        let mut h = HealthTracker::new(cfg());
        let all_ok = [("p1", true), ("p2", true), ("p3", true)];
        round(&mut h, 0, &all_ok);
        let t = round(&mut h, 1, &all_ok);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, Health::Up);
        // One failure each: not yet (K = 2).
        let down = [("p1", false), ("p2", false), ("p3", false)];
        assert!(round(&mut h, 2, &down).is_empty());
        let t = round(&mut h, 3, &down);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].to, Health::Down);
        assert_eq!(t[0].verdict.failing.len(), 3);
        assert!(
            t[0].verdict.reason.contains("3 of 3 voters see it down"),
            "{}",
            t[0].verdict.reason
        );
        assert!(t[0].verdict.reason.contains("connect: refused"));
        assert_eq!(
            t[0].verdict.failing[0].1, 2000,
            "failing since the first failure"
        );
    }

    #[test]
    fn one_partitioned_vantage_moves_nothing() {
        let mut h = HealthTracker::new(cfg());
        for t in 0..30 {
            let tr = round(&mut h, t, &[("p1", false), ("p2", true), ("p3", true)]);
            assert!(tr.iter().all(|x| x.to != Health::Down), "t={t}: {tr:?}");
        }
        let v = &h.verdicts()[&e()];
        assert_eq!(v.health, Health::Up);
        assert!(v.reason.contains("p1 failing"), "{}", v.reason);
    }

    #[test]
    fn it_comes_back_only_after_m_passes_and_the_damping_hold() {
        let mut h = HealthTracker::new(cfg());
        let ok = [("p1", true), ("p2", true)];
        let bad = [("p1", false), ("p2", false)];
        for t in 0..2 {
            round(&mut h, t, &ok);
        }
        round(&mut h, 2, &bad);
        assert_eq!(round(&mut h, 3, &bad)[0].to, Health::Down);
        // A long outage: the penalty (1000) decays below reuse (500) after
        // one half-life (10 s), so it is back after M = 2 passes.
        for t in 4..20 {
            assert!(round(&mut h, t, &bad).is_empty());
        }
        assert!(round(&mut h, 20, &ok).is_empty(), "one pass is not enough");
        let t = round(&mut h, 21, &ok);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, Health::Up);
    }

    #[test]
    fn a_quick_bounce_waits_for_the_penalty_to_decay() {
        let mut h = HealthTracker::new(cfg());
        let ok = [("p1", true), ("p2", true)];
        let bad = [("p1", false), ("p2", false)];
        round(&mut h, 0, &ok);
        round(&mut h, 1, &ok);
        round(&mut h, 2, &bad);
        assert_eq!(round(&mut h, 3, &bad)[0].to, Health::Down);
        // Back after 2 s: its voters say up, damping holds it until the
        // penalty decays below 500 (10 s after the fall).
        let mut back = None;
        for t in 4..20 {
            if let Some(tr) = round(&mut h, t, &ok).first() {
                back = Some((t, tr.to));
                break;
            }
            let v = &h.verdicts()[&e()];
            if t >= 5 {
                assert!(v.damped && v.reason.starts_with("damped"), "t={t}: {v:?}");
            }
        }
        assert_eq!(back, Some((14, Health::Up)));
    }

    #[test]
    fn a_flapping_edge_changes_verdict_at_most_once_per_damping_period() {
        let mut c = cfg();
        c.down_after = 1;
        c.up_after = 1;
        let mut h = HealthTracker::new(c);
        let mut changes = vec![];
        // Down/up every 2 s for 60 s.
        for t in 0..60 {
            let ok = (t / 2) % 2 == 0;
            for tr in round(&mut h, t, &[("p1", ok), ("p2", ok), ("p3", ok)]) {
                changes.push((t, tr.to));
            }
        }
        // Up at 0, down at 2, then held out while it flaps.
        assert_eq!(
            changes,
            vec![(0, Health::Up), (2, Health::Down)],
            "{changes:?}"
        );
        let v = &h.verdicts()[&e()];
        assert!(v.penalty > 2000.0, "{v:?}");
        // Once it is stable, it returns after the hold: from the cap
        // (4000) to 500 takes 3 half-lives.
        let mut back = None;
        for t in 60..120 {
            if let Some(tr) = round(&mut h, t, &[("p1", true), ("p2", true), ("p3", true)]).first()
            {
                back = Some(t);
                assert_eq!(tr.to, Health::Up);
                break;
            }
        }
        let back = back.expect("it never came back");
        assert!((80..=92).contains(&back), "back at {back}");
    }

    #[test]
    fn a_silent_agent_votes_down_and_stale_probes_do_not_vote() {
        let mut h = HealthTracker::new(cfg());
        h.observe(&e(), AGENT, true, 0, "");
        h.observe(&e(), "p1", true, 0, "");
        h.observe(&e(), AGENT, true, 1000, "");
        h.observe(&e(), "p1", true, 1000, "");
        assert_eq!(h.evaluate(1000)[0].to, Health::Up);
        // The agent stops reporting; p1 fails twice: two down votes.
        h.observe(&e(), "p1", false, 2000, "refused");
        h.observe(&e(), "p1", false, 3000, "refused");
        assert!(
            h.evaluate(3000).is_empty(),
            "agent not silent long enough yet"
        );
        h.observe(&e(), "p1", false, 4500, "refused");
        let t = h.evaluate(4500);
        assert_eq!(t.len(), 1);
        assert!(
            t[0].verdict.reason.contains("agent silent"),
            "{}",
            t[0].verdict.reason
        );
        // Everyone goes silent: the verdict holds, and says why.
        let later = 60_000;
        assert!(h.evaluate(later).is_empty());
        let v = &h.verdicts()[&e()];
        assert_eq!(v.health, Health::Down);
        assert!(v.reason.contains("p1 stale"), "{}", v.reason);
    }

    #[test]
    fn one_router_of_an_anycast_site_takes_it_down_by_itself() {
        // Three healthy probes (quorum 2), one BGP router (quorum: all).
        let mut h = HealthTracker::new(cfg());
        let probes = [("p1", true), ("p2", true), ("p3", true)];
        let at = |h: &mut HealthTracker, t: i64, bgp: bool| {
            let mut r = probes.to_vec();
            r.push(("bgp:r1", bgp));
            for (v, ok) in &r {
                let err = if *ok { "" } else { "withdrew 203.0.113.0/24" };
                h.observe(&e(), v, *ok, t * 1000, err);
            }
            h.evaluate(t * 1000)
        };
        at(&mut h, 0, true);
        assert_eq!(at(&mut h, 1, true)[0].to, Health::Up);
        assert!(at(&mut h, 2, false).is_empty(), "K = 2");
        let t = at(&mut h, 3, false);
        assert_eq!(t.len(), 1, "the probes say up, the router alone says down");
        assert_eq!(t[0].to, Health::Down);
        let r = &t[0].verdict.reason;
        assert!(
            r.contains(
                "anycast: 1 of 1 routers lost the route (quorum 1): not reachable by anycast"
            ),
            "{r}"
        );
        assert!(r.contains("bgp:r1 failing: withdrew 203.0.113.0/24"), "{r}");
        assert!(r.contains("p1 ok"), "{r}");
        // Announced again: back after M = 2 passes and the damping hold.
        let mut back = None;
        for t in 4..40 {
            if let Some(tr) = at(&mut h, t, true).first() {
                back = Some((t, tr.to));
                break;
            }
        }
        assert_eq!(
            back,
            Some((14, Health::Up)),
            "the damping hold after the fall at 3"
        );
    }

    #[test]
    fn the_bgp_quorum_counts_routers_apart_from_probes() {
        let mut h = HealthTracker::new(cfg());
        let routers = |a: bool, b: bool, c: bool| [("bgp:r1", a), ("bgp:r2", b), ("bgp:r3", c)];
        for t in 0..2 {
            round(&mut h, t, &routers(true, true, true));
            h.set_bgp_quorum(&e(), Some(2));
        }
        assert_eq!(
            h.verdicts()[&e()].health,
            Health::Up,
            "routers alone can bring it up"
        );
        // One router of three loses the route: nothing moves (quorum 2),
        // though the probe quorum (2) is not what counts here.
        for t in 2..6 {
            assert!(round(&mut h, t, &routers(false, true, true)).is_empty());
        }
        round(&mut h, 6, &routers(false, false, true));
        let t = round(&mut h, 7, &routers(false, false, true));
        assert_eq!(t[0].to, Health::Down);
        assert!(
            t[0].verdict
                .reason
                .contains("2 of 3 routers lost the route (quorum 2)"),
            "{}",
            t[0].verdict.reason
        );
        // Routers that go stale do not vote: with one fresh router the
        // quorum is capped at 1, and it is up again when it is.
        let mut back = None;
        for t in 8..40 {
            h.observe(&e(), "bgp:r3", true, t * 1000, "");
            if let Some(tr) = h.evaluate(t * 1000).first() {
                back = Some(tr.to);
                break;
            }
        }
        assert_eq!(back, Some(Health::Up));
    }

    #[test]
    fn failing_probes_still_count_when_the_routers_are_fine() {
        let mut h = HealthTracker::new(cfg());
        let r = |ok: bool| [("p1", ok), ("p2", ok), ("bgp:r1", true)];
        round(&mut h, 0, &r(true));
        round(&mut h, 1, &r(true));
        round(&mut h, 2, &r(false));
        let t = round(&mut h, 3, &r(false));
        assert_eq!(t[0].to, Health::Down);
        assert!(
            t[0].verdict
                .reason
                .starts_with("2 of 2 voters see it down (quorum 2); anycast: 0 of 1"),
            "{}",
            t[0].verdict.reason
        );
        // A router alone cannot outvote the probes' quorum down, nor count
        // in it: one failing probe and a failing router is not two probes.
        let mut h = HealthTracker::new(cfg());
        h.observe(&e(), "bgp:r1", true, 0, "");
        h.set_bgp_quorum(&e(), Some(1));
        let r = [("p1", false), ("p2", true), ("bgp:r1", true)];
        for t in 0..10 {
            assert!(round(&mut h, t, &r).iter().all(|x| x.to == Health::Up));
        }
    }

    #[test]
    fn out_of_order_results_are_ignored() {
        let mut h = HealthTracker::new(cfg());
        h.observe(&e(), "p1", true, 5000, "");
        h.observe(&e(), "p1", false, 4000, "late");
        h.evaluate(5000);
        let v = &h.verdicts()[&e()];
        assert!(v.failing.is_empty());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(cfg().check().is_ok());
        let mut c = cfg();
        c.quorum = 0;
        assert_eq!(c.check(), Err(HealthConfigError::Zero("quorum")));
        let mut c = cfg();
        c.damping.reuse = 2000.0;
        assert!(matches!(
            c.check(),
            Err(HealthConfigError::Thresholds { .. })
        ));
        let mut c = cfg();
        c.damping.half_life_ms = 0;
        let err = c.check().expect_err("zero half-life");
        assert!(err.to_string().contains("damping.half_life_ms"));
    }

    #[test]
    fn decay_halves_per_half_life() {
        let d = Damping::default();
        assert!((d.decay(1000.0, 10_000) - 500.0).abs() < 1e-9);
        assert!((d.decay(1000.0, 20_000) - 250.0).abs() < 1e-9);
        assert_eq!(d.hold_ms(400.0), 0);
        assert_eq!(d.hold_ms(1000.0), 10_001);
    }
}
