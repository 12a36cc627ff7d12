//! `studio txt2img`, `img2img` and `inpaint` as a script would run them: the real binary on a
//! tiny random-weight SD model written by the test, in both file layouts.

use std::path::Path;

use studio_inference::diffusion::imaging::{RgbImage, decode_image_file, encode_png};
use studio_inference::image_meta::GenerationParameters;
use studio_tests::sd::{TinyKind, TinySd, write_tiny_sd};

mod cli_common;
use cli_common::{failed, ok, path, studio};

fn write_png(path: &Path, img: &RgbImage) {
    std::fs::write(path, encode_png(img, None).expect("png")).expect("write png");
}

fn parameters(path: &Path) -> GenerationParameters {
    let decoded = decode_image_file(path).expect("read output");
    GenerationParameters::parse(&decoded.parameters.expect("parameters chunk"))
}

#[test]
fn txt2img_writes_a_png_other_sd_tools_can_read_and_previews_per_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let out_png = tmp.path().join("out.png");
    let previews = tmp.path().join("previews");
    let stdout = ok(&studio(&[
        "txt2img",
        "--model",
        path(&model),
        "--prompt",
        "a red cat, sitting: on a mat",
        "--negative",
        "blurry",
        "--steps",
        "3",
        "--cfg",
        "5.5",
        "--seed",
        "1234",
        "--sampler",
        "DPM++ 2M Karras",
        "--width",
        "48",
        "--height",
        "32",
        "--preview",
        "latent2rgb",
        "--previews-dir",
        path(&previews),
        "--out",
        path(&out_png),
    ]));
    assert!(stdout.contains("seed 1234"), "{stdout}");
    let img = decode_image_file(&out_png).expect("output png");
    assert_eq!((img.image.width, img.image.height), (48, 32));
    let p = parameters(&out_png);
    assert_eq!(p.prompt, "a red cat, sitting: on a mat");
    assert_eq!(p.negative_prompt, "blurry");
    assert_eq!(p.seed(), Some(1234));
    assert_eq!(p.steps(), Some(3));
    assert_eq!(p.cfg_scale(), Some(5.5));
    assert_eq!(p.get("Sampler"), Some("DPM++ 2M"));
    assert_eq!(p.get("Schedule type"), Some("Karras"));
    assert_eq!(p.size(), Some((48, 32)));
    assert_eq!(p.get("RNG"), Some("Studio"));
    let mut steps: Vec<String> = std::fs::read_dir(&previews)
        .expect("previews dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    steps.sort();
    assert_eq!(steps, ["step-001.png", "step-002.png", "step-003.png"]);
    let first = decode_image_file(&previews.join("step-001.png")).expect("preview png");
    assert_eq!((first.image.width, first.image.height), (6, 4));
}

#[test]
fn img2img_and_inpaint_start_from_an_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let init = tmp.path().join("init.png");
    let pixels = (0..32 * 32)
        .flat_map(|i| [(i % 32 * 8) as u8, (i / 32 * 8) as u8, 90])
        .collect();
    let init_img = RgbImage {
        width: 32,
        height: 32,
        pixels,
    };
    write_png(&init, &init_img);
    let out = tmp.path().join("img2img.png");
    ok(&studio(&[
        "img2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--steps",
        "4",
        "--init",
        path(&init),
        "--strength",
        "0.5",
        "--seed",
        "1",
        "--out",
        path(&out),
    ]));
    let p = parameters(&out);
    assert_eq!(p.get("Denoising strength"), Some("0.5"));
    assert_eq!(p.size(), Some((32, 32)), "size taken from the init image");

    // Inpaint the right half (white = repaint), with a mask of another size.
    let mask = tmp.path().join("mask.png");
    let mask_pixels = (0..16 * 16)
        .flat_map(|i| if i % 16 >= 8 { [255u8; 3] } else { [0u8; 3] })
        .collect();
    write_png(
        &mask,
        &RgbImage {
            width: 16,
            height: 16,
            pixels: mask_pixels,
        },
    );
    let out = tmp.path().join("inpaint.png");
    ok(&studio(&[
        "inpaint",
        "--model",
        path(&model),
        "--prompt",
        "dog",
        "--steps",
        "3",
        "--init",
        path(&init),
        "--mask",
        path(&mask),
        "--mask-blur",
        "0",
        "--seed",
        "2",
        "--out",
        path(&out),
    ]));
    let got = decode_image_file(&out).expect("inpaint output").image;
    for y in 0..32usize {
        for x in 0..12usize {
            let i = (y * 32 + x) * 3;
            assert_eq!(
                got.pixels[i..i + 3],
                init_img.pixels[i..i + 3],
                "kept {x},{y}"
            );
        }
    }
    assert_eq!(parameters(&out).get("Mask blur"), Some("0"));
}

