//! Quantizers for IQ4_NL and IQ4_XS, the formats candle cannot write, so tests can make
//! weights and GGUF files in them. Each block (IQ4_XS: each sub-block of 32) takes the
//! least-squares scale for its values rounded to the nearest entry of the table
//! ([`IQ4_VALUES`]), starting from llama.cpp's first guess (the value of largest magnitude
//! maps to −127); IQ4_XS then rounds each sub-block's scale to a 6-bit multiple of the
//! super-block's. Simpler than llama-quantize's search, and as valid: any bytes are a valid
//! block of these formats.

use half::f16;
use studio_inference::quant::IQ4_VALUES;

/// The table index nearest to `v`.
fn nearest(v: f32) -> u8 {
    let mut best = 0u8;
    let mut err = f32::INFINITY;
    for (i, &t) in IQ4_VALUES.iter().enumerate() {
        let e = (f32::from(t) - v).abs();
        if e < err {
            err = e;
            best = i as u8;
        }
    }
    best
}

/// Indices of `x` at scale `d` (all 8, the value 1, when `d` is 0).
fn indices(x: &[f32], d: f32) -> Vec<u8> {
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    x.iter().map(|&v| nearest(v * id)).collect()
}

/// The least-squares scale of a block of 32 and its indices.
fn block_scale(x: &[f32]) -> (f32, Vec<u8>) {
    let max = x
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        return (0.0, vec![8; x.len()]);
    }
    let mut d = max / -127.0;
    let mut q = indices(x, d);
    for _ in 0..3 {
        let (mut num, mut den) = (0f32, 0f32);
        for (&v, &i) in x.iter().zip(&q) {
            let t = f32::from(IQ4_VALUES[usize::from(i)]);
            num += v * t;
            den += t * t;
        }
        if den > 0.0 {
            d = num / den;
            q = indices(x, d);
        }
    }
    (d, q)
}

/// Packs 32 indices as the format stores them: value `l` in the low nibble of byte `l`,
/// value `l + 16` in its high nibble.
fn pack(q: &[u8], out: &mut Vec<u8>) {
    for l in 0..16 {
        out.push(q[l] | (q[l + 16] << 4));
    }
}

/// IQ4_NL bytes of `x` (a multiple of 32 values): per block an f16 scale and 16 nibble bytes.
pub fn quantize_iq4_nl(x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(32), "IQ4_NL rows are blocks of 32");
    let mut out = Vec::with_capacity(x.len() / 32 * 18);
    for b in x.chunks_exact(32) {
        let (d, _) = block_scale(b);
        let d16 = f16::from_f32(d);
        out.extend_from_slice(&d16.to_bits().to_le_bytes());
        pack(&indices(b, d16.to_f32()), &mut out);
    }
    out
}

/// IQ4_XS bytes of `x` (a multiple of 256 values): per super-block an f16 scale, the 8
/// sub-blocks' 6-bit scales (`scales_h`, `scales_l`) and 128 nibble bytes.
pub fn quantize_iq4_xs(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(256),
        "IQ4_XS rows are super-blocks of 256"
    );
    let mut out = Vec::with_capacity(x.len() / 256 * 136);
    for sb in x.chunks_exact(256) {
        let scales: Vec<f32> = sb.chunks_exact(32).map(|b| block_scale(b).0).collect();
        let amax = scales
            .iter()
            .fold(0f32, |m, s| if s.abs() > m.abs() { *s } else { m });
        // ls − 32 spans −32..=31: the largest scale maps to −32 (its sign is the block's).
        let d16 = f16::from_f32(amax / -32.0);
        let d = d16.to_f32();
        let ls: Vec<i32> = scales
            .iter()
            .map(|&s| {
                if d == 0.0 {
                    0
                } else {
                    ((s / d).round() as i32).clamp(-32, 31)
                }
            })
            .collect();
        out.extend_from_slice(&d16.to_bits().to_le_bytes());
        let mut scales_h = 0u16;
        let mut scales_l = [0u8; 4];
        for (ib, &l) in ls.iter().enumerate() {
            let stored = (l + 32) as u8;
            scales_l[ib / 2] |= (stored & 0x0F) << (4 * (ib % 2));
            scales_h |= u16::from(stored >> 4) << (2 * ib);
        }
        out.extend_from_slice(&scales_h.to_le_bytes());
        out.extend_from_slice(&scales_l);
        for (b, &l) in sb.chunks_exact(32).zip(&ls) {
            pack(&indices(b, d * l as f32), &mut out);
        }
    }
    out
}
