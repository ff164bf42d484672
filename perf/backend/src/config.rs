//! What a backend serves: the mode and the shape of its responses.

use std::time::Duration;

/// The protocol a backend speaks on its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// HTTP/1.1 and HTTP/2 prior-knowledge on the same port, plus gRPC echo.
    Http,
    /// Echo every byte back on the same TCP connection.
    TcpEcho,
}

/// Everything [`crate::serve`] needs besides the listener.
#[derive(Clone, Debug)]
pub struct Config {
    /// The protocol spoken on the port.
    pub mode: Mode,
    /// Body size of every (non-gRPC) HTTP response, in bytes.
    pub response_size: usize,
    /// Wait this long before answering each HTTP request (gRPC included).
    pub delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Http,
            response_size: 1024,
            delay: Duration::ZERO,
        }
    }
}
