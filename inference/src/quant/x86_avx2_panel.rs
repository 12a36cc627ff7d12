//! AVX2 prefill panels for the formats with blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! IQ4_NL, IQ4_XS), where a prompt's many activation rows meet each weight block.
//!
//! The row tiles of `x86_avx2` compute one output per 256-bit accumulator: every block pays a
//! convert, a scale product and an FMA per output, and its 32 products are summed across
//! lanes at the end. Here each run of 4 weight rows is first unpacked into a small panel (per
//! block: the rows' 32 values transposed into 4 vectors `V_k` = bytes `8k..8k + 8` of rows
//! 0, 1, 2, 3, then their scales), so that one `vpmaddubsw` against the activation bytes
//! `8k..8k + 8` broadcast 4 times serves all 4 rows. A block then costs 4 multiplies, the sums
//! and one convert / scale / FMA for 4 outputs (lanes `2r`, `2r + 1` hold row `r`'s halves).
//! The panel of one run (≤ 9 × 32 bytes a block) stays in L1 while every activation row of
//! the call streams past it.
//!
//! - Unsigned values (Q4_0/Q4_1/Q5_0/Q5_1, 0..32): the 4 products are summed in 16 bits
//!   (≤ 4 × 2 × 31 × 127 < 2¹⁵). The offset (Q4_0 −8·d, Q5_0 −16·d) or min (Q4_1/Q5_1 +m) is
//!   `MW`, applied with the activation block's `corr = d·Σq / 2` (each of the 2 lanes).
//! - Signed values (Q8_0, IQ4 table values): `|w| × sign(a, w)`, summed in 32 bits.
#![allow(unsafe_code)]
// Register tiles are indexed by activation row; index loops read clearer here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::{
    __m256, __m256i, _mm_loadl_epi64, _mm256_abs_epi8, _mm256_add_epi16, _mm256_add_epi32,
    _mm256_broadcastq_epi64, _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cvtepi32_ps,
    _mm256_fmadd_ps, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_mul_ps,
    _mm256_permute2x128_si256, _mm256_set1_epi16, _mm256_set1_ps, _mm256_setr_ps,
    _mm256_setzero_ps, _mm256_setzero_si256, _mm256_sign_epi8, _mm256_storeu_ps,
    _mm256_unpackhi_epi64, _mm256_unpacklo_epi64,
};
use std::cell::RefCell;
use std::ops::Range;

use super::act::Act;
use super::kernel::OutChunk;
use super::x86_avx2::{half, iq4_block, iq4_table, nibbles};
use super::x86_load::ld256;
use super::{QWeight, QuantFormat};

/// Below this many activation rows the row tiles win (unpacking a run costs about as much as
/// 4 rows of products).
const PANEL_MIN_M: usize = 16;

/// Activation rows per register tile.
const MR: usize = 6;

/// Whether an AVX2 product of `format` with `m` activation rows runs on the panels.
pub(crate) fn use_panel(format: QuantFormat, m: usize) -> bool {
    m >= PANEL_MIN_M
        && matches!(
            format,
            QuantFormat::Q4_0
                | QuantFormat::Q4_1
                | QuantFormat::Q5_0
                | QuantFormat::Q5_1
                | QuantFormat::Q8_0
                | QuantFormat::IQ4NL
                | QuantFormat::IQ4XS
        )
}

/// Whether the panel of `format` holds unsigned values with an offset or min (else signed).
pub(crate) fn unsigned(format: QuantFormat) -> bool {
    matches!(
        format,
        QuantFormat::Q4_0 | QuantFormat::Q4_1 | QuantFormat::Q5_0 | QuantFormat::Q5_1
    )
}

/// Vectors per block in a panel: `V_0..V_3`, `DW`, `MW` (unsigned); `V_0..V_3`, `|V_0|..|V_3|`,
/// `DW` (signed).
const fn stride(unsigned: bool) -> usize {
    if unsigned { 6 } else { 9 }
}

