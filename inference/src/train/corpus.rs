//! The demo language model's text: Python's standard library, which every Debian/Ubuntu
//! machine with Python has (`/usr/lib/python3.X`, under the PSF License), turned into the
//! examples the model learns from, and the tokenizer it reads them with.
//!
//! - [`collect`] reads the `.py` files (bounded in count and size, not UTF-8 skipped with a
//!   count) and splits them by file into training and held-out sets (a file's hash decides,
//!   so the split never changes between runs);
//! - each file gives its source as code, its functions with docstrings as docstring → function
//!   examples and "What does `module.name` do?" chat turns, and single lines to fill in the
//!   middle ([`FimCase`]): in the training set as FIM-formatted examples, in the held-out set
//!   as the cases FIM exact match is measured on;
//! - [`train_tokenizer`] trains a byte-level BPE on the training text with the special tokens
//!   Studio's chat and code paths read: `<|endoftext|>`, ChatML's `<|im_start|>` /
//!   `<|im_end|>`, and Qwen's `<|fim_prefix|>` / `<|fim_suffix|>` / `<|fim_middle|>`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// End of text.
pub const EOS: &str = "<|endoftext|>";
/// The special tokens the tokenizer keeps whole, in id order after the bytes' merges.
pub const SPECIALS: [&str; 6] = [
    EOS,
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
];

/// Largest source file read.
const MAX_FILE: u64 = 512 * 1024;
/// One file in this many goes to the held-out set.
const HELD_OUT_EVERY: u64 = 20;
/// A training file gives this many times as many lines to fill in as a held-out one.
const TRAINING_FIM_FACTOR: usize = 8;

/// One training or evaluation text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A source file as it is.
    Code(String),
    /// A docstring, then the function it documents.
    DocToFunction {
        /// The docstring's text.
        doc: String,
        /// The function, `def` line to the end of its body.
        function: String,
    },
    /// A line to fill in the middle, in Qwen's FIM format (what ghost text asks for).
    Fim(FimCase),
    /// A question about a function and the first sentence of its docstring.
    Chat {
        /// "What does `module.name` do?"
        question: String,
        /// The answer.
        answer: String,
    },
}

impl Example {
    /// The text the model is trained on, with the special tokens Studio's chat (ChatML) and
    /// code paths use.
    pub fn text(&self) -> String {
        match self {
            Example::Code(code) => format!("{code}{EOS}"),
            Example::DocToFunction { doc, function } => {
                format!("# {}\n{function}{EOS}", doc.replace('\n', "\n# "))
            }
            Example::Fim(c) => format!("{}{}{EOS}", c.prompt(), c.middle),
            Example::Chat { question, answer } => format!(
                "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
            ),
        }
    }
}

/// One held-out line to fill in the middle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimCase {
    /// The file's text before the line.
    pub prefix: String,
    /// The line (with its newline): what the model should write.
    pub middle: String,
    /// The file's text after the line.
    pub suffix: String,
}

/// Characters of the file kept before a line to fill in (whole lines), in training and in
/// the evaluation alike. With [`FIM_SUFFIX_CHARS`] and the line, a case fits a training window
/// of 256 tokens (about 3.4 characters a token), so the model sees the whole case at once.
pub const FIM_PREFIX_CHARS: usize = 480;
/// Characters of the file kept after a line to fill in (whole lines): a quarter of the
/// context, as Studio's ghost text gives the suffix.
pub const FIM_SUFFIX_CHARS: usize = 160;

impl FimCase {
    /// The end of the prefix and the start of the suffix that a case shows the model (at most
    /// [`FIM_PREFIX_CHARS`] and [`FIM_SUFFIX_CHARS`], cut at line boundaries).
    pub fn context(&self) -> (&str, &str) {
        let mut from = self.prefix.len().saturating_sub(FIM_PREFIX_CHARS);
        while !self.prefix.is_char_boundary(from) {
            from += 1;
        }
        let prefix = &self.prefix[from..];
        let prefix = if from == 0 {
            prefix
        } else {
            prefix.find('\n').map_or("", |i| &prefix[i + 1..])
        };
        let mut to = self.suffix.len().min(FIM_SUFFIX_CHARS);
        while !self.suffix.is_char_boundary(to) {
            to -= 1;
        }
        let suffix = &self.suffix[..to];
        let suffix = if to == self.suffix.len() {
            suffix
        } else {
            suffix.rfind('\n').map_or("", |i| &suffix[..=i])
        };
        (prefix, suffix)
    }

