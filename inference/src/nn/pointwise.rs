//! The passes between the convolutions and matrix products of the diffusion models, each one
//! pass over memory instead of candle's chain of temporaries: GroupNorm fused with the SiLU
//! that follows it, and the UNet's GEGLU (exact-GELU gate times value).
//!
//! Plain loops over slices that the compiler vectorizes for the build's CPU (the exponential
//! is the branch-free one of the CPU transformer steps), split over rayon's pool. They are
//! memory-bound, so they have no per-instruction-set variants. f32 tensors on the CPU only;
//! the layers fall back to candle's ops elsewhere.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::{KernelPath, default_kernels, with_values};
use crate::error::{Error, Result};
use crate::models::cpu_ops::exp;

/// `x · σ(x)`.
#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erfc(a)` for any `a`, relative error below 1.2e-7 (Numerical Recipes' `erfcc`, a Chebyshev
/// fit of `erfc(z) = t·e^{−z² + P(t)}`, `t = 1/(1 + z/2)`, for `z = |a|`; `2 − erfc(z)` for
/// negative `a`), branch-free so loops over slices vectorize.
#[inline]
fn erfc(a: f32) -> f32 {
    let z = a.abs();
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let mut p = 0.170_872_77f32;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p.mul_add(t, c);
    }
    let r = t * exp(p - z * z);
    if a < 0.0 { 2.0 - r } else { r }
}

/// GELU with the exact (erf) form: `x/2 · (1 + erf(x/√2)) = x/2 · erfc(−x/√2)`.
#[inline]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// diffusers' GEGLU over the last dimension of `h` (`2·n` wide): `h[..n] · gelu(h[n..])`, the
/// GELU exact, into a new `(…, n)` tensor. Candle's ops off the CPU or for other dtypes.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let dims = h.dims().to_vec();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(Error::InvalidParameter("GEGLU over a scalar".into()));
    };
    if !last.is_multiple_of(2) {
        return Err(Error::InvalidParameter(format!(
            "GEGLU over {last} values, not an even number"
        )));
    }
    let n = last / 2;
    if !h.device().is_cpu() || h.dtype() != DType::F32 {
        let d = candle_core::D::Minus1;
        return Ok(h.narrow(d, 0, n)?.mul(&h.narrow(d, n, n)?.gelu_erf()?)?);
    }
    let h = h.contiguous()?;
    let rows: usize = lead.iter().product();
    let mut out = vec![0f32; rows * n];
    with_values(&h, |v| {
        out.par_chunks_mut(n)
            .zip(v.par_chunks(last))
            .for_each(|(o, row)| {
                let (x, g) = row.split_at(n);
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    *o = x * gelu_erf(g);
                }
            });
    })?;
    let mut shape = lead.to_vec();
    shape.push(n);
    Ok(Tensor::from_vec(out, shape, h.device())?)
}