thread_local! {
    static PANEL: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// Runs `w`'s product over output columns `cols` on panels (`act` quantized as `Natural32`
/// with `off = 1, lanes = 2` for the unsigned formats, `off = 0, lanes = 1` for the signed).
pub(crate) fn chunk(w: &QWeight, act: &Act, m: usize, cols: Range<usize>, out: &mut OutChunk) {
    assert!(super::KernelPath::Avx2.available() && use_panel(w.format(), m));
    PANEL.with(|cell| {
        let mut fresh = Vec::new();
        let mut held = cell.try_borrow_mut();
        // A re-entered call on this thread (cannot happen today: the kernels never wait on
        // the pool) gets a buffer of its own.
        let panel = match held.as_deref_mut() {
            Ok(p) => p,
            Err(_) => &mut fresh,
        };
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        unsafe { chunk_inner(w, act, m, cols, out, panel) }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
fn chunk_inner(
    w: &QWeight,
    act: &Act,
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
    panel: &mut Vec<__m256i>,
) {
    let format = w.format();
    let uns = unsigned(format);
    let nb = w.cols() / 32;
    panel.clear();
    panel.resize(nb * stride(uns), _mm256_setzero_si256());
    let rows = w.rows_view(cols.clone());
    for j in cols.clone().step_by(4) {
        let nr = (cols.end - j).min(4);
        let mut run: [&[u8]; 4] = [&[]; 4];
        for (r, row) in run.iter_mut().enumerate().take(nr) {
            *row = rows.row(j + r);
        }
        build(format, &run[..nr], nb, panel);
        let mut i = 0;
        while i + MR <= m {
            let acc = if uns {
                tile_unsigned::<MR>(panel, nb, act, i)
            } else {
                tile_signed::<MR>(panel, nb, act, i)
            };
            store(&acc, i, j, nr, out);
            i += MR;
        }
        while i < m {
            let acc = if uns {
                tile_unsigned::<1>(panel, nb, act, i)
            } else {
                tile_signed::<1>(panel, nb, act, i)
            };
            store(&acc, i, j, nr, out);
            i += 1;
        }
    }
}

/// Writes row `r < nr` of each accumulator (lanes `2r + 2r + 1`) to `out[i0 + i][j + r]`.
#[inline]
#[target_feature(enable = "avx")]
fn store<const N: usize>(acc: &[__m256; N], i0: usize, j: usize, nr: usize, out: &mut OutChunk) {
    for (i, &a) in acc.iter().enumerate() {
        let mut l = [0f32; 8];
        // SAFETY: `l` holds exactly 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
        for r in 0..nr {
            out.set(i0 + i, j + r, l[2 * r] + l[2 * r + 1]);
        }
    }
}

/// Block `b` of a file-order row: its 32 values in element order (unsigned, or signed for
/// Q8_0/IQ4), its scale `d` and `MW` (the offset times `−d`, or the min; 0 when signed).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn block(format: QuantFormat, row: &[u8], b: usize, table: __m256i) -> (__m256i, f32, f32) {
    match format {
        QuantFormat::Q4_0 => {
            let at = b * 18;
            let d = half(row, at);
            (nibbles(row, at + 2, None), d, -8.0 * d)
        }
        QuantFormat::Q4_1 => {
            let at = b * 20;
            (nibbles(row, at + 4, None), half(row, at), half(row, at + 2))
        }
        QuantFormat::Q5_0 => {
            let at = b * 22;
            let d = half(row, at);
            (nibbles(row, at + 6, Some(at + 2)), d, -16.0 * d)
        }
        QuantFormat::Q5_1 => {
            let at = b * 24;
            (
                nibbles(row, at + 8, Some(at + 4)),
                half(row, at),
                half(row, at + 2),
            )
        }
        QuantFormat::Q8_0 => {
            let at = b * 34;
            (ld256(row, at + 2), half(row, at), 0.0)
        }
        QuantFormat::IQ4NL => {
            let at = b * 18;
            (iq4_block(row, at + 2, table), half(row, at), 0.0)
        }
        QuantFormat::IQ4XS => {
            let (at, ib) = (b / 8 * 136, b % 8);
            let d = half(row, at) * super::scalar::iq4xs_scale(&row[at..at + 136], ib) as f32;
            (iq4_block(row, at + 8 + 16 * ib, table), d, 0.0)
        }
        // Not panel formats (see `use_panel`).
        _ => (_mm256_setzero_si256(), 0.0, 0.0),
    }
}

/// Unpacks the run `rows` (1 to 4 file-order rows; missing rows are zeros) into `panel`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn build(format: QuantFormat, rows: &[&[u8]], nb: usize, panel: &mut [__m256i]) {
    let uns = unsigned(format);
    let table = iq4_table();
    for (b, p) in panel.chunks_exact_mut(stride(uns)).take(nb).enumerate() {
        let mut e = [_mm256_setzero_si256(); 4];
        let (mut d, mut mw) = ([0f32; 4], [0f32; 4]);
        for (r, row) in rows.iter().enumerate() {
            (e[r], d[r], mw[r]) = block(format, row, b, table);
        }
        // 4 × 4 transpose of 64-bit quarters: V_k = quarter k of rows 0, 1, 2, 3.
        let lo01 = _mm256_unpacklo_epi64(e[0], e[1]);
        let hi01 = _mm256_unpackhi_epi64(e[0], e[1]);
        let lo23 = _mm256_unpacklo_epi64(e[2], e[3]);
        let hi23 = _mm256_unpackhi_epi64(e[2], e[3]);
        let v = [
            _mm256_permute2x128_si256::<0x20>(lo01, lo23),
            _mm256_permute2x128_si256::<0x20>(hi01, hi23),
            _mm256_permute2x128_si256::<0x31>(lo01, lo23),
            _mm256_permute2x128_si256::<0x31>(hi01, hi23),
        ];
        p[..4].copy_from_slice(&v);
        let pairs = |s: [f32; 4]| {
            _mm256_castps_si256(_mm256_setr_ps(
                s[0], s[0], s[1], s[1], s[2], s[2], s[3], s[3],
            ))
        };
        if uns {
            p[4] = pairs(d);
            p[5] = pairs(mw);
        } else {
            for k in 0..4 {
                p[4 + k] = _mm256_abs_epi8(v[k]);
            }
            p[8] = pairs(d);
        }
    }
}

/// Bytes `8k..8k + 8` of an activation block, in each 64-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
fn bcast(q: &[i8; 32], k: usize) -> __m256i {
    assert!(k < 4);
    // SAFETY: bytes `8k..8k + 8` lie inside `q` (k < 4, checked above); `movq` loads 8
    // unaligned bytes.
    unsafe { _mm256_broadcastq_epi64(_mm_loadl_epi64(q.as_ptr().add(8 * k).cast())) }
}

/// Activation rows `i0..i0 + N`'s values, scales and corrections.
type Rows<'a, const N: usize> = ([&'a [i8]; N], [&'a [f32]; N], [&'a [f32]; N]);

