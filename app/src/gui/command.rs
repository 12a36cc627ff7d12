//! Everything the user can ask for, as data: widgets push [`Command`]s while the frame is
//! drawn, and [`StudioApp::apply_commands`] carries them out in one place afterwards.

use std::path::{Path, PathBuf};

use studio_inference::llm::remote::RemoteConfig;
use studio_inference::worker::{JobKind, LoadOptions};

use super::api_server::ApiServer;
use super::app::StudioApp;
use super::canvas::CanvasCommand;
use super::chat::store::{MessageId, ReplyState};
use super::code::CodeCommand;
use super::explorer::ExplorerCommand;
use super::format;
use super::jobs::JobPurpose;
use super::settings_store::Panel;

/// What a conversation is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Markdown,
    Json,
}

impl ExportFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Markdown => "md",
            ExportFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowPanel(Panel),
    /// Load a model folder or file (replacing the loaded one), with the load options from
    /// the settings.
    LoadModel(PathBuf),
    UnloadModel,
    /// Chat through an OpenAI-compatible server (replaces the loaded model).
    ConnectRemote(RemoteConfig),
    /// Start the OpenAI-compatible API server on the loaded model, as the settings say.
    StartApiServer,
    StopApiServer,
    /// Cancel whatever the worker is running now (status bar's Cancel, Esc).
    CancelRunningJob,
    /// Send the typed message and ask for a reply.
    SendMessage,
    /// Stop the reply being written; its text so far is kept.
    StopReply,
    /// Write the open conversation's last reply again, as a new version (or reply to its last
    /// message if that is the user's).
    Regenerate,
    /// Write reply `message` again, as a new version of it.
    RegenerateReply {
        conversation: String,
        message: MessageId,
    },
    /// Send `content` as a new version of user message `message`, and reply to it.
    ResendEdit {
        conversation: String,
        message: MessageId,
        content: String,
    },
    /// Change a message's text in place.
    EditMessage {
        conversation: String,
        message: MessageId,
        content: String,
    },
    /// Show the branch through `message` (the `<` `>` arrows).
    ShowBranch {
        conversation: String,
        message: MessageId,
    },
    NewConversation,
    SelectConversation(String),
    RenameConversation {
        id: String,
        title: String,
    },
    /// Delete a conversation, with a notice that can undo it for a few seconds.
    DeleteConversation(String),
    UndoDelete(String),
    /// Save the conversation as shown to a file the user picks.
    ExportConversation {
        id: String,
        format: ExportFormat,
    },
    RemoveRecentModel(PathBuf),
    RescanHfCache,
    /// Something the Canvas asks for.
    Canvas(CanvasCommand),
    /// Something the Latent Explorer asks for.
    Explorer(ExplorerCommand),
    /// Something the Code panel asks for.
    Code(CodeCommand),
}

