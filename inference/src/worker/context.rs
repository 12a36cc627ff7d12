//! What a running job sees ([`JobContext`]: its id, cancel flag, the device and the loaded
//! models) and how it streams: text coalesced when the event channel is full, lossy progress.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Sender, TrySendError};

use super::{Backend, ControlNets, Event, GanSlots, JobId, PreviewSlot};
use crate::diffusion::model::SdModel;
use crate::error::{Error, Result};
use crate::gan::StyleGan2;
use crate::llm::chat::ChatMessage;
use crate::llm::generate::{GenerationStats, Step, generate};
use crate::llm::loader::LoadedModel;
use crate::llm::remote::RemoteBackend;
use crate::llm::sampling::SamplingParams;

/// What a running job can see and do.
pub struct JobContext<'a> {
    pub(super) job: JobId,
    pub(super) cancel: &'a AtomicBool,
    pub(super) events: &'a Sender<Event>,
    pub(super) repaint: &'a Arc<dyn Fn() + Send + Sync>,
    pub(super) backend: &'a mut Option<Backend>,
    pub(super) image_model: &'a mut Option<Box<SdModel>>,
    /// The ControlNets the last generation used, by path.
    pub(super) controlnets: &'a mut ControlNets,
    /// The SDXL refiner the last generation used, by path.
    pub(super) refiner: &'a mut Option<(std::path::PathBuf, Box<SdModel>)>,
    pub(super) gan: &'a mut Option<Box<StyleGan2>>,
    pub(super) gan_slots: &'a GanSlots,
    pub(super) previews: &'a PreviewSlot,
    pub(super) device: &'a candle_core::Device,
    pub(super) pending_text: String,
    pub(super) pending_tokens: usize,
}

impl<'a> JobContext<'a> {
    /// The id of the running job.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// Whether the job has been asked to stop; long work checks it between steps.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The job's cancel flag, to check while the model is borrowed ([`Self::model`]).
    pub fn cancel_flag(&self) -> &'a AtomicBool {
        self.cancel
    }

    /// The device the worker runs on.
    pub fn device(&self) -> &candle_core::Device {
        self.device
    }

    /// The loaded local model, if any (`None` when a remote server is connected).
    pub fn model(&mut self) -> Option<&mut LoadedModel> {
        match self.backend.as_mut() {
            Some(Backend::Local(m)) => Some(&mut **m),
            _ => None,
        }
    }

    /// The connected OpenAI-compatible server, if any.
    pub fn remote(&self) -> Option<&RemoteBackend> {
        match self.backend.as_ref() {
            Some(Backend::Remote(r)) => Some(&**r),
            _ => None,
        }
    }

    /// Sends an event that may be dropped when the UI is behind (progress).
    pub fn send_lossy(&self, event: Event) {
        if self.events.try_send(event).is_ok() {
            (self.repaint)();
        }
    }

    /// Sends an event that must arrive.
    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
        (self.repaint)();
    }

    /// Reports progress as [`Event::Progress`] (`fraction` from 0 to 1); dropped when the
    /// event channel is full.
    pub fn progress(&self, fraction: f32, message: &str) {
        self.send_lossy(Event::Progress {
            job: self.job,
            fraction,
            message: message.to_owned(),
        });
    }

    /// Queues streamed text; it is sent now if the channel has room, else with the next
    /// piece (`force` blocks until it is sent).
    pub fn push_text(&mut self, text: &str, tokens: usize) {
        self.pending_text.push_str(text);
        self.pending_tokens += tokens;
        self.flush_text(false);
    }

    pub(super) fn flush_text(&mut self, force: bool) {
        send_text(
            self.events,
            self.repaint,
            self.job,
            &mut self.pending_text,
            &mut self.pending_tokens,
            force,
        );
    }

    /// Runs the shared token loop on the loaded model until one of `eos` (or a stop), streaming
    /// into this job's events.
    pub(super) fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        eos: &[u32],
    ) -> Result<Option<GenerationStats>> {
        self.send(Event::PromptTokens {
            job: self.job,
            tokens: prompt.len(),
        });
        let Some(Backend::Local(m)) = self.backend.as_mut() else {
            return Err(Error::NoModelLoaded);
        };
        let (cancel, events, repaint, job) = (self.cancel, self.events, self.repaint, self.job);
        // Text not yet sent because the channel was full; the caller flushes what is left.
        let pending = &mut self.pending_text;
        let pending_tokens = &mut self.pending_tokens;
        let stats = generate(
            &mut *m.model,
            &m.tokenizer,
            eos,
            prompt,
            params,
            &mut stream_steps(events, repaint, job, pending, pending_tokens, cancel),
        )?;
        Ok(Some(stats))
    }

    /// Streams a chat reply or a completion from the connected server into this job's events;
    /// every delta the server sends counts as one token.
    pub(super) fn generate_remote(
        &mut self,
        request: &RemoteRequest<'_>,
    ) -> Result<Option<GenerationStats>> {
        let Some(Backend::Remote(remote)) = self.backend.as_ref() else {
            return Err(Error::NoModelLoaded);
        };
        let (cancel, events, repaint, job) = (self.cancel, self.events, self.repaint, self.job);
        let pending = &mut self.pending_text;
        let pending_tokens = &mut self.pending_tokens;
        let mut on_text = |text: &str| {
            pending.push_str(text);
            *pending_tokens += 1;
            send_text(events, repaint, job, pending, pending_tokens, false);
        };
        let stats = match *request {
            RemoteRequest::Chat {
                system,
                messages,
                params,
            } => remote.chat(system, messages, params, cancel, &mut on_text)?,
            RemoteRequest::Completion { prompt, params } => {
                remote.complete(prompt, params, cancel, &mut on_text)?
            }
        };
        Ok(Some(stats))
    }
}

