//! Noise schedules and the samplers Stable Diffusion users ask for by name.
//!
//! Everything here works in **k-diffusion form**: the latent `x` lives in "sigma space",
//! `x = x0 + sigma·eps`, as in k-diffusion and the SD web UIs. The pipeline calls the UNet
//! with `x · c_in` ([`Sampler::input_scale`], `c_in = 1/sqrt(sigma² + 1)`) at timestep
//! [`Sampler::timestep`], applies CFG, turns the model output into a denoised (x0)
//! prediction with [`denoised_from_output`] and hands it to [`Sampler::step`]. Note that
//! `x · c_in` is exactly the variance-preserving sample the diffusers schedulers (DDIM,
//! DPM-Solver, UniPC, LCM) work on, so one loop serves every sampler.
//!
//! # What each sampler matches
//!
//! The reference fixtures (`tests/fixtures/samplers`, made by `tools/make_sampler_fixture.py`
//! with diffusers 0.42.1) check the tables and whole trajectories against diffusers.
//!
//! | sampler | web UI name | math | timesteps / sigmas |
//! |---|---|---|---|
//! | [`SamplerKind::Euler`] | `Euler` | k-diffusion `sample_euler` (no churn) = diffusers `EulerDiscreteScheduler` | see schedules below |
//! | [`SamplerKind::EulerAncestral`] | `Euler a` | k-diffusion `sample_euler_ancestral`, eta 1 = diffusers `EulerAncestralDiscreteScheduler` | see schedules below |
//! | [`SamplerKind::DpmPp2M`] | `DPM++ 2M` | k-diffusion `sample_dpmpp_2m` = diffusers `DPMSolverMultistepScheduler` (dpmsolver++, order 2, midpoint, final sigma 0) | see schedules below |
//! | [`SamplerKind::Ddim`] | `DDIM` | diffusers `DDIMScheduler`, eta 0, SD config (`leading`, `steps_offset=1`, `set_alpha_to_one=False`) | 20 steps: 951, 901, …, 1 |
//! | [`SamplerKind::UniPc`] | `UniPC` | diffusers `UniPCMultistepScheduler` defaults (order 2, bh2, predict_x0, lower_order_final, corrector on every step) | `linspace` spacing, rounded: 20 steps: 999, 949, …, 50 |
//! | [`SamplerKind::Lcm`] | `LCM` | diffusers `LCMScheduler` (with its c_skip/c_out boundary condition, timestep_scaling 10) | `original_inference_steps=50`: 4 steps: 999, 759, 499, 259 |
//!
//! Schedules ([`ScheduleKind`], the web UI's "Schedule type") for Euler, Euler a and DPM++ 2M:
//!
//! - **Normal**: k-diffusion's discrete `get_sigmas`: `t = linspace(T-1, 0, steps)`, sigma at
//!   each `t` by log-sigma interpolation ([`NoiseSchedule::sigma_at`]), then 0. This is
//!   diffusers' `EulerDiscreteScheduler` with `timestep_spacing="linspace"` for two steps or more
//!   (diffusers interpolates sigma linearly rather than log-linearly between integer timesteps;
//!   the difference is below 1e-4 relative at the step counts people use). For **one** step
//!   diffusers' linspace gives t = 0 (sigma_min, a useless plan); Studio follows k-diffusion
//!   (t = T-1). DPM++ 2M uses the same table; diffusers' `DPMSolverMultistepScheduler` default
//!   table (`linspace(0, T-1, steps+1)` rounded, last step from t≈T/steps) is *not* used, since
//!   web UI users expect k-diffusion's.
//! - **Karras**: Karras et al. (2022), rho = 7, between the schedule's sigma_min (t = 0) and
//!   sigma_max (t = T-1), then 0 (diffusers `use_karras_sigmas=True`).
//! - **Exponential**: log-linear between sigma_max and sigma_min, then 0 (diffusers
//!   `use_exponential_sigmas=True`, k-diffusion `get_sigmas_exponential`).
//!
//! For Karras and Exponential the UNet timestep is [`NoiseSchedule::timestep_for_sigma`]
//! (fractional, like k-diffusion's `sigma_to_t` without quantization, which is what the web UI
//! does); diffusers' DPM-Solver rounds its Karras timesteps to integers, which changes the
//! model's input by less than half a training step.
//!
//! UniPC honours the schedule as diffusers does, with integer timesteps: Karras sigmas with
//! rounded timesteps (as diffusers), Exponential sigmas with rounded timesteps (diffusers
//! truncates them when it casts to int64, so its timestep can be one lower). DDIM and LCM have fixed timestep tables and
//! ignore the schedule ([`SamplerKind::uses_schedule`]).
//!
//! # Details worth knowing
//!
//! - **DDIM's last step.** With `set_alpha_to_one=False` diffusers' final DDIM step goes to
//!   `alphas_cumprod[0]` (sigma ≈ 0.029), not to sigma 0, and the pipeline decodes that VP
//!   sample. Studio's plan still ends at sigma 0 (as every plan does) and the last DDIM step
//!   returns exactly diffusers' final sample, `sqrt(ā₀)·x0 + sqrt(1-ā₀)·eps`, so images match
//!   diffusers. Every other DDIM step is an Euler step between consecutive DDIM sigmas, which
//!   is deterministic DDIM written in sigma space.
//! - **Multistep history** (DPM++ 2M, UniPC) is used only when the previous call to
//!   [`Sampler::step`] was for step `i - 1`; a loop that starts at `i > 0` (img2img) or skips
//!   a step starts again at first order, like diffusers does after `set_begin_index`.
//! - **Ancestral noise.** Euler a calls the noise source on every step except the last (where
//!   it would be multiplied by 0); LCM on every step except the last, which returns the
//!   denoised sample. Other samplers never call it.
//! - LCM accepts at most 50 steps (`original_inference_steps`), like diffusers. DDIM with 1000
//!   steps would ask diffusers for timestep 1000; Studio clamps it to 999.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most steps any plan accepts.
pub const MAX_STEPS: usize = 1000;

