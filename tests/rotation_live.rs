//! Planned rotation with a maintenance open and a TCP session held across
//! it: the real maintenance server, gateway and router agent (packet mode)
//! in network namespaces (the world of `vpnnat_test_support::agent_world`).
//! The technician holds one TCP connection to the PC's NAT address that
//! echoes a line every 100 ms; the site key is rotated on demand, then the
//! site credential, and (a second world) both and the gateway's key by the
//! schedule with a tiny period, overlapping. After each the same connection
//! still carries data (no reset, no lost line) and the technician still
//! pings the NAT address. The longest echo round trip, which holds the
//! interruption, is printed. The gateway's own key rotates the same way (on
//! demand with the session held; then with the agent away, a `kill -9` of
//! the gateway mid-rotation and the grace time ending it).
//!
//! Network safety: everything lives in the world's namespaces (no default
//! route anywhere).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vpnnat_test_support::agent_world::{AgentWorld, PREREQS};
use vpnnat_test_support::echo::ping_within;
use vpnnat_test_support::{require, wait_until};

/// The held session: one connection, a numbered line every 100 ms, each
/// echo checked; every line logged as `seq unix_time round_trip_s`, and
/// any failure as `ERROR …` (the script then exits).
fn hold_session(w: &mut AgentWorld, nat: &str) -> PathBuf {
    let file = w.logs().join("session.log");
    let script = format!(
        r#"
import socket, sys, time
out = open("{f}", "a", buffering=1)
s = socket.create_connection(("{nat}", 7), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
seq = 0
while True:
    seq += 1
    msg = ("%010d\n" % seq).encode()
    t0 = time.time()
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            c = s.recv(len(msg) - len(got))
            if not c:
                raise EOFError("connection closed")
            got += c
    except Exception as e:
        out.write("ERROR %d %r\n" % (seq, e))
        sys.exit(1)
    if got != msg:
        out.write("ERROR %d mismatch %r\n" % (seq, got))
        sys.exit(1)
    out.write("%d %.6f %.6f\n" % (seq, time.time(), time.time() - t0))
    time.sleep(0.1)
"#,
        f = file.display()
    );
    let path = w.logs().join("session.py");
    std::fs::write(&path, script).unwrap();
    let mut cmd = w.tech.command("python3");
    cmd.arg(&path);
    let log = w.logs().join("session.err");
    w.tech.spawn(&mut cmd, Some(&log));
    file
}

/// The session's lines so far: (seq, time, round trip); panics on an error line.
fn session(file: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    assert!(
        !text.contains("ERROR"),
        "the held TCP session broke:\n{text}"
    );
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Waits until the session has echoed 20 more lines (2 s of data) than
/// now; returns the longest round trip since `from_seq`.
fn still_flowing(file: &Path, from_seq: u64, what: &str) -> f64 {
    let last = session(file).last().map_or(0, |l| l.0);
    wait_until(
        &format!("the held TCP session carries data after {what}"),
        Duration::from_secs(30),
        || session(file).last().is_some_and(|l| l.0 >= last + 20),
    );
    let lines = session(file);
    // No line lost or repeated: TCP delivered every echo in order.
    for pair in lines.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "a line went missing");
    }
    let worst = lines
        .iter()
        .filter(|l| l.0 > from_seq)
        .map(|l| l.2)
        .fold(0.0, f64::max);
    println!("{what}: longest echo round trip {:.0} ms", worst * 1000.0);
    worst
}

fn identity(w: &AgentWorld) -> Value {
    serde_json::from_str(&std::fs::read_to_string(w.logs().join("agent.identity")).unwrap())
        .unwrap()
}

fn operator(w: &AgentWorld, path: &str, body: &str) -> String {
    let token = std::fs::read_to_string(w.logs().join("server/operator.token")).unwrap();
    w.gw.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -X POST \
         -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \
         --data '{body}' http://127.0.0.1:8080{path}",
        token.trim()
    ))
}

/// The status of an agent API call with `credential`.
fn with_credential(w: &AgentWorld, credential: &str) -> String {
    w.gw.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {credential}' \
         http://127.0.0.1:8080/api/v1/agent/requests"
    ))
}

