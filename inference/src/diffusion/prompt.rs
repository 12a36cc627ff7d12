//! Prompts as SD users write them: emphasis syntax and prompts longer than CLIP's 75 tokens.
//!
//! - `(word)` multiplies attention by 1.1, `((word))` by 1.21, `(word:1.3)` sets 1.3,
//!   `[word]` divides by 1.1; `\(` `\)` `\[` `\]` are literal brackets; unbalanced brackets apply
//!   to the rest of the prompt (as in the most used SD web UI).
//! - `BREAK` (upper case, as a word) starts a new 75-token chunk.
//! - Prompts longer than 75 tokens are split into chunks of 75, each encoded on its own
//!   (`<bos> 75 tokens <eos>` padded to 77) and the hidden states concatenated.
//! - Weighted hidden states are rescaled to keep their original mean.

use std::io::BufReader;
use std::path::Path;

use instant_clip_tokenizer::Tokenizer;

use crate::error::{Error, Result};

/// Largest `vocab.json` or `merges.txt` read (OpenAI's are 1.6 MB and 0.5 MB).
const MAX_TOKENIZER_FILE: u64 = 64 << 20;

/// A tokenizer file's text, its size checked before it is read.
fn read_small_text(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_TOKENIZER_FILE {
        return Err(Error::Tokenizer(format!(
            "{}: {len} bytes is too large for a CLIP tokenizer file (at most {} MiB)",
            path.display(),
            MAX_TOKENIZER_FILE >> 20
        )));
    }
    std::fs::read_to_string(path).map_err(io)
}

/// CLIP's word split (transformers' `CLIPTokenizer`): contractions, letter runs, single
/// digits, and runs of other non-space characters.
const CLIP_WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Tokens per chunk between `<bos>` and `<eos>`.
pub const CHUNK_TOKENS: usize = 75;

/// A piece of prompt text with its attention weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighted {
    /// The text, with the emphasis brackets and weights removed.
    pub text: String,
    /// The attention multiplier (1 = plain); `-1` marks a `BREAK`.
    pub weight: f32,
}

/// Splits a prompt into weighted pieces; `BREAK` becomes a piece with weight `-1` and text
/// `"BREAK"`.
pub fn parse_emphasis(prompt: &str) -> Vec<Weighted> {
    let mut out: Vec<Weighted> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let mut text = String::new();
    let chars: Vec<char> = prompt.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() => {
                text.push(chars[i + 1]);
                i += 2;
                continue;
            }
            '(' => {
                flush(&mut text, &mut out);
                round.push(out.len());
            }
            '[' => {
                flush(&mut text, &mut out);
                square.push(out.len());
            }
            ':' if !round.is_empty() => {
                // `:number)` closes a round bracket with an explicit weight.
                let rest: String = chars[i + 1..].iter().collect();
                let trimmed = rest.trim_start();
                let num_len = trimmed
                    .find(|ch: char| !(ch.is_ascii_digit() || ch == '.' || ch == '+' || ch == '-'))
                    .unwrap_or(trimmed.len());
                let after = trimmed[num_len..].trim_start();
                match (trimmed[..num_len].parse::<f32>(), after.starts_with(')')) {
                    (Ok(weight), true) => {
                        flush(&mut text, &mut out);
                        if let Some(start) = round.pop() {
                            multiply(&mut out, start, weight);
                        }
                        let consumed = rest.len() - after.len() + 1;
                        i += 1 + rest[..consumed].chars().count();
                        continue;
                    }
                    _ => text.push(c),
                }
            }
            ')' if !round.is_empty() => {
                flush(&mut text, &mut out);
                if let Some(start) = round.pop() {
                    multiply(&mut out, start, 1.1);
                }
            }
            ']' if !square.is_empty() => {
                flush(&mut text, &mut out);
                if let Some(start) = square.pop() {
                    multiply(&mut out, start, 1.0 / 1.1);
                }
            }
            _ => text.push(c),
        }
        i += 1;
    }
    flush(&mut text, &mut out);
    for start in round {
        multiply(&mut out, start, 1.1);
    }
    for start in square {
        multiply(&mut out, start, 1.0 / 1.1);
    }
    // Merge neighbours of equal weight.
    let mut merged: Vec<Weighted> = Vec::with_capacity(out.len());
    for w in out {
        match merged.last_mut() {
            Some(last) if last.weight >= 0.0 && (last.weight - w.weight).abs() < f32::EPSILON => {
                last.text.push_str(&w.text);
            }
            _ => merged.push(w),
        }
    }
    merged
}

