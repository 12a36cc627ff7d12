//! Helpers for the code-assist tests: tokenizers that carry the fill-in-the-middle tokens of
//! each format (trained byte-level BPE, and GGUF metadata both byte-level and SentencePiece),
//! and a tiny random-weight Qwen2 "code model" whose tokenizer has Qwen2.5-Coder's FIM tokens.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use studio_inference::code::fim::FimFormat;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::families::{VOCAB, write_family_with};
use crate::gguf_writer::{gpt2_tokenizer_metadata, sentencepiece_vocab};
use crate::{CHAT_SPECIALS, CORPUS, EOS};

/// Code the test tokenizers are trained on (besides [`CORPUS`]).
pub const CODE_CORPUS: &[&str] = &[
    "def add(a, b):\n    return a + b\n",
    "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n",
    "for i in range(10):\n    print(i)\n",
    "if x == 0 {\n    return;\n}\n",
    "const x = [1, 2, 3].map((n) => n * 2);\n",
];

/// The special tokens of `format` (markers, stops, beginning of sequence) as its real
/// tokenizers spell them.
pub fn format_specials(format: FimFormat) -> Vec<&'static str> {
    match format {
        FimFormat::QwenCoder => vec![
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            "<|fim_pad|>",
            "<|file_sep|>",
            "<|repo_name|>",
        ],
        FimFormat::StarCoder => vec![
            "<fim_prefix>",
            "<fim_suffix>",
            "<fim_middle>",
            "<fim_pad>",
            "<file_sep>",
        ],
        FimFormat::CodeLlama => vec!["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
        FimFormat::DeepSeekCoder => vec![
            "<｜fim▁begin｜>",
            "<｜fim▁hole｜>",
            "<｜fim▁end｜>",
            "<｜end▁of▁sentence｜>",
            "<｜begin▁of▁sentence｜>",
        ],
        FimFormat::Codestral => vec!["[PREFIX]", "[SUFFIX]", "[MIDDLE]"],
    }
}

/// Trains a GPT-2-style byte-level BPE tokenizer on [`CORPUS`] and [`CODE_CORPUS`] whose
/// special tokens are `<|endoftext|>` (id 0), the chat markers, then `extra`.
pub fn train_code_tokenizer(vocab_size: usize, extra: &[&str]) -> tokenizers::Tokenizer {
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .expect("tokenizer builds");
    let mut specials: Vec<&str> = vec![EOS];
    specials.extend(CHAT_SPECIALS);
    specials.extend(
        extra
            .iter()
            .filter(|s| !specials.contains(s))
            .collect::<Vec<_>>(),
    );
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from((*t).to_owned(), true))
                .collect(),
        )
        .build();
    tokenizer
        .train(&mut trainer, CORPUS.iter().chain(CODE_CORPUS))
        .expect("tokenizer trains");
    tokenizers::Tokenizer::from(tokenizer)
}

/// A Studio tokenizer (byte-level BPE) with `format`'s special tokens.
pub fn fim_tokenizer(format: FimFormat) -> studio_inference::llm::text::Tokenizer {
    studio_inference::llm::text::Tokenizer::from_inner(train_code_tokenizer(
        VOCAB - 8,
        &format_specials(format),
    ))
}

/// The same tokenizer as [`fim_tokenizer`], written to GGUF metadata (`gpt2` model, specials
/// as control tokens) and rebuilt by Studio's GGUF tokenizer.
pub fn fim_gguf_tokenizer(format: FimFormat) -> studio_inference::llm::text::Tokenizer {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("tokenizer.json");
    train_code_tokenizer(VOCAB - 8, &format_specials(format))
        .save(&path, false)
        .expect("save");
    let md: HashMap<String, Value> = gpt2_tokenizer_metadata(&path, VOCAB, None, Some(0), "gpt2")
        .into_iter()
        .collect();
    studio_inference::llm::gguf_tokenizer::from_metadata(&md).expect("gguf tokenizer")
}

/// A SentencePiece GGUF tokenizer (the tiny fixture vocabulary) with `format`'s special tokens
/// appended as control tokens — how CodeLlama and Codestral GGUFs store theirs.
pub fn fim_sentencepiece_tokenizer(format: FimFormat) -> studio_inference::llm::text::Tokenizer {
    let mut v = sentencepiece_vocab();
    for s in format_specials(format) {
        v.tokens.push(s.to_owned());
        v.types.push(3);
        v.scores.push(0.0);
    }
    let md: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String("llama".to_owned())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(v.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(v.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(v.types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    studio_inference::llm::gguf_tokenizer::from_metadata(&md).expect("sentencepiece tokenizer")
}

/// Context length of the tiny code model: room for the action presets' prompts, which the tiny
/// test tokenizer spends about one token per character on.
pub const CODE_CONTEXT: usize = 2048;

/// Writes a tiny random-weight Qwen2 to `dir` whose tokenizer has Qwen2.5-Coder's FIM tokens
/// (`fim = true`) or none (`fim = false`, the plain test tokenizer).
pub fn write_code_model(dir: &Path, seed: u64, fim: bool) {
    let context = serde_json::json!({
        "max_position_embeddings": CODE_CONTEXT,
        "sliding_window": CODE_CONTEXT,
    });
    write_family_with(dir, "qwen2", &context, seed);
    if fim {
        train_code_tokenizer(VOCAB - 8, &format_specials(FimFormat::QwenCoder))
            .save(dir.join("tokenizer.json"), false)
            .expect("save tokenizer");
    }
}

/// Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab
/// 151936, tied embeddings), as `config.json` overrides for [`write_code_gguf`].
pub fn qwen2_0_5b_shape() -> serde_json::Value {
    serde_json::json!({
        "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151_936,
        "tie_word_embeddings": true, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 32768, "sliding_window": 32768,
        "max_window_layers": 24, "rms_norm_eps": 1e-6,
    })
}

/// Writes a random-weight Qwen2 GGUF of the shape `overrides` gives (e.g.
/// [`qwen2_0_5b_shape`]) whose tokenizer has Qwen2.5-Coder's FIM tokens: a code model for
/// `studio bench complete`.
pub fn write_code_gguf(
    out: &Path,
    overrides: &serde_json::Value,
    dtype: candle_core::quantized::GgmlDType,
) {
    let dir = tempfile::tempdir().expect("tmp");
    write_family_with(dir.path(), "qwen2", overrides, 0);
    train_code_tokenizer(VOCAB - 8, &format_specials(FimFormat::QwenCoder))
        .save(dir.path().join("tokenizer.json"), false)
        .expect("save tokenizer");
    crate::gguf_writer::convert(
        dir.path(),
        out,
        &crate::gguf_writer::GgufOptions::with_dtype(dtype),
    );
}
