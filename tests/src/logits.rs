//! Comparing logits in parity tests.

/// The index of the largest value (the greedy token).
pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
}

/// The largest absolute difference between `a` and `b`, relative to the largest magnitude
/// in `a`.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
        / scale
}
