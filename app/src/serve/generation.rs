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
use serde_json::Value;
use studio_inference::llm::chat::build_chat_prompt;
use studio_inference::llm::generate::{GenerationStats, Step, generate};
use studio_inference::llm::loader::LoadedModel;
use studio_inference::llm::sampling::SamplingParams;
use tokio::sync::mpsc;

use super::openai::{Endpoint, Job, Prompt, Shape, finish_reason};
use super::transport::{ApiError, Body, json_response};
use super::{Prompter, Shared, unix_time};

/// A request turned into tokens, ready for the model.
pub(super) struct Prepared {
    pub(super) tokens: Vec<u32>,
    pub(super) eos: Vec<u32>,
    pub(super) params: SamplingParams,
}

/// Renders the template and tokenizes (no model needed).
pub(super) fn prepare(
    p: &Prompter,
    prompt: &Prompt,
    params: SamplingParams,
) -> Result<Prepared, ApiError> {
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
                &p.chat,
                p.context,
                system,
                messages,
                params.max_new_tokens,
            )
            .map_err(|e| ApiError::from_inference(&e))?
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
    })
}

/// Sets its flag when dropped: the handler's future is dropped when its client disconnects.
pub(super) struct CancelOnDrop(Arc<AtomicBool>);

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
    } = job;
    // The client going away from here on cancels (the future is dropped).
    let gone = Arc::new(AtomicBool::new(false));
    let cancel_on_drop = CancelOnDrop(gone.clone());
    let prepared = {
        let _permit = shared
            .preparing
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is stopping"))?;
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || prepare(&shared.model.prompter, &prompt, params))
            .await
            .map_err(|e| ApiError::server(format!("preparing the prompt failed: {e}")))??
    };
    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let created = unix_time();
    let shape = Shape {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{created:x}{n:04x}"),
            Endpoint::Completions => format!("cmpl-{created:x}{n:04x}"),
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
                        stream_events(&shared, m, cancelled, &prepared, &shape, include_usage, &tx);
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
    let (text, stats) = shared
        .on_model(move |m, cancelled| {
            let mut text = String::new();
            let result = if gone.load(Ordering::Relaxed) {
                // The client left while the request waited for the model.
                Err(ApiError::invalid("the client disconnected"))
            } else {
                run_generate(m, &prepared, &mut |t| {
                    text.push_str(t);
                    !gone.load(Ordering::Relaxed)
                        && !stop.stop.load(Ordering::Relaxed)
                        && !cancelled()
                })
            };
            if gone.load(Ordering::Relaxed) {
                stop.disconnects.fetch_add(1, Ordering::Relaxed);
                log::info!("serve: the client disconnected; generation stopped");
            }
            result.map(|stats| (text, stats))
        })
        .await??;
    drop(cancel_on_drop);
    Ok(json_response(200, &shape.answer(&text, &stats)))
}

/// A streaming generation on the model: events into `tx` until the end, or until the client
/// is gone (the body, and with it the receiver, is dropped).
pub(super) fn stream_events(
    shared: &Shared,
    m: &mut LoadedModel,
    cancelled: &dyn Fn() -> bool,
    prepared: &Prepared,
    shape: &Shape,
    include_usage: bool,
    tx: &mpsc::Sender<Bytes>,
) {
    let send = |event: &Value| {
        tx.blocking_send(Bytes::from(format!("data: {event}\n\n")))
            .is_ok()
    };
    // A client that left while the request waited for the model costs no prefill.
    let mut gone =
        tx.is_closed() || (shape.endpoint == Endpoint::Chat && !send(&shape.chunk(None, None)));
    let result = run_generate(m, prepared, &mut |text| {
        gone = gone || !send(&shape.chunk(Some(text), None));
        !gone && !shared.stop.load(Ordering::Relaxed) && !cancelled()
    });
    if gone {
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
        log::info!("serve: the client disconnected; generation stopped");
        return;
    }
    match result {
        Ok(stats) => {
            let _ = send(&shape.chunk(None, Some(finish_reason(stats.finish))))
                && (!include_usage || send(&shape.usage_chunk(&stats)));
        }
        Err(e) => {
            send(&e.body());
        }
    }
    let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
}

/// The shared token loop, with panics caught; `on_text` returns false to stop.
pub(super) fn run_generate(
    m: &mut LoadedModel,
    prepared: &Prepared,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationStats, ApiError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(
            &mut *m.model,
            &m.tokenizer,
            &prepared.eos,
            &prepared.tokens,
            &prepared.params,
            &mut |step: Step<'_>| {
                if step.text.is_empty() || on_text(step.text) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
    }));
    match outcome {
        Ok(Ok(stats)) => Ok(stats),
        Ok(Err(e)) => Err(ApiError::from_inference(&e)),
        Err(_) => {
            m.model.clear_kv_cache();
            Err(ApiError::server(
                "the generation panicked; the server recovered (please report this)",
            ))
        }
    }
}