/// LCM's `original_inference_steps`: its timesteps are a subset of this many.
pub const LCM_ORIGINAL_STEPS: usize = 50;

/// The samplers Studio offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    /// `Euler`: first-order Euler steps, deterministic.
    Euler,
    /// `Euler a`: Euler steps that add fresh noise each step (eta 1).
    EulerAncestral,
    /// `DDIM`: deterministic DDIM (eta 0) on its own fixed timestep table.
    Ddim,
    /// `DPM++ 2M`: second-order multistep DPM-Solver++.
    DpmPp2M,
    /// `UniPC`: the order-2 multistep predictor-corrector.
    UniPc,
    /// `LCM`: for latent-consistency (distilled) models; at most 50 steps, 4 to 8 in
    /// practice.
    Lcm,
}

impl SamplerKind {
    /// Every sampler, in the order a menu shows them.
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2M,
        SamplerKind::UniPc,
        SamplerKind::Lcm,
    ];

    /// The name the SD web UI writes in PNG metadata (`Sampler: …`).
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Ddim => "DDIM",
            SamplerKind::DpmPp2M => "DPM++ 2M",
            SamplerKind::UniPc => "UniPC",
            SamplerKind::Lcm => "LCM",
        }
    }

    /// Parses a web UI sampler name, case-insensitively. Older web UI versions folded the
    /// schedule into the name ("DPM++ 2M Karras"); that suffix comes back as the schedule.
    /// k-diffusion's function names (`k_euler_a`, `dpmpp_2m`, …) are accepted too.
    pub fn parse(name: &str) -> Option<(SamplerKind, Option<ScheduleKind>)> {
        let lower = name.trim().to_ascii_lowercase();
        let mut base = lower.as_str();
        let mut schedule = None;
        for kind in ScheduleKind::ALL {
            let suffix = kind.name().to_ascii_lowercase();
            if let Some(rest) = base.strip_suffix(suffix.as_str())
                && let Some(rest) = rest.strip_suffix([' ', '_'])
            {
                base = rest.trim_end();
                schedule = Some(kind);
                break;
            }
        }
        let base = base.strip_prefix("k_").unwrap_or(base);
        let kind = match base {
            "euler" => SamplerKind::Euler,
            "euler a" | "euler_a" | "euler ancestral" | "euler_ancestral" => {
                SamplerKind::EulerAncestral
            }
            "ddim" => SamplerKind::Ddim,
            "dpm++ 2m" | "dpm++2m" | "dpmpp_2m" | "dpmpp 2m" => SamplerKind::DpmPp2M,
            "unipc" | "uni_pc" => SamplerKind::UniPc,
            "lcm" => SamplerKind::Lcm,
            _ => return None,
        };
        Some((kind, schedule))
    }

    /// Whether the sampler adds fresh noise each step (and so calls the noise source).
    pub fn is_ancestral(self) -> bool {
        matches!(self, SamplerKind::EulerAncestral | SamplerKind::Lcm)
    }

    /// Whether the schedule type changes this sampler's plan (DDIM and LCM have fixed
    /// timestep tables).
    pub fn uses_schedule(self) -> bool {
        !matches!(self, SamplerKind::Ddim | SamplerKind::Lcm)
    }

    /// Whether the sampler keeps history between steps (DPM++ 2M, UniPC).
    pub fn is_multistep(self) -> bool {
        matches!(self, SamplerKind::DpmPp2M | SamplerKind::UniPc)
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the sigmas are spaced (the web UI's "Schedule type").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// k-diffusion's default: timesteps evenly spaced from T-1 down to 0.
    #[default]
    Normal,
    /// Karras et al. (2022), rho 7: steps crowd towards the low sigmas.
    Karras,
    /// Sigmas evenly spaced in log from sigma_max down to sigma_min.
    Exponential,
}

impl ScheduleKind {
    /// Every schedule, in menu order.
    pub const ALL: [ScheduleKind; 3] = [
        ScheduleKind::Normal,
        ScheduleKind::Karras,
        ScheduleKind::Exponential,
    ];

    /// The name the web UI writes (`Schedule type: …`).
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "Normal",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
        }
    }

    /// Parses a schedule name case-insensitively ("Automatic" and unknown names give `None`).
    pub fn parse(name: &str) -> Option<ScheduleKind> {
        let name = name.trim();
        ScheduleKind::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(name))
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Prediction {
    /// The noise (SD 1.x, SDXL, SD 2.x base 512).
    #[default]
    Epsilon,
    /// v = alpha·eps − sigma·x0 (SD 2.x 768-v).
    VPrediction,
}

