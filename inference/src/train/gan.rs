//! Training the demo GAN: a tiny StyleGAN2 (config F: 'skip' generator) whose exponential
//! moving average is saved in NVIDIA's `G_ema` tensor names, so the Latent Explorer and
//! `studio gan` load it through [`crate::gan::stylegan2::StyleGan2`] like any converted
//! network, with its init kwargs beside it (`generator.json`).
//!
//! The generator's training pass is written here with differentiable ops, following the
//! equations in [`crate::gan::stylegan2`] in NVIDIA's non-fused form (the batch's activations
//! are scaled by each sample's styles and demodulated after one shared convolution, which is
//! the same function): the mapping network with equalized learning rate (multiplier 0.01), a
//! learned constant, modulated 3×3 convolutions with per-pixel noise, a stride-2 transposed
//! convolution and the `[1, 3, 3, 1]` FIR filter for up-sampling, and `torgb` images summed
//! while up-sampling. Convolutions are an unfold and a matrix product, whose backward pass is
//! matrix products too. A test checks Studio's own loader renders the trainer's images.
//!
//! The discriminator is a small residual network (NVIDIA's 'resnet' D, with average pooling
//! for down-sampling and a minibatch standard-deviation layer); it is kept in the checkpoint
//! only. Losses are NVIDIA's: the non-saturating logistic loss, and the R1 penalty on real
//! images, estimated by a finite difference along a random direction (`E[(∇D·δ)²] = |∇D|²`
//! for `δ ~ N(0, I)`; candle has no second-order gradients). Adam with β₁ = 0, β₂ = 0.99, as
//! NVIDIA trains. `mapping.w_avg` follows the mapped `w` (β 0.995) for truncation.
//!
//! A run reads a folder of square images (`studio train faces-data`'s PNGs), skipping the
//! unreadable ones and those of another size, with counts; it writes a checkpoint every so
//! many steps (one safetensors file, written atomically, holding both networks, the moving
//! average and the step), from which an interrupted run resumes, and `generator.safetensors`
//! at the end. Each step's images, latents and noise come from the run's seed and the step.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::ops::{conv, normal};
use crate::diffusion::imaging::{RgbImage, tensor_to_image};
use crate::error::{Error, Result};
use crate::gan::stylegan2::{NoiseMode, StyleGan2};
use crate::gan::{FirFilter, upfirdn2d, upsample2d};

/// The leaky ReLU's slope.
const SLOPE: f64 = 0.2;
/// NVIDIA's `conv_clamp` in its ADA configs (what the loader assumes without a JSON).
const CONV_CLAMP: f64 = 256.0;
const MAPPING_LR: f64 = 0.01;
const W_AVG_BETA: f64 = 0.995;
/// The most memory the training images may take.
const MAX_TRAINING_BYTES: usize = 4 << 30;
/// The step of the finite difference that estimates the R1 penalty.
const R1_EPSILON: f64 = 0.01;

/// The generator's shape (NVIDIA's init kwargs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GanShape {
    /// Image side: a power of two from 8.
    pub resolution: usize,
    /// Latent `z` values.
    pub z_dim: usize,
    /// Intermediate latent `w` values.
    pub w_dim: usize,
    /// Layers of the mapping network.
    pub mapping_layers: usize,
    /// Channels at resolution `r` are `min(channel_base / r, channel_max)`.
    pub channel_base: usize,
    /// The most channels a block has.
    pub channel_max: usize,
}

impl GanShape {
    /// Channels of the blocks at `res`.
    pub fn channels(&self, res: usize) -> usize {
        (self.channel_base / res).clamp(1, self.channel_max)
    }

    /// The synthesis blocks' resolutions, 4 up.
    fn resolutions(&self) -> Vec<usize> {
        std::iter::successors(Some(4usize), |r| Some(r * 2))
            .take_while(|r| *r <= self.resolution)
            .collect()
    }

    /// W rows: one per convolution plus the last `torgb`.
    pub fn num_ws(&self) -> usize {
        2 * self.resolution.trailing_zeros() as usize - 2
    }

