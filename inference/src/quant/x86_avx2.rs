//! AVX2 + FMA + F16C kernels (`vpmaddubsw` + `vpmaddwd`). Q4_0 is fed unsigned (0..15,
//! corrected with the activation sums); Q8_0 uses the sign trick (`|w| × sign(a, w)`), since
//! `q + 128` would overflow `vpmaddubsw`'s 16-bit pairs. The K-quants are fed unsigned as
//! stored (4/5/6-bit values; the mins or Q6_K's −32 are corrected with the sums of 16 of the
//! `Super256` activations), with the sub-block scales applied in the `vpmaddwd`. IQ4_NL and
//! IQ4_XS look their nibbles up in the value table (`vpshufb`) and go on as Q8_0. F16/BF16 are
//! widened to f32 and multiplied with the f32 activations (FMA).
//!
//! Tiles: `MR` activation rows × `NR` weight rows, so each weight block is decoded once per
//! tile and used `MR` times (decode: 1 × `NR` for independent chains and shared activation
//! loads). Each output is computed the same way whatever the tile it falls in.
#![allow(unsafe_code)]
// Register tiles are indexed by (activation row, weight row); index loops read clearer here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::{
    __m128i, __m256, __m256i, _mm_add_epi32, _mm_add_ps, _mm_and_si128, _mm_cvtepu8_epi16,
    _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtsi64_si128, _mm_cvtsi128_si32, _mm_cvtss_f32,
    _mm_hadd_ps, _mm_max_ps, _mm_max_ss, _mm_movehdup_ps, _mm_movehl_ps, _mm_set_epi16,
    _mm_set_epi32, _mm_set1_epi8, _mm_shuffle_epi32, _mm_srli_epi16, _mm_sub_epi8,
    _mm_unpackhi_epi16, _mm_unpackhi_epi64, _mm_unpacklo_epi16, _mm256_abs_epi8, _mm256_add_epi16,
    _mm256_add_epi32, _mm256_and_ps, _mm256_and_si256, _mm256_broadcastsi128_si256,
    _mm256_castps128_ps256, _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_castsi256_si128,
    _mm256_cmpeq_epi8, _mm256_cvtepi8_epi16, _mm256_cvtepi32_ps, _mm256_cvtepu8_epi16,
    _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_cvtps_epi32, _mm256_extractf128_ps,
    _mm256_extracti128_si256, _mm256_fmadd_ps, _mm256_fmsub_ps, _mm256_fnmadd_ps, _mm256_loadu_ps,
    _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_max_ps, _mm256_mul_ps,
    _mm256_or_si256, _mm256_packs_epi16, _mm256_packs_epi32, _mm256_permute2x128_si256,
    _mm256_permutevar8x32_epi32, _mm256_permutevar8x32_ps, _mm256_set_m128i, _mm256_set1_epi8,
    _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_epi64x, _mm256_set1_ps, _mm256_setr_epi32,
    _mm256_setr_epi64x, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_shuffle_epi8,
    _mm256_sign_epi8, _mm256_slli_epi16, _mm256_slli_epi32, _mm256_srl_epi16, _mm256_srli_epi16,
    _mm256_storeu_si256, _mm256_sub_epi32,
};
use std::ops::Range;

use super::act::Act;
use super::kernel::OutChunk;
use super::x86_load::{ld128, ld128_ps, ld256, ld256_i16, prefetch};
use super::{QWeight, QuantFormat};

