//! The Models panel: the loaded model, opening a model (dialog, typed path, drag and drop),
//! recently used models, and the models already in the Hugging Face cache.

use std::path::{Path, PathBuf};

pub mod command;
pub mod downloads;
pub mod get;

use crossbeam_channel::{Receiver, TryRecvError, bounded};
use egui::RichText;
use studio_inference::llm::hf_cache::{self, CachedKind, CachedModel};
use studio_inference::llm::loader::{ModelInfo, supported_architectures};
use studio_inference::worker::{LoadOptions, Worker};

use self::command::{ModelsCommand, ModelsPurpose};
use crate::gui::canvas::command::CanvasCommand;
use crate::gui::explorer::command::ExplorerCommand;
use crate::gui::command::Command;
use crate::gui::context::AppContext;
use crate::gui::panel::{OpenContext, PanelView, UiContext, still_there};
use crate::gui::format;
use crate::gui::jobs::Jobs;
use crate::gui::settings_store::Settings;
use crate::gui::style::{save_as_safetensors_ui, section_ui, weak};

/// The Hugging Face cache listing, scanned on a background thread.
struct HfCacheView {
    dir: Option<PathBuf>,
    ctx: egui::Context,
    scanning: Option<Receiver<Vec<CachedModel>>>,
    results: Option<Vec<CachedModel>>,
    error: Option<String>,
}

pub struct ModelsPanel {
    path_input: String,
    hf: HfCacheView,
    /// Search, downloads and the download queue.
    pub hub: downloads::Hub,
    starters: Vec<get::Starter>,
    /// A cache entry the user asked to delete, waiting for the confirmation.
    confirm_delete: Option<PathBuf>,
    /// The bundled demo language model, loaded at startup when no other model is configured.
    demo_model: Option<PathBuf>,
    /// Free memory of the worker's NVIDIA GPU, for the fit estimates.
    gpu: get::GpuMemory,
    /// Its latest reading: the GPU's index and free bytes.
    gpu_free: Option<(usize, u64)>,
}

/// Said when the bundled demo models load because no other model is configured.
pub const DEMO_NOTE: &str = "No model was set up, so Studio loaded its small demo models (trained \
     by Studio, for trying the panels out). Get real ones in Models \u{2192} Get models.";

impl PanelView for ModelsPanel {
    type Command = ModelsCommand;
    type Purpose = ModelsPurpose;

    fn open(cx: &mut OpenContext<'_>) -> Self {
        let mut panel = ModelsPanel::new(cx.hf_cache_dir.map(Path::to_path_buf), cx.ctx);
        panel.hub = downloads::Hub::new(cx.hub.cloned(), cx.home, cx.ctx);
        let (starters, notes) = get::load_starters(cx.presets_dir);
        for note in notes {
            cx.notices.warning(note);
        }
        panel.starters = starters;
        panel.demo_model = cx
            .bundled_models
            .and_then(|dir| crate::bundled::model_in(dir, crate::bundled::BundledKind::Language));
        panel
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        self.gpu_free = self.gpu.free(cx.worker.and_then(Worker::cuda_index));
        self.models_ui(
            ui,
            cx.model,
            cx.model_options,
            cx.settings,
            cx.jobs,
            cx.commands,
        );
    }

    fn apply(&mut self, command: ModelsCommand, cx: &mut AppContext<'_>) {
        match command {
            ModelsCommand::RemoveRecentModel(path) => {
                cx.settings.recent_models.retain(|p| *p != path);
            }
            ModelsCommand::RescanHfCache => self.start_scan(),
            ModelsCommand::AskDelete(path) => {
                self.confirm_delete = Some(path);
            }
            ModelsCommand::Delete(path) => {
                self.confirm_delete = None;
                let Some(cache) = self.hf.dir.clone() else {
                    return;
                };
                if cx.model.is_some_and(|m| m.path == path) {
                    cx.notices
                        .warning("Unload the model before deleting it from the cache");
                    return;
                }
                match studio_inference::hub::cache::delete(&cache, &path) {
                    Ok(freed) => cx.notices.info(format!(
                        "Deleted {} ({} freed)",
                        path.display(),
                        format::bytes(freed)
                    )),
                    Err(e) => cx.notices.error(format!("Could not delete it: {e}")),
                }
                self.start_scan();
            }
            ModelsCommand::ShowInFolder(path) => {
                let dir = if path.is_dir() {
                    path
                } else {
                    path.parent().map(Path::to_path_buf).unwrap_or(path)
                };
                let opener = if cfg!(target_os = "macos") {
                    "open"
                } else if cfg!(windows) {
                    "explorer"
                } else {
                    "xdg-open"
                };
                if let Err(e) = std::process::Command::new(opener).arg(&dir).spawn() {
                    cx.notices
                        .error(format!("Could not open {}: {e}", dir.display()));
                }
            }
        }
    }

