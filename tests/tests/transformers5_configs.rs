//! `config.json` files as transformers 5 writes them (`tools/make_transformers5_configs.py`)
//! parse for every family, with the rope settings from `rope_parameters` and Gemma 3's
//! window pattern from `layer_types`.

use std::path::Path;

use studio_inference::diffusion::clip::ClipConfig;
use studio_inference::models::Family;
use studio_inference::models::gpt2;
use studio_inference::models::hf::FamilyConfig;
use studio_inference::models::hf_config::normalize;

fn config(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/transformers5-configs")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

#[test]
fn every_family_parses_a_transformers_5_config() {
    for (name, family) in [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen3", Family::Qwen3),
        ("phi3", Family::Phi3),
        ("gemma2", Family::Gemma2),
        ("gemma3_text", Family::Gemma3),
    ] {
        let v = config(name);
        let model_type = v["model_type"].as_str().expect("model_type");
        assert_eq!(Family::from_model_type(model_type), Some(family), "{name}");
        let parsed = FamilyConfig::parse(family, &v).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.vocab_size, 97, "{name}");
    }
}

#[test]
fn rope_settings_come_from_rope_parameters() {
    let llama = normalize(Family::Llama, &config("llama")).expect("llama");
    assert_eq!(llama["rope_theta"], 500_000.0);
    assert_eq!(llama["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(llama["rope_scaling"]["factor"], 8.0);
    let phi3 = normalize(Family::Phi3, &config("phi3")).expect("phi3");
    assert_eq!(phi3["rope_scaling"]["rope_type"], "longrope");
    assert_eq!(phi3["rope_scaling"]["long_factor"][0], 2.0);
    assert_eq!(phi3["partial_rotary_factor"], 1.0);
    assert_eq!(phi3["original_max_position_embeddings"], 128);
    let gemma3 = normalize(Family::Gemma3, &config("gemma3_text")).expect("gemma3");
    assert_eq!(gemma3["rope_theta"], 1_000_000.0);
    assert_eq!(gemma3["rope_local_base_freq"], 10_000.0);
    assert_eq!(gemma3["sliding_window_pattern"], 6);
}

#[test]
fn gpt2_and_clip_read_transformers_5_configs() {
    let g: gpt2::Config = serde_json::from_value(config("gpt2")).expect("gpt2");
    assert_eq!((g.n_embd, g.n_layer, g.n_head), (32, 2, 4));
    let c: ClipConfig = serde_json::from_value(config("clip_text")).expect("clip");
    assert_eq!((c.hidden_size, c.projection_dim), (32, Some(16)));
}