#[inline]
#[target_feature(enable = "avx2")]
fn ld256_i8(s: &[i8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: bytes `at..at + 32` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx")]
fn ld256_ps(s: &[f32], at: usize) -> __m256 {
    assert!(at + 8 <= s.len());
    // SAFETY: values `at..at + 8` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_ps(s.as_ptr().add(at)) }
}

fn half_bits(b: &[u8], at: usize) -> i16 {
    i16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_hadd_ps(s, s))
}

macro_rules! drive {
    ($tile:ident, $w:expr, $act:expr, $m:expr, $cols:expr, $out:expr) => {{
        let (w, act, m, cols, out): (&QWeight, &Act, usize, Range<usize>, &mut OutChunk) =
            ($w, $act, $m, $cols, $out);
        let rb = w.row_bytes();
        let rows = w.rows_view(cols.clone());
        for j in cols {
            let wr = [rows.row(j)];
            let mut i = 0;
            while i + 8 <= m {
                let r = $tile::<8>(&wr, act, i, rb);
                for (di, &v) in r.iter().enumerate() {
                    out.set(i + di, j, v);
                }
                i += 8;
            }
            while i + 4 <= m {
                let r = $tile::<4>(&wr, act, i, rb);
                for (di, &v) in r.iter().enumerate() {
                    out.set(i + di, j, v);
                }
                i += 4;
            }
            while i < m {
                out.set(i, j, $tile::<1>(&wr, act, i, rb)[0]);
                i += 1;
            }
        }
    }};
}

// The driver of the K-quant and F16/BF16 tiles: weight rows in groups of `$dec` for decode
// (M < 4: one activation row at a time) or `$bat` with 4 activation rows per tile, then single
// weight rows at the chunk's edge.
macro_rules! drive_tiles {
    ($tile:ident, $dec:literal, $bat:literal, $big:literal, $w:expr, $act:expr, $x:expr, $m:expr,
     $cols:expr, $out:expr) => {{
        let (w, act, x, m, cols, out): (
            &QWeight,
            &Act,
            &[f32],
            usize,
            Range<usize>,
            &mut OutChunk,
        ) = ($w, $act, $x, $m, $cols, $out);
        let rb = w.row_bytes();
        let rows = w.rows_view(cols.clone());
        let mut j = cols.start;
        while j < cols.end {
            let left = cols.end - j;
            if m < 4 && left >= $dec {
                let mut wr: [&[u8]; $dec] = [&[]; $dec];
                for (r, row) in wr.iter_mut().enumerate() {
                    *row = rows.row(j + r);
                }
                for i in 0..m {
                    let r = $tile::<1, $dec>(&wr, act, x, i, $dec * rb);
                    for (dj, &v) in r[0].iter().enumerate() {
                        out.set(i, j + dj, v);
                    }
                }
                j += $dec;
            } else if m >= 4 && left >= $bat {
                let mut wr: [&[u8]; $bat] = [&[]; $bat];
                for (r, row) in wr.iter_mut().enumerate() {
                    *row = rows.row(j + r);
                }
                let mut i = 0;
                while i + $big <= m {
                    let r = $tile::<$big, $bat>(&wr, act, x, i, $bat * rb);
                    for (di, row) in r.iter().enumerate() {
                        for (dj, &v) in row.iter().enumerate() {
                            out.set(i + di, j + dj, v);
                        }
                    }
                    i += $big;
                }
                while i + 4 <= m {
                    let r = $tile::<4, $bat>(&wr, act, x, i, $bat * rb);
                    for (di, row) in r.iter().enumerate() {
                        for (dj, &v) in row.iter().enumerate() {
                            out.set(i + di, j + dj, v);
                        }
                    }
                    i += 4;
                }
                while i < m {
                    let r = $tile::<1, $bat>(&wr, act, x, i, $bat * rb);
                    for (dj, &v) in r[0].iter().enumerate() {
                        out.set(i, j + dj, v);
                    }
                    i += 1;
                }
                j += $bat;
            } else {
                let wr = [rows.row(j)];
                let mut i = 0;
                while i + 4 <= m {
                    let r = $tile::<4, 1>(&wr, act, x, i, rb);
                    for (di, row) in r.iter().enumerate() {
                        out.set(i + di, j, row[0]);
                    }
                    i += 4;
                }
                while i < m {
                    out.set(i, j, $tile::<1, 1>(&wr, act, x, i, rb)[0][0]);
                    i += 1;
                }
                j += 1;
            }
        }
    }};
}

/// Runs the kernel of `w`'s format over output columns `cols`.
pub(crate) fn chunk(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    assert!(super::KernelPath::Avx2.available());
    // SAFETY: the CPU has every feature this function enables (checked above).
    unsafe { chunk_inner(w, act, x, m, cols, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn chunk_inner(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    match w.format() {
        QuantFormat::Q4_0 if m < 4 && w.tiled_rows() > 0 => q4_0_tiled_decode(w, act, m, cols, out),
        QuantFormat::Q4_0 => drive!(q4_0_tile, w, act, m, cols, out),
        QuantFormat::Q8_0 => drive!(q8_0_tile, w, act, m, cols, out),
        QuantFormat::Q4_1 => drive!(q4_1_tile, w, act, m, cols, out),
        QuantFormat::Q5_0 => drive!(q5_0_tile, w, act, m, cols, out),
        QuantFormat::Q5_1 => drive!(q5_1_tile, w, act, m, cols, out),
        QuantFormat::Q2K => drive_tiles!(q2k_tile, 2, 2, 8, w, act, x, m, cols, out),
        QuantFormat::Q3K => drive_tiles!(q3k_tile, 2, 1, 8, w, act, x, m, cols, out),
        QuantFormat::Q4K => drive_tiles!(q4k_tile, 2, 2, 8, w, act, x, m, cols, out),
        QuantFormat::Q5K => drive_tiles!(q5k_tile, 2, 1, 8, w, act, x, m, cols, out),
        QuantFormat::Q6K => drive_tiles!(q6k_tile, 2, 1, 8, w, act, x, m, cols, out),
        QuantFormat::F16 => drive_tiles!(f16_tile, 4, 3, 4, w, act, x, m, cols, out),
        QuantFormat::BF16 => drive_tiles!(bf16_tile, 4, 3, 4, w, act, x, m, cols, out),
        QuantFormat::IQ4NL => drive!(iq4nl_tile, w, act, m, cols, out),
        QuantFormat::IQ4XS => drive!(iq4xs_tile, w, act, m, cols, out),
    }
}

/// [`IQ4_VALUES`](super::IQ4_VALUES) in both 128-bit lanes, for `vpshufb` lookups.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn iq4_table() -> __m256i {
    let t = super::IQ4_VALUES.map(|v| v as u8);
    _mm256_broadcastsi128_si256(ld128(&t, 0))
}

/// The 32 signed values of an IQ4 block (or IQ4_XS sub-block) from its 16 nibble bytes at
/// `at`: low nibbles (values 0..16) in the low lane, high nibbles in the high lane, each looked
/// up in `table` ([`iq4_table`]).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn iq4_block(b: &[u8], at: usize, table: __m256i) -> __m256i {
    let q = ld128(b, at);
    let nib = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
        _mm256_set1_epi8(0x0F),
    );
    _mm256_shuffle_epi8(table, nib)
}

/// The f16 at `b[at..at + 2]` as f32 (F16C: the portable conversion is a branchy function
/// call, which cost a fifth of an IQ4_NL decode step where it ran once per block).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn half(b: &[u8], at: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(half_bits(b, at)))))
}

