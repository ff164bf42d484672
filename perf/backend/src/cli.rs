//! Command-line flags; each also reads a `PYMESH_BACKEND_*` environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use pymesh_backend::{Config, Mode};

/// A minimal fast test server for pymesh benchmarks.
#[derive(Debug, Parser)]
#[command(name = "pymesh-backend", version, about)]
pub struct Args {
    /// Address to listen on (port 0: the OS picks one; the bound address is printed).
    #[arg(long, env = "PYMESH_BACKEND_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// `http`: HTTP/1.1 + h2c + gRPC echo; `tcp-echo`: echo bytes.
    #[arg(long, env = "PYMESH_BACKEND_MODE", value_enum, default_value_t = Mode::Http)]
    pub mode: Mode,

    /// Body size of every HTTP response, in bytes (http mode).
    #[arg(long, env = "PYMESH_BACKEND_RESPONSE_SIZE", default_value_t = 1024)]
    pub response_size: usize,

    /// Milliseconds to wait before answering each HTTP request (http mode).
    #[arg(long, env = "PYMESH_BACKEND_DELAY_MS", default_value_t = 0)]
    pub delay_ms: u64,

    /// Worker threads (1: a single-threaded runtime, the cheapest).
    #[arg(
        long,
        env = "PYMESH_BACKEND_THREADS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub threads: u16,
}

impl Args {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Config {
        Config {
            mode: self.mode,
            response_size: self.response_size,
            delay: Duration::from_millis(self.delay_ms),
        }
    }
}
