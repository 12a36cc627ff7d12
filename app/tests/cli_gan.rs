//! `studio gan`, `gan-interp` and `bench gan` as a script would run them: the real binary on a
//! tiny random-weight StyleGAN2 written by the test in NVIDIA's naming.

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::AnimationDecoder;
use studio_inference::diffusion::imaging::{RgbImage, decode_image_file};
use studio_inference::gan::latent::LatentText;
use studio_inference::gan::{NoiseMode, StyleGan2, npy};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

mod cli_common;
use cli_common::{failed, ok, path, studio};

fn model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-g.safetensors");
    write_stylegan2(&p, TinyStyleGan2::default(), 11, false);
    p
}

fn read(p: &Path) -> (RgbImage, Option<String>) {
    let d = decode_image_file(p).expect("decode png");
    (d.image, d.parameters)
}

#[test]
fn gan_seed_writes_a_deterministic_png_with_its_latent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    for out in [&a, &b] {
        let stdout = ok(&studio(&[
            "gan",
            "--model",
            path(&m),
            "--seed",
            "42",
            "--psi",
            "0.7",
            "--trunc-cutoff",
            "4",
            "--noise-mode",
            "const",
            "--out",
            path(out),
        ]));
        assert!(stdout.contains("saved"), "{stdout}");
    }
    assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
    let (img, text) = read(&a);
    assert_eq!((img.width, img.height), (32, 32));
    let text = LatentText::parse(&text.expect("text chunk")).expect("latent text");
    assert_eq!(text.source, "seed 42");
    assert!((text.psi - 0.7).abs() < 1e-12);
    assert_eq!(text.cutoff, Some(4));
    assert_eq!(text.noise, NoiseMode::Const);
    assert_eq!(text.model, "tiny-g.safetensors");

    // The same latent through the library gives the same pixels.
    let gan = StyleGan2::load(&m, &Device::Cpu).expect("load");
    let ws = gan
        .map(&gan.z_from_seed(42).expect("z"), None, 0.7, Some(4))
        .expect("map");
    let expected =
        studio_inference::gan::latent::render(&gan, &ws, NoiseMode::Const).expect("render");
    assert_eq!(img.pixels, expected.pixels);

    // Another seed and random noise differ.
    let c = tmp.path().join("c.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "43",
        "--noise-mode",
        "random",
        "--noise-seed",
        "5",
        "--out",
        path(&c),
    ]));
    let (other, text) = read(&c);
    assert_ne!(other.pixels, img.pixels);
    let text = LatentText::parse(&text.expect("text")).expect("latent text");
    assert_eq!(text.noise, NoiseMode::Random { seed: 5 });
}

#[test]
fn w_and_z_files_reproduce_a_seed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    let seed_png = tmp.path().join("seed.png");
    let w = tmp.path().join("w.npy");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "5",
        "--psi",
        "0.5",
        "--out-w",
        path(&w),
        "--out",
        path(&seed_png),
    ]));
    let from_w = tmp.path().join("from-w.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--w-file",
        path(&w),
        "--out",
        path(&from_w),
    ]));
    let (seed_img, _) = read(&seed_png);
    let (w_img, text) = read(&from_w);
    assert_eq!(seed_img.pixels, w_img.pixels);
    assert_eq!(
        LatentText::parse(&text.expect("text"))
            .expect("parse")
            .source,
        "w-file w.npy"
    );

    // A z saved with numpy's layout, (z_dim,), at ψ 0.5 gives the same image.
    let gan = StyleGan2::load(&m, &Device::Cpu).expect("load");
    let z = tmp.path().join("z.npy");
    npy::write_tensor(
        &z,
        &gan.z_from_seed(5).expect("z").squeeze(0).expect("squeeze"),
    )
    .expect("write z");
    let from_z = tmp.path().join("from-z.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--z-file",
        path(&z),
        "--psi",
        "0.5",
        "--out",
        path(&from_z),
    ]));
    assert_eq!(read(&from_z).0.pixels, seed_img.pixels);

    // A fractional seed differs from both neighbours; a whole one written with a fraction
    // of zero does not.
    let frac = tmp.path().join("frac.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "5.5",
        "--psi",
        "0.5",
        "--out",
        path(&frac),
    ]));
    let (f, text) = read(&frac);
    assert_ne!(f.pixels, seed_img.pixels);
    assert_eq!(
        LatentText::parse(&text.expect("text"))
            .expect("parse")
            .source,
        "seed 5+0.5"
    );
}

