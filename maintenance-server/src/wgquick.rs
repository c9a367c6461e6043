//! The configuration of a site's standard WireGuard router (a site without
//! an agent): one wg-quick file per gateway and one nftables file.
//!
//! Failover without an agent: the router keeps one tunnel to every gateway
//! that runs WireGuard, each its own interface (`vpnnat-g<ID>`, `Table =
//! off`, the technician prefixes as `AllowedIPs`; WireGuard's rule that
//! `AllowedIPs` do not overlap holds per interface only). The server places
//! the site on one gateway at a time, so only that tunnel carries packets
//! for its NAT addresses; when the server moves the site, the next
//! gateway's tunnel does. Replies must leave by the interface the
//! technician's packet came in on: the nftables file marks each connection
//! (`ct mark`) by its incoming interface, copies the mark to every packet
//! of it, and each interface's `PostUp` routes its mark to itself through
//! a table of its own (`ip rule fwmark N lookup N`). The 1:1 DNAT of each
//! NAT address onto its LAN host makes conntrack rewrite the replies'
//! source back to the NAT address.

use std::fmt::Write as _;

use vpnnat::ipv4::Prefix;
use vpnnat::messages::{RouterFile, RouterMapping, SiteId, WireguardSiteConfig};

use crate::db::agentless::{RouterGateway, RouterSite};

/// The keepalive the router sends every 25 s (wg-quick's
/// `PersistentKeepalive`), so that a NAT in front of it keeps the mapping
/// and the gateway learns its endpoint without traffic.
pub const PERSISTENT_KEEPALIVE_S: u16 = 25;

/// Marks and routing tables: this plus the gateway's id.
pub const MARK_BASE: u64 = 51_800;

/// The name of the nftables file (and its table `ip vpnnat`).
pub const NFT_FILE: &str = "vpnnat-nat.nft";

/// The line a wg-quick file holds instead of a private key the server
/// does not know.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "PrivateKey = <the router's own private key>";

/// The interface (and file stem) of the tunnel to gateway `gw`.
pub fn interface(gw: &RouterGateway) -> String {
    format!("vpnnat-g{}", gw.id)
}

/// The fwmark and routing table of the tunnel to gateway `gw`.
pub fn mark(gw: &RouterGateway) -> u64 {
    MARK_BASE.saturating_add(gw.id.0)
}

/// Operator text on a comment line of its own.
fn comment_safe(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).collect()
}

