//! RFC 3339 times for humans and logs, without a date library.

/// Formats ms since the Unix epoch as RFC 3339 UTC, to the second.
pub fn rfc3339(unix_ms: i64) -> String {
    let (date, secs) = split(unix_ms);
    format!("{date}:{secs:02}Z")
}

/// Formats ms since the Unix epoch as RFC 3339 UTC, to the millisecond
/// (`2026-12-05T10:15:40.123Z`), as logs want.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let (date, secs) = split(unix_ms);
    format!("{date}:{secs:02}.{:03}Z", unix_ms.rem_euclid(1000))
}

/// `YYYY-MM-DDTHH:MM` and the seconds of the minute.
fn split(unix_ms: i64) -> (String, i64) {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}",
            rem / 3600,
            (rem % 3600) / 60
        ),
        rem % 60,
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_867_200_500), "2026-11-28T12:00:00Z");
        assert_eq!(
            rfc3339_millis(1_795_867_200_500),
            "2026-11-28T12:00:00.500Z"
        );
        assert_eq!(
            rfc3339_millis(1_795_867_259_007),
            "2026-11-28T12:00:59.007Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }
}
