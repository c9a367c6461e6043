//! Following the desired state: validating and installing mappings, the
//! customer's own revocations, and dialling, re-dialling or closing the
//! tunnel to the gateway the server names.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use super::{AgentEvent, AgentState, DataMode, Mapping, Peer, RemovedBecause, deadline};
use crate::messages::{
    AgentDesiredState, AgentTunnel, AppliedState, IpsecParams, RequestId, TerminalName, TunnelKind,
    UnixMillis,
};
use crate::tunnel::{Kinds, Tunnel};

impl<K: Kinds> AgentState<K> {
    /// Reconciles to `desired`. `names` holds the real address of every
    /// terminal the caller could resolve; `now` and `wall` are the same moment
    /// on the monotonic clock and on the clock that wrote the document's
    /// `expires_at` times (the server's: a mapping lives for `expires_at -
    /// wall` from `now`, whatever this host's own wall clock says).
    ///
    /// Returns what was applied (errors name mappings that could not be
    /// installed), or `None` when the document is not newer than the one in
    /// force or is for another site (nothing changes then).
    pub fn handle_desired_state(
        &mut self,
        desired: &AgentDesiredState,
        names: &BTreeMap<TerminalName, Ipv4Addr>,
        now: Instant,
        wall: UnixMillis,
    ) -> Option<AppliedState> {
        if desired.site_id != self.site_id {
            tracing::warn!(
                site.id = %self.site_id,
                document.site = %desired.site_id,
                "desired state for another site ignored"
            );
            return None;
        }
        if self.applied_version.is_some_and(|v| desired.version <= v) {
            return None;
        }
        let mut errors = Vec::new();
        // What the document asks for, validated.
        let mut wanted: BTreeMap<Ipv4Addr, Mapping> = BTreeMap::new();
        let mut reals: BTreeMap<Ipv4Addr, Ipv4Addr> = BTreeMap::new();
        for m in &desired.mappings {
            if m.expires_at <= wall || self.revoked.contains(&m.request_id) {
                // Consent already over: never install it.
                continue;
            }
            if self.consent_required && !self.consented.contains(&m.request_id) {
                errors.push(format!(
                    "{}: request {} was not made on this router's page; not installed",
                    m.nat_address, m.request_id
                ));
                continue;
            }
            if !is_unicast(m.nat_address) {
                errors.push(format!("{}: not a unicast NAT address", m.nat_address));
                continue;
            }
            let Some(&real) = names.get(&m.terminal) else {
                errors.push(format!(
                    "{}: terminal {} does not resolve on the LAN",
                    m.nat_address, m.terminal
                ));
                continue;
            };
            if let Some(other) = reals.get(&real) {
                errors.push(format!(
                    "{}: terminal {} is already mapped as {other}",
                    m.nat_address, m.terminal
                ));
                continue;
            }
            if wanted.contains_key(&m.nat_address) {
                errors.push(format!("{}: listed twice", m.nat_address));
                continue;
            }
            reals.insert(real, m.nat_address);
            wanted.insert(
                m.nat_address,
                Mapping {
                    real,
                    terminal: m.terminal.clone(),
                    request_id: m.request_id,
                    expires_wall: m.expires_at,
                    expires_at: deadline(m.expires_at, now, wall),
                },
            );
        }

        // Remove what is gone or changed first, so that a real address that
        // moves to another NAT address is free when it is inserted again.
        let stale: Vec<(Ipv4Addr, RemovedBecause)> = self
            .mappings
            .iter()
            .filter_map(|(nat, old)| match wanted.get(nat) {
                None => Some((*nat, RemovedBecause::Withdrawn)),
                Some(new) if new.real != old.real => Some((*nat, RemovedBecause::Replaced)),
                Some(_) => None,
            })
            .collect();
        for (nat, because) in stale {
            self.remove_mapping(nat, because);
        }
        for (nat, new) in wanted {
            match self.mappings.get_mut(&nat) {
                Some(old) => {
                    // Same terminal and address: the expiry or request may move.
                    if old.expires_at != new.expires_at {
                        old.expires_at = new.expires_at;
                        old.expires_wall = new.expires_wall;
                        let _ = self.nat.remove(nat);
                        if self.mode != DataMode::Netstack
                            && let Err(e) = self.nat.insert(nat, old.real, Some(old.expires_at))
                        {
                            errors.push(format!("{nat}: {e}"));
                        }
                    }
                    old.request_id = new.request_id;
                    old.terminal = new.terminal;
                }
                None => {
                    if self.mode != DataMode::Netstack
                        && let Err(e) = self.nat.insert(nat, new.real, Some(new.expires_at))
                    {
                        errors.push(format!("{nat}: {e}"));
                        continue;
                    }
                    tracing::info!(
                        nat = %nat,
                        terminal = %new.terminal,
                        request.id = %new.request_id,
                        "mapping installed"
                    );
                    tracing::debug!(nat = %nat, real = %new.real, "mapping target");
                    self.push_event(AgentEvent::MappingInstalled {
                        nat,
                        real: new.real,
                        terminal: new.terminal.clone(),
                    });
                    self.mappings.insert(nat, new);
                }
            }
        }
        self.desired_tunnel = match &desired.tunnel {
            // Refused here, where the refusal reaches the applied state, so
            // that `dial` never asks for a kind the set cannot build.
            Some(t) if !K::KINDS.contains(&t.kind) => {
                let e = format!(
                    "this router agent cannot run {} tunnels yet",
                    t.kind.label()
                );
                tracing::warn!(gateway.id = %t.gateway_id, "{e}");
                errors.push(e);
                None
            }
            Some(t)
                if t.kind == TunnelKind::Ipsec
                    && t.ipsec.as_ref().is_none_or(|p| p.validate().is_err()) =>
            {
                let e = match t.ipsec.as_ref().map(IpsecParams::validate) {
                    Some(Err(e)) => format!("IPsec tunnel parameters: {e}"),
                    _ => "an IPsec tunnel without IPsec parameters".to_owned(),
                };
                tracing::warn!(gateway.id = %t.gateway_id, "{e}");
                errors.push(e);
                None
            }
            t => t.clone(),
        };
        self.reconcile_tunnel(now);
        self.applied_version = Some(desired.version);
        Some(AppliedState {
            version: desired.version,
            errors,
        })
    }

