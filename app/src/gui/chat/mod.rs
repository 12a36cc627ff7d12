//! The Chat panel: conversations on the left ([`self::list`]), the open conversation in
//! the middle with the message box under it, and its parameters on the right
//! ([`self::params`]).
//!
//! A conversation is a tree ([`self::store`]); the panel shows its active path, with
//! `< 2/3 >` arrows on turns that have other versions. Replies are drawn as Markdown from a
//! per-message parse cache ([`crate::gui::markdown`]), so a streaming reply costs one parse per
//! frame and finished ones none.

mod actions;
pub mod command;
pub mod list;
pub mod message;
pub mod params;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::RichText;
use studio_inference::llm::chat::Role;
use studio_inference::llm::generate::GenerationStats;
use studio_inference::llm::loader::ModelInfo;
use studio_inference::llm::tools::CallList;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::worker::JobId;

use self::list::ConversationList;
use self::message::{Editing, MessageAction, MessageView, empty_chat_ui};
use self::params::ParametersView;
use self::store::{
    Conversation, ConversationStore, Message, MessageId, ReplyInfo, ReplyState, title_from,
};
use self::command::{ChatCommand, ExportFormat};
use crate::gui::command::Command;
use crate::gui::format;
use crate::gui::markdown::MarkdownCache;
use crate::gui::presets::Presets;
use crate::gui::settings_store::{Panel, Settings};
use crate::gui::style::weak;

/// How often a streaming reply is written to disk.
pub const STREAM_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// How long changed parameters wait before the conversation is written.
pub const PARAMS_SAVE_DELAY: Duration = Duration::from_secs(1);

/// The reply being written now.
#[derive(Debug)]
pub struct ActiveReply {
    pub job: JobId,
    pub conversation: String,
    pub message: MessageId,
    /// When the worker started the job (it may wait behind a model load).
    pub started: Option<Instant>,
    first_token: Option<Instant>,
    tokens: usize,
    last_saved: Instant,
    dirty: bool,
}

impl ActiveReply {
    /// Tokens per second since the first token, while streaming.
    pub fn rate(&self) -> Option<f64> {
        let first = self.first_token?;
        let secs = first.elapsed().as_secs_f64();
        (self.tokens > 1 && secs > 0.05).then(|| (self.tokens - 1) as f64 / secs)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// What the chat panel reads from the rest of the app while drawing.
pub struct ChatUiContext<'a> {
    pub settings: &'a mut Settings,
    pub model: Option<&'a ModelInfo>,
    /// A model load is queued or running.
    pub model_loading: bool,
}

/// The parameters the settings show, and whose they are.
struct ParamsShown {
    conversation: String,
    sampling: SamplingParams,
    system_prompt: String,
}

pub struct ChatPanel {
    pub store: ConversationStore,
    pub selected: Option<String>,
    /// The message being typed.
    pub input: String,
    presets: Presets,
    active: Option<ActiveReply>,
    /// Rate of the last finished reply, for the status bar.
    last_rate: Option<f64>,
    editing: Option<Editing>,
    /// The results typed for the last reply's tool calls, by call id.
    tool_results: std::collections::HashMap<String, String>,
    /// Each finished reply's tool calls, read once rather than every frame.
    tool_calls: ToolCallCache,
    list: ConversationList,
    params: ParametersView,
    markdown: MarkdownCache,
    params_shown: Option<ParamsShown>,
    /// A conversation whose parameters changed and are not on disk yet, and since when.
    params_unsaved: Option<(String, Instant)>,
    /// Ctrl+Enter was pressed this frame: send once the frame's typing has reached the box.
    send_after_ui: bool,
}

impl ChatPanel {
    pub fn new(store: ConversationStore, presets: Presets, selected: Option<String>) -> Self {
        let selected = selected
            .filter(|id| store.get(id).is_some())
            .or_else(|| store.list().first().map(|c| c.id.clone()));
        Self {
            store,
            selected,
            input: String::new(),
            presets,
            active: None,
            last_rate: None,
            editing: None,
            tool_results: std::collections::HashMap::new(),
            tool_calls: ToolCallCache::default(),
            list: ConversationList::default(),
            params: ParametersView::default(),
            markdown: MarkdownCache::default(),
            params_shown: None,
            params_unsaved: None,
            send_after_ui: false,
        }
    }

