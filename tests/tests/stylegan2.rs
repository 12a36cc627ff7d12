//! StyleGAN2 against NVIDIA's own PyTorch code: `tests/fixtures/stylegan2`, made by
//! `tools/make_stylegan2_fixture.py` with stylegan2-ada-pytorch's `training/networks.py`.
//!
//! Two tiny random-weight generators (a 'skip' one and a class-conditioned 'resnet' one with
//! an active `conv_clamp`) are loaded through `StyleGan2::load`; numpy's seeds, the mapping
//! at several truncations, images at const / no noise and one intermediate layer must match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use studio_inference::Error;
use studio_inference::gan::{Architecture, NoiseMode, StyleGan2};
use studio_inference::quant::KernelPath;
use studio_tests::gan;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stylegan2")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

fn load(name: &str) -> StyleGan2 {
    StyleGan2::load(
        &fixture_dir().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("load fixture generator")
}

/// Largest absolute difference, and the largest magnitude of the reference.
fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).expect("f32");
    let b = b.to_dtype(DType::F32).expect("f32");
    let d = (a - &b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    let scale = b
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    (d, scale)
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, rel: f32) {
    let (d, scale) = diff(ours, reference);
    let tol = rel * scale.max(1.0);
    println!("{what}: max |diff| {d:.2e} (reference max {scale:.3}, tolerance {tol:.1e})");
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
}

