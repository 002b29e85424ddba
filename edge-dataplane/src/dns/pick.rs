//! Weighted random choice of edges, prepared when the config arrives.
//!
//! The first answer is drawn with Walker's alias method (one random number,
//! two table reads, whatever the number of edges); further distinct answers
//! (`answer_count` > 1) are drawn from the remaining edges by weight.
//! A CNAME cannot share its owner name with other records, so when the first
//! draw is a CNAME edge it is the whole answer, and later draws skip CNAME
//! edges.

/// Most answers per query (the fleet validates 1 to 16).
pub const MAX_ANSWERS: usize = 16;

/// Picks among a fixed set of candidates by weight.
#[derive(Debug, Clone)]
pub struct Picker {
    /// Normalised weights (sum 1).
    weights: Box<[f64]>,
    /// Alias method: keep `i` when the coin is below `keep[i]`, else take
    /// `alias[i]`.
    keep: Box<[u32]>,
    alias: Box<[u16]>,
    /// Candidates that are CNAMEs (they answer alone).
    cname: Box<[bool]>,
}

impl Picker {
    /// `weights` must be positive and finite, at most 65,535 of them; an
    /// empty list gives a picker that picks nothing.
    pub fn new(weights: &[f64], cname: &[bool]) -> Self {
        let n = weights.len().min(usize::from(u16::MAX));
        let total: f64 = weights[..n].iter().sum();
        let norm: Vec<f64> = weights[..n].iter().map(|w| w / total).collect();
        // Vose's alias method.
        let mut scaled: Vec<f64> = norm.iter().map(|p| p * n as f64).collect();
        let mut keep = vec![u32::MAX; n];
        let mut alias: Vec<u16> = (0..n as u16).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = (scaled[s] * 4_294_967_296.0).min(u32::MAX as f64) as u32;
            alias[s] = l as u16;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers (rounding) keep themselves.
        Self {
            weights: norm.into_boxed_slice(),
            keep: keep.into_boxed_slice(),
            alias: alias.into_boxed_slice(),
            cname: cname[..n].to_vec().into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The normalised weight of candidate `i`.
    pub fn weight(&self, i: usize) -> f64 {
        self.weights[i]
    }

    /// One candidate by weight.
    #[inline]
    pub fn one(&self, rng: &mut fastrand::Rng) -> usize {
        let r = rng.u64(..);
        let n = self.keep.len() as u64;
        let i = (((r & 0xffff_ffff) * n) >> 32) as usize;
        if ((r >> 32) as u32) < self.keep[i] {
            i
        } else {
            usize::from(self.alias[i])
        }
    }

    /// Up to `count` distinct candidates into `out`, the first by weight and
    /// the others by weight among the rest; returns how many. A CNAME first
    /// pick answers alone.
    pub fn pick(
        &self,
        count: usize,
        rng: &mut fastrand::Rng,
        out: &mut [u16; MAX_ANSWERS],
    ) -> usize {
        if self.keep.is_empty() {
            return 0;
        }
        let first = self.one(rng);
        out[0] = first as u16;
        if self.cname[first] {
            return 1;
        }
        let count = count.clamp(1, MAX_ANSWERS);
        let mut n = 1;
        while n < count {
            let taken = |i: usize, out: &[u16; MAX_ANSWERS]| out[..n].contains(&(i as u16));
            let mut total = 0.0;
            for i in 0..self.weights.len() {
                if !self.cname[i] && !taken(i, out) {
                    total += self.weights[i];
                }
            }
            if total <= 0.0 {
                break;
            }
            let mut r = rng.f64() * total;
            let mut chosen = None;
            for i in 0..self.weights.len() {
                if self.cname[i] || taken(i, out) {
                    continue;
                }
                chosen = Some(i);
                r -= self.weights[i];
                if r < 0.0 {
                    break;
                }
            }
            let Some(i) = chosen else { break };
            out[n] = i as u16;
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_weights() {
        let p = Picker::new(&[0.1, 0.2, 0.3, 0.4], &[false; 4]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0usize; 4];
        let n = 400_000;
        for _ in 0..n {
            counts[p.one(&mut rng)] += 1;
        }
        for (i, want) in [0.1, 0.2, 0.3, 0.4].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.005, "{i}: {got} vs {want}");
        }
    }

    #[test]
    fn distinct_answers_and_cname_alone() {
        let p = Picker::new(&[1.0, 1.0, 1.0, 5.0], &[false, false, false, true]);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut out = [0u16; MAX_ANSWERS];
        let mut alone = 0;
        for _ in 0..10_000 {
            let n = p.pick(3, &mut rng, &mut out);
            if out[0] == 3 {
                assert_eq!(n, 1);
                alone += 1;
            } else {
                assert_eq!(n, 3);
                let mut seen = out[..n].to_vec();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), 3, "{out:?}");
                assert!(!seen.contains(&3));
            }
        }
        assert!((alone as f64 / 10_000.0 - 0.625).abs() < 0.03, "{alone}");
        // More answers asked than candidates.
        let two = Picker::new(&[1.0, 3.0], &[false, false]);
        assert_eq!(two.pick(5, &mut rng, &mut out), 2);
        assert_eq!(Picker::new(&[], &[]).pick(1, &mut rng, &mut out), 0);
        let one = Picker::new(&[0.7], &[false]);
        assert_eq!(one.pick(1, &mut rng, &mut out), 1);
        assert_eq!(out[0], 0);
    }
}