fn open_maintenance(w: &mut AgentWorld) -> (String, PathBuf) {
    let (_, nat) = w.request_pc1();
    wait_until(
        "the technician reaches the PC",
        Duration::from_secs(20),
        || w.tech_http(&nat),
    );
    let file = hold_session(w, &nat);
    wait_until("the held session runs", Duration::from_secs(20), || {
        session(&file).len() >= 10
    });
    (nat, file)
}

/// Seconds of the day of a log line's timestamp (`…THH:MM:SS.ffffffZ`).
fn log_time(line: &str) -> Option<f64> {
    let t = line.split('T').nth(1)?.split('Z').next()?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From the agent's log: how long after the key switch the handshake with
/// the new key completed (the tunnel's interruption), seconds.
fn switch_gap(w: &AgentWorld) -> f64 {
    let log = w.agent_log();
    let mut lines = log
        .lines()
        .skip_while(|l| !l.contains("tunnel key replaced"));
    let switched = lines
        .next()
        .and_then(log_time)
        .expect("the switch is logged");
    let done = lines
        .find(|l| l.contains("handshake completed"))
        .and_then(log_time)
        .expect("the handshake with the new key is logged");
    done - switched
}

fn key_rotated(w: &AgentWorld, before: &Value) -> bool {
    let id = identity(w);
    id["private_key"] != before["private_key"]
        && id.get("next_private_key").is_none()
        && w.agent_log().contains("key rotation: done")
}

#[test]
fn rotation_live_on_demand_key_and_credential_keep_the_tcp_session() {
    if !require(PREREQS) {
        return;
    }
    let mut w = AgentWorld::up("rlv");
    let (nat, file) = open_maintenance(&mut w);
    let before = identity(&w);

    // The site key, on demand.
    let seq = session(&file).last().unwrap().0;
    assert_eq!(
        operator(&w, "/api/v1/sites/1/planned-rotation", r#"{"key":true}"#),
        "204"
    );
    wait_until("the site key rotated", Duration::from_secs(40), || {
        key_rotated(&w, &before)
    });
    let gateway_log = std::fs::read_to_string(w.logs().join("gateway.log")).unwrap();
    assert!(
        gateway_log.contains("peer moved to its next key"),
        "{gateway_log}"
    );
    still_flowing(&file, seq, "the site key rotation");
    let key_gap = switch_gap(&w);
    println!(
        "the site key rotation: handshake with the new key {:.1} ms after the switch",
        key_gap * 1000.0
    );
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));

    // The site credential, on demand: the old one is refused once the new
    // one is in use.
    let seq = session(&file).last().unwrap().0;
    let old = before["credential"].as_str().unwrap().to_owned();
    assert_eq!(with_credential(&w, &old), "200");
    assert_eq!(
        operator(
            &w,
            "/api/v1/sites/1/planned-rotation",
            r#"{"credential":true}"#
        ),
        "204"
    );
    wait_until("the credential rotated", Duration::from_secs(40), || {
        identity(&w)["credential"] != before["credential"]
    });
    wait_until(
        "the old credential refused",
        Duration::from_secs(40),
        || with_credential(&w, &old) == "401",
    );
    let new = identity(&w)["credential"].as_str().unwrap().to_owned();
    assert_eq!(with_credential(&w, &new), "200");
    still_flowing(&file, seq, "the credential rotation");
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));
    let metrics = w.router.sh("curl -sf http://192.168.1.1:8088/metrics");
    for line in [
        "vpnnat_agent_rotations_total{what=\"key\"} 1",
        "vpnnat_agent_rotations_total{what=\"credential\"} 1",
        "vpnnat_agent_rotation_step_failures_total 0",
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }

    // One round trip and the handshake's crypto: far below TCP's initial
    // retransmission timeout of 1 s (RFC 6298), so nothing but the segments
    // in flight waits.
    assert!(
        key_gap < 1.0,
        "the tunnel was down {key_gap} s across the switch"
    );

    // The rotated identity is what a restarted agent runs on: the gateway
    // (which dropped the old key) accepts it and the server its credential.
    w.kill_agent();
    w.start_agent();
    wait_until(
        "the technician reaches the PC through the restarted agent",
        Duration::from_secs(30),
        || w.tech_http(&nat),
    );
    assert_eq!(with_credential(&w, &new), "200");

    // Asked for on the router itself: `router-agent rotate --key`.
    let before = identity(&w);
    let out = vpnnat_test_support::run(
        w.router
            .command(vpnnat_test_support::bin("router-agent"))
            .arg("--config")
            .arg(w.logs().join("router-agent.toml"))
            .args(["rotate", "--key"]),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rotation asked for"),
        "{out:?}"
    );
    wait_until(
        "the key rotated from the router",
        Duration::from_secs(40),
        || {
            let id = identity(&w);
            id["private_key"] != before["private_key"] && id.get("next_private_key").is_none()
        },
    );
    wait_until(
        "the technician reaches the PC with the third key",
        Duration::from_secs(30),
        || w.tech_http(&nat),
    );
}

