//! Memory-efficient attention on the packed micro-kernels: `softmax(q·kᵀ·scale)·v` computed
//! a block of queries at a time against chunks of keys with an online softmax (flash
//! attention), so only `chunk × block` scores ever exist (the full `queries × keys` matrix of
//! a 512² UNet's first level is 2 × 8 × 4096² floats, 512 MiB). See [`attend`] for how the
//! two products map onto the micro-kernels; the exponential is Studio's vectorizable one.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::KernelPath;
use super::conv::{PANEL_BYTES, TileArgs, run_tile, tile};
use super::layers::{Pool, Pooled};
use crate::error::{Error, Result};

/// Buffers the work items reuse from block to block (one set per worker task).
#[derive(Default)]
struct Scratch {
    /// The block's queries times the scale, transposed: `d × NR`.
    queries: Vec<f32>,
    /// Scores, then probabilities, of one chunk of keys: `keys × NR`.
    scores: Vec<f32>,
    /// The block's unnormalized output, transposed: `d × NR`.
    acc: Vec<f32>,
    /// Per query: the running maximum score and the running sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The shape of one attention: `batch` sequences of `n` queries and `m` keys, `heads` heads
/// of `d` values each, every row holding all heads (`heads · d` values, token-major).
#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    d: usize,
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
    if (kb, kh, kd) != (b, h, d) || v.dims4()? != (b, h, m, d) {
        return Err(mismatch(q, k, v));
    }
    // Head-major `(b, h, ·, d)` is token-major with `b·h` sequences of one head each.
    let shape = Shape {
        batch: b * h,
        n,
        m,
        heads: 1,
        d,
    };
    let out = attend_tensors(path, q, k, v, shape, scale)?;
    Ok(Tensor::from_vec(out, (b, h, n, d), q.device())?)
}

/// Multi-head attention over token-major rows: `q` `(b, n, heads·d)`, `k` and `v`
/// `(b, m, heads·d)`, f32 on the CPU; `(b, n, heads·d)` out. The layout the projections
/// produce and consume, so no head is split out or merged back by a copy.
pub fn attention_heads(
    path: KernelPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (b, n, hd) = q.dims3()?;
    let (kb, m, khd) = k.dims3()?;
    if (kb, khd) != (b, hd) || v.dims3()? != (b, m, hd) || heads == 0 || hd % heads != 0 {
        return Err(mismatch(q, k, v));
    }
    let shape = Shape {
        batch: b,
        n,
        m,
        heads,
        d: hd / heads,
    };
    let out = attend_tensors(path, q, k, v, shape, scale)?;
    Ok(Tensor::from_vec(out, (b, n, hd), q.device())?)
}

