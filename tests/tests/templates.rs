//! Chat templates as models ship them, rendered by `studio_inference::llm::template`.
//!
//! The fixtures in `tests/fixtures/templates/` are the models' own template texts (see the
//! README there). Two kinds of checks:
//! - parity: every case in `expected.json`, which `tools/render_chat_templates.py` rendered
//!   with transformers' `apply_chat_template`, must come out byte for byte the same;
//! - hand-written expectations of each format, so a regenerated `expected.json` cannot quietly
//!   bless a wrong rendering.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use studio_inference::llm::template::{ChatTemplate, TemplateMessage};

/// The date `tools/render_chat_templates.py` pins `strftime_now` to.
const FIXED_DATE: (i32, u32, u32) = (2024, 7, 26);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/templates")
}

fn read_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_source(name: &str) -> String {
    let path = fixtures().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture compiled with its model's bos/eos (from tokens.json) and the fixed date.
fn fixture(name: &str) -> ChatTemplate {
    let tokens = read_json("tokens.json");
    let info = &tokens["templates"][name];
    assert!(info.is_object(), "{name} is not listed in tokens.json");
    ChatTemplate::new(
        &fixture_source(name),
        info["bos_token"].as_str(),
        info["eos_token"].as_str(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
    .with_date(FIXED_DATE.0, FIXED_DATE.1, FIXED_DATE.2)
}

const SYSTEM: &str = "You are a concise assistant.";

/// system + user + assistant + user.
fn chat_with_system() -> Vec<TemplateMessage<'static>> {
    vec![
        TemplateMessage::system(SYSTEM),
        TemplateMessage::user("Hello! Who are you?"),
        TemplateMessage::assistant("  I am a small model.  "),
        TemplateMessage::user("Tell me a joke about Rust."),
    ]
}

/// user + assistant + user.
fn chat_without_system() -> Vec<TemplateMessage<'static>> {
    chat_with_system().split_off(1)
}

fn render(name: &str, messages: &[TemplateMessage]) -> String {
    fixture(name)
        .render(messages, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Parity with transformers

#[test]
fn every_case_matches_transformers_apply_chat_template() {
    let expected = read_json("expected.json");
    let cases = expected["cases"]
        .as_array()
        .expect("expected.json has cases");
    assert!(
        cases.len() >= 60,
        "expected.json has only {} cases",
        cases.len()
    );
    let tokens = read_json("tokens.json");

    let mut failures = String::new();
    for case in cases {
        let (label, source, bos, eos) = if let Some(name) = case["template"].as_str() {
            let info = &tokens["templates"][name];
            let mut source = fixture_source(name);
            if case["line_endings"] == "crlf" {
                source = source.replace('\n', "\r\n");
            }
            (
                format!("{name} ({})", case["line_endings"].as_str().unwrap_or("lf")),
                source,
                info["bos_token"].as_str().map(str::to_owned),
                info["eos_token"].as_str().map(str::to_owned),
            )
        } else {
            (
                format!("inline {}", case["inline"]),
                case["source"].as_str().expect("inline source").to_owned(),
                case["bos_token"].as_str().map(str::to_owned),
                case["eos_token"].as_str().map(str::to_owned),
            )
        };
        let label = format!("{label} / {}", case["conversation"]);
        // Tool cases: the assistant's calls and the tool's result travel as OpenAI's clients
        // send them.
        let messages: Vec<TemplateMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                let mut t = TemplateMessage::new(
                    m["role"].as_str().expect("role"),
                    m["content"].as_str().expect("content"),
                );
                t.tool_calls = m.get("tool_calls");
                t.tool_call_id = m.get("tool_call_id").and_then(Value::as_str);
                t
            })
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("flag");

        let template = match ChatTemplate::new(&source, bos.as_deref(), eos.as_deref()) {
            Ok(t) => {
                let t = t.with_date(FIXED_DATE.0, FIXED_DATE.1, FIXED_DATE.2);
                match case.get("tools") {
                    Some(tools) => t.with_tools(tools.clone()),
                    None => t,
                }
            }
            Err(e) => {
                let _ = writeln!(failures, "{label}: does not compile: {e}");
                continue;
            }
        };
        let got = template.render(&messages, add_generation_prompt);
        match (&got, case["expected"].as_str(), case["error"].as_str()) {
            (Ok(got), Some(want), _) if got == want => {}
            (Err(e), None, Some(want))
                if e.to_string().ends_with(&format!("chat template: {want}")) => {}
            (got, want, want_error) => {
                let _ = writeln!(
                    failures,
                    "{label}:\n  transformers: {}\n  studio:       {}",
                    want.map_or_else(|| format!("error {want_error:?}"), |w| format!("{w:?}")),
                    match got {
                        Ok(text) => format!("{text:?}"),
                        Err(e) => format!("error {:?}", e.to_string()),
                    }
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "renderings differ from transformers':\n{failures}"
    );
}

#[test]
fn expected_json_covers_every_fixture() {
    let expected = read_json("expected.json");
    let tokens = read_json("tokens.json");
    let covered: Vec<&str> = expected["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter_map(|c| c["template"].as_str())
        .collect();
    let mut jinja_files: Vec<String> = fs::read_dir(fixtures())
        .expect("fixtures folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "jinja"))
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    jinja_files.sort();
    assert!(jinja_files.len() >= 10, "{jinja_files:?}");
    for name in &jinja_files {
        assert!(
            tokens["templates"][name].is_object(),
            "{name} missing from tokens.json"
        );
        assert!(
            covered.contains(&name.as_str()),
            "{name} has no case in expected.json"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Each format, written out by hand

#[test]
fn qwen25_uses_the_given_system_prompt_or_its_default() {
    assert_eq!(
        render("qwen2.5-instruct.jinja", &chat_with_system()),
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n\
         <|im_start|>user\nHello! Who are you?<|im_end|>\n\
         <|im_start|>assistant\n  I am a small model.  <|im_end|>\n\
         <|im_start|>user\nTell me a joke about Rust.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        render("qwen2.5-instruct.jinja", &chat_without_system()),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHello! Who are you?<|im_end|>\n\
         <|im_start|>assistant\n  I am a small model.  <|im_end|>\n\
         <|im_start|>user\nTell me a joke about Rust.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn llama32_puts_todays_date_in_the_system_header() {
    let expected = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
         You are a concise assistant.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello! Who are you?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nI am a small model.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nTell me a joke about Rust.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(
        render("llama-3.2-instruct.jinja", &chat_with_system()),
        expected
    );

    let other_day = fixture("llama-3.2-instruct.jinja").with_date(2025, 3, 9);
    let text = other_day
        .render(&chat_with_system(), true)
        .expect("renders");
    assert!(text.contains("\nToday Date: 09 Mar 2025\n"), "{text}");

    // Without a fixed date it is today's (UTC) date: "DD Mon YYYY", this year or later.
    let source = fixture_source("llama-3.2-instruct.jinja");
    let live = ChatTemplate::new(&source, Some("<|begin_of_text|>"), Some("<|eot_id|>"))
        .expect("compiles")
        .render(&chat_with_system(), true)
        .expect("renders");
    let date = live
        .split("Today Date: ")
        .nth(1)
        .and_then(|rest| rest.split('\n').next())
        .expect("a date line");
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert!(
        parts[0].len() == 2 && parts[0].parse::<u32>().is_ok_and(|d| (1..=31).contains(&d)),
        "{date:?}"
    );
    assert!(
        [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
        ]
        .contains(&parts[1]),
        "{date:?}"
    );
    assert!(parts[2].parse::<i32>().is_ok_and(|y| y >= 2025), "{date:?}");
}

#[test]
fn llama31_keeps_its_fixed_default_date() {
    // Llama 3.1's template does not call strftime_now: its date is "26 Jul 2024" whatever the day.
    let template = fixture("llama-3.1-instruct.jinja").with_date(2031, 12, 1);
    let text = template
        .render(&chat_without_system(), true)
        .expect("renders");
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello! Who are you?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nI am a small model.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nTell me a joke about Rust.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn phi3_and_phi35_use_end_markers_and_eos_only_without_a_generation_prompt() {
    let expected = "<|system|>\nYou are a concise assistant.<|end|>\n\
         <|user|>\nHello! Who are you?<|end|>\n\
         <|assistant|>\n  I am a small model.  <|end|>\n\
         <|user|>\nTell me a joke about Rust.<|end|>\n\
         <|assistant|>\n";
    for name in ["phi-3-mini-instruct.jinja", "phi-3.5-mini-instruct.jinja"] {
        assert_eq!(render(name, &chat_with_system()), expected, "{name}");
        let closed = fixture(name)
            .render(&[TemplateMessage::user("Hi")], false)
            .expect("renders");
        assert_eq!(closed, "<|user|>\nHi<|end|>\n<|endoftext|>", "{name}");
    }
    // Phi-3.5 skips an empty system message; Phi-3 keeps it.
    let empty_system = [TemplateMessage::system(""), TemplateMessage::user("Hi")];
    assert_eq!(
        render("phi-3.5-mini-instruct.jinja", &empty_system),
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    );
    assert_eq!(
        render("phi-3-mini-instruct.jinja", &empty_system),
        "<|system|>\n<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    );
}

#[test]
fn gemma2_renders_model_turns_and_gemma3_folds_the_system_prompt_into_the_first_turn() {
    let turns = "<start_of_turn>user\nHello! Who are you?<end_of_turn>\n\
                 <start_of_turn>model\nI am a small model.<end_of_turn>\n\
                 <start_of_turn>user\nTell me a joke about Rust.<end_of_turn>\n\
                 <start_of_turn>model\n";
    assert_eq!(
        render("gemma-2-instruct.jinja", &chat_without_system()),
        format!("<bos>{turns}")
    );
    assert_eq!(
        render("gemma-3-instruct.jinja", &chat_without_system()),
        format!("<bos>{turns}")
    );
    assert_eq!(
        render("gemma-3-instruct.jinja", &chat_with_system()),
        "<bos><start_of_turn>user\nYou are a concise assistant.\n\nHello! Who are you?<end_of_turn>\n\
         <start_of_turn>model\nI am a small model.<end_of_turn>\n\
         <start_of_turn>user\nTell me a joke about Rust.<end_of_turn>\n\
         <start_of_turn>model\n"
    );
}

#[test]
fn mistral_v03_puts_the_system_prompt_in_the_last_user_turn() {
    assert_eq!(
        render("mistral-7b-instruct-v0.3.jinja", &chat_with_system()),
        "<s>[INST] Hello! Who are you?[/INST] I am a small model.</s>\
         [INST] You are a concise assistant.\n\nTell me a joke about Rust.[/INST]"
    );
}

#[test]
fn smollm2_adds_its_default_system_prompt() {
    assert_eq!(
        render("smollm2-instruct.jinja", &chat_without_system()),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello! Who are you?<|im_end|>\n\
         <|im_start|>assistant\n  I am a small model.  <|im_end|>\n\
         <|im_start|>user\nTell me a joke about Rust.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert!(
        render("smollm2-instruct.jinja", &chat_with_system()).starts_with(
            "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n"
        )
    );
}

#[test]
fn tinyllama_depends_on_trim_blocks() {
    // Every `{% … %}` in this template ends its line; only trim_blocks removes those newlines.
    assert_eq!(
        render("tinyllama-chat.jinja", &chat_with_system()),
        "<|system|>\nYou are a concise assistant.</s>\n\
         <|user|>\nHello! Who are you?</s>\n\
         <|assistant|>\n  I am a small model.  </s>\n\
         <|user|>\nTell me a joke about Rust.</s>\n\
         <|assistant|>\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn raise_exception_surfaces_the_templates_message() {
    let err = fixture("gemma-2-instruct.jinja")
        .render(&chat_with_system(), true)
        .expect_err("Gemma 2 has no system role");
    assert_eq!(err.to_string(), "chat template: System role not supported");

    let two_users = [
        TemplateMessage::user("First."),
        TemplateMessage::user("Second."),
    ];
    let err = fixture("mistral-7b-instruct-v0.3.jinja")
        .render(&two_users, true)
        .expect_err("Mistral needs alternating roles");
    assert_eq!(
        err.to_string(),
        "chat template: After the optional system message, conversation \
         roles must alternate user/assistant/user/assistant/..."
    );

    let err = fixture("gemma-3-instruct.jinja")
        .render(&two_users, true)
        .expect_err("Gemma 3 needs alternating roles");
    assert!(
        err.to_string()
            .ends_with("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{err}"
    );
}

#[test]
fn a_template_that_does_not_compile_says_so() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None)
        .expect_err("unclosed for");
    let text = err.to_string();
    assert!(text.starts_with("chat template: syntax error"), "{text}");
    assert!(
        text.contains("endfor") || text.contains("end of input"),
        "{text}"
    );

    let err = ChatTemplate::new("{{ messages[0].content ", None, None).expect_err("unclosed tag");
    assert!(
        err.to_string().contains("chat template: syntax error"),
        "{err}"
    );
}

#[test]
fn errors_at_render_time_name_the_template() {
    // Attribute access on an undefined value fails, as with jinja2's default Undefined.
    let template = ChatTemplate::new("{{ nothing.attribute }}", None, None).expect("compiles");
    let err = template
        .render(&[TemplateMessage::user("x")], true)
        .expect_err("undefined");
    assert!(err.to_string().starts_with("chat template: "), "{err}");

    // An empty conversation is refused before rendering, as transformers does.
    let template = fixture("qwen2.5-instruct.jinja");
    let err = template.render(&[], true).expect_err("empty");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn undefined_values_are_lenient_like_jinja2() {
    let template = ChatTemplate::new(
        "[{{ missing }}][{% for x in missing %}x{% endfor %}][{{ messages[0].missing }}]\
         [{{ 'yes' if messages[0].missing else 'no' }}][{{ bos_token }}][{{ eos_token }}]\
         [{{ tools is none }}{{ documents is none }}{{ bos_token is defined }}]",
        None,
        Some("</s>"),
    )
    .expect("compiles");
    assert_eq!(
        template
            .render(&[TemplateMessage::user("x")], false)
            .expect("renders"),
        "[][][][no][][</s>][TrueTrueFalse]"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding the template

const SIMPLE: &str = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{{ eos_token }}";

#[test]
fn from_tokenizer_config_reads_a_string_template_and_plain_tokens() {
    let config = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": SIMPLE,
    });
    let template = ChatTemplate::from_tokenizer_config(&config)
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.source(), SIMPLE);
    assert_eq!(template.bos_token(), Some("<s>"));
    assert_eq!(template.eos_token(), Some("</s>"));
    assert_eq!(
        template
            .render(&[TemplateMessage::user("hi")], false)
            .expect("renders"),
        "<s>user: hi\n</s>"
    );
}

#[test]
fn from_tokenizer_config_reads_added_token_objects() {
    let config = json!({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false,
                      "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": {"content": "<|eot_id|>"},
        "chat_template": SIMPLE,
    });
    let template = ChatTemplate::from_tokenizer_config(&config)
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(template.eos_token(), Some("<|eot_id|>"));
}

#[test]
fn from_tokenizer_config_takes_the_default_of_named_templates() {
    let config = json!({
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": SIMPLE},
            {"name": "rag", "template": "RAG"},
        ],
    });
    let template = ChatTemplate::from_tokenizer_config(&config)
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.source(), SIMPLE);
    assert_eq!(template.bos_token(), None);
    assert_eq!(
        template
            .render(&[TemplateMessage::user("hi")], false)
            .expect("renders"),
        "user: hi\n</s>"
    );

    let no_default = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]});
    let err = ChatTemplate::from_tokenizer_config(&no_default).expect_err("no default");
    assert!(err.to_string().contains("tool_use, rag"), "{err}");
}

#[test]
fn from_tokenizer_config_without_a_template_is_none() {
    for config in [
        json!({"eos_token": "</s>"}),
        json!({"chat_template": null}),
        json!({"chat_template": []}),
    ] {
        assert!(
            ChatTemplate::from_tokenizer_config(&config)
                .expect("valid")
                .is_none(),
            "{config}"
        );
    }
    let err = ChatTemplate::from_tokenizer_config(&json!({"chat_template": "{% if %}"}))
        .expect_err("bad template");
    assert!(
        err.to_string().contains("chat template: syntax error"),
        "{err}"
    );
}

#[test]
fn from_model_dir_prefers_chat_template_jinja() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": "FROM CONFIG"});
    fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    fs::write(dir.path().join("chat_template.jinja"), SIMPLE).expect("write");

    let template = ChatTemplate::from_model_dir(dir.path())
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.source(), SIMPLE);
    assert_eq!(
        template
            .render(&[TemplateMessage::user("hi")], false)
            .expect("renders"),
        "<s>user: hi\n</s>"
    );

    fs::remove_file(dir.path().join("chat_template.jinja")).expect("remove");
    let template = ChatTemplate::from_model_dir(dir.path())
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.source(), "FROM CONFIG");
}

#[test]
fn from_model_dir_falls_back_to_chat_template_json_and_special_tokens_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(
        ChatTemplate::from_model_dir(dir.path())
            .expect("valid")
            .is_none()
    );

    fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"model_max_length": 2048}).to_string(),
    )
    .expect("write");
    assert!(
        ChatTemplate::from_model_dir(dir.path())
            .expect("valid")
            .is_none()
    );

    fs::write(
        dir.path().join("chat_template.json"),
        json!({"chat_template": SIMPLE}).to_string(),
    )
    .expect("write");
    fs::write(
        dir.path().join("special_tokens_map.json"),
        json!({"bos_token": {"content": "<bos>"}, "eos_token": "<eos>"}).to_string(),
    )
    .expect("write");
    let template = ChatTemplate::from_model_dir(dir.path())
        .expect("valid")
        .expect("has a template");
    assert_eq!(template.source(), SIMPLE);
    assert_eq!(template.bos_token(), Some("<bos>"));
    assert_eq!(template.eos_token(), Some("<eos>"));

    fs::write(dir.path().join("tokenizer_config.json"), "{ not json").expect("write");
    let err = ChatTemplate::from_model_dir(dir.path()).expect_err("bad json");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn family_names_for_the_fixtures() {
    let cases = [
        ("qwen2.5-instruct.jinja", "ChatML"),
        ("smollm2-instruct.jinja", "ChatML"),
        ("llama-3.1-instruct.jinja", "Llama 3"),
        ("llama-3.2-instruct.jinja", "Llama 3"),
        ("phi-3-mini-instruct.jinja", "Phi-3"),
        ("phi-3.5-mini-instruct.jinja", "Phi-3"),
        ("gemma-2-instruct.jinja", "Gemma"),
        ("gemma-3-instruct.jinja", "Gemma"),
        ("mistral-7b-instruct-v0.3.jinja", "Mistral"),
        ("tinyllama-chat.jinja", "Zephyr"),
        ("qwen3.jinja", "ChatML"),
        ("phi-4-mini-instruct.jinja", "Phi-3"),
        ("gemma-4.jinja", "Gemma 4"),
    ];
    for (name, family) in cases {
        assert_eq!(fixture(name).family_name(), family, "{name}");
    }
    let custom = ChatTemplate::new(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        None,
        None,
    )
    .expect("compiles");
    assert_eq!(custom.family_name(), "custom");
}

#[test]
fn templates_can_move_to_the_worker_thread() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<ChatTemplate>();
    let template = fixture("smollm2-instruct.jinja");
    let copy = template.clone();
    let rendered = studio_tests::spawn_named("render", move || {
        copy.render(&[TemplateMessage::user("Hi")], true)
    })
    .join()
    .expect("thread")
    .expect("renders");
    assert_eq!(
        rendered,
        template
            .render(&[TemplateMessage::user("Hi")], true)
            .expect("renders")
    );
}

/// Runaway templates (from a hostile model file) end with a clear error naming where the
/// template came from, within a bounded time and memory; the process goes on.
#[test]
fn runaway_templates_are_stopped_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // Nested loops: 10¹⁰ iterations without the fuel.
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "steps",
        ),
        // A huge output: 100 MB strings, many times over.
        (
            "{% for a in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}",
            "MiB",
        ),
        // A string doubled 60 times: 2^60 bytes in 60 steps, long before the fuel or the
        // output cap would notice.
        (
            "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "grows values without bound",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "grows values without bound",
        ),
        // The same through a macro's recursion and a captured block.
        (
            "{% macro d(s, n) %}{% if n > 0 %}{% set t %}{{ s }}{{ s }}{% endset %}{{ d(t, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('x', 60) }}",
            "grows values without bound",
        ),
        // A list doubled, then joined or printed in one step.
        (
            "{% set ns = namespace(l=['xxxxxxxx']) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join }}",
            "grows values without bound",
        ),
        (
            "{% set ns = namespace(l=['x']) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|string }}",
            "grows values without bound",
        ),
        // One step that multiplies: a lazily repeated list joined, a string replaced into
        // itself, and huge widths.
        (
            "{{ (['x' * 1000000] * 1000000)|join }}",
            "grows values without bound",
        ),
        (
            "{% set s = 'a' * 10000000 %}{{ s|replace('a', s)|length }}",
            "grows values without bound",
        ),
        (
            "{% set s = 'a' * 10000000 %}{{ s.replace('a', s)|length }}",
            "grows values without bound",
        ),
        (
            "{% set s = 'ab' * 1000000 %}{{ s|join(s)|length }}",
            "grows values without bound",
        ),
        ("{{ 'x'|indent(1000000000000) }}", "indent above"),
        ("{{ '%1000000000000s'|format('x') }}", "format width"),
    ];
    for (source, expect) in cases {
        let config = json!({ "chat_template": source, "eos_token": "</s>" });
        fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
        let template = ChatTemplate::from_model_dir(dir.path())
            .expect("compiles")
            .expect("has a template");
        let start = std::time::Instant::now();
        let err = template
            .render(&[TemplateMessage::user("hi")], true)
            .expect_err("stopped")
            .to_string();
        assert!(err.contains(expect), "{source}: {err}");
        assert!(
            err.contains(&dir.path().display().to_string()),
            "the error names the template's source: {err}"
        );
        // Generous: the fuel runs out in well under a second on these machines.
        assert!(
            start.elapsed().as_secs() < 30,
            "{source}: {:?}",
            start.elapsed()
        );
    }
    // A real conversation of 4,000 messages renders within the fuel.
    let chatml = ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        None,
        None,
    )
    .expect("chatml");
    let texts: Vec<String> = (0..4000).map(|i| format!("message {i}")).collect();
    let messages: Vec<TemplateMessage> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 2 == 0 {
                TemplateMessage::user(t)
            } else {
                TemplateMessage::assistant(t)
            }
        })
        .collect();
    let text = chatml.render(&messages, false).expect("renders");
    assert!(
        text.ends_with("message 3999<|im_end|>\n"),
        "{}",
        &text[text.len() - 40..]
    );
}
