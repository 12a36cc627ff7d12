//! What the Canvas's commands do, and how the worker's image events reach it. Everything
//! here runs at the end of a frame (commands) or before drawing (events), on the UI thread;
//! generation itself runs on the worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use studio_inference::diffusion::imaging::{MAX_SIDE, RgbImage, decode_image_file, encode_png};
use studio_inference::diffusion::model::{ImageModelInfo, is_diffusion_model};
use studio_inference::diffusion::pipeline::GeneratedImage;
use studio_inference::image_meta::GenerationParameters;
use studio_inference::worker::{JobId, JobKind};

use super::CanvasCommand;
use super::form::{build_request, restore_parameters};
use super::view::preview_texture;
use crate::gui::app::StudioApp;
use crate::gui::command::{Command, load_error};
use crate::gui::jobs::JobPurpose;

/// How long the offer to restore an opened image's parameters stays.
const OFFER_LIFETIME: Duration = Duration::from_mins(1);

/// File extensions the Canvas opens as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Whether a dropped path is for a model loader rather than the canvas (folders, weights).
fn looks_like_a_model(path: &Path) -> bool {
    path.is_dir()
        || path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["safetensors", "gguf", "bin", "pt", "pth", "ckpt", "json"]
                .contains(&e.to_ascii_lowercase().as_str())
        })
}

/// What the worker's outcome for an image job was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Cancelled,
    Failed,
}

impl StudioApp {
    pub fn canvas(&self) -> &super::CanvasPanel {
        &self.canvas
    }

    pub fn canvas_mut(&mut self) -> &mut super::CanvasPanel {
        &mut self.canvas
    }

