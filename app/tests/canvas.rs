//! The Canvas panel, driven like a person would with `egui_kittest`: painting the mask with
//! the pointer, undo/redo shortcuts, the staging area, drag and drop, autosave across a
//! restart, and an end-to-end generation with a tiny random-weight Stable Diffusion 1.x model
//! written by `studio-tests`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use egui::accesskit::Role;
use egui::{Key, Modifiers, Pos2};
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use studio_app::gui::canvas::CanvasCommand;
use studio_app::gui::canvas::document::{ModeKind, Tool};
use studio_app::gui::canvas::view::CANVAS_LABEL;
use studio_app::gui::{AppConfig, Panel, StudioApp};
use studio_inference::diffusion::imaging::{RgbImage, encode_png};
use studio_inference::diffusion::pipeline::GeneratedImage;
use studio_inference::image_meta::{GenerationParameters, png_parameters};
use studio_tests::sd::{TinyKind, TinySd, write_tiny_sd};

mod common;
use common::{control, drop_file, shows_text, step_until};

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    common::harness_sized(&AppConfig::for_tests(home), egui::vec2(1400.0, 900.0))
}

fn go_to_canvas(h: &mut Harness<'_, StudioApp>) {
    common::go_to(h, Panel::Canvas);
}

/// A gradient test image.
fn gradient(w: u32, h: u32) -> RgbImage {
    let mut pixels = Vec::new();
    for y in 0..h {
        for x in 0..w {
            pixels.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, 90]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

fn canvas_rect(h: &Harness<'_, StudioApp>) -> egui::Rect {
    h.get_all_by(|n| n.label().as_deref() == Some(CANVAS_LABEL))
        .next()
        .expect("the canvas area")
        .rect()
}

/// Presses at `from`, moves through `to`, releases: a brush stroke.
fn drag(h: &mut Harness<'_, StudioApp>, from: Pos2, to: Pos2) {
    h.hover_at(from);
    h.step();
    h.drag_at(from);
    h.step();
    for i in 1..=4 {
        let t = i as f32 / 4.0;
        h.hover_at(from + (to - from) * t);
        h.step();
    }
    h.drop_at(to);
    h.step();
    h.step();
}

fn mask_painted(h: &Harness<'_, StudioApp>) -> usize {
    h.state()
        .canvas()
        .document()
        .mask()
        .values
        .iter()
        .filter(|&&v| v > 0)
        .count()
}

#[test]
fn a_brush_stroke_paints_the_mask_and_the_shortcuts_undo_and_redo_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .set_image(gradient(256, 256));
    h.state_mut().canvas_mut().set_brush(Tool::Brush, 24.0, 1.0);
    h.step();
    h.step();
    assert_eq!(h.state().canvas().mode(), ModeKind::Img2Img);
    assert!(shows_text(&h, "Mode: img2img"));

    let rect = canvas_rect(&h);
    let c = rect.center();
    drag(
        &mut h,
        c - egui::vec2(60.0, 0.0),
        c + egui::vec2(60.0, 10.0),
    );
    let painted = mask_painted(&h);
    assert!(
        painted > 100,
        "the stroke painted the mask ({painted} pixels)"
    );
    assert_eq!(h.state().canvas().mode(), ModeKind::Inpaint);
    assert!(shows_text(&h, "Mode: inpaint"));
    let image_before = h.state().canvas().document().image().cloned();

    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    h.step();
    h.step();
    assert_eq!(mask_painted(&h), 0, "Ctrl+Z undid the stroke");
    assert_eq!(
        h.state().canvas().document().image().cloned(),
        image_before,
        "undoing the stroke keeps the image"
    );

    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    h.step();
    h.step();
    assert_eq!(mask_painted(&h), painted, "Ctrl+Shift+Z redid it");

    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Y);
    h.step();
    h.step();
    assert_eq!(mask_painted(&h), painted, "Ctrl+Y redoes too");

    // The eraser takes it away again, as one more undoable step.
    h.state_mut()
        .canvas_mut()
        .set_brush(Tool::Eraser, 80.0, 1.0);
    drag(
        &mut h,
        c - egui::vec2(70.0, 0.0),
        c + egui::vec2(70.0, 10.0),
    );
    assert!(
        mask_painted(&h) < painted / 4,
        "erased: {}",
        mask_painted(&h)
    );
    control(&h, "Undo").click();
    h.step();
    h.step();
    assert_eq!(mask_painted(&h), painted);

    control(&h, "Invert mask").click();
    h.step();
    h.step();
    assert_eq!(count_partial(&h), 0, "a hard brush paints only full values");
    assert_eq!(mask_painted(&h), 256 * 256 - painted);
    control(&h, "Clear mask").click();
    h.step();
    h.step();
    assert_eq!(mask_painted(&h), 0);
}

/// Pixels that are neither 0 nor 255 (soft edges count on both sides of an inversion).
fn count_partial(h: &Harness<'_, StudioApp>) -> usize {
    h.state()
        .canvas()
        .document()
        .mask()
        .values
        .iter()
        .filter(|&&v| v > 0 && v < 255)
        .count()
}

