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
    __m128, __m256i, __m512, __m512i, __mmask16, _mm_cvtepu8_epi16, _mm_cvtph_ps,
    _mm_cvtsi32_si128, _mm_cvtsi64_si128, _mm_cvtss_f32, _mm_movehdup_ps, _mm_movehl_ps,
    _mm_set_epi16, _mm_setr_ps, _mm_storeu_si128, _mm_unpackhi_epi16, _mm_unpacklo_epi16,
    _mm256_and_si256, _mm256_cvtepi8_epi16, _mm256_cvtepu8_epi32, _mm256_madd_epi16,
    _mm256_set_m128i, _mm256_set1_epi8, _mm256_srli_epi16, _mm512_abs_ps, _mm512_add_epi32,
    _mm512_and_si512, _mm512_broadcast_i32x4, _mm512_broadcast_i64x4, _mm512_castps_si512,
    _mm512_castps128_ps512, _mm512_castsi256_si512, _mm512_castsi512_ps, _mm512_castsi512_si256,
    _mm512_cvtepi8_epi32, _mm512_cvtepi32_epi8, _mm512_cvtepi32_epi16, _mm512_cvtepi32_ps,
    _mm512_cvtepu16_epi32, _mm512_cvtph_ps, _mm512_cvtps_epi32, _mm512_dpbusd_epi32,
    _mm512_fmadd_ps, _mm512_fmsub_ps, _mm512_fnmadd_ps, _mm512_inserti64x4, _mm512_loadu_ps,
    _mm512_loadu_si512, _mm512_mask_add_epi8, _mm512_mask_i32gather_epi32, _mm512_maskz_xor_epi32,
    _mm512_max_ps, _mm512_mul_ps, _mm512_mullo_epi32, _mm512_or_si512, _mm512_permutex2var_epi8,
    _mm512_permutexvar_epi8, _mm512_permutexvar_epi32, _mm512_permutexvar_ps,
    _mm512_reduce_add_epi32, _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_set1_epi8,
    _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
    _mm512_shuffle_epi8, _mm512_shuffle_i64x2, _mm512_slli_epi32, _mm512_sllv_epi16,
    _mm512_srli_epi16, _mm512_srli_epi32, _mm512_srlv_epi16, _mm512_srlv_epi32, _mm512_storeu_ps,
    _mm512_storeu_si512, _mm512_sub_epi32, _mm512_test_epi8_mask, _mm512_xor_si512,
    _mm512_zextsi256_si512,
};
use std::cell::RefCell;
use std::ops::Range;

use super::act::Act;
use super::kernel::OutChunk;
use super::scalar::{f16_to_f32, scale_min_k4};
use super::x86_load::{ld128, ld128_ps, ld256, ld256_i16, prefetch, prefetch_l2};
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
#[target_feature(enable = "avx512f")]
fn ld512_ps(s: &[f32], at: usize) -> __m512 {
    assert!(at + 16 <= s.len());
    // SAFETY: values `at..at + 16` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm512_loadu_ps(s.as_ptr().add(at)) }
}

/// The f16 at `b[at..at + 2]` as f32 (F16C: the portable conversion is a branchy function
/// call, which cost a quarter of a decode step where it ran once per block).
#[inline]
#[target_feature(enable = "f16c")]
fn half(b: &[u8], at: usize) -> f32 {
    let bits = i32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
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

/// All activation rows against one tile of 4 weight rows (`$bytes`, stored as `$packed`).
macro_rules! tiles4 {
    ($tile:ident, $packed:literal, $bytes:expr, $act:expr, $x:expr, $m:expr, $j:expr, $pf:expr,
     $out:expr) => {{
        let mut i = 0;
        while i + 4 <= $m {
            let r = $tile::<4, 4, $packed>($bytes, $act, $x, i, $pf);
            for (di, row) in r.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate() {
                    $out.set(i + di, $j + dj, v);
                }
            }
            i += 4;
        }
        while i < $m {
            let r = $tile::<1, 4, $packed>($bytes, $act, $x, i, $pf);
            for (dj, &v) in r[0].iter().enumerate() {
                $out.set(i, $j + dj, v);
            }
            i += 1;
        }
    }};
}

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
        // Decode tiles are 4 weight rows for every format: 8-row tiles (tried for Q8_0, F16
        // and BF16) streamed slower from memory, as 8 interleaved streams (in the model, 1
        // thread: F16 17.0–17.7 against 18.1–18.6 tok/s, Q8_0 29.1–30.5 against 29.8–33.3).
        // Rows stored as `Tiles4` are read in place, one stream per tile; a chunk edge inside
        // a run of 4 such rows (chunks split on multiples of 16, so only in tests) reads
        // gathered single rows.
        // The tiles are not inlined here: inlined into this one large function, the Q4_0
        // tile's code changed with the other formats' (removing the unused 8-row branch made
        // Q4_0 decode 9% slower at 1 thread); as their own functions each is compiled alone.
        let tiled = w.tiled_rows();
        let mut buf = Vec::new();
        let mut j = cols.start;
        while j < cols.end {
            if cols.end - j >= 4 && (j >= tiled || j % 4 == 0) {
                let bytes = w.rows_bytes(j..j + 4);
                if j < tiled {
                    tiles4!($tile, true, bytes, act, x, m, j, 0, out);
                } else {
                    tiles4!($tile, false, bytes, act, x, m, j, 4 * rb, out);
                }
                j += 4;
            } else {
                let row = w.row(j, &mut buf);
                let mut i = 0;
                while i + 4 <= m {
                    let r = $tile::<4, 1, false>(row, act, x, i, rb);
                    for (di, row) in r.iter().enumerate() {
                        out.set(i + di, j, row[0]);
                    }
                    i += 4;
                }
                while i < m {
                    let r = $tile::<1, 1, false>(row, act, x, i, rb);
                    out.set(i, j, r[0][0]);
                    i += 1;
                }
                j += 1;
            }
        }
    }};
}

