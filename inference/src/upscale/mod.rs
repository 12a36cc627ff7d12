//! Upscalers, loaded from safetensors or a PyTorch pickle (read as data): SwinIR (the
//! transformer upscaler, in [`swinir`]) and ESRGAN / Real-ESRGAN's `RRDBNet` generator (x1,
//! x2, x4 and x8 models, the 23-block photo models and the 6-block anime ones) in either
//! published naming:
//!
//! - BasicSR's, as Real-ESRGAN ships it: `conv_first`, `body.N.rdbK.convJ`, `conv_body`,
//!   `conv_up1`, `conv_up2`, `conv_hr`, `conv_last` (inside `params_ema` / `params` in `.pth`
//!   files). x2 and x1 models pixel-unshuffle their input (12 or 48 input channels) and then
//!   up-sample ×4 like the others;
//! - the original ESRGAN repository's, as `RRDB_ESRGAN_x4.pth` and many community models have
//!   it: `model.0`, `model.1.sub.N.RDBK.convJ.0`, `model.1.sub.<blocks>`, then one `model.k`
//!   convolution per ×2 up-sampling, `HRconv` and the last one.
//!
//! The block count, widths and scale are read from the tensor names and shapes. A file of
//! another architecture (SRVGGNetCompact, a diffusion model, …) is refused with its name.
//!
//! [`Upscaler::upscale`] works in tiles with overlap, so memory stays bounded whatever the
//! image size: each tile is run with `pad` pixels of context on every side and only its centre
//! is kept (Real-ESRGAN's `tile_pad`).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::diffusion::imaging::RgbImage;
use crate::error::{Error, Result};
use crate::image_meta::GenerationParameters;
use crate::weights::{Weights, open_checkpoint};

pub mod swinir;

/// The most residual-in-residual blocks accepted (the published models have 6 or 23).
const MAX_BLOCKS: usize = 128;
/// The widest feature maps accepted.
const MAX_WIDTH: usize = 1024;
/// The largest output accepted, in pixels (about 10000 × 10000).
pub const MAX_OUTPUT_PIXELS: u64 = 100_000_000;

/// How the file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// BasicSR / Real-ESRGAN (`conv_first`, `body.N.rdbK.convJ`, …).
    BasicSr,
    /// The original ESRGAN repository (`model.0`, `model.1.sub.N.RDBK.convJ.0`, …).
    Esrgan,
}

/// What an upscaler file turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpscalerInfo {
    /// The file's stem.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Output size over input size.
    pub scale: u32,
    /// The network and its shape.
    pub architecture: Architecture,
}

/// The network an upscaler file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Architecture {
    /// ESRGAN / Real-ESRGAN.
    RrdbNet {
        /// Residual-in-residual dense blocks (23 for the photo models, 6 for the anime ones).
        blocks: usize,
        /// Feature channels (`num_feat`, 64 in the published models).
        features: usize,
        /// Growth channels of the dense blocks (`num_grow_ch`, 32).
        growth: usize,
        /// The tensor naming found.
        naming: Naming,
    },
    /// SwinIR.
    SwinIr(swinir::SwinIrConfig),
}

impl UpscalerInfo {
    /// For lists: "RealESRGAN_x4plus (RRDBNet ×4, 23 blocks)", "SwinIR_4x (SwinIR ×4, 9 × 6
    /// blocks, 240 channels)".
    pub fn describe(&self) -> String {
        match &self.architecture {
            Architecture::RrdbNet { blocks, .. } => {
                format!("{} (RRDBNet ×{}, {blocks} blocks)", self.name, self.scale)
            }
            Architecture::SwinIr(c) => format!(
                "{} (SwinIR ×{}, {} × {} blocks, {} channels)",
                self.name,
                self.scale,
                c.depths.len(),
                c.depths.first().copied().unwrap_or(0),
                c.embed_dim
            ),
        }
    }
}

/// A square convolution with bias, stride 1, padded to keep the size (3×3 unless loaded with
/// [`Conv::load_k`]).
struct Conv {
    weight: Tensor,
    bias: Tensor,
    pad: usize,
}

impl Conv {
    fn load(w: &Weights, name: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load_k(w, name, cin, cout, 3)
    }

    fn load_k(w: &Weights, name: &str, cin: usize, cout: usize, k: usize) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), &[cout, cin, k, k])?;
        let bias = w
            .get(&format!("{name}.bias"), &[cout])?
            .reshape((1, cout, 1, 1))?;
        Ok(Self {
            weight,
            bias,
            pad: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.conv2d(&self.weight, self.pad, 1, 1, 1)?
            .broadcast_add(&self.bias)?)
    }
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    // max(x, 0.2 x) is leaky ReLU with slope 0.2.
    Ok(x.maximum(&(x * 0.2)?)?)
}

