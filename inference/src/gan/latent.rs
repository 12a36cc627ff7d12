//! Moving around a StyleGAN2's latent spaces: interpolation (lerp, slerp), fractional seeds,
//! keyframes, style mixing, and rendering a latent to an 8-bit image.
//!
//! Latents come in two spaces:
//!
//! - **Z**: the mapping network's input, `(1, z_dim)`, standard normal (what a seed gives,
//!   [`StyleGan2::z_from_seed`]). Interpolate it with [`slerp`]: normal samples live near a
//!   sphere, and a straight line between two of them passes through low-norm latents the
//!   network rarely saw.
//! - **W**: the mapping network's output broadcast to one row per synthesis layer,
//!   `(1, num_ws, w_dim)` (after truncation). Interpolate it with [`lerp`]; style mixing
//!   ([`style_mix`]) and per-layer edits work here.
//!
//! A fractional seed (NVIDIA's visualizer lets the seed field be dragged continuously) blends
//! the two neighbouring integer seeds with weights `1 − frac` and `frac`, where `frac` is the
//! fractional part; the visualizer applies the weights to the mapped `ws`
//! ([`seed_blend_ws`]); [`seed_blend`] applies the same weights in Z.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::stylegan2::{NoiseMode, StyleGan2};
use crate::diffusion::imaging::{self, RgbImage};
use crate::error::{Error, Result};

/// Below this `sin(angle)`, [`slerp`] falls back to [`lerp`] (the vectors are (anti)parallel
/// and the great circle between them is undefined or numerically unstable).
const SLERP_PARALLEL_EPS: f64 = 1e-6;

/// Which latent space [`interpolate`] moves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Space {
    /// Linear interpolation of the keyframes' `ws`.
    #[default]
    W,
    /// Spherical interpolation of the keyframes' `z` (and linear interpolation of ψ and the
    /// label), mapped again for every frame.
    Z,
}

impl Space {
    /// `w` or `z`, as [`Self::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Space::W => "w",
            Space::Z => "z",
        }
    }

    /// `w` or `z` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "w" => Ok(Space::W),
            "z" => Ok(Space::Z),
            other => Err(Error::InvalidParameter(format!(
                "latent space `{other}`: expected `w` or `z`"
            ))),
        }
    }
}

/// `a + t (b − a)`, for tensors of the same shape. `t = 0` returns `a` and `t = 1` returns
/// `b` exactly.
pub fn lerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    check_same_shape(a, b)?;
    if t == 0.0 {
        return Ok(a.clone());
    }
    if (t - 1.0).abs() == 0.0 {
        return Ok(b.clone());
    }
    Ok((a + ((b - a)? * t)?)?)
}

/// Spherical interpolation between `a` and `b` (same shape; the whole tensor is treated as
/// one vector): `sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b` with Ω the angle between them.
/// For vectors of equal norm every point keeps that norm. Near-parallel (or antiparallel, or
/// zero) vectors fall back to [`lerp`]. `t = 0` and `t = 1` return `a` and `b` exactly.
pub fn slerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    check_same_shape(a, b)?;
    if t == 0.0 {
        return Ok(a.clone());
    }
    if (t - 1.0).abs() == 0.0 {
        return Ok(b.clone());
    }
    let av = flat_f64(a)?;
    let bv = flat_f64(b)?;
    let na = av.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = bv.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return lerp(a, b, t);
    }
    let cos = (av.iter().zip(&bv).map(|(x, y)| x * y).sum::<f64>() / (na * nb)).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let sin = omega.sin();
    if sin.abs() < SLERP_PARALLEL_EPS {
        return lerp(a, b, t);
    }
    let ka = ((1.0 - t) * omega).sin() / sin;
    let kb = (t * omega).sin() / sin;
    let out: Vec<f32> = av
        .iter()
        .zip(&bv)
        .map(|(x, y)| (ka * x + kb * y) as f32)
        .collect();
    Ok(Tensor::from_vec(out, a.dims(), a.device())?.to_dtype(a.dtype())?)
}

