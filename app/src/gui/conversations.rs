//! Conversations on disk: one JSON file per conversation in `<home>/conversations/<id>.json`,
//! each written atomically, so a crash loses at most the last moment of a streaming reply.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use studio_inference::chat::{ChatMessage, Role};
use studio_inference::generate::{FinishReason, GenerationStats};

use crate::home::{load_json, save_json};

pub const CONVERSATION_VERSION: u32 = 1;

/// Where a reply stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReplyState {
    /// Queued or being written.
    #[default]
    Streaming,
    Done,
    /// The user stopped it; the text so far is kept.
    Stopped,
    Failed,
    /// Studio closed (or crashed) while it was being written.
    Interrupted,
}

/// What is known about an assistant reply besides its text.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplyInfo {
    pub state: ReplyState,
    /// The model that wrote it.
    pub model: Option<String>,
    /// The seed it was sampled with.
    pub seed: Option<u64>,
    /// From the job's terminal event.
    pub stats: Option<GenerationStats>,
    /// Prompt length in tokens (after any trimming).
    pub prompt_tokens: Option<usize>,
    /// Tokens streamed so far.
    pub generated_tokens: usize,
    /// Oldest messages left out of the prompt to fit the context.
    pub dropped_messages: usize,
    pub error: Option<String>,
}

impl ReplyInfo {
    /// Tokens of the conversation as the model saw it: prompt plus reply.
    pub fn context_tokens(&self) -> Option<usize> {
        let generated = self
            .stats
            .as_ref()
            .map_or(self.generated_tokens, |s| s.generated_tokens);
        self.prompt_tokens.map(|p| p + generated)
    }

    /// "reached the max new tokens limit" and the like; `None` for a natural end.
    pub fn finish_note(&self) -> Option<&'static str> {
        match self.stats.as_ref()?.finish {
            FinishReason::EndOfText | FinishReason::StopString | FinishReason::Cancelled => None,
            FinishReason::Length => Some("reached the max new tokens limit"),
            FinishReason::ContextFull => Some("the context window is full"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyInfo>,
}

impl Message {
    pub fn user(content: String) -> Self {
        Self {
            role: Role::User,
            content,
            reply: None,
        }
    }

    pub fn is_streaming(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| r.state == ReplyState::Streaming)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conversation {
    pub version: u32,
    /// Also the file name (`<id>.json`).
    pub id: String,
    pub title: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub updated_ms: u64,
    pub messages: Vec<Message>,
}

impl Default for Conversation {
    fn default() -> Self {
        let now = now_ms();
        Self {
            version: CONVERSATION_VERSION,
            id: String::new(),
            title: String::new(),
            created_ms: now,
            updated_ms: now,
            messages: Vec::new(),
        }
    }
}

impl Conversation {
    pub fn display_title(&self) -> &str {
        if self.title.is_empty() {
            "New chat"
        } else {
            &self.title
        }
    }

    /// The turns to send for a reply written at `reply_index`: everything before it, leaving
    /// out empty replies (failed or stopped before any text).
    pub fn turns_before(&self, reply_index: usize) -> Vec<ChatMessage> {
        self.messages[..reply_index.min(self.messages.len())]
            .iter()
            .filter(|m| !(m.role == Role::Assistant && m.content.trim().is_empty()))
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content.trim().to_owned(),
            })
            .collect()
    }

    /// The last known size of the conversation in tokens, from the newest reply that has one.
    pub fn context_tokens(&self) -> Option<usize> {
        self.messages
            .iter()
            .rev()
            .filter_map(|m| m.reply.as_ref())
            .find_map(ReplyInfo::context_tokens)
    }

    /// Renders the conversation as Markdown (for the clipboard).
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n", self.display_title());
        for m in &self.messages {
            let who = match m.role {
                Role::User => "User",
                Role::Assistant => "Assistant",
            };
            let _ = write!(out, "\n**{who}:**\n\n{}\n", m.content.trim());
        }
        out
    }
}