    fn check(&self) -> Result<()> {
        if self.resolution < 8 || !self.resolution.is_power_of_two() || self.resolution > 1024 {
            return Err(Error::InvalidParameter(format!(
                "the resolution must be a power of two from 8 to 1024, not {}",
                self.resolution
            )));
        }
        if self.z_dim == 0 || self.w_dim == 0 || self.mapping_layers == 0 {
            return Err(Error::InvalidParameter(
                "z, w and the mapping network must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// NVIDIA's init kwargs, as `tools/convert_stylegan_pkl.py` writes them beside a network.
    pub fn init_kwargs(&self) -> serde_json::Value {
        serde_json::json!({
            "class_name": "Generator",
            "init_kwargs": {
                "z_dim": self.z_dim,
                "c_dim": 0,
                "w_dim": self.w_dim,
                "img_resolution": self.resolution,
                "img_channels": 3,
                "mapping_kwargs": {"num_layers": self.mapping_layers, "lr_multiplier": MAPPING_LR},
                "synthesis_kwargs": {
                    "channel_base": self.channel_base,
                    "channel_max": self.channel_max,
                    "num_fp16_res": 0,
                    "conv_clamp": CONV_CLAMP,
                    "architecture": "skip",
                },
            },
        })
    }
}

/// How a run trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GanTrainOptions {
    /// Steps in all (a resumed run continues to this); each is one discriminator and one
    /// generator update.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Adam's learning rate, both networks.
    pub lr: f64,
    /// The R1 penalty's weight γ.
    pub r1_gamma: f64,
    /// Half-life of the generator's moving average, in images.
    pub ema_images: f64,
    /// The run's seed: the initial weights and every batch, latent and noise.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
}

/// What [`train`] reports after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GanStep {
    /// Steps done.
    pub step: usize,
    /// The generator's loss.
    pub loss_g: f32,
    /// The discriminator's logistic loss (without the penalty).
    pub loss_d: f32,
    /// The R1 penalty's estimate `|∇D(x)|²`, averaged over the batch.
    pub r1: f32,
}

/// Images read for training.
pub struct Images {
    /// `(n, 3, side, side)` in −1…1.
    pub pixels: Tensor,
    /// Their side.
    pub side: usize,
    /// Files read.
    pub read: usize,
    /// Files that did not decode.
    pub unreadable: usize,
    /// Images of another size than the first square one.
    pub other_size: usize,
}

/// Reads the PNG and JPEG files in `dir` (sorted by name, at most `max`): the first square
/// image decides the size; unreadable files and images of another size are skipped, counted.
pub fn read_images(dir: &Path, max: usize) -> Result<Images> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| {
                ["png", "jpg", "jpeg"]
                    .iter()
                    .any(|x| e.eq_ignore_ascii_case(x))
            })
        })
        .collect();
    files.sort();
    let (mut unreadable, mut other_size) = (0, 0);
    let mut side = None;
    let mut data: Vec<f32> = Vec::new();
    let mut read = 0;
    for path in files {
        if read >= max {
            break;
        }
        let Ok(decoded) = crate::diffusion::imaging::decode_image_file(&path) else {
            unreadable += 1;
            continue;
        };
        let image = decoded.image;
        let (w, h) = (image.width, image.height);
        let s = *side.get_or_insert(w);
        if w != h || w != s {
            other_size += 1;
            continue;
        }
        // Planar RGB in −1…1.
        let plane = (w * h) as usize;
        let start = data.len();
        if (start + 3 * plane) * 4 > MAX_TRAINING_BYTES {
            return Err(Error::InvalidParameter(format!(
                "{read} images of {w}x{h} already take {} MB: read fewer",
                (start * 4) >> 20
            )));
        }
        data.resize(start + 3 * plane, 0.0);
        for (i, p) in image.pixels.chunks_exact(3).enumerate() {
            for (c, v) in p.iter().enumerate() {
                data[start + c * plane + i] = f32::from(*v) / 127.5 - 1.0;
            }
        }
        read += 1;
    }
    let side = side.unwrap_or(0) as usize;
    if read == 0 {
        return Err(Error::InvalidParameter(format!(
            "{} has no readable square images ({unreadable} unreadable, {other_size} of \
             another size)",
            dir.display()
        )));
    }
    Ok(Images {
        pixels: Tensor::from_vec(data, (read, 3, side, side), &Device::Cpu)?,
        side,
        read,
        unreadable,
        other_size,
    })
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    Ok((x.maximum(&(x * SLOPE)?)? * std::f64::consts::SQRT_2)?)
}

/// `log(1 + eˣ)`, stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Inserts a zero after every pixel along height and width.
fn zero_stuff(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let x = x
        .unsqueeze(4)?
        .pad_with_zeros(4, 0, 1)?
        .reshape((n, c, h, 2 * w))?;
    Ok(x.unsqueeze(3)?
        .pad_with_zeros(3, 0, 1)?
        .reshape((n, c, 2 * h, 2 * w))?)
}

/// NVIDIA's `conv2d_resample(x, w, f, up=2, padding=1)` for a 3×3 kernel: the stride-2
/// transposed convolution (a correlation of the zero-stuffed input with the flipped kernel)
/// and the FIR filter, cropped as [`crate::gan::stylegan2`] crops it.
fn conv_up2(x: &Tensor, weight: &Tensor, filter: &FirFilter) -> Result<Tensor> {
    let k = weight.dim(3)?;
    let stuffed = zero_stuff(x)?;
    // Full output: k − 1 before, k − 2 after the zero-stuffed input (its last zero counts).
    let padded = stuffed
        .pad_with_zeros(2, k - 1, k - 2)?
        .pad_with_zeros(3, k - 1, k - 2)?;
    let full = conv(&padded, &weight.flip(&[2, 3])?.contiguous()?, 0)?;
    let (p, f, k) = ((k / 2) as isize, filter.width() as isize, k as isize);
    let pad = [
        p + (f + 1) / 2 - (k - 1),
        p + (f - 2) / 2 - (k - 2),
        p + (f + 1) / 2 - (k - 1),
        p + (f - 2) / 2 - (k - 2),
    ];
    upfirdn2d(&full, filter, 1, pad)
}

