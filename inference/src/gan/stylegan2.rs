//! NVIDIA's StyleGAN2 generator, from the tensors of its `G_ema` state dict.
//!
//! The math follows NVIDIA's PyTorch code (`training/networks.py` of stylegan2-ada-pytorch,
//! `training/networks_stylegan2.py` of stylegan3), written here from the equations:
//!
//! - **Mapping**: `z` and (for class-conditioned networks) the embedded label `c` are each
//!   normalized by their second moment (`x / sqrt(mean(x²) + 1e-8)`) and concatenated; then
//!   `mapping.fc{i}` layers with equalized learning rate (weight × `lr_multiplier / sqrt(in)`,
//!   bias × `lr_multiplier`, `lr_multiplier` 0.01 unless the JSON says otherwise) and leaky
//!   ReLU (slope 0.2) × √2. The embedding `mapping.embed` is a plain linear layer with gain
//!   `1/sqrt(c_dim)`. The result is broadcast to `num_ws` rows; truncation moves the first
//!   `cutoff` rows towards `mapping.w_avg`: `w_avg + ψ (w − w_avg)`.
//! - **Synthesis**: a learned 4×4 constant, then per resolution a block of two modulated 3×3
//!   convolutions (`conv0` up-samples ×2, absent in the 4×4 block). Styles are
//!   `affine(w)` (gain `1/sqrt(w_dim)`, bias initialised to 1); the weight is multiplied by
//!   the style per input channel and demodulated per output channel
//!   (`1/sqrt(Σ w² + 1e-8)`). Up-sampling is a stride-2 transposed convolution followed by
//!   the FIR `resample_filter` (gain 4), padded exactly as NVIDIA's `conv2d_resample`. Noise
//!   (`noise_const`, seeded random, or none) times `noise_strength` is added, then the bias,
//!   leaky ReLU × √2 and the clamp to ±`conv_clamp`.
//! - **Output**: 'skip' networks (config F, the usual one) add every block's `torgb`
//!   (modulated 1×1 convolution without demodulation, style gain `1/sqrt(in)`, clamped) to
//!   the ×2 FIR-up-sampled image of the previous block; 'resnet' blocks add a 1×1
//!   up-sampling `skip` convolution to the main path (both scaled by √½) and only the last
//!   block has `torgb`; 'orig' networks likewise have only the last `torgb`.
//!
//! `num_ws` counts every convolution plus the last `torgb`; a block's `torgb` uses the `w` of
//! the next block's first convolution, as in NVIDIA's code.
//!
//! The architecture comes from the tensor names and shapes (resolution from the highest
//! `synthesis.b{res}`, channel counts from the weights, `z_dim`/`w_dim`/mapping depth from
//! `mapping.fc*`, `c_dim` from `mapping.embed.weight`), or from the init kwargs in a JSON file
//! next to the weights (`G.safetensors` → `G.json`, written by
//! `tools/convert_stylegan_pkl.py`); with the JSON, every tensor must match the shapes it
//! implies. Without it, `conv_clamp` is taken as 256 (NVIDIA's ADA configs) and the mapping
//! learning-rate multiplier as 0.01.
//!
//! Everything runs in f32 (NVIDIA's fp16 blocks are a training/speed choice; their outputs
//! agree with f32 within fp16 precision).

use std::collections::BTreeMap;
use std::f64::consts::SQRT_2;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{FirFilter, NumpyRandomState, pad2d, upfirdn2d, upsample2d};
use crate::error::{Error, Result};
use crate::quant::KernelPath;
use crate::weights::{self, Weights};

mod native;

const LRELU_SLOPE: f64 = 0.2;
const DEFAULT_CONV_CLAMP: f64 = 256.0;
const DEFAULT_MAPPING_LR: f64 = 0.01;
const SUPPORTED: &str = "StyleGAN2 generators (NVIDIA's network .pkl or its G_ema state dict \
     as safetensors, 'skip', 'resnet' or 'orig' architecture)";

/// How the synthesis network turns its last features into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Only the last block has `torgb`.
    Orig,
    /// Every block has `torgb`; images are summed while up-sampling (StyleGAN2 config F).
    Skip,
    /// Residual blocks (`skip` 1×1 convolutions); only the last block has `torgb`.
    Resnet,
}

impl Architecture {
    /// The name NVIDIA's `architecture` kwarg uses (`orig`, `skip` or `resnet`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Orig => "orig",
            Architecture::Skip => "skip",
            Architecture::Resnet => "resnet",
        }
    }
}

/// The per-layer noise inputs, as NVIDIA's `noise_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseMode {
    /// The network's stored `noise_const` buffers (reproducible; NVIDIA's default for
    /// generating images).
    #[default]
    Const,
    /// Fresh standard-normal noise from this seed (Studio's own seeded generator; NVIDIA's
    /// random mode uses torch's unseeded generator, so its images cannot be reproduced).
    Random {
        /// Seed of the noise generator (its 64 bits are folded into numpy's 32-bit seed).
        seed: u64,
    },
    /// No noise.
    None,
}

/// What a loaded StyleGAN2 is.
#[derive(Debug, Clone, PartialEq)]
pub struct GanInfo {
    /// Output resolution (square).
    pub resolution: usize,
    /// Channels of the output image (3 for RGB).
    pub img_channels: usize,
    /// Length of the input latent `z`.
    pub z_dim: usize,
    /// Length of one W row (the mapping network's output).
    pub w_dim: usize,
    /// Label dimensionality; 0 for unconditional networks.
    pub c_dim: usize,
    /// Rows of `ws` the synthesis network takes (one per convolution plus the last toRGB).
    pub num_ws: usize,
    /// Fully connected layers of the mapping network.
    pub mapping_layers: usize,
    /// Equalized learning-rate multiplier of the mapping layers (folded into their weights and
    /// biases; 0.01 unless the JSON says otherwise).
    pub mapping_lr_multiplier: f64,
    /// How the synthesis network makes its image.
    pub architecture: Architecture,
    /// Clamp of convolution outputs (`None` = no clamping).
    pub conv_clamp: Option<f64>,
    /// `(resolution, channels)` of every synthesis block, from 4×4 up.
    pub channels: Vec<(usize, usize)>,
    /// Whether the init kwargs came from the JSON next to the weights (or the network pickle).
    pub from_json: bool,
    /// Whether the network was read from one of NVIDIA's pickles (in safe mode: as data).
    pub from_pickle: bool,
}

