//! The synthesis network on Studio's own CPU kernels ([`crate::nn`]), channels-last from the
//! constant to the last toRGB.
//!
//! - **Modulated convolutions** fold the style (per input channel) and the demodulation (per
//!   output channel) into the weights as they are packed for the micro-kernel, once per
//!   sample: `w'(o, i, t) = w(o, i, t) · s_i · d_o` with
//!   `d_o = 1/sqrt(Σ_i s_i² Σ_t w(o, i, t)² + 1e-8)` (the inner sums are taken once at load).
//!   Noise, bias, leaky ReLU, gain and clamp are the convolution's epilogue (`bias_act`).
//! - **Up-sampling layers** run the stride-2 transposed convolution as its four phases, each
//!   an ordinary convolution with the taps it uses, written straight to every other pixel of
//!   the full-size output; the FIR filter of `conv2d_resample` then runs over it with the
//!   epilogue.
//! - **toRGB** is a 1×1 convolution with the style folded in (no demodulation). The RGB image
//!   (3 channels) is summed and up-sampled with the candle ops, as is the 'resnet' shortcut
//!   (rare networks; both are a small part of a frame).
//!
//! Only inference: projection needs gradients and keeps the candle ops (see
//! [`StyleGan2::synthesize_from`]).

use std::sync::Mutex;

use candle_core::Tensor;

use super::{Block, LRELU_SLOPE, Noise, SynthesisLayer, ToRgb, phase, upsample2d};
use crate::error::{Error, Result};
use crate::nn::{
    self, ConvGeom, Epilogue, FeatureMap, KernelPath, PackedWeights, WinogradScratch, WinogradTile,
    WinogradWeights, with_values,
};

/// Per layer: `Σ_t w(o, i, t)²`, `(out, in)` row-major, for the demodulation.
fn squared_sums(weight: &Tensor) -> Result<Vec<f32>> {
    let (o, i, kh, kw) = weight.dims4()?;
    let taps = kh * kw;
    with_values(&weight.contiguous()?, |w| {
        (0..o * i)
            .map(|oi| w[oi * taps..(oi + 1) * taps].iter().map(|v| v * v).sum())
            .collect()
    })
}

/// Buffers reused from frame to frame.
pub(super) struct Scratch {
    x: FeatureMap,
    y: FeatureMap,
    full: FeatureMap,
    rgb: FeatureMap,
    /// toRGB's weights with the style folded in (3 × in: repacked per sample, cheaply).
    packed: PackedWeights,
    winograd: WinogradScratch,
    scale: Vec<f32>,
    demod: Vec<f32>,
    noise: Vec<f32>,
    taps: Vec<usize>,
}

impl Scratch {
    /// The output becomes the next layer's input.
    fn swap(&mut self) {
        std::mem::swap(&mut self.x, &mut self.y);
    }

    fn new(path: KernelPath) -> Self {
        Self {
            x: FeatureMap::default(),
            y: FeatureMap::default(),
            full: FeatureMap::default(),
            rgb: FeatureMap::default(),
            packed: PackedWeights::new(path),
            winograd: WinogradScratch::default(),
            scale: Vec::new(),
            demod: Vec::new(),
            noise: Vec::new(),
            taps: Vec::new(),
        }
    }
}

/// One phase of an up-sampling layer's transposed convolution: the `(ky, kx)` taps of the
/// stored (flipped) kernel it uses, packed.
struct UpPhase {
    q: (usize, usize),
    taps: Vec<(usize, usize)>,
    packed: PackedWeights,
}

/// A synthesis layer's weights, packed once (the style and demodulation are applied to the
/// activations per sample, not to the weights), and `Σ_t w(o, i, t)²` for the demodulation.
struct Prepared {
    kind: PreparedKind,
    squared: Vec<f32>,
}

enum PreparedKind {
    /// A 3×3 stride-1 layer, Winograd-transformed.
    Conv(WinogradWeights),
    /// An up-sampling layer: its four phases.
    Up(Vec<UpPhase>),
}

