//! Sites: creation, enrollment tokens, enrollment, what the agent applied,
//! and the problem shown to the customer when a request could not be met.

use vpnnat::messages::{
    EnrollResponse, IpsecSiteConfig, PublicKey, RequestId, RequestState, SiteCreated, SiteId,
    TunnelKind, UnixMillis,
};

use super::agentless::{is_agentless, no_agent};
use super::error::{DbError, OpError, OpResult, is_unique_violation};
use super::policy::Policy;
use super::requests::close_request;
use super::tunnels::{release_slot, site_gateway};
use super::views::{enum_parse, enum_str, ipsec_config};
use super::{Tx, col, id64, ids_of, u64_of};
use crate::secrets::{Psk, Secret, SecretKind};

/// Creates a site of tunnel kind `tunnel` (an IPsec site with a fresh
/// pre-shared key) and its first enrollment token.
///
/// # Errors
/// `Conflict` on a taken name.
pub async fn create_site(
    tx: &mut Tx,
    name: &str,
    tunnel: TunnelKind,
    actor: &str,
    now: i64,
    policy: &Policy,
) -> OpResult<SiteCreated> {
    tx.name_free("SELECT id FROM sites WHERE name = $1", name, "site")
        .await?;
    let psk = psk_for(tunnel);
    let row = sqlx::query(
        "INSERT INTO sites (name, created_at, tunnel, ipsec_psk) VALUES ($1, $2, $3, $4) RETURNING id",
    )
        .bind(name)
        .bind(now)
        .bind(enum_str(&tunnel))
        .bind(psk.as_ref().map(Psk::expose))
        .fetch_one(&mut *tx.inner)
        .await
        .map_err(OpError::from)
        .map_err(|e| {
            if is_unique_violation(&e) {
                OpError::name_taken("site", name)
            } else {
                e
            }
        })?;
    let site = SiteId(u64_of(col(&row, "id")?));
    let (token, expires) = insert_enrollment_token(tx, site, now, policy).await?;
    tx.audit(now, actor, "site.create", &format!("site:{site}"), name)
        .await?;
    Ok(SiteCreated {
        site_id: site,
        name: name.to_owned(),
        enrollment_token: token,
        token_expires_at: UnixMillis(u64_of(expires)),
        agent: true,
        public_key: None,
    })
}

/// A fresh pre-shared key for a site of kind `tunnel`, if it needs one.
fn psk_for(tunnel: TunnelKind) -> Option<Psk> {
    match tunnel {
        TunnelKind::Ipsec => Some(Psk::generate()),
        TunnelKind::Wireguard => None,
    }
}

/// A site's tunnel kind.
///
/// # Errors
/// `NotFound`, or a stored kind that is not one.
pub(super) async fn site_kind(tx: &mut Tx, site: SiteId) -> OpResult<TunnelKind> {
    let row = tx
        .row_by_id("SELECT tunnel FROM sites WHERE id = $1", site.0, "site")
        .await?;
    Ok(enum_parse(&col::<String>(&row, "tunnel")?)?)
}

/// Sets a site's tunnel kind: an IPsec site gets a fresh pre-shared key, a
/// WireGuard site loses it. Refused while the site has a tunnel (its open
/// requests would have to move to another kind's gateway mid-maintenance).
///
/// # Errors
/// `NotFound`; `InvalidState` while the site has a tunnel.
pub async fn set_site_tunnel(
    tx: &mut Tx,
    site: SiteId,
    tunnel: TunnelKind,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    tx.lock_site(site).await.map_err(site_not_found)?;
    let old = site_kind(tx, site).await?;
    if old == tunnel {
        return Ok(());
    }
    if is_agentless(&mut tx.inner, site).await? {
        return Err(OpError::InvalidState(
            "a site without an agent is a WireGuard site (its router's files are wg-quick files)"
                .into(),
        ));
    }
    if site_gateway(tx, site).await?.is_some() {
        return Err(OpError::InvalidState(
            "the site has a tunnel (open requests); its tunnel kind can change once they end"
                .into(),
        ));
    }
    let psk = psk_for(tunnel);
    sqlx::query("UPDATE sites SET tunnel = $1, ipsec_psk = $2 WHERE id = $3")
        .bind(enum_str(&tunnel))
        .bind(psk.as_ref().map(Psk::expose))
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    tx.bump_site(site).await?;
    tx.touch_console();
    tx.audit(
        now,
        actor,
        "site.tunnel",
        &format!("site:{site}"),
        &format!("{old} => {tunnel}"),
    )
    .await?;
    Ok(())
}

