//! Bounds-checked unaligned SIMD loads and a prefetch hint, shared by the x86 kernels.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128, __m128i, __m256i, _MM_HINT_T0, _MM_HINT_T1, _mm_loadu_ps, _mm_loadu_si128,
    _mm_prefetch, _mm256_loadu_si256,
};

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn ld256(s: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= s.len());
    // SAFETY: bytes `at..at + 32` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn ld256_i16(s: &[i16], at: usize) -> __m256i {
    assert!(at + 16 <= s.len());
    // SAFETY: values `at..at + 16` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
pub(super) fn ld128(s: &[u8], at: usize) -> __m128i {
    assert!(at + 16 <= s.len());
    // SAFETY: bytes `at..at + 16` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
pub(super) fn ld128_ps(s: &[f32], at: usize) -> __m128 {
    assert!(at + 4 <= s.len());
    // SAFETY: values `at..at + 4` are inside `s` (checked above); the load is unaligned.
    unsafe { _mm_loadu_ps(s.as_ptr().add(at)) }
}

/// Asks for the cache line at `s + at`, which may lie past `s`: the next rows of a weight,
/// which follow in memory and are swept in address order.
#[inline]
pub(super) fn prefetch(s: &[u8], at: usize) {
    let p = s.as_ptr().wrapping_add(at);
    // SAFETY: a prefetch is a hint that never faults and never reads into registers,
    // whatever the address; the pointer is only formed with wrapping arithmetic.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

/// As [`prefetch`], into the L2 cache only (what is warmed ahead of a phase).
#[inline]
pub(super) fn prefetch_l2(s: &[u8], at: usize) {
    let p = s.as_ptr().wrapping_add(at);
    // SAFETY: as in `prefetch`: a hint that never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
}
