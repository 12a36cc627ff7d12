//! Stable Diffusion: model loading (diffusers folders and single-file checkpoints), samplers,
//! live previews and the generation pipeline behind the Canvas.
//!
//! - [`samplers`]: noise schedules and the samplers users ask for by name, in k-diffusion form;
//! - [`preview`]: cheap latent→RGB projections and the TAESD tiny decoder;
//! - [`imaging`]: image ↔ tensor conversion, decoding dropped files, masks;
//! - [`convert`]: original (LDM) checkpoint names → diffusers names, on load;
//! - [`clip`], [`unet`], [`vae`]: the networks, with diffusers/transformers tensor names;
//! - [`unet_blocks`]: the UNet's resnet, transformer, down/mid/up blocks, as diffusers computes them;
//! - [`vae_blocks`]: the VAE's resnet, attention and banded 3×3 convolution, in bounded memory;
//! - [`prompt`]: emphasis syntax, long prompts, CLIP's tokenizer;
//! - [`model`]: finding, detecting and loading a model (diffusers folder or single file);
//! - [`pipeline`]: txt2img, img2img, inpainting with per-step previews.

pub mod annotators;
pub mod bench;
pub mod clip;
pub mod controlnet;
pub mod convert;
pub mod embeddings;
pub mod hires;
pub mod imaging;
pub mod inpaint;
pub mod lora;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod samplers;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vae_blocks;
