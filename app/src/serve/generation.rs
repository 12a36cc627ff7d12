//! One generation, streamed or not: the prompt rendered and tokenized outside the model, the
//! run on the model (owned by the server or on the GUI's worker), cancelled when its client
//! disconnects.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use bytes::Bytes;
use hyper::Response;
use hyper::header::{self, HeaderValue};
use serde_json::{Value, json};
use studio_inference::llm::chat::build_chat_prompt;
use studio_inference::llm::generate::{FinishReason, GenerationStats, Step, generate_constrained};
use studio_inference::llm::grammar::{Constraint, Grammar, VocabTrie};
use studio_inference::llm::loader::LoadedModel;
use studio_inference::llm::logprobs::{TokenLogprobs, token_logprobs};
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::tools::ToolSyntax;
use tokio::sync::mpsc;

use super::openai::{Choice, Endpoint, Job, LogprobWriter, Piece, Prompt, Shape, finish_reason};
use super::tools::{Choice as ToolChoice, Tools, calls_in, streamable};
use super::transport::{ApiError, Body, json_response};
use super::{Prompter, Shared, unix_time};

/// A request turned into tokens, ready for the model.
pub(super) struct Prepared {
    pub(super) tokens: Vec<u32>,
    pub(super) eos: Vec<u32>,
    pub(super) params: SamplingParams,
    /// The grammar replies keep to, and the vocabulary it masks.
    pub(super) grammar: Option<(Arc<Grammar>, Arc<VocabTrie>)>,
    /// With tools offered: how replies write their calls, and whether one is required.
    pub(super) tools: Option<(ToolSyntax, bool)>,
}

impl Prepared {
    /// The sampling of choice `index` (`n` > 1): each seeded after the previous one.
    fn params_for(&self, index: usize) -> SamplingParams {
        SamplingParams {
            seed: self.params.seed.wrapping_add(index as u64),
            ..self.params.clone()
        }
    }
}

/// What one generation asks of the token loop besides its prompt.
pub(super) struct Run {
    pub(super) params: SamplingParams,
    /// Alternatives per token when log-probabilities are asked for.
    pub(super) logprobs: Option<usize>,
}

/// Renders the template and tokenizes (no model needed); with a grammar, makes sure the
/// vocabulary trie is built.
pub(super) fn prepare(
    p: &Prompter,
    prompt: &Prompt,
    params: SamplingParams,
    grammar: Option<Arc<Grammar>>,
    tools: Option<&Tools>,
) -> Result<Prepared, ApiError> {
    // Tools are shown to the model through its own template.
    let (chat, tool_syntax) = match tools {
        Some(t) => {
            let (format, syntax) = t.format(&p.chat)?;
            (
                format,
                Some((t.syntax(syntax), t.choice != ToolChoice::Auto)),
            )
        }
        None => (p.chat.clone(), None),
    };
    let (tokens, eos, params) = match prompt {
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(ApiError::from_inference(
                    &studio_inference::Error::EmptyPrompt,
                ));
            }
            let tokens = p
                .tokenizer
                .encode(text)
                .map_err(|e| ApiError::from_inference(&e))?;
            (tokens, p.eos.clone(), params)
        }
        Prompt::Chat { system, messages } => {
            let reply = build_chat_prompt(
                &p.tokenizer,
                &chat,
                p.context,
                system,
                messages,
                params.max_new_tokens,
            )
            .map_err(|e| match e {
                // The tools could not be rendered: say so about `tools`.
                studio_inference::Error::ChatTemplate(m) if tool_syntax.is_some() => {
                    ApiError::param("tools", m)
                }
                e => ApiError::from_inference(&e),
            })?
            .into_reply(params, &p.eos);
            if let Some(notice) = &reply.notice {
                log::warn!("serve: {notice}");
            }
            if reply.dropped_messages > 0 {
                log::info!(
                    "serve: left out the {} oldest messages to fit the context",
                    reply.dropped_messages
                );
            }
            (reply.tokens, reply.eos, reply.params)
        }
    };
    if tokens.len() >= p.context {
        return Err(ApiError::from_inference(
            &studio_inference::Error::PromptTooLong {
                tokens: tokens.len(),
                context: p.context,
            },
        ));
    }
    Ok(Prepared {
        tokens,
        eos,
        params,
        grammar: grammar.map(|g| (g, p.trie())),
        tools: tool_syntax,
    })
}

