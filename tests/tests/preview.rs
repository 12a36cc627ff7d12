//! Live previews: the latent→RGB projection against hand-computed pixels, and the TAESD tiny
//! decoder against diffusers' `AutoencoderTiny` (fixture made by `tools/make_taesd_fixture.py`),
//! loaded from both published layouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use studio_inference::diffusion::imaging::*;
use studio_inference::diffusion::preview::*;
use studio_inference::error::Error;
use studio_inference::nn::with_kernels;
use studio_inference::quant::KernelPath;
use studio_tests::max_abs_diff;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/taesd")
}

fn expected() -> (Tensor, Tensor) {
    let mut t =
        candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu)
            .expect("expected.safetensors");
    (
        t.remove("latents").expect("latents"),
        t.remove("decoded").expect("decoded"),
    )
}

/// The fixture's weights renamed to madebyollin's layout: `decoder.layers.N.rest` →
/// `{N+1}.rest` (its `nn.Sequential` starts with the clamp module).
fn original_layout(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .map(|(k, v)| {
            let rest = k.strip_prefix("decoder.layers.").expect("decoder tensor");
            let (index, tail) = rest.split_once('.').expect("index");
            let index: usize = index.parse().expect("number");
            (format!("{}.{tail}", index + 1), v.clone())
        })
        .collect()
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("weights")
}

#[test]
fn latent_to_rgb_matches_hand_computed_pixels() {
    // 2×3 latents; pixel (x = 2, y = 1) holds (0.5, −0.25, 1.0, 0.1), the rest 0.
    let mut data = vec![0f32; 4 * 2 * 3];
    for (c, v) in [0.5f32, -0.25, 1.0, 0.1].into_iter().enumerate() {
        data[c * 6 + 3 + 2] = v;
    }
    let latents = Tensor::from_vec(data, (1, 4, 2, 3), &Device::Cpu).expect("latents");
    let img = latent_to_rgb(&latents, LatentFormat::Sd).expect("preview");
    // Not upscaled: one pixel per latent.
    assert_eq!((img.width, img.height), (3, 2));
    // R = 0.5·0.298 − 0.25·0.187 + 1.0·(−0.158) + 0.1·(−0.184) = −0.07415 → (1 + R)·127.5 = 118.05
    // G = 0.5·0.207 − 0.25·0.286 + 1.0·0.189 + 0.1·(−0.271) = 0.1939 → 152.22
    // B = 0.5·0.208 − 0.25·0.173 + 1.0·0.264 + 0.1·(−0.473) = 0.27745 → 162.87
    assert_eq!(&img.pixels[(3 + 2) * 3..(3 + 2) * 3 + 3], &[118, 152, 163]);
    // Zero latents are mid grey for SD (no bias).
    assert_eq!(&img.pixels[..3], &[128, 128, 128]);

    let xl = latent_to_rgb(&latents, LatentFormat::Sdxl).expect("preview");
    // R = 0.1084 + 0.5·0.3651 − 0.25·(−0.2533) + 1.0·0.1076 + 0.1·(−0.3165) = 0.430225 → 182.35
    // G = −0.0175 + 0.5·0.4232 − 0.25·(−0.0042) + 1.0·0.1111 + 0.1·(−0.2492) = 0.28133 → 163.37
    // B = −0.0011 + 0.5·0.4341 − 0.25·0.1068 + 1.0·(−0.0362) + 0.1·(−0.2188) = 0.13117 → 144.22
    assert_eq!(&xl.pixels[(3 + 2) * 3..(3 + 2) * 3 + 3], &[182, 163, 144]);
    // Zero latents show the SDXL bias: (1 + 0.1084, 1 − 0.0175, 1 − 0.0011)·127.5.
    assert_eq!(&xl.pixels[..3], &[141, 125, 127]);

    // (4, h, w) in f16 gives the same image; other shapes are refused.
    let half = latents
        .squeeze(0)
        .expect("squeeze")
        .to_dtype(DType::F16)
        .expect("f16");
    assert_eq!(
        latent_to_rgb(&half, LatentFormat::Sd).expect("preview"),
        img
    );
    let three = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).expect("zeros");
    assert!(matches!(
        latent_to_rgb(&three, LatentFormat::Sd),
        Err(Error::InvalidParameter(_))
    ));
    // Extreme values clamp.
    let big =
        (Tensor::ones((4, 1, 1), DType::F32, &Device::Cpu).expect("ones") * 100.0).expect("scale");
    assert_eq!(
        latent_to_rgb(&big, LatentFormat::Sd)
            .expect("preview")
            .pixels,
        [255, 255, 255]
    );
}

