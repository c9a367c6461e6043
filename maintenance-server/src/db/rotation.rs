//! Planned rotation of a site's WireGuard key and credential, without
//! interrupting its tunnel (docs/OPERATIONS.md, "Rotating keys and
//! credentials"). The immediate path (`rotate_site`) revokes at once.
//!
//! Key: the agent registers its next key (kept in its state first); the
//! site's gateway gets it as the site's next key and accepts a handshake
//! from either key; once that gateway has applied the document, the agent's
//! document says `next_key_ready` and the agent switches (storing the new
//! key first) and handshakes at once; then it confirms, and the old key is
//! dropped. Until the confirmation both keys work, so an agent that dies at
//! any step comes back with a key the gateway accepts.
//!
//! Credential: a new one is issued to the holder of the current one; the
//! old one stays valid until the new one is first used, or at most
//! `credential_grace_ms` after the first issue (a lost answer is asked for
//! again with the old one meanwhile).

use vpnnat::messages::{
    AgentRotation, NewSiteCredential, PlannedRotation, PublicKey, SiteId, UnixMillis,
};

use super::error::{OpError, OpResult};
use super::tunnels::site_gateway;
use super::{Tx, col, id64, ids_of, u64_of};
use crate::secrets::{Secret, SecretKind};

/// The columns a credential-revoking change (enrollment, the immediate
/// rotation) resets: no next key, no previous credential, no pending flag.
pub const RESET_SQL: &str = "next_public_key = NULL, next_key_gateway = NULL, \
     next_key_version = NULL, rotate_key = 0, rotate_credential = 0, \
     previous_credential_hash = NULL, previous_credential_until = NULL";

/// The agent registers `key` as its next key. Idempotent; a different next
/// key replaces the one held (an agent that lost its state).
///
/// # Errors
/// `NotFound`; `Conflict` when the key is the site's current key or
/// another site's; `InvalidState` when the site is not enrolled.
pub async fn register_next_key(
    tx: &mut Tx,
    site: SiteId,
    key: PublicKey,
    now: i64,
) -> OpResult<()> {
    tx.lock_site(site).await?;
    let row = tx
        .row_by_id(
            "SELECT public_key, next_public_key FROM sites WHERE id = $1",
            site.0,
            "site",
        )
        .await?;
    let current: Option<String> = col(&row, "public_key")?;
    let next: Option<String> = col(&row, "next_public_key")?;
    let key_b64 = key.to_base64();
    let Some(current) = current else {
        return Err(OpError::InvalidState("the site is not enrolled".into()));
    };
    if current == key_b64 {
        return Err(OpError::Conflict {
            field: "public_key",
            message: "this is the site's current key; send a new one".into(),
        });
    }
    if next.as_deref() == Some(key_b64.as_str()) {
        return Ok(());
    }
    tx.site_key_free(&key_b64, Some(site)).await?;
    let gw = site_gateway(tx, site).await?;
    if let Some(gw) = gw {
        tx.bump_gateway(gw).await?;
    }
    // The gateway document that first holds the key: the agent may switch
    // once its gateway has applied it (NULL: no tunnel, nothing to wait for).
    sqlx::query(
        "UPDATE sites SET next_public_key = $1, next_key_gateway = $2, \
         next_key_version = (SELECT version FROM gateways WHERE id = $2), rotate_key = 0 \
         WHERE id = $3",
    )
    .bind(&key_b64)
    .bind(gw.map(|g| id64(g.0)))
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    tx.bump_site(site).await?;
    tx.audit(
        now,
        &format!("site:{site}"),
        "site.key.next",
        &format!("site:{site}"),
        &format!("next public key {key_b64}"),
    )
    .await?;
    Ok(())
}

/// The agent uses its next key `key` now: it becomes the site's key and
/// the old one is dropped. Idempotent (a repeated confirmation of the key
/// in force is accepted).
///
/// # Errors
/// `NotFound`; `Conflict` when `key` is neither the next nor the current key.
pub async fn commit_key(tx: &mut Tx, site: SiteId, key: PublicKey, now: i64) -> OpResult<()> {
    tx.lock_site(site).await?;
    let row = tx
        .row_by_id(
            "SELECT public_key, next_public_key FROM sites WHERE id = $1",
            site.0,
            "site",
        )
        .await?;
    let current: Option<String> = col(&row, "public_key")?;
    let next: Option<String> = col(&row, "next_public_key")?;
    let key_b64 = key.to_base64();
    if current.as_deref() == Some(key_b64.as_str()) && next.is_none() {
        return Ok(());
    }
    if next.as_deref() != Some(key_b64.as_str()) {
        return Err(OpError::Conflict {
            field: "public_key",
            message: "not the site's next key; register it first".into(),
        });
    }
    sqlx::query(
        "UPDATE sites SET public_key = next_public_key, next_public_key = NULL, \
         next_key_gateway = NULL, next_key_version = NULL, key_rotated_at = $1 WHERE id = $2",
    )
    .bind(now)
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    tx.bump_site(site).await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        tx.bump_gateway(gw).await?;
    }
    tx.audit(
        now,
        &format!("site:{site}"),
        "site.key.rotated",
        &format!("site:{site}"),
        &format!("public key {key_b64} (was {})", current.unwrap_or_default()),
    )
    .await?;
    Ok(())
}