/// The native state of a generator: the kernel path, the packed weights of every synthesis
/// layer (in the order of [`super::StyleGan2::noise_buffers`]) and the buffers.
pub(super) struct Native {
    path: KernelPath,
    layers: Vec<Prepared>,
    scratch: Mutex<Scratch>,
}

/// The Winograd tile of the 3×3 layers: F(4×4, 3×3), 4× fewer multiplications than direct.
const TILE: WinogradTile = WinogradTile::F4;

impl Native {
    /// Packs every synthesis layer of `blocks` for `path`.
    pub(super) fn new(path: KernelPath, blocks: &[Block]) -> Result<Self> {
        let mut layers = Vec::new();
        for b in blocks {
            if let Some(conv0) = &b.conv0 {
                layers.push(Prepared {
                    kind: prepare_up(path, conv0)?,
                    squared: squared_sums(&conv0.weight)?,
                });
            }
            layers.push(Prepared {
                kind: prepare_conv(path, &b.conv1)?,
                squared: squared_sums(&b.conv1.weight)?,
            });
        }
        Ok(Self {
            path,
            layers,
            scratch: Mutex::new(Scratch::new(path)),
        })
    }

    pub(super) fn path(&self) -> KernelPath {
        self.path
    }
}

fn prepare_conv(path: KernelPath, layer: &SynthesisLayer) -> Result<PreparedKind> {
    let (out_ch, in_ch, k, kw) = layer.weight.dims4()?;
    if (k, kw) != (3, 3) {
        return Err(Error::InvalidParameter(format!(
            "the native kernels take 3×3 synthesis layers, not {k}×{kw}"
        )));
    }
    let w = with_values(&layer.weight.contiguous()?, <[f32]>::to_vec)?;
    Ok(PreparedKind::Conv(WinogradWeights::new(
        PackedWeights::new(path),
        TILE,
        out_ch,
        in_ch,
        |o, i, ky, kx| w[((o * in_ch + i) * 3 + ky) * 3 + kx],
    )?))
}

fn prepare_up(path: KernelPath, layer: &SynthesisLayer) -> Result<PreparedKind> {
    let (out_ch, in_ch, k, _) = layer.weight.dims4()?;
    let w = with_values(&layer.weight.contiguous()?, <[f32]>::to_vec)?;
    let mut phases = Vec::with_capacity(4);
    for qy in 0..2 {
        // The taps of a phase do not depend on the map size (only its length does).
        let py = phase(qy, k, 1);
        for qx in 0..2 {
            let px = phase(qx, k, 1);
            let taps: Vec<(usize, usize)> = py
                .taps
                .iter()
                .flat_map(|&jy| px.taps.iter().map(move |&jx| (jy, jx)))
                .collect();
            let mut packed = PackedWeights::new(path);
            packed.pack(out_ch, in_ch, taps.len(), |o, i, t| {
                let (ky, kx) = taps[t];
                w[((o * in_ch + i) * k + ky) * k + kx]
            })?;
            phases.push(UpPhase {
                q: (qy, qx),
                taps,
                packed,
            });
        }
    }
    Ok(PreparedKind::Up(phases))
}

/// The style of a layer, `affine(w) · gain`, into `out`.
fn styles(layer_affine: &super::Fc, w: &Tensor, gain: f64, out: &mut Vec<f32>) -> Result<()> {
    let s = (layer_affine.forward(w)? * gain)?.flatten_all()?;
    out.clear();
    with_values(&s, |v| out.extend_from_slice(v))
}

