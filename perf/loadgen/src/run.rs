//! One run: resolve, connect every connection up front (so a wrong address fails at once;
//! with a new connection per request, one connection that is closed again), start the
//! schedule, run one task per connection (gRPC streaming: one call per connection), merge
//! what they saw.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::try_join_all;
use http_body_util::Full;
use hyper::body::Body;
use tokio::task::JoinHandle;

use crate::config::{Config, Protocol};
use crate::lane::{self, LaneTask};
use crate::link::{self, ConnectError, Link};
use crate::report::Report;
use crate::request::RequestTemplate;
use crate::schedule::{Lane, Schedule};
use crate::stats::Stats;
use crate::stream::{self, CallBody, StreamTask};

/// Why a run could not start or finish. Each message names its own step only: the causes
/// are `source()`s, which `main` prints after it (`{:#}`), so none is printed twice.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot resolve {host}:{port}")]
    Resolve {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("cannot resolve {host}:{port}: no addresses")]
    NoAddress { host: String, port: u16 },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        source: ConnectError,
    },
    #[error("a connection task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot merge histograms")]
    Merge(#[from] hdrhistogram::AdditionError),
}

/// Run the load `config` describes and summarise it. Must be called inside a Tokio runtime;
/// returns after warm-up + duration + at most the drain time.
pub async fn run(config: &Config) -> Result<Report, RunError> {
    let addr = resolve(config).await?;
    let template = Arc::new(RequestTemplate::new(config));
    let tasks: Vec<JoinHandle<Stats>> = if config.protocol == Protocol::GrpcStream {
        let links = connect_all::<CallBody>(addr, config).await?;
        let schedule = schedule(config);
        links
            .into_iter()
            .zip(lanes(config.connections))
            .map(|(link, lane)| {
                tokio::spawn(stream::run(StreamTask {
                    link,
                    lane,
                    schedule,
                    template: Arc::clone(&template),
                    addr,
                    protocol: config.protocol,
                    inflight: config.inflight,
                }))
            })
            .collect()
    } else {
        let links: Vec<Option<Link>> = if config.new_connection {
            // Only to check the address: every request opens its own connection.
            link::connect::<Full<Bytes>>(addr, config.protocol)
                .await
                .map_err(|source| RunError::Connect { addr, source })?;
            (0..config.connections).map(|_| None).collect()
        } else {
            connect_all(addr, config)
                .await?
                .into_iter()
                .map(Some)
                .collect()
        };
        let schedule = schedule(config);
        links
            .into_iter()
            .zip(lanes(config.connections))
            .map(|(link, lane)| {
                tokio::spawn(lane::run(LaneTask {
                    link,
                    lane,
                    schedule,
                    template: Arc::clone(&template),
                    addr,
                    protocol: config.protocol,
                    inflight: config.inflight,
                    new_connection: config.new_connection,
                }))
            })
            .collect()
    };

    let mut total = Stats::new();
    for task in tasks {
        total.merge(&task.await?)?;
    }
    Ok(Report::new(config, &total))
}

/// `config.connections` connections, all at once.
async fn connect_all<B>(addr: SocketAddr, config: &Config) -> Result<Vec<Link<B>>, RunError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    try_join_all((0..config.connections).map(|_| link::connect(addr, config.protocol)))
        .await
        .map_err(|source| RunError::Connect { addr, source })
}

/// The run's schedule, starting now.
fn schedule(config: &Config) -> Schedule {
    Schedule::new(
        Instant::now(),
        config.rate,
        config.warmup,
        config.duration,
        config.drain,
    )
}

/// The schedule split round-robin over `connections` lanes.
fn lanes(connections: usize) -> impl Iterator<Item = Lane> {
    let step = connections as u64;
    (0..step).map(move |first| Lane { first, step })
}

async fn resolve(config: &Config) -> Result<SocketAddr, RunError> {
    let (host, port) = (config.target.host.as_str(), config.target.port);
    let found = match tokio::net::lookup_host((host, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(source) => {
            return Err(RunError::Resolve {
                host: host.to_owned(),
                port,
                source,
            })
        }
    };
    found.ok_or_else(|| RunError::NoAddress {
        host: host.to_owned(),
        port,
    })
}
