//! A loopback Hugging Face Hub for tests: the endpoints Studio's client uses, on `127.0.0.1`,
//! with a few bytes of fake model files. Nothing reaches the internet.
//!
//! - `GET /api/models/ORG/NAME/revision/REV?blobs=true`: the repository's files with sizes and
//!   LFS SHA-256s, `gated`, the license (404 for an unknown repository or revision, 401 for a
//!   gated one without the token); a repository has one commit, which `main` points to;
//! - `GET /ORG/NAME/resolve/REV/FILE`: LFS files redirect (302, with `X-Repo-Commit`,
//!   `X-Linked-Etag`, `X-Linked-Size`) to a second listener, the "CDN", on another port;
//!   small files are served directly with an `ETag`;
//! - the CDN serves bytes with `Range` (206 and `Content-Range`), and the faults a test asks
//!   for: a connection cut after some bytes (once), wrong bytes, extra bytes;
//! - `GET /api/models?search=Q&limit=N[&cursor=K]`: results, paged with `Link: <…>; rel="next"`.
//!
//! Every request is recorded (method line, `Range`, whether a token came) for the tests to
//! check.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// What goes wrong when the CDN serves a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The first request for the file is cut after this many bytes.
    CutOnceAfter(usize),
    /// Every byte is flipped (the hash will not match).
    WrongBytes,
    /// Extra bytes after the file.
    ExtraBytes,
}

/// One file of a fake repository.
#[derive(Debug, Clone)]
pub struct FakeFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Stored with LFS (weights): has a SHA-256, served through the CDN.
    pub lfs: bool,
    pub fault: Fault,
}

impl FakeFile {
    /// A weights file (LFS) with these bytes.
    pub fn lfs(name: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            bytes,
            lfs: true,
            fault: Fault::None,
        }
    }

    /// A small file (config, tokenizer) served directly.
    pub fn small(name: &str, text: &str) -> Self {
        Self {
            name: name.to_owned(),
            bytes: text.as_bytes().to_vec(),
            lfs: false,
            fault: Fault::None,
        }
    }

    /// The SHA-256 of its bytes, in hex.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }
}

/// A fake repository.
#[derive(Debug, Clone)]
pub struct FakeRepo {
    pub id: String,
    pub commit: String,
    pub files: Vec<FakeFile>,
    pub gated: bool,
    pub license: Option<String>,
    /// Extra names listed in the file list but never served (`../escape`, say).
    pub listed_only: Vec<String>,
}

impl FakeRepo {
    pub fn new(id: &str, files: Vec<FakeFile>) -> Self {
        Self {
            id: id.to_owned(),
            commit: hex(&Sha256::digest(id.as_bytes()))[..40].to_owned(),
            files,
            gated: false,
            license: Some("apache-2.0".to_owned()),
            listed_only: Vec::new(),
        }
    }

