//! The Code panel: an editor with tabs ([`buffer`], [`editor`]), fill-in-the-middle ghost text
//! and code actions whose edits come back as diffs to accept hunk by hunk ([`assist`],
//! [`diff_view`]), and a recovery file so nothing typed is lost ([`store`]).
//!
//! Like the other panels it draws from its own state and pushes [`CodeCommand`]s for anything
//! that touches the worker, the disk or the undo stack; [`assist`] carries them out.

pub mod assist;
pub mod buffer;
pub mod command;
pub mod diff_view;
pub mod editor;
pub mod store;

pub use self::command::CodeCommand;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::{Key, KeyboardShortcut, Modifiers, RichText};
use studio_inference::code::actions::{ActionPreset, presets_with};
use studio_inference::code::complete::FimSupport;
use studio_inference::code::fim::FimFormat;

use self::assist::{ActionRun, GhostState};
use self::buffer::Tab;
use super::command::Command;
use super::settings_store::Settings;
use super::style::weak;

pub const FIND_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::F);
pub const REPLACE_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::H);
pub const SAVE_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);
pub const OPEN_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);

/// Languages offered by "Translate to".
pub const TRANSLATE_TARGETS: &[&str] = &[
    "Python",
    "Rust",
    "JavaScript",
    "TypeScript",
    "Go",
    "Java",
    "C",
    "C++",
    "C#",
    "Kotlin",
    "Swift",
    "Ruby",
];

/// A question the panel is asking in a modal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Close a tab with unsaved changes?
    CloseTab(u64),
    /// Quit with unsaved tabs?
    Quit,
}

/// The find/replace bar.
#[derive(Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches of the bar"
)]
pub struct FindBar {
    pub open: bool,
    pub replace: bool,
    pub query: String,
    pub with: String,
    pub match_case: bool,
    /// Focus the query field next frame.
    focus: bool,
    /// The match selected last (index into the matches).
    pub current: Option<usize>,
    pub status: String,
}

pub struct CodePanel {
    pub tabs: Vec<Tab>,
    pub active: Option<u64>,
    pub next_id: u64,
    pub next_untitled: u64,
    pub ghost: GhostState,
    pub action: Option<ActionRun>,
    pub presets: Vec<ActionPreset>,
    pub instruction: String,
    pub translate_to: String,
    pub find: FindBar,
    pub confirm: Option<Confirm>,
    /// The user chose to quit without saving: let the window close.
    pub allow_close: bool,
    /// Close the window at the start of the next frame.
    close_now: bool,
    pub store: store::SessionStore,
    /// Cached find matches: (tab, rev, query, case) → ranges.
    matches_key: Option<(u64, u64, String, bool)>,
    matches: Vec<std::ops::Range<usize>>,
    /// Each tab's cursor (or selection) as last drawn, in char indices.
    cursors: std::collections::HashMap<u64, egui::text::CCursorRange>,
    /// A cursor or selection for the editor to take when it is next drawn.
    pending_cursor: Option<(u64, egui::text::CCursorRange)>,
}

impl CodePanel {
    /// Restores the open tabs from the recovery file and reads the action presets (built-in,
    /// and `presets/code-actions/*.json` users add or edit). Returns notes for notices.
    pub fn new(home: &Path, presets_dir: Option<&Path>) -> (Self, Vec<String>) {
        let restored = store::restore(home);
        let mut notes = restored.notes;
        let dir = presets_dir.map(|d| d.join("code-actions"));
        let (presets, errors) = presets_with(dir.as_deref());
        notes.extend(errors);
        let next_id = restored.tabs.iter().map(|t| t.id).max().unwrap_or(0) + 1;
        let mut panel = Self {
            tabs: restored.tabs,
            active: restored.active,
            next_id,
            next_untitled: restored.next_untitled,
            ghost: GhostState::default(),
            action: None,
            presets,
            instruction: String::new(),
            translate_to: "Python".to_owned(),
            find: FindBar::default(),
            confirm: None,
            allow_close: false,
            close_now: false,
            store: store::SessionStore::new(home),
            matches_key: None,
            matches: Vec::new(),
            cursors: std::collections::HashMap::new(),
            pending_cursor: None,
        };
        if panel.tabs.is_empty() {
            panel.new_tab();
        }
        (panel, notes)
    }