/// How the training betas are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BetaSchedule {
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)²` (Stable Diffusion).
    #[default]
    ScaledLinear,
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
}

/// The training noise schedule of a model (diffusers' `scheduler_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    /// Training timesteps T (1000 for SD); at least 2.
    pub num_train_timesteps: usize,
    /// Beta at timestep 0, in (0, 1) (0.00085 for SD).
    pub beta_start: f64,
    /// Beta at timestep T-1, in (0, 1) (0.012 for SD).
    pub beta_end: f64,
    /// How the betas are spaced between `beta_start` and `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// What the UNet predicts, which sets how its output becomes a denoised sample.
    pub prediction: Prediction,
}

impl Default for NoiseSchedule {
    /// Stable Diffusion 1.x / 2.x / XL: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon.
    fn default() -> Self {
        NoiseSchedule {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction: Prediction::Epsilon,
        }
    }
}

impl NoiseSchedule {
    fn validate(&self) -> Result<()> {
        let betas_ok = self.beta_start > 0.0
            && self.beta_end > 0.0
            && self.beta_start < 1.0
            && self.beta_end < 1.0;
        if self.num_train_timesteps < 2 || !betas_ok {
            return Err(Error::InvalidParameter(format!(
                "noise schedule: need at least 2 training timesteps and betas in (0, 1), got {} \
                 timesteps and betas {}..{}",
                self.num_train_timesteps, self.beta_start, self.beta_end
            )));
        }
        Ok(())
    }

