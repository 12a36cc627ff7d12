//! Rendering the Latent Explorer's view of a StyleGAN2 network: the request types (a latent,
//! or a point on a keyframe path; truncation, style mixing, direction edits, noise; an
//! optional layer view), the W rows and noise they stand for, the image, a layer's
//! activations drawn as tiles, and seed-browser grids. The worker renders these between jobs
//! (`crate::worker`); nothing here knows about threads.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::diffusion::imaging::RgbImage;
use crate::error::{Error, Result};
use crate::gan::directions::{DirectionEdit, Directions};
use crate::gan::latent::{self as gan_latent, Keyframe, Space};
use crate::gan::{NoiseMode, StyleGan2};

/// Style mixing: W rows taken from a second seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GanMix {
    /// The second seed, mapped with the latent's ψ and cutoff.
    pub seed: u64,
    /// One entry per W row: `true` takes that row from `seed`.
    pub layers: Vec<bool>,
}

/// One point of the Latent Explorer: a fractional seed, truncation, style mixing and
/// direction edits (sliders in σ units, each on a range of W rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GanLatent {
    /// Integer seed (0 ..= 2³²−1, as numpy's); with `offset`, it picks the `z` the latent is
    /// mapped from.
    pub seed: u64,
    /// Fractional offset blending `seed + floor(offset)` and the next seed (in W).
    pub offset: f32,
    /// Truncation ψ: 1 keeps the mapped `w`, 0 gives `w_avg` (the average image), in the rows
    /// `cutoff` selects.
    pub psi: f64,
    /// Truncate only the first `cutoff` W rows (`None` = all).
    pub cutoff: Option<usize>,
    /// Style mixing with a second seed (`None` = none).
    pub mix: Option<GanMix>,
    /// Applied with the request's directions; ignored when it has none.
    pub edits: Vec<DirectionEdit>,
    /// A latent known only in W (a projection result), `num_ws × w_dim` values row by row;
    /// when set it replaces the seed (and ψ), while mixing and edits still apply.
    pub w: Option<Vec<f32>>,
    /// Noise buffers that go with `w` (a projection's optimized noise), all of
    /// [`StyleGan2::noise_buffers`] flattened in order; when set they replace the request's
    /// noise mode. Not serialized: callers persist it themselves (it can be megabytes).
    #[serde(skip)]
    pub noise: Option<Arc<Vec<f32>>>,
}

impl Default for GanLatent {
    fn default() -> Self {
        Self {
            seed: 0,
            offset: 0.0,
            psi: 1.0,
            cutoff: None,
            mix: None,
            edits: Vec::new(),
            w: None,
            noise: None,
        }
    }
}

/// What a render shows.
#[derive(Debug, Clone, PartialEq)]
pub enum GanRenderWhat {
    /// One latent.
    Latent(GanLatent),
    /// Position `t` ∈ [0, 1] on the path through `keyframes` (lerp in W or slerp in Z).
    Path {
        /// The path's keyframes, evenly spaced: keyframe `k` of `n` sits at `t = k/(n−1)`. In Z
        /// every keyframe needs a seed (no `w`).
        keyframes: Vec<GanLatent>,
        /// Position on the path, 0 (first keyframe) to 1 (last); clamped to that range.
        t: f64,
        /// Interpolate in W (lerp of the `ws`) or in Z (slerp of the blended seeds' `z`).
        space: Space,
    },
}

/// A render of the Latent Explorer's current image ([`crate::worker::Worker::render_gan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GanRenderRequest {
    /// Chosen by the caller; comes back in [`GanFrame::id`].
    pub id: u64,
    /// The latent, or the point on a keyframe path, to render.
    pub what: GanRenderWhat,
    /// Noise inputs, unless the latent (or the path's keyframes) carries its own buffers.
    pub noise: NoiseMode,
    /// The directions the latents' edits refer to (`None`: edits are ignored).
    pub directions: Option<Arc<Directions>>,
    /// Downscale so neither side exceeds this (`None` = the network's resolution).
    pub max_side: Option<u32>,
    /// Also show this synthesis layer's activations ([`GanFrame::layer`]).
    pub layer: Option<GanLayerRequest>,
}