/// A new credential for the site whose agent presented the credential with
/// hash `presented`. The old one stays valid until the new one is first
/// used or `grace_ms` after the first issue of this rotation.
///
/// # Errors
/// `NotFound`.
pub async fn new_credential(
    tx: &mut Tx,
    site: SiteId,
    presented: &str,
    now: i64,
    grace_ms: i64,
) -> OpResult<NewSiteCredential> {
    tx.lock_site(site).await?;
    let row = tx
        .row_by_id(
            "SELECT credential_hash, previous_credential_hash, previous_credential_until \
             FROM sites WHERE id = $1",
            site.0,
            "site",
        )
        .await?;
    let current: Option<String> = col(&row, "credential_hash")?;
    let previous: Option<String> = col(&row, "previous_credential_hash")?;
    let until: Option<i64> = col(&row, "previous_credential_until")?;
    let credential = Secret::generate(SecretKind::Site);
    let (keep, until, detail) = if previous.as_deref() == Some(presented) {
        // The answer to an earlier call was lost: the unused new credential
        // is replaced; the deadline of the old one stays.
        (
            previous,
            until.unwrap_or(now),
            "new credential issued again",
        )
    } else {
        (current, now + grace_ms, "new credential issued")
    };
    sqlx::query(
        "UPDATE sites SET credential_hash = $1, previous_credential_hash = $2, \
         previous_credential_until = $3 WHERE id = $4",
    )
    .bind(credential.hash())
    .bind(keep)
    .bind(until)
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    // The TLS fallback token derives from the credential: the gateway and
    // the agent get the new one.
    tx.bump_site(site).await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        tx.bump_gateway(gw).await?;
    }
    tx.audit(
        now,
        &format!("site:{site}"),
        "site.credential.next",
        &format!("site:{site}"),
        detail,
    )
    .await?;
    Ok(NewSiteCredential {
        credential: credential.expose().to_owned(),
        previous_valid_until: UnixMillis(u64_of(until)),
    })
}

/// The new credential was used for the first time: the previous one ends.
///
/// # Errors
/// Database failures.
pub async fn credential_in_use(tx: &mut Tx, site: SiteId, hash: &str, now: i64) -> OpResult<()> {
    tx.lock_site(site).await?;
    let r = sqlx::query(
        "UPDATE sites SET previous_credential_hash = NULL, previous_credential_until = NULL, \
         rotate_credential = 0, credential_rotated_at = $1 \
         WHERE id = $2 AND credential_hash = $3 AND previous_credential_hash IS NOT NULL",
    )
    .bind(now)
    .bind(id64(site.0))
    .bind(hash)
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() == 1 {
        tx.bump_site(site).await?;
        tx.audit(
            now,
            &format!("site:{site}"),
            "site.credential.rotated",
            &format!("site:{site}"),
            "new credential in use; the previous one is refused from now on",
        )
        .await?;
    }
    Ok(())
}

/// The operator asks the site's agent for a planned rotation.
///
/// # Errors
/// `NotFound`; `InvalidState` when the site is not enrolled.
pub async fn request_rotation(
    tx: &mut Tx,
    site: SiteId,
    what: PlannedRotation,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    tx.lock_site(site).await?;
    if super::agentless::is_agentless(&mut tx.inner, site).await? {
        return Err(super::agentless::no_agent());
    }
    let row = tx
        .row_by_id(
            "SELECT credential_hash FROM sites WHERE id = $1",
            site.0,
            "site",
        )
        .await?;
    if col::<Option<String>>(&row, "credential_hash")?.is_none() {
        return Err(OpError::InvalidState(
            "the site is not enrolled (or its credential was revoked)".into(),
        ));
    }
    sqlx::query(
        "UPDATE sites SET rotate_key = CASE WHEN $1 = 1 THEN 1 ELSE rotate_key END, \
         rotate_credential = CASE WHEN $2 = 1 THEN 1 ELSE rotate_credential END WHERE id = $3",
    )
    .bind(i64::from(what.key))
    .bind(i64::from(what.credential))
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    tx.bump_site(site).await?;
    let detail = match (what.key, what.credential) {
        (true, true) => "key and credential",
        (true, false) => "key",
        _ => "credential",
    };
    tx.audit(
        now,
        actor,
        "site.rotation.requested",
        &format!("site:{site}"),
        detail,
    )
    .await?;
    Ok(())
}

