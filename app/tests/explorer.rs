//! The Latent Explorer, driven like a person would with `egui_kittest`, on tiny random-weight
//! StyleGAN2 generators written by `studio-tests` in NVIDIA's naming and loaded through the
//! real loader: loading, re-rendering on slider changes, keyframes, the capture PNG's latent
//! round trip, coalesced renders, PCA directions, and what is kept across a restart.

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use studio_app::gui::{AppConfig, Panel, StudioApp};
use studio_inference::diffusion::imaging::decode_image_bytes;
use studio_inference::gan::directions::Directions;
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

mod common;
use common::{control, drop_file, shows_text, step_until};

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    common::harness_sized(&AppConfig::for_tests(home), egui::vec2(1400.0, 1000.0))
}

fn tiny_gan(dir: &Path, cfg: TinyStyleGan2) -> PathBuf {
    let path = dir.join("models").join("tiny-gan.safetensors");
    write_stylegan2(&path, cfg, 7, false);
    path
}

/// Steps until the newest render request has come back, and returns a copy of the image.
fn settled(h: &mut Harness<'_, StudioApp>) -> Vec<u8> {
    step_until(h, "the newest render", |h| {
        let e = h.state().explorer();
        let (newest, shown) = e.request_ids();
        newest > 0 && shown == Some(newest) && e.image().is_some()
    });
    h.state()
        .explorer()
        .image()
        .map(|i| i.pixels.clone())
        .expect("image")
}

fn open_tiny(h: &mut Harness<'_, StudioApp>, path: &Path) -> Vec<u8> {
    common::go_to(h, Panel::LatentExplorer);
    drop_file(h, path);
    step_until(h, "the generator to load", |h| {
        h.state().explorer().model().is_some()
    });
    settled(h)
}

#[test]
fn loading_shows_the_model_and_an_image_and_psi_and_seed_rerender() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    let first = open_tiny(&mut h, &path);
    assert!(shows_text(&h, "tiny-gan.safetensors"));
    assert!(shows_text(&h, "32×32"), "the model's resolution is shown");
    let img = h.state().explorer().image().expect("image").clone();
    assert_eq!((img.width, img.height), (32, 32));
    assert!(shows_text(&h, "render "), "render-ms readout");
    // The seed browser renders thumbnails for consecutive seeds.
    step_until(&mut h, "the seed browser", |h| shows_text(h, "seed 3"));

    h.state_mut().explorer_mut().state_mut().latent.psi = 0.3;
    let after_psi = settled(&mut h);
    assert_ne!(first, after_psi, "moving ψ re-renders a different image");

    h.state_mut().explorer_mut().state_mut().latent.seed = 11;
    let after_seed = settled(&mut h);
    assert_ne!(after_psi, after_seed, "a new seed re-renders");

    // Clicking a thumbnail selects its seed.
    control(&h, "seed 3").click();
    h.step();
    h.step();
    assert_eq!(h.state().explorer().state().latent.seed, 3);
    // The generator is remembered for the next start.
    assert_eq!(h.state().settings().last_gan_model.as_ref(), Some(&path));
}

#[test]
fn keyframes_are_added_listed_reordered_removed_and_kept_across_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    {
        let mut h = harness(tmp.path());
        h.step();
        open_tiny(&mut h, &path);
        h.state_mut().explorer_mut().state_mut().latent.seed = 5;
        h.step();
        control(&h, "Add keyframe").click();
        h.step();
        h.step();
        assert!(shows_text(&h, "1. seed 5"), "the keyframe is listed");
        h.state_mut().explorer_mut().state_mut().latent.seed = 9;
        h.step();
        control(&h, "Add keyframe").click();
        h.step();
        h.step();
        let seeds: Vec<u64> = h
            .state()
            .explorer()
            .state()
            .keyframes
            .iter()
            .map(|k| k.seed)
            .collect();
        assert_eq!(seeds, [5, 9]);
        assert!(shows_text(&h, "2. seed 9"));
        // The first keyframe's Down button moves it after the second.
        control(&h, "Down").click();
        h.step();
        h.step();
        assert!(shows_text(&h, "1. seed 9"), "reordered");
        // Play animates along the path.
        let before = h.state().explorer().render_counts().0;
        control(&h, "Play").click();
        h.step();
        assert!(h.state().explorer().is_playing());
        for _ in 0..10 {
            h.step();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(h.state().explorer().render_counts().0 > before + 3);
        control(&h, "Pause").click();
        h.step();
        assert!(!h.state().explorer().is_playing());
        h.state_mut().flush();
    }
    // Restart: the generator loads again and the keyframes are back.
    let mut h = harness(tmp.path());
    step_until(&mut h, "the generator to load again", |h| {
        h.state().explorer().model().is_some()
    });
    let seeds: Vec<u64> = h
        .state()
        .explorer()
        .state()
        .keyframes
        .iter()
        .map(|k| k.seed)
        .collect();
    assert_eq!(seeds, [9, 5]);
    common::go_to(&mut h, Panel::LatentExplorer);
    control(&h, "Remove").click();
    h.step();
    h.step();
    let seeds: Vec<u64> = h
        .state()
        .explorer()
        .state()
        .keyframes
        .iter()
        .map(|k| k.seed)
        .collect();
    assert_eq!(seeds, [5], "the first keyframe is removed");
    assert!(shows_text(&h, "1. seed 5"));
}