#[test]
fn image_errors_are_clear_and_exit_non_zero() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let out = tmp.path().join("out.png");
    let base = |extra: &[&str]| {
        let mut args = vec![
            "txt2img",
            "--model",
            path(&model),
            "--prompt",
            "cat",
            "--steps",
            "1",
            "--out",
            path(&out),
        ];
        args.extend_from_slice(extra);
        studio(&args)
    };
    let e = failed(&base(&["--sampler", "Heun++"]));
    assert!(
        e.contains("unknown sampler") && e.contains("Euler a"),
        "{e}"
    );
    let e = failed(&base(&["--width", "50", "--height", "64"]));
    assert!(e.contains("multiples of 8"), "{e}");
    let e = failed(&base(&["--noise-source", "gpu"]));
    assert!(e.contains("unknown noise source `gpu`"), "{e}");
    let e = failed(&base(&["--variation-strength", "0.5"]));
    assert!(
        e.contains("--variation-strength needs --variation-seed"),
        "{e}"
    );
    let e = failed(&base(&[
        "--variation-seed",
        "1",
        "--variation-strength",
        "2",
    ]));
    assert!(e.contains("--variation-strength"), "{e}");
    let e = failed(&base(&[
        "--preview",
        "taesd",
        "--previews-dir",
        path(tmp.path()),
    ]));
    assert!(e.contains("--taesd"), "{e}");
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"pickle").expect("write");
    let e = failed(&studio(&[
        "txt2img",
        "--model",
        path(&ckpt),
        "--prompt",
        "cat",
        "--out",
        path(&out),
    ]));
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "not an image").expect("write");
    let e = failed(&studio(&[
        "img2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--init",
        path(&text),
        "--out",
        path(&out),
    ]));
    assert!(e.contains("not an image"), "{e}");
    assert!(!out.exists(), "nothing written on failure");
}

/// An original SD checkpoint saved by PyTorch (`.ckpt`) is read as data and gives the image its
/// safetensors twin gives; `studio convert` writes that twin from it.
#[test]
fn txt2img_reads_a_ckpt_as_its_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (file, ckpt) = studio_tests::ldm::write_tiny_sd1_checkpoints(tmp.path());
    let run = |model: &Path, out: &Path| {
        ok(&studio(&[
            "txt2img",
            "--model",
            path(model),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            "7",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            path(out),
        ]));
        decode_image_file(out).expect("png").image
    };
    let from_ckpt = run(&ckpt, &tmp.path().join("ckpt.png"));
    let from_file = run(&file, &tmp.path().join("file.png"));
    assert_eq!(from_ckpt, from_file);
    let converted = tmp.path().join("converted.safetensors");
    ok(&studio(&["convert", path(&ckpt), path(&converted)]));
    assert_eq!(
        run(&converted, &tmp.path().join("converted.png")),
        from_file
    );
}

/// `--lora FILE:WEIGHT` merges a LoRA as the model loads and says what it changed and what it
/// ignored (this file is for another UNet of other sizes, so nothing applies).
#[test]
fn txt2img_reports_what_a_lora_changed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let lora =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora/kohya.safetensors");
    let out = studio(&[
        "txt2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--lora",
        &format!("{}:0.5", path(&lora)),
        "--out",
        path(&tmp.path().join("out.png")),
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LoRA kohya: "), "{stderr}");
    assert!(stderr.contains("0 modules changed, 7 ignored"), "{stderr}");
    assert!(stderr.contains("(another size)"), "{stderr}");
    assert!(stderr.contains("made for another base model"), "{stderr}");
    let e = failed(&studio(&[
        "txt2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--lora",
        &format!("{}:50", path(&lora)),
        "--out",
        path(&tmp.path().join("out.png")),
    ]));
    assert!(e.contains("a weight of 50"), "{e}");
}

/// `--noise-source cpu` and a variation seed are written as the SD web UI writes them.
#[test]
fn txt2img_takes_pytorch_cpu_noise_and_a_variation_seed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let out_png = tmp.path().join("out.png");
    ok(&studio(&[
        "txt2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--steps",
        "2",
        "--seed",
        "5",
        "--width",
        "32",
        "--height",
        "32",
        "--noise-source",
        "cpu",
        "--variation-seed",
        "11",
        "--variation-strength",
        "0.2",
        "--out",
        path(&out_png),
    ]));
    let p = parameters(&out_png);
    assert_eq!(p.get("RNG"), Some("CPU"));
    assert_eq!(p.get("Variation seed"), Some("11"));
    assert_eq!(p.get("Variation seed strength"), Some("0.2"));
}

