//! The OpenAI request JSON read into Studio's terms (endpoint, prompt or messages, sampling
//! parameters, `n`, log-probabilities, streaming) with every field checked, and the response
//! JSON written back (finish reasons, usage, log-probabilities, and the chunk and completion
//! shapes of each endpoint).
//!
//! Structured output (`response_format` `json_object` / `json_schema`, llama.cpp's `grammar`
//! and `json_schema`) becomes a grammar the sampler keeps to; `tools` are read in
//! `serve::tools`. Nothing a client sends is accepted and ignored: the fields OpenAI defines
//! that Studio does not do (legacy `functions`, audio, `prediction`, …) are refused with a 400
//! naming the field ([`UNSUPPORTED`]).

use std::time::SystemTime;

use anyhow::Result;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use studio_inference::llm::chat::{ChatMessage, Role, ToolCall};

use studio_inference::llm::generate::{FinishReason, GenerationStats};
use studio_inference::llm::grammar::Grammar;
use studio_inference::llm::grammar::schema::{json_object_gbnf, json_schema_to_gbnf};
use studio_inference::llm::logprobs::{MAX_TOP_LOGPROBS, TokenLogprobs};
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::Tokenizer;

use super::DEFAULT_MAX_TOKENS;
use super::transport::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Completions,
}

/// The most choices one request may ask for (`n`).
pub(super) const MAX_CHOICES: usize = 16;
/// The most `logit_bias` entries accepted.
const MAX_LOGIT_BIAS: usize = 1024;
/// The most top log-probabilities the legacy completions endpoint reports (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: i64 = 5;

/// Request fields OpenAI defines that Studio does not do yet, with why: refused with a 400
/// naming the field unless absent, null, or the value that means "off".
pub(super) const UNSUPPORTED: [(&str, &str); 8] = [
    (
        "functions",
        "the legacy `functions` are not supported; use `tools`",
    ),
    (
        "function_call",
        "the legacy `function_call` is not supported; use `tool_choice`",
    ),
    ("audio", "this server takes and makes text only"),
    ("modalities", "this server makes text only"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "this server does not search the web"),
    (
        "reasoning_effort",
        "reasoning effort is not a setting of this server's models",
    ),
    (
        "suffix",
        "`suffix` (insertion) is not supported; use POST /v1/completions without it",
    ),
];

/// A validated generation request.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) prompt: Prompt,
    pub(super) params: SamplingParams,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Choices to generate (`n`), each with the seed after the previous one's.
    pub(super) n: usize,
    /// Log-probabilities asked for, with this many alternatives per token.
    pub(super) logprobs: Option<usize>,
    /// The grammar every reply keeps to (structured output, or a required tool call).
    pub(super) grammar: Option<Arc<Grammar>>,
    /// The tools offered (chat only).
    pub(super) tools: Option<super::tools::Tools>,
}

#[derive(Debug)]
pub(super) enum Prompt {
    Chat {
        system: String,
        messages: Vec<ChatMessage>,
    },
    Text(String),
}

/// A field that may be absent or null.
pub(super) fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

pub(super) fn number(
    body: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<f32>, ApiError> {
    field(body, name)
        .map(|v| {
            v.as_f64()
                .map(|n| n as f32)
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be a number")))
        })
        .transpose()
}

pub(super) fn integer(
    body: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, ApiError> {
    field(body, name)
        .map(|v| {
            v.as_i64()
                .or_else(|| v.as_u64().map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be an integer")))
        })
        .transpose()
}

pub(super) fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(SystemTime::now())
}

/// Whether `value` is what an unsupported field's "off" looks like.
fn is_off(name: &str, value: &Value) -> bool {
    match (name, value) {
        (_, Value::Null) => true,
        ("functions", Value::Array(a)) => a.is_empty(),
        ("function_call", Value::String(s)) => s == "none",
        ("modalities", Value::Array(a)) => a.iter().all(|m| m.as_str() == Some("text")),
        ("suffix", Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

/// `logit_bias`: `{"token id": bias}`, ids in the vocabulary, biases in `[-100, 100]`.
fn parse_logit_bias(value: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |why: String| ApiError::param("logit_bias", why);
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Some(map) = value.as_object() else {
        return Err(bad(
            "`logit_bias` must be an object of token ids to biases".into()
        ));
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!(
            "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}",
            map.len()
        )));
    }
    map.iter()
        .map(|(k, v)| {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    bad(format!(
                        "`logit_bias` key `{k}` is not a token id of this model (0 to {})",
                        vocab.saturating_sub(1)
                    ))
                })?;
            let bias = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| bad(format!("`logit_bias[{k}]` must be a number in [-100, 100]")))?;
            #[allow(clippy::cast_possible_truncation)]
            Ok((id, bias as f32))
        })
        .collect()
}

