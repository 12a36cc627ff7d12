//! The generation form: prompt, negative prompt, style preset, sampler and schedule, steps,
//! CFG, seed, size, batch, denoising strength, mask blur and preview method; the label saying
//! which mode Generate will run; Generate and Cancel with the progress.
//!
//! Style presets are data files, `presets/styles/*.json`:
//! `{ "name": …, "prompt": "… {prompt} …", "negative_prompt": … }`. The `{prompt}` placeholder
//! is replaced by the user's prompt (or the style is appended after `", "` when it has none);
//! the negative prompts are joined with `", "`.

use std::path::{Path, PathBuf};

use egui::RichText;
use serde::{Deserialize, Serialize};
use studio_inference::diffusion::hires::{HiresFix, HiresUpscaler, LatentUpscale};
use studio_inference::diffusion::inpaint::{InpaintArea, InpaintOptions, MaskedContent};
use studio_inference::diffusion::model::ImageModelInfo;
use studio_inference::diffusion::noise::{NoiseSource, Variation};
use studio_inference::diffusion::pipeline::{ImageMode, ImageRequest, PreviewMethod};
use studio_inference::diffusion::samplers::{SamplerKind, ScheduleKind};
use studio_inference::image_meta::GenerationParameters;

use super::CanvasCommand;
use super::document::{Document, ModeKind};
use crate::gui::command::Command;
use crate::gui::style::weak;

/// The form's values (saved with the canvas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(clippy::struct_excessive_bools)] // one per checkbox of the form
pub struct FormValues {
    pub prompt: String,
    pub negative_prompt: String,
    /// The chosen style's name; empty for none.
    pub style: String,
    pub sampler: SamplerKind,
    pub schedule: ScheduleKind,
    pub steps: u32,
    pub cfg_scale: f32,
    pub seed: u64,
    /// A new random seed for every Generate (the one used is shown and can be reused).
    pub random_seed: bool,
    /// The size of a new image (txt2img); edits use the canvas's size.
    pub width: u32,
    pub height: u32,
    pub batch_count: u32,
    /// img2img / inpaint: how much of the schedule runs (1 = everything).
    pub strength: f32,
    /// Gaussian blur of the mask edge, in pixels.
    pub mask_blur: f32,
    pub preview: PreviewMethod,
    /// Where a seed's noise comes from.
    pub noise_source: NoiseSource,
    /// The variation seed (used when the strength is above 0).
    pub variation_seed: u64,
    /// How far towards the variation seed's noise (0 = off).
    pub variation_strength: f32,
    /// Inpainting: the whole picture, or only the masked region at the model's size.
    pub inpaint_area: InpaintArea,
    /// Only masked: pixels of context around the mask.
    pub inpaint_padding: u32,
    /// Inpainting: what the masked area starts from.
    pub masked_content: MaskedContent,
    /// The upscaler file (ESRGAN / Real-ESRGAN or SwinIR) *Upscale* uses.
    pub upscaler: Option<PathBuf>,
    /// *Upscale*: output size over input size.
    pub upscale_by: f32,
    /// txt2img: the hires fix's second pass.
    pub hires: bool,
    /// The hires fix's size over the first pass's.
    pub hires_scale: f32,
    /// The hires fix's steps (0: the same).
    pub hires_steps: u32,
    /// The hires fix's denoising strength.
    pub hires_denoise: f32,
    /// The hires fix enlarges with the chosen upscaler file (else Lanczos).
    pub hires_with_upscaler: bool,
    /// The hires fix enlarges the latents in this mode (the web UI's "Latent" upscalers).
    pub hires_latent: Option<LatentUpscale>,
    /// An SDXL refiner (file or folder), used when `use_refiner`.
    pub refiner: Option<PathBuf>,
    pub use_refiner: bool,
    /// The share of the steps after which the refiner takes over.
    pub refiner_switch_at: f32,
}

impl Default for FormValues {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            style: String::new(),
            sampler: SamplerKind::EulerAncestral,
            schedule: ScheduleKind::Normal,
            steps: 20,
            cfg_scale: 7.0,
            seed: 0,
            random_seed: true,
            width: 512,
            height: 512,
            batch_count: 1,
            strength: 0.75,
            mask_blur: 4.0,
            preview: PreviewMethod::Latent2Rgb,
            noise_source: NoiseSource::Studio,
            variation_seed: 0,
            variation_strength: 0.0,
            inpaint_area: InpaintArea::WholePicture,
            inpaint_padding: 32,
            masked_content: MaskedContent::Original,
            upscaler: None,
            upscale_by: 2.0,
            hires: false,
            hires_scale: 2.0,
            hires_steps: 0,
            hires_denoise: 0.7,
            hires_with_upscaler: false,
            hires_latent: None,
            refiner: None,
            use_refiner: false,
            refiner_switch_at: 0.8,
        }
    }
}

/// A style preset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Style {
    pub name: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
}

/// Reads `dir/*.json` (sorted by file name); files that do not parse are reported.
pub fn load_styles(dir: Option<&Path>) -> (Vec<Style>, Vec<String>) {
    let mut styles = Vec::new();
    let mut errors = Vec::new();
    let Some(dir) = dir else {
        return (styles, errors);
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (styles, errors);
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Style>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(s) => styles.push(s),
            Err(e) => errors.push(format!("Style preset {} was skipped: {e}", path.display())),
        }
    }
    (styles, errors)
}

