//! GGUF files for tests, made the way llama.cpp's `convert_hf_to_gguf.py` makes them from the
//! tiny Hugging Face checkpoints [`crate::families::write_family`] writes: llama.cpp's tensor
//! names, Llama's q/k rows permuted for its interleaved rope, Phi-3's fused projections kept
//! fused, Gemma's norm weights stored with their +1, the hyperparameter keys llama.cpp writes
//! (and candle's loaders read), and the tokenizer as `tokenizer.ggml.*` metadata built from the
//! checkpoint's `tokenizer.json`.
//!
//! Also: a tiny SentencePiece vocabulary (`▁` pieces, `<0x00>`…`<0xFF>` byte tokens, scores),
//! a header-only writer for files whose tensor data is never read, and byte-level patches for
//! error tests.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

/// How to write a GGUF file from a Hugging Face folder.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    /// The type of 2-D weights whose rows are a whole number of blocks (1-D tensors and the
    /// rest stay F32, as llama.cpp keeps them).
    pub dtype: GgmlDType,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Use the tiny SentencePiece vocabulary instead of the folder's byte-level tokenizer.
    pub sentencepiece: bool,
    /// Metadata written in place of (or in addition to) what the conversion writes.
    pub overrides: Vec<(String, Value)>,
    /// Tensors left out (for missing-tensor tests).
    pub skip_tensors: Vec<String>,
    /// Per-tensor types, as llama-quantize's mixes (Q4_K_M…) write them: the first entry whose
    /// name ends the tensor's name gives its type instead of `dtype` (1-D tensors, and rows
    /// that are not whole blocks of it, still stay F32).
    pub tensor_types: Vec<(String, GgmlDType)>,
}

impl Default for GgufOptions {
    fn default() -> Self {
        Self {
            dtype: GgmlDType::F32,
            pre: "gpt2".to_owned(),
            chat_template: None,
            sentencepiece: false,
            overrides: Vec::new(),
            skip_tensors: Vec::new(),
            tensor_types: Vec::new(),
        }
    }
}

impl GgufOptions {
    pub fn with_dtype(dtype: GgmlDType) -> Self {
        Self {
            dtype,
            ..Self::default()
        }
    }
}

/// llama.cpp's `general.architecture` for a `config.json` `model_type`.
pub fn gguf_architecture(model_type: &str) -> &'static str {
    match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "phi3" => "phi3",
        "gemma2" => "gemma2",
        "gemma3_text" | "gemma3" => "gemma3",
        other => panic!("no GGUF conversion for {other}"),
    }
}

/// llama.cpp's `general.file_type` for a file whose weights are all of `dtype`.
pub fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        other => panic!("no file type for {other:?}"),
    }
}

fn usize_of(config: &Json, key: &str) -> Option<usize> {
    config.get(key).and_then(Json::as_u64).map(|v| v as usize)
}

fn f32_of(config: &Json, key: &str) -> Option<f32> {
    config.get(key).and_then(Json::as_f64).map(|v| v as f32)
}

/// `LlamaModel.permute` from convert_hf_to_gguf.py: reorders each head's rows so that
/// llama.cpp's interleaved rope (pairs 2i, 2i+1) computes what the checkpoint's half-split
/// rope (pairs i, i + d/2) does.
pub fn permute_for_interleaved_rope(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().expect("2-D weight");
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((rows, cols)))
        .expect("permute")
}

