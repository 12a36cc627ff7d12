//! GANSpace-style PCA directions in W on a tiny random-weight StyleGAN2 (written by the test
//! in NVIDIA's naming and loaded through the real loader), and on synthetic data large enough
//! to take the subspace-iteration path.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use studio_inference::gan::StyleGan2;
use studio_inference::gan::directions::{
    DirectionEdit, Directions, DirectionsPreset, PcaConfig, apply,
};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

fn tiny() -> (tempfile::TempDir, StyleGan2) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.safetensors");
    write_stylegan2(&path, TinyStyleGan2::default(), 3, false);
    let gan = StyleGan2::load(&path, &Device::Cpu).expect("load");
    (dir, gan)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Orthonormal components, σ and explained variance non-increasing, ratios summing to ≤ 1,
/// and the data's own projections having the stated σ.
fn check_pca(d: &Directions, data: &[f32], n: usize, dim: usize) {
    let k = d.len();
    assert_eq!(d.mean.len(), dim);
    assert_eq!(d.stddev.len(), k);
    assert_eq!(d.explained_variance_ratio.len(), k);
    for i in 0..k {
        assert_eq!(d.components[i].len(), dim);
        for j in 0..k {
            let expect = if i == j { 1.0 } else { 0.0 };
            let got = dot(&d.components[i], &d.components[j]);
            assert!((got - expect).abs() < 1e-4, "<c{i}, c{j}> = {got}");
        }
        // Sign convention: the largest-magnitude entry is positive.
        let big = d.components[i]
            .iter()
            .copied()
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
            .expect("entry");
        assert!(big > 0.0, "component {i} has a negative largest entry");
    }
    for i in 1..k {
        assert!(
            d.stddev[i] <= d.stddev[i - 1] * (1.0 + 1e-5),
            "σ increases at {i}: {:?}",
            d.stddev
        );
        assert!(
            d.explained_variance_ratio[i] <= d.explained_variance_ratio[i - 1] * (1.0 + 1e-5),
            "explained variance increases at {i}: {:?}",
            d.explained_variance_ratio
        );
    }
    let total: f32 = d.explained_variance_ratio.iter().sum();
    assert!(total <= 1.0 + 1e-5 && total > 0.0, "ratios sum to {total}");
    // Projections of the centered data on each component have standard deviation σ.
    for i in 0..k {
        let projections: Vec<f64> = (0..n)
            .map(|s| {
                data[s * dim..(s + 1) * dim]
                    .iter()
                    .zip(&d.mean)
                    .zip(&d.components[i])
                    .map(|((x, m), c)| f64::from(x - m) * f64::from(*c))
                    .sum()
            })
            .collect();
        let mean = projections.iter().sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-3 * f64::from(d.stddev[0]), "mean {mean}");
        let var = projections.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let sd = var.sqrt();
        let stated = f64::from(d.stddev[i]);
        assert!(
            (sd - stated).abs() <= 1e-3 * stated + 1e-6,
            "component {i}: projections have σ {sd}, stated {stated}"
        );
    }
}

/// The W samples exactly as `Directions::compute` draws them (one w per latent).
fn sampled_ws(gan: &StyleGan2, n: usize, seed: u32) -> Vec<f32> {
    let z_dim = gan.info().z_dim;
    let z: Vec<f32> = studio_inference::gan::NumpyRandomState::new(seed)
        .randn(n * z_dim)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let z = Tensor::from_vec(z, (n, z_dim), &Device::Cpu).expect("z");
    gan.map(&z, None, 1.0, None)
        .expect("map")
        .narrow(1, 0, 1)
        .expect("narrow")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
}

#[test]
fn pca_of_the_tiny_generator_is_orthonormal_and_ordered() {
    let (_dir, gan) = tiny();
    let config = PcaConfig {
        samples: 2000,
        components: 8,
        seed: 7,
    };
    let d = Directions::compute(&gan, &config).expect("pca");
    assert_eq!(d.len(), 8);
    assert_eq!(d.w_dim, gan.info().w_dim);
    let data = sampled_ws(&gan, 2000, 7);
    check_pca(&d, &data, 2000, gan.info().w_dim);

    // All components of a 16-dim W explain all the variance.
    let all = Directions::compute(
        &gan,
        &PcaConfig {
            components: 16,
            ..config
        },
    )
    .expect("pca all");
    let total: f32 = all.explained_variance_ratio.iter().sum();
    assert!((total - 1.0).abs() < 1e-4, "total {total}");

    // Deterministic for the same seed, different for another.
    let again = Directions::compute(&gan, &config).expect("again");
    assert_eq!(d, again);
    let other = Directions::compute(&gan, &PcaConfig { seed: 8, ..config }).expect("other");
    assert_ne!(d.mean, other.mean);
}

