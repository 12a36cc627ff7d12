//! Helpers for Studio's integration tests: tiny random-weight models of the real architectures,
//! written to disk in the real file formats, and a test tokenizer trained on the spot.
//!
//! Nothing here downloads anything; every file is made by the test that needs it.

pub mod code;
pub mod families;
pub mod gan;
pub mod gguf_writer;
pub mod hub_server;
pub mod iq4;
pub mod ldm;
pub mod logits;
pub mod sd;
pub mod torch_writer;
pub mod vgg;
pub mod worker_events;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// Text the test tokenizer is trained on: English, code, accents, CJK and emoji, so multi-byte
/// characters appear both as merged tokens and split across byte tokens.
pub const CORPUS: &[&str] = &[
    "Hello there! How are you today? I am fine, thank you.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "fn main() { println!(\"hello, world\"); }",
    "Café crème, naïve façade, jalapeño, São Paulo.",
    "日本語のテキストと中文文本。",
    "Emoji: 🎨🖌️✨ and more 🚀.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
];

/// The end-of-text token, as GPT-2 names it.
pub const EOS: &str = "<|endoftext|>";

/// Special tokens of today's chat templates, added to the test tokenizer so rendered prompts
/// tokenize as real models' do (one id per marker).
pub const CHAT_SPECIALS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "[INST]",
    "[/INST]",
];

/// Trains a GPT-2-style byte-level BPE tokenizer (vocabulary of about `vocab_size`).
pub fn train_tokenizer(vocab_size: usize) -> tokenizers::Tokenizer {
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
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            std::iter::once(EOS)
                .chain(CHAT_SPECIALS.iter().copied())
                .map(|t| AddedToken::from(t.to_owned(), true))
                .collect(),
        )
        .build();
    tokenizer
        .train(&mut trainer, CORPUS.iter())
        .expect("tokenizer trains");
    tokenizers::Tokenizer::from(tokenizer)
}

/// Shape of a tiny GPT-2.
#[derive(Debug, Clone, Copy)]
pub struct TinyGpt2 {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

impl Default for TinyGpt2 {
    fn default() -> Self {
        Self {
            vocab_size: 320,
            n_positions: 128,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
        }
    }
}

/// How the checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpt2Naming {
    /// The hub's own files: `wte.weight`, `h.0.…`, plus the `attn.bias` mask buffers.
    Hub,
    /// transformers' `save_pretrained`: `transformer.…`, with or without `lm_head.weight`.
    SavePretrained { lm_head: bool },
}

fn random(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

/// A word-level `tokenizer.json` of `vocab` tokens `t0` … `t{vocab-1}` split on whitespace, so
/// a fixture given as token ids (made by a reference implementation) can be prompted as text:
/// [`word_prompt`] writes the ids back as words.
pub fn write_word_level_tokenizer(dir: &Path, vocab: usize) {
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).expect("write tokenizer.json");
}

/// The prompt whose words [`write_word_level_tokenizer`]'s tokenizer encodes as `ids`.
pub fn word_prompt(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fixture's list of token ids (`expected.json`'s `input_ids`, `greedy_new_ids`, …).
pub fn json_ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not a list"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

/// A fixture's rows of floats (`expected.json`'s `logits`), as f32.
#[allow(clippy::cast_possible_truncation)] // the fixtures' f32 values, printed as f64
pub fn json_rows(v: &serde_json::Value, key: &str) -> Vec<Vec<f32>> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not a list"))
        .iter()
        .map(|r| {
            r.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a float") as f32)
                .collect()
        })
        .collect()
}

/// Copies the committed fixture folder `tests/fixtures/<name>` into `dir` (so a test can add
/// files, such as a tokenizer, without touching the fixture).
pub fn copy_fixture(name: &str, dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    for entry in std::fs::read_dir(&src).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy fixture file");
    }
}

/// Random GPT-2 tensors in the hub's naming (`Conv1D` weights stored `[in, out]`).
pub fn gpt2_tensors(cfg: TinyGpt2, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = cfg.n_embd;
    let mut t = HashMap::new();
    t.insert(
        "wte.weight".into(),
        random(&mut rng, &[cfg.vocab_size, c], 0.5),
    );
    t.insert(
        "wpe.weight".into(),
        random(&mut rng, &[cfg.n_positions, c], 0.2),
    );
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        for (name, shape) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            let mut x = random(&mut rng, &shape, 0.3);
            if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") {
                x = (x + 1.0).expect("add");
            }
            t.insert(format!("{p}.{name}"), x);
        }
    }
    t.insert(
        "ln_f.weight".into(),
        (random(&mut rng, &[c], 0.1) + 1.0).expect("add"),
    );
    t.insert("ln_f.bias".into(), random(&mut rng, &[c], 0.1));
    t
}

