//! What a panel is to the window: [`PanelView`], the hooks the window calls on every panel
//! in the list (`panel_list.rs`), and the contexts it lends them.
//!
//! A panel draws (`ui`, pushing [`Command`]s and never acting directly), carries out its own
//! commands (`apply`) and handles the events of the jobs it submitted (`on_event`). The other
//! hooks have defaults that do nothing, so a panel implements only what it uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use studio_inference::llm::loader::ModelInfo;
use studio_inference::worker::{Event, JobId, LoadOptions, Worker};

use super::api_server::ServerStatus;
use super::command::Command;
use super::context::{AppContext, Handled};
use super::jobs::Jobs;
use super::notices::Notices;
use super::settings_store::Settings;
use crate::files::FileWorker;

/// What a panel reads while it opens its saved state (once, at startup).
pub struct OpenContext<'a> {
    pub ctx: &'a egui::Context,
    /// Studio's data folder.
    pub home: &'a Path,
    /// The preset galleries' folder, if there is one.
    pub presets_dir: Option<&'a Path>,
    /// The Hugging Face hub cache to list, if any.
    pub hf_cache_dir: Option<&'a Path>,
    /// The Hub to search and download from, if downloading is on.
    pub hub: Option<&'a studio_inference::hub::HubConfig>,
    /// The bundled demo models' folder (`assets/models`), if there is one.
    pub bundled_models: Option<&'a Path>,
    pub settings: &'a Settings,
    /// Where what went wrong while opening is said.
    pub notices: &'a mut Notices,
}

/// What a panel may read (and the settings it may change) while it draws.
pub struct UiContext<'a> {
    pub settings: &'a mut Settings,
    pub jobs: &'a Jobs,
    pub files: &'a FileWorker,
    /// `None` when the worker could not start.
    pub worker: Option<&'a Worker>,
    /// The loaded language model, and what it was loaded with.
    pub model: Option<&'a ModelInfo>,
    pub model_options: Option<&'a LoadOptions>,
    /// The device the worker runs on, in words.
    pub device_label: &'a str,
    /// Studio's data folder.
    pub home: &'a Path,
    /// The Settings panel's API server.
    pub server: ServerStatus<'a>,
    /// Where the frame's commands go; they are applied after the frame is drawn.
    pub commands: &'a mut Vec<Command>,
}

/// For a panel's `restore`: the path the last session had loaded, if it is still there. A
/// path that is gone is forgotten (`saved` becomes `None`), with a notice saying so and that
/// another can be opened `where_to_open` ("in the Canvas").
pub fn still_there(
    saved: &mut Option<PathBuf>,
    what: &str,
    where_to_open: &str,
    notices: &mut Notices,
) -> Option<PathBuf> {
    let path = saved.clone()?;
    if path.exists() {
        return Some(path);
    }
    notices.warning(format!(
        "The last {what}, {}, is no longer there; open another {where_to_open}",
        path.display()
    ));
    *saved = None;
    None
}

/// One panel of the window. The window calls each hook on every panel in the list, in list
/// order (`ui`, `shortcuts` and `drop_hint` only on the panel shown).
pub trait PanelView {
    /// What the panel asks for (its leaf `command.rs`), inside `Command::Panel`.
    type Command;
    /// Why the panel submitted a job (its leaf `command.rs`), inside `JobPurpose::Panel`:
    /// the job's events come back to this panel's `on_event` with it.
    type Purpose;

    /// Reads the panel's saved state; problems are said in `cx.notices`.
    fn open(cx: &mut OpenContext<'_>) -> Self
    where
        Self: Sized;

    /// Draws the panel (when it is the one shown).
    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut UiContext<'_>);

    /// Carries out one of the panel's commands (at the end of a frame).
    fn apply(&mut self, command: Self::Command, cx: &mut AppContext<'_>);

    /// An event of a job this panel submitted; what it does not take goes to the window.
    fn on_event(
        &mut self,
        _job: JobId,
        _purpose: &Self::Purpose,
        event: Event,
        _cx: &mut AppContext<'_>,
    ) -> Handled {
        Handled::No(event)
    }

    /// At startup, when the user's last session is restored: load what the panel had loaded.
    fn restore(&mut self, _cx: &mut AppContext<'_>) {}

    /// Every frame, before drawing: polls, periodic saves, repaints the panel needs.
    fn frame(&mut self, _cx: &mut AppContext<'_>) {}

    /// Before the frame is drawn, after it is drawn and after its commands are applied: keeps
    /// what the panel shows and the settings in step.
    fn settle(&mut self, _settings: &mut Settings) {}

    /// The keyboard shortcuts and pastes of the panel shown (before the window's own).
    fn shortcuts(&mut self, _cx: &mut AppContext<'_>) {}

    /// A dropped file: whether this panel takes it (`shown`: it is the panel shown, which is
    /// asked first). Files no panel takes are the window's (models to load, images for the
    /// Canvas).
    fn take_drop(&mut self, _path: &Path, _shown: bool, _cx: &mut AppContext<'_>) -> bool {
        false
    }

    /// What dropping files does while this panel is shown, if it is not the window's default.
    fn drop_hint(&self) -> Option<&'static str> {
        None
    }

    /// Starts saving work that changed; returns when to look again.
    fn autosave(&mut self, _cx: &mut AppContext<'_>) -> Option<Duration> {
        None
    }

    /// Writes everything not on disk yet (the window is closing or saving).
    fn flush(&mut self, _cx: &mut AppContext<'_>) {}

    /// The window is gone: end what outlives nothing (an undo's trash).
    fn close(&mut self, _cx: &mut AppContext<'_>) {}
}
