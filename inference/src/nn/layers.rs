//! Candle-facing layers on Studio's CPU kernels: a drop-in for `candle_nn::Conv2d` in the
//! diffusion models (UNet, VAE, TAESD) and VGG16 (with its input gradient, for the projection's
//! perceptual loss).
//!
//! On an x86-64 CPU the weights are packed once at load for the micro-kernels and candle's
//! copy is dropped (the same memory, not twice); a forward pass lays the NCHW input out
//! channels-last with the convolution's zero border, convolves, and hands back NCHW. On other
//! devices and CPUs, and for dtypes the kernels do not take, candle's own convolution runs
//! (logged once).
//!
//! Which kernels a layer gets is decided when it is built: [`default_kernels`] (the fastest
//! path on an x86-64 CPU, none elsewhere), or what [`with_kernels`] sets for the calling
//! thread (tests build the same model on every path).

use std::cell::Cell;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::{
    ChannelAffine, ConvGeom, Epilogue, FeatureMap, GroupNorm, KernelPath, PackedWeights, Storage,
    WinogradScratch, WinogradTile, WinogradWeights, rows_product, winograd_conv3x3, with_values,
};
use crate::error::{Error, Result};

/// A per-thread choice of kernels, set while [`with_kernels`] runs.
#[derive(Clone, Copy)]
enum Choice {
    Default,
    Chosen(Option<KernelPath>),
}

thread_local! {
    static OVERRIDE: Cell<Choice> = const { Cell::new(Choice::Default) };
    static STORAGE: Cell<Storage> = const { Cell::new(Storage::F32) };
}

/// The kernels layers built now on `device` get: Studio's own on an x86-64 CPU (the fastest
/// path, or the one `STUDIO_CPU_PATH` forces), candle's (`None`) elsewhere; or what
/// [`with_kernels`] chose for this thread.
pub fn default_kernels(device: &Device) -> Option<KernelPath> {
    if !device.is_cpu() {
        return None;
    }
    if let Choice::Chosen(choice) = OVERRIDE.with(Cell::get) {
        return choice;
    }
    cfg!(target_arch = "x86_64").then(KernelPath::detect)
}

/// Runs `build` with the layers it builds on the CPU using `kernels` (`None`: candle's ops).
pub fn with_kernels<R>(kernels: Option<KernelPath>, build: impl FnOnce() -> R) -> R {
    let before = OVERRIDE.with(|o| o.replace(Choice::Chosen(kernels)));
    let out = build();
    OVERRIDE.with(|o| o.set(before));
    out
}

/// Runs `build` with the native layers it builds storing their weights as `storage`: a model
/// loader passes its checkpoint's (see [`crate::weights::stored_storage`]), so half-precision
/// weights keep their size in memory.
pub fn with_weight_storage<R>(storage: Storage, build: impl FnOnce() -> R) -> R {
    let before = STORAGE.with(|s| s.replace(storage));
    let out = build();
    STORAGE.with(|s| s.set(before));
    out
}

/// Buffers lent to forward passes and taken back, so a steady state reuses the same memory
/// (fresh multi-megabyte buffers cost a page fault per 4 KiB: a fifth of a VAE decode).
pub(super) type Pool<T> = std::sync::Mutex<Vec<T>>;
pub(super) static MAPS: Pool<FeatureMap> = std::sync::Mutex::new(Vec::new());
static SCRATCH: Pool<WinogradScratch> = std::sync::Mutex::new(Vec::new());
/// The largest channels-last map a same-size convolution builds at once; larger inputs go
/// band by band ([`Native::band_rows`]).
const BAND_BYTES: usize = 16 << 20;
/// Buffers a pool keeps at most (two maps per forward pass in flight).
const POOL_SIZE: usize = 4;

/// A buffer from a pool, returned to it on drop.
pub(super) struct Pooled<T: Default + 'static> {
    item: T,
    pool: &'static Pool<T>,
}

impl<T: Default + 'static> Pooled<T> {
    pub(super) fn take(pool: &'static Pool<T>) -> Self {
        let item = pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        Self { item, pool }
    }
}

impl<T: Default + 'static> Drop for Pooled<T> {
    fn drop(&mut self) {
        let mut pool = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < POOL_SIZE {
            pool.push(std::mem::take(&mut self.item));
        }
    }
}

impl<T: Default + 'static> std::ops::Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}

impl<T: Default + 'static> std::ops::DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.item
    }
}

/// The packed weights of a layer: for the direct convolution, or Winograd-transformed.
#[derive(Debug, Clone)]
enum Weights {
    Direct(PackedWeights),
    Winograd(WinogradWeights),
}

