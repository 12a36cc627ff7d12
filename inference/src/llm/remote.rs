//! A chat backend on any OpenAI-compatible server (vLLM, Ollama, llama.cpp's server, Studio's
//! own `studio serve`, …), used exactly like a local model by the worker.
//!
//! - [`RemoteBackend::connect`] checks that the server answers `GET {base}/models` and picks the
//!   model (the configured one, else the first listed).
//! - [`RemoteBackend::chat`] streams `POST {base}/chat/completions` and
//!   [`RemoteBackend::complete`] streams `POST {base}/completions`, both with server-sent
//!   events; each content delta is handed to the caller as it arrives.
//!
//! Requests run on a short-lived named helper thread (`studio-remote`) that owns the
//! connection and forwards what it reads over a bounded channel, so the caller can stop
//! waiting the moment it is cancelled, even while the server is silent (a long prefill). The
//! helper then drops the connection at the next chunk it reads, or when the server has been
//! silent for the configured timeout, whichever comes first.
//!
//! Every failure is an [`Error::Io`] whose message says which address failed and why, in
//! words: "could not reach http://127.0.0.1:9/v1/models: connection refused", "…: the server
//! answered HTTP 401 Unauthorized: Invalid API key", "…: no answer within 5 s", "…: the
//! server sent an event that is not JSON: …".

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::llm::chat::{ChatMessage, Role};
use crate::llm::generate::{FinishReason, GenerationStats};
use crate::llm::grammar::StructuredOutput;
use crate::llm::loader::{Architecture, ModelInfo};
use crate::llm::sampling::SamplingParams;

/// Context length reported for a server that does not say its own.
pub const DEFAULT_CONTEXT_LENGTH: usize = 8192;

/// What [`ModelInfo::chat_format`] says for a remote model.
pub const REMOTE_CHAT_FORMAT: &str = "server's chat template";

/// How often a waiting caller looks at its cancel flag.
const POLL: Duration = Duration::from_millis(10);

/// Most of an error body that is kept for the message.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// Where the server is and how to talk to it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfig {
    /// `http://host:port` or `http://host:port/v1` (or any API root ending in `/v1`, such as
    /// `https://example.com/api/v1`). A bare host gets `/v1` appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// The model to use; `None` = the first one the server lists.
    pub model: Option<String>,
    /// Connecting, and the longest the server may stay silent during a request (also before
    /// the first token, so it must cover the server's prompt processing).
    pub timeout: Duration,
}

impl RemoteConfig {
    /// The timeout [`RemoteConfig::new`] uses.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(1);