    pub fn presets(&self) -> &Presets {
        &self.presets
    }

    pub fn active(&self) -> Option<&ActiveReply> {
        self.active.as_ref()
    }

    /// The Markdown parse cache (tests check that finished replies are not parsed again).
    pub fn markdown(&self) -> &MarkdownCache {
        &self.markdown
    }

    /// Live rate while streaming, else the last reply's.
    pub fn rate(&self) -> Option<(f64, bool)> {
        match &self.active {
            Some(a) => a.rate().map(|r| (r, true)),
            None => self.last_rate.map(|r| (r, false)),
        }
    }

    pub fn current(&self) -> Option<&Conversation> {
        self.selected.as_deref().and_then(|id| self.store.get(id))
    }

    pub fn select(&mut self, id: &str) {
        if self.store.get(id).is_some() {
            self.selected = Some(id.to_owned());
            self.editing = None;
        }
    }

    /// Opens an empty conversation (reusing the open one if it is still empty).
    pub fn new_conversation(&mut self) {
        if self.current().is_some_and(|c| c.messages.is_empty()) {
            return;
        }
        let id = self.store.create();
        self.select(&id);
    }

    /// Starts renaming `id` in the conversation list.
    pub fn start_rename(&mut self, id: &str) {
        if let Some(c) = self.store.get(id) {
            self.list.start_rename(id, &c.title);
        }
    }

    /// Moves the typed message to the end of the open conversation (creating one if needed).
    /// Returns the conversation's id and the message's; `None` when there is nothing to send.
    pub fn take_input(&mut self) -> Option<(String, MessageId)> {
        let text = self.input.trim().to_owned();
        if text.is_empty() {
            return None;
        }
        self.input.clear();
        let existing = self
            .selected
            .clone()
            .filter(|id| self.store.get(id).is_some());
        let id = existing.unwrap_or_else(|| self.store.create());
        self.selected = Some(id.clone());
        let c = self.store.get_mut(&id)?;
        if c.title.is_empty() {
            c.title = title_from(&text);
        }
        let message = c.push_to_path(Message::user(text));
        Some((id, message))
    }

    /// What a reply written again for `reply` answers: its parent. An empty reply that nothing
    /// follows (failed or stopped before any text) is removed rather than kept as a version.
    pub fn regenerate_target(&mut self, id: &str, reply: MessageId) -> Option<MessageId> {
        let c = self.store.get_mut(id)?;
        let m = c.message(reply)?;
        if m.role != Role::Assistant {
            return None;
        }
        let parent = m.parent?;
        if m.content.trim().is_empty() {
            c.remove_leaf(reply);
        }
        Some(parent)
    }

    /// What Regenerate (under the message box) replies to: the message before the last reply,
    /// or the last message if it is the user's.
    pub fn last_reply_target(&mut self, id: &str) -> Option<MessageId> {
        let last = self
            .store
            .get(id)?
            .active_path()
            .last()
            .map(|m| (m.id, m.role))?;
        match last {
            (message, Role::User | Role::Tool) => Some(message),
            (reply, Role::Assistant) => self.regenerate_target(id, reply),
        }
    }

    /// Adds `content` as a new version of user message `message` (a sibling, shown from now
    /// on). Returns its id.
    pub fn branch_edit(
        &mut self,
        id: &str,
        message: MessageId,
        content: &str,
    ) -> Option<MessageId> {
        let c = self.store.get_mut(id)?;
        let original = c.message(message)?;
        if original.role != Role::User || content.trim().is_empty() {
            return None;
        }
        let parent = original.parent;
        Some(c.push(parent, Message::user(content.trim())))
    }

    /// Shows the branch through `message`.
    pub fn show_branch(&mut self, id: &str, message: MessageId) -> bool {
        let changed = self.store.get_mut(id).is_some_and(|c| c.choose(message));
        if changed {
            self.editing = None;
        }
        changed
    }

    /// Appends an empty reply after `parent`, to be streamed into; returns its id.
    pub fn add_reply(
        &mut self,
        id: &str,
        parent: MessageId,
        model: &str,
        seed: u64,
    ) -> Option<MessageId> {
        let c = self.store.get_mut(id)?;
        c.message(parent)?;
        let reply = Message {
            role: Role::Assistant,
            reply: Some(ReplyInfo {
                model: Some(model.to_owned()),
                seed: Some(seed),
                ..ReplyInfo::default()
            }),
            ..Message::user("")
        };
        Some(c.push(Some(parent), reply))
    }

