//! Llama, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 from GGUF on the CPU with Studio's own
//! quantized kernels ([`crate::quant`]).
//!
//! The forward pass mirrors candle-transformers' `quantized_llama` / `quantized_qwen2` (RMSNorm,
//! rotary embeddings — interleaved pairs for `llama`, whose GGUF q/k rows are stored permuted
//! for it, half-split "neox" pairs for the others — grouped-query attention with a KV cache,
//! SwiGLU MLP, q/k/v biases where the file has them, Qwen3's q/k norms, tied output embeddings
//! when there is no `output.weight`), so the logits equal candle's up to the kernels' rounding.
//! Phi-3's fused q/k/v and gate/up are split by rows. Gemma 2/3 ([`GemmaOptions`]) add
//! embeddings scaled by √width, GeGLU, norms after attention and MLP, their attention scale and
//! soft caps, sliding-window layers with their own rope table, and a linearly scaled global
//! rope; the rope factors of Llama 3.1 (`rope_freqs.weight`) and Phi-3's long rope are applied
//! as llama.cpp applies them.
//!
//! Every 2-D weight stays in its file format as a [`QWeight`] when this CPU has a kernel for
//! it ([`crate::quant::preferred`]), otherwise it runs through candle's `QMatMul` (logged once
//! per load). The embedding table is looked up row by row from its quantized bytes. Norms and
//! biases are f32. Tensors come from Studio's own reader ([`crate::models::tensors`]), so the
//! formats candle cannot read (IQ4_NL, IQ4_XS) load too.
//!
//! Two paths, both over plain vectors (`cpu_ops` for the math between products): several
//! tokens (a prompt) run each product on the pool over all rows at once (Studio's batched
//! kernels) and attention by heads and blocks of query rows; one token (decoding) runs on a
//! team of every pool thread ([`crate::quant::team`]): each product split by output rows,
//! attention by heads, the threads meeting at barriers instead of waking for each of the ~170
//! products of a step, and warming their next weights while they wait. The KV cache is
//! Studio's own (`[kv_heads][capacity][head_dim]` per layer, keys transposed in blocks for
//! `cpu_ops::key_scores`, grown by doubling), so a step appends in place and the cache can be
//! cut back to a prefix ([`QuantLlama::truncate_kv`]).

use std::io::{Read, Seek};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::cpu_ops::{self, KEY_BLOCK, attend, rms_norm, rope_row};
use crate::models::qlinear::{Fallbacks, Linear, studio_count, studio_format};
use crate::models::tensors::{GgufTensors, TensorData};
use crate::quant::team::{self, Claims, Parts, TeamCtx};
use crate::quant::{KernelPath, QWeight, QuantizedInput};

/// The Studio weight of `l` for the decode step (which runs only when every weight is one).
fn studio(l: &Linear) -> Result<&QWeight> {
    l.studio()
        .ok_or_else(|| Error::Panicked("a decode weight is not on Studio's kernels".to_owned()))
}

/// A 1-D f32 weight (norm or bias).
struct Dense {
    v: Vec<f32>,
}

/// One layer's cached keys and values, positions `0..QuantLlama::kv_len` valid: values
/// `[kv_heads][cap][head_dim]`, keys transposed in blocks of [`KEY_BLOCK`] positions
/// (`[kv_heads][cap / KEY_BLOCK][head_dim][KEY_BLOCK]`, read by [`cpu_ops::key_scores`]).
/// Grown (by doubling) before a step needs it, never inside one.
#[derive(Default)]
struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
}

impl KvCache {
    /// Makes room for `need` positions, keeping the first `len`.
    fn reserve(&mut self, need: usize, len: usize, heads: usize, hd: usize, max: usize) {
        if need <= self.cap {
            return;
        }
        let cap = need
            .max(self.cap * 2)
            .max(64)
            .min(max.max(need))
            .next_multiple_of(KEY_BLOCK);
        let grow = |old: &[f32], keep: usize| {
            let mut new = vec![0f32; heads * cap * hd];
            for h in 0..heads {
                let (src, dst) = (h * self.cap * hd, h * cap * hd);
                new[dst..dst + keep].copy_from_slice(&old[src..src + keep]);
            }
            new
        };
        // Keys in whole blocks, so the transposed layout copies as it is.
        self.k = grow(&self.k, len.next_multiple_of(KEY_BLOCK).min(self.cap) * hd);
        self.v = grow(&self.v, len * hd);
        self.cap = cap;
    }

    /// Writes one position of kv head `h` (`hd` values each).
    fn put(&mut self, h: usize, pos: usize, hd: usize, k: &[f32], v: &[f32]) {
        let block = (h * self.cap + pos / KEY_BLOCK * KEY_BLOCK) * hd;
        let lane = pos % KEY_BLOCK;
        for (d, &k) in k.iter().enumerate() {
            self.k[block + d * KEY_BLOCK + lane] = k;
        }
        let at = (h * self.cap + pos) * hd;
        self.v[at..at + hd].copy_from_slice(v);
    }

    /// Positions `0..len` of kv head `h`: (the transposed key blocks that hold them, the
    /// values `len × hd`).
    fn head(&self, h: usize, len: usize, hd: usize) -> (&[f32], &[f32]) {
        let at = h * self.cap * hd;
        (
            &self.k[at..at + len.next_multiple_of(KEY_BLOCK) * hd],
            &self.v[at..at + len * hd],
        )
    }
}

