//! One connection's share of the load: send on schedule, collect responses, reconnect when
//! the connection dies, and stop on time. One task per connection; nothing shared.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::Protocol;
use crate::link::{self, Driver, Link, Sender};
use crate::request::RequestTemplate;
use crate::schedule::{Lane, Schedule};
use crate::stats::{Exchange, Failure, Stats};
use crate::timer::Timer;

/// In a closed loop, wait this long after a failed connect before trying again.
const CLOSED_LOOP_BACKOFF: Duration = Duration::from_millis(10);

/// Everything one connection task needs.
pub struct LaneTask {
    pub link: Link,
    pub lane: Lane,
    pub schedule: Schedule,
    pub template: Arc<RequestTemplate>,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Most requests in flight at once on this connection.
    pub inflight: usize,
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

/// Run the lane until the schedule's stop, then wait for outstanding responses until its
/// hard stop; measured requests still unanswered then are counted as timeouts.
pub async fn run(task: LaneTask) -> Stats {
    let LaneTask {
        link,
        lane,
        schedule,
        template,
        addr,
        protocol,
        inflight: max_inflight,
    } = task;
    let mut stats = Stats::new();
    let mut timer = Timer::new();
    let mut sender = Some(link.sender);
    let mut driver = Some(link.driver);
    let mut inflight = FuturesUnordered::new();
    // Measured requests sent and not yet answered.
    let mut outstanding: u64 = 0;
    let mut next = lane.first;
    // Closed loop only: do not reconnect before this.
    let mut not_before: Option<Instant> = None;

    let stop = tokio::time::sleep_until(schedule.stop().into());
    tokio::pin!(stop);
    loop {
        let due = schedule.due(next);
        if due.is_some_and(|due| due >= schedule.stop()) {
            break;
        }
        let room = inflight.len() < max_inflight;
        tokio::select! {
            biased;
            () = &mut stop => break,
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                settle(&mut stats, &mut outstanding, &done);
            }
            _ = drive(&mut driver) => {
                // Closed by the peer or failed: requests still on it fail by themselves.
                driver = None;
                sender = None;
            }
            step = prepare(&mut sender, &mut timer, due.or(not_before), addr, protocol), if room => {
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
                        if let Some(sender) = sender.as_mut() {
                            let sent = Instant::now();
                            let intended = due.unwrap_or(sent);
                            let measured = schedule.measures(intended);
                            outstanding += u64::from(measured);
                            let response = sender.send(template.build());
                            inflight.push(exchange(response, intended, sent, measured));
                            next += lane.step;
                            not_before = None;
                        }
                    }
                }
            }
        }
    }

    // Drain: no more sends; wait for what is out, but not past the hard stop.
    let hard_stop = tokio::time::sleep_until(schedule.hard_stop().into());
    tokio::pin!(hard_stop);
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
    let mut timeouts = outstanding;
    while let Some(due) = schedule.due(next).filter(|due| *due < schedule.stop()) {
        timeouts += u64::from(schedule.measures(due));
        next += lane.step;
    }
    stats.fail(Failure::Timeout, timeouts);
    stats
}

fn settle(stats: &mut Stats, outstanding: &mut u64, done: &Done) {
    if done.measured {
        *outstanding -= 1;
        stats.record(&done.exchange);
    }
}

/// Poll the connection's driver, or never complete when there is no connection.
async fn drive(driver: &mut Option<Driver>) -> Result<(), hyper::Error> {
    match driver {
        Some(driver) => driver.await,
        None => std::future::pending().await,
    }
}

/// Wait until `due`, then make sure there is a connection ready to take a request.
async fn prepare(
    sender: &mut Option<Sender>,
    timer: &mut Timer,
    due: Option<Instant>,
    addr: SocketAddr,
    protocol: Protocol,
) -> Step {
    if let Some(due) = due {
        timer.sleep_until(due).await;
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

/// Await the response head and read the body to its end.
async fn exchange(
    response: impl Future<Output = Result<Response<Incoming>, hyper::Error>>,
    intended: Instant,
    sent: Instant,
    measured: bool,
) -> Done {
    let result = match response.await {
        Ok(response) => {
            let status = response.status();
            let mut body = response.into_body();
            loop {
                match body.frame().await {
                    None => break Ok(status),
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break Err(Failure::Transport),
                }
            }
        }
        Err(_) => Err(Failure::Transport),
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
