//! The VGG16 perceptual (LPIPS) distance: parity with PyTorch on `tests/fixtures/lpips`
//! (made by `tools/make_lpips_fixture.py`: a narrow random VGG16 with torchvision's layer
//! indices and random LPIPS linear layers, the `lpips` package's formula computed in float64),
//! zero for identical images, growing with the difference, uniform channel weights without
//! the linear layers, down-sampling of large images, gradients, and load errors that name the
//! tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use studio_inference::Error;
use studio_inference::gan::perceptual::{Vgg16Lpips, area_resize};
use studio_inference::nn::with_kernels;
use studio_inference::quant::KernelPath;
use studio_tests::vgg::{vgg16_tensors, write_vgg16};

const WIDTHS: [usize; 5] = [4, 8, 8, 16, 16];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lpips")
}

fn fixture_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("vgg16_tiny.safetensors"), &Device::Cpu)
        .expect("vgg16_tiny.safetensors")
}

fn case() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("case.safetensors"), &Device::Cpu)
        .expect("case.safetensors")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .expect("f64")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .expect("f64")
        .sum_all()
        .expect("sum")
        .to_scalar()
        .expect("scalar")
}

fn random_image(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("image")
}

fn tiny(dir: &Path, lpips: bool) -> Vgg16Lpips {
    let path = dir.join("vgg.safetensors");
    write_vgg16(&path, WIDTHS, lpips, 5);
    Vgg16Lpips::load(&path, &Device::Cpu).expect("load")
}

fn load_err(tensors: &HashMap<String, Tensor>) -> Error {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vgg.safetensors");
    candle_core::safetensors::save(tensors, &path).expect("save");
    Vgg16Lpips::load(&path, &Device::Cpu).expect_err("must fail")
}

/// `|got − want| ≤ 1e-5 · |want| + abs`.
fn assert_close(got: &[f64], want: &[f64], abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs() + abs,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

/// The kernel sets a test runs on: candle's ops, then each of Studio's paths this CPU has.
fn kernel_sets() -> impl Iterator<Item = Option<KernelPath>> {
    std::iter::once(None).chain(KernelPath::available_paths().into_iter().map(Some))
}

#[test]
fn matches_pytorch_lpips_with_linear_layers() {
    for kernels in kernel_sets() {
        println!("kernels: {kernels:?}");
        matches_pytorch_on(kernels);
    }
}

fn matches_pytorch_on(kernels: Option<KernelPath>) {
    let vgg = with_kernels(kernels, || {
        Vgg16Lpips::load(&fixture_dir().join("vgg16_tiny.safetensors"), &Device::Cpu)
    })
    .expect("load");
    assert!(vgg.has_lpips_weights());
    assert_eq!(vgg.widths(), [4, 8, 16, 16, 16]);
    let case = case();
    let (a, b) = (&case["a"], &case["b"]);
    let d = values(&vgg.distance(a, b).expect("distance"));
    let want = values(&case["distance"]);
    assert_close(&d, &want, 0.0, "distance");
    let layers = vgg.layer_distances(a, b).expect("layers");
    let want_layers = case["layers"].to_dtype(DType::F64).expect("f64");
    for (k, layer) in layers.iter().enumerate() {
        let want = values(&want_layers.get(k).expect("row"));
        assert_close(&values(layer), &want, 1e-9, &format!("layer {k}"));
    }
    let worst = d
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0.0f64, f64::max);
    println!("LPIPS parity: ours {d:?}, PyTorch {want:?}, worst relative error {worst:.2e}");

    // The precomputed-target path gives the same numbers.
    let target = vgg.target(a).expect("target");
    assert_close(
        &values(&vgg.distance_to(&target, b).expect("distance_to")),
        &want,
        0.0,
        "distance_to",
    );
}

#[test]
fn without_linear_layers_every_channel_weighs_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weights = fixture_weights();
    weights.retain(|name, _| !name.starts_with("lin"));
    let path = dir.path().join("plain.safetensors");
    candle_core::safetensors::save(&weights, &path).expect("save");
    let vgg = Vgg16Lpips::load(&path, &Device::Cpu).expect("load");
    assert!(!vgg.has_lpips_weights());
    let case = case();
    let d = values(&vgg.distance(&case["a"], &case["b"]).expect("distance"));
    let want = values(&case["distance_uniform"]);
    assert_close(&d, &want, 0.0, "uniform distance");
    println!("LPIPS parity without linear layers: ours {d:?}, PyTorch {want:?}");

    // Linear layers of all ones are the same thing.
    for (k, width) in [4, 8, 16, 16, 16].into_iter().enumerate() {
        weights.insert(
            format!("lin{k}.model.1.weight"),
            Tensor::ones((1, width, 1, 1), DType::F32, &Device::Cpu).expect("ones"),
        );
    }
    let ones = dir.path().join("ones.safetensors");
    candle_core::safetensors::save(&weights, &ones).expect("save");
    let vgg = Vgg16Lpips::load(&ones, &Device::Cpu).expect("load");
    assert!(vgg.has_lpips_weights());
    let d1 = values(&vgg.distance(&case["a"], &case["b"]).expect("distance"));
    assert_close(&d1, &d, 1e-12, "all-ones linear layers");
}

