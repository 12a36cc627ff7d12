//! `studio serve`: a local model behind an OpenAI-compatible HTTP API, so other programs (editor
//! plugins, scripts, other chat apps, another Studio's remote backend) can use it.
//!
//! Routes:
//! - `GET /v1/models` (and `GET /v1/models/{id}`): the one loaded model, with its context length
//!   as `max_model_len` and `context_length`;
//! - `POST /v1/chat/completions`: a reply in the model's own chat template
//!   ([`studio_inference::chat::build_chat_prompt`]; the oldest turns are dropped if the
//!   conversation does not fit);
//! - `POST /v1/completions`: a raw continuation of `prompt`.
//!
//! Both generation routes stream with `"stream": true` (`text/event-stream`: `data: {chunk}`
//! events, a last chunk with `finish_reason`, a usage chunk when `stream_options.include_usage`
//! is set, then `data: [DONE]`) or answer with one JSON object with `usage`. Sampling fields:
//! `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`), `seed`, `stop` (a string
//! or a list), and as extensions `top_k`, `min_p`, `repeat_penalty` (or `repetition_penalty`),
//! `repeat_last_n`. Fields that are not sent take Studio's defaults, except the repeat penalty
//! (off, as OpenAI has none), the seed (random) and `max_tokens` (2048, at most the context).
//!
//! Requests are served one generation at a time: a few named handler threads
//! (`studio-serve-N`) take requests from `tiny_http`, and generation runs on the model behind a
//! mutex, with the loader and the shared token loop directly (as the CLI does). A streaming
//! client that disconnects cancels its generation at the next token. Malformed requests get an
//! OpenAI-style error `{"error": {"message", "type", "param", "code"}}` with status 400, 404,
//! 405 or 413, and the server keeps serving.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use serde_json::{Map, Value, json};
use studio_inference::chat::{ChatMessage, build_chat_prompt};
use studio_inference::generate::{FinishReason, GenerationStats, Step, generate};
use studio_inference::loader::LoadedModel;
use studio_inference::sampling::SamplingParams;
use tiny_http::{Header, Method, Request, Response};

/// `max_tokens` when a request does not say (capped by the context length).
pub const DEFAULT_MAX_TOKENS: usize = 2048;

/// Largest request body accepted.
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Threads taking requests; generation itself is one at a time.
const HANDLERS: usize = 4;

/// An OpenAI-compatible server running on its own threads until dropped or shut down.
pub struct Server {
    http: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    addr: SocketAddr,
    handlers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("model", &self.shared.id)
            .finish_non_exhaustive()
    }
}

struct Shared {
    model: Mutex<LoadedModel>,
    id: String,
    context_length: usize,
    created: u64,
    next_id: AtomicU64,
    disconnects: AtomicU64,
    stop: AtomicBool,
}

