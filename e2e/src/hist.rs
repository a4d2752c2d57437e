//! A small log-linear histogram (relative error below 1%) that merges across processes.

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS; // 128 linear buckets, then 64 per power of two
const HALF: u64 = SUB / 2;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * HALF as usize + HALF as usize;

/// Histogram of non-negative integer values (microseconds, typically).
#[derive(Debug, Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    sum: f64,
    min: u64,
    max: u64,
}

/// The sparse wire form of a [`Hist`], sent from worker processes to the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SparseHist {
    /// `(bucket index, count)` for every non-empty bucket.
    pub buckets: Vec<(u32, u64)>,
    /// Sum of all recorded values.
    pub sum: f64,
    /// Exact smallest value (0 when empty).
    pub min: u64,
    /// Exact largest value.
    pub max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

fn index(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let power = 63 - value.leading_zeros(); // >= SUB_BITS
    let shift = power - (SUB_BITS - 1);
    (shift as usize) * HALF as usize + (value >> shift) as usize
}

fn bucket_value(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let shift = index / HALF - 1;
    let mantissa = index % HALF + HALF;
    let low = mantissa << shift;
    low + ((1u64 << shift) / 2)
}

impl Hist {
    /// An empty histogram.
    pub fn new() -> Self {
        Hist { counts: vec![0; BUCKETS], total: 0, sum: 0.0, min: u64::MAX, max: 0 }
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.counts[index(value).min(BUCKETS - 1)] += 1;
        self.total += 1;
        self.sum += value as f64;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Exact largest value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Exact smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1), within 1%; clamped to the exact min and max.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                if seen == self.total {
                    return self.max;
                }
                return bucket_value(index).clamp(self.min(), self.max);
            }
        }
        self.max
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Hist) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The sparse wire form.
    pub fn to_sparse(&self) -> SparseHist {
        SparseHist {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, count)| **count > 0)
                .map(|(index, count)| (index as u32, *count))
                .collect(),
            sum: self.sum,
            min: self.min(),
            max: self.max,
        }
    }

    /// Adds every value of a sparse histogram.
    pub fn merge_sparse(&mut self, sparse: &SparseHist) {
        let mut added = 0;
        for &(index, count) in &sparse.buckets {
            if let Some(slot) = self.counts.get_mut(index as usize) {
                *slot += count;
                added += count;
            }
        }
        if added > 0 {
            self.total += added;
            self.sum += sparse.sum;
            self.min = self.min.min(sparse.min);
            self.max = self.max.max(sparse.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut hist = Hist::new();
        for value in 1..=100_000u64 {
            hist.record(value);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = hist.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(hist.quantile(1.0), 100_000);
        assert_eq!(hist.min(), 1);
        assert_eq!(hist.count(), 100_000);
    }

    #[test]
    fn small_values_are_exact_and_sparse_round_trips() {
        let mut hist = Hist::new();
        for value in [0, 1, 5, 127, 128, 129, 1_000_000, u64::MAX] {
            hist.record(value);
        }
        assert_eq!(hist.quantile(0.0), 0);
        assert_eq!(hist.max(), u64::MAX);
        let mut other = Hist::new();
        other.merge_sparse(&hist.to_sparse());
        assert_eq!(other.count(), hist.count());
        assert_eq!(other.quantile(0.5), hist.quantile(0.5));
        let mut merged = Hist::new();
        merged.merge(&hist);
        merged.merge(&other);
        assert_eq!(merged.count(), 16);
    }

    #[test]
    fn index_is_monotonic_and_in_range() {
        let mut values: Vec<u64> = (0..64)
            .flat_map(|power| [0u64, 1, 3].map(|offset| (1u64 << power).saturating_add(offset)))
            .chain([0, u64::MAX])
            .collect();
        values.sort_unstable();
        let mut last = 0;
        for value in values {
            let index = index(value);
            assert!(index >= last && index < BUCKETS, "{value}");
            let back = bucket_value(index) as f64;
            assert!((back - value as f64).abs() <= value as f64 / 64.0 + 0.5, "{value} -> {back}");
            last = index;
        }
    }
}
