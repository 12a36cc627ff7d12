//! Conversations on disk: one JSON file per conversation in `<home>/conversations/<id>.json`,
//! each written atomically, so a crash loses at most the last moment of a streaming reply.
//!
//! # File format (version 2)
//!
//! A conversation is a tree. Editing an earlier message and resending it, or writing a reply
//! again, adds a *sibling* of that message instead of replacing it, so every version is kept:
//!
//! ```json
//! { "version": 2, "id": "…", "title": "…", "created_ms": 0, "updated_ms": 0,
//!   "system_prompt": "…", "sampling": { <SamplingParams> },
//!   "chosen_root": 1,
//!   "messages": [
//!     { "id": 1, "role": "User", "content": "Hi", "chosen": 3 },
//!     { "id": 2, "parent": 1, "role": "Assistant", "content": "Hello!", "reply": { … } },
//!     { "id": 3, "parent": 1, "role": "Assistant", "content": "Hi there.", "reply": { … } }
//!   ] }
//! ```
//!
//! `messages` holds every message of every branch in the order they were written; `parent` is
//! absent on a first message; `chosen` names the child the conversation goes on with (the last
//! one written when absent), and `chosen_root` the first message when there are several. The
//! conversation shown and sent to the model — the *active path* — starts at the chosen first
//! message and follows the chosen children.
//!
//! Version-1 files (a linear `messages` list without ids, and no parameters) still open: their
//! messages become one branch, and the file is written as version 2 the next time it is saved.
//!
//! # Deleting
//!
//! A deleted conversation's file is first moved to `conversations/trash/`, so Undo can put it
//! back; it is removed for good when the undo window passes or Studio closes. A crash in
//! between leaves it in `trash/`, never lost.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use studio_inference::llm::chat::{ChatMessage, Role, ToolCall};
use studio_inference::llm::generate::{FinishReason, GenerationStats};
use studio_inference::llm::sampling::SamplingParams;

use crate::gui::format::{self, now_ms};
use crate::home::{load_json, save_json};

pub const CONVERSATION_VERSION: u32 = 2;

/// Identifies a message within its conversation (1, 2, 3, … in the order written).
pub type MessageId = u64;

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

    /// Decode speed of a finished reply (tokens per second), when it wrote more than one token.
    pub fn tokens_per_second(&self) -> Option<f64> {
        self.stats
            .as_ref()
            .filter(|s| s.generated_tokens > 1 && s.decode_tok_s > 0.0)
            .map(|s| s.decode_tok_s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique within the conversation; 0 until the message is added with
    /// [`Conversation::push`] (and in version-1 files, which are numbered when read).
    #[serde(default)]
    pub id: MessageId,
    /// The message this one follows; `None` for a first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<MessageId>,
    /// Which child the conversation goes on with; `None` means the last one written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<MessageId>,
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyInfo>,
    /// For a tool's result: the call it answers (see [`Message::tool_calls`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            id: 0,
            parent: None,
            chosen: None,
            role: Role::User,
            content: content.into(),
            reply: None,
            tool_call_id: None,
        }
    }

    /// The tools a finished reply called: its text before the calls, and `(id, name,
    /// arguments)` of each (ids made from the message's).
    pub fn tool_calls(&self) -> Option<(String, studio_inference::llm::tools::CallList)> {
        if self.role != Role::Assistant || self.is_streaming() {
            return None;
        }
        let (content, calls) = studio_inference::llm::tools::parse_any(&self.content)?;
        let calls = calls
            .into_iter()
            .enumerate()
            .map(|(k, (name, args))| (format!("call_{}_{k}", self.id), name, args))
            .collect();
        Some((content, calls))
    }

    /// A finished assistant reply (tests and imports; streamed replies start empty).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            reply: Some(ReplyInfo {
                state: ReplyState::Done,
                ..ReplyInfo::default()
            }),
            ..Self::user(content)
        }
    }

    pub fn is_streaming(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| r.state == ReplyState::Streaming)
    }
}

