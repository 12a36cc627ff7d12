//! Generating images: txt2img, img2img and inpainting (with inpainting checkpoints' 9-channel
//! UNet, or with ordinary checkpoints by re-noising the kept latents to the current step and
//! blending every step), with a preview after every denoising step.
//!
//! Outpainting is inpainting of a grown canvas: the caller enlarges the image, fills the new
//! area and masks it.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::controlnet::{ControlResiduals, ControlUnit, control_tensor};
use super::embeddings::{TextualInversion, load_mentioned};
use super::hires::{HiresFix, generate_hires};
use super::imaging::{
    Mask, RgbImage, composite, image_to_tensor, mask_to_latent_tensor, tensor_to_image,
};
use super::inpaint::{
    InpaintArea, InpaintOptions, MaskedContent, crop_mask, crop_region, fill, paste,
};
use super::model::{SdKind, SdModel, TextEncoder};
use super::noise::{NoiseSource, NoiseStream, Variation, slerp_variation};
use super::preview::latent_to_rgb;
use super::samplers::{Prediction, Sampler, SamplerKind, ScheduleKind, denoised_from_output};
use crate::error::{Error, Result};
use crate::image_meta::GenerationParameters;

/// How the per-step preview is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PreviewMethod {
    /// A linear latent→RGB projection at latent resolution (nearly free).
    #[default]
    Latent2Rgb,
    /// The TAESD tiny decoder (full resolution; needs its weights loaded).
    Taesd,
    /// No previews.
    None,
}

impl PreviewMethod {
    /// The CLI name (`latent2rgb`, `taesd`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            PreviewMethod::Latent2Rgb => "latent2rgb",
            PreviewMethod::Taesd => "taesd",
            PreviewMethod::None => "none",
        }
    }

    /// Reads a CLI name as [`PreviewMethod::name`] writes it, in any case; `None` otherwise.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "latent2rgb" => Some(PreviewMethod::Latent2Rgb),
            "taesd" => Some(PreviewMethod::Taesd),
            "none" => Some(PreviewMethod::None),
            _ => None,
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageMode {
    /// From pure noise, guided by the prompt alone.
    Txt2Img,
    /// Start from `init`, running the last `int(strength·steps)` steps.
    Img2Img {
        /// The starting image; resized to the request's size.
        init: RgbImage,
        /// Denoising strength, 0 to 1: the share of the steps run (at least one); higher strays
        /// further from `init`.
        strength: f64,
    },
    /// Repaint the white part of `mask` (any size; resized to the image), as the request's
    /// [`InpaintOptions`] say: the whole picture at the request's size, or only the masked
    /// region worked on at the request's size and pasted back into `init` at its own size.
    Inpaint {
        /// The image to repaint; resized to the request's size.
        init: RgbImage,
        /// 255 = repaint, 0 = keep; must not be empty.
        mask: Mask,
        /// Denoising strength, 0 to 1, as for img2img; 1 on an inpainting checkpoint starts the
        /// repainted area from pure noise.
        strength: f64,
        /// Gaussian blur of the mask edge, in pixels.
        mask_blur: f32,
    },
}

impl ImageMode {
    /// The mode's short name: `txt2img`, `img2img` or `inpaint`.
    pub fn label(&self) -> &'static str {
        match self {
            ImageMode::Txt2Img => "txt2img",
            ImageMode::Img2Img { .. } => "img2img",
            ImageMode::Inpaint { .. } => "inpaint",
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    /// What to generate, with emphasis syntax (`(word:1.2)`, `BREAK`); longer than 75
    /// tokens is fine (see [`super::prompt`]).
    pub prompt: String,
    /// What to steer away from; used only when `cfg_scale > 1`. Empty on SDXL means
    /// zeroed conditioning, as SDXL was trained.
    pub negative_prompt: String,
    /// Denoising steps, 1 to 500 (img2img and inpainting run a `strength` share of them).
    pub steps: usize,
    /// Classifier-free guidance; `<= 1` runs the UNet once per step without the negative
    /// prompt (Turbo/LCM models).
    pub cfg_scale: f64,
    /// `None`: a random seed (reported in the result).
    pub seed: Option<u64>,
    /// The sampling algorithm.
    pub sampler: SamplerKind,
    /// How the sigmas are spaced over the steps (ignored by DDIM and LCM).
    pub schedule: ScheduleKind,
    /// Image width in pixels: a multiple of the model's `size_multiple` (8; 64 for SDXL),
    /// at most 4096.
    pub width: u32,
    /// Image height in pixels, with the same rules as `width`.
    pub height: u32,
    /// Images generated one after another, with seeds `seed`, `seed + 1`, …
    pub batch_count: u32,
    /// Where a seed's noise comes from (PyTorch's CPU generator reproduces ComfyUI's and the
    /// SD web UI's "CPU" images).
    pub noise_source: NoiseSource,
    /// A variation seed and strength (the web UI's subseed); image `i` of a batch uses
    /// `seed + i` with variation seed `variation.seed + i`.
    pub variation: Option<Variation>,
    /// Inpainting: the area worked on and what the masked area starts from.
    pub inpaint: InpaintOptions,
    /// txt2img: a second, larger pass (the web UI's hires fix).
    pub hires: Option<HiresFix>,
    /// Textual-inversion files; each is used where its stem appears as a word in the prompt
    /// or the negative prompt.
    pub embeddings: Vec<PathBuf>,
    /// 1 = the encoder's usual layer; 2 = one layer earlier ("Clip skip: 2").
    pub clip_skip: usize,
    /// How each step's preview is made ([`PreviewMethod::Taesd`] needs a loaded TAESD).
    pub preview: PreviewMethod,
    /// txt2img, img2img or inpainting, with the images they start from.
    pub mode: ImageMode,
    /// ControlNet units; their residuals add up.
    pub control: Vec<ControlUnit>,
    /// With a refiner ([`generate_with_refiner`]): the share of the steps after which it takes
    /// over (the web UI's "Switch at", 0 to 1).
    pub refiner_switch_at: f64,
}

impl ImageRequest {
    /// A txt2img request with the defaults users know (20 steps, CFG 7, Euler a, 512²).
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.0,
            seed: None,
            sampler: SamplerKind::EulerAncestral,
            schedule: ScheduleKind::Normal,
            width: 512,
            height: 512,
            batch_count: 1,
            noise_source: NoiseSource::Studio,
            variation: None,
            inpaint: InpaintOptions::default(),
            hires: None,
            embeddings: Vec::new(),
            clip_skip: 1,
            preview: PreviewMethod::Latent2Rgb,
            mode: ImageMode::Txt2Img,
            control: Vec::new(),
            refiner_switch_at: 0.8,
        }
    }
}

