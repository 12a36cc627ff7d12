//! Stable Diffusion samplers against diffusers.
//!
//! `tests/fixtures/samplers/diffusers.json` is made by `tools/make_sampler_fixture.py` (run by
//! hand with torch + diffusers; CI never runs Python). It holds diffusers' timestep / sigma
//! tables and short denoising trajectories with an analytic "model" that is defined again
//! here ([`model`]).

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;
use studio_inference::diffusion::samplers::*;
use studio_inference::error::Error;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/samplers/diffusers.json");
    let text = std::fs::read_to_string(&path).expect("read the sampler fixture");
    serde_json::from_str(&text).expect("parse the sampler fixture")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// "euler_a/karras/20" → (kind, schedule, steps).
fn parse_key(key: &str) -> (SamplerKind, ScheduleKind, usize) {
    let parts: Vec<&str> = key.split('/').collect();
    assert_eq!(parts.len(), 3, "bad fixture key {key}");
    let kind = match parts[0] {
        "euler" => SamplerKind::Euler,
        "euler_a" => SamplerKind::EulerAncestral,
        "ddim" => SamplerKind::Ddim,
        "dpmpp_2m" => SamplerKind::DpmPp2M,
        "unipc" => SamplerKind::UniPc,
        "lcm" => SamplerKind::Lcm,
        other => panic!("unknown sampler {other} in the fixture"),
    };
    let schedule = ScheduleKind::parse(parts[1]).expect("schedule name");
    let steps = parts[2].parse().expect("step count");
    (kind, schedule, steps)
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64], rel: f64, abs: f64) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length {ours:?} vs {theirs:?}"
    );
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let tol = abs.max(rel * b.abs());
        assert!(
            (a - b).abs() <= tol,
            "{what}[{i}]: ours {a}, diffusers {b} (diff {:e}, tolerance {tol:e})\nours {ours:?}\ndiffusers {theirs:?}",
            (a - b).abs()
        );
    }
}

/// The fixture's analytic model: `0.8·tanh(1.5·u_j) + 0.2·sin(0.37·j + 0.004·t)`.
fn model(u: &[f64], t: f64) -> Vec<f64> {
    u.iter()
        .enumerate()
        .map(|(j, &u)| 0.8 * (1.5 * u).tanh() + 0.2 * (0.37 * j as f64 + 0.004 * t).sin())
        .collect()
}

fn tensor(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).expect("tensor")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f64>().expect("values")
}