/// IQ4_NL (Natural32 layout): the nibbles looked up in the value table, then as Q8_0
/// (`|w| × sign(a, w)`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn iq4nl_tile<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
    let row = wr[0];
    let ones = _mm256_set1_epi16(1);
    let table = iq4_table();
    let mut acc = [_mm256_setzero_ps(); MR];
    let mut d: [&[f32]; MR] = [&[]; MR];
    // The rows' slices once per call (not per block: each is a bounds-checked computation).
    let mut qs: [&[i8]; MR] = [&[]; MR];
    for i in 0..MR {
        d[i] = act.d_row(i0 + i);
        qs[i] = act.qs_row(i0 + i);
    }
    for (b, blk) in row.as_chunks::<18>().0.iter().enumerate() {
        prefetch(row, b * 18 + pf);
        let w = iq4_block(blk, 2, table);
        let aw = _mm256_abs_epi8(w);
        let dw = half(blk, 0);
        for i in 0..MR {
            let a = ld256_i8(qs[i], b * 32);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
            let s = _mm256_set1_ps(dw * d[i][b]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i]);
        }
    }
    let mut r = [0f32; MR];
    for i in 0..MR {
        r[i] = hsum(acc[i]);
    }
    r
}

/// IQ4_XS (Natural32 layout): per super-block 8 sub-blocks of 32, each as an IQ4_NL block with
/// the scale `d · (ls − 32)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn iq4xs_tile<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
    let row = wr[0];
    let ones = _mm256_set1_epi16(1);
    let table = iq4_table();
    let mut acc = [_mm256_setzero_ps(); MR];
    let mut d: [&[f32]; MR] = [&[]; MR];
    // The rows' slices once per call (not per block: each is a bounds-checked computation).
    let mut qs: [&[i8]; MR] = [&[]; MR];
    for i in 0..MR {
        d[i] = act.d_row(i0 + i);
        qs[i] = act.qs_row(i0 + i);
    }
    for (s, blk) in row.as_chunks::<136>().0.iter().enumerate() {
        for line in [0, 64, 128] {
            prefetch(row, s * 136 + line + pf);
        }
        let dw = half(blk, 0);
        for ib in 0..8 {
            let w = iq4_block(blk, 8 + 16 * ib, table);
            let aw = _mm256_abs_epi8(w);
            let dl = dw * super::scalar::iq4xs_scale(blk, ib) as f32;
            let b = s * 8 + ib;
            for i in 0..MR {
                let a = ld256_i8(qs[i], b * 32);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
                let sc = _mm256_set1_ps(dl * d[i][b]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc[i]);
            }
        }
    }
    let mut r = [0f32; MR];
    for i in 0..MR {
        r[i] = hsum(acc[i]);
    }
    r
}

/// Q4_0 (Group4 layout): per group of 4 blocks, blocks 0–1 and 2–3 as two 256-bit halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_tile<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
    let row = wr[0];
    let nb = row.len() / 18;
    let (full, tail) = (nb / 4, nb % 4);
    let mut tailbuf = [0u8; 72];
    tailbuf[..tail * 18].copy_from_slice(&row[full * 72..]);
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let lo_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let hi_idx = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    let mut acc = [_mm256_setzero_ps(); MR];
    // The rows' slices once per call (not per group: each is a bounds-checked computation).
    let mut rows: [(&[i8], &[f32], &[f32]); MR] = [(&[], &[], &[]); MR];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = (act.qs_row(i0 + i), act.d_row(i0 + i), act.corr_row(i0 + i));
    }
    for g in 0..full + usize::from(tail > 0) {
        prefetch(row, g * 72 + pf);
        let (src, at): (&[u8], usize) = if g < full {
            (row, g * 72)
        } else {
            (&tailbuf, 0)
        };
        let x01 = _mm256_set_m128i(ld128(src, at + 20), ld128(src, at + 2));
        let x23 = _mm256_set_m128i(ld128(src, at + 56), ld128(src, at + 38));
        let lo01 = _mm256_and_si256(x01, m4);
        let hi01 = _mm256_and_si256(_mm256_srli_epi16::<4>(x01), m4);
        let lo23 = _mm256_and_si256(x23, m4);
        let hi23 = _mm256_and_si256(_mm256_srli_epi16::<4>(x23), m4);
        let d4 = _mm_cvtph_ps(_mm_set_epi16(
            0,
            0,
            0,
            0,
            half_bits(src, at + 54),
            half_bits(src, at + 36),
            half_bits(src, at + 18),
            half_bits(src, at),
        ));
        let d4 = _mm256_castps128_ps256(d4);
        let dw01 = _mm256_permutevar8x32_ps(d4, lo_idx);
        let dw23 = _mm256_permutevar8x32_ps(d4, hi_idx);
        for i in 0..MR {
            let (qs, d, corr) = rows[i];
            let a = g * 128;
            let da = _mm256_castps128_ps256(ld128_ps(d, g * 4));
            let c = _mm256_castps128_ps256(ld128_ps(corr, g * 4));
            let p01 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo01, ld256_i8(qs, a)),
                    _mm256_maddubs_epi16(hi01, ld256_i8(qs, a + 64)),
                ),
                ones,
            );
            let p23 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo23, ld256_i8(qs, a + 32)),
                    _mm256_maddubs_epi16(hi23, ld256_i8(qs, a + 96)),
                ),
                ones,
            );
            let t01 = _mm256_fmsub_ps(
                _mm256_cvtepi32_ps(p01),
                _mm256_permutevar8x32_ps(da, lo_idx),
                _mm256_permutevar8x32_ps(c, lo_idx),
            );
            let t23 = _mm256_fmsub_ps(
                _mm256_cvtepi32_ps(p23),
                _mm256_permutevar8x32_ps(da, hi_idx),
                _mm256_permutevar8x32_ps(c, hi_idx),
            );
            acc[i] = _mm256_fmadd_ps(t01, dw01, acc[i]);
            acc[i] = _mm256_fmadd_ps(t23, dw23, acc[i]);
        }
    }
    let mut r = [0f32; MR];
    for (o, a) in r.iter_mut().zip(acc) {
        *o = hsum(a);
    }
    r
}

