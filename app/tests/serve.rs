//! `studio serve` on loopback: Studio's OpenAI-compatible server with a tiny random-weight
//! Qwen2 (ChatML template), used by Studio's own remote backend (the worker's
//! `JobKind::ConnectRemote`), by a minimal raw HTTP client, and as the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use studio_tests::worker_events::{until_streaming, until_terminal as until_terminal_within};

use candle_core::Device;
use serde_json::{Value, json};
use studio_app::serve::{Limits, ServeOptions, ServedModel, Server};
use studio_inference::device::DevicePreference;
use studio_inference::llm::chat::ChatMessage;
use studio_inference::llm::generate::GenerationStats;
use studio_inference::llm::loader::{self, Architecture};
use studio_inference::llm::remote::RemoteConfig;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::{Event, JobId, JobKind, Worker, WorkerConfig};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Context of the test model: long enough that a reply streams for a while.
const CONTEXT: usize = 4096;

/// A tiny Qwen2 with a ChatML template whose end of turn is `<|im_end|>`. The embedding rows
/// (tied to the LM head) of its special tokens are zero, so their logits are 0 while the best
/// of the ~300 random others is positive: it never ends a turn by itself, and every reply runs
/// to `max_tokens`, however fast the machine.
fn model_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    studio_tests::families::write_family(dir, "qwen2", 11);
    let config_path = dir.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read config"))
            .expect("config json");
    config["max_position_embeddings"] = json!(CONTEXT);
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let tokenizer = studio_inference::llm::text::Tokenizer::from_file(&dir.join("tokenizer.json"))
        .expect("tok");
    let specials: Vec<usize> = std::iter::once(studio_tests::EOS)
        .chain(studio_tests::CHAT_SPECIALS.iter().copied())
        .filter_map(|t| tokenizer.token_to_id(t))
        .map(|id| id as usize)
        .collect();
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
    let name = "model.embed_tokens.weight";
    let embed = tensors[name].clone();
    let rows: Vec<_> = (0..embed.dim(0).expect("rows"))
        .map(|i| {
            let row = embed.get(i).expect("row");
            if specials.contains(&i) {
                row.zeros_like().expect("zeros")
            } else {
                row
            }
        })
        .collect();
    let embed = candle_core::Tensor::stack(&rows, 0).expect("stack");
    tensors.insert(name.to_owned(), embed);
    candle_core::safetensors::save(&tensors, &weights).expect("save");
    let tokenizer_config = json!({"chat_template": CHATML, "eos_token": "<|im_end|>"});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .expect("write tokenizer_config");
    tmp
}

fn loopback() -> ServeOptions {
    ServeOptions {
        port: 0,
        ..ServeOptions::default()
    }
}

fn start(dir: &Path) -> Server {
    let model = loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load");
    Server::start(ServedModel::owned(model), &loopback()).expect("serve on loopback")
}

/// A raw HTTP/1.1 exchange (`Connection: close`), chunked bodies decoded.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            std::str::from_utf8(&raw[..end]).expect("size line").trim(),
            16,
        )
        .expect("hex size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    request_with(
        addr,
        method,
        path,
        &format!("Host: {addr}\r\n"),
        body.unwrap_or(""),
    )
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, Some(&body.to_string()))
}

