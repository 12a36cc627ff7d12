//! Projection of an image into a tiny random-weight StyleGAN2's latent space (NVIDIA's
//! projector recipe on candle's autograd): the loss falls, the schedule is NVIDIA's, Cancel
//! stops at once, a target of the wrong size is refused, and the VGG16 perceptual (LPIPS) loss
//! works too.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use studio_inference::gan::project::{LossKind, ProjectConfig, project};
use studio_inference::gan::{NoiseMode, StyleGan2};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};
use studio_tests::vgg::write_vgg16;

fn tiny() -> (tempfile::TempDir, StyleGan2) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.safetensors");
    write_stylegan2(&path, TinyStyleGan2::default(), 3, false);
    let gan = StyleGan2::load(&path, &Device::Cpu).expect("load");
    (dir, gan)
}

/// An image the generator itself makes.
fn target(gan: &StyleGan2) -> Tensor {
    let ws = gan
        .map(&gan.z_from_seed(11).expect("z"), None, 0.8, None)
        .expect("map");
    gan.synthesize(&ws, NoiseMode::Const).expect("synthesize")
}

fn config(steps: usize) -> ProjectConfig {
    ProjectConfig {
        steps,
        w_std_samples: 1000,
        preview_every: 10,
        ..ProjectConfig::default()
    }
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn projection_reduces_the_loss() {
    let (_dir, gan) = tiny();
    let target = target(&gan);
    let steps = 80;
    let mut previews = 0;
    let mut seen = Vec::new();
    let t = Instant::now();
    let result = project(&gan, &target, &config(steps), &mut |step, loss, image| {
        seen.push((step, loss));
        if let Some(image) = image {
            assert_eq!(image.dims(), target.dims());
            previews += 1;
        }
        ControlFlow::Continue(())
    })
    .expect("project");
    let elapsed = t.elapsed();
    assert!(!result.cancelled);
    assert_eq!(result.losses.len(), steps);
    assert_eq!(seen.len(), steps);
    assert_eq!(previews, 9, "every 10 steps and the last");
    let fifth = steps / 5;
    let first = mean(&result.losses[..fifth]);
    let last = mean(&result.losses[steps - fifth..]);
    println!(
        "projection: {steps} steps in {elapsed:?}; loss first 20% {first:.4}, last 20% {last:.4}, \
         final {:.4}",
        result.losses[steps - 1]
    );
    assert!(
        last < 0.7 * first,
        "loss did not fall clearly: first {first}, last {last}"
    );

    // The result renders, and renders (close to) the target better than w_avg does.
    let info = gan.info();
    assert_eq!(
        result.ws.dims(),
        &[1, info.num_ws, info.w_dim],
        "ws broadcast to every layer"
    );
    assert_eq!(result.noise.len(), gan.noise_buffers().len());
    let image = gan
        .synthesize_with_noise(&result.ws, &result.noise)
        .expect("render");
    let mse = |a: &Tensor| -> f32 {
        (a - &target)
            .expect("sub")
            .sqr()
            .expect("sqr")
            .mean_all()
            .expect("mean")
            .to_scalar()
            .expect("scalar")
    };
    let start = gan
        .synthesize(&gan.w_avg().expect("w_avg"), NoiseMode::Const)
        .expect("w_avg image");
    assert!(
        mse(&image) < mse(&start),
        "projection {} vs w_avg {}",
        mse(&image),
        mse(&start)
    );
}

#[test]
fn w_plus_projection_also_reduces_the_loss() {
    let (_dir, gan) = tiny();
    let target = target(&gan);
    let cfg = ProjectConfig {
        w_plus: true,
        ..config(60)
    };
    let result = project(
        &gan,
        &target,
        &cfg,
        &mut |_, _, _| ControlFlow::Continue(()),
    )
    .expect("project");
    let first = mean(&result.losses[..12]);
    let last = mean(&result.losses[48..]);
    assert!(last < 0.7 * first, "first {first}, last {last}");
}

#[test]
fn cancel_stops_at_once() {
    let (_dir, gan) = tiny();
    let target = target(&gan);
    let mut calls = 0;
    let result = project(&gan, &target, &config(100), &mut |step, _, _| {
        calls += 1;
        if step == 4 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .expect("project");
    assert_eq!(calls, 5);
    assert_eq!(result.losses.len(), 5);
    assert!(result.cancelled);
}

#[test]
fn wrong_targets_and_missing_losses_are_refused() {
    let (_dir, gan) = tiny();
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).expect("zeros");
    let err = project(&gan, &wrong, &config(10), &mut |_, _, _| {
        ControlFlow::Continue(())
    })
    .expect_err("wrong size");
    assert!(err.to_string().contains("resize"), "{err}");
    let not_square = Tensor::zeros((1, 3, 32, 24), DType::F32, &Device::Cpu).expect("zeros");
    assert!(
        project(&gan, &not_square, &config(10), &mut |_, _, _| {
            ControlFlow::Continue(())
        })
        .is_err()
    );
    // The perceptual loss needs its weights: a missing file and a pickle are refused before
    // any step is taken.
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, needle) in [
        ("vgg16.safetensors", "no such file"),
        ("vgg16-397923af.pth", "no such file"),
    ] {
        let vgg = ProjectConfig {
            loss: LossKind::Perceptual {
                vgg16: dir.path().join(name),
            },
            ..config(10)
        };
        let mut steps = 0;
        let err = project(&gan, &target(&gan), &vgg, &mut |_, _, _| {
            steps += 1;
            ControlFlow::Continue(())
        })
        .expect_err("vgg");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(steps, 0);
    }
}

#[test]
fn perceptual_projection_reduces_the_loss() {
    let (dir, gan) = tiny();
    let vgg16 = dir.path().join("vgg16.safetensors");
    write_vgg16(&vgg16, [8, 16, 16, 32, 32], true, 9);
    let target = target(&gan);
    let steps = 40;
    let cfg = ProjectConfig {
        loss: LossKind::Perceptual { vgg16 },
        ..config(steps)
    };
    let t = Instant::now();
    let result = project(
        &gan,
        &target,
        &cfg,
        &mut |_, _, _| ControlFlow::Continue(()),
    )
    .expect("project");
    let fifth = steps / 5;
    let first = mean(&result.losses[..fifth]);
    let last = mean(&result.losses[steps - fifth..]);
    println!(
        "perceptual projection: {steps} steps in {:?}; LPIPS first 20% {first:.4}, last 20% \
         {last:.4}",
        t.elapsed()
    );
    assert!(result.losses.iter().all(|l| l.is_finite()));
    assert!(
        last < 0.8 * first,
        "loss did not fall clearly: first {first}, last {last}"
    );
}

#[test]
fn schedule_is_nvidias() {
    let c = ProjectConfig::default();
    assert!(c.learning_rate(0).abs() < 1e-12, "starts at 0");
    assert!(
        (c.learning_rate(25) - 0.05).abs() < 1e-9,
        "half way up the ramp"
    );
    assert!(
        (c.learning_rate(500) - 0.1).abs() < 1e-12,
        "flat in the middle"
    );
    // Cosine ramp-down over the last 25%: at t = 0.875 the ramp is ½.
    assert!((c.learning_rate(875) - 0.05).abs() < 1e-9);
    assert!(c.learning_rate(999) < 1e-5);
    assert!((c.w_noise_factor(0) - 0.05).abs() < 1e-12);
    assert!((c.w_noise_factor(375) - 0.05 * 0.25).abs() < 1e-12);
    assert!(c.w_noise_factor(750).abs() < 1e-12);
}