    /// Carries out one Canvas command.
    pub(crate) fn apply_canvas(&mut self, command: CanvasCommand) {
        let c = &mut self.canvas;
        match command {
            CanvasCommand::LoadModel(path) => self.load_image_model(path, false),
            CanvasCommand::UnloadModel => {
                self.submit(JobKind::UnloadImageModel, JobPurpose::UnloadImageModel);
            }
            CanvasCommand::OpenModelDialog { folder } => {
                let dialog = rfd::FileDialog::new().set_title("Open a Stable Diffusion model");
                let picked = if folder {
                    dialog.pick_folder()
                } else {
                    dialog
                        .add_filter("Stable Diffusion checkpoint", &["safetensors"])
                        .pick_file()
                };
                if let Some(path) = picked {
                    self.load_image_model(path, false);
                }
            }
            CanvasCommand::Generate => self.generate_image(),
            CanvasCommand::Cancel => {
                if let (Some(worker), Some(job)) = (&self.worker, c.generating) {
                    worker.cancel(job);
                }
            }
            CanvasCommand::ReuseSeed(seed) => {
                c.form.seed = seed;
                c.form.random_seed = false;
            }
            CanvasCommand::Paint { from, to } => {
                let f = |p: [i32; 2]| (p[0] as f32 + 0.5, p[1] as f32 + 0.5);
                c.doc
                    .paint(f(from), f(to), c.tool, c.brush_size, c.hardness);
            }
            CanvasCommand::EndStroke => c.doc.end_stroke(),
            CanvasCommand::Undo => {
                c.doc.undo();
            }
            CanvasCommand::Redo => {
                c.doc.redo();
            }
            CanvasCommand::InvertMask => {
                c.doc.invert_mask();
            }
            CanvasCommand::ClearMask => {
                c.doc.clear_mask();
            }
            CanvasCommand::ClearCanvas => {
                if c.generating.is_none() && c.doc.clear() {
                    c.view.fit();
                }
            }
            CanvasCommand::Extend { side, px } => {
                if c.generating.is_some() {
                    self.notices
                        .warning("Wait for the generation to finish before growing the canvas");
                } else if c.doc.extend(side, px) {
                    c.view.fit();
                    let m = c.model.as_ref().map_or(8, |m| m.size_multiple);
                    if let Some((w, h)) = c.doc.size()
                        && (w % m != 0 || h % m != 0)
                    {
                        self.notices.info(format!(
                            "The canvas is {w}x{h}; it is generated at the nearest multiple of \
                             {m} and fitted back"
                        ));
                    }
                }
            }
            CanvasCommand::SelectStaged(i) => c.doc.select_staged(i),
            CanvasCommand::AcceptStaged => {
                if c.doc.accept_staged() {
                    c.view.fit();
                }
            }
            CanvasCommand::DiscardStaged => {
                c.doc.discard_staged();
            }
            CanvasCommand::DiscardAllStaged => c.doc.discard_all_staged(),
            CanvasCommand::OpenImage(path) => self.open_image(&path),
            CanvasCommand::PasteImage(image) => self.paste_image(&image),
            CanvasCommand::OpenImageDialog => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Open an image")
                    .add_filter("Images", &IMAGE_EXTENSIONS)
                    .pick_file()
                {
                    self.open_image(&path);
                }
            }
            CanvasCommand::SaveImageDialog => {
                if c.doc.image().is_some()
                    && let Some(path) = rfd::FileDialog::new()
                        .set_title("Save the canvas image")
                        .set_file_name("canvas.png")
                        .add_filter("PNG", &["png"])
                        .save_file()
                {
                    self.save_canvas_image(&path);
                }
            }
            CanvasCommand::ReuseParameters(path) => {
                let params = c
                    .history
                    .entries()
                    .iter()
                    .find(|e| e.path == path)
                    .and_then(|e| e.parameters.clone())
                    .or_else(|| {
                        decode_image_file(&path)
                            .ok()
                            .and_then(|d| d.parameters)
                            .map(|t| GenerationParameters::parse(&t))
                    });
                match params {
                    Some(p) => self.restore_into_form(&p),
                    None => self
                        .notices
                        .warning("This image carries no generation parameters"),
                }
            }
            CanvasCommand::RestoreOffered(id) => {
                if let Some((offered, params)) = c.offered.take() {
                    if offered == id {
                        self.restore_into_form(&params);
                    } else {
                        c.offered = Some((offered, params));
                    }
                }
            }
            CanvasCommand::DeleteImage(path) => match c.history.trash(&path) {
                Ok(true) => self.notices.undoable(
                    format!("Deleted {}", super::file_name(&path)),
                    "Undo",
                    Command::Canvas(CanvasCommand::UndoDeleteImage(path)),
                    self.undo_window,
                ),
                Ok(false) => {}
                Err(e) => self
                    .notices
                    .error(format!("Could not delete the image: {e:#}")),
            },
            CanvasCommand::UndoDeleteImage(path) => match c.history.restore(&path) {
                Ok(true) => {}
                Ok(false) => self.notices.warning("The image can no longer be restored"),
                Err(e) => self.notices.error(format!("{e:#}")),
            },
            CanvasCommand::FitView => c.view.fit(),
        }
    }

    /// Loads a Stable Diffusion model with the options in Settings.
    pub(crate) fn load_image_model(&mut self, path: PathBuf, at_startup: bool) {
        if path.as_os_str().is_empty() || self.jobs.loading_image_model() == Some(&path) {
            return;
        }
        let options = self.settings.image_model_options.clone();
        let job = self.submit(
            JobKind::LoadImageModel {
                path: path.clone(),
                options: options.clone(),
            },
            JobPurpose::LoadImageModel(path, options),
        );
        if at_startup {
            self.canvas.startup_load = job;
        }
    }

    fn generate_image(&mut self) {
        let c = &mut self.canvas;
        if c.generating.is_some() {
            return;
        }
        let Some(model) = c.model.clone() else {
            self.notices
                .warning("Open a Stable Diffusion model in the Canvas before generating");
            return;
        };
        let request = build_request(&c.form, &c.styles, &c.doc, &model);
        if let Some((w, h)) = c.doc.size()
            && (w, h) != (request.width, request.height)
        {
            self.notices.info(format!(
                "The {w}x{h} canvas is generated at {}x{} (multiples of {} for {}) and fitted \
                 back",
                request.width,
                request.height,
                model.size_multiple,
                model.kind.label()
            ));
        }
        let job = self.submit(
            JobKind::GenerateImage {
                request: Box::new(request),
            },
            JobPurpose::GenerateImage,
        );
        let c = &mut self.canvas;
        c.generating = job;
        c.progress = job.map(|_| (0.0, "waiting to start".to_owned()));
        c.preview = None;
    }

    fn open_image(&mut self, path: &Path) {
        if self.canvas.generating.is_some() {
            self.notices.warning(
                "Wait for the generation to finish (or cancel it) before opening an image",
            );
            return;
        }
        let decoded = match decode_image_file(path) {
            Ok(d) => d,
            Err(e) => {
                let text = e.to_string();
                let shown = path.display().to_string();
                self.notices.error(if text.contains(&shown) {
                    format!("Could not open the image: {text}")
                } else {
                    format!("Could not open {shown}: {text}")
                });
                return;
            }
        };
        let c = &mut self.canvas;
        if let Some((w, h)) = decoded.downscaled_from {
            self.notices.warning(format!(
                "{} is {w}x{h}; it was downscaled to {}x{} to fit the canvas",
                super::file_name(path),
                decoded.image.width,
                decoded.image.height
            ));
        }
        c.doc.set_image(decoded.image);
        c.view.fit();
        self.settings.panel = crate::gui::settings_store::Panel::Canvas;
        if let Some(text) = decoded.parameters {
            let params = GenerationParameters::parse(&text);
            let id = c.next_offer;
            c.next_offer += 1;
            let summary = summary(&params);
            c.offered = Some((id, params));
            self.notices.undoable(
                format!(
                    "{} carries generation parameters ({summary}). Restore them into the form?",
                    super::file_name(path)
                ),
                "Restore parameters",
                Command::Canvas(CanvasCommand::RestoreOffered(id)),
                OFFER_LIFETIME,
            );
        }
    }

    fn paste_image(&mut self, image: &RgbImage) {
        if self.canvas.generating.is_some() {
            self.notices.warning(
                "Wait for the generation to finish (or cancel it) before pasting an image",
            );
            return;
        }
        let (w, h) = (image.width, image.height);
        let side = w.max(h);
        let image = if side > MAX_SIDE {
            let scale = f64::from(MAX_SIDE) / f64::from(side);
            let (nw, nh) = (
                ((f64::from(w) * scale) as u32).max(1),
                ((f64::from(h) * scale) as u32).max(1),
            );
            self.notices.warning(format!(
                "The pasted image is {w}x{h}; it was downscaled to {nw}x{nh} to fit the canvas"
            ));
            image.resized(nw, nh)
        } else {
            image.clone()
        };
        self.canvas.doc.set_image(image);
        self.canvas.view.fit();
        self.settings.panel = crate::gui::settings_store::Panel::Canvas;
    }

    fn restore_into_form(&mut self, params: &GenerationParameters) {
        let set = restore_parameters(&mut self.canvas.form, params);
        if set.is_empty() {
            self.notices
                .warning("No parameters Studio knows were found in the image");
        } else {
            self.notices.info(format!("Restored {}", set.join(", ")));
        }
    }

    fn save_canvas_image(&mut self, path: &Path) {
        let Some(image) = self.canvas.doc.image() else {
            return;
        };
        let result = encode_png(image, None)
            .map_err(anyhow::Error::from)
            .and_then(|png| crate::home::atomic_write(path, &png));
        match result {
            Ok(()) => self.notices.info(format!("Saved {}", path.display())),
            Err(e) => self
                .notices
                .error(format!("The image was not saved: {e:#}")),
        }
    }

    // ---- worker events ----------------------------------------------------------------------

    pub(crate) fn image_model_loaded(&mut self, job: JobId, info: ImageModelInfo) {
        let purpose = self.jobs.get(job).map(|t| t.purpose.clone());
        if let Some(JobPurpose::LoadImageModel(path, options)) = purpose {
            self.settings.last_image_model = Some(path);
            self.canvas.model_options = Some(options);
        }
        let startup = self.canvas.startup_load == Some(job);
        let c = &mut self.canvas;
        if !startup && c.doc.is_empty() {
            // A new model starts at the size it was trained at.
            c.form.width = info.default_size.0;
            c.form.height = info.default_size.1;
        }
        if info.few_step && !startup {
            c.form.steps = c.form.steps.min(4);
            c.form.cfg_scale = c.form.cfg_scale.min(1.0);
        }
        self.notices.info(format!(
            "Loaded {} ({}) for the Canvas",
            info.name,
            info.kind.label()
        ));
        c.model = Some(info);
    }

    pub(crate) fn image_model_unloaded(&mut self, job: JobId) {
        self.canvas.model = None;
        self.canvas.model_options = None;
        if matches!(
            self.jobs.get(job).map(|t| &t.purpose),
            Some(JobPurpose::UnloadImageModel)
        ) {
            self.settings.last_image_model = None;
        }
    }

    pub(crate) fn image_progress(
        &mut self,
        job: JobId,
        image: u32,
        images: u32,
        step: usize,
        steps: usize,
    ) {
        let c = &mut self.canvas;
        c.progress_events += 1;
        let images = images.max(1);
        let done = f64::from(image) + step as f64 / steps.max(1) as f64;
        let fraction = (done / f64::from(images)) as f32;
        let text = format!("image {}/{images} · step {step}/{steps}", image + 1);
        c.progress = Some((fraction, text.clone()));
        self.jobs.progress(job, fraction, text);
    }

    pub(crate) fn image_ready(&mut self, image: Arc<GeneratedImage>) {
        let path = Some(self.canvas.history.save(&image, &self.files));
        let c = &mut self.canvas;
        c.last_seed = Some(image.seed);
        c.doc.stage(image, path);
    }

    /// The image job `job` ended. Returns whether it was the Canvas's.
    pub(crate) fn image_job_finished(
        &mut self,
        job: JobId,
        purpose: Option<&JobPurpose>,
        outcome: Outcome,
        error: Option<&str>,
    ) -> bool {
        match purpose {
            Some(JobPurpose::GenerateImage) => {
                let c = &mut self.canvas;
                if c.generating == Some(job) {
                    c.generating = None;
                }
                c.progress = None;
                c.preview = None;
                match outcome {
                    Outcome::Done => {}
                    Outcome::Cancelled => {
                        let kept = c.doc.staged().len();
                        self.notices.info(if kept > 0 {
                            format!("Generation cancelled; {kept} finished image(s) are staged")
                        } else {
                            "Generation cancelled; the canvas is unchanged".to_owned()
                        });
                    }
                    Outcome::Failed => self.notices.error(format!(
                        "Generation failed: {}. The canvas is unchanged",
                        error.unwrap_or("unknown error")
                    )),
                }
                true
            }
            Some(JobPurpose::LoadImageModel(path, _)) => {
                if self.canvas.startup_load == Some(job) {
                    self.canvas.startup_load = None;
                }
                match outcome {
                    Outcome::Done => {}
                    Outcome::Cancelled => self.notices.warning("Loading was cancelled"),
                    Outcome::Failed => {
                        if self.settings.last_image_model.as_ref() == Some(path) {
                            self.settings.last_image_model = None;
                        }
                        self.notices
                            .error(load_error(path, error.unwrap_or("unknown error")));
                    }
                }
                true
            }
            Some(JobPurpose::UnloadImageModel) => {
                if let (Outcome::Failed, Some(e)) = (outcome, error) {
                    self.notices.error(e.to_owned());
                }
                true
            }
            _ => false,
        }
    }

    /// Shows the newest denoising preview of the running generation.
    pub(crate) fn poll_preview(&mut self, ctx: &egui::Context) {
        let Some(job) = self.canvas.generating else {
            return;
        };
        let Some(frame) = self
            .worker
            .as_ref()
            .and_then(studio_inference::worker::Worker::take_preview)
        else {
            return;
        };
        if frame.job != job {
            return;
        }
        let c = &mut self.canvas;
        match &mut c.preview {
            Some(t) => t.set(
                egui::ColorImage::from_rgba_unmultiplied(
                    [frame.image.width as usize, frame.image.height as usize],
                    &frame.image.to_rgba(),
                ),
                egui::TextureOptions::LINEAR,
            ),
            None => c.preview = Some(preview_texture(ctx, &frame.image)),
        }
        c.previews_shown += 1;
    }

    /// Where a dropped file goes: Stable Diffusion models to the Canvas's loader, other models
    /// to the chat model loader, images (and, on the Canvas, anything else) to the canvas.
    pub(crate) fn route_dropped(&mut self, path: PathBuf) {
        let on_canvas = self.settings.panel == crate::gui::settings_store::Panel::Canvas;
        if is_diffusion_model(&path) {
            self.commands
                .push(Command::Canvas(CanvasCommand::LoadModel(path)));
        } else if is_image_file(&path) || (on_canvas && !looks_like_a_model(&path)) {
            self.commands
                .push(Command::Canvas(CanvasCommand::OpenImage(path)));
        } else {
            self.commands.push(Command::LoadModel(path));
        }
    }

    /// Ctrl+V on the Canvas with text on the clipboard: a copied image *file* (its path or
    /// `file://` URI) is opened; other text is left alone. (Copied pixels arrive as
    /// `CanvasCommand::PasteImage`.)
    pub(crate) fn paste_on_canvas(&mut self, text: &str) {
        let first = text.lines().next().unwrap_or("").trim();
        let path = PathBuf::from(first.strip_prefix("file://").unwrap_or(first));
        if path.is_file() && is_image_file(&path) {
            self.commands
                .push(Command::Canvas(CanvasCommand::OpenImage(path)));
        }
    }
}

/// "seed 42, 20 steps, Euler a, 512x512".
fn summary(p: &GenerationParameters) -> String {
    let mut parts = Vec::new();
    if let Some(s) = p.seed() {
        parts.push(format!("seed {s}"));
    }
    if let Some(s) = p.steps() {
        parts.push(format!("{s} steps"));
    }
    if let Some(s) = p.get("Sampler") {
        parts.push(s.to_owned());
    }
    if let Some((w, h)) = p.size() {
        parts.push(format!("{w}x{h}"));
    }
    if parts.is_empty() {
        parts.push("prompt".to_owned());
    }
    parts.join(", ")
}