/// Which 3×3, stride-1, pad-1 layers run as Winograd convolutions, by the size of their
/// weights (`cout × cin`). The transformed weights replace the packed ones and take
/// `n²/9` times their memory (F(2×2): 1.78×, F(4×4): 4×), so a model applies it where a
/// layer's work per weight is large: the high-resolution levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Winograd {
    /// F(4×4, 3×3) up to this many `cout × cin` pairs.
    pub f4_up_to: usize,
    /// F(2×2, 3×3) up to this many (above `f4_up_to`).
    pub f2_up_to: usize,
}

impl Winograd {
    /// Every layer convolves directly.
    pub const NEVER: Self = Self {
        f4_up_to: 0,
        f2_up_to: 0,
    };

    fn tile(self, cout: usize, cin: usize) -> Option<WinogradTile> {
        let pairs = cout * cin;
        if pairs <= self.f4_up_to {
            Some(WinogradTile::F4)
        } else if pairs <= self.f2_up_to {
            Some(WinogradTile::F2)
        } else {
            None
        }
    }
}

/// The native half of a [`Conv2d`].
#[derive(Debug, Clone)]
struct Native {
    weights: Weights,
    cin: usize,
    cout: usize,
    bias: Option<Vec<f32>>,
    kernel: (usize, usize),
    stride: usize,
    /// Zero rows and columns added: `[top, bottom, left, right]`.
    padding: [usize; 4],
    /// ReLU fused into the epilogue.
    relu: bool,
}

impl Native {
    fn new(
        path: KernelPath,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: [usize; 4],
        winograd: Winograd,
    ) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if stride == 0 {
            return Err(Error::InvalidParameter(
                "a convolution with stride 0".into(),
            ));
        }
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let winograd_shape = (kh, kw, stride, padding) == (3, 3, 1, [1; 4]);
        let storage = STORAGE.with(Cell::get);
        let weights = if let Some(tile) = winograd.tile(cout, cin).filter(|_| winograd_shape) {
            // Transformed weights of half-precision layers: F(2×2)'s transforms (entries ±1,
            // ½) barely amplify a rounding, so f16 (more mantissa than bf16) keeps them;
            // F(4×4)'s amplify it some 30× (1% errors in f16), so they stay f32.
            let transformed = match (tile, storage) {
                (WinogradTile::F2, Storage::F16 | Storage::Bf16) => Storage::F16,
                _ => Storage::F32,
            };
            Weights::Winograd(WinogradWeights::new(
                PackedWeights::with_storage(path, transformed),
                tile,
                cout,
                cin,
                |o, i, y, x| values[((o * cin + i) * 3 + y) * 3 + x],
            )?)
        } else {
            let mut packed = PackedWeights::with_storage(path, storage);
            packed.pack(cout, cin, kh * kw, |o, i, t| {
                values[(o * cin + i) * kh * kw + t]
            })?;
            Weights::Direct(packed)
        };
        let bias = match bias {
            Some(b) => Some(b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            weights,
            cin,
            cout,
            bias,
            kernel: (kh, kw),
            stride,
            padding,
            relu: false,
        })
    }

    /// The layer that computes this one's input gradient (without the ReLU's mask): the
    /// convolution with the weights transposed and flipped, `w'(i, o, y, x) =
    /// w(o, i, k−1−y, k−1−x)`, padded by `k − 1 − p`. Only for stride 1 and a padding that
    /// keeps the size (`2p = k − 1`), where that is again a same-size convolution.
    fn input_gradient(
        &self,
        path: KernelPath,
        weight: &Tensor,
        winograd: Winograd,
    ) -> Result<Option<Self>> {
        let (kh, kw) = self.kernel;
        let [top, bottom, left, right] = self.padding;
        if self.stride != 1 || kh != kw || [top, bottom, left] != [right; 3] || 2 * top + 1 != kh {
            return Ok(None);
        }
        let (cout, cin) = (self.cout, self.cin);
        let w = weight
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let k2 = kh * kw;
        let mut flipped = vec![0f32; w.len()];
        for o in 0..cout {
            for i in 0..cin {
                for t in 0..k2 {
                    flipped[(i * cout + o) * k2 + (k2 - 1 - t)] = w[(o * cin + i) * k2 + t];
                }
            }
        }
        let flipped = Tensor::from_vec(flipped, (cin, cout, kh, kw), weight.device())?;
        let pad = kh - 1 - top;
        Self::new(path, &flipped, None, 1, [pad; 4], winograd).map(Some)
    }
}

/// A [`Conv2d`] on Studio's kernels as a candle op whose input gradient runs on them too:
/// for networks a loss is backpropagated through (the VGG16 of the perceptual loss).
struct Differentiable {
    forward: Arc<Native>,
    /// The input-gradient layer ([`Native::input_gradient`]).
    backward: Arc<Native>,
}

