//! Fill-in-the-middle prompts: the five formats code models are trained on (REFERENCE.md,
//! "Code assist"), detected from the tokenizer's special tokens, and prompts built at the
//! token-id level within a token budget.
//!
//! The special tokens are inserted by id, never by tokenizing text that contains them: the
//! prefix and suffix are encoded as plain text with every special marker in them broken
//! apart first, so code that contains `<fim_prefix>` or `<|endoftext|>` cannot inject one.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::text::Tokenizer;

/// A fill-in-the-middle prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FimFormat {
    /// Qwen2.5-Coder (and CodeGemma, whose markers are the same):
    /// `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`.
    QwenCoder,
    /// StarCoder / StarCoder2 / stable-code: `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`.
    StarCoder,
    /// CodeLlama: `<PRE> {prefix} <SUF>{suffix} <MID>`.
    CodeLlama,
    /// DeepSeek-Coder: `<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>`.
    DeepSeekCoder,
    /// Codestral: `[SUFFIX]{suffix}[PREFIX]{prefix}`.
    Codestral,
}

/// Marker strings of one format: each role lists the spellings tokenizers use, first match wins.
struct Spec {
    prefix: &'static [&'static str],
    suffix: &'static [&'static str],
    middle: &'static [&'static str],
    /// Tokens that end a completion in this format (besides the model's end-of-text).
    stops: &'static [&'static str],
    /// Beginning-of-sequence spellings, for formats whose prompts start with one.
    bos: &'static [&'static str],
}

const DEEPSEEK_EOS: &str = "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>";

impl FimFormat {
    /// Every format, in detection order.
    pub const ALL: [FimFormat; 5] = [
        FimFormat::QwenCoder,
        FimFormat::StarCoder,
        FimFormat::DeepSeekCoder,
        FimFormat::CodeLlama,
        FimFormat::Codestral,
    ];

    /// The name used in presets and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FimFormat::QwenCoder => "qwen2.5-coder",
            FimFormat::StarCoder => "starcoder",
            FimFormat::CodeLlama => "codellama",
            FimFormat::DeepSeekCoder => "deepseek-coder",
            FimFormat::Codestral => "codestral",
        }
    }

    /// The format called `name` (case-insensitive; also `qwen`, `starcoder2`, `stable-code`,
    /// `codegemma`, `deepseek`, `mistral`).
    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.trim().to_ascii_lowercase().replace('_', "-");
        Some(match n.as_str() {
            "qwen2.5-coder" | "qwen-coder" | "qwen" | "qwen2.5" | "codegemma" => {
                FimFormat::QwenCoder
            }
            "starcoder" | "starcoder2" | "stable-code" | "stablecode" => FimFormat::StarCoder,
            "codellama" | "code-llama" => FimFormat::CodeLlama,
            "deepseek-coder" | "deepseek" => FimFormat::DeepSeekCoder,
            "codestral" | "mistral" => FimFormat::Codestral,
            _ => return None,
        })
    }

    fn spec(self) -> Spec {
        match self {
            FimFormat::QwenCoder => Spec {
                prefix: &["<|fim_prefix|>"],
                suffix: &["<|fim_suffix|>"],
                middle: &["<|fim_middle|>"],
                stops: &[
                    "<|endoftext|>",
                    "<|fim_pad|>",
                    "<|file_sep|>",
                    "<|repo_name|>",
                    "<|fim_prefix|>",
                    "<|fim_suffix|>",
                    "<|fim_middle|>",
                    "<|im_end|>",
                    "<|file_separator|>",
                ],
                bos: &[],
            },
            FimFormat::StarCoder => Spec {
                prefix: &["<fim_prefix>", "<fim-prefix>"],
                suffix: &["<fim_suffix>", "<fim-suffix>"],
                middle: &["<fim_middle>", "<fim-middle>"],
                stops: &[
                    "<|endoftext|>",
                    "<file_sep>",
                    "<fim_prefix>",
                    "<fim_suffix>",
                    "<fim_middle>",
                    "<fim_pad>",
                    "<fim-prefix>",
                    "<fim-suffix>",
                    "<fim-middle>",
                    "<fim-pad>",
                ],
                bos: &[],
            },
            FimFormat::CodeLlama => Spec {
                prefix: &["\u{2581}<PRE>", "<PRE>"],
                suffix: &["\u{2581}<SUF>", "<SUF>"],
                middle: &["\u{2581}<MID>", "<MID>"],
                stops: &["\u{2581}<EOT>", "<EOT>", "</s>"],
                bos: &["<s>"],
            },
            FimFormat::DeepSeekCoder => Spec {
                prefix: &["<\u{ff5c}fim\u{2581}begin\u{ff5c}>"],
                suffix: &["<\u{ff5c}fim\u{2581}hole\u{ff5c}>"],
                middle: &["<\u{ff5c}fim\u{2581}end\u{ff5c}>"],
                stops: &[DEEPSEEK_EOS, "<|EOT|>"],
                bos: &["<\u{ff5c}begin\u{2581}of\u{2581}sentence\u{ff5c}>"],
            },
            FimFormat::Codestral => Spec {
                prefix: &["[PREFIX]"],
                suffix: &["[SUFFIX]"],
                middle: &[],
                stops: &["</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"],
                bos: &["<s>"],
            },
        }
    }

    /// The format's stop-token spellings (the ones a tokenizer has are used).
    pub fn stop_tokens(self) -> &'static [&'static str] {
        self.spec().stops
    }
}