fn staged_result(w: u32, h: u32, rgb: [u8; 3]) -> Arc<GeneratedImage> {
    Arc::new(GeneratedImage {
        image: RgbImage::new_filled(w, h, rgb),
        seed: 5,
        parameters: GenerationParameters::default(),
    })
}

#[test]
fn accepting_a_staged_result_puts_it_on_the_canvas_and_undo_brings_the_old_one_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    let original = gradient(64, 64);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .set_image(original.clone());
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .stage(staged_result(64, 64, [250, 10, 10]), None);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .stage(staged_result(64, 64, [10, 250, 10]), None);
    h.step();
    h.step();
    assert!(shows_text(&h, "Staged 2/2"));
    control(&h, "Staged result 1").click();
    h.step();
    h.step();
    assert!(shows_text(&h, "Staged 1/2"));
    control(&h, "Discard").click();
    h.step();
    h.step();
    assert_eq!(h.state().canvas().document().staged().len(), 1);
    assert_eq!(
        h.state().canvas().document().image(),
        Some(&original),
        "Discard leaves the canvas as it was"
    );
    control(&h, "Accept").click();
    h.step();
    h.step();
    let doc = h.state().canvas().document();
    assert!(doc.staged().is_empty(), "the staging area is emptied");
    assert_eq!(
        doc.image().map(|i| &i.pixels[..3]),
        Some(&[10u8, 250, 10][..])
    );
    control(&h, "Undo").click();
    h.step();
    h.step();
    assert_eq!(h.state().canvas().document().image(), Some(&original));
    control(&h, "Redo").click();
    h.step();
    assert_eq!(
        h.state().canvas().document().image().map(|i| i.pixels[1]),
        Some(250)
    );
}

#[test]
fn extend_grows_the_canvas_and_masks_the_new_strip_for_outpainting() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .set_image(gradient(128, 96));
    h.step();
    h.step();
    control(&h, "Extend right").click();
    h.step();
    h.step();
    let doc = h.state().canvas().document();
    assert_eq!(doc.size(), Some((256, 96)));
    assert_eq!(doc.mode(), ModeKind::Inpaint);
    assert_eq!(mask_painted(&h), 128 * 96);
    assert!(shows_text(&h, "Mode: inpaint"));
    control(&h, "Undo").click();
    h.step();
    assert_eq!(h.state().canvas().document().size(), Some((128, 96)));
}

#[test]
fn a_dropped_file_that_is_not_an_image_gives_a_notice_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .set_image(gradient(32, 32));
    h.step();
    let before = h.state().canvas().document().image().cloned();
    let rev = h.state().canvas().document().image_rev();
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "shopping list: eggs, milk").expect("write");
    drop_file(&mut h, &notes);
    h.step();
    let notice = h
        .state()
        .notices()
        .iter()
        .map(|n| n.text.clone())
        .find(|t| t.contains("notes.txt"))
        .expect("a notice about the file");
    assert!(notice.contains("not an image"), "{notice}");
    assert!(shows_text(&h, "not an image"));
    assert_eq!(h.state().canvas().document().image().cloned(), before);
    assert_eq!(h.state().canvas().document().image_rev(), rev);
    assert!(h.state().canvas().document().can_undo());
}

#[test]
fn an_image_pasted_from_the_clipboard_becomes_the_canvas_and_undo_takes_it_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    // What egui sends for Ctrl+V with an image (and no text) on the system clipboard:
    // premultiplied RGBA; the transparent pixel lands on white.
    let mut pasted = egui::ColorImage::new([3, 2], vec![egui::Color32::from_rgb(10, 200, 30); 6]);
    pasted.pixels[5] = egui::Color32::TRANSPARENT;
    h.event(egui::Event::PasteImage(Arc::new(pasted)));
    h.step();
    h.step();
    let img = h
        .state()
        .canvas()
        .document()
        .image()
        .cloned()
        .expect("the pasted image is on the canvas");
    assert_eq!((img.width, img.height), (3, 2));
    assert_eq!(img.pixels[..3], [10, 200, 30]);
    assert_eq!(img.pixels[15..], [255, 255, 255]);
    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    h.step();
    h.step();
    assert!(
        h.state().canvas().document().image().is_none(),
        "undo removes the paste"
    );
}