/// `logprobs` and `top_logprobs` as each endpoint takes them: the number of alternatives per
/// token when log-probabilities are asked for.
fn parse_logprobs(
    endpoint: Endpoint,
    body: &Map<String, Value>,
) -> Result<Option<usize>, ApiError> {
    match endpoint {
        Endpoint::Chat => {
            let on = match field(body, "logprobs") {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::param("logprobs", "`logprobs` must be true or false")
                })?,
            };
            let top = integer(body, "top_logprobs")?;
            match (on, top) {
                (false, Some(_)) => Err(ApiError::param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs`: true",
                )),
                (false, None) => Ok(None),
                (true, None) => Ok(Some(0)),
                (true, Some(k)) => usize::try_from(k)
                    .ok()
                    .filter(|&k| k <= MAX_TOP_LOGPROBS)
                    .map(Some)
                    .ok_or_else(|| {
                        ApiError::param(
                            "top_logprobs",
                            format!("`top_logprobs` must be 0 to {MAX_TOP_LOGPROBS}"),
                        )
                    }),
            }
        }
        Endpoint::Completions => match integer(body, "logprobs")? {
            None => Ok(None),
            Some(k) if (0..=MAX_COMPLETION_LOGPROBS).contains(&k) => {
                Ok(Some(usize::try_from(k).unwrap_or(0)))
            }
            Some(_) => Err(ApiError::param(
                "logprobs",
                format!("`logprobs` must be 0 to {MAX_COMPLETION_LOGPROBS}"),
            )),
        },
    }
}

/// The grammar a request's structured-output fields ask for: `response_format`
/// (`json_object`, or `json_schema` with its `schema`), llama.cpp's `json_schema` (a schema)
/// and `grammar` (GBNF); at most one of them.
fn parse_grammar(body: &Map<String, Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let schema_grammar = |param: &'static str, schema: &Value| -> Result<String, ApiError> {
        json_schema_to_gbnf(schema)
            .map_err(|e| ApiError::param(param, format!("the JSON schema can't be enforced: {e}")))
    };
    let mut asked: Vec<(&'static str, String)> = Vec::new();
    if let Some(rf) = field(body, "response_format") {
        let kind = rf.get("type").and_then(Value::as_str);
        match kind {
            Some("text") => {}
            Some("json_object") => asked.push(("response_format", json_object_gbnf())),
            Some("json_schema") => {
                let spec = rf.get("json_schema").ok_or_else(|| {
                    ApiError::param(
                        "response_format",
                        "`response_format.json_schema` is required for type json_schema",
                    )
                })?;
                let schema = spec.get("schema").unwrap_or(&Value::Bool(true));
                asked.push((
                    "response_format",
                    schema_grammar("response_format", schema)?,
                ));
            }
            _ => {
                return Err(ApiError::param(
                    "response_format",
                    "`response_format.type` must be text, json_object or json_schema",
                ));
            }
        }
    }
    if let Some(schema) = field(body, "json_schema") {
        asked.push(("json_schema", schema_grammar("json_schema", schema)?));
    }
    if let Some(g) = field(body, "grammar") {
        let g = g
            .as_str()
            .ok_or_else(|| ApiError::param("grammar", "`grammar` must be a GBNF string"))?;
        asked.push(("grammar", g.to_owned()));
    }
    match asked.len() {
        0 => Ok(None),
        1 => {
            let (param, gbnf) = asked.remove(0);
            Grammar::parse(&gbnf)
                .map(|g| Some(Arc::new(g)))
                .map_err(|e| ApiError::param(param, e.to_string()))
        }
        _ => Err(ApiError::param(
            asked[1].0,
            format!(
                "give one of `response_format`, `json_schema` and `grammar`, not `{}` and `{}`",
                asked[0].0, asked[1].0
            ),
        )),
    }
}

/// Reads a request for `endpoint` against a model of `context` tokens and `vocab` token ids.
pub(super) fn parse_request(
    endpoint: Endpoint,
    body: &Value,
    context: usize,
    vocab: usize,
) -> Result<Job, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    for (name, why) in UNSUPPORTED {
        if let Some(v) = body.get(name)
            && !is_off(name, v)
        {
            return Err(ApiError::param(name, format!("`{name}`: {why}")));
        }
    }
    if endpoint == Endpoint::Completions {
        if field(body, "echo").is_some_and(|v| v != &Value::Bool(false)) {
            return Err(ApiError::param("echo", "`echo` is not supported"));
        }
        if let Some(b) = integer(body, "best_of")?
            && b != 1
        {
            return Err(ApiError::param(
                "best_of",
                "only `best_of` = 1 is supported",
            ));
        }
    }
    let prompt = match endpoint {
        Endpoint::Chat => parse_messages(field(body, "messages"))?,
        Endpoint::Completions => Prompt::Text(parse_prompt(field(body, "prompt"))?),
    };
    let stream = match field(body, "stream") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::param("stream", "`stream` must be true or false"))?,
    };
    let include_usage = match field(body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::param(
                    "stream_options",
                    "`stream_options.include_usage` must be true or false",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    let n = match integer(body, "n")? {
        None => 1,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| ApiError::param("n", format!("`n` must be 1 to {MAX_CHOICES}")))?,
    };
    let logprobs = parse_logprobs(endpoint, body)?;
    let mut p = SamplingParams {
        repeat_penalty: 1.0,
        seed: random_seed(),
        max_new_tokens: DEFAULT_MAX_TOKENS.min(context),
        ..SamplingParams::default()
    };
    if let Some(t) = number(body, "temperature")? {
        p.temperature = t;
    }
    if let Some(t) = number(body, "top_p")? {
        p.top_p = t;
    }
    if let Some(m) = number(body, "min_p")? {
        p.min_p = m;
    }
    for name in ["repeat_penalty", "repetition_penalty"] {
        if let Some(r) = number(body, name)? {
            p.repeat_penalty = r;
        }
    }
    if let Some(k) = integer(body, "top_k")? {
        // vLLM and llama.cpp use -1 / 0 for "off".
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(n) = integer(body, "repeat_last_n")? {
        p.repeat_last_n = usize::try_from(n).unwrap_or(0);
    }
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = integer(body, name)? {
            p.max_new_tokens = usize::try_from(n)
                .map_err(|_| ApiError::param(name, format!("`{name}` must be at least 1")))?;
        }
    }
    if let Some(s) = integer(body, "seed")? {
        // A negative seed (llama.cpp's -1) asks for a random one.
        if let Ok(s) = u64::try_from(s) {
            p.seed = s;
        }
    }
    p.stop = match field(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::param("stop", "`stop` must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or a list of strings",
            ));
        }
    };
    p.stop.retain(|s| !s.is_empty());
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = number(body, name)? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::param(
                    name,
                    format!("`{name}` must be in [-2, 2]"),
                ));
            }
            if name == "presence_penalty" {
                p.presence_penalty = v;
            } else {
                p.frequency_penalty = v;
            }
        }
    }
    p.logit_bias = parse_logit_bias(field(body, "logit_bias"), vocab)?;
    let mut grammar = parse_grammar(body)?;
    let tools = match endpoint {
        Endpoint::Chat => super::tools::parse_tools(body)?,
        Endpoint::Completions => {
            if field(body, "tools").is_some_and(|t| t.as_array().is_none_or(|l| !l.is_empty())) {
                return Err(ApiError::param(
                    "tools",
                    "tools are offered through POST /v1/chat/completions",
                ));
            }
            None
        }
    };
    if let Some(g) = tools
        .as_ref()
        .map(super::tools::Tools::grammar)
        .transpose()?
        .flatten()
    {
        if grammar.is_some() {
            return Err(ApiError::param(
                "tool_choice",
                "a required tool call and structured output can't be asked for together",
            ));
        }
        grammar = Some(g);
    }
    p.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Job {
        prompt,
        params: p,
        stream,
        include_usage,
        n,
        logprobs,
        grammar,
        tools,
    })
}

pub(super) fn parse_prompt(prompt: Option<&Value>) -> Result<String, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string (or a list of one string)",
        )
    };
    match prompt {
        None => Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 => a[0].as_str().map(str::to_owned).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// The text of a message's `content`: a string, null, or a list of `{"type": "text"}` parts.
pub(super) fn content_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::param("messages", format!("messages[{i}].content {why}"));
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some(kind @ ("image_url" | "input_audio" | "file")), _) => {
                        return Err(bad(&format!(
                            "has a `{kind}` part; this server takes text only"
                        )));
                    }
                    _ => return Err(bad("parts must be {\"type\": \"text\", \"text\": …}")),
                }
            }
            Ok(text)
        }
        Some(_) => Err(bad("must be a string or a list of text parts")),
    }
}

pub(super) fn parse_messages(messages: Option<&Value>) -> Result<Prompt, ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::param(
            "messages",
            "`messages` is required: a list of {\"role\", \"content\"} objects",
        ));
    };
    let Some(list) = messages.as_array() else {
        return Err(ApiError::param(
            "messages",
            "`messages` must be a list of {\"role\", \"content\"} objects",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(ApiError::param(
                "messages",
                format!("messages[{i}] must be an object with `role` and `content`"),
            ));
        };
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::param("messages", format!("messages[{i}].role must be a string"))
        })?;
        let content = content_text(i, m.get("content"))?;
        match role {
            "system" | "developer" => system.push(content),
            "user" => turns.push(ChatMessage::user(content)),
            "assistant" => {
                let mut msg = ChatMessage::assistant(content);
                msg.tool_calls = parse_message_calls(i, m.get("tool_calls"))?;
                turns.push(msg);
            }
            "tool" => {
                let mut msg = ChatMessage::new(Role::Tool, content);
                msg.tool_call_id = Some(
                    m.get("tool_call_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            ApiError::param(
                                "messages",
                                format!("messages[{i}] (a tool's result) needs `tool_call_id`"),
                            )
                        })?
                        .to_owned(),
                );
                turns.push(msg);
            }
            other => {
                return Err(ApiError::param(
                    "messages",
                    format!(
                        "messages[{i}].role `{other}` is not supported \
                         (use system, user, assistant or tool)"
                    ),
                ));
            }
        }
    }
    if turns.is_empty() {
        return Err(ApiError::param(
            "messages",
            "`messages` needs at least one user message",
        ));
    }
    Ok(Prompt::Chat {
        system: system.join("\n\n"),
        messages: turns,
    })
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`, the arguments a JSON string (or object).
fn parse_message_calls(i: usize, calls: Option<&Value>) -> Result<Vec<ToolCall>, ApiError> {
    let bad = |why: &str| ApiError::param("messages", format!("messages[{i}].tool_calls {why}"));
    let list = match calls {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(bad("must be a list")),
    };
    list.iter()
        .map(|c| {
            let f = c.get("function").ok_or_else(|| bad("need `function`"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("need a function `name`"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ Value::Object(_)) => v.to_string(),
                None | Some(Value::Null) => "{}".to_owned(),
                Some(_) => return Err(bad("`arguments` must be a JSON string")),
            };
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

pub(super) fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::EndOfText | FinishReason::StopString | FinishReason::Cancelled => "stop",
    }
}

/// The usage of choices that shared one prompt (counted once).
pub(super) fn usage_json(stats: &[GenerationStats]) -> Value {
    let prompt = stats.first().map_or(0, |s| s.prompt_tokens);
    let completion: usize = stats.iter().map(|s| s.generated_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Log-probabilities of generated tokens in the JSON of one endpoint.
pub(super) struct LogprobWriter<'a> {
    pub(super) endpoint: Endpoint,
    pub(super) tokenizer: &'a Tokenizer,
    /// Characters of the completion before the next token (the legacy `text_offset`).
    pub(super) offset: usize,
}

impl LogprobWriter<'_> {
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.tokenizer.token_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// `entries` as the endpoint's `logprobs` object.
    pub(super) fn json(&mut self, entries: &[TokenLogprobs]) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let (token, bytes) = self.token(e.id);
                        let top: Vec<Value> = e
                            .top
                            .iter()
                            .map(|&(id, lp)| {
                                let (token, bytes) = self.token(id);
                                json!({"token": token, "logprob": lp, "bytes": bytes})
                            })
                            .collect();
                        json!({"token": token, "logprob": e.logprob, "bytes": bytes, "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Endpoint::Completions => {
                let mut tokens = Vec::with_capacity(entries.len());
                let mut lps = Vec::with_capacity(entries.len());
                let mut tops = Vec::with_capacity(entries.len());
                let mut offsets = Vec::with_capacity(entries.len());
                for e in entries {
                    let (token, _) = self.token(e.id);
                    offsets.push(self.offset);
                    self.offset += token.chars().count();
                    tokens.push(token);
                    lps.push(e.logprob);
                    let top: Map<String, Value> = e
                        .top
                        .iter()
                        .map(|&(id, lp)| (self.token(id).0, json!(lp)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

/// What one chunk or answer looks like for an endpoint.
pub(super) struct Shape {
    pub(super) endpoint: Endpoint,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
}

/// One streamed piece of a choice.
pub(super) struct Piece<'a> {
    /// Which choice (`n` > 1).
    pub(super) index: usize,
    /// New text; `None` on a chat stream's opening chunk and on the finishing one.
    pub(super) text: Option<&'a str>,
    pub(super) finish: Option<&'a str>,
    /// The `logprobs` object of the tokens in this piece, when asked for.
    pub(super) logprobs: Option<Value>,
    /// Tool-call deltas (`delta.tool_calls`).
    pub(super) tool_calls: Option<Value>,
}

/// One finished choice.
pub(super) struct Choice {
    pub(super) text: String,
    pub(super) stats: GenerationStats,
    pub(super) logprobs: Option<Value>,
    /// The tools it called: `(id, name, arguments)`; its content is then the text before.
    pub(super) tool_calls: Vec<(String, String, String)>,
}

impl Shape {
    pub(super) fn chunk(&self, piece: Piece<'_>) -> Value {
        let Piece {
            index,
            text,
            finish,
            logprobs,
            tool_calls,
        } = piece;
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, finish, tool_calls) {
                    (_, _, Some(calls)) => json!({"tool_calls": calls}),
                    (Some(t), _, None) => json!({"content": t}),
                    (None, None, None) => json!({"role": "assistant", "content": ""}),
                    (None, Some(_), None) => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    pub(super) fn usage_chunk(&self, stats: &[GenerationStats]) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(stats),
        })
    }

    pub(super) fn answer(&self, choices: &[Choice]) -> Value {
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let finish = if c.tool_calls.is_empty() {
                    finish_reason(c.stats.finish)
                } else {
                    "tool_calls"
                };
                let logprobs = c.logprobs.clone().unwrap_or(Value::Null);
                let message = if c.tool_calls.is_empty() {
                    json!({"role": "assistant", "content": c.text})
                } else {
                    let content = if c.text.is_empty() {
                        Value::Null
                    } else {
                        json!(c.text)
                    };
                    json!({"role": "assistant", "content": content,
                        "tool_calls": super::tools::calls_json(&c.tool_calls)})
                };
                match self.endpoint {
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    Endpoint::Completions => json!({
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let stats: Vec<GenerationStats> = choices.iter().map(|c| c.stats.clone()).collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": list,
            "usage": usage_json(&stats),
        })
    }

    pub(super) fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}
