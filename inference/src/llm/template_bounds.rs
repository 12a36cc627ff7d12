//! Keeping the values a chat template builds bounded.
//!
//! Fuel stops long loops and the output cap long renderings, but a short loop can still double
//! a string forty times (`{% set ns.s = ns.s ~ ns.s %}`), or a macro recursion double a
//! captured block, and take all memory before either trips. So before it is compiled, the
//! template is instrumented: every value it reads or computes (variables, `~` `+` `*`,
//! filters, calls, list and map literals) passes through [`BOUND_FN`], which refuses a value
//! larger than [`MAX_VALUE_BYTES`]. A value can then grow at most one step (about twice its
//! size) past the limit before the next use stops the rendering. The filters and methods that
//! multiply sizes in one step (`replace`, `join`, `indent`, `format`) check the size of their
//! result before building it.
//!
//! The rewriting works on minijinja's syntax tree (its `unstable_machinery`): a call
//! `__studio_bounded(` … `)` is inserted around each value expression's source span, which
//! keeps every line where it was (error locations stay right).

use minijinja::machinery::{WhitespaceConfig, ast, parse};
use minijinja::syntax::SyntaxConfig;
use std::sync::Arc;

use minijinja::value::{
    Enumerator, Kwargs, Object, ObjectRepr, Rest, StringInput, Value, ValueKind,
};
use minijinja::{Error as JinjaError, ErrorKind, State};

/// The function the instrumented template calls on its values.
pub(crate) const BOUND_FN: &str = "__studio_bounded";

/// The largest value (string bytes, or items and string bytes of a structure) a template may
/// build: the rendered prompt's own limit.
pub(crate) const MAX_VALUE_BYTES: usize = crate::llm::template::MAX_RENDERED_BYTES;

/// What each item of a list or map counts for, besides its own content (a value's slot).
const ITEM_BYTES: usize = 24;

/// Widths (`indent`, `format`'s `%5000s`) above this are refused.
const MAX_WIDTH: usize = 4096;

/// The source of the errors this module raises, so that the rendering can say which
/// template was stopped.
#[derive(Debug)]
pub(crate) struct TooLarge(pub(crate) String);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooLarge {}

fn refuse(message: String) -> JinjaError {
    JinjaError::new(ErrorKind::InvalidOperation, message.clone()).with_source(TooLarge(message))
}

fn too_large(what: &str) -> JinjaError {
    refuse(format!(
        "it built {what} larger than {} MiB (a template that grows values without bound)",
        MAX_VALUE_BYTES >> 20
    ))
}

/// `source` with its value expressions wrapped in [`BOUND_FN`] calls (whitespace settings as
/// the chat environment's).
pub(crate) fn instrument(source: &str, name: &str) -> Result<String, JinjaError> {
    let whitespace = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    // A unit struct unless minijinja's `custom_syntax` is on, when it has fields.
    #[allow(clippy::default_constructed_unit_structs)]
    let syntax = SyntaxConfig::default();
    let tree = parse(source, name, syntax, whitespace)?;
    let mut marks = Marks {
        src: source,
        spans: Vec::new(),
        depth: 0,
    };
    marks.stmt(&tree);
    Ok(marks.apply())
}

/// Where to insert `BOUND_FN(` and `)`.
struct Marks<'s> {
    src: &'s str,
    /// (start, end, depth) of each wrapped span.
    spans: Vec<(usize, usize, usize)>,
    depth: usize,
}

