//! Code assist on the command line (a contract, like the rest of [`crate::cli`]):
//!
//! - `studio complete --model PATH --file F --line L --column C [--max-tokens N] [--json]`
//!   prints the fill-in-the-middle completion at that cursor (1-based line and column, counted
//!   in characters as editors show them; the cursor sits before the character at that column,
//!   so column 1 is the start of the line and one past the last character its end). The FIM
//!   format comes from the model's own special tokens (`--fim-format` overrides it). Sampling
//!   flags are `studio generate`'s (`--temperature 0` = greedy); with `--json`, the same JSON
//!   lines as `studio generate --json` (the summary also names the FIM format and the mode).
//!   `--mode line|block` forces a single-line or multi-line suggestion (default: decided from
//!   the context). What was cut to fit `--max-prompt-tokens` is said on stderr.
//! - `studio code --model PATH --action explain|fix|doc|tests|translate:LANG|instruct --file F
//!   [--lines A-B] [--instruction TEXT] [--context FILE]…` runs an action preset
//!   (`presets/code-actions/`) as a chat with the model's template and prints the streamed
//!   reply; for editing actions (fix, doc, instruct) it prints a unified diff of the file
//!   instead (the streamed reply goes to stderr with `--show-reply`).
//! - `studio bench complete --model PATH [--prefix-tokens 2000] [--gen-tokens 8] [--repeat 3]
//!   [--json]` times an inline completion with a long code prefix: from the request (the
//!   "keystroke") to the first token, time to first token of the token loop, and prefill
//!   tokens/s, medians of `--repeat` runs after a warm-up.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::json;
use studio_inference::code::actions::{
    ActionInput, ActionKind, ContextFile, build_action_prompt, presets_with, rewrite_from_reply,
};
use studio_inference::code::complete::{
    CompletionMode, CompletionRequest, DEFAULT_MAX_PROMPT_TOKENS, run_completion,
};
use studio_inference::code::diff::{diff_lines, unified};
use studio_inference::code::fim::{self, FimFormat};
use studio_inference::llm::generate::{Step, generate};
use studio_inference::llm::sampling::SamplingParams;

use super::common::{EngineArgs, SamplingArgs, load_model, median, stream, summary_json};

#[derive(Debug, Args)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The source file (UTF-8 text).
    #[arg(long)]
    pub file: PathBuf,
    /// Cursor line, 1-based.
    #[arg(long)]
    pub line: usize,
    /// Cursor column, 1-based, in characters; the cursor sits before the character there.
    #[arg(long)]
    pub column: usize,
    /// FIM format instead of the one detected from the tokenizer: qwen2.5-coder, starcoder,
    /// codellama, deepseek-coder, codestral.
    #[arg(long)]
    pub fim_format: Option<String>,
    /// Cap on the prompt in tokens (most of it for the text before the cursor).
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_TOKENS, value_parser = crate::cli::values::tokens)]
    pub max_prompt_tokens: usize,
    /// auto (from the context), line (one line) or block (several lines).
    #[arg(long, default_value = "auto")]
    pub mode: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct CodeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// explain, fix, doc, tests, translate:LANG, instruct, or the id of a preset of yours.
    #[arg(long)]
    pub action: String,
    /// The source file (UTF-8 text).
    #[arg(long)]
    pub file: PathBuf,
    /// Only these lines, 1-based and inclusive, e.g. 10-42 (default: the whole file).
    #[arg(long)]
    pub lines: Option<String>,
    /// What to change (the `instruct` action).
    #[arg(long)]
    pub instruction: Option<String>,
    /// Other files to include as context (repeatable; cut first when the context is short).
    #[arg(long)]
    pub context: Vec<PathBuf>,
    /// For editing actions: also stream the model's reply to stderr.
    #[arg(long)]
    pub show_reply: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct BenchCompleteArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Tokens of code before the cursor.
    #[arg(long, default_value_t = 2000)]
    pub prefix_tokens: usize,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 8, value_parser = crate::cli::values::tokens)]
    pub gen_tokens: usize,
    /// Measured runs (after one warm-up) to take the median of.
    #[arg(long, default_value_t = 3, value_parser = crate::cli::values::rounds)]
    pub repeat: usize,
    /// One JSON object with the figures.
    #[arg(long)]
    pub json: bool,
}