/// The `data:` payloads of an event stream.
fn events_of(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn until_terminal(w: &Worker, job: JobId) -> Vec<Event> {
    until_terminal_within(w, job, Duration::from_mins(1))
}

fn worker() -> Worker {
    Worker::spawn(WorkerConfig {
        device: DevicePreference::Cpu,
        ..WorkerConfig::default()
    })
    .expect("worker")
}

fn connect(w: &Worker, server: &Server) {
    let job = w
        .submit(JobKind::ConnectRemote {
            config: RemoteConfig {
                timeout: Duration::from_secs(30),
                ..RemoteConfig::new(server.base_url())
            },
        })
        .expect("submit");
    let events = until_terminal(w, job);
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    let info = events
        .iter()
        .find_map(|e| match e {
            Event::ModelLoaded { info, .. } => Some(info.clone()),
            _ => None,
        })
        .expect("ModelLoaded");
    assert_eq!(info.name, server.model_id());
    assert_eq!(info.architecture, Architecture::Remote);
    assert_eq!(info.context_length, CONTEXT, "from /v1/models");
}

fn streamed(events: &[Event]) -> (String, usize) {
    events
        .iter()
        .fold((String::new(), 0), |(mut s, n), e| match e {
            Event::Text { text, tokens, .. } => {
                s.push_str(text);
                (s, n + tokens)
            }
            _ => (s, n),
        })
}

fn done_stats(events: &[Event]) -> GenerationStats {
    assert_eq!(
        events.iter().filter(|e| e.is_terminal()).count(),
        1,
        "{events:?}"
    );
    match events.last() {
        Some(Event::Done {
            stats: Some(stats), ..
        }) => stats.clone(),
        other => panic!("expected Done with stats, got {other:?}"),
    }
}

#[test]
fn the_remote_backend_streams_what_the_non_streaming_endpoint_returns() {
    let dir = model_dir();
    let server = start(dir.path());
    let w = worker();
    connect(&w, &server);

    let job = w
        .submit(JobKind::Chat {
            system: "Be brief.".into(),
            messages: vec![ChatMessage::user("Hello there")],
            params: SamplingParams::greedy(40),
        })
        .expect("submit");
    let events = until_terminal(&w, job);
    let (text, deltas) = streamed(&events);
    let stats = done_stats(&events);
    assert!(!text.is_empty() && deltas > 0, "{events:?}");
    assert_eq!(stats.generated_tokens, 40, "no end of turn: max_tokens");
    assert!(deltas <= 40);
    assert!(stats.prompt_tokens > 5, "usage from the server: {stats:?}");
    assert!(stats.ttft_ms > 0.0);

    let reply = post(
        server.addr(),
        "/v1/chat/completions",
        &json!({
            "model": server.model_id(),
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"}
            ],
            "temperature": 0,
            "max_tokens": 40
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(
        answer["usage"]["completion_tokens"].as_u64(),
        Some(stats.generated_tokens as u64)
    );
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64(),
        Some(stats.prompt_tokens as u64)
    );

    // Raw continuation: the worker's Generate goes to /v1/completions.
    let job = w
        .submit(JobKind::Generate {
            prompt: "The quick brown".into(),
            params: SamplingParams::greedy(16),
        })
        .expect("submit");
    let events = until_terminal(&w, job);
    let (text, _) = streamed(&events);
    done_stats(&events);
    let reply = post(
        server.addr(),
        "/v1/completions",
        &json!({"prompt": "The quick brown", "temperature": 0, "max_tokens": 16}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["choices"][0]["text"], text.as_str());
}

#[test]
fn cancel_mid_stream_ends_cancelled_and_the_server_serves_the_next_request() {
    let dir = model_dir();
    let server = start(dir.path());
    let w = worker();
    connect(&w, &server);
    let job = w
        .submit(JobKind::Chat {
            system: String::new(),
            messages: vec![ChatMessage::user("Tell me a long story")],
            params: SamplingParams::greedy(CONTEXT - 96),
        })
        .expect("submit");
    until_streaming(&w, Duration::from_secs(30));
    let asked = Instant::now();
    w.cancel(job);
    let events = until_terminal(&w, job);
    let latency = asked.elapsed();
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    match events.last() {
        Some(Event::Cancelled { stats: Some(s), .. }) => {
            assert!(s.generated_tokens < CONTEXT - 96, "{s:?}");
        }
        other => panic!("expected Cancelled with stats, got {other:?}"),
    }
    assert!(
        latency < Duration::from_millis(100),
        "cancel took {latency:?}"
    );

    // The server notices the dropped connection, stops generating and serves the next request.
    assert_eq!(server.disconnects(), 0);
    let job = w
        .submit(JobKind::Chat {
            system: String::new(),
            messages: vec![ChatMessage::user("Hi")],
            params: SamplingParams::greedy(8),
        })
        .expect("submit");
    let started = Instant::now();
    let events = until_terminal(&w, job);
    done_stats(&events);
    assert_eq!(
        server.disconnects(),
        1,
        "the cancelled generation was stopped"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cancelled generation kept the model busy for {:?}",
        started.elapsed()
    );
}

#[test]
fn models_are_listed_and_malformed_requests_get_openai_errors() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    let models = http(addr, "GET", "/v1/models", None);
    assert_eq!(models.status, 200);
    assert_eq!(models.header("content-type"), Some("application/json"));
    let list = models.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], server.model_id());
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["max_model_len"], CONTEXT);
    let one = http(
        addr,
        "GET",
        &format!("/v1/models/{}", server.model_id()),
        None,
    );
    assert_eq!(one.status, 200);

    let user = json!([{"role": "user", "content": "Hi"}]);
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "POST",
            "/v1/chat/completions",
            "{not json".into(),
            400,
            "not valid JSON",
        ),
        ("POST", "/v1/chat/completions", String::new(), 400, "empty"),
        (
            "POST",
            "/v1/chat/completions",
            "[1, 2]".into(),
            400,
            "JSON object",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"model": "x"}).to_string(),
            400,
            "`messages` is required",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": "Hi"}).to_string(),
            400,
            "must be a list",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": [{"content": "Hi"}]}).to_string(),
            400,
            "role",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": user, "temperature": "warm"}).to_string(),
            400,
            "`temperature` must be a number",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": "lots"}).to_string(),
            400,
            "`max_tokens` must be an integer",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": user, "stream": "yes"}).to_string(),
            400,
            "`stream`",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": user, "top_p": 0}).to_string(),
            400,
            "top-p",
        ),
        (
            "POST",
            "/v1/chat/completions",
            json!({"messages": user, "n": 17}).to_string(),
            400,
            "`n` must be 1 to 16",
        ),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": 42}).to_string(),
            400,
            "`prompt`",
        ),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": "word ".repeat(2000)}).to_string(),
            400,
            "context",
        ),
        (
            "GET",
            "/v1/chat/completions",
            String::new(),
            405,
            "use POST",
        ),
        ("GET", "/v1/nothing", String::new(), 404, "no route"),
        ("POST", "/v2/chat", "{}".into(), 404, "no route"),
        (
            "GET",
            "/v1/models/someone-else",
            String::new(),
            404,
            "no model",
        ),
    ];
    for (method, path, body, status, words) in cases {
        let reply = http(addr, method, path, Some(&body));
        assert_eq!(
            reply.status, status,
            "{method} {path} {body}: {}",
            reply.body
        );
        let error = reply.json();
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(words),
            "{method} {path} {body}: {message:?} should say {words:?}"
        );
        assert!(error["error"]["type"].is_string(), "{error}");
    }
    // Still serving, generation included.
    assert_eq!(http(addr, "GET", "/v1/models", None).status, 200);
    let reply = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0.7, "seed": 3, "stop": ["\n\n"], "top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["object"], "text_completion");
    assert!(
        answer["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n <= 4)
    );
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_studio_binary_serves_a_streaming_chat_on_a_free_port() {
    let dir = model_dir();
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_studio"))
            .args([
                "serve",
                "--port",
                "0",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--model",
            ])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run studio serve"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("studio-serve-stdout".into())
        .spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        })
        .expect("spawn reader");
    let line = rx
        .recv_timeout(Duration::from_mins(1))
        .expect("the address line within a minute");
    assert!(line.starts_with("Studio is serving "), "{line:?}");
    let url = line
        .trim()
        .rsplit(" at ")
        .next()
        .expect("address")
        .to_owned();
    let host_port = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/v1"))
        .unwrap_or_else(|| panic!("{url:?}"));
    let addr: SocketAddr = host_port.parse().expect("socket address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let reply = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "max_tokens": 12
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = events_of(&reply.body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty(), "{events:?}");
    let finishes: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes.len(), 1, "{events:?}");
    assert!(matches!(finishes[0], "stop" | "length"));
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert!(
        usage["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=12).contains(&n))
    );
}

// ---- hostile clients ----------------------------------------------------------------------------

fn start_with(dir: &Path, options: &ServeOptions) -> Server {
    let model = loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load");
    Server::start(ServedModel::owned(model), options).expect("serve on loopback")
}