    /// A server at `base_url`, no API key, its first model, the default timeout.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: None,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("RemoteConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .field("model", &self.model)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A connected OpenAI-compatible server and the model chosen on it.
#[derive(Clone)]
pub struct RemoteBackend {
    agent: ureq::Agent,
    /// The API root without a trailing slash, e.g. `http://127.0.0.1:8080/v1`.
    root: String,
    api_key: Option<String>,
    /// Whether to send the sampling fields OpenAI's own API refuses (top_k, min_p, …).
    extensions: bool,
    model: String,
    available: Vec<String>,
    info: ModelInfo,
}

impl fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("root", &self.root)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The parts of a base URL that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiRoot {
    /// Normalized root, e.g. `http://127.0.0.1:8080/v1`.
    url: String,
    host: String,
}

fn parse_base_url(base_url: &str) -> Result<ApiRoot> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let bad = |why: &str| {
        remote_error(
            format!("server address `{}`", base_url.trim()),
            std::io::ErrorKind::InvalidInput,
            why,
        )
    };
    let lower = trimmed.to_ascii_lowercase();
    let rest_at = if lower.starts_with("http://") {
        7
    } else if lower.starts_with("https://") {
        8
    } else {
        return Err(bad(
            "it must start with http:// or https:// (for example http://127.0.0.1:8080/v1)",
        ));
    };
    let rest = &trimmed[rest_at..];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        host_port.split(':').next().unwrap_or(host_port)
    };
    if host.is_empty() {
        return Err(bad("it has no host name"));
    }
    let url = if path.is_empty() {
        format!("{trimmed}/v1")
    } else {
        trimmed.to_owned()
    };
    Ok(ApiRoot {
        url,
        host: host.to_ascii_lowercase(),
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A remote failure, worded as "`context`: `detail`".
fn remote_error(
    context: impl Into<String>,
    kind: std::io::ErrorKind,
    detail: impl Into<String>,
) -> Error {
    Error::Io {
        path: PathBuf::from(context.into()),
        source: std::io::Error::new(kind, detail.into()),
    }
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 && s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Words for a failed exchange with `url`.
fn transport_error(url: &str, e: ureq::Error, timeout: Duration) -> Error {
    use std::io::ErrorKind as K;
    let unreachable = |kind, why: &str| remote_error(format!("could not reach {url}"), kind, why);
    match e {
        ureq::Error::Io(io) => match io.kind() {
            K::ConnectionRefused => unreachable(K::ConnectionRefused, "connection refused"),
            K::TimedOut | K::WouldBlock => remote_error(
                url,
                K::TimedOut,
                format!("no answer within {}", seconds(timeout)),
            ),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => remote_error(
                url,
                io.kind(),
                "the server closed the connection unexpectedly",
            ),
            K::UnexpectedEof => remote_error(
                url,
                K::UnexpectedEof,
                "the server closed the connection before it finished answering",
            ),
            kind => unreachable(kind, &io.to_string()),
        },
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => unreachable(
            K::TimedOut,
            &format!("no answer within {}", seconds(timeout)),
        ),
        ureq::Error::Timeout(_) => remote_error(
            url,
            K::TimedOut,
            format!("no answer within {}", seconds(timeout)),
        ),
        ureq::Error::HostNotFound => unreachable(K::NotFound, "host not found"),
        ureq::Error::ConnectionFailed => unreachable(K::Other, "connection failed"),
        ureq::Error::Tls(why) => unreachable(K::Other, &format!("TLS error: {why}")),
        ureq::Error::Rustls(why) => unreachable(K::Other, &format!("TLS error: {why}")),
        ureq::Error::BadUri(why) => remote_error(url, K::InvalidInput, why),
        ureq::Error::Protocol(why) => remote_error(
            url,
            K::InvalidData,
            format!("the answer is not valid HTTP ({why})"),
        ),
        other => remote_error(url, K::Other, other.to_string()),
    }
}

/// The message inside an error body: `{"error": {"message": …}}` (OpenAI, vLLM, llama.cpp),
/// `{"error": "…"}` (Ollama), `{"message": …}` or `{"detail": …}`, else the text itself.
fn server_message(body: &str) -> String {
    let text = body.trim();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let found = [
            v.pointer("/error/message"),
            v.get("error"),
            v.get("message"),
            v.get("detail"),
        ]
        .into_iter()
        .flatten()
        .find_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Null | Value::Object(_) => None,
            other => Some(other.to_string()),
        });
        if let Some(m) = found {
            return m;
        }
    }
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

fn status_error(url: &str, status: u16, body: &str) -> Error {
    let reason = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let message = server_message(body);
    let mut detail = format!("the server answered HTTP {status} {reason}")
        .trim_end()
        .to_owned();
    if !message.is_empty() {
        detail.push_str(": ");
        detail.push_str(&message);
    }
    let kind = match status {
        401 | 403 => {
            detail.push_str(" (check the API key)");
            std::io::ErrorKind::PermissionDenied
        }
        404 => std::io::ErrorKind::NotFound,
        _ => std::io::ErrorKind::Other,
    };
    remote_error(url, kind, detail)
}

fn malformed(url: &str, detail: impl Into<String>) -> Error {
    remote_error(url, std::io::ErrorKind::InvalidData, detail)
}

/// Runs `f` on a named helper thread, waiting for its result while watching `cancel`.
/// `None` when cancelled (the helper finishes on its own, bounded by the agent's timeouts).
fn in_background<T: Send + 'static>(
    cancel: &AtomicBool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>> {
    let (tx, rx) = bounded(1);
    std::thread::Builder::new()
        .name("studio-remote".to_owned())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Error::io("studio-remote thread", e))?;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match rx.recv_timeout(POLL) {
            Ok(v) => return Ok(Some(v)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Panicked("the remote request thread stopped".into()));
            }
        }
    }
}

