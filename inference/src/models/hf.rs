//! Today's open decoder models from Hugging Face folders, through candle-transformers:
//! Llama (Llama 2/3.x, SmolLM2, TinyLlama), Mistral, Qwen2/Qwen2.5, Qwen3, Phi-3/3.5,
//! Gemma 2 and Gemma 3 (text).
//!
//! Each family's `Config` is the checkpoint's own `config.json` (candle-transformers'
//! structs); tensor names are the checkpoints' own (`model.layers.0.self_attn.q_proj.weight`,
//! …). This module only adapts each model to [`CausalLm`].
//!
//! Qwen2 and Qwen3 run as their decoder (candle's `Model`, which gives every position's final
//! hidden state) plus the output head applied here, so the same model also gives embeddings
//! ([`Decoder`]; sentence-transformers folders of Qwen3-Embedding and gte-Qwen2 use it too).

use std::path::PathBuf;

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::{gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3};

use super::CausalLm;
use super::family::Family;
use crate::error::{Error, Result};
use crate::weights::expect_shape;

enum Inner {
    Llama {
        model: llama::Llama,
        cache: llama::Cache,
        /// An empty cache with the rotary tables already computed, cloned (cheaply: the
        /// tensors are shared) to start each generation.
        fresh: llama::Cache,
    },
    Mistral(mistral::Model),
    /// Qwen2 or Qwen3: the decoder and the output head.
    Decoder {
        decoder: Decoder,
        head: Linear,
    },
    Phi3(phi3::Model),
    Gemma2(gemma2::Model),
    Gemma3(gemma3::Model),
}

/// A Qwen2 or Qwen3 decoder without its output head: the final hidden states (after the
/// last norm) of every position.
#[derive(Clone)]
pub(crate) enum Decoder {
    Qwen2(qwen2::Model),
    Qwen3 {
        model: qwen3::Model,
        /// The model with empty caches, cloned (cheaply: the weights are shared) to start
        /// afresh; candle's Qwen3 decoder keeps its cache reset private.
        fresh: qwen3::Model,
    },
}

impl Decoder {
    /// `(1, tokens, hidden)` for `input` (`(1, tokens)`) after `offset` cached positions.
    fn forward(&mut self, input: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        match self {
            Decoder::Qwen2(m) => m.forward(input, offset, None),
            Decoder::Qwen3 { model, .. } => model.forward(input, offset),
        }
    }

    fn clear_kv_cache(&mut self) {
        match self {
            Decoder::Qwen2(m) => m.clear_kv_cache(),
            Decoder::Qwen3 { model, fresh } => *model = fresh.clone(),
        }
    }

    /// The final hidden states of `tokens` from position 0, `(tokens, hidden)` in f32; the
    /// cache is left empty.
    pub(crate) fn hidden_states(&mut self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        self.clear_kv_cache();
        let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
        let hidden = self.forward(&input, 0);
        self.clear_kv_cache();
        Ok(hidden?.squeeze(0)?.to_dtype(DType::F32)?)
    }
}

/// A weight source that hands out the token embeddings once and then shares them, so a tied
/// output head (Qwen2.5-0.5B, Qwen3-0.6B) is the same tensor, not a second copy.
struct SharedEmbeddings {
    inner: crate::weights::Tensors,
    kept: Mutex<HashMap<String, Tensor>>,
}

impl SharedEmbeddings {
    fn shared(name: &str) -> bool {
        name.ends_with("embed_tokens.weight")
    }

    fn keep(
        &self,
        name: &str,
        load: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if !Self::shared(name) {
            return load();
        }
        let mut kept = self
            .kept
            .lock()
            .map_err(|_| candle_core::Error::Msg("a weight loader panicked".into()))?;
        if let Some(t) = kept.get(name) {
            return Ok(t.clone());
        }
        let t = load()?;
        kept.insert(name.to_owned(), t.clone());
        Ok(t)
    }
}

