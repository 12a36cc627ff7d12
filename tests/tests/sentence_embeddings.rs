//! Sentence embeddings (`studio_inference::embed`) against sentence-transformers: the fixtures
//! in `tests/fixtures/sentence_embeddings` are tiny random-weight BERT encoders saved as
//! sentence-transformers saves them (the published 2.x layout with mean pooling, and the 6.x
//! layout with CLS pooling and `bert.`-prefixed names), with `SentenceTransformer.encode`'s
//! embeddings of a few texts (`tools/make_sentence_embedding_fixture.py`), and a NomicBERT
//! encoder as nomic-embed-text-v1.5 is published, checked against transformers' own
//! NomicBertModel (`tools/make_nomic_embedding_fixture.py`), and a Qwen3 decoder laid out as
//! Qwen3-Embedding is (`tools/make_qwen3_embedding_fixture.py`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;
use studio_inference::embed::{self, Pooling};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/sentence_embeddings")
        .join(name)
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).expect("read"))
        .expect("json")
}

/// Checks `dir`'s embeddings of the fixture's texts against `expected[name]`: within 1e-4 in
/// cosine and in every element.
fn check_against_sentence_transformers(dir: &Path, name: &str) {
    let expected = expected();
    let model = embed::load(dir, &Device::Cpu).expect(name);
    for (i, text) in expected["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .enumerate()
    {
        let text = text.as_str().expect("text");
        let ours = model.embed(text).expect("embed");
        let theirs: Vec<f64> = expected[name][i]
            .as_array()
            .expect("row")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert_eq!(ours.len(), theirs.len());
        let c = cosine(&ours, &theirs);
        assert!(1.0 - c < 1e-4, "{name} {text:?}: cosine {c}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "{name} {text:?}: differs by {worst}");
    }
}

/// Loads the fixture `name`, checking what it says it is: `pooling`, normalised, 32
/// dimensions, 48 tokens at most.
fn load_fixture(name: &str, pooling: Pooling) -> embed::EmbeddingModel {
    let model = embed::load(&fixture(name), &Device::Cpu).expect(name);
    let info = model.info();
    assert_eq!(
        (
            info.pooling,
            info.normalize,
            info.dimensions,
            info.max_tokens
        ),
        (pooling, true, 32, 48),
        "{name}"
    );
    model
}

#[test]
fn nomic_bert_matches_transformers_in_both_namings() {
    let dir = fixture("nomic-mean");
    load_fixture("nomic-mean", Pooling::Mean);
    check_against_sentence_transformers(&dir, "nomic-mean");

    // The same weights in transformers 5's names (separate q/k/v, `layers.N.self_attn`, …)
    // with its config keys give the same embeddings.
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("nomic-tf5");
    copy_dir(&dir, &copy);
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("tensors");
    let mut renamed = std::collections::HashMap::new();
    for (name, t) in tensors {
        let name = name
            .replace("emb_ln", "embeddings.LayerNorm")
            .replace("encoder.layers", "layers")
            .replace("attn.out_proj", "self_attn.o_proj")
            .replace("mlp.fc11", "mlp.up_proj")
            .replace("mlp.fc12", "mlp.gate_proj")
            .replace("mlp.fc2", "mlp.down_proj")
            .replace("norm1", "post_attention_layernorm")
            .replace("norm2", "post_mlp_layernorm");
        if let Some(prefix) = name.strip_suffix("attn.Wqkv.weight") {
            let parts = t.chunk(3, 0).expect("chunk");
            for (p, part) in ["q", "k", "v"].iter().zip(parts) {
                renamed.insert(format!("{prefix}self_attn.{p}_proj.weight"), part);
            }
        } else {
            renamed.insert(name, t);
        }
    }
    candle_core::safetensors::save(&renamed, copy.join("model.safetensors")).expect("save");
    let config = serde_json::json!({"model_type": "nomic_bert", "vocab_size": 128,
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "hidden_act": "silu",
        "layer_norm_eps": 1e-12, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}});
    std::fs::write(copy.join("config.json"), config.to_string()).expect("write");
    check_against_sentence_transformers(&copy, "nomic-mean");

    // Variants Studio would compute differently are refused by name.
    let published: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("read"))
            .expect("json");
    for (key, value, says) in [
        (
            "rotary_emb_fraction",
            serde_json::json!(0.5),
            "rotary_emb_fraction",
        ),
        (
            "rotary_emb_interleaved",
            serde_json::json!(true),
            "interleaved",
        ),
        ("prenorm", serde_json::json!(true), "pre-norm"),
        ("activation_function", serde_json::json!("gelu"), "gelu"),
        (
            "moe_every_n_layers",
            serde_json::json!(2),
            "mixture-of-experts",
        ),
        ("n_embd", serde_json::json!(1u64 << 40), "n_embd"),
    ] {
        let mut c = published.clone();
        c[key] = value;
        std::fs::write(copy.join("config.json"), c.to_string()).expect("write");
        let e = embed::load(&copy, &Device::Cpu).expect_err(key);
        assert!(e.to_string().contains(says), "{key}: {e}");
    }
}