/// Most channels a layer grid shows.
pub const GAN_LAYER_MAX_TILES: usize = 64;
/// Largest side of one channel in a layer view (bigger layers are subsampled).
pub const GAN_LAYER_MAX_TILE_SIDE: usize = 128;

/// How a synthesis layer's activations are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GanLayerMode {
    /// The first `tiles` channels (at most [`GAN_LAYER_MAX_TILES`]) side by side in a grid,
    /// each min–max normalized to grey.
    Grid {
        /// How many channels to show (clamped to 1 ..= [`GAN_LAYER_MAX_TILES`] and to the
        /// layer's channel count).
        tiles: usize,
    },
    /// Three channels as red, green and blue, each min–max normalized (indices past the last
    /// channel are clamped to it).
    Rgb {
        /// Channel indices drawn as red, green and blue.
        channels: [usize; 3],
    },
}

/// Which synthesis layer to show with a render, by NVIDIA's module name under `synthesis.`
/// (`b8.conv0`, `b16.torgb`, …; `Event::GanLoaded`'s `layers` lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GanLayerRequest {
    /// The layer's name (unknown names fail only the layer view; the image still renders).
    pub name: String,
    /// How to draw the activations.
    pub mode: GanLayerMode,
}

/// Statistics over all values of a layer's activations.
#[derive(Debug, Clone, PartialEq)]
pub struct GanLayerStats {
    /// `(n, channels, height, width)`.
    pub shape: Vec<usize>,
    /// Mean of all values.
    pub mean: f32,
    /// Standard deviation of all values (population: divided by their count).
    pub std: f32,
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
}

/// A synthesis layer's activations drawn as an image, with their statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct GanLayerView {
    /// The layer's name, as requested.
    pub name: String,
    /// The drawing: a grey tile grid or an RGB composite ([`GanLayerMode`]).
    pub image: RgbImage,
    /// Statistics over all the layer's values.
    pub stats: GanLayerStats,
}

/// Where an exported animation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GanAnimationOut {
    /// One looping GIF file.
    Gif(PathBuf),
    /// `frame_0001.png`, `frame_0002.png`, … in this folder (created if missing), each with
    /// its latent in a text chunk.
    PngSequence(PathBuf),
}

/// [`crate::worker::JobKind::ExportGanAnimation`]: `frames` evenly spaced points of the keyframe path.
#[derive(Debug, Clone, PartialEq)]
pub struct GanAnimationRequest {
    /// The path's keyframes (at least two), evenly spaced.
    pub keyframes: Vec<GanLatent>,
    /// The latent space to interpolate in (Z needs every keyframe's seed: none with `w`).
    pub space: Space,
    /// Noise inputs where the keyframes carry no noise buffers of their own.
    pub noise: NoiseMode,
    /// The directions the keyframes' edits refer to (`None`: edits are ignored).
    pub directions: Option<Arc<Directions>>,
    /// Number of frames (at least 2); frame `i` sits at `t = i/(frames−1)`, so both ends are
    /// included.
    pub frames: usize,
    /// Frames per second of the GIF.
    pub fps: f64,
    /// Where the frames go.
    pub out: GanAnimationOut,
    /// Written into every PNG frame's text chunk, with `frame i/n` appended.
    pub text: String,
}

/// The result of the newest [`GanRenderRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct GanFrame {
    /// The request's [`GanRenderRequest::id`].
    pub id: u64,
    /// The image, or why it could not be rendered.
    pub result: std::result::Result<RgbImage, String>,
    /// Milliseconds the render took on the worker.
    pub render_ms: f32,
    /// The requested layer's view, or why it could not be made (the image still shows).
    pub layer: Option<std::result::Result<GanLayerView, String>>,
}