#[test]
fn identical_images_are_at_zero_and_distance_grows_with_the_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vgg = tiny(dir.path(), true);
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_image(&mut rng, &[1, 3, 32, 32]);
    let noise = random_image(&mut rng, &[1, 3, 32, 32]);
    let same = scalar(&vgg.distance(&x, &x).expect("d"));
    assert!(same.abs() < 1e-9, "d(x, x) = {same}");
    let mut last = same;
    for amount in [0.02, 0.1, 0.3, 0.8] {
        let y = (&x + (&noise * amount).expect("scale")).expect("add");
        let d = scalar(&vgg.distance(&x, &y).expect("d"));
        assert!(d > last, "noise {amount}: {d} not above {last}");
        // Symmetric.
        let back = scalar(&vgg.distance(&y, &x).expect("d"));
        assert!((back - d).abs() <= 1e-5 * d, "{back} vs {d}");
        last = d;
    }
}

#[test]
fn batches_give_one_distance_per_image_and_a_single_target_broadcasts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vgg = tiny(dir.path(), true);
    let mut rng = StdRng::seed_from_u64(2);
    let a = random_image(&mut rng, &[1, 3, 24, 24]);
    let b = random_image(&mut rng, &[3, 3, 24, 24]);
    let target = vgg.target(&a).expect("target");
    let d = vgg.distance_to(&target, &b).expect("distance_to");
    assert_eq!(d.dims(), &[3]);
    let d = values(&d);
    for (i, want) in d.iter().enumerate() {
        let one = b.narrow(0, i, 1).expect("narrow");
        let got = scalar(&vgg.distance(&a, &one).expect("d"));
        assert!((got - want).abs() <= 1e-5 * want, "{i}: {got} vs {want}");
    }
}

#[test]
fn large_images_are_area_downsampled_to_256() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vgg = tiny(dir.path(), true);
    let mut rng = StdRng::seed_from_u64(3);
    let a = random_image(&mut rng, &[1, 3, 512, 512]);
    let b = random_image(&mut rng, &[1, 3, 512, 512]);
    let big = scalar(&vgg.distance(&a, &b).expect("big"));
    let small = scalar(
        &vgg.distance(
            &a.avg_pool2d(2).expect("pool"),
            &b.avg_pool2d(2).expect("pool"),
        )
        .expect("small"),
    );
    assert!((big - small).abs() <= 1e-5 * small, "{big} vs {small}");

    // A side that does not divide: PyTorch's `mode='area'` (adaptive average pooling).
    let x = random_image(&mut rng, &[1, 2, 7, 5]);
    let y = area_resize(&x, 3, 2).expect("resize");
    assert_eq!(y.dims(), &[1, 2, 3, 2]);
    // Rows 0..3, 2..5, 4..7 and columns 0..3, 2..5 (start ⌊i·n/m⌋, end ⌈(i+1)·n/m⌉).
    let want = |c: usize, i: usize, j: usize| -> f64 {
        let (r0, r1) = ([0, 2, 4][i], [3, 5, 7][i]);
        let (c0, c1) = ([0, 2][j], [3, 5][j]);
        let patch = x
            .get(0)
            .and_then(|t| t.get(c))
            .and_then(|t| t.narrow(0, r0, r1 - r0))
            .and_then(|t| t.narrow(1, c0, c1 - c0))
            .expect("patch");
        scalar(&patch) / ((r1 - r0) * (c1 - c0)) as f64
    };
    let got = y.to_dtype(DType::F64).expect("f64");
    for c in 0..2 {
        for i in 0..3 {
            for j in 0..2 {
                let g: f64 = got
                    .get(0)
                    .and_then(|t| t.get(c))
                    .and_then(|t| t.get(i))
                    .and_then(|t| t.get(j))
                    .and_then(|t| t.to_scalar())
                    .expect("value");
                assert!((g - want(c, i, j)).abs() < 1e-6, "({c},{i},{j})");
            }
        }
    }
    // 300 → 256 keeps a constant image constant and runs through the network.
    let flat = Tensor::full(0.25f32, (1, 3, 300, 300), &Device::Cpu).expect("full");
    let resized = area_resize(&flat, 256, 256).expect("resize");
    let max = resized
        .flatten_all()
        .and_then(|t| t.max(D::Minus1))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    let min = resized
        .flatten_all()
        .and_then(|t| t.min(D::Minus1))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("min");
    assert!((max - 0.25).abs() < 1e-6 && (min - 0.25).abs() < 1e-6);
    let odd = random_image(&mut rng, &[1, 3, 300, 300]);
    let d = scalar(&vgg.distance(&flat, &odd).expect("300×300"));
    assert!(d.is_finite() && d > 0.0);
}