impl fmt::Display for FimFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Special tokens whose text must never be produced from user code (beyond the FIM markers
/// and stop tokens of every format).
const OTHER_SPECIALS: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "<bos>",
    "<eos>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
    "<filename>",
    "<gh_stars>",
    "<reponame>",
    "<issue_start>",
    "<jupyter_start>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<\u{ff5c}begin\u{2581}of\u{2581}sentence\u{ff5c}>",
];

/// The FIM tokens of a tokenizer: which format, and the ids to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimTokens {
    /// The detected or chosen format.
    pub format: FimFormat,
    /// Id of the marker that starts the prefix.
    pub prefix: u32,
    /// Id of the marker that starts the suffix.
    pub suffix: u32,
    /// `None` for Codestral, whose prompt ends with the prefix.
    pub middle: Option<u32>,
    /// Beginning of sequence, for the formats that start with one (CodeLlama, DeepSeek-Coder,
    /// Codestral) when the tokenizer has it.
    pub bos: Option<u32>,
    /// Ids that end the completion: the format's stop tokens the tokenizer has, plus the
    /// model's end-of-text ids given to [`detect`] / [`resolve`].
    pub stop_ids: Vec<u32>,
    /// Special-token texts this tokenizer knows, with their ids: broken apart in user code.
    specials: Vec<(String, u32)>,
}

fn first_id(tokenizer: &Tokenizer, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| tokenizer.token_to_id(n))
}