fn seed_png(m: &Path, dir: &Path, seed: u64) -> RgbImage {
    let out = dir.join(format!("seed-{seed}.png"));
    ok(&studio(&[
        "gan",
        "--model",
        path(m),
        "--seed",
        &seed.to_string(),
        "--out",
        path(&out),
    ]));
    read(&out).0
}

/// One of NVIDIA's network pickles renders as it is (read as data: the code it carries never
/// runs), the same image as its conversion; `studio convert` writes the conversion and the
/// network's settings beside it.
#[test]
fn an_nvidia_pkl_renders_as_its_conversion() {
    let tmp = tempfile::tempdir().expect("tmp");
    let canary = Path::new("/tmp/studio-pickle-canary-nvidia");
    let _ = std::fs::remove_file(canary);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stylegan2");
    let pkl = tmp.path().join("skip.pkl");
    std::fs::copy(fixtures.join("skip.pkl"), &pkl).expect("copy");
    let converted = tmp.path().join("converted.safetensors");
    let said = ok(&studio(&["convert", path(&pkl), path(&converted)]));
    assert!(said.contains("converted.json"), "{said}");
    let from_pickle = seed_png(&pkl, tmp.path(), 5);
    let from_conversion = seed_png(&converted, tmp.path(), 5);
    let from_fixture = seed_png(&fixtures.join("skip.safetensors"), tmp.path(), 5);
    assert_eq!(from_pickle, from_conversion);
    assert_eq!(from_pickle, from_fixture);
    assert!(!canary.exists(), "the pickle's code ran");
}

#[test]
fn gan_interp_writes_a_gif_and_a_png_sequence_starting_and_ending_on_the_seeds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    let first = seed_png(&m, tmp.path(), 1);
    let last = seed_png(&m, tmp.path(), 7);

    let gif = tmp.path().join("anim.gif");
    let out = studio(&[
        "gan-interp",
        "--model",
        path(&m),
        "--seeds",
        "1,7",
        "--frames",
        "5",
        "--fps",
        "10",
        "--out",
        path(&gif),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("5 frames"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("frame 5/5"),
        "progress on stderr"
    );
    let file = std::io::BufReader::new(std::fs::File::open(&gif).expect("open gif"));
    let frames = image::codecs::gif::GifDecoder::new(file)
        .expect("gif decoder")
        .into_frames()
        .collect_frames()
        .expect("frames");
    assert_eq!(frames.len(), 5);
    let (num, den) = frames[0].delay().numer_denom_ms();
    assert_eq!(num / den, 100);
    // The first frame is seed 1 within GIF palette error.
    let f0 = frames[0].buffer();
    assert_eq!(f0.dimensions(), (32, 32));
    let mean_diff = |img: &RgbImage| {
        let mut total = 0u64;
        for (px, rgb) in f0.pixels().zip(img.pixels.chunks_exact(3)) {
            for (x, y) in px.0.iter().zip(rgb) {
                total += u64::from(x.abs_diff(*y));
            }
        }
        total as f64 / (32.0 * 32.0 * 3.0)
    };
    let (to_first, to_last) = (mean_diff(&first), mean_diff(&last));
    assert!(
        to_first < 12.0 && to_first < 0.5 * to_last,
        "first frame: {to_first} from seed 1, {to_last} from seed 7 on average"
    );

    // PNG sequence, in Z: exact endpoints.
    let seq = tmp.path().join("frames");
    ok(&studio(&[
        "gan-interp",
        "--model",
        path(&m),
        "--seeds",
        "1,7",
        "--frames",
        "4",
        "--space",
        "z",
        "--png-sequence",
        "--out",
        path(&seq),
    ]));
    let mut names: Vec<String> = std::fs::read_dir(&seq)
        .expect("frames dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "frame-0001.png",
            "frame-0002.png",
            "frame-0003.png",
            "frame-0004.png"
        ]
    );
    let (f1, text) = read(&seq.join("frame-0001.png"));
    assert_eq!(f1.pixels, first.pixels);
    assert!(
        LatentText::parse(&text.expect("text"))
            .expect("parse")
            .source
            .starts_with("interpolation 1,7 z 1/4")
    );
    assert_eq!(read(&seq.join("frame-0004.png")).0.pixels, last.pixels);
    assert_ne!(read(&seq.join("frame-0002.png")).0.pixels, first.pixels);
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    let out = tmp.path().join("o.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["gan", "--model", path(&m), "--out", path(&out)];
        args.extend_from_slice(extra);
        failed(&studio(&args))
    };
    let e = run(&["--seed", "4294967296"]);
    assert!(e.contains("too large") && e.contains("4294967295"), "{e}");
    let e = run(&["--seed", "1", "--w-file", "w.npy"]);
    assert!(e.contains("exactly one"), "{e}");
    let e = run(&[]);
    assert!(e.contains("exactly one"), "{e}");
    let e = run(&["--seed", "1", "--class", "2"]);
    assert!(e.contains("not class-conditional"), "{e}");
    let e = run(&["--seed", "1", "--noise-mode", "loud"]);
    assert!(e.contains("noise mode"), "{e}");
    let e = run(&["--z-file", path(&tmp.path().join("nope.npy"))]);
    assert!(e.contains("nope.npy"), "{e}");
    assert!(!out.exists());

    let missing = tmp.path().join("missing.safetensors");
    let e = failed(&studio(&[
        "gan",
        "--model",
        path(&missing),
        "--seed",
        "1",
        "--out",
        path(&out),
    ]));
    assert!(
        e.contains("missing.safetensors") && e.contains("no such file"),
        "{e}"
    );

    let pkl = tmp.path().join("network.pkl");
    std::fs::write(&pkl, b"\x80\x04\x95 not really a pickle").expect("write pkl");
    let e = failed(&studio(&[
        "gan",
        "--model",
        path(&pkl),
        "--seed",
        "1",
        "--out",
        path(&out),
    ]));
    assert!(e.contains("network.pkl") && e.contains("corrupt"), "{e}");

    // Outputs under a regular file cannot be written.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let bad = file.join("out.png");
    let e = failed(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "1",
        "--out",
        path(&bad),
    ]));
    assert!(e.contains("cannot write") && e.contains("out.png"), "{e}");
    let bad_gif = file.join("anim.gif");
    let e = failed(&studio(&[
        "gan-interp",
        "--model",
        path(&m),
        "--seeds",
        "1,2",
        "--frames",
        "2",
        "--out",
        path(&bad_gif),
    ]));
    assert!(e.contains("cannot write") && e.contains("anim.gif"), "{e}");
    let e = failed(&studio(&[
        "gan-interp",
        "--model",
        path(&m),
        "--seeds",
        "1,99999999999",
        "--out",
        path(&tmp.path().join("x.gif")),
    ]));
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn bench_gan_prints_json_per_size() {
    let out = studio(&["bench", "gan", "--size", "8", "--frames", "1", "--json"]);
    let stdout = ok(&out);
    let row: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(row["size"], 8);
    assert!(row["frame_ms"].as_f64().expect("frame_ms") > 0.0);
    assert!(row["mapping_ms"].as_f64().expect("mapping_ms") >= 0.0);
    assert!(row["peak_rss_mb"].as_f64().expect("peak_rss_mb") > 0.0);
    // x86-64 CPUs run Studio's own kernels; others candle's ops.
    let kernels = row["kernels"].as_str().expect("kernels");
    if cfg!(target_arch = "x86_64") {
        assert_ne!(kernels, "candle");
    } else {
        assert_eq!(kernels, "candle");
    }
}

