//! Chat templates shipped with models (Jinja), rendered with minijinja the way Hugging Face
//! transformers' `apply_chat_template` renders them.
//!
//! A model's chat template lives in `chat_template.jinja` (newer transformers) or in the
//! `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
//! which `default` is used). transformers compiles it in a sandboxed Jinja2 environment with
//! `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, jinja2's default
//! (lenient) undefined values, and a few additions. Mirrored here:
//!
//! - trim_blocks, lstrip_blocks, no trailing newline kept, lenient undefined values (printing
//!   or iterating one gives nothing; an attribute of one is an error);
//! - `raise_exception(message)` fails the render with the template's message;
//! - `strftime_now(format)` formats the current date and time (UTC here; transformers uses the
//!   machine's local time), or a fixed date set with [`ChatTemplate::with_date`];
//! - `tojson` is Python's `json.dumps` (non-ASCII kept, `", "`/`": "` separators, `indent`,
//!   `sort_keys`, `separators`, `ensure_ascii`), not Jinja's HTML-safe one;
//! - the variables are `messages`, `add_generation_prompt`, `bos_token` / `eos_token` (only when
//!   the tokenizer has them, as transformers passes its special-token map), `tools` (`none`
//!   unless tools are offered) and `documents` (`none`);
//! - Python string and dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, …) via
//!   minijinja-contrib's pycompat layer;
//! - `{{ … }}` prints values as Python's `str()` does: `True`, `None`, `2.5`, `['a', 1]`;
//! - line endings in the template are normalised to `\n`, as jinja2's lexer does;
//! - transformers' `{% generation %}…{% endgeneration %}` tags (which mark the assistant's tokens
//!   for training masks) render their body, as they do in transformers when no mask is asked for.
//!
//! - `{% break %}` / `{% continue %}`, and dicts in insertion order (minijinja's
//!   `loop_controls` and `preserve_order`).
//!
//! Tools: `tools` is the offered list ([`ChatTemplate::with_tools`]) and an assistant message
//! carries its `tool_calls`. A template that reads the list from the system message instead
//! (Phi-4-mini) gets it there, and one that ignores `tool_calls` gets the calls written into
//! the message's text in the model's own syntax (see `adapt_tool_messages`).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};
use serde::Serialize;

use crate::error::{Error, Result};

/// The system prompt Phi-4-mini's model card gives with tools, used when a conversation offering
/// tools to a template that reads them from the system message has no system prompt.
const DEFAULT_TOOLS_SYSTEM_PROMPT: &str = "You are a helpful assistant with some tools.";

/// Name the compiled template has inside its environment (shows up in error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// The most instructions one rendering may run (minijinja's fuel): a few hundred per message,
/// so ample for any real conversation (rendering 4,000 messages takes about a million), while
/// a runaway loop (`range(100000)` nested) stops within a second.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// The longest rendered prompt (bytes): far beyond any model's context.
pub const MAX_RENDERED_BYTES: usize = 32 << 20;

/// One message of a conversation as a chat template sees it: `{"role": …, "content": …}`,
/// with `tool_calls` on an assistant message that called tools and `tool_call_id` on a tool's
/// result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TemplateMessage<'a> {
    /// `"system"`, `"user"` or `"assistant"` (templates may accept others, such as `"tool"`).
    pub role: &'a str,
    /// The message text.
    pub content: &'a str,
    /// The tools it called: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<&'a serde_json::Value>,
    /// The call a tool's result answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<&'a str>,
}

