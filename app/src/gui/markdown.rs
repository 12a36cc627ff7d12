//! Markdown in chat replies: parsed once per message text with `pulldown-cmark` into a small
//! block tree ([`Document`]), kept in a [`MarkdownCache`] and parsed again only when the text
//! changes (a streaming reply, once per frame at most), then drawn with egui widgets.
//!
//! Fenced code blocks get syntax highlighting (`egui_extras` with syntect's pure-Rust regexes,
//! memoized per block text) and a "Copy code" button. Soft line breaks are kept as line breaks,
//! as chat models mean them. Raw HTML is shown as text, never interpreted.

use std::collections::HashMap;
use std::iter::Peekable;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::text::LayoutJob;
use egui::{FontId, RichText, Stroke, TextFormat, TextStyle};
use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

/// How long "Copied" shows next to a code block's button.
const COPIED_FOR: Duration = Duration::from_millis(1500);

/// A parsed Markdown text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Document {
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Paragraph(Vec<Span>),
    /// Level 1 (largest) to 6.
    Heading(u8, Vec<Span>),
    /// A fenced or indented code block; `language` is the fence's first word (may be empty).
    Code {
        language: String,
        code: String,
    },
    Quote(Vec<Block>),
    List {
        /// The first number of an ordered list; `None` for bullets.
        start: Option<u64>,
        items: Vec<ListItem>,
    },
    Table {
        header: Vec<Vec<Span>>,
        rows: Vec<Vec<Vec<Span>>>,
    },
    Rule,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListItem {
    /// `Some(done)` for a task list item (`- [x] …`).
    pub task: Option<bool>,
    pub blocks: Vec<Block>,
}

/// Independent text styles, which Markdown combines freely.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpanStyle {
    pub strong: bool,
    pub emphasis: bool,
    pub strikethrough: bool,
    pub code: bool,
}

/// A run of text in one style.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub text: String,
    pub style: SpanStyle,
    /// The target of a link.
    pub link: Option<String>,
}

impl Document {
    pub fn parse(text: &str) -> Self {
        let options = Options::ENABLE_TABLES
            | Options::ENABLE_STRIKETHROUGH
            | Options::ENABLE_TASKLISTS
            | Options::ENABLE_FOOTNOTES;
        let mut events = Parser::new_ext(text, options).peekable();
        let mut blocks = Vec::new();
        read_blocks(&mut events, &mut blocks);
        Self { blocks }
    }

