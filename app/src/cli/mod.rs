//! The headless command line, on the same engine as the window (the inference crate's loader,
//! models and token loop). Its subcommands, flags and JSON lines are a contract: tests and
//! benchmark scripts depend on them.
//!
//! - `studio generate --model PATH --prompt TEXT [--max-tokens N] [--temperature T]
//!   [--top-k K] [--top-p P] [--seed S] [--json]` streams the raw continuation to stdout; with
//!   `--json`, one object per generated token `{"id": …, "text": …}` and a final
//!   `{"done": true, "prompt_tokens": …, "generated_tokens": …, "ttft_ms": …,
//!   "prefill_tok_s": …, "decode_tok_s": …}`.
//! - `studio chat --model PATH [--system TEXT] --message TEXT [--json]` (same sampling flags)
//!   applies the model's own chat template, stops at its end-of-turn token and prints the reply
//!   the same way.
//! - `studio bench generate --model PATH [--prompt-tokens N] [--gen-tokens N] [--threads N]
//!   [--repeat N] [--json]` prints median prefill and decode tokens/s, time to first token and
//!   peak RSS.
//! - `studio serve --model PATH [--host 127.0.0.1] [--port 8080] [--api-key KEY]
//!   [--allow-host NAME]... [--cors-origin ORIGIN] [--threads N] [--device D]` serves the model over an OpenAI-compatible HTTP API (see [`crate::serve`]) and prints
//!   `Studio is serving MODEL at http://HOST:PORT/v1` on stdout once it listens (`--port 0`
//!   picks a free port).
//!
//! - `studio txt2img`, `img2img`, `inpaint` and `bench sd`: see [`crate::cli::image`].
//! - `studio gan`, `gan-interp` and `bench gan` (StyleGAN2): see [`crate::cli::gan`].
//! - `studio complete`, `studio code` and `bench complete` (code assist): see
//!   [`crate::cli::code`].
//!
//! Every subcommand that takes `--model` runs the bundled demo model of its kind when it is
//! left out ([`crate::bundled`]), and says so on stderr.
//!
//! Errors go to stderr with a non-zero exit code.
//!
//! - `studio convert IN OUT.safetensors`: see [`convert`].
//!
//! Files: [`common`] (the engine and sampling flags, device parsing, streaming to stdout,
//! medians), [`text`] (`generate`, `chat`, `serve`, `bench generate`, `bench memory`),
//! [`image`], [`gan`], [`code`], and [`values`] (the flag value parsers and their bounds).

pub mod code;
pub mod common;
pub mod convert;
pub mod gan;
pub mod hub;
pub mod image;
pub mod text;
pub mod train;
pub mod values;

use anyhow::{Context, Result};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::bundled::BundledKind;

use text::{BenchGenerateArgs, BenchMemoryArgs, ChatArgs, EmbedArgs, GenerateArgs, ServeArgs};

/// Studio: local generative AI. With no subcommand, opens the window.
#[derive(Debug, Parser)]
#[command(name = "studio", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With `--model ORG/NAME[:FILE]`: download it into the Hugging Face cache first when it
    /// is not there.
    #[arg(long, global = true)]
    pub pull: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Continue a prompt with a language model (raw text, no chat template).
    Generate(GenerateArgs),
    /// Reply to a message with the model's own chat template.
    Chat(ChatArgs),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /v1/embeddings from --embedding-model or the chat model itself).
    Serve(ServeArgs),
    /// Embed texts with a sentence-embedding model (a sentence-transformers folder) or a chat
    /// model's hidden states: one JSON line per text.
    Embed(EmbedArgs),
    /// Make an image from a prompt with a Stable Diffusion model.
    Txt2img(image::ImageArgs),
    /// Make an image from a prompt and a starting image.
    Img2img(image::Img2ImgArgs),
    /// Repaint the white part of a mask.
    Inpaint(image::InpaintArgs),
    /// Upscale an image with an ESRGAN / Real-ESRGAN or SwinIR upscaler, in tiles.
    Upscale(image::UpscaleArgs),
    /// Render a StyleGAN2 image from a seed, a z or a w.
    Gan(gan::GanArgs),
    /// Render a StyleGAN2 animation through seeds (GIF or PNG sequence).
    GanInterp(gan::GanInterpArgs),
    /// Find the latent of a photo in a StyleGAN2 generator (NVIDIA's projector recipe).
    GanProject(gan::GanProjectArgs),
    /// Fill in the middle at a cursor in a source file with a code model's FIM format.
    Complete(code::CompleteArgs),
    /// Run a code action (explain, fix, doc, tests, translate:LANG, instruct) on a file or
    /// some of its lines; editing actions print a unified diff.
    Code(code::CodeArgs),
    /// Convert a PyTorch checkpoint (.ckpt, .pt, .pth, pytorch_model.bin) or an NVIDIA network
    /// pickle (.pkl) to safetensors, reading the pickle as data (nothing in it is run).
    Convert(convert::ConvertArgs),
    /// Download a model from the Hugging Face Hub into its cache (resumed, verified).
    Pull(hub::PullArgs),
    /// List the models in the Hugging Face cache.
    Models(hub::ModelsArgs),
    /// The demo models' training data and quality checks.
    #[command(subcommand)]
    Train(train::TrainCommand),
}

