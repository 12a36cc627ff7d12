//! Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`), as `tokenizers::Tokenizer`s.
//!
//! Two tokenizer models cover the families Studio loads from GGUF:
//!
//! - `gpt2`: byte-level BPE (Llama 3, Qwen2/2.5/3, SmolLM2, Phi-4). Vocabulary and merges come
//!   from the file; the pre-tokenizer regex is chosen by `tokenizer.ggml.pre` the way llama.cpp
//!   does (`llama-bpe` → the Llama 3 split, `qwen2` → Qwen's, `smollm` → single digits then
//!   GPT-2's, anything else → GPT-2's), as `Split` pre-tokenizers followed by a byte-level
//!   mapping without its own regex.
//! - `llama`: SentencePiece BPE (Llama 2, TinyLlama, Mistral v0.1–0.3, Gemma). Merges are
//!   derived from the vocabulary and its scores the way transformers' `SentencePieceExtractor`
//!   does; `<0xNN>` byte tokens are the fallback for characters outside the vocabulary; spaces
//!   become `▁`, with a `▁` prepended unless `tokenizer.ggml.add_space_prefix` is false (Gemma).
//!
//! Control and user-defined tokens (`token_type` 3 and 4, and the unknown token) are added as
//! special tokens, so `<|im_end|>` or `<end_of_turn>` in a prompt encode as one token.
//! Nothing adds a BOS token when encoding: Studio's prompt templates write it themselves.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NFC, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::error::{Error, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    /// An ordinary piece of text.
    pub const NORMAL: i32 = 1;
    /// The unknown token, standing for text the vocabulary cannot spell.
    pub const UNKNOWN: i32 = 2;
    /// A control token such as BOS, EOS or `<|im_end|>`; added as a special token.
    pub const CONTROL: i32 = 3;
    /// A token the model's authors added; added as a special token.
    pub const USER_DEFINED: i32 = 4;
    /// A placeholder slot the model does not use.
    pub const UNUSED: i32 = 5;
    /// A `<0xNN>` byte token, SentencePiece's fallback for characters outside the
    /// vocabulary.
    pub const BYTE: i32 = 6;
}

/// The SentencePiece word-boundary marker.
const SPIECE: &str = "\u{2581}";

/// GPT-2's split (also what Hugging Face's `ByteLevel` pre-tokenizer uses by itself).
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (numbers in groups of up to three digits).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (single digits).
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split (Mistral Nemo and later).
pub const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split (Phi-4, Llama 4).
pub const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary splits text before merging, from `tokenizer.ggml.pre`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // independent flags from llama.cpp's table
pub struct PreTokenization {
    /// Regexes applied one after the other (each piece of the previous split is split again).
    pub regexes: Vec<&'static str>,
    /// Whole pieces found in the vocabulary are taken as one token without merging (Llama 3).
    pub ignore_merges: bool,
    /// llama.cpp's default for adding BOS when the file does not say.
    pub add_bos_default: bool,
    /// Unicode NFC normalization (Qwen's own tokenizer.json has it).
    pub nfc: bool,
    /// Set when `pre` is not one Studio knows; GPT-2's split is used then.
    pub unknown: bool,
}

/// The pre-tokenization llama.cpp uses for a `tokenizer.ggml.pre` value (`None`: absent).
pub fn pre_tokenization(pre: Option<&str>) -> PreTokenization {
    let mut p = PreTokenization {
        regexes: vec![GPT2_REGEX],
        ignore_merges: false,
        add_bos_default: false,
        nfc: false,
        unknown: false,
    };
    match pre.unwrap_or("default") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => {
            p.regexes = vec![LLAMA3_REGEX];
            p.ignore_merges = true;
            p.add_bos_default = true;
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" | "stablelm2" | "hunyuan" => {
            p.regexes = vec![QWEN2_REGEX];
            p.nfc = true;
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            p.regexes = vec![r"\p{N}", GPT2_REGEX];
        }
        "tekken" => {
            p.regexes = vec![TEKKEN_REGEX];
            p.ignore_merges = true;
            p.add_bos_default = true;
        }
        "gpt-4o" | "llama4" => p.regexes = vec![GPT4O_REGEX],
        "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4"
        | "trillion" => {}
        _ => p.unknown = true,
    }
    p
}

