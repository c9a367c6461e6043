//! A data-plane worker: a thread with its own single-threaded runtime (the
//! packet path never waits for another task), started and spoken to through
//! a command channel.

use std::future::Future;
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};

/// Starts thread `name` with a current-thread runtime: `start` runs in the
/// runtime first (registering sockets and devices needs one), then `run`
/// with what it returned. Returns once `start` succeeded; its error is
/// returned instead when it failed.
///
/// # Errors
/// When the thread or the runtime cannot be created or `start` fails.
pub fn spawn<S, F, Fut>(
    name: String,
    start: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
    run: F,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>>
where
    F: FnOnce(S) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || -> anyhow::Result<()> {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return Err(e.into());
                }
            };
            rt.block_on(async move {
                let started = match start() {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                run(started).await
            })
        })
        .with_context(|| format!("starting thread {name}"))?;
    ready_rx
        .recv()
        .context("data plane thread ended during start")??;
    Ok(thread)
}

/// Sends the command `make(reply)` to a worker and waits for the reply.
///
/// # Errors
/// When the worker has stopped.
pub async fn request<C, R>(
    commands: &mpsc::Sender<C>,
    make: impl FnOnce(oneshot::Sender<R>) -> C,
) -> anyhow::Result<R> {
    let (reply, rx) = oneshot::channel();
    commands
        .send(make(reply))
        .await
        .map_err(|_| anyhow::anyhow!("data plane stopped"))?;
    rx.await.context("data plane stopped")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_failed_start_is_returned_and_a_worker_answers_requests() {
        let err = spawn(
            "t-fail".into(),
            || anyhow::bail!("no device") as anyhow::Result<()>,
            |()| async { Ok(()) },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("no device"), "{err:#}");

        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<u32>>(1);
        let thread = spawn(
            "t-echo".into(),
            || Ok(41),
            move |base| async move {
                while let Some(reply) = rx.recv().await {
                    let _ = reply.send(base + 1);
                }
                Ok(())
            },
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(request(&tx, |r| r)).unwrap(), 42);
        drop(tx);
        thread.join().unwrap().unwrap();
    }
}
