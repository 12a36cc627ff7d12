//! The Canvas's ControlNet units, as the SD web UI's ControlNet extension offers them: each a
//! ControlNet file or folder, a control image (the canvas's control layer, drawn with the
//! Control pen and eraser or made from a preprocessor's map to edit; the image layer, which
//! the Colour brush and *New sketch* draw; or an image file), a preprocessor (Canny edges, XDoG scribble,
//! invert for a dark scribble on white, or none for a ready map) with a preview of the map it
//! makes, a weight, the share of the steps it guides, and guess mode. Generate sends the
//! enabled units to the worker ([`ControlSpec`]), which loads their networks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use studio_inference::diffusion::annotators::Preprocessor;
use studio_inference::diffusion::controlnet::ControlSpec;
use studio_inference::diffusion::imaging::RgbImage;

use super::CanvasCommand;
use super::document::Document;
use crate::gui::command::Command;
use crate::gui::style::weak;

/// A path's file name, or "none".
fn file_label(path: Option<&std::path::Path>) -> String {
    path.map_or_else(|| "none".to_owned(), super::file_name)
}

/// What a unit's control image is.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlSource {
    /// The canvas's image layer, as it is when Generate is pressed.
    Canvas,
    /// The canvas's control layer, as it is when Generate is pressed.
    Layer,
    /// An image file, read when chosen.
    File(PathBuf, Arc<RgbImage>),
}

/// One unit as the form holds it.
#[derive(Clone)]
pub struct ControlUnitForm {
    pub enabled: bool,
    /// The ControlNet file or folder.
    pub model: Option<PathBuf>,
    pub source: ControlSource,
    pub preprocessor: Preprocessor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub guess_mode: bool,
    /// The last preview of the control map, and its texture once shown.
    preview: Option<Arc<RgbImage>>,
    texture: Option<egui::TextureHandle>,
    /// The preprocessor the preview was made with (a change remakes it).
    previewed: Option<Preprocessor>,
}

impl Default for ControlUnitForm {
    fn default() -> Self {
        Self {
            enabled: true,
            model: None,
            source: ControlSource::Canvas,
            preprocessor: Preprocessor::parse("canny").unwrap_or(Preprocessor::None),
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            guess_mode: false,
            preview: None,
            texture: None,
            previewed: None,
        }
    }
}

/// What the units' controls ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlCommand {
    AddUnit,
    RemoveUnit(usize),
    /// Choose the unit's ControlNet with the file dialog (`folder`: a diffusers folder).
    ChooseModelDialog {
        unit: usize,
        folder: bool,
    },
    SetModel(usize, PathBuf),
    /// Choose the unit's control image with the file dialog.
    ChooseImageDialog(usize),
    SetImage(usize, PathBuf),
    /// Use the canvas image as the unit's control image.
    UseCanvas(usize),
    /// Use the control layer as the unit's control map (with no preprocessor).
    UseLayer(usize),
    /// Put the unit's map on the control layer to edit it there, and use the layer.
    MapToLayer(usize),
    /// Make the control map from the current image and show it.
    Preview(usize),
}

impl ControlUnitForm {
    /// The image the preprocessor reads: the file's, or one of `doc`'s layers.
    pub fn source_image(&self, doc: &Document) -> Option<Arc<RgbImage>> {
        match &self.source {
            ControlSource::Canvas => doc.image().map(|i| Arc::new(i.clone())),
            ControlSource::Layer => doc.control().map(|i| Arc::new(i.clone())),
            ControlSource::File(_, image) => Some(image.clone()),
        }
    }

    /// Makes the preview from `image` (a new texture is made when next shown).
    pub fn set_preview(&mut self, image: Option<&RgbImage>) {
        self.preview = image.map(|i| Arc::new(self.preprocessor.apply(i)));
        self.texture = None;
        self.previewed = Some(self.preprocessor);
    }

    /// The preview's map (tests).
    pub fn preview(&self) -> Option<&RgbImage> {
        self.preview.as_deref()
    }

