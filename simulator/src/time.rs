//! Durations and instants as scenario files write them, and RFC 3339 for
//! audit lines and reports.

/// Parses a duration: whole numbers with units, `ms`, `s`, `m`, `h` or
/// `d` (`500ms`, `10s`, `5m`, `2h`, `1d`, `1h30m`); a leading `+` is
/// allowed.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let mut rest = t.strip_prefix('+').unwrap_or(t);
    if rest.is_empty() {
        return Err(format!("{s:?}: empty duration (e.g. 30s)"));
    }
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("{s:?}: a duration needs a unit: ms, s, m, h or d (e.g. 30s)")
        })?;
        let (n, tail) = rest.split_at(split);
        let n: i64 = n
            .parse()
            .map_err(|_| format!("{s:?}: expected a whole number before each unit"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, after) = tail.split_at(unit_len);
        let mult = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h or d)")),
        };
        total = n
            .checked_mul(mult)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?}: too long"))?;
        rest = after;
    }
    Ok(total)
}

/// `2026-03-02T14:05:10Z` (shared with the control plane).
pub use sextant_core::timefmt::rfc3339;

/// `+1h05m10s` style offset from the start of a run.
pub fn offset(ms: i64) -> String {
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::from("+");
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 || h > 0 {
        out.push_str(&format!("{m:02}m"));
    }
    out.push_str(&format!("{sec:02}s"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_instants() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("+5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("10y").is_err());
        let t = sextant_core::drill::parse_instant_ms("2026-03-02T14:05Z").expect("instant");
        assert_eq!(rfc3339(t + 10_000), "2026-03-02T14:05:10Z");
        assert_eq!(offset(3_910_000), "+1h05m10s");
        assert_eq!(offset(70_000), "+01m10s");
    }
}
