//! Site 7: a WireGuard site without a router agent. Its router is a
//! standard Linux box with WireGuard (Debian's `wg-quick` with the userspace
//! wireguard-go) and nftables, configured with exactly the files the server
//! renders for it (`GET /api/v1/sites/{id}/wireguard`, `maintenance-server
//! site wireguard-config ID`), as docs/OPERATIONS.md, "Sites with a standard
//! WireGuard router", says: one wg-quick file per gateway (so the router
//! keeps a tunnel to each and the server's move of the site is the whole
//! failover) and the 1:1 NAT rules, re-applied after a request opens. The
//! customer phones in; the technician opens the request on their behalf.

use serde_json::{Value, json};

use super::actors::{Mission, Site};
use super::{AGENTLESS_SITE, PC, Tunnel, detail};

impl Mission {
    /// The operator creates site 7 without an agent (the server makes the
    /// router's key pair): no enrollment token.
    pub(super) fn add_agentless_site(&mut self) {
        let n = AGENTLESS_SITE;
        let name = format!("site {n}");
        let (code, v) = self.operator(
            "POST",
            "/api/v1/sites",
            Some(&json!({ "name": name, "agent": false })),
        );
        assert_eq!(code, 201, "create {name}: {v}");
        assert!(
            v.get("enrollment_token").is_none(),
            "a site without an agent gets no enrollment token: {v}"
        );
        let id = v["site_id"].as_u64().unwrap();
        self.sites.push(Site {
            n,
            name,
            id,
            tunnel: Tunnel::WireguardRouter,
            page: "",
            lan_host: "pc7",
        });
        assert_eq!(self.site_view(n)["agent"], false);
        detail(&format!(
            "site {n}: WireGuard, no agent (its router r7 runs wg-quick with the files the server renders); key pair made by the server"
        ));
    }

    /// The router configuration the server renders for site 7.
    pub(super) fn wireguard_config(&self) -> Value {
        let id = self.sites[AGENTLESS_SITE - 1].id;
        let (code, v) = self.operator("GET", &format!("/api/v1/sites/{id}/wireguard"), None);
        assert_eq!(code, 200, "site {AGENTLESS_SITE}'s router files: {v}");
        v
    }

    /// Writes the rendered files on router r7 (0600) and applies them: the
    /// wg-quick files are brought up when `bring_up`, the nftables file is
    /// applied every time (it flushes its own table first). Returns the
    /// names of the wg-quick interfaces.
    pub(super) fn apply_router_files(&self, config: &Value, bring_up: bool) -> Vec<String> {
        let dir = self.w.dir.join("r7");
        std::fs::create_dir_all(&dir).unwrap();
        let mut interfaces = Vec::new();
        for f in config["files"].as_array().expect("files") {
            let name = f["name"].as_str().unwrap();
            assert!(
                !name.contains('/') && !name.starts_with('.'),
                "a plain file name: {name}"
            );
            let path = dir.join(name);
            std::fs::write(&path, f["content"].as_str().unwrap()).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some(ifname) = name.strip_suffix(".conf") {
                interfaces.push(ifname.to_owned());
                if bring_up {
                    self.w.sh(
                        "r7",
                        &format!(
                            "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick up {} 2>&1",
                            path.display()
                        ),
                    );
                }
            }
        }
        self.w.sh(
            "r7",
            &format!("nft -f {}", dir.join("vpnnat-nat.nft").display()),
        );
        interfaces
    }

    /// The customer of site 7 phones in; the technician opens the request
    /// for its PC in the console, naming the PC's LAN address (the router
    /// has no agent that would resolve it): (request id, NAT address).
    pub(super) fn phoned_in_request(&self) -> (u64, String) {
        let id = self.sites[AGENTLESS_SITE - 1].id;
        let (code, v) = self.technician(
            "POST",
            &format!("/api/v1/sites/{id}/requests"),
            Some(&json!({
                "requester_name": "Customer of site 7 (by phone)",
                "level": "general",
                "urgency": "high",
                "phone": "+49 30 1234 567",
                "content": "The label printer is offline.",
                "terminals": [{ "name": "pc", "lan_address": PC }],
            })),
        );
        assert_eq!(code, 201, "site 7's request: {v}");
        let nat = v["terminals"][0]["nat_address"]
            .as_str()
            .unwrap_or_else(|| panic!("no NAT address in {v}"))
            .to_owned();
        (v["id"].as_u64().unwrap(), nat)
    }
}