/// GroupNorm over NCHW maps with a per-channel affine, optionally followed by SiLU (the
/// resnets' `silu(norm(x))`), in one pass per group after its statistics.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    groups: usize,
    eps: f64,
    weight: Tensor,
    bias: Tensor,
    /// `(weight, bias)` as f32 on the native path (`None`: candle's ops).
    native: Option<(Vec<f32>, Vec<f32>)>,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`channels` each) from `vb`, as `candle_nn::group_norm` does.
    pub fn load(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::InvalidParameter(format!(
                "{channels} channels do not split into {groups} groups"
            )));
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Self::new(groups, eps, weight, bias, default_kernels(vb.device()))
    }

    pub(super) fn new(
        groups: usize,
        eps: f64,
        weight: Tensor,
        bias: Tensor,
        kernels: Option<KernelPath>,
    ) -> Result<Self> {
        let native = match kernels {
            Some(_) if weight.dtype() == DType::F32 => {
                Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Self {
            groups,
            eps,
            weight,
            bias,
            native,
        })
    }

    /// `norm(x)`, or `silu(norm(x))` with `silu`.
    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let Some((weight, bias)) = &self.native else {
            let gn = candle_nn::GroupNorm::new(
                self.weight.clone(),
                self.bias.clone(),
                self.weight.dim(0)?,
                self.groups,
                self.eps,
            )?;
            let y = gn.forward(x)?;
            return Ok(if silu { candle_nn::ops::silu(&y)? } else { y });
        };
        let (n, c, h, w) = x.dims4()?;
        if c != weight.len() || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Err(Error::InvalidParameter(format!(
                "a GroupNorm over {} f32 channels given {c} {:?} channels",
                weight.len(),
                x.dtype()
            )));
        }
        let x = x.contiguous()?;
        let per_group = c / self.groups * h * w;
        let plane = h * w;
        let mut out = vec![0f32; n * c * plane];
        #[allow(clippy::cast_possible_truncation)] // the epsilon of an f32 norm
        let eps = self.eps as f32;
        with_values(&x, |v| {
            out.par_chunks_mut(per_group)
                .zip(v.par_chunks(per_group))
                .enumerate()
                .for_each(|(i, (o, g))| {
                    let c0 = (i % self.groups) * (c / self.groups);
                    norm_group(g, o, plane, &weight[c0..], &bias[c0..], eps, silu);
                });
        })?;
        Ok(Tensor::from_vec(out, (n, c, h, w), &Device::Cpu)?)
    }

    /// The normalization of `x` `(n, c, h, w)` as a per-(map, channel) affine (then SiLU with
    /// `silu`) for the next convolution to apply while it loads its input, so the normalized
    /// maps never exist: the same values as [`Self::forward`], bit for bit. `None` where the
    /// norm runs on candle's ops (the caller then normalizes first).
    pub fn affine(&self, x: &Tensor, silu: bool) -> Result<Option<ChannelAffine>> {
        let Some((weight, bias)) = &self.native else {
            return Ok(None);
        };
        let (n, c, h, w) = x.dims4()?;
        if c != weight.len() || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let per_group = c / self.groups * h * w;
        let channels = c / self.groups;
        let mut scale = vec![0f32; n * c];
        let mut shift = vec![0f32; n * c];
        #[allow(clippy::cast_possible_truncation)] // the epsilon of an f32 norm
        let eps = self.eps as f32;
        with_values(&x, |v| {
            scale
                .par_chunks_mut(channels)
                .zip(shift.par_chunks_mut(channels))
                .zip(v.par_chunks(per_group))
                .enumerate()
                .for_each(|(i, ((a, b), g))| {
                    let c0 = (i % self.groups) * channels;
                    let (mean, inv) = group_stats(g, eps);
                    for (k, (a, b)) in a.iter_mut().zip(b).enumerate() {
                        (*a, *b) = channel_affine(mean, inv, weight[c0 + k], bias[c0 + k]);
                    }
                });
        })?;
        Ok(Some(ChannelAffine {
            channels: c,
            scale,
            shift,
            silu,
        }))
    }
}

/// A normalization held as `x·scale + shift` per (map, channel), then SiLU with `silu`
/// ([`GroupNorm::affine`]), for a convolution to apply to its input as it loads it.
#[derive(Debug, Clone)]
pub struct ChannelAffine {
    channels: usize,
    scale: Vec<f32>,
    shift: Vec<f32>,
    silu: bool,
}

impl ChannelAffine {
    /// Channels per map.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Maps it holds the affine of.
    pub fn maps(&self) -> usize {
        self.scale.len() / self.channels.max(1)
    }

    /// Applies map `item`'s affine to channels-last pixels (`channels` values each).
    pub(super) fn apply(&self, item: usize, pixels: &mut [f32]) {
        let c = self.channels;
        let (a, b) = (&self.scale[item * c..][..c], &self.shift[item * c..][..c]);
        let pixels = pixels.chunks_exact_mut(c);
        if self.silu {
            for px in pixels {
                for ((x, &a), &b) in px.iter_mut().zip(a).zip(b) {
                    *x = self::silu(x.mul_add(a, b));
                }
            }
        } else {
            for px in pixels {
                for ((x, &a), &b) in px.iter_mut().zip(a).zip(b) {
                    *x = x.mul_add(a, b);
                }
            }
        }
    }
}

/// Sums in 16 independent lanes, in f64 across chunks (a group of a 512² VAE map holds a
/// million values).
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const CHUNK: usize = 1024;
    let mut total = 0f64;
    for chunk in v.chunks(CHUNK) {
        let mut acc = [0f32; 16];
        let lanes = chunk.chunks_exact(16);
        let tail: f32 = lanes.remainder().iter().map(|&x| f(x)).sum();
        for x in lanes {
            for i in 0..16 {
                acc[i] += f(x[i]);
            }
        }
        total += f64::from(acc.iter().sum::<f32>() + tail);
    }
    total
}

