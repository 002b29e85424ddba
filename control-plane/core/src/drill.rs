//! DR drills: abort conditions, blocking windows, and the drill's course,
//! as pure functions of (drill, observation, now).
//!
//! Condition grammar (checked when given):
//!
//! ```text
//! condition := metric op number [ "for" duration ]
//! metric    := utilization | error_rate | unserved
//! op        := ">" | ">=" | "<" | "<="
//! duration  := integer ("s" | "m" | "h")
//! ```
//!
//! `utilization>0.9` holds when any edge outside the drilled domain runs
//! above 90% of its capacity; `error_rate>0.01` when any edge reports more
//! than 1% errors; `unserved>0` when any demand is left unserved. With
//! `for 30s` the condition must hold that long without a break.
//!
//! Blocking windows say when no drill may start: weekly
//! (`mon-fri 08:00-18:00`, UTC) or absolute
//! (`2026-12-24T00:00Z/2026-12-27T00:00Z`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a condition looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Utilization,
    ErrorRate,
    Unserved,
}

impl Metric {
    const ALL: [(&'static str, Metric); 3] = [
        ("utilization", Metric::Utilization),
        ("error_rate", Metric::ErrorRate),
        ("unserved", Metric::Unserved),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Utilization => "utilization",
            Metric::ErrorRate => "error_rate",
            Metric::Unserved => "unserved",
        }
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
        }
    }
}

/// One abort condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub metric: Metric,
    pub op: Op,
    pub threshold: f64,
    /// How long it must hold without a break (0: at once).
    pub for_ms: i64,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.metric.as_str(),
            self.op.as_str(),
            self.threshold
        )?;
        if self.for_ms > 0 {
            write!(f, " for {}s", self.for_ms / 1000)?;
        }
        Ok(())
    }
}

/// Why a condition or window does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct ParseError {
    pub input: String,
    pub reason: String,
}

fn perr(input: &str, reason: impl Into<String>) -> ParseError {
    ParseError {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a duration such as `30s`, `5m`, `2h`.
pub fn parse_duration_ms(s: &str) -> Result<i64, ParseError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| perr(s, "a duration needs a unit: s, m or h (e.g. 30s)"))?;
    let (n, unit) = t.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| perr(s, "a duration starts with a whole number"))?;
    let mult = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(perr(s, format!("unknown unit {unit:?}; use s, m or h"))),
    };
    n.checked_mul(mult).ok_or_else(|| perr(s, "too long"))
}

impl Condition {
    /// Parses `metric op number [for duration]`.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let s = input.trim();
        let (expr, for_ms) = match s.split_once(" for ") {
            Some((e, d)) => (
                e.trim(),
                parse_duration_ms(d).map_err(|e| perr(input, e.reason))?,
            ),
            None => (s, 0),
        };
        let op_at = expr
            .find(['>', '<'])
            .ok_or_else(|| perr(input, "expected METRIC OP NUMBER, e.g. utilization>0.9"))?;
        let (metric, rest) = expr.split_at(op_at);
        let (op, number) = if let Some(n) = rest.strip_prefix(">=") {
            (Op::Ge, n)
        } else if let Some(n) = rest.strip_prefix("<=") {
            (Op::Le, n)
        } else if let Some(n) = rest.strip_prefix('>') {
            (Op::Gt, n)
        } else if let Some(n) = rest.strip_prefix('<') {
            (Op::Lt, n)
        } else {
            return Err(perr(input, "expected an operator: >, >=, < or <="));
        };
        let metric = metric.trim();
        let metric = Metric::ALL
            .iter()
            .find(|(name, _)| *name == metric)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                perr(
                    input,
                    format!("unknown metric {metric:?}; known: utilization, error_rate, unserved"),
                )
            })?;
        let threshold: f64 = number
            .trim()
            .parse()
            .map_err(|_| perr(input, format!("{:?} is not a number", number.trim())))?;
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(perr(input, "the threshold must be a finite number >= 0"));
        }
        if matches!(metric, Metric::ErrorRate | Metric::Unserved) && threshold > 1.0 {
            return Err(perr(
                input,
                format!("{} is a share in [0, 1]", metric.as_str()),
            ));
        }
        if for_ms < 0 {
            return Err(perr(input, "the duration must not be negative"));
        }
        Ok(Self {
            metric,
            op,
            threshold,
            for_ms,
        })
    }
}

/// What the drill sees at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Highest utilization among edges outside the drilled domain, and where.
    pub utilization: f64,
    pub utilization_at: String,
    /// Highest error rate an edge reports, and where.
    pub error_rate: f64,
    pub error_rate_at: String,
    /// Share of demand unserved.
    pub unserved: f64,
}

