//! The language-model jobs: loading a model or connecting a server, plain generation, chat,
//! inline completion and Code Assist's actions.

use std::path::Path;

use super::context::{JobContext, RemoteRequest, progress_sender, stream_steps};
use super::{Backend, Event, LoadOptions};
use crate::code::actions::{ActionInput, ActionPreset, build_action_prompt, estimate_tokens};
use crate::code::complete::{self, CompletionRequest};
use crate::error::{Error, Result};
use crate::llm::chat::ChatMessage;
use crate::llm::generate::GenerationStats;
use crate::llm::loader;
use crate::llm::remote::{RemoteBackend, RemoteConfig};
use crate::llm::sampling::SamplingParams;

/// What a text job returns: its statistics, or `None` for jobs that generate nothing.
type Outcome = Result<Option<GenerationStats>>;

/// [`super::JobKind::LoadModel`].
pub(super) fn load_model(ctx: &mut JobContext<'_>, path: &Path, options: &LoadOptions) -> Outcome {
    let job = ctx.job;
    ctx.progress(0.0, "checking files");
    // Check the new model before giving up the loaded one: a wrong file (a pickle, a corrupt
    // header, an unsupported architecture) leaves the current model in place.
    let prepared = loader::prepare(path, ctx.device)?;
    // Free the old model before reading the new weights, so two never share memory.
    if ctx.backend.take().is_some() {
        ctx.send(Event::ModelUnloaded { job });
    }
    let mut progress = progress_sender(ctx.events, ctx.repaint, job);
    let mut loaded = prepared.load(ctx.device, &mut progress)?;
    if let Some(n) = options.context_length {
        loaded.info.context_length = loaded.model.set_context_length(n);
    }
    let info = loaded.info.clone();
    *ctx.backend = Some(Backend::Local(Box::new(loaded)));
    ctx.send(Event::ModelLoaded { job, info });
    Ok(None)
}

/// [`super::JobKind::ConnectRemote`].
pub(super) fn connect_remote(ctx: &mut JobContext<'_>, config: &RemoteConfig) -> Outcome {
    let job = ctx.job;
    ctx.progress(0.0, "connecting");
    // Check the server before giving up the current backend.
    let Some(remote) = RemoteBackend::connect(config, ctx.cancel)? else {
        return Ok(None); // cancelled: the current backend stays
    };
    if ctx.backend.take().is_some() {
        ctx.send(Event::ModelUnloaded { job });
    }
    let info = remote.info().clone();
    *ctx.backend = Some(Backend::Remote(Box::new(remote)));
    ctx.send(Event::ModelLoaded { job, info });
    Ok(None)
}

/// [`super::JobKind::UnloadModel`].
pub(super) fn unload_model(ctx: &mut JobContext<'_>) {
    *ctx.backend = None;
    ctx.send(Event::ModelUnloaded { job: ctx.job });
}

/// [`super::JobKind::Generate`]: a raw prompt continued.
pub(super) fn generate(ctx: &mut JobContext<'_>, prompt: &str, params: &SamplingParams) -> Outcome {
    let m = match ctx.backend.as_ref() {
        None => return Err(Error::NoModelLoaded),
        Some(Backend::Remote(_)) => {
            return ctx.generate_remote(&RemoteRequest::Completion { prompt, params });
        }
        Some(Backend::Local(m)) => m,
    };
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let tokens = m.tokenizer.encode(prompt)?;
    let eos = m.eos_token_ids.clone();
    ctx.generate(&tokens, params, &eos)
}

/// [`super::JobKind::Chat`]: the conversation's reply.
pub(super) fn chat(
    ctx: &mut JobContext<'_>,
    system: &str,
    messages: &[ChatMessage],
    params: SamplingParams,
) -> Outcome {
    let m = match ctx.backend.as_ref() {
        None => return Err(Error::NoModelLoaded),
        Some(Backend::Remote(_)) => {
            return ctx.generate_remote(&RemoteRequest::Chat {
                system,
                messages,
                params: &params,
            });
        }
        Some(Backend::Local(m)) => m,
    };
    let reply = m.chat_reply(system, messages, params)?;
    if let Some(message) = reply.notice {
        ctx.send(Event::Notice {
            job: ctx.job,
            message,
        });
    }
    if reply.dropped_messages > 0 {
        ctx.send(Event::ContextTrimmed {
            job: ctx.job,
            dropped_messages: reply.dropped_messages,
            prompt_tokens: reply.tokens.len(),
        });
    }
    ctx.generate(&reply.tokens, &reply.params, &reply.eos)
}

/// [`super::JobKind::CodeAction`]: the action's prompt, cut to the context, run as a chat.
pub(super) fn code_action(
    ctx: &mut JobContext<'_>,
    preset: &ActionPreset,
    input: &ActionInput,
    params: SamplingParams,
) -> Outcome {
    let reserve = params.max_new_tokens + 16;
    let prompt = match ctx.backend.as_ref() {
        None => return Err(Error::NoModelLoaded),
        Some(Backend::Local(m)) => {
            let budget = m.model.context_length().saturating_sub(reserve);
            let count = |s: &str| m.tokenizer.encode(s).map_or(s.len(), |ids| ids.len());
            build_action_prompt(preset, input, budget, &count)?
        }
        Some(Backend::Remote(r)) => {
            let budget = r.info().context_length.saturating_sub(reserve);
            build_action_prompt(preset, input, budget, &estimate_tokens)?
        }
    };
    for cut in &prompt.cut {
        ctx.send(Event::Notice {
            job: ctx.job,
            message: format!("Context cut: {cut}"),
        });
    }
    let messages = prompt.messages();
    chat(ctx, &prompt.system, &messages, params)
}

/// [`super::JobKind::Complete`]: the FIM prompt's size, then the suggestion streamed as text.
pub(super) fn complete(ctx: &mut JobContext<'_>, request: &CompletionRequest) -> Outcome {
    let (cancel, events, repaint, job) = (ctx.cancel, ctx.events, ctx.repaint, ctx.job);
    let m = match ctx.backend.as_mut() {
        None => return Err(Error::NoModelLoaded),
        Some(Backend::Remote(_)) => {
            return Err(Error::InvalidParameter(
                "inline completion needs a local model: a server's API has no \
                 fill-in-the-middle prompts"
                    .to_owned(),
            ));
        }
        Some(Backend::Local(m)) => m,
    };
    let prompt = complete::completion_prompt(m, request)?;
    let _ = events.send(Event::PromptTokens {
        job,
        tokens: prompt.tokens.len(),
    });
    repaint();
    let pending = &mut ctx.pending_text;
    let pending_tokens = &mut ctx.pending_tokens;
    let outcome = complete::run_completion_with_prompt(
        m,
        request,
        prompt,
        &mut stream_steps(events, repaint, job, pending, pending_tokens, cancel),
    )?;
    Ok(Some(outcome.stats))
}