fn tokens_for(tokenizer: &Tokenizer, format: FimFormat, eos: &[u32]) -> Option<FimTokens> {
    let spec = format.spec();
    let prefix = first_id(tokenizer, spec.prefix)?;
    let suffix = first_id(tokenizer, spec.suffix)?;
    let middle = if spec.middle.is_empty() {
        None
    } else {
        Some(first_id(tokenizer, spec.middle)?)
    };
    let bos = first_id(tokenizer, spec.bos);
    let mut stop_ids: Vec<u32> = Vec::new();
    for id in spec
        .stops
        .iter()
        .filter_map(|s| tokenizer.token_to_id(s))
        .chain(eos.iter().copied())
    {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    let mut specials: Vec<(String, u32)> = Vec::new();
    let mut seen = HashSet::new();
    for f in FimFormat::ALL {
        let s = f.spec();
        for name in s
            .prefix
            .iter()
            .chain(s.suffix)
            .chain(s.middle)
            .chain(s.stops)
            .chain(s.bos)
            .chain(OTHER_SPECIALS)
        {
            if let Some(id) = tokenizer.token_to_id(name)
                && seen.insert(*name)
            {
                specials.push(((*name).to_owned(), id));
            }
        }
    }
    Some(FimTokens {
        format,
        prefix,
        suffix,
        middle,
        bos,
        stop_ids,
        specials,
    })
}

/// Why a model cannot do fill-in-the-middle, for the UI and the CLI.
pub fn no_fim_reason() -> String {
    "this model's tokenizer has no fill-in-the-middle tokens (Qwen2.5-Coder <|fim_prefix|>, \
     StarCoder <fim_prefix>, CodeLlama <PRE>, DeepSeek-Coder <｜fim▁begin｜>, Codestral \
     [PREFIX]/[SUFFIX]); use a code model such as Qwen2.5-Coder for completions (actions \
     still work)"
        .to_owned()
}

/// Detects the FIM format from the tokenizer's special tokens; `eos` are the model's
/// end-of-text ids (added to the stop ids). Works for `tokenizer.json` tokenizers and for the
/// ones Studio rebuilds from GGUF metadata alike (both are [`Tokenizer`]s).
pub fn detect(tokenizer: &Tokenizer, eos: &[u32]) -> Result<FimTokens> {
    FimFormat::ALL
        .iter()
        .find_map(|f| tokens_for(tokenizer, *f, eos))
        .ok_or_else(|| Error::Tokenizer(no_fim_reason()))
}

/// Like [`detect`], but with a format chosen by a preset: fails when the tokenizer lacks that
/// format's tokens.
pub fn resolve(tokenizer: &Tokenizer, format: Option<FimFormat>, eos: &[u32]) -> Result<FimTokens> {
    match format {
        None => detect(tokenizer, eos),
        Some(f) => tokens_for(tokenizer, f, eos).ok_or_else(|| {
            Error::Tokenizer(format!(
                "the preset asks for the {f} fill-in-the-middle format, but this model's \
                 tokenizer lacks its tokens ({} …)",
                f.spec().prefix.join(" / ")
            ))
        }),
    }
}

impl FimTokens {
    /// Token ids of `text` as plain text: special markers inside it are broken apart (so they
    /// are tokenized as ordinary characters), and no FIM or stop id can come out.
    pub fn encode_plain(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        self.encode_inner(tokenizer, text, false)
    }

    fn encode_inner(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        continuation: bool,
    ) -> Result<Vec<u32>> {
        let mut cuts: Vec<usize> = Vec::new();
        for (s, _) in &self.specials {
            for s in [s.as_str(), s.trim_start_matches('\u{2581}')] {
                let first = s.chars().next().map_or(1, char::len_utf8);
                cuts.extend(text.match_indices(s).map(|(i, _)| i + first));
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ids = Vec::new();
        let mut start = 0;
        for (n, end) in cuts
            .into_iter()
            .chain(std::iter::once(text.len()))
            .enumerate()
        {
            let piece = &text[start..end];
            start = end;
            if piece.is_empty() {
                continue;
            }
            if n == 0 && !continuation {
                ids.extend(tokenizer.encode(piece)?);
            } else {
                ids.extend(encode_continuation(tokenizer, piece)?);
            }
        }
        let forbidden: HashSet<u32> = self.specials.iter().map(|(_, id)| *id).collect();
        ids.retain(|id| !forbidden.contains(id));
        Ok(ids)
    }
}

/// Encodes `text` as the continuation of earlier text: without the leading space
/// SentencePiece tokenizers add to the start of every encoding (CodeLlama's suffix). For
/// tokenizers that add none this is the plain encoding.
fn encode_continuation(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let anchor = tokenizer.encode("\n")?;
    let with = tokenizer.encode(&format!("\n{text}"))?;
    if !anchor.is_empty() && with.starts_with(&anchor) {
        Ok(with[anchor.len()..].to_vec())
    } else {
        tokenizer.encode(text)
    }
}

/// What was left out of one side of the prompt to fit the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cut {
    /// Bytes of text left out (at the far end from the cursor).
    pub bytes: usize,
    /// Whole or partial lines left out.
    pub lines: usize,
    /// The cut fell inside a line (a single line longer than the budget).
    pub mid_line: bool,
}

/// A FIM prompt ready to generate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimPrompt {
    /// The prompt's token ids: FIM markers, prefix and suffix (and beginning of sequence).
    pub tokens: Vec<u32>,
    /// The format the prompt is in.
    pub format: FimFormat,
    /// Tokens of the (kept) prefix and suffix.
    pub prefix_tokens: usize,
    /// Tokens of the (kept) suffix.
    pub suffix_tokens: usize,
    /// What was left out of the prefix (its start) and of the suffix (its end).
    pub prefix_cut: Option<Cut>,
    /// What was left out of the suffix (its end); `None` when all of it fits.
    pub suffix_cut: Option<Cut>,
}

impl FimPrompt {
    /// A sentence saying what was cut to fit the budget, if anything.
    pub fn cut_notice(&self) -> Option<String> {
        let side = |what: &str, c: &Option<Cut>| {
            c.map(|c| {
                format!(
                    "{} line{} ({} bytes) {what}",
                    c.lines,
                    if c.lines == 1 { "" } else { "s" },
                    c.bytes
                )
            })
        };
        let parts: Vec<String> = [
            side("before the cursor", &self.prefix_cut),
            side("after the cursor", &self.suffix_cut),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "The completion prompt was capped: left out {}.",
                parts.join(" and ")
            )
        })
    }
}