impl Server {
    /// Binds `host:port` (port 0 picks a free one) and starts serving `model`.
    pub fn start(model: LoadedModel, host: &str, port: u16) -> Result<Self> {
        let http = tiny_http::Server::http((host, port))
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("listening on {host} port {port}"))?;
        let addr = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("listening on {host}: not an IP address"))?;
        let shared = Arc::new(Shared {
            id: model.info.name.clone(),
            context_length: model.model.context_length(),
            model: Mutex::new(model),
            created: unix_time(),
            next_id: AtomicU64::new(1),
            disconnects: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let http = Arc::new(http);
        let mut server = Self {
            http,
            shared,
            addr,
            handlers: Vec::new(),
        };
        for i in 0..HANDLERS {
            let (http, shared) = (server.http.clone(), server.shared.clone());
            let handle = std::thread::Builder::new()
                .name(format!("studio-serve-{i}"))
                .spawn(move || {
                    while !shared.stop.load(Ordering::Relaxed) {
                        match http.recv() {
                            Ok(request) => handle(&shared, request),
                            Err(e) => {
                                if !shared.stop.load(Ordering::Relaxed) {
                                    log::warn!("serve: {e}");
                                }
                            }
                        }
                    }
                })
                .context("starting a studio-serve thread")?;
            server.handlers.push(handle);
        }
        Ok(server)
    }

    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API root clients use, e.g. `http://127.0.0.1:8080/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The model's id in `/v1/models`.
    pub fn model_id(&self) -> &str {
        &self.shared.id
    }

    /// How many streaming generations were stopped because their client went away.
    pub fn disconnects(&self) -> u64 {
        self.shared.disconnects.load(Ordering::Relaxed)
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        for h in std::mem::take(&mut self.handlers) {
            let _ = h.join();
        }
    }

    /// Stops taking requests, ends a running generation at its next token and joins the
    /// handler threads.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for _ in 0..self.handlers.len() {
            self.http.unblock();
        }
        for h in self.handlers.drain(..) {
            let _ = h.join();
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An answer that is not a success: status and OpenAI-style error body.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
        }
    }

    fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    fn server(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            kind: "server_error",
            message: message.into(),
            param: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }})
    }

    /// Errors of the inference crate: what the request asked for is a 400, the rest a 500.
    fn from_inference(e: &studio_inference::Error) -> Self {
        use studio_inference::Error as E;
        match e {
            E::EmptyPrompt
            | E::PromptTooLong { .. }
            | E::InvalidParameter(_)
            | E::ChatTemplate(_)
            | E::Tokenizer(_) => Self::invalid(e.to_string()),
            _ => Self::server(e.to_string()),
        }
    }
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .unwrap_or_else(|()| unreachable!("a valid header"))
}

fn respond_json(request: Request, status: u16, body: &Value) {
    let response = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(json_header());
    if let Err(e) = request.respond(response) {
        log::info!("serve: the client left before the answer was sent: {e}");
    }
}

fn respond_error(request: Request, error: &ApiError) {
    log::info!(
        "serve: {} {} → {} {}",
        request.method(),
        request.url(),
        error.status,
        error.message
    );
    respond_json(request, error.status, &error.body());
}

fn handle(shared: &Shared, mut request: Request) {
    let path = request
        .url()
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned();
    let method = request.method().clone();
    match (path.as_str(), &method) {
        ("/v1/models", Method::Get) => respond_json(request, 200, &models_json(shared)),
        (p, Method::Get) if p.strip_prefix("/v1/models/") == Some(shared.id.as_str()) => {
            respond_json(request, 200, &model_json(shared));
        }
        (p, Method::Get) if p.starts_with("/v1/models/") => respond_error(
            request,
            &ApiError {
                status: 404,
                kind: "not_found_error",
                message: format!(
                    "no model `{}` here; this server has `{}`",
                    &p["/v1/models/".len()..],
                    shared.id
                ),
                param: Some("model"),
            },
        ),
        ("/v1/chat/completions" | "/v1/completions", Method::Post) => {
            let endpoint = if path == "/v1/completions" {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            };
            match read_body(&mut request)
                .and_then(|body| parse_request(endpoint, &body, shared.context_length))
            {
                Ok(job) => run(shared, request, endpoint, job),
                Err(e) => respond_error(request, &e),
            }
        }
        ("/v1/models" | "/v1/chat/completions" | "/v1/completions", _) => {
            let allowed = if path == "/v1/models" { "GET" } else { "POST" };
            respond_error(
                request,
                &ApiError {
                    status: 405,
                    kind: "invalid_request_error",
                    message: format!("{method} is not allowed on {path}; use {allowed}"),
                    param: None,
                },
            );
        }
        _ => respond_error(
            request,
            &ApiError {
                status: 404,
                kind: "not_found_error",
                message: format!(
                    "no route {method} {path}; this server has GET /v1/models, \
                     POST /v1/chat/completions and POST /v1/completions"
                ),
                param: None,
            },
        ),
    }
}

fn model_json(shared: &Shared) -> Value {
    json!({
        "id": shared.id,
        "object": "model",
        "created": shared.created,
        "owned_by": "studio",
        "max_model_len": shared.context_length,
        "context_length": shared.context_length,
    })
}

fn models_json(shared: &Shared) -> Value {
    json!({"object": "list", "data": [model_json(shared)]})
}

fn read_body(request: &mut Request) -> Result<Value, ApiError> {
    let mut bytes = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ApiError::invalid(format!("could not read the request body: {e}")))?;
    if bytes.len() as u64 > MAX_BODY {
        return Err(ApiError {
            status: 413,
            kind: "invalid_request_error",
            message: format!("the request body is over {} MiB", MAX_BODY >> 20),
            param: None,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::invalid("the request body must be a JSON object"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

/// A validated generation request.
#[derive(Debug)]
struct Job {
    prompt: Prompt,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
}

#[derive(Debug)]
enum Prompt {
    Chat {
        system: String,
        messages: Vec<ChatMessage>,
    },
    Text(String),
}

/// A field that may be absent or null.
fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn number(body: &Map<String, Value>, name: &'static str) -> Result<Option<f32>, ApiError> {
    field(body, name)
        .map(|v| {
            v.as_f64()
                .map(|n| n as f32)
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be a number")))
        })
        .transpose()
}

fn integer(body: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, ApiError> {
    field(body, name)
        .map(|v| {
            v.as_i64()
                .or_else(|| v.as_u64().map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be an integer")))
        })
        .transpose()
}

fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(SystemTime::now())
}

fn parse_request(endpoint: Endpoint, body: &Value, context: usize) -> Result<Job, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let prompt = match endpoint {
        Endpoint::Chat => parse_messages(field(body, "messages"))?,
        Endpoint::Completions => Prompt::Text(parse_prompt(field(body, "prompt"))?),
    };
    let stream = match field(body, "stream") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::param("stream", "`stream` must be true or false"))?,
    };
    let include_usage = match field(body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::param(
                    "stream_options",
                    "`stream_options.include_usage` must be true or false",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    if let Some(n) = integer(body, "n")?
        && n != 1
    {
        return Err(ApiError::param("n", "only `n` = 1 is supported"));
    }
    let mut p = SamplingParams {
        repeat_penalty: 1.0,
        seed: random_seed(),
        max_new_tokens: DEFAULT_MAX_TOKENS.min(context),
        ..SamplingParams::default()
    };
    if let Some(t) = number(body, "temperature")? {
        p.temperature = t;
    }
    if let Some(t) = number(body, "top_p")? {
        p.top_p = t;
    }
    if let Some(m) = number(body, "min_p")? {
        p.min_p = m;
    }
    for name in ["repeat_penalty", "repetition_penalty"] {
        if let Some(r) = number(body, name)? {
            p.repeat_penalty = r;
        }
    }
    if let Some(k) = integer(body, "top_k")? {
        // vLLM and llama.cpp use -1 / 0 for "off".
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(n) = integer(body, "repeat_last_n")? {
        p.repeat_last_n = usize::try_from(n).unwrap_or(0);
    }
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = integer(body, name)? {
            p.max_new_tokens = usize::try_from(n)
                .map_err(|_| ApiError::param(name, format!("`{name}` must be at least 1")))?;
        }
    }
    if let Some(s) = integer(body, "seed")? {
        // A negative seed (llama.cpp's -1) asks for a random one.
        if let Ok(s) = u64::try_from(s) {
            p.seed = s;
        }
    }
    p.stop = match field(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::param("stop", "`stop` must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or a list of strings",
            ));
        }
    };
    p.stop.retain(|s| !s.is_empty());
    p.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Job {
        prompt,
        params: p,
        stream,
        include_usage,
    })
}

fn parse_prompt(prompt: Option<&Value>) -> Result<String, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string (or a list of one string)",
        )
    };
    match prompt {
        None => Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 => a[0].as_str().map(str::to_owned).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// The text of a message's `content`: a string, null, or a list of `{"type": "text"}` parts.
fn content_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::param("messages", format!("messages[{i}].content {why}"));
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some(kind @ ("image_url" | "input_audio" | "file")), _) => {
                        return Err(bad(&format!(
                            "has a `{kind}` part; this server takes text only"
                        )));
                    }
                    _ => return Err(bad("parts must be {\"type\": \"text\", \"text\": …}")),
                }
            }
            Ok(text)
        }
        Some(_) => Err(bad("must be a string or a list of text parts")),
    }
}

fn parse_messages(messages: Option<&Value>) -> Result<Prompt, ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::param(
            "messages",
            "`messages` is required: a list of {\"role\", \"content\"} objects",
        ));
    };
    let Some(list) = messages.as_array() else {
        return Err(ApiError::param(
            "messages",
            "`messages` must be a list of {\"role\", \"content\"} objects",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(ApiError::param(
                "messages",
                format!("messages[{i}] must be an object with `role` and `content`"),
            ));
        };
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::param("messages", format!("messages[{i}].role must be a string"))
        })?;
        let content = content_text(i, m.get("content"))?;
        match role {
            "system" | "developer" => system.push(content),
            "user" => turns.push(ChatMessage::user(content)),
            "assistant" => turns.push(ChatMessage::assistant(content)),
            other => {
                return Err(ApiError::param(
                    "messages",
                    format!(
                        "messages[{i}].role `{other}` is not supported \
                         (use system, user or assistant)"
                    ),
                ));
            }
        }
    }
    if turns.is_empty() {
        return Err(ApiError::param(
            "messages",
            "`messages` needs at least one user message",
        ));
    }
    Ok(Prompt::Chat {
        system: system.join("\n\n"),
        messages: turns,
    })
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::EndOfText | FinishReason::StopString | FinishReason::Cancelled => "stop",
    }
}

fn usage_json(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    })
}

/// Writes `text/event-stream` events, chunked on HTTP/1.1; a failed write means the client
/// is gone.
struct EventStream {
    out: Box<dyn Write + Send>,
    chunked: bool,
}

impl EventStream {
    fn open(request: Request) -> std::io::Result<Self> {
        let v = request.http_version();
        let chunked = (v.0, v.1) >= (1, 1);
        let mut out = request.into_writer();
        let framing = if chunked {
            "Transfer-Encoding: chunked\r\n"
        } else {
            ""
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             {framing}Connection: close\r\n\r\n"
        )?;
        out.flush()?;
        Ok(Self { out, chunked })
    }

    fn raw(&mut self, data: &str) -> std::io::Result<()> {
        if self.chunked {
            write!(self.out, "{:x}\r\n{data}\r\n", data.len())?;
        } else {
            self.out.write_all(data.as_bytes())?;
        }
        self.out.flush()
    }

    fn event(&mut self, data: &Value) -> std::io::Result<()> {
        self.raw(&format!("data: {data}\n\n"))
    }

    fn done(mut self) -> std::io::Result<()> {
        self.raw("data: [DONE]\n\n")?;
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

/// What one chunk or answer looks like for an endpoint.
struct Shape {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (Some(t), _) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                    (None, Some(_)) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, stats: &GenerationStats) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(stats),
        })
    }

    fn answer(&self, text: &str, stats: &GenerationStats) -> Value {
        let finish = finish_reason(stats.finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(stats),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

/// The prompt's tokens, extra stop strings and end-of-turn ids, from the model's own format.
fn prepare(
    m: &LoadedModel,
    prompt: &Prompt,
    params: &mut SamplingParams,
) -> Result<(Vec<u32>, Vec<u32>), ApiError> {
    let (tokens, extra_eos) = match prompt {
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(ApiError::from_inference(
                    &studio_inference::Error::EmptyPrompt,
                ));
            }
            let tokens = m
                .tokenizer
                .encode(text)
                .map_err(|e| ApiError::from_inference(&e))?;
            (tokens, Vec::new())
        }
        Prompt::Chat { system, messages } => {
            let built = build_chat_prompt(m, system, messages, params.max_new_tokens)
                .map_err(|e| ApiError::from_inference(&e))?;
            if let Some(notice) = &built.notice {
                log::warn!("serve: {notice}");
            }
            if built.fitted.dropped_messages > 0 {
                log::info!(
                    "serve: left out the {} oldest messages to fit the context",
                    built.fitted.dropped_messages
                );
            }
            params.stop.extend(built.stop);
            (built.fitted.tokens, built.end_of_turn)
        }
    };
    let context = m.model.context_length();
    if tokens.len() >= context {
        return Err(ApiError::from_inference(
            &studio_inference::Error::PromptTooLong {
                tokens: tokens.len(),
                context,
            },
        ));
    }
    Ok((tokens, extra_eos))
}

/// Runs one generation request to its end, streaming or not.
fn run(shared: &Shared, request: Request, endpoint: Endpoint, job: Job) {
    let Job {
        prompt,
        mut params,
        stream,
        include_usage,
    } = job;
    // One generation at a time; a panic in an earlier one left nothing half-updated that
    // `generate` does not reset (it clears the KV cache first).
    let mut guard = shared.model.lock().unwrap_or_else(PoisonError::into_inner);
    let m = &mut *guard;
    let (tokens, extra_eos) = match prepare(m, &prompt, &mut params) {
        Ok(p) => p,
        Err(e) => {
            respond_error(request, &e);
            return;
        }
    };
    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let created = unix_time();
    let shape = Shape {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{created:x}{n:04x}"),
            Endpoint::Completions => format!("cmpl-{created:x}{n:04x}"),
        },
        created,
        model: shared.id.clone(),
    };
    let eos: Vec<u32> = m.eos_token_ids.iter().chain(&extra_eos).copied().collect();
    let stop = &shared.stop;
    if stream {
        let mut out = match EventStream::open(request) {
            Ok(out) => out,
            Err(e) => {
                log::info!("serve: the client left: {e}");
                return;
            }
        };
        let mut gone = endpoint == Endpoint::Chat && out.event(&shape.chunk(None, None)).is_err();
        let result = run_generate(m, &eos, &tokens, &params, &mut |text| {
            gone = gone || out.event(&shape.chunk(Some(text), None)).is_err();
            !gone && !stop.load(Ordering::Relaxed)
        });
        if gone {
            shared.disconnects.fetch_add(1, Ordering::Relaxed);
            log::info!("serve: the client disconnected; generation stopped");
            return;
        }
        let ended = match result {
            Ok(stats) => out
                .event(&shape.chunk(None, Some(finish_reason(stats.finish))))
                .and_then(|()| {
                    if include_usage {
                        out.event(&shape.usage_chunk(&stats))
                    } else {
                        Ok(())
                    }
                }),
            Err(e) => out.event(&e.body()),
        };
        if let Err(e) = ended.and_then(|()| out.done()) {
            log::info!("serve: the client left at the end: {e}");
        }
    } else {
        let mut text = String::new();
        match run_generate(m, &eos, &tokens, &params, &mut |t| {
            text.push_str(t);
            !stop.load(Ordering::Relaxed)
        }) {
            Ok(stats) => respond_json(request, 200, &shape.answer(&text, &stats)),
            Err(e) => respond_error(request, &e),
        }
    }
}

/// The shared token loop, with panics caught; `on_text` returns false to stop.
fn run_generate(
    m: &mut LoadedModel,
    eos: &[u32],
    tokens: &[u32],
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationStats, ApiError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(
            &mut *m.model,
            &m.tokenizer,
            eos,
            tokens,
            params,
            &mut |step: Step<'_>| {
                if step.text.is_empty() || on_text(step.text) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
    }));
    match outcome {
        Ok(Ok(stats)) => Ok(stats),
        Ok(Err(e)) => Err(ApiError::from_inference(&e)),
        Err(_) => {
            m.model.clear_kv_cache();
            Err(ApiError::server(
                "the generation panicked; the server recovered (please report this)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_validated_with_clear_messages() {
        let chat = |v: Value| parse_request(Endpoint::Chat, &v, 256);
        let ok = chat(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
            ],
            "temperature": 0, "max_tokens": 5, "stop": "\n", "stream": true,
            "stream_options": {"include_usage": true}, "top_k": -1, "seed": 7
        }))
        .expect("valid");
        assert!(ok.stream && ok.include_usage);
        assert!(ok.params.temperature.abs() < f32::EPSILON);
        assert_eq!(ok.params.max_new_tokens, 5);
        assert_eq!(ok.params.stop, vec!["\n".to_owned()]);
        assert_eq!((ok.params.top_k, ok.params.seed), (0, 7));
        match ok.prompt {
            Prompt::Chat { system, messages } => {
                assert_eq!(system, "Be brief.");
                assert_eq!(messages, vec![ChatMessage::user("Hi")]);
            }
            Prompt::Text(_) => panic!("chat"),
        }
        for (body, words) in [
            (json!({}), "`messages` is required"),
            (json!({"messages": "hi"}), "must be a list"),
            (json!({"messages": []}), "must not be empty"),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "`tool`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "`temperature` must be a number",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max new tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stop": 3}),
                "`stop`",
            ),
        ] {
            let e = chat(body).expect_err("invalid");
            assert_eq!(e.status, 400);
            assert!(e.message.contains(words), "{} vs {words}", e.message);
        }
        let e = parse_request(Endpoint::Completions, &json!({"prompt": 5}), 256)
            .expect_err("bad prompt");
        assert!(e.message.contains("`prompt`"), "{}", e.message);
    }
}
