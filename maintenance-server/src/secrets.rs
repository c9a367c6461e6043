//! The secret primitives: credentials of every kind, their stored hashes,
//! and technician passwords. Nothing here knows about HTTP or the database.
//!
//! Every secret is 256 random bits, prefixed with its kind
//! (`vnsite_…`, `vngw_…`, `vnop_…`, `vnenroll_…`, `vnsess_…`, `vncsrf_…`), so a
//! gateway credential can never pass as a site credential or the other way
//! round: the prefix decides which table is even consulted. Only SHA-256
//! hashes are stored; technician passwords are argon2id hashes.
//!
//! The one secret kept as it is: an IPsec site's pre-shared key ([`Psk`]),
//! which the server hands to the site's agent and gateway.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

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

/// An IPsec site's pre-shared key (RFC 7296 §2.15): 32 random bytes from
/// the OS, standard base64. Unlike the credentials it is stored as it is,
/// since the server hands it out; its `Debug` form hides it, and it never
/// goes into a log or the audit log.
pub struct Psk(String);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Psk {
    /// A fresh key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; vpnnat::messages::MIN_PSK_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The key, base64.
    pub fn expose(&self) -> &str {
        &self.0
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
    fn psks_are_32_random_bytes_and_hidden_from_debug() {
        use base64::engine::general_purpose::STANDARD;
        let a = Psk::generate();
        let b = Psk::generate();
        assert_eq!(STANDARD.decode(a.expose()).unwrap().len(), 32);
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(a.expose()));
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