    /// Loads the last session's language model again, if it is still there; else the bundled
    /// demo model, if there is one.
    fn restore(&mut self, cx: &mut AppContext<'_>) {
        let saved = &mut cx.settings.last_model;
        if let Some(path) = still_there(saved, "model", "in the Models panel", cx.notices) {
            cx.commands.push(Command::LoadModel(path));
        } else if let Some(demo) = &self.demo_model {
            cx.notices.info(DEMO_NOTE);
            cx.commands.push(Command::LoadModel(demo.clone()));
        }
    }

    /// Picks up a finished scan of the Hugging Face cache and the Hub's answers; a finished
    /// download lists the cache again.
    fn frame(&mut self, _cx: &mut AppContext<'_>) {
        self.poll_scan();
        if self.hub.poll() {
            self.start_scan();
        }
    }
}

impl ModelsPanel {
    /// Starts scanning `hf_cache_dir` (if any) right away.
    pub fn new(hf_cache_dir: Option<PathBuf>, ctx: &egui::Context) -> Self {
        let mut panel = Self {
            hub: downloads::Hub::off(),
            starters: Vec::new(),
            confirm_delete: None,
            demo_model: None,
            gpu: get::GpuMemory::default(),
            gpu_free: None,
            path_input: String::new(),
            hf: HfCacheView {
                dir: hf_cache_dir,
                ctx: ctx.clone(),
                scanning: None,
                results: None,
                error: None,
            },
        };
        panel.start_scan();
        panel
    }

    /// Scans the cache again on the `studio-hf-scan` thread (reading every config.json can take
    /// a moment on a large cache).
    pub fn start_scan(&mut self) {
        let Some(dir) = self.hf.dir.clone() else {
            return;
        };
        if self.hf.scanning.is_some() {
            return;
        }
        let (tx, rx) = bounded(1);
        let ctx = self.hf.ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("studio-hf-scan".to_owned())
            .spawn(move || {
                let found = hf_cache::scan(&dir);
                // The panel may be gone (window closed): nothing to do then.
                let _ = tx.send(found);
                ctx.request_repaint();
            });
        match spawned {
            Ok(_) => {
                self.hf.scanning = Some(rx);
                self.hf.error = None;
            }
            Err(e) => self.hf.error = Some(format!("Could not start scanning: {e}")),
        }
    }

    /// Picks up a finished scan.
    pub fn poll_scan(&mut self) {
        let Some(rx) = &self.hf.scanning else {
            return;
        };
        match rx.try_recv() {
            Ok(found) => {
                self.hf.results = Some(found);
                self.hf.scanning = None;
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                self.hf.scanning = None;
                self.hf.error = Some("Scanning stopped unexpectedly".to_owned());
            }
        }
    }

