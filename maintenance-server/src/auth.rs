//! Credentials and the extractors that check them.
//!
//! Every secret is 256 random bits, prefixed with its kind
//! (`vnsite_…`, `vngw_…`, `vnop_…`, `vnenroll_…`, `vnsess_…`), so a
//! gateway credential can never pass as a site credential or the other way
//! round: the prefix decides which table is even consulted. Only SHA-256
//! hashes are stored; technician passwords are argon2id hashes.
//!
//! Scopes: no or an unknown credential → 401; a valid-looking credential of
//! another kind → 403.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use vpnnat::messages::{GatewayId, SiteId};

use crate::AppState;
use crate::db::{col, u64_of};
use crate::error::AppError;

/// What a secret is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// An agent's site credential.
    Site,
    /// A gateway's credential.
    Gateway,
    /// The operator token.
    Operator,
    /// A one-time enrollment token.
    Enrollment,
    /// A technician's session cookie.
    Session,
    /// A technician's CSRF token.
    Csrf,
}

impl SecretKind {
    /// The prefix that marks this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Site => "vnsite_",
            Self::Gateway => "vngw_",
            Self::Operator => "vnop_",
            Self::Enrollment => "vnenroll_",
            Self::Session => "vnsess_",
            Self::Csrf => "vncsrf_",
        }
    }

    /// The kind a presented secret claims to be.
    pub fn of(secret: &str) -> Option<Self> {
        [
            Self::Site,
            Self::Gateway,
            Self::Operator,
            Self::Enrollment,
            Self::Session,
            Self::Csrf,
        ]
        .into_iter()
        .find(|k| secret.starts_with(k.prefix()))
    }
}

/// A freshly generated secret (shown once).
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// 256 random bits from the OS, with the kind's prefix.
    pub fn generate(kind: SecretKind) -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(format!(
            "{}{}",
            kind.prefix(),
            URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored.
    pub fn hash(&self) -> String {
        Self::hash_of(&self.0)
    }

    /// SHA-256 of a presented secret, hex. A plain hash suffices (no salt,
    /// no stretching): the secrets are 256-bit random, not passwords.
    pub fn hash_of(secret: &str) -> String {
        let d = Sha256::digest(secret.as_bytes());
        let mut s = String::with_capacity(64);
        for b in d {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn check_kind(token: Option<&str>, want: SecretKind) -> Result<&str, AppError> {
    let token = token.ok_or_else(|| AppError::unauthorized("a bearer credential is required"))?;
    match SecretKind::of(token) {
        Some(k) if k == want => Ok(token),
        Some(_) => Err(AppError::forbidden(
            "this credential is not valid for this endpoint",
        )),
        None => Err(AppError::unauthorized("unknown credential")),
    }
}

/// An authenticated router agent.
#[derive(Debug, Clone, Copy)]
pub struct SiteAuth {
    /// The site it speaks for.
    pub site: SiteId,
}

impl FromRequestParts<AppState> for SiteAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = check_kind(bearer(&parts.headers), SecretKind::Site)?;
        let row = sqlx::query("SELECT id FROM sites WHERE credential_hash = $1")
            .bind(Secret::hash_of(token))
            .fetch_optional(state.db.reader())
            .await
            .map_err(AppError::internal)?
            .ok_or_else(|| AppError::unauthorized("unknown credential"))?;
        Ok(Self {
            site: SiteId(u64_of(col(&row, "id").map_err(AppError::internal)?)),
        })
    }
}

/// An authenticated gateway.
#[derive(Debug, Clone, Copy)]
pub struct GatewayAuth {
    /// Which one.
    pub gateway: GatewayId,
}

impl FromRequestParts<AppState> for GatewayAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = check_kind(bearer(&parts.headers), SecretKind::Gateway)?;
        let row = sqlx::query("SELECT id FROM gateways WHERE credential_hash = $1")
            .bind(Secret::hash_of(token))
            .fetch_optional(state.db.reader())
            .await
            .map_err(AppError::internal)?
            .ok_or_else(|| AppError::unauthorized("unknown credential"))?;
        Ok(Self {
            gateway: GatewayId(u64_of(col(&row, "id").map_err(AppError::internal)?)),
        })
    }
}

/// The operator.
#[derive(Debug, Clone, Copy)]
pub struct OperatorAuth;

