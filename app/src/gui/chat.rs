//! The Chat panel: conversations on the left, the open conversation in the middle with the
//! message box under it, and the sampling parameters on the right.

use std::time::{Duration, Instant};

use egui::{Color32, RichText};
use studio_inference::chat::Role;
use studio_inference::generate::GenerationStats;
use studio_inference::loader::ModelInfo;
use studio_inference::sampling::SamplingParams;
use studio_inference::worker::JobId;

use super::command::Command;
use super::conversations::{
    Conversation, ConversationStore, Message, ReplyInfo, ReplyState, now_ms, title_from,
};
use super::format;
use super::presets::Presets;
use super::settings_store::{Panel, Settings};
use super::style::weak;

/// How often a streaming reply is written to disk.
pub const STREAM_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// The reply being written now.
#[derive(Debug)]
pub struct ActiveReply {
    pub job: JobId,
    pub conversation: String,
    pub index: usize,
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

struct Editing {
    conversation: String,
    index: usize,
    text: String,
}

/// What the chat panel reads from the rest of the app while drawing.
pub struct ChatUiContext<'a> {
    pub settings: &'a mut Settings,
    pub model: Option<&'a ModelInfo>,
    /// A model load is queued or running.
    pub model_loading: bool,
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
    confirm_delete: bool,
    /// The stop-strings field as typed (one per line, `\n` for a line break).
    stop_text: String,
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
            confirm_delete: false,
            stop_text: String::new(),
        }
    }

    pub fn presets(&self) -> &Presets {
        &self.presets
    }

    pub fn active(&self) -> Option<&ActiveReply> {
        self.active.as_ref()
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
            self.confirm_delete = false;
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

    /// Moves the typed message into the open conversation (creating one if needed) and returns
    /// that conversation's id; `None` when there is nothing to send.
    pub fn take_input(&mut self) -> Option<String> {
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
        c.messages.push(Message::user(text));
        Some(id)
    }

    /// Drops the conversation's last reply (for Regenerate). Returns whether it can reply now:
    /// the conversation ends with a user message.
    pub fn drop_last_reply(&mut self, id: &str) -> bool {
        let Some(c) = self.store.get_mut(id) else {
            return false;
        };
        if c.messages.last().is_some_and(|m| m.role == Role::Assistant) {
            c.messages.pop();
        }
        c.messages.last().is_some_and(|m| m.role == Role::User)
    }

    /// Appends an empty reply to be streamed into; returns its index.
    pub fn add_reply(&mut self, id: &str, model: &str, seed: u64) -> Option<usize> {
        let c = self.store.get_mut(id)?;
        c.messages.push(Message {
            role: Role::Assistant,
            content: String::new(),
            reply: Some(ReplyInfo {
                model: Some(model.to_owned()),
                seed: Some(seed),
                ..ReplyInfo::default()
            }),
        });
        Some(c.messages.len() - 1)
    }

    pub fn begin_reply(&mut self, job: JobId, conversation: String, index: usize) {
        self.active = Some(ActiveReply {
            job,
            conversation,
            index,
            started: None,
            first_token: None,
            tokens: 0,
            last_saved: Instant::now(),
            dirty: false,
        });
    }

    fn reply_mut(&mut self, id: &str, index: usize) -> Option<&mut Message> {
        self.store.get_mut(id)?.messages.get_mut(index)
    }

    /// The active reply for `job`, with its message.
    fn active_for(&mut self, job: JobId) -> Option<(&mut ActiveReply, Option<&mut Message>)> {
        let active = self.active.as_mut().filter(|a| a.job == job)?;
        let message = self
            .store
            .get_mut(&active.conversation)
            .and_then(|c| c.messages.get_mut(active.index));
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
        self.finish_message(&active.conversation, active.index, state, stats, error);
        Some(active.conversation)
    }

    /// Marks a reply as ended (also for replies whose job could not even be submitted).
    pub fn finish_message(
        &mut self,
        id: &str,
        index: usize,
        state: ReplyState,
        stats: Option<GenerationStats>,
        error: Option<String>,
    ) {
        if let Some(m) = self.reply_mut(id, index) {
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

    pub fn edit_message(&mut self, id: &str, index: usize, content: String) -> bool {
        match self.reply_mut(id, index) {
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
            .show(ui, |ui| self.conversation_list_ui(ui, commands));
        if cx.settings.show_parameters {
            egui::Panel::right("chat_parameters")
                .resizable(true)
                .default_size(300.0)
                .size_range(240.0..=460.0)
                .show(ui, |ui| self.parameters_ui(ui, cx.settings, cx.model));
        }
        egui::Panel::top("chat_header").show(ui, |ui| self.header_ui(ui, cx, commands));
        egui::Panel::bottom("chat_input").show(ui, |ui| self.input_ui(ui, cx, commands));
        egui::CentralPanel::default().show(ui, |ui| self.messages_ui(ui, commands));
    }

    fn conversation_list_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        ui.add_space(4.0);
        if ui
            .add_sized([ui.available_width(), 28.0], egui::Button::new("New chat"))
            .on_hover_text("Start a new conversation")
            .clicked()
        {
            commands.push(Command::NewConversation);
        }
        ui.add_space(4.0);
        ui.separator();
        let now = now_ms();
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if self.store.list().is_empty() {
                    ui.label(weak(ui, "No conversations yet."));
                }
                for c in self.store.list() {
                    let selected = self.selected.as_deref() == Some(c.id.as_str());
                    let mut title = c.display_title().to_owned();
                    if self.streaming_in(&c.id) {
                        title.push_str(" (writing…)");
                    }
                    let button = egui::Button::selectable(selected, title)
                        .min_size(egui::vec2(ui.available_width(), 0.0))
                        .truncate();
                    let response = ui.add(button).on_hover_text(format!(
                        "{} messages · updated {}",
                        c.messages.len(),
                        format::ago(c.updated_ms, now)
                    ));
                    if response.clicked() && !selected {
                        commands.push(Command::SelectConversation(c.id.clone()));
                    }
                }
            });
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
            messages: usize,
            context_tokens: Option<usize>,
        }
        let current = self.current().map(|c| Summary {
            id: c.id.clone(),
            title: c.display_title().to_owned(),
            messages: c.messages.len(),
            context_tokens: c.context_tokens(),
        });
        ui.add_space(4.0);
        let mut copy = false;
        ui.horizontal(|ui| {
            let title = current.as_ref().map_or("New chat", |c| c.title.as_str());
            // Buttons first (from the right), then the title truncated to what is left.
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.toggle_value(&mut cx.settings.show_parameters, "Parameters")
                    .on_hover_text("Show or hide the sampling parameters");
                if current.as_ref().is_some_and(|c| c.messages > 0) {
                    if ui
                        .button("Delete chat")
                        .on_hover_text("Delete this conversation and its file")
                        .clicked()
                    {
                        self.confirm_delete = true;
                    }
                    copy = ui
                        .button("Copy as Markdown")
                        .on_hover_text("Copy the whole conversation to the clipboard")
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
        if self.confirm_delete
            && let Some(c) = &current
        {
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(format!(
                        "Delete \"{}\" and its {} messages? This cannot be undone.",
                        c.title, c.messages
                    ))
                    .color(ui.visuals().warn_fg_color),
                );
                if ui.button("Delete").clicked() {
                    commands.push(Command::DeleteConversation(c.id.clone()));
                    self.confirm_delete = false;
                }
                if ui.button("Keep").clicked() {
                    self.confirm_delete = false;
                }
            });
        }
        ui.horizontal_wrapped(|ui| match cx.model {
            Some(m) => {
                ui.label(weak(ui, "Model:"));
                ui.add(egui::Label::new(&m.name).extend());
                ui.label(weak(ui, "· Chat format:"));
                ui.add(egui::Label::new(&m.chat_format).extend());
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

    fn messages_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
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
        if conversation.messages.is_empty() {
            empty_chat_ui(ui);
            return;
        }
        let mut edit_started = None;
        let mut edit_done = None;
        egui::ScrollArea::vertical()
            .id_salt(("messages", &id))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(6.0);
                let count = conversation.messages.len();
                for (index, message) in conversation.messages.iter().enumerate() {
                    let editing = self
                        .editing
                        .as_mut()
                        .filter(|e| e.conversation == id && e.index == index);
                    let view = MessageView {
                        message,
                        is_last: index + 1 == count,
                        can_edit: !streaming_here,
                        waiting: streaming_here && !active_started,
                    };
                    match view.message_ui(ui, editing) {
                        MessageAction::None => {}
                        MessageAction::StartEdit => edit_started = Some(index),
                        MessageAction::SaveEdit(text) => edit_done = Some(Some((index, text))),
                        MessageAction::DiscardEdit => edit_done = Some(None),
                    }
                    ui.add_space(6.0);
                }
            });
        if let Some(index) = edit_started {
            let text = conversation.messages[index].content.clone();
            self.editing = Some(Editing {
                conversation: id.clone(),
                index,
                text,
            });
        }
        if let Some(done) = edit_done {
            self.editing = None;
            if let Some((index, content)) = done {
                commands.push(Command::EditMessage {
                    conversation: id,
                    index,
                    content,
                });
            }
        }
    }

    fn input_ui(&mut self, ui: &mut egui::Ui, cx: &ChatUiContext<'_>, commands: &mut Vec<Command>) {
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
        let blocked = if cx.model.is_none() && cx.model_loading {
            Some("Wait for the model to finish loading")
        } else if cx.model.is_none() {
            Some("Load a model in the Models panel to chat")
        } else if busy {
            Some("A reply is being written: wait for it or stop it")
        } else {
            None
        };
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
                commands.push(Command::SendMessage);
            }
            if busy
                && ui
                    .button("Stop")
                    .on_hover_text("Stop the reply and keep what was written (Esc)")
                    .clicked()
            {
                commands.push(Command::StopReply);
            }
            let can_regenerate = blocked.is_none()
                && self
                    .current()
                    .is_some_and(|c| c.messages.iter().any(|m| m.role == Role::User));
            if ui
                .add_enabled(can_regenerate, egui::Button::new("Regenerate"))
                .on_hover_text("Write the last reply again")
                .clicked()
            {
                commands.push(Command::Regenerate);
            }
            if let Some(reason) = blocked {
                ui.label(weak(ui, reason));
            }
        });
        ui.add_space(4.0);
    }

    fn parameters_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        model: Option<&ModelInfo>,
    ) {
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(4.0);
                ui.heading("Parameters");
                ui.add_space(4.0);
                self.preset_ui(ui, &mut settings.sampling);
                ui.add_space(6.0);
                egui::CollapsingHeader::new("System prompt")
                    .default_open(true)
                    .show(ui, |ui| {
                        ui.label(weak(ui, "Sent before the conversation, with every reply."));
                        ui.add(
                            egui::TextEdit::multiline(&mut settings.system_prompt)
                                .hint_text("e.g. You are a concise, friendly assistant.")
                                .desired_rows(3)
                                .desired_width(f32::INFINITY),
                        )
                        .accessible_name("System prompt");
                    });
                egui::CollapsingHeader::new("Sampling")
                    .default_open(true)
                    .show(ui, |ui| {
                        sampling_grid_ui(ui, settings, model);
                    });
                egui::CollapsingHeader::new("Stop strings")
                    .default_open(false)
                    .show(ui, |ui| self.stop_strings_ui(ui, &mut settings.sampling));
                ui.add_space(6.0);
                if ui
                    .button("Reset to defaults")
                    .on_hover_text("Default sampling parameters (the system prompt is kept)")
                    .clicked()
                {
                    let defaults = Settings::default();
                    settings.sampling = defaults.sampling;
                    settings.new_seed_each_reply = defaults.new_seed_each_reply;
                }
            });
    }

    fn preset_ui(&mut self, ui: &mut egui::Ui, params: &mut SamplingParams) {
        let current = self.presets.list.iter().find(|p| p.matches(params));
        let selected_text = current.map_or("Custom", |p| p.name.as_str());
        let description = current.map(|p| p.description.clone());
        let mut chosen = None;
        ui.horizontal(|ui| {
            let label = ui.label("Preset");
            egui::ComboBox::from_id_salt("sampling_preset")
                .selected_text(selected_text)
                .width(160.0)
                .show_ui(ui, |ui| {
                    for (i, p) in self.presets.list.iter().enumerate() {
                        let is_current = current.is_some_and(|c| c.name == p.name);
                        if ui
                            .selectable_label(is_current, &p.name)
                            .on_hover_text(&p.description)
                            .clicked()
                        {
                            chosen = Some(i);
                        }
                    }
                })
                .response
                .labelled_by(label.id);
        });
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            ui.add(egui::Label::new(weak(ui, &d)).wrap());
        }
        if let Some(preset) = chosen.and_then(|i| self.presets.list.get(i)) {
            match preset.apply(params) {
                Ok(p) => *params = p,
                Err(e) => self.presets.errors.push(e),
            }
        }
        match &self.presets.dir {
            None => {
                ui.add(
                    egui::Label::new(weak(
                        ui,
                        "No presets folder found: set STUDIO_PRESETS to a folder with \
                         sampling/*.json files.",
                    ))
                    .wrap(),
                );
            }
            Some(dir) if self.presets.list.is_empty() && self.presets.errors.is_empty() => {
                ui.add(
                    egui::Label::new(weak(
                        ui,
                        &format!("No presets in {}", dir.join("sampling").display()),
                    ))
                    .wrap(),
                );
            }
            Some(_) => {}
        }
        for e in &self.presets.errors {
            ui.add(
                egui::Label::new(RichText::new(e).small().color(ui.visuals().warn_fg_color)).wrap(),
            );
        }
    }

    fn stop_strings_ui(&mut self, ui: &mut egui::Ui, params: &mut SamplingParams) {
        if parse_stop_strings(&self.stop_text) != params.stop {
            self.stop_text = params
                .stop
                .iter()
                .map(|s| s.replace('\n', "\\n"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let label = ui.label(weak(
            ui,
            "One per line; \\n stands for a line break. The reply ends before any of them.",
        ));
        let response = ui.add(
            egui::TextEdit::multiline(&mut self.stop_text)
                .hint_text("e.g. ###")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        let response = response.labelled_by(label.id);
        if response.changed() {
            params.stop = parse_stop_strings(&self.stop_text);
        }
    }
}

fn parse_stop_strings(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace("\\n", "\n"))
        .collect()
}

fn sampling_grid_ui(ui: &mut egui::Ui, settings: &mut Settings, model: Option<&ModelInfo>) {
    let p = &mut settings.sampling;
    egui::Grid::new("sampling_grid")
        .num_columns(2)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            let l = ui.label("Temperature");
            ui.add(egui::Slider::new(&mut p.temperature, 0.0..=2.0).step_by(0.05))
                .labelled_by(l.id)
                .on_hover_text("Higher is more varied; 0 always takes the most likely token");
            ui.end_row();

            let l = ui.label("Top-k");
            ui.add(egui::DragValue::new(&mut p.top_k).range(0..=1000))
                .labelled_by(l.id)
                .on_hover_text("Keep the k most likely tokens; 0 turns it off");
            ui.end_row();

            let l = ui.label("Top-p");
            ui.add(egui::Slider::new(&mut p.top_p, 0.01..=1.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text(
                    "Keep the most likely tokens up to this total probability; 1 turns it off",
                );
            ui.end_row();

            let l = ui.label("Min-p");
            ui.add(egui::Slider::new(&mut p.min_p, 0.0..=1.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text(
                    "Drop tokens less likely than this fraction of the best one; 0 turns it off",
                );
            ui.end_row();

            let l = ui.label("Repeat penalty");
            ui.add(egui::Slider::new(&mut p.repeat_penalty, 0.5..=2.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text("Discourage tokens used recently; 1 turns it off");
            ui.end_row();

            let l = ui.label("Repeat window");
            ui.add(
                egui::DragValue::new(&mut p.repeat_last_n)
                    .range(0..=8192)
                    .suffix(" tokens"),
            )
            .labelled_by(l.id)
            .on_hover_text("How many recent tokens the repeat penalty looks at");
            ui.end_row();

            let l = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add_enabled(
                    !settings.new_seed_each_reply,
                    egui::DragValue::new(&mut p.seed).speed(1.0),
                )
                .labelled_by(l.id)
                .on_hover_text("Same seed, settings and conversation: same reply");
                if ui
                    .button("Random")
                    .on_hover_text("Pick a new random seed")
                    .clicked()
                {
                    p.seed = format::random_seed();
                }
            });
            ui.end_row();

            ui.label("");
            ui.checkbox(&mut settings.new_seed_each_reply, "New seed each reply")
                .on_hover_text(
                    "Draw a fresh seed for every reply (shown under the reply), so Regenerate \
                     gives a different answer",
                );
            ui.end_row();

            let l = ui.label("Max new tokens");
            let max = model.map_or(32_768, |m| m.context_length.max(1));
            ui.add(egui::DragValue::new(&mut p.max_new_tokens).range(1..=max))
                .labelled_by(l.id)
                .on_hover_text("The longest reply, in tokens");
            ui.end_row();
        });
}

fn empty_chat_ui(ui: &mut egui::Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(ui.available_height() * 0.35);
        ui.label(weak(
            ui,
            "Send a message to start a conversation. Ctrl+Enter sends, Esc stops a reply.",
        ));
    });
}

enum MessageAction {
    None,
    StartEdit,
    SaveEdit(String),
    DiscardEdit,
}

struct MessageView<'a> {
    message: &'a Message,
    is_last: bool,
    can_edit: bool,
    /// The reply's job has not started yet (queued behind another job).
    waiting: bool,
}

impl MessageView<'_> {
    fn message_ui(&self, ui: &mut egui::Ui, editing: Option<&mut Editing>) -> MessageAction {
        let m = self.message;
        let visuals = ui.visuals().clone();
        let fill = match m.role {
            Role::User => visuals.faint_bg_color,
            Role::Assistant => visuals.extreme_bg_color,
        };
        let mut action = MessageAction::None;
        egui::Frame::new()
            .fill(fill)
            .stroke(visuals.widgets.noninteractive.bg_stroke)
            .corner_radius(6.0)
            .inner_margin(egui::Margin::symmetric(10, 8))
            .show(ui, |ui| {
                ui.set_width(ui.available_width());
                self.author_ui(ui);
                if let Some(r) = &m.reply
                    && r.dropped_messages > 0
                {
                    let n = r.dropped_messages;
                    let text = if n == 1 {
                        "1 oldest message was left out to fit the context".to_owned()
                    } else {
                        format!("{n} oldest messages were left out to fit the context")
                    };
                    ui.label(RichText::new(text).small().color(visuals.warn_fg_color));
                }
                if let Some(editing) = editing {
                    action = edit_ui(ui, editing);
                    return;
                }
                let content = m.content.trim();
                if m.is_streaming() && content.is_empty() {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        let what = if self.waiting {
                            "Waiting for the model…"
                        } else {
                            "Thinking…"
                        };
                        ui.label(weak(ui, what));
                    });
                } else if !content.is_empty() {
                    ui.add(egui::Label::new(content).wrap().selectable(true));
                }
                if m.is_streaming() && !content.is_empty() {
                    ui.spinner();
                }
                if let Some(r) = &m.reply {
                    reply_footer_ui(ui, r);
                }
                if !m.is_streaming() {
                    ui.horizontal(|ui| {
                        if !content.is_empty()
                            && ui
                                .small_button("Copy")
                                .on_hover_text("Copy this message")
                                .clicked()
                        {
                            ui.ctx().copy_text(content.to_owned());
                        }
                        if self.can_edit
                            && ui
                                .small_button("Edit")
                                .on_hover_text(if self.is_last {
                                    "Edit this message"
                                } else {
                                    "Edit this message (later replies are kept as they are)"
                                })
                                .clicked()
                        {
                            action = MessageAction::StartEdit;
                        }
                    });
                }
            });
        action
    }

    fn author_ui(&self, ui: &mut egui::Ui) {
        let m = self.message;
        ui.horizontal(|ui| {
            match m.role {
                Role::User => ui.label(RichText::new("You").strong()),
                Role::Assistant => ui.label(RichText::new("Assistant").strong()),
            };
            if let Some(model) = m.reply.as_ref().and_then(|r| r.model.as_deref()) {
                ui.label(weak(ui, model).small());
            }
        });
    }
}

