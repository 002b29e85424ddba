//! Drain step schedules and expiry, as pure functions of (drain, now).
//!
//! A drain moves towards its target fraction in steps (`0.25, 0.5, 1.0`
//! every 5 minutes); it may expire, and then undrains in the same steps
//! backwards (`0.5, 0.25, 0`), saying so; an operator's undrain steps down
//! the same way. The control loop asks [`due`] what a drain should do now
//! and when to ask again ([`next_wakeup`]); nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// Largest number of steps in a schedule.
pub const MAX_STEPS: usize = 20;

/// Why a step schedule is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("step {index} ({value}) must be in (0, 1]")]
    OutOfRange { index: usize, value: f64 },
    #[error(
        "steps must increase: step {index} ({value}) is not above the one before ({previous})"
    )]
    NotIncreasing {
        index: usize,
        value: f64,
        previous: f64,
    },
    #[error("the last step ({last}) must equal the target fraction ({target})")]
    LastIsNotTarget { last: f64, target: f64 },
    #[error("a schedule of {0} steps is too long (at most {MAX_STEPS})")]
    TooLong(usize),
    #[error("steps need an interval greater than 0 between them")]
    NoInterval,
    #[error("expiry {requested_ms} ms is longer than the maximum {max_ms} ms")]
    ExpiryTooLong { requested_ms: i64, max_ms: i64 },
    #[error("expiry must be positive, got {0} ms")]
    ExpiryNotPositive(i64),
}

/// A drain's progression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Fractions to reach, in order; the last is the target.
    pub steps: Vec<f64>,
    /// Time between steps.
    pub interval_ms: i64,
}

impl Schedule {
    /// One step straight to `target`.
    pub fn immediate(target: f64) -> Self {
        Self {
            steps: vec![target],
            interval_ms: 0,
        }
    }

    /// Checks a requested schedule: steps in (0, 1], strictly increasing,
    /// ending at `target`; an interval when there is more than one step. An
    /// empty list means one step to `target`.
    pub fn new(steps: &[f64], interval_ms: i64, target: f64) -> Result<Self, ScheduleError> {
        if steps.is_empty() {
            return Ok(Self::immediate(target));
        }
        if steps.len() > MAX_STEPS {
            return Err(ScheduleError::TooLong(steps.len()));
        }
        for (index, value) in steps.iter().copied().enumerate() {
            if !(value > 0.0 && value <= 1.0) {
                return Err(ScheduleError::OutOfRange { index, value });
            }
            if index > 0 && value <= steps[index - 1] {
                return Err(ScheduleError::NotIncreasing {
                    index,
                    value,
                    previous: steps[index - 1],
                });
            }
        }
        let last = steps[steps.len() - 1];
        if (last - target).abs() > 1e-12 {
            return Err(ScheduleError::LastIsNotTarget { last, target });
        }
        if steps.len() > 1 && interval_ms <= 0 {
            return Err(ScheduleError::NoInterval);
        }
        Ok(Self {
            steps: steps.to_vec(),
            interval_ms,
        })
    }

    pub fn target(&self) -> f64 {
        self.steps.last().copied().unwrap_or(0.0)
    }

    /// The fractions an undrain from `current` walks through: the steps
    /// below it, downwards, then 0.
    pub fn way_down(&self, current: f64) -> Vec<f64> {
        let mut down: Vec<f64> = self
            .steps
            .iter()
            .rev()
            .copied()
            .filter(|s| *s < current - 1e-12)
            .collect();
        down.push(0.0);
        down
    }
}

/// Checks an expiry request against the maximum; `None` asks for the
/// default.
pub fn expiry(
    requested_ms: Option<i64>,
    default_ms: i64,
    max_ms: i64,
) -> Result<i64, ScheduleError> {
    match requested_ms {
        None => Ok(default_ms.min(max_ms)),
        Some(ms) if ms <= 0 => Err(ScheduleError::ExpiryNotPositive(ms)),
        Some(ms) if ms > max_ms => Err(ScheduleError::ExpiryTooLong {
            requested_ms: ms,
            max_ms,
        }),
        Some(ms) => Ok(ms),
    }
}

