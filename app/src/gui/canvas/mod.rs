//! The Canvas panel: Stable Diffusion text-to-image, image-to-image, inpainting and
//! outpainting on one canvas.
//!
//! - [`document`]: the image and mask layers, strokes, undo/redo, staging (pure logic);
//! - [`view`]: the zoom/pan/paint widget with the live preview;
//! - [`form`]: the generation controls and the request they make; style presets;
//! - [`control`]: the ControlNet units (network, control image, preprocessor and its preview);
//! - [`history`]: every finished image as a PNG with its parameters, and the gallery;
//! - [`store`]: the canvas autosaved under `STUDIO_HOME/canvas/`;
//! - [`actions`]: what the canvas's [`CanvasCommand`]s and the worker's image events do.
//!
//! Mode follows the canvas: txt2img when it is empty, img2img with an image and no mask,
//! inpaint with a painted mask. Extend grows the canvas and masks the new strip (outpainting).

pub mod actions;
pub mod command;
pub mod control;
pub mod document;
pub mod form;
pub mod history;
pub mod store;
pub mod view;

pub use self::command::CanvasCommand;

use std::path::{Path, PathBuf};

use egui::RichText;
use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::diffusion::lora::{self, LoraEntry};
use studio_inference::diffusion::model::{ImageModelInfo, ImageModelOptions};
use studio_inference::image_meta::GenerationParameters;
use studio_inference::worker::JobId;

use crate::files::FileWorker;

use self::document::{Document, ModeKind, Side, Tool};
use self::form::{FormContext, FormValues, FormView, Style, load_styles, snap};
use self::history::History;
use self::store::CanvasStore;
use self::view::{CanvasView, ViewContext};
use super::command::Command;
use super::jobs::Jobs;
use super::settings_store::Settings;
use super::style::{save_as_safetensors_ui, section_ui, weak};

pub struct CanvasPanel {
    doc: Document,
    form: FormValues,
    form_view: FormView,
    view: CanvasView,
    history: History,
    store: CanvasStore,
    styles: Vec<Style>,
    /// The loaded Stable Diffusion model and what it was loaded with.
    model: Option<ImageModelInfo>,
    model_options: Option<ImageModelOptions>,
    tool: Tool,
    brush_size: f32,
    hardness: f32,
    show_mask: bool,
    /// Whether the control layer is drawn over the image (it always is while drawing on it).
    show_control: bool,
    extend_px: u32,
    /// The generation job running (or queued).
    generating: Option<JobId>,
    progress: Option<(f32, String)>,
    preview: Option<egui::TextureHandle>,
    /// How many preview frames were shown (tests and diagnostics).
    previews_shown: usize,
    progress_events: usize,
    last_seed: Option<u64>,
    /// Parameters found in an opened image, offered for the form.
    offered: Option<(u64, GenerationParameters)>,
    next_offer: u64,
    /// The job reloading the last model at startup (it keeps the saved form size).
    startup_load: Option<JobId>,
    /// The bundled demo text-to-image model, loaded at startup when no other image model is
    /// configured.
    demo_model: Option<PathBuf>,
    /// Where `<lora:name>` finds its files (`STUDIO_HOME/models/lora`).
    pub(crate) lora_dir: PathBuf,
    /// Textual-inversion embeddings, used where the prompt names them
    /// (`STUDIO_HOME/models/embeddings`).
    pub(crate) embeddings_dir: PathBuf,
    /// The LoRA gallery, read when first shown (and on Refresh or a folder change).
    lora_list: Option<Vec<LoraEntry>>,
    /// Preview textures by image path (`None`: asked of the file thread, or unreadable).
    lora_previews: std::collections::HashMap<PathBuf, Option<egui::TextureHandle>>,
    /// The Colour brush's colour.
    paint_colour: [u8; 3],
    /// ControlNet units.
    control_units: Vec<control::ControlUnitForm>,
    /// ControlNets offered in the units' menus (`STUDIO_HOME/models/controlnet`).
    controlnet_dir: [PathBuf; 1],
    /// Upscalers offered in the upscaler menu (`STUDIO_HOME/models/ESRGAN` and
    /// `models/SwinIR`, the web UI's).
    upscaler_dirs: [PathBuf; 2],
}

