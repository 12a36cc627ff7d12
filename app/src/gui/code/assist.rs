//! What the Code panel's commands and the worker's events for its jobs do: ghost text (a
//! debounced fill-in-the-middle request at the cursor, streamed in, cached, accepted or
//! dismissed), code actions (streamed into the pane, edits diffed against the original and
//! applied hunk by hunk as one undoable edit), and opening, saving and closing files.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::text::{CCursor, CCursorRange};
use studio_inference::code::actions::{
    ActionInput, ActionKind, ActionPreset, ContextFile, extract_code, rewrite_from_reply,
};
use studio_inference::code::complete::{CompletionCache, CompletionRequest};
use studio_inference::code::diff::{Diff, apply, diff_lines};
use studio_inference::code::fim::FimFormat;
use studio_inference::code::language::language_by_name;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::{Event, JobId, JobKind};

use egui::{Key, Modifiers};

use super::buffer::{self, Tab, read_source};
use super::command::CodePurpose;
use super::{CodeCommand, CodePanel, Confirm};
use crate::gui::command::Command;
use crate::gui::context::{AppContext, Handled};
use crate::gui::panel::{OpenContext, PanelView, UiContext};
use crate::gui::markdown::Document;
use crate::gui::settings_store::Panel;

/// How much text before and after the cursor a completion request carries (the worker then
/// fits it to the model's token budget).
pub const PREFIX_BYTES: usize = 8 * 1024;
pub const SUFFIX_BYTES: usize = 3 * 1024;
/// Longest suggestion, in tokens.
pub const GHOST_MAX_TOKENS: usize = 128;
/// Lines of context around each change in an action's diff.
pub const DIFF_CONTEXT: usize = 3;

/// Where a suggestion belongs: a tab, its text revision, the cursor (char index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub tab: u64,
    pub rev: u64,
    pub cursor: usize,
}

/// A suggestion being streamed or shown.
#[derive(Debug, Clone)]
pub struct Ghost {
    pub anchor: Anchor,
    pub text: String,
    /// The completion job, while it runs (none for a cache hit).
    pub job: Option<JobId>,
    pub done: bool,
    prefix: String,
    suffix: String,
    model: String,
}

/// Ghost-text state: the suggestion, the debounce, the cache.
#[derive(Debug)]
pub struct GhostState {
    pub ghost: Option<Ghost>,
    /// The cursor position seen last frame, and since when it has not changed.
    seen: Option<Anchor>,
    since: Instant,
    /// Where a suggestion was asked for (or dismissed) already: not asked again there.
    requested: Option<Anchor>,
    pub cache: CompletionCache,
    /// Completion jobs cancelled because the user typed or moved on.
    pub cancelled: Vec<JobId>,
    /// Completion jobs the worker reported as cancelled (the most recent 32).
    pub cancelled_events: Vec<JobId>,
    /// How many completion jobs were submitted, and how many suggestions came from the cache.
    pub submitted: u64,
    pub cache_hits: u64,
    /// Why the last request failed.
    pub last_error: Option<String>,
}

impl Default for GhostState {
    fn default() -> Self {
        Self {
            ghost: None,
            seen: None,
            since: Instant::now(),
            requested: None,
            cache: CompletionCache::new(64),
            cancelled: Vec::new(),
            cancelled_events: Vec::new(),
            submitted: 0,
            cache_hits: 0,
            last_error: None,
        }
    }
}

impl GhostState {
    /// Called every frame after the editor with where the cursor is: a change drops the
    /// suggestion (cancelling its request at once); a pause of `delay` asks for one.
    #[expect(clippy::too_many_arguments, reason = "one call site, all plain values")]
    pub fn observe(
        &mut self,
        anchor: Anchor,
        selection: bool,
        focused: bool,
        enabled: bool,
        delay: Duration,
        now: Instant,
        ctx: &egui::Context,
        commands: &mut Vec<Command>,
    ) {
        if self.seen != Some(anchor) {
            self.seen = Some(anchor);
            self.since = now;
            if self.ghost.as_ref().is_some_and(|g| g.anchor != anchor) {
                self.dismiss(commands);
            }
        }
        if !enabled {
            if self.ghost.is_some() {
                self.dismiss(commands);
            }
            return;
        }
        if !focused || selection || self.ghost.is_some() || self.requested == Some(anchor) {
            return;
        }
        let waited = now.saturating_duration_since(self.since);
        if waited >= delay {
            self.requested = Some(anchor);
            commands.push(Command::from(CodeCommand::RequestCompletion));
        } else {
            ctx.request_repaint_after(delay.saturating_sub(waited));
        }
    }

