use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(value: &T) -> String {
    let json = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, value, "{json}");
    json
}

fn key(b: u8) -> PublicKey {
    PublicKey([b; 32])
}

fn name(s: &str) -> TerminalName {
    TerminalName::new(s).unwrap()
}

fn request_view() -> MaintenanceRequestView {
    MaintenanceRequestView {
        id: RequestId(17),
        acceptance_number: "20261122-000017".into(),
        site_id: SiteId(3),
        site_name: "Bakery Schmidt".into(),
        global_address: Some("198.51.100.7".parse().unwrap()),
        requester_name: "A. Schmidt".into(),
        level: Level::Administrator,
        urgency: Urgency::High,
        phone: "+49 30 1234".into(),
        content: "printer offline".into(),
        terminals: vec![TerminalAssignment {
            name: name("pc-1"),
            nat_address: Some(Ipv4Addr::new(10, 64, 0, 5)),
        }],
        state: RequestState::Waiting,
        gateway_id: Some(GatewayId(1)),
        received_at: UnixMillis(1_700_000_000_000),
        started_at: None,
        ended_at: None,
        expires_at: UnixMillis(1_700_014_400_000),
        tunnel: TunnelKind::Wireguard,
        transport: Some(Transport::Tls),
        technician: None,
        expiry_warned_at: None,
    }
}

#[test]
fn every_message_round_trips_through_json() {
    round_trip(&EnrollRequest {
        token: "tok".into(),
        public_key: key(1),
    });
    round_trip(&EnrollResponse {
        site_id: SiteId(3),
        site_name: "s".into(),
        credential: "c".into(),
    });
    round_trip(&GatewayRegistration {
        endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
        public_key: key(2),
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: 2,
        software_version: "0.1.0".into(),
        technician_prefixes: Vec::new(),
        tls: None,
        next_public_key: None,
    });
    round_trip(&GatewayRegistered {
        gateway_id: GatewayId(1),
        heartbeat_interval_ms: 1000,
    });
    round_trip(&GatewayHeartbeat {
        max_tunnels: 2,
        active_tunnels: 1,
        health: Health::Healthy,
        applied_version: 4,
        peers: vec![PeerStatus {
            site_id: SiteId(3),
            endpoint: Some("198.51.100.7:40000".parse().unwrap()),
            last_handshake: Some(UnixMillis(5)),
            rx_bytes: 1,
            tx_bytes: 2,
            transport: None,
        }],
        public_key: None,
        next_public_key: None,
    });
    round_trip(&HeartbeatAck {
        desired_version: 4,
        drain: false,
        lease_ms: Some(15_000),
    });
    round_trip(&HeartbeatAck {
        desired_version: 4,
        drain: false,
        lease_ms: None,
    });
    round_trip(&GatewayDesiredState {
        next_keys: Vec::new(),
        version: 4,
        gateway_id: GatewayId(1),
        allowed_sources: Vec::new(),
        key_rotation: None,
        peers: vec![GatewayPeer {
            site_id: SiteId(3),
            public_key: key(3),
            nat_addresses: vec![Ipv4Addr::new(10, 64, 0, 5)],
            tunnel: TunnelKind::Wireguard,
            ipsec: None,
            tls_token_sha256: Some("ab".repeat(32)),
        }],
    });
    round_trip(&AppliedState {
        version: 4,
        errors: vec!["route 10.64.0.5: EPERM".into()],
    });
    round_trip(&AgentDesiredState {
        version: 9,
        site_id: SiteId(3),
        tunnel: Some(AgentTunnel {
            gateway_id: GatewayId(1),
            kind: TunnelKind::Wireguard,
            endpoint: "203.0.113.1:51820".parse().unwrap(),
            public_key: key(2),
            persistent_keepalive_s: 25,
            ipsec: None,
            tls: Some(AgentTls {
                endpoint: "203.0.113.1:443".parse().unwrap(),
                spki_sha256: "cd".repeat(32),
                token: "t0ken".into(),
            }),
        }),
        mappings: vec![AgentMapping {
            nat_address: Ipv4Addr::new(10, 64, 0, 5),
            terminal: name("pc-1"),
            request_id: RequestId(17),
            expires_at: UnixMillis(1_700_014_400_000),
        }],
        problem: None,
        rotation: None,
    });
    round_trip(&NewMaintenanceRequest {
        requester_name: "A. Schmidt".into(),
        level: Level::General,
        urgency: Urgency::Emergency,
        phone: "+49 30 1234".into(),
        content: "".into(),
        terminals: vec![name("pc-1"), name("nas")],
    });
    round_trip(&request_view());
    round_trip(&FailureReport {
        code: FailureCode::LanLinkDown,
        detail: "eth1 carrier lost".into(),
        terminal: None,
        open_request: true,
    });
    round_trip(&FailureAccepted {
        failure_id: 1,
        request: Some(request_view()),
    });
    round_trip(&Login {
        name: "tech".into(),
        password: "pw".into(),
    });
    round_trip(&ConsoleEvents {
        version: 1,
        requests: vec![request_view()],
        failures: vec![],
        agentless_sites: vec![AgentlessSite {
            site_id: SiteId(3),
            name: "Bakery".into(),
            gateway_id: None,
        }],
    });
    round_trip(&ApiError {
        error: "invalid_field".into(),
        message: "phone: bad".into(),
        field: Some("phone".into()),
    });
}

