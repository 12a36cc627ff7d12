//! Where Studio keeps the user's work, and how it writes it so a crash never loses it.
//!
//! Everything lives under one folder: `$STUDIO_HOME` when set (tests point it at a temporary
//! folder), else the platform data directory (`~/.local/share/studio` on Linux).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The folder holding settings, conversations and window state.
pub fn studio_home() -> PathBuf {
    if let Some(p) = std::env::var_os("STUDIO_HOME") {
        return PathBuf::from(p);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("studio")
}

/// Writes `bytes` to `path` atomically (see [`studio_inference::sys::write_atomic`]: an
/// exclusive temporary, synced and renamed over the target; permissions kept, symlinks
/// written through).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    studio_inference::sys::write_atomic(path, bytes, false)
        .with_context(|| format!("saving {}", path.display()))
}

/// As [`atomic_write`], readable by the user only (0600 on Unix): files holding secrets.
pub fn atomic_write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    studio_inference::sys::write_atomic(path, bytes, true)
        .with_context(|| format!("saving {}", path.display()))
}

/// Moves an unreadable file aside to `NAME.bad-<timestamp>` (never replacing an earlier
/// copy) and says so, for the notice; empty when it could not be moved.
pub fn keep_corrupt(path: &Path) -> String {
    studio_inference::sys::keep_corrupt(path)
        .map(|bad| format!(" The file was kept as {}.", bad.display()))
        .unwrap_or_default()
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("serializing")?;
    atomic_write(path, &bytes)
}

/// As [`save_json`], readable by the user only (settings holding an API key).
pub fn save_json_private<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("serializing")?;
    atomic_write_private(path, &bytes)
}

/// Reads JSON written by [`save_json`]; `Ok(None)` when the file does not exist.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// How many corrupt copies of `name` ([`keep_corrupt`]) lie in `dir` (for tests).
#[cfg(test)]
pub(crate) fn kept_copies(dir: &Path, name: &str) -> usize {
    let prefix = format!("{name}.bad-");
    std::fs::read_dir(dir)
        .expect("ls")
        .filter(|e| {
            let entry = e.as_ref().expect("entry");
            entry.file_name().to_string_lossy().starts_with(&prefix)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("sub/state.json");
        save_json(&p, &vec![1, 2, 3]).expect("save");
        save_json(&p, &vec![4]).expect("save again");
        assert_eq!(load_json::<Vec<i32>>(&p).expect("load"), Some(vec![4]));
        let names: Vec<_> = std::fs::read_dir(p.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(
            load_json::<Vec<i32>>(&tmp.path().join("none.json")).expect("ok"),
            None
        );
    }

    /// Secrets are 0600; a user's file keeps its mode and its symlink; a planted temporary
    /// name is skipped, never followed; corrupt copies are never overwritten.
    #[test]
    #[cfg(unix)]
    fn writes_keep_modes_and_links_and_corrupt_files_are_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tmp");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;

        let secret = tmp.path().join("settings.json");
        save_json_private(&secret, &"key").expect("save");
        assert_eq!(mode(&secret), 0o600);

        let script = tmp.path().join("run.sh");
        std::fs::write(&script, "echo 1").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let link = tmp.path().join("link.sh");
        std::os::unix::fs::symlink(&script, &link).expect("symlink");
        atomic_write(&link, b"echo 2").expect("save through the link");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&script).expect("read"), "echo 2");
        assert_eq!(mode(&script), 0o750);

        // A symlink planted at the first temporary name is left alone.
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "untouched").expect("write");
        let planted = tmp
            .path()
            .join(format!(".x.json.{}.0.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).expect("plant");
        for _ in 0..3 {
            atomic_write(&tmp.path().join("x.json"), b"new").expect("save");
        }
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "untouched");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("x.json")).expect("read"),
            "new"
        );

        let bad = tmp.path().join("state.json");
        let mut kept = Vec::new();
        for text in ["{ one", "{ two"] {
            std::fs::write(&bad, text).expect("write");
            let note = keep_corrupt(&bad);
            assert!(note.contains("state.json.bad-"), "{note}");
            assert!(!bad.exists());
            kept.push(text);
        }
        let mut copies: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .filter_map(|e| {
                let e = e.expect("entry");
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.bad-")
                    .then(|| std::fs::read_to_string(e.path()).expect("read"))
            })
            .collect();
        copies.sort();
        assert_eq!(copies, kept, "both corrupt copies are kept");
    }
}
