//! JSON schemas (OpenAI's `response_format: json_schema`, tool parameters) as GBNF grammars,
//! and the grammar of any JSON object (`response_format: json_object`).
//!
//! Read: `type` (one or a list), `properties` (in the schema's order; `required` ones always,
//! the others optionally), `additionalProperties` (absent or `false`: no other keys), `items`,
//! `prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`, `enum`, `const`, `anyOf`,
//! `oneOf`, a one-schema `allOf`, `nullable`, `$ref` to `#`, `#/$defs/…` or
//! `#/definitions/…` (recursive references become recursive rules), the `date`, `time`,
//! `date-time` and `uuid` formats. Annotations (`title`, `description`, `default`,
//! `examples`, …) are fine. Any other keyword is refused with its name ([`SchemaError`]),
//! since a constraint that is not enforced would be one accepted and ignored.
//!
//! Whitespace between tokens is bounded (at most a newline and 20 spaces), so a model can not
//! fill the output with it.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Keywords that only describe.
const ANNOTATIONS: [&str; 12] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
    "discriminator",
];

/// The deepest a schema may nest.
const MAX_DEPTH: usize = 64;
/// The most rules a schema may make.
const MAX_RULES: usize = 2048;

/// Why a schema cannot be compiled: the keyword, and what about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// The keyword at fault (`pattern`, `$ref`, …), or `schema`.
    pub keyword: String,
    /// What is wrong, in words.
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.keyword, self.message)
    }
}

impl std::error::Error for SchemaError {}

fn err(keyword: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        keyword: keyword.to_owned(),
        message: message.into(),
    }
}

/// The generic JSON rules every grammar here uses.
const JSON_RULES: &str = r#"ws ::= | " " | "\n" [ \t]{0,20}
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}"
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" char* "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
integer ::= "-"? ( [0-9] | [1-9] [0-9]{1,15} )
number ::= integer ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,15} )?
boolean ::= "true" | "false"
null ::= "null"
"#;

/// The grammar of any JSON object (`response_format: {"type": "json_object"}`).
pub fn json_object_gbnf() -> String {
    format!("root ::= ws object ws\n{JSON_RULES}")
}

/// A GBNF literal for `s`.
fn literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Compiler<'a> {
    root: &'a Value,
    rules: Vec<(String, String)>,
    /// `$ref` targets already given a rule.
    refs: HashMap<String, String>,
}

