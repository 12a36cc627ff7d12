//! What the panels share, lent to a panel while it applies a command or handles an event:
//! [`AppContext`] borrows the window's shared state (the worker and its job table, notices,
//! settings, the file thread, the command queue) beside the panel's own `&mut self`.
//!
//! A panel owns its logic: `apply(&mut self, command, &mut AppContext)` for its commands and
//! `on_event(&mut self, job, event, &mut AppContext) -> Handled` for the events of the jobs it
//! submitted. [`StudioApp`](super::StudioApp) lends the context with [`app_context!`].

use std::path::Path;
use std::time::Duration;

use studio_inference::llm::loader::ModelInfo;
use studio_inference::worker::{JobId, JobKind, Worker};

use super::command::Command;
use super::jobs::{JobPurpose, Jobs};
use super::notices::Notices;
use super::settings_store::Settings;
use crate::files::FileWorker;

/// The window's shared state, borrowed for one command or event.
pub struct AppContext<'a> {
    /// The window's egui context (textures, repaints).
    pub ctx: &'a egui::Context,
    /// Studio's data folder.
    pub home: &'a Path,
    pub settings: &'a mut Settings,
    /// `None` when the worker could not start.
    pub worker: Option<&'a Worker>,
    pub jobs: &'a mut Jobs,
    pub notices: &'a mut Notices,
    /// Encodes and writes images and decodes thumbnails off the UI thread.
    pub files: &'a FileWorker,
    /// Commands queued for after this one (applied in order).
    pub commands: &'a mut Vec<Command>,
    /// The loaded language model, if any.
    pub model: Option<&'a ModelInfo>,
    /// How long a deleted item can be brought back with Undo.
    pub undo_window: Duration,
}

impl AppContext<'_> {
    /// Queues a job on the worker and tracks why it was submitted (so its events come back
    /// to the panel that asked). Says why in a notice when it cannot.
    pub fn submit(&mut self, kind: JobKind, purpose: JobPurpose) -> Option<JobId> {
        let Some(worker) = self.worker else {
            self.notices
                .error("The inference worker is not running; restart Studio");
            return None;
        };
        match worker.submit(kind) {
            Ok(id) => {
                self.jobs.track(id, purpose);
                Some(id)
            }
            Err(e) => {
                self.notices.error(format!("Could not start the job: {e}"));
                None
            }
        }
    }

    /// Asks the worker to stop `job` (ignored when it is not running or queued).
    pub fn cancel(&self, job: JobId) {
        if let Some(worker) = self.worker {
            worker.cancel(job);
        }
    }
}

/// Whether a panel took an event, or it goes to the window's own handling.
#[derive(Debug)]
pub enum Handled {
    Yes,
    /// Not this panel's: the event, handed back.
    No(studio_inference::worker::Event),
}

/// Lends `$app`'s shared state as an [`AppContext`], borrowing only the fields it names so a
/// panel field of the same app can be borrowed beside it: `self.panels.apply(c, &mut
/// app_context!(self))`.
macro_rules! app_context {
    ($app:expr) => {
        $crate::gui::context::AppContext {
            ctx: &$app.ctx,
            home: &$app.home,
            settings: &mut $app.settings,
            worker: $app.worker.as_ref(),
            jobs: &mut $app.jobs,
            notices: &mut $app.notices,
            files: &$app.files,
            commands: &mut $app.commands,
            model: $app.model.as_ref(),
            undo_window: $app.undo_window,
        }
    };
}
pub(crate) use app_context;
