//! Everything a language model needs around its forward pass (the forward passes themselves
//! live in [`crate::models`]):
//! - [`loader`]: finding a model's files, refusing pickles, detecting the family, loading;
//! - [`gguf`], [`gguf_tokenizer`]: llama.cpp GGUF files (header, tensors, quantized models)
//!   and the tokenizer rebuilt from their metadata;
//! - [`hf_cache`]: models already in the Hugging Face cache;
//! - [`text`]: tokenizer, UTF-8-safe token streaming, stop strings;
//! - [`sampling`]: temperature, top-k, top-p, min-p, repeat penalty, seed;
//! - [`generate`]: the shared token loop with timing;
//! - [`chat`]: chat turns to prompts and context fitting;
//! - [`template`]: the model's own Jinja chat template (`template_bounds`, private: the size
//!   bounds every value a template computes is checked against);
//! - [`remote`]: an OpenAI-compatible server as the chat model.

pub mod chat;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod grammar;
pub mod hf_cache;
pub mod loader;
pub mod logprobs;
pub mod remote;
pub mod sampling;
pub mod template;
mod template_bounds;
pub mod text;
pub mod tools;