#[test]
fn the_canvas_is_saved_and_comes_back_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let image = gradient(80, 48);
    let mask;
    {
        let mut h = harness(&home);
        h.step();
        go_to_canvas(&mut h);
        h.state_mut()
            .canvas_mut()
            .document_mut()
            .set_image(image.clone());
        h.state_mut().canvas_mut().set_brush(Tool::Brush, 10.0, 1.0);
        h.step();
        let c = canvas_rect(&h).center();
        drag(&mut h, c, c + egui::vec2(30.0, 20.0));
        assert!(mask_painted(&h) > 0);
        mask = h.state().canvas().document().mask().clone();
        h.state_mut().canvas_mut().form_mut().prompt = "a quiet harbour".to_owned();
        // The debounced autosave writes a second after the last change, without a flush.
        step_until(&mut h, "the autosave", |_| {
            let json = home.join("canvas/canvas.json");
            std::fs::read_to_string(json).is_ok_and(|t| t.contains("a quiet harbour"))
        });
        assert!(home.join("canvas/image.png").exists());
        assert!(home.join("canvas/mask.png").exists());
    }
    let mut h = harness(&home);
    h.step();
    let doc = h.state().canvas().document();
    assert_eq!(doc.image(), Some(&image));
    assert_eq!(doc.mask(), &mask);
    assert_eq!(h.state().canvas().form().prompt, "a quiet harbour");
    assert_eq!(h.state().settings().panel, Panel::Canvas);
    drop(h);

    // A corrupt save: a notice and an empty canvas, never a crash.
    std::fs::write(home.join("canvas/image.png"), b"not a png").expect("write");
    let mut h = harness(&home);
    h.step();
    assert!(h.state().canvas().document().is_empty());
    assert!(
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("could not be read")),
        "a notice says the save was unreadable"
    );
}

#[test]
fn the_canvas_panel_names_its_inputs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    h.step();
    assert!(!shows_text(&h, "not built yet"));
    for name in [
        "Prompt",
        "Negative prompt",
        "Steps",
        "CFG scale",
        "Seed",
        "Width",
    ] {
        control(&h, name);
    }
    assert!(shows_text(&h, "Mode: txt2img"));
    assert!(
        shows_text(&h, "Open a Stable Diffusion"),
        "Generate says why it is disabled"
    );
    h.check_accessibility();
    // The shipped style presets are offered.
    assert!(h.state().canvas().styles().len() >= 4);
}

fn tiny_sd(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-sd1");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    model
}

/// An original SD `.ckpt` dropped on the window goes to the Canvas, loads in safe mode (read
/// as data), and the Canvas says so and offers *Save as safetensors…*.
#[test]
fn a_dropped_ckpt_loads_in_safe_mode() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, ckpt) = studio_tests::ldm::write_tiny_sd1_checkpoints(tmp.path());
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    drop_file(&mut h, &ckpt);
    step_until(&mut h, "the checkpoint to load", |h| {
        h.state().canvas().model().is_some()
    });
    go_to_canvas(&mut h);
    h.step();
    assert!(shows_text(&h, "Read in safe mode"));
    let _ = h
        .query_all_by_label("Save as safetensors…")
        .next()
        .expect("save button");
    assert_eq!(h.state().settings().last_image_model.as_ref(), Some(&ckpt));
}

#[test]
fn a_tiny_model_generates_with_a_preview_and_its_png_restores_the_parameters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_sd(tmp.path());
    let mut h = harness(&home);
    h.step();
    go_to_canvas(&mut h);

    // Dropping the model folder on the Canvas loads it with the image model loader.
    drop_file(&mut h, &model);
    step_until(&mut h, "the model to load", |h| {
        h.state().canvas().model().is_some()
    });
    h.step();
    assert!(shows_text(&h, "SD 1.x"));
    assert_eq!(h.state().settings().last_image_model.as_ref(), Some(&model));
    assert_eq!(h.state().model(), None, "the chat model is untouched");
    let info = h.state().canvas().model().expect("loaded").clone();
    assert_eq!(
        (
            h.state().canvas().form().width,
            h.state().canvas().form().height
        ),
        info.default_size,
        "the form takes the model's own size"
    );
    assert!(shows_text(
        &h,
        &format!("{}x{}", info.default_size.0, info.default_size.1)
    ));
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.width = 64;
        form.height = 64;
    }

    h.get_by_label("Prompt").focus();
    h.step();
    h.get_by_label("Prompt").type_text("a red cat");
    h.step();
    h.state_mut().canvas_mut().form_mut().steps = 3;
    h.step();
    assert!(shows_text(&h, "Mode: txt2img, a new 64x64 image"));
    control(&h, "Generate").click();
    h.step();
    assert!(h.state().canvas().is_generating());
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    h.step();
    let canvas = h.state().canvas();
    assert!(
        canvas.progress_events() > 0 || canvas.previews_shown() > 0,
        "progress or a preview was shown while it ran"
    );
    let seed = canvas.last_seed().expect("the seed used is shown");
    assert!(shows_text(&h, &format!("Last seed: {seed}")));
    assert_eq!(canvas.document().staged().len(), 1);
    assert!(
        canvas.document().is_empty(),
        "staged, not yet on the canvas"
    );

    // The history has the PNG with its parameters (written on the file thread).
    let saved = canvas.document().staged()[0].path.clone().expect("saved");
    assert!(saved.starts_with(home.join("images")));
    step_until(&mut h, "the PNG on disk", |_| saved.exists());
    let canvas = h.state().canvas();
    let bytes = std::fs::read(&saved).expect("png");
    let params = png_parameters(&bytes).expect("png").expect("parameters");
    assert_eq!(params.prompt, "a red cat");
    assert_eq!(params.steps(), Some(3));
    assert_eq!(params.seed(), Some(seed));
    assert_eq!(params.size(), Some((64, 64)));
    assert_eq!(canvas.history().entries().len(), 1);

    control(&h, "Accept").click();
    h.step();
    h.step();
    assert_eq!(h.state().canvas().document().size(), Some((64, 64)));
    assert_eq!(h.state().canvas().mode(), ModeKind::Img2Img);

    // Reuse seed fixes it in the form.
    control(&h, "Reuse seed").click();
    h.step();
    assert_eq!(h.state().canvas().form().seed, seed);
    assert!(!h.state().canvas().form().random_seed);

    // Dropping the PNG opens it and offers its parameters.
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.seed = 1;
        form.steps = 20;
        form.prompt = "something else".to_owned();
    }
    drop_file(&mut h, &saved);
    h.step();
    assert!(shows_text(&h, "carries generation parameters"));
    control(&h, "Restore parameters").click();
    h.step();
    h.step();
    let form = h.state().canvas().form();
    assert_eq!(form.seed, seed);
    assert_eq!(form.steps, 3);
    assert_eq!(form.prompt, "a red cat");
    assert!(!form.random_seed);

    // An inpaint run with a fixed seed: the result keeps the unmasked pixels.
    let before = h
        .state()
        .canvas()
        .document()
        .image()
        .cloned()
        .expect("image");
    h.state_mut().canvas_mut().document_mut().paint(
        (0.0, 0.0),
        (20.0, 0.0),
        Tool::Brush,
        16.0,
        1.0,
    );
    h.state_mut().canvas_mut().document_mut().end_stroke();
    h.step();
    assert!(shows_text(&h, "Mode: inpaint"));
    h.state_mut().push_command(CanvasCommand::Generate);
    step_until(&mut h, "the inpainted result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let staged = h.state().canvas().document().staged()[0].image.clone();
    let corner = |img: &RgbImage| img.pixels[(63 * 64 + 63) * 3..(63 * 64 + 64) * 3].to_vec();
    assert_eq!(
        corner(&staged.image),
        corner(&before),
        "far from the mask the pixels are kept"
    );
    assert_eq!(h.state().canvas().history().entries().len(), 2);
}