/// Which OpenAI endpoint a stream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

/// What the helper thread forwards while streaming.
enum Item {
    /// The `data` of one server-sent event.
    Event(String),
    /// A whole non-streaming JSON answer (a server that ignored `"stream": true`).
    Whole(String),
    /// The body ended.
    End,
    Failed(Error),
}

/// Collects server-sent-event lines into events (the `data` fields joined by newlines).
#[derive(Debug, Default)]
struct SseParser {
    data: Vec<String>,
}

impl SseParser {
    /// Feeds one line (without its line ending); returns the event a blank line completes.
    fn line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.flush();
        }
        if line.starts_with(':') {
            return None; // a comment (keep-alive)
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            self.data
                .push(value.strip_prefix(' ').unwrap_or(value).to_owned());
        }
        // `event`, `id`, `retry` and unknown fields carry nothing needed here.
        None
    }

    /// The pending event at the end of the body.
    fn flush(&mut self) -> Option<String> {
        if self.data.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.data).join("\n"))
        }
    }
}

/// One parsed event of a stream.
#[derive(Debug, Default, PartialEq)]
struct Chunk {
    text: Option<String>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

fn parse_usage(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
    Some(Usage {
        prompt_tokens: n("prompt_tokens")?,
        completion_tokens: n("completion_tokens")?,
    })
}

/// Parses one event's `data` (`[DONE]`, a chunk, or an error the server sent mid-stream).
fn parse_event(endpoint: Endpoint, url: &str, data: &str) -> Result<Chunk> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Chunk {
            done: true,
            ..Chunk::default()
        });
    }
    let v: Value = serde_json::from_str(data).map_err(|_| {
        let mut short: String = data.chars().take(120).collect();
        if short.len() < data.len() {
            short.push('…');
        }
        malformed(
            url,
            format!("the server sent an event that is not JSON: {short:?}"),
        )
    })?;
    parse_answer(endpoint, url, &v, false)
}

/// Reads a streamed chunk (`whole == false`) or a complete non-streaming answer.
fn parse_answer(endpoint: Endpoint, url: &str, v: &Value, whole: bool) -> Result<Chunk> {
    if v.get("error").is_some_and(|e| !e.is_null()) {
        return Err(remote_error(
            url,
            std::io::ErrorKind::Other,
            format!(
                "the server reported an error: {}",
                server_message(&v.to_string())
            ),
        ));
    }
    if !v.is_object() {
        return Err(malformed(
            url,
            format!("the server sent {v} where a completion chunk was expected"),
        ));
    }
    let choice = v.get("choices").and_then(|c| c.get(0));
    let text = choice.and_then(|c| {
        let field = match (endpoint, whole) {
            (Endpoint::Chat, false) => c.pointer("/delta/content"),
            (Endpoint::Chat, true) => c.pointer("/message/content"),
            (Endpoint::Completions, _) => c.get("text"),
        };
        field.and_then(Value::as_str).map(str::to_owned)
    });
    let finish_reason = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Chunk {
        text,
        finish_reason,
        usage: parse_usage(v),
        done: whole,
    })
}

fn finish_from(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        _ => FinishReason::EndOfText,
    }
}

