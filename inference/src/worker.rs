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

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::code::actions::{ActionInput, ActionPreset, build_action_prompt, estimate_tokens};
use crate::code::complete::{self, CompletionRequest, FimSupport};
use crate::device::{DevicePreference, create_device};
use crate::diffusion::imaging::RgbImage;
use crate::diffusion::model::{self as sd_model, ImageModelInfo, ImageModelOptions, SdModel};
use crate::diffusion::pipeline::{self, GeneratedImage, ImageRequest};
use crate::error::{Error, Result};
use crate::gan::directions::{DirectionEdit, Directions};
use crate::gan::latent::{self as gan_latent, Keyframe, Space};
use crate::gan::{GanInfo, NoiseMode, NumpyRandomState, PICKLE_HELP, StyleGan2};
use crate::generate::{GenerationStats, Step, generate};
use crate::loader::{self, LoadedModel, ModelInfo};
use crate::remote::{RemoteBackend, RemoteConfig};
use crate::sampling::SamplingParams;

/// Identifies a submitted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

/// Custom work run on the worker thread with access to the loaded model.
pub type CustomJob = Box<dyn FnOnce(&mut JobContext<'_>) -> Result<()> + Send>;

/// How to load a model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// Context length to use, below the model's trained maximum (saves memory); `None` = the
    /// maximum.
    pub context_length: Option<usize>,
}

/// What to do.
pub enum JobKind {
    /// Load a model (folder or file), replacing the loaded one. The new model's files are
    /// checked first; only then is the old model dropped (with [`Event::ModelUnloaded`]).
    LoadModel { path: PathBuf, options: LoadOptions },
    /// Use a model on an OpenAI-compatible server instead of a local one. The server must
    /// answer `GET /v1/models` first; only then is the current backend dropped (with
    /// [`Event::ModelUnloaded`] if one was loaded), followed by [`Event::ModelLoaded`].
    ConnectRemote { config: RemoteConfig },
    /// Drop the loaded model (or remote connection) and free its memory.
    UnloadModel,
    /// Continue `prompt` as raw text (no chat format).
    Generate {
        prompt: String,
        params: SamplingParams,
    },
    /// Reply to a conversation; the oldest turns are dropped if it does not fit the context.
    Chat {
        system: String,
        messages: Vec<ChatMessage>,
        params: SamplingParams,
    },
    /// Load a Stable Diffusion model (diffusers folder or single-file checkpoint), replacing
    /// the loaded one only once the new one has loaded.
    LoadImageModel {
        path: PathBuf,
        options: ImageModelOptions,
    },
    /// Drop the loaded Stable Diffusion model.
    UnloadImageModel,
    /// Generate images with the loaded Stable Diffusion model.
    GenerateImage { request: Box<ImageRequest> },
    /// Load a StyleGAN2 generator (a safetensors file in NVIDIA's `G_ema` naming) for the
    /// Latent Explorer, replacing the loaded one only once the new one has loaded. A `.pkl`
    /// is refused without being opened.
    LoadGan { path: PathBuf },
    /// Drop the loaded StyleGAN2 generator.
    UnloadGan,
    /// GANSpace PCA directions of the loaded generator's W: `samples` latents from `seed`,
    /// `components` principal components; reports progress, honours cancel, and ends with
    /// [`Event::GanDirections`].
    ComputeGanDirections {
        samples: usize,
        components: usize,
        seed: u64,
    },
    /// Project `image` into the loaded generator's W (NVIDIA's projector recipe, `steps`
    /// steps): center-cropped to a square and resized to the network's resolution first;
    /// the reconstruction streams into [`Worker::take_gan_frame`] (id 0) every few steps with
    /// progress; the W found (so far, when cancelled) arrives as [`Event::GanProjected`].
    /// With `vgg16` (a safetensors file of VGG16 weights, optionally with LPIPS's linear
    /// layers) the loss is the perceptual distance; without, pixel + multi-scale SSIM.
    ProjectGan {
        image: Box<RgbImage>,
        steps: usize,
        vgg16: Option<PathBuf>,
    },
    /// Render the keyframe path to an animated GIF or a folder of PNGs, with progress and
    /// cancel between frames.
    ExportGanAnimation { request: Box<GanAnimationRequest> },
    /// Inline completion (ghost text): fill in the middle between `request.prefix` and
    /// `request.suffix` with the loaded model's FIM format (detected, or the request's
    /// override), within `request.max_prompt_tokens`. Sends [`Event::PromptTokens`], then the
    /// suggestion as [`Event::Text`] (already trimmed to one line or a block), stops on the
    /// format's stop tokens, and fails when the model has no FIM tokens (see
    /// [`Worker::fim_support`]) or is a remote server.
    Complete { request: Box<CompletionRequest> },
    /// A code action (explain, fix, …) from a preset, run as a chat with the model's template
    /// (local or remote): the prompt names the file's language and path and includes the
    /// context files that fit; each thing left out is an [`Event::Notice`] (`Context cut: …`).
    /// The reply streams as [`Event::Text`]; edits are diffed by the caller
    /// ([`crate::code::actions::rewrite_from_reply`], [`crate::code::diff`]).
    CodeAction {
        preset: Box<ActionPreset>,
        input: Box<ActionInput>,
        params: SamplingParams,
    },
    /// Arbitrary work on the worker thread (extensions and tests).
    Custom { label: String, run: CustomJob },
}

