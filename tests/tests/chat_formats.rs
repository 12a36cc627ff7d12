//! A model's own chat template drives its prompts, with the fallbacks users expect, in the
//! loader, the prompt builder and the `studio chat` command.

use std::path::{Path, PathBuf};

use candle_core::Device;
use studio_inference::llm::chat::{ChatFormat, ChatMessage};
use studio_inference::llm::loader;
use studio_tests::families::write_family;

fn template(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/templates")
        .join(format!("{name}.jinja"));
    std::fs::read_to_string(p).expect("template fixture")
}

/// A tiny Qwen2 folder whose tokenizer_config.json carries `chat_template`.
fn model_with_template(source: &str, bos: Option<&str>, eos: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    write_family(&dir, "qwen2", 3);
    let mut cfg = serde_json::json!({ "chat_template": source, "eos_token": eos });
    if let Some(bos) = bos {
        cfg["bos_token"] = bos.into();
    }
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).expect("write");
    (tmp, dir)
}

fn load(dir: &Path) -> loader::LoadedModel {
    loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load")
}

#[test]
fn the_models_own_template_builds_the_prompt_and_its_end_of_turn_stops_it() {
    let (_t, dir) = model_with_template(&template("qwen2.5-instruct"), None, "<|im_end|>");
    let m = load(&dir);
    assert!(matches!(m.chat, ChatFormat::Template(_)));
    assert!(
        m.info.chat_format.contains("ChatML"),
        "{}",
        m.info.chat_format
    );
    let p = m
        .chat_prompt("Be brief.", &[ChatMessage::user("Hi there")], 64)
        .expect("prompt");
    assert!(p.notice.is_none());
    assert!(p.stop.is_empty(), "templates stop on tokens, not strings");
    let text = m.tokenizer.decode(&p.fitted.tokens).expect("decode");
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let im_end = m
        .tokenizer
        .token_to_id("<|im_end|>")
        .expect("special token");
    assert!(p.end_of_turn.contains(&im_end));
    // The markers are single tokens, as in the real vocabulary.
    assert_eq!(p.fitted.tokens.iter().filter(|&&t| t == im_end).count(), 2);
}

#[test]
fn a_template_without_a_system_role_gets_the_system_prompt_in_the_first_message() {
    let (_t, dir) = model_with_template(&template("gemma-2-instruct"), Some("<bos>"), "<eos>");
    let m = load(&dir);
    let p = m
        .chat_prompt("Be brief.", &[ChatMessage::user("Hi")], 64)
        .expect("prompt");
    let notice = p.notice.expect("the fallback is announced");
    assert!(notice.contains("system prompt"), "{notice}");
    let text = m.tokenizer.decode(&p.fitted.tokens).expect("decode");
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn a_failing_template_falls_back_visibly_and_a_broken_one_still_loads() {
    let raising = "{{ raise_exception('Conversation roles must alternate user/assistant') }}";
    let (_t, dir) = model_with_template(raising, None, "<|im_end|>");
    let m = load(&dir);
    let p = m
        .chat_prompt("", &[ChatMessage::user("Hi")], 64)
        .expect("prompt");
    let notice = p.notice.expect("fallback notice");
    assert!(
        notice.contains("roles must alternate") && notice.contains("plain transcript"),
        "{notice}"
    );
    assert_eq!(
        m.tokenizer.decode(&p.fitted.tokens).expect("decode"),
        "User: Hi\nAssistant:"
    );
    assert!(!p.stop.is_empty());

    let (_t2, dir2) = model_with_template("{% if %}", None, "<|im_end|>");
    let m2 = load(&dir2);
    assert!(matches!(m2.chat, ChatFormat::Plain { reason: Some(_) }));
    assert!(
        m2.info.chat_format.contains("could not be used"),
        "{}",
        m2.info.chat_format
    );
}
