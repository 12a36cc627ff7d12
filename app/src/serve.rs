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

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use studio_inference::llm::chat::{ChatFormat, ChatMessage, build_chat_prompt};
use studio_inference::llm::generate::{FinishReason, GenerationStats, Step, generate};
use studio_inference::llm::loader::LoadedModel;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::Tokenizer;
use studio_inference::worker::{CustomJob, JobKind, JobSubmitter};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

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
        }
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
        }
    }
}

/// What turns a request into tokens, kept outside the model so that it needs no lock.
struct Prompter {
    tokenizer: Tokenizer,
    chat: ChatFormat,
    context: usize,
    eos: Vec<u32>,
}

impl Prompter {
    fn of(m: &LoadedModel) -> Self {
        Self {
            tokenizer: m.tokenizer.clone(),
            chat: m.chat.clone(),
            context: m.model.context_length(),
            eos: m.eos_token_ids.clone(),
        }
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

/// A socket whose writes fail once the peer has not read for `timeout` (a client that stops
/// reading would otherwise hold its connection, and its generation, forever).
struct WriteTimeout<S> {
    stream: S,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WriteTimeout<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// After a write returned `Pending`: pending until the stall is too long, then an error.
    fn poll_stalled<T>(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", timeout.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        poll: Poll<std::io::Result<T>>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Pending => self.poll_stalled(cx),
            ready @ Poll::Ready(_) => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(poll, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.progress(poll, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.progress(poll, cx)
    }
}

/// A handler's future whose panic becomes a 500 answer.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future<Output = Response<Body>>> Future for CatchPanic<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let future = &mut self.get_mut().0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(response)) => Poll::Ready(Ok(response)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Ok(ApiError::server(
                "the request handler panicked; the server goes on (please report this)",
            )
            .response())),
        }
    }
}