#[test]
fn a_captured_png_carries_its_latent_and_dropping_it_back_restores_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    {
        let s = h.state_mut().explorer_mut().state_mut();
        s.latent.seed = 7;
        s.latent.offset = 0.25;
        s.latent.psi = 0.6;
    }
    let shown = settled(&mut h);
    control(&h, "Capture PNG").click();
    h.step();
    h.step();
    let captures = tmp.path().join("explorer").join("captures");
    step_until(&mut h, "the capture on disk", |_| {
        std::fs::read_dir(&captures).is_ok_and(|mut d| d.next().is_some())
    });
    h.state_mut().flush();
    let png = std::fs::read_dir(&captures)
        .expect("dir")
        .next()
        .expect("file")
        .expect("entry")
        .path();
    let bytes = std::fs::read(&png).expect("read");
    let decoded = image::load_from_memory(&bytes).expect("png").to_rgb8();
    assert_eq!(decoded.as_raw(), &shown, "the capture is the image shown");
    let text = decode_image_bytes(&bytes)
        .expect("decode")
        .parameters
        .unwrap_or_default();
    assert!(text.contains("seed 7+0.25"), "{text}");
    assert!(text.contains("psi 0.6"), "{text}");

    {
        let s = h.state_mut().explorer_mut().state_mut();
        s.latent.seed = 100;
        s.latent.offset = 0.0;
        s.latent.psi = 1.0;
    }
    settled(&mut h);
    drop_file(&mut h, &png);
    let l = &h.state().explorer().state().latent;
    assert_eq!((l.seed, l.offset, l.psi), (7, 0.25, 0.6));
    let restored = settled(&mut h);
    assert_eq!(
        restored, shown,
        "the restored latent renders the same image"
    );
}

#[test]
fn a_burst_of_slider_changes_renders_far_fewer_frames_than_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Big enough that one render takes longer than a frame.
    let cfg = TinyStyleGan2 {
        resolution: 128,
        channel_base: 4096,
        channel_max: 64,
        ..TinyStyleGan2::default()
    };
    let path = tiny_gan(tmp.path(), cfg);
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    let (sent0, shown0) = h.state().explorer().render_counts();
    let renders0 = h.state().gan_renders();
    for i in 0..50 {
        h.state_mut().explorer_mut().state_mut().latent.psi = 0.5 + f64::from(i) * 0.01;
        h.step();
    }
    let last = settled(&mut h);
    let (sent, shown) = h.state().explorer().render_counts();
    let (sent, shown) = (sent - sent0, shown - shown0);
    let renders = h.state().gan_renders() - renders0;
    assert_eq!(sent, 50, "one request per change");
    assert!(
        renders * 2 < sent,
        "the worker rendered {renders} frames for {sent} requests: not coalesced"
    );
    eprintln!("{sent} requests, {renders} renders, {shown} frames shown");
    assert!(
        shown * 2 < sent,
        "{shown} frames rendered for {sent} requests: renders were not coalesced"
    );
    // The last request is what is shown.
    h.state_mut().explorer_mut().state_mut().latent.psi = 0.5 + 49.0 * 0.01;
    assert_eq!(settled(&mut h), last);
}