/// The trainable tensors of both networks and the generator's buffers.
struct Nets {
    shape: GanShape,
    g: BTreeMap<String, Var>,
    d: BTreeMap<String, Var>,
    /// `resample_filter`s, `noise_const`s and `mapping.w_avg`.
    buffers: BTreeMap<String, Tensor>,
    filter: FirFilter,
}

/// The `resample_filter` every block and up-sampling layer stores.
fn resample_filter() -> Result<Tensor> {
    FirFilter::default_taps(&Device::Cpu)
}

impl Nets {
    /// Fresh networks, initialised as NVIDIA initialises them (weights N(0, 1), scaled at run
    /// time; mapping weights N(0, 1/0.01); affine biases 1; noise strengths 0).
    fn new(shape: GanShape, seed: u64) -> Result<Self> {
        shape.check()?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5747_414e);
        let mut g = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        let var = |map: &mut BTreeMap<String, Var>, name: String, t: Tensor| -> Result<()> {
            map.insert(name, Var::from_tensor(&t)?);
            Ok(())
        };
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
        // A modulated convolution `[out, in, k]`: its weight, bias and style affine.
        let modulated = |g: &mut BTreeMap<String, Var>,
                         rng: &mut StdRng,
                         q: &str,
                         [out, inp, k]: [usize; 3]|
         -> Result<()> {
            var(
                g,
                format!("{q}.weight"),
                normal(rng, &[out, inp, k, k], 1.0)?,
            )?;
            var(g, format!("{q}.bias"), zeros(out)?)?;
            let a = normal(rng, &[inp, shape.w_dim], 1.0)?;
            var(g, format!("{q}.affine.weight"), a)?;
            let ones = Tensor::ones(inp, DType::F32, &Device::Cpu)?;
            var(g, format!("{q}.affine.bias"), ones)
        };
        for i in 0..shape.mapping_layers {
            let inp = if i == 0 { shape.z_dim } else { shape.w_dim };
            let w = normal(&mut rng, &[shape.w_dim, inp], 1.0 / MAPPING_LR)?;
            var(&mut g, format!("mapping.fc{i}.weight"), w)?;
            var(&mut g, format!("mapping.fc{i}.bias"), zeros(shape.w_dim)?)?;
        }
        buffers.insert("mapping.w_avg".to_owned(), zeros(shape.w_dim)?);
        let mut prev = 0;
        for res in shape.resolutions() {
            let ch = shape.channels(res);
            let p = format!("synthesis.b{res}");
            buffers.insert(format!("{p}.resample_filter"), resample_filter()?);
            if res == 4 {
                var(
                    &mut g,
                    format!("{p}.const"),
                    normal(&mut rng, &[ch, 4, 4], 1.0)?,
                )?;
            }
            let layers: Vec<(&str, usize)> = if res == 4 {
                vec![("conv1", ch)]
            } else {
                vec![("conv0", prev), ("conv1", ch)]
            };
            for (name, inp) in layers {
                let q = format!("{p}.{name}");
                modulated(&mut g, &mut rng, &q, [ch, inp, 3])?;
                var(
                    &mut g,
                    format!("{q}.noise_strength"),
                    Tensor::new(0f32, &Device::Cpu)?,
                )?;
                buffers.insert(
                    format!("{q}.noise_const"),
                    normal(&mut rng, &[res, res], 1.0)?,
                );
                buffers.insert(format!("{q}.resample_filter"), resample_filter()?);
            }
            modulated(&mut g, &mut rng, &format!("{p}.torgb"), [3, ch, 1])?;
            prev = ch;
        }
        // The discriminator, from the top resolution down.
        let mut d = BTreeMap::new();
        let top = shape.resolution;
        let ch_top = shape.channels(top);
        var(
            &mut d,
            "fromrgb.weight".into(),
            normal(&mut rng, &[ch_top, 3, 1, 1], 1.0)?,
        )?;
        var(&mut d, "fromrgb.bias".into(), zeros(ch_top)?)?;
        for res in shape.resolutions().into_iter().rev().filter(|r| *r > 4) {
            let (ch, next) = (shape.channels(res), shape.channels(res / 2));
            let p = format!("b{res}");
            var(
                &mut d,
                format!("{p}.conv0.weight"),
                normal(&mut rng, &[ch, ch, 3, 3], 1.0)?,
            )?;
            var(&mut d, format!("{p}.conv0.bias"), zeros(ch)?)?;
            let w = normal(&mut rng, &[next, ch, 3, 3], 1.0)?;
            var(&mut d, format!("{p}.conv1.weight"), w)?;
            var(&mut d, format!("{p}.conv1.bias"), zeros(next)?)?;
            let w = normal(&mut rng, &[next, ch, 1, 1], 1.0)?;
            var(&mut d, format!("{p}.skip.weight"), w)?;
        }
        let ch = shape.channels(4);
        let w = normal(&mut rng, &[ch, ch + 1, 3, 3], 1.0)?;
        var(&mut d, "b4.conv.weight".into(), w)?;
        var(&mut d, "b4.conv.bias".into(), zeros(ch)?)?;
        var(
            &mut d,
            "b4.fc.weight".into(),
            normal(&mut rng, &[ch, ch * 16], 1.0)?,
        )?;
        var(&mut d, "b4.fc.bias".into(), zeros(ch)?)?;
        var(
            &mut d,
            "b4.out.weight".into(),
            normal(&mut rng, &[1, ch], 1.0)?,
        )?;
        var(&mut d, "b4.out.bias".into(), zeros(1)?)?;
        Ok(Self {
            shape,
            g,
            d,
            buffers,
            filter: FirFilter::new(&resample_filter()?, 4.0)?,
        })
    }

    fn g(&self, name: &str) -> Result<Tensor> {
        self.g
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| Error::InvalidParameter(format!("the generator has no {name}")))
    }

    fn d(&self, name: &str) -> Result<Tensor> {
        self.d
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| Error::InvalidParameter(format!("the discriminator has no {name}")))
    }

    fn buffer(&self, name: &str) -> Result<&Tensor> {
        self.buffers
            .get(name)
            .ok_or_else(|| Error::InvalidParameter(format!("the generator has no {name}")))
    }
}

