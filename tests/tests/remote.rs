//! The worker's remote backend against scripted OpenAI-compatible servers on loopback: what it
//! sends, how it streams, counts and cancels, and the words of every failure (unreachable,
//! timeout, HTTP 401/404/500 with the server's message, malformed events).
//!
//! Each fake server is a `std::net` listener on 127.0.0.1 answering a fixed list of
//! connections, one scripted answer each; it stops by itself after its script or 20 s.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use studio_tests::worker_events::{until_streaming, until_terminal};

use crossbeam_channel::{Receiver, bounded};
use serde_json::{Value, json};
use studio_inference::device::DevicePreference;
use studio_inference::llm::chat::ChatMessage;
use studio_inference::llm::generate::{FinishReason, GenerationStats};
use studio_inference::llm::loader::{Architecture, ModelInfo};
use studio_inference::llm::remote::RemoteConfig;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::{Event, JobKind, LoadOptions, Worker, WorkerConfig};
use studio_tests::{TinyGpt2, write_gpt2_readable};

/// A request as the fake server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }
}

type Answer = Box<dyn FnOnce(&Seen, &mut TcpStream) + Send>;

struct Fake {
    base: String,
    seen: Receiver<Seen>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Seen> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

/// Serves `answers` in order, one per connection, on 127.0.0.1.
fn fake(answers: Vec<Answer>) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, seen) = bounded(16);
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let thread = std::thread::Builder::new()
        .name("fake-openai-server".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut answers = answers.into_iter();
            let mut next = answers.next();
            while next.is_some() && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                stream.set_nonblocking(false).expect("blocking");
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                if let Some(answer) = next.take() {
                    answer(&request, &mut stream);
                }
                let _ = tx.try_send(request);
                next = answers.next();
            }
        })
        .expect("spawn fake server");
    Fake {
        base,
        seen,
        done,
        thread: Some(thread),
    }
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn models(body: Value) -> Answer {
    Box::new(move |_, s| respond(s, "200 OK", "application/json", &body.to_string()))
}

fn standard_models() -> Answer {
    models(json!({"object": "list", "data": [
        {"id": "tiny-chat", "object": "model", "max_model_len": 4096},
        {"id": "other", "object": "model"}
    ]}))
}

/// An event stream of `events` (each written as one `data:` event, flushed, with `gap`
/// between them), closed at the end.
fn sse(events: Vec<String>, gap: Duration) -> Answer {
    Box::new(move |_, s| {
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        );
        for e in events {
            if s.write_all(e.as_bytes()).and_then(|()| s.flush()).is_err() {
                return;
            }
            std::thread::sleep(gap);
        }
    })
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn delta(text: &str) -> String {
    data(&json!({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": null}
    ]}))
}