impl candle_core::CustomOp1 for Differentiable {
    fn name(&self) -> &'static str {
        "studio-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("the native convolution needs a contiguous input".into())
        })?;
        let values = &storage.as_slice::<f32>()?[a..b];
        let (out, oh, ow) = self
            .forward
            .run_banded(values, [n, c, h, w], BAND_BYTES, None)
            .map_err(candle_core::Error::wrap)?;
        Ok((
            candle_core::CpuStorage::F32(out),
            (n, self.forward.cout, oh, ow).into(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // ReLU passes the gradient where its output is positive.
        let grad = if self.forward.relu {
            (grad_res * res.gt(0f32)?.to_dtype(DType::F32)?)?
        } else {
            grad_res.clone()
        };
        let grad = self
            .backward
            .forward(&grad.detach())
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(grad))
    }
}

/// A 2-D convolution (candle_nn's configuration: square padding and stride, no dilation or
/// groups on the native path).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Candle's layer, kept only where it runs (not on the native path).
    candle: Option<candle_nn::Conv2d>,
    native: Option<Arc<Native>>,
    /// The layer for the input gradient, where gradients flow through the native path.
    gradient: Option<Arc<Native>>,
    /// Followed by ReLU (fused on the native path).
    relu: bool,
}

impl Conv2d {
    /// Wraps a loaded candle layer, packing it for [`default_kernels`] of its device.
    pub fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        Self::with_winograd(inner, Winograd::NEVER)
    }

    /// [`Self::new`], as a Winograd convolution where `winograd` says so.
    pub fn with_winograd(inner: candle_nn::Conv2d, winograd: Winograd) -> Result<Self> {
        let Some(path) = default_kernels(inner.weight().device()) else {
            return Ok(Self {
                candle: Some(inner),
                native: None,
                gradient: None,
                relu: false,
            });
        };
        let cfg = inner.config();
        let w = inner.weight();
        if cfg.groups != 1 || cfg.dilation != 1 || w.dtype() != DType::F32 || cfg.stride == 0 {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                log::info!(
                    "a {:?} convolution (groups {}, dilation {}) runs on candle's kernels",
                    w.dtype(),
                    cfg.groups,
                    cfg.dilation
                );
            });
            return Ok(Self {
                candle: Some(inner),
                native: None,
                gradient: None,
                relu: false,
            });
        }
        let p = cfg.padding;
        let native = Native::new(path, w, inner.bias(), cfg.stride, [p, p, p, p], winograd)?;
        Ok(Self {
            candle: None,
            native: Some(Arc::new(native)),
            gradient: None,
            relu: false,
        })
    }

    /// A convolution followed by ReLU (fused on the native path) that gradients flow through:
    /// on the native path a same-size, stride-1 layer's input gradient runs on Studio's
    /// kernels too; other layers and devices run candle's ops with its autograd.
    pub fn relu_with_gradient(inner: candle_nn::Conv2d, winograd: Winograd) -> Result<Self> {
        let candle = inner.clone();
        let mut layer = Self::with_winograd(inner, winograd)?;
        layer.relu = true;
        let Some(native) = layer.native.take() else {
            return Ok(layer);
        };
        let mut native = Arc::unwrap_or_clone(native);
        native.relu = true;
        match native.input_gradient(native.path(), candle.weight(), winograd)? {
            Some(gradient) => {
                layer.native = Some(Arc::new(native));
                layer.gradient = Some(Arc::new(gradient));
            }
            // Candle's autograd needs candle's layer.
            None => layer.candle = Some(candle),
        }
        Ok(layer)
    }

    /// A convolution on Studio's kernels for [`default_kernels`] of the weight's device, from
    /// its weight `(out, in, kh, kw)`, bias, stride and padding `[top, bottom, left, right]`;
    /// `None` where those kernels do not run (another device or CPU, a dtype they do not take).
    pub fn native(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: [usize; 4],
        winograd: Winograd,
    ) -> Result<Option<Self>> {
        let Some(path) = default_kernels(weight.device()) else {
            return Ok(None);
        };
        if weight.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(Self {
            candle: None,
            native: Some(Arc::new(Native::new(
                path, weight, bias, stride, padding, winograd,
            )?)),
            gradient: None,
            relu: false,
        }))
    }

    /// The dtype of the weights (the native kernels take f32).
    pub fn dtype(&self) -> DType {
        self.candle
            .as_ref()
            .map_or(DType::F32, |c| c.weight().dtype())
    }

    /// The kernels this layer runs on (`None`: candle's).
    pub fn kernels(&self) -> Option<KernelPath> {
        self.native.as_ref().map(|n| n.path())
    }

    /// `self.forward(&norm.forward(x, silu))`, with the normalization (and SiLU) applied as
    /// the convolution loads its input on the native kernels, so the normalized maps never
    /// exist (at 512², one 268 MB map less at the VAE's peak, and a pass over memory less in
    /// every resnet). The plain sequence where either layer runs on candle's ops or `x` tracks
    /// gradients.
    pub fn forward_normalized(&self, x: &Tensor, norm: &GroupNorm, silu: bool) -> Result<Tensor> {
        if let Some(native) = self.native.as_ref().filter(|_| !x.track_op())
            && let Some(affine) = norm.affine(x, silu)?
        {
            return native.forward_affine(x, Some(&affine));
        }
        self.forward(&norm.forward(x, silu)?)
    }

    /// The convolution of `x` `(n, c, h, w)` (and its ReLU, if it has one): on the native
    /// kernels when the layer has them (a differentiable op where `x` tracks gradients and the
    /// layer keeps an input-gradient layer), else on candle's ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.native, &self.gradient, &self.candle) {
            (Some(native), Some(gradient), _) if x.track_op() => {
                let op = Differentiable {
                    forward: Arc::clone(native),
                    backward: Arc::clone(gradient),
                };
                Ok(x.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?)
            }
            (Some(native), _, _) => native.forward(x),
            (None, _, Some(c)) if self.relu => Ok(c.forward(x)?.relu()?),
            (None, _, Some(c)) => Ok(c.forward(x)?),
            (None, _, None) => Err(Error::InvalidParameter(
                "a convolution without weights".into(),
            )),
        }
    }
}