impl<'a> TemplateMessage<'a> {
    /// A message with any role.
    pub fn new(role: &'a str, content: &'a str) -> Self {
        Self {
            role,
            content,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// A `"system"` message: the system prompt.
    pub fn system(content: &'a str) -> Self {
        Self::new("system", content)
    }

    /// A `"user"` message.
    pub fn user(content: &'a str) -> Self {
        Self::new("user", content)
    }

    /// An `"assistant"` message: a reply of the model.
    pub fn assistant(content: &'a str) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template with the special tokens it may reference. Cloning is cheap (the
/// compiled template is shared), and it can be sent to and shared between threads.
#[derive(Clone)]
pub struct ChatTemplate {
    inner: Arc<Inner>,
    /// Where the template came from, for errors ("the chat template of model.gguf").
    origin: Arc<str>,
    /// The tools offered to the model (`tools` in the template), as OpenAI lists them.
    tools: Option<Arc<serde_json::Value>>,
}

struct Inner {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    clock: Clock,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("family", &self.family_name())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .field("clock", &self.inner.clock)
            .field("source_len", &self.inner.source.len())
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (the Jinja text). `bos_token` / `eos_token` are the token strings the
    /// template may reference; `None` leaves the variable undefined, as transformers does for a
    /// tokenizer without that token.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        Self::build(
            source.to_owned(),
            bos_token.map(str::to_owned),
            eos_token.map(str::to_owned),
            Clock::System,
        )
    }

    /// The same template with `strftime_now` reporting a fixed date (midnight), so a rendering
    /// that contains today's date is reproducible (tests, saved prompts).
    #[must_use]
    pub fn with_date(self, year: i32, month: u32, day: u32) -> Self {
        let clock = Clock::Fixed(DateTime::midnight(year, month, day));
        let inner = &self.inner;
        // The source compiled once already, and the clock does not take part in compiling.
        Self::build(
            inner.source.clone(),
            inner.bos_token.clone(),
            inner.eos_token.clone(),
            clock,
        )
        .expect("the template compiled before")
        .with_origin(&self.origin)
    }

    /// The same template, naming `origin` (a file, "the GGUF metadata of …") in its errors.
    #[must_use]
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = origin.into();
        self
    }

    fn build(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        clock: Clock,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        minijinja_contrib::add_to_environment(&mut env);
        crate::llm::template_bounds::add_to_environment(&mut env);
        env.set_unknown_method_callback(|state, value, method, args| {
            crate::llm::template_bounds::check_method(value, method, args)?;
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.set_formatter(python_formatter);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", move |format: &str| {
            strftime(format, &clock.now())
        });
        // jinja2 turns "\r\n" and "\r" into "\n" in template data and string literals alike.
        let normalized = source.replace("\r\n", "\n").replace('\r', "\n");
        let normalized = rewrite_generation_tags(&normalized);
        // Every value it builds is bounded (template_bounds); the rewriting parses the
        // template, so a syntax error is reported here as compiling would.
        let instrumented = crate::llm::template_bounds::instrument(&normalized, TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        env.add_template_owned(TEMPLATE_NAME, instrumented)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                bos_token,
                eos_token,
                clock,
                env,
            }),
            origin: "the model's chat template".into(),
            tools: None,
        })
    }

    /// Reads the template from a Hugging Face `tokenizer_config.json` (already parsed):
    /// `chat_template` as a string, or as a list of `{name, template}` of which `default` is
    /// used; `bos_token` / `eos_token` as strings or `{"content": …}` objects. `Ok(None)` when
    /// the file has no template.
    pub fn from_tokenizer_config(json: &serde_json::Value) -> Result<Option<Self>> {
        let Some(source) = template_from_config(json)? else {
            return Ok(None);
        };
        let (bos, eos) = special_tokens(json);
        Self::new(&source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// Finds the template of the model in `dir`: `chat_template.jinja` when present (what newer
    /// transformers writes; it takes precedence, as in transformers), else `chat_template` in
    /// `tokenizer_config.json`, else `chat_template.json` (`{"chat_template": …}`, written for
    /// processors). The special tokens come from `tokenizer_config.json`, falling back to
    /// `special_tokens_map.json`. `Ok(None)` when the model has no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let (mut bos, mut eos) = config.as_ref().map(special_tokens).unwrap_or_default();
        if (bos.is_none() || eos.is_none())
            && let Some(map) = read_json_if_exists(&dir.join("special_tokens_map.json"))?
        {
            let (map_bos, map_eos) = special_tokens(&map);
            bos = bos.or(map_bos);
            eos = eos.or(map_eos);
        }

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else if let Some(source) = config
            .as_ref()
            .map(template_from_config)
            .transpose()?
            .flatten()
        {
            Some(source)
        } else if let Some(json) = read_json_if_exists(&dir.join("chat_template.json"))? {
            template_from_config(&json)?
        } else {
            None
        };
        match source {
            Some(source) => Self::new(&source, bos.as_deref(), eos.as_deref())
                .map(|t| Some(t.with_origin(&format!("the chat template of {}", dir.display())))),
            None => Ok(None),
        }
    }

    /// Renders the conversation (the system message first, if any), appending the assistant
    /// header when `add_generation_prompt` is set. Errors carry the template's own message when
    /// it calls `raise_exception` (a Gemma 2 template given a system message, a Mistral template
    /// given two user messages in a row).
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::ChatTemplate("the conversation is empty".to_owned()));
        }
        let mut ctx = BTreeMap::<&str, Value>::new();
        let messages = if self.tools_in_system_message()
            || (!self.reads_tool_calls() && messages.iter().any(|m| m.tool_calls.is_some()))
            || (self.reads_tool_responses() && messages.iter().any(|m| m.role == "tool"))
        {
            crate::llm::template_bounds::Messages::value(&self.adapt_tool_messages(messages))
        } else {
            crate::llm::template_bounds::Messages::value(messages)
        };
        ctx.insert("messages", messages);
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert(
            "tools",
            self.tools
                .as_deref()
                .map_or_else(|| Value::from(()), Value::from_serialize),
        );
        ctx.insert("documents", Value::from(()));
        if let Some(bos) = &self.inner.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.inner.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .inner
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let mut out = Capped::default();
        match template.render_captured_to(Value::from(ctx), &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| {
                Error::ChatTemplate(format!("{} rendered invalid UTF-8", self.origin))
            }),
            Err(_) if out.over => Err(Error::ChatTemplate(format!(
                "{} was stopped: it rendered more than {} MiB",
                self.origin,
                MAX_RENDERED_BYTES >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::ChatTemplate(format!(
                "{} was stopped: it ran more than {TEMPLATE_FUEL} steps (a runaway loop?)",
                self.origin
            ))),
            Err(e) if let Some(why) = too_large(&e) => Err(Error::ChatTemplate(format!(
                "{} was stopped: {why}",
                self.origin
            ))),
            Err(e) => Err(render_error(&e)),
        }
    }

    /// The template's Jinja text, as given.
    /// The same template rendering with `tools` (a list of `{"type": "function", "function":
    /// {"name", "description", "parameters"}}`) offered to the model.
    #[must_use]
    pub fn with_tools(&self, tools: serde_json::Value) -> Self {
        Self {
            tools: Some(Arc::new(tools)),
            ..self.clone()
        }
    }

    /// Whether tools are offered ([`Self::with_tools`]).
    pub fn offers_tools(&self) -> bool {
        self.tools.is_some()
    }

    /// Whether the template renders a list of tools (it reads `tools`).
    pub fn takes_tools(&self) -> bool {
        self.inner.source.contains("tools")
    }

    /// Whether the template reads the tool list from the system message (`message['tools']`,
    /// a JSON text), as Phi-4-mini's does, instead of from the `tools` variable.
    fn tools_in_system_message(&self) -> bool {
        let s = &self.inner.source;
        s.contains("message['tools']") || s.contains("message.tools")
    }

    /// Whether the template renders an assistant's `tool_calls`.
    fn reads_tool_calls(&self) -> bool {
        self.inner.source.contains("tool_calls")
    }

    /// Whether the template takes tool results as `tool_responses` on the message that made
    /// the calls (Gemma 4) rather than as `role: "tool"` messages.
    fn reads_tool_responses(&self) -> bool {
        self.inner.source.contains("tool_responses")
    }

    /// The conversation adapted to a template that does not read tools the transformers way:
    /// - a template reading `message['tools']` gets the offered functions on the system
    ///   message, as the JSON text Phi-4-mini's model card shows (`json.dumps` of
    ///   `[{"name", "description", "parameters"}]`); without a system message, one with the
    ///   card's prompt "You are a helpful assistant with some tools." is put first;
    /// - an assistant's calls, which such a template would drop, are written into its content
    ///   the way the model writes them ([`ToolSyntax::write_calls`]);
    /// - a template reading `tool_responses` (Gemma 4) gets each `role: "tool"` result that
    ///   follows a message with calls on that message instead, as `{"name": the call's
    ///   function, "response": the result (an object when it is a JSON object, else text)}`.
    ///
    /// [`ToolSyntax::write_calls`]: crate::llm::tools::ToolSyntax::write_calls
    fn adapt_tool_messages(&self, messages: &[TemplateMessage]) -> Vec<serde_json::Value> {
        let syntax = crate::llm::tools::ToolSyntax::of_template(&self.inner.source);
        let mut out: Vec<serde_json::Value> = Vec::with_capacity(messages.len() + 1);
        for m in messages {
            if self.reads_tool_responses()
                && m.role == "tool"
                && let Some(caller) = out.last_mut().filter(|last| {
                    last.get("tool_calls")
                        .is_some_and(serde_json::Value::is_array)
                })
            {
                let answered = caller
                    .get("tool_responses")
                    .and_then(serde_json::Value::as_array)
                    .map_or(0, Vec::len);
                let calls = caller["tool_calls"].as_array().cloned().unwrap_or_default();
                let call = m
                    .tool_call_id
                    .and_then(|id| {
                        calls
                            .iter()
                            .find(|c| c.get("id").and_then(|v| v.as_str()) == Some(id))
                    })
                    .or_else(|| calls.get(answered));
                let name = call
                    .and_then(|c| c.pointer("/function/name"))
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                let response = match serde_json::from_str::<serde_json::Value>(m.content) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    _ => m.content.into(),
                };
                let entry = serde_json::json!({"name": name, "response": response});
                match caller
                    .get_mut("tool_responses")
                    .and_then(serde_json::Value::as_array_mut)
                {
                    Some(list) => list.push(entry),
                    None => caller["tool_responses"] = serde_json::Value::Array(vec![entry]),
                }
                continue;
            }
            out.push({
                let mut v = serde_json::to_value(m).unwrap_or_default();
                if !self.reads_tool_calls()
                    && let Some(calls) = m.tool_calls.and_then(serde_json::Value::as_array)
                {
                    let calls: Vec<(&str, &serde_json::Value)> = calls
                        .iter()
                        .filter_map(|c| {
                            let f = c.get("function")?;
                            Some((f.get("name")?.as_str()?, f.get("arguments")?))
                        })
                        .collect();
                    v["content"] = format!("{}{}", m.content, syntax.write_calls(&calls)).into();
                }
                v
            });
        }
        if self.tools_in_system_message()
            && let Some(tools) = self.tools.as_deref().and_then(serde_json::Value::as_array)
        {
            let functions: Vec<serde_json::Value> = tools
                .iter()
                .map(|t| t.get("function").cloned().unwrap_or_else(|| t.clone()))
                .collect();
            let text = python_json(&serde_json::Value::Array(functions), true);
            if out.first().and_then(|m| m.get("role")) != Some(&"system".into()) {
                out.insert(
                    0,
                    serde_json::json!({"role": "system", "content": DEFAULT_TOOLS_SYSTEM_PROMPT}),
                );
            }
            out[0]["tools"] = text.into();
        }
        out
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The string the template sees as `bos_token`; `None` when undefined.
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    /// The string the template sees as `eos_token`; `None` when undefined.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// A short human name guessed from the template text, for the UI: "ChatML", "Llama 3",
    /// "Phi-3", "Gemma", "Gemma 4", "Mistral", "Llama 2", "Zephyr", else "custom".
    pub fn family_name(&self) -> &'static str {
        family_of(&self.inner.source)
    }
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags as `{% if true %}` /
/// `{% endif %}`: both are block tags, so whitespace control (`-`, trim_blocks, lstrip_blocks)
/// treats them alike, and the body renders unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        out.push_str("{%");
        let mut tail = &tag[2..];
        if let Some(t) = tail.strip_prefix(['-', '+']) {
            out.push_str(&tail[..1]);
            tail = t;
        }
        let trimmed = tail.trim_start();
        out.push_str(&tail[..tail.len() - trimmed.len()]);
        tail = trimmed;
        let word_end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let word = &tail[..word_end];
        let after = tail[word_end..].trim_start();
        let closes =
            after.starts_with("%}") || after.starts_with("-%}") || after.starts_with("+%}");
        match word {
            "generation" if closes => out.push_str("if true"),
            "endgeneration" if closes => out.push_str("endif"),
            _ => out.push_str(word),
        }
        rest = &tail[word_end..];
    }
    out.push_str(rest);
    out
}

