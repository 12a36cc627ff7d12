//! Projection: find the W latent (and the noise inputs) that make a StyleGAN2 reproduce a
//! given image, following the recipe of NVIDIA's `projector.py` (StyleGAN2-ADA), written
//! here from its description on candle's autograd:
//!
//! - start from `w_avg` (one `w` broadcast to every layer, or one per layer with
//!   [`ProjectConfig::w_plus`]); the noise buffers start as standard normal noise;
//! - Adam (β = 0.9, 0.999, ε = 1e-8) on W and the noise buffers;
//! - learning rate `initial_lr · ramp(t)`, `t = step / steps`, with
//!   `ramp = (½ − ½ cos(π · min(1, (1 − t) / rampdown))) · min(1, t / rampup)`;
//! - Gaussian noise added to W of scale `w_std · initial_noise_factor ·
//!   max(0, 1 − t / noise_ramp_length)²`, `w_std` the RMS distance of sampled W from their
//!   mean;
//! - noise regularization: for every buffer, repeatedly halved by 2×2 average pooling down to
//!   8×8, the squared mean of the buffer times itself shifted by one pixel (wrapping) along
//!   each axis, weighted by [`ProjectConfig::noise_regularization`]; after every step each
//!   buffer is renormalized to zero mean and unit variance.
//!
//! The image loss is either pixel MSE plus a multi-scale structural (SSIM with a 3×3 window
//! at up to four scales, 2×2-pooled) term ([`LossKind::PixelMultiScale`]), or NVIDIA's choice,
//! the VGG16 LPIPS distance ([`LossKind::Perceptual`], [`super::perceptual`]): the weights are
//! loaded and the target's features computed once per projection, and the distance of the
//! synthesized image to them plays the role of NVIDIA's
//! `(target_features − synth_features).square().sum()` (images larger than 256 are
//! area-downsampled to 256 first, as NVIDIA does). A one-channel generator's images are
//! repeated to three channels for VGG16.
//!
//! Every op of the generator has a backward pass in candle 0.11 (conv2d, whose input gradient
//! is a conv_transpose2d, cat/narrow for the zero-stuffing and padding of the FIR resampling,
//! maximum/minimum for leaky ReLU and the clamps), so no workaround was needed; the
//! generator only gained [`StyleGan2::synthesize_with_noise`] to take the noise buffers as
//! inputs.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{D, DType, Tensor, Var};

use super::perceptual::Vgg16Lpips;
use super::{NumpyRandomState, StyleGan2};
use crate::error::{Error, Result};

/// What the projection compares.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LossKind {
    /// Pixel MSE plus a multi-scale structural (SSIM) loss.
    #[default]
    PixelMultiScale,
    /// NVIDIA's VGG16 (LPIPS-style) distance, from a safetensors file of VGG16 weights
    /// (and optionally LPIPS's linear layers) made by `tools/convert_vgg16.py`; see
    /// [`super::perceptual`].
    Perceptual {
        /// The safetensors file of VGG16 weights.
        vgg16: PathBuf,
    },
}

/// Settings of [`project`]; the defaults are NVIDIA's.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectConfig {
    /// Optimization steps (at least 1).
    pub steps: usize,
    /// Peak learning rate of Adam, which the ramps scale.
    pub initial_lr: f64,
    /// Share of the steps, at the end, over which the learning rate falls to 0 (cosine).
    pub lr_rampdown_length: f64,
    /// Share of the steps, at the start, over which the learning rate rises linearly from 0
    /// (0 = no ramp-up).
    pub lr_rampup_length: f64,
    /// Scale of the noise added to W at the first step, relative to `w_std`.
    pub initial_noise_factor: f64,
    /// Share of the steps over which that W noise fades to 0 (quadratically; 0 = no W noise).
    pub noise_ramp_length: f64,
    /// Weight of the noise regularization (NVIDIA's `regularize_noise_weight`).
    pub noise_regularization: f64,
    /// Optimize one `w` per synthesis layer (W+) instead of one broadcast `w`.
    pub w_plus: bool,
    /// Also optimize the per-layer noise buffers (NVIDIA does).
    pub optimize_noise: bool,
    /// The image loss to minimize.
    pub loss: LossKind,
    /// Seed of the W-noise, the initial noise buffers and the `w_std` samples.
    pub seed: u64,
    /// Latents sampled to estimate `w_std`.
    pub w_std_samples: usize,
    /// Pass the reconstruction to the callback every this many steps (and at the last).
    pub preview_every: usize,
}

