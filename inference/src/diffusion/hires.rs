//! The two-pass "hires fix" of the SD web UI: generate at the base size, upscale the image
//! (Lanczos, or an ESRGAN / Real-ESRGAN or SwinIR model), then run img2img at the larger size with the
//! same seed, so the composition of the base size gets the detail of the larger one.
//!
//! The web UI's "Latent" upscalers enlarge the first pass's latents instead, with no decode
//! and re-encode, as PyTorch's `interpolate` does (`bilinear`, `bicubic` with A = −0.75 and
//! its antialiased variant with A = −0.5 over a normalised window, `nearest`,
//! `nearest-exact`; align_corners off); bilinear's antialiased variant is the same when
//! enlarging. Other upscalers' images are encoded again, as the web UI does. The parameters are written as the web UI writes them: the first
//! pass's `Size`, then `Hires upscale`, `Hires steps` (when not the same), `Hires upscaler`
//! and `Denoising strength`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::model::SdModel;
use candle_core::Tensor;

use super::pipeline::{
    ImageMode, ImageRequest, Outcome, StepUpdate, generate_core, generate_with_refiner, parameters,
    refiner_parameters, validate,
};
use crate::error::{Error, Result};

/// How the first pass's image is enlarged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HiresUpscaler {
    /// A Lanczos resize.
    #[default]
    Lanczos,
    /// An upscaler file (ESRGAN / Real-ESRGAN or SwinIR), then a resize to the exact size.
    Esrgan(PathBuf),
    /// The latents themselves, interpolated.
    Latent(LatentUpscale),
}

/// The web UI's latent upscale modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LatentUpscale {
    /// `Latent`: bilinear.
    Bilinear,
    /// `Latent (antialiased)`: bilinear with antialiasing (the same when enlarging).
    BilinearAntialiased,
    /// `Latent (bicubic)`: Keys' cubic with A = −0.75.
    Bicubic,
    /// `Latent (bicubic antialiased)`: the cubic with A = −0.5, normalised at the borders.
    BicubicAntialiased,
    /// `Latent (nearest)`: the input pixel at `floor(o · scale)`.
    Nearest,
    /// `Latent (nearest-exact)`: the input pixel at `floor((o + 0.5) · scale)`.
    NearestExact,
}

impl LatentUpscale {
    /// Every mode, in the web UI's order.
    pub const ALL: [LatentUpscale; 6] = [
        LatentUpscale::Bilinear,
        LatentUpscale::BilinearAntialiased,
        LatentUpscale::Bicubic,
        LatentUpscale::BicubicAntialiased,
        LatentUpscale::Nearest,
        LatentUpscale::NearestExact,
    ];

    /// The web UI's name: `Latent`, `Latent (antialiased)`, `Latent (bicubic)`, …
    pub fn name(self) -> &'static str {
        match self {
            LatentUpscale::Bilinear => "Latent",
            LatentUpscale::BilinearAntialiased => "Latent (antialiased)",
            LatentUpscale::Bicubic => "Latent (bicubic)",
            LatentUpscale::BicubicAntialiased => "Latent (bicubic antialiased)",
            LatentUpscale::Nearest => "Latent (nearest)",
            LatentUpscale::NearestExact => "Latent (nearest-exact)",
        }
    }

    /// Reads a web UI name (case and spaces ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let norm = |t: &str| t.to_ascii_lowercase().replace(' ', "");
        Self::ALL.into_iter().find(|m| norm(m.name()) == norm(s))
    }

    /// Enlarges `(1, c, h, w)` latents to `(1, c, th, tw)`.
    pub fn resize(self, x: &Tensor, (th, tw): (usize, usize)) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let data = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rows = axis_weights(self, h, th);
        let cols = axis_weights(self, w, tw);
        let mut out = vec![0f32; b * c * th * tw];
        let mut tmp = vec![0f32; h * tw];
        for plane in 0..b * c {
            let src = &data[plane * h * w..(plane + 1) * h * w];
            // Along the width, then the height.
            for y in 0..h {
                for (x_out, taps) in cols.iter().enumerate() {
                    tmp[y * tw + x_out] = taps.iter().map(|&(i, wt)| src[y * w + i] * wt).sum();
                }
            }
            let dst = &mut out[plane * th * tw..(plane + 1) * th * tw];
            for (y_out, taps) in rows.iter().enumerate() {
                for x in 0..tw {
                    dst[y_out * tw + x] = taps.iter().map(|&(i, wt)| tmp[i * tw + x] * wt).sum();
                }
            }
        }
        Ok(Tensor::from_vec(out, (b, c, th, tw), x.device())?.to_dtype(x.dtype())?)
    }
}