/// Sends raw bytes and reads the reply's status line (0 when the server closed without one).
fn raw_status(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// `GET /v1/models` answers, and quickly.
fn assert_models_answer(addr: SocketAddr, within: Duration) {
    let asked = Instant::now();
    let reply = http(addr, "GET", "/v1/models", None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        asked.elapsed() < within,
        "/v1/models took {:?}",
        asked.elapsed()
    );
}

#[test]
fn absurd_sizes_get_4xx_without_allocating_and_the_server_goes_on() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    for length in [
        "1000000000000000",
        "18446744073709551615",
        "99999999999999999999999",
    ] {
        for _ in 0..4 {
            let (status, text) = raw_status(
                addr,
                format!(
                    "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {length}\r\n\r\n{{"
                )
                .as_bytes(),
            );
            // 413 from Studio, or 400/431 from hyper's parser for lengths it can't represent.
            assert!(
                matches!(status, 400 | 413 | 431),
                "Content-Length {length}: {text}"
            );
        }
    }
    // A chunked body over the limit is refused while it is read.
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .expect("head");
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0;
    for _ in 0..20 {
        if write!(s, "{:x}\r\n", chunk.len()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
        sent += 1;
    }
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "after {sent} MiB: {text}");
    // A 1 MiB header line gets 431.
    let (status, text) = raw_status(
        addr,
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1 << 20)
        )
        .as_bytes(),
    );
    assert_eq!(status, 431, "{text}");
    assert_models_answer(addr, Duration::from_secs(5));
}

