//! The application: state, startup, and the thin `eframe::App` that runs [`StudioApp::frame_logic`]
//! (drain the worker's events, apply commands) and [`StudioApp::root_ui`] (draw) each frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use egui::RichText;
use egui::text::CCursorRange;
use studio_inference::code::complete::FimSupport;
use studio_inference::device::DevicePreference;
use studio_inference::llm::hf_cache;
use studio_inference::llm::loader::ModelInfo;
use studio_inference::worker::{JobKind, LoadOptions, Worker, WorkerConfig};

use super::api_server::ApiServer;
use super::canvas::CanvasPanel;
use super::chat::ChatPanel;
use super::code::CodePanel;
use super::command::Command;
use super::context::app_context;
use super::explorer::ExplorerPanel;
use super::jobs::{JobPurpose, Jobs};
use super::notices::Notices;
use super::panel::{OpenContext, UiContext};
use super::panels::Panels;
use super::presets::presets_dir;
use super::settings_store::{Panel, Settings, SettingsSaver};
use super::status_bar::{StatusBar, StatusInfo};
use crate::files::FileWorker;

/// Where the app keeps and finds things. [`AppConfig::from_env`] is what the window uses; tests
/// pass explicit folders so they never touch the user's files or race on the environment.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Settings, conversations and window state live here.
    pub home: PathBuf,
    /// Folder with `sampling/*.json`; `None` when there is none.
    pub presets_dir: Option<PathBuf>,
    /// Overrides the saved device preference (tests use the CPU).
    pub device: Option<DevicePreference>,
    /// The Hugging Face hub cache to list; `None` skips it.
    pub hf_cache_dir: Option<PathBuf>,
    /// Load the last model again at startup (when it still exists).
    pub restore_last_model: bool,
    /// How long a deleted conversation can be brought back with Undo.
    pub undo_window: Duration,
    /// The Hugging Face Hub to search and download from; `None`: downloading is off.
    pub hub: Option<studio_inference::hub::HubConfig>,
    /// The bundled demo models (`assets/models`), each loaded at startup by its panel when no
    /// other model is configured; `None`: none.
    pub bundled_models: Option<PathBuf>,
}

/// How long a deleted conversation can be brought back with Undo.
pub const UNDO_WINDOW: Duration = Duration::from_secs(10);

impl AppConfig {
    pub fn from_env() -> Self {
        Self {
            home: crate::home::studio_home(),
            presets_dir: presets_dir(),
            device: None,
            hf_cache_dir: hf_cache::cache_dir(),
            restore_last_model: true,
            undo_window: UNDO_WINDOW,
            hub: studio_inference::hub::HubConfig::from_env().ok(),
            bundled_models: crate::bundled::models_dir(),
        }
    }

    /// For tests: everything under `home`, shipped presets, CPU, no Hugging Face cache, no
    /// demo models.
    pub fn for_tests(home: &Path) -> Self {
        Self {
            home: home.to_path_buf(),
            presets_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets")),
            device: Some(DevicePreference::Cpu),
            hf_cache_dir: None,
            restore_last_model: true,
            undo_window: UNDO_WINDOW,
            hub: None,
            bundled_models: None,
        }
    }
}

pub struct StudioApp {
    pub(super) ctx: egui::Context,
    pub(super) home: PathBuf,
    pub(super) settings: Settings,
    pub(super) saver: SettingsSaver,
    /// Encodes and writes images and decodes thumbnails off the UI thread.
    pub(super) files: FileWorker,
    pub(super) worker: Option<Worker>,
    pub(super) device_label: String,
    pub(super) model: Option<ModelInfo>,
    /// What the loaded model was loaded with.
    pub(super) model_options: Option<LoadOptions>,
    pub(super) undo_window: Duration,
    pub(super) jobs: Jobs,
    /// One of each panel in the list (`panel_list.rs`).
    pub(super) panels: Panels,
    /// The OpenAI-compatible server started from Settings.
    pub(super) api_server: ApiServer,
    pub(super) status_bar: StatusBar,
    pub(super) notices: Notices,
    pub(super) commands: Vec<Command>,
}