struct DenseBlock {
    convs: [Conv; 5],
}

impl DenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&feats, 1)?)?)?;
            feats.push(y);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&feats, 1)?)?;
        Ok(((x5 * 0.2)? + x)?)
    }
}

/// A loaded upscaler, ready to run on its device.
pub struct Upscaler {
    info: UpscalerInfo,
    net: Net,
    device: Device,
}

enum Net {
    Rrdb(RrdbNet),
    SwinIr(swinir::SwinIr),
}

/// ESRGAN's generator.
struct RrdbNet {
    /// Pixel-unshuffle factor of the input (1, 2 or 4).
    unshuffle: usize,
    first: Conv,
    body: Vec<[DenseBlock; 3]>,
    body_conv: Conv,
    ups: Vec<Conv>,
    hr: Conv,
    last: Conv,
}

impl std::fmt::Debug for Upscaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upscaler")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The tensor-name prefix a Real-ESRGAN `.pth` keeps its weights under, if any.
fn find_prefix(w: &Weights) -> Option<(String, Naming)> {
    for prefix in ["params_ema.", "params.", "", "module."] {
        if w.contains(&format!("{prefix}conv_first.weight")) {
            return Some((prefix.to_owned(), Naming::BasicSr));
        }
        if w.contains(&format!("{prefix}model.0.weight"))
            && w.contains(&format!("{prefix}model.1.sub.0.RDB1.conv1.0.weight"))
        {
            return Some((prefix.to_owned(), Naming::Esrgan));
        }
    }
    None
}

/// What a file that is not an RRDBNet looks like, for the error.
fn other_architecture(w: &Weights) -> String {
    let has = |needle: &str| w.names().any(|n| n.contains(needle));
    if has("patch_embed") || has("residual_group") {
        "SwinIR (a transformer upscaler)".to_owned()
    } else if has("body.0.weight") && !has("rdb1") {
        "SRVGGNetCompact (Real-ESRGAN's compact model, e.g. realesr-general-x4v3)".to_owned()
    } else if has("down_blocks") || has("input_blocks") {
        "a diffusion model, not an upscaler".to_owned()
    } else {
        let some: Vec<&str> = w.names().take(4).collect();
        format!("unknown (tensors such as {})", some.join(", "))
    }
}

/// The names of each convolution in the file's naming.
struct Names {
    prefix: String,
    naming: Naming,
    blocks: usize,
    /// ESRGAN naming: the `model.k` indices after the body, in order (ups, HR, last).
    tail: Vec<usize>,
}

impl Names {
    fn first(&self) -> String {
        match self.naming {
            Naming::BasicSr => format!("{}conv_first", self.prefix),
            Naming::Esrgan => format!("{}model.0", self.prefix),
        }
    }
    fn dense(&self, block: usize, rdb: usize, conv: usize) -> String {
        match self.naming {
            Naming::BasicSr => format!("{}body.{block}.rdb{rdb}.conv{conv}", self.prefix),
            Naming::Esrgan => format!("{}model.1.sub.{block}.RDB{rdb}.conv{conv}.0", self.prefix),
        }
    }
    fn body_conv(&self) -> String {
        match self.naming {
            Naming::BasicSr => format!("{}conv_body", self.prefix),
            Naming::Esrgan => format!("{}model.1.sub.{}", self.prefix, self.blocks),
        }
    }
    /// The up-sampling convolutions, then HR, then the last.
    fn tail(&self, ups: usize) -> Vec<String> {
        match self.naming {
            Naming::BasicSr => (1..=ups)
                .map(|i| format!("{}conv_up{i}", self.prefix))
                .chain([
                    format!("{}conv_hr", self.prefix),
                    format!("{}conv_last", self.prefix),
                ])
                .collect(),
            Naming::Esrgan => self
                .tail
                .iter()
                .map(|k| format!("{}model.{k}", self.prefix))
                .collect(),
        }
    }
}

/// The leading dimensions of tensor `name`, or an error naming it.
fn shape_of(w: &Weights, name: &str) -> Result<Vec<usize>> {
    let view = w.tensors().get(name).map_err(|_| Error::MissingTensor {
        path: w.path().to_path_buf(),
        name: name.to_owned(),
    })?;
    Ok(view.shape().to_vec())
}

