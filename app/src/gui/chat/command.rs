//! What the Chat asks for, and why it submits jobs, as data: a leaf module, so the window's
//! command and job lists can name them without importing the panel.

use super::store::MessageId;

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

/// What the Chat asks for (inside `Command::Panel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// Send the typed message and ask for a reply.
    SendMessage,
    /// Stop the reply being written; its text so far is kept.
    StopReply,
    /// Answer the tool calls of reply `message`: each call's id and its result, added as tool
    /// messages, then a new reply.
    SendToolResults {
        conversation: String,
        message: MessageId,
        results: Vec<(String, String)>,
    },
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
}

/// Why the Chat submitted a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatPurpose {
    /// The reply being written into message `message` of `conversation`.
    Reply {
        conversation: String,
        message: MessageId,
    },
}
