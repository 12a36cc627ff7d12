//! # studio-inference
//!
//! Everything in Studio that touches tensors: model families, tokenizers and streaming text,
//! sampling, the generation loop, and the inference worker thread that owns the device and the
//! loaded model. This crate has no UI dependency; the application talks to it only through the
//! [`worker`] job/event protocol and a repaint callback.
//!
//! Layout:
//! - [`models`]: one file per model family (config, loader with real checkpoint names, forward
//!   with KV cache) behind the [`models::CausalLm`] trait;
//! - [`loader`]: finding a model's files, refusing pickles, detecting the architecture;
//! - [`weights`]: memory-mapped safetensors with errors that name the tensor;
//! - [`text`]: tokenizer, UTF-8-safe token streaming, stop strings;
//! - [`sampling`]: temperature, top-k, top-p, min-p, repeat penalty, seed;
//! - [`generate`]: the shared token loop with timing;
//! - [`chat`]: chat turns to prompts and context fitting;
//! - [`template`]: the model's own Jinja chat template;
//! - [`worker`]: the worker thread and its protocol;
//! - [`gan`]: StyleGAN2 generators from NVIDIA's `G_ema` tensors, numpy-compatible seeds;
//! - [`image_meta`]: the `parameters` text SD tools write into PNGs;
//! - [`device`], [`hf_cache`], [`sys`]: device choice, the Hugging Face cache, process facts.

pub mod chat;
pub mod code;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod gan;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf_cache;
pub mod image_meta;
pub mod loader;
pub mod models;
pub mod nn;
pub mod quant;
pub mod remote;
pub mod sampling;
pub mod sys;
pub mod template;
mod template_bounds;
pub mod text;
pub mod weights;
pub mod worker;

pub use candle_core;

/// The message of a caught panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
pub use error::{Error, Result};
