//! The Settings panel: compute device and CPU threads (applied at the next start), the backends
//! this build has, and where Studio keeps its files.

pub mod command;

use std::path::Path;
use std::time::{Duration, Instant};

use egui::RichText;
use studio_inference::device::{DevicePreference, compiled_backends};

use studio_inference::llm::remote::RemoteConfig;

use crate::gui::api_server::ServerStatus;
use self::command::{SettingsCommand, SettingsPurpose};
use crate::gui::command::Command;
use crate::gui::context::AppContext;
use crate::gui::panel::{OpenContext, PanelView, UiContext};
use crate::gui::format;
use crate::gui::settings_store::{ServerSettings, Settings};
use crate::gui::style::{section_ui, weak};

/// How often the file list of the data folder is read again while the panel is shown.
const LIST_INTERVAL: Duration = Duration::from_secs(2);

struct DataEntry {
    name: String,
    /// Bytes, or the number of entries for a folder.
    size: u64,
    is_dir: bool,
}

/// What the Settings panel shows and changes besides its own state.
pub struct SettingsContext<'a> {
    pub settings: &'a mut Settings,
    pub device_label: &'a str,
    pub home: &'a Path,
    pub server: ServerStatus<'a>,
    pub model_loaded: bool,
}

pub struct SettingsPanel {
    /// The device and threads this run started with, to say when a restart is needed.
    started_with: Option<(DevicePreference, Option<usize>)>,
    entries: Vec<DataEntry>,
    listed_at: Option<Instant>,
    list_error: Option<String>,
}

impl PanelView for SettingsPanel {
    type Command = SettingsCommand;
    type Purpose = SettingsPurpose;

    fn open(cx: &mut OpenContext<'_>) -> Self {
        SettingsPanel::new(cx.settings)
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        let mut settings_cx = SettingsContext {
            settings: cx.settings,
            device_label: cx.device_label,
            home: cx.home,
            server: cx.server,
            model_loaded: cx.model.is_some(),
        };
        self.settings_ui(ui, &mut settings_cx, cx.commands);
    }

    fn apply(&mut self, command: SettingsCommand, _cx: &mut AppContext<'_>) {
        match command {}
    }
}

impl SettingsPanel {
    pub fn new(settings: &Settings) -> Self {
        Self {
            started_with: Some((settings.device, settings.cpu_threads)),
            entries: Vec::new(),
            listed_at: None,
            list_error: None,
        }
    }

