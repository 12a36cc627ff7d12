//! The Hub's JSON API: a repository's files (with sizes and LFS SHA-256s), whether it is
//! gated, its license; and search, one page at a time.

use std::io::Read;

use serde::Deserialize;

use super::{HubConfig, check_file_name, check_repo_id, check_revision, hub_error, url_path};
use crate::error::Result;

/// Most of a JSON answer read (a large repository's file list is a few hundred KiB).
const MAX_JSON: u64 = 32 * 1024 * 1024;

/// One file of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Its path in the repository.
    pub name: String,
    /// Its size in bytes, when the Hub says.
    pub size: Option<u64>,
    /// The SHA-256 of its content, for files stored with Git LFS (every weights file).
    pub sha256: Option<String>,
}

/// What the Hub says about a repository at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    /// `org/name`.
    pub id: String,
    /// The commit the revision points to.
    pub commit: String,
    /// Its files (each name checked: none leaves the repository's folder).
    pub files: Vec<RepoFile>,
    /// Whether a license must be accepted on the Hub before files can be downloaded.
    pub gated: bool,
    /// The license, from the model card.
    pub license: Option<String>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchHit {
    /// `org/name`.
    pub id: String,
    /// Downloads in the last month, when the Hub says.
    pub downloads: Option<u64>,
    /// The Hub's tags (`gguf`, `text-generation`, `diffusers`, …).
    pub tags: Vec<String>,
}

/// One page of search results, and where the next one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPage {
    /// This page's results.
    pub hits: Vec<SearchHit>,
    /// The next page's URL (the `Link: <…>; rel="next"` header), if there is one.
    pub next: Option<String>,
}

#[derive(Deserialize)]
struct RawLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct RawSibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<RawLfs>,
}