fn finish(reason: &str) -> String {
    data(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
}

fn worker() -> Worker {
    Worker::spawn(WorkerConfig {
        device: DevicePreference::Cpu,
        ..WorkerConfig::default()
    })
    .expect("worker")
}

fn config(base: &str) -> RemoteConfig {
    RemoteConfig {
        timeout: Duration::from_secs(5),
        ..RemoteConfig::new(base)
    }
}

fn connect(w: &Worker, config: RemoteConfig) -> Vec<Event> {
    let job = w.submit(JobKind::ConnectRemote { config }).expect("submit");
    until_terminal(w, job, Duration::from_secs(15))
}

fn loaded_info(events: &[Event]) -> ModelInfo {
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    events
        .iter()
        .find_map(|e| match e {
            Event::ModelLoaded { info, .. } => Some(info.clone()),
            _ => None,
        })
        .expect("ModelLoaded")
}

fn chat(w: &Worker, params: SamplingParams) -> Vec<Event> {
    let job = w
        .submit(JobKind::Chat {
            system: "Be brief.".into(),
            messages: vec![ChatMessage::user("Hi")],
            params,
        })
        .expect("submit");
    until_terminal(w, job, Duration::from_secs(15))
}

fn text_of(events: &[Event]) -> (String, usize) {
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

fn failure(events: &[Event]) -> String {
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "{events:?}");
    match events.last() {
        Some(Event::Failed { error, .. }) => error.clone(),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn done_stats(events: &[Event]) -> GenerationStats {
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "{events:?}");
    match events.last() {
        Some(Event::Done {
            stats: Some(stats), ..
        }) => stats.clone(),
        other => panic!("expected Done with stats, got {other:?}"),
    }
}

#[test]
fn connects_then_streams_a_chat_reply_with_the_servers_usage() {
    let server = fake(vec![
        standard_models(),
        sse(
            vec![
                data(
                    &json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
                ),
                ": keep-alive\n\n".into(),
                delta("Hel"),
                delta("lo"),
                delta(" there"),
                finish("stop"),
                data(
                    &json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}),
                ),
                "data: [DONE]\n\n".into(),
            ],
            Duration::from_millis(5),
        ),
    ]);
    let w = worker();
    let mut cfg = config(&server.base);
    cfg.api_key = Some("sk-test".into());
    let info = loaded_info(&connect(&w, cfg));
    assert_eq!(info.name, "tiny-chat", "the first listed model");
    assert_eq!(info.architecture, Architecture::Remote);
    assert_eq!(info.architecture.label(), "Remote (OpenAI-compatible)");
    assert_eq!(info.context_length, 4096, "vLLM's max_model_len");
    assert_eq!(info.chat_format, "server's chat template");
    assert_eq!(info.path.to_string_lossy(), format!("{}/v1", server.base));
    let models = server
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("seen");
    assert_eq!(
        (models.method.as_str(), models.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(models.header("authorization"), Some("Bearer sk-test"));

    let mut params = SamplingParams::greedy(32);
    params.stop = vec!["\nUser:".into()];
    let events = chat(&w, params);
    let (text, tokens) = text_of(&events);
    assert_eq!(text, "Hello there");
    assert_eq!(tokens, 3, "one token per delta");
    let stats = done_stats(&events);
    assert_eq!((stats.prompt_tokens, stats.generated_tokens), (7, 3));
    assert_eq!(stats.finish, FinishReason::EndOfText);
    assert!(stats.ttft_ms > 0.0 && stats.decode_tok_s > 0.0, "{stats:?}");

    let request = server
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("seen");
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.header("authorization"), Some("Bearer sk-test"));
    let body = request.json();
    assert_eq!(body["model"], "tiny-chat");
    assert_eq!(body["stream"], true);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["max_tokens"], 32);
    assert_eq!(body["stop"], json!(["\nUser:"]));
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    );
    // Greedy: no top-k / min-p / repeat penalty to send.
    assert!(body.get("top_k").is_none() && body.get("repeat_penalty").is_none());
}

#[test]
fn without_usage_tokens_are_counted_by_chunk_and_generate_uses_completions() {
    let chunk =
        |t: &str| data(&json!({"choices": [{"index": 0, "text": t, "finish_reason": null}]}));
    let server = fake(vec![
        models(json!({"data": [{"id": "m", "meta": {"n_ctx_train": 2048}}]})),
        sse(
            vec![
                chunk("one"),
                chunk(" two"),
                chunk(" three"),
                chunk(" four"),
                data(&json!({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})),
                "data: [DONE]\n\n".into(),
            ],
            Duration::from_millis(5),
        ),
    ]);
    let w = worker();
    let mut cfg = config(&format!("{}/v1/", server.base));
    cfg.model = Some("m".into());
    let info = loaded_info(&connect(&w, cfg));
    assert_eq!(info.context_length, 2048, "llama.cpp's meta.n_ctx_train");
    let job = w
        .submit(JobKind::Generate {
            prompt: "Count:".into(),
            params: SamplingParams {
                top_k: 40,
                min_p: 0.05,
                repeat_penalty: 1.1,
                ..SamplingParams::greedy(4)
            },
        })
        .expect("submit");
    let events = until_terminal(&w, job, Duration::from_secs(15));
    let (text, tokens) = text_of(&events);
    assert_eq!(text, "one two three four");
    assert_eq!(tokens, 4);
    let stats = done_stats(&events);
    assert_eq!(stats.generated_tokens, 4);
    assert_eq!(stats.finish, FinishReason::Length);
    let _models = server
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("seen");
    let request = server
        .seen
        .recv_timeout(Duration::from_secs(5))
        .expect("seen");
    assert_eq!(request.path, "/v1/completions");
    let body = request.json();
    assert_eq!(body["prompt"], "Count:");
    assert_eq!(body["top_k"], 40);
    assert_eq!(body["repeat_penalty"], body["repetition_penalty"]);
    assert!(request.header("authorization").is_none());
}

