//! The portable path: block decoding, dequantization (the reference) and scalar dot products
//! that take the quantized activations exactly as the SIMD kernels do.

use std::ops::Range;

use super::act::{Act, Layout, qs_index};
use super::kernel::OutChunk;
use super::{IQ4_VALUES, QuantFormat};

/// IEEE half → f32 (exact, including subnormals, infinities and NaNs).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    if exp == 0 {
        let v = man as f32 * (1.0 / 16_777_216.0);
        return if sign == 0 { v } else { -v };
    }
    let bits = if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// ggml's 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// ggml's 6-bit scale `j` (0..16, before its −32) of a Q3_K super-block's 12 scale bytes:
/// the low 4 bits from byte `j % 8` (low nibble for `j < 8`, high for the rest), the high 2
/// bits from byte `8 + j % 4`, bits `2 (j / 4)`.
pub(crate) fn q3k_scale(s: &[u8], j: usize) -> u8 {
    let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
    let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    low | (high << 4)
}

/// The 32 values of a block of a 32-block format into `q` as stored (unsigned before the
/// format's offset, see [`block32_offset`]; Q8_0 signed), with the block's scale `d` and
/// min `m` (Q4_1/Q5_1; 0 for the others).
pub(crate) fn block32_values(format: QuantFormat, b: &[u8], q: &mut [i32; 32]) -> (f32, f32) {
    let d = half_at(b, 0);
    if format == QuantFormat::Q8_0 {
        for (o, &v) in q.iter_mut().zip(&b[2..34]) {
            *o = i32::from(v as i8);
        }
        return (d, 0.0);
    }
    let (qs, qh, m) = match format {
        QuantFormat::Q4_0 => (&b[2..18], 0, 0.0),
        QuantFormat::Q4_1 => (&b[4..20], 0, half_at(b, 2)),
        QuantFormat::Q5_0 => (&b[6..22], u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 0.0),
        QuantFormat::Q5_1 => (
            &b[8..24],
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            half_at(b, 2),
        ),
        _ => unreachable!("not a 32-block format"),
    };
    for (l, &byte) in qs.iter().enumerate() {
        q[l] = i32::from(byte & 0x0F) | (((qh >> l) & 1) << 4) as i32;
        q[l + 16] = i32::from(byte >> 4) | (((qh >> (l + 16)) & 1) << 4) as i32;
    }
    (d, m)
}

/// The 32 signed values of an IQ4_NL block (or an IQ4_XS sub-block) from its 16 nibble bytes:
/// low nibbles are values 0..16, high nibbles 16..32, each an index into [`IQ4_VALUES`].
pub(crate) fn iq4_values(qs: &[u8], q: &mut [i32; 32]) {
    for (l, &byte) in qs[..16].iter().enumerate() {
        q[l] = i32::from(IQ4_VALUES[usize::from(byte & 0x0F)]);
        q[l + 16] = i32::from(IQ4_VALUES[usize::from(byte >> 4)]);
    }
}

/// The signed 6-bit scale (`ls − 32`) of sub-block `ib` (0..8) of an IQ4_XS super-block: the
/// low 4 bits from `scales_l[ib / 2]` (nibble `ib % 2`), the high 2 from `scales_h`, bits
/// `2 ib`.
pub(crate) fn iq4xs_scale(b: &[u8], ib: usize) -> i32 {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
    let high = ((scales_h >> (2 * ib)) & 3) as u8;
    i32::from(low | (high << 4)) - 32
}

/// What a 32-block format's stored values are above zero: Q4_0 8, Q5_0 16, else 0.
pub(crate) fn block32_offset(format: QuantFormat) -> i32 {
    match format {
        QuantFormat::Q4_0 => 8,
        QuantFormat::Q5_0 => 16,
        _ => 0,
    }
}