/// Equalized-learning-rate fully connected layer with the gains folded into the weights.
struct Fc {
    /// `(in, out)`, already multiplied by the weight gain.
    weight_t: Tensor,
    /// `(1, out)`, already multiplied by the bias gain.
    bias: Tensor,
    lrelu: bool,
}

impl Fc {
    fn load(
        w: &Weights,
        prefix: &str,
        inp: usize,
        out: usize,
        lr_multiplier: f64,
        lrelu: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = w.get(&format!("{prefix}.bias"), &[out])?;
        let weight_gain = lr_multiplier / (inp as f64).sqrt();
        let weight_t = (weight * weight_gain)?.t()?.contiguous()?;
        let bias = if (lr_multiplier - 1.0).abs() > 0.0 {
            (bias * lr_multiplier)?
        } else {
            bias
        };
        Ok(Self {
            weight_t,
            bias: bias.reshape((1, out))?,
            lrelu,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight_t)?.broadcast_add(&self.bias)?;
        if self.lrelu {
            Ok((lrelu(&y)? * SQRT_2)?)
        } else {
            Ok(y)
        }
    }
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&(x * LRELU_SLOPE)?)?)
}

/// `normalize_2nd_moment` over dimension 1.
fn normalize_2nd_moment(x: &Tensor) -> Result<Tensor> {
    let m = x.sqr()?.mean_keepdim(1)?;
    Ok(x.broadcast_div(&(m + 1e-8)?.sqrt()?)?)
}

/// A modulated 3×3 convolution with noise, bias, activation and clamp (`SynthesisLayer`).
struct SynthesisLayer {
    affine: Fc,
    /// `(out, in, k, k)`; spatially flipped for the up-sampling layer (its transposed
    /// convolution is done as a correlation over the zero-stuffed input).
    weight: Tensor,
    kernel: usize,
    bias: Tensor,
    /// The bias as values, for the native epilogue.
    bias_values: Vec<f32>,
    noise_const: Tensor,
    noise_strength: f64,
    resolution: usize,
    /// The FIR filter (gain 4) of the up-sampling layer.
    up_filter: Option<FirFilter>,
}

impl SynthesisLayer {
    #[allow(clippy::too_many_arguments)]
    fn load(
        w: &Weights,
        prefix: &str,
        in_ch: usize,
        out_ch: usize,
        w_dim: usize,
        resolution: usize,
        up: bool,
        device: &Device,
    ) -> Result<Self> {
        let affine = Fc::load(w, &format!("{prefix}.affine"), w_dim, in_ch, 1.0, false)?;
        let weight = w.get(&format!("{prefix}.weight"), &[out_ch, in_ch, 3, 3])?;
        let weight = if up {
            weight.flip(&[2, 3])?.contiguous()?
        } else {
            weight
        };
        let bias = w
            .get(&format!("{prefix}.bias"), &[out_ch])?
            .reshape((1, out_ch, 1, 1))?;
        let noise_const = w
            .get(&format!("{prefix}.noise_const"), &[resolution, resolution])?
            .reshape((1, 1, resolution, resolution))?;
        let noise_strength = w
            .get(&format!("{prefix}.noise_strength"), &[])?
            .to_scalar::<f32>()?;
        let up_filter = if up {
            Some(FirFilter::new(
                &load_filter(w, &format!("{prefix}.resample_filter"), device)?,
                4.0,
            )?)
        } else {
            None
        };
        Ok(Self {
            affine,
            weight,
            kernel: 3,
            bias_values: bias.flatten_all()?.to_vec1::<f32>()?,
            bias,
            noise_const,
            noise_strength: f64::from(noise_strength),
            resolution,
            up_filter,
        })
    }

    /// `x`: `(1, in, h, w)`, `w`: `(1, w_dim)`.
    fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        noise: &mut Noise<'_>,
        gain: f64,
        conv_clamp: Option<f64>,
    ) -> Result<Tensor> {
        let styles = self.affine.forward(w)?; // (1, in)
        let (out_ch, in_ch, k, _) = self.weight.dims4()?;
        let weight = self
            .weight
            .broadcast_mul(&styles.reshape((1, in_ch, 1, 1))?)?;
        let dcoefs = (weight
            .reshape((out_ch, in_ch * k * k))?
            .sqr()?
            .sum_keepdim(1)?
            + 1e-8)?
            .sqrt()?
            .recip()?;
        let weight = weight.broadcast_mul(&dcoefs.reshape((out_ch, 1, 1, 1))?)?;
        let x = match &self.up_filter {
            None => x.conv2d(&weight, self.kernel / 2, 1, 1, 1)?,
            Some(filter) => modulated_up2(x, &weight, filter, self.kernel)?,
        };
        let x = match noise.layer(self)? {
            Some(n) => x.broadcast_add(&n)?,
            None => x,
        };
        let x = (lrelu(&x.broadcast_add(&self.bias)?)? * (SQRT_2 * gain))?;
        Ok(match conv_clamp {
            Some(c) => x.clamp(-c * gain, c * gain)?,
            None => x,
        })
    }
}

/// The stride-2 transposed convolution (weight already flipped) followed by the FIR filter,
/// padded as NVIDIA's `conv2d_resample(up=2, padding=k/2)`.
fn modulated_up2(x: &Tensor, weight: &Tensor, filter: &FirFilter, k: usize) -> Result<Tensor> {
    let up = 2usize;
    let full = transposed_conv_up2(x, weight, k)?;
    // conv2d_resample's padding, relative to the full transposed output.
    let (p, fw, fh, k_i, up_i) = (
        (k / 2) as isize,
        filter.width() as isize,
        filter.height() as isize,
        k as isize,
        up as isize,
    );
    let pad = [
        p + (fw + up_i - 1) / 2 - (k_i - 1),
        p + (fw - up_i) / 2 - (k_i - up_i),
        p + (fh + up_i - 1) / 2 - (k_i - 1),
        p + (fh - up_i) / 2 - (k_i - up_i),
    ];
    upfirdn2d(&full, filter, 1, pad)
}

