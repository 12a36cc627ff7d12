//! What the subcommands share: the engine and sampling flags, device parsing and model
//! loading, streaming a generation to stdout (raw text or JSON lines), the summary object and
//! medians for the benchmarks.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use studio_inference::device::{DeviceChoice, DevicePreference, create_device};
use studio_inference::llm::generate::{GenerationStats, Step, generate};
use studio_inference::llm::grammar::StructuredOutput;
use studio_inference::llm::loader::{self, LoadedModel};
use studio_inference::llm::sampling::SamplingParams;

/// Options shared by every subcommand that runs a model.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Model folder (Hugging Face layout), weights file or `ORG/NAME[:FILE]` (default: the
    /// bundled demo language model).
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        value_parser = crate::cli::values::model_path()
    )]
    pub model: PathBuf,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128, value_parser = crate::cli::values::tokens)]
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
    /// Penalty for repeating the last `--repeat-last-n` tokens; 1 (the default, as llama.cpp)
    /// applies none, so `--temperature 0` is plain greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the output to this JSON schema (a `.json` file), enforced while sampling.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<PathBuf>,
    /// Keep the output to this GBNF grammar (a file, llama.cpp's format), enforced while
    /// sampling.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// One JSON object per generated token, then a summary object.
    #[arg(long)]
    pub json: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
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
            structured: read_structured(self.json_schema.as_ref(), self.grammar.as_ref())?,
            ..SamplingParams::default()
        };
        params.validate()?;
        // A schema or grammar that can't be enforced fails now, before the model loads.
        params.structured.compile()?;
        Ok(params)
    }
}

/// What `--json-schema FILE` or `--grammar FILE` asks the output to be (files of at most
/// 1 MiB; the schema or grammar is checked when the generation starts).
pub fn read_structured(
    json_schema: Option<&PathBuf>,
    grammar: Option<&PathBuf>,
) -> Result<StructuredOutput> {
    let read = |path: &PathBuf| -> Result<String> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len > 1 << 20 {
            bail!("{} is {len} bytes; at most 1 MiB", path.display());
        }
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(match (json_schema, grammar) {
        (Some(path), _) => StructuredOutput::JsonSchema {
            schema: read(path)?,
        },
        (None, Some(path)) => StructuredOutput::Gbnf {
            grammar: read(path)?,
        },
        (None, None) => StructuredOutput::Off,
    })
}

/// `auto`, `cpu`, `cuda[:N]`, `metal[:N]`.
pub fn parse_device(s: &str) -> Result<DevicePreference> {
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

/// Applies `--threads` and opens `--device`, warning on stderr when it falls back to the CPU.
pub fn open_device(threads: Option<usize>, device: &str) -> Result<DeviceChoice> {
    if let Some(n) = threads {
        crate::set_cpu_threads(n);
    }
    let choice = create_device(parse_device(device)?);
    if let Some(w) = &choice.warning {
        eprintln!("warning: {w}");
    }
    Ok(choice)
}

/// Opens the device and loads `--model`; returns the model and the device's label.
pub fn load_model(engine: &EngineArgs) -> Result<(LoadedModel, String)> {
    let choice = open_device(engine.threads, &engine.device)?;
    let model = loader::load(&engine.model, &choice.device, &mut |_, _| {})
        .with_context(|| format!("loading {}", engine.model.display()))?;
    Ok((model, choice.label))
}

/// Generates from `prompt` until one of `eos` (or a stop) and prints as it goes: raw text, or
/// JSON lines.
pub fn stream(
    m: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    json: bool,
) -> Result<()> {
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
        eos,
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

/// The final JSON line of a generation: `{"done": true, …}` with its timings.
pub fn summary_json(s: &GenerationStats) -> serde_json::Value {
    json!({
        "done": true,
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "ttft_ms": s.ttft_ms,
        "prefill_tok_s": s.prefill_tok_s,
        "decode_tok_s": s.decode_tok_s,
    })
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
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
