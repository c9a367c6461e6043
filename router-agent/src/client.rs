//! The maintenance server's agent API (`vpnnat::messages::paths::AGENT_*`),
//! authenticated with the site credential, over the shared API client
//! ([`vpnnat_shell::http::ApiClient`]).

use std::time::Duration;

use std::sync::{Arc, PoisonError, RwLock};

use vpnnat::messages::{
    AgentDesiredState, AgentRotation, AppliedState, FailureAccepted, FailureReport,
    MaintenanceRequestView, NewMaintenanceRequest, NewSiteCredential, RequestId, SiteKey,
    UnixMillis, paths,
};
use vpnnat_shell::http::ApiClient;
pub use vpnnat_shell::http::CallError;

/// The agent's client of the server. Clones share the credential, which a
/// planned credential rotation replaces ([`Self::set_credential`]).
#[derive(Debug, Clone)]
pub struct ServerClient {
    api: Arc<RwLock<ApiClient>>,
    http: reqwest::Client,
    base: String,
}

impl ServerClient {
    /// A client for `base` (no trailing slash needed).
    pub fn new(http: reqwest::Client, base: &str, credential: String) -> Self {
        let api = ApiClient::new(http.clone(), base, Some(credential));
        Self {
            base: api.base().to_owned(),
            api: Arc::new(RwLock::new(api)),
            http,
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Every call from now on presents `credential`.
    pub fn set_credential(&self, credential: String) {
        let api = ApiClient::new(self.http.clone(), &self.base, Some(credential));
        *self.api.write().unwrap_or_else(PoisonError::into_inner) = api;
    }

    /// The client with the credential in force.
    fn api(&self) -> ApiClient {
        self.api
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Registers the next tunnel key of a planned rotation.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn next_key(&self, key: &SiteKey) -> Result<AgentRotation, CallError> {
        self.api()
            .post_json("next key", paths::AGENT_KEY, key)
            .await
    }

    /// Tells the server that the next key is in use.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn commit_key(&self, key: &SiteKey) -> Result<(), CallError> {
        let api = self.api();
        let request = api.post(paths::AGENT_KEY_COMMIT).json(key);
        api.send_for_success("key commit", request).await
    }

    /// Asks for a new credential (the current one stays valid until the
    /// new one is first used).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn new_credential(&self) -> Result<NewSiteCredential, CallError> {
        let api = self.api();
        api.send("new credential", api.post(paths::AGENT_CREDENTIAL))
            .await
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
        let api = self.api();
        let request = api
            .get(paths::AGENT_STATE)
            .query(&[("after", after), ("wait_ms", wait_ms)])
            .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(15));
        let (doc, date) = api.send_dated("desired state", request).await?;
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
        let api = self.api();
        let request = api.post(paths::AGENT_APPLIED).json(a);
        api.send_for_success("applied", request).await
    }

    /// Sends a maintenance request.
    ///
    /// # Errors
    /// A [`CallError`] (e.g. `no_capacity`, a field error).
    pub async fn create_request(
        &self,
        r: &NewMaintenanceRequest,
    ) -> Result<MaintenanceRequestView, CallError> {
        self.api()
            .post_json("maintenance request", paths::AGENT_REQUESTS, r)
            .await
    }

    /// The site's requests.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn requests(&self) -> Result<Vec<MaintenanceRequestView>, CallError> {
        self.api().get_json("requests", paths::AGENT_REQUESTS).await
    }

    /// Ends access for a request ("end access now").
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, id: RequestId) -> Result<MaintenanceRequestView, CallError> {
        let path = paths::AGENT_REVOKE.replace("{id}", &id.to_string());
        let api = self.api();
        api.send("revoke", api.post(&path)).await
    }

    /// Reports a failure.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn report_failure(&self, f: &FailureReport) -> Result<FailureAccepted, CallError> {
        self.api()
            .post_json("failure report", paths::AGENT_FAILURES, f)
            .await
    }
}