impl candle_nn::var_builder::SimpleBackend for SharedEmbeddings {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.keep(name, || {
            candle_nn::var_builder::SimpleBackend::get(&self.inner, s.clone(), name, h, dtype, dev)
        })?;
        // A kept tensor is checked again: the second user (a tied head) asks its own shape.
        expect_shape(t, s, name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.keep(name, || {
            candle_nn::var_builder::SimpleBackend::get_unchecked(&self.inner, name, dtype, dev)
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.inner, name)
    }
}

/// A family model behind [`CausalLm`].
pub struct HfModel {
    inner: Inner,
    context_length: usize,
    max_context_length: usize,
    vocab_size: usize,
    device: Device,
}

/// What the loader needs to know about a family config before reading weights.
#[derive(Debug, Clone)]
pub struct FamilyConfig {
    /// The family whose config this is.
    pub family: Family,
    /// `max_position_embeddings`: the trained context in tokens (Gemma 2: 8192 when absent).
    pub context_length: usize,
    /// `vocab_size`: the size of the logits.
    pub vocab_size: usize,
    /// `eos_token_id` from `config.json` (a number or a list).
    pub eos_token_ids: Vec<u32>,
    config: serde_json::Value,
    /// Tensor-name prefix for multimodal wrappers (Gemma 3 `language_model.`).
    prefix: Option<&'static str>,
}

fn field<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> std::result::Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| e.to_string())
}

fn usize_field(v: &serde_json::Value, key: &str) -> std::result::Result<usize, String> {
    v.get(key)
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| format!("missing field `{key}`"))
}

/// Reads `eos_token_id` as written by transformers: a number, a list, or absent.
pub fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The largest values a family config may give, checked before anything is sized from them
/// (far above any released model: a hostile `config.json` must get an error, not an abort).
const CONFIG_BOUNDS: [(&str, u64); 9] = [
    ("num_hidden_layers", 1024),
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 20),
    ("num_attention_heads", 1024),
    ("num_key_value_heads", 1024),
    ("head_dim", 4096),
    ("vocab_size", 1 << 22),
    ("max_position_embeddings", 1 << 21),
    // Gemma 3 takes the layer index modulo it: 0 divided by zero in candle.
    ("sliding_window_pattern", 1024),
];

/// Checks the sizes and scalars of a family config: every size in `1..=bound`, heads that
/// divide evenly, and finite positive `rope_theta` and norm epsilons.
pub fn check_config_bounds(config: &serde_json::Value) -> std::result::Result<(), String> {
    for (key, bound) in CONFIG_BOUNDS {
        let Some(v) = config.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        match v.as_u64() {
            Some(n) if (1..=bound).contains(&n) => {}
            _ => return Err(format!("`{key}` = {v} is out of range (1 to {bound})")),
        }
    }
    let get = |key: &str| config.get(key).and_then(serde_json::Value::as_u64);
    if let (Some(heads), Some(kv)) = (get("num_attention_heads"), get("num_key_value_heads"))
        && (kv > heads || heads % kv != 0)
    {
        return Err(format!(
            "`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv})"
        ));
    }
    if let (Some(hidden), Some(heads), None) = (
        get("hidden_size"),
        get("num_attention_heads"),
        get("head_dim"),
    ) && hidden % heads != 0
    {
        return Err(format!(
            "`hidden_size` ({hidden}) must be a multiple of `num_attention_heads` ({heads})"
        ));
    }
    let rope = config.get("rope_parameters").unwrap_or(config);
    for (obj, key) in [
        (rope, "rope_theta"),
        (config, "rms_norm_eps"),
        (config, "layer_norm_eps"),
        (config, "rope_local_base_freq"),
    ] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => {}
                _ => return Err(format!("`{key}` = {v} must be a finite positive number")),
            }
        }
    }
    Ok(())
}

impl FamilyConfig {
    /// Checks that `config` deserializes into the family's config (error messages name the
    /// missing or malformed field).
    pub fn parse(family: Family, config: &serde_json::Value) -> std::result::Result<Self, String> {
        let (config, prefix) = match (family, config.get("text_config")) {
            // Multimodal Gemma 3 checkpoints wrap the text model.
            (Family::Gemma3, Some(text)) => (text.clone(), Some("language_model")),
            _ => (config.clone(), None),
        };
        // Transformers 5's keys (`rope_parameters`, `null`s) in the shape the configs read.
        let config = super::hf_config::normalize(family, &config)?;
        check_config_bounds(&config)?;
        // Deserialize once now so a bad config fails before any weight is read.
        match family {
            Family::Llama => field::<llama::LlamaConfig>(&config).map(|_| ())?,
            Family::Mistral => field::<mistral::Config>(&config).map(|_| ())?,
            Family::Qwen2 => field::<qwen2::Config>(&config).map(|_| ())?,
            Family::Qwen3 => field::<qwen3::Config>(&config).map(|_| ())?,
            Family::Phi3 => field::<phi3::Config>(&config).map(|_| ())?,
            Family::Gemma2 => field::<gemma2::Config>(&config).map(|_| ())?,
            Family::Gemma3 => field::<gemma3::Config>(&config).map(|_| ())?,
        }
        let context_length = match family {
            // candle's Gemma 2 falls back to 8192 when the field is absent.
            Family::Gemma2 => usize_field(&config, "max_position_embeddings").unwrap_or(8192),
            _ => usize_field(&config, "max_position_embeddings")?,
        };
        Ok(Self {
            family,
            context_length,
            vocab_size: usize_field(&config, "vocab_size")?,
            eos_token_ids: token_ids(config.get("eos_token_id")),
            config,
            prefix,
        })
    }