impl Native {
    fn path(&self) -> KernelPath {
        match &self.weights {
            Weights::Direct(p) => p.path(),
            Weights::Winograd(w) => w.path(),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_affine(x, None)
    }

    /// [`Self::forward`] with `affine` applied to the input as it is loaded.
    fn forward_affine(&self, x: &Tensor, affine: Option<&ChannelAffine>) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (result, oh, ow) =
            with_values(&x, |v| self.run_banded(v, [n, c, h, w], BAND_BYTES, affine))??;
        Ok(Tensor::from_vec(
            result,
            (n, self.cout, oh, ow),
            x.device(),
        )?)
    }

    /// Rows per band for an `h × w` input, where the layer keeps the size (stride 1, padding
    /// `k − 1` in all) and a whole channels-last map would pass [`BAND_BYTES`]; `None`: whole.
    fn band_rows(&self, h: usize, w: usize, band_bytes: usize) -> Option<usize> {
        let [top, bottom, ..] = self.padding;
        let widest = self.cin.max(self.cout) * 4;
        let same = self.stride == 1 && top + bottom + 1 == self.kernel.0;
        if !same || h.saturating_mul(w).saturating_mul(widest) <= band_bytes {
            return None;
        }
        // A multiple of Winograd's largest tile (4), at least one tile.
        let rows = (band_bytes / (w * widest)) / 4 * 4;
        Some(rows.max(4).min(h))
    }

    /// The convolution of `input`'s maps (their border as the padding) into `output`'s
    /// `oh × ow` interiors (a border of 0), with the bias and ReLU.
    fn convolve(
        &self,
        input: &FeatureMap,
        output: &mut FeatureMap,
        taps: &mut Vec<usize>,
        oh: usize,
        ow: usize,
    ) -> Result<()> {
        let (kh, kw) = self.kernel;
        let [top, _, left, _] = self.padding;
        let (p, s, cin, cout) = (input.pad, self.stride, self.cin, self.cout);
        let epi = Epilogue {
            bias: self.bias.as_deref(),
            slope: self.relu.then_some(0.0),
            ..Epilogue::NONE
        };
        let packed = match &self.weights {
            Weights::Direct(packed) => packed,
            Weights::Winograd(weights) => {
                let mut scratch = Pooled::take(&SCRATCH);
                return winograd_conv3x3(weights, input, None, output, &mut scratch, &epi);
            }
        };
        let row = input.row_stride();
        taps.clear();
        taps.extend((0..kh * kw).map(|t| (t / kw) * row + (t % kw) * cin));
        let geom = ConvGeom {
            taps,
            batch: input.n,
            in_batch: input.map_len(),
            out_batch: oh * ow * cout,
            out_h: oh,
            out_w: ow,
            in_base: (p - top) * row + (p - left) * cin,
            in_row: s * row,
            in_pix: s * cin,
            out_base: 0,
            out_row: ow * cout,
            out_pix: cout,
        };
        super::conv(packed, &input.data, &geom, &mut output.data, &epi)
    }