/// The token embedding table: quantized rows decoded on lookup, or a dense f32 table.
enum Embedding {
    Studio(Arc<QWeight>),
    Dense(Vec<f32>),
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    bq: Option<Dense>,
    bk: Option<Dense>,
    bv: Option<Dense>,
    /// Qwen3's per-head norms of q and k (`[head_dim]`).
    q_norm: Option<Dense>,
    k_norm: Option<Dense>,
    attn_norm: Dense,
    ffn_norm: Dense,
    /// Gemma's norms of the attention and MLP outputs before they join the residual stream.
    post_attn_norm: Option<Dense>,
    post_ffw_norm: Option<Dense>,
    /// Gemma's sliding-window layers (their own rope, the window of [`Gemma::scores`]).
    sliding: bool,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Written by one thread of the decode team, read by all after a barrier.
    kv: RwLock<KvCache>,
}

impl Layer {
    fn kv_mut(&mut self) -> &mut KvCache {
        self.kv.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// One position's q, k, v rows as attention takes them: biases added, Qwen3's per-head
    /// norms of q and k, then rope at `pos` (`head_norm`: scratch of one head).
    fn prepare_qkv(
        &self,
        [q, k, v]: [&mut [f32]; 3],
        pos: usize,
        rope: &Rope,
        interleaved: bool,
        eps: f32,
        head_norm: &mut [f32],
    ) {
        for (y, b) in [(&mut *q, &self.bq), (&mut *k, &self.bk), (v, &self.bv)] {
            if let Some(b) = b {
                y.iter_mut().zip(&b.v).for_each(|(y, b)| *y += b);
            }
        }
        let (cos, sin) = rope.at(pos);
        for (y, norm) in [(q, &self.q_norm), (k, &self.k_norm)] {
            for head in y.chunks_exact_mut(head_norm.len()) {
                if let Some(norm) = norm {
                    head_norm.copy_from_slice(head);
                    rms_norm(head_norm, &norm.v, eps, head);
                }
                rope_row(head, cos, sin, interleaved);
            }
        }
    }
}

/// Rotary tables `[len, head_dim / 2]` of cos and sin, grown on demand up to the context length.
struct Rope {
    theta: Vec<f32>,
    mscale: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
    len: usize,
    max: usize,
}

impl Rope {
    /// `factors` divide the frequencies (llama.cpp's `rope_freqs.weight` and Phi-3's long-rope
    /// factors), `mscale` multiplies cos and sin (Phi-3's long-rope attention factor).
    fn new(
        head_dim: usize,
        base: f32,
        factors: Option<(&str, &[f32])>,
        mscale: f32,
        max: usize,
    ) -> Result<Self> {
        // As candle computes them: in f32; divided by the file's frequency factors, as
        // llama.cpp applies `rope_freqs.weight`.
        let mut theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        if let Some((name, f)) = factors {
            if f.len() != theta.len() {
                return Err(Error::InvalidParameter(format!(
                    "`{name}` has {} values for {} rotary frequencies",
                    f.len(),
                    theta.len()
                )));
            }
            if f.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(Error::InvalidParameter(format!(
                    "`{name}` holds a factor that is not a positive number"
                )));
            }
            theta.iter_mut().zip(f).for_each(|(t, f)| *t /= f);
        }
        Ok(Self {
            theta,
            mscale,
            cos: Vec::new(),
            sin: Vec::new(),
            len: 0,
            max,
        })
    }

    /// Makes the tables cover positions `0..end`.
    fn grow(&mut self, end: usize) {
        if end > self.len {
            let len = end.max(self.len * 2).max(256).min(self.max.max(end));
            let angles = (0..len).flat_map(|p| self.theta.iter().map(move |f| p as f32 * f));
            let m = self.mscale;
            (self.cos, self.sin) = angles.map(|a| (a.cos() * m, a.sin() * m)).unzip();
            self.len = len;
        }
    }

    /// The (cos, sin) values of position `pos` (grown by [`Rope::grow`] beforehand).
    fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.theta.len();
        (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        )
    }
}

/// What Gemma 2 and Gemma 3 do differently from Llama, as the GGUF metadata says (read by
/// [`crate::llm::gguf`]): embeddings scaled by √width, GeGLU, norms after attention and MLP (their
/// weights, with Gemma's +1, read from `post_attention_norm` / `post_ffw_norm`), its own
/// attention scale, Gemma 2's soft caps, sliding-window layers with their own rope base, and
/// Gemma 3's linear rope scaling of the global layers.
#[derive(Clone, Debug)]
pub struct GemmaOptions {
    /// Multiplies attention scores: `attention.scale`, else 1/√head_dim (the 27B models:
    /// 1/√(width / heads)).
    pub attn_scale: f32,
    /// Gemma 2's soft cap of the attention scores (`cap · tanh(s / cap)`); `None` for none.
    pub attn_softcap: Option<f32>,
    /// Soft cap of the output logits (Gemma 2: 30 by default); `None` for none.
    pub final_softcap: Option<f32>,
    /// Positions a sliding-window layer attends over, itself included; `None` when the
    /// file gives no window.
    pub window: Option<usize>,
    /// Per layer: whether it attends over the sliding window only.
    pub sliding: Vec<bool>,
    /// Rope frequency base of the sliding-window layers.
    pub rope_local_base: f32,
    /// Divides the global layers' rotary frequencies.
    pub rope_global_factor: f32,
}

/// The rope tables of a layer: Gemma's sliding layers have their own.
fn layer_rope<'a>(
    global: &'a Rope,
    gemma: Option<&'a (GemmaOptions, Rope)>,
    l: &Layer,
) -> &'a Rope {
    match gemma {
        Some((_, local)) if l.sliding => local,
        _ => global,
    }
}

/// How a layer's attention shapes its scores.
fn layer_scores(gemma: Option<&(GemmaOptions, Rope)>, l: &Layer, hd: usize) -> cpu_ops::Scores {
    match gemma {
        Some((g, _)) => cpu_ops::Scores {
            scale: g.attn_scale,
            softcap: g.attn_softcap,
            window: g.window.filter(|_| l.sliding),
        },
        None => cpu_ops::Scores::plain(hd),
    }
}

