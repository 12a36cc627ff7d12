//! What the window knows about the worker's jobs: why each was submitted, and which one runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use studio_inference::worker::{JobId, LoadOptions};

use super::panel_list::{Panel, panel_list};

/// Why a job was submitted, so its events reach the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPurpose {
    /// Loading a model, with the options it was asked for.
    LoadModel(PathBuf, LoadOptions),
    UnloadModel,
    /// Connecting to an OpenAI-compatible server at this base URL.
    ConnectRemote(String),
    /// Starting the API server on the loaded model.
    StartApiServer,
    /// Converting the pickle `from` to the safetensors file `to`.
    ConvertCheckpoint {
        from: PathBuf,
        to: PathBuf,
    },
    /// A panel's job: its events go to that panel's `on_event`.
    Panel(PanelPurpose),
}

impl JobPurpose {
    /// The panel that submitted such a job and handles its events (`None`: the window's own
    /// jobs, whose events `logic` handles).
    pub fn panel(&self) -> Option<Panel> {
        match self {
            JobPurpose::Panel(p) => Some(p.panel()),
            JobPurpose::LoadModel(..)
            | JobPurpose::UnloadModel
            | JobPurpose::ConnectRemote(_)
            | JobPurpose::StartApiServer
            | JobPurpose::ConvertCheckpoint { .. } => None,
        }
    }
}

/// A panel's job-purpose enum, found inside a [`JobPurpose`].
pub trait PurposeOf {
    /// `purpose`, if it is one of this panel's.
    fn of(purpose: &JobPurpose) -> Option<&Self>;
}

macro_rules! define_panel_purposes {
    ($($variant:ident { module: $module:ident, panel: $panel:ident, command: $command:ident, purpose: $purpose:ident, label: $label:literal },)*) => {
        /// Why a panel submitted a job (each panel's enum is in its leaf `command.rs`).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum PanelPurpose {
            $($variant(super::$module::command::$purpose),)*
        }

        impl PanelPurpose {
            /// The panel that submitted the job.
            pub fn panel(&self) -> Panel {
                match self {
                    $(PanelPurpose::$variant(_) => Panel::$variant,)*
                }
            }
        }

        $(impl From<super::$module::command::$purpose> for JobPurpose {
            fn from(purpose: super::$module::command::$purpose) -> Self {
                JobPurpose::Panel(PanelPurpose::$variant(purpose))
            }
        }

        impl PurposeOf for super::$module::command::$purpose {
            fn of(purpose: &JobPurpose) -> Option<&Self> {
                match purpose {
                    JobPurpose::Panel(PanelPurpose::$variant(p)) => Some(p),
                    _ => None,
                }
            }
        })*
    };
}

panel_list!(define_panel_purposes);

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

    /// The first tracked job (queued or running) of a panel's purposes for which `f` says
    /// something: `jobs.find(|p: &CanvasPurpose| …)`.
    pub fn find<'a, P: PurposeOf + 'a, T: ?Sized>(
        &'a self,
        f: impl Fn(&'a P) -> Option<&'a T>,
    ) -> Option<&'a T> {
        self.tracked
            .values()
            .find_map(|t| P::of(&t.purpose).and_then(&f))
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }
}