/// One output phase of a stride-2 transposed convolution along one axis: which kernel taps
/// it uses (every other one), and the zero padding before/after the input that makes an
/// ordinary correlation with those taps produce exactly its outputs.
struct Phase {
    taps: Vec<usize>,
    pad_before: usize,
    pad_after: usize,
    /// Outputs of this phase.
    len: usize,
}

/// The full stride-2 transposed convolution along one axis of length `n` with a `k`-tap
/// (already flipped) kernel has `2n + k − 2` outputs; output `o = 2t + q` sums the taps `j`
/// with `q + j − k + 1` even, reading input `t + (q + j − k + 1)/2`.
fn phase(q: usize, k: usize, n: usize) -> Phase {
    let taps: Vec<usize> = (0..k)
        .filter(|j| (q + j + 1 + k).is_multiple_of(2))
        .collect();
    let offset = |j: usize| (q as isize + j as isize - k as isize + 1) / 2;
    let total = 2 * n + k - 2;
    let len = (total - q).div_ceil(2);
    let (lo, hi) = (offset(taps[0]), offset(taps[taps.len() - 1]));
    let pad_before = (-lo).max(0) as usize;
    let pad_after = (len as isize - 1 + hi - (n as isize - 1)).max(0) as usize;
    Phase {
        taps,
        pad_before,
        pad_after,
        len,
    }
}

/// Interleaves two phases along `dim` (`a` holds outputs 0, 2, 4…, `b` 1, 3, 5…) into `len`.
fn interleave(a: &Tensor, b: &Tensor, dim: usize, len: usize) -> Result<Tensor> {
    let la = a.dim(dim)?;
    let b = if b.dim(dim)? < la {
        b.pad_with_zeros(dim, 0, la - b.dim(dim)?)?
    } else {
        b.clone()
    };
    let mut shape = a.dims().to_vec();
    shape[dim] = 2 * la;
    let both = Tensor::stack(&[a, &b], dim + 1)?.reshape(shape)?;
    Ok(both.narrow(dim, 0, len)?)
}

/// A stride-2 transposed convolution (kernel already flipped, `(out, in, k, k)`) computed as
/// four ordinary convolutions of the input with every other tap, one per output phase, then
/// interleaved: the same result as correlating the zero-stuffed input, at a quarter of the
/// work.
fn transposed_conv_up2(x: &Tensor, weight: &Tensor, k: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows = Vec::with_capacity(2);
    for qy in 0..2 {
        let py = phase(qy, k, h);
        let mut cols = Vec::with_capacity(2);
        for qx in 0..2 {
            let px = phase(qx, k, w);
            let ty = Tensor::new(
                py.taps.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                weight.device(),
            )?;
            let tx = Tensor::new(
                px.taps.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                weight.device(),
            )?;
            let sub = weight.index_select(&ty, 2)?.index_select(&tx, 3)?;
            let padded = pad2d(
                x,
                [
                    px.pad_before as isize,
                    px.pad_after as isize,
                    py.pad_before as isize,
                    py.pad_after as isize,
                ],
            )?;
            let y = padded.conv2d(&sub.contiguous()?, 0, 1, 1, 1)?;
            debug_assert_eq!(y.dims()[2..], [py.len, px.len]);
            cols.push((y, px.len));
        }
        let total_w = 2 * w + k - 2;
        rows.push((interleave(&cols[0].0, &cols[1].0, 3, total_w)?, py.len));
    }
    let total_h = 2 * h + k - 2;
    interleave(&rows[0].0, &rows[1].0, 2, total_h)
}

/// Modulated 1×1 convolution without demodulation (`ToRGBLayer`).
struct ToRgb {
    affine: Fc,
    /// `(out, in, 1, 1)`.
    weight: Tensor,
    weight_gain: f64,
    bias: Tensor,
    /// The bias as values, for the native epilogue.
    bias_values: Vec<f32>,
}

impl ToRgb {
    fn load(w: &Weights, prefix: &str, in_ch: usize, img_ch: usize, w_dim: usize) -> Result<Self> {
        let bias = w.get(&format!("{prefix}.bias"), &[img_ch])?;
        Ok(Self {
            affine: Fc::load(w, &format!("{prefix}.affine"), w_dim, in_ch, 1.0, false)?,
            weight: w.get(&format!("{prefix}.weight"), &[img_ch, in_ch, 1, 1])?,
            weight_gain: 1.0 / (in_ch as f64).sqrt(),
            bias_values: bias.to_vec1::<f32>()?,
            bias: bias.reshape((1, img_ch, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor, w: &Tensor, conv_clamp: Option<f64>) -> Result<Tensor> {
        let styles = (self.affine.forward(w)? * self.weight_gain)?;
        let in_ch = styles.dim(1)?;
        let weight = self
            .weight
            .broadcast_mul(&styles.reshape((1, in_ch, 1, 1))?)?;
        let y = x.conv2d(&weight, 0, 1, 1, 1)?.broadcast_add(&self.bias)?;
        Ok(match conv_clamp {
            Some(c) => y.clamp(-c, c)?,
            None => y,
        })
    }
}

/// The 'resnet' shortcut: 1×1 convolution (no bias), FIR up-sampling ×2, gain √½.
struct Skip {
    weight: Tensor,
    filter: FirFilter,
}

impl Skip {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, 0, 1, 1, 1)?;
        Ok((upsample2d(&y, &self.filter, 2)? * 0.5f64.sqrt())?)
    }
}

struct Block {
    resolution: usize,
    out_ch: usize,
    /// `(1, out, 4, 4)` for the first block.
    constant: Option<Tensor>,
    conv0: Option<SynthesisLayer>,
    conv1: SynthesisLayer,
    torgb: Option<ToRgb>,
    skip: Option<Skip>,
    /// The block's own filter (gain 4) for up-sampling the skip image.
    img_filter: FirFilter,
}

impl Block {
    fn num_conv(&self) -> usize {
        1 + usize::from(self.conv0.is_some())
    }
}

/// Where the noise inputs come from during one synthesis pass.
/// Where [`StyleGan2::synthesize_from`] takes its noise.
#[derive(Clone, Copy)]
enum NoiseSource<'a> {
    Mode(NoiseMode),
    Buffers(&'a [Tensor]),
}

struct Noise<'a> {
    mode: NoiseMode,
    rng: Option<NumpyRandomState>,
    /// Caller-supplied unscaled buffers, one per synthesis layer in order (projection).
    buffers: Option<(&'a [Tensor], usize)>,
}

impl<'a> Noise<'a> {
    fn new(mode: NoiseMode) -> Self {
        let rng = match mode {
            // Fold the 64-bit seed into numpy's 32-bit seed space.
            NoiseMode::Random { seed } => {
                Some(NumpyRandomState::new((seed as u32) ^ ((seed >> 32) as u32)))
            }
            _ => None,
        };
        Self {
            mode,
            rng,
            buffers: None,
        }
    }

    fn with_buffers(buffers: &'a [Tensor]) -> Self {
        Self {
            mode: NoiseMode::None,
            rng: None,
            buffers: Some((buffers, 0)),
        }
    }

    /// The noise to add to this layer's output (already scaled by its strength).
    fn layer(&mut self, layer: &SynthesisLayer) -> Result<Option<Tensor>> {
        let s = layer.noise_strength;
        if let Some((buffers, next)) = self.buffers.as_mut() {
            let buf = buffers.get(*next).ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "{} noise buffers given but the network has more noise inputs",
                    buffers.len()
                ))
            })?;
            *next += 1;
            return Ok(Some((buf * s)?));
        }
        match (self.mode, self.rng.as_mut()) {
            (NoiseMode::Const, _) => Ok(Some((&layer.noise_const * s)?)),
            (NoiseMode::Random { .. }, Some(rng)) => {
                let r = layer.resolution;
                let v: Vec<f32> = rng.randn(r * r).into_iter().map(|x| x as f32).collect();
                let t = Tensor::from_vec(v, (1, 1, r, r), layer.noise_const.device())?;
                Ok(Some((t * s)?))
            }
            _ => Ok(None),
        }
    }
}

