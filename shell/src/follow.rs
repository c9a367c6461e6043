//! The async driver of the core's desired-state follower
//! ([`vpnnat::control::Follower`]): it makes the calls the follower asks for,
//! at most one per lane at a time, hands new documents to the data plane,
//! and sleeps until the follower's next timeout. The program says how each
//! call is made and how a document is applied ([`ControlCalls`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio::sync::watch;
use vpnnat::control::{
    Call, DesiredDocument, Follower, FollowerEvent, Lane, Reply, Request, Ticket,
};
use vpnnat::messages::AppliedState;

/// What a program does for its follower.
pub trait ControlCalls: Sync {
    /// The program's desired-state document.
    type Document: DesiredDocument + Send;

    /// Makes `call` and says how it ended. `Err` stops the follower (the data
    /// plane is gone); a failed call is `Ok(Reply::Failed(..))`.
    fn call(
        &self,
        call: Call,
    ) -> impl Future<Output = anyhow::Result<Reply<Self::Document>>> + Send;

    /// Applies a new document to the data plane: what was applied, or `None`
    /// when the data plane runs something newer. `Err` stops the follower.
    fn apply(
        &self,
        document: Self::Document,
    ) -> impl Future<Output = anyhow::Result<Option<AppliedState>>> + Send;

    /// Shows or logs what the follower tells.
    fn event(&self, event: &FollowerEvent);
}

type CallFuture<'a, D> = Pin<Box<dyn Future<Output = anyhow::Result<Reply<D>>> + Send + 'a>>;
type InFlight<'a, D> = Option<(Ticket, CallFuture<'a, D>)>;

/// Drives `follower` until `shutdown` turns true.
///
/// # Errors
/// When a call or an apply says the data plane is gone.
pub async fn follow<C: ControlCalls>(
    calls: &C,
    mut follower: Follower<C::Document>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut state_lane: InFlight<'_, C::Document> = None;
    let mut heartbeat_lane: InFlight<'_, C::Document> = None;
    loop {
        while let Some(event) = follower.poll_event() {
            calls.event(&event);
        }
        if let Some(document) = follower.poll_apply() {
            let version = document.version();
            let applied = calls.apply(document).await?;
            follower.handle_applied(version, applied, Instant::now());
            continue;
        }
        // A call of a session that ended is dropped, which cancels it.
        for lane in [&mut state_lane, &mut heartbeat_lane] {
            if lane.as_ref().is_some_and(|(t, _)| !follower.is_current(*t)) {
                *lane = None;
            }
        }
        while let Some(Request { ticket, call }) = follower.poll_request(Instant::now()) {
            let future: CallFuture<'_, C::Document> = Box::pin(calls.call(call));
            let in_flight = Some((ticket, future));
            match ticket.lane() {
                Lane::State => state_lane = in_flight,
                Lane::Heartbeat => heartbeat_lane = in_flight,
            }
        }
        let deadline = follower.poll_timeout();
        let (ticket, reply) = tokio::select! {
            r = finish(&mut state_lane) => r,
            r = finish(&mut heartbeat_lane) => r,
            () = sleep_until(deadline) => continue,
            _ = shutdown.changed() => return Ok(()),
        };
        follower.handle_reply(ticket, reply?, Instant::now());
    }
}

/// The lane's call's end (never, for an empty lane); empties the lane.
async fn finish<D>(lane: &mut InFlight<'_, D>) -> (Ticket, anyhow::Result<Reply<D>>) {
    let Some((ticket, call)) = lane else {
        return std::future::pending().await;
    };
    let ticket = *ticket;
    let reply = call.await;
    *lane = None;
    (ticket, reply)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use vpnnat::control::{CallFailure, FollowerConfig};

    #[derive(Debug)]
    struct Doc(u64);

    impl DesiredDocument for Doc {
        fn version(&self) -> u64 {
            self.0
        }
    }

    /// A server that has version 2, answers each poll at once, and fails the
    /// first call; records what happens.
    #[derive(Default)]
    struct Scripted {
        log: Mutex<Vec<String>>,
        stop: Mutex<Option<watch::Sender<bool>>>,
    }

    impl Scripted {
        fn note(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
    }

    impl ControlCalls for Scripted {
        type Document = Doc;

        async fn call(&self, call: Call) -> anyhow::Result<Reply<Doc>> {
            let n = self.log.lock().unwrap().len();
            self.note(format!("{call:?}"));
            Ok(match call {
                Call::Poll { .. } if n == 0 => {
                    Reply::Failed(CallFailure::Transport("refused".into()))
                }
                Call::Poll { after, .. } if after >= 2 => {
                    // Nothing new: done.
                    if let Some(stop) = self.stop.lock().unwrap().take() {
                        let _ = stop.send(true);
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Reply::Document(Doc(2))
                }
                Call::Poll { .. } => Reply::Document(Doc(2)),
                Call::ReportApplied(_) => Reply::Accepted,
                Call::Register | Call::Heartbeat => anyhow::bail!("not used"),
            })
        }

        async fn apply(&self, document: Doc) -> anyhow::Result<Option<AppliedState>> {
            self.note(format!("apply {}", document.0));
            Ok(Some(AppliedState {
                version: document.0,
                errors: Vec::new(),
            }))
        }

        fn event(&self, event: &FollowerEvent) {
            self.note(format!("{event:?}"));
        }
    }

    #[tokio::test]
    async fn polls_applies_reports_and_retries_after_a_failure() {
        let (tx, mut rx) = watch::channel(false);
        let calls = Scripted::default();
        *calls.stop.lock().unwrap() = Some(tx);
        let follower = Follower::new(
            FollowerConfig {
                wait: Duration::from_secs(1),
                register: false,
                heartbeat: false,
                seed: 1,
            },
            Instant::now(),
        );
        tokio::time::timeout(Duration::from_secs(10), follow(&calls, follower, &mut rx))
            .await
            .expect("stops at shutdown")
            .unwrap();
        let log = calls.log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                "Poll { after: 0, wait: 1s }",
                "Disconnected(Transport(\"refused\"))",
                "Poll { after: 0, wait: 1s }",
                "Connected",
                "apply 2",
                "ReportApplied(AppliedState { version: 2, errors: [] })",
                "Poll { after: 2, wait: 1s }",
            ]
        );
    }
}
