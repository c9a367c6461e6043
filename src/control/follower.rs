//! The desired-state follower: a state machine with `handle_*(…, now)` inputs
//! and `poll_*` outputs, driven by the gateway and the router agent.
//!
//! # The cursor
//!
//! The server answers `GET …/state?after=V&wait_ms=W` as soon as its document's
//! version exceeds `V`, or after `W` with whatever it has then. So a document
//! whose version is not above the cursor is the long-poll's *timeout* answer
//! ("nothing new") and is a no-op. The rule, for both programs:
//!
//! - The cursor is `None` after every (re)start, and the first poll asks with
//!   `after=0`: the first document is always handed to the data plane, so the
//!   running state comes from the server, never from anything kept locally.
//!   (The data plane itself refuses a document that is not newer than what it
//!   runs.)
//! - Once a document has been handed to the data plane and the data plane has
//!   answered (applied it, or refused it as not newer), the cursor is the
//!   highest such version. A document whose version is ≤ the cursor is a no-op.
//! - The cursor survives registering again: the data plane keeps running what
//!   it has, and the server's versions keep counting.
//!
//! `None` and `Some(0)` differ on purpose: a version-0 document (a site or
//! gateway with nothing to run yet) is applied once, and afterwards a version-0
//! answer is a timeout like any other, not a reason to apply it again.
//!
//! # Staleness
//!
//! Every call carries a [`Ticket`] naming the session it belongs to. When the
//! server no longer knows us (401, 403 or 404) and we register again, the
//! session changes: replies to the old session's calls are stale and ignored,
//! and the shell drops those calls ([`Follower::is_current`]).
//!
//! # Lanes
//!
//! Calls travel on two lanes, each with at most one call in flight: the
//! *state* lane (register, long-poll, applied report; strictly in turn) and
//! the *heartbeat* lane (the gateway's capacity and counters, at the interval
//! the registration answer names). A failure backs the lane off
//! ([`crate::backoff::Backoff`]); a success resets it.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::messages::{AgentDesiredState, AppliedState, GatewayDesiredState};

/// A desired-state document: all the follower needs of it is its version.
pub trait DesiredDocument {
    /// The version (the server counts it up with every change).
    fn version(&self) -> u64;
}

impl DesiredDocument for GatewayDesiredState {
    fn version(&self) -> u64 {
        self.version
    }
}

impl DesiredDocument for AgentDesiredState {
    fn version(&self) -> u64 {
        self.version
    }
}

/// The first delay after a failed call; delays double up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_millis(200);
/// The longest delay between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// Heartbeat intervals the server may ask for are clamped to this range.
const HEARTBEAT_RANGE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(60));

/// How a follower behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerConfig {
    /// How long the server may hold a long-poll.
    pub wait: Duration,
    /// Register first, and again whenever the server no longer knows us
    /// (the gateway). Without it (the agent, whose enrollment is separate)
    /// 401/403/404 are failures like any other.
    pub register: bool,
    /// Heartbeat at the interval the registration answer names (needs `register`).
    pub heartbeat: bool,
    /// Seeds the backoff jitter.
    pub seed: u64,
}

/// The two lanes of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Register, long-poll, applied report: one after the other.
    State,
    /// Heartbeats.
    Heartbeat,
}

/// Names the session and lane a call belongs to; give it back with the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    session: u32,
    lane: Lane,
}

impl Ticket {
    /// The lane the call travels on.
    pub fn lane(&self) -> Lane {
        self.lane
    }
}

/// A call the shell makes for the follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Register with the server.
    Register,
    /// Long-poll the desired state: `?after={after}&wait_ms={wait}`.
    Poll {
        /// The cursor (`0` before the first document).
        after: u64,
        /// How long the server may hold the call.
        wait: Duration,
    },
    /// Report what the data plane applied.
    ReportApplied(AppliedState),
    /// Send a heartbeat.
    Heartbeat,
}

