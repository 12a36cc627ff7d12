//! One open file of the Code panel, as pure logic: its text, path, saved state, Studio's own
//! undo/redo stack (so a completion accepted or diff hunks applied are one undoable edit),
//! find/replace, and reading a source file (refusing binaries and invalid UTF-8).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use studio_inference::code::language::{Language, language_for_path};

/// Files larger than this are refused (they are not source code one edits by hand).
pub const MAX_OPEN_BYTES: u64 = 32 * 1024 * 1024;
/// Above this size the text is shown without syntax highlighting (layout stays fast).
pub const HIGHLIGHT_LIMIT: usize = 256 * 1024;
/// Typing within this long of the previous keystroke joins the same undo step.
const UNDO_GROUP: Duration = Duration::from_secs(1);
/// At most this many undo steps, and this many bytes of them, per tab.
const UNDO_STEPS: usize = 200;
const UNDO_BYTES: usize = 64 * 1024 * 1024;

/// A state of the text to go back (or forward) to; `cursor` is a char index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub text: String,
    pub cursor: usize,
}

/// One open file (or an untitled buffer).
#[derive(Debug, Clone)]
pub struct Tab {
    /// Stable within a session (and across restarts through the recovery file).
    pub id: u64,
    /// `None` for an untitled buffer.
    pub path: Option<PathBuf>,
    /// The title of an untitled buffer ("untitled-1").
    pub untitled: String,
    pub text: String,
    /// The text as of the end of the last frame (the state an undo step starts from).
    shadow: String,
    /// Hash of the text as last saved (or opened).
    saved_hash: u64,
    text_hash: u64,
    /// Bumped on every change of the text.
    pub rev: u64,
    undo: Vec<Snapshot>,
    redo: Vec<Snapshot>,
    /// When the last typed change happened (for grouping), `None` when the group is closed.
    typing_since: Option<Instant>,
    /// The cursor (char index) after the last change, to tell a cursor move from typing.
    last_cursor: usize,
    /// Language override for highlighting (untitled buffers); otherwise from the path.
    pub language_token: Option<String>,
    /// The number of lines, and the revision it was counted at.
    lines: std::cell::Cell<(u64, usize)>,
}

