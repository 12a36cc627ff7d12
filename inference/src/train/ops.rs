//! Differentiable building blocks the trainers share. candle's fused CPU kernels (softmax,
//! layer norm, RMSNorm, RoPE) have no backward pass, and the gradient of its `conv2d` is a
//! slow transposed convolution on the CPU; these are written with ops whose gradients candle
//! computes well.

use candle_core::{D, Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::error::Result;

/// Standard-normal values times `scale` from `rng` (Box–Muller): candle's CPU generator
/// cannot be seeded.
pub fn normal(rng: &mut StdRng, shape: &[usize], scale: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            (scale * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    softmax_last_on(x, fused(x))
}

/// [`softmax_last`], as one [`Softmax`] op (`fused`) or composed of candle's.
fn softmax_last_on(x: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension, with weight and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_on(x, weight, bias, eps, fused(x))
}

/// [`layer_norm`], as one [`Norm`] op (`fused`) or composed of candle's.
fn layer_norm_on(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    fused: bool,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if fused {
        return norm_fused(x, weight, bias, Norm::new(1, d, 1, eps));
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Group norm of `x` `(n, c, h, w)` over `groups` groups of channels, with per-channel weight
/// and bias.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    group_norm_on(x, groups, weight, bias, eps, fused(x))
}

/// [`group_norm`], as one [`Norm`] op (`fused`) or composed of candle's.
fn group_norm_on(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    fused: bool,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if groups == 0 || c % groups != 0 {
        return Err(crate::error::Error::InvalidParameter(format!(
            "group norm of {c} channels in {groups} groups"
        )));
    }
    if fused {
        return norm_fused(x, weight, bias, Norm::new(groups, c / groups, h * w, eps));
    }
    let g = x.reshape((n, groups, (c / groups) * h * w))?;
    let mean = g.mean_keepdim(2)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((n, c, h, w))?;
    let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1));
    Ok(normed
        .broadcast_mul(&per_channel(weight)?)?
        .broadcast_add(&per_channel(bias)?)?)
}

/// Whether the norms run as one [`Norm`] op: f32 on the CPU.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

fn norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, norm: Norm) -> Result<Tensor> {
    let channels = norm.groups * norm.per_group;
    let (weight, bias) = (weight.flatten_all()?, bias.flatten_all()?);
    if weight.elem_count() != channels || bias.elem_count() != channels {
        return Err(crate::error::Error::InvalidParameter(format!(
            "a norm of {channels} channels with {} weights and {} biases",
            weight.elem_count(),
            bias.elem_count()
        )));
    }
    Ok(x.contiguous()?.apply_op3(&weight, &bias, norm)?)
}

/// A normalisation with a per-channel affine, as one op with its own gradient (candle's
/// composed version spends most of a training step in its gradients' broadcasts). `x` is read
/// as segments of `per_group · inner` values (one group of one sample), `groups` segments per
/// sample; value `e` of segment `s` belongs to channel `(s mod groups) · per_group + e / inner`.
/// Group norm: `(groups, c / groups, h·w)`; layer norm: `(1, d, 1)`.
#[derive(Debug, Clone, Copy)]
struct Norm {
    groups: usize,
    per_group: usize,
    inner: usize,
    eps: f64,
}

impl Norm {
    fn new(groups: usize, per_group: usize, inner: usize, eps: f64) -> Self {
        Self {
            groups,
            per_group,
            inner,
            eps,
        }
    }

    fn segment(&self) -> usize {
        self.per_group * self.inner
    }