    /// Drops the suggestion; a request still running is cancelled.
    pub fn dismiss(&mut self, commands: &mut Vec<Command>) {
        if let Some(g) = self.ghost.take()
            && let Some(job) = g.job
            && !g.done
        {
            self.cancelled.push(job);
            if self.cancelled.len() > 32 {
                self.cancelled.remove(0);
            }
            commands.push(Command::from(CodeCommand::CancelJob(job)));
        }
    }

    /// The completion job running now, if any.
    pub fn job(&self) -> Option<JobId> {
        self.ghost.as_ref().filter(|g| !g.done).and_then(|g| g.job)
    }
}

/// How an action run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Streaming,
    Done,
    Stopped,
    Failed(String),
}

/// A code action and what it produced.
#[derive(Debug)]
pub struct ActionRun {
    pub job: Option<JobId>,
    pub preset: ActionPreset,
    pub tab: u64,
    /// Bytes of the tab's text the action works on, and that text.
    pub range: Range<usize>,
    pub original: String,
    pub whole_file: bool,
    pub target_language: String,
    pub reply: String,
    /// What the worker said about the prompt (context cuts).
    pub notes: Vec<String>,
    pub state: RunState,
    /// For edits, once the reply is complete.
    pub diff: Option<Diff>,
    /// Per hunk: accepted, rejected, or not decided (counts as rejected).
    pub decisions: Vec<Option<bool>>,
    pub applied: bool,
    /// The reply parsed as Markdown, and the reply length it was parsed at.
    parsed: Option<(usize, Arc<Document>)>,
}

impl ActionRun {
    pub fn is_streaming(&self) -> bool {
        self.state == RunState::Streaming
    }

    /// The reply as Markdown (parsed again only when it grew).
    pub fn document(&mut self) -> Arc<Document> {
        match &self.parsed {
            Some((len, doc)) if *len == self.reply.len() => doc.clone(),
            _ => {
                let doc = Arc::new(Document::parse(&self.reply));
                self.parsed = Some((self.reply.len(), doc.clone()));
                doc
            }
        }
    }

    fn finish(&mut self, state: RunState) {
        self.state = state;
        self.job = None;
        if self.preset.kind == ActionKind::Edit && self.state == RunState::Done {
            let rewrite = rewrite_from_reply(&self.original, &self.reply);
            let diff = diff_lines(&self.original, &rewrite, DIFF_CONTEXT);
            self.decisions = vec![None; diff.hunks.len()];
            self.diff = Some(diff);
        }
    }
}

/// Whether a path dropped on the Code panel is for the editor (not a model, an image or a
/// folder, which go where they go on every panel).
pub fn is_code_drop(path: &Path) -> bool {
    if path.is_dir() || crate::gui::canvas::actions::is_image_file(path) {
        return false;
    }
    !path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        [
            "safetensors",
            "gguf",
            "bin",
            "pt",
            "pth",
            "ckpt",
            "pkl",
            "onnx",
            "npy",
        ]
        .contains(&e.to_ascii_lowercase().as_str())
    })
}

impl PanelView for CodePanel {
    type Command = CodeCommand;
    type Purpose = CodePurpose;

    /// Opens the tabs the recovery file kept and the action presets.
    fn open(cx: &mut OpenContext<'_>) -> Self {
        let (code, notes) = CodePanel::new(cx.home, cx.presets_dir);
        for note in notes {
            cx.notices.warning(note);
        }
        code
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        let fim = cx
            .worker
            .map(studio_inference::worker::Worker::fim_support)
            .unwrap_or_default();
        self.code_ui(
            ui,
            cx.settings,
            &fim,
            cx.model.map(|m| m.name.as_str()),
            cx.commands,
        );
    }

    fn apply(&mut self, command: CodeCommand, cx: &mut AppContext<'_>) {
        self.apply_command(command, cx);
    }

