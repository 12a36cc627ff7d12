//! What the Chat panel's commands do, and how the worker's reply events reach it: sending,
//! regenerating and editing turns (each reply a chat job on the worker), renaming, deleting
//! with undo, exporting. Everything here runs on the UI thread, at the end of a frame
//! (commands) or before drawing (events).

use std::path::Path;
use std::time::Duration;

use studio_inference::llm::chat::Role;
use studio_inference::worker::{Event, JobId, JobKind};

use super::command::{ChatCommand, ChatPurpose, ExportFormat};
use super::store::{ConversationStore, Message, MessageId, ReplyState, TRASH_GRACE};
use super::{ChatPanel, ChatUiContext};
use crate::gui::command::{Command, file_name_from};
use crate::gui::context::{AppContext, Handled};
use crate::gui::format;
use crate::gui::panel::{OpenContext, PanelView, UiContext};
use crate::gui::presets::Presets;
use crate::gui::settings_store::{Panel, Settings};
use crate::gui::shortcuts::SEND_SHORTCUT;

impl PanelView for ChatPanel {
    type Command = ChatCommand;
    type Purpose = ChatPurpose;

    /// Opens the saved conversations (the last one open, or the newest) and the presets.
    fn open(cx: &mut OpenContext<'_>) -> Self {
        let (store, errors) = ConversationStore::open(cx.home);
        for e in errors {
            cx.notices.error(e);
        }
        let presets = Presets::load(cx.presets_dir);
        ChatPanel::new(store, presets, cx.settings.last_conversation.clone())
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        let mut chat_cx = ChatUiContext {
            settings: cx.settings,
            model: cx.model,
            model_loading: cx.jobs.loading_model().is_some(),
        };
        self.chat_ui(ui, &mut chat_cx, cx.commands);
        if std::mem::take(&mut self.send_after_ui) {
            cx.commands.push(ChatCommand::SendMessage.into());
        }
    }

    fn apply(&mut self, command: ChatCommand, cx: &mut AppContext<'_>) {
        match command {
            ChatCommand::SendMessage => self.send_message(cx),
            ChatCommand::SendToolResults {
                conversation,
                message,
                results,
            } => self.send_tool_results(&conversation, message, results, cx),
            ChatCommand::StopReply => {
                if let Some(active) = self.active() {
                    cx.cancel(active.job);
                }
            }
            ChatCommand::Regenerate => self.regenerate(None, cx),
            ChatCommand::RegenerateReply {
                conversation,
                message,
            } => {
                self.select(&conversation);
                self.regenerate(Some(message), cx);
            }
            ChatCommand::ResendEdit {
                conversation,
                message,
                content,
            } => self.resend_edit(&conversation, message, &content, cx),
            ChatCommand::EditMessage {
                conversation,
                message,
                content,
            } => {
                if self.edit_message(&conversation, message, content) {
                    self.save_conversation(&conversation, cx);
                }
            }
            ChatCommand::ShowBranch {
                conversation,
                message,
            } => {
                if self.show_branch(&conversation, message)
                    && let Err(e) = self.store.save_in_place(&conversation)
                {
                    cx.notices.error(format!("{e:#}"));
                }
            }
            ChatCommand::NewConversation => {
                self.new_conversation();
                cx.settings.panel = Panel::Chat;
            }
            ChatCommand::SelectConversation(id) => self.select(&id),
            ChatCommand::RenameConversation { id, title } => self.rename(&id, title, cx),
            ChatCommand::DeleteConversation(id) => self.delete_conversation(&id, cx),
            ChatCommand::UndoDelete(id) => match self.store.restore(&id) {
                Ok(true) => {
                    cx.notices.dismiss_action(&Command::from(ChatCommand::UndoDelete(id.clone())));
                    self.select(&id);
                }
                Ok(false) => cx
                    .notices
                    .warning("The chat can no longer be restored: its undo time has passed"),
                Err(e) => cx.notices.error(format!("{e:#}")),
            },
            ChatCommand::ExportConversation { id, format } => self.export(&id, format, cx),
        }
    }

    /// An event of a reply job (`ChatPurpose::Reply`).
    fn on_event(
        &mut self,
        job: JobId,
        _purpose: &ChatPurpose,
        event: Event,
        cx: &mut AppContext<'_>,
    ) -> Handled {
        let finished = match event {
            Event::Started { .. } => {
                self.reply_started(job);
                None
            }
            Event::Text { text, tokens, .. } => {
                self.reply_text(job, &text, tokens);
                None
            }
            Event::PromptTokens { tokens, .. } => {
                self.reply_prompt_tokens(job, tokens);
                None
            }
            Event::ContextTrimmed {
                dropped_messages, ..
            } => {
                self.reply_trimmed(job, dropped_messages);
                None
            }
            Event::Done { stats, .. } => self.reply_finished(job, ReplyState::Done, stats, None),
            Event::Cancelled { stats, .. } => {
                self.reply_finished(job, ReplyState::Stopped, stats, None)
            }
            Event::Failed { error, .. } => {
                cx.notices.error(format!("The reply failed: {error}"));
                self.reply_finished(job, ReplyState::Failed, None, Some(error))
            }
            other => return Handled::No(other),
        };
        if let Some(id) = finished {
            self.save_conversation(&id, cx);
        }
        Handled::Yes
    }

