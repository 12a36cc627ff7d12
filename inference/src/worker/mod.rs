//! The inference worker: one named thread that owns the device and the loaded model.
//!
//! Jobs go in and events come out over bounded channels. The protocol's guarantees:
//! - every submitted job ends with exactly one terminal event ([`Event::Done`],
//!   [`Event::Failed`] or [`Event::Cancelled`]), including jobs cancelled while queued;
//! - cancellation is checked between tokens;
//! - a panic inside a job becomes [`Event::Failed`] and the worker serves the next job;
//! - streamed text is coalesced: when the event channel is full the worker keeps generating
//!   and sends the accumulated text later, so a slow UI never builds a backlog;
//! - after sending events the worker calls the repaint callback, the only UI-facing thing this
//!   crate knows about.
//!
//! The worker holds one backend at a time: a local model ([`JobKind::LoadModel`]) or an
//! OpenAI-compatible server ([`JobKind::ConnectRemote`]). Chat and generate jobs work the same
//! on both: text streams as [`Event::Text`], cancel is honoured, one terminal event ends them.
//!
//! Beside it the worker holds at most one Stable Diffusion model ([`JobKind::LoadImageModel`]),
//! so chat and the Canvas can both be ready. Image generation reports each step as a lossy
//! [`Event::ImageProgress`]; the step's preview image goes into a one-slot mailbox
//! ([`Worker::take_preview`]) that each new preview overwrites, so a slow frame never queues
//! stale images. Finished images arrive as [`Event::ImageReady`]; cancel is checked every step.
//!
//! The worker also holds at most one StyleGAN2 generator ([`JobKind::LoadGan`]) for the Latent
//! Explorer. Its renders are not jobs: [`Worker::render_gan`] overwrites a one-slot request
//! mailbox and wakes the worker, which renders only the newest request between jobs and puts
//! the result in a one-slot result mailbox ([`Worker::take_gan_frame`]). A burst of slider
//! changes therefore renders far fewer frames than were asked for, and never queues stale
//! ones. The seed browser's thumbnails use a second pair of slots
//! ([`Worker::render_gan_grid`], [`Worker::take_gan_grid`]). PCA directions are a cancellable
//! job with progress ([`JobKind::ComputeGanDirections`]).
//!
//! Files: `protocol` (jobs, events, configuration), `context` (what a running job sees, and
//! text streaming with coalescing), and one module per domain holding its job bodies: `llm`,
//! `image`, `gan`. This file holds the thread, the [`Worker`] handle and `execute`, the
//! dispatch from a job to its body. The GAN render requests and rendering itself are
//! [`crate::gan::render`].

mod context;
mod gan;
mod image;
mod llm;
mod protocol;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

pub use context::JobContext;
pub use protocol::{
    CustomJob, Event, GeneratedImageSource, JobId, JobKind, LoadOptions, PreviewFrame, WorkerConfig,
};

use crate::code::complete::FimSupport;
use crate::device::create_device;
use crate::diffusion::model::SdModel;
use crate::error::{Error, Result};
use crate::gan::StyleGan2;
use crate::gan::render::{
    GanFrame, GanGrid, GanGridRequest, GanRenderRequest, render_gan, render_gan_grid,
};
use crate::llm::generate::GenerationStats;
use crate::llm::loader::LoadedModel;
use crate::llm::remote::RemoteBackend;

type CancelFlags = Arc<Mutex<HashMap<JobId, Arc<AtomicBool>>>>;

type PreviewSlot = Arc<Mutex<Option<PreviewFrame>>>;
/// Loaded ControlNets by path: those the last generation used.
type ControlNets = HashMap<std::path::PathBuf, Arc<crate::diffusion::controlnet::ControlNet>>;

/// The one-slot mailboxes between [`Worker`] and the worker thread for GAN renders.
#[derive(Default)]
struct GanSlots {
    request: Mutex<Option<GanRenderRequest>>,
    grid_request: Mutex<Option<GanGridRequest>>,
    frame: Mutex<Option<GanFrame>>,
    grid: Mutex<Option<GanGrid>>,
    /// Renders actually done (a burst of requests renders far fewer).
    renders: AtomicU64,
}

struct QueuedJob {
    id: JobId,
    kind: JobKind,
    cancel: Arc<AtomicBool>,
}

/// The UI's handle to the worker thread. Dropping it stops the worker after its current job.
pub struct Worker {
    submitter: JobSubmitter,
    events: Receiver<Event>,
    cancels: CancelFlags,
    previews: PreviewSlot,
    gan_slots: Arc<GanSlots>,
    gan_wake: Sender<()>,
    fim: Arc<Mutex<FimSupport>>,
    device_label: String,
    device_warning: Option<String>,
    /// The NVIDIA GPU's index, when the device is one.
    cuda: Option<usize>,
    thread: Option<JoinHandle<()>>,
}

