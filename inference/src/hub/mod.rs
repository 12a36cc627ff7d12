//! The Hugging Face Hub: finding and downloading model files into the standard cache, so the
//! files are shared with Python tools and [`crate::llm::hf_cache`]'s scan lists them.
//!
//! - [`HubConfig`]: the standard environment (`HF_ENDPOINT` for mirrors and self-hosted hubs,
//!   `HF_TOKEN` or the token file, `HF_HUB_OFFLINE`, `HF_HOME` / `HF_HUB_CACHE`);
//! - [`api`]: repository info (files with sizes and LFS SHA-256s, gating, license) and search,
//!   paged;
//! - [`download`]: one file into the cache (`blobs/`, `snapshots/<commit>/…` links, `refs/`),
//!   resumed with HTTP `Range` after a cut connection or a restart, verified against the Hub's
//!   SHA-256 before it is used; a mismatch removes the partial file;
//! - [`cache`]: the cache layout, and `REPO[:FILE]` resolved from it;
//! - [`select`]: which files a download takes (the weights Studio loads, and their configs).
//!
//! The client is Studio's own thin code on `ureq` (the HTTP layer `hf-hub` uses): it needs
//! what `hf-hub` does not give, a SHA-256 check, cancelling and pausing mid-file, search and
//! the first response's headers on a redirected download. Nothing here touches the network
//! unless asked, and never with `HF_HUB_OFFLINE` set. The token is sent only to the Hub's own
//! host and never written to a log or an error.

pub mod api;
pub mod cache;
pub mod download;
pub mod select;

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the Hub is, who is asking, and where files go.
#[derive(Clone)]
pub struct HubConfig {
    /// The Hub's root URL, without a trailing `/` (`https://huggingface.co`, a mirror, a
    /// self-hosted hub).
    pub endpoint: String,
    /// An access token (for gated and private repositories); never logged.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: no request is made.
    pub offline: bool,
    /// The hub cache (`~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Connecting, and the longest the server may stay silent.
    pub timeout: Duration,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("cache", &self.cache)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HubConfig {
    /// The standard environment: `HF_ENDPOINT`, `HF_TOKEN` (else the token file,
    /// `HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_OFFLINE`, and the cache
    /// ([`crate::llm::hf_cache::cache_dir`]).
    pub fn from_env() -> Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| {
                let file = std::env::var_os("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| hf_home().map(|h| h.join("token")))?;
                std::fs::read_to_string(file).ok()
            })
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        let cache = crate::llm::hf_cache::cache_dir().ok_or_else(|| {
            Error::InvalidParameter(
                "no Hugging Face cache folder: set HF_HUB_CACHE, HF_HOME or HOME".into(),
            )
        })?;
        Ok(Self::new(&endpoint, token, offline, cache))
    }

    /// A hub at `endpoint` (a trailing `/` is dropped) with the default timeout.
    pub fn new(endpoint: &str, token: Option<String>, offline: bool, cache: PathBuf) -> Self {
        Self {
            endpoint: endpoint.trim().trim_end_matches('/').to_owned(),
            token,
            offline,
            cache,
            timeout: Duration::from_secs(30),
        }
    }
}

/// `HF_HOME`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
}

/// An error about the Hub, in words.
pub(crate) fn hub_error(message: impl Into<String>) -> Error {
    Error::Hub(message.into())
}

/// Checks a repository id: `name` or `org/name`, of letters, digits, `-`, `_` and `.`, no
/// `..`. What the Hub accepts, and nothing that could leave the cache folder.
pub fn check_repo_id(repo: &str) -> Result<()> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = (1..=2).contains(&parts.len())
        && repo.len() <= 200
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(hub_error(format!(
            "`{repo}` is not a repository id (expected ORG/NAME)"
        )))
    }
}

/// Checks a file name from a repository's file list: a relative path of plain parts (no `..`,
/// no root, no `\`), so it stays inside the snapshot folder.
pub fn check_file_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && name.len() <= 1024
        && !name.contains('\\')
        && !name.contains('\0')
        && !name.ends_with('/')
        && !name.contains("//")
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(hub_error(format!(
            "the repository lists a file named `{name}`, which would land outside its folder; \
             refused"
        )))
    }
}

/// A revision (branch, tag or commit) safe to use in a URL and as a `refs/` file name.
pub fn check_revision(revision: &str) -> Result<()> {
    let ok = !revision.is_empty()
        && revision.len() <= 200
        && !revision.contains("..")
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !revision.starts_with('/');
    if ok {
        Ok(())
    } else {
        Err(hub_error(format!("`{revision}` is not a revision")))
    }
}

/// Percent-encodes a path for a URL, keeping `/` (file names may hold spaces and `#`).
pub(crate) fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 15)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_cache_are_refused() {
        for ok in [
            "gpt2",
            "openai-community/gpt2",
            "TheBloke/Llama-2-7B-GGUF",
            "a.b/c_d",
        ] {
            assert!(check_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/x", "a/b/c", "../x", "a/..", "a/.", "a b/c", "a/b\\c"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        for ok in [
            "model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "a b.gguf",
        ] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a\\..\\b",
            "./a",
            "a//",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        assert!(check_revision("main").is_ok());
        assert!(check_revision("refs/pr/1").is_ok());
        assert!(check_revision("../main").is_err());
        assert_eq!(url_path("a b/c#d.gguf"), "a%20b/c%23d.gguf");
    }
}