/// Whether this path has kernels of its own for `format` at `m` activation rows (Q2_K and
/// Q3_K run the AVX2 ones; IQ4_NL and IQ4_XS have prefill panels, and decode on the AVX2
/// tiles).
pub(crate) fn has_format(format: QuantFormat, m: usize) -> bool {
    use_panel(format, m)
        || !matches!(
            format,
            QuantFormat::Q2K | QuantFormat::Q3K | QuantFormat::IQ4NL | QuantFormat::IQ4XS
        )
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
    if use_panel(w.format(), m) {
        panel_chunk(w, act, x, m, cols, out);
        return;
    }
    match w.format() {
        QuantFormat::Q4_0 => drive!(q4_0_tile, w, act, x, m, cols, out),
        QuantFormat::Q8_0 => drive!(q8_0_tile, w, act, x, m, cols, out),
        QuantFormat::Q4K => drive!(q4k_tile, w, act, x, m, cols, out),
        QuantFormat::Q5K => drive!(q5k_tile, w, act, x, m, cols, out),
        QuantFormat::Q6K => drive!(q6k_tile, w, act, x, m, cols, out),
        QuantFormat::F16 => drive!(f16_tile, w, act, x, m, cols, out),
        QuantFormat::BF16 => drive!(bf16_tile, w, act, x, m, cols, out),
        QuantFormat::Q4_1 => drive!(q4_1_tile, w, act, x, m, cols, out),
        QuantFormat::Q5_0 => drive!(q5_0_tile, w, act, x, m, cols, out),
        QuantFormat::Q5_1 => drive!(q5_1_tile, w, act, x, m, cols, out),
        // Formats without AVX-512 kernels (see `has_format`; `kernel::run_chunk` routes them
        // to the AVX2 kernels before this).
        QuantFormat::Q2K | QuantFormat::Q3K | QuantFormat::IQ4NL | QuantFormat::IQ4XS => {
            super::x86_avx2::chunk(w, act, x, m, cols, out);
        }
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
// The weight rows of a decode tile, one step ("unit" of `U` bytes, see `tile_unit`) at a time.

/// The `NR` rows of a tile: `bytes` holds them contiguously, row after row (`PACKED` false) or
/// interleaved unit by unit (`WeightLayout::Tiles4`, `PACKED` true).
struct TileRows<'a, const U: usize, const NR: usize> {
    /// Natural: each row's whole units. Packed: `[0]` holds all the units in stored order.
    units: [&'a [[u8; U]]; NR],
    /// Natural: each row's bytes after its last whole unit (a packed row has none).
    tails: [&'a [u8]; NR],
    /// Whole units per row.
    full: usize,
}

impl<'a, const U: usize, const NR: usize> TileRows<'a, U, NR> {
    #[inline]
    fn new<const PACKED: bool>(bytes: &'a [u8]) -> Self {
        let rb = bytes.len() / NR;
        let full = rb / U;
        let mut units: [&[[u8; U]]; NR] = [&[]; NR];
        let mut tails: [&[u8]; NR] = [&[]; NR];
        if PACKED {
            units[0] = &bytes.as_chunks::<U>().0[..full * NR];
        } else {
            for r in 0..NR {
                let row = &bytes[r * rb..(r + 1) * rb];
                units[r] = &row.as_chunks::<U>().0[..full];
                tails[r] = &row[full * U..];
            }
        }
        Self { units, tails, full }
    }

    /// Unit `g` (below `full`) of each row.
    #[inline]
    fn get<const PACKED: bool>(&self, g: usize) -> [&'a [u8; U]; NR] {
        if PACKED {
            let step = &self.units[0][g * NR..(g + 1) * NR];
            std::array::from_fn(|r| &step[r])
        } else {
            std::array::from_fn(|r| &self.units[r][g])
        }
    }

    /// Each row's bytes past its whole units, zero-padded to a unit (`None` when no row has
    /// any: always for a packed tile).
    #[inline]
    fn tail(&self) -> Option<[[u8; U]; NR]> {
        if self.tails[0].is_empty() {
            return None;
        }
        let mut out = [[0u8; U]; NR];
        for r in 0..NR {
            out[r][..self.tails[r].len()].copy_from_slice(self.tails[r]);
        }
        Some(out)
    }
}

/// A decode tile of a 32-block format over its group function (`TILED`: units as `Tiles4`
/// stores them, else in file order): `$unit` weight bytes per row per step (`$blocks` blocks of 32),
/// against `32·$blocks` activation values, `$blocks` scales and corrections per activation
/// row.
macro_rules! block32_tile {
    ($name:ident, $group:ident, $unit:literal, $blocks:literal) => {
        #[inline(never)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize, const PACKED: bool>(
            bytes: &[u8],
            act: &Act,
            _x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let rows = TileRows::<$unit, NR>::new::<PACKED>(bytes);
            let full = rows.full;
            let groups = (bytes.len() / NR / ($unit / $blocks)).div_ceil($blocks);
            let mut qs: [&[[i8; 32 * $blocks]]; MR] = [&[]; MR];
            let mut d: [&[[f32; $blocks]]; MR] = [&[]; MR];
            let mut corr: [&[[f32; $blocks]]; MR] = [&[]; MR];
            for i in 0..MR {
                qs[i] = &act.qs_row(i0 + i).as_chunks::<{ 32 * $blocks }>().0[..groups];
                d[i] = &act.d_row(i0 + i).as_chunks::<$blocks>().0[..groups];
                corr[i] = &act.corr_row(i0 + i).as_chunks::<$blocks>().0[..groups];
            }
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            for g in 0..full {
                if !PACKED {
                    for r in 0..NR {
                        prefetch(bytes, pf + (g * NR + r) * $unit);
                    }
                }
                let mut a = [(&qs[0][g], &d[0][g], &corr[0][g]); MR];
                for i in 1..MR {
                    a[i] = (&qs[i][g], &d[i][g], &corr[i][g]);
                }
                $group::<MR, NR, PACKED>(rows.get::<PACKED>(g), a, &mut acc);
            }
            if let Some(tail) = rows.tail() {
                let mut w = [&tail[0]; NR];
                for r in 1..NR {
                    w[r] = &tail[r];
                }
                let mut a = [(&qs[0][full], &d[0][full], &corr[0][full]); MR];
                for i in 1..MR {
                    a[i] = (&qs[i][full], &d[i][full], &corr[i][full]);
                }
                $group::<MR, NR, false>(w, a, &mut acc);
            }
            reduce(&acc)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Q4_0 × Q8 (Group4 layout): per group of 4 blocks, the low nibbles of the 4 blocks against the
// activations' first halves, the high nibbles against the second halves; lane quad L = block L.
//
// The 32-block tiles run their whole groups straight from the weight rows (fixed-size chunks:
// no bounds check or tail test per load) and a last partial group, if any, from a zero-padded
// copy, through the same group function.

/// One activation row's share of a Q4_0 group: 128 values, 4 block scales, 4 corrections.
type Q4Act<'a> = (&'a [i8; 128], &'a [f32; 4], &'a [f32; 4]);

/// One group of 4 blocks of `NR` weight rows against `MR` activation rows. `TILED`: the units
/// as `Tiles4` stores them (the 4 block scales, then the 4 blocks' 16 quant bytes, already in
/// the activations' order); else in file order, gathered with byte permutes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn q4_0_group<const MR: usize, const NR: usize, const TILED: bool>(
    w: [&[u8; 72]; NR],
    a: [Q4Act; MR],
    acc: &mut [[__m512; NR]; MR],
) {
    let exp4 = ld512(&EXPAND4, 0);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut wlo = [_mm512_setzero_si512(); NR];
    let mut whi = [_mm512_setzero_si512(); NR];
    let mut dw = [_mm512_setzero_ps(); NR];
    for r in 0..NR {
        let q = if TILED {
            let d = _mm_cvtph_ps(ld128(w[r], 0));
            dw[r] = _mm512_permutexvar_ps(exp4, _mm512_castps128_ps512(d));
            ld512(w[r], 8)
        } else {
            let lo = ld512(w[r], 0);
            let idx_sc = ld512(&Q4_0_SC, 0);
            dw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(idx_sc, lo)));
            _mm512_permutex2var_epi8(lo, ld512(&Q4_0_QS, 0), ld512(w[r], 8))
        };
        wlo[r] = _mm512_and_si512(q, m4);
        whi[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
    }
    for i in 0..MR {
        let (qs, d, corr) = a[i];
        let alo = ld512_i8(qs, 0);
        let ahi = ld512_i8(qs, 64);
        let da = _mm512_permutexvar_ps(exp4, _mm512_castps128_ps512(ld128_ps(d, 0)));
        let c = _mm512_permutexvar_ps(exp4, _mm512_castps128_ps512(ld128_ps(corr, 0)));
        for r in 0..NR {
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wlo[r], alo);
            let p = _mm512_dpbusd_epi32(p, whi[r], ahi);
            let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(p), da, c);
            acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
        }
    }
}