    /// The mean and `1 / √(variance + ε)` of one segment.
    fn moments(&self, seg: &[f32]) -> (f32, f32) {
        let len = seg.len() as f64;
        let mean = seg.iter().map(|&v| f64::from(v)).sum::<f64>() / len;
        let var = seg
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / len;
        (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
    }

    /// The channel of each run of `inner` values of segment `s`.
    fn channel(&self, s: usize, e: usize) -> usize {
        (s % self.groups) * self.per_group + e
    }
}

/// Softmax over the last dimension as one op with its own gradient,
/// `dx = y ⊙ (dy − Σ dy ⊙ y)` per row (the composed ops' gradients make several passes over
/// the attention scores, each with its own buffers).
#[derive(Debug, Clone, Copy)]
struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "studio-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let d = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = x.to_vec();
        y.par_chunks_exact_mut(d).with_min_len(64).for_each(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        });
        Ok((candle_core::CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let y = values(res).map_err(candle_core::Error::wrap)?;
        let mut dx = values(grad).map_err(candle_core::Error::wrap)?;
        let d = res.dims().last().copied().unwrap_or(1).max(1);
        y.par_chunks_exact(d)
            .zip(dx.par_chunks_exact_mut(d))
            .with_min_len(64)
            .for_each(|(yr, dr)| {
                let dot: f32 = yr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (g, &v) in dr.iter_mut().zip(yr) {
                    *g = v * (*g - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// A contiguous f32 tensor's values.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl candle_core::CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "studio-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let (gamma, beta) = (contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let mut y = vec![0f32; x.len()];
        let inner = self.inner;
        x.par_chunks_exact(self.segment())
            .zip(y.par_chunks_exact_mut(self.segment()))
            .enumerate()
            .with_min_len(8)
            .for_each(|(s, (seg, out))| {
                let (mean, r) = self.moments(seg);
                for (e, (run, o)) in seg
                    .chunks_exact(inner)
                    .zip(out.chunks_exact_mut(inner))
                    .enumerate()
                {
                    let ch = self.channel(s, e);
                    let (scale, shift) = (r * gamma[ch], beta[ch] - mean * r * gamma[ch]);
                    for (o, &v) in o.iter_mut().zip(run) {
                        *o = v * scale + shift;
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wrap = |e: crate::error::Error| candle_core::Error::wrap(e);
        let xs = values(x).map_err(wrap)?;
        let dy = values(grad).map_err(wrap)?;
        let g = values(gamma).map_err(wrap)?;
        let mut dx = vec![0f32; xs.len()];
        let (inner, seg_len, channels) = (self.inner, self.segment(), g.len());
        let zeros = || (vec![0f32; channels], vec![0f32; channels]);
        // Segments in parallel, each worker summing its own γ and β gradients.
        let (dgamma, dbeta) = xs
            .par_chunks_exact(seg_len)
            .zip(dy.par_chunks_exact(seg_len))
            .zip(dx.par_chunks_exact_mut(seg_len))
            .enumerate()
            .with_min_len(8)
            .fold(zeros, |(mut dgamma, mut dbeta), (s, ((seg, dseg), dxs))| {
                let (mean, r) = self.moments(seg);
                // Sums over the segment of dx̂ = dy·γ and of dx̂·x̂.
                let (mut sum, mut sum_xhat) = (0f64, 0f64);
                for (e, (run, drun)) in seg
                    .chunks_exact(inner)
                    .zip(dseg.chunks_exact(inner))
                    .enumerate()
                {
                    let ch = self.channel(s, e);
                    let (mut dg, mut db) = (0f32, 0f32);
                    for (&v, &d) in run.iter().zip(drun) {
                        let xhat = (v - mean) * r;
                        dg += d * xhat;
                        db += d;
                    }
                    dgamma[ch] += dg;
                    dbeta[ch] += db;
                    sum += f64::from(db * g[ch]);
                    sum_xhat += f64::from(dg * g[ch]);
                }
                let len = seg_len as f64;
                let (a, b) = ((sum / len) as f32, (sum_xhat / len) as f32);
                for (e, (run, (drun, dxr))) in seg
                    .chunks_exact(inner)
                    .zip(dseg.chunks_exact(inner).zip(dxs.chunks_exact_mut(inner)))
                    .enumerate()
                {
                    let gc = g[self.channel(s, e)];
                    for ((&v, &d), o) in run.iter().zip(drun).zip(dxr) {
                        let xhat = (v - mean) * r;
                        *o = r * (d * gc - a - xhat * b);
                    }
                }
                (dgamma, dbeta)
            })
            .reduce(zeros, |(mut g1, mut b1), (g2, b2)| {
                for (a, b) in g1.iter_mut().zip(g2).chain(b1.iter_mut().zip(b2)) {
                    *a += b;
                }
                (g1, b1)
            });
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), device)?),
            Some(Tensor::from_vec(dbeta, gamma.shape(), device)?),
        ))
    }
}

/// `x · σ(1.702 x)`, CLIP's `quick_gelu`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * sigmoid(&(x * 1.702)?)?)?)
}

/// `1 / (1 + e⁻ˣ)`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// `x @ weightᵀ + bias` over the last dimension (`weight` `(out, in)`, as PyTorch stores it).
///
/// The leading dimensions are flattened into one matrix product, so the weights' gradient is
/// one product too (not a batch of them summed); on the CPU the bias is added by [`AddRows`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inp = dims.pop().unwrap_or(1);
    let rows = dims.iter().product::<usize>();
    let y = x.reshape((rows, inp))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) if fused(&y) => y.apply_op2(&b.flatten_all()?, AddRows)?,
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    dims.push(y.dim(1)?);
    Ok(y.reshape(dims)?)
}

