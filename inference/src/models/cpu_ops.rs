//! The f32 vector math of the CPU transformer steps between the matrix products (which run on
//! [`crate::quant`]'s kernels): RMSNorm, rotary embeddings, SwiGLU/GeGLU, softmax attention
//! (with Gemma's soft cap and sliding window).
//!
//! Plain loops over slices, written so the compiler vectorizes them (independent lanes, `exp`
//! without branches or library calls), instead of candle tensor ops: those allocate per op and
//! run large ones on candle's own spinning worker threads, which competed with the kernels'
//! threads for the cores (an eighth of a 2-thread prompt's samples were that spinning).

use rayon::prelude::*;

/// `e^x` within 2 ulp, without branches or calls, so loops over slices vectorize (libm's
/// `expf` is a call per value: 5% of a prompt's time in softmax and SiLU).
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r`, and
/// `2^n` put in the exponent bits. Inputs are clamped to where `2^n` is a normal float: below
/// −87.3 the result is the smallest normal (≈ 1.2e-38) instead of a subnormal or 0, above
/// 88.7 it is `inf`; NaN stays NaN.
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³
    let x = x.clamp(-87.336_54, 88.722_83);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // `n` is an integer in −126..=128 after the clamp: 2^n is a normal float's bits (128 gives
    // inf). Added to 1.5·2²³, `n` lands in the low mantissa bits, read back with integer
    // arithmetic that vectorizes (an `as i32` cast is a saturating scalar conversion per lane:
    // it kept softmax loops scalar).
    let bits = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f32::from_bits(bits.wrapping_add(127) << 23);
    y * scale
}

/// `Σ v` in 16 independent lanes (so the compiler vectorizes it).
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let c = v.chunks_exact(16);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `a · b` in 16 independent lanes (so the compiler vectorizes it).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out = x / rms(x) · w`, as candle's `rms_norm` computes it.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v / m * w;
    }
}

/// [`rms_norm`] of every row of `x` (rows of `w.len()` values) into the rows of `out`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| rms_norm(x, w, eps, o));
}

/// Rotates one head's values by the angles of one position: pairs `(2i, 2i + 1)` when
/// `interleaved` (llama), else `(i, i + d/2)` (qwen2's "neox" halves), as candle's `rope_i` /
/// `rope` do.
pub(crate) fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos[i] - xb * sin[i];
        x[b] = xa * sin[i] + xb * cos[i];
    }
}

/// `silu(g) · u`.
#[inline]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + exp(-g)) * u
}

/// `y = silu(g) · u` elementwise (SwiGLU), into `y`.
pub(crate) fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = silu_times(g, u);
    }
}

/// `gelu(g) · u` elementwise with GELU's tanh approximation (Gemma's GeGLU), into `y`.
pub(crate) fn geglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = gelu_times(g, u);
    }
}

/// [`geglu`] in place over `g`, split across the pool.
pub(crate) fn geglu_in_place(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 4096;
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                *g = gelu_times(*g, u);
            }
        });
}

/// `gelu_tanh(g) · u`: `0.5 g (1 + tanh(√(2/π) (g + 0.044715 g³)))`, the tanh written as
/// `1 − 2 / (e^{2z} + 1)` with the branch-free [`exp`].
#[inline]
fn gelu_times(g: f32, u: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let z = C * g.mul_add(0.044_715 * g * g, g);
    let tanh = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    0.5 * g * (1.0 + tanh) * u
}

/// [`swiglu`] in place over `g` (the gate's rows become the MLP's inner activations), split
/// across the pool.
pub(crate) fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 4096;
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                *g = silu_times(*g, u);
            }
        });
}

/// `scores ← softmax(scores)` over the whole slice.
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let inv = 1.0 / sum(scores);
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// `out = Σ_j p_j · rows_j` over the `hd`-value rows of `values` (as many as `p` has).
fn weighted_rows<'a>(p: &[f32], values: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    out.fill(0.0);
    for (&p, v) in p.iter().zip(values) {
        for (o, &v) in out.iter_mut().zip(v) {
            *o = p.mul_add(v, *o);
        }
    }
}

/// Positions per block of a transposed key cache (see [`key_scores`]).
pub(crate) const KEY_BLOCK: usize = 16;

