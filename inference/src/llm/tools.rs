//! Tool calling: what a model's tool calls look like in the text it writes, read back into
//! calls (name and JSON arguments), for each family's convention:
//!
//! - Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`,
//!   one block per call, possibly after some text;
//! - Llama 3.1 / 3.2: the reply is a JSON object `{"name": …, "parameters": {…}}` (or
//!   `"arguments"`), optionally after `<|python_tag|>`, several separated by `;`;
//! - Mistral: `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`;
//! - Phi-4-mini: `<|tool_call|>[{"name": …, "arguments": {…}}, …]<|/tool_call|>` (the list's
//!   brackets or the closing tag are sometimes left out);
//! - Gemma 4: `<|tool_call>call:NAME{key:value,…}<tool_call|>`, its own notation: strings
//!   between `<|"|>` marks, bare keys, numbers, `true`/`false`, `{…}` and `[…]`;
//! - otherwise (a forced call, [`ToolSyntax::Json`]): the reply is `{"name": …, "arguments":
//!   {…}}`.
//!
//! [`ToolSyntax::of_template`] tells which from the chat template's text.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::llm::chat::ToolCall;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>{…}</tool_call>` blocks (Hermes, Qwen).
    Hermes,
    /// A bare JSON object with `parameters`, maybe after `<|python_tag|>` (Llama 3.x).
    Llama3,
    /// `[TOOL_CALLS]` then a JSON list (Mistral).
    Mistral,
    /// `<|tool_call|>` then a JSON list, up to `<|/tool_call|>` (Phi-4-mini).
    Phi4,
    /// `<|tool_call>call:NAME{…}<tool_call|>` in Gemma 4's notation.
    Gemma4,
    /// A bare JSON object `{"name", "arguments"}`.
    Json,
}

impl ToolSyntax {
    /// The convention the chat template `source` teaches its model.
    pub fn of_template(source: &str) -> Self {
        if source.contains("<|tool_call>") {
            ToolSyntax::Gemma4
        } else if source.contains("<tool_call>") {
            ToolSyntax::Hermes
        } else if source.contains("<|tool|>") || source.contains("<|tool_call|>") {
            ToolSyntax::Phi4
        } else if source.contains("[TOOL_CALLS]") {
            ToolSyntax::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\"") {
            ToolSyntax::Llama3
        } else {
            ToolSyntax::Json
        }
    }

    /// Text that starts a tool call: output from it on is held back while streaming.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolSyntax::Hermes => &["<tool_call>"],
            ToolSyntax::Mistral => &["[TOOL_CALLS]"],
            ToolSyntax::Phi4 => &["<|tool_call|>"],
            ToolSyntax::Gemma4 => &["<|tool_call>"],
            ToolSyntax::Llama3 => &["<|python_tag|>", "{"],
            ToolSyntax::Json => &["{"],
        }
    }

    /// Whether a call may only open the reply (after whitespace), not follow text.
    pub fn opens_reply_only(self) -> bool {
        matches!(self, ToolSyntax::Llama3 | ToolSyntax::Json)
    }

    /// `calls` (name, arguments) as the model writes them, for a template that does not render
    /// an assistant's `tool_calls` itself; JSON as Python's `json.dumps` writes it.
    pub fn write_calls(self, calls: &[(&str, &Value)]) -> String {
        let object = |name: &str, args: &Value, key: &str| {
            let mut o = serde_json::Map::new();
            o.insert("name".to_owned(), Value::from(name));
            o.insert(key.to_owned(), args.clone());
            Value::Object(o)
        };
        let list = |key: &str| Value::Array(calls.iter().map(|(n, a)| object(n, a, key)).collect());
        let dumps = |v: &Value| crate::llm::template::python_json(v, false);
        if calls.is_empty() {
            return String::new();
        }
        match self {
            ToolSyntax::Hermes => calls
                .iter()
                .map(|(n, a)| {
                    format!(
                        "<tool_call>\n{}\n</tool_call>",
                        dumps(&object(n, a, "arguments"))
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            ToolSyntax::Mistral => format!("[TOOL_CALLS] {}", dumps(&list("arguments"))),
            ToolSyntax::Phi4 => format!("<|tool_call|>{}<|/tool_call|>", dumps(&list("arguments"))),
            ToolSyntax::Gemma4 => {
                let mut out = String::new();
                for (n, a) in calls {
                    let _ = write!(
                        out,
                        "<|tool_call>call:{n}{}<tool_call|>",
                        gemma_value(a, false)
                    );
                }
                out
            }
            ToolSyntax::Llama3 | ToolSyntax::Json => {
                let key = if self == ToolSyntax::Llama3 {
                    "parameters"
                } else {
                    "arguments"
                };
                calls
                    .iter()
                    .map(|(n, a)| dumps(&object(n, a, key)))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        }
    }
}

/// A tool call as a chat template reads it: OpenAI's shape, with the arguments as an object
/// when they are JSON (as transformers' templates expect).
pub fn template_call(call: &ToolCall) -> Value {
    let arguments = serde_json::from_str::<Value>(&call.arguments)
        .unwrap_or_else(|_| Value::String(call.arguments.clone()));
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}})
}