impl FromRequestParts<AppState> for OperatorAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = bearer(&parts.headers)
            .ok_or_else(|| AppError::unauthorized("a bearer credential is required"))?;
        // A configured operator token may lack the `vnop_` prefix; a
        // credential of another kind never passes.
        match SecretKind::of(token) {
            None | Some(SecretKind::Operator) => {}
            Some(_) => {
                return Err(AppError::forbidden(
                    "this credential is not valid for this endpoint",
                ));
            }
        }
        if Secret::hash_of(token) == state.operator_hash {
            Ok(Self)
        } else {
            Err(AppError::unauthorized("unknown credential"))
        }
    }
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "vpnnat_session";
/// The CSRF header's name.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session cookie of a request.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

/// A logged-in technician (read access). State-changing handlers take
/// [`TechnicianWrite`], which also checks the CSRF header.
#[derive(Debug, Clone)]
pub struct Technician {
    /// Technician id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The session's hash (for logout).
    pub session_hash: String,
    csrf_hash: String,
}

impl Technician {
    /// `technician:NAME` for the audit log.
    pub fn actor(&self) -> String {
        format!("technician:{}", self.name)
    }
}

impl FromRequestParts<AppState> for Technician {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let cookie = session_cookie(&parts.headers);
        if cookie.is_none() && bearer(&parts.headers).is_some() {
            return Err(AppError::forbidden(
                "technician endpoints take a session cookie, not a bearer credential",
            ));
        }
        let cookie = cookie.ok_or_else(|| AppError::unauthorized("log in first"))?;
        if SecretKind::of(cookie) != Some(SecretKind::Session) {
            return Err(AppError::unauthorized("log in first"));
        }
        let hash = Secret::hash_of(cookie);
        let row = sqlx::query(
            "SELECT t.id, t.name, s.csrf_hash, s.expires_at FROM technician_sessions s \
             JOIN technicians t ON t.id = s.technician_id WHERE s.token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(state.db.reader())
        .await
        .map_err(AppError::internal)?
        .ok_or_else(|| AppError::unauthorized("the session ended; log in again"))?;
        let expires: i64 = col(&row, "expires_at").map_err(AppError::internal)?;
        if expires <= crate::db::now_ms() {
            return Err(AppError::unauthorized("the session ended; log in again"));
        }
        Ok(Self {
            id: col(&row, "id").map_err(AppError::internal)?,
            name: col(&row, "name").map_err(AppError::internal)?,
            session_hash: hash,
            csrf_hash: col(&row, "csrf_hash").map_err(AppError::internal)?,
        })
    }
}

/// A logged-in technician whose request carries the session's CSRF token
/// (`X-CSRF-Token`). The cookie is `SameSite=Strict` as well; the header
/// is the defence that does not depend on the browser.
#[derive(Debug, Clone)]
pub struct TechnicianWrite(pub Technician);

impl FromRequestParts<AppState> for TechnicianWrite {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let t = Technician::from_request_parts(parts, state).await?;
        let header = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AppError::forbidden("the X-CSRF-Token header is missing"))?;
        if Secret::hash_of(header) != t.csrf_hash {
            return Err(AppError::forbidden("the X-CSRF-Token header is wrong"));
        }
        Ok(Self(t))
    }
}

/// Hashes a password with argon2id (default parameters, random salt).
///
/// # Errors
/// When hashing fails.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))
}

/// Checks a password against a stored argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_carry_their_kind_and_hash_stably() {
        let s = Secret::generate(SecretKind::Gateway);
        assert_eq!(SecretKind::of(s.expose()), Some(SecretKind::Gateway));
        assert_eq!(s.hash(), Secret::hash_of(s.expose()));
        assert_eq!(s.hash().len(), 64);
        assert_ne!(
            Secret::generate(SecretKind::Site).expose(),
            Secret::generate(SecretKind::Site).expose()
        );
        assert!(!format!("{s:?}").contains(s.expose()));
        assert_eq!(SecretKind::of("vnsite_abc"), Some(SecretKind::Site));
        assert_eq!(SecretKind::of("abc"), None);
    }

    #[test]
    fn bearer_and_cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  vnop_x ".parse().unwrap());
        h.insert(
            header::COOKIE,
            "a=b; vpnnat_session=vnsess_y".parse().unwrap(),
        );
        assert_eq!(bearer(&h), Some("vnop_x"));
        assert_eq!(session_cookie(&h), Some("vnsess_y"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }
}
