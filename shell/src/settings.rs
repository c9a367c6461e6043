//! One settings loader for the three programs: defaults, the TOML file
//! (`--config PATH`, or the program's default path when that file exists),
//! then `VPNNAT_<SECTION>__<KEY>` environment overrides. The layering rules
//! are [`vpnnat::config`]'s; this module only reads the file and the
//! environment.

use std::io::ErrorKind;
use std::path::Path;

use serde::de::DeserializeOwned;
use vpnnat::config::{self, ConfigError};

/// Settings and where they came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// The settings.
    pub settings: T,
    /// The file they came from, or `defaults` when no file was read; error
    /// messages of the program's own checks start with it.
    pub source: String,
}

/// Settings that cannot be used; its message is one line naming the file (or
/// variable) and the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    // The IO error is in the message, not a `source`: with it as both,
    // `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A value is missing its mark (syntax, type, unknown key).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Loads settings from `path`, or from `default_path` when no path is given
/// and that file exists, and the process environment.
///
/// # Errors
/// A [`SettingsError`].
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    default_path: &str,
) -> Result<Loaded<T>, SettingsError> {
    load_with_env(path, default_path, std::env::vars())
}

/// [`load`] with the environment given (for tests).
///
/// # Errors
/// A [`SettingsError`].
pub fn load_with_env<T: DeserializeOwned>(
    path: Option<&Path>,
    default_path: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, SettingsError> {
    let (source, text) = match path {
        Some(p) => (p.display().to_string(), Some(read(p)?)),
        None => match read(Path::new(default_path)) {
            Ok(t) => (default_path.to_owned(), Some(t)),
            Err(SettingsError::Read { error, .. }) if error.kind() == ErrorKind::NotFound => {
                ("defaults".to_owned(), None)
            }
            Err(e) => return Err(e),
        },
    };
    let settings = config::load(
        text.as_deref().map(|t| (source.as_str(), t)),
        config::env_overrides(env),
    )?;
    Ok(Loaded { settings, source })
}

fn read(path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|error| SettingsError::Read {
        path: path.display().to_string(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        server: Server,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Server {
        url: String,
        poll_wait_ms: u64,
    }

    impl Default for Server {
        fn default() -> Self {
            Self {
                url: String::new(),
                poll_wait_ms: 25_000,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_environment_wins_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[server]\nurl = \"http://file\"\npoll_wait_ms = 1000\n",
        )
        .unwrap();
        let l: Loaded<Settings> = load_with_env(
            Some(&path),
            "/nonexistent/default.toml",
            env(&[
                ("VPNNAT_SERVER__URL", "http://env"),
                // Not an override: a CLI fallback, and not a key.
                ("VPNNAT_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(l.settings.server.url, "http://env");
        assert_eq!(l.settings.server.poll_wait_ms, 1000);
        assert_eq!(l.source, path.display().to_string());
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_missing_named_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.toml");
        let l: Loaded<Settings> = load_with_env(None, absent.to_str().unwrap(), env(&[])).unwrap();
        assert_eq!(l.settings, Settings::default());
        assert_eq!(l.source, "defaults");
        let e = load_with_env::<Settings>(Some(&absent), "/x", env(&[])).unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        assert!(text.starts_with(&absent.display().to_string()), "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn the_default_file_is_read_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.toml");
        std::fs::write(&path, "[server]\npoll_wait_ms = 7\n").unwrap();
        let l: Loaded<Settings> = load_with_env(None, path.to_str().unwrap(), env(&[])).unwrap();
        assert_eq!(l.settings.server.poll_wait_ms, 7);
        assert_eq!(l.source, path.display().to_string());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_one_line_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        let shown = path.display().to_string();
        std::fs::write(&path, "[server]\nurl2 = \"x\"\n").unwrap();
        let e = load_with_env::<Settings>(Some(&path), "/x", env(&[])).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with(&format!("{shown}: server")), "{text}");
        assert!(text.contains("url2"), "{text}");
        assert!(!text.contains('\n'));

        std::fs::write(&path, "[server]\npoll_wait_ms = \"long\"\n").unwrap();
        let text = load_with_env::<Settings>(Some(&path), "/x", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with(&format!("{shown}: server.poll_wait_ms: ")),
            "{text}"
        );
        assert!(!text.contains('\n'));

        let text = load_with_env::<Settings>(
            Some(&path),
            "/x",
            env(&[("VPNNAT_SERVER__POLL_WAIT_MS", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.starts_with("VPNNAT_SERVER__POLL_WAIT_MS: server.poll_wait_ms: "),
            "{text}"
        );
    }
}
