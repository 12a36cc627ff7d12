//! The image subcommands (a contract, like the rest of the CLI):
//!
//! - `studio txt2img --model PATH --prompt TEXT [--negative TEXT] [--steps N] [--cfg X]
//!   [--seed S] [--sampler NAME] [--width W --height H] [--preview latent2rgb|taesd|none]
//!   [--previews-dir DIR] --out FILE.png`
//! - `studio img2img … --init IN.png --strength S`
//! - `studio inpaint … --init IN.png --mask MASK.png` (white = repaint) `[--inpaint-area
//!   whole|masked] [--padding PX] [--masked-content original|fill|latent-noise|latent-nothing]`
//!
//! Also: `--schedule normal|karras|exponential`, `--batch-count N` (files `OUT`, `OUT-2`, …),
//! `--clip-skip N`, `--mask-blur PX`, `--vae FILE`, `--taesd FILE`, `--device`, `--threads`,
//! `--noise-source studio|cpu` (`cpu`: PyTorch's CPU generator, which reproduces ComfyUI's and
//! the SD web UI's "CPU" noise for a seed), `--variation-seed S --variation-strength X` (the web
//! UI's variation seed), `--hires-scale X [--hires-upscaler lanczos|ESRGAN.safetensors]
//! [--hires-steps N] [--hires-denoise S]` (txt2img's two-pass hires fix).
//! The sampler takes the web UI's names ("Euler a", "DPM++ 2M Karras", …). The PNG carries the
//! `parameters` text other SD tools read. With `--previews-dir`, each step's preview is written
//! as `step-001.png`, … Progress goes to stderr; one line per saved image to stdout.
//!
//! `studio upscale --model M --in IN --out OUT [--scale S] [--tile PX]` runs an ESRGAN /
//! Real-ESRGAN (RRDBNet) or SwinIR upscaler in tiles; `--scale` other than the model's resizes its result
//! (Lanczos), as the SD web UI's "Upscale by" does. The input's `parameters` are kept, with
//! `Postprocess upscaler` and `Postprocess upscale by` added.
//!
//! `studio bench sd [--size 256,512] [--steps N] [--json]` times an SD-1.5-shaped random-weight
//! UNet step (with CFG), the VAE decode and each preview method.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use studio_inference::diffusion::annotators::Preprocessor;
use studio_inference::diffusion::controlnet::{ControlNet, ControlUnit};
use studio_inference::diffusion::hires::{HiresFix, HiresUpscaler, LatentUpscale};
use studio_inference::diffusion::imaging::{self, RgbImage, decode_image_file, mask_from_image};
use studio_inference::diffusion::inpaint::{InpaintArea, InpaintOptions, MaskedContent};
use studio_inference::diffusion::lora::LoraSpec;
use studio_inference::diffusion::model::{self, ImageModelOptions, SdModel};
use studio_inference::diffusion::noise::{NoiseSource, Variation};
use studio_inference::diffusion::pipeline::{
    ImageMode, ImageRequest, PreviewMethod, generate_with_refiner,
};
use studio_inference::diffusion::samplers::{SamplerKind, ScheduleKind};
use studio_inference::nn::Storage;

use super::common::open_device;