/// The unsigned 2/3/4/5/6-bit values (before offsets and scales) of one K-quant super-block, in
/// element order, with each element's sub-block scale (and min for Q4_K/Q5_K).
fn k_values(
    format: QuantFormat,
    b: &[u8],
    q: &mut [u8; 256],
    sc: &mut [i32; 16],
    mn: &mut [i32; 16],
) {
    match format {
        QuantFormat::Q4K | QuantFormat::Q5K => {
            let scales = &b[4..16];
            let (qh, qs) = if format == QuantFormat::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, scales);
                sc[j] = i32::from(s);
                mn[j] = i32::from(m);
            }
            for c in 0..4 {
                for l in 0..32 {
                    let byte = qs[c * 32 + l];
                    let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    q[c * 64 + l] = lo;
                    q[c * 64 + 32 + l] = hi;
                }
            }
        }
        QuantFormat::Q2K => {
            // 16 sub-blocks of 16: a scale in the low and a min in the high nibble.
            for j in 0..16 {
                sc[j] = i32::from(b[j] & 0x0F);
                mn[j] = i32::from(b[j] >> 4);
            }
            let qs = &b[16..80];
            for (e, v) in q.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
                *v = (qs[32 * n + l] >> (2 * j)) & 3;
            }
        }
        QuantFormat::Q3K => {
            // 16 six-bit scales (stored +32), 2-bit values with a high bit in `hmask`
            // (the value is `q | h << 2`, then −4).
            let (hm, qs) = (&b[0..32], &b[32..96]);
            for (j, s) in sc.iter_mut().enumerate() {
                *s = i32::from(q3k_scale(&b[96..108], j)) - 32;
            }
            for (e, v) in q.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
                let h = (hm[l] >> (4 * n + j)) & 1;
                *v = ((qs[32 * n + l] >> (2 * j)) & 3) | (h << 2);
            }
        }
        QuantFormat::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for (j, s) in sc.iter_mut().enumerate() {
                *s = i32::from(b[192 + j] as i8);
            }
            for n in 0..2 {
                for l in 0..32 {
                    let h = qh[32 * n + l];
                    let (a, c) = (ql[64 * n + l], ql[64 * n + l + 32]);
                    q[128 * n + l] = (a & 0x0F) | ((h & 3) << 4);
                    q[128 * n + l + 32] = (c & 0x0F) | (((h >> 2) & 3) << 4);
                    q[128 * n + l + 64] = (a >> 4) | (((h >> 4) & 3) << 4);
                    q[128 * n + l + 96] = (c >> 4) | (((h >> 6) & 3) << 4);
                }
            }
        }
        _ => unreachable!("not a K-quant"),
    }
}

