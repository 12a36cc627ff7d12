//! What the window tests share: a headless `StudioApp` under egui_kittest driven like a person
//! would (clicks by accessible name, dropped files), and waiting for the worker.
//!
//! Each test binary uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use studio_app::gui::{AppConfig, Panel, StudioApp};

/// How long to wait for the worker (loading, generating) before failing.
pub const TIMEOUT: Duration = Duration::from_secs(90);

/// The whole window at `size`, as `eframe` runs it: frame logic, then the UI.
pub fn harness_sized(config: &AppConfig, size: egui::Vec2) -> Harness<'static, StudioApp> {
    let app = StudioApp::new(&egui::Context::default(), config);
    let harness = Harness::builder().with_size(size).build_ui_state(
        |ui, app: &mut StudioApp| {
            app.frame_logic(ui.ctx());
            app.root_ui(ui);
        },
        app,
    );
    // The window installs Studio's fonts on its own context (`StudioApp::new`); the harness
    // has its own.
    studio_app::gui::fonts::install(&harness.ctx);
    harness
}

/// Steps frames (with short sleeps for the worker) until `done` holds; fails after [`TIMEOUT`].
#[track_caller]
pub fn step_until(
    h: &mut Harness<'_, StudioApp>,
    what: &str,
    done: impl Fn(&Harness<'_, StudioApp>) -> bool,
) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        h.step();
        if done(h) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The widget other than plain text with this exact name (navigation, buttons).
#[track_caller]
pub fn control<'a>(h: &'a Harness<'_, StudioApp>, name: &'a str) -> egui_kittest::Node<'a> {
    h.get_all_by(move |n| n.role() != Role::Label && n.label().as_deref() == Some(name))
        .next()
        .unwrap_or_else(|| panic!("no control named {name}"))
}

/// Whether some node's name or value (label text, a combo box's choice) contains `text`.
pub fn shows_text(h: &Harness<'_, StudioApp>, text: &str) -> bool {
    h.query_all_by(move |n| {
        n.label().is_some_and(|l| l.contains(text)) || n.value().is_some_and(|v| v.contains(text))
    })
    .next()
    .is_some()
}

/// Clicks the panel in the navigation and checks it is shown.
pub fn go_to(h: &mut Harness<'_, StudioApp>, panel: Panel) {
    control(h, panel.label()).click();
    h.step();
    h.step();
    assert_eq!(h.state().settings().panel, panel);
}

/// A file dropped on the window.
#[derive(Debug)]
pub struct DroppedPath(pub PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// Drops `path` on the window and lets two frames handle it.
pub fn drop_file(h: &mut Harness<'_, StudioApp>, path: &Path) {
    h.input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(path.to_path_buf())));
    h.step();
    h.step();
}