#[test]
fn pca_directions_are_computed_and_their_sliders_move_the_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    let before = open_tiny(&mut h, &path);
    {
        let s = h.state_mut().explorer_mut().state_mut();
        s.pca_samples = 300;
        s.pca_components = 3;
    }
    control(&h, "Compute directions").click();
    step_until(&mut h, "the directions", |h| {
        h.state().explorer().directions().is_some()
    });
    assert_eq!(
        h.state().explorer().directions().map(Directions::len),
        Some(3)
    );
    h.step();
    assert!(shows_text(&h, "Component 0"));
    assert!(
        tmp.path().join("explorer").join("directions.json").exists(),
        "directions are saved"
    );
    h.state_mut().explorer_mut().state_mut().latent.edits[0].sigma = 3.0;
    let moved = settled(&mut h);
    assert_ne!(before, moved, "a direction slider changes the image");
}

#[test]
fn a_dropped_dcgan_is_refused_with_where_to_run_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dcgan = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/dcgan/generator.safetensors");
    let mut h = harness(tmp.path());
    h.step();
    common::go_to(&mut h, Panel::LatentExplorer);
    drop_file(&mut h, &dcgan);
    step_until(&mut h, "the refusal", |h| {
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("is a DCGAN generator"))
    });
    assert!(
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("studio gan --model")),
        "the notice says how to render it"
    );
    assert!(h.state().explorer().model().is_none());
}

/// One of NVIDIA's network pickles, dropped, loads in safe mode (read as data: the code it
/// carries never runs), renders the image its safetensors conversion renders, and offers
/// *Save as safetensors…*; a broken one is a clear error.
#[test]
fn a_dropped_nvidia_pickle_loads_in_safe_mode() {
    let tmp = tempfile::tempdir().expect("tmp");
    let canary = std::path::Path::new("/tmp/studio-pickle-canary-nvidia");
    let _ = std::fs::remove_file(canary);
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let pkl = tmp.path().join("ffhq.pkl");
    std::fs::copy(fixtures.join("stylegan2/skip.pkl"), &pkl).expect("copy");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    let from_pickle = open_tiny(&mut h, &pkl);
    let model = h.state().explorer().model().expect("loaded");
    assert!(model.info.from_pickle);
    assert!(shows_text(&h, "Read in safe mode"));
    let _ = h
        .query_all_by_label("Save as safetensors…")
        .next()
        .expect("save button");
    assert!(!canary.exists(), "the pickle's code ran");

    // The same seed on the safetensors file renders the same image.
    let mut other = harness(&tmp.path().join("home2"));
    other.step();
    let reference = open_tiny(&mut other, &fixtures.join("stylegan2/skip.safetensors"));
    assert_eq!(from_pickle, reference);

    let broken = tmp.path().join("network.pkl");
    std::fs::write(&broken, b"\x80\x04not really").expect("write");
    drop_file(&mut h, &broken);
    step_until(&mut h, "the error", |h| {
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("network.pkl") && n.text.contains("corrupt"))
    });
}

#[test]
fn the_keyframe_path_exports_as_a_gif_and_as_png_frames() {
    use image::AnimationDecoder as _;
    use studio_app::gui::explorer::ExplorerCommand;

    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    for seed in [1, 2, 3] {
        h.state_mut().explorer_mut().state_mut().latent.seed = seed;
        h.step();
        control(&h, "Add keyframe").click();
        h.step();
        h.step();
    }
    h.state_mut().explorer_mut().state_mut().export_frames = 6;
    h.step();
    assert!(h.query_all_by_label("Export GIF…").next().is_some());

    let gif = tmp.path().join("anim.gif");
    h.state_mut()
        .push_command(ExplorerCommand::ExportAnimation {
            path: gif.clone(),
            gif: true,
        });
    step_until(&mut h, "the GIF export", |h| {
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("Exported the animation"))
    });
    let file = std::io::BufReader::new(std::fs::File::open(&gif).expect("gif"));
    let frames = image::codecs::gif::GifDecoder::new(file)
        .expect("decoder")
        .into_frames()
        .collect_frames()
        .expect("frames");
    assert_eq!(frames.len(), 6);

    let folder = tmp.path().join("frames");
    h.state_mut()
        .push_command(ExplorerCommand::ExportAnimation {
            path: folder.clone(),
            gif: false,
        });
    step_until(&mut h, "the PNG export", |_| {
        folder.join("frame_0006.png").exists()
    });
    step_until(&mut h, "the export to finish", |h| {
        h.state().jobs().is_empty()
    });
    let last = std::fs::read(folder.join("frame_0006.png")).expect("png");
    let text = decode_image_bytes(&last)
        .expect("decode")
        .parameters
        .unwrap_or_default();
    assert!(text.contains("frame 6/6"), "{text}");
    assert_eq!(std::fs::read_dir(&folder).expect("dir").count(), 6);
}

