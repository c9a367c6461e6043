//! The mission's world: the namespaces `scripts/world.sh` builds and the
//! programs started in them.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::Options;
use crate::process::{bin, repo_path, run_with_input};

/// A running program of the world.
pub(super) struct Proc {
    pub(super) host: &'static str,
    pub(super) child: Child,
}

/// The world: namespaces by `scripts/world.sh`, the programs started here.
pub(super) struct World {
    pub(super) opts: Options,
    pub(super) script: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) procs: BTreeMap<String, Proc>,
    pub(super) up: bool,
}

impl World {
    pub(super) fn up(opts: Options) -> Self {
        let script = repo_path("scripts/world.sh");
        let dir = std::env::temp_dir().join(format!("vpnnat-{}", opts.world));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = Self {
            opts,
            script,
            dir,
            procs: BTreeMap::new(),
            up: false,
        };
        w.world_sh("up");
        w.up = true;
        w
    }

    pub(super) fn world_sh(&self, arg: &str) {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(arg)
            .env("VPNNAT_WORLD", &self.opts.world)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "world.sh {arg} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub(super) fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.opts.world)
    }

    /// A command inside a host's namespace, with a clean environment: the
    /// programs read every `VPNNAT_*` variable as configuration.
    pub(super) fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)])
            .arg(program)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        c
    }

    /// `sh -c script` in a host: its output.
    pub(super) fn sh_output(&self, host: &str, script: &str) -> std::process::Output {
        self.command(host, "sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `sh -c script` in a host; its stdout, or `None` when it failed.
    pub(super) fn try_sh(&self, host: &str, script: &str) -> Option<String> {
        let out = self.sh_output(host, script);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(super) fn sh(&self, host: &str, script: &str) -> String {
        let out = self.sh_output(host, script);
        assert!(
            out.status.success(),
            "in {host}: {script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A workspace program run to completion in a host (a CLI call).
    pub(super) fn run(
        &self,
        host: &str,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> String {
        let mut cmd = self.command(host, bin(program));
        cmd.args(args);
        let out = run_with_input(&mut cmd, stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running workspace program as `name`; output to `name.log`.
    pub(super) fn start(&mut self, name: &str, host: &'static str, program: &str, args: &[&str]) {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = self.command(host, bin(program));
        cmd.args(args)
            .env("RUST_LOG", "info,vpnnat=debug")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            // Its own process group: a Ctrl-C to the demo does not reach it,
            // so `--keep` can leave it running; `world.sh down` ends it.
            .process_group(0);
        let child = cmd.spawn().unwrap();
        self.procs.insert(name.to_owned(), Proc { host, child });
    }

    /// `kill -9` of a started program (and its reaping).
    pub(super) fn kill9(&mut self, name: &str) {
        if let Some(mut p) = self.procs.remove(name) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub(super) fn stop(&mut self, name: &str) {
        let mut p = self.procs.remove(name).unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = p.child.try_wait() {
                assert!(status.success(), "{name} exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = p.child.kill();
        panic!("{name} did not stop within 10 s of SIGTERM");
    }

    pub(super) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Fails early when a program has died on its own (gone, or a zombie
    /// not yet reaped).
    pub(super) fn check_alive(&self) {
        for (name, p) in &self.procs {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", p.child.id())).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            if !matches!(state, Some(Some(c)) if c != 'Z') {
                panic!(
                    "{name} (in {}) exited by itself; its log is {}:\n{}",
                    p.host,
                    self.dir.join(format!("{name}.log")).display(),
                    self.log(name)
                );
            }
        }
    }

    /// `curl` in a host: (status code, body as JSON or a string).
    pub(super) fn curl(&self, host: &str, args: &[&str], body: Option<&Value>) -> (u16, Value) {
        let mut cmd = self.command(host, "curl");
        cmd.args(["-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
            .args(args);
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(b) = body {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b.to_string().as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        (code.parse().unwrap_or(0), value)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nmission failed; the programs' logs are in {}",
                self.dir.display()
            );
            for name in self.procs.keys().cloned().collect::<Vec<_>>() {
                let log = self.log(&name);
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("---- {name}.log (last lines)");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if self.opts.keep && !std::thread::panicking() {
            return;
        }
        for p in self.procs.values_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if self.up {
            self.world_sh("down");
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` every 20 ms; how long it took, or a panic naming `what`.
pub(super) fn within(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if check() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