/// Flags shared by `txt2img`, `img2img` and `inpaint`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Stable Diffusion model: a single `.safetensors` checkpoint or a diffusers folder
    /// (default: the bundled demo model).
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        value_parser = crate::cli::values::model_path()
    )]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Denoising steps (default 20, or 4 for few-step models such as SD-Turbo and LCM).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less skips the negative prompt pass (default 7; 1
    /// for few-step models; 4 for the bundled demo model, its card's best).
    #[arg(long, value_parser = crate::cli::values::guidance)]
    pub cfg: Option<f64>,
    /// Seed (random when left out; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampler, as the SD web UI names it: Euler, "Euler a", DDIM, "DPM++ 2M",
    /// "DPM++ 2M Karras", UniPC, LCM.
    #[arg(long, default_value = "Euler a")]
    pub sampler: String,
    /// Noise schedule: normal, karras, exponential (a sampler name ending in Karras sets it).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Width in pixels (default: the model's training size, or the init image's).
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long, default_value_t = 1)]
    pub batch_count: u32,
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Where a seed's noise comes from: studio, cpu (PyTorch's CPU generator: the noise of
    /// ComfyUI and of the SD web UI's "CPU" RNG source) or nv (PyTorch's CUDA generator,
    /// computed on the CPU: the SD web UI's "NV" source, its default on NVIDIA GPUs).
    #[arg(long, default_value = "studio")]
    pub noise_source: String,
    /// A variation seed: the noise moves towards this seed's by --variation-strength.
    #[arg(long)]
    pub variation_seed: Option<u64>,
    /// How far towards the variation seed's noise (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::cli::values::fraction)]
    pub variation_strength: f64,
    /// txt2img: the hires fix, a second pass at this many times the size (1 to 4).
    #[arg(long, value_parser = crate::cli::values::hires_scale)]
    pub hires_scale: Option<f64>,
    /// The hires fix's upscaler: lanczos, a latent mode as the SD web UI names them ("Latent",
    /// "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent
    /// (nearest)", "Latent (nearest-exact)"), or an ESRGAN / Real-ESRGAN or SwinIR file.
    #[arg(long, default_value = "lanczos")]
    pub hires_upscaler: String,
    /// The hires fix's steps (0: the same as --steps).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=500))]
    pub hires_steps: u32,
    /// The hires fix's denoising strength.
    #[arg(long, default_value_t = 0.7, value_parser = crate::cli::values::fraction)]
    pub hires_denoise: f64,
    /// Per-step preview: latent2rgb, taesd (needs --taesd) or none.
    #[arg(long, default_value = "latent2rgb")]
    pub preview: String,
    /// Write each step's preview here as step-NNN.png.
    #[arg(long)]
    pub previews_dir: Option<PathBuf>,
    /// A separate VAE file.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// A TAESD decoder (file or folder) for --preview taesd.
    #[arg(long)]
    pub taesd: Option<PathBuf>,
    /// A folder of textual-inversion embeddings (`.safetensors`, `.pt`); each is used where
    /// its file name (without extension) appears as a word in the prompt.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// A LoRA / LyCORIS file merged in: `FILE`, `FILE:WEIGHT` or `FILE:UNET:TEXT` (weights of
    /// its UNet and text-encoder parts; default 1). Repeat for several.
    #[arg(long)]
    pub lora: Vec<String>,
    /// A ControlNet (diffusers folder or single file, diffusers or original names). Repeat
    /// for several units; the other `--control-*` flags are matched to them in order.
    #[arg(long)]
    pub controlnet: Vec<PathBuf>,
    /// The control image of each --controlnet (resized to the output's size, with a note).
    #[arg(long)]
    pub control_image: Vec<PathBuf>,
    /// Each unit's weight, 0 to 2 (default 1).
    #[arg(long, value_parser = crate::cli::values::control_weight)]
    pub control_weight: Vec<f64>,
    /// Each unit's preprocessor: none (the image is the control map), canny, scribble_xdog or
    /// invert (a dark scribble on white).
    #[arg(long)]
    pub control_preprocess: Vec<String>,
    /// Each unit's start, as a share of the steps (default 0).
    #[arg(long, value_parser = crate::cli::values::fraction)]
    pub control_start: Vec<f64>,
    /// Each unit's end, as a share of the steps (default 1).
    #[arg(long, value_parser = crate::cli::values::fraction)]
    pub control_end: Vec<f64>,
    /// An SDXL refiner (file or folder) that takes over after --refiner-switch-at of the
    /// steps, as the SD web UI's "Refiner".
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// The share of the steps after which the refiner takes over (0 to 1).
    #[arg(long, default_value_t = 0.8, value_parser = crate::cli::values::fraction)]
    pub refiner_switch_at: f64,
    /// Guess mode for every unit ("ControlNet is more important"): it guides the prompt's
    /// pass only, so it works even with an empty prompt.
    #[arg(long)]
    pub control_guess_mode: bool,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The starting image.
    #[arg(long)]
    pub init: PathBuf,
    /// Denoising strength: runs the last int(strength·steps) steps.
    #[arg(long, default_value_t = 0.75, value_parser = crate::cli::values::fraction)]
    pub strength: f64,
}