    pub fn settings_ui(
        &mut self,
        ui: &mut egui::Ui,
        cx: &mut SettingsContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        let settings = &mut *cx.settings;
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(4.0);
                ui.heading("Settings");
                ui.add_space(8.0);
                section_ui(ui, "Compute", |ui| {
                    self.compute_ui(ui, settings, cx.device_label);
                });
                section_ui(ui, "Remote server (OpenAI-compatible)", |ui| {
                    remote_ui(ui, settings, commands);
                });
                section_ui(ui, "API server (OpenAI-compatible)", |ui| {
                    server_ui(ui, settings, cx.server, cx.model_loaded, commands);
                });
                section_ui(ui, "Data folder", |ui| self.data_ui(ui, cx.home));
            });
    }

    fn compute_ui(&self, ui: &mut egui::Ui, settings: &mut Settings, device_label: &str) {
        let backends = compiled_backends();
        egui::Grid::new("compute_grid")
            .num_columns(2)
            .spacing([16.0, 8.0])
            .show(ui, |ui| {
                ui.label(weak(ui, "In use now"));
                ui.label(device_label);
                ui.end_row();

                let label = ui.label("Device");
                ui.horizontal(|ui| {
                    device_combo_ui(ui, &mut settings.device, &backends, label.id);
                    match &mut settings.device {
                        DevicePreference::Cuda(i) | DevicePreference::Metal(i) => {
                            ui.label(weak(ui, "GPU"));
                            ui.add(egui::DragValue::new(i).range(0..=15))
                                .accessible_name("GPU index");
                        }
                        DevicePreference::Auto | DevicePreference::Cpu => {}
                    }
                });
                ui.end_row();

                let label = ui.label("CPU threads");
                ui.horizontal(|ui| {
                    let mut automatic = settings.cpu_threads.is_none();
                    if ui
                        .checkbox(&mut automatic, "Automatic")
                        .labelled_by(label.id)
                        .changed()
                    {
                        settings.cpu_threads = if automatic {
                            None
                        } else {
                            Some(std::thread::available_parallelism().map_or(4, usize::from))
                        };
                    }
                    if let Some(n) = &mut settings.cpu_threads {
                        let max =
                            std::thread::available_parallelism().map_or(64, |p| usize::from(p) * 2);
                        ui.add(egui::DragValue::new(n).range(1..=max))
                            .accessible_name("CPU thread count");
                    }
                });
                ui.end_row();

                ui.label(weak(ui, "Compiled backends"));
                ui.label(backends.join(", "));
                ui.end_row();
            });
        ui.add_space(6.0);
        let changed = self
            .started_with
            .is_some_and(|(d, t)| d != settings.device || t != settings.cpu_threads);
        if changed {
            ui.label(
                RichText::new("Restart Studio to use the new device and thread settings.")
                    .color(ui.visuals().warn_fg_color),
            );
        } else {
            ui.label(weak(
                ui,
                "Device and thread changes take effect after restart.",
            ));
        }
    }

    fn data_ui(&mut self, ui: &mut egui::Ui, home: &Path) {
        ui.horizontal(|ui| {
            ui.add(
                egui::Label::new(RichText::new(home.display().to_string()).monospace())
                    .selectable(true),
            );
            if ui.small_button("Copy path").clicked() {
                ui.ctx().copy_text(home.display().to_string());
            }
        });
        ui.add(
            egui::Label::new(weak(
                ui,
                "settings.json holds these settings and the last chat parameters used; \
                 conversations/ one file per chat, with its branches and parameters (a deleted \
                 chat waits in conversations/trash/ until its Undo expires); window.ron the \
                 window's size and position. Set STUDIO_HOME to keep them elsewhere.",
            ))
            .wrap(),
        );
        ui.add_space(4.0);
        if self.listed_at.is_none_or(|t| t.elapsed() >= LIST_INTERVAL) {
            self.list(home);
        }
        ui.ctx().request_repaint_after(LIST_INTERVAL);
        if let Some(e) = &self.list_error {
            ui.label(weak(ui, e));
            return;
        }
        egui::Grid::new("data_files_grid")
            .num_columns(2)
            .spacing([24.0, 4.0])
            .striped(true)
            .show(ui, |ui| {
                for e in &self.entries {
                    if e.is_dir {
                        ui.label(format!("{}/", e.name));
                        let unit = if e.size == 1 { "file" } else { "files" };
                        ui.label(weak(ui, &format!("{} {unit}", e.size)));
                    } else {
                        ui.label(&e.name);
                        ui.label(weak(ui, &format::bytes(e.size)));
                    }
                    ui.end_row();
                }
            });
    }

    fn list(&mut self, home: &Path) {
        self.listed_at = Some(Instant::now());
        match std::fs::read_dir(home) {
            Ok(entries) => {
                self.list_error = None;
                self.entries = entries
                    .flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| {
                        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                        let size = if is_dir {
                            std::fs::read_dir(e.path()).map_or(0, |d| d.count() as u64)
                        } else {
                            e.metadata().map_or(0, |m| m.len())
                        };
                        DataEntry {
                            name: e.file_name().to_string_lossy().into_owned(),
                            size,
                            is_dir,
                        }
                    })
                    .collect();
                self.entries.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.list_error = Some("Nothing saved yet.".to_owned());
            }
            Err(e) => self.list_error = Some(format!("Could not list the folder: {e}")),
        }
    }
}

fn device_combo_ui(
    ui: &mut egui::Ui,
    device: &mut DevicePreference,
    backends: &[&str],
    label: egui::Id,
) {
    let name = |d: &DevicePreference| match d {
        DevicePreference::Auto => "Automatic".to_owned(),
        DevicePreference::Cpu => "CPU".to_owned(),
        DevicePreference::Cuda(i) => format!("CUDA {i}"),
        DevicePreference::Metal(i) => format!("Metal {i}"),
    };
    egui::ComboBox::from_id_salt("device_preference")
        .selected_text(name(device))
        .width(140.0)
        .show_ui(ui, |ui| {
            ui.selectable_value(device, DevicePreference::Auto, "Automatic")
                .on_hover_text("The first GPU this build supports, else the CPU");
            ui.selectable_value(device, DevicePreference::Cpu, "CPU");
            for (backend, option) in [
                ("CUDA", DevicePreference::Cuda(0)),
                ("Metal", DevicePreference::Metal(0)),
            ] {
                let compiled = backends.contains(&backend);
                let selected = std::mem::discriminant(device) == std::mem::discriminant(&option);
                let response = ui
                    .add_enabled(compiled, egui::Button::selectable(selected, backend))
                    .on_disabled_hover_text(format!(
                        "This build has no {backend} support (build with --features {})",
                        backend.to_lowercase()
                    ));
                if response.clicked() && !selected {
                    *device = option;
                }
            }
        })
        .response
        .labelled_by(label);
}