fn flush(text: &mut String, out: &mut Vec<Weighted>) {
    if text.is_empty() {
        return;
    }
    for (i, part) in split_break(text).into_iter().enumerate() {
        if i > 0 {
            out.push(Weighted {
                text: "BREAK".into(),
                weight: -1.0,
            });
        }
        if !part.is_empty() {
            out.push(Weighted {
                text: part,
                weight: 1.0,
            });
        }
    }
    text.clear();
}
fn multiply(out: &mut [Weighted], from: usize, by: f32) {
    for w in out.iter_mut().skip(from) {
        if w.weight >= 0.0 {
            w.weight *= by;
        }
    }
}

fn split_break(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut words = text.split(' ').peekable();
    while let Some(word) = words.next() {
        if word == "BREAK" {
            parts.push(String::new());
        } else {
            let last = parts.last_mut().expect("parts is never empty");
            last.push_str(word);
            if words.peek().is_some() {
                last.push(' ');
            }
        }
    }
    parts
}

/// CLIP's BPE tokenizer and the ids SD needs.
pub struct ClipTokenizer {
    inner: Inner,
    /// What fills a chunk after `<eos>`: `<eos>` itself for SD 1.x, `!` (id 0) for OpenCLIP.
    pub pad: u32,
}

/// OpenAI's vocabulary (fast, bundled), or a folder's own `vocab.json` and `merges.txt`.
enum Inner {
    OpenAi(Tokenizer),
    Folder {
        bpe: Box<tokenizers::Tokenizer>,
        bos: u32,
        eos: u32,
    },
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("pad", &self.pad)
            .finish_non_exhaustive()
    }
}

/// How chunks are padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad with `<eos>` (OpenAI CLIP tokenizer, SD 1.x and SDXL's first encoder).
    Eos,
    /// Pad with `!` (OpenCLIP, SD 2.x and SDXL's second encoder).
    Exclamation,
}

impl ClipTokenizer {
    /// The OpenAI vocabulary bundled with Studio (what every SD text encoder was trained with).
    pub fn bundled(padding: Padding) -> Self {
        Self::with(Inner::OpenAi(Tokenizer::new()), padding)
    }

