//! The namespace harness itself: two namespaces joined by a veth pair reach
//! each other, have no default route, and vanish with their processes on drop.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;
use vpnnat_test_support::{Netns, Prereq, require, veth};

#[test]
fn netns_harness_connects_two_namespaces_and_cleans_up() {
    if !require(&[Prereq::Root, Prereq::Program("ip"), Prereq::Program("ping")]) {
        return;
    }
    let (name_a, name_b, pid);
    {
        let mut a = Netns::new("a");
        let b = Netns::new("b");
        name_a = a.name.clone();
        name_b = b.name.clone();
        veth(
            &a,
            "eth0",
            Some("198.51.100.1/24"),
            &b,
            "eth0",
            Some("198.51.100.2/24"),
        );
        a.sh("ping -c 1 -W 2 198.51.100.2");
        assert!(!a.sh("ip route show default").contains("default"));
        let mut sleeper = a.command("sleep");
        sleeper.arg("60");
        pid = a.spawn(&mut sleeper, None);
        // `ip netns exec` enters the namespace after it has been spawned, so
        // the sleeper shows up in the namespace's list a moment later.
        let in_namespace = || {
            let pids = Command::new("ip")
                .args(["netns", "pids", &name_a])
                .output()
                .unwrap()
                .stdout;
            String::from_utf8(pids)
                .unwrap()
                .split_whitespace()
                .any(|p| p == pid.to_string())
        };
        vpnnat_test_support::wait_until(
            "the sleeper to be in the namespace",
            Duration::from_secs(5),
            in_namespace,
        );
        assert!(
            !a.try_sh("ping -c 1 -W 1 203.0.113.9"),
            "no route leaves the namespace"
        );
    }
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&name_a) && !list.contains(&name_b), "{list}");
    vpnnat_test_support::wait_until("the sleeper to be gone", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}