impl CanvasPanel {
    /// Reads the saved canvas and the style presets (`presets_dir/styles`); returns problems
    /// for notices.
    pub fn new(home: &Path, presets_dir: Option<&Path>) -> (Self, Vec<String>) {
        let store = CanvasStore::new(home);
        let loaded = store.load();
        let mut notes = loaded.notes;
        let (styles, style_errors) = load_styles(presets_dir.map(|d| d.join("styles")).as_deref());
        notes.extend(style_errors);
        let mut doc = Document::default();
        doc.restore(loaded.image, loaded.mask, loaded.control);
        let form = loaded.form.unwrap_or_default();
        let mut store = store;
        store.mark_saved(&doc, &form);
        let panel = Self {
            doc,
            form,
            form_view: FormView::default(),
            view: CanvasView::default(),
            history: History::open(home),
            store,
            styles,
            model: None,
            model_options: None,
            tool: Tool::Brush,
            brush_size: 32.0,
            hardness: 0.8,
            show_mask: true,
            show_control: true,
            extend_px: 128,
            generating: None,
            progress: None,
            preview: None,
            previews_shown: 0,
            progress_events: 0,
            last_seed: None,
            offered: None,
            next_offer: 1,
            startup_load: None,
            demo_model: None,
            lora_dir: home.join("models").join("lora"),
            embeddings_dir: home.join("models").join("embeddings"),
            lora_list: None,
            lora_previews: std::collections::HashMap::new(),
            paint_colour: [40, 90, 200],
            control_units: Vec::new(),
            controlnet_dir: [home.join("models").join("controlnet")],
            upscaler_dirs: [
                home.join("models").join("ESRGAN"),
                home.join("models").join("SwinIR"),
            ],
        };
        (panel, notes)
    }

    // ---- read access (tests) ----------------------------------------------------------------

    pub fn document(&self) -> &Document {
        &self.doc
    }

    pub fn document_mut(&mut self) -> &mut Document {
        &mut self.doc
    }

    pub fn form(&self) -> &FormValues {
        &self.form
    }

    pub fn form_mut(&mut self) -> &mut FormValues {
        &mut self.form
    }

    pub fn model(&self) -> Option<&ImageModelInfo> {
        self.model.as_ref()
    }

