//! The Models panel's *Get models*: a starter list per panel (`presets/models/*.json`), search
//! on the Hub, a repository's files with their size, quant type, the panel they serve and
//! whether they fit this machine's memory, and the download queue with progress, pause,
//! resume, cancel and *Load* when a download ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use egui::RichText;
use serde::Deserialize;
use studio_inference::hub::api::RepoInfo;
use studio_inference::hub::select::{FileKind, kind, quant_of};

use super::downloads::{Hub, Served, State};
use crate::gui::canvas::command::CanvasCommand;
use crate::gui::command::Command;
use crate::gui::explorer::command::ExplorerCommand;
use crate::gui::panel_list::Panel;
use crate::gui::style::weak;

/// One model of the starter list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Starter {
    pub name: String,
    pub repo: String,
    /// The one file to get; none: what Studio loads from the repository.
    #[serde(default)]
    pub file: Option<String>,
    /// The revision (branch, tag or commit) to get; none: `main`. A commit pins the entry to
    /// the files that were checked when it was listed.
    #[serde(default)]
    pub revision: Option<String>,
    pub panel: Served,
    /// About how large, in MB.
    #[serde(default)]
    pub size_mb: Option<u64>,
    #[serde(default)]
    pub license: Option<String>,
    pub description: String,
}

#[derive(Deserialize)]
struct StarterFile {
    models: Vec<Starter>,
}

/// The starter lists in `<presets>/models/*.json`, in file-name order; problems are returned
/// as notes.
pub fn load_starters(presets_dir: Option<&Path>) -> (Vec<Starter>, Vec<String>) {
    let mut all = Vec::new();
    let mut notes = Vec::new();
    let Some(dir) = presets_dir.map(|d| d.join("models")) else {
        return (all, notes);
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (all, notes);
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let parsed = std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<StarterFile>(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(f) => all.extend(f.models),
            Err(e) => notes.push(format!("{}: {e}", file.display())),
        }
    }
    (all, notes)
}

/// Free memory of the NVIDIA GPU the worker runs on, asked of `nvidia-smi` off the UI thread
/// (on the `studio-gpu-memory` thread, every 5 s while the panel exists).
#[derive(Default)]
pub struct GpuMemory {
    /// The GPU being polled.
    polled: Option<usize>,
    free: Arc<Mutex<Option<u64>>>,
}

impl GpuMemory {
    /// The latest free bytes of CUDA device `index` (`None`: the worker is not on an NVIDIA
    /// GPU, or its memory is not known yet); starts polling it the first time.
    pub fn free(&mut self, index: Option<usize>) -> Option<(usize, u64)> {
        let index = index?;
        if self.polled != Some(index) {
            self.polled = Some(index);
            let slot = Arc::downgrade(&self.free);
            let spawned = std::thread::Builder::new()
                .name("studio-gpu-memory".to_owned())
                .spawn(move || {
                    // Ends once the panel (the only strong owner) is gone.
                    while let Some(free) = slot.upgrade() {
                        let bytes = studio_inference::sys::nvidia_free_memory_bytes(index);
                        *free.lock().unwrap_or_else(PoisonError::into_inner) = bytes;
                        drop(free);
                        std::thread::sleep(Duration::from_secs(5));
                    }
                });
            if spawned.is_err() {
                return None;
            }
        }
        let free = *self.free.lock().unwrap_or_else(PoisonError::into_inner);
        free.map(|b| (index, b))
    }
}

/// How a model of `bytes` fits in the memory it would run in: the free memory of the NVIDIA
/// GPU the worker runs on (`gpu`: its index and free bytes), else this machine's free RAM.
pub fn fit(bytes: u64, gpu: Option<(usize, u64)>) -> (&'static str, String) {
    match gpu {
        Some((index, free)) => fit_in(bytes, free, &format!("GPU memory (CUDA {index})")),
        None => studio_inference::sys::available_memory_bytes()
            .map_or(("", String::new()), |free| fit_in(bytes, free, "memory")),
    }
}

/// How `bytes` of weights fit in `free` bytes of `what`: "fits", "tight" or "too large", and
/// the figures.
pub fn fit_in(bytes: u64, free: u64, what: &str) -> (&'static str, String) {
    // The weights, plus what running them needs (caches, activations).
    let needed = bytes as f64 * 1.2;
    let share = needed / free.max(1) as f64;
    let label = if share <= 0.6 {
        "fits"
    } else if share <= 0.9 {
        "tight"
    } else {
        "too large"
    };
    (
        label,
        format!(
            "needs about {:.1} GB of the {:.1} GB of {what} free now",
            needed / 1e9,
            free as f64 / 1e9
        ),
    )
}

