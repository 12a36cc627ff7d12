//! Grammar-constrained sampling (`studio_inference::llm::grammar`) on tiny random-weight models
//! of real families: whatever the weights want, every seed's output is valid JSON for the
//! schema (or a sentence of the GBNF grammar), and generation ends when the grammar is
//! complete.

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::Device;
use serde_json::{Value, json};
use studio_inference::llm::generate::{FinishReason, generate_constrained};
use studio_inference::llm::grammar::schema::json_schema_to_gbnf;
use studio_inference::llm::grammar::{Constraint, Grammar, vocab_trie};
use studio_inference::llm::loader::{self, LoadedModel};
use studio_inference::llm::sampling::SamplingParams;

fn model(family: &str) -> (tempfile::TempDir, LoadedModel) {
    let tmp = tempfile::tempdir().expect("tmp");
    studio_tests::families::write_family(tmp.path(), family, 3);
    let m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    (tmp, m)
}

fn run(
    m: &mut LoadedModel,
    grammar: &Arc<Grammar>,
    seed: u64,
    max: usize,
) -> (String, FinishReason, usize) {
    let trie = vocab_trie(&m.tokenizer);
    let eos = m.eos_token_ids.clone();
    let mut c = Constraint::new(grammar.clone(), trie, &eos);
    let prompt = m.tokenizer.encode("Reply in JSON:").expect("prompt");
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        seed,
        max_new_tokens: max,
        ..SamplingParams::default()
    };
    let mut text = String::new();
    let stats = generate_constrained(
        &mut *m.model,
        &m.tokenizer,
        &eos,
        &prompt,
        &params,
        false,
        Some(&mut c),
        &mut |step| {
            text.push_str(step.text);
            ControlFlow::Continue(())
        },
    )
    .unwrap_or_else(|e| panic!("seed {seed}: {e} after {text:?}"));
    (text, stats.finish, c.masked_steps)
}

/// A schema whose every value is bounded, so each answer ends within the token budget.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "mood": {"enum": ["happy", "sad", "calm"]},
            "count": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "note": {"type": ["string", "null"], "maxLength": 4}
        },
        "required": ["name", "mood", "count"]
    })
}

fn check(v: &Value) {
    let o = v.as_object().expect("an object");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 6),
        "{v}"
    );
    assert!(
        ["happy", "sad", "calm"].contains(&o["mood"].as_str().expect("mood")),
        "{v}"
    );
    assert!(o["count"].is_i64() || o["count"].is_u64(), "{v}");
    if let Some(t) = o.get("tags") {
        let t = t.as_array().expect("tags");
        assert!(t.len() <= 3 && t.iter().all(Value::is_boolean), "{v}");
    }
    for key in o.keys() {
        assert!(
            ["name", "mood", "count", "tags", "note"].contains(&key.as_str()),
            "{v}"
        );
    }
    let keys: Vec<&String> = o.keys().collect();
    let order = ["name", "mood", "count", "tags", "note"];
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| order.iter().position(|o| o == k).expect("known"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order: {v}");
}

#[test]
fn every_seed_gives_json_that_fits_the_schema() {
    let grammar =
        Arc::new(Grammar::parse(&json_schema_to_gbnf(&schema()).expect("schema")).expect("gbnf"));
    for family in ["qwen2", "llama"] {
        let (_dir, mut m) = model(family);
        let mut masked = 0;
        for seed in 0..6 {
            let (text, finish, steps) = run(&mut m, &grammar, seed, 400);
            masked += steps;
            assert_eq!(
                finish,
                FinishReason::EndOfText,
                "{family} seed {seed}: {text:?}"
            );
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{family} seed {seed}: {e}: {text:?}"));
            check(&v);
        }
        assert!(
            masked > 0,
            "{family}: the random model was corrected at some steps"
        );
    }
}

#[test]
fn a_gbnf_grammar_cannot_be_escaped() {
    let grammar =
        Arc::new(Grammar::parse(r#"root ::= ("yes" | "no") " " [0-9]{2} "!""#).expect("gbnf"));
    let (_dir, mut m) = model("qwen2");
    for seed in 0..8 {
        let (text, finish, _) = run(&mut m, &grammar, seed, 50);
        assert_eq!(finish, FinishReason::EndOfText, "{text:?}");
        let (word, rest) = text.split_once(' ').expect("a space");
        assert!(word == "yes" || word == "no", "{text:?}");
        assert!(
            rest.len() == 3 && rest.ends_with('!') && rest[..2].bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
    }
}