/// `studio upscale` runs an RRDBNet (and a SwinIR) in tiles, keeps the input's parameters and adds the SD web
/// UI's postprocessing fields; `--scale` other than the model's resizes its result.
#[test]
fn upscale_runs_an_esrgan_model_and_keeps_the_parameters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/esrgan/rrdb-x2.safetensors");
    let input = tmp.path().join("in.png");
    let img = RgbImage::new_filled(21, 14, [200, 40, 90]);
    std::fs::write(
        &input,
        encode_png(&img, Some("a red cat\nSteps: 20, Seed: 3, Size: 21x14")).expect("png"),
    )
    .expect("write");
    let out = tmp.path().join("out.png");
    let said = ok(&studio(&[
        "upscale",
        "--model",
        path(&model),
        "--in",
        path(&input),
        "--out",
        path(&out),
        "--tile",
        "8",
    ]));
    assert!(said.contains("42x28"), "{said}");
    let p = parameters(&out);
    assert_eq!(p.prompt, "a red cat");
    assert_eq!(p.seed(), Some(3));
    assert_eq!(p.get("Postprocess upscaler"), Some("rrdb-x2"));
    assert_eq!(p.get("Postprocess upscale by"), Some("2"));

    ok(&studio(&[
        "upscale",
        "--model",
        path(&model),
        "--in",
        path(&input),
        "--out",
        path(&out),
        "--scale",
        "3",
    ]));
    let img = decode_image_file(&out).expect("png").image;
    assert_eq!((img.width, img.height), (63, 42));
    assert_eq!(parameters(&out).get("Postprocess upscale by"), Some("3"));

    // A SwinIR (the SD web UI's `SwinIR_4x` kind: real-world, `params_ema` in a `.pth`).
    let swinir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/swinir/swinir-x4-nearest-3conv.pth");
    let said = ok(&studio(&[
        "upscale",
        "--model",
        path(&swinir),
        "--in",
        path(&input),
        "--out",
        path(&out),
        "--tile",
        "8",
    ]));
    assert!(said.contains("84x56"), "{said}");
    assert_eq!(
        parameters(&out).get("Postprocess upscaler"),
        Some("swinir-x4-nearest-3conv")
    );

    // Not an upscaler: the error says what it looks like.
    let sd = tmp.path().join("tiny-sd");
    write_tiny_sd(&sd, TinySd::new(TinyKind::Sd1));
    let e = failed(&studio(&[
        "upscale",
        "--model",
        path(&sd.join("unet/diffusion_pytorch_model.safetensors")),
        "--in",
        path(&input),
        "--out",
        path(&out),
    ]));
    assert!(
        e.contains("not an upscaler Studio runs") && e.contains("a diffusion model"),
        "{e}"
    );
    let e = failed(&studio(&[
        "upscale",
        "--model",
        path(&model),
        "--in",
        path(&input),
        "--out",
        path(&out),
        "--scale",
        "40",
    ]));
    assert!(e.contains("--scale"), "{e}");
}