#[test]
fn rotation_live_scheduled_with_a_tiny_period_keeps_the_tcp_session() {
    if !require(PREREQS) {
        return;
    }
    // About 9 s for each, the gateway's key too: they overlap.
    let mut w = AgentWorld::up_with(
        "rls",
        "[rotation]\nsite_key_days = 0.0001\nsite_credential_days = 0.0001\n\
         gateway_key_days = 0.0001\n",
    );
    let (nat, file) = open_maintenance(&mut w);
    let before = identity(&w);
    let gateway_key = gateway_status(&w)["public_key"].clone();
    let seq = session(&file).last().unwrap().0;
    wait_until(
        "the schedule rotated the site's key and credential and the gateway's key",
        Duration::from_secs(60),
        || {
            key_rotated(&w, &before)
                && identity(&w)["credential"] != before["credential"]
                && gateway_status(&w)["public_key"] != gateway_key
        },
    );
    let server_log = std::fs::read_to_string(w.logs().join("server.log")).unwrap();
    assert!(
        server_log.contains("planned rotations requested by the schedule"),
        "{server_log}"
    );
    still_flowing(&file, seq, "the scheduled rotations");
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));
}

/// The agent is killed (`kill -9`) with its next key stored but not yet
/// registered (the server unreachable), and started again with the server
/// back: it resumes from its identity file, and the rotation completes with
/// the key it stored, while the technician's traffic goes on.
#[test]
fn rotation_live_agent_killed_mid_rotation_resumes() {
    if !require(PREREQS) {
        return;
    }
    let mut w = AgentWorld::up("rlk");
    let (nat, _file) = open_maintenance(&mut w);
    let before = identity(&w);
    w.cut_server_link();
    let out = vpnnat_test_support::run(
        w.router
            .command(vpnnat_test_support::bin("router-agent"))
            .arg("--config")
            .arg(w.logs().join("router-agent.toml"))
            .args(["rotate", "--key"]),
    );
    assert!(out.status.success(), "{out:?}");
    wait_until("the next key stored", Duration::from_secs(20), || {
        identity(&w).get("next_private_key").is_some()
    });
    let next = identity(&w)["next_private_key"].clone();
    assert_eq!(identity(&w)["private_key"], before["private_key"]);
    // The tunnel still runs on the old key meanwhile.
    assert!(w.tech_http(&nat));
    w.kill_agent();
    w.restore_server_link();
    w.start_agent();
    wait_until(
        "the rotation completed after the restart",
        Duration::from_secs(40),
        || {
            let id = identity(&w);
            id["private_key"] == next && id.get("next_private_key").is_none()
        },
    );
    wait_until("the server knows it", Duration::from_secs(20), || {
        w.agent_log().contains("key rotation: done")
    });
    wait_until(
        "the technician reaches the PC with the new key",
        Duration::from_secs(30),
        || w.tech_http(&nat),
    );
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));
}

/// The running gateway's status document.
fn gateway_status(w: &AgentWorld) -> Value {
    serde_json::from_str(&w.gw.sh("curl -sf http://127.0.0.1:9101/api/v1/status")).unwrap()
}