/// The family name of a template text; see [`ChatTemplate::family_name`].
pub fn family_of(source: &str) -> &'static str {
    let has = |s: &str| source.contains(s);
    if has("<|im_start|>") {
        "ChatML"
    } else if has("<|start_header_id|>") {
        "Llama 3"
    } else if has("<start_of_turn>") {
        "Gemma"
    } else if has("<|turn>") {
        "Gemma 4"
    } else if has("<|assistant|>") && has("<|end|>") {
        "Phi-3"
    } else if has("<|assistant|>") {
        "Zephyr"
    } else if has("<<SYS>>") {
        "Llama 2"
    } else if has("[INST]") {
        "Mistral"
    } else {
        "custom"
    }
}

// ---------------------------------------------------------------------------------------------
// Reading tokenizer_config.json

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: does not parse as JSON: {e}", path.display())))
}

/// The `chat_template` of a tokenizer config (or of a `chat_template.json`).
fn template_from_config(json: &serde_json::Value) -> Result<Option<String>> {
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
        Some(serde_json::Value::Array(named)) => {
            let mut names = Vec::new();
            for entry in named {
                let name = entry.get("name").and_then(serde_json::Value::as_str);
                let template = entry.get("template").and_then(serde_json::Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(name), Some(_)) => names.push(name),
                    _ => {
                        return Err(Error::ChatTemplate(
                            "`chat_template` list entries need `name` and `template` strings"
                                .to_owned(),
                        ));
                    }
                }
            }
            if names.is_empty() {
                Ok(None)
            } else {
                Err(Error::ChatTemplate(format!(
                    "the model has several chat templates ({}) and none is named `default`",
                    names.join(", ")
                )))
            }
        }
        Some(other) => Err(Error::ChatTemplate(format!(
            "`chat_template` should be a string or a list, not {other}"
        ))),
    }
}