    pub fn styles(&self) -> &[Style] {
        &self.styles
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn is_generating(&self) -> bool {
        self.generating.is_some()
    }

    pub fn previews_shown(&self) -> usize {
        self.previews_shown
    }

    pub fn progress_events(&self) -> usize {
        self.progress_events
    }

    pub fn last_seed(&self) -> Option<u64> {
        self.last_seed
    }

    /// What the pointer paints with.
    pub fn tool(&self) -> Tool {
        self.tool
    }

    pub fn control_units(&self) -> &[control::ControlUnitForm] {
        &self.control_units
    }

    pub fn control_units_mut(&mut self) -> &mut [control::ControlUnitForm] {
        &mut self.control_units
    }

    /// Brush settings.
    pub fn set_brush(&mut self, tool: Tool, size: f32, hardness: f32) {
        self.tool = tool;
        self.brush_size = size;
        self.hardness = hardness;
    }

    /// The size of a new image (the form's, snapped to the model's multiple).
    fn target(&self) -> (u32, u32) {
        let m = self.model.as_ref().map_or(8, |m| m.size_multiple);
        (snap(self.form.width, m), snap(self.form.height, m))
    }

    // ---- drawing ----------------------------------------------------------------------------

    pub fn canvas_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        jobs: &Jobs,
        files: &FileWorker,
        commands: &mut Vec<Command>,
    ) {
        let loading = actions::loading_image_model(jobs).is_some();
        egui::Panel::left("canvas_form")
            .resizable(true)
            .default_size(310.0)
            .size_range(260.0..=460.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("canvas_form_scroll")
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        ui.add_space(4.0);
                        section_ui(ui, "Model", |ui| {
                            self.model_ui(ui, settings, jobs, commands);
                        });
                        section_ui(ui, "Generate", |ui| {
                            let cx = FormContext {
                                model: self.model.as_ref(),
                                model_loading: loading,
                                mode: self.doc.mode(),
                                canvas_size: self.doc.size(),
                                progress: self.progress.clone(),
                                generating: self.generating.is_some(),
                                last_seed: self.last_seed,
                                has_image: self.doc.image().is_some()
                                    || self.doc.selected_staged().is_some(),
                                upscaler_dirs: &self.upscaler_dirs,
                            };
                            self.form_view
                                .form_ui(ui, &mut self.form, &self.styles, &cx, commands);
                        });
                        section_ui(ui, "LoRAs", |ui| {
                            self.loras_ui(ui, settings, files, commands);
                        });
                        section_ui(ui, "ControlNet", |ui| {
                            control::units_ui(
                                ui,
                                &mut self.control_units,
                                &self.controlnet_dir,
                                commands,
                            );
                        });
                    });
            });
        egui::Panel::right("canvas_history")
            .resizable(true)
            .default_size(250.0)
            .size_range(200.0..=420.0)
            .show(ui, |ui| {
                ui.add_space(4.0);
                ui.label(RichText::new("History").strong().size(15.0));
                ui.add_space(4.0);
                self.history.history_ui(ui, files, commands);
            });
        egui::Panel::top("canvas_toolbar").show(ui, |ui| self.toolbar_ui(ui, commands));
        if !self.doc.staged().is_empty() {
            egui::Panel::bottom("canvas_staging").show(ui, |ui| self.staging_ui(ui, commands));
        }
        egui::CentralPanel::default().show(ui, |ui| {
            let target = self.target();
            let preview = if self.generating.is_some() {
                self.preview.as_ref()
            } else {
                None
            };
            let cx = ViewContext {
                doc: &self.doc,
                target,
                preview,
                show_mask: self.show_mask,
                show_control: self.show_control,
                tool: self.tool,
                brush_size: self.brush_size,
            };
            self.view.canvas_ui(ui, &cx, commands);
        });
    }

    /// The folders the LoRA gallery reads: `lora_dir`, then the user's.
    pub(crate) fn lora_dirs(&self, settings: &Settings) -> Vec<PathBuf> {
        std::iter::once(self.lora_dir.clone())
            .chain(settings.lora_folders.iter().cloned())
            .collect()
    }

    /// The LoRA gallery: each file with its preview image and trigger words (found beside
    /// it) and *Add to prompt* (`<lora:name:w>` plus the trigger words; the model loads again
    /// with the prompt's LoRAs on Generate), and the folders it reads.
    fn loras_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        files: &FileWorker,
        commands: &mut Vec<Command>,
    ) {
        if self.lora_list.is_none() {
            self.lora_list = Some(lora::gallery(&self.lora_dirs(settings)));
        }
        // Taken for the frame (not cloned) and put back unless it is to be read again.
        let entries = self.lora_list.take().unwrap_or_default();
        let mut reread = false;
        if entries.is_empty() {
            ui.label(weak(
                ui,
                &format!(
                    "No LoRAs yet: put .safetensors LoRA files in {} (or add a folder), then \
                     use them in the prompt as <lora:name:0.8>. A NAME.png beside a file is \
                     its preview. Textual-inversion embeddings go in {} and are used where the \
                     prompt names them",
                    self.lora_dir.display(),
                    self.embeddings_dir.display()
                ),
            ));
        }
        for entry in &entries {
            ui.horizontal(|ui| {
                let side = egui::vec2(48.0, 48.0);
                match &entry.preview {
                    Some(p) => match self.lora_previews.get(p) {
                        Some(Some(tex)) => {
                            ui.add(egui::Image::new((tex.id(), side)))
                                .on_hover_text(format!("{}'s preview", entry.name));
                        }
                        Some(None) => {
                            ui.allocate_space(side);
                        }
                        None => {
                            if files.thumbnail(p, 96) {
                                self.lora_previews.insert(p.clone(), None);
                            }
                            ui.allocate_space(side);
                        }
                    },
                    None => {
                        ui.allocate_space(side);
                    }
                }
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(&entry.name).strong())
                            .on_hover_text(entry.path.display().to_string());
                        let weight = entry.preferred_weight.unwrap_or(1.0);
                        if ui
                            .small_button("Add to prompt")
                            .on_hover_text(format!(
                                "Adds <lora:{}:{weight}> and its trigger words to the prompt",
                                entry.name
                            ))
                            .clicked()
                        {
                            commands.push(CanvasCommand::AddLoraToPrompt(entry.name.clone()).into());
                        }
                    });
                    if !entry.trigger_words.is_empty() {
                        ui.label(weak(ui, &entry.trigger_words.join(", ")))
                            .on_hover_text("Trigger words");
                    }
                });
            });
        }
        ui.horizontal(|ui| {
            if ui.small_button("Refresh").clicked() {
                reread = true;
            }
            if ui
                .small_button("Add folder…")
                .on_hover_text("Another folder of LoRA files for this gallery")
                .clicked()
                && let Some(dir) = rfd::FileDialog::new()
                    .set_title("Add a folder of LoRA files")
                    .pick_folder()
                && !settings.lora_folders.contains(&dir)
            {
                settings.lora_folders.push(dir);
                reread = true;
            }
        });
        let mut removed = None;
        for (i, dir) in settings.lora_folders.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.label(weak(ui, &dir.display().to_string()));
                if ui.small_button("Remove").clicked() {
                    removed = Some(i);
                }
            });
        }
        if let Some(i) = removed {
            settings.lora_folders.remove(i);
            reread = true;
        }
        if !reread {
            self.lora_list = Some(entries);
        }
    }

    /// A LoRA preview the file thread made; `false` when it was not one.
    pub(crate) fn set_lora_preview(
        &mut self,
        ctx: &egui::Context,
        path: &Path,
        result: &Result<(RgbImage, Option<String>), String>,
    ) -> bool {
        let Some(slot) = self.lora_previews.get_mut(path) else {
            return false;
        };
        if let Ok((thumb, _)) = result {
            *slot = Some(history::texture(ctx, &format!("lora:{}", path.display()), thumb));
        }
        true
    }

    /// The gallery as last read (tests).
    pub fn lora_gallery(&self) -> Option<&[LoraEntry]> {
        self.lora_list.as_deref()
    }

    /// Whether a LoRA preview's texture is made (tests).
    pub fn lora_preview_shown(&self, path: &Path) -> bool {
        self.lora_previews.get(path).is_some_and(Option::is_some)
    }

    fn model_ui(
        &mut self,
        ui: &mut egui::Ui,
        settings: &mut Settings,
        jobs: &Jobs,
        commands: &mut Vec<Command>,
    ) {
        let push = |commands: &mut Vec<Command>, c: CanvasCommand| commands.push(Command::from(c));
        if let Some(path) = actions::loading_image_model(jobs) {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(format!("Loading {}", file_name(path)));
            });
        }
        match &self.model {
            Some(m) => {
                ui.label(RichText::new(&m.name).strong());
                let mut facts = vec![m.kind.label().to_owned()];
                if m.inpainting {
                    facts.push("inpainting".to_owned());
                }
                if m.few_step {
                    facts.push("few-step".to_owned());
                }
                facts.push(format!("{}x{}", m.default_size.0, m.default_size.1));
                if m.taesd {
                    facts.push("TAESD preview".to_owned());
                }
                ui.label(weak(ui, &facts.join(" · ")))
                    .on_hover_text(m.path.display().to_string());
                for note in &m.notes {
                    ui.add(egui::Label::new(weak(ui, note)).wrap());
                }
                if m.notes
                    .iter()
                    .any(|n| n == studio_inference::pickle::SAFE_MODE_NOTE)
                {
                    save_as_safetensors_ui(ui, &m.path, commands);
                }
                if m.few_step {
                    ui.add(
                        egui::Label::new(weak(
                            ui,
                            "Few-step model: try 1–4 steps and CFG 1 (LCM sampler for LCM models).",
                        ))
                        .wrap(),
                    );
                }
            }
            None => {
                ui.add(
                    egui::Label::new(weak(
                        ui,
                        "No image model. Open a Stable Diffusion .safetensors file or a diffusers \
                         folder, or drop one here.",
                    ))
                    .wrap(),
                );
            }
        }
        ui.horizontal_wrapped(|ui| {
            if ui
                .button("Open model…")
                .on_hover_text("Choose a Stable Diffusion .safetensors checkpoint")
                .clicked()
            {
                push(commands, CanvasCommand::OpenModelDialog { folder: false });
            }
            if ui
                .button("Open folder…")
                .on_hover_text("Choose a diffusers folder (model_index.json, unet/, vae/, …)")
                .clicked()
            {
                push(commands, CanvasCommand::OpenModelDialog { folder: true });
            }
            if self.model.is_some() && ui.button("Unload").clicked() {
                push(commands, CanvasCommand::UnloadModel);
            }
        });
        egui::CollapsingHeader::new("Load options")
            .id_salt("canvas_load_options")
            .default_open(false)
            .show(ui, |ui| {
                let opts = &mut settings.image_model_options;
                option_file_ui(ui, "VAE", &mut opts.vae, "A separate VAE .safetensors file");
                option_file_ui(
                    ui,
                    "TAESD",
                    &mut opts.taesd,
                    "A TAESD decoder (taesd_decoder.safetensors) for sharper live previews",
                );
                // LoRAs come from the prompt, not from these options.
                let differs = self.model_options.as_ref().map(|o| ImageModelOptions {
                    loras: Vec::new(),
                    ..o.clone()
                }) != Some(settings.image_model_options.clone());
                if let Some(m) = &self.model
                    && differs
                    && ui
                        .button("Reload with these options")
                        .on_hover_text("Options take effect when the model is loaded")
                        .clicked()
                {
                    push(commands, CanvasCommand::LoadModel(m.path.clone()));
                }
            });
    }

    fn toolbar_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let push = |commands: &mut Vec<Command>, c: CanvasCommand| commands.push(Command::from(c));
        let has_image = self.doc.image().is_some();
        let busy = self.generating.is_some();
        ui.add_space(2.0);
        ui.horizontal_wrapped(|ui| {
            ui.selectable_value(&mut self.tool, Tool::Brush, "Brush")
                .on_hover_text("Paint the mask: the area Generate redraws");
            ui.selectable_value(&mut self.tool, Tool::Eraser, "Eraser")
                .on_hover_text("Take areas out of the mask");
            let colour = matches!(self.tool, Tool::Colour(_));
            if ui
                .selectable_label(colour, "Colour")
                .on_hover_text(
                    "Paint colour on the image: a rough sketch that img2img turns into a picture",
                )
                .clicked()
            {
                self.tool = Tool::Colour(self.paint_colour);
            }
            if egui::color_picker::color_edit_button_srgb(ui, &mut self.paint_colour)
                .on_hover_text("The colour the Colour brush paints")
                .changed()
            {
                self.tool = Tool::Colour(self.paint_colour);
            }
            if !has_image
                && ui
                    .button("New sketch")
                    .on_hover_text("A white canvas at the size in the form, to paint on")
                    .clicked()
            {
                push(commands, CanvasCommand::NewSketch);
                self.tool = Tool::Colour(self.paint_colour);
            }
            ui.separator();
            ui.selectable_value(&mut self.tool, Tool::ControlPen, "Control pen")
                .on_hover_text(
                    "Draw white lines on the control layer: a scribble or edge map that a \
                     ControlNet unit set to Layer follows",
                );
            ui.selectable_value(&mut self.tool, Tool::ControlEraser, "Control eraser")
                .on_hover_text("Take lines off the control layer");
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Size");
            ui.add(egui::Slider::new(&mut self.brush_size, 1.0..=256.0).logarithmic(true))
                .labelled_by(l.id);
            let l = ui.label("Hardness");
            ui.add(egui::Slider::new(&mut self.hardness, 0.0..=1.0).step_by(0.05))
                .labelled_by(l.id);
        });
        ui.horizontal_wrapped(|ui| {
            ui.checkbox(&mut self.show_mask, "Show mask");
            ui.checkbox(&mut self.show_control, "Show control layer");
            ui.separator();
            if ui
                .add_enabled(
                    self.doc.control().is_some(),
                    egui::Button::new("Clear control layer"),
                )
                .clicked()
            {
                push(commands, CanvasCommand::ClearControlLayer);
            }
            ui.separator();
            if ui
                .add_enabled(has_image, egui::Button::new("Invert mask"))
                .clicked()
            {
                push(commands, CanvasCommand::InvertMask);
            }
            if ui
                .add_enabled(!self.doc.mask().is_empty(), egui::Button::new("Clear mask"))
                .clicked()
            {
                push(commands, CanvasCommand::ClearMask);
            }
            ui.separator();
            if ui
                .add_enabled(self.doc.can_undo(), egui::Button::new("Undo"))
                .on_hover_text("Ctrl+Z")
                .clicked()
            {
                push(commands, CanvasCommand::Undo);
            }
            if ui
                .add_enabled(self.doc.can_redo(), egui::Button::new("Redo"))
                .on_hover_text("Ctrl+Shift+Z or Ctrl+Y")
                .clicked()
            {
                push(commands, CanvasCommand::Redo);
            }
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Extend by");
            let m = self.model.as_ref().map_or(8, |m| m.size_multiple).max(1);
            egui::ComboBox::from_id_salt("canvas_extend_px")
                .selected_text(format!("{} px", self.extend_px))
                .width(70.0)
                .show_ui(ui, |ui| {
                    for px in [64, 128, 256] {
                        let px = snap(px, m);
                        ui.selectable_value(&mut self.extend_px, px, format!("{px} px"));
                    }
                })
                .response
                .labelled_by(l.id);
            for side in Side::ALL {
                let label = match side {
                    Side::Left => "Extend left",
                    Side::Right => "Extend right",
                    Side::Up => "Extend up",
                    Side::Down => "Extend down",
                };
                if ui
                    .add_enabled(has_image && !busy, egui::Button::new(label))
                    .on_hover_text(format!(
                        "Grow the canvas {} by {} px and mask the new strip, so Generate \
                         outpaints it",
                        side.label(),
                        self.extend_px
                    ))
                    .on_disabled_hover_text(
                        "Needs an image on the canvas, and no generation running",
                    )
                    .clicked()
                {
                    push(
                        commands,
                        CanvasCommand::Extend {
                            side,
                            px: self.extend_px,
                        },
                    );
                }
            }
            ui.separator();
            if ui
                .add_enabled(!busy, egui::Button::new("Open image…"))
                .on_hover_text(
                    "Open a PNG, JPEG or WebP as the canvas (or drop one here). Ctrl+V pastes a \
                     copied image, or opens a copied image file's path",
                )
                .clicked()
            {
                push(commands, CanvasCommand::OpenImageDialog);
            }
            if ui
                .add_enabled(has_image, egui::Button::new("Save image…"))
                .clicked()
            {
                push(commands, CanvasCommand::SaveImageDialog);
            }
            if ui
                .add_enabled(has_image && !busy, egui::Button::new("Clear canvas"))
                .on_hover_text("Start over with an empty canvas (undoable)")
                .clicked()
            {
                push(commands, CanvasCommand::ClearCanvas);
            }
            if ui
                .button("Fit")
                .on_hover_text("Fit the canvas to the view")
                .clicked()
            {
                push(commands, CanvasCommand::FitView);
            }
            if let Some((w, h)) = self.doc.size() {
                ui.label(weak(ui, &format!("{w}x{h}")));
            }
        });
        ui.add_space(2.0);
    }

    fn staging_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let push = |commands: &mut Vec<Command>, c: CanvasCommand| commands.push(Command::from(c));
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            let n = self.doc.staged().len();
            ui.label(
                RichText::new(format!("Staged {}/{n}", self.doc.selected_index() + 1)).strong(),
            );
            let staged: Vec<_> = self.doc.staged().iter().map(|s| s.image.clone()).collect();
            for (i, image) in staged.iter().enumerate() {
                let tex = self.view.staged_texture(ui.ctx(), image);
                let size = tex.size_vec2();
                let scale = 56.0 / size.y.max(1.0);
                let selected = i == self.doc.selected_index();
                let button = egui::Button::image(egui::Image::new((tex.id(), size * scale)))
                    .selected(selected);
                if ui
                    .add(button)
                    .on_hover_text(format!("Result {} (seed {})", i + 1, image.seed))
                    .accessible_name(format!("Staged result {}", i + 1))
                    .clicked()
                {
                    push(commands, CanvasCommand::SelectStaged(i));
                }
            }
            ui.separator();
            if ui
                .button(RichText::new("Accept").strong())
                .on_hover_text("Put the selected result on the canvas (undoable)")
                .clicked()
            {
                push(commands, CanvasCommand::AcceptStaged);
            }
            if ui
                .button("Discard")
                .on_hover_text("Drop the selected result (it stays in the history)")
                .clicked()
            {
                push(commands, CanvasCommand::DiscardStaged);
            }
            if n > 1 && ui.button("Discard all").clicked() {
                push(commands, CanvasCommand::DiscardAllStaged);
            }
        });
        ui.add_space(4.0);
    }

    /// The mode label shown in the form (tests read it).
    pub fn mode(&self) -> ModeKind {
        self.doc.mode()
    }
}

fn option_file_ui(ui: &mut egui::Ui, name: &str, value: &mut Option<PathBuf>, hint: &str) {
    ui.horizontal(|ui| {
        ui.label(name);
        match value.as_ref() {
            Some(p) => {
                ui.label(weak(ui, &file_name(p)))
                    .on_hover_text(p.display().to_string());
                if ui
                    .small_button("Remove")
                    .on_hover_text(format!("No {name} file"))
                    .clicked()
                {
                    *value = None;
                }
            }
            None => {
                ui.label(weak(ui, "none"));
            }
        }
        if ui.small_button("Choose…").on_hover_text(hint).clicked()
            && let Some(file) = rfd::FileDialog::new()
                .set_title(format!("Choose a {name} file"))
                .add_filter("Weights", &["safetensors", "ckpt", "pt", "pth", "bin"])
                .pick_file()
        {
            *value = Some(file);
        }
    });
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
