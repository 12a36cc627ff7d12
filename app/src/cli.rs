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
//! - `studio txt2img`, `img2img`, `inpaint` and `bench sd`: see [`crate::cli_image`].
//! - `studio gan`, `gan-interp` and `bench gan` (StyleGAN2): see [`crate::cli_gan`].
//! - `studio complete`, `studio code` and `bench complete` (code assist): see
//!   [`crate::cli_code`].
//!
//! Errors go to stderr with a non-zero exit code.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use studio_inference::chat::ChatMessage;
use studio_inference::device::{DevicePreference, create_device};
use studio_inference::generate::{GenerationStats, Step, generate};
use studio_inference::loader::{self, LoadedModel};
use studio_inference::sampling::SamplingParams;

/// Studio: local generative AI. With no subcommand, opens the window.
#[derive(Debug, Parser)]
#[command(name = "studio", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// /v1/models).
    Serve(ServeArgs),
    /// Make an image from a prompt with a Stable Diffusion model.
    Txt2img(crate::cli_image::ImageArgs),
    /// Make an image from a prompt and a starting image.
    Img2img(crate::cli_image::Img2ImgArgs),
    /// Repaint the white part of a mask.
    Inpaint(crate::cli_image::InpaintArgs),
    /// Render a StyleGAN2 image from a seed, a z or a w.
    Gan(crate::cli_gan::GanArgs),
    /// Render a StyleGAN2 animation through seeds (GIF or PNG sequence).
    GanInterp(crate::cli_gan::GanInterpArgs),
    /// Find the latent of a photo in a StyleGAN2 generator (NVIDIA's projector recipe).
    GanProject(crate::cli_gan::GanProjectArgs),
    /// Fill in the middle at a cursor in a source file with a code model's FIM format.
    Complete(crate::cli_code::CompleteArgs),
    /// Run a code action (explain, fix, doc, tests, translate:LANG, instruct) on a file or
    /// some of its lines; editing actions print a unified diff.
    Code(crate::cli_code::CodeArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s, time to first token and peak RSS of a language model.
    Generate(BenchGenerateArgs),
    /// UNet step, VAE decode and preview times of an SD-1.5-shaped model (random weights).
    Sd(crate::cli_image::BenchSdArgs),
    /// Milliseconds per frame of StyleGAN2 config-F-shaped generators (random weights).
    Gan(crate::cli_gan::BenchGanArgs),
    /// Time to first token and prefill tokens/s of an inline completion with a long prefix.
    Complete(crate::cli_code::BenchCompleteArgs),
    /// Memory read bandwidth (GB/s): the bound on decode speed, which reads every weight
    /// byte once per token (a model of B bytes decodes at most GB/s × 10⁹ / B tokens/s).
    Memory(BenchMemoryArgs),
}

#[derive(Debug, Args)]
pub struct BenchMemoryArgs {
    /// Reading threads (default: physical cores).
    #[arg(long, value_parser = crate::cli_values::threads)]
    pub threads: Option<usize>,
    /// MiB read per round, split between the threads.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli_values::mib)]
    pub mib: usize,
    /// Rounds to take the median of.
    #[arg(long, default_value_t = 5, value_parser = crate::cli_values::rounds)]
    pub repeat: usize,
    /// One JSON object with the figures.
    #[arg(long)]
    pub json: bool,
}

/// Options shared by every subcommand that runs a model.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Model folder (Hugging Face layout) or weights file.
    #[arg(long)]
    pub model: PathBuf,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli_values::threads)]
    pub threads: Option<usize>,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128, value_parser = crate::cli_values::tokens)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// 1 disables.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// 1 disables.
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// One JSON object per generated token, then a summary object.
    #[arg(long)]
    pub json: bool,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            max_new_tokens: self.max_tokens,
            stop: self.stop.clone(),
        };
        params.validate()?;
        Ok(params)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// The user's message.
    #[arg(long)]
    pub message: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value_t = 128, value_parser = crate::cli_values::tokens)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64, value_parser = crate::cli_values::tokens)]
    pub gen_tokens: usize,
    /// Runs to take the median of.
    #[arg(long, default_value_t = 5, value_parser = crate::cli_values::rounds)]
    pub repeat: usize,
    /// One JSON object with the figures.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on. The default, loopback, lets only this machine connect.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed at startup).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request (default: $STUDIO_API_KEY, if set).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Accept this name in the `Host` header besides the bound address and localhost
    /// (repeatable); other names are refused, which stops DNS rebinding.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// Let web pages from this origin (e.g. `https://app.example`) call the API, with CORS
    /// headers; requests from other pages are refused.
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
}