/// `bos_token` and `eos_token`: strings, or `{"content": …}` objects (`AddedToken`s).
fn special_tokens(json: &serde_json::Value) -> (Option<String>, Option<String>) {
    let token = |key: &str| match json.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    };
    (token("bos_token"), token("eos_token"))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Marks an error raised by the template itself through `raise_exception`.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// The rendered prompt, refusing to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.over = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The reason, when `template_bounds` stopped the rendering.
fn too_large(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<crate::llm::template_bounds::TooLarge>() {
            return Some(t.0.clone());
        }
        source = err.source();
    }
    None
}

fn render_error(e: &minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<RaisedByTemplate>() {
            return Error::ChatTemplate(raised.to_string());
        }
        source = err.source();
    }
    Error::ChatTemplate(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Printing values as Python's str() does

fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            python_repr(&mut text, value, false)?;
            out.write_str(&text).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `str(value)` (`quoted == false`) or `repr(value)` (`quoted == true`) in Python.
fn python_repr(
    out: &mut String,
    value: &Value,
    quoted: bool,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.push_str(&match python_float_repr(f).as_str() {
                "NaN" => "nan".to_owned(),
                "Infinity" => "inf".to_owned(),
                "-Infinity" => "-inf".to_owned(),
                repr => repr.to_owned(),
            });
        }
        ValueKind::String if quoted => python_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &item, true)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &key, true)?;
                out.push_str(": ");
                python_repr(out, &value.get_item(&key)?, true)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