/// `(name, arguments as JSON text)` of a `{"name": …, "arguments"|"parameters": {…}}` object.
fn call_of(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_owned();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let args = match args {
        // Some models write the arguments as a JSON string.
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
        other => other.to_string(),
    };
    Some((name, args))
}

/// The JSON values at the start of `text`, one after another (separated by whitespace, `,` or
/// `;`), and where they end.
fn leading_json(text: &str) -> (Vec<Value>, usize) {
    let mut values = Vec::new();
    let mut at = 0;
    loop {
        let rest = &text[at..];
        let skipped = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_whitespace() || c == ';' || c == ',')
                .len();
        let mut stream = serde_json::Deserializer::from_str(&rest[skipped..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                at += skipped + stream.byte_offset();
                values.push(v);
            }
            _ => return (values, at),
        }
    }
}

/// The calls in JSON values that are calls or lists of calls.
fn calls_in_values(values: &[Value]) -> Vec<(String, String)> {
    values
        .iter()
        .flat_map(|v| match v {
            Value::Array(list) => list.iter().filter_map(call_of).collect::<Vec<_>>(),
            other => call_of(other).into_iter().collect(),
        })
        .collect()
}

/// The tool calls in `text` (a whole reply) written in `syntax`: the text before them (the
/// reply's content) and the calls, `None` when it has none.
pub fn parse_tool_calls(syntax: ToolSyntax, text: &str) -> Option<(String, Vec<(String, String)>)> {
    match syntax {
        ToolSyntax::Hermes => tagged_calls(text, "<tool_call>", "</tool_call>", |inner| {
            leading_json(inner).0.iter().filter_map(call_of).collect()
        }),
        ToolSyntax::Phi4 => tagged_calls(text, "<|tool_call|>", "<|/tool_call|>", |inner| {
            calls_in_values(&leading_json(inner).0)
        }),
        ToolSyntax::Gemma4 => tagged_calls(text, "<|tool_call>", "<tool_call|>", |inner| {
            gemma_call(inner).into_iter().collect()
        }),
        ToolSyntax::Mistral => {
            let first = text.find("[TOOL_CALLS]")?;
            let (values, _) = leading_json(&text[first + "[TOOL_CALLS]".len()..]);
            let calls = calls_in_values(&values);
            (!calls.is_empty()).then(|| (text[..first].trim_end().to_owned(), calls))
        }
        ToolSyntax::Llama3 | ToolSyntax::Json => {
            let body = text.trim_start();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
            let (values, end) = leading_json(body);
            if values.is_empty() || !body[end..].trim().is_empty() {
                return None;
            }
            let calls: Vec<(String, String)> = values.iter().filter_map(call_of).collect();
            (calls.len() == values.len()).then(|| (String::new(), calls))
        }
    }
}

/// The calls in the `open` … `close` blocks of `text` (a last block may lack its `close`), each
/// block's inside read by `read`: the text before the first block and the calls, `None` when
/// there are none.
fn tagged_calls(
    text: &str,
    open: &str,
    close: &str,
    read: impl Fn(&str) -> Vec<(String, String)>,
) -> Option<(String, Vec<(String, String)>)> {
    let first = text.find(open)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(open) {
        let body = &rest[start + open.len()..];
        let (inner, next) = match body.find(close) {
            Some(end) => (&body[..end], &body[end + close.len()..]),
            None => (body, ""),
        };
        calls.extend(read(inner));
        rest = next;
    }
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_owned(), calls))
}