fn join(prefixes: &[Prefix]) -> String {
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The wg-quick file of the tunnel of site `site` to gateway `gw`.
pub fn wg_quick_conf(
    site: SiteId,
    name: &str,
    private_key: Option<&str>,
    gw: &RouterGateway,
) -> String {
    let mut c = String::new();
    let iface = interface(gw);
    let n = mark(gw);
    let _ = writeln!(
        c,
        "# vpnnat site {site} ({}): tunnel to gateway {} ({})",
        comment_safe(name),
        gw.id,
        comment_safe(&gw.name)
    );
    let _ = writeln!(
        c,
        "# wg-quick up ./{iface}.conf; apply {NFT_FILE} too (one file per gateway, all up at once)"
    );
    if gw.rotating {
        let _ = writeln!(
            c,
            "# The gateway rotates its key: this file names its next key. Apply it again now; \
             the previous key stops working when the rotation ends."
        );
    }
    let _ = writeln!(c, "[Interface]");
    match private_key {
        Some(k) => {
            let _ = writeln!(c, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(c, "{PRIVATE_KEY_PLACEHOLDER}");
        }
    }
    // No routes from AllowedIPs: replies are routed by their mark (below),
    // so the same prefixes can lead into every gateway's tunnel.
    let _ = writeln!(c, "Table = off");
    // Reverse-path filtering checks a technician's packet against the
    // table of its mark once marks count for source validation.
    let _ = writeln!(
        c,
        "PostUp = sysctl -q -w net.ipv4.conf.all.src_valid_mark=1"
    );
    let _ = writeln!(c, "PostUp = ip rule add fwmark {n} lookup {n} priority {n}");
    for p in &gw.technician_prefixes {
        let _ = writeln!(c, "PostUp = ip route add {p} dev %i table {n}");
    }
    let _ = writeln!(
        c,
        "PostDown = ip rule del fwmark {n} lookup {n} priority {n} || true"
    );
    let _ = writeln!(c);
    let _ = writeln!(c, "[Peer]");
    let _ = writeln!(c, "PublicKey = {}", gw.public_key);
    let _ = writeln!(c, "Endpoint = {}", gw.endpoint);
    let _ = writeln!(c, "AllowedIPs = {}", join(&gw.technician_prefixes));
    let _ = writeln!(c, "PersistentKeepalive = {PERSISTENT_KEEPALIVE_S}");
    c
}

/// The nftables file: a table of its own (`ip vpnnat`), flushed first so
/// that `nft -f` can apply every new version over the last.
pub fn nft_rules(
    site: SiteId,
    name: &str,
    gateways: &[RouterGateway],
    mappings: &[RouterMapping],
) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# vpnnat site {site} ({}): 1:1 NAT of the NAT addresses onto the LAN hosts, and replies",
        comment_safe(name)
    );
    let _ = writeln!(
        c,
        "# by the tunnel they came in on. Apply with: nft -f {NFT_FILE}\n\
         # Apply it again after a request is opened or ended and after a gateway is added."
    );
    // Declaring the table first makes the flush valid on the first run.
    let _ = writeln!(c, "table ip vpnnat");
    let _ = writeln!(c, "flush table ip vpnnat");
    let _ = writeln!(c, "table ip vpnnat {{");
    let _ = writeln!(c, "\tchain tunnel_mark {{");
    let _ = writeln!(
        c,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    for gw in gateways {
        let _ = writeln!(
            c,
            "\t\tiifname \"{}\" ct mark set {}",
            interface(gw),
            mark(gw)
        );
    }
    if !gateways.is_empty() {
        let marks = gateways
            .iter()
            .map(|g| mark(g).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(c, "\t\tct mark {{ {marks} }} meta mark set ct mark");
    }
    let _ = writeln!(c, "\t}}");
    let _ = writeln!(c, "\tchain nat_in {{");
    let _ = writeln!(
        c,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    if gateways.is_empty() {
        let _ = writeln!(c, "\t\t# no gateway that runs WireGuard is registered yet");
    } else if mappings.is_empty() {
        let _ = writeln!(c, "\t\t# no request is open: the site holds no NAT address");
    } else {
        let ifaces = gateways
            .iter()
            .map(|g| format!("\"{}\"", interface(g)))
            .collect::<Vec<_>>()
            .join(", ");
        for m in mappings {
            let _ = writeln!(
                c,
                "\t\tiifname {{ {ifaces} }} ip daddr {} dnat to {} comment \"{}\"",
                m.nat_address, m.lan_address, m.terminal
            );
        }
    }
    let _ = writeln!(c, "\t}}");
    let _ = writeln!(c, "}}");
    c
}

/// `text` as a QR code (SVG), or `None` when it does not fit one.
pub fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(240, 240)
            .quiet_zone(true)
            .build(),
    )
}

/// The whole configuration of `site`.
pub fn render(site: &RouterSite) -> WireguardSiteConfig {
    let mut files = Vec::with_capacity(site.gateways.len() + 1);
    for gw in &site.gateways {
        let content = wg_quick_conf(site.site, &site.name, site.private_key.as_deref(), gw);
        files.push(RouterFile {
            name: format!("{}.conf", interface(gw)),
            gateway_id: Some(gw.id),
            qr_svg: qr_svg(&content),
            content,
        });
    }
    files.push(RouterFile {
        name: NFT_FILE.to_owned(),
        gateway_id: None,
        content: nft_rules(site.site, &site.name, &site.gateways, &site.mappings),
        qr_svg: None,
    });
    let mut instructions = String::from(
        "Bring every wg-quick file up on the router (wg-quick up ./FILE; all of them, one per \
         gateway: the server moves the site between gateways on its own), enable IPv4 \
         forwarding, and apply the nftables file (nft -f vpnnat-nat.nft). Apply the nftables file \
         again after every request opened or ended; bring the files up again after a gateway is \
         added (each gateway has its own file).",
    );
    if site.private_key.is_none() {
        instructions.push_str(
            " The files hold a placeholder for the router's private key: put its own key there.",
        );
    }
    if site.gateways.is_empty() {
        instructions.push_str(" No gateway that runs WireGuard is registered yet.");
    }
    for gw in site.gateways.iter().filter(|g| g.rotating) {
        // The router cannot follow the rotation by itself; the gateway
        // answers both keys only until it ends the rotation.
        let _ = write!(
            instructions,
            " Gateway {} rotates its key: bring {}.conf up again now, before the rotation ends.",
            gw.id,
            interface(gw)
        );
    }
    WireguardSiteConfig {
        site_id: site.site,
        name: site.name.clone(),
        public_key: site.public_key,
        private_key_included: site.private_key.is_some(),
        gateway_id: site.gateway,
        mappings: site.mappings.clone(),
        files,
        instructions,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vpnnat::messages::{GatewayId, PublicKey, TerminalName};

    fn gateway(id: u64) -> RouterGateway {
        RouterGateway {
            id: GatewayId(id),
            name: format!("gw{id}\n[Peer]"),
            endpoint: format!("203.0.113.{id}:51820").parse().unwrap(),
            public_key: PublicKey([u8::try_from(id).unwrap(); 32]),
            rotating: false,
            technician_prefixes: vec![
                "172.16.0.0/24".parse().unwrap(),
                "172.17.0.0/16".parse().unwrap(),
            ],
        }
    }

    fn site(private_key: Option<&str>, gateways: Vec<RouterGateway>) -> RouterSite {
        RouterSite {
            site: SiteId(7),
            name: "Bakery\n[Interface]".into(),
            public_key: PublicKey([9; 32]),
            private_key: private_key.map(str::to_owned),
            gateway: Some(GatewayId(2)),
            gateways,
            mappings: vec![
                RouterMapping {
                    terminal: TerminalName::new("till").unwrap(),
                    nat_address: "10.64.0.5".parse().unwrap(),
                    lan_address: "192.168.1.10".parse().unwrap(),
                },
                RouterMapping {
                    terminal: TerminalName::new("nas").unwrap(),
                    nat_address: "10.64.0.6".parse().unwrap(),
                    lan_address: "192.168.1.20".parse().unwrap(),
                },
            ],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).collect()
    }

    #[test]
    fn agentless_one_wg_quick_file_per_gateway_with_its_own_table() {
        let key = "i/26TrDnOKLQ9fMc894INcNGjSEEBpOjh4WSmi2GNmo=";
        let c = render(&site(Some(key), vec![gateway(1), gateway(2)]));
        assert!(c.private_key_included);
        assert_eq!(c.files.len(), 3);
        for (f, id) in c.files.iter().zip([1u64, 2]) {
            assert_eq!(f.name, format!("vpnnat-g{id}.conf"));
            assert_eq!(f.gateway_id, Some(GatewayId(id)));
            let l = lines(&f.content);
            let n = 51_800 + id;
            for want in [
                "[Interface]".to_owned(),
                format!("PrivateKey = {key}"),
                "Table = off".to_owned(),
                format!("PostUp = ip rule add fwmark {n} lookup {n} priority {n}"),
                format!("PostUp = ip route add 172.16.0.0/24 dev %i table {n}"),
                format!("PostUp = ip route add 172.17.0.0/16 dev %i table {n}"),
                format!("PostDown = ip rule del fwmark {n} lookup {n} priority {n} || true"),
                "[Peer]".to_owned(),
                format!("PublicKey = {}", PublicKey([u8::try_from(id).unwrap(); 32])),
                format!("Endpoint = 203.0.113.{id}:51820"),
                "AllowedIPs = 172.16.0.0/24, 172.17.0.0/16".to_owned(),
                "PersistentKeepalive = 25".to_owned(),
            ] {
                assert!(
                    l.contains(&want.as_str()),
                    "{want:?} missing:\n{}",
                    f.content
                );
            }
            // Operator text cannot add a section: only two, both ours.
            assert_eq!(
                l.iter().filter(|l| l.starts_with('[')).count(),
                2,
                "{}",
                f.content
            );
            assert!(f.qr_svg.as_deref().unwrap().contains("<svg"));
        }
    }

    #[test]
    fn agentless_a_gateway_rotating_its_key_is_named_by_its_next_key() {
        let mut rotating = gateway(2);
        rotating.rotating = true;
        let c = render(&site(None, vec![gateway(1), rotating]));
        assert!(!c.files[0].content.contains("rotates its key"));
        let conf = &c.files[1].content;
        assert!(conf.contains("# The gateway rotates its key"), "{conf}");
        assert!(
            conf.contains(&format!("PublicKey = {}", PublicKey([2; 32]))),
            "{conf}"
        );
        assert!(
            c.instructions.contains("Gateway 2 rotates its key")
                && !c.instructions.contains("Gateway 1 "),
            "{}",
            c.instructions
        );
    }

    #[test]
    fn agentless_without_the_private_key_the_file_has_a_placeholder() {
        let c = render(&site(None, vec![gateway(1)]));
        assert!(!c.private_key_included);
        assert!(lines(&c.files[0].content).contains(&PRIVATE_KEY_PLACEHOLDER));
        assert!(c.instructions.contains("placeholder"));
    }

    #[test]
    fn agentless_nft_rules_map_every_nat_address_and_mark_by_interface() {
        let c = render(&site(None, vec![gateway(1), gateway(2)]));
        let nft = &c.files[2];
        assert_eq!(nft.name, NFT_FILE);
        assert!(nft.qr_svg.is_none());
        let l = lines(&nft.content);
        for want in [
            "table ip vpnnat",
            "flush table ip vpnnat",
            "type filter hook prerouting priority mangle; policy accept;",
            "iifname \"vpnnat-g1\" ct mark set 51801",
            "iifname \"vpnnat-g2\" ct mark set 51802",
            "ct mark { 51801, 51802 } meta mark set ct mark",
            "type nat hook prerouting priority dstnat; policy accept;",
            "iifname { \"vpnnat-g1\", \"vpnnat-g2\" } ip daddr 10.64.0.5 dnat to 192.168.1.10 comment \"till\"",
            "iifname { \"vpnnat-g1\", \"vpnnat-g2\" } ip daddr 10.64.0.6 dnat to 192.168.1.20 comment \"nas\"",
        ] {
            assert!(l.contains(&want), "{want:?} missing:\n{}", nft.content);
        }
        // The flush comes before the table's body, so a re-apply replaces it.
        let flush = l
            .iter()
            .position(|x| *x == "flush table ip vpnnat")
            .unwrap();
        let body = l.iter().position(|x| *x == "table ip vpnnat {").unwrap();
        assert!(flush < body);
        // The site's name stays on the comment line.
        assert!(nft.content.lines().next().unwrap().starts_with('#'));
        assert_eq!(
            nft.content.matches('{').count(),
            nft.content.matches('}').count()
        );
    }

    #[test]
    fn agentless_nothing_open_or_no_gateway_renders_valid_empty_rules() {
        let mut s = site(None, vec![gateway(1)]);
        s.mappings.clear();
        let nft = nft_rules(s.site, &s.name, &s.gateways, &s.mappings);
        assert!(!nft.contains("dnat"), "{nft}");
        assert!(nft.contains("no request is open"), "{nft}");
        let c = render(&site(None, Vec::new()));
        assert_eq!(c.files.len(), 1);
        assert!(
            !c.files[0].content.contains("ct mark"),
            "{}",
            c.files[0].content
        );
        assert!(c.instructions.contains("No gateway"));
    }

    #[test]
    fn agentless_qr_code_is_svg_and_refuses_what_does_not_fit() {
        let svg = qr_svg("[Interface]\nPrivateKey = x\n").unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "{svg}");
        assert!(qr_svg(&"x".repeat(8000)).is_none());
    }
}
