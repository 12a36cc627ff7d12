//! NomicBERT, the encoder of nomic-embed-text (v1, v1.5): a BERT whose positions are rotary
//! (no position table), with SwiGLU feed-forward layers, no biases in its projections, and
//! BERT's post-norm residual layers.
//!
//! Read in both namings: the one nomic-ai publishes (`config.json` keys `n_embd`, `n_head`,
//! `rotary_emb_base`, …; tensors `emb_ln`, `encoder.layers.N.attn.Wqkv`, `attn.out_proj`,
//! `mlp.fc11` (up), `mlp.fc12` (gate), `mlp.fc2`, `norm1`, `norm2`) and transformers 5's
//! (`hidden_size`, `rope_parameters`; `embeddings.LayerNorm`, `layers.N.self_attn.q_proj`, …,
//! `mlp.up_proj`/`gate_proj`/`down_proj`, `post_attention_layernorm`, `post_mlp_layernorm`).
//! Variants Studio would compute differently are refused by name: partial or interleaved
//! rotary dimensions, pre-norm layers, another activation, mixture-of-experts layers.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde_json::Value;

use crate::error::{Error, Result};

/// NomicBERT's shape, from either naming of its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NomicConfig {
    pub(crate) vocab_size: usize,
    pub(crate) hidden: usize,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) intermediate: usize,
    pub(crate) type_vocab_size: usize,
    pub(crate) eps: f64,
    pub(crate) rope_theta: f64,
    /// The longest input: the position count it was trained on when its rope is scaled beyond
    /// that (dynamic NTK, which Studio does not apply), else its `n_positions`.
    pub(crate) positions: usize,
}

/// The first of `keys` that `config` has.
fn first<'a>(config: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .find_map(|k| config.get(*k).filter(|v| !v.is_null()))
}

impl NomicConfig {
    pub(crate) fn read(config: &Value, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadConfig {
            path: path.to_owned(),
            message,
        };
        let size = |keys: &[&str], default: Option<usize>, max: usize| -> Result<usize> {
            let v = match first(config, keys).and_then(Value::as_u64) {
                Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
                None => default.ok_or_else(|| bad(format!("`{}` is missing", keys[0])))?,
            };
            if !(1..=max).contains(&v) {
                return Err(bad(format!(
                    "`{}` is {v}; Studio accepts 1 to {max}",
                    keys[0]
                )));
            }
            Ok(v)
        };
        let unsupported = |what: String| {
            Error::UnsupportedArchitecture(
                format!("NomicBERT with {what}"),
                "NomicBERT as nomic-embed-text v1 and v1.5 are built (full, non-interleaved \
                 rotary positions, SwiGLU, post-norm layers)"
                    .into(),
            )
        };
        let flag = |k: &str| config.get(k).and_then(Value::as_bool);
        if let Some(f) = config.get("rotary_emb_fraction").and_then(Value::as_f64)
            && (f - 1.0).abs() > 1e-9
        {
            return Err(unsupported(format!("rotary_emb_fraction {f}")));
        }
        if flag("rotary_emb_interleaved") == Some(true) {
            return Err(unsupported("interleaved rotary dimensions".into()));
        }
        if flag("prenorm") == Some(true) {
            return Err(unsupported("pre-norm layers".into()));
        }
        if flag("causal") == Some(true) {
            return Err(unsupported("causal attention".into()));
        }
        if first(config, &["moe_every_n_layers", "num_experts"])
            .is_some_and(|v| v.as_u64() != Some(0))
        {
            return Err(unsupported(
                "mixture-of-experts layers (nomic-embed-text-v2-moe)".into(),
            ));
        }
        let act = first(config, &["activation_function", "hidden_act"])
            .and_then(Value::as_str)
            .unwrap_or("swiglu");
        if !matches!(act, "swiglu" | "silu") {
            return Err(unsupported(format!("activation `{act}`")));
        }
        let hidden = size(&["n_embd", "hidden_size"], None, 8192)?;
        let heads = size(&["n_head", "num_attention_heads"], None, 256)?;
        if hidden % heads != 0 || (hidden / heads) % 2 != 0 {
            return Err(bad(format!(
                "{heads} heads do not split the hidden size {hidden} into even head sizes"
            )));
        }
        let rope_theta = config
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| first(config, &["rotary_emb_base", "rope_theta"]))
            .and_then(Value::as_f64)
            .unwrap_or(1000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(bad(format!("rotary base {rope_theta} is not above 1")));
        }
        let mut positions = size(
            &["n_positions", "max_position_embeddings"],
            Some(2048),
            1 << 17,
        )?;
        if first(config, &["rotary_scaling_factor"]).is_some()
            && let Some(trained) = config.get("max_trained_positions").and_then(Value::as_u64)
        {
            positions = positions.min(usize::try_from(trained).unwrap_or(usize::MAX).max(1));
        }
        Ok(Self {
            vocab_size: size(&["vocab_size"], None, 1 << 20)?,
            hidden,
            layers: size(&["n_layer", "num_hidden_layers"], None, 256)?,
            heads,
            intermediate: size(&["n_inner", "intermediate_size"], Some(4 * hidden), 1 << 16)?,
            type_vocab_size: size(&["type_vocab_size"], Some(2), 16)?,
            eps: first(config, &["layer_norm_epsilon", "layer_norm_eps"])
                .and_then(Value::as_f64)
                .filter(|e| *e > 0.0 && *e < 1.0)
                .unwrap_or(1e-12),
            rope_theta,
            positions,
        })
    }
}

