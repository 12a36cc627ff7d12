//! Llama and Qwen2 from GGUF on the CPU with Studio's own quantized kernels ([`crate::quant`]).
//!
//! The forward pass mirrors candle-transformers' `quantized_llama` / `quantized_qwen2` (RMSNorm,
//! rotary embeddings — interleaved pairs for `llama`, whose GGUF q/k rows are stored permuted
//! for it, half-split "neox" pairs for `qwen2` — grouped-query attention with a KV cache,
//! SwiGLU MLP, q/k/v biases where the file has them, tied output embeddings when there is no
//! `output.weight`), so the logits equal candle's up to the kernels' rounding.
//!
//! Every 2-D weight stays in its file format as a [`QWeight`] when this CPU has a kernel for
//! it ([`has_kernel`]), otherwise it runs through candle's `QMatMul` (logged once per load).
//! The embedding table is looked up row by row from its quantized bytes. Norms and biases are
//! f32. The KV cache can be cut back to a prefix ([`QuantLlama::truncate_kv`]).

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::quant::{KernelPath, QWeight, QuantFormat, has_kernel};

/// A 2-D weight: Studio's kernel, or candle's `QMatMul` where Studio has none.
enum Linear {
    Studio(Arc<QWeight>),
    Candle(QMatMul),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Studio(w) => w.forward(x),
            Linear::Candle(m) => Ok(m.forward(x)?),
        }
    }

    fn is_studio(&self) -> bool {
        matches!(self, Linear::Studio(_))
    }
}

/// The token embedding table: quantized rows decoded on lookup, or a dense f32 table.
enum Embedding {
    Studio(Arc<QWeight>),
    Dense(Tensor),
}

/// Whether Studio's kernels run `tensor` on this CPU.
fn studio_kernel(tensor: &QTensor) -> Option<QuantFormat> {
    let f = QuantFormat::from_ggml(tensor.dtype())?;
    (tensor.shape().dims().len() == 2
        && tensor.shape().dims()[1].is_multiple_of(f.block_size())
        && has_kernel(f, KernelPath::detect()))
    .then_some(f)
}

/// Records which tensors run through candle's kernels instead of Studio's.
#[derive(Default)]
struct Fallbacks(BTreeMap<String, Vec<String>>);

impl Fallbacks {
    fn linear(&mut self, name: &str, tensor: QTensor) -> Result<Linear> {
        if studio_kernel(&tensor).is_some() {
            Ok(Linear::Studio(Arc::new(QWeight::from_qtensor(
                name, &tensor,
            )?)))
        } else {
            self.0
                .entry(format!("{:?}", tensor.dtype()))
                .or_default()
                .push(name.to_owned());
            Ok(Linear::Candle(QMatMul::from_qtensor(tensor)?))
        }
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Keys and values `[1, kv_heads, len, head_dim]` of positions `0..len`.
    cache: Option<(Tensor, Tensor)>,
}

/// Rotary tables `[len, head_dim / 2]`, grown on demand up to the context length.
struct Rope {
    theta: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
    len: usize,
    max: usize,
}

impl Rope {
    fn new(head_dim: usize, base: f32, max: usize) -> Result<Self> {
        // As candle computes them: in f32.
        let theta = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let empty = Tensor::zeros((0, head_dim / 2), DType::F32, &Device::Cpu)?;
        Ok(Self {
            theta,
            cos: empty.clone(),
            sin: empty,
            len: 0,
            max,
        })
    }