#[test]
fn taesd_matches_diffusers_autoencoder_tiny() {
    let sets = std::iter::once(None).chain(KernelPath::available_paths().into_iter().map(Some));
    for kernels in sets {
        let decoder = with_kernels(kernels, || TinyDecoder::load(&fixture_dir(), &Device::Cpu))
            .expect("load");
        check_taesd(&decoder);
    }
}

fn check_taesd(decoder: &TinyDecoder) {
    assert_eq!(decoder.config().num_blocks, [3, 2, 1, 1]);
    assert_eq!(decoder.config().block_out_channels, [8, 8, 8, 8]);
    assert_eq!(decoder.config().layout, TaesdLayout::Diffusers);
    let (latents, decoded) = expected();
    let ours = decoder.decode(&latents).expect("decode");
    assert_eq!(ours.dims(), &[1, 3, 32, 32]);
    // diffusers returns 2x − 1; Studio returns x in [0, 1].
    let theirs = ((decoded + 1.0).expect("add") / 2.0)
        .expect("div")
        .clamp(0f32, 1f32)
        .expect("clamp");
    let diff = max_abs_diff(&ours, &theirs);
    assert!(diff < 1e-4, "max difference {diff}");

    // (C, h, w) input, and the image: 8× the latent size.
    let again = decoder
        .decode(&latents.squeeze(0).expect("squeeze"))
        .expect("decode");
    assert!(max_abs_diff(&again, &ours) < 1e-6);
    let img = decoder.decode_to_image(&latents).expect("image");
    assert_eq!((img.width, img.height), (32, 32));
    assert_eq!(
        img,
        tensor_to_image(&((ours * 2.0).expect("mul") - 1.0).expect("sub")).expect("img")
    );

    // Wrong channel count.
    let wrong = Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).expect("zeros");
    assert!(matches!(
        decoder.decode(&wrong),
        Err(Error::InvalidParameter(_))
    ));
}

#[test]
fn taesd_loads_from_both_published_layouts() {
    let (latents, _) = expected();
    let reference = TinyDecoder::load(&fixture_dir(), &Device::Cpu)
        .expect("load")
        .decode(&latents)
        .expect("decode");

    let dir = tempfile::tempdir().expect("tempdir");
    // madebyollin's layout, as a file: the shape is read from the tensors (no config.json).
    let file = dir.path().join("taesd_decoder.safetensors");
    candle_core::safetensors::save(&original_layout(&fixture_tensors()), &file).expect("save");
    let from_file = TinyDecoder::load(&file, &Device::Cpu).expect("load file");
    assert_eq!(from_file.config().layout, TaesdLayout::Original);
    assert_eq!(from_file.config().num_blocks, [3, 2, 1, 1]);
    assert_eq!(from_file.config().block_out_channels, [8, 8, 8, 8]);
    assert_eq!(from_file.config().latent_channels, 4);
    let out = from_file.decode(&latents).expect("decode");
    assert!(max_abs_diff(&out, &reference) < 1e-6);
    // … and as a folder holding that file.
    let from_dir = TinyDecoder::load(dir.path(), &Device::Cpu).expect("load folder");
    assert!(max_abs_diff(&from_dir.decode(&latents).expect("decode"), &reference) < 1e-6);

    // The same names under ComfyUI's `taesd_decoder.` prefix; a missing tensor is named as
    // the file names it.
    let mut prefixed: HashMap<String, Tensor> = original_layout(&fixture_tensors())
        .into_iter()
        .map(|(k, v)| (format!("taesd_decoder.{k}"), v))
        .collect();
    let comfy = dir.path().join("comfy_taesd.safetensors");
    candle_core::safetensors::save(&prefixed, &comfy).expect("save");
    let from_comfy = TinyDecoder::load(&comfy, &Device::Cpu).expect("load prefixed");
    assert!(max_abs_diff(&from_comfy.decode(&latents).expect("decode"), &reference) < 1e-6);
    prefixed
        .remove("taesd_decoder.4.conv.0.bias")
        .expect("present");
    candle_core::safetensors::save(&prefixed, &comfy).expect("save");
    assert!(matches!(
        TinyDecoder::load(&comfy, &Device::Cpu),
        Err(Error::MissingTensor { name, .. }) if name == "taesd_decoder.4.conv.0.bias"
    ));

    // The diffusers safetensors file on its own (config.json beside it is read).
    let from_weights = TinyDecoder::load(
        &fixture_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("load weights file");
    assert_eq!(from_weights.config().num_blocks, [3, 2, 1, 1]);
    assert!(max_abs_diff(&from_weights.decode(&latents).expect("decode"), &reference) < 1e-6);
}

/// madebyollin's `taesd_decoder.pth` (a `torch.save` pickle) loads, read as data, and decodes
/// as the same weights in safetensors do.
#[test]
fn taesd_loads_from_a_pytorch_pickle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("taesd");
    std::fs::create_dir_all(&folder).expect("dir");
    let pth = folder.join("taesd_decoder.pth");
    studio_tests::torch_writer::save_torch(&original_layout(&fixture_tensors()), false, &pth);
    let (latents, _) = expected();
    let reference = TinyDecoder::load(&fixture_dir(), &Device::Cpu)
        .expect("load")
        .decode(&latents)
        .expect("decode");
    for path in [&pth, &folder] {
        let decoder = TinyDecoder::load(path, &Device::Cpu).expect("load the pickle");
        assert_eq!(decoder.config().layout, TaesdLayout::Original);
        let out = decoder.decode(&latents).expect("decode");
        assert!(max_abs_diff(&out, &reference) < 1e-6);
    }
}

