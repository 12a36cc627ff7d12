//! `studio`: with no arguments opens the window; with a subcommand runs headless.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = studio_app::cli::Cli::parse();
    // A forced kernel path this CPU lacks is refused before anything runs (never SIGILL).
    if let Err(e) = studio_inference::quant::KernelPath::from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => studio_app::gui::run(),
        Some(command) => studio_app::cli::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