/// The prompt and negative prompt with `style` applied.
pub fn apply_style(style: Option<&Style>, prompt: &str, negative: &str) -> (String, String) {
    let Some(style) = style else {
        return (prompt.to_owned(), negative.to_owned());
    };
    let prompt = prompt.trim();
    let positive = if style.prompt.contains("{prompt}") {
        style.prompt.replace("{prompt}", prompt)
    } else {
        join_nonempty(prompt, &style.prompt)
    };
    (
        positive,
        join_nonempty(negative.trim(), &style.negative_prompt),
    )
}

fn join_nonempty(a: &str, b: &str) -> String {
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, _) => b.trim().to_owned(),
        (false, true) => a.trim().to_owned(),
        (false, false) => format!("{}, {}", a.trim(), b.trim()),
    }
}

/// `v` rounded to the nearest multiple of `m` (at least `m`).
pub fn snap(v: u32, m: u32) -> u32 {
    let m = m.max(1);
    (v.saturating_add(m / 2) / m * m).max(m)
}

/// The request Generate submits for this canvas and form.
pub fn build_request(
    form: &FormValues,
    styles: &[Style],
    doc: &Document,
    model: &ImageModelInfo,
) -> ImageRequest {
    let style = styles.iter().find(|s| s.name == form.style);
    let (prompt, negative) = apply_style(style, &form.prompt, &form.negative_prompt);
    let m = model.size_multiple;
    let mut req = ImageRequest::new(prompt);
    req.negative_prompt = negative;
    req.steps = form.steps.max(1) as usize;
    req.cfg_scale = f64::from(form.cfg_scale);
    req.refiner_switch_at = f64::from(form.refiner_switch_at.clamp(0.0, 1.0));
    req.seed = (!form.random_seed).then_some(form.seed);
    req.sampler = form.sampler;
    req.schedule = form.schedule;
    req.batch_count = form.batch_count.max(1);
    req.noise_source = form.noise_source;
    req.variation = (form.variation_strength > 0.0).then(|| Variation {
        seed: form.variation_seed,
        strength: f64::from(form.variation_strength.min(1.0)),
    });
    req.preview = if form.preview == PreviewMethod::Taesd && !model.taesd {
        PreviewMethod::Latent2Rgb
    } else {
        form.preview
    };
    let strength = f64::from(form.strength.clamp(0.0, 1.0));
    if let Some(image) = doc.image() {
        req.width = snap(image.width, m);
        req.height = snap(image.height, m);
        if doc.mode() == ModeKind::Inpaint {
            req.inpaint = InpaintOptions {
                area: form.inpaint_area,
                padding: form.inpaint_padding,
                content: form.masked_content,
            };
            if form.inpaint_area == InpaintArea::OnlyMasked {
                // The masked region is worked on at the model's own size.
                req.width = snap(model.default_size.0, m);
                req.height = snap(model.default_size.1, m);
            }
        }
        req.mode = if doc.mode() == ModeKind::Inpaint {
            ImageMode::Inpaint {
                init: image.clone(),
                mask: doc.mask().clone(),
                strength,
                mask_blur: form.mask_blur.max(0.0),
            }
        } else {
            ImageMode::Img2Img {
                init: image.clone(),
                strength,
            }
        };
    } else {
        req.width = snap(form.width, m);
        req.height = snap(form.height, m);
        if form.hires {
            req.hires = Some(HiresFix {
                scale: f64::from(form.hires_scale.clamp(1.0, 4.0)),
                upscaler: match (form.hires_latent, &form.upscaler, form.hires_with_upscaler) {
                    (Some(mode), ..) => HiresUpscaler::Latent(mode),
                    (None, Some(path), true) => HiresUpscaler::Esrgan(path.clone()),
                    _ => HiresUpscaler::Lanczos,
                },
                steps: form.hires_steps as usize,
                denoising: f64::from(form.hires_denoise.clamp(0.0, 1.0)),
            });
        }
    }
    req
}

