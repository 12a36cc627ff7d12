//! From checked hyperparameters to a running model: candle's `Content` with normalized keys,
//! the implementation chosen per family and device (Studio's quantized kernels on the CPU,
//! candle's quantized models elsewhere), and the [`CausalLm`] adapter over all of them.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{
    quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};

use super::hparams::Hparams;
use super::reader::Header;
use super::{ProgressReader, ggml_type_name, supported_ggml_type};
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::models::family::{self, Family};
use crate::models::quant_gemma;
use crate::models::quant_llama::QuantLlama;
use crate::models::tensors::{self, GgufTensors};
use crate::quant::{KernelPath, QuantFormat, preferred};

/// The header as candle's `Content`, with hyperparameter keys in the exact value types
/// candle's loaders read and llama.cpp's defaults filled in.
pub(super) fn content(header: Header, hp: &Hparams) -> Content {
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
/// The header's tensor directory as Studio's own reader reads it (every type Studio reads).
pub(super) fn tensor_table(header: &Header) -> GgufTensors {
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

pub(super) fn build_model(
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
            family::supported_gguf().to_owned(),
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
        // llama.cpp writes Mistral files as `llama`.
        Family::Llama | Family::Mistral => Inner::Llama(Box::new(
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
            quant_gemma::Model::load(&ct, reader, device, &gemma_config(hp)?).map_err(weights)?,
        )),
    })
}

/// Whether Studio's own quantized kernels run this file's layer weights on this CPU (F32
/// files, and formats without a kernel, stay on candle's model; so do Phi-3 files with a fused
/// q/k/v or gate/up tensor Studio cannot split into kernel weights).
pub(super) fn studio_kernels_fit(table: &GgufTensors, family: Family) -> bool {
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

pub(super) enum Inner {
    /// Llama, Qwen2, Qwen3 and Phi-3 on Studio's quantized CPU kernels.
    Studio(Box<QuantLlama>),
    Llama(Box<quantized_llama::ModelWeights>),
    Qwen2(Box<quantized_qwen2::ModelWeights>),
    Qwen3(Box<quantized_qwen3::ModelWeights>),
    Phi3(Box<Phi3>),
    Gemma(Box<quant_gemma::Model>),
}

pub(super) struct Phi3 {
    pub(super) model: quantized_phi3::ModelWeights,
    /// The model as loaded, with empty caches: its weights are shared (`Arc`ed) with `model`,
    /// so restoring it clears the caches without reading the file again.
    pub(super) fresh: quantized_phi3::ModelWeights,
}

pub(super) struct GgufCausalLm {
    pub(super) inner: Inner,
    pub(super) context_length: usize,
    pub(super) max_context_length: usize,
    pub(super) vocab_size: usize,
    pub(super) device: Device,
    /// candle's quantized Qwen3 on the CPU keeps single-token steps only in its decode
    /// cache; after one, several tokens at once must go one by one.
    pub(super) qwen3_decoded: bool,
    /// The tokens whose keys and values the cache holds, in order (tracked for the model
    /// that can truncate its cache, so a caller can reuse a shared prompt prefix).
    pub(super) fed: Vec<u32>,
    /// The file's `pooling_type` for embeddings ([`CausalLm::embedding_pooling`]).
    pub(super) pooling: std::result::Result<Option<crate::embed::Pooling>, String>,
}

impl GgufCausalLm {
    pub(super) fn run(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
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
    pub(super) fn validate(&self, tokens: &[u32], offset: usize) -> Result<()> {
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
    fn embedding_pooling(&self) -> Result<crate::embed::Pooling> {
        match &self.pooling {
            Ok(p) => Ok(p.unwrap_or(crate::embed::Pooling::Mean)),
            Err(why) => Err(Error::InvalidParameter(why.clone())),
        }
    }

    fn hidden_states(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.validate(tokens, 0)?;
        if let Inner::Gemma(m) = &mut self.inner {
            self.fed.clear();
            let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
            return Ok(m.hidden_states(&input)?.to_dtype(candle_core::DType::F32)?);
        }
        let Inner::Studio(m) = &mut self.inner else {
            return Err(Error::InvalidParameter(
                "this GGUF model runs on candle's kernels, which give no hidden states for \
                 embeddings (Studio's CPU kernels and its Gemma do; or serve a \
                 sentence-transformers model with --embedding-model)"
                    .into(),
            ));
        };
        self.fed.clear();
        let h = m.hidden_states(tokens)?;
        let hidden = h.len() / tokens.len();
        Ok(Tensor::from_vec(h, (tokens.len(), hidden), &Device::Cpu)?)
    }

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

/// Test hook: loads the Gemma 2/3 GGUF file at `path` on the CPU as [`super::load`] does, but
/// with every linear weight on candle's `QMatMul` unless `studio_kernels` (so tests can compare
/// Studio's kernels with candle's on the same file).
#[doc(hidden)]
pub fn load_gemma_cpu(path: &Path, studio_kernels: bool) -> Result<quant_gemma::Model> {
    let super::Checked { header, hp, .. } = super::check(path)?;
    let ct = content(header, &hp);
    let cfg = gemma_config(&hp)?;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(quant_gemma::Model::load_with(
        &ct,
        &mut f,
        &Device::Cpu,
        &cfg,
        studio_kernels,
    )?)
}

/// The Gemma configuration of a file `hparams` read as Gemma.
fn gemma_config(hp: &Hparams) -> Result<quant_gemma::GemmaConfig<'_>> {
    hp.gemma_config().ok_or_else(|| {
        Error::UnsupportedArchitecture(
            format!("`{}` is not a Gemma model", hp.arch),
            family::supported_gguf().to_owned(),
        )
    })
}