    /// ᾱ_t for t = 0..T: the cumulative product of `1 − beta_t`.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let (start, end) = match self.beta_schedule {
            BetaSchedule::ScaledLinear => (self.beta_start.sqrt(), self.beta_end.sqrt()),
            BetaSchedule::Linear => (self.beta_start, self.beta_end),
        };
        let mut product = 1.0;
        (0..n)
            .map(|i| {
                let frac = if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                let b = start + (end - start) * frac;
                let beta = match self.beta_schedule {
                    BetaSchedule::ScaledLinear => b * b,
                    BetaSchedule::Linear => b,
                };
                product *= 1.0 - beta;
                product
            })
            .collect()
    }

    /// ln(sigma_t) for every integer training timestep (increasing in t).
    fn log_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod()
            .into_iter()
            .map(|a| ((1.0 - a) / a).sqrt().ln())
            .collect()
    }

    /// Sigma at a (possibly fractional) timestep, interpolating ln(sigma) between the integer
    /// timesteps (k-diffusion's `t_to_sigma`). `t` is clamped to `0..=T-1`.
    pub fn sigma_at(&self, t: f64) -> f64 {
        sigma_at(&self.log_sigmas(), t)
    }

    /// The (fractional) timestep whose sigma is `sigma`, interpolating in ln(sigma)
    /// (k-diffusion's `sigma_to_t`, diffusers' `_sigma_to_t`). Sigmas outside the schedule's
    /// range clamp to 0 or T-1.
    pub fn timestep_for_sigma(&self, sigma: f64) -> f64 {
        timestep_for_sigma(&self.log_sigmas(), sigma)
    }
}

fn sigma_at(log_sigmas: &[f64], t: f64) -> f64 {
    let last = log_sigmas.len() - 1;
    let t = if t.is_nan() {
        0.0
    } else {
        t.clamp(0.0, last as f64)
    };
    let low = t.floor() as usize;
    let high = (low + 1).min(last);
    let w = t - low as f64;
    ((1.0 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
}

fn timestep_for_sigma(log_sigmas: &[f64], sigma: f64) -> f64 {
    if sigma.is_nan() || sigma <= 0.0 {
        return 0.0;
    }
    let log_sigma = sigma.ln();
    let n = log_sigmas.len();
    // The last index whose log-sigma is <= ln(sigma), kept so that `low + 1` exists.
    let low = log_sigmas
        .partition_point(|&ls| ls <= log_sigma)
        .saturating_sub(1)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    low as f64 + w
}

/// A sampling plan: the sigma at each step (`steps + 1` values, the last 0.0) and the UNet
/// timestep at each step (`steps` values).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Sigma at the start of each step, then the final 0.0 (`steps + 1` values).
    pub sigmas: Vec<f64>,
    /// The UNet timestep at each step (`steps` values, possibly fractional).
    pub timesteps: Vec<f64>,
}

/// `n` evenly spaced values from `start` to `end`, like numpy's `linspace` (endpoint included;
/// one value gives `start`).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                end
            } else {
                start + step * i as f64
            }
        })
        .collect()
}

fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv = sigma_min.powf(1.0 / RHO);
    let max_inv = sigma_max.powf(1.0 / RHO);
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(RHO))
        .collect()
}

fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The plan for `kind` with `schedule` over `steps` steps (see the module docs for which
/// diffusers / k-diffusion table each combination reproduces).
pub fn plan(
    kind: SamplerKind,
    schedule: ScheduleKind,
    steps: usize,
    noise: &NoiseSchedule,
) -> Result<Plan> {
    noise.validate()?;
    let train = noise.num_train_timesteps;
    if steps == 0 {
        return Err(Error::InvalidParameter(format!(
            "{}: the number of sampling steps must be at least 1",
            kind.name()
        )));
    }
    let max = MAX_STEPS.min(train);
    if steps > max {
        return Err(Error::InvalidParameter(format!(
            "{}: {steps} sampling steps is more than the maximum of {max}",
            kind.name()
        )));
    }
    let log_sigmas = noise.log_sigmas();
    let t_max = (train - 1) as f64;
    let sigma_min = sigma_at(&log_sigmas, 0.0);
    let sigma_max = sigma_at(&log_sigmas, t_max);
    let from_sigmas = |sigmas: Vec<f64>, round: bool| {
        let timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = timestep_for_sigma(&log_sigmas, s);
                if round { t.round_ties_even() } else { t }
            })
            .collect();
        (sigmas, timesteps)
    };
    let (mut sigmas, timesteps): (Vec<f64>, Vec<f64>) = match kind {
        SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::DpmPp2M => match schedule {
            ScheduleKind::Normal => {
                let timesteps = linspace(t_max, 0.0, steps);
                let sigmas = timesteps
                    .iter()
                    .map(|&t| sigma_at(&log_sigmas, t))
                    .collect();
                (sigmas, timesteps)
            }
            ScheduleKind::Karras => from_sigmas(karras_sigmas(sigma_min, sigma_max, steps), false),
            ScheduleKind::Exponential => {
                from_sigmas(exponential_sigmas(sigma_min, sigma_max, steps), false)
            }
        },
        SamplerKind::UniPc => match schedule {
            ScheduleKind::Normal => {
                // numpy: linspace(0, T-1, steps+1).round()[::-1][:-1]
                let step = t_max / steps as f64;
                let timesteps: Vec<f64> = (1..=steps)
                    .rev()
                    .map(|k| {
                        if k == steps {
                            t_max
                        } else {
                            (k as f64 * step).round_ties_even()
                        }
                    })
                    .collect();
                let sigmas = timesteps
                    .iter()
                    .map(|&t| sigma_at(&log_sigmas, t))
                    .collect();
                (sigmas, timesteps)
            }
            // diffusers rounds the Karras timesteps; its Exponential ones are truncated by the
            // cast to int64, which Studio does not copy (it rounds both).
            ScheduleKind::Karras => from_sigmas(karras_sigmas(sigma_min, sigma_max, steps), true),
            ScheduleKind::Exponential => {
                from_sigmas(exponential_sigmas(sigma_min, sigma_max, steps), true)
            }
        },
        SamplerKind::Ddim => {
            // "leading" spacing with steps_offset = 1.
            let ratio = train / steps;
            let timesteps: Vec<f64> = (0..steps)
                .rev()
                .map(|k| ((k * ratio + 1).min(train - 1)) as f64)
                .collect();
            let sigmas = timesteps
                .iter()
                .map(|&t| sigma_at(&log_sigmas, t))
                .collect();
            (sigmas, timesteps)
        }
        SamplerKind::Lcm => {
            if steps > LCM_ORIGINAL_STEPS {
                return Err(Error::InvalidParameter(format!(
                    "LCM: {steps} sampling steps is more than the maximum of {LCM_ORIGINAL_STEPS} \
                     (LCM picks its timesteps from {LCM_ORIGINAL_STEPS}); use 4 to 8 steps"
                )));
            }
            let k = train / LCM_ORIGINAL_STEPS;
            if k == 0 {
                return Err(Error::InvalidParameter(format!(
                    "LCM needs at least {LCM_ORIGINAL_STEPS} training timesteps, the model has {train}"
                )));
            }
            // origin = [1..=50]·k − 1, reversed; take floor(linspace(0, 50, steps, endpoint=False)).
            let stride = LCM_ORIGINAL_STEPS as f64 / steps as f64;
            let timesteps: Vec<f64> = (0..steps)
                .map(|i| {
                    let index = (i as f64 * stride).floor() as usize;
                    ((LCM_ORIGINAL_STEPS - index) * k - 1) as f64
                })
                .collect();
            let sigmas = timesteps
                .iter()
                .map(|&t| sigma_at(&log_sigmas, t))
                .collect();
            (sigmas, timesteps)
        }
    };
    sigmas.push(0.0);
    Ok(Plan { sigmas, timesteps })
}

/// Converts the (CFG-combined) model output at `sigma` into the denoised (x0) prediction in
/// k-diffusion space: epsilon: `x − sigma·out`; v: `x/(sigma²+1) − out·sigma/sqrt(sigma²+1)`.
pub fn denoised_from_output(
    x: &Tensor,
    out: &Tensor,
    sigma: f64,
    prediction: Prediction,
) -> Result<Tensor> {
    let denoised = match prediction {
        Prediction::Epsilon => lin2(x, 1.0, out, -sigma)?,
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(x, 1.0 / s2, out, -sigma / s2.sqrt())?
        }
    };
    Ok(denoised)
}