/// Sets the rotation flags of enrolled sites whose key or credential is
/// older than the given periods (ms; 0: off). Returns the sites flagged.
///
/// # Errors
/// Database failures.
pub async fn schedule(tx: &mut Tx, now: i64, key_ms: i64, credential_ms: i64) -> OpResult<usize> {
    let mut flagged = Vec::new();
    for (flag, at, period) in [
        ("rotate_key", "key_rotated_at", key_ms),
        ("rotate_credential", "credential_rotated_at", credential_ms),
    ] {
        if period <= 0 {
            continue;
        }
        // A key rotation under way, or an issued credential, is not
        // started again.
        let pending = if flag == "rotate_key" {
            "next_public_key IS NULL"
        } else {
            "previous_credential_hash IS NULL"
        };
        let sql = format!(
            "SELECT id FROM sites WHERE credential_hash IS NOT NULL AND disabled = 0 \
             AND {flag} = 0 AND {pending} AND COALESCE({at}, enrolled_at, created_at) <= $1 \
             ORDER BY id"
        );
        let rows = sqlx::query(&sql)
            .bind(now - period)
            .fetch_all(&mut *tx.inner)
            .await?;
        for site in ids_of(&rows, "id", SiteId)? {
            tx.lock_site(site).await?;
            sqlx::query(&format!("UPDATE sites SET {flag} = 1 WHERE id = $1"))
                .bind(id64(site.0))
                .execute(&mut *tx.inner)
                .await?;
            tx.bump_site(site).await?;
            tx.audit(
                now,
                "schedule",
                "site.rotation.requested",
                &format!("site:{site}"),
                if flag == "rotate_key" {
                    "key"
                } else {
                    "credential"
                },
            )
            .await?;
            flagged.push(site);
        }
    }
    Ok(flagged.len())
}

/// The rotation part of a site's desired state (`None`: nothing under way).
///
/// # Errors
/// Database failures.
pub async fn agent_rotation(
    conn: &mut sqlx::AnyConnection,
    site: SiteId,
) -> super::DbResult<Option<AgentRotation>> {
    let Some(r) = sqlx::query(
        "SELECT s.next_public_key, s.rotate_key, s.rotate_credential, s.next_key_gateway, \
         s.next_key_version, t.gateway_id, g.applied_version \
         FROM sites s LEFT JOIN tunnels t ON t.site_id = s.id \
         LEFT JOIN gateways g ON g.id = t.gateway_id WHERE s.id = $1",
    )
    .bind(id64(site.0))
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let next_key = col::<Option<String>>(&r, "next_public_key")?.and_then(|k| k.parse().ok());
    let key_gw: Option<i64> = col(&r, "next_key_gateway")?;
    let key_version: Option<i64> = col(&r, "next_key_version")?;
    let tunnel_gw: Option<i64> = col(&r, "gateway_id")?;
    let applied: Option<i64> = col(&r, "applied_version")?;
    // Ready when the gateway that got the key first has applied that
    // document; a gateway the site moved to since got it with the site's
    // peer (and the agent dials it only once it has applied that).
    let ready = match key_gw {
        None => true,
        Some(g) if tunnel_gw != Some(g) => true,
        Some(_) => applied.unwrap_or(0) >= key_version.unwrap_or(i64::MAX),
    };
    let rotation = AgentRotation {
        rotate_key: col::<i64>(&r, "rotate_key")? != 0,
        rotate_credential: col::<i64>(&r, "rotate_credential")? != 0,
        next_key_ready: next_key.is_some() && ready,
        next_key,
    };
    Ok((!rotation.is_idle()).then_some(rotation))
}

/// The next keys of a gateway's WireGuard sites that rotate theirs.
///
/// # Errors
/// Database failures.
pub async fn gateway_next_keys(
    conn: &mut sqlx::AnyConnection,
    gw: vpnnat::messages::GatewayId,
) -> super::DbResult<Vec<vpnnat::messages::NextPeerKey>> {
    let rows = sqlx::query(
        "SELECT s.id, s.next_public_key FROM tunnels t JOIN sites s ON s.id = t.site_id \
         WHERE t.gateway_id = $1 AND s.public_key IS NOT NULL \
         AND s.next_public_key IS NOT NULL AND s.tunnel = 'wireguard' ORDER BY s.id",
    )
    .bind(id64(gw.0))
    .fetch_all(&mut *conn)
    .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in rows {
        if let Ok(k) = col::<String>(&r, "next_public_key")?.parse() {
            keys.push(vpnnat::messages::NextPeerKey {
                site_id: SiteId(u64_of(col(&r, "id")?)),
                public_key: k,
            });
        }
    }
    Ok(keys)
}

/// Sites whose next key became ready with gateway `gw` applying versions
/// in `(before, version]`: their agents' documents change.
///
/// # Errors
/// Database failures.
pub async fn keys_ready(
    tx: &mut Tx,
    gw: vpnnat::messages::GatewayId,
    before: i64,
    version: i64,
) -> OpResult<Vec<SiteId>> {
    let rows = sqlx::query(
        "SELECT id FROM sites WHERE next_key_gateway = $1 AND next_key_version > $2 \
         AND next_key_version <= $3 AND next_public_key IS NOT NULL ORDER BY id",
    )
    .bind(id64(gw.0))
    .bind(before)
    .bind(version)
    .fetch_all(&mut *tx.inner)
    .await?;
    Ok(ids_of(&rows, "id", SiteId)?)
}