#[test]
fn cancelling_a_generation_leaves_the_canvas_as_it_was() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_sd(tmp.path());
    let mut h = harness(&home);
    h.step();
    go_to_canvas(&mut h);
    h.state_mut().push_command(CanvasCommand::LoadModel(model));
    step_until(&mut h, "the model to load", |h| {
        h.state().canvas().model().is_some()
    });
    let image = gradient(64, 64);
    h.state_mut()
        .canvas_mut()
        .document_mut()
        .set_image(image.clone());
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.steps = 200;
        form.batch_count = 3;
    }
    h.state_mut().push_command(CanvasCommand::Generate);
    step_until(&mut h, "the first step", |h| {
        h.state().canvas().progress_events() > 0
    });
    control(&h, "Cancel").click();
    step_until(&mut h, "the cancellation", |h| {
        !h.state().canvas().is_generating()
    });
    h.step();
    assert!(h.state().canvas().document().staged().is_empty());
    assert_eq!(h.state().canvas().document().image(), Some(&image));
    assert!(
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("cancelled")),
        "a notice says so"
    );
}

#[test]
fn a_png_from_another_tool_offers_its_parameters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    // Dropped from the Chat panel: an image switches to the Canvas.
    let text = "portrait of a knight\nNegative prompt: blurry\nSteps: 28, Sampler: DPM++ 2M Karras, \
                CFG scale: 6.5, Seed: 987654321, Size: 512x768, Model: other";
    let png = encode_png(&gradient(40, 60), Some(text)).expect("png");
    let path = tmp.path().join("knight.png");
    std::fs::write(&path, png).expect("write");
    drop_file(&mut h, &path);
    h.step();
    assert_eq!(h.state().settings().panel, Panel::Canvas);
    assert_eq!(h.state().canvas().document().size(), Some((40, 60)));
    control(&h, "Restore parameters").click();
    h.step();
    let form = h.state().canvas().form();
    assert_eq!(form.prompt, "portrait of a knight");
    assert_eq!(form.negative_prompt, "blurry");
    assert_eq!((form.steps, form.seed), (28, 987_654_321));
    assert_eq!((form.width, form.height), (512, 768));
    assert_eq!(form.sampler.name(), "DPM++ 2M");
    assert_eq!(form.schedule.name(), "Karras");
}

