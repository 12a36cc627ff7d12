//! llama.cpp GGUF files: Llama (Llama 2/3.x, Mistral, TinyLlama, SmolLM2), Qwen2/2.5, Qwen3,
//! Phi-3 and Gemma 2/3, quantized or not, with the tokenizer rebuilt from the file's metadata.
//!
//! - [`inspect`] reads the header and metadata only (no tensor data) and checks everything that
//!   can be checked without the weights: the magic and version, the architecture, every
//!   tensor's ggml type, that every tensor's data lies inside the file (a truncated download is
//!   caught here), the hyperparameters each family needs and the shapes of its tensors. A bad
//!   file is refused before a caller gives up the model it has loaded.
//! - [`load`] then reads the tensors one at a time from the open file (never the whole file
//!   into memory), through candle-transformers' quantized Llama, Qwen2, Qwen3 and Phi-3, and
//!   through this module's own Gemma 2/3 (candle's quantized Gemma 3 uses SiLU where Gemma uses
//!   GELU, and it has no Gemma 2).
//!
//! The module's files: `reader` (the header and metadata, read with every size bounded),
//! `hparams` (each family's hyperparameters and tensor shapes, checked) and `adapter` (candle's
//! `Content` for its loaders, the model chosen per family and device, and the [`CausalLm`]
//! adapter). Studio's quantized Gemma 2/3 is [`crate::models::quant_gemma`].
//!
//! Hyperparameter keys are normalized before they reach candle's loaders (which insist on
//! exact value types), defaults llama.cpp uses are filled in, and a loader panic is turned into
//! an error.

mod adapter;
mod hparams;
mod reader;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};

pub use adapter::load_gemma_cpu;
use adapter::{GgufCausalLm, Inner, build_model, content, tensor_table};
use hparams::{Hparams, MAX_ROPE_TABLE, hparams};
use reader::{Header, Meta, RawTensor, read_header};

use crate::error::{Error, Result};
use crate::llm::gguf_tokenizer::GgufVocab;
use crate::llm::text::Tokenizer;
use crate::models::CausalLm;
use crate::models::family::{self, Family};
use crate::models::tensors;

/// ggml tensor types this build can read (candle's CPU kernels), for error messages.
pub const SUPPORTED_GGML_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

/// A GGUF model ready to generate.
pub struct GgufModel {
    /// The model, its weights loaded on the device.
    pub model: Box<dyn CausalLm>,
    /// The tokenizer rebuilt from the file's metadata.
    pub tokenizer: Tokenizer,
    /// What the file says about itself, with the context length Studio uses.
    pub info: GgufInfo,
}

/// What a GGUF file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufInfo {
    /// `general.architecture`: `llama`, `qwen2`, `qwen3`, `phi3`, `gemma2` or `gemma3`.
    pub architecture: String,
    /// `general.name`.
    pub name: Option<String>,
    /// The context Studio can use: `{arch}.context_length`, capped where the implementation
    /// has a smaller limit (candle's quantized Llama: 4096 positions; Phi-3: the context
    /// before long-rope scaling, and at most what a 4 GiB up-front KV cache holds;
    /// Qwen2/Qwen3: 262144). `warnings` says when a cap applied.
    pub context_length: usize,
    /// `{arch}.context_length` as the file says.
    pub trained_context_length: usize,
    /// Rows of the output projection: the size of the logits.
    pub vocab_size: usize,
    /// Sum of every tensor's element count.
    pub parameters: usize,
    /// `general.file_type` by llama.cpp's name (`Q4_K_M`, `Q8_0`, `F16`, …), else the type
    /// most of the weights are stored in.
    pub file_type: String,
    /// Tokens that end generation: `tokenizer.ggml.eos_token_id`, the end-of-turn ids
    /// (`eot_token_id`, `eom_token_id`) and well-known end-of-turn control tokens.
    pub eos_token_ids: Vec<u32>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// The text of the BOS token, when the vocabulary has it.
    pub bos_token: Option<String>,
    /// The text of the `tokenizer.ggml.eos_token_id` token, when the vocabulary has it.
    pub eos_token: Option<String>,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
    /// Whether prompts should start with BOS (`tokenizer.ggml.add_bos_token`, else llama.cpp's
    /// default for the tokenizer). Encoding never adds it.
    pub add_bos_token: bool,
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub tokenizer_model: String,
    /// `tokenizer.ggml.pre`.
    pub tokenizer_pre: Option<String>,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// Things that load but are approximated (for example rope scaling the implementation
    /// does not apply); worth showing to the user.
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// ggml types