#[test]
fn a_server_that_ignores_stream_and_answers_json_still_works() {
    let server = fake(vec![
        standard_models(),
        Box::new(|_, s| {
            let body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole reply"}, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 4, "completion_tokens": 2}});
            respond(s, "200 OK", "application/json", &body.to_string());
        }),
    ]);
    let w = worker();
    loaded_info(&connect(&w, config(&server.base)));
    let events = chat(&w, SamplingParams::greedy(8));
    assert_eq!(text_of(&events).0, "Whole reply");
    assert_eq!(done_stats(&events).generated_tokens, 2);
}

#[test]
fn http_errors_carry_the_servers_message() {
    let error = |status: &'static str, message: &'static str| -> Answer {
        Box::new(move |_, s| {
            let body = json!({"error": {"message": message, "type": "x"}});
            respond(s, status, "application/json", &body.to_string());
        })
    };
    let server = fake(vec![
        error("401 Unauthorized", "Invalid API key"),
        standard_models(),
        error("404 Not Found", "The model `tiny-chat` does not exist."),
        error("500 Internal Server Error", "CUDA out of memory"),
        Box::new(|_, s| respond(s, "503 Service Unavailable", "text/plain", "loading model")),
    ]);
    let w = worker();
    let e = failure(&connect(&w, config(&server.base)));
    assert!(
        e.contains("/v1/models")
            && e.contains("HTTP 401")
            && e.contains("Invalid API key")
            && e.contains("API key"),
        "{e}"
    );
    loaded_info(&connect(&w, config(&server.base)));
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(
        e.contains("HTTP 404") && e.contains("does not exist") && e.contains("chat/completions"),
        "{e}"
    );
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(
        e.contains("HTTP 500") && e.contains("CUDA out of memory"),
        "{e}"
    );
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(e.contains("HTTP 503") && e.contains("loading model"), "{e}");
}

#[test]
fn malformed_and_truncated_streams_fail_clearly() {
    let server = fake(vec![
        standard_models(),
        sse(
            vec![delta("ok"), "data: {not json\n\n".into()],
            Duration::ZERO,
        ),
        sse(vec![delta("cut")], Duration::ZERO),
        sse(
            vec![data(
                &json!({"error": {"message": "context length exceeded"}}),
            )],
            Duration::ZERO,
        ),
        Box::new(|_, s| respond(s, "200 OK", "text/html", "<html>web ui</html>")),
        models(json!({"models": []})),
    ]);
    let w = worker();
    loaded_info(&connect(&w, config(&server.base)));
    let events = chat(&w, SamplingParams::greedy(8));
    assert_eq!(
        text_of(&events).0,
        "ok",
        "text before the bad event arrives"
    );
    let e = failure(&events);
    assert!(e.contains("not JSON") && e.contains("{not json"), "{e}");
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(e.contains("ended the stream before"), "{e}");
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(e.contains("context length exceeded"), "{e}");
    let e = failure(&chat(&w, SamplingParams::greedy(8)));
    assert!(
        e.contains("text/html") && e.contains("not an event stream"),
        "{e}"
    );
    let e = failure(&connect(&w, config(&server.base)));
    assert!(e.contains("no `data` list"), "{e}");
}

#[test]
fn nothing_listening_fails_fast_with_connection_refused() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let w = worker();
    let started = Instant::now();
    let e = failure(&connect(&w, config(&format!("http://127.0.0.1:{port}"))));
    assert_eq!(
        e,
        format!("could not reach http://127.0.0.1:{port}/v1/models: connection refused")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = failure(&connect(&w, config("localhost:8080")));
    assert!(e.contains("must start with http://"), "{e}");
    // No backend: chat still says so.
    let e = failure(&chat(&w, SamplingParams::greedy(4)));
    assert!(e.contains("no model is loaded"), "{e}");
}

#[test]
fn a_silent_server_times_out_and_unknown_models_are_named() {
    let hold = Duration::from_millis(1500);
    let server = fake(vec![
        Box::new(move |_, _| std::thread::sleep(hold)), // accepts, never answers
        standard_models(),
        sse(vec![delta("a")], Duration::from_millis(1500)), // stalls after one delta
        standard_models(),
    ]);
    let w = worker();
    let mut cfg = config(&server.base);
    cfg.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let e = failure(&connect(&w, cfg.clone()));
    let took = started.elapsed();
    assert!(
        e.contains("/v1/models") && e.contains("no answer within 0.3 s"),
        "{e}"
    );
    assert!(took < Duration::from_millis(1200), "took {took:?}");
    std::thread::sleep(hold); // let the fake move on to its next answer

    loaded_info(&connect(&w, cfg.clone()));
    let events = chat(&w, SamplingParams::greedy(8));
    assert_eq!(text_of(&events).0, "a");
    let e = failure(&events);
    assert!(e.contains("no answer within 0.3 s"), "{e}");
    std::thread::sleep(hold);

    cfg.model = Some("missing".into());
    let e = failure(&connect(&w, cfg));
    assert!(
        e.contains("no model `missing`") && e.contains("tiny-chat, other"),
        "{e}"
    );
}