/// Gemma 2's soft cap of the logits (`cap · tanh(x / cap)`).
fn cap_logits(gemma: Option<&(GemmaOptions, Rope)>, logits: &mut [f32]) {
    if let Some(cap) = gemma.and_then(|(g, _)| g.final_softcap) {
        for x in logits {
            *x = cap * (*x / cap).tanh();
        }
    }
}

/// Phi-3's long-rope scaling from GGUF (`rope_factors_short/long.weight`,
/// `rope.scaling.original_context_length`, `rope.scaling.attn_factor`), applied as llama.cpp
/// does: the short factors for a context up to the original one, the long ones beyond; both
/// divide the frequencies, and the attention factor scales cos and sin (so q·k by its square).
#[derive(Clone)]
struct LongRope {
    short: Vec<f32>,
    long: Vec<f32>,
    original: usize,
    attn_factor: f32,
}

/// What the rope tables are made from.
#[derive(Clone)]
struct RopeSpec {
    head_dim: usize,
    base: f32,
    /// Llama 3.1+'s `rope_freqs.weight`.
    freqs: Option<Vec<f32>>,
    long: Option<LongRope>,
}

impl RopeSpec {
    /// The tables for a model run with a context of `context` tokens, grown up to `max`.
    fn build(&self, context: usize, max: usize) -> Result<Rope> {
        let (factors, mscale) = match (&self.long, &self.freqs) {
            (Some(l), _) if context > l.original => (
                Some(("rope_factors_long.weight", &l.long[..])),
                l.attn_factor,
            ),
            (Some(l), _) => (
                Some(("rope_factors_short.weight", &l.short[..])),
                l.attn_factor,
            ),
            (None, Some(f)) => (Some(("rope_freqs.weight", &f[..])), 1.0),
            (None, None) => (None, 1.0),
        };
        Rope::new(self.head_dim, self.base, factors, mscale, max)
    }

    /// Whether a context of `a` and one of `b` tokens use the same tables.
    fn same_tables(&self, a: usize, b: usize) -> bool {
        self.long
            .as_ref()
            .is_none_or(|l| (a > l.original) == (b > l.original))
    }
}