#[derive(Debug, Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The image to repaint part of.
    #[arg(long)]
    pub init: PathBuf,
    /// The mask: white = repaint, black = keep (resized to the image when it differs).
    #[arg(long)]
    pub mask: PathBuf,
    #[arg(long, default_value_t = 1.0, value_parser = crate::cli::values::fraction)]
    pub strength: f64,
    /// Blur of the mask edge in pixels.
    #[arg(long, default_value_t = 4.0, value_parser = crate::cli::values::blur_px)]
    pub mask_blur: f32,
    /// Inpaint area: whole (the whole picture) or masked (only the masked region plus
    /// --padding, worked on at --width × --height, default the model's size, and pasted back).
    #[arg(long, default_value = "whole")]
    pub inpaint_area: String,
    /// Only masked: pixels of context around the mask.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub padding: u32,
    /// What the masked area starts from: original, fill, latent-noise, latent-nothing.
    #[arg(long, default_value = "original")]
    pub masked_content: String,
}

#[derive(Debug, Args)]
pub struct BenchSdArgs {
    /// Image sizes (square), comma separated.
    #[arg(long, default_value = "256,512", value_delimiter = ',')]
    pub size: Vec<u32>,
    /// Timed UNet steps per size (after one warm-up).
    #[arg(long, default_value_t = 3, value_parser = crate::cli::values::rounds)]
    pub steps: usize,
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// How the CPU kernels store the weights: f32 (as PyTorch's fp32 peer computes), or f16 /
    /// bf16 (as a half-precision checkpoint's are kept; computed in f32 all the same).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub weights: String,
    #[arg(long)]
    pub json: bool,
}

/// `FILE[:WEIGHT[:TEXT_WEIGHT]]` (the weights are the trailing `:`-separated numbers).
fn parse_lora(s: &str) -> Result<LoraSpec> {
    let mut parts: Vec<&str> = s.split(':').collect();
    let mut weights = Vec::new();
    while parts.len() > 1 && weights.len() < 2 {
        let Some(w) = parts.last().and_then(|p| p.trim().parse::<f64>().ok()) else {
            break;
        };
        if !w.is_finite() || w.abs() > 10.0 {
            bail!("--lora {s}: a weight of {w}; use -10 to 10");
        }
        weights.insert(0, w);
        parts.pop();
    }
    let path = PathBuf::from(parts.join(":"));
    let unet = weights.first().copied().unwrap_or(1.0);
    Ok(LoraSpec {
        path,
        unet,
        text: weights.get(1).copied().unwrap_or(unet),
    })
}

fn load(args: &ImageArgs) -> Result<SdModel> {
    let choice = open_device(args.threads, &args.device)?;
    let options = ImageModelOptions {
        vae: args.vae.clone(),
        taesd: args.taesd.clone(),
        prediction: None,
        loras: args
            .lora
            .iter()
            .map(|s| parse_lora(s))
            .collect::<Result<_>>()?,
    };
    let mut last = -1;
    model::load(&args.model, &options, &choice.device, &mut |f, msg| {
        let pct = (f * 100.0) as i32;
        if pct / 10 != last / 10 {
            eprintln!("loading: {msg} ({pct}%)");
            last = pct;
        }
    })
    .with_context(|| format!("loading {}", args.model.display()))
    .inspect(|m| {
        for r in &m.info.loras {
            eprintln!(
                "LoRA {}: {} modules changed, {} ignored{}",
                r.name,
                r.applied,
                r.ignored,
                if r.ignored_examples.is_empty() {
                    String::new()
                } else {
                    format!(" (such as {})", r.ignored_examples.join(", "))
                }
            );
            if r.applied == 0 && r.ignored > 0 {
                eprintln!(
                    "warning: LoRA {} changes nothing in this {}: it is made for another base \
                     model",
                    r.name,
                    m.info.kind.label()
                );
            }
        }
    })
}

fn read_image(path: &Path) -> Result<RgbImage> {
    let decoded = decode_image_file(path).with_context(|| format!("reading {}", path.display()))?;
    if let Some((w, h)) = decoded.downscaled_from {
        eprintln!(
            "warning: {} is {w}x{h}; downscaled to {}x{}",
            path.display(),
            decoded.image.width,
            decoded.image.height
        );
    }
    Ok(decoded.image)
}

/// The image's size rounded down to the model's multiple.
fn snapped(img: &RgbImage, multiple: u32) -> (u32, u32) {
    let s = |v: u32| ((v / multiple) * multiple).max(multiple);
    (s(img.width), s(img.height))
}