impl Compiler<'_> {
    fn rule(&mut self, base: &str, body: String) -> Result<String, SchemaError> {
        if self.rules.len() >= MAX_RULES {
            return Err(err("schema", format!("it needs over {MAX_RULES} rules")));
        }
        let clean: String = base
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("{}-{}", clean.trim_matches('-'), self.rules.len());
        let name = name.trim_start_matches('-').to_owned();
        self.rules.push((name.clone(), body));
        Ok(name)
    }

    fn resolve(&self, reference: &str) -> Result<&Value, SchemaError> {
        let path = reference.strip_prefix('#').ok_or_else(|| {
            err(
                "$ref",
                format!("`{reference}` is not in this schema (only `#…` references are)"),
            )
        })?;
        let mut node = self.root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let part = part.replace("~1", "/").replace("~0", "~");
            node = node
                .get(&part)
                .ok_or_else(|| err("$ref", format!("`{reference}` does not resolve")))?;
        }
        Ok(node)
    }

    /// The rule (or inline expression) for `schema`.
    fn schema(&mut self, schema: &Value, name: &str, depth: usize) -> Result<String, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(err("schema", format!("it nests deeper than {MAX_DEPTH}")));
        }
        let obj = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => return Err(err("schema", "`false` allows nothing")),
            Value::Object(o) => o,
            _ => return Err(err("schema", "a schema must be an object or a boolean")),
        };
        for key in obj.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "type"
                        | "properties"
                        | "required"
                        | "additionalProperties"
                        | "items"
                        | "prefixItems"
                        | "minItems"
                        | "maxItems"
                        | "minLength"
                        | "maxLength"
                        | "enum"
                        | "const"
                        | "anyOf"
                        | "oneOf"
                        | "allOf"
                        | "nullable"
                        | "$ref"
                        | "$defs"
                        | "definitions"
                        | "format"
                );
            if !known {
                return Err(err(
                    key,
                    "this keyword is not supported in structured output (Studio would not \
                     enforce it)",
                ));
            }
        }
        if let Some(r) = obj.get("$ref") {
            let r = r.as_str().ok_or_else(|| err("$ref", "must be a string"))?;
            if let Some(rule) = self.refs.get(r) {
                return Ok(rule.clone());
            }
            // Reserve the rule first, so a recursive reference finds it.
            let rule = self.rule(r.rsplit('/').next().unwrap_or("ref"), String::new())?;
            self.refs.insert(r.to_owned(), rule.clone());
            let target = self.resolve(r)?.clone();
            let body = self.schema(&target, &rule, depth + 1)?;
            if let Some(slot) = self.rules.iter_mut().find(|(n, _)| *n == rule) {
                slot.1 = body;
            }
            return Ok(rule);
        }
        let nullable = obj.get("nullable").and_then(Value::as_bool) == Some(true);
        let body = self.schema_body(obj, name, depth)?;
        Ok(if nullable {
            format!("( {body} | null )")
        } else {
            body
        })
    }

    fn schema_body(
        &mut self,
        obj: &Map<String, Value>,
        name: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        if let Some(c) = obj.get("const") {
            return Ok(literal(&c.to_string()));
        }
        if let Some(e) = obj.get("enum") {
            let list = e
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| err("enum", "must be a non-empty list"))?;
            let alts: Vec<String> = list.iter().map(|v| literal(&v.to_string())).collect();
            return Ok(format!("( {} )", alts.join(" | ")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let list = list
                    .as_array()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| err(key, "must be a non-empty list"))?;
                let mut alts = Vec::with_capacity(list.len());
                for (i, s) in list.iter().enumerate() {
                    alts.push(self.schema(s, &format!("{name}-{i}"), depth + 1)?);
                }
                return Ok(format!("( {} )", alts.join(" | ")));
            }
        }
        if let Some(all) = obj.get("allOf") {
            let list = all
                .as_array()
                .ok_or_else(|| err("allOf", "must be a list"))?;
            if list.len() != 1 {
                return Err(err(
                    "allOf",
                    "only a one-schema `allOf` is supported (merging schemas is not)",
                ));
            }
            return self.schema(&list[0], name, depth + 1);
        }
        let types: Vec<&str> = match obj.get("type") {
            None => {
                if obj.contains_key("properties") {
                    vec!["object"]
                } else if obj.contains_key("items") || obj.contains_key("prefixItems") {
                    vec!["array"]
                } else {
                    return Ok("value".into());
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|t| t.as_str().ok_or_else(|| err("type", "must name types")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("type", "must be a string or a list of strings")),
        };
        let mut alts = Vec::with_capacity(types.len());
        for t in types {
            alts.push(self.typed(obj, t, name, depth)?);
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            format!("( {} )", alts.join(" | "))
        })
    }

    fn count(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, SchemaError> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 10_000)
                .map(Some)
                .ok_or_else(|| err(key, "must be a count from 0 to 10000")),
        }
    }

    fn typed(
        &mut self,
        obj: &Map<String, Value>,
        t: &str,
        name: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        match t {
            "null" => Ok("null".into()),
            "boolean" => Ok("boolean".into()),
            "integer" => Ok("integer".into()),
            "number" => Ok("number".into()),
            "string" => {
                if let Some(f) = obj.get("format").and_then(Value::as_str) {
                    let date = r#"[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )"#;
                    let time = r#"( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,9} )? ( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )"#;
                    let body = match f {
                        "date" => date.to_owned(),
                        "time" => time.to_owned(),
                        "date-time" => format!("{date} \"T\" {time}"),
                        "uuid" => "[0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{12}".to_owned(),
                        other => {
                            return Err(err(
                                "format",
                                format!("the `{other}` format is not supported"),
                            ));
                        }
                    };
                    return Ok(format!("\"\\\"\" {body} \"\\\"\""));
                }
                let min = Self::count(obj, "minLength")?;
                let max = Self::count(obj, "maxLength")?;
                if min.is_none() && max.is_none() {
                    return Ok("string".into());
                }
                let min = min.unwrap_or(0);
                if max.is_some_and(|m| m < min) {
                    return Err(err("maxLength", "is below minLength"));
                }
                let max = max.map_or_else(String::new, |m| m.to_string());
                Ok(format!("\"\\\"\" char{{{min},{max}}} \"\\\"\""))
            }
            "array" => self.array(obj, name, depth),
            "object" => self.object(obj, name, depth),
            other => Err(err("type", format!("`{other}` is not a JSON schema type"))),
        }
    }

    fn array(
        &mut self,
        obj: &Map<String, Value>,
        name: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let min = Self::count(obj, "minItems")?.unwrap_or(0);
        let max = Self::count(obj, "maxItems")?;
        if max.is_some_and(|m| m < min) {
            return Err(err("maxItems", "is below minItems"));
        }
        if let Some(prefix) = obj.get("prefixItems") {
            let list = prefix
                .as_array()
                .ok_or_else(|| err("prefixItems", "must be a list"))?;
            if obj.get("items").is_some_and(|i| i != &Value::Bool(false)) {
                return Err(err("items", "items after `prefixItems` are not supported"));
            }
            let mut parts = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                parts.push(self.schema(s, &format!("{name}-{i}"), depth + 1)?);
            }
            let body = parts.join(" ws \",\" ws ");
            return Ok(format!("\"[\" ws {body} ws \"]\""));
        }
        let item = match obj.get("items") {
            None => "value".to_owned(),
            Some(s) => {
                let body = self.schema(s, &format!("{name}-item"), depth + 1)?;
                self.rule(&format!("{name}-item"), body)?
            }
        };
        let more = format!("( ws \",\" ws {item} )");
        let body = match (min, max) {
            (_, Some(0)) => String::new(),
            (0, None) => format!("( {item} {more}* )?"),
            (0, Some(m)) => format!("( {item} {more}{{0,{}}} )?", m - 1),
            (n, None) => format!("{item} {more}{{{},}}", n - 1),
            (n, Some(m)) => format!("{item} {more}{{{},{}}}", n - 1, m - 1),
        };
        Ok(format!("\"[\" ws {body} ws \"]\""))
    }

    fn object(
        &mut self,
        obj: &Map<String, Value>,
        name: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let empty = Map::new();
        let props = match obj.get("properties") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(err("properties", "must be an object")),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|r| r.as_str().ok_or_else(|| err("required", "must list names")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("required", "must be a list")),
        };
        if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(err(
                "required",
                format!("`{missing}` is required but not among the properties"),
            ));
        }
        let extra = match obj.get("additionalProperties") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some("value".to_owned()),
            Some(s) => Some(self.schema(s, &format!("{name}-extra"), depth + 1)?),
        };
        if props.is_empty() && extra.is_none() && obj.get("properties").is_none() {
            // `{"type": "object"}`: any object.
            return Ok("object".into());
        }
        // Each property as `"key" ws ":" ws value ws`.
        let mut kvs = Vec::with_capacity(props.len());
        for (key, schema) in props {
            let value = self.schema(schema, &format!("{name}-{key}"), depth + 1)?;
            let kv = self.rule(
                &format!("{name}-{key}-kv"),
                format!("{} ws \":\" ws {value} ws", literal(&format!("\"{key}\""))),
            )?;
            kvs.push((kv, required.contains(&key.as_str())));
        }
        let extra_kv = match &extra {
            Some(v) => Some(self.rule(
                &format!("{name}-extra-kv"),
                format!("string ws \":\" ws {v} ws"),
            )?),
            None => None,
        };
        // tail_i: the properties from i on, each after a comma; head_i: the first one emitted
        // from i on (no comma), then tail.
        let n = kvs.len();
        let mut tail = match &extra_kv {
            Some(e) => self.rule(&format!("{name}-more"), format!("( \",\" ws {e} )*"))?,
            None => self.rule(&format!("{name}-end"), String::new())?,
        };
        let mut tails = vec![String::new(); n + 1];
        tails[n].clone_from(&tail);
        for i in (0..n).rev() {
            let (kv, req) = &kvs[i];
            let body = if *req {
                format!("\",\" ws {kv} {tail}")
            } else {
                format!("\",\" ws {kv} {tail} | {tail}")
            };
            tail = self.rule(&format!("{name}-tail"), body)?;
            tails[i].clone_from(&tail);
        }
        let mut head = match &extra_kv {
            Some(e) => self.rule(&format!("{name}-head"), format!("( {e} {} )?", tails[n]))?,
            None => self.rule(&format!("{name}-head"), String::new())?,
        };
        for i in (0..n).rev() {
            let (kv, req) = &kvs[i];
            let body = if *req {
                format!("{kv} {}", tails[i + 1])
            } else {
                format!("{kv} {} | {head}", tails[i + 1])
            };
            head = self.rule(&format!("{name}-head"), body)?;
        }
        Ok(format!("\"{{\" ws {head} \"}}\""))
    }
}