/// Gemma 4's string quote.
const GEMMA_QUOTE: &str = "<|\"|>";

/// `call:NAME{…}` (Gemma 4) as `(name, arguments as JSON text)`.
fn gemma_call(text: &str) -> Option<(String, String)> {
    let text = text.trim().strip_prefix("call:")?;
    let open = text.find('{')?;
    let name = text[..open].trim();
    if name.is_empty() {
        return None;
    }
    let mut parser = GemmaParser {
        rest: &text[open..],
        depth: 0,
    };
    let args = parser.value()?;
    args.is_object()
        .then(|| (name.to_owned(), args.to_string()))
}

/// Reads Gemma 4's value notation.
struct GemmaParser<'a> {
    rest: &'a str,
    depth: usize,
}

impl GemmaParser<'_> {
    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_space();
        match self.rest.strip_prefix(s) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn value(&mut self) -> Option<Value> {
        self.skip_space();
        self.depth += 1;
        if self.depth > 64 {
            return None;
        }
        let v = if self.eat(GEMMA_QUOTE) {
            let end = self.rest.find(GEMMA_QUOTE)?;
            let s = self.rest[..end].to_owned();
            self.rest = &self.rest[end + GEMMA_QUOTE.len()..];
            Value::String(s)
        } else if self.eat("{") {
            let mut map = serde_json::Map::new();
            if !self.eat("}") {
                loop {
                    let key = if self.eat(GEMMA_QUOTE) {
                        let end = self.rest.find(GEMMA_QUOTE)?;
                        let k = self.rest[..end].to_owned();
                        self.rest = &self.rest[end + GEMMA_QUOTE.len()..];
                        k
                    } else {
                        let end = self.rest.find(':')?;
                        let k = self.rest[..end].trim().to_owned();
                        self.rest = &self.rest[end..];
                        k
                    };
                    if !self.eat(":") {
                        return None;
                    }
                    map.insert(key, self.value()?);
                    if self.eat("}") {
                        break;
                    }
                    if !self.eat(",") {
                        return None;
                    }
                }
            }
            Value::Object(map)
        } else if self.eat("[") {
            let mut list = Vec::new();
            if !self.eat("]") {
                loop {
                    list.push(self.value()?);
                    if self.eat("]") {
                        break;
                    }
                    if !self.eat(",") {
                        return None;
                    }
                }
            }
            Value::Array(list)
        } else {
            // A bare word: a number, true, false or null, up to the next delimiter.
            let end = self.rest.find([',', '}', ']']).unwrap_or(self.rest.len());
            let word = self.rest[..end].trim();
            self.rest = &self.rest[end..];
            match word {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "null" | "None" => Value::Null,
                w => serde_json::from_str::<serde_json::Number>(w)
                    .map_or_else(|_| Value::String(w.to_owned()), Value::Number),
            }
        };
        self.depth -= 1;
        Some(v)
    }
}