block32_tile!(q4_0_tile, q4_0_group, 72, 4);

// ---------------------------------------------------------------------------------------------
// Q8_0 × Q8 (Natural32 layout): per pair of blocks, weights flipped to q + 128; lanes 0–7 are
// the first block, 8–15 the second.

/// One activation row's share of a Q8_0 pair of blocks: 64 values, 2 scales, 2 corrections.
type Q8Act<'a> = (&'a [i8; 64], &'a [f32; 2], &'a [f32; 2]);

/// One pair of blocks of `NR` weight rows against `MR` activation rows (a Q8_0 unit is the
/// same in both layouts, so `_TILED` changes nothing).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn q8_0_group<const MR: usize, const NR: usize, const _TILED: bool>(
    w: [&[u8; 68]; NR],
    a: [Q8Act; MR],
    acc: &mut [[__m512; NR]; MR],
) {
    let idx_qs = ld512(&Q8_0_QS, 0);
    let idx_sc = ld512(&Q8_0_SC, 0);
    let exp8 = ld512(&EXPAND8, 0);
    let flip = _mm512_set1_epi8(-128);
    let mut wq = [_mm512_setzero_si512(); NR];
    let mut dw = [_mm512_setzero_ps(); NR];
    for r in 0..NR {
        let lo = ld512(w[r], 0);
        let hi = ld512(w[r], 4);
        wq[r] = _mm512_xor_si512(_mm512_permutex2var_epi8(lo, idx_qs, hi), flip);
        dw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(idx_sc, lo)));
    }
    for i in 0..MR {
        let (qs, d, corr) = a[i];
        let aq = ld512_i8(qs, 0);
        let da = _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(ld64_ps(*d)));
        let c = _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(ld64_ps(*corr)));
        for r in 0..NR {
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[r], aq);
            let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(p), da, c);
            acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
        }
    }
}

/// Two f32 values into the low half of a vector.
#[inline]
#[target_feature(enable = "sse2")]
fn ld64_ps(v: [f32; 2]) -> __m128 {
    _mm_setr_ps(v[0], v[1], 0.0, 0.0)
}

block32_tile!(q8_0_tile, q8_0_group, 68, 2);

// ---------------------------------------------------------------------------------------------
// Q4_1, Q5_0 and Q5_1 × Q8 (Natural32 layout, file order: these formats are never `Tiles4`):
// per pair of blocks, the two blocks' nibbles as one 64-byte vector in element order (lanes
// 0–7 the first block, 8–15 the second), fifth bits added under a 64-bit mask; the offset
// (Q5_0) is taken off with the correction as Q8_0's is, the min (Q4_1/Q5_1) added with it.

macro_rules! b32_pair_group {
    ($name:ident, $bb:literal, $qs:literal, $qh:expr, $mins:literal) => {
        /// One pair of blocks of `NR` weight rows against `MR` activation rows.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize, const _TILED: bool>(
            w: [&[u8; 2 * $bb]; NR],
            a: [Q8Act; MR],
            acc: &mut [[__m512; NR]; MR],
        ) {
            let exp8 = ld512(&EXPAND8, 0);
            let m4 = _mm256_set1_epi8(0x0F);
            let mut wq = [_mm512_setzero_si512(); NR];
            let mut dw = [_mm512_setzero_ps(); NR];
            let mut mw = [_mm512_setzero_ps(); NR];
            for r in 0..NR {
                let b = w[r];
                let x = _mm256_set_m128i(ld128(b, $bb + $qs), ld128(b, $qs));
                let lo = _mm256_and_si256(x, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                // [lo0 lo1 hi0 hi1] → [lo0 hi0 lo1 hi1]: each block's 32 values in order.
                let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                let mut v = _mm512_shuffle_i64x2::<0b11_01_10_00>(v, v);
                if let Some(qh) = $qh {
                    let bits =
                        |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    let mask = u64::from(bits(qh)) | (u64::from(bits($bb + qh)) << 32);
                    v = _mm512_mask_add_epi8(v, mask, v, _mm512_set1_epi8(16));
                }
                wq[r] = v;
                let half = |at: usize| i16::from_le_bytes([b[at], b[at + 1]]);
                let d2 = _mm_cvtph_ps(_mm_set_epi16(
                    0,
                    0,
                    0,
                    0,
                    half($bb + 2),
                    half(2),
                    half($bb),
                    half(0),
                ));
                // d0 d1 in lanes 0, 1; m0 m1 in lanes 2, 3.
                dw[r] = _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(d2));
                if $mins {
                    mw[r] =
                        _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(_mm_movehl_ps(d2, d2)));
                }
            }
            for i in 0..MR {
                let (qs, d, corr) = a[i];
                let aq = ld512_i8(qs, 0);
                let da = _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(ld64_ps(*d)));
                let c = _mm512_permutexvar_ps(exp8, _mm512_castps128_ps512(ld64_ps(*corr)));
                for r in 0..NR {
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[r], aq);
                    if $mins {
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(p), da);
                        acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
                        acc[i][r] = _mm512_fmadd_ps(c, mw[r], acc[i][r]);
                    } else {
                        let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(p), da, c);
                        acc[i][r] = _mm512_fmadd_ps(t, dw[r], acc[i][r]);
                    }
                }
            }
        }
    };
}

b32_pair_group!(q4_1_group, 20, 4, None::<usize>, true);
b32_pair_group!(q5_0_group, 22, 6, Some(2usize), false);
b32_pair_group!(q5_1_group, 24, 8, Some(4usize), true);
block32_tile!(q4_1_tile, q4_1_group, 40, 2);
block32_tile!(q5_0_tile, q5_0_group, 44, 2);
block32_tile!(q5_1_tile, q5_1_group, 48, 2);

