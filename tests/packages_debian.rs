//! The Debian packages `scripts/package.sh` builds: what each holds (binary,
//! systemd unit, conffile, documentation), that lintian finds no error in
//! them, and, as root, what their maintainer scripts do on a real `dpkg`:
//! install (system user, state directory with owner and mode), upgrade
//! (an operator's edit of the configuration kept), remove and purge (the
//! state directory kept).
//!
//! The packages are built from the binaries of this `cargo test` run
//! (`--bin-dir`); operators build them with `--profile release`.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use vpnnat_test_support::{Prereq, bin, repo_path, require, run, temp_dir};

const PROGRAMS: [&str; 3] = ["maintenance-server", "gateway", "router-agent"];

const TOOLS: &[Prereq] = &[
    Prereq::Program("dpkg-deb"),
    Prereq::Program("dpkg-shlibdeps"),
    Prereq::Program("strip"),
];

/// Builds the three packages with `version` into `out`, the payload
/// compressed with `compress` (`gzip`, or `none` where only dpkg reads
/// them: xz takes long on a debug binary); their paths by program.
fn build(out: &Path, version: &str, compress: &str) -> Vec<(&'static str, PathBuf)> {
    let bin_dir = bin("gateway").parent().unwrap().to_path_buf();
    let stdout = run(Command::new("bash")
        .arg(repo_path("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--version", version, "--compress", compress, "--out"])
        .arg(out))
    .stdout;
    let debs: Vec<PathBuf> = String::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    PROGRAMS
        .iter()
        .map(|p| {
            let prefix = format!("vpnnat-{p}_{version}_");
            let deb = debs
                .iter()
                .find(|d| {
                    d.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(&prefix)
                })
                .unwrap_or_else(|| panic!("no package for {p} in {debs:?}"));
            (*p, deb.clone())
        })
        .collect()
}

fn text(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// A control field of a package.
fn field(deb: &Path, name: &str) -> String {
    text(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_owned()
}

#[test]
fn packages_hold_binary_unit_conffile_and_pass_lintian() {
    if !require(TOOLS) || !require(&[Prereq::Program("lintian")]) {
        return;
    }
    let dir = temp_dir("packages");
    let debs = build(dir.path(), "1.2.3~test1", "gzip");
    for (program, deb) in &debs {
        let pkg = format!("vpnnat-{program}");
        // Control fields: the libraries dpkg-shlibdeps found, and adduser for
        // the system user the postinst creates.
        assert_eq!(field(deb, "Package"), pkg);
        assert_eq!(field(deb, "Version"), "1.2.3~test1");
        assert_eq!(
            field(deb, "Architecture"),
            text(Command::new("dpkg").arg("--print-architecture")).trim()
        );
        let depends = field(deb, "Depends");
        assert!(depends.contains("libc6 (>="), "{pkg}: Depends: {depends}");
        assert!(depends.contains("adduser"), "{pkg}: Depends: {depends}");

        // The files, owned by root, with their modes.
        let listing = text(Command::new("dpkg-deb").arg("-c").arg(deb));
        for (mode, path) in [
            ("-rwxr-xr-x root/root", format!("./usr/bin/{program}")),
            (
                "-rw-r--r-- root/root",
                format!("./etc/vpnnat/{program}.toml"),
            ),
            (
                "-rw-r--r-- root/root",
                format!("./lib/systemd/system/{pkg}.service"),
            ),
            (
                "-rw-r--r-- root/root",
                format!("./usr/share/doc/{pkg}/copyright"),
            ),
            (
                "-rw-r--r-- root/root",
                format!("./usr/share/doc/{pkg}/changelog.gz"),
            ),
        ] {
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with(mode) && l.ends_with(&path)),
                "{pkg}: no {mode} {path} in\n{listing}"
            );
        }

        // The control archive: the configuration is a conffile (dpkg keeps
        // an operator's edits), the maintainer scripts are valid sh.
        let control = temp_dir("packages-control");
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb)
            .arg(control.path()));
        assert_eq!(
            std::fs::read_to_string(control.path().join("conffiles")).unwrap(),
            format!("/etc/vpnnat/{program}.toml\n")
        );
        for script in ["postinst", "prerm", "postrm"] {
            let path = control.path().join(script);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{pkg}: {script} mode {mode:o}");
            run(Command::new("sh").arg("-n").arg(&path));
        }

        // The payload: the unit starts the packaged binary, the shipped
        // configuration is the commented example, the binary runs.
        let files = temp_dir("packages-files");
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(files.path()));
        let unit = std::fs::read_to_string(
            files
                .path()
                .join(format!("lib/systemd/system/{pkg}.service")),
        )
        .unwrap();
        assert!(
            unit.lines()
                .any(|l| l.starts_with(&format!("ExecStart=/usr/bin/{program} "))),
            "{pkg}: {unit}"
        );
        assert!(unit.contains("User=vpnnat"), "{pkg}: {unit}");
        assert_eq!(
            std::fs::read(files.path().join(format!("etc/vpnnat/{program}.toml"))).unwrap(),
            std::fs::read(repo_path(&format!("config/{program}.toml"))).unwrap()
        );
        let help =
            text(Command::new(files.path().join(format!("usr/bin/{program}"))).arg("--help"));
        assert!(help.contains("Usage"), "{pkg} --help: {help}");
    }

    // lintian: no error (warnings are printed for whoever reads the log).
    let mut cmd = Command::new("lintian");
    cmd.arg("--no-tag-display-limit");
    for (_, deb) in &debs {
        cmd.arg(deb);
    }
    let out = cmd.output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(
        out.status.success(),
        "lintian failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the install test changed on the machine, undone however it ends.
struct Installed {
    user_was_there: bool,
    state_was_there: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .arg("--purge")
            .args(PROGRAMS.map(|p| format!("vpnnat-{p}")))
            .output();
        if !self.state_was_there {
            let _ = std::fs::remove_dir("/var/lib/vpnnat");
        }
        if !self.user_was_there {
            let _ = Command::new("userdel").arg("vpnnat").output();
        }
    }
}

fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", pkg])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    s.strip_prefix("install ok installed ")
        .map(|v| v.trim().to_owned())
}

#[test]
fn packages_install_upgrade_remove_and_purge() {
    if !require(TOOLS) || !require(&[Prereq::Root, Prereq::Program("dpkg")]) {
        return;
    }
    // A machine that runs vpnnat from packages is not a test bed: its
    // packages would be purged at the end.
    if let Some(p) = PROGRAMS
        .iter()
        .map(|p| format!("vpnnat-{p}"))
        .find(|p| installed_version(p).is_some())
    {
        vpnnat_test_support::prereq::skip_or_fail(&format!(
            "{p} is installed on this machine; the test installs and purges its own"
        ));
        return;
    }
    let user_was_there = Command::new("getent")
        .args(["passwd", "vpnnat"])
        .status()
        .unwrap()
        .success();
    let _installed = Installed {
        user_was_there,
        state_was_there: Path::new("/var/lib/vpnnat").exists(),
    };
    let dir = temp_dir("packages-install");
    let first = build(&dir.path().join("1"), "1.2.3~test1", "none");
    let second = build(&dir.path().join("2"), "1.2.3~test2", "none");
    let dpkg_install = |debs: &[(&str, PathBuf)]| {
        let mut cmd = Command::new("dpkg");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").arg("-i");
        for (_, deb) in debs {
            cmd.arg(deb);
        }
        run(&mut cmd);
    };

    // Install: binaries, configuration, the system user and its state directory.
    dpkg_install(&first);
    for program in PROGRAMS {
        let pkg = format!("vpnnat-{program}");
        assert_eq!(installed_version(&pkg).as_deref(), Some("1.2.3~test1"));
        assert!(Path::new(&format!("/usr/bin/{program}")).is_file());
        assert!(Path::new(&format!("/etc/vpnnat/{program}.toml")).is_file());
    }
    let passwd = text(Command::new("getent").args(["passwd", "vpnnat"]));
    assert!(
        passwd
            .trim_end()
            .ends_with(":/var/lib/vpnnat:/usr/sbin/nologin"),
        "a system user without a login: {passwd}"
    );
    let uid: u32 = passwd.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system uid: {uid}");
    let state = std::fs::metadata("/var/lib/vpnnat").unwrap();
    assert_eq!(state.uid(), uid, "the state directory is the service's");
    assert_eq!(state.mode() & 0o777, 0o700);
    let help = text(Command::new("/usr/bin/gateway").arg("--help"));
    assert!(help.contains("Usage"), "{help}");

    // Upgrade: an operator's edit of the configuration is kept, the binary
    // replaced.
    let edited = "\n# edited by the operator\n";
    let conf = "/etc/vpnnat/gateway.toml";
    let mut text_before = std::fs::read_to_string(conf).unwrap();
    text_before.push_str(edited);
    std::fs::write(conf, &text_before).unwrap();
    dpkg_install(&second);
    for program in PROGRAMS {
        let pkg = format!("vpnnat-{program}");
        assert_eq!(installed_version(&pkg).as_deref(), Some("1.2.3~test2"));
    }
    assert_eq!(std::fs::read_to_string(conf).unwrap(), text_before);

    // Data the service wrote survives remove and purge.
    let data = Path::new("/var/lib/vpnnat/kept-by-the-test");
    std::fs::write(data, "state").unwrap();

    // Remove: binaries gone, configuration kept.
    let packages = PROGRAMS.map(|p| format!("vpnnat-{p}"));
    run(Command::new("dpkg").arg("--remove").args(&packages));
    assert!(!Path::new("/usr/bin/gateway").exists());
    assert_eq!(std::fs::read_to_string(conf).unwrap(), text_before);

    // Purge: the configuration goes, the state stays.
    run(Command::new("dpkg").arg("--purge").args(&packages));
    assert!(!Path::new(conf).exists());
    assert!(
        !Path::new("/etc/vpnnat").exists(),
        "an empty /etc/vpnnat goes too"
    );
    assert_eq!(std::fs::read_to_string(data).unwrap(), "state");
    std::fs::remove_file(data).unwrap();
}
