//! What the Latent Explorer's commands and the worker's GAN events do, and the per-frame work:
//! take the newest rendered frame, send a render request when the latent changed, advance
//! the animation, and autosave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use studio_inference::diffusion::imaging::{self, RgbImage};
use studio_inference::gan::GanInfo;
use studio_inference::gan::directions::{Directions, DirectionsPreset};
use studio_inference::gan::latent::Space;
use studio_inference::gan::render::{
    GanAnimationOut, GanAnimationRequest, GanGridRequest, GanRenderRequest, GanRenderWhat,
};
use studio_inference::worker::{Event, JobId, JobKind};

use super::ExplorerPanel;
use super::command::ExplorerPurpose;
use super::store::{self, PathSpace};
use super::{
    CapturedLatent, ExplorerCommand, GRID_SEEDS, LoadedGan, THUMB_SIDE, Thumb, capture_text,
    noise_mode, parse_capture_text,
};
use crate::gui::canvas::actions::is_image_file;
use crate::gui::context::{AppContext, Handled};
use crate::gui::jobs::Jobs;
use crate::gui::panel::{OpenContext, PanelView, UiContext, still_there};
use crate::gui::paste::pasted;
use crate::gui::settings_store::Panel;

/// Whether `path` is a GAN safetensors file: StyleGAN2 (its header names `mapping.w_avg` or
/// `synthesis.b4.const`) or DCGAN (`main.0.weight`, which the worker refuses with where to
/// run it instead). Only the header is read.
pub fn is_gan_file(path: &Path) -> bool {
    use std::io::Read as _;
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return false;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return false;
    }
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return false;
    }
    let mut header = Vec::new();
    if f.take(len).read_to_end(&mut header).is_err() {
        return false;
    }
    let header = String::from_utf8_lossy(&header);
    [
        "\"mapping.w_avg\"",
        "\"synthesis.b4.const\"",
        "main.0.weight\"",
    ]
    .iter()
    .any(|name| header.contains(name))
}

/// Whether `path` is one of NVIDIA's network pickles (`.pkl`).
pub fn is_network_pickle(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pkl"))
}

fn texture(ctx: &egui::Context, name: &str, img: &RgbImage) -> egui::TextureHandle {
    ctx.load_texture(name, color_image(img), egui::TextureOptions::LINEAR)
}

fn color_image(img: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgba_unmultiplied(
        [img.width as usize, img.height as usize],
        &img.to_rgba(),
    )
}

/// The StyleGAN2 generator being loaded (queued or running), if any.
pub(crate) fn loading_gan(jobs: &Jobs) -> Option<&PathBuf> {
    jobs.find(|p: &ExplorerPurpose| match p {
        ExplorerPurpose::LoadGan(path) => Some(path),
        _ => None,
    })
}

impl PanelView for ExplorerPanel {
    type Command = ExplorerCommand;
    type Purpose = ExplorerPurpose;

    /// Opens the saved explorer state, directions and presets.
    fn open(cx: &mut OpenContext<'_>) -> Self {
        let (mut explorer, notes) = ExplorerPanel::new(cx.home, cx.presets_dir);
        for note in notes {
            cx.notices.warning(note);
        }
        explorer.demo_model = cx
            .bundled_models
            .and_then(|dir| crate::bundled::model_in(dir, crate::bundled::BundledKind::Gan));
        explorer
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
        self.explorer_ui(ui, cx.jobs, cx.commands);
    }

    fn apply(&mut self, command: ExplorerCommand, cx: &mut AppContext<'_>) {
        self.apply_command(command, cx);
    }

    fn on_event(
        &mut self,
        job: JobId,
        purpose: &ExplorerPurpose,
        event: Event,
        cx: &mut AppContext<'_>,
    ) -> Handled {
        self.gan_event(job, purpose, event, cx)
    }