/// Runs `studio gan-project` on `model` and `image` for `steps`, writing into `dir`, plus
/// `extra` flags.
fn gan_project(
    model: &Path,
    image: &Path,
    steps: &str,
    dir: &Path,
    extra: &[&str],
) -> std::process::Output {
    let (out, out_w) = (dir.join("proj.png"), dir.join("proj_w.npy"));
    let mut args = vec![
        "gan-project",
        "--model",
        path(model),
        "--image",
        path(image),
        "--steps",
        steps,
        "--out-w",
        path(&out_w),
        "--out",
        path(&out),
    ];
    args.extend_from_slice(extra);
    studio(&args)
}

/// `gan-project` finds a latent for a photo: a non-square photo of another size is cropped and
/// resized (and says so), the loss falls, and the written ws load back with `gan --w-file`.
#[test]
fn gan_project_crops_the_photo_lowers_the_loss_and_writes_reusable_ws() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    // The target: the generator's own seed-3 image, padded to a non-square 40x32 photo.
    let seed3 = tmp.path().join("seed3.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "3",
        "--out",
        path(&seed3),
    ]));
    let (img, _) = read(&seed3);
    let mut wide = RgbImage::new_filled(img.width + 8, img.height, [128, 128, 128]);
    for y in 0..img.height as usize {
        let src = &img.pixels[y * img.width as usize * 3..(y + 1) * img.width as usize * 3];
        let start = (y * wide.width as usize + 4) * 3;
        wide.pixels[start..start + src.len()].copy_from_slice(src);
    }
    let photo = tmp.path().join("photo.png");
    std::fs::write(
        &photo,
        studio_inference::diffusion::imaging::encode_png(&wide, None).expect("png"),
    )
    .expect("write photo");
    let (out, out_w) = (tmp.path().join("proj.png"), tmp.path().join("proj_w.npy"));
    let run = gan_project(&m, &photo, "40", tmp.path(), &[]);
    let stdout = ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("cropped 40x32"), "{stderr}");
    let losses: Vec<f32> = stdout
        .split("loss ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("loss in the summary")
        .split(" -> ")
        .map(|v| v.trim().parse().expect("a number"))
        .collect();
    assert!(losses[1] < losses[0], "the loss falls: {losses:?}");
    let (recon, text) = read(&out);
    assert_eq!((recon.width, recon.height), (img.width, img.height));
    assert!(text.expect("latent text").contains("projection of photo"));
    // The ws load back and render (const noise, not the projection's own noise buffers).
    let again = tmp.path().join("again.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--w-file",
        path(&out_w),
        "--out",
        path(&again),
    ]));
    let e = failed(&gan_project(&m, &m, "2", tmp.path(), &[]));
    assert!(e.contains("not an image"), "{e}");
}

