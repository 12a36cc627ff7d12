//! GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").
//!
//! Follows Hugging Face transformers' `GPT2LMHeadModel`: learned position embeddings,
//! pre-norm blocks, fused `c_attn` projection, `gelu_new` MLP, final `ln_f`, and an LM head
//! tied to `wte`. Loads gpt2, gpt2-medium, gpt2-large, gpt2-xl and distilgpt2.
//!
//! Checkpoints name tensors in two ways, both accepted:
//! - the hub's own files: `wte.weight`, `h.0.attn.c_attn.weight`, …;
//! - transformers' `save_pretrained`: the same names under `transformer.`, and `lm_head.weight`
//!   present or (tied) absent.
//!
//! GPT-2's projections are `Conv1D` modules whose weight is stored `[in, out]`, transposed
//! relative to `nn.Linear`. `conv1d` transposes them once, at load time, so the forward pass
//! uses ordinary `[out, in]` linear layers.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear};
use serde::Deserialize;

use super::CausalLm;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// The checkpoint's own `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Number of tokens, the rows of `wte`.
    pub vocab_size: usize,
    /// Positions the model was trained with (old configs also carry the same value as `n_ctx`).
    #[serde(default)]
    pub n_positions: Option<usize>,
    /// The older name of `n_positions`, used when that is absent.
    #[serde(default)]
    pub n_ctx: Option<usize>,
    /// Width of the hidden states (the embedding size); a multiple of `n_head`.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Width of the MLP's inner layer; 4 × `n_embd` when absent.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// The MLP activation: `gelu_new` (default), `gelu_pytorch_tanh`, `gelu_fast`, `gelu`,
    /// `relu` or `quick_gelu`.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Epsilon of the layer norms; 1e-5 when absent.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Whether attention scores are divided by √head_dim; true when absent.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Whether attention scores are divided by the layer's index plus one; false when absent.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The config's beginning-of-text token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// The config's end-of-text token id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_activation() -> String {
    "gelu_new".to_owned()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl Config {
    /// The context length: `n_positions`, else `n_ctx`, else GPT-2's 1024.
    pub fn context_length(&self) -> usize {
        self.n_positions.or(self.n_ctx).unwrap_or(1024)
    }

    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks the config describes a buildable model.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.vocab_size == 0 || self.n_layer == 0 || self.context_length() == 0 {
            return Err("vocab_size, n_layer and n_positions must be positive".to_owned());
        }
        // Far above any released GPT-2: a hostile config must get an error, not an abort.
        for (key, value, bound) in [
            ("n_layer", self.n_layer, 1024),
            ("n_embd", self.n_embd, 1 << 16),
            ("n_head", self.n_head, 1024),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("n_positions", self.context_length(), 1 << 21),
            ("n_inner", self.inner(), 1 << 20),
        ] {
            if value > bound {
                return Err(format!("`{key}` = {value} is out of range (1 to {bound})"));
            }
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(format!(
                "`layer_norm_epsilon` = {} must be a finite positive number",
                self.layer_norm_epsilon
            ));
        }
        Activation::parse(&self.activation_function).map(|_| ())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// The exact erf form (`gelu`).
    GeluErf,
    Relu,
    QuickGelu,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::GeluErf),
            "relu" => Ok(Self::Relu),
            "quick_gelu" => Ok(Self::QuickGelu),
            other => Err(format!("unsupported activation_function `{other}`")),
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// Loads a `Conv1D` (weight `[in, out]`) as a linear layer (weight `[out, in]`).
fn conv1d(w: &Weights, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[d_in, d_out])?;
    let bias = w.get(&format!("{prefix}.bias"), &[d_out])?;
    Ok(Linear::new(weight.t()?.contiguous()?, Some(bias)))
}