    pub fn models_ui(
        &mut self,
        ui: &mut egui::Ui,
        model: Option<&ModelInfo>,
        model_options: Option<&LoadOptions>,
        settings: &mut Settings,
        jobs: &Jobs,
        commands: &mut Vec<Command>,
    ) {
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(4.0);
                ui.heading("Models");
                ui.add_space(8.0);
                section_ui(ui, "Loaded model", |ui| {
                    loaded_ui(ui, model, jobs, commands);
                });
                section_ui(ui, "Open a model", |ui| self.open_ui(ui, commands));
                section_ui(ui, "Get models", |ui| {
                    get::get_models_ui(ui, &mut self.hub, &self.starters, self.gpu_free, commands);
                });
                section_ui(ui, "Load options", |ui| {
                    load_options_ui(ui, settings, model, model_options, jobs, commands);
                });
                section_ui(ui, "Recent models", |ui| {
                    recent_ui(ui, settings, model, commands);
                });
                section_ui(ui, "Hugging Face cache", |ui| {
                    // Used recently: the recent language models, and the Canvas's and the
                    // explorer's last models.
                    let used: Vec<&Path> = settings
                        .recent_models
                        .iter()
                        .chain(&settings.last_image_model)
                        .chain(&settings.last_gan_model)
                        .map(PathBuf::as_path)
                        .collect();
                    self.hf_ui(ui, model, &used, commands);
                });
            });
    }

    fn open_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        ui.horizontal(|ui| {
            if ui
                .button("Open…")
                .on_hover_text(
                    "Choose a model folder (config.json, model.safetensors, tokenizer.json)",
                )
                .clicked()
                && let Some(dir) = rfd::FileDialog::new()
                    .set_title("Open a model folder")
                    .pick_folder()
            {
                self.path_input = dir.display().to_string();
                commands.push(Command::LoadModel(dir));
            }
            if ui
                .button("Open file…")
                .on_hover_text("Choose a .safetensors weights file inside a model folder")
                .clicked()
                && let Some(file) = rfd::FileDialog::new()
                    .set_title("Open a model file")
                    .add_filter(
                        "Model weights",
                        &["safetensors", "gguf", "json", "bin", "pt", "pth"],
                    )
                    .pick_file()
            {
                self.path_input = file.display().to_string();
                commands.push(Command::LoadModel(file));
            }
        });
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            let width = (ui.available_width() - 70.0).max(120.0);
            let response = ui
                .add(
                    egui::TextEdit::singleline(&mut self.path_input)
                        .hint_text("Paste a model folder or file path")
                        .desired_width(width),
                )
                .accessible_name("Model path");
            let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            let path = self.path_input.trim();
            let clicked = ui
                .add_enabled(!path.is_empty(), egui::Button::new("Load"))
                .on_hover_text("Load the model at this path")
                .on_disabled_hover_text("Type or paste a path first")
                .clicked();
            if (clicked || enter) && !path.is_empty() {
                commands.push(Command::LoadModel(PathBuf::from(path)));
            }
        });
        ui.add_space(4.0);
        ui.label(weak(
            ui,
            "You can also drop a model folder or file anywhere on the window.",
        ));
        ui.add(
            egui::Label::new(weak(
                ui,
                &format!("Supported: {}.", supported_architectures()),
            ))
            .wrap(),
        );
        ui.add(
            egui::Label::new(weak(
                ui,
                "Python pickle checkpoints (pytorch_model.bin, .pt, .pth) open in safe mode: \
                 Python would run code when it loads them, so Studio's own reader takes out \
                 only their data, and nothing in them runs. Save as safetensors… (or studio \
                 convert IN OUT.safetensors) writes them as a file that opens faster.",
            ))
            .wrap(),
        );
    }

    fn hf_ui(
        &self,
        ui: &mut egui::Ui,
        model: Option<&ModelInfo>,
        used: &[&Path],
        commands: &mut Vec<Command>,
    ) {
        let Some(dir) = &self.hf.dir else {
            ui.label(weak(
                ui,
                "No Hugging Face cache folder (set HF_HUB_CACHE or HF_HOME to use one).",
            ));
            return;
        };
        ui.horizontal(|ui| {
            ui.label(weak(ui, "Folder:"));
            ui.add(egui::Label::new(dir.display().to_string()).truncate());
        });
        ui.horizontal(|ui| {
            let scanning = self.hf.scanning.is_some();
            if ui
                .add_enabled(!scanning, egui::Button::new("Rescan"))
                .on_hover_text("List the cache's models again")
                .clicked()
            {
                commands.push(Command::from(ModelsCommand::RescanHfCache));
            }
            if scanning {
                ui.spinner();
                ui.label(weak(ui, "Scanning…"));
            }
        });
        if let Some(e) = &self.hf.error {
            ui.label(RichText::new(e).color(ui.visuals().error_fg_color));
        }
        let Some(results) = &self.hf.results else {
            return;
        };
        if results.is_empty() {
            ui.label(weak(ui, "No models found in this folder."));
            return;
        }
        ui.add_space(4.0);
        for found in results {
            ui.separator();
            ui.horizontal(|ui| {
                ui.label(RichText::new(&found.repo).strong())
                    .on_hover_text(found.path.display().to_string());
                if let Ok(arch) = &found.support {
                    ui.label(weak(ui, arch));
                    if let Some(bytes) = found.bytes {
                        ui.label(weak(ui, &format::bytes(bytes)));
                    }
                    let panel = match found.kind {
                        CachedKind::Llm => "Chat, Code",
                        CachedKind::Diffusion => "Canvas",
                        CachedKind::Gan => "Latent Explorer",
                    };
                    ui.label(weak(ui, &format!("for {panel}")));
                    if used.contains(&found.path.as_path()) {
                        ui.label(weak(ui, "used recently"));
                    }
                }
                let loaded = model.is_some_and(|m| m.path == found.path);
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if ui
                        .small_button("Delete…")
                        .on_hover_text("Delete it from the cache, after asking")
                        .clicked()
                    {
                        commands.push(Command::from(ModelsCommand::AskDelete(found.path.clone())));
                    }
                    if ui.small_button("Show in folder").clicked() {
                        commands.push(Command::from(ModelsCommand::ShowInFolder(found.path.clone())));
                    }
                    if loaded {
                        ui.label(weak(ui, "loaded"));
                    } else if found.support.is_ok() {
                        let (label, load): (&str, Command) = match found.kind {
                            CachedKind::Llm => ("Load", Command::LoadModel(found.path.clone())),
                            CachedKind::Diffusion => (
                                "Load in Canvas",
                                Command::from(CanvasCommand::LoadModel(found.path.clone())),
                            ),
                            CachedKind::Gan => (
                                "Load in Latent Explorer",
                                Command::from(ExplorerCommand::LoadModel(found.path.clone())),
                            ),
                        };
                        if ui
                            .button(label)
                            .on_hover_text(format!("Load {}", found.repo))
                            .clicked()
                        {
                            commands.push(load);
                        }
                    }
                });
            });
            if self.confirm_delete.as_ref() == Some(&found.path) {
                ui.horizontal(|ui| {
                    ui.label(
                        RichText::new(format!(
                            "Delete {} from the cache? Files other snapshots share are kept.",
                            found.repo
                        ))
                        .color(ui.visuals().warn_fg_color),
                    );
                    if ui.button("Delete").clicked() {
                        commands.push(Command::from(ModelsCommand::Delete(found.path.clone())));
                    }
                    if ui.button("Keep").clicked() {
                        commands.push(Command::from(ModelsCommand::AskDelete(PathBuf::new())));
                    }
                });
            }
            if let Err(why) = &found.support {
                ui.add(egui::Label::new(weak(ui, why)).wrap());
            }
        }
    }
}

