//! Layered configuration: defaults, then a TOML file, then `VPNNAT_*`
//! environment overrides, deserialized into a program's typed settings.
//!
//! Pure: the caller reads the file and the environment and passes the text in,
//! so the same rules apply to all three programs and are tested here. Errors
//! are one line naming the source (file or variable) and the key:
//!
//! ```text
//! /etc/vpnnat/gateway.toml: tunnel.max_tunnels: invalid type: string "two", expected u32
//! ```
//!
//! An override `VPNNAT_<SECTION>__<KEY>=value` sets `section.key`; the value is
//! read as a TOML value when it parses as one (`42`, `true`, `["a"]`) and as a
//! string otherwise. Environment overrides win over the file so that a
//! deployment can change one setting without editing it.
//!
//! Which variables are overrides is one rule for all three programs
//! ([`env_overrides`]): those named `VPNNAT_…` that contain `__`. Every
//! setting lives in a section, and the other `VPNNAT_*` variables are the
//! programs' command-line fallbacks (`VPNNAT_LOG_FORMAT`, …) or test switches,
//! not configuration.

use std::fmt;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "VPNNAT_";

/// The environment variables that are configuration overrides:
/// `VPNNAT_<SECTION>__<KEY>` (the name starts with [`ENV_PREFIX`] and contains `__`).
pub fn env_overrides(
    vars: impl IntoIterator<Item = (String, String)>,
) -> impl Iterator<Item = (String, String)> {
    vars.into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
}

/// Field deserializers for settings written as strings in TOML: addresses,
/// prefixes, anything with `FromStr`.
pub mod de {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer};

    /// A string parsed with `FromStr`.
    ///
    /// # Errors
    /// The parser's message.
    pub fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        s.trim().parse().map_err(serde::de::Error::custom)
    }

    /// Like [`parsed`], with an empty string meaning `None`.
    ///
    /// # Errors
    /// The parser's message.
    pub fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        s.trim().parse().map(Some).map_err(serde::de::Error::custom)
    }

    /// A list of strings, each parsed with `FromStr`; the message names the bad one.
    ///
    /// # Errors
    /// The parser's message for the first bad element.
    pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                s.parse::<T>()
                    .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
            })
            .collect()
    }
}

/// A configuration that cannot be used, located by source and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file path or the environment variable.
    pub source: String,
    /// The dotted key, empty when the problem is the file's syntax as a whole.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Builds settings of type `T` from an optional file's text and environment
/// variables. Fields missing everywhere take `T`'s serde defaults.
///
/// `file` is `(path for messages, text)`. `env` may hold unrelated variables;
/// only those starting with [`ENV_PREFIX`] are used.
///
/// # Errors
/// A [`ConfigError`] naming the file or variable and the key at fault.
pub fn load<T: DeserializeOwned>(
    file: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut root = Table::new();
    let mut origin = "defaults".to_owned();
    if let Some((path, text)) = file {
        root = text
            .parse::<Table>()
            .map_err(|e| syntax_error(path, text, &e))?;
        origin = path.to_owned();
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.len() > ENV_PREFIX.len())
        .collect();
    overrides.sort();
    let mut env_keys = Vec::new();
    for (var, raw) in overrides {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError {
                source: var,
                key: String::new(),
                message: "expected VPNNAT_<SECTION>__<KEY>".to_owned(),
            });
        }
        set_path(&mut root, &path, parse_env_value(&raw)).map_err(|message| ConfigError {
            source: var.clone(),
            key: path.join("."),
            message,
        })?;
        env_keys.push((path.join("."), var));
    }
    serde_path_to_error::deserialize::<_, T>(Value::Table(root)).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        // Name the variable when the bad key came from the environment.
        let source = env_keys
            .iter()
            .find(|(k, _)| !key.is_empty() && (key == *k || key.starts_with(&format!("{k}."))))
            .map_or(origin.clone(), |(_, var)| var.clone());
        ConfigError {
            source,
            key,
            message: e.into_inner().message().replace('\n', " "),
        }
    })
}

fn syntax_error(path: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let message = e.message().replace('\n', " ");
    ConfigError {
        source: line.map_or(path.to_owned(), |l| format!("{path}:{l}")),
        key: String::new(),
        message,
    }
}