/// Thumbnails for the seed browser ([`crate::worker::Worker::render_gan_grid`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GanGridRequest {
    /// Chosen by the caller; comes back in [`GanGrid::id`].
    pub id: u64,
    /// Seeds to render, one thumbnail each.
    pub seeds: Vec<u64>,
    /// Truncation ψ of every thumbnail (1 = none).
    pub psi: f64,
    /// Truncate only the first `cutoff` W rows (`None` = all).
    pub cutoff: Option<usize>,
    /// Noise inputs of every thumbnail.
    pub noise: NoiseMode,
    /// Downscale each thumbnail so neither side exceeds this many pixels (0 = full size).
    pub max_side: u32,
}

/// Rendered thumbnails of the newest [`GanGridRequest`], in its seeds' order.
#[derive(Debug, Clone, PartialEq)]
pub struct GanGrid {
    /// The request's [`GanGridRequest::id`].
    pub id: u64,
    /// `(seed, thumbnail)` pairs, or why they could not be rendered.
    pub result: std::result::Result<Vec<(u64, RgbImage)>, String>,
}

/// The `ws` of one explorer latent: the blended seed, truncated, mixed, edited.
fn latent_ws(
    gan: &StyleGan2,
    latent: &GanLatent,
    directions: Option<&Directions>,
) -> Result<candle_core::Tensor> {
    let mut ws = if latent.w.is_some() {
        // Replaced below; no need to map the seed.
        gan.w_avg()?
    } else {
        gan_latent::seed_blend_ws(
            gan,
            latent.seed,
            latent.offset,
            None,
            latent.psi,
            latent.cutoff,
        )?
    };
    if let Some(w) = &latent.w {
        let info = gan.info();
        if w.len() != info.num_ws * info.w_dim {
            return Err(Error::InvalidParameter(format!(
                "the latent has {} W values but this network takes {} × {}",
                w.len(),
                info.num_ws,
                info.w_dim
            )));
        }
        ws = candle_core::Tensor::from_slice(w, (1, info.num_ws, info.w_dim), gan.device())?;
    }
    if let Some(mix) = &latent.mix
        && mix.layers.iter().any(|&b| b)
    {
        let other = gan.map(&gan.z_from_seed(mix.seed)?, None, latent.psi, latent.cutoff)?;
        ws = gan_latent::style_mix(&ws, &other, &mix.layers)?;
    }
    if let Some(dirs) = directions
        && latent.edits.iter().any(|e| e.sigma != 0.0)
    {
        let edits: Vec<_> = latent
            .edits
            .iter()
            .filter(|e| e.sigma != 0.0)
            .map(|e| (e.component, e.sigma, e.layers.clone()))
            .collect();
        ws = crate::gan::directions::apply(&ws, dirs, &edits)?;
    }
    Ok(ws)
}