/// Sets its flag when dropped: the handler's future is dropped when its client disconnects.
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs one generation request to its end, streaming or not.
pub(super) async fn generate_reply(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    job: Job,
) -> Result<Response<Body>, ApiError> {
    let Job {
        prompt,
        params,
        stream,
        include_usage,
        n,
        logprobs,
        grammar,
        tools,
    } = job;
    // The client going away from here on cancels (the future is dropped).
    let gone = Arc::new(AtomicBool::new(false));
    let cancel_on_drop = CancelOnDrop(gone.clone());
    let prepared = shared
        .blocking(move |shared| {
            prepare(
                &shared.model.prompter,
                &prompt,
                params,
                grammar,
                tools.as_ref(),
            )
        })
        .await?;
    let serial = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let created = unix_time();
    let shape = Shape {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{created:x}{serial:04x}"),
            Endpoint::Completions => format!("cmpl-{created:x}{serial:04x}"),
        },
        created,
        model: shared.model.id.clone(),
    };
    if stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let events = tx.clone();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            let ran = task_shared
                .on_model({
                    let shared = task_shared.clone();
                    move |m, cancelled| {
                        let ask = Ask {
                            n,
                            logprobs,
                            include_usage,
                        };
                        stream_events(&shared, m, cancelled, &prepared, &shape, &ask, &tx);
                    }
                })
                .await;
            if let Err(e) = ran {
                let _ = events
                    .send(Bytes::from(format!("data: {}\n\n", e.body())))
                    .await;
                let _ = events.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            }
        });
        drop(cancel_on_drop);
        let mut response = Response::new(Body::Events(rx));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    let stop = shared.clone();
    let choices = shared
        .on_model(move |m, cancelled| {
            if gone.load(Ordering::Relaxed) {
                // The client left while the request waited for the model.
                stop.disconnects.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::invalid("the client disconnected"));
            }
            let mut choices = Vec::with_capacity(n);
            for index in 0..n {
                let mut text = String::new();
                let mut entries = Vec::new();
                let run = Run {
                    params: prepared.params_for(index),
                    logprobs,
                };
                let (stats, rest) = run_generate(m, &prepared, &run, &mut |t, lps| {
                    text.push_str(t);
                    entries.extend(lps);
                    !gone.load(Ordering::Relaxed)
                        && !stop.stop.load(Ordering::Relaxed)
                        && !cancelled()
                })?;
                entries.extend(rest);
                let logprobs = logprobs.map(|_| {
                    LogprobWriter {
                        endpoint,
                        tokenizer: &m.tokenizer,
                        offset: 0,
                    }
                    .json(&entries)
                });
                let cancelled = stats.finish == FinishReason::Cancelled;
                let (text, tool_calls) = match prepared.tools.and_then(|(syntax, _)| {
                    calls_in(syntax, &text, prepared.params_for(index).seed)
                }) {
                    Some((content, calls)) => (content, calls),
                    None => (text, Vec::new()),
                };
                choices.push(Choice {
                    text,
                    stats,
                    logprobs,
                    tool_calls,
                });
                if cancelled {
                    break;
                }
            }
            if gone.load(Ordering::Relaxed) {
                stop.disconnects.fetch_add(1, Ordering::Relaxed);
                log::info!("serve: the client disconnected; generation stopped");
            }
            Ok(choices)
        })
        .await??;
    drop(cancel_on_drop);
    Ok(json_response(200, &shape.answer(&choices)))
}

/// What a streaming request asks for besides its prompt.
pub(super) struct Ask {
    pub(super) n: usize,
    pub(super) logprobs: Option<usize>,
    pub(super) include_usage: bool,
}

