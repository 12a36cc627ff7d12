//! Grammar-constrained sampling: a GBNF grammar (llama.cpp's format, which
//! [`schema::json_schema_to_gbnf`] also writes from a JSON schema) run as a pushdown automaton
//! over the characters of the text, and a mask over the tokenizer's vocabulary from it, so
//! only tokens that keep the text inside the grammar can be sampled.
//!
//! - [`Grammar::parse`] reads GBNF: `name ::= alternatives`, literals `"…"`, classes `[a-z]`
//!   and `[^…]`, `.`, groups, `*` `+` `?` `{m}` `{m,}` `{m,n}`, `#` comments. Repetitions and
//!   groups become rules of their own. Left recursion is refused (it would never consume).
//! - [`Matcher`] holds the automaton's stacks (one per way the text so far can still be
//!   read) and a partly seen UTF-8 character, and advances byte by byte.
//! - [`VocabTrie`] is the vocabulary's token bytes as a prefix tree, so one walk checks every
//!   token, sharing the work of common prefixes; special tokens are never allowed (the end
//!   of text is, once the grammar is complete).
//!
//! [`Constraint`] is what the token loop uses: it first checks the token the sampler chose,
//! and only when that one is not allowed masks the whole vocabulary and samples again
//! (which draws from exactly the masked distribution), so a step inside a free-text string
//! costs one token's check.

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod schema;

/// What a generation's output must be, as a setting (the Chat panel's JSON mode,
/// `--json-schema`): compiled to a [`Grammar`] when the generation starts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StructuredOutput {
    /// Free text.
    #[default]
    Off,
    /// Any JSON object.
    JsonObject,
    /// JSON that fits this schema (its JSON text).
    JsonSchema {
        /// The schema, as JSON text.
        schema: String,
    },
    /// A GBNF grammar (llama.cpp's format).
    Gbnf {
        /// The grammar's text.
        grammar: String,
    },
}

impl StructuredOutput {
    /// Whether it is [`StructuredOutput::Off`].
    pub fn is_off(&self) -> bool {
        *self == StructuredOutput::Off
    }

    /// The grammar it asks for; a schema or grammar that does not compile is an
    /// [`Error::InvalidParameter`] that says why (a schema's keyword, a grammar's line).
    pub fn compile(&self) -> Result<Option<Arc<Grammar>>> {
        let gbnf = match self {
            StructuredOutput::Off => return Ok(None),
            StructuredOutput::JsonObject => schema::json_object_gbnf(),
            StructuredOutput::JsonSchema { schema } => {
                let value: serde_json::Value = serde_json::from_str(schema).map_err(|e| {
                    Error::InvalidParameter(format!("the JSON schema is not JSON: {e}"))
                })?;
                schema::json_schema_to_gbnf(&value).map_err(|e| {
                    Error::InvalidParameter(format!("the JSON schema can't be enforced: {e}"))
                })?
            }
            StructuredOutput::Gbnf { grammar } => grammar.clone(),
        };
        Grammar::parse(&gbnf).map(|g| Some(Arc::new(g)))
    }
}

/// The most rules a grammar may have (repetitions make rules of their own).
const MAX_RULES: usize = 4096;
/// The most alternative stacks followed at once.
const MAX_STACKS: usize = 4096;
/// The deepest a stack may grow.
const MAX_DEPTH: usize = 512;
/// The largest `{m,n}` count.
const MAX_REPEAT: u32 = 1000;
/// The deepest groups may nest in a GBNF text (the parser recurses into them).
const MAX_NESTING: usize = 64;
/// The most work one vocabulary mask may take (stacks advanced, summed over the trie nodes
/// visited): a grammar so ambiguous that it would stall the model for seconds per token is
/// refused instead.
const MAX_MASK_WORK: usize = 50_000_000;

/// A set of characters: ranges, possibly negated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CharClass {
    ranges: Vec<(u32, u32)>,
    negated: bool,
}

impl CharClass {
    fn matches(&self, c: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= c && c <= b) != self.negated
    }

    /// Whether some character in `lo..=hi` matches.
    fn intersects(&self, lo: u32, hi: u32) -> bool {
        if self.negated {
            // Not all of lo..=hi is excluded by the ranges.
            let mut covered = lo;
            let mut ranges = self.ranges.clone();
            ranges.sort_unstable();
            for (a, b) in ranges {
                if a > covered {
                    break;
                }
                if b >= covered {
                    covered = b.saturating_add(1);
                }
                if covered > hi {
                    return false;
                }
            }
            covered <= hi
        } else {
            self.ranges.iter().any(|&(a, b)| a <= hi && lo <= b)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Elem {
    /// One character of the class.
    Chars(u32),
    /// The rule.
    Ref(u32),
}

/// A compiled grammar.
#[derive(Debug, Clone)]
pub struct Grammar {
    /// Each rule: its alternatives, each a sequence.
    rules: Vec<Vec<Vec<Elem>>>,
    names: Vec<String>,
    classes: Vec<CharClass>,
    root: u32,
}

/// A place in the grammar: rule, alternative, element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pos {
    rule: u32,
    alt: u32,
    elem: u32,
}

type Stack = Vec<Pos>;

// ---------------------------------------------------------------------------------------------
// Parsing GBNF

struct Parser<'a> {
    src: &'a [u8],
    at: usize,
    g: Grammar,
    ids: HashMap<String, u32>,
    defined: Vec<bool>,
    /// Groups open around the current position.
    nesting: usize,
}

fn grammar_error(message: impl Into<String>) -> Error {
    Error::InvalidParameter(format!("grammar: {}", message.into()))
}

