//! The two-pass "hires fix" of the SD web UI: generate at the base size, upscale the image
//! (Lanczos, or an ESRGAN / Real-ESRGAN model), then run img2img at the larger size with the
//! same seed, so the composition of the base size gets the detail of the larger one.
//!
//! The web UI's "Latent" upscalers (interpolating the latents, with no decode and re-encode)
//! are not here yet: the upscaled image is encoded again, as the web UI does for every
//! non-latent upscaler. The parameters are written as the web UI writes them: the first
//! pass's `Size`, then `Hires upscale`, `Hires steps` (when not the same), `Hires upscaler`
//! and `Denoising strength`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::model::SdModel;
use super::pipeline::{ImageMode, ImageRequest, Outcome, StepUpdate, generate, parameters};
use crate::error::{Error, Result};

/// How the first pass's image is enlarged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HiresUpscaler {
    /// A Lanczos resize.
    #[default]
    Lanczos,
    /// An ESRGAN / Real-ESRGAN (RRDBNet) file, then a resize to the exact size.
    Esrgan(PathBuf),
}

impl HiresUpscaler {
    /// The web UI's `Hires upscaler` value: `Lanczos`, or the model file's stem.
    pub fn name(&self) -> String {
        match self {
            HiresUpscaler::Lanczos => "Lanczos".to_owned(),
            HiresUpscaler::Esrgan(path) => path
                .file_stem()
                .map_or_else(|| "ESRGAN".to_owned(), |s| s.to_string_lossy().into_owned()),
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

/// Tile side for the ESRGAN upscale between the passes (input pixels).
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
        HiresUpscaler::Lanczos => None,
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
    let first_pass = generate(model, &first, &mut |u| {
        let flow = on_step(u);
        stopped |= flow.is_break();
        flow
    })?;
    if first_pass.cancelled || stopped {
        return Ok(first_pass);
    }
    for (index, img) in (0u32..).zip(first_pass.images) {
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
        let mut pass = generate(model, &second, &mut |u| {
            on_step(StepUpdate {
                image: index,
                images: req.batch_count,
                ..u
            })
        })?;
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
