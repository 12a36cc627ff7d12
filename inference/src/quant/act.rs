//! Quantizing the activation rows once per call, into a scratch buffer reused between calls.
//!
//! Layouts (chosen by the weight format and the kernel path, see `kernel::plan`):
//! - `Natural32`: blocks of 32 in element order (Q8_0 on every path, Q4_0 on the scalar path);
//! - `Group4`: groups of 4 blocks stored as the 16 first elements of each of the 4 blocks, then
//!   the 16 last ones — the order a Q4_0 group's low and high nibbles come in (Q4_0 SIMD);
//! - `Super256`: super-blocks of 256 in element order with one scale and 16 sums of 16 (K-quants).
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

/// Quantizes one block of values: returns `(d, Σq)` and writes `q` through `put(i, q)`.
fn quantize_block(x: &[f32], mut put: impl FnMut(usize, i8)) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, &v) in x.iter().enumerate() {
        let q = (v * id).round().clamp(-127.0, 127.0) as i8;
        sum += i32::from(q);
        put(i, q);
    }
    (d, sum)
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
                        let (db, sum) = quantize_block(xb, |e, q| {
                            qs[qs_index(layout, b, e)] = q;
                        });
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
                        let (ds, _) = quantize_block(xs, |e, v| q[e] = v);
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
    let block = match format {
        QuantFormat::Q4_0 | QuantFormat::Q8_0 => 32,
        QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => 256,
        QuantFormat::F16 | QuantFormat::BF16 => return x.to_vec(),
    };
    let mut out = vec![0f32; x.len()];
    for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (xb, yb) in row.chunks_exact(block).zip(dst.chunks_exact_mut(block)) {
            let mut q = [0i8; 256];
            let (d, _) = quantize_block(xb, |e, v| q[e] = v);
            for (y, &v) in yb.iter_mut().zip(&q) {
                *y = f32::from(v) * d;
            }
        }
    }
    out
}
