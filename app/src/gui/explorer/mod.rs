//! The Latent Explorer: a StyleGAN2 generator explored in real time.
//!
//! - [`store`]: sliders, keyframes and directions saved under `STUDIO_HOME/explorer/`;
//! - [`actions`]: what its [`ExplorerCommand`]s and the worker's GAN events do, and the
//!   per-frame render requests.
//!
//! Every change of the latent (seed, offset, ψ, cutoff, noise, mixing, direction sliders, the
//! animation's position) makes a new render request; the worker renders only the newest
//! ([`studio_inference::worker::Worker::render_gan`]), so dragging a slider never queues
//! stale frames and the UI never waits.

pub mod actions;
pub mod command;
pub mod store;

pub use self::command::ExplorerCommand;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use egui::RichText;
use serde::{Deserialize, Serialize};
use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::gan::directions::{DirectionEdit, Directions};
use studio_inference::gan::latent::LatentText;
use studio_inference::gan::render::{
    GAN_LAYER_MAX_TILES, GanLatent, GanLayerMode, GanLayerRequest, GanLayerView, GanMix,
};
use studio_inference::gan::{GanInfo, NoiseMode};
use studio_inference::worker::JobId;

use self::store::{ExplorerState, NoiseChoice, PathSpace, PresetEntry};
use super::command::Command;
use super::jobs::Jobs;
use super::style::{save_as_safetensors_ui, section_ui, weak};

/// Seeds in the seed browser.
pub const GRID_SEEDS: u64 = 8;
/// Side of a seed-browser thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 64;

/// The latent written into a captured PNG's text chunk, after the human-readable line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedLatent {
    pub latent: GanLatent,
    pub noise: NoiseChoice,
    pub noise_seed: u64,
}

const CAPTURE_PREFIX: &str = "Studio explorer: ";

/// The text chunk of a capture: NVIDIA-style `StyleGAN2 latent: …` then the full latent as
/// JSON (mixing and direction amounts included).
pub fn capture_text(captured: &CapturedLatent, model: &str) -> String {
    let l = &captured.latent;
    let source = if l.w.is_some() {
        "w-file projection".to_owned()
    } else if l.offset == 0.0 {
        format!("seed {}", l.seed)
    } else {
        format!("seed {}+{}", l.seed, l.offset)
    };
    let human = LatentText {
        source,
        psi: l.psi,
        cutoff: l.cutoff,
        noise: noise_mode(captured.noise, captured.noise_seed),
        class: None,
        model: model.to_owned(),
    }
    .to_text();
    let json = serde_json::to_string(captured).unwrap_or_default();
    format!("{human}\n{CAPTURE_PREFIX}{json}")
}

/// Reads [`capture_text`] back; a plain `StyleGAN2 latent:` line (from `studio gan`) gives the
/// seed, ψ, cutoff and noise.
pub fn parse_capture_text(text: &str) -> Option<CapturedLatent> {
    if let Some(json) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(CAPTURE_PREFIX))
        && let Ok(c) = serde_json::from_str::<CapturedLatent>(json)
    {
        return Some(c);
    }
    let plain = LatentText::parse(text.lines().next()?)?;
    let seed_text = plain.source.strip_prefix("seed ")?;
    let (seed, offset) = match seed_text.split_once('+') {
        Some((s, o)) => (s.parse().ok()?, o.parse().ok()?),
        None => (seed_text.parse().ok()?, 0.0),
    };
    let (noise, noise_seed) = match plain.noise {
        NoiseMode::Const => (NoiseChoice::Const, 0),
        NoiseMode::Random { seed } => (NoiseChoice::Random, seed),
        NoiseMode::None => (NoiseChoice::None, 0),
    };
    Some(CapturedLatent {
        latent: GanLatent {
            seed,
            offset,
            psi: plain.psi,
            cutoff: plain.cutoff,
            ..GanLatent::default()
        },
        noise,
        noise_seed,
    })
}

pub fn noise_mode(choice: NoiseChoice, seed: u64) -> NoiseMode {
    match choice {
        NoiseChoice::Const => NoiseMode::Const,
        NoiseChoice::Random => NoiseMode::Random { seed },
        NoiseChoice::None => NoiseMode::None,
    }
}

