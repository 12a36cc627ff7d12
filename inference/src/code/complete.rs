//! Inline completion around a cursor: whether to suggest one line or several, trimming the
//! suggestion as it streams, a small cache of recent completions, and the completion run itself
//! (shared by the worker's [`crate::worker::JobKind::Complete`] and `studio complete`).

use std::collections::VecDeque;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use super::fim::{self, FimFormat, FimPrompt};
use crate::error::{Error, Result};
use crate::llm::generate::{FinishReason, GenerationStats, Step, generate_with};
use crate::llm::loader::LoadedModel;
use crate::llm::sampling::SamplingParams;

/// How much a suggestion may span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompletionMode {
    /// The rest of the current line only.
    SingleLine,
    /// A block of lines.
    MultiLine,
}

/// Decides from the text around the cursor whether to suggest one line or a block.
///
/// Text after the cursor on its line → one line (the suggestion must fit before it). At the end
/// of a line that opens a block (`{`, `(`, `[`, `:`, `=>`, `->`, `=`), on an empty or
/// indentation-only line → several lines. Otherwise (the end of a partial statement) → one line.
pub fn completion_mode(prefix: &str, suffix: &str) -> CompletionMode {
    let rest_of_line = suffix.split('\n').next().unwrap_or("");
    if !rest_of_line.trim().is_empty() {
        return CompletionMode::SingleLine;
    }
    let line = prefix.rsplit('\n').next().unwrap_or("");
    let t = line.trim_end();
    if t.trim_start().is_empty()
        || t.ends_with('{')
        || t.ends_with('(')
        || t.ends_with('[')
        || t.ends_with(':')
        || t.ends_with("=>")
        || t.ends_with("->")
        || t.ends_with('=')
        || t.ends_with("\"\"\"")
        || t.ends_with("*/")
    {
        CompletionMode::MultiLine
    } else {
        CompletionMode::SingleLine
    }
}

/// Trims a suggestion as it streams: a single-line suggestion ends at the first newline; a
/// multi-line one ends where it starts repeating the code after the cursor (the first
/// non-blank line of the suffix), and never ends with blank lines or trailing whitespace.
///
/// Text is released as soon as it is certain to stay, so ghost text grows token by token.
#[derive(Debug, Clone)]
pub struct CompletionFilter {
    mode: CompletionMode,
    /// The first non-blank line of the suffix, trimmed (multi-line mode's stop line).
    target: String,
    /// The rest of the cursor's line, trimmed (single-line mode): a suggestion that ends with
    /// it has it removed, since it is already there.
    rest: String,
    /// The current line, not yet released.
    line: String,
    /// Part of the current line already released.
    released_in_line: bool,
    /// Newlines and blank lines held back until a non-blank line follows.
    held: String,
    /// Whether anything has been released.
    started: bool,
    stopped: bool,
}

impl CompletionFilter {
    /// A filter for a suggestion in `mode`, with `suffix` the text after the cursor.
    pub fn new(mode: CompletionMode, suffix: &str) -> Self {
        let rest_of_line = suffix.split('\n').next().unwrap_or("");
        let target = if mode == CompletionMode::MultiLine {
            suffix
                .split('\n')
                .skip(usize::from(rest_of_line.trim().is_empty()))
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        } else {
            String::new()
        };
        let rest = if mode == CompletionMode::SingleLine {
            rest_of_line.trim().to_owned()
        } else {
            String::new()
        };
        Self {
            mode,
            target,
            rest,
            line: String::new(),
            released_in_line: false,
            held: String::new(),
            started: false,
            stopped: false,
        }
    }

    /// Whether the suggestion is complete (stop generating).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Takes a streamed piece; returns the text to show now.
    pub fn push(&mut self, piece: &str) -> String {
        let mut out = String::new();
        if self.stopped {
            return out;
        }
        for ch in piece.chars() {
            if ch == '\n' && self.mode == CompletionMode::SingleLine {
                // The line is complete (a suggestion that starts with a newline is empty).
                self.end_single(&mut out);
                self.stopped = true;
                return out;
            }
            if ch == '\n' {
                self.end_line(&mut out);
                if self.stopped {
                    return out;
                }
            } else {
                self.line.push(ch);
            }
        }
        self.release_partial(&mut out);
        out
    }