impl StudioApp {
    /// Carries out the queued commands, in order.
    pub fn apply_commands(&mut self) {
        while !self.commands.is_empty() {
            let command = self.commands.remove(0);
            self.apply(command);
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::ShowPanel(panel) => self.settings.panel = panel,
            Command::LoadModel(path) => self.load_model(path),
            Command::UnloadModel => {
                self.submit(JobKind::UnloadModel, JobPurpose::UnloadModel);
            }
            Command::ConnectRemote(config) => {
                let url = config.base_url.clone();
                self.submit(
                    JobKind::ConnectRemote { config },
                    JobPurpose::ConnectRemote(url),
                );
            }
            Command::StartApiServer => {
                if let Some(worker) = &self.worker {
                    let options = ApiServer::options(&self.settings.server);
                    let kind = self.api_server.start_job(worker.submitter(), options);
                    self.submit(kind, JobPurpose::StartApiServer);
                }
            }
            Command::StopApiServer => {
                if self.api_server.stop() {
                    self.notices.info("The API server stopped");
                }
            }
            Command::CancelRunningJob => {
                if let (Some(worker), Some(running)) = (&self.worker, self.jobs.running()) {
                    worker.cancel(running.id);
                }
            }
            Command::SendMessage => self.send_message(),
            Command::StopReply => {
                if let (Some(worker), Some(active)) = (&self.worker, self.chat.active()) {
                    worker.cancel(active.job);
                }
            }
            Command::Regenerate => self.regenerate(None),
            Command::RegenerateReply {
                conversation,
                message,
            } => {
                self.chat.select(&conversation);
                self.regenerate(Some(message));
            }
            Command::ResendEdit {
                conversation,
                message,
                content,
            } => self.resend_edit(&conversation, message, &content),
            Command::EditMessage {
                conversation,
                message,
                content,
            } => {
                if self.chat.edit_message(&conversation, message, content) {
                    self.save_conversation(&conversation);
                }
            }
            Command::ShowBranch {
                conversation,
                message,
            } => {
                if self.chat.show_branch(&conversation, message)
                    && let Err(e) = self.chat.store.save_in_place(&conversation)
                {
                    self.notices.error(format!("{e:#}"));
                }
            }
            Command::NewConversation => {
                self.chat.new_conversation();
                self.settings.panel = Panel::Chat;
            }
            Command::SelectConversation(id) => self.chat.select(&id),
            Command::RenameConversation { id, title } => self.rename(&id, title),
            Command::DeleteConversation(id) => self.delete_conversation(&id),
            Command::UndoDelete(id) => match self.chat.store.restore(&id) {
                Ok(true) => {
                    self.notices
                        .dismiss_action(&Command::UndoDelete(id.clone()));
                    self.chat.select(&id);
                }
                Ok(false) => self
                    .notices
                    .warning("The chat can no longer be restored: its undo time has passed"),
                Err(e) => self.notices.error(format!("{e:#}")),
            },
            Command::ExportConversation { id, format } => self.export(&id, format),
            Command::RemoveRecentModel(path) => self.settings.recent_models.retain(|p| *p != path),
            Command::RescanHfCache => self.models.start_scan(),
            Command::Canvas(c) => self.apply_canvas(c),
            Command::Explorer(c) => self.apply_explorer(c),
            Command::Code(c) => self.apply_code(c),
        }
    }

    fn load_model(&mut self, path: PathBuf) {
        if path.as_os_str().is_empty() {
            self.notices
                .warning("Type or choose a model folder or file first");
            return;
        }
        if self.jobs.loading_model() == Some(&path) {
            return;
        }
        let options = LoadOptions {
            context_length: self.settings.context_length,
        };
        self.submit(
            JobKind::LoadModel {
                path: path.clone(),
                options: options.clone(),
            },
            JobPurpose::LoadModel(path, options),
        );
    }

    /// Why a reply cannot start now (and says so in a notice), or `None` when it can.
    fn reply_refused(&mut self) -> bool {
        if self.model.is_none() {
            self.notices
                .warning("Load a model in the Models panel before sending a message");
            return true;
        }
        if self.chat.active().is_some() {
            self.notices
                .warning("A reply is being written: wait for it or stop it first");
            return true;
        }
        false
    }

    fn send_message(&mut self) {
        if self.chat.input.trim().is_empty() || self.reply_refused() {
            return;
        }
        let Some((id, message)) = self.chat.take_input() else {
            return;
        };
        self.start_reply(&id, message);
    }

    /// Writes `reply` (or the last reply of the open conversation) again as a new version.
    fn regenerate(&mut self, reply: Option<MessageId>) {
        if self.model.is_none() || self.chat.active().is_some() {
            return;
        }
        let Some(id) = self.chat.selected.clone() else {
            return;
        };
        let target = match reply {
            Some(reply) => self.chat.regenerate_target(&id, reply),
            None => self.chat.last_reply_target(&id),
        };
        match target {
            Some(parent) => self.start_reply(&id, parent),
            None => self.save_conversation(&id),
        }
    }

    fn resend_edit(&mut self, id: &str, message: MessageId, content: &str) {
        if self.reply_refused() {
            return;
        }
        self.chat.select(id);
        if let Some(edited) = self.chat.branch_edit(id, message, content) {
            self.start_reply(id, edited);
        }
    }

