//! The write side, one place to import it from: every state change runs
//! inside the caller's [`Tx`](super::Tx), appends to the audit log and bumps
//! the versions of the documents it changes, so that the gateways' and
//! agents' long-polls see it (docs/DESIGN.md, "Lifecycle").
//!
//! The operations live by concern: [`sites`](super::sites) (creation,
//! enrollment), [`gateways`](super::gateways) (registration, heartbeats,
//! drain), [`tunnels`](super::tunnels) (slots and failover),
//! [`requests`](super::requests) (maintenance requests and failure
//! reports), [`addresses`](super::addresses) (the NAT-address pool),
//! [`technicians`](super::technicians) (console users and sessions) and
//! [`restore`](super::restore).

pub use super::agentless::{create_agentless_site, read_wireguard_config};
pub use super::error::{OpError, OpResult};
pub use super::gateways::{
    create_gateway, delete_gateway, drain, gateway_applied, heartbeat, key_rotation_status,
    mark_down, register_gateway, request_key_rotation, rotate_gateway, schedule_key_rotations,
    set_gateway_disabled, wireguard_sites_without_agent,
};
pub use super::policy::Policy;
pub use super::requests::{
    Origin, acknowledge_failure, apply_retention, close_request, due_requests, expiring_requests,
    link_failure, mark_expiry_warned, new_request, start_request, store_failure,
};
pub use super::restore::advance_versions;
pub use super::sites::{
    create_site, delete_site, enroll, new_site_token, read_ipsec_config, rotate_site, set_problem,
    set_site_disabled, set_site_tunnel, site_applied,
};
pub use super::technicians::{
    NewSession, close_session, delete_expired_sessions, delete_technician, open_session,
    password_of, record_failed_login, set_technician_disabled, upsert_technician,
};
pub use super::tunnels::{STRANDED, failover_site, move_site, strand_site, stranded_sites};
