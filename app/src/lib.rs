//! # studio-app
//!
//! Studio's desktop application (egui/eframe) and its headless command line, both on the same
//! engine: the [`studio_inference`] worker. This crate never touches tensors.
//!
//! - [`cli`]: the headless command line, `studio generate`, `studio txt2img`,
//!   `studio complete`, `studio bench …` (the contract scripts rely on), one file per family
//!   of subcommands and their shared flags in `cli/common.rs`;
//! - [`serve`]: the OpenAI-compatible HTTP server (`studio serve` and the Chat panel's);
//! - [`gui`]: the window, its panels and the status bar;
//! - [`home`]: where user work is saved, atomically;
//! - [`bundled`]: the demo models shipped in `assets/models/`, used when no other model is
//!   configured;
//! - [`files`]: the `studio-files` thread that encodes and writes images off the UI thread.

pub mod bundled;
pub mod cli;
pub mod files;
pub mod gui;
pub mod home;
pub mod serve;

/// Sets how many CPU threads the inference engine uses (`RAYON_NUM_THREADS`, read by candle and
/// rayon when they start). Call it at startup, before any other thread exists.
#[allow(unsafe_code)]
pub fn set_cpu_threads(threads: usize) {
    // SAFETY: `set_var` is only unsound while another thread reads the environment; this runs
    // at startup (from `main`, before the window, the worker or any pool is created).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
}
