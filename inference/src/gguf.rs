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
//! Hyperparameter keys are normalized before they reach candle's loaders (which insist on
//! exact value types), defaults llama.cpp uses are filled in, and a loader panic is turned into
//! an error.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Content, TensorInfo, Value, VersionedMagic};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{
    quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gguf_tokenizer::GgufVocab;
use crate::models::CausalLm;
use crate::models::quant_llama::{GemmaOptions, QuantLlama};
use crate::models::tensors::{self, GgufTensors};
use crate::quant::{KernelPath, QuantFormat, preferred};
use crate::text::Tokenizer;

/// What this build reads from GGUF files, for error messages.
pub const SUPPORTED_GGUF_ARCHITECTURES: &str = "GGUF files of Llama (Llama 2/3.x, Mistral, TinyLlama, SmolLM2: `llama`), Qwen2/Qwen2.5 (`qwen2`), Qwen3 (`qwen3`), Phi-3 (`phi3`), Gemma 2 (`gemma2`) and Gemma 3 (`gemma3`)";

/// ggml tensor types this build can read (candle's CPU kernels).
pub const SUPPORTED_GGML_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

/// A GGUF model ready to generate.
pub struct GgufModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
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
    pub bos_token_id: Option<u32>,
    pub bos_token: Option<String>,
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

/// llama.cpp's name of a ggml tensor type.
pub fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown type {t}"),
    };
    name.to_owned()
}

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

// ---------------------------------------------------------------------------------------------
// Header

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
struct RawTensor {
    name: String,
    /// Row-major dimensions (the file stores them innermost first).
    dims: Vec<usize>,
    ggml_type: u32,
    /// Offset from the start of the tensor data.
    offset: u64,
}

impl RawTensor {
    fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The parsed header: metadata and tensor directory.
struct Header {
    version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<RawTensor>,
    data_offset: u64,
    file_size: u64,
}

const MAX_VALUE_DEPTH: usize = 8;
/// Largest width, head count, layer count or head size believed (real models are far below;
/// a corrupt value must not overflow shape arithmetic).
const MAX_DIM: usize = 1 << 24;
/// Context beyond which candle's precomputed rope tables (Qwen2, Qwen3) get too large.
const MAX_ROPE_TABLE: usize = 1 << 18;
/// Said of Llama 3.1+ files on candle's quantized Llama (GPUs, F32 files); Studio's own model
/// applies the factors, and the warning is dropped when it runs the file.
const LLAMA_ROPE_FREQS_WARNING: &str = "this Llama 3.1+ file's rope frequency factors \
     (`rope_freqs.weight`) are not applied by candle's quantized Llama; output can drift from \
     llama.cpp's, most on long prompts";
/// KV cache memory candle's quantized Phi-3 may allocate up front.
const PHI3_MAX_KV_BYTES: usize = 4 << 30;
/// Longest metadata string accepted (chat templates are kilobytes).
const MAX_STRING: u64 = 1 << 28;
/// Entries reserved up front at most; counts in a corrupt header must not allocate.
const MAX_RESERVE: usize = 1 << 16;
const MAX_DIMS: u32 = 4;

/// Reads the header with bounds checks against the file size, so a corrupt length never
/// allocates more than the file holds.
struct HeaderReader {
    r: BufReader<File>,
    pos: u64,
    file_size: u64,
    version: u32,
}

type Parse<T> = std::result::Result<T, String>;

impl HeaderReader {
    fn exact(&mut self, buf: &mut [u8]) -> Parse<()> {
        if (buf.len() as u64) > self.file_size.saturating_sub(self.pos) {
            return Err(format!(
                "the file ends inside its header (at byte {} of {}): it is truncated",
                self.pos, self.file_size
            ));
        }
        self.r
            .read_exact(buf)
            .map_err(|e| format!("reading the header: {e}"))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count or length: u32 in GGUF v1, u64 later.
    fn len(&mut self) -> Parse<u64> {
        if self.version == 1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    fn string(&mut self) -> Parse<String> {
        let n = self.len()?;
        if n > MAX_STRING {
            return Err(format!(
                "a string of {n} bytes at byte {}: the header is corrupt",
                self.pos
            ));
        }
        if n > self.remaining() {
            return Err(format!(
                "a string of {n} bytes at byte {} runs past the end of the file: it is \
                 truncated or corrupt",
                self.pos
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.exact(&mut v)?;
        // Strings should not be NUL-terminated, but some writers do it.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Parse<Value> {
        if depth > MAX_VALUE_DEPTH {
            return Err("metadata arrays are nested too deeply".to_owned());
        }
        Ok(match value_type {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("a boolean has the value {b}")),
            },
            8 => Value::String(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let n = self.len()?;
                let min_size: u64 = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if self.version == 1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => 12,
                    t => return Err(format!("unknown metadata value type {t}")),
                };
                if n.saturating_mul(min_size) > self.remaining() {
                    return Err(format!(
                        "an array of {n} values at byte {} runs past the end of the file: it \
                         is truncated or corrupt",
                        self.pos
                    ));
                }
                let mut items = Vec::with_capacity((n as usize).min(MAX_RESERVE));
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// How a file that is not GGUF starts, for the error message.
fn describe_magic(magic: [u8; 4]) -> String {
    if magic[0] == b'{' || magic.starts_with(b"PK") {
        return "a JSON or ZIP file".to_owned();
    }
    if magic.iter().all(u8::is_ascii_graphic) {
        format!("`{}`", String::from_utf8_lossy(&magic))
    } else {
        format!("bytes {magic:02x?}")
    }
}

fn read_header(path: &Path) -> Result<Header> {
    let corrupt = |message: String| Error::CorruptWeights {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = HeaderReader {
        r: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        file_size,
        version: 3,
    };
    if file_size < 8 {
        return Err(corrupt(format!(
            "the file is only {file_size} bytes long, too short for a GGUF header"
        )));
    }
    let magic: [u8; 4] = r.bytes().map_err(corrupt)?;
    if &magic != b"GGUF" {
        return Err(corrupt(format!(
            "not a GGUF file: it starts with {} instead of `GGUF`",
            describe_magic(magic)
        )));
    }
    let version = r.u32().map_err(corrupt)?;
    if !(1..=3).contains(&version) {
        return Err(corrupt(format!(
            "GGUF version {version} is not one Studio reads (1 to 3{})",
            if version > 0xffff {
                "; is it a big-endian file?"
            } else {
                ""
            }
        )));
    }
    r.version = version;
    let parse = |r: &mut HeaderReader| -> Parse<(HashMap<String, Value>, Vec<RawTensor>)> {
        let tensor_count = r.len()?;
        let kv_count = r.len()?;
        // Each metadata entry and tensor entry takes at least 13 and 20 bytes.
        if kv_count
            .saturating_mul(13)
            .saturating_add(tensor_count.saturating_mul(20))
            > r.remaining()
        {
            return Err(format!(
                "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
                 more than the file can hold: it is truncated or corrupt"
            ));
        }
        let mut metadata = HashMap::with_capacity((kv_count as usize).min(MAX_RESERVE));
        for _ in 0..kv_count {
            let key = r.string()?;
            let value_type = r.u32()?;
            let value = r
                .value(value_type, 0)
                .map_err(|e| format!("metadata `{key}`: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity((tensor_count as usize).min(MAX_RESERVE));
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has {n_dims} dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.len()?;
                dims.push(
                    usize::try_from(d).map_err(|_| format!("tensor `{name}`: dimension {d}"))?,
                );
            }
            dims.reverse();
            if dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
                return Err(format!(
                    "tensor `{name}` has impossible dimensions {dims:?}"
                ));
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(RawTensor {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        Ok((metadata, tensors))
    };
    let (metadata, tensors) = parse(&mut r).map_err(corrupt)?;
    let alignment = match metadata.get("general.alignment") {
        None => gguf_file::DEFAULT_ALIGNMENT,
        Some(v) => match value_u64(v) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(corrupt(format!("`general.alignment` is {v:?}"))),
        },
    };
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset,
        file_size,
    })
}

// ---------------------------------------------------------------------------------------------
// Metadata values

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        // Per-layer arrays whose entries are all equal are as good as one number.
        Value::Array(items) => {
            let first = value_u64(items.first()?)?;
            items
                .iter()
                .all(|i| value_u64(i) == Some(first))
                .then_some(first)
        }
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        other => value_u64(other).map(|x| x as f64),
    }
}

/// Typed access to the metadata, with errors that name the file and the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn corrupt(&self, message: String) -> Error {
        Error::CorruptWeights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.md.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("metadata `{key}` is not a count: {v:?}"))),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => match value_f64(v) {
                Some(x) if x.is_finite() => Ok(Some(x)),
                Some(x) => Err(self.corrupt(format!("metadata `{key}` is {x}, not finite"))),
                None => Err(self.corrupt(format!("metadata `{key}` is not a number: {v:?}"))),
            },
        }
    }

    fn req_f64(&self, key: &str) -> Result<f64> {
        self.f64(key)?
            .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
    }
}

// ---------------------------------------------------------------------------------------------
// Families and their hyperparameters

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
}

impl Family {
    fn from_architecture(arch: &str) -> Option<Self> {
        Some(match arch {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "phi3" => Self::Phi3,
            "gemma2" => Self::Gemma2,
            "gemma3" => Self::Gemma3,
            _ => return None,
        })
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// The hyperparameters read (and checked) from the metadata.
#[derive(Debug, Clone)]
struct Hparams {
    family: Family,
    arch: String,
    n_head: usize,
    n_kv_head: usize,
    n_layer: usize,
    hidden: usize,
    head_dim: usize,
    ff: usize,
    vocab: usize,
    eps: f64,
    rope_base: f64,
    trained_context: usize,
    context: usize,
    tied_output: bool,
    gemma: Option<GemmaParams>,
    /// Warnings (also in the file's warnings) that hold only where candle's model runs the
    /// file; dropped when Studio's CPU model runs it.
    candle_warnings: Vec<String>,
    /// Why candle's model cannot run the file (Studio's CPU model can).
    candle_refusal: Option<String>,
}

/// Gemma-specific hyperparameters.
#[derive(Debug, Clone)]
struct GemmaParams {
    attn_scale: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    sliding_window: Option<usize>,
    /// Per layer: whether it attends over the sliding window only.
    sliding: Vec<bool>,
    rope_local_base: f64,
    /// Linear rope scaling factor of the global layers.
    rope_global_factor: f64,
    qk_norm: bool,
}

impl GemmaParams {
    /// What Studio's CPU model takes of them (the q/k norms it finds by their tensors).
    #[allow(clippy::cast_possible_truncation)] // scales and rope bases in f32, as computed
    fn options(&self) -> GemmaOptions {
        GemmaOptions {
            attn_scale: self.attn_scale as f32,
            attn_softcap: self.attn_softcap.map(|c| c as f32),
            final_softcap: self.final_softcap.map(|c| c as f32),
            window: self.sliding_window,
            sliding: self.sliding.clone(),
            rope_local_base: self.rope_local_base as f32,
            rope_global_factor: self.rope_global_factor as f32,
        }
    }
}

struct Checker<'a> {
    path: &'a Path,
    tensors: HashMap<&'a str, &'a RawTensor>,
}

impl Checker<'_> {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.dims.as_slice())
    }