fn size(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_owned(), crate::gui::format::bytes)
}

/// The command that loads a finished download in the panel it serves.
fn load_command(served: Option<Served>, path: PathBuf) -> Vec<Command> {
    match served {
        Some(Served::Canvas) => vec![
            Command::from(CanvasCommand::LoadModel(path)),
            Command::ShowPanel(Panel::Canvas),
        ],
        Some(Served::Explorer) => vec![
            Command::from(ExplorerCommand::LoadModel(path)),
            Command::ShowPanel(Panel::LatentExplorer),
        ],
        Some(Served::Code) => vec![Command::LoadModel(path), Command::ShowPanel(Panel::Code)],
        Some(Served::Chat) | None => vec![Command::LoadModel(path), Command::ShowPanel(Panel::Chat)],
    }
}

/// Draws *Get models*.
pub fn get_models_ui(
    ui: &mut egui::Ui,
    hub: &mut Hub,
    starters: &[Starter],
    gpu: Option<(usize, u64)>,
    commands: &mut Vec<Command>,
) {
    if !hub.available() {
        ui.label(weak(
            ui,
            "Downloading is not available: Studio found no Hugging Face cache folder (set \
             HF_HUB_CACHE or HF_HOME). Models already on disk open as usual.",
        ));
        return;
    }
    if hub.offline() {
        ui.label(weak(
            ui,
            "HF_HUB_OFFLINE is set: Studio makes no request to the Hub. The models already in \
             the cache are listed below.",
        ));
        downloads_ui(ui, hub, commands);
        return;
    }
    if let Some(e) = hub.error.clone() {
        ui.label(RichText::new(e).color(ui.visuals().error_fg_color));
    }
    if !starters.is_empty() {
        ui.label(RichText::new("Starter models").strong());
        egui::Grid::new("starter_models")
            .num_columns(4)
            .spacing([12.0, 4.0])
            .show(ui, |ui| {
                for s in starters {
                    ui.label(s.panel.label());
                    ui.label(RichText::new(&s.name).strong())
                        .on_hover_text(match &s.revision {
                            Some(rev) => format!("{} at {rev}", s.repo),
                            None => s.repo.clone(),
                        });
                    // The button before the details, so a long description never pushes it
                    // out of a narrow window.
                    let busy = hub.downloads.iter().any(|d| {
                        d.repo == s.repo
                            && d.files == s.file.iter().cloned().collect::<Vec<_>>()
                            && matches!(d.state, State::Queued | State::Running { .. })
                    });
                    if ui
                        .add_enabled(!busy, egui::Button::new("Download"))
                        .on_hover_text(format!("Get {} from {}", s.repo, hub.endpoint().unwrap_or("")))
                        .clicked()
                    {
                        hub.download(
                            &s.repo,
                            s.revision.as_deref(),
                            s.file.iter().cloned().collect(),
                            Some(s.panel),
                        );
                    }
                    let (fits, why) = s.size_mb.map_or(("", String::new()), |m| fit(m * 1_000_000, gpu));
                    ui.label(weak(
                        ui,
                        &format!(
                            "{}{}{} · {}",
                            s.size_mb.map_or(String::new(), |m| format!("about {m} MB · ")),
                            if fits.is_empty() { String::new() } else { format!("{fits} · ") },
                            s.license.as_deref().unwrap_or("license: see the repository"),
                            s.description
                        ),
                    ))
                    .on_hover_text(why);
                    ui.end_row();
                }
            });
        ui.add_space(8.0);
    }
    ui.label(RichText::new("Find on the Hub").strong());
    ui.horizontal(|ui| {
        let response = ui
            .add(
                egui::TextEdit::singleline(&mut hub.query)
                    .hint_text("Model name, e.g. qwen2.5 gguf")
                    .desired_width(320.0),
            )
            .accessible_name("Search the Hub");
        let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let label = |f: Option<&str>| match f {
            Some("gguf") => "GGUF (chat, code)",
            Some("diffusers") => "Diffusers (images)",
            Some("safetensors") => "Safetensors",
            _ => "Any",
        };
        egui::ComboBox::from_id_salt("hub_filter")
            .selected_text(label(hub.filter))
            .show_ui(ui, |ui| {
                for f in [Some("gguf"), Some("diffusers"), Some("safetensors"), None] {
                    ui.selectable_value(&mut hub.filter, f, label(f));
                }
            })
            .response
            .on_hover_text("Only repositories with files Studio runs");
        if (ui.button("Search").clicked() || enter) && !hub.query.trim().is_empty() {
            hub.search();
        }
        if hub.searching {
            ui.spinner();
        }
    });
    let mut open = None;
    for hit in &hub.results {
        ui.horizontal(|ui| {
            if ui.link(&hit.id).clicked() {
                open = Some(hit.id.clone());
            }
            let tags: Vec<&str> = hit
                .tags
                .iter()
                .map(String::as_str)
                .filter(|t| ["gguf", "diffusers", "safetensors", "text-generation"].contains(t))
                .collect();
            ui.label(weak(
                ui,
                &format!(
                    "{}{}",
                    hit.downloads.map_or(String::new(), |d| format!("{d} downloads ")),
                    tags.join(" ")
                ),
            ));
        });
    }
    if hub.next_page.is_some() && ui.button("More results").clicked() {
        hub.more();
    }
    if let Some(repo) = open {
        hub.open_repo(&repo);
    }
    if let Some(repo) = &hub.loading_repo {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("Reading {repo}…"));
        });
    }
    if let Some(info) = hub.repo.clone() {
        ui.add_space(6.0);
        repo_ui(ui, hub, &info, gpu);
    }
    ui.add_space(8.0);
    downloads_ui(ui, hub, commands);
}

