//! One connection's share of the load: send on schedule, collect responses, reconnect when
//! the connection dies, and stop on time. One task per connection; nothing shared. With a
//! new connection per request the lane keeps no connection: every request opens its own.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{Either, TryFutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::Protocol;
use crate::grpc;
use crate::link::{self, Driver, Link, OnceError, Sender};
use crate::request::RequestTemplate;
use crate::schedule::{Lane, Schedule};
use crate::stats::{Answer, Exchange, Failure, Stats};
use crate::timer::Timer;

/// In a closed loop, wait this long after a failed connect before trying again.
pub(crate) const CLOSED_LOOP_BACKOFF: Duration = Duration::from_millis(10);

/// Everything one connection task needs.
pub struct LaneTask {
    /// The lane's keep-alive connection; `None` with a new connection per request.
    pub link: Option<Link>,
    pub lane: Lane,
    pub schedule: Schedule,
    pub template: Arc<RequestTemplate>,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Most requests in flight at once on this connection (or, with a new connection per
    /// request, connections open at once).
    pub inflight: usize,
    /// Open a connection for every request instead of keeping `link`.
    pub new_connection: bool,
}

/// A finished exchange and whether it was measured.
struct Done {
    exchange: Exchange,
    measured: bool,
}

/// What getting ready to send produced.
enum Step {
    /// The connection can take the request now.
    Ready,
    /// A new connection was made (the request is not sent yet).
    Connected(Link),
    /// No connection for this request.
    Failed(Failure),
}

/// Run the lane until the schedule's stop (an open loop: until it has sent every request due
/// before the stop), then wait for outstanding responses until its hard stop; measured
/// requests still unsent or unanswered then are counted as timeouts.
pub async fn run(task: LaneTask) -> Stats {
    let LaneTask {
        link,
        lane,
        schedule,
        template,
        addr,
        protocol,
        inflight: max_inflight,
        new_connection,
    } = task;
    let mut stats = Stats::new();
    let mut timer = Timer::new();
    let (mut sender, mut driver) = match link {
        Some(link) => (Some(link.sender), Some(link.driver)),
        None => (None, None),
    };
    let mut inflight = FuturesUnordered::new();
    // Measured requests sent and not yet answered.
    let mut outstanding: u64 = 0;
    let mut next = lane.first;
    // Closed loop only: do not reconnect before this.
    let mut not_before: Option<Instant> = None;

    // A closed loop sends until the stop. An open loop sends every request due before the
    // stop, late if the connection fell behind (its latency runs from when it was due), and
    // only gives up at the hard stop: a generator that lags is not the system's error.
    let stop = tokio::time::sleep_until(schedule.stop().into());
    tokio::pin!(stop);
    let hard_stop = tokio::time::sleep_until(schedule.hard_stop().into());
    tokio::pin!(hard_stop);
    loop {
        let due = schedule.due(next);
        if due.is_some_and(|due| due >= schedule.stop()) {
            break;
        }
        let room = inflight.len() < max_inflight;
        tokio::select! {
            biased;
            () = &mut hard_stop => break,
            () = &mut stop, if due.is_none() => break,
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                settle(&mut stats, &mut outstanding, &done);
            }
            _ = drive(&mut driver) => {
                // Closed by the peer or failed: requests still on it fail by themselves.
                driver = None;
                sender = None;
            }
            step = prepare(&mut sender, &mut timer, due.or(not_before), addr, protocol, new_connection), if room => {
                match step {
                    Step::Connected(link) => {
                        sender = Some(link.sender);
                        driver = Some(link.driver);
                    }
                    Step::Failed(failure) => {
                        sender = None;
                        driver = None;
                        let now = Instant::now();
                        if schedule.measures(due.unwrap_or(now)) {
                            stats.fail(failure, 1);
                        }
                        if due.is_none() {
                            not_before = Some(now + CLOSED_LOOP_BACKOFF);
                        }
                        next += lane.step;
                    }
                    Step::Ready => {
                        let request = template.build();
                        let response = if new_connection {
                            Either::Left(once(addr, protocol, request))
                        } else if let Some(sender) = sender.as_mut() {
                            Either::Right(sender.send(request).map_err(|_| Failure::Transport))
                        } else {
                            continue;
                        };
                        let sent = Instant::now();
                        let intended = due.unwrap_or(sent);
                        let measured = schedule.measures(intended);
                        outstanding += u64::from(measured);
                        let grpc = protocol.is_grpc();
                        inflight.push(exchange(response, intended, sent, measured, grpc));
                        next += lane.step;
                        not_before = None;
                    }
                }
            }
        }
    }

