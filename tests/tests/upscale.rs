//! Upscalers (`studio_inference::upscale`) against PyTorch: the fixtures in
//! `tests/fixtures/esrgan` are tiny random-weight RRDBNets in both published namings, with
//! their outputs from BasicSR's architecture (`tools/make_esrgan_fixture.py`);
//! `tests/fixtures/swinir` are tiny random-weight SwinIRs with each published reconstruction,
//! with their outputs from the reference SwinIR (`tools/make_swinir_fixture.py`).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::upscale::swinir::{ResiConnection, Upsampler};
use studio_inference::upscale::{self, Architecture, Naming};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/esrgan")
        .join(name)
}

fn io(name: &str) -> Tensor {
    let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).expect("io");
    io.get(name).expect("tensor").clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

#[test]
fn rrdbnet_matches_pytorch_in_both_namings_and_scales() {
    let input = io("input");
    for (file, scale, naming, output) in [
        ("rrdb-x4.safetensors", 4, Naming::BasicSr, "output_x4"),
        (
            "rrdb-x4-esrgan-names.safetensors",
            4,
            Naming::Esrgan,
            "output_x4",
        ),
        ("rrdb-x2.safetensors", 2, Naming::BasicSr, "output_x2"),
    ] {
        let up = upscale::load(&fixture(file), &Device::Cpu).expect(file);
        let info = up.info();
        assert_eq!(info.scale, scale, "{file}");
        let Architecture::RrdbNet {
            features,
            growth,
            naming: found,
            ..
        } = info.architecture
        else {
            panic!("{file}: {:?}", info.architecture);
        };
        assert_eq!((features, growth, found), (8, 4, naming), "{file}");
        let ours = up.forward(&input).expect("forward");
        let torch = io(output);
        assert_eq!(ours.dims(), torch.dims(), "{file}");
        let diff = max_diff(&ours, &torch);
        assert!(diff < 1e-3, "{file}: differs from PyTorch by {diff}");
    }
}

fn test_image(w: u32, h: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.extend([
                (x * 9 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) * 5 % 256) as u8,
            ]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

#[test]
fn tiles_with_enough_context_give_the_whole_image_result() {
    let up = upscale::load(&fixture("rrdb-x2.safetensors"), &Device::Cpu).expect("load");
    // Odd sides: padded to the x2 model's multiple of 2, then cropped back.
    let image = test_image(23, 17);
    let whole = up
        .upscale(&image, 0, 0, &mut |_, _| ControlFlow::Continue(()))
        .expect("whole")
        .expect("not cancelled");
    assert_eq!((whole.width, whole.height), (46, 34));
    let mut tiles = 0;
    let tiled = up
        .upscale(&image, 8, 64, &mut |done, total| {
            tiles = total;
            assert!(done <= total);
            ControlFlow::Continue(())
        })
        .expect("tiled")
        .expect("not cancelled");
    assert_eq!(tiles, 9, "3 × 3 tiles of 8");
    let worst = whole
        .pixels
        .iter()
        .zip(&tiled.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "tiles differ from the whole image by {worst}");

    // Stopping after the first tile returns nothing.
    let stopped = up
        .upscale(&image, 8, 4, &mut |_, _| ControlFlow::Break(()))
        .expect("stopped");
    assert!(stopped.is_none());
}

#[test]
fn files_that_are_not_rrdbnets_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Real-ESRGAN's compact model (SRVGGNetCompact): `body.N.weight` convolutions.
    let compact = tmp.path().join("realesr-general-x4v3.safetensors");
    let t = Tensor::zeros((64, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).expect("t");
    let b = Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu).expect("b");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("body.0.weight".to_owned(), t.clone()),
            ("body.0.bias".to_owned(), b.clone()),
            ("body.1.weight".to_owned(), b),
        ]),
        &compact,
    )
    .expect("save");
    let e = upscale::load(&compact, &Device::Cpu).expect_err("refused");
    assert!(e.to_string().contains("SRVGGNetCompact"), "{e}");

    // A truncated file.
    let bytes = std::fs::read(fixture("rrdb-x2.safetensors")).expect("read");
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    assert!(upscale::load(&cut, &Device::Cpu).is_err());

    // An image whose result would be too large.
    let up = upscale::load(&fixture("rrdb-x4.safetensors"), &Device::Cpu).expect("load");
    let huge = RgbImage::new_filled(6000, 5000, [0, 0, 0]);
    let e = up
        .upscale(&huge, 256, 16, &mut |_, _| ControlFlow::Continue(()))
        .expect_err("too large");
    assert!(e.to_string().contains("at most"), "{e}");
}

fn swinir_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/swinir")
        .join(name)
}

fn swinir_io(name: &str) -> Tensor {
    let io =
        candle_core::safetensors::load(swinir_fixture("io.safetensors"), &Device::Cpu).expect("io");
    io.get(name).expect("tensor").clone()
}

