//! One file from the Hub into the cache: streamed into `blobs/<sha256>.incomplete`, resumed
//! with HTTP `Range` after a dropped connection (up to [`RETRIES`] times in a row) or a
//! restart, hashed as it arrives, verified against the Hub's SHA-256 and length, then moved to
//! `blobs/<sha256>` and linked from `snapshots/<commit>/<file>`. A wrong hash or length removes
//! the partial file and says so; a stop (pause, cancel, closing the window) keeps it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::api::{RepoFile, RepoInfo, agent, get, host_of, status_error};
use super::cache::{link, repo_dir, write_ref};
use super::{HubConfig, check_file_name, hub_error, url_path};
use crate::error::{Error, Result};

/// Dropped connections resumed in a row before giving up (the partial file stays).
pub const RETRIES: usize = 3;
/// Redirects followed (the Hub sends LFS files to a CDN).
const MAX_REDIRECTS: usize = 10;
/// Bytes read and written at a time.
const CHUNK: usize = 256 * 1024;
/// Largest file without a size that is fetched (small repository files: configs, tokenizers).
const MAX_UNSIZED: u64 = 64 * 1024 * 1024;

/// How a download is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The file's path in the repository.
    pub file: String,
    /// Bytes on disk so far (including a resumed partial file).
    pub done: u64,
    /// The file's size, when known.
    pub total: Option<u64>,
}

/// A file in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// `snapshots/<commit>/<file>`.
    pub path: PathBuf,
    /// Its SHA-256 (verified against the Hub's for LFS files; computed for the others).
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
    /// Where this download started (a resumed partial file's length), 0 for a fresh one.
    pub resumed_from: u64,
    /// It was already in the cache: nothing was fetched.
    pub already: bool,
}