/// What [`Follower::poll_request`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Give it back with the reply.
    pub ticket: Ticket,
    /// The call to make.
    pub call: Call,
}

/// How a call ended, as the shell tells [`Follower::handle_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<D> {
    /// The registration was accepted.
    Registered {
        /// How often the server wants heartbeats.
        heartbeat_interval: Duration,
    },
    /// A desired-state document (new or the long-poll's timeout answer).
    Document(D),
    /// An applied report or a heartbeat was accepted.
    Accepted,
    /// The call brought no usable answer.
    Failed(CallFailure),
}

/// Why a control-plane call brought no usable answer (the shell maps its
/// HTTP client's error to this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The server could not be reached, or the connection broke.
    Transport(String),
    /// No answer in time.
    Timeout(String),
    /// An HTTP error status with the server's error code and message.
    Status {
        /// The HTTP status.
        status: u16,
        /// The server's machine-readable code (`unauthorized`, …).
        code: String,
        /// The server's sentence.
        message: String,
    },
    /// The answer could not be decoded.
    Decode(String),
    /// A well-formed answer the program refuses (e.g. a document for another gateway).
    Rejected(String),
}

impl CallFailure {
    /// 401, 403 or 404: the server does not know us (any more).
    pub fn is_unknown(&self) -> bool {
        matches!(
            self,
            Self::Status {
                status: 401 | 403 | 404,
                ..
            }
        )
    }

    /// 401 or 403: the server refuses our credential.
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            Self::Status {
                status: 401 | 403,
                ..
            }
        )
    }
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(m) | Self::Timeout(m) | Self::Decode(m) | Self::Rejected(m) => {
                f.write_str(m)
            }
            Self::Status { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for CallFailure {}

/// What the shell shows or logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowerEvent {
    /// The first successful answer after a start or after failures.
    Connected,
    /// A call failed (every failure; the follower retries by itself).
    Disconnected(CallFailure),
    /// The server no longer knows us; registering again.
    Forgotten(CallFailure),
}

#[derive(Debug)]
enum Registration {
    /// Registered (or not registering at all).
    Done,
    /// Register at this instant.
    At(Instant),
    /// The registration call is out.
    Waiting,
}

#[derive(Debug)]
enum StateLane<D> {
    /// Waiting for the registration.
    Parked,
    /// Long-poll at this instant.
    PollAt(Instant),
    /// The long-poll is out.
    Polling,
    /// A new document for [`Follower::poll_apply`].
    NewDocument(D),
    /// The shell applies the document of this version.
    Applying(u64),
    /// Report this.
    Report(AppliedState),
    /// The report is out.
    Reporting,
}

#[derive(Debug)]
enum HeartbeatLane {
    Off,
    At(Instant),
    Waiting,
}

/// The desired-state follower of one program (see the module documentation).
#[derive(Debug)]
pub struct Follower<D> {
    config: FollowerConfig,
    session: u32,
    registration: Registration,
    state: StateLane<D>,
    heartbeat: HeartbeatLane,
    heartbeat_interval: Duration,
    cursor: Option<u64>,
    reported: Option<u64>,
    connected: bool,
    register_backoff: Backoff,
    poll_backoff: Backoff,
    heartbeat_backoff: Backoff,
    events: VecDeque<FollowerEvent>,
}