impl Default for ProjectConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            initial_lr: 0.1,
            lr_rampdown_length: 0.25,
            lr_rampup_length: 0.05,
            initial_noise_factor: 0.05,
            noise_ramp_length: 0.75,
            noise_regularization: 1e5,
            w_plus: false,
            optimize_noise: true,
            loss: LossKind::PixelMultiScale,
            seed: 0,
            w_std_samples: 10_000,
            preview_every: 10,
        }
    }
}

impl ProjectConfig {
    /// The learning rate at `step` (NVIDIA's ramp-up / cosine ramp-down schedule).
    pub fn learning_rate(&self, step: usize) -> f64 {
        let t = step as f64 / self.steps.max(1) as f64;
        let down = ((1.0 - t) / self.lr_rampdown_length).min(1.0);
        let ramp = 0.5 - 0.5 * (down * std::f64::consts::PI).cos();
        let up = if self.lr_rampup_length > 0.0 {
            (t / self.lr_rampup_length).min(1.0)
        } else {
            1.0
        };
        self.initial_lr * ramp * up
    }

    /// The scale of the noise added to W at `step`, relative to `w_std`.
    pub fn w_noise_factor(&self, step: usize) -> f64 {
        let t = step as f64 / self.steps.max(1) as f64;
        let ramp = if self.noise_ramp_length > 0.0 {
            (1.0 - t / self.noise_ramp_length).max(0.0)
        } else {
            0.0
        };
        self.initial_noise_factor * ramp * ramp
    }
}

/// What [`project`] found.
#[derive(Debug, Clone)]
pub struct ProjectionResult {
    /// `(1, num_ws, w_dim)`, ready for [`StyleGan2::synthesize_with_noise`].
    pub ws: Tensor,
    /// The optimized noise buffers, as [`StyleGan2::noise_buffers`].
    pub noise: Vec<Tensor>,
    /// The image loss (without the noise regularization) at every step taken.
    pub losses: Vec<f32>,
    /// Whether the callback stopped the projection early.
    pub cancelled: bool,
}

struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[Var]) -> Result<Self> {
        let zeros = vars
            .iter()
            .map(|v| Ok(v.as_tensor().zeros_like()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            m: zeros.clone(),
            v: zeros,
            t: 0,
        })
    }

    fn step(
        &mut self,
        vars: &[Var],
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.t);
        let c2 = 1.0 - Self::BETA2.powi(self.t);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?;
            self.v[i] = ((&self.v[i] * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
            let update = (&self.m[i] / c1)?.div(&(((&self.v[i] / c2)?.sqrt()? + Self::EPS)?))?;
            var.set(&(var.as_tensor() - (update * lr)?)?)?;
        }
        Ok(())
    }
}

fn randn(rng: &mut NumpyRandomState, shape: &[usize], gan: &StyleGan2) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = rng.randn(n).into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, gan.device())?)
}

/// RMS distance of `samples` mapped latents from their mean (NVIDIA's `w_std`).
fn w_std(gan: &StyleGan2, samples: usize, rng: &mut NumpyRandomState) -> Result<f64> {
    let info = gan.info();
    if samples < 2 || info.z_dim == 0 {
        return Ok(0.0);
    }
    let z = randn(rng, &[samples, info.z_dim], gan)?;
    let w = gan.map(&z, None, 1.0, None)?.narrow(1, 0, 1)?.squeeze(1)?;
    let w = w.to_dtype(DType::F64)?;
    let mean = w.mean_keepdim(0)?;
    let ss = w
        .broadcast_sub(&mean)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((ss / samples as f64).sqrt())
}

/// Circular shift by one along `dim`.
fn roll1(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    Ok(Tensor::cat(
        &[&x.narrow(dim, n - 1, 1)?, &x.narrow(dim, 0, n - 1)?],
        dim,
    )?)
}

