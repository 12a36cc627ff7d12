//! Timing the Stable Diffusion building blocks on an SD-1.5-shaped model with random weights
//! (the real shapes, so the real cost; built in memory, nothing read from disk): one UNet step
//! with classifier-free guidance (batch 2), the full VAE decode, and each preview method.
//! Driven by `studio bench sd`. The peak RSS is counted from after the build (see
//! [`crate::sys::reset_peak_rss`]), as loading a checkpoint holds one copy of each weight.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::preview::{LatentFormat, TinyDecoder, TinyDecoderConfig, latent_to_rgb};
use super::unet::{Level, Unet, UnetConfig};
use super::vae::{Vae, VaeConfig};
use crate::error::Result;
use crate::nn::{Storage, with_weight_storage};

/// SD 1.5's UNet shape (`runwayml/stable-diffusion-v1-5/unet/config.json`).
pub fn sd15_unet_config() -> UnetConfig {
    let level = |channels, attn: bool| Level {
        channels,
        transformer_layers: attn.then_some(1),
        heads: 8,
    };
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        levels: vec![
            level(320, true),
            level(640, true),
            level(1280, true),
            level(1280, false),
        ],
        layers_per_block: 2,
        cross_attention_dim: 768,
        use_linear_projection: false,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        text_time: None,
    }
}

/// Timings at one size, in milliseconds (medians).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// Image side in pixels (square images; the latent is `size / 8` on a side).
    pub size: u32,
    /// One UNet evaluation on a batch of 2 (conditional and unconditional).
    pub unet_step_ms: f64,
    /// The full VAE decode of one latent to an image.
    pub vae_decode_ms: f64,
    /// The linear latent→RGB preview projection.
    pub latent2rgb_ms: f64,
    /// The TAESD tiny-decoder preview.
    pub taesd_ms: f64,
    /// Peak resident memory in MiB since the models were built, read after this size's runs
    /// (0 where the platform does not report it).
    pub peak_rss_mb: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(v))
}

/// Builds the random-weight models, with the CPU kernels storing their weights as `weights`
/// (see [`with_weight_storage`]), and times each size (`runs` timed repetitions
/// each).
pub fn run(
    sizes: &[u32],
    runs: usize,
    weights: Storage,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let device = Device::Cpu;
    log("building an SD-1.5-shaped UNet, VAE and TAESD decoder with random weights");
    let (unet, vae, taesd) = with_weight_storage(weights, || -> Result<_> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
        Ok((
            Unet::new(&vb.pp("unet"), sd15_unet_config())?,
            Vae::new(&vb.pp("vae"), VaeConfig::sd(0.18215))?,
            TinyDecoder::new(&vb.pp("taesd"), TinyDecoderConfig::default())?,
        ))
    })?;
    // The generator's copies of weights the kernels packed are gone now: the peak counts
    // from the models as they run.
    crate::sys::reset_peak_rss();
    let mut rows = Vec::new();
    for &size in sizes {
        let l = (size / 8) as usize;
        log(&format!("{size}x{size}: UNet step"));
        let x = Tensor::randn(0f32, 1.0, (2, 4, l, l), &device)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?;
        let unet_step_ms = time(runs, || {
            unet.forward(&x, 500.0, &ctx, None)?;
            Ok(())
        })?;
        let latent = x.narrow(0, 0, 1)?;
        log(&format!("{size}x{size}: VAE decode"));
        let vae_decode_ms = time(runs, || {
            vae.decode(&latent)?;
            Ok(())
        })?;
        log(&format!("{size}x{size}: previews"));
        let latent2rgb_ms = time(runs.max(10), || {
            latent_to_rgb(&latent, LatentFormat::Sd)?;
            Ok(())
        })?;
        let taesd_ms = time(runs, || {
            taesd.decode_to_image(&latent)?;
            Ok(())
        })?;
        rows.push(BenchRow {
            size,
            unet_step_ms,
            vae_decode_ms,
            latent2rgb_ms,
            taesd_ms,
            peak_rss_mb: crate::sys::peak_rss_mb().unwrap_or(0.0),
        });
    }
    Ok(rows)
}