/// `a·ca + b·cb`.
fn lin2(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> candle_core::Result<Tensor> {
    a.affine(ca, 0.0)?.add(&b.affine(cb, 0.0)?)
}

/// `a·ca + b·cb + c·cc`.
fn lin3(
    a: &Tensor,
    ca: f64,
    b: &Tensor,
    cb: f64,
    c: &Tensor,
    cc: f64,
) -> candle_core::Result<Tensor> {
    lin2(a, ca, b, cb)?.add(&c.affine(cc, 0.0)?)
}

/// What a multistep sampler remembers from the previous call.
#[derive(Debug, Clone)]
struct History {
    /// The step this was recorded at.
    index: usize,
    /// The denoised prediction at `index`.
    denoised: Tensor,
    /// The denoised prediction at `index - 1`, when that step was taken too.
    older: Option<Tensor>,
    /// UniPC: the (corrected) sample the predictor started from at `index`.
    sample: Tensor,
    /// UniPC: the predictor order used at `index`.
    order: usize,
}

/// A sampler with its plan, stepping a latent from pure noise to a clean sample.
#[derive(Debug, Clone)]
pub struct Sampler {
    kind: SamplerKind,
    schedule: ScheduleKind,
    plan: Plan,
    /// ᾱ₀, for DDIM's final step.
    alpha_cumprod_0: f64,
    history: Option<History>,
}

impl Sampler {
    /// Builds the plan for `kind` with `schedule` over `steps` steps of `noise`; fails as
    /// [`plan`] does (no steps, too many, or an invalid noise schedule).
    pub fn new(
        kind: SamplerKind,
        schedule: ScheduleKind,
        steps: usize,
        noise: &NoiseSchedule,
    ) -> Result<Self> {
        let plan = plan(kind, schedule, steps, noise)?;
        let alpha_cumprod_0 = noise.alphas_cumprod()[0];
        Ok(Sampler {
            kind,
            schedule,
            plan,
            alpha_cumprod_0,
            history: None,
        })
    }

    /// The sampler it runs.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The schedule the plan was built with (DDIM and LCM ignore it).
    pub fn schedule(&self) -> ScheduleKind {
        self.schedule
    }

    /// The number of steps in the plan.
    pub fn steps(&self) -> usize {
        self.plan.timesteps.len()
    }

    /// The sigmas and timesteps of every step.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Sigma at step `i` (`i == steps()` gives the final 0.0).
    pub fn sigma(&self, i: usize) -> f64 {
        self.plan.sigmas[i]
    }

    /// The UNet timestep at step `i`.
    pub fn timestep(&self, i: usize) -> f64 {
        self.plan.timesteps[i]
    }

    /// The UNet input scale at step `i`: `1/sqrt(sigma_i² + 1)`.
    pub fn input_scale(&self, i: usize) -> f64 {
        let s = self.plan.sigmas[i];
        1.0 / (s * s + 1.0).sqrt()
    }

    /// Forgets multistep history (the next step starts at first order).
    pub fn reset(&mut self) {
        self.history = None;
    }

    /// The step an img2img run of `strength` (0..=1) starts at: `steps − int(strength·steps)`,
    /// as the web UI and diffusers compute it.
    pub fn img2img_start(&self, strength: f64) -> usize {
        let steps = self.steps();
        let init = ((strength.clamp(0.0, 1.0) * steps as f64) as usize).min(steps);
        steps - init
    }

    /// One step from `x` at step `i` to `x` at step `i + 1`, given the denoised prediction at
    /// step `i`. `noise` yields standard-normal noise shaped like `x`; only ancestral
    /// samplers call it. Multistep history is used only when the previous call was for
    /// step `i - 1`.
    pub fn step(
        &mut self,
        i: usize,
        x: &Tensor,
        denoised: &Tensor,
        noise: &mut dyn FnMut() -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let steps = self.steps();
        if i >= steps {
            return Err(Error::InvalidParameter(format!(
                "{}: step {i} is past the last step ({} of {steps})",
                self.kind.name(),
                steps.saturating_sub(1)
            )));
        }
        let history = self.history.take().filter(|h| i > 0 && h.index == i - 1);
        let s = self.plan.sigmas[i];
        let s_next = self.plan.sigmas[i + 1];
        let out = match self.kind {
            SamplerKind::Euler => euler(x, denoised, s, s_next)?,
            SamplerKind::EulerAncestral => {
                let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s))
                    .max(0.0)
                    .sqrt()
                    .min(s_next);
                let down = (s_next * s_next - up * up).max(0.0).sqrt();
                let x = euler(x, denoised, s, down)?;
                if s_next > 0.0 && up > 0.0 {
                    let z = noise()?;
                    lin2(&x, 1.0, &z, up)?
                } else {
                    x
                }
            }
            SamplerKind::Ddim => {
                if i + 1 < steps {
                    euler(x, denoised, s, s_next)?
                } else {
                    // diffusers with set_alpha_to_one=False: the final "previous" ᾱ is ᾱ₀.
                    // eps = (x − x0)/sigma; out = sqrt(ᾱ₀)·x0 + sqrt(1 − ᾱ₀)·eps.
                    let a0 = self.alpha_cumprod_0;
                    let e = (1.0 - a0).sqrt() / s;
                    lin2(denoised, a0.sqrt() - e, x, e)?
                }
            }
            SamplerKind::DpmPp2M => {
                let out = self.dpmpp_2m(i, x, denoised, history.as_ref())?;
                self.history = Some(History {
                    index: i,
                    denoised: denoised.clone(),
                    older: None,
                    sample: x.clone(),
                    order: 1,
                });
                out
            }
            SamplerKind::UniPc => self.unipc(i, x, denoised, history)?,
            SamplerKind::Lcm => {
                // Boundary condition with timestep_scaling 10, sigma_data 0.5.
                let t = self.plan.timesteps[i] * 10.0;
                let c_skip = 0.25 / (t * t + 0.25);
                let c_out = t / (t * t + 0.25).sqrt();
                let d = lin2(denoised, c_out, x, c_skip * self.input_scale(i))?;
                if i + 1 < steps {
                    let z = noise()?;
                    lin2(&d, 1.0, &z, s_next)?
                } else {
                    d
                }
            }
        };
        Ok(out)
    }

    fn dpmpp_2m(
        &self,
        i: usize,
        x: &Tensor,
        denoised: &Tensor,
        history: Option<&History>,
    ) -> Result<Tensor> {
        let s = self.plan.sigmas[i];
        let s_next = self.plan.sigmas[i + 1];
        if s_next == 0.0 {
            return Ok(denoised.clone());
        }
        let h = (s / s_next).ln();
        let phi = -(-h).exp_m1();
        let d = match history {
            Some(prev) => {
                let h_last = (self.plan.sigmas[i - 1] / s).ln();
                let r = h_last / h;
                let k = 1.0 / (2.0 * r);
                lin2(denoised, 1.0 + k, &prev.denoised, -k)?
            }
            None => denoised.clone(),
        };
        Ok(lin2(x, s_next / s, &d, phi)?)
    }

    /// UniPC (bh2, predict_x0) in sigma space: the UniC corrector for the sample at `i` (when
    /// step `i - 1` was taken), then the UniP predictor to `i + 1`.
    fn unipc(
        &mut self,
        i: usize,
        x: &Tensor,
        denoised: &Tensor,
        history: Option<History>,
    ) -> Result<Tensor> {
        let sig = &self.plan.sigmas;
        let steps = self.plan.timesteps.len();
        let lambda = |s: f64| -s.ln();

        // Corrector: redo the step i-1 → i with this step's denoised as well.
        let x = match &history {
            Some(prev) => {
                let (s_t, s_0) = (sig[i], sig[i - 1]);
                let h = lambda(s_t) - lambda(s_0);
                let hh = -h;
                let h_phi_1 = hh.exp_m1();
                let b_h = hh.exp_m1();
                let m0 = &prev.denoised;
                let base = lin2(&prev.sample, s_t / s_0, m0, -h_phi_1)?;
                let d1_t = denoised.sub(m0)?;
                match (&prev.older, prev.order) {
                    (Some(m1), 2) => {
                        let rk = (lambda(sig[i - 2]) - lambda(s_0)) / h;
                        let mut h_phi_k = h_phi_1 / hh - 1.0;
                        let b1 = h_phi_k / b_h;
                        h_phi_k = h_phi_k / hh - 0.5;
                        let b2 = h_phi_k * 2.0 / b_h;
                        // Solve [[1, 1], [rk, 1]]·[r0, r1] = [b1, b2].
                        let r0 = (b1 - b2) / (1.0 - rk);
                        let r1 = b1 - r0;
                        let d1 = m1.sub(m0)?.affine(1.0 / rk, 0.0)?;
                        lin3(&base, 1.0, &d1, -b_h * r0, &d1_t, -b_h * r1)?
                    }
                    _ => lin2(&base, 1.0, &d1_t, -b_h * 0.5)?,
                }
            }
            None => x.clone(),
        };

        // Predictor order: 2 with history, 1 on the first step taken and on the last step.
        let order = if history.is_some() && i + 1 < steps {
            2
        } else {
            1
        };
        let (s_0, s_t) = (sig[i], sig[i + 1]);
        let out = if s_t == 0.0 {
            denoised.clone()
        } else {
            let h = lambda(s_t) - lambda(s_0);
            let hh = -h;
            let h_phi_1 = hh.exp_m1();
            let b_h = hh.exp_m1();
            let base = lin2(&x, s_t / s_0, denoised, -h_phi_1)?;
            match (&history, order) {
                (Some(prev), 2) => {
                    let rk = (lambda(sig[i - 1]) - lambda(s_0)) / h;
                    let d1 = prev.denoised.sub(denoised)?.affine(1.0 / rk, 0.0)?;
                    lin2(&base, 1.0, &d1, -b_h * 0.5)?
                }
                _ => base,
            }
        };
        self.history = Some(History {
            index: i,
            denoised: denoised.clone(),
            older: history.map(|h| h.denoised),
            sample: x,
            order,
        });
        Ok(out)
    }
}