fn loaded_ui(
    ui: &mut egui::Ui,
    model: Option<&ModelInfo>,
    jobs: &Jobs,
    commands: &mut Vec<Command>,
) {
    if let Some(loading) = jobs.loading_model() {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("Loading {}…", loading.display()));
        });
        if let Some((fraction, message)) = jobs.running().and_then(|r| r.progress.clone()) {
            ui.add(
                egui::ProgressBar::new(fraction)
                    .desired_width(320.0)
                    .text(message),
            );
        }
        ui.add_space(4.0);
    }
    let Some(m) = model else {
        if jobs.loading_model().is_none() {
            ui.label(weak(ui, "No model loaded."));
        }
        return;
    };
    egui::Grid::new("model_info_grid")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            let rows: [(&str, String); 8] = [
                ("Name", m.name.clone()),
                ("Architecture", m.architecture.label().to_owned()),
                ("Parameters", format::parameters(m.parameters)),
                (
                    "Context length",
                    format!("{} tokens", format::thousands(m.context_length)),
                ),
                (
                    "Vocabulary",
                    format!("{} tokens", format::thousands(m.vocab_size)),
                ),
                ("Data type", m.dtype.clone()),
                ("Chat format", m.chat_format.clone()),
                ("Location", m.path.display().to_string()),
            ];
            for (key, value) in rows {
                ui.label(weak(ui, key));
                ui.add(egui::Label::new(value).selectable(true));
                ui.end_row();
            }
        });
    // What the loader approximated or capped (e.g. a context limit of the implementation).
    for note in &m.notes {
        ui.label(RichText::new(format!("Note: {note}")).color(ui.visuals().warn_fg_color));
    }
    ui.add_space(4.0);
    ui.horizontal(|ui| {
        if ui
            .button("Unload")
            .on_hover_text("Free the model's memory")
            .clicked()
        {
            commands.push(Command::UnloadModel);
        }
        if m.notes.iter().any(|n| n == studio_inference::pickle::SAFE_MODE_NOTE) {
            save_as_safetensors_ui(ui, &m.path, commands);
        }
    });
}