/// Base URL, API key and model of an OpenAI-compatible server (vLLM, Ollama, llama.cpp's
/// server, `studio serve`), and a Connect button that makes it the chat backend.
fn remote_ui(ui: &mut egui::Ui, settings: &mut Settings, commands: &mut Vec<Command>) {
    ui.label(weak(
        ui,
        "Chat through a server instead of a local model: the local model is unloaded, and \
         Stop, tokens/s and conversations work the same.",
    ));
    ui.add_space(4.0);
    let r = &mut settings.remote;
    egui::Grid::new("remote_grid")
        .num_columns(2)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            let label = ui.label("Base URL");
            ui.add(
                egui::TextEdit::singleline(&mut r.base_url)
                    .hint_text("http://127.0.0.1:8080/v1")
                    .desired_width(360.0),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("API key");
            ui.add(
                egui::TextEdit::singleline(&mut r.api_key)
                    .password(true)
                    .hint_text("optional")
                    .desired_width(360.0),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Model");
            ui.add(
                egui::TextEdit::singleline(&mut r.model)
                    .hint_text("the server's first model")
                    .desired_width(360.0),
            )
            .labelled_by(label.id);
            ui.end_row();
        });
    ui.add_space(4.0);
    let ready = !r.base_url.trim().is_empty();
    if ui
        .add_enabled(ready, egui::Button::new("Connect"))
        .on_disabled_hover_text("Enter the server's base URL first")
        .clicked()
    {
        let mut config = RemoteConfig::new(r.base_url.trim());
        config.api_key = Some(r.api_key.trim().to_owned()).filter(|k| !k.is_empty());
        config.model = Some(r.model.trim().to_owned()).filter(|m| !m.is_empty());
        commands.push(Command::ConnectRemote(config));
    }
}

/// Start and stop Studio's own OpenAI-compatible server on the loaded model, with its port,
/// reach and key; while it runs, its address (and the key) to copy into other programs.
fn server_ui(
    ui: &mut egui::Ui,
    settings: &mut Settings,
    status: ServerStatus<'_>,
    model_loaded: bool,
    commands: &mut Vec<Command>,
) {
    ui.label(weak(
        ui,
        "Serve the loaded model to other programs (editor plug-ins, scripts, other chat apps) \
         at an OpenAI-compatible address. Their requests take turns with this window's.",
    ));
    ui.add_space(4.0);
    let stopped = status == ServerStatus::Stopped;
    let s = &mut settings.server;
    egui::Grid::new("server_grid")
        .num_columns(2)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            let label = ui.label("Port");
            ui.add_enabled(stopped, egui::DragValue::new(&mut s.port).range(1..=65535))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Reach");
            let response = ui
                .add_enabled(
                    stopped,
                    egui::Checkbox::new(&mut s.network, "Other devices on the network"),
                )
                .labelled_by(label.id)
                .on_hover_text(
                    "Listen on every interface; other devices use this machine's IP address. \
                     An API key is required.",
                );
            if response.changed() && s.network && s.api_key.trim().is_empty() {
                s.api_key = ServerSettings::new_key();
            }
            ui.end_row();
            let label = ui.label("Server API key");
            ui.horizontal(|ui| {
                let show_id = egui::Id::unique("show_server_key");
                let mut show = ui.data(|d| d.get_temp::<bool>(show_id).unwrap_or(false));
                ui.add_enabled(
                    stopped,
                    egui::TextEdit::singleline(&mut s.api_key)
                        .password(!show)
                        .hint_text("none: any local program may call it")
                        .desired_width(300.0),
                )
                .labelled_by(label.id);
                if ui
                    .add_enabled(stopped, egui::Button::new("New key"))
                    .clicked()
                {
                    s.api_key = ServerSettings::new_key();
                }
                if !s.api_key.trim().is_empty() {
                    if ui.checkbox(&mut show, "Show key").changed() {
                        ui.data_mut(|d| d.insert_temp(show_id, show));
                    }
                    if ui.button("Copy key").clicked() {
                        ui.ctx().copy_text(s.api_key.trim().to_owned());
                    }
                }
            });
            ui.end_row();
        });
    ui.add_space(4.0);
    match status {
        ServerStatus::Stopped => {
            let why_not = if !model_loaded {
                Some("Load a model first")
            } else if s.network && s.api_key.trim().is_empty() {
                Some("Set an API key to serve other devices (New key makes one)")
            } else {
                None
            };
            if ui
                .add_enabled(why_not.is_none(), egui::Button::new("Start server"))
                .on_disabled_hover_text(why_not.unwrap_or_default())
                .clicked()
            {
                commands.push(Command::StartApiServer);
            }
        }
        ServerStatus::Starting => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Starting…");
            });
        }
        ServerStatus::Running { url, model } => {
            ui.horizontal(|ui| {
                ui.label(format!("Serving {model} at"));
                ui.add(egui::Label::new(RichText::new(url).monospace()).selectable(true));
                if ui.small_button("Copy address").clicked() {
                    ui.ctx().copy_text(url.to_owned());
                }
            });
            if !s.api_key.trim().is_empty() {
                ui.label(weak(
                    ui,
                    "Clients send the key as `Authorization: Bearer KEY` (the API key field of \
                     OpenAI clients).",
                ));
            }
            if ui.button("Stop server").clicked() {
                commands.push(Command::StopApiServer);
            }
        }
    }
}
