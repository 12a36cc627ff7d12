//! AVX2 + FMA + F16C kernels for Q4_0 and Q8_0 (`vpmaddubsw` + `vpmaddwd`). Q4_0 is fed
//! unsigned (0..15, corrected with the activation sums); Q8_0 uses the sign trick
//! (`|w| × sign(a, w)`), since `q + 128` would overflow `vpmaddubsw`'s 16-bit pairs.
//! Formats without an AVX2 kernel run the scalar one on this path.
#![allow(unsafe_code)]
// Register tiles are indexed by (activation row, weight row); index loops read clearer here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::{
    __m128, __m128i, __m256, __m256i, _MM_HINT_T0, _mm_add_ps, _mm_cvtph_ps, _mm_cvtss_f32,
    _mm_hadd_ps, _mm_loadu_ps, _mm_loadu_si128, _mm_prefetch, _mm_set_epi16, _mm256_abs_epi8,
    _mm256_add_epi16, _mm256_and_si256, _mm256_castps128_ps256, _mm256_castps256_ps128,
    _mm256_cvtepi32_ps, _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_fmsub_ps,
    _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_permutevar8x32_ps,
    _mm256_set_m128i, _mm256_set1_epi8, _mm256_set1_epi16, _mm256_set1_ps, _mm256_setr_epi32,
    _mm256_setzero_ps, _mm256_sign_epi8, _mm256_srli_epi16,
};
use std::ops::Range;

use super::act::Act;
use super::kernel::OutChunk;
use super::scalar::f16_to_f32;
use super::{QWeight, QuantFormat};

#[inline]
#[target_feature(enable = "avx2")]
fn ld256(s: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: bytes `at..at + 32` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn ld256_i8(s: &[i8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: bytes `at..at + 32` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
fn ld128(s: &[u8], at: usize) -> __m128i {
    assert!(at + 16 <= s.len());
    // SAFETY: bytes `at..at + 16` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
fn ld128_ps(s: &[f32], at: usize) -> __m128 {
    assert!(at + 4 <= s.len());
    // SAFETY: values `at..at + 4` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm_loadu_ps(s.as_ptr().add(at)) }
}

/// Asks for the cache line at `s + at` (which may lie past `s`: the next row).
#[inline]
fn prefetch(s: &[u8], at: usize) {
    let p = s.as_ptr().wrapping_add(at);
    // SAFETY: a prefetch is a hint that never faults and never reads into registers,
    // whatever the address; the pointer is only formed with wrapping arithmetic.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
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
        for j in cols {
            let wr = [w.row(j)];
            let mut i = 0;
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

/// Runs the kernel of `w`'s format over output columns `cols` (Q4_0 and Q8_0 only).
pub(crate) fn chunk(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    if !matches!(w.format(), QuantFormat::Q4_0 | QuantFormat::Q8_0) {
        super::scalar::chunk(w, act, x, m, cols, out);
        return;
    }
    assert!(super::KernelPath::Avx2.available());
    // SAFETY: the CPU has every feature this function enables (checked above).
    unsafe { chunk_inner(w, act, m, cols, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn chunk_inner(w: &QWeight, act: &Act, m: usize, cols: Range<usize>, out: &mut OutChunk) {
    if w.format() == QuantFormat::Q4_0 {
        drive!(q4_0_tile, w, act, m, cols, out);
    } else {
        drive!(q8_0_tile, w, act, m, cols, out);
    }
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
            let qs = act.qs_row(i0 + i);
            let a = g * 128;
            let da = _mm256_castps128_ps256(ld128_ps(act.d_row(i0 + i), g * 4));
            let c = _mm256_castps128_ps256(ld128_ps(act.corr_row(i0 + i), g * 4));
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

/// Q8_0 (Natural32 layout): one block per step, `|w| × sign(a, w)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_tile<const MR: usize>(wr: &[&[u8]; 1], act: &Act, i0: usize, pf: usize) -> [f32; MR] {
    let row = wr[0];
    let nb = row.len() / 34;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MR];
    for b in 0..nb {
        prefetch(row, b * 34 + pf);
        let w = ld256(row, b * 34 + 2);
        let aw = _mm256_abs_epi8(w);
        let dw = f16_to_f32(u16::from_le_bytes([row[b * 34], row[b * 34 + 1]]));
        for i in 0..MR {
            let a = ld256_i8(act.qs_row(i0 + i), b * 32);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
            let s = _mm256_set1_ps(dw * act.d_row(i0 + i)[b]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i]);
        }
    }
    let mut r = [0f32; MR];
    for (o, a) in r.iter_mut().zip(acc) {
        *o = hsum(a);
    }
    r
}