/// Where a drain is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Moving up through its steps (or holding at the target).
    #[default]
    Draining,
    /// Moving down to 0 through `path`, then gone; `expired` when it
    /// undrains because it expired rather than because someone asked.
    Undraining { path: Vec<f64>, expired: bool },
}

/// The progress of one drain (kept with it in the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub schedule: Schedule,
    pub phase: Phase,
    /// Index of the step in effect (in `schedule.steps` while draining, in
    /// the undrain path while undraining).
    pub step: usize,
    /// When the step in effect started.
    pub step_started_ms: i64,
    /// When the drain expires and undrains itself (never when `None`).
    pub expires_at_ms: Option<i64>,
}

/// What a drain should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Move to the next step at this fraction.
    Step { fraction: f64, step: usize },
    /// It expired: start undraining; first step at this fraction (0: gone).
    Expire { fraction: f64 },
    /// The undrain reached 0: remove the drain.
    Remove,
}

impl Progress {
    pub fn new(schedule: Schedule, now_ms: i64, expires_at_ms: Option<i64>) -> Self {
        Self {
            schedule,
            phase: Phase::Draining,
            step: 0,
            step_started_ms: now_ms,
            expires_at_ms,
        }
    }

    /// The fraction in effect.
    pub fn fraction(&self) -> f64 {
        match &self.phase {
            Phase::Draining => self.schedule.steps.get(self.step).copied().unwrap_or(0.0),
            Phase::Undraining { path, .. } => path.get(self.step).copied().unwrap_or(0.0),
        }
    }

    /// Starts undraining from where the drain is (an operator's undrain,
    /// or the expiry): the first step down takes effect at once.
    pub fn undrain(&mut self, now_ms: i64, expired: bool) {
        let path = self.schedule.way_down(self.fraction());
        self.phase = Phase::Undraining { path, expired };
        self.step = 0;
        self.step_started_ms = now_ms;
        self.expires_at_ms = None;
    }