/// Sends the accumulated text as one [`Event::Text`]. Without `force`, a full channel leaves
/// the text in place to be sent with the next piece (coalescing); with `force` it blocks.
/// The token loop's callback for a job: each step's text goes out as coalesced [`Event::Text`]
/// (what the channel cannot take yet waits in `pending`); a set `cancel` stops the loop.
pub(super) fn stream_steps<'a>(
    events: &'a Sender<Event>,
    repaint: &'a Arc<dyn Fn() + Send + Sync>,
    job: JobId,
    pending: &'a mut String,
    pending_tokens: &'a mut usize,
    cancel: &'a AtomicBool,
) -> impl FnMut(Step<'_>) -> ControlFlow<()> + 'a {
    move |step: Step<'_>| {
        pending.push_str(step.text);
        *pending_tokens += usize::from(step.id.is_some());
        send_text(events, repaint, job, pending, pending_tokens, false);
        if cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

pub(super) fn send_text(
    events: &Sender<Event>,
    repaint: &Arc<dyn Fn() + Send + Sync>,
    job: JobId,
    text: &mut String,
    tokens: &mut usize,
    force: bool,
) {
    if text.is_empty() && *tokens == 0 {
        return;
    }
    let event = Event::Text {
        job,
        text: std::mem::take(text),
        tokens: std::mem::take(tokens),
    };
    if force {
        let _ = events.send(event);
        repaint();
        return;
    }
    match events.try_send(event) {
        Ok(()) => repaint(),
        Err(TrySendError::Full(Event::Text {
            text: t, tokens: n, ..
        })) => {
            *text = t;
            *tokens = n;
        }
        Err(_) => {}
    }
}

/// A loading-progress callback that sends lossy [`Event::Progress`] events.
pub(super) fn progress_sender<'a>(
    events: &'a Sender<Event>,
    repaint: &'a Arc<dyn Fn() + Send + Sync>,
    job: JobId,
) -> impl FnMut(f32, &str) + 'a {
    move |fraction, message| {
        let event = Event::Progress {
            job,
            fraction,
            message: message.to_owned(),
        };
        if events.try_send(event).is_ok() {
            repaint();
        }
    }
}

/// A generation for the remote backend.
pub(super) enum RemoteRequest<'a> {
    Chat {
        system: &'a str,
        messages: &'a [ChatMessage],
        params: &'a SamplingParams,
    },
    Completion {
        prompt: &'a str,
        params: &'a SamplingParams,
    },
}