/// Q4_0 decode (`m` < 4) on a [`WeightLayout::Tiles4`](super::WeightLayout) weight: whole
/// runs of 4 rows through [`q4_0_tile4`], the rows at the edges of `cols` (or past the last
/// whole run) through [`q4_0_tile`] in file order. Every output is computed as `q4_0_tile`
/// computes it.
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_tiled_decode(w: &QWeight, act: &Act, m: usize, cols: Range<usize>, out: &mut OutChunk) {
    let rb = w.row_bytes();
    let first = cols.start.next_multiple_of(4).min(cols.end);
    let last = (cols.end.min(w.tiled_rows()) / 4 * 4).max(first);
    let edge = |range: Range<usize>, out: &mut OutChunk| {
        if range.is_empty() {
            return;
        }
        let rows = w.rows_view(range.clone());
        for j in range {
            for i in 0..m {
                out.set(i, j, q4_0_tile::<1>(&[rows.row(j)], act, i, rb)[0]);
            }
        }
    };
    edge(cols.start..first, out);
    for j in (first..last).step_by(4) {
        // The 4 rows' bytes in the tiles' order: units of 72 bytes (4 block scales, then
        // the 4 blocks' 16 quant bytes), unit g of rows j..j + 4 side by side.
        let tile = w.rows_bytes(j..j + 4);
        for i in 0..m {
            for (dj, &v) in q4_0_tile4(tile, act, i, 4 * rb).iter().enumerate() {
                out.set(i, j + dj, v);
            }
        }
    }
    edge(last..cols.end, out);
}

/// Q4_0 decode over one run of 4 interleaved rows (`tile`, see [`q4_0_tiled_decode`]) for
/// activation row `i`: each group's activations loaded and spread once for the 4 rows, each
/// unit's 4 scales converted from one 8-byte load.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_tile4(tile: &[u8], act: &Act, i: usize, pf: usize) -> [f32; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let lo_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let hi_idx = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    let (qs, d, corr) = (act.qs_row(i), act.d_row(i), act.corr_row(i));
    let mut acc = [_mm256_setzero_ps(); 4];
    for g in 0..tile.len() / 288 {
        for line in (0..288).step_by(64) {
            prefetch(tile, g * 288 + line + pf);
        }
        let a = g * 128;
        let (a0, a1, a2, a3) = (
            ld256_i8(qs, a),
            ld256_i8(qs, a + 32),
            ld256_i8(qs, a + 64),
            ld256_i8(qs, a + 96),
        );
        let da = _mm256_castps128_ps256(ld128_ps(d, g * 4));
        let c = _mm256_castps128_ps256(ld128_ps(corr, g * 4));
        let (da01, da23) = (
            _mm256_permutevar8x32_ps(da, lo_idx),
            _mm256_permutevar8x32_ps(da, hi_idx),
        );
        let (c01, c23) = (
            _mm256_permutevar8x32_ps(c, lo_idx),
            _mm256_permutevar8x32_ps(c, hi_idx),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let u = (g * 4 + r) * 72;
            let scales = i64::from_le_bytes(tile[u..u + 8].try_into().unwrap_or([0; 8]));
            let d4 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi64_si128(scales)));
            let (x01, x23) = (ld256(tile, u + 8), ld256(tile, u + 40));
            let lo01 = _mm256_and_si256(x01, m4);
            let hi01 = _mm256_and_si256(_mm256_srli_epi16::<4>(x01), m4);
            let lo23 = _mm256_and_si256(x23, m4);
            let hi23 = _mm256_and_si256(_mm256_srli_epi16::<4>(x23), m4);
            let p01 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo01, a0),
                    _mm256_maddubs_epi16(hi01, a2),
                ),
                ones,
            );
            let p23 = _mm256_madd_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo23, a1),
                    _mm256_maddubs_epi16(hi23, a3),
                ),
                ones,
            );
            let t01 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(p01), da01, c01);
            let t23 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(p23), da23, c23);
            *acc = _mm256_fmadd_ps(t01, _mm256_permutevar8x32_ps(d4, lo_idx), *acc);
            *acc = _mm256_fmadd_ps(t23, _mm256_permutevar8x32_ps(d4, hi_idx), *acc);
        }
    }
    let mut r = [0f32; 4];
    for (o, a) in r.iter_mut().zip(acc) {
        *o = hsum(a);
    }
    r
}

/// Q8_0 (Natural32 layout): one block per step, `|w| × sign(a, w)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_tile<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
    let row = wr[0];
    let ones = _mm256_set1_epi16(1);
    // One accumulator per row: indexing two by `b % 2` kept them in memory (a store and a
    // reload per block).
    let mut acc = [_mm256_setzero_ps(); MR];
    let mut d: [&[f32]; MR] = [&[]; MR];
    // The rows' slices once per call (not per block: each is a bounds-checked computation).
    let mut qs: [&[i8]; MR] = [&[]; MR];
    for i in 0..MR {
        d[i] = act.d_row(i0 + i);
        qs[i] = act.qs_row(i0 + i);
    }
    for (b, blk) in row.as_chunks::<34>().0.iter().enumerate() {
        prefetch(row, b * 34 + pf);
        let w = ld256(blk, 2);
        let aw = _mm256_abs_epi8(w);
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            i16::from_le_bytes([blk[0], blk[1]]),
        ))));
        for i in 0..MR {
            let a = ld256_i8(qs[i], b * 32);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
            let s = _mm256_set1_ps(dw * d[i][b]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i]);
        }
    }
    let mut r = [0f32; MR];
    for i in 0..MR {
        r[i] = hsum(acc[i]);
    }
    r
}

