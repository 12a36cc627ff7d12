//! `POST /v1/embeddings`: OpenAI's request (`input` as a string, a list of strings, a list of
//! token ids or a list of such lists; `encoding_format` float or base64; `dimensions` when it
//! is the model's own) answered from the server's sentence-embedding model, or without one from
//! the served chat model itself (its hidden states, pooled as the file's `pooling_type` says —
//! the mean when it says nothing — and normalised, as llama.cpp's server does), each input
//! checked against the model's length first (a 400 with its token count, never cut short). A
//! batch stops between inputs when its client leaves, so a large one does not hold the model
//! (or a preparation thread) for nobody.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use studio_inference::embed::EmbeddingModel;

use super::Shared;
use super::generation::CancelOnDrop;
use super::openai::{field, integer};
use super::transport::ApiError;

/// The most inputs one request may hold (OpenAI's limit).
const MAX_INPUTS: usize = 2048;
/// The most tokens of all inputs together.
const MAX_TOTAL_TOKENS: usize = 1 << 20;

/// One input: text, or token ids.
enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

fn parse_inputs(input: Option<&Value>) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::param(
            "input",
            "`input` must be a string, a list of strings, a list of token ids or a list of \
             lists of token ids",
        )
    };
    let tokens = |list: &[Value]| -> Option<Vec<u32>> {
        list.iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let inputs = match input {
        None => return Err(ApiError::param("input", "`input` is required")),
        Some(Value::String(s)) => vec![Input::Text(s.clone())],
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(ApiError::param("input", "`input` must not be empty"));
        }
        Some(Value::Array(list)) => match &list[0] {
            Value::String(_) => list
                .iter()
                .map(|v| v.as_str().map(|s| Input::Text(s.to_owned())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?,
            Value::Number(_) => vec![Input::Tokens(tokens(list).ok_or_else(bad)?)],
            Value::Array(_) => list
                .iter()
                .map(|v| v.as_array().and_then(|l| tokens(l)).map(Input::Tokens))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?,
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::param(
            "input",
            format!("`input` has {} items; at most {MAX_INPUTS}", inputs.len()),
        ));
    }
    Ok(inputs)
}

/// What the request asks for, checked.
struct Request {
    inputs: Vec<Input>,
    base64: bool,
}

fn parse(body: &Value, dimensions: usize) -> Result<Request, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let base64 = match field(body, "encoding_format").map(Value::as_str) {
        None | Some(Some("float")) => false,
        Some(Some("base64")) => true,
        Some(_) => {
            return Err(ApiError::param(
                "encoding_format",
                "`encoding_format` must be \"float\" or \"base64\"",
            ));
        }
    };
    if let Some(d) = integer(body, "dimensions")?
        && usize::try_from(d).ok() != Some(dimensions)
    {
        return Err(ApiError::param(
            "dimensions",
            format!(
                "this model makes {dimensions}-dimensional embeddings and does not shorten them"
            ),
        ));
    }
    Ok(Request {
        inputs: parse_inputs(field(body, "input"))?,
        base64,
    })
}

/// Each input's tokens (`tokenize` for text), checked against the model's `max` tokens.
fn tokenize(
    tokenize: &dyn Fn(&str) -> studio_inference::Result<Vec<u32>>,
    max: usize,
    inputs: Vec<Input>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut total = 0usize;
    let mut out = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let ids = match input {
            Input::Text(t) if t.is_empty() => {
                return Err(ApiError::param("input", format!("input[{i}] is empty")));
            }
            Input::Text(t) => tokenize(&t).map_err(|e| ApiError::from_inference(&e))?,
            Input::Tokens(ids) if ids.is_empty() => {
                return Err(ApiError::param(
                    "input",
                    format!("input[{i}] has no tokens"),
                ));
            }
            Input::Tokens(ids) => ids,
        };
        if ids.len() > max {
            return Err(ApiError::param(
                "input",
                format!(
                    "input[{i}] is {} tokens; this embedding model takes at most {max}",
                    ids.len()
                ),
            ));
        }
        total += ids.len();
        if total > MAX_TOTAL_TOKENS {
            return Err(ApiError::param(
                "input",
                format!("the inputs are over {MAX_TOTAL_TOKENS} tokens together"),
            ));
        }
        out.push(ids);
    }
    Ok(out)
}