    /// The case in Qwen's FIM format up to `<|fim_middle|>`: what the model completes.
    pub fn prompt(&self) -> String {
        let (prefix, suffix) = self.context();
        format!("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
    }
}

/// The corpus, split.
#[derive(Debug, Default)]
pub struct Corpus {
    /// What the model trains on.
    pub train: Vec<Example>,
    /// What the held-out loss is measured on.
    pub held_out: Vec<Example>,
    /// Held-out lines to fill in the middle.
    pub fim: Vec<FimCase>,
    /// Source files read.
    pub files: usize,
    /// Files skipped: too large, unreadable or not UTF-8.
    pub skipped: usize,
    /// Bytes of source read.
    pub bytes: u64,
}

/// FNV-1a: a stable hash for the split (std's hasher may change between releases).
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads at most `max_files` `.py` files under `root` (sorted, so runs agree) into a corpus;
/// each held-out file gives up to `fim_per_file` fill-in-the-middle lines.
pub fn collect(root: &Path, max_files: usize, fim_per_file: usize) -> Result<Corpus> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && !kind.is_symlink() {
                stack.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "py") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut corpus = Corpus::default();
    for path in files.into_iter().take(max_files) {
        let Some(text) = read_source(&path) else {
            corpus.skipped += 1;
            continue;
        };
        corpus.files += 1;
        corpus.bytes += text.len() as u64;
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let module = module_name(relative);
        let held_out = stable_hash(&relative.to_string_lossy()).is_multiple_of(HELD_OUT_EVERY);
        let mut examples = vec![Example::Code(text.clone())];
        for f in functions(&text) {
            if let Some(sentence) = first_sentence(&f.doc) {
                examples.push(Example::Chat {
                    question: format!("What does `{module}.{}` do?", f.name),
                    answer: sentence,
                });
            }
            examples.push(Example::DocToFunction {
                doc: f.doc,
                function: f.source,
            });
        }
        if held_out {
            corpus.fim.extend(fim_cases(&text, fim_per_file));
            corpus.held_out.extend(examples);
        } else {
            // Training files teach the FIM format on their own lines (more of them than the
            // held-out files give cases).
            examples.extend(
                fim_cases(&text, fim_per_file * TRAINING_FIM_FACTOR)
                    .into_iter()
                    .map(Example::Fim),
            );
            corpus.train.extend(examples);
        }
    }
    Ok(corpus)
}

/// A source file's text, or `None` when it is too large, unreadable or not UTF-8.
fn read_source(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_FILE {
        return None;
    }
    String::from_utf8(std::fs::read(path).ok()?).ok()
}

/// `json/decoder.py` → `json.decoder`; `os.py` → `os`; `pkg/__init__.py` → `pkg`.
fn module_name(relative: &Path) -> String {
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = last.trim_end_matches(".py").to_owned();
    }
    if parts.last().is_some_and(|l| l == "__init__") {
        parts.pop();
    }
    parts.join(".")
}

/// A function with a docstring.
struct Function {
    name: String,
    doc: String,
    source: String,
}

/// The functions of a file that start with a docstring: the `def` line (one line long), a
/// `"""` docstring, and the body, every line indented deeper than the `def`.
fn functions(text: &str) -> Vec<Function> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("def ") else {
            continue;
        };
        if !trimmed.trim_end().ends_with(':') {
            continue;
        }
        let Some(name) = rest.split('(').next().filter(|n| !n.is_empty()) else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let Some(doc_line) = lines.get(i + 1) else {
            continue;
        };
        let doc_start = doc_line.trim_start();
        let Some(after) = doc_start.strip_prefix("\"\"\"") else {
            continue;
        };
        // The docstring: to the closing quotes, on this line or a later one.
        let mut doc = String::new();
        let mut end = i + 1;
        if let Some(one) = after.strip_suffix("\"\"\"") {
            doc.push_str(one);
        } else {
            doc.push_str(after);
            loop {
                end += 1;
                let Some(l) = lines.get(end) else { break };
                if let Some(pos) = l.find("\"\"\"") {
                    doc.push('\n');
                    doc.push_str(l[..pos].trim());
                    break;
                }
                doc.push('\n');
                doc.push_str(l.trim());
            }
        }
        let mut stop = end + 1;
        while let Some(l) = lines.get(stop) {
            let body_indent = l.len() - l.trim_start().len();
            if !l.trim().is_empty() && body_indent <= indent {
                break;
            }
            stop += 1;
        }
        let doc = doc.trim().to_owned();
        if doc.is_empty() || stop - i > 200 {
            continue;
        }
        let source: String = lines[i..stop]
            .iter()
            .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
            .collect::<Vec<_>>()
            .join("\n");
        out.push(Function {
            name: name.to_owned(),
            doc,
            source: format!("{}\n", source.trim_end()),
        });
    }
    out
}