    /// Whatever is still held that belongs to the suggestion, once generation has ended.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if self.stopped {
            return out;
        }
        self.stopped = true;
        if self.mode == CompletionMode::SingleLine {
            self.end_single(&mut out);
            return out;
        }
        let line = std::mem::take(&mut self.line);
        let blank = line.trim().is_empty();
        let repeats =
            !self.released_in_line && !self.target.is_empty() && line.trim() == self.target;
        if !blank && !repeats {
            if !self.released_in_line {
                out.push_str(&std::mem::take(&mut self.held));
            }
            out.push_str(line.trim_end());
        }
        out
    }

    /// The single line is complete: release what is held, less the rest of the cursor's line
    /// if the suggestion ends with it.
    fn end_single(&mut self, out: &mut String) {
        let line = std::mem::take(&mut self.line);
        let mut t = line.trim_end();
        if !self.rest.is_empty()
            && let Some(s) = t.strip_suffix(self.rest.as_str())
        {
            t = s.trim_end();
        }
        if self.released_in_line || !t.trim().is_empty() {
            out.push_str(t);
        }
    }

    /// A complete line (without its newline) arrived.
    fn end_line(&mut self, out: &mut String) {
        let line = std::mem::take(&mut self.line);
        let released = std::mem::take(&mut self.released_in_line);
        if released {
            // The start of this line is already shown: finish it.
            out.push_str(line.trim_end());
            self.held.push('\n');
            self.started = true;
            return;
        }
        if self.mode == CompletionMode::MultiLine
            && !self.target.is_empty()
            && line.trim() == self.target
        {
            self.stopped = true;
            return;
        }
        if line.trim().is_empty() {
            // Blank (or whitespace-only) line: hold it until something follows. A leading
            // newline right at the cursor is part of the suggestion.
            self.held.push_str(&line);
            self.held.push('\n');
            return;
        }
        out.push_str(&std::mem::take(&mut self.held));
        out.push_str(line.trim_end());
        self.held.push('\n');
        self.started = true;
    }

    /// Releases the current partial line when it can no longer turn out to repeat the suffix
    /// (or be blank).
    fn release_partial(&mut self, out: &mut String) {
        if self.line.trim().is_empty() {
            return;
        }
        if !self.released_in_line
            && self.mode == CompletionMode::MultiLine
            && !self.target.is_empty()
            && self.target.starts_with(self.line.trim_start())
        {
            return;
        }
        // Keep trailing whitespace back (it may end the line), and in single-line mode the
        // longest tail that may turn out to be the rest of the line.
        let mut keep = self.line.trim_end().len();
        if !self.rest.is_empty() {
            let body = &self.line[..keep];
            if let Some((i, _)) = body
                .char_indices()
                .find(|(i, _)| self.rest.starts_with(&body[*i..]))
            {
                keep = i;
            }
        }
        if keep == 0 {
            return;
        }
        if !self.released_in_line {
            out.push_str(&std::mem::take(&mut self.held));
        }
        out.push_str(&self.line[..keep]);
        self.line.drain(..keep);
        self.released_in_line = true;
        self.started = true;
    }
}

/// Post-processes a whole suggestion the way [`CompletionFilter`] does while streaming.
pub fn postprocess(completion: &str, mode: CompletionMode, suffix: &str) -> String {
    let mut f = CompletionFilter::new(mode, suffix);
    let mut out = f.push(completion);
    out.push_str(&f.finish());
    out
}

/// A small least-recently-used cache of completions, keyed by the end of the prefix, the start
/// of the suffix and the model. A lookup also hits when the user has since typed the start of
/// a cached suggestion: the rest of it is returned.
#[derive(Debug, Clone)]
pub struct CompletionCache {
    capacity: usize,
    /// Most recent last.
    entries: VecDeque<CacheEntry>,
}

#[derive(Debug, Clone)]
struct CacheEntry {
    model: String,
    prefix_tail: String,
    suffix_head: String,
    completion: String,
}

