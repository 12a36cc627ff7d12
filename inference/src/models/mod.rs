//! Model families. Each family is one file: its `Config` (the checkpoint's own `config.json`),
//! its loader (tensor names as real checkpoints use them) and its forward pass with a KV cache.

pub(crate) mod cpu_ops;
pub mod family;
pub mod gpt2;
pub mod hf;
pub mod hf_config;
pub(crate) mod qlinear;
pub mod quant_gemma;
pub mod quant_llama;
pub mod tensors;

pub use family::Family;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A decoder-only language model with a KV cache.
///
/// The sampling loop lives outside the model ([`crate::llm::generate`]), so every family shares it.
pub trait CausalLm: Send {
    /// Runs `tokens` at positions `offset..` (appending to the KV cache) and returns the
    /// logits of the last position, shape `[vocab]`, f32.
    fn forward_last(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor>;

    /// Like [`CausalLm::forward_last`] but returns the logits of every position, `[T, vocab]`
    /// (for parity tests; families that only compute the last position say so).
    fn forward_all(&mut self, tokens: &[u32], offset: usize) -> Result<Tensor> {
        let _ = (tokens, offset);
        Err(Error::InvalidParameter(
            "this model family only computes the last position's logits".to_owned(),
        ))
    }

    /// Forgets every cached key and value (the next call must start at offset 0).
    fn clear_kv_cache(&mut self);

    /// Keeps only the first `len` positions of the KV cache, so the next call continues at
    /// offset `len`. Returns `false` (and changes nothing) when the family cannot.
    fn truncate_kv_cache(&mut self, len: usize) -> bool {
        let _ = len;
        false
    }

    /// The tokens whose keys and values the cache holds, for families that can truncate it
    /// (empty otherwise).
    fn cached_tokens(&self) -> &[u32] {
        &[]
    }

    /// The longest sequence (prompt plus generated tokens) the model will attend over: the
    /// trained maximum unless lowered with [`CausalLm::set_context_length`].
    fn context_length(&self) -> usize;

    /// Limits the context (users lower it to save memory); clamped to the trained maximum.
    /// Returns the length now in effect.
    fn set_context_length(&mut self, tokens: usize) -> usize;

    /// Size of the vocabulary: the length of the logits a forward pass returns.
    fn vocab_size(&self) -> usize;

    /// How this model's hidden states pool into an embedding: what its file says (a GGUF's
    /// `pooling_type`: last-token for Qwen3-Embedding, mean for most), else the mean, as
    /// llama.cpp's server pools a model that says nothing.
    fn embedding_pooling(&self) -> Result<crate::embed::Pooling> {
        Ok(crate::embed::Pooling::Mean)
    }

    /// The final hidden states of `tokens` from position 0 (after the last norm, before the
    /// output projection), `(tokens, hidden)`, for embeddings; the KV cache is left empty.
    /// Models that can't give them say so.
    fn hidden_states(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let _ = tokens;
        Err(Error::InvalidParameter(
            "this model can't give its hidden states for embeddings (Qwen2 and Qwen3 folders \
             can, and GGUF Llama, Qwen, Phi and Gemma models on Studio's CPU kernels; or serve \
             a sentence-transformers model with --embedding-model)"
                .into(),
        ))
    }
}