    /// The unit for the worker, or why it cannot run.
    pub fn spec(&self, doc: &Document) -> Result<ControlSpec, &'static str> {
        let model = self.model.clone().ok_or("choose its ControlNet file")?;
        let image = match &self.source {
            ControlSource::Canvas => doc
                .image()
                .cloned()
                .ok_or("the canvas has no image to use as its control image")?,
            ControlSource::Layer => doc
                .control()
                .cloned()
                .ok_or("the control layer is empty: draw on it with the Control pen")?,
            ControlSource::File(_, image) => RgbImage::clone(image),
        };
        Ok(ControlSpec {
            model,
            image,
            preprocessor: self.preprocessor,
            weight: self.weight,
            start: self.start,
            end: self.end.max(self.start),
            guess_mode: self.guess_mode,
        })
    }
}

/// The module names of the preprocessors offered, with their defaults.
const PREPROCESSORS: [&str; 4] = ["none", "canny", "scribble_xdog", "invert"];

/// The model files (with one of `exts`) and model folders (with a `config.json`) in `dir`,
/// sorted; at most 500.
pub fn model_entries(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            if p.is_dir() {
                p.join("config.json").is_file()
            } else {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
            }
        })
        .take(500)
        .collect();
    out.sort();
    out
}

/// A menu of the models in `dirs` (read while it is open); the chosen one is returned.
pub fn model_menu(
    ui: &mut egui::Ui,
    id: impl std::hash::Hash + std::fmt::Debug,
    dirs: &[PathBuf],
    exts: &[&str],
) -> Option<PathBuf> {
    let mut picked = None;
    let where_ = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    egui::ComboBox::from_id_salt(id)
        .selected_text("from models…")
        .show_ui(ui, |ui| {
            let entries: Vec<PathBuf> = dirs.iter().flat_map(|d| model_entries(d, exts)).collect();
            if entries.is_empty() {
                ui.label(format!("none in {where_}"));
            }
            for p in entries {
                if ui.selectable_label(false, super::file_name(&p)).clicked() {
                    picked = Some(p);
                }
            }
        })
        .response
        .on_hover_text(format!("Models in {where_}"));
    picked
}

