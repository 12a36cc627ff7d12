//! The OpenAI request JSON read into Studio's terms (endpoint, prompt or messages, sampling
//! parameters, streaming) with every field checked, and the response JSON written back
//! (finish reasons, usage, and the chunk and completion shapes of each endpoint).

use std::time::SystemTime;

use anyhow::Result;
use serde_json::{Map, Value, json};
use studio_inference::llm::chat::ChatMessage;
use studio_inference::llm::generate::{FinishReason, GenerationStats};
use studio_inference::llm::sampling::SamplingParams;

use super::DEFAULT_MAX_TOKENS;
use super::transport::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Completions,
}

/// A validated generation request.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) prompt: Prompt,
    pub(super) params: SamplingParams,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
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

pub(super) fn parse_request(
    endpoint: Endpoint,
    body: &Value,
    context: usize,
) -> Result<Job, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
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
    if let Some(n) = integer(body, "n")?
        && n != 1
    {
        return Err(ApiError::param("n", "only `n` = 1 is supported"));
    }
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
    p.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Job {
        prompt,
        params: p,
        stream,
        include_usage,
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
            "assistant" => turns.push(ChatMessage::assistant(content)),
            other => {
                return Err(ApiError::param(
                    "messages",
                    format!(
                        "messages[{i}].role `{other}` is not supported \
                         (use system, user or assistant)"
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

pub(super) fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::EndOfText | FinishReason::StopString | FinishReason::Cancelled => "stop",
    }
}

pub(super) fn usage_json(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    })
}

/// What one chunk or answer looks like for an endpoint.
pub(super) struct Shape {
    pub(super) endpoint: Endpoint,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
}

impl Shape {
    pub(super) fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (Some(t), _) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                    (None, Some(_)) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
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

    pub(super) fn usage_chunk(&self, stats: &GenerationStats) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(stats),
        })
    }

    pub(super) fn answer(&self, text: &str, stats: &GenerationStats) -> Value {
        let finish = finish_reason(stats.finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(stats),
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
