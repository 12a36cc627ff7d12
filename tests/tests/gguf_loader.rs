//! GGUF files through Studio's own entry points: the loader, the worker and chat prompts.

use std::time::{Duration, Instant};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use studio_inference::llm::chat::{ChatFormat, ChatMessage};
use studio_inference::llm::loader::{self, Architecture};
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::models::Family;
use studio_inference::worker::{Event, JobKind, LoadOptions, Worker, WorkerConfig};
use studio_tests::gguf_writer::{GgufOptions, write_family_gguf};

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[test]
fn a_gguf_file_loads_with_its_embedded_template() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = GgufOptions {
        chat_template: Some(CHATML.to_owned()),
        ..GgufOptions::with_dtype(GgmlDType::Q8_0)
    };
    let gguf = write_family_gguf(tmp.path(), "qwen2", 3, &opts);
    let m = loader::load(&gguf, &Device::Cpu, &mut |_, _| {}).expect("load");
    assert_eq!(m.info.architecture, Architecture::Family(Family::Qwen2));
    assert!(m.info.dtype.contains("Q8_0"), "{}", m.info.dtype);
    assert!(matches!(m.chat, ChatFormat::Template(_)));
    let p = m
        .chat_prompt("", &[ChatMessage::user("Hi")], 16)
        .expect("prompt");
    assert_eq!(
        m.tokenizer.decode(&p.fitted.tokens).expect("decode"),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let im_end = m.tokenizer.token_to_id("<|im_end|>").expect("token");
    assert!(m.eos_token_ids.contains(&im_end) || p.end_of_turn.contains(&im_end));
}

#[test]
fn the_worker_loads_a_gguf_and_chats_and_refuses_a_broken_one_first() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = GgufOptions {
        chat_template: Some(CHATML.to_owned()),
        ..GgufOptions::with_dtype(GgmlDType::Q4_0)
    };
    let gguf = write_family_gguf(tmp.path(), "llama", 4, &opts);
    let w = Worker::spawn(WorkerConfig::default()).expect("worker");
    let run = |kind: JobKind| {
        let job = w.submit(kind).expect("submit");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut events = Vec::new();
        loop {
            let e = w
                .events()
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("event");
            if e.job() == job {
                let end = e.is_terminal();
                events.push(e);
                if end {
                    return events;
                }
            }
        }
    };
    let events = run(JobKind::LoadModel {
        path: gguf.clone(),
        options: LoadOptions::default(),
    });
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    let events = run(JobKind::Chat {
        system: String::new(),
        messages: vec![ChatMessage::user("Hello")],
        params: SamplingParams::greedy(6),
    });
    assert!(
        matches!(events.last(), Some(Event::Done { stats: Some(_), .. })),
        "{events:?}"
    );

    // A truncated GGUF is refused from its header: the loaded model stays.
    let bytes = std::fs::read(&gguf).expect("read");
    let broken = tmp.path().join("broken.gguf");
    std::fs::write(&broken, &bytes[..bytes.len() / 3]).expect("write");
    let events = run(JobKind::LoadModel {
        path: broken,
        options: LoadOptions::default(),
    });
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ModelUnloaded { .. })),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(Event::Failed { .. })),
        "{events:?}"
    );
}

#[test]
fn gguf_files_in_the_hugging_face_cache_are_listed_and_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snapshot = tmp
        .path()
        .join("models--Qwen--Qwen2.5-0.5B-Instruct-GGUF/snapshots/abc");
    let made = tmp.path().join("made");
    let gguf = write_family_gguf(&made, "qwen2", 2, &GgufOptions::with_dtype(GgmlDType::Q8_0));
    std::fs::create_dir_all(&snapshot).expect("dir");
    let target = snapshot.join("qwen2.5-0.5b-instruct-q8_0.gguf");
    std::fs::copy(&gguf, &target).expect("copy");
    std::fs::write(snapshot.join("README.md"), "not a model").expect("write");
    let found = studio_inference::llm::hf_cache::scan(tmp.path());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].repo,
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf"
    );
    assert_eq!(found[0].path, target);
    let label = found[0].support.as_ref().expect("supported");
    assert!(label.contains("qwen2") && label.contains("Q8_0"), "{label}");
    assert_eq!(
        found[0].bytes,
        Some(std::fs::metadata(&target).expect("size").len())
    );
    loader::load(&found[0].path, &Device::Cpu, &mut |_, _| {}).expect("loads");
}

/// A repo with a Hugging Face folder model and GGUF files lists both.
#[test]
fn gguf_files_beside_a_folder_model_in_the_cache_are_listed_too() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snapshot = tmp.path().join("models--Org--Tiny/snapshots/abc");
    std::fs::create_dir_all(&snapshot).expect("dir");
    studio_tests::write_gpt2_readable(&snapshot, studio_tests::TinyGpt2::default(), 1);
    let made = tmp.path().join("made");
    let gguf = write_family_gguf(&made, "qwen2", 2, &GgufOptions::with_dtype(GgmlDType::Q8_0));
    std::fs::copy(&gguf, snapshot.join("tiny-q8_0.gguf")).expect("copy");
    let found = studio_inference::llm::hf_cache::scan(tmp.path());
    let repos: Vec<&str> = found.iter().map(|f| f.repo.as_str()).collect();
    assert_eq!(repos, ["Org/Tiny", "Org/Tiny/tiny-q8_0.gguf"], "{found:?}");
    // The folder model's size counts its own files, not the GGUF listed beside it.
    let folder_files: u64 = ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .map(|n| std::fs::metadata(snapshot.join(n)).map_or(0, |m| m.len()))
        .sum();
    assert!(
        found[0].support.is_ok() && found[0].bytes.is_some_and(|b| b >= folder_files),
        "{found:?}"
    );
    assert!(found[0].bytes < found[1].bytes.map(|g| g + folder_files));
    assert!(found[1].bytes.is_some_and(|b| b > 0), "{found:?}");
}