#[test]
fn a_qwen3_decoder_pools_its_last_token_as_sentence_transformers_does() {
    // Laid out as Qwen3-Embedding is published: no output head, names without `model.`,
    // last-token pooling, a tokenizer that appends <|endoftext|>.
    let dir = fixture("qwen3-last");
    let model = load_fixture("qwen3-last", Pooling::LastToken);
    let ids = model.tokenize("the cat").expect("ids");
    assert_eq!(ids.last(), Some(&0), "ends with <|endoftext|>: {ids:?}");
    check_against_sentence_transformers(&dir, "qwen3-last");
    // The same weights under `model.` (as a Qwen3ForCausalLM folder names them).
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("prefixed");
    copy_dir(&dir, &copy);
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("tensors");
    let prefixed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&prefixed, copy.join("model.safetensors")).expect("save");
    check_against_sentence_transformers(&copy, "qwen3-last");
    // A config claiming a size its tensors don't have is named, not a panic.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("read"))
            .expect("json");
    config["intermediate_size"] = serde_json::json!(96);
    std::fs::write(copy.join("config.json"), config.to_string()).expect("write");
    let e = embed::load(&copy, &Device::Cpu).expect_err("wrong shape");
    assert!(e.to_string().contains("shape"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn embeddings_match_sentence_transformers() {
    for (name, pooling) in [("minilm-mean", Pooling::Mean), ("bge-cls", Pooling::Cls)] {
        load_fixture(name, pooling);
        check_against_sentence_transformers(&fixture(name), name);
    }
}

#[test]
fn long_inputs_and_foreign_modules_are_refused() {
    let model = embed::load(&fixture("minilm-mean"), &Device::Cpu).expect("load");
    let long = "cat ".repeat(100);
    let e = model.embed(&long).expect_err("too long");
    assert!(
        matches!(
            e,
            studio_inference::Error::PromptTooLong {
                tokens: 102,
                context: 48
            }
        ),
        "{e}"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("m");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
    ] {
        std::fs::copy(fixture("minilm-mean").join(f), copy.join(f)).expect("copy");
    }
    std::fs::write(
        copy.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    )
    .expect("write");
    let e = embed::load(&copy, &Device::Cpu).expect_err("dense");
    assert!(e.to_string().contains("`Dense` module"), "{e}");
    // An absurd config is refused before anything is allocated.
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("minilm-mean").join("config.json")).expect("read"),
    )
    .expect("json");
    config["hidden_size"] = serde_json::json!(1u64 << 40);
    std::fs::write(copy.join("config.json"), config.to_string()).expect("write");
    let e = embed::load(&copy, &Device::Cpu).expect_err("absurd");
    assert!(e.to_string().contains("hidden_size"), "{e}");
}