pub(crate) fn path_ws(
    gan: &StyleGan2,
    keyframes: &[GanLatent],
    t: f64,
    space: Space,
    dirs: Option<&Directions>,
) -> Result<candle_core::Tensor> {
    let frames = keyframes
        .iter()
        .map(|k| {
            let z = match k.w {
                Some(_) => None,
                None => Some(gan_latent::seed_blend(gan, k.seed, k.offset)?),
            };
            Ok(Keyframe {
                w: latent_ws(gan, k, dirs)?,
                z,
                psi: k.psi,
                cutoff: k.cutoff,
                c: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    gan_latent::interpolate(gan, &frames, t, space)
}

pub(crate) fn no_gan() -> Error {
    Error::InvalidParameter("no GAN is loaded: open one in the Latent Explorer first".into())
}

/// The image, and the requested layer's view (its own error when only that failed).
pub(crate) type RenderedGan = (RgbImage, Option<Result<GanLayerView>>);

pub(crate) fn render_gan(
    gan: Option<&StyleGan2>,
    request: &GanRenderRequest,
) -> Result<RenderedGan> {
    let gan = gan.ok_or_else(no_gan)?;
    let dirs = request.directions.as_deref();
    let (ws, noise) = match &request.what {
        GanRenderWhat::Latent(latent) => (
            latent_ws(gan, latent, dirs)?,
            noise_buffers(gan, latent.noise.as_deref())?,
        ),
        GanRenderWhat::Path {
            keyframes,
            t,
            space,
        } => (
            path_ws(gan, keyframes, *t, *space, dirs)?,
            path_noise(gan, keyframes, *t)?,
        ),
    };
    let layer = request.layer.as_ref();
    let known = layer.is_none_or(|l| gan.layer_names().contains(&l.name));
    let wanted = layer.filter(|_| known).map(|l| l.name.as_str());
    let (img, acts) = match &noise {
        Some(buffers) => gan.synthesize_with_noise_and_layer(&ws, buffers, wanted)?,
        None => gan.synthesize_with_layer(&ws, request.noise, wanted)?,
    };
    let image = fit(
        crate::diffusion::imaging::tensor_to_image(&img)?,
        request.max_side,
    );
    let Some(layer) = layer else {
        return Ok((image, None));
    };
    if !known {
        // The image renders anyway; only the layer view fails.
        let err = Error::InvalidParameter(format!(
            "no synthesis layer `{}`; this network has: {}",
            layer.name,
            gan.layer_names().join(", ")
        ));
        return Ok((image, Some(Err(err))));
    }
    let view = acts
        .ok_or_else(|| {
            Error::InvalidParameter(format!("layer `{}` returned no activations", layer.name))
        })
        .and_then(|a| layer_view(&layer.name, &a, layer.mode));
    Ok((image, Some(view)))
}

/// A latent's own noise buffers, shaped as the network's ([`GanLatent::noise`]).
fn noise_buffers(
    gan: &StyleGan2,
    flat: Option<&Vec<f32>>,
) -> Result<Option<Vec<candle_core::Tensor>>> {
    let Some(flat) = flat else {
        return Ok(None);
    };
    let shapes: Vec<Vec<usize>> = gan
        .noise_buffers()
        .iter()
        .map(|b| b.dims().to_vec())
        .collect();
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if flat.len() != total {
        return Err(Error::InvalidParameter(format!(
            "the latent carries {} noise values but this network's noise inputs hold {total}",
            flat.len()
        )));
    }
    let mut at = 0;
    let buffers = shapes
        .iter()
        .map(|shape| {
            let n: usize = shape.iter().product();
            let t =
                candle_core::Tensor::from_slice(&flat[at..at + n], shape.as_slice(), gan.device())?;
            at += n;
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(buffers))
}

/// The noise at `t` on a keyframe path: the keyframes' own noise (lerped between two that
/// both carry it; that of a keyframe the path sits exactly on), otherwise `None` (the
/// request's noise mode).
pub(crate) fn path_noise(
    gan: &StyleGan2,
    keyframes: &[GanLatent],
    t: f64,
) -> Result<Option<Vec<candle_core::Tensor>>> {
    let Some((index, frac)) = gan_latent::path_segment(keyframes.len(), t) else {
        return Ok(None);
    };
    let a = noise_buffers(gan, keyframes[index].noise.as_deref())?;
    let b = match keyframes.get(index + 1) {
        Some(k) => noise_buffers(gan, k.noise.as_deref())?,
        None => None,
    };
    Ok(match (a, b) {
        (a, _) if frac <= 0.0 => a,
        (_, b) if frac >= 1.0 => b,
        (Some(a), Some(b)) => Some(
            a.iter()
                .zip(&b)
                .map(|(x, y)| gan_latent::lerp(x, y, frac))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => None,
    })
}

/// Draws activations `(n, c, h, w)` (the first of the batch) as [`GanLayerMode`] says, with
/// statistics over every value.
pub fn layer_view(
    name: &str,
    acts: &candle_core::Tensor,
    mode: GanLayerMode,
) -> Result<GanLayerView> {
    let shape = acts.dims().to_vec();
    let (c, h, w) = match shape.as_slice() {
        [_, c, h, w] | [c, h, w] => (*c, *h, *w),
        other => {
            return Err(Error::InvalidParameter(format!(
                "layer activations must be (n, c, h, w), not {other:?}"
            )));
        }
    };
    let values = acts
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if c == 0 || h == 0 || w == 0 || values.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "layer `{name}` is empty: {shape:?}"
        )));
    }
    let stats = layer_stats(&values, shape.clone());
    let plane = h * w;
    // Subsample big layers so a tile is at most GAN_LAYER_MAX_TILE_SIDE on a side.
    let step = h.max(w).div_ceil(GAN_LAYER_MAX_TILE_SIDE).max(1);
    let (th, tw) = (h.div_ceil(step), w.div_ceil(step));
    let normalized = |ch: usize| -> Vec<u8> {
        let data = &values[ch * plane..(ch + 1) * plane];
        let (lo, hi) = data
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = if hi > lo { hi - lo } else { 1.0 };
        let mut out = Vec::with_capacity(th * tw);
        for y in 0..th {
            for x in 0..tw {
                let v = (data[y * step * w + x * step] - lo) / range;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                out.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        out
    };
    let too_big = |v: usize| {
        Error::InvalidParameter(format!("layer `{name}` is too large to draw ({v} pixels)"))
    };
    let image = match mode {
        GanLayerMode::Rgb { channels } => {
            let planes = channels.map(|ch| normalized(ch.min(c - 1)));
            let mut pixels = Vec::with_capacity(th * tw * 3);
            for i in 0..th * tw {
                pixels.extend(planes.iter().map(|p| p[i]));
            }
            RgbImage {
                width: u32::try_from(tw).map_err(|_| too_big(tw))?,
                height: u32::try_from(th).map_err(|_| too_big(th))?,
                pixels,
            }
        }
        GanLayerMode::Grid { tiles } => {
            let n = tiles.clamp(1, GAN_LAYER_MAX_TILES).min(c);
            let cols = (1..=n).find(|k| k * k >= n).unwrap_or(n);
            let rows = n.div_ceil(cols);
            // One pixel of dark gap between tiles.
            let (gw, gh) = (cols * (tw + 1) - 1, rows * (th + 1) - 1);
            let mut pixels = vec![32u8; gw * gh * 3];
            for ch in 0..n {
                let tile = normalized(ch);
                let (ox, oy) = ((ch % cols) * (tw + 1), (ch / cols) * (th + 1));
                for y in 0..th {
                    for x in 0..tw {
                        let v = tile[y * tw + x];
                        let at = ((oy + y) * gw + ox + x) * 3;
                        pixels[at..at + 3].fill(v);
                    }
                }
            }
            RgbImage {
                width: u32::try_from(gw).map_err(|_| too_big(gw))?,
                height: u32::try_from(gh).map_err(|_| too_big(gh))?,
                pixels,
            }
        }
    };
    Ok(GanLayerView {
        name: name.to_owned(),
        image,
        stats,
    })
}

fn layer_stats(values: &[f32], shape: Vec<usize>) -> GanLayerStats {
    #[allow(clippy::cast_precision_loss)]
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    #[allow(clippy::cast_possible_truncation)]
    GanLayerStats {
        shape,
        mean: mean as f32,
        std: var.sqrt() as f32,
        min,
        max,
    }
}

pub(crate) fn render_gan_grid(
    gan: Option<&StyleGan2>,
    request: &GanGridRequest,
) -> Result<Vec<(u64, RgbImage)>> {
    let gan = gan.ok_or_else(no_gan)?;
    request
        .seeds
        .iter()
        .map(|&seed| {
            let ws = gan.map(&gan.z_from_seed(seed)?, None, request.psi, request.cutoff)?;
            let image = gan_latent::render(gan, &ws, request.noise)?;
            Ok((seed, fit(image, Some(request.max_side))))
        })
        .collect()
}

/// Downscales `image` so neither side exceeds `max_side`.
fn fit(image: RgbImage, max_side: Option<u32>) -> RgbImage {
    match max_side {
        Some(m) if m > 0 && (image.width > m || image.height > m) => {
            let scale = f64::from(m) / f64::from(image.width.max(image.height));
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let (w, h) = (
                ((f64::from(image.width) * scale).round() as u32).max(1),
                ((f64::from(image.height) * scale).round() as u32).max(1),
            );
            image.resized(w, h)
        }
        _ => image,
    }
}
