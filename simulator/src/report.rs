//! `report.html`: one self-contained page (inline SVG and CSS, no script,
//! no network): traffic by region with the events marked, a utilization
//! heatmap, SLO burn, latency, and the summary with the expectations.

use std::fmt::Write;

use crate::results::Results;

const W: f64 = 900.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;
const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// At most `n` points per series (max per bucket, to keep peaks).
fn thin(v: &[f64], n: usize) -> Vec<f64> {
    if v.len() <= n {
        return v.to_vec();
    }
    let per = v.len().div_ceil(n);
    v.chunks(per)
        .map(|c| c.iter().copied().fold(f64::MIN, f64::max))
        .collect()
}

/// A line chart; `marks` are (x share in [0, 1], label).
fn lines(
    id: &str,
    title: &str,
    unit: &str,
    series: &[(String, Vec<f64>)],
    marks: &[(f64, String)],
    hlines: &[(f64, &str)],
) -> String {
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(hlines.iter().map(|h| h.0))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {}\" role=\"img\"><title>{}</title>",
        esc(title),
        H + 30.0,
        esc(title)
    );
    let _ = write!(s, "<line x1=\"{PAD}\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#888\"/><line x1=\"{PAD}\" y1=\"0\" x2=\"{PAD}\" y2=\"{H}\" stroke=\"#888\"/>");
    let _ = write!(s, "<text x=\"2\" y=\"12\" font-size=\"10\">{:.0} {}</text><text x=\"2\" y=\"{H}\" font-size=\"10\">0</text>", ymax, esc(unit));
    for (y, label) in hlines {
        let py = H - y / ymax * H;
        let _ = write!(s, "<line x1=\"{PAD}\" y1=\"{py:.1}\" x2=\"{W}\" y2=\"{py:.1}\" stroke=\"#c00\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#c00\">{}</text>", W - 80.0, py - 2.0, esc(label));
    }
    for (i, (name, v)) in series.iter().enumerate() {
        let v = thin(v, 600);
        let n = v.len().max(2) - 1;
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(k, y)| {
                format!(
                    "{:.1},{:.1}",
                    PAD + (W - PAD) * k as f64 / n as f64,
                    H - y / ymax * H
                )
            })
            .collect();
        let c = COLORS[i % COLORS.len()];
        let _ = write!(s, "<polyline class=\"series\" data-name=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>", esc(name), pts.join(" "));
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"{c}\">{}</text>",
            PAD + 5.0 + 140.0 * (i % 6) as f64,
            H + 14.0 + 12.0 * (i / 6) as f64,
            esc(name)
        );
    }
    for (x, label) in marks {
        let px = PAD + (W - PAD) * x;
        let _ = write!(s, "<line class=\"event\" x1=\"{px:.1}\" y1=\"0\" x2=\"{px:.1}\" y2=\"{H}\" stroke=\"#000\" stroke-dasharray=\"2 2\"><title>{}</title></line><text x=\"{:.1}\" y=\"10\" font-size=\"9\">{}</text>", esc(label), px + 2.0, esc(label));
    }
    s.push_str("</svg></figure>\n");
    s
}

fn heat_color(u: f64) -> String {
    if u > 1.0 {
        return "#7f0000".into();
    }
    let t = u.clamp(0.0, 1.0);
    let r = (255.0 * t.min(1.0)) as u8;
    let g = (255.0 * (1.0 - (t - 0.5).max(0.0) * 2.0)) as u8;
    format!("#{r:02x}{g:02x}60")
}

fn heatmap(r: &Results) -> String {
    let h = &r.heatmap;
    let rows = h.domains.len().max(1);
    let cols = h.max_utilization.first().map_or(1, |x| x.len().max(1));
    let label_w = 260.0;
    let cw = (W - label_w) / cols as f64;
    let rh = 12.0;
    let mut s = format!(
        "<figure><figcaption>Utilization by {} (highest per {} s bucket; dark red: above capacity)</figcaption><svg id=\"chart-heatmap\" class=\"chart\" viewBox=\"0 0 {W} {}\"><title>utilization heatmap</title>",
        esc(&h.level),
        h.bucket_s,
        rows as f64 * rh + 4.0
    );
    for (i, (name, row)) in h.domains.iter().zip(&h.max_utilization).enumerate() {
        let y = i as f64 * rh;
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{:.1}\" font-size=\"9\">{}</text>",
            y + 9.0,
            esc(name)
        );
        for (j, u) in row.iter().enumerate() {
            let _ = write!(s, "<rect class=\"cell\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"{}\"><title>{} {:.2}</title></rect>", label_w + j as f64 * cw, cw + 0.2, rh - 1.0, heat_color(*u), esc(name), u);
        }
    }
    s.push_str("</svg></figure>\n");
    s
}