fn seeds(exp: &HashMap<String, Tensor>, model: &str) -> Vec<u64> {
    let mut s: Vec<u64> = exp
        .keys()
        .filter_map(|k| k.strip_prefix(&format!("{model}.seed")))
        .filter_map(|k| k.split('.').next()?.parse().ok())
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// Every kernel set synthesis can run on here: candle's ops (`None`) and each CPU path of
/// Studio's own kernels this machine has.
fn kernel_sets() -> Vec<Option<KernelPath>> {
    std::iter::once(None)
        .chain(KernelPath::available_paths().into_iter().map(Some))
        .collect()
}

fn check_model(model: &str) {
    for kernels in kernel_sets() {
        println!("{model} on {kernels:?}");
        let mut g = load(model);
        g.set_cpu_kernels(kernels).expect("kernels");
        check_model_on(model, &g);
    }
}

fn check_model_on(model: &str, g: &StyleGan2) {
    let exp = expected();
    let seeds = seeds(&exp, model);
    assert!(seeds.len() >= 2, "fixture has seeds for {model}");
    for (i, seed) in seeds.iter().enumerate() {
        let p = format!("{model}.seed{seed}");
        let z = g.z_from_seed(*seed).expect("z");
        assert_close(&format!("{p}.z"), &z, &exp[&format!("{p}.z")], 1e-6);
        let c = exp.get(&format!("{p}.c"));
        let ws1 = g.map(&z, c, 1.0, None).expect("map");
        assert_close(
            &format!("{p}.ws ψ=1"),
            &ws1,
            &exp[&format!("{p}.ws.psi1")],
            1e-5,
        );
        let ws07 = g.map(&z, c, 0.7, None).expect("map");
        assert_close(
            &format!("{p}.ws ψ=0.7"),
            &ws07,
            &exp[&format!("{p}.ws.psi0.7")],
            1e-5,
        );
        let ws05 = g.map(&z, c, 0.5, Some(3)).expect("map");
        assert_close(
            &format!("{p}.ws ψ=0.5 cutoff 3"),
            &ws05,
            &exp[&format!("{p}.ws.psi0.5.cutoff3")],
            1e-5,
        );
        // Images from the reference ws, so each comparison isolates the synthesis network.
        let ref_ws1 = &exp[&format!("{p}.ws.psi1")];
        let (img, layer) = g
            .synthesize_with_layer(ref_ws1, NoiseMode::Const, Some("b16.conv0"))
            .expect("synthesize");
        assert_close(
            &format!("{p}.img const ψ=1"),
            &img,
            &exp[&format!("{p}.img.const.psi1")],
            1e-4,
        );
        // And end to end from our own ws.
        let img_own = g.synthesize(&ws1, NoiseMode::Const).expect("synthesize");
        assert_close(
            &format!("{p}.img const ψ=1 (own ws)"),
            &img_own,
            &exp[&format!("{p}.img.const.psi1")],
            1e-4,
        );
        if i == 0 {
            assert_close(
                &format!("{p}.layer b16.conv0"),
                &layer.expect("layer output"),
                &exp[&format!("{p}.layer.b16.conv0")],
                1e-4,
            );
            let img = g
                .synthesize(&exp[&format!("{p}.ws.psi0.7")], NoiseMode::Const)
                .expect("synthesize");
            assert_close(
                &format!("{p}.img const ψ=0.7"),
                &img,
                &exp[&format!("{p}.img.const.psi0.7")],
                1e-4,
            );
            let img = g.synthesize(ref_ws1, NoiseMode::None).expect("synthesize");
            assert_close(
                &format!("{p}.img noise none"),
                &img,
                &exp[&format!("{p}.img.none.psi1")],
                1e-4,
            );
            // ψ = 0 is the w_avg image, whatever the seed.
            let ws0 = g.map(&z, c, 0.0, None).expect("map");
            let (d, _) = diff(&ws0, &g.w_avg().expect("w_avg"));
            assert!(d < 1e-6, "ψ=0 ws differ from w_avg by {d}");
            let img0 = g
                .synthesize(&g.w_avg().expect("w_avg"), NoiseMode::Const)
                .expect("synthesize");
            assert_close(
                &format!("{p}.img ψ=0 (w_avg)"),
                &img0,
                &exp[&format!("{p}.img.const.psi0")],
                1e-4,
            );
        }
    }
}

#[test]
fn skip_generator_matches_nvidia() {
    let g = load("skip");
    let info = g.info();
    assert_eq!(info.resolution, 32);
    assert_eq!(info.num_ws, 8);
    assert_eq!((info.z_dim, info.w_dim, info.c_dim), (32, 32, 0));
    assert_eq!(info.mapping_layers, 2);
    assert_eq!(info.architecture, Architecture::Skip);
    assert_eq!(info.conv_clamp, Some(256.0));
    assert_eq!(info.channels, vec![(4, 32), (8, 16), (16, 8), (32, 4)]);
    assert!(info.from_json);
    check_model("skip");
}

/// NVIDIA's network pickle of the same generator (`tools/make_nvidia_pkl_fixtures.py`: a
/// `torch_utils.persistence` module tree, as stylegan2-ada-pytorch pickles it) loads, read as
/// data, with the settings its `_init_kwargs` hold, and renders as NVIDIA's code does. The
/// source code the pickle carries would create a canary file if it ran: it never does.
#[test]
fn nvidia_network_pickle_matches_nvidia_and_runs_nothing() {
    let canary = Path::new("/tmp/studio-pickle-canary-nvidia");
    let _ = std::fs::remove_file(canary);
    let g = StyleGan2::load(&fixture_dir().join("skip.pkl"), &Device::Cpu).expect("load pkl");
    let reference = load("skip");
    assert!(g.info().from_pickle && !reference.info().from_pickle);
    assert!(g.info().from_json, "the init kwargs come from the pickle");
    let mut info = g.info().clone();
    info.from_pickle = false;
    assert_eq!(&info, reference.info());
    check_model_on("skip", &g);
    assert!(!canary.exists(), "the pickle's code ran");
}

/// The StyleGAN2 networks NVIDIA trained with the StyleGAN3 code base (NGC's
/// `stylegan2-ffhq-512x512.pkl` and the like: `training.networks_stylegan2.Generator`) record
/// their synthesis settings at the top level of the init kwargs, beside the mapping's, with
/// `fused_modconv_default` and no `architecture` (skip by default). Read that way, the same
/// weights render as NVIDIA's code does.
#[test]
fn stylegan3_codebase_stylegan2_kwargs_load_and_match() {
    let tmp = tempfile::tempdir().expect("tmp");
    let weights = tmp.path().join("G.safetensors");
    std::fs::copy(fixture_dir().join("skip.safetensors"), &weights).expect("copy");
    let settings = serde_json::json!({
        "class_name": "training.networks_stylegan2.Generator",
        "init_kwargs": {
            "z_dim": 32, "w_dim": 32, "mapping_kwargs": {"num_layers": 2},
            "channel_base": 128, "channel_max": 32, "fused_modconv_default": "inference_only",
            "num_fp16_res": 0, "conv_clamp": 256, "c_dim": 0, "img_resolution": 32,
            "img_channels": 3
        }
    });
    std::fs::write(tmp.path().join("G.json"), settings.to_string()).expect("json");
    let g = StyleGan2::load(&weights, &Device::Cpu).expect("load");
    assert!(g.info().from_json);
    assert_eq!(g.info(), load("skip").info());
    check_model_on("skip", &g);
}

/// StyleGAN3 networks are recognised and refused by name, as are TensorFlow-era pickles;
/// nothing in them runs.
#[test]
fn stylegan3_and_tensorflow_pickles_are_refused_by_name() {
    let canary = Path::new("/tmp/studio-pickle-canary-nvidia");
    let pickles = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pickles");
    let err =
        StyleGan2::load(&pickles.join("stylegan3_r.pkl"), &Device::Cpu).expect_err("stylegan3");
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(what, _) if what.contains("StyleGAN3-R")),
        "{err}"
    );
    let err = StyleGan2::load(&pickles.join("tf_network.pkl"), &Device::Cpu).expect_err("tf");
    assert!(err.to_string().contains("TensorFlow"), "{err}");
    assert!(!canary.exists(), "a pickle's code ran");
}