/// The noise of a layer (already × strength) into `out`; `false` when it has none.
fn layer_noise(noise: &mut Noise<'_>, layer: &SynthesisLayer, out: &mut Vec<f32>) -> Result<bool> {
    match noise.layer(layer)? {
        Some(n) => {
            let n = n.flatten_all()?.contiguous()?;
            out.clear();
            with_values(&n, |v| out.extend_from_slice(v))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `d_o = 1/sqrt(Σ_i s_i² · Σ_t w(o, i, t)² + 1e-8)`.
fn demodulation(
    layer: &SynthesisLayer,
    squared: &[f32],
    s: &[f32],
    out: &mut Vec<f32>,
) -> Result<()> {
    let (out_ch, in_ch, _, _) = layer.weight.dims4()?;
    if squared.len() != out_ch * in_ch {
        return Err(Error::InvalidParameter(
            "a layer packed for another shape".into(),
        ));
    }
    out.clear();
    out.extend((0..out_ch).map(|o| {
        let row = &squared[o * in_ch..(o + 1) * in_ch];
        let sum: f64 = row
            .iter()
            .zip(s)
            .map(|(&w2, &si)| f64::from(w2) * f64::from(si) * f64::from(si))
            .sum();
        (1.0 / (sum + 1e-8).sqrt()) as f32
    }));
    Ok(())
}

/// The epilogue of a synthesis layer: `lrelu(x·demod + noise + bias) · √2·gain`, clamped to
/// `±clamp·gain`.
fn layer_epilogue<'a>(
    layer: &'a SynthesisLayer,
    demod: &'a [f32],
    noise: Option<&'a [f32]>,
    gain: f64,
    clamp: Option<f64>,
) -> Epilogue<'a> {
    Epilogue {
        scale: Some(demod),
        noise,
        bias: Some(&layer.bias_values),
        slope: Some(LRELU_SLOPE as f32),
        gain: (std::f64::consts::SQRT_2 * gain) as f32,
        clamp: clamp.map(|c| (c * gain) as f32),
    }
}

impl Scratch {
    /// A 3×3 modulated convolution (`conv1`) from `x` into `y`: the style scales the input
    /// in the Winograd input transform, the demodulation the output in the epilogue.
    fn conv(
        &mut self,
        prepared: &Prepared,
        layer: &SynthesisLayer,
        w: &Tensor,
        noise: &mut Noise<'_>,
        gain: f64,
        clamp: Option<f64>,
    ) -> Result<()> {
        let PreparedKind::Conv(weights) = &prepared.kind else {
            return Err(Error::InvalidParameter(
                "a layer packed for another shape".into(),
            ));
        };
        styles(&layer.affine, w, 1.0, &mut self.scale)?;
        demodulation(layer, &prepared.squared, &self.scale, &mut self.demod)?;
        let has_noise = layer_noise(noise, layer, &mut self.noise)?;
        self.y.reset_border(self.x.h, self.x.w, weights.cout(), 1)?;
        let epi = layer_epilogue(
            layer,
            &self.demod,
            has_noise.then_some(&self.noise[..]),
            gain,
            clamp,
        );
        nn::winograd_conv3x3(
            weights,
            &self.x,
            Some(&self.scale),
            &mut self.y,
            &mut self.winograd,
            &epi,
        )
    }

    /// The up-sampling `conv0`: the style scales `x` in place (nothing reads it afterwards),
    /// the transposed convolution's four phases write `full`, then the FIR filter and the
    /// epilogue (with the demodulation: the filter is linear) write `y`.
    fn conv_up(
        &mut self,
        prepared: &Prepared,
        layer: &SynthesisLayer,
        w: &Tensor,
        noise: &mut Noise<'_>,
        clamp: Option<f64>,
    ) -> Result<()> {
        let PreparedKind::Up(phases) = &prepared.kind else {
            return Err(Error::InvalidParameter(
                "a layer packed for another shape".into(),
            ));
        };
        let filter = layer.up_filter.as_ref().ok_or_else(|| {
            Error::InvalidParameter("an up-sampling layer without its filter".into())
        })?;
        styles(&layer.affine, w, 1.0, &mut self.scale)?;
        demodulation(layer, &prepared.squared, &self.scale, &mut self.demod)?;
        let k = layer.kernel;
        let (n, cin) = (self.x.h, self.x.c);
        if self.scale.len() != cin {
            return Err(Error::InvalidParameter("a style for another width".into()));
        }
        for px in self.x.data.chunks_exact_mut(cin) {
            for (v, &s) in px.iter_mut().zip(&self.scale) {
                *v *= s;
            }
        }
        let cout = layer.weight.dims4()?.0;
        let full_n = 2 * n + k - 2;
        // The four phases write every interior pixel.
        self.full.reset_border(full_n, full_n, cout, 1)?;
        let row = self.x.row_stride();
        for ph in phases {
            let (qy, qx) = ph.q;
            let (py, px) = (phase(qy, k, n), phase(qx, k, n));
            // Input index of output t for tap j: t + (q + j − k + 1)/2, plus the border.
            let at = |q: usize, j: usize| -> Result<usize> {
                let off = (q as isize + j as isize - k as isize + 1) / 2 + self.x.pad as isize;
                usize::try_from(off).map_err(|_| {
                    Error::InvalidParameter("a transposed convolution reads before its map".into())
                })
            };
            self.taps.clear();
            for &(jy, jx) in &ph.taps {
                self.taps.push(at(qy, jy)? * row + at(qx, jx)? * cin);
            }
            let geom = ConvGeom {
                taps: &self.taps,
                batch: 1,
                in_batch: 0,
                out_batch: 0,
                out_h: py.len,
                out_w: px.len,
                in_base: 0,
                in_row: row,
                in_pix: cin,
                out_base: self.full.at(qy, qx),
                out_row: 2 * self.full.row_stride(),
                out_pix: 2 * cout,
            };
            nn::conv(
                &ph.packed,
                &self.x.data,
                &geom,
                &mut self.full.data,
                &Epilogue::NONE,
            )?;
        }
        // conv2d_resample's padding of the full output, as in `modulated_up2`.
        let (p, fw, fh) = (
            (k / 2) as isize,
            filter.width() as isize,
            filter.height() as isize,
        );
        let (k_i, up) = (k as isize, 2isize);
        let (pad_x, pad_y) = (
            p + (fw + up - 1) / 2 - (k_i - 1),
            p + (fh + up - 1) / 2 - (k_i - 1),
        );
        let border = self.full.pad as isize;
        if !(0..=border).contains(&pad_x) || !(0..=border).contains(&pad_y) {
            return Err(Error::InvalidParameter(format!(
                "a {fh}×{fw} resample filter is not supported by the native kernels"
            )));
        }
        let out = 2 * n;
        let has_noise = layer_noise(noise, layer, &mut self.noise)?;
        self.y.reset(out, out, cout, 1)?;
        let frow = self.full.row_stride();
        let in_base = ((border - pad_y) as usize) * frow + ((border - pad_x) as usize) * cout;
        let epi = layer_epilogue(
            layer,
            &self.demod,
            has_noise.then_some(&self.noise[..]),
            1.0,
            clamp,
        );
        let (out_base, out_row) = (self.y.at(0, 0), self.y.row_stride());
        nn::fir(
            &self.full.data,
            in_base,
            frow,
            cout,
            &filter.values,
            filter.height(),
            filter.width(),
            out,
            out,
            &mut self.y.data,
            out_base,
            out_row,
            cout,
            &epi,
        )
    }

    /// toRGB of `x` into `rgb` (`r × r × img_channels`, no border).
    fn torgb(&mut self, torgb: &ToRgb, w: &Tensor, clamp: Option<f64>) -> Result<Tensor> {
        styles(&torgb.affine, w, torgb.weight_gain, &mut self.scale)?;
        let (img_ch, in_ch, _, _) = torgb.weight.dims4()?;
        let s = &self.scale;
        with_values(&torgb.weight, |wv| {
            self.packed
                .pack(img_ch, in_ch, 1, |o, i, _| wv[o * in_ch + i] * s[i])
        })??;
        let (h, w_) = (self.x.h, self.x.w);
        self.rgb.reset_border(h, w_, img_ch, 0)?;
        self.taps.clear();
        self.taps.push(0);
        let geom = ConvGeom {
            taps: &self.taps,
            batch: 1,
            in_batch: 0,
            out_batch: 0,
            out_h: h,
            out_w: w_,
            in_base: self.x.at(0, 0),
            in_row: self.x.row_stride(),
            in_pix: in_ch,
            out_base: 0,
            out_row: w_ * img_ch,
            out_pix: img_ch,
        };
        let epi = Epilogue {
            scale: None,
            noise: None,
            bias: Some(&torgb.bias_values),
            slope: None,
            gain: 1.0,
            clamp: clamp.map(|c| c as f32),
        };
        nn::conv(&self.packed, &self.x.data, &geom, &mut self.rgb.data, &epi)?;
        self.rgb.to_nchw(&candle_core::Device::Cpu)
    }
}

/// One sample on the native kernels: `ws` `(num_ws, w_dim)`; the image `(1, c, H, W)` and the
/// captured layer, as [`StyleGan2::synthesize_one`].
pub(super) fn synthesize_one(
    gan: &super::StyleGan2,
    native: &Native,
    ws: &Tensor,
    noise: &mut Noise<'_>,
    layer: Option<&str>,
) -> Result<(Tensor, Option<Tensor>)> {
    let clamp = gan.info.conv_clamp;
    let device = &gan.device;
    // A panic in an earlier frame leaves only buffers behind: reuse them.
    let mut guard = native
        .scratch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let scratch = &mut *guard;
    let mut prepared = native.layers.iter();
    let mut next = || {
        prepared
            .next()
            .ok_or_else(|| Error::InvalidParameter("more layers than were packed".into()))
    };
    let mut captured = None;
    let w_row = |idx: usize| -> Result<Tensor> { Ok(ws.narrow(0, idx, 1)?) };
    let mut img: Option<Tensor> = None;
    let mut w_idx = 0;
    for (bi, b) in gan.blocks.iter().enumerate() {
        let r = b.resolution;
        let mut capture = |name: &str, map: &FeatureMap| -> Result<()> {
            if layer == Some(name) {
                captured = Some(map.to_nchw(device)?);
            }
            Ok(())
        };
        let mut wi = w_idx;
        match (&b.constant, bi) {
            (Some(c), _) => scratch.x.load_nchw(c, 1)?,
            (None, 0) => {
                return Err(Error::InvalidParameter(
                    "a synthesis block has no input".into(),
                ));
            }
            (None, _) => {}
        }
        let Block {
            conv0, conv1, skip, ..
        } = b;
        match conv0 {
            None => {
                scratch.conv(next()?, conv1, &w_row(wi)?, noise, 1.0, clamp)?;
                wi += 1;
                scratch.swap();
                capture(&format!("b{r}.conv1"), &scratch.x)?;
            }
            Some(conv0) => {
                let shortcut = match skip {
                    Some(s) => {
                        let y = s.forward(&scratch.x.to_nchw(device)?)?;
                        let mut map = FeatureMap::default();
                        map.load_nchw(&y, 1)?;
                        capture(&format!("b{r}.skip"), &map)?;
                        Some(map)
                    }
                    None => None,
                };
                scratch.conv_up(next()?, conv0, &w_row(wi)?, noise, clamp)?;
                wi += 1;
                scratch.swap();
                capture(&format!("b{r}.conv0"), &scratch.x)?;
                let gain = if shortcut.is_some() {
                    0.5f64.sqrt()
                } else {
                    1.0
                };
                scratch.conv(next()?, conv1, &w_row(wi)?, noise, gain, clamp)?;
                wi += 1;
                scratch.swap();
                capture(&format!("b{r}.conv1"), &scratch.x)?;
                if let Some(y) = shortcut {
                    if y.data.len() != scratch.x.data.len() {
                        return Err(Error::InvalidParameter(
                            "the resnet shortcut does not match its block".into(),
                        ));
                    }
                    for (d, s) in scratch.x.data.iter_mut().zip(&y.data) {
                        *d += s;
                    }
                }
            }
        }
        if let Some(prev) = img.take() {
            img = Some(upsample2d(&prev, &b.img_filter, 2)?);
        }
        if let Some(torgb) = &b.torgb {
            let y = scratch.torgb(torgb, &w_row(wi)?, clamp)?;
            if layer == Some(format!("b{r}.torgb").as_str()) {
                captured = Some(y.clone());
            }
            let sum = match img.take() {
                Some(prev) => (prev + y)?,
                None => y,
            };
            if layer == Some(format!("b{r}.img").as_str()) {
                captured = Some(sum.clone());
            }
            img = Some(sum);
        }
        w_idx += b.num_conv();
    }
    let img = img.ok_or_else(|| Error::InvalidParameter("the network has no toRGB".into()))?;
    Ok((img, captured))
}
