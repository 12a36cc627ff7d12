//! Per-frame logic before drawing: drain the worker's events (bounded in time and count, so a
//! flood of events never stalls a frame) and route each to the panel that submitted its job,
//! run every panel's per-frame hook (previews, polls, periodic saves), and take dropped files
//! and keyboard shortcuts.

use std::time::{Duration, Instant};

use egui::{Key, Modifiers};
use studio_inference::worker::Event;

use super::api_server::ServerStatus;
use super::app::StudioApp;
use super::command::{Command, load_error};
use super::context::{Handled, app_context};
use super::jobs::JobPurpose;
use crate::files::FileDone;

/// Time budget for draining events in one frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);
/// Most events handled in one frame.
const EVENT_LIMIT: usize = 512;

impl StudioApp {
    /// Everything that happens each frame before drawing.
    pub fn frame_logic(&mut self, ctx: &egui::Context) {
        // The context that runs the frame is the one the panels get (in the window it is the
        // one the app was made with; a test harness may run the app on its own).
        if self.ctx != *ctx {
            self.ctx = ctx.clone();
        }
        self.drain_events(ctx);
        while let Some(done) = self.files.try_recv() {
            self.file_done(done);
        }
        self.panels.frame(&mut app_context!(self));
        self.take_dropped_files(ctx);
        self.take_shortcuts(ctx);
        match self.api_server.poll() {
            Some(Ok(message)) => self.notices.info(message),
            Some(Err(message)) => self.notices.error(message),
            None => {}
        }
        if matches!(self.api_server.status(), ServerStatus::Starting) {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        self.apply_commands();
    }

    fn drain_events(&mut self, ctx: &egui::Context) {
        let start = Instant::now();
        let mut handled = 0;
        loop {
            if handled >= EVENT_LIMIT || start.elapsed() >= EVENT_BUDGET {
                // More may be waiting: come back next frame.
                ctx.request_repaint();
                break;
            }
            let Some(event) = self
                .worker
                .as_ref()
                .and_then(studio_inference::worker::Worker::try_recv)
            else {
                break;
            };
            self.handle_event(event);
            handled += 1;
        }
    }

    /// One worker event: the job table's bookkeeping, then the panel that submitted the job
    /// handles it; what no panel takes is the window's (model loads, the API server, notices).
    fn handle_event(&mut self, event: Event) {
        let job = event.job();
        let purpose = self.jobs.get(job).map(|t| t.purpose.clone());
        let tracked = match &event {
            Event::Started { label, .. } => {
                self.jobs.started(job, label.clone());
                None
            }
            Event::Progress {
                fraction, message, ..
            } => {
                self.jobs.progress(job, *fraction, message.clone());
                None
            }
            Event::Done { .. } | Event::Cancelled { .. } | Event::Failed { .. } => {
                self.jobs.finished(job)
            }
            _ => None,
        };
        let handled = match &purpose {
            Some(JobPurpose::Panel(p)) => {
                self.panels.on_event(job, p, event, &mut app_context!(self))
            }
            _ => Handled::No(event),
        };
        let Handled::No(event) = handled else {
            return;
        };
        match event {
            Event::Notice { message, .. } => self.notices.warning(message),
            Event::ModelLoaded { info, .. } => {
                if let Some(JobPurpose::LoadModel(path, options)) = &purpose {
                    self.settings.remember_model(path);
                    self.settings.last_model = Some(path.clone());
                    self.model_options = Some(options.clone());
                }
                self.notices.info(format!("Loaded {}", info.name));
                self.model = Some(info);
                self.stop_api_server_for_model_change();
            }
            Event::ModelUnloaded { .. } => {
                self.stop_api_server_for_model_change();
                self.model = None;
                self.model_options = None;
                self.settings.last_model = None;
            }
            Event::Done { .. } => {
                if let Some(JobPurpose::ConvertCheckpoint { from, to }) = tracked.map(|t| t.purpose)
                {
                    self.notices.info(format!(
                        "Saved {} as {} (the pickle was read as data: nothing in it ran)",
                        from.display(),
                        to.display()
                    ));
                }
            }
            Event::Cancelled { .. } => {
                // The worker reports with `ModelUnloaded` whether the previous model is gone.
                if let Some(t) = tracked
                    && t.started
                    && matches!(t.purpose, JobPurpose::LoadModel(..))
                {
                    self.notices.warning("Loading was cancelled");
                }
            }
            Event::Failed { error, .. } => match tracked.map(|t| t.purpose) {
                Some(JobPurpose::LoadModel(path, _)) => {
                    // Whether the previous model is still loaded, the worker said with (or
                    // without) `ModelUnloaded`.
                    if self.settings.last_model.as_ref() == Some(&path) {
                        self.settings.last_model = None;
                    }
                    self.notices.error(load_error(&path, &error));
                }
                Some(JobPurpose::ConvertCheckpoint { from, .. }) => {
                    self.notices
                        .error(format!("Could not convert {}: {error}", from.display()));
                }
                Some(JobPurpose::ConnectRemote(url)) => {
                    self.notices
                        .error(format!("Could not connect to {url}: {error}"));
                }
                Some(JobPurpose::StartApiServer) => {
                    self.notices
                        .error(format!("Could not start the API server: {error}"));
                }
                _ => self.notices.error(error),
            },
            // Bookkeeping only (above), or events of jobs no panel is waiting for.
            Event::Started { .. }
            | Event::Progress { .. }
            | Event::Text { .. }
            | Event::PromptTokens { .. }
            | Event::ContextTrimmed { .. }
            | Event::ImageModelLoaded { .. }
            | Event::ImageModelUnloaded { .. }
            | Event::ImageProgress { .. }
            | Event::ImageReady { .. }
            | Event::GanLoaded { .. }
            | Event::GanUnloaded { .. }
            | Event::GanDirections { .. }
            | Event::GanProjected { .. } => {}
        }
    }

    /// The server's tokenizer and template are the old model's: it stops with the model.
    fn stop_api_server_for_model_change(&mut self) {
        if self.api_server.stop() {
            self.notices.warning(
                "The API server stopped with the model it served; start it again in Settings",
            );
        }
    }

    fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<std::path::PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        // Several files dropped at once are usually one model's files (or one image): take
        // the first. The panel shown is asked first, then the others; what none takes is the
        // window's (Stable Diffusion models and images to the Canvas, other models to load).
        if let Some(path) = dropped.into_iter().next() {
            let shown = self.settings.panel;
            if !self.panels.take_drop(shown, &path, &mut app_context!(self)) {
                super::canvas::actions::route_dropped(path, &mut app_context!(self));
            }
        }
    }

    /// The shown panel's shortcuts first (on the Code panel Esc dismisses a suggestion), then
    /// the window's: Esc cancels the running job.
    fn take_shortcuts(&mut self, ctx: &egui::Context) {
        let shown = self.settings.panel;
        self.panels.shortcuts(shown, &mut app_context!(self));
        if self.jobs.running().is_some()
            && ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape))
        {
            self.commands.push(Command::CancelRunningJob);
        }
    }

    /// A result from the file thread: a failed write becomes a notice; a thumbnail goes to
    /// the gallery.
    pub(super) fn file_done(&mut self, done: FileDone) {
        match done {
            FileDone::WriteFailed { what, error } => {
                self.notices.error(format!("{what} was not saved: {error}"));
            }
            FileDone::Thumbnail { path, result } => {
                self.panels.canvas.set_thumbnail(&self.ctx, &path, result);
            }
        }
    }
}