/// The 32 fifth bits of a Q5_0/Q5_1 block (`qh`, bit `l` for value `l`) as bytes of 0x10.
#[inline]
#[target_feature(enable = "avx2")]
fn fifth_bits(qh: u32) -> __m256i {
    // Byte `l` gets byte `l / 8` of `qh`; or-ing every bit but `l % 8` leaves all ones
    // exactly where that bit is set.
    let spread = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi8(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The 32 unsigned values of a Q4_1/Q5_0/Q5_1 block in element order (low nibbles are values
/// 0–15, high nibbles 16–31), with the fifth bits when `qh_at` is set.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn nibbles(b: &[u8], qs_at: usize, qh_at: Option<usize>) -> __m256i {
    let m4 = _mm_set1_epi8(0x0F);
    let x = ld128(b, qs_at);
    let v = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
        _mm_and_si128(x, m4),
    );
    match qh_at {
        Some(at) => _mm256_or_si256(
            v,
            fifth_bits(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])),
        ),
        None => v,
    }
}

// Q4_1, Q5_0 and Q5_1 (Natural32 activations): one block per step, its unsigned values through
// `vpmaddubsw` with the activation bytes; the offset (Q5_0: −16·d) or the min (Q4_1/Q5_1:
// +m) is applied with the activation block's `corr` (see `act`), in a scalar per row.
macro_rules! block32_tile {
    ($name:ident, $bytes:literal, $qs_at:literal, $qh_at:expr, $min:literal) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
            let row = wr[0];
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); MR];
            let mut fix = [0f32; MR];
            let mut d: [&[f32]; MR] = [&[]; MR];
            let mut corr: [&[f32]; MR] = [&[]; MR];
            let mut qs: [&[i8]; MR] = [&[]; MR];
            for i in 0..MR {
                d[i] = act.d_row(i0 + i);
                corr[i] = act.corr_row(i0 + i);
                qs[i] = act.qs_row(i0 + i);
            }
            for (b, blk) in row.chunks_exact($bytes).enumerate() {
                prefetch(row, b * $bytes + pf);
                let v = nibbles(blk, $qs_at, $qh_at);
                // d (and m) with one F16C conversion.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                    blk[0], blk[1], blk[2], blk[3],
                ])));
                let dw = _mm_cvtss_f32(dm);
                let coef = if $min {
                    _mm_cvtss_f32(_mm_movehdup_ps(dm))
                } else {
                    -dw
                };
                for i in 0..MR {
                    let a = ld256_i8(qs[i], b * 32);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(v, a), ones);
                    let s = _mm256_set1_ps(dw * d[i][b]);
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i]);
                    fix[i] += coef * corr[i][b];
                }
            }
            let mut r = [0f32; MR];
            for i in 0..MR {
                r[i] = hsum(acc[i]) + fix[i];
            }
            r
        }
    };
}

block32_tile!(q4_1_tile, 20, 4, None, true);
block32_tile!(q5_0_tile, 22, 6, Some(2), false);
block32_tile!(q5_1_tile, 24, 8, Some(4), true);

#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce<const MR: usize, const NR: usize>(acc: &[[__m256; NR]; MR]) -> [[f32; NR]; MR] {
    let mut r = [[0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            r[i][j] = hsum(acc[i][j]);
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// K-quants (Super256 activations): a super-block is taken as 8 chunks of 32 values in element
// order, chunk `q` covering the sub-blocks of 16 `2q` and `2q + 1`. Each chunk's unsigned
// values go through `vpmaddubsw` with the activation bytes and `vpmaddwd` with the chunk's
// per-lane scales; the mins (Q4_K/Q5_K) or the −32 offset (Q6_K) are corrected with the sums
// of 16, and the super-block scales are applied in f32.

/// `vpshufb` indices that broadcast the 16-bit scale of Q4_K/Q5_K sub-block `q` (8 scales as
/// i16 in each 128-bit lane) to every lane.
static Q4K_SHUF: [[u8; 32]; 8] = [
    k_shuf(0, 0),
    k_shuf(2, 2),
    k_shuf(4, 4),
    k_shuf(6, 6),
    k_shuf(8, 8),
    k_shuf(10, 10),
    k_shuf(12, 12),
    k_shuf(14, 14),
];
/// The same for Q6_K chunk `t` of a half super-block (its 8 scales as i16): the scale of
/// sub-block `2t` in the low 128-bit lane, of `2t + 1` in the high one.
static Q6K_SHUF: [[u8; 32]; 4] = [k_shuf(0, 2), k_shuf(4, 6), k_shuf(8, 10), k_shuf(12, 14)];

const fn k_shuf(lo: u8, hi: u8) -> [u8; 32] {
    let mut t = [0u8; 32];
    let mut b = 0;
    while b < 32 {
        let base = if b < 16 { lo } else { hi };
        t[b] = base + (b % 2) as u8;
        b += 1;
    }
    t
}

/// The per-super-block part of a K-quant block, decoded once per tile.
#[derive(Clone, Copy)]
struct KHead {
    /// Sub-block scales as i16, 8 per 128-bit lane (both lanes alike): Q4_K/Q5_K's 8 scales
    /// in both entries; Q6_K's scales 0–7 (`[0]`) and 8–15 (`[1]`).
    sc: [__m256i; 2],
    /// Paired with the 16 sums of 16: Q4_K/Q5_K each sub-block's min twice, Q6_K the 16
    /// scales.
    mins: __m256i,
    d: f32,
    dmin: f32,
}

// The K-quant heads are macros so that they are always inlined into the tiles (as functions
// they were called out of line, the block returned through memory).
macro_rules! q45k_head {
    ($b:expr) => {{
        let b: &[u8] = $b;
        let mut h = [0u8; 16];
        h.copy_from_slice(&b[..16]);
        // ggml's unpack of the 12 scale bytes: 8 six-bit scales, then 8 six-bit mins.
        let u0 = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let u1 = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let u2 = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let (k1, k2, k3) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
        let sc_lo = u0 & k1;
        let sc_hi = (u2 & k2) | (((u0 >> 6) & k3) << 4);
        let mn_lo = u1 & k1;
        let mn_hi = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
        let scales = (u64::from(sc_hi) << 32) | u64::from(sc_lo);
        let mins = (u64::from(mn_hi) << 32) | u64::from(mn_lo);
        let sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
        let mn8 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            h[0], h[1], h[2], h[3],
        ])));
        KHead {
            sc: [sc, sc],
            mins: _mm256_set_m128i(_mm_unpackhi_epi16(mn8, mn8), _mm_unpacklo_epi16(mn8, mn8)),
            d: _mm_cvtss_f32(dd),
            dmin: _mm_cvtss_f32(_mm_movehdup_ps(dd)),
        }
    }};
}