/// Reported after every denoising step.
#[derive(Debug, Clone)]
pub struct StepUpdate {
    /// Which image of the batch (0-based).
    pub image: u32,
    /// How many images the batch has.
    pub images: u32,
    /// Steps done (1-based) out of `steps` for this image.
    pub step: usize,
    /// Steps this image runs: all of the request's, or its `strength` share for img2img and
    /// inpainting.
    pub steps: usize,
    /// A preview of the current denoised (x0) estimate, made as the request's `preview`
    /// says; `None` when previews are off.
    pub preview: Option<RgbImage>,
}

/// A finished image.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    /// The decoded image at the requested size (inpainting: composited over the original
    /// through the blurred mask).
    pub image: RgbImage,
    /// The seed that reproduces it: the batch's base seed plus the image's index.
    pub seed: u64,
    /// Its generation parameters, as the SD web UI writes them into PNG metadata.
    pub parameters: GenerationParameters,
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The finished images in batch order (on cancel, those done before it).
    pub images: Vec<GeneratedImage>,
    /// Stopped early by the step callback.
    pub cancelled: bool,
}

/// One image's noise: its seed's stream, with the first draw blended towards the variation
/// seed's.
struct Noise {
    stream: NoiseStream,
    variation: Option<(NoiseSource, Variation)>,
}

impl Noise {
    fn new(req: &ImageRequest, seed: u64, index: u32) -> Self {
        Self {
            stream: NoiseStream::new(req.noise_source, seed),
            variation: req.variation.filter(|v| v.strength > 0.0).map(|v| {
                let seed = v.seed.wrapping_add(u64::from(index));
                (req.noise_source, Variation { seed, ..v })
            }),
        }
    }

