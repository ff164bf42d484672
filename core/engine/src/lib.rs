//! The pymesh engine: the whole data-plane request path, shared by the native
//! sidecar (`pymesh-proxy`) and the Python extension (`pymesh.Proxy`).
//!
//! A connection flows `listen` → `detect` → `http` (hyper) or `tcp` (opaque) →
//! `route` → (`limit`, `retry`) → `balance` → an upstream connection, with `health`
//! checking endpoints, `metrics` recorded on the way and `admin` serving them.
//! `config` validates what drives all of it. With a mesh identity, `identity` keeps a
//! certificate from the CA, `tls` carries mutual TLS between proxies, and `authz`
//! decides who may use the inbound listeners.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod detect;
pub mod discover;
pub mod health;
pub mod http;
pub mod identity;
pub mod io;
pub mod limit;
pub mod listen;
pub mod metrics;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod tcp;
pub mod tls;

pub use config::{ConfigError, ProxyConfig};
pub use proxy::{Error, Proxy};