    /// Checks `num_hidden_layers` against the decoder layers the weights hold
    /// (`model.layers.N.…`, under the multimodal prefix if any), so a config claiming more
    /// layers than the files have is refused before anything is built.
    pub fn check_layers<'a>(
        &self,
        names: impl Iterator<Item = &'a str>,
    ) -> std::result::Result<(), String> {
        let Some(layers) = self
            .config
            .get("num_hidden_layers")
            .and_then(serde_json::Value::as_u64)
        else {
            return Ok(());
        };
        let stem = match self.prefix {
            Some(p) => format!("{p}.model.layers."),
            None => "model.layers.".to_owned(),
        };
        let present = names
            .filter_map(|n| n.strip_prefix(stem.as_str()))
            .filter_map(|rest| rest.split('.').next()?.parse::<u64>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0);
        if present < layers {
            return Err(format!(
                "`num_hidden_layers` is {layers}, but the weights hold {present} layers"
            ));
        }
        Ok(())
    }

    /// The decoder of a Qwen2 or Qwen3 config from `vb` (tensors named `model.…`).
    pub(crate) fn decoder(&self, vb: VarBuilder) -> Result<Decoder> {
        let bad = |e: String| Error::BadConfig {
            path: PathBuf::from("config.json"),
            message: e,
        };
        let c = &self.config;
        let build = || -> Result<Decoder> {
            Ok(match self.family {
                Family::Qwen2 => Decoder::Qwen2(qwen2::Model::new(
                    &field::<qwen2::Config>(c).map_err(bad)?,
                    vb,
                )?),
                Family::Qwen3 => {
                    let model = qwen3::Model::new(&field::<qwen3::Config>(c).map_err(bad)?, vb)?;
                    Decoder::Qwen3 {
                        fresh: model.clone(),
                        model,
                    }
                }
                other => {
                    return Err(Error::UnsupportedArchitecture(
                        format!("{other:?} as a decoder for embeddings"),
                        "Qwen2 and Qwen3".into(),
                    ));
                }
            })
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
            .map_err(|p| Error::Candle(candle_core::Error::Msg(crate::panic_message(p.as_ref()))))?
    }

    /// Builds the model from its weight files: safetensors (mapped) or `pytorch_model.bin`
    /// (read as data by Studio's own pickle reader), see [`crate::weights::open_checkpoint`].
    pub fn load(&self, files: &[PathBuf], device: &Device, dtype: DType) -> Result<HfModel> {
        let tensors = crate::weights::open_checkpoint(files)?;
        let shared = SharedEmbeddings {
            inner: tensors,
            kept: Mutex::new(HashMap::new()),
        };
        let vb = VarBuilder::from_backend(Box::new(shared), dtype, device.clone());
        let vb = match self.prefix {
            Some(p) => vb.pp(p),
            None => vb,
        };
        let bad = |e: String| Error::BadConfig {
            path: files.first().cloned().unwrap_or_default(),
            message: e,
        };
        let c = &self.config;
        // candle-transformers' loaders may panic on what a config says (Llama unwraps
        // per-layer errors, Gemma 3 divides by `sliding_window_pattern`): such a panic becomes
        // the error it carried (it names the missing or mis-shaped tensor).
        let build = || -> Result<Inner> {
            Ok(match self.family {
                Family::Llama => {
                    let config = field::<llama::LlamaConfig>(c)
                        .map_err(bad)?
                        .into_config(false);
                    let model = llama::Llama::load(vb, &config)?;
                    let fresh = llama::Cache::new(true, dtype, &config, device)?;
                    Inner::Llama {
                        model,
                        cache: fresh.clone(),
                        fresh,
                    }
                }
                Family::Mistral => Inner::Mistral(mistral::Model::new(
                    &field::<mistral::Config>(c).map_err(bad)?,
                    vb,
                )?),
                Family::Qwen2 | Family::Qwen3 => {
                    let decoder = self.decoder(vb.clone()).map_err(|e| match e {
                        Error::BadConfig { message, .. } => bad(message),
                        other => other,
                    })?;
                    // As candle's `ModelForCausalLM`s choose: Qwen3 by the config's
                    // `tie_word_embeddings`, Qwen2 by whether the file has a head.
                    let tied = match self.family {
                        Family::Qwen3 => {
                            field::<qwen3::Config>(c).map_err(bad)?.tie_word_embeddings
                        }
                        _ => !vb.contains_tensor("lm_head.weight"),
                    };
                    let hidden = usize_field(c, "hidden_size").map_err(bad)?;
                    let head = if tied {
                        vb.get((self.vocab_size, hidden), "model.embed_tokens.weight")?
                    } else {
                        vb.get((self.vocab_size, hidden), "lm_head.weight")?
                    };
                    Inner::Decoder {
                        decoder,
                        head: Linear::new(head, None),
                    }
                }
                Family::Phi3 => Inner::Phi3(phi3::Model::new(
                    &field::<phi3::Config>(c).map_err(bad)?,
                    vb,
                )?),
                Family::Gemma2 => Inner::Gemma2(gemma2::Model::new(
                    false,
                    &field::<gemma2::Config>(c).map_err(bad)?,
                    vb,
                )?),
                Family::Gemma3 => Inner::Gemma3(gemma3::Model::new(
                    false,
                    &field::<gemma3::Config>(c).map_err(bad)?,
                    vb,
                )?),
            })
        };
        let inner =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).map_err(|p| {
                Error::Candle(candle_core::Error::Msg(crate::panic_message(p.as_ref())))
            })??;
        Ok(HfModel {
            inner,
            context_length: self.context_length,
            max_context_length: self.context_length,
            vocab_size: self.vocab_size,
            device: device.clone(),
        })
    }
}

