//! The window: a thin [`eframe::App`] ([`StudioApp`]) over the inference worker, with one
//! folder per panel.
//!
//! Each frame, [`StudioApp::frame_logic`] drains the worker's events for a bounded time and
//! [`StudioApp::root_ui`] draws; widgets never act directly but push a [`Command`], and all
//! commands are applied in one place ([`dispatch`]) at the end of the frame.
//!
//! - [`app`]: state, startup, the `eframe::App` impl, navigation;
//! - [`logic`]: worker events, dropped files, shortcuts;
//! - [`command`]: the [`Command`] enum; [`dispatch`]: what each does;
//! - [`panel_list`]: the panel list, the one place that names the panels; [`panel`]: what a
//!   panel is ([`panel::PanelView`]); [`panels`]: one of each, with the window's hooks passed
//!   on; [`context`]: the shared state a panel borrows;
//! - the panels, one folder each with its state, drawing, commands and store: `chat`
//!   (conversations, messages, parameters), `code` (Code Assist: editor, ghost text, actions
//!   with diffs), `canvas` (Stable Diffusion), `explorer` (StyleGAN2), `models`, `settings`;
//! - [`status_bar`], [`notices`]: what else is drawn; [`markdown`] renders replies and
//!   explanations;
//! - [`settings_store`], [`presets`]: what is saved and read.

pub mod api_server;
pub mod app;
pub mod command;
pub mod context;
pub mod dispatch;
pub mod fonts;
pub mod format;
pub mod jobs;
pub mod logic;
pub mod markdown;
pub mod notices;
pub mod panel;
pub mod panel_list;
pub mod panels;
pub mod paste;
pub mod presets;
pub mod settings_store;
pub mod shortcuts;
pub mod status_bar;
pub mod style;

/// Each panel's folder (`panel_list.rs`).
macro_rules! declare_panel_modules {
    ($($variant:ident { module: $module:ident, $($_rest:tt)* },)*) => {
        $(pub mod $module;)*
    };
}
panel_list::panel_list!(declare_panel_modules);

use anyhow::Context as _;

pub use app::{AppConfig, StudioApp};
pub use command::Command;
pub use panel_list::Panel;
pub use settings_store::Settings;

/// Opens the window and runs until it is closed.
pub fn run() -> anyhow::Result<()> {
    let config = AppConfig::from_env();
    // The thread count must be in the environment before any thread pool (or the worker) starts.
    let (settings, _) = Settings::load(&config.home);
    if let Some(threads) = settings.cpu_threads {
        crate::set_cpu_threads(threads);
    }
    std::fs::create_dir_all(&config.home)
        .with_context(|| format!("creating Studio's data folder {}", config.home.display()))?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Studio")
            .with_app_id("studio")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([760.0, 480.0])
            .with_drag_and_drop(true),
        persistence_path: Some(config.home.join("window.ron")),
        persist_window: true,
        ..eframe::NativeOptions::default()
    };
    eframe::run_native(
        "Studio",
        options,
        Box::new(move |cc| Ok(Box::new(StudioApp::new(&cc.egui_ctx, &config)))),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("running the window")
}
