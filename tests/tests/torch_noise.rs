//! Studio's PyTorch CPU noise against `torch.randn` values: `tests/fixtures/torch_noise/randn.json`
//! is made by `tools/make_torch_noise_fixture.py` (PyTorch on the CPU; CI reads only the JSON).
//!
//! The scalar path (fewer than 16 values) is bit-exact. The 16-value blocks match to within two
//! units in the last place: PyTorch's vectorised `log`/`sin`/`cos` round a little differently
//! from the C library's, so most values are equal and the rest one or two ULPs apart.

use std::path::Path;

use studio_inference::diffusion::noise::{NoiseSource, NoiseStream, slerp_variation};

fn fixture() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch_noise/randn.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Values equal to within `ulps` units in the last place; returns how many were bit-equal.
#[track_caller]
fn assert_close(ours: &[f32], torch: &[f32], ulps: u32, what: &str) -> usize {
    assert_eq!(ours.len(), torch.len(), "{what}");
    let mut equal = 0;
    for (i, (a, b)) in ours.iter().zip(torch).enumerate() {
        let ulp = f32::EPSILON * b.abs().max(f32::MIN_POSITIVE);
        let diff = (a - b).abs();
        assert!(
            diff <= ulp * ulps as f32 || diff < 1e-7,
            "{what}: value {i} is {a}, torch has {b}"
        );
        equal += usize::from(a.to_bits() == b.to_bits());
    }
    equal
}

#[test]
fn torch_cpu_noise_gives_torch_randn_values() {
    let fixture = fixture();
    let (mut equal, mut total) = (0, 0);
    for case in fixture["randn"].as_array().expect("cases") {
        let seed = case["seed"].as_u64().expect("seed");
        let n: usize = case["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .product();
        let mut stream = NoiseStream::new(NoiseSource::TorchCpu, seed);
        for key in ["first", "second"] {
            let torch = floats(&case[key]);
            let ours = stream.draw(n);
            let what = format!("seed {seed}, {n} values, {key} draw");
            if n < 16 {
                assert_eq!(ours, torch, "{what}: the scalar path is exact");
            }
            equal += assert_close(&ours, &torch, 2, &what);
            total += n;
        }
    }
    // Most values are bit-equal, not merely close.
    assert!(equal * 10 >= total * 8, "{equal} of {total} bit-equal");
}

#[test]
fn variation_seeds_blend_as_the_sd_web_ui_does() {
    let fixture = fixture();
    for case in fixture["variations"].as_array().expect("cases") {
        let (seed, subseed) = (
            case["seed"].as_u64().expect("seed"),
            case["subseed"].as_u64().expect("subseed"),
        );
        let strength = case["strength"].as_f64().expect("strength");
        let low = NoiseStream::new(NoiseSource::TorchCpu, seed).draw(256);
        let high = NoiseStream::new(NoiseSource::TorchCpu, subseed).draw(256);
        let ours = slerp_variation(strength, &low, &high, (4, 8, 8));
        let torch = floats(&case["values"]);
        for (i, (a, b)) in ours.iter().zip(&torch).enumerate() {
            assert!(
                (a - b).abs() < 2e-5,
                "seed {seed} → {subseed} at {strength}: value {i} is {a}, torch has {b}"
            );
        }
    }
}