/// How much of the prefix's end and the suffix's start identify a completion.
const CACHE_PREFIX_BYTES: usize = 2048;
const CACHE_SUFFIX_BYTES: usize = 512;

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn head(s: &str, n: usize) -> &str {
    let mut i = n.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

impl CompletionCache {
    /// An empty cache holding at most `capacity` completions (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: VecDeque::new(),
        }
    }

    /// Number of cached completions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no completion is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every cached completion (e.g. when the model changes).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The cached completion for this cursor, or the rest of one whose start was typed since.
    pub fn get(&mut self, model: &str, prefix: &str, suffix: &str) -> Option<String> {
        let s_head = head(suffix, CACHE_SUFFIX_BYTES);
        let found = self.entries.iter().enumerate().rev().find_map(|(i, e)| {
            if e.model != model || e.suffix_head != s_head {
                return None;
            }
            // Typed text t: prefix == cached prefix + t, and the completion starts with t.
            let len = e.completion.len();
            (0..=len)
                .filter(|&k| e.completion.is_char_boundary(k) && (k < len || len == 0))
                .find(|&k| {
                    let typed = &e.completion[..k];
                    if !prefix.ends_with(typed) {
                        return false;
                    }
                    let before = &prefix[..prefix.len() - typed.len()];
                    if e.prefix_tail.len() < CACHE_PREFIX_BYTES {
                        before == e.prefix_tail
                    } else {
                        before.ends_with(&e.prefix_tail)
                    }
                })
                .map(|k| (i, e.completion[k..].to_owned()))
        });
        let (i, rest) = found?;
        if let Some(e) = self.entries.remove(i) {
            self.entries.push_back(e);
        }
        Some(rest)
    }

    /// Caches `completion` for this cursor and model, replacing an entry for the same key; the
    /// least recently used entry is evicted when the cache is full.
    pub fn insert(&mut self, model: &str, prefix: &str, suffix: &str, completion: &str) {
        let p_tail = tail(prefix, CACHE_PREFIX_BYTES);
        let s_head = head(suffix, CACHE_SUFFIX_BYTES);
        self.entries
            .retain(|e| !(e.model == model && e.prefix_tail == p_tail && e.suffix_head == s_head));
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(CacheEntry {
            model: model.to_owned(),
            prefix_tail: p_tail.to_owned(),
            suffix_head: s_head.to_owned(),
            completion: completion.to_owned(),
        });
    }
}

/// A fill-in-the-middle completion to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Text before the cursor.
    pub prefix: String,
    /// Text after the cursor.
    pub suffix: String,
    /// Sampling settings; `max_new_tokens` caps the suggestion (and is kept free in the context).
    pub params: SamplingParams,
    /// A format chosen by a preset, instead of the one detected from the tokenizer.
    pub format: Option<FimFormat>,
    /// Cap on the prompt, special tokens included (also capped by the model's context).
    pub max_prompt_tokens: usize,
    /// One line or a block; `None` decides from the context ([`completion_mode`]).
    pub mode: Option<CompletionMode>,
}

/// Default prompt budget of inline completions.
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 2048;

impl CompletionRequest {
    /// A request with the detected format, [`DEFAULT_MAX_PROMPT_TOKENS`] and the mode decided from
    /// the context.
    pub fn new(
        prefix: impl Into<String>,
        suffix: impl Into<String>,
        params: SamplingParams,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
            params,
            format: None,
            max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS,
            mode: None,
        }
    }
}

/// The result of [`run_completion`].
#[derive(Debug, Clone)]
pub struct CompletionOutcome {
    /// The suggestion, as streamed.
    pub text: String,
    /// Token counts, speeds and why generation stopped (a complete suggestion counts as a stop
    /// string, not a cancel).
    pub stats: GenerationStats,
    /// The mode used: the request's, or the one decided from the context.
    pub mode: CompletionMode,
    /// The prompt generated from, with what was cut to fit the budget.
    pub prompt: FimPrompt,
}