    pub fn begin_reply(&mut self, job: JobId, conversation: String, message: MessageId) {
        self.active = Some(ActiveReply {
            job,
            conversation,
            message,
            started: None,
            first_token: None,
            tokens: 0,
            last_saved: Instant::now(),
            dirty: false,
        });
    }

    fn message_mut(&mut self, id: &str, message: MessageId) -> Option<&mut Message> {
        self.store.get_mut(id)?.message_mut(message)
    }

    /// The active reply for `job`, with its message.
    fn active_for(&mut self, job: JobId) -> Option<(&mut ActiveReply, Option<&mut Message>)> {
        let active = self.active.as_mut().filter(|a| a.job == job)?;
        let message = self
            .store
            .get_mut(&active.conversation)
            .and_then(|c| c.message_mut(active.message));
        Some((active, message))
    }

    pub fn reply_started(&mut self, job: JobId) {
        if let Some((a, _)) = self.active_for(job) {
            a.started = Some(Instant::now());
        }
    }

    pub fn reply_text(&mut self, job: JobId, text: &str, tokens: usize) {
        if let Some((a, message)) = self.active_for(job) {
            if a.first_token.is_none() && tokens > 0 {
                a.first_token = Some(Instant::now());
            }
            a.tokens += tokens;
            a.dirty = true;
            if let Some(m) = message {
                m.content.push_str(text);
                if let Some(r) = m.reply.as_mut() {
                    r.generated_tokens += tokens;
                }
            }
        }
    }

    pub fn reply_prompt_tokens(&mut self, job: JobId, tokens: usize) {
        if let Some((_, Some(m))) = self.active_for(job)
            && let Some(r) = m.reply.as_mut()
        {
            r.prompt_tokens = Some(tokens);
        }
    }

    pub fn reply_trimmed(&mut self, job: JobId, dropped: usize) {
        if let Some((_, Some(m))) = self.active_for(job)
            && let Some(r) = m.reply.as_mut()
        {
            r.dropped_messages = dropped;
        }
    }

    /// Ends the active reply; returns its conversation id so the caller saves it.
    pub fn reply_finished(
        &mut self,
        job: JobId,
        state: ReplyState,
        stats: Option<GenerationStats>,
        error: Option<String>,
    ) -> Option<String> {
        let active = self.active.take_if(|a| a.job == job)?;
        if let Some(s) = &stats
            && s.generated_tokens > 1
            && s.decode_tok_s > 0.0
        {
            self.last_rate = Some(s.decode_tok_s);
        }
        self.finish_message(&active.conversation, active.message, state, stats, error);
        Some(active.conversation)
    }

    /// Marks a reply as ended (also for replies whose job could not even be submitted).
    pub fn finish_message(
        &mut self,
        id: &str,
        message: MessageId,
        state: ReplyState,
        stats: Option<GenerationStats>,
        error: Option<String>,
    ) {
        if let Some(m) = self.message_mut(id, message) {
            let trimmed = m.content.trim();
            if trimmed.len() != m.content.len() {
                m.content = trimmed.to_owned();
            }
            let r = m.reply.get_or_insert_with(ReplyInfo::default);
            r.state = state;
            if stats.is_some() {
                r.stats = stats;
            }
            r.error = error;
        }
    }

    /// Ends the reply being written into `id` now (its conversation is being deleted): the
    /// text so far is kept, marked stopped. Returns the job to cancel.
    pub fn abandon_reply(&mut self, id: &str) -> Option<JobId> {
        let active = self.active.take_if(|a| a.conversation == id)?;
        self.finish_message(id, active.message, ReplyState::Stopped, None, None);
        Some(active.job)
    }

    /// The conversation to write now if the streaming reply has unsaved text and the last
    /// write is [`STREAM_SAVE_INTERVAL`] old.
    pub fn due_stream_save(&mut self) -> Option<String> {
        let a = self.active.as_mut()?;
        if a.dirty && a.last_saved.elapsed() >= STREAM_SAVE_INTERVAL {
            a.dirty = false;
            a.last_saved = Instant::now();
            return Some(a.conversation.clone());
        }
        None
    }