/// A docstring's first sentence, when it has one of a sensible length.
fn first_sentence(doc: &str) -> Option<String> {
    let para = doc.split("\n\n").next()?.replace('\n', " ");
    let end = para.find(". ").map_or(para.len(), |i| i + 1);
    let sentence = para[..end].trim().to_owned();
    (sentence.len() >= 12 && sentence.len() <= 300).then_some(sentence)
}

/// Up to `max` lines of `text` to fill in: code lines (not blank, not comments) of 10 to 120
/// characters, spread over the file.
fn fim_cases(text: &str, max: usize) -> Vec<FimCase> {
    if max == 0 {
        return Vec::new();
    }
    let starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .filter(|&i| i < text.len())
        .collect();
    let candidates: Vec<(usize, usize)> = starts
        .iter()
        .map(|&s| {
            let e = text[s..].find('\n').map_or(text.len(), |i| s + i + 1);
            (s, e)
        })
        .filter(|&(s, e)| {
            let line = text[s..e].trim();
            (10..=120).contains(&line.len()) && !line.starts_with('#')
        })
        .collect();
    let step = candidates.len().div_ceil(max).max(1);
    candidates
        .into_iter()
        .step_by(step)
        .take(max)
        .map(|(s, e)| FimCase {
            prefix: text[..s].to_owned(),
            middle: text[s..e].to_owned(),
            suffix: text[e..].to_owned(),
        })
        .collect()
}

/// Trains a byte-level BPE of `vocab_size` tokens on `texts`, with [`SPECIALS`] kept whole.
pub fn train_tokenizer<'a>(
    texts: impl Iterator<Item = &'a str>,
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };
    let fail = |e: tokenizers::Error| Error::Tokenizer(format!("training the tokenizer: {e}"));
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(fail)?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size.max(SPECIALS.len() + 256 + 1))
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIALS
                .iter()
                .map(|t| AddedToken::from((*t).to_owned(), true))
                .collect(),
        )
        .build();
    // The special tokens are split off before training, so a text holding them trains only
    // on what lies between.
    let pieces: Vec<String> = texts
        .flat_map(|t| {
            let mut parts = vec![t.to_owned()];
            for s in SPECIALS {
                parts = parts
                    .iter()
                    .flat_map(|p| p.split(s).map(str::to_owned).collect::<Vec<_>>())
                    .collect();
            }
            parts
        })
        .filter(|p| !p.is_empty())
        .collect();
    tokenizer.train(&mut trainer, pieces.iter()).map_err(fail)?;
    Ok(tokenizer.into())
}

/// The Python standard library folders found on this machine (`/usr/lib/python3.X`), newest
/// version first.
pub fn python_libraries() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3.") && n.len() > 8)
                && p.join("os.py").is_file()
        })
        .collect();
    found.sort();
    found.reverse();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"import os


def add(a, b):
    """Return the sum of a and b.

    Works for numbers and strings alike.
    """
    total = a + b
    return total


def undocumented(x):
    return x * 2


class Thing:
    def method(self):
        """Do the thing quickly and return nothing."""
        print("doing the thing")