#[test]
fn cancel_is_honoured_while_the_server_is_silent() {
    let server = fake(vec![
        standard_models(),
        sse(vec![delta("first"), delta("late")], Duration::from_secs(2)),
    ]);
    let w = worker();
    loaded_info(&connect(&w, config(&server.base)));
    let job = w
        .submit(JobKind::Chat {
            system: String::new(),
            messages: vec![ChatMessage::user("Hi")],
            params: SamplingParams::greedy(64),
        })
        .expect("submit");
    until_streaming(&w, Duration::from_secs(10));
    let asked = Instant::now();
    w.cancel(job);
    let events = until_terminal(&w, job, Duration::from_secs(5));
    let latency = asked.elapsed();
    match events.last() {
        Some(Event::Cancelled { stats: Some(s), .. }) => {
            assert_eq!(s.finish, FinishReason::Cancelled);
            assert_eq!(s.generated_tokens, 1);
        }
        other => panic!("expected Cancelled with stats, got {other:?}"),
    }
    assert!(
        latency < Duration::from_millis(100),
        "cancel took {latency:?}"
    );
}

#[test]
fn a_remote_server_replaces_the_local_model_and_a_failed_connect_keeps_it() {
    let dir = tempfile::tempdir().expect("tmp");
    write_gpt2_readable(dir.path(), TinyGpt2::default(), 3);
    let server = fake(vec![
        standard_models(),
        sse(vec![delta("remote"), finish("stop")], Duration::ZERO),
    ]);
    let w = worker();
    let load = w
        .submit(JobKind::LoadModel {
            path: dir.path().to_path_buf(),
            options: LoadOptions::default(),
        })
        .expect("submit");
    let events = until_terminal(&w, load, Duration::from_secs(30));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    // Custom jobs see the local model.
    let probe = w
        .submit(JobKind::Custom {
            label: "probe".into(),
            run: Box::new(|ctx| {
                assert!(ctx.model().is_some() && ctx.remote().is_none());
                Ok(())
            }),
        })
        .expect("submit");
    assert!(matches!(
        until_terminal(&w, probe, Duration::from_secs(5)).last(),
        Some(Event::Done { .. })
    ));
    // A refused connection leaves the local model in place.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let events = connect(&w, config(&format!("http://127.0.0.1:{port}")));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ModelUnloaded { .. }))
    );
    failure(&events);
    let local = chat(&w, SamplingParams::greedy(4));
    done_stats(&local);

    let events = connect(&w, config(&server.base));
    let unloaded = events
        .iter()
        .position(|e| matches!(e, Event::ModelUnloaded { .. }))
        .expect("the local model is unloaded");
    let loaded = events
        .iter()
        .position(|e| matches!(e, Event::ModelLoaded { .. }))
        .expect("then the remote one is loaded");
    assert!(unloaded < loaded);
    let probe = w
        .submit(JobKind::Custom {
            label: "probe".into(),
            run: Box::new(|ctx| {
                assert!(ctx.model().is_none());
                assert_eq!(
                    ctx.remote().map(|r| r.model().to_owned()).as_deref(),
                    Some("tiny-chat")
                );
                Ok(())
            }),
        })
        .expect("submit");
    assert!(matches!(
        until_terminal(&w, probe, Duration::from_secs(5)).last(),
        Some(Event::Done { .. })
    ));
    let events = chat(&w, SamplingParams::greedy(4));
    assert_eq!(text_of(&events).0, "remote");
    done_stats(&events);
    let unload = w.submit(JobKind::UnloadModel).expect("submit");
    let events = until_terminal(&w, unload, Duration::from_secs(5));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ModelUnloaded { .. }))
    );
    let e = failure(&chat(&w, SamplingParams::greedy(4)));
    assert!(e.contains("no model is loaded"), "{e}");
}
