//! The maintenance server's agent API (`vpnnat::messages::paths::AGENT_*`),
//! authenticated with the site credential.

use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use vpnnat::messages::{
    AgentDesiredState, ApiError, AppliedState, FailureAccepted, FailureReport,
    MaintenanceRequestView, NewMaintenanceRequest, RequestId, paths,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server answered with an error document (passed on to the page).
    #[error("{}", .body.message)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The server's error.
        body: ApiError,
    },
    /// The server could not be reached or answered nonsense.
    #[error("{0}")]
    Transport(String),
}

impl CallError {
    /// The server no longer accepts our credential (401/403): re-enrollment is needed.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Api { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }
}

/// The agent's client of the server.
#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    credential: String,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ServerClient {
    /// A client for `base` (no trailing slash needed).
    pub fn new(http: reqwest::Client, base: &str, credential: String) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            credential,
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn answer<T: DeserializeOwned>(
        what: &str,
        r: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, CallError> {
        let resp = r.map_err(|e| CallError::Transport(format!("{what}: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json()
                .await
                .map_err(|e| CallError::Transport(format!("{what}: bad answer: {e}")));
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
            error: "server_error".to_owned(),
            message: format!("{what}: HTTP {status}"),
            field: None,
        });
        Err(CallError::Api { status, body })
    }

    /// The desired state, long-polled: answered when the version exceeds
    /// `after` or when `wait_ms` passes.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn desired_state(
        &self,
        after: u64,
        wait_ms: u64,
    ) -> Result<AgentDesiredState, CallError> {
        let r = self
            .http
            .get(self.url(paths::AGENT_STATE))
            .bearer_auth(&self.credential)
            .query(&[("after", after), ("wait_ms", wait_ms)])
            .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15))
            .send()
            .await;
        Self::answer("desired state", r).await
    }

    /// Reports what was applied.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn applied(&self, a: &AppliedState) -> Result<(), CallError> {
        let r = self
            .http
            .post(self.url(paths::AGENT_APPLIED))
            .bearer_auth(&self.credential)
            .json(a)
            .send()
            .await;
        let resp = r.map_err(|e| CallError::Transport(format!("applied: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
            error: "server_error".to_owned(),
            message: format!("applied: HTTP {status}"),
            field: None,
        });
        Err(CallError::Api { status, body })
    }

    /// Sends a maintenance request.
    ///
    /// # Errors
    /// A [`CallError`] (e.g. `no_capacity`, a field error).
    pub async fn create_request(
        &self,
        r: &NewMaintenanceRequest,
    ) -> Result<MaintenanceRequestView, CallError> {
        let resp = self
            .http
            .post(self.url(paths::AGENT_REQUESTS))
            .bearer_auth(&self.credential)
            .json(r)
            .send()
            .await;
        Self::answer("maintenance request", resp).await
    }

    /// The site's requests.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn requests(&self) -> Result<Vec<MaintenanceRequestView>, CallError> {
        let resp = self
            .http
            .get(self.url(paths::AGENT_REQUESTS))
            .bearer_auth(&self.credential)
            .send()
            .await;
        Self::answer("requests", resp).await
    }

    /// Ends access for a request ("end access now").
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, id: RequestId) -> Result<MaintenanceRequestView, CallError> {
        let path = paths::AGENT_REVOKE.replace("{id}", &id.to_string());
        let resp = self
            .http
            .post(self.url(&path))
            .bearer_auth(&self.credential)
            .send()
            .await;
        Self::answer("revoke", resp).await
    }

    /// Reports a failure.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn report_failure(&self, f: &FailureReport) -> Result<FailureAccepted, CallError> {
        let resp = self
            .http
            .post(self.url(paths::AGENT_FAILURES))
            .bearer_auth(&self.credential)
            .json(f)
            .send()
            .await;
        Self::answer("failure report", resp).await
    }
}
