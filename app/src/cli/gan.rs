//! The GAN subcommands (a contract, like the rest of the CLI):
//!
//! - `studio gan --model PATH (--seed N | --z-file Z.npy | --w-file W.npy) [--psi X]
//!   [--trunc-cutoff N] [--class N] [--noise-mode const|random|none] [--noise-seed N]
//!   [--out-w W.npy] --out FILE.png` renders one image; the PNG carries a `parameters` text
//!   chunk describing the latent (`StyleGAN2 latent: seed 42; psi 0.7; …`, see
//!   [`LatentText`]). `--seed` may be fractional (`--seed 42.25` blends seeds 42 and 43 in W
//!   as NVIDIA's visualizer does). `--out-w` also saves the rendered `ws` as `.npy`.
//! - `studio gan-interp --model PATH --seeds 1,7,42 --frames N --out anim.gif [--space w|z]
//!   [--psi X] [--fps F] [--png-sequence]` renders an animation through the seeds (lerp in W,
//!   or slerp in Z with `--space z`); the first frame is the first seed and the last frame the
//!   last seed. Writes an animated GIF, or numbered PNGs (`frame-0001.png`, …) into a folder
//!   when `--out` is an existing folder, ends with `/`, or `--png-sequence` is given.
//! - `studio bench gan [--size 256,1024] [--frames N] [--threads N] [--json]` times mapping +
//!   synthesis of StyleGAN2 config-F-shaped random-weight generators, with the peak RSS and
//!   the kernels used (Studio's CPU path, or `candle`).
//!
//! Progress goes to stderr; one line per saved file to stdout. The model is a safetensors file
//! with NVIDIA's `G_ema` names (`tools/convert_stylegan_pkl.py` converts NVIDIA's `.pkl`).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use studio_inference::diffusion::imaging::{self, RgbImage};
use studio_inference::gan::dcgan::{Dcgan, is_dcgan};
use studio_inference::gan::latent::{
    self, GifWriter, Keyframe, LatentText, RandomGanConfig, Space,
};
use studio_inference::gan::perceptual;
use studio_inference::gan::project::{LossKind, ProjectConfig, project};
use studio_inference::gan::{NoiseMode, StyleGan2, npy};
use studio_inference::sys::AtomicFile;

use super::common::{median, open_device};

