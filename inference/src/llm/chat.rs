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
use crate::llm::sampling::SamplingParams;
use crate::llm::template::{ChatTemplate, TemplateMessage};
use crate::llm::text::Tokenizer;

/// Name shown in the UI for the format above.
pub const PLAIN_TRANSCRIPT_NAME: &str = "plain transcript (User:/Assistant:)";

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The person chatting.
    User,
    /// The model.
    Assistant,
    /// The result of a tool the model called (OpenAI's `role: "tool"`).
    Tool,
}

/// A call of a tool (a function) the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (`call_…`), which the tool's result names.
    pub id: String,
    /// The function.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The message text.
    pub content: String,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool's result: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// A reply from the assistant (the model).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
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
            Role::Tool => "Tool",
        };
        out.push_str(who);
        out.push_str(": ");
        out.push_str(m.content.trim());
        out.push('\n');
    }
    out.push_str("Assistant:");
    out
}

/// How a model turns a conversation into a prompt.
#[derive(Debug, Clone)]
pub enum ChatFormat {
    /// The model's own chat template.
    Template(ChatTemplate),
    /// The plain transcript above (models that ship no template, such as GPT-2). `reason`
    /// says why when the model's own template could not be used.
    Plain {
        /// Why the model's own template was not used; `None` when the model has none.
        reason: Option<String>,
    },
}

/// End-of-turn tokens chat templates close a reply with; generation stops at any of them that
/// the vocabulary has, in addition to the model's end-of-text ids.
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<turn|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

impl ChatFormat {
    /// The format for a model whose own template was looked for: the template when it
    /// compiled; the plain transcript when there is none, or (with the reason, so the UI can
    /// say it) when it did not compile — the model still loads.
    pub fn from_model_template(found: Result<Option<ChatTemplate>>) -> Self {
        match found {
            Ok(Some(t)) => ChatFormat::Template(t),
            Ok(None) => ChatFormat::Plain { reason: None },
            Err(e) => ChatFormat::Plain {
                reason: Some(format!("the model's template could not be used: {e}")),
            },
        }
    }

    /// What the UI shows as the active format.
    pub fn name(&self) -> String {
        match self {
            ChatFormat::Template(t) => format!("{} (the model's chat template)", t.family_name()),
            ChatFormat::Plain { reason: None } => PLAIN_TRANSCRIPT_NAME.to_owned(),
            ChatFormat::Plain { reason: Some(r) } => format!("{PLAIN_TRANSCRIPT_NAME}; {r}"),
        }
    }

    /// Stop strings the format needs beyond the model's end-of-text tokens.
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            ChatFormat::Template(_) => Vec::new(),
            ChatFormat::Plain { .. } => plain_stop_strings(),
        }
    }

    /// End-of-turn token ids for this format in `tokenizer`'s vocabulary.
    pub fn end_of_turn_ids(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        match self {
            ChatFormat::Template(_) => END_OF_TURN_TOKENS
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t))
                .collect(),
            ChatFormat::Plain { .. } => Vec::new(),
        }
    }

    /// The prompt text for `messages` (with the system prompt first when non-empty), ready for
    /// the assistant's reply.
    pub fn render(&self, system: &str, messages: &[ChatMessage]) -> Result<String> {
        match self {
            ChatFormat::Plain { .. } => Ok(render_plain(system, messages)),
            ChatFormat::Template(t) => {
                // Tool calls as templates read them (OpenAI's shape, arguments as an object).
                let calls: Vec<Option<serde_json::Value>> = messages
                    .iter()
                    .map(|m| {
                        (!m.tool_calls.is_empty()).then(|| {
                            serde_json::Value::Array(
                                m.tool_calls
                                    .iter()
                                    .map(crate::llm::tools::template_call)
                                    .collect(),
                            )
                        })
                    })
                    .collect();
                let mut list = Vec::with_capacity(messages.len() + 1);
                let system = system.trim();
                if !system.is_empty() {
                    list.push(TemplateMessage::system(system));
                }
                list.extend(messages.iter().zip(&calls).map(|(m, calls)| {
                    let mut t = match m.role {
                        Role::User => TemplateMessage::user(&m.content),
                        Role::Assistant => TemplateMessage::assistant(&m.content),
                        Role::Tool => TemplateMessage::new("tool", &m.content),
                    };
                    t.tool_calls = calls.as_ref();
                    t.tool_call_id = m.tool_call_id.as_deref();
                    t
                }));
                t.render(&list, true)
            }
        }
    }
}

/// A prompt that fits the context window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FittedPrompt {
    /// The prompt's token ids.
    pub tokens: Vec<u32>,
    /// How many of the oldest messages were left out to make room.
    pub dropped_messages: usize,
}