/// The loaded generator.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedGan {
    pub info: GanInfo,
    pub name: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The synthesis layers the layer view can show.
    pub layers: Vec<String>,
    /// VGG16 weights for the perceptual projection loss, when found
    /// ([`store::find_vgg16`]).
    pub vgg16: Option<PathBuf>,
}

/// One seed-browser thumbnail.
pub struct Thumb {
    pub seed: u64,
    pub texture: egui::TextureHandle,
}

pub struct ExplorerPanel {
    model: Option<LoadedGan>,
    /// Saved between runs.
    state: ExplorerState,
    saved_state: ExplorerState,
    /// Names of the projected-noise files already written ([`store::NoiseFiles`]).
    noise_files: store::NoiseFiles,
    /// When the state was last written (the autosave waits a second between writes).
    saved_at: Option<Instant>,
    directions: Option<Arc<Directions>>,
    /// The load queued at startup (its failure is a warning, not an error).
    startup_load: Option<JobId>,
    /// The bundled demo GAN, loaded at startup when no other generator is configured.
    pub(crate) demo_model: Option<PathBuf>,
    directions_job: Option<JobId>,
    export_job: Option<JobId>,
    project_job: Option<JobId>,
    /// The image being projected, shown beside the reconstruction while it runs.
    project_target: Option<egui::TextureHandle>,
    // ---- rendering ----
    image: Option<RgbImage>,
    texture: Option<egui::TextureHandle>,
    /// The latent of the image shown (what Capture writes).
    image_latent: Option<CapturedLatent>,
    render_error: Option<String>,
    next_request: u64,
    /// Requests sent, with what each showed (newest last, a few kept).
    sent: VecDeque<(u64, CapturedLatent)>,
    last_request: Option<studio_inference::gan::render::GanRenderRequest>,
    requests_sent: u64,
    frames_shown: u64,
    shown_id: Option<u64>,
    render_ms: Option<f32>,
    frame_times: VecDeque<Instant>,
    thumbs: Vec<Thumb>,
    grid_sent: Option<studio_inference::gan::render::GanGridRequest>,
    // ---- presets ----
    /// `presets/gan-directions/` of the presets folder, when there is one.
    presets_dir: Option<PathBuf>,
    /// `STUDIO_HOME/presets/gan-directions/`, where presets go when the first is not writable.
    fallback_presets_dir: PathBuf,
    presets: Vec<PresetEntry>,
    preset_name: String,
    // ---- layer view ----
    layer_view: Option<GanLayerView>,
    layer_texture: Option<egui::TextureHandle>,
    layer_error: Option<String>,
    // ---- animation ----
    playing: bool,
    /// Position on the keyframe path, 0..=1, while playing.
    t: f64,
    last_tick: Option<Instant>,
}

impl ExplorerPanel {
    pub fn new(home: &Path, presets_dir: Option<&Path>) -> (Self, Vec<String>) {
        let (state, directions, notes) = store::load(home);
        (
            Self {
                presets_dir: presets_dir.map(|d| d.join(store::PRESETS_SUBDIR)),
                fallback_presets_dir: store::fallback_presets_dir(home),
                presets: Vec::new(),
                preset_name: String::new(),
                model: None,
                saved_state: state.clone(),
                noise_files: store::NoiseFiles::default(),
                saved_at: None,
                state,
                directions: directions.map(Arc::new),
                startup_load: None,
                demo_model: None,
                directions_job: None,
                export_job: None,
                project_job: None,
                project_target: None,
                image: None,
                texture: None,
                image_latent: None,
                render_error: None,
                next_request: 1,
                sent: VecDeque::new(),
                last_request: None,
                requests_sent: 0,
                frames_shown: 0,
                shown_id: None,
                render_ms: None,
                frame_times: VecDeque::new(),
                thumbs: Vec::new(),
                grid_sent: None,
                layer_view: None,
                layer_texture: None,
                layer_error: None,
                playing: false,
                t: 0.0,
                last_tick: None,
            },
            notes,
        )
    }

    pub fn model(&self) -> Option<&LoadedGan> {
        self.model.as_ref()
    }

    pub fn state(&self) -> &ExplorerState {
        &self.state
    }