#[test]
fn conditional_resnet_generator_matches_nvidia() {
    let g = load("resnet_cond");
    let info = g.info();
    assert_eq!(info.architecture, Architecture::Resnet);
    assert_eq!((info.z_dim, info.w_dim, info.c_dim), (16, 16, 3));
    assert_eq!(info.conv_clamp, Some(1.5));
    check_model("resnet_cond");
}

#[test]
fn seeds_are_numpy_randomstate_randn() {
    let g = load("skip");
    let exp = expected();
    for seed in seeds(&exp, "skip") {
        let z = g.z_from_seed(seed).expect("z");
        let reference = exp[&format!("skip.seed{seed}.z")]
            .to_dtype(DType::F32)
            .expect("f32");
        let (d, _) = diff(&z, &reference);
        assert!(d == 0.0, "seed {seed}: z differs from numpy by {d}");
    }
    assert_ne!(
        g.z_from_seed(1).expect("z").to_vec2::<f32>().expect("vec"),
        g.z_from_seed(2).expect("z").to_vec2::<f32>().expect("vec")
    );
    let err = g.z_from_seed(1 << 32).expect_err("seed too large");
    assert!(matches!(err, Error::InvalidParameter(_)), "{err}");
}

#[test]
fn architecture_is_inferred_without_the_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("G_ema.safetensors");
    std::fs::copy(fixture_dir().join("skip.safetensors"), &path).expect("copy");
    let g = StyleGan2::load(&path, &Device::Cpu).expect("load without json");
    let with_json = load("skip");
    let mut info = g.info().clone();
    assert!(!info.from_json);
    info.from_json = true;
    assert_eq!(&info, with_json.info());
    let exp = expected();
    let img = g
        .synthesize(&exp["skip.seed1.ws.psi1"], NoiseMode::Const)
        .expect("synthesize");
    assert_close(
        "inferred skip.seed1 image",
        &img,
        &exp["skip.seed1.img.const.psi1"],
        1e-4,
    );

    // The resnet one: architecture and conditioning from the names alone.
    let path = dir.path().join("cond.safetensors");
    std::fs::copy(fixture_dir().join("resnet_cond.safetensors"), &path).expect("copy");
    let g = StyleGan2::load(&path, &Device::Cpu).expect("load without json");
    assert_eq!(g.info().architecture, Architecture::Resnet);
    assert_eq!(g.info().c_dim, 3);
    assert_eq!(g.info().conv_clamp, Some(256.0), "the documented default");
}