    // Drain: no more sends; wait for what is out, but not past the hard stop.
    while !inflight.is_empty() {
        tokio::select! {
            biased;
            () = &mut hard_stop => break,
            Some(done) = inflight.next() => settle(&mut stats, &mut outstanding, &done),
            _ = drive(&mut driver) => driver = None,
        }
    }

    // Measured requests that are still out, or were due but never sent (the connection fell
    // behind its schedule), got no response in time.
    stats.fail(
        Failure::Timeout,
        outstanding + unsent(&schedule, lane, next),
    );
    stats
}

/// Measured requests of `lane` due from `next` on that were never sent.
pub(crate) fn unsent(schedule: &Schedule, lane: Lane, mut next: u64) -> u64 {
    let mut count = 0;
    while let Some(due) = schedule.due(next).filter(|due| *due < schedule.stop()) {
        count += u64::from(schedule.measures(due));
        next += lane.step;
    }
    count
}

fn settle(stats: &mut Stats, outstanding: &mut u64, done: &Done) {
    if done.measured {
        *outstanding -= 1;
        stats.record(&done.exchange);
    }
}

/// Poll the connection's driver, or never complete when there is no connection.
pub(crate) async fn drive(driver: &mut Option<Driver>) -> Result<(), hyper::Error> {
    match driver {
        Some(driver) => driver.await,
        None => std::future::pending().await,
    }
}

/// Wait until `due`, then make sure there is a connection ready to take a request (with a
/// new connection per request, the request makes its own).
async fn prepare(
    sender: &mut Option<Sender>,
    timer: &mut Timer,
    due: Option<Instant>,
    addr: SocketAddr,
    protocol: Protocol,
    new_connection: bool,
) -> Step {
    if let Some(due) = due {
        timer.sleep_until(due).await;
    }
    if new_connection {
        return Step::Ready;
    }
    match sender {
        None => match link::connect(addr, protocol).await {
            Ok(link) => Step::Connected(link),
            Err(_) => Step::Failed(Failure::Connect),
        },
        Some(sender) => match sender.ready().await {
            Ok(()) => Step::Ready,
            Err(_) => Step::Failed(Failure::Transport),
        },
    }
}

/// Send `request` on a connection of its own (connect time included).
async fn once(
    addr: SocketAddr,
    protocol: Protocol,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, Failure> {
    link::once(addr, protocol, request)
        .await
        .map_err(|err| match err {
            OnceError::Connect(_) => Failure::Connect,
            OnceError::Request(_) => Failure::Transport,
        })
}

/// Await the response head and read the body to its end; a gRPC call's status comes from
/// its trailers (or, trailers-only, its headers).
async fn exchange(
    response: impl Future<Output = Result<Response<Incoming>, Failure>>,
    intended: Instant,
    sent: Instant,
    measured: bool,
    grpc: bool,
) -> Done {
    let result = match response.await {
        Ok(response) => {
            let (head, mut body) = response.into_parts();
            let mut trailers = None;
            loop {
                match body.frame().await {
                    None => {
                        break Ok(Answer {
                            status: head.status,
                            grpc: grpc.then(|| grpc::Status::of(&head.headers, trailers.as_ref())),
                        })
                    }
                    Some(Ok(frame)) => {
                        if let Ok(map) = frame.into_trailers() {
                            trailers = Some(map);
                        }
                    }
                    Some(Err(_)) => break Err(Failure::Transport),
                }
            }
        }
        Err(failure) => Err(failure),
    };
    Done {
        exchange: Exchange {
            intended,
            sent,
            finished: Instant::now(),
            result,
        },
        measured,
    }
}