/// NVIDIA's noise regularization over all buffers `(1, 1, r, r)`.
fn noise_regularization(buffers: &[Var]) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for buf in buffers {
        let mut noise = buf.as_tensor().clone();
        loop {
            for dim in [3, 2] {
                let term = (&noise * roll1(&noise, dim)?)?.mean_all()?.sqr()?;
                total = Some(match total {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            if noise.dim(2)? <= 8 {
                break;
            }
            noise = noise.avg_pool2d(2)?;
        }
    }
    Ok(total)
}

/// 3×3 box mean of every channel (valid positions only).
fn box3(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let k = (Tensor::ones((1, 1, 3, 3), x.dtype(), x.device())? / 9.0)?;
    let y = x.reshape((n * c, 1, h, w))?.conv2d(&k, 0, 1, 1, 1)?;
    Ok(y.reshape((n, c, h - 2, w - 2))?)
}

/// Mean SSIM (3×3 box window) of two images in [0, 1].
fn ssim(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    const C1: f64 = 0.01 * 0.01;
    const C2: f64 = 0.03 * 0.03;
    let (mx, my) = (box3(x)?, box3(y)?);
    let sxx = (box3(&x.sqr()?)? - mx.sqr()?)?;
    let syy = (box3(&y.sqr()?)? - my.sqr()?)?;
    let sxy = (box3(&(x * y)?)? - (&mx * &my)?)?;
    let num = (((&mx * &my)? * 2.0)? + C1)?.mul(&((sxy * 2.0)? + C2)?)?;
    let den = ((mx.sqr()? + my.sqr()?)? + C1)?.mul(&((sxx + syy)? + C2)?)?;
    Ok(num.div(&den)?.mean_all()?)
}

/// Pixel MSE plus `1 − SSIM` averaged over up to four 2×-pooled scales (images in [−1, 1]).
fn image_loss(synth: &Tensor, target: &Tensor) -> Result<Tensor> {
    let mse = (synth - target)?.sqr()?.mean_all()?;
    let mut x = ((synth + 1.0)? * 0.5)?;
    let mut y = ((target + 1.0)? * 0.5)?;
    let mut structural: Option<Tensor> = None;
    let mut scales = 0usize;
    while scales < 4 && x.dim(D::Minus1)?.min(x.dim(D::Minus2)?) >= 8 {
        let term = (1.0 - ssim(&x, &y)?)?;
        structural = Some(match structural {
            Some(s) => (s + term)?,
            None => term,
        });
        scales += 1;
        x = x.avg_pool2d(2)?;
        y = y.avg_pool2d(2)?;
    }
    Ok(match structural {
        Some(s) => (mse + (s / scales as f64)?)?,
        None => mse,
    })
}

/// Repeats a one-channel image to three channels (VGG16 takes RGB).
fn to_rgb(x: &Tensor) -> Result<Tensor> {
    Ok(if x.dim(1)? == 1 {
        Tensor::cat(&[x, x, x], 1)?
    } else {
        x.clone()
    })
}

/// Called after every step with `(step, image_loss, reconstruction)`.
pub type ProjectCallback<'a> = dyn FnMut(usize, f32, Option<&Tensor>) -> ControlFlow<()> + 'a;

/// Projects `target` `(1, img_channels, R, R)`, values in [−1, 1], into `gan`'s latent
/// space. `on_step(step, image_loss, reconstruction)` is called after every step, with the
/// current image every [`ProjectConfig::preview_every`] steps and at the last; returning
/// `ControlFlow::Break` stops at once (the result so far comes back, `cancelled` set).
pub fn project(
    gan: &StyleGan2,
    target: &Tensor,
    config: &ProjectConfig,
    on_step: &mut ProjectCallback<'_>,
) -> Result<ProjectionResult> {
    let info = gan.info();
    let (res, channels) = (info.resolution, info.img_channels);
    let dims = target.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != channels || dims[2] != res || dims[3] != res {
        return Err(Error::InvalidParameter(format!(
            "the image to project has shape {dims:?} but this network makes \
             (1, {channels}, {res}, {res}) images: crop it to a square and resize it to \
             {res}×{res} first"
        )));
    }
    if config.steps == 0 {
        return Err(Error::InvalidParameter(
            "projection needs at least one step".into(),
        ));
    }
    let target = target.to_dtype(DType::F32)?.to_device(gan.device())?;
    let perceptual = match &config.loss {
        LossKind::PixelMultiScale => None,
        LossKind::Perceptual { vgg16 } => {
            if channels != 1 && channels != 3 {
                return Err(Error::InvalidParameter(format!(
                    "the VGG16 perceptual loss compares RGB images, but this network makes \
                     {channels}-channel images; project with the pixel + multi-scale \
                     structural loss"
                )));
            }
            let vgg = Vgg16Lpips::load(vgg16, gan.device())?;
            let features = vgg.target(&to_rgb(&target)?)?;
            Some((vgg, features))
        }
    };
    let (num_ws, w_dim) = (info.num_ws, info.w_dim);
    let seed = (config.seed as u32) ^ ((config.seed >> 32) as u32);
    let mut rng = NumpyRandomState::new(seed);
    let w_std = w_std(gan, config.w_std_samples, &mut rng)?;

    let w_avg = gan.w_avg()?; // (1, num_ws, w_dim)
    let w_start = if config.w_plus {
        w_avg.contiguous()?
    } else {
        w_avg.narrow(1, 0, 1)?.contiguous()?
    };
    let w_opt = Var::from_tensor(&w_start)?;
    let noise: Vec<Var> = gan
        .noise_buffers()
        .iter()
        .map(|b| Ok(Var::from_tensor(&randn(&mut rng, b.dims(), gan)?)?))
        .collect::<Result<_>>()?;
    let mut vars = vec![w_opt.clone()];
    if config.optimize_noise {
        vars.extend(noise.iter().cloned());
    }
    let mut adam = Adam::new(&vars)?;
    let mut losses = Vec::with_capacity(config.steps);
    let broadcast = |w: &Tensor| -> Result<Tensor> {
        Ok(if config.w_plus {
            w.clone()
        } else {
            w.broadcast_as((1, num_ws, w_dim))?.contiguous()?
        })
    };
    let noise_tensors =
        |noise: &[Var]| -> Vec<Tensor> { noise.iter().map(|v| v.as_tensor().clone()).collect() };
    let mut cancelled = false;
    for step in 0..config.steps {
        let lr = config.learning_rate(step);
        let w_noise_scale = w_std * config.w_noise_factor(step);
        let w = if w_noise_scale > 0.0 {
            let n = randn(&mut rng, w_opt.dims(), gan)?;
            (w_opt.as_tensor() + (n * w_noise_scale)?)?
        } else {
            w_opt.as_tensor().clone()
        };
        let synth = gan.synthesize_with_noise(&broadcast(&w)?, &noise_tensors(&noise))?;
        let dist = match &perceptual {
            Some((vgg, features)) => vgg.distance_to(features, &to_rgb(&synth)?)?.sum_all()?,
            None => image_loss(&synth, &target)?,
        };
        let loss = match noise_regularization(&noise)? {
            Some(reg) if config.optimize_noise && config.noise_regularization > 0.0 => {
                (&dist + (reg * config.noise_regularization)?)?
            }
            _ => dist.clone(),
        };
        let grads = loss.backward()?;
        adam.step(&vars, &grads, lr)?;
        if config.optimize_noise {
            for buf in &noise {
                let b = buf
                    .as_tensor()
                    .broadcast_sub(&buf.as_tensor().mean_all()?)?;
                let rms = (b.sqr()?.mean_all()? + 1e-12)?.sqrt()?;
                buf.set(&b.broadcast_div(&rms)?)?;
            }
        }
        let value = dist.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        losses.push(value);
        let last = step + 1 == config.steps;
        let preview = (last || step % config.preview_every.max(1) == 0).then(|| synth.detach());
        if on_step(step, value, preview.as_ref()).is_break() {
            cancelled = !last;
            break;
        }
    }
    Ok(ProjectionResult {
        ws: broadcast(&w_opt.as_tensor().detach())?,
        noise: noise.iter().map(|v| v.as_tensor().detach()).collect(),
        losses,
        cancelled,
    })
}
