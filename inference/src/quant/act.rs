//! Quantizing the activation rows once per call, into a scratch buffer reused between calls.
//!
//! Layouts (chosen by the weight format and the kernel path, see `kernel::plan`):
//! - `Natural32`: blocks of 32 in element order (Q8_0, Q4_1, Q5_0, Q5_1, IQ4_NL and IQ4_XS on
//!   every path, Q4_0 on the scalar path);
//! - `Group4`: groups of 4 blocks stored as the 16 first elements of each of the 4 blocks, then
//!   the 16 last ones — the order a Q4_0 group's low and high nibbles come in (Q4_0 SIMD);
//! - `Super256`: super-blocks of 256 in element order with one scale and 16 sums of 16 (K-quants).
//!
//! Q4_1 and Q5_1 add `m · d · Σq` (their min times the activation block's sum), so they take
//! `off = 1` and the kernels add `m · corr[b]`.
//!
//! Every block has `d = max|x| / 127` and `q = round(x / d)`. `corr[b]` holds
//! `off · d · Σq / lanes`: the term that corrects a dot product taken with weights stored
//! `off` above their value, spread over the `lanes` SIMD lanes one block's product lands in.

use super::QuantFormat;

/// Bytes of padding after each row's quantized values and scales, so SIMD loads of a
/// whole group never read past the buffer.
const PAD: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Natural32,
    Group4,
    Super256,
}

/// The quantized activations of one call.
#[derive(Debug, Default)]
pub(crate) struct Act {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub corr: Vec<f32>,
    pub bsums: Vec<i16>,
    /// i8 values per row (padded).
    pub qs_stride: usize,
    /// f32 scales per row (padded).
    pub sc_stride: usize,
    /// i16 sums per row.
    pub bs_stride: usize,
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Quantizes one block of values into `q` (same length): returns `(d, Σq)`. Rounds half to
/// even (as ggml's SIMD quantizers do), which keeps the loop vectorizable.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    match simd() {
        Simd::Avx512 => return super::x86_avx512::quantize_block(x, q),
        Simd::Avx2 => return super::x86_avx2::quantize_block(x, q),
        Simd::None => {}
    }
    quantize_block_scalar(x, q)
}

fn quantize_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        // |v·id| ≤ 127 up to rounding; the saturating cast keeps it in range.
        *o = (v * id).round_ties_even() as i8;
    }
    let sum = q.iter().map(|&v| i32::from(v)).sum();
    (d, sum)
}

/// The SIMD quantizers (bit-identical to the portable one).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Simd {
    Avx512,
    Avx2,
    None,
}

/// The fastest quantizer this CPU (or the forced path) can run, detected once.
#[cfg(target_arch = "x86_64")]
fn simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| {
        if super::KernelPath::Avx512Vnni.available() {
            Simd::Avx512
        } else if super::KernelPath::Avx2.available() {
            Simd::Avx2
        } else {
            Simd::None
        }
    })
}

impl Act {
    /// Quantizes `x` (`m × k`) into this buffer in `layout`; `off`/`lanes` as in the module
    /// docs (ignored for `Super256`).
    pub fn quantize(
        &mut self,
        x: &[f32],
        m: usize,
        k: usize,
        layout: Layout,
        off: f32,
        lanes: f32,
    ) {
        match layout {
            Layout::Natural32 | Layout::Group4 => {
                let nb = k / 32;
                let nb_pad = nb.div_ceil(4) * 4;
                self.qs_stride = nb_pad * 32 + PAD;
                self.sc_stride = nb_pad + PAD / 4;
                self.bs_stride = 0;
                grow(&mut self.qs, m * self.qs_stride);
                grow(&mut self.d, m * self.sc_stride);
                grow(&mut self.corr, m * self.sc_stride);
                for i in 0..m {
                    let qs = &mut self.qs[i * self.qs_stride..(i + 1) * self.qs_stride];
                    let d = &mut self.d[i * self.sc_stride..(i + 1) * self.sc_stride];
                    let corr = &mut self.corr[i * self.sc_stride..(i + 1) * self.sc_stride];
                    qs.fill(0);
                    d.fill(0.0);
                    corr.fill(0.0);
                    let row = &x[i * k..(i + 1) * k];
                    for (b, xb) in row.chunks_exact(32).enumerate() {
                        let mut q = [0i8; 32];
                        let (db, sum) = quantize_block(xb, &mut q);
                        let (lo, hi) = (qs_index(layout, b, 0), qs_index(layout, b, 16));
                        qs[lo..lo + 16].copy_from_slice(&q[..16]);
                        qs[hi..hi + 16].copy_from_slice(&q[16..]);
                        d[b] = db;
                        corr[b] = off * db * sum as f32 / lanes;
                    }
                }
            }
            Layout::Super256 => {
                let nsb = k / 256;
                self.qs_stride = nsb * 256 + PAD;
                self.sc_stride = nsb + PAD / 4;
                self.bs_stride = nsb * 16;
                grow(&mut self.qs, m * self.qs_stride);
                grow(&mut self.d, m * self.sc_stride);
                grow(&mut self.bsums, m * self.bs_stride);
                for i in 0..m {
                    let qs = &mut self.qs[i * self.qs_stride..(i + 1) * self.qs_stride];
                    let d = &mut self.d[i * self.sc_stride..(i + 1) * self.sc_stride];
                    let bsums = &mut self.bsums[i * self.bs_stride..(i + 1) * self.bs_stride];
                    qs.fill(0);
                    d.fill(0.0);
                    let row = &x[i * k..(i + 1) * k];
                    for (s, xs) in row.chunks_exact(256).enumerate() {
                        let q = &mut qs[s * 256..(s + 1) * 256];
                        let (ds, _) = quantize_block(xs, q);
                        d[s] = ds;
                        for (j, sums) in bsums[s * 16..(s + 1) * 16].iter_mut().enumerate() {
                            *sums = q[j * 16..(j + 1) * 16].iter().map(|&v| i16::from(v)).sum();
                        }
                    }
                }
            }
        }
    }

