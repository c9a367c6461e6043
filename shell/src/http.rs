//! The HTTP client of the control-plane API (and of the programs' own status
//! listeners), with one typed error for every call.
//!
//! Every error answer of the API carries an [`ApiError`] document; a call's
//! error keeps it ([`CallError::Api`]) so that a program can pass the
//! server's code and message on (the agent's page shows them). Everything
//! else (no connection, no answer in time, an answer that does not decode)
//! is a [`CallError::Transport`], typed by [`TransportError`].

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use reqwest::{RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vpnnat::control::CallFailure;
use vpnnat::messages::ApiError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server answered with an HTTP error status and (usually) an error document.
    #[error("{}", .body.message)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The server's error (made up from the status when the body is none).
        body: ApiError,
    },
    /// No usable answer.
    #[error("{0}")]
    Transport(TransportError),
}

/// Why a call brought no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The server could not be reached, or the connection broke.
    #[error("{what}: {detail}")]
    Connect {
        /// The call (`desired state`, `register`, …).
        what: String,
        /// The client's explanation, with its causes.
        detail: String,
    },
    /// No answer within the client's timeout.
    #[error("{what}: no answer in time")]
    Timeout {
        /// The call.
        what: String,
    },
    /// The answer is not the expected document.
    #[error("{what}: bad answer: {detail}")]
    Decode {
        /// The call.
        what: String,
        /// The decoder's explanation.
        detail: String,
    },
}

impl CallError {
    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }

    /// The server no longer accepts our credential (401/403).
    pub fn is_unauthorized(&self) -> bool {
        self.status()
            .is_some_and(|s| s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN)
    }

    /// The same failure in the terms of the core's desired-state follower.
    pub fn failure(&self) -> CallFailure {
        match self {
            Self::Api { status, body } => CallFailure::Status {
                status: status.as_u16(),
                code: body.error.clone(),
                message: body.message.clone(),
            },
            Self::Transport(t @ TransportError::Connect { .. }) => {
                CallFailure::Transport(t.to_string())
            }
            Self::Transport(t @ TransportError::Timeout { .. }) => {
                CallFailure::Timeout(t.to_string())
            }
            Self::Transport(t @ TransportError::Decode { .. }) => {
                CallFailure::Decode(t.to_string())
            }
        }
    }
}

/// How to build the underlying HTTP client.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Connecting may take this long.
    pub connect_timeout: Duration,
    /// A whole call may take this long (a request may set its own).
    pub timeout: Duration,
    /// An extra trusted CA certificate (PEM), e.g. a private center's.
    pub ca_file: Option<PathBuf>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            ca_file: None,
            user_agent: None,
        }
    }
}

/// Builds an HTTP client.
///
/// # Errors
/// When the CA file cannot be read or is no PEM certificate.
pub fn http_client(options: &HttpOptions) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .timeout(options.timeout);
    if let Some(agent) = &options.user_agent {
        b = b.user_agent(agent.clone());
    }
    if let Some(ca) = &options.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("{}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        b = b.add_root_certificate(cert);
    }
    b.build().context("HTTP client")
}

/// A client of one HTTP API: a base URL and, optionally, a bearer credential.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credential stays out of logs.
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for `base` (a trailing slash is ignored).
    pub fn new(http: reqwest::Client, base: &str, bearer: Option<String>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            bearer,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A `GET` of `path`, authenticated; add a query or a timeout, then [`ApiClient::send`].
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.authenticated(self.http.get(self.url(path)))
    }

    /// A `POST` to `path`, authenticated; add a body, then [`ApiClient::send`].
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.authenticated(self.http.post(self.url(path)))
    }

    fn authenticated(&self, r: RequestBuilder) -> RequestBuilder {
        match &self.bearer {
            Some(token) => r.bearer_auth(token),
            None => r,
        }
    }

    /// Sends `request` and decodes the JSON answer; `what` names the call in errors.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn send<T: DeserializeOwned>(
        &self,
        what: &str,
        request: RequestBuilder,
    ) -> Result<T, CallError> {
        self.send_dated(what, request).await.map(|(value, _)| value)
    }

    /// Like [`Self::send`], also returning the answer's `Date` header (the
    /// server's clock when it answered, RFC 9110 §6.6.1), when it has a
    /// valid one.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn send_dated<T: DeserializeOwned>(
        &self,
        what: &str,
        request: RequestBuilder,
    ) -> Result<(T, Option<SystemTime>), CallError> {
        let resp = answer(what, request).await?;
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let bytes = resp.bytes().await.map_err(|e| transport(what, &e))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            CallError::Transport(TransportError::Decode {
                what: what.to_owned(),
                detail: e.to_string(),
            })
        })?;
        Ok((value, date))
    }

    /// Sends `request`; a success is all that matters (the body is not read).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn send_for_success(
        &self,
        what: &str,
        request: RequestBuilder,
    ) -> Result<(), CallError> {
        answer(what, request).await.map(drop)
    }

    /// `GET path`, decoded.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
    ) -> Result<T, CallError> {
        self.send(what, self.get(path)).await
    }

    /// `POST path` with a JSON body, the answer decoded.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        self.send(what, self.post(path).json(body)).await
    }
}

