//! The editor widget: egui's `TextEdit` in code mode with syntect highlighting, a line-number
//! gutter, find-match highlights and the ghost-text suggestion painted at the cursor.
//!
//! Highlighting goes through `egui_extras::syntax_highlighting::highlight`, which memoizes the
//! highlighted `LayoutJob` per (theme, text, language), and egui caches the laid-out galley per
//! job, so a frame where nothing changed does no highlighting or layout work. Files above
//! [`HIGHLIGHT_LIMIT`](super::buffer::HIGHLIGHT_LIMIT) are shown plain.

use std::ops::Range;
use std::sync::Arc;

use egui::text::{CCursor, CCursorRange, LayoutJob};
use egui::{Color32, FontId, Galley, Pos2, Rect, TextFormat, TextStyle};

use super::buffer::Tab;

/// The `TextEdit` id of a tab's editor.
pub fn editor_id(tab: u64) -> egui::Id {
    egui::Id::unique(("code_editor", tab))
}

/// The syntect syntax (by extension) that highlights a language token. syntect's default set
/// has no TypeScript and no TOML: TypeScript is close enough to JavaScript's grammar, and TOML
/// gets Python's (`#` comments, quoted strings, numbers, `[...]` brackets), the closest
/// grammar the default set has.
pub fn syntect_token(token: &str) -> &str {
    match token {
        "ts" => "js",
        "toml" => "py",
        "jsonc" => "json",
        other => other,
    }
}

/// What the editor did this frame.
pub struct EditorOutput {
    pub changed: bool,
    /// Char indices.
    pub cursor: Option<CCursorRange>,
    pub focused: bool,
}

/// Where things are painted: the text's galley and where it went on screen.
struct Placed {
    galley: Arc<Galley>,
    pos: Pos2,
    clip: Rect,
}

/// Draws the editor of `tab`, with `ghost` (a suggestion at the cursor) and `matches` (byte
/// ranges to mark, `current` the selected one).
pub fn editor_ui(
    ui: &mut egui::Ui,
    tab: &mut Tab,
    ghost: Option<&str>,
    matches: &[Range<usize>],
    current: Option<usize>,
) -> EditorOutput {
    let id = editor_id(tab.id);
    let font = TextStyle::Monospace.resolve(ui.style());
    let highlight = tab.highlighted();
    let token = tab
        .language()
        .map_or("txt", |l| syntect_token(l.token))
        .to_owned();
    let theme = egui_extras::syntax_highlighting::CodeTheme::from_style(ui.style());
    let text_color = ui.visuals().text_color();
    let mut layouter = |ui: &egui::Ui, buf: &dyn egui::TextBuffer, _wrap: f32| {
        let mut job = if highlight {
            egui_extras::syntax_highlighting::highlight(
                ui.ctx(),
                ui.style(),
                &theme,
                buf.as_str(),
                &token,
            )
        } else {
            LayoutJob::simple(
                buf.as_str().to_owned(),
                font.clone(),
                text_color,
                f32::INFINITY,
            )
        };
        // Code does not wrap: long lines scroll sideways.
        job.wrap.max_width = f32::INFINITY;
        ui.fonts_mut(|f| f.layout_job(job))
    };
    let lines = tab.line_count();
    let digit_width = ui.fonts_mut(|f| f.glyph_width(&font, '0'));
    let digits = lines.to_string().len().max(2);
    #[expect(clippy::cast_precision_loss, reason = "a handful of digits")]
    let gutter_width = digits as f32 * digit_width + 14.0;

    let mut out = EditorOutput {
        changed: false,
        cursor: None,
        focused: false,
    };
    let bg = ui.visuals().text_edit_bg_color();
    egui::Frame::new().fill(bg).show(ui, |ui| {
        egui::ScrollArea::both()
            .id_salt(("code_scroll", tab.id))
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.horizontal_top(|ui| {
                    ui.spacing_mut().item_spacing.x = 0.0;
                    let (gutter, _) =
                        ui.allocate_exact_size(egui::vec2(gutter_width, 1.0), egui::Sense::hover());
                    let output = egui::TextEdit::multiline(&mut tab.text)
                        .id(id)
                        .code_editor()
                        .event_filter(egui::EventFilter {
                            tab: true,
                            horizontal_arrows: true,
                            vertical_arrows: true,
                            escape: true,
                        })
                        .frame(egui::Frame::NONE)
                        .desired_width(f32::INFINITY)
                        .desired_rows(30)
                        .layouter(&mut layouter)
                        .show(ui);
                    let response = output.response.response.clone();
                    let response = response.accessible_name("Code editor");
                    out.changed = response.changed();
                    out.focused = response.has_focus();
                    out.cursor = output.cursor_range;
                    let placed = Placed {
                        galley: output.galley.clone(),
                        pos: output.galley_pos,
                        clip: ui.clip_rect(),
                    };
                    line_numbers(ui, &placed, gutter, &font);
                    mark_matches(ui, &placed, &tab.text, matches, current);
                    if let (Some(ghost), Some(range)) = (ghost, out.cursor)
                        && !ghost.is_empty()
                    {
                        paint_ghost(ui, &placed, range.primary, ghost, &font, bg);
                    }
                });
            });
    });
    out
}