    /// Adds an empty untitled tab and shows it.
    pub fn new_tab(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let name = format!("untitled-{}", self.next_untitled);
        self.next_untitled += 1;
        self.tabs.push(Tab::new(id, None, name, String::new()));
        self.active = Some(id);
        id
    }

    /// Adds a tab for a file read from `path` and shows it (or shows the tab already open).
    pub fn open_tab(&mut self, path: PathBuf, text: String) -> u64 {
        if let Some(t) = self.tabs.iter().find(|t| t.path.as_ref() == Some(&path)) {
            self.active = Some(t.id);
            return t.id;
        }
        // A pristine untitled tab is replaced rather than kept beside the file.
        let reuse = self
            .tabs
            .iter()
            .position(|t| t.path.is_none() && t.text.is_empty() && !t.can_undo());
        let id = self.next_id;
        self.next_id += 1;
        let tab = Tab::new(id, Some(path), String::new(), text);
        match reuse {
            Some(i) if self.tabs.len() == 1 => self.tabs[i] = tab,
            _ => self.tabs.push(tab),
        }
        self.active = Some(id);
        id
    }

    pub fn tab(&self, id: u64) -> Option<&Tab> {
        self.tabs.iter().find(|t| t.id == id)
    }

    pub fn tab_mut(&mut self, id: u64) -> Option<&mut Tab> {
        self.tabs.iter_mut().find(|t| t.id == id)
    }

    pub fn active_tab(&self) -> Option<&Tab> {
        self.active.and_then(|id| self.tab(id))
    }

    pub fn active_tab_mut(&mut self) -> Option<&mut Tab> {
        let id = self.active?;
        self.tab_mut(id)
    }

    /// Whether any tab has unsaved changes.
    pub fn has_unsaved(&self) -> bool {
        self.tabs.iter().any(Tab::is_dirty)
    }

    /// The suggestion shown now, if any.
    pub fn ghost_text(&self) -> Option<&str> {
        self.ghost
            .ghost
            .as_ref()
            .map(|g| g.text.as_str())
            .filter(|t| !t.is_empty())
    }

    /// Removes tab `id` (no questions asked) and shows a neighbour.
    pub fn remove_tab(&mut self, id: u64) {
        let Some(i) = self.tabs.iter().position(|t| t.id == id) else {
            return;
        };
        self.tabs.remove(i);
        if self.active == Some(id) {
            self.active = self
                .tabs
                .get(i)
                .or_else(|| self.tabs.get(i.wrapping_sub(1)))
                .map(|t| t.id);
        }
        if self.tabs.is_empty() {
            self.new_tab();
        }
    }

    /// Keys the panel takes before its widgets see them (called from the frame logic):
    /// Esc dismisses a suggestion; the rest are read in [`Self::code_ui`].
    pub fn wants_escape(&self) -> bool {
        self.ghost.ghost.is_some()
    }

