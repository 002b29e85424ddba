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

/// Days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2026-03-02T14:05:10Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

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
