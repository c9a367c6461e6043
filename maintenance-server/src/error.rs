//! Errors as HTTP answers: every 4xx/5xx carries a JSON [`ApiError`], naming
//! the field at fault when there is one. This is the one place where the
//! typed errors of the database layer ([`DbError`], [`OpError`]) become a
//! status and a code. Also the JSON body extractor that
//! produces such errors (axum's own rejections are plain text) and insists
//! on `Content-Type: application/json` (a plain HTML form can send
//! `text/plain` across sites without a preflight; JSON it cannot).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use vpnnat::messages::{ApiError, FieldError};

use crate::db::{DbError, OpError};

/// An error answer.
#[derive(Debug)]
pub struct AppError {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: ApiError,
    /// `Retry-After` seconds, for 429 and 503 answers that know when to come back.
    pub retry_after: Option<u64>,
}

/// Marks a response that is an intended refusal (a 503 the server gives on
/// purpose: no capacity, pool exhausted, busy), not a failure of the server:
/// the HTTP layer logs it at WARN, not ERROR.
#[derive(Debug, Clone, Copy)]
pub struct IntendedRefusal;

/// The error codes of [`IntendedRefusal`]s.
pub const REFUSAL_CODES: &[&str] = &["no_capacity", "pool_exhausted", "busy"];

impl AppError {
    /// Any status with a code and message.
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                error: error.to_owned(),
                message: message.into(),
                field: None,
            },
            retry_after: None,
        }
    }

    /// The same answer with a `Retry-After` header.
    #[must_use]
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400/422 naming a field.
    pub fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(status, "invalid_field", message);
        e.body.field = Some(field.to_owned());
        e
    }

    /// 401.
    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 500; the cause is logged, not shown.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (logged on the server)",
        )
    }
}

impl From<FieldError> for AppError {
    fn from(e: FieldError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: e.into(),
            retry_after: None,
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound => Self::not_found("object"),
            DbError::Other(e) => Self::internal(e),
        }
    }
}

impl From<OpError> for AppError {
    fn from(e: OpError) -> Self {
        let message = e.to_string();
        match e {
            OpError::Db(e) => e.into(),
            OpError::NotFound(what) => Self::not_found(what),
            OpError::Conflict { field, message } => {
                let mut e = Self::new(StatusCode::CONFLICT, "conflict", message);
                e.body.field = Some(field.to_owned());
                e
            }
            OpError::NoCapacity(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", message)
            }
            OpError::PoolExhausted => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted", message)
            }
            OpError::InvalidState(m) => Self::new(StatusCode::CONFLICT, "invalid_state", m),
            OpError::BadToken => {
                let mut e = Self::unauthorized("the enrollment token is unknown, used or expired");
                e.body.field = Some("token".to_owned());
                e
            }
            OpError::NotRegistered => Self::new(
                StatusCode::NOT_FOUND,
                "not_registered",
                "register first (POST /api/v1/gateway/register)",
            ),
            OpError::Quota { field, message } => {
                let mut e = Self::new(StatusCode::CONFLICT, "quota_exceeded", message);
                e.body.field = Some(field.to_owned());
                e
            }
            // The per-minute limits count the last minute.
            OpError::RateLimited(m) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", m).retry_after(60)
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let refusal = self.status == StatusCode::SERVICE_UNAVAILABLE
            && REFUSAL_CODES.contains(&self.body.error.as_str());
        let retry_after = self.retry_after;
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if refusal {
            resp.extensions_mut().insert(IntendedRefusal);
        }
        resp
    }
}

/// Whether the request says its body is JSON (`application/json` or an
/// `application/*+json` type, parameters such as `charset` allowed).
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// A JSON body; another `Content-Type` → 415, malformed → 400, wrong shape
/// or value → 422, too big → 413, each as an [`ApiError`] (naming the field).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        if !is_json(req.headers()) {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is larger than the server accepts",
                )
            } else {
                AppError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
            }
        })?;
        parse_json(&bytes).map(Self)
    }
}

/// Deserializes `bytes`, naming the field at fault.
///
/// # Errors
/// 400 for malformed JSON, 422 for a wrong field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    // Syntax first, so that malformed JSON is always a 400 whatever field
    // the typed parse would have stumbled on first.
    if let Err(e) = serde_json::from_slice::<&serde_json::value::RawValue>(bytes) {
        return Err(AppError::field(
            StatusCode::BAD_REQUEST,
            "body",
            format!("malformed JSON: {e}"),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // The syntax is known good here: whatever fails is a field's value
        // (serde_json calls some type mismatches "expected value").
        let msg = e.into_inner().to_string();
        // `missing field `x`` and `unknown field `x`` name the field in the message.
        let named = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("missing field") || msg.starts_with("unknown field"));
        let field = match (path.as_str(), named) {
            (".", Some(n)) => n.to_owned(),
            (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_owned(),
            (p, Some(n)) => format!("{p}.{n}"),
            (".", None) => "body".to_owned(),
            (p, None) => p.to_owned(),
        };
        AppError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            &field,
            format!("{field}: {msg}"),
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vpnnat::messages::{EnrollRequest, NewMaintenanceRequest};

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<NewMaintenanceRequest>(
            br#"{"requester_name":"a","level":"general","urgency":7,"phone":"1","content":"","terminals":["pc"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("urgency"));
        let e = parse_json::<EnrollRequest>(b"{").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<EnrollRequest>(br#"{"token":"t"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.field.as_deref(), Some("public_key"));
        let e = parse_json::<EnrollRequest>(br#"{"token":"t","public_key":"AAAA"}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("public_key"));
        let e = parse_json::<NewMaintenanceRequest>(
            br#"{"requester_name":"a","level":"boss","urgency":"low","phone":"1","content":"","terminals":["pc"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("level"));
        let e = parse_json::<NewMaintenanceRequest>(
            br#"{"requester_name":"a","level":"general","urgency":"low","phone":"1","content":"","terminals":["-x"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("terminals[0]"));
        let e = parse_json::<EnrollRequest>(
            br#"{"token":"t","public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","extra":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("extra"));
    }
}