#[test]
fn the_history_gallery_reuses_sends_and_deletes_with_undo() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let images = home.join("images");
    std::fs::create_dir_all(&images).expect("dir");
    let text =
        "a lighthouse at dusk\nSteps: 11, Sampler: Euler, CFG scale: 4, Seed: 77, Size: 48x32";
    let png = encode_png(&gradient(48, 32), Some(text)).expect("png");
    let path = images.join("1700000000000-77.png");
    std::fs::write(&path, png).expect("write");

    let mut h = harness(&home);
    h.step();
    go_to_canvas(&mut h);
    step_until(&mut h, "the thumbnail", |h| {
        shows_text(h, "a lighthouse at dusk")
    });
    assert_eq!(h.state().canvas().history().entries().len(), 1);

    control(&h, "Reuse parameters").click();
    h.step();
    h.step();
    let form = h.state().canvas().form();
    assert_eq!((form.steps, form.seed), (11, 77));
    assert_eq!(form.prompt, "a lighthouse at dusk");
    assert!(
        h.state().canvas().document().is_empty(),
        "Reuse leaves the canvas alone"
    );

    control(&h, "Send to Canvas").click();
    h.step();
    h.step();
    assert_eq!(h.state().canvas().document().size(), Some((48, 32)));

    control(&h, "Delete").click();
    h.step();
    h.step();
    assert!(path.exists(), "Delete asks first");
    control(&h, "Confirm delete").click();
    h.step();
    h.step();
    assert!(!path.exists());
    assert!(h.state().canvas().history().entries().is_empty());
    // The notice's Undo (above the canvas toolbar's own Undo).
    h.get_all_by(|n| n.role() != Role::Label && n.label().as_deref() == Some("Undo"))
        .min_by(|a, b| a.rect().min.y.total_cmp(&b.rect().min.y))
        .expect("an Undo button")
        .click();
    h.step();
    h.step();
    assert!(path.exists(), "Undo brings the file back");
    assert_eq!(h.state().canvas().history().entries().len(), 1);
}

/// *Upscale* with an ESRGAN file: the canvas image is upscaled on the worker, staged and saved
/// in the history with the postprocessing fields; the button says why it waits until an
/// upscaler is chosen.
#[test]
fn the_canvas_upscales_an_image_with_an_esrgan_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let png = tmp.path().join("small.png");
    std::fs::write(&png, encode_png(&gradient(20, 12), None).expect("png")).expect("write");
    let mut h = harness(&home);
    h.step();
    go_to_canvas(&mut h);
    drop_file(&mut h, &png);
    step_until(&mut h, "the image to open", |h| {
        h.state().canvas().document().image().is_some()
    });
    assert!(
        control(&h, "Upscale").accesskit_node().is_disabled(),
        "disabled until an upscaler is chosen"
    );
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/esrgan/rrdb-x2.safetensors");
    h.state_mut()
        .push_command(CanvasCommand::SetUpscaler(model.clone()));
    h.state_mut().canvas_mut().form_mut().upscale_by = 3.0;
    h.step();
    h.step();
    assert!(shows_text(&h, "Upscaler: rrdb-x2"));
    control(&h, "Upscale").click();
    h.step();
    step_until(&mut h, "the upscaled result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let staged = &h.state().canvas().document().staged()[0];
    assert_eq!(
        (staged.image.image.width, staged.image.image.height),
        (60, 36)
    );
    let p = &staged.image.parameters;
    assert_eq!(p.get("Postprocess upscaler"), Some("rrdb-x2"));
    assert_eq!(p.get("Postprocess upscale by"), Some("3"));
    let saved = staged.path.clone().expect("saved in the history");
    step_until(&mut h, "the PNG on disk", |_| saved.exists());
}

/// The LoRA list offers the files of `models/lora`; `<lora:name:w>` in the prompt loads the
/// model again with it merged before generating, the PNG records its hash as the SD web UI
/// does, and a prompt without it loads the model without it again. An unknown name is said.
#[test]
fn a_lora_named_in_the_prompt_is_merged_and_recorded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_sd(tmp.path());
    let lora_dir = home.join("models/lora");
    std::fs::create_dir_all(&lora_dir).expect("dir");
    studio_tests::sd::write_tiny_lora(&model, &lora_dir.join("inkwash.safetensors"));
    // Tall enough that the LoRA list below the form is on screen.
    let mut h = loaded_canvas(&home, &model, 1600.0);
    control(&h, "Add to prompt").click();
    h.step();
    assert_eq!(
        h.state().canvas().form().prompt,
        "a red cat <lora:inkwash:1>"
    );
    h.state_mut().canvas_mut().form_mut().prompt = "a red cat <lora:inkwash:0.7>".into();
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let info = h.state().canvas().model().expect("model").clone();
    assert_eq!(info.loras.len(), 1);
    assert_eq!(info.loras[0].name, "inkwash");
    assert!(info.loras[0].applied > 0);
    let staged = &h.state().canvas().document().staged()[0];
    let hashes = staged.image.parameters.get("Lora hashes").expect("hashes");
    assert!(
        hashes.starts_with("\"inkwash: ") && hashes.len() == 23,
        "{hashes}"
    );
    assert_eq!(
        staged.image.parameters.prompt,
        "a red cat <lora:inkwash:0.7>"
    );

    // Without the tag, the next generation loads the model without it.
    h.state_mut().push_command(CanvasCommand::DiscardAllStaged);
    h.state_mut().canvas_mut().form_mut().prompt = "a red cat <lora:nosuch:1>".into();
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    assert!(h.state().canvas().model().expect("model").loras.is_empty());
    assert!(shows_text(&h, "No LoRA named `nosuch`"));
}