fn edit_ui(ui: &mut egui::Ui, editing: &mut Editing) -> MessageAction {
    let response = ui.add(
        egui::TextEdit::multiline(&mut editing.text)
            .desired_rows(3)
            .desired_width(f32::INFINITY),
    );
    response.accessible_name("Edit message");
    let mut action = MessageAction::None;
    ui.horizontal(|ui| {
        if ui.button("Save").clicked() {
            action = MessageAction::SaveEdit(editing.text.clone());
        }
        if ui.button("Discard").clicked() {
            action = MessageAction::DiscardEdit;
        }
    });
    action
}

fn reply_footer_ui(ui: &mut egui::Ui, r: &ReplyInfo) {
    let visuals = ui.visuals().clone();
    let mut parts: Vec<String> = Vec::new();
    if let Some(s) = &r.stats {
        if s.generated_tokens > 1 {
            parts.push(format!("{:.1} tok/s", s.decode_tok_s));
        }
        if s.generated_tokens > 0 {
            parts.push(format!("{:.0} ms to first token", s.ttft_ms));
        }
        parts.push(format!("{} tokens", format::thousands(s.generated_tokens)));
    }
    if let Some(seed) = r.seed
        && r.state != ReplyState::Streaming
    {
        parts.push(format!("seed {seed}"));
    }
    let (marker, color): (Option<String>, Color32) = match r.state {
        ReplyState::Streaming | ReplyState::Done => (
            r.finish_note().map(|n| format!("Ended: {n}")),
            visuals.warn_fg_color,
        ),
        ReplyState::Stopped => (Some("Stopped".to_owned()), visuals.warn_fg_color),
        ReplyState::Interrupted => (
            Some("Interrupted: Studio closed while this reply was being written".to_owned()),
            visuals.warn_fg_color,
        ),
        ReplyState::Failed => (
            Some(format!(
                "Failed: {}",
                r.error.as_deref().unwrap_or("unknown error")
            )),
            visuals.error_fg_color,
        ),
    };
    if marker.is_none() && parts.is_empty() {
        return;
    }
    ui.add_space(2.0);
    ui.horizontal_wrapped(|ui| {
        if let Some(marker) = marker {
            ui.label(RichText::new(marker).color(color));
        }
        if !parts.is_empty() {
            ui.label(RichText::new(parts.join(" · ")).color(visuals.weak_text_color()));
        }
    });
}
