//! Finding models the user already has in the Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `models--ORG--NAME/snapshots/REV/…`: Hugging Face folders and GGUF files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::llm::loader;

/// One model found in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedModel {
    /// `ORG/NAME`.
    pub repo: String,
    /// The snapshot folder to load.
    pub path: PathBuf,
    /// `Ok(architecture label)` when this build can load it, else why not. A GGUF file's
    /// label names its architecture and quant type (`GGUF qwen2 Q4_K_M`).
    pub support: Result<String, String>,
    /// Its size in bytes: a GGUF file's, or a folder model's files together (links followed).
    pub bytes: Option<u64>,
    /// Which kind of model it is, so it opens in the panel that runs it.
    #[serde(default)]
    pub kind: CachedKind,
}

/// The kind of a model in the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CachedKind {
    /// A language model (Chat, Code).
    #[default]
    Llm,
    /// A Stable Diffusion pipeline or checkpoint (Canvas).
    Diffusion,
    /// A StyleGAN2 network (Latent Explorer).
    Gan,
}

/// The newest snapshot folder of a repository in the cache.
fn newest_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(repo_dir.join("snapshots"))
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        })
        .map(|e| e.path())
}

/// The image models and GAN networks of a snapshot that holds no language model: a diffusers
/// pipeline (`model_index.json`), or its top-level checkpoints (an SD single file, a StyleGAN2
/// safetensors, one of NVIDIA's network pickles). Only headers are read (a `.pkl` not at all).
fn other_models(repo: &str, snapshot: &Path) -> Vec<CachedModel> {
    if snapshot.join("model_index.json").exists() {
        return vec![CachedModel {
            repo: repo.to_owned(),
            path: snapshot.to_path_buf(),
            support: Ok("Stable Diffusion pipeline (diffusers)".to_owned()),
            bytes: folder_bytes(snapshot),
            kind: CachedKind::Diffusion,
        }];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(snapshot)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|file| {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())?;
            let (kind, label) = if ext == "pkl" {
                (CachedKind::Gan, "NVIDIA network (pickle, read as data)")
            } else if (ext == "safetensors" || ext == "ckpt")
                && crate::diffusion::model::is_diffusion_model(&file)
            {
                (CachedKind::Diffusion, "Stable Diffusion checkpoint")
            } else if ext == "safetensors" && is_stylegan(&file) {
                (CachedKind::Gan, "StyleGAN2 network")
            } else {
                return None;
            };
            let name = file.file_name()?.to_string_lossy().into_owned();
            Some(CachedModel {
                repo: format!("{repo}/{name}"),
                bytes: std::fs::metadata(&file).ok().map(|m| m.len()),
                path: file,
                support: Ok(label.to_owned()),
                kind,
            })
        })
        .collect()
}

/// Whether a safetensors file holds NVIDIA's StyleGAN2 `G_ema` names (its header only).
fn is_stylegan(file: &Path) -> bool {
    crate::weights::open_checkpoint(&[file.to_path_buf()])
        .is_ok_and(|t| t.get("synthesis.b4.const").is_ok() || t.get("mapping.w_avg").is_ok())
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

/// GGUF files in a repo's snapshots (`models--ORG--NAME-GGUF/snapshots/REV/*.gguf`), newest
/// snapshot first, each file once.
fn gguf_files(repo_dir: &Path) -> Vec<PathBuf> {
    let Ok(snapshots) = std::fs::read_dir(repo_dir.join("snapshots")) else {
        return Vec::new();
    };
    let mut snapshots: Vec<(std::time::SystemTime, PathBuf)> = snapshots
        .flatten()
        .map(|e| {
            let time = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (time, e.path())
        })
        .collect();
    snapshots.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::new();
    for (_, snapshot) in snapshots {
        let Ok(entries) = std::fs::read_dir(&snapshot) else {
            continue;
        };
        let mut here: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| loader::is_gguf(p))
            .filter(|p| seen.insert(p.file_name().map(std::ffi::OsStr::to_os_string)))
            .collect();
        here.sort();
        files.extend(here);
    }
    files
}

/// The files of a snapshot folder together (links followed; subfolders too, a few levels),
/// less its GGUF files, which are listed on their own.
fn folder_bytes(dir: &Path) -> Option<u64> {
    fn walk(dir: &Path, depth: usize) -> u64 {
        if depth > 4 {
            return 0;
        }
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let p = e.path();
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() => walk(&p, depth + 1),
                    Ok(_)
                        if p.extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("gguf")) =>
                    {
                        0
                    }
                    Ok(m) => m.len(),
                    Err(_) => 0,
                }
            })
            .sum()
    }
    dir.is_dir().then(|| walk(dir, 0))
}

/// Lists every model in `dir` with whether this build can load it: one entry per Hugging Face
/// folder model, and one per GGUF file (`ORG/NAME/file.gguf`), also in repos that hold both.
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
        let ggufs = gguf_files(&path);
        let resolved = loader::resolve(&path);
        for file in &ggufs {
            let support = crate::llm::gguf::inspect(file)
                .map(|info| format!("GGUF {} {}", info.architecture, info.file_type))
                .map_err(|e| e.to_string());
            let file_name = file
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            found.push(CachedModel {
                repo: format!("{repo}/{file_name}"),
                path: file.clone(),
                support,
                bytes: std::fs::metadata(file).ok().map(|m| m.len()),
                kind: CachedKind::Llm,
            });
        }
        if resolved.is_err() {
            let others = newest_snapshot(&path)
                .map(|snapshot| other_models(&repo, &snapshot))
                .unwrap_or_default();
            if !others.is_empty() || !ggufs.is_empty() {
                found.extend(others);
                continue;
            }
        }
        let support = match &resolved {
            Ok(files) => loader::detect_architecture(&files.config)
                .map(|(arch, _)| arch.label().to_owned())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let path = resolved.map_or(path, |f| f.dir);
        let bytes = folder_bytes(&path);
        found.push(CachedModel {
            repo,
            path,
            support,
            bytes,
            kind: CachedKind::Llm,
        });
    }
    found.sort_by(|a, b| a.repo.cmp(&b.repo));
    found
}