/// A response body: one buffer, or events from a generation as they come.
enum Body {
    Full(Option<Bytes>),
    Events(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Events(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Events(_) => SizeHint::default(),
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::Full(Some(Bytes::from(body.to_string()))));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An answer that is not a success: status and OpenAI-style error body.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// Any other 4xx.
    fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            ..Self::invalid(message)
        }
    }

    fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    fn server(message: impl Into<String>) -> Self {
        Self::status(500, "server_error", message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::status(503, "server_error", message)
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    fn response(&self) -> Response<Body> {
        log::info!("serve: {} {}", self.status, self.message);
        let mut response = json_response(self.status, &self.body());
        let headers = response.headers_mut();
        if self.status == 401 {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self.status, 408 | 413) {
            // The rest of the request was not read: the connection can't carry another.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
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

/// Answers one request; CORS headers go on answers to the allowed origin.
async fn respond(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = match route(&shared, request).await {
        Ok(response) => response,
        Err(e) => e.response(),
    };
    if let Some(origin) = origin.filter(|o| shared.allowed_origin(o)) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

async fn route(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    shared.check_host(request.headers())?;
    shared.check_origin(request.headers())?;
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    if method == Method::OPTIONS {
        return Ok(preflight());
    }
    if path == "/health" {
        return match method {
            Method::GET | Method::HEAD => Ok(json_response(200, &json!({"status": "ok"}))),
            _ => Err(not_allowed(&method, &path, "GET")),
        };
    }
    shared.check_key(request.headers())?;
    let id = shared.model.id.as_str();
    match (path.as_str(), &method) {
        ("/v1/models", &Method::GET) => Ok(json_response(200, &shared.models_json())),
        (p, &Method::GET) if p.strip_prefix("/v1/models/") == Some(id) => {
            Ok(json_response(200, &shared.model_json()))
        }
        (p, &Method::GET) if p.starts_with("/v1/models/") => Err(ApiError {
            param: Some("model"),
            ..ApiError::status(
                404,
                "not_found_error",
                format!(
                    "no model `{}` here; this server has `{id}`",
                    &p["/v1/models/".len()..]
                ),
            )
        }),
        ("/v1/chat/completions" | "/v1/completions", &Method::POST) => {
            let endpoint = if path == "/v1/completions" {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            };
            let body = read_body(request, &shared.options.limits).await?;
            let job = parse_request(endpoint, &body, shared.model.prompter.context)?;
            generate_reply(shared.clone(), endpoint, job).await
        }
        ("/v1/models", _) => Err(not_allowed(&method, &path, "GET")),
        ("/v1/chat/completions" | "/v1/completions", _) => Err(not_allowed(&method, &path, "POST")),
        _ => Err(ApiError::status(
            404,
            "not_found_error",
            format!(
                "no route {method} {path}; this server has GET /v1/models, \
                 POST /v1/chat/completions and POST /v1/completions"
            ),
        )),
    }
}

fn not_allowed(method: &Method, path: &str, allowed: &str) -> ApiError {
    ApiError::status(
        405,
        "invalid_request_error",
        format!("{method} is not allowed on {path}; use {allowed}"),
    )
}

/// The answer to a CORS preflight (only reached from no origin or the allowed one).
fn preflight() -> Response<Body> {
    let mut response = Response::new(Body::Full(None));
    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// The host part of a `Host` header value: no port, no brackets, no trailing dot.
fn host_name(host: &str) -> &str {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// Equal without an early exit, so that timing does not tell how much of a key was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// DNS rebinding: a page on `evil.example` that resolves to 127.0.0.1 still says
    /// `Host: evil.example`.
    fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(host) = headers.get(header::HOST) else {
            return Err(ApiError::invalid("the request has no `Host` header"));
        };
        let host = String::from_utf8_lossy(host.as_bytes());
        let name = host_name(&host);
        let bound = self.addr.ip();
        let ip_ok = name.parse::<IpAddr>().is_ok_and(|ip| {
            ip == bound || bound.is_unspecified() || (bound.is_loopback() && ip.is_loopback())
        });
        let allowed = ip_ok
            || name.eq_ignore_ascii_case("localhost")
            || self
                .options
                .allow_hosts
                .iter()
                .any(|h| h.trim_end_matches('.').eq_ignore_ascii_case(name));
        if allowed {
            Ok(())
        } else {
            Err(ApiError::status(
                403,
                "permission_error",
                format!(
                    "requests for the host `{name}` are refused: use {} or localhost, or \
                     start the server with `--allow-host {name}`",
                    self.addr
                ),
            ))
        }
    }

    fn allowed_origin(&self, origin: &HeaderValue) -> bool {
        self.options
            .cors_origin
            .as_deref()
            .is_some_and(|o| o.trim_end_matches('/').as_bytes() == origin.as_bytes())
    }

    /// Browsers send `Origin` on cross-origin requests: a page the user visits can't make the
    /// model generate unless it is the one allowed origin.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match headers.get(header::ORIGIN) {
            Some(origin) if !self.allowed_origin(origin) => Err(ApiError::status(
                403,
                "permission_error",
                format!(
                    "requests from web pages (origin `{}`) are refused; start the server with \
                     `--cors-origin ORIGIN` to allow one",
                    String::from_utf8_lossy(origin.as_bytes())
                ),
            )),
            _ => Ok(()),
        }
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.options.api_key else {
            return Ok(());
        };
        let sent = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .and_then(|v| v.strip_prefix(b"Bearer "));
        match sent {
            Some(sent) if same_secret(sent.trim_ascii(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(401, "invalid_request_error", "the API key is not right")
            }),
            None => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(
                    401,
                    "invalid_request_error",
                    "this server needs an API key: send `Authorization: Bearer KEY`",
                )
            }),
        }
    }

    fn model_json(&self) -> Value {
        let context = self.model.prompter.context;
        json!({
            "id": self.model.id,
            "object": "model",
            "created": self.created,
            "owned_by": "studio",
            "max_model_len": context,
            "context_length": context,
        })
    }

    fn models_json(&self) -> Value {
        json!({"object": "list", "data": [self.model_json()]})
    }

    /// Runs `job` on the model once it is free, off the async threads; `None` when it could
    /// not run (the GUI unloaded the model, or it panicked).
    async fn on_model<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut LoadedModel, &dyn Fn() -> bool) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let job: ModelJob = Box::new(move |m, cancelled| {
            let _ = tx.send(job(m, cancelled));
        });
        match &self.model.access {
            ModelAccess::Owned(model) => {
                let guard = model.clone().lock_owned().await;
                let ran = tokio::task::spawn_blocking(move || {
                    let mut guard = guard;
                    job(&mut guard, &|| false);
                })
                .await;
                if let Err(e) = ran {
                    log::error!("serve: a generation failed: {e}");
                }
            }
            ModelAccess::Worker(submit) => submit(job).map_err(ApiError::unavailable)?,
        }
        rx.await.map_err(|_| {
            ApiError::unavailable("the model stopped before answering (was it unloaded?)")
        })
    }
}