    /// Convolves `n` planar `c × h × w` inputs, each map's `affine` applied as it is loaded,
    /// in bands of at most `band_bytes` (tests take small ones): the `(n, cout, oh, ow)`
    /// values, `oh` and `ow`.
    fn run_banded(
        &self,
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        band_bytes: usize,
        affine: Option<&ChannelAffine>,
    ) -> Result<(Vec<f32>, usize, usize)> {
        let (cin, cout) = (self.cin, self.cout);
        let (kh, kw) = self.kernel;
        if c != cin {
            return Err(Error::InvalidParameter(format!(
                "a convolution over {cin} channels given {c}"
            )));
        }
        let [top, bottom, left, right] = self.padding;
        let s = self.stride;
        let (hp, wp) = (h + top + bottom, w + left + right);
        if hp < kh || wp < kw {
            return Err(Error::InvalidParameter(format!(
                "a {h}×{w} input is smaller than the {kh}×{kw} kernel"
            )));
        }
        let (oh, ow) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
        // One border wide enough for every side; reading starts `pad − top` rows and
        // `pad − left` columns into it.
        let p = top.max(bottom).max(left).max(right);
        let plane_in = cin * h * w;
        if x.len() < n * plane_in {
            return Err(Error::InvalidParameter(format!(
                "{} values for {n} {cin}×{h}×{w} inputs",
                x.len()
            )));
        }
        let mut input = Pooled::take(&MAPS);
        let mut output = Pooled::take(&MAPS);
        let mut taps = Vec::with_capacity(kh * kw);
        let plane_out = cout * oh * ow;
        let mut result = vec![0f32; n * plane_out];
        // The whole batch at once where its maps are small enough: the weights then stream
        // from memory once for all of them.
        let widest = cin.max(cout) * 4;
        if n > 1 && n.saturating_mul(h * w).saturating_mul(widest) <= band_bytes {
            input.load_planar_batch(x, [n, cin, h, w], p, affine)?;
            output.reset_border_batch(n, oh, ow, cout, 0)?;
            self.convolve(&input, &mut output, &mut taps, oh, ow)?;
            output.write_nchw(&mut result);
            return Ok((result, oh, ow));
        }
        let bands = self.band_rows(h, w, band_bytes);
        for b in 0..n {
            let (src, dst) = (&x[b * plane_in..], &mut result[b * plane_out..]);
            let item = affine.map(|a| (a, b));
            let Some(band) = bands else {
                input.load_planar_band(src, cin, h, w, 0..h, p, item)?;
                output.reset_border(oh, ow, cout, 0)?;
                self.convolve(&input, &mut output, &mut taps, oh, ow)?;
                output.write_nchw(dst);
                continue;
            };
            // Same-size layer on a large map: band by band, so the channels-last copies are
            // a band's size (at 1024², a 256-channel map is 1 GiB).
            for r0 in (0..h).step_by(band) {
                let r1 = (r0 + band).min(h);
                input.load_planar_band(src, cin, h, w, r0..r1, p, item)?;
                output.reset_border(r1 - r0, ow, cout, 0)?;
                self.convolve(&input, &mut output, &mut taps, r1 - r0, ow)?;
                output.write_nchw_rows(dst, oh, r0);
            }
        }
        Ok((result, oh, ow))
    }
}

/// A linear layer, `y = x·Wᵀ + b` over the last dimension: candle_nn's, or on Studio's
/// kernels (a 1×1 convolution whose pixels are the rows, the bias in its epilogue) with the
/// weights stored as [`with_weight_storage`] says.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Candle's layer, kept only where it runs (not on the native path).
    candle: Option<candle_nn::Linear>,
    native: Option<(PackedWeights, Option<Vec<f32>>)>,
}

/// A [`Linear`] from `vb` (`weight` of `(out, in)`, and `bias` where `bias` says).
pub fn linear(inp: usize, out: usize, bias: bool, vb: &VarBuilder) -> Result<Linear> {
    Linear::new(if bias {
        candle_nn::linear(inp, out, vb.clone())?
    } else {
        candle_nn::linear_no_bias(inp, out, vb.clone())?
    })
}

impl Linear {
    /// Wraps a loaded candle layer, packing it for [`default_kernels`] of its device.
    pub fn new(inner: candle_nn::Linear) -> Result<Self> {
        let w = inner.weight();
        let Some(path) = default_kernels(w.device()).filter(|_| w.dtype() == DType::F32) else {
            return Ok(Self {
                candle: Some(inner),
                native: None,
            });
        };
        let (out, inp) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = PackedWeights::with_storage(path, STORAGE.with(Cell::get));
        packed.pack(out, inp, 1, |o, i, _| values[o * inp + i])?;
        let bias = match inner.bias() {
            Some(b) => Some(b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            candle: None,
            native: Some((packed, bias)),
        })
    }

    /// The kernels this layer runs on (`None`: candle's).
    pub fn kernels(&self) -> Option<KernelPath> {
        self.native.as_ref().map(|(p, _)| p.path())
    }