/// Tokenizes the conversation in `format`, dropping the oldest messages (never the system
/// prompt, never the last message) until the prompt plus `reserve` tokens for the reply fit in
/// `context`. Whole turns are dropped: the kept part never starts with an assistant reply.
///
/// The cost is linear in the conversation: one rendering of all of it, then renderings of
/// newest suffixes growing 1, 2, 4, … turns until one does not fit, then a bisection between
/// the last two, so a long history costs a few renderings of about what is kept, not one per
/// dropped message.
pub fn fit_to_context(
    tokenizer: &Tokenizer,
    format: &ChatFormat,
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
    // Where the kept part may start.
    let last_message = messages.len() - 1;
    let starts: Vec<usize> = (0..messages.len())
        .filter(|&i| i == 0 || i == last_message || messages[i].role != Role::Assistant)
        .collect();
    let tokens_from = |i: usize| -> Result<Vec<u32>> {
        tokenizer.encode(&format.render(system, &messages[starts[i]..])?)
    };
    let fitted = |i: usize, tokens: Vec<u32>| FittedPrompt {
        tokens,
        dropped_messages: starts[i],
    };
    let all = tokens_from(0)?;
    if all.len() <= budget {
        return Ok(fitted(0, all));
    }
    // `long` is known not to fit, `fits` (when found) does.
    let last = starts.len() - 1;
    let mut long = (0, all.len());
    let mut fits = None;
    let mut kept = 1;
    while kept <= last {
        let i = last + 1 - kept;
        let tokens = tokens_from(i)?;
        if tokens.len() > budget {
            long = (i, tokens.len());
            break;
        }
        fits = Some((i, tokens));
        kept *= 2;
    }
    let Some((mut good, mut tokens)) = fits else {
        return Err(Error::PromptTooLong {
            tokens: long.1 + reserve,
            context,
        });
    };
    let mut bad = long.0;
    while good - bad > 1 {
        let mid = bad + (good - bad) / 2;
        let t = tokens_from(mid)?;
        if t.len() <= budget {
            (good, tokens) = (mid, t);
        } else {
            bad = mid;
        }
    }
    Ok(fitted(good, tokens))
}

/// A chat prompt ready to generate from.
#[derive(Debug, Clone)]
pub struct ChatPrompt {
    /// The prompt tokens, and how many of the oldest messages were dropped to fit.
    pub fitted: FittedPrompt,
    /// Stop strings the format needs.
    pub stop: Vec<String>,
    /// End-of-turn ids to stop at, beyond the model's end-of-text ids.
    pub end_of_turn: Vec<u32>,
    /// Set when the model's template could not take the conversation and a fallback was used;
    /// the UI shows it.
    pub notice: Option<String>,
}

/// Everything one chat reply is generated from: the recipe the worker, `studio chat`,
/// `studio code` and `studio serve` share ([`ChatPrompt::into_reply`]).
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The prompt's tokens.
    pub tokens: Vec<u32>,
    /// The caller's sampling parameters with the format's stop strings added.
    pub params: SamplingParams,
    /// The model's end-of-text ids and the format's end-of-turn ids.
    pub eos: Vec<u32>,
    /// Oldest messages left out to fit the context.
    pub dropped_messages: usize,
    /// Set when the model's template could not take the conversation (see [`ChatPrompt`]).
    pub notice: Option<String>,
}

impl ChatPrompt {
    /// The reply's recipe: the format's stop strings join `params`' and its end-of-turn ids
    /// join the model's end-of-text ids (`model_eos`).
    pub fn into_reply(self, mut params: SamplingParams, model_eos: &[u32]) -> ChatReply {
        params.stop.extend(self.stop);
        let eos = model_eos.iter().chain(&self.end_of_turn).copied().collect();
        ChatReply {
            tokens: self.fitted.tokens,
            params,
            eos,
            dropped_messages: self.fitted.dropped_messages,
            notice: self.notice,
        }
    }
}

/// Builds the prompt for the next reply in a chat format (the model's own template, or the
/// plain transcript), fitted to a `context` of tokens with `reserve` left for the reply. It
/// takes the parts of a model it reads, not the model, so a prompt can be built without holding
/// the model (the server renders and tokenizes outside its model lock);
/// [`crate::llm::loader::LoadedModel::chat_prompt`] passes a loaded model's.
///
/// When the template refuses the conversation (templates `raise_exception` on a system
/// message, or fail), Studio does what users expect rather than fail: the system prompt is put
/// at the start of the first user message; if the template still fails, the plain transcript
/// is used. Either way `notice` says so. With tools offered there is no plain fallback (the
/// transcript has no place for them): the template's error is returned.
pub fn build_chat_prompt(
    tok: &Tokenizer,
    format: &ChatFormat,
    context: usize,
    system: &str,
    messages: &[ChatMessage],
    reserve: usize,
) -> Result<ChatPrompt> {
    let prompt = |format: &ChatFormat, fitted: FittedPrompt, notice: Option<String>| ChatPrompt {
        fitted,
        stop: format.stop_strings(),
        end_of_turn: format.end_of_turn_ids(tok),
        notice,
    };
    let error = match fit_to_context(tok, format, system, messages, context, reserve) {
        Ok(fitted) => return Ok(prompt(format, fitted, None)),
        Err(Error::ChatTemplate(e)) => e,
        Err(e) => return Err(e),
    };
    if !system.trim().is_empty()
        && let Some(first) = messages.iter().position(|m| m.role == Role::User)
    {
        let mut merged = messages.to_vec();
        merged[first].content = format!("{}\n\n{}", system.trim(), merged[first].content);
        if let Ok(fitted) = fit_to_context(tok, format, "", &merged, context, reserve) {
            let notice = format!(
                "This model's chat template does not take a system prompt ({error}); \
                 it was put at the start of the first message."
            );
            return Ok(prompt(format, fitted, Some(notice)));
        }
    }
    // The plain transcript has no place for tools: offered tools are never dropped unsaid.
    if let ChatFormat::Template(t) = format
        && t.offers_tools()
    {
        return Err(Error::ChatTemplate(format!(
            "the model's chat template could not render the conversation with the offered \
             tools: {error}"
        )));
    }
    let plain = ChatFormat::Plain { reason: None };
    let fitted = fit_to_context(tok, &plain, system, messages, context, reserve)?;
    let notice = format!(
        "The model's chat template failed ({error}); this reply uses the plain transcript format."
    );
    Ok(prompt(&plain, fitted, Some(notice)))
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