impl Parser<'_> {
    fn error(&self, message: &str) -> Error {
        let line = self.src[..self.at.min(self.src.len())]
            .split(|&b| b == b'\n')
            .count();
        grammar_error(format!("{message} (line {line})"))
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.at).copied()
    }

    /// Skips spaces and comments; newlines too unless `inline`.
    fn space(&mut self, inline: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' => self.at += 1,
                b'\n' if !inline => self.at += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.at += 1;
                    }
                }
                // A newline inside a rule continues it when the next line is indented or
                // starts with `|` (llama.cpp reads rules until the next `name ::=`).
                b'\n' => {
                    let rest = &self.src[self.at + 1..];
                    let next = rest
                        .iter()
                        .position(|&b| b != b' ' && b != b'\t' && b != b'\r');
                    let continues = match next.map(|i| rest[i]) {
                        Some(b'|') => true,
                        Some(b'\n' | b'#') | None => false,
                        Some(_) => !self.line_defines_rule(self.at + 1),
                    };
                    if continues {
                        self.at += 1;
                    } else {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Whether the line starting at `from` is `name ::= …`.
    fn line_defines_rule(&self, from: usize) -> bool {
        let line: Vec<u8> = self.src[from..]
            .iter()
            .take_while(|&&b| b != b'\n')
            .copied()
            .collect();
        let text = String::from_utf8_lossy(&line);
        text.trim_start()
            .split_once("::=")
            .is_some_and(|(name, _)| is_name(name.trim()))
    }

    fn name(&mut self) -> Option<String> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.src[start..self.at]).into_owned())
    }

    fn rule_id(&mut self, name: &str) -> Result<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        self.new_rule(name)
    }

    fn new_rule(&mut self, name: &str) -> Result<u32> {
        if self.g.rules.len() >= MAX_RULES {
            return Err(self.error(&format!("more than {MAX_RULES} rules")));
        }
        let id = u32::try_from(self.g.rules.len()).unwrap_or(u32::MAX);
        self.g.rules.push(Vec::new());
        self.g.names.push(name.to_owned());
        self.defined.push(false);
        self.ids.insert(name.to_owned(), id);
        Ok(id)
    }

    /// A rule for a generated name (`name-N`).
    fn helper_rule(&mut self, base: &str, alts: Vec<Vec<Elem>>) -> Result<u32> {
        let name = format!("{base}-{}", self.g.rules.len());
        let id = self.new_rule(&name)?;
        self.g.rules[id as usize] = alts;
        self.defined[id as usize] = true;
        Ok(id)
    }

    fn class(&mut self, class: CharClass) -> u32 {
        if let Some(i) = self.g.classes.iter().position(|c| *c == class) {
            return u32::try_from(i).unwrap_or(u32::MAX);
        }
        self.g.classes.push(class);
        u32::try_from(self.g.classes.len() - 1).unwrap_or(u32::MAX)
    }

    /// One character of a literal or class, escapes read.
    fn char(&mut self) -> Result<u32> {
        let Some(c) = self.peek() else {
            return Err(self.error("unexpected end"));
        };
        if c == b'\\' {
            self.at += 1;
            let Some(e) = self.peek() else {
                return Err(self.error("unexpected end after `\\`"));
            };
            self.at += 1;
            let hex = |p: &mut Self, n: usize| -> Result<u32> {
                let end = p.at + n;
                let digits = p
                    .src
                    .get(p.at..end)
                    .ok_or_else(|| p.error("short escape"))?;
                let v = u32::from_str_radix(&String::from_utf8_lossy(digits), 16)
                    .map_err(|_| p.error("bad hex escape"))?;
                p.at = end;
                Ok(v)
            };
            return Ok(match e {
                b'n' => u32::from('\n'),
                b'r' => u32::from('\r'),
                b't' => u32::from('\t'),
                b'0' => 0,
                b'x' => hex(self, 2)?,
                b'u' => hex(self, 4)?,
                b'U' => hex(self, 8)?,
                other => u32::from(other),
            });
        }
        // A UTF-8 character.
        let len = match c {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        let bytes = self
            .src
            .get(self.at..self.at + len)
            .ok_or_else(|| self.error("cut-off character"))?;
        let ch = std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.chars().next())
            .ok_or_else(|| self.error("not UTF-8"))?;
        self.at += len;
        Ok(u32::from(ch))
    }

    /// A sequence of elements up to `|`, `)` or the end of the rule.
    fn sequence(&mut self, rule_name: &str) -> Result<Vec<Elem>> {
        let mut seq: Vec<Elem> = Vec::new();
        loop {
            self.space(true);
            let Some(c) = self.peek() else { break };
            let start = seq.len();
            match c {
                b'"' => {
                    self.at += 1;
                    while self.peek() != Some(b'"') {
                        let ch = self.char()?;
                        let k = self.class(CharClass {
                            ranges: vec![(ch, ch)],
                            negated: false,
                        });
                        seq.push(Elem::Chars(k));
                    }
                    self.at += 1;
                }
                b'[' => {
                    self.at += 1;
                    let negated = self.peek() == Some(b'^');
                    if negated {
                        self.at += 1;
                    }
                    let mut ranges = Vec::new();
                    while self.peek() != Some(b']') {
                        let a = self.char()?;
                        let b = if self.peek() == Some(b'-')
                            && self.src.get(self.at + 1) != Some(&b']')
                        {
                            self.at += 1;
                            self.char()?
                        } else {
                            a
                        };
                        ranges.push((a.min(b), a.max(b)));
                    }
                    self.at += 1;
                    let k = self.class(CharClass { ranges, negated });
                    seq.push(Elem::Chars(k));
                }
                b'.' => {
                    self.at += 1;
                    let k = self.class(CharClass {
                        ranges: Vec::new(),
                        negated: true,
                    });
                    seq.push(Elem::Chars(k));
                }
                b'(' => {
                    self.at += 1;
                    self.nesting += 1;
                    if self.nesting > MAX_NESTING {
                        return Err(self.error(&format!("groups nested deeper than {MAX_NESTING}")));
                    }
                    let alts = self.alternatives(rule_name)?;
                    self.nesting -= 1;
                    if self.peek() != Some(b')') {
                        return Err(self.error("a group without its `)`"));
                    }
                    self.at += 1;
                    let id = self.helper_rule(rule_name, alts)?;
                    seq.push(Elem::Ref(id));
                }
                b'|' | b')' | b'\n' => break,
                c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                    let save = self.at;
                    let name = self.name().unwrap_or_default();
                    // The next rule's definition ends this one.
                    self.space(true);
                    if self.src[self.at..].starts_with(b"::=") {
                        self.at = save;
                        break;
                    }
                    let id = self.rule_id(&name)?;
                    seq.push(Elem::Ref(id));
                }
                _ => return Err(self.error(&format!("unexpected `{}`", char::from(c)))),
            }
            // A repetition applies to the last item (a literal's last character only if it
            // is one character; llama.cpp applies it to the whole literal, as here).
            self.space(true);
            if let Some(op) = self
                .peek()
                .filter(|c| matches!(c, b'*' | b'+' | b'?' | b'{'))
            {
                let item: Vec<Elem> = seq.drain(start..).collect();
                let (min, max) = self.repetition(op)?;
                let elem = self.repeat(rule_name, &item, min, max)?;
                seq.push(elem);
            }
        }
        Ok(seq)
    }

    fn repetition(&mut self, op: u8) -> Result<(u32, Option<u32>)> {
        self.at += 1;
        Ok(match op {
            b'*' => (0, None),
            b'+' => (1, None),
            b'?' => (0, Some(1)),
            _ => {
                let number = |p: &mut Self| -> Option<u32> {
                    let start = p.at;
                    while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                        p.at += 1;
                    }
                    String::from_utf8_lossy(&p.src[start..p.at]).parse().ok()
                };
                self.space(true);
                let min = number(self).unwrap_or(0);
                self.space(true);
                let max = if self.peek() == Some(b',') {
                    self.at += 1;
                    self.space(true);
                    number(self)
                } else {
                    Some(min)
                };
                self.space(true);
                if self.peek() != Some(b'}') {
                    return Err(self.error("a repetition without its `}`"));
                }
                self.at += 1;
                if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
                    return Err(self.error(&format!(
                        "a repetition {{{min},{max:?}}} outside 0 to {MAX_REPEAT}"
                    )));
                }
                (min, max)
            }
        })
    }

    /// `item` repeated `min` to `max` times, as a rule.
    fn repeat(&mut self, base: &str, item: &[Elem], min: u32, max: Option<u32>) -> Result<Elem> {
        // item{0,} : R ::= item R | ε
        let mut tail = match max {
            None => {
                let id = self.helper_rule(base, Vec::new())?;
                let mut again = item.to_vec();
                again.push(Elem::Ref(id));
                self.g.rules[id as usize] = vec![again, Vec::new()];
                Some(id)
            }
            Some(max) => {
                // Optional copies, nested: O_k ::= item O_{k-1} | ε
                let mut inner: Option<u32> = None;
                for _ in min..max {
                    let mut seq = item.to_vec();
                    if let Some(i) = inner {
                        seq.push(Elem::Ref(i));
                    }
                    inner = Some(self.helper_rule(base, vec![seq, Vec::new()])?);
                }
                inner
            }
        };
        let mut seq = Vec::new();
        for _ in 0..min {
            seq.extend_from_slice(item);
        }
        if let Some(t) = tail.take() {
            seq.push(Elem::Ref(t));
        }
        if seq.len() == 1 {
            return Ok(seq[0]);
        }
        Ok(Elem::Ref(self.helper_rule(base, vec![seq])?))
    }

    fn alternatives(&mut self, rule_name: &str) -> Result<Vec<Vec<Elem>>> {
        let mut alts = vec![self.sequence(rule_name)?];
        loop {
            self.space(true);
            if self.peek() == Some(b'|') {
                self.at += 1;
                alts.push(self.sequence(rule_name)?);
            } else {
                return Ok(alts);
            }
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

impl Grammar {
    /// Reads a GBNF grammar whose start is the rule `root`.
    pub fn parse(src: &str) -> Result<Self> {
        if src.len() > 1 << 20 {
            return Err(grammar_error("over 1 MiB"));
        }
        let mut p = Parser {
            src: src.as_bytes(),
            at: 0,
            g: Grammar {
                rules: Vec::new(),
                names: Vec::new(),
                classes: Vec::new(),
                root: 0,
            },
            ids: HashMap::new(),
            defined: Vec::new(),
            nesting: 0,
        };
        loop {
            p.space(false);
            if p.peek().is_none() {
                break;
            }
            let Some(name) = p.name() else {
                return Err(p.error("expected a rule name"));
            };
            p.space(true);
            if !p.src[p.at..].starts_with(b"::=") {
                return Err(p.error(&format!("expected `::=` after `{name}`")));
            }
            p.at += 3;
            let id = p.rule_id(&name)?;
            if p.defined[id as usize] {
                return Err(p.error(&format!("rule `{name}` is defined twice")));
            }
            let alts = p.alternatives(&name)?;
            p.g.rules[id as usize] = alts;
            p.defined[id as usize] = true;
        }
        if let Some(i) = p.defined.iter().position(|d| !d) {
            return Err(grammar_error(format!(
                "rule `{}` is used but not defined",
                p.g.names[i]
            )));
        }
        let root = *p
            .ids
            .get("root")
            .ok_or_else(|| grammar_error("no `root` rule"))?;
        p.g.root = root;
        p.g.check_left_recursion()?;
        Ok(p.g)
    }

    /// Refuses rules that can reach themselves without reading a character.
    fn check_left_recursion(&self) -> Result<()> {
        let n = self.rules.len();
        // Nullable rules, to a fixed point.
        let mut nullable = vec![false; n];
        loop {
            let mut changed = false;
            for (r, alts) in self.rules.iter().enumerate() {
                if !nullable[r]
                    && alts.iter().any(|alt| {
                        alt.iter()
                            .all(|e| matches!(e, Elem::Ref(x) if nullable[*x as usize]))
                    })
                {
                    nullable[r] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Edges to the rules each can start with.
        let first: Vec<Vec<usize>> = self
            .rules
            .iter()
            .map(|alts| {
                let mut out = Vec::new();
                for alt in alts {
                    for e in alt {
                        match e {
                            Elem::Chars(_) => break,
                            Elem::Ref(x) => {
                                out.push(*x as usize);
                                if !nullable[*x as usize] {
                                    break;
                                }
                            }
                        }
                    }
                }
                out
            })
            .collect();
        // A cycle in those edges is left recursion.
        let mut state = vec![0u8; n]; // 0 new, 1 on the path, 2 done
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut path = vec![(start, 0usize)];
            state[start] = 1;
            while let Some((r, i)) = path.last_mut() {
                if let Some(&next) = first[*r].get(*i) {
                    *i += 1;
                    match state[next] {
                        1 => {
                            return Err(grammar_error(format!(
                                "rule `{}` is left-recursive (it reaches itself without \
                                 reading a character)",
                                self.names[next]
                            )));
                        }
                        0 => {
                            state[next] = 1;
                            path.push((next, 0));
                        }
                        _ => {}
                    }
                } else {
                    state[*r] = 2;
                    path.pop();
                }
            }
        }
        Ok(())
    }

    fn elem(&self, p: Pos) -> Option<Elem> {
        self.rules[p.rule as usize][p.alt as usize]
            .get(p.elem as usize)
            .copied()
    }

    /// Expands `stack` until its top is a character class (or it is empty: the text may end
    /// here), into `out`.
    fn expand(&self, mut stack: Stack, out: &mut Vec<Stack>) {
        // An explosion of alternatives stops at the bound (the text then has fewer readings).
        if out.len() > MAX_STACKS {
            return;
        }
        loop {
            let Some(&top) = stack.last() else {
                out.push(stack);
                return;
            };
            match self.elem(top) {
                None => {
                    stack.pop();
                }
                Some(Elem::Chars(_)) => {
                    out.push(stack);
                    return;
                }
                Some(Elem::Ref(r)) => {
                    // The caller continues after the reference; a finished caller frame
                    // goes now, so right recursion does not grow the stack.
                    if let Some(t) = stack.last_mut() {
                        t.elem += 1;
                    }
                    if stack.last().is_some_and(|&t| self.elem(t).is_none()) {
                        stack.pop();
                    }
                    if stack.len() >= MAX_DEPTH {
                        return;
                    }
                    let alts = self.rules[r as usize].len();
                    for a in 0..alts {
                        let mut s = stack.clone();
                        s.push(Pos {
                            rule: r,
                            alt: u32::try_from(a).unwrap_or(u32::MAX),
                            elem: 0,
                        });
                        self.expand(s, out);
                    }
                    return;
                }
            }
        }
    }

    fn class_at(&self, stack: &Stack) -> Option<&CharClass> {
        match self.elem(*stack.last()?) {
            Some(Elem::Chars(k)) => Some(&self.classes[k as usize]),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

/// A grammar part-way through a text: the stacks still alive and a partly read character.
#[derive(Debug, Clone)]
pub struct Matcher {
    grammar: Arc<Grammar>,
    stacks: Vec<Stack>,
    /// A multi-byte character being read: its bits so far and the bytes still to come.
    partial: Option<(u32, u8)>,
    /// The lowest code point the partial character can still be.
    partial_lo: u32,
}

impl Matcher {
    /// At the start of `grammar`'s root rule.
    pub fn new(grammar: Arc<Grammar>) -> Self {
        let mut stacks = Vec::new();
        for a in 0..grammar.rules[grammar.root as usize].len() {
            grammar.expand(
                vec![Pos {
                    rule: grammar.root,
                    alt: u32::try_from(a).unwrap_or(u32::MAX),
                    elem: 0,
                }],
                &mut stacks,
            );
        }
        dedup(&mut stacks);
        Self {
            grammar,
            stacks,
            partial: None,
            partial_lo: 0,
        }
    }

    /// Whether the text so far is a whole sentence of the grammar.
    pub fn can_end(&self) -> bool {
        self.partial.is_none() && self.stacks.iter().any(Vec::is_empty)
    }

    /// Whether nothing more may follow.
    pub fn is_done(&self) -> bool {
        self.partial.is_none() && self.stacks.iter().all(Vec::is_empty)
    }

    /// Reads one byte; `false` (and unchanged) when the grammar cannot take it.
    pub fn advance_byte(&mut self, b: u8) -> bool {
        match step_byte(
            &self.grammar,
            &self.stacks,
            self.partial,
            self.partial_lo,
            b,
        ) {
            Step::Dead => false,
            Step::Partial(partial, lo) => {
                self.partial = Some(partial);
                self.partial_lo = lo;
                true
            }
            Step::Char(c) => {
                let next = accept_char(&self.grammar, &self.stacks, c);
                if next.is_empty() {
                    return false;
                }
                self.stacks = next;
                self.partial = None;
                true
            }
        }
    }

    /// Reads `bytes`; `false` (and unchanged) when the grammar cannot take all of them.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut next = self.clone();
        for &b in bytes {
            if !next.advance_byte(b) {
                return false;
            }
        }
        *self = next;
        true
    }

    /// Whether `bytes` may come next.
    pub fn allows(&self, bytes: &[u8]) -> bool {
        let mut probe = self.clone();
        bytes.iter().all(|&b| probe.advance_byte(b))
    }
}

/// What a byte does to a matcher: nothing allowed, a character still partly read (its bits so
/// far and the bytes to come, and the lowest code point it can be), or a whole character.
enum Step {
    Dead,
    Partial((u32, u8), u32),
    Char(u32),
}

/// Reads byte `b` after `partial` (UTF-8 decoding, checked against what `stacks` take): the
/// stacks themselves change only once a character is whole ([`accept_char`]).
fn step_byte(
    grammar: &Grammar,
    stacks: &[Stack],
    partial: Option<(u32, u8)>,
    partial_lo: u32,
    b: u8,
) -> Step {
    match partial {
        None if b < 0x80 => Step::Char(u32::from(b)),
        None => {
            let (bits, more, lo, hi) = match b {
                0xC2..=0xDF => (u32::from(b & 0x1F), 1, 0x80, 0x7FF),
                0xE0..=0xEF => (u32::from(b & 0x0F), 2, 0x800, 0xFFFF),
                0xF0..=0xF4 => (u32::from(b & 0x07), 3, 0x1_0000, 0x10_FFFF),
                _ => return Step::Dead,
            };
            let lo = lo.max(bits << (6 * more));
            let hi = hi.min(((bits + 1) << (6 * more)) - 1);
            if could_take(grammar, stacks, lo, hi) {
                Step::Partial((bits, more), lo)
            } else {
                Step::Dead
            }
        }
        Some((bits, more)) => {
            if b & 0xC0 != 0x80 {
                return Step::Dead;
            }
            let bits = (bits << 6) | u32::from(b & 0x3F);
            let more = more - 1;
            if more == 0 {
                // No overlong forms, no surrogates: valid UTF-8 only.
                return if bits < partial_lo || (0xD800..=0xDFFF).contains(&bits) {
                    Step::Dead
                } else {
                    Step::Char(bits)
                };
            }
            let lo = (bits << (6 * u32::from(more))).max(partial_lo);
            let hi = ((bits + 1) << (6 * u32::from(more))) - 1;
            if could_take(grammar, stacks, lo, hi) {
                Step::Partial((bits, more), partial_lo)
            } else {
                Step::Dead
            }
        }
    }
}

/// Whether a character in `lo..=hi` (of a partly read one) may come next: a valid one
/// (no surrogates, at most U+10FFFF) that a stack takes.
fn could_take(grammar: &Grammar, stacks: &[Stack], lo: u32, hi: u32) -> bool {
    let hi = hi.min(0x10_FFFF);
    let surrogates = (0xD800..=0xDFFF).contains(&lo) && (0xD800..=0xDFFF).contains(&hi);
    lo <= hi
        && !surrogates
        && stacks
            .iter()
            .any(|s| grammar.class_at(s).is_some_and(|k| k.intersects(lo, hi)))
}

/// The stacks after character `c`: each stack whose top takes it, moved on and expanded.
fn accept_char(grammar: &Grammar, stacks: &[Stack], c: u32) -> Vec<Stack> {
    let mut out = Vec::new();
    for s in stacks {
        if grammar.class_at(s).is_some_and(|k| k.matches(c)) {
            let mut n = s.clone();
            if let Some(t) = n.last_mut() {
                t.elem += 1;
            }
            grammar.expand(n, &mut out);
            if out.len() > MAX_STACKS {
                break;
            }
        }
    }
    dedup(&mut out);
    out
}

/// Which of `stacks` take character `c`, as bits (`None` past 64 stacks): stacks that take
/// the same characters lead to the same next stacks.
fn signature(grammar: &Grammar, stacks: &[Stack], c: u32) -> Option<u64> {
    if stacks.len() > 64 {
        return None;
    }
    let mut sig = 0u64;
    for (i, s) in stacks.iter().enumerate() {
        if grammar.class_at(s).is_some_and(|k| k.matches(c)) {
            sig |= 1 << i;
        }
    }
    Some(sig)
}

fn dedup(stacks: &mut Vec<Stack>) {
    let mut seen = std::collections::HashSet::new();
    stacks.retain(|s| seen.insert(s.clone()));
}

// ---------------------------------------------------------------------------------------------
// The vocabulary

/// The vocabulary's token bytes as a prefix tree (special tokens left out).
#[derive(Debug)]
pub struct VocabTrie {
    /// Node 0 is the root. Children of a node are contiguous and sorted by byte.
    nodes: Vec<TrieNode>,
    /// Each token's bytes (empty for special tokens).
    bytes: Vec<Vec<u8>>,
    /// The tokens ending at each node, by [`TrieNode::token_start`].
    ends: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct TrieNode {
    byte: u8,
    first_child: u32,
    children: u32,
    /// Tokens ending here: `tokens[token_start..token_start + token_count]` of `ends`.
    token_start: u32,
    token_count: u32,
}

impl VocabTrie {
    /// From each token's bytes (`None`: a special token, never allowed).
    pub fn new(tokens: Vec<Option<Vec<u8>>>) -> Self {
        let mut list: Vec<(Vec<u8>, u32)> = tokens
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let b = b.as_ref().filter(|b| !b.is_empty())?;
                Some((b.clone(), u32::try_from(i).ok()?))
            })
            .collect();
        list.sort();
        let mut nodes = vec![TrieNode {
            byte: 0,
            first_child: 0,
            children: 0,
            token_start: 0,
            token_count: 0,
        }];
        let mut ends: Vec<u32> = Vec::new();
        build(&list, 0, 0, &mut nodes, &mut ends);
        let bytes = tokens.into_iter().map(Option::unwrap_or_default).collect();
        Self { nodes, bytes, ends }
    }

    /// The bytes of token `id`.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Number of token ids.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Tokens' bytes and ids, sorted.
type Entries<'a> = &'a [(Vec<u8>, u32)];

/// Builds the children of `node` from `list` (sorted, all sharing `depth` bytes of prefix).
fn build(
    list: &[(Vec<u8>, u32)],
    depth: usize,
    node: usize,
    nodes: &mut Vec<TrieNode>,
    ends: &mut Vec<u32>,
) {
    // Tokens ending exactly here come first in sorted order.
    let ending = list.iter().take_while(|(b, _)| b.len() == depth).count();
    nodes[node].token_start = u32::try_from(ends.len()).unwrap_or(u32::MAX);
    nodes[node].token_count = u32::try_from(ending).unwrap_or(u32::MAX);
    ends.extend(list[..ending].iter().map(|(_, id)| *id));
    let rest = &list[ending..];
    // Group by the next byte.
    let mut groups: Vec<(u8, Entries<'_>)> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let b = rest[i].0[depth];
        let j = i + rest[i..].iter().take_while(|(x, _)| x[depth] == b).count();
        groups.push((b, &rest[i..j]));
        i = j;
    }
    let first = nodes.len();
    nodes[node].first_child = u32::try_from(first).unwrap_or(u32::MAX);
    nodes[node].children = u32::try_from(groups.len()).unwrap_or(u32::MAX);
    for (b, _) in &groups {
        nodes.push(TrieNode {
            byte: *b,
            first_child: 0,
            children: 0,
            token_start: 0,
            token_count: 0,
        });
    }
    for (k, (_, group)) in groups.iter().enumerate() {
        build(group, depth + 1, first + k, nodes, ends);
    }
}

/// What a generation's sampling must keep to: a grammar over the vocabulary.
#[derive(Debug, Clone)]
pub struct Constraint {
    matcher: Matcher,
    trie: Arc<VocabTrie>,
    /// Tokens that end the text, allowed only once the grammar is complete.
    eos: Vec<u32>,
    /// Steps whose first choice was refused, so the vocabulary was masked (statistics).
    pub masked_steps: usize,
    /// Time spent checking, masking and advancing (statistics, for `studio bench generate`).
    pub time: std::time::Duration,
    /// The last masks made, by the matcher's state: inside a `*` loop (a JSON string, an
    /// array) the state comes back token after token, and its mask is reused.
    masks: Vec<(MaskKey, Arc<[bool]>)>,
    /// The matcher states met while masking and their byte transitions, kept for the whole
    /// generation: the next step's walk starts from a state the last one reached, so inside
    /// a bounded string (a new state at every character) most transitions are known already.
    automaton: Automaton,
}

/// Matcher states, interned, with a table of their byte transitions. A state is a set of
/// stacks after a whole character (a "full" state, interned by its stacks) and a partly read
/// character, so the bytes inside a character cost no copy of the stacks.
#[derive(Debug, Clone, Default)]
struct Automaton {
    /// The stacks of each full state.
    full: Vec<Vec<Stack>>,
    full_ids: FxHashMap<Vec<Stack>, u32>,
    /// Per full state: the full state a character leads to, by the character's
    /// [`signature`] (which stacks take it).
    by_signature: Vec<Vec<(u64, u32)>>,
    /// Each state: its full state and partly read character.
    states: Vec<StateKey>,
    ids: FxHashMap<StateKey, u32>,
    table: Vec<[u32; 256]>,
}

/// A state of the [`Automaton`]: its full state, the partly read character and its lowest
/// possible code point.
type StateKey = (u32, Option<(u32, u8)>, u32);

/// A transition not worked out yet.
const UNKNOWN: u32 = u32::MAX;
/// No way on.
const DEAD: u32 = u32::MAX - 1;

impl Automaton {
    /// The full state of `stacks`, interned if new; `None` when the automaton is full.
    fn intern_full(&mut self, stacks: Vec<Stack>) -> Option<u32> {
        if let Some(&id) = self.full_ids.get(&stacks) {
            return Some(id);
        }
        if self.full.len() >= MAX_MASK_STATES {
            return None;
        }
        let id = u32::try_from(self.full.len()).ok()?;
        self.full.push(stacks.clone());
        self.by_signature.push(Vec::new());
        self.full_ids.insert(stacks, id);
        Some(id)
    }

    /// The state of full state `full` with `partial` read, interned if new.
    fn intern(&mut self, full: u32, partial: Option<(u32, u8)>, lo: u32) -> Option<u32> {
        let key = (full, partial, lo);
        if let Some(&id) = self.ids.get(&key) {
            return Some(id);
        }
        if self.states.len() >= MAX_MASK_STATES {
            return None;
        }
        let id = u32::try_from(self.states.len()).ok()?;
        self.states.push(key);
        self.table.push([UNKNOWN; 256]);
        self.ids.insert(key, id);
        Some(id)
    }

    /// The state a matcher is in.
    fn intern_matcher(&mut self, m: &Matcher) -> Option<u32> {
        let full = self.intern_full(m.stacks.clone())?;
        self.intern(full, m.partial, m.partial_lo)
    }

    /// Where byte `b` leads from `state`: a state, [`DEAD`], or `None` when the automaton is
    /// full. `work` counts the stacks looked at.
    fn transition(
        &mut self,
        grammar: &Grammar,
        state: u32,
        b: u8,
        work: &mut usize,
    ) -> Option<u32> {
        let (full, partial, lo) = self.states[state as usize];
        let stacks = &self.full[full as usize];
        *work += stacks.len().max(1);
        match step_byte(grammar, stacks, partial, lo, b) {
            Step::Dead => Some(DEAD),
            Step::Partial(p, lo) => self.intern(full, Some(p), lo),
            Step::Char(c) => {
                let sig = signature(grammar, stacks, c);
                if let Some(sig) = sig
                    && let Some(&(_, next)) = self.by_signature[full as usize]
                        .iter()
                        .find(|(s, _)| *s == sig)
                {
                    return Some(next);
                }
                let next = accept_char(grammar, stacks, c);
                let next = if next.is_empty() {
                    DEAD
                } else {
                    let f = self.intern_full(next)?;
                    self.intern(f, None, 0)?
                };
                if let Some(sig) = sig {
                    self.by_signature[full as usize].push((sig, next));
                }
                Some(next)
            }
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A matcher's state, as far as the mask depends on it.
type MaskKey = (Vec<Stack>, Option<(u32, u8)>, u32);

/// The most matcher states one vocabulary mask may meet (each with a 1 KiB table of its
/// byte transitions).
const MAX_MASK_STATES: usize = 1 << 16;

/// States kept from one mask to the next: past this many (16 MiB of tables), the automaton
/// starts afresh before a mask.
const KEPT_MASK_STATES: usize = 1 << 14;

/// Masks kept per generation (each one byte per token of the vocabulary).
const MASK_CACHE: usize = 16;

impl Constraint {
    /// `grammar` over the vocabulary `trie`; `eos` end the text.
    pub fn new(grammar: Arc<Grammar>, trie: Arc<VocabTrie>, eos: &[u32]) -> Self {
        Self {
            matcher: Matcher::new(grammar),
            trie,
            eos: eos.to_vec(),
            masked_steps: 0,
            time: std::time::Duration::ZERO,
            masks: Vec::new(),
            automaton: Automaton::default(),
        }
    }

    /// Whether `id` may come next.
    pub fn allows(&mut self, id: u32) -> bool {
        let start = std::time::Instant::now();
        let ok = if self.eos.contains(&id) {
            self.matcher.can_end()
        } else {
            let bytes = self.trie.token_bytes(id);
            !bytes.is_empty() && self.matcher.allows(bytes)
        };
        self.time += start.elapsed();
        ok
    }

    /// Sets the logits of every token that may not come next to −∞; returns how many may. A
    /// grammar too ambiguous to mask in bounded time is an [`Error::InvalidParameter`].
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<usize> {
        let start = std::time::Instant::now();
        let count = self.mask_inner(logits);
        self.time += start.elapsed();
        count
    }

    fn mask_inner(&mut self, logits: &mut [f32]) -> Result<usize> {
        self.masked_steps += 1;
        let m = &self.matcher;
        let key: MaskKey = (m.stacks.clone(), m.partial, m.partial_lo);
        let allowed = if let Some(i) = self.masks.iter().position(|(k, _)| *k == key) {
            // Most recently used last.
            let hit = self.masks.remove(i);
            let allowed = hit.1.clone();
            self.masks.push(hit);
            allowed
        } else {
            if self.automaton.states.len() > KEPT_MASK_STATES {
                self.automaton.clear();
            }
            let allowed = match self.allowed(logits.len()) {
                // The kept states filled the automaton: once more from nothing.
                Err(_) if !self.automaton.states.is_empty() => {
                    self.automaton.clear();
                    self.allowed(logits.len())?
                }
                other => other?,
            };
            let allowed: Arc<[bool]> = allowed.into();
            if self.masks.len() >= MASK_CACHE {
                self.masks.remove(0);
            }
            self.masks.push((key, allowed.clone()));
            allowed
        };
        let mut count = 0;
        for (l, ok) in logits.iter_mut().zip(allowed.iter()) {
            if *ok {
                count += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in logits.iter_mut().skip(allowed.len()) {
            *l = f32::NEG_INFINITY;
        }
        Ok(count)
    }

    /// Which of the first `n` tokens may come next: one walk of the vocabulary trie. The
    /// matcher states met on the way are interned and their byte transitions kept in a table
    /// ([`Automaton`], kept between steps), so a state reached again (inside a string, the
    /// same state follows any ordinary character) costs a table read, not a copy and an
    /// advance.
    fn allowed(&mut self, n: usize) -> Result<Vec<bool>> {
        let too_ambiguous = || {
            Error::InvalidParameter(
                "the grammar is too ambiguous to follow (too many readings of the text at \
                 once); simplify it"
                    .into(),
            )
        };
        let mut allowed = vec![false; n];
        let trie = &*self.trie;
        let ends = &trie.ends;
        let grammar = &*self.matcher.grammar;
        let auto = &mut self.automaton;
        let root = auto
            .intern_matcher(&self.matcher)
            .ok_or_else(too_ambiguous)?;
        let mut work = 0usize;
        let mut stack: Vec<(u32, u32)> = vec![(0, root)];
        while let Some((node, state)) = stack.pop() {
            let n = trie.nodes[node as usize];
            for c in n.first_child..n.first_child + n.children {
                let child = trie.nodes[c as usize];
                let byte = usize::from(child.byte);
                let mut next = auto.table[state as usize][byte];
                if next == UNKNOWN {
                    next = auto
                        .transition(grammar, state, child.byte, &mut work)
                        .ok_or_else(too_ambiguous)?;
                    if work > MAX_MASK_WORK {
                        return Err(too_ambiguous());
                    }
                    auto.table[state as usize][byte] = next;
                }
                if next == DEAD {
                    continue;
                }
                let start = child.token_start as usize;
                for &id in &ends[start..start + child.token_count as usize] {
                    if let Some(a) = allowed.get_mut(id as usize) {
                        *a = true;
                    }
                }
                if child.children > 0 {
                    stack.push((c, next));
                }
            }
        }
        if self.matcher.can_end() {
            for &e in &self.eos {
                if let Some(a) = allowed.get_mut(e as usize) {
                    *a = true;
                }
            }
        }
        Ok(allowed)
    }

    /// Takes token `id` as generated.
    pub fn accept(&mut self, id: u32) -> Result<()> {
        if self.eos.contains(&id) {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let bytes = self.trie.token_bytes(id).to_vec();
        let ok = !bytes.is_empty() && self.matcher.advance(&bytes);
        self.time += start.elapsed();
        if !ok {
            return Err(Error::InvalidParameter(format!(
                "token {id} does not fit the grammar"
            )));
        }
        Ok(())
    }

    /// Whether the grammar is complete and allows nothing more (the text must end).
    pub fn is_done(&self) -> bool {
        self.matcher.is_done()
    }
}

/// The vocabulary trie of `tokenizer` (special tokens left out), for [`Constraint`]s: built
/// on first use and kept with the tokenizer (and its clones).
pub fn vocab_trie(tokenizer: &crate::llm::text::Tokenizer) -> Arc<VocabTrie> {
    tokenizer
        .vocab_trie_cell()
        .get_or_init(|| build_vocab_trie(tokenizer))
        .clone()
}

fn build_vocab_trie(tokenizer: &crate::llm::text::Tokenizer) -> Arc<VocabTrie> {
    let n = tokenizer.vocab_size();
    let specials = tokenizer.special_ids();
    let tokens = (0..n)
        .map(|i| {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            (!specials.contains(&id)).then(|| tokenizer.token_bytes(id))
        })
        .collect();
    Arc::new(VocabTrie::new(tokens))
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    fn matches(g: &str, text: &str) -> bool {
        let g = Arc::new(Grammar::parse(g).expect("grammar"));
        let mut m = Matcher::new(g);
        m.advance(text.as_bytes()) && m.can_end()
    }

    #[test]
    fn gbnf_literals_classes_groups_and_repetitions() {
        let g = r#"
            root ::= "a" [0-9]+ ("x" | "yz")? tail{2,3}
            tail ::= [^a-c0-9xyz]   # anything but these
        "#;
        assert!(matches(g, "a12xdd"));
        assert!(matches(g, "a7yzddd"));
        assert!(matches(g, "a0éé"), "multi-byte characters");
        assert!(!matches(g, "a12xd"), "too few");
        assert!(!matches(g, "a12xdddd"), "too many");
        assert!(!matches(g, "ax dd"), "needs a digit");
        assert!(!matches(g, "a1xab"), "excluded");
        let words = "root ::= word (\" \" word)*\nword ::= [a-z]+";
        assert!(matches(words, "hello big world"));
        assert!(!matches(words, "hello  world"));
    }

    #[test]
    fn bad_grammars_are_refused_with_the_reason() {
        for (g, words) in [
            ("root ::= x", "`x` is used but not defined"),
            ("start ::= \"a\"", "no `root`"),
            ("root ::= root \"a\" | \"b\"", "left-recursive"),
            ("root ::= (\"a\"", "`)`"),
            ("root ::= \"a\"{2000}", "repetition"),
            ("root ::= \"a\"\nroot ::= \"b\"", "twice"),
        ] {
            let e = Grammar::parse(g).expect_err(g);
            assert!(e.to_string().contains(words), "{g}: {e}");
        }
        // Deep nesting is refused before the parser recurses into it; an explosion of
        // alternatives stops at the bound.
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(10_000), ")".repeat(10_000));
        let e = Grammar::parse(&deep).expect_err("deep");
        assert!(e.to_string().contains("nested deeper"), "{e}");
        let mut wide = String::from("root ::= r0\n");
        for i in 0..40 {
            let _ = writeln!(wide, "r{i} ::= r{} | r{} \"x\"", i + 1, i + 1);
        }
        wide.push_str("r40 ::= \"a\" | \"b\"\n");
        let g = Arc::new(Grammar::parse(&wide).expect("wide"));
        let m = Matcher::new(g);
        assert!(m.stacks.len() <= MAX_STACKS + 1, "{}", m.stacks.len());
    }

    #[test]
    fn partial_characters_are_checked_against_what_may_follow() {
        let g = Arc::new(Grammar::parse("root ::= [é-ë] \"!\"").expect("grammar"));
        let m = Matcher::new(g);
        let e = "é".as_bytes();
        assert!(m.allows(&e[..1]), "the first byte of é");
        assert!(!m.allows("a".as_bytes()));
        assert!(!m.allows("ñ".as_bytes()), "outside the class");
        assert!(
            !m.allows(&"中".as_bytes()[..1]),
            "a 3-byte character can't be in é-ë"
        );
        assert!(m.allows("é!".as_bytes()));
        // Overlong forms and surrogates are not UTF-8.
        let any = Matcher::new(Arc::new(Grammar::parse("root ::= .").expect("g")));
        assert!(!any.allows(&[0xC1, 0x81]), "overlong A");
        assert!(!any.allows(&[0xE0, 0x80, 0x80]), "overlong NUL");
        assert!(!any.allows(&[0xED, 0xA0, 0x80]), "a surrogate");
        assert!(!any.allows(&[0xED, 0xA0]), "no surrogate can follow");
        assert!(!any.allows(&[0xF4, 0x90]), "beyond U+10FFFF");
        assert!(any.allows("中".as_bytes()));
    }

    #[test]
    fn the_vocabulary_mask_allows_exactly_the_tokens_that_fit() {
        let vocab: Vec<Option<Vec<u8>>> = ["{", "}", "{\"", "a", "ab", "\"", ":", " ", "<eos>"]
            .iter()
            .enumerate()
            .map(|(i, t)| (i != 8).then(|| t.as_bytes().to_vec()))
            .collect();
        let trie = Arc::new(VocabTrie::new(vocab));
        let g = Arc::new(Grammar::parse(r#"root ::= "{" "\"" [a-b]+ "\"" "}""#).expect("g"));
        let mut c = Constraint::new(g, trie, &[8]);
        let mut logits = vec![0.0f32; 9];
        assert_eq!(c.mask(&mut logits).expect("mask"), 2, "{{ and {{\"");
        assert!(logits[0].is_finite() && logits[2].is_finite() && logits[1].is_infinite());
        c.accept(2).expect("{\"");
        let mut logits = vec![0.0f32; 9];
        c.mask(&mut logits).expect("mask");
        let ok: Vec<usize> = (0..9).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(ok, [3, 4]);
        for id in [4, 5, 1] {
            assert!(c.allows(id), "{id}");
            c.accept(id).expect("fits");
        }
        assert!(
            c.allows(8) && c.is_done(),
            "complete: only the end may follow"
        );
        assert!(c.accept(3).is_err());
    }

    #[test]
    fn a_state_that_comes_back_reuses_its_mask() {
        let vocab: Vec<Option<Vec<u8>>> = ["a", "aa", "b", "<eos>"]
            .iter()
            .enumerate()
            .map(|(i, t)| (i != 3).then(|| t.as_bytes().to_vec()))
            .collect();
        let trie = Arc::new(VocabTrie::new(vocab));
        let g = Arc::new(Grammar::parse(r#"root ::= "a"*"#).expect("g"));
        let mut c = Constraint::new(g, trie, &[3]);
        let mut first = vec![0.0f32; 4];
        assert_eq!(c.mask(&mut first).expect("mask"), 3, "a, aa and the end");
        for _ in 0..5 {
            c.accept(1).expect("aa");
            let mut again = vec![0.0f32; 4];
            c.mask(&mut again).expect("mask");
            assert_eq!(again, first, "the same state, the same mask");
        }
        assert_eq!(c.masks.len(), 1, "made once, reused");
    }

    #[test]
    fn the_automaton_is_kept_between_masks_and_gives_the_same_masks() {
        // A bounded string: a new state at every character, each reached by the last walk.
        let words = ["a", "b", "ab", "ba", "aab", "\"", "a\"", "<eos>"];
        let vocab: Vec<Option<Vec<u8>>> = words
            .iter()
            .enumerate()
            .map(|(i, t)| (i != 7).then(|| t.as_bytes().to_vec()))
            .collect();
        let trie = Arc::new(VocabTrie::new(vocab));
        let g = Arc::new(Grammar::parse(r#"root ::= "\"" [ab]{0,6} "\"""#).expect("g"));
        let mut kept = Constraint::new(g.clone(), trie.clone(), &[7]);
        let script = [5, 2, 4, 6];
        for (step, &id) in script.iter().enumerate() {
            let mut a = vec![0.0f32; 8];
            kept.mask(&mut a).expect("mask");
            // A fresh constraint at the same point masks the same way.
            let mut fresh = Constraint::new(g.clone(), trie.clone(), &[7]);
            for &done in &script[..step] {
                fresh.accept(done).expect("fits");
            }
            let mut b = vec![0.0f32; 8];
            fresh.mask(&mut b).expect("mask");
            assert_eq!(a, b, "step {step}");
            let before = kept.automaton.states.len();
            kept.accept(id).expect("fits");
            if step > 0 {
                assert!(before > step, "states are kept: {before}");
            }
        }
        assert!(kept.is_done());
    }

    #[test]
    fn every_mask_is_what_the_matcher_allows_token_by_token() {
        // A schema's grammar over a vocabulary of JSON pieces, digits, a multi-byte character
        // and pieces that must be refused mid-number: at each step the mask (from the kept
        // automaton) allows exactly the tokens the matcher itself takes.
        let schema = serde_json::json!({"type": "object", "properties": {
            "mood": {"enum": ["good", "bad"]}, "score": {"type": "integer"}},
            "required": ["mood", "score"]});
        let gbnf = schema::json_schema_to_gbnf(&schema).expect("gbnf");
        let g = Arc::new(Grammar::parse(&gbnf).expect("grammar"));
        let pieces = [
            "{",
            "}",
            "\"",
            "mood",
            ":",
            ",",
            " ",
            "-",
            "0",
            "1",
            "9",
            ".",
            ".0",
            "0}",
            "-0",
            "bad",
            "good",
            "\"mood\"",
            ":\"",
            "\",",
            "12",
            "é",
            "\n",
            "}}",
            "0.",
            "-0.0",
            "\"score\":",
            "a",
        ];
        let vocab: Vec<Option<Vec<u8>>> =
            pieces.iter().map(|p| Some(p.as_bytes().to_vec())).collect();
        let mut c = Constraint::new(g, Arc::new(VocabTrie::new(vocab)), &[]);
        // {"mood":"bad","score":-0}
        for id in [0, 17, 18, 15, 19, 26, 14, 1] {
            let mut logits = vec![0.0f32; pieces.len()];
            c.mask(&mut logits).expect("mask");
            for (t, l) in logits.iter().enumerate() {
                let takes = c.matcher.allows(pieces[t].as_bytes());
                assert_eq!(
                    l.is_finite(),
                    takes,
                    "{:?} before {:?}",
                    pieces[t],
                    pieces[id]
                );
            }
            c.accept(u32::try_from(id).expect("id")).expect("fits");
        }
        assert!(c.is_done() || c.matcher.can_end());
    }
}
