//! The worker's protocol: the jobs it runs ([`JobKind`]), the events it sends back
//! ([`Event`]), its configuration, and the denoising preview a running image job leaves in
//! its mailbox.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::JobContext;
use crate::code::actions::{ActionInput, ActionPreset};
use crate::code::complete::CompletionRequest;
use crate::device::DevicePreference;
use crate::diffusion::controlnet::ControlSpec;
use crate::diffusion::imaging::RgbImage;
use crate::diffusion::model::{ImageModelInfo, ImageModelOptions};
use crate::diffusion::pipeline::{GeneratedImage, ImageRequest};
use crate::error::Result;
use crate::gan::GanInfo;
use crate::gan::directions::Directions;
use crate::gan::render::GanAnimationRequest;
use crate::llm::chat::ChatMessage;
use crate::llm::generate::GenerationStats;
use crate::llm::loader::ModelInfo;
use crate::llm::remote::RemoteConfig;
use crate::llm::sampling::SamplingParams;

/// Identifies a submitted job.
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
    LoadModel {
        /// A model folder, weights file or GGUF file.
        path: PathBuf,
        /// How to load it.
        options: LoadOptions,
    },
    /// Use a model on an OpenAI-compatible server instead of a local one. The server must
    /// answer `GET /v1/models` first; only then is the current backend dropped (with
    /// [`Event::ModelUnloaded`] if one was loaded), followed by [`Event::ModelLoaded`].
    ConnectRemote {
        /// Where the server is and how to talk to it.
        config: RemoteConfig,
    },
    /// Drop the loaded model (or remote connection) and free its memory.
    UnloadModel,
    /// Continue `prompt` as raw text (no chat format).
    Generate {
        /// The text to continue.
        prompt: String,
        /// How to sample, and when to stop.
        params: SamplingParams,
    },
    /// Reply to a conversation; the oldest turns are dropped if it does not fit the context.
    Chat {
        /// The system prompt; empty for none.
        system: String,
        /// The conversation, oldest message first.
        messages: Vec<ChatMessage>,
        /// How to sample the reply, and when to stop.
        params: SamplingParams,
    },
    /// Load a Stable Diffusion model (diffusers folder or single-file checkpoint), replacing
    /// the loaded one only once the new one has loaded.
    LoadImageModel {
        /// A diffusers folder or a single-file checkpoint.
        path: PathBuf,
        /// Optional extras for loading.
        options: ImageModelOptions,
    },
    /// Drop the loaded Stable Diffusion model.
    UnloadImageModel,
    /// Generate images with the loaded Stable Diffusion model.
    GenerateImage {
        /// What to generate (its `control` is filled from `control`).
        request: Box<ImageRequest>,
        /// ControlNet units; the worker loads their networks, keeping those in use.
        control: Vec<ControlSpec>,
        /// An SDXL refiner (file or folder) taking over at `request.refiner_switch_at`; the
        /// worker loads it and keeps it while it is asked for.
        refiner: Option<std::path::PathBuf>,
    },
    /// Upscale an image with an upscaler file (ESRGAN / Real-ESRGAN or SwinIR) (loaded for the job), in
    /// tiles, to `scale` times its size: [`Event::ImageProgress`] per tile (step = tile), the
    /// result as [`Event::ImageReady`] with `parameters` plus the postprocessing fields; cancel
    /// is checked between tiles.
    UpscaleImage {
        /// The image.
        image: Box<RgbImage>,
        /// Its parameters, carried over (the source's seed too).
        parameters: Box<GeneratedImageSource>,
        /// The upscaler's file.
        upscaler: PathBuf,
        /// Output size over input size.
        scale: f64,
    },
    /// Load a StyleGAN2 generator (a safetensors file in NVIDIA's `G_ema` naming) for the
    /// Latent Explorer, replacing the loaded one only once the new one has loaded. A `.pkl`
    /// is refused without being opened.
    LoadGan {
        /// The generator's safetensors file.
        path: PathBuf,
    },
    /// Drop the loaded StyleGAN2 generator.
    UnloadGan,
    /// GANSpace PCA directions of the loaded generator's W: `samples` latents from `seed`,
    /// `components` principal components; reports progress, honours cancel, and ends with
    /// [`Event::GanDirections`].
    ComputeGanDirections {
        /// How many latents to sample (at least 2).
        samples: usize,
        /// How many principal components to keep, 1 to `w_dim`.
        components: usize,
        /// Seed of the latent sampler.
        seed: u64,
    },
    /// Project `image` into the loaded generator's W (NVIDIA's projector recipe, `steps`
    /// steps): center-cropped to a square and resized to the network's resolution first;
    /// the reconstruction streams into [`super::Worker::take_gan_frame`] (id 0) every few steps with
    /// progress; the W found (so far, when cancelled) arrives as [`Event::GanProjected`].
    /// With `vgg16` (a safetensors file of VGG16 weights, optionally with LPIPS's linear
    /// layers) the loss is the perceptual distance; without, pixel + multi-scale SSIM.
    ProjectGan {
        /// The image to project.
        image: Box<RgbImage>,
        /// Optimization steps.
        steps: usize,
        /// VGG16 weights for the perceptual loss; `None` for pixel + multi-scale SSIM.
        vgg16: Option<PathBuf>,
    },
    /// Render the keyframe path to an animated GIF or a folder of PNGs, with progress and
    /// cancel between frames.
    ExportGanAnimation {
        /// The keyframes, the number of frames and where they go.
        request: Box<GanAnimationRequest>,
    },
    /// Inline completion (ghost text): fill in the middle between `request.prefix` and
    /// `request.suffix` with the loaded model's FIM format (detected, or the request's
    /// override), within `request.max_prompt_tokens`. Sends [`Event::PromptTokens`], then the
    /// suggestion as [`Event::Text`] (already trimmed to one line or a block), stops on the
    /// format's stop tokens, and fails when the model has no FIM tokens (see
    /// [`super::Worker::fim_support`]) or is a remote server.
    Complete {
        /// The text around the cursor and the completion settings.
        request: Box<CompletionRequest>,
    },
    /// A code action (explain, fix, …) from a preset, run as a chat with the model's template
    /// (local or remote): the prompt names the file's language and path and includes the
    /// context files that fit; each thing left out is an [`Event::Notice`] (`Context cut: …`).
    /// The reply streams as [`Event::Text`]; edits are diffed by the caller
    /// ([`crate::code::actions::rewrite_from_reply`], [`crate::code::diff`]).
    CodeAction {
        /// The action to run.
        preset: Box<ActionPreset>,
        /// The code it works on and the context files offered.
        input: Box<ActionInput>,
        /// How to sample the reply, and when to stop.
        params: SamplingParams,
    },
    /// Arbitrary work on the worker thread (extensions and tests).
    Custom {
        /// What the job does, for the UI ([`JobKind::label`]).
        label: String,
        /// The work, run once on the worker thread.
        run: CustomJob,
    },
}