    /// The first noise (the variation applies to it).
    fn first(&mut self, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut v = self.stream.draw(n);
        if let Some((source, variation)) = self.variation {
            let other = NoiseStream::new(source, variation.seed).draw(n);
            v = slerp_variation(
                variation.strength,
                &v,
                &other,
                (shape.0 * shape.1, shape.2, shape.3),
            );
        }
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// The sampler's noise after the first.
    fn tensor(&mut self, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Ok(Tensor::from_vec(self.stream.draw(n), shape, device)?)
    }
}

/// Text conditioning for one prompt.
struct Conditioning {
    context: Tensor,
    pooled: Option<Tensor>,
}

/// One model's conditioning for the whole batch (negative first with CFG).
struct Stage {
    context: Tensor,
    pooled: Option<Tensor>,
    /// SDXL's size ids (original size, crop, target size), or the refiner's (original size,
    /// crop, aesthetic score: 2.5 for the negative pass, 6 for the prompt's, diffusers'
    /// defaults).
    time_ids: Option<Tensor>,
}

impl Stage {
    fn new(
        model: &SdModel,
        req: &ImageRequest,
        (prompt, negative): (&str, &str),
        tis: &[TextualInversion],
        batch: usize,
    ) -> Result<Self> {
        let device = &model.device;
        let chunks = chunk_count(model, prompt, tis).max(chunk_count(model, negative, tis));
        let cond = encode_prompt(model, prompt, chunks, req.clip_skip, tis)?;
        let uncond = if batch == 1 {
            None
        } else if model.info.kind == SdKind::Sdxl
            && !model.is_refiner()
            && req.negative_prompt.trim().is_empty()
        {
            // SDXL was trained with zeroed embeddings for an empty negative prompt.
            Some(Conditioning {
                context: cond.context.zeros_like()?,
                pooled: cond.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
            })
        } else {
            Some(encode_prompt(model, negative, chunks, req.clip_skip, tis)?)
        };
        let (context, pooled) = match &uncond {
            Some(u) => (
                Tensor::cat(&[&u.context, &cond.context], 0)?,
                match (&u.pooled, &cond.pooled) {
                    (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                    _ => None,
                },
            ),
            None => (cond.context.clone(), cond.pooled.clone()),
        };
        #[allow(clippy::cast_precision_loss)]
        let (hf, wf) = (req.height as f32, req.width as f32);
        let time_ids = if model.is_refiner() {
            let scores: &[f32] = if batch == 2 { &[2.5, 6.0] } else { &[6.0] };
            let rows: Vec<f32> = scores.iter().flat_map(|&a| [hf, wf, 0.0, 0.0, a]).collect();
            Some(Tensor::from_vec(rows, (batch, 5), device)?.to_dtype(model.dtype)?)
        } else if model.info.kind == SdKind::Sdxl {
            let row = [hf, wf, 0.0, 0.0, hf, wf];
            let rows: Vec<f32> = (0..batch).flat_map(|_| row).collect();
            Some(Tensor::from_vec(rows, (batch, 6), device)?.to_dtype(model.dtype)?)
        } else {
            None
        };
        Ok(Self {
            context,
            pooled,
            time_ids,
        })
    }

    fn text_time(&self) -> Option<(&Tensor, &Tensor)> {
        self.pooled.as_ref().zip(self.time_ids.as_ref())
    }
}

pub(super) fn validate(model: &SdModel, req: &ImageRequest) -> Result<()> {
    let m = model.info.size_multiple;
    let invalid = |s: String| Err(Error::InvalidParameter(s));
    if req.width == 0
        || req.height == 0
        || !req.width.is_multiple_of(m)
        || !req.height.is_multiple_of(m)
    {
        let round = |v: u32| (v.max(m) / m) * m;
        return invalid(format!(
            "size {}x{}: width and height must be multiples of {m} for {} (try {}x{})",
            req.width,
            req.height,
            model.info.kind.label(),
            round(req.width),
            round(req.height)
        ));
    }
    if req.width > 4096 || req.height > 4096 {
        return invalid(format!(
            "size {}x{} is larger than 4096 on a side; generate smaller and upscale",
            req.width, req.height
        ));
    }
    if req.steps == 0 || req.steps > 500 {
        return invalid(format!(
            "steps must be between 1 and 500, not {}",
            req.steps
        ));
    }
    if !(0.0..=50.0).contains(&req.cfg_scale) {
        return invalid(format!(
            "CFG scale must be between 0 and 50, not {}",
            req.cfg_scale
        ));
    }
    if req.batch_count == 0 || req.batch_count > 100 {
        return invalid(format!(
            "batch count must be between 1 and 100, not {}",
            req.batch_count
        ));
    }
    check_memory(model, req)?;
    for unit in &req.control {
        unit.validate()?;
        let c = &unit.net.config().unet;
        let u = model.unet.config();
        if c.cross_attention_dim != u.cross_attention_dim
            || c.levels.len() != u.levels.len()
            || c.text_time.is_some() != u.text_time.is_some()
        {
            return invalid(format!(
                "the ControlNet {} is made for another base model than this {} model \
                 (text width {} vs {})",
                unit.net.path().display(),
                model.info.kind.label(),
                c.cross_attention_dim,
                u.cross_attention_dim
            ));
        }
    }
    if let ImageMode::Img2Img { strength, .. } | ImageMode::Inpaint { strength, .. } = &req.mode
        && !(0.0..=1.0).contains(strength)
    {
        return invalid(format!(
            "denoising strength must be between 0 and 1, not {strength}"
        ));
    }
    Ok(())
}

/// Bytes a generation at `width × height` needs beyond the loaded weights (f32 activations):
/// the larger of a UNet step's working set and the VAE decode's. CPU allocations that fail
/// abort the process instead of returning an error, so this is checked against the memory
/// available before starting.
///
/// - UNet: each level's activations (the skip connections are held until the up path: about
///   four maps per level), plus, at the first attention level, the transformer's queries,
///   keys, values and output and its feed-forward (`8·C` wide, then GEGLU's `4·C`): about 16
///   maps of `tokens × C`. With Studio's attention kernel that is all (its scores are a block
///   of queries at a time); candle's attention (other CPUs) materialises
///   `batch × heads × tokens²` scores, about three times over with the softmax.
/// - VAE decode: at full size, the last up block's 256-channel input and about six maps of its
///   128 channels (input, GroupNorm output where candle runs it, the convolution's
///   channels-last copies and result, the residual sum) alive at once; the bands of
///   [`super::vae_blocks::MemoryBudget`] bound the rest.
pub fn working_bytes(model: &SdModel, width: u32, height: u32, batch: usize) -> u64 {
    let cfg = model.unet.config();
    let f = model.vae.config().factor() as u64;
    let (lw, lh) = (u64::from(width) / f, u64::from(height) / f);
    let batch = batch as u64;
    let tokens = |level: usize| (lw >> level).max(1) * (lh >> level).max(1);
    let mut unet = 0u64;
    for (i, level) in cfg.levels.iter().enumerate() {
        unet += 4 * batch * tokens(i) * level.channels as u64 * 4;
    }
    if let Some((i, level)) = cfg
        .levels
        .iter()
        .enumerate()
        .find(|(_, l)| l.transformer_layers.is_some())
    {
        let t = tokens(i);
        unet += 16 * batch * t * level.channels as u64 * 4;
        if crate::nn::default_kernels(&model.device).is_none() {
            unet += 3 * batch * level.heads as u64 * t * t * 4;
        }
    }
    let vae_channels = &model.vae.config().block_out_channels;
    let pixels = u64::from(width) * u64::from(height);
    let c0 = vae_channels.first().copied().unwrap_or(128) as u64;
    let c1 = vae_channels.get(1).copied().unwrap_or(256) as u64;
    let vae = (6 * c0 + c1) * pixels * 4;
    unet.max(vae)
}

fn check_memory(model: &SdModel, req: &ImageRequest) -> Result<()> {
    if !model.device.is_cpu() {
        return Ok(()); // GPU allocations fail with an error, which is reported with a hint
    }
    let Some(available) = crate::sys::available_memory_bytes() else {
        return Ok(());
    };
    let batch = if req.cfg_scale > 1.0 { 2 } else { 1 };
    memory_fits(
        working_bytes(model, req.width, req.height, batch),
        available,
        req,
        model.info.default_size,
    )
}

/// The refusal, naming the estimate, when `need` bytes exceed the `available`.
fn memory_fits(need: u64, available: u64, req: &ImageRequest, native: (u32, u32)) -> Result<()> {
    if need <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    Err(Error::InvalidParameter(format!(
        "{}x{} needs about {:.1} GiB of working memory besides the model but {:.1} GiB is \
         free: try a smaller size (the model's own is {}x{}) and upscale",
        req.width,
        req.height,
        gib(need),
        gib(available),
        native.0,
        native.1
    )))
}

/// Encodes a prompt with every text encoder of the model (chunks of 75 tokens, emphasis
/// weights), concatenating encoders along the feature axis (SDXL).
fn encode_prompt(
    model: &SdModel,
    prompt: &str,
    chunks: usize,
    clip_skip: usize,
    tis: &[TextualInversion],
) -> Result<Conditioning> {
    let mut per_encoder = Vec::new();
    let mut pooled = None;
    for enc in &model.text {
        let (words, table) = ti_words(enc, tis);
        let parts = enc.tokenizer.chunks_with_words(prompt, chunks, &words);
        let mut hidden_chunks = Vec::new();
        for (ci, chunk) in parts.iter().take(chunks).enumerate() {
            let ids = Tensor::new(chunk.ids.as_slice(), &model.device)?.unsqueeze(0)?;
            let n = enc.model.num_layers();
            let skip = enc.skip + clip_skip.saturating_sub(1);
            let eos =
                super::clip::eos_positions(std::slice::from_ref(&chunk.ids), enc.tokenizer.eos());
            let out = enc.model.encode_with(
                &ids,
                table.as_ref(),
                n.saturating_sub(skip).max(1),
                enc.final_norm,
                &eos,
            )?;
            let mut h = out.hidden;
            if chunk.is_weighted() {
                let before = h.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
                let w = Tensor::new(chunk.weights.as_slice(), &model.device)?
                    .to_dtype(h.dtype())?
                    .reshape((1, chunk.weights.len(), 1))?;
                h = h.broadcast_mul(&w)?;
                let after = h.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
                if after.abs() > f32::EPSILON {
                    h = (h * f64::from(before / after))?;
                }
            }
            hidden_chunks.push(h);
            if ci == 0 && out.pooled.is_some() {
                pooled = out.pooled;
            }
        }
        per_encoder.push(Tensor::cat(&hidden_chunks, 1)?);
    }
    let context = if per_encoder.len() == 1 {
        per_encoder.remove(0)
    } else {
        Tensor::cat(&per_encoder, D::Minus1)?
    };
    Ok(Conditioning {
        context: context.to_dtype(model.dtype)?,
        pooled,
    })
}

fn chunk_count(model: &SdModel, text: &str, tis: &[TextualInversion]) -> usize {
    model.text.first().map_or(1, |enc| {
        let (words, _) = ti_words(enc, tis);
        enc.tokenizer.chunks_with_words(text, 1, &words).len()
    })
}

/// The words of the embeddings `enc` can read (its width) with their ids past the
/// vocabulary, and the table of their vectors.
fn ti_words(
    enc: &TextEncoder,
    tis: &[TextualInversion],
) -> (Vec<(String, Vec<u32>)>, Option<Tensor>) {
    let config = enc.model.config();
    let mut words = Vec::new();
    let mut rows = Vec::new();
    let mut next = config.vocab_size;
    for ti in tis {
        let Some(v) = ti.vectors(config.hidden_size) else {
            continue;
        };
        let n = v.dim(0).unwrap_or(0);
        // Ids past a vocabulary of at most a few hundred thousand, plus at most 75 each.
        #[allow(clippy::cast_possible_truncation)]
        let ids = (next..next + n).map(|i| i as u32).collect();
        next += n;
        words.push((ti.name.clone(), ids));
        rows.push(v.clone());
    }
    let table = if rows.is_empty() {
        None
    } else {
        Tensor::cat(&rows, 0).ok()
    };
    (words, table)
}

/// Generates `req.batch_count` images, calling `on_step` after every step (return
/// `ControlFlow::Break` to stop; what finished so far is returned with `cancelled` set).
pub fn generate(
    model: &SdModel,
    req: &ImageRequest,
    on_step: &mut dyn FnMut(StepUpdate) -> ControlFlow<()>,
) -> Result<Outcome> {
    generate_with_refiner(model, None, req, on_step)
}

/// [`generate`] with an SDXL refiner taking over after `req.refiner_switch_at` of the steps
/// (the web UI's "Refiner"): the same sampler goes on with the refiner's UNet and its own text
/// encoder and aesthetic-score conditioning. With the hires fix it refines the second pass.
pub fn generate_with_refiner(
    model: &SdModel,
    refiner: Option<&SdModel>,
    req: &ImageRequest,
    on_step: &mut dyn FnMut(StepUpdate) -> ControlFlow<()>,
) -> Result<Outcome> {
    validate(model, req)?;
    if let Some(r) = refiner {
        if !(0.0..=1.0).contains(&req.refiner_switch_at) {
            return Err(Error::InvalidParameter(format!(
                "refiner switch at {} is out of range (0 to 1)",
                req.refiner_switch_at
            )));
        }
        if r.latent_format() != model.latent_format() {
            return Err(Error::InvalidParameter(format!(
                "the refiner {} ({}) works in another latent space than this {} model",
                r.info.name,
                r.info.kind.label(),
                model.info.kind.label()
            )));
        }
    }
    if let ImageMode::Inpaint {
        init,
        mask,
        strength,
        mask_blur,
    } = &req.mode
        && req.inpaint.area == InpaintArea::OnlyMasked
    {
        return generate_only_masked(
            model,
            refiner,
            req,
            (init, mask, *strength, *mask_blur),
            on_step,
        );
    }
    if let (Some(hires), ImageMode::Txt2Img) = (&req.hires, &req.mode) {
        return generate_hires(model, refiner, req, hires, on_step);
    }
    generate_core(model, refiner, req, None, on_step).map(|(outcome, _)| outcome)
}

/// One pass of [`generate`] (no hires fix, no only-masked crop), also returning each image's
/// final latents. `init_latents` (img2img only: the hires fix's enlarged latents) replaces the
/// init image's encoding.
pub(super) fn generate_core(
    model: &SdModel,
    refiner: Option<&SdModel>,
    req: &ImageRequest,
    init_override: Option<&Tensor>,
    on_step: &mut dyn FnMut(StepUpdate) -> ControlFlow<()>,
) -> Result<(Outcome, Vec<Tensor>)> {
    if req.preview == PreviewMethod::Taesd && model.taesd.is_none() {
        return Err(Error::InvalidParameter(
            "TAESD previews need a TAESD decoder: choose its file in the Canvas settings or \
             use the latent2rgb preview"
                .into(),
        ));
    }
    let device = &model.device;
    let (w, h) = (req.width as usize, req.height as usize);
    let f = model.vae.config().factor();
    let (lw, lh) = (w / f, h / f);
    let guidance = req.cfg_scale > 1.0;
    // `<lora:…>` tags chose the networks merged at load; the text encoder reads the rest.
    let (_, prompt) = super::lora::parse_prompt(&req.prompt);
    let (_, negative) = super::lora::parse_prompt(&req.negative_prompt);
    let tis = load_mentioned(&req.embeddings, &[&prompt, &negative])?;
    let batch = if guidance { 2 } else { 1 };
    let base = Stage::new(model, req, (&prompt, &negative), &tis, batch)?;
    // The refiner takes over for the steps after its switch point, with its own encoder.
    let refined = match refiner {
        Some(r) => Some(Stage::new(r, req, (&prompt, &negative), &tis, batch)?),
        None => None,
    };

    // Image-conditioned modes: the init image's latents and, for inpainting, the mask.
    let inpaint_model = model.unet.config().in_channels == 9;
    let (init_latents, strength, mask_img, mask_blur, original) = match &req.mode {
        ImageMode::Txt2Img => (None, 1.0, None, 0.0, None),
        ImageMode::Img2Img { init, strength } => {
            let img = init.resized(req.width, req.height);
            let lat = match init_override {
                Some(lat) => lat.clone(),
                None => model.vae.encode(&image_to_tensor(&img, device)?)?,
            };
            (Some(lat), *strength, None, 0.0, Some(img))
        }
        ImageMode::Inpaint {
            init,
            mask,
            strength,
            mask_blur,
        } => {
            let img = init.resized(req.width, req.height);
            let m = mask.resized(req.width, req.height);
            if m.is_empty() {
                return Err(empty_mask());
            }
            let lat = if req.inpaint.content == MaskedContent::Fill {
                model
                    .vae
                    .encode(&image_to_tensor(&fill(&img, &m), device)?)?
            } else {
                model.vae.encode(&image_to_tensor(&img, device)?)?
            };
            (Some(lat), *strength, Some(m), *mask_blur, Some(img))
        }
    };
    let blurred_mask = mask_img.as_ref().map(|m| m.blurred(mask_blur));
    // (repaint, keep) weights at latent size, for ordinary checkpoints' per-step blend.
    let latent_mask = match &blurred_mask {
        Some(m) => {
            let repaint = mask_to_latent_tensor(m, lw, lh, device)?.to_dtype(DType::F32)?;
            let keep = repaint.affine(-1.0, 1.0)?;
            Some((repaint, keep))
        }
        None => None,
    };
    // The extra UNet input of inpainting checkpoints: mask + latents of the kept image.
    let inpaint_extra = if inpaint_model {
        let (mask_t, masked) = match (&mask_img, &original) {
            (Some(m), Some(img)) => {
                let hard = mask_to_latent_tensor(m, lw, lh, device)?;
                // The masked image: kept pixels only (mask < 0.5), repainted area zeroed.
                let keep: Vec<f32> = m
                    .values
                    .iter()
                    .map(|&v| if v < 128 { 1.0 } else { 0.0 })
                    .collect();
                let keep =
                    Tensor::from_vec(keep, (1, 1, h, w), device)?.broadcast_as((1, 3, h, w))?;
                let masked = (image_to_tensor(img, device)? * keep)?;
                (
                    hard.ge(0.5)?.to_dtype(DType::F32)?,
                    model.vae.encode(&masked)?,
                )
            }
            // txt2img/img2img on an inpainting model: everything is repainted.
            _ => (
                Tensor::ones((1, 1, lh, lw), DType::F32, device)?,
                model
                    .vae
                    .encode(&Tensor::zeros((1, 3, h, w), DType::F32, device)?)?,
            ),
        };
        let extra = Tensor::cat(&[&mask_t, &masked], 1)?.to_dtype(model.dtype)?;
        Some(if batch == 2 {
            Tensor::cat(&[&extra, &extra], 0)?
        } else {
            extra
        })
    } else {
        None
    };

    // Each unit's control image at the generation's size, embedded once for every step:
    // twice over with CFG, unless in guess mode, which guides only the prompt's pass.
    let controls = req
        .control
        .iter()
        .map(|unit| {
            let t = control_tensor(&unit.image, req.width, req.height, device)?;
            let hint = unit.net.embed(&t, model.dtype)?;
            Ok(if batch == 2 && !unit.guess_mode {
                Tensor::cat(&[&hint, &hint], 0)?
            } else {
                hint
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let base_seed = req
        .seed
        .unwrap_or_else(|| rand::rng().random::<u32>().into());
    let mut images = Vec::new();
    let mut latents = Vec::new();
    for index in 0..req.batch_count {
        let seed = base_seed.wrapping_add(u64::from(index));
        let mut noise = Noise::new(req, seed, index);
        let mut sampler = Sampler::new(req.sampler, req.schedule, req.steps, &model.noise)?;
        let steps = req.steps;
        // img2img runs the last int(strength·steps) steps (at least one).
        let start = if init_latents.is_some() && !(inpaint_model && strength >= 1.0) {
            sampler.img2img_start(strength).min(steps - 1)
        } else {
            0
        };
        let first_noise = noise.first((1, 4, lh, lw), device)?;
        // "Latent noise" / "latent nothing": the masked latents start from the seed's noise
        // or from zeros (the latent mask rounded, as the web UI does).
        let init_latents = match (&init_latents, &latent_mask, req.inpaint.content) {
            (
                Some(lat),
                Some((repaint, _)),
                c @ (MaskedContent::LatentNoise | MaskedContent::LatentNothing),
            ) => {
                let hard = repaint.ge(0.5)?.to_dtype(DType::F32)?;
                let kept = lat
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&hard.affine(-1.0, 1.0)?)?;
                Some(if c == MaskedContent::LatentNoise {
                    (kept + first_noise.broadcast_mul(&hard)?)?
                } else {
                    kept
                })
            }
            (lat, ..) => lat.clone(),
        };
        let mut x = match &init_latents {
            Some(lat) if start > 0 || !inpaint_model => {
                (lat.to_dtype(DType::F32)? + (&first_noise * sampler.sigma(start))?)?
            }
            _ => (&first_noise * sampler.sigma(0))?,
        };
        for i in start..steps {
            let sigma = sampler.sigma(i);
            // The web UI's rule: the refiner runs the steps whose share done exceeds the
            // switch point.
            #[allow(clippy::cast_precision_loss)]
            let share = (i - start) as f64 / (steps - start) as f64;
            let (active, stage) = match (refiner, &refined) {
                (Some(r), Some(stage)) if share > req.refiner_switch_at => (r, stage),
                _ => (model, &base),
            };
            let on_base = std::ptr::eq(active, model);
            let scaled = (&x * sampler.input_scale(i))?.to_dtype(active.dtype)?;
            let mut inp = if batch == 2 {
                Tensor::cat(&[&scaled, &scaled], 0)?
            } else {
                scaled.clone()
            };
            let text_time = stage.text_time();
            let control = if on_base {
                control_residuals(
                    req,
                    &controls,
                    (i, steps),
                    (&inp, &scaled),
                    sampler.timestep(i),
                    &stage.context,
                    text_time,
                )?
            } else {
                None
            };
            if let (Some(extra), true) = (&inpaint_extra, on_base) {
                inp = Tensor::cat(&[&inp, extra], 1)?;
            }
            let out = active
                .unet
                .forward_with_control(
                    &inp,
                    sampler.timestep(i),
                    &stage.context,
                    text_time,
                    control.as_ref(),
                )
                .map_err(|e| out_of_memory_hint(e, req))?
                .to_dtype(DType::F32)?;
            let out = if batch == 2 {
                let u = out.narrow(0, 0, 1)?;
                let c = out.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * req.cfg_scale)?)?
            } else {
                out
            };
            let denoised = denoised_from_output(&x, &out, sigma, model.noise.prediction)?;
            let shape = x.dims4()?;
            x = sampler.step(i, &x, &denoised, &mut || {
                noise
                    .tensor(shape, device)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })?;
            // Ordinary checkpoints inpaint by keeping the unmasked latents at this step's noise.
            if let (Some((repaint, keep)), Some(lat), false) =
                (&latent_mask, &init_latents, inpaint_model)
            {
                let next_sigma = sampler.plan().sigmas[i + 1];
                let kept = (lat.to_dtype(DType::F32)? + (&first_noise * next_sigma)?)?;
                x = (x.broadcast_mul(repaint)? + kept.broadcast_mul(keep)?)?;
            }
            let preview = match req.preview {
                PreviewMethod::None => None,
                PreviewMethod::Latent2Rgb => Some(latent_to_rgb(&denoised, model.latent_format())?),
                PreviewMethod::Taesd => match &model.taesd {
                    Some(t) => Some(t.decode_to_image(&denoised)?),
                    None => None,
                },
            };
            let flow = on_step(StepUpdate {
                image: index,
                images: req.batch_count,
                step: i + 1 - start,
                steps: steps - start,
                preview,
            });
            if flow.is_break() {
                return Ok((
                    Outcome {
                        images,
                        cancelled: true,
                    },
                    latents,
                ));
            }
        }
        let x = x.to_dtype(DType::F32)?;
        let decoded = model
            .vae
            .decode(&x)
            .map_err(|e| out_of_memory_hint(e, req))?;
        let mut image = tensor_to_image(&decoded)?;
        if let (Some(orig), Some(m)) = (&original, &blurred_mask) {
            image = composite(orig, &image, m)?;
        }
        let mut parameters = parameters(model, req, index, seed, mask_blur);
        refiner_parameters(&mut parameters, refiner, req);
        images.push(GeneratedImage {
            image,
            seed,
            parameters,
        });
        latents.push(x);
    }
    Ok((
        Outcome {
            images,
            cancelled: false,
        },
        latents,
    ))
}

/// The summed residuals of the units active at step `i` of `steps` (their embedded control
/// images in `controls`), for the UNet's input `inp` (both passes with CFG) whose prompt pass
/// alone is `cond_inp`.
fn control_residuals(
    req: &ImageRequest,
    controls: &[Tensor],
    (i, steps): (usize, usize),
    (inp, cond_inp): (&Tensor, &Tensor),
    timestep: f64,
    context: &Tensor,
    text_time: Option<(&Tensor, &Tensor)>,
) -> Result<Option<ControlResiduals>> {
    let batch = inp.dim(0)?;
    let mut sum: Option<ControlResiduals> = None;
    for (unit, hint) in req.control.iter().zip(controls) {
        if !unit.active(i, steps) || unit.weight == 0.0 {
            continue;
        }
        let r = if unit.guess_mode && batch == 2 {
            // The prompt's pass only; the negative pass gets nothing.
            let last = |t: &Tensor| t.narrow(0, 1, 1);
            let tt = match text_time {
                Some((p, t)) => Some((last(p)?, last(t)?)),
                None => None,
            };
            let r = unit.net.forward_embedded(
                cond_inp,
                timestep,
                &last(context)?,
                tt.as_ref().map(|(p, t)| (p, t)),
                hint,
                unit.weight,
                true,
            )?;
            let pad =
                |t: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, &t], 0)?) };
            ControlResiduals {
                down: r.down.into_iter().map(pad).collect::<Result<Vec<_>>>()?,
                mid: pad(r.mid)?,
            }
        } else {
            unit.net.forward_embedded(
                inp,
                timestep,
                context,
                text_time,
                hint,
                unit.weight,
                unit.guess_mode,
            )?
        };
        sum = Some(match sum {
            Some(s) => s.add(&r)?,
            None => r,
        });
    }
    Ok(sum)
}