/// `--inpaint-area masked` repaints the mask's region at the model's size and pastes it back
/// into the image at its own size; the options are written as the SD web UI writes them.
#[test]
fn inpaint_only_masked_keeps_the_image_size_and_names_its_options() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let init = tmp.path().join("init.png");
    write_png(&init, &RgbImage::new_filled(120, 72, [30, 160, 90]));
    let mask = tmp.path().join("mask.png");
    let mut m = RgbImage::new_filled(120, 72, [0, 0, 0]);
    for y in 20..30 {
        for x in 70..84 {
            let i = (y * 120 + x) * 3;
            m.pixels[i..i + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
    write_png(&mask, &m);
    let out = tmp.path().join("out.png");
    let args = |area: &str, content: &str| {
        studio(&[
            "inpaint",
            "--model",
            path(&model),
            "--prompt",
            "cat",
            "--steps",
            "2",
            "--init",
            path(&init),
            "--mask",
            path(&mask),
            "--inpaint-area",
            area,
            "--padding",
            "8",
            "--masked-content",
            content,
            "--out",
            path(&out),
        ])
    };
    ok(&args("masked", "fill"));
    let img = decode_image_file(&out).expect("png").image;
    assert_eq!((img.width, img.height), (120, 72), "the image's own size");
    let p = parameters(&out);
    assert_eq!(p.get("Inpaint area"), Some("Only masked"));
    assert_eq!(p.get("Masked area padding"), Some("8"));
    assert_eq!(p.get("Masked content"), Some("fill"));
    assert!(failed(&args("everything", "fill")).contains("unknown inpaint area"));
    assert!(failed(&args("masked", "noise")).contains("unknown masked content"));
}

/// `--hires-scale` runs txt2img's second pass and writes the web UI's hires fields; img2img
/// refuses it.
#[test]
fn txt2img_runs_the_hires_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let out = tmp.path().join("out.png");
    let esrgan =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/esrgan/rrdb-x2.safetensors");
    ok(&studio(&[
        "txt2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "24",
        "--hires-scale",
        "2",
        "--hires-upscaler",
        path(&esrgan),
        "--hires-denoise",
        "0.6",
        "--out",
        path(&out),
    ]));
    let img = decode_image_file(&out).expect("png").image;
    assert_eq!((img.width, img.height), (64, 48));
    let p = parameters(&out);
    assert_eq!(p.size(), Some((32, 24)));
    assert_eq!(p.get("Hires upscale"), Some("2"));
    assert_eq!(p.get("Hires upscaler"), Some("rrdb-x2"));
    assert_eq!(p.get("Denoising strength"), Some("0.6"));

    let init = tmp.path().join("init.png");
    write_png(&init, &RgbImage::new_filled(32, 32, [1, 2, 3]));
    let e = failed(&studio(&[
        "img2img",
        "--model",
        path(&model),
        "--prompt",
        "cat",
        "--init",
        path(&init),
        "--hires-scale",
        "2",
        "--out",
        path(&out),
    ]));
    assert!(e.contains("--hires-scale is for txt2img"), "{e}");
}

/// `--controlnet MODEL --control-image IMG [--control-weight W]` with a preprocessor: the unit
/// guides the image, the PNG records it as the ControlNet extension does, an image of another
/// size is resized with a note, and mismatched flags are refused.
#[test]
fn txt2img_takes_a_controlnet_unit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let cn = tmp.path().join("tiny-controlnet");
    studio_tests::sd::write_tiny_controlnet(&model, &cn);
    let control = tmp.path().join("shapes.png");
    let mut img = RgbImage::new_filled(48, 40, [250, 250, 250]);
    for y in 10..30 {
        for x in 12..36 {
            let i = (y * 48 + x) * 3;
            img.pixels[i..i + 3].copy_from_slice(&[20, 40, 200]);
        }
    }
    write_png(&control, &img);
    let base = |out: &Path| -> Vec<String> {
        [
            "txt2img",
            "--model",
            path(&model),
            "--prompt",
            "cat",
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            path(out),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let plain = tmp.path().join("plain.png");
    ok(&studio(
        &base(&plain).iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let guided = tmp.path().join("guided.png");
    let mut args = base(&guided);
    args.extend(
        [
            "--controlnet",
            path(&cn),
            "--control-image",
            path(&control),
            "--control-weight",
            "0.9",
            "--control-preprocess",
            "canny",
            "--control-end",
            "0.8",
        ]
        .map(str::to_owned),
    );
    let out = studio(&args.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is 48x40; resized to 32x32"), "{stderr}");
    let p = parameters(&guided);
    let unit = p.get("ControlNet 0").expect("ControlNet 0");
    assert!(
        unit.contains("Module: canny")
            && unit.contains("Model: tiny-controlnet")
            && unit.contains("Weight: 0.9")
            && unit.contains("Guidance End: 0.8"),
        "{unit}"
    );
    assert_ne!(
        decode_image_file(&plain).expect("png").image.pixels,
        decode_image_file(&guided).expect("png").image.pixels
    );

    let mut two_models = base(&tmp.path().join("x.png"));
    two_models.extend(
        [
            "--controlnet",
            path(&cn),
            "--controlnet",
            path(&cn),
            "--control-image",
            path(&control),
        ]
        .map(str::to_owned),
    );
    let e = failed(&studio(
        &two_models.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(e.contains("one image per ControlNet"), "{e}");
    let mut not_a_net = base(&tmp.path().join("y.png"));
    not_a_net.extend(
        [
            "--controlnet",
            path(&control),
            "--control-image",
            path(&control),
        ]
        .map(str::to_owned),
    );
    let e = failed(&studio(
        &not_a_net.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(e.contains("ControlNet"), "{e}");
}

/// `--refiner MODEL --refiner-switch-at X`: the SDXL refiner takes over, says so, and the PNG
/// names it as the SD web UI does.
#[test]
fn txt2img_runs_an_sdxl_refiner() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().join("tiny-sdxl");
    write_tiny_sd(&base, TinySd::new(TinyKind::Sdxl));
    let refiner = tmp.path().join("tiny-refiner");
    write_tiny_sd(&refiner, TinySd::new(TinyKind::SdxlRefiner));
    let out_path = tmp.path().join("out.png");
    let out = studio(&[
        "txt2img",
        "--model",
        path(&base),
        "--refiner",
        path(&refiner),
        "--refiner-switch-at",
        "0.5",
        "--prompt",
        "cat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        path(&out_path),
    ]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("refiner: tiny-refiner"));
    let p = parameters(&out_path);
    assert_eq!(p.get("Refiner"), Some("tiny-refiner"));
    assert_eq!(p.get("Refiner switch at"), Some("0.5"));
}
