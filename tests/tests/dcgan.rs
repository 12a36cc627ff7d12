//! The DCGAN generator against PyTorch: `tests/fixtures/dcgan`, made by
//! `tools/make_dcgan_fixture.py` with the `Generator` of `pytorch/examples` `dcgan/main.py`
//! (one block fewer: nz 8, ngf 4, nc 3, 32×32), random weights and BatchNorm running
//! statistics, in `.eval()` mode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use studio_inference::Error;
use studio_inference::gan::dcgan::{Dcgan, DcganInfo};
use studio_inference::nn::with_kernels;
use studio_inference::quant::KernelPath;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dcgan")
}

fn generator_path() -> PathBuf {
    fixture_dir().join("generator.safetensors")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

fn state_dict() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(generator_path(), &Device::Cpu).expect("generator.safetensors")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).expect("write safetensors");
    path
}

fn fixture_info(prefix: &str) -> DcganInfo {
    DcganInfo {
        nz: 8,
        ngf: 4,
        nc: 3,
        resolution: 32,
        layers: 4,
        prefix: prefix.to_owned(),
    }
}

#[test]
fn infers_the_architecture() {
    let g = Dcgan::load(&generator_path(), &Device::Cpu).expect("load");
    assert_eq!(g.info(), &fixture_info(""));
}

/// On candle's ops and on each of Studio's kernel paths this CPU has.
#[test]
fn matches_pytorch() {
    let e = expected();
    let sets = std::iter::once(None).chain(KernelPath::available_paths().into_iter().map(Some));
    for kernels in sets {
        let g =
            with_kernels(kernels, || Dcgan::load(&generator_path(), &Device::Cpu)).expect("load");
        let image = g.generate(&e["z"]).expect("generate");
        assert_eq!(image.dims(), &[2, 3, 32, 32]);
        let d = max_abs_diff(&image, &e["image"]);
        println!("dcgan parity ({kernels:?}): max |ours − torch| = {d:e}");
        assert!(d < 1e-5, "{kernels:?}: max abs diff {d}");
    }
    // The reference is not trivially saturated or flat.
    let spread = e["image"]
        .abs()
        .expect("abs")
        .mean_all()
        .expect("mean")
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(spread > 0.1 && spread < 0.95, "{spread}");
}

#[test]
fn seeds_match_numpy_and_flat_latents_work() {
    let g = Dcgan::load(&generator_path(), &Device::Cpu).expect("load");
    let e = expected();
    let z = g.z_from_seed(7).expect("z");
    assert_eq!(z.dims(), &[1, 8, 1, 1]);
    let dz = max_abs_diff(&z, &e["z_seed7"]);
    assert!(dz < 1e-7, "z diff {dz}");
    let image = g.generate(&z).expect("generate");
    let d = max_abs_diff(&image, &e["image_seed7"]);
    println!("dcgan seed 7 parity: max |ours − torch| = {d:e}");
    assert!(d < 1e-5, "max abs diff {d}");
    // (n, nz) is accepted as (n, nz, 1, 1).
    let flat = g
        .generate(&z.reshape((1, 8)).expect("reshape"))
        .expect("generate flat");
    assert!(max_abs_diff(&flat, &image) == 0.0);
    assert!(g.z_from_seed(u64::from(u32::MAX) + 1).is_err());
    let bad = Tensor::zeros((1, 9, 1, 1), DType::F32, &Device::Cpu).expect("zeros");
    assert!(matches!(g.generate(&bad), Err(Error::InvalidParameter(_))));
}

#[test]
fn accepts_the_data_parallel_prefix_and_ignores_num_batches_tracked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sd = state_dict();
    assert!(sd.contains_key("main.1.num_batches_tracked"));
    let prefixed: HashMap<String, Tensor> = sd
        .iter()
        .map(|(k, v)| (format!("module.{k}"), v.clone()))
        .collect();
    let path = write(dir.path(), "g_dp.safetensors", &prefixed);
    let g = Dcgan::load(&path, &Device::Cpu).expect("load module.-prefixed");
    assert_eq!(g.info(), &fixture_info("module."));
    let e = expected();
    let d = max_abs_diff(&g.generate(&e["z"]).expect("generate"), &e["image"]);
    assert!(d < 1e-5, "max abs diff {d}");

    let without: HashMap<String, Tensor> = sd
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect();
    let path = write(dir.path(), "g_nbt.safetensors", &without);
    let g = Dcgan::load(&path, &Device::Cpu).expect("load without num_batches_tracked");
    let d = max_abs_diff(&g.generate(&e["z"]).expect("generate"), &e["image"]);
    assert!(d < 1e-5, "max abs diff {d}");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (missing, prefix) in [
        ("main.4.running_var", ""),
        ("main.6.weight", ""),
        ("main.0.weight", ""),
        ("main.7.bias", "module."),
    ] {
        let sd: HashMap<String, Tensor> = state_dict()
            .into_iter()
            .filter(|(k, _)| k != missing)
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect();
        let path = write(dir.path(), "g_missing.safetensors", &sd);
        match Dcgan::load(&path, &Device::Cpu) {
            Err(Error::MissingTensor { name, .. }) => {
                assert_eq!(name, format!("{prefix}{missing}"));
            }
            other => panic!("{missing}: expected MissingTensor, got {other:?}"),
        }
    }
}

#[test]
fn a_wrong_shape_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sd = state_dict();
    sd.insert(
        "main.3.weight".into(),
        Tensor::zeros((16, 6, 4, 4), DType::F32, &Device::Cpu).expect("zeros"),
    );
    let path = write(dir.path(), "g_shape.safetensors", &sd);
    match Dcgan::load(&path, &Device::Cpu) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        }) => {
            assert_eq!(name, "main.3.weight");
            assert_eq!(expected, vec![16, 8, 4, 4]);
            assert_eq!(found, vec![16, 6, 4, 4]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }

    let mut sd = state_dict();
    sd.insert(
        "main.4.running_mean".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).expect("zeros"),
    );
    let path = write(dir.path(), "g_shape_bn.safetensors", &sd);
    match Dcgan::load(&path, &Device::Cpu) {
        Err(Error::ShapeMismatch { name, .. }) => assert_eq!(name, "main.4.running_mean"),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

/// PyTorch's DCGAN example saves `netG_epoch_N.pth` with `torch.save`: it loads, read as data,
/// and renders as the safetensors state dict does; a broken one is a clear error.
#[test]
fn a_pytorch_pickle_loads_as_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("netG_epoch_24.pth");
    studio_tests::torch_writer::save_torch(&state_dict(), false, &path);
    let from_pickle = Dcgan::load(&path, &Device::Cpu).expect("load the pickle");
    let reference = Dcgan::load(&generator_path(), &Device::Cpu).expect("load");
    assert_eq!(from_pickle.info(), reference.info());
    let z = &expected()["z"];
    let (a, b) = (
        from_pickle.generate(z).expect("generate"),
        reference.generate(z).expect("generate"),
    );
    let flat = |t: &Tensor| {
        t.flatten_all()
            .expect("flatten")
            .to_vec1::<f32>()
            .expect("vec")
    };
    assert_eq!(flat(&a), flat(&b));

    let broken = dir.path().join("broken.pth");
    std::fs::write(&broken, b"not really a pickle").expect("write");
    assert!(matches!(
        Dcgan::load(&broken, &Device::Cpu),
        Err(Error::CorruptWeights { .. })
    ));
}
