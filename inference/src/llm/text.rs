//! Tokenizers and streaming text: turning generated token ids into valid UTF-8 pieces as they
//! arrive, and holding back text that may turn out to be the start of a stop string.

use std::path::Path;

use crate::error::{Error, Result};

/// A Hugging Face `tokenizer.json` tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The vocabulary as a byte trie for grammars, built on first use, shared by clones.
    vocab_trie: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<crate::llm::grammar::VocabTrie>>>,
}

impl Tokenizer {
    /// Reads a `tokenizer.json`; a missing file is an [`Error::Tokenizer`] that says so.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} is missing: the model folder needs its tokenizer.json",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::from_inner(inner))
    }

    /// Wraps a tokenizer built in memory (such as one rebuilt from GGUF metadata).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            vocab_trie: std::sync::Arc::default(),
        }
    }

    /// Where [`crate::llm::grammar::vocab_trie`] keeps its trie.
    pub(crate) fn vocab_trie_cell(
        &self,
    ) -> &std::sync::OnceLock<std::sync::Arc<crate::llm::grammar::VocabTrie>> {
        &self.vocab_trie
    }

    /// Token ids of `text`, without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of the token spelled `token` exactly, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of special added tokens (end of text, chat markers, …).
    pub fn special_ids(&self) -> std::collections::HashSet<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect()
    }

    /// The bytes token `id` stands for, as OpenAI's `logprobs` report them: its decoded text,
    /// or where a token is part of a character, its raw byte (SentencePiece's `<0xNN>`, or
    /// byte-level BPE's byte alphabet).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let text = self.decode(&[id]).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            return text.into_bytes();
        }
        let Some(piece) = self.inner.id_to_token(id) else {
            return text.into_bytes();
        };
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|r| r.strip_suffix('>'))
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return vec![b];
        }
        piece
            .chars()
            .map(byte_level_byte)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.into_bytes())
    }
}

/// The byte a character of GPT-2's byte-level alphabet stands for: printable Latin-1 bytes are
/// themselves, the other 68 are mapped from U+0100 upwards in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let code = u32::from(c);
    if code < 0x100 {
        return (printable(code)).then(|| u8::try_from(code).ok()).flatten();
    }
    let k = code - 0x100;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(usize::try_from(k).ok()?)
        .and_then(|b| u8::try_from(b).ok())
}

/// Decodes a growing list of token ids into text pieces that are always valid, complete UTF-8.
///
/// Byte-level BPE tokens can split a multi-byte character; such bytes are held back until the
/// character is complete (decoding them alone would give U+FFFD).
pub struct TokenStream {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TokenStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.tokens.push(id);
        let before = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        // A UTF-8 character spans at most 4 bytes (so at most 4 byte tokens): past that, the
        // bytes are not a character in progress but invalid, and are shown as U+FFFD.
        let incomplete = now.ends_with('\u{FFFD}') && self.tokens.len() - self.read_offset < 4;
        if now.len() > before.len() && !incomplete {
            let piece = now.get(before.len()..).unwrap_or_default().to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end), lossily.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let before = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}

impl Default for TokenStream {
    fn default() -> Self {
        Self::new()
    }
}

/// Watches streamed text for stop strings.
///
/// Text that could be the beginning of a stop string is held back until it is clear either way,
/// so a stop string never reaches the user, not even in part.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to show now; keep generating.
    Continue(String),
    /// A stop string was reached: the text before it; stop generating.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a streamed piece and returns the text now safe to show, or the text before a
    /// stop string once one is complete.
    pub fn push(&mut self, piece: &str) -> StopCheck {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s)).min() {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck::Stop(out);
        }
        // Hold back the longest suffix of `pending` that is a proper prefix of a stop string.
        let mut hold = 0;
        for stop in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if tail.len() > hold && stop.starts_with(tail) {
                    hold = tail.len();
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopCheck::Continue(out)
    }

    /// The held-back text, once generation ends without reaching a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_maps_back_to_bytes() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('\u{0100}'), Some(0x00));
        assert_eq!(byte_level_byte('Ġ'), Some(b' '), "GPT-2's space");
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('\u{00E9}'), Some(0xE9), "printable Latin-1");
        assert_eq!(byte_level_byte('\u{4E00}'), None);
    }

    fn stops(s: &[&str]) -> StopMatcher {
        StopMatcher::new(&s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let mut m = stops(&["\nUser:"]);
        assert_eq!(m.push("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.push(" there\nU"), StopCheck::Continue(" there".into()));
        assert_eq!(m.push("se"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("r: hi"), StopCheck::Stop(String::new()));
    }

    #[test]
    fn false_alarm_is_released() {
        let mut m = stops(&["\nUser:"]);
        assert_eq!(m.push("a\nU"), StopCheck::Continue("a".into()));
        assert_eq!(m.push("nder"), StopCheck::Continue("\nUnder".into()));
        assert_eq!(m.push("x\nUs"), StopCheck::Continue("x".into()));
        assert_eq!(m.finish(), "\nUs");
    }

    #[test]
    fn earliest_stop_wins_and_text_before_it_is_kept() {
        let mut m = stops(&["END", "ST"]);
        assert_eq!(m.push("abc STOP END"), StopCheck::Stop("abc ".into()));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = stops(&[]);
        assert_eq!(m.push("é\n"), StopCheck::Continue("é\n".into()));
    }
}