/// The page.
pub fn html(r: &Results) -> String {
    let sc = &r.scenario;
    let s = &r.summary;
    let dur = sc.duration_s.max(1.0);
    let marks: Vec<(f64, String)> = r
        .events
        .iter()
        .map(|e| ((e.at_s / dur).clamp(0.0, 1.0), e.label.clone()))
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>sextant-sim: {}</title><style>body{{font-family:sans-serif;max-width:960px;margin:1em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}}.pass{{color:#080;font-weight:bold}}.fail{{color:#c00;font-weight:bold}}figure{{margin:1em 0}}figcaption{{font-weight:bold}}svg.chart{{width:100%;height:auto}}</style></head><body>\n",
        esc(&sc.name)
    );
    let verdict = if r.passed {
        "<span class=\"pass\">PASS</span>"
    } else {
        "<span class=\"fail\">FAIL</span>"
    };
    let _ = writeln!(
        out,
        "<h1>{}</h1><p>{}</p><p>Fleet: {} ({} edges, {} groups, {} services). Start {}, {} s at {} s steps, seed {}. SLO {}. Overall: {verdict}</p>",
        esc(&sc.name), esc(&sc.description), esc(&sc.fleet), sc.edges, sc.groups, sc.services, esc(&sc.start), sc.duration_s, sc.step_s, sc.seed, sc.objective
    );
    // Summary.
    out.push_str("<h2>Summary</h2><table id=\"summary\"><tr><th>metric</th><th>value</th></tr>");
    let rows = [
        ("demand (mean rps)", format!("{:.1}", s.demand_avg_rps)),
        ("availability", format!("{:.6}", s.availability)),
        ("unserved share", format!("{:.6}", s.unserved_share)),
        (
            "peak utilization",
            format!(
                "{:.3} ({} at +{} s)",
                s.peak_utilization,
                esc(&s.peak_utilization_edge),
                s.peak_utilization_s
            ),
        ),
        ("overloaded edge-steps", s.overloaded_edge_steps.to_string()),
        (
            "worst p50 / p95 / p99 (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                s.worst_p50_ms, s.worst_p95_ms, s.worst_p99_ms
            ),
        ),
        (
            "cost rate: self-built / commit / overage / total",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2}",
                s.cost.self_built, s.cost.commit, s.cost.overage, s.cost.total
            ),
        ),
        (
            "error budget consumed (30 d)",
            format!("{:.4}", s.budget_consumed),
        ),
        ("burn-rate alerts fired", s.alerts_fired.to_string()),
        ("routing versions", s.routing_versions.to_string()),
        (
            "failovers / restores / held",
            format!("{} / {} / {}", s.failovers, s.restores, s.held),
        ),
        (
            "config changes while the control plane was down",
            s.config_changes_while_down.to_string(),
        ),
    ];
    for (k, v) in rows {
        let _ = write!(out, "<tr><td>{k}</td><td>{v}</td></tr>");
    }
    out.push_str("</table>\n<h2>Expectations</h2><table id=\"expectations\"><tr><th>check</th><th>expected</th><th>actual</th><th>result</th></tr>");
    for e in &r.expectations {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&e.check),
            esc(&e.expected),
            esc(&e.actual),
            if e.pass { "pass" } else { "fail" },
            if e.pass { "PASS" } else { "FAIL" }
        );
    }
    out.push_str("</table>\n<h2>Events</h2><table id=\"events\"><tr><th>at (s)</th><th>event</th><th>time to detect (s)</th><th>time to mitigate (s)</th><th>note</th></tr>");
    let opt = |x: Option<f64>, failure: bool| match (x, failure) {
        (Some(v), _) => format!("{v}"),
        (None, true) => "never".into(),
        (None, false) => "-".into(),
    };
    for e in &r.events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.at_s,
            esc(&e.label),
            opt(e.detected_after_s, e.failure),
            opt(e.mitigated_after_s, e.failure),
            esc(&e.note)
        );
    }
    out.push_str("</table>\n");
    if !r.drills.is_empty() {
        out.push_str("<h2>Drills</h2><table id=\"drills\"><tr><th>drill</th><th>domain</th><th>outcome</th><th>timeline</th></tr>");
        for d in &r.drills {
            let tl: Vec<String> = d
                .timeline
                .iter()
                .map(|(t, x)| format!("+{t} s {}", esc(x)))
                .collect();
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d.id),
                esc(&d.domain),
                esc(&d.outcome),
                tl.join("<br>")
            );
        }
        out.push_str("</table>\n");
    }
    // Charts.
    out.push_str("<h2>Traffic</h2>");
    let mut traffic: Vec<(String, Vec<f64>)> = r
        .regions
        .iter()
        .map(|x| (x.name.clone(), x.values.clone()))
        .collect();
    traffic.push(("unserved".into(), r.steps.unserved.clone()));
    out.push_str(&lines(
        "chart-traffic",
        "Traffic served by region, and unserved (rps)",
        "rps",
        &traffic,
        &marks,
        &[],
    ));
    out.push_str(&heatmap(r));
    out.push_str("<h2>SLO burn</h2>");
    out.push_str(&lines(
        "chart-burn",
        "Error-budget burn rate (5 min and 1 h windows)",
        "x",
        &[
            ("burn 5m".into(), r.steps.burn_5m.clone()),
            ("burn 1h".into(), r.steps.burn_1h.clone()),
        ],
        &marks,
        &[(14.4, "14.4x page"), (6.0, "6x page")],
    ));
    out.push_str("<table id=\"alerts\"><tr><th>alert</th><th>fired</th><th>first at (s)</th><th>steps firing</th></tr>");
    for a in &s.alerts {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.name),
            a.fired,
            a.first_s.map_or("-".into(), |x| x.to_string()),
            a.firing_steps
        );
    }
    out.push_str("</table>\n<h2>Latency</h2>");
    out.push_str(&lines(
        "chart-latency",
        "Latency of served requests, all groups (ms)",
        "ms",
        &[
            ("p50".into(), r.steps.p50_ms.clone()),
            ("p95".into(), r.steps.p95_ms.clone()),
            ("p99".into(), r.steps.p99_ms.clone()),
        ],
        &marks,
        &[],
    ));
    out.push_str("<h2>Control-plane actions</h2><table id=\"audit\"><tr><th>at (s)</th><th>action</th><th>target</th><th>version</th><th>reason</th></tr>");
    for a in r.audit.iter().take(300) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.t_s,
            esc(&a.action),
            esc(&a.target),
            a.version,
            esc(&a.reason)
        );
    }
    out.push_str("</table>\n<p>Generated by sextant-sim from results.json (format ");
    let _ = writeln!(out, "{}).</p></body></html>", r.format);
    out
}