/// Where the generator's noise comes from.
enum Noise<'a> {
    /// The stored `noise_const` buffers (what the explorer's default renders).
    Const,
    /// Fresh noise from this generator.
    Random(&'a mut StdRng),
}

/// The generator with the tensors `get` gives (the trained variables, or their moving
/// average): `z` `(n, z_dim)` → images `(n, 3, r, r)`; also returns the mapped `w`.
fn generate(
    nets: &Nets,
    get: &dyn Fn(&str) -> Result<Tensor>,
    z: &Tensor,
    mut noise: Noise<'_>,
) -> Result<(Tensor, Tensor)> {
    let s = nets.shape;
    let n = z.dim(0)?;
    // Mapping.
    let mut x = z.broadcast_div(&(z.sqr()?.mean_keepdim(1)? + 1e-8)?.sqrt()?)?;
    for i in 0..s.mapping_layers {
        let inp = x.dim(1)?;
        let w = (get(&format!("mapping.fc{i}.weight"))? * (MAPPING_LR / (inp as f64).sqrt()))?;
        let b = (get(&format!("mapping.fc{i}.bias"))? * MAPPING_LR)?;
        x = lrelu(&x.matmul(&w.t()?)?.broadcast_add(&b.unsqueeze(0)?)?)?;
    }
    let w = x;
    let affine = |prefix: &str| -> Result<Tensor> {
        let a = (get(&format!("{prefix}.affine.weight"))? / (s.w_dim as f64).sqrt())?;
        Ok(w.matmul(&a.t()?)?
            .broadcast_add(&get(&format!("{prefix}.affine.bias"))?.unsqueeze(0)?)?)
    };
    let per_channel = |t: &Tensor| -> Result<Tensor> { Ok(t.unsqueeze(2)?.unsqueeze(3)?) };
    let mut layer = |x: &Tensor, prefix: &str, res: usize, up: bool| -> Result<Tensor> {
        let styles = affine(prefix)?; // (n, in)
        let weight = get(&format!("{prefix}.weight"))?; // (out, in, 3, 3)
        let x = x.broadcast_mul(&per_channel(&styles)?)?;
        let y = if up {
            conv_up2(&x, &weight, &nets.filter)?
        } else {
            conv(&x, &weight, 1)?
        };
        // Demodulation: 1/sqrt(Σ (w·s)² + 1e-8) per sample and output channel.
        let w2 = weight.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?; // (out, in)
        let d = (styles.sqr()?.matmul(&w2.t()?)? + 1e-8)?.sqrt()?.recip()?;
        let y = y.broadcast_mul(&per_channel(&d)?)?;
        let strength = get(&format!("{prefix}.noise_strength"))?;
        let noise = match &mut noise {
            Noise::Const => nets
                .buffer(&format!("{prefix}.noise_const"))?
                .reshape((1, 1, res, res))?,
            Noise::Random(rng) => normal(rng, &[n, 1, res, res], 1.0)?,
        };
        let y = y.broadcast_add(&noise.broadcast_mul(&strength)?)?;
        let bias = get(&format!("{prefix}.bias"))?.reshape((1, (), 1, 1))?;
        // The clamp at ±256 never binds on these activations; it is left out of training.
        lrelu(&y.broadcast_add(&bias)?)
    };
    let torgb = |x: &Tensor, prefix: &str| -> Result<Tensor> {
        let in_ch = x.dim(1)?;
        let styles = (affine(prefix)? / (in_ch as f64).sqrt())?;
        let x = x.broadcast_mul(&per_channel(&styles)?)?;
        let y = conv(&x, &get(&format!("{prefix}.weight"))?, 0)?;
        let bias = get(&format!("{prefix}.bias"))?.reshape((1, 3, 1, 1))?;
        Ok(y.broadcast_add(&bias)?)
    };
    let constant = get("synthesis.b4.const")?;
    let mut x = constant.unsqueeze(0)?.repeat((n, 1, 1, 1))?;
    let mut img: Option<Tensor> = None;
    for res in s.resolutions() {
        let p = format!("synthesis.b{res}");
        if res > 4 {
            x = layer(&x, &format!("{p}.conv0"), res, true)?;
        }
        x = layer(&x, &format!("{p}.conv1"), res, false)?;
        let y = torgb(&x, &format!("{p}.torgb"))?;
        img = Some(match img {
            Some(i) => (upsample2d(&i, &nets.filter, 2)? + y)?,
            None => y,
        });
    }
    let img = img.ok_or_else(|| Error::InvalidParameter("no synthesis blocks".into()))?;
    Ok((img, w))
}

