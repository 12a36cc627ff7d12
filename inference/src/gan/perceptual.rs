//! A VGG16 perceptual distance in the manner of LPIPS (Zhang et al., "The Unreasonable
//! Effectiveness of Deep Features as a Perceptual Metric", 2018), the loss NVIDIA's StyleGAN2
//! projector uses. Written from the paper's formula on candle ops that all have a backward
//! pass (conv2d, relu, max_pool2d, sqr, sqrt, div, sum, mean, matmul), so the projector can
//! differentiate through it.
//!
//! **Weights.** One safetensors file with torchvision's `vgg16` names,
//! `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` / `.bias` (the 13 3×3
//! convolutions; `classifier.*` is not needed and ignored), and optionally the LPIPS linear
//! layers with the `lpips` package's `vgg.pth` names, `lin{0..4}.model.1.weight`, shape
//! `(1, C_k, 1, 1)`, non-negative. `tools/convert_vgg16.py` makes such a file from
//! torchvision's `vgg16-397923af.pth` (and LPIPS's `vgg.pth`). The channel widths are read
//! from the tensor shapes, so any VGG16 with the same layer structure loads (the tests use a
//! narrow one). torchvision's `vgg16-397923af.pth` itself loads too, read by Studio's own pickle
//! reader as data, with LPIPS's layers from the `lpips` package's `vgg.pth` beside it.
//!
//! **Network.** Every convolution has padding 1 and a ReLU after it; the five blocks have 2, 2,
//! 3, 3 and 3 convolutions, with a 2×2 max-pool before blocks 2–5 (torchvision's indices 4, 9,
//! 16, 23; the pool at 30 is not needed). The features are taken after the last ReLU of each
//! block: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision's indices 3, 8, 15, 22, 29).
//!
//! **Distance.** Images are `(N, 3, H, W)` in [−1, 1]. Like NVIDIA's projector, a side larger
//! than [`MAX_SIDE`] (256) is first area-downsampled to 256 ([`area_resize`]: each output pixel
//! is the mean of the input pixels it covers, PyTorch's `interpolate(mode='area')`, i.e.
//! adaptive average pooling, which for an integer factor is plain average pooling). Then LPIPS's
//! scaling layer `(x − shift) / scale` with shift = (−0.030, −0.088, −0.188) and
//! scale = (0.458, 0.448, 0.450). With `f_k` the features at tap `k` and
//! `n̂ = f / (√(Σ_c f²) + 1e-10)` (unit length over channels at every position):
//!
//! ```text
//! d(a, b) = Σ_k mean_{h,w} Σ_c w_kc · (n̂_k(a) − n̂_k(b))²
//! ```
//!
//! with `w_k` the LPIPS linear layers, or `w = 1` (a plain sum over channels, the `lpips`
//! package's `lpips=False`) when the file has none. One deliberate difference: the channel
//! norm is computed as `√(Σ_c f² + 1e-20)`, so that its gradient stays finite where every
//! channel is zero after the ReLU (where `√` of exactly 0 would give ∞ · 0 = NaN); the value
//! differs from LPIPS's only where the norm itself is below ~1e-9.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Conv2d, Winograd};
use crate::weights::{self, Weights};

/// torchvision's indices of the 13 convolutions in `vgg16().features`.
pub const CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];

/// Convolutions per block (the features are taken after the last ReLU of each).
const CONVS_PER_BLOCK: [usize; 5] = [2, 2, 3, 3, 3];

/// LPIPS's `ScalingLayer` shift (per RGB channel), for images in [−1, 1].
pub const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
/// LPIPS's `ScalingLayer` scale (per RGB channel).
pub const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// Images with a side larger than this are area-downsampled to it first (NVIDIA's projector).
pub const MAX_SIDE: usize = 256;

/// The smallest side the five blocks can take (four 2×2 pools leave 1×1).
pub const MIN_SIDE: usize = 16;

/// LPIPS's `normalize_tensor` epsilon.
const NORM_EPS: f64 = 1e-10;
/// Added under the square root of the channel norm so its gradient stays finite at 0.
const NORM_EPS_SQ: f64 = 1e-20;

/// The name of the LPIPS linear layer of tap `k` (the `lpips` package's `vgg.pth`).
pub fn lin_name(k: usize) -> String {
    format!("lin{k}.model.1.weight")
}

/// VGG16 features and the LPIPS distance (see the module docs).
pub struct Vgg16Lpips {
    path: PathBuf,
    /// Each convolution with its ReLU; on x86-64 on Studio's kernels, input gradient too.
    blocks: Vec<Vec<Conv2d>>,
    /// `(1, C_k, 1, 1)` per tap, when the file has LPIPS's linear layers.
    lins: Option<Vec<Tensor>>,
    widths: [usize; 5],
    /// `(1, 3, 1, 1)` each.
    shift: Tensor,
    scale: Tensor,
}