/// The embedding as OpenAI writes it: numbers, or base64 of little-endian f32s.
fn encode(v: &[f32], base64: bool) -> Value {
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

/// The list answer.
fn answer(vectors: &[Vec<f32>], tokens: usize, base64: bool, id: &str) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| json!({"object": "embedding", "index": index, "embedding": encode(v, base64)}))
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// Embeds each of `ids` with `embed`, stopping between inputs when the client has left
/// (`gone`, counted as a disconnect) or the server is stopping.
fn embed_all(
    shared: &Shared,
    ids: &[Vec<u32>],
    gone: &AtomicBool,
    cancelled: &dyn Fn() -> bool,
    embed: &mut dyn FnMut(&[u32]) -> studio_inference::Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    ids.iter()
        .map(|ids| {
            if gone.load(Ordering::Relaxed) {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                log::info!("serve: the client disconnected; embeddings stopped");
                return Err(ApiError::unavailable("the client left"));
            }
            if shared.stop.load(Ordering::Relaxed) || cancelled() {
                return Err(ApiError::unavailable("the request was cancelled"));
            }
            embed(ids).map_err(|e| ApiError::from_inference(&e))
        })
        .collect()
}

/// Answers `POST /v1/embeddings` from the served chat model (no embedding model was given).
async fn from_chat_model(shared: Arc<Shared>, body: Value) -> Result<Value, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    if integer(obj, "dimensions")?.is_some() {
        return Err(ApiError::param(
            "dimensions",
            "the served model's embeddings are its hidden size and are not shortened",
        ));
    }
    let request = parse(&body, 0)?;
    let ids = shared
        .blocking(move |shared| {
            let p = &shared.model.prompter;
            tokenize(&|t| p.tokenizer.encode(t), p.context, request.inputs)
        })
        .await?;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    // The client going away from here on drops this future, which stops the batch.
    let gone = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(gone.clone());
    let task_shared = shared.clone();
    let vectors = shared
        .on_model(move |m, cancelled| {
            embed_all(&task_shared, &ids, &gone, cancelled, &mut |ids| {
                m.embed_tokens(ids)
            })
        })
        .await??;
    Ok(answer(&vectors, tokens, request.base64, &shared.model.id))
}

/// Answers `POST /v1/embeddings`.
pub(super) async fn embeddings(shared: Arc<Shared>, body: Value) -> Result<Value, ApiError> {
    let Some(model) = shared.model.embeddings.clone() else {
        return from_chat_model(shared, body).await;
    };
    let request = parse(&body, model.info().dimensions)?;
    let id = model.info().name.clone();
    let gone = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(gone.clone());
    shared
        .blocking(move |shared| {
            let ids = tokenize(
                &|t| model.tokenize(t),
                model.info().max_tokens,
                request.inputs,
            )?;
            let tokens = ids.iter().map(Vec::len).sum();
            let vectors = embed_all(shared, &ids, &gone, &|| false, &mut |ids| {
                model.embed_tokens(ids)
            })?;
            Ok(answer(&vectors, tokens, request.base64, &id))
        })
        .await
}

/// The embedding model's entry in `/v1/models`.
pub(super) fn model_entry(model: &EmbeddingModel, created: u64) -> Value {
    let info = model.info();
    let mut entry = Map::new();
    entry.insert("id".into(), json!(info.name));
    entry.insert("object".into(), json!("model"));
    entry.insert("created".into(), json!(created));
    entry.insert("owned_by".into(), json!("studio"));
    entry.insert("type".into(), json!("embeddings"));
    entry.insert("max_model_len".into(), json!(info.max_tokens));
    entry.insert("dimensions".into(), json!(info.dimensions));
    Value::Object(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(encode(&[1.0, -2.5], true), json!("AACAPwAAIMA="));
        assert_eq!(encode(&[0.5], false), json!([0.5]));
    }
}