    /// Every code block, in order (tests and tools).
    pub fn code_blocks(&self) -> Vec<(&str, &str)> {
        fn walk<'a>(blocks: &'a [Block], out: &mut Vec<(&'a str, &'a str)>) {
            for b in blocks {
                match b {
                    Block::Code { language, code } => out.push((language, code)),
                    Block::Quote(inner) => walk(inner, out),
                    Block::List { items, .. } => {
                        for item in items {
                            walk(&item.blocks, out);
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.blocks, &mut out);
        out
    }
}

type Events<'a> = Peekable<Parser<'a>>;

fn is_inline_tag(tag: &Tag<'_>) -> bool {
    matches!(
        tag,
        Tag::Emphasis
            | Tag::Strong
            | Tag::Strikethrough
            | Tag::Link { .. }
            | Tag::Image { .. }
            | Tag::Superscript
            | Tag::Subscript
    )
}

fn is_inline_end(tag: TagEnd) -> bool {
    matches!(
        tag,
        TagEnd::Emphasis
            | TagEnd::Strong
            | TagEnd::Strikethrough
            | TagEnd::Link
            | TagEnd::Image
            | TagEnd::Superscript
            | TagEnd::Subscript
    )
}

/// Events that belong in a paragraph (text of a tight list item comes without one).
fn is_inline_event(event: &Event<'_>) -> bool {
    match event {
        Event::Text(_)
        | Event::Code(_)
        | Event::InlineHtml(_)
        | Event::InlineMath(_)
        | Event::SoftBreak
        | Event::HardBreak
        | Event::FootnoteReference(_)
        | Event::TaskListMarker(_) => true,
        Event::Start(tag) => is_inline_tag(tag),
        Event::End(tag) => is_inline_end(*tag),
        _ => false,
    }
}

/// Reads blocks until the end of the enclosing container (consumed) or of the text.
fn read_blocks(events: &mut Events<'_>, blocks: &mut Vec<Block>) {
    loop {
        let Some(next) = events.peek() else {
            return;
        };
        if is_inline_event(next) {
            let mut spans = Vec::new();
            read_inline(events, &mut spans, SpanStyle::default(), None, Until::Block);
            if !spans.is_empty() {
                blocks.push(Block::Paragraph(spans));
            }
            continue;
        }
        let Some(event) = events.next() else {
            return;
        };
        match event {
            Event::End(_) => return,
            Event::Start(tag) => read_block(events, tag, blocks),
            Event::Rule => blocks.push(Block::Rule),
            Event::Html(html) | Event::DisplayMath(html) => {
                blocks.push(Block::Paragraph(vec![plain(&html)]));
            }
            _ => {}
        }
    }
}

fn read_block(events: &mut Events<'_>, tag: Tag<'_>, blocks: &mut Vec<Block>) {
    match tag {
        Tag::Paragraph => {
            let mut spans = Vec::new();
            read_inline(events, &mut spans, SpanStyle::default(), None, Until::End);
            if !spans.is_empty() {
                blocks.push(Block::Paragraph(spans));
            }
        }
        Tag::Heading { level, .. } => {
            let mut spans = Vec::new();
            read_inline(events, &mut spans, SpanStyle::default(), None, Until::End);
            blocks.push(Block::Heading(level as u8, spans));
        }
        Tag::BlockQuote(_) => {
            let mut inner = Vec::new();
            read_blocks(events, &mut inner);
            blocks.push(Block::Quote(inner));
        }
        Tag::CodeBlock(kind) => {
            let language = match kind {
                CodeBlockKind::Fenced(info) => info
                    .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                CodeBlockKind::Indented => String::new(),
            };
            let mut code = String::new();
            loop {
                match events.next() {
                    Some(Event::Text(t)) => code.push_str(&t),
                    Some(Event::End(_)) | None => break,
                    Some(_) => {}
                }
            }
            blocks.push(Block::Code { language, code });
        }
        Tag::HtmlBlock => {
            let mut html = String::new();
            loop {
                match events.next() {
                    Some(Event::Html(t) | Event::Text(t)) => html.push_str(&t),
                    Some(Event::End(_)) | None => break,
                    Some(_) => {}
                }
            }
            let html = html.trim_end();
            if !html.is_empty() {
                blocks.push(Block::Paragraph(vec![plain(html)]));
            }
        }
        Tag::List(start) => {
            let mut items = Vec::new();
            while let Some(Event::Start(Tag::Item)) = events.next() {
                let mut item = ListItem::default();
                if let Some(Event::TaskListMarker(done)) = events.peek() {
                    item.task = Some(*done);
                    events.next();
                }
                read_blocks(events, &mut item.blocks);
                items.push(item);
            }
            blocks.push(Block::List { start, items });
        }
        Tag::Table(_) => {
            let mut header = Vec::new();
            let mut rows = Vec::new();
            loop {
                match events.next() {
                    Some(Event::Start(Tag::TableHead)) => header = read_row(events),
                    Some(Event::Start(Tag::TableRow)) => rows.push(read_row(events)),
                    _ => break,
                }
            }
            blocks.push(Block::Table { header, rows });
        }
        // Footnote definitions, definition lists, metadata: their content, in place.
        _ => read_blocks(events, blocks),
    }
}

fn read_row(events: &mut Events<'_>) -> Vec<Vec<Span>> {
    let mut cells = Vec::new();
    while let Some(Event::Start(Tag::TableCell)) = events.next() {
        let mut spans = Vec::new();
        read_inline(events, &mut spans, SpanStyle::default(), None, Until::End);
        cells.push(spans);
    }
    cells
}

/// Where [`read_inline`] stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// At the end of the enclosing paragraph, heading, cell or inline tag (consumed).
    End,
    /// Before the next block-level event (text of a tight list item).
    Block,
}

fn plain(text: &str) -> Span {
    Span {
        text: text.to_owned(),
        style: SpanStyle::default(),
        link: None,
    }
}

fn push_span(spans: &mut Vec<Span>, text: &str, style: SpanStyle, link: Option<&str>) {
    if text.is_empty() {
        return;
    }
    if let Some(last) = spans.last_mut()
        && last.style == style
        && last.link.as_deref() == link
    {
        last.text.push_str(text);
        return;
    }
    spans.push(Span {
        text: text.to_owned(),
        style,
        link: link.map(str::to_owned),
    });
}

fn read_inline(
    events: &mut Events<'_>,
    spans: &mut Vec<Span>,
    style: SpanStyle,
    link: Option<&str>,
    until: Until,
) {
    loop {
        let Some(next) = events.peek() else {
            return;
        };
        if until == Until::Block && !is_inline_event(next) {
            return;
        }
        let Some(event) = events.next() else {
            return;
        };
        match event {
            Event::End(_) => {
                if until == Until::End {
                    return;
                }
            }
            Event::Start(tag) => {
                let mut inner = style;
                let mut inner_link = link.map(str::to_owned);
                match tag {
                    Tag::Emphasis => inner.emphasis = true,
                    Tag::Strong => inner.strong = true,
                    Tag::Strikethrough => inner.strikethrough = true,
                    Tag::Link { dest_url, .. } => inner_link = Some(dest_url.into_string()),
                    Tag::Image { dest_url, .. } => {
                        // Images are not fetched: the alt text links to the image.
                        inner_link = Some(dest_url.into_string());
                        push_span(spans, "Image: ", style, inner_link.as_deref());
                    }
                    _ => {}
                }
                read_inline(events, spans, inner, inner_link.as_deref(), Until::End);
            }
            Event::Text(t) | Event::InlineHtml(t) | Event::Html(t) => {
                push_span(spans, &t, style, link);
            }
            Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                let code = SpanStyle {
                    code: true,
                    ..style
                };
                push_span(spans, &t, code, link);
            }
            Event::SoftBreak | Event::HardBreak => push_span(spans, "\n", style, link),
            Event::FootnoteReference(label) => {
                push_span(spans, &format!("[{label}]"), style, link);
            }
            Event::TaskListMarker(done) => {
                push_span(spans, if done { "[x] " } else { "[ ] " }, style, link);
            }
            Event::Rule => {}
        }
    }
}

// ---- cache ------------------------------------------------------------------------------------

#[derive(Debug)]
struct CacheEntry {
    source: String,
    document: Arc<Document>,
}

/// Parsed replies of the conversation on screen, keyed by message id. A message is parsed again
/// only when its text changed; showing another conversation starts afresh.
#[derive(Debug, Default)]
pub struct MarkdownCache {
    conversation: String,
    entries: HashMap<u64, CacheEntry>,
    parses: u64,
}

impl MarkdownCache {
    /// The parsed `text` of message `message` in conversation `conversation`.
    pub fn get(&mut self, conversation: &str, message: u64, text: &str) -> Arc<Document> {
        if self.conversation != conversation {
            conversation.clone_into(&mut self.conversation);
            self.entries.clear();
        }
        if let Some(entry) = self.entries.get(&message)
            && entry.source == text
        {
            return entry.document.clone();
        }
        self.parses += 1;
        let document = Arc::new(Document::parse(text));
        self.entries.insert(
            message,
            CacheEntry {
                source: text.to_owned(),
                document: document.clone(),
            },
        );
        document
    }

