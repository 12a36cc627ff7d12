//! Candle-facing layers on Studio's CPU kernels: a drop-in for `candle_nn::Conv2d` in the
//! diffusion models (UNet, VAE, TAESD).
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

use candle_core::{DType, Device, Module, Tensor};

use super::{ConvGeom, Epilogue, FeatureMap, KernelPath, PackedWeights, with_values};
use crate::error::{Error, Result};

/// A per-thread choice of kernels, set while [`with_kernels`] runs.
#[derive(Clone, Copy)]
enum Choice {
    Default,
    Chosen(Option<KernelPath>),
}

thread_local! {
    static OVERRIDE: Cell<Choice> = const { Cell::new(Choice::Default) };
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

/// Maps lent to forward passes and taken back, so a steady state reuses the same memory
/// (fresh multi-megabyte buffers cost a page fault per 4 KiB: a fifth of a VAE decode).
static POOL: std::sync::Mutex<Vec<FeatureMap>> = std::sync::Mutex::new(Vec::new());
/// Maps the pool keeps at most (two per forward pass in flight).
const POOL_MAPS: usize = 4;

/// A map from [`POOL`], returned to it on drop.
struct Pooled(FeatureMap);

impl Pooled {
    fn take() -> Self {
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self(pool.pop().unwrap_or_default())
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < POOL_MAPS {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

impl std::ops::Deref for Pooled {
    type Target = FeatureMap;
    fn deref(&self) -> &FeatureMap {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut FeatureMap {
        &mut self.0
    }
}

/// The native half of a [`Conv2d`].
#[derive(Debug, Clone)]
struct Native {
    packed: PackedWeights,
    bias: Option<Vec<f32>>,
    kernel: (usize, usize),
    stride: usize,
    /// Zero rows and columns added: `[top, bottom, left, right]`.
    padding: [usize; 4],
}

impl Native {
    fn new(
        path: KernelPath,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: [usize; 4],
    ) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if stride == 0 {
            return Err(Error::InvalidParameter(
                "a convolution with stride 0".into(),
            ));
        }
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = PackedWeights::new(path);
        packed.pack(cout, cin, kh * kw, |o, i, t| {
            values[(o * cin + i) * kh * kw + t]
        })?;
        let bias = match bias {
            Some(b) => Some(b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            packed,
            bias,
            kernel: (kh, kw),
            stride,
            padding,
        })
    }
}

/// A 2-D convolution (candle_nn's configuration: square padding and stride, no dilation or
/// groups on the native path).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Candle's layer, kept only where it runs (not on the native path).
    candle: Option<candle_nn::Conv2d>,
    native: Option<Native>,
}

impl Conv2d {
    /// Wraps a loaded candle layer, packing it for [`default_kernels`] of its device.
    pub fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        let kernels = default_kernels(inner.weight().device());
        Self::with(inner, kernels)
    }

    fn with(inner: candle_nn::Conv2d, kernels: Option<KernelPath>) -> Result<Self> {
        let Some(path) = kernels else {
            return Ok(Self {
                candle: Some(inner),
                native: None,
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
            });
        }
        let p = cfg.padding;
        let native = Native::new(path, w, inner.bias(), cfg.stride, [p, p, p, p])?;
        Ok(Self {
            candle: None,
            native: Some(native),
        })
    }

    /// A convolution on Studio's kernels for [`default_kernels`] of the weight's device, from
    /// its weight `(out, in, kh, kw)`, bias, stride and padding `[top, bottom, left, right]`;
    /// `None` where those kernels do not run (another device or CPU, a dtype they do not take).
    pub fn native(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: [usize; 4],
    ) -> Result<Option<Self>> {
        let Some(path) = default_kernels(weight.device()) else {
            return Ok(None);
        };
        if weight.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(Self {
            candle: None,
            native: Some(Native::new(path, weight, bias, stride, padding)?),
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
        self.native.as_ref().map(|n| n.packed.path())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.native, &self.candle) {
            (Some(native), _) => native.forward(x),
            (None, Some(c)) => Ok(c.forward(x)?),
            (None, None) => Err(Error::InvalidParameter(
                "a convolution without weights".into(),
            )),
        }
    }
}

impl Native {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (cin, cout) = (self.packed.cin(), self.packed.cout());
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
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut input = Pooled::take();
        let mut output = Pooled::take();
        let mut taps = Vec::with_capacity(kh * kw);
        let plane_in = cin * h * w;
        let plane_out = cout * oh * ow;
        let mut result = vec![0f32; n * plane_out];
        for b in 0..n {
            with_values(&x, |v| input.load_planar(&v[b * plane_in..], cin, h, w, p))??;
            let row = input.row_stride();
            taps.clear();
            taps.extend((0..kh * kw).map(|t| (t / kw) * row + (t % kw) * cin));
            output.reset_border(oh, ow, cout, 0)?;
            let geom = ConvGeom {
                taps: &taps,
                batch: 1,
                in_batch: 0,
                out_batch: 0,
                out_h: oh,
                out_w: ow,
                in_base: (p - top) * row + (p - left) * cin,
                in_row: s * row,
                in_pix: s * cin,
                out_base: 0,
                out_row: ow * cout,
                out_pix: cout,
            };
            let epi = Epilogue {
                bias: self.bias.as_deref(),
                ..Epilogue::NONE
            };
            super::conv(&self.packed, &input.data, &geom, &mut output.data, &epi)?;
            output.write_nchw(&mut result[b * plane_out..]);
        }
        Ok(Tensor::from_vec(result, (n, cout, oh, ow), x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{max_abs_diff, values};

    fn candle_conv(
        cout: usize,
        cin: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> candle_nn::Conv2d {
        let w = Tensor::from_vec(
            values(cout * cin * k * k, 3),
            (cout, cin, k, k),
            &Device::Cpu,
        )
        .expect("weight");
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
            let reference = candle_conv(cout, cin, k, stride, padding)
                .forward(&x)
                .expect("candle");
            for path in KernelPath::available_paths() {
                let conv = with_kernels(Some(path), || {
                    Conv2d::new(candle_conv(cout, cin, k, stride, padding))
                })
                .expect("native");
                assert_eq!(conv.kernels(), Some(path));
                let ours = conv.forward(&x).expect("forward");
                assert_eq!(ours.dims(), reference.dims());
                let d = max_abs_diff(&ours, &reference);
                assert!(d < 1e-5, "{path} k{k} s{stride}: {d}");
                let wrong = Tensor::zeros((1, cin + 1, h, w), DType::F32, &Device::Cpu).expect("x");
                assert!(conv.forward(&wrong).is_err(), "wrong channel count");
            }
        }
        let none = with_kernels(None, || Conv2d::new(candle_conv(2, 2, 3, 1, 1))).expect("candle");
        assert_eq!(none.kernels(), None);
    }
}
