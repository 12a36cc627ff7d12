//! Tool calling as OpenAI clients use it: `tools` and `tool_choice` read and checked, the
//! tools rendered through the model's own chat template, the model's reply read back into
//! `tool_calls` ([`studio_inference::llm::tools`]) and, when a call is required (`required`
//! or a named function), the reply kept to a grammar of the call while sampling.
//!
//! A model whose chat template has no tool section is not given a made-up one: asking it for
//! tools is a 400 that says so.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use studio_inference::llm::chat::ChatFormat;
use studio_inference::llm::grammar::Grammar;
use studio_inference::llm::grammar::schema::json_schema_to_gbnf;
use studio_inference::llm::tools::{CallList, ToolSyntax, call_id, check_tools, parse_tool_calls};

use super::openai::field;
use super::transport::ApiError;

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Choice {
    /// The model may answer or call tools.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this one.
    Named(String),
}

/// The tools a request offers and how they may be used.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    /// The `tools` list as the client sent it (what the template renders).
    pub(super) list: Value,
    /// Each function's name and parameters schema.
    pub(super) functions: Vec<(String, Value)>,
    pub(super) choice: Choice,
}

/// `tools` and `tool_choice` of a chat request; `None` when no tools are offered, or when
/// `tool_choice` is `none` (the model then answers in text, its template not shown them).
pub(super) fn parse_tools(body: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let bad = |m: String| ApiError::param("tools", m);
    let list = match field(body, "tools") {
        None => Vec::new(),
        Some(Value::Array(l)) => l.clone(),
        Some(_) => return Err(bad("`tools` must be a list".into())),
    };
    let functions = check_tools(&list).map_err(bad)?;
    let choice = match field(body, "tool_choice") {
        None => (!functions.is_empty()).then_some(Choice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => (!functions.is_empty()).then_some(Choice::Auto),
            "required" => Some(Choice::Required),
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("`tool_choice` `{other}` is not none, auto, required or a function"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::param(
                        "tool_choice",
                        "`tool_choice` must name a function: {\"type\": \"function\", \
                         \"function\": {\"name\": …}}",
                    )
                })?;
            Some(Choice::Named(name.to_owned()))
        }
        Some(_) => {
            return Err(ApiError::param(
                "tool_choice",
                "`tool_choice` must be none, auto, required or a function",
            ));
        }
    };
    let Some(choice) = choice else {
        return Ok(None);
    };
    if functions.is_empty() {
        return Err(ApiError::param(
            "tool_choice",
            "`tool_choice` asks for a tool call but `tools` lists none",
        ));
    }
    if let Choice::Named(name) = &choice
        && !functions.iter().any(|(n, _)| n == name)
    {
        return Err(ApiError::param(
            "tool_choice",
            format!("`tool_choice` names `{name}`, which is not among the tools"),
        ));
    }
    Ok(Some(Tools {
        list: Value::Array(list),
        functions,
        choice,
    }))
}

impl Tools {
    /// The chat format with the tools shown to the model, and how it writes its calls; a 400
    /// when its template has no tool section.
    pub(super) fn format(&self, chat: &ChatFormat) -> Result<(ChatFormat, ToolSyntax), ApiError> {
        match chat {
            ChatFormat::Template(t) if t.takes_tools() => Ok((
                ChatFormat::Template(t.with_tools(self.list.clone())),
                ToolSyntax::of_template(t.source()),
            )),
            _ => Err(ApiError::param(
                "tools",
                "this model's chat template has no tool section, so it was not trained to \
                 call tools; Studio does not make one up (use a model whose template renders \
                 `tools`, such as Qwen2.5, Qwen3, Llama 3.1, Mistral v0.3, Phi-4-mini or Gemma 4)",
            )),
        }
    }

    /// The grammar a required call keeps to: `{"name": …, "arguments": {…}}` for one of the
    /// functions (or the named one), the arguments fitting its parameters schema.
    pub(super) fn grammar(&self) -> Result<Option<Arc<Grammar>>, ApiError> {
        let allowed: Vec<&(String, Value)> = match &self.choice {
            Choice::Auto => return Ok(None),
            Choice::Required => self.functions.iter().collect(),
            Choice::Named(n) => self.functions.iter().filter(|(f, _)| f == n).collect(),
        };
        let options: Vec<Value> = allowed
            .iter()
            .map(|(name, params)| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"],
                })
            })
            .collect();
        let schema = json!({"anyOf": options});
        let gbnf = json_schema_to_gbnf(&schema).map_err(|e| {
            ApiError::param(
                "tools",
                format!("a required call's parameters can't be enforced: {e}"),
            )
        })?;
        Grammar::parse(&gbnf)
            .map(|g| Some(Arc::new(g)))
            .map_err(|e| ApiError::param("tools", e.to_string()))
    }

    /// How this request's replies write a call: the template's way, or the bare JSON object
    /// a required call is kept to.
    pub(super) fn syntax(&self, template: ToolSyntax) -> ToolSyntax {
        if self.choice == Choice::Auto {
            template
        } else {
            ToolSyntax::Json
        }
    }
}