"#;

    #[test]
    fn functions_docstrings_and_lines_are_found() {
        let f = functions(SAMPLE);
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["add", "method"]);
        assert!(f[0].doc.starts_with("Return the sum of a and b."));
        assert!(f[0].source.starts_with("def add(a, b):"));
        assert!(f[0].source.trim_end().ends_with("return total"));
        assert!(
            f[1].source.starts_with("def method(self):"),
            "{}",
            f[1].source
        );
        assert_eq!(
            first_sentence(&f[0].doc).as_deref(),
            Some("Return the sum of a and b.")
        );
        let cases = fim_cases(SAMPLE, 3);
        assert_eq!(cases.len(), 3);
        for c in &cases {
            assert_eq!(format!("{}{}{}", c.prefix, c.middle, c.suffix), SAMPLE);
            assert!(c.middle.ends_with('\n'));
        }
        // A short prefix is shown whole; the suffix, longer than its budget, up to a line end.
        let (before, after) = cases[1].context();
        assert_eq!(before, cases[1].prefix);
        assert!(cases[1].suffix.len() > FIM_SUFFIX_CHARS);
        assert!(cases[1].suffix.starts_with(after) && after.ends_with('\n'));
        assert!(after.len() <= FIM_SUFFIX_CHARS && after.len() > FIM_SUFFIX_CHARS / 2);
        assert_eq!(
            cases[1].prompt(),
            format!("<|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>")
        );
        assert_eq!(module_name(Path::new("json/decoder.py")), "json.decoder");
        assert_eq!(module_name(Path::new("json/__init__.py")), "json");
    }

    #[test]
    fn a_long_file_shows_whole_lines_within_the_budgets() {
        let long = (0..400).fold(String::new(), |mut s, i| {
            use std::fmt::Write as _;
            let _ = writeln!(s, "value_{i} = {i} * 2");
            s
        });
        let line = "value_200 = 200 * 2\n";
        let at = long.find(line).expect("line");
        let case = FimCase {
            prefix: long[..at].to_owned(),
            middle: line.to_owned(),
            suffix: long[at + line.len()..].to_owned(),
        };
        let (before, after) = case.context();
        assert!(before.len() <= FIM_PREFIX_CHARS && before.len() > FIM_PREFIX_CHARS - 40);
        assert!(after.len() <= FIM_SUFFIX_CHARS && after.len() > FIM_SUFFIX_CHARS - 40);
        assert!(before.starts_with("value_") && before.ends_with("value_199 = 199 * 2\n"));
        assert!(after.starts_with("value_201 = ") && after.ends_with('\n'));
        let text = Example::Fim(case.clone()).text();
        assert_eq!(text, format!("{}{line}{EOS}", case.prompt()));
    }

    #[test]
    fn a_corpus_splits_by_file_and_the_tokenizer_keeps_its_specials() {
        let tmp = tempfile::tempdir().expect("tmp");
        let lib = tmp.path();
        for i in 0..60 {
            std::fs::write(
                lib.join(format!("mod{i}.py")),
                SAMPLE.replace("add", &format!("add{i}")),
            )
            .expect("write");
        }
        std::fs::write(lib.join("latin1.py"), b"x = '\xe9'\n").expect("write");
        let corpus = collect(lib, 1000, 2).expect("collect");
        assert_eq!((corpus.files, corpus.skipped), (60, 1));
        assert!(!corpus.train.is_empty() && !corpus.held_out.is_empty());
        assert_eq!(
            corpus.fim.len(),
            corpus
                .held_out
                .iter()
                .filter(|e| matches!(e, Example::Code(_)))
                .count()
                * 2
        );
        let chat = corpus
            .train
            .iter()
            .find_map(|e| match e {
                Example::Chat { question, .. } => Some(question.clone()),
                _ => None,
            })
            .expect("a chat example");
        assert!(chat.starts_with("What does `mod"), "{chat}");
        let texts: Vec<String> = corpus.train.iter().map(Example::text).collect();
        let tokenizer = train_tokenizer(texts.iter().map(String::as_str), 400).expect("train");
        for s in SPECIALS {
            let ids = tokenizer
                .encode(s, false)
                .expect("encode")
                .get_ids()
                .to_vec();
            assert_eq!(ids.len(), 1, "{s} is one token");
        }
        let text = "def add7(a, b):\n    return a + b\n";
        let ids = tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(tokenizer.decode(&ids, false).expect("decode"), text);
        assert!(ids.len() < text.len(), "merges were learned");
    }
}
