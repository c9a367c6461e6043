use std::time::{Duration, Instant};

use super::*;
use crate::messages::AppliedState;

/// A document that is nothing but its version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Doc(u64);

impl DesiredDocument for Doc {
    fn version(&self) -> u64 {
        self.0
    }
}

const WAIT: Duration = Duration::from_secs(25);

fn agent(now: Instant) -> Follower<Doc> {
    Follower::new(
        FollowerConfig {
            wait: WAIT,
            register: false,
            heartbeat: false,
            seed: 7,
        },
        now,
    )
}

fn gateway(now: Instant) -> Follower<Doc> {
    Follower::new(
        FollowerConfig {
            wait: WAIT,
            register: true,
            heartbeat: true,
            seed: 7,
        },
        now,
    )
}

fn applied(version: u64) -> AppliedState {
    AppliedState {
        version,
        errors: Vec::new(),
    }
}

fn unknown(status: u16) -> CallFailure {
    CallFailure::Status {
        status,
        code: "unauthorized".into(),
        message: "who are you".into(),
    }
}

/// Takes the next request, which must be a poll, and returns its ticket and `after`.
fn expect_poll(f: &mut Follower<Doc>, now: Instant) -> (Ticket, u64) {
    match f.poll_request(now) {
        Some(Request {
            ticket,
            call: Call::Poll { after, wait },
        }) => {
            assert_eq!(wait, WAIT);
            assert_eq!(ticket.lane(), Lane::State);
            (ticket, after)
        }
        other => panic!("expected a poll, got {other:?}"),
    }
}

/// Polls, answers with `doc`, and returns what the follower hands to the data plane.
fn poll_and_answer(f: &mut Follower<Doc>, doc: u64, now: Instant) -> Option<Doc> {
    let (ticket, _) = expect_poll(f, now);
    f.handle_reply(ticket, Reply::Document(Doc(doc)), now);
    f.poll_apply()
}

fn registered(f: &mut Follower<Doc>, now: Instant) {
    let r = f.poll_request(now).unwrap();
    assert_eq!(r.call, Call::Register);
    f.handle_reply(
        r.ticket,
        Reply::Registered {
            heartbeat_interval: Duration::from_secs(1),
        },
        now,
    );
}

#[test]
fn the_first_document_is_applied_even_at_version_zero_and_the_cursor_follows() {
    let now = Instant::now();
    let mut f = agent(now);
    assert_eq!(f.cursor(), None);
    let (_, after) = expect_poll(&mut f, now);
    assert_eq!(after, 0, "the first poll asks for everything");
    assert!(f.poll_request(now).is_none(), "one state call at a time");
    let mut f = agent(now);
    assert_eq!(poll_and_answer(&mut f, 0, now), Some(Doc(0)));
    f.handle_applied(0, Some(applied(0)), now);
    assert_eq!(f.cursor(), Some(0));
    // Report, then poll with the cursor; a version-0 answer is now a timeout.
    let report = f.poll_request(now).unwrap();
    assert_eq!(report.call, Call::ReportApplied(applied(0)));
    f.handle_reply(report.ticket, Reply::Accepted, now);
    assert_eq!(poll_and_answer(&mut f, 0, now), None);
    let (_, after) = expect_poll(&mut f, now);
    assert_eq!(after, 0);
}

#[test]
fn older_or_equal_versions_are_timeouts_and_a_refused_document_still_moves_the_cursor() {
    let now = Instant::now();
    let mut f = agent(now);
    assert_eq!(poll_and_answer(&mut f, 5, now), Some(Doc(5)));
    f.handle_applied(5, Some(applied(5)), now);
    let report = f.poll_request(now).unwrap();
    f.handle_reply(report.ticket, Reply::Accepted, now);
    assert_eq!(poll_and_answer(&mut f, 5, now), None, "equal: nothing new");
    assert_eq!(poll_and_answer(&mut f, 3, now), None, "older: nothing new");
    assert_eq!(poll_and_answer(&mut f, 6, now), Some(Doc(6)));
    // The data plane refuses 6 (it runs something newer): no report, cursor moves.
    f.handle_applied(6, None, now);
    assert_eq!(f.cursor(), Some(6));
    let (_, after) = expect_poll(&mut f, now);
    assert_eq!(after, 6);
}