impl JobKind {
    pub fn label(&self) -> String {
        match self {
            JobKind::LoadModel { path, .. } => format!(
                "Loading {}",
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into()
                )
            ),
            JobKind::ConnectRemote { config } => {
                format!("Connecting to {}", config.base_url.trim())
            }
            JobKind::UnloadModel => "Unloading model".to_owned(),
            JobKind::LoadImageModel { path, .. } => format!(
                "Loading {}",
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into()
                )
            ),
            JobKind::UnloadImageModel => "Unloading image model".to_owned(),
            JobKind::LoadGan { path } => format!(
                "Loading {}",
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into()
                )
            ),
            JobKind::UnloadGan => "Unloading GAN".to_owned(),
            JobKind::ProjectGan { steps, .. } => format!("Projecting the image ({steps} steps)"),
            JobKind::ExportGanAnimation { request } => {
                format!("Exporting {} frames", request.frames)
            }
            JobKind::ComputeGanDirections {
                samples,
                components,
                ..
            } => format!("Computing {components} directions from {samples} samples"),
            JobKind::GenerateImage { request } => format!("Generating ({})", request.mode.label()),
            JobKind::Generate { .. } => "Generating".to_owned(),
            JobKind::Chat { .. } => "Replying".to_owned(),
            JobKind::Complete { .. } => "Completing".to_owned(),
            JobKind::CodeAction { preset, .. } => preset.label.clone(),
            JobKind::Custom { label, .. } => label.clone(),
        }
    }
}

impl std::fmt::Debug for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// What the worker reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The job left the queue and is running.
    Started {
        job: JobId,
        label: String,
    },
    /// Progress in `0..=1` (lossy: may be skipped when the UI is behind).
    Progress {
        job: JobId,
        fraction: f32,
        message: String,
    },
    /// Newly generated text, coalesced: `tokens` tokens' worth.
    Text {
        job: JobId,
        text: String,
        tokens: usize,
    },
    /// The conversation did not fit: this many of its oldest messages were left out.
    ContextTrimmed {
        job: JobId,
        dropped_messages: usize,
        prompt_tokens: usize,
    },
    /// Something the user should know about this job (a fallback that was used).
    Notice {
        job: JobId,
        message: String,
    },
    /// The prompt of a chat or generate job, in tokens, before generation starts.
    PromptTokens {
        job: JobId,
        tokens: usize,
    },
    ModelLoaded {
        job: JobId,
        info: ModelInfo,
    },
    ModelUnloaded {
        job: JobId,
    },
    ImageModelLoaded {
        job: JobId,
        info: ImageModelInfo,
    },
    ImageModelUnloaded {
        job: JobId,
    },
    /// A denoising step finished (lossy). Its preview, if any, is in [`Worker::take_preview`].
    ImageProgress {
        job: JobId,
        /// Which image of the batch (0-based) and how many.
        image: u32,
        images: u32,
        step: usize,
        steps: usize,
    },
    /// A StyleGAN2 generator is loaded; `name` is its file name.
    GanLoaded {
        job: JobId,
        info: GanInfo,
        name: String,
        /// The synthesis layers a render can show ([`GanLayerRequest`]), coarse to fine.
        layers: Vec<String>,
    },
    GanUnloaded {
        job: JobId,
    },
    /// The W a projection found: `num_ws × w_dim` values, row by row, the noise buffers it
    /// optimized with it (flattened as [`GanLatent::noise`]), and its last image loss;
    /// `note` says what was done to the image first (crop, resize), if anything.
    GanProjected {
        job: JobId,
        w: Vec<f32>,
        noise: Arc<Vec<f32>>,
        loss: f32,
        note: Option<String>,
    },
    /// PCA directions computed by [`JobKind::ComputeGanDirections`].
    GanDirections {
        job: JobId,
        directions: Arc<Directions>,
    },
    /// A finished image (always delivered).
    ImageReady {
        job: JobId,
        image: Arc<GeneratedImage>,
    },
    /// Terminal: the job finished (with stats for generation jobs).
    Done {
        job: JobId,
        stats: Option<GenerationStats>,
    },
    /// Terminal: the job failed; `error` is written for a person.
    Failed {
        job: JobId,
        error: String,
    },
    /// Terminal: the job was cancelled (stats of what was generated, if anything ran).
    Cancelled {
        job: JobId,
        stats: Option<GenerationStats>,
    },
}

impl Event {
    pub fn job(&self) -> JobId {
        match self {
            Event::Started { job, .. }
            | Event::Progress { job, .. }
            | Event::Text { job, .. }
            | Event::ContextTrimmed { job, .. }
            | Event::PromptTokens { job, .. }
            | Event::Notice { job, .. }
            | Event::ModelLoaded { job, .. }
            | Event::ModelUnloaded { job }
            | Event::ImageModelLoaded { job, .. }
            | Event::ImageModelUnloaded { job }
            | Event::GanLoaded { job, .. }
            | Event::GanUnloaded { job }
            | Event::GanDirections { job, .. }
            | Event::GanProjected { job, .. }
            | Event::ImageProgress { job, .. }
            | Event::ImageReady { job, .. }
            | Event::Done { job, .. }
            | Event::Failed { job, .. }
            | Event::Cancelled { job, .. } => *job,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Done { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}

/// How to start the worker.
pub struct WorkerConfig {
    pub device: DevicePreference,
    /// Called (from the worker thread) after events are sent; the UI passes
    /// `ctx.request_repaint`.
    pub repaint: Arc<dyn Fn() + Send + Sync>,
    /// Capacity of the job queue.
    pub queue_capacity: usize,
    /// Capacity of the event channel.
    pub event_capacity: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            device: DevicePreference::Auto,
            repaint: Arc::new(|| {}),
            queue_capacity: 64,
            event_capacity: 256,
        }
    }
}

type CancelFlags = Arc<Mutex<HashMap<JobId, Arc<AtomicBool>>>>;

/// The latest denoising preview of a running image job.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewFrame {
    pub job: JobId,
    pub image_index: u32,
    pub step: usize,
    pub steps: usize,
    pub image: RgbImage,
}

type PreviewSlot = Arc<Mutex<Option<PreviewFrame>>>;

/// Style mixing: W rows taken from a second seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GanMix {
    pub seed: u64,
    /// One entry per W row: `true` takes that row from `seed`.
    pub layers: Vec<bool>,
}