/// `y (rows, d) + b (d)` as one op whose bias gradient is a sum of contiguous rows (candle's
/// gradient of a broadcast sums over the leading dimension a value at a time).
#[derive(Debug, Clone, Copy)]
struct AddRows;

impl candle_core::CustomOp2 for AddRows {
    fn name(&self) -> &'static str {
        "studio-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (y, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        if b.is_empty() || l1.shape().dims().last() != Some(&b.len()) {
            return Err(candle_core::Error::Msg(format!(
                "a bias of {} added to rows of {} values",
                b.len(),
                y.len()
            )));
        }
        let mut out = y.to_vec();
        for row in out.chunks_exact_mut(b.len()) {
            for (o, v) in row.iter_mut().zip(b) {
                *o += v;
            }
        }
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = values(grad).map_err(candle_core::Error::wrap)?;
        let mut db = vec![0f32; b.elem_count()];
        for row in g.chunks_exact(db.len()) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// Correlation of `x` `(n, c, h, w)` with `weight` `(o, c, k, k)`, stride 1, zero padding
/// `pad` (no bias): see [`conv_biased`].
pub fn conv(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    conv_biased(x, weight, None, pad, 1)
}

/// Correlation of `x` `(n, c, h, w)` with `weight` `(o, c, k, k)` plus a per-channel `bias`
/// `(o)`, zero padding `pad`, a stride: one matrix product of the weights `(o, c·k²)` with the
/// windows' columns `(c·k², n·h'·w')`, so the weights' gradient is one matrix product too and
/// the bias's a sum over contiguous rows (candle's CPU gradient of `conv2d` is a slow
/// transposed convolution). On the CPU the columns are gathered by [`Im2Col`], whose gradient
/// scatters them back; elsewhere by an `index_select`.
pub fn conv_biased(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
    stride: usize,
) -> Result<Tensor> {
    conv_gathering(x, weight, bias, pad, stride, x.device().is_cpu())
}

/// [`conv_biased`], the columns gathered by [`Im2Col`] (`native`) or by an `index_select`.
fn conv_gathering(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
    stride: usize,
    native: bool,
) -> Result<Tensor> {
    let (o, c, k, kw) = weight.dims4()?;
    let (n, cx, h, w) = x.dims4()?;
    if kw != k || cx != c || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
        return Err(crate::error::Error::InvalidParameter(format!(
            "a {k}×{kw} convolution of {c} channels with stride {stride} and padding {pad} of \
             a {h}×{w} image of {cx} channels"
        )));
    }
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let cols = if k == 1 && stride == 1 && pad == 0 {
        x.transpose(0, 1)?.reshape((c, n * h * w))?
    } else if native {
        x.contiguous()?
            .apply_op1(Im2Col::new((n, c, h, w), k, pad, stride))?
    } else {
        gathered_columns(x, k, pad, stride, (ho, wo))?
    };
    let y = weight.reshape((o, c * k * k))?.matmul(&cols)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((o, 1))?)?,
        None => y,
    };
    Ok(y.reshape((o, n, ho, wo))?.transpose(0, 1)?.contiguous()?)
}

/// The columns of [`conv_biased`] by one `index_select` (any device).
fn gathered_columns(
    x: &Tensor,
    k: usize,
    pad: usize,
    stride: usize,
    (ho, wo): (usize, usize),
) -> Result<Tensor> {
    let x = if pad > 0 {
        x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
    } else {
        x.clone()
    };
    let (n, c, h, w) = x.dims4()?;
    // For each tap (i, j), the flat positions of the window's pixels.
    let mut index = Vec::with_capacity(k * k * ho * wo);
    for i in 0..k {
        for j in 0..k {
            for y in 0..ho {
                for xx in 0..wo {
                    index.push(((y * stride + i) * w + xx * stride + j) as u32);
                }
            }
        }
    }
    let index = Tensor::from_vec(index, k * k * ho * wo, x.device())?;
    Ok(x.reshape((n, c, h * w))?
        .index_select(&index, 2)?
        .reshape((n, c * k * k, ho * wo))?
        .transpose(0, 1)?
        .reshape((c * k * k, n * ho * wo))?)
}