/// With VGG16 weights beside the model (or given with `--vgg16`) `gan-project` minimizes the
/// perceptual distance instead; missing or pickled weights are refused before any step.
#[test]
fn gan_project_uses_vgg16_weights_beside_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model(tmp.path());
    let photo = tmp.path().join("seed5.png");
    ok(&studio(&[
        "gan",
        "--model",
        path(&m),
        "--seed",
        "5",
        "--out",
        path(&photo),
    ]));
    let project = |extra: &[&str]| gan_project(&m, &photo, "40", tmp.path(), extra);
    let pixel = project(&[]);
    ok(&pixel);
    assert!(String::from_utf8_lossy(&pixel.stderr).contains("pixel + multi-scale SSIM"));
    studio_tests::vgg::write_vgg16(
        &tmp.path().join("vgg16.safetensors"),
        [4, 8, 16, 16, 16],
        true,
        3,
    );
    let run = project(&[]);
    let stdout = ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("VGG16 perceptual distance"), "{stderr}");
    assert!(stderr.contains("vgg16.safetensors"), "{stderr}");
    assert!(stdout.contains("saved"), "{stdout}");
    // The per-step losses on stderr fall on average (single steps are noisy: W gets noise).
    let losses: Vec<f32> = stderr
        .lines()
        .filter_map(|l| l.split(": loss ").nth(1))
        .map(|v| v.trim().parse().expect("a number"))
        .collect();
    assert!(losses.len() >= 10, "{stderr}");
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(last < first, "the loss falls on average: {losses:?}");
    let e = failed(&project(&[
        "--vgg16",
        path(&tmp.path().join("none.safetensors")),
    ]));
    assert!(e.contains("none.safetensors"), "{e}");
    let pth = tmp.path().join("vgg16.pth");
    std::fs::write(&pth, b"not a checkpoint").expect("write");
    let e = failed(&project(&["--vgg16", path(&pth)]));
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
}

/// `gan` also runs DCGAN generators (PyTorch's example naming): seed 7 gives PyTorch's image
/// for numpy's seed-7 latent (the committed parity fixture), and W-space flags are refused.
#[test]
fn gan_runs_a_dcgan_generator_from_a_seed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dcgan");
    let model = fixtures.join("generator.safetensors");
    let out = tmp.path().join("dcgan.png");
    let stdout = ok(&studio(&[
        "gan",
        "--model",
        path(&model),
        "--seed",
        "7",
        "--out",
        path(&out),
    ]));
    assert!(stdout.contains("32x32, seed 7"), "{stdout}");
    let (img, text) = read(&out);
    assert_eq!(
        text.as_deref(),
        Some("DCGAN latent: seed 7; model generator.safetensors")
    );
    let expected =
        candle_core::safetensors::load(fixtures.join("expected.safetensors"), &Device::Cpu)
            .expect("fixture");
    let want = studio_inference::diffusion::imaging::tensor_to_image(&expected["image_seed7"])
        .expect("image");
    let worst = img
        .pixels
        .iter()
        .zip(&want.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "differs from PyTorch's image by {worst}");
    let e = failed(&studio(&[
        "gan",
        "--model",
        path(&model),
        "--w-file",
        path(&out),
        "--out",
        path(&out),
    ]));
    assert!(e.contains("no W space"), "{e}");
}
