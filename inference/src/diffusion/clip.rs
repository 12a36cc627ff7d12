//! The CLIP text encoders Stable Diffusion conditions on, with transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection` tensor names (`text_model.embeddings.token_embedding`,
//! `text_model.encoder.layers.N.self_attn.q_proj`, …, `text_projection`).
//!
//! SD 1.x uses the last layer's hidden states after the final layer norm; SD 2.x the
//! penultimate layer's (its diffusers text encoder simply has 23 of OpenCLIP's 24 layers);
//! SDXL concatenates the penultimate hidden states of both encoders *without* the final norm
//! and adds the second encoder's pooled, projected output. [`ClipTextModel::encode`] returns what
//! each of these needs in one pass.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use crate::nn::{Linear, linear};
use serde::Deserialize;

use crate::error::Result;

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`, OpenAI CLIP's approximation (SD 1.x, SDXL's first encoder).
    QuickGelu,
    /// The exact (erf) GELU, as in OpenCLIP (SD 2.x, SDXL's second encoder).
    Gelu,
}

/// A `text_encoder/config.json` (transformers `CLIPTextConfig`), the fields the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// Token vocabulary size (49408 for CLIP's BPE tokenizer).
    pub vocab_size: usize,
    /// Width of the token embeddings and hidden states.
    pub hidden_size: usize,
    /// Width of each layer's MLP hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` divides evenly among them.
    pub num_attention_heads: usize,
    /// Learned positions: the longest token sequence one pass takes (77 when absent).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// The MLP activation (`quick_gelu` when absent).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Epsilon of the layer norms (1e-5 when absent).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output size of `text_projection` (only models with a projection use it).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    /// OpenAI CLIP ViT-L/14's text tower (SD 1.x, SDXL's first encoder).
    pub fn vit_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
        }
    }

    /// OpenCLIP ViT-H/14's text tower (SD 2.x), all 24 layers.
    pub fn vit_h() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1024),
        }
    }

    /// OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder).
    pub fn vit_bigg() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
        }
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: &VarBuilder, c: &ClipConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q: linear(h, h, true, &vb.pp("q_proj"))?,
            k: linear(h, h, true, &vb.pp("k_proj"))?,
            v: linear(h, h, true, &vb.pp("v_proj"))?,
            out: linear(h, h, true, &vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = split((self.q.forward(xs)? * scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ys = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        self.out.forward(&ys)
    }
}

#[derive(Debug)]
struct Layer {
    attn: Attention,
    ln1: LayerNorm,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(vb: &VarBuilder, c: &ClipConfig) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(&vb.pp("self_attn"), c)?,
            ln1: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            ln2: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, true, &vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, true, &vb.pp("mlp.fc2"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let xs = (self.attn.forward(&self.ln1.forward(xs)?, mask)? + residual)?;
        let h = self.fc1.forward(&self.ln2.forward(&xs)?)?;
        let h = match self.act {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        Ok((self.fc2.forward(&h)? + xs)?)
    }
}

/// What one encoder pass yields.
#[derive(Debug)]
pub struct ClipOutput {
    /// Hidden states after `layers` layers (`(batch, tokens, hidden)`), with the final layer
    /// norm applied when asked.
    pub hidden: Tensor,
    /// The projected hidden state at each sequence's end-of-text token (`(batch, projection)`),
    /// when the model has a `text_projection`.
    pub pooled: Option<Tensor>,
}

/// A CLIP text transformer.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    projection: Option<Linear>,
    config: ClipConfig,
}

impl ClipTextModel {
    /// Builds the encoder from transformers-named weights. `with_projection` loads
    /// `text_projection.weight` (SDXL's second encoder).
    pub fn new(vb: &VarBuilder, config: &ClipConfig, with_projection: bool) -> Result<Self> {
        // Released checkpoints (and transformers < 5) prefix the text tower with
        // `text_model.`; transformers 5 saves `CLIPTextModel` without it.
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(&tm.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let projection = if with_projection {
            let out = config.projection_dim.unwrap_or(config.hidden_size);
            Some(linear(
                config.hidden_size,
                out,
                false,
                &vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: candle_nn::embedding(
                config.vocab_size,
                config.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                config.max_position_embeddings,
                config.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                config.hidden_size,
                config.layer_norm_eps,
                tm.pp("final_layer_norm"),
            )?,
            projection,
            config: config.clone(),
        })
    }

    /// Token embeddings, ids from `vocab_size` on taken from `extra`'s rows.
    fn embed_with(&self, tokens: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let (b, seq) = tokens.dims2()?;
        let vocab = self.config.vocab_size as u32;
        let (rows, hidden) = extra.dims2()?;
        let ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
        let device = tokens.device();
        // Vocabulary ids as they are (extra ones looked up as 0, then replaced); extra ids as
        // rows of `extra` with a zero row appended for the others.
        let base_ids: Vec<u32> = ids.iter().map(|&t| if t < vocab { t } else { 0 }).collect();
        let extra_ids: Vec<u32> = ids
            .iter()
            .map(|&t| {
                let i = t.saturating_sub(vocab) as usize;
                if t >= vocab && i < rows {
                    i as u32
                } else {
                    rows as u32
                }
            })
            .collect();
        let keep: Vec<f32> = ids
            .iter()
            .map(|&t| if t < vocab { 1.0 } else { 0.0 })
            .collect();
        let base = self
            .token_embedding
            .forward(&Tensor::from_vec(base_ids, (b, seq), device)?)?;
        let dtype = base.dtype();
        let table = Tensor::cat(
            &[
                &extra.to_dtype(dtype)?.to_device(device)?,
                &Tensor::zeros((1, hidden), dtype, device)?,
            ],
            0,
        )?;
        let replaced = table
            .index_select(&Tensor::from_vec(extra_ids, b * seq, device)?, 0)?
            .reshape((b, seq, hidden))?;
        let keep = Tensor::from_vec(keep, (b, seq, 1), device)?.to_dtype(dtype)?;
        Ok((base.broadcast_mul(&keep)? + replaced)?)
    }

    /// The configuration the encoder was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Encodes `(batch, tokens)` ids. `layers` is how many transformer layers to run for
    /// `hidden` (the full count for the last layer, one less for "penultimate"/clip skip 2);
    /// `final_norm` applies the final layer norm to it. `eos_positions` (one per batch row)
    /// selects the pooled state; the pooled output always comes from the last layer.
    pub fn encode(
        &self,
        tokens: &Tensor,
        layers: usize,
        final_norm: bool,
        eos_positions: &[usize],
    ) -> Result<ClipOutput> {
        self.encode_with(tokens, None, layers, final_norm, eos_positions)
    }

    /// [`Self::encode`], where ids from `vocab_size` on are rows of `extra` (`(n, hidden)`):
    /// textual-inversion vectors in place of token embeddings.
    pub fn encode_with(
        &self,
        tokens: &Tensor,
        extra: Option<&Tensor>,
        layers: usize,
        final_norm: bool,
        eos_positions: &[usize],
    ) -> Result<ClipOutput> {
        let (_, seq) = tokens.dims2()?;
        let device = tokens.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let embedded = match extra {
            Some(extra) => self.embed_with(tokens, extra)?,
            None => self.token_embedding.forward(tokens)?,
        };
        let mut xs = embedded.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, xs.dtype(), device)?;
        let layers = layers.clamp(1, self.layers.len());
        let need_all = self.projection.is_some();
        let mut hidden = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == layers && !need_all {
                break;
            }
            xs = layer.forward(&xs, &mask)?;
            if i + 1 == layers {
                hidden = Some(xs.clone());
            }
        }
        let hidden = hidden.unwrap_or_else(|| xs.clone());
        let hidden = if final_norm {
            self.final_layer_norm.forward(&hidden)?
        } else {
            hidden
        };
        let pooled = match &self.projection {
            Some(proj) => {
                let last = self.final_layer_norm.forward(&xs)?;
                let rows = eos_positions
                    .iter()
                    .enumerate()
                    .map(|(b, &p)| last.i((b, p.min(seq - 1))))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&rows, 0)?)?)
            }
            None => None,
        };
        Ok(ClipOutput { hidden, pooled })
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq, seq), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)?)
}

/// Position of the end-of-text token in each row: the first occurrence of `eos`, else the last
/// position.
pub fn eos_positions(rows: &[Vec<u32>], eos: u32) -> Vec<usize> {
    rows.iter()
        .map(|r| {
            r.iter()
                .position(|&t| t == eos)
                .unwrap_or(r.len().saturating_sub(1))
        })
        .collect()
}
