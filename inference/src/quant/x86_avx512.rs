//! AVX-512 kernels (F, BW, VL, VNNI, VBMI): `vpdpbusd` multiplies unsigned weight bytes by
//! signed activation bytes, so every format is fed to it with unsigned weights — Q4_0 and the
//! K-quants are unsigned as stored (their offsets are corrected with the activation sums),
//! Q8_0 is flipped to `q + 128` (corrected the same way).
//!
//! Tiles: `MR` activation rows × `NR` weight rows per inner loop, so each weight block is
//! decoded once and used `MR` times, and each activation block is loaded once per `NR` rows.
#![allow(unsafe_code)]
// Register tiles are indexed by (activation row, weight row); index loops read clearer here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::{
    __m128, __m128i, __m256i, __m512, __m512i, _MM_HINT_T0, _mm_loadu_ps, _mm_loadu_si128,
    _mm_prefetch, _mm256_cvtepi8_epi16, _mm256_loadu_si256, _mm256_madd_epi16, _mm512_and_si512,
    _mm512_broadcast_i64x4, _mm512_castps128_ps512, _mm512_castsi256_si512, _mm512_castsi512_ps,
    _mm512_castsi512_si256, _mm512_cvtepi8_epi32, _mm512_cvtepi32_ps, _mm512_cvtepu16_epi32,
    _mm512_cvtph_ps, _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_fmsub_ps, _mm512_fnmadd_ps,
    _mm512_inserti64x4, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_add_epi8,
    _mm512_mullo_epi32, _mm512_or_si512, _mm512_permutex2var_epi8, _mm512_permutexvar_epi8,
    _mm512_permutexvar_epi32, _mm512_permutexvar_ps, _mm512_reduce_add_ps, _mm512_set1_epi8,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512, _mm512_slli_epi32, _mm512_sllv_epi16,
    _mm512_srli_epi16, _mm512_srlv_epi16, _mm512_sub_epi32, _mm512_test_epi8_mask,
    _mm512_xor_si512, _mm512_zextsi256_si512,
};
use std::ops::Range;

use super::act::Act;
use super::kernel::OutChunk;
use super::scalar::{f16_to_f32, scale_min_k4};
use super::{QWeight, QuantFormat};

// ---------------------------------------------------------------------------------------------
// Bounds-checked loads: every raw-pointer read of the kernels goes through these.

#[inline]
#[target_feature(enable = "avx512f")]
fn ld512(s: &[u8], at: usize) -> __m512i {
    assert!(at + 64 <= s.len());
    // SAFETY: bytes `at..at + 64` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm512_loadu_si512(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn ld512_i8(s: &[i8], at: usize) -> __m512i {
    assert!(at + 64 <= s.len());
    // SAFETY: bytes `at..at + 64` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm512_loadu_si512(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn ld256(s: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: bytes `at..at + 32` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn ld256_i16(s: &[i16], at: usize) -> __m256i {
    assert!(at + 16 <= s.len());
    // SAFETY: values `at..at + 16` are inside `s` (checked above); the load is unaligned.
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

#[inline]
#[target_feature(enable = "avx512f")]
fn ld512_ps(s: &[f32], at: usize) -> __m512 {
    assert!(at + 16 <= s.len());
    // SAFETY: values `at..at + 16` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm512_loadu_ps(s.as_ptr().add(at)) }
}

/// Asks for the cache line at `s + at` (which may lie past `s`: the next tile's rows).
#[inline]
fn prefetch(s: &[u8], at: usize) {
    let p = s.as_ptr().wrapping_add(at);
    // SAFETY: a prefetch is a hint that never faults and never reads into registers,
    // whatever the address; the pointer is only formed with wrapping arithmetic.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

// ---------------------------------------------------------------------------------------------
// Byte-permute tables.

/// Q4_0, a group of 4 blocks (72 bytes) loaded as `a = bytes[0..64]`, `b = bytes[8..72]`:
/// the 4 × 16 nibble bytes in block order.
const fn q4_0_qs_index() -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        let src = (j / 16) * 18 + 2 + j % 16;
        t[j] = if src < 64 {
            src as u8
        } else {
            (64 + src - 8) as u8
        };
        j += 1;
    }
    t
}

/// Q4_0: 16 halves, half `h` = the scale of block `h / 4` (4 lanes per block).
const fn q4_0_scale_index() -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut j = 0;
    while j < 32 {
        t[j] = ((j / 2 / 4) * 18 + j % 2) as u8;
        j += 1;
    }
    t
}

