//! The portable path: block decoding, dequantization (the reference) and scalar dot products
//! that take the quantized activations exactly as the SIMD kernels do.

use std::ops::Range;

use super::QuantFormat;
use super::act::{Act, Layout, qs_index};
use super::kernel::OutChunk;

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

/// The unsigned 4/5/6-bit values (before offsets and scales) of one K-quant super-block, in
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
        QuantFormat::Q4_0 => {
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
                let d = half_at(b, 0);
                for l in 0..16 {
                    y[l] = (f32::from(b[2 + l] & 0x0F) - 8.0) * d;
                    y[l + 16] = (f32::from(b[2 + l] >> 4) - 8.0) * d;
                }
            }
        }
        QuantFormat::Q8_0 => {
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
                let d = half_at(b, 0);
                for l in 0..32 {
                    y[l] = f32::from(b[2 + l] as i8) * d;
                }
            }
        }
        QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => {
            let (mut q, mut sc, mut mn) = ([0u8; 256], [0i32; 16], [0i32; 16]);
            for (b, y) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(256)) {
                k_values(format, b, &mut q, &mut sc, &mut mn);
                if format == QuantFormat::Q6K {
                    let d = half_at(b, 208);
                    for (e, v) in y.iter_mut().enumerate() {
                        *v = d * sc[e / 16] as f32 * (i32::from(q[e]) - 32) as f32;
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

/// One output value: weight row `w` against activation row `i`.
fn dot(format: QuantFormat, w: &[u8], act: &Act, x: &[f32], i: usize, k: usize) -> f32 {
    let bb = format.block_bytes();
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q8_0 => {
            let (qs, d, corr) = (act.qs_row(i), act.d_row(i), act.corr_row(i));
            let mut acc = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let dw = half_at(blk, 0);
                let mut s = 0i32;
                for e in 0..32 {
                    let a = i32::from(qs[qs_index(Layout::Natural32, b, e)]);
                    let q = if format == QuantFormat::Q4_0 {
                        i32::from(if e < 16 {
                            blk[2 + e] & 0x0F
                        } else {
                            blk[2 + e - 16] >> 4
                        })
                    } else {
                        i32::from(blk[2 + e] as i8)
                    };
                    s += q * a;
                }
                // Q4_0 weights are used unsigned (0..15); corr holds 8·d·Σa.
                acc += dw * (d[b] * s as f32 - corr[b]);
            }
            acc
        }
        QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => {
            let (qs, d, bsums) = (act.qs_row(i), act.d_row(i), act.bsums_row(i));
            let (mut q, mut sc, mut mn) = ([0u8; 256], [0i32; 16], [0i32; 16]);
            let mut acc = 0f32;
            for (s, blk) in w.chunks_exact(bb).enumerate() {
                k_values(format, blk, &mut q, &mut sc, &mut mn);
                let a = &qs[s * 256..(s + 1) * 256];
                let bs = &bsums[s * 16..(s + 1) * 16];
                if format == QuantFormat::Q6K {
                    let mut isum = 0i32;
                    for j in 0..16 {
                        let mut p = 0i32;
                        for e in j * 16..(j + 1) * 16 {
                            p += i32::from(q[e]) * i32::from(a[e]);
                        }
                        isum += sc[j] * (p - 32 * i32::from(bs[j]));
                    }
                    acc += half_at(blk, 208) * d[s] * isum as f32;
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
