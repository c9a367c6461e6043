//! Running the workspace's built programs and other commands.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The path of a workspace binary (`gateway`, `router-agent`,
/// `maintenance-server`), built by the same `cargo test` run.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("VPNNAT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        // target/<profile>/deps/<test-binary> → target/<profile>
        None => std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf(),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo test --workspace` builds it)",
        path.display()
    );
    path
}

/// Runs a command and panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Runs a command with `stdin` (if any) as its standard input; panics with
/// its stderr when it fails.
pub fn run_with_input(cmd: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}