impl Observation {
    fn value(&self, m: Metric) -> (f64, &str) {
        match m {
            Metric::Utilization => (self.utilization, &self.utilization_at),
            Metric::ErrorRate => (self.error_rate, &self.error_rate_at),
            Metric::Unserved => (self.unserved, ""),
        }
    }
}

/// Blocking windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Window {
    /// Every week on `days` (0 = Monday … 6 = Sunday) between two times of
    /// day, minutes since midnight UTC (`end` may be 1440).
    Weekly {
        days: Vec<u8>,
        start_min: u32,
        end_min: u32,
        text: String,
    },
    /// From one instant to another, ms since the epoch.
    Between {
        from_ms: i64,
        to_ms: i64,
        text: String,
    },
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_hhmm(input: &str, s: &str) -> Result<u32, ParseError> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| perr(input, format!("{s:?} is not HH:MM")))?;
    let h: u32 = h
        .parse()
        .map_err(|_| perr(input, format!("{s:?} is not HH:MM")))?;
    let m: u32 = m
        .parse()
        .map_err(|_| perr(input, format!("{s:?} is not HH:MM")))?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(perr(input, format!("{s:?} is not a time of day")));
    }
    Ok(h * 60 + m)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM[:SS]Z` into ms since the epoch.
pub fn parse_instant_ms(s: &str) -> Result<i64, ParseError> {
    let t = s.trim();
    let body = t
        .strip_suffix('Z')
        .ok_or_else(|| perr(s, "times are UTC and end in Z, e.g. 2026-12-24T00:00Z"))?;
    let (date, time) = body
        .split_once('T')
        .ok_or_else(|| perr(s, "expected YYYY-MM-DDTHH:MMZ"))?;
    let parts: Vec<&str> = date.split('-').collect();
    let [y, mo, d] = parts.as_slice() else {
        return Err(perr(s, "expected a date YYYY-MM-DD"));
    };
    let num = |x: &str| {
        x.parse::<i64>()
            .map_err(|_| perr(s, format!("{x:?} is not a number")))
    };
    let (y, mo, d) = (num(y)?, num(mo)?, num(d)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(perr(s, "no such date"));
    }
    let mut tparts = time.split(':');
    let hh = num(tparts.next().unwrap_or_default())?;
    let mm = num(tparts.next().unwrap_or("0"))?;
    let ss = num(tparts.next().unwrap_or("0"))?;
    if !(0..24).contains(&hh) || !(0..60).contains(&mm) || !(0..60).contains(&ss) {
        return Err(perr(s, "no such time of day"));
    }
    Ok(((days_from_civil(y, mo, d) * 24 + hh) * 60 + mm) * 60_000 + ss * 1000)
}

impl Window {
    /// Parses a weekly window (`mon-fri 08:00-18:00`, `sat 00:00-24:00`) or
    /// an absolute one (`2026-12-24T00:00Z/2026-12-27T00:00Z`).
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let s = input.trim();
        if let Some((a, b)) = s.split_once('/') {
            let from_ms = parse_instant_ms(a)?;
            let to_ms = parse_instant_ms(b)?;
            if to_ms <= from_ms {
                return Err(perr(input, "the window ends before it starts"));
            }
            return Ok(Window::Between {
                from_ms,
                to_ms,
                text: s.to_owned(),
            });
        }
        let (days, times) = s.split_once(' ').ok_or_else(|| {
            perr(
                input,
                "expected DAYS HH:MM-HH:MM (e.g. mon-fri 08:00-18:00) or FROM/TO",
            )
        })?;
        let day = |d: &str| {
            DAYS.iter()
                .position(|x| *x == d.trim().to_ascii_lowercase())
                .map(|i| i as u8)
                .ok_or_else(|| perr(input, format!("unknown day {d:?}; use mon … sun")))
        };
        let days: Vec<u8> = match days.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a <= b {
                    (a..=b).collect()
                } else {
                    (a..7).chain(0..=b).collect()
                }
            }
            None => days.split(',').map(day).collect::<Result<_, _>>()?,
        };
        let (a, b) = times
            .trim()
            .split_once('-')
            .ok_or_else(|| perr(input, "expected HH:MM-HH:MM"))?;
        let (start_min, end_min) = (parse_hhmm(input, a)?, parse_hhmm(input, b)?);
        if end_min <= start_min {
            return Err(perr(
                input,
                "the window ends before it starts (use two windows to cross midnight)",
            ));
        }
        Ok(Window::Weekly {
            days,
            start_min,
            end_min,
            text: s.to_owned(),
        })
    }

    pub fn contains(&self, now_ms: i64) -> bool {
        match self {
            Window::Between { from_ms, to_ms, .. } => (*from_ms..*to_ms).contains(&now_ms),
            Window::Weekly {
                days,
                start_min,
                end_min,
                ..
            } => {
                let minutes = now_ms.div_euclid(60_000);
                let day_index = minutes.div_euclid(1440);
                // 1970-01-01 was a Thursday (index 3 with Monday = 0).
                let weekday = (day_index + 3).rem_euclid(7) as u8;
                let minute = minutes.rem_euclid(1440) as u32;
                days.contains(&weekday) && (*start_min..*end_min).contains(&minute)
            }
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Window::Weekly { text, .. } | Window::Between { text, .. } => text,
        }
    }
}

/// The first window that contains `now_ms`, if any.
pub fn blocked(windows: &[Window], now_ms: i64) -> Option<&Window> {
    windows.iter().find(|w| w.contains(now_ms))
}

/// Tracks conditions over time (for the `for` clause) and says when one
/// has held long enough.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watcher {
    /// Per condition, since when it has held without a break.
    pub since_ms: Vec<Option<i64>>,
}

impl Watcher {
    /// Feeds one observation; returns the reason to abort, if any.
    pub fn observe(
        &mut self,
        conditions: &[Condition],
        obs: &Observation,
        now_ms: i64,
    ) -> Option<String> {
        self.since_ms.resize(conditions.len(), None);
        let mut reason = None;
        for (c, since) in conditions.iter().zip(self.since_ms.iter_mut()) {
            let (value, at) = obs.value(c.metric);
            if c.op.holds(value, c.threshold) {
                let start = *since.get_or_insert(now_ms);
                if reason.is_none() && now_ms - start >= c.for_ms {
                    let place = if at.is_empty() {
                        String::new()
                    } else {
                        format!(" at {at}")
                    };
                    reason = Some(format!(
                        "abort condition {c} held: {}={value:.4}{place}",
                        c.metric.as_str()
                    ));
                }
            } else {
                *since = None;
            }
        }
        reason
    }
}

/// Where a drill is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DrillState {
    /// Draining (in steps) or holding the domain drained.
    Running,
    /// The duration is over: undraining.
    Restoring,
    /// Ran its course and restored.
    Succeeded,
    /// An abort condition held (or an operator aborted): restored at once.
    Aborted { reason: String },
    /// Refused before it started (a guardrail or a blocking window).
    Refused { reason: String },
}

impl DrillState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DrillState::Running => "running",
            DrillState::Restoring => "restoring",
            DrillState::Succeeded => "succeeded",
            DrillState::Aborted { .. } => "aborted",
            DrillState::Refused { .. } => "refused",
        }
    }

    /// Whether it still holds (or is releasing) a drain.
    pub fn active(&self) -> bool {
        matches!(self, DrillState::Running | DrillState::Restoring)
    }
}

/// One line of a drill's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: i64,
    pub text: String,
}

/// Timeline entries kept per drill.
pub const MAX_TIMELINE: usize = 200;

/// A drill, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drill {
    pub id: String,
    pub domain: crate::DomainPath,
    pub reason: String,
    pub created_by: String,
    pub started_at_ms: i64,
    pub duration_ms: i64,
    pub conditions: Vec<Condition>,
    pub schedule: crate::schedule::Schedule,
    pub state: DrillState,
    #[serde(default)]
    pub watcher: Watcher,
    #[serde(default)]
    pub peak_utilization: f64,
    #[serde(default)]
    pub peak_error_rate: f64,
    /// When the drain first reached its target.
    #[serde(default)]
    pub drained_at_ms: Option<i64>,
    /// When the restore began (the end of the duration, or the abort).
    #[serde(default)]
    pub restore_started_ms: Option<i64>,
    /// When the drain was gone again.
    #[serde(default)]
    pub ended_at_ms: Option<i64>,
    #[serde(default)]
    pub timeline: Vec<Event>,
}

/// What the control loop must do for a drill.
#[derive(Debug, Clone, PartialEq)]
pub enum DrillAction {
    Nothing,
    /// Remove the drain at once.
    Abort(String),
    /// Undrain (in the schedule's steps).
    Restore,
    /// The drill is over (nothing left to do).
    Finished,
}

impl Drill {
    pub fn log(&mut self, at_ms: i64, text: impl Into<String>) {
        if self.timeline.len() < MAX_TIMELINE {
            self.timeline.push(Event {
                at_ms,
                text: text.into(),
            });
        }
    }

    /// The outcome in words.
    pub fn outcome(&self) -> String {
        match &self.state {
            DrillState::Running => "running".into(),
            DrillState::Restoring => "restoring".into(),
            DrillState::Succeeded => "succeeded".into(),
            DrillState::Aborted { reason } => format!("aborted: {reason}"),
            DrillState::Refused { reason } => format!("refused: {reason}"),
        }
    }

    /// Time from the start until the drain reached its target.
    pub fn time_to_drain_ms(&self) -> Option<i64> {
        self.drained_at_ms.map(|t| t - self.started_at_ms)
    }

    /// Time from the start of the restore until the drain was gone.
    pub fn time_to_restore_ms(&self) -> Option<i64> {
        Some(self.ended_at_ms? - self.restore_started_ms?)
    }

    /// Aborts on an operator's request.
    pub fn abort(&mut self, reason: String, now_ms: i64) -> DrillAction {
        if !self.state.active() {
            return DrillAction::Nothing;
        }
        self.log(now_ms, format!("aborted: {reason}"));
        self.state = DrillState::Aborted {
            reason: reason.clone(),
        };
        self.restore_started_ms.get_or_insert(now_ms);
        DrillAction::Abort(reason)
    }

    /// One look at the world: `drain_at_target` says the drill's drain has
    /// reached its last step, `drain_present` that it still exists.
    pub fn tick(
        &mut self,
        obs: &Observation,
        drain_at_target: bool,
        drain_present: bool,
        now_ms: i64,
    ) -> DrillAction {
        if !self.state.active() {
            if drain_present || self.ended_at_ms.is_some() {
                return DrillAction::Nothing;
            }
            self.ended_at_ms = Some(now_ms);
            self.log(now_ms, "restored");
            return DrillAction::Finished;
        }
        self.peak_utilization = self.peak_utilization.max(obs.utilization);
        self.peak_error_rate = self.peak_error_rate.max(obs.error_rate);
        let conditions = self.conditions.clone();
        if let Some(reason) = self.watcher.observe(&conditions, obs, now_ms) {
            return self.abort(reason, now_ms);
        }
        match self.state {
            DrillState::Running => {
                if drain_at_target && self.drained_at_ms.is_none() {
                    self.drained_at_ms = Some(now_ms);
                    self.log(now_ms, "drained to the target");
                }
                if now_ms >= self.started_at_ms + self.duration_ms {
                    self.state = DrillState::Restoring;
                    self.restore_started_ms = Some(now_ms);
                    self.log(now_ms, "duration over: restoring");
                    return DrillAction::Restore;
                }
                DrillAction::Nothing
            }
            DrillState::Restoring if !drain_present => {
                self.state = DrillState::Succeeded;
                self.ended_at_ms = Some(now_ms);
                self.log(now_ms, "restored");
                DrillAction::Finished
            }
            _ => DrillAction::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_errors_say_why() {
        let c = Condition::parse("utilization>0.9").expect("parse");
        assert_eq!(
            (c.metric, c.op, c.threshold, c.for_ms),
            (Metric::Utilization, Op::Gt, 0.9, 0)
        );
        let c = Condition::parse(" error_rate >= 0.01 for 30s ").expect("parse");
        assert_eq!(
            (c.metric, c.op, c.for_ms),
            (Metric::ErrorRate, Op::Ge, 30_000)
        );
        assert_eq!(c.to_string(), "error_rate>=0.01 for 30s");
        for (bad, why) in [
            ("utilisation>0.9", "unknown metric"),
            ("utilization 0.9", "expected METRIC OP NUMBER"),
            ("utilization>high", "not a number"),
            ("error_rate>2", "share in [0, 1]"),
            ("utilization>0.9 for 5", "unit"),
            ("utilization=>0.9", "unknown metric"),
        ] {
            let e = Condition::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_for_clause_needs_an_unbroken_run() {
        let conds = [Condition::parse("error_rate>0.01 for 2s").expect("parse")];
        let mut w = Watcher::default();
        let high = Observation {
            error_rate: 0.05,
            error_rate_at: "ams1".into(),
            ..Observation::default()
        };
        assert_eq!(w.observe(&conds, &high, 0), None);
        assert_eq!(w.observe(&conds, &Observation::default(), 1000), None);
        assert_eq!(w.observe(&conds, &high, 1500), None);
        assert_eq!(w.observe(&conds, &high, 3000), None);
        let r = w.observe(&conds, &high, 3500).expect("abort");
        assert!(
            r.contains("error_rate>0.01 for 2s") && r.contains("at ams1"),
            "{r}"
        );
        let now = [Condition::parse("unserved>0").expect("parse")];
        let obs = Observation {
            unserved: 0.1,
            ..Observation::default()
        };
        assert!(Watcher::default().observe(&now, &obs, 0).is_some());
    }

    fn drill(conditions: &[&str]) -> Drill {
        Drill {
            id: "d1".into(),
            domain: crate::DomainPath::parse("region/eu").expect("path"),
            reason: "q4".into(),
            created_by: "t".into(),
            started_at_ms: 0,
            duration_ms: 10_000,
            conditions: conditions
                .iter()
                .map(|c| Condition::parse(c).expect("cond"))
                .collect(),
            schedule: crate::schedule::Schedule::immediate(1.0),
            state: DrillState::Running,
            watcher: Watcher::default(),
            peak_utilization: 0.0,
            peak_error_rate: 0.0,
            drained_at_ms: None,
            restore_started_ms: None,
            ended_at_ms: None,
            timeline: vec![],
        }
    }

    #[test]
    fn a_drill_runs_its_course_and_restores() {
        let mut d = drill(&["utilization>0.9"]);
        let calm = Observation {
            utilization: 0.5,
            ..Observation::default()
        };
        assert_eq!(d.tick(&calm, true, true, 1000), DrillAction::Nothing);
        assert_eq!(d.time_to_drain_ms(), Some(1000));
        assert_eq!(d.tick(&calm, true, true, 10_000), DrillAction::Restore);
        assert_eq!(d.state, DrillState::Restoring);
        assert_eq!(d.tick(&calm, false, true, 11_000), DrillAction::Nothing);
        assert_eq!(d.tick(&calm, false, false, 12_000), DrillAction::Finished);
        assert_eq!(d.state, DrillState::Succeeded);
        assert_eq!(d.time_to_restore_ms(), Some(2000));
        assert_eq!(d.peak_utilization, 0.5);
        assert_eq!(d.outcome(), "succeeded");
    }

    #[test]
    fn a_drill_aborts_when_a_condition_holds() {
        let mut d = drill(&["error_rate>0.01"]);
        let bad = Observation {
            error_rate: 0.2,
            error_rate_at: "ams1".into(),
            ..Observation::default()
        };
        match d.tick(&bad, true, true, 3000) {
            DrillAction::Abort(r) => assert!(r.contains("error_rate>0.01"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert!(d
            .outcome()
            .starts_with("aborted: abort condition error_rate>0.01"));
        assert_eq!(d.tick(&bad, false, false, 4000), DrillAction::Finished);
        assert_eq!(d.time_to_restore_ms(), Some(1000));
        assert_eq!(d.peak_error_rate, 0.2);
        assert_eq!(d.tick(&bad, false, false, 5000), DrillAction::Nothing);
    }

    #[test]
    fn windows_parse_and_contain() {
        // 2026-11-28 is a Saturday.
        let sat_noon = parse_instant_ms("2026-11-28T12:00Z").expect("instant");
        assert_eq!(sat_noon, 1_795_867_200_000);
        let weekend = Window::parse("sat-sun 00:00-24:00").expect("parse");
        assert!(weekend.contains(sat_noon));
        let office = Window::parse("mon-fri 08:00-18:00").expect("parse");
        assert!(!office.contains(sat_noon));
        assert!(office.contains(sat_noon + 2 * 86_400_000 - 2 * 3_600_000)); // Mon 10:00
        let wrap = Window::parse("fri-mon 22:00-23:00").expect("parse");
        assert!(matches!(&wrap, Window::Weekly { days, .. } if days == &vec![4, 5, 6, 0]));
        let xmas = Window::parse("2026-12-24T00:00Z/2026-12-27T00:00Z").expect("parse");
        assert!(!xmas.contains(sat_noon));
        assert!(xmas.contains(parse_instant_ms("2026-12-25T09:30Z").expect("instant")));
        assert_eq!(
            blocked(&[office, weekend], sat_noon).map(Window::text),
            Some("sat-sun 00:00-24:00")
        );
        for bad in [
            "someday 08:00-18:00",
            "mon 18:00-08:00",
            "mon 25:00-26:00",
            "2026-12-27T00:00Z/2026-12-24T00:00Z",
            "2026-13-01T00:00Z/2026-12-01T00:00Z",
            "mon",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }
}
