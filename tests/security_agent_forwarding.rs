//! The agent in packet mode turns on IPv4 forwarding (it cannot forward to
//! the LAN without it) and puts the host's own value back when it stops. A
//! `kill -9` leaves forwarding on; the record of the host's value in the
//! state directory lets the next run put it back at its clean stop.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use vpnnat::tunnel::PrivateKey;
use vpnnat_test_support::{Netns, Prereq, rand_bytes, require, temp_dir, wait_until};

fn forwarding(ns: &Netns) -> String {
    ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim().to_owned()
}

fn start(ns: &mut Netns, dir: &Path, run: usize) -> u32 {
    let log = dir.join(format!("agent{run}.log"));
    let pid = ns.spawn(
        ns.command(vpnnat_test_support::bin("router-agent"))
            .arg("--config")
            .arg(dir.join("router-agent.toml"))
            .arg("--desired")
            .arg(dir.join("desired.json"))
            .arg("--private-key-file")
            .arg(dir.join("agent.key"))
            .env("RUST_LOG", "info"),
        Some(&log),
    );
    wait_until("the agent started", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("router agent started"))
    });
    pid
}

#[test]
fn security_agent_restores_ip_forward_on_exit() {
    if !require(&[Prereq::Root, Prereq::Tun, Prereq::Program("ip")]) {
        return;
    }
    let dir = temp_dir("agent-forwarding");
    let d = dir.path();
    let mut ns = Netns::new("fwd");
    ns.sh("echo 0 > /proc/sys/net/ipv4/ip_forward");
    std::fs::write(
        d.join("agent.key"),
        PrivateKey::from_bytes(rand_bytes()).to_base64(),
    )
    .unwrap();
    std::fs::write(
        d.join("desired.json"),
        r#"{"version":1,"site_id":0,"tunnel":null,"mappings":[]}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("router-agent.toml"),
        format!(
            "[agent]\nstate_dir = \"{}\"\nmode = \"packet\"\n\
             [lan]\ninterface = \"\"\ndns = false\n\
             [packet]\ntun_name = \"vpnfwd0\"\ncenter_prefixes = [\"172.16.0.0/24\"]\n\
             [web]\nlisten = \"127.0.0.1:8088\"\npassword = \"pw\"\n\
             [failures]\nlink_watch = false\n",
            d.join("state").display()
        ),
    )
    .unwrap();
    let record = d.join("state/router-agent.sysctl.json");

    let pid = start(&mut ns, d, 1);
    assert_eq!(forwarding(&ns), "1", "turned on for packet mode");
    let status = ns.terminate(pid, Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        forwarding(&ns),
        "0",
        "the host's value is back after a clean stop"
    );
    assert!(!record.exists(), "nothing left to restore");

    // kill -9: nothing runs at exit, forwarding stays on, the record stays.
    let pid = start(&mut ns, d, 2);
    ns.kill(pid);
    assert_eq!(forwarding(&ns), "1");
    assert!(record.exists());
    // The next run finds forwarding on, but restores the host's value.
    let pid = start(&mut ns, d, 3);
    let status = ns.terminate(pid, Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(forwarding(&ns), "0");
    assert!(!record.exists());
}
