//! Stable Diffusion: model loading (diffusers folders and single-file checkpoints), samplers,
//! live previews and the generation pipeline behind the Canvas.
//!
//! - [`samplers`]: noise schedules and the samplers users ask for by name, in k-diffusion form;
//! - [`preview`]: cheap latent→RGB projections and the TAESD tiny decoder;
//! - [`imaging`]: image ↔ tensor conversion, decoding dropped files, masks;
//! - [`convert`]: original (LDM) checkpoint names → diffusers names, on load.

pub mod convert;
pub mod imaging;
pub mod preview;
pub mod samplers;
