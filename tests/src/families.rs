//! Tiny random-weight checkpoints of today's model families, in Hugging Face layout.
//!
//! The tensors are created by building candle-transformers' model for the family on a
//! `VarMap`, so every tensor has exactly the name and shape the real checkpoints use; each is
//! then filled with seeded random values and saved as `model.safetensors` next to a
//! `config.json` in the family's own format and a trained `tokenizer.json`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::{gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::{EOS, train_tokenizer};

/// The families Studio loads through candle-transformers, by `model_type`.
pub const FAMILIES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
];

/// Vocabulary of the tiny models (the test tokenizer has a few fewer tokens).
pub const VOCAB: usize = 320;
/// Context length of the tiny models.
pub const CONTEXT: usize = 256;

/// The family's `config.json` for a tiny model.
pub fn family_config(model_type: &str, eos: u32) -> Value {
    let mut c = json!({
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
    });
    let extra = match model_type {
        "llama" => json!({"architectures": ["LlamaForCausalLM"]}),
        "mistral" => {
            json!({"architectures": ["MistralForCausalLM"], "sliding_window": null, "head_dim": null})
        }
        "qwen2" => json!({
            "architectures": ["Qwen2ForCausalLM"], "sliding_window": CONTEXT, "max_window_layers": 2,
            "use_sliding_window": false, "tie_word_embeddings": true, "rope_theta": 1_000_000.0,
        }),
        "qwen3" => json!({
            "architectures": ["Qwen3ForCausalLM"], "head_dim": 8, "attention_bias": false,
            "sliding_window": null, "max_window_layers": 2, "use_sliding_window": false,
            "tie_word_embeddings": true,
        }),
        "phi3" => json!({
            "architectures": ["Phi3ForCausalLM"], "rope_scaling": null,
            "original_max_position_embeddings": CONTEXT,
        }),
        "gemma2" => json!({
            "architectures": ["Gemma2ForCausalLM"], "head_dim": 8, "attention_bias": false,
            "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8, "sliding_window": 128,
        }),
        "gemma3_text" => json!({
            "architectures": ["Gemma3ForCausalLM"], "head_dim": 8, "attention_bias": false,
            "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": null,
            "attn_logit_softcapping": null, "query_pre_attn_scalar": 8, "sliding_window": 128,
            "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0,
        }),
        other => panic!("unknown family {other}"),
    };
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// Registers every tensor of the family's model in `vm` (names and shapes as in real files).
fn build(model_type: &str, config: &Value, vm: &VarMap) {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let cfg = |v: &Value| v.clone();
    match model_type {
        "llama" => {
            let c: llama::LlamaConfig = serde_json::from_value(cfg(config)).expect("config");
            llama::Llama::load(vb, &c.into_config(false)).expect("llama");
        }
        "mistral" => {
            let c: mistral::Config = serde_json::from_value(cfg(config)).expect("config");
            mistral::Model::new(&c, vb).expect("mistral");
        }
        "qwen2" => {
            let c: qwen2::Config = serde_json::from_value(cfg(config)).expect("config");
            qwen2::ModelForCausalLM::new(&c, vb).expect("qwen2");
        }
        "qwen3" => {
            let c: qwen3::Config = serde_json::from_value(cfg(config)).expect("config");
            qwen3::ModelForCausalLM::new(&c, vb).expect("qwen3");
        }
        "phi3" => {
            let c: phi3::Config = serde_json::from_value(cfg(config)).expect("config");
            phi3::Model::new(&c, vb).expect("phi3");
        }
        "gemma2" => {
            let c: gemma2::Config = serde_json::from_value(cfg(config)).expect("config");
            gemma2::Model::new(false, &c, vb).expect("gemma2");
        }
        "gemma3_text" => {
            let c: gemma3::Config = serde_json::from_value(cfg(config)).expect("config");
            gemma3::Model::new(false, &c, vb).expect("gemma3");
        }
        other => panic!("unknown family {other}"),
    }
}

/// Every `model_type` Studio loads from a folder: GPT-2, then [`FAMILIES`].
pub fn model_types() -> impl Iterator<Item = &'static str> {
    std::iter::once("gpt2").chain(FAMILIES.iter().copied())
}

/// Writes a tiny random-weight model of any of [`model_types`] to `dir`.
pub fn write_model(dir: &Path, model_type: &str, seed: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    if model_type == "gpt2" {
        crate::write_gpt2(
            dir,
            crate::TinyGpt2::default(),
            crate::Gpt2Naming::Hub,
            seed,
        );
    } else {
        write_family(dir, model_type, seed);
    }
}

/// Writes a tiny random-weight model of the family to `dir`; returns its tensor names.
pub fn write_family(dir: &Path, model_type: &str, seed: u64) -> Vec<String> {
    write_family_with(dir, model_type, &json!({}), seed)
}

/// Like [`write_family`], with `overrides` merged into the tiny config (for real shapes in
/// benchmarks, e.g. Qwen2-0.5B's hidden 896 × 24 layers).
pub fn write_family_with(
    dir: &Path,
    model_type: &str,
    overrides: &Value,
    seed: u64,
) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("dir");
    let tokenizer = train_tokenizer(VOCAB - 8);
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");
    let eos = tokenizer.token_to_id(EOS).expect("eos");
    let mut config = family_config(model_type, eos);
    if let (Some(c), Some(o)) = (config.as_object_mut(), overrides.as_object()) {
        c.extend(o.clone());
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .expect("write config");
    let vm = VarMap::new();
    build(model_type, &config, &vm);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names = Vec::new();
    {
        let data = vm.data().lock().expect("lock");
        let mut entries: Vec<_> = data.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (name, var) in entries {
            let shape = var.shape().clone();
            let n = shape.elem_count();
            let norm = name.ends_with("norm.weight");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let r = (rng.random::<f32>() * 2.0 - 1.0) * 0.4;
                    // RMSNorm weights near 1 (Gemma stores them as offsets from 1).
                    if norm && !model_type.starts_with("gemma") {
                        1.0 + r * 0.2
                    } else {
                        r
                    }
                })
                .collect();
            let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
            var.set(&t).expect("set");
            names.push(name.clone());
        }
    }
    vm.save(dir.join("model.safetensors")).expect("save");
    names
}