/// Options sent with every load: the context length (Auto: the model's maximum).
fn load_options_ui(
    ui: &mut egui::Ui,
    settings: &mut Settings,
    model: Option<&ModelInfo>,
    model_options: Option<&LoadOptions>,
    jobs: &Jobs,
    commands: &mut Vec<Command>,
) {
    ui.horizontal(|ui| {
        ui.label("Context length");
        let mut auto = settings.context_length.is_none();
        if ui
            .checkbox(&mut auto, "Auto (the model's maximum)")
            .changed()
        {
            settings.context_length = if auto {
                None
            } else {
                Some(model.map_or(4096, |m| m.context_length))
            };
        }
        if let Some(n) = &mut settings.context_length {
            ui.add(
                egui::DragValue::new(n)
                    .range(16..=1_048_576)
                    .speed(32.0)
                    .suffix(" tokens"),
            )
            .accessible_name("Context length in tokens")
            .on_hover_text("Prompt plus reply, in tokens");
        }
    });
    ui.add(
        egui::Label::new(weak(
            ui,
            "A shorter context uses less memory; a model never gets more than it was trained \
             for. Applies when a model is loaded. When a conversation no longer fits, its \
             oldest messages are left out of the prompt.",
        ))
        .wrap(),
    );
    if let (Some(m), Some(loaded)) = (model, model_options)
        && loaded.context_length != settings.context_length
        && jobs.loading_model().is_none()
    {
        ui.horizontal(|ui| {
            ui.label(
                RichText::new(format!(
                    "{} is loaded with {} tokens of context.",
                    m.name,
                    format::thousands(m.context_length)
                ))
                .color(ui.visuals().warn_fg_color),
            );
            if ui
                .button("Reload")
                .on_hover_text("Load the model again with this context length")
                .clicked()
            {
                commands.push(Command::LoadModel(m.path.clone()));
            }
        });
    }
}

fn recent_ui(
    ui: &mut egui::Ui,
    settings: &Settings,
    model: Option<&ModelInfo>,
    commands: &mut Vec<Command>,
) {
    if settings.recent_models.is_empty() {
        ui.label(weak(ui, "Models you load appear here."));
        return;
    }
    for path in &settings.recent_models {
        let name = display_name(path);
        let exists = path.exists();
        let loaded = model.is_some_and(|m| m.path == *path || path.starts_with(&m.path));
        ui.horizontal(|ui| {
            let response = ui
                .add_enabled(exists && !loaded, egui::Button::new(&name))
                .on_hover_text(format!("Load {}", path.display()))
                .on_disabled_hover_text(if loaded {
                    "This model is loaded".to_owned()
                } else {
                    format!("{} no longer exists", path.display())
                });
            if response.clicked() {
                commands.push(Command::LoadModel(path.clone()));
            }
            if ui
                .small_button("Remove")
                .on_hover_text("Remove from this list (the files stay)")
                .clicked()
            {
                commands.push(Command::from(ModelsCommand::RemoveRecentModel(path.clone())));
            }
            let mut detail = path.display().to_string();
            if !exists {
                detail.push_str("  (missing)");
            } else if loaded {
                detail.push_str("  (loaded)");
            }
            ui.add(egui::Label::new(weak(ui, &detail)).truncate());
        });
    }
}

/// The folder's name, or `ORG/NAME` for a Hugging Face cache snapshot.
fn display_name(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let [.., repo, snapshots, _rev] = parts.as_slice()
        && snapshots == "snapshots"
        && let Some(rest) = repo.strip_prefix("models--")
    {
        return rest.replacen("--", "/", 1);
    }
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_snapshots_show_their_repo_name() {
        assert_eq!(
            display_name(Path::new(
                "/h/hub/models--openai-community--gpt2/snapshots/abc"
            )),
            "openai-community/gpt2"
        );
        assert_eq!(display_name(Path::new("/models/gpt2")), "gpt2");
    }
}