macro_rules! q6k_head {
    ($b:expr) => {{
        let b: &[u8] = $b;
        let scb = ld128(b, 192);
        let sc16 = _mm256_cvtepi8_epi16(scb);
        KHead {
            sc: [
                _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                _mm256_permute2x128_si256::<0x11>(sc16, sc16),
            ],
            mins: sc16,
            d: half(b, 208),
            dmin: 0.0,
        }
    }};
}

/// Q2_K: 16 scales (low nibbles) and 16 mins (high nibbles) of sub-blocks of 16.
macro_rules! q2k_head {
    ($b:expr) => {{
        let b: &[u8] = $b;
        let m4 = _mm_set1_epi8(0x0F);
        let sb = ld128(b, 0);
        let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sb, m4));
        KHead {
            sc: [
                _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                _mm256_permute2x128_si256::<0x11>(sc16, sc16),
            ],
            mins: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sb), m4)),
            d: half(b, 80),
            dmin: half(b, 82),
        }
    }};
}

/// Q3_K: ggml's unpack of 12 bytes into 16 six-bit scales (stored +32), as signed i16, paired
/// with the sums of 16 for the −4 offset of the values.
macro_rules! q3k_head {
    ($b:expr) => {{
        let b: &[u8] = $b;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let (a0, a1, hi) = (word(96), word(100), word(104));
        let (k2, k1) = (0x0f0f_0f0f_u32, 0x0303_0303_u32);
        let s0 = (a0 & k2) | ((hi & k1) << 4);
        let s1 = (a1 & k2) | (((hi >> 2) & k1) << 4);
        let s2 = ((a0 >> 4) & k2) | (((hi >> 4) & k1) << 4);
        let s3 = ((a1 >> 4) & k2) | (((hi >> 6) & k1) << 4);
        let sc8 = _mm_sub_epi8(
            _mm_set_epi32(s3 as i32, s2 as i32, s1 as i32, s0 as i32),
            _mm_set1_epi8(32),
        );
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        KHead {
            sc: [
                _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                _mm256_permute2x128_si256::<0x11>(sc16, sc16),
            ],
            mins: sc16,
            d: half(b, 108),
            dmin: 0.0,
        }
    }};
}

/// Chunks `2c` and `2c + 1` of a Q2_K block (half `c / 2`, chunks `t` and `t + 1` of it with
/// `t = 2 (c % 2)`): bits `2t` and `2t + 2` of the half's 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2k_pair(b: &[u8], h: &KHead, c: usize) -> ([__m256i; 2], [__m256i; 2]) {
    let m3 = _mm256_set1_epi8(3);
    let (n, t) = (c / 2, 2 * (c % 2));
    let x = ld256(b, 16 + 32 * n);
    // 16-bit shifts of at most 6: the mask keeps bits of the same byte.
    let x = _mm256_srl_epi16(x, _mm_cvtsi32_si128(2 * t as i32));
    (
        [
            _mm256_and_si256(x, m3),
            _mm256_and_si256(_mm256_srli_epi16::<2>(x), m3),
        ],
        [
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t], 0)),
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t + 1], 0)),
        ],
    )
}

/// Chunks `2c` and `2c + 1` of a Q3_K block: 2-bit values as Q2_K's (from byte 32), each with
/// its high bit `4 (c / 2) + t` (and `+ 1`) of `hmask` as bit 2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_pair(b: &[u8], h: &KHead, c: usize) -> ([__m256i; 2], [__m256i; 2]) {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm256_set1_epi8(4);
    let (n, t) = (c / 2, 2 * (c % 2));
    let x = _mm256_srl_epi16(ld256(b, 32 + 32 * n), _mm_cvtsi32_si128(2 * t as i32));
    // Bit `4n + t` of each mask byte moved to bit 2 (shifts within 16-bit lanes; the mask
    // keeps the byte's own bit).
    let hm = ld256(b, 0);
    let hb = _mm256_slli_epi16::<2>(_mm256_srl_epi16(hm, _mm_cvtsi32_si128((4 * n + t) as i32)));
    (
        [
            _mm256_or_si256(_mm256_and_si256(x, m3), _mm256_and_si256(hb, m4)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<2>(x), m3),
                _mm256_and_si256(_mm256_srli_epi16::<1>(hb), m4),
            ),
        ],
        [
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t], 0)),
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t + 1], 0)),
        ],
    )
}