    /// Adds an empty reply after `parent` in conversation `id` (the shown branch from now on),
    /// records the parameters with the conversation, saves, and submits the chat job with the
    /// path up to `parent`.
    fn start_reply(&mut self, id: &str, parent: MessageId) {
        let Some(model) = self.model.as_ref().map(|m| m.name.clone()) else {
            return;
        };
        let Some(c) = self.chat.store.get_mut(id) else {
            return;
        };
        // The open conversation's parameters are the ones shown; others keep their own.
        let sampling = c
            .sampling
            .get_or_insert_with(|| self.settings.sampling.clone())
            .clone();
        let system = c
            .system_prompt
            .get_or_insert_with(|| self.settings.system_prompt.clone())
            .clone();
        let messages = c.turns_to(parent);
        let mut params = sampling;
        if self.settings.new_seed_each_reply {
            params.seed = format::random_seed();
        }
        let Some(reply) = self.chat.add_reply(id, parent, &model, params.seed) else {
            return;
        };
        let kind = JobKind::Chat {
            system,
            messages,
            params,
        };
        let purpose = JobPurpose::ChatReply {
            conversation: id.to_owned(),
            message: reply,
        };
        match self.submit(kind, purpose) {
            Some(job) => self.chat.begin_reply(job, id.to_owned(), reply),
            None => self.chat.finish_message(
                id,
                reply,
                ReplyState::Failed,
                None,
                Some("the job could not be started".to_owned()),
            ),
        }
        self.save_conversation(id);
    }

    fn rename(&mut self, id: &str, title: String) {
        let Some(c) = self.chat.store.get_mut(id) else {
            return;
        };
        if c.title == title {
            return;
        }
        c.title = title;
        // A chat with no message yet is written with its first one.
        if !c.messages.is_empty()
            && let Err(e) = self.chat.store.save_in_place(id)
        {
            self.notices.error(format!("{e:#}"));
        }
    }

    fn delete_conversation(&mut self, id: &str) {
        if let Some(job) = self.chat.abandon_reply(id) {
            if let Some(worker) = &self.worker {
                worker.cancel(job);
            }
            // The trash keeps the reply as far as it got.
            if let Err(e) = self.chat.store.save_in_place(id) {
                self.notices.error(format!("{e:#}"));
            }
        }
        let title = self
            .chat
            .store
            .get(id)
            .map(|c| c.display_title().to_owned())
            .unwrap_or_default();
        match self.chat.store.trash(id) {
            Ok(true) => {
                self.notices.undoable(
                    format!("Deleted \"{title}\""),
                    "Undo",
                    Command::UndoDelete(id.to_owned()),
                    self.undo_window,
                );
            }
            Ok(false) => {}
            Err(e) => self
                .notices
                .error(format!("Could not delete the chat: {e:#}")),
        }
        if self.chat.selected.as_deref() == Some(id) {
            self.chat.selected = self.chat.store.list().first().map(|c| c.id.clone());
        }
    }

    fn export(&mut self, id: &str, format: ExportFormat) {
        let Some(c) = self.chat.store.get(id) else {
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
        self.export_to(id, format, &path);
    }

    /// Writes conversation `id` as shown (its active path) to `path`; says how it went in a
    /// notice. Returns whether it was written.
    pub fn export_to(&mut self, id: &str, format: ExportFormat, path: &Path) -> bool {
        let Some(c) = self.chat.store.get(id) else {
            return false;
        };
        let text = match format {
            ExportFormat::Markdown => c.to_markdown(),
            ExportFormat::Json => c.to_json_export(),
        };
        match crate::home::atomic_write(path, text.as_bytes()) {
            Ok(()) => {
                self.notices.info(format!("Exported to {}", path.display()));
                true
            }
            Err(e) => {
                self.notices.error(format!("Export failed: {e:#}"));
                false
            }
        }
    }
}

/// A file name from a title: characters file systems refuse become `-`.
pub fn file_name_from(title: &str) -> String {
    let cleaned: String = title
        .chars()
        .map(|c| {
            if c.is_control() || "/\\:*?\"<>|".contains(c) {
                '-'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim().trim_matches('.').trim();
    if cleaned.is_empty() {
        "chat".to_owned()
    } else {
        cleaned.chars().take(80).collect()
    }
}

/// "Could not load …: why", without naming the path twice when the loader's message does.
pub fn load_error(path: &std::path::Path, error: &str) -> String {
    let shown = path.display().to_string();
    if error.contains(&shown) {
        format!("Could not load the model: {error}")
    } else {
        format!("Could not load {shown}: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_file_names_are_safe() {
        assert_eq!(file_name_from("What is 2/3?"), "What is 2-3-");
        assert_eq!(file_name_from("  ..  "), "chat");
        assert_eq!(file_name_from("Plain"), "Plain");
    }
}