fn act_rows<const N: usize>(act: &Act, i0: usize) -> Rows<'_, N> {
    let mut r: Rows<'_, N> = ([&[]; N], [&[]; N], [&[]; N]);
    for i in 0..N {
        r.0[i] = act.qs_row(i0 + i);
        r.1[i] = act.d_row(i0 + i);
        r.2[i] = act.corr_row(i0 + i);
    }
    r
}

/// `N` activation rows against an unsigned panel: lanes `2r`, `2r + 1` of `acc[i]` sum to
/// output `(i0 + i, r)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tile_unsigned<const N: usize>(
    panel: &[__m256i],
    nb: usize,
    act: &Act,
    i0: usize,
) -> [__m256; N] {
    let ones = _mm256_set1_epi16(1);
    let (qs, d, corr) = act_rows::<N>(act, i0);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, p) in panel.chunks_exact(6).take(nb).enumerate() {
        let (v0, v1, v2, v3) = (p[0], p[1], p[2], p[3]);
        let (dw, mw) = (_mm256_castsi256_ps(p[4]), _mm256_castsi256_ps(p[5]));
        for i in 0..N {
            let Some(q) = qs[i][b * 32..].first_chunk::<32>() else {
                continue;
            };
            let s = _mm256_add_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(v0, bcast(q, 0)),
                    _mm256_maddubs_epi16(v1, bcast(q, 1)),
                ),
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(v2, bcast(q, 2)),
                    _mm256_maddubs_epi16(v3, bcast(q, 3)),
                ),
            );
            let t = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)),
                _mm256_set1_ps(d[i][b]),
            );
            acc[i] = _mm256_fmadd_ps(t, dw, acc[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(corr[i][b]), mw, acc[i]);
        }
    }
    acc
}

/// `N` activation rows against a signed panel (`|w| × sign(a, w)`), lanes as in
/// [`tile_unsigned`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tile_signed<const N: usize>(panel: &[__m256i], nb: usize, act: &Act, i0: usize) -> [__m256; N] {
    let ones = _mm256_set1_epi16(1);
    let (qs, d, _) = act_rows::<N>(act, i0);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, p) in panel.chunks_exact(9).take(nb).enumerate() {
        let (w0, w1, w2, w3) = (p[4], p[5], p[6], p[7]);
        let dw = _mm256_castsi256_ps(p[8]);
        for i in 0..N {
            let Some(q) = qs[i][b * 32..].first_chunk::<32>() else {
                continue;
            };
            let prod = |w: __m256i, v: __m256i, k: usize| {
                _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w, _mm256_sign_epi8(bcast(q, k), v)),
                    ones,
                )
            };
            let s = _mm256_add_epi32(
                _mm256_add_epi32(prod(w0, p[0], 0), prod(w1, p[1], 1)),
                _mm256_add_epi32(prod(w2, p[2], 2), prod(w3, p[3], 3)),
            );
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d[i][b]));
            acc[i] = _mm256_fmadd_ps(t, dw, acc[i]);
        }
    }
    acc
}
