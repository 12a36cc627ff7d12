//! Files written by transformers 5 (fixture made by `tools/make_qwen2_tf5_fixture.py`): a
//! Qwen2 whose `config.json` has `rope_parameters`, `"sliding_window": null`,
//! `"bos_token_id": null`, `layer_types` and `dtype` loads through the loader and computes
//! transformers' logits and greedy tokens.

use candle_core::Device;
use studio_inference::llm::generate::generate;
use studio_inference::llm::loader;
use studio_inference::llm::sampling::SamplingParams;
use studio_tests::{copy_fixture, json_ids, json_rows, word_prompt, write_word_level_tokenizer};

struct Expected {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn expected() -> Expected {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2-tf5");
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    Expected {
        input_ids: json_ids(&v, "input_ids"),
        logits: json_rows(&v, "logits"),
        greedy: json_ids(&v, "greedy_new_ids"),
    }
}

#[test]
fn a_transformers_5_qwen2_loads_and_matches_transformers() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("qwen2-tf5", tmp.path());
    write_word_level_tokenizer(tmp.path(), 97);
    let e = expected();
    let mut m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    assert_eq!(m.info.context_length, 128);
    assert_eq!(m.eos_token_ids, vec![96]);
    assert_eq!(
        m.tokenizer
            .encode(&word_prompt(&e.input_ids))
            .expect("encode"),
        e.input_ids
    );
    // The last position's logits: rope at 1e6 (from `rope_parameters`) or any other base
    // would move them.
    let last = m
        .model
        .forward_last(&e.input_ids, 0)
        .expect("forward")
        .to_vec1::<f32>()
        .expect("logits");
    let want = e.logits.last().expect("rows");
    let diff = last
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "max |logit diff| {diff}");
    m.model.clear_kv_cache();
    let mut ids = Vec::new();
    let eos = m.eos_token_ids.clone();
    generate(
        &mut *m.model,
        &m.tokenizer,
        &eos,
        &e.input_ids,
        &SamplingParams::greedy(e.greedy.len()),
        &mut |step| {
            ids.extend(step.id);
            std::ops::ControlFlow::Continue(())
        },
    )
    .expect("generate");
    assert_eq!(ids, e.greedy);
}

#[test]
fn an_unsupported_rope_type_is_refused_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("qwen2-tf5", tmp.path());
    write_word_level_tokenizer(tmp.path(), 97);
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    config["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "yarn",
        "factor": 4.0});
    std::fs::write(&path, config.to_string()).expect("write");
    let Err(e) = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}) else {
        panic!("a yarn rope on Qwen2 must be refused");
    };
    let text = e.to_string();
    assert!(
        text.contains("\"yarn\"") && text.contains("rope_type"),
        "{text}"
    );
}
