//! Acceptance tests of the simulator: determinism, conservation, a
//! known-answer run, and bad scenario files.

use std::path::{Path, PathBuf};

use sextant_sim::scenario::Action;
use sextant_sim::{simulate, to_json, Scenario};

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn load(name: &str) -> Scenario {
    Scenario::load(&scenarios().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_shipped_scenario_loads() {
    for entry in std::fs::read_dir(scenarios()).expect("scenarios dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            if let Err(e) = Scenario::load(&path) {
                panic!("{}: {e}", path.display());
            }
        }
    }
}

#[test]
fn same_scenario_and_seed_give_byte_identical_results() {
    let mut sc = load("flapping-pop.toml");
    sc.duration_ms = 20 * 60_000;
    let a = to_json(&simulate(&sc, &mut |_, _| {})).expect("json");
    let b = to_json(&simulate(&sc, &mut |_, _| {})).expect("json");
    assert!(a == b, "two runs differ");
    sc.seed += 1;
    let c = to_json(&simulate(&sc, &mut |_, _| {})).expect("json");
    assert!(a != c, "the seed changes the noise");
}

#[test]
fn served_plus_unserved_is_demand_at_every_step() {
    // Diurnal noisy demand, stickiness, overstaying resolvers, an outage
    // that overloads, a drain: everything that moves traffic.
    let mut sc = load("region-loss-at-peak.toml");
    sc.start_ms += 90 * 60_000;
    sc.duration_ms = 50 * 60_000;
    for e in &mut sc.events {
        e.at_ms -= 90 * 60_000;
    }
    let r = simulate(&sc, &mut |_, _| {});
    assert!(
        r.summary.max_conservation_error < 1e-6,
        "{}",
        r.summary.max_conservation_error
    );
    assert!(
        r.steps.unserved.iter().any(|u| *u > 0.0),
        "the scenario must lose traffic"
    );
    let n = r.steps.t_s.len();
    for k in 0..n {
        let (d, s, u) = (r.steps.demand[k], r.steps.served[k], r.steps.unserved[k]);
        assert!((s + u - d).abs() < 0.01, "step {k}: {s} + {u} != {d}");
        let mut gd = 0.0;
        for g in &r.groups {
            let ser = g.series.as_ref().expect("series for a small fleet");
            let (d, s, u) = (ser.demand[k], ser.served[k], ser.unserved[k]);
            assert!(
                (s + u - d).abs() < 0.01,
                "group {} step {k}: {s} + {u} != {d}",
                g.id
            );
            gd += d;
        }
        assert!(
            (gd - r.steps.demand[k]).abs() < 0.05,
            "step {k}: groups sum {gd}"
        );
    }
}

#[test]
fn known_answer_one_region_lost() {
    let r = simulate(&load("known-answer.toml"), &mut |_, _| {});
    let st = &r.steps;
    assert_eq!(st.t_s.len(), 12);
    // Before the loss: all 800 rps on a (80%), 10 ms, cost 800 × 0.01 + b's
    // commit 100 × 0.05.
    for k in 0..6 {
        assert_eq!(
            (st.demand[k], st.served[k], st.unserved[k]),
            (800.0, 800.0, 0.0),
            "step {k}"
        );
        assert_eq!(st.max_utilization[k], 0.8);
        assert_eq!(st.p50_ms[k], 10.0);
        assert_eq!(st.cost[k], 13.0);
    }
    // +60 s: detected and re-routed at once, but clients still on a.
    assert_eq!((st.served[6], st.unserved[6]), (0.0, 800.0));
    assert_eq!(st.cost[6], 5.0);
    // From +70 s: b serves its 600; 200 unserved; 1116.667 ms; 5 + 500 × 0.1.
    for k in 7..12 {
        assert_eq!((st.served[k], st.unserved[k]), (600.0, 200.0), "step {k}");
        assert_eq!(st.max_utilization[k], 1.333);
        assert_eq!(st.p99_ms[k], 1116.667);
        assert_eq!(st.cost[k], 55.0);
    }
    assert_eq!(
        r.summary.unserved_share,
        (800.0 + 5.0 * 200.0) / (12.0 * 800.0)
    );
    assert_eq!(r.summary.failovers, 1);
    let ev = &r.events[0];
    assert_eq!(
        (ev.detected_after_s, ev.mitigated_after_s),
        (Some(0.0), Some(10.0))
    );
    assert!(r.passed, "{:?}", r.expectations);
}