impl std::fmt::Debug for Vgg16Lpips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vgg16Lpips")
            .field("path", &self.path)
            .field("widths", &self.widths)
            .field("lpips_weights", &self.lins.is_some())
            .finish_non_exhaustive()
    }
}

/// A target image's normalized features, computed once ([`Vgg16Lpips::target`]) and compared
/// with many images ([`Vgg16Lpips::distance_to`]). Detached from any autograd graph.
#[derive(Debug, Clone)]
pub struct LpipsTarget {
    features: Vec<Tensor>,
}

impl LpipsTarget {
    /// The unit-normalized features at the five taps, `(N, C_k, H_k, W_k)`.
    pub fn features(&self) -> &[Tensor] {
        &self.features
    }
}

fn shape_error(path: &Path, name: &str, expected: Vec<usize>, found: &[usize]) -> Error {
    Error::ShapeMismatch {
        path: path.to_path_buf(),
        name: name.to_owned(),
        expected,
        found: found.to_vec(),
    }
}

/// Checks the convolutions' names and shapes in the header; returns `(out, in)` per
/// convolution in order.
fn plan(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<Vec<(usize, usize)>> {
    let missing = |name: &str| Error::MissingTensor {
        path: path.to_path_buf(),
        name: name.to_owned(),
    };
    let mut in_ch = 3;
    let mut plan = Vec::with_capacity(CONV_INDICES.len());
    for index in CONV_INDICES {
        let name = format!("features.{index}.weight");
        let found = shapes.get(&name).ok_or_else(|| missing(&name))?;
        let out = found.first().copied().unwrap_or(0);
        let expected = vec![out.max(1), in_ch, 3, 3];
        if out == 0 || found.as_slice() != expected.as_slice() {
            return Err(shape_error(path, &name, expected, found));
        }
        let bias = format!("features.{index}.bias");
        let found = shapes.get(&bias).ok_or_else(|| missing(&bias))?;
        if found.as_slice() != [out] {
            return Err(shape_error(path, &bias, vec![out], found));
        }
        plan.push((out, in_ch));
        in_ch = out;
    }
    Ok(plan)
}

/// Area (adaptive average) resampling of `(N, C, H, W)` to `(N, C, out_h, out_w)`: output
/// pixel `i` of a side of length `n` is the mean of input pixels `⌊i·n/m⌋ .. ⌈(i+1)·n/m⌉`,
/// as PyTorch's `interpolate(mode='area')`. An integer factor is a plain average pool; other
/// sizes are two matrix products (differentiable either way).
pub fn area_resize(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        return Err(Error::InvalidParameter(
            "area resize to an empty image".into(),
        ));
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if h % out_h == 0 && w % out_w == 0 && h / out_h == w / out_w {
        return Ok(x.avg_pool2d(h / out_h)?);
    }
    let matrix = |n: usize, m: usize| -> Result<Tensor> {
        let mut a = vec![0f32; m * n];
        for i in 0..m {
            let start = i * n / m;
            let end = ((i + 1) * n).div_ceil(m);
            let weight = 1.0 / (end - start) as f32;
            for j in start..end {
                a[i * n + j] = weight;
            }
        }
        Ok(Tensor::from_vec(a, (m, n), x.device())?.to_dtype(x.dtype())?)
    };
    let rows = matrix(h, out_h)?; // (out_h, h)
    let cols = matrix(w, out_w)?.t()?.contiguous()?; // (w, out_w)
    let x = x.broadcast_matmul(&cols)?; // (N, C, h, out_w)
    Ok(rows.broadcast_matmul(&x)?) // (N, C, out_h, out_w)
}

/// `f / (√(Σ_c f² + 1e-20) + 1e-10)`: unit length over channels (dimension 1).
pub fn normalize_channels(f: &Tensor) -> Result<Tensor> {
    let norm = (f.sqr()?.sum_keepdim(1)? + NORM_EPS_SQ)?.sqrt()?;
    Ok(f.broadcast_div(&(norm + NORM_EPS)?)?)
}

impl Vgg16Lpips {
    /// Loads VGG16 (and, when present, LPIPS's linear layers) from a safetensors file with
    /// torchvision's / `lpips`' names (see the module docs).
    ///
    /// torchvision's `vgg16-397923af.pth` (a pickle) is read by Studio's own reader, as data;
    /// when the file has no LPIPS layers, the `lpips` package's `vgg.pth` beside it (or an
    /// `lpips*.pth`) gives them, read the same way. A missing tensor is an
    /// [`Error::MissingTensor`] and a mis-shaped one an [`Error::ShapeMismatch`], naming it;
    /// some but not all five linear layers is a missing tensor too, and a linear layer with a
    /// negative weight is an [`Error::CorruptWeights`] naming it.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            return Err(Error::InvalidParameter(format!(
                "{} is a folder: choose the VGG16 .safetensors file (made by \
                 tools/convert_vgg16.py)",
                path.display()
            )));
        }
        let checkpoint = weights::open_checkpoint(&[path.to_path_buf()])?;
        let shapes: BTreeMap<String, Vec<usize>> = checkpoint
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let plan = plan(path, &shapes)?;

        let w = Weights::from_tensors(path.to_path_buf(), checkpoint, device, DType::F32);
        let mut blocks = Vec::with_capacity(CONVS_PER_BLOCK.len());
        let mut widths = [0; 5];
        let mut next = 0;
        for (b, &count) in CONVS_PER_BLOCK.iter().enumerate() {
            let mut block = Vec::with_capacity(count);
            for _ in 0..count {
                let index = CONV_INDICES[next];
                let (out, in_ch) = plan[next];
                let weight = w.get(&format!("features.{index}.weight"), &[out, in_ch, 3, 3])?;
                let bias = w.get(&format!("features.{index}.bias"), &[out])?;
                let cfg = candle_nn::Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                block.push(Conv2d::relu_with_gradient(
                    candle_nn::Conv2d::new(weight, Some(bias), cfg),
                    // Winograd F(4×4) on the first three blocks measured no faster (1.10 s
                    // against 1.13 s for a 256² forward and backward pass on 2 cores).
                    Winograd::NEVER,
                )?);
                widths[b] = out;
                next += 1;
            }
            blocks.push(block);
        }

        let present = (0..5).any(|k| shapes.contains_key(&lin_name(k)));
        let beside = if present {
            None
        } else {
            lpips_beside(path, device)
        };
        let lin_source = beside.as_ref().unwrap_or(&w);
        let lins = if !present && beside.is_none() {
            None
        } else {
            let mut lins = Vec::with_capacity(5);
            for (k, &width) in widths.iter().enumerate() {
                let name = lin_name(k);
                let lin = lin_source.get(&name, &[1, width, 1, 1])?;
                let min = lin.flatten_all()?.min(0)?.to_scalar::<f32>()?;
                if min < 0.0 || min.is_nan() {
                    return Err(Error::CorruptWeights {
                        path: lin_source.path().to_path_buf(),
                        message: format!(
                            "`{name}` has a negative weight ({min}); LPIPS's linear layers \
                             are non-negative"
                        ),
                    });
                }
                lins.push(lin);
            }
            Some(lins)
        };
        let shift = Tensor::from_slice(&SHIFT, (1, 3, 1, 1), device)?;
        let scale = Tensor::from_slice(&SCALE, (1, 3, 1, 1), device)?;
        Ok(Self {
            path: path.to_path_buf(),
            blocks,
            lins,
            widths,
            shift,
            scale,
        })
    }

    /// The file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file had LPIPS's linear layers (otherwise every channel weighs 1).
    pub fn has_lpips_weights(&self) -> bool {
        self.lins.is_some()
    }

    /// The channel widths of the five blocks (torchvision's VGG16: 64, 128, 256, 512, 512).
    pub fn widths(&self) -> [usize; 5] {
        self.widths
    }

    /// The network's input for images `(N, 3, H, W)` in [−1, 1]: F32, sides above
    /// [`MAX_SIDE`] area-downsampled to it, then LPIPS's scaling layer.
    pub fn preprocess(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] < MIN_SIDE || dims[3] < MIN_SIDE {
            return Err(Error::InvalidParameter(format!(
                "the VGG16 perceptual loss takes RGB images (N, 3, H, W) with sides of at \
                 least {MIN_SIDE}; got {dims:?}"
            )));
        }
        let x = x.to_dtype(DType::F32)?;
        let (h, w) = (dims[2].min(MAX_SIDE), dims[3].min(MAX_SIDE));
        let x = area_resize(&x, h, w)?;
        Ok(x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?)
    }

    /// The raw features (after the ReLU) at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 for
    /// images `(N, 3, H, W)` in [−1, 1] (preprocessed as [`Self::preprocess`]).
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = self.preprocess(x)?;
        let mut taps = Vec::with_capacity(self.blocks.len());
        for (b, block) in self.blocks.iter().enumerate() {
            if b > 0 {
                h = h.max_pool2d(2)?;
            }
            for conv in block {
                h = conv.forward(&h)?;
            }
            taps.push(h.clone());
        }
        Ok(taps)
    }

    fn normalized(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.features(x)?.iter().map(normalize_channels).collect()
    }

    /// A target's normalized features, computed once for [`Self::distance_to`].
    pub fn target(&self, x: &Tensor) -> Result<LpipsTarget> {
        Ok(LpipsTarget {
            features: self
                .normalized(&x.detach())?
                .into_iter()
                .map(|f| f.detach())
                .collect(),
        })
    }

    /// The five per-tap terms `mean_{h,w} Σ_c w_kc (n̂_k(a) − n̂_k(b))²`, each `(N,)`.
    fn layers(&self, a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
        a.iter()
            .zip(b)
            .enumerate()
            .map(|(k, (fa, fb))| {
                let diff = fa.broadcast_sub(fb)?.sqr()?;
                let diff = match &self.lins {
                    Some(lins) => diff.broadcast_mul(&lins[k])?,
                    None => diff,
                };
                Ok(diff.sum(1)?.flatten_from(1)?.mean(D::Minus1)?)
            })
            .collect()
    }

    /// The LPIPS term of every tap for `x` against a precomputed target, each `(N,)` (a
    /// target of batch 1 is compared with every image of `x`).
    pub fn layer_distances_to(&self, target: &LpipsTarget, x: &Tensor) -> Result<Vec<Tensor>> {
        let fx = self.normalized(x)?;
        self.layers(&target.features, &fx)
    }

    /// The LPIPS distance of every image of `x` to a precomputed target, `(N,)`;
    /// differentiable with respect to `x`.
    pub fn distance_to(&self, target: &LpipsTarget, x: &Tensor) -> Result<Tensor> {
        sum(&self.layer_distances_to(target, x)?)
    }

    /// The LPIPS term of every tap, each `(N,)` (batches of the same size, or one of them 1).
    pub fn layer_distances(&self, a: &Tensor, b: &Tensor) -> Result<Vec<Tensor>> {
        let fa = self.normalized(a)?;
        let fb = self.normalized(b)?;
        self.layers(&fa, &fb)
    }

    /// The LPIPS distance between the images of `a` and `b`, one value per batch item,
    /// `(N,)`; differentiable with respect to both.
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        sum(&self.layer_distances(a, b)?)
    }
}

