//! Turning logits into the next token: logit bias, repeat penalty, presence and frequency
//! penalties, temperature, top-k, top-p, min-p and a seeded random draw. Shared by every model
//! family.
//!
//! Order of operations (as llama.cpp's default chain): the logit bias (OpenAI's `logit_bias`),
//! the repeat penalty over the last `repeat_last_n` tokens, OpenAI's presence and frequency
//! penalties over the tokens generated so far, then — unless `temperature <= 0`, which means
//! greedy — top-k, top-p, min-p on the tempered distribution, and a draw from what remains.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::grammar::StructuredOutput;

/// Sampling settings of one generation. `Default` gives the common desktop-chat defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 disables.
    pub min_p: f32,
    /// Penalty for tokens seen in the last `repeat_last_n` tokens; 1 disables.
    pub repeat_penalty: f32,
    /// How many of the latest tokens (prompt included) the repeat penalty covers; 0 disables.
    pub repeat_last_n: usize,
    /// Same seed, same settings, same prompt: same output.
    pub seed: u64,
    /// Most tokens to generate; at least 1.
    pub max_new_tokens: usize,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// OpenAI's presence penalty, in `[-2, 2]`: subtracted once from the logit of every token
    /// already generated; 0 disables.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in `[-2, 2]`: subtracted from a token's logit once per time
    /// it was generated; 0 disables.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before sampling (OpenAI's `logit_bias`, each in
    /// `[-100, 100]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// What the output must be (JSON, JSON of a schema, a grammar), enforced while sampling.
    #[serde(skip_serializing_if = "StructuredOutput::is_off")]
    pub structured: StructuredOutput,
    /// Tools offered to the model in a chat (OpenAI's `tools` list), rendered by its chat
    /// template ([`crate::llm::loader::LoadedModel::chat_reply`]); its calls are read back
    /// with [`crate::llm::tools`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
            max_new_tokens: 256,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            structured: StructuredOutput::Off,
            tools: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalty: deterministic, for tests and benchmarks.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Fails with [`Error::InvalidParameter`] naming the first setting out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidParameter(m.to_owned()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be 0 (greedy) or positive");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p must be in [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat penalty must be positive (1 disables it)");
        }
        if self.max_new_tokens == 0 {
            return bad("max new tokens must be at least 1");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("the presence penalty must be in [-2, 2]");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("the frequency penalty must be in [-2, 2]");
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("each logit bias must be in [-100, 100]");
        }
        Ok(())
    }
}

/// A seeded sampler; one per generation.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was sampled (for the presence and frequency penalties).
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for `params`, its random draws seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            counts: std::collections::HashMap::new(),
        }
    }

    /// The settings it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let id = self.choose(logits, history);
        self.note(id);
        id
    }

    /// Records `id` as generated (for the presence and frequency penalties; nothing is kept
    /// when they are off).
    pub fn note(&mut self, id: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(id).or_insert(0) += 1;
        }
    }

    /// Picks a token as [`Self::sample`] does without recording it (a grammar may refuse it,
    /// see [`crate::llm::grammar::Constraint`]).
    pub fn choose(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalize = (p.repeat_penalty - 1.0).abs() > f32::EPSILON && p.repeat_last_n > 0;
        let openai =
            (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) && !self.counts.is_empty();
        if p.temperature <= 0.0 && !penalize && !openai && p.logit_bias.is_empty() {
            return argmax(logits);
        }
        let mut logits = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if penalize {
            apply_repeat_penalty(&mut logits, history, p.repeat_penalty, p.repeat_last_n);
        }
        if openai {
            for (&id, &count) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    // Counts are at most the generation's length.
                    #[allow(clippy::cast_precision_loss)]
                    let c = count as f32;
                    *l -= c * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let candidates = filtered_distribution(&logits, p);
        let draw: f32 = self.rng.random();
        let mut acc = 0.0;
        for &(id, prob) in &candidates {
            acc += prob;
            if draw < acc {
                return id;
            }
        }
        // Rounding left `acc` a hair under 1: the last candidate takes the remainder.
        candidates
            .last()
            .map_or_else(|| argmax(&logits), |&(id, _)| id)
    }
}

/// Index of the largest logit (the first one on ties); NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Divides positive logits and multiplies negative ones by `penalty`, once per distinct token in
/// the window (the CTRL / llama.cpp rule).
pub fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], penalty: f32, last_n: usize) {
    let start = history.len().saturating_sub(last_n);
    let mut seen = std::collections::HashSet::new();
    for &id in &history[start..] {
        let Some(l) = logits.get_mut(id as usize) else {
            continue;
        };
        if seen.insert(id) {
            *l = if *l >= 0.0 {
                *l / penalty
            } else {
                *l * penalty
            };
        }
    }
}