/// For each output index, the input indices and weights that make it (PyTorch's rules with
/// `align_corners=False`, enlarging).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn axis_weights(mode: LatentUpscale, n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    let cubic = |t: f64, a: f64| {
        let t = t.abs();
        if t <= 1.0 {
            ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
        } else if t < 2.0 {
            ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
        } else {
            0.0
        }
    };
    (0..n_out)
        .map(|o| {
            let o = o as f64;
            match mode {
                LatentUpscale::Nearest => vec![(clamp((o * scale).floor() as i64), 1.0)],
                LatentUpscale::NearestExact => {
                    vec![(clamp(((o + 0.5) * scale).floor() as i64), 1.0)]
                }
                LatentUpscale::Bilinear | LatentUpscale::BilinearAntialiased => {
                    let src = ((o + 0.5) * scale - 0.5).max(0.0);
                    let i0 = src.floor() as i64;
                    let f = (src - i0 as f64) as f32;
                    vec![(clamp(i0), 1.0 - f), (clamp(i0 + 1), f)]
                }
                LatentUpscale::Bicubic => {
                    let src = (o + 0.5) * scale - 0.5;
                    let i0 = src.floor() as i64;
                    let t = src - i0 as f64;
                    (-1..=2)
                        .map(|k| (clamp(i0 + k), cubic(t - k as f64, -0.75) as f32))
                        .collect()
                }
                LatentUpscale::BicubicAntialiased => {
                    // PIL-style: a = −0.5 over the pixels whose centres lie within 2 of the
                    // sample's, outside ones dropped and the rest normalised.
                    let centre = (o + 0.5) * scale;
                    let lo = ((centre - 2.0 + 0.5).floor() as i64).max(0);
                    let hi = ((centre + 2.0 + 0.5).floor() as i64).min(last + 1);
                    let taps: Vec<(usize, f64)> = (lo..hi)
                        .map(|i| (i as usize, cubic(i as f64 + 0.5 - centre, -0.5)))
                        .collect();
                    let total: f64 = taps.iter().map(|t| t.1).sum();
                    taps.into_iter()
                        .map(|(i, wt)| (i, (wt / total) as f32))
                        .collect()
                }
            }
        })
        .collect()
}

impl HiresUpscaler {
    /// The web UI's `Hires upscaler` value: `Lanczos`, or the model file's stem.
    pub fn name(&self) -> String {
        match self {
            HiresUpscaler::Lanczos => "Lanczos".to_owned(),
            HiresUpscaler::Esrgan(path) => path
                .file_stem()
                .map_or_else(|| "ESRGAN".to_owned(), |s| s.to_string_lossy().into_owned()),
            HiresUpscaler::Latent(mode) => mode.name().to_owned(),
        }
    }
}

/// The second pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiresFix {
    /// The final size over the first pass's (1 to 4).
    pub scale: f64,
    /// How the image is enlarged between the passes.
    pub upscaler: HiresUpscaler,
    /// Steps of the second pass before its strength share is taken (0: the first pass's).
    pub steps: usize,
    /// The second pass's denoising strength (0 to 1).
    pub denoising: f64,
}

impl Default for HiresFix {
    /// The web UI's defaults: ×2, 0 steps (the same), strength 0.7.
    fn default() -> Self {
        Self {
            scale: 2.0,
            upscaler: HiresUpscaler::Lanczos,
            steps: 0,
            denoising: 0.7,
        }
    }
}

/// Tile side for the upscaler between the passes (input pixels).
const TILE: usize = 192;