/// Chunks `2c` and `2c + 1` of a Q4_K block: values and per-lane scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_pair(b: &[u8], h: &KHead, c: usize) -> ([__m256i; 2], [__m256i; 2]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let x = ld256(b, 16 + 32 * c);
    (
        [
            _mm256_and_si256(x, m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4),
        ],
        [
            _mm256_shuffle_epi8(h.sc[0], ld256(&Q4K_SHUF[2 * c], 0)),
            _mm256_shuffle_epi8(h.sc[0], ld256(&Q4K_SHUF[2 * c + 1], 0)),
        ],
    )
}

/// Chunks `2c` and `2c + 1` of a Q5_K block: the Q4_K nibbles with their fifth bits (qh bits
/// `2c` and `2c + 1`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q5k_pair(b: &[u8], h: &KHead, c: usize) -> ([__m256i; 2], [__m256i; 2]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m1 = _mm256_set1_epi8(1);
    let x = ld256(b, 48 + 32 * c);
    // Shifts of at most 7 within 16-bit lanes: bit 0 of each byte is then its own bit 2c
    // (2c + 1 after one more).
    let hb = _mm256_srl_epi16(ld256(b, 16), _mm_cvtsi32_si128(2 * c as i32));
    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hb, m1));
    let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(hb), m1));
    (
        [
            _mm256_or_si256(_mm256_and_si256(x, m4), h0),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(x), m4), h1),
        ],
        [
            _mm256_shuffle_epi8(h.sc[0], ld256(&Q4K_SHUF[2 * c], 0)),
            _mm256_shuffle_epi8(h.sc[0], ld256(&Q4K_SHUF[2 * c + 1], 0)),
        ],
    )
}

/// Chunks `2c` and `2c + 1` of a Q6_K block (half `c / 2`, chunks `t` and `t + 1` of it with
/// `t = 2 (c % 2)`): low 4 bits from `ql`, high 2 from `qh`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_pair(b: &[u8], h: &KHead, c: usize) -> ([__m256i; 2], [__m256i; 2]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let (n, t) = (c / 2, 2 * (c % 2));
    let l0 = ld256(b, 64 * n);
    let l1 = ld256(b, 64 * n + 32);
    let hi = ld256(b, 128 + 32 * n);
    // 16-bit shifts: the masks keep only bits that come from the same byte.
    let w = if t == 0 {
        [
            _mm256_or_si256(
                _mm256_and_si256(l0, m4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(hi), m30),
            ),
            _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_and_si256(_mm256_slli_epi16::<2>(hi), m30),
            ),
        ]
    } else {
        [
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                _mm256_and_si256(hi, m30),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                _mm256_and_si256(_mm256_srli_epi16::<2>(hi), m30),
            ),
        ]
    };
    (
        w,
        [
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t], 0)),
            _mm256_shuffle_epi8(h.sc[n], ld256(&Q6K_SHUF[t + 1], 0)),
        ],
    )
}

// `$shift`: 0 for the formats with mins (Q2_K, Q4_K, Q5_K: `dmin · Σ min · sums`), else the
// offset's log2 (Q3_K 4, Q6_K 32: `Σ scale · sums` shifted).
macro_rules! k_tile {
    ($name:ident, $bytes:expr, $head:ident, $pair:ident, $shift:literal) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize>(
            wr: &[&[u8]; NR],
            act: &Act,
            _x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let nsb = wr[0].len() / $bytes;
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let zero = _mm256_setzero_si256();
            let mut head = [KHead {
                sc: [zero; 2],
                mins: zero,
                d: 0.0,
                dmin: 0.0,
            }; NR];
            let mut blk: [&[u8]; NR] = [&[]; NR];
            for s in 0..nsb {
                for r in 0..NR {
                    for line in 0..usize::div_ceil($bytes, 64) {
                        prefetch(wr[0], pf + (s * NR + r) * $bytes + 64 * line);
                    }
                    blk[r] = &wr[r][s * $bytes..(s + 1) * $bytes];
                    head[r] = $head!(blk[r]);
                }
                // The super-block's activations as slices of known length: the loads below
                // need no bounds checks.
                let mut aq: [&[i8]; MR] = [&[]; MR];
                for i in 0..MR {
                    aq[i] = &act.qs_row(i0 + i)[s * 256..s * 256 + 256];
                }
                let mut isum = [[zero; NR]; MR];
                for c in 0..4 {
                    let mut wv = [[zero; 4]; NR];
                    for r in 0..NR {
                        let (v, sc) = $pair(blk[r], &head[r], c);
                        wv[r] = [v[0], v[1], sc[0], sc[1]];
                    }
                    for i in 0..MR {
                        for e in 0..2 {
                            let a = ld256_i8(aq[i], 64 * c + 32 * e);
                            for r in 0..NR {
                                let p = _mm256_maddubs_epi16(wv[r][e], a);
                                isum[i][r] = _mm256_add_epi32(
                                    isum[i][r],
                                    _mm256_madd_epi16(p, wv[r][2 + e]),
                                );
                            }
                        }
                    }
                }
                for i in 0..MR {
                    let bs = ld256_i16(act.bsums_row(i0 + i), s * 16);
                    let da = act.d_row(i0 + i)[s];
                    for r in 0..NR {
                        let kh = &head[r];
                        let corr = _mm256_madd_epi16(kh.mins, bs);
                        if $shift > 0 {
                            let v = _mm256_sub_epi32(isum[i][r], _mm256_slli_epi32::<$shift>(corr));
                            acc[i][r] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(v),
                                _mm256_set1_ps(kh.d * da),
                                acc[i][r],
                            );
                        } else {
                            acc[i][r] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(isum[i][r]),
                                _mm256_set1_ps(kh.d * da),
                                acc[i][r],
                            );
                            acc[i][r] = _mm256_fnmadd_ps(
                                _mm256_cvtepi32_ps(corr),
                                _mm256_set1_ps(kh.dmin * da),
                                acc[i][r],
                            );
                        }
                    }
                }
            }
            reduce(&acc)
        }
    };
}