/// Queues jobs on a [`Worker`] from any thread ([`Worker::submitter`]).
#[derive(Clone)]
pub struct JobSubmitter {
    /// `None` once the worker is dropped (so a submitter never keeps it alive).
    jobs: Arc<Mutex<Option<Sender<QueuedJob>>>>,
    next_id: Arc<AtomicU64>,
    cancels: CancelFlags,
}

impl JobSubmitter {
    /// Queues a job. Fails only when the queue is full or the worker is gone.
    pub fn submit(&self, kind: JobKind) -> Result<JobId> {
        let id = JobId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let cancel = Arc::new(AtomicBool::new(false));
        lock(&self.cancels).insert(id, cancel.clone());
        let queued = QueuedJob { id, kind, cancel };
        let sent = match &*lock(&self.jobs) {
            Some(tx) => tx.try_send(queued).map_err(|e| match e {
                TrySendError::Full(_) => "the job queue is full; wait for running jobs to finish",
                TrySendError::Disconnected(_) => "the inference worker has stopped",
            }),
            None => Err("the inference worker has stopped"),
        };
        if let Err(why) = sent {
            lock(&self.cancels).remove(&id);
            return Err(Error::InvalidParameter(why.to_owned()));
        }
        Ok(id)
    }
}

impl Worker {
    /// Opens the device and starts the `studio-inference` thread.
    pub fn spawn(config: WorkerConfig) -> Result<Self> {
        let choice = create_device(config.device);
        let (job_tx, job_rx) = bounded::<QueuedJob>(config.queue_capacity.max(1));
        let (event_tx, event_rx) = bounded::<Event>(config.event_capacity.max(4));
        let cancels: CancelFlags = Arc::default();
        let previews: PreviewSlot = Arc::default();
        let gan_slots: Arc<GanSlots> = Arc::default();
        let (gan_wake, wake_rx) = bounded::<()>(1);
        let fim: Arc<Mutex<FimSupport>> = Arc::default();
        let state = WorkerState {
            fim: fim.clone(),
            device: choice.device.clone(),
            backend: None,
            image_model: None,
            controlnets: ControlNets::new(),
            refiner: None,
            gan: None,
            gan_slots: gan_slots.clone(),
            previews: previews.clone(),
            events: event_tx,
            repaint: config.repaint,
            cancels: cancels.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("studio-inference".to_owned())
            .spawn(move || state.run(&job_rx, &wake_rx))
            .map_err(|e| Error::io("studio-inference thread", e))?;
        Ok(Self {
            submitter: JobSubmitter {
                jobs: Arc::new(Mutex::new(Some(job_tx))),
                next_id: Arc::new(AtomicU64::new(1)),
                cancels: cancels.clone(),
            },
            events: event_rx,
            cancels,
            previews,
            gan_slots,
            gan_wake,
            fim,
            device_label: choice.label,
            device_warning: choice.warning,
            cuda: choice.cuda,
            thread: Some(thread),
        })
    }

    /// Whether the loaded model can do inline completion (its FIM format), or why not. Updated
    /// when each job ends, before its terminal event: after a load job's `Done` it describes
    /// the new model.
    pub fn fim_support(&self) -> FimSupport {
        lock(&self.fim).clone()
    }

    /// "CPU (2 threads)", "CUDA 0", …
    pub fn device_label(&self) -> &str {
        &self.device_label
    }

    /// The NVIDIA GPU's index, when the worker runs on one.
    pub fn cuda_index(&self) -> Option<usize> {
        self.cuda
    }

    /// Set when the preferred device could not be opened.
    pub fn device_warning(&self) -> Option<&str> {
        self.device_warning.as_deref()
    }

    /// Queues a job. Fails only when the queue is full or the worker is gone.
    pub fn submit(&self, kind: JobKind) -> Result<JobId> {
        self.submitter.submit(kind)
    }

    /// A handle other threads can queue jobs with (the API server started from the GUI). Its
    /// jobs' events come to this worker's receiver like any other's; once the worker is
    /// dropped, it refuses jobs.
    pub fn submitter(&self) -> JobSubmitter {
        self.submitter.clone()
    }

    /// Asks a queued or running job to stop. Unknown or finished jobs are ignored.
    pub fn cancel(&self, job: JobId) {
        if let Some(flag) = lock(&self.cancels).get(&job) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Cancels every queued and running job.
    pub fn cancel_all(&self) {
        for flag in lock(&self.cancels).values() {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// The event receiver, for `try_recv` loops and `select!`.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Next event if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Takes the newest denoising preview, if one arrived since the last call.
    pub fn take_preview(&self) -> Option<PreviewFrame> {
        lock(&self.previews).take()
    }

    /// Asks for a render of the loaded GAN, replacing any request not yet started (only the
    /// newest renders). The result arrives in [`Self::take_gan_frame`].
    pub fn render_gan(&self, request: GanRenderRequest) {
        *lock(&self.gan_slots.request) = Some(request);
        // A full wake channel already means "look at the slots".
        let _ = self.gan_wake.try_send(());
    }

    /// Asks for seed-browser thumbnails, replacing any grid request not yet started.
    pub fn render_gan_grid(&self, request: GanGridRequest) {
        *lock(&self.gan_slots.grid_request) = Some(request);
        let _ = self.gan_wake.try_send(());
    }

    /// The newest finished render, if one arrived since the last call.
    pub fn take_gan_frame(&self) -> Option<GanFrame> {
        lock(&self.gan_slots.frame).take()
    }

    /// The newest finished thumbnail grid, if one arrived since the last call.
    pub fn take_gan_grid(&self) -> Option<GanGrid> {
        lock(&self.gan_slots.grid).take()
    }

    /// How many GAN renders (main image, not thumbnails) the worker has done.
    pub fn gan_renders(&self) -> u64 {
        self.gan_slots.renders.load(Ordering::Relaxed)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel_all();
        lock(&self.submitter.jobs).take();
        // Unblock a worker waiting to send into a full event channel.
        while self.events.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            // Keep draining while the worker finishes its current job.
            while !t.is_finished() {
                while self.events.try_recv().is_ok() {}
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What chat and generate jobs run on.
enum Backend {
    Local(Box<LoadedModel>),
    Remote(Box<RemoteBackend>),
}

struct WorkerState {
    /// What [`Worker::fim_support`] reports.
    fim: Arc<Mutex<FimSupport>>,
    device: candle_core::Device,
    backend: Option<Backend>,
    image_model: Option<Box<SdModel>>,
    controlnets: ControlNets,
    refiner: Option<(std::path::PathBuf, Box<SdModel>)>,
    gan: Option<Box<StyleGan2>>,
    gan_slots: Arc<GanSlots>,
    previews: PreviewSlot,
    events: Sender<Event>,
    repaint: Arc<dyn Fn() + Send + Sync>,
    cancels: CancelFlags,
}

impl WorkerState {
    fn run(mut self, jobs: &Receiver<QueuedJob>, wake: &Receiver<()>) {
        loop {
            // Pending renders go before the next job: they are quick and the user is waiting.
            self.render_pending();
            let queued = crossbeam_channel::select! {
                recv(jobs) -> job => match job {
                    Ok(job) => job,
                    Err(_) => break,
                },
                recv(wake) -> _ => continue,
            };
            let QueuedJob { id, kind, cancel } = queued;
            let terminal = if cancel.load(Ordering::Relaxed) {
                Event::Cancelled {
                    job: id,
                    stats: None,
                }
            } else {
                self.send(Event::Started {
                    job: id,
                    label: kind.label(),
                });
                self.run_job(id, kind, &cancel)
            };
            lock(&self.cancels).remove(&id);
            let fim = match self.backend.as_ref() {
                Some(Backend::Local(m)) => FimSupport::of(Some(m), false),
                Some(Backend::Remote(_)) => FimSupport::of(None, true),
                None => FimSupport::NoModel,
            };
            *lock(&self.fim) = fim;
            self.send(terminal);
        }
    }

    /// Renders the newest main request and the newest grid request, if any.
    fn render_pending(&mut self) {
        let request = lock(&self.gan_slots.request).take();
        if let Some(request) = request {
            let start = std::time::Instant::now();
            let (result, layer) =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    render_gan(self.gan.as_deref(), &request)
                }))
                .unwrap_or_else(|p| Err(Error::Panicked(crate::panic_message(p.as_ref()))))
                {
                    Ok((image, layer)) => (Ok(image), layer.map(|l| l.map_err(|e| e.to_string()))),
                    Err(e) => (Err(e.to_string()), None),
                };
            self.gan_slots.renders.fetch_add(1, Ordering::Relaxed);
            *lock(&self.gan_slots.frame) = Some(GanFrame {
                id: request.id,
                result,
                render_ms: start.elapsed().as_secs_f32() * 1000.0,
                layer,
            });
            (self.repaint)();
            if lock(&self.gan_slots.request).is_some() {
                // A newer main request came in meanwhile (a drag): it goes before thumbnails.
                return;
            }
        }
        let grid = lock(&self.gan_slots.grid_request).take();
        if let Some(grid) = grid {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                render_gan_grid(self.gan.as_deref(), &grid)
            }))
            .unwrap_or_else(|p| Err(Error::Panicked(crate::panic_message(p.as_ref()))))
            .map_err(|e| e.to_string());
            *lock(&self.gan_slots.grid) = Some(GanGrid {
                id: grid.id,
                result,
            });
            (self.repaint)();
        }
    }

    /// Runs one job, turning errors and panics into the terminal event.
    fn run_job(&mut self, id: JobId, kind: JobKind, cancel: &AtomicBool) -> Event {
        let mut ctx = JobContext {
            job: id,
            cancel,
            events: &self.events,
            repaint: &self.repaint,
            backend: &mut self.backend,
            image_model: &mut self.image_model,
            controlnets: &mut self.controlnets,
            refiner: &mut self.refiner,
            gan: &mut self.gan,
            gan_slots: &self.gan_slots,
            previews: &self.previews,
            device: &self.device,
            pending_text: String::new(),
            pending_tokens: 0,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let result = execute(&mut ctx, kind);
            ctx.flush_text(true);
            result
        }));
        match outcome {
            Ok(Ok(stats)) => {
                let cancelled = cancel.load(Ordering::Relaxed)
                    || stats
                        .as_ref()
                        .is_some_and(|s| s.finish == crate::llm::generate::FinishReason::Cancelled);
                if cancelled {
                    Event::Cancelled { job: id, stats }
                } else {
                    Event::Done { job: id, stats }
                }
            }
            Ok(Err(e)) => Event::Failed {
                job: id,
                error: e.to_string(),
            },
            Err(payload) => {
                // The model may be mid-update; make the next generation start clean.
                if let Some(Backend::Local(m)) = self.backend.as_mut() {
                    m.model.clear_kv_cache();
                }
                let msg = crate::panic_message(payload.as_ref());
                Event::Failed {
                    job: id,
                    error: Error::Panicked(msg).to_string(),
                }
            }
        }
    }

    fn send(&self, event: Event) {
        // Terminal events must arrive: block until the UI makes room (or is gone).
        let _ = self.events.send(event);
        (self.repaint)();
    }
}

