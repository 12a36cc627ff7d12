//! `studio serve` on loopback: Studio's OpenAI-compatible server with a tiny random-weight
//! Qwen2 (ChatML template), used by Studio's own remote backend (the worker's
//! `JobKind::ConnectRemote`), by a minimal raw HTTP client, and as the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use studio_tests::worker_events::{until_streaming, until_terminal as until_terminal_within};

use serde_json::{Value, json};
use studio_app::serve::Server;
use studio_inference::candle_core::Device;
use studio_inference::chat::ChatMessage;
use studio_inference::device::DevicePreference;
use studio_inference::generate::GenerationStats;
use studio_inference::loader::{self, Architecture};
use studio_inference::remote::RemoteConfig;
use studio_inference::sampling::SamplingParams;
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
    let tokenizer =
        studio_inference::text::Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tok");
    let specials: Vec<usize> = std::iter::once(studio_tests::EOS)
        .chain(studio_tests::CHAT_SPECIALS.iter().copied())
        .filter_map(|t| tokenizer.token_to_id(t))
        .map(|id| id as usize)
        .collect();
    let weights = dir.join("model.safetensors");
    let mut tensors =
        studio_inference::candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
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
    let embed = studio_inference::candle_core::Tensor::stack(&rows, 0).expect("stack");
    tensors.insert(name.to_owned(), embed);
    studio_inference::candle_core::safetensors::save(&tensors, &weights).expect("save");
    let tokenizer_config = json!({"chat_template": CHATML, "eos_token": "<|im_end|>"});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .expect("write tokenizer_config");
    tmp
}

fn start(dir: &Path) -> Server {
    let model = loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load");
    Server::start(model, "127.0.0.1", 0).expect("serve on loopback")
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
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_mins(1)))
        .expect("timeout");
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
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
            json!({"messages": user, "n": 2}).to_string(),
            400,
            "n",
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
