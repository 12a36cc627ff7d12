//! The worker protocol: one terminal event per job, cancel latency, queued cancel, panic
//! isolation, coalesced streaming and the repaint callback.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use studio_tests::worker_events::{until_streaming, until_terminal};

use studio_inference::device::DevicePreference;
use studio_inference::llm::chat::ChatMessage;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::{Event, JobId, JobKind, LoadOptions, Worker, WorkerConfig};
use studio_tests::{TinyGpt2, write_gpt2_readable};

fn worker_with(event_capacity: usize) -> (Worker, Arc<AtomicUsize>) {
    let repaints = Arc::new(AtomicUsize::new(0));
    let r = repaints.clone();
    let w = Worker::spawn(WorkerConfig {
        device: DevicePreference::Cpu,
        repaint: Arc::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
        }),
        queue_capacity: 16,
        event_capacity,
    })
    .expect("worker");
    (w, repaints)
}

fn model_dir(n_positions: usize) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    write_gpt2_readable(
        tmp.path(),
        TinyGpt2 {
            n_positions,
            ..TinyGpt2::default()
        },
        9,
    );
    tmp
}

/// Receives events until `job` ends; returns all events of that job.
fn load(w: &Worker, dir: &std::path::Path) {
    let job = w
        .submit(JobKind::LoadModel {
            path: dir.to_path_buf(),
            options: LoadOptions::default(),
        })
        .expect("submit");
    let events = until_terminal(w, job, Duration::from_secs(30));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ModelLoaded { .. }))
    );
}