/// Runs one job's body: the dispatch from each [`JobKind`] to its domain's module.
fn execute(ctx: &mut JobContext<'_>, kind: JobKind) -> Result<Option<GenerationStats>> {
    let done = |r: Result<()>| r.map(|()| None);
    match kind {
        JobKind::LoadModel { path, options } => llm::load_model(ctx, &path, &options),
        JobKind::ConnectRemote { config } => llm::connect_remote(ctx, &config),
        JobKind::UnloadModel => {
            llm::unload_model(ctx);
            Ok(None)
        }
        JobKind::Generate { prompt, params } => llm::generate(ctx, &prompt, &params),
        JobKind::Chat {
            system,
            messages,
            params,
        } => llm::chat(ctx, &system, &messages, params),
        JobKind::Complete { request } => llm::complete(ctx, &request),
        JobKind::CodeAction {
            preset,
            input,
            params,
        } => llm::code_action(ctx, &preset, &input, params),
        JobKind::LoadImageModel { path, options } => {
            done(image::load_image_model(ctx, &path, &options))
        }
        JobKind::UnloadImageModel => {
            image::unload_image_model(ctx);
            Ok(None)
        }
        JobKind::GenerateImage {
            request,
            control,
            refiner,
        } => done(image::generate_image(
            ctx,
            *request,
            &control,
            refiner.as_deref(),
        )),
        JobKind::UpscaleImage {
            image,
            parameters,
            upscaler,
            scale,
        } => done(image::upscale_image(
            ctx,
            &image,
            *parameters,
            &upscaler,
            scale,
        )),
        JobKind::LoadGan { path } => done(gan::load_gan(ctx, &path)),
        JobKind::UnloadGan => {
            gan::unload_gan(ctx);
            Ok(None)
        }
        JobKind::ComputeGanDirections {
            samples,
            components,
            seed,
        } => done(gan::directions(ctx, samples, components, seed)),
        JobKind::ProjectGan {
            image,
            steps,
            vgg16,
        } => done(gan::project(ctx, &image, steps, vgg16)),
        JobKind::ExportGanAnimation { request } => done(gan::export(ctx, &request)),
        JobKind::Custom { run, .. } => done(run(ctx)),
    }
}