    /// Keeps a streaming reply and changed parameters saved, and removes deleted chats whose
    /// undo time has passed.
    fn frame(&mut self, cx: &mut AppContext<'_>) {
        if let Some(id) = self.due_stream_save()
            && let Err(e) = self.store.save_in_place(&id)
        {
            cx.notices.error(format!("{e:#}"));
        }
        if let Some(id) = self.due_params_save(false)
            && let Err(e) = self.store.save_in_place(&id)
        {
            cx.notices.error(format!("{e:#}"));
        }
        for error in self.store.purge_trash(cx.undo_window + TRASH_GRACE) {
            cx.notices.error(error);
        }
        if self.active().is_some() {
            // Keep the live rate moving and the periodic save due even between events.
            cx.ctx.request_repaint_after(Duration::from_millis(500));
        }
    }

    /// The settings show the open conversation's parameters (a conversation just opened
    /// shows its own; edits belong to the conversation open while they were made), and
    /// remember which is open.
    fn settle(&mut self, settings: &mut Settings) {
        self.sync_params(settings);
        settings.last_conversation.clone_from(&self.selected);
    }

    /// Ctrl+Enter sends. It is consumed here so the message box never sees it (no stray
    /// newline), but sent only after this frame's UI has run: text typed in the same frame
    /// (a slow frame, a fast typist) must reach the message box first.
    fn shortcuts(&mut self, cx: &mut AppContext<'_>) {
        if cx.ctx.input_mut(|i| i.consume_shortcut(&SEND_SHORTCUT)) {
            self.send_after_ui = true;
        }
    }

    fn autosave(&mut self, cx: &mut AppContext<'_>) -> Option<Duration> {
        let purge = self.store.next_purge(cx.undo_window + TRASH_GRACE);
        match (self.next_params_save(), purge) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Saves a streaming reply and changed parameters.
    fn flush(&mut self, _cx: &mut AppContext<'_>) {
        if let Some(active) = self.active()
            && let Err(e) = self.store.save_in_place(&active.conversation.clone())
        {
            log::error!("{e:#}");
        }
        if let Some(id) = self.due_params_save(true)
            && let Err(e) = self.store.save_in_place(&id)
        {
            log::error!("{e:#}");
        }
    }

    /// Chats deleted in this session are removed for good (their Undo ends with the window).
    fn close(&mut self, _cx: &mut AppContext<'_>) {
        for error in self.store.purge_trash(Duration::ZERO) {
            log::error!("{error}");
        }
    }
}

impl ChatPanel {
    /// Saves conversation `id` (a failure becomes a notice).
    pub(crate) fn save_conversation(&mut self, id: &str, cx: &mut AppContext<'_>) {
        if let Err(e) = self.store.save(id) {
            cx.notices.error(format!("{e:#}"));
        }
    }

    /// Why a reply cannot start now (and says so in a notice), or `None` when it can.
    fn reply_refused(&mut self, cx: &mut AppContext<'_>) -> bool {
        if cx.model.is_none() {
            cx.notices
                .warning("Load a model in the Models panel before sending a message");
            return true;
        }
        if self.active().is_some() {
            cx.notices
                .warning("A reply is being written: wait for it or stop it first");
            return true;
        }
        false
    }

    fn send_message(&mut self, cx: &mut AppContext<'_>) {
        if self.input.trim().is_empty() || self.reply_refused(cx) {
            return;
        }
        let Some((id, message)) = self.take_input() else {
            return;
        };
        self.start_reply(&id, message, cx);
    }

    /// Writes `reply` (or the last reply of the open conversation) again as a new version.
    fn regenerate(&mut self, reply: Option<MessageId>, cx: &mut AppContext<'_>) {
        if cx.model.is_none() || self.active().is_some() {
            return;
        }
        let Some(id) = self.selected.clone() else {
            return;
        };
        let target = match reply {
            Some(reply) => self.regenerate_target(&id, reply),
            None => self.last_reply_target(&id),
        };
        match target {
            Some(parent) => self.start_reply(&id, parent, cx),
            None => self.save_conversation(&id, cx),
        }
    }

    /// Adds each tool result after reply `message` (a chain of tool messages) and asks for
    /// the next reply.
    fn send_tool_results(
        &mut self,
        id: &str,
        message: MessageId,
        results: Vec<(String, String)>,
        cx: &mut AppContext<'_>,
    ) {
        if self.reply_refused(cx) || results.is_empty() {
            return;
        }
        self.select(id);
        let Some(c) = self.store.get_mut(id) else {
            return;
        };
        let mut parent = message;
        for (call, content) in results {
            let tool = Message {
                role: Role::Tool,
                tool_call_id: Some(call),
                ..Message::user(content)
            };
            parent = c.push(Some(parent), tool);
        }
        self.start_reply(id, parent, cx);
    }