/// A GGUF model of the families above on Studio's quantized CPU kernels.
pub struct QuantLlama {
    embed: Embedding,
    output: Linear,
    norm: Dense,
    layers: Vec<Layer>,
    /// Positions held in every layer's KV cache.
    kv_len: usize,
    /// The decode team's output slots (rebuilt when the thread count changes).
    parts: Option<Parts>,
    rope: Rope,
    /// How the rope tables are made (rebuilt when the context crosses Phi-3's original one).
    rope_spec: RopeSpec,
    /// Gemma's: its options and the sliding layers' rope tables.
    gemma: Option<(GemmaOptions, Rope)>,
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
        matches!(arch, "llama" | "qwen2" | "qwen3" | "phi3")
    }

    /// Loads the model from a GGUF file's `Content` (tensors read from `r` one at a time).
    ///
    /// Reads `{arch}.attention.head_count`, `.head_count_kv`, `.embedding_length`,
    /// `.block_count`, `.context_length`, `.attention.layer_norm_rms_epsilon` and
    /// `.rope.freq_base` (10000 when absent).
    pub fn from_gguf<R: Read + Seek>(ct: &Content, r: &mut R) -> Result<Self> {
        Self::from_gguf_tensors(ct, &GgufTensors::from_content(ct), r)
    }

    /// As [`QuantLlama::from_gguf`], with the tensors read by Studio's own reader from the
    /// directory `tensors` (which also holds the types candle lacks: IQ4_NL, IQ4_XS); `ct`
    /// gives the metadata.
    pub fn from_gguf_tensors<R: Read + Seek>(
        ct: &Content,
        tensors: &GgufTensors,
        r: &mut R,
    ) -> Result<Self> {
        Self::load(ct, tensors, r, None)
    }

    /// A Gemma 2 / Gemma 3 file (`gemma2`, `gemma3`), as [`QuantLlama::from_gguf_tensors`]
    /// with what its metadata says of Gemma's differences.
    pub fn from_gguf_gemma<R: Read + Seek>(
        ct: &Content,
        tensors: &GgufTensors,
        r: &mut R,
        options: GemmaOptions,
    ) -> Result<Self> {
        Self::load(ct, tensors, r, Some(options))
    }

    #[allow(clippy::too_many_lines)] // one loader for every family, read top to bottom
    fn load<R: Read + Seek>(
        ct: &Content,
        tensors: &GgufTensors,
        r: &mut R,
        gemma: Option<GemmaOptions>,
    ) -> Result<Self> {
        let arch = match ct.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(Error::InvalidParameter(
                    "the GGUF metadata has no `general.architecture`".to_owned(),
                ));
            }
        };
        let gemma_arch = matches!(arch.as_str(), "gemma2" | "gemma3");
        if !(Self::supports(&arch) && gemma.is_none() || gemma_arch && gemma.is_some()) {
            return Err(Error::InvalidParameter(format!(
                "Studio's quantized model cannot run `{arch}`{}",
                if gemma_arch {
                    " without Gemma's options"
                } else {
                    ""
                }
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
        let head_dim = match ct.metadata.get(&key("attention.key_length")) {
            Some(_) => meta_usize(ct, &key("attention.key_length"))?,
            None if n_head > 0 && hidden % n_head == 0 => hidden / n_head,
            None => 0,
        };
        if n_head == 0 || n_kv_head == 0 || head_dim % 2 != 0 || n_head % n_kv_head != 0 {
            return Err(Error::InvalidParameter(format!(
                "{n_head} heads of {head_dim}, {n_kv_head} key/value heads and width {hidden} \
                 do not fit"
            )));
        }
        let (q_dim, kv_dim) = (n_head * head_dim, n_kv_head * head_dim);

        let mut fb = Fallbacks::default();
        let embd = tensors.read(r, "token_embd.weight")?;
        let vocab = embd.dims.first().copied().unwrap_or(0);
        let embd_studio = studio_format(embd.ggml_type, &embd.dims).is_some();
        let tied = !tensors.contains("output.weight");
        let output = if tied {
            None
        } else {
            Some(fb.data("output.weight", tensors.read(r, "output.weight")?)?)
        };
        let (embed, output) = match (embd.format(), output) {
            (Some(_), output) => {
                // The table stays in its file format; rows are decoded on lookup.
                let tied_candle = (tied && !embd_studio).then(|| embd.clone());
                let q = Arc::new(embd.into_qweight()?);
                let output = match (output, tied_candle) {
                    (Some(o), _) => o,
                    (None, Some(t)) => fb.data("token_embd.weight (tied output)", t)?,
                    (None, None) => Linear::Studio(Arc::clone(&q)),
                };
                (Embedding::Studio(q), output)
            }
            (None, output) => {
                let dense = embd.to_f32()?;
                let output = match output {
                    Some(o) => o,
                    None => fb.data("token_embd.weight (tied output)", embd)?,
                };
                (Embedding::Dense(dense), output)
            }
        };
        let dense = |r: &mut R, name: &str| -> Result<Dense> {
            Ok(Dense {
                v: tensors.read(r, name)?.to_f32()?,
            })
        };
        let norm = dense(r, "output_norm.weight")?;
        // Llama 3.1+ scales the rotary frequencies by `rope_freqs.weight` (one divisor each);
        // Phi-3 long-rope files by short or long factors, chosen by the context.
        let rope_freqs = if tensors.contains("rope_freqs.weight") {
            Some(dense(r, "rope_freqs.weight")?.v)
        } else {
            None
        };
        let (short, long) = ("rope_factors_short.weight", "rope_factors_long.weight");
        let long_rope = match (tensors.contains(short), tensors.contains(long)) {
            (false, false) => None,
            (true, true) => {
                let attn_factor = meta_f32(ct, &key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
                if !(attn_factor.is_finite() && attn_factor > 0.0) {
                    return Err(Error::InvalidParameter(format!(
                        "`{}` is {attn_factor}",
                        key("rope.scaling.attn_factor")
                    )));
                }
                let original = match ct
                    .metadata
                    .get(&key("rope.scaling.original_context_length"))
                {
                    Some(_) => meta_usize(ct, &key("rope.scaling.original_context_length"))?,
                    None => context,
                };
                Some(LongRope {
                    short: dense(r, short)?.v,
                    long: dense(r, long)?.v,
                    original,
                    attn_factor,
                })
            }
            _ => {
                return Err(Error::InvalidParameter(format!(
                    "the file has only one of `{short}` and `{long}`"
                )));
            }
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let lin = |r: &mut R, fb: &mut Fallbacks, s: &str| -> Result<Linear> {
                let name = n(s);
                fb.data(&name, tensors.read(r, &name)?)
            };
            let (wq, wk, wv, gate, up) = if arch == "phi3" {
                // Phi-3 fuses q/k/v and gate/up into one tensor each: split them by rows.
                let name = n("attn_qkv.weight");
                let qkv = split_rows(&tensors.read(r, &name)?, &[q_dim, kv_dim, kv_dim], &mut fb)?;
                let name = n("ffn_up.weight");
                let fused = tensors.read(r, &name)?;
                let ff = fused.dims.first().copied().unwrap_or(0) / 2;
                let gate_up = split_rows(&fused, &[ff, ff], &mut fb)?;
                let [q, k, v] = <[Linear; 3]>::try_from(qkv).map_err(|_| shape_error(&name))?;
                let [g, u] = <[Linear; 2]>::try_from(gate_up).map_err(|_| shape_error(&name))?;
                (q, k, v, g, u)
            } else {
                (
                    lin(r, &mut fb, "attn_q.weight")?,
                    lin(r, &mut fb, "attn_k.weight")?,
                    lin(r, &mut fb, "attn_v.weight")?,
                    lin(r, &mut fb, "ffn_gate.weight")?,
                    lin(r, &mut fb, "ffn_up.weight")?,
                )
            };
            let wo = lin(r, &mut fb, "attn_output.weight")?;
            let down = lin(r, &mut fb, "ffn_down.weight")?;
            let bias = |r: &mut R, s: &str| -> Result<Option<Dense>> {
                let name = n(s);
                if tensors.contains(&name) {
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
            // Qwen3: an RMSNorm over each head of q and k before the rotation.
            let q_norm = bias(r, "attn_q_norm.weight")?;
            let k_norm = bias(r, "attn_k_norm.weight")?;
            if arch == "qwen3" && (q_norm.is_none() || k_norm.is_none()) {
                return Err(Error::InvalidParameter(format!(
                    "qwen3 layer {i} lacks its q/k norms"
                )));
            }
            let (post_attn_norm, post_ffw_norm) = if gemma.is_some() {
                (
                    Some(dense(r, &n("post_attention_norm.weight"))?),
                    Some(dense(r, &n("post_ffw_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            let sliding = gemma
                .as_ref()
                .is_some_and(|g| g.sliding.get(i).copied().unwrap_or(false));
            layers.push(Layer {
                post_attn_norm,
                post_ffw_norm,
                sliding,
                wq,
                wk,
                wv,
                wo,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                attn_norm: dense(r, &n("attn_norm.weight"))?,
                ffn_norm: dense(r, &n("ffn_norm.weight"))?,
                gate,
                up,
                down,
                kv: RwLock::new(KvCache::default()),
            });
        }
        let fallbacks = fb.log(&arch);
        let rope_freqs = match &gemma {
            // Gemma 3's linear scaling of the global layers: every frequency divided alike.
            Some(g) if (g.rope_global_factor - 1.0).abs() > f32::EPSILON => {
                Some(vec![g.rope_global_factor; head_dim / 2])
            }
            _ => rope_freqs,
        };
        let rope_spec = RopeSpec {
            head_dim,
            base: rope_base,
            freqs: rope_freqs,
            long: long_rope,
        };
        let gemma = match gemma {
            Some(g) => {
                let local = RopeSpec {
                    head_dim,
                    base: g.rope_local_base,
                    freqs: None,
                    long: None,
                }
                .build(context, context)?;
                Some((g, local))
            }
            None => None,
        };
        Ok(Self {
            embed,
            output,
            norm,
            layers,
            kv_len: 0,
            parts: None,
            rope: rope_spec.build(context, context)?,
            rope_spec,
            gemma,
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
        let per_layer =
            |l: &Layer| studio_count([&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]);
        self.layers.iter().map(per_layer).sum::<usize>() + usize::from(self.output.is_studio())
    }

    /// Size of the vocabulary: the length of the logits.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The context the model runs with: the metadata's, or the last
    /// [`QuantLlama::set_context`].
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Runs the model with a context of `tokens` from now on (the rope tables and the KV
    /// cache grow on demand up to it; positions past it are refused). A Phi-3 long-rope model
    /// picks its short or long factors by it (as llama.cpp picks them by its context size);
    /// when the choice changes, the KV cache, whose keys were rotated the other way, is
    /// cleared.
    pub fn set_context(&mut self, tokens: usize) -> Result<()> {
        if let Some((_, local)) = &mut self.gemma {
            local.max = tokens;
        }
        if self.rope_spec.same_tables(tokens, self.context) {
            self.rope.max = tokens;
        } else {
            self.rope = self.rope_spec.build(tokens, tokens)?;
            self.clear_kv_cache();
        }
        if self.kv_len > tokens {
            self.truncate_kv(tokens)?;
        }
        self.context = tokens;
        Ok(())
    }

    /// Positions held in the KV cache.
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }

    /// Forgets every cached key and value (the buffers stay for the next prompt).
    pub fn clear_kv_cache(&mut self) {
        self.kv_len = 0;
    }

    /// Keeps the first `len` cached positions (a prompt prefix to reuse); a `len` at or past
    /// the cached length changes nothing.
    pub fn truncate_kv(&mut self, len: usize) -> Result<()> {
        self.kv_len = self.kv_len.min(len);
        Ok(())
    }

    /// Makes room in every layer's cache for `need` positions.
    fn reserve_kv(&mut self, need: usize) {
        let (len, heads, hd, max) = (self.kv_len, self.n_kv_head, self.head_dim, self.context);
        for l in &mut self.layers {
            l.kv_mut().reserve(need, len, heads, hd, max);
        }
    }

    /// The embedding rows of `tokens`, `tokens.len() × hidden`.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; tokens.len() * self.hidden];
        for (&t, dst) in tokens.iter().zip(out.chunks_exact_mut(self.hidden)) {
            let t = t as usize;
            match &self.embed {
                Embedding::Studio(w) => w.row_to_f32(t, dst)?,
                Embedding::Dense(table) => {
                    dst.copy_from_slice(&table[t * self.hidden..(t + 1) * self.hidden]);
                }
            }
        }
        if self.gemma.is_some() {
            // Gemma scales its embeddings by √width.
            let scale = (self.hidden as f32).sqrt();
            for x in &mut out {
                *x *= scale;
            }
        }
        Ok(out)
    }

    /// Runs `tokens` at positions `offset..` (appending to the KV cache, which must hold
    /// exactly `offset` positions; offset 0 starts afresh) and returns the logits `[vocab]` of
    /// the last position, or `[T, vocab]` of every position when `all`.
    pub fn forward(&mut self, tokens: &[u32], offset: usize, all: bool) -> Result<Tensor> {
        let t = tokens.len();
        self.check_tokens(tokens)?;
        if offset == 0 {
            self.clear_kv_cache();
        } else if self.kv_len() != offset {
            return Err(Error::InvalidParameter(format!(
                "the KV cache holds {} positions but the tokens start at {offset}",
                self.kv_len()
            )));
        }
        if offset + t > self.context {
            return Err(Error::PromptTooLong {
                tokens: offset + t,
                context: self.context,
            });
        }
        self.reserve_kv(offset + t);
        self.rope.grow(offset + t);
        if let Some((_, local)) = &mut self.gemma {
            local.grow(offset + t);
        }
        let logits = if t == 1 && self.decode_ready() {
            self.decode(tokens[0], offset)?
        } else {
            self.prefill(tokens, offset, all)?
        };
        self.kv_len = offset + t;
        let shape = if all {
            vec![logits.len() / self.vocab, self.vocab]
        } else {
            vec![self.vocab]
        };
        Ok(Tensor::from_vec(logits, shape, &Device::Cpu)?)
    }

    /// Several tokens (a prompt) at positions `offset..` (cache and rope tables already grown):
    /// each product on the pool over all the rows at once (Studio's batched kernels), the
    /// rest in plain vectors ([`cpu_ops`]). Returns the logits of the last row, or of every
    /// row when `all`.
    fn prefill(&mut self, tokens: &[u32], offset: usize, all: bool) -> Result<Vec<f32>> {
        let t = tokens.len();
        let x = self.layers_forward(tokens, offset)?;
        let (x, m) = if all {
            (x, t)
        } else {
            (x[(t - 1) * self.hidden..].to_vec(), 1)
        };
        let mut h = vec![0f32; x.len()];
        cpu_ops::rms_norm_rows(&x, &self.norm.v, self.eps, &mut h);
        let mut logits = self.output.matmul(&h, m)?;
        cap_logits(self.gemma.as_ref(), &mut logits);
        Ok(logits)
    }

    /// The final hidden states of `tokens` from position 0 (after the output norm, before the
    /// output projection), `tokens.len() × hidden`, for embeddings. The cache is left empty.
    pub fn hidden_states(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let t = tokens.len();
        self.check_tokens(tokens)?;
        if t > self.context {
            return Err(Error::PromptTooLong {
                tokens: t,
                context: self.context,
            });
        }
        self.clear_kv_cache();
        self.reserve_kv(t);
        self.rope.grow(t);
        if let Some((_, local)) = &mut self.gemma {
            local.grow(t);
        }
        let x = self.layers_forward(tokens, 0);
        self.clear_kv_cache();
        let x = x?;
        let mut h = vec![0f32; x.len()];
        cpu_ops::rms_norm_rows(&x, &self.norm.v, self.eps, &mut h);
        Ok(h)
    }

    /// Tokens to run: at least one, each in the vocabulary.
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::InvalidParameter(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            )));
        }
        Ok(())
    }

    /// The residual stream after every layer for `tokens` at positions `offset..` (cache and
    /// rope tables already grown), `tokens.len() × hidden`.
    fn layers_forward(&mut self, tokens: &[u32], offset: usize) -> Result<Vec<f32>> {
        let t = tokens.len();
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (qd, kvd, eps) = (nh * hd, nkv * hd, self.eps);
        let mut x = self.embed(tokens)?;
        let mut h = vec![0f32; x.len()];
        let mut head_norm = vec![0f32; hd];
        let gemma = self.gemma.as_ref();
        for l in &mut self.layers {
            let rope = layer_rope(&self.rope, gemma, l);
            let how = layer_scores(gemma, l, hd);
            cpu_ops::rms_norm_rows(&x, &l.attn_norm.v, eps, &mut h);
            let mut q = l.wq.matmul(&h, t)?;
            let mut k = l.wk.matmul(&h, t)?;
            let mut v = l.wv.matmul(&h, t)?;
            let rows = q
                .chunks_exact_mut(qd)
                .zip(k.chunks_exact_mut(kvd))
                .zip(v.chunks_exact_mut(kvd));
            for (i, ((q, k), v)) in rows.enumerate() {
                l.prepare_qkv(
                    [q, k, v],
                    offset + i,
                    rope,
                    self.interleaved_rope,
                    eps,
                    &mut head_norm,
                );
            }
            let cache = l.kv.get_mut().unwrap_or_else(PoisonError::into_inner);
            for (i, (k, v)) in k.chunks_exact(kvd).zip(v.chunks_exact(kvd)).enumerate() {
                for kh in 0..nkv {
                    let r = kh * hd..(kh + 1) * hd;
                    cache.put(kh, offset + i, hd, &k[r.clone()], &v[r]);
                }
            }
            let cache = &*cache;
            let att = cpu_ops::attend_causal(&q, t, offset, nh, nkv, hd, how, |kh| {
                cache.head(kh, offset + t, hd)
            });
            let mut o = l.wo.matmul(&att, t)?;
            if let Some(n) = &l.post_attn_norm {
                cpu_ops::rms_norm_rows(&o, &n.v, eps, &mut h);
                o.copy_from_slice(&h);
            }
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            cpu_ops::rms_norm_rows(&x, &l.ffn_norm.v, eps, &mut h);
            let mut g = l.gate.matmul(&h, t)?;
            let u = l.up.matmul(&h, t)?;
            if gemma.is_some() {
                cpu_ops::geglu_in_place(&mut g, &u);
            } else {
                cpu_ops::swiglu_in_place(&mut g, &u);
            }
            let mut d = l.down.matmul(&g, t)?;
            if let Some(n) = &l.post_ffw_norm {
                cpu_ops::rms_norm_rows(&d, &n.v, eps, &mut h);
                d.copy_from_slice(&h);
            }
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        Ok(x)
    }

    /// Whether one-token steps run on the decode team (every linear weight on Studio's kernels).
    fn decode_ready(&self) -> bool {
        self.studio_weights() == self.layers.len() * 7 + 1
    }

    /// One token at position `pos` (cache and rope tables already grown): every thread of the
    /// pool runs the whole step ([`QuantLlama::decode_on`]), so no product waits for threads
    /// to wake. Returns the logits.
    fn decode(&mut self, token: u32, pos: usize) -> Result<Vec<f32>> {
        let x0 = self.embed(&[token])?;
        let threads = rayon::current_num_threads();
        let (qd, kvd) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let inter = self
            .layers
            .iter()
            .filter_map(|l| l.gate.studio().map(QWeight::rows))
            .max()
            .unwrap_or(0);
        let need = (qd + 2 * kvd).max(self.hidden).max(inter).max(self.vocab);
        if self
            .parts
            .as_ref()
            .is_none_or(|p| p.threads() != threads || p.len() < need)
        {
            self.parts = Some(Parts::new(threads, need));
        }
        let this = &*self;
        let parts = this
            .parts
            .as_ref()
            .ok_or_else(|| Error::Panicked("the decode slots are missing".to_owned()))?;
        let qkv_pieces: Vec<(usize, std::ops::Range<usize>)> = [qd, kvd, kvd]
            .into_iter()
            .enumerate()
            .flat_map(|(which, n)| (0..threads).map(move |i| (which, piece(n, threads, i))))
            .collect();
        let step = DecodeStep {
            parts,
            layers: this
                .layers
                .iter()
                .map(|_| LayerClaims {
                    qkv: Claims::new(qkv_pieces.len(), threads),
                    att: Claims::new(this.n_head, threads),
                    wo: Claims::new(threads, threads),
                    ffn: Claims::new(threads, threads),
                    down: Claims::new(threads, threads),
                })
                .collect(),
            output: Claims::new(threads, threads),
            qkv_pieces,
        };
        let logits = Mutex::new(vec![0f32; self.vocab]);
        team::run(|t| this.decode_on(t, &step, &x0, pos, &logits))?;
        let mut logits = logits.into_inner().unwrap_or_else(PoisonError::into_inner);
        cap_logits(self.gemma.as_ref(), &mut logits);
        Ok(logits)
    }

    /// One thread's part of a decode step. Every thread keeps its own copy of the residual
    /// stream and the small vectors (norms, biases, rope: a few thousand values). Each product
    /// is cut into one contiguous piece of rows per thread ([`piece`]) and attention into
    /// heads; each thread takes its own pieces first, then any left ([`Claims`]), so a thread
    /// the system descheduled leaves its share to one that is running; they meet in `parts`
    /// after each barrier. Thread 0 appends the new key/value position (once every thread is
    /// past that layer's attention); each thread copies its pieces of the logits out itself.
    #[allow(clippy::too_many_lines)] // one step of the model, read top to bottom
    fn decode_on(
        &self,
        t: &TeamCtx,
        step: &DecodeStep,
        x0: &[f32],
        pos: usize,
        logits: &Mutex<Vec<f32>>,
    ) -> Result<()> {
        let path = KernelPath::detect();
        let parts = step.parts;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (qd, kvd, groups) = (nh * hd, nkv * hd, nh / nkv);
        let (me, threads) = (t.index(), t.threads());
        let gemma = self.gemma.as_ref();
        // Pieces of `w · input` taken by this thread, into its slot at `at + rows`.
        let product = |w: &QWeight,
                       input: &mut QuantizedInput,
                       x: &[f32],
                       at: usize,
                       claims: &Claims,
                       phase: usize|
         -> Result<()> {
            let mut slot = parts.slot(me, phase);
            while let Some(i) = claims.take(me) {
                let r = piece(w.rows(), threads, i);
                w.matmul_rows(
                    input,
                    x,
                    1,
                    r.clone(),
                    &mut slot[at + r.start..at + r.end],
                    path,
                )?;
            }
            Ok(())
        };

        // This thread's own piece of a weight: what it warms while waiting.
        let mine = |w| own_piece(w, threads, me);
        let mut x = x0.to_vec();
        let mut h = vec![0f32; self.hidden];
        let mut post = vec![0f32; self.hidden];
        let mut qkv = vec![0f32; qd + 2 * kvd];
        let mut att = vec![0f32; qd];
        let mut head_norm = vec![0f32; hd];
        let (mut inner, mut g, mut u) = (Vec::new(), Vec::new(), Vec::new());
        let mut scores = Vec::with_capacity(pos + 1);
        let mut input = QuantizedInput::default();
        let mut phase = 0usize;
        for (l_index, (l, c)) in self.layers.iter().zip(&step.layers).enumerate() {
            // q, k, v: one list of pieces over the three products.
            rms_norm(&x, &l.attn_norm.v, self.eps, &mut h);
            input.clear();
            let (wq, wk, wv) = (studio(&l.wq)?, studio(&l.wk)?, studio(&l.wv)?);
            {
                let mut slot = parts.slot(me, phase);
                while let Some(i) = c.qkv.take(me) {
                    let (which, r) = &step.qkv_pieces[i];
                    let (w, at) = [(wq, 0), (wk, qd), (wv, qd + kvd)][*which];
                    let out = &mut slot[at + r.start..at + r.end];
                    w.matmul_rows(&mut input, &h, 1, r.clone(), out, path)?;
                }
            }
            let wo = studio(&l.wo)?;
            t.wait_warming(&[mine(wo)])?;
            parts.gather(phase, &mut qkv, |th| {
                c.qkv.taken_by(th).map(|i| {
                    let (which, r) = &step.qkv_pieces[i];
                    let at = [0, qd, qd + kvd][*which];
                    at + r.start..at + r.end
                })
            });
            phase += 1;
            let (q, kv) = qkv.split_at_mut(qd);
            let (k, v) = kv.split_at_mut(kvd);
            l.prepare_qkv(
                [q, k, v],
                pos,
                layer_rope(&self.rope, gemma, l),
                self.interleaved_rope,
                self.eps,
                &mut head_norm,
            );
            let how = layer_scores(gemma, l, hd);

            // Attention over the cached positions and this one (still in `k`, `v`).
            {
                let cache = l.kv.read().unwrap_or_else(PoisonError::into_inner);
                let mut slot = parts.slot(me, phase);
                while let Some(head) = c.att.take(me) {
                    let kvh = head / groups;
                    let (kt, values) = cache.head(kvh, pos, hd);
                    let new = kvh * hd..(kvh + 1) * hd;
                    let r = head * hd..(head + 1) * hd;
                    attend(
                        &q[r.clone()],
                        kt,
                        pos,
                        values,
                        [&k[new.clone()], &v[new]],
                        how,
                        &mut scores,
                        &mut slot[r],
                    );
                }
            }
            t.wait_warming(&[mine(wo)])?;
            if me == 0 {
                // Every thread is past this layer's attention: its cache can take position `pos`.
                let mut cache = l.kv.write().unwrap_or_else(PoisonError::into_inner);
                for kh in 0..nkv {
                    let r = kh * hd..(kh + 1) * hd;
                    cache.put(kh, pos, hd, &k[r.clone()], &v[r]);
                }
            }
            parts.gather(phase, &mut att, |th| {
                c.att.taken_by(th).map(|head| head * hd..(head + 1) * hd)
            });
            phase += 1;
            input.clear();
            product(wo, &mut input, &att, 0, &c.wo, phase)?;
            let (gate, up) = (studio(&l.gate)?, studio(&l.up)?);
            t.wait_warming(&[mine(gate), mine(up)])?;
            parts.gather(phase, &mut h, |th| {
                c.wo.taken_by(th).map(|i| piece(wo.rows(), threads, i))
            });
            phase += 1;
            if let Some(n) = &l.post_attn_norm {
                post.copy_from_slice(&h);
                rms_norm(&post, &n.v, self.eps, &mut h);
            }
            x.iter_mut().zip(&h).for_each(|(x, h)| *x += h);

            // The MLP: gate and up for the same rows, so each piece applies SwiGLU to its own.
            rms_norm(&x, &l.ffn_norm.v, self.eps, &mut h);
            input.clear();
            let n_ff = gate.rows();
            {
                let mut slot = parts.slot(me, phase);
                while let Some(i) = c.ffn.take(me) {
                    let r = piece(n_ff, threads, i);
                    g.resize(r.len(), 0.0);
                    u.resize(r.len(), 0.0);
                    gate.matmul_rows(&mut input, &h, 1, r.clone(), &mut g, path)?;
                    up.matmul_rows(&mut input, &h, 1, r.clone(), &mut u, path)?;
                    if gemma.is_some() {
                        cpu_ops::geglu(&g, &u, &mut slot[r]);
                    } else {
                        cpu_ops::swiglu(&g, &u, &mut slot[r]);
                    }
                }
            }
            let down = studio(&l.down)?;
            t.wait_warming(&[mine(down)])?;
            inner.resize(n_ff, 0.0);
            parts.gather(phase, &mut inner, |th| {
                c.ffn.taken_by(th).map(|i| piece(n_ff, threads, i))
            });
            phase += 1;
            input.clear();
            product(down, &mut input, &inner, 0, &c.down, phase)?;
            // Every weight is Studio's on this path (`decode_ready`), so `studio` cannot fail.
            let next = match self.layers.get(l_index + 1) {
                Some(n) => [
                    mine(studio(&n.wq)?),
                    mine(studio(&n.wk)?),
                    mine(studio(&n.wv)?),
                ],
                None => [mine(studio(&self.output)?), &[], &[]],
            };
            t.wait_warming(&next)?;
            parts.gather(phase, &mut h, |th| {
                c.down.taken_by(th).map(|i| piece(down.rows(), threads, i))
            });
            phase += 1;
            if let Some(n) = &l.post_ffw_norm {
                post.copy_from_slice(&h);
                rms_norm(&post, &n.v, self.eps, &mut h);
            }
            x.iter_mut().zip(&h).for_each(|(x, h)| *x += h);
        }
        rms_norm(&x, &self.norm.v, self.eps, &mut h);
        let output = studio(&self.output)?;
        input.clear();
        product(output, &mut input, &h, 0, &step.output, phase)?;
        // No barrier for the logits: each thread copies out the pieces it computed.
        let slot = parts.slot(me, phase);
        let mut out = logits.lock().unwrap_or_else(PoisonError::into_inner);
        for i in step.output.taken_by(me) {
            let r = piece(output.rows(), threads, i);
            out[r.clone()].copy_from_slice(&slot[r]);
        }
        Ok(())
    }
}

/// Row alignment of the pieces of a decode product (a multiple of every kernel tile).
const ALIGN: usize = 16;

/// Rows of piece `i` of a product with `n` output rows cut into `pieces` contiguous pieces.
///
/// One piece per thread measured faster than many small ones taken on demand (each thread
/// then streams one contiguous run of weight rows, which the hardware prefetcher follows).
fn piece(n: usize, pieces: usize, i: usize) -> std::ops::Range<usize> {
    team::share(n, ALIGN, pieces, i)
}

/// The bytes of thread `me`'s own piece of `w` in a decode product.
fn own_piece(w: &QWeight, threads: usize, me: usize) -> &[u8] {
    w.rows_bytes(piece(w.rows(), threads, me))
}

/// Who computes which piece of one layer's phases in a decode step.
struct LayerClaims {
    qkv: Claims,
    att: Claims,
    wo: Claims,
    ffn: Claims,
    down: Claims,
}

/// The shared state of one decode step.
struct DecodeStep<'a> {
    parts: &'a Parts,
    layers: Vec<LayerClaims>,
    output: Claims,
    /// The q, k and v pieces: (0 = q, 1 = k, 2 = v; rows of that product).
    qkv_pieces: Vec<(usize, std::ops::Range<usize>)>,
}

fn shape_error(name: &str) -> Error {
    Error::BadQuantTensor {
        name: name.to_owned(),
        message: "the fused tensor does not split into its parts".to_owned(),
    }
}

/// A fused weight (Phi-3's `attn_qkv`, `ffn_up`) split into consecutive row blocks of `rows`
/// each, kept in the file format (every row's bytes are contiguous): Studio weights where this
/// CPU prefers Studio's kernel for the format, else candle `QMatMul`s over the same bytes
/// (recorded in `fb`).
fn split_rows(t: &TensorData, rows: &[usize], fb: &mut Fallbacks) -> Result<Vec<Linear>> {
    let name = &t.name;
    let Some((n, cols)) = t.rows_cols() else {
        return Err(Error::BadQuantTensor {
            name: name.clone(),
            message: format!("shape {:?} is not 2-D", t.dims),
        });
    };
    if rows.iter().sum::<usize>() != n {
        return Err(Error::BadQuantTensor {
            name: name.clone(),
            message: format!("{n} rows do not split into {rows:?}"),
        });
    }
    let rb = t.bytes.len() / n.max(1);
    let mut at = 0;
    rows.iter()
        .map(|&r| {
            let part = TensorData {
                name: name.clone(),
                ggml_type: t.ggml_type,
                dims: vec![r, cols],
                bytes: t.bytes[at * rb..(at + r) * rb].to_vec(),
            };
            at += r;
            fb.data(name, part)
        })
        .collect()
}
