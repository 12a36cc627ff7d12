//! Chat turns to prompt tokens: the plain transcript format for models without a chat template
//! (GPT-2), and fitting a conversation into the context window by dropping its oldest turns.
//!
//! The plain transcript format, documented for users in README.md:
//!
//! ```text
//! {system prompt}            (followed by a blank line; omitted when empty)
//! User: {message}
//! Assistant: {reply}
//! User: {message}
//! Assistant:
//! ```
//!
//! Generation stops at a new line starting with `User:` (or `Assistant:`), so the model's
//! reply never speaks for the user.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::text::Tokenizer;

/// Name shown in the UI for the format above.
pub const PLAIN_TRANSCRIPT_NAME: &str = "plain transcript (User:/Assistant:)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Stop strings of the plain transcript format.
pub fn plain_stop_strings() -> Vec<String> {
    vec!["\nUser:".to_owned(), "\nAssistant:".to_owned()]
}

/// Renders the conversation as a plain transcript ending with `Assistant:` for the reply.
pub fn render_plain(system: &str, messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    let system = system.trim();
    if !system.is_empty() {
        out.push_str(system);
        out.push_str("\n\n");
    }
    for m in messages {
        let who = match m.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
        };
        out.push_str(who);
        out.push_str(": ");
        out.push_str(m.content.trim());
        out.push('\n');
    }
    out.push_str("Assistant:");
    out
}

/// A prompt that fits the context window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FittedPrompt {
    pub tokens: Vec<u32>,
    /// How many of the oldest messages were left out to make room.
    pub dropped_messages: usize,
}

/// Tokenizes the conversation, dropping the oldest messages (never the system prompt, never the
/// last message) until the prompt plus `reserve` tokens for the reply fit in `context`.
pub fn fit_to_context(
    tokenizer: &Tokenizer,
    system: &str,
    messages: &[ChatMessage],
    context: usize,
    reserve: usize,
) -> Result<FittedPrompt> {
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(Error::EmptyPrompt);
    }
    let reserve = reserve.min(context / 2);
    let budget = context.saturating_sub(reserve);
    let mut dropped = 0;
    loop {
        let kept = &messages[dropped..];
        let tokens = tokenizer.encode(&render_plain(system, kept))?;
        if tokens.len() <= budget {
            return Ok(FittedPrompt {
                tokens,
                dropped_messages: dropped,
            });
        }
        if kept.len() <= 1 {
            return Err(Error::PromptTooLong {
                tokens: tokens.len() + reserve,
                context,
            });
        }
        dropped += 1;
        // Drop whole turns: never start the kept part with an assistant reply.
        while dropped < messages.len() - 1 && messages[dropped].role == Role::Assistant {
            dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_format_is_as_documented() {
        let text = render_plain(
            " Be brief. ",
            &[
                ChatMessage::user("Hi"),
                ChatMessage::assistant(" Hello! "),
                ChatMessage::user("Bye"),
            ],
        );
        assert_eq!(
            text,
            "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
        );
        assert_eq!(
            render_plain("", &[ChatMessage::user("x")]),
            "User: x\nAssistant:"
        );
    }
}