/// The gradient of the distance with respect to the image on Studio's kernels (their own
/// input-gradient convolutions) equals candle's autograd through its own convolutions.
#[test]
fn native_gradients_equal_candles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vgg.safetensors");
    write_vgg16(&path, WIDTHS, true, 5);
    let mut rng = StdRng::seed_from_u64(9);
    let a = random_image(&mut rng, &[1, 3, 37, 29]);
    let b = random_image(&mut rng, &[2, 3, 37, 29]);
    let gradient = |kernels: Option<KernelPath>| {
        let vgg = with_kernels(kernels, || Vgg16Lpips::load(&path, &Device::Cpu)).expect("load");
        let target = vgg.target(&a).expect("target");
        let x = Var::from_tensor(&b).expect("var");
        let d = vgg
            .distance_to(&target, x.as_tensor())
            .expect("distance")
            .sum_all()
            .expect("sum");
        let grads = d.backward().expect("backward");
        values(grads.get(x.as_tensor()).expect("gradient"))
    };
    let reference = gradient(None);
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "a zero gradient");
    for path in KernelPath::available_paths() {
        let ours = gradient(Some(path));
        let worst = ours
            .iter()
            .zip(&reference)
            .fold(0f64, |m, (g, r)| m.max((g - r).abs()));
        println!("{path}: max |Δ gradient| = {worst:e} (max |gradient| {scale:e})");
        assert!(worst <= 1e-4 * scale, "{path}: {worst} against {scale}");
    }
}

#[test]
fn gradients_flow_to_the_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vgg = tiny(dir.path(), true);
    let mut rng = StdRng::seed_from_u64(4);
    let target = vgg
        .target(&random_image(&mut rng, &[1, 3, 32, 32]))
        .expect("target");
    // Include an all-black corner, where every channel may be cut by the ReLUs.
    let mut image = random_image(&mut rng, &[1, 3, 32, 32]);
    let corner = Tensor::full(-1f32, (1, 3, 16, 32), &Device::Cpu).expect("corner");
    image = Tensor::cat(&[&corner, &image.narrow(2, 16, 16).expect("rest")], 2).expect("cat");
    let x = Var::from_tensor(&image).expect("var");
    let mut previous = f64::INFINITY;
    for _ in 0..3 {
        let d = vgg
            .distance_to(&target, x.as_tensor())
            .expect("distance")
            .sum_all()
            .expect("sum");
        let value = scalar(&d);
        let grads = d.backward().expect("backward");
        let g = grads.get(x.as_tensor()).expect("gradient");
        let norm = scalar(&g.sqr().expect("sqr")).sqrt();
        assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
        // A small step down the gradient lowers the distance.
        assert!(value < previous, "{value} after {previous}");
        previous = value;
        let step = (g * (0.05 / norm)).expect("step");
        x.set(&(x.as_tensor() - step).expect("sub")).expect("set");
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let mut t = vgg16_tensors(WIDTHS, true, 6);
    t.remove("features.14.weight");
    let err = load_err(&t);
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "features.14.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("features.14.weight"), "{err}");

    let mut t = vgg16_tensors(WIDTHS, true, 6);
    t.remove("features.26.bias");
    let err = load_err(&t);
    assert!(err.to_string().contains("features.26.bias"), "{err}");

    // Some linear layers but not all.
    let mut t = vgg16_tensors(WIDTHS, true, 6);
    t.remove("lin3.model.1.weight");
    let err = load_err(&t);
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "lin3.model.1.weight"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_is_named() {
    // features.7 must take features.5's 8 channels.
    let mut t = vgg16_tensors(WIDTHS, true, 7);
    t.insert(
        "features.7.weight".into(),
        Tensor::zeros((8, 4, 3, 3), DType::F32, &Device::Cpu).expect("zeros"),
    );
    let err = load_err(&t);
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, found, .. }
            if name == "features.7.weight" && expected == &[8, 8, 3, 3] && found == &[8, 4, 3, 3]),
        "{err}"
    );

    // A 1×1 kernel.
    let mut t = vgg16_tensors(WIDTHS, true, 7);
    t.insert(
        "features.0.weight".into(),
        Tensor::zeros((4, 3, 1, 1), DType::F32, &Device::Cpu).expect("zeros"),
    );
    assert!(load_err(&t).to_string().contains("features.0.weight"));

    // A bias of the wrong width.
    let mut t = vgg16_tensors(WIDTHS, true, 7);
    t.insert(
        "features.19.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"),
    );
    assert!(load_err(&t).to_string().contains("features.19.bias"));

    // A linear layer of the wrong width.
    let mut t = vgg16_tensors(WIDTHS, true, 7);
    t.insert(
        "lin2.model.1.weight".into(),
        Tensor::ones((1, 4, 1, 1), DType::F32, &Device::Cpu).expect("ones"),
    );
    let err = load_err(&t);
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "lin2.model.1.weight"),
        "{err}"
    );

    // LPIPS's linear layers are non-negative.
    let mut t = vgg16_tensors(WIDTHS, true, 7);
    t.insert(
        "lin1.model.1.weight".into(),
        (Tensor::ones((1, 8, 1, 1), DType::F32, &Device::Cpu).expect("ones") * -0.5).expect("neg"),
    );
    let err = load_err(&t);
    assert!(err.to_string().contains("lin1.model.1.weight"), "{err}");
}

