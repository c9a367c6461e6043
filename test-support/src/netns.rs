//! Network namespaces that clean up after themselves, veth pairs between
//! them, and waiting for a condition.
//!
//! Network safety: every address used by a test exists only inside namespaces
//! created here; none gets a default route; nothing is added to the root
//! namespace. Namespace names carry the test process id and a counter, so
//! parallel tests and parallel CI jobs never collide.

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::process::run;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process: `vn<pid>-<n>-<tag>`.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("vn{}-{n}-{tag}", std::process::id())
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    /// The namespace's name (`ip netns` and `ip -n`).
    pub name: String,
    children: Vec<Child>,
    /// Made here, so deleted on drop; see [`Netns::existing`].
    owned: bool,
}

impl Netns {
    /// Creates `vn<pid>-<n>-<tag>` with `lo` up and no other interface or route.
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            name,
            children: Vec::new(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle on a namespace made elsewhere (e.g. by `scripts/world.sh`),
    /// which dropping it leaves in place; only the processes started
    /// through this handle are killed then.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            children: Vec::new(),
            owned: false,
        }
    }

    /// `ip -n NS <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `sh -c script` inside the namespace and panics if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = run(self.command("sh").args(["-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c script` inside the namespace; returns whether it succeeded.
    pub fn try_sh(&self, script: &str) -> bool {
        self.command("sh")
            .args(["-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts a long-running process inside the namespace; it is killed when
    /// the namespace is dropped. Its output goes to `log` (a file path) when given.
    pub fn spawn(&mut self, cmd: &mut Command, log: Option<&std::path::Path>) -> u32 {
        if let Some(path) = log {
            let f = std::fs::File::create(path).unwrap();
            cmd.stdout(f.try_clone().unwrap()).stderr(f);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills one spawned process (SIGKILL) and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to a spawned process and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|c| c.id() == pid)?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        let mut c = self.children.remove(i);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.owned {
            return;
        }
        // Anything else still running in the namespace (e.g. started by a script).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair (`a_if` in `a`, `b_if` in `b`),
/// assigns the given `addr/len` (or none, for bridge ports) and sets both up.
/// The pair is created inside `a`, so no name ever appears in the root namespace.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: Option<&str>,
    b: &Netns,
    b_if: &str,
    b_addr: Option<&str>,
) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if let Some(addr) = addr {
            ns.ip(&["addr", "add", addr, "dev", ifname]);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// Waits until `check` is true, polling every 20 ms; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A fresh temporary directory for logs and state, removed on drop unless
/// `VPNNAT_KEEP_TEST_DIRS` is set.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    let prefix = format!("vpnnat-{tag}-");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix);
    if std::env::var_os("VPNNAT_KEEP_TEST_DIRS").is_some() {
        b.disable_cleanup(true);
    }
    b.tempdir().unwrap()
}