impl RemoteBackend {
    /// Connects: checks that the server answers `GET /models` within the timeout and picks
    /// the model. `Ok(None)` when `cancel` was set first.
    pub fn connect(config: &RemoteConfig, cancel: &AtomicBool) -> Result<Option<Self>> {
        let root = parse_base_url(&config.base_url)?;
        let timeout = config.timeout.max(Duration::from_millis(1));
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("studio/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(Some(timeout))
            .timeout_connect(Some(timeout))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout));
        if is_loopback(&root.host) {
            // A proxy from the environment must never see a request meant for this machine.
            builder = builder.proxy(None);
        }
        let agent: ureq::Agent = builder.build().into();
        let url = format!("{}/models", root.url);
        let api_key = config.api_key.clone().filter(|k| !k.trim().is_empty());
        let request = {
            let (agent, url, key) = (agent.clone(), url.clone(), api_key.clone());
            move || get_json(&agent, &url, key.as_deref(), timeout)
        };
        let Some(models) = in_background(cancel, request)? else {
            return Ok(None);
        };
        let models = models?;
        let listed: Vec<&Value> = models
            .get("data")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let available: Vec<String> = listed
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect();
        if models.get("data").and_then(Value::as_array).is_none() {
            return Err(malformed(
                &url,
                "the answer has no `data` list of models (is this an OpenAI-compatible server?)",
            ));
        }
        let model = match config.model.as_deref().map(str::trim) {
            Some(wanted) if !wanted.is_empty() => {
                if !available.is_empty() && !available.iter().any(|m| m == wanted) {
                    return Err(remote_error(
                        &url,
                        std::io::ErrorKind::NotFound,
                        format!(
                            "the server has no model `{wanted}`; it offers: {}",
                            available.join(", ")
                        ),
                    ));
                }
                wanted.to_owned()
            }
            _ => available.first().cloned().ok_or_else(|| {
                remote_error(
                    &url,
                    std::io::ErrorKind::NotFound,
                    "the server lists no models",
                )
            })?,
        };
        let entry = listed
            .iter()
            .find(|m| m.get("id").and_then(Value::as_str) == Some(model.as_str()));
        let context_length = entry
            .and_then(|m| context_length_of(m))
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);
        let info = ModelInfo {
            name: model.clone(),
            path: PathBuf::from(&root.url),
            architecture: Architecture::Remote,
            context_length,
            vocab_size: 0,
            parameters: 0,
            dtype: "set by the server".to_owned(),
            chat_format: REMOTE_CHAT_FORMAT.to_owned(),
            notes: Vec::new(),
        };
        Ok(Some(Self {
            agent,
            extensions: !root.host.ends_with("openai.com"),
            root: root.url,
            api_key,
            model,
            available,
            info,
        }))
    }

    /// What the UI shows: the server's model id, the API root as the path, its context length.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model in use.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Every model the server listed.
    pub fn available_models(&self) -> &[String] {
        &self.available
    }

    /// The API root, e.g. `http://127.0.0.1:8080/v1`.
    pub fn api_root(&self) -> &str {
        &self.root
    }

    /// Streams the server's reply to a conversation (its own chat template applies). Each
    /// content delta goes to `on_text` as it arrives; `cancel` is honoured between chunks and
    /// while waiting, ending with [`FinishReason::Cancelled`].
    pub fn chat(
        &self,
        system: &str,
        messages: &[ChatMessage],
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationStats> {
        params.validate()?;
        if messages.iter().all(|m| m.content.trim().is_empty()) {
            return Err(Error::EmptyPrompt);
        }
        let mut list = Vec::with_capacity(messages.len() + 1);
        if !system.trim().is_empty() {
            list.push(json!({"role": "system", "content": system.trim()}));
        }
        list.extend(messages.iter().map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            let mut msg = json!({"role": role, "content": m.content});
            if !m.tool_calls.is_empty() {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
                msg["tool_calls"] = Value::Array(calls);
            }
            if let Some(id) = &m.tool_call_id {
                msg["tool_call_id"] = json!(id);
            }
            msg
        }));
        let mut body = self.request_body(params);
        body.insert("messages".into(), Value::Array(list));
        self.stream(Endpoint::Chat, body, cancel, on_text)
    }

    /// Streams a raw continuation of `prompt` from `POST /completions` (no chat template).
    pub fn complete(
        &self,
        prompt: &str,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationStats> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let mut body = self.request_body(params);
        body.insert("prompt".into(), Value::String(prompt.to_owned()));
        self.stream(Endpoint::Completions, body, cancel, on_text)
    }

    /// The request fields every generation sends: the model, streaming, and sampling. Studio's
    /// extra sampling settings go only where they do something (llama.cpp's and vLLM's names),
    /// and never to OpenAI's own API, which refuses unknown fields.
    fn request_body(&self, p: &SamplingParams) -> serde_json::Map<String, Value> {
        let mut b = serde_json::Map::new();
        b.insert("model".into(), json!(self.model));
        b.insert("stream".into(), json!(true));
        b.insert("stream_options".into(), json!({"include_usage": true}));
        b.insert("max_tokens".into(), json!(p.max_new_tokens));
        b.insert("temperature".into(), json!(p.temperature));
        b.insert("top_p".into(), json!(p.top_p));
        // Servers read the seed as a 32-bit (llama.cpp) or 64-bit signed integer.
        b.insert("seed".into(), json!(p.seed & 0xFFFF_FFFF));
        if !p.stop.is_empty() {
            b.insert("stop".into(), json!(p.stop));
        }
        if let Some(tools) = &p.tools {
            b.insert("tools".into(), tools.clone());
        }
        // Structured output as OpenAI takes it (a GBNF grammar where the server reads them).
        match &p.structured {
            StructuredOutput::Off => {}
            StructuredOutput::JsonObject => {
                b.insert("response_format".into(), json!({"type": "json_object"}));
            }
            StructuredOutput::JsonSchema { schema } => {
                let schema: Value = serde_json::from_str(schema).unwrap_or(Value::Bool(true));
                b.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}),
                );
            }
            StructuredOutput::Gbnf { grammar } => {
                b.insert("grammar".into(), json!(grammar));
            }
        }
        if self.extensions {
            if p.top_k > 0 {
                b.insert("top_k".into(), json!(p.top_k));
            }
            if p.min_p > 0.0 {
                b.insert("min_p".into(), json!(p.min_p));
            }
            if (p.repeat_penalty - 1.0).abs() > f32::EPSILON {
                b.insert("repeat_penalty".into(), json!(p.repeat_penalty));
                b.insert("repetition_penalty".into(), json!(p.repeat_penalty));
                b.insert("repeat_last_n".into(), json!(p.repeat_last_n));
            }
        }
        b
    }

    fn stream(
        &self,
        endpoint: Endpoint,
        body: serde_json::Map<String, Value>,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationStats> {
        let path = match endpoint {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
        };
        let url = format!("{}/{path}", self.root);
        let start = Instant::now();
        let rx = self.spawn_stream(url.clone(), Value::Object(body))?;
        let mut first: Option<Instant> = None;
        let mut last = start;
        let mut deltas = 0usize;
        let mut usage: Option<Usage> = None;
        let mut finish_reason: Option<String> = None;
        let mut ended = false;
        let mut cancelled = false;
        let mut handle = |chunk: Chunk, deltas: &mut usize| {
            if let Some(text) = chunk.text.filter(|t| !t.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                *deltas += 1;
                on_text(&text);
            }
            if chunk.finish_reason.is_some() {
                finish_reason = chunk.finish_reason;
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            chunk.done
        };
        loop {
            if cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break;
            }
            match rx.recv_timeout(POLL) {
                Ok(Item::Event(data)) => {
                    if handle(parse_event(endpoint, &url, &data)?, &mut deltas) {
                        ended = true;
                        break;
                    }
                }
                Ok(Item::Whole(text)) => {
                    let v: Value = serde_json::from_str(&text).map_err(|e| {
                        malformed(&url, format!("the answer is not valid JSON: {e}"))
                    })?;
                    handle(parse_answer(endpoint, &url, &v, true)?, &mut deltas);
                    ended = true;
                    break;
                }
                Ok(Item::End) => break,
                Ok(Item::Failed(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Panicked("the remote stream thread stopped".into()));
                }
            }
        }
        // Dropping the receiver tells the helper to drop the connection.
        drop(rx);
        if !cancelled && !ended && finish_reason.is_none() {
            return Err(remote_error(
                &url,
                std::io::ErrorKind::UnexpectedEof,
                "the server ended the stream before the reply was finished",
            ));
        }
        let generated = usage.map_or(deltas, |u| u.completion_tokens.max(deltas));
        let prompt_tokens = usage.map_or(0, |u| u.prompt_tokens);
        let ttft = first.map_or(0.0, |t| (t - start).as_secs_f64());
        let decode_secs = first.map_or(0.0, |t| (last - t).as_secs_f64());
        let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Ok(GenerationStats {
            prompt_tokens,
            reused_tokens: 0,
            generated_tokens: generated,
            ttft_ms: ttft * 1e3,
            prefill_tok_s: rate(prompt_tokens, ttft),
            decode_tok_s: rate(generated.saturating_sub(1), decode_secs),
            finish: if cancelled {
                FinishReason::Cancelled
            } else {
                finish_from(finish_reason.as_deref())
            },
        })
    }

    /// Starts the helper thread that sends the request and forwards the events it reads.
    fn spawn_stream(&self, url: String, body: Value) -> Result<Receiver<Item>> {
        let (tx, rx) = bounded::<Item>(64);
        let agent = self.agent.clone();
        let key = self.api_key.clone();
        let timeout = agent.config().timeout_per_read().unwrap_or_default();
        std::thread::Builder::new()
            .name("studio-remote".to_owned())
            .spawn(move || {
                let result = read_stream(&agent, &url, key.as_deref(), &body, timeout, &mut |i| {
                    tx.send(i).is_ok()
                });
                let last = match result {
                    Ok(()) => Item::End,
                    Err(e) => Item::Failed(e),
                };
                let _ = tx.send(last);
            })
            .map_err(|e| Error::io("studio-remote thread", e))?;
        Ok(rx)
    }
}

