//! What the Canvas's commands do, and how the worker's image events reach it. Everything
//! here runs at the end of a frame (commands) or before drawing (events), on the UI thread;
//! generation itself runs on the worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use studio_inference::diffusion::annotators::Preprocessor;
use studio_inference::diffusion::controlnet::ControlSpec;
use studio_inference::diffusion::imaging::{MAX_SIDE, RgbImage, decode_image_file, encode_png};
use studio_inference::diffusion::lora::{self, LoraSpec};
use studio_inference::diffusion::model::{ImageModelInfo, ImageModelOptions, is_diffusion_model};
use studio_inference::diffusion::pipeline::GeneratedImage;
use studio_inference::image_meta::GenerationParameters;
use studio_inference::worker::{Event, GeneratedImageSource, JobId, JobKind};

use super::CanvasPanel;
use super::command::{CanvasCommand, CanvasPurpose};
use super::control::{ControlCommand, ControlSource, ControlUnitForm};
use super::document::Tool;
use super::form::{build_request, restore_parameters, snap};
use super::view::preview_texture;
use crate::gui::command::{Command, load_error};
use crate::gui::context::{AppContext, Handled};
use crate::gui::jobs::Jobs;
use crate::gui::panel::{OpenContext, PanelView, UiContext, still_there};
use crate::gui::paste::pasted;
use crate::gui::settings_store::Panel;
use crate::gui::shortcuts::{REDO_SHORTCUT, REDO_Y, SEND_SHORTCUT, UNDO_SHORTCUT};

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

impl PanelView for CanvasPanel {
    type Command = CanvasCommand;
    type Purpose = CanvasPurpose;

    /// Opens the saved canvas, gallery and style presets.
    fn open(cx: &mut OpenContext<'_>) -> Self {
        let (mut canvas, notes) = CanvasPanel::new(cx.home, cx.presets_dir);
        for note in notes {
            cx.notices.warning(note);
        }
        canvas.demo_model = cx
            .bundled_models
            .and_then(|dir| crate::bundled::model_in(dir, crate::bundled::BundledKind::Image));
        canvas
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        self.canvas_ui(ui, cx.settings, cx.jobs, cx.files, cx.commands);
    }