    /// The customer ends access for request `id` here and now, whatever the
    /// server says: its mappings are removed and never installed again.
    /// Returns how many were removed.
    pub fn revoke_request(&mut self, id: RequestId, now: Instant) -> usize {
        self.revoked.insert(id);
        let gone: Vec<Ipv4Addr> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.request_id == id)
            .map(|(nat, _)| *nat)
            .collect();
        for nat in &gone {
            self.remove_mapping(*nat, RemovedBecause::Revoked);
        }
        if !gone.is_empty() {
            tracing::info!(request.id = %id, mappings = gone.len(), "access ended by the customer");
            self.reconcile_tunnel(now);
        }
        gone.len()
    }

    /// The LAN host behind `terminal` now has the address `real` (a DHCP
    /// lease gave it another one; the router agent follows it by its MAC
    /// address). Every mapping of `terminal` leads to `real` from now on,
    /// under the same NAT address, expiry and request: the technician keeps
    /// the address they were given. Connections to the old address end (in
    /// netstack mode the relays are dropped with the old mapping).
    ///
    /// Refused (returns 0, nothing changes) when another terminal's mapping
    /// already leads to `real`: the 1:1 NAT needs one NAT address per real
    /// address. Returns how many mappings moved.
    pub fn move_terminal(&mut self, terminal: &TerminalName, real: Ipv4Addr) -> usize {
        if !is_unicast(real)
            || self
                .mappings
                .values()
                .any(|m| m.real == real && m.terminal != *terminal)
        {
            return 0;
        }
        let moving: Vec<Ipv4Addr> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.terminal == *terminal && m.real != real)
            .map(|(nat, _)| *nat)
            .collect();
        let mut moved = 0;
        for nat in moving {
            let Some((old_real, request_id, expires_wall, expires_at)) = self
                .mappings
                .get(&nat)
                .map(|m| (m.real, m.request_id, m.expires_wall, m.expires_at))
            else {
                continue;
            };
            self.remove_mapping(nat, RemovedBecause::Replaced);
            if self.mode != DataMode::Netstack
                && let Err(e) = self.nat.insert(nat, real, Some(expires_at))
            {
                tracing::warn!(nat = %nat, terminal = %terminal, error = %e, "mapping not moved; removed");
                continue;
            }
            tracing::info!(nat = %nat, terminal = %terminal, "mapping follows its terminal to a new address");
            tracing::debug!(nat = %nat, from = %old_real, to = %real, "mapping target moved");
            self.push_event(AgentEvent::MappingInstalled {
                nat,
                real,
                terminal: terminal.clone(),
            });
            self.mappings.insert(
                nat,
                Mapping {
                    real,
                    terminal: terminal.clone(),
                    request_id,
                    expires_wall,
                    expires_at,
                },
            );
            moved += 1;
        }
        moved
    }

    /// Dials, re-dials or tears down the tunnel: up iff the server names a
    /// gateway and at least one mapping is in force.
    pub(super) fn reconcile_tunnel(&mut self, now: Instant) {
        let want = self
            .desired_tunnel
            .clone()
            .filter(|_| !self.mappings.is_empty());
        match (&self.peer, want) {
            (Some(p), Some(w))
                if p.desired.endpoint == w.endpoint
                    // An IPsec tunnel does not use the gateway's WireGuard
                    // key: its rotation must not re-dial it.
                    && (p.desired.public_key == w.public_key || w.kind == TunnelKind::Ipsec)
                    && p.desired.persistent_keepalive_s == w.persistent_keepalive_s
                    && p.desired.kind == w.kind
                    && p.desired.ipsec == w.ipsec =>
            {
                // Same gateway; the id may be renamed without a new handshake.
                if let Some(p) = self.peer.as_mut() {
                    p.desired.gateway_id = w.gateway_id;
                }
            }
            (_, Some(w)) => {
                self.close_tunnel();
                self.dial(w, now);
            }
            (Some(_), None) => self.close_tunnel(),
            (None, None) => {}
        }
    }

    pub(super) fn dial(&mut self, desired: AgentTunnel, now: Instant) {
        let index = (self.next_random() as u32) & K::MAX_INDEX;
        let Some(mut tunnel) = K::initiator(&desired, self.private_key.clone(), index, now) else {
            // `handle_desired_state` refused the kind, or the parameters
            // that do not fit it, already.
            return;
        };
        tracing::info!(
            gateway.id = %desired.gateway_id,
            endpoint = %desired.endpoint,
            "dialling the gateway"
        );
        self.push_event(AgentEvent::TunnelDialled {
            gateway_id: desired.gateway_id,
            endpoint: desired.endpoint,
        });
        let dst = desired.endpoint;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Ok(Some(init)) = tunnel.initiate_handshake(&mut scratch, true, now) {
            self.queue_transmit(dst, init);
        }
        self.scratch = scratch;
        self.peer = Some(Peer { desired, tunnel });
    }

    pub(super) fn close_tunnel(&mut self) {
        if let Some(p) = self.peer.take() {
            tracing::info!(gateway.id = %p.desired.gateway_id, "tunnel closed");
            self.push_event(AgentEvent::TunnelClosed {
                gateway_id: p.desired.gateway_id,
            });
        }
    }

    pub(super) fn remove_mapping(&mut self, nat: Ipv4Addr, because: RemovedBecause) {
        let Some(m) = self.mappings.remove(&nat) else {
            return;
        };
        let _ = self.nat.remove(nat);
        tracing::info!(nat = %nat, terminal = %m.terminal, ?because, "mapping removed");
        self.push_event(AgentEvent::MappingRemoved {
            nat,
            real: m.real,
            terminal: m.terminal,
            because,
        });
    }
}

fn is_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}
