//! `studio train …`: the demo models' data and quality checks (issue 21, in progress).
//!
//! - `studio train shapes-data --out DIR [--count N] [--size PX] [--seed S]` renders captioned
//!   shape scenes (`studio_inference::train::shapes`) as `DIR/NNNNNN.png` with
//!   `DIR/captions.jsonl` (`{"file": …, "caption": …}` per line);
//! - `studio train shapes-check --dir DIR [--json]` grades the images of such a folder (any
//!   images, made by any model, listed with their captions in `captions.jsonl`) against their
//!   captions and prints the share that passes;
//! - `studio train faces-data --out DIR [--count N] [--size PX] [--seed S]` renders cartoon
//!   faces with known factors (`studio_inference::train::faces`), `DIR/factors.jsonl` naming
//!   each one's;
//! - `studio train faces-check --dir DIR [--json]` reads every PNG of a folder (a real set or a
//!   generator's samples): how many read as faces, and how often each factor value appears;
//! - `studio train lm-data --out DIR [--python-lib DIR] [--max-files N] [--vocab N]` turns
//!   Python's standard library into the demo language model's data (`train.jsonl`,
//!   `held_out.jsonl`, `fim.jsonl`) and trains its tokenizer (`tokenizer.json`), with
//!   `DATA.md` saying what it read;
//! - `studio train lm --data DIR --out DIR [--steps N] [--batch B] [--seq T] [--lr X]
//!   [--seed S] [--hidden H] [--layers L] [--heads A] [--checkpoint-every N]` trains the demo
//!   language model on that data (`studio_inference::train::lm`), resuming from `DIR/checkpoint`
//!   when a run was interrupted, and writes a model folder Studio loads, with `loss.jsonl` and
//!   `MODEL.md`;
//! - `studio train lm-eval --model DIR --data DIR [--windows N] [--fim N] [--json]` measures
//!   such a model on the held-out set: mean loss per token, and greedy FIM exact match;
//! - `studio train gan --data DIR --out DIR [--steps N] [--batch B] [--lr X] [--gamma G]
//!   [--seed S] …` trains the demo GAN (`studio_inference::train::gan`) on a folder of square
//!   images, resuming from `DIR/checkpoint`, and writes `generator.safetensors` (NVIDIA's
//!   `G_ema` names) with `generator.json`, `samples.png`, `loss.jsonl` and `MODEL.md`;
//! - `studio train sd --data DIR --out DIR [--vae-steps N] [--decoder-steps N] [--unet-steps N]
//!   [--batch B] [--lr X] [--seed S] [--vae-levels 4|3] [--vae-crop PX] [--init DIR]
//!   [--min-snr-gamma G] [--unet-cooldown N] [--device auto|cpu|cuda[:N]] …`
//!   trains the demo text-to-image model (`studio_inference::train::sd`) on `shapes-data`'s
//!   captioned images: its CLIP tokenizer from the captions, the VAE, the
//!   decoder alone (`--decoder-steps`), then the UNet with the text encoder on the VAE's
//!   latents, resuming from `DIR/checkpoint` (or starting from a trained folder's weights with
//!   `--init`), and writes a diffusers folder the Canvas loads, with `loss.jsonl` and
//!   `MODEL.md`;
//! - `studio train sd-eval --model M --data DIR [--train DIR] [--count 200] [--steps 20]
//!   [--cfg 7] [--size PX] [--out DIR] [--json] [--reconstruct]` generates an image for each
//!   caption of a `shapes-data` folder not in the training set, through Studio's own pipeline
//!   (seed = the caption's index), and grades it with the shapes checker: prompt adherence;
//!   `--reconstruct` grades the VAE's round trip of the folder's own images instead (the
//!   ceiling the VAE sets);
//! - `studio train gan-eval --model G --data DIR [--samples N] [--psi X] [--json]` grades a
//!   generator's samples with the faces reader against the real faces: precision (samples that
//!   read as faces) and recall (real faces whose factor combination some sample has).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use studio_inference::diffusion::imaging::{RgbImage, decode_image_file, encode_png};
use studio_inference::train::faces::{Face, read};
use studio_inference::train::shapes::{Scene, check};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Render captioned shape scenes (the demo text-to-image model's data).
    ShapesData(ShapesDataArgs),
    /// Grade images against their shape captions (prompt adherence).
    ShapesCheck(ShapesCheckArgs),
    /// Render cartoon faces with known factors (the demo GAN's data).
    FacesData(ShapesDataArgs),
    /// Read the faces in a folder of images: how many are faces, and their factors.
    FacesCheck(ShapesCheckArgs),
    /// Turn Python's standard library into the demo language model's data and tokenizer.
    LmData(LmDataArgs),
    /// Train the demo language model (a tiny Llama) on `lm-data`'s output.
    Lm(LmArgs),
    /// Measure a trained language model on `lm-data`'s held-out set: loss and FIM exact match.
    LmEval(LmEvalArgs),
    /// Train the demo GAN (a tiny StyleGAN2) on a folder of square images (`faces-data`'s).
    Gan(GanArgs),
    /// Grade a GAN's samples against a folder of real faces: precision and recall of factors.
    GanEval(GanEvalArgs),
    /// Train the demo text-to-image model (a tiny Stable Diffusion) on `shapes-data`'s output.
    Sd(SdArgs),
    /// Prompt adherence of a text-to-image model on held-out shape captions.
    SdEval(SdEvalArgs),
}