/// Appends `scale · q · key_j` for the first `n` keys of transposed key blocks `kt`
/// (`[blocks][hd][KEY_BLOCK]`: value `d` of key `j` at
/// `(j / KEY_BLOCK · hd + d) · KEY_BLOCK + j % KEY_BLOCK`). Each score is a multiply-add chain over `d` in order (as a plain dot
/// product), `KEY_BLOCK` keys per vector and four blocks at a time so the chains do not wait on
/// each other: no horizontal sum per key, as a dot product per key would need.
pub(crate) fn key_scores(q: &[f32], kt: &[f32], n: usize, scale: f32, scores: &mut Vec<f32>) {
    const B: usize = KEY_BLOCK;
    let hd = q.len();
    for (g, group) in kt[..n.div_ceil(B) * B * hd].chunks(4 * B * hd).enumerate() {
        let mut acc = [[0f32; B]; 4];
        let mut blocks: [&[f32]; 4] = [&[]; 4];
        let mut count = 0;
        for (slot, blk) in blocks.iter_mut().zip(group.chunks_exact(B * hd)) {
            *slot = blk;
            count += 1;
        }
        for (d, &qv) in q.iter().enumerate() {
            for (a, blk) in acc.iter_mut().zip(&blocks[..count]) {
                let row = &blk[d * B..(d + 1) * B];
                for j in 0..B {
                    a[j] = qv.mul_add(row[j], a[j]);
                }
            }
        }
        for (b, a) in acc.iter().enumerate().take(count) {
            let first = (4 * g + b) * B;
            let take = (n - first).min(B);
            scores.extend(a[..take].iter().map(|s| s * scale));
        }
    }
}

/// How attention turns `q · k` into weights beyond the softmax: the scale (`1/√head_dim`, or
/// Gemma's), Gemma 2's soft cap (`cap · tanh(s / cap)`) and a sliding window (a query sees the
/// last `window` positions, itself included).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scores {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

impl Scores {
    /// Plain scaled dot-product attention over a head of `hd` values.
    pub(crate) fn plain(hd: usize) -> Self {
        Self {
            scale: 1.0 / (hd as f32).sqrt(),
            softcap: None,
            window: None,
        }
    }

    /// Caps `scores` (the scaled scores of positions `0..scores.len()` for a query at the last
    /// one) and returns the first position the query sees.
    fn shape(&self, scores: &mut [f32]) -> usize {
        if let Some(cap) = self.softcap {
            for s in scores.iter_mut() {
                *s = cap * (*s / cap).tanh();
            }
        }
        self.window
            .map_or(0, |w| scores.len().saturating_sub(w.max(1)))
    }
}

/// One query head against the `n` cached positions of its kv head (`kt`: transposed key
/// blocks, `values`: `n × hd`) and the new position (`k_new`, `v_new`): softmax of the scores
/// shaped by `how`, then the weighted sum of the values into `out`.
#[allow(clippy::too_many_arguments)] // one head's attention step
pub(crate) fn attend(
    q: &[f32],
    kt: &[f32],
    n: usize,
    values: &[f32],
    [k_new, v_new]: [&[f32]; 2],
    how: Scores,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    scores.clear();
    key_scores(q, kt, n, how.scale, scores);
    scores.push(dot(q, k_new) * how.scale);
    let first = how.shape(scores);
    let seen = &mut scores[first..];
    softmax(seen);
    weighted_rows(
        seen,
        values.chunks_exact(hd).skip(first).chain([v_new]),
        out,
    );
}

/// Query rows per unit of [`attend_causal`]'s work.
const QUERY_BLOCK: usize = 32;