/// Puts what `params` holds into the form; returns the names of what was set.
pub fn restore_parameters(
    form: &mut FormValues,
    params: &GenerationParameters,
) -> Vec<&'static str> {
    let mut set = Vec::new();
    if !params.prompt.is_empty() {
        form.prompt.clone_from(&params.prompt);
        form.style.clear();
        set.push("prompt");
    }
    form.negative_prompt.clone_from(&params.negative_prompt);
    if !params.negative_prompt.is_empty() {
        set.push("negative prompt");
    }
    if let Some(seed) = params.seed() {
        form.seed = seed;
        form.random_seed = false;
        set.push("seed");
    }
    if let Some((sampler, schedule)) = params.get("Sampler").and_then(SamplerKind::parse) {
        form.sampler = sampler;
        set.push("sampler");
        if let Some(schedule) = schedule {
            form.schedule = schedule;
        }
    }
    if let Some(schedule) = params.get("Schedule type").and_then(ScheduleKind::parse) {
        form.schedule = schedule;
        set.push("schedule");
    }
    if let Some(steps) = params.steps() {
        form.steps = steps.clamp(1, 500);
        set.push("steps");
    }
    if let Some(cfg) = params.cfg_scale() {
        form.cfg_scale = cfg.clamp(0.0, 50.0);
        set.push("CFG");
    }
    if let Some((w, h)) = params.size() {
        form.width = w.clamp(8, 4096);
        form.height = h.clamp(8, 4096);
        set.push("size");
    }
    if let Some(s) = params
        .get("Denoising strength")
        .and_then(|v| v.trim().parse::<f32>().ok())
    {
        form.strength = s.clamp(0.0, 1.0);
    }
    if let Some(b) = params
        .get("Mask blur")
        .and_then(|v| v.trim().parse::<f32>().ok())
    {
        form.mask_blur = b.clamp(0.0, 64.0);
    }
    // The SD web UI writes `RNG` only when it is not its GPU default, which Studio cannot
    // reproduce; an image of Studio's without it used Studio's own noise.
    let studio_made = params
        .get("Version")
        .is_some_and(|v| v.starts_with("studio-"));
    if let Some(source) = params.get("RNG").and_then(NoiseSource::parse) {
        form.noise_source = source;
        set.push("noise source");
    } else if studio_made {
        form.noise_source = NoiseSource::Studio;
    }
    let number = |key: &str| {
        params
            .get(key)
            .and_then(|v| v.trim().parse::<f32>().ok())
            .filter(|v| v.is_finite())
    };
    form.hires = false;
    if let Some(scale) = number("Hires upscale") {
        form.hires = true;
        form.hires_scale = scale.clamp(1.0, 4.0);
        form.hires_steps = number("Hires steps").map_or(0, |s| s.clamp(0.0, 500.0) as u32);
        if let Some(d) = number("Denoising strength") {
            form.hires_denoise = d.clamp(0.0, 1.0);
        }
        let upscaler = params.get("Hires upscaler").unwrap_or("Lanczos");
        form.hires_latent = LatentUpscale::parse(upscaler);
        form.hires_with_upscaler =
            form.hires_latent.is_none() && !upscaler.trim().eq_ignore_ascii_case("lanczos");
        set.push("hires fix");
    }
    // The refiner named in the image is used when it is the one chosen here.
    form.use_refiner = match params.get("Refiner") {
        Some(name) => form.refiner.as_ref().is_some_and(|p| {
            p.file_stem()
                .is_some_and(|s| s.to_string_lossy() == name.trim())
        }),
        None => false,
    };
    if let Some(at) = number("Refiner switch at") {
        form.refiner_switch_at = at.clamp(0.0, 1.0);
    }
    if let Some(area) = params.get("Inpaint area").and_then(InpaintArea::parse) {
        form.inpaint_area = area;
    }
    if let Some(p) = params
        .get("Masked area padding")
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        form.inpaint_padding = p.min(1024);
    }
    if let Some(c) = params.get("Masked content").and_then(MaskedContent::parse) {
        form.masked_content = c;
    }
    let variation = (
        params
            .get("Variation seed")
            .and_then(|v| v.trim().parse::<u64>().ok()),
        params
            .get("Variation seed strength")
            .and_then(|v| v.trim().parse::<f32>().ok())
            .filter(|s| s.is_finite()),
    );
    if let (Some(seed), Some(strength)) = variation {
        form.variation_seed = seed;
        form.variation_strength = strength.clamp(0.0, 1.0);
        set.push("variation seed");
    } else {
        form.variation_strength = 0.0;
    }
    set
}

/// What the form needs to know about the rest of the panel for one frame.
pub struct FormContext<'a> {
    pub model: Option<&'a ImageModelInfo>,
    pub model_loading: bool,
    pub mode: ModeKind,
    pub canvas_size: Option<(u32, u32)>,
    /// "image 1/2 · step 7/20" while an image job runs.
    pub progress: Option<(f32, String)>,
    pub generating: bool,
    pub last_seed: Option<u64>,
    /// Whether there is an image to upscale (a staged result or the canvas image).
    pub has_image: bool,
    /// Upscalers offered in a menu.
    pub upscaler_dirs: &'a [PathBuf],
}

/// Form state that is not saved.
#[derive(Debug, Default)]
pub struct FormView {
    /// Said once after a size was snapped.
    snap_note: Option<String>,
}

