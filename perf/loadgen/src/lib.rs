//! pymesh-loadgen: a constant-rate, open-loop HTTP and gRPC load generator that corrects
//! coordinated omission the way wrk2 does.
//!
//! Request `i` of a run is *intended* to leave at `start + i / rate`, whatever happened to the
//! requests before it; its latency is measured from that intended time, not from when it
//! actually left. A server that stalls therefore shows up as the latency every waiting user
//! would have seen, instead of silently slowing the generator down. The schedule is split
//! round-robin over `--connections` keep-alive connections (HTTP/1.1, or HTTP/2 prior
//! knowledge with multiplexing), one task per connection, each with its own histogram, merged
//! at the end. With `--rate 0` it runs closed-loop instead (as fast as responses come back).
//!
//! gRPC over h2c: `grpc` sends unary calls (one length-prefixed message each; success is
//! `grpc-status: 0`), `grpc-stream` keeps one bidirectional call per connection and counts
//! each message and its echo as a request. `--new-connection-per-request` opens (and closes)
//! a connection for every request instead of keeping connections alive.
//!
//! Module map: [`cli`] (flags) → [`config`] (validated settings) → [`run`] (orchestration)
//! → `lane` (one connection's loop; or `stream`, one connection's gRPC call) over `link` (a
//! hyper connection) with `request`, `grpc` (message framing and status), `schedule` and
//! `timer`; `stats` collects, [`report`] summarises.

pub mod cli;
pub mod config;
pub mod grpc;
mod lane;
mod link;
pub mod report;
mod request;
pub mod run;
mod schedule;
mod stats;
mod stream;
pub mod timer;

pub use config::{Config, Protocol};
pub use report::Report;
pub use run::{run, RunError};