impl Marks<'_> {
    fn apply(mut self) -> String {
        let source = self.src;
        // (offset, closes before opens, inner closes first / outer opens first, text)
        let mut edits: Vec<(usize, u8, isize, &str)> = Vec::with_capacity(self.spans.len() * 2);
        for (start, end, depth) in self.spans.drain(..) {
            let depth = depth as isize;
            edits.push((start, 1, depth, "("));
            edits.push((end, 0, -depth, ")"));
        }
        edits.sort_unstable();
        let mut out = String::with_capacity(source.len() + edits.len() * (BOUND_FN.len() + 1));
        let mut at = 0;
        for (offset, _, _, text) in edits {
            let offset = offset.min(source.len());
            out.push_str(&source[at..offset]);
            if text == "(" {
                out.push_str(BOUND_FN);
            }
            out.push_str(text);
            at = offset;
        }
        out.push_str(&source[at..]);
        out
    }

    fn wrap(&mut self, e: &ast::Expr<'_>) {
        let (start, end) = (start_of(self.src, e), end_of(e));
        if start < end {
            self.spans.push((start, end, self.depth));
        }
    }

    fn body(&mut self, body: &[ast::Stmt<'_>]) {
        for s in body {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, stmt: &ast::Stmt<'_>) {
        use ast::Stmt as S;
        match stmt {
            S::Template(t) => self.body(&t.children),
            S::EmitExpr(e) => self.value(&e.expr),
            S::ForLoop(f) => {
                self.value(&f.iter);
                if let Some(e) = &f.filter_expr {
                    self.value(e);
                }
                self.body(&f.body);
                self.body(&f.else_body);
            }
            S::IfCond(c) => {
                self.value(&c.expr);
                self.body(&c.true_body);
                self.body(&c.false_body);
            }
            S::WithBlock(w) => {
                for (_, value) in &w.assignments {
                    self.value(value);
                }
                self.body(&w.body);
            }
            S::Set(s) => self.value(&s.expr),
            S::SetBlock(s) => {
                if let Some(f) = &s.filter {
                    self.value(f);
                }
                self.body(&s.body);
            }
            S::AutoEscape(a) => {
                self.value(&a.enabled);
                self.body(&a.body);
            }
            S::FilterBlock(f) => {
                self.value(&f.filter);
                self.body(&f.body);
            }
            S::Block(b) => self.body(&b.body),
            S::Import(i) => self.value(&i.expr),
            S::FromImport(i) => self.value(&i.expr),
            S::Extends(e) => self.value(&e.name),
            S::Include(i) => self.value(&i.name),
            S::Macro(m) => self.macro_decl(m),
            S::CallBlock(c) => {
                self.call_parts(&c.call);
                self.macro_decl(&c.macro_decl);
            }
            S::Do(d) => self.call_parts(&d.call),
            S::EmitRaw(_) | S::Continue(_) | S::Break(_) => {}
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) {
        for d in &m.defaults {
            self.value(d);
        }
        self.body(&m.body);
    }

    /// Walks `e`'s children, wrapping `e` itself first when `wrap`.
    fn nested(&mut self, e: &ast::Expr<'_>, wrap: bool, walk: impl FnOnce(&mut Self)) {
        if wrap {
            self.wrap(e);
            self.depth += 1;
        }
        walk(self);
        if wrap {
            self.depth -= 1;
        }
    }

    /// An expression whose value the template uses.
    fn value(&mut self, e: &ast::Expr<'_>) {
        use ast::Expr as E;
        match e {
            E::Var(_) => self.wrap(e),
            E::Const(_) => {}
            E::Slice(s) => {
                self.value(&s.expr);
                for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.value(part);
                }
            }
            E::UnaryOp(u) => self.value(&u.expr),
            E::BinOp(b) => {
                let grows = matches!(
                    b.op,
                    ast::BinOpKind::Add | ast::BinOpKind::Mul | ast::BinOpKind::Concat
                );
                self.nested(e, grows, |m| {
                    m.value(&b.left);
                    m.value(&b.right);
                });
            }
            E::Compare(c) => {
                self.value(&c.expr);
                for op in &c.ops {
                    self.value(&op.expr);
                }
            }
            E::IfExpr(i) => {
                self.value(&i.test_expr);
                self.value(&i.true_expr);
                if let Some(f) = &i.false_expr {
                    self.value(f);
                }
            }
            E::Filter(f) => {
                // `{% set x | upper %}` and `{% filter upper %}` filter a block: no value
                // of their own to wrap.
                self.nested(e, filter_has_input(f), |m| {
                    if let Some(input) = &f.expr {
                        m.value(input);
                    }
                    m.args(&f.args);
                });
            }
            E::Test(t) => {
                self.value(&t.expr);
                self.args(&t.args);
            }
            E::GetAttr(g) => self.value(&g.expr),
            E::GetItem(g) => {
                self.value(&g.expr);
                self.value(&g.subscript_expr);
            }
            E::Call(c) => self.nested(e, true, |m| m.call_parts(c)),
            E::List(l) => self.nested(e, true, |m| {
                for item in &l.items {
                    m.value(item);
                }
            }),
            E::Map(map) => self.nested(e, true, |m| {
                for (k, v) in map.keys.iter().zip(&map.values) {
                    m.value(k);
                    m.value(v);
                }
            }),
        }
    }

    /// A call's callee and arguments (not the call's own value). The callee stays as it is:
    /// a function or macro name, or `obj.method` (whose object is a value).
    fn call_parts(&mut self, c: &ast::Call<'_>) {
        match &c.expr {
            ast::Expr::Var(_) => {}
            ast::Expr::GetAttr(g) => self.value(&g.expr),
            other => self.value(other),
        }
        self.args(&c.args);
    }

    fn args(&mut self, args: &[ast::CallArg<'_>]) {
        for a in args {
            match a {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.value(e),
            }
        }
    }
}

fn span_of(e: &ast::Expr<'_>) -> minijinja::machinery::Span {
    use ast::Expr as E;
    match e {
        E::Var(x) => x.span(),
        E::Const(x) => x.span(),
        E::Slice(x) => x.span(),
        E::UnaryOp(x) => x.span(),
        E::BinOp(x) => x.span(),
        E::Compare(x) => x.span(),
        E::IfExpr(x) => x.span(),
        E::Filter(x) => x.span(),
        E::Test(x) => x.span(),
        E::GetAttr(x) => x.span(),
        E::GetItem(x) => x.span(),
        E::Call(x) => x.span(),
        E::List(x) => x.span(),
        E::Map(x) => x.span(),
    }
}

/// Where `e`'s text starts. A postfix node's span (a filter's `| name(args)`, an attribute's
/// `.name`, a call's arguments) may start after its operand, so the operand's start counts,
/// with the parentheses around it: `(a ~ b)|upper` starts at `(`.
fn start_of(src: &str, e: &ast::Expr<'_>) -> usize {
    use ast::Expr as E;
    let own = span_of(e).start_offset as usize;
    let operand = match e {
        E::Filter(f) => f.expr.as_ref(),
        E::Test(t) => Some(&t.expr),
        E::GetAttr(g) => Some(&g.expr),
        E::GetItem(g) => Some(&g.expr),
        E::Slice(s) => Some(&s.expr),
        E::Call(c) => Some(&c.expr),
        E::BinOp(b) => Some(&b.left),
        E::Compare(c) => Some(&c.expr),
        E::IfExpr(i) => Some(&i.true_expr),
        _ => None,
    };
    let Some(operand) = operand else {
        return own;
    };
    let (mut start, end) = (start_of(src, operand), end_of(operand));
    if start >= own {
        return own;
    }
    // Closing parentheses between the operand and this node's own part are the operand's.
    let groups = src
        .get(end..own.max(end))
        .map_or(0, |between| between.bytes().filter(|&b| b == b')').count());
    for _ in 0..groups {
        let before = src[..start].trim_end();
        match before.strip_suffix('(') {
            Some(rest) => start = rest.len(),
            None => break,
        }
    }
    start
}

/// Where `e`'s text ends (the rightmost operand's end counts too).
fn end_of(e: &ast::Expr<'_>) -> usize {
    use ast::Expr as E;
    let own = span_of(e).end_offset as usize;
    let right = match e {
        E::BinOp(b) => Some(end_of(&b.right)),
        E::UnaryOp(u) => Some(end_of(&u.expr)),
        E::Compare(c) => c.ops.last().map(|op| end_of(&op.expr)),
        E::IfExpr(i) => Some(
            i.false_expr
                .as_ref()
                .map_or_else(|| end_of(&i.test_expr), end_of),
        ),
        _ => None,
    };
    right.map_or(own, |r| r.max(own))
}

/// Whether a filter chain starts from a value (not from a block's body).
fn filter_has_input(f: &ast::Filter<'_>) -> bool {
    match &f.expr {
        None => false,
        Some(ast::Expr::Filter(inner)) => filter_has_input(inner),
        Some(_) => true,
    }
}

/// Counts `value`'s size into `left`, failing once it runs out (so a huge or deeply shared
/// structure costs no more than the limit to weigh).
fn weigh(value: &Value, left: &mut usize) -> Result<(), JinjaError> {
    if let Some(messages) = value.downcast_object_ref::<Messages>() {
        return take(left, messages.weight);
    }
    match value.kind() {
        ValueKind::String => take(left, value.as_str().map_or(0, str::len)),
        ValueKind::Bytes => take(left, value.as_bytes().map_or(0, <[u8]>::len)),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            if let Some(n) = value.len() {
                take(left, n.saturating_mul(ITEM_BYTES))?;
            }
            let is_map = value.kind() == ValueKind::Map;
            for item in value.try_iter()? {
                take(left, ITEM_BYTES)?;
                weigh(&item, left)?;
                if is_map && let Ok(v) = value.get_item(&item) {
                    weigh(&v, left)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn take(left: &mut usize, n: usize) -> Result<(), JinjaError> {
    *left = left.checked_sub(n).ok_or_else(|| too_large("a value"))?;
    Ok(())
}

/// The conversation as the template sees it (`messages`: a list of `{role, content}` maps),
/// with its weight counted once: templates read `messages` inside their loop, and weighing it
/// at every read would make rendering quadratic in the conversation's length.
#[derive(Debug)]
pub(crate) struct Messages {
    items: Vec<Value>,
    weight: usize,
}

impl Messages {
    pub(crate) fn value<T: serde::Serialize>(messages: &[T]) -> Value {
        let items: Vec<Value> = messages.iter().map(Value::from_serialize).collect();
        let weight = items.iter().fold(0usize, |w, m| {
            w.saturating_add(ITEM_BYTES).saturating_add(size_of(m))
        });
        Value::from_object(Self { items, weight })
    }
}

impl Object for Messages {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        // Negative indices count from the end, as for any list (`messages[-1]`).
        let i = isize::try_from(key.as_i64()?).ok()?;
        let i = if i < 0 {
            self.items.len().checked_sub(i.unsigned_abs())?
        } else {
            i.unsigned_abs()
        };
        self.items.get(i).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.items.len())
    }
}

/// [`BOUND_FN`]: the value unchanged, or an error when it is too large.
pub(crate) fn bounded(value: Value) -> Result<Value, JinjaError> {
    let mut left = MAX_VALUE_BYTES;
    weigh(&value, &mut left)?;
    Ok(value)
}

fn size_of(value: &Value) -> usize {
    let mut left = usize::MAX;
    let _ = weigh(value, &mut left);
    usize::MAX - left
}

fn text_len(value: &Value) -> usize {
    value
        .as_str()
        .map_or_else(|| value.to_string().len(), str::len)
}

fn check(len: usize, what: &str) -> Result<(), JinjaError> {
    if len > MAX_VALUE_BYTES {
        Err(too_large(what))
    } else {
        Ok(())
    }
}

fn text(v: &Value) -> std::borrow::Cow<'_, str> {
    v.as_str().map_or_else(
        || std::borrow::Cow::Owned(v.to_string()),
        std::borrow::Cow::Borrowed,
    )
}

/// `s.replace(old, new)`'s length, checked before the string is built.
fn check_replace(s: &Value, old: &Value, new: &Value) -> Result<(), JinjaError> {
    // The strings as they are (a copy only for a non-string argument).
    let (s, old, new) = (text(s), text(old), text(new));
    let count = if old.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(old.as_ref()).count()
    };
    let len = count
        .checked_mul(new.len())
        .and_then(|added| (s.len() - count * old.len()).checked_add(added))
        .unwrap_or(usize::MAX);
    check(len, "a replaced string")
}

/// `sep.join(items)`'s length, checked before the string is built.
fn check_join(items: &Value, sep: usize) -> Result<(), JinjaError> {
    if items.kind() == ValueKind::String {
        let n = items.as_str().map_or(0, |s| s.chars().count());
        return check(
            n.saturating_mul(sep).saturating_add(text_len(items)),
            "a joined string",
        );
    }
    let mut len = 0usize;
    let mut n = 0usize;
    for item in items.try_iter()? {
        n += 1;
        len = len.saturating_add(text_len(&item)).saturating_add(sep);
        check(len, "a joined string")?;
    }
    check(
        len.saturating_sub(if n > 0 { sep } else { 0 }),
        "a joined string",
    )
}

/// A format string's widths and precisions (`%5000s`, `{:>5000}`) are refused above
/// [`MAX_WIDTH`], and the arguments' total size above the limit.
fn check_format(format: &Value, args: &[Value]) -> Result<(), JinjaError> {
    let text = format.to_string();
    let mut number = 0usize;
    for b in text.bytes() {
        if b.is_ascii_digit() {
            number = number
                .saturating_mul(10)
                .saturating_add(usize::from(b - b'0'));
            if number > MAX_WIDTH {
                return Err(refuse(format!(
                    "it asked for a format width above {MAX_WIDTH}"
                )));
            }
        } else {
            number = 0;
        }
    }
    let total = args
        .iter()
        .fold(text.len(), |t, a| t.saturating_add(size_of(a)));
    check(total, "a formatted string")
}

/// Registers the bounded function and the checked `replace`, `join`, `indent` and `format`
/// filters (the builtins, after the check).
pub(crate) fn add_to_environment(env: &mut minijinja::Environment<'_>) {
    env.add_function(BOUND_FN, bounded);
    env.add_filter(
        "replace",
        |state: &State, s: &Value, old: &Value, new: &Value| {
            check_replace(s, old, new)?;
            minijinja::filters::replace(
                state,
                StringInput::new(state, s)?,
                StringInput::new(state, old)?,
                StringInput::new(state, new)?,
            )
        },
    );
    env.add_filter(
        "join",
        |state: &State, items: &Value, sep: Option<&Value>| {
            check_join(items, sep.map_or(0, text_len))?;
            let sep = sep.map(|s| StringInput::new(state, s)).transpose()?;
            minijinja::filters::join(state, items, sep)
        },
    );
    env.add_filter(
        "indent",
        // jinja2's indent(width, first, blank): `blank` by keyword only here (five arguments
        // at most per filter).
        |state: &State, s: &Value, width: Option<usize>, first: Option<bool>, kwargs: Kwargs| {
            let w = match width {
                Some(w) => w,
                None => kwargs.get::<Option<usize>>("width")?.unwrap_or(4),
            };
            if w > MAX_WIDTH {
                return Err(refuse(format!("it asked for an indent above {MAX_WIDTH}")));
            }
            let text = s.to_string();
            let lines = text.lines().count() + 1;
            check(
                text.len().saturating_add(lines.saturating_mul(w)),
                "an indented string",
            )?;
            minijinja::filters::indent(StringInput::new(state, s)?, Some(w), first, None, kwargs)
        },
    );
    env.add_filter(
        "format",
        |state: &State, format: &Value, args: Rest<Value>| {
            check_format(format, &args)?;
            minijinja::filters::format(state, format, args)
        },
    );
}

/// The Python string methods (`minijinja_contrib`'s) that multiply sizes, checked first.
pub(crate) fn check_method(value: &Value, method: &str, args: &[Value]) -> Result<(), JinjaError> {
    if value.kind() != ValueKind::String {
        return Ok(());
    }
    match (method, args) {
        ("replace", [old, new, ..]) => check_replace(value, old, new),
        ("join", [items, ..]) => check_join(items, text_len(value)),
        ("format", _) => check_format(value, args),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_cover_whole_expressions_parentheses_included() {
        for (source, expected) in [
            ("{{ a ~ b }}", "{{ B(B(a) ~ B(b)) }}"),
            ("{{ (a ~ b)|upper }}", "{{ B((B(B(a) ~ B(b)))|upper) }}"),
            ("{{ x['c'] | trim }}", "{{ B(B(x)['c'] | trim) }}"),
            (
                "{{ s.strip().upper() }}",
                "{{ B(B(B(s).strip()).upper()) }}",
            ),
            ("{{ a if c else b }}", "{{ B(a) if B(c) else B(b) }}"),
            (
                "{% set ns.x = ns.x + [m] %}",
                "{% set ns.x = B(B(ns).x + B([B(m)])) %}",
            ),
            (
                "{% set t | upper %}x{% endset %}",
                "{% set t | upper %}x{% endset %}",
            ),
            (
                "{% for m in ms if m %}{{ loop.index }}{% endfor %}",
                "{% for m in B(ms) if B(m) %}{{ B(loop).index }}{% endfor %}",
            ),
            (
                "{% macro f(a, b=c) %}{{ caller() }}{% endmacro %}",
                "{% macro f(a, b=B(c)) %}{{ B(caller()) }}{% endmacro %}",
            ),
            ("{% do ns.l.append(x) %}", "{% do B(ns).l.append(B(x)) %}"),
            (
                "{{ x is defined and (y)|length > 1 }}",
                "{{ B(x) is defined and B((B(y))|length) > 1 }}",
            ),
        ] {
            let got = instrument(source, "t")
                .expect("parses")
                .replace(BOUND_FN, "B");
            assert_eq!(got, expected, "{source}");
        }
    }

    /// `messages` (weighed once, not at each read) behaves as the list templates index,
    /// slice, filter and loop over.
    #[test]
    fn messages_behave_as_a_list() {
        use crate::llm::template::{ChatTemplate, TemplateMessage};
        let t = ChatTemplate::new(
            "{{ messages|length }}|{{ messages[0].content }}|{{ messages[-1]['role'] }}|\
             {{ messages[1:]|map(attribute='role')|join(',') }}|\
             {% for m in messages|reverse %}{{ m.content }}{% endfor %}|{{ messages[-9] is defined }}",
            None,
            None,
        )
        .expect("compiles");
        let out = t
            .render(
                &[
                    TemplateMessage::system("s"),
                    TemplateMessage::user("u"),
                    TemplateMessage::assistant("a"),
                ],
                false,
            )
            .expect("renders");
        assert_eq!(out, "3|s|assistant|user,assistant|aus|False");
    }
}