/// `v` in Gemma 4's notation, as its template writes arguments (keys sorted; quoted keys
/// only when `quote_keys`).
fn gemma_value(v: &Value, quote_keys: bool) -> String {
    match v {
        Value::String(s) => format!("{GEMMA_QUOTE}{s}{GEMMA_QUOTE}"),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    let key = if quote_keys {
                        format!("{GEMMA_QUOTE}{k}{GEMMA_QUOTE}")
                    } else {
                        k.clone()
                    };
                    format!("{key}:{}", gemma_value(&map[k], quote_keys))
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Array(list) => format!(
            "[{}]",
            list.iter()
                .map(|x| gemma_value(x, quote_keys))
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// JSON schema's type names.
const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// The most tools one request may offer.
const MAX_TOOLS: usize = 128;

/// Checks that `schema` is a JSON schema in shape (objects and booleans where schemas go,
/// types by their names, `required` a list of names); `path` names it in the error.
fn check_schema(schema: &Value, path: &str, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err(format!("{path} nests deeper than 64"));
    }
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{path} must be a JSON schema object")),
    };
    match obj.get("type") {
        None => {}
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {}
        Some(Value::Array(list))
            if list
                .iter()
                .all(|t| t.as_str().is_some_and(|t| TYPES.contains(&t))) => {}
        Some(t) => return Err(format!("{path}.type {t} is not a JSON schema type")),
    }
    if let Some(props) = obj.get("properties") {
        let props = props
            .as_object()
            .ok_or_else(|| format!("{path}.properties must be an object"))?;
        for (k, v) in props {
            check_schema(v, &format!("{path}.properties.{k}"), depth + 1)?;
        }
    }
    if let Some(req) = obj.get("required")
        && !req
            .as_array()
            .is_some_and(|l| l.iter().all(Value::is_string))
    {
        return Err(format!("{path}.required must be a list of names"));
    }
    if let Some(items) = obj.get("items") {
        check_schema(items, &format!("{path}.items"), depth + 1)?;
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = obj.get(key) {
            let list = list
                .as_array()
                .ok_or_else(|| format!("{path}.{key} must be a list of schemas"))?;
            for (i, s) in list.iter().enumerate() {
                check_schema(s, &format!("{path}.{key}[{i}]"), depth + 1)?;
            }
        }
    }
    if obj.get("enum").is_some_and(|e| !e.is_array()) {
        return Err(format!("{path}.enum must be a list"));
    }
    Ok(())
}

/// Checks an OpenAI `tools` list (`[{"type": "function", "function": {"name",
/// "description", "parameters"}}]`): names of 1 to 64 letters, digits, `_`, `-`, `.`, none
/// twice, parameters a JSON schema in shape. Returns each function's name and parameters.
pub fn check_tools(list: &[Value]) -> Result<Vec<(String, Value)>, String> {
    if list.len() > MAX_TOOLS {
        return Err(format!("{} tools; at most {MAX_TOOLS}", list.len()));
    }
    let mut functions: Vec<(String, Value)> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(format!("tools[{i}].type must be \"function\""));
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("tools[{i}].function must be an object"))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !valid {
            return Err(format!(
                "tools[{i}].function.name must be 1 to 64 letters, digits, `_`, `-` or `.`"
            ));
        }
        if functions.iter().any(|(n, _)| n == name) {
            return Err(format!("two tools are named `{name}`"));
        }
        let params = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        check_schema(&params, &format!("tools[{i}].function.parameters"), 0)
            .map_err(|m| format!("not a valid JSON schema: {m}"))?;
        functions.push((name.to_owned(), params));
    }
    Ok(functions)
}

/// The tool calls in a reply written in any of the syntaxes (for a conversation whose
/// model's syntax is not known, such as one read back from disk).
pub fn parse_any(text: &str) -> Option<(String, Vec<(String, String)>)> {
    [
        ToolSyntax::Gemma4,
        ToolSyntax::Hermes,
        ToolSyntax::Phi4,
        ToolSyntax::Mistral,
        ToolSyntax::Llama3,
    ]
    .into_iter()
    .find_map(|s| parse_tool_calls(s, text))
}

/// Tool calls with their ids: `(id, name, arguments as JSON text)`.
pub type CallList = Vec<(String, String, String)>;

