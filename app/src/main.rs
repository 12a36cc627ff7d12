//! `studio`: with no arguments opens the window; with a subcommand runs headless.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    studio_inference::sys::tune_allocator();
    let cli = studio_app::cli::Cli::parse();
    // candle re-reads /proc/cpuinfo for its default thread count on every matmul unless
    // `RAYON_NUM_THREADS` is set (a tenth of a StyleGAN2 frame went to the kernel formatting
    // cpuinfo): settle the default once, before any thread exists. `--threads` overrides it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        studio_app::set_cpu_threads(studio_inference::device::cpu_threads());
    }
    // A forced kernel path this CPU lacks is refused before anything runs (never SIGILL).
    if let Err(e) = studio_inference::quant::KernelPath::from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => studio_app::gui::run(),
        Some(command) => studio_app::cli::run(command, cli.pull),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