    fn tables(&mut self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let end = offset + t;
        if end > self.len {
            let len = end.max(self.len * 2).max(256).min(self.max.max(end));
            let half = self.theta.len();
            let mut angles = Vec::with_capacity(len * half);
            for p in 0..len {
                angles.extend(self.theta.iter().map(|f| p as f32 * f));
            }
            let a = Tensor::from_vec(angles, (len, half), &Device::Cpu)?;
            self.cos = a.cos()?;
            self.sin = a.sin()?;
            self.len = len;
        }
        Ok((
            self.cos.narrow(0, offset, t)?,
            self.sin.narrow(0, offset, t)?,
        ))
    }
}

/// A GGUF Llama or Qwen2 model on Studio's quantized CPU kernels.
pub struct QuantLlama {
    embed: Embedding,
    output: Linear,
    norm: Tensor,
    layers: Vec<Layer>,
    rope: Rope,
    interleaved_rope: bool,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    vocab: usize,
    context: usize,
    eps: f32,
    fallbacks: Vec<String>,
}

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::InvalidParameter(format!("the GGUF metadata has no `{key}`")))
}

fn meta_usize(ct: &Content, key: &str) -> Result<usize> {
    let v = meta(ct, key)?;
    let n = match v {
        Value::U8(x) => u64::from(*x),
        Value::U16(x) => u64::from(*x),
        Value::U32(x) => u64::from(*x),
        Value::U64(x) => *x,
        Value::I32(x) => u64::try_from(*x).unwrap_or(0),
        Value::I64(x) => u64::try_from(*x).unwrap_or(0),
        _ => {
            return Err(Error::InvalidParameter(format!(
                "`{key}` is not an integer"
            )));
        }
    };
    usize::try_from(n).map_err(|_| Error::InvalidParameter(format!("`{key}` is too large")))
}

fn meta_f32(ct: &Content, key: &str) -> Result<Option<f32>> {
    Ok(match ct.metadata.get(key) {
        None => None,
        Some(Value::F32(x)) => Some(*x),
        #[allow(clippy::cast_possible_truncation)]
        Some(Value::F64(x)) => Some(*x as f32),
        Some(_) => {
            return Err(Error::InvalidParameter(format!("`{key}` is not a number")));
        }
    })
}

impl QuantLlama {
    /// Whether this module runs `general.architecture` `arch`.
    pub fn supports(arch: &str) -> bool {
        matches!(arch, "llama" | "qwen2")
    }