/// Reads a source file as UTF-8 text, refusing binary files.
pub fn read_source(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes[..bytes.len().min(8192)].contains(&0) {
        bail!(
            "{} looks like a binary file (it contains NUL bytes); code assist works on text files",
            path.display()
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{} is not valid UTF-8 text (the first invalid byte is at offset {}); code assist \
             works on UTF-8 files",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The byte offset of the cursor at 1-based `line` and `column` (in characters).
pub fn cursor_offset(text: &str, line: usize, column: usize) -> Result<usize> {
    if line == 0 || column == 0 {
        bail!("--line and --column are 1-based (the first line and column are 1)");
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let Some(content) = lines.get(line - 1) else {
        bail!(
            "line {line} is past the end of the file (it has {} line{})",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" }
        );
    };
    let start: usize = lines[..line - 1].iter().map(|l| l.len() + 1).sum();
    let content = content.strip_suffix('\r').unwrap_or(content);
    let chars = content.chars().count();
    if column > chars + 1 {
        bail!(
            "column {column} is past the end of line {line} (it has {chars} character{}, so \
             the last cursor position is column {})",
            if chars == 1 { "" } else { "s" },
            chars + 1
        );
    }
    let within = content
        .char_indices()
        .nth(column - 1)
        .map_or(content.len(), |(i, _)| i);
    Ok(start + within)
}

fn parse_mode(s: &str) -> Result<Option<CompletionMode>> {
    Ok(match s {
        "auto" => None,
        "line" | "single" | "single-line" => Some(CompletionMode::SingleLine),
        "block" | "multi" | "multi-line" => Some(CompletionMode::MultiLine),
        other => bail!("unknown --mode `{other}` (use auto, line or block)"),
    })
}

/// Writes streamed tokens as `studio generate` does: raw text, or one JSON object per token
/// (text released only at the end is added to the last token's line).
struct TokenWriter<W: Write> {
    out: W,
    json: bool,
    held: Option<(u32, String)>,
    error: Option<std::io::Error>,
}

impl<W: Write> TokenWriter<W> {
    fn new(out: W, json: bool) -> Self {
        Self {
            out,
            json,
            held: None,
            error: None,
        }
    }

    fn step(&mut self, step: Step<'_>) -> ControlFlow<()> {
        let result = if self.json {
            match (step.id, self.held.as_mut()) {
                (None, Some((_, text))) => {
                    text.push_str(step.text);
                    Ok(())
                }
                (None, None) => Ok(()),
                (Some(id), _) => {
                    let previous = self.held.replace((id, step.text.to_owned()));
                    previous.map_or(Ok(()), |(id, text)| {
                        writeln!(self.out, "{}", json!({"id": id, "text": text}))
                    })
                }
            }
        } else {
            write!(self.out, "{}", step.text).and_then(|()| self.out.flush())
        };
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    /// Ends the output: the held JSON line and `summary`, or a newline. `Ok(false)` when the
    /// reader went away (a closed pipe).
    fn finish(mut self, summary: &serde_json::Value) -> Result<bool> {
        if let Some(e) = self.error.take() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(false);
            }
            return Err(e).context("writing to stdout");
        }
        if self.json {
            if let Some((id, text)) = self.held.take() {
                writeln!(self.out, "{}", json!({"id": id, "text": text}))?;
            }
            writeln!(self.out, "{summary}")?;
        } else {
            writeln!(self.out)?;
        }
        Ok(true)
    }
}

pub fn run_complete(args: &CompleteArgs) -> Result<()> {
    let mut params = args.sampling.params()?;
    let mode = parse_mode(&args.mode)?;
    let format = args
        .fim_format
        .as_deref()
        .map(|name| {
            FimFormat::from_name(name).ok_or_else(|| {
                anyhow!(
                    "unknown --fim-format `{name}` (use qwen2.5-coder, starcoder, codellama, \
                     deepseek-coder or codestral)"
                )
            })
        })
        .transpose()?;
    let text = read_source(&args.file)?;
    let at = cursor_offset(&text, args.line, args.column)
        .with_context(|| format!("{}", args.file.display()))?;
    let (mut m, _) = load_model(&args.engine)?;
    // Refuse a model without FIM tokens before anything else.
    fim::resolve(&m.tokenizer, format, &m.eos_token_ids)
        .with_context(|| format!("{} cannot fill in the middle", m.info.name))?;
    // Completions use the sampling flags as given; stop strings apply to the suggestion.
    params.stop.retain(|s| !s.is_empty());
    let request = CompletionRequest {
        prefix: text[..at].to_owned(),
        suffix: text[at..].to_owned(),
        params,
        format,
        max_prompt_tokens: args.max_prompt_tokens,
        mode,
    };
    let mut writer = TokenWriter::new(std::io::stdout().lock(), args.sampling.json);
    let outcome = run_completion(&mut m, &request, &mut |step| writer.step(step))?;
    if let Some(notice) = outcome.prompt.cut_notice() {
        eprintln!("note: {notice}");
    }
    let mut summary = summary_json(&outcome.stats);
    if let Some(o) = summary.as_object_mut() {
        o.insert("fim_format".to_owned(), json!(outcome.prompt.format.name()));
        o.insert(
            "mode".to_owned(),
            json!(match outcome.mode {
                CompletionMode::SingleLine => "line",
                CompletionMode::MultiLine => "block",
            }),
        );
    }
    writer.finish(&summary)?;
    Ok(())
}

/// Parses `A-B` (1-based, inclusive) into a 0-based line range, checked against `count` lines.
fn parse_lines(spec: &str, count: usize) -> Result<(usize, usize)> {
    let (a, b) = spec.split_once('-').unwrap_or((spec, spec));
    let a: usize = a
        .trim()
        .parse()
        .with_context(|| format!("--lines `{spec}`: expected A-B, e.g. 10-42"))?;
    let b: usize = b
        .trim()
        .parse()
        .with_context(|| format!("--lines `{spec}`: expected A-B, e.g. 10-42"))?;
    if a == 0 || b < a {
        bail!("--lines `{spec}`: lines are 1-based and A must not be after B");
    }
    if b > count {
        bail!("--lines `{spec}`: the file has {count} lines");
    }
    Ok((a - 1, b))
}

pub fn run_code(args: &CodeArgs) -> Result<()> {
    let params = args.sampling.params()?;
    let (id, target) = match args.action.split_once(':') {
        Some((id, lang)) => (id.trim(), lang.trim().to_owned()),
        None => (args.action.trim(), String::new()),
    };
    let dir = crate::gui::presets::presets_dir().map(|d| d.join("code-actions"));
    let (presets, errors) = presets_with(dir.as_deref());
    for e in errors {
        eprintln!("warning: {e}");
    }
    let Some(preset) = presets.iter().find(|p| p.id == id) else {
        bail!(
            "unknown --action `{id}` (use {})",
            presets
                .iter()
                .map(|p| if p.id == "translate" {
                    "translate:LANG".to_owned()
                } else {
                    p.id.clone()
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let text = read_source(&args.file)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let (from, to) = match &args.lines {
        Some(spec) => parse_lines(spec, lines.len())?,
        None => (0, lines.len()),
    };
    let before: String = lines[..from].concat();
    let code: String = lines[from..to].concat();
    let after: String = lines[to..].concat();
    let mut context = Vec::new();
    for p in &args.context {
        context.push(ContextFile {
            path: p.display().to_string(),
            text: read_source(p)?,
        });
    }
    let input = ActionInput {
        path: args.file.display().to_string(),
        code: code.clone(),
        instruction: args.instruction.clone().unwrap_or_default(),
        target_language: target,
        context,
    };
    let (mut m, _) = load_model(&args.engine)?;
    let budget = m
        .model
        .context_length()
        .saturating_sub(params.max_new_tokens + 16);
    let tokenizer = m.tokenizer.clone();
    let count = move |s: &str| tokenizer.encode(s).map_or(s.len(), |ids| ids.len());
    let prompt = build_action_prompt(preset, &input, budget, &count)?;
    for cut in &prompt.cut {
        eprintln!("note: context cut: {cut}");
    }
    let reply_plan = m.chat_reply(&prompt.system, &prompt.messages(), params)?;
    if let Some(notice) = &reply_plan.notice {
        eprintln!("note: {notice}");
    }
    if prompt.kind != ActionKind::Edit {
        return stream(
            &mut m,
            &reply_plan.tokens,
            &reply_plan.params,
            &reply_plan.eos,
            args.sampling.json,
        );
    }
    // An edit: collect the reply (optionally echoing it to stderr), then print the diff.
    let mut reply = String::new();
    let stats = generate(
        &mut *m.model,
        &m.tokenizer,
        &reply_plan.eos,
        &reply_plan.tokens,
        &reply_plan.params,
        &mut |step| {
            reply.push_str(step.text);
            if args.show_reply {
                eprint!("{}", step.text);
            }
            ControlFlow::Continue(())
        },
    )?;
    if args.show_reply {
        eprintln!();
    }
    let rewrite = rewrite_from_reply(&code, &reply);
    let new_text = format!("{before}{rewrite}{after}");
    let path = args.file.display().to_string();
    let diff = diff_lines(&text, &new_text, 3);
    let patch = unified(&diff, &path, &path);
    let mut out = std::io::stdout().lock();
    if args.sampling.json {
        let mut summary = summary_json(&stats);
        if let Some(o) = summary.as_object_mut() {
            o.insert("diff".to_owned(), json!(patch));
            o.insert("hunks".to_owned(), json!(diff.hunks.len()));
            o.insert("reply".to_owned(), json!(reply));
        }
        writeln!(out, "{summary}")?;
    } else if patch.is_empty() {
        eprintln!("note: the model proposed no changes");
    } else {
        write!(out, "{patch}")?;
    }
    Ok(())
}

/// The line the cursor ends on in the benchmark's prefix.
const BENCH_CURSOR_LINE: &str = "def circumference(r: float) -> float:\n    ";

/// About `tokens` tokens of code (never more): functions varied enough that BPE does not
/// collapse them, then [`BENCH_CURSOR_LINE`].
fn bench_prefix(
    tokenizer: &studio_inference::llm::text::Tokenizer,
    tokens: usize,
) -> Result<String> {
    let target = tokens.saturating_sub(tokenizer.encode(BENCH_CURSOR_LINE)?.len());
    let mut text = String::from("import math\n\n");
    let mut i = 0usize;
    loop {
        let chunk = format!(
            "def area_{i}(radius_{i}: float) -> float:\n    \"\"\"Area of circle {i}.\"\"\"\n    \
             return math.pi * radius_{i} ** 2 + {i}\n\n"
        );
        text.push_str(&chunk);
        i += 1;
        if i.is_multiple_of(8) && tokenizer.encode(&text)?.len() >= target {
            break;
        }
    }
    // Trim whole functions, then lines, until the prefix is at most `target` tokens.
    while tokenizer.encode(&text)?.len() > target {
        let body = text.trim_end_matches('\n');
        let Some(cut) = body.rfind('\n') else {
            text.clear();
            break;
        };
        text.truncate(cut + 1);
    }
    text.push_str(BENCH_CURSOR_LINE);
    Ok(text)
}

pub fn run_bench_complete(args: &BenchCompleteArgs) -> Result<()> {
    if args.prefix_tokens == 0 || args.gen_tokens == 0 || args.repeat == 0 {
        bail!("--prefix-tokens, --gen-tokens and --repeat must be at least 1");
    }
    let (mut m, device) = load_model(&args.engine)?;
    let context = m.model.context_length();
    if args.prefix_tokens + args.gen_tokens + 16 > context {
        bail!(
            "--prefix-tokens + --gen-tokens ({}) exceeds the model's context ({context})",
            args.prefix_tokens + args.gen_tokens
        );
    }
    let prefix = bench_prefix(&m.tokenizer, args.prefix_tokens)?;
    let suffix = "\n\nprint(circumference(2.0))\n";
    let fim_format = fim::detect(&m.tokenizer, &m.eos_token_ids)
        .ok()
        .map(|f| f.format);
    if fim_format.is_none() {
        eprintln!(
            "note: {} has no fill-in-the-middle tokens; timing the same prefix as a plain prompt",
            m.info.name
        );
    }
    // Greedy, and no end of text, so every run does the same work.
    let params = SamplingParams::greedy(args.gen_tokens);
    let (mut first, mut ttft, mut prefill, mut build, mut prompt_tokens) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    let (mut keystroke, mut reused) = (Vec::new(), 0);
    for run in 0..=args.repeat {
        // Cold: nothing of this prompt is cached.
        m.model.clear_kv_cache();
        let start = Instant::now();
        let mut first_ms: Option<f64> = None;
        let mut on_step = |step: Step<'_>| {
            if step.id.is_some() && first_ms.is_none() {
                first_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            }
            ControlFlow::Continue(())
        };
        let (stats, build_ms) = if fim_format.is_some() {
            let request = CompletionRequest {
                prefix: prefix.clone(),
                suffix: suffix.to_owned(),
                params: params.clone(),
                format: None,
                max_prompt_tokens: context,
                mode: Some(CompletionMode::MultiLine),
            };
            let outcome = run_completion(&mut m, &request, &mut on_step)?;
            let build_ms = (first_ms.unwrap_or_default() - outcome.stats.ttft_ms).max(0.0);
            (outcome.stats, build_ms)
        } else {
            let t = Instant::now();
            let tokens = m.tokenizer.encode(&prefix)?;
            let build_ms = t.elapsed().as_secs_f64() * 1e3;
            let stats = generate(
                &mut *m.model,
                &m.tokenizer,
                &[],
                &tokens,
                &params,
                &mut on_step,
            )?;
            (stats, build_ms)
        };
        if fim_format.is_some() {
            // One more character typed at the cursor: the unchanged start of the prompt is
            // reused from the cache, as in the editor.
            let request = CompletionRequest {
                prefix: format!("{prefix}x"),
                suffix: suffix.to_owned(),
                params: params.clone(),
                format: None,
                max_prompt_tokens: context,
                mode: Some(CompletionMode::MultiLine),
            };
            let start = Instant::now();
            let mut typed_ms: Option<f64> = None;
            let outcome = run_completion(&mut m, &request, &mut |step: Step<'_>| {
                if step.id.is_some() && typed_ms.is_none() {
                    typed_ms = Some(start.elapsed().as_secs_f64() * 1e3);
                }
                ControlFlow::Continue(())
            })?;
            if run > 0 {
                keystroke.push(typed_ms.unwrap_or(outcome.stats.ttft_ms));
                reused = outcome.stats.reused_tokens;
            }
        }
        if run > 0 {
            first.push(first_ms.unwrap_or(stats.ttft_ms));
            ttft.push(stats.ttft_ms);
            prefill.push(stats.prefill_tok_s);
            build.push(build_ms);
        }
        prompt_tokens = stats.prompt_tokens;
    }
    let peak = studio_inference::sys::peak_rss_mb().unwrap_or(0.0);
    let threads = studio_inference::device::cpu_threads();
    let (first, ttft, prefill, build) =
        (median(first), median(ttft), median(prefill), median(build));
    let keystroke = (!keystroke.is_empty()).then(|| median(keystroke));
    if args.json {
        println!(
            "{}",
            json!({
                "model": m.info.name,
                "device": device,
                "threads": threads,
                "fim_format": fim_format.map(FimFormat::name),
                "prompt_tokens": prompt_tokens,
                "gen_tokens": args.gen_tokens,
                "repeat": args.repeat,
                "keystroke_to_first_token_ms": first,
                "next_keystroke_to_first_token_ms": keystroke,
                "next_keystroke_reused_tokens": reused,
                "prompt_build_ms": build,
                "ttft_ms": ttft,
                "prefill_tok_s": prefill,
                "peak_rss_mb": peak,
            })
        );
    } else {
        println!(
            "model {} on {device}, FIM {}, {prompt_tokens}-token prompt, median of {} runs",
            m.info.name,
            fim_format.map_or("none (plain prompt)", FimFormat::name),
            args.repeat
        );
        println!("request → first token {first:10.1} ms   (nothing cached)");
        if let Some(k) = keystroke {
            println!("next keystroke → first token {k:10.1} ms   ({reused} prompt tokens reused)");
        }
        println!("prompt building       {build:10.1} ms");
        println!("time to first token   {ttft:10.1} ms");
        println!("prefill               {prefill:10.1} tok/s");
        println!("peak RSS              {peak:10.1} MiB");
    }
    Ok(())
}