    fn expect(&self, name: &str, expected: &[usize]) -> Result<()> {
        match self.shape(name) {
            None => Err(Error::MissingTensor {
                path: self.path.to_path_buf(),
                name: name.to_owned(),
            }),
            Some(found) if found != expected => Err(Error::CorruptWeights {
                path: self.path.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {found:?}, but the file's metadata implies \
                     {expected:?}"
                ),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// Reads and checks the family's hyperparameters and tensor shapes.
fn hparams(
    path: &Path,
    family: Family,
    arch: &str,
    md: &HashMap<String, Value>,
    tensors: &[RawTensor],
    warnings: &mut Vec<String>,
) -> Result<Hparams> {
    let meta = Meta { path, md };
    let key = |k: &str| format!("{arch}.{k}");
    let corrupt = |message: String| Error::CorruptWeights {
        path: path.to_path_buf(),
        message,
    };
    let unsupported = |what: String| {
        Error::UnsupportedArchitecture(what, SUPPORTED_GGUF_ARCHITECTURES.to_owned())
    };
    let check = Checker {
        path,
        tensors: tensors.iter().map(|t| (t.name.as_str(), t)).collect(),
    };

    if let Some(n) = meta.usize(&key("expert_count"))?
        && n > 1
    {
        return Err(unsupported(format!(
            "{arch} with {n} experts (mixture-of-experts GGUF files are not supported)"
        )));
    }
    let n_head = meta.req_usize(&key("attention.head_count"))?;
    let n_kv_head = meta
        .usize(&key("attention.head_count_kv"))?
        .unwrap_or(n_head);
    let n_layer = meta.req_usize(&key("block_count"))?;
    let hidden = meta.req_usize(&key("embedding_length"))?;
    let trained_context = meta.req_usize(&key("context_length"))?;
    let eps = meta.req_f64(&key("attention.layer_norm_rms_epsilon"))?;
    if [n_head, n_kv_head, n_layer, hidden]
        .iter()
        .any(|&v| v == 0 || v > MAX_DIM)
        || trained_context == 0
    {
        return Err(corrupt(format!(
            "impossible hyperparameters: {n_head} heads, {n_kv_head} key/value heads, \
             {n_layer} layers, width {hidden}, context {trained_context}"
        )));
    }
    if n_head % n_kv_head != 0 {
        return Err(corrupt(format!(
            "{n_head} attention heads are not a multiple of {n_kv_head} key/value heads"
        )));
    }
    let key_length = meta.usize(&key("attention.key_length"))?;
    let head_dim = match family {
        Family::Qwen3 | Family::Gemma2 | Family::Gemma3 => key_length.unwrap_or(hidden / n_head),
        _ => {
            if hidden % n_head != 0 {
                return Err(corrupt(format!(
                    "width {hidden} is not a multiple of {n_head} heads"
                )));
            }
            let hd = hidden / n_head;
            if let Some(kl) = key_length
                && kl != hd
            {
                return Err(unsupported(format!(
                    "{arch} with a head size of {kl} (not width / heads = {hd}; e.g. Mistral \
                     Nemo), which candle's quantized {arch} cannot run"
                )));
            }
            hd
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_DIM {
        return Err(corrupt(format!("head size {head_dim} is not even")));
    }
    if let Some(rope_dim) = meta.usize(&key("rope.dimension_count"))?
        && rope_dim != head_dim
    {
        return Err(unsupported(format!(
            "{arch} with rotary embeddings on {rope_dim} of {head_dim} head dimensions \
             (partial rotary)"
        )));
    }
    let rope_base = meta.f64(&key("rope.freq_base"))?.unwrap_or(match family {
        Family::Gemma3 => 1_000_000.0,
        _ => 10_000.0,
    });
    for (name, v) in [
        ("attention.layer_norm_rms_epsilon", eps),
        ("rope.freq_base", rope_base),
    ] {
        if v <= 0.0 {
            return Err(corrupt(format!(
                "metadata `{arch}.{name}` is {v}, not positive"
            )));
        }
    }

    // Embeddings and output.
    let Some(embd) = check.shape("token_embd.weight") else {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".to_owned(),
        });
    };
    if embd.len() != 2 || embd[1] != hidden {
        return Err(corrupt(format!(
            "tensor `token_embd.weight` has shape {embd:?}, expected [vocab, {hidden}]"
        )));
    }
    let vocab = embd[0];
    let tied_output = check.shape("output.weight").is_none();
    if !tied_output {
        check.expect("output.weight", &[vocab, hidden])?;
    }
    check.expect("output_norm.weight", &[hidden])?;

    // Per-layer tensors.
    let q_dim = n_head * head_dim;
    let kv_dim = n_kv_head * head_dim;
    let ff = match family {
        Family::Phi3 => {
            let ff = meta.req_usize(&key("feed_forward_length"))?;
            if ff == 0 || ff > MAX_DIM {
                return Err(corrupt(format!("impossible feed-forward width {ff}")));
            }
            check.expect("blk.0.ffn_up.weight", &[2 * ff, hidden])?;
            ff
        }
        _ => match check.shape("blk.0.ffn_gate.weight") {
            Some([ff, _]) => *ff,
            _ => {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: "blk.0.ffn_gate.weight".to_owned(),
                });
            }
        },
    };
    for i in 0..n_layer {
        let t = |n: &str| format!("blk.{i}.{n}");
        check.expect(&t("attn_norm.weight"), &[hidden])?;
        check.expect(&t("attn_output.weight"), &[hidden, q_dim])?;
        check.expect(&t("ffn_down.weight"), &[hidden, ff])?;
        if family == Family::Phi3 {
            check.expect(&t("attn_qkv.weight"), &[q_dim + 2 * kv_dim, hidden])?;
            check.expect(&t("ffn_up.weight"), &[2 * ff, hidden])?;
        } else {
            check.expect(&t("attn_q.weight"), &[q_dim, hidden])?;
            check.expect(&t("attn_k.weight"), &[kv_dim, hidden])?;
            check.expect(&t("attn_v.weight"), &[kv_dim, hidden])?;
            check.expect(&t("ffn_gate.weight"), &[ff, hidden])?;
            check.expect(&t("ffn_up.weight"), &[ff, hidden])?;
        }
        if family.is_gemma() {
            check.expect(&t("post_attention_norm.weight"), &[hidden])?;
            check.expect(&t("post_ffw_norm.weight"), &[hidden])?;
        }
        check.expect(&t("ffn_norm.weight"), &[hidden])?;
        if family == Family::Qwen2 {
            check.expect(&t("attn_q.bias"), &[q_dim])?;
            check.expect(&t("attn_k.bias"), &[kv_dim])?;
            check.expect(&t("attn_v.bias"), &[kv_dim])?;
        }
        if matches!(family, Family::Qwen3 | Family::Gemma3) {
            check.expect(&t("attn_q_norm.weight"), &[head_dim])?;
            check.expect(&t("attn_k_norm.weight"), &[head_dim])?;
        }
    }

    // What each implementation can use of the context, and what it approximates.
    let mut context = trained_context;
    let mut candle_warnings = Vec::new();
    let mut candle_refusal = None;
    match family {
        Family::Llama => {
            context = context.min(quantized_llama::MAX_SEQ_LEN);
            if check.shape("rope_freqs.weight").is_some() {
                candle_warnings.push(LLAMA_ROPE_FREQS_WARNING.to_owned());
            }
            if let Some(kind) = meta.string(&key("rope.scaling.type"))
                && kind != "none"
            {
                warnings.push(format!(
                    "`{kind}` rope scaling is not applied by candle's quantized Llama"
                ));
            }
        }
        Family::Phi3 => {
            if let Some(orig) = meta.usize(&key("rope.scaling.original_context_length"))?
                && orig > 0
            {
                context = context.min(orig);
            }
            if (rope_base - 10_000.0).abs() > 1e-3 {
                candle_refusal = Some(format!(
                    "phi3 with rope.freq_base {rope_base} (candle's quantized Phi-3, which runs \
                     it on the GPU, assumes 10000; e.g. Phi-4)"
                ));
            }
            if check.shape("rope_factors_short.weight").is_some()
                || check.shape("rope_factors_long.weight").is_some()
            {
                candle_warnings.push(
                    "this Phi-3 file's long-rope factors are not applied by candle's quantized \
                     Phi-3; the context is limited to the original training context and \
                     output can drift from llama.cpp's"
                        .to_owned(),
                );
            }
            if tied_output {
                warnings.push(
                    "no `output.weight`: the output projection reuses the token embeddings"
                        .to_owned(),
                );
            }
            // candle's Phi-3 allocates the KV cache (F32) for the whole context up front.
            let per_position = 8usize
                .saturating_mul(n_layer)
                .saturating_mul(n_kv_head)
                .saturating_mul(head_dim);
            let affordable = (PHI3_MAX_KV_BYTES / per_position.max(1)).max(1);
            if context > affordable {
                candle_warnings.push(format!(
                    "the context is limited to {affordable} tokens: candle's quantized Phi-3 \
                     allocates its KV cache for the whole context when generation starts"
                ));
                context = affordable;
            }
        }
        Family::Qwen2 | Family::Qwen3 if context > MAX_ROPE_TABLE => {
            // candle's Qwen2/Qwen3 precompute rope tables for the whole context.
            warnings.push(format!(
                "the context is limited to {MAX_ROPE_TABLE} of the model's {trained_context} \
                 tokens"
            ));
            context = MAX_ROPE_TABLE;
        }
        _ => {}
    }

    warnings.extend(candle_warnings.iter().cloned());

    let gemma = if family.is_gemma() {
        Some(gemma_params(
            &meta, family, arch, n_layer, n_head, hidden, head_dim, warnings,
        )?)
    } else {
        None
    };
    Ok(Hparams {
        family,
        arch: arch.to_owned(),
        n_head,
        n_kv_head,
        n_layer,
        hidden,
        head_dim,
        ff,
        vocab,
        eps,
        rope_base,
        trained_context,
        context,
        tied_output,
        candle_warnings,
        candle_refusal,
        gemma,
    })
}

#[allow(clippy::too_many_arguments)]
fn gemma_params(
    meta: &Meta<'_>,
    family: Family,
    arch: &str,
    n_layer: usize,
    n_head: usize,
    hidden: usize,
    head_dim: usize,
    warnings: &mut Vec<String>,
) -> Result<GemmaParams> {
    let key = |k: &str| format!("{arch}.{k}");
    // llama.cpp: 1/sqrt(head size), except the 27B models (46 and 62 layers), which scale by
    // 1/sqrt(width / heads) (their `query_pre_attn_scalar`).
    let big = matches!(
        (family, n_layer),
        (Family::Gemma2, 46) | (Family::Gemma3, 62)
    );
    let attn_scale = match meta.f64(&key("attention.scale"))? {
        Some(s) if s > 0.0 => s,
        _ if big => 1.0 / ((hidden / n_head) as f64).sqrt(),
        _ => 1.0 / (head_dim as f64).sqrt(),
    };
    let softcap = |k: &str, default: Option<f64>| -> Result<Option<f64>> {
        Ok(match meta.f64(&key(k))? {
            Some(c) if c > 0.0 => Some(c),
            Some(_) => None,
            None => default,
        })
    };
    let (attn_softcap, final_softcap) = if family == Family::Gemma2 {
        (
            softcap("attn_logit_softcapping", Some(50.0))?,
            softcap("final_logit_softcapping", Some(30.0))?,
        )
    } else {
        (None, softcap("final_logit_softcapping", None)?)
    };
    let sliding_window = meta
        .usize(&key("attention.sliding_window"))?
        .filter(|&w| w > 0);
    // Which layers slide: an explicit per-layer list, or a period (every `period`-th layer is
    // global); llama.cpp's defaults are 2 for Gemma 2 and 6 for Gemma 3.
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding = if let Some(Value::Array(flags)) = meta.md.get(&pattern_key) {
        let flags: Vec<bool> = flags
            .iter()
            .map(|v| matches!(v, Value::Bool(true)))
            .collect();
        if flags.len() != n_layer {
            return Err(meta.corrupt(format!(
                "`{pattern_key}` has {} entries for {n_layer} layers",
                flags.len()
            )));
        }
        flags
    } else {
        let period = meta
            .usize(&pattern_key)?
            .or(meta.usize(&key("attention.sliding_window_type"))?)
            .unwrap_or(if family == Family::Gemma2 { 2 } else { 6 });
        (0..n_layer)
            .map(|i| period > 1 && (i + 1) % period != 0)
            .collect()
    };
    let sliding = if sliding_window.is_some() {
        sliding
    } else {
        vec![false; n_layer]
    };
    let rope_local_base = if family == Family::Gemma3 {
        meta.f64(&key("rope.freq_base_swa"))?
            .or(meta.f64(&key("rope.local_freq_base"))?)
            .unwrap_or(10_000.0)
    } else {
        meta.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0)
    };
    let rope_global_factor = match meta.string(&key("rope.scaling.type")).as_deref() {
        Some("linear") => meta
            .f64(&key("rope.scaling.factor"))?
            .filter(|f| *f > 0.0)
            .unwrap_or(1.0),
        Some("none") | None => 1.0,
        Some(other) => {
            warnings.push(format!("`{other}` rope scaling is not applied"));
            1.0
        }
    };
    Ok(GemmaParams {
        attn_scale,
        attn_softcap,
        final_softcap,
        sliding_window,
        sliding,
        rope_local_base,
        rope_global_factor,
        qk_norm: family == Family::Gemma3,
    })
}

// ---------------------------------------------------------------------------------------------
// Inspect

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
            SUPPORTED_GGUF_ARCHITECTURES.to_owned(),
        )
    })?;
    let Some(family) = Family::from_architecture(&arch) else {
        return Err(Error::UnsupportedArchitecture(
            format!("{arch} (GGUF)"),
            SUPPORTED_GGUF_ARCHITECTURES.to_owned(),
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
        && crate::gguf_tokenizer::pre_tokenization(vocab.pre.as_deref()).unknown
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
    crate::gguf_tokenizer::from_metadata(&header.metadata)
}

// ---------------------------------------------------------------------------------------------
// Load

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

/// The header as candle's `Content`, with hyperparameter keys in the exact value types
/// candle's loaders read and llama.cpp's defaults filled in.
fn content(header: Header, hp: &Hparams) -> Content {
    let mut metadata = header.metadata;
    let arch = &hp.arch;
    let mut set_u32 = |k: &str, v: usize| {
        metadata.insert(format!("{arch}.{k}"), Value::U32(v as u32));
    };
    set_u32("attention.head_count", hp.n_head);
    set_u32("attention.head_count_kv", hp.n_kv_head);
    set_u32("block_count", hp.n_layer);
    set_u32("embedding_length", hp.hidden);
    set_u32("rope.dimension_count", hp.head_dim);
    set_u32("attention.key_length", hp.head_dim);
    set_u32("attention.value_length", hp.head_dim);
    set_u32("feed_forward_length", hp.ff);
    // The rope tables (and Phi-3's preallocated KV cache) are sized by this.
    set_u32("context_length", hp.context);
    metadata.insert(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(hp.eps as f32),
    );
    metadata.insert(
        format!("{arch}.rope.freq_base"),
        Value::F32(hp.rope_base as f32),
    );
    // candle's quantized Qwen3 builds its rope tables in this dtype (F16 when absent, which
    // loses positions past 2048); the model computes in F32.
    metadata.insert("general.dtype".to_owned(), Value::U32(0));

    let mut tensor_infos: HashMap<String, TensorInfo> = header
        .tensors
        .iter()
        .filter_map(|t| {
            Some((
                t.name.clone(),
                TensorInfo {
                    ggml_dtype: supported_ggml_type(t.ggml_type)?,
                    shape: candle_core::Shape::from(t.dims.clone()),
                    offset: t.offset,
                },
            ))
        })
        .collect();
    if hp.tied_output
        && hp.family == Family::Phi3
        && let Some(embd) = tensor_infos.get("token_embd.weight")
    {
        // candle's Phi-3 requires an output projection; tied models reuse the embeddings.
        let alias = TensorInfo {
            ggml_dtype: embd.ggml_dtype,
            shape: embd.shape.clone(),
            offset: embd.offset,
        };
        tensor_infos.insert("output.weight".to_owned(), alias);
    }
    Content {
        magic: match header.version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            _ => VersionedMagic::GgufV3,
        },
        metadata,
        tensor_infos,
        tensor_data_offset: header.data_offset,
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
    };
    Ok(GgufModel {
        model: Box::new(model),
        tokenizer,
        info,
    })
}

/// The header's tensor directory as Studio's own reader reads it (every type Studio reads).
fn tensor_table(header: &Header) -> GgufTensors {
    let mut table = GgufTensors::new(header.data_offset);
    for t in &header.tensors {
        table.insert(
            t.name.clone(),
            tensors::TensorInfo {
                ggml_type: t.ggml_type,
                dims: t.dims.clone(),
                offset: t.offset,
            },
        );
    }
    table
}

fn build_model(
    ct: Content,
    table: &GgufTensors,
    reader: &mut ProgressReader<'_>,
    device: &Device,
    hp: &Hparams,
    path: &Path,
) -> Result<Inner> {
    // The file was checked already: what fails now is reading it or the device (memory).
    let weights = |e: candle_core::Error| {
        Error::Candle(candle_core::Error::Msg(format!(
            "{}: loading the weights failed: {e}",
            path.display()
        )))
    };
    if device.is_cpu() && studio_kernels_fit(table, hp.family) {
        let model = match &hp.gemma {
            Some(g) => QuantLlama::from_gguf_gemma(&ct, table, reader, g.options()),
            None => QuantLlama::from_gguf_tensors(&ct, table, reader),
        }
        .map_err(|e| match e {
            Error::Candle(e) => weights(e),
            other => weights(candle_core::Error::Msg(other.to_string())),
        })?;
        return Ok(Inner::Studio(Box::new(model)));
    }
    if let Some(why) = &hp.candle_refusal {
        return Err(Error::UnsupportedArchitecture(
            format!("{why}; Studio's own kernels run it on the CPU"),
            SUPPORTED_GGUF_ARCHITECTURES.to_owned(),
        ));
    }
    // Tensors of the types candle lacks run only on Studio's CPU model.
    let mut studio_only: Vec<(&String, u32)> = table
        .iter()
        .filter(|(_, t)| {
            QuantFormat::from_ggml_type(t.ggml_type).is_some_and(|f| f.to_ggml().is_none())
        })
        .map(|(name, t)| (name, t.ggml_type))
        .collect();
    studio_only.sort();
    if let Some((name, t)) = studio_only.first() {
        let why = if device.is_cpu() {
            "and this file's other layer weights have no kernel on this CPU"
        } else {
            "not on the GPU"
        };
        return Err(Error::InvalidParameter(format!(
            "{}: tensor `{name}` is stored as {}, which only Studio's CPU kernels run, {why}. \
             Pick another quantization of this model (for example Q4_K_M or Q8_0){}.",
            path.display(),
            ggml_type_name(*t),
            if device.is_cpu() {
                ""
            } else {
                ", or run it on the CPU"
            }
        )));
    }
    Ok(match hp.family {
        Family::Llama => Inner::Llama(Box::new(
            quantized_llama::ModelWeights::from_gguf(ct, reader, device).map_err(weights)?,
        )),
        Family::Qwen2 => Inner::Qwen2(Box::new(
            quantized_qwen2::ModelWeights::from_gguf(ct, reader, device).map_err(weights)?,
        )),
        Family::Qwen3 => Inner::Qwen3(Box::new(
            quantized_qwen3::ModelWeights::from_gguf(ct, reader, device).map_err(weights)?,
        )),
        Family::Phi3 => {
            let model = quantized_phi3::ModelWeights::from_gguf(false, ct, reader, device)
                .map_err(weights)?;
            Inner::Phi3(Box::new(Phi3 {
                fresh: model.clone(),
                model,
            }))
        }
        Family::Gemma2 | Family::Gemma3 => Inner::Gemma(Box::new(
            gemma::Model::load(&ct, reader, device, hp).map_err(weights)?,
        )),
    })
}

/// Whether Studio's own quantized kernels run this file's layer weights on this CPU (F32
/// files, and formats without a kernel, stay on candle's model; so do Phi-3 files with a fused
/// q/k/v or gate/up tensor Studio cannot split into kernel weights).
fn studio_kernels_fit(table: &GgufTensors, family: Family) -> bool {
    let fits = |t: &tensors::TensorInfo| {
        QuantFormat::from_ggml_type(t.ggml_type).is_some_and(|f| {
            preferred(f, KernelPath::detect())
                && t.dims
                    .last()
                    .is_some_and(|k| k.is_multiple_of(f.block_size()))
        })
    };
    if family == Family::Phi3 {
        table
            .iter()
            .filter(|(name, _)| {
                name.ends_with("attn_qkv.weight") || name.ends_with("ffn_up.weight")
            })
            .all(|(_, t)| fits(t))
    } else {
        table.info("blk.0.ffn_up.weight").is_some_and(fits)
    }
}

// ---------------------------------------------------------------------------------------------
// The CausalLm adapter

enum Inner {
    /// Llama, Qwen2, Qwen3 and Phi-3 on Studio's quantized CPU kernels.
    Studio(Box<QuantLlama>),
    Llama(Box<quantized_llama::ModelWeights>),
    Qwen2(Box<quantized_qwen2::ModelWeights>),
    Qwen3(Box<quantized_qwen3::ModelWeights>),
    Phi3(Box<Phi3>),
    Gemma(Box<gemma::Model>),
}

struct Phi3 {
    model: quantized_phi3::ModelWeights,
    /// The model as loaded, with empty caches: its weights are shared (`Arc`ed) with `model`,
    /// so restoring it clears the caches without reading the file again.
    fresh: quantized_phi3::ModelWeights,
}

struct GgufCausalLm {
    inner: Inner,
    context_length: usize,
    max_context_length: usize,
    vocab_size: usize,
    device: Device,
    /// candle's quantized Qwen3 on the CPU keeps single-token steps only in its decode
    /// cache; after one, several tokens at once must go one by one.
    qwen3_decoded: bool,
    /// The tokens whose keys and values the cache holds, in order (tracked for the model
    /// that can truncate its cache, so a caller can reuse a shared prompt prefix).
    fed: Vec<u32>,
}

impl GgufCausalLm {
    fn run(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        if let Inner::Studio(m) = &mut self.inner {
            self.fed.truncate(offset);
            let out = m.forward(tokens, offset, false);
            match &out {
                Ok(_) => self.fed.extend_from_slice(tokens),
                Err(_) => self.fed.clear(),
            }
            return out;
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        Ok(match &mut self.inner {
            Inner::Studio(m) => m.forward(tokens, offset, false)?,
            Inner::Llama(m) => m.forward(&input, offset)?,
            Inner::Qwen2(m) => m.forward(&input, offset)?,
            Inner::Qwen3(m) => m.forward(&input, offset)?,
            Inner::Phi3(p) => p.model.forward(&input, offset)?,
            Inner::Gemma(m) => m.forward(&input, offset)?,
        })
    }
}

impl GgufCausalLm {
    fn validate(&self, tokens: &[u32], offset: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if offset + tokens.len() > self.context_length {
            return Err(Error::PromptTooLong {
                tokens: offset + tokens.len(),
                context: self.context_length,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::InvalidParameter(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(())
    }
}

impl CausalLm for GgufCausalLm {
    fn forward_last(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        self.validate(tokens, offset)?;
        let one_by_one = matches!(self.inner, Inner::Qwen3(_))
            && self.device.is_cpu()
            && tokens.len() > 1
            && offset > 0
            && self.qwen3_decoded;
        let logits = if one_by_one {
            let mut last = None;
            for (i, &t) in tokens.iter().enumerate() {
                last = Some(self.run(&[t], offset + i)?);
            }
            last.ok_or(Error::EmptyPrompt)?
        } else {
            self.run(tokens, offset)?
        };
        if tokens.len() == 1 {
            self.qwen3_decoded = true;
        }
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    fn forward_all(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        self.validate(tokens, offset)?;
        match &mut self.inner {
            Inner::Studio(m) => {
                self.fed.truncate(offset);
                let out = m.forward(tokens, offset, true);
                match &out {
                    Ok(_) => self.fed.extend_from_slice(tokens),
                    Err(_) => self.fed.clear(),
                }
                out
            }
            _ => Err(Error::InvalidParameter(
                "this model family only computes the last position's logits".to_owned(),
            )),
        }
    }

    fn truncate_kv_cache(&mut self, len: usize) -> bool {
        match &mut self.inner {
            Inner::Studio(m) if len <= self.fed.len() => {
                if m.truncate_kv(len).is_ok() {
                    self.fed.truncate(len);
                    true
                } else {
                    m.clear_kv_cache();
                    self.fed.clear();
                    false
                }
            }
            _ => false,
        }
    }

    fn cached_tokens(&self) -> &[u32] {
        &self.fed
    }

    fn clear_kv_cache(&mut self) {
        self.qwen3_decoded = false;
        self.fed.clear();
        match &mut self.inner {
            Inner::Studio(m) => m.clear_kv_cache(),
            Inner::Llama(m) => m.clear_kv_cache(),
            Inner::Qwen2(m) => m.clear_kv_cache(),
            Inner::Qwen3(m) => m.clear_kv_cache(),
            Inner::Phi3(p) => p.model = p.fresh.clone(),
            Inner::Gemma(m) => m.clear_kv_cache(),
        }
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn set_context_length(&mut self, tokens: usize) -> usize {
        self.context_length = tokens.clamp(1, self.max_context_length);
        if let Inner::Studio(m) = &mut self.inner {
            if let Err(e) = m.set_context(self.context_length) {
                // The tables were built from the same factors at load; this cannot fail.
                log::error!("rebuilding the rope tables: {e}");
            }
            // The cache is cleared when the rope factors change, cut to the new context.
            self.fed.truncate(m.kv_len());
        }
        self.context_length
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

// ---------------------------------------------------------------------------------------------
// Gemma 2 / Gemma 3

/// Gemma 2 and Gemma 3 (text) from GGUF, as llama.cpp runs them: GELU (tanh) gated MLP, norms
/// before and after attention and MLP (the file's norm weights already include Gemma's +1),
/// embeddings scaled by √width, sliding-window layers with their own rope base, optional
/// attention and final logit soft-capping (Gemma 2), per-head q/k norms (Gemma 3).
pub mod gemma {
    use std::io::{Read, Seek};
    use std::path::Path;
    use std::sync::Arc;

    use candle_core::quantized::gguf_file::Content;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Result, Tensor};

    use super::Hparams;
    use crate::models::qlinear::{Fallbacks, Linear, studio_count, studio_kernel};
    use crate::quant::{KernelPath, QWeight, QuantFormat, preferred};

    /// Whether this CPU has a kernel for the file's layer format (that of the first layer's
    /// up projection).
    fn layers_fit(ct: &Content) -> bool {
        ct.tensor_infos.get("blk.0.ffn_up.weight").is_some_and(|t| {
            QuantFormat::from_ggml(t.ggml_dtype).is_some_and(|f| preferred(f, KernelPath::detect()))
        })
    }

    /// Studio's errors as candle's, which this module returns.
    fn candle_error(e: crate::error::Error) -> candle_core::Error {
        match e {
            crate::error::Error::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }

    fn linear(w: &Linear, x: &Tensor) -> Result<Tensor> {
        w.forward(x).map_err(candle_error)
    }

    /// The token embedding table: rows decoded from the file's bytes on lookup (Studio, on
    /// the CPU), or candle's (quantized lookup; dense for F32/F16/BF16 tied tables).
    enum Embedding {
        Studio(Arc<QWeight>),
        Candle(QMatMul),
    }

    /// Rotary tables, grown on demand up to the context length.
    struct Rope {
        inv_freq: Vec<f32>,
        cos: Option<Tensor>,
        sin: Option<Tensor>,
        len: usize,
        max: usize,
    }

    impl Rope {
        fn new(head_dim: usize, base: f64, factor: f64, max: usize) -> Self {
            let inv_freq = (0..head_dim)
                .step_by(2)
                .map(|i| (1.0 / base.powf(i as f64 / head_dim as f64) / factor) as f32)
                .collect();
            Self {
                inv_freq,
                cos: None,
                sin: None,
                len: 0,
                max,
            }
        }

        fn tables(&mut self, end: usize, device: &Device) -> Result<(Tensor, Tensor)> {
            if end > self.len || self.cos.is_none() {
                let len = end.max(self.len * 2).max(256).min(self.max.max(end));
                let half = self.inv_freq.len();
                let mut angles = Vec::with_capacity(len * half);
                for p in 0..len {
                    angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
                }
                let t = Tensor::from_vec(angles, (len, half), device)?;
                self.cos = Some(t.cos()?);
                self.sin = Some(t.sin()?);
                self.len = len;
            }
            match (&self.cos, &self.sin) {
                (Some(c), Some(s)) => Ok((c.clone(), s.clone())),
                _ => candle_core::bail!("rope tables missing"),
            }
        }
    }

    struct Layer {
        wq: Linear,
        wk: Linear,
        wv: Linear,
        wo: Linear,
        q_norm: Option<Tensor>,
        k_norm: Option<Tensor>,
        attn_norm: Tensor,
        post_attn_norm: Tensor,
        ffn_norm: Tensor,
        post_ffw_norm: Tensor,
        gate: Linear,
        up: Linear,
        down: Linear,
        sliding: bool,
        /// Cached keys and values `[1, kv_heads, len, head_dim]` and the position of the first.
        cache: Option<(Tensor, Tensor, usize)>,
    }

    /// A loaded Gemma 2/3. On the CPU its linear weights run on Studio's kernels where this
    /// CPU has one for their format (`quant/`), elsewhere on candle's `QMatMul`.
    pub struct Model {
        embed: Embedding,
        output: Linear,
        norm: Tensor,
        layers: Vec<Layer>,
        rope_global: Rope,
        rope_local: Rope,
        n_head: usize,
        n_kv_head: usize,
        head_dim: usize,
        hidden: usize,
        eps: f32,
        attn_scale: f64,
        attn_softcap: Option<f64>,
        final_softcap: Option<f64>,
        window: Option<usize>,
        device: Device,
        /// Weights left on candle's kernels on the CPU, as `format: name, name…`.
        fallbacks: Vec<String>,
    }

    /// Test hook: loads the Gemma 2/3 GGUF file at `path` on the CPU as [`super::load`] does,
    /// but with every linear weight on candle's `QMatMul` unless `studio_kernels` (so tests can
    /// compare Studio's kernels with candle's on the same file).
    #[doc(hidden)]
    pub fn load_cpu(path: &Path, studio_kernels: bool) -> crate::error::Result<Model> {
        let super::Checked { header, hp, .. } = super::check(path)?;
        let ct = super::content(header, &hp);
        let mut f = std::fs::File::open(path).map_err(|e| crate::error::Error::io(path, e))?;
        let model = Model::load_with(&ct, &mut f, &Device::Cpu, &hp, studio_kernels)?;
        Ok(model)
    }

    fn norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
    }

    fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
        match cap {
            Some(c) => (x / c)?.tanh()? * c,
            None => Ok(x.clone()),
        }
    }

    impl Model {
        /// Studio's kernels run the linear weights on the CPU; candle's on GPUs.
        pub(super) fn load<R: Read + Seek>(
            ct: &Content,
            r: &mut R,
            device: &Device,
            hp: &Hparams,
        ) -> Result<Self> {
            Self::load_with(ct, r, device, hp, device.is_cpu())
        }

        /// `studio`: Studio's kernels where this CPU has one (only ever on the CPU, and only
        /// when the file's layer format has one).
        fn load_with<R: Read + Seek>(
            ct: &Content,
            r: &mut R,
            device: &Device,
            hp: &Hparams,
            studio: bool,
        ) -> Result<Self> {
            let Some(g) = hp.gemma.as_ref() else {
                candle_core::bail!("not a Gemma model")
            };
            // As for Llama: a file whose layer format has no kernel here (F32) stays on
            // candle's kernels without a warning.
            let studio = studio && device.is_cpu() && layers_fit(ct);
            let mut fb = Fallbacks::default();
            let mut qt = |name: &str| ct.tensor(r, name, device);
            let embd = Arc::new(qt("token_embd.weight")?);
            // On the CPU the table stays in its file format and rows are decoded on lookup.
            let embd_q = match QuantFormat::from_ggml(embd.dtype()) {
                Some(_) if studio => Some(Arc::new(
                    QWeight::from_qtensor("token_embd.weight", &embd).map_err(candle_error)?,
                )),
                _ => None,
            };
            let (embed, output) = match embd_q {
                Some(q) if hp.tied_output && studio_kernel(&embd).is_some() => {
                    // One copy of the table serves both ends.
                    drop(embd);
                    (Embedding::Studio(Arc::clone(&q)), Linear::Studio(q))
                }
                _ if hp.tied_output => {
                    // One copy of the embeddings serves both ends (dequantized once when
                    // stored as F32/F16/BF16, otherwise looked up and multiplied quantized).
                    let out = if studio {
                        fb.candle("token_embd.weight (tied output)", embd)
                            .map_err(candle_error)?
                    } else {
                        QMatMul::from_arc(embd)?
                    };
                    (Embedding::Candle(out.clone()), Linear::Candle(out))
                }
                q => {
                    let embed = match q {
                        Some(q) => {
                            drop(embd);
                            Embedding::Studio(q)
                        }
                        None => Embedding::Candle(QMatMul::QTensor(embd)),
                    };
                    let out = qt("output.weight")?;
                    let output = if studio {
                        fb.linear("output.weight", out).map_err(candle_error)?
                    } else {
                        Linear::Candle(QMatMul::from_qtensor(out)?)
                    };
                    (embed, output)
                }
            };
            let mut dense = |name: &str| -> Result<Tensor> { qt(name)?.dequantize(device) };
            let norm = dense("output_norm.weight")?;
            let mut layers = Vec::with_capacity(hp.n_layer);
            for i in 0..hp.n_layer {
                let n = |s: &str| format!("blk.{i}.{s}");
                let mut q = |s: &str| -> Result<Linear> {
                    let name = n(s);
                    let t = ct.tensor(r, &name, device)?;
                    if studio {
                        fb.linear(&name, t).map_err(candle_error)
                    } else {
                        Ok(Linear::Candle(QMatMul::from_qtensor(t)?))
                    }
                };
                let wq = q("attn_q.weight")?;
                let wk = q("attn_k.weight")?;
                let wv = q("attn_v.weight")?;
                let wo = q("attn_output.weight")?;
                let gate = q("ffn_gate.weight")?;
                let up = q("ffn_up.weight")?;
                let down = q("ffn_down.weight")?;
                let mut d = |s: &str| -> Result<Tensor> {
                    let t: QTensor = ct.tensor(r, &n(s), device)?;
                    t.dequantize(device)
                };
                let (q_norm, k_norm) = if g.qk_norm {
                    (
                        Some(d("attn_q_norm.weight")?),
                        Some(d("attn_k_norm.weight")?),
                    )
                } else {
                    (None, None)
                };
                layers.push(Layer {
                    wq,
                    wk,
                    wv,
                    wo,
                    q_norm,
                    k_norm,
                    attn_norm: d("attn_norm.weight")?,
                    post_attn_norm: d("post_attention_norm.weight")?,
                    ffn_norm: d("ffn_norm.weight")?,
                    post_ffw_norm: d("post_ffw_norm.weight")?,
                    gate,
                    up,
                    down,
                    sliding: g.sliding.get(i).copied().unwrap_or(false),
                    cache: None,
                });
            }
            Ok(Self {
                embed,
                output,
                norm,
                layers,
                rope_global: Rope::new(hp.head_dim, hp.rope_base, g.rope_global_factor, hp.context),
                rope_local: Rope::new(hp.head_dim, g.rope_local_base, 1.0, hp.context),
                n_head: hp.n_head,
                n_kv_head: hp.n_kv_head,
                head_dim: hp.head_dim,
                hidden: hp.hidden,
                eps: hp.eps as f32,
                attn_scale: g.attn_scale,
                attn_softcap: g.attn_softcap,
                final_softcap: g.final_softcap,
                window: g.sliding_window,
                device: device.clone(),
                fallbacks: if studio { fb.log(&hp.arch) } else { Vec::new() },
            })
        }

        /// The weights that run on candle's kernels although the model is on the CPU, as
        /// `format: name, name…` (empty when Studio's kernels run every one, and on GPUs).
        pub fn fallbacks(&self) -> &[String] {
            &self.fallbacks
        }

        /// How many 2-D weights (the output projection included) run on Studio's kernels.
        pub fn studio_weights(&self) -> usize {
            let per_layer =
                |l: &Layer| studio_count([&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]);
            self.layers.iter().map(per_layer).sum::<usize>() + usize::from(self.output.is_studio())
        }

        /// Whether the token embeddings are looked up from the file's quantized bytes by
        /// Studio (rather than by candle).
        pub fn studio_embeddings(&self) -> bool {
            matches!(self.embed, Embedding::Studio(_))
        }

        /// `tokens` `[1, T]` → `[1, T, hidden]`, scaled by √hidden.
        fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
            let x = match &self.embed {
                Embedding::Studio(w) => {
                    let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
                    let mut out = vec![0f32; ids.len() * self.hidden];
                    for (&t, dst) in ids.iter().zip(out.chunks_exact_mut(self.hidden)) {
                        w.row_to_f32(t as usize, dst).map_err(candle_error)?;
                    }
                    Tensor::from_vec(out, (1, ids.len(), self.hidden), &self.device)?
                }
                Embedding::Candle(m) => m.embedding(tokens)?,
            };
            x * (self.hidden as f64).sqrt()
        }

        pub fn clear_kv_cache(&mut self) {
            for l in &mut self.layers {
                l.cache = None;
            }
        }

        /// `tokens`: `[1, T]` at positions `offset..`; returns the last position's logits.
        pub fn forward(&mut self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
            let (_, t) = tokens.dims2()?;
            let mut x = self.embed(tokens)?;
            let (cos_g, sin_g) = self.rope_global.tables(offset + t, &self.device)?;
            let (cos_l, sin_l) = self.rope_local.tables(offset + t, &self.device)?;
            let (cos_g, sin_g) = (cos_g.narrow(0, offset, t)?, sin_g.narrow(0, offset, t)?);
            let (cos_l, sin_l) = (cos_l.narrow(0, offset, t)?, sin_l.narrow(0, offset, t)?);
            for i in 0..self.layers.len() {
                let sliding = self.layers[i].sliding;
                let (cos, sin) = if sliding {
                    (&cos_l, &sin_l)
                } else {
                    (&cos_g, &sin_g)
                };
                let layer = &self.layers[i];
                let h = norm(&x, &layer.attn_norm, self.eps)?;
                let h = self.attention(i, &h, offset, cos, sin)?;
                let layer = &self.layers[i];
                let h = norm(&h, &layer.post_attn_norm, self.eps)?;
                x = (x + h)?;
                let h = norm(&x, &layer.ffn_norm, self.eps)?;
                let g = linear(&layer.gate, &h)?.gelu()?;
                let u = linear(&layer.up, &h)?;
                let h = linear(&layer.down, &(g * u)?)?;
                let h = norm(&h, &layer.post_ffw_norm, self.eps)?;
                x = (x + h)?;
            }
            let x = x.narrow(1, t - 1, 1)?;
            let x = norm(&x, &self.norm, self.eps)?;
            let logits = linear(&self.output, &x)?;
            softcap(&logits, self.final_softcap)
        }

        fn attention(
            &mut self,
            i: usize,
            x: &Tensor,
            offset: usize,
            cos: &Tensor,
            sin: &Tensor,
        ) -> Result<Tensor> {
            let (b, t, _) = x.dims3()?;
            let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
            let eps = self.eps;
            let window = self.window;
            let layer = &mut self.layers[i];
            let q = linear(&layer.wq, x)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?;
            let k = linear(&layer.wk, x)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?;
            let v = linear(&layer.wv, x)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (norm(&q, qn, eps)?, norm(&k, kn, eps)?),
                _ => (q.contiguous()?, k.contiguous()?),
            };
            let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

            let (k, v, start) = match layer.cache.take() {
                Some((ck, cv, start)) if offset > 0 => {
                    let end = start + ck.dim(2)?;
                    if end != offset {
                        candle_core::bail!(
                            "the KV cache ends at position {end} but the tokens start at {offset}"
                        )
                    }
                    (
                        Tensor::cat(&[&ck, &k], 2)?,
                        Tensor::cat(&[&cv, &v], 2)?,
                        start,
                    )
                }
                _ => {
                    if offset > 0 {
                        candle_core::bail!("no KV cache for tokens at position {offset}")
                    }
                    (k, v, 0)
                }
            };
            let len = k.dim(2)?;
            let slide = if layer.sliding { window } else { None };

            // Keep what later tokens can still attend to: everything, or the last
            // `window - 1` positions of a sliding layer.
            let keep = match slide {
                Some(w) => len.min(w.saturating_sub(1)),
                None => len,
            };
            layer.cache = if keep == 0 {
                None
            } else {
                Some((
                    k.narrow(2, len - keep, keep)?,
                    v.narrow(2, len - keep, keep)?,
                    start + len - keep,
                ))
            };

            let groups = nh / nkv;
            let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? * self.attn_scale)?;
            let scores = softcap(&scores, self.attn_softcap)?;
            // Query `qi` (position offset+qi) sees key `kj` (position start+kj) when the key is
            // not in its future and, on sliding layers, less than `window` positions back.
            let mut mask = Vec::with_capacity(t * len);
            let mut any = false;
            for qi in 0..t {
                let qp = offset + qi;
                for kj in 0..len {
                    let kp = start + kj;
                    let hidden = kp > qp || slide.is_some_and(|w| qp - kp >= w);
                    any |= hidden;
                    mask.push(if hidden { f32::NEG_INFINITY } else { 0.0 });
                }
            }
            let scores = if any {
                let mask = Tensor::from_vec(mask, (t, len), &self.device)?;
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?;
            linear(&self.layers[i].wo, &out)
        }
    }
}