    /// Row `i`'s quantized values.
    pub fn qs_row(&self, i: usize) -> &[i8] {
        &self.qs[i * self.qs_stride..(i + 1) * self.qs_stride]
    }

    /// Row `i`'s block scales.
    pub fn d_row(&self, i: usize) -> &[f32] {
        &self.d[i * self.sc_stride..(i + 1) * self.sc_stride]
    }

    /// Row `i`'s block corrections (32-blocks layouts).
    pub fn corr_row(&self, i: usize) -> &[f32] {
        &self.corr[i * self.sc_stride..(i + 1) * self.sc_stride]
    }

    /// Row `i`'s sums of 16 (`Super256`).
    pub fn bsums_row(&self, i: usize) -> &[i16] {
        &self.bsums[i * self.bs_stride..(i + 1) * self.bs_stride]
    }
}

/// Where element `e` of block `b` lives in a row of the 32-block layouts.
pub(crate) fn qs_index(layout: Layout, b: usize, e: usize) -> usize {
    match layout {
        Layout::Natural32 | Layout::Super256 => b * 32 + e,
        Layout::Group4 => (b / 4) * 128 + (e / 16) * 64 + (b % 4) * 16 + e % 16,
    }
}

/// `x` after the activation quantization the kernels apply for `format` (F16/BF16: none).
pub(crate) fn round_trip(format: QuantFormat, x: &[f32], k: usize) -> Vec<f32> {
    let block = match format.activation_block() {
        0 => return x.to_vec(),
        b => b,
    };
    let mut out = vec![0f32; x.len()];
    for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (xb, yb) in row.chunks_exact(block).zip(dst.chunks_exact_mut(block)) {
            let mut q = [0i8; 256];
            let (d, _) = quantize_block(xb, &mut q[..block]);
            for (y, &v) in yb.iter_mut().zip(&q) {
                *y = f32::from(v) * d;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The AVX-512 and AVX2 quantizers are bit-identical to the portable one (ties included),
    /// each checked where the CPU (or the forced path) has it.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_quantizer_equals_scalar() {
        use super::super::KernelPath;
        type Quantizer = fn(&[f32], &mut [i8]) -> (f32, i32);
        let mut x: Vec<f32> = (0..256)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        // Exact halves after scaling: amax 127 gives id 1.
        x[0] = 127.0;
        for (i, v) in x.iter_mut().enumerate().skip(1).take(40) {
            *v = i as f32 - 20.5;
        }
        let quantizers: [(KernelPath, Quantizer); 2] = [
            (
                KernelPath::Avx512Vnni,
                super::super::x86_avx512::quantize_block,
            ),
            (KernelPath::Avx2, super::super::x86_avx2::quantize_block),
        ];
        for (path, quantize) in quantizers {
            if !path.available() {
                eprintln!("skipped: the {path} quantizer (this CPU or STUDIO_CPU_PATH lacks it)");
                continue;
            }
            for len in [32, 256] {
                let (mut a, mut b) = (vec![0i8; len], vec![0i8; len]);
                let ra = super::quantize_block_scalar(&x[..len], &mut a);
                let rb = quantize(&x[..len], &mut b);
                assert_eq!(ra, rb, "{path}");
                assert_eq!(a, b, "{path}");
            }
            // All zeros: d = 0, every value 0.
            let mut z = [1i8; 32];
            assert_eq!(quantize(&[0.0; 32], &mut z), (0.0, 0), "{path}");
            assert_eq!(z, [0; 32], "{path}");
        }
    }
}