/// The file's stem, for [`UpscalerInfo::name`].
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Loads an upscaler (SwinIR or RRDBNet; `.safetensors`, or a `.pth` read as data) onto
/// `device`.
pub fn load(path: &Path, device: &Device) -> Result<Upscaler> {
    let tensors = open_checkpoint(&[path.to_path_buf()])?;
    let w = Weights::from_tensors(path.to_path_buf(), tensors, device, DType::F32);
    let bad = |message: String| Error::InvalidModel {
        path: path.to_path_buf(),
        message,
    };
    if let Some(prefix) = swinir::find_prefix(&w) {
        let net = swinir::SwinIr::load(&w, &prefix)?;
        let config = net.config().clone();
        return Ok(Upscaler {
            info: UpscalerInfo {
                name: stem(path),
                path: path.to_path_buf(),
                // At most 8.
                scale: u32::try_from(config.scale).unwrap_or(u32::MAX),
                architecture: Architecture::SwinIr(config),
            },
            net: Net::SwinIr(net),
            device: device.clone(),
        });
    }
    let Some((prefix, naming)) = find_prefix(&w) else {
        return Err(bad(format!(
            "not an upscaler Studio runs (ESRGAN/Real-ESRGAN's RRDBNet or SwinIR); its \
             architecture looks like {}",
            other_architecture(&w)
        )));
    };
    let mut names = Names {
        prefix,
        naming,
        blocks: 0,
        tail: Vec::new(),
    };
    while names.blocks <= MAX_BLOCKS
        && w.contains(&format!("{}.weight", names.dense(names.blocks, 1, 1)))
    {
        names.blocks += 1;
    }
    if names.blocks == 0 || names.blocks > MAX_BLOCKS {
        return Err(bad(format!(
            "{} residual blocks; an RRDBNet has 1 to {MAX_BLOCKS}",
            names.blocks
        )));
    }
    let first_shape = shape_of(&w, &format!("{}.weight", names.first()))?;
    let [features, cin, 3, 3] = first_shape[..] else {
        return Err(bad(format!(
            "the first convolution has shape {first_shape:?}, not (features, channels, 3, 3)"
        )));
    };
    let growth_shape = shape_of(&w, &format!("{}.weight", names.dense(0, 1, 1)))?;
    let growth = growth_shape.first().copied().unwrap_or(0);
    if !(1..=MAX_WIDTH).contains(&features) || !(1..=MAX_WIDTH).contains(&growth) {
        return Err(bad(format!(
            "{features} features and {growth} growth channels; at most {MAX_WIDTH} each"
        )));
    }
    let unshuffle = match cin {
        3 => 1,
        12 => 2,
        48 => 4,
        other => {
            return Err(bad(format!(
                "the first convolution takes {other} channels; RRDBNet takes 3 (or 12 / 48 for \
                 x2 / x1 models)"
            )));
        }
    };
    let ups = match naming {
        Naming::BasicSr => (1..=4)
            .take_while(|i| w.contains(&format!("{}conv_up{i}.weight", names.prefix)))
            .count(),
        Naming::Esrgan => {
            let mut tail: Vec<usize> = w
                .names()
                .filter_map(|n| {
                    let rest = n.strip_prefix(&format!("{}model.", names.prefix))?;
                    let (k, field) = rest.split_once('.')?;
                    (field == "weight").then_some(k.parse::<usize>().ok()?)
                })
                .filter(|&k| k >= 2)
                .collect();
            tail.sort_unstable();
            names.tail = tail;
            names.tail.len().saturating_sub(2)
        }
    };
    if !(1..=4).contains(&ups) {
        return Err(bad(format!(
            "{ups} up-sampling convolutions; an RRDBNet has 1 to 4"
        )));
    }
    let scale = (1usize << ups) / unshuffle;
    if scale == 0 {
        return Err(bad(format!(
            "its input is unshuffled ×{unshuffle} but up-sampled only ×{}",
            1 << ups
        )));
    }
    let dense = |block: usize, rdb: usize| -> Result<DenseBlock> {
        let conv = |j: usize| {
            let cout = if j == 5 { features } else { growth };
            Conv::load(
                &w,
                &names.dense(block, rdb, j),
                features + (j - 1) * growth,
                cout,
            )
        };
        Ok(DenseBlock {
            convs: [conv(1)?, conv(2)?, conv(3)?, conv(4)?, conv(5)?],
        })
    };
    let mut body = Vec::with_capacity(names.blocks);
    for b in 0..names.blocks {
        body.push([dense(b, 1)?, dense(b, 2)?, dense(b, 3)?]);
    }
    let tail = names.tail(ups);
    let mut tail_convs = Vec::with_capacity(tail.len());
    for (i, name) in tail.iter().enumerate() {
        let cout = if i + 1 == tail.len() {
            let shape = shape_of(&w, &format!("{name}.weight"))?;
            if shape.first() != Some(&3) {
                return Err(bad(format!(
                    "the last convolution `{name}` makes {:?} channels, not 3",
                    shape.first()
                )));
            }
            3
        } else {
            features
        };
        tail_convs.push(Conv::load(&w, name, features, cout)?);
    }
    let last = tail_convs
        .pop()
        .ok_or_else(|| bad("no last convolution".into()))?;
    let hr = tail_convs
        .pop()
        .ok_or_else(|| bad("no HR convolution".into()))?;
    let info = UpscalerInfo {
        name: stem(path),
        path: path.to_path_buf(),
        // At most 16.
        scale: u32::try_from(scale).unwrap_or(u32::MAX),
        architecture: Architecture::RrdbNet {
            blocks: names.blocks,
            features,
            growth,
            naming,
        },
    };
    Ok(Upscaler {
        info,
        net: Net::Rrdb(RrdbNet {
            unshuffle,
            first: Conv::load(&w, &names.first(), cin, features)?,
            body,
            body_conv: Conv::load(&w, &names.body_conv(), features, features)?,
            ups: tail_convs,
            hr,
            last,
        }),
        device: device.clone(),
    })
}