fn layer_norm(w: &Weights, prefix: &str, size: usize, eps: f64) -> Result<LayerNorm> {
    let weight = w.get(&format!("{prefix}.weight"), &[size])?;
    let bias = w.get(&format!("{prefix}.bias"), &[size])?;
    Ok(LayerNorm::new(weight, bias, eps))
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    head_dim: usize,
    scale: f64,
    kv_cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, cfg: &Config, layer_idx: usize) -> Result<Self> {
        let c = cfg.n_embd;
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_dim() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f64;
        }
        Ok(Self {
            c_attn: conv1d(w, &format!("{prefix}.c_attn"), c, 3 * c)?,
            c_proj: conv1d(w, &format!("{prefix}.c_proj"), c, c)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
            kv_cache: None,
        })
    }

    fn forward(&mut self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, self.n_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(0)?;
        let mut k = heads(1)?;
        let mut v = heads(2)?;
        if let Some((past_k, past_v)) = &self.kv_cache {
            k = Tensor::cat(&[past_k, &k], 2)?;
            v = Tensor::cat(&[past_v, &v], 2)?;
        }
        self.kv_cache = Some((k.clone(), v.clone()));

        let mut att = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        if let Some(mask) = mask {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.c_proj.forward(&y)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    act: Activation,
}

impl Block {
    fn load(w: &Weights, prefix: &str, cfg: &Config, layer_idx: usize) -> Result<Self> {
        let c = cfg.n_embd;
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: layer_norm(w, &format!("{prefix}.ln_1"), c, eps)?,
            attn: Attention::load(w, &format!("{prefix}.attn"), cfg, layer_idx)?,
            ln_2: layer_norm(w, &format!("{prefix}.ln_2"), c, eps)?,
            c_fc: conv1d(w, &format!("{prefix}.mlp.c_fc"), c, cfg.inner())?,
            mlp_proj: conv1d(w, &format!("{prefix}.mlp.c_proj"), cfg.inner(), c)?,
            act: Activation::parse(&cfg.activation_function).map_err(Error::InvalidParameter)?,
        })
    }

    fn forward(&mut self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask)?)?;
        let h = self
            .act
            .apply(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        x + self.mlp_proj.forward(&h)?
    }
}

/// GPT-2 with its language-model head and a KV cache.
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    config: Config,
    context_length: usize,
    device: Device,
}

impl Gpt2 {
    /// Loads the model from a checkpoint in either naming style.
    ///
    /// `progress` is called with the fraction of layers loaded.
    pub fn load(cfg: &Config, w: &Weights, progress: &mut dyn FnMut(f32)) -> Result<Self> {
        cfg.validate().map_err(|message| Error::BadConfig {
            path: w.path().to_path_buf(),
            message,
        })?;
        let p = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let c = cfg.n_embd;
        let wte = w.get(&format!("{p}wte.weight"), &[cfg.vocab_size, c])?;
        let wpe = w.get(&format!("{p}wpe.weight"), &[cfg.context_length(), c])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            blocks.push(Block::load(w, &format!("{p}h.{i}"), cfg, i)?);
            progress((i + 1) as f32 / (cfg.n_layer + 1) as f32);
        }
        let ln_f = layer_norm(w, &format!("{p}ln_f"), c, cfg.layer_norm_epsilon)?;
        let lm_head = if w.contains("lm_head.weight") {
            w.get("lm_head.weight", &[cfg.vocab_size, c])?
        } else {
            wte.clone()
        };
        progress(1.0);
        Ok(Self {
            wte: Embedding::new(wte, c),
            wpe: Embedding::new(wpe, c),
            blocks,
            ln_f,
            lm_head: Linear::new(lm_head, None),
            device: w.device().clone(),
            context_length: cfg.context_length(),
            config: cfg.clone(),
        })
    }

    /// The config the model was loaded with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Hidden states after `ln_f` for `tokens` placed at positions `offset..`, shape `[T, C]`.
    fn hidden(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::EmptyPrompt);
        }
        if offset + t > self.context_length {
            return Err(Error::PromptTooLong {
                tokens: offset + t,
                context: self.context_length,
            });
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let pos: Vec<u32> = (offset..offset + t).map(|p| p as u32).collect();
        let pos = Tensor::new(pos.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = (self.wte.forward(&ids)? + self.wpe.forward(&pos)?)?;
        let mask = if t > 1 {
            Some(causal_mask(t, offset, x.dtype(), &self.device)?)
        } else {
            None
        };
        for block in &mut self.blocks {
            x = block.forward(&x, mask.as_ref())?;
        }
        Ok(self.ln_f.forward(&x)?.squeeze(0)?)
    }
}

/// Additive mask `[T, offset+T]`: query `i` (at position `offset+i`) sees keys `0..=offset+i`.
fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?.to_dtype(dtype)?)
}

impl CausalLm for Gpt2 {
    fn forward_last(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        let h = self.hidden(tokens, offset)?;
        let last = h.narrow(0, tokens.len() - 1, 1)?;
        Ok(self
            .lm_head
            .forward(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    fn forward_all(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        let h = self.hidden(tokens, offset)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    fn clear_kv_cache(&mut self) {
        for block in &mut self.blocks {
            block.attn.kv_cache = None;
        }
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn set_context_length(&mut self, tokens: usize) -> usize {
        self.context_length = tokens.clamp(1, self.config.context_length());
        self.context_length
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}