    /// Loads the last session's generator again, if it is still there; else the bundled demo
    /// GAN, if there is one.
    fn restore(&mut self, cx: &mut AppContext<'_>) {
        let saved = &mut cx.settings.last_gan_model;
        if let Some(path) = still_there(saved, "generator", "in the Latent Explorer", cx.notices) {
            self.load_gan(path, true, cx);
        } else if let Some(demo) = self.demo_model.clone() {
            self.load_gan(demo, true, cx);
        }
    }

    fn frame(&mut self, cx: &mut AppContext<'_>) {
        self.poll_explorer(cx);
    }

    /// Ctrl+V: a copied image is projected; a copied image file (path or `file://` URI) is
    /// treated as dropped (a capture restores its latent).
    fn shortcuts(&mut self, cx: &mut AppContext<'_>) {
        if cx.ctx.egui_wants_keyboard_input() {
            return;
        }
        let (texts, images) = pasted(cx.ctx);
        for text in texts {
            let first = text.lines().next().unwrap_or("").trim();
            let path = PathBuf::from(first.strip_prefix("file://").unwrap_or(first));
            if path.is_file() && is_image_file(&path) {
                cx.commands
                    .push(ExplorerCommand::RestoreFromPng(path).into());
            }
        }
        for image in images {
            self.project(Path::new("the pasted image"), image, cx);
        }
    }

    /// A StyleGAN2 safetensors file or one of NVIDIA's network pickles, wherever it is
    /// dropped; on the explorer, also images (a capture restores its latent, another image is
    /// offered for projection).
    fn take_drop(&mut self, path: &Path, shown: bool, cx: &mut AppContext<'_>) -> bool {
        let command = if is_gan_file(path) || is_network_pickle(path) {
            ExplorerCommand::LoadModel(path.to_path_buf())
        } else if shown && is_image_file(path) {
            ExplorerCommand::RestoreFromPng(path.to_path_buf())
        } else {
            return false;
        };
        cx.commands.push(command.into());
        true
    }

    fn flush(&mut self, cx: &mut AppContext<'_>) {
        self.flush_explorer(cx);
    }
}

