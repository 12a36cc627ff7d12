//! Finding models the user already has in the Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `models--ORG--NAME/snapshots/REV/…`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::loader;

/// One model found in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedModel {
    /// `ORG/NAME`.
    pub repo: String,
    /// The snapshot folder to load.
    pub path: PathBuf,
    /// `Ok(architecture label)` when this build can load it, else why not.
    pub support: Result<String, String>,
}

/// The hub cache folder, from the environment.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Lists every model repo in `dir` with whether this build can load it.
pub fn scan(dir: &Path) -> Vec<CachedModel> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("models--") else {
            continue;
        };
        let repo = rest.replacen("--", "/", 1);
        let path = entry.path();
        let support = match loader::resolve(&path) {
            Ok(files) => loader::detect_architecture(&files.config)
                .map(|(arch, _)| arch.label().to_owned())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let path = loader::resolve(&path).map_or(path, |f| f.dir);
        found.push(CachedModel {
            repo,
            path,
            support,
        });
    }
    found.sort_by(|a, b| a.repo.cmp(&b.repo));
    found
}