impl JobKind {
    /// What the job does, for the UI: "Loading model.gguf", "Replying", …
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
            JobKind::GenerateImage { request, .. } => {
                format!("Generating ({})", request.mode.label())
            }
            JobKind::UpscaleImage { scale, .. } => format!("Upscaling ×{scale}"),
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

/// What an image to upscale came with: its generation parameters and seed, if any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneratedImageSource {
    /// The `parameters` it carries (empty for an image from elsewhere).
    pub parameters: crate::image_meta::GenerationParameters,
    /// Its seed (0 when unknown).
    pub seed: u64,
}

/// What the worker reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The job left the queue and is running.
    Started {
        /// The job this event is about.
        job: JobId,
        /// What the job does ([`JobKind::label`]).
        label: String,
    },
    /// Progress in `0..=1` (lossy: may be skipped when the UI is behind).
    Progress {
        /// The job this event is about.
        job: JobId,
        /// How much is done, from 0 to 1.
        fraction: f32,
        /// What is being done, such as "loading weights".
        message: String,
    },
    /// Newly generated text, coalesced: `tokens` tokens' worth.
    Text {
        /// The job this event is about.
        job: JobId,
        /// The new text (pieces sent together when the channel was full).
        text: String,
        /// How many generated tokens it covers.
        tokens: usize,
    },
    /// The conversation did not fit: this many of its oldest messages were left out.
    ContextTrimmed {
        /// The job this event is about.
        job: JobId,
        /// How many of the oldest messages were left out.
        dropped_messages: usize,
        /// Length of the prompt that remains, in tokens.
        prompt_tokens: usize,
    },
    /// Something the user should know about this job (a fallback that was used).
    Notice {
        /// The job this event is about.
        job: JobId,
        /// The notice, written for a person.
        message: String,
    },
    /// The prompt of a chat or generate job, in tokens, before generation starts.
    PromptTokens {
        /// The job this event is about.
        job: JobId,
        /// Length of the prompt, in tokens.
        tokens: usize,
    },
    /// A language model, local or on a server, is loaded and ready.
    ModelLoaded {
        /// The job this event is about.
        job: JobId,
        /// What the UI shows about the model.
        info: ModelInfo,
    },
    /// The language model or server connection was dropped, by an unload or to make way for
    /// a new one.
    ModelUnloaded {
        /// The job this event is about.
        job: JobId,
    },
    /// A Stable Diffusion model is loaded and ready.
    ImageModelLoaded {
        /// The job this event is about.
        job: JobId,
        /// What the UI shows about the model.
        info: ImageModelInfo,
    },
    /// The Stable Diffusion model was dropped: unloaded, or replaced by a newly loaded one.
    ImageModelUnloaded {
        /// The job this event is about.
        job: JobId,
    },
    /// A denoising step finished (lossy). Its preview, if any, is in [`super::Worker::take_preview`].
    ImageProgress {
        /// The job this event is about.
        job: JobId,
        /// Which image of the batch (0-based) and how many.
        image: u32,
        /// How many images the batch has.
        images: u32,
        /// Steps done for this image (1-based), out of `steps`.
        step: usize,
        /// Steps this image runs.
        steps: usize,
    },
    /// A StyleGAN2 generator is loaded; `name` is its file name.
    GanLoaded {
        /// The job this event is about.
        job: JobId,
        /// What the generator is: resolution, latent sizes, architecture.
        info: GanInfo,
        /// The generator's file name.
        name: String,
        /// The synthesis layers a render can show ([`crate::gan::render::GanLayerRequest`]), coarse to fine.
        layers: Vec<String>,
    },
    /// The StyleGAN2 generator was dropped: unloaded, or replaced by a newly loaded one.
    GanUnloaded {
        /// The job this event is about.
        job: JobId,
    },
    /// The W a projection found: `num_ws × w_dim` values, row by row, the noise buffers it
    /// optimized with it (flattened as [`crate::gan::render::GanLatent::noise`]), and its last image loss;
    /// `note` says what was done to the image first (crop, resize), if anything.
    GanProjected {
        /// The job this event is about.
        job: JobId,
        /// The W found: `num_ws × w_dim` values, row by row.
        w: Vec<f32>,
        /// The optimized noise buffers, flattened one after another.
        noise: Arc<Vec<f32>>,
        /// The image loss at the last step.
        loss: f32,
        /// What was done to the image first (crop, resize); `None` when nothing was.
        note: Option<String>,
    },
    /// PCA directions computed by [`JobKind::ComputeGanDirections`].
    GanDirections {
        /// The job this event is about.
        job: JobId,
        /// The principal directions of W.
        directions: Arc<Directions>,
    },
    /// A finished image (always delivered).
    ImageReady {
        /// The job this event is about.
        job: JobId,
        /// The image, with its seed and generation parameters.
        image: Arc<GeneratedImage>,
    },
    /// Terminal: the job finished (with stats for generation jobs).
    Done {
        /// The job this event is about.
        job: JobId,
        /// Statistics of a text-generating job; `None` for other jobs.
        stats: Option<GenerationStats>,
    },
    /// Terminal: the job failed; `error` is written for a person.
    Failed {
        /// The job this event is about.
        job: JobId,
        /// The error message.
        error: String,
    },
    /// Terminal: the job was cancelled (stats of what was generated, if anything ran).
    Cancelled {
        /// The job this event is about.
        job: JobId,
        /// Statistics of the generation cut short; `None` when none ran.
        stats: Option<GenerationStats>,
    },
}

impl Event {
    /// The job this event is about.
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

    /// Whether this is the job's last event: [`Event::Done`], [`Event::Failed`] or
    /// [`Event::Cancelled`].
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Done { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}

/// How to start the worker.
pub struct WorkerConfig {
    /// The device to run on; the CPU, with a warning, when it cannot be opened.
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

/// The latest denoising preview of a running image job.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewFrame {
    /// The job that made it.
    pub job: JobId,
    /// Which image of the batch (0-based).
    pub image_index: u32,
    /// Steps done for this image (1-based), out of `steps`.
    pub step: usize,
    /// Steps this image runs.
    pub steps: usize,
    /// A preview of the current denoised (x0) estimate.
    pub image: RgbImage,
}