/// A title from the first line of the first message.
pub fn title_from(text: &str) -> String {
    const MAX: usize = 48;
    let line = text.trim().lines().next().unwrap_or_default().trim();
    if line.chars().count() <= MAX {
        line.to_owned()
    } else {
        let cut: String = line.chars().take(MAX - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// All conversations, newest first, and the folder they live in.
#[derive(Debug)]
pub struct ConversationStore {
    dir: PathBuf,
    conversations: Vec<Conversation>,
}

impl ConversationStore {
    /// Reads every `*.json` in `<home>/conversations`. Files that cannot be read are left in
    /// place (never overwritten) and reported.
    pub fn open(home: &Path) -> (Self, Vec<String>) {
        let dir = home.join("conversations");
        let mut conversations = Vec::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                errors.push(format!("Could not list {}: {e}", dir.display()));
                Vec::new()
            }
        };
        for path in entries {
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if stem.starts_with('.') {
                continue;
            }
            match load_json::<Conversation>(&path) {
                Ok(Some(mut c)) => {
                    // The file name is authoritative: it is where edits are written back.
                    stem.clone_into(&mut c.id);
                    for m in &mut c.messages {
                        if let Some(r) = m.reply.as_mut()
                            && r.state == ReplyState::Streaming
                        {
                            r.state = ReplyState::Interrupted;
                        }
                    }
                    conversations.push(c);
                }
                Ok(None) => {}
                Err(e) => errors.push(format!("Could not open a conversation: {e:#}")),
            }
        }
        conversations.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(b.id.cmp(&a.id)));
        (Self { dir, conversations }, errors)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn list(&self) -> &[Conversation] {
        &self.conversations
    }

    pub fn get(&self, id: &str) -> Option<&Conversation> {
        self.conversations.iter().find(|c| c.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        self.conversations.iter_mut().find(|c| c.id == id)
    }

    /// Starts an empty conversation (not written until it has a message).
    pub fn create(&mut self) -> String {
        let base = now_ms().to_string();
        let mut id = base.clone();
        let mut n = 2;
        while self.get(&id).is_some() || self.path(&id).exists() {
            id = format!("{base}-{n}");
            n += 1;
        }
        self.conversations.insert(
            0,
            Conversation {
                id: id.clone(),
                ..Conversation::default()
            },
        );
        id
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes one conversation (atomically) and moves it to the top of the list.
    pub fn save(&mut self, id: &str) -> Result<()> {
        let Some(pos) = self.conversations.iter().position(|c| c.id == id) else {
            return Ok(());
        };
        let path = self.path(id);
        let c = &mut self.conversations[pos];
        c.updated_ms = now_ms();
        save_json(&path, c).with_context(|| format!("saving chat \"{}\"", c.display_title()))?;
        let c = self.conversations.remove(pos);
        self.conversations.insert(0, c);
        Ok(())
    }

    /// Writes one conversation without reordering (periodic saves while streaming).
    pub fn save_in_place(&self, id: &str) -> Result<()> {
        let Some(c) = self.get(id) else {
            return Ok(());
        };
        save_json(&self.path(id), c)
            .with_context(|| format!("saving chat \"{}\"", c.display_title()))
    }

    /// Removes a conversation and its file.
    pub fn delete(&mut self, id: &str) -> Result<()> {
        self.conversations.retain(|c| c.id != id);
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_persist_and_streaming_replies_reopen_as_interrupted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut store, errors) = ConversationStore::open(tmp.path());
        assert!(errors.is_empty() && store.list().is_empty());
        let id = store.create();
        let c = store.get_mut(&id).expect("created");
        c.title = title_from("Hello there\nsecond line");
        c.messages.push(Message::user("Hello there".into()));
        c.messages.push(Message {
            role: Role::Assistant,
            content: " Hi".into(),
            reply: Some(ReplyInfo::default()),
        });
        store.save(&id).expect("save");
        std::fs::write(store.dir().join("broken.json"), "{").expect("write");

        let (store, errors) = ConversationStore::open(tmp.path());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let c = store.get(&id).expect("reopened");
        assert_eq!(c.title, "Hello there");
        assert_eq!(
            c.messages[1].reply.as_ref().map(|r| r.state),
            Some(ReplyState::Interrupted)
        );
        assert_eq!(c.turns_before(1), vec![ChatMessage::user("Hello there")]);
        assert!(
            store.dir().join("broken.json").exists(),
            "unreadable files are kept"
        );
    }

    #[test]
    fn titles_are_short_single_lines() {
        assert_eq!(title_from("  hi  "), "hi");
        let long = "word ".repeat(30);
        let t = title_from(&long);
        assert!(t.chars().count() <= 48 && t.ends_with('…'), "{t}");
    }
}