impl CausalLm for HfModel {
    fn forward_last(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if offset + tokens.len() > self.context_length {
            return Err(Error::PromptTooLong {
                tokens: offset + tokens.len(),
                context: self.context_length,
            });
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.inner {
            Inner::Llama { model, cache, .. } => model.forward(&input, offset, cache)?,
            Inner::Mistral(m) => m.forward(&input, offset)?,
            Inner::Decoder { decoder, head } => {
                let hidden = decoder.forward(&input, offset)?;
                head.forward(&hidden.narrow(1, tokens.len() - 1, 1)?)?
            }
            Inner::Phi3(m) => m.forward(&input, offset)?,
            Inner::Gemma2(m) => m.forward(&input, offset)?,
            Inner::Gemma3(m) => {
                // candle-transformers 0.11.1's Gemma 3 appends a non-contiguous value tensor to
                // its KV cache when given several tokens at once and fails ("slice-set only
                // supports contiguous tensors"); one token at a time is correct, if slower.
                let mut last = None;
                for (i, &t) in tokens.iter().enumerate() {
                    let one = Tensor::new(&[t], &self.device)?.unsqueeze(0)?;
                    last = Some(m.forward(&one, offset + i)?);
                }
                last.ok_or(Error::EmptyPrompt)?
            }
        };
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    fn clear_kv_cache(&mut self) {
        match &mut self.inner {
            Inner::Llama { cache, fresh, .. } => *cache = fresh.clone(),
            Inner::Mistral(m) => m.clear_kv_cache(),
            Inner::Decoder { decoder, .. } => decoder.clear_kv_cache(),
            Inner::Phi3(m) => m.clear_kv_cache(),
            Inner::Gemma2(m) => m.clear_kv_cache(),
            Inner::Gemma3(m) => m.clear_kv_cache(),
        }
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn set_context_length(&mut self, tokens: usize) -> usize {
        self.context_length = tokens.clamp(1, self.max_context_length);
        self.context_length
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn hidden_states(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if tokens.len() > self.context_length {
            return Err(Error::PromptTooLong {
                tokens: tokens.len(),
                context: self.context_length,
            });
        }
        match &mut self.inner {
            Inner::Decoder { decoder, .. } => decoder.hidden_states(tokens, &self.device),
            _ => Err(Error::InvalidParameter(
                "this model can't give its hidden states for embeddings (Qwen2 and Qwen3 \
                 folders can, and GGUF Llama, Qwen, Phi and Gemma models on Studio's CPU \
                 kernels; or serve a sentence-transformers model with --embedding-model)"
                    .into(),
            )),
        }
    }
}