k_tile!(q2k_tile, 84, q2k_head, q2k_pair, 0);
k_tile!(q3k_tile, 110, q3k_head, q3k_pair, 2);
k_tile!(q4k_tile, 144, q45k_head, q4k_pair, 0);
k_tile!(q5k_tile, 176, q45k_head, q5k_pair, 0);
k_tile!(q6k_tile, 210, q6k_head, q6k_pair, 5);

// ---------------------------------------------------------------------------------------------
// F16 / BF16 weights × f32 activations: 8 values per step, widened once per weight row and
// used for MR activation rows; one accumulator per output.

macro_rules! half_tile {
    ($name:ident, $conv:ident) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize>(
            wr: &[&[u8]; NR],
            _act: &Act,
            x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let k = wr[0].len() / 2;
            let mut rows: [&[f32]; MR] = [&[]; MR];
            for i in 0..MR {
                rows[i] = &x[(i0 + i) * k..(i0 + i + 1) * k];
            }
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            // Steps of 32 values (a cache line per weight row), prefetching the next tile's
            // rows in address order, then steps of 8, then the zero-padded tail.
            let (lines, tail) = (k / 32, k % 8);
            for g in 0..lines {
                for r in 0..NR {
                    prefetch(wr[0], pf + (g * NR + r) * 64);
                }
                // One slice per row and step, so the loads below need no bounds checks.
                let mut ws: [&[u8]; NR] = [&[]; NR];
                for r in 0..NR {
                    ws[r] = &wr[r][g * 64..g * 64 + 64];
                }
                let mut xs: [&[f32]; MR] = [&[]; MR];
                for i in 0..MR {
                    xs[i] = &rows[i][g * 32..g * 32 + 32];
                }
                for u in 0..4 {
                    let mut w = [_mm256_setzero_ps(); NR];
                    for r in 0..NR {
                        w[r] = $conv(ld128(ws[r], 16 * u));
                    }
                    for i in 0..MR {
                        let xv = ld256_ps(xs[i], 8 * u);
                        for r in 0..NR {
                            acc[i][r] = _mm256_fmadd_ps(w[r], xv, acc[i][r]);
                        }
                    }
                }
            }
            for at in (lines * 32..k - tail).step_by(8) {
                let mut w = [_mm256_setzero_ps(); NR];
                for r in 0..NR {
                    w[r] = $conv(ld128(wr[r], 2 * at));
                }
                for i in 0..MR {
                    let xv = ld256_ps(rows[i], at);
                    for r in 0..NR {
                        acc[i][r] = _mm256_fmadd_ps(w[r], xv, acc[i][r]);
                    }
                }
            }
            if tail > 0 {
                let at = k - tail;
                let mut w = [_mm256_setzero_ps(); NR];
                for r in 0..NR {
                    let mut buf = [0u8; 16];
                    buf[..tail * 2].copy_from_slice(&wr[r][2 * at..]);
                    w[r] = $conv(ld128(&buf, 0));
                }
                for i in 0..MR {
                    let mut buf = [0f32; 8];
                    buf[..tail].copy_from_slice(&rows[i][at..]);
                    let xv = ld256_ps(&buf, 0);
                    for r in 0..NR {
                        acc[i][r] = _mm256_fmadd_ps(w[r], xv, acc[i][r]);
                    }
                }
            }
            reduce(&acc)
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn conv_f16(v: __m128i) -> __m256 {
    _mm256_cvtph_ps(v)
}

#[inline]
#[target_feature(enable = "avx2")]
fn conv_bf16(v: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
}

half_tile!(f16_tile, conv_f16);
half_tile!(bf16_tile, conv_bf16);

// ---------------------------------------------------------------------------------------------
// The activation quantizer (bit-identical to `act::quantize_block_scalar`: `vcvtps2dq` rounds
// to nearest, ties to even, under the default rounding mode).

/// Quantizes `x` (a multiple of 32 values) into `q`: `(d, Σq)`.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(
        super::KernelPath::Avx2.available() && x.len().is_multiple_of(32) && q.len() == x.len()
    );
    // SAFETY: the CPU has every feature this function enables (checked above).
    unsafe { quantize_block_inner(x, q) }
}

#[target_feature(enable = "avx2,fma")]
fn quantize_block_inner(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut m = _mm256_setzero_ps();
    for c in 0..x.len() / 8 {
        m = _mm256_max_ps(m, _mm256_and_ps(ld256_ps(x, 8 * c), abs));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let mut sum = _mm256_setzero_si256();
    // `vpackssdw`/`vpacksswb` work within 128-bit lanes: this puts the 4-byte groups back in
    // element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for c in 0..x.len() / 32 {
        let v: [__m256i; 4] = std::array::from_fn(|u| {
            _mm256_cvtps_epi32(_mm256_mul_ps(ld256_ps(x, 32 * c + 8 * u), id))
        });
        sum = _mm256_add_epi32(
            sum,
            _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])),
        );
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(
                _mm256_packs_epi32(v[0], v[1]),
                _mm256_packs_epi32(v[2], v[3]),
            ),
            order,
        );
        let dst = &mut q[32 * c..32 * c + 32];
        // SAFETY: `dst` is exactly 32 bytes; unaligned store.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), bytes) };
    }
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    (
        d,
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2))),
    )
}