/// *New sketch* makes a white canvas at the form's size; the *Colour* brush paints on the
/// image (not the mask), so Generate will img2img the sketch.
#[test]
fn a_colour_sketch_is_painted_on_a_new_canvas() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to_canvas(&mut h);
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.width = 96;
        form.height = 64;
    }
    h.step();
    control(&h, "New sketch").click();
    h.step();
    h.step();
    let doc = h.state().canvas().document();
    assert_eq!(doc.size(), Some((96, 64)));
    assert!(doc.image().expect("image").pixels.iter().all(|&v| v == 255));
    // New sketch picks the Colour brush.
    h.state_mut().push_command(CanvasCommand::Paint {
        from: [10, 30],
        to: [80, 30],
    });
    h.state_mut().push_command(CanvasCommand::EndStroke);
    h.step();
    let doc = h.state().canvas().document();
    let i = (30 * 96 + 40) * 3;
    assert_ne!(
        doc.image().expect("image").pixels[i..i + 3],
        [255, 255, 255]
    );
    assert!(doc.mask().is_empty());
    assert_eq!(doc.mode(), ModeKind::Img2Img);
}

/// A window `height` tall on the Canvas with `model` dropped and loaded, the form set to a
/// quick 32×32 two-step "a red cat".
fn loaded_canvas(home: &Path, model: &Path, height: f32) -> Harness<'static, StudioApp> {
    let mut h = common::harness_sized(&AppConfig::for_tests(home), egui::vec2(1400.0, height));
    h.step();
    go_to_canvas(&mut h);
    drop_file(&mut h, model);
    step_until(&mut h, "the model to load", |h| {
        h.state().canvas().model().is_some()
    });
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.width = 32;
        form.height = 32;
        form.steps = 2;
        form.prompt = "a red cat".into();
    }
    h.step();
    h
}

/// [`loaded_canvas`] with a tiny ControlNet for the model in the folder the units' menu
/// offers: the home, the ControlNet and the harness.
fn controlnet_canvas(tmp: &Path) -> (PathBuf, PathBuf, Harness<'static, StudioApp>) {
    let home = tmp.join("home");
    let model = tiny_sd(tmp);
    let cn = home.join("models/controlnet/tiny-controlnet");
    studio_tests::sd::write_tiny_controlnet(&model, &cn);
    let h = loaded_canvas(&home, &model, 1800.0);
    (home, cn, h)
}

/// A ControlNet unit in the form: added with its button, a ControlNet chosen, the canvas's
/// colour sketch as its image with the *invert* preprocessor, whose preview shows the map;
/// Generate sends it to the worker, the PNG records it, and a control image file of another
/// size is resized with a note.
#[test]
fn a_controlnet_unit_guides_a_generation_from_the_canvas_sketch() {
    use studio_app::gui::canvas::control::ControlCommand;
    use studio_inference::diffusion::annotators::Preprocessor;
    let tmp = tempfile::tempdir().expect("tmp");
    let (home, cn, mut h) = controlnet_canvas(tmp.path());
    control(&h, "New sketch").click();
    h.step();
    h.state_mut().push_command(CanvasCommand::Paint {
        from: [4, 16],
        to: [28, 16],
    });
    h.state_mut().push_command(CanvasCommand::EndStroke);
    h.step();
    control(&h, "Add ControlNet unit").click();
    h.step();
    assert_eq!(h.state().canvas().control_units().len(), 1);
    // What the unit's menu offers: the ControlNets of `models/controlnet`.
    assert_eq!(
        studio_app::gui::canvas::control::model_entries(
            &home.join("models/controlnet"),
            &["safetensors"]
        ),
        std::slice::from_ref(&cn)
    );
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::SetModel(
            0,
            cn.clone(),
        )));
    h.step();
    assert_eq!(
        h.state().canvas().control_units()[0].model.as_deref(),
        Some(cn.as_path())
    );
    h.state_mut().canvas_mut().control_units_mut()[0].preprocessor = Preprocessor::Invert;
    h.step();
    control(&h, "Preview map").click();
    h.step();
    h.step();
    {
        let unit = &h.state().canvas().control_units()[0];
        let map = unit.preview().expect("a preview");
        let sketch = h.state().canvas().document().image().expect("sketch");
        assert_eq!((map.width, map.height), (32, 32));
        assert!(
            map.pixels
                .iter()
                .zip(&sketch.pixels)
                .all(|(m, s)| *m == 255 - *s),
            "invert: the white sketch is black, its stroke light"
        );
    }
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let staged = &h.state().canvas().document().staged()[0];
    let unit = staged
        .image
        .parameters
        .get("ControlNet 0")
        .expect("recorded");
    assert!(
        unit.contains("Module: invert") && unit.contains("Model: tiny-controlnet"),
        "{unit}"
    );

    // A control image file of another size: resized, with a note.
    let file = tmp.path().join("edges.png");
    std::fs::write(&file, encode_png(&gradient(48, 40), None).expect("png")).expect("write");
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::SetImage(0, file)));
    h.state_mut().push_command(CanvasCommand::DiscardAllStaged);
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    assert!(shows_text(&h, "control image is resized to 32x32"));
}