#[test]
fn who_works_and_acknowledgements_are_optional_both_ways() {
    // A started request names its technician; a server without the field
    // (or a request not started) leaves it out, and both read back.
    let mut started = request_view();
    started.state = RequestState::InProgress;
    started.started_at = Some(UnixMillis(1_700_000_100_000));
    started.technician = Some("alice".into());
    let json = round_trip(&started);
    assert!(json.contains("\"technician\":\"alice\""), "{json}");
    let old = round_trip(&request_view());
    assert!(!old.contains("technician"), "{old}");
    let failure = FailureView {
        id: 4,
        site_id: SiteId(3),
        site_name: "Bakery Schmidt".into(),
        code: FailureCode::LanLinkDown,
        detail: "eth1 carrier lost".into(),
        terminal: None,
        received_at: UnixMillis(1_700_000_000_000),
        request_id: None,
        acknowledged_at: None,
        acknowledged_by: None,
    };
    let json = round_trip(&failure);
    assert!(!json.contains("acknowledged"), "{json}");
    round_trip(&FailureView {
        acknowledged_at: Some(UnixMillis(1_700_000_200_000)),
        acknowledged_by: Some("alice".into()),
        ..failure
    });
}

#[test]
fn documents_without_a_tunnel_kind_mean_wireguard() {
    let peer: GatewayPeer = serde_json::from_str(&format!(
        r#"{{"site_id":3,"public_key":"{}","nat_addresses":["10.64.0.5"]}}"#,
        key(3)
    ))
    .unwrap();
    assert_eq!(peer.tunnel, TunnelKind::Wireguard);
    let tunnel: AgentTunnel = serde_json::from_str(&format!(
        r#"{{"gateway_id":1,"endpoint":"203.0.113.1:51820","public_key":"{}","persistent_keepalive_s":25}}"#,
        key(2)
    ))
    .unwrap();
    assert_eq!(tunnel.kind, TunnelKind::Wireguard);
    assert!(
        serde_json::to_string(&peer)
            .unwrap()
            .contains("\"tunnel\":\"wireguard\"")
    );
}

#[test]
fn wire_names_are_stable() {
    let json = round_trip(&request_view());
    for needle in [
        "\"state\":\"waiting\"",
        "\"level\":\"administrator\"",
        "\"urgency\":\"high\"",
        "\"nat_address\":\"10.64.0.5\"",
        "\"received_at\":1700000000000",
        "\"id\":17",
    ] {
        assert!(json.contains(needle), "{needle} not in {json}");
    }
    assert_eq!(
        serde_json::to_string(&key(0)).unwrap(),
        "\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\""
    );
}