/// Reads a JSON object body within the size and time limits.
async fn read_body(request: Request<Incoming>, limits: &Limits) -> Result<Value, ApiError> {
    let too_large = || {
        ApiError::status(
            413,
            "invalid_request_error",
            format!(
                "the request body is over {} KiB",
                limits.max_body_bytes >> 10
            ),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, body.collect()).await {
        Err(_) => {
            return Err(ApiError::status(
                408,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    limits.body_timeout.as_secs()
                ),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(ApiError::invalid(format!(
                "could not read the request body: {e}"
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
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

/// A request turned into tokens, ready for the model.
struct Prepared {
    tokens: Vec<u32>,
    eos: Vec<u32>,
    params: SamplingParams,
}

/// Renders the template and tokenizes (no model needed).
fn prepare(p: &Prompter, prompt: &Prompt, params: SamplingParams) -> Result<Prepared, ApiError> {
    let (tokens, eos, params) = match prompt {
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(ApiError::from_inference(
                    &studio_inference::Error::EmptyPrompt,
                ));
            }
            let tokens = p
                .tokenizer
                .encode(text)
                .map_err(|e| ApiError::from_inference(&e))?;
            (tokens, p.eos.clone(), params)
        }
        Prompt::Chat { system, messages } => {
            let reply = build_chat_prompt(
                &p.tokenizer,
                &p.chat,
                p.context,
                system,
                messages,
                params.max_new_tokens,
            )
            .map_err(|e| ApiError::from_inference(&e))?
            .into_reply(params, &p.eos);
            if let Some(notice) = &reply.notice {
                log::warn!("serve: {notice}");
            }
            if reply.dropped_messages > 0 {
                log::info!(
                    "serve: left out the {} oldest messages to fit the context",
                    reply.dropped_messages
                );
            }
            (reply.tokens, reply.eos, reply.params)
        }
    };
    if tokens.len() >= p.context {
        return Err(ApiError::from_inference(
            &studio_inference::Error::PromptTooLong {
                tokens: tokens.len(),
                context: p.context,
            },
        ));
    }
    Ok(Prepared {
        tokens,
        eos,
        params,
    })
}

/// Sets its flag when dropped: the handler's future is dropped when its client disconnects.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs one generation request to its end, streaming or not.
async fn generate_reply(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    job: Job,
) -> Result<Response<Body>, ApiError> {
    let Job {
        prompt,
        params,
        stream,
        include_usage,
    } = job;
    // The client going away from here on cancels (the future is dropped).
    let gone = Arc::new(AtomicBool::new(false));
    let cancel_on_drop = CancelOnDrop(gone.clone());
    let prepared = {
        let _permit = shared
            .preparing
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is stopping"))?;
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || prepare(&shared.model.prompter, &prompt, params))
            .await
            .map_err(|e| ApiError::server(format!("preparing the prompt failed: {e}")))??
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
        model: shared.model.id.clone(),
    };
    if stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let events = tx.clone();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            let ran = task_shared
                .on_model({
                    let shared = task_shared.clone();
                    move |m, cancelled| {
                        stream_events(&shared, m, cancelled, &prepared, &shape, include_usage, &tx);
                    }
                })
                .await;
            if let Err(e) = ran {
                let _ = events
                    .send(Bytes::from(format!("data: {}\n\n", e.body())))
                    .await;
                let _ = events.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            }
        });
        drop(cancel_on_drop);
        let mut response = Response::new(Body::Events(rx));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    let stop = shared.clone();
    let (text, stats) = shared
        .on_model(move |m, cancelled| {
            let mut text = String::new();
            let result = if gone.load(Ordering::Relaxed) {
                // The client left while the request waited for the model.
                Err(ApiError::invalid("the client disconnected"))
            } else {
                run_generate(m, &prepared, &mut |t| {
                    text.push_str(t);
                    !gone.load(Ordering::Relaxed)
                        && !stop.stop.load(Ordering::Relaxed)
                        && !cancelled()
                })
            };
            if gone.load(Ordering::Relaxed) {
                stop.disconnects.fetch_add(1, Ordering::Relaxed);
                log::info!("serve: the client disconnected; generation stopped");
            }
            result.map(|stats| (text, stats))
        })
        .await??;
    drop(cancel_on_drop);
    Ok(json_response(200, &shape.answer(&text, &stats)))
}

/// A streaming generation on the model: events into `tx` until the end, or until the client
/// is gone (the body, and with it the receiver, is dropped).
fn stream_events(
    shared: &Shared,
    m: &mut LoadedModel,
    cancelled: &dyn Fn() -> bool,
    prepared: &Prepared,
    shape: &Shape,
    include_usage: bool,
    tx: &mpsc::Sender<Bytes>,
) {
    let send = |event: &Value| {
        tx.blocking_send(Bytes::from(format!("data: {event}\n\n")))
            .is_ok()
    };
    // A client that left while the request waited for the model costs no prefill.
    let mut gone =
        tx.is_closed() || (shape.endpoint == Endpoint::Chat && !send(&shape.chunk(None, None)));
    let result = run_generate(m, prepared, &mut |text| {
        gone = gone || !send(&shape.chunk(Some(text), None));
        !gone && !shared.stop.load(Ordering::Relaxed) && !cancelled()
    });
    if gone {
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
        log::info!("serve: the client disconnected; generation stopped");
        return;
    }
    match result {
        Ok(stats) => {
            let _ = send(&shape.chunk(None, Some(finish_reason(stats.finish))))
                && (!include_usage || send(&shape.usage_chunk(&stats)));
        }
        Err(e) => {
            send(&e.body());
        }
    }
    let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
}

/// The shared token loop, with panics caught; `on_text` returns false to stop.
fn run_generate(
    m: &mut LoadedModel,
    prepared: &Prepared,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationStats, ApiError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(
            &mut *m.model,
            &m.tokenizer,
            &prepared.eos,
            &prepared.tokens,
            &prepared.params,
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
                },
                access: ModelAccess::Worker(Box::new(|_| Err("no model while fuzzing".into()))),
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