fn request(
    args: &ImageArgs,
    m: &SdModel,
    mode: ImageMode,
    size: (u32, u32),
) -> Result<ImageRequest> {
    let Some((sampler, sched_from_name)) = SamplerKind::parse(&args.sampler) else {
        bail!(
            "unknown sampler `{}` (use one of: {})",
            args.sampler,
            SamplerKind::ALL.map(SamplerKind::name).join(", ")
        );
    };
    let schedule = match &args.schedule {
        Some(s) => ScheduleKind::parse(s).with_context(|| {
            format!("unknown schedule `{s}` (use normal, karras or exponential)")
        })?,
        None => sched_from_name.unwrap_or(ScheduleKind::Normal),
    };
    let Some(preview) = PreviewMethod::parse(&args.preview) else {
        bail!(
            "unknown preview `{}` (use latent2rgb, taesd or none)",
            args.preview
        );
    };
    if preview == PreviewMethod::Taesd && args.taesd.is_none() {
        bail!("--preview taesd needs --taesd FILE (the TAESD decoder's weights)");
    }
    let Some(noise_source) = NoiseSource::parse(&args.noise_source) else {
        bail!(
            "unknown noise source `{}` (use studio, cpu or nv)",
            args.noise_source
        );
    };
    let hires = match args.hires_scale {
        None => None,
        Some(_) if !matches!(mode, ImageMode::Txt2Img) => {
            bail!("--hires-scale is for txt2img (img2img and inpaint work at the image's size)")
        }
        Some(scale) => Some(HiresFix {
            scale,
            upscaler: if args.hires_upscaler.eq_ignore_ascii_case("lanczos") {
                HiresUpscaler::Lanczos
            } else if let Some(mode) = LatentUpscale::parse(&args.hires_upscaler) {
                HiresUpscaler::Latent(mode)
            } else {
                HiresUpscaler::Esrgan(PathBuf::from(&args.hires_upscaler))
            },
            steps: args.hires_steps as usize,
            denoising: args.hires_denoise,
        }),
    };
    let variation = match (args.variation_seed, args.variation_strength) {
        (Some(seed), strength) => Some(Variation { seed, strength }),
        (None, s) if s > 0.0 => bail!("--variation-strength needs --variation-seed"),
        (None, _) => None,
    };
    let width = args.width.unwrap_or(size.0);
    let height = args.height.unwrap_or(size.1);
    let control = control_units(args, m, (width, height))?;
    Ok(ImageRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        steps: args.steps.unwrap_or(if m.info.few_step { 4 } else { 20 }),
        cfg_scale: args.cfg.unwrap_or(if m.info.few_step {
            1.0
        } else if crate::bundled::model(crate::bundled::BundledKind::Image).as_ref()
            == Some(&args.model)
        {
            f64::from(crate::bundled::DEMO_IMAGE_CFG)
        } else {
            7.0
        }),
        seed: args.seed,
        sampler,
        schedule,
        width,
        height,
        batch_count: args.batch_count,
        noise_source,
        variation,
        inpaint: InpaintOptions::default(),
        hires,
        embeddings: match &args.embeddings {
            Some(dir) => studio_inference::diffusion::embeddings::list_dir(dir),
            None => Vec::new(),
        },
        clip_skip: args.clip_skip.max(1),
        preview: if args.previews_dir.is_some() {
            preview
        } else {
            PreviewMethod::None
        },
        mode,
        control,
        refiner_switch_at: args.refiner_switch_at,
    })
}

/// The `--controlnet` units, with their images read, preprocessed and (with a note on
/// stderr) resized to the output's size.
fn control_units(args: &ImageArgs, m: &SdModel, size: (u32, u32)) -> Result<Vec<ControlUnit>> {
    let n = args.controlnet.len();
    if args.control_image.len() != n {
        bail!(
            "{} --controlnet but {} --control-image: give one image per ControlNet",
            n,
            args.control_image.len()
        );
    }
    for (flag, count) in [
        ("--control-weight", args.control_weight.len()),
        ("--control-preprocess", args.control_preprocess.len()),
        ("--control-start", args.control_start.len()),
        ("--control-end", args.control_end.len()),
    ] {
        if count > n {
            bail!("{count} {flag} for {n} --controlnet");
        }
    }
    let mut units = Vec::with_capacity(n);
    for (i, path) in args.controlnet.iter().enumerate() {
        let net = ControlNet::load(path, &m.device)
            .with_context(|| format!("loading the ControlNet {}", path.display()))?;
        let image = read_image(&args.control_image[i])?;
        let module = match args.control_preprocess.get(i) {
            Some(s) => Preprocessor::parse(s).with_context(|| {
                format!("unknown preprocessor `{s}` (use none, canny, scribble_xdog or invert)")
            })?,
            None => Preprocessor::None,
        };
        let image = module.apply(&image);
        if (image.width, image.height) != size {
            eprintln!(
                "note: the control image {} is {}x{}; resized to {}x{}",
                args.control_image[i].display(),
                image.width,
                image.height,
                size.0,
                size.1
            );
        }
        units.push(ControlUnit {
            module: module.name().to_owned(),
            weight: args.control_weight.get(i).copied().unwrap_or(1.0),
            start: args.control_start.get(i).copied().unwrap_or(0.0),
            end: args.control_end.get(i).copied().unwrap_or(1.0),
            guess_mode: args.control_guess_mode,
            ..ControlUnit::new(std::sync::Arc::new(net), image)
        });
    }
    Ok(units)
}