/// `(1, C, H, W)` → `(1, C·f², H/f, W/f)`, as `torch.nn.functional.pixel_unshuffle`.
fn pixel_unshuffle(x: &Tensor, f: usize) -> Result<Tensor> {
    if f == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / f, f, w / f, f))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * f * f, h / f, w / f))?)
}

impl Upscaler {
    /// What was loaded.
    pub fn info(&self) -> &UpscalerInfo {
        &self.info
    }

    /// Input sides must be multiples of this (RRDBNet's pixel-unshuffle factor; SwinIR pads
    /// to its window itself).
    pub fn multiple(&self) -> usize {
        match &self.net {
            Net::Rrdb(n) => n.unshuffle,
            Net::SwinIr(_) => 1,
        }
    }

    /// Tiles and their context are whole multiples of this, so every tile sees the same
    /// grid (the unshuffle factor, or SwinIR's attention window).
    fn alignment(&self) -> usize {
        match &self.net {
            Net::Rrdb(n) => n.unshuffle,
            Net::SwinIr(n) => n.config().window,
        }
    }

    /// The network on a `(1, 3, H, W)` tensor of values in `[0, 1]` (sides multiples of
    /// [`Self::multiple`]); returns `(1, 3, H·scale, W·scale)`, not clamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Rrdb(n) => n.forward(x),
            Net::SwinIr(n) => n.forward(x),
        }
    }
}

impl RrdbNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let feat = self.first.forward(&pixel_unshuffle(x, self.unshuffle)?)?;
        let mut body = feat.clone();
        for rrdb in &self.body {
            let mut out = body.clone();
            for rdb in rrdb {
                out = rdb.forward(&out)?;
            }
            body = ((out * 0.2)? + &body)?;
        }
        let mut feat = (feat + self.body_conv.forward(&body)?)?;
        for up in &self.ups {
            let (_, _, h, w) = feat.dims4()?;
            feat = lrelu(&up.forward(&feat.upsample_nearest2d(2 * h, 2 * w)?)?)?;
        }
        self.last.forward(&lrelu(&self.hr.forward(&feat)?)?)
    }
}