/// Causal attention of `t` new positions `offset..offset + t` (a prompt), scores shaped by
/// `how`: `q` is `t` rows of
/// `n_head · hd` values; head `h` reads kv head `h / (n_head / n_kv)`, whose `offset + t`
/// cached positions (the new ones included) `kv` gives as (transposed key blocks, values
/// `len × hd`). Returns the heads' outputs, `t` rows of `n_head · hd`.
///
/// Units of work (a head and a block of query rows) are spread over the pool; each query row
/// is [`key_scores`] over its visible positions, a softmax and a weighted sum of the values.
#[allow(clippy::too_many_arguments)] // the shapes of one attention call
pub(crate) fn attend_causal<'a>(
    q: &[f32],
    t: usize,
    offset: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    how: Scores,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
) -> Vec<f32> {
    let qd = n_head * hd;
    let groups = n_head / n_kv;
    let blocks = t.div_ceil(QUERY_BLOCK);
    let units: Vec<Vec<f32>> = (0..n_head * blocks)
        .into_par_iter()
        .map(|u| {
            let (head, block) = (u / blocks, u % blocks);
            let rows = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(t);
            let (kt, values) = kv(head / groups);
            let mut out = vec![0f32; rows.len() * hd];
            let mut scores = Vec::with_capacity(offset + rows.end);
            for (i, o) in rows.zip(out.chunks_exact_mut(hd)) {
                let qi = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
                scores.clear();
                key_scores(qi, kt, offset + i + 1, how.scale, &mut scores);
                let first = how.shape(&mut scores);
                softmax(&mut scores[first..]);
                weighted_rows(&scores[first..], values.chunks_exact(hd).skip(first), o);
            }
            out
        })
        .collect();
    let mut att = vec![0f32; t * qd];
    for (u, out) in units.iter().enumerate() {
        let (head, block) = (u / blocks, u % blocks);
        for (r, o) in out.chunks_exact(hd).enumerate() {
            let i = block * QUERY_BLOCK + r;
            att[i * qd + head * hd..i * qd + (head + 1) * hd].copy_from_slice(o);
        }
    }
    att
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_saturates() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.001_37;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0).to_bits(), 1f32.to_bits());
        assert!(exp(-1000.0) < 1.2e-38);
        assert!(exp(1000.0).is_infinite());
        assert!(exp(f32::NAN).is_nan());
        let tiny = exp(f32::NEG_INFINITY);
        assert!(tiny > 0.0 && tiny < 1.2e-38, "{tiny}");
    }

    /// Plain causal attention, one (head, row) at a time in f64.
    #[allow(clippy::too_many_arguments)] // the shapes of one attention call
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        offset: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Vec<f32> {
        let len = offset + t;
        let mut out = vec![0f32; t * nh * hd];
        for h in 0..nh {
            let kh = h / (nh / nkv);
            for i in 0..t {
                let qi = &q[i * nh * hd + h * hd..][..hd];
                let s: Vec<f64> = (0..=offset + i)
                    .map(|j| {
                        let kj = &k[(kh * len + j) * hd..][..hd];
                        qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for d in 0..hd {
                    let y: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p * f64::from(v[(kh * len + j) * hd + d]))
                        .sum();
                    out[i * nh * hd + h * hd + d] = (y / total) as f32;
                }
            }
        }
        out
    }

    /// Keys `[heads][len][hd]` as transposed blocks, each head's padded to whole blocks.
    fn transpose_keys(k: &[f32], heads: usize, len: usize, hd: usize) -> Vec<f32> {
        let blocks = len.next_multiple_of(KEY_BLOCK);
        let mut kt = vec![f32::NAN; heads * blocks * hd];
        for h in 0..heads {
            for j in 0..len {
                for d in 0..hd {
                    let at = (h * blocks + j / KEY_BLOCK * KEY_BLOCK) * hd + d * KEY_BLOCK;
                    kt[at + j % KEY_BLOCK] = k[(h * len + j) * hd + d];
                }
            }
        }
        kt
    }

    #[test]
    fn causal_attention_matches_a_plain_one() {
        // Awkward sizes: more rows than a query block, an odd head size, a cached prefix.
        let (nh, nkv, hd) = (6, 2, 22);
        for (t, offset) in [(1, 0), (5, 0), (37, 0), (40, 11)] {
            let len = offset + t;
            let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5;
            let q: Vec<f32> = (0..t * nh * hd).map(val).collect();
            let k: Vec<f32> = (0..nkv * len * hd).map(|i| val(i + 13)).collect();
            let v: Vec<f32> = (0..nkv * len * hd).map(|i| val(i + 29)).collect();
            let kt = transpose_keys(&k, nkv, len, hd);
            let blocks = len.next_multiple_of(KEY_BLOCK) * hd;
            let got = attend_causal(&q, t, offset, nh, nkv, hd, Scores::plain(hd), |h| {
                (
                    &kt[h * blocks..(h + 1) * blocks],
                    &v[h * len * hd..(h + 1) * len * hd],
                )
            });
            let want = reference(&q, &k, &v, t, offset, nh, nkv, hd);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "t {t} offset {offset}: {err}");
        }
    }
}