    pub fn edit_message(&mut self, id: &str, message: MessageId, content: String) -> bool {
        match self.message_mut(id, message) {
            Some(m) => {
                m.content = content;
                true
            }
            None => false,
        }
    }

    /// Whether the active reply belongs to `id`.
    fn streaming_in(&self, id: &str) -> bool {
        self.active.as_ref().is_some_and(|a| a.conversation == id)
    }

    // ---- parameters per conversation ------------------------------------------------------

    /// Keeps the parameters shown (`settings.sampling`, `settings.system_prompt`) and the open
    /// conversation's in step, once per frame: opening a conversation shows its parameters (a
    /// conversation that has none yet keeps the last ones used); changing them changes the
    /// conversation's, written a moment later.
    pub fn sync_params(&mut self, settings: &mut Settings) {
        let Some(id) = self.selected.clone() else {
            self.params_shown = None;
            return;
        };
        let Some(c) = self.store.get(&id) else {
            self.params_shown = None;
            return;
        };
        let switched = self
            .params_shown
            .as_ref()
            .is_none_or(|s| s.conversation != id);
        if switched {
            if let Some(p) = &c.sampling {
                settings.sampling.clone_from(p);
            }
            if let Some(s) = &c.system_prompt {
                settings.system_prompt.clone_from(s);
            }
            self.params_shown = Some(ParamsShown {
                conversation: id,
                sampling: settings.sampling.clone(),
                system_prompt: settings.system_prompt.clone(),
            });
            return;
        }
        let Some(shown) = self.params_shown.as_mut() else {
            return;
        };
        if shown.sampling == settings.sampling && shown.system_prompt == settings.system_prompt {
            return;
        }
        shown.sampling.clone_from(&settings.sampling);
        shown.system_prompt.clone_from(&settings.system_prompt);
        let has_messages = !c.messages.is_empty();
        if let Some(c) = self.store.get_mut(&id) {
            c.sampling = Some(settings.sampling.clone());
            c.system_prompt = Some(settings.system_prompt.clone());
        }
        if has_messages {
            self.params_unsaved = Some((id, Instant::now()));
        }
    }

    /// The conversation to write now because its parameters changed [`PARAMS_SAVE_DELAY`] ago
    /// (`now` writes it whatever the delay: the app is closing).
    pub fn due_params_save(&mut self, now: bool) -> Option<String> {
        let (_, since) = self.params_unsaved.as_ref()?;
        if now || since.elapsed() >= PARAMS_SAVE_DELAY {
            return self.params_unsaved.take().map(|(id, _)| id);
        }
        None
    }

    /// When the next parameter save is due.
    pub fn next_params_save(&self) -> Option<Duration> {
        self.params_unsaved
            .as_ref()
            .map(|(_, since)| PARAMS_SAVE_DELAY.saturating_sub(since.elapsed()))
    }

    // ---- drawing -------------------------------------------------------------------------

    pub fn chat_ui(
        &mut self,
        ui: &mut egui::Ui,
        cx: &mut ChatUiContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        egui::Panel::left("chat_list")
            .resizable(true)
            .default_size(220.0)
            .size_range(160.0..=360.0)
            .show(ui, |ui| {
                let streaming = self.active.as_ref().map(|a| a.conversation.as_str());
                self.list.list_ui(
                    ui,
                    &self.store,
                    self.selected.as_deref(),
                    streaming,
                    commands,
                );
            });
        if cx.settings.show_parameters {
            egui::Panel::right("chat_parameters")
                .resizable(true)
                .default_size(300.0)
                .size_range(240.0..=460.0)
                .show(ui, |ui| {
                    self.params
                        .parameters_ui(ui, &mut self.presets, cx.settings, cx.model);
                });
        }
        egui::Panel::top("chat_header").show(ui, |ui| self.header_ui(ui, cx, commands));
        let blocked = reply_blocked(cx, self.active.is_some());
        egui::Panel::bottom("chat_input").show(ui, |ui| self.input_ui(ui, blocked, commands));
        egui::CentralPanel::default().show(ui, |ui| self.messages_ui(ui, blocked, commands));
    }

