//! Secrets on disk: private files (mode 0600 in a 0700 directory, never
//! silently overwritten) and WireGuard private-key files (base64, as
//! `wg genkey` writes them).

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use vpnnat::tunnel::PrivateKey;

/// A key file that cannot be used; the message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing failed.
    // The IO error is in the message, not a `source` (see `SettingsError`).
    #[error("{action} {path}: {error}")]
    Io {
        /// `reading`, `creating`, `writing` or `removing`.
        action: &'static str,
        /// The file or directory.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file holds something else.
    #[error("{path}: not a base64 WireGuard key")]
    NotAKey {
        /// The file.
        path: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError {
    let path = path.display().to_string();
    move |error| KeyFileError::Io {
        action,
        path,
        error,
    }
}

/// A new private key from the operating system's random source.
pub fn generate_private_key() -> PrivateKey {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    PrivateKey::from_bytes(bytes)
}

/// Creates `path` for writing with mode 0600 (its missing parents with 0700),
/// like a file written under `umask 077`. Fails with
/// [`ErrorKind::AlreadyExists`] when the file exists.
///
/// # Errors
/// The IO error (creating the directory or the file).
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Replaces `path` with `contents` at once, mode 0600 (its missing parents
/// with 0700): written to a private temporary file beside it, synced, then
/// renamed over it, so a crash leaves the old or the new file, never half.
///
/// # Errors
/// The IO error (creating, writing, syncing or renaming).
pub fn replace_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = create_private_file(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Creates `dir` and its missing parents with mode 0700; an existing
/// directory is left as it is.
///
/// # Errors
/// The IO error.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Whether others than the owner may read or write `path`.
pub fn readable_by_others(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Logs a warning when others than the owner may read or write `path`.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the {what} is readable by others; chmod 600 it"
        );
    }
}

/// Reads a private-key file (warning when others may read it).
///
/// # Errors
/// When it cannot be read or holds no key.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(io_error("reading", path))?;
    warn_if_readable_by_others(path, "private key file");
    text.parse().map_err(|_| KeyFileError::NotAKey {
        path: path.display().to_string(),
    })
}

/// Reads a private-key file, or creates it with a new key (0600).
///
/// # Errors
/// When it cannot be read, holds no key, or cannot be created.
pub fn load_or_create_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    match read_private_key(path) {
        Err(KeyFileError::Io { error, .. }) if error.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let key = generate_private_key();
    let mut f = create_private_file(path).map_err(io_error("creating", path))?;
    writeln!(f, "{}", key.to_base64()).map_err(io_error("writing", path))?;
    tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a private key");
    Ok(key)
}

/// Where the next private key waits during a planned rotation of the key
/// in `current` (a gateway's WireGuard key): `<current>.next`, beside it, so
/// that a restart in the middle of the rotation keeps answering both keys.
pub fn next_key_path(current: &Path) -> std::path::PathBuf {
    let mut name = current.as_os_str().to_owned();
    name.push(".next");
    std::path::PathBuf::from(name)
}

/// The next private key of `current` ([`next_key_path`]), if a rotation is
/// under way. A next key equal to the current one (a crash after the
/// promotion wrote the current file, before it removed the next one) is no
/// rotation: the leftover file is removed.
///
/// # Errors
/// When the file exists but cannot be read or holds no key.
pub fn read_next_private_key(
    current: &Path,
    current_key: &PrivateKey,
) -> Result<Option<PrivateKey>, KeyFileError> {
    let path = next_key_path(current);
    match read_private_key(&path) {
        Err(KeyFileError::Io { error, .. }) if error.kind() == ErrorKind::NotFound => Ok(None),
        Ok(key) if key.public_key() == current_key.public_key() => {
            std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// Starts a planned rotation of the key in `current`: the next key
/// ([`next_key_path`], mode 0600), new unless one is already waiting (a
/// second request during a rotation keeps its key).
///
/// # Errors
/// When the next key file cannot be read or created.
pub fn create_next_private_key(
    current: &Path,
    current_key: &PrivateKey,
) -> Result<PrivateKey, KeyFileError> {
    if let Some(key) = read_next_private_key(current, current_key)? {
        return Ok(key);
    }
    let path = next_key_path(current);
    let key = generate_private_key();
    let mut f = create_private_file(&path).map_err(io_error("creating", &path))?;
    writeln!(f, "{}", key.to_base64()).map_err(io_error("writing", &path))?;
    f.sync_all().map_err(io_error("writing", &path))?;
    tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated the next private key");
    Ok(key)
}

/// Ends a planned rotation: the next key replaces the current file at once
/// ([`replace_private_file`]), then its own file is removed. `None` when no
/// rotation was under way.
///
/// # Errors
/// When a file cannot be read, replaced or removed.
pub fn promote_next_private_key(
    current: &Path,
    current_key: &PrivateKey,
) -> Result<Option<PrivateKey>, KeyFileError> {
    let Some(next) = read_next_private_key(current, current_key)? else {
        return Ok(None);
    };
    let text = format!("{}\n", next.to_base64());
    replace_private_file(current, text.as_bytes()).map_err(io_error("writing", current))?;
    let path = next_key_path(current);
    std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
    tracing::info!(path = %current.display(), public_key = %next.public_key(), "the next private key is current");
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_missing_key_is_created_0600_in_a_0700_directory_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/gateway.key");
        let key = load_or_create_private_key(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("sub")), 0o700);
        assert!(!readable_by_others(&path));
        let again = load_or_create_private_key(&path).unwrap();
        assert_eq!(again.public_key(), key.public_key(), "kept, not replaced");
        assert_eq!(
            read_private_key(&path).unwrap().public_key(),
            key.public_key()
        );
    }

    #[test]
    fn a_key_readable_by_others_still_loads_and_a_bad_one_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(
            &path,
            format!("{}\n", PrivateKey::from_bytes([3; 32]).to_base64()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(readable_by_others(&path));
        assert_eq!(
            read_private_key(&path).unwrap().public_key(),
            PrivateKey::from_bytes([3; 32]).public_key()
        );
        std::fs::write(&path, "not a key\n").unwrap();
        let e = load_or_create_private_key(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}: not a base64 WireGuard key", path.display()));
    }

    #[test]
    fn private_files_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        create_private_file(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let e = create_private_file(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn an_unreadable_key_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, but not with NotFound.
        let e = load_or_create_private_key(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("reading "), "{e}");
    }

    #[test]
    fn rotation_next_key_file_is_private_survives_restarts_and_promotes() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("gateway.key");
        let old = load_or_create_private_key(&current).unwrap();
        assert!(read_next_private_key(&current, &old).unwrap().is_none());
        assert!(promote_next_private_key(&current, &old).unwrap().is_none());

        let next = create_next_private_key(&current, &old).unwrap();
        let path = next_key_path(&current);
        assert_eq!(path, dir.path().join("gateway.key.next"));
        assert_eq!(mode(&path), 0o600);
        assert_ne!(next.public_key(), old.public_key());
        // A restart, or a second request, finds the same next key.
        let again = create_next_private_key(&current, &old).unwrap();
        assert_eq!(again.public_key(), next.public_key());
        let read = read_next_private_key(&current, &old).unwrap().unwrap();
        assert_eq!(read.public_key(), next.public_key());

        let promoted = promote_next_private_key(&current, &old).unwrap().unwrap();
        assert_eq!(promoted.public_key(), next.public_key());
        assert_eq!(
            read_private_key(&current).unwrap().public_key(),
            next.public_key()
        );
        assert_eq!(mode(&current), 0o600);
        assert!(!path.exists());
    }

    #[test]
    fn rotation_a_next_key_left_equal_to_the_current_one_is_no_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("gateway.key");
        let key = load_or_create_private_key(&current).unwrap();
        let path = next_key_path(&current);
        std::fs::copy(&current, &path).unwrap();
        assert!(read_next_private_key(&current, &key).unwrap().is_none());
        assert!(!path.exists());
        std::fs::write(&path, "not a key\n").unwrap();
        let err = read_next_private_key(&current, &key).unwrap_err();
        assert!(err.to_string().contains("gateway.key.next"), "{err}");
    }
}
