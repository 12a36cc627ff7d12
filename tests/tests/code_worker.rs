//! The worker's code-assist jobs: inline completion (streamed, trimmed, cancelled, refused
//! without FIM tokens), whether the loaded model can fill in the middle, and code actions run
//! as chats with what was cut reported.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use studio_inference::code::actions::{ActionInput, ContextFile, builtin_presets};
use studio_inference::code::complete::{
    CompletionMode, CompletionRequest, FimSupport, run_completion,
};
use studio_inference::code::fim::FimFormat;
use studio_inference::device::{DevicePreference, create_device};
use studio_inference::llm::loader;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::{Event, JobKind, LoadOptions, Worker, WorkerConfig};
use studio_tests::code::write_code_model;
use studio_tests::worker_events::until_terminal;

fn worker() -> Worker {
    Worker::spawn(WorkerConfig {
        device: DevicePreference::Cpu,
        repaint: Arc::new(|| {}),
        queue_capacity: 16,
        event_capacity: 256,
    })
    .expect("worker")
}

fn load(w: &Worker, dir: &std::path::Path) {
    let job = w
        .submit(JobKind::LoadModel {
            path: dir.to_path_buf(),
            options: LoadOptions::default(),
        })
        .expect("submit");
    let events = until_terminal(w, job, Duration::from_mins(1));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
}

fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn request(max_new_tokens: usize) -> CompletionRequest {
    CompletionRequest {
        mode: Some(CompletionMode::MultiLine),
        ..CompletionRequest::new(
            "def add(a, b):\n    return",
            "\n\nprint(add(1, 2))\n",
            SamplingParams::greedy(max_new_tokens),
        )
    }
}

#[test]
fn completion_job_streams_the_same_suggestion_as_the_library() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_code_model(tmp.path(), 4, true);
    let w = worker();
    assert_eq!(w.fim_support(), FimSupport::NoModel);
    load(&w, tmp.path());
    assert_eq!(w.fim_support(), FimSupport::Supported(FimFormat::QwenCoder));

    let job = w
        .submit(JobKind::Complete {
            request: Box::new(request(12)),
        })
        .expect("submit");
    let events = until_terminal(&w, job, Duration::from_mins(1));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::PromptTokens { tokens, .. } if *tokens > 10)),
        "{events:?}"
    );
    let Some(Event::Done {
        stats: Some(stats), ..
    }) = events.last()
    else {
        panic!("{events:?}");
    };
    assert!(stats.generated_tokens <= 12);

    let device = create_device(DevicePreference::Cpu).device;
    let mut m = loader::load(tmp.path(), &device, &mut |_, _| {}).expect("load");
    let direct =
        run_completion(&mut m, &request(12), &mut |_| ControlFlow::Continue(())).expect("direct");
    assert_eq!(text_of(&events), direct.text);
}

#[test]
fn completion_is_cancelled_and_refused_without_fim() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_code_model(tmp.path(), 4, true);
    let w = worker();
    load(&w, tmp.path());
    let mut r = request(100_000);
    r.max_prompt_tokens = 64;
    r.params.max_new_tokens = 1500;
    let job = w
        .submit(JobKind::Complete {
            request: Box::new(r),
        })
        .expect("submit");
    w.cancel(job);
    let events = until_terminal(&w, job, Duration::from_mins(1));
    assert!(
        matches!(events.last(), Some(Event::Cancelled { .. })),
        "{events:?}"
    );

    let plain = tempfile::tempdir().expect("tmp");
    write_code_model(plain.path(), 4, false);
    load(&w, plain.path());
    let FimSupport::Unsupported { reason } = w.fim_support() else {
        panic!("{:?}", w.fim_support());
    };
    assert!(reason.contains("fill-in-the-middle"), "{reason}");
    let job = w
        .submit(JobKind::Complete {
            request: Box::new(request(4)),
        })
        .expect("submit");
    let events = until_terminal(&w, job, Duration::from_mins(1));
    let Some(Event::Failed { error, .. }) = events.last() else {
        panic!("{events:?}");
    };
    assert!(error.contains("fill-in-the-middle"), "{error}");
}

#[test]
fn code_action_runs_as_a_chat_and_says_what_was_cut() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Even a model without FIM tokens runs actions.
    write_code_model(tmp.path(), 4, false);
    let w = worker();
    load(&w, tmp.path());
    let preset = builtin_presets()
        .into_iter()
        .find(|p| p.id == "explain")
        .expect("explain");
    let input = ActionInput {
        path: "add.py".to_owned(),
        code: "def add(a, b):\n    return a + b\n".to_owned(),
        context: vec![ContextFile {
            path: "big.py".to_owned(),
            text: "x = 1\n".repeat(2000),
        }],
        ..ActionInput::default()
    };
    let job = w
        .submit(JobKind::CodeAction {
            preset: Box::new(preset),
            input: Box::new(input),
            params: SamplingParams::greedy(8),
        })
        .expect("submit");
    let events = until_terminal(&w, job, Duration::from_mins(1));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Notice { message, .. } if message.starts_with("Context cut: big.py")
        )),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Started { label, .. } if label == "Explain"))
    );
}