fn python_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

// ---------------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)

fn tojson(value: &Value, args: Rest<Value>) -> std::result::Result<Value, minijinja::Error> {
    let mut positional: Vec<Value> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => {
            let last = positional.pop().unwrap_or_default();
            Some(Kwargs::try_from(last)?)
        }
        _ => None,
    };
    let bad =
        |what: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    if positional.len() > 4 {
        return Err(bad("too many arguments"));
    }
    // Python's signature: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let mut opts: [Option<Value>; 4] = Default::default();
    for (slot, value) in opts.iter_mut().zip(positional) {
        *slot = Some(value);
    }
    if let Some(kwargs) = &kwargs {
        for (slot, name) in opts.iter_mut().zip(names) {
            if kwargs.has(name) {
                if slot.is_some() {
                    return Err(bad(&format!("`{name}` given twice")));
                }
                *slot = Some(kwargs.get::<Value>(name)?);
            }
        }
        kwargs.assert_all_used()?;
    }
    // `None` (or an undefined value) means the argument's default, as in Python.
    let [ensure_ascii, indent, separators, sort_keys] =
        opts.map(|v| v.filter(|v| !v.is_none() && !v.is_undefined()));

    let indent = match &indent {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) if v.kind() == ValueKind::Bool => {
            Some(if v.is_true() { " " } else { "" }.to_owned())
        }
        Some(v) => {
            let n = v
                .as_i64()
                .ok_or_else(|| bad("`indent` should be a number or a string"))?;
            Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
        }
    };
    let (item_sep, key_sep) = match &separators {
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_owned(),
                    b.as_str().unwrap_or_default().to_owned(),
                ),
                _ => return Err(bad("`separators` should be two strings")),
            }
        }
    };
    let opts = JsonOptions {
        ensure_ascii: ensure_ascii.as_ref().is_some_and(Value::is_true),
        sort_keys: sort_keys.as_ref().is_some_and(Value::is_true),
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

/// `value` as Python's `json.dumps(value, ensure_ascii=…)` writes it (`", "` and `": "`
/// separators, keys in their order).
pub(crate) fn python_json(value: &serde_json::Value, ensure_ascii: bool) -> String {
    let opts = JsonOptions {
        ensure_ascii,
        sort_keys: false,
        indent: None,
        item_sep: ", ".to_owned(),
        key_sep: ": ".to_owned(),
    };
    let mut out = String::new();
    // A JSON value always serializes.
    let _ = write_json(&mut out, &Value::from_serialize(value), &opts, 0);
    out
}

struct JsonOptions {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOptions,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_json_number(out, value),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii);
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), opts, depth, |out, i| {
                write_json_string(out, &entries[i].0, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, &entries[i].1, opts, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), opts, depth, |out, i| {
                write_json(out, &items[i], opts, depth + 1)
            })?;
        }
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "tojson: the value is undefined",
            ));
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of type {}", value.kind()),
            ));
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    opts: &JsonOptions,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        newline(out, depth + 1);
        item(out, i)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// Dict keys as Python's json module converts them.