fn empty_mask() -> Error {
    Error::InvalidParameter("the mask is empty: paint the area to repaint first".into())
}

/// "Only masked": the mask's region (plus padding, at the working size's aspect) repainted at
/// the request's size, scaled back and pasted into `init` with the blurred mask, so every
/// pixel outside the mask is `init`'s own.
fn generate_only_masked(
    model: &SdModel,
    refiner: Option<&SdModel>,
    req: &ImageRequest,
    (init, mask, strength, mask_blur): (&RgbImage, &Mask, f64, f32),
    on_step: &mut dyn FnMut(StepUpdate) -> ControlFlow<()>,
) -> Result<Outcome> {
    init.check()?;
    let full_mask = mask.resized(init.width, init.height);
    let region = crop_region(&full_mask, req.inpaint.padding, req.width, req.height)
        .ok_or_else(empty_mask)?;
    let inner = ImageRequest {
        mode: ImageMode::Inpaint {
            init: init.crop(region.x0, region.y0, region.width(), region.height()),
            mask: crop_mask(&full_mask, region),
            strength,
            mask_blur,
        },
        inpaint: InpaintOptions {
            area: InpaintArea::WholePicture,
            ..req.inpaint
        },
        // The control images are cropped to the same region of the picture.
        control: req
            .control
            .iter()
            .map(|unit| ControlUnit {
                image: unit.image.resized(init.width, init.height).crop(
                    region.x0,
                    region.y0,
                    region.width(),
                    region.height(),
                ),
                ..unit.clone()
            })
            .collect(),
        ..req.clone()
    };
    let mut outcome = generate_with_refiner(model, refiner, &inner, on_step)?;
    let blurred = full_mask.blurred(mask_blur);
    for (index, img) in (0u32..).zip(outcome.images.iter_mut()) {
        let patch = img.image.resized(region.width(), region.height());
        img.image = composite(init, &paste(init, &patch, region), &blurred)?;
        img.parameters = parameters(model, req, index, img.seed, mask_blur);
        refiner_parameters(&mut img.parameters, refiner, req);
    }
    Ok(outcome)
}

