//! Per-frame logic before drawing: drain the worker's events (bounded in time and count, so a
//! flood of events never stalls a frame), pick up the Canvas's newest denoising preview, take
//! dropped files and keyboard shortcuts, keep a
//! streaming reply and changed parameters saved, and remove deleted chats whose undo time
//! has passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{Key, Modifiers};
use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::worker::Event;

use super::api_server::ServerStatus;
use super::app::StudioApp;
use super::canvas::CanvasCommand;
use super::chat::store::TRASH_GRACE;
use super::code::CodeCommand;
use super::command::{Command, load_error};
use super::context::{Handled, app_context};
use super::explorer::ExplorerCommand;
use super::explorer::actions as explorer_actions;
use super::jobs::JobPurpose;
use super::settings_store::Panel;
use super::shortcuts::{REDO_SHORTCUT, REDO_Y, SEND_SHORTCUT, UNDO_SHORTCUT};
use crate::files::FileDone;

/// Time budget for draining events in one frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);
/// Most events handled in one frame.
const EVENT_LIMIT: usize = 512;

impl StudioApp {
    /// Everything that happens each frame before drawing.
    pub fn frame_logic(&mut self, ctx: &egui::Context) {
        self.code.intercept_close(ctx, &mut self.settings);
        self.drain_events(ctx);
        while let Some(done) = self.files.try_recv() {
            self.file_done(done);
        }
        self.canvas.poll_preview(ctx, &mut app_context!(self));
        self.explorer.poll_explorer(ctx, &mut app_context!(self));
        self.models.poll_scan();
        self.take_dropped_files(ctx);
        self.take_shortcuts(ctx);
        if let Some(id) = self.chat.due_stream_save()
            && let Err(e) = self.chat.store.save_in_place(&id)
        {
            self.notices.error(format!("{e:#}"));
        }
        if let Some(id) = self.chat.due_params_save(false)
            && let Err(e) = self.chat.store.save_in_place(&id)
        {
            self.notices.error(format!("{e:#}"));
        }
        for error in self.chat.store.purge_trash(self.undo_window + TRASH_GRACE) {
            self.notices.error(error);
        }
        match self.api_server.poll() {
            Some(Ok(message)) => self.notices.info(message),
            Some(Err(message)) => self.notices.error(message),
            None => {}
        }
        if matches!(self.api_server.status(), ServerStatus::Starting) {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if self.canvas.is_generating() {
            // Previews arrive through a mailbox, not as events: look again soon.
            ctx.request_repaint_after(Duration::from_millis(50));
        }
        if self.chat.active().is_some() {
            // Keep the live rate moving and the periodic save due even between events.
            ctx.request_repaint_after(Duration::from_millis(500));
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
        let cx = &mut app_context!(self);
        let handled = match purpose.as_ref().and_then(JobPurpose::panel) {
            Some(Panel::Canvas) => self.canvas.on_event(job, purpose.as_ref(), event, cx),
            Some(Panel::LatentExplorer) => self.explorer.on_event(job, purpose.as_ref(), event, cx),
            Some(Panel::Code) => self.code.on_event(job, purpose.as_ref(), event, cx),
            Some(Panel::Chat) => self.chat.on_event(job, event, cx),
            Some(Panel::Models | Panel::Settings) | None => Handled::No(event),
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
                if let Some(JobPurpose::ConvertCheckpoint(checkpoint)) = tracked.map(|t| t.purpose)
                {
                    let out = studio_inference::pickle::converted_path(&checkpoint);
                    self.notices.info(format!(
                        "Converted {} to {} (read as data: nothing in it ran)",
                        checkpoint.display(),
                        out.display()
                    ));
                    // A folder's `pytorch_model.bin` became its `model.safetensors`: the folder
                    // is the model.
                    let from_folder = checkpoint
                        .file_name()
                        .is_some_and(|n| n == "pytorch_model.bin");
                    let target = match checkpoint.parent() {
                        Some(dir) if from_folder => dir.to_path_buf(),
                        _ => out,
                    };
                    super::canvas::actions::route_dropped(target, &mut app_context!(self));
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
                    self.notices.offer_conversion(&path);
                }
                Some(JobPurpose::ConvertCheckpoint(checkpoint)) => {
                    self.notices.error(format!(
                        "Could not convert {}: {error}",
                        checkpoint.display()
                    ));
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
        // the first.
        if let Some(path) = dropped.into_iter().next() {
            let on_explorer = self.settings.panel == Panel::LatentExplorer;
            if explorer_actions::is_gan_file(&path)
                || (on_explorer && explorer_actions::is_pickle(&path))
            {
                self.commands
                    .push(Command::Explorer(ExplorerCommand::LoadModel(path)));
            } else if self.settings.panel == Panel::Code
                && crate::gui::code::assist::is_code_drop(&path)
            {
                self.commands
                    .push(Command::Code(CodeCommand::Open(Some(path))));
            } else if on_explorer && super::canvas::actions::is_image_file(&path) {
                self.commands
                    .push(Command::Explorer(ExplorerCommand::RestoreFromPng(path)));
            } else {
                super::canvas::actions::route_dropped(path, &mut app_context!(self));
            }
        }
    }

    fn take_shortcuts(&mut self, ctx: &egui::Context) {
        // Esc on the Code panel first dismisses a suggestion (cancelling its request).
        if self.settings.panel == Panel::Code
            && self.code.wants_escape()
            && ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape))
        {
            self.commands.push(Command::Code(CodeCommand::DismissGhost));
        }
        if self.jobs.running().is_some()
            && ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape))
        {
            self.commands.push(Command::CancelRunningJob);
        }
        // Consumed here so the message box never sees it (no stray newline), but sent only
        // after this frame's UI has run: text typed in the same frame as Ctrl+Enter (a slow
        // frame, a fast typist) must reach the message box before it is sent.
        if self.settings.panel == Panel::Chat
            && ctx.input_mut(|i| i.consume_shortcut(&SEND_SHORTCUT))
        {
            self.send_after_ui = true;
        }
        if self.settings.panel == Panel::Canvas {
            self.take_canvas_shortcuts(ctx);
        }
        if self.settings.panel == Panel::LatentExplorer && !ctx.egui_wants_keyboard_input() {
            self.take_explorer_paste(ctx);
        }
    }