/// A repository's files.
fn repo_ui(ui: &mut egui::Ui, hub: &mut Hub, info: &RepoInfo, gpu: Option<(usize, u64)>) {
    let names: Vec<&str> = info.files.iter().map(|f| f.name.as_str()).collect();
    let served = Served::of(&info.id, &names);
    ui.horizontal(|ui| {
        ui.label(RichText::new(&info.id).strong());
        ui.label(weak(
            ui,
            &format!(
                "{} · for {}",
                info.license.as_deref().unwrap_or("no license given"),
                served.map_or("no panel Studio has", Served::label)
            ),
        ));
    });
    if info.gated {
        ui.label(
            RichText::new(format!(
                "Gated: accept its license at {}/{} and set HF_TOKEN to download it.",
                hub.endpoint().unwrap_or(""),
                info.id
            ))
            .color(ui.visuals().warn_fg_color),
        );
    }
    if ui
        .button("Download what Studio loads")
        .on_hover_text("The weights Studio opens from this repository, with their configs")
        .clicked()
    {
        hub.download(&info.id, None, Vec::new(), served);
    }
    egui::Grid::new("repo_files")
        .num_columns(4)
        .spacing([12.0, 2.0])
        .show(ui, |ui| {
            for f in &info.files {
                let k = kind(&f.name);
                if matches!(k, FileKind::Other) {
                    continue;
                }
                ui.label(&f.name);
                ui.label(weak(ui, &size(f.size)));
                let about = match k {
                    FileKind::Gguf => quant_of(&f.name).unwrap_or_else(|| "GGUF".to_owned()),
                    FileKind::Safetensors => "safetensors".to_owned(),
                    FileKind::Pickle => "pickle (read as data)".to_owned(),
                    FileKind::Companion | FileKind::Other => "config".to_owned(),
                };
                let (fits, why) = match (k, f.size) {
                    (FileKind::Gguf | FileKind::Safetensors | FileKind::Pickle, Some(b)) => fit(b, gpu),
                    _ => ("", String::new()),
                };
                ui.label(weak(ui, &format!("{about} {fits}"))).on_hover_text(why);
                if matches!(k, FileKind::Companion) {
                    ui.label("");
                } else if ui.small_button("Download").clicked() {
                    hub.download(&info.id, None, vec![f.name.clone()], served);
                }
                ui.end_row();
            }
        });
}

