//! Value parsers for the CLI's flags: `--model`, and the numeric flags: every count is bounded, every real number is
//! finite and in its range, before anything is sized from it. clap reports a refused value
//! with the flag's name ("invalid value '1e9' for '--mask-blur <MASK_BLUR>': …") and exits
//! with status 2.

use std::ops::RangeInclusive;

/// `--model`: any path, empty included (the default: the bundled demo model of the
/// subcommand's kind, see [`crate::bundled`]); clap's own path parser refuses empty values.
pub fn model_path() -> impl clap::builder::TypedValueParser<Value = std::path::PathBuf> {
    clap::builder::TypedValueParser::map(
        clap::builder::OsStringValueParser::new(),
        std::path::PathBuf::from,
    )
}

/// The most threads a flag may ask for: 4 per logical CPU (more only adds contention, and
/// thread pools size per-thread buffers from it).
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get) * 4
}

fn within<T: PartialOrd + std::fmt::Display>(v: T, range: &RangeInclusive<T>) -> Result<T, String> {
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "must be between {} and {}",
            range.start(),
            range.end()
        ))
    }
}

fn count_in(s: &str, range: RangeInclusive<usize>) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("not a whole number ({e})"))?;
    within(v, &range)
}

fn real_in(s: &str, range: RangeInclusive<f64>) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("not a number ({e})"))?;
    if !v.is_finite() {
        return Err("must be a finite number".to_owned());
    }
    within(v, &range)
}

/// `--threads`: 1 to 4 × the logical CPUs.
pub fn threads(s: &str) -> Result<usize, String> {
    count_in(s, 1..=max_threads())
}

/// Measured rounds (`--repeat`, timed frames and steps of the benchmarks): 1 to 1000.
pub fn rounds(s: &str) -> Result<usize, String> {
    count_in(s, 1..=1000)
}

/// Token counts of prompts and generations: 1 to 2²⁰.
pub fn tokens(s: &str) -> Result<usize, String> {
    count_in(s, 1..=1 << 20)
}

/// `bench memory --mib`: 1 MiB to 64 GiB.
pub fn mib(s: &str) -> Result<usize, String> {
    count_in(s, 1..=1 << 16)
}

/// Optimization steps and animation frames: 1 to 100,000.
pub fn steps(s: &str) -> Result<usize, String> {
    count_in(s, 1..=100_000)
}

/// A fraction: 0 to 1 (denoising strength).
pub fn fraction(s: &str) -> Result<f64, String> {
    real_in(s, 0.0..=1.0)
}

/// A ControlNet unit's weight: 0 to 2.
pub fn control_weight(s: &str) -> Result<f64, String> {
    real_in(s, 0.0..=2.0)
}

/// An upscaling factor: 0.25 to 16.
pub fn upscale_factor(s: &str) -> Result<f64, String> {
    real_in(s, 0.25..=16.0)
}

/// The hires fix's scale: 1 to 4.
pub fn hires_scale(s: &str) -> Result<f64, String> {
    real_in(s, 1.0..=4.0)
}

/// A blur radius in pixels: 0 to 1024.
pub fn blur_px(s: &str) -> Result<f32, String> {
    real_in(s, 0.0..=1024.0).map(|v| v as f32)
}

/// Truncation ψ: −10 to 10 (1 = none, 0 = the average image).
pub fn psi(s: &str) -> Result<f64, String> {
    real_in(s, -10.0..=10.0)
}

/// Frames per second: 0.1 to 240.
pub fn fps(s: &str) -> Result<f64, String> {
    real_in(s, 0.1..=240.0)
}

/// A learning rate: above 0, at most 10.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    let v = real_in(s, 0.0..=10.0)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("must be above 0".to_owned())
    }
}

/// Min-SNR-γ's cap on the signal-to-noise ratio: 0.01 to 1000.
pub fn snr_gamma(s: &str) -> Result<f64, String> {
    real_in(s, 0.01..=1000.0)
}

/// A loss weight: 0 to 10¹².
pub fn weight(s: &str) -> Result<f64, String> {
    real_in(s, 0.0..=1e12)
}

/// Classifier-free guidance: 0 to 100.
pub fn guidance(s: &str) -> Result<f64, String> {
    real_in(s, 0.0..=100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_finiteness() {
        assert_eq!(threads("1"), Ok(1));
        assert!(threads("0").is_err());
        assert!(
            threads("5000000")
                .expect_err("refused")
                .contains("between 1 and")
        );
        assert!(tokens("18446744073709551615").is_err());
        assert!(
            tokens("18446744073709551616")
                .expect_err("refused")
                .contains("not a whole")
        );
        assert!(rounds("18446744073709551615").is_err());
        assert_eq!(blur_px("4"), Ok(4.0));
        assert!(blur_px("1e9").is_err());
        assert!(blur_px("inf").expect_err("refused").contains("finite"));
        assert!(blur_px("nan").expect_err("refused").contains("finite"));
        assert!(psi("nan").is_err());
        assert_eq!(psi("-0.5"), Ok(-0.5));
        assert!(learning_rate("0").is_err());
        assert!(learning_rate("nan").is_err());
        assert!(fraction("1.5").is_err());
        assert!(fps("0").is_err());
    }
}