/// Dequantizes one weight row (`dst.len()` values) from its file bytes.
pub(crate) fn dequantize_row(format: QuantFormat, row: &[u8], dst: &mut [f32]) {
    let bb = format.block_bytes();
    match format {
        QuantFormat::Q4_0
        | QuantFormat::Q4_1
        | QuantFormat::Q5_0
        | QuantFormat::Q5_1
        | QuantFormat::Q8_0 => {
            let off = block32_offset(format);
            let mut q = [0i32; 32];
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
                let (d, m) = block32_values(format, b, &mut q);
                for (v, &q) in y.iter_mut().zip(&q) {
                    // As ggml: Q4_0/Q5_0/Q8_0 `x·d`, Q4_1/Q5_1 `x·d + m`.
                    *v = match format {
                        QuantFormat::Q4_1 | QuantFormat::Q5_1 => q as f32 * d + m,
                        _ => (q - off) as f32 * d,
                    };
                }
            }
        }
        QuantFormat::Q2K
        | QuantFormat::Q3K
        | QuantFormat::Q4K
        | QuantFormat::Q5K
        | QuantFormat::Q6K => {
            let (mut q, mut sc, mut mn) = ([0u8; 256], [0i32; 16], [0i32; 16]);
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(256)) {
                k_values(format, b, &mut q, &mut sc, &mut mn);
                if let Some((off, d_at)) = k_offset(format) {
                    let d = half_at(b, d_at);
                    for (e, v) in y.iter_mut().enumerate() {
                        *v = d * sc[e / 16] as f32 * (i32::from(q[e]) - off) as f32;
                    }
                } else if format == QuantFormat::Q2K {
                    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
                    for (e, v) in y.iter_mut().enumerate() {
                        let s = e / 16;
                        *v = d * sc[s] as f32 * f32::from(q[e]) - dmin * mn[s] as f32;
                    }
                } else {
                    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                    for (e, v) in y.iter_mut().enumerate() {
                        let s = e / 32;
                        *v = d * sc[s] as f32 * f32::from(q[e]) - dmin * mn[s] as f32;
                    }
                }
            }
        }
        QuantFormat::IQ4NL => {
            let mut q = [0i32; 32];
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
                let d = half_at(b, 0);
                iq4_values(&b[2..18], &mut q);
                for (v, &q) in y.iter_mut().zip(&q) {
                    *v = d * q as f32;
                }
            }
        }
        QuantFormat::IQ4XS => {
            let mut q = [0i32; 32];
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(256)) {
                let d = half_at(b, 0);
                for (ib, y) in y.chunks_exact_mut(32).enumerate() {
                    // As ggml: the sub-block scale in f32 first, then times each value.
                    let dl = d * iq4xs_scale(b, ib) as f32;
                    iq4_values(&b[8 + 16 * ib..24 + 16 * ib], &mut q);
                    for (v, &q) in y.iter_mut().zip(&q) {
                        *v = dl * q as f32;
                    }
                }
            }
        }
        QuantFormat::F16 => {
            for (b, y) in row.chunks_exact(2).zip(dst.iter_mut()) {
                *y = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        QuantFormat::BF16 => {
            for (b, y) in row.chunks_exact(2).zip(dst.iter_mut()) {
                *y = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
}

/// The K-quants with signed sub-block scales and values stored above zero: (the offset, where
/// the f16 super-block scale is): Q3_K (4, 108) and Q6_K (32, 208); `None` for the formats
/// with mins (Q2_K, Q4_K, Q5_K).
pub(crate) fn k_offset(format: QuantFormat) -> Option<(i32, usize)> {
    match format {
        QuantFormat::Q3K => Some((4, 108)),
        QuantFormat::Q6K => Some((32, 208)),
        _ => None,
    }
}

/// One output value: weight row `w` against activation row `i`.
fn dot(format: QuantFormat, w: &[u8], act: &Act, x: &[f32], i: usize, k: usize) -> f32 {
    let bb = format.block_bytes();
    match format {
        QuantFormat::Q4_0
        | QuantFormat::Q4_1
        | QuantFormat::Q5_0
        | QuantFormat::Q5_1
        | QuantFormat::Q8_0 => {
            let (qs, d, corr) = (act.qs_row(i), act.d_row(i), act.corr_row(i));
            let mut q = [0i32; 32];
            let mut acc = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let (dw, mw) = block32_values(format, blk, &mut q);
                let mut s = 0i32;
                for (e, &q) in q.iter().enumerate() {
                    s += q * i32::from(qs[qs_index(Layout::Natural32, b, e)]);
                }
                // Values stored `off` above zero: corr holds off·d·Σa (Q4_0, Q5_0); Q4_1 and
                // Q5_1 add their min times corr = d·Σa.
                acc += match format {
                    QuantFormat::Q4_1 | QuantFormat::Q5_1 => dw * d[b] * s as f32 + mw * corr[b],
                    _ => dw * (d[b] * s as f32 - corr[b]),
                };
            }
            acc
        }
        QuantFormat::Q2K
        | QuantFormat::Q3K
        | QuantFormat::Q4K
        | QuantFormat::Q5K
        | QuantFormat::Q6K => {
            let (qs, d, bsums) = (act.qs_row(i), act.d_row(i), act.bsums_row(i));
            let (mut q, mut sc, mut mn) = ([0u8; 256], [0i32; 16], [0i32; 16]);
            let mut acc = 0f32;
            for (s, blk) in w.chunks_exact(bb).enumerate() {
                k_values(format, blk, &mut q, &mut sc, &mut mn);
                let a = &qs[s * 256..(s + 1) * 256];
                let bs = &bsums[s * 16..(s + 1) * 16];
                let sum16 = |j: usize| -> i32 {
                    (j * 16..(j + 1) * 16)
                        .map(|e| i32::from(q[e]) * i32::from(a[e]))
                        .sum()
                };
                if let Some((off, d_at)) = k_offset(format) {
                    let mut isum = 0i32;
                    for j in 0..16 {
                        isum += sc[j] * (sum16(j) - off * i32::from(bs[j]));
                    }
                    acc += half_at(blk, d_at) * d[s] * isum as f32;
                } else if format == QuantFormat::Q2K {
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for j in 0..16 {
                        isum += sc[j] * sum16(j);
                        msum += mn[j] * i32::from(bs[j]);
                    }
                    acc += d[s] * (half_at(blk, 80) * isum as f32 - half_at(blk, 82) * msum as f32);
                } else {
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for j in 0..8 {
                        let mut p = 0i32;
                        for e in j * 32..(j + 1) * 32 {
                            p += i32::from(q[e]) * i32::from(a[e]);
                        }
                        isum += sc[j] * p;
                        msum += mn[j] * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1]));
                    }
                    acc += d[s] * (half_at(blk, 0) * isum as f32 - half_at(blk, 2) * msum as f32);
                }
            }
            acc
        }
        QuantFormat::IQ4NL | QuantFormat::IQ4XS => {
            // Both in sub-blocks of 32 signed values against `Natural32` activations.
            let (qs, d) = (act.qs_row(i), act.d_row(i));
            let mut q = [0i32; 32];
            let mut acc = 0f32;
            for (s, blk) in w.chunks_exact(bb).enumerate() {
                let subs = format.block_size() / 32;
                for ib in 0..subs {
                    let b = s * subs + ib;
                    let dw = if format == QuantFormat::IQ4NL {
                        iq4_values(&blk[2..18], &mut q);
                        half_at(blk, 0)
                    } else {
                        iq4_values(&blk[8 + 16 * ib..24 + 16 * ib], &mut q);
                        half_at(blk, 0) * iq4xs_scale(blk, ib) as f32
                    };
                    let mut p = 0i32;
                    for (e, &q) in q.iter().enumerate() {
                        p += q * i32::from(qs[qs_index(Layout::Natural32, b, e)]);
                    }
                    acc += dw * (d[b] * p as f32);
                }
            }
            acc
        }
        QuantFormat::F16 | QuantFormat::BF16 => {
            let xr = &x[i * k..(i + 1) * k];
            let conv = if format == QuantFormat::F16 {
                f16_to_f32
            } else {
                bf16_to_f32
            };
            w.chunks_exact(2)
                .zip(xr)
                .map(|(b, &xv)| conv(u16::from_le_bytes([b[0], b[1]])) * xv)
                .sum()
        }
    }
}

/// The scalar kernel over output columns `cols` for all `m` activation rows.
pub(crate) fn chunk(
    w: &super::QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    let k = w.cols();
    let rows = w.rows_view(cols.clone());
    for j in cols {
        let wr = rows.row(j);
        for i in 0..m {
            out.set(i, j, dot(w.format(), wr, act, x, i, k));
        }
    }
}
