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

use super::{Epilogue, KernelPath, PackedWeights, rows_product, with_values};
use crate::error::{Error, Result};

/// Scores one block may hold (floats): 256 KiB, so a block's scores stay in L2 between the
/// two products and the softmax (4 MiB blocks took twice as long, in memory traffic).
const BLOCK_SCORES: usize = 1 << 16;

/// Each row of `scores` (rows of `n`) replaced by its softmax. The maximum and the sum run
/// in 16 independent lanes and the exponentials in a loop of their own, so all three passes
/// vectorize (a serial `f32` sum or max chain does not).
fn softmax_rows(scores: &mut [f32], n: usize) {
    const LANES: usize = 16;
    scores.chunks_mut(n).for_each(|row| {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks
            .remainder()
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v);
            }
        }
        let max = lanes.iter().copied().fold(tail, f32::max);
        for v in row.iter_mut() {
            *v = crate::models::cpu_ops::exp(*v - max);
        }
        let mut lanes = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
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
    with_values(&q, |qv| {
        with_values(&k, |kv| {
            with_values(&v, |vv| -> Result<()> {
                // Keys (times the scale) and transposed values of every head, packed once.
                let packed = (0..b * h)
                    .into_par_iter()
                    .map(|bh| -> Result<(PackedWeights, PackedWeights)> {
                        let kh = &kv[bh * m * d..(bh + 1) * m * d];
                        let vh = &vv[bh * m * d..(bh + 1) * m * d];
                        let mut keys = PackedWeights::new(path);
                        keys.pack(m, d, 1, |o, i, _| kh[o * d + i] * scale)?;
                        let mut values = PackedWeights::new(path);
                        values.pack(d, m, 1, |o, i, _| vh[i * d + o])?;
                        Ok((keys, values))
                    })
                    .collect::<Result<Vec<_>>>()?;
                // One task per block of one head's queries, each with its own scores.
                out.par_chunks_mut(n * d)
                    .zip(qv.par_chunks(n * d))
                    .zip(&packed)
                    .try_for_each(|((oh, qh), (keys, values))| {
                        oh.par_chunks_mut(block * d)
                            .zip(qh.par_chunks(block * d))
                            .try_for_each_init(Vec::new, |scores, (ob, qb)| {
                                let rows = qb.len() / d;
                                scores.resize(rows * m, 0.0);
                                rows_product(keys, qb, rows, scores, &Epilogue::NONE)?;
                                softmax_rows(scores, m);
                                rows_product(values, scores, rows, ob, &Epilogue::NONE)
                            })
                    })
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