// ---------------------------------------------------------------------------------------------
// K-quants × Q8_K (Super256 layout): per super-block, 4 chunks of 64 values; the integer sum
// of (scale × dot) per pair, then the super-block scales in f32.

/// One decoded K-quant super-block of one weight row.
#[derive(Clone, Copy)]
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
    // ggml's unpack of the 12 scale bytes: 8 six-bit scales, then 8 six-bit mins.
    let word =
        |i: usize| u32::from_le_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let (k1, k2, k3) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
    let sc_lo = u0 & k1;
    let sc_hi = (u2 & k2) | (((u0 >> 6) & k3) << 4);
    let mn_lo = u1 & k1;
    let mn_hi = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
    let scales = (u64::from(sc_hi) << 32) | u64::from(sc_lo);
    let mins = (u64::from(mn_hi) << 32) | u64::from(mn_lo);
    let sc8 = _mm512_castsi256_si512(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(scales as i64)));
    let mn8 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
    let mins = _mm256_set_m128i(_mm_unpackhi_epi16(mn8, mn8), _mm_unpacklo_epi16(mn8, mn8));
    let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
        b[0], b[1], b[2], b[3],
    ])));
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
        mins,
        d: _mm_cvtss_f32(dd),
        dmin: _mm_cvtss_f32(_mm_movehdup_ps(dd)),
    }
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
        #[inline(never)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize, const PACKED: bool>(
            bytes: &[u8],
            act: &Act,
            _x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let rows = TileRows::<$bytes, NR>::new::<PACKED>(bytes);
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            for s in 0..rows.full {
                let units = rows.get::<PACKED>(s);
                // A plain loop, not `array::from_fn`: its closure was compiled out of line
                // (the decoded blocks returned through memory) once this file's other kernels
                // grew: Llama-3.2-1B Q4_K_M decoded 25-30% slower.
                let zero = _mm512_setzero_si512();
                let mut blocks = [KBlock {
                    w: [zero; 4],
                    sc: [zero; 4],
                    mins: _mm512_castsi512_si256(zero),
                    d: 0.0,
                    dmin: 0.0,
                }; NR];
                for r in 0..NR {
                    if !PACKED {
                        for line in (0..$bytes).step_by(64) {
                            prefetch(bytes, pf + (s * NR + r) * $bytes + line);
                        }
                    }
                    blocks[r] = $decode(&units[r][..]);
                }
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
        #[inline(never)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
        fn $name<const MR: usize, const NR: usize, const PACKED: bool>(
            bytes: &[u8],
            _act: &Act,
            x: &[f32],
            i0: usize,
            pf: usize,
        ) -> [[f32; NR]; MR] {
            let k = bytes.len() / NR / 2;
            let wrows = TileRows::<32, NR>::new::<PACKED>(bytes);
            let full = wrows.full;
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(i0 + i) * k..(i0 + i + 1) * k]);
            for g in 0..full {
                // Into L2 only, a line per 64 bytes: the weight is read as NR streams, which
                // the L1 prefetch hint fed slower (F16, 1 thread: 13–17 GB/s against 21–22).
                if !PACKED {
                    for line in 0..(NR * 32).div_ceil(64) {
                        prefetch_l2(bytes, pf + g * NR * 32 + line * 64);
                    }
                }
                let units = wrows.get::<PACKED>(g);
                let w: [__m512; NR] = std::array::from_fn(|r| $conv(ld256(&units[r][..], 0)));
                for i in 0..MR {
                    let xv = ld512_ps(rows[i], g * 16);
                    for r in 0..NR {
                        acc[i][r] = _mm512_fmadd_ps(w[r], xv, acc[i][r]);
                    }
                }
            }
            if let Some(tail) = wrows.tail() {
                let w: [__m512; NR] = std::array::from_fn(|r| $conv(ld256(&tail[r], 0)));
                for i in 0..MR {
                    let mut buf = [0f32; 16];
                    buf[..k - full * 16].copy_from_slice(&rows[i][full * 16..]);
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

// ---------------------------------------------------------------------------------------------
// Prefill (many activation rows) for Q4_0 and Q8_0: the chunk's weight rows are unpacked 16 at
// a time into a panel where each 64-byte vector holds 4 consecutive values of 16 rows, so one
// `vpdpbusd` with 4 broadcast activation bytes advances 16 outputs; the panel is built once
// and used by every activation row, and the block scales are applied once per block and row.

/// Activation rows from which the panel kernel pays for building its panels.
const PANEL_MIN_M: usize = 16;
/// Panel bytes per 32-block: 8 quads × 16 rows × 4 values, then 16 f32 scales.
const PANEL_BLOCK: usize = 8 * 64 + 64;
/// The same with 16 f32 mins after the scales (Q4_1/Q5_1).
const PANEL_BLOCK_MINS: usize = PANEL_BLOCK + 64;

/// Panel bytes per 32-block of `format`.
const fn panel_block(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4_1 | QuantFormat::Q5_1 => PANEL_BLOCK_MINS,
        _ => PANEL_BLOCK,
    }
}

/// Whether the AVX-512 path runs `format` at `m` rows through the panel kernel (its
/// activations then use one lane per block: `lanes = 1`).
pub(crate) fn use_panel(format: QuantFormat, m: usize) -> bool {
    m >= PANEL_MIN_M
        && matches!(
            format,
            QuantFormat::Q4_0
                | QuantFormat::Q4_1
                | QuantFormat::Q5_0
                | QuantFormat::Q5_1
                | QuantFormat::Q8_0
                | QuantFormat::Q4K
                | QuantFormat::Q5K
                | QuantFormat::Q6K
                | QuantFormat::IQ4NL
                | QuantFormat::IQ4XS
        )
}

thread_local! {
    static PANEL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st512_ps(v: __m512) -> [f32; 16] {
    let mut o = [0f32; 16];
    // SAFETY: `o` holds exactly 16 f32; unaligned store.
    unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    o
}

/// Where the (at most 16) rows of a panel keep each block, for 16-lane gathers: row `r`'s
/// block `b` (F16/BF16: value `b`) starts at `start[r] + (b >> log2) · stride[r] + (b & mask)
/// · bb` of `src`. Runs of 4 interleaved rows (`Tiles4`) step by 4 units, file-order rows by
/// one.
struct PanelRows<'a> {
    /// The weight's bytes from the first to the last row (whole runs of 4 when interleaved):
    /// every block of every row lies inside.
    src: &'a [u8],
    valid: __mmask16,
    start: __m512i,
    stride: __m512i,
    /// Per row, the step between blocks of one unit: for the f16 scale, and for the values,
    /// which start `quant_at` into the first block (a tiled Q4_0 unit keeps its 4 scales
    /// first, then 4 × 16 quant bytes; file order keeps each scale before its quants).
    scale_step: __m512i,
    quant_at: __m512i,
    quant_step: __m512i,
    log2: usize,
}

impl<'a> PanelRows<'a> {
    #[target_feature(enable = "avx512f")]
    fn new(w: &'a QWeight, j0: usize, rows: usize) -> Self {
        let bb = w.format().block_bytes();
        let rb = w.row_bytes();
        let unit = super::tile_unit(w.format());
        let tiled = w.tiled_rows();
        // Whole runs of 4 interleaved rows: a run's rows spread over all of its bytes.
        let first = if j0 < tiled { j0 / 4 * 4 } else { j0 };
        let end = j0 + rows;
        let end = if end <= tiled {
            end.div_ceil(4) * 4
        } else {
            end
        };
        let src = w.rows_bytes(first..end);
        let last = rb / bb - 1;
        let log2 = (unit / bb).trailing_zeros() as usize;
        let header = match w.format() {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 | QuantFormat::IQ4NL => 2,
            QuantFormat::Q4_1 => 4,
            QuantFormat::Q5_0 => 6,
            QuantFormat::Q5_1 => 8,
            _ => 0,
        };
        let small = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        let mut start = [0i32; 16];
        let mut stride = [0i32; 16];
        let mut steps = [[small(bb); 16]; 2];
        let mut quant_at = [small(header); 16];
        assert!(rows <= 16 && i32::try_from(src.len()).is_ok());
        for r in 0..rows {
            let j = j0 + r;
            let (s0, st, row_end) = if j < tiled {
                if w.format() == QuantFormat::Q4_0 {
                    (steps[0][r], quant_at[r], steps[1][r]) = (2, 8, 16);
                }
                let s0 = (j / 4 * 4 - first) * rb + j % 4 * unit;
                (s0, 4 * unit, s0 + (last >> log2) * 4 * unit + unit)
            } else {
                let s0 = (j - first) * rb;
                (s0, unit, s0 + rb)
            };
            // The row's last unit (tiled) or last block (file order) ends inside `src`.
            assert!(row_end <= src.len());
            start[r] = small(s0);
            stride[r] = small(st);
        }
        Self {
            src,
            valid: u16::try_from((1u32 << rows) - 1).unwrap_or(u16::MAX),
            start: ld512_i32(&start),
            stride: ld512_i32(&stride),
            scale_step: ld512_i32(&steps[0]),
            quant_at: ld512_i32(&quant_at),
            quant_step: ld512_i32(&steps[1]),
            log2,
        }
    }

    /// Each row's offset of unit `b >> log2` and `b`'s index in it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn unit(&self, b: usize) -> (__m512i, __m512i) {
        let unit = _mm512_mullo_epi32(_mm512_set1_epi32((b >> self.log2) as i32), self.stride);
        let within = _mm512_set1_epi32((b & ((1 << self.log2) - 1)) as i32);
        (_mm512_add_epi32(self.start, unit), within)
    }

    /// Each row's offset of block `b`'s f16 scale.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scale(&self, b: usize) -> __m512i {
        let (unit, within) = self.unit(b);
        _mm512_add_epi32(unit, _mm512_mullo_epi32(within, self.scale_step))
    }

    /// Each row's offset of block `b`'s values (F16/BF16: value `b`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn quants(&self, b: usize) -> __m512i {
        let (unit, within) = self.unit(b);
        let at = _mm512_add_epi32(unit, self.quant_at);
        _mm512_add_epi32(at, _mm512_mullo_epi32(within, self.quant_step))
    }
}