impl StudioApp {
    /// Reads the settings and conversations under `config.home`, starts the inference worker
    /// (whose events wake `ctx`), and queues the last model's load.
    pub fn new(ctx: &egui::Context, config: &AppConfig) -> Self {
        super::fonts::install(ctx);
        let mut notices = Notices::default();
        let (settings, note) = Settings::load(&config.home);
        if let Some(note) = note {
            notices.warning(note);
        }
        let device = config.device.unwrap_or(settings.device);
        let repaint_ctx = ctx.clone();
        let worker = Worker::spawn(WorkerConfig {
            device,
            repaint: Arc::new(move || repaint_ctx.request_repaint()),
            ..WorkerConfig::default()
        });
        let (worker, device_label) = match worker {
            Ok(w) => {
                if let Some(warning) = w.device_warning() {
                    notices.warning(warning);
                }
                let label = w.device_label().to_owned();
                (Some(w), label)
            }
            Err(e) => {
                notices.error(format!("The inference worker could not start: {e}"));
                (None, "no inference worker".to_owned())
            }
        };
        let panels = Panels::open(&mut OpenContext {
            ctx,
            home: &config.home,
            presets_dir: config.presets_dir.as_deref(),
            hf_cache_dir: config.hf_cache_dir.as_deref(),
            hub: config.hub.as_ref(),
            bundled_models: config.bundled_models.as_deref(),
            settings: &settings,
            notices: &mut notices,
        });
        let mut app = Self {
            ctx: ctx.clone(),
            home: config.home.clone(),
            saver: SettingsSaver::new(&config.home, settings.clone()),
            files: {
                let ctx = ctx.clone();
                FileWorker::spawn(move || ctx.request_repaint())
            },
            settings,
            worker,
            device_label,
            model: None,
            model_options: None,
            undo_window: config.undo_window,
            jobs: Jobs::default(),
            panels,
            api_server: ApiServer::default(),
            status_bar: StatusBar::default(),
            notices,
            commands: Vec::new(),
        };
        if config.restore_last_model {
            app.panels.restore(&mut app_context!(app));
        }
        app.apply_commands();
        app
    }