#[derive(Debug, Args)]
pub struct SdEvalArgs {
    /// The model (a diffusers folder or checkpoint Studio loads).
    #[arg(long)]
    pub model: PathBuf,
    /// A `shapes-data` folder whose captions are the prompts.
    #[arg(long)]
    pub data: PathBuf,
    /// The training data: its captions are left out, so every prompt is held out.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Prompts to grade.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub steps: u32,
    /// Classifier-free guidance.
    #[arg(long, default_value_t = 7.0, value_parser = crate::cli::values::guidance)]
    pub cfg: f64,
    /// Image side (default: the model's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub size: Option<u32>,
    /// Write the images and their `captions.jsonl` here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Grade the VAE's round trip (encode, decode) of the data's own images instead of
    /// generating: the ceiling the VAE sets on prompt adherence.
    #[arg(long)]
    pub reconstruct: bool,
}

#[derive(Debug, Args)]
pub struct SdArgs {
    /// `shapes-data`'s folder (`captions.jsonl` and the images it names).
    #[arg(long)]
    pub data: PathBuf,
    /// The diffusers folder to write (and resume from).
    #[arg(long)]
    pub out: PathBuf,
    /// VAE steps (the first phase; 0 with `--init` keeps its VAE).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub vae_steps: u32,
    /// Train the VAE on random crops of this side (a multiple of its factor) instead of whole
    /// images: the same convolutions at a fraction of the cost.
    #[arg(long, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub vae_crop: Option<u32>,
    /// Steps of the decoder alone on the fixed encoder's latents (the second phase): sharper
    /// images without moving the latents a trained UNet works in.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub decoder_steps: u32,
    /// Start from this trained diffusers folder's weights, tokenizer and scaling factor (the
    /// bundled demo model, say) instead of random weights; the shape flags must match it.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// UNet and text-encoder steps (the last phase).
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub unet_steps: u32,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = crate::cli::values::learning_rate)]
    pub lr: f64,
    /// Weight the UNet's loss by min(SNR, γ) / SNR (Min-SNR-γ; 5 is the paper's): the noisy
    /// timesteps that decide layout and colour train faster. Without it, the plain error.
    #[arg(long, value_parser = crate::cli::values::snr_gamma)]
    pub min_snr_gamma: Option<f64>,
    /// Lower the UNet's learning rate linearly towards zero over the phase's last N steps.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub unet_cooldown: u32,
    /// Offset noise: add a per-image, per-channel constant of this standard deviation to the
    /// UNet's training noise, so the prompt, not the starting noise, sets the image's mean
    /// colour. 0: plain noise.
    #[arg(long, default_value_t = 0.0, value_parser = crate::cli::values::fraction)]
    pub offset_noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Width of the text encoder (and the UNet's cross-attention).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub text_width: u32,
    /// Channels of the UNet's two levels (the second is twice this).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub unet_channels: u32,
    /// Channels of the VAE's levels.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub vae_channels: u32,
    /// The VAE's levels: 4 makes SD's factor-8 autoencoder, 3 the LDM's `kl-f4` (latents a
    /// quarter of the image's side: small shapes keep their outlines).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=4))]
    pub vae_levels: u32,
    /// Read at most this many images.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_images: u32,
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub checkpoint_every: u32,
    /// Where to train: `auto` (the GPU of a CUDA build when there is one, else the CPU),
    /// `cpu` or `cuda[:N]`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct GanArgs {
    /// A folder of square images of one size (`faces-data`'s); others are skipped, counted.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder to write (and resume from).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub steps: u32,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub batch: u32,
    /// Adam's learning rate (both networks).
    #[arg(long, default_value_t = 2.5e-3, value_parser = crate::cli::values::learning_rate)]
    pub lr: f64,
    /// The R1 penalty's weight γ.
    #[arg(long, default_value_t = 0.1, value_parser = crate::cli::values::weight)]
    pub gamma: f64,
    /// Half-life of the generator's moving average, in images.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub ema_images: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Values of z and w.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=2048))]
    pub z_dim: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub mapping_layers: u32,
    /// Channels at resolution r: min(channel_base / r, channel_max).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..=65_536))]
    pub channel_base: u32,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub channel_max: u32,
    /// Read at most this many images.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_images: u32,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub checkpoint_every: u32,
}