    /// An event of a job the Code panel submitted (`purpose` says which).
    fn on_event(
        &mut self,
        job: JobId,
        purpose: &CodePurpose,
        event: Event,
        cx: &mut AppContext<'_>,
    ) -> Handled {
        match purpose {
            CodePurpose::CodeComplete => self.completion_event(job, event),
            CodePurpose::CodeAction => self.action_event(job, event, cx),
        }
        Handled::Yes
    }

    /// The window was asked to close: with unsaved tabs, keep it open and ask (the recovery
    /// file has the text either way), showing the Code panel.
    fn frame(&mut self, cx: &mut AppContext<'_>) {
        let ctx = cx.ctx;
        if std::mem::take(&mut self.close_now) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        if ctx.input(|i| i.viewport().close_requested()) && self.has_unsaved() && !self.allow_close
        {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.confirm = Some(Confirm::Quit);
            cx.settings.panel = Panel::Code;
        }
    }

    /// Esc first dismisses a suggestion (cancelling its request), before the window's Esc
    /// cancels the running job.
    fn shortcuts(&mut self, cx: &mut AppContext<'_>) {
        if self.wants_escape() && cx.ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape))
        {
            cx.commands.push(CodeCommand::DismissGhost.into());
        }
    }

    /// A source file dropped on the Code panel opens in the editor.
    fn take_drop(&mut self, path: &Path, shown: bool, cx: &mut AppContext<'_>) -> bool {
        if !(shown && is_code_drop(path)) {
            return false;
        }
        cx.commands
            .push(CodeCommand::Open(Some(path.to_path_buf())).into());
        true
    }

    fn drop_hint(&self) -> Option<&'static str> {
        Some("Drop a source file to open it in the editor, or a model to load it")
    }

    /// The recovery file, written a moment after the last edit.
    fn autosave(&mut self, cx: &mut AppContext<'_>) -> Option<Duration> {
        self.store
            .tick(&self.tabs, self.active, self.next_untitled, cx.files)
    }

    /// Writes the recovery file now.
    fn flush(&mut self, cx: &mut AppContext<'_>) {
        self.store
            .flush(&self.tabs, self.active, self.next_untitled, cx.files);
    }
}

impl CodePanel {
    /// The cursor (or selection) of tab `id`'s editor as last drawn (char indices).
    pub fn cursor(&self, id: u64) -> Option<CCursorRange> {
        self.cursors.get(&id).copied()
    }

    fn quit_now(&mut self, cx: &mut AppContext<'_>) {
        self.allow_close = true;
        self.store
            .flush(&self.tabs, self.active, self.next_untitled, cx.files);
        // Sent by the next frame's logic, on the context that draws the window.
        self.close_now = true;
        cx.ctx.request_repaint();
    }

    /// Puts the cursor of tab `id` at char index `cursor` (the editor takes it next frame).
    fn set_code_cursor(&mut self, id: u64, cursor: usize) {
        self.select_code(id, CCursorRange::one(CCursor::new(cursor)));
    }

    fn select_code(&mut self, id: u64, range: CCursorRange) {
        self.cursors.insert(id, range);
        self.pending_cursor = Some((id, range));
    }