#[test]
fn noise_modes_differ_and_random_is_seeded() {
    let g = load("skip");
    let ws = g
        .map(&g.z_from_seed(3).expect("z"), None, 1.0, None)
        .expect("map");
    let a = g.synthesize(&ws, NoiseMode::Random { seed: 5 }).expect("a");
    let b = g.synthesize(&ws, NoiseMode::Random { seed: 5 }).expect("b");
    let c = g.synthesize(&ws, NoiseMode::Random { seed: 6 }).expect("c");
    let k = g.synthesize(&ws, NoiseMode::Const).expect("const");
    assert!(
        diff(&a, &b).0 <= 0.0,
        "the same noise seed gives the same image"
    );
    assert!(diff(&a, &c).0 > 1e-3);
    assert!(diff(&a, &k).0 > 1e-3);
}

#[test]
fn given_noise_buffers_replace_the_noise_mode_layer_view_included() {
    let g = load("skip");
    let ws = g
        .map(&g.z_from_seed(3).expect("z"), None, 1.0, None)
        .expect("map");
    // The stored buffers given explicitly are the const mode exactly.
    let (k, k_layer) = g
        .synthesize_with_layer(&ws, NoiseMode::Const, Some("b16.conv0"))
        .expect("const");
    let (g_img, g_layer) = g
        .synthesize_with_noise_and_layer(&ws, &g.noise_buffers(), Some("b16.conv0"))
        .expect("given");
    assert!(diff(&k, &g_img).0 <= 0.0);
    assert!(diff(&k_layer.expect("layer"), &g_layer.expect("layer")).0 <= 0.0);
    // Other buffers (a projection's) change the image, and repeat for every batch item.
    let other: Vec<Tensor> = g
        .noise_buffers()
        .iter()
        .map(|b| (b * -1.0).expect("neg"))
        .collect();
    let two = Tensor::cat(&[&ws, &ws], 0).expect("batch");
    let img = g.synthesize_with_noise(&two, &other).expect("other");
    let (first, second) = (img.get(0).expect("0"), img.get(1).expect("1"));
    assert!(diff(&first, &second).0 <= 0.0);
    assert!(diff(&first, &k.get(0).expect("k")).0 > 1e-4);
    let err = g
        .synthesize_with_noise_and_layer(&ws, &other[1..], None)
        .expect_err("one buffer short");
    assert!(err.to_string().contains("noise inputs"), "{err}");
}

#[test]
fn layer_names_cover_every_layer() {
    let g = load("skip");
    let names = g.layer_names();
    assert_eq!(names.first().map(String::as_str), Some("b4.conv1"));
    assert!(names.iter().any(|n| n == "b32.torgb"));
    let ws = g.w_avg().expect("w_avg");
    for name in &names {
        let (_, layer) = g
            .synthesize_with_layer(&ws, NoiseMode::Const, Some(name))
            .expect("synthesize");
        let layer = layer.expect("captured");
        assert_eq!(layer.dim(0).expect("batch"), 1, "{name}");
    }
    let (_, layer) = g
        .synthesize_with_layer(&ws, NoiseMode::Const, Some("synthesis.b8.conv0"))
        .expect("prefix");
    assert_eq!(layer.expect("layer").dims(), &[1, 16, 8, 8]);
    let err = g
        .synthesize_with_layer(&ws, NoiseMode::Const, Some("b8.nope"))
        .expect_err("unknown layer");
    assert!(err.to_string().contains("b8.conv0"), "{err}");
}