    /// A diffusers `tokenizer/` folder's own vocabulary (`vocab.json` and `merges.txt`, any
    /// size), tokenized as transformers' `CLIPTokenizer` does: NFC, runs of whitespace as one
    /// space, lower case, CLIP's word split, byte-level BPE with `</w>` ending each word, and
    /// bytes outside the vocabulary as `<|endoftext|>`. Every id must be below `vocab_size`,
    /// the text encoder's embedding rows.
    pub fn from_folder(dir: &Path, vocab_size: usize, padding: Padding) -> Result<Self> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("{}: {what}: {e}", dir.display()))
        };
        let text = read_small_text(&dir.join("vocab.json"))?;
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| bad("vocab.json", &e))?;
        let id = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: vocab.json has no `{token}`, which CLIP needs",
                    dir.display()
                ))
            })
        };
        let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        if let Some(max) = vocab.values().max()
            && *max as usize >= vocab_size
        {
            return Err(Error::Tokenizer(format!(
                "{}: vocab.json has ids up to {max}, but the text encoder embeds {vocab_size}",
                dir.display()
            )));
        }
        let merges_text = read_small_text(&dir.join("merges.txt"))?;
        let merges: Vec<(String, String)> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| bad("merges.txt", &format!("`{l}` is not a pair")))
            })
            .collect::<Result<_>>()?;
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_WORDS}, "behavior": "Removed",
                 "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                      "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let bpe = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&json.to_string())
            .map_err(|e| bad("the tokenizer", &e))?;
        Ok(Self::with(
            Inner::Folder {
                bpe: Box::new(bpe),
                bos,
                eos,
            },
            padding,
        ))
    }

    /// Reads a `merges.txt` alone with `vocab_size` ids: the 512 byte tokens, the merges in
    /// order, `<|startoftext|>` and `<|endoftext|>` (the OpenAI layout, without `vocab.json`).
    pub fn from_merges(path: &Path, vocab_size: usize, padding: Padding) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let size = u16::try_from(vocab_size)
            .ok()
            .filter(|&s| s > 514)
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: a CLIP vocabulary of {vocab_size} ids is not supported",
                    path.display()
                ))
            })?;
        let inner = Tokenizer::with_vocabulary(BufReader::new(file), size)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::with(Inner::OpenAi(inner), padding))
    }

    fn with(inner: Inner, padding: Padding) -> Self {
        let mut tokenizer = Self { inner, pad: 0 };
        tokenizer.pad = match padding {
            Padding::Eos => tokenizer.eos(),
            Padding::Exclamation => 0,
        };
        tokenizer
    }

    /// The id of `<|startoftext|>`, which opens every chunk.
    pub fn bos(&self) -> u32 {
        match &self.inner {
            Inner::OpenAi(t) => u32::from(t.start_of_text().to_u16()),
            Inner::Folder { bos, .. } => *bos,
        }
    }

    /// The id of `<|endoftext|>`, which closes every chunk's text (and pads it with
    /// [`Padding::Eos`]).
    pub fn eos(&self) -> u32 {
        match &self.inner {
            Inner::OpenAi(t) => u32::from(t.end_of_text().to_u16()),
            Inner::Folder { eos, .. } => *eos,
        }
    }

    /// Token ids of `text` without `<bos>`/`<eos>`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.inner {
            Inner::OpenAi(t) => {
                let mut out = Vec::new();
                t.encode(text, &mut out);
                out.into_iter().map(|t| u32::from(t.to_u16())).collect()
            }
            // The normalizer and pre-tokenizer take any text; an error is impossible short of
            // a bug, and leaves the prompt empty rather than failing a generation.
            Inner::Folder { bpe, .. } => bpe
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default(),
        }
    }

    /// The prompt as 77-token chunks with per-token weights, at least `min_chunks` of them
    /// (so a negative prompt can match the positive one's length).
    pub fn chunks(&self, prompt: &str, min_chunks: usize) -> Vec<Chunk> {
        self.chunks_with_words(prompt, min_chunks, &[])
    }

    /// [`Self::chunks`], where each whole-word occurrence of a `words` entry's name becomes
    /// its ids (textual-inversion embeddings, whose ids lie beyond the vocabulary).
    pub fn chunks_with_words(
        &self,
        prompt: &str,
        min_chunks: usize,
        words: &[(String, Vec<u32>)],
    ) -> Vec<Chunk> {
        let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new()];
        for piece in parse_emphasis(prompt) {
            if piece.weight < 0.0 {
                groups.push(Vec::new());
                continue;
            }
            let group = groups.last_mut().expect("groups is never empty");
            for (segment, ids) in split_words(&piece.text, words) {
                group.extend(self.encode(segment).into_iter().map(|t| (t, piece.weight)));
                if let Some(ids) = ids {
                    group.extend(ids.iter().map(|&t| (t, piece.weight)));
                }
            }
        }
        let mut chunks: Vec<Chunk> = Vec::new();
        for group in groups {
            if group.is_empty() && !chunks.is_empty() {
                continue;
            }
            if group.is_empty() {
                chunks.push(self.chunk(&[]));
            }
            for part in group.chunks(CHUNK_TOKENS) {
                chunks.push(self.chunk(part));
            }
        }
        while chunks.len() < min_chunks.max(1) {
            chunks.push(self.chunk(&[]));
        }
        chunks
    }

    fn chunk(&self, tokens: &[(u32, f32)]) -> Chunk {
        let mut ids = vec![self.bos()];
        let mut weights = vec![1.0];
        for &(t, w) in tokens {
            ids.push(t);
            weights.push(w);
        }
        ids.push(self.eos());
        weights.push(1.0);
        while ids.len() < CHUNK_TOKENS + 2 {
            ids.push(self.pad);
            weights.push(1.0);
        }
        Chunk { ids, weights }
    }
}

