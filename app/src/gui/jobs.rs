//! What the window knows about the worker's jobs: why each was submitted, and which one runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use studio_inference::diffusion::model::ImageModelOptions;
use studio_inference::worker::{JobId, LoadOptions};

use super::chat::store::MessageId;
use super::settings_store::Panel;

/// Why a job was submitted, so its events reach the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPurpose {
    /// Loading a model, with the options it was asked for.
    LoadModel(PathBuf, LoadOptions),
    UnloadModel,
    /// Connecting to an OpenAI-compatible server at this base URL.
    ConnectRemote(String),
    /// The reply being written into message `message` of `conversation`.
    ChatReply {
        conversation: String,
        message: MessageId,
    },
    /// Loading a Stable Diffusion model for the Canvas, with the options it was asked for.
    LoadImageModel(PathBuf, ImageModelOptions),
    UnloadImageModel,
    /// Generating images on the Canvas.
    GenerateImage,
    /// Loading a StyleGAN2 generator for the Latent Explorer.
    LoadGan(PathBuf),
    /// PCA directions for the Latent Explorer.
    ComputeGanDirections,
    /// Projecting an image into the Latent Explorer's generator.
    ProjectGan(PathBuf),
    /// Exporting the Latent Explorer's animation to this file or folder.
    ExportGanAnimation(PathBuf),
    /// A ghost-text suggestion for the Code panel.
    CodeComplete,
    /// A code action (explain, fix, …) for the Code panel.
    CodeAction,
    /// Starting the API server on the loaded model.
    StartApiServer,
    /// Converting this PyTorch checkpoint to safetensors beside it.
    ConvertCheckpoint(PathBuf),
}

impl JobPurpose {
    /// The panel that submitted such a job and handles its events (`None`: the window's own
    /// jobs, whose events `logic` handles).
    pub fn panel(&self) -> Option<Panel> {
        match self {
            JobPurpose::ChatReply { .. } => Some(Panel::Chat),
            JobPurpose::LoadImageModel(..)
            | JobPurpose::UnloadImageModel
            | JobPurpose::GenerateImage => Some(Panel::Canvas),
            JobPurpose::LoadGan(_)
            | JobPurpose::ComputeGanDirections
            | JobPurpose::ProjectGan(_)
            | JobPurpose::ExportGanAnimation(_) => Some(Panel::LatentExplorer),
            JobPurpose::CodeComplete | JobPurpose::CodeAction => Some(Panel::Code),
            JobPurpose::LoadModel(..)
            | JobPurpose::UnloadModel
            | JobPurpose::ConnectRemote(_)
            | JobPurpose::StartApiServer
            | JobPurpose::ConvertCheckpoint(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrackedJob {
    pub purpose: JobPurpose,
    /// The worker has started it (a load that started has already dropped the old model).
    pub started: bool,
}

/// The job the worker is running now.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub id: JobId,
    pub label: String,
    pub started_at: Instant,
    /// Last progress report: fraction and message.
    pub progress: Option<(f32, String)>,
}

#[derive(Debug, Default)]
pub struct Jobs {
    tracked: BTreeMap<JobId, TrackedJob>,
    running: Option<RunningJob>,
}

impl Jobs {
    pub fn track(&mut self, id: JobId, purpose: JobPurpose) {
        self.tracked.insert(
            id,
            TrackedJob {
                purpose,
                started: false,
            },
        );
    }

    pub fn get(&self, id: JobId) -> Option<&TrackedJob> {
        self.tracked.get(&id)
    }

    pub fn started(&mut self, id: JobId, label: String) {
        if let Some(t) = self.tracked.get_mut(&id) {
            t.started = true;
        }
        self.running = Some(RunningJob {
            id,
            label,
            started_at: Instant::now(),
            progress: None,
        });
    }

    pub fn progress(&mut self, id: JobId, fraction: f32, message: String) {
        if let Some(r) = self.running.as_mut().filter(|r| r.id == id) {
            r.progress = Some((fraction, message));
        }
    }

    /// Forgets a job after its terminal event.
    pub fn finished(&mut self, id: JobId) -> Option<TrackedJob> {
        if self.running.as_ref().is_some_and(|r| r.id == id) {
            self.running = None;
        }
        self.tracked.remove(&id)
    }

    pub fn running(&self) -> Option<&RunningJob> {
        self.running.as_ref()
    }

    /// Jobs submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.tracked.values().filter(|t| !t.started).count()
    }

    /// The model being loaded (queued or running), if any.
    pub fn loading_model(&self) -> Option<&PathBuf> {
        self.tracked.values().find_map(|t| match &t.purpose {
            JobPurpose::LoadModel(p, _) => Some(p),
            _ => None,
        })
    }

    /// The Stable Diffusion model being loaded (queued or running), if any.
    pub fn loading_image_model(&self) -> Option<&PathBuf> {
        self.tracked.values().find_map(|t| match &t.purpose {
            JobPurpose::LoadImageModel(p, _) => Some(p),
            _ => None,
        })
    }

    /// The StyleGAN2 generator being loaded (queued or running), if any.
    pub fn loading_gan(&self) -> Option<&PathBuf> {
        self.tracked.values().find_map(|t| match &t.purpose {
            JobPurpose::LoadGan(p) => Some(p),
            _ => None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }
}