#[test]
fn bad_keys_and_names_are_rejected_by_deserialization() {
    assert!(serde_json::from_str::<PublicKey>("\"AAAA\"").is_err());
    assert!(serde_json::from_str::<PublicKey>("\"not base64!\"").is_err());
    assert!(serde_json::from_str::<TerminalName>("\"\"").is_err());
    assert!(serde_json::from_str::<TerminalName>("\"-pc\"").is_err());
    assert!(serde_json::from_str::<TerminalName>("\"pc 1\"").is_err());
    assert!(serde_json::from_str::<TerminalName>(&format!("\"{}\"", "a".repeat(64))).is_err());
    assert!(serde_json::from_str::<TerminalName>("\"pc-1.lan_2\"").is_ok());
    let unknown =
        r#"{"token":"t","public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","x":1}"#;
    assert!(serde_json::from_str::<EnrollRequest>(unknown).is_err());
}

#[test]
fn request_validation_names_the_field() {
    let good = NewMaintenanceRequest {
        requester_name: "A".into(),
        level: Level::General,
        urgency: Urgency::Normal,
        phone: "0301234".into(),
        content: "x".into(),
        terminals: vec![name("pc-1")],
    };
    assert_eq!(good.validate(), Ok(()));
    let field = |r: NewMaintenanceRequest| r.validate().unwrap_err().field;
    assert_eq!(
        field(NewMaintenanceRequest {
            requester_name: " ".into(),
            ..good.clone()
        }),
        "requester_name"
    );
    assert_eq!(
        field(NewMaintenanceRequest {
            phone: "call me".into(),
            ..good.clone()
        }),
        "phone"
    );
    assert_eq!(
        field(NewMaintenanceRequest {
            content: "x".repeat(4001),
            ..good.clone()
        }),
        "content"
    );
    assert_eq!(
        field(NewMaintenanceRequest {
            terminals: vec![],
            ..good.clone()
        }),
        "terminals"
    );
    assert_eq!(
        field(NewMaintenanceRequest {
            terminals: vec![name("a"), name("a")],
            ..good.clone()
        }),
        "terminals"
    );
    let api: ApiError = good
        .clone()
        .validate()
        .and(
            NewMaintenanceRequest {
                phone: "?".into(),
                ..good
            }
            .validate(),
        )
        .unwrap_err()
        .into();
    assert_eq!(api.field.as_deref(), Some("phone"));
    assert_eq!(api.error, "invalid_field");
}

#[test]
fn gateway_registration_validation() {
    let good = GatewayRegistration {
        endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
        public_key: key(2),
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: 2,
        software_version: "0.1.0".into(),
        technician_prefixes: Vec::new(),
        tls: None,
        next_public_key: None,
    };
    assert_eq!(good.validate(), Ok(()));
    let bad = GatewayRegistration {
        max_tunnels: 0,
        ..good.clone()
    };
    assert_eq!(bad.validate().unwrap_err().field, "max_tunnels");
    let bad = GatewayRegistration {
        endpoints: vec!["0.0.0.0:51820".parse().unwrap()],
        ..good.clone()
    };
    assert_eq!(bad.validate().unwrap_err().field, "endpoints");
    let tls = GatewayTls {
        endpoints: vec!["203.0.113.1:443".parse().unwrap()],
        spki_sha256: "0f".repeat(32),
    };
    let with_tls = GatewayRegistration {
        tls: Some(tls.clone()),
        ..good.clone()
    };
    assert_eq!(with_tls.validate(), Ok(()));
    round_trip(&with_tls);
    for (bad, field) in [
        (
            GatewayTls {
                spki_sha256: "0F".repeat(32),
                ..tls.clone()
            },
            "tls.spki_sha256",
        ),
        (
            GatewayTls {
                endpoints: vec![],
                ..tls.clone()
            },
            "tls.endpoints",
        ),
    ] {
        let r = GatewayRegistration {
            tls: Some(bad),
            ..good.clone()
        };
        assert_eq!(r.validate().unwrap_err().field, field);
    }
    // The token never shows in logs.
    let agent = AgentTls {
        endpoint: "203.0.113.1:443".parse().unwrap(),
        spki_sha256: String::new(),
        token: "s3cret".into(),
    };
    assert!(!format!("{agent:?}").contains("s3cret"));
    assert_eq!(
        serde_json::to_string(&Transport::TlsProxy).unwrap(),
        "\"tls_proxy\""
    );
}

#[test]
fn login_debug_redacts_the_password() {
    let l = Login {
        name: "t".into(),
        password: "hunter2".into(),
    };
    assert!(!format!("{l:?}").contains("hunter2"));
}

