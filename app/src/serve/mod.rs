//! `studio serve`: a local model behind an OpenAI-compatible HTTP API, so other programs (editor
//! plugins, scripts, other chat apps, another Studio's remote backend) can use it. The Settings
//! panel starts the same server on the model the worker has loaded.
//!
//! Routes:
//! - `GET /health`: `{"status": "ok"}`, with no API key (for supervisors and load balancers);
//! - `GET /v1/models` (and `GET /v1/models/{id}`): the one loaded model, with its context length
//!   as `max_model_len` and `context_length`;
//! - `POST /v1/chat/completions`: a reply in the model's own chat template
//!   ([`studio_inference::llm::chat::build_chat_prompt`]; the oldest turns are dropped if the
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
//! # How it holds up
//! HTTP/1.1 is hyper's, on a small tokio runtime (`studio-serve-io` threads). Every limit is
//! in [`Limits`]:
//! - request heads over `max_header_bytes` get 431, bodies over `max_body_bytes` get 413 (from
//!   `Content-Length` before reading, or while reading a chunked body); nothing is allocated
//!   for what a client only declares;
//! - a head must arrive within `header_timeout` (which also closes idle keep-alive
//!   connections), a body within `body_timeout` (408); a write that a client does not read for
//!   `write_timeout` closes the connection;
//! - at most `max_connections` connections are open; more get 503 and are closed;
//! - `/health` and `/v1/models` are answered on the async threads and never wait for a
//!   generation. Templates are rendered and prompts tokenized on blocking threads (at most
//!   `max_preparing` at once) before the request queues for the model, which runs one
//!   generation at a time;
//! - a panic in a handler answers 500 and the server goes on; one in a generation too, after
//!   the model's cache is reset;
//! - a client that disconnects cancels its generation at the next token, streaming or not
//!   (also while it waits for the model).
//!
//! Access control ([`ServeOptions`]): with an API key every route but `/health` needs
//! `Authorization: Bearer KEY` (401 otherwise); a `Host` other than the bound address,
//! `localhost` or an `allow_hosts` name gets 403 (a web page cannot reach the server through
//! DNS rebinding); a request from a web page (an `Origin` header) gets 403 unless it is the
//! one `cors_origin`, which alone receives CORS headers.
//!
//! Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}`.
//!
//! Files: this one (options, the model the server holds, the listener and its connections),
//! `transport` (timeouts, panics answered 500, bodies, errors), `routes` (routing and access
//! control), `openai` (the request and response JSON) and `generation` (one generation,
//! streamed or not, cancelled when its client goes).

mod embeddings;
mod generation;
mod openai;
mod routes;
mod tools;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use studio_inference::embed::EmbeddingModel;
use studio_inference::llm::chat::ChatFormat;
use studio_inference::llm::grammar::VocabTrie;
use studio_inference::llm::loader::LoadedModel;
use studio_inference::llm::text::Tokenizer;
use studio_inference::worker::{CustomJob, JobKind, JobSubmitter};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use self::routes::respond;
use self::transport::{ApiError, CatchPanic, WriteTimeout};

/// `max_tokens` when a request does not say (capped by the context length).
pub const DEFAULT_MAX_TOKENS: usize = 2048;

/// What one client may cost the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest request head, the request line and headers (431 above it; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Time to send a request's head; idle keep-alive connections are closed after it too.
    pub header_timeout: Duration,
    /// Time to send a request's body once the head is in (408 after it).
    pub body_timeout: Duration,
    /// How long a write may wait on a client that does not read before the connection is
    /// closed (which cancels its generation).
    pub write_timeout: Duration,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Prompts rendered and tokenized at once.
    pub max_preparing: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_header_bytes: 64 << 10,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_mins(1),
            write_timeout: Duration::from_mins(1),
            max_connections: 64,
            max_preparing: 2,
        }
    }
}

/// Where and for whom the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// When set, every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Names accepted in the `Host` header besides the bound address and `localhost`.
    pub allow_hosts: Vec<String>,
    /// The one web origin (`https://app.example`) allowed to call the API from a browser.
    pub cors_origin: Option<String>,
    pub limits: Limits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            allow_hosts: Vec::new(),
            cors_origin: None,
            limits: Limits::default(),
        }
    }
}

/// Work on the model: gets the model and a "was the job cancelled elsewhere" check.
type ModelJob = Box<dyn FnOnce(&mut LoadedModel, &dyn Fn() -> bool) + Send>;

/// Queues a [`ModelJob`] where the model lives (the GUI's worker); an `Err` says why it can't.
type SubmitJob = Box<dyn Fn(ModelJob) -> Result<(), String> + Send + Sync>;