fn mismatch(q: &Tensor, k: &Tensor, v: &Tensor) -> Error {
    Error::InvalidParameter(format!(
        "attention over q {:?}, k {:?}, v {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    ))
}

fn attend_tensors(
    path: KernelPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: Shape,
    scale: f32,
) -> Result<Vec<f32>> {
    if shape.m == 0 || shape.d == 0 {
        return Err(mismatch(q, k, v));
    }
    if !path.available() {
        return Err(Error::InvalidParameter(format!(
            "the {path} attention kernels cannot run on this CPU"
        )));
    }
    let to_f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let (q, k, v) = (to_f32(q)?, to_f32(k)?, to_f32(v)?);
    let mut out = vec![0f32; q.elem_count()];
    with_values3(&q, &k, &v, |qv, kv, vv| {
        attend(path, qv, kv, vv, shape, scale, &mut out);
    })?;
    Ok(out)
}

fn with_values3<R>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> R,
) -> Result<R> {
    use super::with_values;
    with_values(a, |a| with_values(b, |b| with_values(c, |c| f(a, b, c))))??
}

/// The attention itself, over slices whose lengths the shape gives (checked by the callers'
/// tensor shapes; asserted here, as the unsafe writes rely on them).
///
/// Per block of `NR` queries (`NR` the micro-kernel's width) and per head, the keys are taken
/// in chunks sized so a chunk's scores stay in L1, as two products on the micro-kernels with
/// the queries in the vector lanes:
/// - scores `Sᵀ = K·(q·scale)ᵀ`: the keys are the kernel's pixels (rows read where they lie),
///   the block's transposed queries its packed weights, so `Sᵀ` comes out key by key with the
///   block's queries across the lanes, the layout the second product reads as its panel;
/// - an online softmax (flash attention): per lane, the running maximum, the rescale of what
///   has been accumulated, the exponentials and their running sum, all across lanes;
/// - `Oᵀ += Vᵀ·P`: the head's dimensions are the pixels (rows of the values, transposed once
///   per head), the probabilities the panel.
///
/// No lane or tile is wasted on head sizes off the vector width (40 in SD-1.5's UNet), and
/// each work item is one block of queries of one head of one sequence, run on one thread.
#[allow(unsafe_code)]
fn attend(
    path: KernelPath,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    scale: f32,
    out: &mut [f32],
) {
    let Shape {
        batch,
        n,
        m,
        heads,
        d,
    } = shape;
    let hd = heads * d;
    if n == 0 {
        return;
    }
    assert!(q.len() >= batch * n * hd && out.len() >= batch * n * hd);
    assert!(k.len() >= batch * m * hd && v.len() >= batch * m * hd);
    let (mr, nr) = tile(path);
    // Keys per chunk: a whole number of register tiles whose scores fill the L1 panel.
    let chunk = (mr * (PANEL_BYTES / (nr * 4 * mr)).max(1)).min(m);
    // The values of each (sequence, head) transposed to `d × m`, so a dimension's values over
    // consecutive keys are contiguous (the rows the second product broadcasts from); with
    // several heads, each head's keys gathered, so one item reads one head's keys and values
    // (a megabyte that stays cached) with its rows together. Pooled: fresh buffers of this
    // size cost a page fault per 4 KiB on every call.
    let mut vt = Pooled::take(&BUFFERS);
    vt.clear();
    vt.resize(batch * heads * d * m, 0.0);
    vt.par_chunks_mut(d * m).enumerate().for_each(|(bh, t)| {
        let (bi, hi) = (bh / heads, bh % heads);
        super::transpose(&v[bi * m * hd + hi * d..], hd, t, m, m, d);
    });
    let mut gathered;
    let keys: &[f32] = if heads == 1 {
        k
    } else {
        gathered = Pooled::take(&BUFFERS);
        gathered.clear();
        gathered.resize(batch * heads * m * d, 0.0);
        gathered
            .par_chunks_mut(m * d)
            .enumerate()
            .for_each(|(bh, dst)| {
                let (bi, hi) = (bh / heads, bh % heads);
                for (t, row) in dst.chunks_exact_mut(d).enumerate() {
                    row.copy_from_slice(&k[(bi * m + t) * hd + hi * d..][..d]);
                }
            });
        &gathered
    };
    let blocks = n.div_ceil(nr);
    let shared = SharedOut(out.as_mut_ptr());
    (0..batch * heads * blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |s, item| {
            let (bh, q0) = (item / blocks, item % blocks * nr);
            let (bi, hi) = (bh / heads, bh % heads);
            let rows = nr.min(n - q0);
            // Query `lane` of the block: its row's values of this head, in `q` and `out`.
            let at = |lane: usize| (bi * n + q0 + lane) * hd + hi * d;
            s.queries.resize(d * nr, 0.0);
            s.scores.resize(chunk * nr, 0.0);
            s.acc.resize(d * nr, 0.0);
            // The block's queries times the scale, transposed (lanes past the last query are
            // zero and never written out).
            s.queries.fill(0.0);
            for lane in 0..rows {
                for (c, &x) in q[at(lane)..][..d].iter().enumerate() {
                    s.queries[c * nr + lane] = x * scale;
                }
            }
            s.max.clear();
            s.max.resize(nr, f32::NEG_INFINITY);
            s.sum.clear();
            s.sum.resize(nr, 0.0);
            let keys = &keys[bh * m * d..][..m * d];
            let values = &vt[bh * d * m..][..d * m];
            for k0 in (0..m).step_by(chunk) {
                let kl = chunk.min(m - k0);
                let tile = (mr, nr);
                product(
                    path,
                    tile,
                    keys,
                    k0 * d,
                    d,
                    kl,
                    d,
                    &s.queries,
                    &mut s.scores,
                    true,
                );
                online_softmax(s, kl, nr, k0 == 0);
                product(
                    path,
                    tile,
                    values,
                    k0,
                    m,
                    d,
                    kl,
                    &s.scores,
                    &mut s.acc,
                    k0 == 0,
                );
            }
            for lane in 0..rows {
                // SAFETY: `at(lane) + d ≤ batch·n·hd ≤ out.len()` (asserted above), and this
                // item alone writes the `d` values of its head in its block's rows.
                let row = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(at(lane)), d) };
                let inv = 1.0 / s.sum[lane];
                for (c, x) in row.iter_mut().enumerate() {
                    *x = s.acc[c * nr + lane] * inv;
                }
            }
        });
}

/// The output of [`attend`], written by its work items at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every work item writes only its own head's values of its own block of rows.
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `SharedOut`, which is `Sync`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Transposed values and gathered keys, lent to one attention at a time.
static BUFFERS: Pool<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// `rows` rows of `out` (`NR` lanes each) get `Σ_c input[base + r·stride + c] · panel[c][lane]`
/// over `cl` values `c`, added to what they hold unless `first`: the micro-kernels, one
/// register tile of rows at a time.
#[allow(clippy::too_many_arguments, unsafe_code)]
fn product(
    path: KernelPath,
    (mr, nr): (usize, usize),
    input: &[f32],
    base: usize,
    stride: usize,
    rows: usize,
    cl: usize,
    panel: &[f32],
    out: &mut [f32],
    first: bool,
) {
    assert!(
        rows == 0 || base + (rows - 1) * stride + cl <= input.len(),
        "attention input out of bounds"
    );
    assert!(panel.len() >= cl * nr && out.len() >= rows * nr);
    let mut in_offs = [0usize; super::conv::MAX_MR];
    let mut out_offs = [0usize; super::conv::MAX_MR];
    for r0 in (0..rows).step_by(mr) {
        let mm = mr.min(rows - r0);
        for i in 0..mm {
            in_offs[i] = base + (r0 + i) * stride;
            out_offs[i] = (r0 + i) * nr;
        }
        let args = TileArgs {
            inp: input.as_ptr(),
            in_offs: &in_offs[..mm],
            taps: &[0],
            cl,
            w: panel.as_ptr(),
            out: out.as_mut_ptr(),
            out_offs: &out_offs[..mm],
            first,
        };
        // SAFETY: the asserts above put every row's `cl` inputs, the `cl·NR` panel and the
        // rows' `NR` output lanes inside their slices; the caller checked the path is
        // available.
        unsafe { run_tile(path, mm, &args) };
    }
}

