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
        Ok((doc, date.as_deref().and_then(parse_http_date)))
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

/// An HTTP date in the IMF-fixdate form every server sends (RFC 9110
/// §5.6.7: `Sun, 06 Nov 1994 08:49:37 GMT`), as milliseconds since the epoch.
pub fn parse_http_date(s: &str) -> Option<UnixMillis> {
    let rest = s.trim().split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::try_from(day).ok()? - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(UnixMillis(((days * 24 + h) * 60 + m) * 60_000 + sec * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(UnixMillis(784_111_777_000))
        );
        assert_eq!(
            parse_http_date("Wed, 02 Dec 2026 08:41:47 GMT"),
            Some(UnixMillis(1_796_200_907_000))
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("garbage"), None);
    }
}