#[derive(Deserialize)]
struct RawInfo {
    id: Option<String>,
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<RawSibling>,
    /// `false`, or how access is granted (`"auto"`, `"manual"`).
    gated: Option<serde_json::Value>,
    #[serde(rename = "cardData")]
    card_data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawHit {
    id: Option<String>,
    #[serde(rename = "modelId")]
    model_id: Option<String>,
    downloads: Option<u64>,
    #[serde(default)]
    tags: Vec<String>,
}

/// A `ureq` agent for the Hub: redirects are followed by the caller (the first answer's
/// headers matter), status codes are answers, and silence is bounded.
pub(crate) fn agent(config: &HubConfig) -> ureq::Agent {
    let t = Some(config.timeout);
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("studio/", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(t)
        .timeout_connect(t)
        .timeout_per_read(t)
        .timeout_per_write(t)
        .build()
        .into()
}

/// The host of a URL (`https://host:port/…` → `host:port`).
pub(crate) fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// A GET to `url`, with the token only when `url` is on the Hub's own host.
pub(crate) fn get(
    config: &HubConfig,
    agent: &ureq::Agent,
    url: &str,
    range_from: Option<u64>,
) -> Result<ureq::http::Response<ureq::Body>> {
    if config.offline {
        return Err(hub_error(
            "HF_HUB_OFFLINE is set: Studio makes no request to the Hugging Face Hub",
        ));
    }
    let mut request = agent.get(url);
    if let Some(token) = &config.token
        && host_of(url) == host_of(&config.endpoint)
    {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    if let Some(from) = range_from {
        request = request.header("Range", format!("bytes={from}-"));
    }
    request.call().map_err(|e| {
        hub_error(format!(
            "could not reach {}: {}",
            host_of(url),
            transport_words(&e)
        ))
    })
}

/// A transport failure in words.
pub(crate) fn transport_words(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "no answer in time".to_owned(),
        ureq::Error::HostNotFound => "the host name does not resolve (no network?)".to_owned(),
        ureq::Error::ConnectionFailed => "the connection failed (no network?)".to_owned(),
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Says what an error status means for `repo`.
pub(crate) fn status_error(config: &HubConfig, repo: &str, status: u16) -> crate::error::Error {
    match status {
        401 | 403 => hub_error(format!(
            "{repo} is gated or private (HTTP {status}): accept its license at {}/{repo} and set \
             HF_TOKEN (or log in with the Hub's tools) to download it",
            config.endpoint
        )),
        404 => hub_error(format!(
            "{repo}: no such repository, revision or file on {} (HTTP 404)",
            config.endpoint
        )),
        429 => hub_error(format!(
            "{}: too many requests (HTTP 429); try again in a minute",
            config.endpoint
        )),
        s => hub_error(format!("{repo}: the Hub answered HTTP {s}")),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    response: ureq::http::Response<ureq::Body>,
    what: &str,
) -> Result<T> {
    let mut text = String::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_JSON)
        .read_to_string(&mut text)
        .map_err(|e| hub_error(format!("{what}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| hub_error(format!("{what}: not the Hub's JSON: {e}")))
}

/// Repository `repo`'s files at `revision` (a branch, tag or commit).
pub fn repo_info(config: &HubConfig, repo: &str, revision: &str) -> Result<RepoInfo> {
    check_repo_id(repo)?;
    check_revision(revision)?;
    let url = format!(
        "{}/api/models/{repo}/revision/{}?blobs=true",
        config.endpoint,
        url_path(revision)
    );
    let agent = agent(config);
    let response = get(config, &agent, &url, None)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(status_error(config, repo, status));
    }
    let raw: RawInfo = read_json(response, repo)?;
    let commit = raw
        .sha
        .filter(|s| s.len() <= 128 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| hub_error(format!("{repo}: the Hub did not say which commit this is")))?;
    let files = raw
        .siblings
        .into_iter()
        .map(|s| {
            check_file_name(&s.rfilename)?;
            let (size, sha256) = match s.lfs {
                Some(lfs) => (lfs.size.or(s.size), lfs.sha256),
                None => (s.size, None),
            };
            Ok(RepoFile {
                name: s.rfilename,
                size,
                sha256: sha256
                    .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let license = raw
        .card_data
        .as_ref()
        .and_then(|c| c.get("license"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    Ok(RepoInfo {
        id: raw.id.unwrap_or_else(|| repo.to_owned()),
        commit,
        files,
        gated: match raw.gated {
            Some(serde_json::Value::Bool(b)) => b,
            Some(serde_json::Value::String(s)) => !s.is_empty(),
            _ => false,
        },
        license,
    })
}

/// The first page of models matching `query` (at most `limit`), optionally with a Hub
/// `filter` tag (`gguf`, `diffusers`, `text-generation`, …); [`search_page`] follows `next`.
pub fn search(
    config: &HubConfig,
    query: &str,
    filter: Option<&str>,
    limit: usize,
) -> Result<SearchPage> {
    let mut url = format!(
        "{}/api/models?search={}&limit={}&sort=downloads&direction=-1",
        config.endpoint,
        query_value(query),
        limit.clamp(1, 100)
    );
    if let Some(f) = filter {
        url.push_str("&filter=");
        url.push_str(&query_value(f));
    }
    search_page(config, &url)
}

/// One page of search results at `url` (the first from [`search`], then each `next`). A
/// `next` on another host than the Hub's is dropped.
pub fn search_page(config: &HubConfig, url: &str) -> Result<SearchPage> {
    if host_of(url) != host_of(&config.endpoint) {
        return Err(hub_error(format!("{url} is not on {}", config.endpoint)));
    }
    let agent = agent(config);
    let response = get(config, &agent, url, None)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(status_error(config, "the search", status));
    }
    let next = response
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .and_then(next_link)
        .filter(|n| host_of(n) == host_of(&config.endpoint));
    let raw: Vec<RawHit> = read_json(response, "the search")?;
    let hits = raw
        .into_iter()
        .filter_map(|h| {
            let id = h.id.or(h.model_id)?;
            check_repo_id(&id).ok()?;
            Some(SearchHit {
                id,
                downloads: h.downloads,
                tags: h.tags,
            })
        })
        .collect();
    Ok(SearchPage { hits, next })
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

/// Percent-encodes a query value.
fn query_value(v: &str) -> String {
    url_path(v).replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_and_hosts_are_read() {
        assert_eq!(
            next_link("<https://h.co/api/models?cursor=abc>; rel=\"next\""),
            Some("https://h.co/api/models?cursor=abc".to_owned())
        );
        assert_eq!(next_link("<https://h.co/x>; rel=\"prev\""), None);
        assert_eq!(host_of("http://127.0.0.1:8080/api/x"), "127.0.0.1:8080");
        assert_eq!(host_of("https://huggingface.co"), "huggingface.co");
        assert_eq!(query_value("a b/c"), "a%20b%2Fc");
    }
}