/// torchvision's `vgg16-397923af.pth` is a `torch.save` pickle: the same tiny VGG16 saved that
/// way (`tools/make_nvidia_pkl_fixtures.py`) loads, read as data, and gives the features the
/// safetensors file gives; it is found beside a model as the safetensors are. A broken one is
/// a clear error.
#[test]
fn torchvision_pickles_load_as_data() {
    let pth = fixture_dir().join("vgg16_tiny.pth");
    let from_pickle = Vgg16Lpips::load(&pth, &Device::Cpu).expect("load the pickle");
    assert!(!from_pickle.has_lpips_weights());
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = Vgg16Lpips::load(&fixture_dir().join("vgg16_tiny.safetensors"), &Device::Cpu)
        .expect("load");
    assert_eq!(from_pickle.widths(), reference.widths());
    let mut rng = StdRng::seed_from_u64(7);
    let x = random_image(&mut rng, &[1, 3, 32, 32]);
    let (a, b) = (
        from_pickle.features(&x).expect("features"),
        reference.features(&x).expect("features"),
    );
    for (fa, fb) in a.iter().zip(&b) {
        assert_eq!(values(fa), values(fb));
    }

    let only_pth = tempfile::tempdir().expect("tempdir");
    let copied = only_pth.path().join("vgg16-397923af.pth");
    std::fs::copy(&pth, &copied).expect("copy");
    assert_eq!(
        studio_inference::gan::perceptual::find_weights(&[only_pth.path().to_path_buf()]),
        Some(copied.clone())
    );
    // LPIPS's own `vgg.pth` beside it gives the linear layers.
    let lins: HashMap<String, Tensor> = fixture_weights()
        .into_iter()
        .filter(|(n, _)| n.starts_with("lin"))
        .collect();
    assert_eq!(lins.len(), 5);
    studio_tests::torch_writer::save_torch(&lins, false, &only_pth.path().join("vgg.pth"));
    let with_lpips = Vgg16Lpips::load(&copied, &Device::Cpu).expect("load with vgg.pth");
    assert!(with_lpips.has_lpips_weights() && reference.has_lpips_weights());
    let y = random_image(&mut rng, &[1, 3, 32, 32]);
    assert_eq!(
        values(&with_lpips.distance(&x, &y).expect("distance")),
        values(&reference.distance(&x, &y).expect("distance"))
    );

    let broken = dir.path().join("vgg16.pth");
    std::fs::write(&broken, b"\x80\x02}q\x00.").expect("write");
    let err = Vgg16Lpips::load(&broken, &Device::Cpu).expect_err("pth");
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
}

#[test]
fn other_load_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.safetensors");
    assert!(matches!(
        Vgg16Lpips::load(&missing, &Device::Cpu),
        Err(Error::NotFound(_))
    ));
    assert!(Vgg16Lpips::load(dir.path(), &Device::Cpu).is_err());
    let vgg = tiny(dir.path(), false);
    // Not RGB, or too small for four poolings.
    let gray = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).expect("zeros");
    assert!(vgg.distance(&gray, &gray).is_err());
    let small = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).expect("zeros");
    assert!(vgg.distance(&small, &small).is_err());
}