fn check_same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::InvalidParameter(format!(
            "cannot interpolate latents of different shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

fn flat_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The two integer seeds a fractional seed `seed + offset` lies between, and the weight of
/// the second: `(s0, s1, frac)` with `s0 = seed + floor(offset)`, `s1 = s0 + 1` (both wrapped
/// to numpy's 0 ..= 2³²−1, as NVIDIA's visualizer does) and `frac = offset − floor(offset)`.
pub fn seed_neighbours(seed: u64, offset: f32) -> Result<(u64, u64, f64)> {
    let seed = u32::try_from(seed).map_err(|_| {
        Error::InvalidParameter(format!(
            "seed {seed} is too large: StyleGAN seeds are 0 to {} (numpy's RandomState)",
            u32::MAX
        ))
    })?;
    if !offset.is_finite() {
        return Err(Error::InvalidParameter(format!(
            "seed offset {offset} is not a number"
        )));
    }
    let offset = f64::from(offset);
    let whole = offset.floor();
    let frac = offset - whole;
    // Wrap modulo 2³² (the visualizer masks seeds with `& (2³² − 1)`).
    let whole = (whole.rem_euclid(4_294_967_296.0)) as u64;
    let s0 = (u64::from(seed) + whole) & u64::from(u32::MAX);
    let s1 = (s0 + 1) & u64::from(u32::MAX);
    Ok((s0, s1, frac))
}

/// A `z` `(1, z_dim)` for the fractional seed `seed + offset`:
/// `(1 − frac)·z(s0) + frac·z(s1)` (see [`seed_neighbours`]). An integer offset gives that
/// seed's `z` exactly.
pub fn seed_blend(gan: &StyleGan2, seed: u64, offset: f32) -> Result<Tensor> {
    let (s0, s1, frac) = seed_neighbours(seed, offset)?;
    let z0 = gan.z_from_seed(s0)?;
    if frac == 0.0 {
        return Ok(z0);
    }
    lerp(&z0, &gan.z_from_seed(s1)?, frac)
}

/// The `ws` `(1, num_ws, w_dim)` of a fractional seed as NVIDIA's visualizer renders it: both
/// neighbouring seeds are mapped (with the label `c`, ψ and cutoff) and their `ws` summed with
/// weights `1 − frac` and `frac`. An integer offset gives that seed's `ws` exactly.
pub fn seed_blend_ws(
    gan: &StyleGan2,
    seed: u64,
    offset: f32,
    c: Option<&Tensor>,
    psi: f64,
    cutoff: Option<usize>,
) -> Result<Tensor> {
    let (s0, s1, frac) = seed_neighbours(seed, offset)?;
    let w0 = gan.map(&gan.z_from_seed(s0)?, c, psi, cutoff)?;
    if frac == 0.0 {
        return Ok(w0);
    }
    let w1 = gan.map(&gan.z_from_seed(s1)?, c, psi, cutoff)?;
    Ok(((w0 * (1.0 - frac))? + (w1 * frac)?)?)
}

/// Copies the rows of `ws_b` into `ws_a` where `layers` is true: `layers[i]` picks the source
/// of W row `i` (both `(n, num_ws, w_dim)`, `layers.len() == num_ws`). Rows are copied, not
/// blended, so each row equals its source exactly.
pub fn style_mix(ws_a: &Tensor, ws_b: &Tensor, layers: &[bool]) -> Result<Tensor> {
    check_same_shape(ws_a, ws_b)?;
    let (_, num_ws, _) = ws_a.dims3()?;
    if layers.len() != num_ws {
        return Err(Error::InvalidParameter(format!(
            "style mixing needs one choice per W row: got {} for {num_ws} rows",
            layers.len()
        )));
    }
    let mut parts = Vec::new();
    let mut start = 0;
    while start < num_ws {
        let from_b = layers[start];
        let mut end = start + 1;
        while end < num_ws && layers[end] == from_b {
            end += 1;
        }
        let src = if from_b { ws_b } else { ws_a };
        parts.push(src.narrow(1, start, end - start)?);
        start = end;
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// One point of an animation: its `ws` (what is rendered and what W interpolation uses) and,
/// when it came from a `z`, that `z` with the truncation and label that made `ws` (what Z
/// interpolation uses).
#[derive(Debug, Clone)]
pub struct Keyframe {
    /// `(1, num_ws, w_dim)`.
    pub w: Tensor,
    /// `(1, z_dim)`, when known.
    pub z: Option<Tensor>,
    /// Truncation ψ used to map `z`.
    pub psi: f64,
    /// Truncation cutoff used to map `z` (`None` = every row).
    pub cutoff: Option<usize>,
    /// Label `(1, c_dim)` of a conditional network.
    pub c: Option<Tensor>,
}

impl Keyframe {
    /// A keyframe from a `z`: maps it with `c`, ψ and cutoff.
    pub fn from_z(
        gan: &StyleGan2,
        z: Tensor,
        c: Option<Tensor>,
        psi: f64,
        cutoff: Option<usize>,
    ) -> Result<Self> {
        let w = gan.map(&z, c.as_ref(), psi, cutoff)?;
        Ok(Self {
            w,
            z: Some(z),
            psi,
            cutoff,
            c,
        })
    }

    /// A keyframe from a seed (NVIDIA's `z` for it), see [`Self::from_z`].
    pub fn from_seed(
        gan: &StyleGan2,
        seed: u64,
        c: Option<Tensor>,
        psi: f64,
        cutoff: Option<usize>,
    ) -> Result<Self> {
        Self::from_z(gan, gan.z_from_seed(seed)?, c, psi, cutoff)
    }

    /// A keyframe known only in W (a projection result, an edited latent, a `.npy` file).
    pub fn from_w(w: Tensor) -> Self {
        Self {
            w,
            z: None,
            psi: 1.0,
            cutoff: None,
            c: None,
        }
    }
}

/// Where `t` ∈ [0, 1] falls on a path through `keyframes` keyframes spaced evenly: the
/// segment's first keyframe and the fraction along it (`None` with fewer than two).
#[must_use]
pub fn path_segment(keyframes: usize, t: f64) -> Option<(usize, f64)> {
    let segments = keyframes.checked_sub(1).filter(|&s| s > 0)?;
    #[allow(clippy::cast_precision_loss)]
    let pos = t.clamp(0.0, 1.0) * segments as f64;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = (pos.floor() as usize).min(segments - 1);
    #[allow(clippy::cast_precision_loss)]
    let frac = pos - index as f64;
    Some((index, frac))
}

/// The `ws` at position `t` ∈ [0, 1] of the path through `keyframes` (evenly spaced:
/// keyframe `k` of `n` sits at `t = k/(n−1)`). At a keyframe's position the result is that
/// keyframe's `w` exactly. In [`Space::Z`] every keyframe needs a `z`; the `z`s are slerped,
/// ψ and the labels lerped, and the result mapped (the cutoff of the earlier keyframe).
pub fn interpolate(
    gan: &StyleGan2,
    keyframes: &[Keyframe],
    t: f64,
    space: Space,
) -> Result<Tensor> {
    let (first, rest) = keyframes.split_first().ok_or_else(|| {
        Error::InvalidParameter("interpolation needs at least one keyframe".into())
    })?;
    if rest.is_empty() {
        return Ok(first.w.clone());
    }
    if !t.is_finite() {
        return Err(Error::InvalidParameter(format!(
            "interpolation position {t} is not a number"
        )));
    }
    let Some((index, frac)) = path_segment(keyframes.len(), t) else {
        return Ok(first.w.clone());
    };
    let (a, b) = (&keyframes[index], &keyframes[index + 1]);
    if frac <= 0.0 {
        return Ok(a.w.clone());
    }
    if frac >= 1.0 {
        return Ok(b.w.clone());
    }
    match space {
        Space::W => lerp(&a.w, &b.w, frac),
        Space::Z => {
            let (Some(za), Some(zb)) = (&a.z, &b.z) else {
                return Err(Error::InvalidParameter(
                    "Z interpolation needs every keyframe's z (a keyframe made from W, such \
                     as a projection or a W file, can only be interpolated in W)"
                        .into(),
                ));
            };
            let z = slerp(za, zb, frac)?;
            let c = match (&a.c, &b.c) {
                (Some(ca), Some(cb)) => Some(lerp(ca, cb, frac)?),
                (Some(c), None) | (None, Some(c)) => Some(c.clone()),
                (None, None) => None,
            };
            let psi = a.psi + (b.psi - a.psi) * frac;
            gan.map(&z, c.as_ref(), psi, a.cutoff)
        }
    }
}

/// Waits until the device has computed `ws` (by reading one value back), so a benchmark can
/// time the mapping network alone.
pub fn wait_for(ws: &Tensor) -> Result<()> {
    ws.flatten_all()?.narrow(0, 0, 1)?.to_vec1::<f32>()?;
    Ok(())
}

/// Synthesizes `ws` `(1, num_ws, w_dim)` and converts the result to 8-bit RGB (NVIDIA's
/// `x·127.5 + 128`, clamped).
pub fn render(gan: &StyleGan2, ws: &Tensor, noise: NoiseMode) -> Result<RgbImage> {
    let img = gan.synthesize(ws, noise)?;
    let (n, ch, _, _) = img.dims4()?;
    if n != 1 || ch != 3 {
        return Err(Error::InvalidParameter(format!(
            "can only render one RGB image at a time, got {n} image(s) of {ch} channel(s)"
        )));
    }
    imaging::tensor_to_image(&img)
}

/// The shape of a random-weight StyleGAN2 for benchmarks ([`random_generator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomGanConfig {
    /// Output resolution in pixels (square): a power of two, at least 4.
    pub resolution: usize,
    /// Length of the input latent `z`.
    pub z_dim: usize,
    /// Length of one W row.
    pub w_dim: usize,
    /// Fully connected layers of the mapping network.
    pub mapping_layers: usize,
    /// A block at resolution `res` has `channel_base / res` channels, at most `channel_max`.
    pub channel_base: usize,
    /// Most channels of any synthesis block.
    pub channel_max: usize,
}

impl RandomGanConfig {
    /// StyleGAN2 config F as NVIDIA's `stylegan2` training config sets it: z and w 512,
    /// 8 mapping layers, `channel_base` 32768, `channel_max` 512 ('skip' generator).
    pub fn stylegan2_f(resolution: usize) -> Self {
        Self {
            resolution,
            z_dim: 512,
            w_dim: 512,
            mapping_layers: 8,
            channel_base: 32768,
            channel_max: 512,
        }
    }

    /// Channels of the block at `res`: `min(channel_base / res, channel_max)`.
    pub fn channels(&self, res: usize) -> usize {
        (self.channel_base / res).min(self.channel_max)
    }
}

/// A 'skip' StyleGAN2 generator of the given shape with random weights (standard normal as
/// NVIDIA initializes them; mapping weights scaled by 1/lr_multiplier; affine biases 1), for
/// benchmarks. The tensors are written to a temporary safetensors file in NVIDIA's naming and
/// loaded through [`StyleGan2::load`], so the real loader builds it; the file is removed
/// afterwards.
pub fn random_generator(cfg: RandomGanConfig, device: &Device) -> Result<StyleGan2> {
    if cfg.resolution < 4 || !cfg.resolution.is_power_of_two() {
        return Err(Error::InvalidParameter(format!(
            "resolution {} must be a power of two, at least 4",
            cfg.resolution
        )));
    }
    let cpu = Device::Cpu;
    let randn = |shape: &[usize], scale: f64, offset: f64| -> Result<Tensor> {
        Ok(((Tensor::randn(0f32, 1f32, shape, &cpu)? * scale)? + offset)?)
    };
    let taps = super::FirFilter::default_taps(&cpu)?;
    let mut t = std::collections::HashMap::new();
    for i in 0..cfg.mapping_layers {
        let inp = if i == 0 { cfg.z_dim } else { cfg.w_dim };
        t.insert(
            format!("mapping.fc{i}.weight"),
            randn(&[cfg.w_dim, inp], 100.0, 0.0)?,
        );
        t.insert(
            format!("mapping.fc{i}.bias"),
            randn(&[cfg.w_dim], 0.0, 0.0)?,
        );
    }
    t.insert("mapping.w_avg".into(), randn(&[cfg.w_dim], 0.5, 0.0)?);
    let mut prev = 0;
    let mut res = 4;
    while res <= cfg.resolution {
        let ch = cfg.channels(res);
        let p = format!("synthesis.b{res}");
        t.insert(format!("{p}.resample_filter"), taps.clone());
        if res == 4 {
            t.insert(format!("{p}.const"), randn(&[ch, 4, 4], 1.0, 0.0)?);
        }
        let layers: &[(&str, usize)] = if res == 4 {
            &[("conv1", ch)]
        } else {
            &[("conv0", prev), ("conv1", ch)]
        };
        for &(name, inp) in layers {
            let q = format!("{p}.{name}");
            t.insert(format!("{q}.weight"), randn(&[ch, inp, 3, 3], 1.0, 0.0)?);
            t.insert(format!("{q}.bias"), randn(&[ch], 0.0, 0.0)?);
            t.insert(
                format!("{q}.affine.weight"),
                randn(&[inp, cfg.w_dim], 1.0, 0.0)?,
            );
            t.insert(format!("{q}.affine.bias"), randn(&[inp], 0.0, 1.0)?);
            t.insert(format!("{q}.noise_const"), randn(&[res, res], 1.0, 0.0)?);
            t.insert(format!("{q}.noise_strength"), Tensor::new(0.1f32, &cpu)?);
            t.insert(format!("{q}.resample_filter"), taps.clone());
        }
        let q = format!("{p}.torgb");
        t.insert(format!("{q}.weight"), randn(&[3, ch, 1, 1], 1.0, 0.0)?);
        t.insert(format!("{q}.bias"), randn(&[3], 0.0, 0.0)?);
        t.insert(
            format!("{q}.affine.weight"),
            randn(&[ch, cfg.w_dim], 1.0, 0.0)?,
        );
        t.insert(format!("{q}.affine.bias"), randn(&[ch], 0.0, 1.0)?);
        prev = ch;
        res *= 2;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let path: PathBuf = std::env::temp_dir().join(format!(
        "studio-random-stylegan2-{}-{}-{nanos}.safetensors",
        cfg.resolution,
        std::process::id()
    ));
    candle_core::safetensors::save(&t, &path)?;
    drop(t);
    let gan = StyleGan2::load(&path, device);
    let _ = std::fs::remove_file(&path);
    gan
}

/// What made an image, as the text chunk of a PNG Studio writes for a GAN latent (so the
/// latent can be recreated): `StyleGAN2 latent: seed 42; psi 0.7; cutoff all; noise const;
/// class none; model ffhq.safetensors` (`seed` may be fractional, `seed 42+0.25`, or replaced by
/// `z-file NAME` / `w-file NAME`; the model comes last and runs to the end of the line).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentText {
    /// Where the latent came from: `seed 42`, `seed 42+0.25`, `z-file z.npy`, `w-file w.npy`,
    /// `interpolation 1,7,42 w 3/30`, …
    pub source: String,
    /// Truncation ψ (1 when the text has none).
    pub psi: f64,
    /// Truncate only the first `cutoff` W rows (`None` = all, written `all`).
    pub cutoff: Option<usize>,
    /// The noise inputs (written `const`, `random SEED` or `none`).
    pub noise: NoiseMode,
    /// Class index of a conditional network (`None` = no class, written `none`).
    pub class: Option<usize>,
    /// The model's file name.
    pub model: String,
}

const LATENT_TEXT_PREFIX: &str = "StyleGAN2 latent: ";

impl LatentText {
    /// The text chunk: `StyleGAN2 latent: SOURCE; psi …; cutoff …; noise …; class …; model NAME`.
    pub fn to_text(&self) -> String {
        let cutoff = self
            .cutoff
            .map_or_else(|| "all".to_owned(), |c| c.to_string());
        let noise = match self.noise {
            NoiseMode::Const => "const".to_owned(),
            NoiseMode::Random { seed } => format!("random {seed}"),
            NoiseMode::None => "none".to_owned(),
        };
        let class = self
            .class
            .map_or_else(|| "none".to_owned(), |c| c.to_string());
        format!(
            "{LATENT_TEXT_PREFIX}{}; psi {}; cutoff {cutoff}; noise {noise}; class {class}; \
             model {}",
            self.source, self.psi, self.model
        )
    }

    /// Reads [`Self::to_text`]'s format back; `None` for any other text.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.trim().strip_prefix(LATENT_TEXT_PREFIX)?;
        let (head, model) = rest.split_once("; model ")?;
        let mut parts = head.split("; ");
        let source = parts.next()?.to_owned();
        let mut out = Self {
            source,
            psi: 1.0,
            cutoff: None,
            noise: NoiseMode::Const,
            class: None,
            model: model.to_owned(),
        };
        for part in parts {
            let (key, value) = part.split_once(' ')?;
            match key {
                "psi" => out.psi = value.parse().ok()?,
                "cutoff" => {
                    out.cutoff = if value == "all" {
                        None
                    } else {
                        Some(value.parse().ok()?)
                    }
                }
                "class" => {
                    out.class = if value == "none" {
                        None
                    } else {
                        Some(value.parse().ok()?)
                    }
                }
                "noise" => {
                    out.noise = match value.split_once(' ') {
                        Some(("random", seed)) => NoiseMode::Random {
                            seed: seed.parse().ok()?,
                        },
                        _ => match value {
                            "const" => NoiseMode::Const,
                            "none" => NoiseMode::None,
                            _ => return None,
                        },
                    }
                }
                _ => {}
            }
        }
        Some(out)
    }
}

/// Writes an animated GIF frame by frame (each frame quantized to its own 256-colour palette),
/// looping forever.
pub struct GifWriter<W: std::io::Write> {
    encoder: image::codecs::gif::GifEncoder<W>,
    delay: image::Delay,
    frames: usize,
}

impl<W: std::io::Write> std::fmt::Debug for GifWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GifWriter")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl<W: std::io::Write> GifWriter<W> {
    /// `fps` frames per second (GIF delays are in hundredths of a second, so the rate is
    /// rounded to that).
    pub fn new(writer: W, fps: f64) -> Result<Self> {
        if !(fps.is_finite() && fps > 0.0 && fps <= 100.0) {
            return Err(Error::InvalidParameter(format!(
                "frame rate {fps} must be above 0 and at most 100 frames per second"
            )));
        }
        let mut encoder = image::codecs::gif::GifEncoder::new_with_speed(writer, 10);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .map_err(|e| Error::InvalidParameter(format!("GIF: {e}")))?;
        let ms = (1000.0 / fps).round() as u32;
        Ok(Self {
            encoder,
            delay: image::Delay::from_numer_denom_ms(ms, 1),
            frames: 0,
        })
    }

    /// Appends `img` as the next frame, shown for `1/fps` seconds.
    pub fn add_frame(&mut self, img: &RgbImage) -> Result<()> {
        let rgba = image::RgbaImage::from_raw(img.width, img.height, img.to_rgba())
            .ok_or_else(|| Error::InvalidParameter("GIF: frame size mismatch".into()))?;
        self.encoder
            .encode_frame(image::Frame::from_parts(rgba, 0, 0, self.delay))
            .map_err(|e| Error::InvalidParameter(format!("GIF: {e}")))?;
        self.frames += 1;
        Ok(())
    }

    /// Frames written so far.
    pub fn frames(&self) -> usize {
        self.frames
    }
}