    // ---- read access (tests and panels) --------------------------------------------------

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.as_ref()
    }

    pub fn device_label(&self) -> &str {
        &self.device_label
    }

    pub fn chat(&self) -> &ChatPanel {
        &self.panels.chat
    }

    /// The chat panel and its conversations, to change directly (tests, imports).
    pub fn chat_mut(&mut self) -> &mut ChatPanel {
        &mut self.panels.chat
    }

    pub fn canvas(&self) -> &CanvasPanel {
        &self.panels.canvas
    }

    pub fn canvas_mut(&mut self) -> &mut CanvasPanel {
        &mut self.panels.canvas
    }

    pub fn explorer(&self) -> &ExplorerPanel {
        &self.panels.explorer
    }

    pub fn explorer_mut(&mut self) -> &mut ExplorerPanel {
        &mut self.panels.explorer
    }

    /// How many main-image renders the worker has done (a burst of requests renders fewer).
    pub fn gan_renders(&self) -> u64 {
        self.worker
            .as_ref()
            .map_or(0, studio_inference::worker::Worker::gan_renders)
    }

    /// The Models panel (its downloads, for tests).
    pub fn models(&self) -> &super::models::ModelsPanel {
        &self.panels.models
    }

    pub fn code(&self) -> &CodePanel {
        &self.panels.code
    }

    pub fn code_mut(&mut self) -> &mut CodePanel {
        &mut self.panels.code
    }

    /// Whether the loaded model can fill in the middle (ghost text), or why not.
    pub fn fim_support(&self) -> FimSupport {
        self.worker
            .as_ref()
            .map(studio_inference::worker::Worker::fim_support)
            .unwrap_or_default()
    }

    /// The cursor (or selection) of tab `id`'s editor as last drawn (char indices).
    pub fn code_cursor(&self, id: u64) -> Option<CCursorRange> {
        self.panels.code.cursor(id)
    }

    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub fn api_server(&self) -> &ApiServer {
        &self.api_server
    }

    /// Queues a command as if a widget had emitted it; it runs at the end of the next frame.
    pub fn push_command(&mut self, command: impl Into<Command>) {
        self.commands.push(command.into());
    }

    /// Whether any job is queued or running.
    pub fn is_busy(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Queues a job of the window's own ([`AppContext::submit`](super::context::AppContext::submit)).
    pub(super) fn submit(
        &mut self,
        kind: JobKind,
        purpose: JobPurpose,
    ) -> Option<studio_inference::worker::JobId> {
        app_context!(self).submit(kind, purpose)
    }

    // ---- drawing --------------------------------------------------------------------------

    /// Draws the window: status bar, navigation, notices and the current panel.
    pub fn root_ui(&mut self, ui: &mut egui::Ui) {
        // What last frame's commands changed shows this frame (a conversation just opened
        // shows its own parameters).
        self.panels.settle(&mut self.settings);
        let mut commands = std::mem::take(&mut self.commands);
        let info = StatusInfo {
            device: &self.device_label,
            model: self.model.as_ref(),
            image_model: self.panels.canvas.model().map(|m| m.name.as_str()),
            running: self.jobs.running(),
            queued: self.jobs.queued(),
            reply: self.panels.chat.active(),
            rate: self.panels.chat.rate(),
            max_new_tokens: self.settings.sampling.max_new_tokens,
            download: self.panels.models.hub.running(),
        };
        egui::Panel::bottom("status_bar").show(ui, |ui| {
            self.status_bar.status_bar_ui(ui, &info, &mut commands);
        });
        egui::Panel::left("navigation")
            .resizable(false)
            .exact_size(150.0)
            .show(ui, |ui| nav_ui(ui, self.settings.panel, &mut commands));
        if !self.notices.is_empty() {
            egui::Panel::top("notices").show(ui, |ui| {
                ui.add_space(4.0);
                self.notices.notices_ui(ui, &mut commands);
                ui.add_space(2.0);
            });
        }
        let shown = self.settings.panel;
        egui::CentralPanel::default().show(ui, |ui| {
            let mut cx = UiContext {
                settings: &mut self.settings,
                jobs: &self.jobs,
                files: &self.files,
                worker: self.worker.as_ref(),
                model: self.model.as_ref(),
                model_options: self.model_options.as_ref(),
                device_label: &self.device_label,
                home: &self.home,
                server: self.api_server.status(),
                commands: &mut commands,
            };
            self.panels.ui(shown, ui, &mut cx);
        });
        drop_overlay_ui(ui, self.panels.drop_hint(shown));
        // Edits made this frame belong to what was shown while they were made.
        self.panels.settle(&mut self.settings);
        self.commands.append(&mut commands);
        self.apply_commands();
        self.panels.settle(&mut self.settings);
        self.autosave();
    }

    /// Writes settings a moment after they change, and schedules the frames that needs.
    fn autosave(&mut self) {
        let (wait, error) = self.saver.tick(&self.settings);
        if let Some(error) = error {
            self.notices.error(error);
        }
        if let Some(wait) = wait {
            self.ctx.request_repaint_after(wait);
        }
        if let Some(wait) = self.notices.expire() {
            self.ctx
                .request_repaint_after(wait + Duration::from_millis(50));
        }
        self.panels.autosave(&mut app_context!(self));
    }

    /// Writes everything that is not on disk yet (settings, a streaming reply, changed
    /// parameters).
    pub fn flush(&mut self) {
        if let Some(error) = self.saver.flush(&self.settings) {
            log::error!("{error}");
        }
        self.panels.flush(&mut app_context!(self));
        // Wait until the images, the canvas and the recovery files are on disk.
        for done in self.files.flush() {
            self.file_done(done);
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.frame_logic(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.root_ui(ui);
    }

    fn save(&mut self, _storage: &mut dyn eframe::Storage) {
        self.flush();
    }
}

impl Drop for StudioApp {
    fn drop(&mut self) {
        // On exit (or a test dropping the app): nothing typed or streamed is lost, and chats
        // deleted in this session are removed for good (their Undo ends with the window). The
        // worker is dropped after this, which cancels its job and joins its thread.
        self.flush();
        self.panels.close(&mut app_context!(self));
    }
}

fn nav_ui(ui: &mut egui::Ui, current: Panel, commands: &mut Vec<Command>) {
    ui.add_space(8.0);
    ui.label(RichText::new("Studio").heading().strong());
    ui.add_space(8.0);
    ui.with_layout(egui::Layout::top_down_justified(egui::Align::LEFT), |ui| {
        for &panel in Panel::ALL {
            if panel == Panel::Models {
                ui.add_space(6.0);
                ui.separator();
                ui.add_space(6.0);
            }
            let button = egui::Button::selectable(panel == current, panel.label())
                .min_size(egui::vec2(0.0, 30.0));
            if ui.add(button).clicked() && panel != current {
                commands.push(Command::ShowPanel(panel));
            }
        }
    });
}

/// While files are dragged over the window, say what dropping them does (`hint`: the shown
/// panel's words, if not the window's default).
fn drop_overlay_ui(ui: &egui::Ui, hint: Option<&'static str>) {
    let hovering = ui.input(|i| !i.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let painter = ui.ctx().layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("drop_overlay"),
    ));
    let rect = ui.ctx().content_rect();
    let visuals = ui.visuals();
    painter.rect_filled(rect, 0.0, visuals.extreme_bg_color.gamma_multiply(0.85));
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        hint.unwrap_or(
            "Drop a model folder or .safetensors file to load it, or an image for the Canvas",
        ),
        egui::TextStyle::Heading.resolve(ui.style()),
        visuals.strong_text_color(),
    );
}