/// The llama.cpp name of a Hugging Face tensor name, for the family.
fn gguf_name(hf: &str, gemma: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".to_owned()),
        "model.norm.weight" => return Some("output_norm.weight".to_owned()),
        "lm_head.weight" => return Some("output.weight".to_owned()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let mapped = match suffix {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" | "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "post_attention_layernorm.weight" | "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// Converts the checkpoint's tensors to llama.cpp's names and conventions, in name order.
#[allow(clippy::implicit_hasher)] // callers pass what `candle_core::safetensors::load` returns
pub fn convert_tensors(
    model_type: &str,
    config: &Json,
    tensors: HashMap<String, Tensor>,
) -> Vec<(String, Tensor)> {
    let gemma = model_type.starts_with("gemma");
    let llama = matches!(model_type, "llama" | "mistral");
    let n_head = usize_of(config, "num_attention_heads").expect("heads");
    let n_kv = usize_of(config, "num_key_value_heads").unwrap_or(n_head);
    let mut out: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let new = gguf_name(&name, gemma).unwrap_or_else(|| panic!("unmapped tensor {name}"));
            let mut t = t;
            if llama && name.ends_with("self_attn.q_proj.weight") {
                t = permute_for_interleaved_rope(&t, n_head);
            }
            if llama && name.ends_with("self_attn.k_proj.weight") {
                t = permute_for_interleaved_rope(&t, n_kv);
            }
            // Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w.
            if gemma && name.ends_with("norm.weight") {
                t = (t + 1.0).expect("add");
            }
            (new, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Quantizes like llama.cpp does for a file of `dtype`: 1-D tensors and tensors whose rows
/// are not a whole number of blocks stay F32.
pub fn quantize(t: &Tensor, dtype: GgmlDType) -> QTensor {
    let dims = t.dims();
    let keep_f32 = dims.len() < 2 || !dims[dims.len() - 1].is_multiple_of(dtype.block_size());
    let dtype = if keep_f32 { GgmlDType::F32 } else { dtype };
    QTensor::quantize(&t.to_dtype(candle_core::DType::F32).expect("f32"), dtype).expect("quantize")
}

/// The hyperparameter keys convert_hf_to_gguf.py writes for the family (with the ones
/// candle's loaders require).
pub fn hparams_metadata(model_type: &str, config: &Json) -> Vec<(String, Value)> {
    let arch = gguf_architecture(model_type);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let n_head = usize_of(config, "num_attention_heads").expect("heads");
    let hidden = usize_of(config, "hidden_size").expect("hidden");
    let head_dim = usize_of(config, "head_dim").unwrap_or(hidden / n_head);
    let mut md = vec![
        (
            k("context_length"),
            u(usize_of(config, "max_position_embeddings").expect("ctx")),
        ),
        (k("embedding_length"), u(hidden)),
        (
            k("block_count"),
            u(usize_of(config, "num_hidden_layers").expect("layers")),
        ),
        (
            k("feed_forward_length"),
            u(usize_of(config, "intermediate_size").expect("ff")),
        ),
        (k("attention.head_count"), u(n_head)),
        (
            k("attention.head_count_kv"),
            u(usize_of(config, "num_key_value_heads").unwrap_or(n_head)),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(f32_of(config, "rms_norm_eps").expect("eps")),
        ),
        (
            k("rope.freq_base"),
            Value::F32(f32_of(config, "rope_theta").unwrap_or(10_000.0)),
        ),
    ];
    match arch {
        "llama" => {
            md.push((k("rope.dimension_count"), u(head_dim)));
            md.push((
                k("vocab_size"),
                u(usize_of(config, "vocab_size").expect("vocab")),
            ));
        }
        "phi3" => {
            md.push((k("rope.dimension_count"), u(head_dim)));
            md.push((
                k("rope.scaling.original_context_length"),
                u(usize_of(config, "original_max_position_embeddings")
                    .or(usize_of(config, "max_position_embeddings"))
                    .expect("ctx")),
            ));
        }
        "qwen3" | "gemma2" | "gemma3" => {
            md.push((k("attention.key_length"), u(head_dim)));
            md.push((k("attention.value_length"), u(head_dim)));
        }
        _ => {}
    }
    if arch == "gemma2" {
        if let Some(c) = f32_of(config, "attn_logit_softcapping") {
            md.push((k("attn_logit_softcapping"), Value::F32(c)));
        }
        if let Some(c) = f32_of(config, "final_logit_softcapping") {
            md.push((k("final_logit_softcapping"), Value::F32(c)));
        }
        if let Some(w) = usize_of(config, "sliding_window") {
            md.push((k("attention.sliding_window"), u(w)));
        }
    }
    if arch == "gemma3" {
        if let Some(c) = f32_of(config, "final_logit_softcapping") {
            md.push((k("final_logit_softcapping"), Value::F32(c)));
        }
        if let Some(w) = usize_of(config, "sliding_window") {
            md.push((k("attention.sliding_window"), u(w)));
        }
        // llama.cpp assumes every 6th layer is global; the tiny test model alternates.
        if let Some(p) = usize_of(config, "sliding_window_pattern") {
            md.push((k("attention.sliding_window_pattern"), u(p)));
        }
        if let Some(b) = f32_of(config, "rope_local_base_freq") {
            md.push((k("rope.freq_base_swa"), Value::F32(b)));
        }
    }
    md
}

/// Byte-level BPE vocabulary metadata (`tokenizer.ggml.model = gpt2`) from a Hugging Face
/// `tokenizer.json`, padded to `vocab_size` with `[PAD{i}]` tokens as llama.cpp's converter
/// pads it.
pub fn gpt2_tokenizer_metadata(
    tokenizer_json: &Path,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    pre: &str,
) -> Vec<(String, Value)> {
    let json: Json = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_json).expect("read tokenizer.json"),
    )
    .expect("tokenizer.json parses");
    let model = &json["model"];
    let vocab = model["vocab"].as_object().expect("vocab");
    let n = vocab_size.max(vocab.len());
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; n];
    for (tok, id) in vocab {
        let id = id.as_u64().expect("id") as usize;
        tokens[id].clone_from(tok);
        types[id] = 1;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().expect("id") as usize;
        added["content"]
            .as_str()
            .expect("content")
            .clone_into(&mut tokens[id]);
        types[id] = if added["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Json::String(s) => Value::String(s.clone()),
            Json::Array(pair) => Value::String(format!(
                "{} {}",
                pair[0].as_str().expect("a"),
                pair[1].as_str().expect("b")
            )),
            other => panic!("merge {other}"),
        })
        .collect();
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".to_owned()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            Value::String(pre.to_owned()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_owned(), Value::Array(merges)),
    ];
    if let Some(b) = bos {
        md.push(("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(b)));
    }
    if let Some(e) = eos {
        md.push(("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(e)));
    }
    md
}

/// A tiny SentencePiece-BPE vocabulary: `<unk>`, `<s>`, `</s>`, the 256 `<0xNN>` byte tokens,
/// single characters, then merged pieces whose scores make
/// "Hello world" → `▁Hello ▁world` and "naïve café" → `▁na ï ve ▁caf é`.
pub struct SentencePieceVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

/// The characters of the SentencePiece fixture (each a piece).
pub const SPM_CHARS: &[&str] = &[
    "\u{2581}", "H", "e", "l", "o", "w", "r", "d", "n", "a", "ï", "v", "c", "f", "é",
];
/// The merged pieces of the SentencePiece fixture, highest priority first.
pub const SPM_PIECES: &[&str] = &[
    "ll", "▁w", "or", "He", "▁He", "llo", "▁Hello", "▁wor", "ld", "▁world", "▁n", "▁na", "ve",
    "▁c", "af", "▁caf",
];

pub fn sentencepiece_vocab() -> SentencePieceVocab {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (i, c) in SPM_CHARS.iter().enumerate() {
        tokens.push((*c).to_owned());
        types.push(1);
        scores.push(-100.0 - i as f32);
    }
    for (i, p) in SPM_PIECES.iter().enumerate() {
        tokens.push((*p).to_owned());
        types.push(1);
        scores.push(-10.0 - i as f32);
    }
    SentencePieceVocab {
        tokens,
        scores,
        types,
    }
}

/// `tokenizer.ggml.*` metadata of the SentencePiece fixture (`tokenizer.ggml.model = llama`),
/// padded to `pad_to` tokens with unused ones.
pub fn sentencepiece_metadata(
    add_space_prefix: Option<bool>,
    pad_to: usize,
) -> Vec<(String, Value)> {
    let mut v = sentencepiece_vocab();
    while v.tokens.len() < pad_to {
        v.tokens.push(format!("[PAD{}]", v.tokens.len()));
        v.types.push(5);
        v.scores.push(-1e9);
    }
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("llama".to_owned()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(v.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_owned(),
            Value::Array(v.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(v.types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
    ];
    if let Some(p) = add_space_prefix {
        md.push(("tokenizer.ggml.add_space_prefix".to_owned(), Value::Bool(p)));
    }
    md
}

/// Writes a GGUF file with candle's writer.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let mut w = BufWriter::new(File::create(path).expect("create gguf"));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut w, &md, &ts).expect("write gguf");
    w.flush().expect("flush");
}

/// Replaces (or appends) metadata entries by key.
fn apply_overrides(md: &mut Vec<(String, Value)>, overrides: &[(String, Value)]) {
    for (k, v) in overrides {
        if let Some(slot) = md.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v.clone();
        } else {
            md.push((k.clone(), v.clone()));
        }
    }
}

/// Converts the Hugging Face folder `dir` (as [`crate::families::write_family`] writes it) to
/// the GGUF file `out`, as llama.cpp's converter would.
pub fn convert(dir: &Path, out: &Path, opts: &GgufOptions) {
    let config: Json = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("config parses");
    let model_type = config["model_type"]
        .as_str()
        .expect("model_type")
        .to_owned();
    let arch = gguf_architecture(&model_type);
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("load");
    let converted = convert_tensors(&model_type, &config, tensors);
    let qtensors: Vec<(String, QTensor)> = converted
        .iter()
        .filter(|(n, _)| !opts.skip_tensors.contains(n))
        .map(|(n, t)| {
            let dtype = opts
                .tensor_types
                .iter()
                .find(|(suffix, _)| n.ends_with(suffix.as_str()))
                .map_or(opts.dtype, |&(_, d)| d);
            (n.clone(), quantize(t, dtype))
        })
        .collect();

    let vocab_size = usize_of(&config, "vocab_size").expect("vocab");
    let mut md = vec![
        (
            "general.architecture".to_owned(),
            Value::String(arch.to_owned()),
        ),
        (
            "general.name".to_owned(),
            Value::String(format!("tiny-{model_type}")),
        ),
        (
            "general.file_type".to_owned(),
            Value::U32(file_type(opts.dtype)),
        ),
        ("general.quantization_version".to_owned(), Value::U32(2)),
    ];
    md.extend(hparams_metadata(&model_type, &config));
    if opts.sentencepiece {
        md.extend(sentencepiece_metadata(None, vocab_size));
    } else {
        let id = |k: &str| config.get(k).and_then(Json::as_u64).map(|v| v as u32);
        md.extend(gpt2_tokenizer_metadata(
            &dir.join("tokenizer.json"),
            vocab_size,
            id("bos_token_id"),
            id("eos_token_id"),
            &opts.pre,
        ));
    }
    if let Some(t) = &opts.chat_template {
        md.push((
            "tokenizer.chat_template".to_owned(),
            Value::String(t.clone()),
        ));
    }
    apply_overrides(&mut md, &opts.overrides);
    write_gguf(out, &md, &qtensors);
}

/// Writes the family's tiny checkpoint to `dir` and its GGUF conversion to `dir/model.gguf`.
pub fn write_family_gguf(dir: &Path, model_type: &str, seed: u64, opts: &GgufOptions) -> PathBuf {
    crate::families::write_family(dir, model_type, seed);
    let out = dir.join("model.gguf");
    convert(dir, &out, opts);
    out
}

// ---------------------------------------------------------------------------------------------
// Header-only files and patches

fn write_string(w: &mut impl Write, s: &str) {
    w.write_all(&(s.len() as u64).to_le_bytes()).expect("write");
    w.write_all(s.as_bytes()).expect("write");
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &Value) {
    let r = match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(b) => w.write_all(&[u8::from(*b)]),
        Value::String(s) => {
            write_string(w, s);
            Ok(())
        }
        Value::Array(items) => {
            let t = items.first().map_or(4, value_type);
            w.write_all(&t.to_le_bytes()).expect("write");
            w.write_all(&(items.len() as u64).to_le_bytes())
                .expect("write");
            for i in items {
                write_value(w, i);
            }
            Ok(())
        }
    };
    r.expect("write value");
}

/// One tensor of a header-only file: name, row-major dims, ggml type id.
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    /// Bytes its data takes.
    pub bytes: u64,
}

impl TensorEntry {
    /// An entry of a type candle knows (its size computed from the type).
    pub fn new(name: &str, dims: &[usize], dtype: GgmlDType, ggml_type: u32) -> Self {
        let elements: usize = dims.iter().product();
        Self {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ggml_type,
            bytes: (elements / dtype.block_size() * dtype.type_size()) as u64,
        }
    }
}

/// Writes a GGUF (v3) header for `tensors` (data offsets aligned to 32); returns the data's
/// length.
fn write_header(
    mut w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
) -> u64 {
    w.write_all(b"GGUF").expect("write");
    w.write_all(&3u32.to_le_bytes()).expect("write");
    w.write_all(&(tensors.len() as u64).to_le_bytes())
        .expect("write");
    w.write_all(&(metadata.len() as u64).to_le_bytes())
        .expect("write");
    for (k, v) in metadata {
        write_string(&mut w, k);
        w.write_all(&value_type(v).to_le_bytes()).expect("write");
        write_value(&mut w, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        write_string(&mut w, &t.name);
        w.write_all(&(t.dims.len() as u32).to_le_bytes())
            .expect("write");
        for d in t.dims.iter().rev() {
            w.write_all(&(*d as u64).to_le_bytes()).expect("write");
        }
        w.write_all(&t.ggml_type.to_le_bytes()).expect("write");
        w.write_all(&offset.to_le_bytes()).expect("write");
        offset += t.bytes.div_ceil(32) * 32;
    }
    offset
}

/// Writes a GGUF (v3) header for `tensors` and extends the file to the full data size without
/// writing the data (a sparse file on most file systems): a file that is huge on paper, for
/// showing that reading its header never touches the tensor data.
pub fn write_header_only(path: &Path, metadata: &[(String, Value)], tensors: &[TensorEntry]) {
    let mut w = BufWriter::new(File::create(path).expect("create"));
    let offset = write_header(&mut w, metadata, tensors);
    let pos = w.stream_position().expect("position");
    let data_start = pos.div_ceil(32) * 32;
    w.flush().expect("flush");
    let file = w.into_inner().expect("file");
    file.set_len(data_start + offset).expect("set_len");
}

/// One tensor of [`write_gguf_raw`]: name, row-major dims, ggml type id and its bytes as the
/// file stores them (any type, including those candle cannot write).
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A candle `QTensor`'s bytes under its ggml type id.
    pub fn from_qtensor(name: &str, t: &QTensor) -> Self {
        let ggml_type = match t.dtype() {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::BF16 => 30,
            other => studio_inference::quant::QuantFormat::from_ggml(other)
                .expect("a type Studio reads")
                .ggml_type(),
        };
        Self {
            name: name.to_owned(),
            dims: t.shape().dims().to_vec(),
            ggml_type,
            data: t.data().expect("tensor data").into_owned(),
        }
    }
}

/// Writes a GGUF (v3) file from raw tensor bytes (data aligned to 32, as llama.cpp writes).
pub fn write_gguf_raw(path: &Path, metadata: &[(String, Value)], tensors: &[RawTensor]) {
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
            bytes: t.data.len() as u64,
        })
        .collect();
    let mut w = BufWriter::new(File::create(path).expect("create"));
    write_header(&mut w, metadata, &entries);
    let pos = w.stream_position().expect("position");
    w.write_all(&vec![0u8; (pos.div_ceil(32) * 32 - pos) as usize])
        .expect("pad");
    for t in tensors {
        w.write_all(&t.data).expect("data");
        let pad = t.data.len().div_ceil(32) * 32 - t.data.len();
        w.write_all(&vec![0u8; pad]).expect("pad");
    }
    w.flush().expect("flush");
}

/// Changes the ggml type recorded for tensor `name` in a GGUF file's header (the data is left
/// as it is), for tests of types Studio cannot read.
/// Where tensor `name`'s directory entry keeps its dimension count (u64 name length, the name,
/// u32 n_dims, n_dims × u64, u32 type).
fn tensor_entry(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("tensor {name} not in header"));
    at + needle.len()
}

pub fn patch_tensor_type(path: &Path, name: &str, ggml_type: u32) {
    let mut bytes = std::fs::read(path).expect("read");
    let dims_at = tensor_entry(&bytes, name);
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().expect("4 bytes"));
    let type_at = dims_at + 4 + 8 * n_dims as usize;
    bytes[type_at..type_at + 4].copy_from_slice(&ggml_type.to_le_bytes());
    std::fs::write(path, bytes).expect("write");
}

/// Rewrites tensor `name`'s dimensions in GGUF order (the row length first); as many as the
/// tensor has.
pub fn patch_tensor_dims(path: &Path, name: &str, dims: &[u64]) {
    let mut bytes = std::fs::read(path).expect("read");
    let dims_at = tensor_entry(&bytes, name);
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().expect("4 bytes"));
    assert_eq!(
        n_dims as usize,
        dims.len(),
        "{name} has {n_dims} dimensions"
    );
    for (i, d) in dims.iter().enumerate() {
        let at = dims_at + 4 + 8 * i;
        bytes[at..at + 8].copy_from_slice(&d.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write");
}
