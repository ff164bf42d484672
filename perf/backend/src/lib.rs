//! pymesh-backend: a minimal, fast test server for pymesh benchmarks.
//!
//! It stands in for the application behind a proxy, so it must cost as little as possible:
//! - `http` mode serves HTTP/1.1 and HTTP/2 prior-knowledge (h2c) on one port, keep-alive;
//!   every request gets `200` and a preallocated body of a fixed size (request bodies are
//!   drained first, so POST works). A request with `content-type: application/grpc…` is a gRPC
//!   echo instead: its length-prefixed messages come back as they were sent, followed by the
//!   trailer `grpc-status: 0` (bytes in, bytes out: no protobuf types).
//! - `tcp-echo` mode writes back every byte it reads.
//!
//! The binary (`pymesh-backend`) is a thin `main` over [`serve`]; tests in other crates start
//! the same server in-process.

pub mod config;
pub mod grpc;
pub mod http;
pub mod server;
pub mod tcp_echo;

pub use config::{Config, Mode};
pub use server::serve;