/// The discriminator's logits `(n,)` for images `(n, 3, r, r)`.
fn discriminate(nets: &Nets, x: &Tensor) -> Result<Tensor> {
    let s = nets.shape;
    let fc = |x: &Tensor, name: &str| -> Result<Tensor> {
        let w = nets.d(&format!("{name}.weight"))?;
        let w = (&w / (w.dim(1)? as f64).sqrt())?;
        Ok(x.matmul(&w.t()?)?
            .broadcast_add(&nets.d(&format!("{name}.bias"))?.unsqueeze(0)?)?)
    };
    let conv_layer = |x: &Tensor, name: &str, bias: bool| -> Result<Tensor> {
        let w = nets.d(&format!("{name}.weight"))?;
        let (_, c, k, _) = w.dims4()?;
        let w = (&w / ((c * k * k) as f64).sqrt())?;
        let y = conv(x, &w, k / 2)?;
        if bias {
            let b = nets.d(&format!("{name}.bias"))?.reshape((1, (), 1, 1))?;
            lrelu(&y.broadcast_add(&b)?)
        } else {
            Ok(y)
        }
    };
    let down = |x: &Tensor| -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        Ok(x.reshape((n, c, h / 2, 2, w / 2, 2))?.mean(5)?.mean(3)?)
    };
    let mut x = conv_layer(x, "fromrgb", true)?;
    for res in s.resolutions().into_iter().rev().filter(|r| *r > 4) {
        let p = format!("b{res}");
        let skip = conv_layer(&down(&x)?, &format!("{p}.skip"), false)?;
        let y = conv_layer(&x, &format!("{p}.conv0"), true)?;
        let y = down(&conv_layer(&y, &format!("{p}.conv1"), true)?)?;
        x = ((skip + y)? * std::f64::consts::FRAC_1_SQRT_2)?;
    }
    // Minibatch standard deviation over groups of up to 4.
    let (n, c, h, w) = x.dims4()?;
    let group = (1..=4.min(n))
        .rev()
        .find(|g| n.is_multiple_of(*g))
        .unwrap_or(1);
    let y = x.reshape((group, n / group, c, h, w))?;
    let y = y.broadcast_sub(&y.mean_keepdim(0)?)?.sqr()?.mean(0)?;
    let y = (y + 1e-8)?.sqrt()?.flatten_from(1)?.mean_keepdim(1)?; // (n/group, 1)
    let y = y
        .reshape((1, n / group, 1, 1, 1))?
        .broadcast_as((group, n / group, 1, h, w))?
        .reshape((n, 1, h, w))?;
    let x = Tensor::cat(&[&x, &y], 1)?;
    let x = conv_layer(&x, "b4.conv", true)?.flatten_from(1)?;
    let x = lrelu(&fc(&x, "b4.fc")?)?;
    Ok(fc(&x, "b4.out")?.squeeze(1)?)
}

/// A training run's state: the networks, the generator's moving average, Adam for each.
pub struct GanTrainer {
    nets: Nets,
    ema: BTreeMap<String, Tensor>,
    opts: GanTrainOptions,
    adam_g: candle_nn::AdamW,
    adam_d: candle_nn::AdamW,
    step: usize,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    shape: GanShape,
}