    /// `x·Wᵀ + b` over the last dimension of `x` (which must be the input features): on the
    /// native kernels when the layer has them, else candle's.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((packed, bias)) = &self.native else {
            return match &self.candle {
                Some(c) => Ok(c.forward(x)?),
                None => Err(Error::InvalidParameter(
                    "a linear layer without weights".into(),
                )),
            };
        };
        let (inp, out) = (packed.cin(), packed.cout());
        let mut shape = x.dims().to_vec();
        match shape.last_mut() {
            Some(last) if *last == inp => *last = out,
            _ => {
                return Err(Error::InvalidParameter(format!(
                    "a linear layer over {inp} features given a {:?} tensor",
                    x.dims()
                )));
            }
        }
        let rows = x.elem_count() / inp;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut result = vec![0f32; rows * out];
        let epi = Epilogue {
            bias: bias.as_deref(),
            ..Epilogue::NONE
        };
        with_values(&x, |v| rows_product(packed, v, rows, &mut result, &epi))??;
        Ok(Tensor::from_vec(result, shape, x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{max_abs_diff, values};

    /// Every 3×3 stride-1 layer as F(4×4), or as F(2×2).
    const F4: Winograd = Winograd {
        f4_up_to: usize::MAX,
        f2_up_to: 0,
    };
    const F2: Winograd = Winograd {
        f4_up_to: 0,
        f2_up_to: usize::MAX,
    };

    /// `values` rounded to what `dtype` stores (the reference for half-precision storage).
    fn rounded(values: Vec<f32>, dims: &[usize], dtype: DType) -> Tensor {
        Tensor::from_vec(values, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("weight")
    }

    fn candle_conv(
        cout: usize,
        cin: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dtype: DType,
    ) -> candle_nn::Conv2d {
        let w = rounded(values(cout * cin * k * k, 3), &[cout, cin, k, k], dtype);
        let b = Tensor::from_vec(values(cout, 4), cout, &Device::Cpu).expect("bias");
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        candle_nn::Conv2d::new(w, Some(b), cfg)
    }

    #[test]
    fn native_layers_match_candle_and_refuse_wrong_inputs() {
        // 3×3 stride 1 and 2 (odd sizes, batch 2), 1×1.
        for (cout, cin, k, stride, padding, h, w) in [
            (5, 3, 3, 1, 1, 7, 9),
            (6, 4, 3, 2, 1, 9, 6),
            (3, 17, 1, 1, 0, 5, 5),
        ] {
            let x = Tensor::from_vec(values(2 * cin * h * w, 9), (2, cin, h, w), &Device::Cpu)
                .expect("x");
            let reference = candle_conv(cout, cin, k, stride, padding, DType::F32)
                .forward(&x)
                .expect("candle");
            for (path, winograd) in KernelPath::available_paths()
                .into_iter()
                .flat_map(|p| [(p, Winograd::NEVER), (p, F2), (p, F4)])
            {
                let conv = with_kernels(Some(path), || {
                    Conv2d::with_winograd(
                        candle_conv(cout, cin, k, stride, padding, DType::F32),
                        winograd,
                    )
                })
                .expect("native");
                let is_winograd = matches!(
                    conv.native.as_ref().map(|n| &n.weights),
                    Some(Weights::Winograd(_))
                );
                assert_eq!(
                    is_winograd,
                    winograd != Winograd::NEVER && k == 3 && stride == 1
                );
                assert_eq!(conv.kernels(), Some(path));
                let ours = conv.forward(&x).expect("forward");
                assert_eq!(ours.dims(), reference.dims());
                let d = max_abs_diff(&ours, &reference);
                assert!(d < 2e-5, "{path} {winograd:?} k{k} s{stride}: {d}");
                let wrong = Tensor::zeros((1, cin + 1, h, w), DType::F32, &Device::Cpu).expect("x");
                assert!(conv.forward(&wrong).is_err(), "wrong channel count");
            }
        }
        let none = with_kernels(None, || Conv2d::new(candle_conv(2, 2, 3, 1, 1, DType::F32)))
            .expect("candle");
        assert_eq!(none.kernels(), None);
    }

    /// A convolution that applies the GroupNorm (and SiLU) as it loads its input gives
    /// exactly the values of normalizing first: whole batches, sample by sample, in bands,
    /// direct and Winograd, on every path; a norm of other channels is an error.
    #[test]
    fn a_normalization_applied_while_loading_equals_normalizing_first() {
        let (cin, cout, h, w, groups) = (24, 5, 11, 7, 4);
        let x =
            Tensor::from_vec(values(2 * cin * h * w, 11), (2, cin, h, w), &Device::Cpu).expect("x");
        let gamma = Tensor::from_vec(values(cin, 12), cin, &Device::Cpu).expect("gamma");
        let beta = Tensor::from_vec(values(cin, 13), cin, &Device::Cpu).expect("beta");
        for path in KernelPath::available_paths() {
            let norm = GroupNorm::new(groups, 1e-5, gamma.clone(), beta.clone(), Some(path))
                .expect("norm");
            for winograd in [Winograd::NEVER, F4] {
                let conv = with_kernels(Some(path), || {
                    Conv2d::with_winograd(candle_conv(cout, cin, 3, 1, 1, DType::F32), winograd)
                })
                .expect("native");
                for silu in [false, true] {
                    let want = conv
                        .forward(&norm.forward(&x, silu).expect("norm"))
                        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                        .expect("plain");
                    let got = conv
                        .forward_normalized(&x, &norm, silu)
                        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                        .expect("fused");
                    assert_eq!(got, want, "{path} {winograd:?} silu {silu}");
                    // Sample by sample in bands of 4 rows, and whole samples.
                    let native = conv.native.as_ref().expect("native");
                    let affine = norm.affine(&x, silu).expect("affine").expect("native norm");
                    let v = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
                    for limit in [w * cin * 4 * 4, w * cin * 4 * h] {
                        let (out, ..) = native
                            .run_banded(&v, [2, cin, h, w], limit, Some(&affine))
                            .expect("banded");
                        assert_eq!(out, want, "{path} {winograd:?} silu {silu} bands {limit}");
                    }
                }
            }
            let other = GroupNorm::new(
                groups,
                1e-5,
                gamma.narrow(0, 0, 20).expect("g"),
                beta.narrow(0, 0, 20).expect("b"),
                Some(path),
            )
            .expect("norm");
            let x20 = x
                .narrow(1, 0, 20)
                .and_then(|t| t.contiguous())
                .expect("x20");
            let affine = other
                .affine(&x20, true)
                .expect("affine")
                .expect("native norm");
            let native = with_kernels(Some(path), || {
                Conv2d::new(candle_conv(cout, cin, 3, 1, 1, DType::F32))
            })
            .expect("native");
            let v = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
            let native = native.native.as_ref().expect("native");
            assert!(
                native
                    .run_banded(&v, [2, cin, h, w], usize::MAX, Some(&affine))
                    .is_err()
            );
        }
    }

    /// Large same-size layers run band by band (the neighbouring rows in each band's border):
    /// the same values as candle's whole-map convolution, for direct and Winograd layers and
    /// bands that do not divide the height.
    #[test]
    fn banded_layers_match_candle() {
        for (cout, cin, k, padding, h, w) in [(5, 3, 3, 1, 23, 9), (3, 17, 1, 0, 11, 5)] {
            let x = Tensor::from_vec(values(2 * cin * h * w, 9), (2, cin, h, w), &Device::Cpu)
                .expect("x");
            let reference = candle_conv(cout, cin, k, 1, padding, DType::F32)
                .forward(&x)
                .expect("candle");
            for path in KernelPath::available_paths() {
                for winograd in [Winograd::NEVER, F2, F4] {
                    let conv = with_kernels(Some(path), || {
                        Conv2d::with_winograd(
                            candle_conv(cout, cin, k, 1, padding, DType::F32),
                            winograd,
                        )
                    })
                    .expect("native");
                    let native = conv.native.as_ref().expect("native layer");
                    let v = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
                    // Bands of 4 and 8 rows (the last one short), and a single band.
                    let row_bytes = w * cin.max(cout) * 4;
                    for limit in [row_bytes * 4, row_bytes * 9, row_bytes * h] {
                        let bands = native.band_rows(h, w, limit);
                        assert_eq!(bands.is_some(), limit < row_bytes * h);
                        let (out, oh, ow) = native
                            .run_banded(&v, [2, cin, h, w], limit, None)
                            .expect("banded");
                        assert_eq!((oh, ow), (h, w));
                        let ours =
                            Tensor::from_vec(out, (2, cout, h, w), &Device::Cpu).expect("ours");
                        let d = max_abs_diff(&ours, &reference);
                        assert!(d < 2e-5, "{path} {winograd:?} k{k} bands {bands:?}: {d}");
                    }
                }
            }
        }
        // Strided layers are never banded.
        let strided = with_kernels(Some(KernelPath::Scalar), || {
            Conv2d::new(candle_conv(2, 2, 3, 2, 1, DType::F32))
        })
        .expect("native");
        let native = strided.native.as_ref().expect("native layer");
        assert_eq!(native.band_rows(64, 64, 16), None);
    }

    /// A ReLU layer gradients flow through: the output and the input gradient of a loss equal
    /// candle's autograd on every path, through the native input-gradient layer (3×3 and 1×1
    /// same-size) or candle's layer where there is none (stride 2).
    #[test]
    fn relu_layers_pass_gradients_as_candle_does() {
        for (cout, cin, k, stride, padding) in [(6, 5, 3, 1, 1), (3, 17, 1, 1, 0), (4, 3, 3, 2, 1)]
        {
            // Even sides: candle's own stride-2 gradient is wrong for odd ones.
            let x = Tensor::from_vec(values(2 * cin * 8 * 6, 9), (2, cin, 8, 6), &Device::Cpu)
                .expect("x");
            let run = |layer: &Conv2d| {
                let v = candle_core::Var::from_tensor(&x).expect("var");
                let y = layer.forward(v.as_tensor()).expect("forward");
                // A loss whose gradient differs from pixel to pixel.
                let loss = y.sqr().and_then(|t| t.sum_all()).expect("loss");
                let grads = loss.backward().expect("backward");
                let g = grads.get(v.as_tensor()).expect("gradient").clone();
                (y, g)
            };
            let reference = with_kernels(None, || {
                Conv2d::relu_with_gradient(
                    candle_conv(cout, cin, k, stride, padding, DType::F32),
                    Winograd::NEVER,
                )
            })
            .expect("candle");
            let (y_ref, g_ref) = run(&reference);
            for path in KernelPath::available_paths() {
                let layer = with_kernels(Some(path), || {
                    Conv2d::relu_with_gradient(
                        candle_conv(cout, cin, k, stride, padding, DType::F32),
                        Winograd::NEVER,
                    )
                })
                .expect("native");
                assert_eq!(
                    layer.gradient.is_some(),
                    stride == 1,
                    "{path} k{k} s{stride}"
                );
                let (y, g) = run(&layer);
                assert!(
                    max_abs_diff(&y, &y_ref) < 2e-5,
                    "{path} k{k} s{stride} output"
                );
                let d = max_abs_diff(&g, &g_ref);
                assert!(d < 1e-4, "{path} k{k} s{stride} gradient: {d}");
                // Without gradients the same layer runs its plain forward pass.
                let plain = layer.forward(&x).expect("plain");
                assert!(max_abs_diff(&plain, &y_ref) < 2e-5, "{path} plain");
            }
        }
    }

    /// Half-precision storage computes with the stored weights exactly (widened to f32): the
    /// result equals candle's on the rounded weights, for direct and Winograd layers and
    /// linear layers, on every path.
    #[test]
    fn half_precision_weights_match_their_rounded_values() {
        let (cout, cin, h, w) = (70, 19, 6, 5);
        let x =
            Tensor::from_vec(values(2 * cin * h * w, 9), (2, cin, h, w), &Device::Cpu).expect("x");
        let tokens = Tensor::from_vec(values(7 * cin, 5), (1, 7, cin), &Device::Cpu).expect("t");
        for dtype in [DType::F16, DType::BF16] {
            for path in KernelPath::available_paths() {
                for winograd in [Winograd::NEVER, F2, F4] {
                    let reference = candle_conv(cout, cin, 3, 1, 1, dtype)
                        .forward(&x)
                        .expect("candle");
                    let conv = with_kernels(Some(path), || {
                        with_weight_storage(Storage::for_dtype(dtype), || {
                            Conv2d::with_winograd(candle_conv(cout, cin, 3, 1, 1, dtype), winograd)
                        })
                    })
                    .expect("native");
                    let d = max_abs_diff(&conv.forward(&x).expect("forward"), &reference);
                    // F(2×2)'s transformed weights are rounded to f16 again: about twice the
                    // error of the stored weights' own rounding (outputs are ~5).
                    let bound = if winograd == F2 { 1e-2 } else { 1e-4 };
                    assert!(d < bound, "{dtype:?} {path} {winograd:?}: {d}");
                }
                for bias in [false, true] {
                    let weight = || rounded(values(cout * cin, 11), &[cout, cin], dtype);
                    let b = bias.then(|| {
                        Tensor::from_vec(values(cout, 12), cout, &Device::Cpu).expect("bias")
                    });
                    let reference = candle_nn::Linear::new(weight(), b.clone())
                        .forward(&tokens)
                        .expect("candle");
                    let layer = with_kernels(Some(path), || {
                        with_weight_storage(Storage::for_dtype(dtype), || {
                            Linear::new(candle_nn::Linear::new(weight(), b.clone()))
                        })
                    })
                    .expect("native");
                    assert_eq!(layer.kernels(), Some(path));
                    let ours = layer.forward(&tokens).expect("forward");
                    let d = max_abs_diff(&ours, &reference);
                    assert!(d < 2e-5, "linear {dtype:?} {path} bias {bias}: {d}");
                    let wrong = Tensor::zeros((3, cin + 1), DType::F32, &Device::Cpu).expect("x");
                    assert!(layer.forward(&wrong).is_err(), "wrong feature count");
                }
            }
        }
    }
}