/// `text` cut at whole-word occurrences of `words`' names: each text segment, followed by the
/// ids of the word that ends it (none for the last segment).
fn split_words<'t>(
    text: &'t str,
    words: &'t [(String, Vec<u32>)],
) -> Vec<(&'t str, Option<&'t [u32]>)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        let boundary_before = text[..i].chars().next_back().is_none_or(|c| !is_word(c));
        let found = boundary_before
            .then(|| {
                words.iter().find(|(name, _)| {
                    !name.is_empty()
                        && text[i..].starts_with(name.as_str())
                        && text[i + name.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !is_word(c))
                })
            })
            .flatten();
        if let Some((name, ids)) = found {
            out.push((&text[start..i], Some(ids.as_slice())));
            i += name.len();
            start = i;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push((&text[start..], None));
    out
}

/// One 77-token chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// `<bos>`, up to 75 prompt tokens, `<eos>`, then padding: always 77 ids.
    pub ids: Vec<u32>,
    /// The emphasis weight of each id; 1 for `<bos>`, `<eos>` and padding.
    pub weights: Vec<f32>,
}

impl Chunk {
    /// Whether any token is weighted other than 1.
    pub fn is_weighted(&self) -> bool {
        self.weights.iter().any(|&w| (w - 1.0).abs() > 1e-6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str, weight: f32) -> Weighted {
        Weighted {
            text: text.into(),
            weight,
        }
    }

    fn close(a: &[Weighted], b: &[Weighted]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.text == y.text && (x.weight - y.weight).abs() < 1e-4)
    }

    #[test]
    fn emphasis_matches_the_web_ui() {
        let cases: Vec<(&str, Vec<Weighted>)> = vec![
            ("normal text", vec![w("normal text", 1.0)]),
            (
                "an (important) word",
                vec![w("an ", 1.0), w("important", 1.1), w(" word", 1.0)],
            ),
            ("(unbalanced", vec![w("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![w("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![w("unnecessaryparens", 1.1)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    w("a ", 1.0),
                    w("house", 1.5730),
                    w(" ", 1.1),
                    w("on", 1.0),
                    w(" a ", 1.1),
                    w("hill", 0.55),
                    w(", sun, ", 1.1),
                    w("sky", 1.4641),
                    w(".", 1.1),
                ],
            ),
            ("[[x]]", vec![w("x", 1.0 / 1.21)]),
            (
                "a BREAK b",
                vec![w("a ", 1.0), w("BREAK", -1.0), w("b", 1.0)],
            ),
            ("time: 12:00", vec![w("time: 12:00", 1.0)]),
        ];
        for (prompt, want) in cases {
            let got = parse_emphasis(prompt);
            assert!(close(&got, &want), "{prompt}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn chunks_pad_and_split() {
        let t = ClipTokenizer::bundled(Padding::Eos);
        let c = t.chunks("a photo of a cat", 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids.len(), 77);
        assert_eq!(c[0].ids[..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(c[0].ids[76], 49407);
        let long = "cat ".repeat(100);
        let c = t.chunks(&long, 1);
        assert_eq!(c.len(), 2);
        let c = t.chunks("", 3);
        assert_eq!(c.len(), 3);
        let t2 = ClipTokenizer::bundled(Padding::Exclamation);
        assert_eq!(t2.chunks("cat", 1)[0].ids[3], 0);
        let weighted = t.chunks("a (cat:1.5)", 1);
        assert!(weighted[0].is_weighted());
        assert!((weighted[0].weights[2] - 1.5).abs() < 1e-6);
        let split = t.chunks("a BREAK b", 1);
        assert_eq!(split.len(), 2);
    }
}
