//! One connection's share of a gRPC streaming load: a long-lived bidirectional call on which
//! every request is one message, sent on schedule, and its echo received. An echo server
//! answers in order, so each whole message that comes back answers the oldest one still out;
//! its latency runs from the message's intended send time, as for every other request.
//!
//! When the call ends or fails, the messages still out fail and the next send opens a new
//! call (and, if the connection died, a new connection first). After the last send the call
//! is half-closed, so the server can finish it, and the echoes still out are awaited until
//! the schedule's hard stop.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::channel::{self, Channel};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::Protocol;
use crate::grpc::MessageCounter;
use crate::lane::{drive, unsent, CLOSED_LOOP_BACKOFF};
use crate::link::{self, Link, Sender};
use crate::request::RequestTemplate;
use crate::schedule::{Lane, Schedule};
use crate::stats::{Answer, Exchange, Failure, Stats};
use crate::timer::Timer;

/// The request body of a call: messages handed over one by one.
pub type CallBody = Channel<Bytes>;

/// Most messages buffered between the lane and the connection.
const MAX_BUFFERED: usize = 64;

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

/// Everything one connection's streaming task needs.
pub struct StreamTask {
    pub link: Link<CallBody>,
    pub lane: Lane,
    pub schedule: Schedule,
    /// The call's request; its body is the message every send repeats.
    pub template: Arc<RequestTemplate>,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Most messages sent and not yet echoed.
    pub inflight: usize,
}

/// A message sent and not yet echoed.
struct Sent {
    intended: Instant,
    sent: Instant,
    measured: bool,
}

/// The receiving half of an open call.
enum Inbound {
    /// Waiting for the response head.
    Head(ResponseFuture),
    /// Reading echoed messages.
    Body(Incoming),
}

/// The open call, if any, and the messages out on it.
#[derive(Default)]
struct Call {
    /// Where messages go; dropping it half-closes the call.
    outbound: Option<channel::Sender<Bytes>>,
    inbound: Option<Inbound>,
    counter: MessageCounter,
    out: VecDeque<Sent>,
}

impl Call {
    fn is_open(&self) -> bool {
        self.inbound.is_some()
    }

    /// Account `count` echoes: each answers the oldest message out.
    fn echoed(&mut self, count: usize, stats: &mut Stats) {
        let finished = Instant::now();
        for _ in 0..count {
            let Some(sent) = self.out.pop_front() else {
                // More echoes than messages: not an echo server; nothing to match them to.
                return;
            };
            if sent.measured {
                stats.record(&Exchange {
                    intended: sent.intended,
                    sent: sent.sent,
                    finished,
                    result: Ok(Answer::http(StatusCode::OK)),
                });
            }
        }
    }

    /// Forget the call; the measured messages still out on it fail with `failure`.
    fn end(&mut self, failure: Failure, stats: &mut Stats) {
        stats.fail(failure, self.measured_out());
        *self = Call::default();
    }

    fn measured_out(&self) -> u64 {
        self.out.iter().filter(|sent| sent.measured).count() as u64
    }
}

/// What the receiving half produced.
enum Event {
    /// This many whole messages came back.
    Echoed(usize),
    /// The call ended (normally or not); messages still out will get no echo.
    Ended,
}

/// What is lost when getting ready to send fails.
enum Lost {
    Connection,
    Call,
}

/// What getting ready to send produced.
enum Step {
    /// A new connection (no call on it yet).
    Connected(Link<CallBody>),
    /// A new call (no message sent on it yet).
    Opened(channel::Sender<Bytes>, ResponseFuture),
    /// The message went out at this instant.
    Sent(Instant),
    /// The message could not be sent.
    Failed(Failure, Lost),
}