/// Builds the FIM prompt for `request` on `model` (format detected or overridden, budget capped
/// by the model's context less the tokens to generate).
pub fn completion_prompt(model: &LoadedModel, request: &CompletionRequest) -> Result<FimPrompt> {
    let fim = fim::resolve(&model.tokenizer, request.format, &model.eos_token_ids)?;
    let context = model.model.context_length();
    let room = context.saturating_sub(request.params.max_new_tokens.max(1) + 1);
    let budget = request.max_prompt_tokens.min(room);
    if request.prefix.is_empty() && request.suffix.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    fim::build_prompt(
        &model.tokenizer,
        &fim,
        &request.prefix,
        &request.suffix,
        budget,
    )
}

/// Runs a completion: builds the prompt, generates until the format's stop tokens, the model's
/// end of text, `max_new_tokens` or the suggestion is complete ([`CompletionFilter`]), and calls
/// `on_step` with each token and the text it adds to the suggestion (`id: None` for the final
/// flush). `on_step` returning `Break` cancels.
pub fn run_completion(
    model: &mut LoadedModel,
    request: &CompletionRequest,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<CompletionOutcome> {
    let prompt = completion_prompt(model, request)?;
    run_completion_with_prompt(model, request, prompt, on_step)
}

/// [`run_completion`] with the prompt already built by [`completion_prompt`] (the worker
/// reports its size before generating).
pub fn run_completion_with_prompt(
    model: &mut LoadedModel,
    request: &CompletionRequest,
    prompt: FimPrompt,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<CompletionOutcome> {
    let fim = fim::resolve(&model.tokenizer, request.format, &model.eos_token_ids)?;
    let mode = request
        .mode
        .unwrap_or_else(|| completion_mode(&request.prefix, &request.suffix));
    let mut filter = CompletionFilter::new(mode, &request.suffix);
    let mut text = String::new();
    let mut cancelled = false;
    // Each keystroke changes only the end of the text before the cursor: reuse the cache.
    let mut stats = generate_with(
        &mut *model.model,
        &model.tokenizer,
        &fim.stop_ids,
        &prompt.tokens,
        &request.params,
        true,
        &mut |step: Step<'_>| {
            let shown = filter.push(step.text);
            text.push_str(&shown);
            if on_step(Step {
                id: step.id,
                text: &shown,
                logits: step.logits,
            })
            .is_break()
            {
                cancelled = true;
                return ControlFlow::Break(());
            }
            if filter.is_stopped() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;
    if !cancelled {
        if stats.finish == FinishReason::Cancelled {
            stats.finish = FinishReason::StopString;
        }
        let rest = filter.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = on_step(Step {
                id: None,
                text: &rest,
                logits: None,
            });
        }
    }
    Ok(CompletionOutcome {
        text,
        stats,
        mode,
        prompt,
    })
}

/// Whether the loaded model can fill in the middle ([`crate::worker::Worker::fim_support`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FimSupport {
    /// No model is loaded.
    #[default]
    NoModel,
    /// The model's tokenizer has this format's tokens.
    Supported(FimFormat),
    /// It cannot; `reason` is written for the person (ghost text is disabled, actions work).
    Unsupported {
        /// Why not, as a sentence for the person (shown in the editor's ghost-text status).
        reason: String,
    },
}

impl FimSupport {
    /// What the loaded model supports (`None`: no local model; a remote server cannot do FIM
    /// through Studio).
    pub fn of(model: Option<&LoadedModel>, remote: bool) -> Self {
        match model {
            Some(m) => match fim::detect(&m.tokenizer, &m.eos_token_ids) {
                Ok(f) => FimSupport::Supported(f.format),
                Err(_) => FimSupport::Unsupported {
                    reason: fim::no_fim_reason(),
                },
            },
            None if remote => FimSupport::Unsupported {
                reason: "inline completion needs a local model: a server's API has no \
                         fill-in-the-middle prompts (actions still work)"
                    .to_owned(),
            },
            None => FimSupport::NoModel,
        }
    }

    /// The supported format, if any.
    pub fn format(&self) -> Option<FimFormat> {
        match self {
            FimSupport::Supported(f) => Some(*f),
            _ => None,
        }
    }
}