#[test]
fn plans_match_diffusers_tables() {
    let fx = fixture();
    let noise = NoiseSchedule::default();
    let tables = fx["tables"].as_object().expect("tables");
    assert!(tables.len() >= 30, "the fixture lost its tables");
    for (key, table) in tables {
        let (kind, schedule, steps) = parse_key(key);
        let timesteps = floats(&table["timesteps"]);
        // Euler's tables are k-diffusion's, shared by Euler a and DPM++ 2M.
        let kinds: &[SamplerKind] = if kind == SamplerKind::Euler {
            &[
                SamplerKind::Euler,
                SamplerKind::EulerAncestral,
                SamplerKind::DpmPp2M,
            ]
        } else {
            &[kind]
        };
        for &k in kinds {
            let p = plan(k, schedule, steps, &noise).expect("plan");
            let what = format!("{key} as {k:?}");
            match (kind, schedule) {
                // diffusers rounds DPM-Solver's Karras timesteps; Studio keeps k-diffusion's
                // fractional ones, which must round to the same integers (within half a step).
                (SamplerKind::DpmPp2M, ScheduleKind::Karras) => {
                    assert_close(
                        &format!("{what} timesteps"),
                        &p.timesteps,
                        &timesteps,
                        0.0,
                        0.5 + 2e-3,
                    );
                }
                // diffusers truncates UniPC's Exponential timesteps (int64 cast); Studio rounds.
                (SamplerKind::UniPc, ScheduleKind::Exponential) => {
                    assert!(
                        p.timesteps.iter().all(|t| t.fract() == 0.0),
                        "{what}: {:?}",
                        p.timesteps
                    );
                    assert_close(
                        &format!("{what} timesteps"),
                        &p.timesteps,
                        &timesteps,
                        0.0,
                        1.0,
                    );
                }
                // Integer tables must match exactly.
                (SamplerKind::Ddim | SamplerKind::Lcm, _)
                | (SamplerKind::UniPc, ScheduleKind::Normal | ScheduleKind::Karras) => {
                    assert_eq!(p.timesteps, timesteps, "{what} timesteps");
                }
                _ => assert_close(
                    &format!("{what} timesteps"),
                    &p.timesteps,
                    &timesteps,
                    0.0,
                    2e-3,
                ),
            }
            if let Some(sigmas) = table.get("sigmas") {
                assert_close(
                    &format!("{what} sigmas"),
                    &p.sigmas,
                    &floats(sigmas),
                    1e-4,
                    1e-7,
                );
            } else {
                // DDIM and LCM have no sigma table: each sigma is the training sigma at the
                // (integer) timestep, then 0.
                let ac = noise.alphas_cumprod();
                let mut expected: Vec<f64> = timesteps
                    .iter()
                    .map(|&t| {
                        let a = ac[t as usize];
                        ((1.0 - a) / a).sqrt()
                    })
                    .collect();
                expected.push(0.0);
                assert_close(&format!("{what} sigmas"), &p.sigmas, &expected, 1e-9, 0.0);
            }
        }
    }
}

#[test]
fn named_tables_people_know() {
    let noise = NoiseSchedule::default();
    let ddim = plan(SamplerKind::Ddim, ScheduleKind::Normal, 20, &noise).expect("plan");
    let expected: Vec<f64> = (0..20).rev().map(|k| f64::from(k * 50 + 1)).collect();
    assert_eq!(ddim.timesteps, expected);
    let lcm = plan(SamplerKind::Lcm, ScheduleKind::Normal, 4, &noise).expect("plan");
    assert_eq!(lcm.timesteps, vec![999.0, 759.0, 499.0, 259.0]);
    // DDIM and LCM ignore the schedule type.
    for schedule in ScheduleKind::ALL {
        assert_eq!(
            plan(SamplerKind::Lcm, schedule, 4, &noise).expect("plan"),
            lcm
        );
    }
    // One Normal step is k-diffusion's (from sigma_max), not diffusers' Euler (t = 0).
    let one = plan(SamplerKind::Euler, ScheduleKind::Normal, 1, &noise).expect("plan");
    assert_eq!(one.timesteps, vec![999.0]);
    assert!((one.sigmas[0] - noise.sigma_at(999.0)).abs() < 1e-12);
    assert!((one.sigmas[0] - 14.6146).abs() < 1e-3);
    // Karras with one step starts from sigma_max too, and its timesteps are fractional.
    let karras = plan(SamplerKind::Euler, ScheduleKind::Karras, 10, &noise).expect("plan");
    assert!((karras.timesteps[0] - 999.0).abs() < 1e-9);
    assert!(karras.timesteps[1..].iter().any(|t| t.fract() != 0.0));
}