    /// The sliders and keyframes, to change directly (tests, as a person would drag).
    pub fn state_mut(&mut self) -> &mut ExplorerState {
        &mut self.state
    }

    pub fn directions(&self) -> Option<&Directions> {
        self.directions.as_deref()
    }

    /// The image shown now.
    pub fn image(&self) -> Option<&RgbImage> {
        self.image.as_ref()
    }

    /// The saved direction presets found (for every model; the panel lists those whose
    /// `w_dim` matches the loaded one).
    pub fn presets(&self) -> &[PresetEntry] {
        &self.presets
    }

    /// The preset name field, to type into directly (tests).
    pub fn preset_name_mut(&mut self) -> &mut String {
        &mut self.preset_name
    }

    /// Reads the preset folders again; returns unreadable files.
    pub(crate) fn refresh_presets(&mut self) -> Vec<String> {
        let mut dirs: Vec<PathBuf> = self.presets_dir.iter().cloned().collect();
        if !dirs.contains(&self.fallback_presets_dir) {
            dirs.push(self.fallback_presets_dir.clone());
        }
        let (found, problems) = store::list_presets(&dirs);
        self.presets = found;
        problems
    }

    /// The layer view shown now (the chosen layer's channels and statistics).
    pub fn layer_view(&self) -> Option<&GanLayerView> {
        self.layer_view.as_ref()
    }

    /// What the next render asks of the layer view, from the panel's choices.
    pub fn layer_request(&self) -> Option<GanLayerRequest> {
        let s = &self.state;
        let name = s.layer.clone()?;
        let mode = if s.layer_rgb {
            GanLayerMode::Rgb {
                channels: s.layer_channels,
            }
        } else {
            GanLayerMode::Grid {
                tiles: s.layer_tiles.clamp(1, GAN_LAYER_MAX_TILES),
            }
        };
        Some(GanLayerRequest { name, mode })
    }

    /// The latent of the image shown now.
    pub fn image_latent(&self) -> Option<&CapturedLatent> {
        self.image_latent.as_ref()
    }

    /// Render requests sent to the worker, and rendered frames shown.
    pub fn render_counts(&self) -> (u64, u64) {
        (self.requests_sent, self.frames_shown)
    }

    /// Id of the newest request sent, and of the frame shown.
    pub fn request_ids(&self) -> (u64, Option<u64>) {
        (self.next_request - 1, self.shown_id)
    }

    pub fn is_playing(&self) -> bool {
        self.playing
    }

    /// Frames shown in the last second.
    pub fn fps(&self) -> usize {
        self.frame_times.len()
    }

    /// The current latent with mixing as the panel sets it.
    pub fn current_latent(&self) -> GanLatent {
        let mut latent = self.state.latent.clone();
        latent.mix = if self.state.mixing {
            Some(GanMix {
                seed: self.state.mix_seed,
                layers: self.state.mix_layers.clone(),
            })
        } else {
            None
        };
        if self.directions.is_none() {
            latent.edits.clear();
        }
        latent
    }

    pub fn captured_latent(&self) -> CapturedLatent {
        CapturedLatent {
            latent: self.current_latent(),
            noise: self.state.noise,
            noise_seed: self.state.noise_seed,
        }
    }

    /// Makes the sliders fit the loaded network (mixing layers, cutoff, direction ranges).
    pub(crate) fn fit_to_model(&mut self) {
        let Some(m) = &self.model else { return };
        let num_ws = m.info.num_ws;
        if self
            .state
            .layer
            .as_ref()
            .is_some_and(|l| !m.layers.contains(l))
        {
            self.state.layer = None;
        }
        self.state.mix_layers.resize(num_ws, false);
        if self.state.latent.cutoff.is_some_and(|c| c >= num_ws) {
            self.state.latent.cutoff = None;
        }
        let dirs_fit = self
            .directions
            .as_ref()
            .is_some_and(|d| d.w_dim == m.info.w_dim);
        if !dirs_fit {
            self.directions = None;
            self.state.latent.edits.clear();
        }
        self.fit_edits();
        for k in &mut self.state.keyframes {
            if k.mix.as_ref().is_some_and(|x| x.layers.len() != num_ws) {
                k.mix = None;
            }
        }
    }

