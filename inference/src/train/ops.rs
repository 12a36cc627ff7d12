//! Differentiable building blocks the trainers share. candle's fused CPU kernels (softmax,
//! layer norm, RMSNorm, RoPE) have no backward pass, and the gradient of its `conv2d` is a
//! slow transposed convolution on the CPU; these are written with ops whose gradients candle
//! computes well.

use candle_core::{D, Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;

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
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension, with weight and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
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
    let (n, c, h, w) = x.dims4()?;
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

/// `x · σ(1.702 x)`, CLIP's `quick_gelu`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * sigmoid(&(x * 1.702)?)?)?)
}

/// `1 / (1 + e⁻ˣ)`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// `x @ weightᵀ + bias` over the last dimension (`weight` `(out, in)`, as PyTorch stores it).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Correlation of `x` `(n, c, h, w)` with `weight` `(o, c, k, k)`, stride 1, zero padding
/// `pad`: the `k²` shifted views gathered by one `index_select` and one matrix product, whose
/// gradients are a scatter-add and matrix products (candle's CPU transposed convolution, the
/// gradient of `conv2d`, is slow).
pub fn conv(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    conv_strided(x, weight, pad, 1)
}

/// As [`conv`], with a stride.
pub fn conv_strided(x: &Tensor, weight: &Tensor, pad: usize, stride: usize) -> Result<Tensor> {
    let (o, c, k, _) = weight.dims4()?;
    let x = if pad > 0 {
        x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
    } else {
        x.clone()
    };
    let (n, _, h, w) = x.dims4()?;
    let (ho, wo) = ((h - k) / stride + 1, (w - k) / stride + 1);
    let cols = if k == 1 && stride == 1 {
        x.reshape((n, c, ho * wo))?
    } else {
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
        x.reshape((n, c, h * w))?
            .index_select(&index, 2)?
            .reshape((n, c * k * k, ho * wo))?
    };
    let y = weight.reshape((o, c * k * k))?.broadcast_matmul(&cols)?;
    Ok(y.reshape((n, o, ho, wo))?)
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
        assert!(max_diff(&conv_strided(&img, &k, 0, 2).expect("ours"), &theirs) < 1e-4);
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
}
