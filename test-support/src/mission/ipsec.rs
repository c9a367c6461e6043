//! Site 6: an IPsec site without a router agent. Its router is strongSwan
//! (Debian's 5.9.8 with kernel-libipsec, `scripts/strongswan-peer.sh`),
//! configured by hand from the parameters the server gives the operator
//! (`GET /api/v1/sites/{id}/ipsec`, `maintenance-server site ipsec-config
//! ID`), as docs/OPERATIONS.md, "Hand-configured IPsec sites", says: the
//! site is enrolled once with a throwaway key, its requests are made with
//! that site credential, the router holds the NAT address on `lo`, does the
//! 1:1 NAT with nftables and initiates IKEv2 to the gateways.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::actors::{Mission, Site};
use super::world::{World, within};
use super::{IPSEC_ROUTER_SITE, PC, Tunnel, detail};
use crate::netns::Netns;
use crate::strongswan::{PeerOptions, StrongSwan};

/// The router's WAN address (`scripts/world.sh`).
const ROUTER_WAN: &str = "198.51.100.16";

impl Mission {
    /// The operator creates site 6 as an IPsec site and enrolls it once
    /// with a throwaway public key (IPsec does not use it): its requests are
    /// made with the site credential this returns.
    pub(super) fn add_hand_configured_site(&mut self) -> String {
        let n = IPSEC_ROUTER_SITE;
        let name = format!("site {n}");
        let (code, v) = self.operator(
            "POST",
            "/api/v1/sites",
            Some(&json!({ "name": name, "tunnel": "ipsec" })),
        );
        assert_eq!(code, 201, "create {name}: {v}");
        let id = v["site_id"].as_u64().unwrap();
        let token = v["enrollment_token"].as_str().unwrap().to_owned();
        let key = self
            .w
            .sh(
                "server",
                "python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'",
            )
            .trim()
            .to_owned();
        let (code, e) = self.w.curl(
            "server",
            &["-X", "POST", "http://127.0.0.1:8080/api/v1/enroll"],
            Some(&json!({ "token": token, "public_key": key })),
        );
        assert!(code == 200 || code == 201, "enroll {name}: {e}");
        self.sites.push(Site {
            n,
            name,
            id,
            tunnel: Tunnel::IpsecRouter,
            page: "",
            lan_host: "pc6",
        });
        assert_eq!(self.site_view(n)["tunnel"], "ipsec");
        detail(&format!(
            "site {n}: IPsec, no agent (its router r6 will be configured by hand); enrolled once by the operator with a throwaway key"
        ));
        e["credential"].as_str().unwrap().to_owned()
    }