fn hash_of(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl Tab {
    /// A tab for `text` as read from `path` (clean) or an untitled one (clean when empty).
    pub fn new(id: u64, path: Option<PathBuf>, untitled: String, text: String) -> Self {
        let hash = hash_of(&text);
        Self {
            id,
            path,
            untitled,
            shadow: text.clone(),
            text,
            saved_hash: hash,
            text_hash: hash,
            rev: 0,
            undo: Vec::new(),
            redo: Vec::new(),
            typing_since: None,
            last_cursor: 0,
            language_token: None,
            lines: std::cell::Cell::new((u64::MAX, 0)),
        }
    }

    /// The tab's title: the file name, or "untitled-N".
    pub fn title(&self) -> String {
        self.path.as_ref().and_then(|p| p.file_name()).map_or_else(
            || self.untitled.clone(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// The path shown to the model and in prompts.
    pub fn display_path(&self) -> String {
        self.path.as_ref().map_or_else(
            || {
                let ext = self
                    .language_token
                    .as_deref()
                    .map(|t| format!(".{t}"))
                    .unwrap_or_default();
                format!("{}{ext}", self.untitled)
            },
            |p| p.display().to_string(),
        )
    }

    pub fn language(&self) -> Option<Language> {
        if let Some(token) = &self.language_token {
            return studio_inference::code::language::language_by_token(token);
        }
        self.path.as_deref().and_then(language_for_path)
    }

    /// Unsaved changes.
    pub fn is_dirty(&self) -> bool {
        self.text_hash != self.saved_hash
    }

    /// The text is what is on disk now (after a save).
    pub fn mark_saved(&mut self) {
        self.saved_hash = self.text_hash;
    }

    /// Marks the tab as differing from disk whatever its text (a restored recovery whose file
    /// is gone).
    pub fn mark_unsaved(&mut self) {
        self.saved_hash = self.text_hash.wrapping_add(1);
    }

    /// Sets what is on disk (a restored tab whose file differs from the recovered text).
    pub fn set_saved_text(&mut self, disk: &str) {
        self.saved_hash = hash_of(disk);
    }

    /// Called once per frame after the editor ran, with whether the text changed and where
    /// the cursor is: records the undo step typing makes (consecutive keystrokes join one).
    pub fn after_frame(&mut self, changed: bool, cursor: usize) {
        if changed && self.text != self.shadow {
            let now = Instant::now();
            let joins = self
                .typing_since
                .is_some_and(|t| now.duration_since(t) < UNDO_GROUP);
            if !joins {
                let before = std::mem::take(&mut self.shadow);
                self.push_undo(Snapshot {
                    text: before,
                    cursor: self.last_cursor,
                });
            }
            self.redo.clear();
            self.typing_since = Some(now);
            self.shadow.clone_from(&self.text);
            self.changed();
        } else if cursor != self.last_cursor {
            // Moving the cursor ends the typing group.
            self.typing_since = None;
        }
        self.last_cursor = cursor;
    }

    fn changed(&mut self) {
        self.rev += 1;
        self.text_hash = hash_of(&self.text);
    }

    fn push_undo(&mut self, s: Snapshot) {
        self.undo.push(s);
        let mut bytes: usize = self.undo.iter().map(|s| s.text.len()).sum();
        while self.undo.len() > UNDO_STEPS || (bytes > UNDO_BYTES && self.undo.len() > 1) {
            let dropped = self.undo.remove(0);
            bytes -= dropped.text.len();
        }
    }

    /// Replaces the whole text as ONE undoable edit (accepting a completion, applying hunks,
    /// replace all). `cursor` is a char index.
    pub fn edit(&mut self, text: String, cursor: usize) {
        if text == self.text {
            return;
        }
        let before = std::mem::replace(&mut self.text, text);
        self.push_undo(Snapshot {
            text: before,
            cursor: self.last_cursor,
        });
        self.redo.clear();
        self.typing_since = None;
        self.shadow.clone_from(&self.text);
        self.last_cursor = cursor;
        self.changed();
    }

    /// Replaces `range` (bytes) with `with` as one undoable edit; returns the char index after
    /// the inserted text.
    pub fn replace_range(&mut self, range: Range<usize>, with: &str) -> usize {
        let mut text = String::with_capacity(self.text.len() + with.len());
        text.push_str(&self.text[..range.start]);
        text.push_str(with);
        text.push_str(&self.text[range.end..]);
        let cursor = char_index(&text, range.start + with.len());
        self.edit(text, cursor);
        cursor
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Goes back one step; returns the cursor to show.
    pub fn undo(&mut self) -> Option<usize> {
        let s = self.undo.pop()?;
        let current = std::mem::replace(&mut self.text, s.text);
        self.redo.push(Snapshot {
            text: current,
            cursor: self.last_cursor,
        });
        self.restored(s.cursor);
        Some(s.cursor)
    }

    /// Goes forward one step; returns the cursor to show.
    pub fn redo(&mut self) -> Option<usize> {
        let s = self.redo.pop()?;
        let current = std::mem::replace(&mut self.text, s.text);
        self.undo.push(Snapshot {
            text: current,
            cursor: self.last_cursor,
        });
        self.restored(s.cursor);
        Some(s.cursor)
    }

    fn restored(&mut self, cursor: usize) {
        self.typing_since = None;
        self.shadow.clone_from(&self.text);
        self.last_cursor = cursor;
        self.changed();
    }

    /// How many lines the text has (counted once per revision).
    pub fn line_count(&self) -> usize {
        let (rev, n) = self.lines.get();
        if rev == self.rev {
            return n;
        }
        let n = self.text.bytes().filter(|b| *b == b'\n').count() + 1;
        self.lines.set((self.rev, n));
        n
    }

    /// Whether the text is small enough to highlight.
    pub fn highlighted(&self) -> bool {
        self.text.len() <= HIGHLIGHT_LIMIT
    }
}

// ---- positions ------------------------------------------------------------------------------

/// The byte offset of char index `chars` in `text` (clamped to its end).
pub fn byte_index(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i)
}

/// The char index of byte offset `byte` in `text` (rounded down to a char boundary).
pub fn char_index(text: &str, byte: usize) -> usize {
    let mut b = byte.min(text.len());
    while !text.is_char_boundary(b) {
        b -= 1;
    }
    text[..b].chars().count()
}

/// The start of `text[..at]` kept for a completion prompt: at most `max` bytes, starting at
/// a line start when one is near.
pub fn window_before(text: &str, at: usize, max: usize) -> &str {
    let mut start = at.saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    if start > 0
        && let Some(nl) = text[start..at].find('\n')
    {
        start += nl + 1;
    }
    &text[start..at]
}

/// The end `text[at..]` kept for a completion prompt: at most `max` bytes, ending at a line
/// end when one is near.
pub fn window_after(text: &str, at: usize, max: usize) -> &str {
    let mut end = (at + max).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len()
        && let Some(nl) = text[at..end].rfind('\n')
    {
        end = at + nl + 1;
    }
    &text[at..end]
}

/// How much of a suggestion Ctrl+→ accepts: leading whitespace, then one word (letters,
/// digits, `_`) or else one other character.
pub fn next_word(suggestion: &str) -> &str {
    let mut end = 0;
    let mut chars = suggestion.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            end = i + c.len_utf8();
            chars.next();
        } else {
            break;
        }
    }
    let word = |c: char| c.is_alphanumeric() || c == '_';
    match chars.peek().copied() {
        Some((i, c)) if word(c) => {
            end = i + c.len_utf8();
            chars.next();
            for (i, c) in chars {
                if !word(c) {
                    break;
                }
                end = i + c.len_utf8();
            }
        }
        Some((i, c)) => end = i + c.len_utf8(),
        None => {}
    }
    &suggestion[..end]
}

// ---- find / replace --------------------------------------------------------------------------

/// Byte ranges of every match of `query` in `text` (non-overlapping, in order), at most
/// `limit`.
pub fn find_all(text: &str, query: &str, match_case: bool, limit: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    if query.is_empty() {
        return out;
    }
    if match_case {
        let mut from = 0;
        while let Some(i) = text[from..].find(query) {
            out.push(from + i..from + i + query.len());
            from += i + query.len();
            if out.len() >= limit {
                break;
            }
        }
        return out;
    }
    let q: Vec<char> = query.chars().flat_map(char::to_lowercase).collect();
    let mut i = 0;
    while i < text.len() {
        if let Some(end) = match_at(text, i, &q) {
            out.push(i..end);
            if out.len() >= limit {
                break;
            }
            i = end.max(i + 1);
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
        while i < text.len() && !text.is_char_boundary(i) {
            i += 1;
        }
    }
    out
}

/// Where a case-insensitive match of `q` (lower-cased chars) starting at `at` ends.
fn match_at(text: &str, at: usize, q: &[char]) -> Option<usize> {
    let mut k = 0;
    for (off, c) in text[at..].char_indices() {
        if k == q.len() {
            return Some(at + off);
        }
        for lc in c.to_lowercase() {
            if q.get(k) != Some(&lc) {
                return None;
            }
            k += 1;
        }
    }
    (k == q.len()).then_some(text.len())
}

/// The next match after byte `from` (wrapping), or the previous one before `from`.
pub fn find_from(
    text: &str,
    query: &str,
    match_case: bool,
    from: usize,
    forward: bool,
) -> Option<Range<usize>> {
    let all = find_all(text, query, match_case, usize::MAX);
    if forward {
        all.iter()
            .find(|r| r.start >= from)
            .or(all.first())
            .cloned()
    } else {
        all.iter()
            .rev()
            .find(|r| r.end <= from && r.start < from)
            .or(all.last())
            .cloned()
    }
}

/// `text` with every match replaced; and how many there were.
pub fn replace_all(text: &str, query: &str, with: &str, match_case: bool) -> (String, usize) {
    let all = find_all(text, query, match_case, usize::MAX);
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in &all {
        out.push_str(&text[last..r.start]);
        out.push_str(with);
        last = r.end;
    }
    out.push_str(&text[last..]);
    (out, all.len())
}

// ---- reading files ----------------------------------------------------------------------------

/// Why a file was not opened, written for the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// Reads a source file: refuses folders, files over [`MAX_OPEN_BYTES`], binaries (a NUL byte
/// in the first 8 KB) and text that is not UTF-8 (a UTF-8 byte-order mark is dropped).
pub fn read_source(path: &Path) -> Result<String, Refused> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Refused(format!("Cannot open {shown}: {e}")))?;
    if meta.is_dir() {
        return Err(Refused(format!("{shown} is a folder, not a file")));
    }
    if meta.len() > MAX_OPEN_BYTES {
        return Err(Refused(format!(
            "{shown} is {} MB: the editor opens files up to {} MB",
            meta.len() / (1024 * 1024),
            MAX_OPEN_BYTES / (1024 * 1024)
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Refused(format!("Cannot read {shown}: {e}")))?;
    decode_source(&bytes).map_err(|why| Refused(format!("{shown} was not opened: {why}")))
}

/// The text of a file's bytes, or why it is not text the editor can open.
pub fn decode_source(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return Err("it is a binary file");
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    String::from_utf8(bytes.to_vec()).map_err(|_| "it is not UTF-8 text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_groups_and_edits_are_one_step() {
        let mut t = Tab::new(1, None, "untitled-1".into(), String::new());
        t.text.push('a');
        t.after_frame(true, 1);
        t.text.push('b');
        t.after_frame(true, 2);
        assert!(t.is_dirty());
        t.edit("ab + c".into(), 6);
        assert_eq!(t.undo(), Some(2));
        assert_eq!(t.text, "ab");
        assert_eq!(t.undo(), Some(0));
        assert_eq!(t.text, "");
        assert!(!t.is_dirty());
        t.redo();
        t.redo();
        assert_eq!(t.text, "ab + c");
    }

    #[test]
    fn find_and_replace() {
        let text = "Foo foo FOO bar";
        assert_eq!(find_all(text, "foo", true, 10), vec![4..7]);
        assert_eq!(find_all(text, "foo", false, 10), vec![0..3, 4..7, 8..11]);
        assert_eq!(find_from(text, "foo", false, 5, true), Some(8..11));
        assert_eq!(find_from(text, "foo", false, 9, true), Some(0..3));
        assert_eq!(find_from(text, "foo", false, 4, false), Some(0..3));
        assert_eq!(
            replace_all(text, "foo", "x", false),
            ("x x x bar".into(), 3)
        );
        assert_eq!(find_all("ÄÖ äö", "äö", false, 10), vec![0..4, 5..9]);
    }

    #[test]
    fn words_windows_and_files() {
        assert_eq!(next_word("  foo(bar)"), "  foo");
        assert_eq!(next_word("(bar)"), "(");
        assert_eq!(next_word(""), "");
        let text = "line1\nline2\nline3\n";
        assert_eq!(window_before(text, 12, 8), "line2\n");
        assert_eq!(window_after(text, 0, 8), "line1\n");
        assert_eq!(byte_index("äb", 1), 2);
        assert_eq!(char_index("äb", 2), 1);
        assert!(decode_source(b"a\0b").is_err());
        assert!(decode_source(&[0xff, 0xfe, 0x41]).is_err());
        assert_eq!(decode_source(b"\xEF\xBB\xBFhi").as_deref(), Ok("hi"));
    }
}