    /// How many times a text was parsed (to check that unchanged replies are not).
    pub fn parses(&self) -> u64 {
        self.parses
    }
}

// ---- drawing ----------------------------------------------------------------------------------

/// Draws a parsed document; `id` keeps widget ids of different messages apart.
pub fn document_ui(ui: &mut egui::Ui, document: &Document, id: egui::Id) {
    blocks_ui(ui, &document.blocks, id, 0);
}

fn blocks_ui(ui: &mut egui::Ui, blocks: &[Block], id: egui::Id, depth: usize) {
    for (i, block) in blocks.iter().enumerate() {
        if i > 0 {
            ui.add_space(ui.spacing().item_spacing.y + 2.0);
        }
        block_ui(ui, block, id.with(i), depth);
    }
}

fn block_ui(ui: &mut egui::Ui, block: &Block, id: egui::Id, depth: usize) {
    match block {
        Block::Paragraph(spans) => {
            spans_ui(ui, spans, &TextStyle::Body.resolve(ui.style()), false, true);
        }
        Block::Heading(level, spans) => {
            let body = TextStyle::Body.resolve(ui.style()).size;
            let scale = match level {
                1 => 1.5,
                2 => 1.3,
                3 => 1.15,
                _ => 1.05,
            };
            ui.add_space(2.0);
            spans_ui(ui, spans, &FontId::proportional(body * scale), true, true);
        }
        Block::Code { language, code } => code_block_ui(ui, language, code, id),
        Block::Quote(inner) => {
            let response = egui::Frame::new()
                .inner_margin(egui::Margin {
                    left: 12,
                    ..egui::Margin::ZERO
                })
                .show(ui, |ui| blocks_ui(ui, inner, id, depth))
                .response;
            let rect = response.rect;
            ui.painter().vline(
                rect.left() + 3.0,
                rect.y_range(),
                Stroke::new(3.0, ui.visuals().widgets.noninteractive.bg_stroke.color),
            );
        }
        Block::List { start, items } => {
            for (i, item) in items.iter().enumerate() {
                ui.horizontal_top(|ui| {
                    ui.spacing_mut().item_spacing.x = 6.0;
                    match (item.task, start) {
                        (Some(done), _) => {
                            let mut done = done;
                            ui.add_enabled(false, egui::Checkbox::without_text(&mut done));
                        }
                        (None, Some(first)) => {
                            ui.label(format!("{}.", first + i as u64));
                        }
                        (None, None) => {
                            // The default fonts have few symbols: a bullet, then a dash.
                            ui.label(if depth.is_multiple_of(2) {
                                "•"
                            } else {
                                "–"
                            });
                        }
                    }
                    ui.vertical(|ui| blocks_ui(ui, &item.blocks, id.with(i), depth + 1));
                });
            }
        }
        Block::Table { header, rows } => {
            egui::ScrollArea::horizontal()
                .id_salt(id.with("table"))
                .auto_shrink([true, true])
                .show(ui, |ui| {
                    egui::Grid::new(id.with("grid"))
                        .striped(true)
                        .spacing([16.0, 4.0])
                        .show(ui, |ui| {
                            let body = TextStyle::Body.resolve(ui.style());
                            // Cells keep their lines; a wide table scrolls sideways.
                            for cell in header {
                                spans_ui(ui, cell, &body, true, false);
                            }
                            ui.end_row();
                            for row in rows {
                                for cell in row {
                                    spans_ui(ui, cell, &body, false, false);
                                }
                                ui.end_row();
                            }
                        });
                });
        }
        Block::Rule => {
            ui.separator();
        }
    }
}

fn text_format(ui: &egui::Ui, style: SpanStyle, font: &FontId, strong: bool) -> TextFormat {
    let visuals = ui.visuals();
    let mut format = TextFormat {
        font_id: font.clone(),
        color: if strong || style.strong {
            visuals.strong_text_color()
        } else {
            visuals.text_color()
        },
        italics: style.emphasis,
        ..TextFormat::default()
    };
    if style.code {
        format.font_id = FontId::monospace(font.size * 0.92);
        format.background = visuals.code_bg_color;
    }
    if style.strikethrough {
        format.strikethrough = Stroke::new(1.0, format.color);
    }
    format
}

/// A paragraph: one selectable label, or (when it has links) a wrapped row of labels and
/// links. `wrap: false` keeps each line whole (table cells).
fn spans_ui(ui: &mut egui::Ui, spans: &[Span], font: &FontId, strong: bool, wrap: bool) {
    if spans.iter().all(|s| s.link.is_none()) {
        let mut job = LayoutJob::default();
        for span in spans {
            job.append(&span.text, 0.0, text_format(ui, span.style, font, strong));
        }
        let label = egui::Label::new(job).selectable(true);
        ui.add(if wrap { label.wrap() } else { label.extend() });
        return;
    }
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing.x = 0.0;
        for span in spans {
            let mut text = RichText::new(&span.text).font(font.clone());
            if span.style.code {
                text = text.code();
            }
            if span.style.strong || strong {
                text = text.strong();
            }
            if span.style.emphasis {
                text = text.italics();
            }
            if span.style.strikethrough {
                text = text.strikethrough();
            }
            match &span.link {
                Some(url) => {
                    ui.hyperlink_to(text, url).on_hover_text(url);
                }
                None => {
                    ui.add(egui::Label::new(text).wrap());
                }
            }
        }
    });
}