/// Runs a subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Generate(args) => run_generate(&args),
        Command::Chat(args) => run_chat(&args),
        Command::Bench(BenchCommand::Generate(args)) => run_bench_generate(&args),
        Command::Bench(BenchCommand::Memory(args)) => run_bench_memory(&args),
        Command::Serve(args) => run_serve(&args),
        Command::Bench(BenchCommand::Sd(args)) => crate::cli_image::run_bench_sd(&args),
        Command::Bench(BenchCommand::Gan(args)) => crate::cli_gan::run_bench_gan(&args),
        Command::Gan(args) => crate::cli_gan::run_gan(&args),
        Command::GanInterp(args) => crate::cli_gan::run_gan_interp(&args),
        Command::GanProject(args) => crate::cli_gan::run_gan_project(&args),
        Command::Txt2img(args) => crate::cli_image::run_txt2img(&args),
        Command::Img2img(args) => crate::cli_image::run_img2img(&args),
        Command::Inpaint(args) => crate::cli_image::run_inpaint(&args),
        Command::Complete(args) => crate::cli_code::run_complete(&args),
        Command::Code(args) => crate::cli_code::run_code(&args),
        Command::Bench(BenchCommand::Complete(args)) => crate::cli_code::run_bench_complete(&args),
    }
}

pub(crate) fn parse_device(s: &str) -> Result<DevicePreference> {
    let (kind, index) = s.split_once(':').unwrap_or((s, "0"));
    let index: usize = index
        .parse()
        .with_context(|| format!("device index in `{s}`"))?;
    Ok(match kind {
        "auto" => DevicePreference::Auto,
        "cpu" => DevicePreference::Cpu,
        "cuda" => DevicePreference::Cuda(index),
        "metal" => DevicePreference::Metal(index),
        _ => bail!("unknown device `{s}` (use auto, cpu, cuda[:N] or metal[:N])"),
    })
}

pub(crate) fn load_model(engine: &EngineArgs) -> Result<(LoadedModel, String)> {
    if let Some(n) = engine.threads {
        crate::set_cpu_threads(n);
    }
    let choice = create_device(parse_device(&engine.device)?);
    if let Some(w) = &choice.warning {
        eprintln!("warning: {w}");
    }
    let model = loader::load(&engine.model, &choice.device, &mut |_, _| {})
        .with_context(|| format!("loading {}", engine.model.display()))?;
    Ok((model, choice.label))
}

fn run_generate(args: &GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    if args.prompt.is_empty() {
        bail!(studio_inference::Error::EmptyPrompt);
    }
    let (mut m, _) = load_model(&args.engine)?;
    let prompt = m.tokenizer.encode(&args.prompt)?;
    stream(&mut m, &prompt, &params, &[], args.sampling.json)
}

fn run_chat(args: &ChatArgs) -> Result<()> {
    let mut params = args.sampling.params()?;
    let (mut m, _) = load_model(&args.engine)?;
    let system = args.system.as_deref().unwrap_or("");
    let messages = [ChatMessage::user(args.message.as_str())];
    let prompt = m.chat_prompt(system, &messages, params.max_new_tokens)?;
    if let Some(notice) = &prompt.notice {
        eprintln!("note: {notice}");
    }
    params.stop.extend(prompt.stop);
    stream(
        &mut m,
        &prompt.fitted.tokens,
        &params,
        &prompt.end_of_turn,
        args.sampling.json,
    )
}