    /// Ctrl+Z / Ctrl+Shift+Z / Ctrl+Y undo and redo on the canvas (a focused text field keeps
    /// its own undo), Ctrl+Enter generates, Ctrl+V pastes an image (or opens a pasted image
    /// file path).
    fn take_canvas_shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.input_mut(|i| i.consume_shortcut(&SEND_SHORTCUT)) {
            self.commands.push(Command::Canvas(CanvasCommand::Generate));
        }
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        // Shift first: Ctrl+Z also matches with Shift held.
        if ctx.input_mut(|i| i.consume_shortcut(&REDO_SHORTCUT) || i.consume_shortcut(&REDO_Y)) {
            self.commands.push(Command::Canvas(CanvasCommand::Redo));
        } else if ctx.input_mut(|i| i.consume_shortcut(&UNDO_SHORTCUT)) {
            self.commands.push(Command::Canvas(CanvasCommand::Undo));
        }
        let (texts, images) = pasted(ctx);
        for text in texts {
            super::canvas::actions::paste_on_canvas(&text, &mut app_context!(self));
        }
        for image in images {
            self.commands
                .push(Command::Canvas(CanvasCommand::PasteImage(Arc::new(image))));
        }
    }

    /// Ctrl+V on the Latent Explorer: a copied image is projected; a copied image file (path
    /// or `file://` URI) is treated as dropped (a capture restores its latent).
    fn take_explorer_paste(&mut self, ctx: &egui::Context) {
        let (texts, images) = pasted(ctx);
        for text in texts {
            let first = text.lines().next().unwrap_or("").trim();
            let path = PathBuf::from(first.strip_prefix("file://").unwrap_or(first));
            if path.is_file() && super::canvas::actions::is_image_file(&path) {
                self.commands
                    .push(Command::Explorer(ExplorerCommand::RestoreFromPng(path)));
            }
        }
        for image in images {
            self.explorer.project(
                Path::new("the pasted image"),
                image,
                &mut app_context!(self),
            );
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
                self.canvas.set_thumbnail(&self.ctx, &path, result);
            }
        }
    }
}

/// This frame's pasted texts and images (composited over white).
fn pasted(ctx: &egui::Context) -> (Vec<String>, Vec<RgbImage>) {
    ctx.input(|i| {
        let mut texts = Vec::new();
        let mut images = Vec::new();
        for e in &i.events {
            match e {
                egui::Event::Paste(text) => texts.push(text.clone()),
                egui::Event::PasteImage(image) => images.push(rgb_over_white(image)),
                _ => {}
            }
        }
        (texts, images)
    })
}

/// A pasted image (egui's premultiplied RGBA) composited over white, as the canvas holds RGB.
pub(crate) fn rgb_over_white(image: &egui::ColorImage) -> RgbImage {
    let mut pixels = Vec::with_capacity(image.pixels.len() * 3);
    for c in &image.pixels {
        let white = 255 - c.a();
        pixels.extend([
            c.r().saturating_add(white),
            c.g().saturating_add(white),
            c.b().saturating_add(white),
        ]);
    }
    RgbImage {
        width: image.size[0] as u32,
        height: image.size[1] as u32,
        pixels,
    }
}