    fn resend_edit(
        &mut self,
        id: &str,
        message: MessageId,
        content: &str,
        cx: &mut AppContext<'_>,
    ) {
        if self.reply_refused(cx) {
            return;
        }
        self.select(id);
        if let Some(edited) = self.branch_edit(id, message, content) {
            self.start_reply(id, edited, cx);
        }
    }

    /// Adds an empty reply after `parent` in conversation `id` (the shown branch from now on),
    /// records the parameters with the conversation, saves, and submits the chat job with the
    /// path up to `parent`.
    fn start_reply(&mut self, id: &str, parent: MessageId, cx: &mut AppContext<'_>) {
        let Some(model) = cx.model.as_ref().map(|m| m.name.clone()) else {
            return;
        };
        let Some(c) = self.store.get_mut(id) else {
            return;
        };
        // The open conversation's parameters are the ones shown; others keep their own.
        let sampling = c
            .sampling
            .get_or_insert_with(|| cx.settings.sampling.clone())
            .clone();
        let system = c
            .system_prompt
            .get_or_insert_with(|| cx.settings.system_prompt.clone())
            .clone();
        let messages = c.turns_to(parent);
        let mut params = sampling;
        if cx.settings.new_seed_each_reply {
            params.seed = format::random_seed();
        }
        let Some(reply) = self.add_reply(id, parent, &model, params.seed) else {
            return;
        };
        let kind = JobKind::Chat {
            system,
            messages,
            params,
        };
        let purpose = ChatPurpose::Reply {
            conversation: id.to_owned(),
            message: reply,
        };
        match cx.submit(kind, purpose.into()) {
            Some(job) => self.begin_reply(job, id.to_owned(), reply),
            None => self.finish_message(
                id,
                reply,
                ReplyState::Failed,
                None,
                Some("the job could not be started".to_owned()),
            ),
        }
        self.save_conversation(id, cx);
    }

    fn rename(&mut self, id: &str, title: String, cx: &mut AppContext<'_>) {
        let Some(c) = self.store.get_mut(id) else {
            return;
        };
        if c.title == title {
            return;
        }
        c.title = title;
        // A chat with no message yet is written with its first one.
        if !c.messages.is_empty()
            && let Err(e) = self.store.save_in_place(id)
        {
            cx.notices.error(format!("{e:#}"));
        }
    }

    fn delete_conversation(&mut self, id: &str, cx: &mut AppContext<'_>) {
        if let Some(job) = self.abandon_reply(id) {
            cx.cancel(job);
            // The trash keeps the reply as far as it got.
            if let Err(e) = self.store.save_in_place(id) {
                cx.notices.error(format!("{e:#}"));
            }
        }
        let title = self
            .store
            .get(id)
            .map(|c| c.display_title().to_owned())
            .unwrap_or_default();
        match self.store.trash(id) {
            Ok(true) => {
                cx.notices.undoable(
                    format!("Deleted \"{title}\""),
                    "Undo",
                    Command::from(ChatCommand::UndoDelete(id.to_owned())),
                    cx.undo_window,
                );
            }
            Ok(false) => {}
            Err(e) => cx
                .notices
                .error(format!("Could not delete the chat: {e:#}")),
        }
        if self.selected.as_deref() == Some(id) {
            self.selected = self.store.list().first().map(|c| c.id.clone());
        }
    }

    fn export(&mut self, id: &str, format: ExportFormat, cx: &mut AppContext<'_>) {
        let Some(c) = self.store.get(id) else {
            return;
        };
        let name = format!(
            "{}.{}",
            file_name_from(c.display_title()),
            format.extension()
        );
        let (filter, extensions): (&str, &[&str]) = match format {
            ExportFormat::Markdown => ("Markdown", &["md"]),
            ExportFormat::Json => ("JSON", &["json"]),
        };
        // Headless (tests, no desktop portal) the dialog returns None.
        let Some(path) = rfd::FileDialog::new()
            .set_title("Export the conversation")
            .set_file_name(&name)
            .add_filter(filter, extensions)
            .save_file()
        else {
            return;
        };
        self.export_to(id, format, &path, cx);
    }

    /// Writes conversation `id` as shown (its active path) to `path`; says how it went in a
    /// notice. Returns whether it was written.
    pub fn export_to(
        &mut self,
        id: &str,
        format: ExportFormat,
        path: &Path,
        cx: &mut AppContext<'_>,
    ) -> bool {
        let Some(c) = self.store.get(id) else {
            return false;
        };
        let text = match format {
            ExportFormat::Markdown => c.to_markdown(),
            ExportFormat::Json => c.to_json_export(),
        };
        match crate::home::atomic_write(path, text.as_bytes()) {
            Ok(()) => {
                cx.notices.info(format!("Exported to {}", path.display()));
                true
            }
            Err(e) => {
                cx.notices.error(format!("Export failed: {e:#}"));
                false
            }
        }
    }
}
