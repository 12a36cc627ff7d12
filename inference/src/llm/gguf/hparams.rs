//! Each family's hyperparameters read from the metadata (normalized, with llama.cpp's
//! defaults) and the shapes of its tensors checked against them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_transformers::models::quantized_llama;

use super::reader::{Meta, RawTensor};
use crate::error::{Error, Result};
use crate::models::family::{self, Family};
use crate::models::quant_gemma::{GemmaConfig, GemmaParams};

/// Largest width, head count, layer count or head size believed (real models are far below;
/// a corrupt value must not overflow shape arithmetic).
pub(super) const MAX_DIM: usize = 1 << 24;

/// Context beyond which candle's precomputed rope tables (Qwen2, Qwen3) get too large.
pub(super) const MAX_ROPE_TABLE: usize = 1 << 18;

/// Said of Llama 3.1+ files on candle's quantized Llama (GPUs, F32 files); Studio's own model
/// applies the factors, and the warning is dropped when it runs the file.
pub(super) const LLAMA_ROPE_FREQS_WARNING: &str = "this Llama 3.1+ file's rope frequency factors \
     (`rope_freqs.weight`) are not applied by candle's quantized Llama; output can drift from \
     llama.cpp's, most on long prompts";

/// KV cache memory candle's quantized Phi-3 may allocate up front.
pub(super) const PHI3_MAX_KV_BYTES: usize = 4 << 30;

/// The hyperparameters read (and checked) from the metadata.
#[derive(Debug, Clone)]
pub(super) struct Hparams {
    pub(super) family: Family,
    pub(super) arch: String,
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) n_layer: usize,
    pub(super) hidden: usize,
    pub(super) head_dim: usize,
    pub(super) ff: usize,
    pub(super) vocab: usize,
    pub(super) eps: f64,
    pub(super) rope_base: f64,
    pub(super) trained_context: usize,
    pub(super) context: usize,
    pub(super) tied_output: bool,
    pub(super) gemma: Option<GemmaParams>,
    /// Warnings (also in the file's warnings) that hold only where candle's model runs the
    /// file; dropped when Studio's CPU model runs it.
    pub(super) candle_warnings: Vec<String>,
    /// Why candle's model cannot run the file (Studio's CPU model can).
    pub(super) candle_refusal: Option<String>,
    /// How the file says its hidden states pool into an embedding (`{arch}.pooling_type`):
    /// `None` when it says nothing (or "none"); an error for a kind embeddings can't use.
    pub(super) pooling: std::result::Result<Option<crate::embed::Pooling>, String>,
}

pub(super) struct Checker<'a> {
    pub(super) path: &'a Path,
    pub(super) tensors: HashMap<&'a str, &'a RawTensor>,
}

impl Checker<'_> {
    pub(super) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.dims.as_slice())
    }

    pub(super) fn expect(&self, name: &str, expected: &[usize]) -> Result<()> {
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
pub(super) fn hparams(
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
    let unsupported =
        |what: String| Error::UnsupportedArchitecture(what, family::supported_gguf().to_owned());
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
    // llama.cpp's enum llama_pooling_type.
    let pooling = match meta.usize(&key("pooling_type"))? {
        None | Some(0) => Ok(None),
        Some(1) => Ok(Some(crate::embed::Pooling::Mean)),
        Some(2) => Ok(Some(crate::embed::Pooling::Cls)),
        Some(3) => Ok(Some(crate::embed::Pooling::LastToken)),
        Some(4) => Err(format!(
            "{} is a reranker ({arch}.pooling_type 4, rank): it scores query and document \
             pairs and gives no embeddings",
            path.display()
        )),
        Some(n) => Err(format!(
            "{} has an unknown {arch}.pooling_type {n}",
            path.display()
        )),
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
        pooling,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gemma_params(
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

impl Hparams {
    /// What Studio's quantized Gemma takes of them (`None` for other families).
    pub(super) fn gemma_config(&self) -> Option<GemmaConfig<'_>> {
        Some(GemmaConfig {
            arch: &self.arch,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            n_layer: self.n_layer,
            hidden: self.hidden,
            head_dim: self.head_dim,
            eps: self.eps,
            rope_base: self.rope_base,
            context: self.context,
            tied_output: self.tied_output,
            gemma: self.gemma.as_ref()?,
        })
    }
}