fn out_of_memory_hint(e: Error, req: &ImageRequest) -> Error {
    let text = e.to_string();
    if text.contains("out of memory") || text.contains("alloc") {
        Error::InvalidParameter(format!(
            "ran out of memory at {}x{}: try a smaller size ({})",
            req.width, req.height, text
        ))
    } else {
        e
    }
}

/// The web UI's `Refiner` and `Refiner switch at`, when a refiner ran.
pub(super) fn refiner_parameters(
    p: &mut GenerationParameters,
    refiner: Option<&SdModel>,
    req: &ImageRequest,
) {
    if let Some(r) = refiner {
        p.set("Refiner", r.info.name.clone());
        p.set("Refiner switch at", format_number(req.refiner_switch_at));
    }
}

/// The `parameters` text for an image, in the SD web UI's format.
/// `index`: the image's place in its batch (its variation seed is the request's plus it).
pub fn parameters(
    model: &SdModel,
    req: &ImageRequest,
    index: u32,
    seed: u64,
    mask_blur: f32,
) -> GenerationParameters {
    let mut p = GenerationParameters {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        pairs: Vec::new(),
    };
    p.set("Steps", req.steps.to_string());
    p.set("Sampler", req.sampler.name());
    p.set("Schedule type", req.schedule.name());
    p.set("CFG scale", format_number(req.cfg_scale));
    p.set("Seed", seed.to_string());
    if let Some(v) = req.variation.filter(|v| v.strength > 0.0) {
        p.set(
            "Variation seed",
            v.seed.wrapping_add(u64::from(index)).to_string(),
        );
        p.set("Variation seed strength", format_number(v.strength));
    }
    p.set("Size", format!("{}x{}", req.width, req.height));
    p.set("Model", model.info.name.clone());
    if let ImageMode::Img2Img { strength, .. } | ImageMode::Inpaint { strength, .. } = &req.mode {
        p.set("Denoising strength", format_number(*strength));
    }
    if matches!(req.mode, ImageMode::Inpaint { .. }) {
        p.set("Mask blur", format_number(f64::from(mask_blur)));
        if req.inpaint.content != MaskedContent::Original {
            p.set("Masked content", req.inpaint.content.name());
        }
        if req.inpaint.area == InpaintArea::OnlyMasked {
            p.set("Inpaint area", InpaintArea::OnlyMasked.name());
            p.set("Masked area padding", req.inpaint.padding.to_string());
        }
    }
    if req.clip_skip > 1 {
        p.set("Clip skip", req.clip_skip.to_string());
    }
    if model.info.prediction == Prediction::VPrediction {
        p.set("Prediction", "v");
    }
    if !model.info.loras.is_empty() {
        let hashes: Vec<String> = model
            .info
            .loras
            .iter()
            .map(|r| format!("{}: {}", r.name, r.hash))
            .collect();
        p.set("Lora hashes", format!("\"{}\"", hashes.join(", ")));
    }
    let (_, prompt) = super::lora::parse_prompt(&req.prompt);
    let used: Vec<String> = req
        .embeddings
        .iter()
        .filter_map(|f| {
            let stem = f.file_stem()?.to_string_lossy().into_owned();
            let mentioned = super::embeddings::mentions(&prompt, &stem)
                || super::embeddings::mentions(&req.negative_prompt, &stem);
            let hash = super::embeddings::file_hash(f).ok()?;
            mentioned.then(|| format!("{stem}: {hash}"))
        })
        .collect();
    if !used.is_empty() {
        p.set("TI hashes", format!("\"{}\"", used.join(", ")));
    }
    p.set("RNG", req.noise_source.name());
    // As the SD web UI's ControlNet extension writes its units.
    for (i, unit) in req.control.iter().enumerate() {
        p.set(
            &format!("ControlNet {i}"),
            format!("\"{}\"", unit.parameters()),
        );
    }
    p.set("Version", concat!("studio-", env!("CARGO_PKG_VERSION")));
    p
}

fn format_number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_beyond_free_memory_is_refused_naming_the_estimate() {
        let req = ImageRequest {
            width: 2048,
            height: 1024,
            ..ImageRequest::new("cat")
        };
        let gib = 1u64 << 30;
        assert!(memory_fits(3 * gib, 4 * gib, &req, (512, 512)).is_ok());
        let e = memory_fits(6 * gib + gib / 2, 4 * gib, &req, (512, 512))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("2048x1024 needs about 6.5 GiB")
                && e.contains("4.0 GiB is free")
                && e.contains("512x512"),
            "{e}"
        );
    }
}
