//! The transposed convolution (PyTorch's `ConvTranspose2d`) on Studio's kernels, as `s²`
//! ordinary convolutions: output pixels `o = s·m + q` of one phase `q` take only the kernel
//! taps `k ≡ q + p (mod s)`, each reading input pixel `m + (q + p − k)/s`. Every phase writes
//! every `s`-th output pixel of the channels-last result, with the epilogue fused (DCGAN's
//! folded BatchNorm and ReLU). No zero-stuffed input exists.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::layers::{MAPS, Pooled};
use super::{ConvGeom, Epilogue, KernelPath, PackedWeights, default_kernels, with_values};
use crate::error::{Error, Result};

/// One phase along one axis: the kernel taps it takes and where they read.
#[derive(Debug, Clone, Copy)]
struct Phase {
    /// The first kernel index of the phase (`(q + p) mod s`); the taps are `k0 + s·j`.
    k0: usize,
    /// Number of taps, `j = 0..taps`.
    taps: usize,
    /// Tap `j` of output `m` reads input `m + base − j`.
    base: usize,
}

impl Phase {
    fn new(q: usize, stride: usize, padding: usize, kernel: usize) -> Self {
        let k0 = (q + padding) % stride;
        Self {
            k0,
            taps: (kernel - k0).div_ceil(stride),
            base: (q + padding - k0) / stride,
        }
    }

    /// Outputs of phase `q` in an output of length `out`.
    fn len(q: usize, stride: usize, out: usize) -> usize {
        out.saturating_sub(q).div_ceil(stride)
    }
}