/// The control layer: on an empty canvas the Control pen draws a map for a new image (still
/// txt2img); a unit set to Layer follows it exactly as it follows the same map from a file,
/// and an edit to the layer changes the image; "Edit on layer" puts a preprocessor's map on
/// the layer to edit, and the layer comes back after a restart.
#[test]
fn a_controlnet_unit_follows_the_control_layer_drawn_on_the_canvas() {
    use studio_app::gui::canvas::control::{ControlCommand, ControlSource};
    use studio_inference::diffusion::annotators::Preprocessor;
    let tmp = tempfile::tempdir().expect("tmp");
    let (home, cn, mut h) = controlnet_canvas(tmp.path());
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.seed = 7;
        form.random_seed = false;
    }
    h.step();
    control(&h, "Control pen").click();
    h.step();
    assert_eq!(h.state().canvas().tool(), Tool::ControlPen);
    // A stroke across the middle of the empty canvas, with the pointer.
    let c = canvas_rect(&h).center();
    drag(&mut h, c - egui::vec2(90.0, 0.0), c + egui::vec2(90.0, 0.0));
    let layer = {
        let doc = h.state().canvas().document();
        assert!(doc.image().is_none());
        assert_eq!(doc.mode(), ModeKind::Txt2Img, "a map for a new image");
        let layer = doc
            .control()
            .expect("the stroke made a control layer")
            .clone();
        assert_eq!((layer.width, layer.height), (32, 32));
        let lit = layer.pixels.chunks_exact(3).filter(|p| p[0] == 255).count();
        assert!(lit > 20, "a line across: {lit} pixels");
        layer
    };
    control(&h, "Add ControlNet unit").click();
    h.step();
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::SetModel(
            0,
            cn.clone(),
        )));
    h.step();
    control(&h, "Layer").click();
    h.step();
    {
        let unit = &h.state().canvas().control_units()[0];
        assert_eq!(unit.source, ControlSource::Layer);
        assert_eq!(unit.preprocessor, Preprocessor::None, "the layer is a map");
        assert_eq!(unit.preview(), Some(&layer));
    }
    let generate = |h: &mut Harness<'_, StudioApp>| -> RgbImage {
        h.state_mut().push_command(CanvasCommand::DiscardAllStaged);
        h.state_mut().push_command(CanvasCommand::Generate);
        h.step();
        step_until(h, "a staged result", |h| {
            !h.state().canvas().is_generating()
                && !h.state().canvas().document().staged().is_empty()
        });
        let staged = &h.state().canvas().document().staged()[0];
        let unit = staged
            .image
            .parameters
            .get("ControlNet 0")
            .expect("recorded");
        assert!(unit.contains("Module: none"), "{unit}");
        staged.image.image.clone()
    };
    let from_layer = generate(&mut h);
    // The same map from a file gives the same image.
    let file = tmp.path().join("layer.png");
    std::fs::write(&file, encode_png(&layer, None).expect("png")).expect("write");
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::SetImage(0, file)));
    h.step();
    assert_eq!(generate(&mut h), from_layer, "the layer is the control map");
    // Back to the layer, with most of the line erased: another image.
    control(&h, "Layer").click();
    h.step();
    control(&h, "Control eraser").click();
    h.step();
    h.state_mut().push_command(CanvasCommand::Paint {
        from: [0, 16],
        to: [24, 16],
    });
    h.state_mut().push_command(CanvasCommand::EndStroke);
    h.step();
    assert_ne!(h.state().canvas().document().control(), Some(&layer));
    assert_ne!(
        generate(&mut h),
        from_layer,
        "the edit reaches the generation"
    );

    // A Canny map of an image file, put on the layer to edit.
    let mut square = RgbImage::new_filled(32, 32, [20, 20, 20]);
    for y in 8..24 {
        for x in 8..24 {
            square.pixels[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3].fill(230);
        }
    }
    let photo = tmp.path().join("photo.png");
    std::fs::write(&photo, encode_png(&square, None).expect("png")).expect("write");
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::SetImage(0, photo)));
    h.step();
    h.state_mut().canvas_mut().control_units_mut()[0].preprocessor =
        Preprocessor::parse("canny").expect("canny");
    h.state_mut()
        .push_command(CanvasCommand::Control(ControlCommand::Preview(0)));
    h.step();
    let edges = h.state().canvas().control_units()[0]
        .preview()
        .expect("a map")
        .clone();
    assert!(edges.pixels.contains(&255), "the square's edges");
    control(&h, "Edit on layer").click();
    h.step();
    assert_eq!(h.state().canvas().document().control(), Some(&edges));
    assert_eq!(
        h.state().canvas().control_units()[0].source,
        ControlSource::Layer
    );
    assert_eq!(h.state().canvas().tool(), Tool::ControlPen, "ready to edit");

    // The layer is saved with the canvas.
    h.state_mut().flush();
    drop(h);
    let mut h = common::harness_sized(&AppConfig::for_tests(&home), egui::vec2(1400.0, 900.0));
    h.step();
    assert_eq!(h.state().canvas().document().control(), Some(&edges));
}