fn ipsec_params() -> IpsecParams {
    IpsecParams {
        // base64 of 32 bytes 0..32
        psk: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
        local_id: "site-3.vpnnat".into(),
        remote_id: "gw-3.vpnnat".into(),
        ike_proposal: IKE_PROPOSAL.into(),
        esp_proposal: ESP_PROPOSAL.into(),
        local_ts: vec!["10.64.0.5/32".parse().unwrap()],
        remote_ts: vec!["172.16.0.0/24".parse().unwrap()],
        child_rekey_s: None,
        ike_rekey_s: None,
    }
}

#[test]
fn the_ipsec_kind_and_its_parameters_round_trip() {
    assert_eq!(
        serde_json::to_string(&TunnelKind::Ipsec).unwrap(),
        "\"ipsec\""
    );
    assert_eq!("ipsec".parse(), Ok(TunnelKind::Ipsec));
    assert_eq!("wireguard".parse(), Ok(TunnelKind::Wireguard));
    assert!("IPsec".parse::<TunnelKind>().is_err());
    assert!(serde_json::from_str::<TunnelKind>("\"gre\"").is_err());
    assert_eq!(TunnelKind::Ipsec.to_string(), "ipsec");
    assert_eq!(TunnelKind::Ipsec.label(), "IPsec");
    let peer = GatewayPeer {
        site_id: SiteId(3),
        public_key: key(3),
        nat_addresses: vec![Ipv4Addr::new(10, 64, 0, 5)],
        tunnel: TunnelKind::Ipsec,
        ipsec: Some(ipsec_params()),
        tls_token_sha256: None,
    };
    let json = round_trip(&peer);
    for needle in [
        "\"tunnel\":\"ipsec\"",
        "\"local_ts\":[\"10.64.0.5/32\"]",
        "\"remote_ts\":[\"172.16.0.0/24\"]",
        "\"ike_proposal\":\"aes256gcm16-prfsha256-x25519-modp2048\"",
        "\"esp_proposal\":\"aes256gcm16-x25519-modp2048\"",
    ] {
        assert!(json.contains(needle), "{needle} not in {json}");
    }
    round_trip(&AgentTunnel {
        gateway_id: GatewayId(1),
        kind: TunnelKind::Ipsec,
        endpoint: "203.0.113.1:500".parse().unwrap(),
        public_key: key(2),
        persistent_keepalive_s: 25,
        ipsec: Some(ipsec_params()),
        tls: None,
    });
    round_trip(&SiteTunnel {
        tunnel: TunnelKind::Ipsec,
    });
    round_trip(&IpsecSiteConfig {
        site_id: SiteId(3),
        name: "s".into(),
        gateway_id: None,
        gateway_addresses: vec!["203.0.113.1".parse().unwrap()],
        ipsec: ipsec_params(),
        swanctl_conf: "connections {}".into(),
    });
    // A WireGuard peer's document has no `ipsec` key at all.
    let wg = GatewayPeer {
        tunnel: TunnelKind::Wireguard,
        ipsec: None,
        ..peer
    };
    assert!(!round_trip(&wg).contains("ipsec"));
    // Old registrations (no technician prefixes) still parse.
    let reg: GatewayRegistration = serde_json::from_str(&format!(
        r#"{{"endpoints":["203.0.113.1:51820"],"public_key":"{}","tunnel_kinds":["wireguard","ipsec"],"max_tunnels":2,"software_version":"x"}}"#,
        key(2)
    ))
    .unwrap();
    assert!(reg.technician_prefixes.is_empty());
    assert_eq!(
        reg.tunnel_kinds,
        vec![TunnelKind::Wireguard, TunnelKind::Ipsec]
    );
    // The site setting: absent is WireGuard; unknown fields are refused.
    let s: NewSite = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
    assert_eq!(s.tunnel, TunnelKind::Wireguard);
    let s: NewSite = serde_json::from_str(r#"{"name":"a","tunnel":"ipsec"}"#).unwrap();
    assert_eq!(s.tunnel, TunnelKind::Ipsec);
    assert!(serde_json::from_str::<SiteTunnel>(r#"{"tunnel":"ipsec","psk":"x"}"#).is_err());
    assert!(serde_json::from_str::<SiteTunnel>("{}").is_err());
}

#[test]
fn ipsec_parameter_validation_names_the_field() {
    assert_eq!(ipsec_params().validate(), Ok(()));
    let field = |p: IpsecParams| p.validate().unwrap_err().field;
    // 31 bytes: too short.
    assert_eq!(
        field(IpsecParams {
            psk: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==".into(),
            ..ipsec_params()
        }),
        "psk"
    );
    assert_eq!(
        field(IpsecParams {
            psk: "not base64 at all, but long enough to pass a length check".into(),
            ..ipsec_params()
        }),
        "psk"
    );
    assert_eq!(
        field(IpsecParams {
            local_id: "site 3".into(),
            ..ipsec_params()
        }),
        "local_id"
    );
    assert_eq!(
        field(IpsecParams {
            remote_id: String::new(),
            ..ipsec_params()
        }),
        "remote_id"
    );
    assert_eq!(
        field(IpsecParams {
            remote_id: "site-3.vpnnat".into(),
            ..ipsec_params()
        }),
        "remote_id"
    );
    assert_eq!(
        field(IpsecParams {
            ike_proposal: String::new(),
            ..ipsec_params()
        }),
        "ike_proposal"
    );
    assert_eq!(
        field(IpsecParams {
            esp_proposal: "x".repeat(201),
            ..ipsec_params()
        }),
        "esp_proposal"
    );
    assert_eq!(
        field(IpsecParams {
            remote_ts: vec!["172.16.0.0/24".parse().unwrap(); 1025],
            ..ipsec_params()
        }),
        "remote_ts"
    );
    assert_eq!(
        field(IpsecParams {
            child_rekey_s: Some(9),
            ..ipsec_params()
        }),
        "child_rekey_s"
    );
    assert_eq!(
        field(IpsecParams {
            ike_rekey_s: Some(604_801),
            ..ipsec_params()
        }),
        "ike_rekey_s"
    );
    let bounds = IpsecParams {
        child_rekey_s: Some(10),
        ike_rekey_s: Some(604_800),
        ..ipsec_params()
    };
    assert_eq!(bounds.validate(), Ok(()));
    // Absent intervals stay absent on the wire (older agents and gateways
    // read the same document), present ones round-trip.
    let wire = serde_json::to_value(ipsec_params()).unwrap();
    assert!(wire.get("child_rekey_s").is_none() && wire.get("ike_rekey_s").is_none());
    let back: IpsecParams = serde_json::from_value(serde_json::to_value(&bounds).unwrap()).unwrap();
    assert_eq!(back, bounds);
    // The server's constructor gives exactly this, the gateway the mirror.
    let site = IpsecParams::for_site(
        SiteId(3),
        ipsec_params().psk,
        ipsec_params().local_ts,
        ipsec_params().remote_ts,
    );
    assert_eq!(site, ipsec_params());
    let gw = site.clone().mirrored();
    assert_eq!(
        (gw.local_id.as_str(), gw.remote_id.as_str()),
        ("gw-3.vpnnat", "site-3.vpnnat")
    );
    assert_eq!(
        (&gw.local_ts, &gw.remote_ts),
        (&site.remote_ts, &site.local_ts)
    );
    assert_eq!(gw.clone().mirrored(), site);
    assert_eq!(gw.validate(), Ok(()));
    // The key never shows in Debug output.
    let p = ipsec_params();
    assert!(!format!("{p:?}").contains(&p.psk));
    assert_eq!(site_identity(SiteId(7)), "site-7.vpnnat");
    assert_eq!(gateway_identity(SiteId(7)), "gw-7.vpnnat");
    let mut reg = GatewayRegistration {
        endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
        public_key: key(2),
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: 2,
        software_version: "0.1.0".into(),
        technician_prefixes: vec!["172.16.0.0/24".parse().unwrap(); 64],
        tls: None,
        next_public_key: None,
    };
    assert_eq!(reg.validate(), Ok(()));
    reg.technician_prefixes
        .push("172.16.1.0/24".parse().unwrap());
    assert_eq!(reg.validate().unwrap_err().field, "technician_prefixes");
}