#[test]
fn slow_and_stalled_clients_time_out_and_never_hold_up_the_model_list() {
    let dir = model_dir();
    let server = start_with_timeouts(dir.path(), Duration::from_secs(1));
    let addr = server.addr();
    // Four POSTs that stop partway through the body, and four heads that never end.
    let mut stalled = Vec::new();
    for i in 0..8 {
        let mut s = TcpStream::connect(addr).expect("connect");
        if i % 2 == 0 {
            write!(
                s,
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100\r\n\r\n{{\"prompt\""
            )
            .expect("send");
        } else {
            write!(s, "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").expect("send");
        }
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stalled.push((i, s));
    }
    assert_models_answer(addr, Duration::from_millis(500));
    for (i, mut s) in stalled {
        let mut raw = Vec::new();
        let read = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        if i % 2 == 0 {
            assert!(
                text.starts_with("HTTP/1.1 408"),
                "stalled body: {text} {read:?}"
            );
            assert!(text.contains("did not arrive"), "{text}");
        } else {
            // hyper closes a head that times out (with 408 or without an answer).
            assert!(
                read.is_ok() && (raw.is_empty() || text.starts_with("HTTP/1.1 408")),
                "stalled head: {text:?} {read:?}"
            );
        }
    }
    assert_models_answer(addr, Duration::from_secs(5));
}

#[test]
fn connections_over_the_cap_get_503_and_are_served_again_once_others_close() {
    let dir = model_dir();
    let server = start_with(
        dir.path(),
        &ServeOptions {
            limits: Limits {
                max_connections: 3,
                ..Limits::default()
            },
            ..loopback()
        },
    );
    let addr = server.addr();
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let busy = http(addr, "GET", "/v1/models", None);
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(busy.body.contains("connections open"), "{}", busy.body);
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = http(addr, "GET", "/v1/models", None);
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", reply.body);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_leaves_a_non_streaming_request_cancels_its_generation() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    let body = json!({"prompt": "Once upon a time", "max_tokens": CONTEXT - 64}).to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.disconnects() == 0 {
        assert!(
            Instant::now() < deadline,
            "the generation went on after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The model is free again.
    let started = Instant::now();
    let reply = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A raw HTTP/1.1 exchange (`Connection: close`) with these header lines (`Host` included),
/// chunked bodies decoded.
fn request_with(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_mins(1)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\n{headers}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let payload = &raw[split + 4..];
    let payload = if chunked {
        dechunk(payload)
    } else {
        payload.to_vec()
    };
    Reply {
        status,
        headers,
        body: String::from_utf8(payload).expect("utf-8 body"),
    }
}

/// A server with these header and body timeouts.
fn start_with_timeouts(dir: &Path, timeout: Duration) -> Server {
    start_with(
        dir,
        &ServeOptions {
            limits: Limits {
                header_timeout: timeout,
                body_timeout: timeout,
                ..Limits::default()
            },
            ..loopback()
        },
    )
}

#[test]
fn api_key_host_and_origin_are_checked() {
    let dir = model_dir();
    let server = start_with(
        dir.path(),
        &ServeOptions {
            api_key: Some("s3cret".into()),
            allow_hosts: vec!["studio.lan".into()],
            cors_origin: Some("https://app.example".into()),
            ..loopback()
        },
    );
    let addr = server.addr();
    let port = addr.port();
    let key = "Authorization: Bearer s3cret\r\n";
    let host = format!("Host: {addr}\r\n");
    let get = |headers: &str| request_with(addr, "GET", "/v1/models", headers, "");
    // The key.
    let reply = get(&host);
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert!(
        reply.body.contains("Authorization: Bearer"),
        "{}",
        reply.body
    );
    assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
    let reply = get(&format!("{host}Authorization: Bearer wrong\r\n"));
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(get(&format!("{host}{key}")).status, 200);
    assert_eq!(
        request_with(addr, "GET", "/health", &host, "").status,
        200,
        "health needs no key"
    );
    let chat =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).to_string();
    assert_eq!(
        request_with(addr, "POST", "/v1/chat/completions", &host, &chat).status,
        401
    );
    assert_eq!(
        request_with(
            addr,
            "POST",
            "/v1/chat/completions",
            &format!("{host}{key}"),
            &chat
        )
        .status,
        200
    );
    // The Host.
    for (name, status) in [
        (format!("localhost:{port}"), 200),
        (format!("LOCALHOST:{port}"), 200),
        (format!("studio.lan:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("evil.example:{port}"), 403),
        ("evil.example".to_owned(), 403),
        (format!("localhost.evil.example:{port}"), 403),
    ] {
        let reply = get(&format!("Host: {name}\r\n{key}"));
        assert_eq!(reply.status, status, "Host: {name}: {}", reply.body);
        if status == 403 {
            assert!(reply.body.contains("--allow-host"), "{}", reply.body);
        }
    }
    let (status, text) = raw_status(addr, b"GET /v1/models HTTP/1.0\r\n\r\n");
    assert_eq!(status, 400, "no Host: {text}");
    // The Origin.
    let reply = get(&format!("{host}{key}Origin: https://evil.example\r\n"));
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.header("access-control-allow-origin").is_none());
    let reply = request_with(
        addr,
        "POST",
        "/v1/chat/completions",
        &format!("{host}Origin: https://evil.example\r\n"),
        &chat,
    );
    assert_eq!(reply.status, 403, "a page can't make the model generate");
    let reply = get(&format!("{host}{key}Origin: https://app.example\r\n"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let preflight = request_with(
        addr,
        "OPTIONS",
        "/v1/chat/completions",
        &format!(
            "{host}Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n"
        ),
        "",
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        preflight
            .header("access-control-allow-headers")
            .is_some_and(|h| h.contains("Authorization"))
    );
    // Without --cors-origin no CORS header is ever sent.
    drop(server);
    let server = start(dir.path());
    let addr = server.addr();
    let reply = request_with(
        addr,
        "GET",
        "/v1/models",
        &format!("Host: {addr}\r\nOrigin: http://localhost:3000\r\n"),
        "",
    );
    assert_eq!(reply.status, 403);
    assert!(
        reply
            .headers
            .iter()
            .all(|(k, _)| !k.to_ascii_lowercase().starts_with("access-control"))
    );
}

/// Concurrent streams, slow clients and clients that leave, while `/v1/models` is polled
/// throughout: every poll answers 200 within a second, every stream that stays ends with
/// `[DONE]`, and every one that leaves is counted as a disconnect.
#[test]
fn under_load_the_model_list_keeps_answering() {
    let dir = model_dir();
    let server = start_with_timeouts(dir.path(), Duration::from_secs(2));
    let addr = server.addr();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = done.clone();
        studio_tests::spawn_named("poller", move || {
            let mut polls = 0;
            let mut slowest = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let reply = http(addr, "GET", "/v1/models", None);
                assert_eq!(reply.status, 200, "{}", reply.body);
                slowest = slowest.max(asked.elapsed());
                polls += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (polls, slowest)
        })
    };
    let stream_body = |tokens: usize| {
        json!({"messages": [{"role": "user", "content": "Tell me a story"}],
               "max_tokens": tokens, "stream": true})
        .to_string()
    };
    let mut clients = Vec::new();
    for i in 0..9 {
        let body = stream_body(if i % 3 == 2 { 2000 } else { 48 });
        clients.push(studio_tests::spawn_named(
            "load-client",
            move || -> &'static str {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_mins(2)))
                    .expect("timeout");
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if i % 3 == 1 {
                    // A slow client: the request trickles in.
                    for piece in head.as_bytes().chunks(16).chain(body.as_bytes().chunks(16)) {
                        s.write_all(piece).expect("send");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                } else {
                    s.write_all(head.as_bytes()).expect("send");
                    s.write_all(body.as_bytes()).expect("send");
                }
                let mut reader = BufReader::new(s);
                if i % 3 == 2 {
                    // Leaves after the first event.
                    let mut line = String::new();
                    while reader.read_line(&mut line).expect("read") > 0 && !line.contains("data:")
                    {
                        line.clear();
                    }
                    return "left";
                }
                let mut all = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    all.push_str(&line);
                    if line.contains("[DONE]") {
                        return "done";
                    }
                    line.clear();
                }
                panic!("stream {i} ended without [DONE]: {all}");
            },
        ));
    }
    let outcomes: Vec<&str> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    // The generations of the clients that left stop at their next token.
    let deadline = Instant::now() + Duration::from_mins(1);
    while server.disconnects() < 3 {
        assert!(
            Instant::now() < deadline,
            "{} disconnects",
            server.disconnects()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (polls, slowest) = poller.join().expect("poller");
    assert_eq!(outcomes.iter().filter(|o| **o == "done").count(), 6);
    assert!(polls > 5, "{polls} polls");
    assert!(slowest < Duration::from_secs(1), "slowest poll {slowest:?}");
}

#[test]
fn a_4001_message_chat_is_fitted_to_the_context() {
    let dir = model_dir();
    let server = start(dir.path());
    let messages: Vec<Value> = (0..4001)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("message number {i}")})
        })
        .collect();
    let reply = post(
        server.addr(),
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let prompt_tokens = reply.json()["usage"]["prompt_tokens"]
        .as_u64()
        .expect("usage");
    assert!(prompt_tokens as usize <= CONTEXT, "{prompt_tokens}");
}

/// A huge prompt is tokenized outside the model: a small request sent after it is answered
/// first (before, tokenizing 15 MB held the model for 9.6 s).
#[test]
fn a_huge_prompt_does_not_hold_up_the_model_while_it_is_tokenized() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    let big = json!({"prompt": "lorem ipsum dolor sit amet ".repeat(80_000), "max_tokens": 1});
    let big = studio_tests::spawn_named("big-prompt", move || {
        let reply = post(addr, "/v1/completions", &big);
        (reply.status, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(100));
    let small = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    );
    let small_done = Instant::now();
    assert_eq!(small.status, 200, "{}", small.body);
    let (status, big_done) = big.join().expect("big");
    assert_eq!(status, 400, "far beyond the context");
    assert!(
        small_done < big_done,
        "the small request waited for the big one's tokenizing"
    );
}

/// A non-streaming chat with `body`'s fields added to a short greedy request.
fn chat(addr: SocketAddr, extra: &Value) -> Reply {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 6,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    post(addr, "/v1/chat/completions", &body)
}

fn content(reply: &Reply, index: usize) -> String {
    let v = reply.json();
    v["choices"][index]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {v}"))
        .to_owned()
}

/// The sampling fields OpenAI clients send, in their wire format: `n`, `seed`, `logprobs` /
/// `top_logprobs` (chat and legacy completions, streamed too), presence and frequency
/// penalties, `logit_bias`; and the fields Studio does not do yet are refused with a 400
/// naming them, never accepted and ignored.
#[test]
fn sampling_fields_are_honoured_or_refused_by_name() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();

    // n: three choices, each its own seed; the usage counts the prompt once.
    let three = chat(addr, &json!({"n": 3, "temperature": 1.5, "seed": 5}));
    assert_eq!(three.status, 200, "{}", three.body);
    let v = three.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(v["usage"]["completion_tokens"], 18);
    let single = chat(addr, &json!({"temperature": 0}));
    assert_eq!(
        v["usage"]["prompt_tokens"],
        single.json()["usage"]["prompt_tokens"]
    );
    let texts: Vec<String> = (0..3).map(|i| content(&three, i)).collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    // seed: the same seed gives the same text; choice 1 of seed 5 is choice 0 of seed 6.
    let again = chat(addr, &json!({"temperature": 1.5, "seed": 5}));
    assert_eq!(content(&again, 0), texts[0]);
    let next = chat(addr, &json!({"temperature": 1.5, "seed": 6}));
    assert_eq!(content(&next, 0), texts[1]);

    // logprobs: one entry per token, the chosen (greedy) one the most likely.
    let lp = chat(addr, &json!({"logprobs": true, "top_logprobs": 3}));
    assert_eq!(lp.status, 200, "{}", lp.body);
    let v = lp.json();
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content logprobs");
    assert_eq!(entries.len(), 6);
    let mut joined = Vec::new();
    for e in entries {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        let lp = e["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0);
        assert!((lp - top[0]["logprob"].as_f64().expect("top lp")).abs() < 1e-6);
        assert_eq!(e["token"], top[0]["token"], "greedy takes the best");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        joined.extend(
            e["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| u8::try_from(b.as_u64().expect("byte")).expect("u8")),
        );
    }
    // The tiny model's tokens are often bytes of no whole character: compared as the reply's
    // text is made of them.
    assert_eq!(String::from_utf8_lossy(&joined), content(&lp, 0));
    // Without logprobs, none.
    assert!(single.json()["choices"][0]["logprobs"].is_null());

    // The legacy endpoint's shape.
    let legacy = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Once", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(legacy.status, 200, "{}", legacy.body);
    let l = &legacy.json()["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(l[key].as_array().map(Vec::len), Some(4), "{key}: {l}");
    }
    assert_eq!(l["text_offset"][0], 0);
    assert!(
        l["top_logprobs"][0]
            .as_object()
            .is_some_and(|o| !o.is_empty() && o.len() <= 2)
    );

    // Streamed, n = 2 with logprobs: each choice's chunks carry its index and log-probabilities.
    let streamed = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Say something"}],
            "max_tokens": 4, "temperature": 1.0, "seed": 9, "n": 2, "stream": true,
            "logprobs": true, "stream_options": {"include_usage": true},
        }),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let events = events_of(&streamed.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let mut tokens = [0usize; 2];
    let mut finished = [false; 2];
    for c in &chunks {
        let Some(choice) = c["choices"].get(0) else {
            assert_eq!(c["usage"]["completion_tokens"], 8, "{c}");
            continue;
        };
        let i = choice["index"].as_u64().expect("index") as usize;
        if let Some(list) = choice["logprobs"]["content"].as_array() {
            tokens[i] += list.len();
        }
        finished[i] |= choice["finish_reason"] == "length";
    }
    assert_eq!(tokens, [4, 4], "every token's log-probability, once");
    assert_eq!(finished, [true, true]);

    // logit_bias: +100 on one token makes every greedy token that one; penalties change a
    // greedy reply.
    let biased = chat(addr, &json!({"logit_bias": {"200": 100}, "logprobs": true}));
    assert_eq!(biased.status, 200, "{}", biased.body);
    let v = biased.json();
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .clone();
    assert!(
        entries.iter().all(|e| e["bytes"] == entries[0]["bytes"]),
        "{v}"
    );
    // Compared token by token (the tiny model's text is mostly U+FFFD).
    let tokens_of = |r: &Reply| -> Vec<Value> {
        r.json()["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|e| e["bytes"].clone())
            .collect()
    };
    let plain = tokens_of(&lp);
    assert_ne!(tokens_of(&biased), plain);
    // The greedy reply repeats no token, so negative penalties show: they reward repeats.
    let penalised = chat(
        addr,
        &json!({"frequency_penalty": -2.0, "presence_penalty": -2.0, "logprobs": true}),
    );
    assert_eq!(penalised.status, 200, "{}", penalised.body);
    let penalised = tokens_of(&penalised);
    let distinct = |t: &[Value]| t.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct(&penalised) < distinct(&plain),
        "{penalised:?} {plain:?}"
    );

    // Refused by name: fields Studio does not do yet, and values out of range.
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for (extra, param) in [
        (json!({"tools": tool}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"n": 0}), "n"),
    ] {
        let r = chat(addr, &extra);
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{extra}: {}", r.body);
    }
    // Their "off" values are fine.
    for extra in [
        json!({"tools": []}),
        json!({"tool_choice": "none"}),
        json!({"response_format": {"type": "text"}}),
        json!({"logprobs": false}),
    ] {
        let r = chat(addr, &extra);
        assert_eq!(r.status, 200, "{extra}: {}", r.body);
    }
}

/// The model in `dir`, with the sentence-embedding fixture `minilm-mean` at /v1/embeddings.
fn start_with_embeddings(dir: &Path) -> Server {
    let llm = loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load");
    let embedder =
        studio_inference::embed::load(&sentence_model("minilm-mean"), &Device::Cpu).expect("st");
    Server::start(
        ServedModel::owned(llm).with_embeddings(embedder),
        &loopback(),
    )
    .expect("serve")
}

fn sentence_model(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sentence_embeddings")
        .join(name)
}

/// `POST /v1/embeddings` as OpenAI clients call it: a string, a list of strings or token ids,
/// float or base64, with usage; the answers are sentence-transformers' embeddings (the
/// fixture's); inputs over the model's length, a foreign `dimensions` and a server without an
/// embedding model get errors that say so.
#[test]
fn embeddings_are_served_as_openai_clients_ask() {
    let dir = model_dir();
    let server = start_with_embeddings(dir.path());
    let addr = server.addr();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(sentence_model("expected.json")).expect("read"),
    )
    .expect("json");
    let texts = expected["texts"].as_array().expect("texts").clone();
    let vector = |v: &Value| -> Vec<f64> {
        v.as_array()
            .expect("vector")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);

    let one = post(
        addr,
        "/v1/embeddings",
        &json!({"model": "minilm-mean", "input": texts[0]}),
    );
    assert_eq!(one.status, 200, "{}", one.body);
    let v = one.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "minilm-mean");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let first = vector(&v["data"][0]["embedding"]);
    assert!(close(&first, &vector(&expected["minilm-mean"][0])), "{v}");
    let tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(tokens > 2);
    assert_eq!(v["usage"]["total_tokens"], tokens);

    // A batch, in order; and base64 (little-endian f32) gives the same numbers.
    let batch = post(
        addr,
        "/v1/embeddings",
        &json!({"input": texts, "encoding_format": "base64"}),
    );
    assert_eq!(batch.status, 200, "{}", batch.body);
    let v = batch.json();
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len());
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        let b64 = item["embedding"].as_str().expect("base64 string");
        let bytes = base64_decode(b64);
        let floats: Vec<f64> = bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        assert!(close(&floats, &vector(&expected["minilm-mean"][i])), "{i}");
    }

    // Token ids give what their text gives.
    let ids = studio_inference::embed::load(&sentence_model("minilm-mean"), &Device::Cpu)
        .expect("st")
        .tokenize(texts[2].as_str().expect("text"))
        .expect("tokens");
    let by_ids = post(addr, "/v1/embeddings", &json!({"input": [ids]}));
    assert_eq!(by_ids.status, 200, "{}", by_ids.body);
    assert!(close(
        &vector(&by_ids.json()["data"][0]["embedding"]),
        &vector(&expected["minilm-mean"][2])
    ));

    // The model list names it.
    let models = http(addr, "GET", "/v1/models", None).json();
    assert!(
        models["data"]
            .as_array()
            .expect("list")
            .iter()
            .any(|m| m["id"] == "minilm-mean" && m["dimensions"] == 32),
        "{models}"
    );

    // Refused, with the reason.
    let long = "cat ".repeat(100);
    for (body, param, words) in [
        (json!({"input": long}), "input", "102 tokens"),
        (json!({"input": ["ok", ""]}), "input", "input[1] is empty"),
        (
            json!({"input": texts[0], "dimensions": 8}),
            "dimensions",
            "32-dimensional",
        ),
        (
            json!({"input": texts[0], "encoding_format": "hex"}),
            "encoding_format",
            "base64",
        ),
        (json!({"input": 5}), "input", "`input` must be"),
        (json!({}), "input", "required"),
    ] {
        let r = post(addr, "/v1/embeddings", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{body}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{body}: {message}");
    }
    drop(server);

    // A server without an embedding model, whose chat model gives no hidden states (a Llama
    // folder on candle's model), says how to give it one.
    let llama = tempfile::tempdir().expect("tmp");
    studio_tests::families::write_family(llama.path(), "llama", 11);
    let server = start(llama.path());
    let r = post(server.addr(), "/v1/embeddings", &json!({"input": "hi"}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("--embedding-model"), "{}", r.body);
    drop(server);

    // A Qwen2 folder embeds by itself: unit vectors from its hidden states.
    let server = start(dir.path());
    let r = post(server.addr(), "/v1/embeddings", &json!({"input": "hi"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = vector(&r.json()["data"][0]["embedding"]);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    drop(server);

    // A GGUF chat model on Studio's kernels embeds by itself: its hidden states, mean-pooled,
    // length 1; the same text the same vector, another text another.
    let gguf_dir = tempfile::tempdir().expect("tmp");
    studio_tests::families::write_family_with(
        gguf_dir.path(),
        "qwen2",
        &json!({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2}),
        3,
    );
    let gguf = gguf_dir.path().join("model.gguf");
    studio_tests::gguf_writer::convert(
        gguf_dir.path(),
        &gguf,
        &studio_tests::gguf_writer::GgufOptions::with_dtype(
            candle_core::quantized::GgmlDType::Q8_0,
        ),
    );
    let server = start(&gguf);
    let r = post(
        server.addr(),
        "/v1/embeddings",
        &json!({"input": ["the same text", "the same text", "another one"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let rows: Vec<Vec<f64>> = (0..3).map(|i| vector(&v["data"][i]["embedding"])).collect();
    assert_eq!(rows[0].len(), 256);
    let norm: f64 = rows[0].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_eq!(rows[0], rows[1]);
    assert_ne!(rows[0], rows[2]);
    assert_eq!(v["model"], server.model_id());
    let long = post(
        server.addr(),
        "/v1/embeddings",
        &json!({"input": "word ".repeat(5000)}),
    );
    assert_eq!(long.status, 400, "{}", long.body);
    assert!(long.body.contains("tokens"), "{}", long.body);
}

/// Standard base64 (the test's own decoder, to check the server's encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = alphabet.iter().position(|&a| a == c).expect("base64 char") as u32;
        bits = (bits << 6) | v;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

/// Structured output as OpenAI clients ask for it: `response_format` `json_schema` (every seed
/// of the random model gives JSON that fits), `json_object`, llama.cpp's GBNF `grammar`, streamed
/// too; schemas with keywords Studio would not enforce, bad grammars and two asks at once are
/// 400s that say which.
#[test]
fn structured_output_is_enforced_while_sampling() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "rain": {"type": "boolean"},
            "mm": {"type": "integer"}
        },
        "required": ["city", "rain"],
        "additionalProperties": false
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "weather", "strict": true, "schema": schema}});
    for seed in 0..4 {
        let r = chat(
            addr,
            &json!({"response_format": format, "temperature": 1.0, "seed": seed, "max_tokens": 300}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = content(&r, 0);
        let answer: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        let o = answer.as_object().expect("object");
        assert!(
            o["city"].as_str().is_some_and(|c| c.chars().count() <= 8),
            "{answer}"
        );
        assert!(o["rain"].is_boolean(), "{answer}");
        assert!(
            o.keys()
                .all(|k| ["city", "rain", "mm"].contains(&k.as_str())),
            "{answer}"
        );
    }

    // Streamed: the deltas add up to an answer that fits.
    let streamed = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Weather?"}],
            "response_format": format, "temperature": 1.0, "seed": 7, "max_tokens": 300,
            "stream": true,
        }),
    );
    let text: String = events_of(&streamed.body)
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(answer["rain"].is_boolean(), "{answer}");

    // A GBNF grammar, as llama.cpp's server takes it.
    let yes_no = chat(
        addr,
        &json!({"grammar": "root ::= (\"yes\" | \"no\") \"!\"", "temperature": 1.0}),
    );
    assert_eq!(yes_no.status, 200, "{}", yes_no.body);
    assert!(
        ["yes!", "no!"].contains(&content(&yes_no, 0).as_str()),
        "{}",
        yes_no.body
    );

    // json_object: the reply opens an object (the budget may end it before it closes).
    let object = chat(
        addr,
        &json!({"response_format": {"type": "json_object"}, "max_tokens": 8}),
    );
    assert_eq!(object.status, 200, "{}", object.body);
    assert!(
        content(&object, 0).trim_start().starts_with('{'),
        "{}",
        object.body
    );

    // Refused, saying which.
    for (extra, param, words) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a"}}}}),
            "response_format",
            "`pattern`",
        ),
        (
            json!({"grammar": "root ::= missing"}),
            "grammar",
            "`missing`",
        ),
        (
            json!({"grammar": "root ::= root \"a\""}),
            "grammar",
            "left-recursive",
        ),
        (
            json!({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}),
            "grammar",
            "not `response_format` and `grammar`",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "json_schema",
        ),
    ] {
        let r = chat(addr, &extra);
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{extra}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{extra}: {message}");
    }
}