/// Flags shared by `gan` and `gan-interp`.
#[derive(Debug, Args)]
pub struct GanCommon {
    /// StyleGAN2 generator: a `.safetensors` file with NVIDIA's `G_ema` tensor names (default:
    /// the bundled demo GAN).
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        value_parser = crate::cli::values::model_path()
    )]
    pub model: PathBuf,
    /// Truncation ψ: 1 = none, 0 = the average image.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = crate::cli::values::psi)]
    pub psi: f64,
    /// Truncate only the first N W rows (default: all).
    #[arg(long)]
    pub trunc_cutoff: Option<usize>,
    /// Class of a class-conditional generator.
    #[arg(long)]
    pub class: Option<usize>,
    /// Per-layer noise: const (the network's stored noise), random (seeded by --noise-seed) or
    /// none.
    #[arg(long, default_value = "const")]
    pub noise_mode: String,
    /// Seed of `--noise-mode random`.
    #[arg(long, default_value_t = 0)]
    pub noise_seed: u64,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct GanArgs {
    #[command(flatten)]
    pub common: GanCommon,
    /// Seed (0 to 4294967295, NVIDIA's numbering); a fraction blends it with the next seed.
    #[arg(long)]
    pub seed: Option<String>,
    /// z from a NumPy file, shape (z_dim,) or (1, z_dim).
    #[arg(long)]
    pub z_file: Option<PathBuf>,
    /// ws from a NumPy file, shape (1, num_ws, w_dim), (num_ws, w_dim) or one (w_dim,) row;
    /// used as given (--psi and --class do not apply).
    #[arg(long)]
    pub w_file: Option<PathBuf>,
    /// Also save the rendered ws as a NumPy file.
    #[arg(long)]
    pub out_w: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct GanInterpArgs {
    #[command(flatten)]
    pub common: GanCommon,
    /// Keyframe seeds, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub seeds: Vec<u64>,
    /// Frames in the whole animation (first = first seed, last = last seed).
    #[arg(long, default_value_t = 60, value_parser = crate::cli::values::steps)]
    pub frames: usize,
    /// Interpolate in w (lerp) or z (slerp).
    #[arg(long, default_value = "w")]
    pub space: String,
    /// Frames per second of the GIF.
    #[arg(long, default_value_t = 25.0, value_parser = crate::cli::values::fps)]
    pub fps: f64,
    /// Write numbered PNGs into the folder `--out` instead of a GIF.
    #[arg(long)]
    pub png_sequence: bool,
    /// Output GIF, or folder for the PNG sequence.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct GanProjectArgs {
    #[command(flatten)]
    pub common: GanCommon,
    /// The photo to find in the generator's latent space (cropped to a centred square and
    /// resized to the model's resolution, with a note on stderr).
    #[arg(long)]
    pub image: PathBuf,
    /// Optimization steps (NVIDIA's projector uses 1000).
    #[arg(long, default_value_t = 1000, value_parser = crate::cli::values::steps)]
    pub steps: usize,
    /// Initial learning rate (NVIDIA's schedule: ramp up over 5%, down over the last 25%).
    #[arg(long, default_value_t = 0.1, value_parser = crate::cli::values::learning_rate)]
    pub lr: f64,
    /// Weight of the noise regularization.
    #[arg(long, default_value_t = 1e5, value_parser = crate::cli::values::weight)]
    pub noise_regularization: f64,
    /// Optimize one w per layer (W+) instead of one w for all.
    #[arg(long)]
    pub w_plus: bool,
    /// VGG16 weights in safetensors (`tools/convert_vgg16.py`) for the perceptual (LPIPS)
    /// loss. Default: a `vgg16*.safetensors` or `lpips*.safetensors` beside the model if
    /// there is one, else pixel + multi-scale SSIM.
    #[arg(long)]
    pub vgg16: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the found ws, `(1, num_ws, w_dim)` as `.npy` (reusable with `gan --w-file`).
    #[arg(long)]
    pub out_w: PathBuf,
    /// The reconstruction.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchGanArgs {
    /// Output resolutions, comma-separated (powers of two).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub size: Vec<usize>,
    /// Timed frames per size (after one warm-up frame); the median is reported.
    #[arg(long, default_value_t = 5, value_parser = crate::cli::values::rounds)]
    pub frames: usize,
    /// One JSON object per size.
    #[arg(long)]
    pub json: bool,
    /// CPU threads (default: physical cores).
    #[arg(long, value_parser = crate::cli::values::threads)]
    pub threads: Option<usize>,
    /// Compute device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn load(common: &GanCommon) -> Result<StyleGan2> {
    let device = open_device(common.threads, &common.device)?.device;
    let gan = StyleGan2::load(&common.model, &device)
        .with_context(|| format!("loading {}", common.model.display()))?;
    let i = gan.info();
    eprintln!(
        "loaded {}: {}x{} StyleGAN2 ({}), z {}, w {} x {} rows{}",
        common.model.display(),
        i.resolution,
        i.resolution,
        i.architecture.name(),
        i.z_dim,
        i.num_ws,
        i.w_dim,
        if i.c_dim > 0 {
            format!(", {} classes", i.c_dim)
        } else {
            String::new()
        }
    );
    Ok(gan)
}

fn noise_mode(common: &GanCommon) -> Result<NoiseMode> {
    Ok(match common.noise_mode.as_str() {
        "const" => NoiseMode::Const,
        "random" => NoiseMode::Random {
            seed: common.noise_seed,
        },
        "none" => NoiseMode::None,
        other => bail!("unknown noise mode `{other}` (use const, random or none)"),
    })
}

/// The class to condition on: `class` checked against the generator (with a warning when a
/// class-conditional one gets none, whose label is then all zeros).
fn checked_class(gan: &StyleGan2, class: Option<usize>) -> Result<Option<usize>> {
    let c_dim = gan.info().c_dim;
    match class {
        Some(c) if c_dim == 0 => {
            bail!("--class {c}: this generator is not class-conditional")
        }
        None if c_dim > 0 => {
            eprintln!(
                "warning: this generator is class-conditional ({c_dim} classes); without \
                 --class the label is all zeros"
            );
            Ok(None)
        }
        other => Ok(other),
    }
}

/// `42`, `42.25`: the integer seed and the fractional offset.
fn parse_seed(s: &str) -> Result<(u64, f32)> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let seed: u64 = whole
        .parse()
        .with_context(|| format!("--seed `{s}` is not a number"))?;
    if seed > u64::from(u32::MAX) {
        bail!(
            "seed {seed} is too large: StyleGAN seeds are 0 to {} (numpy's RandomState)",
            u32::MAX
        );
    }
    let offset = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}")
            .parse::<f32>()
            .with_context(|| format!("--seed `{s}` is not a number"))?
    };
    Ok((seed, offset))
}

