//! Everything the user can ask for, as data: widgets push [`Command`]s while the frame is
//! drawn, and `StudioApp::apply_commands` (`dispatch.rs`) carries them out in one place
//! afterwards. A panel's own commands ride in [`Command::Panel`] as a [`PanelCommand`], built
//! from the panel list (`panel_list.rs`) and the panels' leaf `command` modules, so this
//! module imports no panel.

use std::path::PathBuf;

use studio_inference::llm::remote::RemoteConfig;

pub use super::chat::command::ExportFormat;
use super::panel_list::{Panel, panel_list};

/// What the window is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowPanel(Panel),
    /// Load a model folder or file (replacing the loaded one), with the load options from
    /// the settings.
    LoadModel(PathBuf),
    UnloadModel,
    /// Chat through an OpenAI-compatible server (replaces the loaded model).
    ConnectRemote(RemoteConfig),
    /// Start the OpenAI-compatible API server on the loaded model, as the settings say.
    StartApiServer,
    StopApiServer,
    /// Cancel whatever the worker is running now (status bar's Cancel, Esc).
    CancelRunningJob,
    /// Ask where to save a pickled model (`.ckpt`, `.pth`, `pytorch_model.bin`, NVIDIA's
    /// `.pkl`) as safetensors, then convert it (*Save as safetensors…*).
    SaveAsSafetensors(PathBuf),
    /// Convert the pickle `from` to the safetensors file `to` (and an NVIDIA network's settings
    /// to `to` with `.json`), reading it as data: nothing in it runs.
    ConvertCheckpoint {
        from: PathBuf,
        to: PathBuf,
    },
    /// Something a panel asks for, carried out by that panel's `apply`.
    Panel(PanelCommand),
}

macro_rules! define_panel_commands {
    ($($variant:ident { module: $module:ident, panel: $panel:ident, command: $command:ident, purpose: $purpose:ident, label: $label:literal },)*) => {
        /// A command of one panel (each panel's enum is in its leaf `command.rs`).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum PanelCommand {
            $($variant(super::$module::command::$command),)*
        }

        $(impl From<super::$module::command::$command> for Command {
            fn from(command: super::$module::command::$command) -> Self {
                Command::Panel(PanelCommand::$variant(command))
            }
        })*
    };
}

panel_list!(define_panel_commands);

/// A file name from a title: characters file systems refuse become `-`.
pub fn file_name_from(title: &str) -> String {
    let cleaned: String = title
        .chars()
        .map(|c| {
            if c.is_control() || "/\\:*?\"<>|".contains(c) {
                '-'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim().trim_matches('.').trim();
    if cleaned.is_empty() {
        "chat".to_owned()
    } else {
        cleaned.chars().take(80).collect()
    }
}

/// "Could not load …: why", without naming the path twice when the loader's message does.
pub fn load_error(path: &std::path::Path, error: &str) -> String {
    let shown = path.display().to_string();
    if error.contains(&shown) {
        format!("Could not load the model: {error}")
    } else {
        format!("Could not load {shown}: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_file_names_are_safe() {
        assert_eq!(file_name_from("What is 2/3?"), "What is 2-3-");
        assert_eq!(file_name_from("  ..  "), "chat");
        assert_eq!(file_name_from("Plain"), "Plain");
    }
}
