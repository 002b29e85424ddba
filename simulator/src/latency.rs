//! Latency distributions: weighted latencies in log-spaced buckets, with
//! the log-normal spread of requests around each median applied as a
//! Gaussian blur in log space (a log-normal is a shift there).

/// Lower edge of the first bucket, ms.
const LOW_MS: f64 = 0.5;
/// Ratio between bucket edges.
const RATIO: f64 = 1.05;
/// Buckets (0.5 ms × 1.05^240 ≈ 60 s).
const BUCKETS: usize = 240;

/// Weighted latencies (weights are requests per second).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Per bucket: weight, and weight × ln(ms) (the mean inside it).
    weight: Vec<f64>,
    log_sum: Vec<f64>,
}

/// A weighted latency with its bucket and logarithm computed.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    bucket: usize,
    ln_ms: f64,
    weight: f64,
}

impl Sample {
    /// `None` for a weight that is not positive or a latency that is not
    /// finite (nothing to add).
    pub fn of(ms: f64, weight: f64) -> Option<Sample> {
        if !(weight > 0.0 && ms.is_finite()) {
            return None;
        }
        // One logarithm serves both the bucket and the mean inside it.
        let ln_ms = ms.max(1e-3).ln();
        let bucket = if ms <= LOW_MS {
            0
        } else {
            (((ln_ms - LOW_MS.ln()) / RATIO.ln()) as usize).min(BUCKETS - 1)
        };
        Some(Sample {
            bucket,
            ln_ms,
            weight,
        })
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, ms: f64, weight: f64) {
        if let Some(at) = Sample::of(ms, weight) {
            self.add_sample(at);
        }
    }

    /// Adds a sample located once (for several histograms).
    pub fn add_sample(&mut self, s: Sample) {
        if self.weight.is_empty() {
            self.weight = vec![0.0; BUCKETS];
            self.log_sum = vec![0.0; BUCKETS];
        }
        self.weight[s.bucket] += s.weight;
        self.log_sum[s.bucket] += s.weight * s.ln_ms;
    }

    /// Empty, keeping its memory.
    pub fn cleared(mut self) -> Self {
        self.weight.iter_mut().for_each(|x| *x = 0.0);
        self.log_sum.iter_mut().for_each(|x| *x = 0.0);
        self
    }

    /// p50, p95 and p99 with a log-normal spread of σ = `jitter` around
    /// each latency; zeros when empty.
    pub fn percentiles(&self, jitter: f64) -> [f64; 3] {
        let total: f64 = self.weight.iter().sum();
        if total <= 0.0 {
            return [0.0; 3];
        }
        let ps = [0.5, 0.95, 0.99];
        if jitter <= 0.0 {
            // Point masses: the mean latency of the bucket that crosses p.
            return ps.map(|p| {
                let mut acc = 0.0;
                for b in 0..BUCKETS {
                    acc += self.weight[b];
                    if acc >= p * total - 1e-9 && self.weight[b] > 0.0 {
                        return (self.log_sum[b] / self.weight[b]).exp();
                    }
                }
                0.0
            });
        }
        // Blur with a Gaussian of σ = jitter in ln(ms).
        let w = RATIO.ln();
        let half = ((3.0 * jitter / w).ceil() as i64).max(1);
        let kernel: Vec<f64> = (-half..=half)
            .map(|i| {
                let x = i as f64 * w / jitter;
                (-0.5 * x * x).exp()
            })
            .collect();
        let ksum: f64 = kernel.iter().sum();
        let mut blurred = vec![0.0; BUCKETS];
        for (b, &wt) in self.weight.iter().enumerate() {
            if wt <= 0.0 {
                continue;
            }
            for (j, k) in kernel.iter().enumerate() {
                let t = (b as i64 + j as i64 - half).clamp(0, BUCKETS as i64 - 1) as usize;
                blurred[t] += wt * k / ksum;
            }
        }
        ps.map(|p| {
            let target = p * total;
            let mut acc = 0.0;
            for (b, &wt) in blurred.iter().enumerate() {
                if wt > 0.0 && acc + wt >= target {
                    let frac = ((target - acc) / wt).clamp(0.0, 1.0);
                    return LOW_MS * RATIO.powf(b as f64 + frac);
                }
                acc += wt;
            }
            LOW_MS * RATIO.powf(BUCKETS as f64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_masses_are_exact_and_spread_widens_the_tail() {
        let mut h = Histogram::new();
        h.add(10.0, 90.0);
        h.add(50.0, 10.0);
        let [p50, p95, p99] = h.percentiles(0.0);
        assert!(
            (p50 - 10.0).abs() < 1e-9 && (p95 - 50.0).abs() < 1e-9 && (p99 - 50.0).abs() < 1e-9
        );
        let [q50, _, q99] = h.percentiles(0.3);
        assert!((q50 / 10.0 - 1.0).abs() < 0.15, "{q50}");
        assert!(q99 > 50.0, "{q99}");
        assert_eq!(Histogram::new().percentiles(0.3), [0.0; 3]);
    }
}