/// The response when its status is a success; the error otherwise.
async fn answer(what: &str, request: RequestBuilder) -> Result<reqwest::Response, CallError> {
    let resp = request.send().await.map_err(|e| transport(what, &e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
        error: "server_error".to_owned(),
        message: status_message(what, status, &text),
        field: None,
    });
    Err(CallError::Api { status, body })
}

/// `what: HTTP 502 Bad Gateway: <the start of the body>`.
fn status_message(what: &str, status: StatusCode, body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        format!("{what}: HTTP {status}")
    } else {
        let start: String = body.chars().take(200).collect();
        format!("{what}: HTTP {status}: {start}")
    }
}

fn transport(what: &str, e: &reqwest::Error) -> CallError {
    let what = what.to_owned();
    CallError::Transport(if e.is_timeout() {
        TransportError::Timeout { what }
    } else if e.is_decode() {
        TransportError::Decode {
            what,
            detail: chain(e),
        }
    } else {
        TransportError::Connect {
            what,
            detail: chain(e),
        }
    })
}

/// The error and its causes on one line (reqwest's own message names only the URL).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Serves one canned HTTP answer on a local port.
    async fn one_answer(response: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(response.as_bytes()).await.unwrap();
            let _ = s.shutdown().await;
        });
        format!("http://{addr}")
    }

    fn client(base: &str) -> ApiClient {
        let http = http_client(&HttpOptions {
            timeout: Duration::from_millis(500),
            ..HttpOptions::default()
        })
        .unwrap();
        ApiClient::new(http, &format!("{base}/"), Some("secret".into()))
    }

    #[tokio::test]
    async fn an_error_document_keeps_the_servers_code_and_message() {
        let body = r#"{"error":"unauthorized","message":"unknown credential"}"#;
        let resp: &'static str = Box::leak(
            format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let base = one_answer(resp).await;
        let e = client(&base)
            .get_json::<serde_json::Value>("desired state", "/x")
            .await
            .unwrap_err();
        assert!(e.is_unauthorized());
        assert_eq!(e.to_string(), "unknown credential");
        assert_eq!(
            e.failure(),
            CallFailure::Status {
                status: 401,
                code: "unauthorized".into(),
                message: "unknown credential".into()
            }
        );
        assert!(e.failure().is_unknown());
    }

    #[tokio::test]
    async fn a_bare_error_status_is_described_by_the_call_and_the_body() {
        let base = one_answer("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 5\r\n\r\noops!").await;
        let e = client(&base)
            .send_for_success("applied", client(&base).post("/y"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(e.to_string(), "applied: HTTP 502 Bad Gateway: oops!");
    }

    #[tokio::test]
    async fn a_wrong_document_is_a_decode_error() {
        let base = one_answer(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]",
        )
        .await;
        let e = client(&base)
            .get_json::<ApiError>("status", "/z")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CallError::Transport(TransportError::Decode { what, .. }) if what == "status"),
            "{e:?}"
        );
        assert!(matches!(e.failure(), CallFailure::Decode(_)));
    }

    #[tokio::test]
    async fn no_server_is_a_connect_error_and_silence_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // Accepts and never answers.
        let held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let e = client(&base)
            .get_json::<ApiError>("desired state", "/slow")
            .await
            .unwrap_err();
        assert!(
            matches!(e, CallError::Transport(TransportError::Timeout { .. })),
            "{e:?}"
        );
        held.abort();

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = client(&format!("http://{closed}"))
            .get_json::<ApiError>("register", "/")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CallError::Transport(TransportError::Connect { what, .. }) if what == "register"),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("register: "), "{e}");
    }
}