#[test]
fn trajectories_match_diffusers() {
    let fx = fixture();
    let trajectories = fx["trajectories"].as_array().expect("trajectories");
    assert!(
        trajectories.len() >= 25,
        "the fixture lost its trajectories"
    );
    for tr in trajectories {
        let name = tr["name"].as_str().expect("name");
        let prediction = match tr["prediction"].as_str().expect("prediction") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => panic!("unknown prediction {other}"),
        };
        let start = tr["start"].as_u64().expect("start") as usize;
        let what = format!("{name} ({prediction:?}, from step {start})");
        let (kind, schedule, steps) = parse_key(name);
        let noise_schedule = NoiseSchedule {
            prediction,
            ..NoiseSchedule::default()
        };
        let mut sampler = Sampler::new(kind, schedule, steps, &noise_schedule).expect("sampler");
        assert_eq!(sampler.steps(), steps);
        let model_t = floats(&tr["model_t"]);
        let mut feed: Vec<Vec<f64>> = tr
            .get("noise")
            .map(|n| n.as_array().expect("noise").iter().map(floats).collect())
            .unwrap_or_default();
        feed.reverse();
        let mut x = tensor(&floats(&tr["x_init"]));
        for i in start..steps {
            let t = sampler.timestep(i);
            let expected_t = model_t[i - start];
            let tol = if kind == SamplerKind::UniPc
                || kind == SamplerKind::Ddim
                || kind == SamplerKind::Lcm
            {
                0.0
            } else {
                2e-3
            };
            assert!(
                (t - expected_t).abs() <= tol,
                "{what}: timestep {i} is {t}, diffusers {expected_t}"
            );
            let sigma = sampler.sigma(i);
            let u: Vec<f64> = values(&x)
                .iter()
                .map(|v| v * sampler.input_scale(i))
                .collect();
            let out = tensor(&model(&u, t));
            let denoised = denoised_from_output(&x, &out, sigma, prediction).expect("denoised");
            let mut noise = || {
                let z = feed
                    .pop()
                    .unwrap_or_else(|| panic!("{what}: step {i} drew more noise than diffusers"));
                Tensor::new(z.as_slice(), &Device::Cpu)
            };
            x = sampler.step(i, &x, &denoised, &mut noise).expect("step");
        }
        assert!(
            feed.is_empty(),
            "{what}: {} noise draws left unused",
            feed.len()
        );
        assert_close(
            &format!("{what} final"),
            &values(&x),
            &floats(&tr["final"]),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn names_round_trip() {
    for kind in SamplerKind::ALL {
        assert_eq!(
            SamplerKind::parse(kind.name()),
            Some((kind, None)),
            "{kind:?}"
        );
        assert_eq!(
            SamplerKind::parse(&kind.name().to_uppercase()),
            Some((kind, None))
        );
        assert_eq!(
            SamplerKind::parse(&kind.name().to_lowercase()),
            Some((kind, None))
        );
        for schedule in ScheduleKind::ALL {
            let combined = format!("{} {}", kind.name(), schedule.name());
            assert_eq!(
                SamplerKind::parse(&combined),
                Some((kind, Some(schedule))),
                "{combined}"
            );
        }
        let json = serde_json::to_string(&kind).expect("serialize");
        assert_eq!(
            serde_json::from_str::<SamplerKind>(&json).expect("deserialize"),
            kind
        );
    }
    assert_eq!(
        SamplerKind::parse("DPM++ 2M Karras"),
        Some((SamplerKind::DpmPp2M, Some(ScheduleKind::Karras)))
    );
    assert_eq!(
        SamplerKind::parse("Euler a"),
        Some((SamplerKind::EulerAncestral, None))
    );
    assert_eq!(
        SamplerKind::parse("  euler A "),
        Some((SamplerKind::EulerAncestral, None))
    );
    assert_eq!(
        SamplerKind::parse("k_euler_a"),
        Some((SamplerKind::EulerAncestral, None))
    );
    assert_eq!(
        SamplerKind::parse("Euler"),
        Some((SamplerKind::Euler, None))
    );
    assert_eq!(SamplerKind::parse("Heun"), None);
    assert_eq!(SamplerKind::parse("DPM++ 2M SDE Karras"), None);
    assert_eq!(SamplerKind::parse("Karras"), None);
    assert_eq!(SamplerKind::parse(""), None);

    for schedule in ScheduleKind::ALL {
        assert_eq!(ScheduleKind::parse(schedule.name()), Some(schedule));
        assert_eq!(
            ScheduleKind::parse(&schedule.name().to_uppercase()),
            Some(schedule)
        );
    }
    assert_eq!(ScheduleKind::parse("Automatic"), None);

    let ancestral: Vec<SamplerKind> = SamplerKind::ALL
        .into_iter()
        .filter(|k| k.is_ancestral())
        .collect();
    assert_eq!(
        ancestral,
        vec![SamplerKind::EulerAncestral, SamplerKind::Lcm]
    );
}

#[test]
fn step_counts_are_checked() {
    let noise = NoiseSchedule::default();
    for kind in SamplerKind::ALL {
        for steps in [0, 1001] {
            match Sampler::new(kind, ScheduleKind::Normal, steps, &noise) {
                Err(Error::InvalidParameter(msg)) => assert!(msg.contains("steps"), "{msg}"),
                other => panic!("{kind:?} with {steps} steps: {other:?}"),
            }
        }
        assert!(Sampler::new(kind, ScheduleKind::Karras, 1, &noise).is_ok());
    }
    assert!(plan(SamplerKind::Euler, ScheduleKind::Normal, 1000, &noise).is_ok());
    assert!(plan(SamplerKind::Lcm, ScheduleKind::Normal, 50, &noise).is_ok());
    assert!(matches!(
        plan(SamplerKind::Lcm, ScheduleKind::Normal, 51, &noise),
        Err(Error::InvalidParameter(_))
    ));

    let mut sampler =
        Sampler::new(SamplerKind::Euler, ScheduleKind::Normal, 4, &noise).expect("sampler");
    let x = tensor(&[1.0, 2.0]);
    let result = sampler.step(4, &x, &x, &mut || {
        Tensor::zeros(2, candle_core::DType::F64, &Device::Cpu)
    });
    assert!(
        matches!(result, Err(Error::InvalidParameter(_))),
        "{result:?}"
    );
}

/// With zero noise Euler a is *not* Euler: it steps to sigma_down < sigma_next. Only a step
/// that ends at sigma 0 is the same.
#[test]
fn euler_a_without_noise_is_euler_to_sigma_down() {
    let noise = NoiseSchedule::default();
    let x = tensor(&[3.0, -1.5, 0.25]);
    let denoised = tensor(&[0.5, -0.2, 0.1]);
    let mut zeros = || Tensor::zeros(3, candle_core::DType::F64, &Device::Cpu);

    let mut euler =
        Sampler::new(SamplerKind::Euler, ScheduleKind::Normal, 4, &noise).expect("sampler");
    let mut ancestral = Sampler::new(SamplerKind::EulerAncestral, ScheduleKind::Normal, 4, &noise)
        .expect("sampler");
    let e = values(&euler.step(0, &x, &denoised, &mut zeros).expect("step"));
    let a = values(&ancestral.step(0, &x, &denoised, &mut zeros).expect("step"));
    assert!(
        e.iter().zip(&a).any(|(e, a)| (e - a).abs() > 1e-3),
        "Euler a matched Euler: {a:?}"
    );

    let (s, s_next) = (ancestral.sigma(0), ancestral.sigma(1));
    let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
    let down = (s_next * s_next - up * up).sqrt();
    assert!(down < s_next);
    let expected: Vec<f64> = values(&x)
        .iter()
        .zip(values(&denoised))
        .map(|(x, d)| x + (x - d) / s * (down - s))
        .collect();
    assert_close("Euler a, zero noise", &a, &expected, 1e-12, 1e-12);

    // The last step goes to sigma 0: both give the denoised sample, and no noise is drawn.
    let mut no_noise = || -> candle_core::Result<Tensor> { panic!("noise drawn on the last step") };
    let e = values(&euler.step(3, &x, &denoised, &mut no_noise).expect("step"));
    let a = values(
        &ancestral
            .step(3, &x, &denoised, &mut no_noise)
            .expect("step"),
    );
    assert_close("last step", &a, &e, 0.0, 1e-12);
    assert_close("last step", &a, &values(&denoised), 0.0, 1e-12);
}

#[test]
fn deterministic_samplers_never_draw_noise() {
    let noise = NoiseSchedule::default();
    for kind in SamplerKind::ALL.into_iter().filter(|k| !k.is_ancestral()) {
        let mut sampler = Sampler::new(kind, ScheduleKind::Karras, 6, &noise).expect("sampler");
        let mut x = tensor(&[4.0, -3.0, 1.0, 0.5]);
        for i in 0..sampler.steps() {
            let u: Vec<f64> = values(&x)
                .iter()
                .map(|v| v * sampler.input_scale(i))
                .collect();
            let out = tensor(&model(&u, sampler.timestep(i)));
            let d = denoised_from_output(&x, &out, sampler.sigma(i), Prediction::Epsilon)
                .expect("denoised");
            x = sampler
                .step(i, &x, &d, &mut || panic!("{kind:?} drew noise"))
                .expect("step");
        }
        assert!(values(&x).iter().all(|v| v.is_finite()), "{kind:?}");
    }
}

/// img2img starts mid-plan: multistep history must not leak in from a step that was not the
/// previous one, and must be used when it was.
#[test]
fn multistep_history_only_from_the_previous_step() {
    let noise = NoiseSchedule::default();
    for kind in [SamplerKind::DpmPp2M, SamplerKind::UniPc] {
        let x = tensor(&[1.0, -0.5, 0.3]);
        let d = tensor(&[0.2, -0.1, 0.05]);
        let other = tensor(&[-0.7, 0.4, 0.9]);
        let mut never = || -> candle_core::Result<Tensor> { panic!("noise") };

        let mut fresh = Sampler::new(kind, ScheduleKind::Normal, 20, &noise).expect("sampler");
        assert_eq!(fresh.img2img_start(0.6), 8);
        let first = values(&fresh.step(8, &x, &d, &mut never).expect("step"));

        // A previous call for step 6 (not 7) must be ignored at step 8.
        let mut skipped = Sampler::new(kind, ScheduleKind::Normal, 20, &noise).expect("sampler");
        skipped.step(6, &x, &other, &mut never).expect("step");
        let after_gap = values(&skipped.step(8, &x, &d, &mut never).expect("step"));
        assert_close(
            &format!("{kind:?} after a gap"),
            &after_gap,
            &first,
            0.0,
            1e-12,
        );

        // A call for step 7 is history and changes the result.
        let mut chained = Sampler::new(kind, ScheduleKind::Normal, 20, &noise).expect("sampler");
        chained.step(7, &x, &other, &mut never).expect("step");
        let with_history = values(&chained.step(8, &x, &d, &mut never).expect("step"));
        assert!(
            with_history
                .iter()
                .zip(&first)
                .any(|(a, b)| (a - b).abs() > 1e-6),
            "{kind:?}: history from step 7 was ignored"
        );

        // reset() forgets it.
        chained.reset();
        let reset = values(&chained.step(9, &x, &d, &mut never).expect("step"));
        let mut fresh9 = Sampler::new(kind, ScheduleKind::Normal, 20, &noise).expect("sampler");
        let expected = values(&fresh9.step(9, &x, &d, &mut never).expect("step"));
        assert_close(
            &format!("{kind:?} after reset"),
            &reset,
            &expected,
            0.0,
            1e-12,
        );
    }
}

#[test]
fn denoised_from_output_formulas() {
    let x = tensor(&[2.0, -1.0]);
    let out = tensor(&[0.5, 0.25]);
    let sigma = 3.0;
    let eps = values(&denoised_from_output(&x, &out, sigma, Prediction::Epsilon).expect("eps"));
    assert_close("eps", &eps, &[2.0 - 1.5, -1.0 - 0.75], 0.0, 1e-12);
    let v = values(&denoised_from_output(&x, &out, sigma, Prediction::VPrediction).expect("v"));
    let k = 10f64.sqrt();
    assert_close(
        "v",
        &v,
        &[2.0 / 10.0 - 0.5 * 3.0 / k, -1.0 / 10.0 - 0.25 * 3.0 / k],
        0.0,
        1e-12,
    );
}