/// Unpacks weight rows `j0..j0 + rows` (at most 16; missing rows are zero) into `panel`: per
/// block, 16-lane gathers read the same 4 bytes of the 16 rows (in either layout), which is
/// the panel's transposed order already (Q4_0: the low and the high nibbles of those bytes
/// are two of the panel's vectors).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn build_panel(w: &QWeight, j0: usize, rows: usize, panel: &mut [u8]) {
    if matches!(w.format(), QuantFormat::IQ4NL | QuantFormat::IQ4XS) {
        build_iq4_panel(w, j0, rows, panel);
        return;
    }
    let nb = w.cols() / 32;
    let format = w.format();
    let q8 = format == QuantFormat::Q8_0;
    let mins = matches!(format, QuantFormat::Q4_1 | QuantFormat::Q5_1);
    // Where a block's 32 fifth bits are, after its scale (Q5_0 right after, Q5_1 after d, m).
    let qh_at = match format {
        QuantFormat::Q5_0 => Some(2),
        QuantFormat::Q5_1 => Some(4),
        _ => None,
    };
    let at = PanelRows::new(w, j0, rows);
    let (src, valid) = (at.src, at.valid);
    let m4 = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    let base = src.as_ptr();
    for b in 0..nb {
        let (scale, quants) = (at.scale(b), at.quants(b));
        let gather = |at: __m512i, off: i32| {
            // SAFETY: each lane of `valid` reads 4 bytes at `at + off`, inside its row's unit
            // holding block b (its scale's 2 bytes and the next 2, the 4 bytes of fifth bits
            // at 2 or 4 past the scale, or quant bytes 4q..4q + 4 of the block's 16 or 32),
            // which lies in `src` (`PanelRows::new`); the other lanes read nothing and are
            // zero.
            unsafe {
                _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    valid,
                    _mm512_add_epi32(at, _mm512_set1_epi32(off)),
                    base.cast(),
                )
            }
        };
        let pb = panel_block(format);
        let dst = &mut panel[b * pb..(b + 1) * pb];
        let dm = gather(scale, 0);
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        st512(dst, 512, _mm512_castps_si512(d));
        if mins {
            let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
            st512(dst, 576, _mm512_castps_si512(m));
        }
        if let Some(qh_at) = qh_at {
            // Each row's 32 fifth bits: bits 4q..4q + 4 belong to the low nibbles of quant
            // dword q, bits 16 + 4q.. to its high nibbles; the multiply spreads 4 bits to
            // bit 0 of 4 bytes (the shifted copies do not overlap), then to bit 4.
            let qh = gather(scale, qh_at);
            let spread = |bits: __m512i| {
                let v = _mm512_and_si512(bits, _mm512_set1_epi32(0x0F));
                let v = _mm512_and_si512(
                    _mm512_mullo_epi32(v, _mm512_set1_epi32(0x0020_4081)),
                    _mm512_set1_epi32(0x0101_0101),
                );
                _mm512_slli_epi32::<4>(v)
            };
            for q in 0..4 {
                let v = gather(quants, 4 * q as i32);
                let shift = _mm512_set1_epi32(4 * q as i32);
                let lo_bits = spread(_mm512_srlv_epi32(qh, shift));
                let hi_bits = spread(_mm512_srlv_epi32(
                    qh,
                    _mm512_add_epi32(shift, _mm512_set1_epi32(16)),
                ));
                st512(
                    dst,
                    q * 64,
                    _mm512_or_si512(_mm512_and_si512(v, m4), lo_bits),
                );
                st512(
                    dst,
                    (q + 4) * 64,
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(v), m4), hi_bits),
                );
            }
        } else if q8 {
            for q in 0..8 {
                let v = _mm512_maskz_xor_epi32(valid, gather(quants, 4 * q as i32), flip);
                st512(dst, q * 64, v);
            }
        } else {
            for q in 0..4 {
                let v = gather(quants, 4 * q as i32);
                st512(dst, q * 64, _mm512_and_si512(v, m4));
                st512(
                    dst,
                    (q + 4) * 64,
                    _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4),
                );
            }
        }
    }
}

