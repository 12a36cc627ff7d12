//! The token loop shared by every model family: prefill, sample, stream, stop.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::grammar::Constraint;
use crate::llm::sampling::{Sampler, SamplingParams};
use crate::llm::text::{StopCheck, StopMatcher, TokenStream, Tokenizer};
use crate::models::CausalLm;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// The model produced its end-of-text token.
    EndOfText,
    /// A stop string was reached.
    StopString,
    /// The context window is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

/// Timing and counts of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    /// Tokens in the prompt, reused ones included.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the previous call
    /// ([`generate_with`]); they were not prefilled again.
    #[serde(default)]
    pub reused_tokens: usize,
    /// Tokens sampled and streamed; an end-of-text token is not counted.
    pub generated_tokens: usize,
    /// From the start of the call to the first sampled token (prefill included).
    pub ttft_ms: f64,
    /// Prompt tokens prefilled (reused ones left out) per second of prefill.
    pub prefill_tok_s: f64,
    /// Single-token forward passes per second, after the first token.
    pub decode_tok_s: f64,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// One streamed step: a generated token and the text it completes.
///
/// `id` is `None` for the final flush of text held back at the end (an incomplete character,
/// or text that looked like the start of a stop string but was not).
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The sampled token; `None` for the final flush.
    pub id: Option<u32>,
    /// Text this step completes, possibly empty (held back while a character or a stop
    /// string may still be forming).
    pub text: &'a str,
    /// The model's logits the token was sampled from (before any penalty or bias); `None`
    /// for the final flush. For log-probabilities ([`crate::llm::logprobs`]).
    pub logits: Option<&'a [f32]>,
}

fn rate(count: usize, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Generates a continuation of `prompt`, calling `on_step` for every token.
///
/// `on_step` returning `ControlFlow::Break` cancels between tokens. End-of-text tokens end
/// generation and are not streamed. Stop strings are never streamed, not even in part.
pub fn generate(
    model: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    eos_token_ids: &[u32],
    prompt: &[u32],
    params: &SamplingParams,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<GenerationStats> {
    generate_with(
        model,
        tokenizer,
        eos_token_ids,
        prompt,
        params,
        false,
        on_step,
    )
}

/// [`generate`]; with `reuse`, the keys and values the model already holds for the start of
/// `prompt` ([`CausalLm::cached_tokens`]) are kept when it can truncate its cache
/// ([`CausalLm::truncate_kv_cache`]), and only the rest of the prompt is prefilled. Inline
/// code completion reuses, as each keystroke changes only the end of the text before the
/// cursor.
pub fn generate_with(
    model: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    eos_token_ids: &[u32],
    prompt: &[u32],
    params: &SamplingParams,
    reuse: bool,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<GenerationStats> {
    generate_constrained(
        model,
        tokenizer,
        eos_token_ids,
        prompt,
        params,
        reuse,
        None,
        on_step,
    )
}

/// [`generate_with`], every token kept inside `constraint`'s grammar when one is given (else
/// the one `params.structured` asks for): the sampler's choice is checked, and when the grammar
/// refuses it the vocabulary is masked and the token drawn again; generation ends when the
/// grammar is complete and allows nothing more.
#[allow(clippy::too_many_arguments)]
pub fn generate_constrained(
    model: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    eos_token_ids: &[u32],
    prompt: &[u32],
    params: &SamplingParams,
    reuse: bool,
    constraint: Option<&mut Constraint>,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<GenerationStats> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    // A given constraint wins; only without one is `params.structured` compiled.
    let mut own = match &constraint {
        Some(_) => None,
        None => params
            .structured
            .compile()?
            .map(|g| Constraint::new(g, crate::llm::grammar::vocab_trie(tokenizer), eos_token_ids)),
    };
    let mut constraint = match own.as_mut() {
        Some(c) => Some(c),
        None => constraint,
    };
    let context = model.context_length();
    if prompt.len() >= context {
        return Err(Error::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let start = Instant::now();
    // At least the last prompt token runs, for its logits.
    let shared = if reuse {
        model
            .cached_tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1)
    } else {
        0
    };
    let reused = if shared > 0 && model.truncate_kv_cache(shared) {
        shared
    } else {
        model.clear_kv_cache();
        0
    };
    let mut sampler = Sampler::new(params.clone());
    let mut stream = TokenStream::new();
    let mut stops = StopMatcher::new(&params.stop);
    let mut history = prompt.to_vec();

    let mut logits = model
        .forward_last(&prompt[reused..], reused)?
        .to_vec1::<f32>()?;

    let prefill_secs = start.elapsed().as_secs_f64();
    let mut ttft_ms = 0.0;
    let mut generated = 0;
    let mut decode_steps = 0;
    let mut decode_secs = 0.0;
    let finish = loop {
        let id = match constraint.as_deref_mut() {
            None => sampler.sample(&logits, &history),
            Some(c) => {
                if c.is_done() {
                    break FinishReason::EndOfText;
                }
                let first = sampler.choose(&logits, &history);
                let id = if c.allows(first) {
                    first
                } else {
                    let mut masked = logits.clone();
                    if c.mask(&mut masked)? == 0 {
                        return Err(Error::InvalidParameter(
                            "the grammar allows no token of this model's vocabulary here".into(),
                        ));
                    }
                    sampler.choose(&masked, &history)
                };
                sampler.note(id);
                c.accept(id)?;
                id
            }
        };
        if generated == 0 {
            ttft_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        if eos_token_ids.contains(&id) {
            break FinishReason::EndOfText;
        }
        generated += 1;
        history.push(id);
        let piece = stream.push(tokenizer, id)?;
        let (text, stopped) = match stops.push(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stop(t) => (t, true),
        };
        if on_step(Step {
            id: Some(id),
            text: &text,
            logits: Some(&logits),
        })
        .is_break()
        {
            break FinishReason::Cancelled;
        }
        if stopped {
            break FinishReason::StopString;
        }
        if generated >= params.max_new_tokens {
            break FinishReason::Length;
        }
        if history.len() >= context {
            break FinishReason::ContextFull;
        }
        let step_start = Instant::now();
        logits = model
            .forward_last(&[id], history.len() - 1)?
            .to_vec1::<f32>()?;
        decode_secs += step_start.elapsed().as_secs_f64();
        decode_steps += 1;
    };
    if finish != FinishReason::StopString && finish != FinishReason::Cancelled {
        let mut rest = String::new();
        let tail = stream.finish(tokenizer)?;
        let (StopCheck::Continue(t) | StopCheck::Stop(t)) = stops.push(&tail);
        rest.push_str(&t);
        rest.push_str(&stops.finish());
        if !rest.is_empty() {
            let _ = on_step(Step {
                id: None,
                text: &rest,
                logits: None,
            });
        }
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        reused_tokens: reused,
        generated_tokens: generated,
        ttft_ms,
        prefill_tok_s: rate(prompt.len() - reused, prefill_secs),
        decode_tok_s: rate(decode_steps, decode_secs),
        finish,
    })
}
