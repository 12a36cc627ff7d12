//! Gemma 2 and Gemma 3 (text) from GGUF, as llama.cpp runs them: GELU (tanh) gated MLP, norms
//! before and after attention and MLP (the file's norm weights already include Gemma's +1),
//! embeddings scaled by √width, sliding-window layers with their own rope base, optional
//! attention and final logit soft-capping (Gemma 2), per-head q/k norms (Gemma 3).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Result, Tensor};

use crate::models::qlinear::{Fallbacks, Linear, studio_count, studio_kernel};
use crate::models::quant_llama::GemmaOptions;
use crate::quant::{KernelPath, QWeight, QuantFormat, preferred};

/// What the model takes of a GGUF file's hyperparameters.
pub(crate) struct GemmaConfig<'a> {
    /// The file's architecture name, for the fallback log.
    pub(crate) arch: &'a str,
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) n_layer: usize,
    pub(crate) hidden: usize,
    pub(crate) head_dim: usize,
    pub(crate) eps: f64,
    pub(crate) rope_base: f64,
    /// The context the rope tables cover.
    pub(crate) context: usize,
    /// Whether the output projection is the embedding table.
    pub(crate) tied_output: bool,
    pub(crate) gemma: &'a GemmaParams,
}

/// Gemma-specific hyperparameters.
#[derive(Debug, Clone)]
pub(crate) struct GemmaParams {
    pub(crate) attn_scale: f64,
    pub(crate) attn_softcap: Option<f64>,
    pub(crate) final_softcap: Option<f64>,
    pub(crate) sliding_window: Option<usize>,
    /// Per layer: whether it attends over the sliding window only.
    pub(crate) sliding: Vec<bool>,
    pub(crate) rope_local_base: f64,
    /// Linear rope scaling factor of the global layers.
    pub(crate) rope_global_factor: f64,
    pub(crate) qk_norm: bool,
}

impl GemmaParams {
    /// What Studio's CPU model takes of them (the q/k norms it finds by their tensors).
    #[allow(clippy::cast_possible_truncation)] // scales and rope bases in f32, as computed
    pub(crate) fn options(&self) -> GemmaOptions {
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
    pub(crate) fn load<R: Read + Seek>(
        ct: &Content,
        r: &mut R,
        device: &Device,
        hp: &GemmaConfig<'_>,
    ) -> Result<Self> {
        Self::load_with(ct, r, device, hp, device.is_cpu())
    }

    /// `studio`: Studio's kernels where this CPU has one (only ever on the CPU, and only
    /// when the file's layer format has one).
    pub(crate) fn load_with<R: Read + Seek>(
        ct: &Content,
        r: &mut R,
        device: &Device,
        hp: &GemmaConfig<'_>,
        studio: bool,
    ) -> Result<Self> {
        let g = hp.gemma;
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
            fallbacks: if studio { fb.log(hp.arch) } else { Vec::new() },
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

    /// Forgets every layer's cached keys and values; the next call starts at offset 0.
    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }

    /// `tokens`: `[1, T]` at positions `offset..`; returns the last position's logits.
    pub fn forward(&mut self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let x = self.layers_forward(tokens, offset)?;
        let x = x.narrow(1, t - 1, 1)?;
        let x = norm(&x, &self.norm, self.eps)?;
        let logits = linear(&self.output, &x)?;
        softcap(&logits, self.final_softcap)
    }

    /// The final hidden states (after the last norm) of `tokens` (`[1, T]`) from position 0:
    /// `[T, hidden]`, for embeddings. The caches are left empty.
    pub fn hidden_states(&mut self, tokens: &Tensor) -> Result<Tensor> {
        self.clear_kv_cache();
        let x = self.layers_forward(tokens, 0);
        self.clear_kv_cache();
        norm(&x?, &self.norm, self.eps)?.squeeze(0)
    }

    /// The residual stream after every layer, `[1, T, hidden]`.
    fn layers_forward(&mut self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
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
        Ok(x)
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
