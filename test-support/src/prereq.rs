//! What a test needs from the machine, and the rule for a missing piece:
//! outside CI the test skips with a one-line reason; with `CI` set it fails.

use std::path::PathBuf;
use std::process::Command;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    /// Running as root.
    Root,
    /// `/dev/net/tun`.
    Tun,
    /// A program on `PATH`.
    Program(&'static str),
    /// A PostgreSQL server on the local socket.
    Postgres,
    /// strongSwan with userspace ESP: `charon-systemd`, `swanctl` and the
    /// kernel-libipsec and gcm plugins (for `scripts/strongswan-peer.sh`).
    StrongSwan,
}

/// Whether every prerequisite is there. Outside CI a missing one makes the
/// test skip with a one-line reason (return `false`); with `CI` set it fails.
pub fn require(prereqs: &[Prereq]) -> bool {
    for p in prereqs {
        if let Some(reason) = missing(*p) {
            skip_or_fail(&reason);
            return false;
        }
    }
    true
}

/// A prerequisite is missing: with `CI` set this panics, otherwise it says
/// why the test skips.
pub fn skip_or_fail(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "prerequisite missing in CI: {reason} (run scripts/setup.sh as root)"
    );
    eprintln!("SKIP: {reason}");
}

fn missing(p: Prereq) -> Option<String> {
    match p {
        Prereq::Root => (!is_root()).then(|| "needs root".to_owned()),
        Prereq::Tun => (!std::path::Path::new("/dev/net/tun").exists())
            .then(|| "needs /dev/net/tun".to_owned()),
        Prereq::Program(name) => which(name)
            .is_none()
            .then(|| format!("needs {name} on PATH")),
        Prereq::Postgres => {
            let ok = Command::new("pg_isready")
                .args(["-q", "-h", "/var/run/postgresql"])
                .status()
                .is_ok_and(|s| s.success());
            (!ok).then(|| "needs a running PostgreSQL (pg_ctlcluster 15 main start)".to_owned())
        }
        Prereq::StrongSwan => {
            let plugins = std::path::Path::new("/usr/lib/ipsec/plugins");
            let ok = which("charon-systemd").is_some()
                && which("swanctl").is_some()
                && ["kernel-libipsec", "gcm", "curve25519", "vici"]
                    .iter()
                    .all(|p| plugins.join(format!("libstrongswan-{p}.so")).is_file());
            (!ok).then(|| {
                "needs strongSwan with kernel-libipsec (charon-systemd, swanctl, libcharon-extra-plugins, libstrongswan-standard-plugins)".to_owned()
            })
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Where `name` is on `PATH` (or in `/usr/sbin`, `/sbin`).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