/// The model a server generates with.
pub struct ServedModel {
    id: String,
    prompter: Prompter,
    access: ModelAccess,
    /// The sentence-embedding model of `/v1/embeddings`, if one was given.
    embeddings: Option<Arc<EmbeddingModel>>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

enum ModelAccess {
    /// `studio serve`: the server owns the model; generations take turns on this lock.
    Owned(Arc<tokio::sync::Mutex<LoadedModel>>),
    /// The GUI: the worker owns the model and runs the server's generations as its jobs.
    Worker(SubmitJob),
}

impl ServedModel {
    /// A model the server owns.
    pub fn owned(model: LoadedModel) -> Self {
        Self {
            id: model.info.name.clone(),
            prompter: Prompter::of(&model),
            access: ModelAccess::Owned(Arc::new(tokio::sync::Mutex::new(model))),
            embeddings: None,
        }
    }

    /// Also serves `model` at `/v1/embeddings`.
    #[must_use]
    pub fn with_embeddings(mut self, model: EmbeddingModel) -> Self {
        self.embeddings = Some(Arc::new(model));
        self
    }

    /// A model the GUI's worker owns: its name, tokenizer and chat format are read now from
    /// `model`, and each generation runs as a job queued with `submitter` (it takes its turn
    /// with the window's own jobs and shows in the status bar).
    pub fn on_worker(model: &LoadedModel, submitter: JobSubmitter) -> Self {
        let submit: SubmitJob = Box::new(move |job: ModelJob| {
            let run: CustomJob = Box::new(move |ctx| {
                let cancel = ctx.cancel_flag();
                // No model (unloaded meanwhile): the job is dropped, and the client told so.
                if let Some(m) = ctx.model() {
                    job(m, &|| cancel.load(Ordering::Relaxed));
                }
                Ok(())
            });
            submitter
                .submit(JobKind::Custom {
                    label: "Answering an API request".into(),
                    run,
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Self {
            id: model.info.name.clone(),
            prompter: Prompter::of(model),
            access: ModelAccess::Worker(submit),
            embeddings: None,
        }
    }
}

/// What turns a request into tokens, kept outside the model so that it needs no lock.
struct Prompter {
    tokenizer: Tokenizer,
    chat: ChatFormat,
    context: usize,
    eos: Vec<u32>,
    /// The vocabulary as a prefix tree for grammar-constrained requests, built by the first.
    trie: std::sync::OnceLock<Arc<VocabTrie>>,
}

impl Prompter {
    fn of(m: &LoadedModel) -> Self {
        Self {
            tokenizer: m.tokenizer.clone(),
            chat: m.chat.clone(),
            context: m.model.context_length(),
            eos: m.eos_token_ids.clone(),
            trie: std::sync::OnceLock::new(),
        }
    }

    /// The vocabulary trie (built on first use: a blocking call).
    fn trie(&self) -> Arc<VocabTrie> {
        self.trie
            .get_or_init(|| studio_inference::llm::grammar::vocab_trie(&self.tokenizer))
            .clone()
    }
}

/// An OpenAI-compatible server running on its own threads until dropped or shut down.
pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    accept: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("model", &self.shared.model.id)
            .finish_non_exhaustive()
    }
}

struct Shared {
    model: ServedModel,
    options: ServeOptions,
    addr: SocketAddr,
    created: u64,
    preparing: Semaphore,
    next_id: AtomicU64,
    disconnects: AtomicU64,
    stop: AtomicBool,
}

impl Server {
    /// Binds `options.host:options.port` and starts serving `model`.
    pub fn start(model: ServedModel, options: &ServeOptions) -> Result<Self> {
        let (host, port) = (options.host.as_str(), options.port);
        let listener = std::net::TcpListener::bind((host, port))
            .with_context(|| format!("listening on {host} port {port}"))?;
        let addr = listener.local_addr().context("the listening address")?;
        listener
            .set_nonblocking(true)
            .context("a non-blocking listener")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(options.limits.max_connections.clamp(4, 256))
            .thread_name("studio-serve-io")
            .enable_all()
            .build()
            .context("starting the server's threads")?;
        let mut options = options.clone();
        options.limits.max_header_bytes = options.limits.max_header_bytes.max(8192);
        let shared = Arc::new(Shared {
            preparing: Semaphore::new(options.limits.max_preparing.max(1)),
            model,
            options,
            addr,
            created: unix_time(),
            next_id: AtomicU64::new(1),
            disconnects: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener).context("registering the listener")?
        };
        let accept = runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            runtime: Some(runtime),
            accept: Some(accept),
            shared,
            addr,
        })
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
        &self.shared.model.id
    }

    /// How many generations were stopped because their client went away.
    pub fn disconnects(&self) -> u64 {
        self.shared.disconnects.load(Ordering::Relaxed)
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        if let (Some(runtime), Some(accept)) = (&self.runtime, self.accept.take()) {
            let _ = runtime.block_on(accept);
        }
    }