/// The Refiner row: a chosen SDXL refiner is switched on, the worker loads it with the
/// generation and hands over at the switch point, and the PNG names it.
#[test]
fn the_canvas_generates_with_an_sdxl_refiner() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let base = tmp.path().join("tiny-sdxl");
    write_tiny_sd(&base, TinySd::new(TinyKind::Sdxl));
    let refiner = tmp.path().join("tiny-refiner");
    write_tiny_sd(&refiner, TinySd::new(TinyKind::SdxlRefiner));
    let mut h = common::harness_sized(&AppConfig::for_tests(&home), egui::vec2(1400.0, 1600.0));
    h.step();
    go_to_canvas(&mut h);
    drop_file(&mut h, &base);
    step_until(&mut h, "the model to load", |h| {
        h.state().canvas().model().is_some()
    });
    h.state_mut()
        .push_command(CanvasCommand::SetRefiner(refiner.clone()));
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.width = 64;
        form.height = 64;
        form.steps = 2;
        form.refiner_switch_at = 0.4;
        form.prompt = "a red cat".into();
    }
    h.step();
    assert!(h.state().canvas().form().use_refiner);
    assert!(shows_text(&h, "tiny-refiner"));
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let p = &h.state().canvas().document().staged()[0].image.parameters;
    assert_eq!(p.get("Refiner"), Some("tiny-refiner"));
    assert_eq!(p.get("Refiner switch at"), Some("0.4"));
}

/// The LoRA gallery reads the user's added folders besides `models/lora`, shows the preview
/// image beside a file and its trigger words (the web UI's `NAME.json`), and *Add to prompt*
/// adds the tag at the preferred weight with the trigger words.
#[test]
fn the_lora_gallery_shows_previews_and_trigger_words_from_added_folders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_sd(tmp.path());
    let folder = tmp.path().join("my-loras");
    std::fs::create_dir_all(&folder).expect("dir");
    studio_tests::sd::write_tiny_lora(&model, &folder.join("neon.safetensors"));
    std::fs::write(
        folder.join("neon.png"),
        encode_png(&gradient(64, 64), None).expect("png"),
    )
    .expect("preview");
    std::fs::write(
        folder.join("neon.json"),
        r#"{"activation text": "neon glow, cyberpunk", "preferred weight": 0.7}"#,
    )
    .expect("json");
    let mut h = common::harness_sized(&AppConfig::for_tests(&home), egui::vec2(1400.0, 1600.0));
    h.state_mut()
        .settings_mut()
        .lora_folders
        .push(folder.clone());
    h.step();
    go_to_canvas(&mut h);
    h.state_mut().canvas_mut().form_mut().prompt = "a city".into();
    step_until(&mut h, "the preview to load", |h| {
        h.state()
            .canvas()
            .lora_preview_shown(&folder.join("neon.png"))
    });
    let gallery = h.state().canvas().lora_gallery().expect("read").to_vec();
    assert_eq!(gallery.len(), 1);
    assert_eq!(gallery[0].trigger_words, ["neon glow", "cyberpunk"]);
    assert!(shows_text(&h, "neon glow, cyberpunk"));
    control(&h, "Add to prompt").click();
    h.step();
    assert_eq!(
        h.state().canvas().form().prompt,
        "a city <lora:neon:0.7>, neon glow, cyberpunk"
    );
}

/// The hires fix from the form: a latent upscaler chosen in its menu reaches the job, the
/// result is the larger size, and the PNG has the web UI's `Hires …` fields.
#[test]
fn the_hires_fix_with_a_latent_upscaler_makes_the_larger_image() {
    use studio_inference::diffusion::hires::LatentUpscale;
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_sd(tmp.path());
    let mut h = loaded_canvas(&home, &model, 1600.0);
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.hires = true;
        form.hires_scale = 2.0;
        form.hires_steps = 2;
        form.hires_latent = Some(LatentUpscale::Bicubic);
    }
    h.step();
    assert!(
        shows_text(&h, "Latent (bicubic)"),
        "the menu shows the mode"
    );
    control(&h, "Generate").click();
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let staged = &h.state().canvas().document().staged()[0].image;
    assert_eq!((staged.image.width, staged.image.height), (64, 64));
    assert_eq!(
        staged.parameters.get("Hires upscaler"),
        Some("Latent (bicubic)")
    );
    assert_eq!(staged.parameters.get("Hires upscale"), Some("2"));
}