#[test]
fn a_dropped_photo_is_projected_and_becomes_a_keyframe() {
    use studio_inference::diffusion::imaging::encode_png;

    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    h.state_mut().explorer_mut().state_mut().latent.seed = 4;
    settled(&mut h);
    let target = h.state().explorer().image().expect("image").clone();
    // A photo without a latent in it, twice the network's size.
    let photo = tmp.path().join("photo.png");
    std::fs::write(
        &photo,
        encode_png(&target.resized(64, 64), None).expect("png"),
    )
    .expect("write");
    h.state_mut().explorer_mut().state_mut().project_steps = 15;
    h.state_mut().explorer_mut().state_mut().latent.seed = 99;
    settled(&mut h);
    drop_file(&mut h, &photo);
    step_until(&mut h, "the projection", |h| {
        !h.state().explorer().state().keyframes.is_empty() && h.state().jobs().is_empty()
    });
    let k = &h.state().explorer().state().keyframes[0];
    let w = k.w.as_ref().expect("a W latent");
    assert_eq!(w.len(), TinyStyleGan2::default().num_ws() * 16);
    assert!(shows_text(&h, "1. projection"));
    assert!(
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("resized from 64×64 to 32×32")),
        "the resize is announced"
    );
    // The projected latent is the current one and renders with its optimized noise.
    let noise = k
        .noise
        .clone()
        .expect("the keyframe keeps the optimized noise");
    let cfg = TinyStyleGan2::default();
    let noise_values: usize = (2..=cfg.resolution.ilog2())
        .map(|l| {
            let r = 1usize << l;
            if r == 4 { r * r } else { 2 * r * r }
        })
        .sum();
    assert_eq!(noise.len(), noise_values, "every noise buffer, flattened");
    assert!(h.state().explorer().state().latent.w.is_some());
    assert!(h.state().explorer().state().latent.noise.is_some());
    let with_own_noise = settled(&mut h);
    // Dropping the noise renders the same W with the panel's (const) noise instead.
    h.get_by_label("Use the panel's noise").click();
    h.step();
    assert!(h.state().explorer().state().latent.noise.is_none());
    let with_panel_noise = settled(&mut h);
    assert_ne!(with_own_noise, with_panel_noise);
    assert!(h.state().explorer().state().latent.w.is_some());
    // The keyframe's noise survives a restart: written once under explorer/noise/.
    h.state_mut().flush();
    drop(h);
    let noise_dir = tmp.path().join("explorer").join("noise");
    assert_eq!(std::fs::read_dir(&noise_dir).expect("noise dir").count(), 1);
    let mut h = harness(tmp.path());
    h.step();
    let k = &h.state().explorer().state().keyframes[0];
    assert_eq!(
        k.noise.as_deref(),
        Some(&*noise),
        "restored from explorer/noise/"
    );
    assert!(h.state().explorer().state().latent.noise.is_none());
    // "Back to seeds" leaves the W; the keyframe still holds its noise file.
    common::go_to(&mut h, Panel::LatentExplorer);
    h.get_by_label("Back to seeds").click();
    h.step();
    assert!(h.state().explorer().state().latent.w.is_none());
    h.state_mut().flush();
    assert_eq!(std::fs::read_dir(&noise_dir).expect("noise dir").count(), 1);
}

#[test]
fn projection_uses_vgg16_weights_found_beside_the_generator() {
    use studio_inference::diffusion::imaging::encode_png;

    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    assert!(shows_text(&h, "Loss: pixel + multi-scale SSIM"));
    // Weights appear beside the generator: the next load finds them.
    studio_tests::vgg::write_vgg16(
        &path.with_file_name("vgg16-lpips.safetensors"),
        [4, 8, 16, 16, 16],
        true,
        2,
    );
    drop_file(&mut h, &path);
    // The generator is already loaded: wait for the reload itself.
    step_until(&mut h, "the reload to find the VGG16 weights", |h| {
        shows_text(
            h,
            "Loss: VGG16 perceptual distance (vgg16-lpips.safetensors)",
        )
    });
    settled(&mut h);
    let target = h.state().explorer().image().expect("image").clone();
    let photo = tmp.path().join("photo.png");
    std::fs::write(&photo, encode_png(&target, None).expect("png")).expect("write");
    h.state_mut().explorer_mut().state_mut().project_steps = 8;
    drop_file(&mut h, &photo);
    step_until(&mut h, "the projection", |h| {
        !h.state().explorer().state().keyframes.is_empty() && h.state().jobs().is_empty()
    });
    assert!(
        !h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("failed")),
        "no error"
    );
}