/// `OUT` for the first image, `OUT-2.png`, … for the rest of a batch.
fn out_path(out: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy());
    out.with_file_name(format!("{stem}-{}.png", index + 1))
}

fn run(args: &ImageArgs, m: &SdModel, req: &ImageRequest) -> Result<()> {
    if let Some(dir) = &args.previews_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = Instant::now();
    let mut preview_count = 0usize;
    let mut preview_error = None;
    let refiner = match &args.refiner {
        Some(path) => {
            let choice = open_device(args.threads, &args.device)?;
            let r = model::load(
                path,
                &ImageModelOptions::default(),
                &choice.device,
                &mut |_, _| {},
            )
            .with_context(|| format!("loading the refiner {}", path.display()))?;
            eprintln!(
                "refiner: {} ({}) after {} of the steps",
                r.info.name,
                r.info.kind.label(),
                req.refiner_switch_at
            );
            Some(r)
        }
        None => None,
    };
    let outcome = generate_with_refiner(m, refiner.as_ref(), req, &mut |u| {
        eprintln!(
            "image {}/{}: step {}/{}",
            u.image + 1,
            u.images,
            u.step,
            u.steps
        );
        if let (Some(dir), Some(img)) = (&args.previews_dir, &u.preview) {
            preview_count += 1;
            let path = dir.join(format!("step-{preview_count:03}.png"));
            if let Err(e) = imaging::encode_png(img, None)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| crate::home::atomic_write(&path, &bytes))
            {
                preview_error = Some(format!("{}: {e}", path.display()));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = preview_error {
        bail!("writing a preview failed: {e}");
    }
    let secs = started.elapsed().as_secs_f64();
    for (i, img) in outcome.images.iter().enumerate() {
        let path = out_path(&args.out, i);
        let bytes = imaging::encode_png(&img.image, Some(&img.parameters.to_text()))?;
        crate::home::atomic_write(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "saved {} ({}x{}, seed {}, {} steps, {:.1} s)",
            path.display(),
            img.image.width,
            img.image.height,
            img.seed,
            req.steps,
            secs
        );
    }
    Ok(())
}

pub fn run_txt2img(args: &ImageArgs) -> Result<()> {
    let m = load(args)?;
    let size = m.info.default_size;
    let req = request(args, &m, ImageMode::Txt2Img, size)?;
    run(args, &m, &req)
}

pub fn run_img2img(args: &Img2ImgArgs) -> Result<()> {
    let init = read_image(&args.init)?;
    let m = load(&args.image)?;
    let size = snapped(&init, m.info.size_multiple);
    let mode = ImageMode::Img2Img {
        init,
        strength: args.strength,
    };
    let req = request(&args.image, &m, mode, size)?;
    run(&args.image, &m, &req)
}

pub fn run_inpaint(args: &InpaintArgs) -> Result<()> {
    let init = read_image(&args.init)?;
    let mask_img = read_image(&args.mask)?;
    let Some(area) = InpaintArea::parse(&args.inpaint_area) else {
        bail!(
            "unknown inpaint area `{}` (use whole or masked)",
            args.inpaint_area
        );
    };
    let Some(content) = MaskedContent::parse(&args.masked_content) else {
        bail!(
            "unknown masked content `{}` (use original, fill, latent-noise or latent-nothing)",
            args.masked_content
        );
    };
    let m = load(&args.image)?;
    // Only masked works at the model's size; the whole picture at the image's.
    let size = if area == InpaintArea::OnlyMasked {
        m.info.default_size
    } else {
        snapped(&init, m.info.size_multiple)
    };
    let mode = ImageMode::Inpaint {
        init,
        mask: mask_from_image(&mask_img),
        strength: args.strength,
        mask_blur: args.mask_blur,
    };
    let mut req = request(&args.image, &m, mode, size)?;
    req.inpaint = InpaintOptions {
        area,
        padding: args.padding,
        content,
    };
    run(&args.image, &m, &req)
}

pub fn run_bench_sd(args: &BenchSdArgs) -> Result<()> {
    if let Some(n) = args.threads {
        crate::set_cpu_threads(n);
    }
    if args.steps == 0 || args.size.is_empty() {
        bail!("--steps must be at least 1 and --size must list a size");
    }
    let weights = match args.weights.as_str() {
        "f16" => Storage::F16,
        "bf16" => Storage::Bf16,
        _ => Storage::F32,
    };
    let rows =
        studio_inference::diffusion::bench::run(&args.size, args.steps, weights, &mut |msg| {
            eprintln!("{msg}");
        })?;
    let threads = studio_inference::device::cpu_threads();
    if args.json {
        for r in &rows {
            println!(
                "{}",
                json!({
                    "size": r.size,
                    "threads": threads,
                    "weights": args.weights,
                    "unet_step_ms": r.unet_step_ms,
                    "vae_decode_ms": r.vae_decode_ms,
                    "latent2rgb_ms": r.latent2rgb_ms,
                    "taesd_ms": r.taesd_ms,
                    "peak_rss_mb": r.peak_rss_mb,
                })
            );
        }
    } else {
        println!(
            "SD-1.5-shaped random weights, {} weights on CPU, {threads} threads, median of {} runs",
            args.weights, args.steps
        );
        println!(
            "{:>6} {:>14} {:>14} {:>14} {:>12} {:>10}",
            "size", "UNet step ms", "VAE decode ms", "latent2rgb ms", "TAESD ms", "RSS MiB"
        );
        for r in &rows {
            println!(
                "{:>6} {:>14.1} {:>14.1} {:>14.3} {:>12.1} {:>10.0}",
                r.size, r.unet_step_ms, r.vae_decode_ms, r.latent2rgb_ms, r.taesd_ms, r.peak_rss_mb
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct UpscaleArgs {
    /// An ESRGAN / Real-ESRGAN (RRDBNet) or SwinIR upscaler: `.safetensors`, or a `.pth` read
    /// as data.
    #[arg(long, value_parser = crate::cli::values::model_path())]
    pub model: PathBuf,
    /// The image to upscale.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Output size over input size (default: the model's own scale).
    #[arg(long, value_parser = crate::cli::values::upscale_factor)]
    pub scale: Option<f64>,
    /// Tile side in input pixels (0: the whole image at once); each tile gets 16 pixels of
    /// context on every side.
    #[arg(long, default_value_t = 192, value_parser = clap::value_parser!(u32).range(0..=8192))]
    pub tile: u32,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
}

pub fn run_upscale(args: &UpscaleArgs) -> Result<()> {
    let decoded = decode_image_file(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    if let Some((w, h)) = decoded.downscaled_from {
        bail!(
            "{} is {w}x{h}, beyond what Studio opens without downscaling; upscaling a \
             downscaled copy would lose detail",
            args.input.display()
        );
    }
    let choice = open_device(args.threads, &args.device)?;
    let up = studio_inference::upscale::load(&args.model, &choice.device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let info = up.info().clone();
    eprintln!("upscaler: {}", info.describe());
    let started = Instant::now();
    let scale = args.scale.unwrap_or(f64::from(info.scale));
    let image = up
        .upscale_by(
            &decoded.image,
            scale,
            args.tile as usize,
            &mut |done, total| {
                eprintln!("tile {done}/{total}");
                ControlFlow::Continue(())
            },
        )
        .map_err(|e| anyhow::anyhow!("--scale {scale}: {e}"))?
        .context("stopped")?;
    let params = studio_inference::upscale::postprocess_parameters(
        decoded
            .parameters
            .as_deref()
            .map(studio_inference::image_meta::GenerationParameters::parse)
            .unwrap_or_default(),
        &info.name,
        scale,
    );
    let bytes = imaging::encode_png(&image, Some(&params.to_text()))?;
    crate::home::atomic_write(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "saved {} ({}x{}, x{scale} with {}, {:.1} s)",
        args.out.display(),
        image.width,
        image.height,
        info.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