/// The tempered, truncated distribution as `(token, probability)`, most likely first,
/// probabilities summing to 1.
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l / p.temperature))
        .collect();
    if c.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    // Runs once per generated token over the whole vocabulary (150k entries for today's
    // models): select the top k in linear time and sort only those.
    if p.top_k > 0 && p.top_k < c.len() {
        c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        c.truncate(p.top_k);
    }
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Softmax over what is left.
    let max = c[0].1;
    let mut sum = 0.0;
    for e in &mut c {
        e.1 = (e.1 - max).exp();
        sum += e.1;
    }
    for e in &mut c {
        e.1 /= sum;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = c.len();
        for (i, e) in c.iter().enumerate() {
            acc += e.1;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
    }
    if p.min_p > 0.0 {
        let threshold = c[0].1 * p.min_p;
        c.retain(|e| e.1 >= threshold);
    }
    let total: f32 = c.iter().map(|e| e.1).sum();
    for e in &mut c {
        e.1 /= total;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let p = SamplingParams {
            top_k: 2,
            ..params(1.0)
        };
        let d = filtered_distribution(&[1.0, 4.0, 3.0, 2.0], &p);
        let ids: Vec<u32> = d.iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!((d.iter().map(|e| e.1).sum::<f32>() - 1.0).abs() < 1e-6);
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            assert!(matches!(s.sample(&[1.0, 4.0, 3.0, 2.0], &[]), 1 | 2));
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probabilities 0.5, 0.3, 0.2 (as logits of their logs)
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = SamplingParams {
            top_p: 0.75,
            ..params(1.0)
        };
        let d = filtered_distribution(&logits, &p);
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 0.625).abs() < 1e-5, "{d:?}");
        let p = SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        };
        assert_eq!(filtered_distribution(&logits, &p).len(), 1);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let p = SamplingParams {
            min_p: 0.2,
            ..params(1.0)
        };
        // threshold 0.12: the 0.1 token goes.
        let ids: Vec<u32> = filtered_distribution(&logits, &p)
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [2.0, 1.0];
        let cold = filtered_distribution(&logits, &params(0.5))[0].1;
        let warm = filtered_distribution(&logits, &params(2.0))[0].1;
        let plain = filtered_distribution(&logits, &params(1.0))[0].1;
        assert!(cold > plain && plain > warm, "{cold} {plain} {warm}");
    }

    #[test]
    fn repeat_penalty_scales_seen_tokens_once() {
        let mut logits = vec![2.0, -2.0, 2.0, 1.0];
        apply_repeat_penalty(&mut logits, &[3, 0, 1, 0, 0], 2.0, 4);
        // window = [0, 1, 0, 0]: token 0 halved once, token 1 doubled, token 3 outside window.
        assert_eq!(logits, vec![1.0, -4.0, 2.0, 1.0]);
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 10.0,
            repeat_last_n: 8,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.5)
            });
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openais_formula() {
        // Greedy: token 0 leads by 1.0 until penalised.
        let logits = [3.0, 2.0, 0.0];
        let run = |presence: f32, frequency: f32| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..params(0.0)
            });
            (0..4).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(0.0, 0.0), [0, 0, 0, 0]);
        // Presence 1.5: after one 0, token 0 is at 1.5 < 2.0; then both are penalised once,
        // however often they came (1.5 against 0.5).
        assert_eq!(run(1.5, 0.0), [0, 1, 0, 0]);
        // Frequency 0.6: 3.0, 2.4, 1.8 for token 0 against 2.0 (then 1.4) for token 1.
        assert_eq!(run(0.0, 0.6), [0, 0, 1, 0]);
        // The prompt is not counted: only what was sampled.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&logits, &[0, 0, 0]), 0);
    }

    #[test]
    fn logit_bias_moves_and_bans_tokens() {
        let logits = [3.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, -100.0), (2, 2.5)],
            ..params(0.0)
        });
        assert_eq!(s.sample(&logits, &[]), 2);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, -100.0), (99, 5.0)],
            ..params(1.0)
        });
        for _ in 0..100 {
            assert_ne!(s.sample(&logits, &[]), 0, "banned");
        }
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(SamplingParams::default().validate().is_ok());
        for bad in [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                max_new_tokens: 0,
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..SamplingParams::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