/// Each published reconstruction (classical, lightweight, real-world with `3conv`; a `.pth`
/// with `params_ema` among them), on an input that is not a multiple of the window, against
/// the reference implementation.
#[test]
fn swinir_matches_the_reference_for_each_reconstruction() {
    let input = swinir_io("input");
    for (file, scale, upsampler, resi, depths) in [
        (
            "swinir-x2-pixelshuffle.safetensors",
            2,
            Upsampler::PixelShuffle,
            ResiConnection::OneConv,
            vec![2, 2],
        ),
        (
            "swinir-x4-nearest-3conv.pth",
            4,
            Upsampler::NearestConv,
            ResiConnection::ThreeConv,
            vec![2],
        ),
        (
            "swinir-x3-direct.safetensors",
            3,
            Upsampler::PixelShuffleDirect,
            ResiConnection::OneConv,
            vec![2],
        ),
    ] {
        let up = upscale::load(&swinir_fixture(file), &Device::Cpu).expect(file);
        let info = up.info();
        assert_eq!(info.scale, scale, "{file}");
        let Architecture::SwinIr(config) = &info.architecture else {
            panic!("{file}: {:?}", info.architecture);
        };
        assert_eq!(
            (config.upsampler, config.resi, &config.depths, config.window),
            (upsampler, resi, &depths, 4),
            "{file}"
        );
        assert!(info.describe().contains("SwinIR"), "{}", info.describe());
        let ours = up.forward(&input).expect("forward");
        let stem = file.split('.').next().expect("stem");
        let torch = swinir_io(&format!("output_{stem}"));
        assert_eq!(ours.dims(), torch.dims(), "{file}");
        let diff = max_diff(&ours, &torch);
        assert!(diff < 1e-4, "{file}: differs from the reference by {diff}");
    }
}

/// SwinIR in tiles: each tile and its context are whole windows, so a tiled upscale stays
/// close to the whole image's; sides that are not multiples of the window are fine.
#[test]
fn swinir_upscales_in_tiles() {
    let up = upscale::load(
        &swinir_fixture("swinir-x2-pixelshuffle.safetensors"),
        &Device::Cpu,
    )
    .expect("load");
    assert_eq!(up.multiple(), 1, "SwinIR pads to its window itself");
    let image = test_image(21, 15);
    let whole = up
        .upscale(&image, 0, 0, &mut |_, _| ControlFlow::Continue(()))
        .expect("whole")
        .expect("not cancelled");
    assert_eq!((whole.width, whole.height), (42, 30));
    let mut tiles = 0;
    let tiled = up
        .upscale(&image, 8, 8, &mut |_, total| {
            tiles = total;
            ControlFlow::Continue(())
        })
        .expect("tiled")
        .expect("not cancelled");
    assert_eq!(tiles, 6, "3 × 2 tiles of 8");
    let mean_diff = whole
        .pixels
        .iter()
        .zip(&tiled.pixels)
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / whole.pixels.len() as f64;
    assert!(
        mean_diff < 2.0,
        "tiles differ from the whole image by {mean_diff} on average"
    );
}

/// A change to a fixture's tensors.
type Edit = dyn Fn(&mut std::collections::HashMap<String, Tensor>);

/// A damaged SwinIR is refused by name: a missing tensor, a table that is no window's, and a
/// denoising SwinIR (no up-sampling).
#[test]
fn broken_swinirs_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = candle_core::safetensors::load(
        swinir_fixture("swinir-x3-direct.safetensors"),
        &Device::Cpu,
    )
    .expect("load");
    let write = |name: &str, edit: &Edit| {
        let mut t = good.clone();
        edit(&mut t);
        let path = tmp.path().join(name);
        candle_core::safetensors::save(&t, &path).expect("save");
        path
    };
    let cases: [(&str, &Edit, &str); 3] = [
        (
            "missing.safetensors",
            &|t| {
                t.remove("layers.0.residual_group.blocks.1.mlp.fc2.weight");
            },
            "mlp.fc2.weight",
        ),
        (
            "table.safetensors",
            &|t| {
                let z = Tensor::zeros((50, 2), candle_core::DType::F32, &Device::Cpu).expect("z");
                t.insert(
                    "layers.0.residual_group.blocks.0.attn.relative_position_bias_table".into(),
                    z,
                );
            },
            "50 rows",
        ),
        (
            "denoise.safetensors",
            &|t| {
                t.remove("upsample.0.weight");
                t.remove("upsample.0.bias");
            },
            "not an upscaler",
        ),
    ];
    for (name, edit, expected) in cases {
        let e = upscale::load(&write(name, edit), &Device::Cpu).expect_err(name);
        assert!(e.to_string().contains(expected), "{name}: {e}");
    }
}