    /// Whether `rev` names this repository's one commit: `main` or the commit itself (any
    /// other branch, tag or commit is unknown, as on the Hub).
    pub fn has_revision(&self, rev: &str) -> bool {
        rev == "main" || rev == self.commit
    }
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET /path?query`.
    pub line: String,
    /// The `Range` header.
    pub range: Option<String>,
    /// Whether an `Authorization` header came.
    pub token: bool,
    /// Which listener: the hub or the CDN.
    pub cdn: bool,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, FakeRepo>,
    /// Search results' ids.
    catalog: Vec<String>,
    /// The token a gated repository wants.
    token: Option<String>,
    seen: Vec<Seen>,
    /// Files whose one cut has happened.
    cut_done: Vec<String>,
    /// The CDN's speed limit, bytes per second.
    rate: Option<usize>,
}

/// The running server; it stops when dropped (its threads end with the test process).
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeHub {
    /// Starts the hub and its CDN on free loopback ports.
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let state = Arc::new(Mutex::new(State {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ..State::default()
        }));
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        let cdn = TcpListener::bind("127.0.0.1:0").expect("bind cdn");
        let url = format!("http://{}", hub.local_addr().expect("addr"));
        let cdn_url = format!("http://{}", cdn.local_addr().expect("addr"));
        for (listener, is_cdn) in [(hub, false), (cdn, true)] {
            let state = Arc::clone(&state);
            let cdn_url = cdn_url.clone();
            std::thread::Builder::new()
                .name("fake-hub".to_owned())
                .spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let state = Arc::clone(&state);
                        let cdn_url = cdn_url.clone();
                        let _ = std::thread::Builder::new()
                            .name("fake-hub-conn".to_owned())
                            .spawn(move || serve(stream, &state, is_cdn, &cdn_url));
                    }
                })
                .expect("spawn fake hub");
        }
        Self { url, state }
    }

    /// Makes gated repositories want this token.
    pub fn set_token(&self, token: &str) {
        lock(&self.state).token = Some(token.to_owned());
    }

    /// Limits the CDN to `bytes_per_second` (to watch a download's progress).
    pub fn set_rate(&self, bytes_per_second: usize) {
        lock(&self.state).rate = Some(bytes_per_second.max(1));
    }

    /// Search results: these ids.
    pub fn set_catalog(&self, ids: Vec<String>) {
        lock(&self.state).catalog = ids;
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    use std::fmt::Write as _;
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(stream: TcpStream, state: &Mutex<State>, cdn: bool, cdn_url: &str) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let line = line.trim().to_owned();
    let target = line.split(' ').nth(1).unwrap_or("/").to_owned();
    let token = headers.get("authorization").cloned();
    lock(state).seen.push(Seen {
        line: line.clone(),
        range: headers.get("range").cloned(),
        token: token.is_some(),
        cdn,
    });
    let mut stream = stream;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if cdn {
        serve_cdn(&mut stream, state, path, headers.get("range"));
    } else if let Some(rest) = path.strip_prefix("/api/models/") {
        serve_info(&mut stream, state, rest, token.as_deref());
    } else if path == "/api/models" {
        serve_search(&mut stream, state, query);
    } else {
        serve_resolve(&mut stream, state, path, token.as_deref(), cdn_url);
    }
    let _ = reader.read(&mut [0u8; 0]);
}

fn authorized(state: &State, repo: &FakeRepo, token: Option<&str>) -> bool {
    !repo.gated
        || state
            .token
            .as_ref()
            .is_some_and(|t| token == Some(format!("Bearer {t}").as_str()))
}

fn serve_info(stream: &mut TcpStream, state: &Mutex<State>, rest: &str, token: Option<&str>) {
    let Some((repo_id, rev)) = rest.split_once("/revision/") else {
        return respond(stream, "404 Not Found", &[], b"{}");
    };
    let rev = rev.split('?').next().unwrap_or(rev);
    let st = lock(state);
    let Some(repo) = st.repos.get(repo_id).filter(|r| r.has_revision(rev)) else {
        return respond(
            stream,
            "404 Not Found",
            &[],
            b"{\"error\":\"Repository not found\"}",
        );
    };
    if !authorized(&st, repo, token) {
        return respond(stream, "401 Unauthorized", &[], b"{\"error\":\"gated\"}");
    }
    let mut siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|f| {
            let mut s = serde_json::json!({"rfilename": f.name, "size": f.bytes.len()});
            if f.lfs {
                s["lfs"] = serde_json::json!({
                    "sha256": f.sha256(), "size": f.bytes.len(), "pointerSize": 134
                });
            }
            s
        })
        .collect();
    for name in &repo.listed_only {
        siblings.push(serde_json::json!({"rfilename": name, "size": 1}));
    }
    let body = serde_json::json!({
        "id": repo.id,
        "sha": repo.commit,
        "siblings": siblings,
        "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
        "cardData": {"license": repo.license},
    });
    respond(
        stream,
        "200 OK",
        &[("Content-Type".into(), "application/json".into())],
        body.to_string().as_bytes(),
    );
}

fn serve_resolve(
    stream: &mut TcpStream,
    state: &Mutex<State>,
    path: &str,
    token: Option<&str>,
    cdn_url: &str,
) {
    let Some((repo_id, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return respond(stream, "404 Not Found", &[], b"");
    };
    let Some((rev, file)) = rest.split_once('/') else {
        return respond(stream, "404 Not Found", &[], b"");
    };
    let file = file.replace("%20", " ");
    let st = lock(state);
    let Some(repo) = st.repos.get(repo_id).filter(|r| r.has_revision(rev)) else {
        return respond(stream, "404 Not Found", &[], b"");
    };
    if !authorized(&st, repo, token) {
        return respond(stream, "401 Unauthorized", &[], b"");
    }
    let Some(f) = repo.files.iter().find(|f| f.name == file) else {
        return respond(stream, "404 Not Found", &[], b"");
    };
    let commit = ("X-Repo-Commit".to_owned(), repo.commit.clone());
    if f.lfs {
        let sha = f.sha256();
        respond(
            stream,
            "302 Found",
            &[
                ("Location".into(), format!("{cdn_url}/cdn/{sha}")),
                ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                ("X-Linked-Size".into(), f.bytes.len().to_string()),
                commit,
            ],
            b"",
        );
    } else {
        let etag = hex(&Sha256::digest(&f.bytes))[..40].to_owned();
        respond(
            stream,
            "200 OK",
            &[("ETag".into(), format!("\"{etag}\"")), commit],
            &f.bytes,
        );
    }
}

fn serve_cdn(stream: &mut TcpStream, state: &Mutex<State>, path: &str, range: Option<&String>) {
    let sha = path.trim_start_matches("/cdn/");
    let mut st = lock(state);
    let Some(file) = st
        .repos
        .values()
        .flat_map(|r| r.files.iter())
        .find(|f| f.lfs && f.sha256() == sha)
        .cloned()
    else {
        return respond(stream, "404 Not Found", &[], b"");
    };
    let mut bytes = file.bytes.clone();
    match file.fault {
        Fault::WrongBytes => bytes.iter_mut().for_each(|b| *b = !*b),
        Fault::ExtraBytes => bytes.extend_from_slice(b"extra bytes the Hub never listed"),
        Fault::None | Fault::CutOnceAfter(_) => {}
    }
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    let cut = match file.fault {
        Fault::CutOnceAfter(n) if !st.cut_done.contains(&file.name) => {
            st.cut_done.push(file.name.clone());
            Some(n)
        }
        _ => None,
    };
    let rate = st.rate;
    drop(st);
    if start > bytes.len() {
        return respond(stream, "416 Range Not Satisfiable", &[], b"");
    }
    let body = &bytes[start..];
    let total = bytes.len();
    let mut headers = vec![("Content-Length".to_owned(), body.len().to_string())];
    let status = if start > 0 {
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{total}", total - 1),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    match cut {
        Some(n) => {
            // Promise the whole body, send part of it, hang up.
            respond(stream, status, &headers, &body[..n.min(body.len())]);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        None => match rate {
            Some(rate) => {
                respond(stream, status, &headers, &[]);
                for chunk in body.chunks(64 * 1024) {
                    if stream.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_secs_f64(
                        chunk.len() as f64 / rate as f64,
                    ));
                }
            }
            None => respond(stream, status, &headers, body),
        },
    }
}

fn serve_search(stream: &mut TcpStream, state: &Mutex<State>, query: &str) {
    let params: HashMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(20);
    let cursor: usize = params
        .get("cursor")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let search = params
        .get("search")
        .copied()
        .unwrap_or("")
        .to_ascii_lowercase();
    let st = lock(state);
    let matching: Vec<&String> = st
        .catalog
        .iter()
        .filter(|id| id.to_ascii_lowercase().contains(&search))
        .collect();
    let page: Vec<serde_json::Value> = matching
        .iter()
        .skip(cursor)
        .take(limit)
        .map(|id| serde_json::json!({"id": id, "downloads": 7, "tags": ["gguf"]}))
        .collect();
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    if cursor + limit < matching.len() {
        let host = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        headers.push((
            "Link".into(),
            format!(
                "<http://{host}/api/models?search={search}&limit={limit}&cursor={}>; rel=\"next\"",
                cursor + limit
            ),
        ));
    }
    respond(
        stream,
        "200 OK",
        &headers,
        serde_json::Value::Array(page).to_string().as_bytes(),
    );
}
