//! # studio-app
//!
//! Studio's desktop application (egui/eframe) and its headless command line, both on the same
//! engine: the [`studio_inference`] worker. This crate never touches tensors.
//!
//! - [`cli`], [`cli_image`], [`cli_gan`], [`cli_code`]: `studio generate`, `studio txt2img`,
//!   `studio complete`, `studio bench …` (the contract scripts rely on);
//! - [`gui`]: the window, its panels and the status bar;
//! - [`home`]: where user work is saved, atomically;
//! - [`files`]: the `studio-files` thread that encodes and writes images off the UI thread.

pub mod cli;
pub mod cli_code;
pub mod cli_gan;
pub mod cli_image;
pub mod cli_values;
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
