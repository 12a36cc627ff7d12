//! The shared token loop on a tiny GPT-2: streaming UTF-8, seeds, stops, limits.

use std::ops::ControlFlow;

use candle_core::Device;
use studio_inference::llm::generate::{FinishReason, generate};
use studio_inference::llm::loader::{self, LoadedModel};
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::{TokenStream, Tokenizer};
use studio_tests::{Gpt2Naming, TinyGpt2, train_tokenizer, write_gpt2, write_gpt2_readable};

fn model() -> (tempfile::TempDir, LoadedModel) {
    let tmp = tempfile::tempdir().expect("tmp");
    write_gpt2(tmp.path(), TinyGpt2::default(), Gpt2Naming::Hub, 7);
    let m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    (tmp, m)
}

fn readable_model() -> (tempfile::TempDir, LoadedModel) {
    let tmp = tempfile::tempdir().expect("tmp");
    write_gpt2_readable(tmp.path(), TinyGpt2::default(), 7);
    let m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    (tmp, m)
}

fn run(
    m: &mut LoadedModel,
    prompt: &str,
    params: &SamplingParams,
) -> (Vec<u32>, String, FinishReason) {
    let ids = m.tokenizer.encode(prompt).expect("encode");
    let mut out_ids = Vec::new();
    let mut text = String::new();
    let stats = generate(
        &mut *m.model,
        &m.tokenizer,
        &m.eos_token_ids,
        &ids,
        params,
        &mut |s| {
            out_ids.extend(s.id);
            text.push_str(s.text);
            ControlFlow::Continue(())
        },
    )
    .expect("generate");
    assert_eq!(stats.generated_tokens, out_ids.len());
    assert_eq!(stats.prompt_tokens, ids.len());
    (out_ids, text, stats.finish)
}