/// Where a message sits among its siblings (the versions of that turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Siblings {
    /// 1-based position among the siblings.
    pub position: usize,
    pub count: usize,
    pub previous: Option<MessageId>,
    pub next: Option<MessageId>,
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
    /// The system prompt its replies are written with; `None` until the first reply (and in
    /// version-1 files), when the current one applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Sampling parameters, like `system_prompt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingParams>,
    /// Which first message is shown when several were written (the last one when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_root: Option<MessageId>,
    /// Every message of every branch, in the order written.
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
            system_prompt: None,
            sampling: None,
            chosen_root: None,
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

    pub fn message(&self, id: MessageId) -> Option<&Message> {
        self.messages.iter().find(|m| m.id == id)
    }

    pub fn message_mut(&mut self, id: MessageId) -> Option<&mut Message> {
        self.messages.iter_mut().find(|m| m.id == id)
    }

    /// The messages following `parent` (`None`: the first messages), in the order written.
    pub fn children(&self, parent: Option<MessageId>) -> impl Iterator<Item = &Message> {
        self.messages.iter().filter(move |m| m.parent == parent)
    }

    /// The child the conversation goes on with after `parent`.
    fn chosen_child(&self, parent: Option<MessageId>) -> Option<&Message> {
        let chosen = match parent {
            None => self.chosen_root,
            Some(p) => self.message(p).and_then(|m| m.chosen),
        };
        let mut last = None;
        for m in self.children(parent) {
            if Some(m.id) == chosen {
                return Some(m);
            }
            last = Some(m);
        }
        last
    }

    /// The conversation as shown and sent to the model: from the chosen first message along
    /// the chosen children.
    pub fn active_path(&self) -> Vec<&Message> {
        let mut path = Vec::new();
        let mut parent = None;
        // The bound stops a cycle in a hand-edited file from looping forever.
        while path.len() < self.messages.len() {
            let Some(m) = self.chosen_child(parent) else {
                break;
            };
            path.push(m);
            parent = Some(m.id);
        }
        path
    }

    /// The last message of the active path.
    pub fn leaf(&self) -> Option<MessageId> {
        self.active_path().last().map(|m| m.id)
    }

    /// The versions of the turn `id` is in, and where it is among them.
    pub fn siblings(&self, id: MessageId) -> Option<Siblings> {
        let parent = self.message(id)?.parent;
        let ids: Vec<MessageId> = self.children(parent).map(|m| m.id).collect();
        let index = ids.iter().position(|&s| s == id)?;
        Some(Siblings {
            position: index + 1,
            count: ids.len(),
            previous: index.checked_sub(1).map(|i| ids[i]),
            next: ids.get(index + 1).copied(),
        })
    }

    fn next_id(&self) -> MessageId {
        self.messages.iter().map(|m| m.id).max().unwrap_or(0) + 1
    }

    /// Adds `message` after `parent` (`None`: as a first message) and makes it the chosen
    /// branch. Returns its id.
    pub fn push(&mut self, parent: Option<MessageId>, mut message: Message) -> MessageId {
        let id = self.next_id();
        message.id = id;
        message.parent = parent;
        message.chosen = None;
        self.messages.push(message);
        self.choose(id);
        id
    }

    /// Adds `message` at the end of the active path.
    pub fn push_to_path(&mut self, message: Message) -> MessageId {
        let leaf = self.leaf();
        self.push(leaf, message)
    }

    /// Shows the branch through `id`: its parent goes on with it from now on.
    pub fn choose(&mut self, id: MessageId) -> bool {
        let Some(parent) = self.message(id).map(|m| m.parent) else {
            return false;
        };
        match parent {
            None => self.chosen_root = Some(id),
            Some(p) => match self.message_mut(p) {
                Some(m) => m.chosen = Some(id),
                None => return false,
            },
        }
        true
    }

    /// Removes a message that nothing follows (an empty reply being written again). Its
    /// parent goes on with its last remaining child.
    pub fn remove_leaf(&mut self, id: MessageId) -> bool {
        if self.children(Some(id)).next().is_some() {
            return false;
        }
        let Some(pos) = self.messages.iter().position(|m| m.id == id) else {
            return false;
        };
        let parent = self.messages.remove(pos).parent;
        match parent {
            None if self.chosen_root == Some(id) => self.chosen_root = None,
            Some(p) => {
                if let Some(m) = self.message_mut(p).filter(|m| m.chosen == Some(id)) {
                    m.chosen = None;
                }
            }
            None => {}
        }
        true
    }

    /// The turns to send for a reply to `last`: the path from the first message to `last`
    /// inclusive, leaving out empty replies (failed or stopped before any text).
    pub fn turns_to(&self, last: MessageId) -> Vec<ChatMessage> {
        let mut chain = Vec::new();
        let mut next = self.message(last);
        while let Some(m) = next {
            if chain.len() >= self.messages.len() {
                break;
            }
            chain.push(m);
            next = m.parent.and_then(|p| self.message(p));
        }
        chain
            .into_iter()
            .rev()
            .filter(|m| !(m.role == Role::Assistant && m.content.trim().is_empty()))
            .map(|m| {
                // Calls and results travel as the model's template reads them.
                if let Some((content, calls)) = m.tool_calls() {
                    let mut msg = ChatMessage::new(m.role, content.trim());
                    msg.tool_calls = calls
                        .into_iter()
                        .map(|(id, name, arguments)| ToolCall {
                            id,
                            name,
                            arguments,
                        })
                        .collect();
                    return msg;
                }
                let mut msg = ChatMessage::new(m.role, m.content.trim());
                msg.tool_call_id.clone_from(&m.tool_call_id);
                msg
            })
            .collect()
    }

    /// The last known size of the shown conversation in tokens, from its newest reply that has
    /// one.
    pub fn context_tokens(&self) -> Option<usize> {
        self.active_path()
            .iter()
            .rev()
            .filter_map(|m| m.reply.as_ref())
            .find_map(ReplyInfo::context_tokens)
    }

    /// Whether the title or any message (of any branch) contains `query`, ignoring case.
    /// `query` must already be lowercase.
    pub fn matches(&self, query: &str) -> bool {
        contains_lowercase(&self.title, query)
            || self
                .messages
                .iter()
                .any(|m| contains_lowercase(&m.content, query))
    }

    /// The model that wrote the newest reply of the active path.
    pub fn model(&self) -> Option<&str> {
        self.active_path()
            .iter()
            .rev()
            .find_map(|m| m.reply.as_ref().and_then(|r| r.model.as_deref()))
    }

    /// The shown conversation (active path) as Markdown: the title, the system prompt if any,
    /// then each turn.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n", self.display_title());
        if let Some(system) = self.system_prompt.as_deref().map(str::trim)
            && !system.is_empty()
        {
            let quoted: Vec<String> = system.lines().map(|l| format!("> {l}")).collect();
            let _ = write!(out, "\n**System prompt:**\n\n{}\n", quoted.join("\n"));
        }
        for m in self.active_path() {
            let who = match m.role {
                Role::User => "User",
                Role::Assistant => "Assistant",
                Role::Tool => "Tool",
            };
            let _ = write!(out, "\n**{who}:**\n\n{}\n", m.content.trim());
        }
        out
    }

    /// The shown conversation (active path) as pretty JSON, for other tools:
    ///
    /// ```json
    /// { "title": "…", "created": "2025-01-31T12:00:00Z", "model": "…" | null,
    ///   "system_prompt": "…",
    ///   "messages": [ { "role": "user" | "assistant", "content": "…",
    ///                   "model": "…", "tokens_per_second": 12.5 } ] }
    /// ```
    ///
    /// `created` is UTC (RFC 3339); the top-level `model` wrote the newest reply; a message's
    /// `model` and `tokens_per_second` are present on replies that have them.
    pub fn to_json_export(&self) -> String {
        #[derive(Serialize)]
        struct Export<'a> {
            title: &'a str,
            created: String,
            model: Option<&'a str>,
            system_prompt: &'a str,
            messages: Vec<ExportMessage<'a>>,
        }
        #[derive(Serialize)]
        struct ExportMessage<'a> {
            role: &'static str,
            content: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tokens_per_second: Option<f64>,
        }
        let export = Export {
            title: self.display_title(),
            created: format::rfc3339_utc(self.created_ms),
            model: self.model(),
            system_prompt: self.system_prompt.as_deref().unwrap_or_default(),
            messages: self
                .active_path()
                .into_iter()
                .map(|m| ExportMessage {
                    role: match m.role {
                        Role::User => "user",
                        Role::Assistant => "assistant",
                        Role::Tool => "tool",
                    },
                    content: m.content.trim(),
                    model: m.reply.as_ref().and_then(|r| r.model.as_deref()),
                    tokens_per_second: m
                        .reply
                        .as_ref()
                        .and_then(ReplyInfo::tokens_per_second)
                        .map(|t| (t * 100.0).round() / 100.0),
                })
                .collect(),
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string_pretty(&export).unwrap_or_default()
    }

    /// Brings a conversation read from disk to the current format: numbers the messages of a
    /// version-1 file as one branch, and makes messages whose parent is missing first messages.
    pub fn upgrade(&mut self) {
        let mut ids: Vec<MessageId> = self.messages.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        let numbered = !ids.contains(&0) && ids.windows(2).all(|w| w[0] != w[1]);
        if self.version < 2 || !numbered {
            for (i, m) in self.messages.iter_mut().enumerate() {
                m.id = i as u64 + 1;
                m.parent = (i > 0).then_some(i as u64);
                m.chosen = None;
            }
            self.chosen_root = None;
        } else {
            for i in 0..self.messages.len() {
                if let Some(p) = self.messages[i].parent
                    && (p == self.messages[i].id || ids.binary_search(&p).is_err())
                {
                    self.messages[i].parent = None;
                }
            }
        }
        self.version = CONVERSATION_VERSION;
    }
}