    /// Draws the panel.
    pub fn code_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        fim: &FimSupport,
        model_name: Option<&str>,
        commands: &mut Vec<Command>,
    ) {
        self.shortcuts(ui, commands);
        self.toolbar_ui(ui, settings, fim, commands);
        self.tabs_ui(ui, commands);
        if self.find.open {
            self.find_ui(ui, commands);
        }
        egui::Panel::right("code_assist_pane")
            .resizable(true)
            .default_size(380.0)
            .min_size(260.0)
            .show(ui, |ui| {
                diff_view::assist_pane_ui(self, ui, settings, model_name, commands);
            });
        egui::CentralPanel::default().show(ui, |ui| {
            self.editor_area_ui(ui, settings, fim, commands);
        });
        self.confirm_ui(ui, commands);
    }

    fn shortcuts(&mut self, ui: &egui::Ui, commands: &mut Vec<Command>) {
        let editor_focused = self
            .active
            .is_some_and(|id| ui.memory(|m| m.has_focus(editor::editor_id(id))));
        if ui.input_mut(|i| i.consume_shortcut(&FIND_SHORTCUT)) {
            self.find.open = true;
            self.find.replace = false;
            self.find.focus = true;
            self.seed_find_query(ui);
        }
        if ui.input_mut(|i| i.consume_shortcut(&REPLACE_SHORTCUT)) {
            self.find.open = true;
            self.find.replace = true;
            self.find.focus = true;
            self.seed_find_query(ui);
        }
        if ui.input_mut(|i| i.consume_shortcut(&SAVE_SHORTCUT))
            && let Some(id) = self.active
        {
            commands.push(Command::from(CodeCommand::Save(id)));
        }
        if ui.input_mut(|i| i.consume_shortcut(&OPEN_SHORTCUT)) {
            commands.push(Command::from(CodeCommand::Open(None)));
        }
        // Studio's own undo stack, not the TextEdit's, when the editor has the keyboard (or
        // nothing does, e.g. right after Apply in the pane); other text fields keep their own.
        if !editor_focused && ui.ctx().egui_wants_keyboard_input() {
            return;
        }
        // Shift first, as Ctrl+Z also matches with Shift held.
        if ui.input_mut(|i| {
            i.consume_shortcut(&super::shortcuts::REDO_SHORTCUT)
                || i.consume_shortcut(&super::shortcuts::REDO_Y)
        }) {
            commands.push(Command::from(CodeCommand::Redo));
        } else if ui.input_mut(|i| i.consume_shortcut(&super::shortcuts::UNDO_SHORTCUT)) {
            commands.push(Command::from(CodeCommand::Undo));
        }
        if editor_focused && self.ghost_text().is_some() {
            if ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Tab)) {
                commands.push(Command::from(CodeCommand::AcceptGhost));
            }
            if ui.input_mut(|i| i.consume_key(Modifiers::CTRL, Key::ArrowRight)) {
                commands.push(Command::from(CodeCommand::AcceptWord));
            }
        }
    }

    /// The find field starts with the selected text, when it is on one line.
    fn seed_find_query(&mut self, ui: &egui::Ui) {
        let Some(tab) = self.active_tab() else {
            return;
        };
        let Some(range) = egui::TextEdit::load_state(ui.ctx(), editor::editor_id(tab.id))
            .and_then(|s| s.cursor.char_range())
        else {
            return;
        };
        let [a, b] = range.sorted_cursors();
        if a.index == b.index {
            return;
        }
        let (s, e) = (
            buffer::byte_index(&tab.text, a.index.0),
            buffer::byte_index(&tab.text, b.index.0),
        );
        let sel = &tab.text[s..e];
        if !sel.contains('\n') {
            self.find.query = sel.to_owned();
        }
    }

    fn toolbar_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        fim: &FimSupport,
        commands: &mut Vec<Command>,
    ) {
        ui.horizontal_wrapped(|ui| {
            if ui
                .button("New")
                .on_hover_text("A new untitled tab")
                .clicked()
            {
                commands.push(Command::from(CodeCommand::NewTab));
            }
            if ui
                .button("Open…")
                .on_hover_text("Open a source file (Ctrl+O), or drop one on the window")
                .clicked()
            {
                commands.push(Command::from(CodeCommand::Open(None)));
            }
            let active = self.active;
            if ui
                .add_enabled(active.is_some(), egui::Button::new("Save"))
                .on_hover_text("Save the tab (Ctrl+S)")
                .clicked()
                && let Some(id) = active
            {
                commands.push(Command::from(CodeCommand::Save(id)));
            }
            if ui
                .add_enabled(active.is_some(), egui::Button::new("Save As…"))
                .clicked()
                && let Some(id) = active
            {
                commands.push(Command::from(CodeCommand::SaveAs {
                    tab: id,
                    path: None,
                }));
            }
            if ui
                .button("Find")
                .on_hover_text("Find (Ctrl+F) and replace (Ctrl+H)")
                .clicked()
            {
                self.find.open = !self.find.open;
                self.find.focus = self.find.open;
            }
            ui.separator();
            ui.checkbox(&mut settings.code.ghost_text, "Ghost text")
                .on_hover_text(
                    "Suggest code at the cursor when you pause typing: Tab accepts, Ctrl+Right \
                     accepts a word, Esc dismisses",
                );
            let l = ui.label("Delay");
            ui.add(
                egui::DragValue::new(&mut settings.code.ghost_delay_ms)
                    .range(0..=5000)
                    .suffix(" ms")
                    .speed(10.0),
            )
            .labelled_by(l.id)
            .on_hover_text("How long a pause in typing asks for a suggestion");
            let l = ui.label("FIM format");
            let chosen = settings.code.fim_format.clone();
            egui::ComboBox::from_id_salt("code_fim_format")
                .selected_text(chosen.as_deref().unwrap_or("detect"))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut settings.code.fim_format, None, "detect");
                    for f in FimFormat::ALL {
                        ui.selectable_value(
                            &mut settings.code.fim_format,
                            Some(f.name().to_owned()),
                            f.name(),
                        );
                    }
                })
                .response
                .labelled_by(l.id)
                .on_hover_text(
                    "Which fill-in-the-middle prompt format to use; \"detect\" reads it from \
                     the model's special tokens",
                );
            ui.separator();
            let (text, tip) = ghost_status(fim, settings.code.ghost_text);
            let text = drawable(ui, &text);
            let tip = drawable(ui, &tip);
            ui.label(weak(ui, &text)).on_hover_text(tip);
        });
    }

    fn tabs_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        egui::ScrollArea::horizontal()
            .id_salt("code_tabs")
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    for tab in &self.tabs {
                        let title = tab.title();
                        let label = tab_label(ui, &title, tab.is_dirty());
                        let selected = self.active == Some(tab.id);
                        let r = ui
                            .add(egui::Button::selectable(selected, label))
                            .on_hover_text(tab.display_path());
                        if r.clicked() && !selected {
                            self.active = Some(tab.id);
                        }
                        if ui
                            .small_button("×")
                            .accessible_name(format!("Close {title}"))
                            .on_hover_text("Close this tab")
                            .clicked()
                        {
                            commands.push(Command::from(CodeCommand::Close(tab.id)));
                        }
                        ui.add_space(6.0);
                    }
                });
            });
        ui.separator();
    }

    fn find_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Find what");
            let r = ui
                .add(egui::TextEdit::singleline(&mut self.find.query).desired_width(200.0))
                .labelled_by(l.id);
            if std::mem::take(&mut self.find.focus) {
                r.request_focus();
            }
            if r.changed() {
                self.find.current = None;
            }
            if r.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
                let back = ui.input(|i| i.modifiers.shift);
                commands.push(Command::from(if back {
                    CodeCommand::FindPrevious
                } else {
                    CodeCommand::FindNext
                }));
                r.request_focus();
            }
            if ui.button("Previous").clicked() {
                commands.push(Command::from(CodeCommand::FindPrevious));
            }
            if ui.button("Next").clicked() {
                commands.push(Command::from(CodeCommand::FindNext));
            }
            if ui
                .checkbox(&mut self.find.match_case, "Match case")
                .changed()
            {
                self.find.current = None;
            }
            if !self.find.replace && ui.button("Replace…").clicked() {
                self.find.replace = true;
            }
            if ui.button("Close find").clicked() {
                self.find.open = false;
            }
            ui.label(weak(ui, &self.find.status));
        });
        if self.find.replace {
            ui.horizontal(|ui| {
                let l = ui.label("Replace with");
                ui.add(egui::TextEdit::singleline(&mut self.find.with).desired_width(200.0))
                    .labelled_by(l.id);
                if ui.button("Replace").clicked() {
                    commands.push(Command::from(CodeCommand::ReplaceOne));
                }
                if ui.button("Replace all").clicked() {
                    commands.push(Command::from(CodeCommand::ReplaceAll));
                }
            });
        }
    }

    /// The find matches of the active tab (recomputed only when the text or query changed).
    pub fn matches(&mut self) -> &[std::ops::Range<usize>] {
        let Some(tab) = self.active_tab() else {
            return &[];
        };
        if !self.find.open || self.find.query.is_empty() {
            self.matches.clear();
            self.matches_key = None;
            return &self.matches;
        }
        let key = (
            tab.id,
            tab.rev,
            self.find.query.clone(),
            self.find.match_case,
        );
        if self.matches_key.as_ref() != Some(&key) {
            self.matches =
                buffer::find_all(&tab.text, &self.find.query, self.find.match_case, 100_000);
            self.matches_key = Some(key);
        }
        &self.matches
    }

    fn editor_area_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &Settings,
        fim: &FimSupport,
        commands: &mut Vec<Command>,
    ) {
        let Some(id) = self.active else {
            return;
        };
        let matches = self.matches().to_vec();
        let current = self.find.current;
        let ghost = self
            .ghost
            .ghost
            .as_ref()
            .filter(|g| g.anchor.tab == id)
            .map(|g| g.text.clone());
        let Some(tab) = self.tab(id) else {
            return;
        };
        let untitled = tab.path.is_none();
        let mut info = String::new();
        if !untitled && let Some(lang) = tab.language() {
            info.push_str(lang.name);
        }
        if !tab.highlighted() {
            info.push_str(" · large file: shown without highlighting");
        }
        ui.horizontal(|ui| {
            if untitled && let Some(tab) = self.tab_mut(id) {
                language_picker_ui(ui, tab);
            }
            ui.label(weak(ui, &info));
            if ghost.as_deref().is_some_and(|g| !g.is_empty()) {
                ui.label(weak(
                    ui,
                    "Suggestion: Tab accepts · Ctrl+Right accepts a word · Esc dismisses",
                ));
            } else if let Some(error) = &self.ghost.last_error {
                ui.label(weak(ui, &format!("Last suggestion failed: {error}")));
            }
        });
        if let Some((tab, range)) = self.pending_cursor.take() {
            let eid = editor::editor_id(tab);
            let mut state = egui::TextEdit::load_state(ui.ctx(), eid).unwrap_or_default();
            state.cursor.set_char_range(Some(range));
            egui::TextEdit::store_state(ui.ctx(), eid, state);
        }
        let Some(tab) = self.tab_mut(id) else {
            return;
        };
        let out = editor::editor_ui(ui, tab, ghost.as_deref(), &matches, current);
        if let Some(c) = out.cursor {
            self.cursors.insert(id, c);
        }
        let Some(tab) = self.tab_mut(id) else {
            return;
        };
        let cursor = out.cursor.map_or(0, |c| c.primary.index.0);
        let selection = out.cursor.is_some_and(|c| c.primary != c.secondary);
        tab.after_frame(out.changed, cursor);
        let rev = tab.rev;
        let enabled = settings.code.ghost_text && fim.format().is_some();
        let delay = Duration::from_millis(settings.code.ghost_delay_ms);
        self.ghost.observe(
            assist::Anchor {
                tab: id,
                rev,
                cursor,
            },
            selection,
            out.focused,
            enabled,
            delay,
            Instant::now(),
            ui.ctx(),
            commands,
        );
    }

    fn confirm_ui(&mut self, ui: &egui::Ui, commands: &mut Vec<Command>) {
        let Some(confirm) = self.confirm else {
            return;
        };
        let (title, body) = match confirm {
            Confirm::CloseTab(id) => (
                "Unsaved changes",
                format!(
                    "{} has unsaved changes. Save them before closing?",
                    self.tab(id).map(Tab::title).unwrap_or_default()
                ),
            ),
            Confirm::Quit => {
                let names: Vec<String> = self
                    .tabs
                    .iter()
                    .filter(|t| t.is_dirty())
                    .map(Tab::title)
                    .collect();
                (
                    "Quit with unsaved changes?",
                    format!("Unsaved: {}. Save them before quitting?", names.join(", ")),
                )
            }
        };
        let modal = egui::Modal::new(egui::Id::unique("code_confirm")).show(ui.ctx(), |ui| {
            ui.set_width(380.0);
            ui.heading(title);
            ui.add_space(6.0);
            ui.label(body);
            ui.add_space(10.0);
            ui.horizontal(|ui| {
                if ui.button("Save").clicked() {
                    self.confirm = None;
                    commands.push(Command::from(match confirm {
                        Confirm::CloseTab(id) => CodeCommand::SaveAndClose(id),
                        Confirm::Quit => CodeCommand::SaveAllAndQuit,
                    }));
                }
                if ui.button("Discard").clicked() {
                    self.confirm = None;
                    commands.push(Command::from(match confirm {
                        Confirm::CloseTab(id) => CodeCommand::Discard(id),
                        Confirm::Quit => CodeCommand::QuitDiscarding,
                    }));
                }
                if ui.button("Cancel").clicked() {
                    self.confirm = None;
                }
            });
        });
        if modal.should_close() {
            self.confirm = None;
        }
    }
}