/// Every log of the gateway's runs.
fn gateway_log(w: &AgentWorld) -> String {
    (1..=4)
        .map(|n| match n {
            1 => w.logs().join("gateway.log"),
            n => w.logs().join(format!("gateway{n}.log")),
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<String>()
        // Without the terminal colours around the fields' names.
        .split('\x1b')
        .enumerate()
        .map(|(i, part)| match i {
            0 => part,
            _ => part.split_once('m').map_or(part, |(_, rest)| rest),
        })
        .collect()
}

fn gateway_key_file(w: &AgentWorld) -> String {
    std::fs::read_to_string(w.logs().join("gw.key")).unwrap()
}

/// The gateway's own key, rotated on demand while the technician's TCP
/// session is held: the gateway answers both keys, the agent re-dials the
/// next one, the gateway makes it its only key as soon as the site moved
/// (long before the default grace of 15 minutes) and the session goes on.
/// Then, with the agent away, a second rotation waits for the site; the
/// gateway is killed (`kill -9`) in the middle, comes back answering both
/// keys from its files, and ends the rotation after a short grace time; the
/// agent, started again, reaches the gateway's new key. Last, a rotation
/// whose next key file is removed is given up, and the key kept.
#[test]
fn rotation_live_gateway_key_keeps_the_tcp_session() {
    if !require(PREREQS) {
        return;
    }
    let mut w = AgentWorld::up("rlg");
    let (nat, file) = open_maintenance(&mut w);
    let first = gateway_status(&w)["public_key"].clone();
    let first_file = gateway_key_file(&w);

    let seq = session(&file).last().unwrap().0;
    assert_eq!(operator(&w, "/api/v1/gateways/1/rotate-key", "{}"), "200");
    wait_until("the gateway's key rotated", Duration::from_secs(40), || {
        let s = gateway_status(&w);
        s["public_key"] != first && s.get("next_public_key").is_none()
    });
    let log = gateway_log(&w);
    assert!(
        log.contains("rotation of the gateway's key done") && log.contains("sites_moved=1 sites=1"),
        "promoted because the site moved:\n{log}"
    );
    assert_ne!(
        gateway_key_file(&w),
        first_file,
        "the key file holds the new key"
    );
    assert!(!w.logs().join("gw.key.next").exists());
    still_flowing(&file, seq, "the gateway key rotation");
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));
    let second = gateway_status(&w)["public_key"].clone();

    // With the agent away the site cannot move: the rotation waits.
    w.kill_agent();
    assert_eq!(operator(&w, "/api/v1/gateways/1/rotate-key", "{}"), "200");
    wait_until("the next key answered", Duration::from_secs(20), || {
        gateway_status(&w).get("next_public_key").is_some()
    });
    let next = gateway_status(&w)["next_public_key"].clone();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        gateway_status(&w)["public_key"],
        second,
        "waits for the site"
    );
    assert!(w.logs().join("gw.key.next").exists());
    let metrics = w.gw.sh("curl -sf http://127.0.0.1:9101/metrics");
    for line in [
        "vpnnat_gateway_key_rotating 1",
        "vpnnat_gateway_key_rotation_sites_waiting 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }

    // A crash in the middle: the gateway comes back with both keys (on two
    // workers now, which share the next key) and ends the rotation after
    // the grace time.
    w.kill_gateway();
    w.start_gateway(&[
        ("VPNNAT_WIREGUARD__KEY_ROTATION_GRACE_S", "2"),
        ("VPNNAT_WIREGUARD__WORKERS", "2"),
    ]);
    wait_until(
        "the rotation ended by the grace time",
        Duration::from_secs(40),
        || gateway_status(&w)["public_key"] == next,
    );
    let log = gateway_log(&w);
    assert!(
        log.contains("rotation of the gateway's key under way")
            && log.contains("sites_moved=0 sites=1"),
        "{log}"
    );
    w.start_agent();
    wait_until(
        "the technician reaches the PC through the gateway's third key",
        Duration::from_secs(30),
        || w.tech_http(&nat),
    );
    assert!(ping_within(&w.tech, &nat, Duration::from_secs(5)));

    // The next key file removed during a rotation (the agent away again):
    // the gateway gives the rotation up instead of promoting a key it no
    // longer has, and keeps its key; the agent comes back to that key.
    w.kill_agent();
    assert_eq!(operator(&w, "/api/v1/gateways/1/rotate-key", "{}"), "200");
    wait_until("the fourth key answered", Duration::from_secs(20), || {
        gateway_status(&w).get("next_public_key").is_some()
    });
    std::fs::remove_file(w.logs().join("gw.key.next")).unwrap();
    wait_until("the rotation given up", Duration::from_secs(20), || {
        gateway_status(&w).get("next_public_key").is_none()
    });
    assert_eq!(gateway_status(&w)["public_key"], next);
    assert!(
        gateway_log(&w).contains("rotation of the gateway's key abandoned"),
        "{}",
        gateway_log(&w)
    );
    w.start_agent();
    wait_until(
        "the technician reaches the PC through the gateway's kept key",
        Duration::from_secs(30),
        || w.tech_http(&nat),
    );
}