    /// Loads the model from a GGUF file's `Content` (tensors read from `r` one at a time).
    ///
    /// Reads `{arch}.attention.head_count`, `.head_count_kv`, `.embedding_length`,
    /// `.block_count`, `.context_length`, `.attention.layer_norm_rms_epsilon` and
    /// `.rope.freq_base` (10000 when absent).
    pub fn from_gguf<R: Read + Seek>(ct: &Content, r: &mut R) -> Result<Self> {
        let arch = match ct.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(Error::InvalidParameter(
                    "the GGUF metadata has no `general.architecture`".to_owned(),
                ));
            }
        };
        if !Self::supports(&arch) {
            return Err(Error::InvalidParameter(format!(
                "Studio's quantized Llama/Qwen2 cannot run `{arch}`"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = meta_usize(ct, &key("attention.head_count"))?;
        let n_kv_head = match ct.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => meta_usize(ct, &key("attention.head_count_kv"))?,
            None => n_head,
        };
        let hidden = meta_usize(ct, &key("embedding_length"))?;
        let n_layer = meta_usize(ct, &key("block_count"))?;
        let context = meta_usize(ct, &key("context_length"))?;
        let eps = meta_f32(ct, &key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            Error::InvalidParameter(format!(
                "the GGUF metadata has no `{}`",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
        let rope_base = meta_f32(ct, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(Error::InvalidParameter(format!(
                "{n_head} heads, {n_kv_head} key/value heads and width {hidden} do not fit"
            )));
        }
        let head_dim = hidden / n_head;

        let cpu = Device::Cpu;
        let mut fb = Fallbacks::default();
        let embd = ct.tensor(r, "token_embd.weight", &cpu)?;
        let vocab = embd.shape().dims().first().copied().unwrap_or(0);
        let embd_q = match QuantFormat::from_ggml(embd.dtype()) {
            Some(_) => Some(Arc::new(QWeight::from_qtensor("token_embd.weight", &embd)?)),
            None => None,
        };
        let output = if ct.tensor_infos.contains_key("output.weight") {
            fb.linear("output.weight", ct.tensor(r, "output.weight", &cpu)?)?
        } else {
            match &embd_q {
                Some(q) if studio_kernel(&embd).is_some() => Linear::Studio(Arc::clone(q)),
                _ => fb.linear(
                    "token_embd.weight (tied output)",
                    ct.tensor(r, "token_embd.weight", &cpu)?,
                )?,
            }
        };
        let embed = match embd_q {
            Some(q) => Embedding::Studio(q),
            None => Embedding::Dense(embd.dequantize(&cpu)?),
        };
        drop(embd);
        let dense = |r: &mut R, name: &str| -> Result<Tensor> {
            Ok(ct.tensor(r, name, &cpu)?.dequantize(&cpu)?)
        };
        let norm = dense(r, "output_norm.weight")?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let mut lin = |r: &mut R, s: &str| -> Result<Linear> {
                let name = n(s);
                let t = ct.tensor(r, &name, &cpu)?;
                fb.linear(&name, t)
            };
            let wq = lin(r, "attn_q.weight")?;
            let wk = lin(r, "attn_k.weight")?;
            let wv = lin(r, "attn_v.weight")?;
            let wo = lin(r, "attn_output.weight")?;
            let gate = lin(r, "ffn_gate.weight")?;
            let up = lin(r, "ffn_up.weight")?;
            let down = lin(r, "ffn_down.weight")?;
            let bias = |r: &mut R, s: &str| -> Result<Option<Tensor>> {
                let name = n(s);
                if ct.tensor_infos.contains_key(&name) {
                    Ok(Some(dense(r, &name)?))
                } else {
                    Ok(None)
                }
            };
            let bq = bias(r, "attn_q.bias")?;
            let bk = bias(r, "attn_k.bias")?;
            let bv = bias(r, "attn_v.bias")?;
            if arch == "qwen2" && (bq.is_none() || bk.is_none() || bv.is_none()) {
                return Err(Error::InvalidParameter(format!(
                    "qwen2 layer {i} lacks its q/k/v biases"
                )));
            }
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                bq,
                bk,
                bv,
                attn_norm: dense(r, &n("attn_norm.weight"))?,
                ffn_norm: dense(r, &n("ffn_norm.weight"))?,
                gate,
                up,
                down,
                cache: None,
            });
        }
        let fallbacks: Vec<String> =
            fb.0.iter()
                .map(|(format, names)| format!("{format}: {}", names.join(", ")))
                .collect();
        if !fallbacks.is_empty() {
            log::warn!(
                "{arch}: no Studio kernel on this CPU ({}) for these weights, candle's kernels \
                 run them: {}",
                KernelPath::detect(),
                fallbacks.join("; ")
            );
        }
        Ok(Self {
            embed,
            output,
            norm,
            layers,
            rope: Rope::new(head_dim, rope_base, context)?,
            interleaved_rope: arch == "llama",
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            vocab,
            context,
            eps,
            fallbacks,
        })
    }

    /// The weights that run on candle's kernels, as `format: name, name…` (empty when Studio's
    /// kernels run every one).
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    /// How many 2-D weights (the output projection included) run on Studio's kernels.
    pub fn studio_weights(&self) -> usize {
        let per_layer = |l: &Layer| {
            [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                .iter()
                .filter(|w| w.is_studio())
                .count()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + usize::from(self.output.is_studio())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The context the rope tables and the metadata allow.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Positions held in the KV cache.
    pub fn kv_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.cache.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Forgets every cached key and value.
    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }

    /// Keeps the first `len` cached positions (a prompt prefix to reuse); a `len` at or past
    /// the cached length changes nothing.
    pub fn truncate_kv(&mut self, len: usize) -> Result<()> {
        for l in &mut self.layers {
            if let Some((k, v)) = l.cache.take() {
                let have = k.dim(2)?;
                l.cache = if len == 0 {
                    None
                } else if len >= have {
                    Some((k, v))
                } else {
                    Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
                };
            }
        }
        Ok(())
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        match &self.embed {
            Embedding::Studio(w) => {
                let mut out = vec![0f32; tokens.len() * self.hidden];
                for (&t, dst) in tokens.iter().zip(out.chunks_exact_mut(self.hidden)) {
                    w.row_to_f32(t as usize, dst)?;
                }
                Ok(Tensor::from_vec(
                    out,
                    (1, tokens.len(), self.hidden),
                    &Device::Cpu,
                )?)
            }
            Embedding::Dense(table) => {
                let ids = Tensor::new(tokens, &Device::Cpu)?;
                Ok(table.index_select(&ids, 0)?.unsqueeze(0)?)
            }
        }
    }

    /// Runs `tokens` at positions `offset..` (appending to the KV cache, which must hold
    /// exactly `offset` positions; offset 0 starts afresh) and returns the logits `[vocab]` of
    /// the last position, or `[T, vocab]` of every position when `all`.
    pub fn forward(&mut self, tokens: &[u32], offset: usize, all: bool) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::InvalidParameter(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            )));
        }
        if offset == 0 {
            self.clear_kv_cache();
        } else if self.kv_len() != offset {
            return Err(Error::InvalidParameter(format!(
                "the KV cache holds {} positions but the tokens start at {offset}",
                self.kv_len()
            )));
        }
        let (cos, sin) = self.rope.tables(offset, t)?;
        let mask = if t > 1 {
            let len = offset + t;
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..len).map(move |j| {
                        if j > offset + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, len), &Device::Cpu)?)
        } else {
            None
        };
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            let h = candle_nn::ops::rms_norm(&x, &self.layers[i].attn_norm, self.eps)?;
            let h = self.attention(i, &h, &cos, &sin, mask.as_ref())?;
            x = (x + h)?;
            let l = &self.layers[i];
            let h = candle_nn::ops::rms_norm(&x, &l.ffn_norm, self.eps)?;
            let g = l.gate.forward(&h)?;
            let u = l.up.forward(&h)?;
            let h = l.down.forward(&(candle_nn::ops::silu(&g)? * u)?)?;
            x = (x + h)?;
        }
        let x = if all { x } else { x.narrow(1, t - 1, 1)? };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?;
        let logits = self.output.forward(&x)?;
        let logits = if all {
            logits.reshape((t, self.vocab))?
        } else {
            logits.flatten_all()?
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(if self.interleaved_rope {
            candle_nn::rotary_emb::rope_i(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)?
        })
    }

    fn attention(
        &mut self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let l = &self.layers[i];
        let proj = |w: &Linear, bias: Option<&Tensor>, heads: usize| -> Result<Tensor> {
            let y = w.forward(x)?;
            let y = match bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            };
            Ok(y.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = proj(&l.wq, l.bq.as_ref(), nh)?;
        let k = proj(&l.wk, l.bk.as_ref(), nkv)?;
        let v = proj(&l.wv, l.bv.as_ref(), nkv)?;
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;

        let l = &mut self.layers[i];
        let (k, v) = match l.cache.take() {
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
            None => (k, v),
        };
        l.cache = Some((k.clone(), v.clone()));
        let len = k.dim(2)?;

        // Grouped-query attention without repeating the keys: the `groups` query heads that
        // share a key/value head become rows of one matrix.
        let groups = nh / nkv;
        let q = q.reshape((b, nkv, groups * t, hd))?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = match mask {
            Some(m) => att
                .reshape((b, nkv, groups, t, len))?
                .broadcast_add(m)?
                .reshape((b, nkv, groups * t, len))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.layers[i].wo.forward(&y)
    }
}