impl FormView {
    pub fn form_ui(
        &mut self,
        ui: &mut egui::Ui,
        form: &mut FormValues,
        styles: &[Style],
        cx: &FormContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        let push =
            |commands: &mut Vec<Command>, c: CanvasCommand| commands.push(Command::from(c));
        let label = ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut form.prompt)
                .hint_text("What to draw, e.g. a lighthouse at dusk, oil painting")
                .desired_rows(3)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
        let label = ui.label("Negative prompt");
        ui.add(
            egui::TextEdit::multiline(&mut form.negative_prompt)
                .hint_text("What to avoid, e.g. blurry, low quality")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
        ui.horizontal(|ui| {
            let label = ui.label("Style");
            let shown = if form.style.is_empty() {
                "None".to_owned()
            } else {
                form.style.clone()
            };
            egui::ComboBox::from_id_salt("canvas_style")
                .selected_text(shown)
                .width(170.0)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut form.style, String::new(), "None");
                    for s in styles {
                        ui.selectable_value(&mut form.style, s.name.clone(), &s.name)
                            .on_hover_text(style_hover(s));
                    }
                })
                .response
                .labelled_by(label.id);
        });
        if !form.style.is_empty() && !styles.iter().any(|s| s.name == form.style) {
            ui.label(weak(ui, "This style's file is gone; no style is applied."));
        }
        ui.add_space(4.0);
        ui.label(RichText::new(mode_text(cx, form)).strong());
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            let ready = cx.model.is_some() && !cx.generating;
            let why = if cx.model.is_none() {
                if cx.model_loading {
                    "The model is loading"
                } else {
                    "Open a Stable Diffusion model first"
                }
            } else {
                "An image is being generated"
            };
            if ui
                .add_enabled(ready, egui::Button::new(RichText::new("Generate").strong()))
                .on_hover_text("Generate (Ctrl+Enter)")
                .on_disabled_hover_text(why)
                .clicked()
            {
                push(commands, CanvasCommand::Generate);
            }
            if cx.generating
                && ui
                    .button("Cancel")
                    .on_hover_text("Stop generating (Esc)")
                    .clicked()
            {
                push(commands, CanvasCommand::Cancel);
            }
        });
        Self::upscale_row(ui, form, cx, commands);
        if let Some((fraction, text)) = &cx.progress {
            ui.add(egui::ProgressBar::new(fraction.clamp(0.0, 1.0)).text(text.as_str()));
        }
        if let Some(seed) = cx.last_seed {
            ui.horizontal(|ui| {
                ui.label(weak(ui, &format!("Last seed: {seed}")));
                if ui
                    .small_button("Reuse seed")
                    .on_hover_text("Fix the seed to this one (untick Random)")
                    .clicked()
                {
                    push(commands, CanvasCommand::ReuseSeed(seed));
                }
            });
        }
        ui.add_space(4.0);
        egui::Grid::new("canvas_form_grid")
            .num_columns(2)
            .spacing([8.0, 6.0])
            .show(ui, |ui| {
                let l = ui.label("Sampler");
                egui::ComboBox::from_id_salt("canvas_sampler")
                    .selected_text(form.sampler.name())
                    .show_ui(ui, |ui| {
                        for s in SamplerKind::ALL {
                            ui.selectable_value(&mut form.sampler, s, s.name());
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Schedule");
                ui.add_enabled_ui(form.sampler.uses_schedule(), |ui| {
                    egui::ComboBox::from_id_salt("canvas_schedule")
                        .selected_text(form.schedule.name())
                        .show_ui(ui, |ui| {
                            for s in ScheduleKind::ALL {
                                ui.selectable_value(&mut form.schedule, s, s.name());
                            }
                        })
                        .response
                        .labelled_by(l.id)
                        .on_disabled_hover_text("This sampler has a fixed timestep table");
                });
                ui.end_row();
                let l = ui.label("Steps");
                ui.add(egui::DragValue::new(&mut form.steps).range(1..=150))
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("CFG scale");
                ui.add(egui::Slider::new(&mut form.cfg_scale, 0.0..=20.0).step_by(0.5))
                    .labelled_by(l.id)
                    .on_hover_text(
                        "How closely to follow the prompt; 1 or less skips the negative prompt \
                         (Turbo/LCM models want 1)",
                    );
                ui.end_row();
                let l = ui.label("Seed");
                ui.horizontal(|ui| {
                    ui.add_enabled(
                        !form.random_seed,
                        egui::DragValue::new(&mut form.seed).speed(1.0),
                    )
                    .labelled_by(l.id)
                    .on_disabled_hover_text(
                        "Random: a new seed each time (untick Random to fix it)",
                    );
                    ui.checkbox(&mut form.random_seed, "Random")
                        .on_hover_text("Draw a new seed for every Generate");
                });
                ui.end_row();
                let l = ui.label("Variation seed");
                ui.horizontal(|ui| {
                    ui.add(egui::DragValue::new(&mut form.variation_seed).speed(1.0))
                        .labelled_by(l.id)
                        .on_hover_text("Another seed whose noise this image moves towards");
                    let s = ui.label("Strength");
                    ui.add(
                        egui::Slider::new(&mut form.variation_strength, 0.0..=1.0)
                            .step_by(0.01),
                    )
                    .labelled_by(s.id)
                    .on_hover_text(
                        "0: the seed's own image; small values give variations of it; 1: the \
                         variation seed's image",
                    );
                });
                ui.end_row();
                let l = ui.label("Noise");
                egui::ComboBox::from_id_salt("canvas_noise_source")
                    .selected_text(form.noise_source.label())
                    .show_ui(ui, |ui| {
                        for n in NoiseSource::ALL {
                            ui.selectable_value(&mut form.noise_source, n, n.label());
                        }
                    })
                    .response
                    .labelled_by(l.id)
                    .on_hover_text(
                        "PyTorch CPU draws the noise ComfyUI and the SD web UI (RNG source \
                         \"CPU\") draw for a seed; PyTorch CUDA the noise of the web UI's \
                         default \"NV\" source (an NVIDIA GPU's), computed here on any device. \
                         Same seed, sampler, steps and model: the same image",
                    );
                ui.end_row();
                self.size_rows(ui, form, cx);
                let l = ui.label("Batch count");
                ui.add(egui::DragValue::new(&mut form.batch_count).range(1..=16))
                    .labelled_by(l.id)
                    .on_hover_text("Images made one after another, seeds counting up");
                ui.end_row();
                let l = ui.label("Hires fix");
                ui.add_enabled_ui(cx.mode == ModeKind::Txt2Img, |ui| {
                    // Wrapped, so the row is no wider than the form (the form's text wraps at
                    // its widest row).
                    ui.horizontal_wrapped(|ui| {
                        ui.checkbox(&mut form.hires, "")
                            .labelled_by(l.id)
                            .on_hover_text(
                                "Generate at the size above, enlarge, then refine at the larger \
                                 size with the same seed",
                            );
                        ui.add_enabled_ui(form.hires, |ui| {
                            ui.add(
                                egui::DragValue::new(&mut form.hires_scale)
                                    .range(1.0..=4.0)
                                    .speed(0.05)
                                    .prefix("×"),
                            )
                            .on_hover_text("The final size over the first pass's");
                            ui.add(
                                egui::DragValue::new(&mut form.hires_steps)
                                    .range(0..=150)
                                    .prefix("steps "),
                            )
                            .on_hover_text("Second-pass steps (0: the same as Steps)");
                            ui.add(
                                egui::DragValue::new(&mut form.hires_denoise)
                                    .range(0.0..=1.0)
                                    .speed(0.01)
                                    .prefix("denoise "),
                            )
                            .on_hover_text("How much the second pass redraws");
                            Self::hires_upscaler_ui(ui, form);
                        });
                    });
                })
                .response
                .on_disabled_hover_text("Only for txt2img");
                ui.end_row();
                let l = ui.label("Denoising strength");
                ui.add_enabled(
                    cx.mode != ModeKind::Txt2Img,
                    egui::Slider::new(&mut form.strength, 0.0..=1.0).step_by(0.01),
                )
                .labelled_by(l.id)
                .on_hover_text("How much of the image is redrawn (1 = all of it)")
                .on_disabled_hover_text("Only for img2img and inpainting");
                ui.end_row();
                ui.label("Refiner");
                Self::refiner_row(ui, form, commands);
                ui.end_row();
                let l = ui.label("Mask blur");
                ui.add(egui::Slider::new(&mut form.mask_blur, 0.0..=32.0).step_by(1.0))
                    .labelled_by(l.id)
                    .on_hover_text("Softens the mask edge, in pixels");
                ui.end_row();
                let inpainting = cx.mode == ModeKind::Inpaint;
                let l = ui.label("Inpaint area");
                ui.add_enabled_ui(inpainting, |ui| {
                    ui.horizontal(|ui| {
                        egui::ComboBox::from_id_salt("canvas_inpaint_area")
                            .selected_text(form.inpaint_area.name())
                            .show_ui(ui, |ui| {
                                for a in InpaintArea::ALL {
                                    ui.selectable_value(&mut form.inpaint_area, a, a.name());
                                }
                            })
                            .response
                            .labelled_by(l.id)
                            .on_hover_text(
                                "Only masked: the masked region and some context around it are \
                                 repainted at the model's full size, then pasted back",
                            );
                        if form.inpaint_area == InpaintArea::OnlyMasked {
                            let p = ui.label("Padding");
                            ui.add(
                                egui::DragValue::new(&mut form.inpaint_padding)
                                    .range(0..=256)
                                    .suffix(" px"),
                            )
                            .labelled_by(p.id)
                            .on_hover_text("Context around the mask, in pixels");
                        }
                    });
                })
                .response
                .on_disabled_hover_text("Only for inpainting");
                ui.end_row();
                let l = ui.label("Masked content");
                ui.add_enabled_ui(inpainting, |ui| {
                    egui::ComboBox::from_id_salt("canvas_masked_content")
                        .selected_text(form.masked_content.name())
                        .show_ui(ui, |ui| {
                            for c in MaskedContent::ALL {
                                ui.selectable_value(&mut form.masked_content, c, c.name());
                            }
                        })
                        .response
                        .labelled_by(l.id)
                        .on_hover_text(
                            "What the masked area starts from: the image, its surrounding \
                             colours (fill), noise or nothing (the latent ones want a strength \
                             near 1)",
                        );
                })
                .response
                .on_disabled_hover_text("Only for inpainting");
                ui.end_row();
                let l = ui.label("Preview");
                let taesd = cx.model.is_some_and(|m| m.taesd);
                egui::ComboBox::from_id_salt("canvas_preview")
                    .selected_text(preview_label(form.preview))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(
                            &mut form.preview,
                            PreviewMethod::Latent2Rgb,
                            preview_label(PreviewMethod::Latent2Rgb),
                        );
                        ui.add_enabled_ui(taesd, |ui| {
                            ui.selectable_value(
                                &mut form.preview,
                                PreviewMethod::Taesd,
                                preview_label(PreviewMethod::Taesd),
                            )
                            .on_disabled_hover_text(
                                "Choose a TAESD decoder file in Model and load the model again",
                            );
                        });
                        ui.selectable_value(
                            &mut form.preview,
                            PreviewMethod::None,
                            preview_label(PreviewMethod::None),
                        );
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();
            });
        if form.preview == PreviewMethod::Taesd && !cx.model.is_some_and(|m| m.taesd) {
            ui.label(weak(
                ui,
                "No TAESD decoder loaded: the fast preview is used.",
            ));
        }
    }

    /// The SDXL refiner: on/off, its file, and the switch point.
    fn refiner_row(ui: &mut egui::Ui, form: &mut FormValues, commands: &mut Vec<Command>) {
        ui.horizontal(|ui| {
            ui.add_enabled(
                form.refiner.is_some(),
                egui::Checkbox::without_text(&mut form.use_refiner),
            )
            .on_hover_text("A second model takes over for the last steps (SDXL's refiner)")
            .on_disabled_hover_text("Choose a refiner model first");
            let name = form
                .refiner
                .as_ref()
                .map_or_else(|| "none".to_owned(), |p| super::file_name(p));
            ui.label(name);
            for (label, folder) in [("File…", false), ("Folder…", true)] {
                if ui.small_button(label).clicked() {
                    commands.push(CanvasCommand::ChooseRefinerDialog { folder }.into());
                }
            }
            ui.add_enabled(
                form.use_refiner,
                egui::DragValue::new(&mut form.refiner_switch_at)
                    .range(0.0..=1.0)
                    .speed(0.01)
                    .prefix("switch at "),
            )
            .on_hover_text("The share of the steps after which the refiner takes over");
        });
    }

    /// How the hires fix enlarges: Lanczos, a latent mode, or the upscaler file.
    fn hires_upscaler_ui(ui: &mut egui::Ui, form: &mut FormValues) {
        let current = match (form.hires_latent, form.hires_with_upscaler) {
            (Some(mode), _) => mode.name().to_owned(),
            (None, true) => "upscaler file".to_owned(),
            (None, false) => "Lanczos".to_owned(),
        };
        egui::ComboBox::from_id_salt("hires_upscaler")
            .selected_text(current)
            .show_ui(ui, |ui| {
                if ui.selectable_label(false, "Lanczos").clicked() {
                    (form.hires_latent, form.hires_with_upscaler) = (None, false);
                }
                for mode in LatentUpscale::ALL {
                    if ui
                        .selectable_label(form.hires_latent == Some(mode), mode.name())
                        .on_hover_text("Enlarge the latents: no decode, use denoise 0.5 or more")
                        .clicked()
                    {
                        (form.hires_latent, form.hires_with_upscaler) = (Some(mode), false);
                    }
                }
                if ui
                    .add_enabled(
                        form.upscaler.is_some(),
                        egui::Button::selectable(false, "upscaler file"),
                    )
                    .on_hover_text("The upscaler chosen below")
                    .on_disabled_hover_text("Choose an upscaler file below first")
                    .clicked()
                {
                    (form.hires_latent, form.hires_with_upscaler) = (None, true);
                }
            })
            .response
            .on_hover_text("How the first pass's image is enlarged");
    }

    /// The upscaler, its factor and *Upscale*.
    fn upscale_row(
        ui: &mut egui::Ui,
        form: &mut FormValues,
        cx: &FormContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        ui.horizontal_wrapped(|ui| {
            let name = form
                .upscaler
                .as_ref()
                .and_then(|p| p.file_stem())
                .map_or_else(|| "none".to_owned(), |n| n.to_string_lossy().into_owned());
            ui.label(format!("Upscaler: {name}"))
                .on_hover_text(
                    "An ESRGAN / Real-ESRGAN (RRDBNet) or SwinIR file, .safetensors or .pth",
                );
            if let Some(p) = super::control::model_menu(
                ui,
                "upscaler_models",
                cx.upscaler_dirs,
                &["safetensors", "pth", "pt"],
            ) {
                commands.push(CanvasCommand::SetUpscaler(p).into());
            }
            if ui.small_button("Choose…").clicked() {
                commands.push(CanvasCommand::ChooseUpscalerDialog.into());
            }
            let l = ui.label("by");
            ui.add(
                egui::DragValue::new(&mut form.upscale_by)
                    .range(1.0..=8.0)
                    .speed(0.05)
                    .prefix("×"),
            )
            .labelled_by(l.id);
            let ready = form.upscaler.is_some() && cx.has_image && !cx.generating;
            let why = if form.upscaler.is_none() {
                "Choose an upscaler file first"
            } else if !cx.has_image {
                "Open or generate an image first"
            } else {
                "An image is being generated"
            };
            if ui
                .add_enabled(ready, egui::Button::new("Upscale"))
                .on_hover_text("Upscale the selected result, or the canvas image")
                .on_disabled_hover_text(why)
                .clicked()
            {
                commands.push(CanvasCommand::Upscale.into());
            }
        });
    }

    fn size_rows(&mut self, ui: &mut egui::Ui, form: &mut FormValues, cx: &FormContext<'_>) {
        let m = cx.model.map_or(8, |m| m.size_multiple).max(1);
        let kind = cx.model.map_or("the model", |m| m.kind.label());
        let editable = cx.canvas_size.is_none();
        for (name, value) in [("Width", &mut form.width), ("Height", &mut form.height)] {
            let l = ui.label(name);
            let response = ui
                .add_enabled(
                    editable,
                    egui::DragValue::new(value)
                        .range(m..=4096)
                        .speed(f64::from(m))
                        .suffix(" px"),
                )
                .labelled_by(l.id)
                .on_disabled_hover_text(
                    "Edits keep the canvas's size; use Extend to grow it, Clear to start over",
                );
            let settled = response.lost_focus() || response.drag_stopped() || !response.has_focus();
            if settled && *value % m != 0 {
                let snapped = snap(*value, m);
                self.snap_note = Some(format!(
                    "{name} {} was snapped to {snapped}: sizes are multiples of {m} for {kind}",
                    *value
                ));
                *value = snapped;
            }
            ui.end_row();
        }
        if let Some(note) = &self.snap_note {
            ui.label("");
            ui.add(egui::Label::new(weak(ui, note)).wrap());
            ui.end_row();
        }
    }
}

fn style_hover(s: &Style) -> String {
    let mut text = format!("Prompt: {}", s.prompt);
    if !s.negative_prompt.is_empty() {
        text.push_str("\nNegative: ");
        text.push_str(&s.negative_prompt);
    }
    text
}

pub fn preview_label(p: PreviewMethod) -> &'static str {
    match p {
        PreviewMethod::Latent2Rgb => "Fast (latent2rgb)",
        PreviewMethod::Taesd => "TAESD",
        PreviewMethod::None => "None",
    }
}