/// Line numbers beside each row that starts a line (only rows on screen are painted).
fn line_numbers(ui: &egui::Ui, placed: &Placed, gutter: Rect, font: &FontId) {
    let painter = ui.painter();
    let color = ui.visuals().weak_text_color();
    let mut line = 1usize;
    let mut starts_line = true;
    for row in &placed.galley.rows {
        let rect = row.rect().translate(placed.pos.to_vec2());
        if rect.min.y > placed.clip.max.y {
            break;
        }
        if starts_line && rect.max.y >= placed.clip.min.y {
            painter.text(
                Pos2::new(gutter.max.x - 8.0, rect.min.y),
                egui::Align2::RIGHT_TOP,
                line.to_string(),
                font.clone(),
                color,
            );
        }
        starts_line = row.ends_with_newline;
        if row.ends_with_newline {
            line += 1;
        }
    }
}

/// Translucent boxes over the find matches on screen; the current one stronger.
fn mark_matches(
    ui: &egui::Ui,
    placed: &Placed,
    text: &str,
    matches: &[Range<usize>],
    current: Option<usize>,
) {
    if matches.is_empty() {
        return;
    }
    let sel = ui.visuals().selection.bg_fill;
    let painter = ui.painter();
    // Byte offsets → char indices in one pass over the text (matches are in order).
    let mut chars = 0usize;
    let mut at = 0usize;
    let mut to_char = |byte: usize| {
        chars += text[at..byte].chars().count();
        at = byte;
        chars
    };
    for (i, m) in matches.iter().enumerate().take(2000) {
        let (start, end) = (to_char(m.start), to_char(m.end));
        let a = placed.galley.pos_from_cursor(CCursor::new(start));
        let b = placed.galley.pos_from_cursor(CCursor::new(end));
        let rect = Rect::from_min_max(a.min, Pos2::new(b.max.x.max(a.min.x + 2.0), a.max.y))
            .translate(placed.pos.to_vec2());
        if !placed.clip.intersects(rect) {
            continue;
        }
        let alpha = if Some(i) == current { 0.55 } else { 0.25 };
        painter.rect_filled(rect, 2.0, sel.gamma_multiply(alpha));
    }
}

/// The suggestion, dimmed, from the cursor on; its rows get the editor's background so text
/// after the cursor does not show through.
fn paint_ghost(
    ui: &egui::Ui,
    placed: &Placed,
    cursor: CCursor,
    ghost: &str,
    font: &FontId,
    bg: Color32,
) {
    let at = placed.galley.pos_from_cursor(cursor);
    let mut job = LayoutJob::default();
    job.wrap.max_width = f32::INFINITY;
    job.append(
        ghost,
        at.min.x,
        TextFormat {
            font_id: font.clone(),
            color: ui.visuals().weak_text_color(),
            italics: true,
            ..TextFormat::default()
        },
    );
    let galley = ui.fonts_mut(|f| f.layout_job(job));
    let origin = Pos2::new(placed.pos.x, placed.pos.y + at.min.y);
    let painter = ui.painter().with_clip_rect(placed.clip);
    for (i, row) in galley.rows.iter().enumerate() {
        let mut rect = row.rect().translate(origin.to_vec2());
        if i == 0 {
            rect.min.x = origin.x + at.min.x;
        }
        rect.max.x += 2.0;
        painter.rect_filled(rect, 0.0, bg);
    }
    painter.galley(origin, galley, ui.visuals().weak_text_color());
}
