//! # studio-inference
//!
//! Everything in Studio that touches tensors: model families, tokenizers and streaming text,
//! sampling, the generation loop, and the inference worker thread that owns the device and the
//! loaded model. This crate has no UI dependency; the application talks to it only through the
//! [`worker`] job/event protocol and a repaint callback.
//!
//! Layout (every module):
//! - [`models`]: one file per model family (config, loader with real checkpoint names, forward
//!   with KV cache) behind the [`models::CausalLm`] trait, and the CPU math between products;
//! - [`loader`]: finding a model's files, refusing pickles, detecting the architecture;
//! - [`weights`]: memory-mapped safetensors with errors that name the tensor;
//! - [`gguf`], [`gguf_tokenizer`]: llama.cpp GGUF files (header, tensors, quantized models)
//!   and the tokenizer rebuilt from their metadata;
//! - [`quant`]: Studio's quantized matmul kernels (AVX-512, AVX2, scalar) and `KernelPath`;
//! - [`nn`]: Studio's CPU kernels for the convolutional networks (convolution, Winograd,
//!   attention, GroupNorm) on the same paths;
//! - [`text`]: tokenizer, UTF-8-safe token streaming, stop strings;
//! - [`sampling`]: temperature, top-k, top-p, min-p, repeat penalty, seed;
//! - [`generate`]: the shared token loop with timing;
//! - [`chat`]: chat turns to prompts and context fitting;
//! - [`template`]: the model's own Jinja chat template (`template_bounds`, private: the size
//!   bounds every value a template computes is checked against);
//! - [`code`]: Code Assist's fill-in-the-middle prompts, actions and diffs;
//! - [`remote`]: an OpenAI-compatible server as the chat model;
//! - [`diffusion`]: Stable Diffusion (UNet, VAE, CLIP, TAESD, schedulers, pipelines);
//! - [`gan`]: StyleGAN2 and DCGAN generators, numpy-compatible seeds, projection;
//! - [`worker`]: the worker thread and its protocol;
//! - [`image_meta`]: the `parameters` text SD tools write into PNGs;
//! - [`device`], [`hf_cache`], [`sys`]: device choice, the Hugging Face cache, process facts;
//! - [`error`]: the crate's error type.

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
