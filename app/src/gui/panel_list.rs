//! The panel list: the one place that names Studio's panels, in navigation order.
//!
//! Adding a panel is a folder `gui/<module>/` (the panel type implementing
//! [`PanelView`](super::panel::PanelView), with its `<Panel>Command` and `<Panel>Purpose`
//! enums in its leaf `command.rs`) and one line here. The list is a macro, expanded where each
//! piece is needed, so every module that names the panels reads the same list without
//! importing the panels: [`Panel`] here (navigation and the saved settings), the command
//! wrapper in `command.rs`, the job-purpose wrapper in `jobs.rs`, and the panels themselves
//! (their state, drawing and hooks) in `panels.rs`.

use serde::{Deserialize, Serialize};

/// Hands the panel list to macro `$then`. Each line: the [`Panel`] variant (also its name in
/// `settings.json`), the module (folder) under `gui/`, the panel type (in the module's
/// `mod.rs`), its command and job-purpose enums (in the module's `command.rs`), and the label
/// the navigation shows.
macro_rules! panel_list {
    ($then:ident) => {
        $then! {
            Chat { module: chat, panel: ChatPanel, command: ChatCommand, purpose: ChatPurpose, label: "Chat" },
            Code { module: code, panel: CodePanel, command: CodeCommand, purpose: CodePurpose, label: "Code" },
            Canvas { module: canvas, panel: CanvasPanel, command: CanvasCommand, purpose: CanvasPurpose, label: "Canvas" },
            LatentExplorer { module: explorer, panel: ExplorerPanel, command: ExplorerCommand, purpose: ExplorerPurpose, label: "Latent Explorer" },
            Models { module: models, panel: ModelsPanel, command: ModelsCommand, purpose: ModelsPurpose, label: "Models" },
            Settings { module: settings, panel: SettingsPanel, command: SettingsCommand, purpose: SettingsPurpose, label: "Settings" },
        }
    };
}
pub(crate) use panel_list;

macro_rules! define_panel_ids {
    ($($variant:ident { module: $module:ident, panel: $panel:ident, command: $command:ident, purpose: $purpose:ident, label: $label:literal },)*) => {
        /// The panels of the window, in navigation order (saved by name in `settings.json`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Panel {
            $($variant,)*
        }

        impl Panel {
            /// Every panel, in navigation order.
            pub const ALL: &[Panel] = &[$(Panel::$variant,)*];

            /// What the navigation calls it.
            pub fn label(self) -> &'static str {
                match self {
                    $(Panel::$variant => $label,)*
                }
            }
        }
    };
}

panel_list!(define_panel_ids);

impl Default for Panel {
    /// The first panel in the list.
    fn default() -> Self {
        Panel::ALL[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_keep_their_saved_names_and_order() {
        // `settings.json` names the panel shown: these names are a file format.
        let names: Vec<String> = Panel::ALL
            .iter()
            .map(|p| serde_json::to_string(p).expect("json"))
            .collect();
        assert_eq!(
            names,
            [
                "\"Chat\"",
                "\"Code\"",
                "\"Canvas\"",
                "\"LatentExplorer\"",
                "\"Models\"",
                "\"Settings\""
            ]
        );
        assert_eq!(Panel::default(), Panel::Chat);
        assert_eq!(Panel::LatentExplorer.label(), "Latent Explorer");
    }
}