    /// Stops taking requests, ends a running generation at its next token and stops the
    /// server's threads.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(runtime) = self.runtime.take() {
            // Stopped from the Settings panel, this runs on the UI thread: a prompt still
            // being tokenized finishes detached rather than freezing the window.
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let limits = shared.options.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                log::warn!("serve: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, shared.clone(), permit));
    }
}

/// Serves one connection's requests until it closes.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static, P>(
    stream: S,
    shared: Arc<Shared>,
    permit: P,
) {
    let limits = &shared.options.limits;
    let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout));
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(
            io,
            hyper::service::service_fn({
                let shared = shared.clone();
                move |request| CatchPanic(Box::pin(respond(shared.clone(), request)))
            }),
        );
    if let Err(e) = connection.await {
        log::debug!("serve: connection ended: {e}");
    }
    drop(permit);
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse_busy(mut stream: TcpStream, cap: usize) {
    let body = ApiError::unavailable(format!(
        "the server has {cap} connections open, its limit; try again shortly"
    ))
    .body()
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // Then read what the client sends for a moment (discarded): closing with its request
    // unread would reset the connection, and the client might not see the answer.
    let answer = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// For the fuzz targets (`fuzz/`): raw bytes of one connection through the real HTTP stack,
/// checks and handlers, without sockets, on a stand-in model that renders and tokenizes
/// prompts but refuses to generate (503).
#[doc(hidden)]
pub mod fuzzing {
    use super::{
        Arc, AtomicBool, AtomicU64, ModelAccess, Prompter, Semaphore, ServeOptions, ServedModel,
        Shared, serve_connection,
    };
    use studio_inference::llm::chat::ChatFormat;
    use studio_inference::llm::text::Tokenizer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Harness {
        runtime: tokio::runtime::Runtime,
        shared: Arc<Shared>,
    }

    impl Harness {
        pub fn new(
            tokenizer: Tokenizer,
            chat: ChatFormat,
            context: usize,
            options: ServeOptions,
        ) -> std::io::Result<Self> {
            let model = ServedModel {
                id: "fuzz".into(),
                prompter: Prompter {
                    tokenizer,
                    chat,
                    context,
                    eos: Vec::new(),
                    trie: std::sync::OnceLock::new(),
                },
                access: ModelAccess::Worker(Box::new(|_| Err("no model while fuzzing".into()))),
                embeddings: None,
            };
            Ok(Self {
                runtime: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
                shared: Arc::new(Shared {
                    preparing: Semaphore::new(options.limits.max_preparing.max(1)),
                    model,
                    options,
                    addr: ([127, 0, 0, 1], 8080).into(),
                    created: 0,
                    next_id: AtomicU64::new(1),
                    disconnects: AtomicU64::new(0),
                    stop: AtomicBool::new(false),
                }),
            })
        }

        /// Sends `request` as a client that then closes its side, and returns what came back.
        pub fn exchange(&self, request: &[u8]) -> Vec<u8> {
            self.runtime.block_on(async {
                let (client, server) = tokio::io::duplex(1 << 16);
                let served = tokio::spawn(serve_connection(server, self.shared.clone(), ()));
                let (mut rx, mut tx) = tokio::io::split(client);
                let request = request.to_vec();
                let sent = tokio::spawn(async move {
                    let _ = tx.write_all(&request).await;
                    let _ = tx.shutdown().await;
                });
                let mut out = Vec::new();
                let _ = rx.read_to_end(&mut out).await;
                let _ = sent.await;
                let _ = served.await;
                out
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use studio_inference::llm::chat::ChatMessage;

    use super::openai::{Endpoint, Prompt, parse_request};
    use super::routes::{host_name, same_secret};
    use super::transport::{Body, CatchPanic, json_response};
    use super::*;

    #[test]
    fn a_panicking_handler_answers_500() {
        let panicking = CatchPanic(Box::pin(async {
            assert!(unix_time() == 0, "a bug in a handler");
            json_response(200, &json!({}))
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let response = runtime.block_on(panicking).expect("infallible");
        assert_eq!(response.status(), 500);
        let Body::Full(Some(body)) = response.into_body() else {
            panic!("a JSON body");
        };
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["error"]["type"], "server_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("panicked"))
        );
    }

    #[test]
    fn host_names_are_read_without_port_brackets_or_trailing_dot() {
        for (host, name) in [
            ("localhost:8080", "localhost"),
            ("localhost", "localhost"),
            ("localhost.:80", "localhost"),
            ("[::1]:8080", "::1"),
            ("[::1]", "::1"),
            ("127.0.0.1:1", "127.0.0.1"),
            ("evil.example:x", "evil.example:x"),
        ] {
            assert_eq!(host_name(host), name, "{host}");
        }
        assert!(same_secret(b"key", b"key"));
        assert!(!same_secret(b"key", b"kez") && !same_secret(b"key", b"keys"));
    }

    #[test]
    fn requests_are_validated_with_clear_messages() {
        let chat = |v: Value| parse_request(Endpoint::Chat, &v, 256, 1000);
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
                "needs `tool_call_id`",
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
        let e = parse_request(Endpoint::Completions, &json!({"prompt": 5}), 256, 1000)
            .expect_err("bad prompt");
        assert!(e.message.contains("`prompt`"), "{}", e.message);
    }
}