fn json_key(key: &Value) -> std::result::Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            write_json_number(&mut s, key);
            s
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be strings, numbers, booleans or none, not {kind}"),
            ));
        }
    })
}

fn write_json_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        // Display of an integer value is its decimal digits (also for i128/u128).
        let _ = write!(out, "{value}");
    } else {
        let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        out.push_str(&python_float_repr(f));
    }
}

/// `repr(float)` in Python 3: the shortest round-tripping digits, positional for exponents in
/// -4..16, scientific (`1e+16`, `1.5e-07`) outside.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_owned();
    }
    // `{:e}` gives the shortest round-tripping digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let mut s = String::from(sign);
        if point <= 0 {
            s.push_str("0.");
            s.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
            s.push_str(&digits);
        } else {
            let point = point as usize;
            if digits.len() <= point {
                s.push_str(&digits);
                s.extend(std::iter::repeat_n('0', point - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..point]);
                s.push('.');
                s.push_str(&digits[point..]);
            }
        }
        s
    } else {
        let mut s = String::from(sign);
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(
            s,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
        s
    }
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now

#[derive(Debug, Clone, Copy)]
enum Clock {
    System,
    Fixed(DateTime),
}

impl Clock {
    fn now(self) -> DateTime {
        match self {
            Clock::Fixed(t) => t,
            Clock::System => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                DateTime::from_unix(secs as i64)
            }
        }
    }
}

