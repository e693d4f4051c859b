//! Summary statistics shared by the benchmarks.

use serde::Serialize;

/// mean, σ, p50, p99, min, max of a sample, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub mean_us: f64,
    pub sd_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

impl Summary {
    /// From nanosecond samples. An empty sample gives all zeros.
    pub fn from_ns(samples: &[u64]) -> Summary {
        if samples.is_empty() {
            return Summary {
                mean_us: 0.0,
                sd_us: 0.0,
                p50_us: 0.0,
                p99_us: 0.0,
                min_us: 0.0,
                max_us: 0.0,
            };
        }
        let mut v: Vec<f64> = samples.iter().map(|&n| n as f64 / 1000.0).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let pct = |p: f64| v[(((p / 100.0) * (n - 1.0)).round() as usize).min(v.len() - 1)];
        let r = |x: f64| (x * 10.0).round() / 10.0;
        Summary {
            mean_us: r(mean),
            sd_us: r(var.sqrt()),
            p50_us: r(pct(50.0)),
            p99_us: r(pct(99.0)),
            min_us: r(v[0]),
            max_us: r(v[v.len() - 1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_sample() {
        let s = Summary::from_ns(&(1..=100).map(|i| i * 1000).collect::<Vec<_>>());
        assert_eq!((s.min_us, s.max_us, s.mean_us), (1.0, 100.0, 50.5));
        assert_eq!(s.p50_us, 51.0);
        assert_eq!(s.p99_us, 99.0);
    }
}