/// The byte-level pre-tokenizer for a `tokenizer.ggml.pre` value: `Split`s then `ByteLevel`.
pub fn byte_level_pre_tokenizer(pre: &PreTokenization) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in &pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        steps.push(split.into());
    }
    steps.push(
        ByteLevel::default()
            .add_prefix_space(false)
            .use_regex(false)
            .into(),
    );
    Ok(PreTokenizerSequence::new(steps).into())
}

/// How `pre` splits `text` before merging: the pieces, byte-level mapped (`Ġ` for a space).
pub fn byte_level_pre_tokenization_splits(
    pre: &PreTokenization,
    text: &str,
) -> Result<Vec<String>> {
    let pt = byte_level_pre_tokenizer(pre)?;
    let mut s = tokenizers::PreTokenizedString::from(text);
    pt.pre_tokenize(&mut s)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(s.get_splits(
        tokenizers::OffsetReferential::Original,
        tokenizers::OffsetType::Byte,
    )
    .into_iter()
    .map(|(piece, _, _)| piece.to_owned())
    .collect())
}

/// End-of-turn tokens llama.cpp recognizes by their text (when they are control tokens).
const END_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|return|>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
];

/// Everything about the vocabulary a GGUF file stores.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer split a `gpt2` tokenizer uses.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: each token's text, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one [`token_type`] per token (all normal when absent).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, one per token, or empty when absent; SentencePiece merges
    /// are ranked by them.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` (`gpt2`): `"a b"` pairs in priority order, or empty.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`, checked to lie in the vocabulary.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, checked to lie in the vocabulary.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`, checked to lie in the vocabulary.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`, when the file says; see [`GgufVocab::add_bos`].
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`: whether SentencePiece prepends `▁` (when absent,
    /// it does).
    pub add_space_prefix: Option<bool>,
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(x) => Some(u32::from(*x)),
        Value::U16(x) => Some(u32::from(*x)),
        Value::U32(x) => Some(*x),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I8(x) => u32::try_from(*x).ok(),
        Value::I16(x) => u32::try_from(*x).ok(),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

fn as_i32(v: &Value) -> Option<i32> {
    match v {
        Value::U8(x) => Some(i32::from(*x)),
        Value::I8(x) => Some(i32::from(*x)),
        Value::U16(x) => Some(i32::from(*x)),
        Value::I16(x) => Some(i32::from(*x)),
        Value::U32(x) => i32::try_from(*x).ok(),
        Value::I32(x) => Some(*x),
        Value::I64(x) => i32::try_from(*x).ok(),
        Value::U64(x) => i32::try_from(*x).ok(),
        _ => None,
    }
}

fn as_f32(v: &Value) -> Option<f32> {
    match v {
        Value::F32(x) => Some(*x),
        Value::F64(x) => Some(*x as f32),
        other => as_i32(other).map(|x| x as f32),
    }
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    let Value::Array(items) = v else {
        return Err(Error::Tokenizer(format!("`{key}` is not an array")));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::Tokenizer(format!(
                "`{key}` holds a non-string value"
            ))),
        })
        .collect()
}

fn numbers<T>(v: &Value, key: &str, conv: fn(&Value) -> Option<T>) -> Result<Vec<T>> {
    let Value::Array(items) = v else {
        return Err(Error::Tokenizer(format!("`{key}` is not an array")));
    };
    items
        .iter()
        .map(|item| {
            conv(item).ok_or_else(|| Error::Tokenizer(format!("`{key}` holds a non-number")))
        })
        .collect()
}

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` keys; fails when the vocabulary is missing or malformed.
    #[allow(clippy::implicit_hasher)] // GGUF metadata as candle reads it
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let text = |key: &str| match md.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let id = |key: &str| md.get(key).and_then(as_u32);
        let flag = |key: &str| match md.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => as_u32(other).map(|n| n != 0),
            None => None,
        };
        let model = text("tokenizer.ggml.model").ok_or_else(|| {
            Error::Tokenizer(
                "the GGUF file has no tokenizer (`tokenizer.ggml.model` is missing)".to_owned(),
            )
        })?;
        let tokens = match md.get("tokenizer.ggml.tokens") {
            Some(v) => strings(v, "tokenizer.ggml.tokens")?,
            None => {
                return Err(Error::Tokenizer(
                    "the GGUF file has no vocabulary (`tokenizer.ggml.tokens` is missing)"
                        .to_owned(),
                ));
            }
        };
        if tokens.is_empty() {
            return Err(Error::Tokenizer(
                "the GGUF file's vocabulary is empty".to_owned(),
            ));
        }
        let n = tokens.len();
        let token_types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => numbers(v, "tokenizer.ggml.token_type", as_i32)?,
            None => vec![token_type::NORMAL; n],
        };
        let scores = match md.get("tokenizer.ggml.scores") {
            Some(v) => numbers(v, "tokenizer.ggml.scores", as_f32)?,
            None => Vec::new(),
        };
        let merges = match md.get("tokenizer.ggml.merges") {
            Some(v) => strings(v, "tokenizer.ggml.merges")?,
            None => Vec::new(),
        };
        if token_types.len() != n || (!scores.is_empty() && scores.len() != n) {
            return Err(Error::Tokenizer(format!(
                "the GGUF vocabulary has {n} tokens but {} token types and {} scores",
                token_types.len(),
                scores.len()
            )));
        }
        let check = |key: &str| -> Result<Option<u32>> {
            match id(key) {
                Some(i) if i as usize >= n => Err(Error::Tokenizer(format!(
                    "`{key}` is {i}, past the end of the {n}-token vocabulary"
                ))),
                other => Ok(other),
            }
        };
        Ok(Self {
            pre: text("tokenizer.ggml.pre"),
            bos_token_id: check("tokenizer.ggml.bos_token_id")?,
            eos_token_id: check("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: check("tokenizer.ggml.unknown_token_id")?,
            add_bos_token: flag("tokenizer.ggml.add_bos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            model,
            tokens,
            token_types,
            scores,
            merges,
        })
    }

    /// Whether the model expects a BOS token at the start of a prompt: the file's
    /// `add_bos_token`, else llama.cpp's default for the tokenizer.
    pub fn add_bos(&self) -> bool {
        self.add_bos_token
            .unwrap_or_else(|| match self.model.as_str() {
                "llama" => true,
                _ => pre_tokenization(self.pre.as_deref()).add_bos_default,
            })
    }

    fn token_type(&self, id: usize) -> i32 {
        self.token_types
            .get(id)
            .copied()
            .unwrap_or(token_type::NORMAL)
    }

    /// Token ids whose text is unique, in id order (a duplicate keeps its first id).
    fn vocab(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (i, t) in self.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        vocab
    }

    /// Control, user-defined and unknown tokens, to be matched whole in input text.
    fn added_tokens(&self) -> Vec<AddedToken> {
        self.tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !t.is_empty()
                    && matches!(
                        self.token_type(*i),
                        token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                    )
            })
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect()
    }

    /// Builds the tokenizer. `warnings` receives what was approximated.
    pub fn build(&self, warnings: &mut Vec<String>) -> Result<tokenizers::Tokenizer> {
        let mut tokenizer = match self.model.as_str() {
            "gpt2" => self.build_byte_level(warnings)?,
            "llama" => self.build_sentencepiece()?,
            other => {
                return Err(Error::Tokenizer(format!(
                    "the GGUF file uses a `{other}` tokenizer; Studio reads `gpt2` (byte-level \
                     BPE) and `llama` (SentencePiece) tokenizers"
                )));
            }
        };
        tokenizer
            .add_special_tokens(self.added_tokens())
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(tokenizer)
    }

    fn build_byte_level(&self, warnings: &mut Vec<String>) -> Result<tokenizers::Tokenizer> {
        let pre = pre_tokenization(self.pre.as_deref());
        if pre.unknown {
            warnings.push(format!(
                "unknown pre-tokenizer `{}`: splitting text the way GPT-2 does, which may \
                 tokenize some text differently from the model's own tokenizer",
                self.pre.as_deref().unwrap_or_default()
            ));
        }
        let vocab = self.vocab();
        let mut merges = Vec::with_capacity(self.merges.len());
        let mut skipped = 0usize;
        for m in &self.merges {
            // llama.cpp splits at the first space after the first character.
            let split = m
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == ' ')
                .map(|(i, _)| (&m[..i], &m[i + 1..]));
            match split {
                Some((a, b))
                    if vocab.contains_key(a)
                        && vocab.contains_key(b)
                        && vocab.contains_key(&format!("{a}{b}")) =>
                {
                    merges.push((a.to_owned(), b.to_owned()));
                }
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "GGUF tokenizer: skipped {skipped} merges naming tokens not in the vocabulary"
            );
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre.ignore_merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("byte-level BPE: {e}")))?;
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        if pre.nfc {
            tokenizer
                .with_normalizer(Some(NormalizerWrapper::from(NFC)))
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(&pre)?));
        tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
        Ok(tokenizer)
    }

    /// SentencePiece BPE as transformers converts it: merges from every split of every
    /// piece into two pieces of the vocabulary, ranked by the merged piece's score.
    fn build_sentencepiece(&self) -> Result<tokenizers::Tokenizer> {
        let vocab = self.vocab();
        let score =
            |id: usize| -> f32 { self.scores.get(id).copied().unwrap_or_else(|| -(id as f32)) };
        let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
        for (id, piece) in self.tokens.iter().enumerate() {
            // Only pieces that are actually looked up by this id; byte and control tokens
            // are never the result of a merge.
            if vocab.get(piece) != Some(&(id as u32))
                || matches!(
                    self.token_type(id),
                    token_type::BYTE | token_type::CONTROL | token_type::UNKNOWN
                )
            {
                continue;
            }
            let mut local = Vec::new();
            for (split, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(split);
                if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                    local.push((il, ir, l, r));
                }
            }
            local.sort_by_key(|&(il, ir, _, _)| (il, ir));
            let s = score(id);
            merges.extend(
                local
                    .into_iter()
                    .map(|(il, ir, l, r)| (s, il, ir, l.to_owned(), r.to_owned())),
            );
        }
        // Stable: equal scores keep vocabulary order.
        merges.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        let merges: Vec<(String, String)> = merges.into_iter().map(|m| (m.3, m.4)).collect();

        let unk = self
            .unknown_token_id
            .map(|i| i as usize)
            .or_else(|| (0..self.tokens.len()).find(|&i| self.token_type(i) == token_type::UNKNOWN))
            .and_then(|i| self.tokens.get(i).cloned());
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder
            .build()
            .map_err(|e| Error::Tokenizer(format!("SentencePiece BPE: {e}")))?;

        let add_prefix = self.add_space_prefix.unwrap_or(true);
        let replace = |from: &str, to: &str| {
            Replace::new(from, to).map_err(|e| Error::Tokenizer(e.to_string()))
        };
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if add_prefix {
            normalizers.push(Prepend::new(SPIECE.to_owned()).into());
        }
        normalizers.push(replace(" ", SPIECE)?.into());
        let mut decoders: Vec<DecoderWrapper> = vec![
            replace(SPIECE, " ")?.into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ];
        if add_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::from(NormalizerSequence::new(
                normalizers,
            ))))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer.with_decoder(Some(DecoderWrapper::from(DecoderSequence::new(decoders))));
        Ok(tokenizer)
    }

    /// Token ids that end a turn: `eos_token_id`, `eot_token_id`, `eom_token_id`, then the
    /// end-of-turn tokens llama.cpp recognizes by their text when they are control tokens.
    #[allow(clippy::implicit_hasher)] // GGUF metadata as candle reads it
    pub fn end_of_generation_ids(&self, md: &HashMap<String, Value>) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::new();
        let mut push = |id: u32| {
            if (id as usize) < self.tokens.len() && !ids.contains(&id) {
                ids.push(id);
            }
        };
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = md.get(key).and_then(as_u32) {
                push(id);
            }
        }
        let wanted: HashSet<&str> = END_TOKENS.iter().copied().collect();
        for (i, t) in self.tokens.iter().enumerate() {
            if wanted.contains(t.as_str())
                && matches!(
                    self.token_type(i),
                    token_type::CONTROL | token_type::USER_DEFINED
                )
            {
                push(i as u32);
            }
        }
        ids
    }
}

/// Builds the tokenizer a GGUF file describes (see the module docs).
#[allow(clippy::implicit_hasher)] // GGUF metadata as candle reads it
pub fn from_metadata(md: &HashMap<String, Value>) -> Result<crate::llm::text::Tokenizer> {
    let vocab = GgufVocab::from_metadata(md)?;
    let mut warnings = Vec::new();
    let inner = vocab.build(&mut warnings)?;
    for w in warnings {
        log::warn!("GGUF tokenizer: {w}");
    }
    Ok(crate::llm::text::Tokenizer::from_inner(inner))
}