    /// A request for site 6's PC, made with the site credential (what the
    /// agent's button does elsewhere): (request id, NAT address).
    pub(super) fn hand_request(&self, credential: &str) -> (u64, String) {
        let auth = format!("Authorization: Bearer {credential}");
        let (code, v) = self.w.curl(
            "server",
            &[
                "-X",
                "POST",
                "-H",
                &auth,
                "http://127.0.0.1:8080/api/v1/agent/requests",
            ],
            Some(&json!({
                "requester_name": "Customer of site 6 (by phone)",
                "level": "general",
                "urgency": "high",
                "phone": "+49 30 1234 566",
                "content": "The scale does not weigh.",
                "terminals": ["pc"],
            })),
        );
        assert_eq!(code, 201, "site 6's request: {v}");
        let nat = v["terminals"][0]["nat_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no NAT address in {v}"))
            .to_owned();
        (v["id"].as_u64().unwrap(), nat)
    }

    /// The operator's view of an IPsec site's parameters
    /// (`GET /api/v1/sites/{id}/ipsec`: an `IpsecSiteConfig`).
    pub(super) fn ipsec_config(&self, s: usize) -> Value {
        let id = self.sites[s - 1].id;
        let (code, v) = self.operator("GET", &format!("/api/v1/sites/{id}/ipsec"), None);
        assert_eq!(code, 200, "site {s}'s IPsec parameters: {v}");
        v
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

/// Site 6's router: strongSwan with the server's parameters.
///
/// What the router does when its gateway dies: strongSwan's dead-peer
/// detection (here `dpd_delay = 2s`, 2 retransmissions from 0.5 s, instead
/// of the server's 30 s and strongSwan's 5 from 4 s, so that the failover
/// takes seconds) declares the IKE SA dead, and `dpd_action = restart`
/// makes charon initiate again — but strongSwan 5.9.8 initiates to the
/// *first* of `remote_addrs` only (re-establishing, it resolves the
/// configured list again, and that yields its first address). Seen in a
/// run against two strongSwan responders, `remote_addrs = A, B` and A's
/// charon killed: "sending DPD request",
/// 2 retransmits, "giving up after 2 retransmits", "restarting CHILD_SA
/// net", "initiating IKE_SA peer[2] to A", 2 retransmits, "establishing
/// IKE_SA failed, peer not responding" — and nothing more, B is never
/// tried (nor when the very first IKE_SA_INIT to A goes unanswered). So
/// this router does what a router with a primary and a backup peer does:
/// whenever it has no established IKE SA, it restarts IPsec with the next
/// gateway address of its list first and initiates. Its list is the
/// server's: the carrying gateway, then every other gateway that runs
/// IPsec; the server moves the site to one of them, and the identities and
/// the key are the same on every gateway.
pub(super) struct HandRouter {
    /// The world's namespace `r6` as the strongSwan guard takes it (a
    /// handle: `world.sh down` deletes the namespace).
    ns: Netns,
    swan: Option<StrongSwan>,
    opts: PeerOptions,
    /// The gateways' addresses, in the order the router tries them.
    gateways: Vec<String>,
    /// What the router did, with the time since [`HandRouter::watch`]'s `t0`.
    pub(super) events: Vec<String>,
}

impl HandRouter {
    /// Configures r6 from `cfg` (the server's `IpsecSiteConfig`) and brings
    /// the tunnel up.
    pub(super) fn configure(w: &World, cfg: &Value) -> Self {
        let p = &cfg["ipsec"];
        let local_ts = strings(&p["local_ts"]);
        let remote_ts = strings(&p["remote_ts"]);
        let gateways = strings(&cfg["gateway_addresses"]);
        assert_eq!(local_ts.len(), 1, "one NAT address (one PC): {cfg}");
        let nat = local_ts[0]
            .strip_suffix("/32")
            .unwrap_or_else(|| panic!("a /32 NAT address: {cfg}"));
        // charon needs an address inside its local traffic selector: the
        // routes it installs (table 220, via ipsec0) take it as source.
        w.sh("r6", &format!("ip addr add {nat}/32 dev lo"));
        // The 1:1 NAT: the technicians' packets to the NAT address go to the
        // PC, the PC's answers leave with the NAT address (the selector).
        let tech = remote_ts.join(", ");
        w.sh(
            "r6",
            &format!(
                "nft -f - <<'EOF'\n\
                 table ip vpnnat {{\n\
                   chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n\
                     ip saddr {{ {tech} }} ip daddr {nat} dnat to {PC}; }}\n\
                   chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
                     ip saddr {PC} ip daddr {{ {tech} }} snat to {nat}; }}\n\
                 }}\n\
                 EOF"
            ),
        );
        let opts = PeerOptions {
            local_id: Some(p["local_id"].as_str().unwrap().to_owned()),
            remote_id: Some(p["remote_id"].as_str().unwrap().to_owned()),
            ike_proposals: Some(p["ike_proposal"].as_str().unwrap().to_owned()),
            // 5.9.8's libipsec needs "no extended sequence numbers" spelled out.
            esp_proposals: Some(format!("{}-noesn", p["esp_proposal"].as_str().unwrap())),
            // Short liveness checks (the server's file says 30 s): a quick failover.
            dpd: Some("2s".to_owned()),
            retransmit_tries: Some(2),
            retransmit_timeout: Some("0.5".to_owned()),
            // As the server's file: restart the CHILD_SA when the peer is gone.
            extra: vec!["--dpd-action".to_owned(), "restart".to_owned()],
            // The server's file says `start_action = start`; here the router
            // initiates explicitly, so that the scenario knows when it did.
            ..PeerOptions::new(
                ROUTER_WAN,
                &gateways.join(", "),
                p["psk"].as_str().unwrap(),
                &local_ts.join(","),
                &remote_ts.join(","),
            )
        };
        let mut r = Self {
            ns: Netns::existing(&w.ns("r6")),
            swan: None,
            opts,
            gateways,
            events: Vec::new(),
        };
        r.start();
        let swan = r.swan.as_ref().unwrap();
        within(
            "site 6's router to bring its IKE SA and CHILD_SA up",
            Duration::from_secs(30),
            || swan.initiate(),
        );
        r
    }

    /// The gateway address the router dials first now.
    pub(super) fn dialing(&self) -> &str {
        &self.gateways[0]
    }

    /// How the router is configured, for the narrative.
    pub(super) fn describe(&self) -> String {
        format!(
            "remote_addrs = {}, dpd_delay 2 s, 2 retransmissions from 0.5 s, dpd_action restart",
            self.gateways.join(", ")
        )
    }

    fn start(&mut self) {
        self.opts.remote = self.gateways.join(", ");
        self.swan = Some(StrongSwan::start(&self.ns, &self.opts));
    }

    /// Whether an IKE SA with an installed CHILD_SA is up.
    pub(super) fn established(&self) -> bool {
        self.swan.as_ref().is_some_and(|s| {
            s.sas()
                .iter()
                .any(|sa| sa.state == "ESTABLISHED" && sa.installed_child().is_some())
        })
    }

    /// One look of the router's watchdog (see [`HandRouter`]): without an
    /// established IKE SA it restarts IPsec with the next gateway first and
    /// initiates (a failed try leaves it down: the next look moves on).
    pub(super) fn watch(&mut self, t0: Instant) {
        if self.established() {
            return;
        }
        let gave_up = self
            .swan
            .as_ref()
            .map(|s| s.log().matches("giving up after").count())
            .unwrap_or_default();
        let dead = self.gateways[0].clone();
        self.gateways.rotate_left(1);
        self.swan = None;
        self.start();
        let up = self.swan.as_ref().unwrap().initiate();
        self.events.push(format!(
            "{} ms: no IKE SA left{}; restarted strongSwan with remote_addrs = {}: {}",
            t0.elapsed().as_millis(),
            if gave_up > 0 {
                format!(" (its dead-peer detection gave {dead} up)")
            } else {
                String::new()
            },
            self.gateways.join(", "),
            if up {
                format!("IKE SA and CHILD_SA up at {} ms", t0.elapsed().as_millis())
            } else {
                "no SA yet".to_owned()
            }
        ));
    }

    /// `--keep`: charon stays; `world.sh down` ends it with the namespace.
    pub(super) fn leave_running(mut self) {
        std::mem::forget(self.swan.take());
    }
}