/// The calls in a finished reply, with ids: `(content before them, [(id, name, arguments)])`.
pub(super) fn calls_in(syntax: ToolSyntax, text: &str, seed: u64) -> Option<(String, CallList)> {
    let (content, calls) = parse_tool_calls(syntax, text)?;
    let calls = calls
        .into_iter()
        .enumerate()
        .map(|(i, (name, args))| (call_id(seed, i), name, args))
        .collect();
    Some((content, calls))
}

/// The `tool_calls` of a message.
pub(super) fn calls_json(calls: &[(String, String, String)]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|(id, name, args)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
            })
            .collect(),
    )
}

/// How much of `text` (a reply so far) may be streamed as content while tool calls may still
/// come: everything before a marker, or before a suffix that could begin one; for a syntax
/// whose calls open the reply, nothing while the reply could still be one.
pub(super) fn streamable(syntax: ToolSyntax, text: &str, required: bool) -> usize {
    if required {
        return 0;
    }
    let markers = syntax.markers();
    if syntax.opens_reply_only() {
        let start = text.len() - text.trim_start().len();
        let rest = &text[start..];
        let could_be_call = rest.is_empty()
            || markers
                .iter()
                .any(|m| rest.starts_with(m) || m.starts_with(rest));
        return if could_be_call { 0 } else { text.len() };
    }
    if let Some(at) = markers.iter().filter_map(|m| text.find(m)).min() {
        return at;
    }
    // Hold back a tail that could be the start of a marker (shorter than the longest).
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    for k in (1..text.len().min(longest)).rev() {
        if !text.is_char_boundary(text.len() - k) {
            continue;
        }
        let tail = &text[text.len() - k..];
        if markers.iter().any(|m| m.starts_with(tail)) {
            return text.len() - k;
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_streams_up_to_a_possible_call() {
        assert_eq!(streamable(ToolSyntax::Hermes, "Hi there", false), 8);
        assert_eq!(streamable(ToolSyntax::Hermes, "Hi <tool", false), 3);
        assert_eq!(streamable(ToolSyntax::Hermes, "Hi <tool_call>{", false), 3);
        assert_eq!(streamable(ToolSyntax::Llama3, "  {\"na", false), 0);
        assert_eq!(streamable(ToolSyntax::Llama3, "Sure, ", false), 6);
        assert_eq!(streamable(ToolSyntax::Llama3, "<|pyth", false), 0);
        assert_eq!(streamable(ToolSyntax::Hermes, "anything", true), 0);
        assert_eq!(streamable(ToolSyntax::Phi4, "Ok <|tool_c", false), 3);
        assert_eq!(streamable(ToolSyntax::Phi4, "Ok.", false), 3);
        assert_eq!(streamable(ToolSyntax::Gemma4, "Sure<|tool", false), 4);
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let body = |v: Value| v.as_object().cloned().expect("object");
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}});
        let t = parse_tools(&body(json!({"tools": [tool]})))
            .expect("ok")
            .expect("tools");
        assert_eq!(t.choice, Choice::Auto);
        assert!(
            parse_tools(&body(json!({"tools": [tool], "tool_choice": "none"})))
                .expect("ok")
                .is_none()
        );
        for (v, param, words) in [
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}),
                "tools",
                "not a valid JSON schema",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
                "tools",
                "letters",
            ),
            (json!({"tools": [tool, tool]}), "tools", "two tools"),
            (
                json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
                "not among",
            ),
            (
                json!({"tool_choice": "required"}),
                "tool_choice",
                "lists none",
            ),
        ] {
            let e = parse_tools(&body(v.clone())).expect_err(&v.to_string());
            assert_eq!(e.param, Some(param), "{v}");
            assert!(e.message.contains(words), "{v}: {}", e.message);
        }
    }
}