/// The tiny model of [`model_dir`] with Qwen2.5's own chat template (it has a tool section).
fn tool_model_dir() -> tempfile::TempDir {
    model_dir_with_template("qwen2.5-instruct.jinja")
}

/// The tiny model of [`model_dir`] with the chat template fixture `name`.
fn model_dir_with_template(name: &str) -> tempfile::TempDir {
    let dir = model_dir();
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/templates")
            .join(name),
    )
    .expect("template");
    let config = json!({"chat_template": template, "eos_token": "<|im_end|>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    dir
}

/// A large batch of embeddings on the chat model stops when its client leaves: the model is
/// free again for the next request long before the batch would have ended.
#[test]
fn a_client_that_leaves_an_embeddings_batch_frees_the_model() {
    let dir = model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    // Many short inputs (960,000 tokens in all): the batch would run far past the deadline
    // below, while each input is quick, so the check between inputs comes soon even on a slow
    // or busy machine.
    let one: Vec<u32> = (0..480).map(|i| 10 + i % 50).collect();
    // How long the server takes to read and check a body this size, here and now (the same
    // inputs with the last one empty are refused once all are read), so the client below
    // leaves once the batch is running, not while its body is still being read.
    let mut refused = vec![one.clone(); 1999];
    refused.push(Vec::new());
    let timer = Instant::now();
    let r = post(addr, "/v1/embeddings", &json!({ "input": refused }));
    assert_eq!(r.status, 400, "{}", r.body);
    let reading = timer.elapsed();
    let body = json!({"input": vec![one; 2000]}).to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    std::thread::sleep(reading * 2 + Duration::from_millis(500));
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.disconnects() == 0 {
        assert!(
            Instant::now() < deadline,
            "the batch went on after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let r = post(addr, "/v1/embeddings", &json!({"input": "hi"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Templates that take tools their own way (Phi-4-mini on the system message, Gemma 4 with
/// results as `tool_responses`) serve tool calls as the others do: the tools reach the prompt,
/// a required call comes back as `tool_calls`, and its result goes back in. Tools a template
/// cannot render (Gemma 4's wants a `type` for every parameter) are a 400 about `tools`,
/// never dropped for the plain transcript.
#[test]
fn phi4_mini_and_gemma4_templates_serve_tool_calls() {
    let dir = model_dir_with_template("gemma-4.jinja");
    let server = start(dir.path());
    let r = post(
        server.addr(),
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Weather?"}], "tools": weather_tools()}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "tools", "{}", r.body);
    assert!(r.body.contains("could not render"), "{}", r.body);
    drop(server);
    for template in ["phi-4-mini-instruct.jinja", "gemma-4.jinja"] {
        let dir = model_dir_with_template(template);
        let server = start(dir.path());
        let addr = server.addr();
        let user = json!({"role": "user", "content": "Weather in Paris?"});
        let ask = |messages: Value, extra: Value| {
            let mut body = json!({"messages": messages, "max_tokens": 120, "seed": 1,
                "temperature": 1.0, "tools": typed_weather_tools()});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            post(addr, "/v1/chat/completions", &body)
        };
        let plain = chat(addr, &json!({"max_tokens": 2}));
        let auto = ask(json!([user]), json!({"max_tokens": 2}));
        assert_eq!(auto.status, 200, "{template}: {}", auto.body);
        let tokens = |r: &Reply| r.json()["usage"]["prompt_tokens"].as_u64().expect("usage");
        assert!(
            tokens(&auto) > tokens(&plain) + 20,
            "{template}: the tools were rendered: {} then {}",
            plain.body,
            auto.body
        );
        let r = ask(json!([user]), json!({"tool_choice": "required"}));
        assert_eq!(r.status, 200, "{template}: {}", r.body);
        let v = r.json();
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{template}: {v}"
        );
        let call = v["choices"][0]["message"]["tool_calls"][0].clone();
        let back = ask(
            json!([user, {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
                {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 18}"}]),
            json!({"max_tokens": 2}),
        );
        assert_eq!(back.status, 200, "{template}: {}", back.body);
        assert!(
            tokens(&back) > tokens(&auto),
            "{template}: the call and result went back in"
        );
        drop(server);
    }
}

/// [`weather_tools`] with a `type` for every parameter, as Gemma 4's template needs.
fn typed_weather_tools() -> Value {
    let mut tools = weather_tools();
    tools[0]["function"]["parameters"]["properties"]["unit"]["type"] = json!("string");
    tools
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "The time now.",
            "parameters": {"type": "object", "properties": {}}}}
    ])
}

/// Tool calling as OpenAI clients use it, on a model whose template has a tool section
/// (Qwen2.5's): the tools reach the prompt; `required` and a named function keep the reply to
/// a call (`finish_reason: "tool_calls"`, arguments that fit the schema), streamed as argument
/// deltas; a call the model writes in its own syntax (`<tool_call>`) is read back; tool
/// results go back in as `role: "tool"`; a model without a tool section and bad tools get 400s.
#[test]
fn tools_are_called_and_their_results_passed_back() {
    let dir = tool_model_dir();
    let server = start(dir.path());
    let addr = server.addr();
    let tools = weather_tools();
    let ask = |extra: Value| {
        let mut body = json!({
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": 200, "temperature": 1.0, "seed": 3, "tools": tools,
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        post(addr, "/v1/chat/completions", &body)
    };
    // The tools are in the prompt.
    let plain = chat(addr, &json!({"max_tokens": 2}));
    let auto = ask(json!({"max_tokens": 2}));
    assert_eq!(auto.status, 200, "{}", auto.body);
    assert!(
        auto.json()["usage"]["prompt_tokens"].as_u64()
            > plain.json()["usage"]["prompt_tokens"].as_u64(),
        "the tools were rendered"
    );

    // Required: a call of one of the tools, whose arguments fit its schema.
    for seed in 0..3 {
        let r = ask(json!({"tool_choice": "required", "seed": seed}));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert!(choice["message"]["content"].is_null(), "{v}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(
            call["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_"))
        );
        let name = call["function"]["name"].as_str().expect("name");
        let args: Value = serde_json::from_str(
            call["function"]["arguments"]
                .as_str()
                .expect("arguments string"),
        )
        .expect("arguments JSON");
        match name {
            "get_weather" => assert!(
                args["city"]
                    .as_str()
                    .is_some_and(|c| c.chars().count() <= 10),
                "{args}"
            ),
            "get_time" => assert!(
                args.as_object().is_some_and(serde_json::Map::is_empty),
                "{args}"
            ),
            other => panic!("{other}"),
        }
    }
    // Named.
    let named = ask(json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}));
    assert_eq!(
        named.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_time",
        "{}",
        named.body
    );

    // Streamed: the id and name first, then the arguments in pieces.
    let streamed = ask(
        json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": true}),
    );
    let chunks: Vec<Value> = events_of(&streamed.body)
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert!(deltas.len() >= 2, "{}", streamed.body);
    assert_eq!(deltas[0][0]["function"]["name"], "get_weather");
    assert!(deltas[0][0]["id"].is_string());
    let args: String = deltas
        .iter()
        .filter_map(|d| d[0]["function"]["arguments"].as_str())
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args:?}"));
    assert!(args["city"].is_string(), "{args}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    assert!(
        chunks.iter().all(|c| c["choices"][0]["delta"]
            .get("content")
            .is_none_or(|t| t.as_str() == Some(""))),
        "no call text leaks as content"
    );

    // A call the model writes itself in Qwen's syntax (here made to by a grammar) is read
    // back, streamed or not.
    let written = r#"root ::= "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>""#;
    for stream in [false, true] {
        let r = ask(json!({"grammar": written, "stream": stream}));
        assert_eq!(r.status, 200, "{}", r.body);
        if stream {
            let chunks: Vec<Value> = events_of(&r.body)
                .iter()
                .filter(|e| e.as_str() != "[DONE]")
                .map(|e| serde_json::from_str(e).expect("chunk"))
                .collect();
            let content: String = chunks
                .iter()
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert_eq!(
                content, "Checking.\n",
                "the text before the call streams; the call does not"
            );
            assert!(
                chunks
                    .iter()
                    .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
            );
        } else {
            let v = r.json();
            let m = &v["choices"][0]["message"];
            assert_eq!(m["content"], "Checking.", "{v}");
            assert_eq!(
                m["tool_calls"][0]["function"]["arguments"],
                r#"{"city":"Oslo"}"#
            );
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        }
    }

    // The results go back in.
    let back = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}
            ],
            "tools": tools, "max_tokens": 3,
        }),
    );
    assert_eq!(back.status, 200, "{}", back.body);
    assert!(
        back.json()["usage"]["prompt_tokens"].as_u64()
            > auto.json()["usage"]["prompt_tokens"].as_u64()
    );

    // Refused, saying why.
    let no_id = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]}),
    );
    assert_eq!(no_id.status, 400, "{}", no_id.body);
    assert!(no_id.body.contains("tool_call_id"));
    let bad_schema = ask(
        json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}),
    );
    assert_eq!(bad_schema.status, 400);
    assert_eq!(bad_schema.json()["error"]["param"], "tools");
    drop(server);
    let chatml = model_dir();
    let server = start(chatml.path());
    let r = post(
        server.addr(),
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "tools": tools}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no tool section"), "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "tools");
}