/// As [`build_panel`] for IQ4_NL and IQ4_XS, per block (IQ4_XS: per sub-block) of 32: the
/// nibbles looked up in the value table stored 128 above (unsigned, as Q8_0's panel: `off` =
/// 128), and the block's scale (IQ4_XS: `d · (ls − 32)`, its 6-bit sub-block scale decoded
/// per lane).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn build_iq4_panel(w: &QWeight, j0: usize, rows: usize, panel: &mut [u8]) {
    let nb = w.cols() / 32;
    let xs = w.format() == QuantFormat::IQ4XS;
    // Both formats stay in file order: block (IQ4_XS: super-block) `b` of a row at `b · bb`.
    let at = PanelRows::new(w, j0, rows);
    let (src, valid) = (at.src, at.valid);
    let m4 = _mm512_set1_epi8(0x0F);
    let table = super::IQ4_VALUES.map(|v| (i16::from(v) + 128) as u8);
    let table = _mm512_broadcast_i32x4(ld128(&table, 0));
    let base = src.as_ptr();
    for b in 0..nb {
        let (block, sub) = if xs { (b / 8, b % 8) } else { (b, 0) };
        let start = at.scale(block);
        let gather = |off: usize| {
            // SAFETY: each lane of `valid` reads 4 bytes at `off` (< block bytes − 3: the
            // scale, IQ4_XS's scale bytes at 0 and 4, quant bytes 4q..4q + 4 of a 16-byte
            // (sub-)block) into its row's block `block`, which lies in `src`
            // (`PanelRows::new`); the other lanes read nothing and are zero.
            unsafe {
                _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    valid,
                    _mm512_add_epi32(start, _mm512_set1_epi32(off as i32)),
                    base.cast(),
                )
            }
        };
        let dst = &mut panel[b * PANEL_BLOCK..(b + 1) * PANEL_BLOCK];
        let head = gather(0);
        let mut d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
        let quants = if xs {
            // ls: 4 low bits from scales_l[sub / 2] (nibble sub % 2), 2 high bits from
            // scales_h (bits 2 sub), which is the high half of the first dword.
            let low = _mm512_and_si512(
                _mm512_srlv_epi32(gather(4), _mm512_set1_epi32(4 * sub as i32)),
                _mm512_set1_epi32(0x0F),
            );
            let high = _mm512_and_si512(
                _mm512_srlv_epi32(head, _mm512_set1_epi32(16 + 2 * sub as i32)),
                _mm512_set1_epi32(3),
            );
            let ls = _mm512_or_si512(low, _mm512_slli_epi32::<4>(high));
            let ls = _mm512_sub_epi32(ls, _mm512_set1_epi32(32));
            d = _mm512_mul_ps(d, _mm512_cvtepi32_ps(ls));
            8 + 16 * sub
        } else {
            2
        };
        st512(dst, 512, _mm512_castps_si512(d));
        for q in 0..4 {
            let v = gather(quants + 4 * q);
            // Rows past `rows` hold table[0] + 128: their lanes are never written out.
            st512(
                dst,
                q * 64,
                _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4)),
            );
            st512(
                dst,
                (q + 4) * 64,
                _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4)),
            );
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn ld512_i32(s: &[i32; 16]) -> __m512i {
    // SAFETY: `s` holds exactly 16 i32; unaligned load.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st512(s: &mut [u8], at: usize, v: __m512i) {
    assert!(at + 64 <= s.len());
    // SAFETY: bytes `at..at + 64` are inside `s` (checked above); unaligned store.
    unsafe { _mm512_storeu_si512(s.as_mut_ptr().add(at).cast(), v) }
}

fn dword(a: &[i8], at: usize) -> i32 {
    i32::from_le_bytes([
        a[at] as u8,
        a[at + 1] as u8,
        a[at + 2] as u8,
        a[at + 3] as u8,
    ])
}

