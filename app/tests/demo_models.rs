//! The bundled demo models (`assets/models/`, issue 21) through the real loaders: the command
//! line uses them when `--model` is left out and says so, and a first launch with no model
//! configured loads them: it chats and writes ghost text with the language model, generates
//! in the Canvas with the text-to-image model and renders the GAN in the Latent Explorer.

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use studio_app::gui::canvas::CanvasCommand;
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_inference::code::complete::FimSupport;
use studio_tests::code::write_code_model;

mod cli_common;
mod common;
use cli_common::{ok, path, studio};
use common::{go_to, step_until};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models")
}

#[test]
fn the_command_line_uses_the_demo_language_model_without_model() {
    assert!(
        models_dir().join("studio-demo-lm/config.json").is_file(),
        "the demo language model is committed under assets/models/studio-demo-lm"
    );
    let out = studio(&[
        "chat",
        "--message",
        "What does `os.path.join` do?",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ]);
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("using the bundled demo language model"),
        "{stderr}"
    );
    let done: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a summary")).expect("json");
    assert!(
        done["generated_tokens"].as_u64().expect("count") > 0,
        "{stdout}"
    );

    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("a.py");
    std::fs::write(&file, "import os\n\n\ndef join(a, b):\n    return \n").expect("write");
    let out = studio(&[
        "complete",
        "--file",
        path(&file),
        "--line",
        "5",
        "--column",
        "12",
        "--max-tokens",
        "8",
        "--json",
    ]);
    let stdout = ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("using the bundled demo language model"));
    assert!(stdout.contains("\"done\""), "{stdout}");
}

fn first_launch(home: &Path) -> Harness<'static, StudioApp> {
    let config = AppConfig {
        bundled_models: Some(models_dir()),
        ..AppConfig::for_tests(home)
    };
    let app = StudioApp::new(&egui::Context::default(), &config);
    Harness::builder()
        .with_size(egui::vec2(1400.0, 900.0))
        // A tiny model's tokens may decode to characters the test fonts lack.
        .allow_missing_glyphs()
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                app.frame_logic(ui.ctx());
                app.root_ui(ui);
            },
            app,
        )
}

#[test]
fn a_first_launch_loads_the_demo_language_model_for_chat_and_ghost_text() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = first_launch(&tmp.path().join("home"));
    step_until(&mut h, "the demo model to load", |h| {
        h.state().model().is_some() && !h.state().is_busy()
    });
    assert!(
        matches!(h.state().fim_support(), FimSupport::Supported(_)),
        "the demo model has FIM tokens"
    );
    assert!(
        common::shows_text(&h, "Studio loaded its small demo models"),
        "the window says what it loaded"
    );

    // Chat.
    go_to(&mut h, Panel::Chat);
    h.get_by_label("Message").focus();
    h.step();
    h.get_by_label("Message")
        .type_text("What does `os.getcwd` do?");
    h.step();
    h.get_by_label("Send").click();
    h.step();
    step_until(&mut h, "the reply to finish", |h| {
        !h.state().is_busy()
            && h.state().chat().current().is_some_and(|c| {
                c.active_path()
                    .last()
                    .is_some_and(|m| !m.content.trim().is_empty())
            })
    });

    // Ghost text in the Code panel.
    h.state_mut().settings_mut().code.ghost_delay_ms = 0;
    go_to(&mut h, Panel::Code);
    h.get_by_label("Code editor").focus();
    h.step();
    h.get_by_label("Code editor")
        .type_text("import os\n\n\ndef here():\n    return os.");
    h.step();
    step_until(&mut h, "a suggestion", |h| {
        h.state().code().ghost.job().is_none()
            && !h.state().is_busy()
            && (h.state().code().ghost_text().is_some() || h.state().code().ghost.submitted > 0)
    });
    assert!(
        h.state().code().ghost.last_error.is_none(),
        "{:?}",
        h.state().code().ghost.last_error
    );
}

