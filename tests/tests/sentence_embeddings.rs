//! Sentence embeddings (`studio_inference::embed`) against sentence-transformers: the fixtures
//! in `tests/fixtures/sentence_embeddings` are tiny random-weight BERT encoders saved as
//! sentence-transformers saves them (the published 2.x layout with mean pooling, and the 6.x
//! layout with CLS pooling and `bert.`-prefixed names), with `SentenceTransformer.encode`'s
//! embeddings of a few texts (`tools/make_sentence_embedding_fixture.py`).

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

#[test]
fn embeddings_match_sentence_transformers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).expect("read"))
            .expect("json");
    let texts: Vec<&str> = expected["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("text"))
        .collect();
    for (name, pooling) in [("minilm-mean", Pooling::Mean), ("bge-cls", Pooling::Cls)] {
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
        for (i, text) in texts.iter().enumerate() {
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