    fn apply_command(&mut self, command: CodeCommand, cx: &mut AppContext<'_>) {
        match command {
            CodeCommand::NewTab => {
                self.new_tab();
            }
            CodeCommand::Open(Some(path)) => self.open_code_file(path, cx),
            CodeCommand::Open(None) => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Open a source file")
                    .pick_file()
                {
                    self.open_code_file(path, cx);
                }
            }
            CodeCommand::Save(id) => {
                let path = self.tab(id).and_then(|t| t.path.clone());
                match path {
                    Some(path) => {
                        self.write_tab(id, &path, cx);
                    }
                    None => self.apply(
                        CodeCommand::SaveAs {
                            tab: id,
                            path: None,
                        },
                        cx,
                    ),
                }
            }
            CodeCommand::SaveAs { tab, path } => {
                let path = path.or_else(|| {
                    let name = self.tab(tab).map(Tab::title).unwrap_or_default();
                    rfd::FileDialog::new()
                        .set_title("Save the file as")
                        .set_file_name(name)
                        .save_file()
                });
                if let Some(path) = path
                    && self.write_tab(tab, &path, cx)
                    && let Some(t) = self.tab_mut(tab)
                {
                    // The file's extension decides the language from now on, if it names one.
                    if studio_inference::code::language::language_for_path(&path).is_some() {
                        t.language_token = None;
                    }
                    t.path = Some(path);
                }
            }
            CodeCommand::Close(id) => {
                if self.tab(id).is_some_and(Tab::is_dirty) {
                    self.active = Some(id);
                    self.confirm = Some(Confirm::CloseTab(id));
                } else {
                    self.close_tab(id, cx);
                }
            }
            CodeCommand::Discard(id) => self.close_tab(id, cx),
            CodeCommand::SaveAndClose(id) => {
                self.apply(CodeCommand::Save(id), cx);
                if self.tab(id).is_some_and(|t| !t.is_dirty()) {
                    self.close_tab(id, cx);
                }
            }
            CodeCommand::Undo | CodeCommand::Redo => {
                let Some(tab) = self.active_tab_mut() else {
                    return;
                };
                let id = tab.id;
                let cursor = if command == CodeCommand::Undo {
                    tab.undo()
                } else {
                    tab.redo()
                };
                if let Some(c) = cursor {
                    self.set_code_cursor(id, c);
                }
            }
            CodeCommand::AcceptGhost => self.accept_ghost(false, cx),
            CodeCommand::AcceptWord => self.accept_ghost(true, cx),
            CodeCommand::DismissGhost => {
                let mut commands = Vec::new();
                self.ghost.dismiss(&mut commands);
                self.ghost.requested = self.ghost.seen;
                cx.commands.extend(commands);
            }
            CodeCommand::RequestCompletion => self.request_completion(cx),
            CodeCommand::CancelJob(job) => {
                if let Some(worker) = &cx.worker {
                    worker.cancel(job);
                }
            }
            CodeCommand::RunAction(id) => self.run_action(&id, cx),
            CodeCommand::StopAction => {
                if let (Some(worker), Some(job)) =
                    (&cx.worker, self.action.as_ref().and_then(|a| a.job))
                {
                    worker.cancel(job);
                }
            }
            CodeCommand::ApplyHunks => self.apply_hunks(cx),
            CodeCommand::OpenResultInTab => {
                let Some(run) = &self.action else {
                    return;
                };
                let code = extract_code(&run.reply);
                let token = if run.preset.id == "translate" {
                    language_by_name(&run.target_language).map(|l| l.token.to_owned())
                } else {
                    self.tab(run.tab)
                        .and_then(Tab::language)
                        .map(|l| l.token.to_owned())
                };
                let id = self.new_tab();
                if let Some(t) = self.tab_mut(id) {
                    t.language_token = token;
                    t.edit(code, 0);
                }
            }
            CodeCommand::FindNext => self.find(true),
            CodeCommand::FindPrevious => self.find(false),
            CodeCommand::ReplaceOne => self.replace_one(),
            CodeCommand::ReplaceAll => self.replace_all(),
            CodeCommand::SaveAllAndQuit => {
                let dirty: Vec<(u64, PathBuf)> = self
                    .tabs
                    .iter()
                    .filter(|t| t.is_dirty())
                    .filter_map(|t| t.path.clone().map(|p| (t.id, p)))
                    .collect();
                let mut ok = true;
                for (id, path) in dirty {
                    ok &= self.write_tab(id, &path, cx);
                }
                if ok {
                    self.quit_now(cx);
                }
            }
            CodeCommand::QuitDiscarding => {
                let dirty: Vec<u64> = self
                    .tabs
                    .iter()
                    .filter(|t| t.is_dirty())
                    .map(|t| t.id)
                    .collect();
                for id in dirty {
                    self.remove_tab(id);
                }
                self.quit_now(cx);
            }
        }
    }

    /// Opens `path` in a tab, or says why not.
    pub fn open_code_file(&mut self, path: PathBuf, cx: &mut AppContext<'_>) {
        match read_source(&path) {
            Ok(text) => {
                self.open_tab(path, text);
                cx.settings.panel = Panel::Code;
            }
            Err(refused) => cx.notices.warning(refused.0),
        }
    }

    fn close_tab(&mut self, id: u64, cx: &mut AppContext<'_>) {
        if self
            .ghost
            .ghost
            .as_ref()
            .is_some_and(|g| g.anchor.tab == id)
        {
            let mut commands = Vec::new();
            self.ghost.dismiss(&mut commands);
            cx.commands.extend(commands);
        }
        self.remove_tab(id);
    }

    /// Writes tab `id` to `path`; on failure the tab stays as it is (dirty) and a notice says
    /// why. Returns whether it was written.
    fn write_tab(&mut self, id: u64, path: &Path, cx: &mut AppContext<'_>) -> bool {
        let Some(tab) = self.tab(id) else {
            return false;
        };
        match crate::home::atomic_write(path, tab.text.as_bytes()) {
            Ok(()) => {
                if let Some(t) = self.tab_mut(id) {
                    t.mark_saved();
                }
                cx.notices.info(format!("Saved {}", path.display()));
                true
            }
            Err(e) => {
                cx.notices.error(format!(
                    "Could not save {}: {e:#}. The text is still in the editor, unsaved (and \
                     in the recovery file).",
                    path.display()
                ));
                false
            }
        }
    }

    // ---- ghost text -------------------------------------------------------------------------

    fn request_completion(&mut self, cx: &mut AppContext<'_>) {
        let Some(anchor) = self.ghost.seen else {
            return;
        };
        let format = cx
            .settings
            .code
            .fim_format
            .as_deref()
            .and_then(FimFormat::from_name);
        // The format is part of the cache key: another format gives other suggestions.
        let Some(model) = cx.model.as_ref().map(|m| match format {
            Some(f) => format!("{} ({})", m.name, f.name()),
            None => m.name.clone(),
        }) else {
            return;
        };
        let Some(tab) = self.tab(anchor.tab) else {
            return;
        };
        if tab.rev != anchor.rev {
            return;
        }
        let at = buffer::byte_index(&tab.text, anchor.cursor);
        let prefix = buffer::window_before(&tab.text, at, PREFIX_BYTES).to_owned();
        let suffix = buffer::window_after(&tab.text, at, SUFFIX_BYTES).to_owned();
        if prefix.trim().is_empty() && suffix.trim().is_empty() {
            return;
        }
        let ghost = &mut self.ghost;
        if let Some(hit) = ghost.cache.get(&model, &prefix, &suffix)
            && !hit.is_empty()
        {
            ghost.cache_hits += 1;
            ghost.ghost = Some(Ghost {
                anchor,
                text: hit,
                job: None,
                done: true,
                prefix,
                suffix,
                model,
            });
            return;
        }
        let params = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            max_new_tokens: GHOST_MAX_TOKENS,
            ..SamplingParams::default()
        };
        let mut request = CompletionRequest::new(prefix.clone(), suffix.clone(), params);
        request.format = format;
        let job = cx.submit(
            JobKind::Complete {
                request: Box::new(request),
            },
            CodePurpose::CodeComplete.into(),
        );
        if let Some(job) = job {
            self.ghost.submitted += 1;
            self.ghost.last_error = None;
            self.ghost.ghost = Some(Ghost {
                anchor,
                text: String::new(),
                job: Some(job),
                done: false,
                prefix,
                suffix,
                model,
            });
        }
    }

    fn accept_ghost(&mut self, one_word: bool, cx: &mut AppContext<'_>) {
        let Some(g) = self.ghost.ghost.take() else {
            return;
        };
        let Some(tab) = self.tab_mut(g.anchor.tab) else {
            return;
        };
        if tab.rev != g.anchor.rev || g.text.is_empty() {
            return;
        }
        let taken = if one_word {
            buffer::next_word(&g.text).to_owned()
        } else {
            g.text.clone()
        };
        let at = buffer::byte_index(&tab.text, g.anchor.cursor);
        let cursor = tab.replace_range(at..at, &taken);
        let anchor = Anchor {
            tab: tab.id,
            rev: tab.rev,
            cursor,
        };
        self.set_code_cursor(anchor.tab, cursor);
        let ghost = &mut self.ghost;
        // Where the suggestion was taken is not asked again until the user moves on.
        ghost.seen = Some(anchor);
        ghost.since = Instant::now();
        ghost.requested = Some(anchor);
        let rest = &g.text[taken.len()..];
        if !rest.is_empty() {
            ghost.ghost = Some(Ghost {
                anchor,
                text: rest.to_owned(),
                ..g
            });
        } else if let Some(job) = g.job
            && !g.done
        {
            // The whole suggestion so far was taken while it still streamed: stop it.
            ghost.cancelled.push(job);
            if let Some(worker) = &cx.worker {
                worker.cancel(job);
            }
        }
    }

    fn completion_event(&mut self, job: JobId, event: Event) {
        let ghost = &mut self.ghost;
        let mine = ghost.ghost.as_ref().is_some_and(|g| g.job == Some(job));
        match event {
            Event::Text { text, .. } => {
                if mine && let Some(g) = ghost.ghost.as_mut() {
                    g.text.push_str(&text);
                }
            }
            Event::Done { .. } => {
                if mine && let Some(g) = ghost.ghost.as_mut() {
                    g.done = true;
                    if g.text.is_empty() {
                        ghost.ghost = None;
                    } else {
                        ghost.cache.insert(&g.model, &g.prefix, &g.suffix, &g.text);
                    }
                }
            }
            Event::Cancelled { .. } => {
                if mine {
                    ghost.ghost = None;
                }
                ghost.cancelled_events.push(job);
                if ghost.cancelled_events.len() > 32 {
                    ghost.cancelled_events.remove(0);
                }
            }
            Event::Failed { error, .. } => {
                if mine {
                    ghost.ghost = None;
                }
                ghost.last_error = Some(error);
            }
            _ => {}
        }
    }

    // ---- actions ------------------------------------------------------------------------------

    fn run_action(&mut self, id: &str, cx: &mut AppContext<'_>) {
        let Some(preset) = self.presets.iter().find(|p| p.id == id).cloned() else {
            return;
        };
        if cx.model.is_none() {
            cx.notices.warning(
                "Load a model in the Models panel first: actions work with any chat model",
            );
            return;
        }
        if self.action.as_ref().is_some_and(ActionRun::is_streaming) {
            cx.notices
                .warning("An action is running: wait for it or stop it first");
            return;
        }
        let Some(tab) = self.active_tab() else {
            return;
        };
        let (range, whole_file) = match self.cursor(tab.id) {
            Some(c) if c.primary != c.secondary => {
                let [a, b] = c.sorted_cursors();
                (
                    buffer::byte_index(&tab.text, a.index.0)
                        ..buffer::byte_index(&tab.text, b.index.0),
                    false,
                )
            }
            _ => (0..tab.text.len(), true),
        };
        let code = tab.text[range.clone()].to_owned();
        if code.trim().is_empty() {
            cx.notices
                .warning("There is no code to work on: type or open some first");
            return;
        }
        let context = if cx.settings.code.include_tabs {
            self.tabs
                .iter()
                .filter(|t| t.id != tab.id && !t.text.trim().is_empty())
                .map(|t| ContextFile {
                    path: t.display_path(),
                    text: t.text.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let input = ActionInput {
            path: tab.display_path(),
            code: code.clone(),
            instruction: self.instruction.clone(),
            target_language: self.translate_to.clone(),
            context,
        };
        let tab_id = tab.id;
        let context_length = cx.model.as_ref().map_or(4096, |m| m.context_length);
        let mut params = cx.settings.sampling.clone();
        params.max_new_tokens = params
            .max_new_tokens
            .max(1024)
            .min((context_length / 2).max(64));
        let target_language = input.target_language.clone();
        let job = cx.submit(
            JobKind::CodeAction {
                preset: Box::new(preset.clone()),
                input: Box::new(input),
                params,
            },
            CodePurpose::CodeAction.into(),
        );
        if job.is_some() {
            self.action = Some(ActionRun {
                job,
                preset,
                tab: tab_id,
                range,
                original: code,
                whole_file,
                target_language,
                reply: String::new(),
                notes: Vec::new(),
                state: RunState::Streaming,
                diff: None,
                decisions: Vec::new(),
                applied: false,
                parsed: None,
            });
        }
    }

    fn action_event(&mut self, job: JobId, event: Event, cx: &mut AppContext<'_>) {
        let run = self.action.as_mut().filter(|r| r.job == Some(job));
        match event {
            Event::Text { text, .. } => {
                if let Some(run) = run {
                    run.reply.push_str(&text);
                }
            }
            Event::Notice { message, .. } => {
                if let Some(run) = run {
                    run.notes.push(message);
                }
            }
            Event::ContextTrimmed {
                dropped_messages, ..
            } => {
                if let Some(run) = run {
                    run.notes
                        .push(format!("{dropped_messages} messages were left out to fit"));
                }
            }
            Event::Done { .. } => {
                if let Some(run) = run {
                    run.finish(RunState::Done);
                }
            }
            Event::Cancelled { .. } => {
                if let Some(run) = run {
                    run.finish(RunState::Stopped);
                }
            }
            Event::Failed { error, .. } => {
                if let Some(run) = run {
                    run.finish(RunState::Failed(error.clone()));
                }
                cx.notices.error(format!("The action failed: {error}"));
            }
            _ => {}
        }
    }

    fn apply_hunks(&mut self, cx: &mut AppContext<'_>) {
        let Some(run) = self.action.as_mut() else {
            return;
        };
        let Some(diff) = &run.diff else {
            return;
        };
        let accepted: Vec<bool> = run.decisions.iter().map(|d| *d == Some(true)).collect();
        let count = accepted.iter().filter(|a| **a).count();
        if count == 0 {
            cx.notices.warning("Accept at least one change first");
            return;
        }
        let total = diff.hunks.len();
        let new_part = apply(&run.original, diff, &accepted);
        let range = run.range.clone();
        let tab_id = run.tab;
        let original = run.original.clone();
        let Some(tab) = self.tab_mut(tab_id) else {
            cx.notices.warning("The tab the action worked on is closed");
            return;
        };
        if tab.text.get(range.clone()) != Some(original.as_str()) {
            cx.notices.warning(
                "The code changed since the action ran: run it again to get a diff of the \
                 current text",
            );
            return;
        }
        let cursor = tab.replace_range(range, &new_part);
        if let Some(run) = self.action.as_mut() {
            run.applied = true;
        }
        self.active = Some(tab_id);
        self.set_code_cursor(tab_id, cursor);
        cx.notices.info(format!(
            "Applied {count} of {total} change{} (Ctrl+Z undoes them)",
            if total == 1 { "" } else { "s" }
        ));
    }

    // ---- find / replace -------------------------------------------------------------------

    fn find(&mut self, forward: bool) {
        let Some(tab) = self.active_tab() else {
            return;
        };
        let id = tab.id;
        let cursor = self.cursor(id);
        let from = cursor.map_or(0, |c| {
            let [a, b] = c.sorted_cursors();
            buffer::byte_index(&tab.text, if forward { b.index.0 } else { a.index.0 })
        });
        let find = &self.find;
        let found = buffer::find_from(&tab.text, &find.query, find.match_case, from, forward);
        let Some(m) = found else {
            "No match".clone_into(&mut self.find.status);
            self.find.current = None;
            return;
        };
        let (a, b) = (
            buffer::char_index(&tab.text, m.start),
            buffer::char_index(&tab.text, m.end),
        );
        let matches = self.matches().to_vec();
        let index = matches.iter().position(|r| *r == m);
        self.find.current = index;
        self.find.status =
            index.map_or_else(String::new, |i| format!("{} of {}", i + 1, matches.len()));
        self.select_code(id, CCursorRange::two(CCursor::new(a), CCursor::new(b)));
    }

    fn replace_one(&mut self) {
        let Some(tab) = self.active_tab() else {
            return;
        };
        let id = tab.id;
        let selected = self.cursor(id).map(|c| {
            let [a, b] = c.sorted_cursors();
            buffer::byte_index(&tab.text, a.index.0)..buffer::byte_index(&tab.text, b.index.0)
        });
        let find = &self.find;
        let is_match = selected.as_ref().is_some_and(|r| {
            r.start < r.end
                && buffer::find_all(&tab.text[r.clone()], &find.query, find.match_case, 1)
                    .first()
                    .is_some_and(|m| *m == (0..r.len()))
        });
        if let (true, Some(range)) = (is_match, selected) {
            let with = self.find.with.clone();
            if let Some(tab) = self.tab_mut(id) {
                let cursor = tab.replace_range(range, &with);
                self.set_code_cursor(id, cursor);
            }
        }
        self.find(true);
    }

    fn replace_all(&mut self) {
        let find = &self.find;
        let (query, with, case) = (find.query.clone(), find.with.clone(), find.match_case);
        let Some(tab) = self.active_tab_mut() else {
            return;
        };
        let (text, n) = buffer::replace_all(&tab.text, &query, &with, case);
        if n > 0 {
            tab.edit(text, 0);
        }
        self.find.current = None;
        self.find.status = format!("Replaced {n}");
    }
}