#[test]
fn each_applied_version_is_reported_once() {
    let now = Instant::now();
    let mut f = agent(now);
    assert_eq!(poll_and_answer(&mut f, 3, now), Some(Doc(3)));
    f.handle_applied(3, Some(applied(3)), now);
    let report = f.poll_request(now).unwrap();
    assert_eq!(report.call, Call::ReportApplied(applied(3)));
    // A failed report is not repeated; the next call is the poll.
    f.handle_reply(
        report.ticket,
        Reply::Failed(CallFailure::Transport("down".into())),
        now,
    );
    let (_, after) = expect_poll(&mut f, now);
    assert_eq!(after, 3);
    // The same version handed back again is not reported again.
    f.handle_applied(3, Some(applied(3)), now);
    assert!(f.poll_request(now).is_none());
}

#[test]
fn failures_back_off_growing_to_the_cap_and_a_success_resets() {
    let start = Instant::now();
    let mut f = agent(start);
    let mut now = start;
    let mut delays = Vec::new();
    for _ in 0..8 {
        let (ticket, _) = expect_poll(&mut f, now);
        f.handle_reply(
            ticket,
            Reply::Failed(CallFailure::Timeout("slow".into())),
            now,
        );
        let at = f.poll_timeout().unwrap();
        assert!(f.poll_request(now).is_none(), "nothing before the delay");
        delays.push(at - now);
        now = at;
    }
    for (i, d) in delays.iter().enumerate() {
        let exp = (RETRY_INITIAL * (1 << i)).min(RETRY_MAX);
        assert!(*d >= exp / 2 && *d <= exp, "attempt {i}: {d:?}");
    }
    assert!(delays[7] >= RETRY_MAX / 2);
    assert!(!f.connected());
    // A success resets: the next failure waits about the first delay again.
    let (ticket, _) = expect_poll(&mut f, now);
    f.handle_reply(ticket, Reply::Document(Doc(1)), now);
    assert!(f.connected());
    f.poll_apply().unwrap();
    f.handle_applied(1, None, now);
    let (ticket, _) = expect_poll(&mut f, now);
    f.handle_reply(
        ticket,
        Reply::Failed(CallFailure::Decode("junk".into())),
        now,
    );
    assert!(f.poll_timeout().unwrap() - now <= RETRY_INITIAL);
}

#[test]
fn events_tell_connected_once_and_every_failure() {
    let now = Instant::now();
    let mut f = agent(now);
    let (t, _) = expect_poll(&mut f, now);
    f.handle_reply(
        t,
        Reply::Failed(CallFailure::Transport("refused".into())),
        now,
    );
    assert_eq!(
        f.poll_event(),
        Some(FollowerEvent::Disconnected(CallFailure::Transport(
            "refused".into()
        )))
    );
    let later = f.poll_timeout().unwrap();
    assert_eq!(poll_and_answer(&mut f, 1, later), Some(Doc(1)));
    f.handle_applied(1, None, later);
    assert_eq!(poll_and_answer(&mut f, 1, later), None);
    assert_eq!(f.poll_event(), Some(FollowerEvent::Connected));
    assert_eq!(f.poll_event(), None, "connected is told once");
}

#[test]
fn the_agent_does_not_register_and_a_refused_credential_is_a_failure() {
    let now = Instant::now();
    let mut f = agent(now);
    let (t, _) = expect_poll(&mut f, now);
    f.handle_reply(t, Reply::Failed(unknown(401)), now);
    let event = f.poll_event().unwrap();
    assert!(
        matches!(&event, FollowerEvent::Disconnected(e) if e.is_unauthorized()),
        "{event:?}"
    );
    let later = f.poll_timeout().unwrap();
    let (_, after) = expect_poll(&mut f, later);
    assert_eq!(after, 0);
}