impl GanTrainer {
    /// A fresh run, or the one whose checkpoint is in `checkpoint` (which must be of `shape`).
    pub fn new(shape: GanShape, opts: GanTrainOptions, checkpoint: &Path) -> Result<Self> {
        let mut nets = Nets::new(shape, opts.seed)?;
        let mut step = 0;
        let state_file = checkpoint.join("state.json");
        let weights_file = checkpoint.join("nets.safetensors");
        let mut ema: BTreeMap<String, Tensor> = nets
            .g
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        if state_file.is_file() {
            let text =
                std::fs::read_to_string(&state_file).map_err(|e| Error::io(&state_file, e))?;
            let state: CheckpointState =
                serde_json::from_str(&text).map_err(|e| Error::BadConfig {
                    path: state_file.clone(),
                    message: e.to_string(),
                })?;
            if state.shape != shape {
                return Err(Error::InvalidParameter(format!(
                    "{} holds a GAN of another shape: remove it or train with its shape",
                    checkpoint.display()
                )));
            }
            let saved = candle_core::safetensors::load(&weights_file, &Device::Cpu)?;
            let take = |name: String| -> Result<Tensor> {
                saved.get(&name).cloned().ok_or_else(|| Error::BadConfig {
                    path: weights_file.clone(),
                    message: format!("no {name}"),
                })
            };
            for (k, v) in &nets.g {
                v.set(&take(format!("G.{k}"))?)?;
                ema.insert(k.clone(), take(format!("E.{k}"))?);
            }
            for (k, v) in &nets.d {
                v.set(&take(format!("D.{k}"))?)?;
            }
            for (k, v) in &mut nets.buffers {
                *v = take(format!("B.{k}"))?;
            }
            step = state.step;
        }
        let adam = |vars: Vec<Var>| {
            candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: opts.lr,
                    beta1: 0.0,
                    beta2: 0.99,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
            )
        };
        let adam_g = adam(nets.g.values().cloned().collect())?;
        let adam_d = adam(nets.d.values().cloned().collect())?;
        Ok(Self {
            nets,
            ema,
            opts,
            adam_g,
            adam_d,
            step,
        })
    }

    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    /// One discriminator and one generator update on a batch drawn from `images`.
    pub fn train_step(&mut self, images: &Tensor) -> Result<GanStep> {
        let o = self.opts;
        let mut rng = StdRng::seed_from_u64(
            o.seed
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(self.step as u64),
        );
        let count = images.dim(0)?;
        let ids: Vec<u32> = (0..o.batch)
            .map(|_| rng.random_range(0..count) as u32)
            .collect();
        let real = images.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?;
        let z_dim = self.nets.shape.z_dim;
        let get = |name: &str| self.nets.g(name);

        // Discriminator: logistic loss and the R1 penalty's finite-difference estimate.
        let z = normal(&mut rng, &[o.batch, z_dim], 1.0)?;
        let (fake, w) = generate(&self.nets, &get, &z, Noise::Random(&mut rng))?;
        let fake = fake.detach();
        let real_logits = discriminate(&self.nets, &real)?;
        let fake_logits = discriminate(&self.nets, &fake)?;
        let delta = normal(&mut rng, real.dims(), 1.0)?;
        let nudged = discriminate(&self.nets, &(&real + (delta * R1_EPSILON)?)?)?;
        let r1 = ((nudged - &real_logits)? / R1_EPSILON)?.sqr()?.mean_all()?;
        let loss_d =
            (softplus(&fake_logits)?.mean_all()? + softplus(&real_logits.neg()?)?.mean_all()?)?;
        let total_d = (&loss_d + (&r1 * (o.r1_gamma / 2.0))?)?;
        self.adam_d.backward_step(&total_d)?;

        // Generator: the non-saturating loss.
        let z = normal(&mut rng, &[o.batch, z_dim], 1.0)?;
        let (fake, _) = generate(&self.nets, &get, &z, Noise::Random(&mut rng))?;
        let loss_g = softplus(&discriminate(&self.nets, &fake)?.neg()?)?.mean_all()?;
        // Only the generator's gradients are applied; the discriminator's are dropped.
        let mut grads = loss_g.backward()?;
        for v in self.nets.d.values() {
            grads.remove(v.as_tensor());
        }
        self.adam_g.step(&grads)?;

        // w_avg follows the mapped w.
        let w_avg = self.nets.buffer("mapping.w_avg")?;
        let w_avg = ((w.detach().mean(0)? * (1.0 - W_AVG_BETA))? + (w_avg * W_AVG_BETA)?)?;
        self.nets.buffers.insert("mapping.w_avg".into(), w_avg);

        // The moving average.
        let beta = 0.5f64.powf(o.batch as f64 / o.ema_images.max(1.0));
        let ramp = (self.step as f64 + 1.0) / (self.step as f64 + 10.0);
        let beta = beta.min(ramp);
        for (k, v) in &self.nets.g {
            if let Some(e) = self.ema.get_mut(k) {
                *e = ((&*e * beta)? + (v.as_tensor() * (1.0 - beta))?)?;
            }
        }
        self.step += 1;
        let scalar = |t: &Tensor| -> Result<f32> { Ok(t.to_scalar::<f32>()?) };
        let report = GanStep {
            step: self.step,
            loss_g: scalar(&loss_g)?,
            loss_d: scalar(&loss_d)?,
            r1: scalar(&r1)?,
        };
        if !(report.loss_g.is_finite() && report.loss_d.is_finite()) {
            return Err(Error::InvalidParameter(format!(
                "the losses became {} / {} at step {}: lower the learning rate",
                report.loss_g, report.loss_d, self.step
            )));
        }
        Ok(report)
    }

    /// The moving average's tensors and the buffers, in NVIDIA's `G_ema` names.
    pub fn generator_tensors(&self) -> HashMap<String, Tensor> {
        self.ema
            .iter()
            .chain(self.nets.buffers.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Images `(n, 3, r, r)` from the moving average for latents `z`, with the stored noise
    /// (what the explorer renders by default, untruncated).
    pub fn render(&self, z: &Tensor) -> Result<Tensor> {
        let get = |name: &str| {
            self.ema
                .get(name)
                .cloned()
                .ok_or_else(|| Error::InvalidParameter(format!("the generator has no {name}")))
        };
        Ok(generate(&self.nets, &get, z, Noise::Const)?.0)
    }

    /// Writes the checkpoint into `dir`: the tensors, then the step, each atomically (a crash
    /// or a full disk mid-write leaves the previous checkpoint whole).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in &self.nets.g {
            all.insert(format!("G.{k}"), v.as_tensor().clone());
        }
        for (k, v) in &self.nets.d {
            all.insert(format!("D.{k}"), v.as_tensor().clone());
        }
        for (k, v) in &self.ema {
            all.insert(format!("E.{k}"), v.clone());
        }
        for (k, v) in &self.nets.buffers {
            all.insert(format!("B.{k}"), v.clone());
        }
        save_atomic(&all, &dir.join("nets.safetensors"))?;
        let state = serde_json::to_vec(&CheckpointState {
            step: self.step,
            shape: self.nets.shape,
        })
        .map_err(|e| Error::InvalidParameter(format!("writing the checkpoint state: {e}")))?;
        let file = dir.join("state.json");
        crate::sys::write_atomic(&file, &state, false).map_err(|e| Error::io(&file, e))
    }

    /// Writes the generator (`G_ema`) to `path` atomically, and its init kwargs beside it.
    pub fn save_generator(&self, path: &Path) -> Result<()> {
        save_atomic(&self.generator_tensors(), path)?;
        let json = path.with_extension("json");
        let text = serde_json::to_vec_pretty(&self.nets.shape.init_kwargs())
            .map_err(|e| Error::InvalidParameter(e.to_string()))?;
        crate::sys::write_atomic(&json, &text, false).map_err(|e| Error::io(&json, e))
    }
}