/// Languages an untitled buffer can be highlighted (and described to the model) as.
const UNTITLED_LANGUAGES: &[&str] = &[
    "txt", "rs", "py", "js", "ts", "c", "cpp", "go", "java", "html", "css", "json", "toml", "md",
    "sh",
];

/// The language of an untitled buffer (a file's comes from its extension).
fn language_picker_ui(ui: &mut egui::Ui, tab: &mut Tab) {
    let name = |token: &str| {
        studio_inference::code::language::language_by_token(token).map_or("Plain text", |l| l.name)
    };
    let current = tab
        .language_token
        .clone()
        .unwrap_or_else(|| "txt".to_owned());
    let l = ui.label("Language");
    egui::ComboBox::from_id_salt(("code_language", tab.id))
        .selected_text(name(&current))
        .show_ui(ui, |ui| {
            for token in UNTITLED_LANGUAGES {
                if ui
                    .selectable_label(current == *token, name(token))
                    .clicked()
                {
                    tab.language_token = (*token != "txt").then(|| (*token).to_owned());
                }
            }
        })
        .response
        .labelled_by(l.id);
}

/// A tab's title, with `●` after it when it has unsaved changes (in the monospace font,
/// which has the glyph).
fn tab_label(ui: &egui::Ui, title: &str, dirty: bool) -> egui::text::LayoutJob {
    let mut job = egui::text::LayoutJob::default();
    let color = ui.visuals().text_color();
    job.append(
        title,
        0.0,
        egui::TextFormat::simple(egui::TextStyle::Button.resolve(ui.style()), color),
    );
    if dirty {
        job.append(
            " ●",
            0.0,
            egui::TextFormat::simple(egui::TextStyle::Monospace.resolve(ui.style()), color),
        );
    }
    job
}