/// Q8_0, a pair of blocks (68 bytes) loaded as `a = bytes[0..64]`, `b = bytes[4..68]`: the
/// 2 × 32 value bytes in order.
const fn q8_0_qs_index() -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        let src = (j / 32) * 34 + 2 + j % 32;
        t[j] = if src < 64 {
            src as u8
        } else {
            (64 + src - 4) as u8
        };
        j += 1;
    }
    t
}

/// Q8_0: 16 halves, half `h` = the scale of block `h / 8` (8 lanes per block).
const fn q8_0_scale_index() -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut j = 0;
    while j < 32 {
        t[j] = ((j / 2 / 8) * 34 + j % 2) as u8;
        j += 1;
    }
    t
}

/// Lane `l` ← lane `l / div` (+ `add`), as i32 lane indices.
const fn lane_index(div: usize, add: usize) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut l = 0;
    while l < 16 {
        t[l * 4] = (l / div + add) as u8;
        l += 1;
    }
    t
}

static Q4_0_QS: [u8; 64] = q4_0_qs_index();
static Q4_0_SC: [u8; 64] = q4_0_scale_index();
static Q8_0_QS: [u8; 64] = q8_0_qs_index();
static Q8_0_SC: [u8; 64] = q8_0_scale_index();
static EXPAND4: [u8; 64] = lane_index(4, 0);
static EXPAND8: [u8; 64] = lane_index(8, 0);
static Q4K_SC: [[u8; 64]; 4] = [
    lane_index(8, 0),
    lane_index(8, 2),
    lane_index(8, 4),
    lane_index(8, 6),
];
static Q6K_SC: [[u8; 64]; 4] = [
    lane_index(4, 0),
    lane_index(4, 4),
    lane_index(4, 8),
    lane_index(4, 12),
];
/// Per-16-bit-lane shift counts for Q6_K's high bits: `[lower 256 bits, upper 256 bits]`.
static Q6K_SHL: [u8; 64] = shift_counts(4, 2);
static Q6K_SHR: [u8; 64] = shift_counts(0, 2);
/// Q5_K: the qh bit of the low (bits `2c`) and high (bits `2c + 1`) halves of chunk `c`.
static Q5K_BITS: [[u8; 64]; 4] = [q5_bits(0), q5_bits(1), q5_bits(2), q5_bits(3)];

const fn shift_counts(lo: u16, hi: u16) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut l = 0;
    while l < 32 {
        t[l * 2] = if l < 16 { lo as u8 } else { hi as u8 };
        l += 1;
    }
    t
}

const fn q5_bits(c: usize) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        t[j] = if j < 32 {
            1 << (2 * c)
        } else {
            1 << (2 * c + 1)
        };
        j += 1;
    }
    t
}

// ---------------------------------------------------------------------------------------------
// The driver: walks the chunk's weight rows in groups of NR and the activation rows in groups
// of MR, with smaller tiles for the edges.