/// The GBNF grammar of the JSON texts `schema` allows (leading and trailing whitespace
/// bounded).
pub fn json_schema_to_gbnf(schema: &Value) -> Result<String, SchemaError> {
    let mut c = Compiler {
        root: schema,
        rules: Vec::new(),
        refs: HashMap::new(),
    };
    // `#` itself refers to the root.
    let root = c.schema(schema, "root", 0)?;
    let mut out = format!("root ::= ws {root} ws\n");
    for (name, body) in &c.rules {
        let _ = writeln!(out, "{name} ::= {body}");
    }
    out.push_str(JSON_RULES);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::super::{Grammar, Matcher};
    use super::*;

    fn accepts(schema: &Value, text: &str) -> bool {
        let gbnf = json_schema_to_gbnf(schema).expect("compiles");
        let g = Arc::new(Grammar::parse(&gbnf).unwrap_or_else(|e| panic!("{e}\n{gbnf}")));
        let mut m = Matcher::new(g);
        m.advance(text.as_bytes()) && m.can_end()
    }

    #[test]
    fn objects_keep_their_properties_in_order_and_require_the_required() {
        let s = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 5},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "ok": {"type": ["boolean", "null"]}
            },
            "required": ["name", "ok"]
        });
        assert!(accepts(&s, r#"{"name": "Ann", "ok": true}"#));
        assert!(accepts(
            &s,
            r#"{"name":"Ann","age":-3,"tags":["a","b"],"ok":null}"#
        ));
        assert!(accepts(&s, "{\n  \"name\": \"Bo\",\n  \"ok\": false\n}"));
        assert!(!accepts(&s, r#"{"name": "Ann"}"#), "ok is required");
        assert!(!accepts(&s, r#"{"ok": true, "name": "Ann"}"#), "order");
        assert!(
            !accepts(&s, r#"{"name": "Annabel", "ok": true}"#),
            "maxLength"
        );
        assert!(
            !accepts(&s, r#"{"name": "A", "tags": ["c"], "ok": true}"#),
            "enum"
        );
        assert!(
            !accepts(&s, r#"{"name": "A", "ok": true, "x": 1}"#),
            "no other keys"
        );
        assert!(
            !accepts(&s, r#"{"name": "A", "age": 1.5, "ok": true}"#),
            "integer"
        );
    }

    #[test]
    fn refs_recursion_any_of_and_json_object() {
        let tree = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "number"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }, "required": ["v"]}},
            "$ref": "#/$defs/node"
        });
        assert!(accepts(
            &tree,
            r#"{"v": 1, "kids": [{"v": 2.5e3}, {"v": 3, "kids": []}]}"#
        ));
        assert!(!accepts(&tree, r#"{"v": 1, "kids": [{}]}"#));
        let either = json!({"anyOf": [{"type": "string"}, {"const": 7}]});
        assert!(accepts(&either, "\"x\"") && accepts(&either, "7") && !accepts(&either, "8"));
        let g = Arc::new(Grammar::parse(&json_object_gbnf()).expect("g"));
        let mut m = Matcher::new(g);
        assert!(m.advance(br#"{"a": [1, {"b": null}], "c": "\u00e9\n"}"#) && m.can_end());
        let date = json!({"type": "string", "format": "date-time"});
        assert!(accepts(&date, "\"2026-12-07T13:45:00Z\""));
        assert!(!accepts(&date, "\"yesterday\""));
    }

    #[test]
    fn keywords_it_would_not_enforce_are_refused_by_name() {
        for (s, keyword) in [
            (json!({"type": "string", "pattern": "^a+$"}), "pattern"),
            (json!({"type": "integer", "minimum": 0}), "minimum"),
            (
                json!({"type": "object", "properties": {"a": {"not": {}}}}),
                "not",
            ),
            (json!({"allOf": [{}, {}]}), "allOf"),
            (json!({"$ref": "#/$defs/missing"}), "$ref"),
            (json!({"$ref": "https://example.com/s.json"}), "$ref"),
            (json!({"type": "string", "format": "email"}), "format"),
            (json!({"type": "object", "required": ["x"]}), "required"),
            (json!({"type": "teapot"}), "type"),
        ] {
            let e = json_schema_to_gbnf(&s).expect_err(&s.to_string());
            assert_eq!(e.keyword, keyword, "{s}: {e}");
        }
        // Deep nesting is bounded.
        let mut deep = json!({"type": "string"});
        for _ in 0..100 {
            deep = json!({"type": "array", "items": deep});
        }
        assert_eq!(
            json_schema_to_gbnf(&deep).expect_err("deep").keyword,
            "schema"
        );
    }
}