#[test]
fn a_configured_model_is_not_replaced_by_the_demo() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let other = tmp.path().join("coder");
    write_code_model(&other, 3, true);
    {
        // Without demo models, nothing loads until the user picks a model.
        let app = StudioApp::new(&egui::Context::default(), &AppConfig::for_tests(&home));
        let mut h = Harness::builder().build_ui_state(
            |ui, app: &mut StudioApp| {
                app.frame_logic(ui.ctx());
                app.root_ui(ui);
            },
            app,
        );
        h.step();
        assert!(h.state().model().is_none() && !h.state().is_busy());
        h.state_mut()
            .push_command(Command::LoadModel(other.clone()));
        step_until(&mut h, "the model to load", |h| {
            h.state().model().is_some() && !h.state().is_busy()
        });
        // Dropping the app (closing the window) writes the settings.
    }
    let mut h = first_launch(&home);
    step_until(&mut h, "the last model to load again", |h| {
        h.state().model().is_some() && !h.state().is_busy()
    });
    assert_eq!(h.state().settings().last_model.as_ref(), Some(&other));
}

#[test]
fn the_command_line_uses_the_demo_gan_without_model() {
    assert!(
        models_dir()
            .join("gan/studio-demo-faces.safetensors")
            .is_file(),
        "the demo GAN is committed under assets/models/gan"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let out_path = tmp.path().join("face.png");
    let out = studio(&["gan", "--seed", "3", "--out", path(&out_path)]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("using the bundled demo GAN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = studio_inference::diffusion::imaging::decode_image_file(&out_path)
        .expect("a PNG")
        .image;
    assert_eq!((image.width, image.height), (64, 64));
}

#[test]
fn a_first_launch_loads_the_demo_gan_in_the_latent_explorer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = first_launch(&tmp.path().join("home"));
    go_to(&mut h, Panel::LatentExplorer);
    step_until(&mut h, "the demo GAN to render", |h| {
        let e = h.state().explorer();
        let (newest, shown) = e.request_ids();
        e.model().is_some() && newest > 0 && shown == Some(newest) && e.image().is_some()
    });
    let image = h.state().explorer().image().expect("image");
    assert_eq!((image.width, image.height), (64, 64));
    assert_eq!(
        h.state().settings().last_gan_model.as_ref(),
        Some(&models_dir().join("gan/studio-demo-faces.safetensors"))
    );
}

#[test]
fn the_command_line_uses_the_demo_image_model_without_model() {
    assert!(
        models_dir()
            .join("studio-demo-sd/model_index.json")
            .is_file(),
        "the demo text-to-image model is committed under assets/models/studio-demo-sd"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let out_path = tmp.path().join("shapes.png");
    let out = studio(&[
        "txt2img",
        "--prompt",
        "a large red circle in the middle, white background",
        "--steps",
        "8",
        "--seed",
        "1",
        "--out",
        path(&out_path),
    ]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("using the bundled demo text-to-image model"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = studio_inference::diffusion::imaging::decode_image_file(&out_path)
        .expect("a PNG")
        .image;
    assert_eq!(
        (image.width, image.height),
        (64, 64),
        "the model's own size"
    );
    // Without --cfg, the demo model's own guidance (its card's best), written in the PNG.
    let bytes = std::fs::read(&out_path).expect("png");
    let params = studio_inference::image_meta::png_parameters(&bytes)
        .expect("readable")
        .expect("parameters");
    assert_eq!(params.cfg_scale(), Some(4.0), "{}", params.to_text());
}

#[test]
fn a_first_launch_loads_the_demo_image_model_in_the_canvas_and_generates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = first_launch(&tmp.path().join("home"));
    go_to(&mut h, Panel::Canvas);
    step_until(&mut h, "the demo image model to load", |h| {
        h.state().canvas().model().is_some()
    });
    assert_eq!(
        h.state().settings().last_image_model.as_ref(),
        Some(&models_dir().join("studio-demo-sd"))
    );
    let form = h.state().canvas().form();
    assert_eq!(
        (form.width, form.height),
        (64, 64),
        "the form takes its size"
    );
    assert!(
        (form.cfg_scale - 4.0).abs() < 1e-6,
        "the form takes the demo model's guidance, not {}",
        form.cfg_scale
    );
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.prompt = "a small blue square on the left, yellow background".into();
        form.steps = 6;
    }
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    step_until(&mut h, "a staged result", |h| {
        !h.state().canvas().is_generating() && !h.state().canvas().document().staged().is_empty()
    });
    let canvas = h.state().canvas();
    assert!(canvas.progress_events() > 0 || canvas.previews_shown() > 0);
    let image = &canvas.document().staged()[0].image.image;
    assert_eq!((image.width, image.height), (64, 64));
}