/// Run the lane until the schedule's stop, then wait for the echoes still out until its hard
/// stop; measured messages still unanswered then are counted as timeouts.
pub async fn run(task: StreamTask) -> Stats {
    let StreamTask {
        link,
        lane,
        schedule,
        template,
        addr,
        protocol,
        inflight: max_inflight,
    } = task;
    let message = template.body();
    let buffer = max_inflight.clamp(1, MAX_BUFFERED);
    let mut stats = Stats::new();
    let mut timer = Timer::new();
    let mut sender = Some(link.sender);
    let mut driver = Some(link.driver);
    let mut call = Call::default();
    let mut next = lane.first;
    // Closed loop only: do not try again before this.
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
        let room = call.out.len() < max_inflight;
        let ready = Ready {
            sender: &mut sender,
            outbound: &mut call.outbound,
            timer: &mut timer,
            due: due.or(not_before),
            addr,
            protocol,
            template: &template,
            message: &message,
            buffer,
        };
        tokio::select! {
            biased;
            () = &mut hard_stop => break,
            () = &mut stop, if due.is_none() => break,
            event = receive(&mut call.inbound, &mut call.counter), if call.inbound.is_some() => match event {
                Event::Echoed(count) => call.echoed(count, &mut stats),
                Event::Ended => call.end(Failure::Transport, &mut stats),
            },
            _ = drive(&mut driver) => {
                // Closed by the peer or failed: the call on it fails by itself.
                driver = None;
                sender = None;
            }
            step = ready.prepare(), if room => match step {
                Step::Connected(link) => {
                    sender = Some(link.sender);
                    driver = Some(link.driver);
                }
                Step::Opened(outbound, response) => {
                    // Whatever was still out on an earlier call will not come back now.
                    call.end(Failure::Transport, &mut stats);
                    call.outbound = Some(outbound);
                    call.inbound = Some(Inbound::Head(response));
                }
                Step::Sent(sent) => {
                    let intended = due.unwrap_or(sent);
                    let measured = schedule.measures(intended);
                    call.out.push_back(Sent { intended, sent, measured });
                    next += lane.step;
                    not_before = None;
                }
                Step::Failed(failure, lost) => {
                    if let Lost::Connection = lost {
                        sender = None;
                        driver = None;
                    }
                    call.end(Failure::Transport, &mut stats);
                    let now = Instant::now();
                    if schedule.measures(due.unwrap_or(now)) {
                        stats.fail(failure, 1);
                    }
                    if due.is_none() {
                        not_before = Some(now + CLOSED_LOOP_BACKOFF);
                    }
                    next += lane.step;
                }
            },
        }
    }

    // Drain: half-close the call so the server can finish it, and wait for the echoes still
    // out, but not past the hard stop.
    call.outbound = None;
    while !call.out.is_empty() && call.is_open() {
        tokio::select! {
            biased;
            () = &mut hard_stop => break,
            event = receive(&mut call.inbound, &mut call.counter) => match event {
                Event::Echoed(count) => call.echoed(count, &mut stats),
                Event::Ended => call.end(Failure::Transport, &mut stats),
            },
            _ = drive(&mut driver) => driver = None,
        }
    }

    // Measured messages still out, or due but never sent, got no echo in time.
    stats.fail(
        Failure::Timeout,
        call.measured_out() + unsent(&schedule, lane, next),
    );
    stats
}

/// Read the call until something happens: whole echoed messages, or its end. Never completes
/// when no call is open. Cancel-safe: the head future and the body persist in `inbound`.
async fn receive(inbound: &mut Option<Inbound>, counter: &mut MessageCounter) -> Event {
    loop {
        match inbound {
            None => return std::future::pending().await,
            Some(Inbound::Head(response)) => match response.await {
                Ok(head) if head.status() == StatusCode::OK => {
                    *inbound = Some(Inbound::Body(head.into_body()));
                }
                // Refused (or a trailers-only answer): no message will be echoed.
                Ok(_) | Err(_) => return Event::Ended,
            },
            Some(Inbound::Body(body)) => match body.frame().await {
                Some(Ok(frame)) => {
                    // Trailers end the call; the next poll sees the end.
                    if let Ok(data) = frame.into_data() {
                        let count = counter.push(&data);
                        if count > 0 {
                            return Event::Echoed(count);
                        }
                    }
                }
                Some(Err(_)) | None => return Event::Ended,
            },
        }
    }
}

/// What getting ready for the next message needs.
struct Ready<'a> {
    sender: &'a mut Option<Sender<CallBody>>,
    outbound: &'a mut Option<channel::Sender<Bytes>>,
    timer: &'a mut Timer,
    due: Option<Instant>,
    addr: SocketAddr,
    protocol: Protocol,
    template: &'a RequestTemplate,
    message: &'a Bytes,
    buffer: usize,
}

impl Ready<'_> {
    /// Wait until `due`, then take one step towards sending: connect, open a call, or send
    /// the message on the open call.
    async fn prepare(self) -> Step {
        if let Some(due) = self.due {
            self.timer.sleep_until(due).await;
        }
        let Some(sender) = self.sender else {
            return match link::connect(self.addr, self.protocol).await {
                Ok(link) => Step::Connected(link),
                Err(_) => Step::Failed(Failure::Connect, Lost::Connection),
            };
        };
        let Some(outbound) = self.outbound else {
            if sender.ready().await.is_err() {
                return Step::Failed(Failure::Transport, Lost::Connection);
            }
            let (outbound, body) = Channel::new(self.buffer);
            let response = sender.send(self.template.build_with(body));
            return Step::Opened(outbound, Box::pin(response));
        };
        // Cancel-safe: a message not taken by the channel is simply not sent.
        match outbound.send_data(self.message.clone()).await {
            Ok(()) => Step::Sent(Instant::now()),
            Err(_) => Step::Failed(Failure::Transport, Lost::Call),
        }
    }
}