/// The name syntect knows a fence's language by (its usual file extension).
pub fn syntax_name(language: &str) -> String {
    let lower = language.trim().to_ascii_lowercase();
    let name = match lower.as_str() {
        "rust" => "rs",
        "python" | "python3" | "py3" => "py",
        "javascript" | "jsx" | "node" | "typescript" | "ts" | "tsx" | "mjs" => "js",
        "bash" | "shell" | "zsh" | "console" | "shell-session" | "sh" => "sh",
        "c++" | "cxx" | "hpp" => "cpp",
        "csharp" | "c#" => "cs",
        "golang" => "go",
        "yml" => "yaml",
        "markdown" => "md",
        "ruby" => "rb",
        "perl" => "pl",
        "haskell" => "hs",
        "objective-c" | "objc" => "m",
        "text" | "plaintext" | "plain" | "txt" => "txt",
        other => other,
    };
    name.to_owned()
}

fn code_block_ui(ui: &mut egui::Ui, language: &str, code: &str, id: egui::Id) {
    let code = code.strip_suffix('\n').unwrap_or(code);
    let visuals = ui.visuals().clone();
    egui::Frame::new()
        .fill(visuals.code_bg_color)
        .stroke(visuals.widgets.noninteractive.bg_stroke)
        .corner_radius(4.0)
        .inner_margin(egui::Margin::symmetric(8, 6))
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            let copied_id = id.with("copied");
            ui.horizontal(|ui| {
                let name = if language.is_empty() {
                    "code"
                } else {
                    language
                };
                ui.label(
                    RichText::new(name)
                        .small()
                        .monospace()
                        .color(visuals.weak_text_color()),
                );
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if ui
                        .small_button("Copy code")
                        .on_hover_text("Copy this code block to the clipboard")
                        .clicked()
                    {
                        ui.ctx().copy_text(code.to_owned());
                        ui.data_mut(|d| d.insert_temp(copied_id, Instant::now()));
                    }
                    let copied_at = ui.data(|d| d.get_temp::<Instant>(copied_id));
                    if let Some(at) = copied_at {
                        let age = at.elapsed();
                        if age < COPIED_FOR {
                            ui.label(
                                RichText::new("Copied")
                                    .small()
                                    .color(visuals.weak_text_color()),
                            );
                            ui.ctx()
                                .request_repaint_after(COPIED_FOR.saturating_sub(age));
                        } else {
                            ui.data_mut(|d| d.remove::<Instant>(copied_id));
                        }
                    }
                });
            });
            let theme = egui_extras::syntax_highlighting::CodeTheme::from_style(ui.style());
            let job = egui_extras::syntax_highlighting::highlight(
                ui.ctx(),
                ui.style(),
                &theme,
                code,
                &syntax_name(language),
            );
            egui::ScrollArea::horizontal()
                .id_salt(id.with("code"))
                .auto_shrink([false, true])
                .show(ui, |ui| {
                    ui.add(egui::Label::new(job).extend().selectable(true));
                });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(spans: &[Span]) -> String {
        spans.iter().map(|s| s.text.as_str()).collect()
    }

    #[test]
    fn replies_parse_into_blocks() {
        let doc = Document::parse(
            "# Title\n\nSome **bold** and `code`,\nnext line.\n\n\
             ```rust\nfn main() {}\n```\n\n- one\n- [x] done\n\n1. first\n2. second\n\n\
             > quoted\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n---\n\n[link](https://example.com)",
        );
        let b = &doc.blocks;
        assert!(matches!(&b[0], Block::Heading(1, s) if text(s) == "Title"));
        let Block::Paragraph(p) = &b[1] else {
            panic!("{:?}", b[1]);
        };
        assert_eq!(text(p), "Some bold and code,\nnext line.");
        assert!(p.iter().any(|s| s.style.strong && s.text == "bold"));
        assert!(p.iter().any(|s| s.style.code && s.text == "code"));
        assert_eq!(
            b[2],
            Block::Code {
                language: "rust".into(),
                code: "fn main() {}\n".into()
            }
        );
        let Block::List { start: None, items } = &b[3] else {
            panic!("{:?}", b[3]);
        };
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].task, items[1].task), (None, Some(true)));
        assert!(matches!(&items[1].blocks[0], Block::Paragraph(s) if text(s) == "done"));
        assert!(matches!(&b[4], Block::List { start: Some(1), items } if items.len() == 2));
        assert!(matches!(&b[5], Block::Quote(inner) if inner.len() == 1));
        assert!(
            matches!(&b[6], Block::Table { header, rows } if header.len() == 2 && rows.len() == 1)
        );
        assert_eq!(b[7], Block::Rule);
        let Block::Paragraph(link) = &b[8] else {
            panic!("{:?}", b[8]);
        };
        assert_eq!(link[0].link.as_deref(), Some("https://example.com"));
    }

    #[test]
    fn an_unclosed_fence_while_streaming_is_still_code() {
        let doc = Document::parse("Here:\n\n```python\nprint('hi')\nfor x in");
        assert_eq!(doc.code_blocks(), vec![("python", "print('hi')\nfor x in")]);
    }

    #[test]
    fn html_is_text_and_plain_text_is_kept_whole() {
        let doc = Document::parse("<script>alert(1)</script>\n\nThe quick brown fox.");
        assert!(matches!(&doc.blocks[0], Block::Paragraph(s) if text(s).contains("<script>")));
        assert!(matches!(&doc.blocks[1], Block::Paragraph(s) if s.len() == 1));
    }

    #[test]
    fn the_cache_parses_a_message_again_only_when_it_changed() {
        let mut cache = MarkdownCache::default();
        let a = cache.get("c", 1, "Hello");
        let b = cache.get("c", 1, "Hello");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.parses(), 1);
        cache.get("c", 1, "Hello, world");
        cache.get("c", 2, "Other");
        assert_eq!(cache.parses(), 3);
        cache.get("d", 1, "Hello, world");
        assert_eq!(cache.parses(), 4, "another conversation starts afresh");
    }

    #[test]
    fn fence_names_map_to_syntaxes() {
        assert_eq!(syntax_name("Rust"), "rs");
        assert_eq!(syntax_name("python"), "py");
        assert_eq!(syntax_name("bash"), "sh");
        assert_eq!(syntax_name("json"), "json");
    }
}