/// A loaded StyleGAN2 generator.
pub struct StyleGan2 {
    info: GanInfo,
    device: Device,
    embed: Option<Fc>,
    mapping: Vec<Fc>,
    /// `(1, 1, w_dim)`.
    w_avg: Tensor,
    blocks: Vec<Block>,
    /// Studio's own CPU kernels and their buffers; `None`: candle's ops (GPUs, aarch64).
    native: Option<native::Native>,
}

impl std::fmt::Debug for StyleGan2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StyleGan2")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The tensor names and shapes of a file, read from its header.
struct Shapes {
    path: PathBuf,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl Shapes {
    fn get(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_owned(),
            })
    }

    fn dim(&self, name: &str, rank: usize, index: usize) -> Result<usize> {
        let shape = self.get(name)?;
        if shape.len() != rank {
            let mut expected = vec![0; rank];
            expected[index] = shape.get(index).copied().unwrap_or(0);
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_owned(),
                expected,
                found: shape.to_vec(),
            });
        }
        Ok(shape[index])
    }

    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// The architecture before the weights are read.
struct Plan {
    info: GanInfo,
    embed_features: usize,
    layer_features: usize,
}

/// "StyleGAN3-R" (radial filters, 1×1 convolutions: `conv_kernel` 1) or "StyleGAN3-T", from
/// a network pickle's init kwargs; "StyleGAN3" when they do not say.
fn stylegan3_variant(settings: Option<&serde_json::Value>) -> &'static str {
    let kwargs = settings.and_then(|s| s.get("init_kwargs"));
    match kwargs
        .and_then(|k| synthesis_kwarg(k, "conv_kernel"))
        .and_then(serde_json::Value::as_u64)
    {
        Some(1) => "StyleGAN3-R",
        Some(_) => "StyleGAN3-T",
        None => "StyleGAN3",
    }
}

fn json_usize(v: &serde_json::Value, key: &str) -> Option<usize> {
    v.get(key)
        .and_then(serde_json::Value::as_u64)
        .map(|x| x as usize)
}

/// The init kwargs next to `path` (`G.safetensors` → `G.json`), if any: either
/// `{"init_kwargs": {…}}` as the converter writes it, or the kwargs themselves.
fn read_init_kwargs(path: &Path) -> Result<Option<serde_json::Value>> {
    let json_path = path.with_extension("json");
    let text = match std::fs::read_to_string(&json_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(json_path, e)),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: json_path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some(value.get("init_kwargs").cloned().unwrap_or(value)))
}

/// A synthesis kwarg: under `synthesis_kwargs` (stylegan2-ada-pytorch) or at the top level
/// (stylegan3's `networks_stylegan2.Generator`).
fn synthesis_kwarg<'a>(kwargs: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    kwargs
        .get("synthesis_kwargs")
        .and_then(|s| s.get(key))
        .or_else(|| kwargs.get(key))
}

fn bad_config(path: &Path, message: String) -> Error {
    Error::BadConfig {
        path: path.with_extension("json"),
        message,
    }
}

