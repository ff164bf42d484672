//! pymesh-loadgen: a constant-rate, open-loop HTTP load generator that corrects coordinated
//! omission the way wrk2 does.
//!
//! Request `i` of a run is *intended* to leave at `start + i / rate`, whatever happened to the
//! requests before it; its latency is measured from that intended time, not from when it
//! actually left. A server that stalls therefore shows up as the latency every waiting user
//! would have seen, instead of silently slowing the generator down. The schedule is split
//! round-robin over `--connections` keep-alive connections (HTTP/1.1, or HTTP/2 prior
//! knowledge with multiplexing), one task per connection, each with its own histogram, merged
//! at the end. With `--rate 0` it runs closed-loop instead (as fast as responses come back).
//!
//! Module map: [`cli`] (flags) → [`config`] (validated settings) → [`run`] (orchestration)
//! → `lane` (one connection's loop) over `link` (a hyper connection) with `request`,
//! `schedule` and `timer`; `stats` collects, [`report`] summarises.

pub mod cli;
pub mod config;
mod lane;
mod link;
pub mod report;
mod request;
pub mod run;
mod schedule;
mod stats;
pub mod timer;

pub use config::{Config, Protocol};
pub use report::Report;
pub use run::{run, RunError};
