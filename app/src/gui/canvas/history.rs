//! Every finished image, saved as a PNG with its `parameters` text under
//! `STUDIO_HOME/images/` (written on the file thread), and the gallery of them: thumbnails
//! (decoded on the file thread),
//! parameters on hover, Reuse parameters, Send to Canvas, Delete (undoable for a while: the
//! file waits in `images/trash/`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use studio_inference::diffusion::imaging::{RgbImage, encode_png};
use studio_inference::diffusion::pipeline::GeneratedImage;
use studio_inference::image_meta::GenerationParameters;

use super::CanvasCommand;
use crate::files::FileWorker;
use crate::gui::command::Command;
use crate::gui::style::weak;

/// Longest side of a gallery thumbnail.
const THUMB: u32 = 96;
/// At most this many images are listed (the newest).
const MAX_LISTED: usize = 500;

pub struct HistoryEntry {
    pub path: PathBuf,
    pub parameters: Option<GenerationParameters>,
    thumb: Option<egui::TextureHandle>,
    /// Set when the file could not be read.
    broken: Option<String>,
    /// The thumbnail was asked of the file thread.
    requested: bool,
}

impl HistoryEntry {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            parameters: None,
            thumb: None,
            broken: None,
            requested: false,
        }
    }
}

pub struct History {
    dir: PathBuf,
    entries: Vec<HistoryEntry>,
    /// Asked to confirm deleting this one.
    confirm_delete: Option<PathBuf>,
}

impl History {
    pub fn dir(home: &Path) -> PathBuf {
        home.join("images")
    }

    fn trash_dir(&self) -> PathBuf {
        self.dir.join("trash")
    }

    /// Lists `home/images/*.png`, newest first (file names start with the time).
    pub fn open(home: &Path) -> Self {
        let dir = Self::dir(home);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "png"))
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        paths.reverse();
        paths.truncate(MAX_LISTED);
        Self {
            dir,
            entries: paths.into_iter().map(HistoryEntry::new).collect(),
            confirm_delete: None,
        }
    }

    pub fn entries(&self) -> &[HistoryEntry] {
        &self.entries
    }

    /// Lists `image` first and queues its PNG (with its parameters) and thumbnail on the file
    /// thread; returns where it will be.
    pub fn save(&mut self, image: &Arc<GeneratedImage>, files: &FileWorker) -> PathBuf {
        let stamp = crate::gui::format::now_ms();
        let mut path = self.dir.join(format!("{stamp}-{}.png", image.seed));
        let mut n = 1;
        while path.exists() {
            path = self.dir.join(format!("{stamp}-{}-{n}.png", image.seed));
            n += 1;
        }
        let img = image.clone();
        files.write(
            format!("The image {}", path.display()),
            &path,
            Box::new(move || {
                let text = img.parameters.to_text();
                encode_png(&img.image, Some(&text)).context("encoding the PNG")
            }),
        );
        let mut entry = HistoryEntry::new(path.clone());
        entry.parameters = Some(image.parameters.clone());
        entry.requested = files.thumbnail(&path, THUMB);
        self.entries.insert(0, entry);
        path
    }

    /// A thumbnail the file thread made.
    pub fn set_thumbnail(
        &mut self,
        ctx: &egui::Context,
        path: &Path,
        result: Result<(RgbImage, Option<String>), String>,
    ) {
        let Some(entry) = self.entries.iter_mut().find(|e| e.path == path) else {
            return;
        };
        match result {
            Ok((thumb, parameters)) => {
                if entry.parameters.is_none() {
                    entry.parameters = parameters.as_deref().map(GenerationParameters::parse);
                }
                entry.thumb = Some(texture(ctx, &format!("history:{}", path.display()), &thumb));
            }
            Err(e) => entry.broken = Some(e),
        }
    }

    /// Moves `path` to the trash (Undo brings it back). Returns whether it was there.
    pub fn trash(&mut self, path: &Path) -> anyhow::Result<bool> {
        let Some(i) = self.entries.iter().position(|e| e.path == path) else {
            return Ok(false);
        };
        let trash = self.trash_dir();
        std::fs::create_dir_all(&trash).with_context(|| format!("creating {}", trash.display()))?;
        let name = path.file_name().context("an image file name")?;
        std::fs::rename(path, trash.join(name))
            .with_context(|| format!("moving {} to the trash", path.display()))?;
        self.entries.remove(i);
        Ok(true)
    }

    /// Brings `path` back from the trash.
    pub fn restore(&mut self, path: &Path) -> anyhow::Result<bool> {
        let Some(name) = path.file_name() else {
            return Ok(false);
        };
        let from = self.trash_dir().join(name);
        if !from.exists() {
            return Ok(false);
        }
        std::fs::rename(&from, path).with_context(|| format!("restoring {}", path.display()))?;
        let at = self
            .entries
            .iter()
            .position(|e| e.path < *path)
            .unwrap_or(self.entries.len());
        self.entries
            .insert(at, HistoryEntry::new(path.to_path_buf()));
        Ok(true)
    }

    /// Removes trashed images for good (on exit).
    pub fn purge_trash(&self) {
        let _ = std::fs::remove_dir_all(self.trash_dir());
    }

    /// The gallery: a grid of thumbnails with their buttons.
    pub fn history_ui(
        &mut self,
        ui: &mut egui::Ui,
        files: &FileWorker,
        commands: &mut Vec<Command>,
    ) {
        if self.entries.is_empty() {
            ui.label(weak(
                ui,
                "Finished images are saved here (with their parameters) and listed newest first.",
            ));
            return;
        }
        let mut pending = false;
        egui::ScrollArea::vertical()
            .id_salt("canvas_history")
            .auto_shrink([false, true])
            .max_height(ui.available_height())
            .show(ui, |ui| {
                for entry in &mut self.entries {
                    if !entry.requested {
                        // Decoded on the file thread; a full queue asks again next frame.
                        entry.requested = files.thumbnail(&entry.path, THUMB);
                        pending |= !entry.requested;
                    }
                    entry_ui(ui, entry, &mut self.confirm_delete, commands);
                    ui.separator();
                }
            });
        if pending {
            ui.ctx().request_repaint_after(Duration::from_millis(16));
        }
    }
}