/// `MR` activation rows against one panel: lane `r` of result `i` is output `(i0 + i, j0 + r)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn panel_tile<const MR: usize, const MINS: bool>(
    panel: &[u8],
    nb: usize,
    act: &Act,
    i0: usize,
) -> [__m512; MR] {
    let mut out = [_mm512_setzero_ps(); MR];
    let rows: [(&[i8], &[f32], &[f32]); MR] =
        std::array::from_fn(|i| (act.qs_row(i0 + i), act.d_row(i0 + i), act.corr_row(i0 + i)));
    for b in 0..nb {
        let p = b * if MINS { PANEL_BLOCK_MINS } else { PANEL_BLOCK };
        let wq: [__m512i; 8] = std::array::from_fn(|q| ld512(panel, p + 64 * q));
        let dw = _mm512_castsi512_ps(ld512(panel, p + 512));
        for i in 0..MR {
            let (qs, d, corr) = rows[i];
            let a = &qs[b * 32..b * 32 + 32];
            let mut acc0 = _mm512_setzero_si512();
            let mut acc1 = _mm512_setzero_si512();
            for q in (0..8).step_by(2) {
                acc0 = _mm512_dpbusd_epi32(acc0, wq[q], _mm512_set1_epi32(dword(a, 4 * q)));
                acc1 = _mm512_dpbusd_epi32(acc1, wq[q + 1], _mm512_set1_epi32(dword(a, 4 * q + 4)));
            }
            if MINS {
                // q·d + m: the min times the activation block's d·Σa (corr, off = 1).
                let t = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)),
                    _mm512_set1_ps(d[b]),
                );
                let mw = _mm512_castsi512_ps(ld512(panel, p + 576));
                out[i] = _mm512_fmadd_ps(t, dw, out[i]);
                out[i] = _mm512_fmadd_ps(_mm512_set1_ps(corr[b]), mw, out[i]);
            } else {
                let t = _mm512_fmsub_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)),
                    _mm512_set1_ps(d[b]),
                    _mm512_set1_ps(corr[b]),
                );
                out[i] = _mm512_fmadd_ps(t, dw, out[i]);
            }
        }
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn panel_chunk(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
) {
    if matches!(w.format(), QuantFormat::F16 | QuantFormat::BF16) {
        half_panel_chunk(w, x, m, cols, out);
        return;
    }
    let kquant = w.format().activation_block() == 256;
    let six = w.format() == QuantFormat::Q6K;
    let mins = matches!(w.format(), QuantFormat::Q4_1 | QuantFormat::Q5_1);
    let (units, unit_bytes) = if kquant {
        (w.cols() / 256, KPANEL_BLOCK)
    } else {
        (w.cols() / 32, panel_block(w.format()))
    };
    let mut run = |panel: &mut Vec<u8>| {
        if panel.len() < units * unit_bytes {
            panel.resize(units * unit_bytes, 0);
        }
        let mut j0 = cols.start;
        while j0 < cols.end {
            let rows = (cols.end - j0).min(16);
            if kquant {
                build_kpanel(w, j0, rows, panel);
            } else {
                build_panel(w, j0, rows, panel);
            }
            let mut i = 0;
            while i < m {
                let take = if m - i >= 4 { 4 } else { 1 };
                if take == 4 {
                    let r = if kquant {
                        kpanel_tile::<4>(panel, units, act, i, six)
                    } else if mins {
                        panel_tile::<4, true>(panel, units, act, i)
                    } else {
                        panel_tile::<4, false>(panel, units, act, i)
                    };
                    for (di, v) in r.iter().enumerate() {
                        let vals = st512_ps(*v);
                        for (dj, &y) in vals[..rows].iter().enumerate() {
                            out.set(i + di, j0 + dj, y);
                        }
                    }
                } else {
                    let r = if kquant {
                        kpanel_tile::<1>(panel, units, act, i, six)
                    } else if mins {
                        panel_tile::<1, true>(panel, units, act, i)
                    } else {
                        panel_tile::<1, false>(panel, units, act, i)
                    };
                    let vals = st512_ps(r[0]);
                    for (dj, &y) in vals[..rows].iter().enumerate() {
                        out.set(i, j0 + dj, y);
                    }
                }
                i += take;
            }
            j0 += 16;
        }
    };
    PANEL.with(|cell| match cell.try_borrow_mut() {
        Ok(mut panel) => run(&mut panel),
        Err(_) => run(&mut Vec::new()),
    });
}

/// F16/BF16 weight rows `j0..j0 + rows` (at most 16; missing rows are zero) as f32, one
/// 16-lane vector per input feature.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn build_half_panel(w: &QWeight, j0: usize, rows: usize, panel: &mut [f32]) {
    let k = w.cols();
    let bf16 = w.format() == QuantFormat::BF16;
    let at = PanelRows::new(w, j0, rows);
    let (src, valid) = (at.src, at.valid);
    let hi16 = _mm512_set1_epi32(-65536);
    // Values kk and kk + 1 of the 16 rows in one gather of dwords.
    let mut kk = 0;
    while kk + 2 <= k {
        // SAFETY: each lane of `valid` reads the 4 bytes of its row's values kk and kk + 1
        // (kk even: the pair never straddles a 16-value unit of a `Tiles4` run), which lie in
        // `src` (`PanelRows::new`); the other lanes read nothing and are zero.
        let v = unsafe {
            _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                valid,
                at.quants(kk),
                src.as_ptr().cast(),
            )
        };
        let (lo, hi) = if bf16 {
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, hi16)),
            )
        } else {
            (
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)),
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v))),
            )
        };
        st512_f32(panel, kk * 16, lo);
        st512_f32(panel, (kk + 1) * 16, hi);
        kk += 2;
    }
    if kk < k {
        for r in 0..16 {
            panel[kk * 16 + r] = if r < rows {
                let h = w.row_units(j0 + r).block(kk);
                let h = u16::from_le_bytes([h[0], h[1]]);
                if bf16 {
                    super::scalar::bf16_to_f32(h)
                } else {
                    f16_to_f32(h)
                }
            } else {
                0.0
            };
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st512_f32(s: &mut [f32], at: usize, v: __m512) {
    assert!(at + 16 <= s.len());
    // SAFETY: values `at..at + 16` are inside `s` (checked above); unaligned store.
    unsafe { _mm512_storeu_ps(s.as_mut_ptr().add(at), v) }
}

/// `MR` activation rows against one F16/BF16 panel (f32 FMAs with broadcast activations).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn half_panel_tile<const MR: usize>(panel: &[f32], k: usize, x: &[f32], i0: usize) -> [__m512; MR] {
    let mut out = [_mm512_setzero_ps(); MR];
    let rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(i0 + i) * k..(i0 + i + 1) * k]);
    for kk in 0..k {
        let wv = ld512_ps(panel, kk * 16);
        for i in 0..MR {
            out[i] = _mm512_fmadd_ps(wv, _mm512_set1_ps(rows[i][kk]), out[i]);
        }
    }
    out
}