macro_rules! drive {
    ($tile:ident, $w:expr, $act:expr, $x:expr, $m:expr, $cols:expr, $out:expr) => {{
        let (w, act, x, m, cols, out): (
            &QWeight,
            &Act,
            &[f32],
            usize,
            Range<usize>,
            &mut OutChunk,
        ) = ($w, $act, $x, $m, $cols, $out);
        let rb = w.row_bytes();
        let mut j = cols.start;
        while j < cols.end {
            if m < 4 && cols.end - j >= 8 {
                // Decode: one activation row against 8 weight rows, 8 independent chains.
                let wr: [&[u8]; 8] = std::array::from_fn(|r| w.row(j + r));
                for i in 0..m {
                    let r = $tile::<1, 8>(&wr, act, x, i, 8 * rb);
                    for (dj, &v) in r[0].iter().enumerate() {
                        out.set(i, j + dj, v);
                    }
                }
                j += 8;
            } else if cols.end - j >= 4 {
                let wr = [w.row(j), w.row(j + 1), w.row(j + 2), w.row(j + 3)];
                let mut i = 0;
                while i + 4 <= m {
                    let r = $tile::<4, 4>(&wr, act, x, i, 4 * rb);
                    for (di, row) in r.iter().enumerate() {
                        for (dj, &v) in row.iter().enumerate() {
                            out.set(i + di, j + dj, v);
                        }
                    }
                    i += 4;
                }
                while i < m {
                    let r = $tile::<1, 4>(&wr, act, x, i, 4 * rb);
                    for (dj, &v) in r[0].iter().enumerate() {
                        out.set(i, j + dj, v);
                    }
                    i += 1;
                }
                j += 4;
            } else {
                let wr = [w.row(j)];
                let mut i = 0;
                while i + 4 <= m {
                    let r = $tile::<4, 1>(&wr, act, x, i, rb);
                    for (di, row) in r.iter().enumerate() {
                        out.set(i + di, j, row[0]);
                    }
                    i += 4;
                }
                while i < m {
                    let r = $tile::<1, 1>(&wr, act, x, i, rb);
                    out.set(i, j, r[0][0]);
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
    assert!(super::KernelPath::Avx512Vnni.available());
    // SAFETY: the CPU has every feature these functions enable (checked above).
    unsafe { chunk_inner(w, act, x, m, cols, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn chunk_inner(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    match w.format() {
        QuantFormat::Q4_0 => drive!(q4_0_tile, w, act, x, m, cols, out),
        QuantFormat::Q8_0 => drive!(q8_0_tile, w, act, x, m, cols, out),
        QuantFormat::Q4K => drive!(q4k_tile, w, act, x, m, cols, out),
        QuantFormat::Q5K => drive!(q5k_tile, w, act, x, m, cols, out),
        QuantFormat::Q6K => drive!(q6k_tile, w, act, x, m, cols, out),
        QuantFormat::F16 => drive!(f16_tile, w, act, x, m, cols, out),
        QuantFormat::BF16 => drive!(bf16_tile, w, act, x, m, cols, out),
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn reduce<const MR: usize, const NR: usize>(acc: &[[__m512; NR]; MR]) -> [[f32; NR]; MR] {
    let mut r = [[0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            r[i][j] = _mm512_reduce_add_ps(acc[i][j]);
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Q4_0 × Q8 (Group4 layout): per group of 4 blocks, the low nibbles of the 4 blocks against the
// activations' first halves, the high nibbles against the second halves; lane quad L = block L.

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn q4_0_tile<const MR: usize, const NR: usize>(
    wr: &[&[u8]; NR],
    act: &Act,
    _x: &[f32],
    i0: usize,
    pf: usize,
) -> [[f32; NR]; MR] {
    let nb = wr[0].len() / 18;
    let (full, tail) = (nb / 4, nb % 4);
    let idx_qs = ld512(&Q4_0_QS, 0);
    let idx_sc = ld512(&Q4_0_SC, 0);
    let exp4 = ld512(&EXPAND4, 0);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut tailbuf = [[0u8; 72]; NR];
    for r in 0..NR {
        tailbuf[r][..tail * 18].copy_from_slice(&wr[r][full * 72..]);
    }
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let groups = full + usize::from(tail > 0);
    for g in 0..groups {
        let mut wlo = [_mm512_setzero_si512(); NR];
        let mut whi = [_mm512_setzero_si512(); NR];
        let mut dw = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            prefetch(wr[r], g * 72 + pf);
            let (src, at): (&[u8], usize) = if g < full {
                (wr[r], g * 72)
            } else {
                (&tailbuf[r], 0)
            };
            let a = ld512(src, at);
            let b = ld512(src, at + 8);
            let q = _mm512_permutex2var_epi8(a, idx_qs, b);
            wlo[r] = _mm512_and_si512(q, m4);
            whi[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
            dw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(idx_sc, a)));
        }
        for i in 0..MR {
            let qs = act.qs_row(i0 + i);
            let alo = ld512_i8(qs, g * 128);
            let ahi = ld512_i8(qs, g * 128 + 64);
            let da = _mm512_permutexvar_ps(
                exp4,
                _mm512_castps128_ps512(ld128_ps(act.d_row(i0 + i), g * 4)),
            );
            let c = _mm512_permutexvar_ps(
                exp4,
                _mm512_castps128_ps512(ld128_ps(act.corr_row(i0 + i), g * 4)),
            );
            for r in 0..NR {
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wlo[r], alo);
                let p = _mm512_dpbusd_epi32(p, whi[r], ahi);
                let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(p), da, c);
                acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
            }
        }
    }
    reduce(&acc)
}

// ---------------------------------------------------------------------------------------------
// Q8_0 × Q8 (Natural32 layout): per pair of blocks, weights flipped to q + 128; lanes 0–7 are
// the first block, 8–15 the second.

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn q8_0_tile<const MR: usize, const NR: usize>(
    wr: &[&[u8]; NR],
    act: &Act,
    _x: &[f32],
    i0: usize,
    pf: usize,
) -> [[f32; NR]; MR] {
    let nb = wr[0].len() / 34;
    let (full, tail) = (nb / 2, nb % 2);
    let idx_qs = ld512(&Q8_0_QS, 0);
    let idx_sc = ld512(&Q8_0_SC, 0);
    let exp8 = ld512(&EXPAND8, 0);
    let flip = _mm512_set1_epi8(-128);
    let mut tailbuf = [[0u8; 68]; NR];
    for r in 0..NR {
        tailbuf[r][..tail * 34].copy_from_slice(&wr[r][full * 68..]);
    }
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let groups = full + tail;
    for g in 0..groups {
        let mut wq = [_mm512_setzero_si512(); NR];
        let mut dw = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            prefetch(wr[r], g * 68 + pf);
            let (src, at): (&[u8], usize) = if g < full {
                (wr[r], g * 68)
            } else {
                (&tailbuf[r], 0)
            };
            let a = ld512(src, at);
            let b = ld512(src, at + 4);
            wq[r] = _mm512_xor_si512(_mm512_permutex2var_epi8(a, idx_qs, b), flip);
            dw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(idx_sc, a)));
        }
        for i in 0..MR {
            let aq = ld512_i8(act.qs_row(i0 + i), g * 64);
            let da = _mm512_permutexvar_ps(
                exp8,
                _mm512_castps128_ps512(ld128_ps(act.d_row(i0 + i), g * 2)),
            );
            let c = _mm512_permutexvar_ps(
                exp8,
                _mm512_castps128_ps512(ld128_ps(act.corr_row(i0 + i), g * 2)),
            );
            for r in 0..NR {
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[r], aq);
                let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(p), da, c);
                acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
            }
        }
    }
    reduce(&acc)
}

// ---------------------------------------------------------------------------------------------
// K-quants × Q8_K (Super256 layout): per super-block, 4 chunks of 64 values; the integer sum
// of (scale × dot) per pair, then the super-block scales in f32.

/// One decoded K-quant super-block of one weight row.
struct KBlock {
    /// Unsigned values of the 4 chunks of 64, in element order.
    w: [__m512i; 4],
    /// Per-lane sub-block scales of each chunk.
    sc: [__m512i; 4],
    /// Q4_K/Q5_K: each sub-block's min twice (pairs with the 16 sums of 16); Q6_K: the 16
    /// scales (the −32 offset correction).
    mins: __m256i,
    d: f32,
    dmin: f32,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn decode_q45k(b: &[u8], five: bool) -> KBlock {
    let m4 = _mm512_set1_epi8(0x0F);
    let scales = &b[4..16];
    let mut sc = [0i32; 16];
    let mut mins = [0i16; 16];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, scales);
        sc[j] = i32::from(s);
        mins[2 * j] = i16::from(m);
        mins[2 * j + 1] = i16::from(m);
    }
    let sc8 = _mm512_castsi256_si512(ld256_i32(&sc));
    let qs_at = if five { 48 } else { 16 };
    let qh = if five {
        _mm512_broadcast_i64x4(ld256(b, 16))
    } else {
        _mm512_setzero_si512()
    };
    let mut w = [_mm512_setzero_si512(); 4];
    let mut scv = [_mm512_setzero_si512(); 4];
    for c in 0..4 {
        let x = _mm512_castsi256_si512(ld256(b, qs_at + 32 * c));
        let lohi = _mm512_inserti64x4::<1>(x, _mm512_castsi512_si256(_mm512_srli_epi16::<4>(x)));
        let mut v = _mm512_and_si512(lohi, m4);
        if five {
            let bits = ld512(&Q5K_BITS[c], 0);
            let k = _mm512_test_epi8_mask(qh, bits);
            v = _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(16));
        }
        w[c] = v;
        scv[c] = _mm512_permutexvar_epi32(ld512(&Q4K_SC[c], 0), sc8);
    }
    KBlock {
        w,
        sc: scv,
        mins: ld256_i16(&mins, 0),
        d: half(b, 0),
        dmin: half(b, 2),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn ld256_i32(s: &[i32; 16]) -> __m256i {
    // SAFETY: the first 8 of the 16 values are read; unaligned load.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn decode_q6k(b: &[u8]) -> KBlock {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let shl = ld512(&Q6K_SHL, 0);
    let shr = ld512(&Q6K_SHR, 0);
    let sc_bytes = ld128(b, 192);
    let sc16 = _mm512_cvtepi8_epi32(sc_bytes);
    let mut w = [_mm512_setzero_si512(); 4];
    for n in 0..2 {
        let l = ld512(b, 64 * n);
        let h = _mm512_broadcast_i64x4(ld256(b, 128 + 32 * n));
        let hi0 = _mm512_and_si512(_mm512_sllv_epi16(h, shl), m30);
        let hi1 = _mm512_and_si512(_mm512_srlv_epi16(h, shr), m30);
        w[2 * n] = _mm512_or_si512(_mm512_and_si512(l, m4), hi0);
        w[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(l), m4), hi1);
    }
    let mut scv = [_mm512_setzero_si512(); 4];
    for (t, s) in scv.iter_mut().enumerate() {
        *s = _mm512_permutexvar_epi32(ld512(&Q6K_SC[t], 0), sc16);
    }
    KBlock {
        w,
        sc: scv,
        mins: _mm256_cvtepi8_epi16(sc_bytes),
        d: half(b, 208),
        dmin: 0.0,
    }
}

macro_rules! k_tile {
    ($name:ident, $bytes:expr, $decode:expr, $six:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize>(
            wr: &[&[u8]; NR],
            act: &Act,
            _x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let nsb = wr[0].len() / $bytes;
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            for s in 0..nsb {
                let blocks: [KBlock; NR] = std::array::from_fn(|r| {
                    for line in (0..$bytes).step_by(64) {
                        prefetch(wr[r], s * $bytes + line + pf);
                    }
                    $decode(&wr[r][s * $bytes..(s + 1) * $bytes])
                });
                for i in 0..MR {
                    let qs = act.qs_row(i0 + i);
                    let a = [
                        ld512_i8(qs, s * 256),
                        ld512_i8(qs, s * 256 + 64),
                        ld512_i8(qs, s * 256 + 128),
                        ld512_i8(qs, s * 256 + 192),
                    ];
                    let bs = ld256_i16(act.bsums_row(i0 + i), s * 16);
                    let da = act.d_row(i0 + i)[s];
                    for r in 0..NR {
                        let kb = &blocks[r];
                        let mut isum = _mm512_setzero_si512();
                        for c in 0..4 {
                            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), kb.w[c], a[c]);
                            isum = std::arch::x86_64::_mm512_add_epi32(
                                isum,
                                _mm512_mullo_epi32(p, kb.sc[c]),
                            );
                        }
                        let corr = _mm512_zextsi256_si512(_mm256_madd_epi16(kb.mins, bs));
                        if $six {
                            isum = _mm512_sub_epi32(isum, _mm512_slli_epi32::<5>(corr));
                            acc[i][r] = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(isum),
                                _mm512_set1_ps(kb.d * da),
                                acc[i][r],
                            );
                        } else {
                            acc[i][r] = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(isum),
                                _mm512_set1_ps(kb.d * da),
                                acc[i][r],
                            );
                            acc[i][r] = _mm512_fnmadd_ps(
                                _mm512_cvtepi32_ps(corr),
                                _mm512_set1_ps(kb.dmin * da),
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

k_tile!(q4k_tile, 144, |b| decode_q45k(b, false), false);
k_tile!(q5k_tile, 176, |b| decode_q45k(b, true), false);
k_tile!(q6k_tile, 210, decode_q6k, true);

// ---------------------------------------------------------------------------------------------
// F16 / BF16 weights × f32 activations: 16 values per step, converted once per weight row and
// used for MR activation rows.

macro_rules! half_tile {
    ($name:ident, $conv:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize>(
            wr: &[&[u8]; NR],
            _act: &Act,
            x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let k = wr[0].len() / 2;
            let full = k / 16;
            let tail = k % 16;
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(i0 + i) * k..(i0 + i + 1) * k]);
            for g in 0..full {
                let w: [__m512; NR] = std::array::from_fn(|r| {
                    prefetch(wr[r], g * 32 + pf);
                    $conv(ld256(wr[r], g * 32))
                });
                for i in 0..MR {
                    let xv = ld512_ps(rows[i], g * 16);
                    for r in 0..NR {
                        acc[i][r] = _mm512_fmadd_ps(w[r], xv, acc[i][r]);
                    }
                }
            }
            if tail > 0 {
                let w: [__m512; NR] = std::array::from_fn(|r| {
                    let mut buf = [0u8; 32];
                    buf[..tail * 2].copy_from_slice(&wr[r][full * 32..]);
                    $conv(ld256(&buf, 0))
                });
                for i in 0..MR {
                    let mut buf = [0f32; 16];
                    buf[..tail].copy_from_slice(&rows[i][full * 16..]);
                    let xv = ld512_ps(&buf, 0);
                    for r in 0..NR {
                        acc[i][r] = _mm512_fmadd_ps(w[r], xv, acc[i][r]);
                    }
                }
            }
            reduce(&acc)
        }
    };
}

#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn conv_f16(v: __m256i) -> __m512 {
    _mm512_cvtph_ps(v)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn conv_bf16(v: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
}

half_tile!(f16_tile, conv_f16);
half_tile!(bf16_tile, conv_bf16);