/// The download queue.
fn downloads_ui(ui: &mut egui::Ui, hub: &mut Hub, commands: &mut Vec<Command>) {
    if hub.downloads.is_empty() {
        return;
    }
    ui.label(RichText::new("Downloads").strong());
    let mut actions = Vec::new();
    for d in &hub.downloads {
        let what = if d.files.is_empty() {
            d.repo.clone()
        } else {
            format!("{} · {}", d.repo, d.files.join(", "))
        };
        ui.horizontal(|ui| {
            ui.label(&what);
            match &d.state {
                State::Queued => {
                    ui.label(weak(ui, "waiting"));
                    if ui.small_button("Cancel").clicked() {
                        actions.push((d.id, 2));
                    }
                }
                State::Running {
                    file,
                    done,
                    total,
                    speed,
                } => {
                    let fraction = total.map_or(0.0, |t| *done as f32 / t.max(1) as f32);
                    let left = total
                        .filter(|_| *speed > 0.0)
                        .map(|t| (t.saturating_sub(*done)) as f64 / speed);
                    ui.add(
                        egui::ProgressBar::new(fraction)
                            .desired_width(440.0)
                            .text(format!(
                                "{file}: {} of {} · {:.1} MB/s{}",
                                crate::gui::format::bytes(*done),
                                size(*total),
                                speed / 1e6,
                                left.map_or(String::new(), |s| format!(" · {}s left", s.round() as u64))
                            )),
                    );
                    if ui.small_button("Pause").clicked() {
                        actions.push((d.id, 1));
                    }
                    if ui.small_button("Cancel").clicked() {
                        actions.push((d.id, 2));
                    }
                }
                State::Paused => {
                    ui.label(weak(ui, "paused (the part downloaded is kept)"));
                    if ui.small_button("Resume").clicked() {
                        actions.push((d.id, 0));
                    }
                    if ui.small_button("Cancel").clicked() {
                        actions.push((d.id, 2));
                    }
                }
                State::Done(path) => {
                    ui.label(weak(ui, "downloaded and verified"));
                    let panel = d.served.map_or("Chat", Served::label);
                    if ui
                        .button(format!("Load in {panel}"))
                        .on_hover_text(format!("Open it in the {panel} panel"))
                        .clicked()
                    {
                        commands.extend(load_command(d.served, path.clone()));
                    }
                }
                State::Failed(e) => {
                    ui.label(RichText::new(e).color(ui.visuals().error_fg_color));
                    if ui.small_button("Retry").clicked() {
                        actions.push((d.id, 0));
                    }
                }
                State::Cancelled => {
                    ui.label(weak(ui, "cancelled"));
                }
            }
        });
    }
    if hub
        .downloads
        .iter()
        .any(|d| matches!(d.state, State::Done(_) | State::Failed(_) | State::Cancelled))
        && ui.small_button("Clear finished").clicked()
    {
        hub.clear_finished();
    }
    for (id, action) in actions {
        match action {
            0 => hub.resume(id),
            1 => hub.stop(id, false),
            _ => hub.stop(id, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped starter list reads, and offers at least one model for each panel.
    #[test]
    fn the_shipped_starters_cover_every_panel() {
        let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets");
        let (starters, notes) = load_starters(Some(&presets));
        assert!(notes.is_empty(), "{notes:?}");
        for panel in [Served::Chat, Served::Code, Served::Canvas, Served::Explorer] {
            assert!(
                starters.iter().any(|s| s.panel == panel),
                "no starter for the {} panel",
                panel.label()
            );
        }
        for s in &starters {
            assert!(s.size_mb.is_some() && s.license.is_some(), "{}", s.name);
            // A file that is a pickle is one Studio reads as data: an NVIDIA network.
            if let Some(f) = &s.file
                && kind(f) == FileKind::Pickle
            {
                assert_eq!(s.panel, Served::Explorer, "{}", s.name);
            }
            if let Some(rev) = &s.revision {
                assert!(studio_inference::hub::check_revision(rev).is_ok(), "{rev}");
            }
        }
    }

    #[test]
    fn the_fit_names_the_memory_it_was_measured_against() {
        let gb = 1_000_000_000u64;
        let (label, why) = fit_in(gb, 8 * gb, "GPU memory (CUDA 0)");
        assert_eq!(label, "fits");
        assert_eq!(
            why,
            "needs about 1.2 GB of the 8.0 GB of GPU memory (CUDA 0) free now"
        );
        assert_eq!(fit_in(5 * gb, 8 * gb, "memory").0, "tight");
        assert_eq!(fit_in(7 * gb, 8 * gb, "memory").0, "too large");
        // On the GPU, its memory decides, not the RAM.
        assert_eq!(fit(7 * gb, Some((1, 8 * gb))).0, "too large");
        assert!(fit(gb, Some((1, 80 * gb))).1.contains("CUDA 1"));
    }
}