#[test]
fn apply_moves_only_the_chosen_rows_by_sigma_units() {
    let (_dir, gan) = tiny();
    let d = Directions::compute(
        &gan,
        &PcaConfig {
            samples: 500,
            components: 4,
            seed: 1,
        },
    )
    .expect("pca");
    let ws = gan
        .map(&gan.z_from_seed(5).expect("z"), None, 1.0, None)
        .expect("map");
    let num_ws = gan.info().num_ws;
    let w_dim = gan.info().w_dim;

    let same = apply(&ws, &d, &[(0, 0.0, 0..num_ws), (2, 0.0, 1..3)]).expect("apply 0");
    let diff = (&same - &ws)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(
        diff.abs() <= f32::EPSILON * 0.0,
        "amount 0 must be the identity: {diff}"
    );

    let edited = apply(&ws, &d, &[(1, 2.0, 2..5)]).expect("apply");
    let before: Vec<Vec<f32>> = ws.get(0).expect("row").to_vec2().expect("vec");
    let after: Vec<Vec<f32>> = edited.get(0).expect("row").to_vec2().expect("vec");
    for row in 0..num_ws {
        let delta: Vec<f32> = (0..w_dim).map(|j| after[row][j] - before[row][j]).collect();
        if (2..5).contains(&row) {
            for (j, (got, c)) in delta.iter().zip(&d.components[1]).enumerate() {
                let expect = 2.0 * d.stddev[1] * c;
                assert!((got - expect).abs() < 1e-5, "row {row} col {j}");
            }
        } else {
            assert!(
                delta.iter().all(|v| v.abs() <= 0.0),
                "row {row} was touched"
            );
        }
    }

    // Bad edits are errors, not panics.
    assert!(apply(&ws, &d, &[(4, 1.0, 0..1)]).is_err());
    assert!(apply(&ws, &d, &[(0, 1.0, 0..num_ws + 1)]).is_err());
}

#[test]
fn presets_round_trip_through_json() {
    let (dir, gan) = tiny();
    let d = Directions::compute(
        &gan,
        &PcaConfig {
            samples: 300,
            components: 3,
            seed: 2,
        },
    )
    .expect("pca");
    let preset = DirectionsPreset {
        directions: d.clone(),
        edits: vec![DirectionEdit {
            component: 1,
            sigma: -1.5,
            layers: 0..4,
        }],
    };
    let path = dir.path().join("preset.json");
    preset.save_json(&path).expect("save");
    let back = DirectionsPreset::load_json(&path).expect("load");
    assert_eq!(back, preset);
    assert_eq!(back.edit_tuples(), vec![(1, -1.5, 0..4)]);

    let dpath = dir.path().join("dirs.json");
    d.save_json(&dpath).expect("save dirs");
    assert_eq!(Directions::load_json(&dpath).expect("load dirs"), d);

    std::fs::write(&dpath, "{ not json").expect("write");
    assert!(Directions::load_json(&dpath).is_err());
}

/// Anisotropic data with a decaying spectrum in 200 dimensions (the subspace-iteration path).
#[test]
fn pca_of_wide_data_uses_subspace_iteration_correctly() {
    let (n, dim, k) = (1500, 200, 6);
    let mut rng = StdRng::seed_from_u64(11);
    let data: Vec<f32> = (0..n * dim)
        .map(|i| {
            let j = i % dim;
            let u1 = rng.random::<f32>().max(1e-7);
            let u2 = rng.random::<f32>();
            let g = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            g * 3.0 / (1.0 + j as f32).powf(0.8) + 0.1 * j as f32
        })
        .collect();
    let d = Directions::from_samples(&data, n, dim, k).expect("pca");
    check_pca(&d, &data, n, dim);
    // The leading direction is (close to) the first axis.
    assert!(d.components[0][0] > 0.95, "{}", d.components[0][0]);
    assert!(Directions::from_samples(&data, n, dim, dim + 1).is_err());
    assert!(Directions::from_samples(&data[..dim], 1, dim, 2).is_err());
}

/// Timing at a real network's size (run with `--ignored --nocapture` in release).
#[test]
#[ignore = "timing only"]
fn pca_timing_at_w_dim_512() {
    let (n, dim, k) = (10_000, 512, 80);
    let mut rng = StdRng::seed_from_u64(5);
    let data: Vec<f32> = (0..n * dim)
        .map(|i| {
            let j = i % dim;
            let u1 = rng.random::<f32>().max(1e-7);
            let u2 = rng.random::<f32>();
            let g = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            g / (1.0 + j as f32).powf(0.5)
        })
        .collect();
    let t = Instant::now();
    let d = Directions::from_samples(&data, n, dim, k).expect("pca");
    println!("PCA N={n} dim={dim} k={k}: {:?}", t.elapsed());
    check_pca(&d, &data, n, dim);
}