/// llama.cpp's name of a ggml tensor type (kept with the tensor reader).
pub use crate::models::tensors::ggml_type_name;

/// The candle type of a ggml type this build can compute with.
fn supported_ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// llama.cpp's name of a `general.file_type` (`llama_ftype`).
fn file_type_name(ft: u32) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// A checked header: everything `load` needs before reading tensor data.
struct Checked {
    header: Header,
    info: GgufInfo,
    hp: Hparams,
    vocab: GgufVocab,
}

fn check(path: &Path) -> Result<Checked> {
    let header = read_header(path)?;
    let meta = Meta {
        path,
        md: &header.metadata,
    };
    let arch = meta.string("general.architecture").ok_or_else(|| {
        Error::UnsupportedArchitecture(
            "unknown (the GGUF file has no `general.architecture`)".to_owned(),
            family::supported_gguf().to_owned(),
        )
    })?;
    let Some(family) = Family::from_gguf_architecture(&arch) else {
        return Err(Error::UnsupportedArchitecture(
            format!("{arch} (GGUF)"),
            family::supported_gguf().to_owned(),
        ));
    };

    // Every tensor must be of a type Studio computes with, and lie inside the file.
    let mut bytes_by_type: HashMap<u32, u64> = HashMap::new();
    for t in &header.tensors {
        let Some((block, _)) = tensors::type_layout(t.ggml_type) else {
            return Err(Error::InvalidParameter(format!(
                "{}: tensor `{}` is stored as {} (ggml type {}), which this version of Studio \
                 cannot compute with; it reads {SUPPORTED_GGML_TYPES}. Pick another \
                 quantization of this model (for example Q4_K_M or Q8_0).",
                path.display(),
                t.name,
                ggml_type_name(t.ggml_type),
                t.ggml_type
            )));
        };
        // Blocks never straddle rows: the row length (the innermost dimension) must be a
        // whole number of them.
        let row = t.dims.last().copied().unwrap_or(0);
        if row % block != 0 {
            return Err(Error::CorruptWeights {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{}` has rows of {row} values, not a whole number of {} blocks \
                     of {block}",
                    t.name,
                    ggml_type_name(t.ggml_type),
                ),
            });
        }
        let size = tensors::data_bytes(t.ggml_type, &t.dims);
        let end = size.and_then(|size| {
            header
                .data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(size))
        });
        if end.is_none_or(|end| end > header.file_size) {
            return Err(Error::CorruptWeights {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{}` lies past the end of the file ({} bytes): the file is \
                     truncated (an interrupted download?)",
                    t.name, header.file_size
                ),
            });
        }
        *bytes_by_type.entry(t.ggml_type).or_default() += size.unwrap_or_default();
    }

    let mut warnings = Vec::new();
    let hp = hparams(
        path,
        family,
        &arch,
        &header.metadata,
        &header.tensors,
        &mut warnings,
    )?;
    let vocab = GgufVocab::from_metadata(&header.metadata)?;
    if !matches!(vocab.model.as_str(), "gpt2" | "llama") {
        return Err(Error::Tokenizer(format!(
            "{}: the GGUF file uses a `{}` tokenizer; Studio reads `gpt2` (byte-level BPE) and \
             `llama` (SentencePiece) tokenizers",
            path.display(),
            vocab.model
        )));
    }
    if vocab.tokens.len() > hp.vocab {
        return Err(Error::Tokenizer(format!(
            "{}: the vocabulary has {} tokens but the model only {} embeddings",
            path.display(),
            vocab.tokens.len(),
            hp.vocab
        )));
    }
    if vocab.model == "gpt2" && vocab.merges.is_empty() {
        warnings.push(
            "the byte-level vocabulary has no merges (`tokenizer.ggml.merges`): text will \
             tokenize into many more tokens than the model was trained on"
                .to_owned(),
        );
    }
    if vocab.model == "gpt2"
        && crate::llm::gguf_tokenizer::pre_tokenization(vocab.pre.as_deref()).unknown
    {
        warnings.push(format!(
            "unknown pre-tokenizer `{}`: text is split the way GPT-2 does",
            vocab.pre.as_deref().unwrap_or_default()
        ));
    }

    let file_type = meta
        .usize("general.file_type")?
        .and_then(|ft| file_type_name(ft as u32))
        .map_or_else(
            || {
                bytes_by_type
                    .iter()
                    .max_by_key(|(t, b)| (**b, **t))
                    .map(|(t, _)| ggml_type_name(*t))
                    .unwrap_or_default()
            },
            str::to_owned,
        );
    let token = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
    let info = GgufInfo {
        architecture: arch,
        name: meta.string("general.name"),
        context_length: hp.context,
        trained_context_length: hp.trained_context,
        vocab_size: hp.vocab,
        parameters: header.tensors.iter().map(RawTensor::elements).sum(),
        file_type,
        eos_token_ids: vocab.end_of_generation_ids(&header.metadata),
        bos_token_id: vocab.bos_token_id,
        bos_token: token(vocab.bos_token_id),
        eos_token: token(vocab.eos_token_id),
        chat_template: meta.string("tokenizer.chat_template"),
        add_bos_token: vocab.add_bos(),
        tokenizer_model: vocab.model.clone(),
        tokenizer_pre: vocab.pre.clone(),
        file_size: header.file_size,
        warnings,
    };
    Ok(Checked {
        header,
        info,
        hp,
        vocab,
    })
}

