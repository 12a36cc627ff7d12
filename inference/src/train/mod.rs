//! Training Studio's own demo models (issue 21, in progress): the data they learn from, made
//! on the spot, and the checkers that grade what they make.
//!
//! - [`corpus`]: the demo language model's text (Python's standard library as code,
//!   docstring → function and chat examples, held-out lines to fill in) and its tokenizer;
//! - [`lm`]: the trainer of the demo language model, a tiny Llama in transformers' layout,
//!   with checkpoints, resume and a seed;
//! - [`gan`]: the trainer of the demo GAN, a tiny StyleGAN2 saved in NVIDIA's `G_ema` names;
//! - [`faces`]: cartoon faces with known factors for the demo GAN, and the reader that grades
//!   generated faces;
//! - [`ops`]: the differentiable building blocks the trainers share;
//! - [`sd`]: the demo text-to-image model's trainer, in progress (its text encoder so far);
//! - [`shapes`]: captioned shape scenes for the demo text-to-image model, and the
//!   deterministic checker of prompt adherence.

pub mod corpus;
pub mod faces;
pub mod gan;
pub mod lm;
pub mod ops;
pub mod sd;
pub mod shapes;