/// One point of the Latent Explorer: a fractional seed, truncation, style mixing and
/// direction edits (sliders in σ units, each on a range of W rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GanLatent {
    pub seed: u64,
    /// Fractional offset blending `seed + floor(offset)` and the next seed (in W).
    pub offset: f32,
    pub psi: f64,
    /// Truncate only the first `cutoff` W rows (`None` = all).
    pub cutoff: Option<usize>,
    pub mix: Option<GanMix>,
    /// Applied with the request's directions; ignored when it has none.
    pub edits: Vec<DirectionEdit>,
    /// A latent known only in W (a projection result), `num_ws × w_dim` values row by row;
    /// when set it replaces the seed (and ψ), while mixing and edits still apply.
    pub w: Option<Vec<f32>>,
    /// Noise buffers that go with `w` (a projection's optimized noise), all of
    /// [`StyleGan2::noise_buffers`] flattened in order; when set they replace the request's
    /// noise mode. Not serialized: callers persist it themselves (it can be megabytes).
    #[serde(skip)]
    pub noise: Option<Arc<Vec<f32>>>,
}

impl Default for GanLatent {
    fn default() -> Self {
        Self {
            seed: 0,
            offset: 0.0,
            psi: 1.0,
            cutoff: None,
            mix: None,
            edits: Vec::new(),
            w: None,
            noise: None,
        }
    }
}

/// What a render shows.
#[derive(Debug, Clone, PartialEq)]
pub enum GanRenderWhat {
    Latent(GanLatent),
    /// Position `t` ∈ [0, 1] on the path through `keyframes` (lerp in W or slerp in Z).
    Path {
        keyframes: Vec<GanLatent>,
        t: f64,
        space: Space,
    },
}

/// A render of the Latent Explorer's current image ([`Worker::render_gan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GanRenderRequest {
    /// Chosen by the caller; comes back in [`GanFrame::id`].
    pub id: u64,
    pub what: GanRenderWhat,
    pub noise: NoiseMode,
    pub directions: Option<Arc<Directions>>,
    /// Downscale so neither side exceeds this (`None` = the network's resolution).
    pub max_side: Option<u32>,
    /// Also show this synthesis layer's activations ([`GanFrame::layer`]).
    pub layer: Option<GanLayerRequest>,
}

/// Most channels a layer grid shows.
pub const GAN_LAYER_MAX_TILES: usize = 64;
/// Largest side of one channel in a layer view (bigger layers are subsampled).
pub const GAN_LAYER_MAX_TILE_SIDE: usize = 128;

/// How a synthesis layer's activations are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GanLayerMode {
    /// The first `tiles` channels (at most [`GAN_LAYER_MAX_TILES`]) side by side in a grid,
    /// each min–max normalized to grey.
    Grid { tiles: usize },
    /// Three channels as red, green and blue, each min–max normalized (indices past the last
    /// channel are clamped to it).
    Rgb { channels: [usize; 3] },
}

/// Which synthesis layer to show with a render, by NVIDIA's module name under `synthesis.`
/// (`b8.conv0`, `b16.torgb`, …; [`Event::GanLoaded::layers`] lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GanLayerRequest {
    pub name: String,
    pub mode: GanLayerMode,
}

/// Statistics over all values of a layer's activations.
#[derive(Debug, Clone, PartialEq)]
pub struct GanLayerStats {
    /// `(n, channels, height, width)`.
    pub shape: Vec<usize>,
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
}

/// A synthesis layer's activations drawn as an image, with their statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct GanLayerView {
    pub name: String,
    pub image: RgbImage,
    pub stats: GanLayerStats,
}

/// Where an exported animation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GanAnimationOut {
    /// One looping GIF file.
    Gif(PathBuf),
    /// `frame_0001.png`, `frame_0002.png`, … in this folder (created if missing), each with
    /// its latent in a text chunk.
    PngSequence(PathBuf),
}

/// [`JobKind::ExportGanAnimation`]: `frames` evenly spaced points of the keyframe path.
#[derive(Debug, Clone, PartialEq)]
pub struct GanAnimationRequest {
    pub keyframes: Vec<GanLatent>,
    pub space: Space,
    pub noise: NoiseMode,
    pub directions: Option<Arc<Directions>>,
    pub frames: usize,
    /// Frames per second of the GIF.
    pub fps: f64,
    pub out: GanAnimationOut,
    /// Written into every PNG frame's text chunk, with `frame i/n` appended.
    pub text: String,
}

/// The result of the newest [`GanRenderRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct GanFrame {
    pub id: u64,
    pub result: std::result::Result<RgbImage, String>,
    /// Milliseconds the render took on the worker.
    pub render_ms: f32,
    /// The requested layer's view, or why it could not be made (the image still shows).
    pub layer: Option<std::result::Result<GanLayerView, String>>,
}

/// Thumbnails for the seed browser ([`Worker::render_gan_grid`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GanGridRequest {
    pub id: u64,
    pub seeds: Vec<u64>,
    pub psi: f64,
    pub cutoff: Option<usize>,
    pub noise: NoiseMode,
    pub max_side: u32,
}

/// Rendered thumbnails of the newest [`GanGridRequest`], in its seeds' order.
#[derive(Debug, Clone, PartialEq)]
pub struct GanGrid {
    pub id: u64,
    pub result: std::result::Result<Vec<(u64, RgbImage)>, String>,
}

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
                        .is_some_and(|s| s.finish == crate::generate::FinishReason::Cancelled);
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

/// What a running job can see and do.
pub struct JobContext<'a> {
    job: JobId,
    cancel: &'a AtomicBool,
    events: &'a Sender<Event>,
    repaint: &'a Arc<dyn Fn() + Send + Sync>,
    backend: &'a mut Option<Backend>,
    image_model: &'a mut Option<Box<SdModel>>,
    gan: &'a mut Option<Box<StyleGan2>>,
    gan_slots: &'a GanSlots,
    previews: &'a PreviewSlot,
    device: &'a candle_core::Device,
    pending_text: String,
    pending_tokens: usize,
}