/// Images of the StyleGAN2 in `model` (loaded as the explorer loads it) for seeds `0..n`
/// (NVIDIA's seeds), truncated by `psi`, with the stored noise.
pub fn samples(model: &Path, n: usize, psi: f64) -> Result<Vec<RgbImage>> {
    let gan = StyleGan2::load(model, &Device::Cpu)?;
    (0..n as u64)
        .map(|seed| {
            let z = gan.z_from_seed(seed)?;
            let ws = gan.map(&z, None, psi, None)?;
            tensor_to_image(&gan.synthesize(&ws, NoiseMode::Const)?)
        })
        .collect()
}

/// Writes safetensors to a temporary beside `path`, then renames it over `path`.
fn save_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Trains (or resumes) into `out`: `checkpoint/` and `generator.safetensors` with
/// `generator.json` every `checkpoint_every` steps and at the end. `report` is called after each step.
pub fn train(
    images: &Tensor,
    shape: GanShape,
    opts: GanTrainOptions,
    out: &Path,
    report: &mut dyn FnMut(GanStep),
) -> Result<GanTrainer> {
    let side = images.dim(3)?;
    if side != shape.resolution {
        return Err(Error::InvalidParameter(format!(
            "the images are {side}×{side} but the generator makes {0}×{0}",
            shape.resolution
        )));
    }
    let checkpoint = out.join("checkpoint");
    let generator = out.join("generator.safetensors");
    let mut trainer = GanTrainer::new(shape, opts, &checkpoint)?;
    while trainer.step() < opts.steps {
        let r = trainer.train_step(images)?;
        report(r);
        if r.step % opts.checkpoint_every.max(1) == 0 || r.step == opts.steps {
            trainer.save_checkpoint(&checkpoint)?;
            // The generator so far, to look at while the run goes on.
            trainer.save_generator(&generator)?;
        }
    }
    trainer.save_generator(&generator)?;
    Ok(trainer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (GanShape, GanTrainOptions) {
        (
            GanShape {
                resolution: 16,
                z_dim: 8,
                w_dim: 8,
                mapping_layers: 2,
                channel_base: 64,
                channel_max: 8,
            },
            GanTrainOptions {
                steps: 3,
                batch: 4,
                lr: 0.002,
                r1_gamma: 0.1,
                ema_images: 100.0,
                seed: 5,
                checkpoint_every: 2,
            },
        )
    }

    /// Blobs of a few colours, as training data.
    fn images(n: usize, side: usize) -> Tensor {
        let mut rng = StdRng::seed_from_u64(1);
        let mut data = vec![0f32; n * 3 * side * side];
        for (i, chunk) in data.chunks_mut(3 * side * side).enumerate() {
            let c = i % 3;
            let r = rng.random_range(2..side / 2);
            for y in 0..side {
                for x in 0..side {
                    let inside = (y as isize - side as isize / 2).pow(2)
                        + (x as isize - side as isize / 2).pow(2)
                        < (r * r) as isize;
                    chunk[c * side * side + y * side + x] = if inside { 0.9 } else { -0.9 };
                }
            }
        }
        Tensor::from_vec(data, (n, 3, side, side), &Device::Cpu).expect("images")
    }

    #[test]
    fn the_loader_renders_what_the_trainer_renders_and_a_resumed_run_matches() {
        let (shape, opts) = tiny();
        let data = images(8, 16);
        let tmp = tempfile::tempdir().expect("tmp");
        let mut steps = Vec::new();
        let trainer = train(&data, shape, opts, tmp.path(), &mut |r| steps.push(r)).expect("train");
        assert_eq!(steps.len(), 3);
        assert!(steps.iter().all(|s| s.loss_g.is_finite() && s.r1 >= 0.0));

        // Studio's own StyleGAN2 loader, on the saved file, with the stored noise.
        let path = tmp.path().join("generator.safetensors");
        let gan = StyleGan2::load(&path, &Device::Cpu).expect("load");
        assert!(gan.info().from_json, "generator.json is read");
        let z = normal(&mut StdRng::seed_from_u64(9), &[2, 8], 1.0).expect("z");
        let ws = gan.map(&z, None, 1.0, None).expect("map");
        let theirs = gan.synthesize(&ws, NoiseMode::Const).expect("synthesize");
        let ours = trainer.render(&z).expect("render");
        assert_eq!(theirs.dims(), &[2, 3, 16, 16]);
        let diff = (theirs - &ours)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        let scale = ours
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("s");
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "max |Δ| {diff} (scale {scale})"
        );

        // An interrupted run resumes from its checkpoint (step 2) and ends where an
        // uninterrupted one ended.
        let other = tempfile::tempdir().expect("tmp");
        let two = GanTrainOptions { steps: 2, ..opts };
        train(&data, shape, two, other.path(), &mut |_| {}).expect("first part");
        let resumed = train(&data, shape, opts, other.path(), &mut |_| {}).expect("resume");
        let a = trainer.generator_tensors();
        let b = resumed.generator_tensors();
        let k = "synthesis.b16.torgb.weight";
        let d = (&a[k] - &b[k])
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        // Adam's moments start afresh on resume, so the last step differs a little.
        assert!(d < 0.05, "{d}");
    }

    #[test]
    fn a_checkpoint_that_cannot_be_written_leaves_the_previous_one_whole() {
        let (shape, opts) = tiny();
        let data = images(4, 16);
        let tmp = tempfile::tempdir().expect("tmp");
        let two = GanTrainOptions { steps: 2, ..opts };
        train(&data, shape, two, tmp.path(), &mut |_| {}).expect("train");
        let checkpoint = tmp.path().join("checkpoint");
        let before = std::fs::read(checkpoint.join("nets.safetensors")).expect("read");
        // Writing fails, as on a full disk: the temporary cannot be created.
        std::fs::create_dir(checkpoint.join("nets.safetensors.tmp")).expect("dir");
        let mut trainer = GanTrainer::new(shape, opts, &checkpoint).expect("resume");
        assert_eq!(trainer.step(), 2);
        trainer.train_step(&data).expect("step");
        assert!(trainer.save_checkpoint(&checkpoint).is_err());
        let after = std::fs::read(checkpoint.join("nets.safetensors")).expect("read");
        assert!(before == after, "the previous checkpoint is untouched");
        std::fs::remove_dir(checkpoint.join("nets.safetensors.tmp")).expect("rmdir");
        assert_eq!(
            GanTrainer::new(shape, opts, &checkpoint)
                .expect("resume")
                .step(),
            2
        );
    }

    #[test]
    fn unreadable_and_other_size_images_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let png = |side: u32| {
            let img = crate::diffusion::imaging::RgbImage {
                width: side,
                height: side,
                pixels: [200u8, 10, 10].repeat((side * side) as usize),
            };
            crate::diffusion::imaging::encode_png(&img, None).expect("png")
        };
        std::fs::write(tmp.path().join("a.png"), png(16)).expect("write");
        std::fs::write(tmp.path().join("b.png"), png(16)).expect("write");
        std::fs::write(tmp.path().join("c.png"), png(32)).expect("write");
        std::fs::write(tmp.path().join("d.png"), b"not a png").expect("write");
        let read = read_images(tmp.path(), 100).expect("read");
        assert_eq!((read.read, read.unreadable, read.other_size), (2, 1, 1));
        assert_eq!(read.pixels.dims(), &[2, 3, 16, 16]);
        let empty = tempfile::tempdir().expect("tmp");
        assert!(read_images(empty.path(), 100).is_err());
    }
}