fn sum(terms: &[Tensor]) -> Result<Tensor> {
    let mut total = terms
        .first()
        .cloned()
        .ok_or_else(|| Error::InvalidParameter("no VGG16 features".into()))?;
    for t in &terms[1..] {
        total = (total + t)?;
    }
    Ok(total)
}

/// The files in `dir`, sorted, each with its name and extension in lower case.
fn files_in(dir: &Path) -> Option<Vec<(std::path::PathBuf, String, String)>> {
    let lower = |s: Option<&std::ffi::OsStr>| {
        s.map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .map(|p| {
            let (name, ext) = (lower(p.file_name()), lower(p.extension()));
            (p, name, ext)
        })
        .collect();
    files.sort();
    Some(files)
}

/// The `lpips` package's linear layers beside a VGG16 file that has none: its `vgg.pth`, or
/// an `lpips*.pth`, when it holds `lin0.model.1.weight` (read as data, like every pickle).
fn lpips_beside(vgg16: &Path, device: &Device) -> Option<Weights> {
    files_in(vgg16.parent()?)?
        .into_iter()
        .filter(|(p, name, ext)| {
            p != vgg16 && ext == "pth" && (name == "vgg.pth" || name.starts_with("lpips"))
        })
        .find_map(|(p, _, _)| {
            Weights::open(std::slice::from_ref(&p), device, DType::F32)
                .ok()
                .filter(|w| w.contains(&lin_name(0)))
        })
}

/// The first `vgg16*.safetensors` or `lpips*.safetensors` file (by name, case-insensitive),
/// else torchvision's `vgg16*.pth`, in the first of `dirs` that has one: where Studio looks
/// for the perceptual loss's weights.
#[must_use]
pub fn find_weights(dirs: &[std::path::PathBuf]) -> Option<std::path::PathBuf> {
    dirs.iter().find_map(|dir| {
        let files = files_in(dir)?;
        // Safetensors (which may carry LPIPS's layers) before a torchvision pickle.
        let safetensors = files.iter().find(|(_, name, ext)| {
            ext == "safetensors" && (name.starts_with("vgg16") || name.starts_with("lpips"))
        });
        let pickle = files
            .iter()
            .find(|(_, name, ext)| ext == "pth" && name.starts_with("vgg16"));
        safetensors.or(pickle).map(|(p, _, _)| p.clone())
    })
}
