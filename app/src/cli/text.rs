//! The language-model subcommands: `studio generate`, `studio chat`, `studio serve`, `studio
//! embed`, and the `bench generate` and `bench memory` benchmarks.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use studio_inference::llm::chat::ChatMessage;
use studio_inference::llm::generate::generate;
use studio_inference::llm::sampling::SamplingParams;

use super::common::{EngineArgs, SamplingArgs, load_model, median, open_device, stream};

#[derive(Debug, Args)]
pub struct BenchMemoryArgs {
    /// Reading threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// MiB read per round, split between the threads.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::values::mib)]
    pub mib: usize,
    /// Rounds to take the median of.
    #[arg(long, default_value_t = 5, value_parser = crate::cli::values::rounds)]
    pub repeat: usize,
    /// One JSON object with the figures.
    #[arg(long)]
    pub json: bool,
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
    #[arg(long, default_value_t = 128, value_parser = crate::cli::values::tokens)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64, value_parser = crate::cli::values::tokens)]
    pub gen_tokens: usize,
    /// Runs to take the median of.
    #[arg(long, default_value_t = 5, value_parser = crate::cli::values::rounds)]
    pub repeat: usize,
    /// One JSON object with the figures.
    #[arg(long)]
    pub json: bool,
    /// Also time generation kept to this JSON schema (a file): the grammar's cost per token
    /// against a decode step.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Also time generation kept to this GBNF grammar (a file).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
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
    /// Also serve this sentence-embedding model at /v1/embeddings: a sentence-transformers
    /// folder of a BERT or NomicBERT encoder (all-MiniLM-L6-v2, bge-small-en-v1.5,
    /// nomic-embed-text-v1.5, …) or of a Qwen3-Embedding-style decoder.
    #[arg(long, value_name = "DIR", value_parser = crate::cli::values::model_path())]
    pub embedding_model: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A sentence-transformers folder (a BERT or NomicBERT encoder such as all-MiniLM-L6-v2,
    /// bge-small-en-v1.5 or nomic-embed-text-v1.5, or a Qwen3-Embedding-style decoder), or a
    /// chat model that gives its hidden states (a GGUF, or a Qwen2/Qwen3 folder), pooled as
    /// its file says, else by the mean.
    #[arg(long, value_parser = crate::cli::values::model_path())]
    pub model: std::path::PathBuf,
    /// A text to embed (repeatable). Each gives one JSON line on stdout: `{"index", "tokens",
    /// "embedding"}`.
    #[arg(long, required = true)]
    pub text: Vec<String>,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
}

pub fn run_embed(args: &EmbedArgs) -> Result<()> {
    let choice = open_device(args.threads, &args.device)?;
    if !studio_inference::embed::is_embedding_model(&args.model) {
        return embed_with_chat_model(args, &choice);
    }
    let model = studio_inference::embed::load(&args.model, &choice.device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let info = model.info();
    eprintln!(
        "embedding model {} ({} dimensions, {} pooling{}, at most {} tokens) on {}",
        info.name,
        info.dimensions,
        info.pooling.name(),
        if info.normalize { ", normalized" } else { "" },
        info.max_tokens,
        choice.label
    );
    print_embeddings(
        &args.text,
        info.max_tokens,
        &mut |t| Ok(model.tokenize(t)?),
        &mut |ids| Ok(model.embed_tokens(ids)?),
    )
}

/// `studio embed` with a chat model (a GGUF, a Qwen2/Qwen3 folder): its hidden states,
/// pooled as the file says and scaled to length 1.
fn embed_with_chat_model(
    args: &EmbedArgs,
    choice: &studio_inference::device::DeviceChoice,
) -> Result<()> {
    let mut m = studio_inference::llm::loader::load(&args.model, &choice.device, &mut |_, _| {})
        .with_context(|| format!("loading {}", args.model.display()))?;
    let context = m.model.context_length();
    let pooling = m.model.embedding_pooling()?;
    eprintln!(
        "chat model {} on {}: its hidden states, {} pooling, normalized",
        m.info.name,
        choice.label,
        pooling.name()
    );
    let tokenizer = m.tokenizer.clone();
    print_embeddings(
        &args.text,
        context,
        &mut |t| Ok(tokenizer.encode(t)?),
        &mut |ids| Ok(m.embed_tokens(ids)?),
    )
}

/// One JSON line per text: `{"index", "tokens", "embedding"}`; a text of more than `max`
/// tokens is refused, never cut short.
fn print_embeddings(
    texts: &[String],
    max: usize,
    tokenize: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    embed: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for (index, text) in texts.iter().enumerate() {
        let ids = tokenize(text)?;
        if ids.len() > max {
            bail!(
                "text {index} is {} tokens; the model takes at most {max} (Studio does not cut \
                 texts short)",
                ids.len()
            );
        }
        let embedding = embed(&ids).with_context(|| format!("text {index}"))?;
        let line = json!({"index": index, "tokens": ids.len(), "embedding": embedding});
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    if args.prompt.is_empty() {
        bail!(studio_inference::Error::EmptyPrompt);
    }
    let (mut m, _) = load_model(&args.engine)?;
    let prompt = m.tokenizer.encode(&args.prompt)?;
    let eos = m.eos_token_ids.clone();
    stream(&mut m, &prompt, &params, &eos, args.sampling.json)
}

pub fn run_chat(args: &ChatArgs) -> Result<()> {
    let params = args.sampling.params()?;
    let (mut m, _) = load_model(&args.engine)?;
    let system = args.system.as_deref().unwrap_or("");
    let messages = [ChatMessage::user(args.message.as_str())];
    let reply = m.chat_reply(system, &messages, params)?;
    if let Some(notice) = &reply.notice {
        eprintln!("note: {notice}");
    }
    stream(
        &mut m,
        &reply.tokens,
        &reply.params,
        &reply.eos,
        args.sampling.json,
    )
}

/// What generating under a grammar cost, over the bench's runs.
struct GrammarCost {
    trie_ms: f64,
    tokens: usize,
    masked: usize,
    ms_per_token: f64,
    decode_tok_s: f64,
}

/// Greedy runs kept to `grammar` from `prompt`: the grammar's time per token (checks, masks,
/// advances) and how many steps masked the whole vocabulary.
fn bench_grammar(
    m: &mut studio_inference::llm::loader::LoadedModel,
    grammar: &std::sync::Arc<studio_inference::llm::grammar::Grammar>,
    prompt: &[u32],
    params: &SamplingParams,
    repeat: usize,
) -> Result<GrammarCost> {
    use studio_inference::llm::grammar::{Constraint, vocab_trie};
    let start = std::time::Instant::now();
    let trie = vocab_trie(&m.tokenizer);
    let trie_ms = start.elapsed().as_secs_f64() * 1e3;
    let eos = m.eos_token_ids.clone();
    let (mut tokens, mut masked, mut secs, mut rates) = (0, 0, 0.0, Vec::new());
    for _ in 0..repeat {
        let mut c = Constraint::new(grammar.clone(), trie.clone(), &eos);
        let stats = studio_inference::llm::generate::generate_constrained(
            &mut *m.model,
            &m.tokenizer,
            &eos,
            prompt,
            params,
            false,
            Some(&mut c),
            &mut |_| ControlFlow::Continue(()),
        )?;
        tokens += stats.generated_tokens.max(1);
        masked += c.masked_steps;
        secs += c.time.as_secs_f64();
        rates.push(stats.decode_tok_s);
    }
    Ok(GrammarCost {
        trie_ms,
        tokens,
        masked,
        ms_per_token: secs * 1e3 / tokens as f64,
        decode_tok_s: median(rates),
    })
}

pub fn run_serve(args: &ServeArgs) -> Result<()> {
    let choice = open_device(args.engine.threads, &args.engine.device)?;
    let m = studio_inference::llm::loader::load(&args.engine.model, &choice.device, &mut |_, _| {})
        .with_context(|| format!("loading {}", args.engine.model.display()))?;
    let device = choice.label.clone();
    let embeddings = match &args.embedding_model {
        Some(dir) => Some(
            studio_inference::embed::load(dir, &choice.device)
                .with_context(|| format!("loading the embedding model {}", dir.display()))?,
        ),
        None => None,
    };
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
    let mut served = crate::serve::ServedModel::owned(m);
    if let Some(e) = embeddings {
        eprintln!("embedding model {} at /v1/embeddings", e.info().name);
        served = served.with_embeddings(e);
    }
    let server = crate::serve::Server::start(served, &options)?;
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

pub fn run_bench_memory(args: &BenchMemoryArgs) -> Result<()> {
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

pub fn run_bench_generate(args: &BenchGenerateArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeat == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeat must be at least 1");
    }
    let grammar = super::common::read_structured(args.json_schema.as_ref(), args.grammar.as_ref())?
        .compile()?;
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
    let constrained = match grammar {
        Some(g) => Some(bench_grammar(&mut m, &g, &prompt, &params, args.repeat)?),
        None => None,
    };
    let peak = studio_inference::sys::peak_rss_mb().unwrap_or(0.0);
    let threads = studio_inference::device::cpu_threads();
    let (prefill, decode, ttft) = (median(prefill), median(decode), median(ttft));
    let grammar_json = constrained.as_ref().map(|c| {
        json!({
            "trie_build_ms": c.trie_ms,
            "tokens": c.tokens,
            "masked_steps": c.masked,
            "grammar_ms_per_token": c.ms_per_token,
            "decode_ms_per_token": 1e3 / decode.max(1e-9),
            "grammar_share_of_decode_step": c.ms_per_token * decode / 1e3,
            "constrained_decode_tok_s": c.decode_tok_s,
        })
    });
    if args.json {
        println!(
            "{}",
            json!({
                "grammar": grammar_json,
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
        if let Some(c) = &constrained {
            println!(
                "grammar      {:10.3} ms/token ({:.1}% of a {:.1} ms decode step; {} of {} \
                 steps masked the vocabulary; trie built in {:.0} ms)",
                c.ms_per_token,
                100.0 * c.ms_per_token * decode / 1e3,
                1e3 / decode.max(1e-9),
                c.masked,
                c.tokens,
                c.trie_ms
            );
        }
        println!(
            "CPU kernels  {} (STUDIO_CPU_PATH forces one)",
            studio_inference::quant::KernelPath::detect()
        );
    }
    Ok(())
}