/// Writes the skip fixture with one tensor changed (or removed) into `dir`, with its JSON.
fn write_modified(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(fixture_dir().join("skip.safetensors"), &Device::Cpu)
            .expect("load fixture");
    edit(&mut tensors);
    let path = dir.join("bad.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("save");
    std::fs::copy(fixture_dir().join("skip.json"), dir.join("bad.json")).expect("json");
    path
}

#[test]
fn bad_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");

    let path = write_modified(dir.path(), |t| {
        t.remove("synthesis.b16.conv1.affine.weight");
    });
    match StyleGan2::load(&path, &Device::Cpu) {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "synthesis.b16.conv1.affine.weight");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    let path = write_modified(dir.path(), |t| {
        t.insert(
            "synthesis.b8.conv1.weight".into(),
            Tensor::zeros((16, 12, 3, 3), DType::F32, &Device::Cpu).expect("zeros"),
        );
    });
    match StyleGan2::load(&path, &Device::Cpu) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        }) => {
            assert_eq!(name, "synthesis.b8.conv1.weight");
            assert_eq!(expected, vec![16, 16, 3, 3]);
            assert_eq!(found, vec![16, 12, 3, 3]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }

    let path = write_modified(dir.path(), |t| {
        t.remove("mapping.w_avg");
    });
    match StyleGan2::load(&path, &Device::Cpu) {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "mapping.w_avg"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // A StyleGAN3 state dict is recognised and refused.
    let path = write_modified(dir.path(), |t| {
        t.insert(
            "synthesis.input.affine.weight".into(),
            Tensor::zeros((4, 32), DType::F32, &Device::Cpu).expect("zeros"),
        );
    });
    let err = StyleGan2::load(&path, &Device::Cpu).expect_err("stylegan3");
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(what, _) if what.contains("StyleGAN3")),
        "{err}"
    );

    // A file that only claims to be one of NVIDIA's pickles is a clear error.
    let pkl = dir.path().join("network-snapshot-000100.pkl");
    std::fs::write(&pkl, b"\x80\x04not really a pickle").expect("write");
    let err = StyleGan2::load(&pkl, &Device::Cpu).expect_err("pickle");
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");

    let err = StyleGan2::load(&dir.path().join("missing.safetensors"), &Device::Cpu)
        .expect_err("missing");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn random_generators_of_every_layout_load_and_render() {
    use gan::{TinyStyleGan2, write_stylegan2};
    let dir = tempfile::tempdir().expect("tempdir");
    let layouts = [
        ("skip", TinyStyleGan2::default()),
        (
            "skip64_cond",
            TinyStyleGan2 {
                resolution: 64,
                c_dim: 5,
                mapping_layers: 3,
                channel_base: 256,
                ..TinyStyleGan2::default()
            },
        ),
        (
            "resnet",
            TinyStyleGan2 {
                skip: false,
                resnet: true,
                ..TinyStyleGan2::default()
            },
        ),
        (
            "orig",
            TinyStyleGan2 {
                skip: false,
                resnet: false,
                ..TinyStyleGan2::default()
            },
        ),
    ];
    for (i, (name, cfg)) in layouts.into_iter().enumerate() {
        let with_json = dir.path().join(format!("{name}.safetensors"));
        let bare = dir.path().join(format!("{name}_bare.safetensors"));
        write_stylegan2(&with_json, cfg, i as u64, true);
        write_stylegan2(&bare, cfg, i as u64, false);
        let a = StyleGan2::load(&with_json, &Device::Cpu).expect("load with json");
        let b = StyleGan2::load(&bare, &Device::Cpu).expect("load from names");
        let info = a.info();
        assert_eq!(info.num_ws, cfg.num_ws(), "{name}");
        assert_eq!(info.resolution, cfg.resolution, "{name}");
        assert_eq!(info.c_dim, cfg.c_dim, "{name}");
        assert_eq!(info.mapping_layers, cfg.mapping_layers, "{name}");
        assert_eq!(
            info.channels.last().copied(),
            Some((cfg.resolution, cfg.channels(cfg.resolution))),
            "{name}"
        );
        let mut inferred = b.info().clone();
        inferred.from_json = true;
        assert_eq!(&inferred, info, "{name}: names and JSON agree");
        let label = (cfg.c_dim > 0).then(|| a.class_label(cfg.c_dim - 1).expect("label"));
        let ws = a
            .map(&a.z_from_seed(9).expect("z"), label.as_ref(), 0.8, Some(4))
            .expect("map");
        let img_a = a.synthesize(&ws, NoiseMode::Const).expect("render");
        let img_b = b.synthesize(&ws, NoiseMode::Const).expect("render");
        assert_eq!(
            img_a.dims(),
            &[1, 3, cfg.resolution, cfg.resolution],
            "{name}"
        );
        let (d, scale) = diff(&img_a, &img_b);
        assert!(d <= 0.0, "{name}: JSON and inferred networks differ by {d}");
        assert!(
            scale.is_finite() && scale > 0.0,
            "{name}: image max {scale}"
        );
    }
}