    /// One slider per direction component, each over every W row to start with.
    pub(crate) fn fit_edits(&mut self) {
        let (Some(d), Some(m)) = (&self.directions, &self.model) else {
            return;
        };
        let num_ws = m.info.num_ws;
        let edits = &mut self.state.latent.edits;
        edits.retain(|e| e.component < d.len() && e.layers.end <= num_ws);
        for c in 0..d.len() {
            if !edits.iter().any(|e| e.component == c) {
                edits.push(DirectionEdit {
                    component: c,
                    sigma: 0.0,
                    layers: 0..num_ws,
                });
            }
        }
        edits.sort_by_key(|e| e.component);
    }

    // ---- drawing --------------------------------------------------------------------------

    pub fn explorer_ui(&mut self, ui: &mut egui::Ui, jobs: &Jobs, commands: &mut Vec<Command>) {
        let push = |commands: &mut Vec<Command>, c: ExplorerCommand| {
            commands.push(Command::from(c));
        };
        egui::Panel::left("explorer_controls")
            .resizable(true)
            .default_size(330.0)
            .size_range(280.0..=480.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("explorer_controls_scroll")
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        ui.add_space(4.0);
                        section_ui(ui, "Model", |ui| self.model_ui(ui, jobs, commands));
                        if self.model.is_some() {
                            section_ui(ui, "Latent", |ui| self.latent_ui(ui));
                            section_ui(ui, "Style mixing", |ui| self.mixing_ui(ui));
                            section_ui(ui, "Directions (PCA)", |ui| {
                                self.directions_ui(ui, commands);
                            });
                            section_ui(ui, "Keyframes", |ui| self.keyframes_ui(ui, commands));
                            section_ui(ui, "Projection", |ui| {
                                self.projection_ui(ui, commands);
                            });
                            section_ui(ui, "Layer view", |ui| self.layer_ui(ui));
                        }
                    });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            if self.model.is_none() {
                ui.add_space(24.0);
                ui.vertical_centered(|ui| {
                    ui.heading("Latent Explorer");
                    ui.label(
                        "Open a StyleGAN2 generator (.safetensors in NVIDIA's naming) or drop \
                         one on the window. NVIDIA's .pkl files must be converted first with \
                         tools/convert_stylegan_pkl.py.",
                    );
                });
                return;
            }
            ui.horizontal(|ui| {
                if ui.button("Capture PNG").clicked() {
                    push(commands, ExplorerCommand::Capture);
                }
                if self.project_job.is_some() {
                    ui.label("projecting: the image is the reconstruction so far");
                } else {
                    let ms = self
                        .render_ms
                        .map_or_else(|| "–".to_owned(), |ms| format!("{ms:.1} ms"));
                    ui.label(format!("render {ms} · {} fps", self.fps()));
                }
            });
            if let Some(e) = &self.render_error {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            let layer_room = if self.state.layer.is_some() {
                260.0
            } else {
                0.0
            };
            if let Some(tex) = &self.texture {
                let avail = ui.available_size() - egui::vec2(0.0, 100.0 + layer_room);
                let target = self
                    .project_target
                    .as_ref()
                    .filter(|_| self.project_job.is_some());
                if let Some(target) = target {
                    // Projecting: the reconstruction so far beside the image it aims at.
                    let side = ((avail.x - 16.0) / 2.0).min(avail.y - 20.0).max(64.0);
                    ui.horizontal(|ui| {
                        for (tex, label) in [(tex, "Reconstruction"), (target, "Target")] {
                            ui.vertical(|ui| {
                                ui.label(label);
                                ui.add(
                                    egui::Image::new(tex)
                                        .fit_to_exact_size(egui::vec2(side, side))
                                        .alt_text(label),
                                );
                            });
                        }
                    });
                } else {
                    let side = avail.x.min(avail.y).max(64.0);
                    ui.add(
                        egui::Image::new(tex)
                            .fit_to_exact_size(egui::vec2(side, side))
                            .alt_text("Generated image"),
                    );
                }
                self.layer_view_ui(ui);
            } else {
                ui.spinner();
            }
            ui.label("Seed browser");
            ui.horizontal_wrapped(|ui| {
                for thumb in &self.thumbs {
                    let seed = thumb.seed;
                    let button = egui::Button::image_and_text(
                        egui::Image::new(&thumb.texture).fit_to_exact_size(egui::vec2(64.0, 64.0)),
                        format!("seed {seed}"),
                    )
                    .selected(seed == self.state.latent.seed);
                    let r = ui.add(button);
                    if r.clicked() {
                        push(commands, ExplorerCommand::SelectSeed(seed));
                    }
                }
            });
            ui.horizontal(|ui| {
                if ui.button("Previous seeds").clicked() {
                    self.state.grid_start = self.state.grid_start.saturating_sub(GRID_SEEDS);
                }
                if ui.button("Next seeds").clicked() {
                    self.state.grid_start =
                        (self.state.grid_start + GRID_SEEDS).min(u64::from(u32::MAX) - GRID_SEEDS);
                }
            });
        });
    }

    fn model_ui(&self, ui: &mut egui::Ui, jobs: &Jobs, commands: &mut Vec<Command>) {
        match &self.model {
            Some(m) => {
                ui.label(RichText::new(&m.name).strong());
                let i = &m.info;
                ui.label(format!(
                    "{0}×{0}, z {1}, w {2}, {3} W rows, {4}",
                    i.resolution,
                    i.z_dim,
                    i.w_dim,
                    i.num_ws,
                    i.architecture.name()
                ));
                if i.from_pickle {
                    let note = weak(ui, studio_inference::pickle::SAFE_MODE_NOTE);
                    ui.add(egui::Label::new(note).wrap());
                    save_as_safetensors_ui(ui, &m.path, commands);
                }
            }
            None => {
                ui.label(weak(ui, "No generator loaded"));
            }
        }
        if actions::loading_gan(jobs).is_some() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Loading…");
            });
        }
        if ui.button("Open generator…").clicked() {
            commands.push(Command::from(ExplorerCommand::OpenModelDialog));
        }
    }

    fn latent_ui(&mut self, ui: &mut egui::Ui) {
        let num_ws = self.model.as_ref().map_or(1, |m| m.info.num_ws);
        let s = &mut self.state;
        if s.latent.w.is_some() {
            ui.label(if s.latent.noise.is_some() {
                "Latent: a projection (its W and its optimized noise)"
            } else {
                "Latent: a W (projection or W file)"
            });
            ui.horizontal(|ui| {
                if ui
                    .button("Back to seeds")
                    .on_hover_text("Use the seed below again instead of this W")
                    .clicked()
                {
                    s.latent.w = None;
                    s.latent.noise = None;
                }
                if s.latent.noise.is_some()
                    && ui
                        .button("Use the panel's noise")
                        .on_hover_text("Drop the projection's optimized noise")
                        .clicked()
                {
                    s.latent.noise = None;
                }
            });
        }
        let l = ui.label("Seed");
        let seed = ui
            .add(egui::DragValue::new(&mut s.latent.seed).range(0..=u32::MAX))
            .labelled_by(l.id);
        let l = ui.label("Seed offset");
        let offset = ui
            .add(egui::Slider::new(&mut s.latent.offset, -4.0..=4.0).fixed_decimals(2))
            .labelled_by(l.id);
        if seed.changed() || offset.changed() {
            // A seed replaces a projected W.
            s.latent.w = None;
            s.latent.noise = None;
        }
        let l = ui.label("Truncation ψ");
        ui.add(egui::Slider::new(&mut s.latent.psi, -1.0..=2.0).fixed_decimals(2))
            .labelled_by(l.id);
        let mut cutoff = s.latent.cutoff.unwrap_or(num_ws);
        let l = ui.label("Truncation cutoff (W rows)");
        ui.add(egui::Slider::new(&mut cutoff, 0..=num_ws))
            .labelled_by(l.id);
        s.latent.cutoff = (cutoff < num_ws).then_some(cutoff);
        let l = ui.label("Noise");
        egui::ComboBox::from_id_salt("explorer_noise")
            .selected_text(s.noise.label())
            .show_ui(ui, |ui| {
                for n in NoiseChoice::ALL {
                    ui.selectable_value(&mut s.noise, n, n.label());
                }
            })
            .response
            .labelled_by(l.id);
        if s.noise == NoiseChoice::Random {
            let l = ui.label("Noise seed");
            ui.add(egui::DragValue::new(&mut s.noise_seed))
                .labelled_by(l.id);
        }
    }

    fn mixing_ui(&mut self, ui: &mut egui::Ui) {
        let s = &mut self.state;
        ui.checkbox(&mut s.mixing, "Mix styles from a second seed");
        if !s.mixing {
            return;
        }
        let l = ui.label("Second seed");
        ui.add(egui::DragValue::new(&mut s.mix_seed).range(0..=u32::MAX))
            .labelled_by(l.id);
        ui.label(weak(
            ui,
            "W rows taken from the second seed (coarse to fine):",
        ));
        ui.horizontal_wrapped(|ui| {
            for (i, on) in s.mix_layers.iter_mut().enumerate() {
                ui.checkbox(on, format!("{i}"))
                    .on_hover_text(format!("W row {i}"));
            }
        });
    }

    fn directions_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let w_dim = self.model.as_ref().map_or(1, |m| m.info.w_dim);
        let num_ws = self.model.as_ref().map_or(1, |m| m.info.num_ws);
        ui.horizontal(|ui| {
            let l = ui.label("Samples N");
            ui.add(egui::DragValue::new(&mut self.state.pca_samples).range(2..=1_000_000))
                .labelled_by(l.id);
            let l = ui.label("Components k");
            ui.add(egui::DragValue::new(&mut self.state.pca_components).range(1..=w_dim))
                .labelled_by(l.id);
        });
        ui.horizontal(|ui| {
            let busy = self.directions_job.is_some();
            if ui
                .add_enabled(!busy, egui::Button::new("Compute directions"))
                .clicked()
            {
                commands.push(Command::from(ExplorerCommand::ComputeDirections));
            }
            if busy {
                ui.spinner();
            }
            if self.directions.is_some() && ui.button("Clear directions").clicked() {
                commands.push(Command::from(ExplorerCommand::ClearDirections));
            }
        });
        self.preset_list_ui(ui, commands);
        let Some(d) = self.directions.clone() else {
            ui.label(weak(ui, "No directions yet."));
            return;
        };
        self.presets_ui(ui, commands);
        if ui.button("Reset sliders").clicked() {
            for e in &mut self.state.latent.edits {
                e.sigma = 0.0;
            }
        }
        for e in &mut self.state.latent.edits {
            let c = e.component;
            let share = d.explained_variance_ratio.get(c).copied().unwrap_or(0.0) * 100.0;
            let l = ui.label(format!("Component {c} ({share:.1}% variance), σ"));
            ui.add(egui::Slider::new(&mut e.sigma, -5.0..=5.0).fixed_decimals(2))
                .labelled_by(l.id);
            ui.horizontal(|ui| {
                let (mut a, mut b) = (e.layers.start, e.layers.end);
                let l = ui.label(format!("Component {c} rows from"));
                ui.add(egui::DragValue::new(&mut a).range(0..=num_ws))
                    .labelled_by(l.id);
                let l = ui.label("to");
                ui.add(egui::DragValue::new(&mut b).range(0..=num_ws))
                    .labelled_by(l.id);
                e.layers = a.min(b)..b.max(a);
            });
        }
    }

    fn layer_ui(&mut self, ui: &mut egui::Ui) {
        let layers = self
            .model
            .as_ref()
            .map(|m| m.layers.clone())
            .unwrap_or_default();
        let s = &mut self.state;
        let l = ui.label("Synthesis layer");
        egui::ComboBox::from_id_salt("explorer_layer")
            .selected_text(s.layer.as_deref().unwrap_or("none"))
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut s.layer, None, "none");
                for name in &layers {
                    ui.selectable_value(&mut s.layer, Some(name.clone()), name);
                }
            })
            .response
            .labelled_by(l.id);
        if s.layer.is_none() {
            ui.label(weak(
                ui,
                "Choose a layer to see its channels and statistics under the image.",
            ));
            return;
        }
        ui.horizontal(|ui| {
            ui.radio_value(&mut s.layer_rgb, false, "Channel grid");
            ui.radio_value(&mut s.layer_rgb, true, "RGB of three channels");
        });
        if s.layer_rgb {
            ui.horizontal(|ui| {
                for (i, colour) in ["Red", "Green", "Blue"].iter().enumerate() {
                    let l = ui.label(format!("{colour} channel"));
                    ui.add(egui::DragValue::new(&mut s.layer_channels[i]).range(0..=4095))
                        .labelled_by(l.id);
                }
            });
        } else {
            let l = ui.label("Channels shown");
            ui.add(egui::DragValue::new(&mut s.layer_tiles).range(1..=GAN_LAYER_MAX_TILES))
                .labelled_by(l.id);
        }
    }

    /// The chosen layer's image and statistics, under the generated image.
    fn layer_view_ui(&self, ui: &mut egui::Ui) {
        if self.state.layer.is_none() {
            return;
        }
        if let Some(e) = &self.layer_error {
            ui.colored_label(ui.visuals().error_fg_color, e);
            return;
        }
        let (Some(view), Some(tex)) = (&self.layer_view, &self.layer_texture) else {
            ui.spinner();
            return;
        };
        let st = &view.stats;
        let shape = st
            .shape
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("×");
        ui.label(format!(
            "Layer {}: shape {shape} · mean {:.4} · std {:.4} · min {:.4} · max {:.4}",
            view.name, st.mean, st.std, st.min, st.max
        ));
        #[allow(clippy::cast_precision_loss)]
        let (w, h) = (view.image.width as f32, view.image.height as f32);
        let avail = ui.available_size();
        let scale = (avail.x / w).min((avail.y - 8.0).max(32.0) / h).max(0.1);
        ui.add(
            egui::Image::new(tex)
                .fit_to_exact_size(egui::vec2(w * scale, h * scale))
                .texture_options(egui::TextureOptions::NEAREST)
                .alt_text(format!("Activations of layer {}", view.name)),
        );
    }

    fn presets_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        ui.separator();
        ui.horizontal(|ui| {
            let l = ui.label("Preset name");
            ui.add(egui::TextEdit::singleline(&mut self.preset_name).desired_width(140.0))
                .labelled_by(l.id);
            let ok = store::preset_file_name(&self.preset_name).is_some();
            if ui
                .add_enabled(ok, egui::Button::new("Save preset"))
                .on_hover_text(
                    "Saves the directions and slider settings in presets/gan-directions/",
                )
                .clicked()
            {
                commands.push(Command::from(ExplorerCommand::SavePreset(
                    self.preset_name.trim().to_owned(),
                )));
            }
        });
    }

    fn preset_list_ui(&self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let w_dim = self.model.as_ref().map_or(0, |m| m.info.w_dim);
        let fitting: Vec<&PresetEntry> = self.presets.iter().filter(|p| p.w_dim == w_dim).collect();
        if fitting.is_empty() {
            ui.label(weak(ui, "No saved presets for this model's W size."));
            return;
        }
        ui.label("Presets for this model:");
        for p in fitting {
            let text = format!("Load preset {}", p.name);
            if ui
                .button(&text)
                .on_hover_text(format!(
                    "{} components · {}",
                    p.components,
                    p.path.display()
                ))
                .clicked()
            {
                commands.push(Command::from(ExplorerCommand::LoadPreset(
                    p.path.clone(),
                )));
            }
        }
    }

    fn projection_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        ui.label(
            "Drop a photo on the window (or paste one with Ctrl+V) to find the latent that \
             reproduces it; the result becomes a keyframe. Captured PNGs restore their latent \
             instead.",
        );
        if ui
            .add_enabled(
                self.model.is_some() && self.project_job.is_none(),
                egui::Button::new("Open an image to project…"),
            )
            .clicked()
        {
            commands.push(Command::from(ExplorerCommand::ProjectDialog));
        }
        ui.label(weak(
            ui,
            "The keyframe keeps the W and the noise buffers the projection optimized.",
        ));
        match self.model.as_ref().and_then(|m| m.vgg16.as_ref()) {
            Some(vgg) => ui.label(format!(
                "Loss: VGG16 perceptual distance ({})",
                vgg.file_name().unwrap_or_default().to_string_lossy()
            )),
            None => ui.label(weak(
                ui,
                "Loss: pixel + multi-scale SSIM. For the VGG16 perceptual loss, put \
                 vgg16.safetensors (tools/convert_vgg16.py) next to the generator or in \
                 STUDIO_HOME/models/.",
            )),
        };
        let l = ui.label("Projection steps");
        ui.add(egui::DragValue::new(&mut self.state.project_steps).range(1..=5000))
            .labelled_by(l.id);
        if self.project_job.is_some() {
            ui.label(weak(
                ui,
                "Projecting; the image shows the reconstruction, progress and Cancel are in \
                 the status bar.",
            ));
        }
    }

    fn keyframes_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let push = |commands: &mut Vec<Command>, c: ExplorerCommand| {
            commands.push(Command::from(c));
        };
        if ui.button("Add keyframe").clicked() {
            push(commands, ExplorerCommand::AddKeyframe);
        }
        let n = self.state.keyframes.len();
        for (i, k) in self.state.keyframes.iter().enumerate() {
            ui.horizontal(|ui| {
                let text = if k.w.is_some() {
                    format!("{}. projection", i + 1)
                } else if k.offset == 0.0 {
                    format!("{}. seed {} ψ {:.2}", i + 1, k.seed, k.psi)
                } else {
                    format!("{}. seed {}{:+.2} ψ {:.2}", i + 1, k.seed, k.offset, k.psi)
                };
                if ui.link(text).clicked() {
                    push(commands, ExplorerCommand::GoToKeyframe(i));
                }
                if ui.add_enabled(i > 0, egui::Button::new("Up")).clicked() {
                    push(
                        commands,
                        ExplorerCommand::MoveKeyframe { index: i, up: true },
                    );
                }
                if ui
                    .add_enabled(i + 1 < n, egui::Button::new("Down"))
                    .clicked()
                {
                    push(
                        commands,
                        ExplorerCommand::MoveKeyframe {
                            index: i,
                            up: false,
                        },
                    );
                }
                if ui.button("Remove").clicked() {
                    push(commands, ExplorerCommand::RemoveKeyframe(i));
                }
            });
        }
        if n == 0 {
            ui.label(weak(ui, "No keyframes yet."));
        }
        let l = ui.label("Interpolate");
        egui::ComboBox::from_id_salt("explorer_space")
            .selected_text(match self.state.space {
                PathSpace::W => "W (lerp)",
                PathSpace::Z => "Z (slerp)",
            })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.state.space, PathSpace::W, "W (lerp)");
                ui.selectable_value(&mut self.state.space, PathSpace::Z, "Z (slerp)");
            })
            .response
            .labelled_by(l.id);
        let l = ui.label("Speed (keyframes/s)");
        ui.add(egui::Slider::new(&mut self.state.speed, 0.05..=4.0).logarithmic(true))
            .labelled_by(l.id);
        let play = if self.playing { "Pause" } else { "Play" };
        if ui.add_enabled(n >= 2, egui::Button::new(play)).clicked() {
            push(commands, ExplorerCommand::TogglePlay);
        }
        ui.horizontal(|ui| {
            let l = ui.label("Frames");
            ui.add(egui::DragValue::new(&mut self.state.export_frames).range(2..=10_000))
                .labelled_by(l.id);
            let l = ui.label("GIF fps");
            ui.add(egui::DragValue::new(&mut self.state.export_fps).range(1.0..=50.0))
                .labelled_by(l.id);
        });
        ui.horizontal(|ui| {
            let busy = self.export_job.is_some();
            if ui
                .add_enabled(n >= 2 && !busy, egui::Button::new("Export GIF…"))
                .clicked()
            {
                push(commands, ExplorerCommand::ExportDialog { gif: true });
            }
            if ui
                .add_enabled(n >= 2 && !busy, egui::Button::new("Export PNG sequence…"))
                .clicked()
            {
                push(commands, ExplorerCommand::ExportDialog { gif: false });
            }
        });
        if self.export_job.is_some() {
            ui.label(weak(
                ui,
                "Exporting; progress and Cancel are in the status bar.",
            ));
        }
    }
}
