//! A site that reaches the internet only through an HTTP CONNECT proxy
//! (Debian's tinyproxy on the internet side; the router's direct TCP and UDP
//! to anything else dropped): the agent carries its tunnel over TLS through
//! the proxy, the technician reaches the site's PC, both ends say
//! `tls_proxy`, and the proxy's log shows the CONNECT to the gateway.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vpnnat_test_support::fallback_world::{
    FallbackWorld, GATEWAY_WAN, PREREQS, ProxySetting, TLS_PORT, UDP_TIMEOUT_S,
};
use vpnnat_test_support::{Prereq, require};

fn through_proxy(tag: &str, setting: ProxySetting, credentials: Option<(&str, &str)>) {
    if !require(PREREQS) || !require(&[Prereq::Program("tinyproxy")]) {
        return;
    }
    let mut w = FallbackWorld::up(tag);
    w.start_proxy(credentials);
    w.proxy_only();
    // Nothing but the proxy is reachable from the site.
    assert!(
        !w.router.try_sh(&format!(
            "curl -sk --max-time 2 -o /dev/null https://{GATEWAY_WAN}:{TLS_PORT}/"
        )),
        "the router reaches the gateway directly"
    );
    w.start_agent(Some((setting, credentials)));
    let nat = w.request_pc1();
    w.wait_transport("tls_proxy", Duration::from_secs(UDP_TIMEOUT_S + 30));
    w.tech_reaches(&nat, Duration::from_secs(20));
    let log = w.proxy_log();
    assert!(
        log.contains(&format!("CONNECT {GATEWAY_WAN}:{TLS_PORT}"))
            && log.contains(&format!("Established connection to host \"{GATEWAY_WAN}\"")),
        "tinyproxy's log shows no CONNECT to the gateway:\n{log}"
    );
}

#[test]
fn fallback_proxy_from_the_configuration() {
    through_proxy("fpc", ProxySetting::Config, None);
}

#[test]
fn fallback_proxy_from_https_proxy_env_with_basic_credentials() {
    through_proxy("fpe", ProxySetting::Env, Some(("site1", "proxy-pass-7")));
}