impl<'a> JobContext<'a> {
    pub fn job(&self) -> JobId {
        self.job
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The job's cancel flag, to check while the model is borrowed ([`Self::model`]).
    pub fn cancel_flag(&self) -> &'a AtomicBool {
        self.cancel
    }

    fn previews_gan(&self) -> &GanSlots {
        self.gan_slots
    }

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

    fn flush_text(&mut self, force: bool) {
        send_text(
            self.events,
            self.repaint,
            self.job,
            &mut self.pending_text,
            &mut self.pending_tokens,
            force,
        );
    }

    /// Runs the shared token loop on the loaded model, streaming into this job's events.
    fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        extra_eos: &[u32],
    ) -> Result<Option<GenerationStats>> {
        self.send(Event::PromptTokens {
            job: self.job,
            tokens: prompt.len(),
        });
        let Some(Backend::Local(m)) = self.backend.as_mut() else {
            return Err(Error::NoModelLoaded);
        };
        let eos: Vec<u32> = m.eos_token_ids.iter().chain(extra_eos).copied().collect();
        let (cancel, events, repaint, job) = (self.cancel, self.events, self.repaint, self.job);
        // Text not yet sent because the channel was full; the caller flushes what is left.
        let pending = &mut self.pending_text;
        let pending_tokens = &mut self.pending_tokens;
        let stats = generate(
            &mut *m.model,
            &m.tokenizer,
            &eos,
            prompt,
            params,
            &mut stream_steps(events, repaint, job, pending, pending_tokens, cancel),
        )?;
        Ok(Some(stats))
    }

    /// Streams a chat reply or a completion from the connected server into this job's events;
    /// every delta the server sends counts as one token.
    fn generate_remote(&mut self, request: &RemoteRequest<'_>) -> Result<Option<GenerationStats>> {
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

/// [`JobKind::Complete`]: the FIM prompt's size, then the suggestion streamed as text.
fn run_complete(
    ctx: &mut JobContext<'_>,
    request: &CompletionRequest,
) -> Result<Option<GenerationStats>> {
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

/// A generation for the remote backend.
enum RemoteRequest<'a> {
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

/// Sends the accumulated text as one [`Event::Text`]. Without `force`, a full channel leaves
/// the text in place to be sent with the next piece (coalescing); with `force` it blocks.
/// The token loop's callback for a job: each step's text goes out as coalesced [`Event::Text`]
/// (what the channel cannot take yet waits in `pending`); a set `cancel` stops the loop.
fn stream_steps<'a>(
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

fn send_text(
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
fn progress_sender<'a>(
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

fn execute(ctx: &mut JobContext<'_>, kind: JobKind) -> Result<Option<GenerationStats>> {
    match kind {
        JobKind::LoadModel { path, options } => {
            let job = ctx.job;
            ctx.progress(0.0, "checking files");
            // Check the new model before giving up the loaded one: a wrong file (a pickle, a
            // corrupt header, an unsupported architecture) leaves the current model in place.
            let prepared = loader::prepare(&path, ctx.device)?;
            // Free the old model before reading the new weights, so two never share memory.
            if ctx.backend.take().is_some() {
                ctx.send(Event::ModelUnloaded { job });
            }
            let mut progress = progress_sender(ctx.events, ctx.repaint, job);
            let loaded = prepared.load(ctx.device, &mut progress)?;
            let mut loaded = loaded;
            if let Some(n) = options.context_length {
                loaded.info.context_length = loaded.model.set_context_length(n);
            }
            let info = loaded.info.clone();
            *ctx.backend = Some(Backend::Local(Box::new(loaded)));
            ctx.send(Event::ModelLoaded { job, info });
            Ok(None)
        }
        JobKind::ConnectRemote { config } => {
            let job = ctx.job;
            ctx.progress(0.0, "connecting");
            // Check the server before giving up the current backend.
            let Some(remote) = RemoteBackend::connect(&config, ctx.cancel)? else {
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
        JobKind::UnloadModel => {
            *ctx.backend = None;
            ctx.send(Event::ModelUnloaded { job: ctx.job });
            Ok(None)
        }
        JobKind::Generate { prompt, params } => {
            let m = match ctx.backend.as_ref() {
                None => return Err(Error::NoModelLoaded),
                Some(Backend::Remote(_)) => {
                    return ctx.generate_remote(&RemoteRequest::Completion {
                        prompt: &prompt,
                        params: &params,
                    });
                }
                Some(Backend::Local(m)) => m,
            };
            if prompt.is_empty() {
                return Err(Error::EmptyPrompt);
            }
            let tokens = m.tokenizer.encode(&prompt)?;
            ctx.generate(&tokens, &params, &[])
        }
        JobKind::Chat {
            system,
            messages,
            mut params,
        } => {
            let m = match ctx.backend.as_ref() {
                None => return Err(Error::NoModelLoaded),
                Some(Backend::Remote(_)) => {
                    return ctx.generate_remote(&RemoteRequest::Chat {
                        system: &system,
                        messages: &messages,
                        params: &params,
                    });
                }
                Some(Backend::Local(m)) => m,
            };
            let prompt = m.chat_prompt(&system, &messages, params.max_new_tokens)?;
            if let Some(message) = prompt.notice {
                ctx.send(Event::Notice {
                    job: ctx.job,
                    message,
                });
            }
            if prompt.fitted.dropped_messages > 0 {
                ctx.send(Event::ContextTrimmed {
                    job: ctx.job,
                    dropped_messages: prompt.fitted.dropped_messages,
                    prompt_tokens: prompt.fitted.tokens.len(),
                });
            }
            params.stop.extend(prompt.stop);
            ctx.generate(&prompt.fitted.tokens, &params, &prompt.end_of_turn)
        }
        JobKind::Complete { request } => run_complete(ctx, &request),
        JobKind::CodeAction {
            preset,
            input,
            params,
        } => {
            let reserve = params.max_new_tokens + 16;
            let prompt = match ctx.backend.as_ref() {
                None => return Err(Error::NoModelLoaded),
                Some(Backend::Local(m)) => {
                    let budget = m.model.context_length().saturating_sub(reserve);
                    let count = |s: &str| m.tokenizer.encode(s).map_or(s.len(), |ids| ids.len());
                    build_action_prompt(&preset, &input, budget, &count)?
                }
                Some(Backend::Remote(r)) => {
                    let budget = r.info().context_length.saturating_sub(reserve);
                    build_action_prompt(&preset, &input, budget, &estimate_tokens)?
                }
            };
            for cut in &prompt.cut {
                ctx.send(Event::Notice {
                    job: ctx.job,
                    message: format!("Context cut: {cut}"),
                });
            }
            let messages = prompt.messages();
            execute(
                ctx,
                JobKind::Chat {
                    system: prompt.system,
                    messages,
                    params,
                },
            )
        }
        JobKind::LoadImageModel { path, options } => {
            let job = ctx.job;
            let mut progress = progress_sender(ctx.events, ctx.repaint, job);
            let model = sd_model::load(&path, &options, ctx.device, &mut progress)?;
            if ctx.image_model.take().is_some() {
                ctx.send(Event::ImageModelUnloaded { job });
            }
            let info = model.info.clone();
            *ctx.image_model = Some(Box::new(model));
            ctx.send(Event::ImageModelLoaded { job, info });
            Ok(None)
        }
        JobKind::UnloadImageModel => {
            *ctx.image_model = None;
            ctx.send(Event::ImageModelUnloaded { job: ctx.job });
            Ok(None)
        }
        JobKind::GenerateImage { request } => {
            let Some(model) = ctx.image_model.as_deref() else {
                return Err(Error::InvalidParameter(
                    "no Stable Diffusion model is loaded: open one in the Canvas first".into(),
                ));
            };
            let (job, cancel, events, repaint, previews) =
                (ctx.job, ctx.cancel, ctx.events, ctx.repaint, ctx.previews);
            let outcome = pipeline::generate(model, &request, &mut |update| {
                if let Some(image) = update.preview {
                    *lock(previews) = Some(PreviewFrame {
                        job,
                        image_index: update.image,
                        step: update.step,
                        steps: update.steps,
                        image,
                    });
                }
                // Lossy: a dropped progress event is superseded by the next step's.
                let _ = events.try_send(Event::ImageProgress {
                    job,
                    image: update.image,
                    images: update.images,
                    step: update.step,
                    steps: update.steps,
                });
                repaint();
                if cancel.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            for image in outcome.images {
                ctx.send(Event::ImageReady {
                    job,
                    image: Arc::new(image),
                });
            }
            Ok(None)
        }
        JobKind::LoadGan { path } => {
            let job = ctx.job;
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("pkl"))
            {
                return Err(Error::InvalidParameter(PICKLE_HELP.to_owned()));
            }
            if crate::gan::dcgan::is_dcgan(&path) {
                return Err(Error::InvalidParameter(format!(
                    "{} is a DCGAN generator: the Latent Explorer steers StyleGAN2 networks (W \
                     space, styles, noise), which DCGAN does not have. Render DCGAN images \
                     with `studio gan --model {} --seed N --out FILE.png`.",
                    path.display(),
                    path.display()
                )));
            }
            ctx.progress(0.0, "reading the generator");
            let gan = StyleGan2::load(&path, ctx.device)?;
            if ctx.gan.take().is_some() {
                ctx.send(Event::GanUnloaded { job });
            }
            let info = gan.info().clone();
            let layers = gan.layer_names();
            *ctx.gan = Some(Box::new(gan));
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            ctx.send(Event::GanLoaded {
                job,
                info,
                name,
                layers,
            });
            Ok(None)
        }
        JobKind::UnloadGan => {
            *ctx.gan = None;
            ctx.send(Event::GanUnloaded { job: ctx.job });
            Ok(None)
        }
        JobKind::ComputeGanDirections {
            samples,
            components,
            seed,
        } => {
            let Some(gan) = ctx.gan.as_deref() else {
                return Err(Error::InvalidParameter(
                    "no GAN is loaded: open one in the Latent Explorer first".into(),
                ));
            };
            let Some(directions) = compute_directions(ctx, gan, samples, components, seed)? else {
                return Ok(None); // cancelled
            };
            ctx.send(Event::GanDirections {
                job: ctx.job,
                directions: Arc::new(directions),
            });
            Ok(None)
        }
        JobKind::ProjectGan {
            image,
            steps,
            vgg16,
        } => {
            let Some(gan) = ctx.gan.as_deref() else {
                return Err(no_gan());
            };
            project_image(ctx, gan, &image, steps, vgg16)?;
            Ok(None)
        }
        JobKind::ExportGanAnimation { request } => {
            let Some(gan) = ctx.gan.as_deref() else {
                return Err(no_gan());
            };
            export_animation(ctx, gan, &request)?;
            Ok(None)
        }
        JobKind::Custom { run, .. } => run(ctx).map(|()| None),
    }
}

/// Latents mapped per batch while sampling W for PCA (cancel and progress between batches).
const PCA_BATCH: usize = 500;

/// [`Directions::compute`]'s sampling (the same seeded latents), in batches so it reports
/// progress and stops on cancel (`Ok(None)`).
fn compute_directions(
    ctx: &JobContext<'_>,
    gan: &StyleGan2,
    samples: usize,
    components: usize,
    seed: u64,
) -> Result<Option<Directions>> {
    let info = gan.info();
    let (z_dim, w_dim) = (info.z_dim, info.w_dim);
    if samples < 2 {
        return Err(Error::InvalidParameter(format!(
            "PCA needs at least 2 samples, got {samples}"
        )));
    }
    if components == 0 || components > w_dim {
        return Err(Error::InvalidParameter(format!(
            "{components} components asked for; choose 1 to {w_dim} (the W dimension)"
        )));
    }
    if z_dim == 0 {
        return Err(Error::InvalidParameter(
            "PCA directions need a network with a z input".into(),
        ));
    }
    #[allow(clippy::cast_possible_truncation)]
    let mut rng = NumpyRandomState::new((seed as u32) ^ ((seed >> 32) as u32));
    let mut data = Vec::with_capacity(samples * w_dim);
    let mut done = 0;
    while done < samples {
        if ctx.is_cancelled() {
            return Ok(None);
        }
        let b = PCA_BATCH.min(samples - done);
        #[allow(clippy::cast_possible_truncation)]
        let z: Vec<f32> = rng.randn(b * z_dim).into_iter().map(|v| v as f32).collect();
        let z = candle_core::Tensor::from_vec(z, (b, z_dim), gan.device())?;
        let w = gan
            .map(&z, None, 1.0, None)?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        data.extend_from_slice(&w);
        done += b;
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            0.9 * done as f32 / samples as f32,
            &format!("sampled {done} of {samples} latents"),
        );
    }
    ctx.progress(0.9, "principal components");
    let mut dirs = Directions::from_samples(&data, samples, w_dim, components)?;
    dirs.seed = seed;
    Ok(Some(dirs))
}

/// The `ws` of one explorer latent: the blended seed, truncated, mixed, edited.
fn latent_ws(
    gan: &StyleGan2,
    latent: &GanLatent,
    directions: Option<&Directions>,
) -> Result<candle_core::Tensor> {
    let mut ws = if latent.w.is_some() {
        // Replaced below; no need to map the seed.
        gan.w_avg()?
    } else {
        gan_latent::seed_blend_ws(
            gan,
            latent.seed,
            latent.offset,
            None,
            latent.psi,
            latent.cutoff,
        )?
    };
    if let Some(w) = &latent.w {
        let info = gan.info();
        if w.len() != info.num_ws * info.w_dim {
            return Err(Error::InvalidParameter(format!(
                "the latent has {} W values but this network takes {} × {}",
                w.len(),
                info.num_ws,
                info.w_dim
            )));
        }
        ws = candle_core::Tensor::from_slice(w, (1, info.num_ws, info.w_dim), gan.device())?;
    }
    if let Some(mix) = &latent.mix
        && mix.layers.iter().any(|&b| b)
    {
        let other = gan.map(&gan.z_from_seed(mix.seed)?, None, latent.psi, latent.cutoff)?;
        ws = gan_latent::style_mix(&ws, &other, &mix.layers)?;
    }
    if let Some(dirs) = directions
        && latent.edits.iter().any(|e| e.sigma != 0.0)
    {
        let edits: Vec<_> = latent
            .edits
            .iter()
            .filter(|e| e.sigma != 0.0)
            .map(|e| (e.component, e.sigma, e.layers.clone()))
            .collect();
        ws = crate::gan::directions::apply(&ws, dirs, &edits)?;
    }
    Ok(ws)
}

fn path_ws(
    gan: &StyleGan2,
    keyframes: &[GanLatent],
    t: f64,
    space: Space,
    dirs: Option<&Directions>,
) -> Result<candle_core::Tensor> {
    let frames = keyframes
        .iter()
        .map(|k| {
            let z = match k.w {
                Some(_) => None,
                None => Some(gan_latent::seed_blend(gan, k.seed, k.offset)?),
            };
            Ok(Keyframe {
                w: latent_ws(gan, k, dirs)?,
                z,
                psi: k.psi,
                cutoff: k.cutoff,
                c: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    gan_latent::interpolate(gan, &frames, t, space)
}

fn export_animation(ctx: &JobContext<'_>, gan: &StyleGan2, r: &GanAnimationRequest) -> Result<()> {
    if r.keyframes.len() < 2 {
        return Err(Error::InvalidParameter(
            "an animation needs at least two keyframes".into(),
        ));
    }
    if r.frames < 2 {
        return Err(Error::InvalidParameter(format!(
            "an animation needs at least 2 frames, got {}",
            r.frames
        )));
    }
    // A GIF replaces its file only when complete: a cancel or an error leaves the old one.
    let mut file = match &r.out {
        GanAnimationOut::Gif(path) => Some((
            std::io::BufWriter::new(
                crate::sys::AtomicFile::create(path, false).map_err(|e| Error::io(path, e))?,
            ),
            path,
        )),
        GanAnimationOut::PngSequence(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            None
        }
    };
    let mut gif = match &mut file {
        Some((writer, _)) => Some(gan_latent::GifWriter::new(writer, r.fps)?),
        None => None,
    };
    let dirs = r.directions.as_deref();
    for i in 0..r.frames {
        if ctx.is_cancelled() {
            return Ok(());
        }
        #[allow(clippy::cast_precision_loss)]
        let t = i as f64 / (r.frames - 1) as f64;
        let ws = path_ws(gan, &r.keyframes, t, r.space, dirs)?;
        let image = match path_noise(gan, &r.keyframes, t)? {
            Some(buffers) => crate::diffusion::imaging::tensor_to_image(
                &gan.synthesize_with_noise(&ws, &buffers)?,
            )?,
            None => gan_latent::render(gan, &ws, r.noise)?,
        };
        match (&mut gif, &r.out) {
            (Some(g), _) => g.add_frame(&image)?,
            (None, GanAnimationOut::PngSequence(dir)) => {
                let text = format!("{}\nframe {}/{}", r.text, i + 1, r.frames);
                let bytes = crate::diffusion::imaging::encode_png(&image, Some(&text))?;
                let path = dir.join(format!("frame_{:04}.png", i + 1));
                crate::sys::write_atomic(&path, &bytes, false).map_err(|e| Error::io(&path, e))?;
            }
            (None, GanAnimationOut::Gif(_)) => {}
        }
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            (i + 1) as f32 / r.frames as f32,
            &format!("frame {} of {}", i + 1, r.frames),
        );
    }
    // The encoder writes the GIF's trailer when dropped.
    drop(gif);
    if let Some((writer, path)) = file {
        writer
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?
            .commit()
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Streams reconstructions into the frame mailbox every this many steps.
const PROJECT_PREVIEW_EVERY: usize = 5;

fn project_image(
    ctx: &JobContext<'_>,
    gan: &StyleGan2,
    image: &RgbImage,
    steps: usize,
    vgg16: Option<PathBuf>,
) -> Result<()> {
    let res = gan.info().resolution;
    let res_u32 = u32::try_from(res)
        .map_err(|_| Error::InvalidParameter(format!("resolution {res} is too large")))?;
    let mut notes = Vec::new();
    let mut img = image.clone();
    if img.width != img.height {
        let side = img.width.min(img.height);
        img = img.crop((img.width - side) / 2, (img.height - side) / 2, side, side);
        notes.push(format!("cropped to the centre {side}×{side} square"));
    }
    if img.width != res_u32 {
        notes.push(format!("resized from {0}×{0} to {res}×{res}", img.width));
        img = img.resized(res_u32, res_u32);
    }
    if !notes.is_empty() {
        ctx.send(Event::Notice {
            job: ctx.job,
            message: format!("The image to project was {}.", notes.join(" and ")),
        });
    }
    let target = crate::diffusion::imaging::image_to_tensor(&img, gan.device())?;
    let config = crate::gan::project::ProjectConfig {
        steps: steps.max(1),
        preview_every: PROJECT_PREVIEW_EVERY,
        w_std_samples: 2000,
        loss: vgg16.map_or(crate::gan::project::LossKind::PixelMultiScale, |vgg16| {
            crate::gan::project::LossKind::Perceptual { vgg16 }
        }),
        ..crate::gan::project::ProjectConfig::default()
    };
    let total = config.steps;
    let mut last_loss = f32::NAN;
    let mut on_step = |step: usize, loss: f32, recon: Option<&candle_core::Tensor>| {
        last_loss = loss;
        if let Some(t) = recon
            && let Ok(img) = crate::diffusion::imaging::tensor_to_image(t)
        {
            *lock(&ctx.previews_gan().frame) = Some(GanFrame {
                id: 0,
                result: Ok(img),
                render_ms: 0.0,
                layer: None,
            });
        }
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            (step + 1) as f32 / total as f32,
            &format!("step {} of {total}, loss {loss:.4}", step + 1),
        );
        if ctx.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = crate::gan::project::project(gan, &target, &config, &mut on_step)?;
    let w = result
        .ws
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut noise = Vec::new();
    for buffer in &result.noise {
        noise.extend(
            buffer
                .to_device(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    ctx.send(Event::GanProjected {
        job: ctx.job,
        w,
        noise: Arc::new(noise),
        loss: last_loss,
        note: (!notes.is_empty()).then(|| notes.join(" and ")),
    });
    Ok(())
}

fn no_gan() -> Error {
    Error::InvalidParameter("no GAN is loaded: open one in the Latent Explorer first".into())
}

/// The image, and the requested layer's view (its own error when only that failed).
type RenderedGan = (RgbImage, Option<Result<GanLayerView>>);

fn render_gan(gan: Option<&StyleGan2>, request: &GanRenderRequest) -> Result<RenderedGan> {
    let gan = gan.ok_or_else(no_gan)?;
    let dirs = request.directions.as_deref();
    let (ws, noise) = match &request.what {
        GanRenderWhat::Latent(latent) => (
            latent_ws(gan, latent, dirs)?,
            noise_buffers(gan, latent.noise.as_deref())?,
        ),
        GanRenderWhat::Path {
            keyframes,
            t,
            space,
        } => (
            path_ws(gan, keyframes, *t, *space, dirs)?,
            path_noise(gan, keyframes, *t)?,
        ),
    };
    let layer = request.layer.as_ref();
    let known = layer.is_none_or(|l| gan.layer_names().contains(&l.name));
    let wanted = layer.filter(|_| known).map(|l| l.name.as_str());
    let (img, acts) = match &noise {
        Some(buffers) => gan.synthesize_with_noise_and_layer(&ws, buffers, wanted)?,
        None => gan.synthesize_with_layer(&ws, request.noise, wanted)?,
    };
    let image = fit(
        crate::diffusion::imaging::tensor_to_image(&img)?,
        request.max_side,
    );
    let Some(layer) = layer else {
        return Ok((image, None));
    };
    if !known {
        // The image renders anyway; only the layer view fails.
        let err = Error::InvalidParameter(format!(
            "no synthesis layer `{}`; this network has: {}",
            layer.name,
            gan.layer_names().join(", ")
        ));
        return Ok((image, Some(Err(err))));
    }
    let view = acts
        .ok_or_else(|| {
            Error::InvalidParameter(format!("layer `{}` returned no activations", layer.name))
        })
        .and_then(|a| layer_view(&layer.name, &a, layer.mode));
    Ok((image, Some(view)))
}

/// A latent's own noise buffers, shaped as the network's ([`GanLatent::noise`]).
fn noise_buffers(
    gan: &StyleGan2,
    flat: Option<&Vec<f32>>,
) -> Result<Option<Vec<candle_core::Tensor>>> {
    let Some(flat) = flat else {
        return Ok(None);
    };
    let shapes: Vec<Vec<usize>> = gan
        .noise_buffers()
        .iter()
        .map(|b| b.dims().to_vec())
        .collect();
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if flat.len() != total {
        return Err(Error::InvalidParameter(format!(
            "the latent carries {} noise values but this network's noise inputs hold {total}",
            flat.len()
        )));
    }
    let mut at = 0;
    let buffers = shapes
        .iter()
        .map(|shape| {
            let n: usize = shape.iter().product();
            let t =
                candle_core::Tensor::from_slice(&flat[at..at + n], shape.as_slice(), gan.device())?;
            at += n;
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(buffers))
}

/// The noise at `t` on a keyframe path: the keyframes' own noise (lerped between two that
/// both carry it; that of a keyframe the path sits exactly on), otherwise `None` (the
/// request's noise mode).
fn path_noise(
    gan: &StyleGan2,
    keyframes: &[GanLatent],
    t: f64,
) -> Result<Option<Vec<candle_core::Tensor>>> {
    let Some((index, frac)) = gan_latent::path_segment(keyframes.len(), t) else {
        return Ok(None);
    };
    let a = noise_buffers(gan, keyframes[index].noise.as_deref())?;
    let b = match keyframes.get(index + 1) {
        Some(k) => noise_buffers(gan, k.noise.as_deref())?,
        None => None,
    };
    Ok(match (a, b) {
        (a, _) if frac <= 0.0 => a,
        (_, b) if frac >= 1.0 => b,
        (Some(a), Some(b)) => Some(
            a.iter()
                .zip(&b)
                .map(|(x, y)| gan_latent::lerp(x, y, frac))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => None,
    })
}

/// Draws activations `(n, c, h, w)` (the first of the batch) as [`GanLayerMode`] says, with
/// statistics over every value.
pub fn layer_view(
    name: &str,
    acts: &candle_core::Tensor,
    mode: GanLayerMode,
) -> Result<GanLayerView> {
    let shape = acts.dims().to_vec();
    let (c, h, w) = match shape.as_slice() {
        [_, c, h, w] | [c, h, w] => (*c, *h, *w),
        other => {
            return Err(Error::InvalidParameter(format!(
                "layer activations must be (n, c, h, w), not {other:?}"
            )));
        }
    };
    let values = acts
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if c == 0 || h == 0 || w == 0 || values.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "layer `{name}` is empty: {shape:?}"
        )));
    }
    let stats = layer_stats(&values, shape.clone());
    let plane = h * w;
    // Subsample big layers so a tile is at most GAN_LAYER_MAX_TILE_SIDE on a side.
    let step = h.max(w).div_ceil(GAN_LAYER_MAX_TILE_SIDE).max(1);
    let (th, tw) = (h.div_ceil(step), w.div_ceil(step));
    let normalized = |ch: usize| -> Vec<u8> {
        let data = &values[ch * plane..(ch + 1) * plane];
        let (lo, hi) = data
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = if hi > lo { hi - lo } else { 1.0 };
        let mut out = Vec::with_capacity(th * tw);
        for y in 0..th {
            for x in 0..tw {
                let v = (data[y * step * w + x * step] - lo) / range;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                out.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        out
    };
    let too_big = |v: usize| {
        Error::InvalidParameter(format!("layer `{name}` is too large to draw ({v} pixels)"))
    };
    let image = match mode {
        GanLayerMode::Rgb { channels } => {
            let planes = channels.map(|ch| normalized(ch.min(c - 1)));
            let mut pixels = Vec::with_capacity(th * tw * 3);
            for i in 0..th * tw {
                pixels.extend(planes.iter().map(|p| p[i]));
            }
            RgbImage {
                width: u32::try_from(tw).map_err(|_| too_big(tw))?,
                height: u32::try_from(th).map_err(|_| too_big(th))?,
                pixels,
            }
        }
        GanLayerMode::Grid { tiles } => {
            let n = tiles.clamp(1, GAN_LAYER_MAX_TILES).min(c);
            let cols = (1..=n).find(|k| k * k >= n).unwrap_or(n);
            let rows = n.div_ceil(cols);
            // One pixel of dark gap between tiles.
            let (gw, gh) = (cols * (tw + 1) - 1, rows * (th + 1) - 1);
            let mut pixels = vec![32u8; gw * gh * 3];
            for ch in 0..n {
                let tile = normalized(ch);
                let (ox, oy) = ((ch % cols) * (tw + 1), (ch / cols) * (th + 1));
                for y in 0..th {
                    for x in 0..tw {
                        let v = tile[y * tw + x];
                        let at = ((oy + y) * gw + ox + x) * 3;
                        pixels[at..at + 3].fill(v);
                    }
                }
            }
            RgbImage {
                width: u32::try_from(gw).map_err(|_| too_big(gw))?,
                height: u32::try_from(gh).map_err(|_| too_big(gh))?,
                pixels,
            }
        }
    };
    Ok(GanLayerView {
        name: name.to_owned(),
        image,
        stats,
    })
}

fn layer_stats(values: &[f32], shape: Vec<usize>) -> GanLayerStats {
    #[allow(clippy::cast_precision_loss)]
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    #[allow(clippy::cast_possible_truncation)]
    GanLayerStats {
        shape,
        mean: mean as f32,
        std: var.sqrt() as f32,
        min,
        max,
    }
}

fn render_gan_grid(
    gan: Option<&StyleGan2>,
    request: &GanGridRequest,
) -> Result<Vec<(u64, RgbImage)>> {
    let gan = gan.ok_or_else(no_gan)?;
    request
        .seeds
        .iter()
        .map(|&seed| {
            let ws = gan.map(&gan.z_from_seed(seed)?, None, request.psi, request.cutoff)?;
            let image = gan_latent::render(gan, &ws, request.noise)?;
            Ok((seed, fit(image, Some(request.max_side))))
        })
        .collect()
}

/// Downscales `image` so neither side exceeds `max_side`.
fn fit(image: RgbImage, max_side: Option<u32>) -> RgbImage {
    match max_side {
        Some(m) if m > 0 && (image.width > m || image.height > m) => {
            let scale = f64::from(m) / f64::from(image.width.max(image.height));
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let (w, h) = (
                ((f64::from(image.width) * scale).round() as u32).max(1),
                ((f64::from(image.height) * scale).round() as u32).max(1),
            );
            image.resized(w, h)
        }
        _ => image,
    }
}