/// A civil date and time (proleptic Gregorian calendar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl DateTime {
    fn midnight(year: i32, month: u32, day: u32) -> Self {
        Self {
            year,
            month,
            day,
            hour: 0,
            minute: 0,
            second: 0,
        }
    }

    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }

    /// 0 = Monday … 6 = Sunday.
    fn weekday(&self) -> usize {
        // 1970-01-01 was a Thursday (3).
        (days_from_civil(self.year, self.month, self.day) + 3).rem_euclid(7) as usize
    }

    fn day_of_year(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) - days_from_civil(self.year, 1, 1) + 1
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A small `strftime` in the C locale: `%a %A %b %B %d %e %H %I %j %m %M %p %S %y %Y %%`, with
/// glibc's `%-d`-style unpadded forms; other directives are kept as written (as glibc does).
fn strftime(format: &str, t: &DateTime) -> String {
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{n}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        let month_name = MONTHS[(t.month.clamp(1, 12) - 1) as usize];
        let weekday_name = WEEKDAYS[t.weekday()];
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match spec {
            'a' => out.push_str(&weekday_name[..3]),
            'A' => out.push_str(weekday_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'B' => out.push_str(month_name),
            'd' => num(&mut out, i64::from(t.day), 2),
            'e' => {
                if unpadded {
                    num(&mut out, i64::from(t.day), 0);
                } else {
                    let _ = write!(out, "{:>2}", t.day);
                }
            }
            'H' => num(&mut out, i64::from(t.hour), 2),
            'I' => num(&mut out, i64::from(hour12), 2),
            'j' => num(&mut out, t.day_of_year(), 3),
            'm' => num(&mut out, i64::from(t.month), 2),
            'M' => num(&mut out, i64::from(t.minute), 2),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'S' => num(&mut out, i64::from(t.second), 2),
            'y' => num(&mut out, i64::from(t.year.rem_euclid(100)), 2),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            rewrite_generation_tags(
                "a{%- generation -%}b{% endgeneration %}c{%generation%}{%+ endgeneration+%}"
            ),
            "a{%- if true -%}b{% endif %}c{%if true%}{%+ endif+%}"
        );
        let untouched =
            "{% if x %}{{ '{%' }}{% generations %}{% set generation = 1 %}{% endif %}{%";
        assert_eq!(rewrite_generation_tags(untouched), untouched);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1_000_000_i64, -1, 0, 1, 19_930, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 7, 26), 19_930);
        assert_eq!(DateTime::midnight(2024, 7, 26).weekday(), 4); // a Friday
    }

    #[test]
    fn strftime_formats_like_python() {
        let t = DateTime {
            year: 2024,
            month: 7,
            day: 6,
            hour: 13,
            minute: 5,
            second: 9,
        };
        assert_eq!(strftime("%d %b %Y", &t), "06 Jul 2024");
        assert_eq!(
            strftime("%B %-d, %Y %H:%M:%S %p %I", &t),
            "July 6, 2024 13:05:09 PM 01"
        );
        assert_eq!(
            strftime("%a %A %j %y %m %e %% %Q", &t),
            "Sat Saturday 188 24 07  6 % %Q"
        );
        assert_eq!(
            DateTime::from_unix(1_721_952_000 + 3661),
            DateTime {
                year: 2024,
                month: 7,
                day: 26,
                hour: 1,
                minute: 1,
                second: 1
            }
        );
    }

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (123_456_789.0, "123456789.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1e15, "1000000000000000.0"),
            (-0.0, "-0.0"),
        ];
        for (f, repr) in cases {
            assert_eq!(python_float_repr(f), repr, "{f}");
        }
    }
}