/// Reads the header and metadata only (no tensor data) and checks everything that can be
/// checked without the weights, so a bad file is refused before the caller unloads the model
/// it has. The tokenizer is not built.
pub fn inspect(path: &Path) -> Result<GgufInfo> {
    Ok(check(path)?.info)
}

/// Builds only the tokenizer a GGUF file describes (header and metadata are read; no tensor
/// data).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let header = read_header(path)?;
    crate::llm::gguf_tokenizer::from_metadata(&header.metadata)
}

/// Reads tensor data from the file and reports progress as bytes arrive.
struct ProgressReader<'a> {
    file: File,
    total: u64,
    done: u64,
    last: f32,
    progress: &'a mut dyn FnMut(f32, &str),
}

const WEIGHTS_START: f32 = 0.1;
const WEIGHTS_END: f32 = 0.98;

impl Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.done += n as u64;
        let frac = (self.done as f32 / self.total.max(1) as f32).min(1.0);
        let at = WEIGHTS_START + (WEIGHTS_END - WEIGHTS_START) * frac;
        if at - self.last >= 0.01 {
            self.last = at;
            (self.progress)(at, "loading weights");
        }
        Ok(n)
    }
}

impl Seek for ProgressReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Loads a GGUF model onto `device`. `progress(fraction, message)` reports loading.
///
/// Tensors are read one at a time from the open file; the file is never read into memory as a
/// whole, so the weights exist once (as candle tensors).
pub fn load(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<GgufModel> {
    progress(0.0, "reading the GGUF header");
    let Checked {
        header,
        info,
        hp,
        vocab,
    } = check(path)?;
    progress(0.03, "building the tokenizer");
    // Its warnings are in `info.warnings` already.
    let tokenizer = Tokenizer::from_inner(vocab.build(&mut Vec::new())?);
    drop(vocab);
    let total: u64 = header
        .tensors
        .iter()
        .filter_map(|t| tensors::data_bytes(t.ggml_type, &t.dims))
        .sum();
    let table = tensor_table(&header);
    let ct = content(header, &hp);
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = ProgressReader {
        file,
        total,
        done: 0,
        last: WEIGHTS_START,
        progress,
    };
    (reader.progress)(WEIGHTS_START, "loading weights");
    let path_buf = path.to_path_buf();
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build_model(ct, &table, &mut reader, device, &hp, &path_buf)
    }));
    let inner = match loaded {
        Ok(r) => r?,
        Err(p) => {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "{}: loading the weights failed: {}",
                path_buf.display(),
                crate::panic_message(p.as_ref())
            ))));
        }
    };
    (reader.progress)(1.0, "loading weights");
    let mut info = info;
    let mut inner = inner;
    if let Inner::Studio(m) = &mut inner
        && matches!(hp.family, Family::Llama | Family::Phi3)
    {
        // Studio's model grows its rope tables and KV cache on demand and applies Llama's
        // rope frequency factors and Phi-3's long-rope scaling: the context limits of candle's
        // Llama (4096 positions) and Phi-3 (the original context, a KV cache allocated up
        // front) do not apply.
        info.context_length = hp.trained_context.min(MAX_ROPE_TABLE);
        info.warnings.retain(|w| !hp.candle_warnings.contains(w));
        // Phi-3 picks its long-rope factors by the context it runs with.
        m.set_context(info.context_length)?;
    }
    let model = GgufCausalLm {
        inner,
        context_length: info.context_length,
        max_context_length: info.context_length,
        vocab_size: hp.vocab,
        device: device.clone(),
        qwen3_decoded: false,
        fed: Vec::new(),
        pooling: hp.pooling.clone(),
    };
    Ok(GgufModel {
        model: Box::new(model),
        tokenizer,
        info,
    })
}