#[test]
fn bad_scenarios_are_refused_with_every_problem_and_where() {
    let dir = scenarios();
    // A syntax error: line and column.
    let e = Scenario::from_toml("name = \"x\"\nduration = 10s\n", &dir).expect_err("syntax");
    assert!(e.problems[0].location.starts_with("line 2, column"), "{e}");
    // Unknown field.
    let e = Scenario::from_toml(
        "name = \"x\"\nduration = \"1h\"\nfleet = \"fleets/two-regions.toml\"\nspeed = 3\n",
        &dir,
    )
    .expect_err("unknown field");
    assert!(e.problems[0].location.starts_with("line 4"), "{e}");
    assert!(e.problems[0].message.contains("unknown field"), "{e}");
    // Several problems, each with its place.
    let text = r#"name = "bad"
duration = "1h"
step = "10s"
fleet = "fleets/two-regions.toml"

[demand]
trough = 1.5

[control_plane]
quorum = 5
vantages = ["v1"]

[[events]]
at = "10m"
kind = "region_loss"
target = "region/nowhere"

[[events]]
at = "2h"
kind = "edge_down"
target = "a"

[[events]]
at = "5m"
kind = "drill"
target = "region/r1"
duration = "10m"
abort_if = ["utilisation>0.9"]

[[events]]
at = "5m"
kind = "meteor"
"#;
    let e = Scenario::from_toml(text, &dir).expect_err("bad");
    let all = e.to_string();
    for (place, what) in [
        ("demand.trough", "must be in [0, 1]"),
        ("control_plane.quorum", "more than the 1 vantage"),
        (
            "line 13, column 1 (events[0]).target",
            "no edge of the fleet is in region/nowhere",
        ),
        ("line 18, column 1 (events[1])", "outside the run"),
        (
            "line 23, column 1 (events[2]).abort_if[0]",
            "unknown metric",
        ),
        (
            "line 30, column 1 (events[3]).kind",
            "unknown event kind \"meteor\"",
        ),
    ] {
        assert!(
            e.problems
                .iter()
                .any(|p| p.location == place && p.message.contains(what)),
            "missing {place}: {what} in\n{all}"
        );
    }
    // A bad fleet file is reported with the fleet's own locations.
    let e = Scenario::from_toml(
        "name = \"x\"\nduration = \"1h\"\nfleet = \"nope.toml\"\n",
        &dir,
    )
    .expect_err("no fleet");
    assert!(e.problems[0].location.starts_with("line 3, column"), "{e}");
}

#[test]
fn one_partitioned_vantage_point_moves_nothing_two_do() {
    // One of three vantage points sees every edge fail for 20 minutes: no
    // quorum, no failover, nothing unserved.
    let sc = load("vantage-partition.toml");
    let r = simulate(&sc, &mut |_, _| {});
    assert_eq!(r.summary.failovers, 0);
    assert!(
        r.expectations.iter().all(|e| e.pass),
        "{:?}",
        r.expectations
    );
    // The same with a second vantage point cut off: a quorum sees every
    // edge fail, and automation acts (within its bound).
    let mut two = sc.clone();
    let mut more = Vec::new();
    for e in &two.events {
        let mut e = e.clone();
        match &mut e.action {
            Action::Partition { vantage } | Action::Heal { vantage } => *vantage = "vp-us".into(),
            _ => continue,
        }
        more.push(e);
    }
    assert_eq!(more.len(), 2, "a partition and its heal");
    two.events.extend(more);
    two.events.sort_by_key(|e| e.at_ms);
    let r = simulate(&two, &mut |_, _| {});
    assert!(
        r.summary.failovers > 0,
        "two partitioned vantage points moved nothing"
    );
}
