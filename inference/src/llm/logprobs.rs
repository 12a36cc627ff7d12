//! Log-probabilities of generated tokens, as OpenAI's `logprobs` / `top_logprobs` report them:
//! from the model's own distribution at each step (its logits' log-softmax, before the
//! sampler's temperature, penalties and bias, as vLLM reports them by default).

/// The most alternatives reported per token (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One token's log-probability and the `top` most likely tokens at its step, most likely
/// first (at most [`MAX_TOP_LOGPROBS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The generated token.
    pub id: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at its step and theirs.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `id` under `logits`, and the `top` best tokens.
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> TokenLogprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    // The log-sum-exp; logits are f32, so is the answer.
    #[allow(clippy::cast_possible_truncation)]
    let lse = max + sum.ln() as f32;
    let lp = |l: f32| {
        if l.is_finite() {
            l - lse
        } else {
            f32::NEG_INFINITY
        }
    };
    let logprob = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    let top = top.min(MAX_TOP_LOGPROBS).min(logits.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top);
    if top > 0 {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (u32::try_from(i).unwrap_or(u32::MAX), l))
            .collect();
        let k = top.min(all.len());
        if k > 0 && k < all.len() {
            all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        }
        all.truncate(k);
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        best.extend(all.into_iter().map(|(i, l)| (i, lp(l))));
    }
    TokenLogprobs {
        id,
        logprob,
        top: best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_come_first() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let t = token_logprobs(&logits, 2, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((t.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
        let total: f32 = (0..3)
            .map(|i| token_logprobs(&logits, i, 0).logprob.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprobs(&logits, 3, 0).logprob.is_infinite());
        assert_eq!(
            token_logprobs(&logits, 0, 50).top.len(),
            3,
            "finite ones only"
        );
    }
}