/// `max_model_len` (vLLM), `context_length` / `context_window`, or `meta.n_ctx_train`
/// (llama.cpp) of one `/models` entry.
fn context_length_of(model: &Value) -> Option<usize> {
    [
        "/max_model_len",
        "/context_length",
        "/context_window",
        "/meta/n_ctx",
        "/meta/n_ctx_train",
    ]
    .iter()
    .find_map(|p| model.pointer(p).and_then(Value::as_u64))
    .filter(|&n| n > 0)
    .map(|n| n as usize)
}

fn with_auth<B>(request: ureq::RequestBuilder<B>, key: Option<&str>) -> ureq::RequestBuilder<B> {
    match key {
        Some(k) => request.header("Authorization", format!("Bearer {k}")),
        None => request,
    }
}

/// Reads up to `MAX_ERROR_BODY` bytes of an error answer.
fn error_body(response: ureq::http::Response<ureq::Body>) -> String {
    let mut text = String::new();
    let _ = response
        .into_body()
        .into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_string(&mut text);
    text
}

fn get_json(agent: &ureq::Agent, url: &str, key: Option<&str>, timeout: Duration) -> Result<Value> {
    let response = with_auth(agent.get(url), key)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| transport_error(url, e, timeout))?;
    let status = response.status().as_u16();
    if status >= 400 {
        return Err(status_error(url, status, &error_body(response)));
    }
    let mut text = String::new();
    response
        .into_body()
        .into_reader()
        .take(16 * 1024 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| transport_error(url, ureq::Error::from(e), timeout))?;
    serde_json::from_str(&text).map_err(|_| {
        malformed(
            url,
            format!(
                "the answer is not JSON (is this an OpenAI-compatible server?): {:?}",
                text.chars().take(120).collect::<String>()
            ),
        )
    })
}