impl Command {
    /// The subcommand's `--model` and the kind of bundled model it falls back to (`None`: it
    /// has none, so `--model` is required), if it takes a model.
    fn model_arg(&mut self) -> Option<(&mut PathBuf, Option<BundledKind>)> {
        use BundledKind::{Gan, Image, Language};
        let (model, kind) = match self {
            Command::Generate(a) => (&mut a.engine.model, Language),
            Command::Chat(a) => (&mut a.engine.model, Language),
            Command::Bench(BenchCommand::Generate(a)) => (&mut a.engine.model, Language),
            Command::Serve(a) => (&mut a.engine.model, Language),
            Command::Complete(a) => (&mut a.engine.model, Language),
            Command::Code(a) => (&mut a.engine.model, Language),
            Command::Bench(BenchCommand::Complete(a)) => (&mut a.engine.model, Language),
            Command::Txt2img(a) => (&mut a.model, Image),
            Command::Img2img(a) => (&mut a.image.model, Image),
            Command::Inpaint(a) => (&mut a.image.model, Image),
            Command::Gan(a) => (&mut a.common.model, Gan),
            Command::GanInterp(a) => (&mut a.common.model, Gan),
            Command::GanProject(a) => (&mut a.common.model, Gan),
            Command::Upscale(a) => return Some((&mut a.model, None)),
            Command::Embed(a) => return Some((&mut a.model, None)),
            Command::Bench(
                BenchCommand::Sd(_) | BenchCommand::Gan(_) | BenchCommand::Memory(_),
            )
            | Command::Convert(_)
            | Command::Pull(_)
            | Command::Models(_)
            | Command::Train(_) => return None,
        };
        Some((model, Some(kind)))
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s, time to first token and peak RSS of a language model.
    Generate(BenchGenerateArgs),
    /// UNet step, VAE decode and preview times of an SD-1.5-shaped model (random weights).
    Sd(image::BenchSdArgs),
    /// Milliseconds per frame of StyleGAN2 config-F-shaped generators (random weights).
    Gan(gan::BenchGanArgs),
    /// Time to first token and prefill tokens/s of an inline completion with a long prefix.
    Complete(code::BenchCompleteArgs),
    /// Memory read bandwidth (GB/s): the bound on decode speed, which reads every weight
    /// byte once per token (a model of B bytes decodes at most GB/s × 10⁹ / B tokens/s).
    Memory(BenchMemoryArgs),
}

/// Runs a subcommand; `pull`: download a `--model ORG/NAME[:FILE]` missing from the cache.
pub fn run(mut command: Command, pull: bool) -> Result<()> {
    if let Some((model, kind)) = command.model_arg() {
        if let (true, Some(kind)) = (model.as_os_str().is_empty(), kind) {
            *model = crate::bundled::model(kind).with_context(|| {
                format!(
                    "--model is required: this installation has no bundled demo {}",
                    kind.label()
                )
            })?;
            eprintln!(
                "no --model: using the bundled demo {} ({})",
                kind.label(),
                model.display()
            );
        } else {
            hub::resolve_model(model, pull)?;
        }
    }
    match command {
        Command::Generate(args) => text::run_generate(&args),
        Command::Chat(args) => text::run_chat(&args),
        Command::Bench(BenchCommand::Generate(args)) => text::run_bench_generate(&args),
        Command::Bench(BenchCommand::Memory(args)) => text::run_bench_memory(&args),
        Command::Serve(args) => text::run_serve(&args),
        Command::Embed(args) => text::run_embed(&args),
        Command::Bench(BenchCommand::Sd(args)) => image::run_bench_sd(&args),
        Command::Bench(BenchCommand::Gan(args)) => gan::run_bench_gan(&args),
        Command::Gan(args) => gan::run_gan(&args),
        Command::GanInterp(args) => gan::run_gan_interp(&args),
        Command::GanProject(args) => gan::run_gan_project(&args),
        Command::Txt2img(args) => image::run_txt2img(&args),
        Command::Img2img(args) => image::run_img2img(&args),
        Command::Inpaint(args) => image::run_inpaint(&args),
        Command::Upscale(args) => image::run_upscale(&args),
        Command::Complete(args) => code::run_complete(&args),
        Command::Code(args) => code::run_code(&args),
        Command::Convert(args) => convert::run_convert(&args),
        Command::Bench(BenchCommand::Complete(args)) => code::run_bench_complete(&args),
        Command::Pull(args) => hub::run_pull(&args),
        Command::Models(args) => hub::run_models(&args),
        Command::Train(command) => train::run_train(&command),
    }
}
