//! The pymesh engine: the whole data-plane request path, shared by the native
//! sidecar (`pymesh-proxy`) and the Python extension (`pymesh.Proxy`).
//!
//! Each direction's pipeline reads top to bottom in one file: `inbound` (accept →
//! mesh TLS terminate → detect → authorize → HTTP | TCP → the local application) and
//! `outbound` (accept → detect → route → HTTP | TCP → mesh TLS upstream). Beside them:
//! `state` (the config snapshot and what every connection shares), `route` and
//! `service` (authority → service, and what survives a reload), `http` (serving,
//! admitting, the tries), `tcp`, `balance` (endpoint load and health), `connect` (TCP,
//! mesh TLS, connection caps), `socket` (what every proxied socket is set to), `authz`, `record` (golden metrics), and the lifecycle in
//! `proxy` with `discover` and `identity` feeding it, and `memory` handing back what a
//! burst freed. `docs/architecture.md` draws it.
//!
//! The public surface is small: [`Proxy`] to run one, and [`config`] to read and
//! check the configuration it runs.

#![warn(missing_docs, unreachable_pub)]

mod admin;
mod authz;
mod backoff;
mod balance;
pub mod config;
mod connect;
mod control_channel;
mod detect;
mod discover;
mod errors;
mod health;
mod http;
mod identity;
mod inbound;
mod io;
mod limit;
mod listen;
mod memory;
mod metrics;
mod orig_dst;
mod outbound;
mod proxy;
mod record;
mod retry;
mod route;
mod service;
mod socket;
mod state;
mod tcp;
mod tls;

pub use config::{ConfigError, ProxyConfig};
pub use proxy::{Error, Proxy};