/// The window columns of a convolution as a candle op on the CPU: `(n, c, h, w)` →
/// `(c·k², n·h'·w')`, row `(channel, tap row, tap column)`, column `(image, y, x)`, zeros
/// where a window reaches into the padding. Its gradient is [`Col2Im`], the scatter-add back.
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    /// The input's `(n, c, h, w)`.
    dims: (usize, usize, usize, usize),
    k: usize,
    pad: usize,
    stride: usize,
    /// The output's height and width.
    out: (usize, usize),
}

impl Im2Col {
    fn new(dims: (usize, usize, usize, usize), k: usize, pad: usize, stride: usize) -> Self {
        let (_, _, h, w) = dims;
        let out = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        Self {
            dims,
            k,
            pad,
            stride,
            out,
        }
    }

    /// Calls `visit(column, pixel, len)` for every run of window pixels of tap `(i, j)` that
    /// lie inside image `b`'s plane: the row's `cols[column..column + len]` pairs with the
    /// plane's `x[pixel + m·stride]` for `m < len` (the row of `(channel, i, j)` holds
    /// `n·h'·w'` values; a plane is one channel of one image).
    fn runs(&self, i: usize, j: usize, b: usize, mut visit: impl FnMut(usize, usize, usize)) {
        let (_, _, h, w) = self.dims;
        let (ho, wo) = self.out;
        let (pad, stride) = (self.pad, self.stride);
        // Output columns whose input column `xx·stride + j − pad` is inside.
        if j >= w + pad {
            return;
        }
        let lo = pad.saturating_sub(j).div_ceil(stride);
        let hi = ((w + pad - j - 1) / stride + 1).min(wo);
        if lo >= hi {
            return;
        }
        for y in 0..ho {
            let sy = y * stride + i;
            if sy < pad || sy - pad >= h {
                continue;
            }
            let col = (b * ho + y) * wo + lo;
            let src = (sy - pad) * w + lo * stride + j - pad;
            visit(col, src, hi - lo);
        }
    }

    fn row_len(&self) -> usize {
        self.dims.0 * self.out.0 * self.out.1
    }

    fn columns(&self) -> usize {
        let (n, c, _, _) = self.dims;
        c * self.k * self.k * n * self.out.0 * self.out.1
    }
}

fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a training op needs a contiguous tensor".into()))?;
    Ok(&storage.as_slice::<f32>()?[a..b])
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "studio-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let mut cols = vec![0f32; self.columns()];
        let (n, c, h, w) = self.dims;
        let (k, stride) = (self.k, self.stride);
        // One row per (channel, tap), in parallel.
        cols.par_chunks_mut(self.row_len())
            .enumerate()
            .for_each(|(r, row)| {
                let (ci, i, j) = (r / (k * k), r / k % k, r % k);
                for b in 0..n {
                    let plane = &x[(b * c + ci) * h * w..][..h * w];
                    self.runs(i, j, b, |col, src, len| {
                        let dst = &mut row[col..col + len];
                        if stride == 1 {
                            dst.copy_from_slice(&plane[src..src + len]);
                        } else {
                            for (m, d) in dst.iter_mut().enumerate() {
                                *d = plane[src + m * stride];
                            }
                        }
                    });
                }
            });
        let (n, c, _, _) = self.dims;
        let shape = (c * self.k * self.k, n * self.out.0 * self.out.1);
        Ok((candle_core::CpuStorage::F32(cols), shape.into()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        grad_res
            .contiguous()?
            .apply_op1_no_bwd(&Col2Im(*self))
            .map(Some)
    }
}

