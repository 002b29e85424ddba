//! Distributions for the benches' reports.

/// The `p` quantile (0..=1) of sorted values, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Prints min, median, p90, p99 and max of millisecond samples, then all.
pub fn report(what: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{what}: n={} min={:.0} median={:.0} p90={:.0} p99={:.0} max={:.0} (ms)",
        v.len(),
        percentile(&v, 0.0),
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        percentile(&v, 0.99),
        percentile(&v, 1.0)
    );
    println!(
        "  all: {:?}",
        v.iter().map(|x| x.round() as i64).collect::<Vec<_>>()
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_by_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(super::percentile(&v, 0.5), 3.0);
        assert_eq!(super::percentile(&v, 1.0), 5.0);
        assert!(super::percentile(&[], 0.5).is_nan());
    }
}
