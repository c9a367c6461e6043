//! The real maintenance server in-process, on `127.0.0.1:0`, in the test's
//! tokio runtime.

use std::net::SocketAddr;
use std::time::Duration;

use maintenance_server::settings::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vpnnat::messages::paths;

/// How long [`InProcessServer::stop`] waits for the server to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A maintenance server running in this test's runtime; told to stop on drop.
pub struct InProcessServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://` + [`Self::addr`].
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcessServer {
    /// Starts the server with `settings` and waits until `/healthz` answers.
    pub async fn start(settings: Settings) -> Self {
        Self::start_at(settings, "127.0.0.1:0".parse().unwrap()).await
    }

    /// [`Self::start`] on `addr` (a stopped server's, to start it again
    /// where its clients look for it).
    pub async fn start_at(settings: Settings, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(maintenance_server::launch_with_listener(
            settings,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        let base = format!("http://{addr}");
        let http = reqwest::Client::new();
        for _ in 0..400 {
            if http
                .get(format!("{base}{}", paths::HEALTH))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            assert!(!task.is_finished(), "the server stopped while starting");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Self {
            addr,
            base,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits for it; returns what it returned (an
    /// error too when it panicked or did not stop in time). A second call
    /// returns `Ok`.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(STOP_TIMEOUT, t)
                .await
                .map_err(|_| anyhow::anyhow!("the server did not stop within {STOP_TIMEOUT:?}"))?
                .map_err(|e| anyhow::anyhow!("the server task failed: {e}"))?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
