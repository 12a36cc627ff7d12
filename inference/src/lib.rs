//! # studio-inference
//!
//! Everything in Studio that touches tensors: model families, tokenizers and streaming text,
//! sampling, the generation loop, and the inference worker thread that owns the device and the
//! loaded model. This crate has no UI dependency; the application talks to it only through the
//! [`worker`] job/event protocol and a repaint callback.
//!
//! Layout (every module):
//! - [`llm`]: everything a language model needs around its forward pass: finding and loading
//!   files (safetensors, GGUF, the Hugging Face cache), tokenizers and streaming text, chat
//!   prompts and templates, sampling, the generation loop, and remote OpenAI-compatible models;
//! - [`models`]: one file per model family (config, loader with real checkpoint names, forward
//!   with KV cache) behind the [`models::CausalLm`] trait, and the CPU math between products;
//! - [`weights`]: memory-mapped safetensors with errors that name the tensor;
//! - [`quant`]: Studio's quantized matmul kernels (AVX-512, AVX2, scalar) and `KernelPath`;
//! - [`nn`]: Studio's CPU kernels for the convolutional networks (convolution, Winograd,
//!   attention, GroupNorm) on the same paths;
//! - [`code`]: Code Assist's fill-in-the-middle prompts, actions and diffs;
//! - [`diffusion`]: Stable Diffusion (UNet, VAE, CLIP, TAESD, schedulers, pipelines);
//! - [`gan`]: StyleGAN2 and DCGAN generators, numpy-compatible seeds, projection;
//! - [`train`]: the demo models' data and checkers (captioned shape scenes);
//! - [`hub`]: the Hugging Face Hub: repository info, search, verified resumable downloads
//!   into the standard cache;
//! - [`worker`]: the worker thread and its protocol;
//! - [`pickle`]: PyTorch checkpoints (pickles) read as data by Studio's own reader, never run;
//! - [`image_meta`]: the `parameters` text SD tools write into PNGs;
//! - [`device`], [`sys`]: device choice, process facts;
//! - [`error`]: the crate's error type.

#![warn(missing_docs)]

pub mod code;
pub mod device;
pub mod diffusion;
pub mod embed;
pub mod error;
pub mod gan;
pub mod hub;
pub mod image_meta;
pub mod llm;
pub mod models;
pub mod nn;
pub mod pickle;
pub mod quant;
pub mod sys;
pub mod train;
pub mod upscale;
pub mod weights;
pub mod worker;

/// The message of a caught panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
pub use error::{Error, Result};