/// A transposed convolution on Studio's kernels: square kernel, stride and padding, no output
/// padding, groups or dilation.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    /// Packed weights per phase `(qy, qx)`, row-major.
    phases: Arc<Vec<PackedWeights>>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvTranspose2d {
    /// From PyTorch's weight `(in, out, k, k)`, for [`default_kernels`] of its device; `None`
    /// where those kernels do not run (another device or CPU, a weight that is not f32) or
    /// the shape is one they do not take (a kernel smaller than the stride, padding not
    /// below the kernel).
    pub fn native(weight: &Tensor, stride: usize, padding: usize) -> Result<Option<Self>> {
        let Some(path) = default_kernels(weight.device()) else {
            return Ok(None);
        };
        let (_, _, k, kw) = weight.dims4()?;
        if weight.dtype() != DType::F32 || k != kw || stride == 0 || k < stride || padding >= k {
            return Ok(None);
        }
        Self::with_path(path, weight, stride, padding).map(Some)
    }

    fn with_path(path: KernelPath, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (cin, cout, k, _) = weight.dims4()?;
        let w = weight.flatten_all()?.to_vec1::<f32>()?;
        let mut phases = Vec::with_capacity(stride * stride);
        for qy in 0..stride {
            let py = Phase::new(qy, stride, padding, k);
            for qx in 0..stride {
                let px = Phase::new(qx, stride, padding, k);
                let mut packed = PackedWeights::new(path);
                packed.pack(cout, cin, py.taps * px.taps, |o, i, t| {
                    let ky = py.k0 + stride * (t / px.taps);
                    let kx = px.k0 + stride * (t % px.taps);
                    w[((i * cout + o) * k + ky) * k + kx]
                })?;
                phases.push(packed);
            }
        }
        Ok(Self {
            phases: Arc::new(phases),
            cin,
            cout,
            kernel: k,
            stride,
            padding,
        })
    }

    /// The kernels this layer runs on.
    pub fn kernels(&self) -> Option<KernelPath> {
        self.phases.first().map(PackedWeights::path)
    }

    /// The output side for an input side `n`.
    fn out_len(&self, n: usize) -> Option<usize> {
        (n - 1)
            .checked_mul(self.stride)?
            .checked_add(self.kernel)?
            .checked_sub(2 * self.padding)
    }

    /// The border the input needs so that every phase reads inside it.
    fn border(&self, n: usize, out: usize) -> usize {
        (0..self.stride)
            .map(|q| {
                let ph = Phase::new(q, self.stride, self.padding, self.kernel);
                let len = Phase::len(q, self.stride, out);
                if len == 0 || ph.taps == 0 {
                    return 0;
                }
                // Reads reach from `base − (taps − 1)` to `len − 1 + base`.
                let before = (ph.taps - 1).saturating_sub(ph.base);
                let after = (len - 1 + ph.base).saturating_sub(n - 1);
                before.max(after)
            })
            .max()
            .unwrap_or(0)
    }

    /// `(N, in, H, W)` → `(N, out, H', W')`, `H' = (H − 1)·s − 2p + k`, with `epi` applied
    /// to every output.
    pub fn forward(&self, x: &Tensor, epi: &Epilogue<'_>) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (cin, cout, s) = (self.cin, self.cout, self.stride);
        if c != cin || h == 0 || w == 0 {
            return Err(Error::InvalidParameter(format!(
                "a transposed convolution over {cin} channels given a {:?} input",
                x.dims()
            )));
        }
        let (Some(oh), Some(ow)) = (self.out_len(h), self.out_len(w)) else {
            return Err(Error::InvalidParameter(format!(
                "a {h}×{w} input is too small for padding {}",
                self.padding
            )));
        };
        if !epi.fits(0, cout) || epi.noise.is_some() {
            return Err(Error::InvalidParameter(
                "a transposed convolution's epilogue takes per-channel values only".into(),
            ));
        }
        let pad = self.border(h, oh).max(self.border(w, ow));
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut input = Pooled::take(&MAPS);
        let mut output = Pooled::take(&MAPS);
        let plane_in = cin * h * w;
        let plane_out = cout
            .checked_mul(oh)
            .and_then(|v| v.checked_mul(ow))
            .ok_or_else(|| Error::InvalidParameter(format!("a {oh}×{ow} output is too large")))?;
        let mut result = vec![0f32; n * plane_out];
        let mut taps = Vec::new();
        for b in 0..n {
            with_values(&x, |v| {
                input.load_planar(&v[b * plane_in..], cin, h, w, pad)
            })??;
            // The phases together write every output pixel.
            output.reset_border(oh, ow, cout, 0)?;
            let row = input.row_stride();
            for (index, packed) in self.phases.iter().enumerate() {
                let (qy, qx) = (index / s, index % s);
                let (py, px) = (
                    Phase::new(qy, s, self.padding, self.kernel),
                    Phase::new(qx, s, self.padding, self.kernel),
                );
                let (len_y, len_x) = (Phase::len(qy, s, oh), Phase::len(qx, s, ow));
                if len_y == 0 || len_x == 0 {
                    continue;
                }
                taps.clear();
                for jy in 0..py.taps {
                    for jx in 0..px.taps {
                        // Inside the border by the choice of `pad`.
                        let y = pad + py.base - jy;
                        let x = pad + px.base - jx;
                        taps.push(y * row + x * cin);
                    }
                }
                let geom = ConvGeom {
                    taps: &taps,
                    batch: 1,
                    in_batch: 0,
                    out_batch: 0,
                    out_h: len_y,
                    out_w: len_x,
                    in_base: 0,
                    in_row: row,
                    in_pix: cin,
                    out_base: (qy * ow + qx) * cout,
                    out_row: s * ow * cout,
                    out_pix: s * cout,
                };
                super::conv(packed, &input.data, &geom, &mut output.data, epi)?;
            }
            output.write_nchw(&mut result[b * plane_out..]);
        }
        Ok(Tensor::from_vec(result, (n, cout, oh, ow), x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::nn::test_values::{max_abs_diff, values};

    /// Every phase layout against candle's `conv_transpose2d`: DCGAN's (4, 2, 1) and first
    /// block (4, 1, 0, a 1×1 input), odd kernels and sizes, stride 3, channels that are not a
    /// multiple of the vector width, batch 2; and the fused epilogue.
    #[test]
    fn matches_candle_on_every_path() {
        for (cin, cout, k, s, p, h, w) in [
            (5, 7, 4, 2, 1, 3, 4),
            (9, 18, 4, 1, 0, 1, 1),
            (3, 17, 3, 2, 1, 5, 2),
            (4, 3, 5, 3, 2, 4, 3),
            (2, 33, 2, 2, 0, 1, 6),
        ] {
            let weight = Tensor::from_vec(
                values(cin * cout * k * k, 3),
                (cin, cout, k, k),
                &Device::Cpu,
            )
            .expect("weight");
            let x = Tensor::from_vec(values(2 * cin * h * w, 5), (2, cin, h, w), &Device::Cpu)
                .expect("x");
            let reference = x.conv_transpose2d(&weight, p, 0, s, 1).expect("candle");
            let scale = values(cout, 7);
            let bias = values(cout, 8);
            let sc = Tensor::from_slice(&scale, (1, cout, 1, 1), &Device::Cpu).expect("scale");
            let bi = Tensor::from_slice(&bias, (1, cout, 1, 1), &Device::Cpu).expect("bias");
            let fused_reference = reference
                .broadcast_mul(&sc)
                .and_then(|t| t.broadcast_add(&bi))
                .and_then(|t| t.relu())
                .expect("epilogue");
            for path in KernelPath::available_paths() {
                let layer = ConvTranspose2d::with_path(path, &weight, s, p).expect("pack");
                assert_eq!(layer.kernels(), Some(path));
                let ours = layer.forward(&x, &Epilogue::NONE).expect("forward");
                assert_eq!(ours.dims(), reference.dims());
                let d = max_abs_diff(&ours, &reference);
                assert!(d < 2e-5, "{path} k{k} s{s} p{p} {h}×{w}: {d}");
                let epi = Epilogue {
                    scale: Some(&scale),
                    bias: Some(&bias),
                    slope: Some(0.0),
                    ..Epilogue::NONE
                };
                let fused = layer.forward(&x, &epi).expect("fused");
                let d = max_abs_diff(&fused, &fused_reference);
                assert!(d < 2e-5, "{path} fused k{k} s{s} p{p}: {d}");
                let wrong = Tensor::zeros((1, cin + 1, h, w), DType::F32, &Device::Cpu).expect("x");
                assert!(layer.forward(&wrong, &Epilogue::NONE).is_err());
                let short = [0.0f32; 1];
                let bad = Epilogue {
                    bias: Some(&short),
                    ..Epilogue::NONE
                };
                if cout > 1 {
                    assert!(layer.forward(&x, &bad).is_err(), "a bias too short");
                }
            }
        }
    }

    #[test]
    fn shapes_it_does_not_take_fall_back() {
        let w = Tensor::zeros((2, 3, 2, 2), DType::F32, &Device::Cpu).expect("w");
        // Kernel smaller than the stride, padding as large as the kernel.
        assert!(ConvTranspose2d::native(&w, 3, 0).expect("ok").is_none());
        assert!(ConvTranspose2d::native(&w, 1, 2).expect("ok").is_none());
        let half = w.to_dtype(DType::F16).expect("f16");
        assert!(ConvTranspose2d::native(&half, 2, 0).expect("ok").is_none());
    }
}
