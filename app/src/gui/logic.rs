//! Per-frame logic before drawing: drain the worker's events (bounded in time and count, so a
//! flood of events never stalls a frame), pick up the Canvas's newest denoising preview, take
//! dropped files and keyboard shortcuts, keep a
//! streaming reply and changed parameters saved, and remove deleted chats whose undo time
//! has passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{Key, KeyboardShortcut, Modifiers};
use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::worker::Event;

use super::api_server::ServerStatus;
use super::app::StudioApp;
use super::canvas::CanvasCommand;
use super::canvas::actions::Outcome;
use super::chat::store::ReplyState;
use super::code::CodeCommand;
use super::command::{Command, load_error};
use super::explorer::ExplorerCommand;
use super::explorer::actions as explorer_actions;
use super::jobs::JobPurpose;
use super::settings_store::Panel;
use crate::files::FileDone;

/// Time budget for draining events in one frame.
const EVENT_BUDGET: Duration = Duration::from_millis(4);
/// Most events handled in one frame.
const EVENT_LIMIT: usize = 512;

/// How long after its Undo notice is gone a deleted chat's file is removed (an Undo clicked in
/// the notice's last frame still finds it).
pub const TRASH_GRACE: Duration = Duration::from_millis(500);

pub const SEND_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
pub const UNDO_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Z);
pub const REDO_SHORTCUT: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::Z);
pub const REDO_Y: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Y);

impl StudioApp {
    /// Everything that happens each frame before drawing.
    pub fn frame_logic(&mut self, ctx: &egui::Context) {
        self.intercept_close(ctx);
        self.drain_events(ctx);
        while let Some(done) = self.files.try_recv() {
            self.file_done(done);
        }
        self.poll_preview(ctx);
        self.poll_explorer(ctx);
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

    fn handle_event(&mut self, event: Event) {
        let job = event.job();
        let purpose = self.jobs.get(job).map(|t| t.purpose.clone());
        let event = match purpose {
            Some(JobPurpose::CodeComplete | JobPurpose::CodeAction) => {
                self.code_event(purpose.as_ref(), event);
                return;
            }
            _ => event,
        };
        match event {
            Event::Started { label, .. } => {
                self.jobs.started(job, label);
                if matches!(purpose, Some(JobPurpose::ChatReply { .. })) {
                    self.chat.reply_started(job);
                }
            }
            Event::Progress {
                fraction, message, ..
            } => self.jobs.progress(job, fraction, message),
            Event::Text { text, tokens, .. } => self.chat.reply_text(job, &text, tokens),
            Event::PromptTokens { tokens, .. } => self.chat.reply_prompt_tokens(job, tokens),
            Event::Notice { message, .. } => self.notices.warning(message),
            Event::ContextTrimmed {
                dropped_messages, ..
            } => self.chat.reply_trimmed(job, dropped_messages),
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
            Event::ImageModelLoaded { info, .. } => self.image_model_loaded(job, info),
            Event::ImageModelUnloaded { .. } => self.image_model_unloaded(job),
            Event::ImageProgress {
                image,
                images,
                step,
                steps,
                ..
            } => self.image_progress(job, image, images, step, steps),
            Event::ImageReady { image, .. } => self.image_ready(image),
            Event::GanLoaded {
                info, name, layers, ..
            } => self.gan_loaded(job, info, name, layers),
            Event::GanUnloaded { .. } => self.gan_unloaded(),
            Event::GanDirections { directions, .. } => self.gan_directions(directions),
            Event::GanProjected { w, noise, loss, .. } => self.gan_projected(w, noise, loss),
            Event::ModelUnloaded { .. } => {
                self.stop_api_server_for_model_change();
                self.model = None;
                self.model_options = None;
                self.settings.last_model = None;
            }
            Event::Done { stats, .. } => {
                self.jobs.finished(job);
                if self.image_job_finished(job, purpose.as_ref(), Outcome::Done, None)
                    || self.gan_job_finished(job, purpose.as_ref(), None, false)
                {
                    return;
                }
                if let Some(id) = self.chat.reply_finished(job, ReplyState::Done, stats, None) {
                    self.save_conversation(&id);
                }
            }
            Event::Cancelled { stats, .. } => {
                let tracked = self.jobs.finished(job);
                if self.image_job_finished(job, purpose.as_ref(), Outcome::Cancelled, None)
                    || self.gan_job_finished(job, purpose.as_ref(), None, true)
                {
                    return;
                }
                if let Some(id) = self
                    .chat
                    .reply_finished(job, ReplyState::Stopped, stats, None)
                {
                    self.save_conversation(&id);
                }
                // The worker reports with `ModelUnloaded` whether the previous model is gone.
                if let Some(t) = tracked
                    && t.started
                    && matches!(t.purpose, JobPurpose::LoadModel(..))
                {
                    self.notices.warning("Loading was cancelled");
                }
            }
            Event::Failed { error, .. } => {
                let tracked = self.jobs.finished(job);
                if self.image_job_finished(job, purpose.as_ref(), Outcome::Failed, Some(&error))
                    || self.gan_job_finished(job, purpose.as_ref(), Some(&error), false)
                {
                    return;
                }
                match tracked.map(|t| t.purpose) {
                    Some(JobPurpose::LoadModel(path, _)) => {
                        // Whether the previous model is still loaded, the worker said with
                        // (or without) `ModelUnloaded`.
                        if self.settings.last_model.as_ref() == Some(&path) {
                            self.settings.last_model = None;
                        }
                        self.notices.error(load_error(&path, &error));
                    }
                    Some(JobPurpose::ChatReply { .. }) => {
                        self.notices.error(format!("The reply failed: {error}"));
                        if let Some(id) =
                            self.chat
                                .reply_finished(job, ReplyState::Failed, None, Some(error))
                        {
                            self.save_conversation(&id);
                        }
                    }
                    Some(JobPurpose::ConnectRemote(url)) => {
                        self.notices
                            .error(format!("Could not connect to {url}: {error}"));
                    }
                    Some(JobPurpose::StartApiServer) => {
                        self.notices
                            .error(format!("Could not start the API server: {error}"));
                    }
                    Some(
                        JobPurpose::UnloadModel
                        | JobPurpose::LoadImageModel(..)
                        | JobPurpose::UnloadImageModel
                        | JobPurpose::GenerateImage
                        | JobPurpose::LoadGan(_)
                        | JobPurpose::ComputeGanDirections
                        | JobPurpose::ExportGanAnimation(_)
                        | JobPurpose::ProjectGan(_)
                        | JobPurpose::CodeComplete
                        | JobPurpose::CodeAction,
                    )
                    | None => self.notices.error(error),
                }
            }
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
                self.route_dropped(path);
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
            self.paste_on_canvas(&text);
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
            self.project(Path::new("the pasted image"), image);
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
                self.canvas.history.set_thumbnail(&self.ctx, &path, result);
            }
        }
    }

    pub(super) fn save_conversation(&mut self, id: &str) {
        if let Err(e) = self.chat.store.save(id) {
            self.notices.error(format!("{e:#}"));
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