impl Upscaler {
    /// Upscales `image` by the model's scale, `tile` input pixels at a time (0: the whole
    /// image at once) with `pad` pixels of context around each tile. `on_tile(done, total)`
    /// is called after each tile; `Break` stops and returns `Ok(None)`.
    pub fn upscale(
        &self,
        image: &RgbImage,
        tile: usize,
        pad: usize,
        on_tile: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<RgbImage>> {
        let (w, h) = (image.width as usize, image.height as usize);
        let s = self.info.scale as usize;
        let out_pixels = (w as u64) * (h as u64) * (s as u64).pow(2);
        if w == 0 || h == 0 || out_pixels > MAX_OUTPUT_PIXELS {
            return Err(Error::InvalidParameter(format!(
                "a {w}×{h} image upscaled ×{s} would be {out_pixels} pixels; at most \
                 {MAX_OUTPUT_PIXELS}"
            )));
        }
        // The image is padded (edge pixels repeated) to a multiple of `multiple` and the
        // result cropped back; tiles and their context are whole multiples of `alignment`.
        let m = self.multiple();
        let (pw, ph) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
        let a = self.alignment();
        let tile = if tile == 0 {
            pw.max(ph)
        } else {
            tile.div_ceil(a) * a
        };
        let pad = pad.div_ceil(a) * a;
        let planes = padded_planes(image, pw, ph);
        let (ow, oh) = (pw * s, ph * s);
        let mut out = vec![0u8; ow * oh * 3];
        let (tx, ty) = (pw.div_ceil(tile), ph.div_ceil(tile));
        let total = tx * ty;
        for (done, (iy, ix)) in (0..ty)
            .flat_map(|iy| (0..tx).map(move |ix| (iy, ix)))
            .enumerate()
        {
            let (x0, y0) = (ix * tile, iy * tile);
            let (x1, y1) = ((x0 + tile).min(pw), (y0 + tile).min(ph));
            let (cx0, cy0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
            let (cx1, cy1) = ((x1 + pad).min(pw), (y1 + pad).min(ph));
            let (cw, ch) = (cx1 - cx0, cy1 - cy0);
            let mut data = vec![0f32; 3 * cw * ch];
            for c in 0..3 {
                for y in 0..ch {
                    let src = &planes[c * pw * ph + (cy0 + y) * pw + cx0..][..cw];
                    data[c * cw * ch + y * cw..][..cw].copy_from_slice(src);
                }
            }
            let x = Tensor::from_vec(data, (1, 3, ch, cw), &self.device)?;
            let y = self
                .forward(&x)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (yw, yh) = (cw * s, ch * s);
            for oy in (y0 * s)..(y1 * s) {
                for ox in (x0 * s)..(x1 * s) {
                    let (ly, lx) = (oy - cy0 * s, ox - cx0 * s);
                    for c in 0..3 {
                        let v = y[c * yw * yh + ly * yw + lx];
                        // Clamped to [0, 1], then to bytes.
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        let byte = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                        out[(oy * ow + ox) * 3 + c] = byte;
                    }
                }
            }
            if on_tile(done + 1, total).is_break() {
                return Ok(None);
            }
        }
        let full = RgbImage {
            width: u32::try_from(ow).unwrap_or(u32::MAX),
            height: u32::try_from(oh).unwrap_or(u32::MAX),
            pixels: out,
        };
        let (tw, th) = (w * s, h * s);
        Ok(Some(if (tw, th) == (ow, oh) {
            full
        } else {
            full.crop(
                0,
                0,
                u32::try_from(tw).unwrap_or(u32::MAX),
                u32::try_from(th).unwrap_or(u32::MAX),
            )
        }))
    }
}

impl Upscaler {
    /// Upscales `image` to `scale` times its size: the model's own scale first (in tiles, as
    /// [`Self::upscale`]), then a Lanczos resize when `scale` differs (the SD web UI's
    /// "Upscale by"). `Ok(None)` when `on_tile` stopped it.
    pub fn upscale_by(
        &self,
        image: &RgbImage,
        scale: f64,
        tile: usize,
        on_tile: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<RgbImage>> {
        let target = |v: u32| -> Result<u32> {
            let t = (f64::from(v) * scale).round();
            if !scale.is_finite() || !(1.0..=f64::from(u16::MAX)).contains(&t) {
                return Err(Error::InvalidParameter(format!(
                    "upscaling by {scale} makes a side of {t} pixels"
                )));
            }
            // In range: checked above.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(t as u32)
        };
        let (tw, th) = (target(image.width)?, target(image.height)?);
        let Some(up) = self.upscale(image, tile, TILE_PAD, on_tile)? else {
            return Ok(None);
        };
        Ok(Some(if (tw, th) == (up.width, up.height) {
            up
        } else {
            up.resized(tw, th)
        }))
    }
}

/// Context pixels around each tile.
pub const TILE_PAD: usize = 16;

/// `params` with the SD web UI's postprocessing fields for an upscale by `scale` with `name`.
pub fn postprocess_parameters(
    mut params: GenerationParameters,
    name: &str,
    scale: f64,
) -> GenerationParameters {
    let by = format!("{scale:.3}");
    params.set("Postprocess upscaler", name.to_owned());
    params.set(
        "Postprocess upscale by",
        by.trim_end_matches('0').trim_end_matches('.').to_owned(),
    );
    params
}

/// The image as three `f32` planes in `[0, 1]`, `pw × ph`, edge pixels repeated beyond it.
fn padded_planes(image: &RgbImage, pw: usize, ph: usize) -> Vec<f32> {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut planes = vec![0f32; 3 * pw * ph];
    for y in 0..ph {
        let sy = y.min(h - 1);
        for x in 0..pw {
            let sx = x.min(w - 1);
            for c in 0..3 {
                planes[c * pw * ph + y * pw + x] =
                    f32::from(image.pixels[(sy * w + sx) * 3 + c]) / 255.0;
            }
        }
    }
    planes
}