/// A tool call's id: `call_` and 24 characters from `seed` and the call's place.
pub fn call_id(seed: u64, index: usize) -> String {
    let mut x = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut id = String::from("call_");
    for _ in 0..24 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        id.push(char::from(alphabet[(x % alphabet.len() as u64) as usize]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_familys_tool_calls_are_read_back() {
        let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(ToolSyntax::Hermes, hermes).expect("calls");
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            [
                ("get_weather".into(), r#"{"city":"Paris"}"#.into()),
                ("get_time".into(), "{}".into())
            ]
        );
        // An unclosed last block (the end token stopped it) still counts.
        let open = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}";
        assert_eq!(
            parse_tool_calls(ToolSyntax::Hermes, open)
                .expect("open")
                .1
                .len(),
            1
        );

        let llama =
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        let (_, calls) = parse_tool_calls(ToolSyntax::Llama3, llama).expect("llama");
        assert_eq!(calls, [("get_weather".into(), r#"{"city":"Oslo"}"#.into())]);
        let two = "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"k\": true}}";
        assert_eq!(
            parse_tool_calls(ToolSyntax::Llama3, two)
                .expect("two")
                .1
                .len(),
            2
        );
        assert!(parse_tool_calls(ToolSyntax::Llama3, "The answer is {\"name\": 1}").is_none());
        assert!(parse_tool_calls(ToolSyntax::Llama3, "{\"name\": \"a\"} and more").is_none());

        let mistral = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}, {\"name\": \"x\", \"arguments\": \"{\\\"a\\\": 2}\"}]";
        let (_, calls) = parse_tool_calls(ToolSyntax::Mistral, mistral).expect("mistral");
        assert_eq!(
            calls,
            [
                ("get_weather".into(), r#"{"city":"Rome"}"#.into()),
                ("x".into(), r#"{"a": 2}"#.into())
            ]
        );
        assert!(parse_tool_calls(ToolSyntax::Hermes, "no calls here").is_none());

        // Phi-4-mini: a list in tags; the brackets or the closing tag may be missing.
        let phi = "Sure.<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]<|/tool_call|>";
        let (content, calls) = parse_tool_calls(ToolSyntax::Phi4, phi).expect("phi");
        assert_eq!(content, "Sure.");
        assert_eq!(calls, [("get_weather".into(), r#"{"city":"Oslo"}"#.into())]);
        let loose = "<|tool_call|>{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"k\": 1}}";
        assert_eq!(
            parse_tool_calls(ToolSyntax::Phi4, loose)
                .expect("loose")
                .1
                .len(),
            2
        );
        assert_eq!(parse_any(phi).expect("any").1.len(), 1);

        // Gemma 4: its own notation, nested values, several calls.
        let gemma = "Checking.<|tool_call>call:get_weather{city:<|\"|>Paris, FR<|\"|>,days:3,opts:{metric:true,tags:[<|\"|>a<|\"|>,2.5]}}<tool_call|><|tool_call>call:get_time{}<tool_call|>";
        let (content, calls) = parse_tool_calls(ToolSyntax::Gemma4, gemma).expect("gemma");
        assert_eq!(content, "Checking.");
        assert_eq!(
            calls,
            [
                (
                    "get_weather".into(),
                    r#"{"city":"Paris, FR","days":3,"opts":{"metric":true,"tags":["a",2.5]}}"#
                        .into()
                ),
                ("get_time".into(), "{}".into())
            ]
        );
        assert!(parse_tool_calls(ToolSyntax::Gemma4, "<|tool_call>call:f{a:<|\"|>open").is_none());
        let deep = format!(
            "<|tool_call>call:f{{a:{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(
            parse_tool_calls(ToolSyntax::Gemma4, &deep).is_none(),
            "nesting is bounded"
        );
    }

    #[test]
    fn calls_are_written_back_as_each_family_writes_them() {
        let args = json!({"city": "Zürich"});
        let calls = [("get_weather", &args)];
        let expected = [
            (
                ToolSyntax::Hermes,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>",
            ),
            (
                ToolSyntax::Phi4,
                "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}]<|/tool_call|>",
            ),
            (
                ToolSyntax::Mistral,
                "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}]",
            ),
            (
                ToolSyntax::Llama3,
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\"}}",
            ),
            (
                ToolSyntax::Gemma4,
                "<|tool_call>call:get_weather{city:<|\"|>Zürich<|\"|>}<tool_call|>",
            ),
        ];
        for (syntax, text) in expected {
            assert_eq!(syntax.write_calls(&calls), text, "{syntax:?}");
            // What is written reads back as the same call.
            let (_, back) = parse_tool_calls(syntax, text).expect("reads back");
            assert_eq!(
                back,
                [("get_weather".into(), r#"{"city":"Zürich"}"#.into())]
            );
        }
        assert_eq!(ToolSyntax::Hermes.write_calls(&[]), "");
    }

    #[test]
    fn the_syntax_comes_from_the_template_and_ids_look_like_openais() {
        assert_eq!(
            ToolSyntax::of_template("… <tool_call> …"),
            ToolSyntax::Hermes
        );
        assert_eq!(
            ToolSyntax::of_template("[TOOL_CALLS] …"),
            ToolSyntax::Mistral
        );
        assert_eq!(
            ToolSyntax::of_template("<|python_tag|>"),
            ToolSyntax::Llama3
        );
        assert_eq!(
            ToolSyntax::of_template("'<|tool|>' + message['tools'] + '<|/tool|>'"),
            ToolSyntax::Phi4
        );
        assert_eq!(
            ToolSyntax::of_template("{{- '<|tool_call>call:' + function['name'] + '{' -}}"),
            ToolSyntax::Gemma4
        );
        let id = call_id(7, 0);
        assert!(id.starts_with("call_") && id.len() == 29);
        assert_ne!(call_id(7, 0), call_id(7, 1));
    }
}
