//! Writes a random-weight GGUF of a real model shape, for benchmarks:
//!
//! ```text
//! cargo run --release -p studio-tests --example write_random_gguf -- qwen2-0.5b q8_0 /tmp/q.gguf
//! studio bench generate --model /tmp/q.gguf
//! ```
//!
//! A fourth argument, a vocab-only GGUF such as llama.cpp's `models/ggml-vocab-qwen2.gguf`,
//! replaces the test tokenizer with that file's `tokenizer.*` metadata (a real Qwen2
//! tokenizer of 151,936 tokens), so llama.cpp's own tools load the same file for comparison.
//!
//! Shapes: `qwen2-0.5b` (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
//! vocab 151936, tied embeddings, rope base 1e6, q/k/v biases), `llama-3.2-1b` (hidden 2048,
//! 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied, rope base 5e5;
//! llama.cpp's `models/ggml-vocab-llama-bpe.gguf` gives it a real tokenizer), `tiny`. Types:
//! f32, f16, q8_0, q4_0 (for llama-quantize's mixes, write f16 and quantize it with them).

use std::path::PathBuf;

use candle_core::quantized::{GgmlDType, gguf_file};
use serde_json::json;
use studio_tests::families::write_family_with;
use studio_tests::gguf_writer::{GgufOptions, convert};

fn main() {
    let mut args = std::env::args().skip(1);
    let shape = args.next().unwrap_or_else(|| "qwen2-0.5b".to_owned());
    let dtype = match args.next().as_deref().unwrap_or("q8_0") {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        other => {
            eprintln!("unknown type `{other}` (f32, f16, q8_0, q4_0)");
            std::process::exit(2);
        }
    };
    let out = PathBuf::from(args.next().unwrap_or_else(|| format!("/tmp/{shape}.gguf")));
    let vocab = args.next().map(PathBuf::from);
    let overrides = match shape.as_str() {
        "qwen2-0.5b" => json!({
            "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151_936,
            "tie_word_embeddings": true, "rope_theta": 1_000_000.0,
            "max_position_embeddings": 32768, "sliding_window": 32768,
            "max_window_layers": 24, "rms_norm_eps": 1e-6,
        }),
        "llama-3.2-1b" => json!({
            "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128_256,
            "tie_word_embeddings": true, "rope_theta": 500_000.0,
            "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5, "head_dim": 64,
        }),
        "tiny" => json!({}),
        other => {
            eprintln!("unknown shape `{other}` (qwen2-0.5b, llama-3.2-1b, tiny)");
            std::process::exit(2);
        }
    };
    let family = if shape.starts_with("llama") {
        "llama"
    } else {
        "qwen2"
    };
    let dir = tempfile::tempdir().expect("tmp");
    write_family_with(dir.path(), family, &overrides, 0);
    let mut options = GgufOptions::with_dtype(dtype);
    if let Some(vocab) = vocab {
        let mut file = std::fs::File::open(&vocab).expect("open the vocab GGUF");
        let content = gguf_file::Content::read(&mut file).expect("read the vocab GGUF");
        options.overrides = content
            .metadata
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect();
        options.overrides.sort_by(|a, b| a.0.cmp(&b.0));
    }
    convert(dir.path(), &out, &options);
    println!("{}", out.display());
}