/// Writes a complete tiny GPT-2 folder: `config.json`, `model.safetensors` and a trained
/// `tokenizer.json`. Returns the tokenizer.
pub fn write_gpt2(
    dir: &Path,
    cfg: TinyGpt2,
    naming: Gpt2Naming,
    seed: u64,
) -> tokenizers::Tokenizer {
    std::fs::create_dir_all(dir).expect("create model dir");
    let tokenizer = train_tokenizer(cfg.vocab_size - 8);
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");
    let eos = tokenizer.token_to_id(EOS).expect("eos token");
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": eos,
        "eos_token_id": eos,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .expect("write config");
    let tensors = gpt2_tensors(cfg, seed);
    write_gpt2_weights(&dir.join("model.safetensors"), cfg, &tensors, naming);
    tokenizer
}

/// Like [`write_gpt2`] (transformers naming, explicit `lm_head.weight`), but the LM head only
/// ever favours tokens that decode to printable ASCII: the rows of all other tokens are zero and
/// the rest are scaled up. Random weights then produce readable (if meaningless) text, which
/// stop-string and UI tests need.
pub fn write_gpt2_readable(dir: &Path, cfg: TinyGpt2, seed: u64) -> tokenizers::Tokenizer {
    let tokenizer = write_gpt2(dir, cfg, Gpt2Naming::SavePretrained { lm_head: true }, seed);
    let mut tensors = gpt2_tensors(cfg, seed);
    let wte = tensors["wte.weight"].clone();
    let rows: Vec<Tensor> = (0..cfg.vocab_size)
        .map(|id| {
            let text = tokenizer.decode(&[id as u32], false).unwrap_or_default();
            let readable = !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '.');
            let row = wte.get(id).expect("row");
            if readable {
                (row * 4.0).expect("scale")
            } else {
                row.zeros_like().expect("zeros")
            }
        })
        .collect();
    let head = Tensor::stack(&rows, 0).expect("stack");
    tensors.insert("lm_head.weight".into(), head.clone());
    let mut out: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            if k == "lm_head.weight" {
                (k, v)
            } else {
                (format!("transformer.{k}"), v)
            }
        })
        .collect();
    out.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).expect("save");
    tokenizer
}

/// Writes hub-named tensors in the given naming style.
#[allow(clippy::implicit_hasher)] // callers pass the map `gpt2_tensors` returns
pub fn write_gpt2_weights(
    path: &Path,
    cfg: TinyGpt2,
    tensors: &HashMap<String, Tensor>,
    naming: Gpt2Naming,
) {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        let name = match naming {
            Gpt2Naming::Hub => name.clone(),
            Gpt2Naming::SavePretrained { .. } => format!("transformer.{name}"),
        };
        out.insert(name, t.clone());
    }
    match naming {
        Gpt2Naming::Hub => {
            // The hub's files carry the causal-mask buffers; loaders must ignore them.
            let n = cfg.n_positions;
            for i in 0..cfg.n_layer {
                let mask = Tensor::ones((1, 1, n, n), candle_core::DType::F32, &Device::Cpu)
                    .expect("mask");
                out.insert(format!("h.{i}.attn.bias"), mask);
            }
        }
        Gpt2Naming::SavePretrained { lm_head: true } => {
            out.insert("lm_head.weight".into(), tensors["wte.weight"].clone());
        }
        Gpt2Naming::SavePretrained { lm_head: false } => {}
    }
    candle_core::safetensors::save(&out, path).expect("save safetensors");
}

/// The largest absolute difference between two tensors of the same shape (any float dtype).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F32).expect("f32");
    let b = b.to_dtype(candle_core::DType::F32).expect("f32");
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

/// Runs `f` on a new thread named `name` (the workspace's `clippy.toml` refuses unnamed
/// threads, tests included: a name shows in a failing test's panic message).
///
/// # Panics
/// When the OS refuses a thread.
pub fn spawn_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .expect("spawn a test thread")
}
