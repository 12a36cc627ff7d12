//! Everything the user can ask for, as data: widgets push [`Command`]s while the frame is
//! drawn, and `StudioApp::apply_commands` (`dispatch.rs`) carries them out in one place
//! afterwards. This module names the panels' command enums from their leaf `command`
//! modules, so it imports no panel.

use std::path::PathBuf;

use studio_inference::llm::remote::RemoteConfig;

use super::canvas::command::CanvasCommand;
use super::chat::store::MessageId;
use super::code::command::CodeCommand;
use super::explorer::command::ExplorerCommand;
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
    /// Convert a PyTorch checkpoint (a pickle) to safetensors beside it, reading it as data,
    /// then open the result.
    ConvertCheckpoint(PathBuf),
    /// Something the Canvas asks for.
    Canvas(CanvasCommand),
    /// Something the Latent Explorer asks for.
    Explorer(ExplorerCommand),
    /// Something the Code panel asks for.
    Code(CodeCommand),
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