/// Share of the budget kept for the suffix when both sides are long (the rest is the prefix's).
pub const SUFFIX_SHARE_PERCENT: usize = 25;

/// More bytes than this per budget token are never tokenized: a very large file costs no more
/// than a window around the cursor.
const MAX_BYTES_PER_TOKEN: usize = 16;

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The last at most `max_bytes` of `text`, starting at a line start when the window has one.
fn tail_window(text: &str, max_bytes: usize) -> usize {
    if text.len() <= max_bytes {
        return 0;
    }
    let start = ceil_char(text, text.len() - max_bytes);
    match text[start..].find('\n') {
        Some(nl) if start + nl + 1 < text.len() => start + nl + 1,
        _ => start,
    }
}

/// The first at most `max_bytes` of `text`, ending at a line end when the window has one.
fn head_window(text: &str, max_bytes: usize) -> usize {
    if text.len() <= max_bytes {
        return text.len();
    }
    let end = floor_char(text, max_bytes);
    match text[..end].rfind('\n') {
        Some(nl) if nl > 0 => nl,
        _ => end,
    }
}

fn lines_in(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        s.matches('\n').count() + usize::from(!s.ends_with('\n'))
    }
}

/// Keeps the end of the prefix within `budget` tokens (line starts preferred).
fn fit_prefix(
    fim: &FimTokens,
    tok: &Tokenizer,
    text: &str,
    budget: usize,
) -> Result<(Vec<u32>, usize, bool)> {
    let all = fim.encode_plain(tok, text)?;
    if all.len() <= budget {
        return Ok((all, 0, false));
    }
    // Line starts after position 0, in order; more text → more tokens, so binary search for
    // the earliest start that fits.
    let starts: Vec<usize> = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .filter(|&i| i < text.len())
        .collect();
    let (mut lo, mut hi) = (0, starts.len());
    let mut best: Option<(usize, Vec<u32>)> = None;
    while lo < hi {
        let mid = usize::midpoint(lo, hi);
        let ids = fim.encode_plain(tok, &text[starts[mid]..])?;
        if ids.len() <= budget {
            best = Some((starts[mid], ids));
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if let Some((start, ids)) = best
        && !ids.is_empty()
    {
        return Ok((ids, start, false));
    }
    // The line at the cursor alone is over budget: keep its last `budget` tokens.
    let kept = all[all.len() - budget..].to_vec();
    let kept_len = tok.decode(&kept)?.len().min(text.len());
    Ok((kept, text.len() - kept_len, true))
}

/// Keeps the start of the suffix within `budget` tokens (line ends preferred).
fn fit_suffix(
    fim: &FimTokens,
    tok: &Tokenizer,
    text: &str,
    budget: usize,
    continuation: bool,
) -> Result<(Vec<u32>, usize, bool)> {
    let all = fim.encode_inner(tok, text, continuation)?;
    if all.len() <= budget {
        return Ok((all, text.len(), false));
    }
    let ends: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
    let (mut lo, mut hi) = (0, ends.len());
    let mut best: Option<(usize, Vec<u32>)> = None;
    while lo < hi {
        let mid = usize::midpoint(lo, hi);
        let ids = fim.encode_inner(tok, &text[..ends[mid]], continuation)?;
        if ids.len() <= budget {
            best = Some((ends[mid], ids));
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if let Some((end, ids)) = best {
        return Ok((ids, end, false));
    }
    let kept = all[..budget].to_vec();
    let kept_len = tok.decode(&kept)?.len().min(text.len());
    Ok((kept, kept_len, true))
}

/// Builds the FIM prompt for the text before (`prefix`) and after (`suffix`) the cursor within
/// `max_prompt_tokens` tokens (special tokens included).
///
/// The budget is split [`SUFFIX_SHARE_PERCENT`] for the suffix and the rest for the prefix;
/// whatever one side does not use goes to the other. The prefix is cut from its start and the
/// suffix from its end, at line boundaries when a whole line fits; [`FimPrompt::cut_notice`]
/// says what was left out.
pub fn build_prompt(
    tokenizer: &Tokenizer,
    fim: &FimTokens,
    prefix: &str,
    suffix: &str,
    max_prompt_tokens: usize,
) -> Result<FimPrompt> {
    let overhead = 2 + usize::from(fim.middle.is_some()) + usize::from(fim.bos.is_some());
    if max_prompt_tokens < overhead + 2 {
        return Err(Error::InvalidParameter(format!(
            "a fill-in-the-middle prompt needs a budget of at least {} tokens",
            overhead + 2
        )));
    }
    let avail = max_prompt_tokens - overhead;
    let max_bytes = avail.saturating_mul(MAX_BYTES_PER_TOKEN);

    let p_start = tail_window(prefix, max_bytes);
    let s_end = head_window(suffix, max_bytes);
    let p_text = &prefix[p_start..];
    let s_text = &suffix[..s_end];
    let suffix_continues = fim.format == FimFormat::CodeLlama;

    // First estimate each side's full size, then give the unused share to the other side.
    let p_all = fim.encode_plain(tokenizer, p_text)?.len();
    let s_all = fim.encode_inner(tokenizer, s_text, suffix_continues)?.len();
    let s_share = avail * SUFFIX_SHARE_PERCENT / 100;
    let p_share = avail - s_share;
    let (p_budget, s_budget) = if s_all <= s_share {
        (avail - s_all, s_all)
    } else if p_all <= p_share {
        (p_all, avail - p_all)
    } else {
        (p_share, s_share)
    };

    let (p_ids, p_drop, p_mid) = fit_prefix(fim, tokenizer, p_text, p_budget)?;
    let (s_ids, s_keep, s_mid) = fit_suffix(fim, tokenizer, s_text, s_budget, suffix_continues)?;

    let prefix_cut = (p_start + p_drop > 0).then(|| Cut {
        bytes: p_start + p_drop,
        lines: lines_in(&prefix[..floor_char(prefix, p_start + p_drop)]).max(1),
        mid_line: p_mid,
    });
    let dropped_suffix = suffix.len() - s_keep.min(s_text.len()).min(suffix.len());
    let suffix_cut = (dropped_suffix > 0).then(|| Cut {
        bytes: dropped_suffix,
        lines: lines_in(&suffix[ceil_char(suffix, suffix.len() - dropped_suffix)..]).max(1),
        mid_line: s_mid,
    });

    let mut tokens = Vec::with_capacity(p_ids.len() + s_ids.len() + overhead);
    tokens.extend(fim.bos);
    if fim.format == FimFormat::Codestral {
        tokens.push(fim.suffix);
        tokens.extend(&s_ids);
        tokens.push(fim.prefix);
        tokens.extend(&p_ids);
    } else {
        tokens.push(fim.prefix);
        tokens.extend(&p_ids);
        tokens.push(fim.suffix);
        tokens.extend(&s_ids);
        tokens.extend(fim.middle);
    }
    Ok(FimPrompt {
        tokens,
        format: fim.format,
        prefix_tokens: p_ids.len(),
        suffix_tokens: s_ids.len(),
        prefix_cut,
        suffix_cut,
    })
}