impl<D: DesiredDocument> Follower<D> {
    /// A follower that starts now: registering, or polling with `after=0`.
    pub fn new(config: FollowerConfig, now: Instant) -> Self {
        let (registration, state) = if config.register {
            (Registration::At(now), StateLane::Parked)
        } else {
            (Registration::Done, StateLane::PollAt(now))
        };
        Self {
            config,
            session: 0,
            registration,
            state,
            heartbeat: HeartbeatLane::Off,
            heartbeat_interval: RETRY_MAX,
            cursor: None,
            reported: None,
            connected: false,
            register_backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX, config.seed),
            poll_backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX, config.seed ^ 0xa5),
            heartbeat_backoff: Backoff::new(RETRY_MAX, RETRY_MAX, config.seed ^ 0x5a),
            events: VecDeque::new(),
        }
    }

    /// The highest version the data plane has settled (see "The cursor").
    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// Whether the last answer was a success.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether a call with this ticket still matters; the shell drops the
    /// calls that do not (their session ended when we registered again).
    pub fn is_current(&self, ticket: Ticket) -> bool {
        ticket.session == self.session
    }

    /// The next call to make now, if any. Call until `None`.
    pub fn poll_request(&mut self, now: Instant) -> Option<Request> {
        if matches!(self.registration, Registration::At(t) if t <= now) {
            self.registration = Registration::Waiting;
            return Some(self.request(Lane::State, Call::Register));
        }
        let registered = matches!(self.registration, Registration::Done);
        match std::mem::replace(&mut self.state, StateLane::Polling) {
            StateLane::PollAt(t) if registered && t <= now => {
                let after = self.cursor.unwrap_or(0);
                let wait = self.config.wait;
                return Some(self.request(Lane::State, Call::Poll { after, wait }));
            }
            StateLane::Report(applied) if registered => {
                self.state = StateLane::Reporting;
                return Some(self.request(Lane::State, Call::ReportApplied(applied)));
            }
            other => self.state = other,
        }
        if matches!(self.heartbeat, HeartbeatLane::At(t) if t <= now) {
            self.heartbeat = HeartbeatLane::Waiting;
            return Some(self.request(Lane::Heartbeat, Call::Heartbeat));
        }
        None
    }

    /// When [`Follower::poll_request`] will next have a call (`None`: only
    /// after a reply or an applied document).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let registration = match self.registration {
            Registration::At(t) => Some(t),
            Registration::Done | Registration::Waiting => None,
        };
        let state = match self.state {
            StateLane::PollAt(t) => Some(t),
            _ => None,
        };
        let heartbeat = match self.heartbeat {
            HeartbeatLane::At(t) => Some(t),
            HeartbeatLane::Off | HeartbeatLane::Waiting => None,
        };
        [registration, state, heartbeat].into_iter().flatten().min()
    }

    /// The reply to the call of `ticket`.
    pub fn handle_reply(&mut self, ticket: Ticket, reply: Reply<D>, now: Instant) {
        if !self.is_current(ticket) {
            tracing::debug!(?ticket, "stale control-plane reply ignored");
            return;
        }
        match (ticket.lane, reply) {
            (lane, Reply::Failed(failure)) => self.failed(lane, failure, now),
            (Lane::State, Reply::Registered { heartbeat_interval })
                if matches!(self.registration, Registration::Waiting) =>
            {
                self.registered(heartbeat_interval, now);
            }
            (Lane::State, Reply::Document(doc)) if matches!(self.state, StateLane::Polling) => {
                self.poll_backoff.reset();
                self.contact();
                self.state = if self.cursor.is_some_and(|c| doc.version() <= c) {
                    // The long-poll's timeout answer: nothing new.
                    StateLane::PollAt(now)
                } else {
                    StateLane::NewDocument(doc)
                };
            }
            (Lane::State, Reply::Accepted) if matches!(self.state, StateLane::Reporting) => {
                self.contact();
                self.state = StateLane::PollAt(now);
            }
            (Lane::Heartbeat, Reply::Accepted)
                if matches!(self.heartbeat, HeartbeatLane::Waiting) =>
            {
                self.heartbeat_backoff.reset();
                self.contact();
                self.heartbeat = HeartbeatLane::At(now + self.heartbeat_interval);
            }
            (lane, reply) => {
                tracing::debug!(
                    ?lane,
                    reply = reply_kind(&reply),
                    "unexpected control-plane reply ignored"
                );
            }
        }
    }

    /// A new document for the data plane; answer with
    /// [`Follower::handle_applied`].
    pub fn poll_apply(&mut self) -> Option<D> {
        match std::mem::replace(&mut self.state, StateLane::Polling) {
            StateLane::NewDocument(doc) => {
                self.state = StateLane::Applying(doc.version());
                Some(doc)
            }
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The data plane's answer to the document of `version`: what it applied,
    /// or `None` when it refused the document as not newer than what it runs.
    /// Each applied version is reported once.
    pub fn handle_applied(&mut self, version: u64, applied: Option<AppliedState>, now: Instant) {
        self.cursor = Some(self.cursor.map_or(version, |c| c.max(version)));
        if !matches!(self.state, StateLane::Applying(v) if v == version) {
            return;
        }
        if !matches!(self.registration, Registration::Done) {
            // The server forgot us meanwhile: nothing to report until we are registered again.
            self.state = StateLane::Parked;
            return;
        }
        self.state = match applied {
            Some(a) if self.reported.is_none_or(|r| version > r) => {
                self.reported = Some(version);
                StateLane::Report(a)
            }
            _ => StateLane::PollAt(now),
        };
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<FollowerEvent> {
        self.events.pop_front()
    }

    fn request(&self, lane: Lane, call: Call) -> Request {
        Request {
            ticket: Ticket {
                session: self.session,
                lane,
            },
            call,
        }
    }

    fn contact(&mut self) {
        if !self.connected {
            self.connected = true;
            self.events.push_back(FollowerEvent::Connected);
        }
    }

    fn registered(&mut self, heartbeat_interval: Duration, now: Instant) {
        self.registration = Registration::Done;
        self.register_backoff.reset();
        self.contact();
        self.heartbeat_interval = heartbeat_interval.clamp(HEARTBEAT_RANGE.0, HEARTBEAT_RANGE.1);
        // Never retry heartbeats faster than the interval the server asked for.
        self.heartbeat_backoff = Backoff::new(
            self.heartbeat_interval,
            RETRY_MAX.max(self.heartbeat_interval),
            self.config.seed ^ 0x5a,
        );
        self.state = StateLane::PollAt(now);
        if self.config.heartbeat {
            self.heartbeat = HeartbeatLane::At(now);
        }
    }

    fn failed(&mut self, lane: Lane, failure: CallFailure, now: Instant) {
        let registered = matches!(self.registration, Registration::Done);
        if self.config.register && registered && failure.is_unknown() {
            self.forget(failure, now);
            return;
        }
        self.connected = false;
        self.events.push_back(FollowerEvent::Disconnected(failure));
        match lane {
            Lane::State if matches!(self.registration, Registration::Waiting) => {
                self.registration = Registration::At(now + self.register_backoff.next_delay());
            }
            Lane::State => match self.state {
                StateLane::Polling => {
                    self.state = StateLane::PollAt(now + self.poll_backoff.next_delay());
                }
                // The report is not repeated: the next poll goes on at once.
                StateLane::Reporting => self.state = StateLane::PollAt(now),
                _ => {}
            },
            Lane::Heartbeat => {
                if matches!(self.heartbeat, HeartbeatLane::Waiting) {
                    self.heartbeat = HeartbeatLane::At(now + self.heartbeat_backoff.next_delay());
                }
            }
        }
    }

    /// The server no longer knows us: a new session, registering after a delay.
    fn forget(&mut self, failure: CallFailure, now: Instant) {
        self.session = self.session.wrapping_add(1);
        self.registration = Registration::At(now + self.register_backoff.next_delay());
        if !matches!(
            self.state,
            StateLane::NewDocument(_) | StateLane::Applying(_)
        ) {
            self.state = StateLane::Parked;
        }
        self.heartbeat = HeartbeatLane::Off;
        self.events.push_back(FollowerEvent::Forgotten(failure));
    }
}

fn reply_kind<D>(reply: &Reply<D>) -> &'static str {
    match reply {
        Reply::Registered { .. } => "registered",
        Reply::Document(_) => "document",
        Reply::Accepted => "accepted",
        Reply::Failed(_) => "failed",
    }
}