    fn header_ui(
        &mut self,
        ui: &mut egui::Ui,
        cx: &mut ChatUiContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        /// What the header needs, without cloning the conversation every frame.
        struct Summary {
            id: String,
            title: String,
            has_messages: bool,
            context_tokens: Option<usize>,
        }
        let current = self.current().map(|c| Summary {
            id: c.id.clone(),
            title: c.display_title().to_owned(),
            has_messages: !c.messages.is_empty(),
            context_tokens: c.context_tokens(),
        });
        ui.add_space(4.0);
        let mut copy = false;
        let mut rename = false;
        ui.horizontal(|ui| {
            let title = current.as_ref().map_or("New chat", |c| c.title.as_str());
            // Buttons first (from the right), then the title truncated to what is left.
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.toggle_value(&mut cx.settings.show_parameters, "Parameters")
                    .on_hover_text("Show or hide the sampling parameters");
                if let Some(c) = current.as_ref().filter(|c| c.has_messages) {
                    if ui
                        .button("Delete chat")
                        .on_hover_text("Delete this conversation (you can undo for a few seconds)")
                        .clicked()
                    {
                        commands.push(Command::from(ChatCommand::DeleteConversation(c.id.clone())));
                    }
                    ui.menu_button("Export", |ui| {
                        if ui
                            .button("Copy as Markdown")
                            .on_hover_text("Copy the conversation as shown to the clipboard")
                            .clicked()
                        {
                            copy = true;
                            ui.close();
                        }
                        if ui
                            .button("Save as Markdown…")
                            .on_hover_text("Write the conversation as shown to a .md file")
                            .clicked()
                        {
                            commands.push(Command::from(ChatCommand::ExportConversation {
                                id: c.id.clone(),
                                format: ExportFormat::Markdown,
                            }));
                            ui.close();
                        }
                        if ui
                            .button("Save as JSON…")
                            .on_hover_text(
                                "Write the conversation as shown to a .json file (title, \
                                 model, system prompt, messages)",
                            )
                            .clicked()
                        {
                            commands.push(Command::from(ChatCommand::ExportConversation {
                                id: c.id.clone(),
                                format: ExportFormat::Json,
                            }));
                            ui.close();
                        }
                    });
                    rename = ui
                        .button("Rename")
                        .on_hover_text("Rename this conversation")
                        .clicked();
                }
                ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| {
                    ui.add(egui::Label::new(RichText::new(title).heading()).truncate());
                });
            });
        });
        if copy && let Some(c) = self.current() {
            ui.ctx().copy_text(c.to_markdown());
        }
        if rename && let Some(c) = &current {
            self.start_rename(&c.id);
        }
        ui.horizontal_wrapped(|ui| match cx.model {
            Some(m) => {
                ui.label(weak(ui, "Model:"));
                ui.add(egui::Label::new(&m.name).extend());
                ui.label(weak(ui, "· Chat format:"));
                ui.add(egui::Label::new(&m.chat_format).extend())
                    .on_hover_text("How the conversation is turned into the model's prompt");
                ui.label(weak(ui, "·"));
                let used = current.as_ref().and_then(|c| c.context_tokens);
                let context = m.context_length;
                match used {
                    Some(used) => {
                        ui.add(
                            egui::Label::new(format!(
                                "Context {} / {} tokens",
                                format::thousands(used),
                                format::thousands(context)
                            ))
                            .extend(),
                        );
                        let fraction = used as f32 / context.max(1) as f32;
                        ui.add(
                            egui::ProgressBar::new(fraction.min(1.0))
                                .desired_width(80.0)
                                .desired_height(8.0),
                        )
                        .on_hover_text(
                            "Prompt and reply tokens of the last reply; when a conversation \
                             no longer fits, its oldest messages are left out",
                        );
                    }
                    None => {
                        ui.label(format!("Context {} tokens", format::thousands(context)));
                    }
                }
            }
            None if cx.model_loading => {
                ui.spinner();
                ui.label(weak(ui, "Loading the model…"));
            }
            None => {
                ui.label(weak(ui, "No model loaded."));
                if ui.link("Open the Models panel").clicked() {
                    commands.push(Command::ShowPanel(Panel::Models));
                }
            }
        });
        ui.add_space(2.0);
    }

    fn messages_ui(
        &mut self,
        ui: &mut egui::Ui,
        reply_blocked: Option<&'static str>,
        commands: &mut Vec<Command>,
    ) {
        let Some(id) = self.selected.clone() else {
            empty_chat_ui(ui);
            return;
        };
        let streaming_here = self.streaming_in(&id);
        let active_started = self.active.as_ref().and_then(|a| a.started).is_some();
        let Some(conversation) = self.store.get(&id) else {
            empty_chat_ui(ui);
            return;
        };
        let path = conversation.active_path();
        if path.is_empty() {
            empty_chat_ui(ui);
            return;
        }
        let mut action = None;
        egui::ScrollArea::vertical()
            .id_salt(("messages", &id))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(6.0);
                let count = path.len();
                for (index, message) in path.iter().enumerate() {
                    let editing = self
                        .editing
                        .as_mut()
                        .filter(|e| e.conversation == id && e.message == message.id);
                    // A reply that called tools shows its text before the calls; the calls
                    // follow in their own frame.
                    let calls = self.tool_calls.get(&id, message);
                    let content = calls
                        .as_deref()
                        .map_or(message.content.trim(), |(before, _)| before.trim());
                    let document = (message.role == Role::Assistant && !content.is_empty())
                        .then(|| self.markdown.get(&id, message.id, content));
                    let view = MessageView {
                        message,
                        text: content,
                        siblings: conversation.siblings(message.id).filter(|s| s.count > 1),
                        is_last: index + 1 == count,
                        can_edit: !streaming_here,
                        reply_blocked,
                        waiting: streaming_here && !active_started,
                        document: document.as_deref(),
                        id: ui.scope_id().with(("message", &id, message.id)),
                    };
                    match view.message_ui(ui, editing) {
                        MessageAction::None => {}
                        other => action = Some((message.id, message.content.clone(), other)),
                    }
                    if let Some((_, calls)) = calls.as_deref() {
                        let last = index + 1 == count && !streaming_here;
                        if let Some(results) =
                            tool_calls_ui(ui, calls, last, &mut self.tool_results)
                        {
                            commands.push(Command::from(ChatCommand::SendToolResults {
                                conversation: id.clone(),
                                message: message.id,
                                results,
                            }));
                        }
                    }
                    ui.add_space(6.0);
                }
            });
        let Some((message, content, action)) = action else {
            return;
        };
        let conversation = id;
        match action {
            MessageAction::None => {}
            MessageAction::StartEdit => {
                self.editing = Some(Editing {
                    conversation,
                    message,
                    text: content,
                });
            }
            MessageAction::SaveEdit(content) => {
                self.editing = None;
                commands.push(Command::from(ChatCommand::EditMessage {
                    conversation,
                    message,
                    content,
                }));
            }
            MessageAction::Resend(content) => {
                self.editing = None;
                commands.push(Command::from(ChatCommand::ResendEdit {
                    conversation,
                    message,
                    content,
                }));
            }
            MessageAction::CancelEdit => self.editing = None,
            MessageAction::Regenerate => commands.push(Command::from(ChatCommand::RegenerateReply {
                conversation,
                message,
            })),
            MessageAction::ShowBranch(message) => commands.push(Command::from(ChatCommand::ShowBranch {
                conversation,
                message,
            })),
        }
    }

    fn input_ui(
        &mut self,
        ui: &mut egui::Ui,
        blocked: Option<&'static str>,
        commands: &mut Vec<Command>,
    ) {
        ui.add_space(6.0);
        // Long messages scroll inside the box instead of pushing the conversation away.
        egui::ScrollArea::vertical()
            .id_salt("message_input")
            .max_height(180.0)
            .show(ui, |ui| {
                ui.add(
                    egui::TextEdit::multiline(&mut self.input)
                        .hint_text("Type a message. Ctrl+Enter sends.")
                        .desired_rows(3)
                        .desired_width(f32::INFINITY),
                )
                .accessible_name("Message");
            });
        ui.add_space(4.0);
        let busy = self.active.is_some();
        let empty = self.input.trim().is_empty();
        ui.horizontal(|ui| {
            let send_reason = blocked.or(empty.then_some("Type a message first"));
            let send = ui
                .add_enabled(send_reason.is_none(), egui::Button::new("Send"))
                .on_hover_text("Send the message (Ctrl+Enter)");
            let send = match send_reason {
                Some(reason) => send.on_disabled_hover_text(reason),
                None => send,
            };
            if send.clicked() {
                commands.push(Command::from(ChatCommand::SendMessage));
            }
            if busy
                && ui
                    .button("Stop")
                    .on_hover_text("Stop the reply and keep what was written (Esc)")
                    .clicked()
            {
                commands.push(Command::from(ChatCommand::StopReply));
            }
            let can_regenerate = blocked.is_none()
                && self
                    .current()
                    .is_some_and(|c| c.messages.iter().any(|m| m.role == Role::User));
            if ui
                .add_enabled(can_regenerate, egui::Button::new("Regenerate"))
                .on_hover_text(
                    "Write the last reply again; the current one is kept as another version",
                )
                .clicked()
            {
                commands.push(Command::from(ChatCommand::Regenerate));
            }
            if let Some(reason) = blocked {
                ui.label(weak(ui, reason));
            }
        });
        ui.add_space(4.0);
    }
}