thread_local! {
    static HALF_PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn half_panel_chunk(w: &QWeight, x: &[f32], m: usize, cols: Range<usize>, out: &mut OutChunk) {
    let k = w.cols();
    let mut run = |panel: &mut Vec<f32>| {
        if panel.len() < k * 16 {
            panel.resize(k * 16, 0.0);
        }
        let mut j0 = cols.start;
        while j0 < cols.end {
            let rows = (cols.end - j0).min(16);
            build_half_panel(w, j0, rows, panel);
            let mut i = 0;
            while i < m {
                let take = if m - i >= 8 { 8 } else { 1 };
                if take == 8 {
                    let r = half_panel_tile::<8>(panel, k, x, i);
                    for (di, v) in r.iter().enumerate() {
                        for (dj, &y) in st512_ps(*v)[..rows].iter().enumerate() {
                            out.set(i + di, j0 + dj, y);
                        }
                    }
                } else {
                    let r = half_panel_tile::<1>(panel, k, x, i);
                    for (dj, &y) in st512_ps(r[0])[..rows].iter().enumerate() {
                        out.set(i, j0 + dj, y);
                    }
                }
                i += take;
            }
            j0 += 16;
        }
    };
    HALF_PANEL.with(|cell| match cell.try_borrow_mut() {
        Ok(mut panel) => run(&mut panel),
        Err(_) => run(&mut Vec::new()),
    });
}

/// K-quant panel bytes per super-block: 64 quads × 16 rows × 4 values, 16 sub-block scales
/// × 16 rows (i32), 8 mins × 16 rows (i32), then `d` and `dmin` × 16 rows (f32).
const KPANEL_BLOCK: usize = 4096 + 1024 + 512 + 64 + 64;
const KP_SC: usize = 4096;
const KP_MN: usize = 4096 + 1024;
const KP_D: usize = 4096 + 1024 + 512;
const KP_DMIN: usize = KP_D + 64;

/// Unpacks K-quant weight rows `j0..j0 + rows` (at most 16; missing rows are zero).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn build_kpanel(w: &QWeight, j0: usize, rows: usize, panel: &mut [u8]) {
    let format = w.format();
    let nsb = w.cols() / 256;
    for r in 0..16 {
        let row = (r < rows).then(|| w.row_units(j0 + r));
        for s in 0..nsb {
            let dst = &mut panel[s * KPANEL_BLOCK..(s + 1) * KPANEL_BLOCK];
            let mut vals = [0u8; 256];
            let mut sc = [0i32; 16];
            let mut mn = [0i32; 8];
            let (mut d, mut dmin) = (0f32, 0f32);
            if let Some(row) = row {
                let blk = row.block(s);
                let kb = match format {
                    QuantFormat::Q4K => decode_q45k(blk, false),
                    QuantFormat::Q5K => decode_q45k(blk, true),
                    _ => decode_q6k(blk),
                };
                for (c, v) in kb.w.iter().enumerate() {
                    // SAFETY: `vals[64c..64c + 64]` is inside the 256-byte buffer; unaligned store.
                    unsafe { _mm512_storeu_si512(vals[64 * c..].as_mut_ptr().cast(), *v) };
                }
                d = kb.d;
                dmin = kb.dmin;
                if format == QuantFormat::Q6K {
                    for (j, v) in sc.iter_mut().enumerate() {
                        *v = i32::from(blk[192 + j] as i8);
                    }
                } else {
                    for j in 0..8 {
                        let (a, b) = scale_min_k4(j, &blk[4..16]);
                        sc[j] = i32::from(a);
                        mn[j] = i32::from(b);
                    }
                }
            }
            for q in 0..64 {
                dst[q * 64 + r * 4..q * 64 + r * 4 + 4].copy_from_slice(&vals[q * 4..q * 4 + 4]);
            }
            for (j, v) in sc.iter().enumerate() {
                dst[KP_SC + j * 64 + r * 4..KP_SC + j * 64 + r * 4 + 4]
                    .copy_from_slice(&v.to_le_bytes());
            }
            for (j, v) in mn.iter().enumerate() {
                dst[KP_MN + j * 64 + r * 4..KP_MN + j * 64 + r * 4 + 4]
                    .copy_from_slice(&v.to_le_bytes());
            }
            dst[KP_D + r * 4..KP_D + r * 4 + 4].copy_from_slice(&d.to_le_bytes());
            dst[KP_DMIN + r * 4..KP_DMIN + r * 4 + 4].copy_from_slice(&dmin.to_le_bytes());
        }
    }
}

/// `MR` activation rows against one K-quant panel: lane `r` of result `i` is output
/// `(i0 + i, j0 + r)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn kpanel_tile<const MR: usize>(
    panel: &[u8],
    nsb: usize,
    act: &Act,
    i0: usize,
    six: bool,
) -> [__m512; MR] {
    let mut out = [_mm512_setzero_ps(); MR];
    for s in 0..nsb {
        let p = &panel[s * KPANEL_BLOCK..(s + 1) * KPANEL_BLOCK];
        let a: [&[i8]; MR] = std::array::from_fn(|i| &act.qs_row(i0 + i)[s * 256..(s + 1) * 256]);
        let bs: [&[i16]; MR] =
            std::array::from_fn(|i| &act.bsums_row(i0 + i)[s * 16..(s + 1) * 16]);
        let mut isum = [_mm512_setzero_si512(); MR];
        let mut msum = [_mm512_setzero_si512(); MR];
        if six {
            for j in 0..16 {
                let mut acc = [_mm512_setzero_si512(); MR];
                for q in 0..4 {
                    let wv = ld512(p, (4 * j + q) * 64);
                    for i in 0..MR {
                        acc[i] = _mm512_dpbusd_epi32(
                            acc[i],
                            wv,
                            _mm512_set1_epi32(dword(a[i], 16 * j + 4 * q)),
                        );
                    }
                }
                let scv = ld512(p, KP_SC + j * 64);
                for i in 0..MR {
                    let c = _mm512_sub_epi32(acc[i], _mm512_set1_epi32(32 * i32::from(bs[i][j])));
                    isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(c, scv));
                }
            }
        } else {
            for j in 0..8 {
                let mut acc = [_mm512_setzero_si512(); MR];
                for q in 0..8 {
                    let wv = ld512(p, (8 * j + q) * 64);
                    for i in 0..MR {
                        acc[i] = _mm512_dpbusd_epi32(
                            acc[i],
                            wv,
                            _mm512_set1_epi32(dword(a[i], 32 * j + 4 * q)),
                        );
                    }
                }
                let scv = ld512(p, KP_SC + j * 64);
                let mnv = ld512(p, KP_MN + j * 64);
                for i in 0..MR {
                    isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(acc[i], scv));
                    let b32 = i32::from(bs[i][2 * j]) + i32::from(bs[i][2 * j + 1]);
                    msum[i] =
                        _mm512_add_epi32(msum[i], _mm512_mullo_epi32(mnv, _mm512_set1_epi32(b32)));
                }
            }
        }
        let d16 = _mm512_castsi512_ps(ld512(p, KP_D));
        let dmin16 = _mm512_castsi512_ps(ld512(p, KP_DMIN));
        for i in 0..MR {
            let da = _mm512_set1_ps(act.d_row(i0 + i)[s]);
            out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d16, da), out[i]);
            if !six {
                out[i] = _mm512_fnmadd_ps(
                    _mm512_cvtepi32_ps(msum[i]),
                    _mm512_mul_ps(dmin16, da),
                    out[i],
                );
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (bit-identical to `act::quantize_block`: the same max, scale and
// round-half-to-even).

/// Quantizes `x` (a multiple of 16 values) into `q`: `(d, Σq)`.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(
        super::KernelPath::Avx512Vnni.available()
            && x.len().is_multiple_of(16)
            && q.len() == x.len()
    );
    // SAFETY: the CPU has every feature this function enables (checked above).
    unsafe { quantize_block_inner(x, q) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
fn quantize_block_inner(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let mut m = _mm512_setzero_ps();
    for c in 0..x.len() / 16 {
        m = _mm512_max_ps(m, _mm512_abs_ps(ld512_ps(x, 16 * c)));
    }
    let amax = _mm512_reduce_max_ps(m);
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let mut sum = _mm512_setzero_si512();
    for c in 0..x.len() / 16 {
        // The default rounding mode is to nearest, ties to even.
        let v = _mm512_cvtps_epi32(_mm512_mul_ps(ld512_ps(x, 16 * c), id));
        sum = _mm512_add_epi32(sum, v);
        let bytes = _mm512_cvtepi32_epi8(v);
        let dst = &mut q[16 * c..16 * c + 16];
        // SAFETY: `dst` is exactly 16 bytes; unaligned store.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), bytes) };
    }
    (d, _mm512_reduce_add_epi32(sum))
}