#[test]
fn a_pasted_image_is_projected_too() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    // Long enough to still be running while the test looks.
    h.state_mut().explorer_mut().state_mut().project_steps = 100_000;
    let img = h.state().explorer().image().expect("image").clone();
    let pixels = img
        .pixels
        .chunks(3)
        .map(|p| egui::Color32::from_rgb(p[0], p[1], p[2]))
        .collect();
    let pasted = egui::ColorImage::new([img.width as usize, img.height as usize], pixels);
    h.event(egui::Event::PasteImage(std::sync::Arc::new(pasted)));
    // While it runs, the reconstruction is shown beside the target.
    step_until(&mut h, "the target beside the reconstruction", |h| {
        shows_text(h, "Target") && shows_text(h, "Reconstruction")
    });
    // Cancel once it has started its steps (a projection cancelled while still queued never
    // runs, so it leaves no keyframe).
    step_until(&mut h, "the projection's first step", |h| {
        h.state()
            .jobs()
            .running()
            .and_then(|j| j.progress.as_ref())
            .is_some_and(|(_, message)| message.starts_with("step "))
    });
    // What the status bar's Cancel (and Esc) do; a click could miss while the bar re-lays out.
    h.state_mut()
        .push_command(studio_app::gui::command::Command::CancelRunningJob);
    step_until(&mut h, "the projection", |h| {
        !h.state().explorer().state().keyframes.is_empty() && h.state().jobs().is_empty()
    });
    // Cancelled: the W found so far still becomes a keyframe.
    assert!(h.state().explorer().state().keyframes[0].w.is_some());
    assert!(!shows_text(&h, "Target"));
    let _ = h
        .query_all_by_label("Open an image to project…")
        .next()
        .expect("the open button");
}

#[test]
fn choosing_a_layer_shows_its_channel_grid_and_statistics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let mut h = harness(tmp.path());
    h.step();
    open_tiny(&mut h, &path);
    let (channels, layers) = {
        let m = h.state().explorer().model().expect("model");
        (m.info.channels.clone(), m.layers.clone())
    };
    assert!(layers.iter().any(|l| l == "b8.conv0"), "layers: {layers:?}");
    let c8 = channels
        .iter()
        .find(|(r, _)| *r == 8)
        .map(|(_, c)| *c)
        .expect("an 8×8 block");
    assert!(control(&h, "Synthesis layer").value().as_deref() == Some("none"));
    // Choose the layer (as the combo box does; the tests set sliders the same way).
    h.state_mut().explorer_mut().state_mut().layer = Some("b8.conv0".into());
    h.step();
    assert_eq!(
        control(&h, "Synthesis layer").value().as_deref(),
        Some("b8.conv0")
    );
    assert_eq!(
        h.state().explorer().state().layer.as_deref(),
        Some("b8.conv0")
    );
    step_until(&mut h, "the layer view", |h| {
        h.state()
            .explorer()
            .layer_view()
            .is_some_and(|v| v.name == "b8.conv0")
    });
    h.step();
    let view = h.state().explorer().layer_view().expect("view").clone();
    assert_eq!(view.stats.shape, vec![1, c8, 8, 8]);
    assert!(view.stats.min <= view.stats.mean && view.stats.mean <= view.stats.max);
    assert!(
        view.stats.std > 0.0,
        "random weights give varied activations"
    );
    // A grid of the first min(c, 64) channels, 8×8 each with 1-pixel gaps.
    let n = c8.min(64);
    let cols = (1..=n).find(|k| k * k >= n).expect("cols");
    let rows = n.div_ceil(cols);
    assert_eq!(
        (view.image.width as usize, view.image.height as usize),
        (cols * 9 - 1, rows * 9 - 1)
    );
    let shape = format!("shape 1×{c8}×8×8");
    assert!(shows_text(&h, &shape), "the statistics are shown");
    // RGB of three channels: one 8×8 image.
    h.state_mut().explorer_mut().state_mut().layer_rgb = true;
    step_until(&mut h, "the RGB layer view", |h| {
        h.state()
            .explorer()
            .layer_view()
            .is_some_and(|v| (v.image.width, v.image.height) == (8, 8))
    });
    // An unknown layer name (say from a saved state of another model) shows an error, not a crash.
    h.state_mut().explorer_mut().state_mut().layer = Some("b9999.conv0".into());
    step_until(&mut h, "the layer error", |h| {
        shows_text(h, "no synthesis layer")
    });
    assert!(
        h.state().explorer().image().is_some(),
        "the image still shows"
    );
}