/// The parameters of IPsec site `site` for a router configured by hand,
/// recorded in the audit log (without the key).
///
/// # Errors
/// `NotFound` for an unknown site or a WireGuard site.
pub async fn read_ipsec_config(
    tx: &mut Tx,
    site: SiteId,
    actor: &str,
    now: i64,
) -> OpResult<IpsecSiteConfig> {
    let config = ipsec_config(&mut tx.inner, site)
        .await
        .map_err(site_not_found)?
        .ok_or(OpError::NotFound("IPsec site"))?;
    tx.audit(
        now,
        actor,
        "site.ipsec_config",
        &format!("site:{site}"),
        "IPsec parameters read",
    )
    .await?;
    Ok(config)
}

async fn insert_enrollment_token(
    tx: &mut Tx,
    site: SiteId,
    now: i64,
    policy: &Policy,
) -> OpResult<(String, i64)> {
    // Only the newest token is valid.
    sqlx::query("UPDATE enrollment_tokens SET used_at = $1 WHERE site_id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    let token = Secret::generate(SecretKind::Enrollment);
    let expires = now.saturating_add(policy.token_lifetime_ms);
    sqlx::query(
        "INSERT INTO enrollment_tokens (token_hash, site_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(token.hash())
    .bind(id64(site.0))
    .bind(now)
    .bind(expires)
    .execute(&mut *tx.inner)
    .await?;
    Ok((token.expose().to_owned(), expires))
}

/// A fresh enrollment token for an existing site (re-enrollment).
///
/// # Errors
/// `NotFound` for an unknown site.
pub async fn new_site_token(
    tx: &mut Tx,
    site: SiteId,
    actor: &str,
    now: i64,
    policy: &Policy,
) -> OpResult<SiteCreated> {
    let row = tx
        .row_by_id(
            "SELECT name, agentless FROM sites WHERE id = $1",
            site.0,
            "site",
        )
        .await?;
    if col::<i64>(&row, "agentless")? != 0 {
        return Err(no_agent());
    }
    let name: String = col(&row, "name")?;
    let (token, expires) = insert_enrollment_token(tx, site, now, policy).await?;
    tx.audit(now, actor, "site.token", &format!("site:{site}"), "")
        .await?;
    Ok(SiteCreated {
        site_id: site,
        name,
        enrollment_token: token,
        token_expires_at: UnixMillis(u64_of(expires)),
        agent: true,
        public_key: None,
    })
}

/// Redeems a one-time token: the site gets the agent's public key and a new
/// credential (rotating any previous one).
///
/// # Errors
/// `BadToken`; `Conflict` when another site uses the key.
pub async fn enroll(
    tx: &mut Tx,
    token: &str,
    key: PublicKey,
    now: i64,
) -> OpResult<EnrollResponse> {
    let hash = Secret::hash_of(token);
    let row = sqlx::query(
        "SELECT site_id, expires_at, used_at FROM enrollment_tokens WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx.inner)
    .await?
    .ok_or(OpError::BadToken)?;
    let site = SiteId(u64_of(col(&row, "site_id")?));
    let used: Option<i64> = col(&row, "used_at")?;
    if used.is_some() || col::<i64>(&row, "expires_at")? <= now {
        return Err(OpError::BadToken);
    }
    tx.lock_site(site).await?;
    let disabled = sqlx::query("SELECT disabled FROM sites WHERE id = $1")
        .bind(id64(site.0))
        .fetch_one(&mut *tx.inner)
        .await?;
    if col::<i64>(&disabled, "disabled")? != 0 {
        return Err(OpError::InvalidState(
            "the site is disabled; the operator must enable it first".into(),
        ));
    }
    let key_b64 = key.to_base64();
    tx.site_key_free(&key_b64, Some(site)).await?;
    // Single use even when two enrollments race: only one update matches.
    let claimed = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
    )
    .bind(now)
    .bind(&hash)
    .execute(&mut *tx.inner)
    .await?;
    if claimed.rows_affected() != 1 {
        return Err(OpError::BadToken);
    }
    let credential = Secret::generate(SecretKind::Site);
    let row = sqlx::query(&format!(
        "UPDATE sites SET public_key = $1, credential_hash = $2, enrolled_at = $3, \
             key_rotated_at = $3, credential_rotated_at = $3, {} WHERE id = $4 RETURNING name",
        super::rotation::RESET_SQL
    ))
    .bind(&key_b64)
    .bind(credential.hash())
    .bind(now)
    .bind(id64(site.0))
    .fetch_one(&mut *tx.inner)
    .await?;
    let name: String = col(&row, "name")?;
    tx.bump_site(site).await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        // The peer's key changed.
        tx.bump_gateway(gw).await?;
    }
    tx.audit(
        now,
        &format!("site:{site}"),
        "site.enroll",
        &format!("site:{site}"),
        &format!("public key {key_b64}"),
    )
    .await?;
    Ok(EnrollResponse {
        site_id: site,
        site_name: name,
        credential: credential.expose().to_owned(),
    })
}

/// Records what an agent applied.
///
/// # Errors
/// Database failures.
pub async fn site_applied(
    tx: &mut Tx,
    site: SiteId,
    version: u64,
    errors: &[String],
) -> OpResult<()> {
    sqlx::query("UPDATE sites SET applied_version = $1, applied_errors = $2 WHERE id = $3")
        .bind(id64(version))
        .bind(serde_json::to_string(errors).unwrap_or_default())
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    Ok(())
}

/// Records (in its own transaction) that a site asked for maintenance and
/// nothing could be allocated; the agent shows it to the customer.
///
/// # Errors
/// Database failures.
pub async fn set_problem(tx: &mut Tx, site: SiteId, problem: &str) -> OpResult<()> {
    let r = sqlx::query(
        "UPDATE sites SET problem = $1 WHERE id = $2 AND (problem IS NULL OR problem <> $1)",
    )
    .bind(problem)
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    if r.rows_affected() > 0 {
        tx.bump_site(site).await?;
    }
    Ok(())
}

/// A missing site row as the operator's `NotFound`; other failures as they are.
fn site_not_found(e: DbError) -> OpError {
    match e {
        DbError::NotFound => OpError::NotFound("site"),
        e => OpError::Db(e),
    }
}

/// Revokes every open request of `site` (its addresses return to the pool,
/// its tunnel slot is freed and the gateway drops its peer); returns how many.
async fn revoke_open_requests(tx: &mut Tx, site: SiteId, actor: &str, now: i64) -> OpResult<usize> {
    let rows = sqlx::query(
        "SELECT id FROM requests WHERE site_id = $1 AND state IN ('waiting', 'in_progress') ORDER BY id",
    )
    .bind(id64(site.0))
    .fetch_all(&mut *tx.inner)
    .await?;
    let open = ids_of(&rows, "id", RequestId)?;
    for id in &open {
        close_request(tx, *id, RequestState::Revoked, Some(site), actor, now).await?;
    }
    Ok(open.len())
}

/// Disables (or enables again) a site. Disabled, its agent's credential is
/// refused (401), its open requests are revoked (addresses back to the
/// pool, the gateway drops its peer) and it cannot enroll.
///
/// # Errors
/// `NotFound`.
pub async fn set_site_disabled(
    tx: &mut Tx,
    site: SiteId,
    disabled: bool,
    actor: &str,
    now: i64,
) -> OpResult<()> {
    tx.lock_site(site).await.map_err(site_not_found)?;
    sqlx::query("UPDATE sites SET disabled = $1 WHERE id = $2")
        .bind(i64::from(disabled))
        .bind(id64(site.0))
        .execute(&mut *tx.inner)
        .await?;
    let detail = if disabled {
        let n = revoke_open_requests(tx, site, actor, now).await?;
        format!("{n} open request(s) revoked")
    } else {
        String::new()
    };
    tx.bump_site(site).await?;
    let action = if disabled {
        "site.disable"
    } else {
        "site.enable"
    };
    tx.audit(now, actor, action, &format!("site:{site}"), &detail)
        .await?;
    Ok(())
}

/// Deletes a site and everything stored about it (requests, failure
/// reports, enrollment tokens); its open requests are revoked first. The
/// audit log keeps its history.
///
/// # Errors
/// `NotFound`.
pub async fn delete_site(tx: &mut Tx, site: SiteId, actor: &str, now: i64) -> OpResult<()> {
    let name = tx.lock_site(site).await.map_err(site_not_found)?;
    revoke_open_requests(tx, site, actor, now).await?;
    if let Some(gw) = site_gateway(tx, site).await? {
        sqlx::query("DELETE FROM tunnels WHERE site_id = $1")
            .bind(id64(site.0))
            .execute(&mut *tx.inner)
            .await?;
        release_slot(tx, gw).await?;
        tx.bump_gateway(gw).await?;
    }
    sqlx::query(
        "UPDATE nat_addresses SET site_id = NULL, terminal = NULL, allocated_at = NULL, released_at = $2 \
         WHERE site_id = $1",
    )
    .bind(id64(site.0))
    .bind(now)
    .execute(&mut *tx.inner)
    .await?;
    for sql in [
        "DELETE FROM request_terminals WHERE request_id IN (SELECT id FROM requests WHERE site_id = $1)",
        "DELETE FROM requests WHERE site_id = $1",
        "DELETE FROM failures WHERE site_id = $1",
        "DELETE FROM enrollment_tokens WHERE site_id = $1",
        "DELETE FROM sites WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(id64(site.0))
            .execute(&mut *tx.inner)
            .await?;
    }
    tx.touch_console();
    tx.audit(now, actor, "site.delete", &format!("site:{site}"), &name)
        .await?;
    Ok(())
}

/// Rotates a site's credential at once: the current one is refused from the
/// commit on, and a fresh enrollment token (returned) lets the agent enroll
/// again (`--token`), getting a new credential. For a credential that may
/// have leaked; [`new_site_token`] alone leaves the current one valid until
/// the agent re-enrolls. An IPsec site also gets a new pre-shared key, in
/// force on its gateway at once (the old one is refused from then on).
///
/// # Errors
/// `NotFound`.
pub async fn rotate_site(
    tx: &mut Tx,
    site: SiteId,
    actor: &str,
    now: i64,
    policy: &Policy,
) -> OpResult<SiteCreated> {
    let name = tx.lock_site(site).await.map_err(site_not_found)?;
    if is_agentless(&mut tx.inner, site).await? {
        return Err(no_agent());
    }
    let psk = psk_for(site_kind(tx, site).await?);
    let had_next_key =
        sqlx::query("SELECT id FROM sites WHERE id = $1 AND next_public_key IS NOT NULL")
            .bind(id64(site.0))
            .fetch_optional(&mut *tx.inner)
            .await?
            .is_some();
    sqlx::query(
        // The previous credential of a planned rotation goes too.
        &format!(
            "UPDATE sites SET credential_hash = NULL, ipsec_psk = COALESCE($1, ipsec_psk), {} \
             WHERE id = $2",
            super::rotation::RESET_SQL
        ),
    )
    .bind(psk.as_ref().map(Psk::expose))
    .bind(id64(site.0))
    .execute(&mut *tx.inner)
    .await?;
    let (token, expires) = insert_enrollment_token(tx, site, now, policy).await?;
    if psk.is_some() || had_next_key {
        tx.bump_site(site).await?;
        if let Some(gw) = site_gateway(tx, site).await? {
            tx.bump_gateway(gw).await?;
        }
    }
    let detail = if psk.is_some() {
        "credential revoked, new enrollment token, new pre-shared key"
    } else {
        "credential revoked, new enrollment token"
    };
    tx.audit(now, actor, "site.rotate", &format!("site:{site}"), detail)
        .await?;
    Ok(SiteCreated {
        site_id: site,
        name,
        enrollment_token: token,
        token_expires_at: UnixMillis(u64_of(expires)),
        agent: true,
        public_key: None,
    })
}