/// The units' section of the form; `models` is the folder of ControlNets offered in a menu.
pub fn units_ui(
    ui: &mut egui::Ui,
    units: &mut [ControlUnitForm],
    models: &[PathBuf],
    commands: &mut Vec<Command>,
) {
    if units.is_empty() {
        ui.label(weak(
            ui,
            "ControlNet guides the image with a control map: edges, a scribble, depth, a \
             pose. Add a unit, choose a ControlNet file, and use the canvas image (draw on it \
             with the Colour brush), the control layer (draw on it with the Control pen) or \
             an image file.",
        ));
    }
    for (i, unit) in units.iter_mut().enumerate() {
        let push = |commands: &mut Vec<Command>, c: ControlCommand| {
            commands.push(CanvasCommand::Control(c).into());
        };
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.checkbox(&mut unit.enabled, format!("Unit {i}"));
                if ui.small_button("Remove").clicked() {
                    push(commands, ControlCommand::RemoveUnit(i));
                }
            });
            ui.horizontal(|ui| {
                ui.label(format!("Model: {}", file_label(unit.model.as_deref())))
                    .on_hover_text(
                        "A ControlNet for this base model: a diffusers folder or a single \
                         .safetensors / .pth file (control_v11p_sd15_canny, …)",
                    );
                if let Some(p) = model_menu(
                    ui,
                    ("control_models", i),
                    models,
                    &["safetensors", "pth", "pt", "bin"],
                ) {
                    push(commands, ControlCommand::SetModel(i, p));
                }
                if ui.small_button("File…").clicked() {
                    push(
                        commands,
                        ControlCommand::ChooseModelDialog {
                            unit: i,
                            folder: false,
                        },
                    );
                }
                if ui.small_button("Folder…").clicked() {
                    push(
                        commands,
                        ControlCommand::ChooseModelDialog {
                            unit: i,
                            folder: true,
                        },
                    );
                }
            });
            ui.horizontal(|ui| {
                let what = match &unit.source {
                    ControlSource::Canvas => "the canvas".to_owned(),
                    ControlSource::Layer => "the control layer".to_owned(),
                    ControlSource::File(p, _) => file_label(Some(p)),
                };
                ui.label(format!("Image: {what}"));
                if ui
                    .small_button("Canvas")
                    .on_hover_text("Use the canvas image (draw on it with the Colour brush)")
                    .clicked()
                {
                    push(commands, ControlCommand::UseCanvas(i));
                }
                if ui
                    .small_button("Layer")
                    .on_hover_text(
                        "Use the control layer as the map, with no preprocessor (draw on it \
                         with the Control pen)",
                    )
                    .clicked()
                {
                    push(commands, ControlCommand::UseLayer(i));
                }
                if ui.small_button("Load…").clicked() {
                    push(commands, ControlCommand::ChooseImageDialog(i));
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label("Preprocessor");
                egui::ComboBox::from_id_salt(("control_pre", i))
                    .selected_text(unit.preprocessor.name())
                    .show_ui(ui, |ui| {
                        for name in PREPROCESSORS {
                            let selected = unit.preprocessor.name() == name;
                            if ui.selectable_label(selected, name).clicked()
                                && let Some(p) = Preprocessor::parse(name)
                            {
                                unit.preprocessor = p;
                            }
                        }
                    })
                    .response
                    .labelled_by(l.id);
            });
            match &mut unit.preprocessor {
                Preprocessor::Canny { low, high } => {
                    ui.horizontal(|ui| {
                        let l = ui.label("Low");
                        ui.add(egui::DragValue::new(low).range(1.0..=255.0))
                            .labelled_by(l.id);
                        let l = ui.label("High");
                        ui.add(egui::DragValue::new(high).range(1.0..=255.0))
                            .labelled_by(l.id);
                    });
                }
                Preprocessor::ScribbleXdog { threshold } => {
                    ui.horizontal(|ui| {
                        let l = ui.label("Threshold");
                        ui.add(egui::DragValue::new(threshold).range(1.0..=64.0))
                            .labelled_by(l.id);
                    });
                }
                Preprocessor::None | Preprocessor::Invert => {}
            }
            let l = ui.label("Weight");
            ui.add(egui::Slider::new(&mut unit.weight, 0.0..=2.0))
                .labelled_by(l.id);
            ui.horizontal(|ui| {
                let l = ui.label("Steps from");
                ui.add(
                    egui::DragValue::new(&mut unit.start)
                        .range(0.0..=1.0)
                        .speed(0.01),
                )
                .labelled_by(l.id);
                let l = ui.label("to");
                ui.add(
                    egui::DragValue::new(&mut unit.end)
                        .range(0.0..=1.0)
                        .speed(0.01),
                )
                .labelled_by(l.id);
            });
            ui.checkbox(&mut unit.guess_mode, "ControlNet is more important")
                .on_hover_text(
                    "Guess mode: the unit guides only the prompt's pass, so it works even \
                     with an empty prompt",
                );
            let stale = unit.previewed != Some(unit.preprocessor);
            ui.horizontal(|ui| {
                if ui
                    .small_button("Preview map")
                    .on_hover_text("Make the control map from the image now")
                    .clicked()
                    || (stale && unit.previewed.is_some())
                {
                    push(commands, ControlCommand::Preview(i));
                }
                if unit.preview.is_some()
                    && unit.source != ControlSource::Layer
                    && ui
                        .small_button("Edit on layer")
                        .on_hover_text(
                            "Put this map on the control layer to edit it with the Control \
                             pen and eraser; the unit then uses the layer",
                        )
                        .clicked()
                {
                    push(commands, ControlCommand::MapToLayer(i));
                }
            });
            if let Some(map) = &unit.preview {
                let texture = unit.texture.get_or_insert_with(|| {
                    super::history::texture(ui.ctx(), &format!("control_preview_{i}"), map)
                });
                let scale = 200.0 / map.width.max(map.height).max(1) as f32;
                let size = egui::vec2(map.width as f32 * scale, map.height as f32 * scale);
                ui.add(egui::Image::new((texture.id(), size)))
                    .on_hover_text(format!(
                        "The control map ({}, {}x{})",
                        unit.preprocessor.name(),
                        map.width,
                        map.height
                    ));
            }
        });
    }
    if ui.button("Add ControlNet unit").clicked() {
        commands.push(CanvasCommand::Control(ControlCommand::AddUnit).into());
    }
}