fn harness_with_presets(home: &Path, presets: &Path) -> Harness<'static, StudioApp> {
    let mut config = AppConfig::for_tests(home);
    config.presets_dir = Some(presets.to_path_buf());
    common::harness_sized(&config, egui::vec2(1400.0, 1000.0))
}

fn compute_directions(h: &mut Harness<'_, StudioApp>) {
    {
        let s = h.state_mut().explorer_mut().state_mut();
        s.pca_samples = 300;
        s.pca_components = 3;
    }
    control(h, "Compute directions").click();
    step_until(h, "the directions", |h| {
        h.state().explorer().directions().is_some()
    });
    h.step();
}

#[test]
fn a_directions_preset_is_saved_under_presets_and_loads_into_a_fresh_app() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    let presets = tmp.path().join("presets");
    let (edits, directions) = {
        let mut h = harness_with_presets(&tmp.path().join("home-a"), &presets);
        h.step();
        open_tiny(&mut h, &path);
        compute_directions(&mut h);
        {
            let s = h.state_mut().explorer_mut().state_mut();
            s.latent.edits[0].sigma = 2.5;
            s.latent.edits[1].sigma = -1.25;
            s.latent.edits[1].layers = 1..3;
        }
        h.step();
        control(&h, "Preset name").focus();
        h.step();
        control(&h, "Preset name").type_text("smile/test");
        h.step();
        control(&h, "Save preset").click();
        h.step();
        h.step();
        let e = h.state().explorer();
        (
            e.state().latent.edits.clone(),
            e.directions().cloned().expect("directions"),
        )
    };
    let file = presets.join("gan-directions").join("smile_test.json");
    assert!(
        file.exists(),
        "the preset is written under presets/gan-directions/"
    );

    // A fresh app with another home: the preset is listed and loads the same sliders.
    let mut h = harness_with_presets(&tmp.path().join("home-b"), &presets);
    h.step();
    open_tiny(&mut h, &path);
    assert!(h.state().explorer().directions().is_none());
    h.step();
    control(&h, "Load preset smile_test").click();
    h.step();
    h.step();
    let e = h.state().explorer();
    assert_eq!(e.state().latent.edits, edits, "the same sliders");
    assert_eq!(e.directions(), Some(&directions), "the same directions");
    assert!(shows_text(&h, "Component 1"));

    // A model with another w_dim does not list it.
    let other = tmp.path().join("models").join("wide.safetensors");
    studio_tests::gan::write_stylegan2(
        &other,
        TinyStyleGan2 {
            w_dim: 24,
            ..TinyStyleGan2::default()
        },
        3,
        false,
    );
    drop_file(&mut h, &other);
    step_until(&mut h, "the wider generator", |h| {
        h.state()
            .explorer()
            .model()
            .is_some_and(|m| m.info.w_dim == 24)
    });
    h.step();
    assert!(!shows_text(&h, "Load preset smile_test"));
}

#[test]
fn a_preset_goes_to_studio_home_when_the_presets_folder_is_not_writable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_gan(tmp.path(), TinyStyleGan2::default());
    // A file where the presets folder should be: nothing can be created under it.
    let blocked = tmp.path().join("presets-is-a-file");
    std::fs::write(&blocked, b"not a folder").expect("write");
    let home = tmp.path().join("home");
    let mut h = harness_with_presets(&home, &blocked);
    h.step();
    open_tiny(&mut h, &path);
    compute_directions(&mut h);
    h.state_mut()
        .explorer_mut()
        .preset_name_mut()
        .push_str("fallback");
    h.step();
    control(&h, "Save preset").click();
    h.step();
    h.step();
    let saved = home
        .join("presets")
        .join("gan-directions")
        .join("fallback.json");
    assert!(
        saved.exists(),
        "saved under STUDIO_HOME/presets/gan-directions/"
    );
    assert!(shows_text(&h, "instead"), "the notice says where it went");
    assert!(shows_text(&h, "Load preset fallback"), "and it is listed");
}