#[test]
fn the_gateway_registers_first_and_again_on_401_or_404_keeping_its_cursor() {
    let now = Instant::now();
    let mut f = gateway(now);
    let r = f.poll_request(now).unwrap();
    assert_eq!(r.call, Call::Register);
    assert!(f.poll_request(now).is_none(), "nothing before registration");
    // A failed registration is retried after a delay.
    f.handle_reply(r.ticket, Reply::Failed(unknown(404)), now);
    assert!(matches!(
        f.poll_event(),
        Some(FollowerEvent::Disconnected(_))
    ));
    let retry = f.poll_timeout().unwrap();
    assert!(retry > now && retry - now <= RETRY_INITIAL);
    registered(&mut f, retry);
    assert_eq!(f.poll_event(), Some(FollowerEvent::Connected));
    // Then the long-poll and the first heartbeat go out together.
    let (poll, _) = expect_poll(&mut f, retry);
    let beat = f.poll_request(retry).unwrap();
    assert_eq!(
        (beat.call, beat.ticket.lane()),
        (Call::Heartbeat, Lane::Heartbeat)
    );
    f.handle_reply(poll, Reply::Document(Doc(4)), retry);
    f.poll_apply().unwrap();
    f.handle_applied(4, None, retry);
    let (poll, after) = expect_poll(&mut f, retry);
    assert_eq!(after, 4);

    // The heartbeat learns that the server forgot us (401).
    f.handle_reply(beat.ticket, Reply::Failed(unknown(401)), retry);
    assert!(matches!(f.poll_event(), Some(FollowerEvent::Forgotten(_))));
    assert!(!f.is_current(poll), "the old session's calls are abandoned");
    // Its long-poll answers late: stale, ignored.
    f.handle_reply(poll, Reply::Document(Doc(9)), retry);
    assert_eq!(f.poll_apply(), None);
    assert!(
        f.poll_request(retry).is_none(),
        "registering waits a moment"
    );
    let again = f.poll_timeout().unwrap();
    registered(&mut f, again);
    let (poll, after) = expect_poll(&mut f, again);
    assert_eq!(after, 4, "the cursor survives registering again");
    let beat = f.poll_request(again).unwrap();
    assert_eq!(beat.call, Call::Heartbeat);

    // An accepted heartbeat: the next one after the interval.
    f.handle_reply(beat.ticket, Reply::Accepted, again);
    assert_eq!(f.poll_timeout(), Some(again + Duration::from_secs(1)));
    let later = again + Duration::from_secs(1);
    let beat = f.poll_request(later).unwrap();
    assert_eq!(beat.call, Call::Heartbeat);
    // A failed one: retried no sooner than half the interval.
    f.handle_reply(
        beat.ticket,
        Reply::Failed(CallFailure::Transport("x".into())),
        later,
    );
    let next = f.poll_timeout().unwrap();
    assert!(next - later >= Duration::from_millis(500) && next - later <= Duration::from_secs(1));

    // The long-poll learns it too (404): registering again.
    f.handle_reply(poll, Reply::Failed(unknown(404)), later);
    assert!(matches!(
        f.poll_event(),
        Some(FollowerEvent::Disconnected(_))
    ));
    assert!(matches!(f.poll_event(), Some(FollowerEvent::Forgotten(_))));
    let again = f.poll_timeout().unwrap();
    assert_eq!(f.poll_request(again).map(|r| r.call), Some(Call::Register));
}

#[test]
fn a_document_applied_while_registering_again_is_not_reported_until_registered() {
    let now = Instant::now();
    let mut f = gateway(now);
    registered(&mut f, now);
    let (poll, _) = expect_poll(&mut f, now);
    let beat = f.poll_request(now).unwrap();
    f.handle_reply(poll, Reply::Document(Doc(2)), now);
    let doc = f.poll_apply().unwrap();
    f.handle_reply(beat.ticket, Reply::Failed(unknown(403)), now);
    f.handle_applied(doc.0, Some(applied(2)), now);
    assert_eq!(f.cursor(), Some(2));
    let again = f.poll_timeout().unwrap();
    registered(&mut f, again);
    let (_, after) = expect_poll(&mut f, again);
    assert_eq!(after, 2);
}
