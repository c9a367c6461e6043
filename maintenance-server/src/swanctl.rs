//! A strongSwan `swanctl.conf` for an IPsec site whose router is configured
//! by hand (no router agent): IKEv2 with the site's pre-shared key, the
//! router as initiator, one CHILD_SA from its NAT addresses to the
//! technician prefixes. The router maps each NAT address 1:1 onto a LAN
//! host itself (docs/OPERATIONS.md, "Hand-configured IPsec sites").

use std::fmt::Write as _;
use std::net::IpAddr;

use vpnnat::ipv4::Prefix;
use vpnnat::messages::{IpsecParams, SiteId};

/// The configuration for site `site` named `name`, dialling
/// `gateway_addresses` (strongSwan initiates to the first) with `ipsec`
/// (`local_*`: the router).
pub fn swanctl_conf(
    site: SiteId,
    name: &str,
    gateway_addresses: &[IpAddr],
    ipsec: &IpsecParams,
) -> String {
    let mut c = String::new();
    // `name` is operator text: keep it on a comment line of its own.
    let name: String = name.chars().filter(|ch| !ch.is_control()).collect();
    let _ = writeln!(c, "# vpnnat IPsec site {site}: {name}");
    let _ = writeln!(
        c,
        "# IKEv2 on UDP 500/4500; the router initiates and maps each NAT address\n\
         # (local_ts) 1:1 onto a LAN host."
    );
    let _ = writeln!(c, "connections {{");
    let _ = writeln!(c, "    vpnnat-site-{site} {{");
    let _ = writeln!(c, "        version = 2");
    if gateway_addresses.is_empty() {
        let _ = writeln!(c, "        # no gateway that runs IPsec is registered yet");
        let _ = writeln!(c, "        remote_addrs = %any");
    } else {
        let _ = writeln!(c, "        remote_addrs = {}", join(gateway_addresses));
    }
    let _ = writeln!(c, "        proposals = {}", ipsec.ike_proposal);
    let _ = writeln!(c, "        dpd_delay = 30s");
    let _ = writeln!(c, "        local {{");
    let _ = writeln!(c, "            auth = psk");
    let _ = writeln!(c, "            id = {}", ipsec.local_id);
    let _ = writeln!(c, "        }}");
    let _ = writeln!(c, "        remote {{");
    let _ = writeln!(c, "            auth = psk");
    let _ = writeln!(c, "            id = {}", ipsec.remote_id);
    let _ = writeln!(c, "        }}");
    let _ = writeln!(c, "        children {{");
    let _ = writeln!(c, "            vpnnat {{");
    if ipsec.local_ts.is_empty() {
        let _ = writeln!(
            c,
            "                # the site holds no NAT address now: no request is open"
        );
    } else {
        let _ = writeln!(c, "                local_ts = {}", join_ts(&ipsec.local_ts));
    }
    let _ = writeln!(
        c,
        "                remote_ts = {}",
        join_ts(&ipsec.remote_ts)
    );
    let _ = writeln!(c, "                esp_proposals = {}", ipsec.esp_proposal);
    let _ = writeln!(c, "                start_action = start");
    let _ = writeln!(c, "                dpd_action = restart");
    let _ = writeln!(c, "                close_action = restart");
    let _ = writeln!(c, "            }}");
    let _ = writeln!(c, "        }}");
    let _ = writeln!(c, "    }}");
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "secrets {{");
    let _ = writeln!(c, "    ike-vpnnat-site-{site} {{");
    let _ = writeln!(c, "        id-site = {}", ipsec.local_id);
    let _ = writeln!(c, "        id-gateway = {}", ipsec.remote_id);
    // Quoted: the base64 text itself is the key (see `IpsecParams::psk`).
    let _ = writeln!(c, "        secret = \"{}\"", ipsec.psk);
    let _ = writeln!(c, "    }}");
    let _ = writeln!(c, "}}");
    c
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_ts(ts: &[Prefix]) -> String {
    ts.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpnnat::messages::{ESP_PROPOSAL, IKE_PROPOSAL};

    #[test]
    fn the_configuration_names_every_parameter() {
        let p = IpsecParams {
            psk: "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=".into(),
            local_id: "site-7.vpnnat".into(),
            remote_id: "gw-7.vpnnat".into(),
            ike_proposal: IKE_PROPOSAL.into(),
            esp_proposal: ESP_PROPOSAL.into(),
            local_ts: vec!["10.64.0.5/32".parse().unwrap()],
            remote_ts: vec!["172.16.0.0/24".parse().unwrap()],
            child_rekey_s: None,
            ike_rekey_s: None,
        };
        let c = swanctl_conf(
            SiteId(7),
            "Bakery\n}",
            &[
                "203.0.113.1".parse().unwrap(),
                "203.0.113.2".parse().unwrap(),
            ],
            &p,
        );
        for line in [
            "# vpnnat IPsec site 7: Bakery}",
            "remote_addrs = 203.0.113.1, 203.0.113.2",
            "proposals = aes256gcm16-prfsha256-x25519-modp2048",
            "id = site-7.vpnnat",
            "id = gw-7.vpnnat",
            "local_ts = 10.64.0.5/32",
            "remote_ts = 172.16.0.0/24",
            "esp_proposals = aes256gcm16-x25519-modp2048",
            "secret = \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\"",
        ] {
            assert!(
                c.lines().any(|l| l.trim() == line),
                "{line:?} missing:\n{c}"
            );
        }
        // Braces balance: the operator's name cannot break the structure.
        assert_eq!(
            c.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .map(|l| l.matches('{').count() as i64 - l.matches('}').count() as i64)
                .sum::<i64>(),
            0
        );
    }
}