/// A streaming generation on the model: events into `tx` until the end, or until the client
/// is gone (the body, and with it the receiver, is dropped).
pub(super) fn stream_events(
    shared: &Shared,
    m: &mut LoadedModel,
    cancelled: &dyn Fn() -> bool,
    prepared: &Prepared,
    shape: &Shape,
    ask: &Ask,
    tx: &mpsc::Sender<Bytes>,
) {
    let send = |event: &Value| {
        tx.blocking_send(Bytes::from(format!("data: {event}\n\n")))
            .is_ok()
    };
    // A client that left while the request waited for the model costs no prefill.
    let mut gone = tx.is_closed();
    let mut all = Vec::with_capacity(ask.n);
    for index in 0..ask.n {
        let opening = Piece {
            index,
            text: None,
            finish: None,
            logprobs: None,
            tool_calls: None,
        };
        gone = gone || (shape.endpoint == Endpoint::Chat && !send(&shape.chunk(opening)));
        if gone {
            break;
        }
        // The prompter's copy of the model's tokenizer (the model is busy generating).
        let mut writer = LogprobWriter {
            endpoint: shape.endpoint,
            tokenizer: &shared.model.prompter.tokenizer,
            offset: 0,
        };
        let run = Run {
            params: prepared.params_for(index),
            logprobs: ask.logprobs,
        };
        // With tools offered, the reply is kept whole and only the part that can't be a call
        // is streamed as it comes.
        let mut full = String::new();
        let mut sent = 0;
        let result = run_generate(m, prepared, &run, &mut |text, lps| {
            let logprobs = ask.logprobs.map(|_| writer.json(&lps));
            let piece_text = match prepared.tools {
                None => Some(text),
                Some((syntax, required)) => {
                    full.push_str(text);
                    let safe = streamable(syntax, &full, required).max(sent);
                    let out = &full[sent..safe];
                    sent = safe;
                    (!out.is_empty()).then_some(out)
                }
            };
            if piece_text.is_some() || logprobs.is_some() {
                let piece = Piece {
                    index,
                    text: Some(piece_text.unwrap_or("")),
                    finish: None,
                    logprobs,
                    tool_calls: None,
                };
                gone = gone || !send(&shape.chunk(piece));
            }
            !gone && !shared.stop.load(Ordering::Relaxed) && !cancelled()
        });
        if gone {
            break;
        }
        match result {
            Ok((stats, rest)) => {
                let mut finish = finish_reason(stats.finish);
                if let Some((syntax, _)) = prepared.tools {
                    let seed = prepared.params_for(index).seed;
                    if let Some((_, calls)) = calls_in(syntax, &full, seed) {
                        // OpenAI's shape: the call's id and name, then its arguments in
                        // pieces.
                        for (k, (id, name, args)) in calls.iter().enumerate() {
                            let head = json!([{"index": k, "id": id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]);
                            let mut deltas = vec![head];
                            let chars: Vec<char> = args.chars().collect();
                            for piece in chars.chunks(24) {
                                let piece: String = piece.iter().collect();
                                deltas
                                    .push(json!([{"index": k, "function": {"arguments": piece}}]));
                            }
                            for d in deltas {
                                let piece = Piece {
                                    index,
                                    text: None,
                                    finish: None,
                                    logprobs: None,
                                    tool_calls: Some(d),
                                };
                                gone = gone || !send(&shape.chunk(piece));
                            }
                        }
                        finish = "tool_calls";
                    } else if sent < full.len() {
                        // Held back in case it was a call, and it was not.
                        let piece = Piece {
                            index,
                            text: Some(&full[sent..]),
                            finish: None,
                            logprobs: None,
                            tool_calls: None,
                        };
                        gone = gone || !send(&shape.chunk(piece));
                    }
                }
                let piece = Piece {
                    index,
                    text: None,
                    finish: Some(finish),
                    logprobs: ask
                        .logprobs
                        .filter(|_| !rest.is_empty())
                        .map(|_| writer.json(&rest)),
                    tool_calls: None,
                };
                let finished = stats.finish;
                all.push(stats);
                if !send(&shape.chunk(piece)) || finished == FinishReason::Cancelled {
                    break;
                }
            }
            Err(e) => {
                send(&e.body());
                break;
            }
        }
    }
    if gone {
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
        log::info!("serve: the client disconnected; generation stopped");
        return;
    }
    if ask.include_usage && !all.is_empty() {
        send(&shape.usage_chunk(&all));
    }
    let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
}

/// The shared token loop, with panics caught. `on_text` gets each piece of text with the
/// log-probabilities of the tokens that made it (when `run` asks for them) and returns false
/// to stop; those of tokens whose text never came (a stop string's) are returned at the end.
pub(super) fn run_generate(
    m: &mut LoadedModel,
    prepared: &Prepared,
    run: &Run,
    on_text: &mut dyn FnMut(&str, Vec<TokenLogprobs>) -> bool,
) -> Result<(GenerationStats, Vec<TokenLogprobs>), ApiError> {
    let mut pending = Vec::new();
    let mut constraint = prepared
        .grammar
        .as_ref()
        .map(|(g, trie)| Constraint::new(g.clone(), trie.clone(), &prepared.eos));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate_constrained(
            &mut *m.model,
            &m.tokenizer,
            &prepared.eos,
            &prepared.tokens,
            &run.params,
            false,
            constraint.as_mut(),
            &mut |step: Step<'_>| {
                if let (Some(top), Some(id), Some(logits)) = (run.logprobs, step.id, step.logits) {
                    pending.push(token_logprobs(logits, id, top));
                }
                if step.text.is_empty() || on_text(step.text, std::mem::take(&mut pending)) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
    }));
    match outcome {
        Ok(Ok(stats)) => Ok((stats, pending)),
        Ok(Err(e)) => Err(ApiError::from_inference(&e)),
        Err(_) => {
            m.model.clear_kv_cache();
            Err(ApiError::server(
                "the generation panicked; the server recovered (please report this)",
            ))
        }
    }
}
