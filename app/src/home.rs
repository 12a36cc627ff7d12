//! Where Studio keeps the user's work, and how it writes it so a crash never loses it.
//!
//! Everything lives under one folder: `$STUDIO_HOME` when set (tests point it at a temporary
//! folder), else the platform data directory (`~/.local/share/studio` on Linux).

use std::io::Write;
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

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, synced
/// and renamed over the target, so readers (and a crash) see the old file or the new one,
/// never half of one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("saving {}", path.display()))
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("serializing")?;
    atomic_write(path, &bytes)
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
}