#[test]
fn utf8_streams_whole_characters_across_token_boundaries() {
    let tok = Tokenizer::from_inner(train_tokenizer(300));
    let text = "Emoji: 🎨🖌️✨ — 日本語 and café 🚀!";
    let ids = tok.encode(text).expect("encode");
    // The test is only meaningful if some character really is split across tokens.
    let split = ids
        .iter()
        .any(|&id| tok.decode(&[id]).expect("decode").contains('\u{FFFD}'));
    assert!(split, "no multi-byte character was split; pick other text");
    let mut stream = TokenStream::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = stream.push(&tok, id).expect("push");
        assert!(
            !piece.contains('\u{FFFD}'),
            "partial character streamed: {piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&stream.finish(&tok).expect("finish"));
    assert_eq!(out, text);
}

#[test]
fn same_seed_same_output_other_seed_differs() {
    let (_d, mut m) = model();
    let p = |seed| SamplingParams {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        max_new_tokens: 24,
        ..SamplingParams::default()
    };
    let a = run(&mut m, "Hello there", &p(11));
    let b = run(&mut m, "Hello there", &p(11));
    let c = run(&mut m, "Hello there", &p(12));
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
    assert_ne!(a.0, c.0);
}

#[test]
fn greedy_is_deterministic_and_respects_max_tokens() {
    let (_d, mut m) = model();
    let mut p = SamplingParams::greedy(10);
    p.stop.clear();
    let a = run(&mut m, "The quick brown fox", &p);
    let b = run(&mut m, "The quick brown fox", &p);
    assert_eq!(a, b);
    if a.2 == FinishReason::Length {
        assert_eq!(a.0.len(), 10);
    } else {
        assert_eq!(a.2, FinishReason::EndOfText);
    }
}

#[test]
fn stop_string_ends_generation_and_is_not_emitted() {
    let (_d, mut m) = readable_model();
    let (_, full, _) = run(&mut m, "Hello", &SamplingParams::greedy(30));
    // Pick a stop string from the middle of the greedy output.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "output too short: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    assert!(!stop.contains('\u{FFFD}'), "{full:?}");
    let expected: String = full[..full.find(&stop).expect("present")].to_owned();
    let mut p = SamplingParams::greedy(30);
    p.stop = vec![stop.clone()];
    let (_, text, finish) = run(&mut m, "Hello", &p);
    assert_eq!(finish, FinishReason::StopString);
    assert_eq!(text, expected);
    assert!(!text.contains(&stop));
}

#[test]
fn generation_stops_when_the_context_is_full_and_long_prompts_are_refused() {
    let (_d, mut m) = model();
    let ctx = m.model.context_length();
    let long: Vec<u32> = (0..ctx as u32).map(|i| i % 200).collect();
    let err = generate(
        &mut *m.model,
        &m.tokenizer,
        &[],
        &long,
        &SamplingParams::greedy(4),
        &mut |_| ControlFlow::Continue(()),
    )
    .expect_err("too long");
    assert!(err.to_string().contains("context is 128 tokens"), "{err}");

    let near: Vec<u32> = long[..ctx - 3].to_vec();
    let stats = generate(
        &mut *m.model,
        &m.tokenizer,
        &[],
        &near,
        &SamplingParams::greedy(50),
        &mut |_| ControlFlow::Continue(()),
    )
    .expect("generate");
    assert_eq!(stats.finish, FinishReason::ContextFull);
    assert_eq!(stats.generated_tokens, 3);

    let err = generate(
        &mut *m.model,
        &m.tokenizer,
        &[],
        &[],
        &SamplingParams::greedy(4),
        &mut |_| ControlFlow::Continue(()),
    )
    .expect_err("empty");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn chat_context_drops_oldest_turns_but_keeps_the_last_message() {
    use studio_inference::llm::chat::{ChatFormat, ChatMessage, fit_to_context};
    let plain = ChatFormat::Plain { reason: None };
    let tok = Tokenizer::from_inner(train_tokenizer(300));
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(3);
    let mut msgs = Vec::new();
    for _ in 0..6 {
        msgs.push(ChatMessage::user(long.clone()));
        msgs.push(ChatMessage::assistant(long.clone()));
    }
    msgs.push(ChatMessage::user("Hello"));
    let fitted = fit_to_context(&tok, &plain, "Be nice.", &msgs, 128, 32).expect("fits");
    assert!(fitted.dropped_messages > 0);
    assert!(fitted.tokens.len() <= 128 - 32);
    let text = tok.decode(&fitted.tokens).expect("decode");
    assert!(text.starts_with("Be nice.\n\nUser:"), "{text}");
    assert!(text.ends_with("User: Hello\nAssistant:"), "{text}");
    let none_dropped = fit_to_context(&tok, &plain, "", &msgs[12..], 128, 32).expect("fits");
    assert_eq!(none_dropped.dropped_messages, 0);
    let huge = vec![ChatMessage::user(long.repeat(10))];
    assert!(fit_to_context(&tok, &plain, "", &huge, 128, 32).is_err());
}

/// The fitting keeps exactly what dropping one oldest turn at a time would keep (the rule it
/// replaced, which rendered the conversation once per dropped message), for conversations of
/// every length and turn pattern, and a 4,001-message chat fits with the newest turns that fit.
#[test]
fn chat_fitting_keeps_what_dropping_one_turn_at_a_time_keeps() {
    use studio_inference::llm::chat::{ChatFormat, ChatMessage, Role, fit_to_context};
    let plain = ChatFormat::Plain { reason: None };
    let tok = Tokenizer::from_inner(train_tokenizer(300));
    let reference = |msgs: &[ChatMessage], context: usize| -> Option<usize> {
        let mut dropped = 0;
        loop {
            let text = plain.render("Sys.", &msgs[dropped..]).expect("render");
            if tok.encode(&text).expect("encode").len() <= context - 32 {
                return Some(dropped);
            }
            if msgs.len() - dropped <= 1 {
                return None;
            }
            dropped += 1;
            while dropped < msgs.len() - 1 && msgs[dropped].role == Role::Assistant {
                dropped += 1;
            }
        }
    };
    let words = [
        "The quick brown fox. ",
        "Hi. ",
        "jumps over the lazy dog again and again. ",
    ];
    for n in 1..40 {
        let msgs: Vec<ChatMessage> = (0..n)
            .map(|i| {
                let text = words[(i * 7 + n) % 3].repeat(1 + i % 4);
                // Mostly alternating, with some runs of two user or two assistant messages.
                if (i % 2 == 0) ^ (i % 5 == 4) {
                    ChatMessage::user(text)
                } else {
                    ChatMessage::assistant(text)
                }
            })
            .collect();
        for context in [96, 160, 400] {
            let got = fit_to_context(&tok, &plain, "Sys.", &msgs, context, 32);
            match reference(&msgs, context) {
                Some(dropped) => {
                    let got = got.expect("fits");
                    assert_eq!(
                        got.dropped_messages, dropped,
                        "{n} messages, context {context}"
                    );
                    let text = plain.render("Sys.", &msgs[dropped..]).expect("render");
                    assert_eq!(got.tokens, tok.encode(&text).expect("encode"));
                }
                None => assert!(got.is_err(), "{n} messages, context {context}"),
            }
        }
    }
    let many: Vec<ChatMessage> = (0..4001)
        .map(|i| {
            if i % 2 == 0 {
                ChatMessage::user(format!("question {i}"))
            } else {
                ChatMessage::assistant(format!("answer {i}"))
            }
        })
        .collect();
    let fitted = fit_to_context(&tok, &plain, "", &many, 256, 32).expect("fits");
    assert_eq!(fitted.dropped_messages % 2, 0, "starts on a user message");
    assert!(fitted.dropped_messages > 3900);
    assert!(fitted.tokens.len() <= 256 - 32);
    // One more turn would not fit.
    let text = plain
        .render("", &many[fitted.dropped_messages - 2..])
        .expect("render");
    assert!(tok.encode(&text).expect("encode").len() > 256 - 32);
}
