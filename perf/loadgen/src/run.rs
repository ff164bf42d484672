//! One run: resolve, connect every connection up front (so a wrong address fails at once),
//! start the schedule, run one task per connection, merge what they saw.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::try_join_all;

use crate::config::Config;
use crate::lane::{self, LaneTask};
use crate::link::{self, ConnectError};
use crate::report::Report;
use crate::request::RequestTemplate;
use crate::schedule::{Lane, Schedule};
use crate::stats::Stats;

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot resolve {host}:{port}: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("cannot resolve {host}:{port}: no addresses")]
    NoAddress { host: String, port: u16 },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: ConnectError,
    },
    #[error("a connection task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot merge histograms: {0}")]
    Merge(#[from] hdrhistogram::AdditionError),
}

/// Run the load `config` describes and summarise it. Must be called inside a Tokio runtime;
/// returns after warm-up + duration + at most the drain time.
pub async fn run(config: &Config) -> Result<Report, RunError> {
    let addr = resolve(config).await?;
    let links = try_join_all((0..config.connections).map(|_| link::connect(addr, config.protocol)))
        .await
        .map_err(|source| RunError::Connect { addr, source })?;

    let template = Arc::new(RequestTemplate::new(config));
    let schedule = Schedule::new(
        Instant::now(),
        config.rate,
        config.warmup,
        config.duration,
        config.drain,
    );
    let step = links.len() as u64;
    let tasks: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(index, link)| {
            tokio::spawn(lane::run(LaneTask {
                link,
                lane: Lane {
                    first: index as u64,
                    step,
                },
                schedule,
                template: Arc::clone(&template),
                addr,
                protocol: config.protocol,
                inflight: config.inflight,
            }))
        })
        .collect();

    let mut total = Stats::new();
    for task in tasks {
        total.merge(&task.await?)?;
    }
    Ok(Report::new(config, &total))
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