/// A group's mean and `1/√(variance + eps)` (the variance about the mean, in f64 sums).
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // statistics in f64
fn group_stats(g: &[f32], eps: f32) -> (f32, f32) {
    let count = g.len() as f64;
    let mean = (lane_sum(g, |x| x) / count) as f32;
    let var = (lane_sum(g, |x| (x - mean) * (x - mean)) / count) as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A channel's normalization and affine as one `x·a + b`.
fn channel_affine(mean: f32, inv: f32, gamma: f32, beta: f32) -> (f32, f32) {
    let a = inv * gamma;
    (a, beta - mean * a)
}

/// One group (`channels × plane` values) normalized (mean, then variance about it), scaled
/// and shifted per channel, and passed through SiLU with `silu`.
fn norm_group(
    g: &[f32],
    out: &mut [f32],
    plane: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) {
    let (mean, inv) = group_stats(g, eps);
    for ((o, x), (&gamma, &beta)) in out
        .chunks_mut(plane)
        .zip(g.chunks(plane))
        .zip(weight.iter().zip(bias))
    {
        let (a, b) = channel_affine(mean, inv, gamma, beta);
        if silu {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = self::silu(x.mul_add(a, b));
            }
        } else {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x.mul_add(a, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{max_abs_diff, values};

    #[test]
    fn gelu_erf_matches_candles_f64_erf() {
        // Candle's `1 + erf` is good to about 1e-7 absolute (it cancels to 0 below x ≈ −5.5):
        // relative error where |GELU| ≥ 1, absolute below.
        let xs: Vec<f32> = (0..6500).map(|i| -12.0 + i as f32 * 0.003_7).collect();
        let want = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle");
        let worst = xs
            .iter()
            .zip(&want)
            .map(|(&x, &w)| (gelu_erf(x) - w).abs() / w.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(gelu_erf(f32::NAN).is_nan());
        assert!(gelu_erf(-100.0).abs() < 1e-30);
        assert!((gelu_erf(100.0) - 100.0).abs() < 1e-5);
    }

    #[test]
    fn geglu_matches_candle() {
        for (rows, n) in [(3, 5), (37, 40), (1, 1)] {
            let h = Tensor::from_vec(values(2 * rows * 2 * n, 5), (2, rows, 2 * n), &Device::Cpu)
                .expect("h")
                .affine(4.0, 0.0)
                .expect("scale");
            let want = h
                .narrow(2, 0, n)
                .expect("x")
                .mul(&h.narrow(2, n, n).expect("g").gelu_erf().expect("gelu"))
                .expect("mul");
            let got = geglu(&h).expect("geglu");
            let d = max_abs_diff(&got, &want);
            assert!(d < 2e-6, "({rows}, {n}): {d}");
        }
        let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("odd");
        assert!(geglu(&odd).is_err());
    }

    #[test]
    fn group_norm_matches_candle_with_and_without_silu() {
        // Odd spatial sizes, one channel per group, batch 2, 1×1 maps, an offset mean.
        for (n, c, groups, h, w) in [(2, 6, 3, 5, 7), (1, 4, 4, 3, 3), (2, 8, 2, 1, 1)] {
            let x = Tensor::from_vec(values(n * c * h * w, 7), (n, c, h, w), &Device::Cpu)
                .expect("x")
                .affine(3.0, 10.0)
                .expect("offset");
            let weight = Tensor::from_vec(values(c, 8), c, &Device::Cpu).expect("weight");
            let bias = Tensor::from_vec(values(c, 9), c, &Device::Cpu).expect("bias");
            let reference =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-6)
                    .expect("candle")
                    .forward(&x)
                    .expect("norm");
            let path = KernelPath::available_paths().first().copied();
            let ours = GroupNorm::new(groups, 1e-6, weight, bias, path).expect("ours");
            assert!(ours.native.is_some());
            let d = max_abs_diff(&ours.forward(&x, false).expect("norm"), &reference);
            assert!(d < 1e-5, "norm ({n},{c},{groups},{h},{w}): {d}");
            let want = candle_nn::ops::silu(&reference).expect("silu");
            let d = max_abs_diff(&ours.forward(&x, true).expect("silu"), &want);
            assert!(d < 1e-5, "silu ({n},{c},{groups},{h},{w}): {d}");
            let wrong = Tensor::zeros((1, c + 1, h, w), DType::F32, &Device::Cpu).expect("x");
            assert!(ours.forward(&wrong, true).is_err());
        }
    }
}