/// Generates from `prompt` and prints as it goes: raw text, or JSON lines.
pub(crate) fn stream(
    m: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    extra_eos: &[u32],
    json: bool,
) -> Result<()> {
    let eos: Vec<u32> = m.eos_token_ids.iter().chain(extra_eos).copied().collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // In JSON mode each line is one generated token; text released only at the end (a
    // character completed by no further token) is added to the last token's line, so the
    // output stays one object per token.
    let mut held: Option<(u32, String)> = None;
    let mut write_err: Option<std::io::Error> = None;
    let mut on_step = |step: Step<'_>| -> ControlFlow<()> {
        let result = if json {
            match (step.id, held.as_mut()) {
                (None, Some((_, text))) => {
                    text.push_str(step.text);
                    Ok(())
                }
                (None, None) => Ok(()),
                (Some(id), _) => {
                    let previous = held.replace((id, step.text.to_owned()));
                    previous.map_or(Ok(()), |(id, text)| {
                        writeln!(out, "{}", json!({"id": id, "text": text}))
                    })
                }
            }
        } else {
            write!(out, "{}", step.text).and_then(|()| out.flush())
        };
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                // A closed pipe (`| head`) ends generation quietly.
                write_err = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let stats = generate(
        &mut *m.model,
        &m.tokenizer,
        &eos,
        prompt,
        params,
        &mut on_step,
    )?;
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e).context("writing to stdout");
    }
    if json {
        if let Some((id, text)) = held {
            writeln!(out, "{}", json!({"id": id, "text": text}))?;
        }
        writeln!(out, "{}", summary_json(&stats))?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

pub(crate) fn summary_json(s: &GenerationStats) -> serde_json::Value {
    json!({
        "done": true,
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "ttft_ms": s.ttft_ms,
        "prefill_tok_s": s.prefill_tok_s,
        "decode_tok_s": s.decode_tok_s,
    })
}

fn run_serve(args: &ServeArgs) -> Result<()> {
    let (m, device) = load_model(&args.engine)?;
    let name = m.info.name.clone();
    let api_key = match args.api_key.clone() {
        Some(key) => Some(key),
        None => std::env::var("STUDIO_API_KEY").ok(),
    };
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("the API key is empty; give a key or leave --api-key and STUDIO_API_KEY unset");
    }
    let options = crate::serve::ServeOptions {
        host: args.host.clone(),
        port: args.port,
        api_key,
        allow_hosts: args.allow_host.clone(),
        cors_origin: args.cors_origin.clone(),
        ..crate::serve::ServeOptions::default()
    };
    let server = crate::serve::Server::start(crate::serve::ServedModel::owned(m), &options)?;
    if !server.addr().ip().is_loopback() && options.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without an API key: anyone who can reach this machine \
             can use the model (give --api-key)",
            server.addr()
        );
    }
    eprintln!("model {name} on {device}");
    let mut out = std::io::stdout().lock();
    writeln!(out, "Studio is serving {name} at {}", server.base_url())?;
    out.flush()?;
    drop(out);
    server.wait();
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn run_bench_memory(args: &BenchMemoryArgs) -> Result<()> {
    if args.mib == 0 || args.repeat == 0 {
        bail!("--mib and --repeat must be at least 1");
    }
    let threads = args
        .threads
        .unwrap_or_else(studio_inference::device::cpu_threads);
    let rounds = studio_inference::sys::read_bandwidth_gb_s(threads, args.mib << 20, args.repeat)
        .context("starting the reading threads")?;
    let (min, max) = rounds
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &g| (lo.min(g), hi.max(g)));
    let gb_s = median(rounds);
    if args.json {
        println!(
            "{}",
            json!({
                "threads": threads,
                "mib": args.mib,
                "repeat": args.repeat,
                "read_gb_s": gb_s,
                "min_gb_s": min,
                "max_gb_s": max,
            })
        );
    } else {
        println!(
            "read {gb_s:.1} GB/s with {threads} threads (median of {} rounds of {} MiB; {min:.1}–{max:.1})",
            args.repeat, args.mib
        );
    }
    Ok(())
}

fn run_bench_generate(args: &BenchGenerateArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeat == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeat must be at least 1");
    }
    let (mut m, device) = load_model(&args.engine)?;
    let context = m.model.context_length();
    if args.prompt_tokens + args.gen_tokens > context {
        bail!(
            "--prompt-tokens + --gen-tokens ({}) exceeds the model's context ({context})",
            args.prompt_tokens + args.gen_tokens
        );
    }
    // A fixed pseudo-random prompt over the vocabulary: the same work every run.
    let vocab = m.model.vocab_size().min(m.tokenizer.vocab_size()).max(1) as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect();
    let params = SamplingParams::greedy(args.gen_tokens);
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up run (page faults of the mapped weights, allocator), then the measured runs.
    for run in 0..=args.repeat {
        // No end-of-text ids: every run generates exactly `gen_tokens` tokens.
        let stats = generate(
            &mut *m.model,
            &m.tokenizer,
            &[],
            &prompt,
            &params,
            &mut |_| ControlFlow::Continue(()),
        )?;
        if run > 0 {
            prefill.push(stats.prefill_tok_s);
            decode.push(stats.decode_tok_s);
            ttft.push(stats.ttft_ms);
        }
    }
    let peak = studio_inference::sys::peak_rss_mb().unwrap_or(0.0);
    let threads = studio_inference::device::cpu_threads();
    let (prefill, decode, ttft) = (median(prefill), median(decode), median(ttft));
    if args.json {
        println!(
            "{}",
            json!({
                "model": m.info.name,
                "device": device,
                "threads": threads,
                "prompt_tokens": args.prompt_tokens,
                "gen_tokens": args.gen_tokens,
                "repeat": args.repeat,
                "prefill_tok_s": prefill,
                "decode_tok_s": decode,
                "ttft_ms": ttft,
                "peak_rss_mb": peak,
                "cpu_path": studio_inference::quant::KernelPath::detect().to_string(),
            })
        );
    } else {
        println!(
            "model {} on {device}, {} prompt + {} generated tokens, median of {} runs",
            m.info.name, args.prompt_tokens, args.gen_tokens, args.repeat
        );
        println!("prefill      {prefill:10.1} tok/s");
        println!("decode       {decode:10.1} tok/s");
        println!("first token  {ttft:10.1} ms");
        println!("peak RSS     {peak:10.1} MiB");
        println!(
            "CPU kernels  {} (STUDIO_CPU_PATH forces one)",
            studio_inference::quant::KernelPath::detect()
        );
    }
    Ok(())
}