struct Layer {
    /// Queries, keys and values stacked: `(3 · hidden, hidden)`.
    qkv: Linear,
    out: Linear,
    up: Linear,
    gate: Linear,
    down: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
}

/// A loaded NomicBERT encoder.
pub(crate) struct NomicBert {
    words: Embedding,
    /// The token-type embedding of type 0 (every token of a single text).
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    rope_theta: f64,
}

/// A linear layer whose bias is optional (published NomicBERT has none).
fn linear(vb: &VarBuilder, name: &str, out: usize, inp: usize) -> candle_core::Result<Linear> {
    let vb = vb.pp(name);
    let weight = vb.get((out, inp), "weight")?;
    let bias = if vb.contains_tensor("bias") {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(
    vb: &VarBuilder,
    name: &str,
    size: usize,
    eps: f64,
) -> candle_core::Result<LayerNorm> {
    let vb = vb.pp(name);
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

impl NomicBert {
    /// Builds the encoder from `vb` in whichever naming its tensors use.
    pub(crate) fn load(vb: &VarBuilder, c: &NomicConfig) -> candle_core::Result<Self> {
        let h = c.hidden;
        let published = vb.contains_tensor("emb_ln.weight");
        let words = Embedding::new(
            vb.get((c.vocab_size, h), "embeddings.word_embeddings.weight")?,
            h,
        );
        let token_type = vb
            .get(
                (c.type_vocab_size, h),
                "embeddings.token_type_embeddings.weight",
            )?
            .get(0)?;
        let emb_ln = if published {
            layer_norm(vb, "emb_ln", h, c.eps)?
        } else {
            layer_norm(vb, "embeddings.LayerNorm", h, c.eps)?
        };
        let mut layers = Vec::with_capacity(c.layers);
        // (prefix, out, up, gate, down, norm1, norm2) in each naming; only q/k/v differ more.
        let names = if published {
            [
                "encoder.layers",
                "attn.out_proj",
                "mlp.fc11",
                "mlp.fc12",
                "mlp.fc2",
                "norm1",
                "norm2",
            ]
        } else {
            [
                "layers",
                "self_attn.o_proj",
                "mlp.up_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
                "post_attention_layernorm",
                "post_mlp_layernorm",
            ]
        };
        let [prefix, out, up, gate, down, norm1, norm2] = names;
        for i in 0..c.layers {
            let l = vb.pp(format!("{prefix}.{i}"));
            let qkv = if published {
                linear(&l, "attn.Wqkv", 3 * h, h)?
            } else {
                let [q, k, v] = ["q_proj", "k_proj", "v_proj"]
                    .map(|p| linear(&l, &format!("self_attn.{p}"), h, h));
                let (q, k, v) = (q?, k?, v?);
                let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let bias = match (q.bias(), k.bias(), v.bias()) {
                    (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                    _ => None,
                };
                Linear::new(weight, bias)
            };
            let layer = Layer {
                qkv,
                out: linear(&l, out, h, h)?,
                up: linear(&l, up, c.intermediate, h)?,
                gate: linear(&l, gate, c.intermediate, h)?,
                down: linear(&l, down, h, c.intermediate)?,
                norm1: layer_norm(&l, norm1, h, c.eps)?,
                norm2: layer_norm(&l, norm2, h, c.eps)?,
            };
            layers.push(layer);
        }
        Ok(Self {
            words,
            token_type,
            emb_ln,
            layers,
            heads: c.heads,
            head_dim: h / c.heads,
            rope_theta: c.rope_theta,
        })
    }

    /// The rotary tables for positions `0..n`: `(n, head_dim / 2)` cosines and sines.
    fn rope(&self, n: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        // Sizes are bounded by the config checks, far inside f64's exact range.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64)) as f32)
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let pos: Vec<f32> = (0..n).map(|p| p as f32).collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::from_vec(pos, (n, 1), device)?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// The last hidden states of one text's token ids: `(tokens, hidden)`.
    pub(crate) fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let n = ids.dim(0)?;
        let device = ids.device();
        let mut x = self.words.forward(ids)?.broadcast_add(&self.token_type)?;
        x = self.emb_ln.forward(&x)?;
        let (cos, sin) = self.rope(n, device)?;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let h = self.heads * self.head_dim;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?; // (n, 3h)
            // (n, heads, d) → (1, heads, n, d), as the rope and the products want them.
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, i * h, h)?
                    .reshape((n, self.heads, self.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let q = candle_nn::rotary_emb::rope(&split(0)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&split(1)?, &cos, &sin)?;
            let v = split(2)?;
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let attended = probs
                .matmul(&v)?
                .squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, h))?;
            x = layer.norm1.forward(&(x + layer.out.forward(&attended)?)?)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&x)?)? * layer.up.forward(&x)?)?;
            x = layer.norm2.forward(&(x + layer.down.forward(&gated)?)?)?;
        }
        Ok(x)
    }
}

/// Whether a `config.json` describes NomicBERT.
pub(crate) fn is_nomic(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("nomic_bert")
}
