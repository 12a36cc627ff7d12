//! The x86 micro-kernels of [`super::conv`]: AVX2+FMA (`M ≤ 6` pixels × 16 channels, 12
//! accumulators) and AVX-512 (`M ≤ 6` pixels × 64 channels, 24 accumulators). Each step of
//! the reduction loads the `NR` packed weights of one (tap, input channel) once and
//! broadcasts one input value per pixel.
#![allow(unsafe_code)]
// Register tiles are indexed by (pixel, vector); index loops read clearer here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::{
    __m512, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_permute2f128_ps,
    _mm256_setzero_ps, _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};

use super::conv::TileArgs;

/// # Safety
/// Every address `args` names must be inside its buffer (see `TileArgs`), with 16 output
/// lanes per pixel; the CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2<const M: usize>(args: &TileArgs<'_>) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY (all pointer arithmetic and loads below): the caller guarantees every input tap
    // and chunk channel of each pixel, the `16·taps·cl` panel and 16 output lanes per pixel.
    let ins: [*const f32; M] = std::array::from_fn(|m| unsafe { args.inp.add(args.in_offs[m]) });
    let outs: [*mut f32; M] = std::array::from_fn(|m| unsafe { args.out.add(args.out_offs[m]) });
    if !args.first {
        for m in 0..M {
            unsafe {
                acc[m][0] = _mm256_loadu_ps(outs[m]);
                acc[m][1] = _mm256_loadu_ps(outs[m].add(8));
            }
        }
    }
    let mut w = args.w;
    for &t in args.taps {
        for c in 0..args.cl {
            let k = t + c;
            let (b0, b1) = unsafe { (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8))) };
            for m in 0..M {
                let a = unsafe { _mm256_broadcast_ss(&*ins[m].add(k)) };
                acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
            }
            w = unsafe { w.add(16) };
        }
    }
    for m in 0..M {
        unsafe {
            _mm256_storeu_ps(outs[m], acc[m][0]);
            _mm256_storeu_ps(outs[m].add(8), acc[m][1]);
        }
    }
}

/// # Safety
/// As [`tile_avx2`], with 64 output lanes per pixel; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn tile_avx512<const M: usize>(args: &TileArgs<'_>) {
    let mut acc: [[__m512; 4]; M] = [[_mm512_setzero_ps(); 4]; M];
    // SAFETY (all pointer arithmetic and loads below): as `tile_avx2`, with a `64·taps·cl`
    // panel and 64 output lanes per pixel.
    let ins: [*const f32; M] = std::array::from_fn(|m| unsafe { args.inp.add(args.in_offs[m]) });
    let outs: [*mut f32; M] = std::array::from_fn(|m| unsafe { args.out.add(args.out_offs[m]) });
    if !args.first {
        for m in 0..M {
            for v in 0..4 {
                acc[m][v] = unsafe { _mm512_loadu_ps(outs[m].add(16 * v)) };
            }
        }
    }
    let mut w = args.w;
    for &t in args.taps {
        for c in 0..args.cl {
            let k = t + c;
            let b: [__m512; 4] = std::array::from_fn(|v| unsafe { _mm512_loadu_ps(w.add(16 * v)) });
            for m in 0..M {
                let a = _mm512_set1_ps(unsafe { *ins[m].add(k) });
                for v in 0..4 {
                    acc[m][v] = _mm512_fmadd_ps(a, b[v], acc[m][v]);
                }
            }
            w = unsafe { w.add(64) };
        }
    }
    for m in 0..M {
        for v in 0..4 {
            unsafe { _mm512_storeu_ps(outs[m].add(16 * v), acc[m][v]) };
        }
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i, j < 8`: eight rows loaded, pairs
/// interleaved, quadruples shuffled, 128-bit halves exchanged, eight columns stored.
///
/// # Safety
/// Rows `0..8` of 8 values at `src` (stride `src_stride`) and of `dst` (stride `dst_stride`)
/// must be inside their buffers; the CPU must have AVX.
#[target_feature(enable = "avx")]
pub(super) unsafe fn transpose8x8(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    // SAFETY: the caller guarantees the eight rows on both sides.
    let r: [_; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * src_stride)) });
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for j in 0..4 {
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(
                dst.add(j * dst_stride),
                _mm256_permute2f128_ps::<0x20>(s[j], s[j + 4]),
            );
            _mm256_storeu_ps(
                dst.add((j + 4) * dst_stride),
                _mm256_permute2f128_ps::<0x31>(s[j], s[j + 4]),
            );
        }
    }
}
