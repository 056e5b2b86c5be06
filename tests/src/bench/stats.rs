//! Summaries of repeated measurements: the median and the spread of a few repetitions, the
//! percentiles of latency samples, and ratios taken pair by pair.
//!
//! Repetitions of different variants are interleaved (A B A B ...), so the r-th sample of A and
//! the r-th sample of B saw nearly the same load on a shared machine; dividing them pair by pair
//! cancels most of that drift, which dividing two medians would not.

use serde::Serialize;

/// The median and spread of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartile (nearest rank).
    pub p25: f64,
    pub p75: f64,
}

impl Summary {
    /// `None` for no samples; NaN samples are left out (a tool that reported nothing).
    pub fn of(samples: &[f64]) -> Option<Self> {
        let sorted = sorted(samples);
        let (first, last) = (*sorted.first()?, *sorted.last()?);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Self {
            n: sorted.len(),
            median,
            min: first,
            max: last,
            p25: nearest_rank(&sorted, 0.25),
            p75: nearest_rank(&sorted, 0.75),
        })
    }
}

/// The `q` quantile (0 < q <= 1) by nearest rank: a value that was measured, never an
/// interpolation, so a p99 of 100 samples is the 99th smallest. `None` without samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    let sorted = sorted(samples);
    (!sorted.is_empty()).then(|| nearest_rank(&sorted, q))
}

/// `a[i] / b[i]` for every repetition both have; pairs with a zero or missing divisor are left
/// out rather than turned into infinities.
pub fn paired_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && **y != 0.0)
        .map(|(x, y)| x / y)
        .collect()
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.p25, s.p75), (1.0, 3.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn percentiles_are_measured_values_by_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&samples[..10], 0.99), Some(10.0));
        assert_eq!(percentile(&[7.0], 0.5), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn ratios_pair_repetitions_and_skip_unusable_ones() {
        assert_eq!(
            paired_ratios(&[10.0, 9.0, 8.0], &[20.0, 0.0, 16.0, 5.0]),
            vec![0.5, 0.5]
        );
        assert_eq!(paired_ratios(&[f64::NAN], &[1.0]), Vec::<f64>::new());
    }
}
