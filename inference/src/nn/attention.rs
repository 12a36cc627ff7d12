//! Memory-efficient attention on the packed micro-kernels: `softmax(q·kᵀ·scale)·v` computed
//! a block of queries at a time, so only `block × keys` scores ever exist (the full
//! `queries × keys` matrix of a 512² UNet's first level is 2 × 8 × 4096² floats, 512 MiB).
//!
//! Per (batch, head): the keys (times the scale) are packed once as the "weights" of a 1×1
//! convolution whose "pixels" are the queries, and the values, transposed, as those of a
//! second one whose "pixels" are the rows of probabilities. Each row's softmax is exact (all
//! keys of a query are in its block's scores); the exponential is Studio's vectorizable one.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{ConvGeom, Epilogue, KernelPath, PackedWeights, conv, with_values};
use crate::error::{Error, Result};

/// Scores one block may hold (floats): 4 MiB.
const BLOCK_SCORES: usize = 1 << 20;

/// A 1×1 "convolution" over `rows` rows of `cin` values into rows of `cout` values.
fn rows_product(w: &PackedWeights, input: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
    let geom = ConvGeom {
        taps: &[0],
        batch: 1,
        in_batch: 0,
        out_batch: 0,
        out_h: 1,
        out_w: rows,
        in_base: 0,
        in_row: 0,
        in_pix: w.cin(),
        out_base: 0,
        out_row: 0,
        out_pix: w.cout(),
    };
    conv(w, input, &geom, out, &Epilogue::NONE)
}

/// Each row of `scores` (rows of `n`) replaced by its softmax.
fn softmax_rows(scores: &mut [f32], n: usize) {
    scores.par_chunks_mut(n).for_each(|row| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = crate::models::cpu_ops::exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    });
}

/// `softmax(q·kᵀ·scale)·v` for `q` `(b, h, n, d)`, `k` and `v` `(b, h, m, d)`, f32 on the CPU;
/// `(b, h, n, d)` out.
pub fn attention(
    path: KernelPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let (kb, kh, m, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims4()? != (b, h, m, d) || m == 0 || d == 0 {
        return Err(Error::InvalidParameter(format!(
            "attention over q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let to_f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let (q, k, v) = (to_f32(q)?, to_f32(k)?, to_f32(v)?);
    let block = (BLOCK_SCORES / m).clamp(1, n.max(1));
    let mut out = vec![0f32; b * h * n * d];
    let mut scores = vec![0f32; block * m];
    let mut keys = PackedWeights::new(path);
    let mut values = PackedWeights::new(path);
    with_values(&q, |qv| {
        with_values(&k, |kv| {
            with_values(&v, |vv| -> Result<()> {
                for bh in 0..b * h {
                    let kh = &kv[bh * m * d..(bh + 1) * m * d];
                    let vh = &vv[bh * m * d..(bh + 1) * m * d];
                    keys.pack(m, d, 1, |o, i, _| kh[o * d + i] * scale)?;
                    values.pack(d, m, 1, |o, i, _| vh[i * d + o])?;
                    for r0 in (0..n).step_by(block) {
                        let rows = block.min(n - r0);
                        let qa = (bh * n + r0) * d;
                        let s = &mut scores[..rows * m];
                        rows_product(&keys, &qv[qa..qa + rows * d], rows, s)?;
                        softmax_rows(s, m);
                        rows_product(&values, s, rows, &mut out[qa..qa + rows * d])?;
                    }
                }
                Ok(())
            })
        })
    })????;
    Ok(Tensor::from_vec(out, (b, h, n, d), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{max_abs_diff, values};
    use candle_core::Device;

    #[test]
    fn attention_matches_the_plain_formula() {
        // Self-attention with more keys than one block holds rows for, and cross-attention
        // with 77 keys; head sizes off the vector widths.
        for (b, h, n, m, d) in [(2, 3, 37, 1100, 40), (1, 2, 50, 77, 64), (1, 1, 1, 1, 3)] {
            let q =
                Tensor::from_vec(values(b * h * n * d, 1), (b, h, n, d), &Device::Cpu).expect("q");
            let k =
                Tensor::from_vec(values(b * h * m * d, 2), (b, h, m, d), &Device::Cpu).expect("k");
            let v =
                Tensor::from_vec(values(b * h * m * d, 3), (b, h, m, d), &Device::Cpu).expect("v");
            let scale = 1.0 / (d as f32).sqrt();
            let scores = (q.matmul(&k.t().expect("t")).expect("qk") * f64::from(scale)).expect("s");
            let want = candle_nn::ops::softmax_last_dim(&scores)
                .expect("softmax")
                .matmul(&v)
                .expect("pv");
            for path in KernelPath::available_paths() {
                let got = attention(path, &q, &k, &v, scale).expect("attention");
                let d = max_abs_diff(&got, &want);
                assert!(d < 2e-5, "{path} ({b},{h},{n},{m}): {d}");
            }
        }
        let q = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu).expect("q");
        let k = Tensor::zeros((1, 1, 3, 5), DType::F32, &Device::Cpu).expect("k");
        assert!(attention(KernelPath::Scalar, &q, &k, &k, 1.0).is_err());
    }
}
