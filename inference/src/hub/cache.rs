//! The Hugging Face cache's layout, as `huggingface_hub` writes it, so files are shared with
//! Python tools:
//!
//! ```text
//! models--ORG--NAME/
//!   blobs/<sha256 or etag>            the files' contents
//!   snapshots/<commit>/<path>         relative links into blobs/
//!   refs/<revision>                   the commit a branch or tag pointed to
//! ```
//!
//! and `REPO[:FILE]` resolved from it.

use std::path::{Path, PathBuf};

use super::{check_file_name, check_repo_id, check_revision, hub_error};
use crate::error::{Error, Result};

/// `models--ORG--NAME` under `cache`.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Where the commit `revision` last pointed to is kept.
fn ref_file(repo_dir: &Path, revision: &str) -> PathBuf {
    repo_dir.join("refs").join(revision)
}

/// Records that `revision` (a branch or tag) points to `commit`.
pub fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    check_revision(revision)?;
    if revision == commit {
        return Ok(());
    }
    let file = ref_file(repo_dir, revision);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::sys::write_atomic(&file, commit.as_bytes(), false).map_err(|e| Error::io(&file, e))
}

/// The commit `revision` points to in the cache: itself when it is a commit, else what
/// `refs/<revision>` says.
pub fn commit_of(repo_dir: &Path, revision: &str) -> Option<String> {
    if repo_dir.join("snapshots").join(revision).is_dir() && revision.len() == 40 {
        return Some(revision.to_owned());
    }
    check_revision(revision).ok()?;
    let text = std::fs::read_to_string(ref_file(repo_dir, revision)).ok()?;
    let commit = text.trim().to_owned();
    (commit.len() <= 128 && commit.chars().all(|c| c.is_ascii_hexdigit())).then_some(commit)
}

/// Links `snapshots/<commit>/<file>` to `blobs/<blob>` (relative, as `huggingface_hub` does;
/// a copy where links are not available), replacing an older link.
pub fn link(repo_dir: &Path, commit: &str, file: &str, blob: &str) -> Result<PathBuf> {
    check_file_name(file)?;
    let target = repo_dir.join("snapshots").join(commit).join(file);
    let dir = target
        .parent()
        .ok_or_else(|| hub_error(format!("{file}: no folder")))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if target.symlink_metadata().is_ok() {
        std::fs::remove_file(&target).map_err(|e| Error::io(&target, e))?;
    }
    let depth = Path::new(file).components().count() + 1;
    let relative: PathBuf = std::iter::repeat_n("..", depth)
        .collect::<PathBuf>()
        .join("blobs")
        .join(blob);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&relative, &target).map_err(|e| Error::io(&target, e))?;
    #[cfg(not(unix))]
    {
        let _ = relative;
        std::fs::copy(repo_dir.join("blobs").join(blob), &target)
            .map_err(|e| Error::io(&target, e))?;
    }
    Ok(target)
}

/// `REPO[:FILE]` (`org/name`, `org/name:file.gguf`) as a path in the cache, when it is there:
/// the file, or for a bare repository its snapshot folder (its one GGUF file when the folder
/// holds only GGUF weights and exactly one). `None` when `spec` is not a repository id or the
/// cache does not have it.
pub fn resolve(cache: &Path, spec: &str, revision: &str) -> Option<PathBuf> {
    let (repo, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    check_repo_id(repo).ok()?;
    if !repo.contains('/') {
        return None;
    }
    let dir = repo_dir(cache, repo);
    let commit = commit_of(&dir, revision)?;
    let snapshot = dir.join("snapshots").join(commit);
    if let Some(file) = file {
        check_file_name(file).ok()?;
        let path = snapshot.join(file);
        return path.exists().then_some(path);
    }
    if !snapshot.is_dir() {
        return None;
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    if ggufs.len() == 1 && !snapshot.join("config.json").exists() {
        return ggufs.into_iter().next();
    }
    Some(snapshot)
}

/// Whether a model argument looks like `ORG/NAME[:FILE]` rather than a path: it does not
/// exist on disk and has one `/`.
pub fn looks_like_repo(spec: &str) -> bool {
    let repo = spec.split_once(':').map_or(spec, |(r, _)| r);
    !Path::new(spec).exists() && repo.matches('/').count() == 1 && check_repo_id(repo).is_ok()
}

/// Deletes a model from the cache: `path` is a snapshot folder, or one file in a snapshot
/// (a GGUF). Its links go, then every blob no other snapshot links to; a repository left with
/// no snapshot goes entirely. Returns the bytes freed. Only paths inside `cache`'s
/// `models--*/snapshots/` are touched.
pub fn delete(cache: &Path, path: &Path) -> Result<u64> {
    let inside = path
        .strip_prefix(cache)
        .ok()
        .map(|rest| rest.components().collect::<Vec<_>>())
        .filter(|parts| {
            parts.len() >= 3
                && parts[0]
                    .as_os_str()
                    .to_string_lossy()
                    .starts_with("models--")
                && parts[1].as_os_str() == "snapshots"
                && parts
                    .iter()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .ok_or_else(|| {
            hub_error(format!(
                "{} is not a model in the Hugging Face cache ({})",
                path.display(),
                cache.display()
            ))
        })?;
    let repo = cache.join(inside[0].as_os_str());
    let blobs = repo.join("blobs");
    let target_blob = |link: &Path| -> Option<PathBuf> {
        let target = std::fs::read_link(link).ok()?;
        let name = target.file_name()?.to_owned();
        Some(blobs.join(name))
    };
    // The blobs this path links to.
    let mut linked = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| Error::io(&p, e))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)
                .map_err(|e| Error::io(&p, e))?
                .flatten()
            {
                stack.push(e.path());
            }
        } else if let Some(blob) = target_blob(&p) {
            linked.push(blob);
        }
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    } else {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    // The blobs other snapshots still link to.
    let mut still = std::collections::HashSet::new();
    let mut stack = vec![repo.join("snapshots")];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        } else if let Some(blob) = target_blob(&p) {
            still.insert(blob);
        }
    }
    let mut freed = 0;
    for blob in linked {
        if !still.contains(&blob)
            && let Ok(meta) = std::fs::metadata(&blob)
            && std::fs::remove_file(&blob).is_ok()
        {
            freed += meta.len();
        }
    }
    // Empty snapshot folders, then a repository with nothing left.
    let snapshots = repo.join("snapshots");
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    if std::fs::read_dir(&snapshots).map_or(true, |mut e| e.next().is_none()) {
        std::fs::remove_dir_all(&repo).map_err(|e| Error::io(&repo, e))?;
    }
    Ok(freed)
}