/// What the toolbar says about ghost text, and its tooltip.
fn ghost_status(fim: &FimSupport, enabled: bool) -> (String, String) {
    match fim {
        FimSupport::Supported(f) => {
            if enabled {
                (
                    format!("Ghost text: on ({} format)", f.name()),
                    "Pause typing to see a suggestion".to_owned(),
                )
            } else {
                ("Ghost text: off".to_owned(), String::new())
            }
        }
        FimSupport::NoModel => (
            "Ghost text is disabled: no model is loaded".to_owned(),
            "Load a code model with fill-in-the-middle tokens (Qwen2.5-Coder, StarCoder2, \
             CodeLlama, DeepSeek-Coder, Codestral) in the Models panel"
                .to_owned(),
        ),
        FimSupport::Unsupported { reason } => (
            format!("Ghost text is disabled: {reason}"),
            "Actions still work with any chat model".to_owned(),
        ),
    }
}

/// `text` with characters the fonts cannot draw (the full-width bars and `▁` of some FIM
/// token names) replaced by look-alikes or `?`.
fn drawable(ui: &egui::Ui, text: &str) -> String {
    let font = egui::TextStyle::Body.resolve(ui.style());
    ui.fonts_mut(|f| {
        text.chars()
            .map(|c| match c {
                '｜' => '|',
                '▁' => '_',
                c if c.is_control() || f.has_glyph(&font, c) => c,
                _ => '?',
            })
            .collect()
    })
}

/// A notice-style line in the pane.
pub(crate) fn note(ui: &mut egui::Ui, text: &str) {
    ui.label(
        RichText::new(text)
            .small()
            .color(ui.visuals().warn_fg_color),
    );
}
