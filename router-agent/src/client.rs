//! The maintenance server's agent API (`vpnnat::messages::paths::AGENT_*`),
//! authenticated with the site credential, over the shared API client
//! ([`vpnnat_shell::http::ApiClient`]).

use std::time::Duration;

use vpnnat::messages::{
    AgentDesiredState, AppliedState, FailureAccepted, FailureReport, MaintenanceRequestView,
    NewMaintenanceRequest, RequestId, UnixMillis, paths,
};
use vpnnat_shell::http::ApiClient;
pub use vpnnat_shell::http::CallError;

/// The agent's client of the server.
#[derive(Debug, Clone)]
pub struct ServerClient {
    api: ApiClient,
}

impl ServerClient {
    /// A client for `base` (no trailing slash needed).
    pub fn new(http: reqwest::Client, base: &str, credential: String) -> Self {
        Self {
            api: ApiClient::new(http, base, Some(credential)),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        self.api.base()
    }

    /// The desired state, long-polled: answered when the version exceeds
    /// `after` or when `wait_ms` passes; with the server's clock at its
    /// answer (its `Date` header), when it sent one.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn desired_state(
        &self,
        after: u64,
        wait_ms: u64,
    ) -> Result<(AgentDesiredState, Option<UnixMillis>), CallError> {
        let request = self
            .api
            .get(paths::AGENT_STATE)
            .query(&[("after", after), ("wait_ms", wait_ms)])
            .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15));
        let (doc, date) = self.api.send_dated("desired state", request).await?;
        let millis = |t: std::time::SystemTime| {
            let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            u64::try_from(since.as_millis()).ok().map(UnixMillis)
        };
        Ok((doc, date.and_then(millis)))
    }

    /// Reports what was applied.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn applied(&self, a: &AppliedState) -> Result<(), CallError> {
        let request = self.api.post(paths::AGENT_APPLIED).json(a);
        self.api.send_for_success("applied", request).await
    }

    /// Sends a maintenance request.
    ///
    /// # Errors
    /// A [`CallError`] (e.g. `no_capacity`, a field error).
    pub async fn create_request(
        &self,
        r: &NewMaintenanceRequest,
    ) -> Result<MaintenanceRequestView, CallError> {
        self.api
            .post_json("maintenance request", paths::AGENT_REQUESTS, r)
            .await
    }

    /// The site's requests.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn requests(&self) -> Result<Vec<MaintenanceRequestView>, CallError> {
        self.api.get_json("requests", paths::AGENT_REQUESTS).await
    }

    /// Ends access for a request ("end access now").
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, id: RequestId) -> Result<MaintenanceRequestView, CallError> {
        let path = paths::AGENT_REVOKE.replace("{id}", &id.to_string());
        self.api.send("revoke", self.api.post(&path)).await
    }

    /// Reports a failure.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn report_failure(&self, f: &FailureReport) -> Result<FailureAccepted, CallError> {
        self.api
            .post_json("failure report", paths::AGENT_FAILURES, f)
            .await
    }
}