#[derive(Debug, Args)]
pub struct GanEvalArgs {
    /// The generator (`generator.safetensors`, or any StyleGAN2 Studio loads).
    #[arg(long)]
    pub model: PathBuf,
    /// The real faces (`faces-data`'s folder).
    #[arg(long)]
    pub data: PathBuf,
    /// Samples to draw (seeds 0 to N − 1) and real images to read.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub samples: u32,
    /// Truncation ψ.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = crate::cli::values::psi)]
    pub psi: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LmEvalArgs {
    /// The model folder `studio train lm` wrote.
    #[arg(long)]
    pub model: PathBuf,
    /// `lm-data`'s folder (`held_out.jsonl`, `fim.jsonl`).
    #[arg(long)]
    pub data: PathBuf,
    /// At most this many 129-token windows of held-out text for the loss.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub windows: u32,
    /// At most this many held-out lines to fill in the middle.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub fim: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LmArgs {
    /// `lm-data`'s folder (`train.jsonl`, `tokenizer.json`).
    #[arg(long)]
    pub data: PathBuf,
    /// The model folder to write (and resume from).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub steps: u32,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub seq: u32,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3, value_parser = crate::cli::values::learning_rate)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub hidden: u32,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub layers: u32,
    /// Attention heads (must divide --hidden into even head widths).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub heads: u32,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub checkpoint_every: u32,
}

#[derive(Debug, Args)]
pub struct LmDataArgs {
    /// The folder to write (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// The Python library to read (default: the newest /usr/lib/python3.X).
    #[arg(long)]
    pub python_lib: Option<PathBuf>,
    /// At most this many source files.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_files: u32,
    /// The tokenizer's vocabulary size.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(300..=65_536))]
    pub vocab: u32,
}

#[derive(Debug, Args)]
pub struct ShapesDataArgs {
    /// The folder to write (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// How many scenes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub count: u32,
    /// Their side in pixels.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(64..=1024))]
    pub size: u32,
    /// The random seed (the same seed writes the same files).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ShapesCheckArgs {
    /// A folder with `captions.jsonl` and the images it names (`faces-check`: any PNGs).
    #[arg(long)]
    pub dir: PathBuf,
    /// One JSON object with the counts and each failure.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `studio train` subcommand.
pub fn run_train(command: &TrainCommand) -> Result<()> {
    match command {
        TrainCommand::ShapesData(args) => shapes_data(args),
        TrainCommand::ShapesCheck(args) => shapes_check(args),
        TrainCommand::FacesData(args) => faces_data(args),
        TrainCommand::FacesCheck(args) => faces_check(args),
        TrainCommand::LmData(args) => lm_data(args),
        TrainCommand::Lm(args) => lm(args),
        TrainCommand::LmEval(args) => lm_eval(args),
        TrainCommand::Gan(args) => gan(args),
        TrainCommand::GanEval(args) => gan_eval(args),
        TrainCommand::Sd(args) => sd(args),
        TrainCommand::SdEval(args) => sd_eval(args),
    }
}

fn shapes_data(args: &ShapesDataArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut captions = Vec::new();
    for i in 0..args.count {
        let scene = Scene::random(&mut rng);
        let file = format!("{i:06}.png");
        let png = encode_png(&scene.render(args.size), Some(&scene.caption()))?;
        write_file(&args.out.join(&file), &png)?;
        let line = json!({"file": file, "caption": scene.caption()});
        writeln!(captions, "{line}")?;
    }
    write_file(&args.out.join("captions.jsonl"), &captions)?;
    println!(
        "wrote {} scenes of {}x{} to {}",
        args.count,
        args.size,
        args.size,
        args.out.display()
    );
    Ok(())
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    crate::home::atomic_write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn shapes_check(args: &ShapesCheckArgs) -> Result<()> {
    let list = args.dir.join("captions.jsonl");
    let text =
        std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    let (mut total, mut passed) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let entry: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", list.display(), n + 1))?;
        let (Some(file), Some(caption)) = (entry["file"].as_str(), entry["caption"].as_str())
        else {
            bail!(
                "{} line {}: needs \"file\" and \"caption\"",
                list.display(),
                n + 1
            );
        };
        let Some(scene) = Scene::parse(caption) else {
            bail!(
                "{} line {}: `{caption}` is not a shape caption",
                list.display(),
                n + 1
            );
        };
        let path = args.dir.join(file);
        let image = decode_image_file(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .image;
        let verdict = check(&image, &scene);
        total += 1;
        if verdict.passed {
            passed += 1;
        } else {
            failures.push(json!({"file": file, "caption": caption, "problems": verdict.problems}));
        }
    }
    let share = passed as f64 / total.max(1) as f64;
    if args.json {
        println!(
            "{}",
            json!({"images": total, "passed": passed, "adherence": share, "failures": failures})
        );
    } else {
        println!(
            "{passed} of {total} images match their captions ({:.1} %)",
            share * 100.0
        );
    }
    Ok(())
}

fn faces_data(args: &ShapesDataArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut factors = Vec::new();
    for i in 0..args.count {
        let face = Face::random(&mut rng);
        let file = format!("{i:06}.png");
        let png = encode_png(&face.render(args.size), Some(&face.describe()))?;
        write_file(&args.out.join(&file), &png)?;
        let line = json!({"file": file, "factors": face.describe()});
        writeln!(factors, "{line}")?;
    }
    write_file(&args.out.join("factors.jsonl"), &factors)?;
    println!(
        "wrote {} faces of {}x{} to {}",
        args.count,
        args.size,
        args.size,
        args.out.display()
    );
    Ok(())
}

fn faces_check(args: &ShapesCheckArgs) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    let mut faces = 0usize;
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for path in &files {
        let image = decode_image_file(path)
            .with_context(|| format!("reading {}", path.display()))?
            .image;
        if let Some(face) = read(&image) {
            faces += 1;
            for part in face.describe().split(", ") {
                *counts.entry(part.to_owned()).or_default() += 1;
            }
        }
    }
    if args.json {
        println!(
            "{}",
            json!({"images": files.len(), "faces": faces, "factors": counts})
        );
    } else {
        println!("{faces} of {} images read as faces", files.len());
        for (factor, n) in &counts {
            println!("  {factor}: {n}");
        }
    }
    Ok(())
}

fn lm_data(args: &LmDataArgs) -> Result<()> {
    use studio_inference::train::corpus::{Example, collect, python_libraries, train_tokenizer};
    let lib = match &args.python_lib {
        Some(p) => p.clone(),
        None => python_libraries().into_iter().next().context(
            "no Python standard library in /usr/lib/python3.X: give one with --python-lib",
        )?,
    };
    let started = std::time::Instant::now();
    let corpus = collect(&lib, args.max_files as usize, 4)
        .with_context(|| format!("reading {}", lib.display()))?;
    if corpus.train.is_empty() {
        bail!("{} holds no Python source to learn from", lib.display());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let lines = |examples: &[Example]| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for e in examples {
            let kind = match e {
                Example::Code(_) => "code",
                Example::DocToFunction { .. } => "doc",
                Example::Chat { .. } => "chat",
                Example::Fim(_) => "fim",
            };
            writeln!(out, "{}", json!({"kind": kind, "text": e.text()}))?;
        }
        Ok(out)
    };
    write_file(&args.out.join("train.jsonl"), &lines(&corpus.train)?)?;
    write_file(&args.out.join("held_out.jsonl"), &lines(&corpus.held_out)?)?;
    let mut fim = Vec::new();
    for c in &corpus.fim {
        writeln!(
            fim,
            "{}",
            json!({"prefix": c.prefix, "middle": c.middle, "suffix": c.suffix})
        )?;
    }
    write_file(&args.out.join("fim.jsonl"), &fim)?;
    let texts: Vec<String> = corpus.train.iter().map(Example::text).collect();
    let tokenizer = train_tokenizer(texts.iter().map(String::as_str), args.vocab as usize)?;
    let tokenizer_path = args.out.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tokenizer_path.display()))?;
    let count = |examples: &[Example], kind: fn(&Example) -> bool| {
        examples.iter().filter(|e| kind(e)).count()
    };
    let card = format!(
        "# The demo language model's data\n\n\
         Read from `{lib}` (Python's standard library, under the Python Software Foundation \
         License: see `LICENSE.txt` there) by `studio train lm-data`.\n\n\
         - {files} source files ({mb:.1} MB), {skipped} skipped (too large, or not UTF-8);\n\
         - split by file, one in 20 held out;\n\
         - training: {tc} files as code, {td} docstring → function, {tq} chat turns, {tf} \
         lines to fill in the middle;\n\
         - held out: {hc} files, {hd} docstring → function, {hq} chat turns, {fim} lines to fill \
         in the middle;\n\
         - tokenizer: byte-level BPE, {vocab} tokens, with `<|endoftext|>`, `<|im_start|>`, \
         `<|im_end|>`, `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>`.\n",
        lib = lib.display(),
        files = corpus.files,
        mb = corpus.bytes as f64 / 1e6,
        skipped = corpus.skipped,
        tc = count(&corpus.train, |e| matches!(e, Example::Code(_))),
        td = count(&corpus.train, |e| matches!(
            e,
            Example::DocToFunction { .. }
        )),
        tq = count(&corpus.train, |e| matches!(e, Example::Chat { .. })),
        tf = count(&corpus.train, |e| matches!(e, Example::Fim(_))),
        hc = count(&corpus.held_out, |e| matches!(e, Example::Code(_))),
        hd = count(&corpus.held_out, |e| matches!(
            e,
            Example::DocToFunction { .. }
        )),
        hq = count(&corpus.held_out, |e| matches!(e, Example::Chat { .. })),
        fim = corpus.fim.len(),
        vocab = tokenizer.get_vocab_size(true),
    );
    write_file(&args.out.join("DATA.md"), card.as_bytes())?;
    print!("{card}");
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A run's `loss.jsonl`, opened for appending, and the last loss of each phase it holds.
struct RunLog {
    file: std::fs::File,
    /// By phase (`vae`, `decoder`, `unet`; the language model's and the GAN's lines have none).
    last: std::collections::BTreeMap<String, f32>,
}

/// The largest `loss.jsonl` read back to trim it (some ten million steps): a larger one is
/// appended to as it is.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// Creates the run's folder and opens its `loss.jsonl` for appending (a resumed run goes on
/// with the same log), first dropping the lines of steps that the checkpoint in
/// `out/checkpoint` does not hold (a run stopped after its last checkpoint logged steps that
/// the resumed run does again; with no checkpoint, every earlier line), so the log is the
/// history of the weights beside it. A line's phase `p` is counted by the checkpoint's
/// `p_steps`; a line without one (the language model's, the GAN's) by `step`.
fn open_log(out: &std::path::Path) -> Result<RunLog> {
    use serde_json::Value;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("loss.jsonl");
    let mut last = std::collections::BTreeMap::new();
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    if size > MAX_LOG_BYTES {
        eprintln!(
            "{} is over 1 GiB: appended to without trimming",
            path.display()
        );
    } else if let Ok(text) = std::fs::read_to_string(&path) {
        let state: Option<Value> =
            std::fs::read_to_string(out.join("checkpoint").join("state.json"))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok());
        let done = |row: &Value| -> u64 {
            let key = row["phase"]
                .as_str()
                .map_or_else(|| "step".to_owned(), |p| format!("{p}_steps"));
            state
                .as_ref()
                .and_then(|s| s[key.as_str()].as_u64())
                .unwrap_or(0)
        };
        let mut kept = String::with_capacity(text.len());
        for line in text.lines() {
            let Ok(row) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if row["step"].as_u64().is_none_or(|s| s > done(&row)) {
                continue;
            }
            if let (Some(phase), Some(loss)) = (row["phase"].as_str(), row["loss"].as_f64()) {
                last.insert(phase.to_owned(), loss as f32);
            }
            kept.push_str(line);
            kept.push('\n');
        }
        if kept.len() != text.len() {
            write_file(&path, kept.as_bytes())?;
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(RunLog { file, last })
}

/// A card's loss figure: four decimals, or "none" for a phase never run.
fn loss_text(last: &std::collections::BTreeMap<String, f32>, phase: &str) -> String {
    last.get(phase)
        .map_or_else(|| "none".to_owned(), |l| format!("{l:.4}"))
}

fn lm(args: &LmArgs) -> Result<()> {
    use studio_inference::train::lm::{
        CHAT_TEMPLATE, LmShape, TrainOptions, hf_config, read_training_data, train,
    };
    let data = read_training_data(&args.data)
        .with_context(|| format!("reading the training data in {}", args.data.display()))?;
    let tokens = data.tokens;
    let tokenizer_path = args.data.join("tokenizer.json");
    if !args.hidden.is_multiple_of(args.heads) || !(args.hidden / args.heads).is_multiple_of(2) {
        bail!("--heads must divide --hidden into even head widths");
    }
    let shape = LmShape {
        vocab: data.vocab,
        hidden: args.hidden as usize,
        layers: args.layers as usize,
        heads: args.heads as usize,
        intermediate: (args.hidden as usize * 8 / 3).next_multiple_of(8),
        max_positions: (args.seq as usize).max(256),
    };
    let opts = TrainOptions {
        steps: args.steps as usize,
        batch: args.batch as usize,
        seq: args.seq as usize,
        lr: args.lr,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every as usize,
    };
    let mut log = open_log(&args.out)?.file;
    let started = std::time::Instant::now();
    let mut first = None;
    let last = train(&tokens, &data.starts, shape, &opts, &args.out, &mut |r| {
        first.get_or_insert(r.loss);
        let _ = writeln!(
            log,
            "{}",
            json!({"step": r.step, "loss": r.loss, "seconds": started.elapsed().as_secs_f64()})
        );
        if r.step % 50 == 0 || r.step == opts.steps {
            eprintln!("step {} loss {:.4}", r.step, r.loss);
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut config = hf_config(&shape, data.eos.first().copied().unwrap_or(0));
    config["eos_token_id"] = json!(data.eos);
    write_file(&args.out.join("config.json"), config.to_string().as_bytes())?;
    write_file(
        &args.out.join("tokenizer_config.json"),
        json!({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": null})
            .to_string()
            .as_bytes(),
    )?;
    std::fs::copy(&tokenizer_path, args.out.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tokenizer_path.display()))?;
    let card = format!(
        "# Studio's demo language model\n\n\
         A tiny Llama ({hidden} wide, {layers} layers, {heads} heads, {vocab}-token byte-level \
         BPE) trained by Studio's own trainer on the data in `{data}` (see its `DATA.md`).\n\n\
         - {steps} steps of {batch} × {seq} tokens, AdamW, peak learning rate {lr}, seed \
         {seed};\n\
         - {tokens} training tokens; {seconds:.0} s on this machine's CPU;\n\
         - training loss {first:.3} → {last:.3} (the log is `loss.jsonl`).\n\n\
         Made by: `studio train lm --data {data} --out {out} --steps {steps} --batch {batch} \
         --seq {seq} --lr {lr} --seed {seed} --hidden {hidden} --layers {layers} --heads {heads}`\n",
        hidden = shape.hidden,
        layers = shape.layers,
        heads = shape.heads,
        vocab = shape.vocab,
        data = args.data.display(),
        out = args.out.display(),
        steps = opts.steps,
        batch = opts.batch,
        seq = opts.seq,
        lr = opts.lr,
        seed = opts.seed,
        tokens = tokens.len(),
        first = first.unwrap_or(f32::NAN),
    );
    write_file(&args.out.join("MODEL.md"), card.as_bytes())?;
    print!("{card}");
    Ok(())
}

fn lm_eval(args: &LmEvalArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let q = studio_inference::train::lm::evaluate(
        &args.model,
        &args.data,
        args.windows as usize,
        args.fim as usize,
    )
    .with_context(|| {
        format!(
            "measuring {} on {}",
            args.model.display(),
            args.data.display()
        )
    })?;
    let rate = q.fim_exact as f64 / q.fim_cases.max(1) as f64;
    if args.json {
        println!(
            "{}",
            json!({
                "held_out_loss": q.held_out_loss,
                "held_out_perplexity": q.held_out_loss.exp(),
                "held_out_tokens": q.held_out_tokens,
                "fim_cases": q.fim_cases,
                "fim_exact": q.fim_exact,
                "fim_exact_rate": rate,
            })
        );
    } else {
        println!(
            "held-out loss {:.3} nats/token (perplexity {:.1}) over {} tokens\n\
             FIM exact match {}/{} ({:.1} %) of held-out lines",
            q.held_out_loss,
            q.held_out_loss.exp(),
            q.held_out_tokens,
            q.fim_exact,
            q.fim_cases,
            rate * 100.0
        );
    }
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Tiles images of one size into a grid `cols` wide.
fn grid(
    images: &[studio_inference::diffusion::imaging::RgbImage],
    cols: usize,
) -> Result<studio_inference::diffusion::imaging::RgbImage> {
    let first = images.first().context("no images")?;
    let (w, h) = (first.width as usize, first.height as usize);
    let rows = images.len().div_ceil(cols);
    let mut pixels = vec![255u8; cols * w * rows * h * 3];
    for (i, img) in images.iter().enumerate() {
        let (gx, gy) = (i % cols, i / cols);
        for y in 0..h {
            let src = &img.pixels[y * w * 3..(y + 1) * w * 3];
            let at = ((gy * h + y) * cols * w + gx * w) * 3;
            pixels[at..at + w * 3].copy_from_slice(src);
        }
    }
    Ok(studio_inference::diffusion::imaging::RgbImage {
        width: u32::try_from(cols * w)?,
        height: u32::try_from(rows * h)?,
        pixels,
    })
}

fn gan(args: &GanArgs) -> Result<()> {
    use studio_inference::train::gan::{GanShape, GanTrainOptions, read_images, train};
    let images = read_images(&args.data, args.max_images as usize)
        .with_context(|| format!("reading the images in {}", args.data.display()))?;
    let side = images.side;
    eprintln!(
        "read {} images of {side}x{side}; skipped {} unreadable and {} of another size",
        images.read, images.unreadable, images.other_size
    );
    let shape = GanShape {
        resolution: side,
        z_dim: args.z_dim as usize,
        w_dim: args.z_dim as usize,
        mapping_layers: args.mapping_layers as usize,
        channel_base: args.channel_base as usize,
        channel_max: args.channel_max as usize,
    };
    let opts = GanTrainOptions {
        steps: args.steps as usize,
        batch: args.batch as usize,
        lr: args.lr,
        r1_gamma: args.gamma,
        ema_images: f64::from(args.ema_images),
        seed: args.seed,
        checkpoint_every: args.checkpoint_every as usize,
    };
    let mut log = open_log(&args.out)?.file;
    let started = std::time::Instant::now();
    let mut last = None;
    train(&images.pixels, shape, opts, &args.out, &mut |r| {
        let seconds = started.elapsed().as_secs_f64();
        let _ = writeln!(
            log,
            "{}",
            json!({"step": r.step, "loss_g": r.loss_g, "loss_d": r.loss_d, "r1": r.r1, "seconds": seconds})
        );
        if r.step % 50 == 0 || r.step == opts.steps {
            eprintln!(
                "step {} G {:.3} D {:.3} R1 {:.3} ({seconds:.0} s)",
                r.step, r.loss_g, r.loss_d, r.r1
            );
        }
        last = Some(r);
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let model = args.out.join("generator.safetensors");
    // The samples come through Studio's own loader, as the explorer renders them.
    let samples = studio_inference::train::gan::samples(&model, 16, 1.0)?;
    write_file(
        &args.out.join("samples.png"),
        &encode_png(&grid(&samples, 8)?, None)?,
    )?;
    let size = std::fs::metadata(&model).map_or(0, |m| m.len());
    let card = format!(
        "# Studio's demo GAN\n\n\
         A tiny StyleGAN2 (config F, 'skip'; {side}x{side}, z and w {z}, {m} mapping layers, \
         channels min({base} / r, {max})) trained by Studio's own trainer on {n} images of \
         `{data}`; `generator.safetensors` ({mb:.1} MB) holds the moving average in NVIDIA's \
         `G_ema` names, `generator.json` its init kwargs.\n\n\
         - {steps} steps of {batch} images, Adam (β₁ 0, β₂ 0.99) at {lr}, R1 γ {gamma}, \
         moving-average half-life {ema} images, seed {seed};\n\
         - {seconds:.0} s this run on this machine's CPU;\n\
         - final losses: G {lg:.3}, D {ld:.3}, R1 {r1:.3} (the log is `loss.jsonl`);\n\
         - `samples.png`: seeds 0 to 15, ψ 1, the stored noise.\n\n\
         Made by: `studio train gan --data {data} --out {out} --steps {steps} --batch {batch} \
         --lr {lr} --gamma {gamma} --ema-images {ema} --seed {seed} --z-dim {z} \
         --mapping-layers {m} --channel-base {base} --channel-max {max} --max-images {maxi}`\n",
        z = shape.z_dim,
        m = shape.mapping_layers,
        base = shape.channel_base,
        max = shape.channel_max,
        n = images.read,
        data = args.data.display(),
        out = args.out.display(),
        mb = size as f64 / 1e6,
        steps = opts.steps,
        batch = opts.batch,
        lr = opts.lr,
        gamma = opts.r1_gamma,
        ema = args.ema_images,
        seed = opts.seed,
        lg = last.map_or(f32::NAN, |r| r.loss_g),
        ld = last.map_or(f32::NAN, |r| r.loss_d),
        r1 = last.map_or(f32::NAN, |r| r.r1),
        maxi = args.max_images,
    );
    write_file(&args.out.join("MODEL.md"), card.as_bytes())?;
    print!("{card}");
    Ok(())
}

fn gan_eval(args: &GanEvalArgs) -> Result<()> {
    use studio_inference::train::faces::read;
    let n = args.samples as usize;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    files.truncate(n);
    let mut real = Vec::new();
    for path in &files {
        if let Ok(decoded) = decode_image_file(path)
            && let Some(face) = read(&decoded.image)
        {
            real.push(face.describe());
        }
    }
    if real.is_empty() {
        bail!("{} holds no images that read as faces", args.data.display());
    }
    let generated: Vec<String> = studio_inference::train::gan::samples(&args.model, n, args.psi)?
        .iter()
        .filter_map(|img| read(img).map(|f| f.describe()))
        .collect();
    let made: std::collections::BTreeSet<&str> = generated.iter().map(String::as_str).collect();
    let precision = generated.len() as f64 / n as f64;
    let recall =
        real.iter().filter(|r| made.contains(r.as_str())).count() as f64 / real.len() as f64;
    let combos = |faces: &[String]| {
        faces
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    if args.json {
        println!(
            "{}",
            json!({
                "samples": n,
                "precision": precision,
                "recall": recall,
                "real_faces": real.len(),
                "real_combinations": combos(&real),
                "generated_faces": generated.len(),
                "generated_combinations": combos(&generated),
            })
        );
    } else {
        println!(
            "precision {:.1} % ({} of {n} samples read as faces), recall {:.1} % (of {} real \
             faces, the share whose factor combination a sample has; {} of {} combinations made)",
            precision * 100.0,
            generated.len(),
            recall * 100.0,
            real.len(),
            combos(&generated),
            combos(&real)
        );
    }
    Ok(())
}

fn sd(args: &SdArgs) -> Result<()> {
    use studio_inference::train::sd::{
        ClipShape, SdShape, SdTrainOptions, UnetLevel, UnetShape, VaeShape, read_captioned,
        train_sd,
    };
    // The device first: a wrong `--device` is reported before the images are read.
    let device = crate::cli::common::open_device(None, &args.device)?;
    let data = read_captioned(&args.data, args.max_images as usize)
        .with_context(|| format!("reading the captioned images in {}", args.data.display()))?;
    eprintln!(
        "read {} captioned images; skipped {}",
        data.captions.len(),
        data.skipped
    );
    let (text, unet, vae) = (
        args.text_width as usize,
        args.unet_channels as usize,
        args.vae_channels as usize,
    );
    let heads = (text / 16).max(1);
    if !text.is_multiple_of(heads) {
        bail!("--text-width {text} does not split into {heads} attention heads of 16");
    }
    let vae_shape = VaeShape {
        channels: std::iter::once(vae)
            .chain(std::iter::repeat_n(2 * vae, args.vae_levels as usize - 1))
            .collect(),
        layers_per_block: 1,
        latent: 4,
        groups: 8,
    };
    let factor = vae_shape.factor();
    if args
        .vae_crop
        .is_some_and(|c| !(c as usize).is_multiple_of(factor))
    {
        bail!("--vae-crop must be a multiple of the VAE's factor ({factor})");
    }
    if !unet.is_multiple_of(8) || !vae.is_multiple_of(8) {
        bail!(
            "--unet-channels and --vae-channels must be multiples of 8 (the group norm's groups)"
        );
    }
    let shape = SdShape {
        clip: ClipShape {
            // Set from the tokenizer the run writes.
            vocab: 0,
            hidden: text,
            layers: 2,
            heads,
            intermediate: 2 * text,
            positions: 77,
        },
        vae: vae_shape,
        unet: UnetShape {
            levels: vec![
                UnetLevel {
                    channels: unet,
                    attention: true,
                    heads: (unet / 16).max(1),
                },
                UnetLevel {
                    channels: 2 * unet,
                    attention: true,
                    heads: (unet / 8).max(1),
                },
            ],
            layers_per_block: 1,
            cross_dim: text,
            groups: 8,
            sample_size: data.pixels_side() / factor,
        },
    };
    let shape_channels = shape.vae.channels.clone();
    let opts = SdTrainOptions {
        vae_steps: args.vae_steps as usize,
        vae_crop: args.vae_crop.map(|c| c as usize),
        decoder_steps: args.decoder_steps as usize,
        unet_steps: args.unet_steps as usize,
        batch: args.batch as usize,
        lr: args.lr,
        caption_dropout: 0.1,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every as usize,
        min_snr_gamma: args.min_snr_gamma,
        unet_cooldown: args.unet_cooldown as usize,
        offset_noise: args.offset_noise,
    };
    eprintln!("training on {}", device.label);
    let RunLog {
        file: mut log,
        mut last,
    } = open_log(&args.out)?;
    let started = std::time::Instant::now();
    train_sd(
        &data,
        shape,
        opts,
        &args.out,
        args.init.as_deref(),
        &device.device,
        &mut |r| {
            let seconds = started.elapsed().as_secs_f64();
            let _ = writeln!(
                log,
                "{}",
                json!({"phase": r.phase, "step": r.step, "loss": r.loss, "seconds": seconds})
            );
            if r.step % 50 == 0 {
                eprintln!(
                    "{} step {} loss {:.4} ({seconds:.0} s)",
                    r.phase, r.step, r.loss
                );
            }
            last.insert(r.phase.to_owned(), r.loss);
        },
    )?;
    let card = format!(
        "# Studio's demo text-to-image model\n\n\
         A tiny Stable Diffusion (SD 1.x architecture in the diffusers layout: CLIP text encoder \
         {text} wide, 2 layers; VAE with channels {channels}, factor {factor}, 4 latent \
         channels; UNet with two cross-attention levels of {unet} and {u2} channels) trained by \
         Studio's own trainer on {n} captioned shape scenes of `{data}`{from}.\n\n\
         - {vs} VAE steps, {ds} decoder steps, then {us} UNet + text-encoder steps, of {batch} \
         images; Adam at {lr}{cooldown}{snr}{offset}; 10 % of captions dropped for guidance; \
         seed {seed};\n\
         - {seconds:.0} s this run on {on};\n\
         - last losses: VAE reconstruction {lv}, decoder {ld}, noise prediction {lu} \
         (`loss.jsonl`).\n\n\
         Made by: `studio train sd --data {data} --out {out} --vae-steps {vs} --decoder-steps \
         {ds} --unet-steps {us} --batch {batch} --lr {lr} --seed {seed} --text-width {text} \
         --unet-channels {unet} --vae-channels {vae} --vae-levels {levels}{crop} --max-images \
         {maxi}{init}{unet_flags}`\n",
        levels = args.vae_levels,
        on = device.label,
        snr = opts
            .min_snr_gamma
            .map(|g| format!(", the UNet's error weighted by Min-SNR-γ (γ = {g})"))
            .unwrap_or_default(),
        unet_flags = flag("min-snr-gamma", opts.min_snr_gamma)
            + &flag(
                "unet-cooldown",
                (opts.unet_cooldown > 0).then_some(opts.unet_cooldown)
            )
            + &flag(
                "offset-noise",
                (opts.offset_noise > 0.0).then_some(opts.offset_noise)
            ),
        offset = if opts.offset_noise > 0.0 {
            format!(", offset noise {}", opts.offset_noise)
        } else {
            String::new()
        },
        cooldown = if opts.unet_cooldown > 0 {
            format!(
                ", lowered linearly towards zero over the last {} UNet steps",
                opts.unet_cooldown
            )
        } else {
            String::new()
        },
        crop = flag("vae-crop", args.vae_crop),
        from = args
            .init
            .as_ref()
            .map(|p| format!(", starting from the weights of `{}`", p.display()))
            .unwrap_or_default(),
        init = flag("init", args.init.as_ref().map(|p| p.display())),
        ds = opts.decoder_steps,
        ld = loss_text(&last, "decoder"),
        channels = shape_channels
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        u2 = 2 * unet,
        n = data.captions.len(),
        data = args.data.display(),
        out = args.out.display(),
        vs = opts.vae_steps,
        us = opts.unet_steps,
        batch = opts.batch,
        lr = opts.lr,
        seed = opts.seed,
        seconds = started.elapsed().as_secs_f64(),
        lv = loss_text(&last, "vae"),
        lu = loss_text(&last, "unet"),
        maxi = args.max_images,
    );
    write_file(&args.out.join("MODEL.md"), card.as_bytes())?;
    print!("{card}");
    Ok(())
}

/// ` --name value` for a flag a run was given, nothing for one it was not (a model card's
/// command line).
fn flag(name: &str, value: Option<impl std::fmt::Display>) -> String {
    value.map(|v| format!(" --{name} {v}")).unwrap_or_default()
}

/// The `(file, caption)` pairs of a `shapes-data` folder's `captions.jsonl`, in order.
fn captions_of(dir: &std::path::Path) -> Result<Vec<(String, String)>> {
    let path = dir.join("captions.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["file"].as_str()?.to_owned(),
                v["caption"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// The VAE's round trip of `dir/file` (a `shapes-data` image): encoded to latents, decoded.
fn round_trip(
    m: &studio_inference::diffusion::model::SdModel,
    dir: &std::path::Path,
    file: &str,
) -> Result<RgbImage> {
    use studio_inference::diffusion::imaging::{image_to_tensor, tensor_to_image};
    let path = studio_inference::train::sd::folder_entry(dir, file)
        .with_context(|| format!("{} names {file}, which is not in the folder", dir.display()))?;
    let image = decode_image_file(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .image;
    let latents = m.vae.encode(&image_to_tensor(&image, &m.device)?)?;
    Ok(tensor_to_image(&m.vae.decode(&latents)?)?)
}

/// `prompt`'s image at `side`, seed `seed`, as `args` say.
fn generate_one(
    m: &studio_inference::diffusion::model::SdModel,
    args: &SdEvalArgs,
    side: u32,
    seed: usize,
    prompt: &str,
) -> Result<RgbImage> {
    use studio_inference::diffusion::pipeline::{ImageRequest, generate};
    let req = ImageRequest {
        steps: args.steps as usize,
        cfg_scale: args.cfg,
        seed: Some(seed as u64),
        width: side,
        height: side,
        ..ImageRequest::new(prompt.to_owned())
    };
    let result = generate(m, &req, &mut |_| std::ops::ControlFlow::Continue(()))
        .with_context(|| format!("generating `{prompt}`"))?;
    Ok(result.images.into_iter().next().context("no image")?.image)
}

fn sd_eval(args: &SdEvalArgs) -> Result<()> {
    use studio_inference::diffusion::model::{self, ImageModelOptions};
    let seen: std::collections::HashSet<String> = match &args.train {
        Some(dir) => captions_of(dir)?.into_iter().map(|(_, c)| c).collect(),
        None => std::collections::HashSet::new(),
    };
    let (files, prompts): (Vec<String>, Vec<String>) = captions_of(&args.data)?
        .into_iter()
        .filter(|(_, c)| !seen.contains(c))
        .take(args.count as usize)
        .unzip();
    if prompts.is_empty() {
        bail!(
            "{} has no captions outside the training set",
            args.data.display()
        );
    }
    let cpu =
        studio_inference::device::create_device(studio_inference::device::DevicePreference::Cpu);
    let m = model::load(
        &args.model,
        &ImageModelOptions::default(),
        &cpu.device,
        &mut |_, _| {},
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let side = args.size.unwrap_or(m.info.default_size.0);
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let started = std::time::Instant::now();
    let (mut passed, mut lines) = (0usize, Vec::new());
    let mut failures = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let scene =
            Scene::parse(prompt).with_context(|| format!("`{prompt}` is not a shape caption"))?;
        let image = if args.reconstruct {
            round_trip(&m, &args.data, &files[i])?
        } else {
            generate_one(&m, args, side, i, prompt)?
        };
        let verdict = check(&image, &scene);
        if verdict.passed {
            passed += 1;
        } else {
            failures.push(json!({"caption": prompt, "problems": verdict.problems}));
        }
        if let Some(out) = &args.out {
            let file = format!("{i:04}.png");
            write_file(&out.join(&file), &encode_png(&image, Some(prompt))?)?;
            writeln!(lines, "{}", json!({"file": file, "caption": prompt}))?;
        }
    }
    if let Some(out) = &args.out {
        write_file(&out.join("captions.jsonl"), &lines)?;
    }
    let share = passed as f64 / prompts.len() as f64;
    if args.json {
        println!(
            "{}",
            json!({"prompts": prompts.len(), "passed": passed, "adherence": share,
                   "steps": args.steps, "cfg": args.cfg, "size": side,
                   "reconstruct": args.reconstruct, "failures": failures})
        );
    } else if args.reconstruct {
        println!(
            "{passed} of {} held-out images pass after the VAE's round trip ({:.1} %)",
            prompts.len(),
            share * 100.0
        );
    } else {
        println!(
            "{passed} of {} held-out prompts followed ({:.1} %), {} steps, CFG {}, {side}x{side}",
            prompts.len(),
            share * 100.0,
            args.steps,
            args.cfg
        );
    }
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