/// Why no reply can be started now, if so.
fn reply_blocked(cx: &ChatUiContext<'_>, busy: bool) -> Option<&'static str> {
    if cx.model.is_none() && cx.model_loading {
        Some("Wait for the model to finish loading")
    } else if cx.model.is_none() {
        Some("Load a model in the Models panel to chat")
    } else if busy {
        Some("A reply is being written: wait for it or stop it")
    } else {
        None
    }
}

/// The tool calls of the open conversation's replies ([`Message::tool_calls`]), by message,
/// with the text they were read from: the frame reuses them while that text is unchanged.
#[derive(Default)]
struct ToolCallCache {
    conversation: String,
    entries: std::collections::HashMap<u64, CachedCalls>,
}

/// A reply's text and the calls read from it.
type CachedCalls = (String, Option<Arc<(String, CallList)>>);

impl ToolCallCache {
    fn get(&mut self, conversation: &str, message: &Message) -> Option<Arc<(String, CallList)>> {
        if self.conversation != conversation {
            conversation.clone_into(&mut self.conversation);
            self.entries.clear();
        }
        if message.is_streaming() {
            return None;
        }
        if let Some((source, calls)) = self.entries.get(&message.id)
            && *source == message.content
        {
            return calls.clone();
        }
        let calls = message.tool_calls().map(Arc::new);
        self.entries
            .insert(message.id, (message.content.clone(), calls.clone()));
        calls
    }
}

/// The accessible name of a tool call's result field: "Result of NAME".
pub fn tool_result_label(name: &str) -> String {
    format!("Result of {name}")
}

/// Shows a reply's tool `calls` (each function and its arguments); for the last reply
/// (`answerable`), a field for each call's result and *Send results*, which returns the
/// `(call id, result)` pairs when clicked.
fn tool_calls_ui(
    ui: &mut egui::Ui,
    calls: &[(String, String, String)],
    answerable: bool,
    typed: &mut std::collections::HashMap<String, String>,
) -> Option<Vec<(String, String)>> {
    let mut send = None;
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_width(ui.available_width());
        for (id, name, args) in calls {
            ui.horizontal_wrapped(|ui| {
                ui.label(RichText::new("Tool call").strong());
                ui.label(RichText::new(format!("{name}({args})")).monospace())
                    .on_hover_text(format!("Call id {id}"));
            });
            if answerable {
                let text = typed.entry(id.clone()).or_default();
                ui.add(
                    egui::TextEdit::singleline(text)
                        .hint_text("What the tool returned")
                        .desired_width(f32::INFINITY),
                )
                .accessible_name(tool_result_label(name));
            }
        }
        if answerable {
            let ready = calls
                .iter()
                .all(|(id, _, _)| typed.get(id).is_some_and(|t| !t.trim().is_empty()));
            if ui
                .add_enabled(ready, egui::Button::new("Send results"))
                .on_hover_text("Add the results to the conversation and let the model go on")
                .on_disabled_hover_text("Type each call's result first")
                .clicked()
            {
                send = Some(
                    calls
                        .iter()
                        .map(|(id, _, _)| (id.clone(), typed.remove(id).unwrap_or_default()))
                        .collect(),
                );
            }
        }
    });
    send
}