fn plan(shapes: &Shapes, kwargs: Option<&serde_json::Value>) -> Result<Plan> {
    let path = &shapes.path;
    // Block resolutions from the names.
    let mut resolutions: Vec<usize> = shapes
        .shapes
        .keys()
        .filter_map(|n| n.strip_prefix("synthesis.b"))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    resolutions.sort_unstable();
    resolutions.dedup();
    let inferred_resolution = resolutions.last().copied().unwrap_or(0);
    let resolution = match kwargs.and_then(|k| json_usize(k, "img_resolution")) {
        Some(r) => r,
        None => inferred_resolution,
    };
    if resolution == 0 {
        return Err(Error::MissingTensor {
            path: path.clone(),
            name: "synthesis.b4.const".into(),
        });
    }
    if !resolution.is_power_of_two() || resolution < 4 {
        return Err(bad_config(
            path,
            format!("img_resolution {resolution} is not a power of two ≥ 4"),
        ));
    }
    let block_res: Vec<usize> = (2..=resolution.trailing_zeros()).map(|l| 1 << l).collect();

    // Mapping network.
    let mut mapping_layers = 0;
    while shapes.contains(&format!("mapping.fc{mapping_layers}.weight")) {
        mapping_layers += 1;
    }
    if let Some(n) = kwargs
        .and_then(|k| k.get("mapping_kwargs"))
        .and_then(|m| json_usize(m, "num_layers"))
    {
        mapping_layers = n;
    }
    if mapping_layers == 0 {
        return Err(Error::MissingTensor {
            path: path.clone(),
            name: "mapping.fc0.weight".into(),
        });
    }
    let last_fc = format!("mapping.fc{}.weight", mapping_layers - 1);
    let w_dim = match kwargs.and_then(|k| json_usize(k, "w_dim")) {
        Some(w) => w,
        None => shapes.dim(&last_fc, 2, 0)?,
    };
    let c_dim = match kwargs.and_then(|k| json_usize(k, "c_dim")) {
        Some(c) => c,
        None if shapes.contains("mapping.embed.weight") => {
            shapes.dim("mapping.embed.weight", 2, 1)?
        }
        None => 0,
    };
    let embed_features = if c_dim == 0 {
        0
    } else {
        match kwargs
            .and_then(|k| k.get("mapping_kwargs"))
            .and_then(|m| json_usize(m, "embed_features"))
        {
            Some(e) => e,
            None if kwargs.is_some() => w_dim,
            None => shapes.dim("mapping.embed.weight", 2, 0)?,
        }
    };
    let layer_features = match kwargs
        .and_then(|k| k.get("mapping_kwargs"))
        .and_then(|m| json_usize(m, "layer_features"))
    {
        Some(f) => f,
        None if kwargs.is_some() || mapping_layers == 1 => w_dim,
        None => shapes.dim("mapping.fc0.weight", 2, 0)?,
    };
    let z_dim = match kwargs.and_then(|k| json_usize(k, "z_dim")) {
        Some(z) => z,
        None => shapes
            .dim("mapping.fc0.weight", 2, 1)?
            .saturating_sub(embed_features),
    };
    let mapping_lr_multiplier = kwargs
        .and_then(|k| k.get("mapping_kwargs"))
        .and_then(|m| m.get("lr_multiplier"))
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(DEFAULT_MAPPING_LR);

    // Synthesis channels: from channel_base / channel_max when the JSON has them, otherwise
    // from the weights.
    let channel_base = kwargs
        .and_then(|k| synthesis_kwarg(k, "channel_base"))
        .and_then(serde_json::Value::as_u64);
    let channel_max = kwargs
        .and_then(|k| synthesis_kwarg(k, "channel_max"))
        .and_then(serde_json::Value::as_u64);
    let mut channels = Vec::with_capacity(block_res.len());
    for &res in &block_res {
        let ch = match (channel_base, channel_max) {
            (Some(base), Some(max)) => (base as usize / res).min(max as usize),
            (Some(base), None) => (base as usize / res).min(512),
            _ if res == 4 => shapes.dim("synthesis.b4.const", 3, 0)?,
            _ => shapes.dim(&format!("synthesis.b{res}.conv1.weight"), 4, 0)?,
        };
        channels.push((res, ch));
    }
    let img_channels = match kwargs.and_then(|k| json_usize(k, "img_channels")) {
        Some(c) => c,
        None => shapes.dim(&format!("synthesis.b{resolution}.torgb.weight"), 4, 0)?,
    };
    let architecture = match kwargs
        .and_then(|k| synthesis_kwarg(k, "architecture"))
        .and_then(serde_json::Value::as_str)
    {
        Some("skip") => Architecture::Skip,
        Some("resnet") => Architecture::Resnet,
        Some("orig") => Architecture::Orig,
        Some(other) => {
            return Err(bad_config(
                path,
                format!("unknown synthesis architecture `{other}`"),
            ));
        }
        None if resolution == 4 => Architecture::Skip,
        None if shapes.contains("synthesis.b8.skip.weight") => Architecture::Resnet,
        None if shapes.contains("synthesis.b4.torgb.weight") => Architecture::Skip,
        None => Architecture::Orig,
    };
    let conv_clamp = match kwargs.and_then(|k| synthesis_kwarg(k, "conv_clamp")) {
        Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| {
            bad_config(path, format!("conv_clamp should be a number, found {v}"))
        })?),
        // stylegan3's networks_stylegan2 defaults to 256 when the kwarg is absent.
        None if kwargs.is_some() => Some(DEFAULT_CONV_CLAMP),
        None => Some(DEFAULT_CONV_CLAMP),
    };
    let num_ws = 2 * block_res.len();
    Ok(Plan {
        info: GanInfo {
            resolution,
            img_channels,
            z_dim,
            w_dim,
            c_dim,
            num_ws,
            mapping_layers,
            mapping_lr_multiplier,
            architecture,
            conv_clamp,
            channels,
            from_json: kwargs.is_some(),
            from_pickle: false,
        },
        embed_features,
        layer_features,
    })
}

fn load_filter(w: &Weights, name: &str, device: &Device) -> Result<Tensor> {
    if !w.contains(name) {
        return FirFilter::default_taps(device);
    }
    // Any stored filter is accepted (2-D, or 1-D taps); NVIDIA's default is 4×4.
    let shape = [4usize, 4];
    match w.get(name, &shape) {
        Ok(t) => Ok(t),
        Err(Error::ShapeMismatch { found, .. }) if found.len() <= 2 => w.get(name, &found),
        Err(e) => Err(e),
    }
}