/// An Euler step from `s` to `s_next` along the probability-flow ODE:
/// `x + (x − x0)/s · (s_next − s)`.
fn euler(x: &Tensor, denoised: &Tensor, s: f64, s_next: f64) -> candle_core::Result<Tensor> {
    let r = s_next / s;
    lin2(x, r, denoised, 1.0 - r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sigma_and_timestep_are_inverse() {
        let noise = NoiseSchedule::default();
        for t in [0.0, 0.5, 13.25, 500.0, 998.9, 999.0] {
            let back = noise.timestep_for_sigma(noise.sigma_at(t));
            assert!((back - t).abs() < 1e-9, "t {t} came back as {back}");
        }
        let ac = noise.alphas_cumprod();
        let s999 = ((1.0 - ac[999]) / ac[999]).sqrt();
        assert!((noise.sigma_at(999.0) - s999).abs() < 1e-12);
        assert!(
            (s999 - 14.6146).abs() < 1e-3,
            "SD sigma_max is about 14.6146, got {s999}"
        );
        assert!((noise.sigma_at(0.0) - 0.0292).abs() < 1e-4);
    }

    #[test]
    fn every_plan_has_the_right_shape_and_decreases() {
        let noise = NoiseSchedule::default();
        for kind in SamplerKind::ALL {
            for schedule in ScheduleKind::ALL {
                for steps in [1, 2, 7, 25, 50] {
                    let p = plan(kind, schedule, steps, &noise).expect("plan");
                    assert_eq!(p.sigmas.len(), steps + 1);
                    assert_eq!(p.timesteps.len(), steps);
                    assert_eq!(p.sigmas.last().copied(), Some(0.0));
                    assert!(
                        p.sigmas.windows(2).all(|w| w[0] > w[1]),
                        "{kind:?} {schedule:?} {steps}"
                    );
                }
            }
        }
    }

    #[test]
    fn euler_step_to_zero_gives_denoised() -> Result<()> {
        let noise = NoiseSchedule::default();
        let mut s = Sampler::new(SamplerKind::Euler, ScheduleKind::Normal, 1, &noise)?;
        let x = Tensor::new(&[3.0f64, -2.0], &Device::Cpu)?;
        let d = Tensor::new(&[0.5f64, 0.25], &Device::Cpu)?;
        let out = s.step(0, &x, &d, &mut || panic!("Euler must not draw noise"))?;
        assert_eq!(out.to_vec1::<f64>()?, vec![0.5, 0.25]);
        Ok(())
    }
}
