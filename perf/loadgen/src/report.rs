//! The run's summary: the JSON object `--json` prints, and the text form.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{Config, Protocol};
use crate::stats::{Failure, Stats};

/// Percentiles of a latency distribution, in microseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            p50: at_percentile(histogram, 50.0),
            p90: at_percentile(histogram, 90.0),
            p99: at_percentile(histogram, 99.0),
            p999: at_percentile(histogram, 99.9),
            max: histogram.max(),
            mean: round2(histogram.mean()),
        }
    }
}

/// One run's results. Only requests intended inside the measured window count.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub protocol: Protocol,
    pub connections: usize,
    /// Whether every request opened (and closed) its own connection.
    pub new_connection_per_request: bool,
    /// Requests per second asked for (0: closed loop).
    pub requested_rps: f64,
    /// Responses (any status) per second of the measured window.
    pub achieved_rps: f64,
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    /// Measured requests: responses + requests that got none.
    pub requests: u64,
    /// Responses of any status.
    pub responses: u64,
    /// Requests without a response (connect, transport, timeout) plus responses that are not
    /// a success (non-2xx; gRPC unary: also a `grpc-status` other than 0, or none).
    pub errors: u64,
    /// Responses by status code (grpc-stream: echoed messages, all on `200` streams).
    pub status_counts: BTreeMap<String, u64>,
    /// gRPC unary calls by `grpc-status` (`missing`: none); empty for other protocols.
    pub grpc_status_counts: BTreeMap<String, u64>,
    /// Requests without a response, by cause: `connect`, `transport`, `timeout`.
    pub error_counts: BTreeMap<String, u64>,
    /// From each request's intended send time to the end of its response body.
    pub latency_us: Percentiles,
    /// How late requests actually left compared with the schedule (generator lag).
    pub send_delay_us: Percentiles,
    /// `[percentile, latency_us]` pairs on a log scale of percentiles, for plotting.
    pub histogram: Vec<(f64, u64)>,
}

impl Report {
    /// Summarise a run of `config` that observed `stats`.
    pub fn new(config: &Config, stats: &Stats) -> Self {
        let duration_s = config.duration.as_secs_f64();
        let responses = stats.responses();
        let unanswered: u64 = Failure::ALL.iter().map(|f| stats.failures(*f)).sum();
        let error_counts = Failure::ALL
            .iter()
            .map(|f| (f.name().to_owned(), stats.failures(*f)))
            .collect();
        Self {
            url: config.url.clone(),
            protocol: config.protocol,
            connections: config.connections,
            new_connection_per_request: config.new_connection,
            requested_rps: config.rate,
            achieved_rps: round2(responses as f64 / duration_s),
            duration_s,
            requests: responses + unanswered,
            responses,
            errors: unanswered + stats.non_success(),
            status_counts: stats
                .status
                .iter()
                .map(|(code, count)| (code.to_string(), *count))
                .collect(),
            grpc_status_counts: stats
                .grpc_status
                .iter()
                .map(|(status, count)| (status.to_string(), *count))
                .collect(),
            error_counts,
            latency_us: Percentiles::of(&stats.latency),
            send_delay_us: Percentiles::of(&stats.send_delay),
            histogram: spectrum(&stats.latency),
        }
    }

    /// A human-readable summary.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "{} {:?}{} x{} for {:.1}s: requested {} rps, achieved {} rps",
            self.url,
            self.protocol,
            if self.new_connection_per_request {
                " (new connection per request)"
            } else {
                ""
            },
            self.connections,
            self.duration_s,
            self.requested_rps,
            self.achieved_rps
        );
        let _ = writeln!(
            out,
            "requests {}  responses {}  errors {}  status {:?}  failures {:?}",
            self.requests, self.responses, self.errors, self.status_counts, self.error_counts
        );
        if !self.grpc_status_counts.is_empty() {
            let _ = writeln!(out, "grpc-status {:?}", self.grpc_status_counts);
        }
        let _ = writeln!(
            out,
            "latency µs (from intended send time): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let _ = writeln!(
            out,
            "send delay µs (generator lag): p50 {}  p99 {}  max {}",
            self.send_delay_us.p50, self.send_delay_us.p99, self.send_delay_us.max
        );
        let _ = writeln!(out, "{:>12}  {:>10}", "percentile", "latency_us");
        for (percentile, value) in &self.histogram {
            let _ = writeln!(out, "{percentile:>12}  {value:>10}");
        }
        out
    }
}

/// Percentiles 0, 50, 75, 90, 95, 97.5, 99, 99.5, 99.75, 99.9, … (the tail shrinking by
/// 1, 2.5, 5 per decade) as long as the sample count resolves them, then 100.
pub fn percentile_scale(samples: u64) -> Vec<f64> {
    let mut scale = vec![0.0];
    let mut decade = 1.0_f64;
    'outer: while decade >= 1e-6 {
        for factor in [0.5, 0.25, 0.1] {
            let tail = decade * factor;
            if (tail * samples as f64) < 1.0 || tail < 1e-7 {
                break 'outer;
            }
            // Round away float noise: 1 - 0.001 = 0.9989999…
            scale.push(((1.0 - tail) * 100.0 * 1e6).round() / 1e6);
        }
        decade /= 10.0;
    }
    scale.push(100.0);
    scale
}

fn spectrum(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    percentile_scale(histogram.len())
        .into_iter()
        .map(|p| (p, at_percentile(histogram, p)))
        .collect()
}

/// The value at `percentile`, computed the same way everywhere so that the summary and the
/// spectrum agree (`99.9 / 100.0` is a hair above `0.999`, which would pick the next sample).
fn at_percentile(histogram: &Histogram<u64>, percentile: f64) -> u64 {
    let quantile = (percentile / 100.0 * 1e12).round() / 1e12;
    histogram.value_at_quantile(quantile)
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_spectrum_agree() {
        let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
        for value in 1..=2000 {
            histogram.record(value).expect("in range");
        }
        let summary = Percentiles::of(&histogram);
        let spectrum = spectrum(&histogram);
        let at = |p: f64| spectrum.iter().find(|(q, _)| *q == p).map(|(_, v)| *v);
        assert_eq!(at(99.9), Some(summary.p999));
        assert_eq!(at(99.0), Some(summary.p99));
        assert_eq!(summary.p999, histogram.highest_equivalent(1998));
        assert!(summary.p50 <= summary.p90 && summary.p999 <= summary.max);
    }

    #[test]
    fn scale_follows_the_sample_count() {
        assert_eq!(percentile_scale(0), vec![0.0, 100.0]);
        assert_eq!(
            percentile_scale(1000),
            vec![0.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 100.0]
        );
        let big = percentile_scale(u64::MAX);
        assert!(big.windows(2).all(|w| w[0] < w[1]));
        assert!(big.contains(&99.99) && big.contains(&99.999));
    }
}