pub use crate::files::thumbnail;

pub fn texture(ctx: &egui::Context, name: &str, img: &RgbImage) -> egui::TextureHandle {
    let color = egui::ColorImage::from_rgba_unmultiplied(
        [img.width as usize, img.height as usize],
        &img.to_rgba(),
    );
    ctx.load_texture(name, color, egui::TextureOptions::LINEAR)
}

fn entry_ui(
    ui: &mut egui::Ui,
    entry: &HistoryEntry,
    confirm_delete: &mut Option<PathBuf>,
    commands: &mut Vec<Command>,
) {
    let name = entry
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hover = entry.parameters.as_ref().map_or_else(
        || "No generation parameters in this file".to_owned(),
        GenerationParameters::to_text,
    );
    ui.horizontal(|ui| {
        match (&entry.thumb, &entry.broken) {
            (Some(t), _) => {
                let size = t.size_vec2();
                ui.add(egui::Image::new((t.id(), size)).alt_text(format!("Image {name}")))
                    .on_hover_text(&hover);
            }
            (None, Some(why)) => {
                ui.label(weak(ui, "unreadable")).on_hover_text(why);
            }
            (None, None) => {
                ui.spinner();
            }
        }
        ui.vertical(|ui| {
            let prompt = entry.parameters.as_ref().map_or("", |p| p.prompt.as_str());
            let short: String = prompt.chars().take(60).collect();
            ui.add(
                egui::Label::new(weak(ui, if short.is_empty() { &name } else { &short })).wrap(),
            )
            .on_hover_text(&hover);
            let path = entry.path.clone();
            ui.horizontal_wrapped(|ui| {
                if ui
                    .add_enabled(
                        entry.parameters.is_some(),
                        egui::Button::new("Reuse parameters").small(),
                    )
                    .on_hover_text(
                        "Put this image's prompt, seed, sampler, steps, CFG and size in the form",
                    )
                    .clicked()
                {
                    commands.push(Command::from(CanvasCommand::ReuseParameters(
                        path.clone(),
                    )));
                }
                if ui
                    .small_button("Send to Canvas")
                    .on_hover_text("Open this image on the canvas (undoable)")
                    .clicked()
                {
                    commands.push(Command::from(CanvasCommand::OpenImage(path.clone())));
                }
                if confirm_delete.as_ref() == Some(&path) {
                    if ui.small_button("Confirm delete").clicked() {
                        commands.push(Command::from(CanvasCommand::DeleteImage(path.clone())));
                        *confirm_delete = None;
                    }
                    if ui.small_button("Keep").clicked() {
                        *confirm_delete = None;
                    }
                } else if ui
                    .small_button("Delete")
                    .on_hover_text("Delete this image file (asks first; Undo for a few seconds)")
                    .clicked()
                {
                    *confirm_delete = Some(path);
                }
            });
        });
    });
}