/// The gradient of [`Im2Col`]: each column value added back onto the pixel it came from.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Im2Col);

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "studio-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let cols = contiguous_f32(storage, layout)?;
        let op = &self.0;
        let (n, c, h, w) = op.dims;
        let (k, stride, row_len) = (op.k, op.stride, op.row_len());
        let mut x = vec![0f32; n * c * h * w];
        // One plane (image, channel) at a time, in parallel: its taps' rows added back.
        x.par_chunks_mut(h * w).enumerate().for_each(|(p, plane)| {
            let (b, ci) = (p / c, p % c);
            for i in 0..k {
                for j in 0..k {
                    let row = &cols[((ci * k + i) * k + j) * row_len..][..row_len];
                    op.runs(i, j, b, |col, src, len| {
                        let from = &row[col..col + len];
                        if stride == 1 {
                            for (d, v) in plane[src..src + len].iter_mut().zip(from) {
                                *d += v;
                            }
                        } else {
                            for (m, v) in from.iter().enumerate() {
                                plane[src + m * stride] += v;
                            }
                        }
                    });
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(x), (n, c, h, w).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }

    #[test]
    fn the_differentiable_ops_match_candles_kernels() {
        let mut rng = StdRng::seed_from_u64(3);
        let x = normal(&mut rng, &[2, 5, 7], 2.0).expect("x");
        let sm = candle_nn::ops::softmax_last_dim(&x).expect("softmax");
        assert!(max_diff(&softmax_last(&x).expect("ours"), &sm) < 1e-6);
        let w = normal(&mut rng, &[7], 1.0).expect("w");
        let b = normal(&mut rng, &[7], 1.0).expect("b");
        let ln = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).expect("layer norm");
        assert!(max_diff(&layer_norm(&x, &w, &b, 1e-5).expect("ours"), &ln) < 1e-5);
        let img = normal(&mut rng, &[2, 3, 6, 5], 1.0).expect("img");
        let k = normal(&mut rng, &[4, 3, 3, 3], 1.0).expect("k");
        let theirs = img.conv2d(&k, 1, 1, 1, 1).expect("conv2d");
        assert!(max_diff(&conv(&img, &k, 1).expect("ours"), &theirs) < 1e-4);
        let theirs = img.conv2d(&k, 0, 2, 1, 1).expect("strided");
        let ours = conv_biased(&img, &k, None, 0, 2).expect("ours");
        assert!(max_diff(&ours, &theirs) < 1e-4);
        // Channels that do not match, a non-square kernel and a window larger than the
        // padded image are refused, not read out of bounds.
        let k4 = normal(&mut rng, &[4, 4, 3, 3], 1.0).expect("k4");
        assert!(conv_biased(&img, &k4, None, 1, 1).is_err());
        let k23 = normal(&mut rng, &[4, 3, 2, 3], 1.0).expect("k23");
        assert!(conv_biased(&img, &k23, None, 1, 1).is_err());
        let k9 = normal(&mut rng, &[4, 3, 9, 9], 1.0).expect("k9");
        assert!(conv_biased(&img, &k9, None, 1, 1).is_err());
        let gw = normal(&mut rng, &[4], 1.0).expect("gw");
        let gb = normal(&mut rng, &[4], 1.0).expect("gb");
        let x4 = normal(&mut rng, &[2, 4, 3, 5], 2.0).expect("x4");
        let gn = candle_nn::GroupNorm::new(gw.clone(), gb.clone(), 4, 2, 1e-6).expect("gn");
        let theirs = candle_core::Module::forward(&gn, &x4).expect("group norm");
        assert!(max_diff(&group_norm(&x4, 2, &gw, &gb, 1e-6).expect("ours"), &theirs) < 1e-5);
        let k1 = normal(&mut rng, &[4, 3, 1, 1], 1.0).expect("k1");
        let theirs = img.conv2d(&k1, 0, 1, 1, 1).expect("conv2d");
        assert!(max_diff(&conv(&img, &k1, 0).expect("ours"), &theirs) < 1e-5);
    }

    /// The CPU's column op and the `index_select` gather give the same outputs and the same
    /// gradients (of the input, the weights and the bias), padded, strided and 1×1.
    #[test]
    fn the_native_columns_match_the_gathered_ones_forward_and_backward() {
        let mut rng = StdRng::seed_from_u64(5);
        for (c, o, k, pad, stride, h, w) in [
            (3, 4, 3, 1, 1, 6, 5),
            (3, 4, 3, 1, 2, 7, 6),
            (2, 3, 3, 0, 2, 5, 5),
            (2, 5, 1, 0, 1, 4, 3),
            (2, 2, 4, 1, 2, 6, 7),
        ] {
            let x =
                candle_core::Var::from_tensor(&normal(&mut rng, &[2, c, h, w], 1.0).expect("x"))
                    .expect("var");
            let wt =
                candle_core::Var::from_tensor(&normal(&mut rng, &[o, c, k, k], 1.0).expect("w"))
                    .expect("var");
            let b = candle_core::Var::from_tensor(&normal(&mut rng, &[o], 1.0).expect("b"))
                .expect("var");
            let theirs = x
                .as_tensor()
                .conv2d(&wt, pad, stride, 1, 1)
                .expect("conv2d")
                .broadcast_add(&b.reshape((1, o, 1, 1)).expect("b"))
                .expect("add");
            let target = normal(&mut rng, theirs.dims(), 1.0).expect("target");
            let mut grads = Vec::new();
            for native in [true, false] {
                let y = conv_gathering(&x, &wt, Some(&b), pad, stride, native).expect("conv");
                assert!(max_diff(&y, &theirs) < 1e-4, "{native} {k} {pad} {stride}");
                let loss = (y * &target).expect("mul").sum_all().expect("sum");
                let g = loss.backward().expect("backward");
                grads.push(
                    [x.as_tensor(), wt.as_tensor(), b.as_tensor()]
                        .map(|v| g.get(v).expect("grad").clone()),
                );
            }
            for (a, b) in grads[0].iter().zip(&grads[1]) {
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-4, "k {k} pad {pad} stride {stride}");
            }
        }
    }

    /// The fused norms and softmax give the composed ops' outputs and gradients.
    #[test]
    fn the_fused_norms_and_softmax_match_the_composed_ones_forward_and_backward() {
        let mut rng = StdRng::seed_from_u64(9);
        let var = |rng: &mut StdRng, shape: &[usize], scale: f64| {
            candle_core::Var::from_tensor(&normal(rng, shape, scale).expect("normal")).expect("var")
        };
        let x = var(&mut rng, &[3, 6, 4, 5], 2.0);
        let (gw, gb) = (var(&mut rng, &[6], 1.0), var(&mut rng, &[6], 1.0));
        let target = normal(&mut rng, &[3, 6, 4, 5], 1.0).expect("target");
        let lx = var(&mut rng, &[2, 7, 8], 3.0);
        let (lw, lb) = (var(&mut rng, &[8], 1.0), var(&mut rng, &[8], 1.0));
        let ltarget = normal(&mut rng, &[2, 7, 8], 1.0).expect("target");
        let mut runs = Vec::new();
        for fused in [true, false] {
            let y = group_norm_on(&x, 3, &gw, &gb, 1e-5, fused).expect("group norm");
            let ly = layer_norm_on(&lx, &lw, &lb, 1e-5, fused).expect("layer norm");
            let sy = softmax_last_on(&lx, fused).expect("softmax");
            let dot = |a: &Tensor, b: &Tensor| (a * b).expect("mul").sum_all().expect("sum");
            let loss = ((dot(&y, &target) + dot(&ly, &ltarget)).expect("add") + dot(&sy, &ltarget))
                .expect("add");
            let g = loss.backward().expect("backward");
            let mut out = vec![y, ly, sy];
            for v in [&x, &gw, &gb, &lx, &lw, &lb] {
                out.push(g.get(v.as_tensor()).expect("grad").clone());
            }
            runs.push(out);
        }
        for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            assert_eq!(a.dims(), b.dims());
            assert!(max_diff(a, b) < 1e-4, "output {i}: {}", max_diff(a, b));
        }
    }

    /// The linear layer (its rows flattened, its bias added by [`AddRows`]) gives the
    /// broadcast product's output and gradients.
    #[test]
    fn the_linear_layer_matches_the_broadcast_product() {
        let mut rng = StdRng::seed_from_u64(11);
        let var = |rng: &mut StdRng, shape: &[usize]| {
            candle_core::Var::from_tensor(&normal(rng, shape, 1.0).expect("normal")).expect("var")
        };
        let (x, w, b) = (
            var(&mut rng, &[2, 3, 5]),
            var(&mut rng, &[4, 5]),
            var(&mut rng, &[4]),
        );
        let target = normal(&mut rng, &[2, 3, 4], 1.0).expect("target");
        let theirs = x
            .broadcast_matmul(&w.t().expect("t"))
            .expect("matmul")
            .broadcast_add(&b)
            .expect("add");
        let ours = linear(&x, &w, Some(&b)).expect("linear");
        assert_eq!(ours.dims(), &[2, 3, 4]);
        let mut grads = Vec::new();
        for y in [&ours, &theirs] {
            let g = (y * &target)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bw");
            grads.push([&x, &w, &b].map(|v| g.get(v.as_tensor()).expect("grad").clone()));
        }
        assert!(max_diff(&ours, &theirs) < 1e-5);
        for (a, b) in grads[0].iter().zip(&grads[1]) {
            assert!(max_diff(a, b) < 1e-4);
        }
    }
}