impl StyleGan2 {
    /// Loads a StyleGAN2 generator: a safetensors file with NVIDIA's `G_ema` tensor names
    /// (and the init kwargs from the JSON next to it, when present), or one of NVIDIA's network
    /// pickles (`.pkl`), whose `G_ema` and init kwargs Studio's own reader takes out as data
    /// (the code the pickle carries is never run).
    ///
    /// A StyleGAN3 (alias-free, `stylegan3-t` / `-r`) generator is refused by name with
    /// [`Error::UnsupportedArchitecture`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            return Err(Error::NoModel(path.to_path_buf()));
        }
        let checkpoint = weights::open_checkpoint(&[path.to_path_buf()])?;
        let shapes = Shapes {
            path: path.to_path_buf(),
            shapes: checkpoint
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect(),
        };
        let settings = checkpoint.settings();
        if shapes.contains("synthesis.input.affine.weight")
            || shapes.shapes.keys().any(|n| n.starts_with("synthesis.L0_"))
            || settings.is_some_and(|s| s.get("stylegan3").is_some())
        {
            return Err(Error::UnsupportedArchitecture(
                format!("{} (alias-free) generator", stylegan3_variant(settings)),
                SUPPORTED.into(),
            ));
        }
        if !shapes.contains("synthesis.b4.const") && !shapes.contains("mapping.fc0.weight") {
            return Err(Error::UnsupportedArchitecture(
                "unknown (no `synthesis.b4.const` or `mapping.fc0.weight`: not a StyleGAN2 \
                 G_ema state dict)"
                    .into(),
                SUPPORTED.into(),
            ));
        }
        let kwargs = match settings {
            Some(s) => Some(s.get("init_kwargs").cloned().unwrap_or_else(|| s.clone())),
            None => read_init_kwargs(path)?,
        };
        let mut plan = plan(&shapes, kwargs.as_ref())?;
        plan.info.from_pickle = checkpoint.is_pickle();
        let w = Weights::from_tensors(path.to_path_buf(), checkpoint, device, DType::F32);
        Self::build(&w, plan, device)
    }

    fn build(w: &Weights, plan: Plan, device: &Device) -> Result<Self> {
        let info = plan.info;
        let embed = if info.c_dim > 0 {
            Some(Fc::load(
                w,
                "mapping.embed",
                info.c_dim,
                plan.embed_features,
                1.0,
                false,
            )?)
        } else {
            None
        };
        let mut mapping = Vec::with_capacity(info.mapping_layers);
        for i in 0..info.mapping_layers {
            let inp = if i == 0 {
                info.z_dim + plan.embed_features
            } else {
                plan.layer_features
            };
            let out = if i + 1 == info.mapping_layers {
                info.w_dim
            } else {
                plan.layer_features
            };
            mapping.push(Fc::load(
                w,
                &format!("mapping.fc{i}"),
                inp,
                out,
                info.mapping_lr_multiplier,
                true,
            )?);
        }
        let w_avg = w
            .get("mapping.w_avg", &[info.w_dim])?
            .reshape((1, 1, info.w_dim))?;

        let mut blocks = Vec::with_capacity(info.channels.len());
        let mut prev_ch = 0;
        for (i, &(res, ch)) in info.channels.iter().enumerate() {
            let p = format!("synthesis.b{res}");
            let is_last = i + 1 == info.channels.len();
            let constant = if i == 0 {
                Some(
                    w.get(&format!("{p}.const"), &[ch, res, res])?
                        .unsqueeze(0)?,
                )
            } else {
                None
            };
            let conv0 = if i == 0 {
                None
            } else {
                Some(SynthesisLayer::load(
                    w,
                    &format!("{p}.conv0"),
                    prev_ch,
                    ch,
                    info.w_dim,
                    res,
                    true,
                    device,
                )?)
            };
            let conv1 = SynthesisLayer::load(
                w,
                &format!("{p}.conv1"),
                ch,
                ch,
                info.w_dim,
                res,
                false,
                device,
            )?;
            let torgb = if is_last || info.architecture == Architecture::Skip {
                Some(ToRgb::load(
                    w,
                    &format!("{p}.torgb"),
                    ch,
                    info.img_channels,
                    info.w_dim,
                )?)
            } else {
                None
            };
            let skip = if i > 0 && info.architecture == Architecture::Resnet {
                let weight = w.get(&format!("{p}.skip.weight"), &[ch, prev_ch, 1, 1])?;
                Some(Skip {
                    weight: (weight * (1.0 / (prev_ch as f64).sqrt()))?,
                    filter: FirFilter::new(
                        &load_filter(w, &format!("{p}.skip.resample_filter"), device)?,
                        4.0,
                    )?,
                })
            } else {
                None
            };
            let img_filter = FirFilter::new(
                &load_filter(w, &format!("{p}.resample_filter"), device)?,
                4.0,
            )?;
            blocks.push(Block {
                resolution: res,
                out_ch: ch,
                constant,
                conv0,
                conv1,
                torgb,
                skip,
                img_filter,
            });
            prev_ch = ch;
        }
        let mut gan = Self {
            info,
            device: device.clone(),
            embed,
            mapping,
            w_avg,
            blocks,
            native: None,
        };
        if device.is_cpu() && cfg!(target_arch = "x86_64") {
            gan.set_cpu_kernels(Some(KernelPath::detect()))?;
        }
        Ok(gan)
    }

    /// Which CPU kernels synthesis runs on: Studio's own for `path` (the default on x86-64
    /// CPUs, with the fastest path), or candle's ops (`None`; GPUs and aarch64 always use
    /// them). Projection always uses candle's ops, which carry gradients.
    pub fn set_cpu_kernels(&mut self, path: Option<KernelPath>) -> Result<()> {
        self.native = match path {
            None => None,
            Some(p) if !self.device.is_cpu() => {
                return Err(Error::InvalidParameter(format!(
                    "the {p} kernels run on the CPU; this generator is on a GPU"
                )));
            }
            Some(p) if !p.available() => {
                return Err(Error::InvalidParameter(format!(
                    "this CPU cannot run the {p} kernels"
                )));
            }
            Some(p) => Some(native::Native::new(p, &self.blocks)?),
        };
        Ok(())
    }

    /// The CPU kernels synthesis runs on (`None`: candle's ops).
    pub fn cpu_kernels(&self) -> Option<KernelPath> {
        self.native.as_ref().map(native::Native::path)
    }

    /// What the network is: its sizes, architecture and where they came from.
    pub fn info(&self) -> &GanInfo {
        &self.info
    }

    /// The device the weights are on, where the network runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `mapping.w_avg` as `(1, num_ws, w_dim)`: the latent truncation pulls towards.
    pub fn w_avg(&self) -> Result<Tensor> {
        Ok(self.w_avg.repeat((1, self.info.num_ws, 1))?)
    }

    /// The latent NVIDIA's tools use for `seed`: `np.random.RandomState(seed).randn(1, z_dim)`
    /// (numpy's legacy MT19937 and polar Box–Muller, reproduced bit for bit in f64, then f32),
    /// shaped `(1, z_dim)`. numpy refuses seeds above 2³²−1, and so does this.
    pub fn z_from_seed(&self, seed: u64) -> Result<Tensor> {
        let seed = u32::try_from(seed).map_err(|_| {
            Error::InvalidParameter(format!(
                "seed {seed} is too large: StyleGAN seeds are 0 to {} (numpy's RandomState)",
                u32::MAX
            ))
        })?;
        let z: Vec<f32> = NumpyRandomState::new(seed)
            .randn(self.info.z_dim)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Ok(Tensor::from_vec(z, (1, self.info.z_dim), &self.device)?)
    }

    /// A one-hot label `(1, c_dim)` for class `class` of a conditional network.
    pub fn class_label(&self, class: usize) -> Result<Tensor> {
        if class >= self.info.c_dim {
            return Err(Error::InvalidParameter(format!(
                "class {class} does not exist: this network has {} classes",
                self.info.c_dim
            )));
        }
        let mut v = vec![0f32; self.info.c_dim];
        v[class] = 1.0;
        Ok(Tensor::from_vec(v, (1, self.info.c_dim), &self.device)?)
    }

    /// The mapping network: `z` `(n, z_dim)` and, for conditional networks, the label `c`
    /// `(n, c_dim)` (`None` = all zeros) to `ws` `(n, num_ws, w_dim)`, truncated towards
    /// `w_avg` by `psi` in the first `cutoff` rows (`None` = all rows).
    pub fn map(
        &self,
        z: &Tensor,
        c: Option<&Tensor>,
        psi: f64,
        cutoff: Option<usize>,
    ) -> Result<Tensor> {
        let z = z.to_dtype(DType::F32)?.to_device(&self.device)?;
        let (n, z_dim) = z.dims2()?;
        if z_dim != self.info.z_dim {
            return Err(Error::InvalidParameter(format!(
                "z has {z_dim} values but this network takes {}",
                self.info.z_dim
            )));
        }
        let mut x = if z_dim > 0 {
            Some(normalize_2nd_moment(&z)?)
        } else {
            None
        };
        if let Some(embed) = &self.embed {
            let c = match c {
                Some(c) => c.to_dtype(DType::F32)?.to_device(&self.device)?,
                None => Tensor::zeros((n, self.info.c_dim), DType::F32, &self.device)?,
            };
            if c.dims2()? != (n, self.info.c_dim) {
                return Err(Error::InvalidParameter(format!(
                    "the label has shape {:?} but this network takes ({n}, {})",
                    c.dims(),
                    self.info.c_dim
                )));
            }
            let y = normalize_2nd_moment(&embed.forward(&c)?)?;
            x = Some(match x {
                Some(x) => Tensor::cat(&[&x, &y], 1)?,
                None => y,
            });
        }
        let mut x = x.ok_or_else(|| {
            Error::InvalidParameter("the network has neither z nor c inputs".into())
        })?;
        for layer in &self.mapping {
            x = layer.forward(&x)?;
        }
        let ws = x.unsqueeze(1)?.repeat((1, self.info.num_ws, 1))?;
        self.truncate(&ws, psi, cutoff)
    }

    /// Truncation on ready `ws`: `w_avg + psi (ws − w_avg)` in the first `cutoff` rows.
    pub fn truncate(&self, ws: &Tensor, psi: f64, cutoff: Option<usize>) -> Result<Tensor> {
        if (psi - 1.0).abs() == 0.0 {
            return Ok(ws.clone());
        }
        let num_ws = ws.dim(1)?;
        let cut = cutoff.unwrap_or(num_ws).min(num_ws);
        let lerp = |t: &Tensor| -> Result<Tensor> {
            Ok(self
                .w_avg
                .broadcast_add(&(t.broadcast_sub(&self.w_avg)? * psi)?)?)
        };
        if cut == num_ws {
            return lerp(ws);
        }
        if cut == 0 {
            return Ok(ws.clone());
        }
        let head = lerp(&ws.narrow(1, 0, cut)?)?;
        Ok(Tensor::cat(&[&head, &ws.narrow(1, cut, num_ws - cut)?], 1)?)
    }

    /// The synthesis layers whose activations [`Self::synthesize_with_layer`] can return:
    /// `b4.conv1`, `b4.torgb`, `b8.conv0`, `b8.conv1`, `b8.torgb`, … (NVIDIA's module names
    /// under `synthesis.`), plus `b{res}.img`, the accumulated image after each block.
    pub fn layer_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for b in &self.blocks {
            let r = b.resolution;
            if b.conv0.is_some() {
                names.push(format!("b{r}.conv0"));
            }
            names.push(format!("b{r}.conv1"));
            if b.skip.is_some() {
                names.push(format!("b{r}.skip"));
            }
            if b.torgb.is_some() {
                names.push(format!("b{r}.torgb"));
                names.push(format!("b{r}.img"));
            }
        }
        names
    }

    /// The synthesis network: `ws` `(n, num_ws, w_dim)` to images `(n, img_channels, H, W)`.
    /// Values are the network's raw output, nominally in [−1, 1] (NVIDIA maps
    /// `x·127.5 + 128`, clamped, to 8-bit pixels).
    pub fn synthesize(&self, ws: &Tensor, noise: NoiseMode) -> Result<Tensor> {
        Ok(self.synthesize_with_layer(ws, noise, None)?.0)
    }

    /// [`Self::synthesize`], also returning the output of one layer (see
    /// [`Self::layer_names`]; a `synthesis.` prefix is accepted) as `(n, channels, h, w)`.
    /// An unknown name is an [`Error::InvalidParameter`] listing the valid ones.
    pub fn synthesize_with_layer(
        &self,
        ws: &Tensor,
        noise: NoiseMode,
        layer: Option<&str>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.synthesize_from(ws, NoiseSource::Mode(noise), layer)
    }

    /// [`Self::synthesize_with_layer`] with caller-supplied noise buffers (see
    /// [`Self::synthesize_with_noise`]): a projection's optimized noise.
    pub fn synthesize_with_noise_and_layer(
        &self,
        ws: &Tensor,
        buffers: &[Tensor],
        layer: Option<&str>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let expected = self.noise_buffers().len();
        if buffers.len() != expected {
            return Err(Error::InvalidParameter(format!(
                "{} noise buffers given but the network has {expected} noise inputs",
                buffers.len()
            )));
        }
        self.synthesize_from(ws, NoiseSource::Buffers(buffers), layer)
    }

    fn synthesize_from(
        &self,
        ws: &Tensor,
        source: NoiseSource<'_>,
        layer: Option<&str>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = layer.map(|l| l.strip_prefix("synthesis.").unwrap_or(l));
        if let Some(l) = layer
            && !self.layer_names().iter().any(|n| n == l)
        {
            return Err(Error::InvalidParameter(format!(
                "no synthesis layer `{l}`; this network has: {}",
                self.layer_names().join(", ")
            )));
        }
        let ws = ws.to_dtype(DType::F32)?.to_device(&self.device)?;
        let (n, num_ws, w_dim) = ws.dims3()?;
        if (num_ws, w_dim) != (self.info.num_ws, self.info.w_dim) {
            return Err(Error::InvalidParameter(format!(
                "ws has shape ({n}, {num_ws}, {w_dim}) but this network takes (n, {}, {})",
                self.info.num_ws, self.info.w_dim
            )));
        }
        // Inputs that carry gradients (a projection's) need candle's ops.
        let tracks_gradients = ws.track_op()
            || matches!(source, NoiseSource::Buffers(b) if b.iter().any(Tensor::track_op));
        let mut images = Vec::with_capacity(n);
        let mut captured = Vec::new();
        // Seeded random noise continues across the batch; given buffers repeat per sample.
        let mut shared = match source {
            NoiseSource::Mode(mode) => Some(Noise::new(mode)),
            NoiseSource::Buffers(_) => None,
        };
        for i in 0..n {
            let mut own;
            let noise = match (&mut shared, source) {
                (Some(noise), _) => noise,
                (None, NoiseSource::Buffers(b)) => {
                    own = Noise::with_buffers(b);
                    &mut own
                }
                (None, NoiseSource::Mode(mode)) => {
                    own = Noise::new(mode);
                    &mut own
                }
            };
            let ws_i = ws.get(i)?;
            let (img, cap) = match (&self.native, tracks_gradients) {
                (Some(native), false) => native::synthesize_one(self, native, &ws_i, noise, layer)?,
                _ => self.synthesize_one(&ws_i, noise, layer)?,
            };
            images.push(img);
            captured.extend(cap);
        }
        let image = Tensor::cat(&images, 0)?;
        let layer_out = if captured.is_empty() {
            None
        } else {
            Some(Tensor::cat(&captured, 0)?)
        };
        Ok((image, layer_out))
    }

    /// The stored `noise_const` buffers, one `(1, 1, r, r)` tensor per synthesis layer in the
    /// order [`Self::synthesize_with_noise`] takes them (unscaled; each layer multiplies its
    /// own `noise_strength`).
    pub fn noise_buffers(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for b in &self.blocks {
            if let Some(c) = &b.conv0 {
                out.push(c.noise_const.clone());
            }
            out.push(b.conv1.noise_const.clone());
        }
        out
    }

    /// [`Self::synthesize`] with caller-supplied noise buffers (shaped as
    /// [`Self::noise_buffers`]), which gradients can flow into (projection optimizes them).
    pub fn synthesize_with_noise(&self, ws: &Tensor, buffers: &[Tensor]) -> Result<Tensor> {
        Ok(self.synthesize_with_noise_and_layer(ws, buffers, None)?.0)
    }

    /// One sample: `ws` `(num_ws, w_dim)`.
    fn synthesize_one(
        &self,
        ws: &Tensor,
        noise: &mut Noise<'_>,
        layer: Option<&str>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let clamp = self.info.conv_clamp;
        let mut captured = None;
        let mut capture = |name: &str, t: &Tensor| {
            if layer == Some(name) {
                captured = Some(t.clone());
            }
        };
        let w_row = |idx: usize| -> Result<Tensor> { Ok(ws.narrow(0, idx, 1)?) };
        let mut x: Option<Tensor> = None;
        let mut img: Option<Tensor> = None;
        let mut w_idx = 0;
        for b in &self.blocks {
            let r = b.resolution;
            let mut wi = w_idx;
            let mut h = match (&b.constant, x.take()) {
                (Some(c), _) => c.clone(),
                (None, Some(x)) => x,
                (None, None) => {
                    return Err(Error::InvalidParameter(
                        "a synthesis block has no input".into(),
                    ));
                }
            };
            match &b.conv0 {
                None => {
                    h = b.conv1.forward(&h, &w_row(wi)?, noise, 1.0, clamp)?;
                    wi += 1;
                    capture(&format!("b{r}.conv1"), &h);
                }
                Some(conv0) => {
                    let y = match &b.skip {
                        Some(s) => {
                            let y = s.forward(&h)?;
                            capture(&format!("b{r}.skip"), &y);
                            Some(y)
                        }
                        None => None,
                    };
                    h = conv0.forward(&h, &w_row(wi)?, noise, 1.0, clamp)?;
                    wi += 1;
                    capture(&format!("b{r}.conv0"), &h);
                    let gain = if y.is_some() { 0.5f64.sqrt() } else { 1.0 };
                    h = b.conv1.forward(&h, &w_row(wi)?, noise, gain, clamp)?;
                    wi += 1;
                    capture(&format!("b{r}.conv1"), &h);
                    if let Some(y) = y {
                        h = (y + h)?;
                    }
                }
            }
            if let Some(prev) = img.take() {
                img = Some(upsample2d(&prev, &b.img_filter, 2)?);
            }
            if let Some(torgb) = &b.torgb {
                let y = torgb.forward(&h, &w_row(wi)?, clamp)?;
                capture(&format!("b{r}.torgb"), &y);
                let sum = match img.take() {
                    Some(prev) => (prev + y)?,
                    None => y,
                };
                capture(&format!("b{r}.img"), &sum);
                img = Some(sum);
            }
            debug_assert_eq!(h.dim(1).ok(), Some(b.out_ch));
            w_idx += b.num_conv();
            x = Some(h);
        }
        let img = img.ok_or_else(|| Error::InvalidParameter("the network has no toRGB".into()))?;
        Ok((img, captured))
    }
}