impl ExplorerPanel {
    fn apply_command(&mut self, command: ExplorerCommand, cx: &mut AppContext<'_>) {
        match command {
            ExplorerCommand::LoadModel(path) => {
                self.load_gan(path, false, cx);
            }
            ExplorerCommand::OpenModelDialog => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Open a StyleGAN2 generator")
                    .add_filter("StyleGAN2 generator", &["safetensors", "pkl"])
                    .pick_file()
                {
                    self.load_gan(path, false, cx);
                }
            }
            ExplorerCommand::ComputeDirections => {
                if self.model.is_none() || self.directions_job.is_some() {
                    return;
                }
                let s = &self.state;
                let job = cx.submit(
                    JobKind::ComputeGanDirections {
                        samples: s.pca_samples,
                        components: s.pca_components,
                        seed: 0,
                    },
                    ExplorerPurpose::ComputeGanDirections.into(),
                );
                self.directions_job = job;
            }
            ExplorerCommand::ClearDirections => {
                self.directions = None;
                self.state.latent.edits.clear();
                let path = store::dir(cx.home).join("directions.json");
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    cx.notices
                        .error(format!("Could not remove {}: {e}", path.display()));
                }
            }
            ExplorerCommand::AddKeyframe => {
                let latent = self.current_latent();
                self.state.keyframes.push(latent);
            }
            ExplorerCommand::RemoveKeyframe(i) => {
                let k = &mut self.state.keyframes;
                if i < k.len() {
                    k.remove(i);
                }
                if k.len() < 2 {
                    self.playing = false;
                }
            }
            ExplorerCommand::MoveKeyframe { index, up } => {
                let k = &mut self.state.keyframes;
                let other = if up {
                    index.checked_sub(1)
                } else {
                    Some(index + 1)
                };
                if let Some(o) = other
                    && o < k.len()
                    && index < k.len()
                {
                    k.swap(index, o);
                }
            }
            ExplorerCommand::GoToKeyframe(i) => {
                if let Some(k) = self.state.keyframes.get(i).cloned() {
                    self.playing = false;
                    self.set_latent(k);
                }
            }
            ExplorerCommand::TogglePlay => {
                let e = &mut *self;
                e.playing = !e.playing && e.state.keyframes.len() >= 2;
                e.last_tick = None;
            }
            ExplorerCommand::Capture => self.capture(cx),
            ExplorerCommand::SavePreset(name) => self.save_preset(&name, cx),
            ExplorerCommand::LoadPreset(path) => self.load_preset(&path, cx),
            ExplorerCommand::RestoreFromPng(path) => self.restore_from_png(&path, cx),
            ExplorerCommand::ProjectDialog => {
                if let Some(path) = rfd::FileDialog::new()
                    .set_title("Open an image to project")
                    .add_filter("Images", &["png", "jpg", "jpeg", "webp"])
                    .pick_file()
                {
                    self.restore_from_png(&path, cx);
                }
            }
            ExplorerCommand::ExportDialog { gif } => {
                let picked = if gif {
                    rfd::FileDialog::new()
                        .set_title("Export the animation as a GIF")
                        .set_file_name("animation.gif")
                        .add_filter("GIF", &["gif"])
                        .save_file()
                } else {
                    rfd::FileDialog::new()
                        .set_title("Export the animation as PNG frames into a folder")
                        .pick_folder()
                };
                if let Some(path) = picked {
                    self.export_animation(path, gif, cx);
                }
            }
            ExplorerCommand::ExportAnimation { path, gif } => self.export_animation(path, gif, cx),
            ExplorerCommand::SelectSeed(seed) => {
                let l = &mut self.state.latent;
                l.seed = seed;
                l.offset = 0.0;
                l.w = None;
                l.noise = None;
                self.playing = false;
            }
        }
    }

    fn export_animation(&mut self, path: PathBuf, gif: bool, cx: &mut AppContext<'_>) {
        let e = &*self;
        let Some(model) = &e.model else {
            cx.notices.warning("Open a generator first");
            return;
        };
        if e.state.keyframes.len() < 2 {
            cx.notices
                .warning("Add at least two keyframes to export an animation");
            return;
        }
        if e.export_job.is_some() {
            return;
        }
        let text = capture_text(&e.captured_latent(), &model.name);
        let request = GanAnimationRequest {
            keyframes: e.state.keyframes.clone(),
            space: match e.state.space {
                PathSpace::W => Space::W,
                PathSpace::Z => Space::Z,
            },
            noise: noise_mode(e.state.noise, e.state.noise_seed),
            directions: e.directions.clone(),
            frames: e.state.export_frames,
            fps: e.state.export_fps,
            out: if gif {
                GanAnimationOut::Gif(path.clone())
            } else {
                GanAnimationOut::PngSequence(path.clone())
            },
            text: text
                .lines()
                .next()
                .unwrap_or_default()
                .replace(&format!("seed {}", e.state.latent.seed), "animation"),
        };
        self.playing = false;
        let job = cx.submit(
            JobKind::ExportGanAnimation {
                request: Box::new(request),
            },
            ExplorerPurpose::ExportGanAnimation(path).into(),
        );
        self.export_job = job;
    }

    /// Makes `latent` the current one (its mixing included).
    fn set_latent(&mut self, latent: studio_inference::gan::render::GanLatent) {
        let s = &mut self.state;
        match &latent.mix {
            Some(m) => {
                s.mixing = true;
                s.mix_seed = m.seed;
                s.mix_layers.clone_from(&m.layers);
            }
            None => s.mixing = false,
        }
        let had_edits = latent.edits.clone();
        s.latent = latent;
        s.latent.mix = None;
        self.fit_edits();
        // Amounts for components that are not loaded are dropped by fit_edits; keep the rest.
        for e in &mut self.state.latent.edits {
            if let Some(saved) = had_edits.iter().find(|h| h.component == e.component) {
                e.sigma = saved.sigma;
                e.layers = saved.layers.clone();
            }
        }
    }

    pub(crate) fn load_gan(&mut self, path: PathBuf, at_startup: bool, cx: &mut AppContext<'_>) {
        if path.as_os_str().is_empty() || loading_gan(cx.jobs) == Some(&path) {
            return;
        }
        let job = cx.submit(
            JobKind::LoadGan { path: path.clone() },
            ExplorerPurpose::LoadGan(path).into(),
        );
        if at_startup {
            self.startup_load = job;
        }
    }

    fn gan_loaded(
        &mut self,
        purpose: &ExplorerPurpose,
        info: GanInfo,
        name: String,
        layers: Vec<String>,
        cx: &mut AppContext<'_>,
    ) {
        let mut vgg16 = None;
        let mut from = PathBuf::new();
        if let ExplorerPurpose::LoadGan(path) = purpose {
            vgg16 = store::find_vgg16(cx.home, path);
            cx.settings.last_gan_model = Some(path.clone());
            from.clone_from(path);
        }
        cx.notices
            .info(format!("Loaded {name} for the Latent Explorer"));
        let e = &mut *self;
        e.model = Some(LoadedGan {
            info,
            name,
            path: from,
            layers,
            vgg16,
        });
        e.last_request = None;
        e.grid_sent = None;
        e.thumbs.clear();
        e.fit_to_model();
        self.refresh_explorer_presets(cx);
    }

    fn save_preset(&mut self, name: &str, cx: &mut AppContext<'_>) {
        let Some(directions) = self.directions.clone() else {
            cx.notices
                .warning("Compute directions before saving a preset.");
            return;
        };
        let preset = DirectionsPreset {
            directions: (*directions).clone(),
            edits: self.state.latent.edits.clone(),
        };
        let e = &*self;
        match store::save_preset(e.presets_dir.as_deref(), cx.home, name, &preset) {
            Ok((path, None)) => {
                cx.notices
                    .info(format!("Saved the preset \"{name}\" to {}", path.display()));
            }
            Ok((path, Some(why))) => cx.notices.warning(format!(
                "The presets folder could not be written ({why}); saved the preset \"{name}\" \
                 to {} instead",
                path.display()
            )),
            Err(err) => {
                cx.notices
                    .error(format!("Could not save the preset \"{name}\": {err:#}"));
            }
        }
        self.refresh_explorer_presets(cx);
    }

    fn load_preset(&mut self, path: &Path, cx: &mut AppContext<'_>) {
        let preset = match DirectionsPreset::load_json(path) {
            Ok(p) => p,
            Err(err) => {
                cx.notices
                    .error(format!("Could not load the preset: {err}"));
                return;
            }
        };
        let Some(m) = &self.model else {
            return;
        };
        if preset.directions.w_dim != m.info.w_dim {
            cx.notices.error(format!(
                "The preset {} has directions for w {}, but this model's w is {}",
                path.display(),
                preset.directions.w_dim,
                m.info.w_dim
            ));
            return;
        }
        if let Err(err) = store::save_directions(cx.home, &preset.directions) {
            cx.notices.error(format!("{err:#}"));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let e = &mut *self;
        e.directions = Some(Arc::new(preset.directions));
        e.state.latent.edits = preset.edits;
        e.fit_edits();
        e.preset_name.clone_from(&name);
        cx.notices.info(format!("Loaded the preset \"{name}\""));
    }

    pub(crate) fn refresh_explorer_presets(&mut self, cx: &mut AppContext<'_>) {
        for problem in self.refresh_presets() {
            cx.notices
                .warning(format!("A directions preset could not be read: {problem}"));
        }
    }

    fn gan_unloaded(&mut self) {
        let e = &mut *self;
        e.model = None;
        e.texture = None;
        e.image = None;
        e.image_latent = None;
        e.thumbs.clear();
        e.playing = false;
        e.layer_view = None;
        e.layer_texture = None;
        e.layer_error = None;
    }

    fn gan_directions(&mut self, directions: Arc<Directions>, cx: &mut AppContext<'_>) {
        if let Err(e) = store::save_directions(cx.home, &directions) {
            cx.notices.error(format!("{e:#}"));
        }
        cx.notices.info(format!(
            "Computed {} directions from {} samples",
            directions.len(),
            directions.samples
        ));
        self.directions = Some(directions);
        self.state.latent.edits.clear();
        self.fit_edits();
    }

    /// An event of a job the Latent Explorer submitted (`purpose` says which).
    fn gan_event(
        &mut self,
        job: JobId,
        purpose: &ExplorerPurpose,
        event: Event,
        cx: &mut AppContext<'_>,
    ) -> Handled {
        match event {
            Event::GanLoaded {
                info, name, layers, ..
            } => self.gan_loaded(purpose, info, name, layers, cx),
            Event::GanUnloaded { .. } => self.gan_unloaded(),
            Event::GanDirections { directions, .. } => self.gan_directions(directions, cx),
            Event::GanProjected { w, noise, loss, .. } => self.gan_projected(w, noise, loss, cx),
            Event::Done { .. } => self.gan_job_finished(job, purpose, None, false, cx),
            Event::Cancelled { .. } => self.gan_job_finished(job, purpose, None, true, cx),
            Event::Failed { error, .. } => {
                self.gan_job_finished(job, purpose, Some(&error), false, cx);
            }
            other => return Handled::No(other),
        }
        Handled::Yes
    }

    fn gan_job_finished(
        &mut self,
        job: JobId,
        purpose: &ExplorerPurpose,
        error: Option<&str>,
        cancelled: bool,
        cx: &mut AppContext<'_>,
    ) {
        match purpose {
            ExplorerPurpose::LoadGan(path) => {
                if let Some(error) = error {
                    if self.startup_load == Some(job) {
                        cx.notices.warning(format!(
                            "The last generator, {}, could not be loaded again: {error}",
                            path.display()
                        ));
                        cx.settings.last_gan_model = None;
                    } else {
                        cx.notices
                            .error(format!("Could not load {}: {error}", path.display()));
                    }
                }
                if self.startup_load == Some(job) {
                    self.startup_load = None;
                }
            }
            ExplorerPurpose::ExportGanAnimation(path) => {
                self.export_job = None;
                match error {
                    Some(error) => cx
                        .notices
                        .error(format!("Exporting to {} failed: {error}", path.display())),
                    None if cancelled => cx.notices.warning(format!(
                        "The export to {} was cancelled; its frames so far are kept",
                        path.display()
                    )),
                    None => cx
                        .notices
                        .info(format!("Exported the animation to {}", path.display())),
                }
            }
            ExplorerPurpose::ProjectGan(path) => {
                self.project_job = None;
                self.project_target = None;
                if let Some(error) = error {
                    cx.notices
                        .error(format!("Projecting {} failed: {error}", path.display()));
                }
            }
            ExplorerPurpose::ComputeGanDirections => {
                self.directions_job = None;
                if let Some(error) = error {
                    cx.notices
                        .error(format!("Computing directions failed: {error}"));
                }
            }
        }
    }

    fn capture(&mut self, cx: &mut AppContext<'_>) {
        let e = &*self;
        let (Some(image), Some(latent), Some(model)) = (&e.image, &e.image_latent, &e.model) else {
            cx.notices
                .warning("Nothing to capture yet: open a generator first");
            return;
        };
        let text = capture_text(latent, &model.name);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!("seed{}-{stamp}.png", latent.latent.seed);
        let path = store::dir(cx.home).join("captures").join(name);
        let image = image.clone();
        cx.files.write(
            format!("the capture {}", path.display()),
            &path,
            Box::new(move || {
                imaging::encode_png(&image, Some(&text)).map_err(|e| anyhow::anyhow!("{e}"))
            }),
        );
        cx.notices.info(format!("Captured {}", path.display()));
    }

    /// A dropped PNG with a captured latent restores it.
    pub(crate) fn restore_from_png(&mut self, path: &Path, cx: &mut AppContext<'_>) {
        let decoded = match imaging::decode_image_file(path) {
            Ok(d) => d,
            Err(e) => {
                cx.notices.error(format!("{e}"));
                return;
            }
        };
        let Some(captured) = decoded.parameters.as_deref().and_then(parse_capture_text) else {
            self.project(path, decoded.image, cx);
            return;
        };
        let CapturedLatent {
            latent,
            noise,
            noise_seed,
        } = captured;
        self.state.noise = noise;
        self.state.noise_seed = noise_seed;
        self.playing = false;
        let seed = latent.seed;
        self.set_latent(latent);
        cx.notices
            .info(format!("Restored seed {seed} from {}", path.display()));
    }

    pub(crate) fn project(&mut self, path: &Path, image: RgbImage, cx: &mut AppContext<'_>) {
        if self.model.is_none() {
            cx.notices
                .warning("Open a generator before giving it a photo to project");
            return;
        }
        if self.project_job.is_some() {
            cx.notices.warning("A projection is already running");
            return;
        }
        self.playing = false;
        self.project_target = Some(cx.ctx.load_texture(
            "explorer-project-target",
            color_image(&image),
            egui::TextureOptions::LINEAR,
        ));
        let job = cx.submit(
            JobKind::ProjectGan {
                image: Box::new(image),
                steps: self.state.project_steps,
                vgg16: self.model.as_ref().and_then(|m| m.vgg16.clone()),
            },
            ExplorerPurpose::ProjectGan(path.to_path_buf()).into(),
        );
        self.project_job = job;
    }

    fn gan_projected(
        &mut self,
        w: Vec<f32>,
        noise: Arc<Vec<f32>>,
        loss: f32,
        cx: &mut AppContext<'_>,
    ) {
        let latent = studio_inference::gan::render::GanLatent {
            w: Some(w),
            noise: Some(noise),
            psi: 1.0,
            cutoff: None,
            offset: 0.0,
            ..self.state.latent.clone()
        };
        let mut latent = latent;
        latent.mix = None;
        for e in &mut latent.edits {
            e.sigma = 0.0;
        }
        self.state.keyframes.push(latent.clone());
        self.set_latent(latent);
        // Show the projection's own last image until the render of its W arrives.
        self.last_request = None;
        cx.notices.info(format!(
            "Projected (loss {loss:.4}); added as keyframe {}, with the noise it optimized.",
            self.state.keyframes.len()
        ));
    }

    /// Per frame: the newest rendered frame and thumbnails, the animation, new requests and
    /// the autosave.
    fn poll_explorer(&mut self, cx: &mut AppContext<'_>) {
        let ctx = cx.ctx;
        let Some(worker) = cx.worker.as_ref() else {
            return;
        };
        let e = &mut *self;
        let now = Instant::now();
        if let Some(frame) = worker.take_gan_frame() {
            e.render_ms = Some(frame.render_ms);
            match frame.result {
                Ok(img) => {
                    match &mut e.texture {
                        Some(t) => t.set(color_image(&img), egui::TextureOptions::LINEAR),
                        None => e.texture = Some(texture(ctx, "explorer:image", &img)),
                    }
                    e.image = Some(img);
                    e.image_latent = e
                        .sent
                        .iter()
                        .find(|(id, _)| *id == frame.id)
                        .map(|(_, l)| l.clone());
                    e.render_error = None;
                    e.frames_shown += 1;
                    e.frame_times.push_back(now);
                    match frame.layer {
                        Some(Ok(view)) => {
                            match &mut e.layer_texture {
                                Some(t) => {
                                    t.set(color_image(&view.image), egui::TextureOptions::NEAREST);
                                }
                                None => {
                                    e.layer_texture = Some(ctx.load_texture(
                                        "explorer:layer",
                                        color_image(&view.image),
                                        egui::TextureOptions::NEAREST,
                                    ));
                                }
                            }
                            e.layer_view = Some(view);
                            e.layer_error = None;
                        }
                        Some(Err(err)) => {
                            e.layer_view = None;
                            e.layer_error = Some(format!("Layer view: {err}"));
                        }
                        // Frames of a projection (id 0) keep the last layer view.
                        None if frame.id != 0 => {
                            e.layer_view = None;
                            e.layer_error = None;
                        }
                        None => {}
                    }
                }
                Err(err) => e.render_error = Some(err),
            }
            e.shown_id = Some(frame.id);
        }
        while e
            .frame_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
        {
            e.frame_times.pop_front();
        }
        if let Some(grid) = worker.take_gan_grid()
            && let Ok(images) = grid.result
        {
            e.thumbs = images
                .iter()
                .map(|(seed, img)| Thumb {
                    seed: *seed,
                    texture: texture(ctx, &format!("explorer:seed{seed}"), img),
                })
                .collect();
        }
        if e.model.is_none() || cx.settings.panel != Panel::LatentExplorer {
            // Nothing renders while the panel is not shown.
            return;
        }
        // The animation.
        if e.playing {
            let n = e.state.keyframes.len();
            if n < 2 {
                e.playing = false;
            } else {
                let dt = e
                    .last_tick
                    .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
                #[allow(clippy::cast_precision_loss)]
                let step = dt * e.state.speed / (n - 1) as f64;
                e.t = (e.t + step).rem_euclid(1.0);
                e.last_tick = Some(now);
                ctx.request_repaint();
            }
        }
        let noise = noise_mode(e.state.noise, e.state.noise_seed);
        let what = if e.playing {
            GanRenderWhat::Path {
                keyframes: e.state.keyframes.clone(),
                t: e.t,
                space: match e.state.space {
                    PathSpace::W => Space::W,
                    PathSpace::Z => Space::Z,
                },
            }
        } else {
            GanRenderWhat::Latent(e.current_latent())
        };
        let request = GanRenderRequest {
            id: 0,
            what,
            noise,
            directions: e.directions.clone(),
            max_side: None,
            layer: e.layer_request(),
        };
        if e.last_request.as_ref() != Some(&request) {
            e.last_request = Some(request.clone());
            let id = e.next_request;
            e.next_request += 1;
            e.requests_sent += 1;
            let mut shown = e.captured_latent();
            if e.playing {
                shown.latent.seed = e.state.keyframes.first().map_or(0, |k| k.seed);
            }
            e.sent.push_back((id, shown));
            while e.sent.len() > 64 {
                e.sent.pop_front();
            }
            worker.render_gan(GanRenderRequest { id, ..request });
        }
        let grid = GanGridRequest {
            id: 0,
            seeds: (e.state.grid_start..e.state.grid_start + GRID_SEEDS).collect(),
            psi: e.state.latent.psi,
            cutoff: e.state.latent.cutoff,
            noise,
            max_side: THUMB_SIDE,
        };
        if e.grid_sent.as_ref() != Some(&grid) {
            e.grid_sent = Some(grid.clone());
            worker.render_gan_grid(grid);
        }
        if e.shown_id != Some(e.next_request - 1) {
            // The result arrives through a mailbox; the worker asks for a repaint when it is
            // there. This slow poll is only a safety net: polling at 60 Hz kept the UI thread
            // (and a software renderer) busy and took a core from the render itself (a
            // 256² config-F frame took 650 ms in the window against 300 ms headless).
            ctx.request_repaint_after(Duration::from_millis(250));
        }
        let due = e
            .saved_at
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if e.state != e.saved_state && due {
            e.saved_at = Some(now);
            match store::save_state(cx.home, &e.state, &mut e.noise_files) {
                Ok(()) => e.saved_state = e.state.clone(),
                Err(err) => {
                    e.saved_state = e.state.clone();
                    cx.notices.error(format!("{err:#}"));
                }
            }
        }
    }

    /// Saves what the debounced autosave has not written yet (on exit).
    fn flush_explorer(&mut self, cx: &mut AppContext<'_>) {
        if self.state != self.saved_state
            && let Err(e) = store::save_state(cx.home, &self.state, &mut self.noise_files)
        {
            log::warn!("saving the explorer: {e:#}");
        }
    }
}