#[test]
fn every_job_ends_with_exactly_one_terminal_event() {
    let dir = model_dir(128);
    let (w, repaints) = worker_with(64);
    let jobs = vec![
        w.submit(JobKind::Generate {
            prompt: "Hello".into(),
            params: SamplingParams::greedy(4),
        })
        .expect("submit"), // fails: no model yet
        w.submit(JobKind::LoadModel {
            path: dir.path().join("missing"),
            options: LoadOptions::default(),
        })
        .expect("submit"), // fails: no such folder
        w.submit(JobKind::LoadModel {
            path: dir.path().to_path_buf(),
            options: LoadOptions::default(),
        })
        .expect("submit"),
        w.submit(JobKind::Generate {
            prompt: "Hello".into(),
            params: SamplingParams::greedy(8),
        })
        .expect("submit"),
        w.submit(JobKind::Chat {
            system: "Be brief.".into(),
            messages: vec![ChatMessage::user("Hi")],
            params: SamplingParams::greedy(8),
        })
        .expect("submit"),
        w.submit(JobKind::Generate {
            prompt: String::new(),
            params: SamplingParams::greedy(8),
        })
        .expect("submit"), // fails: empty prompt
        w.submit(JobKind::UnloadModel).expect("submit"),
    ];
    let last = *jobs.last().expect("jobs");
    let mut per_job: HashMap<JobId, Vec<Event>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let e = w
            .events()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("events");
        let (job, end) = (e.job(), e.is_terminal());
        per_job.entry(job).or_default().push(e);
        if end && job == last {
            break;
        }
    }
    // Nothing more arrives for these jobs.
    std::thread::sleep(Duration::from_millis(50));
    while let Some(e) = w.try_recv() {
        per_job.entry(e.job()).or_default().push(e);
    }
    for job in &jobs {
        let events = &per_job[job];
        let terminals = events.iter().filter(|e| e.is_terminal()).count();
        assert_eq!(terminals, 1, "{job:?}: {events:?}");
        assert!(events.last().expect("some").is_terminal(), "{events:?}");
    }
    let failed = |i: usize| match per_job[&jobs[i]].last() {
        Some(Event::Failed { error, .. }) => error.clone(),
        other => panic!("job {i} should fail: {other:?}"),
    };
    assert!(failed(0).contains("no model is loaded"));
    assert!(failed(1).contains("no such file"));
    assert!(failed(5).contains("empty"));
    let text: String = per_job[&jobs[3]]
        .iter()
        .filter_map(|e| match e {
            Event::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(!text.is_empty());
    assert!(matches!(
        per_job[&jobs[3]].last(),
        Some(Event::Done { stats: Some(_), .. })
    ));
    assert!(
        per_job[&jobs[6]]
            .iter()
            .any(|e| matches!(e, Event::ModelUnloaded { .. }))
    );
    assert!(repaints.load(Ordering::Relaxed) > 0);
}

#[test]
fn cancel_between_tokens_is_honoured_within_100_ms() {
    let dir = model_dir(2048);
    let (w, _) = worker_with(256);
    load(&w, dir.path());
    let mut params = SamplingParams::greedy(2000);
    params.stop.clear();
    let job = w
        .submit(JobKind::Generate {
            prompt: "Hello".into(),
            params,
        })
        .expect("submit");
    // Wait until it is streaming.
    until_streaming(&w, Duration::from_secs(30));
    let asked = Instant::now();
    w.cancel(job);
    let events = until_terminal(&w, job, Duration::from_secs(10));
    let latency = asked.elapsed();
    match events.last() {
        Some(Event::Cancelled { stats: Some(s), .. }) => {
            assert!(s.generated_tokens < 2000, "{s:?}");
        }
        other => panic!("expected Cancelled with stats, got {other:?}"),
    }
    assert!(
        latency < Duration::from_millis(100),
        "cancel took {latency:?}"
    );
}

#[test]
fn a_queued_job_can_be_cancelled_before_it_starts() {
    let (w, _) = worker_with(64);
    let blocker = w
        .submit(JobKind::Custom {
            label: "blocker".into(),
            run: Box::new(|ctx| {
                let start = Instant::now();
                while !ctx.is_cancelled() && start.elapsed() < Duration::from_millis(300) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            }),
        })
        .expect("submit");
    let queued = w
        .submit(JobKind::Generate {
            prompt: "never runs".into(),
            params: SamplingParams::greedy(4),
        })
        .expect("submit");
    w.cancel(queued);
    let blocker_events = until_terminal(&w, blocker, Duration::from_secs(5));
    assert!(matches!(blocker_events.last(), Some(Event::Done { .. })));
    let events = until_terminal(&w, queued, Duration::from_secs(5));
    assert_eq!(
        events,
        vec![Event::Cancelled {
            job: queued,
            stats: None
        }],
        "a cancelled queued job must not start"
    );
}

#[test]
fn a_panicking_job_fails_and_the_worker_serves_the_next_one() {
    let dir = model_dir(128);
    let (w, _) = worker_with(64);
    load(&w, dir.path());
    let bad = w
        .submit(JobKind::Custom {
            label: "explodes".into(),
            run: Box::new(|_| panic!("boom in a job")),
        })
        .expect("submit");
    let events = until_terminal(&w, bad, Duration::from_secs(5));
    match events.last() {
        Some(Event::Failed { error, .. }) => {
            assert!(
                error.contains("panicked") && error.contains("boom in a job"),
                "{error}"
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // The model is still loaded and the worker still answers.
    let next = w
        .submit(JobKind::Generate {
            prompt: "Hello".into(),
            params: SamplingParams::greedy(4),
        })
        .expect("submit");
    let events = until_terminal(&w, next, Duration::from_secs(10));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
}

#[test]
fn streamed_text_is_coalesced_when_the_ui_is_slow() {
    let dir = model_dir(512);
    let (w, _) = worker_with(4);
    load(&w, dir.path());
    let mut params = SamplingParams::greedy(300);
    params.stop.clear();
    let job = w
        .submit(JobKind::Generate {
            prompt: "Hello".into(),
            params,
        })
        .expect("submit");
    // A "frozen UI": read nothing while the job runs.
    std::thread::sleep(Duration::from_millis(1500));
    let events = until_terminal(&w, job, Duration::from_secs(30));
    let texts: Vec<(&str, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Text { text, tokens, .. } => Some((text.as_str(), *tokens)),
            _ => None,
        })
        .collect();
    let Some(Event::Done {
        stats: Some(stats), ..
    }) = events.last()
    else {
        panic!("expected Done: {:?}", events.last());
    };
    let streamed_tokens: usize = texts.iter().map(|t| t.1).sum();
    assert_eq!(streamed_tokens, stats.generated_tokens, "no token lost");
    assert!(stats.generated_tokens > 20);
    // Far fewer events than tokens: the backlog was merged, not queued.
    assert!(
        texts.len() < stats.generated_tokens / 2,
        "{} events for {} tokens",
        texts.len(),
        stats.generated_tokens
    );
}

#[test]
fn a_bad_model_is_refused_before_the_loaded_one_is_dropped() {
    let dir = model_dir(128);
    let (w, _) = worker_with(64);
    load(&w, dir.path());
    let pickle = dir.path().join("pytorch_model.bin");
    std::fs::write(&pickle, b"\x80\x04").expect("write");
    let bad = w
        .submit(JobKind::LoadModel {
            path: pickle,
            options: LoadOptions::default(),
        })
        .expect("submit");
    let events = until_terminal(&w, bad, Duration::from_secs(10));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ModelUnloaded { .. })),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(Event::Failed { error, .. })
            if error.contains("pytorch_model.bin") && error.contains("corrupt")),
        "{events:?}"
    );
    let next = w
        .submit(JobKind::Generate {
            prompt: "Hello".into(),
            params: SamplingParams::greedy(4),
        })
        .expect("submit");
    let events = until_terminal(&w, next, Duration::from_secs(10));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );

    // A good model replacing it: the old one is dropped first, and the UI is told.
    let switch = w
        .submit(JobKind::LoadModel {
            path: dir.path().to_path_buf(),
            options: LoadOptions::default(),
        })
        .expect("submit");
    let events = until_terminal(&w, switch, Duration::from_secs(10));
    let unloaded = events
        .iter()
        .position(|e| matches!(e, Event::ModelUnloaded { .. }))
        .expect("unloaded");
    let loaded = events
        .iter()
        .position(|e| matches!(e, Event::ModelLoaded { .. }))
        .expect("loaded");
    assert!(unloaded < loaded);
}

#[test]
fn load_options_lower_the_context_length() {
    let dir = model_dir(128);
    let (w, _) = worker_with(64);
    let job = w
        .submit(JobKind::LoadModel {
            path: dir.path().to_path_buf(),
            options: LoadOptions {
                context_length: Some(48),
            },
        })
        .expect("submit");
    let events = until_terminal(&w, job, Duration::from_secs(10));
    let info = events
        .iter()
        .find_map(|e| match e {
            Event::ModelLoaded { info, .. } => Some(info.clone()),
            _ => None,
        })
        .expect("loaded");
    assert_eq!(info.context_length, 48);
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let job = w
        .submit(JobKind::Generate {
            prompt: long,
            params: SamplingParams::greedy(4),
        })
        .expect("submit");
    match until_terminal(&w, job, Duration::from_secs(10)).last() {
        Some(Event::Failed { error, .. }) => assert!(error.contains("context is 48"), "{error}"),
        other => panic!("expected the 48-token context to refuse it: {other:?}"),
    }
}