/// The requests the official `openai` Python client sent for OpenAI's own examples (tool
/// calling with a required call, the tool's result sent back, a streamed call, a JSON schema,
/// the SDK's Pydantic `parse`, embeddings), recorded by `tools/record_openai_client.py`,
/// replayed byte for byte: each gets an answer of the shape the client reads.
#[test]
fn the_openai_clients_recorded_requests_get_the_answers_it_reads() {
    let dir = tool_model_dir();
    let server = start_with_embeddings(dir.path());
    let addr = server.addr();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openai_client");
    let mut files: Vec<_> = std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for file in files {
        let rec: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        let name = file.display().to_string();
        let (method, path) = (
            rec["method"].as_str().expect("method"),
            rec["path"].as_str().expect("path"),
        );
        // The model the client named is the served one's name when it was recorded.
        let mut body = rec["request"].clone();
        if body.get("model").is_some() && path.ends_with("/chat/completions") {
            body["model"] = json!(server.model_id());
        }
        let reply = if method == "GET" {
            http(addr, "GET", path, None)
        } else {
            post(addr, path, &body)
        };
        assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        let stream = body["stream"] == true;
        if stream {
            let events = events_of(&reply.body);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{name}");
            continue;
        }
        let v = reply.json();
        if path.ends_with("/models") {
            assert_eq!(v["object"], "list", "{name}");
        } else if path.ends_with("/embeddings") {
            assert_eq!(
                v["data"].as_array().map(Vec::len),
                body["input"].as_array().map(Vec::len)
            );
            assert!(
                v["data"][0]["embedding"].is_string(),
                "base64, as the client asked"
            );
        } else {
            let choice = &v["choices"][0];
            if body["tool_choice"].is_string() || body["tool_choice"].is_object() {
                assert_eq!(choice["finish_reason"], "tool_calls", "{name}: {v}");
                let args = choice["message"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .expect("arguments");
                serde_json::from_str::<Value>(args).expect("arguments are JSON");
            }
            if body["response_format"]["type"] == "json_schema" {
                let content = choice["message"]["content"].as_str().expect("content");
                assert_eq!(choice["finish_reason"], "stop", "{name}: {v}");
                serde_json::from_str::<Value>(content)
                    .unwrap_or_else(|e| panic!("{name}: {e}: {content:?}"));
            }
        }
    }
}