fn mode_text(cx: &FormContext<'_>, form: &FormValues) -> String {
    let m = cx.model.map_or(8, |m| m.size_multiple);
    match (cx.mode, cx.canvas_size) {
        (ModeKind::Txt2Img, _) if form.hires => {
            let (w, h) = (snap(form.width, m), snap(form.height, m));
            let (tw, th) =
                studio_inference::diffusion::hires::target_size(w, h, f64::from(form.hires_scale), m)
                    .unwrap_or((w, h));
            format!("Mode: txt2img, a new {w}x{h} image, then {tw}x{th} (hires fix)")
        }
        (ModeKind::Txt2Img, _) => format!(
            "Mode: txt2img, a new {}x{} image",
            snap(form.width, m),
            snap(form.height, m)
        ),
        (ModeKind::Img2Img, Some((w, h))) => format!(
            "Mode: img2img, the whole {w}x{h} image at strength {:.2}",
            form.strength
        ),
        (ModeKind::Inpaint, Some((w, h))) if form.inpaint_area == InpaintArea::OnlyMasked => {
            let (mw, mh) = cx.model.map_or((512, 512), |m| m.default_size);
            format!(
                "Mode: inpaint, only the masked area of the {w}x{h} image, repainted at {mw}x{mh}"
            )
        }
        (ModeKind::Inpaint, Some((w, h))) => {
            format!("Mode: inpaint, the masked area of the {w}x{h} image")
        }
        (mode, None) => format!("Mode: {}", mode.label()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::document::Tool;
    use super::*;
    use studio_inference::diffusion::imaging::RgbImage;

    #[test]
    fn styles_replace_the_placeholder_or_append() {
        let s = Style {
            name: "a".into(),
            prompt: "photo of {prompt}, 35mm".into(),
            negative_prompt: "cartoon".into(),
        };
        assert_eq!(
            apply_style(Some(&s), "a cat", "blurry"),
            ("photo of a cat, 35mm".into(), "blurry, cartoon".into())
        );
        let s = Style {
            name: "b".into(),
            prompt: "watercolor".into(),
            negative_prompt: String::new(),
        };
        assert_eq!(
            apply_style(Some(&s), "a cat", ""),
            ("a cat, watercolor".into(), String::new())
        );
        assert_eq!(
            apply_style(Some(&s), "", "x"),
            ("watercolor".into(), "x".into())
        );
        assert_eq!(apply_style(None, "p", "n"), ("p".into(), "n".into()));
    }

    #[test]
    fn sizes_snap_to_the_nearest_multiple() {
        assert_eq!(snap(500, 8), 504);
        assert_eq!(snap(3, 8), 8);
        assert_eq!(snap(512, 64), 512);
        assert_eq!(snap(540, 64), 512);
    }

    #[test]
    fn parameters_from_another_tool_fill_the_form() {
        let p = GenerationParameters::parse(
            "a cat\nNegative prompt: ugly\nSteps: 12, Sampler: DPM++ 2M Karras, CFG scale: 5.5, \
             Seed: 42, Size: 640x448",
        );
        let mut f = FormValues::default();
        let set = restore_parameters(&mut f, &p);
        assert_eq!(f.prompt, "a cat");
        assert_eq!(f.negative_prompt, "ugly");
        assert_eq!((f.steps, f.seed, f.random_seed), (12, 42, false));
        assert_eq!(f.sampler, SamplerKind::DpmPp2M);
        assert_eq!(f.schedule, ScheduleKind::Karras);
        assert!((f.cfg_scale - 5.5).abs() < 1e-6);
        assert_eq!((f.width, f.height), (640, 448));
        assert!(set.contains(&"seed") && set.contains(&"size"));
        assert_eq!(f.noise_source, NoiseSource::Studio, "no RNG field: unchanged");
        assert!(f.variation_strength.abs() < f32::EPSILON);
    }

    #[test]
    fn the_noise_source_and_variation_seed_come_back_and_reach_the_request() {
        let p = GenerationParameters::parse(
            "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Variation seed: 9, \
             Variation seed strength: 0.25, Size: 512x512, RNG: CPU",
        );
        let mut f = FormValues::default();
        let set = restore_parameters(&mut f, &p);
        assert!(set.contains(&"noise source") && set.contains(&"variation seed"));
        assert_eq!(f.noise_source, NoiseSource::TorchCpu);
        assert_eq!(f.variation_seed, 9);
        assert!((f.variation_strength - 0.25).abs() < 1e-6);
        let model = test_model();
        let req = build_request(&f, &[], &Document::default(), &model);
        assert_eq!(req.noise_source, NoiseSource::TorchCpu);
        assert_eq!(
            req.variation,
            Some(Variation {
                seed: 9,
                strength: 0.25
            })
        );
        // An image of Studio's own without the field used Studio's noise; a strength of 0 is off.
        let p = GenerationParameters::parse("a cat\nSteps: 20, Seed: 5, Version: studio-0.1.0");
        restore_parameters(&mut f, &p);
        assert_eq!(f.noise_source, NoiseSource::Studio);
        let req = build_request(&f, &[], &Document::default(), &model);
        assert_eq!(req.variation, None);
    }

    #[test]
    fn the_hires_fix_comes_back_and_reaches_txt2img_requests() {
        let p = GenerationParameters::parse(
            "a cat\nSteps: 20, Seed: 5, Size: 512x512, Denoising strength: 0.45, \
             Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Lanczos",
        );
        let mut f = FormValues::default();
        let set = restore_parameters(&mut f, &p);
        assert!(set.contains(&"hires fix"));
        assert!(f.hires && !f.hires_with_upscaler);
        assert!((f.hires_scale - 1.5).abs() < 1e-6 && (f.hires_denoise - 0.45).abs() < 1e-6);
        assert_eq!(f.hires_steps, 12);
        let req = build_request(&f, &[], &Document::default(), &test_model());
        assert_eq!(
            req.hires,
            Some(HiresFix {
                scale: 1.5,
                upscaler: HiresUpscaler::Lanczos,
                steps: 12,
                denoising: f64::from(0.45f32),
            })
        );
        // A latent upscaler comes back as that mode.
        let p = GenerationParameters::parse(
            "a cat\nSteps: 20, Hires upscale: 2, Hires upscaler: Latent (bicubic antialiased)",
        );
        restore_parameters(&mut f, &p);
        let req = build_request(&f, &[], &Document::default(), &test_model());
        assert_eq!(
            req.hires.map(|h| h.upscaler),
            Some(HiresUpscaler::Latent(LatentUpscale::BicubicAntialiased))
        );
        // Parameters without it turn it off.
        restore_parameters(&mut f, &GenerationParameters::parse("a cat\nSteps: 20"));
        assert!(!f.hires);
    }

    #[test]
    fn only_masked_inpainting_comes_back_and_works_at_the_models_size() {
        let p = GenerationParameters::parse(
            "a cat\nSteps: 20, Seed: 5, Mask blur: 4, Masked content: latent noise, \
             Inpaint area: Only masked, Masked area padding: 48",
        );
        let mut f = FormValues::default();
        restore_parameters(&mut f, &p);
        assert_eq!(f.inpaint_area, InpaintArea::OnlyMasked);
        assert_eq!(f.inpaint_padding, 48);
        assert_eq!(f.masked_content, MaskedContent::LatentNoise);
        let mut doc = Document::default();
        doc.set_image(RgbImage::new_filled(200, 120, [9, 9, 9]));
        assert!(doc.paint((50.0, 50.0), (60.0, 50.0), Tool::Brush, 8.0, 1.0));
        assert_eq!(doc.mode(), ModeKind::Inpaint);
        let mut model = test_model();
        model.default_size = (64, 64);
        let req = build_request(&f, &[], &doc, &model);
        assert!(matches!(req.mode, ImageMode::Inpaint { .. }));
        assert_eq!((req.width, req.height), (64, 64));
        assert_eq!(
            req.inpaint,
            InpaintOptions {
                area: InpaintArea::OnlyMasked,
                padding: 48,
                content: MaskedContent::LatentNoise
            }
        );
        assert_eq!(req.hires, None, "the hires fix is for txt2img");
        // The whole picture works at the image's size.
        f.inpaint_area = InpaintArea::WholePicture;
        let req = build_request(&f, &[], &doc, &model);
        assert_eq!((req.width, req.height), (200, 120));
    }

    fn test_model() -> ImageModelInfo {
        ImageModelInfo {
            name: "m".into(),
            path: "m".into(),
            kind: studio_inference::diffusion::model::SdKind::Sd1,
            layout: studio_inference::diffusion::model::Layout::Diffusers,
            inpainting: false,
            prediction: studio_inference::diffusion::samplers::Prediction::Epsilon,
            few_step: false,
            default_size: (512, 512),
            size_multiple: 8,
            taesd: false,
            notes: Vec::new(),
            loras: Vec::new(),
        }
    }

    #[test]
    fn shipped_styles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets/styles");
        let (styles, errors) = load_styles(Some(&dir));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(styles.len() >= 4, "{styles:?}");
    }
}