    /// When something is next due (a step or the expiry), if ever.
    pub fn next_due_ms(&self) -> Option<i64> {
        let step_due = match &self.phase {
            Phase::Draining if self.step + 1 < self.schedule.steps.len() => {
                Some(self.step_started_ms + self.schedule.interval_ms)
            }
            Phase::Draining => None,
            Phase::Undraining { .. } => {
                Some(self.step_started_ms + self.schedule.interval_ms.max(0))
            }
        };
        match (step_due, self.expires_at_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now_ms`, if anything. Expiry wins over a step.
    pub fn due(&self, now_ms: i64) -> Option<Transition> {
        if let (Phase::Draining, Some(exp)) = (&self.phase, self.expires_at_ms) {
            if now_ms >= exp {
                let mut p = self.clone();
                p.undrain(now_ms, true);
                return Some(Transition::Expire {
                    fraction: p.fraction(),
                });
            }
        }
        let due_at = self.step_started_ms + self.schedule.interval_ms.max(0);
        match &self.phase {
            Phase::Draining if self.step + 1 < self.schedule.steps.len() && now_ms >= due_at => {
                Some(Transition::Step {
                    fraction: self.schedule.steps[self.step + 1],
                    step: self.step + 1,
                })
            }
            Phase::Undraining { path, .. } => {
                if path.get(self.step).copied().unwrap_or(0.0) <= 0.0 {
                    Some(Transition::Remove)
                } else if now_ms >= due_at {
                    match path.get(self.step + 1) {
                        Some(f) if *f > 0.0 => Some(Transition::Step {
                            fraction: *f,
                            step: self.step + 1,
                        }),
                        _ => Some(Transition::Remove),
                    }
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Applies a transition that [`Progress::due`] returned.
    pub fn apply(&mut self, t: &Transition, now_ms: i64) {
        match t {
            Transition::Step { step, .. } => {
                self.step = *step;
                self.step_started_ms = now_ms;
            }
            Transition::Expire { .. } => self.undrain(now_ms, true),
            Transition::Remove => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn schedules_are_checked() {
        assert!(Schedule::new(&[0.25, 0.5, 1.0], 5 * MIN, 1.0).is_ok());
        assert_eq!(Schedule::new(&[], 0, 0.5).map(|s| s.steps), Ok(vec![0.5]));
        assert!(matches!(
            Schedule::new(&[0.5, 0.25, 1.0], MIN, 1.0),
            Err(ScheduleError::NotIncreasing { index: 1, .. })
        ));
        assert!(matches!(
            Schedule::new(&[0.0, 1.0], MIN, 1.0),
            Err(ScheduleError::OutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            Schedule::new(&[0.5, 0.75], MIN, 1.0),
            Err(ScheduleError::LastIsNotTarget { .. })
        ));
        assert_eq!(
            Schedule::new(&[0.5, 1.0], 0, 1.0),
            Err(ScheduleError::NoInterval)
        );
        assert!(matches!(
            Schedule::new(&[0.01; 30], MIN, 0.01),
            Err(ScheduleError::TooLong(30))
        ));
    }

    #[test]
    fn expiry_has_a_default_and_a_maximum() {
        assert_eq!(expiry(None, 10, 100), Ok(10));
        assert_eq!(expiry(Some(50), 10, 100), Ok(50));
        assert!(matches!(
            expiry(Some(500), 10, 100),
            Err(ScheduleError::ExpiryTooLong { .. })
        ));
        assert!(matches!(
            expiry(Some(0), 10, 100),
            Err(ScheduleError::ExpiryNotPositive(0))
        ));
    }

    #[test]
    fn a_drain_steps_up_then_holds() {
        let s = Schedule::new(&[0.25, 0.5, 1.0], 5 * MIN, 1.0).expect("schedule");
        let mut p = Progress::new(s, 0, None);
        assert_eq!(p.fraction(), 0.25);
        assert_eq!(p.due(5 * MIN - 1), None);
        assert_eq!(p.next_due_ms(), Some(5 * MIN));
        let t = p.due(5 * MIN).expect("due");
        assert_eq!(
            t,
            Transition::Step {
                fraction: 0.5,
                step: 1
            }
        );
        p.apply(&t, 5 * MIN);
        let t = p.due(10 * MIN).expect("due");
        p.apply(&t, 10 * MIN);
        assert_eq!(p.fraction(), 1.0);
        assert_eq!(p.due(1000 * MIN), None);
        assert_eq!(p.next_due_ms(), None);
    }

    #[test]
    fn an_expired_drain_undrains_in_steps_and_says_so() {
        let s = Schedule::new(&[0.25, 0.5, 1.0], MIN, 1.0).expect("schedule");
        let mut p = Progress::new(s, 0, Some(10 * MIN));
        for t in [MIN, 2 * MIN] {
            let tr = p.due(t).expect("step");
            p.apply(&tr, t);
        }
        assert_eq!(p.fraction(), 1.0);
        assert_eq!(p.next_due_ms(), Some(10 * MIN));
        let t = p.due(10 * MIN).expect("expiry");
        assert_eq!(t, Transition::Expire { fraction: 0.5 });
        p.apply(&t, 10 * MIN);
        assert!(matches!(p.phase, Phase::Undraining { expired: true, .. }));
        assert_eq!(p.fraction(), 0.5);
        let mut fractions = vec![p.fraction()];
        let mut now = 10 * MIN;
        loop {
            now += MIN;
            match p.due(now) {
                Some(Transition::Remove) => break,
                Some(t) => {
                    p.apply(&t, now);
                    fractions.push(p.fraction());
                }
                None => panic!("stuck at {now}"),
            }
        }
        assert_eq!(fractions, [0.5, 0.25]);
    }

    #[test]
    fn an_undrain_mid_way_walks_back_from_where_it_is() {
        let s = Schedule::new(&[0.25, 0.5, 0.75, 1.0], MIN, 1.0).expect("schedule");
        let mut p = Progress::new(s, 0, None);
        let t = p.due(MIN).expect("step");
        p.apply(&t, MIN);
        assert_eq!(p.fraction(), 0.5);
        p.undrain(90_000, false);
        assert_eq!(p.fraction(), 0.25);
        assert_eq!(p.due(90_000 + MIN), Some(Transition::Remove));
        // A one-step drain undrains at once.
        let mut one = Progress::new(Schedule::immediate(1.0), 0, None);
        one.undrain(5, false);
        assert_eq!(one.due(5), Some(Transition::Remove));
    }
}