/// Turns a chunk's `kl × NR` scores into unnormalized probabilities against the running
/// maximum of each lane, rescaling the lanes' accumulated output and sums when that maximum
/// grows (not needed for the `first` chunk, whose output is yet to be written).
fn online_softmax(s: &mut Scratch, kl: usize, nr: usize, first: bool) {
    use crate::models::cpu_ops::exp;
    let scores = &mut s.scores[..kl * nr];
    let mut new_max = [f32::NEG_INFINITY; super::conv::MAX_NR];
    let new_max = &mut new_max[..nr];
    new_max.copy_from_slice(&s.max);
    for row in scores.chunks_exact(nr) {
        for (mx, &x) in new_max.iter_mut().zip(row) {
            *mx = mx.max(x);
        }
    }
    // Nothing to rescale for the first chunk (its output is yet to be written) or where no
    // lane's maximum grew.
    if !first && new_max.iter().zip(&s.max).any(|(new, old)| new > old) {
        let mut corr = [0f32; super::conv::MAX_NR];
        let corr = &mut corr[..nr];
        for ((c, &old), &new) in corr.iter_mut().zip(&s.max).zip(new_max.iter()) {
            *c = exp(old - new);
        }
        for row in s.acc.chunks_exact_mut(nr) {
            for (x, &c) in row.iter_mut().zip(corr.iter()) {
                *x *= c;
            }
        }
        for (x, &c) in s.sum.iter_mut().zip(corr.iter()) {
            *x *= c;
        }
    }
    s.max.copy_from_slice(new_max);
    for row in scores.chunks_exact_mut(nr) {
        for ((x, &mx), sum) in row.iter_mut().zip(new_max.iter()).zip(s.sum.iter_mut()) {
            let e = exp(*x - mx);
            *x = e;
            *sum += e;
        }
    }
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
        // Self-attention over more keys than one chunk holds, cross-attention with 77 keys,
        // the VAE's one wide head; head sizes and query counts off the vector widths.
        for (b, h, n, m, d) in [
            (2, 3, 37, 1100, 40),
            (1, 2, 50, 77, 64),
            (1, 1, 1, 1, 3),
            (1, 1, 70, 130, 512),
            (2, 1, 130, 5, 8),
        ] {
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
        let none = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).expect("none");
        assert!(attention(KernelPath::Scalar, &q, &none, &none, 1.0).is_err());
        let got = attention(KernelPath::Scalar, &none, &q, &q, 1.0).expect("no queries");
        assert_eq!(got.dims(), &[1, 1, 0, 4]);
    }

    #[test]
    fn multi_head_attention_on_token_rows_matches_the_head_major_one() {
        // `(b, n, heads·d)` rows in and out, as the UNet's projections give and take them.
        for (b, heads, n, m, d) in [(2, 8, 70, 90, 40), (1, 3, 5, 77, 24), (1, 1, 9, 9, 16)] {
            let hd = heads * d;
            let q = Tensor::from_vec(values(b * n * hd, 4), (b, n, hd), &Device::Cpu).expect("q");
            let k = Tensor::from_vec(values(b * m * hd, 5), (b, m, hd), &Device::Cpu).expect("k");
            let v = Tensor::from_vec(values(b * m * hd, 6), (b, m, hd), &Device::Cpu).expect("v");
            let split = |t: &Tensor, len: usize| {
                t.reshape((b, len, heads, d))
                    .and_then(|t| t.transpose(1, 2))
                    .and_then(|t| t.contiguous())
                    .expect("split")
            };
            let scale = 0.3;
            for path in KernelPath::available_paths() {
                let want = attention(path, &split(&q, n), &split(&k, m), &split(&v, m), scale)
                    .and_then(|t| Ok(t.transpose(1, 2)?.reshape((b, n, hd))?))
                    .expect("head-major");
                let got = attention_heads(path, &q, &k, &v, heads, scale).expect("token rows");
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-6, "{path} ({b},{heads},{n},{m},{d}): {diff}");
            }
            assert!(attention_heads(KernelPath::Scalar, &q, &k, &v, hd + 1, scale).is_err());
        }
    }
}