/// Sends a streaming request and hands each event to `forward` until it returns false (the
/// caller stopped listening) or the body ends.
fn read_stream(
    agent: &ureq::Agent,
    url: &str,
    key: Option<&str>,
    body: &Value,
    timeout: Duration,
    forward: &mut dyn FnMut(Item) -> bool,
) -> Result<()> {
    let response = with_auth(agent.post(url), key)
        .header("Accept", "text/event-stream")
        .send_json(body)
        .map_err(|e| transport_error(url, e, timeout))?;
    let status = response.status().as_u16();
    if status >= 400 {
        return Err(status_error(url, status, &error_body(response)));
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut reader = BufReader::new(response.into_body().into_reader());
    let read_error = |e: std::io::Error| transport_error(url, ureq::Error::from(e), timeout);
    if content_type.starts_with("application/json") {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(read_error)?;
        forward(Item::Whole(text));
        return Ok(());
    }
    if !content_type.is_empty() && !content_type.starts_with("text/event-stream") {
        return Err(malformed(
            url,
            format!(
                "the server answered with {content_type}, not an event stream \
                 (is this an OpenAI-compatible server?)"
            ),
        ));
    }
    let mut parser = SseParser::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(read_error)?;
        if n == 0 {
            if let Some(data) = parser.flush() {
                forward(Item::Event(data));
            }
            return Ok(());
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| malformed(url, "the server sent an event that is not UTF-8"))?;
        let text = text.trim_end_matches('\n').trim_end_matches('\r');
        if let Some(data) = parser.line(text)
            && !forward(Item::Event(data))
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        let root = |s: &str| parse_base_url(s).map(|r| r.url);
        assert_eq!(
            root("http://127.0.0.1:8080").ok().as_deref(),
            Some("http://127.0.0.1:8080/v1")
        );
        assert_eq!(
            root(" http://localhost:11434/v1/ ").ok().as_deref(),
            Some("http://localhost:11434/v1")
        );
        assert_eq!(
            root("https://example.com/api/v1").ok().as_deref(),
            Some("https://example.com/api/v1")
        );
        let v6 = parse_base_url("http://[::1]:8080").expect("v6");
        assert_eq!(v6.host, "::1");
        assert!(is_loopback(&v6.host) && is_loopback("localhost") && !is_loopback("10.0.0.1"));
        let err = root("localhost:8080").expect_err("no scheme").to_string();
        assert!(err.contains("must start with http://"), "{err}");
    }

    #[test]
    fn sse_lines_become_events() {
        let mut p = SseParser::default();
        assert_eq!(p.line(": keep-alive"), None);
        assert_eq!(p.line("event: message"), None);
        assert_eq!(p.line("data: {\"a\":"), None);
        assert_eq!(p.line("data:1}"), None);
        assert_eq!(p.line("").as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(p.line(""), None);
        assert_eq!(p.line("data: [DONE]"), None);
        assert_eq!(p.flush().as_deref(), Some("[DONE]"));
    }

    #[test]
    fn chunks_and_errors_parse() {
        let url = "http://x/v1/chat/completions";
        let c = parse_event(
            Endpoint::Chat,
            url,
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        )
        .expect("chunk");
        assert_eq!(c.text.as_deref(), Some("Hi"));
        let c = parse_event(
            Endpoint::Chat,
            url,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        )
        .expect("usage");
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
        assert!(
            parse_event(Endpoint::Chat, url, "[DONE]")
                .expect("done")
                .done
        );
        let e = parse_event(Endpoint::Chat, url, "not json")
            .expect_err("malformed")
            .to_string();
        assert!(e.contains("not JSON") && e.starts_with(url), "{e}");
        let e = parse_event(
            Endpoint::Chat,
            url,
            r#"{"error":{"message":"out of memory"}}"#,
        )
        .expect_err("error event")
        .to_string();
        assert!(e.contains("out of memory"), "{e}");
        let c = parse_event(
            Endpoint::Completions,
            url,
            r#"{"choices":[{"text":" world","finish_reason":"length"}]}"#,
        )
        .expect("completion");
        assert_eq!(c.text.as_deref(), Some(" world"));
        assert_eq!(
            finish_from(c.finish_reason.as_deref()),
            FinishReason::Length
        );
    }

    #[test]
    fn error_bodies_give_the_servers_message() {
        assert_eq!(
            server_message(r#"{"error":{"message":"Invalid API key","type":"auth"}}"#),
            "Invalid API key"
        );
        assert_eq!(
            server_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(server_message(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(server_message("  plain text  "), "plain text");
        let e = status_error(
            "http://x/v1/models",
            401,
            r#"{"error":{"message":"bad key"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "http://x/v1/models: the server answered HTTP 401 Unauthorized: bad key (check the API key)"
        );
    }

    #[test]
    fn the_api_key_is_never_printed() {
        let mut c = RemoteConfig::new("http://127.0.0.1:1");
        c.api_key = Some("sk-secret".into());
        assert!(!format!("{c:?}").contains("sk-secret"));
    }
}