fn contains_lowercase(haystack: &str, lowercase_needle: &str) -> bool {
    if lowercase_needle.is_empty() {
        return true;
    }
    if haystack.is_ascii() && lowercase_needle.is_ascii() {
        let needle = lowercase_needle.as_bytes();
        return haystack
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle));
    }
    haystack.to_lowercase().contains(lowercase_needle)
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

/// How long after its Undo notice is gone a deleted chat's file is removed (an Undo clicked in
/// the notice's last frame still finds it).
pub const TRASH_GRACE: Duration = Duration::from_millis(500);

/// A deleted conversation while it can still be brought back.
#[derive(Debug)]
struct Trashed {
    conversation: Conversation,
    /// Where it was in the list.
    position: usize,
    /// Its file in `trash/` (none when it had never been written).
    file: Option<PathBuf>,
    deleted_at: Instant,
}

/// All conversations, newest first, and the folder they live in.
#[derive(Debug)]
pub struct ConversationStore {
    dir: PathBuf,
    conversations: Vec<Conversation>,
    trashed: Vec<Trashed>,
    /// Changes whenever a conversation may have changed (search results are cached on it).
    revision: u64,
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
            if path.extension().and_then(|e| e.to_str()) != Some("json") || !path.is_file() {
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
                    c.upgrade();
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
        let store = Self {
            dir,
            conversations,
            trashed: Vec::new(),
            revision: 0,
        };
        (store, errors)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where deleted conversations wait out the undo window.
    pub fn trash_dir(&self) -> PathBuf {
        self.dir.join("trash")
    }

    pub fn list(&self) -> &[Conversation] {
        &self.conversations
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, id: &str) -> Option<&Conversation> {
        self.conversations.iter().find(|c| c.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        self.revision += 1;
        self.conversations.iter_mut().find(|c| c.id == id)
    }

    /// Starts an empty conversation (not written until it has a message).
    pub fn create(&mut self) -> String {
        let base = now_ms().to_string();
        let mut id = base.clone();
        let mut n = 2;
        while self.get(&id).is_some()
            || self.path(&id).exists()
            || self.trashed.iter().any(|t| t.conversation.id == id)
        {
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
        self.revision += 1;
        id
    }

    /// Adds a conversation made elsewhere (tests, imports) at the top of the list, unsaved.
    pub fn insert(&mut self, mut conversation: Conversation) -> String {
        let id = self.create();
        conversation.id.clone_from(&id);
        self.conversations[0] = conversation;
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
        self.revision += 1;
        Ok(())
    }

    /// Writes one conversation without reordering (periodic saves while streaming, a branch
    /// shown, parameters changed).
    pub fn save_in_place(&self, id: &str) -> Result<()> {
        let Some(c) = self.get(id) else {
            return Ok(());
        };
        save_json(&self.path(id), c)
            .with_context(|| format!("saving chat \"{}\"", c.display_title()))
    }

    /// Deletes a conversation so that [`ConversationStore::restore`] can bring it back: its
    /// file moves to `trash/` and it leaves the list. If the file cannot be moved, nothing
    /// changes and the error is returned.
    pub fn trash(&mut self, id: &str) -> Result<bool> {
        let Some(position) = self.conversations.iter().position(|c| c.id == id) else {
            return Ok(false);
        };
        let path = self.path(id);
        let file = if path.exists() {
            let trash = self.trash_dir();
            std::fs::create_dir_all(&trash)
                .with_context(|| format!("creating {}", trash.display()))?;
            let dest = trash.join(format!("{id}.json"));
            std::fs::rename(&path, &dest)
                .with_context(|| format!("moving {} to {}", path.display(), dest.display()))?;
            Some(dest)
        } else {
            None
        };
        let conversation = self.conversations.remove(position);
        self.trashed.push(Trashed {
            conversation,
            position,
            file,
            deleted_at: Instant::now(),
        });
        self.revision += 1;
        Ok(true)
    }

    /// Whether `id` was deleted and can still be restored.
    pub fn is_trashed(&self, id: &str) -> bool {
        self.trashed.iter().any(|t| t.conversation.id == id)
    }

    /// Undoes [`ConversationStore::trash`]: the file moves back and the conversation returns
    /// to its place in the list. `Ok(false)` when it is no longer in the trash.
    pub fn restore(&mut self, id: &str) -> Result<bool> {
        let Some(i) = self.trashed.iter().position(|t| t.conversation.id == id) else {
            return Ok(false);
        };
        let t = self.trashed.remove(i);
        let path = self.path(id);
        if let Some(file) = &t.file {
            let moved = std::fs::rename(file, &path);
            if moved.is_err()
                && let Err(e) = save_json(&path, &t.conversation)
            {
                // Keep it in the trash (in memory and on disk) rather than lose it.
                self.trashed.insert(i, t);
                return Err(e.context("restoring the chat"));
            }
        }
        let position = t.position.min(self.conversations.len());
        self.conversations.insert(position, t.conversation);
        self.revision += 1;
        Ok(true)
    }

    /// Removes for good the deleted conversations older than `window`. Returns the errors.
    pub fn purge_trash(&mut self, window: Duration) -> Vec<String> {
        let (expired, kept): (Vec<Trashed>, Vec<Trashed>) = std::mem::take(&mut self.trashed)
            .into_iter()
            .partition(|t| t.deleted_at.elapsed() >= window);
        self.trashed = kept;
        expired
            .into_iter()
            .filter_map(|t| t.file)
            .filter_map(|file| match std::fs::remove_file(&file) {
                Ok(()) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => Some(format!("Could not remove {}: {e}", file.display())),
            })
            .collect()
    }

    /// How long until the oldest deleted conversation's undo window passes.
    pub fn next_purge(&self, window: Duration) -> Option<Duration> {
        self.trashed
            .iter()
            .map(|t| window.saturating_sub(t.deleted_at.elapsed()))
            .min()
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
        let user = c.push_to_path(Message::user("Hello there"));
        c.push_to_path(Message {
            role: Role::Assistant,
            content: " Hi".into(),
            reply: Some(ReplyInfo::default()),
            ..Message::user("")
        });
        store.save(&id).expect("save");
        std::fs::write(store.dir().join("broken.json"), "{").expect("write");

        let (store, errors) = ConversationStore::open(tmp.path());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let c = store.get(&id).expect("reopened");
        assert_eq!(c.title, "Hello there");
        let path = c.active_path();
        assert_eq!(
            path[1].reply.as_ref().map(|r| r.state),
            Some(ReplyState::Interrupted)
        );
        assert_eq!(c.turns_to(user), vec![ChatMessage::user("Hello there")]);
        assert!(
            store.dir().join("broken.json").exists(),
            "unreadable files are kept"
        );
    }

    #[test]
    fn branches_keep_every_version_and_the_path_follows_the_chosen_ones() {
        let mut c = Conversation::default();
        let q1 = c.push_to_path(Message::user("one"));
        let a1 = c.push_to_path(Message::assistant("reply one"));
        let q2 = c.push_to_path(Message::user("two"));
        let a2 = c.push_to_path(Message::assistant("reply two"));
        // Write the first reply again: a sibling, chosen; the path ends there.
        let a1b = c.push(Some(q1), Message::assistant("reply one, again"));
        let shown: Vec<&str> = c.active_path().iter().map(|m| m.content.as_str()).collect();
        assert_eq!(shown, ["one", "reply one, again"]);
        let s = c.siblings(a1b).expect("siblings");
        assert_eq!(
            (s.position, s.count, s.previous, s.next),
            (2, 2, Some(a1), None)
        );
        // Back to the first version: its own continuation is still there.
        assert!(c.choose(a1));
        let shown: Vec<&str> = c.active_path().iter().map(|m| m.content.as_str()).collect();
        assert_eq!(shown, ["one", "reply one", "two", "reply two"]);
        assert_eq!(c.leaf(), Some(a2));
        assert_eq!(
            c.turns_to(q2),
            vec![
                ChatMessage::user("one"),
                ChatMessage::assistant("reply one"),
                ChatMessage::user("two")
            ]
        );
        // An edited first message is a second root.
        let q1b = c.push(None, Message::user("one, edited"));
        assert_eq!(c.active_path().len(), 1);
        assert_eq!(c.siblings(q1b).map(|s| (s.position, s.count)), Some((2, 2)));
        assert!(c.choose(q1));
        assert_eq!(c.active_path().len(), 4);
        // The tree survives JSON.
        let json = serde_json::to_string(&c).expect("json");
        let mut back: Conversation = serde_json::from_str(&json).expect("parse");
        back.upgrade();
        assert_eq!(back, c);
        // An empty reply with nothing after it can be removed; the parent goes on with the
        // remaining child.
        let empty = c.push(Some(q2), Message::assistant(""));
        assert!(!c.remove_leaf(q2), "q2 has replies");
        assert!(c.remove_leaf(empty));
        assert_eq!(c.leaf(), Some(a2));
    }

    #[test]
    fn version_1_files_open_as_one_branch() {
        let v1 = r#"{"version":1,"id":"x","title":"Old","created_ms":5,"updated_ms":6,
            "messages":[{"role":"User","content":"Hi"},
                        {"role":"Assistant","content":"Hello","reply":{"state":"Done"}},
                        {"role":"User","content":"More"}]}"#;
        let mut c: Conversation = serde_json::from_str(v1).expect("parse");
        c.upgrade();
        assert_eq!(c.version, CONVERSATION_VERSION);
        let shown: Vec<(MessageId, &str)> = c
            .active_path()
            .iter()
            .map(|m| (m.id, m.content.as_str()))
            .collect();
        assert_eq!(shown, [(1, "Hi"), (2, "Hello"), (3, "More")]);
        assert_eq!(c.sampling, None);
        assert_eq!(c.turns_to(3).len(), 3);
    }

    #[test]
    fn exports_show_the_active_path() {
        let mut c = Conversation {
            title: "Exported".into(),
            created_ms: 0,
            system_prompt: Some("Be brief.".into()),
            ..Conversation::default()
        };
        let q = c.push_to_path(Message::user("Q"));
        c.push_to_path(Message::assistant("old answer"));
        let mut answer = Message::assistant("new answer");
        if let Some(r) = answer.reply.as_mut() {
            r.model = Some("tiny".into());
        }
        c.push(Some(q), answer);
        let md = c.to_markdown();
        assert!(md.starts_with("# Exported\n"), "{md}");
        assert!(
            md.contains("> Be brief.") && md.contains("new answer"),
            "{md}"
        );
        assert!(!md.contains("old answer"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&c.to_json_export()).expect("json");
        assert_eq!(json["title"], "Exported");
        assert_eq!(json["created"], "1970-01-01T00:00:00Z");
        assert_eq!(json["model"], "tiny");
        assert_eq!(json["system_prompt"], "Be brief.");
        assert_eq!(json["messages"][0]["role"], "user");
        assert_eq!(json["messages"][1]["content"], "new answer");
        assert_eq!(json["messages"][1]["model"], "tiny");
        assert!(json["messages"][0].get("model").is_none());
        assert_eq!(json["messages"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn trashed_conversations_come_back_or_go_for_good() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut store, _) = ConversationStore::open(tmp.path());
        let id = store.create();
        store
            .get_mut(&id)
            .expect("c")
            .push_to_path(Message::user("keep me"));
        store.save(&id).expect("save");
        let file = store.dir().join(format!("{id}.json"));
        assert!(store.trash(&id).expect("trash"));
        assert!(!file.exists() && store.get(&id).is_none());
        assert!(store.trash_dir().join(format!("{id}.json")).exists());
        assert!(store.restore(&id).expect("restore"));
        assert!(file.exists() && store.get(&id).is_some());
        assert!(!store.restore(&id).expect("no-op"));

        assert!(store.trash(&id).expect("trash"));
        assert!(store.purge_trash(Duration::from_mins(1)).is_empty());
        assert!(store.is_trashed(&id), "still within the window");
        assert!(store.purge_trash(Duration::ZERO).is_empty());
        assert!(!store.is_trashed(&id));
        assert!(!store.trash_dir().join(format!("{id}.json")).exists());
        assert!(!store.restore(&id).expect("gone"));
    }

    #[test]
    fn search_ignores_case_and_looks_in_every_branch() {
        let mut c = Conversation {
            title: "Rust questions".into(),
            ..Conversation::default()
        };
        let q = c.push_to_path(Message::user("How do lifetimes work?"));
        c.push_to_path(Message::assistant("Like this."));
        c.push(Some(q), Message::assistant("Ünïcode BORROW checker"));
        assert!(c.matches("rust"));
        assert!(c.matches("lifetimes"));
        assert!(c.matches("borrow"), "hidden branches count");
        assert!(c.matches("ünïcode"));
        assert!(!c.matches("python"));
    }

    #[test]
    fn titles_are_short_single_lines() {
        assert_eq!(title_from("  hi  "), "hi");
        let long = "word ".repeat(30);
        let t = title_from(&long);
        assert!(t.chars().count() <= 48 && t.ends_with('…'), "{t}");
    }
}