/// Downloads `file` of repository `info` into the cache (see the module docs) and records
/// that `revision` points to `info.commit`. `progress` is called as bytes arrive; breaking
/// stops the download, keeping the partial file for a later resume (`Ok(None)`).
pub fn download_file(
    config: &HubConfig,
    info: &RepoInfo,
    revision: &str,
    file: &RepoFile,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> Result<Option<Downloaded>> {
    check_file_name(&file.name)?;
    if config.offline {
        return Err(hub_error(
            "HF_HUB_OFFLINE is set: Studio makes no request to the Hugging Face Hub",
        ));
    }
    let dir = repo_dir(&config.cache, &info.id);
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    write_ref(&dir, revision, &info.commit)?;
    let snapshot = dir.join("snapshots").join(&info.commit).join(&file.name);

    // Already there: a link to a complete blob of the right size (and, for LFS, the right name).
    if let Some(sha) = &file.sha256
        && let Ok(meta) = std::fs::metadata(blobs.join(sha.as_str()))
        && file.size.is_none_or(|s| s == meta.len())
    {
        let path = link(&dir, &info.commit, &file.name, sha)?;
        return Ok(Some(Downloaded {
            path,
            sha256: sha.clone(),
            bytes: meta.len(),
            resumed_from: meta.len(),
            already: true,
        }));
    }
    if file.sha256.is_none()
        && let Ok(meta) = std::fs::metadata(&snapshot)
        && file.size.is_none_or(|s| s == meta.len())
    {
        let sha256 = hash_file(&snapshot)?;
        return Ok(Some(Downloaded {
            path: snapshot,
            sha256,
            bytes: meta.len(),
            resumed_from: meta.len(),
            already: true,
        }));
    }

    // LFS files resume from `<sha256>.incomplete`; the small others are fetched whole.
    let partial = match &file.sha256 {
        Some(sha) => blobs.join(format!("{sha}.incomplete")),
        None => blobs.join(format!(
            "{}.incomplete",
            file.name.replace('/', "--").replace('.', "_")
        )),
    };
    let url = format!(
        "{}/{}/resolve/{}/{}",
        config.endpoint,
        info.id,
        info.commit,
        url_path(&file.name)
    );
    let agent = agent(config);
    let mut failures = 0;
    let mut resumed_from = None;
    loop {
        let have = if file.sha256.is_some() {
            std::fs::metadata(&partial).map_or(0, |m| m.len())
        } else {
            0
        };
        resumed_from.get_or_insert(have);
        match fetch(
            config, &agent, &url, &info.id, file, &partial, have, progress,
        ) {
            Ok(Fetched::Stopped) => return Ok(None),
            Ok(Fetched::Complete { etag }) => {
                let sha256 = verify(file, &partial)?;
                let blob = match (&file.sha256, etag) {
                    (Some(sha), _) => sha.clone(),
                    (None, Some(etag)) => etag,
                    (None, None) => sha256.clone(),
                };
                let final_blob = blobs.join(&blob);
                std::fs::rename(&partial, &final_blob).map_err(|e| Error::io(&final_blob, e))?;
                let bytes = std::fs::metadata(&final_blob).map_or(0, |m| m.len());
                let path = link(&dir, &info.commit, &file.name, &blob)?;
                return Ok(Some(Downloaded {
                    path,
                    sha256,
                    bytes,
                    resumed_from: resumed_from.unwrap_or(0),
                    already: false,
                }));
            }
            Err(Failure::Dropped(why)) if failures < RETRIES && file.sha256.is_some() => {
                failures += 1;
                log::warn!("{}: {why}; resuming ({failures}/{RETRIES})", file.name);
            }
            Err(Failure::Dropped(why)) => {
                let kept = if partial.exists() {
                    "; the partial download is kept and resumes next time"
                } else {
                    ""
                };
                return Err(hub_error(format!("{}: {why}{kept}", file.name)));
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
}

/// How one request ended.
enum Fetched {
    /// The body was read to its end; the first answer's `ETag` (a small file's blob name).
    Complete { etag: Option<String> },
    /// The caller stopped it.
    Stopped,
}

/// Why one request failed.
enum Failure {
    /// The connection dropped or ended early: resume.
    Dropped(String),
    /// Anything else.
    Fatal(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

/// One request for the file, appending to `partial` from byte `have`.
#[allow(clippy::too_many_arguments)]
fn fetch(
    config: &HubConfig,
    agent: &ureq::Agent,
    url: &str,
    repo: &str,
    file: &RepoFile,
    partial: &Path,
    have: u64,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> std::result::Result<Fetched, Failure> {
    if file.size.is_some_and(|s| have >= s) && have > 0 {
        // Complete on disk already (a stop right at the end): verify it.
        return Ok(Fetched::Complete { etag: None });
    }
    let range = (have > 0).then_some(have);
    let mut current = url.to_owned();
    let mut etag = None;
    let mut response = None;
    for hop in 0..=MAX_REDIRECTS {
        let r = get(config, agent, &current, range).map_err(|e| Failure::Dropped(e.to_string()))?;
        if hop == 0 {
            etag = header(&r, "x-linked-etag")
                .or_else(|| header(&r, "etag"))
                .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
                .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric()));
        }
        let status = r.status().as_u16();
        if (300..400).contains(&status) {
            let location = header(&r, "location")
                .ok_or_else(|| hub_error(format!("{url}: a redirect without a Location")))?;
            current = absolute(&current, &location);
            continue;
        }
        response = Some(r);
        break;
    }
    let response =
        response.ok_or_else(|| hub_error(format!("{url}: more than {MAX_REDIRECTS} redirects")))?;
    let status = response.status().as_u16();
    let resume = match status {
        200 => false,
        206 => {
            let start = header(&response, "content-range")
                .and_then(|c| c.strip_prefix("bytes ").map(str::to_owned))
                .and_then(|c| c.split('-').next().and_then(|s| s.parse::<u64>().ok()));
            if start != Some(have) {
                return Err(Failure::Fatal(hub_error(format!(
                    "{}: the server resumed at the wrong place ({start:?} for {have})",
                    file.name
                ))));
            }
            true
        }
        416 => return Ok(Fetched::Complete { etag }),
        s => return Err(Failure::Fatal(status_error(config, repo, s))),
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(!resume)
        .open(partial)
        .map_err(|e| Error::io(partial, e))?;
    let mut done = if resume {
        out.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(partial, e))?
    } else {
        0
    };
    let limit = file.size.unwrap_or(MAX_UNSIZED);
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; CHUNK];
    let mut report = Progress {
        file: file.name.clone(),
        done,
        total: file.size,
    };
    if progress(&report).is_break() {
        return Ok(Fetched::Stopped);
    }
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                out.flush().map_err(|e| Error::io(partial, e))?;
                return Err(Failure::Dropped(format!(
                    "the connection to {} dropped after {done} bytes ({e})",
                    host_of(url)
                )));
            }
        };
        done += n as u64;
        if done > limit {
            drop(out);
            let _ = std::fs::remove_file(partial);
            return Err(Failure::Fatal(hub_error(format!(
                "{}: the server sent more than the {limit} bytes the Hub lists; the partial \
                 file was removed",
                file.name
            ))));
        }
        out.write_all(&buf[..n]).map_err(|e| {
            Failure::Fatal(hub_error(format!(
                "{}: could not write {} ({e}); the partial download is kept",
                file.name,
                partial.display()
            )))
        })?;
        report.done = done;
        if progress(&report).is_break() {
            out.flush().map_err(|e| Error::io(partial, e))?;
            return Ok(Fetched::Stopped);
        }
    }
    out.flush().map_err(|e| Error::io(partial, e))?;
    if file.size.is_some_and(|s| done < s) {
        return Err(Failure::Dropped(format!(
            "the connection to {} ended after {done} of {} bytes",
            host_of(url),
            file.size.unwrap_or(0)
        )));
    }
    Ok(Fetched::Complete { etag })
}

/// Checks the finished `partial` against the Hub's length and SHA-256; a mismatch removes it.
/// Returns its SHA-256.
fn verify(file: &RepoFile, partial: &Path) -> Result<String> {
    let len = std::fs::metadata(partial)
        .map_err(|e| Error::io(partial, e))?
        .len();
    let refuse = |why: String| {
        let _ = std::fs::remove_file(partial);
        Err(hub_error(format!(
            "{}: {why}; the partial file was removed, download it again",
            file.name
        )))
    };
    if let Some(size) = file.size
        && size != len
    {
        return refuse(format!("{len} bytes arrived, the Hub lists {size}"));
    }
    let sha256 = hash_file(partial)?;
    if let Some(want) = &file.sha256
        && !want.eq_ignore_ascii_case(&sha256)
    {
        return refuse(format!(
            "its SHA-256 is {sha256}, the Hub's is {want}: the file is not the one published"
        ));
    }
    Ok(sha256)
}

/// The SHA-256 of a file, in lower-case hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex digits of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

fn header(r: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A `Location` made absolute against the URL that answered with it.
fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    if location.starts_with('/') {
        format!("{}{location}", &base[..host_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_made_absolute() {
        assert_eq!(absolute("http://h:1/a/b/c", "/x/y"), "http://h:1/x/y");
        assert_eq!(absolute("http://h:1/a/b/c", "d"), "http://h:1/a/b/d");
        assert_eq!(absolute("http://h:1/a", "https://cdn/x"), "https://cdn/x");
    }
}
