//! What one connection (and, merged, the whole run) observed in the measured window.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::grpc;

/// Why a measured request got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made for it.
    Connect,
    /// The connection failed while the request was out (reset, protocol error), or, for a
    /// gRPC stream message, the call ended before its echo came back.
    Transport,
    /// Still outstanding (or never sent) when the run stopped.
    Timeout,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Connect, Failure::Transport, Failure::Timeout];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Transport => "transport",
            Failure::Timeout => "timeout",
        }
    }
}

/// What came back for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: http::StatusCode,
    /// A gRPC unary call's status; `None` for plain HTTP and for stream messages (a
    /// stream's status ends the stream, not a message).
    pub grpc: Option<grpc::Status>,
}

impl Answer {
    /// A plain HTTP response (or an echoed stream message, which arrives on a `200` stream).
    pub fn http(status: http::StatusCode) -> Self {
        Self { status, grpc: None }
    }

    /// 2xx, and for a gRPC call also `grpc-status: 0`.
    pub fn is_success(&self) -> bool {
        self.status.is_success() && self.grpc.unwrap_or(grpc::Status::OK) == grpc::Status::OK
    }
}

/// The end of one exchange.
pub struct Exchange {
    pub intended: Instant,
    pub sent: Instant,
    pub finished: Instant,
    pub result: Result<Answer, Failure>,
}

/// Histograms (µs, 3 significant digits) and counters of measured requests.
pub struct Stats {
    /// From intended send time to the end of the response body.
    pub latency: Histogram<u64>,
    /// From intended to actual send time: how far the generator fell behind its schedule.
    pub send_delay: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    /// gRPC unary calls by `grpc-status`.
    pub grpc_status: BTreeMap<grpc::Status, u64>,
    /// Responses that are not a success (non-2xx, or a gRPC status other than 0).
    unsuccessful: u64,
    failures: [u64; 3],
}

fn histogram() -> Histogram<u64> {
    // An auto-resizing histogram; 3 significant digits is always a valid precision.
    Histogram::new(3).expect("3 significant digits is a valid histogram precision")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Record `value`, growing the histogram as needed (clamping only if it cannot grow).
/// `saturating_record` alone never grows it and would clamp large values to its initial range.
fn record(histogram: &mut Histogram<u64>, value: u64) {
    if histogram.record(value).is_err() {
        histogram.saturating_record(value);
    }
}

impl Stats {
    pub fn new() -> Self {
        Self {
            latency: histogram(),
            send_delay: histogram(),
            status: BTreeMap::new(),
            grpc_status: BTreeMap::new(),
            unsuccessful: 0,
            failures: [0; 3],
        }
    }

    /// Account one measured exchange.
    pub fn record(&mut self, exchange: &Exchange) {
        match exchange.result {
            Ok(answer) => {
                let latency = exchange
                    .finished
                    .saturating_duration_since(exchange.intended);
                let delay = exchange.sent.saturating_duration_since(exchange.intended);
                record(&mut self.latency, micros(latency));
                record(&mut self.send_delay, micros(delay));
                *self.status.entry(answer.status.as_u16()).or_insert(0) += 1;
                if let Some(status) = answer.grpc {
                    *self.grpc_status.entry(status).or_insert(0) += 1;
                }
                self.unsuccessful += u64::from(!answer.is_success());
            }
            Err(failure) => self.fail(failure, 1),
        }
    }

    /// Account `count` measured requests that got no response.
    pub fn fail(&mut self, failure: Failure, count: u64) {
        self.failures[failure as usize] += count;
    }

    pub fn failures(&self, failure: Failure) -> u64 {
        self.failures[failure as usize]
    }

    /// Responses of any status.
    pub fn responses(&self) -> u64 {
        self.latency.len()
    }

    /// Responses that are not a success: status not 2xx, or a gRPC status other than 0.
    pub fn non_success(&self) -> u64 {
        self.unsuccessful
    }

    /// Add another connection's observations to these.
    pub fn merge(&mut self, other: &Stats) -> Result<(), hdrhistogram::AdditionError> {
        self.latency.add(&other.latency)?;
        self.send_delay.add(&other.send_delay)?;
        for (code, count) in &other.status {
            *self.status.entry(*code).or_insert(0) += count;
        }
        for (status, count) in &other.grpc_status {
            *self.grpc_status.entry(*status).or_insert(0) += count;
        }
        self.unsuccessful += other.unsuccessful;
        for failure in Failure::ALL {
            self.fail(failure, other.failures(failure));
        }
        Ok(())
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let t0 = Instant::now();
        let ok = |ms, status| Exchange {
            intended: t0,
            sent: t0 + Duration::from_micros(5),
            finished: t0 + Duration::from_millis(ms),
            result: Ok(Answer::http(
                http::StatusCode::from_u16(status).expect("valid status"),
            )),
        };
        let mut a = Stats::new();
        a.record(&ok(1, 200));
        a.record(&ok(2, 503));
        let mut b = Stats::new();
        b.record(&ok(3, 200));
        b.record(&Exchange {
            result: Err(Failure::Transport),
            ..ok(0, 200)
        });
        b.fail(Failure::Timeout, 2);
        let grpc = |status| Exchange {
            result: Ok(Answer {
                status: http::StatusCode::OK,
                grpc: Some(status),
            }),
            ..ok(1, 200)
        };
        b.record(&grpc(grpc::Status::OK));
        b.record(&grpc(grpc::Status::Code(14)));
        b.record(&grpc(grpc::Status::Missing));
        a.merge(&b).expect("merge");
        assert_eq!(a.responses(), 6);
        assert_eq!(a.non_success(), 3);
        assert_eq!(a.grpc_status.get(&grpc::Status::OK), Some(&1));
        assert_eq!(a.grpc_status.get(&grpc::Status::Missing), Some(&1));
        assert_eq!(a.status.get(&200), Some(&5));
        assert_eq!(a.failures(Failure::Transport), 1);
        assert_eq!(a.failures(Failure::Timeout), 2);
        assert_eq!(a.latency.max(), a.latency.highest_equivalent(3000));
        assert_eq!(a.latency.min(), a.latency.lowest_equivalent(1000));
    }
}
