//! Everything the user can ask for, as data: widgets push [`Command`]s while the frame is
//! drawn, and [`StudioApp::apply_commands`] carries them out in one place afterwards.

use std::path::{Path, PathBuf};

use studio_inference::llm::remote::RemoteConfig;
use studio_inference::worker::{JobKind, LoadOptions};

use super::api_server::ApiServer;
use super::app::StudioApp;
use super::canvas::CanvasCommand;
use super::chat::store::MessageId;
use super::code::CodeCommand;
use super::context::app_context;
use super::explorer::ExplorerCommand;
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

    /// The panels take their own commands (each with the shared state lent as an
    /// [`AppContext`](super::context::AppContext)); the window's own are carried out here.
    fn apply(&mut self, command: Command) {
        let command = match command {
            Command::Canvas(c) => return self.canvas.apply(c, &mut app_context!(self)),
            Command::Explorer(c) => return self.explorer.apply(c, &mut app_context!(self)),
            Command::Code(c) => return self.code.apply(c, &mut app_context!(self)),
            other => other,
        };
        let Some(command) = self.chat.apply(command, &mut app_context!(self)) else {
            return;
        };
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
            Command::RemoveRecentModel(path) => self.settings.recent_models.retain(|p| *p != path),
            Command::RescanHfCache => self.models.start_scan(),
            // Taken by the panels above.
            Command::Canvas(_)
            | Command::Explorer(_)
            | Command::Code(_)
            | Command::SendMessage
            | Command::StopReply
            | Command::Regenerate
            | Command::RegenerateReply { .. }
            | Command::ResendEdit { .. }
            | Command::EditMessage { .. }
            | Command::ShowBranch { .. }
            | Command::NewConversation
            | Command::SelectConversation(_)
            | Command::RenameConversation { .. }
            | Command::DeleteConversation(_)
            | Command::UndoDelete(_)
            | Command::ExportConversation { .. } => {}
        }
    }

    /// Writes conversation `id` as shown (its active path) to `path`; says how it went in a
    /// notice. Returns whether it was written.
    pub fn export_to(&mut self, id: &str, format: ExportFormat, path: &Path) -> bool {
        self.chat
            .export_to(id, format, path, &mut app_context!(self))
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