#[test]
fn a_random_tiny_decoder_saves_and_loads() {
    let config = TinyDecoderConfig {
        latent_channels: 4,
        out_channels: 3,
        block_out_channels: vec![6, 6, 6],
        num_blocks: vec![1, 2, 1],
        upsampling_scaling_factor: 2,
        layout: TaesdLayout::Original,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let built = TinyDecoder::new(&vb, config.clone()).expect("build");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("taesd_decoder.safetensors");
    varmap.save(&file).expect("save");
    let names: Vec<String> = varmap
        .data()
        .lock()
        .expect("lock")
        .keys()
        .cloned()
        .collect();
    assert!(names.contains(&"1.weight".to_owned()), "{names:?}");
    assert!(names.contains(&"3.conv.4.bias".to_owned()), "{names:?}");

    let loaded = TinyDecoder::load(&file, &Device::Cpu).expect("load");
    assert_eq!(loaded.config(), &config);
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &Device::Cpu).expect("randn");
    let a = built.decode(&latents).expect("decode");
    // Two upsamplings: ×4.
    assert_eq!(a.dims(), &[2, 3, 12, 20]);
    let b = loaded.decode(&latents).expect("decode");
    assert!(max_abs_diff(&a, &b) < 1e-6);
    let v = a
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    // diffusers folder (with config.json) missing one block convolution.
    let mut tensors = fixture_tensors();
    tensors
        .remove("decoder.layers.3.conv.2.weight")
        .expect("present");
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).expect("save");
    match TinyDecoder::load(dir.path(), &Device::Cpu) {
        Err(Error::MissingTensor { path, name }) => {
            assert_eq!(name, "decoder.layers.3.conv.2.weight");
            assert_eq!(path, weights);
        }
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }

    // madebyollin's file missing the last convolution's bias.
    let mut original = original_layout(&fixture_tensors());
    let last = original
        .keys()
        .filter(|k| k.rsplit('.').next() == Some("bias"))
        .map(|k| {
            k.split('.')
                .next()
                .expect("index")
                .parse::<usize>()
                .expect("n")
        })
        .max()
        .expect("biases");
    original.remove(&format!("{last}.bias")).expect("present");
    let file = dir.path().join("taesdxl_decoder.safetensors");
    candle_core::safetensors::save(&original, &file).expect("save");
    let err = TinyDecoder::load(&file, &Device::Cpu)
        .err()
        .expect("an error");
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if *name == format!("{last}.bias")),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("`{last}.bias`")), "{err}");
}

#[test]
fn broken_pickles_and_wrong_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pth = dir.path().join("taesd_decoder.pth");
    std::fs::write(&pth, b"\x80\x02 not a pickle at all").expect("write");
    assert!(matches!(
        TinyDecoder::load(&pth, &Device::Cpu),
        Err(Error::CorruptWeights { path, .. }) if path == pth
    ));
    // A folder with only that file.
    assert!(matches!(
        TinyDecoder::load(dir.path(), &Device::Cpu),
        Err(Error::CorruptWeights { path, .. }) if path == pth
    ));
    let missing = dir.path().join("nothing-here");
    assert!(matches!(
        TinyDecoder::load(&missing, &Device::Cpu),
        Err(Error::NotFound(_))
    ));
    // A safetensors file of something else.
    let other = dir.path().join("other.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "model.weight".to_owned(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("zeros"),
    );
    candle_core::safetensors::save(&t, &other).expect("save");
    let err = TinyDecoder::load(&other, &Device::Cpu)
        .err()
        .expect("an error");
    assert!(err.to_string().contains("not a TAESD decoder"), "{err}");
    // A truncated file.
    let bad = dir.path().join("taesd_decoder.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00").expect("write");
    assert!(matches!(
        TinyDecoder::load(&bad, &Device::Cpu),
        Err(Error::CorruptWeights { .. })
    ));
}
