//! "A person can run `maintenance-server` with no configuration, open the
//! console, and see a request that an agent makes": the real binary with no
//! config file and no environment overrides, inside its own network
//! namespace (only `lo`, no routes) and mount namespace (a tmpfs over
//! `/var/lib`, and over `/etc/vpnnat` if it exists, so the defaults `127.0.0.1:8080` and
//! `/var/lib/vpnnat/` touch nothing of this machine).
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn require(programs: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    let reason = if root {
        format!("needs {missing:?} on PATH")
    } else {
        "needs root (network and mount namespaces)".to_owned()
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "prerequisite missing in CI: {reason} (run scripts/setup.sh as root)"
    );
    eprintln!("SKIP: {reason}");
    false
}

const SCRIPT: &str = r#"
set -eu
ip link set lo up
mount -t tmpfs vpnnat-test /var/lib
# Hide a real configuration of this machine, if there is one.
if [ -d /etc/vpnnat ]; then mount -t tmpfs vpnnat-test /etc/vpnnat; fi
env -i PATH="$PATH" "$BIN" > /var/lib/ms.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for i in $(seq 1 100); do curl -fsS http://127.0.0.1:8080/healthz >/dev/null 2>&1 && break; sleep 0.1; done
test -f /var/lib/vpnnat/maintenance-server.db
test "$(stat -c %a /var/lib/vpnnat/operator.token)" = 600
op=$(env -i PATH="$PATH" "$BIN" operator-token)
token=$(env -i PATH="$PATH" "$BIN" site add "Bakery Schmidt" | grep '^vnenroll_')
gw=$(env -i PATH="$PATH" "$BIN" gateway add gw1 | grep '^vngw_')
echo 'correct horse' | env -i PATH="$PATH" "$BIN" technician add alice --password-stdin >/dev/null
j='-H content-type:application/json'
curl -fsS $j -H "authorization: Bearer $gw" http://127.0.0.1:8080/api/v1/gateway/register \
  -d '{"endpoints":["203.0.113.1:51820"],"public_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=","tunnel_kinds":["wireguard"],"max_tunnels":10,"software_version":"t"}' >/dev/null
cred=$(curl -fsS $j http://127.0.0.1:8080/api/v1/enroll \
  -d "{\"token\":\"$token\",\"public_key\":\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"}" | sed 's/.*"credential":"\([^"]*\)".*/\1/')
curl -fsS $j -H "authorization: Bearer $cred" http://127.0.0.1:8080/api/v1/agent/requests \
  -d '{"requester_name":"Anna","level":"general","urgency":"high","phone":"0301234","content":"printer","terminals":["pc-1"]}' >/dev/null
curl -fsS http://127.0.0.1:8080/ | grep -q 'Technician sign-in'
curl -fsS -c /var/lib/jar $j http://127.0.0.1:8080/api/v1/login -d '{"name":"alice","password":"correct horse"}' >/dev/null
echo "REQUESTS $(curl -fsS -b /var/lib/jar http://127.0.0.1:8080/api/v1/requests)"
echo "SITES $(curl -fsS -H "authorization: Bearer $op" http://127.0.0.1:8080/api/v1/sites)"
"#;

#[test]
fn with_no_configuration_it_serves_on_8080_and_shows_an_agents_request() {
    if !require(&["unshare", "ip", "curl", "mount"]) {
        return;
    }
    let out = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
        ])
        .env("BIN", env!("CARGO_BIN_EXE_maintenance-server"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REQUESTS "))
        .unwrap();
    let requests: Vec<vpnnat::messages::MaintenanceRequestView> =
        serde_json::from_str(requests).unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].site_name, "Bakery Schmidt");
    assert_eq!(requests[0].requester_name, "Anna");
    assert_eq!(
        requests[0].terminals[0].nat_address,
        Some("10.64.0.1".parse().unwrap())
    );
    let sites = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SITES "))
        .unwrap();
    assert!(sites.contains("\"enrolled\":true"), "{sites}");
}