fn parse_env_value(raw: &str) -> Value {
    // `x = <raw>` parses only if raw is a TOML value; otherwise it is a string.
    format!("x = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_owned());
    };
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a section"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        listen: String,
        database: Database,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:8080".into(),
                database: Database::default(),
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Database {
        url: String,
        max_connections: u32,
    }

    impl Default for Database {
        fn default() -> Self {
            Self {
                url: "sqlite://x.db".into(),
                max_connections: 4,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).into(), (*b).into()))
            .collect()
    }

    #[test]
    fn defaults_apply_without_file_or_env() {
        let s: Settings = load(None, env(&[("PATH", "/bin")])).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn file_then_env_override() {
        let file = "listen = \"0.0.0.0:1\"\n[database]\nmax_connections = 9\n";
        let s: Settings = load(
            Some(("/etc/x.toml", file)),
            env(&[
                ("VPNNAT_DATABASE__URL", "postgres://h/db"),
                ("VPNNAT_LISTEN", "[::]:2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen, "[::]:2");
        assert_eq!(s.database.url, "postgres://h/db");
        assert_eq!(s.database.max_connections, 9);
    }

    #[test]
    fn bad_type_names_file_and_key() {
        let file = "[database]\nmax_connections = \"many\"\n";
        let e = load::<Settings>(Some(("/etc/x.toml", file)), env(&[])).unwrap_err();
        assert_eq!(e.source, "/etc/x.toml");
        assert_eq!(e.key, "database.max_connections");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = load::<Settings>(Some(("f.toml", "[database]\nurl2 = 1\n")), env(&[])).unwrap_err();
        assert!(e.message.contains("url2"), "{e}");
        assert_eq!(e.source, "f.toml");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let e = load::<Settings>(None, env(&[("VPNNAT_DATABASE__MAX_CONNECTIONS", "lots")]))
            .unwrap_err();
        assert_eq!(e.source, "VPNNAT_DATABASE__MAX_CONNECTIONS");
        assert_eq!(e.key, "database.max_connections");
    }

    #[test]
    fn only_sectioned_vpnnat_variables_are_overrides() {
        let kept: Vec<String> = env_overrides(env(&[
            ("VPNNAT_DATABASE__URL", "x"),
            ("VPNNAT_LOG_FORMAT", "json"),
            ("VPNNAT_GATEWAY_CONFIG", "/etc/x"),
            ("OTHER__THING", "y"),
            ("PATH", "/bin"),
        ]))
        .map(|(k, _)| k)
        .collect();
        assert_eq!(kept, vec!["VPNNAT_DATABASE__URL".to_owned()]);
        // So a CLI fallback variable never trips deny_unknown_fields.
        let s: Settings = load(None, env_overrides(env(&[("VPNNAT_LOG_FORMAT", "json")]))).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn string_fields_parse_with_from_str() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Net {
            #[serde(deserialize_with = "de::parsed")]
            addr: std::net::Ipv4Addr,
            #[serde(default, deserialize_with = "de::optional")]
            gw: Option<std::net::Ipv4Addr>,
            #[serde(deserialize_with = "de::list")]
            more: Vec<std::net::Ipv4Addr>,
        }
        let n: Net = load(
            Some((
                "n.toml",
                "addr = \"10.0.0.1\"\ngw = \"\"\nmore = [\"10.0.0.2\"]\n",
            )),
            env(&[]),
        )
        .unwrap();
        assert_eq!(n.addr, std::net::Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(n.gw, None);
        assert_eq!(n.more.len(), 1);
        let e = load::<Net>(
            Some(("n.toml", "addr = \"10.0.0.1\"\nmore = [\"ten\"]\n")),
            env(&[]),
        )
        .unwrap_err();
        assert_eq!(e.key, "more");
        assert!(e.message.contains("\"ten\""), "{e}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e =
            load::<Settings>(Some(("f.toml", "listen = 1\n[database\n")), env(&[])).unwrap_err();
        assert_eq!(e.source, "f.toml:2");
        assert!(!e.to_string().contains('\n'));
    }
}