fn model_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Fails early (before rendering) when `path`'s folder cannot hold the output.
fn check_output_folder(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.exists() && !dir.is_dir() {
        bail!(
            "cannot write {}: {} is not a folder",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

fn write_png(path: &Path, img: &RgbImage, text: &str) -> Result<()> {
    let bytes = imaging::encode_png(img, Some(text))?;
    crate::home::atomic_write(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `studio gan` on a DCGAN generator: z from the seed (or a z file), no W space.
fn run_dcgan(args: &GanArgs, seed: Option<(u64, f32)>) -> Result<()> {
    let common = &args.common;
    if args.w_file.is_some() || args.out_w.is_some() || common.class.is_some() {
        bail!("a DCGAN generator has no W space or classes: use --seed or --z-file");
    }
    let device = open_device(common.threads, &common.device)?.device;
    let gan = Dcgan::load(&common.model, &device)
        .with_context(|| format!("loading {}", common.model.display()))?;
    let i = gan.info();
    eprintln!(
        "loaded {}: {}x{} DCGAN, z {}",
        common.model.display(),
        i.resolution,
        i.resolution,
        i.nz
    );
    let (z, source) = match (seed, &args.z_file) {
        (Some((seed, offset)), _) => {
            if offset != 0.0 {
                bail!("fractional seeds blend W rows; a DCGAN takes whole seeds");
            }
            (gan.z_from_seed(seed)?, format!("seed {seed}"))
        }
        (None, Some(path)) => (
            npy::read_dcgan_z(path, &gan)?,
            format!("z-file {}", model_name(path)),
        ),
        (None, None) => bail!("give --seed or --z-file"),
    };
    let img = imaging::tensor_to_image(&gan.generate(&z)?)?;
    let text = format!(
        "DCGAN latent: {source}; model {}",
        model_name(&common.model)
    );
    write_png(&args.out, &img, &text)?;
    println!(
        "saved {} ({}x{}, {source})",
        args.out.display(),
        img.width,
        img.height
    );
    Ok(())
}

pub fn run_gan(args: &GanArgs) -> Result<()> {
    let sources = usize::from(args.seed.is_some())
        + usize::from(args.z_file.is_some())
        + usize::from(args.w_file.is_some());
    if sources != 1 {
        bail!("give exactly one of --seed, --z-file or --w-file");
    }
    if is_dcgan(&args.common.model) {
        let seed = args.seed.as_deref().map(parse_seed).transpose()?;
        check_output_folder(&args.out)?;
        return run_dcgan(args, seed);
    }
    let seed = args.seed.as_deref().map(parse_seed).transpose()?;
    check_output_folder(&args.out)?;
    if let Some(p) = &args.out_w {
        check_output_folder(p)?;
    }
    let common = &args.common;
    let noise = noise_mode(common)?;
    let gan = load(common)?;
    let cutoff = common.trunc_cutoff;
    let (ws, source, psi, class) = if let Some(path) = &args.w_file {
        if (common.psi - 1.0).abs() > 0.0 || common.class.is_some() {
            eprintln!("warning: --psi and --class do not apply to --w-file (ws are used as given)");
        }
        let ws = npy::read_ws(path, &gan)?;
        (ws, format!("w-file {}", model_name(path)), 1.0, None)
    } else {
        let c = checked_class(&gan, common.class)?
            .map(|k| gan.class_label(k))
            .transpose()?;
        if let Some((seed, offset)) = seed {
            let ws = latent::seed_blend_ws(&gan, seed, offset, c.as_ref(), common.psi, cutoff)?;
            let source = if offset == 0.0 {
                format!("seed {seed}")
            } else {
                format!("seed {seed}+{offset}")
            };
            (ws, source, common.psi, common.class)
        } else {
            let path = args.z_file.as_deref().context("--z-file")?;
            let z = npy::read_z(path, &gan)?;
            let ws = gan.map(&z, c.as_ref(), common.psi, cutoff)?;
            (
                ws,
                format!("z-file {}", model_name(path)),
                common.psi,
                common.class,
            )
        }
    };
    let started = Instant::now();
    let img = latent::render(&gan, &ws, noise)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let text = LatentText {
        source,
        psi,
        cutoff: if args.w_file.is_some() { None } else { cutoff },
        noise,
        class,
        model: model_name(&common.model),
    }
    .to_text();
    write_png(&args.out, &img, &text)?;
    println!(
        "saved {} ({}x{}, {}, {ms:.0} ms)",
        args.out.display(),
        img.width,
        img.height,
        text.trim_start_matches("StyleGAN2 latent: ")
    );
    if let Some(p) = &args.out_w {
        npy::write_tensor(p, &ws).with_context(|| format!("cannot write {}", p.display()))?;
        println!("saved {}", p.display());
    }
    Ok(())
}

enum Sink<'a> {
    /// Encodes into a file that replaces the target only when committed after the last frame.
    Gif(GifWriter<&'a mut std::io::BufWriter<AtomicFile>>, PathBuf),
    Pngs(PathBuf),
}

pub fn run_gan_interp(args: &GanInterpArgs) -> Result<()> {
    if args.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    if let Some(s) = args.seeds.iter().find(|&&s| s > u64::from(u32::MAX)) {
        bail!(
            "seed {s} is too large: StyleGAN seeds are 0 to {} (numpy's RandomState)",
            u32::MAX
        );
    }
    let space = Space::parse(&args.space)?;
    let common = &args.common;
    let noise = noise_mode(common)?;
    let out = &args.out;
    let to_folder = args.png_sequence
        || out.is_dir()
        || out
            .as_os_str()
            .to_string_lossy()
            .ends_with(std::path::MAIN_SEPARATOR);
    if !to_folder {
        check_output_folder(out)?;
        // Refuse a bad frame rate before the (possibly long) rendering.
        GifWriter::new(std::io::sink(), args.fps)?;
    }
    let gan = load(common)?;
    let c = checked_class(&gan, common.class)?
        .map(|k| gan.class_label(k))
        .transpose()?;
    let keys = args
        .seeds
        .iter()
        .map(|&s| Keyframe::from_seed(&gan, s, c.clone(), common.psi, common.trunc_cutoff))
        .collect::<studio_inference::Result<Vec<_>>>()?;
    // The GIF replaces its file only when complete (an error leaves the old one).
    let mut file = if to_folder {
        None
    } else {
        Some(std::io::BufWriter::new(
            AtomicFile::create(out, false)
                .with_context(|| format!("cannot write {}", out.display()))?,
        ))
    };
    let mut sink = match &mut file {
        None => {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            Sink::Pngs(out.clone())
        }
        Some(writer) => Sink::Gif(GifWriter::new(writer, args.fps)?, out.clone()),
    };
    let seeds = args
        .seeds
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    for i in 0..args.frames {
        let t = if args.frames == 1 {
            0.0
        } else {
            i as f64 / (args.frames - 1) as f64
        };
        let ws = latent::interpolate(&gan, &keys, t, space)?;
        let img = latent::render(&gan, &ws, noise)?;
        match &mut sink {
            Sink::Gif(gif, path) => gif
                .add_frame(&img)
                .with_context(|| format!("cannot write {}", path.display()))?,
            Sink::Pngs(dir) => {
                let text = LatentText {
                    source: format!(
                        "interpolation {seeds} {} {}/{}",
                        space.name(),
                        i + 1,
                        args.frames
                    ),
                    psi: common.psi,
                    cutoff: common.trunc_cutoff,
                    noise,
                    class: common.class,
                    model: model_name(&common.model),
                }
                .to_text();
                write_png(&dir.join(format!("frame-{:04}.png", i + 1)), &img, &text)?;
            }
        }
        eprintln!("frame {}/{}", i + 1, args.frames);
    }
    let secs = started.elapsed().as_secs_f64();
    // Moved whole (not matched in place), so its borrow of `file` ends here.
    let path = match std::convert::identity(sink) {
        Sink::Gif(gif, path) => {
            // The encoder writes the GIF's trailer when dropped.
            drop(gif);
            path
        }
        Sink::Pngs(dir) => {
            println!(
                "saved {} frames to {} ({:.1} s)",
                args.frames,
                dir.display(),
                secs
            );
            return Ok(());
        }
    };
    if let Some(writer) = file {
        writer
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)
            .and_then(AtomicFile::commit)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "saved {} ({} frames, {} fps, {:.1} s)",
        path.display(),
        args.frames,
        args.fps,
        secs
    );
    Ok(())
}

pub fn run_bench_gan(args: &BenchGanArgs) -> Result<()> {
    if args.frames == 0 || args.size.is_empty() {
        bail!("--frames must be at least 1 and --size must list a size");
    }
    let dev = open_device(args.threads, &args.device)?.device;
    let threads = studio_inference::device::cpu_threads();
    let mut rows = Vec::new();
    for &size in &args.size {
        let cfg = RandomGanConfig::stylegan2_f(size);
        eprintln!("building a {size}x{size} config-F generator with random weights");
        let t0 = Instant::now();
        let gan = latent::random_generator(cfg, &dev)?;
        let build_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let mut map_ms = Vec::new();
        let mut frame_ms = Vec::new();
        for i in 0..=args.frames {
            let t0 = Instant::now();
            let ws = gan.map(&gan.z_from_seed(i as u64)?, None, 0.7, None)?;
            latent::wait_for(&ws)?;
            let t_map = t0.elapsed().as_secs_f64() * 1000.0;
            let _img = latent::render(&gan, &ws, NoiseMode::Const)?;
            let t_all = t0.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                eprintln!("{size}: warm-up frame {t_all:.0} ms");
            } else {
                eprintln!("{size}: frame {i}/{} {t_all:.0} ms", args.frames);
                map_ms.push(t_map);
                frame_ms.push(t_all);
            }
        }
        let rss = studio_inference::sys::peak_rss_mb().unwrap_or(0.0);
        let kernels = gan
            .cpu_kernels()
            .map_or_else(|| "candle".to_owned(), |p| p.to_string());
        rows.push((
            size,
            build_ms,
            median(map_ms),
            median(frame_ms),
            rss,
            kernels,
        ));
    }
    let device_name = if dev.is_cpu() { "CPU" } else { "GPU" };
    if args.json {
        for (size, build_ms, map_ms, frame_ms, rss, kernels) in &rows {
            println!(
                "{}",
                json!({
                    "size": size,
                    "device": device_name,
                    "kernels": kernels,
                    "peak_rss_mb": rss,
                    "threads": threads,
                    "frames": args.frames,
                    "build_ms": build_ms,
                    "mapping_ms": map_ms,
                    "frame_ms": frame_ms,
                    "fps": 1000.0 / frame_ms,
                })
            );
        }
    } else {
        println!(
            "StyleGAN2 config F (z/w 512, 8 mapping layers, channels min(512, 32768/res)), random \
             weights, f32 on {device_name}, {threads} threads, median of {} frames",
            args.frames
        );
        println!(
            "{:>6} {:>12} {:>12} {:>10} {:>14}  kernels",
            "size", "mapping ms", "frame ms", "fps", "peak RSS MB"
        );
        for (size, _, map_ms, frame_ms, rss, kernels) in &rows {
            println!(
                "{size:>6} {map_ms:>12.2} {frame_ms:>12.1} {:>10.2} {rss:>14.0}  {kernels}",
                1000.0 / frame_ms
            );
        }
    }
    Ok(())
}

/// `img` cropped to a centred square and resized to `side`, saying what was done.
fn fit_square(img: &RgbImage, side: u32) -> (RgbImage, Option<String>) {
    let (w, h) = (img.width, img.height);
    let m = w.min(h);
    let mut notes = Vec::new();
    let square = if w == h {
        img.clone()
    } else {
        notes.push(format!("cropped {w}x{h} to the centred {m}x{m} square"));
        img.crop((w - m) / 2, (h - m) / 2, m, m)
    };
    let out = if m == side {
        square
    } else {
        notes.push(format!("resized to {side}x{side}, the model's resolution"));
        square.resized(side, side)
    };
    let note = (!notes.is_empty()).then(|| notes.join(", "));
    (out, note)
}

pub fn run_gan_project(args: &GanProjectArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    check_output_folder(&args.out)?;
    check_output_folder(&args.out_w)?;
    let decoded = imaging::decode_image_file(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?;
    let common = &args.common;
    let gan = load(common)?;
    let res = gan.info().resolution as u32;
    let (target, note) = fit_square(&decoded.image, res);
    if let Some(note) = note {
        eprintln!("note: {}: {note}", args.image.display());
    }
    let target = imaging::image_to_tensor(&target, gan.device())?;
    let vgg16 = args.vgg16.clone().or_else(|| {
        let beside = common.model.parent()?.to_path_buf();
        perceptual::find_weights(&[beside])
    });
    match &vgg16 {
        Some(path) => eprintln!("loss: VGG16 perceptual distance ({})", path.display()),
        None => eprintln!("loss: pixel + multi-scale SSIM (no VGG16 weights given or found)"),
    }
    let config = ProjectConfig {
        loss: vgg16.map_or(LossKind::PixelMultiScale, |vgg16| LossKind::Perceptual {
            vgg16,
        }),
        steps: args.steps,
        initial_lr: args.lr,
        noise_regularization: args.noise_regularization,
        w_plus: args.w_plus,
        seed: args.seed,
        ..ProjectConfig::default()
    };
    let started = Instant::now();
    let every = (args.steps / 20).max(1);
    let result = project(&gan, &target, &config, &mut |step, loss, _| {
        if step % every == 0 || step + 1 == args.steps {
            eprintln!("step {}/{}: loss {loss:.4}", step + 1, args.steps);
        }
        ControlFlow::Continue(())
    })?;
    let img = imaging::tensor_to_image(&gan.synthesize_with_noise(&result.ws, &result.noise)?)?;
    let text = LatentText {
        source: format!("projection of {}", model_name(&args.image)),
        psi: 1.0,
        cutoff: None,
        noise: NoiseMode::Const,
        class: None,
        model: model_name(&common.model),
    }
    .to_text();
    write_png(&args.out, &img, &text)?;
    npy::write_tensor(&args.out_w, &result.ws)
        .with_context(|| format!("cannot write {}", args.out_w.display()))?;
    let (first, last) = (
        result.losses.first().copied().unwrap_or(0.0),
        result.losses.last().copied().unwrap_or(0.0),
    );
    println!(
        "saved {} and {} (loss {first:.4} -> {last:.4}, {} steps, {:.1} s)",
        args.out.display(),
        args.out_w.display(),
        args.steps,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