    /// Carries out one Canvas command.
    fn apply(&mut self, command: CanvasCommand, cx: &mut AppContext<'_>) {
        let c = &mut *self;
        match command {
            CanvasCommand::LoadModel(path) => self.load_image_model(path, false, cx),
            CanvasCommand::UnloadModel => {
                cx.submit(
                    JobKind::UnloadImageModel,
                    CanvasPurpose::UnloadImageModel.into(),
                );
            }
            CanvasCommand::OpenModelDialog { folder } => {
                let dialog = rfd::FileDialog::new().set_title("Open a Stable Diffusion model");
                let picked = if folder {
                    dialog.pick_folder()
                } else {
                    dialog
                        .add_filter(
                            "Stable Diffusion checkpoint",
                            &["safetensors", "ckpt", "pt", "pth", "bin"],
                        )
                        .pick_file()
                };
                if let Some(path) = picked {
                    self.load_image_model(path, false, cx);
                }
            }
            CanvasCommand::Generate => self.generate_image(cx),
            CanvasCommand::Upscale => self.upscale(cx),
            CanvasCommand::ChooseUpscalerDialog => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Choose an upscaler (ESRGAN / Real-ESRGAN or SwinIR)")
                    .add_filter("Upscaler", &["safetensors", "pth", "pt"])
                    .pick_file()
                {
                    c.form.upscaler = Some(path);
                }
            }
            CanvasCommand::SetUpscaler(path) => c.form.upscaler = Some(path),
            CanvasCommand::ChooseRefinerDialog { folder } => {
                let dialog = rfd::FileDialog::new().set_title("Choose an SDXL refiner");
                let picked = if folder {
                    dialog.pick_folder()
                } else {
                    dialog
                        .add_filter("Refiner", &["safetensors", "ckpt"])
                        .pick_file()
                };
                if let Some(path) = picked {
                    c.form.refiner = Some(path);
                    c.form.use_refiner = true;
                }
            }
            CanvasCommand::SetRefiner(path) => {
                c.form.refiner = Some(path);
                c.form.use_refiner = true;
            }
            CanvasCommand::Control(command) => self.apply_control(command, cx),
            CanvasCommand::AddLoraToPrompt(name) => {
                // Its preferred weight, and its trigger words the prompt lacks, as the web
                // UI's gallery adds them.
                let entry = c
                    .lora_list
                    .as_ref()
                    .and_then(|l| l.iter().find(|e| e.name == name));
                let weight = entry.and_then(|e| e.preferred_weight).unwrap_or(1.0);
                let prompt = &mut c.form.prompt;
                let words: Vec<String> = entry
                    .map(|e| {
                        e.trigger_words
                            .iter()
                            .filter(|w| !prompt.contains(w.as_str()))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if !prompt.is_empty() && !prompt.ends_with(' ') {
                    prompt.push(' ');
                }
                prompt.push_str("<lora:");
                prompt.push_str(&name);
                prompt.push(':');
                prompt.push_str(&weight.to_string());
                prompt.push('>');
                if !words.is_empty() {
                    prompt.push_str(", ");
                    prompt.push_str(&words.join(", "));
                }
            }
            CanvasCommand::Cancel => {
                if let (Some(worker), Some(job)) = (&cx.worker, c.generating) {
                    worker.cancel(job);
                }
            }
            CanvasCommand::ReuseSeed(seed) => {
                c.form.seed = seed;
                c.form.random_seed = false;
            }
            CanvasCommand::Paint { from, to } => {
                let f = |p: [i32; 2]| (p[0] as f32 + 0.5, p[1] as f32 + 0.5);
                if matches!(c.tool, Tool::ControlPen | Tool::ControlEraser)
                    && c.doc.layer_size().is_none()
                {
                    // On an empty canvas the control layer has the size of the new image.
                    let (w, h) = c.target();
                    c.doc.begin_control_layer(w, h);
                }
                c.doc
                    .paint(f(from), f(to), c.tool, c.brush_size, c.hardness);
            }
            CanvasCommand::EndStroke => c.doc.end_stroke(),
            CanvasCommand::NewSketch => {
                if c.doc.image().is_none() {
                    let m = c.model.as_ref().map_or(8, |m| m.size_multiple);
                    let (w, h) = (snap(c.form.width, m), snap(c.form.height, m));
                    c.doc.set_image(RgbImage::new_filled(w, h, [255, 255, 255]));
                }
            }
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
            CanvasCommand::ClearControlLayer => {
                c.doc.clear_control();
            }
            CanvasCommand::ClearCanvas => {
                if c.generating.is_none() && c.doc.clear() {
                    c.view.fit();
                }
            }
            CanvasCommand::Extend { side, px } => {
                if c.generating.is_some() {
                    cx.notices
                        .warning("Wait for the generation to finish before growing the canvas");
                } else if c.doc.extend(side, px) {
                    c.view.fit();
                    let m = c.model.as_ref().map_or(8, |m| m.size_multiple);
                    if let Some((w, h)) = c.doc.size()
                        && (w % m != 0 || h % m != 0)
                    {
                        cx.notices.info(format!(
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
            CanvasCommand::OpenImage(path) => self.open_image(&path, cx),
            CanvasCommand::PasteImage(image) => self.paste_image(&image, cx),
            CanvasCommand::OpenImageDialog => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Open an image")
                    .add_filter("Images", &IMAGE_EXTENSIONS)
                    .pick_file()
                {
                    self.open_image(&path, cx);
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
                    self.save_canvas_image(&path, cx);
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
                    Some(p) => self.restore_into_form(&p, cx),
                    None => cx
                        .notices
                        .warning("This image carries no generation parameters"),
                }
            }
            CanvasCommand::RestoreOffered(id) => {
                if let Some((offered, params)) = c.offered.take() {
                    if offered == id {
                        self.restore_into_form(&params, cx);
                    } else {
                        c.offered = Some((offered, params));
                    }
                }
            }
            CanvasCommand::DeleteImage(path) => match c.history.trash(&path) {
                Ok(true) => cx.notices.undoable(
                    format!("Deleted {}", super::file_name(&path)),
                    "Undo",
                    Command::from(CanvasCommand::UndoDeleteImage(path)),
                    cx.undo_window,
                ),
                Ok(false) => {}
                Err(e) => cx
                    .notices
                    .error(format!("Could not delete the image: {e:#}")),
            },
            CanvasCommand::UndoDeleteImage(path) => match c.history.restore(&path) {
                Ok(true) => {}
                Ok(false) => cx.notices.warning("The image can no longer be restored"),
                Err(e) => cx.notices.error(format!("{e:#}")),
            },
            CanvasCommand::FitView => c.view.fit(),
        }
    }

    /// An event of a job the Canvas submitted (`purpose` says which).
    fn on_event(
        &mut self,
        job: JobId,
        purpose: &CanvasPurpose,
        event: Event,
        cx: &mut AppContext<'_>,
    ) -> Handled {
        match event {
            Event::ImageModelLoaded { info, .. } => {
                self.image_model_loaded(job, purpose, info, cx);
            }
            Event::ImageModelUnloaded { .. } => self.image_model_unloaded(purpose, cx),
            Event::ImageProgress {
                image,
                images,
                step,
                steps,
                ..
            } => self.image_progress(job, image, images, step, steps, cx),
            Event::ImageReady { image, .. } => self.image_ready(image, cx),
            Event::Done { .. } => self.image_job_finished(job, purpose, Outcome::Done, None, cx),
            Event::Cancelled { .. } => {
                self.image_job_finished(job, purpose, Outcome::Cancelled, None, cx);
            }
            Event::Failed { error, .. } => {
                self.image_job_finished(job, purpose, Outcome::Failed, Some(&error), cx);
            }
            other => return Handled::No(other),
        }
        Handled::Yes
    }

    /// Loads the last session's image model again, if it is still there; else the bundled demo
    /// model, if there is one, at its own size (no saved size belongs to it).
    fn restore(&mut self, cx: &mut AppContext<'_>) {
        let saved = &mut cx.settings.last_image_model;
        if let Some(path) = still_there(saved, "image model", "in the Canvas", cx.notices) {
            self.load_image_model(path, true, cx);
        } else if let Some(demo) = self.demo_model.clone() {
            self.load_image_model(demo, false, cx);
        }
    }

    /// Shows the newest denoising preview; while generating, previews arrive through a
    /// mailbox, not as events, so look again soon.
    fn frame(&mut self, cx: &mut AppContext<'_>) {
        self.poll_preview(cx);
        if self.is_generating() {
            cx.ctx.request_repaint_after(Duration::from_millis(50));
        }
    }

    /// Ctrl+Z / Ctrl+Shift+Z / Ctrl+Y undo and redo on the canvas (a focused text field keeps
    /// its own undo), Ctrl+Enter generates, Ctrl+V pastes an image (or opens a pasted image
    /// file path).
    fn shortcuts(&mut self, cx: &mut AppContext<'_>) {
        let ctx = cx.ctx;
        if ctx.input_mut(|i| i.consume_shortcut(&SEND_SHORTCUT)) {
            cx.commands.push(CanvasCommand::Generate.into());
        }
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        // Shift first: Ctrl+Z also matches with Shift held.
        if ctx.input_mut(|i| i.consume_shortcut(&REDO_SHORTCUT) || i.consume_shortcut(&REDO_Y)) {
            cx.commands.push(CanvasCommand::Redo.into());
        } else if ctx.input_mut(|i| i.consume_shortcut(&UNDO_SHORTCUT)) {
            cx.commands.push(CanvasCommand::Undo.into());
        }
        let (texts, images) = pasted(ctx);
        for text in texts {
            paste_on_canvas(&text, cx);
        }
        for image in images {
            cx.commands
                .push(CanvasCommand::PasteImage(Arc::new(image)).into());
        }
    }

    fn drop_hint(&self) -> Option<&'static str> {
        Some("Drop an image to open it on the canvas, or a model to load it")
    }

    /// The canvas document, written a moment after the last change.
    fn autosave(&mut self, cx: &mut AppContext<'_>) -> Option<Duration> {
        self.store.tick(&self.doc, &self.form, cx.files)
    }

    /// Writes the canvas document now.
    fn flush(&mut self, cx: &mut AppContext<'_>) {
        self.store.flush(&self.doc, &self.form, cx.files);
    }

    /// Empties the gallery's trash (no undo can come).
    fn close(&mut self, _cx: &mut AppContext<'_>) {
        self.history.purge_trash();
    }
}

impl CanvasPanel {
    /// A gallery thumbnail the file thread decoded.
    pub(crate) fn set_thumbnail(
        &mut self,
        ctx: &egui::Context,
        path: &Path,
        result: Result<(RgbImage, Option<String>), String>,
    ) {
        if !self.set_lora_preview(ctx, path, &result) {
            self.history.set_thumbnail(ctx, path, result);
        }
    }

    /// Loads a Stable Diffusion model with the options in Settings.
    pub(crate) fn load_image_model(
        &mut self,
        path: PathBuf,
        at_startup: bool,
        cx: &mut AppContext<'_>,
    ) {
        if path.as_os_str().is_empty() || loading_image_model(cx.jobs) == Some(&path) {
            return;
        }
        let options = cx.settings.image_model_options.clone();
        let job = cx.submit(
            JobKind::LoadImageModel {
                path: path.clone(),
                options: options.clone(),
            },
            CanvasPurpose::LoadImageModel(path, options).into(),
        );
        if at_startup {
            self.startup_load = job;
        }
    }

    fn apply_control(&mut self, command: ControlCommand, cx: &mut AppContext<'_>) {
        let units = &mut self.control_units;
        match command {
            ControlCommand::AddUnit => units.push(ControlUnitForm::default()),
            ControlCommand::RemoveUnit(i) if i < units.len() => {
                units.remove(i);
            }
            ControlCommand::ChooseModelDialog { unit, folder } => {
                let dialog = rfd::FileDialog::new().set_title("Choose a ControlNet");
                let picked = if folder {
                    dialog.pick_folder()
                } else {
                    dialog
                        .add_filter("ControlNet", &["safetensors", "pth", "pt", "bin"])
                        .pick_file()
                };
                if let (Some(path), Some(u)) = (picked, units.get_mut(unit)) {
                    u.model = Some(path);
                }
            }
            ControlCommand::SetModel(i, path) => {
                if let Some(u) = units.get_mut(i) {
                    u.model = Some(path);
                }
            }
            ControlCommand::ChooseImageDialog(i) => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Choose a control image")
                    .add_filter("Image", &["png", "jpg", "jpeg", "webp", "bmp"])
                    .pick_file()
                {
                    cx.commands
                        .push(CanvasCommand::Control(ControlCommand::SetImage(i, path)).into());
                }
            }
            ControlCommand::SetImage(i, path) => match decode_image_file(&path) {
                Ok(decoded) => {
                    if let Some(u) = units.get_mut(i) {
                        u.source = ControlSource::File(path, Arc::new(decoded.image));
                        let image = u.source_image(&self.doc);
                        u.set_preview(image.as_deref());
                    }
                }
                Err(e) => cx
                    .notices
                    .error(format!("Could not open the control image: {e}")),
            },
            ControlCommand::UseCanvas(i) => {
                if let Some(u) = units.get_mut(i) {
                    u.source = ControlSource::Canvas;
                    let image = u.source_image(&self.doc);
                    u.set_preview(image.as_deref());
                }
            }
            ControlCommand::UseLayer(i) => {
                if let Some(u) = units.get_mut(i) {
                    u.source = ControlSource::Layer;
                    u.preprocessor = Preprocessor::None;
                    let image = u.source_image(&self.doc);
                    u.set_preview(image.as_deref());
                    self.show_control = true;
                }
            }
            ControlCommand::MapToLayer(i) => {
                let Some(u) = units.get_mut(i) else {
                    return;
                };
                let map = if let Some(map) = u.preview() {
                    map.clone()
                } else if let Some(image) = u.source_image(&self.doc) {
                    u.preprocessor.apply(&image)
                } else {
                    cx.notices.info("The unit has no image to make a map from");
                    return;
                };
                let size = self.doc.size().unwrap_or((map.width, map.height));
                self.doc.set_control(&map, size);
                u.source = ControlSource::Layer;
                u.preprocessor = Preprocessor::None;
                u.set_preview(self.doc.control());
                self.show_control = true;
                self.tool = Tool::ControlPen;
            }
            ControlCommand::Preview(i) => {
                if let Some(u) = units.get_mut(i) {
                    let image = u.source_image(&self.doc);
                    if image.is_none() {
                        cx.notices.info(match u.source {
                            ControlSource::Layer => {
                                "The control layer is empty: draw on it with the Control pen"
                            }
                            _ => "The canvas has no image yet: open or draw one first",
                        });
                    }
                    u.set_preview(image.as_deref());
                }
            }
            ControlCommand::RemoveUnit(_) => {}
        }
    }

    /// The enabled ControlNet units for a `size` generation; a unit that cannot run is left
    /// out with a warning, and an image of another size gets a note that it is resized.
    fn control_specs(&self, size: (u32, u32), cx: &mut AppContext<'_>) -> Vec<ControlSpec> {
        let mut specs = Vec::new();
        for (i, unit) in self.control_units.iter().enumerate() {
            if !unit.enabled {
                continue;
            }
            match unit.spec(&self.doc) {
                Ok(spec) => {
                    if (spec.image.width, spec.image.height) != size {
                        cx.notices.info(format!(
                            "ControlNet unit {i}: the {}x{} control image is resized to {}x{}",
                            spec.image.width, spec.image.height, size.0, size.1
                        ));
                    }
                    specs.push(spec);
                }
                Err(why) => cx
                    .notices
                    .warning(format!("ControlNet unit {i} is left out: {why}")),
            }
        }
        specs
    }

    fn generate_image(&mut self, cx: &mut AppContext<'_>) {
        let c = &mut *self;
        if c.generating.is_some() {
            return;
        }
        let Some(model) = c.model.clone() else {
            cx.notices
                .warning("Open a Stable Diffusion model in the Canvas before generating");
            return;
        };
        let mut request = build_request(&c.form, &c.styles, &c.doc, &model);
        request.embeddings = studio_inference::diffusion::embeddings::list_dir(&c.embeddings_dir);
        // `<lora:name:weight>` in the prompt: the model is loaded again with those networks
        // merged when they differ from what is loaded (and without them when none is named).
        let (tags, _) = lora::parse_prompt(&request.prompt);
        let dirs = c.lora_dirs(cx.settings);
        let available: Vec<(String, PathBuf)> =
            dirs.iter().flat_map(|d| lora::list_dir(d)).collect();
        let mut specs = Vec::new();
        for tag in tags {
            match available.iter().find(|(name, _)| *name == tag.name) {
                Some((_, path)) => specs.push(LoraSpec {
                    path: path.clone(),
                    unet: tag.unet,
                    text: tag.text,
                }),
                None => cx.notices.warning(format!(
                    "No LoRA named `{}` in {}; generating without it",
                    tag.name,
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
            }
        }
        let loaded = c
            .model_options
            .as_ref()
            .map(|o| o.loras.clone())
            .unwrap_or_default();
        if specs != loaded {
            let options = ImageModelOptions {
                loras: specs,
                ..cx.settings.image_model_options.clone()
            };
            let job = cx.submit(
                JobKind::LoadImageModel {
                    path: model.path.clone(),
                    options: options.clone(),
                },
                CanvasPurpose::LoadImageModel(model.path.clone(), options).into(),
            );
            // Like the startup load, it keeps the form as it is.
            self.startup_load = job;
        }
        let c = &mut *self;
        if let Some((w, h)) = c.doc.size()
            && (w, h) != (request.width, request.height)
        {
            cx.notices.info(format!(
                "The {w}x{h} canvas is generated at {}x{} (multiples of {} for {}) and fitted \
                 back",
                request.width,
                request.height,
                model.size_multiple,
                model.kind.label()
            ));
        }
        let control = self.control_specs((request.width, request.height), cx);
        let refiner = self
            .form
            .refiner
            .clone()
            .filter(|_| self.form.use_refiner);
        let job = cx.submit(
            JobKind::GenerateImage {
                request: Box::new(request),
                control,
                refiner,
            },
            CanvasPurpose::GenerateImage.into(),
        );
        let c = &mut *self;
        c.generating = job;
        c.progress = job.map(|_| (0.0, "waiting to start".to_owned()));
        c.preview = None;
    }

    /// Upscales the selected result (with its parameters), or else the canvas image; the
    /// result is staged and saved in the history like a generated one.
    fn upscale(&mut self, cx: &mut AppContext<'_>) {
        let c = &mut *self;
        if c.generating.is_some() {
            return;
        }
        let Some(upscaler) = c.form.upscaler.clone() else {
            cx.notices.warning("Choose an upscaler file first");
            return;
        };
        let (image, source) = if let Some(staged) = c.doc.selected_staged() {
            (
                staged.image.image.clone(),
                GeneratedImageSource {
                    parameters: staged.image.parameters.clone(),
                    seed: staged.image.seed,
                },
            )
        } else if let Some(image) = c.doc.image() {
            (image.clone(), GeneratedImageSource::default())
        } else {
            cx.notices
                .warning("Open or generate an image to upscale first");
            return;
        };
        let job = cx.submit(
            JobKind::UpscaleImage {
                image: Box::new(image),
                parameters: Box::new(source),
                upscaler,
                scale: f64::from(c.form.upscale_by.clamp(1.0, 8.0)),
            },
            CanvasPurpose::Upscale.into(),
        );
        let c = &mut *self;
        c.generating = job;
        c.progress = job.map(|_| (0.0, "waiting to start".to_owned()));
        c.preview = None;
    }

    fn open_image(&mut self, path: &Path, cx: &mut AppContext<'_>) {
        if self.generating.is_some() {
            cx.notices.warning(
                "Wait for the generation to finish (or cancel it) before opening an image",
            );
            return;
        }
        let decoded = match decode_image_file(path) {
            Ok(d) => d,
            Err(e) => {
                let text = e.to_string();
                let shown = path.display().to_string();
                cx.notices.error(if text.contains(&shown) {
                    format!("Could not open the image: {text}")
                } else {
                    format!("Could not open {shown}: {text}")
                });
                return;
            }
        };
        let c = &mut *self;
        if let Some((w, h)) = decoded.downscaled_from {
            cx.notices.warning(format!(
                "{} is {w}x{h}; it was downscaled to {}x{} to fit the canvas",
                super::file_name(path),
                decoded.image.width,
                decoded.image.height
            ));
        }
        c.doc.set_image(decoded.image);
        c.view.fit();
        cx.settings.panel = Panel::Canvas;
        if let Some(text) = decoded.parameters {
            let params = GenerationParameters::parse(&text);
            let id = c.next_offer;
            c.next_offer += 1;
            let summary = summary(&params);
            c.offered = Some((id, params));
            cx.notices.undoable(
                format!(
                    "{} carries generation parameters ({summary}). Restore them into the form?",
                    super::file_name(path)
                ),
                "Restore parameters",
                Command::from(CanvasCommand::RestoreOffered(id)),
                OFFER_LIFETIME,
            );
        }
    }

    fn paste_image(&mut self, image: &RgbImage, cx: &mut AppContext<'_>) {
        if self.generating.is_some() {
            cx.notices.warning(
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
            cx.notices.warning(format!(
                "The pasted image is {w}x{h}; it was downscaled to {nw}x{nh} to fit the canvas"
            ));
            image.resized(nw, nh)
        } else {
            image.clone()
        };
        self.doc.set_image(image);
        self.view.fit();
        cx.settings.panel = Panel::Canvas;
    }

    fn restore_into_form(&mut self, params: &GenerationParameters, cx: &mut AppContext<'_>) {
        let set = restore_parameters(&mut self.form, params);
        if set.is_empty() {
            cx.notices
                .warning("No parameters Studio knows were found in the image");
        } else {
            cx.notices.info(format!("Restored {}", set.join(", ")));
        }
    }

    fn save_canvas_image(&mut self, path: &Path, cx: &mut AppContext<'_>) {
        let Some(image) = self.doc.image() else {
            return;
        };
        let result = encode_png(image, None)
            .map_err(anyhow::Error::from)
            .and_then(|png| crate::home::atomic_write(path, &png));
        match result {
            Ok(()) => cx.notices.info(format!("Saved {}", path.display())),
            Err(e) => cx.notices.error(format!("The image was not saved: {e:#}")),
        }
    }

    // ---- worker events ----------------------------------------------------------------------

    fn image_model_loaded(
        &mut self,
        job: JobId,
        purpose: &CanvasPurpose,
        info: ImageModelInfo,
        cx: &mut AppContext<'_>,
    ) {
        let mut demo = false;
        if let CanvasPurpose::LoadImageModel(path, options) = purpose {
            cx.settings.last_image_model = Some(path.clone());
            self.model_options = Some(options.clone());
            demo = self.demo_model.as_ref() == Some(path);
        }
        let startup = self.startup_load == Some(job);
        let c = &mut *self;
        if !startup && c.doc.is_empty() {
            // A new model starts at the size it was trained at.
            c.form.width = info.default_size.0;
            c.form.height = info.default_size.1;
        }
        if demo && !startup {
            c.form.cfg_scale = crate::bundled::DEMO_IMAGE_CFG;
        }
        if info.few_step && !startup {
            c.form.steps = c.form.steps.min(4);
            c.form.cfg_scale = c.form.cfg_scale.min(1.0);
        }
        if info.loras.is_empty() {
            cx.notices.info(format!(
                "Loaded {} ({}) for the Canvas",
                info.name,
                info.kind.label()
            ));
        } else {
            let names: Vec<String> = info
                .loras
                .iter()
                .map(|r| format!("{} ({} modules)", r.name, r.applied))
                .collect();
            cx.notices.info(format!(
                "Loaded {} with LoRA {} for the Canvas",
                info.name,
                names.join(", ")
            ));
        }
        for r in info.loras.iter().filter(|r| r.ignored > 0) {
            cx.notices.warning(if r.applied == 0 {
                format!(
                    "LoRA {} changes nothing in this {} model: it is made for another base model \
                     ({} modules it names are missing or of another size)",
                    r.name,
                    info.kind.label(),
                    r.ignored
                )
            } else {
                format!(
                    "LoRA {}: {} of its modules are not in this model and were left out",
                    r.name, r.ignored
                )
            });
        }
        c.model = Some(info);
    }

    fn image_model_unloaded(&mut self, purpose: &CanvasPurpose, cx: &mut AppContext<'_>) {
        self.model = None;
        self.model_options = None;
        if *purpose == CanvasPurpose::UnloadImageModel {
            cx.settings.last_image_model = None;
        }
    }

    pub(crate) fn image_progress(
        &mut self,
        job: JobId,
        image: u32,
        images: u32,
        step: usize,
        steps: usize,
        cx: &mut AppContext<'_>,
    ) {
        let c = &mut *self;
        c.progress_events += 1;
        let images = images.max(1);
        let done = f64::from(image) + step as f64 / steps.max(1) as f64;
        let fraction = (done / f64::from(images)) as f32;
        let text = format!("image {}/{images} · step {step}/{steps}", image + 1);
        c.progress = Some((fraction, text.clone()));
        cx.jobs.progress(job, fraction, text);
    }

    pub(crate) fn image_ready(&mut self, image: Arc<GeneratedImage>, cx: &mut AppContext<'_>) {
        let path = Some(self.history.save(&image, cx.files));
        let c = &mut *self;
        c.last_seed = Some(image.seed);
        c.doc.stage(image, path);
    }

    /// The Canvas's job `job` ended.
    fn image_job_finished(
        &mut self,
        job: JobId,
        purpose: &CanvasPurpose,
        outcome: Outcome,
        error: Option<&str>,
        cx: &mut AppContext<'_>,
    ) {
        match purpose {
            CanvasPurpose::Upscale => {
                let c = &mut *self;
                if c.generating == Some(job) {
                    c.generating = None;
                }
                c.progress = None;
                match outcome {
                    Outcome::Done => {}
                    Outcome::Cancelled => cx.notices.info("Upscaling cancelled"),
                    Outcome::Failed => cx.notices.error(format!(
                        "Upscaling failed: {}",
                        error.unwrap_or("unknown error")
                    )),
                }
            }
            CanvasPurpose::GenerateImage => {
                let c = &mut *self;
                if c.generating == Some(job) {
                    c.generating = None;
                }
                c.progress = None;
                c.preview = None;
                match outcome {
                    Outcome::Done => {}
                    Outcome::Cancelled => {
                        let kept = c.doc.staged().len();
                        cx.notices.info(if kept > 0 {
                            format!("Generation cancelled; {kept} finished image(s) are staged")
                        } else {
                            "Generation cancelled; the canvas is unchanged".to_owned()
                        });
                    }
                    Outcome::Failed => cx.notices.error(format!(
                        "Generation failed: {}. The canvas is unchanged",
                        error.unwrap_or("unknown error")
                    )),
                }
            }
            CanvasPurpose::LoadImageModel(path, _) => {
                if self.startup_load == Some(job) {
                    self.startup_load = None;
                }
                match outcome {
                    Outcome::Done => {}
                    Outcome::Cancelled => cx.notices.warning("Loading was cancelled"),
                    Outcome::Failed => {
                        if cx.settings.last_image_model.as_ref() == Some(path) {
                            cx.settings.last_image_model = None;
                        }
                        cx.notices
                            .error(load_error(path, error.unwrap_or("unknown error")));
                    }
                }
            }
            CanvasPurpose::UnloadImageModel => {
                if let (Outcome::Failed, Some(e)) = (outcome, error) {
                    cx.notices.error(e.to_owned());
                }
            }
        }
    }

    /// Shows the newest denoising preview of the running generation.
    fn poll_preview(&mut self, cx: &mut AppContext<'_>) {
        let ctx = cx.ctx;
        let Some(job) = self.generating else {
            return;
        };
        let Some(frame) = cx
            .worker
            .and_then(studio_inference::worker::Worker::take_preview)
        else {
            return;
        };
        if frame.job != job {
            return;
        }
        let c = &mut *self;
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
}

/// Where a dropped file goes: Stable Diffusion models to the Canvas's loader, other models
/// to the chat model loader, images (and, on the Canvas, anything else) to the canvas.
pub(crate) fn route_dropped(path: PathBuf, cx: &mut AppContext<'_>) {
    let on_canvas = cx.settings.panel == Panel::Canvas;
    if is_diffusion_model(&path) {
        cx.commands
            .push(Command::from(CanvasCommand::LoadModel(path)));
    } else if is_image_file(&path) || (on_canvas && !looks_like_a_model(&path)) {
        cx.commands
            .push(Command::from(CanvasCommand::OpenImage(path)));
    } else {
        cx.commands.push(Command::LoadModel(path));
    }
}

/// The Stable Diffusion model being loaded (queued or running), if any.
pub(crate) fn loading_image_model(jobs: &Jobs) -> Option<&PathBuf> {
    jobs.find(|p: &CanvasPurpose| match p {
        CanvasPurpose::LoadImageModel(path, _) => Some(path),
        _ => None,
    })
}

/// Ctrl+V on the Canvas with text on the clipboard: a copied image *file* (its path or
/// `file://` URI) is opened; other text is left alone. (Copied pixels arrive as
/// `CanvasCommand::PasteImage`.)
fn paste_on_canvas(text: &str, cx: &mut AppContext<'_>) {
    let first = text.lines().next().unwrap_or("").trim();
    let path = PathBuf::from(first.strip_prefix("file://").unwrap_or(first));
    if path.is_file() && is_image_file(&path) {
        cx.commands
            .push(Command::from(CanvasCommand::OpenImage(path)));
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