/// The second pass's size: the first pass's times `scale`, rounded down to `multiple`.
pub fn target_size(width: u32, height: u32, scale: f64, multiple: u32) -> Result<(u32, u32)> {
    if !(1.0..=4.0).contains(&scale) {
        return Err(Error::InvalidParameter(format!(
            "hires upscale must be between 1 and 4, not {scale}"
        )));
    }
    let side = |v: u32| {
        // At most 4 × 4096: fits.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let t = (f64::from(v) * scale) as u32;
        (t / multiple).max(1) * multiple
    };
    Ok((side(width), side(height)))
}

/// txt2img with the hires fix: each image of `req` (a txt2img request), then its second pass.
pub(super) fn generate_hires(
    model: &SdModel,
    refiner: Option<&SdModel>,
    req: &ImageRequest,
    hires: &HiresFix,
    on_step: &mut dyn FnMut(StepUpdate) -> ControlFlow<()>,
) -> Result<Outcome> {
    if !(0.0..=1.0).contains(&hires.denoising) {
        return Err(Error::InvalidParameter(format!(
            "hires denoising strength must be between 0 and 1, not {}",
            hires.denoising
        )));
    }
    let (tw, th) = target_size(req.width, req.height, hires.scale, model.info.size_multiple)?;
    let upscaler = match &hires.upscaler {
        HiresUpscaler::Lanczos | HiresUpscaler::Latent(_) => None,
        HiresUpscaler::Esrgan(path) => Some(crate::upscale::load(path, &model.device)?),
    };
    let first = ImageRequest {
        hires: None,
        ..req.clone()
    };
    let mut out = Outcome {
        images: Vec::new(),
        cancelled: false,
    };
    let mut stopped = false;
    let (first_pass, latents) = generate_core(model, None, &first, None, &mut |u| {
        let flow = on_step(u);
        stopped |= flow.is_break();
        flow
    })?;
    if first_pass.cancelled || stopped {
        return Ok(first_pass);
    }
    for ((index, img), lat) in (0u32..).zip(first_pass.images).zip(latents) {
        let big_latents = match hires.upscaler {
            HiresUpscaler::Latent(mode) => {
                let f = model.vae.config().factor();
                Some(mode.resize(&lat, (th as usize / f, tw as usize / f))?)
            }
            _ => None,
        };
        let enlarged = match &upscaler {
            None => img.image.resized(tw, th),
            Some(up) => match up.upscale_by(&img.image, hires.scale, TILE, &mut |_, _| {
                ControlFlow::Continue(())
            })? {
                Some(big) => big.resized(tw, th),
                None => return Ok(out),
            },
        };
        let second = ImageRequest {
            width: tw,
            height: th,
            seed: Some(img.seed),
            batch_count: 1,
            steps: if hires.steps == 0 {
                req.steps
            } else {
                hires.steps
            },
            mode: ImageMode::Img2Img {
                init: enlarged,
                strength: hires.denoising,
            },
            hires: None,
            variation: req.variation.map(|v| super::noise::Variation {
                seed: v.seed.wrapping_add(u64::from(index)),
                ..v
            }),
            ..req.clone()
        };
        let mut forward = |u: StepUpdate| {
            on_step(StepUpdate {
                image: index,
                images: req.batch_count,
                ..u
            })
        };
        let mut pass = if let Some(lat) = &big_latents {
            validate(model, &second)?;
            generate_core(model, refiner, &second, Some(lat), &mut forward)?.0
        } else {
            generate_with_refiner(model, refiner, &second, &mut forward)?
        };
        let Some(mut done) = pass.images.pop() else {
            out.cancelled = true;
            return Ok(out);
        };
        let mut p = parameters(model, &first, index, img.seed, 0.0);
        p.set("Denoising strength", format_number(hires.denoising));
        p.set("Hires upscale", format_number(hires.scale));
        if hires.steps != 0 {
            p.set("Hires steps", hires.steps.to_string());
        }
        p.set("Hires upscaler", hires.upscaler.name());
        refiner_parameters(&mut p, refiner, req);
        done.parameters = p;
        out.images.push(done);
        if pass.cancelled {
            out.cancelled = true;
            return Ok(out);
        }
    }
    Ok(out)
}

fn format_number(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}
